"""The simple auth manager for development, with the dashboard's personal-data permission of its own.

Airflow's `SimpleAuthManager` grants every custom view to every role from VIEWER up, so under it a
read-only `viewer` would read every investor's recommendations. `OvernightSimpleAuthManager` is the
simple auth manager unchanged, except that the custom view `PERSONAL_DATA_RESOURCE`
("Overnight recommendations") is granted only to the ADMIN role and to the logins listed in
`[overnight] personal_data_logins` (`AIRFLOW__OVERNIGHT__PERSONAL_DATA_LOGINS`, comma-separated,
default `overnight_app`: the app team's backend). See docs/access.md.

Fail closed: when the configured auth manager answers custom views with the stock `SimpleAuthManager`'s
blanket yes (the stock class, as the official image runs it, or a subclass that keeps that answer),
`personal_data_granted` does not ask it: it applies the rule above itself and logs one warning per
process naming `[core] auth_manager` (`AIRFLOW__CORE__AUTH_MANAGER`).
"""

from __future__ import annotations

import logging
import threading
from functools import cached_property
from typing import Any

from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager
from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
from airflow.configuration import conf

from overnight.dashboard.api_auth import PERSONAL_DATA_RESOURCE
from overnight.domain.markets import DAG_ID_PREFIX

log = logging.getLogger(__name__)

SERVICE_LOGIN = "overnight_app"
STOCK_SIMPLE_WARNING = (
    "overnight dashboard: the auth manager answers custom views as Airflow's stock SimpleAuthManager does "
    "(yes to every role from VIEWER up), so investors' data ('" + PERSONAL_DATA_RESOURCE + "') is granted "
    "only to the ADMIN role and the logins in [overnight] personal_data_logins (%s), never to viewer, user or op. "
    "Set [core] auth_manager (AIRFLOW__CORE__AUTH_MANAGER) to "
    "overnight.dashboard.auth_manager.OvernightSimpleAuthManager (development) or to a production auth "
    "manager (FAB, Keycloak) that grants that permission to the roles that may read it (docs/access.md)"
)
_warned = threading.Lock()  # acquired once, never released: the warning is logged once per process


def personal_data_logins() -> frozenset[str]:
    """The logins granted personal data besides ADMIN (`[overnight] personal_data_logins`, default overnight_app)."""
    raw = conf.get("overnight", "personal_data_logins", fallback=SERVICE_LOGIN) or ""
    return frozenset(name.strip() for name in raw.split(",") if name.strip())


ALL_ADMINS_WARNING = (
    "overnight dashboard: [core] simple_auth_manager_all_admins is on (AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS): "
    "the simple auth manager makes every caller, anonymous ones included, ADMIN, so investors' data ('"
    + PERSONAL_DATA_RESOURCE + "') is refused to everyone; turn it off and log in (docs/access.md)"
)
_warned_all_admins = threading.Lock()


def all_admins_mode() -> bool:
    """Whether the simple auth manager's `[core] simple_auth_manager_all_admins` is on (everyone is ADMIN)."""
    try:
        return conf.getboolean("core", "simple_auth_manager_all_admins", fallback=False)
    except ValueError:  # not a boolean: Airflow itself refuses to start on it; refuse here too
        return True


def simple_personal_data(user: Any, logins: frozenset[str], method: Any = "GET") -> bool:
    """The simple auth managers' rule for "Overnight recommendations": the ADMIN role, or reading as one of `logins`;
    an authenticated user with no role (or a user not of the simple auth manager) gets nothing, and in all-admins
    mode (every caller, anonymous ones too, is ADMIN there) nobody does."""
    if all_admins_mode():
        if _warned_all_admins.acquire(blocking=False):
            log.warning(ALL_ADMINS_WARNING)
        return False
    role = getattr(user, "role", None)
    if not role or not isinstance(role, str):
        return False
    try:
        admin = SimpleAuthManager._is_admin(user)
    except KeyError:  # a role the simple auth manager does not know
        admin = False
    return admin or (method == "GET" and getattr(user, "username", None) in logins)


def answers_like_stock_simple(manager: Any) -> bool:
    """Whether `manager` answers custom views with the stock SimpleAuthManager's blanket yes."""
    answer = getattr(type(manager), "is_authorized_custom_view", None)
    return isinstance(manager, SimpleAuthManager) and answer is SimpleAuthManager.is_authorized_custom_view


def personal_data_granted(manager: Any, user: Any) -> bool:
    """May `user` read investors' data: asked of `manager` with fixed details, except under the stock
    SimpleAuthManager's answer (fail closed: ADMIN and `[overnight] personal_data_logins` only, one warning)."""
    if not answers_like_stock_simple(manager):
        return bool(manager.is_authorized_custom_view(method="GET", resource_name=PERSONAL_DATA_RESOURCE, user=user))
    logins = personal_data_logins()
    if _warned.acquire(blocking=False):
        log.warning(STOCK_SIMPLE_WARNING, ", ".join(sorted(logins)) or "none")
    return simple_personal_data(user, logins)


class OvernightSimpleAuthManager(SimpleAuthManager):
    """SimpleAuthManager whose "Overnight recommendations" view is for ADMIN and the listed service logins only."""

    @cached_property
    def personal_data_logins(self) -> frozenset[str]:
        """The logins granted personal data besides ADMIN (`[overnight] personal_data_logins`)."""
        return personal_data_logins()

    def is_authorized_custom_view(self, *, method: Any, resource_name: str, user: SimpleAuthManagerUser) -> bool:
        if resource_name != PERSONAL_DATA_RESOURCE:
            return bool(super().is_authorized_custom_view(method=method, resource_name=resource_name, user=user))
        return simple_personal_data(user, self.personal_data_logins, method)

    def is_authorized_dag(self, *, method: Any, user: SimpleAuthManagerUser, access_entity: Any = None,
                          details: Any = None) -> bool:
        """As the simple auth manager, and: the personal-data service logins may create runs of the market DAGs
        (a user's recalculation, asked through the plugin with their own token: docs/access.md), nothing else."""
        if super().is_authorized_dag(method=method, user=user, access_entity=access_entity, details=details):
            return True
        from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity

        dag_id = getattr(details, "id", None) or ""
        return (method == "POST" and access_entity == DagAccessEntity.RUN and dag_id.startswith(DAG_ID_PREFIX)
                and getattr(user, "username", None) in self.personal_data_logins and not all_admins_mode())
