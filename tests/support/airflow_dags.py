"""Airflow test helpers that need no running component."""

from __future__ import annotations

from typing import Any

import pytest


def sync_dags_folder() -> None:
    """Parses the dags folder and writes it to the metadata DB, as the dag-processor does."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import BundleDagBag, sync_bag_to_db
    from airflow.utils.session import create_session

    manager = DagBundlesManager()
    with create_session() as session:
        manager.sync_bundles_to_db(session=session)
    bundle = manager.get_bundle("dags-folder")
    bundle.initialize()
    bag = BundleDagBag(dag_folder=bundle.path, bundle_path=bundle.path, bundle_name=bundle.name)
    assert bag.import_errors == {}
    sync_bag_to_db(bag, bundle.name, bundle.version)


def refusal(dag: Any, conf: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """Runs `dag.test(run_conf=conf)` for a run its parameters must refuse; returns where it was refused and the
    exact message: ("schema", the first line of the params' ParamValidationError, the rest being jsonschema's
    dump of the schema) before a DAG run exists, or ("start", the
    ParamError `runtime.validate_params` raised in the `start` task), after asserting that `start` failed, the
    tasks after it were never run (upstream_failed) and `finalize` (trigger rule all_done) failed the run for want of
    a job run."""
    from airflow.sdk.exceptions import ParamValidationError

    from overnight.night import runtime

    refused: list[str] = []
    real = runtime.validate_params

    def spy(*args: Any, **kwargs: Any) -> Any:
        try:
            return real(*args, **kwargs)
        except runtime.ParamError as exc:
            refused.append(str(exc))
            raise

    monkeypatch.setattr(runtime, "validate_params", spy)
    try:
        dag_run = dag.test(run_conf=conf)
    except ParamValidationError as exc:
        assert refused == []
        return "schema", str(exc).splitlines()[0]
    assert str(dag_run.state).split(".")[-1].lower() == "failed", dag_run.state
    states = {ti.task_id: str(ti.state).split(".")[-1].lower() for ti in dag_run.get_task_instances()}
    assert states.pop("start") == "failed", states
    assert states.pop("finalize") == "failed", states
    assert states == {"fetch_rates": "upstream_failed", "plan_batches": "upstream_failed",
                      "score_batch": "upstream_failed"}, states
    assert len(refused) == 1, refused
    return "start", refused[0]
