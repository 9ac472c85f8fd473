"""Reading stored tensors straight into the runtime's memory: the same bytes as a read
tensor by tensor, every file checked as a read checks it (a flipped bit found by the hash
computed while reading, a truncated file by its size), and the runtime using it for every
tensor stored whole."""

from __future__ import annotations

import shutil

import pytest
import torch

from moeconsol.artifact import Artifact
from moeconsol.artifact.in_place import read_in_place, storable
from moeconsol.consolidate import MergeSettings, merge
from moeconsol.errors import ArtifactError, DamagedArtifactError
from moeconsol.io.checkpoint import open_checkpoints
from moeconsol.io.safetensors_file import read_tensor, torch_dtypes
from moeconsol.serving import Runtime
from moeconsol.testing import derive_variant, save_model, tiny_mixtral


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A lossless bf16 artifact in several files; the fine-tune's non-expert tensors differ
    from the base's in their lowest bit (stored encoded)."""
    root = tmp_path_factory.mktemp("in_place")
    base = tiny_mixtral(seed=3).to(torch.bfloat16)
    ft = derive_variant(base, 1, [(0, 1), (1, 0)], change_non_experts=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if ".experts." not in name:
                p.view(torch.int16).bitwise_xor_(torch.randint(0, 2, p.shape, dtype=torch.int16, generator=generator))
    save_model(base, root / "base")
    save_model(ft, root / "ft")
    out = root / "art"
    merge(open_checkpoints([str(root / "base"), str(root / "ft")]), out, MergeSettings(shard_size=60_000))
    return out


def _empty_places(art: Artifact, copies: int) -> dict[str, list[torch.Tensor]]:
    dtypes = torch_dtypes()
    places = {}
    for key, entry in art.spec.shapes.items():
        if key in art.spec.encodings:
            continue
        places[key] = [torch.full(entry.shape, 7, dtype=dtypes[entry.dtype]) for _ in range(copies)]
    return places


def test_every_key_lands_bit_for_bit_in_each_of_its_places(artifact):
    art = Artifact.open(artifact)
    places = _empty_places(art, copies=2)
    assert len(places) > 20 and art.spec.encodings  # bank and non-expert keys; some keys are encoded
    landed = []
    read_in_place(art, places, landed.append, readers=3)
    assert sorted(landed) == sorted(places)
    fresh = Artifact.open(artifact)
    for key, targets in places.items():
        want = read_tensor(fresh.tensor_info(key)).view(-1).view(torch.uint8)
        for t in targets:
            assert torch.equal(t.view(-1).view(torch.uint8), want), key


def test_an_encoded_key_or_another_dtype_is_not_storable_and_refused(artifact):
    art = Artifact.open(artifact)
    encoded = next(iter(art.spec.encodings))
    entry = art.spec.shapes[encoded]
    assert not storable(art, encoded, torch.empty(entry.shape, dtype=torch.uint8))
    key, whole = next((k, e) for k, e in art.spec.shapes.items() if k not in art.spec.encodings)
    wrong = torch.empty(whole.shape, dtype=torch.float64)
    assert not storable(art, key, wrong)
    with pytest.raises(ArtifactError, match="cannot be read in place"):
        read_in_place(art, {key: [wrong]})


def _flip_a_bit(art_path, pattern: str) -> str:
    shard = sorted(art_path.glob(pattern))[0]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x10
    shard.write_bytes(bytes(data))
    return shard.name


def test_a_flipped_bit_is_found_while_reading_and_a_short_file_by_its_size(artifact, tmp_path):
    path = shutil.copytree(artifact, tmp_path / "art")
    name = _flip_a_bit(path, "bank-*.safetensors")
    art = Artifact.open(path)
    with pytest.raises(DamagedArtifactError, match=f"{name}: sha256 mismatch"):
        read_in_place(art, _empty_places(art, 1))
    with pytest.raises(DamagedArtifactError, match=f"{name}: sha256 mismatch"):
        Runtime.from_artifact(path)
    read_in_place(Artifact.open(path, checksums=False), _empty_places(art, 1))  # not hashed: read
    assert Runtime.from_artifact(path, checksums=False).names == ["base", "ft"]  # the same, asked for
    with open(path / name, "r+b") as f:
        f.truncate((path / name).stat().st_size - 8)
    unhashed = Artifact.open(path, checksums=False)
    with pytest.raises(DamagedArtifactError, match=f"{name}: size"):
        read_in_place(unhashed, _empty_places(unhashed, 1))


def test_the_runtime_reads_the_bank_and_whole_tensors_in_place(artifact, monkeypatch):
    """Only encoded tensors go through `Artifact.read`; the served logits are those of the
    tensor-by-tensor path (the in-memory variant set of the same tensors)."""
    read = []
    original = Artifact.read
    monkeypatch.setattr(Artifact, "read", lambda self, key: read.append(key) or original(self, key))
    rt = Runtime.from_artifact(artifact)
    art = Artifact.open(artifact)
    assert read and set(read) <= set(art.spec.encodings)
    monkeypatch.setattr(Runtime, "_load", _load_one_by_one)
    slow = Runtime.from_artifact(artifact)
    ids = torch.tensor([[5, 9, 40, 7, 3]])
    for name in rt.names:
        rt.activate(name)
        slow.activate(name)
        with torch.no_grad():
            assert torch.equal(rt.model(ids).logits, slow.model(ids).logits)
    for name, t in rt.bank_tensors().items():
        assert torch.equal(t, slow.bank_tensors()[name]), name


_original_load = Runtime._load


def _load_one_by_one(self, progress):
    """The runtime's load with every tensor read and copied one at a time."""
    artifact, self.variant_set.artifact = self.variant_set.artifact, None
    try:
        return _original_load(self, progress)
    finally:
        self.variant_set.artifact = artifact
