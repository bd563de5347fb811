"""The simple auth manager for development, with the dashboard's personal-data permission of its own.

Airflow's `SimpleAuthManager` grants every custom view to every role from VIEWER up, so under it a
read-only `viewer` would read every investor's recommendations. `OvernightSimpleAuthManager` is the
simple auth manager unchanged, except that the custom view `PERSONAL_DATA_RESOURCE`
("Overnight recommendations") is granted only to the ADMIN role and to the logins listed in
`[overnight] personal_data_logins` (`AIRFLOW__OVERNIGHT__PERSONAL_DATA_LOGINS`, comma-separated,
default `overnight_app`: the app team's backend). See docs/access.md.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager
from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
from airflow.configuration import conf

from overnight.dashboard.api_auth import PERSONAL_DATA_RESOURCE

SERVICE_LOGIN = "overnight_app"


class OvernightSimpleAuthManager(SimpleAuthManager):
    """SimpleAuthManager whose "Overnight recommendations" view is for ADMIN and the listed service logins only."""

    @cached_property
    def personal_data_logins(self) -> frozenset[str]:
        """The logins granted personal data besides ADMIN (`[overnight] personal_data_logins`)."""
        raw = conf.get("overnight", "personal_data_logins", fallback=SERVICE_LOGIN) or ""
        return frozenset(name.strip() for name in raw.split(",") if name.strip())

    def is_authorized_custom_view(self, *, method: Any, resource_name: str, user: SimpleAuthManagerUser) -> bool:
        if resource_name != PERSONAL_DATA_RESOURCE:
            return bool(super().is_authorized_custom_view(method=method, resource_name=resource_name, user=user))
        if not user.role:  # authenticated, but no role: nothing
            return False
        return self._is_admin(user) or (method == "GET" and user.username in self.personal_data_logins)
