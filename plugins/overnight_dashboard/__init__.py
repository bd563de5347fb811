"""Airflow plugin: the Overnight dashboard (job runs, freshness, user lookup, audit API) at `/overnight`."""

from __future__ import annotations

import gc
import logging
import os
from pathlib import Path
from typing import Any

from airflow.plugins_manager import AirflowPlugin

PLUGIN_DIR = Path(__file__).resolve().parent
URL_PREFIX = "/overnight"
GC_FREEZE_ENV = "OVERNIGHT_API_GC_FREEZE"

log = logging.getLogger(__name__)


def freeze_startup_heap() -> int:
    """Moves the api-server's start-up heap out of the cyclic GC's reach (`gc.freeze`); returns the objects frozen.

    Airflow's api-server holds ~600k long-lived objects. Under load, each young collection promotes the
    objects of the requests in flight, so a full collection ran every ~2 s and stopped the event loop
    for 0.2-0.5 s: the dashboard's p99, and its Redis calls timing out. Frozen objects are skipped by
    the collector (a full collection then takes a few ms) and never freed if they become cyclic garbage,
    which bounds the cost by the heap at start-up. `OVERNIGHT_API_GC_FREEZE=0` leaves the GC alone.
    """
    if os.environ.get(GC_FREEZE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return 0
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("overnight dashboard: %d objects of the api-server's heap frozen out of the cyclic GC (%s=0: off)",
             frozen, GC_FREEZE_ENV)
    return frozen


class DashboardApp:
    """The ASGI entry of the dashboard: builds `overnight.dashboard.app.create_app()` when first asked.

    Every Airflow process imports the plugins folder (the scheduler, the dag-processor, each task's
    runner); importing FastAPI and Airflow's API security there costs ~2 s per process for nothing,
    so only the api-server pays it, once per worker: at start-up (`build_dashboard_at_startup`), or
    else when the first request reaches `/overnight`.
    """

    def __init__(self) -> None:
        self._app: Any = None

    @property
    def app(self) -> Any:
        """The dashboard's FastAPI app (every route behind Airflow's auth) behind its `FastPaths` front."""
        if self._app is None:
            from overnight.dashboard.app import create_app
            from overnight.dashboard.fastpath import FastPaths

            self._app = FastPaths.of(create_app(static_dir=PLUGIN_DIR / "static",
                                                template_dir=PLUGIN_DIR / "templates"))
            freeze_startup_heap()
        return self._app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


app = DashboardApp()


def build_dashboard_at_startup(inner: Any) -> Any:
    """A root "middleware" that adds nothing: it builds the dashboard app when the api-server builds its
    middleware stack, once per worker at start-up, so no user's first request waits for it (0.4-1.1 s).
    It returns the next app itself, so it costs nothing per request."""
    try:
        _ = app.app
    except Exception:  # noqa: BLE001 - the api-server must start; the first request raises it again
        log.exception("overnight dashboard: not built at start-up; it will be built on its first request")
    return inner


class OvernightDashboardPlugin(AirflowPlugin):
    """Mounts the dashboard app at /overnight and adds its page to the Airflow UI's navigation."""

    name = "overnight_dashboard"
    fastapi_apps: list[dict[str, Any]] = [{"app": app, "url_prefix": URL_PREFIX, "name": "Overnight dashboard"}]
    fastapi_root_middlewares: list[dict[str, Any]] = [
        {"middleware": build_dashboard_at_startup, "name": "Overnight dashboard, built at start-up"}]
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
