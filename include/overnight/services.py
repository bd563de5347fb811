"""`make airflow` / `make stop`: the Airflow components as background processes with pid files."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUN_DIR = ROOT / ".local" / "run"
COMPONENTS = {
    "api-server": ["api-server", "--port", os.environ.get("OVERNIGHT_API_PORT", "8080")],
    "scheduler": ["scheduler"],
    "dag-processor": ["dag-processor"],
    "triggerer": ["triggerer"],
}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def start() -> int:
    """Starts every component not already running; waits for the api-server to answer."""
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    airflow = str(Path(sys.executable).with_name("airflow"))
    for name, args in COMPONENTS.items():
        pidfile = RUN_DIR / f"{name}.pid"
        if pidfile.exists() and _alive(int(pidfile.read_text())):
            print(f"{name}: already running (pid {pidfile.read_text().strip()})")
            continue
        log = open(RUN_DIR / f"{name}.log", "ab")
        proc = subprocess.Popen([airflow, *args], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        pidfile.write_text(str(proc.pid))
        print(f"{name}: started (pid {proc.pid}, log {pidfile.with_suffix('.log').relative_to(ROOT)})")
    port = COMPONENTS["api-server"][2]
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/monitor/health", timeout=2)
            print(f"Airflow UI: http://localhost:{port}  (login admin / $OVERNIGHT_ADMIN_PASSWORD, default admin)")
            print(f"Overnight page: http://localhost:{port}/overnight/   stop with: make stop")
            return 0
        except OSError:
            time.sleep(1)
    print(f"api-server did not answer on :{port} within 120 s; see .local/run/api-server.log", file=sys.stderr)
    return 1


def stop() -> int:
    """Stops the components started by `start` (their whole process groups)."""
    for pidfile in sorted(RUN_DIR.glob("*.pid")) if RUN_DIR.exists() else []:
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
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line: start | stop."""
    parser = argparse.ArgumentParser(prog="python -m overnight.services")
    parser.add_argument("action", choices=["start", "stop"])
    return start() if parser.parse_args(argv).action == "start" else stop()


if __name__ == "__main__":
    sys.exit(main())
