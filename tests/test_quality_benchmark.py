"""benchmarks/quality.py on several families: delta goals, methods known at run time, a
missing family refused with the command that builds it, and a family read from family.json."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def q():
    spec = importlib.util.spec_from_file_location("quality_benchmark_families", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def report(points):
    from moeconsol.evaluate import SweepReport

    names = ["base", "x", "y"]
    return SweepReport({n: n for n in names}, "perplexity", True, 1, {"base": 10.0, "x": 5.0, "y": 5.0},
                       {n: 10.0 for n in names}, points)


def point(method, budget, gains, error=None):
    from moeconsol.evaluate import SweepPoint

    quality = {"base": 10.0, **{n: 10.0 - 5.0 * g for n, g in gains.items()}}
    return SweepPoint(method, budget, None, None, budget, quality, {"base": math.nan, **gains}, {}, error)


def test_delta_goals_per_variant_and_absent_without_deltas(q):
    assert q.check_delta_goals(report([point("calibrated", 0.5, {"x": 1.0, "y": 1.0})])) == []
    lines = q.check_delta_goals(report([point("deltas", 0.5, {"x": 0.98, "y": 0.96}),
                                        point("deltas", 0.3, {"x": 0.91, "y": 0.90})]))
    assert lines == ["deltas at 0.3: every variant >= 90%: met", "deltas at 0.5: every variant >= 97%: missed (y 96.0%)"]
    failed = q.check_delta_goals(report([point("deltas", 0.3, {}, error="budget cannot be met")]))
    assert failed == ["deltas at 0.3: missed, no artifact (budget cannot be met)", "deltas at 0.5: not run"]


def test_deltas_is_swept_only_when_evaluate_knows_it(q, monkeypatch):
    from moeconsol import evaluate

    monkeypatch.setattr(evaluate, "BUDGET_METHODS", tuple(m for m in evaluate.BUDGET_METHODS if m != "deltas"))
    assert "deltas" not in q.methods_known()
    monkeypatch.setattr(evaluate, "BUDGET_METHODS", (*evaluate.BUDGET_METHODS, "deltas"))
    methods = q.methods_known()
    assert methods[:4] == ["reference", "budget", "calibrated", "deltas"] and "average" in methods


def test_models_and_files_come_from_family_json(q, tmp_path):
    models = [{"family": "mixtral", "name": n, "path": f"/m/{n}", "data": d, "eval_file": f"/e/{d}.txt"}
              for n, d in [("chat", "dialogue"), ("base", "mixed")]]
    models.append({"family": "switch", "name": "base", "path": "/s", "data": "mixed", "eval_file": "/e.jsonl",
                   "train_file": "/t.jsonl"})
    (tmp_path / "family.json").write_text(json.dumps({"models": models}))
    got = q.family_models(tmp_path, "mixtral")
    assert [m["name"] for m in got] == ["base", "chat"]  # base first
    assert got[1]["train_file"] == str(tmp_path / "data" / "train" / "mixtral-dialogue.txt")
    assert q.family_models(tmp_path, "switch")[0]["train_file"] == "/t.jsonl"
    assert q.parse_family("f2=/x/y") == ("f2", Path("/x/y")) and q.parse_family("/x/fam") == ("fam", Path("/x/fam"))


def test_a_missing_second_family_is_refused_with_its_build_command(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--family", f"family2={tmp_path}",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    assert f"python examples/build_family2.py --out {tmp_path}" in proc.stderr
