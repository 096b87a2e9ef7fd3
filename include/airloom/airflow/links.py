"""Extra links from a task to what it wrote: validation, EDA and evaluation reports, a backfill day's metrics
and the trend chart, the training loss curve, the canary's answers, the monitoring dashboard.

Airflow 3 calls ``get_link`` in the worker when the task ends (success or failure) and stores the
URL in XCom under the link's ``xcom_key``; the serialized DAG keeps only ``{name: xcom_key}`` and the
UI reads the stored URL back. So no plugin has to list these classes, and none should: a link a
plugin lists replaces the stored one and would be evaluated in the API server, which cannot read
XCom through the task SDK.

Each link reads the path its task pushed as an XCom (``path_key``; ``return_value.<field>`` for a field
of the task's return value) and points at one of Airloom's routes (served, with authentication, by the
plugin in ``plugins/``): ``/airloom/files/<key>`` serves the file itself, ``/airloom/evaluation-day/<key>``
renders a backfill day's ``metrics.json`` with the trend chart. The key is the file's path relative to
``$AIRLOOM_HOME``, or for a URI of the artifact store (``AIRLOOM_ARTIFACTS=s3://bucket/prefix``, what tasks
hand over when workers share no disk) its key there: the two name the same artifact
(:mod:`airloom.artifacts`), and the route reads the store when it is remote. A path outside
``$AIRLOOM_HOME``, a URI of another bucket or a task that pushed none gets no link. Links read the paths the
tasks report rather than rebuilding them, so a change of folder layout needs no change here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar
from urllib.parse import quote, urlsplit

from airflow.sdk import BaseOperatorLink

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey

FILES_ROUTE = "/airloom/files"
EVALUATION_DAY_ROUTE = "/airloom/evaluation-day"


def served_key(location: str | os.PathLike[str] | None) -> str | None:
    """The key the file routes know ``location`` by: a local path relative to ``$AIRLOOM_HOME``, or the key of
    a URI of the artifact store (``s3://bucket/prefix/runs/…`` → ``runs/…``); None for anything else (a path
    outside ``$AIRLOOM_HOME``, a URI of another bucket or prefix, a key with ``..`` or empty segments)."""
    from airloom.artifacts import artifacts_uri, is_remote
    from airloom.settings import home

    if not location or not isinstance(location, str | os.PathLike):
        return None
    text = os.fspath(location)
    if is_remote(text):
        root = artifacts_uri().rstrip("/")
        if not is_remote(root) or not text.startswith(root + "/"):
            return None
        key = text[len(root) + 1 :].rstrip("/")
        if not key or "\\" in key or "\x00" in key or any(p in ("", ".", "..") for p in key.split("/")):
            return None
        return key
    if "://" in text:
        return None
    try:
        return Path(text).expanduser().resolve().relative_to(home()).as_posix()
    except ValueError:
        return None


def files_url(path: str | os.PathLike[str] | None, route: str = FILES_ROUTE) -> str:
    """``route``'s URL for ``path`` (the file route by default): a path under ``$AIRLOOM_HOME`` or a URI of the
    artifact store (:func:`served_key`), "" for anything else.

    The URL is relative to the Airflow UI's host; when ``[api] base_url`` sets a sub-path (Airflow
    behind a proxy at ``https://host/airflow``), that sub-path is kept in front of it.
    """
    key = served_key(path)
    if key is None:
        return ""
    return f"{_base_path()}{route}/{quote(key, safe='/=')}"  # ds=<date> stays readable


def _base_path() -> str:
    try:
        from airflow.sdk.configuration import conf

        base_url = conf.get("api", "base_url", fallback="") or ""
    except Exception:  # no Airflow config at all: the UI is at the host's root
        base_url = ""
    return urlsplit(base_url).path.rstrip("/")


class _FileLink(BaseOperatorLink):
    """A link to the file whose path the task pushed as the XCom ``path_key`` (``key.field``: a dict's field)."""

    path_key: ClassVar[str]
    route: ClassVar[str] = FILES_ROUTE

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        from airflow.sdk.execution_time.xcom import XCom

        key, _, field = self.path_key.partition(".")
        value = XCom.get_value(ti_key=ti_key, key=key)
        if field:
            value = value.get(field) if isinstance(value, dict) else None
        return files_url(value, self.route)


class ValidationReportLink(_FileLink):
    """``validation.html`` (``ValidateDataOperator`` pushes ``validation_report``): the expectations and
    findings on a page that reads offline, which GX's Data Docs (CSS and JS from CDNs) do not; it links
    to them."""

    name = "Validation report"
    path_key = "validation_report"


class EdaReportLink(_FileLink):
    """The EDA report (``DataProfileOperator`` pushes ``report``)."""

    name = "EDA report"
    path_key = "report"


class EvalReportLink(_FileLink):
    """The evaluation report with gates and comparison (``QualityGateOperator`` pushes ``report``)."""

    name = "Eval report"
    path_key = "report"


class EvaluationDayLink(_FileLink):
    """A backfill day on one page: that day's metrics and the model's trend chart over every evaluated day
    (``PartitionEvaluationOperator`` pushes ``metrics_path``; the plugin renders the page on request, so it
    shows the trend as the latest ``trend`` task left it, this day included)."""

    name = "Day metrics"
    path_key = "metrics_path"
    route = EVALUATION_DAY_ROUTE


class TrendChartLink(_FileLink):
    """``trend.png`` (``EvaluationTrendOperator`` returns it as ``plot``)."""

    name = "Trend chart"
    path_key = "return_value.plot"


class LossCurveLink(_FileLink):
    """``loss_curve.png`` of the training run (``DeepSpeedTrainOperator`` pushes ``loss_curve``)."""

    name = "Loss curve"
    path_key = "loss_curve"


class CanaryAnswersLink(_FileLink):
    """``canary.html``: each canary prompt with the deployed model's answer (``CanaryOperator`` pushes
    ``canary_report``, also when every answer was empty and the task failed)."""

    name = "Canary answers"
    path_key = "canary_report"


class MonitoringDashboardLink(_FileLink):
    """``dashboard.html`` of the day (``DriftMonitorOperator`` returns it as ``dashboard``)."""

    name = "Monitoring dashboard"
    path_key = "return_value.dashboard"
