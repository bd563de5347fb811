"""The import rules of pyproject.toml's [tool.importlinter] hold, and they would catch a break.

The domain imports no adapter, service or Airflow; adapters import nothing of the night or of the
dashboard; production code never imports the developer tooling (`make lint` runs the same check).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint_imports(include: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(include)}
    return subprocess.run([str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


def test_the_package_keeps_its_import_rules() -> None:
    proc = _lint_imports(ROOT / "include")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "3 kept, 0 broken" in proc.stdout


def test_a_domain_module_that_reaches_for_the_database_breaks_a_rule(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "include" / "overnight", tmp_path / "overnight",
                    ignore=shutil.ignore_patterns("__pycache__"))
    scoring = tmp_path / "overnight" / "scoring.py"
    scoring.write_text(scoring.read_text() + "\nfrom overnight import db  # noqa: E402\n")
    proc = _lint_imports(tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 kept, 1 broken" in proc.stdout
    assert "overnight.scoring -> overnight.db" in proc.stdout


def test_the_production_image_leaves_out_exactly_the_tooling_production_may_not_import() -> None:
    """.dockerignore drops from the image the modules the last import rule forbids to production code."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    (tooling_rule,) = [c for c in contracts if "developer tooling" in c["name"]]
    tooling = {m.removeprefix("overnight.") for m in tooling_rule["forbidden_modules"]}
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    left_out = {p.removeprefix("include/overnight/").removesuffix(".py") for p in ignored
                if p.startswith("include/overnight/")}
    assert left_out == tooling
    assert all((ROOT / "include" / "overnight" / f"{m}.py").is_file() for m in tooling)
