"""`moeconsol serve --replicas N` on a real local Ray Serve.

One Ray for the whole module: the real command, started once in a subprocess with two CPU
replicas of a tiny family. Its answers are compared with serve-local's (`create_app` over a
Runtime of the same artifact); the last test stops it with SIGTERM while a request is in
flight and checks that the request finished and that no Ray process is left.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient

pytestmark = pytest.mark.ray
pytest.importorskip("ray.serve")

from builders import samples  # noqa: E402
from cli_helpers import one_error_line, run_main  # noqa: E402

from moeconsol.consolidate.pipeline import merge  # noqa: E402
from moeconsol.io.checkpoint import open_checkpoints  # noqa: E402
from moeconsol.serving.runtime import Runtime  # noqa: E402
from moeconsol.serving.server import create_app  # noqa: E402
from moeconsol.testing import derive_variant, save_model, tiny_mixtral, tiny_tokenizer  # noqa: E402

PROMPT = "Once upon a time"
RAY_PROCESSES = ("raylet", "gcs_server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    root: Path = tmp_path_factory.mktemp("cluster")
    tok = tiny_tokenizer()
    base = tiny_mixtral(0)
    models = {"base": base, "ft": derive_variant(base, 1, changed_experts=[(0, 1), (1, 2)], scale=0.5)}
    paths = {n: save_model(m, root / n, tok) for n, m in models.items()}
    merge(open_checkpoints([f"{n}={p}" for n, p in paths.items()]), root / "out")
    return root / "out"


@pytest.fixture(scope="module")
def local(artifact):
    """serve-local's app over the same artifact: the reference answers."""
    with TestClient(create_app(Runtime.from_artifact(artifact), max_wait=5.0)) as c:
        yield c


class Cluster:
    def __init__(self, proc: subprocess.Popen, url: str):
        self.proc, self.url, self.stderr = proc, url, []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)

    def ray_processes(self) -> list[psutil.Process]:
        return [p for p in psutil.Process(self.proc.pid).children(recursive=True)]


@pytest.fixture(scope="module")
def cluster(artifact):
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moeconsol",
            "serve",
            str(artifact),
            "--replicas",
            "2",
            "--port",
            str(port),
            "--num-cpus-per-replica",
            "0.5",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    c = Cluster(proc, f"http://127.0.0.1:{port}")
    seen: list[psutil.Process] = []
    try:
        deadline = time.time() + 150
        while not any(line.startswith("serving ") for line in c.stderr):
            assert proc.poll() is None, "".join(c.stderr)
            assert time.time() < deadline, "the cluster did not come up:\n" + "".join(c.stderr)
            time.sleep(0.2)
        seen = c.ray_processes()
        yield c
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for p in seen:  # stragglers, by pid
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    p.kill()
            except psutil.NoSuchProcess:
                pass


def _post(url: str, path: str, body: dict, timeout: float = 60) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=timeout)


def _sse(text: str) -> list[dict]:
    events = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", text
    return [json.loads(e) for e in events[:-1]]


def test_models_and_greedy_answers_equal_serve_locals(cluster, local):
    r = httpx.get(cluster.url + "/v1/models", timeout=30)
    assert r.status_code == 200
    assert (
        [m["id"] for m in r.json()["data"]]
        == [m["id"] for m in local.get("/v1/models").json()["data"]]
        == ["base", "ft"]
    )
    chat = [{"role": "user", "content": "hi there"}]
    for model in ("ft", "base", "base", "ft"):
        for path, body in (("/v1/completions", {"prompt": PROMPT}), ("/v1/chat/completions", {"messages": chat})):
            req = {"model": model, "max_tokens": 12, "temperature": 0, **body}
            got, want = _post(cluster.url, path, req), local.post(path, json=req)
            assert got.status_code == want.status_code == 200, got.text
            assert got.json()["choices"] == want.json()["choices"] and got.json()["usage"] == want.json()["usage"]
            assert got.json()["model"] == model


def test_sse_streams_through_ray_as_the_text_is_made(cluster, local):
    req = {"model": "ft", "prompt": PROMPT, "max_tokens": 48, "temperature": 0}
    whole = local.post("/v1/completions", json=req).json()["choices"][0]
    arrivals, lines = [], []
    with httpx.stream("POST", cluster.url + "/v1/completions", json={**req, "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.perf_counter())
                lines.append(line)
    chunks = _sse("\n".join(lines))
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"] == "length"
    assert len(chunks) > 10 and arrivals[0] < arrivals[-1]  # events, not one buffered body

    chat = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0}
    streamed = _sse(_post(cluster.url, "/v1/chat/completions", {**chat, "stream": True}).text)
    assert streamed[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in streamed)
    assert text == local.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]["content"]


def test_alternating_variants_are_routed_to_their_replicas(cluster):
    """16 requests alternating between two variants: at most 4 swaps over both replicas
    (variant-aware routing keeps each variant on the replica where it is active)."""
    before = samples(httpx.get(cluster.url + "/metrics", timeout=30).text)
    for i in range(16):
        model = ("base", "ft")[i % 2]
        r = _post(cluster.url, "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
    after = samples(httpx.get(cluster.url + "/metrics", timeout=30).text)

    def delta(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    swaps = sum(delta("moeconsol_swaps_total", model=m) for m in ("base", "ft"))
    assert swaps <= 4, swaps
    assert delta("moeconsol_requests_total", model="base") == delta("moeconsol_requests_total", model="ft") == 8
    # the sum over replicas and the per-replica series agree
    replicas = {
        dict(labels)["replica"]
        for (name, labels) in after
        if name == "moeconsol_requests_total" and "replica" in dict(labels)
    }
    assert len(replicas) == 2
    for m in ("base", "ft"):
        per = [after[("moeconsol_requests_total", frozenset({("model", m), ("replica", r)}))] for r in replicas]
        assert sum(per) == after[("moeconsol_requests_total", frozenset({("model", m)}))]


@pytest.mark.parametrize(
    "path, payload, status",
    [
        ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404),
        ("/v1/completions", b"{not json", 400),
        ("/v1/completions", {"model": "ft", "prompt": "hi", "temperature": -1}, 400),
        ("/v1/chat/completions", {"model": "ft", "messages": "hi"}, 400),
        ("/v1/completions", {"model": "ft", "prompt": "x" * (1 << 20)}, 413),
    ],
)
def test_errors_are_serve_locals(cluster, local, path, payload, status):
    kw = (
        {"content": payload, "headers": {"content-type": "application/json"}}
        if isinstance(payload, bytes)
        else {"json": payload}
    )
    got, want = httpx.post(cluster.url + path, timeout=30, **kw), local.post(path, **kw)
    assert got.status_code == want.status_code == status
    assert got.json() == want.json()


def test_a_client_that_goes_away_is_cancelled_on_its_replica(cluster):
    def cancelled() -> float:
        text = httpx.get(cluster.url + "/metrics", timeout=30).text
        return sum(
            v
            for (name, labels), v in samples(text).items()
            if name == "moeconsol_cancelled_requests_total" and "replica" not in dict(labels)
        )

    before = cancelled()
    req = {"model": "ft", "prompt": PROMPT, "max_tokens": 240, "temperature": 0, "stream": True}
    with httpx.stream("POST", cluster.url + "/v1/completions", json=req, timeout=60) as r:
        events = 0
        for line in r.iter_lines():
            events += line.startswith("data: ")
            if events == 3:
                break  # leave: the connection closes
    deadline = time.time() + 20
    while cancelled() == before and time.time() < deadline:
        time.sleep(0.25)
    assert cancelled() == before + 1


def test_cross_variant_batching_reaches_each_replicas_runtime(artifact, local, monkeypatch):
    """`serve --cross-variant-batching`: the option's plumbing down to the runtime a replica
    builds, without starting Ray (deploy is replaced by a stand-in that records what it was
    given, then stops the command as Ctrl-C would)."""
    import moeconsol.serving.ray_serve as cluster_module
    from moeconsol.serving.crossvariant import ServingMode

    deployed: list = []

    def fake_deploy(settings, replicas, **options):
        deployed.append(settings)
        raise KeyboardInterrupt

    monkeypatch.setattr(cluster_module, "start_ray", lambda address, num_cpus=None: None)
    monkeypatch.setattr(cluster_module, "stop", lambda local: None)
    monkeypatch.setattr(cluster_module, "deploy", fake_deploy)
    for flag in ([], ["--cross-variant-batching"]):
        r = run_main("serve", artifact, "--replicas", "2", "--port", _free_port(), *flag)
        assert r.returncode == 0 and "interrupted" in r.stderr, r.stderr
    swap, cross = deployed
    assert ServingMode(swap.mode) is ServingMode.SWAP and cluster_module.routes_by_variant(swap)
    assert ServingMode(cross.mode) is ServingMode.CROSS_VARIANT and not cluster_module.routes_by_variant(cross)
    runtime = cluster_module.replica_runtime(cross, "ft")
    assert runtime.mode is ServingMode.CROSS_VARIANT and runtime.active == "ft"
    with TestClient(create_app(runtime)) as replica:
        for model in ("base", "ft"):
            req = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
            got = replica.post("/v1/completions", json=req)
            assert (
                got.status_code == 200
                and got.json()["choices"] == local.post("/v1/completions", json=req).json()["choices"]
            )
    assert runtime.swaps == []


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def test_bad_input_one_line_exit_2_nothing_started(artifact, tmp_path, monkeypatch):
    before = _children()
    one_error_line(run_main("serve", artifact, "--replicas", "0"), "--replicas")
    damaged = tmp_path / "damaged"
    shutil.copytree(artifact, damaged)
    bank = next(damaged.glob("bank-*.safetensors"))
    data = bytearray(bank.read_bytes())
    data[-1] ^= 0xFF
    bank.write_bytes(bytes(data))
    one_error_line(run_main("serve", damaged, "--replicas", "1"), "damaged")
    one_error_line(run_main("serve", artifact, "--replicas", "2", "--num-gpus-per-replica", "64"), "GPUs")
    port = _free_port()  # nothing listens there
    one_error_line(run_main("serve", artifact, "--address", f"127.0.0.1:{port}"), f"127.0.0.1:{port}")
    monkeypatch.setitem(sys.modules, "ray", None)
    one_error_line(run_main("serve", artifact), "pip install 'moeconsol[cluster]'")
    assert _children() <= before


def test_sigterm_lets_the_request_in_flight_finish_and_leaves_no_ray_process(cluster):
    """Last: stops the module's cluster."""
    procs = cluster.ray_processes()
    names = {p.name() for p in procs}
    assert set(RAY_PROCESSES) <= names, names
    result: dict = {}

    def long_request() -> None:
        req = {"model": "base", "prompt": PROMPT, "max_tokens": 200, "temperature": 0, "stream": True}
        with httpx.stream("POST", cluster.url + "/v1/completions", json=req, timeout=120) as r:
            lines = []
            for line in r.iter_lines():
                lines.append(line)
                if line.startswith("data: ") and "first" not in result:
                    result["first"] = time.perf_counter()
            result["lines"] = lines

    t = threading.Thread(target=long_request)
    t.start()
    deadline = time.time() + 60
    while "first" not in result and time.time() < deadline:
        time.sleep(0.01)
    cluster.proc.send_signal(signal.SIGTERM)
    t.join(120)
    assert cluster.proc.wait(timeout=90) == 0, "".join(cluster.stderr)
    chunks = _sse("\n".join(result["lines"]))
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    last = [ln for ln in cluster.stderr if ln.strip()][-1]
    assert last.startswith("moeconsol: interrupted") and "every Ray process stopped" in last
    time.sleep(1)
    alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(p.pid, p.name()) for p in alive]
