"""Airflow plugin registering MarketSessionTimetable so the scheduler can deserialize the overnight DAGs."""

from __future__ import annotations

import sys
from pathlib import Path

from airflow.plugins_manager import AirflowPlugin

INCLUDE_DIR = Path(__file__).resolve().parents[2] / "include"
if str(INCLUDE_DIR) not in sys.path:
    sys.path.insert(0, str(INCLUDE_DIR))

from overnight.night.timetable import MarketSessionTimetable  # noqa: E402 - needs include/ on sys.path first


class OvernightTimetablesPlugin(AirflowPlugin):
    """Registers the market-session timetable (serialized as overnight.night.timetable.MarketSessionTimetable)."""

    name = "overnight_timetables"
    timetables = [MarketSessionTimetable]
