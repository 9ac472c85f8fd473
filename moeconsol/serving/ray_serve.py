"""Scale-out on Ray Serve: N replicas of one runtime each, requests routed by variant.

Ray Serve's model multiplexing routes a request to a replica that already holds its model.
Here a replica "holds" exactly one variant, its active one (`max_num_models_per_replica=1`),
and taking another is a partial swap done by the replica's own scheduler, never a load.

Three deployments make the application:

- `Replica` (N of them): one `Runtime` (bank resident once, every variant's non-expert
  tensors in host memory) and serve-local's own app (`server.create_app`: parsing, limits,
  errors, continuous batching, SSE). A request reaches that app in-process as one ASGI
  exchange, so a replica answers exactly as `serve-local` does. Replica i starts with
  variant i mod V active and announces it, so the first requests already route well.
- `Router` (the HTTP ingress): reads the body (same size limit), takes its `model` field and
  calls a replica through `handle.options(multiplexed_model_id=model, stream=True)`, which
  `ray_router.VariantRouter` sends to a replica holding that variant; the replica's status,
  headers and body chunks (SSE included) come back as they are made, and a stream cut by the
  replica's failure ends with an SSE error event. Bodies without a known model go to any
  replica, which answers the 400/404.
- `MetricsStore`: each replica reports its prometheus samples after every request; the
  router's `GET /metrics` sums them over replicas and adds per-replica series.

With `--cross-variant-batching` (`ServingMode.CROSS_VARIANT`) every replica's runtime holds
every variant's differing tensors and decodes requests of any variant in one step: nothing
is swapped, so nothing is gained by pinning a variant to a replica, and the router sends
requests without a multiplexed model id (Serve's own routing by load; `routes_by_variant`).

The replica's engine does the batching (no `@serve.batch`, see ray issue #56633).
A local Ray listens on the loopback only (`start_ray`, `serve_grpc_on_loopback`).
Ray is imported lazily: the rest of moeconsol works without it.
"""

import asyncio
import json
import logging
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from ..artifact.reader import Artifact
from ..errors import MoeconsolError
from .crossvariant import ServingMode
from .device import parse_device, parse_dtype
from .protocol import STREAM_END, ApiError, read_body, stream_error
from .runtime import Runtime
from .server import create_app

APP_NAME = "moeconsol"
INSTALL_HINT = "Ray Serve is not installed; install it with: pip install 'moeconsol[cluster]'"
_DROPPED_HEADERS = {"content-length", "transfer-encoding", "connection"}

Samples = list[tuple[str, str, str, list[tuple[str, dict[str, str], float]]]]
"""prometheus families as (name, type, help, [(sample name, labels, value)])"""


def require_ray() -> None:
    """Raise one clear MoeconsolError when Ray Serve is not installed."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        raise MoeconsolError(INSTALL_HINT) from None


@dataclass(frozen=True)
class ReplicaSettings:
    """What each replica is built with (plain values: they travel to Ray workers)."""

    artifact: str
    device: str = "cpu"
    dtype: str | None = None
    max_wait: float = 2.0
    max_prompt_tokens: int = 2048
    max_batch_size: int = 32
    max_tokens_in_flight: int = 8192
    max_body_bytes: int = 1 << 20
    torch_threads: int = 1
    mode: str = ServingMode.SWAP.value
    """the runtime's `ServingMode` (its value: settings travel as plain values)"""


def replica_runtime(settings: ReplicaSettings, active: str):
    """The runtime one replica serves: the artifact on its device, in its dtype and serving
    mode, `active` installed first."""

    return Runtime.from_artifact(
        settings.artifact,
        device=parse_device(settings.device),
        dtype=parse_dtype(settings.dtype),
        active=active,
        mode=ServingMode(settings.mode),
    )


def routes_by_variant(settings: ReplicaSettings, route_by_variant: bool = True) -> bool:
    """Whether the router sends a request to a replica whose active variant it asks for:
    in swap mode (unless `route_by_variant` is off); never with cross-variant batching, where
    every replica serves every variant without a swap and requests go by load."""
    return route_by_variant and ServingMode(settings.mode) is ServingMode.SWAP


# -- one HTTP exchange with an ASGI app, in-process ---------------------------------------------


async def asgi_exchange(app: Any, method: str, path: str, body: bytes) -> AsyncIterator[dict | bytes]:
    """Send one request to an ASGI `app`; yield {"status", "headers"} first, then the body's
    chunks as the app sends them. If the consumer stops early (its client went away), the
    app sees `http.disconnect` and cancels its work as it does for a real client."""
    path, _, query = path.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 80),
    }
    sent: asyncio.Queue[dict | None] = asyncio.Queue()
    gone = asyncio.Event()
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await sent.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        except Exception:  # the app's own handler already answered (Starlette re-raises after a 500)
            pass
        finally:
            await sent.put(None)

    task = asyncio.ensure_future(run())
    started = False
    try:
        while (message := await sent.get()) is not None:
            if message["type"] == "http.response.start":
                started = True
                headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]
                yield {"status": message["status"], "headers": headers}
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    break
        if not started:
            raise MoeconsolError(f"{method} {path}: the replica's app sent no response")
    finally:
        gone.set()  # the app's disconnect watchers return; a finished app is unaffected
        _background.add(task)
        task.add_done_callback(_background.discard)


_background: set[asyncio.Future] = set()


# -- metrics over replicas ----------------------------------------------------------------------


def collect_samples(registry: Any) -> Samples:
    """A prometheus_client registry's families as plain values (`_created` samples left out)."""
    return [
        (
            f.name,
            f.type,
            f.documentation,
            [(s.name, dict(s.labels), float(s.value)) for s in f.samples if not s.name.endswith("_created")],
        )
        for f in registry.collect()
    ]


def merge_samples(reports: dict[str, Samples]) -> bytes:
    """Prometheus text: each sample summed over replicas (serve-local's names and labels), then
    the same sample per replica with a `replica` label. Gauges are summed too (resident bytes
    of all replicas; batch and queue sizes as of each replica's last report)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics_core import Metric

    families: dict[str, tuple[str, str]] = {}
    totals: dict[str, dict[tuple[str, tuple], float]] = {}
    for replica in sorted(reports):
        for name, kind, doc, samples in reports[replica]:
            families.setdefault(name, (kind, doc))
            bucket = totals.setdefault(name, {})
            for sample, labels, value in samples:
                key = (sample, tuple(sorted(labels.items())))
                bucket[key] = bucket.get(key, 0.0) + value

    class _Merged:
        def collect(self):
            for name, (kind, doc) in families.items():
                m = Metric(name, doc, kind)
                for (sample, labels), value in totals[name].items():
                    m.add_sample(sample, dict(labels), value)
                for replica in sorted(reports):
                    for fname, _, _, samples in reports[replica]:
                        if fname == name:
                            for sample, labels, value in samples:
                                m.add_sample(sample, {**labels, "replica": replica}, value)
                yield m

    registry = CollectorRegistry()
    registry.register(_Merged())
    return generate_latest(registry)


# -- the deployments ---------------------------------------------------------------------------


def build_app(
    settings: ReplicaSettings,
    names: Sequence[str],
    replicas: int,
    num_cpus_per_replica: float = 1.0,
    num_gpus_per_replica: float = 0.0,
    route_by_variant: bool = True,
):
    """The Ray Serve application (a bound Router over N Replicas and a MetricsStore).
    `route_by_variant=False` sends requests without a multiplexed model id (Serve's plain
    power-of-two routing): the baseline the benchmark compares against."""
    from ray import serve

    names = list(names)
    route_by_variant = routes_by_variant(settings, route_by_variant)

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
    class MetricsStore:
        def __init__(self) -> None:
            serve_grpc_on_loopback()
            self.reports: dict[str, Samples] = {}

        async def report(self, replica: str, samples: Samples) -> None:
            self.reports[replica] = samples

        async def snapshot(self) -> dict[str, Samples]:
            return dict(self.reports)

    @serve.deployment(
        num_replicas=replicas,
        ray_actor_options={"num_cpus": num_cpus_per_replica, "num_gpus": num_gpus_per_replica},
        max_ongoing_requests=4 * settings.max_batch_size,
        graceful_shutdown_timeout_s=120,
        graceful_shutdown_wait_loop_s=0.5,
        health_check_period_s=5,
    )
    class Replica:
        async def __init__(self, settings: ReplicaSettings, store: Any) -> None:
            serve_grpc_on_loopback()
            torch.set_num_threads(settings.torch_threads)
            context = serve.get_replica_context()
            rank = getattr(getattr(context, "rank", None), "rank", None)
            self.id = f"{context.replica_tag}" if rank is None else f"{rank}"
            first = names[(rank or 0) % len(names)]
            self.runtime = replica_runtime(settings, first)
            self.app = create_app(
                self.runtime,
                settings.max_wait,
                settings.max_prompt_tokens,
                settings.max_batch_size,
                settings.max_tokens_in_flight,
                settings.max_body_bytes,
            )
            self.scheduler = self.app.state.scheduler
            self.scheduler.start()
            self.store = store
            await self.hold(first)  # announce the active variant before the first request
            await self.report()

        @serve.multiplexed(max_num_models_per_replica=1)
        async def hold(self, model: str) -> str:
            """Serve's model "load": the variant this replica now holds. The swap itself is done
            by the scheduler between decode steps, the only safe place to swap."""
            return model

        async def report(self) -> None:
            self.scheduler.metrics.render(self.runtime.resident_bytes().to_dict())
            await self.store.report.remote(self.id, collect_samples(self.scheduler.metrics.registry))

        async def call(self, method: str, path: str, body: bytes) -> AsyncIterator[dict | bytes]:
            model = serve.get_multiplexed_model_id()
            if model:
                await self.hold(model)
            finished = False
            try:
                async for item in asgi_exchange(self.app, method, path, body):
                    yield item
                finished = True
                await self.report()  # before the response ends: a client reading /metrics next sees it
            finally:
                if not finished:  # cancelled (the client went away): report once the job has left
                    later = asyncio.ensure_future(self.report_later())
                    _background.add(later)
                    later.add_done_callback(_background.discard)

        async def report_later(self, delay: float = 1.0) -> None:
            await asyncio.sleep(delay)
            try:
                await self.report()
            except Exception:  # reported again after the next request
                pass

        def __del__(self) -> None:
            scheduler = getattr(self, "scheduler", None)
            if scheduler is not None:
                scheduler.stop()

    ingress = FastAPI(title="moeconsol serve")

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000, graceful_shutdown_timeout_s=120)
    @serve.ingress(ingress)
    class Router:
        def __init__(self, replicas: Any, store: Any, max_body_bytes: int, route_by_variant: bool) -> None:
            serve_grpc_on_loopback()
            self.replicas, self.store = replicas, store
            self.max_body_bytes, self.route_by_variant = max_body_bytes, route_by_variant
            self.in_flight, self.draining = 0, False

        async def drain(self, timeout: float) -> int:
            """Refuse new requests (503) and wait up to `timeout` seconds for those in flight;
            return how many are still running."""
            self.draining = True
            deadline = time.monotonic() + timeout
            while self.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return self.in_flight

        @ingress.get("/metrics")
        async def metrics(self) -> Response:
            from prometheus_client import CONTENT_TYPE_LATEST

            return Response(merge_samples(await self.store.snapshot.remote()), media_type=CONTENT_TYPE_LATEST)

        @ingress.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
        async def forward(self, request: Request, path: str) -> Response:
            if self.draining:
                return ApiError(503, "the server is shutting down").response()
            self.in_flight += 1
            streaming = False
            try:
                response = await self._forward(request)
                streaming = isinstance(response, _CountedStream)
                return response
            finally:
                if not streaming:
                    self.in_flight -= 1

        def _stream_done(self) -> None:
            self.in_flight -= 1

        async def _forward(self, request: Request) -> Response:
            try:
                body = await read_body(request, self.max_body_bytes)
            except ApiError as e:
                return e.response()
            handle = self.replicas.options(stream=True)
            model = _model_of(body)
            if self.route_by_variant and model in names:
                handle = self.replicas.options(stream=True, multiplexed_model_id=model)
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            chunks = handle.call.remote(request.method, target, body)
            try:
                head = await chunks.__anext__()
            except Exception as e:
                return ApiError(503, f"no replica could answer: {type(e).__name__}: {e}").response()
            headers = {k: v for k, v in head["headers"] if k.lower() not in _DROPPED_HEADERS}
            if headers.get("content-type", "").startswith("text/event-stream"):
                return _CountedStream(
                    chunks, _ended_on_failure(chunks), self._stream_done, status_code=head["status"], headers=headers
                )
            try:
                body = b"".join([c async for c in chunks])
            except Exception as e:  # the replica failed after its answer began
                return ApiError(503, f"the replica stopped before its answer ended: {first_line(e)}").response()
            return Response(body, status_code=head["status"], headers=headers)

    store = MetricsStore.bind()
    replica = Replica
    if route_by_variant:  # a request waits for the replica holding its variant (ray_router.py)
        from ray.serve.config import RequestRouterConfig

        from .ray_router import VariantRouter

        replica = Replica.options(request_router_config=RequestRouterConfig(request_router_class=VariantRouter))
    return Router.bind(replica.bind(settings, store), store, settings.max_body_bytes, route_by_variant)


async def _ended_on_failure(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A replica's event stream; if the replica fails mid-stream (its process died, Ray lost
    it), an error event and the end of the stream, as serve-local ends a failed generation,
    instead of a connection cut without a word."""
    try:
        async for chunk in chunks:
            yield chunk
    except Exception as e:
        failure = MoeconsolError(f"the replica serving this stream stopped before it ended: {first_line(e)}")
        yield (stream_error(failure) + STREAM_END).encode()


class _CountedStream(StreamingResponse):
    """A replica's event stream, forwarded; `done` runs when it ends however it ends (finished,
    or the client gone, even before the first event), and the replica's side is cancelled."""

    def __init__(self, chunks: Any, body: AsyncIterator[bytes], done: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(body, **kwargs)
        self.chunks, self.done = chunks, done

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.done()
            self.chunks.cancel()  # no-op for a finished stream


def _model_of(body: bytes) -> str | None:
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    model = parsed.get("model") if isinstance(parsed, dict) else None
    return model if isinstance(model, str) else None


# -- Ray: start or join, deploy, stop ------------------------------------------------------------


def check_address(address: str, timeout: float = 5.0) -> None:
    """An unreachable `host:port` cluster address fails now, in one line (Ray itself would
    retry for a long while). "auto" and ray:// addresses are left to Ray."""
    if address == "auto" or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise MoeconsolError(
            f"--address {address}: expected HOST:PORT of a Ray head node (its GCS port, 6379 by default)"
        )
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise MoeconsolError(f"--address {address}: cannot reach a Ray cluster there ({e.strerror or e})") from None


LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
"""Ray's switch between a local-only Ray and one that other nodes may join (named for the
platforms where local-only is its default). Off, Ray takes 127.0.0.1 as the node address, and
every server of the node (GCS, raylet, object manager, agents, workers) binds to it."""


def start_ray(address: str | None, num_cpus: float | None = None) -> None:
    """Join the cluster at `address`, or start a local one that listens on the loopback only:
    no dashboard, every Ray server on 127.0.0.1, logs off the console."""
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "error")  # Ray's C++ retry warnings stay off stderr
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # Ray reports usage to its servers unless told not to
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # our own line says where it serves
    if address is None:
        _local_only()
    import ray

    try:
        if address is not None:
            ray.init(address=address, include_dashboard=False, configure_logging=False, log_to_driver=False)
            return
        cpus = None if num_cpus is None else max(1, int(-(-num_cpus // 1)))
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    except Exception as e:
        ray.shutdown()
        where = f"join the Ray cluster at {address}" if address is not None else "start a local Ray"
        raise MoeconsolError(f"cannot {where}: {first_line(e)}") from None
    node = ray.util.get_node_ip_address()
    if node != "127.0.0.1":  # a Ray that no longer honours the switch: refuse rather than expose it
        ray.shutdown()
        raise MoeconsolError(f"a local Ray took {node} as its address, not 127.0.0.1; its servers would listen there")


def serve_grpc_on_loopback() -> None:
    """In a deployment's constructor, on a local Ray: the gRPC server that Serve starts in
    each replica for calls between deployments binds to 127.0.0.1, not to every interface.
    Ray 2.60 binds it to "[::]:0" in `replica.py` once the constructor has returned, with no
    option to change that; on a node of a real cluster (a routable address) it is left so."""
    import ray
    from ray.serve._private import replica

    bind = getattr(replica, "add_port_to_grpc_server", None)
    if ray.util.get_node_ip_address() != "127.0.0.1" or bind is None or getattr(bind, "loopback", False):
        return

    def on_loopback(server: Any, address: str) -> int:
        return bind(server, address.replace("[::]", "127.0.0.1", 1))

    on_loopback.loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = on_loopback


def _local_only() -> None:
    """Ray reads `LOCAL_RAY_ENV` when it is imported; set it for this process (and so for
    every Ray process it starts), and in Ray's constants if Ray is imported already."""
    os.environ.update(LOCAL_RAY_ENV)
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def check_resources(replicas: int, num_gpus_per_replica: float) -> None:
    """Replicas that a local Ray cannot place would wait forever: refuse them before Ray starts
    (a local Ray sees the GPUs torch sees)."""
    import torch

    gpus = torch.cuda.device_count()
    if replicas * num_gpus_per_replica > gpus:
        raise MoeconsolError(
            f"--replicas {replicas} x --num-gpus-per-replica {num_gpus_per_replica:g} needs "
            f"{replicas * num_gpus_per_replica:g} GPUs; this machine has {gpus}"
        )


def first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def deploy(
    settings: ReplicaSettings,
    replicas: int,
    host: str = "127.0.0.1",
    port: int = 8000,
    num_cpus_per_replica: float = 1.0,
    num_gpus_per_replica: float = 0.0,
    route_by_variant: bool = True,
    name: str = APP_NAME,
) -> list[str]:
    """Deploy the application on the Ray this process is connected to; return the variants.
    Returns when every replica has loaded its runtime."""
    from ray import serve

    names = list(Artifact.open(settings.artifact).model_names)
    serve.start(http_options={"host": host, "port": port})
    app = build_app(settings, names, replicas, num_cpus_per_replica, num_gpus_per_replica, route_by_variant)
    serve.run(app, name=name, route_prefix="/", blocking=False)
    return names


def stop(local: bool, name: str = APP_NAME, drain_timeout: float = 120.0) -> None:
    """Stop serving after the requests in flight finish: a local Ray goes entirely (Serve,
    every Ray process); on a joined cluster only this application goes, the cluster stays."""
    import ray
    from ray import serve

    try:
        try:
            serve.get_app_handle(name).drain.remote(drain_timeout).result(timeout_s=drain_timeout + 30)
        except Exception:  # an app that is not running has nothing in flight
            pass
        if local:
            serve.shutdown()
        else:
            serve.delete(name)
    finally:
        ray.shutdown()


def artifact_path(path: str | Path) -> str:
    return str(Path(path).resolve())
