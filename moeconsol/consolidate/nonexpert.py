"""Non-expert tensors (attention, norms, embeddings, routers, shared experts): which versions
the artifact stores, and the lossless encoding of the versions after a tensor's first.

Each tensor of each model is hashed (one at a time, through a reused buffer): a version
bit-identical across models is stored once, as `NAME@0`, `NAME@1`, ... in order of first
appearance. Each version after `NAME@0` may be stored encoded against it (xor-zstd,
`artifact.nonexpert_codec`) where that takes at most `MAX_DELTA_RATIO` of its bytes. The
merging baselines store one merged tensor per name instead (`plan_merged_non_experts`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..artifact import nonexpert_codec as codec
from ..artifact.manifest import Encoding
from ..artifact.reader import Progress
from ..io.checkpoint import Checkpoint, natural_key
from ..io.digest import range_digest
from ..io.safetensors_file import ITEMSIZE, TensorInfo, read_tensor
from ..io.writer import TensorSpec
from .plan import Combine

MAX_DELTA_RATIO = 0.5
"""A non-expert version is stored encoded only when that takes at most this fraction of its
whole bytes: a smaller saving is not worth decoding it at every load, nor encoding it
(docs/benchmarks.md: a fine-tune's bf16 deltas take 25%, unrelated tensors 70%)."""


@dataclass
class StoredTensor:
    """A version copied from a source: model `model`'s tensor `disk_name`, stored as `key`."""

    key: str
    model: int
    disk_name: str
    spec: TensorSpec


@dataclass
class EncodedTensor:
    blob: TensorInfo
    """Where the encoded bytes wait to be copied into the artifact."""
    encoding: Encoding


@dataclass
class NonExpertPlan:
    keys: list[dict[str, str]]
    """Per model: in-memory name -> stored key."""
    stored: list[StoredTensor] = field(default_factory=list)
    """The versions copied from the sources (de-duplicated by digest)."""
    merged: list[TensorSpec] = field(default_factory=list)
    """The tensors a merging baseline computes (`combine`) from every model's version."""
    combine: Combine | None = None
    digests: dict[str, str] = field(default_factory=dict)
    """Stored key -> digest of the version it holds (`tensor_digest_of`), for the stored ones."""

    @property
    def specs(self) -> list[TensorSpec]:
        """Every stored tensor, in the order it is written."""
        return self.merged + [t.spec for t in self.stored]


def plan_non_experts(ckpts: list[Checkpoint], progress: Progress | None = None) -> NonExpertPlan:
    """Hash every non-expert tensor of every model (one at a time); keep each version once."""
    disk = [{c.layout.canonical_name(n): n for n in c.non_expert_names} for c in ckpts]
    names = sorted(disk[0], key=natural_key)
    stored: list[StoredTensor] = []
    keys: list[dict[str, str]] = [{} for _ in ckpts]
    digests: dict[str, str] = {}
    for i, name in enumerate(names):
        if progress:
            progress("non-expert", i, len(names))
        versions: dict[str, str] = {}
        for m, c in enumerate(ckpts):
            digest = tensor_digest_of(c.tensors[disk[m][name]])
            if digest not in versions:
                key = f"{name}@{len(versions)}"
                versions[digest] = key
                digests[key] = digest
                info = c.tensors[disk[m][name]]
                stored.append(StoredTensor(key, m, disk[m][name], TensorSpec(key, info.dtype, info.shape)))
            keys[m][name] = versions[digest]
    if progress:
        progress("non-expert", len(names), len(names))
    return NonExpertPlan(keys, stored=stored, digests=digests)


def tensor_digest_of(info: TensorInfo) -> str:
    """Digest of a stored tensor's dtype, shape and bytes (read through a reused buffer)."""
    return range_digest({f"{info.dtype}{list(info.shape)}": info})


def plan_merged_non_experts(ckpts: list[Checkpoint], combine: Combine) -> NonExpertPlan:
    """A merging baseline's non-expert tensors: one merged tensor per name, key NAME@0, that
    every model maps to."""
    ref = ckpts[0]
    disk = {ref.layout.canonical_name(n): n for n in ref.non_expert_names}
    names = sorted(disk, key=natural_key)
    specs = [TensorSpec(f"{n}@0", ref.tensors[disk[n]].dtype, ref.tensors[disk[n]].shape) for n in names]
    return NonExpertPlan([{n: f"{n}@0" for n in names} for _ in ckpts], merged=specs, combine=combine)


def merged_non_expert(ckpts: list[Checkpoint], base: Checkpoint | None, name: str, combine: Combine) -> torch.Tensor:
    """Non-expert tensor `name` (in-memory name) merged from every model's version."""
    tensors = []
    for c in ckpts:
        own = {c.layout.canonical_name(n): n for n in c.non_expert_names}
        tensors.append(c.read(own[name]))
    b = None
    if base is not None:
        own = {base.layout.canonical_name(n): n for n in base.non_expert_names}
        b = base.read(own[name])
    return combine(tensors, b)


def encode_non_experts(
    ckpts: list[Checkpoint], plan: NonExpertPlan, spill: Path, progress: Progress | None = None
) -> dict[str, EncodedTensor]:
    """Encode each stored version of a tensor after its first (`NAME@0`, the reference) against
    it with xor-zstd, one tensor and its reference in memory at a time; append each blob of at
    most MAX_DELTA_RATIO of the version's whole bytes to the file `spill` (a version whose
    probe says otherwise is not encoded at all). Returns stored key -> its blob there."""
    groups: dict[str, list[StoredTensor]] = {}
    for t in plan.stored:
        groups.setdefault(t.key.rsplit("@", 1)[0], []).append(t)
    encoded: dict[str, EncodedTensor] = {}
    with open(spill, "wb") as f:
        for i, versions in enumerate(groups.values()):
            if progress:
                progress("encode", i, len(groups))
            first = versions[0]
            others = [t for t in versions[1:] if (t.spec.dtype, t.spec.shape) == (first.spec.dtype, first.spec.shape)]
            if not others:
                continue
            reference = None  # read once a version is worth encoding
            for t in others:
                if math.prod(t.spec.shape) > codec.PROBE_ELEMENTS:  # probe the first elements, read from disk
                    heads = [tensor_head(ckpts[x.model].tensors[x.disk_name], codec.PROBE_ELEMENTS) for x in (t, first)]
                    if codec.probe(*heads) > MAX_DELTA_RATIO:
                        continue
                if reference is None:
                    reference = ckpts[first.model].read(first.disk_name)
                blob = codec.encode(ckpts[t.model].read(t.disk_name), reference)
                if len(blob) > MAX_DELTA_RATIO * t.spec.nbytes:
                    continue
                start = f.tell()
                f.write(blob)
                info = TensorInfo(spill, "U8", (len(blob),), start, start + len(blob))
                encoded[t.key] = EncodedTensor(
                    info, Encoding(codec.XOR_ZSTD, first.key, t.spec.dtype, tuple(t.spec.shape))
                )
    if progress:
        progress("encode", len(groups), len(groups))
    return encoded


def tensor_head(info: TensorInfo, n: int) -> torch.Tensor:
    """The first `n` elements of a stored tensor, flat, read from its file."""
    return read_tensor(TensorInfo(info.file, info.dtype, (n,), info.start, info.start + n * ITEMSIZE[info.dtype]))
