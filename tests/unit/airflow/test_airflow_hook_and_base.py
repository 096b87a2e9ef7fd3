"""RegistryHook (local and S3 via an Airflow connection) and the shared operator helpers in _base."""

from __future__ import annotations

import asyncio
import getpass
import json
import time
from pathlib import Path

import pytest

from airloom.airflow.hooks.registry import RegistryHook
from airloom.airflow.operators._base import (
    AirloomBaseOperator,
    number,
    push_outputs,
    task_output_dir,
    triggering_user,
)
from airloom.airflow.triggers.registry import SignOffTrigger
from airloom.governance.signoff import record_decision, request_signoff
from airloom.registry.store import LocalStore, S3Store


def test_hook_defaults_to_airloom_registry(airloom_env, monkeypatch):
    hook = RegistryHook()
    assert hook.uri == str(airloom_env / "registry")
    assert isinstance(hook.registry.store, LocalStore)
    assert hook.registry.store.root == (airloom_env / "registry").resolve()
    assert hook.registry is hook.registry  # opened once per hook

    monkeypatch.delenv("AIRLOOM_REGISTRY")
    assert RegistryHook().uri == str((airloom_env / "home").resolve() / "registry")


def test_hook_explicit_local_uri_wins(airloom_env, tmp_path):
    hook = RegistryHook(registry_uri=str(tmp_path / "elsewhere"))
    assert hook.uri == str(tmp_path / "elsewhere")
    assert hook.get_conn().store.root == (tmp_path / "elsewhere").resolve()


@pytest.fixture
def minio(monkeypatch):
    """A real S3 API (moto over HTTP) reachable only through the Airflow connection's endpoint_url."""
    from moto.server import ThreadedMotoServer

    for key in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        _, port = server.get_host_and_port()
        endpoint = f"http://127.0.0.1:{port}"
        conn = {"conn_type": "aws", "extra": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        monkeypatch.setenv("AIRFLOW_CONN_MINIO", json.dumps(conn))
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="models")
        yield endpoint
    finally:
        server.stop()


def test_hook_s3_uses_the_connection_and_the_trigger_waits_on_it(minio, model_dir):
    hook = RegistryHook(registry_uri="s3://models/team/registry", aws_conn_id="minio")
    registry = hook.registry
    assert isinstance(registry.store, S3Store)
    assert registry.store.client.meta.endpoint_url == minio
    mv = registry.register("bot", model_dir, metadata={}, actor="trainer")
    assert mv.uri == "s3://models/team/registry/models/bot/versions/1"
    request_signoff(registry, "bot", 1, requested_by="trainer", evidence={})
    record_decision(registry, "bot", 1, user="reviewer", decision="approve")

    trig = SignOffTrigger(
        registry_uri="s3://models/team/registry",
        aws_conn_id="minio",
        model_name="bot",
        version=1,
        policy={},
        poll_interval=0.05,
        deadline=time.time() + 30,
    )
    event = asyncio.run(asyncio.wait_for(anext(trig.run()), 10))
    assert event.payload["status"] == "approved"


def test_task_output_dir_is_per_run_and_task(airloom_env, make_context):
    home = (airloom_env / "home").resolve()
    ctx = make_context(task_id="drift")
    assert (
        task_output_dir(ctx) == home / "runs" / "llm_finetune" / "manual__2026-01-02T03_04_05_00_00" / "drift"
    )
    mapped = make_context(task_id="eval", map_index=3)
    assert task_output_dir(mapped).parts[-2:] == ("eval", "3")
    assert task_output_dir(ctx, "/explicit/out") == Path("/explicit/out")


def test_triggering_user_falls_back_to_airloom_user_then_os_user(airloom_env, monkeypatch, make_context):
    assert triggering_user(make_context(user="ann")) == "ann"
    assert triggering_user(make_context(user=None)) == getpass.getuser()
    assert triggering_user({"ti": None}) == getpass.getuser()  # no dag_run at all (dags test, CLI)
    monkeypatch.setenv("AIRLOOM_USER", "svc-airloom")
    assert triggering_user(make_context(user=None)) == "svc-airloom"
    assert triggering_user(make_context(user="ann")) == "ann"


def test_push_outputs_pushes_each_key_and_returns_result(context):
    result = {"name": "bot", "version": 2}
    assert push_outputs(context, result) is result
    assert context["ti"].pushed == [("name", "bot"), ("version", 2)]


def test_base_operator_gives_the_registry_hook_client_and_output_folder(airloom_env, tmp_path, make_context):
    op = AirloomBaseOperator(task_id="t", registry_uri=str(tmp_path / "elsewhere"), aws_conn_id="minio")
    assert (op.hook.uri, op.hook.aws_conn_id) == (str(tmp_path / "elsewhere"), "minio")
    assert op.hook is op.hook  # built once, on first use in execute
    assert AirloomBaseOperator(task_id="t").hook.uri == str(airloom_env / "registry")
    assert op.s3_client(str(tmp_path / "data.jsonl")) is None  # a local path needs no connection
    assert op.output_folder(make_context(task_id="t")) == task_output_dir(make_context(task_id="t"))
    assert AirloomBaseOperator(task_id="t", output_dir="/explicit").output_folder({}) == Path("/explicit")


def test_number_converts_once_and_names_the_field():
    from airflow.sdk.exceptions import AirflowFailException

    assert (number(3, "n"), number("3", "n"), number(0.5, "x", float), number("1e-3", "x", float)) == (
        3,
        3,
        0.5,
        1e-3,
    )
    assert number(None, "limit", optional=True) is None
    for value, kind, optional, says in (
        ("None", int, True, "limit must be an integer or None, got 'None'"),
        (None, int, False, "limit must be an integer, got None"),
        (2.5, int, False, "limit must be an integer, got 2.5"),
        (True, float, False, "limit must be a number, got True"),
    ):
        with pytest.raises(AirflowFailException, match=f"^{says}$"):
            number(value, "limit", kind, optional=optional)
