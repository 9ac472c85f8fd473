"""Retained gain over many generated families: per method and budget, the worst variant, the
10th percentile, the median and the mean over every fine-tuned variant of every family, each
variant against the reference method, and the goals read off them.

Input: the families quality.py --families saved (quality-families-SPLIT-ARCH.json), each
`{"family", "arch", "recipe", "sweep": SweepReport.to_dict()}`. Only json, math and statistics
are imported (the plot imports matplotlib itself), so tables.py can render from it anywhere.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

OWN, DELTAS, REFERENCE, BUDGET, AVERAGE = "calibrated", "deltas", "reference", "budget", "average"
METHODS = (OWN, DELTAS, REFERENCE, BUDGET, AVERAGE)
"""Methods in the order they are shown; moeconsol's own first."""
MARGIN = 0.10
"""A variant is "below the reference" when it keeps more than this (10 points) less."""
GOAL_SHARING = (0.5, 0.90)
"""(budget, every variant keeps at least): sharing alone (calibrated)."""
GOAL_DELTAS = (0.25, 0.95)
"""(budget, every variant keeps at least): sharing with compressed corrections (deltas)."""
MIN_GAIN = 0.05
"""A fine-tune that gains less than this over its base on its own held-out data (nats per
token for perplexity: ln(base / original); token accuracy: original - base) is "weak": its
retained gain is a ratio of two differences of that size, mostly measurement noise, so it
is listed but left out of the statistics (fixed before any family was measured)."""


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) of `values` by linear interpolation between the sorted
    values at positions 0 .. n-1 (numpy's default): position (n - 1) q."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class Row:
    """One method at one budget, over every fine-tuned variant of every family."""

    method: str
    budget: float | None
    variants: int
    """Variants with a figure."""
    missing: list[str] = field(default_factory=list)
    """Variants without one: the method made no artifact at this budget (e.g. below its floor)."""
    undefined: list[str] = field(default_factory=list)
    """Variants whose fine-tune has no gain to keep (original == base): left out."""
    weak: list[str] = field(default_factory=list)
    """Variants whose fine-tune gained less than MIN_GAIN (`weak_variants`): left out."""
    worst: float = math.nan
    worst_of: str = ""
    p10: float = math.nan
    median: float = math.nan
    mean: float = math.nan
    memory: float = math.nan
    """Mean expert memory (bank + delta bytes / all models' expert bytes) over the families."""
    below_reference: list[tuple[str, float, float]] | None = None
    """(variant, its gain, the reference's) for every variant more than MARGIN below the
    reference at the same budget; None for the reference itself and the merging baselines."""
    reference_mean: float = math.nan
    """The reference's mean over the same variants (those both methods have a figure for)."""
    own_mean_vs_reference: float = math.nan
    """This method's mean over those same variants."""
    gains: dict[str, float] = field(default_factory=dict, repr=False)
    """Every variant's figure (those with one)."""


def variant_gains(families: list[dict]) -> dict[tuple[str, float | None], dict[str, float | None]]:
    """{(method, budget): {"FAMILY/ARCH/VARIANT": retained gain, None without an artifact,
    NaN when undefined}} over the fine-tuned variants (the base has no gain) of every family."""
    out: dict[tuple[str, float | None], dict[str, float | None]] = {}
    for f in families:
        sweep = f["sweep"]
        fine_tuned = [n for n in sweep["original"] if n != "base"]
        for p in sweep["points"]:
            cell = out.setdefault((p["method"], p["budget"]), {})
            for n in fine_tuned:
                label = f"{f['family']}/{f['arch']}/{n}"
                if p.get("error"):
                    cell[label] = None
                else:
                    g = p["retained_gain"].get(n)
                    cell[label] = math.nan if g is None else g
    return out


def fine_tune_gain(sweep: dict, name: str) -> float:
    """What variant `name`'s fine-tune gained over the base on its own held-out data: nats per
    token (ln(base / original) perplexity) or token accuracy (original - base)."""
    base, original = sweep["base"][name], sweep["original"][name]
    if sweep["metric"] == "perplexity":
        return math.log(base / original)
    return original - base


def weak_variants(families: list[dict]) -> dict[str, float]:
    """{"FAMILY/ARCH/VARIANT": its gain} for every fine-tune that gained less than MIN_GAIN."""
    out = {}
    for f in families:
        sweep = f["sweep"]
        for n in sweep["original"]:
            if n != "base" and fine_tune_gain(sweep, n) < MIN_GAIN:
                out[f"{f['family']}/{f['arch']}/{n}"] = fine_tune_gain(sweep, n)
    return out


def memories(families: list[dict]) -> dict[tuple[str, float | None], float]:
    """Mean expert memory per (method, budget) over the families that made an artifact."""
    seen: dict[tuple[str, float | None], list[float]] = {}
    for f in families:
        for p in f["sweep"]["points"]:
            if not p.get("error") and p.get("expert_fraction") is not None:
                seen.setdefault((p["method"], p["budget"]), []).append(p["expert_fraction"])
    return {k: sum(v) / len(v) for k, v in seen.items()}


def rows(families: list[dict]) -> list[Row]:
    """Every (method, budget) the families were swept at, budgets highest first, then methods
    in METHODS order; the merging baselines (no budget) last."""
    gains, memory, weak = variant_gains(families), memories(families), weak_variants(families)
    keys = sorted(
        gains,
        key=lambda k: (k[1] is None, -(k[1] or 0.0), METHODS.index(k[0]) if k[0] in METHODS else len(METHODS), k[0]),
    )
    out = []
    for method, budget in keys:
        cell = {n: g for n, g in gains[(method, budget)].items() if n not in weak}
        known = {n: g for n, g in cell.items() if g is not None and not math.isnan(g)}
        row = Row(
            method,
            budget,
            len(known),
            missing=sorted(n for n, g in cell.items() if g is None),
            undefined=sorted(n for n, g in cell.items() if g is not None and math.isnan(g)),
            weak=sorted(n for n in gains[(method, budget)] if n in weak),
            memory=memory.get((method, budget), math.nan),
            gains=known,
        )
        if known:
            row.worst_of = min(known, key=lambda n: (known[n], n))
            row.worst = known[row.worst_of]
            values = list(known.values())
            row.p10, row.median, row.mean = percentile(values, 0.1), statistics.median(values), statistics.fmean(values)
        reference = gains.get((REFERENCE, budget))  # weak variants are not in `known`
        if budget is not None and method != REFERENCE and reference is not None:
            both = [n for n in known if reference.get(n) is not None and not math.isnan(reference[n])]
            row.below_reference = [(n, known[n], reference[n]) for n in both if _below(known[n], reference[n])]
            row.below_reference.sort(key=lambda t: t[1] - t[2])
            if both:
                row.reference_mean = statistics.fmean(reference[n] for n in both)
                row.own_mean_vs_reference = statistics.fmean(known[n] for n in both)
        out.append(row)
    return out


def _below(gain: float, reference: float) -> bool:
    """More than MARGIN below the reference (exactly MARGIN is not: a tolerance of 1e-9 keeps
    0.7 vs 0.8 from counting through rounding)."""
    return gain < reference - MARGIN - 1e-9


def _find(table: list[Row], method: str, budget: float | None) -> Row | None:
    return next((r for r in table if r.method == method and r.budget == budget), None)


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.0%}"


def goals(table: list[Row]) -> list[tuple[str, bool | None, str]]:
    """The goals on the report families, worst variant first: (goal, met (None: not run), why)."""
    out: list[tuple[str, bool | None, str]] = []

    def keeps(method: str, budget: float, keep: float, what: str) -> None:
        goal = f"{what} at {budget:g}: every variant >= {keep:.0%}"
        r = _find(table, method, budget)
        if r is None:
            out.append((goal, None, f"{method} at {budget:g} not run"))
            return
        short = [n for n, g in r.gains.items() if g < keep]
        met = not short and not r.missing and r.variants > 0
        why = f"worst {_pct(r.worst)} ({r.worst_of}); {r.variants - len(short)} of {r.variants} variants >= {keep:.0%}"
        if r.missing:
            why += f"; {len(r.missing)} without an artifact ({', '.join(r.missing)})"
        out.append((goal, met, why))

    keeps(OWN, *GOAL_SHARING, "sharing alone (calibrated)")
    budgets = [r.budget for r in table if r.method == OWN and r.budget is not None]
    own = [r for b in budgets if (r := _find(table, OWN, b)) is not None and r.below_reference is not None]
    if own:
        below = [(r.budget, t) for r in own for t in r.below_reference]
        why = "; ".join(
            f"{r.budget:g}: {len(r.below_reference)}"
            + (
                f" (worst {r.below_reference[0][0]} {_pct(r.below_reference[0][1])} vs {_pct(r.below_reference[0][2])})"
                if r.below_reference
                else ""
            )
            for r in own
        )
        out.append(
            (
                f"calibrated at every budget: no variant more than {MARGIN * 100:.0f} points below the reference",
                not below,
                "variants below, per budget: " + why,
            )
        )
        means = [(r.budget, r.own_mean_vs_reference, r.reference_mean) for r in own]
        out.append(
            (
                "calibrated at every budget: mean >= the reference's",
                all(m >= ref for _, m, ref in means),
                "; ".join(f"{b:g}: {_pct(m)} vs {_pct(ref)}" for b, m, ref in means),
            )
        )
    keeps(DELTAS, *GOAL_DELTAS, "with deltas")
    return out


def summarize(families: list[dict]) -> tuple[list[Row], list[tuple[str, bool | None, str]]]:
    """The table and the goals of these families."""
    table = rows(families)
    return table, goals(table)


# -- rendering ------------------------------------------------------------------------------------


def _budget(b: float | None) -> str:
    return "-" if b is None else f"{b:g}"


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in body]


def stats_table(table: list[Row]) -> list[str]:
    """Per budget (highest first) and method: the worst variant first, then p10, median, mean,
    and how many variants keep more than MARGIN less than under the reference."""
    body = []
    for r in table:
        left_out = [f"{len(r.missing)} no artifact"] if r.missing else []
        left_out += [f"{len(r.weak)} weak"] if r.weak else []
        count = str(r.variants) + (f" (+{', '.join(left_out)})" if left_out else "")
        if r.below_reference is None:
            below = ""
        else:
            below = f"{len(r.below_reference)} of {r.variants}"
            if r.below_reference:
                n, g, ref = r.below_reference[0]
                below += f" (most: {n} {_pct(g)} vs {_pct(ref)})"
        worst = f"**{_pct(r.worst)}** ({r.worst_of})" if r.variants else "n/a"
        body.append(
            [
                _budget(r.budget),
                r.method,
                _pct(r.memory),
                count,
                worst,
                _pct(r.p10),
                _pct(r.median),
                _pct(r.mean),
                below,
            ]
        )
    header = [
        "budget",
        "method",
        "expert memory",
        "variants",
        "worst variant",
        "p10",
        "median",
        "mean",
        f"> {MARGIN * 100:.0f} points below reference",
    ]
    return _table(header, body)


def goal_lines(goals_: list[tuple[str, bool | None, str]]) -> list[str]:
    """One bullet per goal: met, MISSED or not run, and why."""
    verdict = {True: "met", False: "**MISSED**", None: "not run"}
    return [f"- {goal}: {verdict[met]} ({why})" for goal, met, why in goals_]


def shape(spec: dict) -> str:
    """A family's model shape from its spec: hidden size, MoE layers x experts."""
    s = spec["size"]
    # Switch: `layers` blocks per stack, every second sparse: as many MoE layers as Mixtral's `layers`
    return f"h{s['hidden']}, {s['layers']} MoE layers x {s['experts']} experts"


def family_table(families: list[dict], methods: tuple[str, ...] = (OWN, REFERENCE, DELTAS)) -> list[str]:
    """Per family: recipe, shape, its fine-tunes (what each trained, and what it gained over the
    base on its own held-out data, `fine_tune_gain`; "weak" below MIN_GAIN) and the worst
    variant's retained gain per budget for `methods` (weak variants left out)."""
    budgets = sorted(
        {p["budget"] for f in families for p in f["sweep"]["points"] if p["budget"] is not None}, reverse=True
    )
    body = []
    for f in families:
        sweep, spec = f["sweep"], f["spec"]
        experts = spec["size"]["experts"]
        trains = {
            v["name"]: v["trainable"] + ("" if v["experts"] is None else f" {len(v['experts'])}/{experts}")
            for v in spec["variants"]
        }
        fine_tuned = [n for n in sweep["original"] if n != "base"]
        gained = {n: fine_tune_gain(sweep, n) for n in fine_tuned}
        strong = [n for n in fine_tuned if gained[n] >= MIN_GAIN]
        described = ", ".join(
            f"{n} ({trains.get(n, '?')}; {gained[n]:+.2f}{'' if gained[n] >= MIN_GAIN else ' weak'})"
            for n in fine_tuned
        )
        row = [f"{f['family']}/{f['arch']}", spec["recipe"], shape(spec), described]
        for method in methods:
            cells = []
            for b in budgets:
                p = next((p for p in sweep["points"] if p["method"] == method and p["budget"] == b), None)
                if p is None:
                    cells.append("-")
                elif p.get("error"):
                    cells.append("n/a")
                else:
                    gains = [p["retained_gain"][n] for n in strong if p["retained_gain"].get(n) is not None]
                    cells.append(_pct(min(gains)) if gains else "n/a")
            row.append(" / ".join(cells))
        body.append(row)
    header = [
        "family",
        "recipe",
        "shape",
        "fine-tunes (what they trained; gain over the base)",
        *(f"{m} worst, {' / '.join(map(_budget, budgets))}" for m in methods),
    ]
    return _table(header, body)


PLOTTED = {OWN: "tab:blue", DELTAS: "tab:purple", REFERENCE: "tab:orange", BUDGET: "tab:green"}
"""Methods drawn as lines over the budgets; uniform averaging is a single point per panel."""


def plot(table: list[Row], path, title: str):
    """Budget on x, retained gain on y; one panel per statistic (worst, p10, median), one line
    per method, uniform averaging a point at its mean expert memory (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = (("worst", "worst variant"), ("p10", "10th percentile"), ("median", "median"))
    fig, axes = plt.subplots(1, len(stats), figsize=(4.2 * len(stats), 3.6), sharey=True)
    for ax, (stat, name) in zip(axes, stats):
        for method, colour in PLOTTED.items():
            pts = sorted(
                (r.budget, getattr(r, stat))
                for r in table
                if r.method == method and r.budget is not None and r.variants
            )
            if pts:
                ax.plot(
                    [b for b, _ in pts], [100 * max(v, -0.5) for _, v in pts], marker="o", color=colour, label=method
                )
        for r in table:
            if r.method == AVERAGE and r.variants:
                ax.scatter(
                    [r.memory],
                    [100 * max(getattr(r, stat), -0.5)],
                    marker="x",
                    color="black",
                    label=f"{AVERAGE} (its memory)",
                )
        ax.axhline(100, color="black", linestyle="--", linewidth=1)
        ax.axhline(90, color="gray", linestyle=":", linewidth=1)
        ax.set_ylim(-55, 110)
        ax.set_title(name)
        ax.set_xlabel("budget (fraction of all models' expert memory)")
        ax.invert_xaxis()
    axes[0].set_ylabel("retained gain (%; floored at -50)")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
