"""Extra links from a task to what it wrote: validation, EDA and evaluation reports, a backfill day's metrics
and the trend chart, the training loss curve, the canary's answers, the monitoring dashboard.

Airflow 3 calls ``get_link`` in the worker when the task ends (success or failure) and stores the
URL in XCom under the link's ``xcom_key``; the serialized DAG keeps only ``{name: xcom_key}`` and the
UI reads the stored URL back. So no plugin has to list these classes, and none should: a link a
plugin lists replaces the stored one and would be evaluated in the API server, which cannot read
XCom through the task SDK.

Each link reads the path its task pushed as an XCom (``path_key``; ``return_value.<field>`` for a field
of the task's return value) and points at one of Airloom's routes (served, with authentication, by the
plugin in ``plugins/``): ``/airloom/files/<path relative to $AIRLOOM_HOME>`` serves the file itself,
``/airloom/evaluation-day/<path>`` renders a backfill day's ``metrics.json`` with the trend chart. A
path outside ``$AIRLOOM_HOME`` or a task that pushed none gets no link. Links read the paths the tasks
report rather than rebuilding them, so a change of folder layout needs no change here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar
from urllib.parse import quote, urlsplit

from airflow.sdk import BaseOperatorLink

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey

FILES_ROUTE = "/airloom/files"
EVALUATION_DAY_ROUTE = "/airloom/evaluation-day"


def files_url(path: str | Path | None, route: str = FILES_ROUTE) -> str:
    """``route``'s URL for ``path`` (the file route by default), or "" when it is not under ``$AIRLOOM_HOME``.

    The URL is relative to the Airflow UI's host; when ``[api] base_url`` sets a sub-path (Airflow
    behind a proxy at ``https://host/airflow``), that sub-path is kept in front of it.
    """
    from airloom.settings import home

    if not path or not isinstance(path, str | Path):
        return ""
    try:
        relative = Path(path).resolve().relative_to(home())
    except ValueError:
        return ""
    return f"{_base_path()}{route}/{quote(relative.as_posix(), safe='/=')}"  # ds=<date> stays readable


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
