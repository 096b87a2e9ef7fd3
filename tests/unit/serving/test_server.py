"""The model server on a tiny registered model: uvicorn on 127.0.0.1, real HTTP shaped like the
``openai`` Python client's, batching, feedback, the PII-masked traffic log and alias reloads.

One server (module scope) serves ``tiny@production``; the alias-move test runs last because it
changes what the server serves.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.serving_helpers import (
    NAME,
    REPO,
    airloom_serve,
    held_batches,
    register_two_versions,
    uvicorn_thread,
)

API_KEY = "sk-test"  # the module server's one key, sent by OPENAI_HEADERS
# What openai-python 1.x sends besides the body (it identifies itself and always sends a key).
OPENAI_HEADERS = {
    "Authorization": "Bearer sk-test",
    "Content-Type": "application/json",
    "Accept": "application/json",
    "User-Agent": "OpenAI/Python 1.109.1",
    "X-Stainless-Lang": "python",
}


@pytest.fixture(scope="module")
def registry_with_two_versions(tmp_path_factory):
    """A random-weight tiny Llama (no pre-training: seconds, not minutes) registered as versions 1 and 2."""
    root = tmp_path_factory.mktemp("serving")
    return root, register_two_versions(root, "serving test")


@pytest.fixture(scope="module")
def server(registry_with_two_versions):
    import torch

    from airloom.serving.app import create_app
    from airloom.serving.auth import load_api_keys
    from airloom.serving.engine import Engine

    root, reg = registry_with_two_versions
    threads = torch.get_num_threads()
    engine = Engine(
        reg,
        f"{NAME}@production",
        cache_dir=root / "cache",
        max_batch_size=16,
        batch_wait_ms=30,
        poll_seconds=0.2,
        torch_threads=1,
    )
    keys = load_api_keys(environ={"AIRLOOM_API_KEYS": f"{API_KEY},sk-other"})
    app = create_app(engine, traffic_dir=root / "traffic", feedback_dir=root / "feedback", api_keys=keys)
    try:
        with uvicorn_thread(app) as url:
            yield {"url": url, "root": root, "registry": reg, "engine": engine}
    finally:
        torch.set_num_threads(threads)


def _completion_body(prompt, **kw):
    return {"model": NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0, **kw}


async def _post_many(url: str, path: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, headers=OPENAI_HEADERS, timeout=60) as client:
        return await asyncio.gather(*(client.post(path, json=b) for b in bodies))


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server["url"] + path, json=body, headers=OPENAI_HEADERS, timeout=60)


def test_parse_model_ref():
    from airloom.exceptions import UsageError
    from airloom.serving.engine import parse_model_ref

    assert parse_model_ref("tiny@production") == ("tiny", None, "production")
    assert parse_model_ref("tiny/3") == ("tiny", 3, None)
    for bad in ("tiny", "tiny/x", "tiny/0", "Tiny@prod", "a/1@b"):
        with pytest.raises(UsageError, match="--model|invalid model name"):
            parse_model_ref(bad)


def test_verify_local_copy_names_the_corrupt_file(registry_with_two_versions, tmp_path):
    from airloom.exceptions import CheckFailed
    from airloom.serving.engine import verify_local_copy

    _, reg = registry_with_two_versions
    dest = reg.download(NAME, 1, tmp_path / "v1")
    verify_local_copy(dest)
    cfg = dest / "config.json"
    data = bytearray(cfg.read_bytes())
    data[-2] = ord(" ") if data[-2] != ord(" ") else ord("\t")  # same size: only the hash can tell
    cfg.write_bytes(bytes(data))
    with pytest.raises(CheckFailed, match=r"config\.json: sha256"):
        verify_local_copy(dest)


def test_healthz_names_the_served_version(server):
    r = httpx.get(server["url"] + "/healthz")
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == f"{NAME}/1" and body["version"] == 1 and body["serving"] == f"{NAME}@production"
    assert r.headers["x-airloom-model-version"] == f"{NAME}/1"
    models = httpx.get(server["url"] + "/v1/models", headers=OPENAI_HEADERS).json()
    assert models["object"] == "list" and models["data"][0]["id"] == f"{NAME}/1"


def test_concurrent_completions_are_batched_and_match_unbatched(server):
    prompts = [
        f"### Instruction:\nReverse the word.\n### Input:\nword{i}\n### Response:\n" for i in range(12)
    ]
    before = httpx.get(server["url"] + "/healthz").json()
    responses = asyncio.run(
        _post_many(server["url"], "/v1/completions", [_completion_body(p) for p in prompts])
    )
    for r in responses:
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
        assert isinstance(body["created"], int) and body["model"] == f"{NAME}/1"
        assert r.headers["x-airloom-model-version"] == f"{NAME}/1"
        (choice,) = body["choices"]
        assert set(choice) == {"text", "index", "logprobs", "finish_reason"}
        assert choice["finish_reason"] in ("stop", "length") and choice["index"] == 0
        usage = body["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert 0 < usage["prompt_tokens"] and 0 <= usage["completion_tokens"] <= 8
    after = httpx.get(server["url"] + "/healthz").json()
    assert after["requests"] - before["requests"] == 12
    assert after["max_batch_size_seen"] > 1, after  # concurrent requests shared a generate call
    assert after["batches"] - before["batches"] < 12
    # Left padding must not change greedy output: the same prompt alone gives the same text.
    texts = [r.json()["choices"][0]["text"] for r in responses]
    assert len(set(texts)) > 1, texts
    for i in (0, 7):
        alone = _post(server, "/v1/completions", _completion_body(prompts[i])).json()
        assert alone["choices"][0]["text"] == texts[i]


def test_max_tokens_stop_and_n(server):
    prompt = "### Instruction:\nSort the letters.\n### Input:\ndcba\n### Response:\n"
    full = _post(server, "/v1/completions", _completion_body(prompt, max_tokens=12)).json()["choices"][0]
    short = _post(server, "/v1/completions", _completion_body(prompt, max_tokens=2)).json()
    assert short["usage"]["completion_tokens"] <= 2
    assert full["text"].startswith(short["choices"][0]["text"])
    text = full["text"]
    assert len(set(text)) >= 3, text  # varied output, so the cut below means something
    k = next(i for i in range(1, len(text)) if not text[i].isspace())
    stop = text[k : k + 2]
    cut = _post(server, "/v1/completions", _completion_body(prompt, max_tokens=12, stop=["@@@", stop])).json()
    assert cut["choices"][0]["text"] == text[: text.find(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    many = _post(server, "/v1/completions", _completion_body([prompt, "Hello"], n=2)).json()
    assert [c["index"] for c in many["choices"]] == [0, 1, 2, 3]


def test_chat_completion_shape_and_alpaca_prompt(server):
    body = {
        "model": NAME,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Reverse the word.\n\nriver"},
        ],
        "max_completion_tokens": 6,
        "temperature": 0,
    }
    r = _post(server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["id"].startswith("chatcmpl-") and out["object"] == "chat.completion"
    assert out["model"] == f"{NAME}/1" and r.headers["x-airloom-model-version"] == f"{NAME}/1"
    msg = out["choices"][0]["message"]
    assert msg["role"] == "assistant" and isinstance(msg["content"], str)
    assert out["usage"]["completion_tokens"] <= 6
    # the tokenizer has no chat template, so the project's alpaca prompt was used
    from airloom.prompts import render_prompt
    from airloom.serving.logs import TrafficLog

    logged = TrafficLog(server["root"] / "traffic").find(out["id"])
    assert logged["prompt"] == render_prompt("Reverse the word.", "river")


def _openai_client(server):
    import openai

    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_openai_client_streams_completions_as_the_greedy_answer(server):
    from airloom.data.text import scrub_pii
    from airloom.serving.logs import TrafficLog

    client = _openai_client(server)
    prompt = "### Instruction:\nSort the letters.\n### Input:\ndcba\n### Response:\n"
    args = {"model": NAME, "prompt": prompt, "max_tokens": 12, "temperature": 0}
    whole = client.completions.create(**args)
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    *pieces, usage_chunk = chunks
    assert {c.id for c in chunks} == {pieces[0].id} and pieces[0].id.startswith("cmpl-")
    assert {c.object for c in chunks} == {"text_completion"} and {c.model for c in chunks} == {f"{NAME}/1"}
    assert "".join(c.choices[0].text for c in pieces) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in pieces][-1] == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in pieces[:-1]) and len(pieces) > 2  # real pieces
    assert usage_chunk.choices == [] and usage_chunk.usage == whole.usage
    logged = TrafficLog(server["root"] / "traffic").find(pieces[0].id)
    assert logged["response"] == scrub_pii(whole.choices[0].text)[0]

    # A stop string: nothing past it is streamed, even a piece that began it (held back until decided).
    text = whole.choices[0].text
    k = next(i for i in range(1, len(text)) if not text[i].isspace())
    stop = text[k : k + 2]
    cut = list(client.completions.create(**args, stop=["@@@", stop], stream=True))
    assert "".join(c.choices[0].text for c in cut) == text[: text.find(stop)]
    assert cut[-1].choices[0].finish_reason == "stop"
    # n > 1: each choice streams under its own index; no usage chunk unless asked for
    both = list(client.completions.create(**args, n=2, stream=True))
    for index in (0, 1):
        assert "".join(c.choices[0].text for c in both if c.choices[0].index == index) == text
    assert all(c.usage is None for c in both)


def test_openai_client_streams_chat_as_the_greedy_answer(server):
    from airloom.serving.logs import TrafficLog

    client = _openai_client(server)
    args = {
        "model": NAME,
        "messages": [{"role": "user", "content": "Reverse the word.\n\nriver"}],
        "max_completion_tokens": 10,
        "temperature": 0,
    }
    whole = client.chat.completions.create(**args)
    ttft_before = _value(_metrics(server["url"]), "airloom_time_to_first_token_seconds_count")
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert _value(_metrics(server["url"]), "airloom_time_to_first_token_seconds_count") == ttft_before + 1
    first, *pieces, usage_chunk = chunks
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and {c.model for c in chunks} == {
        f"{NAME}/1"
    }
    assert first.choices[0].delta.role == "assistant" and not first.choices[0].delta.content
    content = "".join(c.choices[0].delta.content or "" for c in pieces)
    assert content == whole.choices[0].message.content and content
    assert pieces[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert usage_chunk.choices == [] and usage_chunk.usage == whole.usage
    logged = TrafficLog(server["root"] / "traffic").find(first.id)
    assert logged["response"] == content


def test_stream_disconnect_stops_its_row_while_the_batch_goes_on(server, monkeypatch):
    """A streamed row and a plain request in one batch; the stream's client leaves after its first
    chunk: its row stops generating, the other row runs to max_tokens, the log marks what was sent."""
    from airloom.serving.logs import TrafficLog

    engine = server["engine"]
    max_tokens = 60
    prompt = next(
        p
        for p in (f"### Instruction:\nWrite a long story {i}.\n### Response:\n" for i in range(20))
        if _post(server, "/v1/completions", _completion_body(p, max_tokens=max_tokens)).json()["choices"][0][
            "finish_reason"
        ]
        == "length"
    )
    model = engine.current.model
    forward = model.forward

    def slow_forward(*args, **kwargs):  # ~1.2 s for the batch: time for the client to leave mid-way
        time.sleep(0.02)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", slow_forward)
    before = engine.stats()

    async def scenario():
        async with httpx.AsyncClient(base_url=server["url"], headers=OPENAI_HEADERS, timeout=60) as client:
            plain = asyncio.create_task(
                client.post("/v1/completions", json=_completion_body(prompt, max_tokens=max_tokens))
            )
            body = _completion_body(prompt, max_tokens=max_tokens, stream=True)
            async with client.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        first = json.loads(line.removeprefix("data: "))
                        break
            return first, await plain

    first, plain = asyncio.run(scenario())
    after = engine.stats()
    assert plain.status_code == 200 and plain.json()["choices"][0]["finish_reason"] == "length"
    assert plain.json()["usage"]["completion_tokens"] == max_tokens
    assert (
        after["batches"] - before["batches"] == 1 and after["cancelled_rows"] - before["cancelled_rows"] == 1
    )
    generated = after["tokens_generated"] - before["tokens_generated"]
    assert max_tokens < generated < max_tokens * 3 // 2, generated  # the cancelled row stopped early
    time.sleep(0.3)
    assert engine.stats()["tokens_generated"] == after["tokens_generated"]  # and nothing runs on
    logged = TrafficLog(server["root"] / "traffic").find(first["id"])
    assert logged is not None and first["choices"][0]["text"]
    records = [
        json.loads(line)
        for f in (server["root"] / "traffic").glob("ds=*/part-*.jsonl")
        for line in f.read_text().splitlines()
        if first["id"] in line
    ]
    (rec,) = records
    assert rec["finish_reason"] == "client_disconnected"
    assert rec["response"].startswith(first["choices"][0]["text"])
    # generated by the time the client left; the step then running adds its token before the row stops
    assert 1 <= rec["completion_tokens"] <= generated - max_tokens


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        (
            "/v1/completions",
            _completion_body("hi", stream_options={"include_usage": True}),
            400,
            "stream_options",
        ),
        ("/v1/completions", _completion_body("hi", temperature=5), 422, "temperature"),
        ("/v1/completions", _completion_body("hi", max_tokens=0), 422, "max_tokens"),
        ("/v1/completions", {"model": NAME}, 422, "prompt"),
        ("/v1/completions", _completion_body("word " * 400), 400, "prompt"),
        ("/v1/completions", {**_completion_body("hi"), "model": "gpt-4o"}, 404, "model"),
        ("/v1/chat/completions", {"model": NAME, "messages": []}, 422, "messages"),
        (
            "/v1/chat/completions",
            {"model": NAME, "messages": [{"role": "robot", "content": "x"}]},
            422,
            "messages",
        ),
    ],
)
def test_bad_requests_get_openai_errors_naming_the_field(server, path, body, status, param):
    r = _post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param
    if status == 422:
        assert err["message"].startswith(param)
    assert err["type"] in ("invalid_request_error", "not_found_error")


def test_feedback_ok_404_and_422(server):
    root = server["root"]
    done = _post(server, "/v1/completions", _completion_body("Say hi.")).json()
    ok = _post(
        server,
        "/v1/feedback",
        {
            "response_id": done["id"],
            "rating": "down",
            "corrected_answer": "hi, write to ann@example.org",
            "comment": "wrong",
        },
    )
    assert ok.status_code == 201, ok.text
    assert ok.json()["response_id"] == done["id"] and ok.json()["rating"] == -1
    stars = _post(server, "/v1/feedback", {"response_id": done["id"], "rating": 5})
    assert stars.status_code == 201 and stars.json()["rating"] == 1

    missing = _post(server, "/v1/feedback", {"response_id": "cmpl-nope", "rating": "up"})
    assert missing.status_code == 404
    assert missing.json()["error"]["param"] == "response_id"

    for body, field in [
        ({"response_id": done["id"], "rating": "meh"}, "rating"),
        ({"response_id": done["id"], "rating": 6}, "rating"),
        ({"response_id": done["id"], "rating": True}, "rating"),
        ({"rating": "up"}, "response_id"),
        ({"response_id": done["id"], "rating": "up", "stars": 3}, "stars"),
    ]:
        bad = _post(server, "/v1/feedback", body)
        assert bad.status_code == 422, (body, bad.text)
        err = bad.json()["error"]
        assert err["param"] == field and err["message"].startswith(field), err
    assert _post(server, "/v1/feedback", {"response_id": done["id"], "rating": "meh"}).json()["detail"][0][
        "loc"
    ] == ["body", "rating"]

    files = list((root / "feedback").glob("ds=*/part-*.jsonl"))
    assert len(files) == 1
    rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    first = next(r for r in rows if r["rating_raw"] == "down")
    assert first["rating"] == -1 and first["model"] == f"{NAME}/1" and first["response_id"] == done["id"]
    assert first["corrected_answer"] == "hi, write to <EMAIL>" and first["pii_masked"] == {
        "corrected_answer": {"email": 1}
    }
    assert "ann@example.org" not in files[0].read_text()
    assert sorted(r["rating"] for r in rows) == [-1, 1]


def test_traffic_partition_is_masked_and_backfill_readable(server):
    from airloom.evaluation.backfill import read_partition
    from airloom.evaluation.harness import _check_records

    prompt = "### Instruction:\nReply to jane.doe@example.com or +1 415 555 0132.\n### Response:\n"
    done = _post(server, "/v1/completions", _completion_body(prompt)).json()
    files = list((server["root"] / "traffic").glob("ds=*/part-*.jsonl"))
    assert [f.name for f in files] == [f"part-{os.getpid()}.jsonl"] * len(files) and files
    text = "".join(f.read_text() for f in files)
    assert "jane.doe@example.com" not in text and "555 0132" not in text
    assert API_KEY not in text  # no headers in the traffic log
    ds = files[0].parent.name.removeprefix("ds=")
    records = read_partition(server["root"] / "traffic", ds)
    _check_records(records)  # what llm_eval_backfill's harness demands: id, prompt, response as strings
    (rec,) = [r for r in records if r["response_id"] == done["id"]]
    assert "<EMAIL>" in rec["prompt"] and "<PHONE>" in rec["prompt"]
    assert rec["pii_masked"] == {"prompt": {"email": 1, "phone": 1}}
    from airloom.data.text import scrub_pii

    assert rec["response"] == scrub_pii(done["choices"][0]["text"])[0]
    assert rec["model"] == f"{NAME}/1" and rec["model_version"] == 1 and rec["latency_ms"] > 0
    assert rec["prompt_tokens"] == done["usage"]["prompt_tokens"]
    assert rec["completion_tokens"] == done["usage"]["completion_tokens"]
    assert len({r["id"] for r in records}) == len(records)


def test_monitoring_over_the_logged_partitions_requests_retraining(server):
    """llm_feedback_monitoring's operators over what the server wrote: report, dashboard, corrected
    answers as a dataset, and the retraining asset event (negative feedback 1 of 2 > 0.4)."""
    from types import SimpleNamespace

    from airflow.sdk import Asset
    from airflow.sdk.execution_time.context import OutletEventAccessors

    from airloom.airflow.operators.monitoring import DriftMonitorOperator, RequestRetrainingOperator

    root = server["root"]
    ds = next((root / "traffic").glob("ds=*")).name.removeprefix("ds=")
    reference = root / "reference.jsonl"
    reference.write_text(
        "".join(
            json.dumps({"prompt": f"### Instruction:\nTask {i}\n### Response:\n"}) + "\n" for i in range(50)
        )
    )
    context = {
        "ti": SimpleNamespace(dag_id="llm_feedback_monitoring", task_id="drift_and_feedback", map_index=-1),
        "run_id": f"scheduled__{ds}T00:00:00+00:00",
        "dag_run": SimpleNamespace(triggering_user_name=None),
        "outlet_events": OutletEventAccessors(),
    }
    decision = DriftMonitorOperator(
        task_id="drift_and_feedback",
        ds=ds,
        traffic_uri=str(root / "traffic"),
        feedback_uri=str(root / "feedback"),
        reference_file=str(reference),
        max_psi="100",
        max_negative_rate="0.4",
    ).execute(context)
    assert decision["retrain"] is True and decision["reasons"] == ["negative feedback rate 0.50 > 0.4"]
    report = json.loads(Path(decision["report"]).read_text())
    serving = report["serving"]
    assert serving["models"] == {f"{NAME}/1": serving["outputs"]} and serving["requests"] > 20
    assert serving["satisfaction_rate"] == 0.5 and serving["rating_distribution"] == {"5": 1, "down": 1}
    assert 0 < serving["latency_ms"]["p50"] <= serving["latency_ms"]["p95"]
    logged = [
        json.loads(line)["completion_tokens"]
        for part in (root / "traffic" / f"ds={ds}").glob("*.jsonl")
        for line in part.read_text().splitlines()
    ]  # the module's tests ask for different max_tokens: the summary must stay within what was logged
    assert (
        min(logged)
        <= serving["completion_tokens"]["p50"]
        <= serving["completion_tokens"]["p95"]
        <= max(logged)
    )
    assert serving["corrected_answers"] == 1
    assert 0 <= serving["failing_output_rate"] <= 1
    page = Path(decision["dashboard"]).read_text()
    assert f"ds={ds}" in page and page.count("data:image/png;base64,") == 3
    (row,) = [json.loads(line) for line in Path(decision["corrected_dataset"]).read_text().splitlines()]
    assert row["instruction"] == "Say hi." and row["input"] == "" and row["source"] == "feedback"
    assert row["response"] == "hi, write to <EMAIL>"
    asset = Asset("retraining_request")
    RequestRetrainingOperator(task_id="request_retraining", decision=decision, outlets=[asset]).execute(
        context
    )
    assert context["outlet_events"][asset].extra["reasons"] == decision["reasons"]


def _metrics(url: str) -> dict:
    """/metrics parsed by prometheus_client's own parser: family name -> family."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(url + "/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def _value(families: dict, sample: str, **labels) -> float:
    family = sample.removesuffix("_total").removesuffix("_count").removesuffix("_sum")
    return sum(
        s.value
        for s in families[family].samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_api_keys_401_without_a_valid_key_healthz_and_metrics_open(server):
    url = server["url"]
    done = _post(server, "/v1/completions", _completion_body("Say hello.")).json()
    bodies = {
        "/v1/completions": _completion_body("hi"),
        "/v1/chat/completions": {
            "model": NAME,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2,
        },
        "/v1/feedback": {"response_id": done["id"], "rating": "up"},
    }
    no_key = {k: v for k, v in OPENAI_HEADERS.items() if k != "Authorization"}
    for path, body in bodies.items():
        for auth in (None, "Bearer sk-wrong", API_KEY, "Basic c2stdGVzdDo="):
            headers = no_key if auth is None else {**no_key, "Authorization": auth}
            r = httpx.post(url + path, json=body, headers=headers, timeout=60)
            assert r.status_code == 401, (path, auth, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            err = r.json()["error"]
            assert err == {
                "message": err["message"],
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
            assert "sk-wrong" not in r.text and API_KEY not in r.text
        ok = httpx.post(
            url + path, json=body, headers={**no_key, "Authorization": "Bearer sk-other"}, timeout=60
        )
        assert ok.status_code in (200, 201), ok.text  # any configured key
    assert httpx.get(url + "/v1/models").status_code == 401
    assert httpx.get(url + "/healthz").status_code == 200
    health = httpx.get(url + "/health")  # vLLM's probe path, what a gateway in front of us asks
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert httpx.get(url + "/metrics").status_code == 200


def test_body_over_the_limit_gets_413(server):
    big = _completion_body("x" * (1 << 20))
    r = _post(server, "/v1/completions", big)
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "request_too_large" and str(1 << 20) in r.json()["error"]["message"]
    # Without Content-Length (chunked) the bytes are counted as they come.
    data = json.dumps(_completion_body("y" * ((1 << 20) - 50))).encode()
    assert len(data) > 1 << 20
    r = httpx.post(
        server["url"] + "/v1/completions",
        content=iter([data[: len(data) // 2], data[len(data) // 2 :]]),
        headers=OPENAI_HEADERS,
        timeout=60,
    )
    assert r.status_code == 413 and "content-length" not in r.request.headers


def test_n_times_max_tokens_over_the_limit_is_refused(server):
    r = _post(server, "/v1/completions", _completion_body("hi", n=16, max_tokens=600))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "request_tokens_exceeded" and err["param"] == "max_tokens"
    assert "n 16 × max_tokens 600 = 9600" in err["message"] and "8192" in err["message"]
    chat = _post(
        server,
        "/v1/chat/completions",
        {
            "model": NAME,
            "messages": [{"role": "user", "content": "x"}],
            "n": 9,
            "max_completion_tokens": 1000,
        },
    )
    assert chat.status_code == 400 and "n 9 × max_tokens 1000" in chat.json()["error"]["message"]
    many = _post(server, "/v1/completions", _completion_body(["a", "b", "c"], n=4, max_tokens=700))
    assert many.status_code == 400 and "3 prompts × n 4 × max_tokens 700" in many.json()["error"]["message"]


def test_metrics_count_requests_tokens_batches_and_the_served_version(server):
    url = server["url"]
    before = _metrics(url)
    done = asyncio.run(
        _post_many(url, "/v1/completions", [_completion_body(f"Count to {i}.") for i in range(3)])
    )
    assert [r.status_code for r in done] == [200] * 3
    assert httpx.post(url + "/v1/completions", json=_completion_body("hi")).status_code == 401
    assert httpx.get(url + "/no-such-path").status_code == 401
    after = _metrics(url)
    health = httpx.get(url + "/healthz").json()

    def delta(sample, **labels):
        return _value(after, sample, **labels) - _value(before, sample, **labels)

    endpoint = {"endpoint": "/v1/completions"}
    assert delta("airloom_requests_total", status="200", **endpoint) == 3
    assert delta("airloom_requests_total", status="401", **endpoint) == 1
    assert delta("airloom_requests_total", status="401", endpoint="other") == 1
    assert delta("airloom_request_latency_seconds_count", **endpoint) == 4
    assert delta("airloom_time_to_first_token_seconds_count", **endpoint) == 3
    assert delta("airloom_time_to_first_token_seconds_sum", **endpoint) > 0
    usage = [r.json()["usage"] for r in done]
    assert delta("airloom_prompt_tokens_total", **endpoint) == sum(u["prompt_tokens"] for u in usage)
    assert delta("airloom_completion_tokens_total", **endpoint) == sum(u["completion_tokens"] for u in usage)
    assert _value(after, "airloom_batch_size_count") == health["batches"]
    assert _value(after, "airloom_batch_size_sum") == sum(
        int(k) * v for k, v in health["batch_sizes"].items()
    )
    assert _value(after, "airloom_queue_depth") == 0
    versions = {
        (s.labels["name"], s.labels["version"]): s.value for s in after["airloom_model_version"].samples
    }
    assert versions == {(NAME, "1"): 1.0}
    assert _value(after, "airloom_model_reloads_total") == 0


def test_burst_beyond_the_queue_gets_429_with_retry_after(registry_with_two_versions, tmp_path):
    """A queue of 1 and a blocked engine: one request generating, one waiting, the rest 429 at once."""
    from airloom.serving.app import create_app
    from airloom.serving.engine import Engine

    _, reg = registry_with_two_versions
    engine = Engine(
        reg, f"{NAME}/1", cache_dir=tmp_path / "cache", max_batch_size=1, batch_wait_ms=0, max_queue=1
    )
    app = create_app(engine, traffic_dir=tmp_path / "traffic", feedback_dir=tmp_path / "feedback")

    async def burst(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            first = asyncio.create_task(client.post("/v1/completions", json=_completion_body("first")))
            assert await asyncio.to_thread(entered.wait, 30)
            rest = [
                asyncio.create_task(client.post("/v1/completions", json=_completion_body(f"n{i}")))
                for i in range(5)
            ]
            deadline = time.monotonic() + 30
            while sum(t.done() for t in rest) < 4:  # the refusals come back while the engine is blocked
                assert time.monotonic() < deadline, [t.done() for t in rest]
                await asyncio.sleep(0.01)
            depth = _value(await asyncio.to_thread(_metrics, url), "airloom_queue_depth")
            release.set()
            return await first, await asyncio.gather(*rest), depth

    with uvicorn_thread(app) as url, held_batches(engine) as (entered, release):
        first, rest, depth = asyncio.run(burst(url))
        metrics = _metrics(url)
    assert first.status_code == 200 and depth == 1
    assert sorted(r.status_code for r in rest) == [200] + [429] * 4
    for r in rest:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1"
            assert (
                r.json()["error"]["type"] == "rate_limit_error" and r.json()["error"]["code"] == "queue_full"
            )
    # this app's own registry: the module server's requests are not in it
    assert _value(metrics, "airloom_requests_total", status="429") == 4
    assert _value(metrics, "airloom_requests_total", endpoint="/v1/completions", status="200") == 2


def test_alias_move_reloads_without_dropping_in_flight_requests(server):
    """Runs last: afterwards the server serves version 2."""
    reg = server["registry"]
    prompts = [f"### Instruction:\nCount.\n### Input:\n{i}\n### Response:\n" for i in range(8)]
    before = asyncio.run(_post_many(server["url"], "/v1/completions", [_completion_body(p) for p in prompts]))
    before_texts = [b.json()["choices"][0]["text"] for b in before]

    async def scenario():
        async with httpx.AsyncClient(base_url=server["url"], headers=OPENAI_HEADERS, timeout=60) as client:
            tasks = [
                asyncio.create_task(client.post("/v1/completions", json=_completion_body(p, max_tokens=24)))
                for p in prompts
            ]
            await asyncio.sleep(0.01)
            await asyncio.to_thread(reg.set_alias, NAME, "production", 2, actor="test", reason="serving test")
            return await asyncio.gather(*tasks)

    in_flight = asyncio.run(scenario())
    assert [r.status_code for r in in_flight] == [200] * 8
    assert {r.json()["model"] for r in in_flight} <= {f"{NAME}/1", f"{NAME}/2"}
    deadline = time.monotonic() + 60
    while httpx.get(server["url"] + "/healthz").json()["version"] != 2:
        assert time.monotonic() < deadline, "the server did not follow the alias"
        time.sleep(0.1)
    r = _post(server, "/v1/completions", _completion_body("Hello"))
    assert r.json()["model"] == f"{NAME}/2" and r.headers["x-airloom-model-version"] == f"{NAME}/2"
    # version 2 has other weights: the same greedy prompts now get other answers
    after = asyncio.run(_post_many(server["url"], "/v1/completions", [_completion_body(p) for p in prompts]))
    assert {a.json()["model"] for a in after} == {f"{NAME}/2"}
    assert [a.json()["choices"][0]["text"] for a in after] != before_texts
    chat = _post(
        server,
        "/v1/chat/completions",
        {"model": NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2},
    )
    assert chat.json()["model"] == f"{NAME}/2"
    health = httpx.get(server["url"] + "/healthz").json()
    assert health["reloads"][-1]["from"] == f"{NAME}/1" and health["reloads"][-1]["to"] == f"{NAME}/2"
    assert health["last_reload_error"] is None
    metrics = _metrics(server["url"])
    assert _value(metrics, "airloom_model_reloads_total") == 1
    versions = {
        (s.labels["name"], s.labels["version"]): s.value for s in metrics["airloom_model_version"].samples
    }
    assert versions == {(NAME, "1"): 0.0, (NAME, "2"): 1.0}


def test_cli_serve_runs_and_refuses_bad_refs(registry_with_two_versions, tmp_path):
    root, _ = registry_with_two_versions
    args = ["--registry", str(root / "registry"), "serve"]
    cli = [sys.executable, "-m", "airloom.cli", *args]
    bad = subprocess.run([*cli, "--model", NAME], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert bad.returncode == 2 and "NAME@ALIAS" in bad.stderr
    missing = subprocess.run(
        [*cli, "--model", f"{NAME}/9"], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert missing.returncode == 2 and "no committed version 9" in missing.stderr
    keyless = {
        k: v for k, v in os.environ.items() if not k.startswith(("AIRLOOM_API_KEYS", "AIRFLOW_CONN_AIRLOOM"))
    }
    exposed = subprocess.run(
        [*cli, "--model", f"{NAME}/1", "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=keyless,
    )
    assert exposed.returncode == 2 and "--insecure-no-auth" in exposed.stderr, exposed.stderr

    env = {**keyless, "AIRLOOM_HOME": str(tmp_path / "home"), "AIRLOOM_API_KEYS": API_KEY}
    argv = [*args, "--model", f"{NAME}/1", "--torch-threads", "1", "--traffic-dir", str(tmp_path / "traffic")]
    with airloom_serve(argv, log=tmp_path / "serve.log", env=env, timeout=90) as served:
        r = httpx.post(
            served.url + "/v1/chat/completions",
            headers=OPENAI_HEADERS,
            timeout=60,
            json={"model": f"{NAME}/1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        )
        assert r.status_code == 200 and r.json()["model"] == f"{NAME}/1"
        assert httpx.get(served.url + "/v1/models", timeout=10).status_code == 401
        assert list((tmp_path / "traffic").glob("ds=*/part-*.jsonl"))
        assert (tmp_path / "home" / "cache" / "models" / NAME / "1" / "MANIFEST.json").is_file()
