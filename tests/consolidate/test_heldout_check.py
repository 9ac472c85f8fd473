"""merge --mode calibrated checks its plan by measurement on held-back calibration data.

The split is checked against its stated rule; the planner's blindness to the held-back part by
planning on files that differ only there; the figures against the artifact as the runtime
serves it (`quality.metrics.perplexity` on the held-back text, independent of the check's own
scoring); the choice against the max-min rule recomputed here from the figures.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace

import pytest
import torch
from builders import correction_family, domain_text, fine_tune
from cli_helpers import one_error_line, run_main
from transformers import MixtralForCausalLM

from moeconsol.analysis.heldout import CalibrationData, read_calibration, split_calibration
from moeconsol.artifact.manifest import MANIFEST, HeldoutCheck, HeldoutVariant, Manifest
from moeconsol.artifact.reader import Artifact
from moeconsol.consolidate import MergeSettings, merge
from moeconsol.consolidate.choice import admissible, choose, worst
from moeconsol.consolidate.planners.calibrated import calibrated_inputs, own_plans, plan_calibrated
from moeconsol.errors import SettingsError
from moeconsol.io.checkpoint import open_checkpoints
from moeconsol.quality.metrics import perplexity
from moeconsol.serving.runtime import Runtime
from moeconsol.testing import SAMPLE_TEXT, derive_variant, save_model, tiny_mixtral, tiny_tokenizer

# ---------------------------------------------------------------- the split


@pytest.mark.parametrize("n", [5, 10, 11, 99, 1000])
def test_text_split_keeps_the_first_80_percent_for_planning(n):
    text = "".join(chr(ord("a") + i % 26) for i in range(n))
    plan, held = split_calibration(CalibrationData("t.txt", text=text), 0.2)
    assert plan.text + held.text == text
    assert len(plan.text) == (n * 8) // 10  # floor(n * 0.8), computed in integers
    assert split_calibration(CalibrationData("t.txt", text=text), 0.2) == (plan, held)  # deterministic


@pytest.mark.parametrize("n,planned", [(2, 1), (5, 4), (9, 7), (10, 8), (301, 240)])
def test_jsonl_split_keeps_the_first_examples_for_planning(n, planned):
    examples = [{"input": f"in {i}", "target": f"out {i}"} for i in range(n)]
    plan, held = split_calibration(CalibrationData("d.jsonl", examples=examples), 0.2)
    assert plan.examples == examples[:planned] and held.examples == examples[planned:]


def test_holdout_0_keeps_everything_for_planning():
    data = CalibrationData("t.txt", text="some text")
    assert split_calibration(data, 0.0) == (data, None)


def test_too_little_data_to_split_is_refused_naming_the_file():
    with pytest.raises(SettingsError, match=r"one\.jsonl: 1 example.*holdout 0"):
        split_calibration(CalibrationData("one.jsonl", examples=[{"input": "a", "target": "b"}]), 0.2)
    with pytest.raises(SettingsError, match=r"t\.txt: too little text"):
        split_calibration(CalibrationData("t.txt", text="ab    "), 0.2)


# ---------------------------------------------------------------- the planner never reads the held-back part


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("heldout")
    return correction_family(root, "mixtral")


def _plan_signature(plans):
    return [(p.clusters, p.representatives, p.weights, p.deltas) for p in plans]


def test_the_planner_never_reads_the_held_back_part(fam, tmp_path):
    """Files equal in their first 80% and different after it (one ends in garbage) give the
    planner the same activations and the same plan, and that plan is the one made from the
    first 80% alone with no check."""
    planning = (SAMPLE_TEXT * 2)[:572]
    tail = len(planning) // 4  # planning is exactly floor(0.8 * (len + tail)) characters
    files = {
        "text": planning + (SAMPLE_TEXT * 2)[:tail],
        "garbage": planning + "".join(chr(0x4E00 + (i * 7919) % 2000) for i in range(tail)),
    }
    ckpts = open_checkpoints(fam["models"])
    plans, acts = {}, {}
    for name, text in files.items():
        path = tmp_path / f"{name}.txt"
        path.write_text(text)
        data = [split_calibration(read_calibration(path), 0.2)[0] for _ in ckpts]
        assert data[0].text == planning
        s = MergeSettings(mode="calibrated", budget="0.4", calibration={"*": str(path)}, calibration_tokens=32)
        s.metric = "cosine"
        inputs = calibrated_inputs(ckpts, s, data=data)
        plans[name] = _plan_signature(own_plans(ckpts, s, inputs))
        acts[name] = [[torch.cat(x.x) if x.x else None for x in a.slots[ckpts[0].moe_layers[0]]] for a in inputs.acts]
    (tmp_path / "planning.txt").write_text(planning)
    s = MergeSettings(
        mode="calibrated", budget="0.4", calibration={"*": str(tmp_path / "planning.txt")}, calibration_tokens=32
    )
    s.metric = "cosine"
    alone = _plan_signature(plan_calibrated(ckpts, s))
    assert plans["text"] == plans["garbage"] == alone
    for a, b in zip(acts["text"], acts["garbage"]):
        assert all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------- the rule


def test_choose_is_max_min_among_candidates_no_variant_of_which_falls_past_the_margin():
    figs = {
        "calibrated": {"a": 0.99, "b": 0.70},  # worst 0.70
        "budget": {"a": 0.80, "b": 0.85},  # worst 0.80, but a is 0.19 below its best (0.99)
        "reference": {"a": 0.96, "b": 0.78},  # worst 0.78, within 0.05 of every best? b: 0.85 - 0.78 = 0.07: no
    }
    assert choose(figs, margin=1.0) == "budget"  # plain max-min
    assert admissible(figs, 0.05) == []
    assert choose(figs, margin=0.05) == "budget"  # nothing admissible: max-min over all
    assert admissible(figs, 0.1) == ["reference"]
    assert choose(figs, margin=0.1) == "reference"
    figs["average"] = {"a": float("nan"), "b": 1.0}  # a NaN figure is the worst
    assert worst(figs["average"]) == -math.inf and choose(figs, margin=1.0) == "budget"
    assert choose({"x": {"a": 0.5}, "y": {"a": 0.5}}) == "x"  # ties: the earlier candidate
    lucky = {"calibrated": {"a": 1.0, "b": 0.9}, "reference": {"a": 1.3, "b": 0.6}}
    assert choose(lucky, margin=0.05) == "calibrated"  # above 1 counts as 1: a keeps all of it in both


# ---------------------------------------------------------------- a variant whose costs mislead


@pytest.fixture(scope="module")
def misled(tmp_path_factory):
    """Variant `x` fine-tuned on code in its experts, calibrated on a planning part that is one
    character repeated (so half of its slots see no token and cost nothing to give away) and
    held back on code, where it needs them all. a, b and c fine-tuned only non-expert tensors:
    their experts are the base's, one bank entry each. At 0.375 four of x's experts must share:
    the calibrated greedy gives away those its planning part never reached, at no cost it can
    see; uniform averaging of the experts keeps more of x (measured: 98% against 87%)."""
    root = tmp_path_factory.mktemp("misled")
    tok = tiny_tokenizer()
    base = tiny_mixtral(5)
    save_model(base, root / "base", tok)
    models = []
    for i, name in enumerate("abc"):
        save_model(derive_variant(base, i + 1, [], scale=0.02), root / name, tok)
        models.append(f"{name}={root / name}")
    save_model(fine_tune(base, tok, domain_text("code", 300, 1), "experts", 30, 3e-2), root / "x", tok)
    models.append(f"x={root / 'x'}")
    normal = root / "normal.txt"
    normal.write_text(SAMPLE_TEXT * 5)
    odd = root / "x.txt"
    held = domain_text("code", 60, 2)[:1000]
    assert len(held) == 1000
    odd.write_text("=" * 4000 + held)  # floor(0.8 * 5000) = 4000: the held-back part is code
    out = root / "out"
    r = run_main(
        "merge", *models, "-o", out, "--mode", "calibrated", "--budget", "0.375", "--base", root / "base",
        "--calibration", normal, "--calibration", f"x={odd}", "--calibration-tokens", "32", "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return {"out": out, "json": json.loads(r.stdout), "held": held, "tok": tok}


def test_the_written_candidate_is_the_max_min_one_not_the_cost_models_own(misled):
    h = misled["json"]["heldout"]
    figs = h["candidates"]
    assert set(figs) >= {"calibrated", "budget", "reference", "average"}
    capped = {c: {v: min(x, 1.0) for v, x in f.items()} for c, f in figs.items()}
    worsts = {c: min(f.values()) for c, f in capped.items()}
    best = {v: max(f[v] for f in capped.values()) for v in h["variants"]}
    ok = [c for c, f in capped.items() if all(f[v] >= best[v] - h["margin"] for v in best)] or list(figs)
    assert h["chosen"] == max(ok, key=lambda c: (worsts[c], -list(figs).index(c)))
    assert h["chosen"] != "calibrated" and worsts[h["chosen"]] > worsts["calibrated"]
    assert h["variants"]["x"]["score"] == "retained_gain"
    assert h["variants"]["x"]["kept"] == pytest.approx(figs[h["chosen"]]["x"])
    assert misled["json"]["consolidation"]["holdout"] == 0.2
    assert misled["json"]["seconds"]["check"] == pytest.approx(h["seconds"])
    assert 0 < h["seconds"] < misled["json"]["seconds"]["merge"]


def test_figures_are_what_the_runtime_serves_on_the_held_back_text(misled):
    """x's held-back loss in the manifest is the served artifact's, measured independently:
    the runtime, and perplexity on the held-back text in windows of 128 tokens."""
    h = misled["json"]["heldout"]["variants"]["x"]
    rt = Runtime.from_artifact(misled["out"])
    rt.activate("x")
    served = perplexity(rt.model, misled["tok"], misled["held"], chunk_len=128)
    assert served.tokens == h["tokens"]
    assert served.mean_nll == pytest.approx(h["loss"], rel=1e-4)
    assert h["base_loss"] > h["own_loss"]
    assert h["kept"] == pytest.approx((h["base_loss"] - h["loss"]) / (h["base_loss"] - h["own_loss"]))


def test_inspect_shows_what_each_variant_kept(misled):
    r = run_main("inspect", misled["out"], "--json")
    assert r.returncode == 0
    assert json.loads(r.stdout)["heldout"] == misled["json"]["heldout"]
    table = run_main("inspect", misled["out"])
    assert (
        "held-back check: last 20% of each calibration file" in table.stdout
        and f"written: {misled['json']['heldout']['chosen']}" in table.stdout
    )
    for name in ("a", "b", "c", "x"):
        assert f"{misled['json']['heldout']['variants'][name]['kept']:.1%}" in table.stdout


# ---------------------------------------------------------------- the manifest field


def _check() -> HeldoutCheck:
    return HeldoutCheck(
        holdout=0.25,
        margin=0.1,
        base="/some/base",
        chosen="raised",
        variants={
            "a": HeldoutVariant("loss_ratio", 0.99, 2.02, 2.0, None, 100),
            "x": HeldoutVariant("retained_gain", math.nan, math.inf, 1.2, 1.6, 120),
        },
        candidates={"calibrated": {"a": 0.98, "x": -0.5}, "raised": {"a": 0.9, "x": math.nan}},
        raised=["x"],
        seconds=1.5,
    )


def test_the_heldout_field_round_trips_and_non_finite_figures_become_null(misled):
    spec = Artifact.open(misled["out"]).spec
    assert spec.heldout is not None
    assert Manifest.from_json(json.loads(spec.dumps())) == spec
    doc = json.loads(replace(spec, heldout=_check()).dumps())
    assert doc["heldout"]["variants"]["x"] == {
        "score": "retained_gain", "kept": None, "loss": None, "own_loss": 1.2, "base_loss": 1.6, "tokens": 120
    }  # fmt: skip
    assert doc["heldout"]["candidates"]["raised"] == {"a": 0.9, "x": None}
    back = Manifest.from_json(doc).heldout
    assert back == replace(
        _check(),
        variants={"a": _check().variants["a"], "x": HeldoutVariant("retained_gain", None, None, 1.2, 1.6, 120)},
        candidates={"calibrated": {"a": 0.98, "x": -0.5}, "raised": {"a": 0.9, "x": None}},
    )


def test_a_heldout_field_naming_another_model_is_refused(misled, tmp_path):
    doc = json.loads((misled["out"] / MANIFEST).read_text())
    doc["heldout"]["variants"]["nobody"] = doc["heldout"]["variants"]["x"]
    with pytest.raises(Exception, match=r"heldout\.variants\['nobody'\] names a model"):
        Manifest.from_json(doc)


def test_an_artifact_without_the_field_still_reads_inspects_and_serves(misled, tmp_path):
    import shutil

    out = tmp_path / "old"
    shutil.copytree(misled["out"], out)
    doc = json.loads((out / MANIFEST).read_text())
    del doc["heldout"]
    (out / MANIFEST).write_text(json.dumps(doc, indent=2))
    assert Artifact.open(out).spec.heldout is None
    r = run_main("inspect", out, "--json")
    assert r.returncode == 0 and "heldout" not in json.loads(r.stdout)
    assert "held-back" not in run_main("inspect", out).stdout
    assert run_main("verify", out).returncode == 0
    rt = Runtime.from_artifact(out)
    rt.activate("x")
    ids = misled["tok"](SAMPLE_TEXT[:40], return_tensors="pt")["input_ids"]
    assert torch.isfinite(rt.model(input_ids=ids).logits).all()


# ---------------------------------------------------------------- options


def test_holdout_0_is_the_unchecked_plan_and_writes_no_field(fam, tmp_path):
    ckpts = open_checkpoints(fam["models"])
    s = MergeSettings(mode="calibrated", budget="0.4", calibration={"*": fam["cal"]}, calibration_tokens=32, holdout=0)
    r = merge(ckpts, tmp_path / "out", s)
    assert "heldout" not in r.manifest and r.check_seconds is None
    s.metric = "cosine"
    alone = plan_calibrated(ckpts, s)
    art = Artifact.open(tmp_path / "out")
    E = ckpts[0].num_experts
    for p, entry in zip(alone, art.spec.layers):
        assert [[m * E + e for m, e in b.members] for b in entry.bank] == p.clusters


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--holdout", "1"], "holdout must be at least 0 and less than 1"),
        (["--holdout", "-0.1"], "holdout must be at least 0"),
        (["--holdout", "0", "--base", "BASE"], "holdout 0 turns off"),
        (["--check-margin", "-0.1"], "--check-margin must be a finite number of at least 0"),
        (["--check-margin", "nan"], "--check-margin must be a finite number"),
        (["--holdout", "0", "--check-margin", "0.1"], "--check-margin applies to the held-back check"),
    ],
)
def test_bad_holdout_options_exit_2_with_one_line(fam, tmp_path, args, fragment):
    args = [a if a != "BASE" else fam["models"][0].split("=", 1)[1] for a in args]
    r = run_main(
        "merge", *fam["models"], "-o", tmp_path / "o", "--mode", "calibrated", "--budget", "0.4",
        "--calibration", fam["cal"], *args,
    )  # fmt: skip
    one_error_line(r, fragment)


def test_the_margin_given_is_the_one_the_check_uses_and_records(fam, tmp_path):
    r = run_main(
        "merge", *fam["models"], "-o", tmp_path / "o", "--mode", "calibrated", "--budget", "0.4",
        "--calibration", fam["cal"], "--calibration-tokens", "32", "--check-margin", "0.3",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    h = Artifact.open(tmp_path / "o").spec.heldout
    assert h is not None and h.margin == 0.3
    assert h.raised or h.chosen == choose(h.candidates, 0.3)


def test_holdout_outside_calibrated_mode_is_refused(fam, tmp_path):
    r = run_main(
        "merge", *fam["models"], "-o", tmp_path / "o", "--mode", "budget", "--budget", "0.5", "--holdout", "0.2"
    )
    one_error_line(r, "--holdout applies to --mode calibrated only, not budget")


# ---------------------------------------------------------------- no variant below its base


def test_a_variant_below_its_base_under_every_candidate_keeps_more_of_its_own_experts(tmp_path):
    """`good` fine-tuned its experts on code; `noisy` (first, so that ties go its way) has every
    expert scrambled. At the floor each bank entry serves both. good's planning part is one
    character repeated (so its costs say half of its slots do not matter) and its held-back
    part is code: every candidate gives good some of noisy's experts (or their mean with its
    own) and leaves it worse than its base. Raised, the entries serving its slots store its
    own experts, most costly first, until it is above its base again; one line says so."""
    tok = tiny_tokenizer()
    base = tiny_mixtral(5)
    save_model(base, tmp_path / "base", tok)
    every = [(li, e) for li in range(2) for e in range(4)]
    save_model(derive_variant(base, 7, every, change_non_experts=False, scale=1.0), tmp_path / "noisy", tok)
    save_model(fine_tune(base, tok, domain_text("code", 300, 1), "experts", 30, 3e-2), tmp_path / "good", tok)
    cal, odd = tmp_path / "code.txt", tmp_path / "good.txt"
    cal.write_text(domain_text("code", 200, 3))
    odd.write_text("=" * 4000 + domain_text("code", 60, 2)[:1000])
    r = run_main(
        "merge", f"noisy={tmp_path / 'noisy'}", f"good={tmp_path / 'good'}", "-o", tmp_path / "out",
        "--mode", "calibrated", "--budget", "0.5", "--base", tmp_path / "base", "--calibration", cal,
        "--calibration", f"good={odd}", "--calibration-tokens", "32",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    h = Artifact.open(tmp_path / "out").spec.heldout
    assert h is not None
    assert h.raised == ["good"] and h.chosen == "raised"
    assert all(f["good"] < 0 for c, f in h.candidates.items() if c != "raised")
    assert h.variants["good"].score == "retained_gain" and h.variants["good"].kept >= 0
    assert h.candidates["raised"]["good"] == h.variants["good"].kept
    # independently: the artifact as the runtime serves it beats the base on good's held-back text
    held = split_calibration(read_calibration(odd), 0.2)[1].text
    rt = Runtime.from_artifact(tmp_path / "out")
    rt.activate("good")
    served = perplexity(rt.model, tok, held, chunk_len=128)
    alone = perplexity(MixtralForCausalLM.from_pretrained(tmp_path / "base").eval(), tok, held, chunk_len=128)
    assert served.mean_nll == pytest.approx(h.variants["good"].loss, rel=1e-4)
    assert alone.mean_nll == pytest.approx(h.variants["good"].base_loss, rel=1e-4)
    assert served.mean_nll <= alone.mean_nll
    assert "written: raised" in r.stdout
    assert re.search(r"^held-back check: [0-9.]+ s of the merge's [0-9.]+ s$", r.stdout, re.M)
    lines = [x for x in r.stdout.splitlines() if x.startswith("raised:")]
    assert (
        len(lines) == 1 and "good fell below its base" in lines[0] and f"good {h.variants['good'].kept:.1%}" in lines[0]
    )
