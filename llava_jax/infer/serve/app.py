"""The FastAPI application: OpenAI Chat Completions over the engine.

    POST /v1/chat/completions   text and image_url parts, stream (server-sent events), usage
    GET  /v1/models             the one served model
    GET  /health                200 while the engine runs (with queue and batch counts), else 503

Errors are OpenAI-style JSON (`{"error": {"message", "type", "param", "code"}}`): 400 for a bad field (named
in the message), 401 without the API key, 413 for an oversized body or image, 429 when the queue is full,
503 when the engine is not running.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import threading
import time
import uuid
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from llava_jax.infer.serve.engine import Delta, Engine, EngineStopped, Failed, Job, QueueFull
from llava_jax.infer.serve.protocol import ApiError, Limits, Prepared, parse_request, prepare


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    model_name: str
    api_key: str | None = None
    limits: Limits = Limits()
    max_request_bytes: int = 64 << 20


def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    """The API app over a started engine."""
    app = FastAPI(title="llava_jax", docs_url=None, redoc_url=None)
    app.state.engine, app.state.config = engine, config
    app.state.tokenizer_lock = threading.Lock()
    _error_handlers(app)

    @app.get("/health")
    async def health():
        if not engine.alive:
            raise ApiError(503, "the engine is not running")
        return {"status": "ok", "waiting": engine.waiting, "batches": engine.batches, "rows": engine.rows}

    @app.get("/v1/models")
    async def models(request: Request):
        _authorize(request, config)
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "llava_jax"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        _authorize(request, config)
        events: asyncio.Queue = asyncio.Queue()
        with engine.arriving():
            body = parse_request(await _read_body(request, config.max_request_bytes))
            prepared = await run_in_threadpool(prepare, body, engine.generator, config.limits,
                                               app.state.tokenizer_lock)
            job = submit(engine, prepared, _emitter(events), stream=body.stream)
        completion = _Completion(config.model_name, prepared.ids.size)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(job, events, completion, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _complete(job, events, completion)

    return app


def submit(engine: Engine, prepared: Prepared, emit, stream: bool = True) -> Job:
    """Queues a prepared request; ApiError 429 when the queue is full, 503 when the engine is not running."""
    job = Job(prepared.ids, prepared.pixels, prepared.max_tokens, emit, stream=stream,
              temperature=prepared.temperature, top_p=prepared.top_p, seed=prepared.seed, stop=prepared.stop,
              ignore_eos=prepared.ignore_eos)
    try:
        return engine.submit(job)
    except QueueFull as e:
        raise ApiError(429, f"the server is busy: {e}; retry later") from None
    except EngineStopped as e:
        raise ApiError(503, str(e)) from None


def _authorize(request: Request, config: ServerConfig) -> None:
    if config.api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
        raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')", "authorization")


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {declared} bytes, over the limit of {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body is over the limit of {limit} bytes")
    return bytes(body)


def _emitter(events: asyncio.Queue):
    loop = asyncio.get_running_loop()
    return lambda event: loop.call_soon_threadsafe(events.put_nowait, event)


@dataclasses.dataclass
class _Completion:
    model: str
    prompt_tokens: int
    id: str = dataclasses.field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def event(self, choices: list, **extra) -> str:
        """One server-sent event holding a `chat.completion.chunk`."""
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": choices, **extra}
        return f"data: {json.dumps(body)}\n\n"

    def chunk(self, delta: dict, finish_reason: str | None = None) -> str:
        return self.event([{"index": 0, "delta": delta, "finish_reason": finish_reason}])


async def _complete(job: Job, events: asyncio.Queue, completion: _Completion) -> JSONResponse:
    pieces = []
    try:
        while True:
            event = await events.get()
            if isinstance(event, Delta):
                pieces.append(event.text)
            elif isinstance(event, Failed):
                return JSONResponse(ApiError(500, event.message).body(), status_code=500)
            else:
                break
    finally:
        job.cancelled = True  # a no-op once finished; drops the row when the client went away
    return JSONResponse({
        "id": completion.id, "object": "chat.completion", "created": completion.created, "model": completion.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                     "finish_reason": event.reason}],
        "usage": completion.usage(event.completion_tokens)})


async def _sse(job: Job, events: asyncio.Queue, completion: _Completion, include_usage: bool) -> AsyncIterator[str]:
    try:
        yield completion.chunk({"role": "assistant", "content": ""})
        while True:
            event = await events.get()
            if isinstance(event, Delta):
                yield completion.chunk({"content": event.text})
            elif isinstance(event, Failed):
                yield f"data: {json.dumps(ApiError(500, event.message).body())}\n\n"
                break
            else:
                yield completion.chunk({}, event.reason)
                if include_usage:
                    yield completion.event([], usage=completion.usage(event.completion_tokens))
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled = True


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(_, error: HTTPException):
        return JSONResponse(ApiError(error.status_code, str(error.detail)).body(), status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, error: RequestValidationError):
        return JSONResponse(ApiError(400, str(error)).body(), status_code=400)


__all__ = ["ServerConfig", "create_app", "submit"]
