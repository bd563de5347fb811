"""The Airflow settings the package runs with: the same in the image and in make run/bench, and read by Airflow."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from overnight.dev import devenv

ROOT = Path(__file__).resolve().parents[3]


def test_the_image_and_the_dev_environment_carry_the_same_settings() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    in_image = dict(re.findall(r"^ENV (AIRFLOW__\w+)=(\S+)$", dockerfile, re.MULTILINE))
    assert in_image == devenv.AIRFLOW_SETTINGS != {}


def test_the_task_supervisor_reads_them() -> None:
    """Through the names as written (a misspelt section or key is silently ignored by Airflow): the supervisor's
    own constant, the wait between heartbeats, is the setting's value, not Airflow's default of 5."""
    code = ("import json; from airflow.sdk.execution_time import supervisor as s; "
            "print(json.dumps({'AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL': str(s.MIN_HEARTBEAT_INTERVAL)}))")
    out = subprocess.run([sys.executable, "-c", code], env={**_base_env(), **devenv.AIRFLOW_SETTINGS},
                         capture_output=True, text=True, check=True, timeout=120).stdout
    assert json.loads(out.strip().splitlines()[-1]) == devenv.AIRFLOW_SETTINGS
    default = subprocess.run([sys.executable, "-c", code], env=_base_env(), capture_output=True, text=True,
                             check=True, timeout=120).stdout
    assert json.loads(default.strip().splitlines()[-1]) != devenv.AIRFLOW_SETTINGS  # the setting changes it


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in devenv.AIRFLOW_SETTINGS}
