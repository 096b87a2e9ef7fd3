"""Generation by an upstream OpenAI-compatible inference server, behind Airloom's gateway.

The gateway (:mod:`airloom.serving.app` over :class:`UpstreamEngine`) keeps what is Airloom's: API
keys, following the alias, rendering chat prompts with the version's own template (training,
evaluation and serving prompts stay alike), the context check with both numbers (the version's
tokenizer, downloaded as the embedded engine does), the traffic log, feedback, ``/metrics`` and the
bounded queue. The upstream only generates: each row of a request is one ``/v1/completions`` call
with the rendered prompt (``add_special_tokens: false``, vLLM's name for encoding it as training did;
servers ignore fields they do not know), streamed rows with ``stream: true`` and their chunks passed
on as they arrive. The upstream's ``usage`` gives the token counts when it sends one.

Two ways to have an upstream:

- ``upstream_url``: a server someone else runs. The gateway serves the version it was told (its
  tokenizer and template) and logs which; when the alias moves it says so on ``/healthz`` and in its
  log, but cannot move that server.
- ``upstream_command``: the gateway runs the server on the version's downloaded, manifest-checked
  folder, filling in ``{model_dir}``, ``{port}``, ``{served_name}`` (``NAME/VERSION``) and
  ``{python}`` (``{{``/``}}`` for literal braces); the command is split like a shell line but no
  shell runs it. The process leads its own process group, its output goes to the gateway's log, and
  it is up once ``GET /health`` (or, where that is 404, ``GET /v1/models``) answers 200. When the
  alias moves, a second server starts on the new version on a new port; once it is healthy, new
  requests go to it (one reference swap), requests in flight finish on the old one, then the old
  group gets SIGTERM and, after a grace period, SIGKILL. The gateway's shutdown stops every group.

``/healthz`` answers 503 with the reason when the serving upstream cannot take requests: its process
exited (requests get 502 until the gateway is restarted: a liveness probe does that) or it does not
answer ``GET /health`` (or ``/v1/models``) within :data:`HEALTH_TIMEOUT_S`.

Threads: requests are coroutines on the app's loop over one ``aiohttp.ClientSession``; starting,
health checks, draining and stopping servers run on the alias poll thread (or the caller, at
start-up), with blocking ``httpx`` calls. Requests are forwarded with aiohttp rather than httpx
because the gateway's CPU is what it adds to every request: on loopback an httpx request cost ~0.75
ms of CPU in the client, an aiohttp one ~0.11 ms (docs/benchmarks.md, bench/serve_load.py).
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from airloom.exceptions import UsageError
from airloom.registry.registry import ModelRegistry
from airloom.serving.engine import (
    AliasFollower,
    EngineBusy,
    EngineError,
    GenRequest,
    GenResult,
    LoadedModel,
    TokenStream,
    fetch_version,
    parse_model_ref,
)
from airloom.tokens import encode

log = logging.getLogger("airloom.serving.upstream")

UPSTREAM_KEY_ENV = "AIRLOOM_UPSTREAM_API_KEY"  # the upstream's own key, sent as a bearer token
HEALTH_TIMEOUT_S = 2.0  # /healthz's probe of the upstream; Kubernetes' probes time out after 1-10 s
# Idle connections are closed by the gateway before uvicorn (vLLM's and SGLang's server, airloom serve)
# closes them after its 5 s: a POST on a connection the server is closing would fail, not be retried.
KEEPALIVE_S = 4.0
PLACEHOLDERS = ("model_dir", "port", "served_name", "python")


def render_command(template: str, *, model_dir: str, port: int, served_name: str) -> list[str]:
    """``--upstream-command`` as argv: split like a shell line, then each word's placeholders filled,
    so a folder with spaces stays one argument and nothing is interpreted by a shell."""
    try:
        words = shlex.split(template)
    except ValueError as exc:
        raise UsageError(f"--upstream-command {template!r}: {exc}") from exc
    if not words:
        raise UsageError("--upstream-command is empty")
    values = {"model_dir": model_dir, "port": port, "served_name": served_name, "python": sys.executable}
    argv = []
    for word in words:
        try:
            argv.append(word.format_map(values))
        except KeyError as exc:
            raise UsageError(
                f"--upstream-command: unknown placeholder {{{exc.args[0]}}} in {word!r}; the placeholders "
                f"are {', '.join('{' + p + '}' for p in PLACEHOLDERS)} (write {{{{ and }}}} for literal braces)"
            ) from None
        except (ValueError, IndexError) as exc:
            raise UsageError(
                f"--upstream-command: {word!r}: {exc} (write {{{{ and }}}} for literal braces)"
            ) from None
    return argv


def check_command(template: str) -> None:
    """Refuse a command that could not serve the version: it must take ``{model_dir}`` and ``{port}``."""
    render_command(template, model_dir="dir", port=1, served_name="x")  # placeholders and quoting
    for needed in ("{model_dir}", "{port}"):
        if needed not in template:
            raise UsageError(
                f"--upstream-command must contain {needed}: the gateway starts the server on the "
                f"version's folder and picks its port, e.g. 'vllm serve {{model_dir}} --port {{port}}'"
            )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group: read from /proc where there is one."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


_TRY_MODELS = "try /v1/models"


def _health_verdict(path: str, status: int) -> str | None:
    """None for a healthy answer, :data:`_TRY_MODELS` where a server has no ``/health``, else why not."""
    if status == 200:
        return None
    if status in (401, 403):
        return f"GET {path} answered {status}: set {UPSTREAM_KEY_ENV} to the upstream's API key"
    if path == "/health" and status in (404, 405):
        return _TRY_MODELS
    return f"GET {path} answered {status}"  # up, not ready (llama.cpp answers 503 while loading)


def load_version_files(registry: ModelRegistry, name: str, version: int, cache_dir: Path) -> LoadedModel:
    """A version as the gateway needs it: downloaded and checked (the upstream loads this folder), its
    tokenizer (prompt rendering, token counts) and config (context length); not its weights."""
    from transformers import AutoConfig, AutoTokenizer

    started = time.monotonic()
    folder = fetch_version(registry, name, version, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = AutoConfig.from_pretrained(folder)
    log.info("%s/%s: files checked, tokenizer loaded in %.1fs", name, version, time.monotonic() - started)
    now = datetime.now(UTC).isoformat()
    return LoadedModel(name, version, str(folder), None, tokenizer, now, None, config)


class UpstreamServer:
    """One upstream: where it answers, the model name it is sent, the version it serves, and its
    process when the gateway started it. ``inflight`` counts the gateway's requests on it."""

    def __init__(
        self,
        version: LoadedModel,
        base_url: str,
        *,
        argv: list[str] | None = None,
        process: subprocess.Popen | None = None,
    ) -> None:
        self.version, self.base_url, self.argv, self.process = version, base_url.rstrip("/"), argv, process
        self.model = version.ref  # replaced by the id /v1/models lists, when it lists one
        self.inflight = 0
        self.tail: deque[str] = deque(maxlen=40)
        self._reader: threading.Thread | None = None

    @classmethod
    def launch(cls, template: str, version: LoadedModel) -> UpstreamServer:
        """Start the command on ``version``'s folder on a free loopback port, in its own process group."""
        port = free_port()
        argv = render_command(template, model_dir=version.path, port=port, served_name=version.ref)
        try:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: stopping it stops what it started too
                text=True,
                errors="replace",
                bufsize=1,
            )
        except OSError as exc:
            raise UsageError(f"--upstream-command: cannot run {shlex.join(argv)}: {exc}") from exc
        server = cls(version, f"http://127.0.0.1:{port}", argv=argv, process=process)
        server._reader = threading.Thread(
            target=server._read_output, name=f"airloom-upstream-{process.pid}", daemon=True
        )
        server._reader.start()
        log.info(
            "started %s for %s (pid %d): %s", server.base_url, version.ref, process.pid, shlex.join(argv)
        )
        return server

    def _read_output(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        prefix = f"[upstream {self.version.ref} pid {self.process.pid}]"
        for line in self.process.stdout:
            line = line.rstrip("\n")
            self.tail.append(line)
            log.info("%s %s", prefix, line)

    def _output_tail(self) -> str:
        if self._reader is not None:
            self._reader.join(timeout=2)
        lines = list(self.tail)[-20:]
        return "its last output:\n" + "\n".join(lines) if lines else "it wrote no output"

    def _probe(self, client: httpx.Client) -> str | None:
        """None when healthy, else why not."""
        try:
            verdict = _health_verdict("/health", client.get(self.base_url + "/health").status_code)
            if verdict == _TRY_MODELS:
                verdict = _health_verdict("/v1/models", client.get(self.base_url + "/v1/models").status_code)
            return verdict
        except httpx.TransportError as exc:
            return f"{type(exc).__name__}: {exc}"

    async def aprobe(self, session: aiohttp.ClientSession, timeout: float) -> str | None:
        """:meth:`_probe` from the event loop, each call bounded by ``timeout`` seconds."""
        limit = aiohttp.ClientTimeout(total=timeout)
        try:
            async with session.get(self.base_url + "/health", timeout=limit) as r:
                verdict = _health_verdict("/health", r.status)
            if verdict == _TRY_MODELS:
                async with session.get(self.base_url + "/v1/models", timeout=limit) as r:
                    verdict = _health_verdict("/v1/models", r.status)
            return verdict
        except TimeoutError:
            return f"no answer to a health check within {timeout:g}s"
        except aiohttp.ClientError as exc:
            return f"{type(exc).__name__}: {exc}"

    def exited(self) -> str | None:
        """Why this server cannot serve because its process has ended (None while it runs)."""
        if self.process is None or self.process.poll() is None:
            return None
        last = next((line for line in reversed(self.tail) if line.strip()), None)
        return (
            f"the upstream server for {self.version.ref} (pid {self.process.pid}, {self.base_url}) exited "
            f"with code {self.process.returncode}; requests get 502 until the gateway is restarted"
            + (f"; its last output: {last}" if last else "")
        )

    def wait_healthy(self, timeout: float, stop: threading.Event, client: httpx.Client) -> None:
        """Poll until healthy; UsageError naming the command and its last output when the process exits
        first, the deadline passes or ``stop`` is set."""
        deadline = time.monotonic() + timeout
        command = f"; command: {shlex.join(self.argv)}" if self.argv else ""
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise UsageError(
                    f"the upstream server for {self.version.ref} exited with code {self.process.returncode} "
                    f"before it was healthy{command}\n{self._output_tail()}"
                )
            reason = self._probe(client)
            if reason is None:
                self._discover_model(client)
                return
            if time.monotonic() >= deadline:
                tail = f"\n{self._output_tail()}" if self.process is not None else ""
                raise UsageError(
                    f"the upstream server {self.base_url} for {self.version.ref} was not healthy after "
                    f"{timeout:g}s ({reason}){command}{tail}"
                )
            if stop.wait(0.2):
                raise UsageError(f"stopped while waiting for {self.base_url} to become healthy")

    def _discover_model(self, client: httpx.Client) -> None:
        """The model name to send: ours when the server lists it, else the one id it lists."""
        try:
            ids = [m["id"] for m in client.get(self.base_url + "/v1/models").json()["data"]]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return
        if self.model not in ids and len(ids) == 1:
            self.model = ids[0]
        elif self.model not in ids:
            log.warning("%s lists models %s; sending model=%r", self.base_url, ids, self.model)

    def stop(self, grace: float) -> None:
        """SIGTERM to the process group, SIGKILL to what is left after ``grace`` seconds; reaps the leader."""
        if self.process is None:
            return
        pgid = self.process.pid  # start_new_session: the leader's pid is the group id
        _signal_group(pgid, signal.SIGTERM)
        deadline, killed = time.monotonic() + grace, False
        while True:
            self.process.poll()
            if not group_members(pgid):
                break
            if time.monotonic() >= deadline:
                if killed:
                    log.error("%s (pid %d): processes left after SIGKILL", self.base_url, pgid)
                    break
                log.warning(
                    "%s (pid %d) still running %gs after SIGTERM: SIGKILL", self.base_url, pgid, grace
                )
                _signal_group(pgid, signal.SIGKILL)
                deadline, killed = time.monotonic() + 5, True  # until the kernel has taken them
            time.sleep(0.05)
        self.process.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        log.info("stopped %s for %s (pid %d)", self.base_url, self.version.ref, pgid)

    def describe(self) -> dict:
        proc = self.process
        return {
            "url": self.base_url,
            "model": self.model,
            "version": self.version.ref,
            "pid": proc.pid if proc is not None else None,
            "exit_code": proc.poll() if proc is not None else None,
            "in_flight": self.inflight,
        }


async def _lines(content: aiohttp.StreamReader) -> AsyncIterator[str]:
    """The lines of a server-sent event stream as they arrive (no limit on a line's length)."""
    buffer = b""
    async for chunk in content.iter_any():
        buffer += chunk
        if b"\n" in buffer:
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                yield line.rstrip(b"\r").decode("utf-8", "replace")
    if buffer:
        yield buffer.decode("utf-8", "replace")


@dataclass
class _Ticket:
    """One admitted request: the server it goes to, and whether it holds a slot yet."""

    server: UpstreamServer
    holding: bool = False
    done: bool = False


def _first_error(group: BaseExceptionGroup) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


async def _all(coros: list[Awaitable]) -> list:
    """Run together; the first failure cancels the rest and is raised as itself."""
    if len(coros) == 1:
        return [await coros[0]]
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(c) for c in coros]  # type: ignore[arg-type]
    except BaseExceptionGroup as group:
        raise _first_error(group) from None
    return [t.result() for t in tasks]


def _message(text: str) -> str:
    """The message of an OpenAI-shaped (or vLLM's older ``{"message": ...}``) error body."""
    try:
        data = json.loads(text)
        err = data.get("error")
        msg = (
            err.get("message") if isinstance(err, dict) else err or data.get("message") or data.get("detail")
        )
        return str(msg) if msg else text[:500]
    except (ValueError, AttributeError):
        return text[:500]


class UpstreamEngine(AliasFollower):
    """A :class:`~airloom.serving.engine.ServingEngine` whose generation runs on an upstream server.

    :param registry: where versions come from (their tokenizer, template and, with
        ``upstream_command``, the files the server loads).
    :param ref: ``NAME@ALIAS`` or ``NAME/VERSION``.
    :param cache_dir: downloaded versions go to ``<cache_dir>/<name>/<version>/``.
    :param upstream_url: a running server's base URL (a trailing ``/v1`` is dropped).
    :param upstream_command: the command that starts a server (see the module docstring).
    :param max_inflight: most requests forwarded at once (the upstream batches them).
    :param max_queue: most requests waiting for one of those; one more gets :class:`EngineBusy`.
    :param start_timeout: seconds a started server has to become healthy.
    :param request_timeout: seconds to wait for an upstream answer (or the next streamed chunk);
        also how long an old server is given to finish its requests after an alias move.
    :param stop_grace: seconds between SIGTERM and SIGKILL.
    :param api_key: sent to the upstream as a bearer token (default: env ``AIRLOOM_UPSTREAM_API_KEY``).
    """

    def __init__(
        self,
        registry: ModelRegistry,
        ref: str,
        *,
        cache_dir: str | Path,
        upstream_url: str | None = None,
        upstream_command: str | None = None,
        poll_seconds: float = 5.0,
        max_inflight: int = 64,
        max_queue: int = 128,
        start_timeout: float = 900.0,
        request_timeout: float = 600.0,
        stop_grace: float = 30.0,
        api_key: str | None = None,
    ) -> None:
        if (upstream_url is None) == (upstream_command is None):
            raise UsageError("give one of --upstream-url and --upstream-command")
        if upstream_command is not None:
            check_command(upstream_command)
        if upstream_url is not None:
            upstream_url = upstream_url.rstrip("/").removesuffix("/v1")
            if not upstream_url.startswith(("http://", "https://")):
                raise UsageError(f"--upstream-url must start with http:// or https://, got {upstream_url!r}")
        if max_inflight < 1 or max_queue < 1:
            raise UsageError("--upstream-concurrency and --max-queue must be at least 1")
        if poll_seconds <= 0 or start_timeout <= 0 or request_timeout <= 0 or stop_grace < 0:
            raise UsageError("poll, start and request timeouts must be positive, stop_grace >= 0")
        self.registry, self.spec = registry, ref
        self.name, pinned, self.alias = parse_model_ref(ref)
        self.cache_dir = Path(cache_dir)
        self.upstream_url, self.command = upstream_url, upstream_command
        self.poll_seconds, self.start_timeout = poll_seconds, start_timeout
        self.request_timeout, self.stop_grace = request_timeout, stop_grace
        self.max_inflight, self.max_queue = max_inflight, max_queue
        key = api_key if api_key is not None else os.environ.get(UPSTREAM_KEY_ENV)
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.batch_sizes: Counter[int] = Counter()  # the upstream batches; nothing to count here
        self.reloads: list[dict] = []
        self.last_reload_error: str | None = None
        self.requests = self.tokens_generated = self.cancelled_rows = 0
        self._failed_version: int | None = None
        self._lock = threading.Lock()  # the active server and its in-flight count, across threads
        self._stop = threading.Event()
        self._retiring: list[UpstreamServer] = []
        self._poller: threading.Thread | None = None
        self._session: aiohttp.ClientSession | None = None
        self._slots: asyncio.Semaphore | None = None
        self._waiting = self._running = 0
        version = pinned if pinned is not None else registry.resolve(ref).version
        self._active: UpstreamServer = self._launch(version)
        atexit.register(self._stop_all_now)  # the app's lifespan may never run (uvicorn failed to bind)
        if upstream_url is not None:
            log.info(
                "serving %s through %s (model %r)", self._active.version.ref, upstream_url, self._active.model
            )

    # -- servers (blocking: the caller's thread or the poll thread) --------------------------------

    def _sync_client(self) -> httpx.Client:
        return httpx.Client(timeout=5, headers=self._headers, trust_env=self.upstream_url is not None)

    def _launch(self, version: int) -> UpstreamServer:
        files = load_version_files(self.registry, self.name, version, self.cache_dir)
        if self.command is None:
            server = UpstreamServer(files, self.upstream_url)  # type: ignore[arg-type]
        else:
            server = UpstreamServer.launch(self.command, files)
        try:
            with self._sync_client() as client:
                server.wait_healthy(self.start_timeout, self._stop, client)
        except BaseException:
            server.stop(self.stop_grace)
            raise
        return server

    def check_alias(self) -> bool:
        """Read the alias once; when it moved, start a server on its target, switch to it once healthy,
        let the old one finish its requests and stop it. True if a switch happened."""
        if self.alias is None:
            return False
        target = self.registry.get_alias(self.name, self.alias)
        current = self._active.version
        if target == current.version and self._failed_version is not None:
            self._failed_version, self.last_reload_error = None, None  # moved back to what is served
        if target is None or target == current.version or target == self._failed_version:
            return False
        if self.command is None:
            self._failed_version = target  # said once per move
            self.last_reload_error = (
                f"{self.name}@{self.alias} -> {target}, but {self.upstream_url} serves {current.ref} "
                "(--upstream-url is not restarted by the gateway): start the upstream on the new "
                "version, then restart the gateway"
            )
            log.warning("%s", self.last_reload_error)
            return False
        try:
            new = self._launch(target)
        except Exception as exc:  # noqa: BLE001 - keep serving the old version
            return self._switch_failed(target, exc)
        with self._lock:
            old, self._active = self._active, new
            self._retiring.append(old)
        self._switched(old.version, new.version)
        log.info("%s@%s moved: now serving %s at %s", self.name, self.alias, new.version.ref, new.base_url)
        self._retire(old)
        return True

    def _retire(self, old: UpstreamServer) -> None:
        """Wait (at most ``request_timeout``) for the old server's requests to finish, then stop it."""
        deadline = time.monotonic() + self.request_timeout
        while old.inflight and time.monotonic() < deadline and not self._stop.wait(0.05):
            pass
        if old.inflight:
            log.warning("stopping %s with %d requests still on it", old.base_url, old.inflight)
        old.stop(self.stop_grace)
        with self._lock:
            if old in self._retiring:
                self._retiring.remove(old)

    def _stop_all_now(self) -> None:
        self._stop.set()
        for server in [*self._retiring, self._active]:
            if server.process is not None and server.process.poll() is None:
                server.stop(self.stop_grace)

    # -- lifecycle (the app's lifespan, inside the running loop) -----------------------------------

    def start(self) -> None:
        self._session = aiohttp.ClientSession(
            headers=self._headers,
            # sock_read: the wait for an answer, or for a stream's next chunk
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10.0, sock_read=self.request_timeout),
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S),
            trust_env=self.upstream_url is not None,  # proxies from the environment for a remote URL
        )
        self._slots = asyncio.Semaphore(self.max_inflight)
        self._start_polling()

    async def stop(self) -> None:
        self._stop.set()
        if self._poller is not None:
            await asyncio.to_thread(self._poller.join, self.start_timeout + self.stop_grace + 60)
        if self._session is not None:
            await self._session.close()
        await asyncio.to_thread(self._stop_all_now)

    # -- requests ----------------------------------------------------------------------------------

    @property
    def current(self) -> LoadedModel:
        return self._active.version

    @property
    def queue_depth(self) -> int:
        """Requests admitted but not yet forwarded (all ``max_inflight`` slots busy)."""
        return self._waiting

    def _admit(self) -> _Ticket:
        """Take a place for one request on the server serving now, or refuse it when the queue is full."""
        if self._session is None or self._slots is None:
            raise RuntimeError("UpstreamEngine.start() has not run (the app's lifespan starts it)")
        if self._running + self._waiting >= self.max_inflight + self.max_queue:
            raise EngineBusy(self._waiting)
        self._waiting += 1
        with self._lock:
            server = self._active
            server.inflight += 1
        return _Ticket(server)

    async def _hold(self, ticket: _Ticket) -> None:
        assert self._slots is not None
        await self._slots.acquire()
        self._waiting -= 1
        self._running += 1
        ticket.holding = True

    def _release(self, ticket: _Ticket) -> None:
        if ticket.done:
            return
        ticket.done = True
        if ticket.holding:
            self._running -= 1
            self._slots.release()  # type: ignore[union-attr]
        else:
            self._waiting -= 1
        with self._lock:
            ticket.server.inflight -= 1
        self.requests += 1

    async def submit(self, rows: list[GenRequest]) -> tuple[LoadedModel, list[GenResult]]:
        """Forward the rows of one request (one upstream call each, together); all on one server."""
        ticket = self._admit()
        try:
            await self._hold(ticket)
            results = await _all([self._complete(ticket.server, row) for row in rows])
        finally:
            self._release(ticket)
        return ticket.server.version, results

    def stream(self, rows: list[GenRequest]) -> TokenStream:
        """Forward the rows of one streamed request; their text arrives on the stream's queue."""
        ticket = self._admit()
        stream = TokenStream()
        stream.loaded = ticket.server.version

        async def job() -> None:
            try:
                await self._hold(ticket)
                await _all([self._stream_row(ticket.server, row, k, stream) for k, row in enumerate(rows)])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the handler sends it as the stream's error event
                log.warning("streamed request failed: %s", exc)
                stream.queue.put_nowait(exc)

        task = asyncio.get_running_loop().create_task(job())
        # A task cancelled before it first runs never enters job(): release in a callback, not a finally.
        task.add_done_callback(lambda _: self._release(ticket))
        stream.future = task
        return stream

    def _body(self, server: UpstreamServer, row: GenRequest, stream: bool) -> dict:
        body: dict[str, Any] = {
            "model": server.model,
            "prompt": row.prompt,
            "max_tokens": row.max_tokens,
            "temperature": row.temperature,
            "top_p": row.top_p,
            "add_special_tokens": False,  # the prompt's ids as in training (airloom.tokens.encode)
        }
        if row.stop:
            body["stop"] = list(row.stop)
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        return body

    def _refused(self, server: UpstreamServer, status: int, text: str, headers: Mapping) -> Exception:
        message = _message(text)
        if status == 429:
            retry = headers.get("retry-after", "1")
            return EngineBusy(self._waiting, int(retry) if retry.isdigit() else 1)
        if status in (400, 413, 422):
            return EngineError(400, f"the upstream server refused the request: {message}", "upstream_refused")
        if status in (401, 403):
            return EngineError(
                502,
                f"the upstream server {server.base_url} refused the gateway ({status}); set "
                f"{UPSTREAM_KEY_ENV} to its API key",
                "upstream_auth",
            )
        return EngineError(
            502, f"the upstream server {server.base_url} answered {status}: {message}", "upstream_error"
        )

    def _transport_error(self, server: UpstreamServer, exc: Exception) -> EngineError:
        if isinstance(exc, TimeoutError):
            return EngineError(
                504, f"the upstream server {server.base_url} did not answer in time", "upstream_timeout"
            )
        return EngineError(
            502, f"the upstream server {server.base_url} is unreachable: {exc!r}", "upstream_unreachable"
        )

    def _result(
        self, server: UpstreamServer, row: GenRequest, text: str, finish: str | None, usage: Any
    ) -> GenResult:
        """The row's result; token counts from the upstream's ``usage``, else the version's tokenizer."""
        usage = usage if isinstance(usage, dict) else {}
        prompt_tokens, completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if not isinstance(prompt_tokens, int):
            prompt_tokens = server.version.count_tokens(row.prompt)
        if not isinstance(completion_tokens, int):
            completion_tokens = len(encode(server.version.tokenizer, text)["input_ids"]) if text else 0
        self.tokens_generated += completion_tokens
        return GenResult(text, finish or "stop", prompt_tokens, completion_tokens)

    async def _complete(self, server: UpstreamServer, row: GenRequest) -> GenResult:
        assert self._session is not None
        try:
            async with self._session.post(
                server.base_url + "/v1/completions", json=self._body(server, row, False)
            ) as r:
                status, headers, raw = r.status, r.headers, await r.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._transport_error(server, exc) from exc
        if status != 200:
            raise self._refused(server, status, raw.decode("utf-8", "replace"), headers)
        try:
            data = json.loads(raw)
            choice = data["choices"][0]
            return self._result(
                server, row, choice.get("text") or "", choice.get("finish_reason"), data.get("usage")
            )
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise EngineError(
                502,
                f"the upstream server {server.base_url} answered no completion: "
                f"{raw[:300].decode('utf-8', 'replace')}",
            ) from exc

    async def _stream_row(self, server: UpstreamServer, row: GenRequest, k: int, stream: TokenStream) -> None:
        """Pass one row's chunks on as they arrive; its result (with the upstream's usage) at the end."""
        assert self._session is not None
        text, finish, usage, ended = "", None, None, False
        url = server.base_url + "/v1/completions"
        try:
            async with self._session.post(url, json=self._body(server, row, True)) as r:
                if r.status != 200:
                    body = (await r.read()).decode("utf-8", "replace")
                    raise self._refused(server, r.status, body, r.headers)
                async for line in _lines(r.content):
                    if ended or not line.startswith("data:"):
                        # Blank separators, comments, event names; after [DONE], the end of the body is
                        # still read: aiohttp reuses a connection only once its response is complete.
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        ended = True
                        continue
                    chunk = json.loads(data)
                    if chunk.get("error"):
                        raise EngineError(
                            502, f"the upstream server failed: {_message(data)}", "upstream_error"
                        )
                    for choice in chunk.get("choices") or ():
                        piece = choice.get("text") or ""
                        if piece:
                            text += piece
                            stream.tokens[k] += 1  # a chunk per token, as vLLM and Airloom send them
                            stream.queue.put_nowait((k, piece))
                        finish = choice.get("finish_reason") or finish
                    usage = chunk.get("usage") or usage
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._transport_error(server, exc) from exc
        except asyncio.CancelledError:
            self.cancelled_rows += 1
            raise
        except (ValueError, AttributeError, TypeError) as exc:
            raise EngineError(
                502, f"the upstream server {server.base_url} sent a malformed event: {exc}"
            ) from exc
        if not ended and finish is None:
            raise EngineError(502, f"the upstream server {server.base_url} ended the stream early")
        stream.queue.put_nowait((k, self._result(server, row, text, finish, usage)))

    async def health(self) -> str | None:
        """None while the serving upstream runs and answers its health check; else why not."""
        server = self._active
        reason = server.exited()
        if reason is None and self._session is not None:
            probe = await server.aprobe(self._session, HEALTH_TIMEOUT_S)
            if probe is not None:
                reason = (
                    f"the upstream server {server.base_url} for {server.version.ref} is not healthy: {probe}"
                )
        return reason

    def stats(self) -> dict:
        with self._lock:
            active, retiring = self._active, list(self._retiring)
        return {
            "engine": "upstream",
            "upstream": active.describe(),
            "retiring": [s.describe() for s in retiring],
            "requests": self.requests,
            "tokens_generated": self.tokens_generated,
            "cancelled_rows": self.cancelled_rows,
            "in_flight": self._running,
            "max_inflight": self.max_inflight,
            "queued": self._waiting,
            "max_queue": self.max_queue,
        }
