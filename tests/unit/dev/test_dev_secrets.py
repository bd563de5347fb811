"""The dev set-up's secrets and address: random logins kept 0600, env.sh 0600, 127.0.0.1 unless told otherwise,
and a settings fingerprint that changes with the connections and passwords (so `make airflow` restarts)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from overnight.dev import airflow_setup, devenv, services


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE", str(tmp_path / "passwords.json"))
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", devenv.DEV_USERS)
    monkeypatch.delenv("OVERNIGHT_ADMIN_PASSWORD", raising=False)
    return tmp_path


def test_dev_passwords_are_random_kept_private_and_shown_once(home: Path, capsys: pytest.CaptureFixture[str]
                                                              ) -> None:
    first = airflow_setup.write_passwords()
    shown = capsys.readouterr().out
    assert set(first) == {"admin", "viewer", "overnight_app"}
    assert all(len(pw) >= 16 and pw != login for login, pw in first.items())
    assert all(f"{login} / {pw}" in shown for login, pw in first.items())
    assert _mode(home / "passwords.json") == 0o600
    assert json.loads((home / "passwords.json").read_text()) == first
    assert airflow_setup.write_passwords() == first  # kept per checkout
    assert capsys.readouterr().out == ""  # and not shown again


def test_another_checkout_gets_other_passwords(home: Path, tmp_path_factory: pytest.TempPathFactory,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    first = airflow_setup.write_passwords(announce=False)
    elsewhere = tmp_path_factory.mktemp("checkout2")
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE", str(elsewhere / "passwords.json"))
    second = airflow_setup.write_passwords(announce=False)
    assert all(first[login] != second[login] for login in first)


def test_the_old_defaults_are_replaced_and_a_chosen_admin_password_wins(home: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = home / "passwords.json"
    path.write_text(json.dumps({"admin": "admin", "viewer": "viewer"}))
    path.chmod(0o644)
    fixed = airflow_setup.write_passwords(announce=False)
    assert fixed["admin"] != "admin" and fixed["viewer"] != "viewer" and _mode(path) == 0o600
    monkeypatch.setenv("OVERNIGHT_ADMIN_PASSWORD", "chosen-by-the-operator")
    chosen = airflow_setup.write_passwords(announce=False)
    assert chosen["admin"] == "chosen-by-the-operator" and chosen["viewer"] == fixed["viewer"]


def test_env_file_and_generated_airflow_cfg_are_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devenv, "ENV_FILE", tmp_path / "env.sh")
    path = devenv.write_env_file({"AIRFLOW__API_AUTH__JWT_SECRET": "s3cret", "X": "a b"})
    assert _mode(path) == 0o600 and "export X='a b'" in path.read_text()
    cfg = tmp_path / "airflow.cfg"
    cfg.write_text("[core]\nfernet_key = k\n")
    cfg.chmod(0o644)
    devenv.make_private(cfg)
    assert _mode(cfg) == 0o600


def test_the_api_server_listens_on_loopback_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OVERNIGHT_API_HOST", raising=False)
    monkeypatch.delenv("OVERNIGHT_COMPONENTS", raising=False)
    assert services.components()["api-server"][:3] == ["api-server", "--host", "127.0.0.1"]
    assert set(services.components()) == {"api-server", "scheduler", "dag-processor", "triggerer"}
    monkeypatch.setenv("OVERNIGHT_API_HOST", "0.0.0.0")
    assert services.components()["api-server"][2] == "0.0.0.0"
    monkeypatch.setenv("OVERNIGHT_COMPONENTS", "api-server,bogus")
    with pytest.raises(SystemExit, match="unknown component.*bogus"):
        services.components()


def test_the_settings_fingerprint_follows_connections_and_passwords(tmp_path: Path) -> None:
    passwords = tmp_path / "passwords.json"
    passwords.write_text('{"admin": "one"}')
    env = {"AIRFLOW_CONN_OVERNIGHT_POSTGRES": "postgresql://u@h/db1", "PATH": "/bin",
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords)}
    base = services.settings_fingerprint(env)
    assert services.settings_fingerprint({**env, "PATH": "/usr/bin", "OVERNIGHT_TEST_RUN_ID": "x"}) == base
    assert services.settings_fingerprint({**env, "AIRFLOW_CONN_OVERNIGHT_POSTGRES": "postgresql://u@h/db2"}) != base
    passwords.write_text('{"admin": "two"}')
    assert services.settings_fingerprint(env) != base
    assert "one" not in base and len(base) == 64


def test_no_component_starts_airflows_log_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """`airflow serve-logs` listens on every interface (no setting for the address): `make airflow` and the
    benchmark start the scheduler, the triggerer and Celery workers without it."""
    from datetime import date

    from overnight.dev import bench

    monkeypatch.delenv("OVERNIGHT_COMPONENTS", raising=False)
    started = services.components()
    assert "--skip-serve-logs" in started["scheduler"] and "--skip-serve-logs" in started["triggerer"]
    for executor in ("local", "celery"):
        commands = bench.Bench(10, executor, 10, 1, date(2026, 11, 25)).commands()
        serving = [name for name, args in commands.items()
                   if args[0] in ("scheduler", "triggerer", "celery") and "--skip-serve-logs" not in args]
        assert not serving and "scheduler" in commands, commands


_UNDER_UMASK_022 = """
import os, sys
from pathlib import Path
os.umask(0o022)  # the usual shell's
out = Path(sys.argv[2])
if sys.argv[1] == "cli":
    from overnight.dev import cli

    def fake_run(screen, log_path, code, session, **kwargs):
        print("airflow and task output")
        (out / "task.log").write_text("a task's log")  # as Airflow writes a task log: under the process's umask
        raise RuntimeError("stop here")

    cli.run_with_progress = fake_run
    code = cli.main(["run", "--market", "XNYS"])
else:
    from overnight.dev import bench

    class FakeBench:
        def __init__(self, *args, **kwargs):
            pass

        def prepare(self):
            (out / "logs-components").mkdir()
            (out / "logs-components" / "scheduler.log").write_text("a component's log")
            raise SystemExit(3)

        def stop(self, keep):
            pass

    bench.Bench = FakeBench
    try:
        bench.main(["--users", "1"])
    except SystemExit as exc:
        code = exc.code
print("exit", code)
"""


@pytest.mark.parametrize("command", ["cli", "bench"])
def test_the_cli_and_the_benchmark_write_private_files_under_a_shared_umask(command: str, tmp_path: Path) -> None:
    """Started from a shell with umask 022, `make run`/`make demo` (the log tee, the task logs) and `make bench` (its
    component and task logs) still write files of their owner's only."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": str(root / "include"), "OVERNIGHT_CLI_LOG": str(tmp_path / "cli.log")}
    proc = subprocess.run([sys.executable, "-c", _UNDER_UMASK_022, command, str(tmp_path)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert "exit" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) >= (2 if command == "cli" else 1), files
    assert {str(p.relative_to(tmp_path)): oct(_mode(p)) for p in files} == \
        {str(p.relative_to(tmp_path)): "0o600" for p in files}
    if command == "cli":
        assert "airflow and task output" in (tmp_path / "cli.log").read_text()
