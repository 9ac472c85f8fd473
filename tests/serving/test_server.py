"""The OpenAI-compatible server: endpoints, batched requests, streaming, metrics and errors.

Expected completions come from transformers' own models loaded from the original
checkpoints (greedy), not from the runtime under test.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from builders import greedy, samples, served_family
from cli_helpers import cli, one_error_line
from fastapi.testclient import TestClient

from moeconsol.serving.engine import GenerationSettings, complete
from moeconsol.serving.runtime import Runtime
from moeconsol.serving.server import create_app
from moeconsol.testing import tiny_tokenizer

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    return served_family(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def client(served):
    out, runtime, refs, tok = served
    with TestClient(create_app(runtime, max_wait=5.0)) as c:
        yield c


def _sse(text: str) -> list:
    events = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_models_lists_the_variants(client):
    r = client.get("/v1/models")
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == ["base", "ft"] and r.json()["object"] == "list"


def test_completions_for_interleaved_variants_equal_transformers(client, served):
    out, runtime, refs, tok = served
    ids = tok(PROMPT)["input_ids"]
    for model in ("ft", "base", "ft", "base"):
        r = client.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        want = greedy(refs[model], ids, 8)
        assert body["model"] == model and body["object"] == "text_completion"
        assert body["choices"][0]["text"] == tok.decode(want, skip_special_tokens=True)
        assert body["usage"] == {
            "prompt_tokens": len(ids),
            "completion_tokens": len(want),
            "total_tokens": len(ids) + len(want),
        }
        assert runtime.active == model


def test_chat_uses_the_variants_chat_template(client, served):
    out, runtime, refs, tok = served
    messages = [{"role": "user", "content": "add 2 and 3"}]
    r = client.post(
        "/v1/chat/completions", json={"model": "ft", "messages": messages, "max_tokens": 6, "temperature": 0}
    )
    assert r.status_code == 200, r.text
    ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False)[
        "input_ids"
    ]
    assert ids[-3:] == tok("<|assistant|>\n", add_special_tokens=False)["input_ids"][-3:]
    msg = r.json()["choices"][0]["message"]
    assert msg["role"] == "assistant" and msg["content"] == tok.decode(
        greedy(refs["ft"], ids, 6), skip_special_tokens=True
    )


def test_streaming_sends_the_same_text_as_events(client):
    req = {"model": "ft", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    whole = client.post("/v1/completions", json=req).json()["choices"][0]
    r = client.post("/v1/completions", json={**req, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = _sse(r.text)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1]) and len(chunks) > 2

    r = client.post(
        "/v1/chat/completions",
        json={
            "model": "base",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 5,
            "temperature": 0,
            "stream": True,
        },
    )
    chunks = _sse(r.text)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant" and chunks[0]["object"] == "chat.completion.chunk"
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    again = client.post(
        "/v1/chat/completions",
        json={"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0},
    ).json()
    assert streamed == again["choices"][0]["message"]["content"]


def test_metrics_count_swaps_and_tokens_per_model(client, served):
    out, runtime, refs, tok = served
    before = samples(client.get("/metrics").text)
    tokens = 0
    for model in ("base", "ft", "ft"):
        tokens += client.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 4}).json()[
            "usage"
        ]["completion_tokens"]
    after_r = client.get("/metrics")
    assert after_r.status_code == 200 and after_r.headers["content-type"].startswith("text/plain")
    after = samples(after_r.text)

    def delta(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after[key] - before.get(key, 0.0)

    assert delta("moeconsol_requests_total", model="ft") == 2 and delta("moeconsol_requests_total", model="base") == 1
    assert (
        delta("moeconsol_generated_tokens_total", model="ft") + delta("moeconsol_generated_tokens_total", model="base")
        == tokens
    )
    assert delta("moeconsol_swaps_total", model="ft") == 1 and delta("moeconsol_swap_seconds_count", model="ft") == 1
    assert delta("moeconsol_swap_bytes_total", model="ft") == runtime.swaps[-1].bytes_moved > 0
    assert delta("moeconsol_swap_seconds_sum", model="ft") > 0
    assert delta("moeconsol_time_to_first_token_seconds_count", model="ft") == 2
    assert delta("moeconsol_time_to_first_token_seconds_bucket", model="ft", le="+Inf") == 2
    assert after[("moeconsol_resident_bytes", frozenset({("part", "total")}))] == runtime.resident_bytes().total
    # the new gauges: nothing runs or waits between requests
    for m in ("base", "ft"):
        assert after[("moeconsol_batch_size", frozenset({("model", m)}))] == 0
        assert after[("moeconsol_queue_length", frozenset({("model", m)}))] == 0


def _nested(depth: int) -> list:
    """[[[...]]], `depth` lists deep (built without recursion)."""
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize(
    "path, payload, status, fragment",
    [
        ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "does not exist"),
        (
            "/v1/chat/completions",
            {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
            404,
            "does not exist",
        ),
        ("/v1/completions", b"{not json", 400, "not valid JSON"),
        ("/v1/completions", b'{"model": "ft", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "nested"),
        ("/v1/completions", {"model": "ft", "prompt": _nested(900)}, 400, "'prompt'"),
        (
            "/v1/chat/completions",
            {"model": "ft", "messages": [{"role": "user", "content": _nested(900)}]},
            400,
            "'content'",
        ),
        ("/v1/completions", {"model": "ft"}, 400, "'prompt'"),
        ("/v1/completions", {"model": "ft", "prompt": "hi", "temperature": -1}, 400, "'temperature'"),
        ("/v1/completions", {"model": "ft", "prompt": "hi", "max_tokens": 0}, 400, "'max_tokens'"),
        ("/v1/completions", {"model": "ft", "prompt": "hi", "top_p": "x"}, 400, "'top_p'"),
        ("/v1/completions", {"model": "ft", "prompt": "hi", "n": 2}, 400, "n=1"),
        ("/v1/completions", {"model": "ft", "prompt": "hi", "top_k": -2}, 400, "'top_k'"),
        ("/v1/completions", {"model": "ft", "prompt": "hi", "top_k": 1.5}, 400, "'top_k'"),
        ("/v1/completions", {"model": "ft", "prompt": "hi", "repetition_penalty": 0}, 400, "'repetition_penalty'"),
        ("/v1/completions", {"model": "ft", "prompt": "hi", "stream": "yes"}, 400, "'stream'"),
        ("/v1/chat/completions", {"model": "ft", "messages": "hi"}, 400, "'messages'"),
        (
            "/v1/completions",
            {"model": "ft", "prompt": "The quick brown fox " * 60, "max_tokens": 8},
            400,
            "context is 256 tokens",
        ),
    ],
)
def test_errors_answer_openai_style_and_the_server_keeps_serving(client, path, payload, status, fragment):
    kw = (
        {"content": payload, "headers": {"content-type": "application/json"}}
        if isinstance(payload, bytes)
        else {"json": payload}
    )
    r = client.post(path, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and err["type"] == "invalid_request_error"
    if status == 404:
        assert err["code"] == "model_not_found"
    if "context" in fragment:
        assert err["code"] == "context_length_exceeded"
    ok = client.post("/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200


# -- batched requests ------------------------------------------------------------------------


def test_seeded_sampling_through_the_server_equals_alone(client, served):
    out, runtime, refs, tok = served
    req = {"model": "ft", "prompt": PROMPT, "max_tokens": 12, "temperature": 1.3, "top_p": 0.9, "seed": 11}
    want = complete(runtime, "ft", PROMPT, GenerationSettings(12, 1.3, 0.9, 11)).text  # alone, in this process
    with ThreadPoolExecutor(8) as pool:  # the same request among others, batched
        others = [pool.submit(client.post, "/v1/completions", json={**req, "seed": s}) for s in range(6)]
        mine = pool.submit(client.post, "/v1/completions", json=req)
        assert mine.result().json()["choices"][0]["text"] == want
        assert all(o.result().status_code == 200 for o in others)


# -- a real socket ---------------------------------------------------------------------------


def test_real_socket_server_on_loopback(served):
    import uvicorn

    out, runtime, refs, tok = served
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(runtime), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        assert server.started
        base_url = f"http://127.0.0.1:{port}"
        assert [m["id"] for m in httpx.get(f"{base_url}/v1/models").json()["data"]] == ["base", "ft"]
        r = httpx.post(
            f"{base_url}/v1/completions",
            json={"model": "ft", "prompt": PROMPT, "max_tokens": 5, "temperature": 0},
            timeout=60,
        )
        assert r.status_code == 200
        assert r.json()["choices"][0]["text"] == tok.decode(
            greedy(refs["ft"], tok(PROMPT)["input_ids"], 5), skip_special_tokens=True
        )
        with httpx.stream(
            "POST",
            f"{base_url}/v1/completions",
            timeout=60,
            json={"model": "base", "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stream": True},
        ) as s:
            text = "".join(s.iter_text())
        assert _sse(text)[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert httpx.post(f"{base_url}/v1/completions", json={"model": "x", "prompt": "y"}).status_code == 404
    finally:
        server.should_exit = True
        thread.join(timeout=30)


# -- hardening: every parameter checked, named, and nothing silently ignored -------------------


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", b'{"model": "ft", "prompt": "hi", "temperature": NaN}', "temperature"),
        ("/v1/completions", b'{"model": "ft", "prompt": "hi", "temperature": Infinity}', "temperature"),
        ("/v1/completions", b'{"model": "ft", "prompt": "hi", "top_p": NaN}', "top_p"),
        ("/v1/completions", {"model": "ft", "prompt": "hi", "seed": 2**63}, "seed"),
        ("/v1/completions", b'{"model": "ft", "prompt": "a\\ud800b"}', "prompt"),
        ("/v1/chat/completions", b'{"model": "ft", "messages": [{"role": "user", "content": "\\udfff"}]}', "messages"),
        ("/v1/completions", {"model": "ft", "prompt": "hi", "logprobs": 2}, "logprobs"),
        ("/v1/completions", {"model": "ft", "prompt": "hi", "best_of": 3}, "best_of"),
        ("/v1/completions", {"model": "ft", "prompt": "hi", "suffix": "x"}, "suffix"),
        ("/v1/completions", {"model": "ft", "prompt": "hi", "logit_bias": {"5": 10}}, "logit_bias"),
        ("/v1/completions", {"model": "ft", "prompt": "hi", "presence_penalty": 0.5}, "presence_penalty"),
        ("/v1/completions", {"model": "ft", "prompt": "hi", "frequency_penalty": 1}, "frequency_penalty"),
        (
            "/v1/chat/completions",
            {"model": "ft", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
            "tools",
        ),
        (
            "/v1/chat/completions",
            {"model": "ft", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
            "response_format",
        ),
        (
            "/v1/chat/completions",
            {"model": "ft", "messages": [{"role": "user", "content": "x"}], "logprobs": True},
            "logprobs",
        ),
        ("/v1/chat/completions", {"model": "ft", "messages": [{"role": "user", "content": "x"}], "echo": True}, "echo"),
        (
            "/v1/completions",
            {"model": "ft", "prompt": "hi", "stream_options": {"include_usage": True}},
            "stream_options",
        ),
        ("/v1/completions", {"model": "ft", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ("/v1/completions", {"model": "ft", "prompt": "hi", "echo": "yes"}, "echo"),
    ],
)
def test_bad_parameters_are_refused_by_name(client, path, body, param):
    kw = (
        {"content": body, "headers": {"content-type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    r = client.post(path, **kw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and f"'{param}'" in err["message"]


def test_neutral_values_of_unsupported_parameters_are_accepted(client):
    r = client.post(
        "/v1/completions",
        json={
            "model": "ft",
            "prompt": "hi",
            "max_tokens": 2,
            "logprobs": None,
            "best_of": 1,
            "presence_penalty": 0,
            "frequency_penalty": 0.0,
            "logit_bias": {},
            "echo": False,
        },
    )
    assert r.status_code == 200, r.text


def test_a_body_over_the_limit_is_413_and_the_server_keeps_serving(served):
    out, runtime, refs, tok = served
    with TestClient(create_app(runtime, max_body_bytes=1000)) as c:
        r = c.post("/v1/completions", json={"model": "ft", "prompt": "x" * 2000})
        assert r.status_code == 413 and "1000" in r.json()["error"]["message"]
        assert c.get("/v1/models").status_code == 200
        assert c.post("/v1/completions", json={"model": "ft", "prompt": "hi", "max_tokens": 2}).status_code == 200


def test_echo_and_usage_in_the_stream(client, served):
    out, runtime, refs, tok = served
    ids = tok(PROMPT)["input_ids"]
    want = tok.decode(greedy(refs["ft"], ids, 6), skip_special_tokens=True)
    r = client.post(
        "/v1/completions", json={"model": "ft", "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "echo": True}
    )
    assert r.json()["choices"][0]["text"] == PROMPT + want
    r = client.post(
        "/v1/completions",
        json={
            "model": "ft",
            "prompt": PROMPT,
            "max_tokens": 6,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    chunks = _sse(r.text)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(greedy(refs["ft"], ids, 6))
    assert chunks[-1]["usage"]["prompt_tokens"] == len(ids)
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == want


def test_stop_strings_over_http(client, served):
    out, runtime, refs, tok = served
    full = tok.decode(greedy(refs["base"], tok(PROMPT)["input_ids"], 10), skip_special_tokens=True)
    stop = full[4:6]
    r = client.post(
        "/v1/completions", json={"model": "base", "prompt": PROMPT, "max_tokens": 10, "temperature": 0, "stop": stop}
    )
    choice = r.json()["choices"][0]
    assert choice["text"] == full[: full.index(stop)] and choice["finish_reason"] == "stop"


def test_a_model_without_a_context_limit_still_bounds_max_tokens():
    from moeconsol.serving.variants import Family
    from moeconsol.testing import tiny_switch

    tok = tiny_tokenizer()
    runtime = Runtime(Family.from_models({"s": tiny_switch(0)}, {"s": tok}))
    assert runtime.max_context("s") is None
    with TestClient(create_app(runtime, max_tokens_in_flight=4096)) as c:
        r = c.post("/v1/completions", json={"model": "s", "prompt": "hi", "max_tokens": 10**12})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        assert c.post("/v1/completions", json={"model": "s", "prompt": "hi", "max_tokens": 3}).status_code == 200


# -- clients that go away ------------------------------------------------------------------------


def _metric(base_url: str, name: str, model: str) -> float:
    return samples(httpx.get(f"{base_url}/metrics").text).get((name, frozenset({("model", model)})), 0.0)


def test_a_client_that_disconnects_frees_its_slot(served, monkeypatch):
    """Streaming and not: the client goes away mid-generation; its request is cancelled and
    leaves the batch, so nothing keeps generating for nobody and the next request is served."""
    import uvicorn

    out, runtime, refs, tok = served
    forward = runtime.model.forward

    def slow_forward(*args, **kwargs):  # 20 ms a step: 200 tokens would take 4 s
        time.sleep(0.02)
        return forward(*args, **kwargs)

    monkeypatch.setattr(runtime.model, "forward", slow_forward)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(runtime)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        url = f"http://127.0.0.1:{port}"
        long = {"model": "base", "prompt": "hi", "max_tokens": 200, "temperature": 1.0, "seed": 1}
        with httpx.stream("POST", f"{url}/v1/completions", json={**long, "stream": True}, timeout=60) as r:
            next(r.iter_lines())  # the first event, then the client goes away
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json=long, timeout=1.0)
        deadline = time.time() + 30
        while _metric(url, "moeconsol_cancelled_requests_total", "base") < 2 and time.time() < deadline:
            time.sleep(0.05)
        assert _metric(url, "moeconsol_cancelled_requests_total", "base") == 2
        assert _metric(url, "moeconsol_batch_size", "base") == 0  # the slots are free
        assert app.state.scheduler.engine.running() == 0
        r = httpx.post(f"{url}/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.mark.slow
def test_two_hundred_clients_leaving_at_once_stall_no_variant(tmp_path, monkeypatch):
    """200 clients, streamed and not, spread over four variants, go away 0.3 to 1.5 s after
    asking, with no max wait (every arrival of another variant parks the running batch). Afterwards every variant answers at once (nobody has to ask
    for the variant whose batches were emptied), and the gauges and the engine are back to 0."""
    import uvicorn

    out, runtime, refs, tok = served_family(tmp_path, fine_tunes=3)
    forward = runtime.model.forward

    def slow_forward(*args, **kwargs):  # 5 ms a step, so that the clients leave mid-generation
        time.sleep(0.005)
        return forward(*args, **kwargs)

    monkeypatch.setattr(runtime.model, "forward", slow_forward)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(runtime, max_wait=0.0)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"

    def leave(i: int) -> None:
        body = {"model": sorted(refs)[i % 4], "prompt": "hi", "max_tokens": 300, "temperature": 1.0, "seed": i}
        body["stream"] = i % 8 < 4
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=0.3 + 1.2 * (i % 5) / 4) as r:
                for _ in r.iter_bytes():
                    pass
        except httpx.TimeoutException:
            pass  # the client gives up and closes its connection

    try:
        while not server.started:
            time.sleep(0.02)
        with ThreadPoolExecutor(max_workers=200) as pool:
            list(pool.map(leave, range(200)))
        ids = tok(PROMPT)["input_ids"]
        for model in sorted(refs, reverse=True):
            r = httpx.post(
                f"{url}/v1/completions",
                json={"model": model, "prompt": PROMPT, "max_tokens": 3, "temperature": 0},
                timeout=30,
            )
            assert r.status_code == 200
            assert r.json()["choices"][0]["text"] == tok.decode(greedy(refs[model], ids, 3), skip_special_tokens=True)
        deadline = time.time() + 30
        while app.state.scheduler.engine.running() and time.time() < deadline:
            time.sleep(0.05)
        assert app.state.scheduler.engine.running() == 0
        for model in refs:
            assert _metric(url, "moeconsol_batch_size", model) == 0
            assert _metric(url, "moeconsol_queue_length", model) == 0
    finally:
        server.should_exit = True
        thread.join(timeout=30)


# -- the command line --------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_refuses_a_port_in_use_and_nan_in_one_line(served):
    out, runtime, refs, tok = served
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = cli("serve-local", out, "--port", port)
        one_error_line(r, f"127.0.0.1:{port}")
    one_error_line(cli("serve-local", out, "--port", port, "--temperature", "nan"), "--temperature must be")
    one_error_line(cli("serve-local", out, "--prompt", "hi", "--top-p", "nan"), "--top-p must be")
    one_error_line(
        cli("serve-local", out, "--prompt", "hi", "--repetition-penalty", "1e-40"), "--repetition-penalty must be"
    )
    one_error_line(cli("serve-local", out, "--port", port, "--max-batch-size", "0"), "--max-batch-size")


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
def test_cli_server_stops_on_ctrl_c_or_sigterm_with_one_line(served, sig, code):
    out, runtime, refs, tok = served
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # a server in a terminal's foreground: SIGINT at its default, whatever this test runner inherited
    # (a shell starts background jobs with SIGINT ignored, and an ignored signal stays ignored across exec)
    proc = subprocess.Popen(
        [sys.executable, "-m", "moeconsol", "serve-local", str(out), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).raise_for_status()
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.time() < deadline, (
                    proc.stderr.read() if proc.poll() is not None else "timeout"
                )
                time.sleep(0.2)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, stderr
    last = [ln for ln in stderr.splitlines() if ln.strip()][-1]
    assert last.startswith("moeconsol: interrupted") and f"{port}" in last, stderr


def test_streams_inside_one_batch_each_get_their_own_text(client, served):
    out, runtime, refs, tok = served
    prompts = ["Once upon a time", "def add(a, b):", "The quick brown fox", "0123456789"]

    def stream(p: str) -> str:
        r = client.post(
            "/v1/completions", json={"model": "base", "prompt": p, "max_tokens": 12, "temperature": 0, "stream": True}
        )
        return "".join(c["choices"][0]["text"] for c in _sse(r.text))

    with ThreadPoolExecutor(len(prompts)) as pool:
        texts = list(pool.map(stream, prompts))
    for p, text in zip(prompts, texts):
        assert text == tok.decode(greedy(refs["base"], tok(p)["input_ids"], 12), skip_special_tokens=True)


def test_bind_gives_a_tcp_socket_so_responses_are_not_delayed():
    """asyncio sets TCP_NODELAY only on accepted sockets whose protocol is TCP; a socket made
    with proto 0 made every keep-alive response wait 40 ms for the client's delayed ACK."""
    from moeconsol.serving.server import bind

    sock = bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP and sock.getsockname()[0] == "127.0.0.1"
    finally:
        sock.close()


def test_tokenization_runs_off_the_event_loop(served, monkeypatch):
    """A prompt that takes long to tokenize must not hold other requests: while one request's
    tokenization is blocked, /v1/models answers (it could not if tokenization ran on the loop)."""
    out, runtime, refs, tok = served
    blocked, released = threading.Event(), threading.Event()
    encode = runtime.encode

    def slow_encode(name, prompt):
        if prompt == "slow":
            blocked.set()
            assert released.wait(timeout=20), "the event loop was held while tokenizing"
        return encode(name, prompt)

    monkeypatch.setattr(runtime, "encode", slow_encode)
    with TestClient(create_app(runtime)) as c, ThreadPoolExecutor(1) as pool:
        slow = pool.submit(c.post, "/v1/completions", json={"model": "ft", "prompt": "slow", "max_tokens": 2})
        assert blocked.wait(timeout=60)
        assert c.get("/v1/models").status_code == 200  # answered while "slow" is being tokenized
        released.set()
        assert slow.result().status_code == 200
