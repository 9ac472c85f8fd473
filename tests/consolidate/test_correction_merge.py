"""merge --mode calibrated --deltas: the planner's budget, format version 2, export and the runtime.

References are independent of the code under test where it matters: delta components are
checked against an encoding of (own expert - stored bank tensor) computed here from the
checkpoints, the export's experts against bank + decoded delta, and the runtime's logits
against the export loaded with transformers' own from_pretrained.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from builders import correction_family, merge_with_corrections
from cli_helpers import one_error_line, run_main

from moeconsol.architectures.layouts import architecture
from moeconsol.artifact.corrections import FORMATS, decode
from moeconsol.artifact.export import export_model
from moeconsol.artifact.reader import Artifact, bank_key, summary
from moeconsol.artifact.verify import verify_artifact
from moeconsol.consolidate import MergeSettings, merge
from moeconsol.consolidate.correction_plan import Option, SlotOptions, allocate, bank_counts, hull
from moeconsol.errors import ArtifactError
from moeconsol.io.checkpoint import expert_nbytes, open_checkpoints
from moeconsol.serving.runtime import Runtime

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module", params=["mixtral", "switch_transformers"])
def fam(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"dl-{request.param}")
    fam = correction_family(root, request.param)
    fam["arch"] = request.param
    fam["ckpts"], fam["result"] = merge_with_corrections(fam, root / "out")
    fam["out"] = root / "out"
    return fam


def _delta_names(art: Artifact) -> list[str]:
    return [n for n in art.model_names if any(art.deltas(n, layer) for layer in art.layers)]


def test_budget_counts_bank_plus_delta_bytes_and_the_deltas_are_what_they_say(fam):
    ckpts, result, out = fam["ckpts"], fam["result"], fam["out"]
    assert verify_artifact(out) == []
    art = Artifact.open(out)
    assert art.manifest["format_version"] == 2
    ref = ckpts[0]
    total = len(ckpts) * len(ref.moe_layers) * ref.num_experts * expert_nbytes(ref)
    b = art.spec.bytes
    assert b["bank"] == sum(result.bank_sizes.values()) * expert_nbytes(ref)
    assert b["deltas"] == result.delta_bytes > 0
    assert b["bank"] + b["deltas"] <= int(0.4 * total)  # the budget, honestly
    c = art.manifest["consolidation"]
    assert c["deltas"] is True and c["delta_format"] == "auto" and c["budget_bytes"] == int(0.4 * total)
    # bytes of the delta tensors, from the shards' own headers
    stored = sum(
        art.read(k).numel() * art.read(k).element_size() for k in art.spec.weight_map if k.startswith("delta.")
    )
    assert stored == b["deltas"]
    assert any(f.startswith("deltas-") for f in art.spec.files)
    E = art.experts_per_layer
    found = 0
    for li, layer in enumerate(art.layers):
        entries = art.manifest["layers"][li]["bank"]
        for m, name in enumerate(art.model_names):
            for x in art.deltas(name, layer):
                found += 1
                assert art.slot_map(name, layer)[x.expert] == x.bank
                members = [tuple(mm) for mm in entries[x.bank]["members"]]
                assert (m, x.expert) in members  # the bank entry serves this slot
                for part in art.parts:
                    own = ckpts[m].expert_part(layer, x.expert, part)
                    bank = art.read(bank_key(layer, x.bank, part))
                    assert not torch.equal(own, bank)  # a delta only where the bank is not the slot's own
                    want = FORMATS[x.format].encode(own.float() - bank.float(), x.size, own.dtype)
                    got = art.delta_components(x, part)
                    assert set(got) == set(want)
                    for comp in want:
                        assert torch.equal(got[comp], want[comp]), (layer, name, x.expert, part, comp)
        assert sum(len(v) for v in art.spec.layers[li].deltas.values()) <= len(art.model_names) * E
    assert found > 0


@torch.no_grad()
def test_export_holds_bank_plus_delta_and_the_runtime_serves_the_same(fam, tmp_path):
    art = Artifact.open(fam["out"])
    arch = fam["arch"]
    model_class = getattr(transformers, architecture(arch).model_class)
    names = _delta_names(art)
    assert names
    rt = Runtime.from_artifact(fam["out"])
    tok = rt.tokenizer(art.model_names[0])
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    inputs = (
        {"input_ids": ids, "decoder_input_ids": ids[:, :3]}
        if architecture(arch).encoder_decoder
        else {"input_ids": ids}
    )
    logits = {}
    for name in art.model_names:
        export_model(fam["out"], name, tmp_path / name)
        ckpt = open_checkpoints([f"{name}={tmp_path / name}"])[0]
        for layer in art.layers:
            for x in art.deltas(name, layer):
                for part in art.parts:  # bank + decoded delta, computed here
                    bank = art.read(bank_key(layer, x.bank, part))
                    want = (
                        bank.float() + decode(x.format, art.delta_components(x, part), tuple(bank.shape), x.size)
                    ).to(bank.dtype)
                    assert torch.equal(ckpt.expert_part(layer, x.expert, part), want)
                    assert not torch.equal(want, bank)  # the delta changes what is served
        exported = model_class.from_pretrained(tmp_path / name).eval()
        logits[name] = exported(**inputs).logits
        report = rt.activate(name)
        got = rt.model(**inputs).logits
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, logits[name], rtol=1e-4, atol=1e-6)
        assert torch.equal(got, logits[name])  # on CPU: the same weights, bit for bit
        assert (
            report.experts_corrected == sum(len(art.deltas(name, layer)) for layer in art.layers) or report.seconds == 0
        )
    # swap away and back: the same logits
    d = names[0]
    others = [n for n in art.model_names if n != d]
    for n in [*others, d, others[0], d]:
        rt.activate(n)
        assert torch.equal(rt.model(**inputs).logits, logits[n])
    # memory: P private entries per layer in the bank, every variant's components counted
    resident = rt.resident_bytes()
    components = sum(
        art.read(k).numel() * art.read(k).element_size() for k in art.spec.weight_map if k.startswith("delta.")
    )
    assert resident.deltas == components
    private = {layer: max(len(art.deltas(n, layer)) for n in art.model_names) for layer in art.layers}
    one = expert_nbytes(fam["ckpts"][0])
    assert resident.bank == sum(art.bank_size(layer) + private[layer] for layer in art.layers) * one
    assert resident.total == resident.bank + resident.non_expert + resident.deltas


def test_inspect_shows_bank_and_delta_bytes(fam):
    s = summary(Artifact.open(fam["out"]))
    assert s["bytes"]["deltas"] == fam["result"].delta_bytes
    assert sum(s["delta_slots"].values()) > 0
    r = run_main("inspect", fam["out"])
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    b = s["bytes"]
    assert "+ deltas" in text and f"{(b['bank'] + b['deltas']) / b['experts_in']:.1%} of the expert bytes" in text


# ---------------------------------------------------------------- format version 1 and bad manifests


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    root = tmp_path_factory.mktemp("dl-v1")
    fam = correction_family(root, "mixtral")
    fam["ckpts"], fam["result"] = merge_with_corrections(fam, root / "out", fmt="lowrank")
    fam["out"] = root / "out"
    return fam


def _rewrite(src, dst, change) -> None:
    shutil.copytree(src, dst)
    data = json.loads((dst / "manifest.json").read_text())
    change(data)
    (dst / "manifest.json").write_text(json.dumps(data))


def test_a_version_1_artifact_is_still_read_verified_and_exported(mixtral, tmp_path):
    ckpts = open_checkpoints(mixtral["models"])
    merge(ckpts, tmp_path / "lossless", MergeSettings(non_expert_codec="none"))  # nothing version 2 in it
    _rewrite(tmp_path / "lossless", tmp_path / "v1", lambda d: d.update(format_version=1))
    art = Artifact.open(tmp_path / "v1")
    assert art.manifest["format_version"] == 1 and verify_artifact(tmp_path / "v1") == []
    assert all(art.deltas(n, layer) == [] for n in art.model_names for layer in art.layers)
    export_model(tmp_path / "v1", "a", tmp_path / "a")
    assert (tmp_path / "a" / "config.json").exists()
    # a version-1 manifest cannot hold deltas; an unknown version is refused
    _rewrite(mixtral["out"], tmp_path / "v1d", lambda d: d.update(format_version=1))
    one_error_line(run_main("inspect", tmp_path / "v1d"), "deltas", "version-1")
    _rewrite(tmp_path / "lossless", tmp_path / "v4", lambda d: d.update(format_version=4))
    one_error_line(run_main("inspect", tmp_path / "v4"), "format version 4", "reads versions 1, 2, 3")


def test_only_lowrank_when_asked(mixtral):
    art = Artifact.open(mixtral["out"])
    formats = {x.format for n in art.model_names for layer in art.layers for x in art.deltas(n, layer)}
    assert formats == {"lowrank"}
    assert art.manifest["consolidation"]["delta_format"] == "lowrank"


def _first_delta(data) -> tuple[dict, dict]:
    for entry in data["layers"]:
        for items in entry.get("deltas", {}).values():
            if items:
                return entry, items[0]
    raise AssertionError("no delta")


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda e, x: x.update(format="zip"), "is 'zip', not one of lowrank, sign, int4, mixed"),
        (
            lambda e, x: x.update(bank=x["bank"] + 1 if x["bank"] + 1 < len(e["bank"]) else x["bank"] - 1),
            "but the slot map serves",
        ),
        (lambda e, x: x.update(bank=99), "outside the layer's bank"),
        (lambda e, x: x.update(expert=-1), "is -1, outside"),
        (lambda e, x: x.update(size="4"), "expected an integer"),
        (lambda e, x: x.update(size=None), "lowrank needs a rank of at least 1"),
        (lambda e, x: next(iter(x["keys"].values())).update(a="delta.nowhere"), "which weight_map does not store"),
        (lambda e, x: next(iter(x["keys"].values())).pop("a"), "has components"),
        (lambda e, x: e["deltas"].update(nobody=[]), "names model 'nobody'"),
    ],
)
def test_bad_delta_fields_are_refused_with_one_line(mixtral, tmp_path, damage, fragment):
    def change(data):
        entry, x = _first_delta(data)
        damage(entry, x)

    _rewrite(mixtral["out"], tmp_path / "bad", change)
    with pytest.raises(ArtifactError, match="corrupt manifest"):
        Artifact.open(tmp_path / "bad")
    one_error_line(run_main("inspect", tmp_path / "bad"), fragment)


def test_verify_names_a_delta_component_of_the_wrong_shape(mixtral, tmp_path):
    def change(data):
        _, x = _first_delta(data)
        x["size"] = x["size"] * 2  # the stored factors no longer have this rank's shape

    _rewrite(mixtral["out"], tmp_path / "bad", change)
    r = run_main("verify", tmp_path / "bad")
    assert r.returncode == 1 and "lowrank delta component" in r.stdout


def test_bad_delta_options_exit_2_with_one_line(mixtral, tmp_path):
    root = mixtral["root"]
    models, cal = mixtral["models"], mixtral["cal"]
    one_error_line(
        run_main("merge", *models, "-o", tmp_path / "x", "--mode", "budget", "--budget", "0.5", "--deltas"),
        "deltas apply to mode calibrated only, not budget",
    )
    one_error_line(
        run_main(
            "merge",
            *models,
            "-o",
            tmp_path / "x",
            "--mode",
            "calibrated",
            "--budget",
            "0.5",
            "--calibration",
            cal,
            "--delta-format",
            "int4",
        ),
        "delta format (int4) needs deltas",
    )
    one_error_line(
        run_main(
            "merge",
            *models,
            "-o",
            tmp_path / "x",
            "--mode",
            "calibrated",
            "--budget",
            "0.5",
            "--calibration",
            cal,
            "--deltas",
            "--delta-format",
            "zip",
        ),
        "unknown delta format 'zip'",
    )
    one_error_line(
        run_main(
            "merge",
            *models,
            "-o",
            tmp_path / "x",
            "--mode",
            "calibrated",
            "--budget",
            "0.2",
            "--calibration",
            cal,
            "--deltas",
        ),
        "budget too small",
    )
    assert not (tmp_path / "x").exists() and root.exists()


# ---------------------------------------------------------------- the allocation, by hand


def test_hull_drops_options_that_save_less_per_byte():
    opts = [Option(0, 10.0), Option(10, 4.0, "x"), Option(20, 3.9, "x"), Option(30, 1.0, "x"), Option(5, 11.0, "x")]
    # (5, 11) costs more than sharing; (20, 3.9) lies above the segment from (10, 4) to (30, 1)
    assert hull(opts) == [0, 1, 3]


def test_allocate_spends_bytes_where_cost_falls_most_and_never_more_than_given():
    a = SlotOptions(0, 0, [Option(0, 10.0), Option(10, 2.0, "x"), Option(40, 0.0, "x")])  # 0.8 per byte, then 0.067
    b = SlotOptions(0, 1, [Option(0, 3.0), Option(10, 1.0, "x")])  # 0.2 per byte
    assert allocate([a, b], 0) == ([0, 0], 13.0)
    assert allocate([a, b], 10) == ([1, 0], 5.0)
    assert allocate([a, b], 25) == ([1, 1], 3.0)
    assert allocate([a, b], 49) == ([1, 1], 3.0)  # a's 30-byte upgrade does not fit after b's step
    assert allocate([a, b], 50) == ([2, 1], 1.0)


def test_bank_counts_span_floor_to_most():
    assert bank_counts(8, 8) == [8]
    assert bank_counts(8, 9) == [8, 9]
    assert bank_counts(8, 20) == [8, 12, 16, 20]


# ---------------------------------------------------------------- sweep


def test_sweep_method_deltas_counts_bank_plus_delta_bytes(mixtral, tmp_path):
    from moeconsol.cli.evaluate import sweep_table
    from moeconsol.errors import SettingsError
    from moeconsol.quality.evaluate import EvalSettings, sweep

    root = mixtral["root"]
    data = {n: mixtral["cal"] for n in ("a", "b", "c")}
    r = sweep(
        mixtral["models"],
        data,
        [0.4],
        calibration={"*": mixtral["cal"]},
        methods=["deltas"],
        settings=EvalSettings(chunk_len=32),
        workdir=tmp_path,
    )
    [p] = r.points
    assert p.method == "deltas" and p.error is None and p.delta_bytes > 0
    assert p.expert_fraction == pytest.approx((p.bank_bytes + p.delta_bytes) / r.expert_bytes)
    assert p.expert_fraction <= 0.4
    assert json.loads(json.dumps(r.to_dict()))["points"][0]["delta_bytes"] == p.delta_bytes
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(sweep_table(r))
    assert f"({p.expert_fraction:.0%})" in console.export_text()
    with pytest.raises(SettingsError, match="method deltas needs calibration"):
        sweep(mixtral["models"], data, [0.4], methods=["deltas"])
    assert root.exists()
