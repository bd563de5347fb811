"""Prepares the local Airflow: metadata database, pools from airflow_settings.yaml, dev logins."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import yaml

from overnight.dev.devenv import make_private, private_umask, write_private

ROOT = Path(__file__).resolve().parents[3]
SETTINGS = ROOT / "airflow_settings.yaml"


def _airflow() -> str:
    return str(Path(sys.executable).with_name("airflow"))


def migrated_marker() -> Path:
    """The file saying the metadata database of `AIRFLOW__DATABASE__SQL_ALCHEMY_CONN` is migrated (one per URL)."""
    home = Path(os.environ["AIRFLOW_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    url = os.environ.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "")
    return home / f".migrated-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


def migrate_metadata() -> None:
    """Runs `airflow db migrate` once per metadata database (skipped when already done)."""
    marker = migrated_marker()
    if marker.exists():
        return
    proc = subprocess.run([_airflow(), "db", "migrate"], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"error: `airflow db migrate` failed for the metadata database (exit {proc.returncode})")
    write_private(marker, "ok\n")


def dev_logins() -> list[str]:
    """The simple auth manager's logins (`[core] simple_auth_manager_users`, `name:role,...`)."""
    raw = os.environ.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "admin:admin")
    return [entry.split(":", 1)[0].strip() for entry in raw.split(",") if entry.split(":", 1)[0].strip()]


def passwords_file() -> Path:
    """Where the simple auth manager keeps the dev logins' passwords."""
    return Path(os.environ.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE",
                               Path(os.environ["AIRFLOW_HOME"]) / "passwords.json"))


def write_passwords(*, announce: bool = True) -> dict[str, str]:
    """Writes the simple auth manager's dev logins (0600): a random password per login and checkout, made once
    and kept; `admin`'s is `$OVERNIGHT_ADMIN_PASSWORD` when set. New passwords are printed once, here."""
    path = passwords_file()
    try:
        current = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        current = {}
    current = current if isinstance(current, dict) else {}
    passwords: dict[str, str] = {}
    made: list[str] = []
    for login in dev_logins():
        value = current.get(login)
        if not isinstance(value, str) or not value or value == login:  # none yet, or the old `admin`/`admin`
            value = secrets.token_urlsafe(12)
            made.append(login)
        passwords[login] = value
    if chosen := os.environ.get("OVERNIGHT_ADMIN_PASSWORD"):
        passwords["admin"] = chosen
        made = [m for m in made if m != "admin"]
    if passwords != current or path.exists() and path.stat().st_mode & 0o077:
        write_private(path, json.dumps(passwords))
    if made and announce:
        shown = ", ".join(f"{login} / {passwords[login]}" for login in made)
        print(f"airflow: new dev logins (shown once; kept in {path}, mode 0600): {shown}")
    return passwords


def protect_airflow_files() -> None:
    """Airflow writes `airflow.cfg` (with its generated secret keys) world-readable: make it the owner's only."""
    make_private(Path(os.environ["AIRFLOW_HOME"]) / "airflow.cfg")


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
    private_umask()  # Airflow's logs and files under .local: the owner's only
    migrate_metadata()
    write_passwords()
    protect_airflow_files()
    pools = load_pools()
    print(f"airflow: metadata database ready; pools: {', '.join(pools) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
