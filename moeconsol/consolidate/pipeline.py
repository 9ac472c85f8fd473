"""The merge pipeline: N checkpoints in, one consolidated artifact out.

Two streaming passes, so memory never grows with the number of layers:

1. **Plan.** For each MoE layer, read that layer's experts of all N models (nothing else),
   hash them, and (lossy modes) measure them with `similarity.layer_similarity`; keep only
   the digests and the small (N*E)^2 distance matrix, then drop the tensors. Lossless and
   threshold modes cluster each layer right away; budget mode clusters all layers at once at
   the end (closest pairs first, over all layers). Non-expert tensors are hashed one at a
   time: a tensor bit-identical across models is stored once, and (`non_expert_codec`) each
   version after a tensor's first as a lossless delta against it (`codec.py`) where smaller.
2. **Write.** With every stored tensor now known by name, dtype and shape, the shard
   writers emit each header first and then each tensor as it is read (or, for a `mean`
   representative, computed one part at a time): one expert in memory, never a shard.

The artifact is built in a hidden temporary directory and renamed into place at the end;
see `writer.atomic_directory`. Its format is in docs/artifact.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..analysis.similarity import DEFAULT_PROBES, METRICS, gaussian_probes, hidden_size, layer_similarity, read_layer
from ..artifact import nonexpert_codec as codec
from ..artifact.builder import Written, build_manifest
from ..artifact.corrections import AUTO, FORMATS, delta_format, delta_key
from ..artifact.manifest import MANIFEST, Encoding
from ..artifact.reader import Progress, bank_key
from ..errors import IncompatibleModelsError, SettingsError
from ..io.checkpoint import (
    Checkpoint,
    check_compatible,
    check_config,
    expert_nbytes,
    natural_key,
    open_checkpoint,
    warn_unusual,
    warn_unusual_values,
)
from ..io.digest import range_digest, tensor_digest, value_flags
from ..io.safetensors_file import ITEMSIZE, TensorInfo, dtype_names, read_tensor, torch_dtypes
from ..io.writer import (
    FileRecord,
    ShardedWriter,
    TensorSpec,
    atomic_directory,
    check_destination,
    check_free_space,
    copy_file,
    format_bytes,
    parse_size,
)
from . import baselines
from .grouping import (
    MODES,
    REPRESENTATIVES,
    LayerGroups,
    choose_representative,
    cluster_budget,
    cluster_calibrated,
    cluster_cost,
    cluster_lossless,
    cluster_threshold,
    fair_weights,
    identical_groups,
    threshold_to_distance,
    to_distance,
)

if TYPE_CHECKING:
    from ..analysis.calibration import LayerCosts, ModelActivations

DEFAULT_SHARD_SIZE = 5 * 10**9
_HEADER_ALLOWANCE = 256
MAX_DELTA_RATIO = 0.5
"""A non-expert version is stored encoded only when that takes at most this fraction of its
whole bytes: a smaller saving is not worth decoding it at every load, nor encoding it
(docs/benchmarks.md: a fine-tune's bf16 deltas take 25%, unrelated tensors 70%)."""
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
    base: str | None = None
    """The pre-trained checkpoint (PATH or hub id) for task-arithmetic and ties."""
    density: float = 0.2
    """ties: fraction of each task vector's entries kept (top-k by magnitude)."""
    scale: float = 1.0
    """task-arithmetic and ties: lambda, the factor on the summed / merged task vectors."""
    calibration: dict[str, str] | None = None
    """calibrated mode: model name -> calibration file (text, or JSONL for seq2seq);
    the key "*" applies to every model not named."""
    calibration_tokens: int = 512
    """calibrated mode: routed inputs kept per (model, layer, expert)."""
    deltas: bool = False
    """calibrated mode: slots served by a bank expert not their own may carry a compressed
    correction (module deltas); the budget then counts bank plus delta bytes."""
    delta_format: str | None = None
    """With deltas: `auto` (every format, the default) or one `deltas.FORMATS` name."""
    non_expert_codec: str = codec.XOR_ZSTD
    """How a non-expert tensor's versions after the first are stored: encoded against the
    first (codec.XOR_ZSTD) where that takes at most MAX_DELTA_RATIO of whole, or whole
    (codec.NONE)."""


MERGE_MODES = ("average", "task-arithmetic", "ties")
"""Plain merging of all weights into one model (every variant maps to the same tensors)."""
ALL_MODES = (*MODES, "calibrated", "reference", *MERGE_MODES)
BASE_MODES = ("task-arithmetic", "ties")


@dataclass
class LayerPlan:
    layer: str
    clusters: list[list[int]]
    """Flat member indices (model * E + expert) of each bank expert, in bank order."""
    representatives: list[int | None]
    """The member stored for each bank expert; None = computed from its members."""
    weights: list[list[float] | None] | None = None
    """Per bank expert with a computed representative: the members' weights of a weighted
    mean (None: the plain mean)."""
    combine: str | None = None
    """A merging baseline (MERGE_MODES) that computes every bank expert from its members."""
    deltas: list[SlotDelta] = field(default_factory=list)
    """Slots served by their bank entry plus a compressed correction (calibrated + deltas)."""

    def bank_index(self, flat_index: int) -> int:
        """The bank entry that serves expert `flat_index`."""
        return next(k for k, members in enumerate(self.clusters) if flat_index in members)


@dataclass(frozen=True)
class SlotDelta:
    """Slot (model, expert) of a layer carries a delta of `format` at `size` (deltas.py)."""

    model: int
    expert: int
    format: str
    size: int | None


@dataclass
class StoredTensor:
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
    delta_bytes: int = 0
    """Bytes of the stored delta tensors (calibrated + deltas; else 0)."""

    @property
    def expert_bytes_saved(self) -> int:
        return self.expert_bytes_in - self.bank_bytes - self.delta_bytes


# -- settings -----------------------------------------------------------------------------


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
            raise SettingsError(f"budget {text!r} must be more than 0: a fraction of all experts (0.5) or bytes (40GB)")
        slots = int(fraction * total + 1e-9)
        what = f"{fraction:g} of {total} experts"
    else:
        nbytes = parse_size(text)
        slots = nbytes // one
        what = format_bytes(nbytes)
    floor = layers * experts
    if slots < floor:
        raise SettingsError(
            f"budget too small: {what} holds {slots} experts, but the bank needs at least one model's worth: "
            f"{floor} experts ({format_bytes(floor * one)}, or a fraction of {floor / total:.4g})"
        )
    return min(slots, total)


def budget_bytes(budget: str, ckpts: list[Checkpoint]) -> int:
    """Bytes of expert memory a budget allows (a fraction of all N models' expert bytes, or
    bytes), at most all of them; the floor is checked by `budget_experts`."""
    ref = ckpts[0]
    total = len(ckpts) * len(ref.moe_layers) * ref.num_experts * expert_nbytes(ref)
    budget_experts(budget, ckpts)
    text = str(budget).strip()
    try:
        fraction = float(text)
    except ValueError:
        fraction = None
    nbytes = int(fraction * total + 1e-9) if fraction is not None and fraction <= 1.0 else parse_size(text)
    return min(nbytes, total)


def _refuse(s: MergeSettings, mode: str, *options: str) -> None:
    given = {
        "metric": s.metric,
        "threshold": s.threshold,
        "budget": s.budget,
        "base": s.base,
        "calibration": s.calibration,
    }
    extra = [o for o in options if given[o] not in (None, {})]
    if extra:
        raise SettingsError(f"{', '.join(extra)} do(es) not apply to mode {mode}")


def calibration_file(s: MergeSettings, name: str) -> str:
    """The calibration file of model `name` (its own, or the one given for every model)."""
    files = s.calibration or {}
    if name in files:
        return files[name]
    if "*" in files:
        return files["*"]
    raise SettingsError(
        f"mode calibrated needs calibration data for every model; none for {name!r}: give calibration {name}=FILE"
    )


def check_settings(s: MergeSettings, ckpts: list[Checkpoint]) -> MergeSettings:
    """Refuse inconsistent or out-of-range settings; fill the default metric."""
    if s.mode not in ALL_MODES:
        raise SettingsError(f"unknown mode {s.mode!r}: choose from {', '.join(ALL_MODES)}")
    for option, value in (("scale", s.scale), ("density", s.density), ("threshold", s.threshold)):
        if value is not None and not math.isfinite(value):
            raise SettingsError(f"{option} must be a finite number, got {value}")
    if s.representative not in REPRESENTATIVES:
        raise SettingsError(f"unknown representative {s.representative!r}: choose from {', '.join(REPRESENTATIVES)}")
    if s.representative == "best" and s.mode != "calibrated":
        raise SettingsError(
            "representative best needs mode calibrated (it compares members and the mean on calibration data)"
        )
    if s.shard_size <= 0:
        raise SettingsError("shard size must be more than 0 bytes")
    if s.deltas and s.mode != "calibrated":
        raise SettingsError(f"deltas apply to mode calibrated only, not {s.mode} (they are costed on calibration data)")
    if s.delta_format is not None:
        if not s.deltas:
            raise SettingsError(f"a delta format ({s.delta_format}) needs deltas turned on")
        if s.delta_format != AUTO:
            delta_format(s.delta_format)
    if s.non_expert_codec not in codec.CHOICES:
        raise SettingsError(f"unknown non-expert codec {s.non_expert_codec!r}: choose from {', '.join(codec.CHOICES)}")
    if s.mode in MERGE_MODES:
        _refuse(s, s.mode, "metric", "threshold", "budget", "calibration")
        if s.mode in BASE_MODES and s.base is None:
            raise SettingsError(
                f"mode {s.mode} needs a base: the pre-trained checkpoint the models were fine-tuned from"
            )
        if s.mode == "average":
            _refuse(s, s.mode, "base")
        if s.mode == "ties" and not 0 < s.density <= 1:
            raise SettingsError(f"density must be in (0, 1], got {s.density}")
        return s
    if s.mode == "reference":
        _refuse(s, s.mode, "metric", "threshold", "base", "calibration")
        if s.budget is None:
            raise SettingsError("mode reference needs a budget: bank bytes (40GB) or a fraction of all experts (0.5)")
        budget_experts(s.budget, ckpts)
        return s
    if s.mode != "calibrated":
        _refuse(s, s.mode, "base", "calibration")
    if s.mode == "lossless":
        if s.threshold is not None or s.budget is not None or s.metric is not None:
            raise SettingsError("metric, threshold and budget apply to mode threshold or budget, not lossless")
        return s
    metric = s.metric or "cosine"
    if metric not in METRICS:
        raise SettingsError(f"unknown metric {metric!r}: choose from {', '.join(METRICS)}")
    if s.mode == "threshold":
        if s.threshold is None:
            raise SettingsError("mode threshold needs a threshold (e.g. metric cosine, threshold 0.99)")
        if s.budget is not None:
            raise SettingsError("budget applies to mode budget, not threshold")
        threshold_to_distance(metric, s.threshold)
    if s.mode in ("budget", "calibrated"):
        if s.budget is None:
            raise SettingsError(
                f"mode {s.mode} needs a budget: bytes of bank (40GB) or a fraction of all experts (0.5)"
            )
        if s.threshold is not None:
            raise SettingsError(f"threshold applies to mode threshold, not {s.mode}")
        budget_experts(s.budget, ckpts)
    if s.mode == "calibrated":
        _refuse(s, s.mode, "base")
        for c in ckpts:
            calibration_file(s, c.name)
        unknown = sorted(set(s.calibration or {}) - {c.name for c in ckpts} - {"*"})
        if unknown:
            raise SettingsError(
                f"calibration names unknown model(s) {', '.join(unknown)}; the models are {', '.join(c.name for c in ckpts)}"
            )
        if s.calibration_tokens < 1:
            raise SettingsError(f"calibration tokens must be at least 1, got {s.calibration_tokens}")
    return replace(s, metric=metric)


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
        if s.mode == "lossless":  # identity only: hash the bytes on disk, build no tensors
            layer_digests = [_scanned_digest(c, layer, e) for c in ckpts for e in range(E)]
            distance = None
        else:
            probes = gaussian_probes(hidden_size(ref), DEFAULT_PROBES, s.seed + i) if s.metric == "cka" else None
            sim = layer_similarity(ckpts, layer, [s.metric], probes)
            layer_digests, distance = sim.digests, to_distance(sim.matrices[s.metric], s.metric)
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


def _scanned_digest(ckpt: Checkpoint, layer: str, expert: int) -> str:
    """An expert's identity digest from its bytes on disk, warning (as `read_layer` does)
    about NaN, infinite or all-zero parts seen in the same pass."""
    flags: dict[str, tuple[bool, bool]] = {}
    if ckpt.layout.contiguous:
        digest = range_digest(ckpt.expert_infos(layer, expert), flags)
    else:  # strided parts (gpt-oss): read as tensors; the same digest (digest.py)
        parts = ckpt.expert(layer, expert)
        digest = tensor_digest(parts)
        flags = {part: value_flags(t) for part, t in parts.items()}
    for part, (finite, nonzero) in flags.items():
        warn_unusual(ckpt.name, layer, expert, part, finite, nonzero)
    return digest


def plan_reference(ckpts: list[Checkpoint], s: MergeSettings, progress: Progress | None = None) -> list[LayerPlan]:
    """The reference system's plan (baselines.reference_*): same-index positions sorted by
    summed pairwise L2 distance, the closest shared first, as many as the budget needs;
    a shared position keeps model (k mod N)'s expert for every model; the others stay
    per model (no deduplication, as in the reference system)."""
    ref = ckpts[0]
    E, N, L = ref.num_experts, len(ckpts), len(ref.moe_layers)
    distances = {}
    for i, layer in enumerate(ref.moe_layers):
        if progress:
            progress("plan", i, L)
        distances[layer] = baselines.reference_distances(read_layer(ckpts, layer).experts)
    if progress:
        progress("plan", L, L)
    excess = N * L * E - budget_experts(s.budget, ckpts)
    shared = 0 if N == 1 or excess <= 0 else min(L * E, -(-excess // (N - 1)))
    plan = baselines.reference_plan(distances, N, shared)
    plans = []
    for layer in ref.moe_layers:
        clusters, reps = [], []
        for e in range(E):
            if e in plan[layer]:
                clusters.append([m * E + e for m in range(N)])
                reps.append(plan[layer][e] * E + e)
            else:
                clusters += [[m * E + e] for m in range(N)]
                reps += [m * E + e for m in range(N)]
        order = sorted(range(len(clusters)), key=lambda k: clusters[k][0])
        plans.append(LayerPlan(layer, [clusters[k] for k in order], [reps[k] for k in order]))
    return plans


def plan_calibrated(ckpts: list[Checkpoint], s: MergeSettings, progress: Progress | None = None) -> list[LayerPlan]:
    """Budget mode driven by each model's own activations (module calibration): capture
    every model once, cost every substitution per layer, cluster greedily by least added
    cost, then pick each shared expert's representative (s.representative). A layer at the
    floor (E bank experts) may instead take the same-index clusters of uniform averaging,
    when they cost less on the calibration tokens with their own representatives. With
    `s.deltas`, the bank size and the slots' deltas share the budget (`delta_plan`)."""
    inputs = calibrated_inputs(ckpts, s, progress)
    if s.deltas:
        from .correction_plan import plan_with_deltas

        return plan_with_deltas(ckpts, s, inputs, progress)
    return calibrated_plans(ckpts, s, inputs, budget_experts(s.budget, ckpts))


@dataclass
class CalibratedInputs:
    """What calibrated planning measures once: each model's activations, and per layer the
    identical groups, the experts' digests and the substitution costs."""

    acts: list[ModelActivations]
    groups: list[LayerGroups]
    digests: list[list[str]]
    costs: list[LayerCosts]


def calibrated_inputs(ckpts: list[Checkpoint], s: MergeSettings, progress: Progress | None = None) -> CalibratedInputs:
    """Capture every model's activations and cost every substitution, one layer at a time."""
    from ..analysis.calibration import capture, substitution_costs

    ref = ckpts[0]
    E, L = ref.num_experts, len(ref.moe_layers)
    acts = []
    for m, c in enumerate(ckpts):
        if progress:
            progress("calibrate", m, len(ckpts))
        acts.append(capture(c, calibration_file(s, c.name), max_tokens=s.calibration_tokens))
    if progress:
        progress("calibrate", len(ckpts), len(ckpts))
    groups, digests, costs = [], [], []
    for i, layer in enumerate(ref.moe_layers):
        if progress:
            progress("plan", i, L)
        experts = read_layer(ckpts, layer)
        sim = layer_similarity(
            ckpts,
            layer,
            [s.metric],
            None if s.metric != "cka" else gaussian_probes(hidden_size(ref), DEFAULT_PROBES, s.seed + i),
            experts=experts,
        )
        groups.append(identical_groups(layer, sim.digests, E, to_distance(sim.matrices[s.metric], s.metric)))
        digests.append(sim.digests)
        costs.append(substitution_costs(ref, layer, experts.flat, acts))
    if progress:
        progress("plan", L, L)
    return CalibratedInputs(acts, groups, digests, costs)


def calibrated_plans(
    ckpts: list[Checkpoint], s: MergeSettings, inputs: CalibratedInputs, max_bank: int
) -> list[LayerPlan]:
    """The calibrated clustering into at most `max_bank` bank experts, with representatives;
    each model's costs weighted by `clustering.fair_weights`, so that no model carries most
    of the cost."""
    ref = ckpts[0]
    E = ref.num_experts
    acts = inputs.acts
    weights = fair_weights(inputs.groups, [c.cost for c in inputs.costs], max_bank)
    costs = [c.weighted(weights) for c in inputs.costs]
    clusters = cluster_calibrated(inputs.groups, [c.cost for c in costs], max_bank)
    plans = []
    for layer, cs, lg, d, lc in zip(ref.moe_layers, clusters, inputs.groups, inputs.digests, costs):
        flat: list = []  # the layer's experts, read only when a mean must be costed

        def experts() -> list:
            if not flat:
                flat.extend(read_layer(ckpts, layer).flat)
            return flat

        options = [cs]
        aligned = same_index_clusters(lg, len(ckpts))
        if len(cs) == E and aligned is not None and aligned != cs:
            options.append(aligned)
        chosen = [calibrated_representatives(ref, layer, c, d, lc, acts, s.representative, experts) for c in options]
        k = min(range(len(options)), key=lambda o: (chosen[o][2], o))
        plans.append(LayerPlan(layer, options[k], chosen[k][0], chosen[k][1]))
    return plans


def same_index_clusters(lg: LayerGroups, n_models: int) -> list[list[int]] | None:
    """The clusters of uniform averaging: bank expert e = every model's expert e; None where
    bit-identical experts across expert indices rule it out (they must share)."""
    E = lg.num_experts
    if any(len({i % E for i in g}) > 1 for g in lg.groups):
        return None
    return [[m * E + e for m in range(n_models)] for e in range(E)]


def calibrated_representatives(
    ref: Checkpoint,
    layer: str,
    clusters: list[list[int]],
    digests: list[str],
    lc: LayerCosts,
    acts: list[ModelActivations],
    rule: str,
    experts: Callable[[], list[dict[str, torch.Tensor]]],
) -> tuple[list[int | None], list[list[float] | None], float]:
    """(representatives, mean weights, total calibrated cost) of one layer's clusters under
    `rule`: `first` / `medoid` (the least-cost member) / `mean` (usage-weighted) / `best`
    (the cheaper of the two). The cost of a mean is measured on the calibration tokens
    (`calibration.candidate_cost`); `experts()` gives the layer's flat expert list."""
    from ..analysis.calibration import candidate_cost

    reps: list[int | None] = []
    weights: list[list[float] | None] = []
    total = 0.0
    for members in clusters:
        best_cost, best = cluster_cost(members, lc.cost)
        if len({digests[i] for i in members}) == 1 or rule == "first":
            reps.append(members[0]), weights.append(None)
            total += float(lc.cost[members, members[0]].sum())
            continue
        w = [float(lc.usage[i]) for i in members]
        w = [1.0] * len(members) if sum(w) <= 0 else w
        if rule == "medoid":
            reps.append(best), weights.append(None)
            total += best_cost
            continue
        flat = experts()
        mean = {p: _weighted_mean([flat[i][p] for i in members], w) for p in ref.layout.parts}
        mean_cost = candidate_cost(ref, layer, flat, members, mean, acts, lc.norm)
        if rule == "mean" or mean_cost < best_cost:
            reps.append(None), weights.append(w)
            total += mean_cost
        else:
            reps.append(best), weights.append(None)
            total += best_cost
    return reps, weights, total


def plan_merged(ckpts: list[Checkpoint], s: MergeSettings) -> list[LayerPlan]:
    """A merging baseline: bank expert e of each layer = the merge of every model's expert e."""
    ref = ckpts[0]
    E, N = ref.num_experts, len(ckpts)
    return [
        LayerPlan(layer, [[m * E + e for m in range(N)] for e in range(E)], [None] * E, None, s.mode)
        for layer in ref.moe_layers
    ]


def combine(mode: str, tensors: list[torch.Tensor], base: torch.Tensor | None, s: MergeSettings) -> torch.Tensor:
    """One tensor of a merging baseline (formulas in moeconsol.consolidate.baselines and docs/quality.md)."""
    if not tensors[0].is_floating_point():
        if any(not torch.equal(t, tensors[0]) for t in tensors[1:]):
            raise IncompatibleModelsError(f"cannot merge integer tensors that differ between models (mode {mode})")
        return tensors[0]
    if mode == "average":
        return baselines.uniform_average(tensors)
    assert base is not None
    if mode == "task-arithmetic":
        return baselines.task_arithmetic(base, tensors, s.scale)
    return baselines.ties(base, tensors, s.density, s.scale)


def _weighted_mean(tensors: Iterable[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """sum_i w_i t_i / sum_i w_i, accumulated in float64 one tensor at a time (an iterator is
    read lazily), cast to the inputs' dtype."""
    acc, dtype = None, None
    for t, w in zip(tensors, weights):
        if acc is None:
            acc, dtype = torch.zeros(t.shape, dtype=torch.float64), t.dtype
        acc.add_(t.to(torch.float64), alpha=w)
    assert acc is not None and dtype is not None
    return acc.div_(sum(weights)).to(dtype)


def _tensor_digest(ckpt: Checkpoint, name: str) -> str:
    """Digest of a stored tensor's dtype, shape and bytes (read through a reused buffer)."""
    info = ckpt.tensors[name]
    return range_digest({f"{info.dtype}{list(info.shape)}": info})


def plan_non_experts(ckpts: list[Checkpoint], progress: Progress | None = None) -> NonExpertPlan:
    """Hash every non-expert tensor of every model (one at a time); keep each version once."""
    disk = [{c.layout.canonical_name(n): n for n in c.non_expert_names} for c in ckpts]
    names = sorted(disk[0], key=natural_key)
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
                    heads = [_head(ckpts[x.model].tensors[x.disk_name], codec.PROBE_ELEMENTS) for x in (t, first)]
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


def _head(info: TensorInfo, n: int) -> torch.Tensor:
    """The first `n` elements of a stored tensor, flat, read from its file."""
    return read_tensor(TensorInfo(info.file, info.dtype, (n,), info.start, info.start + n * ITEMSIZE[info.dtype]))


# -- pass 2: write ------------------------------------------------------------------------


def _bank_specs(ckpts: list[Checkpoint], plans: list[LayerPlan]) -> list[TensorSpec]:
    ref = ckpts[0]
    return [
        TensorSpec(bank_key(p.layer, k, part), ref.dtype, ref.expert_shape(part))
        for p in plans
        for k in range(len(p.clusters))
        for part in ref.layout.parts
    ]


def _write_bank(
    writer: ShardedWriter,
    ckpts: list[Checkpoint],
    plans: list[LayerPlan],
    progress: Progress | None,
    done: list[int],
    total: int,
    s: MergeSettings | None = None,
    base: Checkpoint | None = None,
) -> None:
    E = ckpts[0].num_experts
    parts = ckpts[0].layout.parts
    for p in plans:
        for k, (members, rep) in enumerate(zip(p.clusters, p.representatives)):
            if rep is not None and ckpts[rep // E].layout.contiguous:  # byte ranges of the source: copy the bytes
                for part, info in ckpts[rep // E].expert_infos(p.layer, rep % E).items():
                    writer.copy(bank_key(p.layer, k, part), info)
            elif rep is not None:  # strided parts (gpt-oss): the same bytes, through memory
                for part, tensor in ckpts[rep // E].expert(p.layer, rep % E).items():
                    writer.write(bank_key(p.layer, k, part), tensor)
            else:
                for part in parts:
                    if p.combine is not None:
                        tensors = [ckpts[i // E].expert_part(p.layer, i % E, part) for i in members]
                        for i, t in zip(members, tensors):
                            warn_unusual_values(ckpts[i // E].name, p.layer, i % E, part, t)
                        b = base.expert_part(p.layer, members[0] % E, part) if base is not None else None
                        value = combine(p.combine, tensors, b, s)
                    else:
                        value = stored_bank_part(_part_reader(ckpts, p.layer, part), p, k)
                    writer.write(bank_key(p.layer, k, part), value)
            done[0] += 1
            if progress:
                progress("write", done[0], total)


def stored_bank_part(part_of: Callable[[int], torch.Tensor], p: LayerPlan, k: int) -> torch.Tensor:
    """The values bank entry `k` of a (non-baseline) plan stores for one part, given that
    part of each expert by flat index (`part_of`): its representative's, or the (weighted)
    mean of its members. The one definition: `_write_bank` writes it, deltas are taken
    against it (`_write_deltas`, `delta_plan`)."""
    members, rep = p.clusters[k], p.representatives[k]
    if rep is not None:
        return part_of(rep)
    w = (p.weights[k] if p.weights else None) or [1.0] * len(members)
    return _weighted_mean((part_of(i) for i in members), w)


def _part_reader(ckpts: list[Checkpoint], layer: str, part: str) -> Callable[[int], torch.Tensor]:
    """Flat index (model * E + expert) -> that expert's `part` in `layer`, read now."""
    E = ckpts[0].num_experts
    return lambda i: ckpts[i // E].expert_part(layer, i % E, part)


def _delta_specs(ckpts: list[Checkpoint], plans: list[LayerPlan]) -> list[TensorSpec]:
    """Every delta component of every plan, in the order `_write_deltas` writes them."""
    ref = ckpts[0]
    dtype, names = torch_dtypes()[ref.dtype], dtype_names()
    specs = []
    for p in plans:
        for d in p.deltas:
            for part in ref.layout.parts:
                comps = FORMATS[d.format].components(tuple(ref.expert_shape(part)), d.size, dtype)
                for c, (cdtype, shape) in comps.items():
                    specs.append(
                        TensorSpec(
                            delta_key(p.layer, ckpts[d.model].name, d.expert, part, c), names[cdtype], tuple(shape)
                        )
                    )
    return specs


def _write_deltas(
    writer: ShardedWriter,
    ckpts: list[Checkpoint],
    plans: list[LayerPlan],
    progress: Progress | None,
    done: list[int],
    total: int,
) -> None:
    """Encode each delta slot's parts against its bank entry's stored values, one part in memory."""
    ref = ckpts[0]
    E, dtype = ref.num_experts, torch_dtypes()[ref.dtype]
    for p in plans:
        for d in p.deltas:
            k = p.bank_index(d.model * E + d.expert)
            for part in ref.layout.parts:
                own = ckpts[d.model].expert_part(p.layer, d.expert, part)
                bank = stored_bank_part(_part_reader(ckpts, p.layer, part), p, k)
                comps = FORMATS[d.format].encode(own.float() - bank.float(), d.size, dtype)
                for c, tensor in comps.items():
                    writer.write(delta_key(p.layer, ckpts[d.model].name, d.expert, part, c), tensor)
            done[0] += 1
            if progress:
                progress("write", done[0], total)


def plan_merged_non_experts(ckpts: list[Checkpoint]) -> tuple[list[TensorSpec], dict[str, str], dict[str, str]]:
    """A merging baseline's non-expert tensors: one merged tensor per name, key NAME@0, that
    every model maps to. Returns (specs, in-memory name -> key, in-memory name -> disk name
    of model 0)."""
    ref = ckpts[0]
    disk = {ref.layout.canonical_name(n): n for n in ref.non_expert_names}
    names = sorted(disk, key=natural_key)
    specs = [TensorSpec(f"{n}@0", ref.tensors[disk[n]].dtype, ref.tensors[disk[n]].shape) for n in names]
    return specs, {n: f"{n}@0" for n in names}, {n: disk[n] for n in names}


def _merged_non_expert(ckpts: list[Checkpoint], base: Checkpoint | None, name: str, s: MergeSettings) -> torch.Tensor:
    tensors = []
    for c in ckpts:
        own = {c.layout.canonical_name(n): n for n in c.non_expert_names}
        tensors.append(c.read(own[name]))
    b = None
    if base is not None:
        own = {base.layout.canonical_name(n): n for n in base.non_expert_names}
        b = base.read(own[name])
    return combine(s.mode, tensors, b, s)


def _consolidation(s: MergeSettings, ckpts: list[Checkpoint], base: Checkpoint | None) -> dict:
    """The manifest's `consolidation` record: the settings that made the bank."""
    budgeted = s.mode in ("budget", "calibrated", "reference")
    c = {
        "mode": s.mode,
        "metric": s.metric,
        "threshold": s.threshold,
        "budget": s.budget,
        "budget_experts": budget_experts(s.budget, ckpts) if budgeted else None,
        "representative": None if s.mode in MERGE_MODES or s.mode == "reference" else s.representative,
        "probe_seed": s.seed if s.metric == "cka" else None,
    }
    if s.mode in MERGE_MODES:
        c["base"] = None if base is None else base.source
        if s.mode in BASE_MODES:
            c["scale"] = s.scale
        if s.mode == "ties":
            c["density"] = s.density
    if s.mode == "calibrated":
        c["calibration"] = {ck.name: calibration_file(s, ck.name) for ck in ckpts}
        c["calibration_tokens"] = s.calibration_tokens
    if s.deltas:
        c["deltas"] = True
        c["delta_format"] = s.delta_format or AUTO
        c["budget_bytes"] = budget_bytes(s.budget, ckpts)
    return c


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
    ref = ckpts[0]
    base = None
    if s.mode in BASE_MODES:
        base = open_checkpoint(s.base)
        check_compatible([*ckpts, base])
    for c in [*ckpts, *([base] if base is not None else [])]:
        check_config(c)
    inputs = [c.path for c in ckpts] + ([base.path] if base is not None else [])
    inputs += [Path(f) for f in (s.calibration or {}).values()]
    check_destination(out, force, inputs)
    one_model = sum(info.nbytes for info in ref.tensors.values())
    check_free_space(out, one_model)

    if s.mode in MERGE_MODES:
        plans = plan_merged(ckpts, s)
        tensor_specs, merged_keys, _ = plan_merged_non_experts(ckpts)
        non_experts = NonExpertPlan([], [dict(merged_keys) for _ in ckpts])
    else:
        if s.mode == "reference":
            plans = plan_reference(ckpts, s, progress)
        elif s.mode == "calibrated":
            plans = plan_calibrated(ckpts, s, progress)
        else:
            plans = plan_layers(ckpts, s, progress)
        non_experts = plan_non_experts(ckpts, progress)
        tensor_specs = [t.spec for t in non_experts.stored]
    bank_specs = _bank_specs(ckpts, plans)
    delta_specs = _delta_specs(ckpts, plans)
    side = {c.name: c.side_files() for c in ckpts}
    estimate = sum(x.nbytes + _HEADER_ALLOWANCE for x in bank_specs + tensor_specs + delta_specs)
    estimate += sum(p.stat().st_size for files in side.values() for p in files) + (1 << 20)
    if s.non_expert_codec != codec.NONE:  # room for the blobs waiting to be copied in
        estimate += sum(t.spec.nbytes for t in non_experts.stored if not t.key.endswith("@0"))
    check_free_space(out, estimate)

    files: dict[str, FileRecord] = {}
    total_steps = sum(len(p.clusters) + len(p.deltas) for p in plans) + len(tensor_specs)
    done = [0]
    with atomic_directory(out, force=force, inputs=inputs) as tmp:
        bank = ShardedWriter(tmp, "bank", bank_specs, s.shard_size)
        _write_bank(bank, ckpts, plans, progress, done, total_steps, s, base)
        files.update(bank.close())
        delta_map: dict[str, str] = {}
        if delta_specs:
            deltas = ShardedWriter(tmp, "deltas", delta_specs, s.shard_size)
            _write_deltas(deltas, ckpts, plans, progress, done, total_steps)
            files.update(deltas.close())
            delta_map = deltas.weight_map
        whole_specs = tensor_specs
        encoded: dict[str, EncodedTensor] = {}
        spill = tmp / ".encoded-non-experts"
        if s.non_expert_codec != codec.NONE and non_experts.stored:
            encoded = encode_non_experts(ckpts, non_experts, spill, progress)
            tensor_specs = [
                TensorSpec(x.name, "U8", encoded[x.name].blob.shape) if x.name in encoded else x for x in tensor_specs
            ]
        tensors = ShardedWriter(tmp, "tensors", tensor_specs, s.shard_size)
        if s.mode in MERGE_MODES:
            for spec in tensor_specs:
                tensors.write(spec.name, _merged_non_expert(ckpts, base, spec.name.rsplit("@", 1)[0], s))
                done[0] += 1
                if progress:
                    progress("write", done[0], total_steps)
        for t in non_experts.stored:
            tensors.copy(t.key, encoded[t.key].blob if t.key in encoded else ckpts[t.model].tensors[t.disk_name])
            done[0] += 1
            if progress:
                progress("write", done[0], total_steps)
        files.update(tensors.close())
        spill.unlink(missing_ok=True)
        for c in ckpts:
            (tmp / "models" / c.name).mkdir(parents=True)
            for p in side[c.name]:
                files[f"models/{c.name}/{p.name}"] = copy_file(p, tmp / "models" / c.name / p.name)
        written = Written(
            files=files,
            weight_map={**bank.weight_map, **delta_map, **tensors.weight_map},
            bank=bank_specs,
            deltas=delta_specs,
            non_experts=tensor_specs,
            non_experts_whole=whole_specs,
            encodings={key: e.encoding for key, e in encoded.items()},
            side_files={c.name: [p.name for p in side[c.name]] for c in ckpts},
        )
        manifest = build_manifest(ckpts, _consolidation(s, ckpts, base), plans, non_experts.keys, written)
        text = manifest.dumps().encode()
        (tmp / MANIFEST).write_bytes(text)
    b = manifest.bytes
    return MergeResult(
        path=out,
        manifest=manifest.to_json(),
        input_bytes=b["inputs"],
        artifact_bytes=sum(r.size for r in files.values()) + len(text),
        expert_bytes_in=b["experts_in"],
        bank_bytes=b["bank"],
        bank_sizes={p.layer: len(p.clusters) for p in plans},
        delta_bytes=sum(x.nbytes for x in delta_specs),
    )
