"""`make airflow` / `make stop`: the Airflow components as background processes with pid files.

The api-server listens on 127.0.0.1 unless `OVERNIGHT_API_HOST` says otherwise; the scheduler and the
triggerer start no log server (`--skip-serve-logs`: Airflow's listens on all interfaces), nothing else
listens. The components' logs and files are the owner's only (umask 077). `start` records a
fingerprint (a SHA-256, no secret in clear) of the settings the components were started with: the
connections, Airflow's `AIRFLOW__*` settings, `OVERNIGHT_*` variables and the dev logins' passwords. Run
again with other settings, it restarts the components it started, instead of keeping the old ones
pointed at the old databases.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
RUN_DIR = ROOT / ".local" / "run"
FINGERPRINT = "settings.sha256"
SKIP_SERVE_LOGS = "--skip-serve-logs"


def run_dir() -> Path:
    """Where the pid files, logs and settings fingerprint live: `OVERNIGHT_RUN_DIR`, default `.local/run`."""
    return Path(os.environ.get("OVERNIGHT_RUN_DIR", "").strip() or RUN_DIR)
_NOT_SETTINGS = ("OVERNIGHT_TEST_",)  # variables that do not change what the components do


def components() -> dict[str, list[str]]:
    """The components and their `airflow` arguments."""
    from overnight.dev.devenv import api_host

    every = {
        "api-server": ["api-server", "--host", api_host(), "--port", os.environ.get("OVERNIGHT_API_PORT", "8080")],
        # --skip-serve-logs: their log servers (`airflow serve-logs`) would listen on every interface
        # (0.0.0.0:8793, 8794; Airflow has no setting for the address); on one host the api-server reads the
        # task logs from the files (docs/operations.md)
        "scheduler": ["scheduler", SKIP_SERVE_LOGS],
        "dag-processor": ["dag-processor"],
        "triggerer": ["triggerer", SKIP_SERVE_LOGS],
    }
    wanted = [c.strip() for c in os.environ.get("OVERNIGHT_COMPONENTS", "").split(",") if c.strip()]
    unknown = sorted(set(wanted) - set(every))
    if unknown:
        raise SystemExit(f"OVERNIGHT_COMPONENTS: unknown component(s) {', '.join(unknown)}; "
                         f"known: {', '.join(every)}")
    return {name: args for name, args in every.items() if not wanted or name in wanted}


def settings_fingerprint(environ: dict[str, str] | None = None) -> str:
    """A SHA-256 of what the components run with: `AIRFLOW_*` and `OVERNIGHT_*` variables, the passwords file."""
    env = os.environ if environ is None else environ
    chosen = {k: v for k, v in env.items()
              if k.startswith(("AIRFLOW_", "OVERNIGHT_")) and not k.startswith(_NOT_SETTINGS)}
    passwords = env.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE")
    if passwords and Path(passwords).is_file():
        chosen["(passwords file)"] = Path(passwords).read_text()
    chosen["(components)"] = json.dumps(components(), sort_keys=True)
    return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _running() -> dict[str, int]:
    found = {}
    for pidfile in sorted(run_dir().glob("*.pid")) if run_dir().exists() else []:
        try:
            pid = int(pidfile.read_text())
        except ValueError:
            continue
        if _alive(pid):
            found[pidfile.stem] = pid
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def start() -> int:
    """Starts every component not already running (restarting them all when the settings changed); waits for
    the api-server to answer."""
    from overnight.dev.devenv import private_umask, write_private

    runs = run_dir()
    runs.mkdir(parents=True, exist_ok=True)
    fingerprint = settings_fingerprint()
    previous = (runs / FINGERPRINT).read_text().strip() if (runs / FINGERPRINT).exists() else None
    if _running() and previous != fingerprint:
        print("settings changed since the components started (connections, password or Airflow settings): "
              "restarting them")
        stop()
    write_private(runs / FINGERPRINT, fingerprint + "\n")
    airflow = str(Path(sys.executable).with_name("airflow"))
    private_umask()  # the components' logs and files: the owner's only
    for name, args in components().items():
        pidfile = runs / f"{name}.pid"
        if pidfile.exists() and _alive(int(pidfile.read_text())):
            print(f"{name}: already running (pid {pidfile.read_text().strip()})")
            continue
        log = open(runs / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
        proc = subprocess.Popen([airflow, *args], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        pidfile.write_text(str(proc.pid))
        print(f"{name}: started (pid {proc.pid}, log {_shown(pidfile.with_suffix('.log'))})")
    api = components().get("api-server")
    if api is None:
        return 0
    host, port = api[2], api[4]
    probe = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    passwords = os.environ.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE", "the passwords file")
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://{probe}:{port}/api/v2/monitor/health", timeout=2)
            print(f"Airflow UI: http://{probe}:{port}  (listening on {host}; set OVERNIGHT_API_HOST to change)")
            print(f"  logins admin, viewer, overnight_app: passwords in {passwords} (0600); "
                  "who may read what: docs/access.md")
            print(f"Overnight page: http://{probe}:{port}/overnight/   stop with: make stop")
            return 0
        except OSError:
            time.sleep(1)
    print(f"api-server did not answer on {probe}:{port} within 120 s; see {_shown(runs / 'api-server.log')}",
          file=sys.stderr)
    return 1


def stop() -> int:
    """Stops the components started by `start` (their whole process groups)."""
    for pidfile in sorted(run_dir().glob("*.pid")) if run_dir().exists() else []:
        pid = int(pidfile.read_text())
        if _alive(pid):
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            for _ in range(50):
                if not _alive(pid):
                    break
                time.sleep(0.2)
            else:
                os.killpg(pid, signal.SIGKILL)
            print(f"{pidfile.stem}: stopped")
        pidfile.unlink()
    (run_dir() / FINGERPRINT).unlink(missing_ok=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line: start | stop."""
    parser = argparse.ArgumentParser(prog="python -m overnight.dev.services")
    parser.add_argument("action", choices=["start", "stop"])
    return start() if parser.parse_args(argv).action == "start" else stop()


if __name__ == "__main__":
    sys.exit(main())
