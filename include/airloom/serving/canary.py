"""The canary: ask a registry version a few prompts through the serving gateway before users get it.

The version is loaded as ``airloom serve`` loads it (:class:`~airloom.serving.engine.Engine`: download,
manifest check, the same tokenizer set-up) and asked through the same app
(:func:`~airloom.serving.app.create_app`), in process: conversations go to ``/v1/chat/completions``,
so they are rendered with the model's chat template (alpaca on the user turn for an instruction model)
and cut at its end of turn as served answers are; plain strings go to ``/v1/completions`` as they are.
What fails here (the model does not load, a request is refused, every answer is empty) would fail
for users.

The prompts are the dataset's own (:func:`dataset_prompts`: the test split the candidate was evaluated
on, one task at a time), so the canary asks what the model was trained to answer.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from airloom.exceptions import UsageError

DEFAULT_LIMIT = 8
DEFAULT_MAX_TOKENS = 32


def dataset_prompts(records: Sequence[dict], limit: int = DEFAULT_LIMIT) -> list[list[dict]]:
    """Up to ``limit`` conversations to ask, from prepared records, taking the tasks in turn.

    A conversation record gives the turns before its last assistant turn; an instruction row one user
    turn (instruction, blank line, input: the shape ``/v1/chat/completions`` turns back into alpaca).
    Records are taken in file order, one task after another (``task``; records without one form a
    task of their own), so a split with several task families is asked about each.

    Raises:
        UsageError: no record has a prompt to ask.
    """
    from airloom.evaluation.chat import split_turns

    by_task: dict[Any, list[list[dict]]] = {}
    for record in records:
        split = split_turns(record)
        if split is not None:
            turns = split[0]
        elif record.get("instruction"):
            inp = str(record.get("input") or "").strip()
            text = str(record["instruction"]).strip()
            turns = [{"role": "user", "content": f"{text}\n\n{inp}" if inp else text}]
        else:
            continue
        if turns and any(t["role"] == "user" for t in turns):
            by_task.setdefault(record.get("task"), []).append(turns)
    if not by_task:
        raise UsageError("no record has a prompt to ask (instruction rows or conversations with a user turn)")
    picked: list[list[dict]] = []
    queues = list(by_task.values())
    while len(picked) < limit and any(queues):
        for queue in queues:
            if queue and len(picked) < limit:
                picked.append(queue.pop(0))
    return picked


def shown(prompt: str | Sequence[dict] | dict, width: int = 80) -> str:
    """A prompt in one short line for a message: a conversation's last user turn, else the text."""
    if isinstance(prompt, dict):
        prompt = prompt["messages"]
    if not isinstance(prompt, str):
        prompt = next((t["content"] for t in reversed(prompt) if t.get("role") == "user"), "")
    text = " ".join(str(prompt).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def required_answers(n: int, min_answered: float | None) -> int:
    """How many of ``n`` prompts must be answered: ``min_answered`` of them (a share), at least one."""
    if min_answered is None:
        return 1
    if not 0 < min_answered <= 1:
        raise UsageError(f"min_answered must be a share in (0, 1], got {min_answered!r}")
    return max(1, math.ceil(min_answered * n))


def ask_through_gateway(
    registry: Any,
    name: str,
    version: int,
    prompts: Sequence[str | Sequence[dict] | dict],
    *,
    cache_dir: str | Path,
    log_dir: str | Path,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> list[dict[str, Any]]:
    """Serve ``name/version`` with the gateway in this process and ask each prompt once, greedily.

    :param cache_dir: where the version is downloaded (``airloom serve``'s cache is
        ``$AIRLOOM_HOME/cache/models``).
    :param log_dir: the gateway's traffic and feedback logs go under it, not into the served traffic
        that monitoring reads.
    :returns: per prompt ``{"prompt", "output", "error", "status"}``: the prompt as the model read it,
        its answer, and the HTTP error when the gateway refused or failed it (``error`` None otherwise).
    """
    from airloom.evaluation.chat import chat_prompt
    from airloom.serving.app import create_app
    from airloom.serving.engine import Engine

    engine = Engine(registry, f"{name}/{int(version)}", cache_dir=cache_dir, max_batch_size=16)
    app = create_app(engine, traffic_dir=Path(log_dir) / "traffic", feedback_dir=Path(log_dir) / "feedback")
    tokenizer = engine.current.counting_tokenizer or engine.current.tokenizer
    requests: list[tuple[str, dict]] = []
    rendered: list[str] = []
    for p in prompts:
        common = {"model": engine.current.ref, "max_tokens": max_tokens, "temperature": 0}
        if isinstance(p, str):
            requests.append(("/v1/completions", {**common, "prompt": p}))
            rendered.append(p)
            continue
        turns = list(p["messages"] if isinstance(p, dict) else p)
        requests.append(("/v1/chat/completions", {**common, "messages": turns}))
        try:
            rendered.append(chat_prompt(turns, tokenizer))
        except UsageError as exc:  # the gateway refuses it too (400): shown with its error
            rendered.append(f"(cannot render: {exc})")
    responses = asyncio.run(_ask(app, requests))
    rows = []
    for prompt, (status, body) in zip(rendered, responses, strict=True):
        if status == 200:
            choice = body["choices"][0]
            text = choice["message"]["content"] if "message" in choice else choice["text"]
            rows.append({"prompt": prompt, "output": text, "error": None, "status": status})
        else:
            error = (body.get("error") or {}).get("message") if isinstance(body, dict) else None
            rows.append({"prompt": prompt, "output": "", "error": error or str(body), "status": status})
    return rows


async def _ask(app: Any, requests: list[tuple[str, dict]]) -> list[tuple[int, Any]]:
    """Run the app's lifespan (the engine's batching loop) and send every request at once."""
    import httpx

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # a crash: a 500 row
        async with httpx.AsyncClient(transport=transport, base_url="http://canary", timeout=None) as client:
            answers = await asyncio.gather(*(client.post(path, json=body) for path, body in requests))
    out = []
    for r in answers:
        try:
            out.append((r.status_code, r.json()))
        except ValueError:
            out.append((r.status_code, r.text))
    return out
