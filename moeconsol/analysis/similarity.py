"""How alike experts are: cosine, L2, relative L2 of weights, and linear CKA of outputs.

For one MoE layer, every expert of every model is compared with every other: the result is
an (N*E) x (N*E) matrix per metric, row/column `model_index * E + expert_index`, models in
the order given. Work is done one layer at a time: the layer's experts of all N models are
read, measured, and dropped before the next layer is read.

Weight metrics come from one float64 Gram matrix of the flattened experts (each expert is
its canonical parts concatenated in `Layout.parts` order), accumulated over column slices
of a few MiB, each slice a task for a pool of single-threaded workers; read straight from
the byte ranges on disk when no tensor of the layer is needed otherwise (`_weight_layer`):
    cosine(i, j)      = G_ij / sqrt(G_ii G_jj)
    l2(i, j)          = sqrt(G_ii + G_jj - 2 G_ij)
    relative-l2(i, j) = l2(i, j) / max(|x_i|, |x_j|)
Bit-identical experts (same digest of their bytes, `digest.py`) get exactly cosine 1 and distance 0, and
*only* they do: any other pair is clamped just below 1 / just above 0, so `cosine == 1.0`
means "bit-identical" and a threshold of 1.0 reproduces lossless sharing. Bit-identical
experts are measured once and share their row (see `layer_similarity`).

CKA is linear CKA (Kornblith et al. 2019) between two experts' outputs on the same probe
inputs X [n, H]: with Y = expert(X) centred over the n rows and K = Y Y^T,
    CKA(i, j) = <K_i, K_j>_F / (|K_i|_F |K_j|_F)
clipped to [0, 1], exactly 1 for bit-identical experts. Unlike cosine, CKA can be 1 for
different experts (it ignores scaling and rotations of the outputs).
Probes are the inputs the first model's MoE block actually receives on calibration text
(`probe_inputs_from_text`), or seeded standard Gaussian vectors when no text is given.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import blake3
import numpy as np

from ..architectures.layouts import ExpertKind
from ..errors import CheckpointError, SettingsError
from ..io import quant
from ..io.checkpoint import Checkpoint, warn_unusual, warn_unusual_values
from ..io.digest import range_digest, tensor_digest, value_flags
from ..io.safetensors_file import TensorInfo, read_into, read_tensor, torch_dtypes

if TYPE_CHECKING:
    import torch

METRICS = ("cosine", "l2", "relative-l2", "cka")
WEIGHT_METRICS = ("cosine", "l2", "relative-l2")
"""The metrics computed from the Gram matrix of the experts' weights."""
DISTANCE_METRICS = ("l2", "relative-l2")
"""Smaller is more alike; for cosine and cka larger is more alike."""
DEFAULT_PROBES = 256
_CHUNK_ELEMENTS = 1 << 21
"""Elements (all experts together) of one column slice of the Gram matrix: 16 MiB as float64."""


def check_metrics(metrics: list[str]) -> list[str]:
    for m in metrics:
        if m not in METRICS:
            raise SettingsError(f"unknown `metric` {m!r}: choose from {', '.join(METRICS)}")
    return list(dict.fromkeys(metrics))


@dataclass
class LayerExperts:
    """All experts of one MoE layer, across models: `experts[m][e][part]`, as values
    (`Checkpoint.values`: a quantized release's dequantized)."""

    layer: str
    experts: list[list[dict[str, torch.Tensor]]]
    digests: list[str] | None = None
    """Identity of each expert (flat order) from its stored bytes, where those are not the
    values (quantized releases: codes and scales); None: the digests of the values."""

    @property
    def flat(self) -> list[dict[str, torch.Tensor]]:
        return [e for model in self.experts for e in model]


def read_layer(ckpts: list[Checkpoint], layer: str) -> LayerExperts:
    """Every expert of one layer of every model, as values; NaN, infinite or all-zero parts are
    warned about. A quantized release's experts are dequantized, and told apart by the digests
    of their stored bytes (codes and scales)."""
    experts = [[c.values(layer, e) for e in range(c.num_experts)] for c in ckpts]
    for c, per_model in zip(ckpts, experts):
        for e, parts in enumerate(per_model):
            for part, tensor in parts.items():
                warn_unusual_values(c.name, layer, e, part, tensor)
    digests = None
    if any(c.quantization is not None for c in ckpts):
        digests = identity_keys(ckpts, layer, [e for per_model in experts for e in per_model])
    return LayerExperts(layer, experts, digests)


def mixed(ckpts: list[Checkpoint]) -> bool:
    """Whether quantized and unquantized models are consolidated together (docs/merge.md)."""
    return len({c.quantization is None for c in ckpts}) > 1


def identity_keys(
    ckpts: list[Checkpoint], layer: str, values: list[dict[str, torch.Tensor]] | None = None
) -> list[str]:
    """One key per expert of a layer (flat order), equal exactly for experts that are the same:
    a quantized release's expert by the digest of its stored bytes (codes and scales); an
    unquantized model's by the digest of its bytes, or, where those are exactly a quantized
    expert's values dequantized to its dtype (a fine-tune left it alone), that expert's key.
    `values`: the unquantized models' experts, if already read."""

    E = ckpts[0].num_experts
    keys: dict[int, str] = {}
    as_values: dict[str, str] = {}
    plain = next((c for c in ckpts if c.quantization is None), None)
    dtype = None if plain is None else torch_dtypes()[plain.dtype]
    for m, c in enumerate(ckpts):
        for e in range(E) if c.quantization is not None else ():
            keys[m * E + e] = range_digest(c.expert_infos(layer, e))
            if dtype is not None:
                as_values.setdefault(tensor_digest(c.values(layer, e, dtype)), keys[m * E + e])
    for m, c in enumerate(ckpts):
        for e in range(E) if c.quantization is None else ():
            own = tensor_digest(values[m * E + e] if values is not None else c.expert(layer, e))
            keys[m * E + e] = as_values.get(own, own)
    return [keys[i] for i in range(len(ckpts) * E)]


# -- the Gram matrix ---------------------------------------------------------------------------


WORKERS = max(1, min(len(os.sched_getaffinity(0)), 8))
"""Threads that hash and multiply: one per usable core, at most 8."""


@contextmanager
def _workers() -> Iterator[ThreadPoolExecutor]:
    """A pool of `WORKERS` threads, each running torch on one thread of its own.

    The parallelism is ours, over independent tasks (one expert's digest, one column slice
    of the Gram matrix), not torch's intra-op pool: on shared cores two OpenMP threads
    waited for each other at every small operation (1.0 s with one thread vs 11.3 s with
    two for the same Gram). OpenMP's thread count is per thread, but
    `torch.set_num_threads` also stores the count every thread starts from: the workers
    set it all together, then it is restored before any task runs, so no other thread
    (this one or a thread that has not used torch yet) runs with it."""
    import torch

    threads = torch.get_num_threads()  # also settles this thread's own count first
    ready = threading.Barrier(WORKERS)

    def one_thread() -> None:
        torch.get_num_threads()  # torch's first-use set-up of this thread, which reads the stored count
        torch.set_num_threads(1)
        ready.wait(timeout=60)

    pool = ThreadPoolExecutor(WORKERS, initializer=one_thread)
    try:
        list(pool.map(int, range(WORKERS)))  # starts every worker
        torch.set_num_threads(threads)
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_local = threading.local()


def _thread_buffer(name: str, nbytes: int) -> torch.Tensor:
    """This thread's reused uint8 buffer of at least `nbytes` (faulted in once, not per slice)."""
    import torch

    buf = getattr(_local, name, None)
    if buf is None or buf.numel() < nbytes:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        setattr(_local, name, buf)
    return buf


Fill = Callable[["torch.Tensor", str, int, int], None]
"""fill(out [n, hi - lo] float64, part, lo, hi): columns lo:hi of part `part` of every expert."""


def _slice_gram(fill: Fill, n: int, part: str, lo: int, hi: int) -> torch.Tensor:
    """<x_i, x_j> over columns lo:hi of one part, float64: the slice converted once, one GEMM."""
    import torch

    out = _thread_buffer("f64", n * (hi - lo) * 8)[: n * (hi - lo) * 8].view(torch.float64).view(n, hi - lo)
    fill(out, part, lo, hi)
    return out @ out.T


def part_grams(fill: Fill, n: int, sizes: dict[str, int], pool: ThreadPoolExecutor) -> dict[str, torch.Tensor]:
    """Per part, G_ij = <x_i, x_j> of the n experts' flattened part, float64.

    Columns are cut in slices of about `_CHUNK_ELEMENTS` elements over all n experts, each
    a task for the pool; the slices' results are added in column order (not in the order
    they finish), so the result does not depend on scheduling."""
    import torch

    width = max(1, _CHUNK_ELEMENTS // max(n, 1))
    tasks = [
        (part, pool.submit(_slice_gram, fill, n, part, lo, min(lo + width, total)))
        for part, total in sizes.items()
        for lo in range(0, total, width)
    ]
    grams = {part: torch.zeros(n, n, dtype=torch.float64) for part in sizes}
    for part, task in tasks:
        grams[part] += task.result()
    return grams


def gram_matrix(experts: list[dict[str, torch.Tensor]], parts: tuple[str, ...]) -> np.ndarray:
    """G_ij = <x_i, x_j> of the flattened experts (tensors in memory), in float64."""
    flat = [{p: e[p].reshape(-1) for p in parts} for e in experts]

    def fill(out: torch.Tensor, part: str, lo: int, hi: int) -> None:
        for row, e in zip(out, flat):
            row.copy_(e[part][lo:hi])

    with _workers() as pool:
        grams = part_grams(fill, len(experts), {p: experts[0][p].numel() for p in parts}, pool)
    return sum(grams.values()).numpy()


def _disk_fill(experts: list[dict[str, TensorInfo]], fds: dict[Path, int]) -> Fill:
    """`Fill` from the experts' byte ranges on disk: each expert's columns lo:hi are one
    pread into this thread's staging buffer, converted to float64 in one call."""

    def fill(out: torch.Tensor, part: str, lo: int, hi: int) -> None:
        n, w = out.shape
        infos = [e[part] for e in experts]
        dtypes = [torch_dtypes()[i.dtype] for i in infos]
        size = max(d.itemsize for d in dtypes)
        raw = _thread_buffer("staging", n * w * size)
        view = memoryview(raw.numpy())
        for j, (info, dtype) in enumerate(zip(infos, dtypes)):
            read_into(
                fds[info.file],
                view[j * w * size : j * w * size + w * dtype.itemsize],
                info.start + lo * dtype.itemsize,
                info.file,
            )
        if all(d == dtypes[0] for d in dtypes):
            out.copy_(raw[: n * w * size].view(dtypes[0]).view(n, w))
        else:
            for j, (row, dtype) in enumerate(zip(out, dtypes)):
                row.copy_(raw[j * w * size : j * w * size + w * dtype.itemsize].view(dtype))

    return fill


def _quant_fill(experts: list[dict[str, TensorInfo]], q: quant.Quantization, units: dict[str, tuple[str, ...]]) -> Fill:
    """`Fill` of a quantized release's units (`io.quant`): each expert's columns lo:hi are
    dequantized from the bytes of its codes that hold them and their scales."""

    def fill(out: torch.Tensor, unit: str, lo: int, hi: int) -> None:
        for row, infos in zip(out, experts):
            row.copy_(quant.values_range(q, infos, unit, units[unit], lo, hi))

    return fill


def weight_metrics(gram: np.ndarray, identical: np.ndarray) -> dict[str, np.ndarray]:
    """cosine, l2 and relative-l2 from a Gram matrix; exact values for identical pairs."""
    sq = np.diag(gram).copy()
    norms = np.sqrt(sq)
    denom = np.sqrt(np.outer(sq, sq))
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = np.where(denom > 0, gram / denom, 0.0)
    l2 = np.sqrt(np.clip(sq[:, None] + sq[None, :] - 2 * gram, 0.0, None))
    larger = np.maximum(norms[:, None], norms[None, :])
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.where(larger > 0, l2 / larger, 0.0)
    below_one = np.nextafter(1.0, 0.0)
    tiny = np.finfo(np.float64).tiny
    cosine = np.where(identical, 1.0, np.clip(cosine, -1.0, below_one))
    l2 = np.where(identical, 0.0, np.maximum(l2, tiny))
    rel = np.where(identical, 0.0, np.maximum(rel, tiny))
    return {"cosine": cosine, "l2": l2, "relative-l2": rel}


def expert_function(ckpt: Checkpoint) -> Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]:
    """The expert's forward pass (float64), from the layout's kind and the config's activation."""
    import torch
    from transformers.activations import ACT2FN  # here, not at import: transformers takes seconds to import

    record = ckpt.layout.record
    act = ACT2FN[ckpt.config.get(record.activation_key, "silu")]
    if record.kind is ExpertKind.GATED:
        gate, up, down = (record.part(r) for r in ("gate", "up", "down"))
        return lambda p, x: (act(x @ p[gate].T) * (x @ p[up].T)) @ p[down].T
    if record.kind is ExpertKind.CLAMPED_SWIGLU:
        gate, up, down, b_gate, b_up, b_down = (
            record.part(r) for r in ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")
        )
        alpha, limit = ckpt.config.get("swiglu_alpha", 1.702), ckpt.config.get("swiglu_limit", 7.0)

        def clamped_swiglu(p, x):
            g = (x @ p[gate].T + p[b_gate]).clamp(max=limit)
            u = (x @ p[up].T + p[b_up]).clamp(min=-limit, max=limit)
            return ((u + 1) * g * torch.sigmoid(g * alpha)) @ p[down].T + p[b_down]

        return clamped_swiglu
    w_in, w_out = record.part("in"), record.part("out")
    return lambda p, x: act(x @ p[w_in].T) @ p[w_out].T


def cka_matrix(experts: list[dict[str, torch.Tensor]], probes: torch.Tensor, fn) -> np.ndarray:
    """Linear CKA between every pair of experts' outputs on `probes` [n, H]."""
    import torch

    x = probes.to(torch.float64)
    kernels = []
    for e in experts:
        y = fn({k: v.to(torch.float64) for k, v in e.items()}, x)
        y = y - y.mean(dim=0, keepdim=True)
        kernels.append((y @ y.T).reshape(-1))
    k = torch.stack(kernels)
    hsic = (k @ k.T).numpy()
    d = np.sqrt(np.diag(hsic))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(np.outer(d, d) > 0, hsic / np.outer(d, d), 0.0)


def gaussian_probes(hidden_size: int, n: int = DEFAULT_PROBES, seed: int = 0) -> torch.Tensor:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, hidden_size, generator=g, dtype=torch.float64)


def hidden_size(ckpt: Checkpoint) -> int:
    return ckpt.value_shape(ckpt.value_layout.parts[0])[1]


@dataclass
class LayerSimilarity:
    layer: str
    matrices: dict[str, np.ndarray]
    identical: np.ndarray
    """identical[i, j]: experts i and j are bit-identical."""
    digests: list[str] = field(default_factory=list)
    """One identity key per expert, equal exactly for bit-identical experts: the expert's
    digest (`digest.py`), or, streamed from disk, for an expert that no other expert of the
    layer could equal, its fingerprint (`_identity_keys`). Compare them within a layer."""


def layer_similarity(
    ckpts: list[Checkpoint],
    layer: str,
    metrics: list[str],
    probes: torch.Tensor | None = None,
    experts: LayerExperts | None = None,
) -> LayerSimilarity:
    """All requested metrics for one layer (reads the layer unless `experts` is given).

    Bit-identical experts (fine-tunes leave many untouched) are measured once: the Gram
    matrix and the CKA kernels are computed over the distinct experts only and spread
    back over all N*E positions, so the cost grows with how much the models differ.

    Without CKA and with `experts` not given, nothing of the layer is held in memory: the
    experts are hashed from their byte ranges on disk, then the distinct ones are streamed
    through the Gram matrix slice by slice (`_weight_layer`), and NaN, infinite or all-zero
    parts are found from the Gram matrix's diagonal.
    """
    if experts is None and _streams(ckpts, metrics):
        return _weight_layer(ckpts, layer, metrics)
    experts = experts or read_layer(ckpts, layer)
    flat = experts.flat
    digests = experts.digests or [tensor_digest(e) for e in flat]
    identical, distinct, where = _deduplicate(digests)
    spread = np.ix_(where, where)
    reps = [flat[i] for i in distinct]
    del experts, flat
    out: dict[str, np.ndarray] = {}
    if any(m in metrics for m in WEIGHT_METRICS):
        weights = weight_metrics(gram_matrix(reps, ckpts[0].value_layout.parts)[spread], identical)
        out.update({m: weights[m] for m in metrics if m in weights})
    if "cka" in metrics:
        if probes is None:
            probes = gaussian_probes(hidden_size(ckpts[0]))
        cka = cka_matrix(reps, probes, expert_function(ckpts[0]))[spread]
        out["cka"] = np.where(identical, 1.0, np.clip(cka, 0.0, 1.0))
    return LayerSimilarity(layer, {m: out[m] for m in metrics}, identical, digests)


def _streams(ckpts: list[Checkpoint], metrics: list[str]) -> bool:
    """Whether `layer_similarity` measures straight from the byte ranges on disk (`_weight_layer`)."""
    return "cka" not in metrics and all(c.layout.contiguous for c in ckpts) and not mixed(ckpts)


def _deduplicate(digests: list[str]) -> tuple[np.ndarray, list[int], list[int]]:
    """(identical[i, j], the first position of each distinct digest, each position's index
    among those: `m[np.ix_(where, where)]` spreads a matrix of the distinct experts back)."""
    identical = np.array([[a == b for b in digests] for a in digests])
    first_of = {d: i for i, d in reversed(list(enumerate(digests)))}
    distinct = sorted(set(first_of.values()))
    where = [distinct.index(first_of[d]) for d in digests]
    return identical, distinct, where


def _weight_layer(
    ckpts: list[Checkpoint], layer: str, metrics: list[str], keys: list[str] | None = None
) -> LayerSimilarity:
    """cosine / l2 / relative-l2 of one layer straight from the byte ranges on disk.

    Two passes, both spread over the worker pool: identity (`_identity_keys`: a fingerprint
    of every expert, then the full digest of those whose fingerprint another shares; one
    reused 8 MiB buffer per worker), then the Gram matrix of the distinct experts, column
    slice by column slice (a few MiB per worker). Memory does not depend on the expert
    size; the second pass reads each distinct expert once more at most, from the page cache
    when the first pass just hashed it. `keys`: the identity keys, if already computed
    (`_identity_ahead`).
    """
    positions = [(c, e) for c in ckpts for e in range(c.num_experts)]
    infos = [c.expert_infos(layer, e) for c, e in positions]
    parts = ckpts[0].layout.parts
    q = ckpts[0].quantization
    with _workers() as pool:
        digests = keys if keys is not None else _identity_keys(infos, pool)
        identical, distinct, where = _deduplicate(digests)
        reps = [infos[i] for i in distinct]
        if q is not None:  # dequantized a column slice at a time, from the codes' and scales' byte ranges
            units = ckpts[0].units
            shapes = {p: tuple(reps[0][p].shape) for p in parts}
            sizes = {u: math.prod(quant.unit_shape(q, shapes, u, ps)) for u, ps in units.items()}
            grams = part_grams(_quant_fill(reps, q, units), len(reps), sizes, pool)
        else:
            files = sorted({info.file for e in reps for info in e.values()})
            fds: dict[Path, int] = {}
            try:
                for f in files:
                    fds[f] = os.open(f, os.O_RDONLY)
                sizes = {p: math.prod(reps[0][p].shape) for p in parts}
                grams = part_grams(_disk_fill(reps, fds), len(reps), sizes, pool)
            finally:
                for fd in fds.values():
                    os.close(fd)
    _warn_unusual_parts(positions, layer, where, reps, grams, q)
    weights = weight_metrics(sum(grams.values()).numpy()[np.ix_(where, where)], identical)
    return LayerSimilarity(layer, {m: weights[m] for m in metrics}, identical, digests)


_WINDOW = 4096
"""Bytes read from each end of each part for an expert's fingerprint."""


def _fingerprint(parts: dict[str, TensorInfo]) -> str:
    """BLAKE3 of each part's name, dtype, shape and first and last `_WINDOW` bytes: experts
    whose fingerprints differ are different; equal fingerprints decide nothing."""
    h = blake3.blake3()
    for name in sorted(parts):
        info = parts[name]
        h.update(f"{name}\0{info.dtype}\0{list(info.shape)}\0".encode())
        with open(info.file, "rb", buffering=0) as f:
            for lo in sorted({info.start, max(info.start, info.end - _WINDOW)}):
                view = memoryview(bytearray(min(_WINDOW, info.end - lo)))
                read_into(f.fileno(), view, lo, info.file)
                h.update(view)
    return h.hexdigest()


def _identity_keys(infos: list[dict[str, TensorInfo]], pool: ThreadPoolExecutor) -> list[str]:
    """One key per expert, equal exactly for bit-identical experts.

    An expert whose fingerprint no other expert of the layer shares cannot be bit-identical
    to any of them: its key is its fingerprint, and its bytes are not hashed. The others
    (fine-tunes leave many experts untouched, and those all share one) are told apart by
    their full digest (`range_digest`). So the identity pass reads about the experts that
    are shared, not every expert: a fine-tuned expert is read once, by the Gram matrix."""
    prints = list(pool.map(_fingerprint, infos))
    counts = Counter(prints)
    todo = [i for i, p in enumerate(prints) if counts[p] > 1]
    full = dict(zip(todo, pool.map(range_digest, [infos[i] for i in todo])))
    return [full[i] if i in full else f"fingerprint:{p}" for i, p in enumerate(prints)]


def _identity_ahead(ckpts: list[Checkpoint]) -> dict[str, list[str]]:
    """Identity keys (`_identity_keys`) of the first layers, hashed while torch is imported
    on another thread: hashing needs no torch (BLAKE3 and pread run without the GIL), the
    Gram matrix does, and importing torch takes about a second. Stops after the layer during
    which the import ends, so hashing runs at most about that second ahead of the Gram
    matrix (whose re-reads of those layers still find them in the page cache). Meanwhile the
    GIL switch interval is 0.2 ms (restored after): the importer holds the GIL, and a hashing
    thread back from BLAKE3 or pread would otherwise wait 5 ms for it after every chunk.
    Nothing is hashed ahead when torch is already imported."""
    if "torch" in sys.modules:
        return {}
    importer = threading.Thread(target=importlib.import_module, args=("torch",), name="import torch")
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0002)
    importer.start()
    keys: dict[str, list[str]] = {}
    try:
        with ThreadPoolExecutor(WORKERS) as pool:
            for layer in ckpts[0].moe_layers:
                keys[layer] = _identity_keys(
                    [c.expert_infos(layer, e) for c in ckpts for e in range(c.num_experts)], pool
                )
                if not importer.is_alive():
                    break
    finally:
        importer.join()
        sys.setswitchinterval(interval)
    return keys


def _warn_unusual_parts(
    positions: list[tuple[Checkpoint, int]],
    layer: str,
    where: list[int],
    reps: list[dict[str, TensorInfo]],
    grams: dict[str, torch.Tensor],
    q: quant.Quantization | None = None,
) -> None:
    """Warn, as `read_layer` does, about parts holding NaN or infinite values or only zeros.

    The diagonal of a part's Gram matrix is the part's sum of squares in float64: finite
    and > 0 means every value is finite and some is non-zero (inf and NaN propagate; a
    square is 0 only for a zero). Anything else (a true NaN or zero, or an overflow or
    underflow of float64 experts' squares) is decided by `value_flags` on the part itself.
    """
    flags: dict[tuple[int, str], tuple[bool, bool]] = {}
    for part, g in grams.items():
        for r, sq in enumerate(g.diagonal().tolist()):
            if not (math.isfinite(sq) and sq > 0):
                flags[(r, part)] = value_flags(_unit_values(reps[r], part, q, positions[0][0]))
    for (c, e), r in zip(positions, where):
        for part in grams:
            if (r, part) in flags:
                warn_unusual(c.name, layer, e, part, *flags[(r, part)])


def _unit_values(infos: dict[str, TensorInfo], unit: str, q: quant.Quantization | None, ckpt: Checkpoint):
    """One part's values (unquantized), or one unit's dequantized."""
    if q is None:
        return read_tensor(infos[unit])
    import torch  # here: this module imports torch only once it computes

    parts = ckpt.units[unit]
    return quant.dequantize(q, {p: read_tensor(infos[p]) for p in parts}, unit, parts, torch.float32)


def analyze(
    ckpts: list[Checkpoint],
    metrics: list[str],
    probes: dict[str, torch.Tensor] | None = None,
    n_probes: int = DEFAULT_PROBES,
    seed: int = 0,
) -> Iterator[LayerSimilarity]:
    """Similarity of every MoE layer, one layer in memory at a time.

    `probes` maps layer -> probe inputs (from `probe_inputs_from_text`); layers without an
    entry use seeded Gaussian probes (seed + layer position) when CKA is asked for.
    """
    metrics = check_metrics(metrics)
    if _streams(ckpts, metrics):
        ahead = _identity_ahead(ckpts)
        for layer in ckpts[0].moe_layers:
            yield _weight_layer(ckpts, layer, metrics, ahead.pop(layer, None))
        return
    for i, layer in enumerate(ckpts[0].moe_layers):
        layer_probes = (probes or {}).get(layer)
        if layer_probes is None and "cka" in metrics:
            layer_probes = gaussian_probes(hidden_size(ckpts[0]), n_probes, seed + i)
        yield layer_similarity(ckpts, layer, metrics, layer_probes)


def probe_inputs_from_text(ckpt: Checkpoint, text: str, n_probes: int = DEFAULT_PROBES) -> dict[str, torch.Tensor]:
    """The hidden states each MoE block of `ckpt` receives on `text` (first `n_probes` tokens).

    Loads this one model with transformers (float32, CPU) for a single forward pass.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(ckpt.tokenizer_dir)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{ckpt.path}: no tokenizer to encode the calibration text with") from e
    ids = tok(text, return_tensors="pt", truncation=True, max_length=n_probes).input_ids
    if ids.shape[1] < 2:
        raise SettingsError("calibration text is empty after tokenization")
    seq2seq = ckpt.layout.record.encoder_decoder
    cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # moeconsol shows its own progress
    try:
        model = ckpt.load_model(cls, dtype=torch.float32).eval()
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    captured: dict[str, torch.Tensor] = {}
    hooks = []
    for layer in ckpt.moe_layers:
        module = model.get_submodule(f"{layer}.mlp")
        hooks.append(
            module.register_forward_pre_hook(
                lambda _m, args, layer=layer: captured.__setitem__(
                    layer, args[0].detach().reshape(-1, args[0].shape[-1])
                )
            )
        )
    with torch.no_grad():
        if seq2seq:
            model(input_ids=ids, decoder_input_ids=ids)
        else:
            model(input_ids=ids)
    for h in hooks:
        h.remove()
    return {k: v.to(torch.float64) for k, v in captured.items()}
