"""benchmarks/turnaround.py's static partition: the hard CPU share it asks of a cgroup (v1 and
v2 files, the quota for cores/N), the one-line refusal where no cgroup can be written, and
the --systems names (one of them holds a comma)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def t():
    spec = importlib.util.spec_from_file_location("turnaround_benchmark", ROOT / "benchmarks" / "turnaround.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being made
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_quota_group_holds_a_process_to_its_share(t, tmp_path, monkeypatch, version):
    v2, v1 = tmp_path / "unified", tmp_path / "cpu"
    v2.mkdir(), v1.mkdir()
    if version == "v2":
        (v2 / "cgroup.controllers").write_text("cpuset cpu io memory\n")
    monkeypatch.setattr(t, "CGROUP_V2", v2)
    monkeypatch.setattr(t, "CGROUP_V1_CPU", v1)
    group = t.cpu_quota_group("slice-0", 2 / 4, 4242)  # 4 variants on 2 cores: half a CPU each
    assert group.parent == (v2 if version == "v2" else v1)
    if version == "v2":
        assert (group / "cpu.max").read_text() == "50000 100000"
    else:
        assert (group / "cpu.cfs_period_us").read_text() == "100000"
        assert (group / "cpu.cfs_quota_us").read_text() == "50000"
    assert (group / "cgroup.procs").read_text() == "4242"


def test_quota_refused_in_one_line_without_a_writable_cgroup(t, tmp_path, monkeypatch):
    monkeypatch.setattr(t, "CGROUP_V2", tmp_path / "none")
    monkeypatch.setattr(t, "CGROUP_V1_CPU", tmp_path / "missing" / "cpu")
    with pytest.raises(SystemExit) as e:
        t.cpu_quota_group("slice-0", 1.0, 4242)
    message = str(e.value)
    assert "\n" not in message and "--partition pinned" in message


def test_systems_names(t):
    assert t._systems("static partition,moeconsol, one step for all variants") == [t.CROSS_VARIANT, "static partition"]
    assert t._systems("moeconsol") == ["moeconsol"]
    with pytest.raises(SystemExit, match="unknown system"):
        t._systems("moeconsol,mig")


def test_goal_lines_judge_the_highest_rate(t):
    def row(system, rate, mean):
        return {"system": system, "popularity": "uniform", "rate": rate, "mean_turnaround": mean}

    rows = [
        row("moeconsol", 2.0, 1.0),
        row("static partition", 2.0, 1.0),
        row("all resident", 2.0, 1.0),  # a lower rate: not judged
        row("moeconsol", 8.0, 0.1),
        row(t.CROSS_VARIANT, 8.0, 0.5),
        row("static partition", 8.0, 1.0),
        row("all resident", 8.0, 0.2),
    ]
    assert t.goal_lines(rows) == [
        "uniform 8/s, moeconsol: mean turnaround 90% lower than the static partition's (goal >= 85% lower: met); "
        "0.50x all resident (goal <= 1.25x: met)",
        f"uniform 8/s, {t.CROSS_VARIANT}: mean turnaround 50% lower than the static partition's (goal >= 85% lower: not met); "
        "2.50x all resident (goal <= 1.25x: not met)",
    ]


def test_goal_lines_say_higher_when_slower(t):
    rows = [
        {"system": s, "popularity": "skewed", "rate": 4.0, "mean_turnaround": m}
        for s, m in (("moeconsol", 1.5), ("static partition", 1.0))
    ]
    assert t.goal_lines(rows) == [
        "skewed 4/s, moeconsol: mean turnaround 50% higher than the static partition's (goal >= 85% lower: not met)"
    ]
