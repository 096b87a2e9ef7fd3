"""The OpenAI-compatible HTTP app: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``,
``/v1/feedback`` and ``/healthz``.

Requests and responses follow the shapes the ``openai`` Python client sends and parses (``id``,
``object``, ``created``, ``model``, ``choices``, ``usage``; errors as ``{"error": {message, type,
param, code}}``). ``model`` in every answer and the ``x-airloom-model-version`` header name the
version that produced it (``NAME/VERSION``). Streaming, ``echo``, ``logprobs`` and ``best_of`` are
refused with 400 rather than ignored.
"""

from __future__ import annotations

import time
import uuid
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from airloom.serving.engine import Engine, GenRequest, LoadedModel
from airloom.serving.logs import FeedbackLog, TrafficLog

VERSION_HEADER = "x-airloom-model-version"
DEFAULT_CHAT_MAX_TOKENS = 128  # OpenAI's chat default is "up to the context"; a bound keeps batches short


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


# -- request bodies -----------------------------------------------------------------------------
# OpenAI clients send fields this server has no use for (user, seed, metadata, ...): extra="allow".


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=16)
    stop: str | list[str] | None = None
    stream: bool | None = None
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
    """The tokenizer's chat template if it has one; else the project's alpaca prompt.

    Alpaca is single-turn: the last user message is the instruction, and a blank line in it
    separates instruction from input (the inverse of :func:`airloom.data.prompts.prompt_context`).
    """
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    from airloom.data.prompts import render_prompt

    users = [t["content"] for t in turns if t["role"] == "user"]
    if not users:
        raise OpenAIError(400, "messages must contain a user message", param="messages")
    instruction, _, inp = users[-1].partition("\n\n")
    return render_prompt(instruction.strip(), inp.strip() or None)


# -- the app ------------------------------------------------------------------------------------


def create_app(engine: Engine, *, traffic_dir: str | Path, feedback_dir: str | Path) -> FastAPI:
    traffic = TrafficLog(traffic_dir)
    feedback = FeedbackLog(feedback_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await engine.stop()

    app = FastAPI(title="Airloom model server", lifespan=lifespan)
    app.state.engine, app.state.traffic, app.state.feedback = engine, traffic, feedback

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError):
        return JSONResponse(_error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status)

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

    @app.middleware("http")
    async def _version_header(request: Request, call_next):
        response = await call_next(request)
        if VERSION_HEADER not in response.headers:
            response.headers[VERSION_HEADER] = engine.current.ref
        return response

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
        if req.stream:
            raise OpenAIError(
                400, "stream=true is not supported by this server; send stream=false", param="stream"
            )
        if req.logprobs not in (None, False, 0):
            raise OpenAIError(400, "logprobs are not supported by this server", param="logprobs")

    def _rows(prompts: list[str], req: _Sampling, max_tokens: int) -> list[GenRequest]:
        loaded = engine.current
        ctx = loaded.context_length
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
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
            rows.extend(GenRequest(p, max_tokens, temperature, top_p, req.stops()) for _ in range(req.n or 1))
        return rows

    async def _run(prompts: list[str], req: _Sampling, max_tokens: int, kind: str, messages: list | None):
        started = time.monotonic()
        created = datetime.now(UTC)
        rows = _rows(prompts, req, max_tokens)
        loaded, results = await engine.submit(rows)
        latency_ms = round((time.monotonic() - started) * 1000, 2)
        prefix = "cmpl" if kind == "completions" else "chatcmpl"
        response_id = f"{prefix}-{uuid.uuid4().hex}"
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
        return response_id, int(created.timestamp()), loaded, rows, results

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

    def _respond(body: dict, loaded: LoadedModel) -> JSONResponse:
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
        rid, created, loaded, rows, results = await _run(prompts, req, max_tokens, "completions", None)
        choices = [
            {"text": res.text, "index": i, "logprobs": None, "finish_reason": res.finish_reason}
            for i, res in enumerate(results)
        ]
        return _respond(
            {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": loaded.ref,
                "system_fingerprint": None,
                "choices": choices,
                "usage": _usage(rows, results),
            },
            loaded,
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        _check_model(req.model)
        _refuse_unsupported(req)
        prompt = render_chat(req.messages, engine.current.counting_tokenizer or engine.current.tokenizer)
        max_tokens = req.max_completion_tokens or req.max_tokens or DEFAULT_CHAT_MAX_TOKENS
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
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
        return _respond(
            {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": loaded.ref,
                "system_fingerprint": None,
                "choices": choices,
                "usage": _usage(rows, results),
            },
            loaded,
        )

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
        found = traffic.find(req.response_id)
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

    @app.get("/healthz")
    async def healthz():
        loaded = engine.current
        return {
            "status": "ok",
            "model": loaded.ref,
            "name": loaded.name,
            "version": loaded.version,
            "serving": engine.spec,
            "loaded_at": loaded.loaded_at,
            "reloads": engine.reloads,
            "last_reload_error": engine.last_reload_error,
            **engine.stats(),
        }

    return app


def serve(
    engine: Engine,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    traffic_dir: str | Path,
    feedback_dir: str | Path,
    log_level: str = "info",
) -> None:
    """Run the app with uvicorn until interrupted (one process: batching needs one queue)."""
    import uvicorn

    app = create_app(engine, traffic_dir=traffic_dir, feedback_dir=feedback_dir)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
