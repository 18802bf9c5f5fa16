"""The FastAPI app: OpenAI's /v1/models, /v1/completions and /v1/chat/completions over one loaded
decoder, and /health.

A generation request is checked completely before it is queued (body, model name, prompt length against
the context and the KV budget, sampling values: any problem is a 400), then becomes a `Job` on the
model's worker (`queue.ModelWorker`, which runs the requests in a continuous batch; a full queue is a 429
with Retry-After). Its chunks come back as one JSON response or, with `stream: true`, as server-sent
events in OpenAI's chunk format ending with `data: [DONE]`. A client that goes away cancels its job,
which frees its place in the batch before the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import UserError
from ..run.batching import Engine
from ..run.generation import Chunk, Generation
from ..run.tokenizer import Tokenizer
from . import protocol
from .errors import APIError, bad_request
from .queue import Job, ModelWorker, QueueFull

log = logging.getLogger("qcompile.serve")


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _as_api_error(error: Exception) -> APIError:
    """An exception from the worker, as the client sees it: a UserError is the request's fault (400)."""
    if isinstance(error, UserError):
        return bad_request(str(error))
    return APIError(500, f"internal error ({type(error).__name__}); see the server's log")


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """Wait for the client to go away (the body has been read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


async def _whole(request: Request, job: Job, reply: protocol.Reply, prompt_tokens: int) -> JSONResponse:
    """The non-streaming answer: every chunk collected into one response."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    try:
        chunks: list[Chunk] = [chunk async for chunk in job.output()]
    except Exception as e:  # noqa: BLE001 (the worker's error, whatever it is, answered as an HTTP error)
        raise _as_api_error(e) from None
    finally:
        watcher.cancel()
        job.cancel()  # a no-op once the job has ended
    if not chunks or chunks[-1].finish_reason == "cancelled":  # its client left, or the server is stopping
        raise APIError(503, "the request was cancelled (the server is stopping)")
    counts = protocol.usage(prompt_tokens, sum(len(c.token_ids) for c in chunks))
    return JSONResponse(reply.response("".join(c.text for c in chunks), chunks[-1].finish_reason, counts))


async def _events(job: Job, reply: protocol.Reply, prompt_tokens: int) -> AsyncIterator[str]:
    """The streaming answer. Starlette cancels this generator when the client disconnects; the
    `finally` then cancels the job, so its place in the batch is free before the next step."""
    try:
        if (opening := reply.opening_chunk()) is not None:
            yield _event(opening)
        generated = 0
        try:
            async for chunk in job.output():
                generated += len(chunk.token_ids)
                if chunk.text:
                    yield _event(reply.chunk(chunk.text))
                if chunk.finish_reason is not None:
                    yield _event(reply.chunk("", chunk.finish_reason))
        except Exception as e:  # noqa: BLE001 (after the headers went out, an error is the stream's last event)
            yield _event(_as_api_error(e).body())
        else:
            if reply.include_usage:
                yield _event(reply.usage_chunk(protocol.usage(prompt_tokens, generated)))
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # a no-op once the job has ended


def create_app(engine: Engine, tokenizer: Tokenizer, *, model_name: str | None = None,
               queue_size: int = 16) -> FastAPI:
    """The app serving `engine` (an engine over a loaded decoder: `run.batching.engine_for`) with
    `tokenizer`, under `model_name` (default: the library's model name); at most `queue_size` requests
    wait beyond the batch's free places. The model's worker thread starts and stops with the app (its
    lifespan)."""
    if tokenizer.vocab_size > engine.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's vocab_size "
                        f"{engine.vocab_size}: the checkpoint's tokenizer files belong to another model")
    name = model_name or engine.spec.name
    worker = ModelWorker(engine, queue_size)
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="qcompile", summary=f"OpenAI-compatible API serving {name}", lifespan=lifespan)
    app.state.worker = worker

    @app.exception_handler(APIError)
    async def api_error(_request: Request, error: APIError) -> JSONResponse:
        return _error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:  # 404, 405
        return _error_response(APIError(error.status_code, str(error.detail), headers=error.headers))

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, error: Exception) -> JSONResponse:  # a bug: logged by uvicorn
        return _error_response(_as_api_error(error))

    def card() -> dict[str, Any]:
        return {"id": name, "object": "model", "created": started, "owned_by": "qcompile",
                "max_model_len": engine.max_seq_len}

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = worker.alive()
        return JSONResponse({"status": "ok" if alive else "worker stopped", "model": name,
                             "queue": worker.snapshot(), "batch": engine.snapshot()},
                            status_code=200 if alive else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model_id:path}")
    async def one_model(model_id: str) -> dict[str, Any]:
        if model_id != name:
            raise APIError(404, f"model {model_id!r} is not served here; this server serves {name!r}",
                           param="model", code="model_not_found")
        return card()

    async def answer(request: Request, request_class: type[protocol.GenerationRequest],
                     reply_class: type[protocol.Reply]):
        body = protocol.parse(request_class, await request.body())
        body.check_model(name)
        try:
            prompt_ids = body.prompt_ids(tokenizer)
        except UserError as e:  # e.g. a chat template that cannot render these messages
            raise bad_request(str(e), param=body.prompt_field) from None
        params = body.sampling(prompt_tokens=len(prompt_ids), max_seq_len=engine.max_seq_len)
        try:  # Generation checks the values and the prompt's ids before any model work
            job = Job(lambda cancelled: Generation(engine, tokenizer, prompt_ids, params, cancelled=cancelled))
        except UserError as e:
            raise bad_request(str(e)) from None
        try:
            worker.submit(job)
        except UserError as e:  # more KV cache than the server has
            raise bad_request(str(e), param="max_tokens", code="context_length_exceeded") from None
        except QueueFull as e:
            raise APIError(429, str(e), code="rate_limit_exceeded",
                           headers={"Retry-After": str(e.retry_after)}) from None
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        reply = reply_class(name, include_usage=include_usage)
        if body.stream:
            return StreamingResponse(_events(job, reply, len(prompt_ids)), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _whole(request, job, reply, len(prompt_ids))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, protocol.CompletionRequest, protocol.CompletionReply)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(request, protocol.ChatRequest, protocol.ChatReply)

    return app
