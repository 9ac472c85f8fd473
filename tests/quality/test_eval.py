"""moeconsol eval and sweep: scores against independent computations, exact lossless round trips, errors."""

from __future__ import annotations

import json
import math

import pytest
from cli_helpers import cli, one_error_line

from moeconsol.consolidate import MergeSettings, merge
from moeconsol.io.checkpoint import open_checkpoints
from moeconsol.quality.evaluate import EvalSettings, eval_artifact, sweep
from moeconsol.quality.metrics import perplexity, seq2seq_accuracy
from moeconsol.testing import SAMPLE_TEXT, derive_variant, save_model, tiny_mixtral, tiny_switch, tiny_tokenizer


@pytest.fixture(scope="module")
def mixtral_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("evm")
    tok = tiny_tokenizer()
    base = tiny_mixtral(seed=7)
    save_model(base, root / "base", tok)
    save_model(derive_variant(base, 1, [(0, 1), (1, 2)], scale=0.05), root / "a", tok)
    save_model(derive_variant(base, 2, [(0, 3)], scale=0.05), root / "b", tok, fused=True)
    (root / "a.txt").write_text(SAMPLE_TEXT)
    (root / "b.txt").write_text(SAMPLE_TEXT[::-1])
    merge(open_checkpoints([f"a={root / 'a'}", f"b={root / 'b'}"]), root / "lossless")
    return root


@pytest.fixture(scope="module")
def switch_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("evs")
    tok = tiny_tokenizer()
    base = tiny_switch(seed=8)
    save_model(base, root / "base", tok)
    save_model(derive_variant(base, 3, [(0, 1)], scale=0.05), root / "x", tok)
    save_model(derive_variant(base, 4, [(1, 2)], scale=0.05), root / "y", tok)
    lines = [
        {"input": "copy: fox dog", "target": "fox dog"},
        {"input": "upper: cat", "target": "CAT"},
        {"input": "a b", "target": "b a"},
    ]
    (root / "x.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (root / "y.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines[::-1]))
    merge(open_checkpoints([f"x={root / 'x'}", f"y={root / 'y'}"]), root / "lossless")
    return root


def test_eval_of_a_lossless_mixtral_artifact_equals_the_originals(mixtral_family):
    root = mixtral_family
    data = {"a": str(root / "a.txt"), "b": str(root / "b.txt")}
    r = eval_artifact(root / "lossless", data, base=str(root / "base"), settings=EvalSettings(chunk_len=16))
    from transformers import MixtralForCausalLM

    tok = tiny_tokenizer()
    for v in r.variants:
        assert v.metric == "perplexity" and v.lower_is_better
        assert v.consolidated == v.original  # bit-exact serving
        assert v.details["consolidated"]["nll"] == v.details["original"]["nll"]
        # the original's score against quality.perplexity on the checkpoint loaded here
        own = MixtralForCausalLM.from_pretrained(root / v.name).eval()
        assert v.original == perplexity(own, tok, (root / f"{v.name}.txt").read_text(), 16).perplexity
        base = MixtralForCausalLM.from_pretrained(root / "base").eval()
        assert v.base == perplexity(base, tok, (root / f"{v.name}.txt").read_text(), 16).perplexity
        assert v.retained_gain == pytest.approx(1.0)  # (base - original) / (base - original)


def test_eval_of_a_lossless_switch_artifact_equals_the_originals(switch_family):
    root = switch_family
    r = eval_artifact(root / "lossless", {"x": str(root / "x.jsonl"), "y": str(root / "y.jsonl")})
    from transformers import SwitchTransformersForConditionalGeneration

    for v in r.variants:
        assert v.metric == "token_accuracy" and not v.lower_is_better
        assert v.details["consolidated"] == v.details["original"]
        assert v.base is None and math.isnan(v.retained_gain)
        own = SwitchTransformersForConditionalGeneration.from_pretrained(root / v.name).eval()
        examples = [json.loads(x) for x in (root / f"{v.name}.jsonl").read_text().splitlines()]
        assert v.original == seq2seq_accuracy(own, tiny_tokenizer(), examples).token_accuracy


def test_eval_cli_json_and_retained_gain_of_a_lossy_artifact(mixtral_family, tmp_path):
    root = mixtral_family
    merge(open_checkpoints([f"a={root / 'a'}", f"b={root / 'b'}"]), tmp_path / "avg", MergeSettings(mode="average"))
    r = cli(
        "eval",
        tmp_path / "avg",
        "--data",
        f"a={root / 'a.txt'}",
        "--base",
        root / "base",
        "--chunk-len",
        "16",
        "--json",
        tmp_path / "e.json",
    )
    assert r.returncode == 0, r.stderr
    assert "retained gain" in r.stdout
    report = json.loads((tmp_path / "e.json").read_text())
    [v] = report["variants"]
    assert v["name"] == "a" and v["consolidated"] != v["original"]
    assert v["retained_gain"] == pytest.approx((v["base"] - v["consolidated"]) / (v["base"] - v["original"]))


def test_eval_json_is_strict_json_with_null_for_an_undefined_gain(mixtral_family, tmp_path):
    root = mixtral_family
    r = cli(
        "eval", root / "lossless", "--data", f"a={root / 'a.txt'}", "--chunk-len", "16", "--json", tmp_path / "e.json"
    )
    assert r.returncode == 0, r.stderr

    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    report = json.loads((tmp_path / "e.json").read_text(), parse_constant=refuse)
    [v] = report["variants"]
    assert v["base"] is None and v["retained_gain"] is None


@pytest.mark.parametrize(
    "content, fragments",
    [
        (None, ["no such file"]),
        ("", ["file is empty"]),
        ('{"input": "a"}\n', [':1: missing field "target"']),
        ('{"input": "a", "target": 3}\n', [':1: field "target" must be a string']),
    ],
)
def test_bad_data_files_exit_2_with_one_line(switch_family, tmp_path, content, fragments):
    path = tmp_path / "d.jsonl"
    if content is not None:
        path.write_text(content)
    one_error_line(cli("eval", switch_family / "lossless", "--data", f"x={path}"), str(path), *fragments)


def test_unknown_variant_in_data_exits_2(mixtral_family):
    root = mixtral_family
    one_error_line(cli("eval", root / "lossless", "--data", f"nope={root / 'a.txt'}"), "unknown variant 'nope'", "a, b")


@pytest.mark.slow
def test_sweep_cli_table_json_plot_and_cleanup(mixtral_family, tmp_path):
    root = mixtral_family
    out = tmp_path / "sweep"
    r = cli(
        "sweep",
        f"a={root / 'a'}",
        f"b={root / 'b'}",
        "--data",
        f"a={root / 'a.txt'}",
        "--data",
        f"b={root / 'b.txt'}",
        "--budgets",
        "1.0,0.5",
        "--base",
        root / "base",
        "--calibration",
        root / "a.txt",
        "--chunk-len",
        "16",
        "--method",
        "reference",
        "--method",
        "budget",
        "--method",
        "calibrated",
        "--method",
        "average",
        "-o",
        out,
    )
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "sweep.json").read_text())
    assert (out / "sweep.png").stat().st_size > 0
    assert sorted(p.name for p in out.iterdir()) == ["sweep.json", "sweep.png"]  # artifacts removed
    points = {(p["method"], p["budget"]): p for p in report["points"]}
    assert set(points) == {
        ("reference", 1.0),
        ("reference", 0.5),
        ("budget", 1.0),
        ("budget", 0.5),
        ("calibrated", 1.0),
        ("calibrated", 0.5),
        ("average", None),
    }
    # at budget 1.0 nothing lossy happens: every method serves the originals (up to the order in
    # which a token's top-k expert outputs are summed, which follows bank indices)
    for m in ("reference", "budget", "calibrated"):
        assert points[(m, 1.0)]["quality"] == pytest.approx(report["original"], rel=1e-6)
    for m in ("reference", "budget", "calibrated"):
        assert points[(m, 0.5)]["expert_fraction"] <= 0.5
    assert points[("average", None)]["expert_fraction"] == 0.5  # one model's worth of two
    assert "calibrated" in r.stdout and "average" in r.stdout


def test_sweep_library_refuses_calibrated_without_calibration(mixtral_family):
    from moeconsol.errors import MoeconsolError

    with pytest.raises(MoeconsolError, match="calibrated needs calibration"):
        sweep([f"a={mixtral_family / 'a'}"], {"a": str(mixtral_family / "a.txt")}, [1.0], methods=["calibrated"])
