"""Airflow timetable: one run per exchange session, `lead` before the open, data interval [open - lead, open)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pendulum
from airflow.exceptions import AirflowTimetableInvalid
from airflow.timetables.base import DagRunInfo, DataInterval, Timetable
from airflow.utils.types import DagRunType

from overnight.domain import sessions
from overnight.domain.markets import MAX_LEAD, format_lead

if TYPE_CHECKING:
    from airflow.timetables.base import TimeRestriction
    from pendulum import DateTime

RUN_ID_PREFIX = "session__"


def _utcnow() -> datetime:
    """The current aware UTC time (a function so tests can fake it)."""
    return datetime.now(UTC)


def _pendulum(value: datetime) -> DateTime:
    """An aware UTC pendulum DateTime, the type Airflow's DagRunInfo/DataInterval expect."""
    return pendulum.instance(value.astimezone(UTC), tz=pendulum.UTC)


class MarketSessionTimetable(Timetable):
    """Schedules a run `lead` before each session of `market_code` opens (holidays, DST, late opens included)."""

    periodic = True

    def __init__(self, market_code: str, lead: timedelta) -> None:
        self.market_code = market_code
        self.lead = lead
        self.description = (
            f"{format_lead(lead)} before each {market_code} session opens (exchange_calendars: holidays skipped, "
            f"DST and late opens followed); data interval = [open - {format_lead(lead)}, open)"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MarketSessionTimetable):
            return NotImplemented
        return (self.market_code, self.lead) == (other.market_code, other.lead)

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.market_code, self.lead))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(market_code={self.market_code!r}, lead={self.lead!r})"

    @property
    def summary(self) -> str:
        """Short text for the UI, e.g. '2h before XNYS open'."""
        return f"{format_lead(self.lead)} before {self.market_code} open"

    def validate(self) -> None:
        """Rejects an unknown market code or a lead outside (0, 24h) when the DAG is parsed."""
        if not isinstance(self.lead, timedelta) or not timedelta(0) < self.lead < MAX_LEAD:
            raise AirflowTimetableInvalid(
                f"{type(self).__name__}({self.market_code!r}): lead {self.lead!r} must be more than 0 and less than 24h"
            )
        from airflow.sdk import get_parsing_context

        if get_parsing_context().dag_id is not None:
            return  # a task run re-parses a DAG the dag-processor already validated: skip the calendar (~3 s)
        try:
            sessions.timezone(self.market_code)  # any schedule lookup: raises for an unknown code
        except ValueError as exc:
            raise AirflowTimetableInvalid(f"{type(self).__name__}: {exc}") from exc

    def serialize(self) -> dict[str, Any]:
        """JSON form stored by the dag-processor: market code and lead in seconds."""
        seconds = self.lead.total_seconds()
        return {"market_code": self.market_code, "lead_seconds": int(seconds) if seconds.is_integer() else seconds}

    @classmethod
    def deserialize(cls, data: dict[str, Any]) -> MarketSessionTimetable:
        """Inverse of `serialize` (used by the scheduler and API server)."""
        return cls(str(data["market_code"]), timedelta(seconds=data["lead_seconds"]))

    def _info(self, session_date: date) -> DagRunInfo:
        """The run for one session: created at open - lead, data interval [open - lead, open)."""
        opens = sessions.session_open_utc(self.market_code, session_date)
        start, end = _pendulum(opens - self.lead), _pendulum(opens)
        return DagRunInfo(run_after=start, data_interval=DataInterval(start=start, end=end))

    def _first_session_opening_after(self, moment: datetime) -> date:
        """The first session whose open is strictly after `moment`."""
        return sessions.next_run(self.market_code, timedelta(0), moment, inclusive=False)[0]

    def infer_manual_data_interval(self, *, run_after: DateTime) -> DataInterval:
        """A manual run works for the next session to open after `run_after`: [open - lead, open)."""
        info = self._info(self._first_session_opening_after(run_after))
        assert info.data_interval is not None
        return info.data_interval

    def next_dagrun_info(
        self,
        *,
        last_automated_data_interval: DataInterval | None,
        restriction: TimeRestriction,
    ) -> DagRunInfo | None:
        """The next session's run, honouring start_date (earliest), end_date (latest) and catchup."""
        candidates: list[date] = []
        if last_automated_data_interval is not None:
            # Session after the last scheduled one (its interval ends at its open), whatever lead it had.
            candidates.append(self._first_session_opening_after(last_automated_data_interval.end))
        if restriction.earliest is None:
            # No start_date: start with the next session not yet open (nothing to catch up from).
            if last_automated_data_interval is None:
                candidates.append(self._first_session_opening_after(_utcnow()))
        else:
            candidates.append(sessions.next_run(self.market_code, self.lead, restriction.earliest, inclusive=True)[0])
        if not restriction.catchup:
            # Skip sessions that already opened; a session inside its lead window still runs (immediately).
            candidates.append(self._first_session_opening_after(_utcnow()))
        info = self._info(max(candidates))
        if restriction.latest is not None and info.run_after > restriction.latest:
            return None
        return info

    def generate_run_id(
        self,
        *,
        run_type: DagRunType,
        run_after: DateTime,
        data_interval: DataInterval | None,
        **extra: Any,
    ) -> str:
        """Scheduled runs are named session__YYYY-MM-DD; other run types keep Airflow's default id."""
        if run_type == DagRunType.SCHEDULED and data_interval is not None:
            # The interval ends at the session's open, so the id does not depend on the (changeable) lead.
            session = sessions.session_for_run(self.market_code, timedelta(0), data_interval.end)
            return f"{RUN_ID_PREFIX}{session.isoformat()}"
        return super().generate_run_id(run_type=run_type, run_after=run_after, data_interval=data_interval, **extra)
