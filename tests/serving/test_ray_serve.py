"""`moeconsol serve --replicas N` on a real local Ray Serve.

One Ray for the whole module: the real command, started once in a subprocess with two CPU
replicas of a tiny family. Its answers are compared with serve-local's (`create_app` over a
Runtime of the same artifact); the last test stops it with SIGTERM while a request is in
flight and checks that the request finished and that no Ray process is left.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
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
from moeconsol.serving.ray_serve import APP_NAME  # noqa: E402
from moeconsol.serving.runtime import Runtime  # noqa: E402
from moeconsol.serving.server import create_app  # noqa: E402
from moeconsol.testing import derive_variant, save_model, tiny_mixtral, tiny_tokenizer  # noqa: E402

PROMPT = "Once upon a time"
RAY_PROCESSES = ("raylet", "gcs_server")
ROUTE_BY_PROBING = {"RAY_SERVE_QUEUE_LENGTH_CACHE_TIMEOUT_S": "0"}
"""Serve forgets each replica's queue length at once, so that every request is routed by
asking the replicas (as after a pause of 10 s, Serve's default); then a replica slow to
answer is seen as such."""
PAUSE = 1.0
"""seconds a request waits for the replicas, stopped, in the routing test: longer than Serve's
first deadline for their answer (0.1 s) and than the way from the proxy to the router"""


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
        env={**os.environ, **ROUTE_BY_PROBING},
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


@pytest.fixture
def cpu_hog():
    """A busy loop on every core, beside the replicas (stopped by pid)."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        yield
    finally:
        for h in hogs:
            h.kill()
            h.wait()


def _per_replica(text: str, name: str) -> dict[tuple[str, str], float]:
    """{(replica, model): value} of a metric's per-replica series."""
    return {
        (dict(labels)["replica"], dict(labels)["model"]): v
        for (n, labels), v in samples(text).items()
        if n == name and "replica" in dict(labels)
    }


def _replica_processes(cluster: Cluster) -> list[psutil.Process]:
    procs = []
    for p in cluster.ray_processes():
        try:
            if any(part.endswith(f"{APP_NAME}:Replica") for part in p.cmdline()):
                procs.append(p)
        except psutil.NoSuchProcess:
            pass
    return procs


def test_alternating_variants_stay_on_their_replicas_on_a_busy_machine(cluster, cpu_hog):
    """16 requests alternating between two variants, every core busy beside the replicas, and
    each request arriving while both replicas are too busy to answer for a second (stopped): at
    most 4 swaps, counted per replica. The router waits for the replica holding the variant
    rather than sending the request to one that would swap."""
    replicas = _replica_processes(cluster)
    assert len(replicas) == 2
    before = httpx.get(cluster.url + "/metrics", timeout=60).text
    for i in range(16):
        model = ("base", "ft")[i % 2]
        req = {"model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
        for p in replicas:
            p.suspend()
        try:
            with ThreadPoolExecutor(1) as pool:
                answer = pool.submit(_post, cluster.url, "/v1/completions", req, 120)
                time.sleep(PAUSE)
                for p in replicas:
                    p.resume()
                r = answer.result()
        finally:
            for p in replicas:
                p.resume()
        assert r.status_code == 200, r.text
    after = httpx.get(cluster.url + "/metrics", timeout=60).text

    def delta(name: str) -> dict[tuple[str, str], float]:
        old, new = _per_replica(before, name), _per_replica(after, name)
        return {k: v - old.get(k, 0.0) for k, v in new.items()}

    swaps = delta("moeconsol_swaps_total")
    assert sum(swaps.values()) <= 4, swaps
    requests = delta("moeconsol_requests_total")
    assert len({r for r, _ in requests}) == 2
    for m in ("base", "ft"):
        assert sum(v for (_, model), v in requests.items() if model == m) == 8, requests
    # the sum over replicas and the per-replica series agree
    totals = samples(after)
    for m in ("base", "ft"):
        per = sum(v for (_, model), v in _per_replica(after, "moeconsol_requests_total").items() if model == m)
        assert per == totals[("moeconsol_requests_total", frozenset({("model", m)}))]


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


def _listening(pids: set[int]) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket owned by one of `pids`."""
    out = []
    for c in psutil.net_connections("tcp"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            try:
                out.append((c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name()))
            except psutil.NoSuchProcess:
                pass
    return out


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def test_a_local_ray_listens_on_the_loopback_only(cluster):
    """Every socket that the command and its Ray processes listen on (GCS, raylet, object
    manager, agents, workers, Serve's proxy) is on the loopback; no dashboard web server."""
    from ray._private.ray_constants import DEFAULT_DASHBOARD_PORT

    tree = {p.pid for p in [psutil.Process(cluster.proc.pid), *cluster.ray_processes()]}
    sockets = _listening(tree)
    owners = {name for _, _, name in sockets}
    assert {"gcs_server", "raylet"} <= owners and len(sockets) >= 10, sockets  # Ray's own, found
    assert ("127.0.0.1", int(cluster.url.rpartition(":")[2])) in {(a, p) for a, p, _ in sockets}  # the API
    exposed = [s for s in sockets if not _loopback(s[0])]
    assert not exposed, exposed
    assert DEFAULT_DASHBOARD_PORT not in {p for _, p, _ in sockets}


@pytest.mark.parametrize(("node", "expected"), [("127.0.0.1", "127.0.0.1:0"), ("10.0.0.7", "[::]:0")])
def test_replica_grpc_binds_the_loopback_only_on_a_local_ray(monkeypatch, node, expected):
    """On a local Ray (node address 127.0.0.1) the replica's gRPC server binds the loopback;
    on a node of a real cluster the other nodes must reach it, so Ray's own bind is kept."""
    import ray
    from ray.serve._private import replica

    from moeconsol.serving.ray_serve import serve_grpc_on_loopback

    bound = []
    monkeypatch.setattr(replica, "add_port_to_grpc_server", lambda server, address: bound.append(address) or 1)
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: node)
    serve_grpc_on_loopback()
    serve_grpc_on_loopback()  # a second deployment in the same process does not wrap it twice
    replica.add_port_to_grpc_server(object(), "[::]:0")
    assert bound == [expected]


def _cpu_seconds(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def test_a_stream_cut_by_a_replicas_death_ends_with_an_error_event(cluster):
    """kill -9 of the replica decoding a stream: the client gets an SSE error event (OpenAI's
    error body) and the end of the stream, not a cut connection; the other replica answers
    the next request for that variant."""
    replicas = _replica_processes(cluster)
    assert len(replicas) == 2, [p.cmdline() for p in cluster.ray_processes()]
    req = {"model": "base", "prompt": PROMPT, "max_tokens": 200, "temperature": 0, "stream": True}
    lines, killed = [], []
    with httpx.stream("POST", cluster.url + "/v1/completions", json=req, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            lines.append(line)
            events = sum(ln.startswith("data: ") for ln in lines)
            if events == 2:
                cpu = [_cpu_seconds(p) for p in replicas]
            if events == 12:  # the replica decoding it is the one that used the CPU meanwhile
                busy = max(range(2), key=lambda i: _cpu_seconds(replicas[i]) - cpu[i])
                replicas[busy].kill()
                killed.append(replicas[busy])
    events = [ln[len("data: ") :] for ln in lines if ln.startswith("data: ")]
    assert killed and events[-1] == "[DONE]", lines
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "replica" in error["message"], error
    assert all(json.loads(e)["choices"][0]["finish_reason"] is None for e in events[:-2])
    r = _post(cluster.url, "/v1/completions", {"model": "base", "prompt": PROMPT, "max_tokens": 4}, timeout=60)
    assert r.status_code == 200, r.text


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
