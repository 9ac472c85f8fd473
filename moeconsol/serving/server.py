"""An OpenAI-compatible HTTP server over a `Runtime`: the `model` field picks the variant.

The HTTP layer (FastAPI) validates, tokenizes (off the event loop) and submits a job to the
`Scheduler` (scheduler.py), whose one worker thread owns the runtime and its engine; the
handler waits on the job's future, or streams its text as the worker decodes it. A client
that goes away is cancelled and leaves the batch at the next step.

Endpoints: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (both with
`stream`: server-sent events), `GET /metrics` (Prometheus, through prometheus_client).
Errors use OpenAI's body `{"error": {"message", "type", "param", "code"}}`: unknown model
404, malformed JSON or bad parameters 400, a body over the limit 413; the server keeps
serving after each.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from ..errors import MoeconsolError, OutputError
from .engine import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_PROMPT_TOKENS,
    DEFAULT_MAX_TOKENS_IN_FLIGHT,
    DEFAULT_MAX_WAIT,
    MAX_SEED,
    Completion,
    GenerationSettings,
)
from .runtime import Runtime
from .scheduler import Job, Scheduler

DEFAULT_MAX_BODY_BYTES = 1 << 20


# -- request parsing --------------------------------------------------------------------------


class ApiError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def _number(
    body: dict, name: str, default: float | None, low: float, high: float, low_open: bool = False
) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"'{name}' must be a number", name)
    if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ApiError(400, f"'{name}' must be a number in {bound}, got {value}", name)
    return float(value)


def _integer(body: dict, name: str, default: int | None, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{name}' must be an integer", name)
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f"at least {low}"
        raise ApiError(400, f"'{name}' must be {bound}, got {value}", name)
    return value


def _text(value: str, param: str) -> str:
    """A string the tokenizer can read: lone surrogates (valid JSON escapes, invalid Unicode) are refused."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(
            400, f"'{param}' is not valid Unicode (a lone surrogate at character {e.start})", param
        ) from None
    return value


# Parameters this server does not implement: refused unless they hold their neutral value.
_NEUTRAL = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
}


def _refuse_unsupported(body: dict, chat: bool) -> None:
    def neutral(value: Any, values: tuple) -> bool:
        return any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in values)

    for name, values in _NEUTRAL.items():
        if name in body and not neutral(body[name], values):
            raise ApiError(400, f"'{name}' is not supported by this server", name)
    if chat and body.get("echo") is not None:
        raise ApiError(400, "'echo' is a parameter of /v1/completions only", "echo")


def parse_settings(body: dict, default_max_tokens: int = 16) -> GenerationSettings:
    """OpenAI sampling parameters -> GenerationSettings (400 naming the parameter on bad values)."""
    if body.get("n") not in (None, 1):
        raise ApiError(400, "only n=1 is supported", "n")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or any(not isinstance(x, str) or not x for x in stop):
        raise ApiError(400, "'stop' must be a non-empty string or a list of at most 4 non-empty strings", "stop")
    max_tokens = _integer(body, "max_tokens", None, 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_completion_tokens", default_max_tokens, 1)
    return GenerationSettings(
        max_new_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        seed=_integer(body, "seed", None, 0, MAX_SEED),
        stop=tuple(_text(x, "stop") for x in stop),
        top_k=_top_k(body),
        repetition_penalty=_number(body, "repetition_penalty", None, 0.0, 100.0, low_open=True),
    )


def _top_k(body: dict) -> int | None:
    """vLLM's extra parameter: -1 or 0 = every token; unset = the variant's generation config."""
    value = _integer(body, "top_k", None, -1)
    return 0 if value == -1 else value


def _flag(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be true or false", name)
    return value


def _include_usage(body: dict, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise ApiError(400, "'stream_options' is only allowed with stream: true", "stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise ApiError(400, "'stream_options' supports only include_usage", "stream_options")
    return _flag(options, "include_usage")


async def read_body(request: HttpRequest, limit: int) -> bytes:
    """The raw body, read up to `limit` bytes (413 past it)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {int(declared)} bytes; this server accepts at most {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is over {limit} bytes, the most this server accepts")
        chunks.append(chunk)
    return b"".join(chunks)


async def _json_body(request: HttpRequest, limit: int) -> dict:
    """The body as a JSON object, read up to `limit` bytes (413 past it)."""
    raw = await read_body(request, limit)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _chat_prompt(tokenizer, messages: Any) -> str:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ApiError(400, "each message needs a string 'role' and a string 'content'", "messages")
        _text(m["role"], "messages"), _text(m["content"], "messages")
    if getattr(tokenizer, "chat_template", None):
        plain = [{"role": m["role"], "content": m["content"]} for m in messages]
        return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


async def _disconnected(request: HttpRequest) -> None:
    """Returns when the client has gone away (the body is already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# -- the app ----------------------------------------------------------------------------------


@dataclass
class _Prepared:
    model: str
    ids: list[int]
    settings: GenerationSettings
    prompt: str
    """the prompt's text (for echo)"""


def create_app(
    runtime: Runtime,
    max_wait: float = DEFAULT_MAX_WAIT,
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    max_tokens_in_flight: int = DEFAULT_MAX_TOKENS_IN_FLIGHT,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """The FastAPI app; its worker starts and stops with the app's lifespan."""
    scheduler = Scheduler(runtime, max_wait, max_batch_size=max_batch_size, max_tokens_in_flight=max_tokens_in_flight)
    tokenizers = {name: runtime.tokenizer(name) for name in runtime.names}  # loaded once, up front
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="moeconsol serve-local", lifespan=lifespan)
    app.state.scheduler = scheduler

    @app.exception_handler(ApiError)
    async def _api_error(request: HttpRequest, exc: ApiError):
        return exc.response()

    @app.exception_handler(Exception)
    async def _internal_error(request: HttpRequest, exc: Exception):
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}").response()

    @app.get("/v1/models")
    async def models():
        data = [{"id": n, "object": "model", "created": created, "owned_by": "moeconsol"} for n in runtime.names]
        return {"object": "list", "data": data}

    @app.get("/metrics")
    async def metrics():
        return Response(scheduler.metrics.render(runtime.resident_bytes().to_dict()), media_type=CONTENT_TYPE_LATEST)

    def prepare(body: dict, chat: bool) -> _Prepared:
        """Validate and tokenize (runs in a thread, off the event loop)."""
        model = body.get("model")
        if not isinstance(model, str):
            raise ApiError(400, "'model' is required and must be a string", "model")
        if model not in tokenizers:
            raise ApiError(
                404,
                f"The model '{model}' does not exist; this server serves: {', '.join(runtime.names)}",
                "model",
                "model_not_found",
            )
        _refuse_unsupported(body, chat)
        settings = parse_settings(body)
        tok = tokenizers[model]
        if chat:
            prompt = _chat_prompt(tok, body.get("messages"))
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise ApiError(400, "'prompt' must be a non-empty string", "prompt")
            ids = runtime.encode(model, _text(prompt, "prompt"))
        limit = max_prompt_tokens
        context = runtime.max_context(model)
        if context is not None:
            limit = min(limit, context - settings.max_new_tokens)
        if len(ids) > limit:
            where = f"this model's context is {context} tokens" if context is not None else "the server's limit"
            raise ApiError(
                400,
                f"the prompt has {len(ids)} tokens; with max_tokens={settings.max_new_tokens} at most {max(limit, 0)} fit "
                f"({where}, --max-prompt-tokens {max_prompt_tokens})",
                "messages" if chat else "prompt",
                "context_length_exceeded",
            )
        if len(ids) + settings.max_new_tokens > max_tokens_in_flight:
            raise ApiError(
                400,
                f"prompt ({len(ids)} tokens) + max_tokens ({settings.max_new_tokens}) is over the server's "
                f"--max-tokens-in-flight {max_tokens_in_flight}",
                "max_tokens",
            )
        return _Prepared(model, list(ids), settings, prompt)

    async def handle(request: HttpRequest, chat: bool):
        body = await _json_body(request, max_body_bytes)
        stream = _flag(body, "stream")
        include_usage = _include_usage(body, stream)
        echo = not chat and _flag(body, "echo")
        p = await asyncio.to_thread(prepare, body, chat)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        prefix = p.prompt if echo else ""
        if stream:
            events = _stream(scheduler, request, p, rid, chat, prefix, include_usage)
            return StreamingResponse(events, media_type="text/event-stream")
        job = Job(p.model, p.ids, p.settings)
        done = asyncio.wrap_future(scheduler.submit(job))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not done.done():  # the client went away (or this handler was cancelled)
                scheduler.cancel(job)
        if not done.done():
            return Response(status_code=499)
        return _response(_result(done), rid, chat, prefix)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        return await handle(request, chat=True)

    return app


def _result(done: asyncio.Future) -> Completion:
    try:
        return done.result()
    except MoeconsolError as e:
        raise ApiError(400, str(e)) from None
    except Exception as e:
        raise ApiError(500, f"generation failed: {type(e).__name__}: {e}") from None


def _usage(c: Completion) -> dict:
    return {
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": len(c.token_ids),
        "total_tokens": c.prompt_tokens + len(c.token_ids),
    }


def _response(c: Completion, rid: str, chat: bool, prefix: str = "") -> dict:
    created = int(time.time())
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason}
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": c.model,
            "choices": [choice],
            "usage": _usage(c),
        }
    choice = {"index": 0, "text": prefix + c.text, "logprobs": None, "finish_reason": c.finish_reason}
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": c.model,
        "choices": [choice],
        "usage": _usage(c),
    }


def _chunk(
    rid: str,
    model: str,
    chat: bool,
    piece: str | None,
    finish: str | None,
    first: bool = False,
    usage: dict | None = None,
) -> str:
    obj = "chat.completion.chunk" if chat else "text_completion"
    body: dict = {"id": rid, "object": obj, "created": int(time.time()), "model": model}
    if usage is not None:  # stream_options.include_usage: a last chunk with no choices
        body.update(choices=[], usage=usage)
        return f"data: {json.dumps(body)}\n\n"
    if chat:
        delta: dict = {"role": "assistant"} if first else {}
        if piece:
            delta["content"] = piece
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
    body["choices"] = [choice]
    return f"data: {json.dumps(body)}\n\n"


async def _stream(
    scheduler: Scheduler, request: HttpRequest, p: _Prepared, rid: str, chat: bool, prefix: str, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events: one chunk per piece of text as the worker decodes it, a last chunk
    with finish_reason, a usage chunk if asked, then `data: [DONE]`. If the client goes away
    the job is cancelled and leaves its batch at the next decode step."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str] = asyncio.Queue()
    job = Job(p.model, p.ids, p.settings, on_text=lambda piece: loop.call_soon_threadsafe(queue.put_nowait, piece))
    done = asyncio.wrap_future(scheduler.submit(job))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        if chat:
            yield _chunk(rid, p.model, chat, None, None, first=True)
        if prefix:
            yield _chunk(rid, p.model, chat, prefix, None)
        while True:
            getter = asyncio.ensure_future(queue.get())
            finished, _ = await asyncio.wait({getter, done, gone}, return_when=asyncio.FIRST_COMPLETED)
            if getter in finished:
                yield _chunk(rid, p.model, chat, getter.result(), None)
                continue
            getter.cancel()
            if gone in finished:
                return
            while not queue.empty():
                yield _chunk(rid, p.model, chat, queue.get_nowait(), None)
            break
        try:
            result = done.result()
        except Exception as e:
            error = {"error": {"message": str(e), "type": "server_error", "param": None, "code": None}}
            yield f"data: {json.dumps(error)}\n\n"
        else:
            yield _chunk(rid, p.model, chat, None, result.finish_reason)
            if include_usage:
                yield _chunk(rid, p.model, chat, None, None, usage=_usage(result))
        yield "data: [DONE]\n\n"
    finally:
        gone.cancel()
        if not done.done():
            scheduler.cancel(job)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, or one clear error if the address cannot be had."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise OutputError(f"host {host}: cannot resolve it ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    # the protocol matters: asyncio sets TCP_NODELAY only on sockets whose proto is TCP; without
    # it a response's two writes (headers, body) wait 40 ms for the client's delayed ACK
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise OutputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(
    runtime: Runtime,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_wait: float = DEFAULT_MAX_WAIT,
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    max_tokens_in_flight: int = DEFAULT_MAX_TOKENS_IN_FLIGHT,
    log_level: str = "info",
    sock: socket.socket | None = None,
) -> None:
    """Run the server until interrupted (uvicorn), on `sock` if given (see `bind`)."""
    import uvicorn

    sock = sock or bind(host, port)
    app = create_app(runtime, max_wait, max_prompt_tokens, max_batch_size, max_tokens_in_flight)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
