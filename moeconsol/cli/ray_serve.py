"""`moeconsol serve`: the OpenAI-compatible API of serve-local on Ray Serve, N replicas."""

from __future__ import annotations

import math
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

from ..errors import MoeconsolError
from . import app
from .interrupt import INTERRUPTED, Interrupted
from .serve import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_PROMPT_TOKENS,
    DEFAULT_MAX_TOKENS_IN_FLIGHT,
    DEFAULT_MAX_WAIT,
    check_server_options,
)


@app.command("serve")
def serve_cluster(
    artifact: Annotated[Path, typer.Argument(metavar="OUT", help="Artifact directory written by `moeconsol merge`.")],
    replicas: Annotated[int, typer.Option(help="Replicas, each one runtime holding every variant.")] = 1,
    address: Annotated[
        str | None, typer.Option(help="Join the Ray cluster at HOST:PORT (else start a local Ray).")
    ] = None,
    host: Annotated[str, typer.Option(help="Address the HTTP API listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the HTTP API.")] = 8000,
    num_gpus_per_replica: Annotated[float, typer.Option(help="GPUs each replica reserves.")] = 0.0,
    num_cpus_per_replica: Annotated[float, typer.Option(help="CPUs each replica reserves (and torch threads).")] = 1.0,
    device: Annotated[str, typer.Option(help="cpu or cuda (cuda:N), on each replica.")] = "cpu",
    dtype: Annotated[
        str | None, typer.Option(help="float32, bfloat16 or float16 (default: the checkpoints' own).")
    ] = None,
    max_wait: Annotated[
        float, typer.Option(help="Seconds a request may wait before it is served ahead of the active model's.")
    ] = DEFAULT_MAX_WAIT,
    max_prompt_tokens: Annotated[
        int, typer.Option(help="Longest prompt a replica accepts, in tokens.")
    ] = DEFAULT_MAX_PROMPT_TOKENS,
    max_batch_size: Annotated[
        int, typer.Option(help="Most requests of one model decoded together, per replica.")
    ] = DEFAULT_MAX_BATCH_SIZE,
    max_tokens_in_flight: Annotated[
        int, typer.Option(help="Bound on prompt + max_tokens of all admitted requests, per replica.")
    ] = DEFAULT_MAX_TOKENS_IN_FLIGHT,
    cross_variant_batching: Annotated[
        bool,
        typer.Option(
            "--cross-variant-batching",
            help="Each replica keeps every variant's differing non-expert tensors resident and decodes requests of all "
            "variants in one step, without swaps; requests go to replicas by load, not by variant.",
        ),
    ] = False,
) -> None:
    """Serve every variant on Ray Serve: N replicas, each request routed to a replica whose
    active variant it asks for (model multiplexing). Stops on Ctrl-C or SIGTERM."""
    if replicas < 1:
        raise MoeconsolError(f"--replicas must be at least 1, got {replicas}")
    check_server_options(port, max_wait, max_prompt_tokens, max_batch_size, max_tokens_in_flight)
    for option, value in (
        ("--num-gpus-per-replica", num_gpus_per_replica),
        ("--num-cpus-per-replica", num_cpus_per_replica),
    ):
        if not (value >= 0 and math.isfinite(value)):
            raise MoeconsolError(f"{option} must be a finite number >= 0, got {value}")

    # the runtime, FastAPI and Ray: imported once the options are checked, so --help and bad options are quick
    from ..artifact.verify import verify_artifact
    from ..serving.crossvariant import ServingMode
    from ..serving.device import parse_device, parse_dtype
    from ..serving.ray_serve import (
        ReplicaSettings,
        artifact_path,
        check_address,
        check_resources,
        deploy,
        first_line,
        require_ray,
        start_ray,
        stop,
    )

    require_ray()
    parse_device(device), parse_dtype(dtype)
    problems = verify_artifact(artifact)
    if problems:
        raise MoeconsolError(f"{artifact}: damaged artifact: {problems[0]} (run `moeconsol verify` for the full list)")
    if address is not None:
        check_address(address)
    from ..serving.server import bind  # fastapi: imported only by the commands that serve

    if address is None:  # a port in use fails now, in one line (Serve's proxy will listen on it);
        bind(host, port).close()  # on a joined cluster, Serve's proxy may hold it already

    settings = ReplicaSettings(
        artifact=artifact_path(artifact),
        device=device,
        dtype=dtype,
        max_wait=max_wait,
        max_prompt_tokens=max_prompt_tokens,
        max_batch_size=max_batch_size,
        max_tokens_in_flight=max_tokens_in_flight,
        torch_threads=max(1, int(num_cpus_per_replica)),
        mode=(ServingMode.CROSS_VARIANT if cross_variant_batching else ServingMode.SWAP).value,
    )
    stopping = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        """The first SIGINT/SIGTERM stops the server (drain, then stop Ray); later ones are
        ignored so that the drain is not cut short."""
        if not received:
            received.append(signum)
            stopping.set()
            raise KeyboardInterrupt

    local = address is None
    if local:
        check_resources(replicas, num_gpus_per_replica)
    start_ray(address, num_cpus=replicas * num_cpus_per_replica)
    failed: Exception | None = None
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            names = deploy(
                settings,
                replicas,
                host=host,
                port=port,
                num_cpus_per_replica=num_cpus_per_replica,
                num_gpus_per_replica=num_gpus_per_replica,
            )
        except Exception as e:  # Ray's errors are long; one line, after Ray is stopped
            failed = e
            return
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        how = " (cross-variant batching: every variant on every replica)" if cross_variant_batching else ""
        print(
            f"serving {', '.join(names)} on http://{host}:{port}/v1 with {replicas} replica(s) on {where}{how}",
            file=sys.stderr,
            flush=True,
        )
        while not stopping.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        stop(local)
        for s, handler in previous.items():
            signal.signal(s, handler)
        if failed is not None:
            raise MoeconsolError(f"deploying on Ray failed: {first_line(failed)}")
    what = "Ray and every Ray process stopped" if local else f"the application left the cluster at {address}"
    code = INTERRUPTED if received and received[0] == signal.SIGINT else 0
    raise Interrupted(f"the server on {host}:{port} stopped; {what}", code)
