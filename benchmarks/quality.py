"""Bytes vs. quality on the example families: every consolidation method at every budget.

    python benchmarks/quality.py [--family NAME=DIR ...] [--budgets 1.0,0.75,0.5,0.3,0.25]
                                 [--only mixtral|switch] [--out benchmarks/results] [--write-docs]

Default families: `family1=examples/family` (examples/build_family.py; built here if absent)
and `family2=examples/family2`, the second family, built differently and held out (no default
is tuned on it): build it first with

    python examples/build_family2.py --out examples/family2

(a --family whose directory has no family.json is refused with that command). Every family
directory has the same shape (OUT/mixtral, OUT/switch, OUT/data, OUT/family.json), and its
family.json says which models, which held-out file and which training file each has.

For each family and architecture it runs `evaluate.sweep`: methods reference, budget,
calibrated, `deltas` when `moeconsol.quality.evaluate` knows it (checked at run time), average,
task-arithmetic and ties, each variant scored on its own HELD-OUT data (data/eval/),
calibration on its own TRAINING data (data/train/), the base for retained gain. Every
setting is a documented default: nothing is tuned on the evaluation data.

The bar, per family and architecture: at 50% of the expert memory of all variants,
every fine-tuned variant keeps at least 90% of its gain (per variant), and at every budget
moeconsol's own method (calibrated, sharing only) is at least as good as the reference
method and better than uniform averaging, compared by the mean retained gain over the
fine-tuned variants (the base has no gain to keep and is left out). Printed beside it, not
part of it: the delta goals (method deltas: every variant >= 90% at 0.3, >= 97% at 0.5).
Worst-variant gains are printed too, per-variant losses are listed as notes, and averaging
is also compared at matched memory (docs/quality.md says why). The result is printed and
saved under --out as JSON, a Markdown table and a PNG (quality-NAME-ARCH.*). --write-docs then
makes every saved sweep's table and plot again and, when --out is benchmarks/results,
docs/benchmarks.md's summary table (benchmarks/tables.py); --docs-only does only that.

Over many generated families instead:

    python benchmarks/quality.py --families K [--families-dir DIR] [--family-size small|full]
                                 [--split report|tuning] [--only ARCH] [--resume] [--write-docs]

builds (or reuses) families seed-0 .. seed-(K-1) of each architecture with
examples/build_families.py under DIR (default examples/families) and sweeps calibrated and
deltas (representative best, as `moeconsol sweep`), reference, budget at 1.0, 0.75, 0.5 and
0.25, and uniform averaging; each variant scored on its own held-out file (seq2seq: token
accuracy, without greedy generation), calibration on its own training file, the base for
retained gain. Seeds 0 and 1 are the TUNING families (--split tuning): a default may be chosen
by looking at them. Seeds 2 .. K-1 are the REPORT families (--split report, the default): the
figures reported are theirs alone, and nothing is chosen on them. Each family's sweep is saved
as soon as it is done (quality-families-SPLIT-ARCH.json; --resume keeps those whose spec and
settings match), and the report over both architectures (family_stats.py: per budget and
method the worst variant, p10, median, mean, variants more than 10 points below the reference,
the goals) is printed and written as quality-families[-tuning].md and .png; --write-docs then
rewrites docs/benchmarks.md's generated tables.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import family_stats  # noqa: E402
import tables  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARCHS = {"mixtral": "txt", "switch": "jsonl"}
OWN, REFERENCE, AVERAGE, DELTAS = "calibrated", "reference", "average", "deltas"
DELTA_GOALS = ((0.3, 0.9), (0.5, 0.97))
"""The goals of sharing + deltas: (budget, retained gain every variant keeps)."""
DEFAULT_FAMILIES = ("family1=" + str(ROOT / "examples" / "family"), "family2=" + str(ROOT / "examples" / "family2"))
BUILDERS = {"family1": "build_family.py", "family2": "build_family2.py"}


def fail(message: str) -> None:
    """Bad input: one line on stderr, exit code 2."""
    print(f"quality.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_family(text: str) -> tuple[str, Path]:
    """NAME=DIR (or DIR: named after the directory)."""
    name, sep, path = text.partition("=")
    return (name, Path(path)) if sep else (Path(text).name, Path(text))


def ensure_family(name: str, path: Path) -> None:
    """Build the first family if absent (its builder is fast enough); refuse any other missing one."""
    if (path / "family.json").is_file():
        return
    builder = BUILDERS.get(name, "build_family2.py")
    if name != "family1":
        fail(f"{path}/family.json not found: build the family first with python examples/{builder} --out {path}")
    spec = importlib.util.spec_from_file_location("build_family", ROOT / "examples" / builder)
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_family"] = module
    spec.loader.exec_module(module)
    module.build(path)


def family_models(path: Path, arch: str) -> list[dict]:
    """family.json's models of one architecture, base first: name, path, eval_file, train_file."""
    models = [m for m in json.loads((path / "family.json").read_text())["models"] if m["family"] == arch]
    for m in models:  # a family.json without train_file: the family's training file of that domain
        m["train_file"] = m.get("train_file") or str(path / "data" / "train" / f"{arch}-{m['data']}.{ARCHS[arch]}")
    return sorted(models, key=lambda m: m["name"] != "base")


def methods_known() -> list[str]:
    """The sweep's methods, with deltas when this moeconsol's evaluate knows it."""
    from moeconsol.quality import evaluate

    methods = ["reference", "budget", OWN]
    if DELTAS in (*evaluate.BUDGET_METHODS, *getattr(evaluate, "METHODS", ())):
        methods.append(DELTAS)
    return methods + list(evaluate.MERGE_METHODS)


def run_family(
    path: Path,
    arch: str,
    budgets: list[float],
    methods: list[str] | None = None,
    max_examples: int | None = None,
    merge_options: dict | None = None,
    exact_match: bool = True,
):
    """`evaluate.sweep` of one family and architecture (methods: `methods_known()` by default;
    `max_examples`: score only the first N held-out examples of a seq2seq file; `merge_options`
    per method, default representative `best` for calibrated; `exact_match=False`: seq2seq
    token accuracy only, without greedy generation)."""
    from moeconsol.quality.evaluate import EvalSettings, sweep

    models = family_models(path, arch)
    return sweep(
        [f"{m['name']}={m['path']}" for m in models],
        {m["name"]: m["eval_file"] for m in models},
        budgets,
        base=next(m["path"] for m in models if m["name"] == "base"),
        calibration={m["name"]: m["train_file"] for m in models},
        methods=methods or methods_known(),
        settings=EvalSettings(max_examples=max_examples, exact_match=exact_match),
        merge_options=merge_options or {OWN: {"representative": "best"}},
    )


def mean_gain(point, names: list[str]) -> float:
    """Mean retained gain over the fine-tuned variants (NaN if any is NaN)."""
    return sum(point.retained_gain[n] for n in names) / len(names)


def worst_gain(point, names: list[str]) -> tuple[str, float]:
    """The fine-tuned variant that keeps the least of its gain, and how much."""
    name = min(names, key=lambda n: point.retained_gain[n])
    return name, point.retained_gain[name]


def matched_budget(report, method: str = OWN) -> float | None:
    """The budget at which `method`'s expert memory is nearest uniform averaging's (1/N)."""
    target = 1.0 / len(report.original)
    ours = [p for p in report.points if p.method == method and p.error is None]
    if not ours:
        return None
    return min(ours, key=lambda p: (abs(p.expert_fraction - target), p.expert_fraction)).budget


def check_bar(report, at: float = 0.5, keep: float = 0.9) -> tuple[list[str], list[str]]:
    """(misses, notes): every way the sweep misses the bar (empty: reached), and per-variant
    observations that are not part of the bar.

    The bar, read as docs/quality.md explains: (1) at `at` of the expert memory, every
    fine-tuned variant keeps at least `keep` of its gain with moeconsol's own method (per
    variant); (2) at every budget, the own method's *mean* retained gain over the fine-tuned
    variants is at least the reference method's and more than uniform averaging's. The base
    has no gain and is left out. Per-variant losses against the reference or averaging are
    notes: a variant can gain from being served another variant's experts (the reference's
    round-robin gives a frozen-expert variant other variants' experts), and that luck is not
    what consolidation promises to keep. A method that cannot make a budget misses there.
    """
    misses, notes = [], []
    fine_tuned = [n for n in report.original if n != "base"]
    points = {(p.method, p.budget): p for p in report.points}
    average = points.get((AVERAGE, None))
    budgets = sorted({p.budget for p in report.points if p.method == OWN}, reverse=True)
    for budget in budgets:
        own = points[(OWN, budget)]
        if own.error:
            misses.append(f"{OWN} at {budget:g}: no artifact ({own.error})")
            continue
        if budget == at:
            for n in fine_tuned:
                if not own.retained_gain[n] >= keep:
                    misses.append(f"{OWN} at {at:g}: {n} keeps {own.retained_gain[n]:.1%} of its gain (< {keep:.0%})")
        mine = mean_gain(own, fine_tuned)
        ref = points.get((REFERENCE, budget))
        if ref is not None and ref.error is None:
            theirs = mean_gain(ref, fine_tuned)
            if not mine >= theirs:
                misses.append(f"{OWN} at {budget:g}: mean retained gain {mine:.1%} < reference {theirs:.1%}")
            for n in fine_tuned:
                if own.retained_gain[n] < ref.retained_gain[n]:
                    notes.append(
                        f"{n} at {budget:g}: {OWN} keeps {own.retained_gain[n]:.0%}, reference {ref.retained_gain[n]:.0%}"
                    )
        if average is not None and average.error is None:
            avg = mean_gain(average, fine_tuned)
            if not mine > avg:
                misses.append(
                    f"{OWN} at {budget:g}: mean retained gain {mine:.1%} not above uniform averaging {avg:.1%}"
                )
            for n in fine_tuned:
                if own.retained_gain[n] <= average.retained_gain[n]:
                    notes.append(
                        f"{n} at {budget:g}: {OWN} keeps {own.retained_gain[n]:.0%}, average {average.retained_gain[n]:.0%}"
                    )
    return misses, notes


def check_delta_goals(report) -> list[str]:
    """The goals of method deltas, one line each ("met" or "missed" and why);
    empty when the sweep has no deltas points. Printed beside the bar, not part of it."""
    fine_tuned = [n for n in report.original if n != "base"]
    points = {(p.method, p.budget): p for p in report.points if p.method == DELTAS}
    lines = []
    for budget, keep in DELTA_GOALS if points else ():
        p = points.get((DELTAS, budget))
        if p is None:
            lines.append(f"{DELTAS} at {budget:g}: not run")
        elif p.error:
            lines.append(f"{DELTAS} at {budget:g}: missed, no artifact ({p.error})")
        else:
            short = [f"{n} {p.retained_gain[n]:.1%}" for n in fine_tuned if not p.retained_gain[n] >= keep]
            lines.append(
                f"{DELTAS} at {budget:g}: every variant >= {keep:.0%}: "
                + ("met" if not short else "missed (" + ", ".join(short) + ")")
            )
    return lines


def summary(report) -> list[str]:
    """Markdown table: mean and worst-variant retained gain per method and budget, and the
    comparison with uniform averaging at matched memory."""
    fine_tuned = [n for n in report.original if n != "base"]
    lines = ["| method | budget | expert memory | mean retained gain | worst variant |", "|---|---|---|---|---|"]
    for p in report.points:
        budget = "-" if p.budget is None else f"{p.budget:g}"
        if p.error:
            lines.append(f"| {p.method} | {budget} | n/a | n/a | n/a |")
            continue
        name, worst = worst_gain(p, fine_tuned)
        lines.append(
            f"| {p.method} | {budget} | {p.expert_fraction:.0%} | {mean_gain(p, fine_tuned):.0%} | {name} {worst:.0%} |"
        )
    points = {(p.method, p.budget): p for p in report.points if p.error is None}
    average, match = points.get((AVERAGE, None)), matched_budget(report)
    if average is not None and match is not None:
        own = points[(OWN, match)]
        lines += [
            "",
            f"At matched memory (uniform averaging holds 1/{len(report.original)} = "
            f"{average.expert_fraction:.0%} of the expert memory): {OWN} at {match:g} ({own.expert_fraction:.0%}) keeps "
            f"{mean_gain(own, fine_tuned):.0%} on average (worst {worst_gain(own, fine_tuned)[1]:.0%}), "
            f"averaging {mean_gain(average, fine_tuned):.0%} (worst {worst_gain(average, fine_tuned)[1]:.0%}).",
        ]
    return lines


def markdown(title: str, report, seconds: float) -> str:
    names = list(report.original)
    metric = report.metric + (" (lower is better)" if report.lower_is_better else " (higher is better)")
    shown = (report.settings.get("eval") or {}).get("max_examples")
    scope = f" (first {shown} held-out examples per variant)" if shown and report.metric == "token_accuracy" else ""
    lines = [
        f"### {title}: {metric}; retained gain in brackets{scope}",
        "",
        "| method | budget | expert memory | " + " | ".join(names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    lines.append("| original | | 100% | " + " | ".join(f"{report.original[n]:.4g}" for n in names) + " |")
    lines.append("| base | | | " + " | ".join(f"{report.base[n]:.4g}" for n in names) + " |")
    for p in report.points:
        budget = "-" if p.budget is None else f"{p.budget:g}"
        if p.error:
            lines.append(f"| {p.method} | {budget} | n/a | " + " | ".join("n/a" for _ in names) + " |")
            continue
        cells = []
        for n in names:
            g = p.retained_gain[n]
            cells.append(f"{p.quality[n]:.4g}" + ("" if math.isnan(g) else f" ({g:.0%})"))
        lines.append(f"| {p.method} | {budget} | {p.expert_fraction:.0%} | " + " | ".join(cells) + " |")
    if report.metric == "token_accuracy":
        lines += [
            "",
            "Exact match (greedy) of the same runs: "
            + "; ".join(
                f"{p.method} {'-' if p.budget is None else f'{p.budget:g}'}: "
                + ", ".join(f"{n} {p.details[n]['exact_match']:.2f}" for n in names)
                for p in report.points
                if p.error is None
            ),
        ]
    misses, notes = check_bar(report)
    lines += ["", f"Retained gain over the fine-tuned variants ({', '.join(n for n in names if n != 'base')}):", ""]
    lines += summary(report)
    lines += ["", f"Bar: {'reached' if not misses else 'NOT reached'} ({seconds:.0f} s)."]
    lines += [f"- {m}" for m in misses]
    goals = check_delta_goals(report)
    if goals:
        lines += ["", "Delta goals (beside the bar): " + "; ".join(goals) + "."]
    if notes:
        lines += ["", "Per-variant notes (not part of the bar): " + "; ".join(notes) + "."]
    return "\n".join(lines)


PLOTTED = {OWN: "tab:blue", DELTAS: "tab:purple", REFERENCE: "tab:orange", "budget": "tab:green"}
"""Methods drawn as lines (bytes vs. retained gain), and their colours; the merging
baselines are single points (BASELINE_MARKERS)."""
BASELINE_MARKERS = {"average": ("x", "black"), "task-arithmetic": ("^", "tab:red"), "ties": ("s", "tab:brown")}


def report_from_dict(d: dict):
    """A SweepReport from its saved JSON (`SweepReport.to_dict`; NaN was saved as null)."""
    from moeconsol.quality.evaluate import SweepPoint, SweepReport

    def nan(x):
        return math.nan if x is None else x

    points = [
        SweepPoint(**{**p, "retained_gain": {k: nan(v) for k, v in p["retained_gain"].items()}}) for p in d["points"]
    ]
    return SweepReport(**{**d, "points": points})


def plot_gains(report, title: str, path: Path) -> Path:
    """Expert memory on x, retained gain on y: one subplot per fine-tuned variant and one for
    the mean; lines for sharing only (calibrated), sharing + deltas, the reference method and
    budget mode, markers for the merging baselines (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fine_tuned = [n for n in report.original if n != "base"]
    panels = [*fine_tuned, "mean"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.4), squeeze=False, sharey=True)
    ok = [p for p in report.points if p.error is None]

    def gain(p, n: str) -> float:
        return mean_gain(p, fine_tuned) if n == "mean" else p.retained_gain[n]

    for ax, n in zip(axes[0], panels):
        for m, colour in PLOTTED.items():
            pts = sorted((p.expert_fraction, gain(p, n)) for p in ok if p.method == m)
            if pts:
                ax.plot([100 * x for x, _ in pts], [100 * y for _, y in pts], marker="o", color=colour, label=m)
        for p in ok:
            if p.budget is None:
                marker, colour = BASELINE_MARKERS.get(p.method, ("D", "gray"))
                ax.scatter(
                    [100 * p.expert_fraction],
                    [100 * max(gain(p, n), -0.5)],
                    marker=marker,
                    color=colour,
                    label=p.method,
                )
        ax.axhline(100, color="black", linestyle="--", linewidth=1)
        ax.axhline(90, color="gray", linestyle=":", linewidth=1)
        ax.set_ylim(-50, 110)
        ax.set_title(n)
        ax.set_xlabel("expert memory (% of all variants')")
    axes[0][0].set_ylabel("retained gain (%; floored at -50)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def merge_runs(saved: dict, new: dict) -> dict:
    """The saved sweep (JSON) with a new run's points added: a point of the same method and
    budget is replaced in place, others are added, and the points are ordered by method (in order of first
    appearance) and budget (highest first). Refused (exit 2) unless both score the
    same models with the same originals and base, i.e. the same family build and examples."""
    for key in ("models", "metric", "original", "base", "expert_bytes"):
        if saved.get(key) != new.get(key):
            fail(
                f"cannot merge into the saved run: its {key} differs from this run's (another family build or "
                "other examples?); run without --merge to replace it"
            )
    merged = {**saved, "points": list(saved["points"])}
    where = {(p["method"], p["budget"]): k for k, p in enumerate(merged["points"])}
    for point in new["points"]:
        k = where.get((point["method"], point["budget"]))
        if k is None:
            merged["points"].append(point)
        else:
            merged["points"][k] = point
    order = {m: k for k, m in enumerate(dict.fromkeys(p["method"] for p in merged["points"]))}
    merged["points"].sort(key=lambda p: (order[p["method"]], -(p["budget"] if p["budget"] is not None else 2.0)))
    settings = dict(saved.get("settings") or {})
    for key in ("methods", "budgets"):
        settings[key] = list(dict.fromkeys([*(settings.get(key) or []), *((new.get("settings") or {}).get(key) or [])]))
    merged["settings"] = settings
    return merged


# -- many generated families (--families K) ----------------------------------------------------

FAMILY_BUDGETS = "1.0,0.75,0.5,0.25"
FAMILY_METHODS = (OWN, REFERENCE, "budget", AVERAGE)
"""Swept on every generated family, with deltas when this moeconsol knows it."""
FAMILY_MERGE_OPTIONS = {OWN: {"representative": "best"}, DELTAS: {"representative": "best"}}
"""What `moeconsol sweep` merges calibrated and deltas with."""
SPLITS = ("report", "tuning")


def family_builder():
    """examples/build_families.py as a module (examples/ is not a package)."""
    if "build_families" in sys.modules:
        return sys.modules["build_families"]
    spec = importlib.util.spec_from_file_location("build_families", ROOT / "examples" / "build_families.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_families"] = module
    spec.loader.exec_module(module)
    return module


def split_seeds(count: int, split: str, tuning: tuple[int, ...]) -> list[int]:
    """Seeds 0 .. count-1 of one split: the tuning seeds, or every other one (the report)."""
    seeds = [s for s in range(count) if (s in tuning) == (split == "tuning")]
    if not seeds:
        fail(f"--families {count} leaves no {split} family (tuning seeds: {', '.join(map(str, tuning))}): give more")
    return seeds


def _write_json(path: Path, data: dict) -> None:
    """Written whole or not at all (a run interrupted between families keeps the last whole file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)


def families_file(out: Path, split: str, arch: str) -> Path:
    return out / f"quality-families-{split}-{arch}.json"


def run_families(args, budgets: list[float], methods: list[str]) -> None:
    """Build (or reuse) the split's families under --families-dir and sweep each, one
    architecture at a time; after each family its sweep is saved (quality-families-SPLIT-ARCH.json)."""
    builder = family_builder()
    seeds = split_seeds(args.families, args.split, builder.TUNING_SEEDS)
    out, root = Path(args.out), Path(args.families_dir)
    settings = {"budgets": budgets, "methods": methods, "max_examples": args.max_examples, "size": args.family_size}
    for arch in [args.only] if args.only else list(ARCHS):
        path = families_file(out, args.split, arch)
        saved = json.loads(path.read_text()) if args.resume and path.is_file() else {}
        done = {f["seed"]: f for f in saved.get("families", []) if saved.get("settings") == settings}
        run = {"split": args.split, "arch": arch, "seeds": seeds, "settings": settings, "cpus": os.cpu_count()}
        run["families"] = []
        for seed in seeds:
            where = root / builder.family_name(seed)
            start = time.perf_counter()
            record = builder.build_family(where, seed, [arch], args.family_size, log=lambda m: print(m, flush=True))
            built = time.perf_counter() - start
            spec = record["specs"][arch]
            if seed in done and done[seed]["spec"] == spec:
                print(f"{where.name}/{arch}: sweep reused from {path}", flush=True)
                run["families"].append(done[seed])
                continue
            start = time.perf_counter()
            max_examples = args.max_examples if arch == "switch" else None
            report = run_family(where, arch, budgets, methods, max_examples, FAMILY_MERGE_OPTIONS, exact_match=False)
            entry = {
                "family": where.name,
                "seed": seed,
                "arch": arch,
                "recipe": spec["recipe"],
                "spec": spec,
                "build_seconds": round(built, 1),
                "sweep_seconds": round(time.perf_counter() - start, 1),
                "load_average": os.getloadavg()[0],
                "sweep": report.to_dict(),
            }
            run["families"].append(entry)
            _write_json(path, run)
            table, _ = family_stats.summarize([entry])
            own = [r for r in table if r.method == OWN]
            print(
                f"{where.name}/{arch} ({spec['recipe']}): swept in {entry['sweep_seconds']:.0f} s; calibrated worst "
                + ", ".join(f"{r.budget:g} {r.worst:.0%} ({r.worst_of.rsplit('/', 1)[-1]})" for r in own if r.variants),
                flush=True,
            )
        _write_json(path, run)


def families_report(out: Path, split: str) -> str | None:
    """The saved families of both architectures as one Markdown report (and its plot,
    quality-families[-tuning].png); None when none is saved."""
    files = [families_file(out, split, arch) for arch in ARCHS]
    runs = [json.loads(f.read_text()) for f in files if f.is_file()]
    if not runs:
        return None
    families = [f for r in runs for f in r["families"]]
    table, goals = family_stats.summarize(families)
    stem = "quality-families" + ("" if split == "report" else f"-{split}")
    seeds = sorted({s for r in runs for s in r["seeds"]})
    title = f"{split} families: seeds {', '.join(map(str, seeds))}"
    family_stats.plot(table, out / f"{stem}.png", f"Retained gain over the {title}")
    lines = [
        f"### Over many generated families ({title}; {len(families)} families, "
        f"{sum(len(f['sweep']['original']) - 1 for f in families)} fine-tuned variants)",
        "",
        "Goals, worst variant first:",
        "",
        *family_stats.goal_lines(goals),
        "",
        *family_stats.stats_table(table),
        "",
        "Per family: the worst variant's retained gain at each budget.",
        "",
        *family_stats.family_table(families),
    ]
    text = "\n".join(lines) + "\n"
    (out / f"{stem}.md").write_text(text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--family",
        action="append",
        metavar="NAME=DIR",
        help="a family directory (repeatable); default: family1=examples/family family2=examples/family2",
    )
    parser.add_argument("--budgets", help=f"default 1.0,0.75,0.5,0.3,0.25; with --families {FAMILY_BUDGETS}")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--only", choices=list(ARCHS), help="run one architecture only")
    parser.add_argument("--methods", help="comma-separated methods (default: every method this moeconsol knows)")
    parser.add_argument(
        "--max-examples",
        type=int,
        help="score only the first N held-out examples of a seq2seq file "
        "(a shorter run on a busy machine; say so where the figures are reported)",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="add this run's points to the saved run under --out (same method and budget: replaced) "
        "instead of replacing the whole file; refused if the originals or base differ",
    )
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help="then make every saved sweep's table and plot again, and docs/benchmarks.md's summary table",
    )
    parser.add_argument(
        "--docs-only",
        action="store_true",
        help="run nothing: --write-docs from the sweeps saved under --out by earlier runs "
        "(e.g. one run per family and architecture, in parallel)",
    )
    parser.add_argument(
        "--families",
        type=int,
        metavar="K",
        help="instead of the example families: K generated families per architecture, seeds 0..K-1 "
        "(examples/build_families.py; built under --families-dir when absent); seeds 0-1 tune, the others report",
    )
    parser.add_argument(
        "--families-dir",
        default=str(ROOT / "examples" / "families"),
        help="where the generated families are built and reused (default examples/families)",
    )
    parser.add_argument("--family-size", choices=("small", "full"), default="small")
    parser.add_argument(
        "--split",
        choices=SPLITS,
        default="report",
        help="with --families: the report seeds (2..K-1) or the tuning ones",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="with --families: keep the saved sweep of a family whose spec and settings match",
    )
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    from moeconsol.cli.options import parse_budgets

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)  # tiny models: threads only add overhead
    if args.families is not None:
        return main_families(args)
    families = [parse_family(f) for f in args.family or DEFAULT_FAMILIES]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    archs = [args.only] if args.only else list(ARCHS)
    verdicts = []
    if not args.docs_only:
        for name, path in families:
            ensure_family(name, path)
        budgets = parse_budgets(args.budgets or "1.0,0.75,0.5,0.3,0.25")
        for name, path in families:
            for arch in archs:
                start = time.perf_counter()
                methods = args.methods.split(",") if args.methods else None
                report = run_family(path, arch, budgets, methods, args.max_examples if arch == "switch" else None)
                seconds = time.perf_counter() - start
                stem = f"quality-{name}-{arch}"
                saved = out / f"{stem}.json"
                if args.merge and saved.is_file():
                    report = report_from_dict(
                        merge_runs(json.loads(saved.read_text()), json.loads(json.dumps(report.to_dict())))
                    )
                saved.write_text(json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")
                plot_gains(report, f"{name} / {arch}", out / f"{stem}.png")
                (out / f"{stem}.md").write_text(markdown(f"{name} / {arch}", report, seconds) + "\n")
                print((out / f"{stem}.md").read_text(), flush=True)
                verdicts.append(f"{name}/{arch}: bar {'reached' if not check_bar(report)[0] else 'NOT reached'}")
    if args.write_docs or args.docs_only:
        for name, _ in families:
            for arch in archs:
                part = out / f"quality-{name}-{arch}.md"
                saved = out / f"quality-{name}-{arch}.json"
                if not saved.is_file():  # say so rather than leave the family out silently
                    print(
                        f"{saved}: no saved run; `python benchmarks/quality.py --family {name}=DIR --only {arch}` makes it"
                    )
                    continue
                # tables and plot again from the saved sweep, with this version's formatting
                report = report_from_dict(json.loads(saved.read_text()))
                took = re.search(r"^Bar: .*\((\d+) s\)\.$", part.read_text(), re.M) if part.is_file() else None
                part.write_text(markdown(f"{name} / {arch}", report, float(took.group(1)) if took else math.nan) + "\n")
                plot_gains(report, f"{name} / {arch}", saved.with_suffix(".png"))
        if out.resolve() == tables.RESULTS.resolve():
            tables.main([])
        else:
            print(
                f"docs/benchmarks.md reads {tables.RESULTS}: copy the quality-*.json there, then run benchmarks/tables.py"
            )
    print("\n" + "\n".join(verdicts))
    return 0


def main_families(args) -> int:
    """--families K: sweep the generated families of one split, then report them."""
    from moeconsol.cli.options import parse_budgets
    from moeconsol.errors import MoeconsolError, SettingsError

    if args.family or args.merge:
        fail("--families runs the generated families: leave out --family and --merge")
    if args.families < 1:
        fail(f"--families {args.families}: give at least 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.docs_only:
        try:
            budgets = parse_budgets(args.budgets or FAMILY_BUDGETS)
        except SettingsError as e:
            fail(str(e))
        known = methods_known()
        methods = args.methods.split(",") if args.methods else [m for m in known if m in (*FAMILY_METHODS, DELTAS)]
        try:
            run_families(args, budgets, methods)
        except MoeconsolError as e:
            fail(str(e))
    text = families_report(out, args.split)
    if text is None:
        fail(f"no generated families saved under {out}: run python benchmarks/quality.py --families K first")
    print(text)
    if (args.write_docs or args.docs_only) and out.resolve() == tables.RESULTS.resolve():
        tables.main([])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
