"""A test auth manager that honours per-DAG permissions, as FAB does: the login `dagonly` may read one DAG.

Otherwise it is `OvernightSimpleAuthManager`. With it, a plugin that passed a request's `?dag_id=` to the
auth manager would let `dagonly` in by naming that DAG; the plugin asks with fixed details, so it cannot.
"""

from __future__ import annotations

from typing import Any

from overnight.dashboard.auth_manager import OvernightSimpleAuthManager

DAG_ONLY_LOGIN = "dagonly"
ITS_DAG = "overnight_scoring_xnys"


class PerDagAuthManager(OvernightSimpleAuthManager):
    """`dagonly` may read DAG `ITS_DAG` and nothing else; everyone else as in `OvernightSimpleAuthManager`."""

    def is_authorized_dag(self, *, method: Any, user: Any, access_entity: Any = None, details: Any = None) -> bool:
        if user.username == DAG_ONLY_LOGIN:
            return method == "GET" and details is not None and details.id == ITS_DAG
        return bool(super().is_authorized_dag(method=method, user=user, access_entity=access_entity, details=details))
