"""The paper's experiment on CPU: turnaround of a multi-model request trace, four ways of serving.

A trace of requests over N variants (Poisson arrivals; uniform or skewed popularity; a few
request rates up to saturation; 25 new tokens, greedy, streamed, as in the reference system's
measurements) is replayed in real time against four systems, each an OpenAI-compatible HTTP
server on loopback with the same engine (continuous batching, the same scheduler and
`--max-wait`), so that only the way the variants are held differs:

1. **moeconsol**: `moeconsol serve-local ARTIFACT --port` on one lossless artifact: the bank
   resident once, a partial reconfiguration (one copy per dtype) when the variant changes.
1b. **moeconsol, one step for all variants**: the same with `--cross-variant-batching`: every
   variant's non-expert tensors resident (+ (N-1) x the swap region), no swaps, requests of
   every variant decoded in one step (the scheduler admits in arrival order).
2. **whole-model switching**: one variant resident; when another is requested, its whole
   checkpoint is loaded from disk (`from_pretrained`), as a server without moeconsol does.
3. **static partition**: each variant in its own server process with an equal share of the
   cores (the CPU stand-in for the paper's MIG instances): pinned to its core(s) and, by
   default (`--partition quota`), held to cores/N CPUs by a cgroup quota, a hard share as a
   MIG instance has; `--partition pinned` only pins (a process then takes its core-mate's idle
   time, which no MIG instance can).
4. **all resident**: every variant its own transformers model in one process (N times the
   memory, no swap cost): the speed bound.

All systems are started first and stay idle between traces; each trace is replayed on each
system in turn (`--repeats` times, medians reported), so that they share the machine's load.
For each system, popularity and rate it reports mean and p95 turnaround (arrival to last
token), mean time to first token, generated tokens per second and the bytes the system keeps
resident (from each server's /metrics), as a table and a plot, and writes JSON; its last
lines say whether the two goals hold at the highest rate (>= 85% lower mean turnaround
than the static partition; within 1.25x of all resident).

Two sizes of variant: `tiny` (hidden 128, float32: a decode step is per-step overhead) and
`wide` (experts 1024 x 3584, 6 layers, bf16, ~1.1 GB a variant: a step is its weight reads
and products, as in a real model); `--keep DIR` builds the family once and reuses it.

    python benchmarks/turnaround.py [--variants 4] [--size tiny|wide] [--keep DIR] [--requests 24] [--rates 2,4,8]
        [--partition quota|pinned] [--device cuda] [--json OUT] [--plot OUT.png]
        [--systems "moeconsol, one step for all variants,static partition"]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import httpx
import torch

PROMPTS = [
    "Once upon a time there was a model",
    "The experts of a mixture agree on",
    "def add(a, b):",
    "A shared bank of experts serves",
    "In the morning the server",
    "Several fine-tunes of one base",
]
SIZES = {
    # tiny: decoding is per-step overhead (Python, kernel launches), not arithmetic or weight reads
    "tiny": dict(
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=256,
    ),
    # wide: benchmarks/serve.py's realistic-width Mixtral (experts 1024 x 3584, bf16, ~1.1 GB a variant),
    # with the tokenizer's own 320-entry vocabulary: a step's time is its weight reads and products
    "wide": dict(
        hidden_size=1024,
        intermediate_size=3584,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=256,
    ),
}
SIZE_DTYPES = {"tiny": torch.float32, "wide": torch.bfloat16}
NEW_TOKENS = 25
SKEWED = (0.55, 0.25, 0.12, 0.08)
CROSS_VARIANT = "moeconsol, one step for all variants"
SYSTEMS = ("moeconsol", CROSS_VARIANT, "whole-model switching", "static partition", "all resident")


# -- the family -----------------------------------------------------------------------------------


def build_family(root: Path, n: int, size: str = "tiny") -> tuple[dict[str, Path], Path]:
    """N Mixtral variants of the given size (a base and fine-tunes that changed 2-3 experts per
    layer and every non-expert tensor) saved with transformers, and their lossless artifact.
    What `root` already holds is reused: the variants are the same for any N (fixed seeds), the
    artifact is per N."""
    from moeconsol.consolidate.pipeline import merge
    from moeconsol.io.checkpoint import open_checkpoints
    from moeconsol.testing import derive_variant, save_model, tiny_mixtral, tiny_tokenizer

    shape = SIZES[size]
    paths = {f"v{k}": root / f"v{k}" for k in range(n)}
    artifact = root / f"artifact-{n}"
    missing = [name for name, p in paths.items() if not (p / "config.json").is_file()]
    if missing:
        tok = tiny_tokenizer()
        base = tiny_mixtral(0, dtype=SIZE_DTYPES[size], **shape)
        for k, name in enumerate(paths):
            if name in missing:
                changed = [(layer, e) for layer in range(shape["num_hidden_layers"]) for e in range(k % 8, 8, 3)]
                save_model(base if k == 0 else derive_variant(base, k, changed_experts=changed), paths[name], tok)
        del base
    if not (artifact / "manifest.json").is_file():
        merge(open_checkpoints([f"{name}={p}" for name, p in paths.items()]), artifact)
    return paths, artifact


# -- plain transformers models behind the engine's runtime interface -------------------------------


class PlainModels:
    """What the engine and server use of a `Runtime`, over plain transformers models loaded
    with `from_pretrained` from the original checkpoints. `resident=True` keeps every variant
    (N times the memory, activation free); `resident=False` holds one and loads the requested
    variant's whole checkpoint when it changes (whole-model switching)."""

    def __init__(self, paths: dict[str, Path], resident: bool, device: str = "cpu"):
        from transformers import AutoTokenizer

        self.paths, self.names, self.resident = paths, list(paths), resident
        self.device = torch.device(device)
        self.variant_set = SimpleNamespace(
            variants={n: SimpleNamespace(generation_config=None, model_dir=p) for n, p in paths.items()}
        )
        self._tokenizers = {n: AutoTokenizer.from_pretrained(str(p)) for n, p in paths.items()}
        self._models = {n: self._load(n) for n in (self.names if resident else self.names[:1])}
        self.active = self.names[0]
        # read once: the HTTP threads ask while the worker may be replacing the model (a KeyError, a 500)
        self._context = int(self.model.config.max_position_embeddings)

    def _load(self, name: str):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(self.paths[name])).to(self.device).eval()

    @property
    def model(self):
        return self._models[self.active]

    def activate(self, name: str):
        from moeconsol.serving.runtime import SwapReport

        if name == self.active:
            return SwapReport(name, name, 0.0, 0, 0, 0, 0)
        start = time.perf_counter()
        moved = 0
        if not self.resident:
            self._models = {name: self._load(name)}  # the old model is dropped: one resident
            moved = sum(f.stat().st_size for f in self.paths[name].glob("*.safetensors"))
        previous, self.active = self.active, name
        return SwapReport(name, previous, time.perf_counter() - start, moved, 0, 0, 0)

    def check_model(self, name: str) -> None:
        if name not in self.paths:
            from moeconsol.errors import UnknownModelError

            raise UnknownModelError(f"unknown model {name!r}")

    def tokenizer(self, name: str | None = None):
        return self._tokenizers[name or self.active]

    def encode(self, name: str, prompt: str) -> list[int]:
        return list(self.tokenizer(name)(prompt, add_special_tokens=True)["input_ids"])

    def max_context(self, name: str | None = None) -> int | None:
        return self._context

    def resident_bytes(self):
        from moeconsol.serving.runtime import ResidentBytes

        held = sum(p.numel() * p.element_size() for m in self._models.values() for p in m.parameters())
        return ResidentBytes(0, held, 0)


def serve_plain(args: argparse.Namespace) -> None:
    """Child process: one server over PlainModels (whole-model switching or resident)."""
    from moeconsol.serving.server import serve

    if args.cores:
        cores = [int(c) for c in args.cores.split(",")]
        os.sched_setaffinity(0, cores)
        torch.set_num_threads(len(cores))
    paths = dict(item.split("=", 1) for item in args.models)
    runtime = PlainModels({n: Path(p) for n, p in paths.items()}, resident=args.serve == "resident", device=args.device)
    serve(runtime, port=args.port, max_wait=args.max_wait, log_level="warning")


# -- the servers ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class System:
    name: str
    route: dict[str, int]
    """variant -> port of the server that serves it"""
    procs: list[subprocess.Popen] = field(default_factory=list)
    groups: list[Path] = field(default_factory=list)
    """cgroups that hold the static partition's processes to their share"""


def start(
    name: str, paths: dict[str, Path], artifact: Path, max_wait: float, device: str, partition: str = "quota"
) -> System:
    me = [sys.executable, str(Path(__file__).resolve()), "--device", device]
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    models = [f"{n}={p}" for n, p in paths.items()]
    if name in ("moeconsol", CROSS_VARIANT):
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "moeconsol",
            "serve-local",
            str(artifact),
            "--port",
            str(port),
            "--max-wait",
            str(max_wait),
            "--device",
            device,
            *(["--cross-variant-batching"] if name == CROSS_VARIANT else []),
        ]
        return System(name, {n: port for n in paths}, [subprocess.Popen(cmd, **quiet)])
    if name in ("whole-model switching", "all resident"):
        port = free_port()
        kind = "switching" if name.startswith("whole") else "resident"
        cmd = [*me, "--serve", kind, "--port", str(port), "--max-wait", str(max_wait), *models]
        return System(name, {n: port for n in paths}, [subprocess.Popen(cmd, **quiet)])
    cores = sorted(os.sched_getaffinity(0))
    share = len(cores) / len(paths)  # cores per variant
    system = System(name, {})
    for k, (n, p) in enumerate(paths.items()):  # variant k on core k mod C, or on its C/N cores
        port = free_port()
        pinned = (
            [cores[k % len(cores)]]
            if len(paths) >= len(cores)
            else cores[k * len(cores) // len(paths) : (k + 1) * len(cores) // len(paths)]
        )
        cmd = [
            *me,
            "--serve",
            "resident",
            "--port",
            str(port),
            "--max-wait",
            str(max_wait),
            "--cores",
            ",".join(map(str, pinned)),
            f"{n}={p}",
        ]
        proc = subprocess.Popen(cmd, **quiet)
        system.procs.append(proc)
        system.route[n] = port
        if partition == "quota":
            try:
                system.groups.append(cpu_quota_group(f"moeconsol-turnaround-{os.getpid()}-{k}", share, proc.pid))
            except SystemExit:
                stop(system)
                raise
    return system


# -- a hard share of the CPU, as a MIG instance has of a GPU ---------------------------------------


CGROUP_V2 = Path("/sys/fs/cgroup")
CGROUP_V1_CPU = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 100_000


def cpu_quota_group(name: str, cores: float, pid: int) -> Path:
    """A cgroup that lets `pid` (and every thread it starts) run at most `cores` CPUs' worth of
    time per period, even while the rest of the machine is idle: the hard share a MIG instance
    has. Pinning alone is softer: a variant's process takes its core-mate's idle time.
    cgroup v2 (`cpu.max`) where the cpu controller is on it, else v1 (`cpu.cfs_quota_us`)."""
    quota = int(PERIOD_US * cores)
    controllers = CGROUP_V2 / "cgroup.controllers"
    try:
        if controllers.is_file() and "cpu" in controllers.read_text().split():
            group = CGROUP_V2 / name
            group.mkdir()
            (group / "cpu.max").write_text(f"{quota} {PERIOD_US}")
        else:
            group = CGROUP_V1_CPU / name
            group.mkdir()
            (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(quota))
        (group / "cgroup.procs").write_text(str(pid))
    except OSError as e:
        raise SystemExit(
            f"static partition: cannot give a process a hard CPU share ({e}); run as root on a machine "
            f"with a writable cpu cgroup, or pass --partition pinned (a soft share)"
        ) from e
    return group


def remove_groups(system: System) -> None:
    for group in system.groups:
        try:
            group.rmdir()  # empty once its processes have exited
        except OSError:
            pass


def wait_ready(system: System, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    for port in set(system.route.values()):
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or any(p.poll() is not None for p in system.procs):
                stop(system)
                raise SystemExit(f"{system.name}: server on port {port} did not start")
            time.sleep(0.3)


def stop(system: System) -> None:
    for p in system.procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    for p in system.procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    remove_groups(system)


def resident_bytes(system: System) -> int:
    total = 0
    for port in set(system.route.values()):
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        m = re.search(r'^moeconsol_resident_bytes\{part="total"\} (\S+)$', text, re.M)
        total += int(float(m.group(1))) if m else 0
    return total


# -- the trace and its replay ---------------------------------------------------------------------


def make_trace(
    names: list[str], popularity: tuple[float, ...], rate: float, count: int, seed: int
) -> list[tuple[float, str, str]]:
    """(arrival second, variant, prompt): Poisson arrivals at `rate` per second."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(count):
        t += rng.expovariate(rate)
        out.append((t, rng.choices(names, weights=popularity[: len(names)])[0], PROMPTS[i % len(PROMPTS)]))
    return out


async def one_request(client: httpx.AsyncClient, port: int, arrival: float, model: str, prompt: str, t0: float) -> dict:
    await asyncio.sleep(max(0.0, t0 + arrival - time.perf_counter()))
    sent = time.perf_counter()
    first = None
    tokens = 0
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with client.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0].get("text"):
                first = time.perf_counter()
    end = time.perf_counter()
    return {"turnaround": end - sent, "ttft": (first or end) - sent, "tokens": tokens, "model": model}


async def replay(system: System, trace: list[tuple[float, str, str]]) -> dict:
    limits = httpx.Limits(max_connections=len(trace) + 8, max_keepalive_connections=len(trace) + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter() + 0.2
        results = await asyncio.gather(*(one_request(client, system.route[m], a, m, p, t0) for a, m, p in trace))
        wall = time.perf_counter() - t0
    turnaround = sorted(r["turnaround"] for r in results)
    return {
        "mean_turnaround": statistics.fmean(turnaround),
        "p95_turnaround": turnaround[min(len(turnaround) - 1, int(0.95 * len(turnaround)))],
        "mean_ttft": statistics.fmean(r["ttft"] for r in results),
        "tokens_per_second": sum(r["tokens"] for r in results) / wall,
    }


# -- report ---------------------------------------------------------------------------------------


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pops = sorted({r["popularity"] for r in rows})
    fig, axes = plt.subplots(1, len(pops), figsize=(5.5 * len(pops), 4), squeeze=False)
    for ax, pop in zip(axes[0], pops):
        for system in SYSTEMS:
            pts = sorted(
                (r["rate"], r["mean_turnaround"]) for r in rows if r["system"] == system and r["popularity"] == pop
            )
            if pts:
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    marker="o",
                    label=system,
                    color=f"C{SYSTEMS.index(system)}",
                )
        ax.set_title(f"{pop} popularity")
        ax.set_xlabel("request rate (requests/s)")
        ax.set_ylabel("mean turnaround (s)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def _systems(text: str) -> list[str]:
    """The --systems value as SYSTEMS names (in SYSTEMS' order); one names a system that
    itself holds a comma, so match the known names rather than split blindly."""
    rest, found = text, set()
    for name in sorted(SYSTEMS, key=len, reverse=True):  # "moeconsol, one step ..." before "moeconsol"
        if name in rest:
            found.add(name)
            rest = rest.replace(name, "")
    if rest.strip(", ") or not found:
        raise SystemExit(f"--systems: unknown system in {text!r}; known: {'; '.join(SYSTEMS)}")
    return [name for name in SYSTEMS if name in found]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", type=int, default=4)
    ap.add_argument(
        "--size",
        choices=list(SIZES),
        default="tiny",
        help="tiny (hidden 128, float32) or wide (experts 1024 x 3584, 6 layers, bf16, ~1.1 GB a variant)",
    )
    ap.add_argument("--keep", type=Path, help="build the family here once and reuse it")
    ap.add_argument(
        "--partition",
        choices=["quota", "pinned"],
        default="quota",
        help="static partition: each process pinned and held to cores/N CPUs by a cgroup quota (hard, like a "
        "MIG instance; needs a writable cpu cgroup), or only pinned (a soft share: it borrows idle time)",
    )
    ap.add_argument("--requests", type=int, default=24, help="requests per trace")
    ap.add_argument("--rates", default="2,4,8", help="request rates (per second), comma-separated")
    ap.add_argument("--max-wait", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--device", default="cpu", help="cpu or cuda (on one GPU the static partition's processes share it)"
    )
    ap.add_argument("--json", type=Path)
    ap.add_argument("--repeats", type=int, default=1, help="replays of each trace per system (medians reported)")
    ap.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help="comma-separated systems to run (default all: " + ", ".join(SYSTEMS) + ")",
    )
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--serve", choices=["switching", "resident"], help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--cores", help=argparse.SUPPRESS)
    ap.add_argument("models", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve_plain(args)
        return
    rates = [float(r) for r in args.rates.split(",")]
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="moeconsol-turnaround-") as tmp:
        paths, artifact = build_family(args.keep or Path(tmp), args.variants, args.size)
        names = list(paths)
        popularity = {"uniform": tuple(1.0 for _ in names), "skewed": SKEWED}
        rows = []
        chosen = _systems(args.systems)
        systems: dict[str, System] = {}
        try:  # every system started up front and idle between its traces: each trace runs on each in turn, under the same load
            for name in chosen:
                systems[name] = start(name, paths, artifact, args.max_wait, args.device, args.partition)
            for system in systems.values():
                wait_ready(system)
            held = {name: resident_bytes(system) for name, system in systems.items()}
            for pop, weights in popularity.items():
                for rate in rates:
                    trace = make_trace(names, weights, rate, args.requests, args.seed)
                    runs: dict[str, list[dict]] = {name: [] for name in chosen}
                    for _ in range(args.repeats):
                        for name, system in systems.items():
                            runs[name].append(asyncio.run(replay(system, trace)))
                    for name in chosen:
                        result = {k: statistics.median(r[k] for r in runs[name]) for k in runs[name][0]}
                        rows.append(
                            {"system": name, "popularity": pop, "rate": rate, **result, "resident_bytes": held[name]}
                        )
                        print(
                            f"{name:22s} {pop:8s} {rate:5.1f}/s  mean {result['mean_turnaround']:.2f} s  "
                            f"p95 {result['p95_turnaround']:.2f} s  ttft {result['mean_ttft']:.2f} s  "
                            f"{result['tokens_per_second']:.0f} tok/s",
                            file=sys.stderr,
                            flush=True,
                        )
        finally:
            for system in systems.values():
                stop(system)
    load = os.getloadavg()
    result = {
        "device": args.device,
        "variants": args.variants,
        "requests": args.requests,
        "new_tokens": NEW_TOKENS,
        "size": args.size,
        "shape": SIZES[args.size],
        "dtype": str(SIZE_DTYPES[args.size]).removeprefix("torch."),
        "max_wait": args.max_wait,
        "partition": args.partition,
        "repeats": args.repeats,
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average": [round(x, 2) for x in load],
        "rows": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(rows, args.plot)
    print(
        f"{args.variants} variants, {args.requests} requests per trace, {NEW_TOKENS} new tokens, greedy, {args.repeats} replay(s) per system (medians); "
        f"load average {load_start[0]:.2f} -> {load[0]:.2f}"
    )
    print(
        "| popularity | rate | system | mean turnaround | p95 | mean TTFT | tokens/s | resident | mean vs static partition | mean vs all resident |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        same = {x["system"]: x for x in rows if x["popularity"] == r["popularity"] and x["rate"] == r["rate"]}
        vs_static = (
            r["mean_turnaround"] / same["static partition"]["mean_turnaround"]
            if "static partition" in same
            else float("nan")
        )
        vs_all = (
            r["mean_turnaround"] / same["all resident"]["mean_turnaround"] if "all resident" in same else float("nan")
        )
        print(
            f"| {r['popularity']} | {r['rate']:g}/s | {r['system']} | {r['mean_turnaround']:.2f} s | {r['p95_turnaround']:.2f} s | "
            f"{r['mean_ttft']:.2f} s | {r['tokens_per_second']:.0f} | {r['resident_bytes'] / 2**20:.1f} MiB | "
            f"{vs_static:.2f}x | {vs_all:.2f}x |"
        )
    for line in goal_lines(rows):
        print(line)


def goal_lines(rows: list[dict]) -> list[str]:
    """The two goals at the highest rate of each popularity, for each moeconsol system:
    >= 85% lower mean turnaround than the static partition, and within 1.25x of all resident."""
    lines = []
    for pop in sorted({r["popularity"] for r in rows}):
        top = max(r["rate"] for r in rows if r["popularity"] == pop)
        same = {r["system"]: r for r in rows if r["popularity"] == pop and r["rate"] == top}
        for name in ("moeconsol", CROSS_VARIANT):
            if name not in same:
                continue
            mean = same[name]["mean_turnaround"]
            parts = []
            if "static partition" in same:
                lower = 1 - mean / same["static partition"]["mean_turnaround"]
                than = f"{abs(lower):.0%} {'lower' if lower >= 0 else 'higher'} than the static partition's"
                parts.append(f"mean turnaround {than} (goal >= 85% lower: {'met' if lower >= 0.85 else 'not met'})")
            if "all resident" in same:
                ratio = mean / same["all resident"]["mean_turnaround"]
                parts.append(f"{ratio:.2f}x all resident (goal <= 1.25x: {'met' if ratio <= 1.25 else 'not met'})")
            if parts:
                lines.append(f"{pop} {top:g}/s, {name}: " + "; ".join(parts))
    return lines


if __name__ == "__main__":
    main()
