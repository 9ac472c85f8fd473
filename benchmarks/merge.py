"""Time, peak memory and bytes of `moeconsol merge` and `analyze` on four Mixtral-shaped
checkpoints of > 1 GB, against the I/O floor and mergekit, measured in the same run.

Builds four synthetic checkpoints with real Mixtral proportions (hidden 1024, intermediate
3584, 8 experts, bf16, two layers per shard plus an index), written directly with
safetensors one shard at a time. Experts 0..SHARED-1 of every layer are bit-identical in all
four models; the others are the base's plus a small perturbation (cosine about 0.9997), like
fine-tunes. Then it runs, each in a subprocess polled for RSS and followed by `sync`:

- `moeconsol merge` in each mode (lossless, threshold, budget) and `moeconsol analyze
  --metric cosine`;
- the I/O floor (benchmarks/peer.py): `cat` of the inputs + `cp -r` of the lossless
  artifact + `sync`;
- mergekit's linear merge of the same four models, when mergekit is installed (peer.py).

It prints each time as a ratio to the floor and to mergekit, peak RSS against one MoE layer
of all four models, and artifact bytes; for lossless it asserts that the bank is exactly the
identical share: SHARED + 4 * (8 - SHARED) experts per layer. Inputs are page-cached (read
once before timing), so the floor is memory and disk-write bandwidth, not disk reads.

Usage: python benchmarks/merge.py [--layers 6] [--shared 4] [--keep DIR] [--mergekit PATH]
       [--code DIR] [--baseline DIR] [--modes lossless,threshold,budget,analyze] [--repeats 3] [--json OUT.json]
`--repeats N` runs everything N times (each run: every mode, the floor, mergekit) and reports
per mode the median time and the median of each run's own ratios: the machine's load moves
from run to run, the ratios within a run much less. The load average is recorded per run.
`--code DIR` runs moeconsol from another source tree (e.g. a worktree of an older commit),
for before/after comparisons; `--baseline DIR` runs each mode from DIR too, right after
this tree's, in the same run (rows `MODE@baseline`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
import peer  # noqa: E402

HIDDEN, INTERMEDIATE, EXPERTS, HEADS, KV_HEADS, VOCAB = 1024, 3584, 8, 8, 2, 32000
MODELS = 4
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
        "torch_dtype": "bfloat16",
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
            base = {
                f"{e}.{w}": rand(*((INTERMEDIATE, HIDDEN) if w != "w2" else (HIDDEN, INTERMEDIATE)))
                for e in range(EXPERTS)
                for w in ("w1", "w2", "w3")
            }
            for m in range(MODELS):
                t = tensors[m]
                for key, value in base.items():
                    e = int(key.split(".")[0])
                    if e >= shared and m > 0:
                        value = (value.float() + torch.randn(value.shape, generator=g) * 0.0003).to(torch.bfloat16)
                    t[f"{p}.block_sparse_moe.experts.{key}.weight"] = value
                t[f"{p}.block_sparse_moe.gate.weight"] = rand(EXPERTS, HIDDEN)
                for name, shape in (
                    ("q_proj", (HIDDEN, HIDDEN)),
                    ("k_proj", (256, HIDDEN)),
                    ("v_proj", (256, HIDDEN)),
                    ("o_proj", (HIDDEN, HIDDEN)),
                ):
                    t[f"{p}.self_attn.{name}.weight"] = rand(*shape)
                t[f"{p}.input_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
                t[f"{p}.post_attention_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
        for m, d in enumerate(dirs):
            save_file(tensors[m], d / shard, metadata={"format": "pt"})
            weight_maps[m].update({k: shard for k in tensors[m]})
        del tensors
    for m, d in enumerate(dirs):
        total = sum(f.stat().st_size for f in d.glob("*.safetensors"))
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_maps[m]})
        )
    return dirs


def median(values: list[float]) -> float:
    return statistics.median(values)


def run_once(
    dirs: list[Path],
    root: Path,
    modes: dict,
    wanted: list[str],
    shared: int,
    layers: int,
    cwd: str | None,
    mk: str | None,
    baseline: str | None = None,
) -> dict:
    """One run of every wanted mode, the I/O floor (after lossless) and mergekit, in this order;
    with `baseline`, each mode is also run from that source tree, right after (row `MODE@baseline`)."""
    input_bytes = sum(f.stat().st_size for d in dirs for f in d.iterdir())
    one_layer = MODELS * EXPERTS * 3 * HIDDEN * INTERMEDIATE * 2
    total_bank = layers * MODELS * EXPERTS
    rows, floor = [], None
    load_before = os.getloadavg()
    for mode, where in [(m, c) for m in wanted for c in ([cwd, baseline] if baseline else [cwd])]:
        out = root / f"art-{mode}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "moeconsol", modes[mode][0], *map(str, dirs)]
        cmd += ["--json", str(root / "report.json")] if mode == "analyze" else ["-o", str(out)]
        seconds, peak = peer.measured(cmd + modes[mode][1:], cwd=where)
        row = {
            "mode": mode if where == cwd else f"{mode}@baseline",
            "seconds": round(seconds, 2),
            "peak_rss_mib": round(peak / MiB),
            "one_layer_all_models_mib": round(one_layer / MiB),
            "input_bytes": input_bytes,
        }
        if mode != "analyze":
            manifest = json.loads((out / "manifest.json").read_text())
            bank = sum(len(entry["bank"]) for entry in manifest["layers"])
            row.update(
                bank_experts=bank,
                experts_in=total_bank,
                artifact_bytes=sum(f.stat().st_size for f in out.rglob("*") if f.is_file()),
            )
            if mode == "lossless":
                expected = layers * (shared + MODELS * (EXPERTS - shared))
                assert bank == expected, f"lossless bank {bank} != identical share {expected}"
                floor = peer.io_floor(dirs, out)
            if mode == "budget":
                assert bank <= int(0.375 * total_bank)
            shutil.rmtree(out)
        rows.append(row)
    mergekit = None
    if mk:
        seconds, peak = peer.mergekit_linear(mk, dirs, root / "mergekit-out")
        mergekit = {"seconds": round(seconds, 2), "peak_rss_mib": round(peak / MiB)}
    load_after = os.getloadavg()
    return {
        "floor": floor,
        "mergekit": mergekit,
        "rows": rows,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
    }


def summarize(runs: list[dict]) -> list[dict]:
    """Per mode: median time and peak RSS over the runs, and the median of each run's own
    ratios to that run's floor and mergekit (ratios are taken within a run, not across)."""
    out = []
    for i, row in enumerate(runs[0]["rows"]):
        same = [r["rows"][i] for r in runs]
        s = {
            "mode": row["mode"],
            "seconds": [r["seconds"] for r in same],
            "median_seconds": round(median([r["seconds"] for r in same]), 2),
            "median_peak_rss_mib": round(median([r["peak_rss_mib"] for r in same])),
            "one_layer_all_models_mib": row["one_layer_all_models_mib"],
        }
        if all(r["floor"] for r in runs):
            s["median_over_floor"] = round(
                median([x["seconds"] / r["floor"]["floor_seconds"] for x, r in zip(same, runs)]), 3
            )
        if all(r["mergekit"] for r in runs):
            s["median_over_mergekit"] = round(
                median([x["seconds"] / r["mergekit"]["seconds"] for x, r in zip(same, runs)]), 3
            )
        for k in ("bank_experts", "experts_in", "artifact_bytes", "input_bytes"):
            if k in row:
                s[k] = row[k]
        out.append(s)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--shared", type=int, default=4, help="experts per layer identical in all four models")
    ap.add_argument("--keep", type=Path, help="build the family here and keep it (reused when present)")
    ap.add_argument("--mergekit", help="path of mergekit-yaml (default: $MERGEKIT_YAML or PATH)")
    ap.add_argument("--code", type=Path, help="run moeconsol from this source tree")
    ap.add_argument("--baseline", type=Path, help="also run each mode from this source tree (before/after in one run)")
    ap.add_argument("--modes", default="lossless,threshold,budget,analyze")
    ap.add_argument("--repeats", type=int, default=1, help="runs of everything; medians are reported")
    ap.add_argument("--json", type=Path, help="also write the results here (e.g. benchmarks/results/merge-io.json)")
    args = ap.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="moeconsol-merge-bench-"))
    cwd = str(args.code.resolve()) if args.code else None
    baseline = str(args.baseline.resolve()) if args.baseline else None
    modes = {
        "lossless": ["merge"],
        "threshold": ["merge", "--mode", "threshold", "--metric", "cosine", "--threshold", "0.999"],
        "budget": ["merge", "--mode", "budget", "--budget", "0.375"],
        "analyze": ["analyze", "--metric", "cosine"],
    }
    try:
        family = root / "family"
        dirs = sorted(family.iterdir()) if family.exists() else build_family(family, args.layers, args.shared)
        layers = json.loads((dirs[0] / "config.json").read_text())["num_hidden_layers"]
        input_bytes = sum(f.stat().st_size for d in dirs for f in d.iterdir())
        subprocess.run(
            ["sh", "-c", 'cat "$@" > /dev/null', "cat", *map(str, (f for d in dirs for f in d.iterdir()))], check=True
        )
        wanted = args.modes.split(",")
        mk = peer.find_mergekit(args.mergekit)
        runs = []
        for r in range(args.repeats):
            runs.append(run_once(dirs, root, modes, wanted, args.shared, layers, cwd, mk, baseline))
            print(
                f"run {r + 1}/{args.repeats} done, load average {runs[-1]['load_average_after'][0]:.2f}",
                file=sys.stderr,
            )
        summary = summarize(runs)
        result = {
            "inputs": {
                "models": MODELS,
                "layers": layers,
                "experts": EXPERTS,
                "shared": args.shared,
                "bytes": input_bytes,
            },
            "cpus": os.cpu_count(),
            "code": cwd,
            "baseline": baseline,
            "runs": runs,
            "summary": summary,
        }
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        loads = [x for r in runs for x in (r["load_average_before"][0], r["load_average_after"][0])]
        print(
            f"inputs: {MODELS} checkpoints, {input_bytes / 1e9:.2f} GB, {layers} layers x {EXPERTS} experts, {args.shared} shared; "
            f"{len(runs)} run(s); 1-minute load average {min(loads):.2f}-{max(loads):.2f} on {os.cpu_count()} CPUs"
        )
        floors = [r["floor"]["floor_seconds"] for r in runs if r["floor"]]
        if floors:
            print(
                f"I/O floor (cat inputs + cp -r artifact + sync): median {median(floors):.2f} s ({', '.join(f'{x:.2f}' for x in floors)})"
            )
        kits = [r["mergekit"]["seconds"] for r in runs if r["mergekit"]]
        if kits:
            print(
                f"mergekit linear merge: median {median(kits):.2f} s ({', '.join(f'{x:.2f}' for x in kits)}), "
                f"peak RSS {runs[0]['mergekit']['peak_rss_mib']} MiB"
            )
        print(
            "| run | median time (each run) | / I/O floor | / mergekit | peak RSS | / one layer, all models | bank experts | artifact / inputs |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for s in summary:
            f = f"{s['median_over_floor']:.2f}x" if "median_over_floor" in s else "-"
            m = f"{s['median_over_mergekit']:.2f}x" if "median_over_mergekit" in s else "-"
            bank = f"{s['bank_experts']} / {s['experts_in']}" if "bank_experts" in s else "-"
            art = f"{s['artifact_bytes'] / s['input_bytes']:.1%}" if "artifact_bytes" in s else "-"
            each = ", ".join(f"{x:.2f}" for x in s["seconds"])
            print(
                f"| {s['mode']} | {s['median_seconds']:.2f} s ({each}) | {f} | {m} | {s['median_peak_rss_mib']} MiB | "
                f"{s['median_peak_rss_mib'] / s['one_layer_all_models_mib']:.2f}x | {bank} | {art} |"
            )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
