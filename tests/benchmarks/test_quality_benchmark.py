"""benchmarks/quality.py on several families: delta goals, methods known at run time, a
missing family refused with the command that builds it, a family read from family.json, and
--merge (a run's points go into the saved run, replacing the same method and budget; a run of
another build is refused)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def q():
    spec = importlib.util.spec_from_file_location("quality_benchmark_families", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def report(points):
    from moeconsol.quality.evaluate import SweepReport

    names = ["base", "x", "y"]
    return SweepReport(
        {n: n for n in names},
        "perplexity",
        True,
        1,
        {"base": 10.0, "x": 5.0, "y": 5.0},
        {n: 10.0 for n in names},
        points,
    )


def point(method, budget, gains, error=None):
    from moeconsol.quality.evaluate import SweepPoint

    quality = {"base": 10.0, **{n: 10.0 - 5.0 * g for n, g in gains.items()}}
    return SweepPoint(method, budget, None, None, budget, quality, {"base": math.nan, **gains}, {}, error)


def test_delta_goals_per_variant_and_absent_without_deltas(q):
    assert q.check_delta_goals(report([point("calibrated", 0.5, {"x": 1.0, "y": 1.0})])) == []
    lines = q.check_delta_goals(
        report([point("deltas", 0.5, {"x": 0.98, "y": 0.96}), point("deltas", 0.3, {"x": 0.91, "y": 0.90})])
    )
    assert lines == [
        "deltas at 0.3: every variant >= 90%: met",
        "deltas at 0.5: every variant >= 97%: missed (y 96.0%)",
    ]
    failed = q.check_delta_goals(report([point("deltas", 0.3, {}, error="budget cannot be met")]))
    assert failed == ["deltas at 0.3: missed, no artifact (budget cannot be met)", "deltas at 0.5: not run"]


def test_deltas_is_swept_only_when_evaluate_knows_it(q, monkeypatch):
    from moeconsol.quality import evaluate

    monkeypatch.setattr(evaluate, "BUDGET_METHODS", tuple(m for m in evaluate.BUDGET_METHODS if m != "deltas"))
    assert "deltas" not in q.methods_known()
    monkeypatch.setattr(evaluate, "BUDGET_METHODS", (*evaluate.BUDGET_METHODS, "deltas"))
    methods = q.methods_known()
    assert methods[:4] == ["reference", "budget", "calibrated", "deltas"] and "average" in methods


def test_models_and_files_come_from_family_json(q, tmp_path):
    models = [
        {"family": "mixtral", "name": n, "path": f"/m/{n}", "data": d, "eval_file": f"/e/{d}.txt"}
        for n, d in [("chat", "dialogue"), ("base", "mixed")]
    ]
    models.append(
        {
            "family": "switch",
            "name": "base",
            "path": "/s",
            "data": "mixed",
            "eval_file": "/e.jsonl",
            "train_file": "/t.jsonl",
        }
    )
    (tmp_path / "family.json").write_text(json.dumps({"models": models}))
    got = q.family_models(tmp_path, "mixtral")
    assert [m["name"] for m in got] == ["base", "chat"]  # base first
    assert got[1]["train_file"] == str(tmp_path / "data" / "train" / "mixtral-dialogue.txt")
    assert q.family_models(tmp_path, "switch")[0]["train_file"] == "/t.jsonl"
    assert q.parse_family("f2=/x/y") == ("f2", Path("/x/y")) and q.parse_family("/x/fam") == ("fam", Path("/x/fam"))


def test_a_missing_second_family_is_refused_with_its_build_command(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "quality.py"),
            "--family",
            f"family2={tmp_path}",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    assert f"python examples/build_family2.py --out {tmp_path}" in proc.stderr


# -- --merge -------------------------------------------------------------------------------------


def saved_run(points, original=5.0, methods=("calibrated",), budgets=(0.5,)):
    return {
        "models": {"base": "b", "x": "x"},
        "metric": "perplexity",
        "lower_is_better": True,
        "expert_bytes": 8,
        "original": {"base": 10.0, "x": original},
        "base": {"base": 10.0, "x": 10.0},
        "points": [{"method": m, "budget": b, "gain": g} for m, b, g in points],
        "settings": {"methods": list(methods), "budgets": list(budgets)},
    }


def test_points_of_the_same_method_and_budget_are_replaced_in_place(q):
    saved = saved_run(
        [("reference", 0.5, 1), ("calibrated", 0.5, 2), ("calibrated", 0.3, 3)],
        methods=("reference", "calibrated"),
        budgets=(0.5, 0.3),
    )
    new = saved_run([("calibrated", 0.3, 30), ("calibrated", 0.25, 40)], budgets=(0.3, 0.25))
    merged = q.merge_runs(saved, new)
    assert [(p["method"], p["budget"], p["gain"]) for p in merged["points"]] == [
        ("reference", 0.5, 1),
        ("calibrated", 0.5, 2),
        ("calibrated", 0.3, 30),
        ("calibrated", 0.25, 40),
    ]
    assert merged["settings"]["budgets"] == [0.5, 0.3, 0.25]
    assert merged["settings"]["methods"] == ["reference", "calibrated"]
    assert [p["gain"] for p in saved["points"]] == [1, 2, 3]  # the saved run itself is left as it was


def test_a_run_of_another_build_is_refused(q, capsys):
    with pytest.raises(SystemExit) as e:
        q.merge_runs(saved_run([]), saved_run([], original=4.0))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "original differs" in err[0]


def test_merged_points_are_ordered_by_method_then_budget_highest_first(q):
    saved = saved_run([("reference", 0.5, 1), ("calibrated", 0.5, 2), ("average", None, 3)])
    new = saved_run([("calibrated", 1.0, 4), ("reference", 0.75, 5)])
    merged = q.merge_runs(saved, new)
    assert [(p["method"], p["budget"]) for p in merged["points"]] == [
        ("reference", 0.75),
        ("reference", 0.5),
        ("calibrated", 1.0),
        ("calibrated", 0.5),
        ("average", None),
    ]
