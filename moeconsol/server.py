"""An OpenAI-compatible HTTP server over a `Runtime`: the `model` field picks the variant.

The HTTP layer (FastAPI) only validates, tokenizes and enqueues. One worker thread owns the
runtime and serves the queue: requests for the active model first, so swaps stay rare,
except that any request that has waited `max_wait` seconds goes first (oldest first), so
no one starves. A request therefore waits at most `max_wait` plus the generation time of
the requests already overdue ahead of it.

Endpoints: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (both with
`stream`: server-sent events), `GET /metrics` (Prometheus text format). Errors use OpenAI's
body `{"error": {"message", "type", "param", "code"}}`: unknown model 404, malformed JSON or
bad parameters 400, an over-long prompt 400; the server keeps serving after each.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from .errors import MoeconsolError
from .runtime import Completion, GenerationSettings, Runtime

DEFAULT_MAX_WAIT = 2.0
DEFAULT_MAX_PROMPT_TOKENS = 2048
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


# -- scheduling -------------------------------------------------------------------------------


@dataclass
class Job:
    """One queued generation request."""

    model: str
    prompt_ids: list[int]
    settings: GenerationSettings
    arrival: float = field(default_factory=time.perf_counter)
    on_text: Any = None
    """called from the worker thread with each new piece of text (streaming)"""
    future: Future = field(default_factory=Future)


def pick_next(pending: Sequence[Job], active: str, now: float, max_wait: float) -> int:
    """Index of the job to serve next; `pending` is in arrival order. The oldest job that has
    waited `max_wait` or longer; else the oldest job for the active model; else the oldest."""
    for i, job in enumerate(pending):
        if now - job.arrival >= max_wait:
            return i
    for i, job in enumerate(pending):
        if job.model == active:
            return i
    return 0


class Scheduler:
    """The queue and the one worker thread that owns the runtime."""

    def __init__(self, runtime: Runtime, max_wait: float = DEFAULT_MAX_WAIT, metrics: "Metrics | None" = None):
        if max_wait < 0:
            raise MoeconsolError(f"--max-wait must be >= 0 seconds, got {max_wait}")
        self.runtime, self.max_wait = runtime, max_wait
        self.metrics = metrics or Metrics(runtime.names)
        self.served: list[str] = []
        """models of the requests served, in order (for tests and benchmarks)"""
        self._pending: list[Job] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="moeconsol-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> Future:
        with self._cond:
            self._pending.append(job)
            self._cond.notify()
        return job.future

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stop:
                    self._cond.wait()
                if self._stop:
                    for job in self._pending:
                        job.future.set_exception(MoeconsolError("the server is shutting down"))
                    return
                job = self._pending.pop(pick_next(self._pending, self.runtime.active, time.perf_counter(), self.max_wait))
            if not job.future.set_running_or_notify_cancel():
                continue
            try:
                result = self.runtime.complete(job.model, job.prompt_ids, job.settings, on_text=job.on_text, started=job.arrival)
            except Exception as e:  # delivered to the request; the worker keeps serving
                job.future.set_exception(e)
                continue
            self.served.append(job.model)
            self.metrics.record(result)
            job.future.set_result(result)


# -- metrics ----------------------------------------------------------------------------------


class Metrics:
    """Per-model counters and histograms, rendered in the Prometheus text format."""

    def __init__(self, models: Sequence[str]):
        self._lock = threading.Lock()
        self.requests = dict.fromkeys(models, 0)
        self.tokens = dict.fromkeys(models, 0)
        self.swaps = dict.fromkeys(models, 0)
        self.swap_seconds = dict.fromkeys(models, 0.0)
        self.swap_bytes = dict.fromkeys(models, 0)
        self.ttft_sum = dict.fromkeys(models, 0.0)
        self.ttft_buckets = {m: [0] * len(_TTFT_BUCKETS) for m in models}

    def record(self, c: Completion) -> None:
        with self._lock:
            self.requests[c.model] += 1
            self.tokens[c.model] += len(c.token_ids)
            if c.swap.previous != c.model:
                self.swaps[c.model] += 1
                self.swap_seconds[c.model] += c.swap.seconds
                self.swap_bytes[c.model] += c.swap.bytes_moved
            self.ttft_sum[c.model] += c.time_to_first_token
            for i, bound in enumerate(_TTFT_BUCKETS):
                if c.time_to_first_token <= bound:
                    self.ttft_buckets[c.model][i] += 1

    def render(self, resident_bytes: dict[str, int] | None = None) -> str:
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str, values: dict[str, float]) -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
            lines.extend(f'{name}{{model="{_label(m)}"}} {_num(v)}' for m, v in values.items())

        with self._lock:
            family("moeconsol_requests_total", "counter", "Completed generation requests.", self.requests)
            family("moeconsol_generated_tokens_total", "counter", "Tokens generated.", self.tokens)
            family("moeconsol_swaps_total", "counter", "Swaps that made this model active.", self.swaps)
            family("moeconsol_swap_bytes_total", "counter", "Bytes copied by swaps to this model.", self.swap_bytes)
            lines += ["# HELP moeconsol_swap_seconds Time spent swapping to this model.", "# TYPE moeconsol_swap_seconds summary"]
            for m in self.requests:
                lines += [f'moeconsol_swap_seconds_sum{{model="{_label(m)}"}} {_num(self.swap_seconds[m])}',
                          f'moeconsol_swap_seconds_count{{model="{_label(m)}"}} {self.swaps[m]}']
            lines += [
                "# HELP moeconsol_time_to_first_token_seconds From arrival (queue and swap included) to the first token.",
                "# TYPE moeconsol_time_to_first_token_seconds histogram",
            ]
            for m in self.requests:
                for bound, count in zip(_TTFT_BUCKETS, self.ttft_buckets[m]):
                    lines.append(f'moeconsol_time_to_first_token_seconds_bucket{{model="{_label(m)}",le="{bound}"}} {count}')
                lines += [
                    f'moeconsol_time_to_first_token_seconds_bucket{{model="{_label(m)}",le="+Inf"}} {self.requests[m]}',
                    f'moeconsol_time_to_first_token_seconds_sum{{model="{_label(m)}"}} {_num(self.ttft_sum[m])}',
                    f'moeconsol_time_to_first_token_seconds_count{{model="{_label(m)}"}} {self.requests[m]}',
                ]
        if resident_bytes:
            lines += ["# HELP moeconsol_resident_bytes Bytes held by the runtime.", "# TYPE moeconsol_resident_bytes gauge"]
            lines += [f'moeconsol_resident_bytes{{part="{k}"}} {v}' for k, v in resident_bytes.items()]
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(v: float) -> str:
    return repr(float(v)) if isinstance(v, float) else str(v)


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


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"'{name}' must be a number", name)
    if value < low or value > high or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ApiError(400, f"'{name}' must be in {bound}, got {value}", name)
    return float(value)


def _integer(body: dict, name: str, default: int | None, low: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{name}' must be an integer", name)
    if value < low:
        raise ApiError(400, f"'{name}' must be at least {low}, got {value}", name)
    return value


def parse_settings(body: dict, default_max_tokens: int = 16) -> GenerationSettings:
    """OpenAI sampling parameters -> GenerationSettings (400 on bad values)."""
    if body.get("n") not in (None, 1):
        raise ApiError(400, "only n=1 is supported", "n")
    if body.get("stop") not in (None, [], ""):
        raise ApiError(400, "'stop' sequences are not supported; generation stops at the end-of-sequence token", "stop")
    max_tokens = _integer(body, "max_tokens", None, 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_completion_tokens", default_max_tokens, 1)
    return GenerationSettings(
        max_new_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        seed=_integer(body, "seed", None, 0),
    )


async def _json_body(request: Request) -> dict:
    try:
        body = json.loads(await request.body())
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
    if getattr(tokenizer, "chat_template", None):
        plain = [{"role": m["role"], "content": m["content"]} for m in messages]
        return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


# -- the app ----------------------------------------------------------------------------------


def create_app(
    runtime: Runtime,
    max_wait: float = DEFAULT_MAX_WAIT,
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
) -> FastAPI:
    """The FastAPI app; its worker starts and stops with the app's lifespan."""
    scheduler = Scheduler(runtime, max_wait)
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
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.get("/v1/models")
    async def models():
        data = [{"id": n, "object": "model", "created": created, "owned_by": "moeconsol"} for n in runtime.names]
        return {"object": "list", "data": data}

    @app.get("/metrics")
    async def metrics():
        text = scheduler.metrics.render(runtime.resident_bytes().to_dict())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    def prepare(body: dict, chat: bool) -> tuple[str, list[int], GenerationSettings]:
        model = body.get("model")
        if not isinstance(model, str):
            raise ApiError(400, "'model' is required and must be a string", "model")
        if model not in tokenizers:
            raise ApiError(404, f"The model '{model}' does not exist; this server serves: {', '.join(runtime.names)}", "model", "model_not_found")
        settings = parse_settings(body)
        tok = tokenizers[model]
        if chat:
            ids = tok(_chat_prompt(tok, body.get("messages")), add_special_tokens=False)["input_ids"]
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise ApiError(400, "'prompt' must be a non-empty string", "prompt")
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
        return model, list(ids), settings

    async def handle(request: Request, chat: bool):
        body = await _json_body(request)
        model, ids, settings = prepare(body, chat)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "'stream' must be true or false", "stream")
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if stream:
            return StreamingResponse(_stream(scheduler, model, ids, settings, rid, chat), media_type="text/event-stream")
        job = Job(model, ids, settings)
        result = await _wait(scheduler.submit(job))
        return _response(result, rid, chat)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    return app


async def _wait(future: Future) -> Completion:
    try:
        return await asyncio.wrap_future(future)
    except MoeconsolError as e:
        raise ApiError(400, str(e)) from None
    except Exception as e:
        raise ApiError(500, f"generation failed: {type(e).__name__}: {e}") from None


def _usage(c: Completion) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": len(c.token_ids), "total_tokens": c.prompt_tokens + len(c.token_ids)}


def _response(c: Completion, rid: str, chat: bool) -> dict:
    created = int(time.time())
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason}
        return {"id": rid, "object": "chat.completion", "created": created, "model": c.model, "choices": [choice], "usage": _usage(c)}
    choice = {"index": 0, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
    return {"id": rid, "object": "text_completion", "created": created, "model": c.model, "choices": [choice], "usage": _usage(c)}


def _chunk(rid: str, model: str, chat: bool, piece: str | None, finish: str | None, first: bool = False) -> str:
    if chat:
        delta: dict = {"role": "assistant"} if first else {}
        if piece:
            delta["content"] = piece
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    body = {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}
    return f"data: {json.dumps(body)}\n\n"


async def _stream(scheduler: Scheduler, model: str, ids: list[int], settings: GenerationSettings, rid: str, chat: bool) -> AsyncIterator[str]:
    """Server-sent events: one chunk per piece of text as the worker decodes it, a last chunk
    with finish_reason, then `data: [DONE]`."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str] = asyncio.Queue()
    job = Job(model, ids, settings, on_text=lambda piece: loop.call_soon_threadsafe(queue.put_nowait, piece))
    future = scheduler.submit(job)
    done = asyncio.wrap_future(future)
    if chat:
        yield _chunk(rid, model, chat, None, None, first=True)
    while True:
        getter = asyncio.ensure_future(queue.get())
        finished, _ = await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
        if getter in finished:
            yield _chunk(rid, model, chat, getter.result(), None)
            continue
        getter.cancel()
        while not queue.empty():
            yield _chunk(rid, model, chat, queue.get_nowait(), None)
        break
    try:
        result = done.result()
    except Exception as e:
        error = {"error": {"message": str(e), "type": "server_error", "param": None, "code": None}}
        yield f"data: {json.dumps(error)}\n\n"
    else:
        yield _chunk(rid, model, chat, None, result.finish_reason)
    yield "data: [DONE]\n\n"


def serve(runtime: Runtime, host: str = "127.0.0.1", port: int = 8000, max_wait: float = DEFAULT_MAX_WAIT,
          max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS, log_level: str = "info") -> None:
    """Run the server until interrupted (uvicorn)."""
    import uvicorn

    uvicorn.run(create_app(runtime, max_wait, max_prompt_tokens), host=host, port=port, log_level=log_level)
