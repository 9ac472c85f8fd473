"""The similarity report: run the analysis over N checkpoints, summarise it, write it out.

`analyze_models` streams the checkpoints one MoE layer at a time (see `similarity`) and
keeps only the small (N*E) x (N*E) matrices. From those, `same_index_summary` says, per
layer, how alike the experts at the same index of different models are, and how many of
them could be shared; `report_json` is the machine-readable form (schema in
docs/analyze.md) and `write_heatmap` draws one heatmap per layer for people.

Sharing counts are per expert index: the N experts at index e of a layer are grouped by
the relation "pair meets the threshold" (transitively, like single-linkage clustering),
and every group stores one expert instead of its size. For `identical` (bit-identical
bytes) the relation is transitive and the count is exact; for similarity thresholds it is
an upper bound on what a threshold merge at the same positions could save.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import __version__
from ..errors import OutputError, SettingsError
from ..io.checkpoint import Checkpoint
from ..io.safety import is_regular_file
from .similarity import (
    DEFAULT_PROBES,
    DISTANCE_METRICS,
    LayerSimilarity,
    analyze,
    check_metrics,
    probe_inputs_from_text,
)

if TYPE_CHECKING:
    import torch

FULL_MATRIX_LIMIT = 64
"""Largest N*E for which the JSON and the heatmap give full matrices unless told otherwise."""
THRESHOLDS: dict[str, tuple[float, ...]] = {
    "cosine": (0.99, 0.95, 0.9),
    "cka": (0.99, 0.95, 0.9),
    "relative-l2": (0.01, 0.05, 0.1),
}
"""Thresholds the sharing summary is given at, per metric (l2 is absolute: none)."""


@dataclass(frozen=True)
class ProbeInfo:
    """Which inputs CKA compared expert outputs on."""

    kind: str
    """"gaussian" (seeded standard normal vectors) or "calibration" (hidden states of text)."""
    count: int
    """Number of probe vectors per layer (tokens of the text, for calibration)."""
    seed: int | None
    """Seed of layer 0's Gaussian probes (layer k uses seed + k); None for calibration."""
    file: str | None = None
    """The calibration text file, for calibration probes."""

    def to_json(self) -> dict:
        out: dict = {"kind": self.kind, "count": self.count, "seed": self.seed}
        if self.file is not None:
            out["file"] = self.file
        return out


@dataclass
class AnalysisReport:
    """Everything `moeconsol analyze` found, small enough to keep: matrices, no weights."""

    models: list[str]
    sources: list[str]
    layouts: list[str]
    architecture: str
    dtype: str
    experts_per_layer: int
    metrics: list[str]
    layers: list[LayerSimilarity] = field(default_factory=list)
    probes: ProbeInfo | None = None


def read_calibration(path: str | Path) -> str:
    """The text of a calibration file, refused clearly if it cannot be used."""
    p = Path(path)
    if p.exists() and not p.is_dir() and not is_regular_file(p):
        raise SettingsError(f"{path}: calibration file is not a regular file (a FIFO or device?)")
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise SettingsError(f"{path}: calibration file not found") from e
    except IsADirectoryError as e:
        raise SettingsError(f"{path}: calibration file is a directory") from e
    except UnicodeDecodeError as e:
        raise SettingsError(f"{path}: calibration file is not UTF-8 text") from e
    except OSError as e:
        raise SettingsError(f"{path}: cannot read calibration file: {e.strerror}") from e
    if not text.strip():
        raise SettingsError(f"{path}: calibration file is empty")
    return text


def analyze_models(
    ckpts: list[Checkpoint],
    metrics: list[str],
    calibration: str | Path | None = None,
    n_probes: int = DEFAULT_PROBES,
    seed: int = 0,
    on_layer: Callable[[str], None] | None = None,
) -> AnalysisReport:
    """Measure every requested metric for every MoE layer of `ckpts` (already compatible).

    CKA probes are the hidden states the first model's MoE blocks receive on the text of
    `calibration` (at most `n_probes` tokens), or `n_probes` seeded Gaussian vectors per
    layer. `on_layer(layer)` is called after each layer, for progress bars.
    """
    metrics = check_metrics(metrics)
    if n_probes < 2:
        raise SettingsError(f"`probes` must be at least 2 (CKA centres over probes), got {n_probes}")
    first = ckpts[0]
    report = AnalysisReport(
        models=[c.name for c in ckpts],
        sources=[c.source for c in ckpts],
        layouts=[c.layout.name for c in ckpts],
        architecture=first.layout.architecture,
        dtype=first.dtype,
        experts_per_layer=first.num_experts,
        metrics=metrics,
    )
    probes: dict[str, torch.Tensor] | None = None
    if "cka" in metrics:
        if calibration is not None:
            probes = probe_inputs_from_text(first, read_calibration(calibration), n_probes)
            count = min(len(p) for p in probes.values())
            report.probes = ProbeInfo("calibration", count, None, str(calibration))
        else:
            report.probes = ProbeInfo("gaussian", n_probes, seed)
    for sim in analyze(ckpts, metrics, probes, n_probes, seed):
        report.layers.append(sim)
        if on_layer is not None:
            on_layer(sim.layer)
    return report


# -- summaries ------------------------------------------------------------------------------


def same_index_pairs(n_models: int, n_experts: int) -> list[tuple[int, int]]:
    """Flat (row, column) indices of the pairs (model a, e) vs (model b, e), a < b."""
    return [
        (a * n_experts + e, b * n_experts + e)
        for e in range(n_experts)
        for a in range(n_models)
        for b in range(a + 1, n_models)
    ]


def _shared_count(alike: np.ndarray, n_models: int, n_experts: int) -> int:
    """Experts saved if, per index, each group of alike experts is stored once."""
    saved = 0
    for e in range(n_experts):
        parent = list(range(n_models))

        def root(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for a in range(n_models):
            for b in range(a + 1, n_models):
                if alike[a * n_experts + e, b * n_experts + e]:
                    parent[root(a)] = root(b)
        saved += n_models - len({root(i) for i in range(n_models)})
    return saved


def _alike(metric: str, matrix: np.ndarray, threshold: float) -> np.ndarray:
    return matrix <= threshold if metric in DISTANCE_METRICS else matrix >= threshold


def threshold_label(metric: str, threshold: float) -> str:
    return f"{metric} {'<=' if metric in DISTANCE_METRICS else '>='} {threshold:g}"


def same_index_summary(report: AnalysisReport, sim: LayerSimilarity) -> dict:
    """For one layer: per metric, mean/min/max over same-index pairs across models, and
    how many experts could be shared (identical, and at each threshold of `THRESHOLDS`).

    `{"pairs": P, "metrics": {m: {"mean", "min", "max"}}, "identical_pairs": k,
      "shared": [{"rule": "identical" | "cosine >= 0.99" ..., "experts": s}]}`
    where "experts" counts expert copies that need not be stored (out of (N-1)*E).
    """
    n, e = len(report.models), report.experts_per_layer
    pairs = same_index_pairs(n, e)
    rows = np.array([p[0] for p in pairs], dtype=int)
    cols = np.array([p[1] for p in pairs], dtype=int)
    out: dict = {"pairs": len(pairs), "metrics": {}, "shared": []}
    for m, matrix in sim.matrices.items():
        values = matrix[rows, cols] if pairs else np.zeros(0)
        out["metrics"][m] = (
            {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max())}
            if len(values)
            else {"mean": None, "min": None, "max": None}
        )
    out["same_index"] = {m: same_index_profile(report, matrix) for m, matrix in sim.matrices.items()}
    out["identical_pairs"] = int(sim.identical[rows, cols].sum()) if pairs else 0
    out["shared"].append({"rule": "identical", "experts": _shared_count(sim.identical, n, e)})
    for m, matrix in sim.matrices.items():
        for t in THRESHOLDS.get(m, ()):
            alike = _alike(m, matrix, t)
            out["shared"].append({"rule": threshold_label(m, t), "experts": _shared_count(alike, n, e)})
    return out


def same_index_profile(report: AnalysisReport, matrix: np.ndarray) -> list[float | None]:
    """Per expert index e: the mean of the metric over the same-index pairs (a:e, b:e), a < b
    (None with one model)."""
    n, e = len(report.models), report.experts_per_layer
    if n < 2:
        return [None] * e
    return [float(np.mean([matrix[a * e + i, b * e + i] for a in range(n) for b in range(a + 1, n)])) for i in range(e)]


def full_matrices_by_default(report: AnalysisReport) -> bool:
    """Whether the JSON and the heatmap show the full (N*E)^2 matrices unless told: only
    when they stay readable (N*E <= FULL_MATRIX_LIMIT). Qwen3-30B-A3B (128 experts) or
    DeepSeek-V3 (256) get the per-layer same-index summary instead."""
    return len(report.models) * report.experts_per_layer <= FULL_MATRIX_LIMIT


def identical_pairs(sim: LayerSimilarity) -> list[list[int]]:
    """All [i, j] (i < j, flat indices) of bit-identical experts in a layer."""
    i, j = np.nonzero(np.triu(sim.identical, k=1))
    return [[int(a), int(b)] for a, b in zip(i, j)]


def report_json(report: AnalysisReport, full: bool | None = None) -> dict:
    """The JSON document of `moeconsol analyze --json` (schema: docs/analyze.md). With
    `full` False (default: `full_matrices_by_default`) each layer's "matrix" is null and the
    summary's "same_index" profiles and "shared" counts carry the report."""
    full = full_matrices_by_default(report) if full is None else full
    return {
        "moeconsol_version": __version__,
        "models": report.models,
        "sources": report.sources,
        "layouts": report.layouts,
        "architecture": report.architecture,
        "dtype": report.dtype,
        "experts_per_layer": report.experts_per_layer,
        "index": "model_index * experts_per_layer + expert_index",
        "probes": report.probes.to_json() if report.probes else None,
        "metrics": {
            m: {
                "higher_is_more_alike": m not in DISTANCE_METRICS,
                "layers": [
                    {"layer": s.layer, "matrix": s.matrices[m].tolist() if full else None} for s in report.layers
                ],
            }
            for m in report.metrics
        },
        "identical": [{"layer": s.layer, "pairs": identical_pairs(s)} for s in report.layers],
        "summary": [{"layer": s.layer, **same_index_summary(report, s)} for s in report.layers],
    }


# -- heatmap --------------------------------------------------------------------------------


def write_heatmap(
    report: AnalysisReport, path: str | Path, metric: str | None = None, full: bool | None = None
) -> Path:
    """One heatmap per MoE layer of `metric` (default: the first measured), in a grid; or,
    with `full` False (default: `full_matrices_by_default`), the per-layer summary
    (`write_summary_plot`).

    Rows and columns are experts `model:e`, model blocks separated by white lines; colours
    share one scale across layers and are oriented so that bright always means alike (the
    colour map is reversed for distances); a dot marks each bit-identical pair.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise SettingsError(f"{path}: the heatmap is written as PNG; give a file name ending in .png")
    if not path.parent.is_dir():
        raise OutputError(f"{path}: directory {path.parent} does not exist")
    metric = metric or report.metrics[0]
    if metric not in report.metrics:
        raise SettingsError(f"heatmap metric {metric!r} was not measured: choose from {', '.join(report.metrics)}")
    if not (full_matrices_by_default(report) if full is None else full):
        return write_summary_plot(report, path, metric)
    matrices = [s.matrices[metric] for s in report.layers]
    n, e = len(report.models), report.experts_per_layer
    size = n * e
    lo = float(min(m.min() for m in matrices))
    hi = float(max(m.max() for m in matrices))
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    cmap = "viridis_r" if metric in DISTANCE_METRICS else "viridis"

    cols = math.ceil(math.sqrt(len(matrices)))
    rows = math.ceil(len(matrices) / cols)
    cell = min(max(3.0, 0.16 * size + 1.5), 12.0)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * cell + 1.2, rows * cell), squeeze=False)
    step = max(1, math.ceil(size / 48))
    ticks = list(range(0, size, step))
    labels = [f"{report.models[i // e]}:{i % e}" for i in ticks]
    fontsize = 7 if size <= 32 else 5
    image = None
    for ax, sim, matrix in zip(axes.flat, report.layers, matrices):
        image = ax.imshow(matrix, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
        same = np.nonzero(sim.identical & ~np.eye(size, dtype=bool))
        ax.scatter(same[1], same[0], s=max(2.0, 400.0 / size), c="black", marker="o", linewidths=0)
        for b in range(1, n):
            ax.axhline(b * e - 0.5, color="white", linewidth=1.5)
            ax.axvline(b * e - 0.5, color="white", linewidth=1.5)
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels, rotation=90, fontsize=fontsize)
        ax.set_yticks(ticks)
        ax.set_yticklabels(labels, fontsize=fontsize)
        ax.set_title(sim.layer, fontsize=9)
    for ax in list(axes.flat)[len(matrices) :]:
        ax.axis("off")
    fig.suptitle(
        f"{metric} between experts ({', '.join(report.models)}); bright = alike, dot = bit-identical", fontsize=11
    )
    fig.tight_layout(rect=(0, 0, 0.88, 0.96))
    bar_ax = fig.add_axes((0.9, 0.15, 0.015, 0.7))
    fig.colorbar(image, cax=bar_ax, label=metric)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_summary_plot(report: AnalysisReport, path: Path, metric: str) -> Path:
    """The picture for many experts (any size): left, layers x expert index, the same-index
    `metric` (mean over model pairs), bright = alike, a dot where every model kept that
    expert bit-identical; right, per layer, how many expert copies could be shared at each
    rule of the table (identical, and `THRESHOLDS` of the metric), out of (N-1)*E."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e = report.experts_per_layer
    n_layers = len(report.layers)
    if len(report.models) < 2:
        raise SettingsError("the same-index summary compares models: give at least two")
    summaries = [same_index_summary(report, s) for s in report.layers]
    profile = np.array([s["same_index"][metric] for s in summaries], dtype=float)
    kept = np.array(
        [
            [bool(all(sim.identical[i, m * e + i] for m in range(len(report.models)))) for i in range(e)]
            for sim in report.layers
        ]
    )
    height = min(max(3.0, 0.12 * n_layers + 1.5), 14.0)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, height), gridspec_kw={"width_ratios": [3, 1]})
    cmap = "viridis_r" if metric in DISTANCE_METRICS else "viridis"
    image = ax.imshow(profile, cmap=cmap, aspect="auto", interpolation="nearest")
    ys, xs = np.nonzero(kept)
    ax.scatter(xs, ys, s=max(1.0, 200.0 / max(e, n_layers)), c="black", marker="o", linewidths=0)
    ax.set_xlabel("expert index")
    ax.set_ylabel("MoE layer")
    step = max(1, math.ceil(n_layers / 40))
    ax.set_yticks(range(0, n_layers, step))
    ax.set_yticklabels([report.layers[i].layer for i in range(0, n_layers, step)], fontsize=6)
    ax.set_title(f"same-index {metric} (mean over model pairs); dot = bit-identical in every model", fontsize=9)
    fig.colorbar(image, ax=ax, label=metric, fraction=0.04)
    rules = [
        r["rule"] for r in summaries[0]["shared"] if r["rule"] == "identical" or r["rule"].startswith(metric + " ")
    ]
    for rule in rules:
        counts = [next(r["experts"] for r in s["shared"] if r["rule"] == rule) for s in summaries]
        ax2.plot(counts, range(n_layers), marker=".", label=rule)
    ax2.set_xlim(0, (len(report.models) - 1) * e)
    ax2.invert_yaxis()
    ax2.set_xlabel(f"shareable expert copies (of {(len(report.models) - 1) * e})")
    ax2.set_yticks([])
    ax2.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{report.architecture}: {', '.join(report.models)}; {n_layers} MoE layers x {e} experts", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
