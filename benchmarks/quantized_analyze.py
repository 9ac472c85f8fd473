"""Peak memory and time of `moeconsol analyze` on MXFP4 releases shaped like gpt-oss-20b.

Builds three checkpoints with gpt-oss-20b's expert shapes (hidden 2880, expert FFN 2880,
MXFP4 `_blocks` and `_scales`, bf16 biases, `quantization_config` mxfp4), fewer experts and
layers so that the run stays short, written directly with safetensors; variant m re-draws
the codes of m experts per layer, the others stay bit-identical with the base. Then it runs
`moeconsol analyze --metric cosine` in a subprocess polled for RSS (psutil, every 5 ms) and
compares:

- peak RSS with one MoE layer of all models dequantized to float32 (what reading the layer
  as values would hold) and with the RSS of a process that imports what analyze computes
  with (torch, moeconsol.analysis.similarity);
- CPU time with transformers' own dequantization (`convert_moe_packed_tensors`, to bf16, one
  thread) of every distinct expert, in this process: the least a dequantized analysis must
  do (analyze measures bit-identical experts once).

Usage: python benchmarks/quantized_analyze.py [--experts 8] [--layers 2] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file, save_file

HIDDEN = INTERMEDIATE = 2880
MODELS = 3
GiB, MiB = 1024**3, 1024**2


def expert_tensors(layer: int, experts: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """One MoE layer's MXFP4 experts as gpt-oss stores them (codes uniform, scales near 2^-7)."""
    prefix = f"model.layers.{layer}.mlp.experts"
    out = {}
    for name, rows, cols in (("gate_up_proj", 2 * INTERMEDIATE, HIDDEN), ("down_proj", HIDDEN, INTERMEDIATE)):
        out[f"{prefix}.{name}_blocks"] = torch.randint(0, 256, (experts, rows, cols // 32, 16), generator=g).to(
            torch.uint8
        )
        out[f"{prefix}.{name}_scales"] = torch.randint(118, 124, (experts, rows, cols // 32), generator=g).to(
            torch.uint8
        )
        out[f"{prefix}.{name}_bias"] = (0.01 * torch.randn(experts, rows, generator=g)).to(torch.bfloat16)
    out[f"model.layers.{layer}.mlp.router.weight"] = (0.01 * torch.randn(experts, HIDDEN, generator=g)).to(
        torch.bfloat16
    )
    return out


def build(root: Path, experts: int, layers: int) -> list[Path]:
    """The base and MODELS - 1 variants: variant m re-draws experts 0..m-1 of every layer."""
    g = torch.Generator().manual_seed(0)
    base = {k: v for layer in range(layers) for k, v in expert_tensors(layer, experts, g).items()}
    config = {
        "model_type": "gpt_oss",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": layers,
        "num_local_experts": experts,
        "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": []},
    }
    paths = []
    for m in range(MODELS):
        tensors = dict(base)
        for name, t in base.items():
            if name.endswith("_blocks") and m:
                t = t.clone()
                t[:m] = torch.randint(0, 256, t[:m].shape, generator=g).to(torch.uint8)
                tensors[name] = t
        path = root / f"m{m}"
        path.mkdir()
        save_file(tensors, path / "model.safetensors")
        (path / "config.json").write_text(json.dumps(config))
        paths.append(path)
    return paths


def peak_rss(cmd: list[str]) -> tuple[int, float, float]:
    """(peak RSS of the process and its children, wall seconds, CPU seconds) of a command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak, ps = 0, psutil.Process(proc.pid)
    done = threading.Event()

    def poll() -> None:
        nonlocal peak
        while not done.is_set():
            try:
                peak = max(peak, sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)]))
            except psutil.Error:
                pass
            time.sleep(0.005)

    thread = threading.Thread(target=poll)
    thread.start()
    _, err = proc.communicate()
    done.set()
    thread.join()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed: {err.decode()[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return peak, time.perf_counter() - start, cpu


def transformers_dequantize(paths: list[Path]) -> float:
    """CPU seconds transformers takes to dequantize every distinct expert (bf16, one thread):
    all of the base's, and the m experts variant m re-drew."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    torch.set_num_threads(1)
    total = 0.0
    for m, path in enumerate(paths):
        tensors = load_file(path / "model.safetensors")
        for name, blocks in tensors.items():
            if name.endswith("_blocks"):
                scales = tensors[name.removesuffix("_blocks") + "_scales"]
                distinct = slice(None) if m == 0 else slice(0, m)
                start = time.process_time()
                convert_moe_packed_tensors(blocks[distinct], scales[distinct])
                total += time.process_time() - start
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        paths = build(Path(tmp), args.experts, args.layers)
        moeconsol = [sys.executable, "-m", "moeconsol"]
        imports, _, _ = peak_rss([sys.executable, "-c", "import torch, moeconsol.analysis.similarity"])
        peak, wall, cpu = peak_rss(
            [*moeconsol, "analyze", *map(str, paths), "--metric", "cosine", "--json", f"{tmp}/r.json"]
        )
        bound = transformers_dequantize(paths)
        inputs = sum((p / "model.safetensors").stat().st_size for p in paths)
    layer_f32 = MODELS * args.experts * (3 * HIDDEN * INTERMEDIATE + 3 * HIDDEN) * 4
    result = {
        "cpus": len(os.sched_getaffinity(0)),
        "load_average": os.getloadavg()[0],
        "models": MODELS,
        "layers": args.layers,
        "experts": args.experts,
        "inputs_bytes": inputs,
        "layer_f32_bytes": layer_f32,
        "imports_rss": imports,
        "analyze_peak_rss": peak,
        "analyze_seconds": wall,
        "analyze_cpu_seconds": cpu,
        "transformers_dequantize_seconds": bound,
    }
    print(json.dumps(result, indent=2))
    print(
        f"peak RSS {peak / MiB:.0f} MiB ({peak / layer_f32:.2f}x one layer as float32 values, "
        f"{(peak - imports) / MiB:.0f} MiB above the imports); "
        f"wall {wall:.1f} s, CPU {cpu:.1f} s ({cpu / bound:.2f}x transformers' dequantization of every "
        f"distinct expert, {bound:.1f} s)"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
