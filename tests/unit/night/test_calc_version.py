"""calcVersion: the package's version (as pyproject.toml says) plus the scoring and allocation rule versions."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from overnight import __version__
from overnight.domain.recommendations import ALLOCATION_POLICY
from overnight.domain.scoring import SCORING_VERSION
from overnight.night import jobrun, replay

ROOT = Path(__file__).resolve().parents[3]


def test_calc_version_names_the_package_both_rule_versions_and_the_minor_units_table() -> None:
    project = tomllib.loads((ROOT / "include" / "pyproject.toml").read_text())["project"]
    pinned = next(line.split("==")[1].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
                  if line.startswith("iso4217=="))  # the minor units' list, as the image installs it
    assert __version__ == project["version"]
    # the rule versions as docs/audit.md (its example) and docs/allocation.md state them: a bump changes the test too
    assert (SCORING_VERSION, ALLOCATION_POLICY) == (1, 3)
    assert jobrun.CALC_VERSION == f"{project['version']}+scoring.1.allocation.3.iso{pinned.rsplit('.', 1)[1]}"


@pytest.mark.parametrize(
    ("stored", "replayed", "expected"),
    [
        pytest.param({"a": "1"}, {"a": "1"}, [], id="same"),
        pytest.param({"a": "1"}, {"a": "2"}, ['a: stored "1", replayed "2"'], id="value"),
        pytest.param({"r": [{"amount": "100.00"}, {"amount": "5"}]}, {"r": [{"amount": "99.99"}, {"amount": "5"}]},
                     ['r[0].amount: stored "100.00", replayed "99.99"'], id="list-item-field"),
        pytest.param({"a": 1}, {"a": 1, "b": None}, ["b: stored (absent), replayed null"], id="added"),
        pytest.param({"a": [1, 2]}, {"a": [1]}, ["a[1]: stored 2, replayed (absent)"], id="shorter-list"),
        pytest.param({"a": 1}, {"a": 1.0}, ["a: stored 1, replayed 1.0"], id="int-vs-float"),
    ],
)
def test_diff_names_each_field(stored: object, replayed: object, expected: list[str]) -> None:
    assert replay.diff(stored, replayed) == expected
