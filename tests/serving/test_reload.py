"""A running server serves a variant added to its artifact (`moeconsol add`) after
`POST /admin/reload`, without a restart, and the requests in flight during the reload finish
with the text they would have had. Expected completions come from transformers' own models."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from builders import greedy, served_family
from fastapi.testclient import TestClient

from moeconsol.consolidate.grow import add_variant
from moeconsol.consolidate.shrink import remove_variant
from moeconsol.serving.runtime import Runtime
from moeconsol.serving.server import create_app
from moeconsol.testing import derive_variant, save_model, tiny_tokenizer

PROMPT = "Once upon a time"


@pytest.fixture
def served(tmp_path):
    return served_family(tmp_path)


def test_reload_serves_an_added_variant_and_finishes_requests_in_flight(served, tmp_path, monkeypatch):
    art, runtime, refs, tok = served
    new = derive_variant(refs["base"], 9, [(0, 3), (1, 1)], scale=0.5)
    save_model(new, tmp_path / "x", tiny_tokenizer())
    ids = tok(PROMPT)["input_ids"]

    forward = runtime.model.forward

    def slow_forward(*args, **kwargs):  # 20 ms a step: the request below is in flight for ~0.5 s
        time.sleep(0.02)
        return forward(*args, **kwargs)

    monkeypatch.setattr(runtime.model, "forward", slow_forward)
    app = create_app(runtime, reload=lambda: Runtime.from_artifact(art))
    with TestClient(app) as c:
        old_scheduler = app.state.scheduler
        answers: dict[str, object] = {}

        def long_request():
            body = {"model": "ft", "prompt": PROMPT, "max_tokens": 24, "temperature": 0}
            answers["ft"] = c.post("/v1/completions", json=body)

        t = threading.Thread(target=long_request)
        t.start()
        deadline = time.time() + 30
        while old_scheduler.engine.running() == 0 and time.time() < deadline:
            time.sleep(0.005)
        assert old_scheduler.engine.running() == 1  # in flight when the artifact changes

        add_variant(art, f"x={tmp_path / 'x'}")
        r = c.post("/admin/reload")
        assert r.status_code == 200, r.text
        assert r.json()["added"] == ["x"] and r.json()["removed"] == []
        assert old_scheduler.engine.running() == 1  # the reload did not wait for it, nor drop it
        t.join(timeout=60)

        in_flight = answers["ft"]
        assert in_flight.status_code == 200
        assert in_flight.json()["choices"][0]["text"] == tok.decode(greedy(refs["ft"], ids, 24))
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["base", "ft", "x"]
        r = c.post("/v1/completions", json={"model": "x", "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200
        assert r.json()["choices"][0]["text"] == tok.decode(greedy(new, ids, 8))
        deadline = time.time() + 30
        while old_scheduler._thread.is_alive() and time.time() < deadline:
            time.sleep(0.01)
        assert not old_scheduler._thread.is_alive()  # drained, then stopped

        # a removed variant is gone after the next reload; the others are served as before
        remove_variant(art, "ft")
        assert c.post("/admin/reload").json()["removed"] == ["ft"]
        r = c.post("/v1/completions", json={"model": "ft", "prompt": PROMPT, "max_tokens": 2})
        assert r.status_code == 404
        r = c.post("/v1/completions", json={"model": "base", "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
        assert r.json()["choices"][0]["text"] == tok.decode(greedy(refs["base"], ids, 8))


def test_a_failed_reload_keeps_serving(served):
    art, runtime, refs, tok = served
    (art / "manifest.json").write_text("{}")  # damaged after the server loaded it
    with TestClient(create_app(runtime, reload=lambda: Runtime.from_artifact(art))) as c:
        r = c.post("/admin/reload")
        assert r.status_code == 409 and "still serving base, ft" in r.json()["error"]["message"]
        r = c.post("/v1/completions", json={"model": "ft", "prompt": PROMPT, "max_tokens": 2})
        assert r.status_code == 200


def test_reload_without_an_artifact_is_refused(served):
    art, runtime, refs, tok = served
    with TestClient(create_app(runtime)) as c:
        assert c.post("/admin/reload").status_code == 404


@pytest.mark.slow
def test_the_cli_server_reloads_on_sighup(served, tmp_path):
    art, runtime, refs, tok = served
    save_model(derive_variant(refs["base"], 9, [(0, 3)], scale=0.5), tmp_path / "x", tiny_tokenizer())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moeconsol", "serve-local", str(art), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def models() -> list[str]:
        return [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=2).json()["data"]]

    try:
        deadline = time.time() + 120
        while True:
            try:
                assert models() == ["base", "ft"]
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.time() < deadline, "the server did not start"
                time.sleep(0.2)
        add_variant(art, f"x={tmp_path / 'x'}")
        proc.send_signal(signal.SIGHUP)
        while models() != ["base", "ft", "x"]:
            assert proc.poll() is None and time.time() < deadline, "no reload after SIGHUP"
            time.sleep(0.2)
        r = httpx.post(f"{url}/v1/completions", json={"model": "x", "prompt": PROMPT, "max_tokens": 2}, timeout=60)
        assert r.status_code == 200
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=60)
    assert "moeconsol: reloaded: serving base, ft, x" in stderr
