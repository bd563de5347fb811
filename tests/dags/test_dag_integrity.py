"""Every DAG file imports; every DAG has approved tags, docs, safe defaults and retries."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
APPROVED_TAGS = {"overnight", "scoring", "operations", "cache", "audit"}


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(ROOT / "dags"))


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}


def test_one_dag_per_market(dagbag):
    from overnight.domain.markets import load_markets

    expected = {m.dag_id for m in load_markets().markets}
    assert expected == {"overnight_scoring_xnys", "overnight_scoring_bvmf", "overnight_scoring_xlon",
                        "overnight_scoring_xtks"}
    assert expected <= set(dagbag.dag_ids)


def test_dags_are_documented_tagged_and_retry(dagbag):
    assert dagbag.dags
    for dag_id, dag in dagbag.dags.items():
        assert dag.doc_md and len(dag.doc_md) > 200, dag_id
        assert dag.tags and set(dag.tags) <= APPROVED_TAGS, (dag_id, dag.tags)
        assert dag.catchup is False, dag_id
        for task in dag.tasks:
            assert task.retries >= 2, (dag_id, task.task_id, task.retries)


def test_market_dags_serialise_round_trip(dagbag):
    from airflow.serialization.serialized_objects import DagSerialization

    for dag_id in (d for d in dagbag.dag_ids if d.startswith("overnight_scoring_")):
        dag = dagbag.dags[dag_id]
        data = DagSerialization.to_dict(dag)
        back = DagSerialization.from_dict(data)
        assert back.timetable.summary == dag.timetable.summary
        assert back.timetable.serialize() == dag.timetable.serialize()
        assert set(back.params.keys()) == {"session_date", "user_ids", "batch_size", "contribution", "force",
                                           "recalculate"}


def test_bad_market_entry_is_an_import_error_naming_it(tmp_path, monkeypatch):
    import runpy

    from overnight.domain import markets

    bad = tmp_path / "markets.yaml"
    bad.write_text("markets:\n  - code: XNYS\n  - code: XNYZ\n  - code: XLON\n    lead: -1h\n")
    original = markets.load_markets
    monkeypatch.setattr(markets, "load_markets", lambda path=None: original(bad))
    with pytest.raises(ValueError) as err:
        runpy.run_path(str(ROOT / "dags" / "overnight_market_errors.py"))
    text = str(err.value)
    assert "XNYZ" in text and "XLON" in text and "lead" in text
    # the valid market still gets its DAG
    loaded = markets.load_markets()
    assert [m.code for m in loaded.markets] == ["XNYS"]
