"""An OpenAI-compatible HTTP server over a `Runtime`: the `model` field picks the variant.

The HTTP layer (FastAPI) reads and validates the body (protocol.py), tokenizes (off the event
loop) and submits a job to the `Scheduler` (scheduler.py), whose one worker thread owns the
runtime and its engine; the handler waits on the job's future, or streams its text as the
worker decodes it. A client that goes away is cancelled and leaves the batch at the next step.

Endpoints: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (both with
`stream`: server-sent events), `GET /metrics` (Prometheus, through prometheus_client), and
`POST /admin/reload` (or SIGHUP): serve the variants the artifact holds now (after `moeconsol
add` or `remove`). A reload loads a new runtime beside the one serving (memory for both, for
as long as it takes), then sends new requests to it; requests already taken finish on the old
one, which is then stopped. It listens where the API does, and takes no input.
Errors use OpenAI's body `{"error": {"message", "type", "param", "code"}}`: unknown model
404, malformed JSON or bad parameters 400, a body over the limit 413; the server keeps
serving after each.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from ..errors import MoeconsolError, OutputError
from .engine import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_PROMPT_TOKENS,
    DEFAULT_MAX_TOKENS_IN_FLIGHT,
    DEFAULT_MAX_WAIT,
    Completion,
    GenerationSettings,
)
from .protocol import (
    DEFAULT_MAX_BODY_BYTES,
    STREAM_END,
    ApiError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    completion_response,
    json_body,
    stream_chunk,
    stream_error,
    usage_of,
    validate,
)
from .runtime import Runtime
from .scheduler import Job, Scheduler


def _chat_prompt(tokenizer, messages: list[ChatMessage]) -> str:
    """The messages formatted with the variant's chat template (a plain `role: content`
    transcript if it has none), ending where the assistant's answer starts."""
    if getattr(tokenizer, "chat_template", None):
        plain = [{"role": m.role, "content": m.content} for m in messages]
        return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant:"


async def _disconnected(request: HttpRequest) -> None:
    """Returns when the client has gone away (the body is already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# -- the app ----------------------------------------------------------------------------------


@dataclass
class _Prepared:
    """A validated request, tokenized."""

    request: CompletionRequest | ChatCompletionRequest
    ids: list[int]
    prompt: str
    """the prompt's text (for echo)"""
    settings: GenerationSettings

    @property
    def prefix(self) -> str:
        """What the answer's text starts with: the prompt if the request asked to echo it."""
        return self.prompt if isinstance(self.request, CompletionRequest) and self.request.echo else ""


class _Serving:
    """What requests are served by now: a runtime, the scheduler that owns it, its tokenizers.
    A reload replaces it whole; a request keeps the one it started with to its end."""

    def __init__(self, runtime: Runtime, scheduler: Scheduler):
        self.runtime, self.scheduler = runtime, scheduler
        self.tokenizers = {name: runtime.tokenizer(name) for name in runtime.names}  # loaded once, up front


def create_app(
    runtime: Runtime,
    max_wait: float = DEFAULT_MAX_WAIT,
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    max_tokens_in_flight: int = DEFAULT_MAX_TOKENS_IN_FLIGHT,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    reload: Callable[[], Runtime] | None = None,
) -> FastAPI:
    """The FastAPI app; its worker starts and stops with the app's lifespan. With `reload` (a
    new runtime from the artifact as it is now), `POST /admin/reload` and SIGHUP serve the
    variants the artifact holds now (`_reloaded`)."""

    def scheduler_for(r: Runtime, metrics=None) -> Scheduler:
        return Scheduler(
            r, max_wait, metrics=metrics, max_batch_size=max_batch_size, max_tokens_in_flight=max_tokens_in_flight
        )

    now = _Serving(runtime, scheduler_for(runtime))
    created = int(time.time())
    reloading = asyncio.Lock()

    async def do_reload() -> dict:
        nonlocal now
        if reload is None:
            raise ApiError(404, "this server was not started from an artifact it can reload")
        async with reloading:
            before, start = now, time.perf_counter()
            try:
                fresh = await asyncio.to_thread(reload)
            except MoeconsolError as e:
                raise ApiError(409, f"reload failed, still serving {', '.join(before.runtime.names)}: {e}") from None
            scheduler = scheduler_for(fresh, before.scheduler.metrics)
            scheduler.start()
            now = _Serving(fresh, scheduler)
            app.state.scheduler = scheduler
            threading.Thread(target=_drain, args=(before.scheduler,), name="moeconsol-drain", daemon=True).start()
            old, new = before.runtime.names, fresh.names
            return {
                "object": "reload",
                "models": list(new),
                "added": [n for n in new if n not in old],
                "removed": [n for n in old if n not in new],
                "seconds": round(time.perf_counter() - start, 3),
            }

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        now.scheduler.start()
        hup = reload is not None and threading.current_thread() is threading.main_thread()
        if hup:
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(_logged(do_reload())))
        try:
            yield
        finally:
            if hup:
                loop.remove_signal_handler(signal.SIGHUP)
            now.scheduler.stop()

    app = FastAPI(title="moeconsol serve-local", lifespan=lifespan)
    app.state.scheduler = now.scheduler

    @app.exception_handler(ApiError)
    async def _api_error(request: HttpRequest, exc: ApiError):
        return exc.response()

    @app.exception_handler(Exception)
    async def _internal_error(request: HttpRequest, exc: Exception):
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}").response()

    @app.get("/v1/models")
    async def models():
        data = [{"id": n, "object": "model", "created": created, "owned_by": "moeconsol"} for n in now.runtime.names]
        return {"object": "list", "data": data}

    @app.get("/metrics")
    async def metrics():
        serving = now
        return Response(
            serving.scheduler.metrics.render(serving.runtime.resident_bytes().to_dict()), media_type=CONTENT_TYPE_LATEST
        )

    @app.post("/admin/reload")
    async def admin_reload():
        return await do_reload()

    def prepare(serving: _Serving, body: dict, chat: bool) -> _Prepared:
        """Validate and tokenize (runs in a thread, off the event loop)."""
        runtime = serving.runtime
        request = validate(ChatCompletionRequest if chat else CompletionRequest, body, runtime.names)
        model, settings = request.model, request.settings()
        if chat:
            prompt = _chat_prompt(serving.tokenizers[model], request.messages)
            ids = serving.tokenizers[model](prompt, add_special_tokens=False)["input_ids"]
        else:
            prompt = request.prompt
            ids = runtime.encode(model, prompt)
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
        return _Prepared(request, list(ids), prompt, settings)

    async def handle(request: HttpRequest, chat: bool):
        serving = now  # this request is served by what serves now, to its end, whatever reloads meanwhile
        scheduler = serving.scheduler
        body = await json_body(request, max_body_bytes)
        p = await asyncio.to_thread(prepare, serving, body, chat)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if p.request.stream:
            events = _stream(scheduler, request, p, rid, chat)
            return StreamingResponse(events, media_type="text/event-stream")
        job = Job(p.request.model, p.ids, p.settings)
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
        return completion_response(_result(done), rid, chat, p.prefix)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        return await handle(request, chat=True)

    return app


def _drain(scheduler: Scheduler, poll: float = 0.05) -> None:
    """Stop a replaced scheduler once every request it took has been answered."""
    while True:
        with scheduler._cond:
            idle = not scheduler._pending and not scheduler.engine.running()
        if idle:
            scheduler.stop()
            return
        time.sleep(poll)


async def _logged(reloading) -> None:
    """A reload started by SIGHUP: its outcome on stderr (no client to answer)."""
    try:
        r = await reloading
        print(f"moeconsol: reloaded: serving {', '.join(r['models'])}", file=sys.stderr)
    except ApiError as e:
        print(f"moeconsol: {e.message}", file=sys.stderr)


def _result(done: asyncio.Future) -> Completion:
    try:
        return done.result()
    except MoeconsolError as e:
        raise ApiError(400, str(e)) from None
    except Exception as e:
        raise ApiError(500, f"generation failed: {type(e).__name__}: {e}") from None


async def _stream(scheduler: Scheduler, request: HttpRequest, p: _Prepared, rid: str, chat: bool) -> AsyncIterator[str]:
    """Server-sent events: one chunk per piece of text as the worker decodes it, a last chunk
    with finish_reason, a usage chunk if asked, then `data: [DONE]`. If the client goes away
    the job is cancelled and leaves its batch at the next decode step."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str] = asyncio.Queue()
    model = p.request.model
    job = Job(model, p.ids, p.settings, on_text=lambda piece: loop.call_soon_threadsafe(queue.put_nowait, piece))
    done = asyncio.wrap_future(scheduler.submit(job))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        if chat:
            yield stream_chunk(rid, model, chat, None, None, first=True)
        if p.prefix:
            yield stream_chunk(rid, model, chat, p.prefix, None)
        while True:
            getter = asyncio.ensure_future(queue.get())
            finished, _ = await asyncio.wait({getter, done, gone}, return_when=asyncio.FIRST_COMPLETED)
            if getter in finished:
                yield stream_chunk(rid, model, chat, getter.result(), None)
                continue
            getter.cancel()
            if gone in finished:
                return
            while not queue.empty():
                yield stream_chunk(rid, model, chat, queue.get_nowait(), None)
            break
        try:
            result = done.result()
        except Exception as e:
            yield stream_error(e)
        else:
            yield stream_chunk(rid, model, chat, None, result.finish_reason)
            if p.request.include_usage:
                yield stream_chunk(rid, model, chat, None, None, usage=usage_of(result))
        yield STREAM_END
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
    reload: Callable[[], Runtime] | None = None,
) -> None:
    """Run the server until interrupted (uvicorn), on `sock` if given (see `bind`); `reload`:
    see `create_app`."""
    import uvicorn

    sock = sock or bind(host, port)
    app = create_app(runtime, max_wait, max_prompt_tokens, max_batch_size, max_tokens_in_flight, reload=reload)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
