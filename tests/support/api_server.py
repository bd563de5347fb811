"""A real `airflow api-server` for the end-to-end tests, and the auth settings they run it with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.support import reliability as R
from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
AUTH_MANAGER = "overnight.dashboard.auth_manager.OvernightSimpleAuthManager"  # what `make airflow` runs (docs/access.md)
SERVICE = "overnight_app"  # the app team's backend: holds "Overnight recommendations"


def auth_env(tmp: Path, jwt_secret: str, *, extra_users: dict[str, str] | None = None,
             auth_manager: str = AUTH_MANAGER) -> tuple[dict[str, str], dict[str, str]]:
    """The environment of an api-server with the dev logins (admin, viewer, overnight_app, norole, and
    `extra_users` name -> role), random passwords in a 0600 file under `tmp`; returns (env, passwords)."""
    import secrets

    users = {"admin": "admin", "viewer": "viewer", SERVICE: "viewer", "norole": "", **(extra_users or {})}
    passwords = {name: secrets.token_urlsafe(12) for name in users}
    path = tmp / "passwords.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(passwords))
    env = {
        **os.environ,
        "AIRFLOW__CORE__AUTH_MANAGER": auth_manager,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{n}:{r}" for n, r in users.items()),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(path),
        "AIRFLOW__API_AUTH__JWT_SECRET": jwt_secret,
        "AIRFLOW__API_AUTH__JWT_LEEWAY": "0",  # expiry exactly at `exp` (the auth-cache tests rely on it)
        "AIRFLOW__CORE__LAZY_LOAD_PLUGINS": "False",
        # include/ for the plugin and the auth manager, the repository for tests.support's auth managers
        "PYTHONPATH": os.pathsep.join([str(ROOT / "include"), str(ROOT), os.environ.get("PYTHONPATH", "")]
                                      ).rstrip(os.pathsep),
        "NO_PROXY": "*",
    }
    return env, passwords


def token(url: str, username: str, password: str) -> str:
    """A JWT from the simple auth manager's `POST /auth/token`."""
    resp = httpx.post(f"{url}/auth/token", json={"username": username, "password": password}, trust_env=False)
    assert resp.status_code == 201, f"token for {username}: {resp.status_code} {resp.text}"
    return str(resp.json()["access_token"])


class ApiServer:
    """An `airflow api-server` subprocess (its own process group) on a free port of 127.0.0.1."""

    def __init__(self, name: str, env: dict[str, str], logdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = logdir / f"api-server-{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("airflow")), "api-server", "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, cwd=str(ROOT),
        )

    def wait_healthy(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if httpx.get(f"{self.url}/api/v2/monitor/health", timeout=2, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"api-server did not become healthy; last log lines:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    def stop(self) -> None:
        R.stop_group(self.proc)
        self._log.close()
