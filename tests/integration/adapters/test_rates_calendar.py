"""Every Monday and every ECB holiday of 2026, each of the four markets' runs fetches rates over HTTP from the
local Frankfurter serving the ECB's real pattern (the last publication before the session, from the hand-written
closing days) and gets `ratesStale` right: false with those rates, true with the publication before them."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from overnight.adapters.providers.http_rates import HttpRatesProvider
from overnight.domain import sessions
from overnight.domain.markets import get_market
from overnight.night import jobrun, loading, runtime
from tests.unit.domain.test_freshness import AFTER_HOLIDAYS_2026, HOLIDAYS_2026, MONDAYS_2026, _last_publication_before

MARKETS = ("BVMF", "XLON", "XNYS", "XTKS")
CURRENCIES = ["BRL", "GBP", "JPY", "USD"]
LATER = datetime(2027, 6, 1, tzinfo=UTC)  # the runs are replayed later: judged at their scheduled time


def _job(code: str, session: date) -> jobrun.JobRun:
    return jobrun.JobRun("00000000-0000-0000-0000-000000000000", "00000000-0000-0000-0000-000000000001", code,
                           session.isoformat(), LATER.isoformat())


@pytest.mark.parametrize("days", [pytest.param(MONDAYS_2026, id="every-monday-2026"),
                                  pytest.param(HOLIDAYS_2026 | AFTER_HOLIDAYS_2026, id="ecb-holidays-2026")])
def test_rates_stale_on_the_real_calendars(conn, seeded, fake_provider, days: set[date]) -> None:
    provider = HttpRatesProvider(fake_provider.base_url, max_attempts=1, timeout_s=2, sleep=lambda s: None)
    wrong, runs, stored = [], 0, set()
    try:
        _replay(conn, provider, fake_provider, days, wrong, stored)
    finally:  # the rates these replays kept are the fake's, dated in 2026: other tests must not read them
        conn.rollback()
        conn.execute("DELETE FROM exchange_rates WHERE source = 'frankfurter' AND as_of = ANY(%s)", (sorted(stored),))
        conn.commit()
    runs = sum(1 for code in MARKETS for s in sessions.sessions_between(code, date(2026, 1, 1), date(2026, 12, 31))
               if s in days)
    assert runs > len(days) and wrong == []


def _replay(conn, provider, fake_provider, days: set[date], wrong: list, stored: set[datetime]) -> None:
    for code in MARKETS:
        lead = get_market(code).lead
        for session in sessions.sessions_between(code, date(2026, 1, 1), date(2026, 12, 31)):
            if session not in days:
                continue
            moment = runtime.reference_moment(_job(code, session), now=LATER)
            assert moment == sessions.run_time(code, lead, session)
            newest = _last_publication_before(session)
            for served, stale in ((newest, False), (_last_publication_before(newest), True)):
                fake_provider.rates_date = served.isoformat()
                snap = loading.fetch_rates(conn, provider, CURRENCIES, now=moment)
                stored.add(snap.as_of)
                if snap.stale is not stale or snap.unavailable or snap.as_of.date() != served:
                    wrong.append((code, session.isoformat(), served.isoformat(), snap.stale, snap.unavailable))


def test_a_run_started_before_its_scheduled_time_is_judged_now() -> None:
    session = date(2026, 11, 23)
    early = sessions.run_time("XNYS", get_market("XNYS").lead, session) - timedelta(hours=20)
    assert runtime.reference_moment(_job("XNYS", session), now=early) == early
