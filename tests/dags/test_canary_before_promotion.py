"""Canary before promotion, and its mail, on real DAG runs: ``dag.test()`` of llm_finetune's tail (register →
a reviewer approves → sign-off sensor → deploy to ``canary`` → canary → promote to ``production``), with
llm_finetune's own operators, arguments and notifiers, in a child process with its own Airflow home, the
SMTP connection and the recipients Variable given as environment variables, and a real SMTP server
(aiosmtpd) in this process.

The first run registers a model that answers: it reaches ``production``. The second registers one that
answers nothing: its canary fails, naming the prompts, ``production`` stays where the first run put it
(its history shows no move), and the mail says so.
"""

from __future__ import annotations

import html
import json
import os
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from airloom.airflow.notify import NOTIFY_EMAILS_VARIABLE, AirloomNotifier, signoff_url
from tests.mailbox import smtp_server
from tests.script_result import run_script
from tests.unit.evaluation.conftest import tiny_model_dir  # noqa: F401  (the session's tiny Llama)

REPO = Path(__file__).resolve().parents[2]
TAIL = ("register_candidate", "wait_for_signoff", "deploy", "canary", "promote")
TEST_SPLIT = [
    {"instruction": "What is the capital of France?", "input": "", "response": "Paris", "task": "qa"},
    {"instruction": "Add the numbers.", "input": "17 and 25", "response": "42", "task": "math"},
    {"instruction": "Name a primary colour.", "input": "", "response": "Red", "task": "qa"},
]

# llm_finetune's tail, as the DAG file wires it; a task answers for the reviewer before the sensor pokes.
DAG_FILE = """
from datetime import datetime

from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk import DAG

from airloom.airflow.defaults import SIGNOFF_POLICY_TEMPLATED
from airloom.airflow.notify import AirloomNotifier
from airloom.airflow.operators.registry import CanaryOperator, DeployModelOperator, RegisterModelOperator
from airloom.airflow.sensors.registry import ModelSignOffSensor


def reviewer_approves(version):
    from airloom.governance.signoff import record_decision
    from airloom.registry.registry import ModelRegistry
    from airloom.settings import registry_uri

    registry = ModelRegistry.from_uri(registry_uri())
    record_decision(registry, "bot", int(version), user="reviewer", decision="approve", comment="reviewed")


def tail(dag_id, model_dir):
    default_args = {{"owner": "airloom", "retries": 0, "on_failure_callback": AirloomNotifier("task_failed")}}
    with DAG(dag_id, schedule=None, start_date=datetime(2026, 1, 1), default_args=default_args,
             render_template_as_native_obj=True) as dag:
        register = RegisterModelOperator(task_id="register_candidate", model_name="bot", model_dir=model_dir,
                                         on_success_callback=AirloomNotifier("signoff_requested"))
        version = register.output["version"]
        approve = PythonOperator(task_id="reviewer_approves", python_callable=reviewer_approves, op_args=[version])
        signoff = ModelSignOffSensor(task_id="wait_for_signoff", model_name="bot", version=version,
                                     policy=SIGNOFF_POLICY_TEMPLATED, poll_interval=1, timeout=60,
                                     on_failure_callback=AirloomNotifier("signoff_overdue"))
        deploy = DeployModelOperator(task_id="deploy", model_name="bot", version=version, alias="canary",
                                     require_approval=True, policy=SIGNOFF_POLICY_TEMPLATED)
        canary = CanaryOperator(task_id="canary", model_name="bot", alias="canary", version=version,
                                dataset_file={test_split!r}, on_failure_callback=AirloomNotifier("canary_failed"))
        promote = DeployModelOperator(task_id="promote", model_name="bot", version=version, alias="production",
                                      policy=SIGNOFF_POLICY_TEMPLATED)
        register >> approve >> signoff >> deploy >> canary >> promote
    return dag


answers = tail("canary_passes", {good!r})
silent = tail("canary_fails", {silent!r})
"""

RUN_BOTH = """
import json, runpy, sys

dags = runpy.run_path(sys.argv[1])
out = {}
for name in ("answers", "silent"):
    run = dags[name].test()
    out[dags[name].dag_id] = {"run_id": run.run_id, "states": {ti.task_id: str(ti.state) for ti in run.get_task_instances()}}
print("RESULT " + json.dumps(out))
"""


def _events(task) -> dict[str, str | None]:
    """The Airloom events a task's callbacks mail."""

    def event(callbacks):
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks] if callbacks else []
        found = [c.event for c in callbacks if isinstance(c, AirloomNotifier)]
        return found[0] if found else None

    return {"success": event(task.on_success_callback), "failure": event(task.on_failure_callback)}


def _shape(task) -> tuple:
    return (
        type(task).__name__,
        getattr(task, "alias", None),
        getattr(task, "require_approval", None),
        repr(getattr(task, "policy", None)),
        _events(task),
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):  # noqa: F811 - the fixture imported above
    from tests.unit.airflow.test_airflow_canary import silenced

    root = tmp_path_factory.mktemp("canary_dag")
    split = root / "test.jsonl"
    split.write_text("".join(json.dumps(r) + "\n" for r in TEST_SPLIT))
    silent = silenced(tiny_model_dir, root / "silent")
    (root / "dags").mkdir()
    dag_file = root / "dags" / "airloom_canary_tail.py"
    dag_file.write_text(
        textwrap.dedent(DAG_FILE).format(test_split=str(split), good=str(tiny_model_dir), silent=str(silent))
    )
    with smtp_server() as mailbox:
        env = {
            **os.environ,
            "AIRLOOM_HOME": str(root / "airloom"),
            "AIRLOOM_USER": "trainer",  # dag.test() runs have no triggering user
            "AIRFLOW_HOME": str(root / "airflow"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(root / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__API__BASE_URL": "https://airflow.example.com",
            "AIRFLOW_CONN_SMTP_DEFAULT": mailbox.connection_json(),
            f"AIRFLOW_VAR_{NOTIFY_EMAILS_VARIABLE.upper()}": "ops@example.com",
            "PYTHONPATH": str(REPO),
        }
        env.pop("AIRLOOM_REGISTRY", None)
        subprocess.run(
            [sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True, env=env
        )
        result = run_script(RUN_BOTH, str(dag_file), env=env)
        mails = list(mailbox.wait_for(3))
    from airloom.registry.registry import ModelRegistry

    registry = ModelRegistry.from_uri(root / "airloom" / "registry")
    return result, mails, registry, dag_file


def test_the_tail_is_llm_finetunes(runs):
    """The DAG run here wires the same operators, aliases, policy and notifiers as llm_finetune."""
    from airflow.dag_processing.dagbag import DagBag

    finetune = DagBag(dag_folder=str(REPO / "dags" / "llm_finetune.py")).dags["llm_finetune"]
    tail = runpy.run_path(str(runs[3]))["answers"]
    for task_id in TAIL:
        assert _shape(tail.get_task(task_id)) == _shape(finetune.get_task(task_id)), task_id
    assert _events(finetune.get_task("quality_gates")) == {"success": None, "failure": "gate_failed"}
    assert _events(finetune.get_task("train")) == {"success": None, "failure": "task_failed"}


def test_a_canary_that_answers_lets_the_version_reach_production(runs):
    result, _, registry, _ = runs
    assert set(result["canary_passes"]["states"].values()) == {"success"}, result
    assert registry.get_alias("bot", "production") == 1


def test_a_failed_canary_leaves_production_where_it_was(runs):
    result, _, registry, _ = runs
    states = result["canary_fails"]["states"]
    assert (states["deploy"], states["canary"], states["promote"]) == ("success", "failed", "upstream_failed")
    assert registry.get_alias("bot", "production") == 1
    assert registry.get_alias("bot", "canary") == 2
    moves = [(h["alias"], h["from"], h["to"]) for h in registry.history("bot") if h.get("action") == "alias"]
    assert [m for m in moves if m[0] == "production"] == [
        ("production", None, 1)
    ]  # version 2 never got there
    assert ("canary", 1, 2) in moves


def test_mail_for_each_signoff_request_and_for_the_failed_canary(runs, monkeypatch):
    result, mails, _, _ = runs
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example.com")  # as the run had it
    assert [m.subject for m in mails] == [
        "[Airloom] bot/1 waits for your sign-off",
        "[Airloom] bot/2 waits for your sign-off",
        "[Airloom] canary failed: bot@canary",
    ]
    assert all(m.recipients == ["ops@example.com"] for m in mails)
    for mail, dag_id in zip(mails[:2], ("canary_passes", "canary_fails"), strict=True):
        url = signoff_url(dag_id, result[dag_id]["run_id"])
        assert url.startswith(f"https://airflow.example.com/airloom/signoff?dag_id={dag_id}&run_id=")
        assert f'<a href="{url}">Sign-off page</a>' in html.unescape(mail.html)
        assert "requested by trainer, who may not approve it" in mail.html
    canary = html.unescape(mails[2].html)
    assert "bot@production was not moved" in canary
    assert (
        "failing prompts: 1. 'What is the capital of France?': empty answer; 2. 'Add the numbers. 17 and 25'"
        in canary
    )
    assert "/airloom/files/runs/canary_fails/" in canary  # the canary's answers, linked
