"""Mail about the events a person has to act on, through Airflow's notifier interface.

:class:`AirloomNotifier` is a notifier (``airflow.sdk.BaseNotifier``) for one Airloom event; the DAGs
hang it on a task's ``on_success_callback`` or ``on_failure_callback``. It builds the message from the
task's context (its XComs, its rendered fields, the exception) and sends it with the SMTP provider's
:class:`~airflow.providers.smtp.notifications.smtp.SmtpNotifier` over the connection ``smtp_default``.

Events and where they come from:

========================  ================================================================================
``signoff_requested``     ``register_candidate`` succeeded: a version waits for a reviewer; the mail
                          links the sign-off page of the run
``signoff_overdue``       ``wait_for_signoff`` failed: no decision before its timeout (the sensor's own
                          expiry), or the version was rejected
``gate_failed``           ``quality_gates`` failed; links the evaluation report
``canary_failed``         ``canary`` failed: ``production`` was not moved; names the failing prompts and
                          links the canary's answers
``retraining_requested``  ``request_retraining`` emitted the retraining asset event; says why
``task_failed``           any other task failed (default of the DAGs' tasks)
========================  ================================================================================

Sign-off overdue uses the sensor's timeout, not Airflow 3's deadline alerts: a ``DeadlineAlert`` counts
from a point of the *DAG run* (queued, logical date, a fixed time), while the wait for a reviewer
starts hours into the run, after training, so no deadline of the run says "waited N days for a person".

Recipients come from the Airflow Variable ``airloom_notify_emails`` (addresses separated by commas,
semicolons or spaces), read when the event happens. Without it nothing is sent: the notifier logs at
INFO that notifications are not configured and returns, which is the embedded default. A mail that
cannot be sent (no connection, the server refuses) is logged as an error and changes nothing else: a
notification never fails or retries a task.

Links are absolute, on ``[api] base_url`` (``http://localhost:8080`` when unset, as Airflow's own task
log links): the sign-off page of the plugin in ``plugins/`` (``/airloom/signoff?dag_id=…&run_id=…``)
and the reports through its file route (:func:`airloom.airflow.links.files_url`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

from airflow.sdk import BaseNotifier

log = logging.getLogger(__name__)

NOTIFY_EMAILS_VARIABLE = "airloom_notify_emails"
SMTP_CONN_ID = "smtp_default"
SIGNOFF_ROUTE = "/airloom/signoff"
"""The sign-off page (``airloom.airflow.signoff_ui.URL_PREFIX`` + ``/signoff``; a test checks they agree)."""
DEFAULT_BASE_URL = "http://localhost:8080/"  # Airflow's own fallback for the links in its task logs

EVENTS = (
    "signoff_requested",
    "signoff_overdue",
    "gate_failed",
    "canary_failed",
    "retraining_requested",
    "task_failed",
)


@dataclass
class Message:
    """One notification: the subject, a heading, paragraphs, labelled facts and links."""

    subject: str
    heading: str
    paragraphs: list[str] = field(default_factory=list)
    facts: list[tuple[str, str]] = field(default_factory=list)
    links: list[tuple[str, str]] = field(default_factory=list)
    detail: str = ""  # preformatted text: an error message, a list of reasons

    def html(self) -> str:
        return _environment().from_string(_HTML).render(m=self)


_HTML = """\
<!doctype html>
<html><body style="font-family:sans-serif;font-size:14px;color:#1b1f23">
<h2 style="font-size:16px">{{ m.heading }}</h2>
{% for p in m.paragraphs %}<p>{{ p }}</p>
{% endfor %}
{% if m.links %}<ul>{% for label, url in m.links if url %}<li><a href="{{ url }}">{{ label }}</a>: {{ url }}</li>{% endfor %}</ul>
{% endif %}
{% if m.facts %}<table>{% for label, value in m.facts %}<tr><th align="left" style="padding-right:1em">{{ label }}</th><td>{{ value }}</td></tr>{% endfor %}</table>
{% endif %}
{% if m.detail %}<pre style="white-space:pre-wrap;background:#f6f8fa;padding:.5em">{{ m.detail }}</pre>
{% endif %}
<p style="color:#57606a;font-size:12px">Sent by Airloom because the Airflow Variable {{ variable }} lists you.</p>
</body></html>
"""


def _environment():
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    env.globals["variable"] = NOTIFY_EMAILS_VARIABLE
    return env


class AirloomNotifier(BaseNotifier):
    """Mail ``event`` (one of :data:`EVENTS`) to the addresses in the Variable ``airloom_notify_emails``.

    :param event: what happened; decides the subject, the text and what is read from the context.
    :param smtp_conn_id: the SMTP connection (host, port, login; its extra ``from_email`` is the sender).
    :param from_email: the sender; default: ``[email] from_email``, else the connection's ``from_email``.
    """

    def __init__(
        self, event: str, *, smtp_conn_id: str = SMTP_CONN_ID, from_email: str | None = None
    ) -> None:
        if event not in EVENTS:
            raise ValueError(f"unknown Airloom notification event {event!r}; known: {', '.join(EVENTS)}")
        super().__init__()
        self.event = event
        self.smtp_conn_id = smtp_conn_id
        self.from_email = from_email

    def notify(self, context) -> None:
        send(self.event, context, smtp_conn_id=self.smtp_conn_id, from_email=self.from_email)


def send(
    event: str, context, *, smtp_conn_id: str = SMTP_CONN_ID, from_email: str | None = None
) -> Message | None:
    """Build ``event``'s message from ``context`` and mail it; returns it, or None when nothing was sent."""
    recipients = notify_recipients()
    if not recipients:
        log.info(
            "notifications are not configured (Airflow Variable %s is unset or empty): %s not sent",
            NOTIFY_EMAILS_VARIABLE,
            event,
        )
        return None
    try:
        message = BUILDERS[event](context)
        from airflow.providers.smtp.notifications.smtp import SmtpNotifier

        if from_email is None:
            from airflow.sdk.configuration import conf

            from_email = conf.get("email", "from_email", fallback=None) or None
        SmtpNotifier(
            to=recipients,
            from_email=from_email,
            subject=message.subject,
            html_content=message.html(),
            smtp_conn_id=smtp_conn_id,
        ).notify(context)
    except Exception as exc:  # noqa: BLE001 - a mail must never fail or retry the task it reports on
        log.error(
            "notification %s to %s not sent through connection %r: %s",
            event,
            ", ".join(recipients),
            smtp_conn_id,
            exc,
            exc_info=True,
        )
        return None
    log.info("notification %s sent to %s: %s", event, ", ".join(recipients), message.subject)
    return message


def notify_recipients() -> list[str]:
    """The addresses in the Variable ``airloom_notify_emails``; [] when it is unset, empty or unreadable."""
    from airflow.sdk import Variable

    try:
        value = Variable.get(NOTIFY_EMAILS_VARIABLE, default=None)
    except Exception as exc:  # noqa: BLE001 - no metadata DB or secrets backend: say so, send nothing
        log.warning(
            "cannot read the Airflow Variable %s (%s): notifications off", NOTIFY_EMAILS_VARIABLE, exc
        )
        return []
    return [a for a in re.split(r"[\s,;]+", str(value or "")) if a]


# -- links ----------------------------------------------------------------------------------------


def ui_base_url() -> str:
    """``[api] base_url`` without its trailing slash (the Airflow UI, as a person's browser reaches it)."""
    from airflow.sdk.configuration import conf

    return (conf.get("api", "base_url", fallback=None) or DEFAULT_BASE_URL).rstrip("/")


def signoff_url(dag_id: str, run_id: str) -> str:
    """The sign-off page filtered to one run's versions."""
    return f"{ui_base_url()}{SIGNOFF_ROUTE}?dag_id={quote(dag_id, safe='')}&run_id={quote(run_id, safe='')}"


def run_url(dag_id: str, run_id: str) -> str:
    return f"{ui_base_url()}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"


def report_url(path: Any) -> str:
    """An absolute link to a file under ``$AIRLOOM_HOME`` through the plugin's file route; "" elsewhere."""
    from airloom.airflow.links import files_url

    relative = files_url(path)  # already carries base_url's path
    if not relative:
        return ""
    parts = urlsplit(ui_base_url())
    return f"{parts.scheme}://{parts.netloc}{relative}"


# -- what each event says -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Run:
    dag_id: str
    run_id: str
    task_id: str
    log_url: str

    @property
    def url(self) -> str:
        return run_url(self.dag_id, self.run_id)

    def facts(self) -> list[tuple[str, str]]:
        return [("DAG", self.dag_id), ("Run", self.run_id), ("Task", self.task_id)]


def _run(context) -> _Run:
    ti = context.get("ti")
    dag_run = context.get("dag_run")
    dag_id = getattr(ti, "dag_id", None) or getattr(dag_run, "dag_id", "") or ""
    run_id = context.get("run_id") or getattr(dag_run, "run_id", "") or ""
    return _Run(
        str(dag_id), str(run_id), str(getattr(ti, "task_id", "")), str(getattr(ti, "log_url", "") or "")
    )


def _xcom(context, key: str = "return_value") -> Any:
    """What the reporting task itself pushed under ``key`` (None when nothing, or no task instance)."""
    ti = context.get("ti")
    if ti is None or not hasattr(ti, "xcom_pull"):
        return None
    try:
        return ti.xcom_pull(task_ids=ti.task_id, key=key)
    except Exception as exc:  # noqa: BLE001 - the message goes out without it
        log.warning("cannot read XCom %s of %s: %s", key, ti.task_id, exc)
        return None


def _task_field(context, name: str) -> Any:
    return getattr(context.get("task"), name, None)


def _error(context) -> str:
    exc = context.get("exception")
    return "" if exc is None else str(exc) or type(exc).__name__


def _requester(context, name: str, version: Any) -> str | None:
    """Who the registry records as asking for the sign-off (the reporting task's registry); None if unknown."""
    from airloom.governance.signoff import signoff_status

    try:
        return signoff_status(context["task"].hook.registry, name, int(version))["requested_by"]
    except Exception as exc:  # noqa: BLE001 - the message goes out without it
        log.warning("cannot read who requested the sign-off of %s/%s: %s", name, version, exc)
        return None


def _signoff_requested(context) -> Message:
    run = _run(context)
    result = _xcom(context) or {}
    name = result.get("name") or _task_field(context, "model_name") or "?"
    version = result.get("version")
    ref = result.get("ref") or f"{name}/{version}"
    page = signoff_url(run.dag_id, run.run_id)
    requester = _requester(context, name, version)
    return Message(
        subject=f"[Airloom] {ref} waits for your sign-off",
        heading=f"{ref} waits for sign-off",
        paragraphs=[
            f"{run.dag_id} registered {ref}; it is deployed only after a reviewer approves it"
            + (
                f" (the sign-off was requested by {requester}, who may not approve it)." if requester else "."
            ),
            f"Review the model card, metrics and reports, then approve or reject: {page}",
        ],
        links=[("Sign-off page", page), ("DAG run", run.url)],
        facts=[("Model", ref), *run.facts()],
    )


def _signoff_overdue(context) -> Message:
    from airflow.sdk.exceptions import AirflowSensorTimeout

    run = _run(context)
    ref = f"{_task_field(context, 'model_name')}/{_task_field(context, 'version')}"
    error = _error(context)
    expired = isinstance(context.get("exception"), AirflowSensorTimeout) or "request expired" in error
    page = signoff_url(run.dag_id, run.run_id)
    if expired:
        subject, heading = f"[Airloom] sign-off of {ref} overdue", f"Nobody decided on {ref} in time"
        what = (
            "The wait for a reviewer timed out and the sign-off request expired: the version was not deployed. "
            "To deploy it, open a new round (airloom signoff request) and run the deployment again."
        )
    else:
        subject, heading = f"[Airloom] sign-off of {ref} ended: not deployed", f"{ref} was not approved"
        what = "The wait for sign-off ended without an approval: the version was not deployed."
    return Message(
        subject=subject,
        heading=heading,
        paragraphs=[what],
        links=[("Sign-off page", page), ("DAG run", run.url), ("Task log", run.log_url)],
        facts=[("Model", ref), *run.facts()],
        detail=error,
    )


def _gate_failed(context) -> Message:
    run = _run(context)
    report = report_url(_xcom(context, "report"))
    links = [("Evaluation report", report)] if report else []
    return Message(
        subject=f"[Airloom] quality gate failed in {run.dag_id}",
        heading="The candidate failed a quality gate",
        paragraphs=[
            "The candidate was not registered; the report compares it with production, example by example."
        ],
        links=[*links, ("DAG run", run.url), ("Task log", run.log_url)],
        facts=run.facts(),
        detail=_error(context),
    )


def _canary_failed(context) -> Message:
    run = _run(context)
    name, alias = _task_field(context, "model_name"), _task_field(context, "alias")
    report = report_url(_xcom(context, "canary_report"))
    links = [("Canary answers", report)] if report else []
    kept = (
        f"{name}@production was not moved: users keep the version they had."
        if alias != "production"
        else f"{name}@production serves the version that failed; roll it back (llm_model_rollback)."
    )
    return Message(
        subject=f"[Airloom] canary failed: {name}@{alias}",
        heading=f"The canary of {name}@{alias} failed",
        paragraphs=[kept, "The prompts that failed, and what the model answered:"],
        links=[*links, ("DAG run", run.url), ("Task log", run.log_url)],
        facts=[("Model", f"{name}@{alias}"), *run.facts()],
        detail=_error(context),
    )


def _retraining_requested(context) -> Message:
    from airloom.airflow.operators.monitoring import retrain_on

    run = _run(context)
    decision = _xcom(context) or {}
    reasons = [str(r) for r in decision.get("reasons") or []]
    dataset = retrain_on(decision.get("reference"))
    dashboard = report_url(decision.get("dashboard"))
    trains_on = (
        f"llm_finetune starts on the retraining request and trains on {dataset}."
        if dataset
        else "llm_finetune starts on the retraining request; the request names no dataset, so it will refuse "
        "to guess: start it by hand with the dataset to train on."
    )
    return Message(
        subject=f"[Airloom] retraining requested by {run.dag_id}",
        heading="Monitoring requested retraining",
        paragraphs=[trains_on, "Thresholds crossed:"],
        links=[*([("Monitoring dashboard", dashboard)] if dashboard else []), ("DAG run", run.url)],
        facts=run.facts(),
        detail="\n".join(f"- {r}" for r in reasons),
    )


def _task_failed(context) -> Message:
    run = _run(context)
    return Message(
        subject=f"[Airloom] {run.dag_id}.{run.task_id} failed",
        heading=f"Task {run.task_id} of {run.dag_id} failed",
        paragraphs=["Its retries, if any, are spent; the log says why."],
        links=[("Task log", run.log_url), ("DAG run", run.url)],
        facts=run.facts(),
        detail=_error(context),
    )


BUILDERS = {
    "signoff_requested": _signoff_requested,
    "signoff_overdue": _signoff_overdue,
    "gate_failed": _gate_failed,
    "canary_failed": _canary_failed,
    "retraining_requested": _retraining_requested,
    "task_failed": _task_failed,
}
