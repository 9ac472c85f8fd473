"""calibrated mode with and without its held-back check, judged on each variant's held-out eval data.

    python benchmarks/heldout_check.py --family NAME=DIR ... [--fams mixtral,switch]
        [--budgets 0.5,0.3,0.25] [--margins 0,0.05,0.1,1] [--holdout 0.2] [--json FILE]

A family is a directory made by examples/build_family.py or build_family2.py: models, each
variant's TRAINING file (calibration) and its held-out EVAL file (family.json). Per family, architecture and budget it makes, with the
library's own functions and no artifact written:

- `unchecked`: the calibrated plan from all of each training file (merge --holdout 0);
- the check's candidates, planned on the first (1 - holdout) of each training file, measured
  on the rest (the figures `merge` stores), and the rule's choice at each margin, with a
  variant below its base raised as merge does;

and scores every plan on every variant's EVAL file, served as `checking.ServedVariant`
serves it (the variant's own model, its experts replaced): Mixtral by perplexity in windows
of min(128, max positions) tokens (the example families' 64: `moeconsol eval`'s windows),
Switch by teacher-forced token accuracy (`eval`'s token accuracy); retained gain against the
model named `base` (docs/quality.md). The bound each row is read against: the same
calibrated planner without the check (`unchecked`), in the same run.

It also runs one real `merge --mode calibrated` per family and architecture at the first
budget and prints the check's seconds beside the merge's.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from calibration_profile import family_files  # noqa: E402


def retained(base: float, value: float, own: float) -> float:
    if own == base or not all(map(math.isfinite, (base, value, own))):
        return math.nan
    return (base - value) / (base - own)


def eval_figure(fam: str, base, result, own) -> float:
    """Retained gain of one eval result (`HeldoutLoss`) against base and own."""
    if fam == "mixtral":  # perplexity, lower is better
        return retained(math.exp(base.loss), math.exp(result.loss), math.exp(own.loss))
    return retained(base.accuracy, result.accuracy, own.accuracy)


def run(family: Path, fam: str, budgets: list[str], margins: list[float], holdout: float, tokens: int) -> dict:
    from moeconsol.analysis.heldout import read_calibration, split_calibration
    from moeconsol.consolidate import MergeSettings
    from moeconsol.consolidate.checking import (
        Measurer,
        below_base_everywhere,
        budget_plans,
        candidate_plans,
        figures,
        measure,
        raise_variants,
        same_index_plans,
    )
    from moeconsol.consolidate.choice import choose
    from moeconsol.consolidate.planners.calibrated import calibrated_inputs, own_plans
    from moeconsol.consolidate.planners.reference import reference_layer_plans
    from moeconsol.consolidate.settings import budget_experts
    from moeconsol.io.checkpoint import open_checkpoints

    models, train, evals = family_files(family, fam)
    ckpts = open_checkpoints(models)
    names = [c.name for c in ckpts]
    b = names.index("base")
    s = MergeSettings(mode="calibrated", metric="cosine", representative="best", calibration=train)
    s.calibration_tokens = tokens

    started = time.perf_counter()
    full = calibrated_inputs(ckpts, s)
    parts = [split_calibration(read_calibration(train[n]), holdout) for n in names]
    split = calibrated_inputs(ckpts, s, data=[p for p, _ in parts], reference=True)
    plan_seconds = time.perf_counter() - started
    held = Measurer(ckpts, [h for _, h in parts], split.digests)
    scorer = Measurer(ckpts, [read_calibration(evals[n]) for n in names], split.digests, max_tokens=10**9)

    out: dict = {"variants": [n for n in names if n != "base"], "budgets": {}, "plan_seconds": plan_seconds}
    floor = 1 / len(ckpts)
    usable = [x for x in budgets if float(x) >= floor - 1e-9]
    if len(usable) < len(budgets) and not any(abs(float(x) - floor) < 1e-9 for x in usable):
        usable.append(f"{math.ceil(floor * 10**4) / 10**4:g}")  # below the floor is refused: the floor instead
    for budget in usable:
        s.budget = budget
        max_bank = budget_experts(budget, ckpts)
        cands = candidate_plans(
            [
                ("unchecked", lambda: own_plans(ckpts, s, full)),
                ("calibrated", lambda: own_plans(ckpts, s, split)),
                ("budget", lambda: budget_plans(split, max_bank)),
                ("reference", lambda: reference_layer_plans(ckpts, split.reference, max_bank)),
                ("average", lambda: same_index_plans(ckpts, split)),
            ]
        )
        checked = [c for c in cands if c.name != "unchecked"]
        for c in checked:
            c.same_as = None if c.same_as == "unchecked" else c.same_as
        t0 = time.perf_counter()
        measured = measure(ckpts, held, checked, None, b)
        check_seconds = time.perf_counter() - t0
        figs = figures(measured, names)
        plans = {c.name: c.plans for c in cands}
        choices = {}
        for margin in margins:
            chosen = choose(figs, margin)
            raised = below_base_everywhere(measured)
            name = f"margin {margin:g}"
            if raised:
                plans[name], _ = raise_variants(held, measured, raised, plans[chosen], split)
                choices[name] = {"chosen": chosen, "raised": [names[m] for m in raised]}
            else:
                plans[name] = plans[chosen]
                choices[name] = {"chosen": chosen, "raised": []}
        # every plan on every variant's eval file
        session = scorer.variant(b)
        base_eval = scorer.losses_of(session.model)
        session.close()
        scores: dict[str, dict[str, float]] = {p: {} for p in plans}
        for m, n in enumerate(names):
            if n == "base":
                continue
            session = scorer.variant(m)
            done: dict[int, float] = {}  # a margin's choice is one of the candidates: scored once
            for p, pl in plans.items():
                if id(pl) not in done:
                    done[id(pl)] = eval_figure(fam, base_eval[m], session.measure(pl), session.own_result)
                scores[p][n] = done[id(pl)]
            session.close()
        out["budgets"][budget] = {
            "held_back": {c: {n: figs[c][n] for n in names} for c in figs},
            "choices": choices,
            "eval": scores,
            "check_seconds": check_seconds,
        }
    return out


def timed_merge(family: Path, fam: str, budget: str, tokens: int) -> dict:
    """One real merge: its seconds and the check's."""
    from moeconsol.consolidate import MergeSettings, merge
    from moeconsol.io.checkpoint import open_checkpoints

    models, train, _ = family_files(family, fam)
    s = MergeSettings(mode="calibrated", budget=budget, representative="best", calibration=train)
    s.calibration_tokens = tokens
    with tempfile.TemporaryDirectory() as tmp:
        r = merge(open_checkpoints(models), Path(tmp) / "out", s)
    return {"merge": r.seconds, "check": r.check_seconds, "chosen": r.manifest["heldout"]["chosen"]}


def pct(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{100 * x:.0f}"


def table(name: str, fam: str, result: dict, margins: list[float]) -> list[str]:
    variants = result["variants"]
    lines = [f"### {name} {fam}: retained gain on eval data, %, {' / '.join(variants)} (worst)", ""]
    rows = ["unchecked", "calibrated", "budget", "reference", "average"] + [f"margin {m:g}" for m in margins]
    lines.append("| plan | " + " | ".join(result["budgets"]) + " |")
    lines.append("|---" * (len(result["budgets"]) + 1) + "|")
    for row in rows:
        cells = []
        for r in result["budgets"].values():
            ev = r["eval"].get(row)
            if ev is None:
                cells.append("-")
                continue
            text = " / ".join(pct(ev[v]) for v in variants) + f" ({pct(min(ev[v] for v in variants))})"
            if row.startswith("margin"):
                c = r["choices"][row]
                text += f" {c['chosen']}" + (f" raised {','.join(c['raised'])}" if c["raised"] else "")
            cells.append(text)
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", action="append", required=True, help="NAME=DIR (repeat)")
    parser.add_argument("--fams", default="mixtral,switch")
    parser.add_argument("--budgets", default="0.5,0.3,0.25")
    parser.add_argument("--margins", default="0,0.05,0.1,1")
    parser.add_argument("--holdout", type=float, default=0.2)
    parser.add_argument("--tokens", type=int, default=512, help="calibration tokens per slot")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    margins = [float(x) for x in args.margins.split(",")]
    budgets = args.budgets.split(",")
    report: dict = {}
    for spec in args.family:
        name, _, path = spec.partition("=")
        for fam in args.fams.split(","):
            t0 = time.perf_counter()
            result = run(Path(path), fam, budgets, margins, args.holdout, args.tokens)
            result["timed_merge"] = timed_merge(Path(path), fam, budgets[0], args.tokens)
            result["seconds"] = time.perf_counter() - t0
            report[f"{name}/{fam}"] = result
            print("\n".join(table(name, fam, result, margins)))
            tm = result["timed_merge"]
            print(
                f"merge --mode calibrated --budget {budgets[0]}: {tm['merge']:.1f} s, of which the check "
                f"{tm['check']:.1f} s ({tm['check'] / tm['merge']:.0%}); wrote {tm['chosen']}\n"
            )
            if args.json:
                args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
