"""Serving test parts: a tiny random-weight Llama registered as two versions, an ASGI app on uvicorn in a
thread, and an ``airloom serve`` process that is up once its ``/healthz`` answers 200.

Used by tests/unit/serving, tests/e2e and (uvicorn in a thread) the Airflow API tests.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from airloom.training.launcher import free_port

REPO = Path(__file__).resolve().parents[1]
NAME = "tiny"


def spread_weights(folder: Path, seed: int) -> None:
    """Redraw the weights wider than the default init: at std 0.02 a random model answers only
    newlines, which would make the stop/padding checks vacuous. Two seeds = two different versions."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.2)
    model.save_pretrained(folder)


def register_two_versions(root: Path, summary: str):
    """A random-weight tiny Llama (no pre-training: seconds, not minutes) built in ``root/model`` and
    registered in ``root/registry`` as versions 1 and 2 of :data:`NAME` (seeds 1 and 2); production -> 1."""
    from airloom.registry.registry import ModelRegistry
    from airloom.training.base import BaseModelSpec, build_base_model

    spec = BaseModelSpec(
        vocab_size=320,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        intermediate_size=64,
        pretrain_lines=400,
        pretrain_seconds=0,
    )
    folder = root / "model"
    build_base_model(folder, spec, log=lambda *_: None)
    reg = ModelRegistry.from_uri(root / "registry")
    for seed in (1, 2):
        spread_weights(folder, seed)
        reg.register(NAME, folder, metadata={"summary": summary, "seed": seed}, actor="test")
    reg.set_alias(NAME, "production", 1, actor="test")
    return reg


@contextmanager
def uvicorn_thread(
    app, port: int | None = None, *, timeout: float = 60, name: str = "uvicorn"
) -> Iterator[str]:
    """``app`` on 127.0.0.1:``port`` (default: a free port) in a daemon thread; yields its URL."""
    import uvicorn

    port = port or free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, name=name, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not srv.started:
        assert thread.is_alive(), "uvicorn exited while starting"
        assert time.monotonic() < deadline, f"uvicorn did not start within {timeout} s"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


@contextmanager
def held_batches(engine) -> Iterator[tuple[threading.Event, threading.Event]]:
    """An in-process engine whose batches wait until ``release`` is set (``entered``: one is waiting);
    released and restored when the block ends."""
    entered, release = threading.Event(), threading.Event()
    run_batch = engine._run_batch

    def held(jobs):
        entered.set()
        assert release.wait(60)
        return run_batch(jobs)

    engine._run_batch = held
    try:
        yield entered, release
    finally:
        release.set()
        engine._run_batch = run_batch


def healthz(url: str) -> dict | None:
    """The server's ``/healthz`` body while it answers 200; None while it is not up (or not healthy)."""
    try:
        r = httpx.get(url + "/healthz", timeout=2)
    except httpx.TransportError:
        return None
    return r.json() if r.status_code == 200 else None


@dataclass
class ServeProcess:
    """A running ``airloom serve``: its process, URL, log (stdout and stderr) and first ``/healthz``."""

    proc: subprocess.Popen
    url: str
    log: Path
    health: dict = field(default_factory=dict)

    def output(self) -> str:
        return self.log.read_text()

    def until(self, check: Callable[[], Any], timeout: float, what: str) -> Any:
        """Poll ``check`` until it returns something truthy; fail naming ``what`` (with the server's
        log) when the deadline passes or the server exits."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, (
                f"airloom serve exited while waiting for {what}:\n{self.output()[-4000:]}"
            )
            got = check()
            if got:
                return got
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.output()[-4000:]}"
            time.sleep(0.1)


@contextmanager
def airloom_serve(
    args: list[str], *, log: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> Iterator[ServeProcess]:
    """``python -m airloom.cli ARGS --port PORT`` (``args`` name the ``serve`` command and its options) on
    a free loopback port; yields once ``/healthz`` answers 200. On exit: SIGTERM, then wait for it."""
    port = free_port()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "airloom.cli", *args, "--port", str(port)],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = ServeProcess(proc, f"http://127.0.0.1:{port}", log)
    try:
        server.health = server.until(lambda: healthz(server.url), timeout, "airloom serve to come up")
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()  # never leave it behind
            proc.wait()
            raise
