"""The OpenAI API on the wire: the request body read under its size limit, the request models
(pydantic, as vLLM's `entrypoints/openai/protocol.py`) that validate a body into typed fields
and the engine's `GenerationSettings`, OpenAI's error body, and the shapes of responses and
stream chunks.

A body over the limit is 413, checked before anything is parsed. A body that does not
validate is 400 naming its first bad parameter (`param`), fields checked in the order they
are declared; an unknown model is 404 (`model_not_found`). Parameters this server does not
implement are refused unless they hold their neutral value, never ignored.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any, TypeVar, get_args

from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, PydanticCustomError

from .engine import MAX_REPETITION_PENALTY, MAX_SEED, MIN_REPETITION_PENALTY, Completion, GenerationSettings

DEFAULT_MAX_BODY_BYTES = 1 << 20


class ApiError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


# -- the body -----------------------------------------------------------------------------------


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


async def json_body(request: HttpRequest, limit: int) -> dict:
    """The body as a JSON object, read up to `limit` bytes (413 past it)."""
    raw = await read_body(request, limit)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None
    except RecursionError:  # json's decoder recurses once per level of nesting
        raise ApiError(400, "the request body is nested too deeply (arrays or objects within each other)") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


# -- the requests -------------------------------------------------------------------------------


def _invalid(message: str) -> PydanticCustomError:
    """A validation error answered 400 with `message` as it is."""
    return PydanticCustomError("invalid_request", message)


def _unicode(value: str, param: str) -> str:
    """A string the tokenizer can read: lone surrogates (valid JSON escapes, invalid Unicode) are refused."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _invalid(f"'{param}' is not valid Unicode (a lone surrogate at character {e.start})") from None
    return value


_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "logprobs": (False, 0),
    "top_logprobs": (0,),
    "best_of": (1,),
    "suffix": ("",),
    "logit_bias": ({},),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
}
"""Parameters this server does not implement -> their neutral values (null is neutral too)."""


class _Body(BaseModel):
    """Strict types (a number is not "0.5", a flag is not 1); null is the same as absent, so it
    leaves the default; unknown fields are ignored. A required field defaults to None and is
    validated anyway (`validate_default`), so that its own validator words the error."""

    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class SamplingParams(_Body):
    """OpenAI's sampling parameters, and vLLM's extra `top_k` and `repetition_penalty`."""

    n: int = 1
    stop: list[str] = Field(default_factory=list)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int = Field(16, ge=1)
    """chat's newer name for max_tokens (max_tokens wins when both are given)"""
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    """below engine.MIN_TEMPERATURE (but not 0): sampled at MIN_TEMPERATURE"""
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    """however small, the most likely token stays"""
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    top_k: int | None = Field(None, ge=-1)
    """-1 or 0: every token; unset: the variant's generation config"""
    repetition_penalty: float | None = Field(
        None, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY, allow_inf_nan=False
    )
    """unset: the variant's generation config; below 0.01 a penalized score overflows float32"""

    @field_validator("n", mode="before")
    @classmethod
    def _one_choice(cls, value: Any) -> int:
        if value != 1:
            raise _invalid("only n=1 is supported")
        return 1

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, value: Any) -> list[str]:
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or len(stops) > 4 or any(not isinstance(x, str) or not x for x in stops):
            raise _invalid("'stop' must be a non-empty string or a list of at most 4 non-empty strings")
        return [_unicode(x, "stop") for x in stops]

    def settings(self) -> GenerationSettings:
        return GenerationSettings(
            max_new_tokens=self.max_completion_tokens if self.max_tokens is None else self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=tuple(self.stop),
            top_k=0 if self.top_k == -1 else self.top_k,
            repetition_penalty=self.repetition_penalty,
        )


class StreamOptions(_Body):
    """`stream_options` of a streamed request."""

    include_usage: bool = False
    """a last chunk carries the usage, with no choices"""


class _RequestHead(_Body):
    """The fields of a request checked before its sampling parameters. `model` must be one of
    the validation context's `models` (404 otherwise) when the context names them."""

    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    """the prompt is sent back before the completion (/v1/completions only)"""
    model: str = Field(None, validate_default=True)
    # parameters this server does not implement (`_NEUTRAL`): refused unless they hold a neutral value
    logprobs: Any = None
    top_logprobs: Any = None
    best_of: Any = None
    suffix: Any = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None

    @field_validator("stream_options", mode="before")
    @classmethod
    def _with_stream_only(cls, value: Any, info: ValidationInfo) -> Any:
        if not info.data.get("stream"):
            raise _invalid("'stream_options' is only allowed with stream: true")
        if not isinstance(value, dict) or set(value) - {"include_usage"}:
            raise _invalid("'stream_options' supports only include_usage")
        return value

    @field_validator("model", mode="before")
    @classmethod
    def _served_model(cls, value: Any, info: ValidationInfo) -> str:
        if not isinstance(value, str):
            raise _invalid("'model' is required and must be a string")
        models = (info.context or {}).get("models")
        if models is not None and value not in models:
            message = f"The model '{value}' does not exist; this server serves: {', '.join(models)}"
            raise PydanticCustomError("model_not_found", message)
        return value

    @field_validator(*_NEUTRAL, mode="before")
    @classmethod
    def _neutral_only(cls, value: Any, info: ValidationInfo) -> Any:
        """A flag is not a number: false is neutral for `logprobs`, not for a penalty."""
        if not any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in _NEUTRAL[info.field_name]):
            raise _invalid(f"'{info.field_name}' is not supported by this server")
        return value

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class _Request(SamplingParams, _RequestHead):
    """What both endpoints take besides their prompt: the head's fields first, then the
    sampling parameters (pydantic orders the fields of bases from the last to the first)."""


class CompletionRequest(_Request):
    """The body of `POST /v1/completions`."""

    prompt: str = Field(None, validate_default=True)

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> str:
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
            value = value[0]
        if not isinstance(value, str) or not value:
            raise _invalid("'prompt' must be a non-empty string")
        return _unicode(value, "prompt")


class ChatMessage(_Body):
    role: str
    content: str


class ChatCompletionRequest(_Request):
    """The body of `POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(None, validate_default=True)

    @field_validator("echo", mode="before")
    @classmethod
    def _no_echo(cls, value: Any) -> Any:
        raise _invalid("'echo' is a parameter of /v1/completions only")

    @field_validator("messages", mode="before")
    @classmethod
    def _messages(cls, value: Any) -> list:
        if not isinstance(value, list) or not value:
            raise _invalid("'messages' must be a non-empty list")
        for m in value:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise _invalid("each message needs a string 'role' and a string 'content'")
            _unicode(m["role"], "messages"), _unicode(m["content"], "messages")
        return value


RequestModel = TypeVar("RequestModel", bound=BaseModel)


def validate(kind: type[RequestModel], body: dict, models: Sequence[str] | None = None) -> RequestModel:
    """`body` as a `kind`, or the ApiError of its first bad parameter (404 for a model not in
    `models`, when given)."""
    try:
        return kind.model_validate(body, context={"models": models})
    except ValidationError as e:
        raise _api_error(e.errors()[0], kind) from None


def parse_settings(body: dict) -> GenerationSettings:
    """OpenAI sampling parameters -> GenerationSettings (400 naming the parameter on bad values)."""
    return validate(SamplingParams, body).settings()


_KINDS = {"bool_type": "true or false", "int_type": "an integer", "float_type": "a number"}
_OUT_OF_RANGE = {"greater_than", "greater_than_equal", "less_than_equal", "finite_number"}


def _api_error(error: ErrorDetails, kind: type[BaseModel]) -> ApiError:
    """A pydantic error as this server words it; `param` is the innermost field named."""
    name, reason = str(error["loc"][-1]), error["type"]
    if reason == "model_not_found":
        return ApiError(404, error["msg"], name, "model_not_found")
    if reason == "invalid_request":
        return ApiError(400, error["msg"], name)
    if reason in _KINDS:
        return ApiError(400, f"'{name}' must be {_KINDS[reason]}", name)
    if reason in _OUT_OF_RANGE:
        return ApiError(400, _out_of_range(name, error["input"], kind.model_fields[name]), name)
    return ApiError(400, f"'{name}' is not valid: {error['msg']}", name)


def _out_of_range(name: str, value: Any, field: FieldInfo) -> str:
    """'x' must be a number in [low, high] (or (low, high]), or an integer in [low, high] (or
    at least low), got value: the bounds read from the field's own constraints."""
    bounds = {k: getattr(m, k) for m in field.metadata for k in ("ge", "gt", "le") if hasattr(m, k)}
    low, high = bounds.get("ge", bounds.get("gt")), bounds.get("le")
    if int in (field.annotation, *get_args(field.annotation)):
        where = f"in [{low}, {high}]" if high is not None else f"at least {low}"
        return f"'{name}' must be {where}, got {value}"
    where = f"({low}, {high}]" if "gt" in bounds else f"[{low}, {high}]"
    return f"'{name}' must be a number in {where}, got {value}"


# -- the responses ------------------------------------------------------------------------------


def usage_of(c: Completion) -> dict:
    return {
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": len(c.token_ids),
        "total_tokens": c.prompt_tokens + len(c.token_ids),
    }


def completion_response(c: Completion, rid: str, chat: bool, prefix: str = "") -> dict:
    """The whole answer: a chat.completion or a text_completion (its text after `prefix`)."""
    created = int(time.time())
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason}
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": c.model,
            "choices": [choice],
            "usage": usage_of(c),
        }
    choice = {"index": 0, "text": prefix + c.text, "logprobs": None, "finish_reason": c.finish_reason}
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": c.model,
        "choices": [choice],
        "usage": usage_of(c),
    }


def stream_chunk(
    rid: str,
    model: str,
    chat: bool,
    piece: str | None,
    finish: str | None,
    first: bool = False,
    usage: dict | None = None,
) -> str:
    """One server-sent event of a streamed answer: a piece of text, the finish reason, or
    (`usage` given) the usage with no choices."""
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


def stream_error(e: Exception) -> str:
    """The event that ends a stream whose generation failed."""
    error = {"error": {"message": str(e), "type": "server_error", "param": None, "code": None}}
    return f"data: {json.dumps(error)}\n\n"


STREAM_END = "data: [DONE]\n\n"
