"""Profile calibrated mode on an example family: where each variant's calibrated cost goes.

    python benchmarks/calibration_profile.py --family DIR --fam mixtral [--budgets 0.5,0.25] [--eval]

For each budget: the plan `merge.plan_calibrated` makes, and per variant its summed
calibrated cost (`calibration.substitution_costs` of the chosen representative; a mean is
costed on the calibration tokens), how many of its slots are served by another expert index
(cross-index), and per layer whether the same-index clusters were taken at the floor. With
--eval, the retained gain per variant of the same plans (`evaluate.sweep`, method calibrated)
is printed beside them, so a hypothesis about the cost can be checked against the outcome.
Calibration reads each variant's TRAINING data (family.json); evaluation its held-out data.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


def family_files(family: Path, fam: str) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """(NAME=PATH models, NAME -> training file, NAME -> held-out file) of one family in family.json."""
    ext = "txt" if fam == "mixtral" else "jsonl"
    if (family / "family.json").is_file():
        models = [m for m in json.loads((family / "family.json").read_text())["models"] if m["family"] == fam]
    else:  # a family still being built: base first, each variant trained on the data of its name
        names = ["base"] + sorted(p.name for p in (family / fam).iterdir() if p.name != "base")
        models = [
            {
                "name": n,
                "path": str(family / fam / n),
                "data": "mixed" if n == "base" else n,
                "eval_file": str(family / "data" / "eval" / f"{fam}-{'mixed' if n == 'base' else n}.{ext}"),
            }
            for n in names
        ]
    train = {
        m["name"]: m.get("train_file") or str(family / "data" / "train" / f"{fam}-{m['data']}.{ext}") for m in models
    }
    return [f"{m['name']}={m['path']}" for m in models], train, {m["name"]: m["eval_file"] for m in models}


def profile(family: Path, fam: str, budgets: list[float], tokens: int) -> dict:
    from moeconsol.analysis.calibration import candidate_cost, capture, substitution_costs
    from moeconsol.analysis.similarity import read_layer
    from moeconsol.consolidate import MergeSettings
    from moeconsol.consolidate.planners.calibrated import plan_calibrated
    from moeconsol.io.checkpoint import open_checkpoints

    models, train, _ = family_files(family, fam)
    ckpts = open_checkpoints(models)
    names = [c.name for c in ckpts]
    ref, E = ckpts[0], ckpts[0].num_experts
    acts = [capture(c, train[c.name], max_tokens=tokens) for c in ckpts]
    costs = {layer: substitution_costs(ref, layer, read_layer(ckpts, layer).flat, acts) for layer in ref.moe_layers}
    out = {}
    for budget in budgets:
        s = MergeSettings(
            mode="calibrated",
            metric="cosine",
            budget=repr(budget),
            calibration=train,
            representative="best",
            calibration_tokens=tokens,
        )
        plans = plan_calibrated(ckpts, s)
        per_model = np.zeros(len(ckpts))
        cross = np.zeros(len(ckpts), dtype=int)
        layers = []
        for plan in plans:
            lc = costs[plan.layer]
            flat = read_layer(ckpts, plan.layer).flat
            aligned = all(len({i % E for i in c}) == 1 for c in plan.clusters)
            layer_cost = np.zeros(len(ckpts))
            for c, rep, w in zip(plan.clusters, plan.representatives, plan.weights or [None] * len(plan.clusters)):
                for i in c:
                    m = i // E
                    if rep is not None:
                        layer_cost[m] += lc.cost[i, rep]
                        cross[m] += int(rep % E != i % E)
                    else:
                        ws = w or [1.0] * len(c)
                        mean = {
                            p: sum(wt * flat[j][p].float() for wt, j in zip(ws, c)) / sum(ws) for p in ref.layout.parts
                        }
                        layer_cost[m] += candidate_cost(ref, plan.layer, flat, [i], mean, acts, lc.norm)
                        cross[m] += int(len({j % E for j in c}) > 1)
            per_model += layer_cost
            layers.append(
                {
                    "layer": plan.layer,
                    "bank": len(plan.clusters),
                    "same_index": aligned,
                    "cost": dict(zip(names, layer_cost.round(4).tolist())),
                }
            )
        out[budget] = {
            "cost": dict(zip(names, per_model.round(4).tolist())),
            "cross_index_slots": dict(zip(names, cross.tolist())),
            "layers": layers,
        }
    return out


def patch(rounds: int | None, max_chunks: int | None) -> None:
    """Run an ablation: the same code with one choice set otherwise (for profiling only)."""
    import functools

    from moeconsol.analysis import calibration
    from moeconsol.consolidate.planners import calibrated

    if rounds is not None:
        calibrated.fair_weights = functools.partial(calibrated.fair_weights, rounds=rounds)
    if max_chunks is not None:
        calibration.capture = functools.partial(calibration.capture, max_chunks=max_chunks, max_run_tokens=2**62)
        calibrated.capture = calibration.capture


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", required=True)
    parser.add_argument("--fam", choices=["mixtral", "switch"], required=True)
    parser.add_argument("--budgets", default="0.5,0.25")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--eval", action="store_true", help="also sweep calibrated at the budgets (retained gain)")
    parser.add_argument("--rounds", type=int, help="clustering.fair_weights rounds (1: least total cost)")
    parser.add_argument(
        "--max-chunks",
        type=int,
        help="calibrate on at most this many chunks or examples, no token cap "
        "(e.g. 64: a number of forward passes per model instead of a token budget)",
    )
    args = parser.parse_args()
    patch(args.rounds, args.max_chunks)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    family, budgets = Path(args.family), [float(b) for b in args.budgets.split(",")]
    start = time.perf_counter()
    result = profile(family, args.fam, budgets, args.tokens)
    for budget, r in result.items():
        print(f"budget {budget:g}: cost per variant {r['cost']}; cross-index slots {r['cross_index_slots']}")
        for layer in r["layers"]:
            print(f"    {layer['layer']}: bank {layer['bank']}, same-index {layer['same_index']}, cost {layer['cost']}")
    if args.eval:
        from moeconsol.quality.evaluate import sweep

        models, train, held_out = family_files(family, args.fam)
        report = sweep(
            models,
            held_out,
            budgets,
            base=models[0].split("=", 1)[1],
            calibration=train,
            methods=["calibrated"],
            merge_options={"calibrated": {"representative": "best", "calibration_tokens": args.tokens}},
        )
        for p in report.points:
            print(
                f"retained gain at {p.budget:g} ({p.expert_fraction:.0%}): "
                + ", ".join(f"{n} {g:.1%}" for n, g in p.retained_gain.items() if n != "base")
            )
    print(f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
