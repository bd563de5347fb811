"""Airflow plugin: the Overnight dashboard (job runs, freshness, user lookup, audit API) at `/overnight`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from airflow.plugins_manager import AirflowPlugin

INCLUDE_DIR = Path(__file__).resolve().parents[2] / "include"
if str(INCLUDE_DIR) not in sys.path:
    sys.path.insert(0, str(INCLUDE_DIR))

PLUGIN_DIR = Path(__file__).resolve().parent
URL_PREFIX = "/overnight"


class DashboardApp:
    """The ASGI entry of the dashboard: builds `overnight.api.create_app()` on its first request.

    Every Airflow process imports the plugins folder (the scheduler, the dag-processor, each task's
    runner); importing FastAPI and Airflow's API security there costs ~2 s per process for nothing,
    so only the api-server pays it, once, when the first request reaches `/overnight`.
    """

    def __init__(self) -> None:
        self._app: Any = None

    @property
    def app(self) -> Any:
        """The dashboard's FastAPI app (every route behind Airflow's auth)."""
        if self._app is None:
            from overnight.api import create_app

            self._app = create_app(static_dir=PLUGIN_DIR / "static", template_dir=PLUGIN_DIR / "templates")
        return self._app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


app = DashboardApp()


class OvernightDashboardPlugin(AirflowPlugin):
    """Mounts the dashboard app at /overnight and adds its page to the Airflow UI's navigation."""

    name = "overnight_dashboard"
    fastapi_apps: list[dict[str, Any]] = [{"app": app, "url_prefix": URL_PREFIX, "name": "Overnight dashboard"}]
    # With `url_route` the UI shows the page inside its own frame at /plugin/overnight; `href` is
    # relative to the UI's base URL (no leading slash) so a base_url with a path prefix still works.
    external_views: list[dict[str, Any]] = [
        {
            "name": "Overnight",
            "href": "overnight/",
            "url_route": "overnight",
            "destination": "nav",
            "nav_top_level": True,
        }
    ]
