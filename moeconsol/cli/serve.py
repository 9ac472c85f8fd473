"""`moeconsol serve-local`: serve every variant of an artifact from one resident model."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ..errors import MoeconsolError
from . import app
from .interrupt import INTERRUPTED, Interrupted, by_sigterm
from .options import parse_named_files
from .progress import stage_progress

# The engine's defaults (serving/engine.py: DEFAULT_*), written out so that parsing the options
# imports no torch (tests/cli/test_defaults.py holds them equal).
DEFAULT_MAX_WAIT = 2.0
DEFAULT_MAX_PROMPT_TOKENS = 2048
DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_MAX_TOKENS_IN_FLIGHT = 32768


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def check_server_options(
    port: int | None, max_wait: float, max_prompt_tokens: int, max_batch_size: int, max_tokens_in_flight: int
) -> None:
    """The options serve-local and serve share, refused in one line naming the option."""
    if port is not None and not 0 < port < 65536:
        raise MoeconsolError(f"--port must be in 1..65535, got {port}")
    if not (max_wait >= 0 and math.isfinite(max_wait)):
        raise MoeconsolError(f"--max-wait must be a finite number of seconds >= 0, got {max_wait}")
    for option, value in (
        ("--max-prompt-tokens", max_prompt_tokens),
        ("--max-batch-size", max_batch_size),
        ("--max-tokens-in-flight", max_tokens_in_flight),
    ):
        if value < 1:
            raise MoeconsolError(f"{option} must be at least 1, got {value}")


@app.command("serve-local")
def serve_local(
    artifact: Annotated[Path, typer.Argument(metavar="OUT", help="Artifact directory written by `moeconsol merge`.")],
    model: Annotated[
        list[str] | None,
        typer.Option("--model", help="Variant to run the prompt on (repeatable: one after another)."),
    ] = None,
    prompt: Annotated[str | None, typer.Option(help="One-shot: generate from this prompt and exit.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate (one-shot).")] = 32,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 = greedy (one-shot).")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (one-shot).")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Random seed for sampling (one-shot).")] = None,
    top_k: Annotated[
        int | None,
        typer.Option(
            help="Keep the k most likely tokens, 0 = all (one-shot; default: the variant's generation config)."
        ),
    ] = None,
    repetition_penalty: Annotated[
        float | None,
        typer.Option(
            help="transformers' repetition penalty, 1 = off (one-shot; default: the variant's generation config)."
        ),
    ] = None,
    port: Annotated[int | None, typer.Option(help="Run the OpenAI-compatible HTTP server on this port.")] = None,
    host: Annotated[str, typer.Option(help="Address the server listens on.")] = "127.0.0.1",
    max_wait: Annotated[
        float, typer.Option(help="Seconds a request may wait before it is served ahead of the active model's.")
    ] = DEFAULT_MAX_WAIT,
    max_prompt_tokens: Annotated[
        int, typer.Option(help="Longest prompt the server accepts, in tokens.")
    ] = DEFAULT_MAX_PROMPT_TOKENS,
    max_batch_size: Annotated[
        int, typer.Option(help="Most requests of one model decoded together.")
    ] = DEFAULT_MAX_BATCH_SIZE,
    max_tokens_in_flight: Annotated[
        int, typer.Option(help="Bound on prompt + max_tokens of all admitted requests.")
    ] = DEFAULT_MAX_TOKENS_IN_FLIGHT,
    cross_variant_batching: Annotated[
        bool,
        typer.Option(
            "--cross-variant-batching",
            help="Keep every variant's differing non-expert tensors resident (+ (N-1) x the swap region) and decode "
            "requests of all variants in one step, without swaps.",
        ),
    ] = False,
    host_buffers: Annotated[
        str,
        typer.Option(
            help="Swap mode: where the variants not active wait: copy (a host buffer each; a swap is one copy) or "
            "file (nothing in host memory: a swap reads them from the artifact's files, decoding deltas)."
        ),
    ] = "copy",
    device: Annotated[str, typer.Option(help="cpu or cuda (cuda:N).")] = "cpu",
    dtype: Annotated[
        str | None, typer.Option(help="float32, bfloat16 or float16 (default: the checkpoints' own).")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="One-shot: print the results as JSON.")] = False,
    adapter: Annotated[
        list[str] | None,
        typer.Option(
            "--adapter",
            help="NAME=DIR: a LoRA adapter on the artifact's variant it names as its base, served unmerged as "
            "model NAME (its factors applied in the forward; Linear modules only; repeatable).",
        ),
    ] = None,
) -> None:
    """Run a prompt on one or more variants (--prompt), or serve them all over HTTP (--port)."""
    if (prompt is None) == (port is None):
        raise MoeconsolError("give either --prompt (one-shot) or --port (HTTP server)")
    check_server_options(port, max_wait, max_prompt_tokens, max_batch_size, max_tokens_in_flight)
    # torch and the runtime: imported once the options are checked (start-up time)
    from ..serving.crossvariant import ServingMode
    from ..serving.device import parse_device, parse_dtype
    from ..serving.engine import GenerationSettings, check_settings, complete
    from ..serving.runtime import Runtime

    settings = GenerationSettings(
        max_new_tokens, temperature, top_p, seed, top_k=top_k, repetition_penalty=repetition_penalty
    )
    check_settings(settings)
    torch_device, torch_dtype = parse_device(device), parse_dtype(dtype)
    from ..serving.server import bind, serve  # fastapi and uvicorn: imported only by the commands that serve

    sock = bind(host, port) if port is not None else None  # a port in use fails now, in one line

    err = Console(stderr=True)
    first = model[0] if model else None

    def load(advance=None, active: str | None = first) -> Runtime:
        return Runtime.from_artifact(
            artifact,
            device=torch_device,
            dtype=torch_dtype,
            active=active,
            progress=advance,
            mode=ServingMode.CROSS_VARIANT if cross_variant_batching else ServingMode.SWAP,
            adapters={
                n: Path(d) for n, d in parse_named_files(adapter or [], "--adapter", allow_unnamed=False).items()
            },
            host_buffers=host_buffers,
        )

    with stage_progress(
        labels={"non-expert tensors": "load non-expert tensors", "expert bank": "load expert bank"}
    ) as advance:
        runtime = load(advance)
    for name in model or []:
        runtime.check_model(name)
    rb = runtime.resident_bytes()
    err.print(
        f"loaded {artifact} on {torch_device} ({str(runtime.dtype).removeprefix('torch.')}): resident "
        f"{_size(rb.total)} = bank {_size(rb.bank)} + non-expert {_size(rb.non_expert)}"
        + (f" + adapters {_size(rb.adapters)}; " if rb.adapters else "; ")
        + f"host {_size(rb.host)} for {len(runtime.names)} models ({', '.join(runtime.names)})"
        + (f", of which corrected experts {_size(rb.corrected)}" if rb.corrected else "")
        + ("; every variant resident (cross-variant batching)" if cross_variant_batching else "")
    )

    if port is not None:
        policy = "one step for all variants" if cross_variant_batching else f"max wait {max_wait} s"
        err.print(f"serving on http://{host}:{port}/v1 ({policy}, max batch size {max_batch_size})")
        err.print(f"after moeconsol add or remove: POST http://{host}:{port}/admin/reload (or SIGHUP)")
        try:
            serve(
                runtime,
                host=host,
                port=port,
                max_wait=max_wait,
                max_prompt_tokens=max_prompt_tokens,
                max_batch_size=max_batch_size,
                max_tokens_in_flight=max_tokens_in_flight,
                sock=sock,
                reload=lambda: load(active=None),  # the --model given may be removed since
            )
        except KeyboardInterrupt:  # a server stopped by SIGTERM (a service manager) did what it was asked: 0
            raise Interrupted(f"the server on {host}:{port} stopped", 0 if by_sigterm() else INTERRUPTED) from None
        return

    results = []
    out = Console()
    for name in model or [runtime.active]:
        c = complete(runtime, name, prompt, settings)
        results.append(c.to_dict())
        if not json_out:
            out.rule(name)
            out.print(c.text, markup=False, highlight=False)
            out.print(
                f"swap {c.swap.seconds * 1000:.2f} ms ({_size(c.swap.bytes_moved)} moved), "
                f"time to first token {c.time_to_first_token * 1000:.1f} ms, "
                f"{c.tokens_per_second:.1f} tokens/s ({len(c.token_ids)} tokens, {c.finish_reason})",
                style="dim",
                highlight=False,
            )
    if json_out:
        sys.stdout.write(json.dumps({"resident_bytes": rb.to_dict(), "completions": results}) + "\n")
