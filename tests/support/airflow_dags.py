"""Airflow test helpers that need no running component."""

from __future__ import annotations


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
