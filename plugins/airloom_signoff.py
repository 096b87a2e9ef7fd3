"""Airloom's Airflow UI plugin: model sign-off (nav "Browse → Model sign-off" and a tab on each DAG run).

The logic lives in :mod:`airloom.airflow.signoff_ui` (importable and tested without this folder).
Every Airflow process loads plugins, task runners included (for macros), so this file stays cheap:
the FastAPI app and the API server's auth modules (~1.3 s of imports) load on the first request,
which only ever reaches the API server.
"""

from airflow.plugins_manager import AirflowPlugin

URL_PREFIX = "/airloom"  # = airloom.airflow.signoff_ui.URL_PREFIX (a test checks they agree)


class LazySignOffApp:
    """ASGI app that builds :func:`airloom.airflow.signoff_ui.create_app` on first use."""

    def __init__(self) -> None:
        self._app = None

    def __repr__(self) -> str:
        return "airloom.airflow.signoff_ui:create_app"

    async def __call__(self, scope, receive, send) -> None:
        if self._app is None:
            from airloom.airflow.signoff_ui import create_app

            self._app = create_app()
        await self._app(scope, receive, send)


class AirloomSignOffPlugin(AirflowPlugin):
    name = "airloom_signoff"
    fastapi_apps = [{"app": LazySignOffApp(), "url_prefix": URL_PREFIX, "name": "Airloom model sign-off"}]
    external_views = [
        {
            "name": "Model sign-off",
            "href": f"{URL_PREFIX}/signoff",
            "destination": "nav",
            "category": "browse",
            "url_route": "airloom-signoff",
        },
        {
            # Outside the nav the UI substitutes {DAG_ID} and {RUN_ID} into the href.
            "name": "Model sign-off",
            "href": f"{URL_PREFIX}/signoff?dag_id={{DAG_ID}}&run_id={{RUN_ID}}",
            "destination": "dag_run",
            "url_route": "airloom-signoff-run",
        },
    ]
