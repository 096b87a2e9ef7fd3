"""The OpenAI-compatible HTTP app: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``,
``/v1/feedback`` and ``/healthz`` (503 when the engine cannot serve), over a
:class:`~airloom.serving.engine.ServingEngine`: the in-process transformers
:class:`~airloom.serving.engine.Engine` or, as a gateway, an
:class:`~airloom.serving.upstream.UpstreamEngine` (prompts are rendered here either way).

Requests and responses follow the shapes the ``openai`` Python client sends and parses (``id``,
``object``, ``created``, ``model``, ``choices``, ``usage``; errors as ``{"error": {message, type,
param, code}}``). ``model`` in every answer and the ``x-airloom-model-version`` header name the
version that produced it (``NAME/VERSION``; a stream's header names the version served when the
request arrived, its chunks the one that generated them). ``stream=true`` answers with server-sent
events as OpenAI's API does; ``echo``, ``logprobs`` and ``best_of`` are refused with 400 rather than
ignored.

Every path but ``/healthz`` (and ``/metrics`` unless ``metrics_require_key``) needs a bearer API key
when keys are configured (:mod:`airloom.serving.auth`); request bodies over ``max_body_bytes`` get
413, a full engine queue 429 with ``Retry-After``, more than ``max_request_tokens`` generated tokens
asked for in one request (prompts × ``n`` × ``max_tokens``) 400. ``/metrics`` is Prometheus' text format
(:mod:`airloom.serving.metrics`).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from airloom.serving.auth import ApiKeys
from airloom.serving.engine import (
    EngineBusy,
    EngineError,
    GenRequest,
    GenResult,
    LoadedModel,
    ServingEngine,
)
from airloom.serving.logs import Batching, FeedbackLog, TrafficLog
from airloom.serving.metrics import ServingMetrics

VERSION_HEADER = "x-airloom-model-version"
VERSION_HEADER_BYTES = VERSION_HEADER.encode()
DEFAULT_CHAT_MAX_TOKENS = 128  # OpenAI's chat default is "up to the context"; a bound keeps batches short
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: far above any prompt a context window holds
DEFAULT_MAX_REQUEST_TOKENS = 8192  # prompts × n × max_tokens: one request must not hold the batch for minutes
ENDPOINTS = {"completions": "/v1/completions", "chat.completions": "/v1/chat/completions"}


class OpenAIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _error_body(message: str, type_: str, param: str | None, code: str | None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


async def _send_error(send, status: int, message: str, code: str, headers: tuple = ()) -> None:
    data = json.dumps(_error_body(message, "invalid_request_error", None, code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


class _Gate:
    """API key, body size, request metrics and the version header, as plain ASGI: it has to answer
    before FastAPI reads and parses the body, and it sees every response (401, 413 and streams
    included). Plain ASGI rather than ``@app.middleware("http")``: Starlette's ``BaseHTTPMiddleware``
    runs each request through an extra task and memory stream, a cost a gateway pays twice per request
    (its own app and the upstream's).

    :param version: the ``NAME/VERSION`` to put in the version header of a response that has none.
    """

    def __init__(
        self,
        app,
        *,
        keys: ApiKeys | None,
        open_paths: set[str],
        max_body_bytes: int,
        metrics,
        routes,
        version,
    ):
        self.app, self.keys, self.open_paths, self.max_body = app, keys, open_paths, max_body_bytes
        self.metrics, self._routes, self._known, self._version = metrics, routes, None, version

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, path, status = time.monotonic(), scope["path"], 500
        if self._known is None:
            self._known = self._routes()
        endpoint = path if path in self._known else "other"  # bounded label values

        async def send_and_see(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        async def send_versioned(message):  # the app's answers (not the gate's own 401/413)
            if message["type"] == "http.response.start":
                headers = message.get("headers") or []
                if not any(k.lower() == VERSION_HEADER_BYTES for k, _ in headers):
                    version = self._version().encode("latin-1")
                    message = {**message, "headers": [*headers, (VERSION_HEADER_BYTES, version)]}
            await send_and_see(message)

        try:
            headers = dict(scope["headers"])
            if self.keys is not None and path not in self.open_paths:
                auth = headers.get(b"authorization", b"").decode("latin-1")
                if not self.keys.check(auth):
                    message = (
                        "incorrect API key provided"
                        if auth
                        else "no API key provided: send the header Authorization: Bearer <key>"
                    )
                    await _send_error(
                        send_and_see, 401, message, "invalid_api_key", ((b"www-authenticate", b"Bearer"),)
                    )
                    return
            if scope["method"] in ("POST", "PUT", "PATCH"):
                receive = await self._bounded_body(headers, receive, send_and_see)
                if receive is None:
                    if status == 500:
                        status = 499  # the client went away while sending its body
                    return
            await self.app(scope, receive, send_versioned)
        finally:
            self.metrics.observe_request(endpoint, status, time.monotonic() - started)

    async def _bounded_body(self, headers: dict, receive, send):
        """Read the body (at most ``max_body`` bytes) and return a ``receive`` that replays it; None
        when answered 413 or the client disconnected. Content-Length is checked first but not trusted."""
        too_large = f"request body larger than this server's limit of {self.max_body} bytes"
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body:
            await _send_error(send, 413, too_large, "request_too_large")
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await _send_error(send, 413, too_large, "request_too_large")
                return None
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the client's disconnect, when it comes
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return replay


# -- request bodies -----------------------------------------------------------------------------
# OpenAI clients send fields this server has no use for (user, seed, metadata, ...): extra="allow".


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = None


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=16)
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logprobs: Any = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(None, ge=1)
    echo: bool | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("must not be an empty list")
        return v


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    response_id: str = Field(min_length=1, max_length=200)
    rating: str | int
    corrected_answer: str | None = Field(None, max_length=20_000)
    comment: str | None = Field(None, max_length=5_000)

    @field_validator("rating", mode="before")
    @classmethod
    def _rating(cls, v):
        # bool is an int in Python; "true" is not a rating.
        if v in ("up", "down") or (type(v) is int and 1 <= v <= 5):
            return v
        raise ValueError(f"must be 'up', 'down' or an integer from 1 to 5; got {v!r}")


def rating_sign(rating: str | int) -> int:
    """+1 / -1 / 0 (neutral), the scale ``airloom.monitoring.drift.feedback_summary`` counts."""
    if rating == "up":
        return 1
    if rating == "down":
        return -1
    return 1 if rating >= 4 else -1 if rating <= 2 else 0


# -- prompts ------------------------------------------------------------------------------------


def render_chat(messages: list[ChatMessage], tokenizer: Any) -> str:
    """The prompt the model reads for ``messages``: rendered with the model folder's chat template (the
    one it trained with), else alpaca on the last user turn, for a model trained on instruction rows
    (:func:`airloom.evaluation.chat.chat_prompt`, which the canary renders with too)."""
    from airloom.evaluation.chat import chat_prompt
    from airloom.exceptions import UsageError

    turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    try:
        return chat_prompt(turns, tokenizer)
    except UsageError as exc:
        raise OpenAIError(400, str(exc), param="messages") from exc


# -- the app ------------------------------------------------------------------------------------


def create_app(
    engine: ServingEngine,
    *,
    traffic_dir: str | Path,
    feedback_dir: str | Path,
    api_keys: ApiKeys | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_request_tokens: int = DEFAULT_MAX_REQUEST_TOKENS,
    metrics_require_key: bool = False,
    log_batching: Batching | None = None,
) -> FastAPI:
    """The app over ``engine``; ``api_keys`` None serves without authentication (see docs/serving.md).

    ``traffic_dir`` and ``feedback_dir`` are folders or ``s3://`` prefixes; an ``s3://`` log is written in
    batched objects (``log_batching``, :mod:`airloom.serving.logs`), the last batch when the app shuts down.
    """
    traffic = TrafficLog(traffic_dir, batching=log_batching)
    feedback = FeedbackLog(feedback_dir, batching=log_batching)
    metrics = ServingMetrics(engine, logs={"traffic": traffic, "feedback": feedback})

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            try:
                await engine.stop()
            finally:
                # After the engine: a request it finished while stopping is logged, then written.
                await asyncio.gather(asyncio.to_thread(traffic.close), asyncio.to_thread(feedback.close))

    app = FastAPI(title="Airloom model server", lifespan=lifespan)
    app.state.engine, app.state.traffic, app.state.feedback = engine, traffic, feedback
    app.state.metrics = metrics

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError):
        return JSONResponse(_error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(EngineBusy)
    async def _busy(request: Request, exc: EngineBusy):
        return JSONResponse(
            _error_body(str(exc), "rate_limit_error", None, "queue_full"),
            status_code=429,
            headers={"Retry-After": str(exc.retry_after)},
        )

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, exc: EngineError):
        type_ = "invalid_request_error" if exc.status < 500 else "server_error"
        return JSONResponse(_error_body(exc.message, type_, None, exc.code), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = jsonable_encoder(exc.errors())
        parts, first_field = [], None
        for e in errors:
            loc = [str(x) for x in e.get("loc", ()) if x != "body"]
            name = ".".join(loc) or "body"
            first_field = first_field or (loc[0] if loc else None)
            parts.append(f"{name}: {e.get('msg')}")
        body = _error_body("; ".join(parts), "invalid_request_error", first_field, None)
        body["detail"] = errors  # FastAPI's usual list, for clients that read it
        return JSONResponse(body, status_code=422)

    # Outermost: unauthenticated and oversized requests go no further.
    app.add_middleware(
        _Gate,
        keys=api_keys,
        open_paths={"/healthz", "/health"} | (set() if metrics_require_key else {"/metrics"}),
        max_body_bytes=max_body_bytes,
        metrics=metrics,
        routes=lambda: {getattr(r, "path", None) for r in app.routes},
        version=lambda: engine.current.ref,
    )

    def _check_model(requested: str | None) -> None:
        served = {engine.name, engine.spec, engine.current.ref}
        if requested and requested not in served:
            raise OpenAIError(
                404,
                f"model {requested!r} is not served here; this server serves "
                f"{engine.spec} (now {engine.current.ref})",
                type_="not_found_error",
                param="model",
                code="model_not_found",
            )

    def _refuse_unsupported(req: _Sampling) -> None:
        if req.stream_options is not None and not req.stream:
            raise OpenAIError(400, "stream_options is only allowed with stream=true", param="stream_options")
        if req.logprobs not in (None, False, 0):
            raise OpenAIError(400, "logprobs are not supported by this server", param="logprobs")

    def _rows(prompts: list[str], req: _Sampling, max_tokens: int) -> list[GenRequest]:
        loaded = engine.current
        ctx = loaded.context_length
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        n = req.n or 1
        stop = req.stops()
        if isinstance(req, ChatRequest) and loaded.turn_end and loaded.turn_end not in stop:
            # The end of an assistant turn in the model's chat template: the answer ends there, not at
            # the EOS the model writes after it (see airloom.evaluation.chat).
            stop += (loaded.turn_end,)
        if len(prompts) * n * max_tokens > max_request_tokens:
            times = f"{len(prompts)} prompts × " if len(prompts) > 1 else ""
            raise OpenAIError(
                400,
                f"{times}n {n} × max_tokens {max_tokens} = {len(prompts) * n * max_tokens} tokens to "
                f"generate exceed this server's limit of {max_request_tokens} per request; lower n or max_tokens",
                param="max_tokens",
                code="request_tokens_exceeded",
            )
        rows = []
        for i, p in enumerate(prompts):
            n_prompt = loaded.count_tokens(p)
            if ctx and n_prompt + max_tokens > ctx:
                where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
                raise OpenAIError(
                    400,
                    f"{where}: {n_prompt} prompt tokens + max_tokens {max_tokens} exceed the "
                    f"model's context of {ctx} tokens; shorten the prompt or lower max_tokens",
                    param="prompt" if isinstance(req, CompletionRequest) else "messages",
                    code="context_length_exceeded",
                )
            rows.extend(GenRequest(p, max_tokens, temperature, top_p, stop) for _ in range(n))
        return rows

    async def _run(prompts: list[str], req: _Sampling, max_tokens: int, kind: str, messages: list | None):
        started = time.monotonic()
        created = datetime.now(UTC)
        rows = _rows(prompts, req, max_tokens)
        loaded, results = await engine.submit(rows)
        metrics.observe_ttft(ENDPOINTS[kind], started)  # not streamed: the first token comes with the last
        response_id = _new_id(kind)
        _log(response_id, kind, created, started, loaded, rows, results, messages)
        return response_id, int(created.timestamp()), loaded, rows, results

    def _new_id(kind: str) -> str:
        return f"{'cmpl' if kind == 'completions' else 'chatcmpl'}-{uuid.uuid4().hex}"

    def _log(response_id, kind, created, started, loaded, rows, results, messages) -> None:
        """One traffic record per choice, and the request's token counts."""
        latency_ms = round((time.monotonic() - started) * 1000, 2)
        usage = _usage(rows, results)
        metrics.count_tokens(ENDPOINTS[kind], usage["prompt_tokens"], usage["completion_tokens"])
        records = []
        for index, (row, res) in enumerate(zip(rows, results, strict=True)):
            records.append(
                {
                    "id": response_id if len(rows) == 1 else f"{response_id}-{index}",
                    "response_id": response_id,
                    "choice": index,
                    "endpoint": kind,
                    "created": created.isoformat(),
                    "model": loaded.ref,
                    "model_name": loaded.name,
                    "model_version": loaded.version,
                    "prompt": row.prompt,
                    "response": res.text,
                    **({"messages": messages} if messages else {}),
                    "finish_reason": res.finish_reason,
                    "latency_ms": latency_ms,
                    "prompt_tokens": res.prompt_tokens,
                    "completion_tokens": res.completion_tokens,
                    "params": {
                        "max_tokens": row.max_tokens,
                        "temperature": row.temperature,
                        "top_p": row.top_p,
                        "stop": list(row.stop),
                    },
                }
            )
        traffic.write(records, created)

    def _stream(prompts: list[str], req: _Sampling, max_tokens: int, kind: str, messages: list | None):
        """Server-sent events as OpenAI sends them: a chunk per new piece of text (chat: a first one
        with the role), one with each choice's ``finish_reason``, the usage chunk when asked, ``[DONE]``.
        Chunks already waiting when one is sent go out with it in one write (a reader that falls behind,
        as a gateway under load does, costs fewer writes; the first chunk is never held back)."""
        started, created = time.monotonic(), datetime.now(UTC)
        rows = _rows(prompts, req, max_tokens)
        stream = engine.stream(rows)  # a full queue answers 429 here, before any byte is sent
        response_id, chat = _new_id(kind), kind == "chat.completions"
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def event(loaded: LoadedModel, choices: list[dict], **extra) -> str:
            obj = "chat.completion.chunk" if chat else "text_completion"
            body = {**_envelope(response_id, obj, int(created.timestamp()), loaded, choices), **extra}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def choice(i: int, text: str | None, finish: str | None, role: bool = False) -> dict:
            if not chat:
                return {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
            delta = (
                {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            )
            return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}

        async def events():
            sent, results = [""] * len(rows), [None] * len(rows)
            first, failed = True, False
            out: list[str] = []
            try:
                while None in results:
                    out = []
                    item = await stream.queue.get()
                    while True:  # with whatever else has arrived: one write for them all
                        if isinstance(item, Exception):
                            failed = True  # not logged, as a failed non-streamed request
                            body = _error_body(f"generation failed: {item}", "server_error", None, None)
                            out.append(f"data: {json.dumps(body)}\n\n")
                            yield "".join(out)
                            return
                        i, piece = item
                        if first:
                            first = False
                            metrics.observe_ttft(ENDPOINTS[kind], started)
                            if chat:
                                out.extend(
                                    event(stream.loaded, [choice(k, None, None, role=True)])
                                    for k in range(len(rows))
                                )
                        if isinstance(piece, str):
                            sent[i] += piece
                            out.append(event(stream.loaded, [choice(i, piece, None)]))
                        else:
                            results[i] = piece
                            out.append(event(stream.loaded, [choice(i, None, piece.finish_reason)]))
                        if stream.queue.empty() or None not in results:
                            break
                        item = stream.queue.get_nowait()
                    if None in results:
                        yield "".join(out)
                # Logged before the last chunks: a client that has read [DONE] finds its answer logged.
                _log(response_id, kind, created, started, stream.loaded, rows, results, messages)
                if include_usage:
                    out.append(event(stream.loaded, [], usage=_usage(rows, results)))
                out.append("data: [DONE]\n\n")
                yield "".join(out)
            finally:
                if None in results and not failed:
                    # The client went away: stop its rows, log what it was sent, marked so.
                    stream.cancel()
                    loaded = stream.loaded or engine.current
                    partial = [
                        r
                        or GenResult(
                            sent[k],
                            "client_disconnected",
                            loaded.count_tokens(rows[k].prompt),
                            stream.tokens[k],
                        )
                        for k, r in enumerate(results)
                    ]
                    _log(response_id, kind, created, started, loaded, rows, partial, messages)

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={VERSION_HEADER: engine.current.ref}
        )

    def _envelope(rid: str, obj: str, created: int, loaded: LoadedModel, choices: list) -> dict:
        """OpenAI's fields around the choices, the same in an answer and in each streamed chunk."""
        return {
            "id": rid,
            "object": obj,
            "created": created,
            "model": loaded.ref,
            "system_fingerprint": None,
            "choices": choices,
        }

    def _usage(rows: list[GenRequest], results) -> dict:
        # Prompt tokens count each distinct prompt once, as OpenAI does for n > 1.
        seen: dict[str, int] = {}
        for row, res in zip(rows, results, strict=True):
            seen[row.prompt] = res.prompt_tokens
        prompt_tokens = sum(seen.values())
        completion_tokens = sum(r.completion_tokens for r in results)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def _respond(
        rid: str, obj: str, created: int, loaded: LoadedModel, choices: list, rows, results
    ) -> JSONResponse:
        """A non-streamed answer (completions or chat): the envelope, its choices and the usage."""
        body = {**_envelope(rid, obj, created, loaded, choices), "usage": _usage(rows, results)}
        return JSONResponse(body, headers={VERSION_HEADER: loaded.ref})

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        _check_model(req.model)
        _refuse_unsupported(req)
        if req.echo:
            raise OpenAIError(400, "echo=true is not supported by this server", param="echo")
        if req.best_of not in (None, 1):
            raise OpenAIError(400, "best_of is not supported by this server; use n", param="best_of")
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        max_tokens = req.max_tokens or 16  # OpenAI's default for completions
        if req.stream:
            return _stream(prompts, req, max_tokens, "completions", None)
        rid, created, loaded, rows, results = await _run(prompts, req, max_tokens, "completions", None)
        choices = [
            {"text": res.text, "index": i, "logprobs": None, "finish_reason": res.finish_reason}
            for i, res in enumerate(results)
        ]
        return _respond(rid, "text_completion", created, loaded, choices, rows, results)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        _check_model(req.model)
        _refuse_unsupported(req)
        prompt = render_chat(req.messages, engine.current.counting_tokenizer or engine.current.tokenizer)
        max_tokens = req.max_completion_tokens or req.max_tokens or DEFAULT_CHAT_MAX_TOKENS
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        if req.stream:
            return _stream([prompt], req, max_tokens, "chat.completions", messages)
        rid, created, loaded, rows, results = await _run(
            [prompt], req, max_tokens, "chat.completions", messages
        )
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": res.text, "refusal": None},
                "logprobs": None,
                "finish_reason": res.finish_reason,
            }
            for i, res in enumerate(results)
        ]
        return _respond(rid, "chat.completion", created, loaded, choices, rows, results)

    @app.get("/v1/models")
    async def models():
        loaded = engine.current
        return {
            "object": "list",
            "data": [
                {
                    "id": loaded.ref,
                    "object": "model",
                    "owned_by": "airloom",
                    "created": int(datetime.fromisoformat(loaded.loaded_at).timestamp()),
                }
            ],
        }

    @app.post("/v1/feedback", status_code=201)
    async def post_feedback(req: FeedbackRequest):
        # On S3 a miss in memory lists and reads objects: off the event loop.
        found = (
            await asyncio.to_thread(traffic.find, req.response_id)
            if traffic.remote
            else traffic.find(req.response_id)
        )
        if found is None:
            raise OpenAIError(
                404,
                f"response_id {req.response_id!r}: no such response in the last "
                f"{traffic.lookup_days} days of traffic",
                type_="not_found_error",
                param="response_id",
                code="response_not_found",
            )
        created = datetime.now(UTC)
        record = {
            "id": f"fb-{uuid.uuid4().hex}",
            "response_id": req.response_id,
            "created": created.isoformat(),
            "rating": rating_sign(req.rating),
            "rating_raw": req.rating,
            "scale": "thumbs" if isinstance(req.rating, str) else "1-5",
            "corrected_answer": req.corrected_answer,
            "comment": req.comment,
            "model": found["model"],
            "response_ds": found["ds"],
            "prompt": found["prompt"],
            "response": found["response"],
        }
        clean = feedback.write(record, created)
        return {
            "id": clean["id"],
            "object": "feedback",
            "response_id": req.response_id,
            "created": int(created.timestamp()),
            "rating": clean["rating"],
        }

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/healthz")
    @app.get("/health", include_in_schema=False)  # vLLM's name: a gateway in front of us probes it
    async def healthz():
        """200 while the engine can serve; 503 with the reason when it cannot (an upstream process that
        exited or does not answer), so a load balancer or a Kubernetes probe takes the server out."""
        reason = await engine.health()
        loaded = engine.current
        body = {
            "status": "ok" if reason is None else "unhealthy",
            "reason": reason,
            "model": loaded.ref,
            "name": loaded.name,
            "version": loaded.version,
            "serving": engine.spec,
            "loaded_at": loaded.loaded_at,
            "reloads": engine.reloads,
            "last_reload_error": engine.last_reload_error,
            **engine.stats(),
            # s3:// logs only: what is written, held in memory, dropped (logging never makes the server unhealthy)
            **{
                f"{name}_log": log.stats()
                for name, log in (("traffic", traffic), ("feedback", feedback))
                if log.remote
            },
        }
        return JSONResponse(body, status_code=200 if reason is None else 503)

    return app


def serve(
    engine: ServingEngine,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    traffic_dir: str | Path,
    feedback_dir: str | Path,
    log_level: str = "info",
    **options: Any,
) -> None:
    """Run the app with uvicorn until interrupted (one process: batching needs one queue).

    ``options`` go to :func:`create_app` (``api_keys``, limits); the caller checks the host against
    the keys first (:func:`airloom.serving.auth.check_exposure`).
    """
    import uvicorn

    app = create_app(engine, traffic_dir=traffic_dir, feedback_dir=feedback_dir, **options)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
