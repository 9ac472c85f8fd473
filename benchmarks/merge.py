"""Peak memory, time and bytes of `moeconsol merge` on four Mixtral-shaped checkpoints of > 1 GB.

Builds four synthetic checkpoints with real Mixtral proportions (hidden 1024, intermediate
3584, 8 experts, bf16, two layers per shard plus an index), written directly with
safetensors one shard at a time. Experts 0..SHARED-1 of every layer are bit-identical in all
four models; the others are the base's plus a small perturbation (cosine about 0.9997), like
fine-tunes. Then, for each mode (lossless, threshold, budget), it runs `moeconsol merge` in
a subprocess, polling its RSS with psutil, and reports:

- peak RSS vs. the bytes of one MoE layer of all four models (what the plan pass holds);
- wall time vs. a plain read-and-write copy of the same input bytes, timed in the same run;
- artifact bytes vs. input bytes; for lossless, asserts that the bank is exactly the
  identical share: SHARED + 4 * (8 - SHARED) experts per layer.

Usage: python benchmarks/merge.py [--layers 6] [--shared 4] [--keep DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
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

HIDDEN, INTERMEDIATE, EXPERTS, HEADS, KV_HEADS, VOCAB = 1024, 3584, 8, 8, 2, 32000
MODELS = 4
MiB = 1024**2


def config(layers: int) -> dict:
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE, "num_hidden_layers": layers, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "num_local_experts": EXPERTS, "num_experts_per_tok": 2,
        "vocab_size": VOCAB, "hidden_act": "silu", "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
    }


def build_family(root: Path, layers: int, shared: int) -> list[Path]:
    """Four checkpoints; only one shard of all four models is in memory at a time."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=0.02):
        return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)

    dirs = [root / f"model{m}" for m in range(MODELS)]
    for d in dirs:
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(config(layers)))
    per_shard = 2
    n_shards = (layers + per_shard - 1) // per_shard + 1
    weight_maps: list[dict[str, str]] = [{} for _ in dirs]
    for s in range(n_shards):
        shard = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        tensors: list[dict[str, torch.Tensor]] = [{} for _ in dirs]
        if s == n_shards - 1:
            for m in range(MODELS):
                tensors[m]["model.embed_tokens.weight"] = rand(VOCAB, HIDDEN)
                tensors[m]["lm_head.weight"] = rand(VOCAB, HIDDEN)
                tensors[m]["model.norm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
        for i in range(s * per_shard, min(layers, (s + 1) * per_shard)) if s < n_shards - 1 else []:
            p = f"model.layers.{i}"
            base = {f"{e}.{w}": rand(*((INTERMEDIATE, HIDDEN) if w != "w2" else (HIDDEN, INTERMEDIATE))) for e in range(EXPERTS) for w in ("w1", "w2", "w3")}
            for m in range(MODELS):
                t = tensors[m]
                for key, value in base.items():
                    e = int(key.split(".")[0])
                    if e >= shared and m > 0:
                        value = (value.float() + torch.randn(value.shape, generator=g) * 0.0003).to(torch.bfloat16)
                    t[f"{p}.block_sparse_moe.experts.{key}.weight"] = value
                t[f"{p}.block_sparse_moe.gate.weight"] = rand(EXPERTS, HIDDEN)
                for name, shape in (("q_proj", (HIDDEN, HIDDEN)), ("k_proj", (256, HIDDEN)), ("v_proj", (256, HIDDEN)), ("o_proj", (HIDDEN, HIDDEN))):
                    t[f"{p}.self_attn.{name}.weight"] = rand(*shape)
                t[f"{p}.input_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
                t[f"{p}.post_attention_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
        for m, d in enumerate(dirs):
            save_file(tensors[m], d / shard, metadata={"format": "pt"})
            weight_maps[m].update({k: shard for k in tensors[m]})
        del tensors
    for m, d in enumerate(dirs):
        total = sum(f.stat().st_size for f in d.glob("*.safetensors"))
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_maps[m]}))
    return dirs


def run_measured(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes, polled every 20 ms) of a subprocess."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    done = threading.Event()

    def poll():
        nonlocal peak
        while not done.is_set():
            try:
                peak = max(peak, ps.memory_info().rss)
            except psutil.Error:
                break
            time.sleep(0.02)

    t = threading.Thread(target=poll)
    t.start()
    _, err = proc.communicate()
    done.set()
    t.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {err}")
    return time.perf_counter() - start, peak


def plain_copy(dirs: list[Path], target: Path) -> float:
    """Read and write the same input bytes (no moeconsol), for a time reference."""
    start = time.perf_counter()
    for d in dirs:
        (target / d.name).mkdir(parents=True)
        for f in d.glob("*.safetensors"):
            with open(f, "rb") as src, open(target / d.name / f.name, "wb") as dst:
                shutil.copyfileobj(src, dst, 16 * MiB)
    elapsed = time.perf_counter() - start
    shutil.rmtree(target)
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--shared", type=int, default=4, help="experts per layer identical in all four models")
    ap.add_argument("--keep", type=Path, help="build the family here and keep it")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="moeconsol-merge-bench-"))
    try:
        dirs = build_family(root / "family", args.layers, args.shared) if not (root / "family").exists() else sorted((root / "family").iterdir())
        input_bytes = sum(f.stat().st_size for d in dirs for f in d.iterdir())
        expert_bytes = 3 * HIDDEN * INTERMEDIATE * 2
        one_layer = MODELS * EXPERTS * expert_bytes
        copy_s = plain_copy(dirs, root / "copy")
        total_bank = args.layers * MODELS * EXPERTS
        modes = {
            "lossless": [],
            "threshold": ["--mode", "threshold", "--metric", "cosine", "--threshold", "0.999"],
            "budget": ["--mode", "budget", "--budget", "0.375"],
        }
        rows = []
        for mode, extra in modes.items():
            out = root / f"art-{mode}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-m", "moeconsol", "merge", *map(str, dirs), "-o", str(out), *extra]
            seconds, peak = run_measured(cmd)
            manifest = json.loads((out / "manifest.json").read_text())
            bank = sum(len(entry["bank"]) for entry in manifest["layers"])
            art_bytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
            if mode == "lossless":
                expected = args.layers * (args.shared + MODELS * (EXPERTS - args.shared))
                assert bank == expected, f"lossless bank {bank} != identical share {expected}"
            if mode == "budget":
                assert bank <= int(0.375 * total_bank)
            rows.append({
                "mode": mode, "seconds": round(seconds, 1), "plain_copy_seconds": round(copy_s, 1),
                "peak_rss_mib": round(peak / MiB), "one_layer_all_models_mib": round(one_layer / MiB),
                "bank_experts": bank, "experts_in": total_bank,
                "artifact_bytes": art_bytes, "input_bytes": input_bytes,
            })
            shutil.rmtree(out)
        if args.json:
            print(json.dumps(rows, indent=2))
            return
        print(f"inputs: {MODELS} checkpoints, {input_bytes / 1e9:.2f} GB, {args.layers} layers x {EXPERTS} experts, {args.shared} shared")
        print("| mode | time | plain copy | peak RSS | one layer, all models | bank experts | artifact / inputs |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['mode']} | {r['seconds']} s | {r['plain_copy_seconds']} s | {r['peak_rss_mib']} MiB | "
                f"{r['one_layer_all_models_mib']} MiB | {r['bank_experts']} / {r['experts_in']} | "
                f"{r['artifact_bytes'] / 1e9:.2f} GB / {r['input_bytes'] / 1e9:.2f} GB ({r['artifact_bytes'] / r['input_bytes']:.1%}) |"
            )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
