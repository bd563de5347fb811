"""Tests for include/markets.yaml loading: valid config, and each kind of bad entry reported without hiding the rest."""

from __future__ import annotations

import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

from overnight.domain.markets import (
    DEFAULT_MARKETS_PATH,
    Market,
    MarketConfigError,
    UnknownMarketError,
    format_lead,
    get_market,
    load_markets,
    parse_lead,
)

VALID_XLON = "  - code: XLON\n    lead: 90m\n"


def write(tmp_path: Path, text: str) -> Path:
    """Writes a markets.yaml into tmp_path and returns its path."""
    path = tmp_path / "markets.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_default_file_loads_the_four_markets_with_default_lead() -> None:
    loaded = load_markets()
    assert loaded.errors == []
    assert loaded.markets == [
        Market("BVMF", timedelta(hours=2)),
        Market("XLON", timedelta(hours=2)),
        Market("XNYS", timedelta(hours=2)),
        Market("XTKS", timedelta(hours=2)),
    ]
    assert DEFAULT_MARKETS_PATH == Path(__file__).resolve().parents[3] / "include" / "markets.yaml"
    assert [m.dag_id for m in loaded.markets] == [
        "overnight_scoring_bvmf",
        "overnight_scoring_xlon",
        "overnight_scoring_xnys",
        "overnight_scoring_xtks",
    ]


def test_overnight_markets_file_names_another_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a deployment mounts its own markets file (docs/deploy.md): every process reads that one, and the shared
    # scoring pool is the default of an entry without `pool`
    other = tmp_path / "markets.yaml"
    other.write_text("markets:\n  - code: XTKS\n    lead: 90m\n  - code: XLON\n    pool: lse_pool\n")
    monkeypatch.setenv("OVERNIGHT_MARKETS_FILE", str(other))
    loaded = load_markets()
    assert loaded.errors == []
    assert loaded.markets == [Market("XLON", timedelta(hours=2), pool="lse_pool"), Market("XTKS", timedelta(minutes=90))]
    assert [m.scoring_pool for m in loaded.markets] == ["lse_pool", "overnight_scoring"]


def test_all_fields_are_read_and_markets_sorted(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        markets:
          - code: XTKS
            lead: "02:00"
            batch_size: 250
            pool: tokyo_pool
          - code: XNYS
            lead: 2:30
          - code: XLON
            lead: 1h30m
        """,
    )
    loaded = load_markets(path)
    assert loaded.errors == []
    assert loaded.markets == [
        Market("XLON", timedelta(minutes=90)),
        # unquoted 2:30 must not become the YAML 1.1 base-60 integer 150
        Market("XNYS", timedelta(hours=2, minutes=30)),
        Market("XTKS", timedelta(hours=2), batch_size=250, pool="tokyo_pool"),
    ]


BAD_ENTRIES = [
    pytest.param(
        "  - code: XNYZ\n", "XNYZ", "code", "unknown calendar code; known codes include XNYS", id="unknown-code"
    ),
    pytest.param("  - code: xnys\n", "xnys", "code", "write 'XNYS'", id="lower-case-code"),
    pytest.param("  - code: NYSE\n", "NYSE", "code", "alias; write the calendar code 'XNYS'", id="alias-code"),
    pytest.param("  - code: 24/7\n", "24/7", "code", "unknown calendar code", id="non-mic-code"),
    pytest.param("  - lead: 2h\n", None, "code", "missing", id="missing-code"),
    pytest.param("  - code: XNYS\n    lead: 25h\n", "XNYS", "lead", "less than 24h", id="lead-too-long"),
    pytest.param("  - code: XNYS\n    lead: 24h\n", "XNYS", "lead", "less than 24h", id="lead-24h"),
    pytest.param("  - code: XNYS\n    lead: 0m\n", "XNYS", "lead", "more than 0", id="lead-zero"),
    pytest.param("  - code: XNYS\n    lead: soon\n", "XNYS", "lead", "cannot parse lead 'soon'", id="lead-unparseable"),
    pytest.param("  - code: XNYS\n    lead: 120\n", "XNYS", "lead", "bare number has no unit", id="lead-bare-number"),
    pytest.param("  - code: XNYS\n    batch_size: 0\n", "XNYS", "batch_size", "integer >= 1", id="batch-zero"),
    pytest.param("  - code: XNYS\n    batch_size: ten\n", "XNYS", "batch_size", "integer >= 1", id="batch-text"),
    pytest.param("  - code: XNYS\n    batch_size: true\n", "XNYS", "batch_size", "integer >= 1", id="batch-bool"),
    pytest.param("  - code: XNYS\n    batch_size: 2.5\n", "XNYS", "batch_size", "integer >= 1", id="batch-float"),
    pytest.param("  - code: XNYS\n    pool: my pool\n", "XNYS", "pool", "Airflow pool name", id="pool-space"),
    pytest.param("  - code: XNYS\n    leed: 2h\n", "XNYS", "leed", "unknown key(s) 'leed'", id="unknown-key"),
    pytest.param("  - XNYS\n", None, None, "expected a mapping", id="non-mapping-entry"),
]


@pytest.mark.parametrize(("entry", "market", "field", "fragment"), BAD_ENTRIES)
def test_bad_entry_is_reported_and_valid_markets_still_load(
    tmp_path: Path, entry: str, market: str | None, field: str | None, fragment: str
) -> None:
    path = write(tmp_path, "markets:\n" + entry + VALID_XLON)
    loaded = load_markets(path)
    assert loaded.markets == [Market("XLON", timedelta(minutes=90))]
    assert len(loaded.errors) == 1
    error = loaded.errors[0]
    assert isinstance(error, ValueError)
    assert (error.market, error.field) == (market, field)
    assert fragment in error.message
    assert str(error).startswith("markets.yaml: ")
    if market is not None:
        assert f"market '{market}'" in str(error)
    else:
        assert "entry #1" in str(error)
    if field is not None:
        assert f"field '{field}'" in str(error)


def test_error_text_names_file_market_field_and_fix(tmp_path: Path) -> None:
    loaded = load_markets(write(tmp_path, "markets:\n  - code: XNYZ\n"))
    assert str(loaded.errors[0]).startswith(
        "markets.yaml: market 'XNYZ', field 'code': unknown calendar code; known codes include XNYS"
    )


def test_several_problems_in_one_entry_give_one_error_listing_all(tmp_path: Path) -> None:
    loaded = load_markets(write(tmp_path, "markets:\n  - code: XNYS\n    lead: 30h\n    batch_size: 0\n"))
    assert len(loaded.errors) == 1
    assert loaded.errors[0].field == "lead"
    assert "also field 'batch_size'" in loaded.errors[0].message


def test_duplicate_code_keeps_first_entry_and_reports_the_repeat(tmp_path: Path) -> None:
    path = write(tmp_path, "markets:\n  - code: XNYS\n    lead: 90m\n  - code: XNYS\n    lead: 3h\n" + VALID_XLON)
    loaded = load_markets(path)
    assert loaded.markets == [Market("XLON", timedelta(minutes=90)), Market("XNYS", timedelta(minutes=90))]
    assert len(loaded.errors) == 1
    assert (loaded.errors[0].market, loaded.errors[0].field) == ("XNYS", "code")
    assert "duplicate code: entry #2 repeats entry #1" in loaded.errors[0].message


@pytest.mark.parametrize(
    ("text", "field", "fragment"),
    [
        pytest.param("markets: [\n", None, "not valid YAML", id="not-yaml"),
        pytest.param("- code: XNYS\n", "markets", "top-level mapping", id="top-level-list"),
        pytest.param("markets: XNYS\n", "markets", "must be a list", id="markets-not-list"),
        pytest.param("", "markets", "top-level mapping", id="empty-file"),
    ],
)
def test_file_level_problems(tmp_path: Path, text: str, field: str | None, fragment: str) -> None:
    loaded = load_markets(write(tmp_path, text))
    assert loaded.markets == []
    assert len(loaded.errors) == 1
    assert (loaded.errors[0].market, loaded.errors[0].field) == (None, field)
    assert fragment in loaded.errors[0].message


def test_unknown_top_level_key_is_reported_but_markets_load(tmp_path: Path) -> None:
    loaded = load_markets(write(tmp_path, "market_defaults: {}\nmarkets:\n" + VALID_XLON))
    assert loaded.markets == [Market("XLON", timedelta(minutes=90))]
    assert [(e.field, "unknown top-level key" in e.message) for e in loaded.errors] == [("market_defaults", True)]


def test_missing_file(tmp_path: Path) -> None:
    loaded = load_markets(tmp_path / "nope.yaml")
    assert loaded.markets == []
    assert len(loaded.errors) == 1
    assert "cannot read" in loaded.errors[0].message
    assert "nope.yaml" in str(loaded.errors[0])


def test_get_market_is_case_insensitive() -> None:
    assert get_market("xnys") == Market("XNYS", timedelta(hours=2))


def test_get_market_unknown_names_configured_markets() -> None:
    with pytest.raises(UnknownMarketError, match=r"market 'XPAR' is not configured .*BVMF, XLON, XNYS, XTKS"):
        get_market("XPAR")


def test_get_market_misconfigured_raises_its_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, "markets:\n  - code: XNYS\n    lead: 30h\n" + VALID_XLON)
    with pytest.raises(MarketConfigError, match="market 'XNYS', field 'lead'"):
        get_market("XNYS", path)
    assert get_market("XLON", path).lead == timedelta(minutes=90)


def test_get_market_with_broken_file_raises_the_file_error(tmp_path: Path) -> None:
    with pytest.raises(MarketConfigError, match="cannot read"):
        get_market("XNYS", tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("2h", timedelta(hours=2), id="hours"),
        pytest.param("90m", timedelta(minutes=90), id="minutes"),
        pytest.param("1h30m", timedelta(minutes=90), id="hours-minutes"),
        pytest.param("1h 15m", timedelta(minutes=75), id="hours-space-minutes"),
        pytest.param("02:00", timedelta(hours=2), id="clock"),
        pytest.param("0:45", timedelta(minutes=45), id="clock-short"),
        pytest.param("23h59m", timedelta(hours=23, minutes=59), id="just-under-a-day"),
        pytest.param(timedelta(minutes=5), timedelta(minutes=5), id="timedelta"),
    ],
)
def test_parse_lead(text: object, expected: timedelta) -> None:
    assert parse_lead(text) == expected


@pytest.mark.parametrize(
    ("lead", "text"),
    [
        pytest.param(timedelta(hours=2), "2h", id="hours"),
        pytest.param(timedelta(minutes=90), "90m", id="minutes"),
        pytest.param(timedelta(seconds=90), "90s", id="seconds"),
    ],
)
def test_format_lead(lead: timedelta, text: str) -> None:
    assert format_lead(lead) == text
