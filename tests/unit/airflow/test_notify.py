"""Airloom's notifier mails each event through the SMTP provider to a real SMTP server (aiosmtpd on the
loopback), with the connection and the recipients Variable given as Airflow reads them from the
environment; unconfigured, it sends nothing and says so. The same notifiers on a real DAG run:
tests/dags/test_canary_before_promotion.py."""

from __future__ import annotations

import html
import logging
from types import SimpleNamespace
from typing import Any

import pytest

from airloom.airflow.notify import (
    EVENTS,
    NOTIFY_EMAILS_VARIABLE,
    SIGNOFF_ROUTE,
    AirloomNotifier,
    notify_recipients,
    signoff_url,
)
from tests.mailbox import smtp_server

RUN_ID = "manual__2026-01-02T03:04:05+00:00"


class TaskInstance:
    """The surface the notifier reads of Airflow's RuntimeTaskInstance: ids, log URL, its own XComs."""

    def __init__(self, task_id: str, xcoms: dict[str, Any] | None = None) -> None:
        self.dag_id, self.task_id, self.map_index = "llm_finetune", task_id, -1
        self.log_url = f"http://airflow.example.com/dags/llm_finetune/runs/r/tasks/{task_id}"
        self.xcoms = xcoms or {}

    def xcom_pull(self, task_ids=None, key="return_value"):
        assert task_ids == self.task_id  # the notifier reads what the reporting task pushed
        return self.xcoms.get(key)


def _context(task_id: str, task=None, exception=None, **xcoms) -> dict:
    return {
        "ti": TaskInstance(task_id, xcoms),
        "run_id": RUN_ID,
        "dag_run": SimpleNamespace(triggering_user_name="trainer", run_id=RUN_ID),
        "task": task,
        "exception": exception,
    }


@pytest.fixture
def mailbox(monkeypatch):
    with smtp_server() as box:
        monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", box.connection_json())
        monkeypatch.setenv(
            f"AIRFLOW_VAR_{NOTIFY_EMAILS_VARIABLE.upper()}", "ops@example.com, lead@example.com"
        )
        monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example.com/af/")
        yield box


def test_without_the_variable_nothing_is_sent_and_the_log_says_why(monkeypatch, caplog):
    with smtp_server() as box:
        monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", box.connection_json())
        monkeypatch.delenv(f"AIRFLOW_VAR_{NOTIFY_EMAILS_VARIABLE.upper()}", raising=False)
        with caplog.at_level(logging.INFO, logger="airloom.airflow.notify"):
            AirloomNotifier("task_failed")(_context("train", exception=RuntimeError("boom")))
        assert box.mails == []
    (record,) = [r for r in caplog.records if r.name == "airloom.airflow.notify"]
    assert record.levelno == logging.INFO
    assert "not configured" in record.getMessage() and NOTIFY_EMAILS_VARIABLE in record.getMessage()


def test_recipients_are_split_on_commas_semicolons_and_spaces(monkeypatch):
    monkeypatch.setenv(
        f"AIRFLOW_VAR_{NOTIFY_EMAILS_VARIABLE.upper()}", " a@x.org,b@y.org; c@z.org  d@w.org ,"
    )
    assert notify_recipients() == ["a@x.org", "b@y.org", "c@z.org", "d@w.org"]
    monkeypatch.setenv(f"AIRFLOW_VAR_{NOTIFY_EMAILS_VARIABLE.upper()}", " ")
    assert notify_recipients() == []


def test_signoff_requested_mails_the_signoff_page_of_the_run(mailbox, registry, model_dir, make_context):
    from airloom.airflow.operators.registry import RegisterModelOperator

    register = RegisterModelOperator(task_id="register_candidate", model_name="bot", model_dir=str(model_dir))
    result = register.execute(make_context(user="trainer", task_id="register_candidate"))
    AirloomNotifier("signoff_requested")(_context("register_candidate", task=register, return_value=result))
    (mail,) = mailbox.mails
    assert mail.recipients == ["ops@example.com", "lead@example.com"]
    assert mail.sender == "airloom@example.com"  # the connection's from_email
    assert mail.subject == "[Airloom] bot/1 waits for your sign-off"
    url = (
        "https://airflow.example.com/af/airloom/signoff?dag_id=llm_finetune"
        "&run_id=manual__2026-01-02T03%3A04%3A05%2B00%3A00"
    )
    assert signoff_url("llm_finetune", RUN_ID) == url
    body = html.unescape(mail.html)
    assert f'<a href="{url}">Sign-off page</a>' in body
    assert "the sign-off was requested by trainer, who may not approve it" in body


def test_the_signoff_route_is_the_plugins():
    # No mailbox fixture: Airflow fixes its URL root when the plugin's module is first imported, and
    # that fixture's base_url would then leak into the sign-off server tests that run after this one.
    from airloom.airflow.signoff_ui import URL_PREFIX

    assert SIGNOFF_ROUTE == f"{URL_PREFIX}/signoff"


def test_gate_failed_links_the_report_and_escapes_the_error(mailbox, _airloom_home):
    report = _airloom_home / "runs" / "llm_finetune" / "r" / "quality_gates" / "report.html"
    error = RuntimeError("quality gate failed: exact_match 0.1 < 0.3 <script>")
    AirloomNotifier("gate_failed")(_context("quality_gates", exception=error, report=str(report)))
    (mail,) = mailbox.mails
    assert mail.subject == "[Airloom] quality gate failed in llm_finetune"
    assert "exact_match 0.1 &lt; 0.3 &lt;script&gt;" in mail.html  # the error is text, not markup
    assert (
        "https://airflow.example.com/af/airloom/files/runs/llm_finetune/r/quality_gates/report.html"
        in mail.html
    )


def test_canary_failed_says_production_was_not_moved(mailbox):
    from airloom.airflow.operators.registry import CanaryOperator

    canary = CanaryOperator(task_id="canary", model_name="bot", alias="canary", dataset_file="test.jsonl")
    error = RuntimeError(
        "canary: bot/3 (bot@canary) empty output for every prompt; failing prompts: 1. 'Sky?'"
    )
    AirloomNotifier("canary_failed")(_context("canary", task=canary, exception=error))
    (mail,) = mailbox.mails
    assert mail.subject == "[Airloom] canary failed: bot@canary"
    body = html.unescape(mail.html)
    assert "bot@production was not moved" in body and "1. 'Sky?'" in body


@pytest.mark.parametrize(
    ("event", "subject"),
    [
        ("expired", "[Airloom] sign-off of bot/1 overdue"),
        ("rejected", "[Airloom] sign-off of bot/1 ended: not deployed"),
    ],
)
def test_signoff_overdue_follows_the_sensors_own_expiry(mailbox, registry, model_dir, event, subject):
    """The sensor's timeout path (its trigger's "expired" event) raises; its failure callback mails."""
    from airflow.sdk.exceptions import AirflowFailException

    from airloom.airflow.sensors.registry import ModelSignOffSensor

    registry.register("bot", model_dir, metadata={}, actor="trainer")
    sensor = ModelSignOffSensor(task_id="wait_for_signoff", model_name="bot", version=1, timeout=60)
    signoff = {"rejections": [{"user": "reviewer", "comment": "too slow"}]}
    with pytest.raises(AirflowFailException) as failed:
        sensor.execute_complete({}, {"status": event, "signoff": signoff})
    AirloomNotifier("signoff_overdue")(_context("wait_for_signoff", task=sensor, exception=failed.value))
    (mail,) = mailbox.mails
    assert mail.subject == subject
    assert "https://airflow.example.com/af/airloom/signoff?dag_id=llm_finetune" in html.unescape(mail.html)
    assert str(failed.value).split(";")[0] in html.unescape(mail.html)


def test_retraining_requested_says_why_and_on_what(mailbox):
    decision = {
        "retrain": True,
        "reasons": ["psi_prompt_length 0.41 > 0.25", "negative_rate 0.5 > 0.3"],
        "dashboard": "/elsewhere/dashboard.html",  # outside AIRLOOM_HOME: no link
        "reference": {"dataset": "demo@3", "source": "model lineage"},
    }
    AirloomNotifier("retraining_requested")(_context("request_retraining", return_value=decision))
    (mail,) = mailbox.mails
    assert mail.subject == "[Airloom] retraining requested by llm_finetune"
    body = html.unescape(mail.html)
    assert "- psi_prompt_length 0.41 > 0.25\n- negative_rate 0.5 > 0.3" in body
    assert "trains on demo@latest" in body and "dashboard" not in body.lower().split("sent by")[0]


def test_task_failed_links_the_log(mailbox):
    AirloomNotifier("task_failed")(_context("train", exception=RuntimeError("out of memory")))
    (mail,) = mailbox.mails
    assert mail.subject == "[Airloom] llm_finetune.train failed"
    assert "http://airflow.example.com/dags/llm_finetune/runs/r/tasks/train" in mail.html
    assert "out of memory" in mail.html


def test_a_mail_that_cannot_be_sent_is_logged_and_changes_nothing(monkeypatch, caplog):
    with smtp_server() as box:
        closed = box.connection_json()
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", closed)  # the server is gone: connection refused
    monkeypatch.setenv(f"AIRFLOW_VAR_{NOTIFY_EMAILS_VARIABLE.upper()}", "ops@example.com")
    with caplog.at_level(logging.INFO, logger="airloom.airflow.notify"):
        AirloomNotifier("task_failed")(_context("train", exception=RuntimeError("boom")))  # does not raise
    (record,) = [r for r in caplog.records if r.name == "airloom.airflow.notify"]
    assert record.levelno == logging.ERROR
    assert "task_failed to ops@example.com not sent through connection 'smtp_default'" in record.getMessage()


def test_an_unknown_event_is_refused_when_the_dag_is_parsed():
    with pytest.raises(
        ValueError, match="unknown Airloom notification event 'gate_fail'; known: signoff_requested"
    ):
        AirloomNotifier("gate_fail")
    assert len(EVENTS) == 6
