"""Non-expert tensors stored as lossless deltas (xor-zstd) in a lossless merge: what the
manifest says, bit-exact export, the runtime's logits, version 1 artifacts, damaged blobs."""

from __future__ import annotations

import copy
import filecmp
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from cli_helpers import one_error_line, run_main
from safetensors import safe_open

from moeconsol.artifact import nonexpert_codec as codec
from moeconsol.artifact.export import export_model
from moeconsol.artifact.reader import Artifact
from moeconsol.artifact.verify import verify_artifact
from moeconsol.consolidate import MergeSettings, merge
from moeconsol.consolidate.nonexpert import MAX_DELTA_RATIO
from moeconsol.errors import ArtifactError, DamagedArtifactError
from moeconsol.io.checkpoint import open_checkpoints
from moeconsol.serving.runtime import Runtime
from moeconsol.testing import derive_variant, save_model, tiny_mixtral, tiny_tokenizer

NAMES = ("base", "ft", "same")


def fine_tune(model, steps: int = 3, seed: int = 0):
    """A copy of `model` after a few real AdamW steps (every weight that gets a gradient moves
    a little, as in a full fine-tune)."""
    model = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """base (sharded), ft (fully fine-tuned, fused layout), same (only experts changed: its
    non-expert tensors are the base's), in bfloat16 as fine-tunes are shipped; merged with
    and without the codec."""
    root = tmp_path_factory.mktemp("deltas")
    tok = tiny_tokenizer()
    base = tiny_mixtral(seed=5)
    models = {"base": base, "ft": fine_tune(base), "same": derive_variant(base, 2, [(1, 0)], change_non_experts=False)}
    models = {n: m.to(torch.bfloat16) for n, m in models.items()}
    save_model(models["base"], root / "base", tok, max_shard_size="100KB")
    save_model(models["ft"], root / "ft", tok, fused=True)
    save_model(models["same"], root / "same", tok)
    ckpts = open_checkpoints([f"{n}={root / n}" for n in NAMES])
    merge(ckpts, root / "art", MergeSettings(shard_size=60_000))
    merge(ckpts, root / "whole", MergeSettings(non_expert_codec="none"))
    _MODELS.update(models)
    return root


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def test_every_changed_non_expert_tensor_is_a_delta_against_the_base(family):
    m = manifest(family / "art")
    assert m["format_version"] == 2
    ft, base, same = (next(x for x in m["models"] if x["name"] == n)["tensors"] for n in ("ft", "base", "same"))
    assert same == base and all(k.endswith("@0") for k in base.values())
    before, after = (family_models()[n].state_dict() for n in ("base", "ft"))  # in-memory names, as the manifest's
    changed = {n for n in base if not torch.equal(before[n], after[n])}
    assert len(changed) > len(base) // 2, "the fine-tune changed few non-expert tensors"
    assert {n for n in ft if ft[n] != base[n]} == changed
    # a version is encoded exactly when its delta takes at most half its bytes
    worth = {
        n
        for n in changed
        if len(codec.encode(after[n], before[n])) <= MAX_DELTA_RATIO * after[n].numel() * after[n].element_size()
    }
    assert "model.embed_tokens.weight" in worth  # rows of tokens never seen do not move
    assert set(m["encodings"]) == {ft[n] for n in worth}
    for name in worth:
        key = ft[name]
        enc = m["encodings"][key]
        assert enc["codec"] == "xor-zstd" and enc["reference"] == base[name]
        assert m["shapes"][key]["dtype"] == "U8" and len(m["shapes"][key]["shape"]) == 1
        assert (enc["dtype"], enc["shape"]) == (m["shapes"][base[name]]["dtype"], m["shapes"][base[name]]["shape"])
    whole = manifest(family / "whole")
    assert whole.get("encodings", {}) == {}
    b, wb = m["bytes"], whole["bytes"]
    assert wb["non_expert"] == wb["non_expert_whole"] == b["non_expert_whole"]
    blobs = sum(m["shapes"][k]["shape"][0] for k in m["encodings"])
    decoded = sum(_nbytes(m["encodings"][k]) for k in m["encodings"])
    assert b["non_expert"] == b["non_expert_whole"] - decoded + blobs < b["non_expert_whole"]
    assert all(m["shapes"][k]["shape"][0] < _nbytes(e) for k, e in m["encodings"].items())


def _nbytes(entry: dict) -> int:
    size = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8, "I64": 8}[entry["dtype"]]
    n = 1
    for d in entry["shape"]:
        n *= d
    return n * size


_MODELS: dict = {}


def family_models() -> dict:
    return _MODELS


def test_read_returns_the_same_tensors_with_and_without_the_codec(family):
    art, whole = Artifact.open(family / "art"), Artifact.open(family / "whole")
    for name in NAMES:
        keys, whole_keys = art.non_expert_keys(name), whole.non_expert_keys(name)
        assert keys == whole_keys
        for tname, key in keys.items():
            got, want = art.read(key), whole.read(key)
            assert got.dtype == want.dtype and got.shape == want.shape
            assert (
                got.reshape(-1).view(torch.uint8).numpy().tobytes()
                == want.reshape(-1).view(torch.uint8).numpy().tobytes()
            ), tname


def test_export_is_bit_exact_against_the_source_checkpoint(family, tmp_path):
    assert verify_artifact(family / "art") == []
    for name in NAMES:
        out = export_model(family / "art", name, tmp_path / name)
        source = family / name
        files = sorted(p.name for p in source.glob("*.safetensors*"))
        assert files == sorted(p.name for p in out.glob("*.safetensors*"))
        for file in files:
            assert filecmp.cmp(source / file, out / file, shallow=False), (name, file)
            if file.endswith(".safetensors"):
                with safe_open(source / file, "pt") as a, safe_open(out / file, "pt") as b:
                    assert list(a.keys()) == list(b.keys())
                    for k in a.keys():
                        x, y = a.get_tensor(k), b.get_tensor(k)
                        assert x.dtype == y.dtype and x.shape == y.shape
                        assert (
                            hashlib.sha256(x.reshape(-1).view(torch.uint8).numpy()).digest()
                            == hashlib.sha256(y.reshape(-1).view(torch.uint8).numpy()).digest()
                        )


@torch.no_grad()
def test_runtime_logits_equal_transformers_from_the_source(family):
    rt = Runtime.from_artifact(family / "art")
    ids = torch.tensor([rt.tokenizer("base")("The quick brown fox")["input_ids"]])
    refs = {n: transformers.MixtralForCausalLM.from_pretrained(family / n, dtype=torch.bfloat16).eval() for n in NAMES}
    for name in ("ft", "base", "same", "ft"):
        rt.activate(name)
        got, want = rt.model(input_ids=ids).logits, refs[name](input_ids=ids).logits
        assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want), name
    assert not torch.equal(refs["base"](input_ids=ids).logits, refs["ft"](input_ids=ids).logits)


def as_version_1(src: Path, dst: Path) -> Path:
    """A copy of a codec-less artifact with the manifest version 1 wrote (no encodings, no
    non-expert bytes)."""
    shutil.copytree(src, dst)
    m = manifest(dst)
    m["format_version"] = 1
    m.pop("encodings", None)
    del m["bytes"]["non_expert"], m["bytes"]["non_expert_whole"]
    (dst / "manifest.json").write_text(json.dumps(m, indent=2))
    return dst


def test_a_version_1_artifact_is_still_read(family, tmp_path):
    old = as_version_1(family / "whole", tmp_path / "v1")
    assert verify_artifact(old) == []
    art = Artifact.open(old)
    assert art.spec.encodings == {}
    out = export_model(old, "ft", tmp_path / "ft")
    assert all(filecmp.cmp(family / "ft" / f.name, f, shallow=False) for f in out.glob("*.safetensors"))
    r = run_main("inspect", old)
    assert r.returncode == 0 and "non-expert tensors" not in r.stdout
    r = run_main("inspect", family / "art")
    assert r.returncode == 0 and "non-expert tensors:" in r.stdout and "stored" in r.stdout

    m = manifest(family / "art")
    m["format_version"] = 1
    (old / "manifest.json").write_text(json.dumps(m))
    one_error_line(run_main("verify", old), "encodings appeared in format version 2")


def blob_range(art_dir: Path) -> tuple[str, Path, int, int]:
    """An encoded key, its file and its byte range in that file."""
    art = Artifact.open(art_dir)
    key = sorted(art.spec.encodings, key=lambda k: -art.spec.shapes[k].shape[0])[0]
    info = art.tensor_info(key)
    return key, info.file, info.start, info.end


def rewrite_sha(art_dir: Path, file: Path) -> None:
    """Make the manifest agree with a changed file (as a buggy writer would have)."""
    m = manifest(art_dir)
    m["files"][file.name]["sha256"] = hashlib.sha256(file.read_bytes()).hexdigest()
    (art_dir / "manifest.json").write_text(json.dumps(m))


def test_a_damaged_blob_is_reported_and_refused_in_one_line(family, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(family / "art", art)
    key, file, start, end = blob_range(art)
    data = bytearray(file.read_bytes())
    data[(start + end) // 2] ^= 0x08
    file.write_bytes(bytes(data))

    r = run_main("verify", art)  # the file's sha256 says so
    assert r.returncode == 1 and f"{file.name}: sha256 mismatch" in r.stdout
    rewrite_sha(art, file)  # the file is as listed, but its blob does not decode
    r = run_main("verify", art)
    assert r.returncode == 1
    assert f"damaged: tensor {key}: the encoded blob is damaged" in r.stdout and "Traceback" not in r.stderr
    r = run_main("export", art, "ft", "-o", tmp_path / "exp")
    one_error_line(r, "damaged artifact", f"tensor {key}")
    assert not (tmp_path / "exp").exists()
    with pytest.raises(DamagedArtifactError, match=key):
        Runtime.from_artifact(art)


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda m, k: m["encodings"][k].update(codec="zip"), "is 'zip', not one of xor-zstd"),
        (lambda m, k: m["encodings"][k].update(reference="nothing@0"), "which is not stored"),
        (lambda m, k: m["encodings"][k].update(shape=[10**12]), "decodes to"),
        (lambda m, k: m["encodings"][k].update(dtype="F64"), "decodes to F64"),
        (lambda m, k: m["encodings"][k].update(dtype="F99"), "not a safetensors dtype"),
        (lambda m, k: m["encodings"][sorted(m["encodings"])[1]].update(reference=k), "which is itself encoded"),
        (
            lambda m, k: m.update(encodings={k.replace("@1", "@0"): m["encodings"][k], **m["encodings"]}),
            "not stored as a U8",
        ),
    ],
)
def test_a_bad_encodings_entry_is_a_corrupt_manifest(family, tmp_path, change, fragment):
    art = tmp_path / "art"
    shutil.copytree(family / "art", art)
    m = manifest(art)
    change(m, sorted(m["encodings"])[0])
    (art / "manifest.json").write_text(json.dumps(m))
    for command in (["inspect", art], ["verify", art], ["export", art, "ft", "-o", tmp_path / "x"]):
        one_error_line(run_main(*command), "corrupt manifest", fragment)
    with pytest.raises(ArtifactError):
        Runtime.from_artifact(art)


def test_an_unknown_codec_option_is_refused(family, tmp_path):
    r = run_main("merge", family / "base", family / "ft", "-o", tmp_path / "o", "--non-expert-codec", "gzip")
    one_error_line(r, "unknown --non-expert-codec 'gzip'", "xor-zstd, none")
    assert not (tmp_path / "o").exists()


def test_float32_deltas_that_save_less_than_half_stay_whole(tmp_path):
    """In float32 a few small steps change the low mantissa bytes of nearly every weight: the
    delta of most tensors takes more than half their bytes, so they are stored whole; the
    embedding (rows of tokens never seen do not move) is still encoded."""
    base = tiny_mixtral(seed=7)
    ft = fine_tune(base, seed=1)
    for name, model in (("base", base), ("ft", ft)):
        save_model(model, tmp_path / name)
    result = merge(open_checkpoints([f"{n}={tmp_path / n}" for n in ("base", "ft")]), tmp_path / "art")
    m = result.manifest
    ft_keys = next(x for x in m["models"] if x["name"] == "ft")["tensors"]
    changed = [k for k in ft_keys.values() if not k.endswith("@0")]
    assert "model.embed_tokens.weight@1" in m["encodings"] and len(m["encodings"]) < len(changed) // 2
    out = export_model(tmp_path / "art", "ft", tmp_path / "exp")
    assert filecmp.cmp(tmp_path / "ft" / "model.safetensors", out / "model.safetensors", shallow=False)


def test_a_large_unrelated_version_is_refused_on_its_probe_alone(tmp_path, monkeypatch):
    """A version far from the reference (noise as large as the weights) is not worth a delta:
    only its first PROBE_ELEMENTS elements are encoded, then it is stored whole."""
    monkeypatch.setattr(codec, "PROBE_ELEMENTS", 64)
    encoded_sizes = []
    encode = codec.encode
    monkeypatch.setattr(codec, "encode", lambda t, r, *a: encoded_sizes.append(t.numel()) or encode(t, r, *a))
    base = tiny_mixtral(seed=8)
    save_model(base, tmp_path / "base")
    save_model(derive_variant(base, 3, [], scale=0.05), tmp_path / "far")
    result = merge(open_checkpoints([f"base={tmp_path / 'base'}", f"far={tmp_path / 'far'}"]), tmp_path / "art")
    assert result.manifest.get("encodings", {}) == {}
    assert encoded_sizes and max(encoded_sizes) <= 64
    b = result.manifest["bytes"]
    assert b["non_expert"] == b["non_expert_whole"]
