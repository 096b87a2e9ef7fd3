"""Extra links from a task to the HTML it wrote: the validation report, the EDA report, the evaluation report.

Airflow 3 calls ``get_link`` in the worker when the task ends (success or failure) and stores the
URL in XCom under the link's ``xcom_key``; the serialized DAG keeps only ``{name: xcom_key}`` and the
UI reads the stored URL back. So no plugin has to list these classes, and none should: a link a
plugin lists replaces the stored one and would be evaluated in the API server, which cannot read
XCom through the task SDK.

Each link reads the path its task pushed as an XCom (``path_key``) and points at Airloom's file
route, ``/airloom/files/<path relative to $AIRLOOM_HOME>`` (served, with authentication, by the
plugin in ``plugins/``). A file outside ``$AIRLOOM_HOME`` or a task that pushed no path gets no link.
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


def files_url(path: str | Path | None) -> str:
    """The file route's URL for ``path``, or "" when it is not a file under ``$AIRLOOM_HOME``.

    The URL is relative to the Airflow UI's host; when ``[api] base_url`` sets a sub-path (Airflow
    behind a proxy at ``https://host/airflow``), that sub-path is kept in front of it.
    """
    from airloom.settings import home

    if not path:
        return ""
    try:
        relative = Path(path).resolve().relative_to(home())
    except ValueError:
        return ""
    return f"{_base_path()}{FILES_ROUTE}/{quote(relative.as_posix(), safe='/')}"


def _base_path() -> str:
    try:
        from airflow.sdk.configuration import conf

        base_url = conf.get("api", "base_url", fallback="") or ""
    except Exception:  # no Airflow config at all: the UI is at the host's root
        base_url = ""
    return urlsplit(base_url).path.rstrip("/")


class _FileLink(BaseOperatorLink):
    """A link to the file whose path the task pushed as the XCom ``path_key``."""

    path_key: ClassVar[str]

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        from airflow.sdk.execution_time.xcom import XCom

        return files_url(XCom.get_value(ti_key=ti_key, key=self.path_key))


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
