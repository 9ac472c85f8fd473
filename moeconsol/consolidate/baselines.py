"""Plain merging baselines and the reference system's sharing plan, as pure functions.

Consolidation is only worth its complexity if it beats merging the N fine-tunes into one
model. These are the merges it is compared with, applied tensor by tensor (so a caller can
stream a checkpoint one tensor at a time), each with its exact formula. N = len(tensors);
`base` is the common pre-trained tensor the N fine-tunes started from. Arithmetic is done in
float32 (float64 inputs stay float64) and the result is cast back to the inputs' dtype.

    uniform_average:  (1/N) * sum_i t_i
    task_arithmetic:  base + scale * sum_i (t_i - base)            (Ilharco et al., 2023)
    ties:             base + scale * disjoint_mean(trim(t_i - base))   (Yadav et al., 2023)

The reference system (hamid-74/Multi-MoE, arXiv 2505.06481) does not merge: it keeps, at
each (layer, expert index) position, one model's expert for all models. Its plan is
reproduced by `reference_distances`, `reference_shared_positions` and `reference_plan`
(formulas on each function and in docs/quality.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ..errors import IncompatibleModelsError, SettingsError


def _check(tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None) -> torch.Size:
    if len(tensors) == 0:
        raise SettingsError("nothing to merge: give at least one tensor")
    shape = base.shape if base is not None else tensors[0].shape
    for i, t in enumerate(tensors):
        if t.shape != shape:
            raise IncompatibleModelsError(
                f"cannot merge tensors of different shapes: {tuple(t.shape)} (tensor {i}) vs {tuple(shape)}"
            )
    return shape


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def uniform_average(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """(1/N) * sum_i t_i, summed in float32 (float64 stays float64), cast back."""
    _check(tensors)
    dtype = _work_dtype(tensors[0])
    acc = torch.zeros(tensors[0].shape, dtype=dtype)
    for t in tensors:
        acc += t.to(dtype)
    return (acc / len(tensors)).to(tensors[0].dtype)


def task_arithmetic(base: torch.Tensor, tensors: Sequence[torch.Tensor], scale: float = 1.0) -> torch.Tensor:
    """base + scale * sum_i (t_i - base).

    The default scale 1.0 applies every task vector in full (Ilharco et al.'s lambda = 1):
    with one fine-tune it returns that fine-tune, and fine-tunes that changed disjoint
    weights each keep their change. scale = 1/N gives exactly the uniform average of the
    fine-tunes; a lambda tuned on held-out data is the usual practice in between.
    """
    _check(tensors, base)
    dtype = _work_dtype(base)
    b = base.to(dtype)
    delta = torch.zeros(base.shape, dtype=dtype)
    for t in tensors:
        delta += t.to(dtype) - b
    return (b + scale * delta).to(base.dtype)


def trim_top_k(tau: torch.Tensor, density: float) -> torch.Tensor:
    """tau with all but its k = ceil(density * numel) largest-magnitude entries set to 0.

    Entries whose magnitude equals the k-th largest are all kept (a deterministic rule for
    ties, so slightly more than k entries can survive).
    """
    n = tau.numel()
    k = min(n, math.ceil(density * n))
    if k == 0:
        return torch.zeros_like(tau)
    mag = tau.abs().reshape(-1)
    threshold = torch.kthvalue(mag, n - k + 1).values
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))


def ties(base: torch.Tensor, tensors: Sequence[torch.Tensor], density: float = 0.2, scale: float = 1.0) -> torch.Tensor:
    """TIES-merging: trim, elect sign, disjoint mean.

    tau_i    = t_i - base
    trimmed  = trim_top_k(tau_i, density)      per tensor, k = ceil(density * numel)
    sign     = sign(sum_i trimmed_i)           per entry (0 where the sum is 0)
    agree_i  = trimmed_i != 0 and sign(trimmed_i) == sign
    merged   = sum_i trimmed_i [agree_i] / #{i : agree_i}   (0 where no tau agrees)
    result   = base + scale * merged
    """
    if not 0 < density <= 1:
        raise SettingsError(f"TIES `density` must be in (0, 1], got {density}")
    _check(tensors, base)
    dtype = _work_dtype(base)
    b = base.to(dtype)
    # one task vector at a time, so the extra memory is N trimmed vectors and a few buffers
    trimmed = [trim_top_k(t.to(dtype) - b, density) for t in tensors]
    sign = torch.zeros_like(b)
    for tr in trimmed:
        sign += tr
    sign = torch.sign(sign)
    total = torch.zeros_like(b)
    count = torch.zeros_like(b)
    for tr in trimmed:
        agree = (tr * sign) > 0  # same, non-zero sign as the elected one
        total += torch.where(agree, tr, 0.0)
        count += agree
    merged = torch.where(count > 0, total / count.clamp(min=1), 0.0)
    return (b + scale * merged).to(base.dtype)


# ---------------------------------------------------------------- reference system's plan


def reference_distances(layer_experts: Sequence[Sequence[Mapping[str, torch.Tensor]]]) -> np.ndarray:
    """d[e] = sum over model pairs m < m' of || x_{m,e} - x_{m',e} ||_2, for one layer.

    `layer_experts[m][e]` is model m's expert e as {part: tensor} (e.g.
    `similarity.read_layer(...).experts`); x_{m,e} is its parts flattened and concatenated.
    Computed in float64. With one model every distance is 0.
    """
    n_models = len(layer_experts)
    if n_models == 0:
        raise SettingsError("no models given")
    n_experts = len(layer_experts[0])
    for m, experts in enumerate(layer_experts):
        if len(experts) != n_experts:
            raise IncompatibleModelsError(
                f"model {m} has {len(experts)} experts in this layer, model 0 has {n_experts}"
            )
    dist = np.zeros(n_experts, dtype=np.float64)
    for e in range(n_experts):
        parts = sorted(layer_experts[0][e])
        for m in range(n_models):
            for m2 in range(m + 1, n_models):
                a, b = layer_experts[m][e], layer_experts[m2][e]
                if sorted(a) != parts or sorted(b) != parts:
                    raise IncompatibleModelsError(f"expert {e}: models {m} and {m2} have different parts")
                sq = 0.0
                for p in parts:
                    if a[p].shape != b[p].shape:
                        raise IncompatibleModelsError(f"expert {e} part {p}: shapes differ between models {m} and {m2}")
                    sq += float(torch.sum((a[p].to(torch.float64) - b[p].to(torch.float64)) ** 2))
                dist[e] += math.sqrt(sq)
    return dist


def reference_budget_positions(available_bytes: int, expert_bytes: int) -> int:
    """How many expert positions fit: floor(available_bytes / expert_bytes), as the reference
    system computes it from the GPU memory left after the non-expert layers."""
    if expert_bytes <= 0:
        raise SettingsError(f"expert size must be positive, got {expert_bytes} bytes")
    return max(0, int(available_bytes // expert_bytes))


def reference_shared_positions(distances: np.ndarray, budget_positions: int) -> list[tuple[int, int]]:
    """The `budget_positions` (layer, expert) positions of smallest distance, smallest first.

    `distances` is [L, E] (row = MoE layer in model order). Ties keep row-major order
    (layer, then expert index): a stable sort. A budget above L*E shares every position.
    """
    d = np.asarray(distances, dtype=np.float64)
    if d.ndim != 2:
        raise SettingsError(f"distances must be a [layers, experts] array, got shape {d.shape}")
    if np.isnan(d).any():
        raise SettingsError("distances contain NaN")
    if budget_positions < 0:
        raise SettingsError(f"budget must be a non-negative number of positions, got {budget_positions}")
    order = np.argsort(d.reshape(-1), kind="stable")[:budget_positions]
    n_experts = d.shape[1]
    return [(int(i) // n_experts, int(i) % n_experts) for i in order]


def reference_plan(
    distances_per_layer: Mapping[str, np.ndarray], n_models: int, shared_positions: int
) -> dict[str, dict[int, int]]:
    """layer -> {expert index: model whose expert is kept for all models}, for shared positions.

    Layers are taken in the mapping's order (model order). The k-th shared position in
    ascending distance (k = 0, 1, ...) keeps model k mod n_models's expert: round-robin, no
    averaging. Positions not in the plan are not shared (each model keeps its own expert,
    copied from host memory when routed to). Every layer appears, possibly with {}.
    """
    if n_models < 1:
        raise SettingsError(f"need at least one model, got {n_models}")
    layers = list(distances_per_layer)
    if not layers:
        return {}
    rows = [np.asarray(distances_per_layer[name], dtype=np.float64) for name in layers]
    for name, row in zip(layers, rows):
        if row.shape != rows[0].shape or row.ndim != 1:
            raise SettingsError(f"layer {name}: expected {rows[0].shape[0]} expert distances, got shape {row.shape}")
    plan: dict[str, dict[int, int]] = {name: {} for name in layers}
    for k, (li, e) in enumerate(reference_shared_positions(np.stack(rows), shared_positions)):
        plan[layers[li]][e] = k % n_models
    return plan
