"""The gateway engine (:mod:`airloom.serving.upstream`): its command template, the processes it
starts and stops, and the gateway app over a real upstream — an in-process ``airloom serve`` app on
uvicorn (loopback), reached over HTTP as any OpenAI-compatible server would be.

The alias move with ``--upstream-command`` (a new upstream process per version) runs through real
processes in tests/e2e/test_gateway.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.serving_helpers import NAME, held_batches, register_two_versions, uvicorn_thread

KEY = "sk-gw"
HEADERS = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A random-weight tiny Llama registered as versions 1 and 2; production -> 1."""
    root = tmp_path_factory.mktemp("upstream")
    return root, register_two_versions(root, "upstream test")


def _upstream_app(reg, root: Path, **options):
    """An ``airloom serve`` app (in-process engine) on version 1, open (no keys), as the upstream."""
    from airloom.serving.app import create_app
    from airloom.serving.engine import Engine

    engine = Engine(
        reg, f"{NAME}/1", cache_dir=root / "cache", batch_wait_ms=5, max_queue=options.pop("max_queue", 128)
    )
    app = create_app(engine, traffic_dir=root / "up-traffic", feedback_dir=root / "up-feedback", **options)
    return engine, app


def _gateway_app(reg, root: Path, upstream_url: str, ref: str = f"{NAME}/1", **options):
    from airloom.serving.app import create_app
    from airloom.serving.auth import load_api_keys
    from airloom.serving.upstream import UpstreamEngine

    engine = UpstreamEngine(reg, ref, cache_dir=root / "gw-cache", upstream_url=upstream_url, **options)
    keys = load_api_keys(environ={"AIRLOOM_API_KEYS": KEY})
    app = create_app(
        engine, traffic_dir=root / "gw-traffic", feedback_dir=root / "gw-feedback", api_keys=keys
    )
    return engine, app


@pytest.fixture(scope="module")
def gateway(registry):
    """An upstream app and a gateway in front of it (``--upstream-url``), both on uvicorn threads."""
    import torch

    root, reg = registry
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    upstream_engine, upstream = _upstream_app(reg, root, max_request_tokens=64)
    try:
        with uvicorn_thread(upstream) as upstream_url:
            engine, app = _gateway_app(reg, root, upstream_url + "/v1")  # a base_url as openai takes it
            with uvicorn_thread(app) as url:
                yield {"url": url, "upstream_url": upstream_url, "engine": engine, "root": root}
    finally:
        torch.set_num_threads(threads)


def _version(path: Path):
    from airloom.serving.engine import LoadedModel

    return LoadedModel(NAME, 1, str(path), None, None)


# -- the command and its process ---------------------------------------------------------------


def test_command_template_fills_each_word_and_refuses_what_cannot_serve():
    from airloom.exceptions import UsageError
    from airloom.serving.upstream import check_command, render_command

    argv = render_command(
        "vllm serve {model_dir} --port {port} --served-model-name {served_name} --x '{{\"a\": 1}}'",
        model_dir="/models/my model/3",
        port=8123,
        served_name="tiny/3",
    )
    assert argv == [
        "vllm",
        "serve",
        "/models/my model/3",  # one argument, spaces and all; no shell
        "--port",
        "8123",
        "--served-model-name",
        "tiny/3",
        "--x",
        '{"a": 1}',
    ]
    assert render_command("{python} -m x", model_dir="d", port=1, served_name="s")[0] == sys.executable
    with pytest.raises(UsageError, match=r"unknown placeholder \{model_path\}.*\{model_dir\}, \{port\}"):
        render_command("vllm serve {model_path}", model_dir="d", port=1, served_name="s")
    with pytest.raises(UsageError, match=r"must contain \{port\}"):
        check_command("vllm serve {model_dir}")
    with pytest.raises(UsageError, match=r"must contain \{model_dir\}"):
        check_command("vllm serve some/model --port {port}")
    with pytest.raises(UsageError, match="No closing quotation"):
        check_command("vllm serve '{model_dir} --port {port}")


def test_a_server_that_dies_at_start_is_named_with_its_output(tmp_path):
    from airloom.exceptions import UsageError
    from airloom.serving.upstream import UpstreamServer

    server = UpstreamServer.launch(
        "{python} -c \"import sys; print('cannot load', sys.argv[1]); sys.exit(3)\" {model_dir} {port}",
        _version(tmp_path),
    )
    with httpx.Client(timeout=2) as client, pytest.raises(UsageError) as err:
        server.wait_healthy(30, threading.Event(), client)
    message = str(err.value)
    assert "exited with code 3 before it was healthy" in message and "command: " + sys.executable in message
    assert f"cannot load {tmp_path}" in message  # its output's tail
    server.stop(1)


def test_no_health_by_the_deadline_then_sigterm_sigkill_stop_the_whole_group(tmp_path):
    """A server that ignores SIGTERM and started a child of its own: both are gone after stop()."""
    from airloom.exceptions import UsageError
    from airloom.serving.upstream import UpstreamServer, group_members

    script = (
        "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        "print('child', child.pid, flush=True); time.sleep(120)"
    )
    server = UpstreamServer.launch(f'{{python}} -c "{script}" {{model_dir}} {{port}}', _version(tmp_path))
    pgid = server.process.pid
    deadline = time.monotonic() + 30
    while len(group_members(pgid)) < 2:
        assert time.monotonic() < deadline, list(server.tail)
        time.sleep(0.05)
    with (
        httpx.Client(timeout=1) as client,
        pytest.raises(UsageError, match=r"not healthy after 0.5s \(Connect"),
    ):
        server.wait_healthy(0.5, threading.Event(), client)
    started = time.monotonic()
    server.stop(grace=0.5)
    assert time.monotonic() - started >= 0.5  # SIGTERM was ignored: SIGKILL after the grace
    assert group_members(pgid) == [] and server.process.returncode == -signal.SIGKILL


# -- the gateway over a real upstream ----------------------------------------------------------


def _openai(url: str):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _records(root: Path) -> list[dict]:
    return [
        json.loads(line) for f in sorted(root.glob("ds=*/*.jsonl")) for line in f.read_text().splitlines()
    ]


def test_gateway_answers_as_the_upstream_does_streamed_or_not_and_logs_it(gateway):
    from prometheus_client.parser import text_string_to_metric_families

    url, root = gateway["url"], gateway["root"]
    health = httpx.get(url + "/healthz").json()
    assert health["engine"] == "upstream" and health["model"] == f"{NAME}/1"
    assert health["upstream"]["url"] == gateway["upstream_url"] and health["upstream"]["pid"] is None
    client = _openai(url)
    prompt = "### Instruction:\nSort the letters.\n### Input:\ndcba\n### Response:\n"
    args = {"model": NAME, "prompt": prompt, "max_tokens": 10, "temperature": 0}
    direct = httpx.post(
        gateway["upstream_url"] + "/v1/completions", json={**args, "model": f"{NAME}/1"}, timeout=60
    ).json()
    whole = client.completions.create(**args)
    assert whole.choices[0].text == direct["choices"][0]["text"] and whole.model == f"{NAME}/1"
    assert whole.usage.model_dump(exclude_none=True) == direct["usage"]
    *pieces, usage = list(
        client.completions.create(**args, stream=True, stream_options={"include_usage": True})
    )
    assert "".join(p.choices[0].text for p in pieces) == whole.choices[0].text and len(pieces) > 2
    assert usage.usage == whole.usage
    two = client.completions.create(**args, n=2)  # a row per upstream call; the prompt counted once
    assert [c.text for c in two.choices] == [whole.choices[0].text] * 2
    assert two.usage.prompt_tokens == whole.usage.prompt_tokens
    assert two.usage.completion_tokens == 2 * whole.usage.completion_tokens

    chat_args = {
        "model": NAME,
        "messages": [{"role": "user", "content": "Reverse.\n\nriver"}],
        "max_tokens": 6,
    }
    chat = client.chat.completions.create(**chat_args, temperature=0)
    _, *chunks = list(client.chat.completions.create(**chat_args, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content

    logged = {r["response_id"]: r for r in _records(root / "gw-traffic")}
    assert logged[whole.id]["response"] == whole.choices[0].text and logged[whole.id]["model"] == f"{NAME}/1"
    assert logged[pieces[0].id]["completion_tokens"] == whole.usage.completion_tokens
    assert logged[chat.id]["messages"] == [{"role": "user", "content": "Reverse.\n\nriver"}]
    assert httpx.post(url + "/v1/completions", json=args).status_code == 401  # the gateway's keys
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
    (version,) = families["airloom_model_version"].samples
    assert version.labels == {"name": NAME, "version": "1"} and version.value == 1
    completion_tokens = [
        s.value
        for s in families["airloom_completion_tokens"].samples
        if s.name == "airloom_completion_tokens_total" and s.labels["endpoint"] == "/v1/completions"
    ]
    assert completion_tokens == [4 * whole.usage.completion_tokens]


def test_upstream_refusals_reach_the_client_streamed_or_not(gateway):
    url = gateway["url"]
    # the upstream allows 64 tokens per request, the gateway 8192: the upstream's 400 reaches the client
    r = httpx.post(
        url + "/v1/completions",
        headers=HEADERS,
        json={"model": NAME, "prompt": "hi", "max_tokens": 65},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "upstream_refused" and "exceed this server's limit of 64" in err["message"]
    r = httpx.post(
        url + "/v1/completions",
        headers=HEADERS,
        json={"model": NAME, "prompt": "hi", "max_tokens": 65, "stream": True},
        timeout=60,
    )
    assert r.status_code == 200 and "exceed this server's limit of 64" in r.text  # an error event


def test_queue_429_disconnect_cancels_the_upstream_row_and_unreachable_is_502(
    registry, tmp_path, monkeypatch
):
    """A blocked upstream: one request forwarded, one waiting at the gateway, the rest 429 at once;
    then a streamed client leaves mid-answer and its row stops on the upstream too."""
    root, reg = registry
    upstream_engine, upstream = _upstream_app(reg, tmp_path)
    body = {"model": NAME, "prompt": "Count.", "max_tokens": 4, "temperature": 0}

    async def burst(url):
        async with httpx.AsyncClient(base_url=url, headers=HEADERS, timeout=60) as client:
            first = asyncio.create_task(client.post("/v1/completions", json=body))
            assert await asyncio.to_thread(entered.wait, 30)
            rest = [asyncio.create_task(client.post("/v1/completions", json=body)) for _ in range(5)]
            deadline = time.monotonic() + 30
            while sum(t.done() for t in rest) < 4:
                assert time.monotonic() < deadline, [t.done() for t in rest]
                await asyncio.sleep(0.01)
            depth = (await client.get("/healthz")).json()["queued"]
            release.set()
            return await first, await asyncio.gather(*rest), depth

    with uvicorn_thread(upstream) as upstream_url:
        engine, app = _gateway_app(reg, tmp_path, upstream_url, max_inflight=1, max_queue=1)
        with uvicorn_thread(app) as url:
            with held_batches(upstream_engine) as (entered, release):
                first, rest, depth = asyncio.run(burst(url))
            assert first.status_code == 200 and depth == 1
            assert sorted(r.status_code for r in rest) == [200] + [429] * 4
            refused = next(r for r in rest if r.status_code == 429)
            assert refused.headers["retry-after"] == "1" and refused.json()["error"]["code"] == "queue_full"

            # the client leaves after its first chunk: the gateway closes its upstream stream
            model = upstream_engine.current.model
            forward = model.forward

            def slow_forward(*args, **kwargs):
                time.sleep(0.02)
                return forward(*args, **kwargs)

            monkeypatch.setattr(model, "forward", slow_forward)
            prompt = next(  # one the random model answers to max_tokens, not to an early eos
                p
                for p in (f"### Instruction:\nWrite a long story {i}.\n### Response:\n" for i in range(20))
                if httpx.post(
                    url + "/v1/completions", headers=HEADERS, json={**body, "prompt": p, "max_tokens": 60}
                ).json()["choices"][0]["finish_reason"]
                == "length"
            )
            long = {**body, "max_tokens": 60, "prompt": prompt, "stream": True}
            generated = upstream_engine.stats()["tokens_generated"]
            with httpx.Client(base_url=url, headers=HEADERS, timeout=60) as client:
                with client.stream("POST", "/v1/completions", json=long) as r:
                    first_chunk = next(json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: "))
            deadline = time.monotonic() + 30
            while upstream_engine.stats()["cancelled_rows"] < 1 or engine.stats()["in_flight"]:
                assert time.monotonic() < deadline, (upstream_engine.stats(), engine.stats())
                time.sleep(0.05)
            assert upstream_engine.stats()["tokens_generated"] - generated < 60  # stopped early
            assert engine.stats()["cancelled_rows"] == 1
            (record,) = [
                r for r in _records(tmp_path / "gw-traffic") if r["response_id"] == first_chunk["id"]
            ]
            assert record["finish_reason"] == "client_disconnected"
            assert record["response"].startswith(first_chunk["choices"][0]["text"])
    # the upstream is gone: 502 naming it
    with uvicorn_thread(app) as url:
        r = httpx.post(url + "/v1/completions", json={**body, "stream": False}, headers=HEADERS, timeout=60)
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unreachable"
    assert upstream_url in r.json()["error"]["message"]


def test_with_a_url_the_alias_move_is_reported_not_followed(registry, tmp_path):
    root, reg = registry
    _, upstream = _upstream_app(reg, tmp_path)
    with uvicorn_thread(upstream) as upstream_url:
        engine, app = _gateway_app(reg, tmp_path, upstream_url, ref=f"{NAME}@production", poll_seconds=0.05)
        with uvicorn_thread(app) as url:
            reg.set_alias(NAME, "production", 2, actor="test")
            try:
                deadline = time.monotonic() + 30
                while not (health := httpx.get(url + "/healthz").json())["last_reload_error"]:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
            finally:
                reg.set_alias(NAME, "production", 1, actor="test")
    assert health["model"] == f"{NAME}/1" and health["reloads"] == []
    assert "-> 2, but" in health["last_reload_error"] and upstream_url in health["last_reload_error"]


# -- /healthz: 503 when the engine cannot serve ---------------------------------------------------

HEALTH_ONLY = """
import http.server, sys

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass

print("listening on", sys.argv[2], flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[2])), Health).serve_forever()
"""


def _health(url: str, status: int) -> dict:
    """Poll ``/healthz`` until it answers ``status``; its body."""
    deadline = time.monotonic() + 30
    while (r := httpx.get(url + "/healthz", timeout=10)).status_code != status:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.05)
    return r.json()


def test_healthz_503_when_the_upstream_process_exits(registry, tmp_path):
    """The gateway's own upstream process (a real server answering ``GET /health``) is killed: /healthz
    turns 503 ``unhealthy`` naming the pid and exit code, requests get 502."""
    from airloom.serving.app import create_app
    from airloom.serving.auth import load_api_keys
    from airloom.serving.upstream import UpstreamEngine

    root, reg = registry
    script = tmp_path / "health_only.py"
    script.write_text(HEALTH_ONLY)
    engine = UpstreamEngine(
        reg,
        f"{NAME}/1",
        cache_dir=tmp_path / "cache",
        upstream_command=f"{{python}} {script} {{model_dir}} {{port}}",
        start_timeout=60,
        stop_grace=5,
    )
    keys = load_api_keys(environ={"AIRLOOM_API_KEYS": KEY})
    app = create_app(engine, traffic_dir=tmp_path / "traffic", feedback_dir=tmp_path / "fb", api_keys=keys)
    with uvicorn_thread(app) as url:
        ok = _health(url, 200)
        assert ok["status"] == "ok" and ok["reason"] is None and ok["upstream"]["exit_code"] is None
        pid = ok["upstream"]["pid"]
        os.killpg(pid, signal.SIGKILL)
        down = _health(url, 503)  # no key needed, as for a load balancer's probe
        assert down["status"] == "unhealthy" and down["upstream"]["exit_code"] == -signal.SIGKILL
        assert f"(pid {pid}, " in down["reason"] and "exited with code -9" in down["reason"]
        assert f"its last output: listening on {ok['upstream']['url'].rsplit(':', 1)[1]}" in down["reason"]
        assert down["model"] == f"{NAME}/1"  # what it would serve, for the operator
        r = httpx.post(
            url + "/v1/completions", headers=HEADERS, json={"model": NAME, "prompt": "hi"}, timeout=30
        )
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unreachable"


def test_healthz_503_while_the_upstream_does_not_answer_or_the_engine_has_stopped(registry, tmp_path):
    """``--upstream-url``: a real upstream app goes away (503 with the reason) and comes back (200);
    then the in-process engine's own /healthz turns 503 when its batching task has ended."""
    root, reg = registry
    upstream_engine, upstream = _upstream_app(reg, tmp_path)
    with contextlib.ExitStack() as up:
        upstream_url = up.enter_context(uvicorn_thread(upstream))
        port = upstream_url.rsplit(":", 1)[1]
        engine, app = _gateway_app(reg, tmp_path, upstream_url)
        with uvicorn_thread(app) as url:
            assert _health(url, 200)["status"] == "ok"
            up.close()  # the upstream server stops; the gateway goes on
            down = _health(url, 503)
            assert down["status"] == "unhealthy" and down["upstream"]["pid"] is None
            assert down["reason"].startswith(
                f"the upstream server {upstream_url} for {NAME}/1 is not healthy"
            )
            assert "ClientConnectorError" in down["reason"]

            with uvicorn_thread(upstream, int(port)):  # back on the same port: healthy again
                assert _health(url, 200)["reason"] is None

    # the in-process engine: its batching task ended, so it cannot answer
    with uvicorn_thread(upstream) as upstream_url:
        assert _health(upstream_url, 200)["status"] == "ok"
        collector = upstream_engine._collector
        collector.get_loop().call_soon_threadsafe(collector.cancel)
        down = _health(upstream_url, 503)
        assert down["status"] == "unhealthy" and "the batching task stopped" in down["reason"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "give --model NAME@ALIAS (or NAME/VERSION), or --model-dir DIR"),
        (["--model", "tiny@production", "--model-dir", "x"], "or --model-dir DIR"),
        (["--model-dir", "x", "--upstream-url", "http://127.0.0.1:9"], "an upstream gateway takes --model"),
        (["--model", "tiny@production", "--upstream-command", "vllm serve x"], r"must contain {model_dir}"),
        (["--model", "tiny/1", "--upstream-url", "127.0.0.1:8000"], "must start with http://"),
    ],
)
def test_cli_serve_refuses_what_cannot_be_served(argv, message, capsys, tmp_path):
    from airloom.cli import main

    assert main(["--registry", str(tmp_path / "registry"), "serve", *argv]) == 2
    assert message in capsys.readouterr().err
