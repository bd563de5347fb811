"""Fail closed under Airflow's stock SimpleAuthManager (the official image's default): it says yes to every custom
view for every role from VIEWER up, so the dashboard does not ask it about investors' data; ADMIN and the service
logins only, and one warning naming the setting to change (docs/access.md)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager
from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

from overnight.dashboard import api_auth, auth_manager
from overnight.dashboard.auth_manager import OvernightSimpleAuthManager

USERS = {  # login -> role
    "admin": "admin", "viewer": "viewer", "user": "user", "op": "op", "overnight_app": "viewer", "norole": None,
}
GRANTED = {"admin", "overnight_app"}


class KeepsTheStockAnswer(SimpleAuthManager):
    """A subclass that changes something else: its custom views are still the stock blanket yes."""

    def is_authorized_dag(self, **kwargs: Any) -> bool:
        return bool(super().is_authorized_dag(**kwargs))


class AnswersItself(SimpleAuthManager):
    """A manager with its own answer (as FAB, Keycloak): asked, and its answer stands."""

    def is_authorized_custom_view(self, *, method: Any, resource_name: str, user: Any) -> bool:
        return user.username == "viewer"


@pytest.fixture
def warnings(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    said: list[str] = []
    monkeypatch.setattr(auth_manager, "_warned", threading.Lock())  # a fresh process
    monkeypatch.setattr(auth_manager.log, "warning", lambda msg, *args: said.append(msg % args if args else msg))
    monkeypatch.delenv("AIRFLOW__OVERNIGHT__PERSONAL_DATA_LOGINS", raising=False)
    return said


def _grants(monkeypatch: pytest.MonkeyPatch, manager: Any) -> dict[str, api_auth.Access]:
    import airflow.api_fastapi.app as airflow_app

    monkeypatch.setattr(airflow_app, "get_auth_manager", lambda: manager)
    return {name: api_auth.airflow_grants(SimpleAuthManagerUser(username=name, role=role))
            for name, role in USERS.items()}


@pytest.mark.parametrize("manager", [SimpleAuthManager, KeepsTheStockAnswer], ids=["stock", "stock-answer-kept"])
def test_the_stock_answer_is_not_asked_personal_data_is_admin_and_service_only(
        monkeypatch: pytest.MonkeyPatch, warnings: list[str], manager: type[SimpleAuthManager]) -> None:
    assert manager().is_authorized_custom_view(  # what it would have answered: yes, to a viewer
        method="GET", resource_name=api_auth.PERSONAL_DATA_RESOURCE, user=SimpleAuthManagerUser(username="viewer", role="viewer"))
    grants = _grants(monkeypatch, manager())
    assert {name for name, access in grants.items() if access.personal_data} == GRANTED
    assert {name for name, access in grants.items() if access.operations} == set(USERS) - {"norole"}  # unchanged
    _grants(monkeypatch, manager())
    assert len(warnings) == 1, warnings  # once per process, however many checks
    assert "AIRFLOW__CORE__AUTH_MANAGER" in warnings[0] and "[core] auth_manager" in warnings[0]
    assert "OvernightSimpleAuthManager" in warnings[0] and "overnight_app" in warnings[0]


def test_the_service_logins_follow_the_setting_under_the_stock_manager(monkeypatch: pytest.MonkeyPatch,
                                                                        warnings: list[str]) -> None:
    monkeypatch.setenv("AIRFLOW__OVERNIGHT__PERSONAL_DATA_LOGINS", "op, backend2")
    grants = _grants(monkeypatch, SimpleAuthManager())
    assert {name for name, access in grants.items() if access.personal_data} == {"admin", "op"}


def test_the_projects_manager_gives_the_same_answers_without_a_warning(monkeypatch: pytest.MonkeyPatch,
                                                                      warnings: list[str]) -> None:
    grants = _grants(monkeypatch, OvernightSimpleAuthManager())
    assert {name for name, access in grants.items() if access.personal_data} == GRANTED
    assert warnings == []


def test_a_manager_with_its_own_answer_is_asked(monkeypatch: pytest.MonkeyPatch, warnings: list[str]) -> None:
    grants = _grants(monkeypatch, AnswersItself())
    assert {name for name, access in grants.items() if access.personal_data} == {"viewer"}
    assert warnings == []


@pytest.mark.parametrize("manager", [SimpleAuthManager, OvernightSimpleAuthManager], ids=["stock", "overnight"])
def test_all_admins_mode_refuses_personal_data_to_everyone(monkeypatch: pytest.MonkeyPatch, warnings: list[str],
                                                          manager: type[SimpleAuthManager]) -> None:
    """`simple_auth_manager_all_admins` makes every caller, anonymous ones too, ADMIN: nobody reads investors' data
    then (admin and the service login included), operations are unchanged, and one warning names the setting."""
    monkeypatch.setattr(auth_manager, "_warned_all_admins", threading.Lock())
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "True")
    grants = _grants(monkeypatch, manager())
    assert {name for name, access in grants.items() if access.personal_data} == set()
    assert {name for name, access in grants.items() if access.operations} == set(USERS) - {"norole"}
    all_admin = [w for w in warnings if "simple_auth_manager_all_admins" in w]
    assert len(all_admin) == 1 and "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS" in all_admin[0], warnings
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "False")
    grants = _grants(monkeypatch, manager())  # off again: the usual answer
    assert {name for name, access in grants.items() if access.personal_data} == GRANTED


def test_the_service_login_may_create_runs_of_the_market_dags_and_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/access.md: a recalculation is triggered with the caller's own token, and Airflow checks the caller
    may create runs of that DAG; in development the service login has exactly that right, on market DAGs."""
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails

    monkeypatch.delenv("AIRFLOW__OVERNIGHT__PERSONAL_DATA_LOGINS", raising=False)
    manager = OvernightSimpleAuthManager()
    app = SimpleAuthManagerUser(username="overnight_app", role="viewer")
    viewer = SimpleAuthManagerUser(username="viewer", role="viewer")

    def may(user: Any, method: str, entity: Any, dag_id: str) -> bool:
        return manager.is_authorized_dag(method=method, user=user, access_entity=entity,
                                         details=DagDetails(id=dag_id))

    assert may(app, "POST", DagAccessEntity.RUN, "overnight_scoring_xnys") is True
    assert [may(app, m, e, d) for m, e, d in [
        ("POST", DagAccessEntity.RUN, "overnight_preflight"),         # another DAG
        ("PUT", DagAccessEntity.RUN, "overnight_scoring_xnys"),       # changing a run (e.g. marking it failed)
        ("DELETE", DagAccessEntity.RUN, "overnight_scoring_xnys"),
        ("POST", DagAccessEntity.TASK_INSTANCE, "overnight_scoring_xnys"),  # clearing tasks
        ("PUT", None, "overnight_scoring_xnys"),                      # pausing the DAG
    ]] == [False, False, False, False, False]
    assert may(viewer, "POST", DagAccessEntity.RUN, "overnight_scoring_xnys") is False
    assert may(app, "GET", DagAccessEntity.RUN, "overnight_scoring_xnys") is True  # a viewer's reads, as before
