"""benchmarks/quality.py --merge: a run's points go into the saved run, replacing the same
method and budget, and a run of another build is refused."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def q():
    spec = importlib.util.spec_from_file_location("quality_benchmark_merge", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(points, original=5.0, methods=("calibrated",), budgets=(0.5,)):
    return {"models": {"base": "b", "x": "x"}, "metric": "perplexity", "lower_is_better": True, "expert_bytes": 8,
            "original": {"base": 10.0, "x": original}, "base": {"base": 10.0, "x": 10.0},
            "points": [{"method": m, "budget": b, "gain": g} for m, b, g in points],
            "settings": {"methods": list(methods), "budgets": list(budgets)}}


def test_points_of_the_same_method_and_budget_are_replaced_in_place(q):
    saved = run([("reference", 0.5, 1), ("calibrated", 0.5, 2), ("calibrated", 0.3, 3)],
                methods=("reference", "calibrated"), budgets=(0.5, 0.3))
    new = run([("calibrated", 0.3, 30), ("calibrated", 0.25, 40)], budgets=(0.3, 0.25))
    merged = q.merge_runs(saved, new)
    assert [(p["method"], p["budget"], p["gain"]) for p in merged["points"]] == [
        ("reference", 0.5, 1), ("calibrated", 0.5, 2), ("calibrated", 0.3, 30), ("calibrated", 0.25, 40)]
    assert merged["settings"]["budgets"] == [0.5, 0.3, 0.25]
    assert merged["settings"]["methods"] == ["reference", "calibrated"]
    assert [p["gain"] for p in saved["points"]] == [1, 2, 3]  # the saved run itself is left as it was


def test_a_run_of_another_build_is_refused(q, capsys):
    with pytest.raises(SystemExit) as e:
        q.merge_runs(run([]), run([], original=4.0))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "original differs" in err[0]
