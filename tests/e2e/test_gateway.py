"""The gateway in front of a real upstream server, through real processes: `airloom serve
--upstream-command` starts a second `airloom serve --model-dir {model_dir}` on the registry version's
downloaded files, the official openai client talks to the gateway (chat and completions, streamed and
not), the gateway logs the traffic and checks the keys; then the alias moves while several clients
loop, and the gateway starts an upstream on the new version, switches to it once healthy and stops the
old one with no failed request; its shutdown leaves no upstream process behind.

Throwaway AIRLOOM_HOME; the model has random weights (seconds to build, no training).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.serving_helpers import NAME, airloom_serve, healthz, register_two_versions

KEY = "sk-gateway"
VERSION_HEADER = "x-airloom-model-version"

pytestmark = pytest.mark.slow


def _logged(root: Path) -> dict[str, dict]:
    """The gateway's traffic records by response id."""
    lines = (line for f in sorted(root.glob("ds=*/*.jsonl")) for line in f.read_text().splitlines())
    return {r["response_id"]: r for r in map(json.loads, lines)}


async def _client_loop(url: str, i: int, stop: threading.Event, seen: list) -> None:
    """One client: completions (odd clients stream them) until ``stop``; records (version, error)."""
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {
        "model": NAME,
        "prompt": f"### Instruction:\nCount.\n### Input:\n{i}\n### Response:\n",
        "max_tokens": 6,
        "temperature": 0,
    }
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as client:
        while not stop.is_set():
            try:
                if i % 2:
                    models, done = set(), False
                    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                        error = None if r.status_code == 200 else f"status {r.status_code}"
                        async for line in r.aiter_lines():
                            if line == "data: [DONE]":
                                done = True
                            elif line.startswith("data: "):
                                chunk = json.loads(line[6:])
                                error = error or chunk.get("error")
                                models.add(chunk.get("model"))
                    error = error or (None if done and len(models) == 1 else f"stream: {models} {done}")
                    seen.append((models.pop() if len(models) == 1 else None, error))
                else:
                    r = await client.post("/v1/completions", json=body)
                    ok = r.status_code == 200 and r.json()["model"] == r.headers[VERSION_HEADER]
                    seen.append((r.headers.get(VERSION_HEADER), None if ok else f"{r.status_code} {r.text}"))
            except httpx.HTTPError as exc:
                seen.append((None, repr(exc)))


@contextmanager
def _reaped(pids: list[int]) -> Iterator[dict[int, list[int]]]:
    """On exit, kill what is left of the upstream process groups ``pids`` names, even when the test
    failed; yields what was left (filled in on exit)."""
    from airloom.serving.upstream import group_members

    leftovers: dict[int, list[int]] = {}
    try:
        yield leftovers
    finally:
        leftovers.update({pid: group_members(pid) for pid in pids if group_members(pid)})
        for members in leftovers.values():
            for pid in members:
                os.kill(pid, signal.SIGKILL)


def test_gateway_over_an_upstream_airloom_follows_the_alias_without_failing_a_request(tmp_path):
    import openai

    from airloom.serving.upstream import group_members

    home = Path(os.environ["AIRLOOM_HOME"])  # conftest gives each test its own
    reg = register_two_versions(tmp_path, "gateway test")
    keys = tmp_path / "keys"
    keys.write_text(f"{KEY}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRLOOM_API_KEYS", "AIRFLOW_CONN_"))}
    upstream_cmd = (
        "{python} -m airloom.cli serve --model-dir {model_dir} --port {port} --torch-threads 1 "
        f"--batch-wait-ms 5 --traffic-dir {tmp_path / 'upstream-traffic'} "
        f"--feedback-dir {tmp_path / 'upstream-feedback'}"
    )
    argv = [
        "--registry",
        str(tmp_path / "registry"),
        "serve",
        "--model",
        f"{NAME}@production",
        "--api-keys-file",
        str(keys),
        "--poll-seconds",
        "0.3",
        "--upstream-start-timeout",
        "120",
        "--upstream-command",
        upstream_cmd,
    ]
    started = time.monotonic()
    pids: list[int] = []
    with _reaped(pids) as leftovers, airloom_serve(argv, log=tmp_path / "gateway.log", env=env) as gateway:
        url, health = gateway.url, gateway.health
        print(f"gateway and upstream up in {time.monotonic() - started:.1f}s")
        assert health["engine"] == "upstream" and health["model"] == f"{NAME}/1"
        first = health["upstream"]
        pids.append(first["pid"])
        assert first["version"] == f"{NAME}/1" and first["model"] == f"{NAME}/1"
        assert group_members(first["pid"]) == [first["pid"]]  # its own process group
        cached = home / "cache" / "models" / NAME / "1"
        assert (cached / "MANIFEST.json").is_file()  # what the upstream was started on

        # -- the openai client through the gateway -------------------------------------------------
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        prompt = "### Instruction:\nSort the letters.\n### Input:\ndcba\n### Response:\n"
        args = {"model": NAME, "prompt": prompt, "max_tokens": 10, "temperature": 0}
        raw = client.completions.with_raw_response.create(**args)
        whole = raw.parse()
        assert raw.headers[VERSION_HEADER] == f"{NAME}/1" and whole.model == f"{NAME}/1"
        direct = httpx.post(  # the upstream's own answer: the gateway passes it on unchanged
            first["url"] + "/v1/completions", json={**args, "model": f"{NAME}/1"}, timeout=60
        ).json()
        assert whole.choices[0].text == direct["choices"][0]["text"] and whole.choices[0].text
        assert whole.usage.model_dump(exclude_none=True) == direct["usage"]
        chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
        *pieces, usage_chunk = chunks
        assert len(pieces) > 2 and "".join(c.choices[0].text for c in pieces) == whole.choices[0].text
        assert pieces[-1].choices[0].finish_reason == whole.choices[0].finish_reason
        assert usage_chunk.usage == whole.usage and {c.model for c in chunks} == {f"{NAME}/1"}

        chat_args = {
            "model": NAME,
            "messages": [{"role": "user", "content": "Reverse the word.\n\nriver"}],
            "max_completion_tokens": 8,
            "temperature": 0,
        }
        chat = client.chat.completions.create(**chat_args)
        assert chat.model == f"{NAME}/1" and chat.choices[0].message.content
        first_chunk, *chat_pieces = list(client.chat.completions.create(**chat_args, stream=True))
        assert first_chunk.choices[0].delta.role == "assistant"
        streamed = "".join(c.choices[0].delta.content or "" for c in chat_pieces)
        assert streamed == chat.choices[0].message.content

        # -- the gateway keeps keys and the traffic log ----------------------------------------------
        refused = httpx.post(url + "/v1/completions", json=args, timeout=10)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        traffic = _logged(home / "data" / "traffic")
        for response_id, text, usage in [
            (whole.id, whole.choices[0].text, whole.usage),
            (pieces[0].id, whole.choices[0].text, whole.usage),
            (chat.id, chat.choices[0].message.content, chat.usage),
            (first_chunk.id, streamed, chat.usage),
        ]:
            record = traffic.get(response_id)
            assert record is not None and record["model"] == f"{NAME}/1" and record["response"] == text
            assert (record["prompt_tokens"], record["completion_tokens"]) == (
                usage.prompt_tokens,
                usage.completion_tokens,
            )
        assert traffic[chat.id]["messages"] == chat_args["messages"]
        feedback = httpx.post(
            url + "/v1/feedback",
            json={"response_id": chat.id, "rating": "down"},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=10,
        )
        assert feedback.status_code == 201

        # -- an alias move under continuous traffic ------------------------------------------------
        stop, seen = threading.Event(), [[] for _ in range(4)]

        async def clients():
            await asyncio.gather(*(_client_loop(url, i, stop, seen[i]) for i in range(4)))

        load = threading.Thread(target=asyncio.run, args=(clients(),))
        load.start()
        try:
            gateway.until(lambda: all(seen), 60, "every client's first answer")
            moved = time.monotonic()
            reg.set_alias(NAME, "production", 2, actor="test", reason="gateway test")
            # every client gets answers from version 2 (its upstream is up and switched to)
            gateway.until(
                lambda: all([m for m, _ in s[-2:]] == [f"{NAME}/2"] * 2 for s in seen),
                120,
                "every client to get answers from version 2",
            )
            print(f"switched to version 2 {time.monotonic() - moved:.1f}s after the alias moved")
        finally:
            stop.set()
            load.join(timeout=60)
        failures = [(i, e) for i, s in enumerate(seen) for _, e in s if e]
        assert not failures, failures
        for s in seen:  # each client: version 1, then version 2, never back
            versions = [m for m, _ in s]
            switch = versions.index(f"{NAME}/2")
            assert set(versions[:switch]) <= {f"{NAME}/1"} and set(versions[switch:]) == {f"{NAME}/2"}
        print(f"{sum(map(len, seen))} requests during the move, none failed")

        health = gateway.until(lambda: (h := healthz(url)) and not h["retiring"] and h, 60, "the drain")
        second = health["upstream"]
        pids.append(second["pid"])
        assert second["version"] == f"{NAME}/2" and second["pid"] != first["pid"]
        assert health["reloads"][-1]["from"] == f"{NAME}/1" and health["reloads"][-1]["to"] == f"{NAME}/2"
        assert group_members(first["pid"]) == []  # the old upstream and its group are gone
        during = [r for r in _logged(home / "data" / "traffic").values() if r["response_id"] not in traffic]
        assert {r["model"] for r in during} == {f"{NAME}/1", f"{NAME}/2"}
        assert len(during) == sum(map(len, seen))  # the gateway logged every request of the move
    code, output = gateway.proc.returncode, gateway.output()
    assert code in (0, 128 + signal.SIGTERM), output[-4000:]  # uvicorn re-raises the SIGTERM it handled
    assert not leftovers, f"upstream processes left after the gateway stopped: {leftovers}"
    assert KEY not in output  # keys never logged
    assert "stopped http://127.0.0.1:" in output and "[upstream tiny/2 pid" in output
    print(f"whole test {time.monotonic() - started:.1f}s")
