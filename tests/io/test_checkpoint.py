"""Checkpoint: layouts on disk, lazy reads that match the model bit for bit, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import blake3
import pytest
import torch

from moeconsol import testing as T
from moeconsol.errors import MoeconsolError
from moeconsol.io import safetensors_file as safetensors_io
from moeconsol.io.checkpoint import Checkpoint, check_compatible, open_checkpoint, open_checkpoints, parse_model_ref
from moeconsol.io.digest import range_digest, tensor_digest


@pytest.fixture(scope="module")
def mixtral():
    return T.tiny_mixtral(seed=0)


@pytest.fixture(scope="module")
def switch():
    return T.tiny_switch(seed=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, mixtral, switch):
    """Directories of the same Mixtral in three on-disk forms, a Switch, and misfits."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {
        "plain": T.save_model(mixtral, root / "plain"),
        "fused-sharded": T.save_model(mixtral, root / "fused-sharded", fused=True, max_shard_size="20KB"),
        "plain-sharded": T.save_model(mixtral, root / "plain-sharded", max_shard_size="20KB"),
        "switch": T.save_model(switch, root / "switch"),
        "bf16": T.save_model(T.tiny_mixtral(seed=3).to(torch.bfloat16), root / "bf16"),
        "eight": T.save_model(T.tiny_mixtral(seed=0, num_local_experts=8), root / "eight"),
        "wide": T.save_model(T.tiny_mixtral(seed=0, intermediate_size=48), root / "wide"),
    }
    return out


def _mixtral_reference(model, layer: int, expert: int) -> dict[str, torch.Tensor]:
    """The canonical parts, cut from transformers' in-memory fused tensors."""
    ex = model.model.layers[layer].mlp.experts
    inter = ex.down_proj.shape[2]
    gate_up = ex.gate_up_proj[expert].detach()
    return {"w1": gate_up[:inter], "w3": gate_up[inter:], "w2": ex.down_proj[expert].detach()}


@pytest.mark.parametrize("form", ["plain", "fused-sharded", "plain-sharded"])
def test_mixtral_layouts_read_bit_exact(saved, mixtral, form):
    ckpt = open_checkpoint(str(saved[form]))
    assert ckpt.layout.name == ("mixtral-fused" if form.startswith("fused") else "mixtral")
    assert ckpt.layout.architecture == "mixtral"
    assert ckpt.moe_layers == ["model.layers.0", "model.layers.1"]
    assert ckpt.num_experts == 4
    if form.endswith("sharded"):
        assert (saved[form] / "model.safetensors.index.json").exists()
        assert len(set(ckpt.weight_map.values())) > 1
    for li, layer in enumerate(ckpt.moe_layers):
        for e in range(4):
            ref = _mixtral_reference(mixtral, li, e)
            got = ckpt.expert(layer, e)
            assert set(got) == {"w1", "w2", "w3"}
            for part in ref:
                assert torch.equal(got[part], ref[part]), (form, layer, e, part)
                assert torch.equal(ckpt.expert_part(layer, e, part), ref[part])
    assert ckpt.expert_shape("w1") == (64, 32) and ckpt.expert_shape("w2") == (32, 64)


@pytest.mark.parametrize("form", ["plain", "fused-sharded", "bf16"])
def test_expert_digest_from_disk_equals_digest_of_tensors(saved, mixtral, form, monkeypatch):
    """An expert's identity digest is the same whether hashed from its byte ranges on disk
    (lossless merge: no tensor built) or from tensors, and equals BLAKE3 of the reference
    bytes computed here; every part streams in several chunks of a small buffer."""
    monkeypatch.setattr(safetensors_io._buffers, "buf", memoryview(bytearray(1000)), raising=False)
    model = T.tiny_mixtral(seed=3).to(torch.bfloat16) if form == "bf16" else mixtral
    ckpt = open_checkpoint(str(saved[form]))
    for li, layer in enumerate(ckpt.moe_layers):
        for e in range(ckpt.num_experts):
            ref = _mixtral_reference(model, li, e)
            h = blake3.blake3()
            for part in sorted(ref):
                h.update(part.encode() + ref[part].contiguous().view(torch.uint8).numpy().tobytes())
            assert range_digest(ckpt.expert_infos(layer, e)) == h.hexdigest(), (form, layer, e)
            assert tensor_digest(ckpt.expert(layer, e)) == h.hexdigest()


def test_switch_reads_bit_exact(saved, switch):
    ckpt = open_checkpoint(str(saved["switch"]))
    assert ckpt.layout.name == "switch"
    assert ckpt.moe_layers == ["encoder.block.1.layer.1", "decoder.block.1.layer.2"]
    params = dict(switch.named_parameters())
    for layer in ckpt.moe_layers:
        for e in range(4):
            got = ckpt.expert(layer, e)
            for part in ("wi", "wo"):
                assert torch.equal(got[part], params[f"{layer}.mlp.experts.expert_{e}.{part}.weight"])


def test_bf16_bytes_survive(saved):
    model = T.tiny_mixtral(seed=3).to(torch.bfloat16)
    ckpt = open_checkpoint(str(saved["bf16"]))
    assert ckpt.dtype == "BF16"
    got = ckpt.expert("model.layers.1", 2)
    ref = _mixtral_reference(model, 1, 2)
    for part in ref:
        assert got[part].dtype == torch.bfloat16
        assert torch.equal(got[part].view(torch.int16), ref[part].view(torch.int16))


def test_both_mixtral_layouts_are_compatible(saved):
    ckpts = open_checkpoints([f"a={saved['plain']}", f"b={saved['fused-sharded']}"])
    assert [c.name for c in ckpts] == ["a", "b"]


def test_model_refs():
    assert parse_model_ref("/x/y/base/").name == "base"
    assert parse_model_ref("/x/y/base").name == "base"
    ref = parse_model_ref("code=/x/y/base")
    assert (ref.name, ref.source) == ("code", "/x/y/base")
    assert parse_model_ref("org/repo").name == "repo"
    with pytest.raises(MoeconsolError, match="NAME=PATH"):
        parse_model_ref("=/x")


@pytest.mark.parametrize(
    "other, message",
    [
        ("switch", "mixed architectures: 'switch' vs 'plain': switch_transformers vs mixtral"),
        ("eight", "expert count mismatch: 'eight' vs 'plain': 8 vs 4"),
        ("wide", "shape mismatch: 'wide' vs 'plain': expert part w1 is [48, 32] vs [64, 32]"),
        ("bf16", "dtype mismatch: 'bf16' vs 'plain': experts are BF16 vs F32"),
    ],
)
def test_incompatible_models_name_first_mismatch(saved, other, message):
    with pytest.raises(MoeconsolError) as err:
        open_checkpoints([str(saved["plain"]), str(saved[other])])
    assert str(err.value) == message


def test_duplicate_names_refused(saved):
    with pytest.raises(MoeconsolError, match="both named 'x'"):
        open_checkpoints([f"x={saved['plain']}", f"x={saved['fused-sharded']}"])


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_truncated_shard_refused(saved, tmp_path):
    d = _copy(saved["plain"], tmp_path / "t")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(MoeconsolError, match="truncated: tensor"):
        open_checkpoint(str(d))


def test_corrupt_header_refused(saved, tmp_path):
    d = _copy(saved["plain"], tmp_path / "c")
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:12] = b"\xff\xfe{["
    f.write_bytes(bytes(data))
    with pytest.raises(MoeconsolError, match="corrupt safetensors header"):
        open_checkpoint(str(d))


def test_garbage_file_refused(saved, tmp_path):
    d = _copy(saved["plain"], tmp_path / "g")
    (d / "model.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(MoeconsolError, match="not a safetensors file"):
        open_checkpoint(str(d))


def test_missing_shard_refused(saved, tmp_path):
    d = _copy(saved["plain-sharded"], tmp_path / "s")
    shard = sorted(d.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(MoeconsolError, match=f"shard {shard.name} named in the index is missing"):
        open_checkpoint(str(d))


def test_index_naming_absent_tensor_refused(saved, tmp_path):
    d = _copy(saved["plain-sharded"], tmp_path / "i")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = next(iter(index["weight_map"].values()))
    index["weight_map"]["model.ghost.weight"] = shard
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MoeconsolError, match="'model.ghost.weight'"):
        open_checkpoint(str(d))


def test_pickle_only_refused_without_unpickling(saved, tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(saved["plain"] / "config.json", d)
    # A pickle that would run code if anything unpickled it.
    (d / "pytorch_model.bin").write_bytes(b"cos\nsystem\n(S'touch " + str(tmp_path / "pwned").encode() + b"'\ntR.")
    with pytest.raises(MoeconsolError, match=r"only pickle weights \(pytorch_model.bin\).*safetensors only"):
        open_checkpoint(str(d))
    assert not (tmp_path / "pwned").exists()


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(MoeconsolError, match="not a checkpoint"):
        open_checkpoint(str(tmp_path))
    with pytest.raises(MoeconsolError, match="no such directory"):
        open_checkpoint(str(tmp_path / "absent"))
    with pytest.raises(MoeconsolError, match="expected a checkpoint directory, got a file"):
        open_checkpoint(str(tmp_path / "notes.txt"))


def test_dense_model_refused(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    MistralForCausalLM(cfg).save_pretrained(tmp_path / "dense")
    with pytest.raises(MoeconsolError, match="no MoE expert tensors of a known layout"):
        Checkpoint("dense", str(tmp_path / "dense"), tmp_path / "dense")


def test_check_compatible_reports_missing_non_expert(saved, tmp_path):
    a = open_checkpoint(str(saved["plain"]))
    b = open_checkpoint(str(saved["plain-sharded"]))
    b.tensors = {k: v for k, v in b.tensors.items() if k != "model.norm.weight"}
    b.non_expert_names = [n for n in b.non_expert_names if n != "model.norm.weight"]
    with pytest.raises(MoeconsolError, match="model.norm.weight is missing from 'plain-sharded'"):
        check_compatible([a, b])
