"""Peak memory and time of `moeconsol analyze` on four Mixtral-shaped checkpoints of > 1 GB.

Builds four synthetic checkpoints with real Mixtral proportions (hidden 1024, intermediate
3584, 8 experts, bf16, one shard per layer plus an index), written directly with
safetensors one layer at a time, so this script never holds more than a layer either.
The variants share most experts bit-for-bit with the base and perturb a few, like
fine-tunes do. Then it runs `moeconsol analyze` in a subprocess, polling its RSS with
psutil, and compares:

- peak RSS with the bytes of one MoE layer of all four models (what analyze must hold),
  and with the RSS of the same command's `--help` (Python + torch + transformers imports);
- wall time with a plain `os.preadv` loop over the same expert bytes (page-cached; the
  loop runs twice and the second pass is timed);
- wall time with mergekit's linear merge of the same four models, run after analyze in the
  same run when mergekit is installed (`benchmarks/peer.py`; `--mergekit PATH`,
  `$MERGEKIT_YAML` or PATH), with the machine's load average.

Usage: python benchmarks/analyze_memory.py [--layers 6] [--metric cosine ...] [--keep DIR]
       [--mergekit PATH] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
import peer  # noqa: E402

HIDDEN, INTERMEDIATE, EXPERTS, HEADS, KV_HEADS, VOCAB = 1024, 3584, 8, 8, 2, 32000
MODELS = 4
GiB = 1024**3
MiB = 1024**2


def config(layers: int) -> dict:
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "num_local_experts": EXPERTS,
        "num_experts_per_tok": 2,
        "vocab_size": VOCAB,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def randn(g: torch.Generator, *shape: int, scale: float = 0.02) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)


def changed_experts(model: int, layer: int) -> set[int]:
    """Which experts variant `model` perturbs in `layer` (the base, model 0, perturbs none)."""
    if model == 0:
        return set()
    return {(model + layer + k) % EXPERTS for k in range(model)}


def write_family(root: Path, layers: int) -> list[Path]:
    """Four checkpoints, written layer by layer: shard k holds layer k; the last shard the rest."""
    dirs = [root / f"model{m}" for m in range(MODELS)]
    shards = layers + 1
    maps: list[dict[str, str]] = [{} for _ in dirs]
    sizes = [0] * MODELS
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(config(layers), indent=1))
    head_dim = HIDDEN // HEADS
    for layer in range(layers + 1):
        g = torch.Generator().manual_seed(1000 + layer)
        prefix = f"model.layers.{layer}"
        if layer < layers:
            base = {
                f"{prefix}.self_attn.q_proj.weight": randn(g, HIDDEN, HIDDEN),
                f"{prefix}.self_attn.k_proj.weight": randn(g, KV_HEADS * head_dim, HIDDEN),
                f"{prefix}.self_attn.v_proj.weight": randn(g, KV_HEADS * head_dim, HIDDEN),
                f"{prefix}.self_attn.o_proj.weight": randn(g, HIDDEN, HIDDEN),
                f"{prefix}.input_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
                f"{prefix}.post_attention_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
                f"{prefix}.block_sparse_moe.gate.weight": randn(g, EXPERTS, HIDDEN),
            }
            for e in range(EXPERTS):
                moe = f"{prefix}.block_sparse_moe.experts.{e}"
                base[f"{moe}.w1.weight"] = randn(g, INTERMEDIATE, HIDDEN)
                base[f"{moe}.w2.weight"] = randn(g, HIDDEN, INTERMEDIATE)
                base[f"{moe}.w3.weight"] = randn(g, INTERMEDIATE, HIDDEN)
        else:
            base = {
                "model.embed_tokens.weight": randn(g, VOCAB, HIDDEN),
                "lm_head.weight": randn(g, VOCAB, HIDDEN),
                "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
            }
        shard = f"model-{layer + 1:05d}-of-{shards:05d}.safetensors"
        for m, d in enumerate(dirs):
            tensors = dict(base)
            for e in changed_experts(m, layer) if layer < layers else ():
                moe = f"{prefix}.block_sparse_moe.experts.{e}"
                for part in ("w1", "w2", "w3"):
                    t = tensors[f"{moe}.{part}.weight"]
                    tensors[f"{moe}.{part}.weight"] = (t.float() + 0.004 * torch.randn(t.shape, generator=g)).to(
                        t.dtype
                    )
            save_file(tensors, str(d / shard), metadata={"format": "pt"})
            maps[m].update({name: shard for name in tensors})
            sizes[m] += sum(t.numel() * t.element_size() for t in tensors.values())
            del tensors
        del base
        print(f"  wrote shard {layer + 1}/{shards} of {MODELS} models", file=sys.stderr)
    for m, d in enumerate(dirs):
        index = {"metadata": {"total_size": sizes[m]}, "weight_map": maps[m]}
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return dirs


def expert_ranges(d: Path) -> list[tuple[Path, int, int]]:
    """(file, start, end) of every expert tensor, parsed from the safetensors headers directly."""
    out = []
    for shard in sorted(d.glob("*.safetensors")):
        with open(shard, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        for name, entry in header.items():
            if ".experts." in name:
                lo, hi = entry["data_offsets"]
                out.append((shard, 8 + n + lo, 8 + n + hi))
    return out


def plain_read(ranges: list[tuple[Path, int, int]]) -> tuple[int, float, float]:
    """Read every range with preadv into one reused buffer: (bytes, wall s, CPU s)."""
    buf = bytearray(64 * MiB)
    view = memoryview(buf)
    total = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for path, lo, hi in ranges:
        fd = os.open(path, os.O_RDONLY)
        try:
            pos = lo
            while pos < hi:
                n = os.preadv(fd, [view[: min(len(buf), hi - pos)]], pos)
                if n == 0:
                    raise RuntimeError(f"{path}: short read")
                pos += n
                total += n
        finally:
            os.close(fd)
    return total, time.perf_counter() - t0, time.process_time() - c0


def run_measured(cmd: list[str]) -> tuple[int, float, float, int]:
    """Run `cmd`, polling RSS every 5 ms: (peak RSS bytes, wall s, CPU s, exit code).

    CPU seconds (user + system, from getrusage of children) are reported beside wall time
    because a shared machine's wall time says more about its other users than about us."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ps = psutil.Process(proc.pid)
    peak = 0
    stderr: list[bytes] = []
    reader = threading.Thread(target=lambda: stderr.append(proc.stderr.read()))
    reader.start()
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.005)
    proc.wait()
    reader.join()
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        sys.stderr.write(b"".join(stderr).decode(errors="replace"))
    return peak, seconds, cpu, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6, help="MoE layers per model (6 gives about 1.2 GB per model)")
    ap.add_argument("--metric", action="append", help="metric(s) to run analyze with (default: cosine, then all four)")
    ap.add_argument("--keep", type=Path, help="build the checkpoints in this directory and keep them")
    ap.add_argument("--mergekit", help="path of mergekit-yaml (default: $MERGEKIT_YAML or PATH)")
    ap.add_argument(
        "--json", type=Path, help="also write the results here (e.g. benchmarks/results/analyze-memory.json)"
    )
    args = ap.parse_args()

    root = args.keep or Path(tempfile.mkdtemp(prefix="moeconsol-bench-"))
    try:
        if args.keep and (root / "model0" / "model.safetensors.index.json").exists():
            dirs = [root / f"model{m}" for m in range(MODELS)]
            print(f"reusing checkpoints in {root}", file=sys.stderr)
        else:
            print(f"writing {MODELS} checkpoints into {root}", file=sys.stderr)
            dirs = write_family(root, args.layers)
        layers = json.loads((dirs[0] / "config.json").read_text())["num_hidden_layers"]
        model_bytes = [sum(p.stat().st_size for p in d.glob("*.safetensors")) for d in dirs]
        ranges = [r for d in dirs for r in expert_ranges(d)]
        plain_read(ranges)  # warm the page cache
        read_bytes, read_s, read_cpu = plain_read(ranges)
        layer_bytes = read_bytes // layers

        cli = [sys.executable, "-m", "moeconsol"]
        base_rss, _, _, _ = run_measured([*cli, "analyze", "--help"])
        print(
            f"\nmodels: {MODELS} x {sum(model_bytes) / MODELS / GiB:.2f} GiB on disk, {layers} MoE layers x {EXPERTS} experts, "
            f"hidden {HIDDEN}, intermediate {INTERMEDIATE}, bf16"
        )
        print(f"one MoE layer of all models: {layer_bytes / MiB:.0f} MiB; all expert bytes: {read_bytes / GiB:.2f} GiB")
        print(
            f"plain preadv loop over the expert bytes (page-cached): {read_s:.2f} s wall, {read_cpu:.2f} s CPU "
            f"({read_bytes / GiB / read_s:.2f} GiB/s)"
        )
        print(f"RSS of `moeconsol analyze --help` (imports only): {base_rss / MiB:.0f} MiB\n")
        runs = [[m] for m in args.metric] if args.metric else [["cosine"], ["cosine", "l2", "relative-l2", "cka"]]
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for metrics in runs:
                cmd = [*cli, "analyze", *map(str, dirs), "--json", f"{tmp}/report.json"]
                for m in metrics:
                    cmd += ["--metric", m]
                load = os.getloadavg()[0]
                peak, seconds, cpu, rc = run_measured(cmd)
                if rc != 0:
                    raise SystemExit(f"analyze failed with exit code {rc}")
                rows.append(
                    {
                        "metrics": metrics,
                        "peak_rss_mib": round(peak / MiB),
                        "seconds": round(seconds, 2),
                        "cpu_seconds": round(cpu, 2),
                        "load_average": round(load, 2),
                    }
                )
                print(f"analyze --metric {','.join(metrics)} (load average {load:.2f}):")
                print(
                    f"  peak RSS {peak / MiB:.0f} MiB = {peak / layer_bytes:.2f} x one layer of all models; "
                    f"above imports {(peak - base_rss) / MiB:.0f} MiB = {(peak - base_rss) / layer_bytes:.2f} x"
                )
                print(
                    f"  time {seconds:.2f} s wall = {seconds / read_s:.1f} x the plain read loop; "
                    f"{cpu:.2f} s CPU = {cpu / read_cpu:.1f} x its CPU"
                )
        mk = peer.find_mergekit(args.mergekit)
        mergekit = None
        if mk:
            load = os.getloadavg()[0]
            seconds, peak = peer.mergekit_linear(mk, dirs, root / "mergekit-out")
            mergekit = {"seconds": round(seconds, 2), "peak_rss_mib": round(peak / MiB), "load_average": round(load, 2)}
            print(
                f"mergekit linear merge of the same models (load average {load:.2f}): {seconds:.2f} s, peak RSS {peak / MiB:.0f} MiB"
            )
            for r in rows:
                r["over_mergekit"] = round(r["seconds"] / seconds, 3)
                print(f"  analyze --metric {','.join(r['metrics'])}: {r['over_mergekit']:.2f}x mergekit's time")
        else:
            print("mergekit not found (--mergekit PATH): no peer ratio")
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "inputs": {"models": MODELS, "layers": layers, "experts": EXPERTS, "bytes": sum(model_bytes)},
                        "one_layer_all_models_mib": round(layer_bytes / MiB),
                        "imports_rss_mib": round(base_rss / MiB),
                        "plain_read": {"seconds": round(read_s, 3), "cpu_seconds": round(read_cpu, 3)},
                        "rows": rows,
                        "mergekit": mergekit,
                        "cpus": os.cpu_count(),
                    },
                    indent=2,
                )
                + "\n"
            )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
