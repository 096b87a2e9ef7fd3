"""Monitoring when workers share no disk (issue #17): ``airloom serve`` logs traffic and feedback to the
artifact store on S3 (moto's server) in batched objects, and ``DriftMonitorOperator``, on a worker with an
empty AIRLOOM_HOME of its own (the producer's deleted first), reads the day from the store, stages the
training reference that the data DAG published, publishes its outputs and hands over URIs only."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from airflow.sdk.execution_time.context import OutletEventAccessors

from airloom.airflow.assets import FEEDBACK_DATASET, RETRAINING_REQUEST
from airloom.airflow.operators.monitoring import (
    DriftMonitorOperator,
    PublishFeedbackDatasetOperator,
    RequestRetrainingOperator,
)
from airloom.artifacts import Artifacts
from airloom.registry.store import S3Store

DQ_RUN = "manual__2026-11-01T00:00:00+00:00"
SAFE_DQ_RUN = "manual__2026-11-01T00_00_00_00_00"
DS = "2026-11-03"


@pytest.fixture
def remote(tmp_path, moto_bucket, moto_endpoint, monkeypatch, aws_default_on_moto) -> SimpleNamespace:
    """The artifact store on moto under a prefix of its own; the aws_default connection points there.
    ``worker(name)`` makes a fresh AIRLOOM_HOME the current one, deleting the one before."""
    store = f"s3://{moto_bucket}/mon-{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv("AIRLOOM_ARTIFACTS", store)
    monkeypatch.delenv("AIRLOOM_USER", raising=False)
    homes: list[Path] = []

    def worker(name: str) -> Path:
        if homes:
            shutil.rmtree(homes[-1])
        home = tmp_path / name
        home.mkdir()
        monkeypatch.setenv("AIRLOOM_HOME", str(home))
        homes.append(home)
        return home

    def consumer() -> Path:
        """The monitoring worker: it reaches S3 only through the connection (no AWS_ENDPOINT_URL)."""
        home = worker("monitor")
        monkeypatch.delenv("AWS_ENDPOINT_URL")
        return home

    def artifacts() -> Artifacts:
        """The store as the test reads it (with the endpoint, whatever the environment holds)."""
        import boto3

        return Artifacts(store, client=boto3.client("s3", endpoint_url=moto_endpoint))

    return SimpleNamespace(
        store=store,
        bucket=moto_bucket,
        prefix=store.split("/", 3)[3],
        worker=worker,
        consumer=consumer,
        homes=homes,
        artifacts=artifacts,
    )


def _publish_training_data(home: Path) -> dict[str, str]:
    """What llm_data_quality publishes: the prepared split and eda_report's profile.json (their URIs)."""
    from airloom.data.eda import build_profile
    from airloom.data.synth import generate_records
    from airloom.prompts import render_prompt
    from airloom.settings import run_dir

    records = list(generate_records(300, seed=0))
    prepare = run_dir("llm_data_quality", DQ_RUN, "prepare")
    prepare.mkdir(parents=True)
    (prepare / "train.jsonl").write_text(
        "".join(
            json.dumps({**r, "prompt": render_prompt(r["instruction"], r["input"])}) + "\n" for r in records
        )
    )
    eda = run_dir("llm_data_quality", DQ_RUN, "eda_report")
    build_profile(records, eda, near_duplicate_threshold=None)
    artifacts = Artifacts()
    return {"prepare": artifacts.publish(prepare), "eda": artifacts.publish(eda)}


def _strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def _assert_only_uris(value: Any, remote) -> None:
    strings = _strings(value)
    assert not [s for s in strings if s.startswith("/") or any(str(h) in s for h in remote.homes)], strings
    assert any(s.startswith(remote.store + "/") for s in strings)


def _monitor(remote, **kwargs) -> DriftMonitorOperator:
    return DriftMonitorOperator(
        **{
            "task_id": "drift_and_feedback",
            "ds": DS,
            # the DAG form's defaults in production (airloom.airflow.defaults): the store's data/
            "traffic_uri": f"{remote.store}/data/traffic",
            "feedback_uri": f"{remote.store}/data/feedback",
            "corrections_uri": f"{remote.store}/data/feedback_datasets",
            "reference_file": None,
            "model_name": None,
            **kwargs,
        }
    )


def _context(make_context) -> dict[str, Any]:
    context = make_context(task_id="drift_and_feedback")
    context["ti"].dag_id = "llm_feedback_monitoring"
    context["outlet_events"] = OutletEventAccessors()
    return context


def _served(n: int, seed: int) -> list[dict]:
    from airloom.data.synth import generate_records
    from airloom.prompts import render_prompt

    return [
        {
            "id": f"cmpl-{seed}-{i}",
            "response_id": f"cmpl-{seed}-{i}",
            "model": "tiny/1",
            "prompt": render_prompt(r["instruction"], r["input"]),
            "response": r["response"],
            "latency_ms": 12.5,
        }
        for i, r in enumerate(generate_records(n, seed=seed))
    ]


def test_monitoring_reads_the_day_and_the_reference_from_the_store(remote, make_context, monkeypatch):
    from datetime import UTC, datetime

    from airloom.serving.logs import Batching, FeedbackLog, TrafficLog

    when = datetime.fromisoformat(f"{DS}T10:00:00+00:00").astimezone(UTC)
    producer = remote.worker("serve-and-data")
    published = _publish_training_data(producer)
    traffic = TrafficLog(f"{remote.store}/data/traffic", batching=Batching(records=16))
    feedback = FeedbackLog(f"{remote.store}/data/feedback", batching=Batching(records=16))
    served = _served(40, seed=3)
    for r in served:
        traffic.write([r], when)
    for i, r in enumerate(served[:10]):  # 8 of 10 thumbs down, two corrected answers
        fb = {"id": f"fb-{i}", "response_id": r["response_id"], "rating": -1 if i < 8 else 1}
        fb.update(prompt=r["prompt"], response=r["response"], model=r["model"])
        if i < 2:
            fb["corrected_answer"] = f"The right answer is {i}."
        feedback.write(fb, when)
    traffic.close()
    feedback.close()

    remote.consumer()
    dataset = {"path": published["prepare"], "ref": "demo@1", "dag_id": "llm_data_quality", "run_id": DQ_RUN}
    monkeypatch.setattr(
        DriftMonitorOperator,
        "_training_dataset",
        lambda self, traffic: (dict(dataset), {"source": "served model tiny/1's lineage"}),
    )
    context = _context(make_context)
    out = _monitor(remote).execute(context)
    _assert_only_uris(out, remote)
    runs = f"{remote.store}/runs/llm_feedback_monitoring/manual__2026-01-02T03_04_05_00_00/drift_and_feedback"
    assert out["report"] == f"{runs}/monitoring.json" and out["dashboard"] == f"{runs}/dashboard.html"
    assert out["retrain"] is True and "negative feedback rate 0.80 > 0.3" in out["reasons"]

    # What another machine reads: the published report (manifest-verified), naming URIs only
    artifacts = remote.artifacts()
    report = json.loads(Path(artifacts.stage(out["report"])).read_text())
    assert report["serving"]["outputs"] == 40 and report["feedback_rows"] == 10
    assert (report["reference_rows"], report["current_rows"]) == (300, 40)  # the staged train split
    drift = report["input_drift"]
    assert drift["reference_profile"] == f"{published['eda']}/profile.json"  # eda_report's, from the store
    assert drift["reference_rows"] == 300 and drift["current_rows"] == 40
    _assert_only_uris(report["input_drift"], remote)
    assert "Input drift vs. training data (300 rows" in Path(artifacts.stage(out["dashboard"])).read_text()
    assert "<html" in Path(artifacts.stage(drift["report"])).read_text().lower()  # the traffic's EDA report

    corrected = out["feedback_dataset"]
    assert corrected["path"] == f"{remote.store}/data/feedback_datasets/ds={DS}/instructions.jsonl"
    rows = [json.loads(line) for line in Path(artifacts.stage(corrected["path"])).read_text().splitlines()]
    assert sorted(r["response"] for r in rows) == ["The right answer is 0.", "The right answer is 1."]
    assert corrected["rows"] == 2 and out["corrected_dataset"] == corrected["path"]

    # The asset events carry the URIs on
    PublishFeedbackDatasetOperator(
        task_id="publish_feedback_dataset", decision=out, outlets=[FEEDBACK_DATASET]
    ).execute(context)
    RequestRetrainingOperator(
        task_id="request_retraining", decision=out, outlets=[RETRAINING_REQUEST]
    ).execute(context)
    assert context["outlet_events"][FEEDBACK_DATASET].extra["path"] == corrected["path"]
    assert context["outlet_events"][RETRAINING_REQUEST].extra["report"] == out["report"]
    assert context["outlet_events"][RETRAINING_REQUEST].extra["dataset"] == "demo@latest"

    # A rerun whose day has no corrections any more takes the old version out of the store
    assert artifacts.store.delete_prefix(f"data/feedback/ds={DS}/") == 1
    late = FeedbackLog(f"{remote.store}/data/feedback", client=artifacts.store.client)
    late.write({"id": "fb-x", "response_id": served[0]["response_id"], "rating": 1}, when)
    late.close()
    again = _monitor(remote).execute(_context(make_context))
    assert again["feedback_dataset"]["path"] is None
    assert artifacts.list(f"data/feedback_datasets/ds={DS}/") == []


def test_a_missing_day_skips_naming_the_store(remote, make_context):
    from airflow.sdk.exceptions import AirflowSkipException

    remote.consumer()
    with pytest.raises(
        AirflowSkipException, match=rf"no traffic partition {remote.store}/data/traffic/ds={DS}"
    ):
        _monitor(remote).execute(_context(make_context))


async def _post_many(url: str, path: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        return await asyncio.gather(*(client.post(path, json=b) for b in bodies))


def test_airloom_serve_logs_to_the_store_and_monitoring_reads_it_elsewhere(remote, make_context, tmp_path):
    """`airloom serve` with AIRLOOM_ARTIFACTS=s3://… (no --traffic-dir): 16 requests in batches of 5 make
    3 objects while it serves and a 4th on SIGTERM; 4 feedback posts, below a batch, one on shutdown. Then
    the monitor, on another worker, reads them."""
    from airloom.data.synth import generate_records
    from airloom.prompts import render_prompt
    from tests.serving_helpers import NAME, airloom_serve, register_two_versions

    producer = remote.worker("serve")
    published = _publish_training_data(producer)
    register_two_versions(producer, "monitoring from the store")
    env = {**os.environ}
    argv = ["serve", "--model", f"{NAME}@production", "--registry", str(producer / "registry")]
    argv += ["--torch-threads", "1", "--batch-wait-ms", "20", "--log-batch-records", "5"]
    argv += ["--log-batch-seconds", "3600"]  # only size and shutdown cut a batch here
    store = S3Store(remote.bucket, remote.prefix)
    records = list(generate_records(16, seed=7))
    with airloom_serve(argv, log=tmp_path / "serve.log", env=env) as server:
        assert f"traffic to {remote.store}/data/traffic" in server.output()
        bodies = [
            {"model": NAME, "prompt": render_prompt(r["instruction"], r["input"]), "max_tokens": 6}
            for r in records[:12]
        ]
        chats = [
            {"model": NAME, "messages": [{"role": "user", "content": r["instruction"]}], "max_tokens": 6}
            for r in records[12:]
        ]
        done = asyncio.run(_post_many(server.url, "/v1/completions", bodies))
        done += asyncio.run(_post_many(server.url, "/v1/chat/completions", chats))
        assert [r.status_code for r in done] == [200] * 16, [r.text for r in done]
        ids = [r.json()["id"] for r in done]
        feedback = [{"response_id": i, "rating": "down"} for i in ids[:3]]
        feedback[0]["corrected_answer"] = records[0]["response"]
        feedback.append({"response_id": ids[3], "rating": "up"})
        posted = asyncio.run(_post_many(server.url, "/v1/feedback", feedback))
        assert [r.status_code for r in posted] == [201] * 4, [r.text for r in posted]
        # three full batches are written while it serves; the 16th record and the feedback wait
        health = server.until(
            lambda: (
                (h := httpx.get(server.url + "/healthz").json())["traffic_log"]["records_written"] == 15 and h
            ),
            60,
            "three batches of traffic written",
        )
        assert (
            health["traffic_log"]["objects_written"] == 3 and health["traffic_log"]["pending"]["records"] == 1
        )
        assert len(store.list("data/traffic/")) == 3 and store.list("data/feedback/") == []
        assert "airloom_log_objects_written_total" in httpx.get(server.url + "/metrics").text
    assert server.proc.returncode is not None
    traffic_keys = store.list("data/traffic/")
    days = {k.split("/")[2] for k in traffic_keys}
    if len(days) == 1:  # (a run across midnight UTC cuts one more batch)
        assert len(traffic_keys) == 4, traffic_keys
    assert sum(len(store.get_bytes(k).splitlines()) for k in traffic_keys) == 16
    (fb_key,) = store.list("data/feedback/")
    assert len(store.get_bytes(fb_key).splitlines()) == 4
    ds = fb_key.split("/")[2].removeprefix("ds=")

    remote.consumer()  # the server's machine is gone: its home, registry and model with it
    assert not producer.exists()
    out = _monitor(
        remote,
        ds=ds,
        reference_file=f"{published['prepare']}/train.jsonl",
        reference_profile=f"{published['eda']}/profile.json",
    ).execute(_context(make_context))
    _assert_only_uris(out, remote)
    report = json.loads(Path(remote.artifacts().stage(out["report"])).read_text())
    if len(days) == 1:
        assert report["serving"]["models"] == {f"{NAME}/1": 16}
    assert (report["thumbs_down"], report["thumbs_up"]) == (3, 1)
    assert report["input_drift"]["reference_profile"] == f"{published['eda']}/profile.json"
    assert report["reference_rows"] == 300
    assert out["feedback_dataset"]["rows"] == 1
