"""A quantized release's experts banked as stored: lossless identity on codes and scales,
bit-exact exports in the source format, the modes that would compute new values refused."""

from __future__ import annotations

import json

import pytest
import torch
from builders import QUANTIZED, quantized_family
from cli_helpers import one_error_line, run_main
from safetensors import safe_open

from moeconsol.artifact.export import export_model
from moeconsol.artifact.manifest import Manifest
from moeconsol.artifact.reader import Artifact, summary
from moeconsol.artifact.verify import verify_artifact
from moeconsol.consolidate import MergeSettings, merge
from moeconsol.errors import ArtifactError
from moeconsol.io.checkpoint import open_checkpoints

IDS = [row[0] for row in QUANTIZED]


@pytest.fixture(scope="module", params=QUANTIZED, ids=IDS)
def family(request, tmp_path_factory):
    f = quantized_family(tmp_path_factory.mktemp(f"quantized-art-{request.param[0]}"), request.param)
    root = f["root"]
    merge(open_checkpoints([f"base={root / 'base'}", f"ft={root / 'ft'}"]), root / "lossless")
    return f


def _stored_expert_bytes(path) -> dict[tuple[str, int | None], tuple]:
    """Every tensor of a checkpoint's files as raw bytes (safetensors' own reader), by name and,
    for a fused expert tensor (gpt-oss's, all experts of a layer), by expert too."""
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                fused = ".experts." in name and not any(c.isdigit() for c in name.split(".experts.")[1])
                for e, piece in enumerate(t) if fused else [(None, t)]:
                    raw = piece.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                    out[name, e] = (str(piece.dtype), tuple(piece.shape), raw)
    return out


def test_lossless_banks_the_distinct_stored_experts(family):
    root, changed = family["root"], family["changed"]
    art = Artifact.open(root / "lossless")
    ckpt = open_checkpoints([str(root / "base")])[0]
    assert art.spec.quantization == ckpt.quantization
    assert art.manifest["format_version"] == 3
    assert {m.layout for m in art.spec.models} == {family["layout"]}
    for li, layer in enumerate(art.layers):
        assert art.bank_size(layer) == ckpt.num_experts + sum(1 for x in changed if x[0] == li)
    # every bank part is stored as the release stores it: codes and scales, their dtypes
    for part in art.parts:
        assert (
            art.read(f"bank.{art.layers[0]}.0.{part}").dtype
            == {
                "F8_E4M3": torch.float8_e4m3fn,
                "U8": torch.uint8,
                "F32": torch.float32,
                "BF16": torch.bfloat16,
            }[art.spec.part_dtype(part)]
        )
    assert verify_artifact(root / "lossless") == []


@pytest.mark.parametrize("name", ["base", "ft"])
def test_export_is_bit_exact_in_the_source_format(family, name, tmp_path):
    root = family["root"]
    out = export_model(root / "lossless", name, tmp_path / name)
    for src in sorted((root / name).iterdir()):
        assert (out / src.name).read_bytes() == src.read_bytes(), src.name
    assert "quantization_config" in json.loads((out / "config.json").read_text())


def test_threshold_shares_by_dequantized_similarity_and_stores_a_member(family, tmp_path):
    """Sharing decided on the values; what is stored is one member's codes and scales."""
    root = family["root"]
    ckpts = open_checkpoints([f"base={root / 'base'}", f"ft={root / 'ft'}"])
    merge(ckpts, tmp_path / "thr", MergeSettings(mode="threshold", threshold=0.5))
    art = Artifact.open(tmp_path / "thr")
    exported = _stored_expert_bytes(export_model(tmp_path / "thr", "ft", tmp_path / "ft"))
    base = _stored_expert_bytes(root / "base")
    ft = _stored_expert_bytes(root / "ft")
    for layer in art.layers:
        assert art.bank_size(layer) < 2 * ckpts[0].num_experts
    assert exported.keys() == ft.keys()
    assert all(exported[k] in (ft[k], base[k]) for k in ft if ".experts." in k[0])


def test_modes_that_compute_values_are_refused(family, tmp_path):
    root = family["root"]
    for extra in (["--mode", "average"], ["--mode", "threshold", "--threshold", "0.9", "--representative", "mean"]):
        result = run_main("merge", f"base={root / 'base'}", f"ft={root / 'ft'}", "-o", tmp_path / "x", *extra)
        one_error_line(result, "computes new expert values", "banked as stored")
        assert not (tmp_path / "x").exists()


def test_inspect_states_what_the_runtime_holds(family):
    root = family["root"]
    s = summary(Artifact.open(root / "lossless"))
    q = s["quantization"]
    values = sum(t.numel() for t in open_checkpoints([str(root / "base")])[0].values("model.layers.1", 0).values())
    assert q["bank_served"] == sum(s["bank"].values()) * values * 2
    assert q["bank_stored"] == s["bytes"]["bank"]
    result = run_main("inspect", root / "lossless")
    assert result.returncode == 0 and "dequantized at load" in result.stdout


def test_a_version_2_manifest_cannot_say_quantized(family):
    data = json.loads((family["root"] / "lossless" / "manifest.json").read_text())
    data["format_version"] = 2
    with pytest.raises(ArtifactError, match="quantization appeared in format version 3"):
        Manifest.from_json(data)
    data["format_version"] = 3
    data["quantization"]["method"] = "gguf"
    with pytest.raises(ArtifactError, match="quantization.method is 'gguf'"):
        Manifest.from_json(data)


@pytest.mark.parametrize(
    "settings",
    [dict(mode="budget", budget="0.6"), dict(mode="reference", budget="0.6")],
    ids=["budget", "reference"],
)
def test_budgeted_modes_store_members_as_released(family, settings, tmp_path):
    root = family["root"]
    ckpts = open_checkpoints([f"base={root / 'base'}", f"ft={root / 'ft'}"])
    merge(ckpts, tmp_path / "out", MergeSettings(**settings))
    art = Artifact.open(tmp_path / "out")
    assert sum(art.bank_size(layer) for layer in art.layers) <= int(0.6 * 2 * 4 * len(art.layers))
    base, ft = _stored_expert_bytes(root / "base"), _stored_expert_bytes(root / "ft")
    for name in ("base", "ft"):
        exported = _stored_expert_bytes(export_model(tmp_path / "out", name, tmp_path / name))
        assert all(exported[k] in (ft[k], base[k]) for k in exported if ".experts." in k[0])
