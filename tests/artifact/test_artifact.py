"""merge -> artifact -> export/verify on tiny real models, checked against independent computations."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from moeconsol.artifact.export import export_model
from moeconsol.artifact.reader import Artifact
from moeconsol.artifact.verify import verify_artifact
from moeconsol.consolidate import MergeSettings, merge
from moeconsol.errors import MoeconsolError
from moeconsol.io import writer
from moeconsol.io.checkpoint import open_checkpoints
from moeconsol.testing import derive_variant, save_model, tiny_mixtral, tiny_switch, tiny_tokenizer

CHANGED_V1 = [(0, 1), (1, 2)]
CHANGED_V2 = [(0, 0), (0, 1), (1, 3)]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Mixtral base + 2 variants in three on-disk forms; v2 keeps the base's non-experts."""
    root = tmp_path_factory.mktemp("family")
    tok = tiny_tokenizer()
    base = tiny_mixtral(seed=0)
    v1 = derive_variant(base, 1, CHANGED_V1)
    v2 = derive_variant(base, 2, CHANGED_V2, change_non_experts=False)
    save_model(base, root / "base", tok, max_shard_size="100KB")
    save_model(v1, root / "v1", tok, fused=True)
    save_model(v2, root / "v2", tok, max_shard_size="60KB")
    models = {"base": base, "v1": v1, "v2": v2}
    return root, models, tok


@pytest.fixture(scope="module")
def ckpts(family):
    root, _, _ = family
    return open_checkpoints([str(root / n) for n in ("base", "v1", "v2")])


@pytest.fixture(scope="module")
def lossless(family, ckpts):
    root, _, _ = family
    return merge(ckpts, root / "lossless", MergeSettings(shard_size=40_000))


def in_memory_expert_digests(model, layer: int) -> list[str]:
    """sha256 of each expert straight from the transformers module (independent of moeconsol)."""
    ex = model.model.layers[layer].mlp.experts
    out = []
    for e in range(ex.gate_up_proj.shape[0]):
        h = hashlib.sha256()
        h.update(ex.gate_up_proj[e].detach().numpy().tobytes())
        h.update(ex.down_proj[e].detach().numpy().tobytes())
        out.append(h.hexdigest())
    return out


def test_lossless_shares_exactly_the_identical_experts(family, lossless):
    _, models, _ = family
    art = Artifact.open(lossless.path)
    names = ["base", "v1", "v2"]
    for li, layer in enumerate(art.layers):
        digests = {n: in_memory_expert_digests(models[n], li) for n in names}
        assert art.bank_size(layer) == len({d for ds in digests.values() for d in ds})
        for a in names:
            for b in names:
                for ea in range(4):
                    for eb in range(4):
                        same_bank = art.slot_map(a, layer)[ea] == art.slot_map(b, layer)[eb]
                        assert same_bank == (digests[a][ea] == digests[b][eb])
    # 2 layers x 4 experts, plus one extra per changed expert of each variant
    assert sum(lossless.bank_sizes.values()) == 8 + len(CHANGED_V1) + len(CHANGED_V2)
    assert lossless.bank_bytes < lossless.expert_bytes_in


def test_non_expert_tensors_stored_once_when_identical(lossless):
    art = Artifact.open(lossless.path)
    base, v1, v2 = (art.non_expert_keys(n) for n in ("base", "v1", "v2"))
    assert base == v2  # v2 kept every non-expert tensor of the base
    assert all(base[k] != v1[k] for k in base)
    assert "model.layers.0.mlp.gate.weight" in base  # routers under their in-memory name
    stored = [k for k in art.manifest["weight_map"] if not k.startswith("bank.")]
    assert len(stored) == 2 * len(base)


def test_bank_expert_and_read_return_the_source_tensors(family, lossless):
    _, models, _ = family
    art = Artifact.open(lossless.path)
    ex = models["v1"].model.layers[1].mlp.experts
    k = art.slot_map("v1", "model.layers.1")[2]
    got = art.bank_expert("model.layers.1", k)
    inter = ex.down_proj.shape[2]
    assert torch.equal(got["w1"], ex.gate_up_proj[2][:inter].detach())
    assert torch.equal(got["w3"], ex.gate_up_proj[2][inter:].detach())
    assert torch.equal(got["w2"], ex.down_proj[2].detach())
    key = art.non_expert_keys("v1")["model.embed_tokens.weight"]
    assert torch.equal(art.read(key), models["v1"].model.embed_tokens.weight.detach())
    assert art.config("v1")["model_type"] == "mixtral"
    assert (art.model_dir("v1") / "tokenizer.json").is_file()
    with pytest.raises(MoeconsolError, match="no model named"):
        art.model_dir("nope")


def compare_checkpoints(source: Path, exported: Path) -> None:
    """Same files, same tensors per shard, same metadata, bit-identical tensors."""
    src_files = sorted(p.name for p in source.iterdir())
    assert sorted(p.name for p in exported.iterdir()) == src_files
    index = source / "model.safetensors.index.json"
    if index.exists():
        assert json.loads(index.read_text()) == json.loads((exported / index.name).read_text())
    for f in source.glob("*.safetensors"):
        with safe_open(f, "pt") as a, safe_open(exported / f.name, "pt") as b:
            assert a.metadata() == b.metadata()
            assert sorted(a.keys()) == sorted(b.keys())
            for k in a.keys():
                assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
    for f in ("config.json", "tokenizer.json"):
        assert (source / f).read_bytes() == (exported / f).read_bytes()


def test_lossless_export_round_trip_bit_exact_and_transformers_logits(family, lossless, tmp_path):
    from transformers import AutoModelForCausalLM

    root, models, tok = family
    ids = tok("The quick brown fox jumps", return_tensors="pt").input_ids
    for name in ("base", "v1", "v2"):
        out = export_model(lossless.path, name, tmp_path / name)
        compare_checkpoints(root / name, out)
        loaded = AutoModelForCausalLM.from_pretrained(out).eval()
        source = AutoModelForCausalLM.from_pretrained(root / name).eval()
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, source(ids).logits)
            torch.testing.assert_close(loaded(ids).logits, models[name](ids).logits)


def test_switch_lossless_round_trip(tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    tok = tiny_tokenizer()
    base = tiny_switch(seed=0)
    var = derive_variant(base, 5, [(0, 1), (1, 0)])
    save_model(base, tmp_path / "sb", tok)
    save_model(var, tmp_path / "sv", tok, max_shard_size="80KB")
    result = merge(open_checkpoints([str(tmp_path / "sb"), str(tmp_path / "sv")]), tmp_path / "art")
    art = Artifact.open(result.path)
    assert art.architecture == "switch_transformers" and art.parts == ("wi", "wo")
    assert sum(result.bank_sizes.values()) == 4 * len(art.layers) + 2
    ids = tok("a router picks", return_tensors="pt").input_ids
    for name in ("sb", "sv"):
        out = export_model(result.path, name, tmp_path / f"e-{name}")
        compare_checkpoints(tmp_path / name, out)
        loaded = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
        source = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / name).eval()
        with torch.no_grad():
            assert torch.equal(
                loaded(input_ids=ids, decoder_input_ids=ids).logits, source(input_ids=ids, decoder_input_ids=ids).logits
            )


def test_threshold_cosine_one_equals_lossless(family, ckpts, lossless):
    root, _, _ = family
    r = merge(ckpts, root / "cos1", MergeSettings(mode="threshold", metric="cosine", threshold=1.0))

    def banks(layers):  # lossless also records each entry's digest (what `add` hashes against)
        return [{**x, "bank": [{k: v for k, v in b.items() if k != "digest"} for b in x["bank"]]} for x in layers]

    assert banks(r.manifest["layers"]) == banks(lossless.manifest["layers"])
    assert all(b.get("digest") for x in lossless.manifest["layers"] for b in x["bank"])
    assert r.manifest["consolidation"]["threshold"] == 1.0


def flat_expert(art_or_model, layer: int, e: int) -> np.ndarray:
    ex = art_or_model.model.layers[layer].mlp.experts
    inter = ex.down_proj.shape[2]
    gu = ex.gate_up_proj[e].detach().double().numpy()
    return np.concatenate([gu[:inter].ravel(), ex.down_proj[e].detach().double().numpy().ravel(), gu[inter:].ravel()])


@pytest.mark.parametrize("rule", ["first", "medoid", "mean"])
def test_budget_at_the_floor_and_representatives(family, ckpts, rule, tmp_path):
    _, models, _ = family
    names = ["base", "v1", "v2"]
    r = merge(ckpts, tmp_path / rule, MergeSettings(mode="budget", budget=str(8 / 24), representative=rule))
    art = Artifact.open(r.path)
    assert r.manifest["consolidation"]["representative"] == rule
    assert r.manifest["consolidation"]["budget_experts"] == 8
    assert sum(art.bank_size(layer) for layer in art.layers) <= 8
    for li, layer in enumerate(art.layers):
        for k, entry in enumerate(r.manifest["layers"][li]["bank"]):
            members = [tuple(m) for m in entry["members"]]
            assert len({m for m, _ in members}) == len(members)  # one expert per model
            vecs = [flat_expert(models[names[m]], li, e) for m, e in members]
            distinct = len({v.tobytes() for v in vecs})
            got = art.bank_expert(layer, k)
            inter = got["w1"].shape[0]
            stored = np.concatenate(
                [
                    got["w1"].double().numpy().ravel(),
                    got["w2"].double().numpy().ravel(),
                    got["w3"].double().numpy().ravel(),
                ]
            )
            if distinct == 1 or rule == "first":
                assert entry["representative"] == list(members[0])
                assert np.array_equal(stored, vecs[0])
            elif rule == "medoid":
                unit = [v / np.linalg.norm(v) for v in vecs]
                sums = [sum(1 - float(a @ b) for b in unit) for a in unit]
                best = int(np.argmin(sums))
                assert entry["representative"] == list(members[best])
                assert np.array_equal(stored, vecs[best])
            else:
                assert entry["representative"] is None
                np.testing.assert_allclose(stored, np.mean(vecs, axis=0).astype(np.float32), rtol=1e-6, atol=1e-7)
            assert inter == models["base"].model.layers[li].mlp.experts.down_proj.shape[2]


def test_budget_bytes_and_too_small(family, ckpts, tmp_path):
    one_expert = 3 * 64 * 32 * 4
    r = merge(ckpts, tmp_path / "b", MergeSettings(mode="budget", budget=str(10 * one_expert), metric="l2"))
    assert sum(r.bank_sizes.values()) <= 10
    assert r.bank_bytes <= 10 * one_expert
    with pytest.raises(MoeconsolError, match="`budget` too small.*at least one model's worth: 8 experts"):
        merge(ckpts, tmp_path / "c", MergeSettings(mode="budget", budget=str(7 * one_expert)))
    with pytest.raises(MoeconsolError, match="`budget` too small"):
        merge(ckpts, tmp_path / "c", MergeSettings(mode="budget", budget="0.2"))
    assert not (tmp_path / "c").exists()


def test_settings_are_checked(ckpts, tmp_path):
    with pytest.raises(MoeconsolError, match="needs a `threshold`"):
        merge(ckpts, tmp_path / "x", MergeSettings(mode="threshold"))
    with pytest.raises(MoeconsolError, match="out of range"):
        merge(ckpts, tmp_path / "x", MergeSettings(mode="threshold", threshold=1.2))
    with pytest.raises(MoeconsolError, match="not lossless"):
        merge(ckpts, tmp_path / "x", MergeSettings(threshold=0.5))
    with pytest.raises(MoeconsolError, match="unknown `mode`"):
        merge(ckpts, tmp_path / "x", MergeSettings(mode="median"))
    assert os.listdir(tmp_path) == []


def test_failure_mid_write_leaves_no_output(ckpts, tmp_path, monkeypatch):
    calls = {"n": 0}

    def failing(real):  # every byte goes out through write_all or copy_range
        def wrapper(*args):
            calls["n"] += 1
            if calls["n"] == 5:
                raise OSError(28, "No space left on device")
            return real(*args)

        return wrapper

    monkeypatch.setattr(writer, "write_all", failing(writer.write_all))
    monkeypatch.setattr(writer, "copy_range", failing(writer.copy_range))
    with pytest.raises(MoeconsolError, match="No space left on device; nothing was written"):
        merge(ckpts, tmp_path / "out", MergeSettings(shard_size=20_000))
    assert calls["n"] == 5
    assert os.listdir(tmp_path) == []


def test_no_room_on_disk_is_refused_up_front(ckpts, tmp_path, monkeypatch):
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(MoeconsolError, match="not enough disk space"):
        merge(ckpts, tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_existing_output_refused_without_force(ckpts, lossless):
    with pytest.raises(MoeconsolError, match="already exists.*force"):
        merge(ckpts, lossless.path)


def copy_artifact(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_verify_catches_flipped_byte_and_truncated_shard(lossless, tmp_path):
    assert verify_artifact(lossless.path) == []
    flipped = copy_artifact(lossless.path, tmp_path / "flipped")
    shard = sorted(flipped.glob("bank-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01
    shard.write_bytes(bytes(data))
    problems = verify_artifact(flipped)
    assert problems == [f"{shard.name}: sha256 mismatch (content damaged)"]
    truncated = copy_artifact(lossless.path, tmp_path / "truncated")
    shard = sorted(truncated.glob("tensors-*.safetensors"))[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 10)
    problems = verify_artifact(truncated)
    assert len(problems) == 1 and problems[0].startswith(f"{shard.name}: size")
    # export refuses the damaged artifact and writes nothing
    with pytest.raises(MoeconsolError, match="damaged artifact"):
        export_model(truncated, "base", tmp_path / "exp")
    assert not (tmp_path / "exp").exists()


def test_open_refuses_what_is_not_an_artifact(lossless, tmp_path):
    with pytest.raises(MoeconsolError, match="no such artifact"):
        Artifact.open(tmp_path / "missing")
    with pytest.raises(MoeconsolError, match="no manifest.json"):
        Artifact.open(tmp_path)
    bad = copy_artifact(lossless.path, tmp_path / "bad")
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(MoeconsolError, match="corrupt manifest"):
        Artifact.open(bad)


def test_merge_result_bytes(lossless):
    on_disk = sum(p.stat().st_size for p in lossless.path.rglob("*") if p.is_file())
    assert lossless.artifact_bytes == on_disk
    assert lossless.artifact_bytes < lossless.input_bytes


@pytest.mark.parametrize("kernel_copy", [True, False], ids=["copy_file_range", "read-write-fallback"])
def test_copy_writes_the_source_bytes_and_their_sha256(tmp_path, monkeypatch, kernel_copy):
    """`SafetensorsWriter.copy` (a stored tensor unchanged from an input) writes exactly the
    source range's bytes, by the kernel or, where the file systems refuse, through a small
    reused buffer, and the recorded sha256 is the file's."""
    from safetensors.torch import load_file, save_file

    from moeconsol.io import safetensors_file as safetensors_io
    from moeconsol.io.safetensors_file import read_header

    tensors = {
        "a": torch.randn(300, 7),
        "b": torch.arange(1000, dtype=torch.int32),
        "c": torch.randn(5).to(torch.bfloat16),
    }
    save_file(tensors, tmp_path / "src.safetensors")
    infos, _ = read_header(tmp_path / "src.safetensors")
    if not kernel_copy:

        def refuse(*args):
            raise OSError(18, "Invalid cross-device link")  # EXDEV

        monkeypatch.setattr(os, "copy_file_range", refuse)
        monkeypatch.setattr(safetensors_io._buffers, "buf", memoryview(bytearray(1000)), raising=False)
    specs = [writer.TensorSpec(n, infos[n].dtype, infos[n].shape) for n in ("c", "a", "b")]
    w = writer.SafetensorsWriter(tmp_path / "out.safetensors", specs)
    w.copy("c", infos["c"])
    w.write("a", tensors["a"])  # an in-memory tensor between two copies keeps the file position right
    w.copy("b", infos["b"])
    record = w.close()
    out = load_file(tmp_path / "out.safetensors")
    for n, t in tensors.items():
        assert torch.equal(out[n].view(torch.uint8), t.view(torch.uint8)), n
    data = (tmp_path / "out.safetensors").read_bytes()
    assert record.size == len(data) and record.sha256 == hashlib.sha256(data).hexdigest()
