"""Airflow plugin registering MarketSessionTimetable so the scheduler can deserialize the overnight DAGs."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from overnight.night.timetable import MarketSessionTimetable


class OvernightTimetablesPlugin(AirflowPlugin):
    """Registers the market-session timetable (serialized as overnight.night.timetable.MarketSessionTimetable)."""

    name = "overnight_timetables"
    timetables = [MarketSessionTimetable]
