"""Prepares the local Airflow: metadata database, pools from airflow_settings.yaml, dev logins."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = ROOT / "airflow_settings.yaml"


def _airflow() -> str:
    return str(Path(sys.executable).with_name("airflow"))


def migrate_metadata() -> None:
    """Runs `airflow db migrate` once per metadata database (skipped when already done)."""
    home = Path(os.environ["AIRFLOW_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    url = os.environ.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "")
    marker = home / f".migrated-{hashlib.sha256(url.encode()).hexdigest()[:12]}"
    if marker.exists():
        return
    proc = subprocess.run([_airflow(), "db", "migrate"], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"error: `airflow db migrate` failed for the metadata database (exit {proc.returncode})")
    marker.write_text("ok\n")


def write_passwords() -> None:
    """Writes the simple auth manager's dev logins: admin / $OVERNIGHT_ADMIN_PASSWORD (default admin)."""
    path = Path(os.environ.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE",
                               Path(os.environ["AIRFLOW_HOME"]) / "passwords.json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"admin": os.environ.get("OVERNIGHT_ADMIN_PASSWORD", "admin"), "viewer": "viewer"}))


def load_pools(settings: Path = SETTINGS) -> list[str]:
    """Creates or updates the pools listed in airflow_settings.yaml; returns their names."""
    data = yaml.safe_load(settings.read_text()) or {}
    pools = (data.get("airflow") or {}).get("pools") or []
    if not pools:
        return []
    from airflow.models.pool import Pool

    names = []
    for p in pools:
        Pool.create_or_update_pool(
            name=p["pool_name"], slots=int(p["pool_slot"]), description=p.get("pool_description", ""),
            include_deferred=False,
        )
        names.append(p["pool_name"])
    return names


def main() -> int:
    """Command line: migrate the metadata database, load pools, write dev logins."""
    migrate_metadata()
    write_passwords()
    pools = load_pools()
    print(f"airflow: metadata database ready; pools: {', '.join(pools) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
