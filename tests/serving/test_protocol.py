"""Request validation: OpenAI's parameters into typed requests and engine settings, and
every refusal worded and named as the HTTP tests (test_server.py) see it."""

from __future__ import annotations

import pytest

from moeconsol.serving.protocol import ApiError, ChatCompletionRequest, CompletionRequest, parse_settings, validate


def test_top_k_and_repetition_penalty_are_parsed_like_vllm():
    assert (parse_settings({}).top_k, parse_settings({}).repetition_penalty) == (None, None)  # the variant's
    assert parse_settings({"top_k": -1}).top_k == 0 and parse_settings({"top_k": 5}).top_k == 5
    assert parse_settings({"repetition_penalty": 1.2}).repetition_penalty == 1.2


@pytest.mark.parametrize(
    "body, status, message, param",
    [
        ({"temperature": -1}, 400, "'temperature' must be a number in [0.0, 2.0], got -1", "temperature"),
        ({"top_p": 0}, 400, "'top_p' must be a number in (0.0, 1.0], got 0", "top_p"),
        ({"top_p": float("nan")}, 400, "'top_p' must be a number in (0.0, 1.0], got nan", "top_p"),
        (
            {"repetition_penalty": 1e-40},
            400,
            "'repetition_penalty' must be a number in [0.01, 100.0], got 1e-40",
            "repetition_penalty",
        ),
        ({"seed": 2**63}, 400, "'seed' must be in [0, 9223372036854775807], got 9223372036854775808", "seed"),
        ({"max_tokens": 0}, 400, "'max_tokens' must be at least 1, got 0", "max_tokens"),
        ({"top_k": 1.5}, 400, "'top_k' must be an integer", "top_k"),
        ({"temperature": "0.5"}, 400, "'temperature' must be a number", "temperature"),
        ({"stream": 1}, 400, "'stream' must be true or false", "stream"),
        (
            {"stream": True, "stream_options": {"include_usage": "yes"}},
            400,
            "'include_usage' must be true or false",
            "include_usage",
        ),
        ({"presence_penalty": False}, 400, "'presence_penalty' is not supported by this server", "presence_penalty"),
        ({"model": 3}, 400, "'model' is required and must be a string", "model"),
        ({"model": "x"}, 404, "The model 'x' does not exist; this server serves: a, b", "model"),
        ({"prompt": ["a", "b"]}, 400, "'prompt' must be a non-empty string", "prompt"),
    ],
)
def test_refusals_are_worded_and_named(body, status, message, param):
    with pytest.raises(ApiError) as e:
        validate(CompletionRequest, {"model": "a", "prompt": "hi", **body}, ["a", "b"])
    assert (e.value.status, e.value.message, e.value.param) == (status, message, param)


def test_null_is_absent_and_neutral_values_pass():
    r = validate(
        ChatCompletionRequest,
        {"model": "a", "messages": [{"role": "user", "content": "x"}], "temperature": None, "logprobs": False, "n": 1},
        ["a"],
    )
    assert r.settings().temperature == 1.0 and r.messages[0].content == "x" and not r.include_usage
    assert validate(CompletionRequest, {"model": "a", "prompt": ["hi"]}).prompt == "hi"  # a list of one prompt
