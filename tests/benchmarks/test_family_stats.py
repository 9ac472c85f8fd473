"""benchmarks/family_stats.py on a hand-made input: the worst variant, the 10th percentile, the
median and the mean over every variant of every family; variants more than 10 points below
the reference; a budget with no artifact; a variant with no gain to keep; the goals."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fs():
    spec = importlib.util.spec_from_file_location("family_stats", ROOT / "benchmarks" / "family_stats.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["family_stats"] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


def family(name: str, arch: str, points: dict, variants: list[str]) -> dict:
    """A saved family whose sweep has `points`: {(method, budget): {variant: gain} or an error string}."""
    sweep_points = []
    for (method, budget), gains in points.items():
        if isinstance(gains, str):
            sweep_points.append(
                {"method": method, "budget": budget, "expert_fraction": None, "retained_gain": {}, "error": gains}
            )
        else:
            sweep_points.append(
                {
                    "method": method,
                    "budget": budget,
                    "expert_fraction": budget or 0.25,
                    "retained_gain": {"base": None, **gains},
                    "error": None,
                }
            )
    # perplexity 1.0 -> 0.5 (ln 2 = 0.69 nats gained) for every variant, but weak ones: 1.0 -> 0.98
    original = {v: 0.98 if v in WEAK else 0.5 for v in variants}
    sweep = {
        "metric": "perplexity",
        "original": {"base": 1.0, **original},
        "base": {"base": 1.0, **{v: 1.0 for v in variants}},
    }
    sweep["points"] = sweep_points
    spec = {
        "arch": arch,
        "recipe": "full",
        "size": {"hidden": 32, "layers": 2, "experts": 4},
        "variants": [{"name": v, "trainable": "all", "experts": None} for v in variants],
    }
    return {"family": name, "arch": arch, "seed": 0, "recipe": "full", "spec": spec, "sweep": sweep}


WEAK = {"b7"}
"""Gained ln(1 / 0.98) = 0.02 nats (< MIN_GAIN = 0.05): left out of every figure, whatever it keeps."""

# Eleven variants over two families, and the weak one. At 0.5, calibrated's figures sorted:
# 0.10 0.50 0.60 0.70 0.80 0.90 0.95 1.00 1.00 1.00 1.02
A = ["a1", "a2", "a3", "a4", "a5"]
B = ["b1", "b2", "b3", "b4", "b5", "b6", "b7"]
OWN_05 = {"a1": 0.9, "a2": 0.1, "a3": 1.0, "a4": 0.6, "a5": 1.02, "b1": 0.95, "b2": 0.5, "b3": 1.0, "b4": 0.7}
OWN_05 |= {"b5": 0.8, "b6": 1.0, "b7": -3.0}
REF_05 = {n: 0.75 for n in A + B} | {"a2": 0.2, "b2": 0.61, "b4": 0.8, "b7": 1.0}
# a2: 10 points below the reference exactly (not more); b2: 11 below; b4: 10 below; a4: 15 below


def families():
    fa = family(
        "seed-2",
        "mixtral",
        {
            ("calibrated", 0.5): {n: OWN_05[n] for n in A},
            ("reference", 0.5): {n: REF_05[n] for n in A},
            ("deltas", 0.25): {n: 0.97 for n in A},
            ("calibrated", 0.25): {n: 0.5 for n in A},
            ("average", None): {n: 0.3 for n in A},
        },
        A,
    )
    fb = family(
        "seed-3",
        "switch",
        {
            ("calibrated", 0.5): {n: OWN_05[n] for n in B},
            ("reference", 0.5): {n: REF_05[n] for n in B},
            ("deltas", 0.25): "budget too small: the bank needs at least one model's worth",
            ("calibrated", 0.25): {n: (math.nan if n == "b1" else 0.4) for n in B},
            ("average", None): {n: 0.1 for n in B},
        },
        B,
    )
    fb["sweep"]["points"][3]["retained_gain"]["b1"] = None  # as saved: NaN (no gain to keep) is null
    return [fa, fb]


def test_percentile_interpolates_between_sorted_values(fs):
    assert fs.percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert fs.percentile([0.0, 10.0], 0.1) == pytest.approx(1.0)
    assert fs.percentile([5.0], 0.1) == 5.0
    assert math.isnan(fs.percentile([], 0.1))
    xs = [0.1, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0, 1.0, 1.0, 1.02]
    # position (11 - 1) x 0.1 = 1: the second smallest exactly
    assert fs.percentile(xs, 0.1) == 0.5
    assert fs.percentile(xs[:10], 0.1) == pytest.approx(0.1 + 0.9 * (0.5 - 0.1))


def test_rows_over_every_variant_of_every_family(fs):
    table = fs.rows(families())
    assert [(r.method, r.budget) for r in table] == [
        ("calibrated", 0.5),
        ("reference", 0.5),
        ("calibrated", 0.25),
        ("deltas", 0.25),
        ("average", None),
    ]
    own = table[0]
    assert own.variants == 11 and not own.missing and not own.undefined and own.weak == ["seed-3/switch/b7"]
    assert (own.worst, own.worst_of) == (0.1, "seed-2/mixtral/a2")
    assert own.p10 == 0.5
    assert own.median == 0.9
    assert own.mean == pytest.approx((sum(OWN_05.values()) + 3.0) / 11)
    # more than 10 points below the reference: a4 (0.60 vs 0.75) and b2 (0.50 vs 0.61); not a2, b4
    assert [(n, g, r) for n, g, r in own.below_reference] == [
        ("seed-2/mixtral/a4", 0.6, 0.75),
        ("seed-3/switch/b2", 0.5, 0.61),
    ]
    assert own.reference_mean == pytest.approx((sum(REF_05.values()) - 1.0) / 11)
    assert own.own_mean_vs_reference == pytest.approx(own.mean)
    assert table[1].below_reference is None  # the reference is not compared with itself
    floor = table[2]
    assert floor.variants == 10 and floor.undefined == ["seed-3/switch/b1"] and floor.worst == 0.4
    assert floor.below_reference is None  # no reference at 0.25: nothing to compare with
    deltas = table[3]
    assert deltas.variants == 5 and deltas.missing == [f"seed-3/switch/{n}" for n in B if n not in WEAK]
    assert table[4].memory == 0.25 and table[4].worst == 0.1


def test_goals_name_the_worst_variant_and_what_is_missing(fs):
    _, goals = fs.summarize(families())
    assert [(g, met) for g, met, _ in goals] == [
        ("sharing alone (calibrated) at 0.5: every variant >= 90%", False),
        ("calibrated at every budget: no variant more than 10 points below the reference", False),
        ("calibrated at every budget: mean >= the reference's", True),
        ("with deltas at 0.25: every variant >= 95%", False),
    ]
    why = [w for _, _, w in goals]
    assert why[0].startswith("worst 10% (seed-2/mixtral/a2); 6 of 11 variants >= 90%")
    assert "0.5: 2 (worst seed-2/mixtral/a4 60% vs 75%)" in why[1]
    assert why[2] == "0.5: 78% vs 69%"
    assert "6 without an artifact" in why[3] and why[3].startswith("worst 97% (seed-2/mixtral/a1); 5 of 5")


def test_tables_render_the_goals_and_the_worst_first(fs):
    table, goals = fs.summarize(families())
    lines = fs.stats_table(table)
    assert lines[0].startswith("| budget | method | expert memory | variants | worst variant | p10 | median | mean |")
    assert lines[2] == (
        "| 0.5 | calibrated | 50% | 11 (+1 weak) | **10%** (seed-2/mixtral/a2) | 50% | 90% | 78% "
        "| 2 of 11 (most: seed-2/mixtral/a4 60% vs 75%) |"
    )
    assert "| 0.25 | deltas | 25% | 5 (+6 no artifact, 1 weak) |" in "\n".join(lines)
    assert "| 0.5 | calibrated | 50% | 11 (+1 weak) |" in lines[2]
    assert fs.goal_lines(goals)[0].startswith("- sharing alone (calibrated) at 0.5: every variant >= 90%: **MISSED**")
    per_family = fs.family_table(families())
    assert per_family[2].startswith("| seed-2/mixtral | full | h32, 2 MoE layers x 4 experts | a1 (all; +0.69), a2")
    assert "b6 (all; +0.69), b7 (all; +0.02 weak) |" in per_family[3]
    assert per_family[2].endswith("| 10% / 50% | 20% / - | - / 97% |")
    assert per_family[3].endswith("| 50% / 40% | 61% / - | - / n/a |")


def test_the_plot_is_written(fs, tmp_path):
    table, _ = fs.summarize(families())
    assert fs.plot(table, tmp_path / "p.png", "t").stat().st_size > 1000


def test_families_need_a_report_seed(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--families", "2", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--families 2 leaves no report family" in proc.stderr


def test_the_saved_families_are_reported_and_tabled(tmp_path):
    """quality.py's report and tables.py's summary read the files quality.py --families saves."""
    import json

    fa, fb = families()
    budget = {"method": "budget", "budget": 0.5, "expert_fraction": 0.5, "error": None}
    fa["sweep"]["points"].append({**budget, "retained_gain": {"base": None, **{n: 0.8 for n in A}}})
    for arch, fam, seed in (("mixtral", fa, 2), ("switch", fb, 3)):
        run = {"split": "report", "arch": arch, "seeds": [seed], "settings": {"size": "small"}, "cpus": 2}
        (tmp_path / f"quality-families-report-{arch}.json").write_text(json.dumps({**run, "families": [fam]}))
    spec = importlib.util.spec_from_file_location("quality_benchmark_report", ROOT / "benchmarks" / "quality.py")
    q = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(q)
    text = q.families_report(tmp_path, "report")
    assert text.startswith("### Over many generated families (report families: seeds 2, 3; 2 families, 12 fine-tuned")
    assert text == (tmp_path / "quality-families.md").read_text() and (tmp_path / "quality-families.png").is_file()
    assert "| 0.5 | calibrated | 50% | 11 (+1 weak) | **10%** (seed-2/mixtral/a2) |" in text
    assert q.families_report(tmp_path, "tuning") is None
    lines = q.tables.quality_families(tmp_path)
    assert lines[0].startswith("Report families: seeds 2, 3 of each architecture (1 mixtral, 1 switch; size small), 12")
    assert lines[2].startswith("- sharing alone (calibrated) at 0.5: every variant >= 90%: **MISSED** (worst 10%")
    assert lines[-1].startswith("| - | average | 25% | 11 (+1 weak) | **10%** (seed-3/switch/b1) |")
    # every method swept is tabled, budget mode included
    assert "| 0.5 | budget | 50% | 5 | **80%** (seed-2/mixtral/a1) | 80% | 80% | 80% | 0 of 5 |" in lines
