"""The merge pipeline: N checkpoints in, one consolidated artifact out.

Two streaming passes, so memory never grows with the number of layers:

1. **Plan.** For each MoE layer, read that layer's experts of all N models (nothing else),
   hash them, and (lossy modes) measure them with `similarity.layer_similarity`; keep only
   the digests and the small (N*E)^2 distance matrix, then drop the tensors. Lossless and
   threshold modes cluster each layer right away; budget mode clusters all layers at once at
   the end (closest pairs first, over all layers). Non-expert tensors are hashed one at a
   time: a tensor bit-identical across models is stored once.
2. **Write.** With every stored tensor now known by name, dtype and shape, the shard
   writers emit each header first and then each tensor as it is read (or, for a `mean`
   representative, computed one part at a time): one expert in memory, never a shard.

The artifact is built in a hidden temporary directory and renamed into place at the end;
see `writer.atomic_directory`. Its format is in docs/artifact.md.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .artifact import FORMAT, FORMAT_VERSION, MANIFEST, Progress, bank_key
from .checkpoint import Checkpoint, _natural_key
from .clustering import (
    MODES,
    REPRESENTATIVES,
    LayerGroups,
    choose_representative,
    cluster_budget,
    cluster_lossless,
    cluster_threshold,
    identical_groups,
    slot_maps,
    threshold_to_distance,
    to_distance,
)
from .errors import MoeconsolError
from .safetensors_io import DTYPES, read_tensor
from .similarity import DEFAULT_PROBES, METRICS, expert_digest, gaussian_probes, hidden_size, layer_similarity, read_layer
from .writer import (
    FileRecord,
    ShardedWriter,
    TensorSpec,
    atomic_directory,
    check_destination,
    check_free_space,
    copy_file,
    format_bytes,
    parse_size,
    write_json,
)

DEFAULT_SHARD_SIZE = 5 * 10**9
_HEADER_ALLOWANCE = 256
"""Bytes of safetensors header per tensor assumed when estimating the artifact's size."""


@dataclass
class MergeSettings:
    """How to consolidate; validated by `check_settings`."""

    mode: str = "lossless"
    metric: str | None = None
    """Similarity for threshold and budget modes (default cosine); unused in lossless."""
    threshold: float | None = None
    budget: str | None = None
    """Bytes of bank (`40GB`) or a fraction of all experts (`0.5`)."""
    representative: str = "medoid"
    shard_size: int = DEFAULT_SHARD_SIZE
    seed: int = 0
    """Seed of the Gaussian probes when the metric is cka (as in analyze)."""


@dataclass
class LayerPlan:
    layer: str
    clusters: list[list[int]]
    """Flat member indices (model * E + expert) of each bank expert, in bank order."""
    representatives: list[int | None]
    """The member stored for each bank expert; None = the mean of its members."""


@dataclass
class StoredTensor:
    key: str
    model: int
    disk_name: str
    spec: TensorSpec


@dataclass
class NonExpertPlan:
    stored: list[StoredTensor]
    keys: list[dict[str, str]]
    """Per model: in-memory name -> stored key."""


@dataclass
class MergeResult:
    path: Path
    manifest: dict
    input_bytes: int
    artifact_bytes: int
    expert_bytes_in: int
    bank_bytes: int
    bank_sizes: dict[str, int] = field(default_factory=dict)

    @property
    def expert_bytes_saved(self) -> int:
        return self.expert_bytes_in - self.bank_bytes


# -- settings -----------------------------------------------------------------------------


def expert_nbytes(ckpt: Checkpoint) -> int:
    """Bytes of one expert (all its parts)."""
    item = torch.empty((), dtype=DTYPES[ckpt.dtype]).element_size()
    return sum(math.prod(ckpt.expert_shape(p)) * item for p in ckpt.layout.parts)


def budget_experts(budget: str, ckpts: list[Checkpoint]) -> int:
    """How many bank experts (over all layers) a budget allows, refusing one below the floor
    of one model's worth of experts (E per layer)."""
    ref = ckpts[0]
    layers, experts = len(ref.moe_layers), ref.num_experts
    total = len(ckpts) * layers * experts
    one = expert_nbytes(ref)
    text = str(budget).strip()
    try:
        fraction = float(text)
    except ValueError:
        fraction = None
    if fraction is not None and fraction <= 1.0:
        if fraction <= 0:
            raise MoeconsolError(f"budget {text!r} must be more than 0: a fraction of all experts (0.5) or bytes (40GB)")
        slots = int(fraction * total + 1e-9)
        what = f"{fraction:g} of {total} experts"
    else:
        nbytes = parse_size(text)
        slots = nbytes // one
        what = format_bytes(nbytes)
    floor = layers * experts
    if slots < floor:
        raise MoeconsolError(
            f"budget too small: {what} holds {slots} experts, but the bank needs at least one model's worth: "
            f"{floor} experts ({format_bytes(floor * one)}, or a fraction of {floor / total:.4g})"
        )
    return min(slots, total)


def check_settings(s: MergeSettings, ckpts: list[Checkpoint]) -> MergeSettings:
    """Refuse inconsistent or out-of-range settings; fill the default metric."""
    if s.mode not in MODES:
        raise MoeconsolError(f"unknown mode {s.mode!r}: choose from {', '.join(MODES)}")
    if s.representative not in REPRESENTATIVES:
        raise MoeconsolError(f"unknown representative {s.representative!r}: choose from {', '.join(REPRESENTATIVES)}")
    if s.shard_size <= 0:
        raise MoeconsolError("shard size must be more than 0 bytes")
    if s.mode == "lossless":
        if s.threshold is not None or s.budget is not None or s.metric is not None:
            raise MoeconsolError("--metric, --threshold and --budget apply to --mode threshold or budget, not lossless")
        return s
    metric = s.metric or "cosine"
    if metric not in METRICS:
        raise MoeconsolError(f"unknown metric {metric!r}: choose from {', '.join(METRICS)}")
    if s.mode == "threshold":
        if s.threshold is None:
            raise MoeconsolError("--mode threshold needs --threshold (e.g. --metric cosine --threshold 0.99)")
        if s.budget is not None:
            raise MoeconsolError("--budget applies to --mode budget, not threshold")
        threshold_to_distance(metric, s.threshold)
    if s.mode == "budget":
        if s.budget is None:
            raise MoeconsolError("--mode budget needs --budget: bytes of bank (40GB) or a fraction of all experts (0.5)")
        if s.threshold is not None:
            raise MoeconsolError("--threshold applies to --mode threshold, not budget")
        budget_experts(s.budget, ckpts)
    return MergeSettings(s.mode, metric, s.threshold, s.budget, s.representative, s.shard_size, s.seed)


# -- pass 1: plan -------------------------------------------------------------------------


def plan_layers(ckpts: list[Checkpoint], s: MergeSettings, progress: Progress | None = None) -> list[LayerPlan]:
    """Cluster every MoE layer; one layer's experts in memory at a time."""
    ref = ckpts[0]
    E = ref.num_experts
    groups: list[LayerGroups] = []
    digests: list[list[str]] = []
    clusters: list[list[list[int]]] = []
    cutoff = threshold_to_distance(s.metric, s.threshold) if s.mode == "threshold" else None
    for i, layer in enumerate(ref.moe_layers):
        if progress:
            progress("plan", i, len(ref.moe_layers))
        experts = read_layer(ckpts, layer)
        if s.mode == "lossless":
            layer_digests = [expert_digest(e) for e in experts.flat]
            distance = None
        else:
            probes = gaussian_probes(hidden_size(ref), DEFAULT_PROBES, s.seed + i) if s.metric == "cka" else None
            sim = layer_similarity(ckpts, layer, [s.metric], probes, experts=experts)
            layer_digests, distance = sim.digests, to_distance(sim.matrices[s.metric], s.metric)
        del experts
        lg = identical_groups(layer, layer_digests, E, distance)
        groups.append(lg)
        digests.append(layer_digests)
        if s.mode == "lossless":
            clusters.append(cluster_lossless(lg))
        elif s.mode == "threshold":
            clusters.append(cluster_threshold(lg, cutoff))
    if progress:
        progress("plan", len(ref.moe_layers), len(ref.moe_layers))
    if s.mode == "budget":
        clusters = cluster_budget(groups, budget_experts(s.budget, ckpts))
    return [
        LayerPlan(lg.layer, cs, [choose_representative(c, s.representative, d, lg.distance) for c in cs])
        for lg, d, cs in zip(groups, digests, clusters)
    ]


def _tensor_digest(ckpt: Checkpoint, name: str) -> str:
    info = ckpt.tensors[name]
    h = hashlib.sha256(f"{info.dtype}{list(info.shape)}".encode())
    h.update(read_tensor(info).reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def plan_non_experts(ckpts: list[Checkpoint], progress: Progress | None = None) -> NonExpertPlan:
    """Hash every non-expert tensor of every model (one at a time); keep each version once."""
    disk = [{c.layout.canonical_name(n): n for n in c.non_expert_names} for c in ckpts]
    names = sorted(disk[0], key=_natural_key)
    stored: list[StoredTensor] = []
    keys: list[dict[str, str]] = [{} for _ in ckpts]
    for i, name in enumerate(names):
        if progress:
            progress("non-expert", i, len(names))
        versions: dict[str, str] = {}
        for m, c in enumerate(ckpts):
            digest = _tensor_digest(c, disk[m][name])
            if digest not in versions:
                key = f"{name}@{len(versions)}"
                versions[digest] = key
                info = c.tensors[disk[m][name]]
                stored.append(StoredTensor(key, m, disk[m][name], TensorSpec(key, info.dtype, info.shape)))
            keys[m][name] = versions[digest]
    if progress:
        progress("non-expert", len(names), len(names))
    return NonExpertPlan(stored, keys)


# -- pass 2: write ------------------------------------------------------------------------


def _bank_specs(ckpts: list[Checkpoint], plans: list[LayerPlan]) -> list[TensorSpec]:
    ref = ckpts[0]
    return [
        TensorSpec(bank_key(p.layer, k, part), ref.dtype, ref.expert_shape(part))
        for p in plans
        for k in range(len(p.clusters))
        for part in ref.layout.parts
    ]


def _mean_part(ckpts: list[Checkpoint], layer: str, members: list[int], part: str) -> torch.Tensor:
    """Element-wise mean of one part over the members, accumulated in float64."""
    E = ckpts[0].num_experts
    acc = None
    for i in members:
        x = ckpts[i // E].expert_part(layer, i % E, part).to(torch.float64)
        acc = x if acc is None else acc.add_(x)
    assert acc is not None
    return acc.div_(len(members)).to(DTYPES[ckpts[0].dtype])


def _write_bank(writer: ShardedWriter, ckpts: list[Checkpoint], plans: list[LayerPlan], progress: Progress | None, done: list[int], total: int) -> None:
    E = ckpts[0].num_experts
    parts = ckpts[0].layout.parts
    for p in plans:
        for k, (members, rep) in enumerate(zip(p.clusters, p.representatives)):
            if rep is not None:
                expert = ckpts[rep // E].expert(p.layer, rep % E)
                for part in parts:
                    writer.write(bank_key(p.layer, k, part), expert[part])
                del expert
            else:
                for part in parts:
                    writer.write(bank_key(p.layer, k, part), _mean_part(ckpts, p.layer, members, part))
            done[0] += 1
            if progress:
                progress("write", done[0], total)


def _source_shards(ckpt: Checkpoint) -> dict[str, dict]:
    """Each source file: its __metadata__ and its tensors in file order (on-disk names)."""
    out = {}
    for file, meta in ckpt.shard_metadata.items():
        names = sorted((n for n, f in ckpt.weight_map.items() if f == file), key=lambda n: ckpt.tensors[n].start)
        out[file] = {"metadata": meta, "tensors": names}
    return out


def _source_index(ckpt: Checkpoint) -> dict | None:
    index = ckpt.path / "model.safetensors.index.json"
    if not index.exists():
        return None
    return {k: v for k, v in json.loads(index.read_text()).items() if k != "weight_map"}


def input_bytes(ckpts: list[Checkpoint]) -> int:
    """Bytes of the N inputs: their safetensors files and the side files we carry."""
    total = 0
    for c in ckpts:
        total += sum((c.path / f).stat().st_size for f in c.shard_metadata)
        total += sum(p.stat().st_size for p in c.side_files())
    return total


def merge(
    ckpts: list[Checkpoint],
    out: str | Path,
    settings: MergeSettings | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> MergeResult:
    """Consolidate `ckpts` (from `checkpoint.open_checkpoints`) into an artifact at `out`."""
    s = check_settings(settings or MergeSettings(), ckpts)
    out = Path(out).absolute()
    check_destination(out, force)
    ref = ckpts[0]
    one_model = sum(info.nbytes for info in ref.tensors.values())
    check_free_space(out, one_model)

    plans = plan_layers(ckpts, s, progress)
    non_experts = plan_non_experts(ckpts, progress)
    bank_specs = _bank_specs(ckpts, plans)
    tensor_specs = [t.spec for t in non_experts.stored]
    side = {c.name: c.side_files() for c in ckpts}
    estimate = sum(x.nbytes + _HEADER_ALLOWANCE for x in bank_specs + tensor_specs)
    estimate += sum(p.stat().st_size for files in side.values() for p in files) + (1 << 20)
    check_free_space(out, estimate)

    E = ref.num_experts
    files: dict[str, FileRecord] = {}
    total_steps = sum(len(p.clusters) for p in plans) + len(non_experts.stored)
    done = [0]
    with atomic_directory(out, force=force) as tmp:
        bank = ShardedWriter(tmp, "bank", bank_specs, s.shard_size)
        _write_bank(bank, ckpts, plans, progress, done, total_steps)
        files.update(bank.close())
        tensors = ShardedWriter(tmp, "tensors", tensor_specs, s.shard_size)
        for t in non_experts.stored:
            tensors.write(t.key, ckpts[t.model].read(t.disk_name))
            done[0] += 1
            if progress:
                progress("write", done[0], total_steps)
        files.update(tensors.close())
        for c in ckpts:
            (tmp / "models" / c.name).mkdir(parents=True)
            for p in side[c.name]:
                files[f"models/{c.name}/{p.name}"] = copy_file(p, tmp / "models" / c.name / p.name)
        shapes = {x.name: {"dtype": x.dtype, "shape": list(x.shape)} for x in bank_specs + tensor_specs}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "moeconsol_version": __version__,
            "architecture": ref.layout.architecture,
            "parts": list(ref.layout.parts),
            "part_shapes": {p: list(ref.expert_shape(p)) for p in ref.layout.parts},
            "dtype": ref.dtype,
            "experts_per_layer": E,
            "consolidation": {
                "mode": s.mode,
                "metric": s.metric,
                "threshold": s.threshold,
                "budget": s.budget,
                "budget_experts": budget_experts(s.budget, ckpts) if s.mode == "budget" else None,
                "representative": s.representative,
                "probe_seed": s.seed if s.metric == "cka" else None,
            },
            "models": [
                {
                    "name": c.name,
                    "source": c.source,
                    "revision": c.revision,
                    "layout": c.layout.name,
                    "config": c.config,
                    "files": [p.name for p in side[c.name]],
                    "tensors": non_experts.keys[m],
                    "source_shards": _source_shards(c),
                    "index": _source_index(c),
                }
                for m, c in enumerate(ckpts)
            ],
            "layers": [
                {
                    "layer": p.layer,
                    "bank": [
                        {
                            "members": [[i // E, i % E] for i in members],
                            "representative": None if rep is None else [rep // E, rep % E],
                        }
                        for members, rep in zip(p.clusters, p.representatives)
                    ],
                    "slot_map": {c.name: sm for c, sm in zip(ckpts, slot_maps(p.clusters, len(ckpts), E))},
                }
                for p in plans
            ],
            "bytes": {
                "inputs": input_bytes(ckpts),
                "experts_in": len(ckpts) * len(plans) * E * expert_nbytes(ref),
                "bank": sum(len(p.clusters) for p in plans) * expert_nbytes(ref),
            },
            "weight_map": {**bank.weight_map, **tensors.weight_map},
            "shapes": shapes,
            "files": {name: {"size": r.size, "sha256": r.sha256} for name, r in sorted(files.items())},
        }
        manifest_record = write_json(tmp / MANIFEST, manifest)
    b = manifest["bytes"]
    return MergeResult(
        path=out,
        manifest=manifest,
        input_bytes=b["inputs"],
        artifact_bytes=sum(r.size for r in files.values()) + manifest_record.size,
        expert_bytes_in=b["experts_in"],
        bank_bytes=b["bank"],
        bank_sizes={p.layer: len(p.clusters) for p in plans},
    )

