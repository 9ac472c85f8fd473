"""What consolidation costs in quality: `eval` of one artifact and `sweep` over methods and budgets.

Quality is measured with moeconsol.quality.metrics (definitions in docs/quality.md): perplexity on a
text file for causal LMs (lower is better), teacher-forced token accuracy on a JSONL file of
{"input", "target"} for seq2seq models (higher is better; exact match is reported too). Every
variant is scored three ways on its own data:

- original:     the source checkpoint recorded in the artifact, loaded with transformers;
- consolidated: the variant served by `runtime.Runtime` from the artifact;
- base:         the pre-trained model (`base=`), if given;

and retained gain = quality.retained_gain(base, consolidated, original).

`sweep` merges the same models with every method at every budget into temporary artifacts,
scores each, and removes it: bytes of expert memory vs. quality, per variant. Originals and
the base are scored once. Models are loaded one at a time; the runtime holds one bank.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..analysis.calibration import load_tokenizer
from ..architectures.layouts import architecture
from ..artifact.reader import Artifact
from ..consolidate.pipeline import merge
from ..consolidate.settings import MergeSettings
from ..errors import CheckpointError, IncompatibleModelsError, MoeconsolError, SettingsError, UnknownModelError
from ..io.adapter import is_adapter_dir
from ..io.checkpoint import (
    Checkpoint,
    adapter_base,
    expert_nbytes,
    open_checkpoint,
    open_checkpoints,
    resolve_checkpoint_dir,
)
from ..io.data import read_seq2seq_data, read_text_data
from ..serving.runtime import Runtime
from .metrics import DEFAULT_CHUNK_LEN, perplexity, retained_gain, seq2seq_accuracy

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total)."""

BUDGET_METHODS = ("reference", "budget", "calibrated", "deltas")
"""Methods that take a budget (a fraction of all experts). `deltas` is calibrated mode with
compressed per-slot deltas (every format): the budget counts bank + delta bytes."""
CALIBRATED_METHODS = ("calibrated", "deltas")
"""Methods that need calibration data."""
MERGE_METHODS = ("average", "task-arithmetic", "ties")
"""Methods that merge everything into one model (expert memory of one model)."""


# -- scoring one model ---------------------------------------------------------------------


@dataclass
class EvalSettings:
    chunk_len: int | None = None
    """Perplexity window; None = min(2048, the model's max_position_embeddings)."""
    stride: int | None = None
    max_examples: int | None = None
    """Score only the first N examples of a JSONL file (None: all)."""
    max_new_tokens: int | None = None
    exact_match: bool = True
    """Seq2seq: also greedy exact match (False: teacher-forced token accuracy only, several
    times faster; exact match is then NaN)."""


@dataclass
class Score:
    metric: str
    """"perplexity" (causal LMs) or "token_accuracy" (seq2seq)."""
    value: float
    lower_is_better: bool
    details: dict = field(default_factory=dict)


def load_data(path: str, encoder_decoder: bool) -> str | list[dict]:
    """The data a model of this kind is scored on; every problem is a MoeconsolError."""
    return read_seq2seq_data(path) if encoder_decoder else read_text_data(path)


def score(model, tokenizer, data: str | list[dict], settings: EvalSettings | None = None) -> Score:
    """Perplexity (text) or token accuracy (examples) of a loaded model."""
    s = settings or EvalSettings()
    if getattr(model.config, "is_encoder_decoder", False):
        examples = data[: s.max_examples] if s.max_examples else data
        r = seq2seq_accuracy(model, tokenizer, examples, s.max_new_tokens, exact_match=s.exact_match)
        return Score("token_accuracy", r.token_accuracy, False, r.to_dict())
    limit = getattr(model.config, "max_position_embeddings", None) or DEFAULT_CHUNK_LEN
    chunk = s.chunk_len or min(DEFAULT_CHUNK_LEN, int(limit))
    r = perplexity(model, tokenizer, data, chunk, s.stride)
    return Score("perplexity", r.perplexity, True, r.to_dict())


def _load_pretrained(source: Path | Checkpoint, architecture_name: str):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bar per model on stderr
    model_class = architecture(architecture_name).transformers_classes()[1]
    if isinstance(source, Checkpoint):  # an adapter variant: its base with the adapter merged
        model, path = source.load_model(model_class).eval(), source.tokenizer_dir
    else:
        model, path = model_class.from_pretrained(str(source)).eval(), source
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer


def score_checkpoint(
    path: str | Path | Checkpoint,
    architecture: str,
    data: dict[str, str | list[dict]],
    settings: EvalSettings | None = None,
    tokenizers: dict[str, object] | None = None,
) -> dict[str, Score]:
    """Load one checkpoint (the whole model, once) and score it on each named data set.
    A checkpoint without a tokenizer uses `tokenizers[name]`."""
    model, tok = _load_pretrained(path if isinstance(path, Checkpoint) else Path(path), architecture)
    out = {}
    with torch.no_grad():
        for name, d in data.items():
            t = tok or (tokenizers or {}).get(name)
            if t is None:
                where = path.path if isinstance(path, Checkpoint) else path
                raise CheckpointError(f"{where}: no tokenizer to score it with; save the tokenizer with the model")
            out[name] = score(model, t, d, settings)
    del model
    return out


def score_artifact(
    path: str | Path,
    data: dict[str, str | list[dict]],
    settings: EvalSettings | None = None,
    progress: Progress | None = None,
) -> dict[str, Score]:
    """Every named variant served by the runtime from the artifact at `path`."""
    rt = Runtime.from_artifact(path)
    out = {}
    with torch.no_grad():
        for i, (name, d) in enumerate(data.items()):
            rt.activate(name)
            out[name] = score(rt.model, rt.tokenizer(name), d, settings)
            if progress:
                progress("consolidated", i + 1, len(data))
    return out


def _gain(base: Score | None, consolidated: Score, original: Score) -> float:
    if base is None:
        return math.nan
    return retained_gain(base.value, consolidated.value, original.value, consolidated.lower_is_better)


# -- eval ----------------------------------------------------------------------------------


@dataclass
class VariantEval:
    name: str
    metric: str
    lower_is_better: bool
    original: float
    consolidated: float
    base: float | None
    retained_gain: float
    details: dict = field(default_factory=dict)


@dataclass
class EvalReport:
    artifact: str
    consolidation: dict
    base: str | None
    variants: list[VariantEval]

    def to_dict(self) -> dict:
        return _json_safe(asdict(self))


def _json_safe(obj):
    """NaN and infinities (an undefined retained gain) become null: strict JSON for any parser."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _check_variants(names: list[str], data: dict[str, str], variants: list[str] | None, where: str) -> list[str]:
    unknown = [n for n in data if n not in names]
    if unknown:
        raise UnknownModelError(f"unknown variant {unknown[0]!r} in the data: {where} holds {', '.join(names)}")
    if not data:
        raise SettingsError("no data given: give `data` NAME=FILE for the variants to score")
    chosen = list(variants) if variants else [n for n in names if n in data]
    for n in chosen:
        if n not in names:
            raise UnknownModelError(f"unknown variant {n!r}: {where} holds {', '.join(names)}")
        if n not in data:
            raise SettingsError(f"no data for variant {n!r}: give `data` {n}=FILE")
    return chosen


def eval_artifact(
    path: str | Path,
    data: dict[str, str],
    base: str | None = None,
    variants: list[str] | None = None,
    settings: EvalSettings | None = None,
    progress: Progress | None = None,
) -> EvalReport:
    """Score every chosen variant as original, consolidated and (with `base`) base."""
    art = Artifact.open(path)
    art.validate()  # a damaged artifact is refused now, not after minutes of scoring the originals
    chosen = _check_variants(art.model_names, data, variants, str(art.path))
    enc_dec = architecture(art.architecture).encoder_decoder
    loaded = {n: load_data(data[n], enc_dec) for n in chosen}
    originals: dict[str, Score] = {}
    art_tokenizers = None
    for i, n in enumerate(chosen):
        if progress:
            progress("originals", i, len(chosen))
        originals.update(score_checkpoint(_original(art, n), art.architecture, {n: loaded[n]}, settings))
    if progress:
        progress("originals", len(chosen), len(chosen))
    consolidated = score_artifact(art.path, loaded, settings, progress)
    base_scores: dict[str, Score] = {}
    if base is not None:
        b = open_checkpoint(base)
        if b.layout.architecture != art.architecture:
            raise IncompatibleModelsError(f"base {base} is {b.layout.architecture}, the artifact is {art.architecture}")
        art_tokenizers = {n: _artifact_tokenizer(art, n) for n in chosen}
        base_scores = score_checkpoint(b.path, art.architecture, loaded, settings, art_tokenizers)
    rows = []
    for n in chosen:
        o, c, b_ = originals[n], consolidated[n], base_scores.get(n)
        rows.append(
            VariantEval(
                n,
                c.metric,
                c.lower_is_better,
                o.value,
                c.value,
                None if b_ is None else b_.value,
                _gain(b_, c, o),
                {"original": o.details, "consolidated": c.details, "base": None if b_ is None else b_.details},
            )
        )
    return EvalReport(str(art.path), art.spec.consolidation, base, rows)


def _original(art: Artifact, name: str) -> Path | Checkpoint:
    """Where variant `name` of the artifact came from: its checkpoint directory, or (a LoRA
    adapter) the adapter on its base, found among the artifact's other sources as merge did."""
    models = {m.name: m for m in art.spec.models}
    src = resolve_checkpoint_dir(models[name].source, models[name].revision)
    if not is_adapter_dir(src):
        return src
    full = []
    for m in art.spec.models:
        path = resolve_checkpoint_dir(m.source, m.revision)
        if not is_adapter_dir(path):
            full.append(Checkpoint(m.name, m.source, path, m.revision))
    return Checkpoint(name, models[name].source, src, models[name].revision, adapter_base(src, full))


def _artifact_tokenizer(art: Artifact, name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(art.model_dir(name)))


# -- sweep ---------------------------------------------------------------------------------


@dataclass
class SweepPoint:
    method: str
    budget: float | None
    """Fraction of all experts asked for (None for the merging baselines)."""
    bank_experts: int | None
    bank_bytes: int | None
    expert_fraction: float | None
    """(bank + delta bytes) / expert bytes of all N models."""
    quality: dict[str, float] = field(default_factory=dict)
    retained_gain: dict[str, float] = field(default_factory=dict)
    details: dict[str, dict] = field(default_factory=dict)
    error: str | None = None
    """Why this point could not be made (e.g. a budget the method cannot reach)."""
    delta_bytes: int = 0
    """Bytes of the compressed expert deltas (method deltas; 0 for the others)."""

    @property
    def expert_memory(self) -> int | None:
        """Bytes of expert memory: bank plus deltas."""
        return None if self.bank_bytes is None else self.bank_bytes + self.delta_bytes


@dataclass
class SweepReport:
    models: dict[str, str]
    metric: str
    lower_is_better: bool
    expert_bytes: int
    """Expert bytes of all N models."""
    original: dict[str, float]
    base: dict[str, float] | None
    points: list[SweepPoint]
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return _json_safe(asdict(self))


def sweep_methods(base: str | None, calibration: dict[str, str] | None) -> list[str]:
    """The methods a sweep runs by default: reference, budget, average, and task-arithmetic
    and ties with a base, calibrated with calibration data."""
    methods = ["reference", "budget"]
    if calibration:
        methods.append("calibrated")
    methods.append("average")
    if base:
        methods += ["task-arithmetic", "ties"]
    return methods


def sweep(
    models: list[str],
    data: dict[str, str],
    budgets: list[float],
    base: str | None = None,
    calibration: dict[str, str] | None = None,
    methods: list[str] | None = None,
    settings: EvalSettings | None = None,
    workdir: str | Path | None = None,
    merge_options: dict | None = None,
    progress: Progress | None = None,
) -> SweepReport:
    """Bytes vs. quality for every method at every budget (artifacts in temporary dirs)."""
    ckpts = open_checkpoints(models)
    names = [c.name for c in ckpts]
    chosen = _check_variants(names, data, None, "the models given")
    methods = methods or sweep_methods(base, calibration)
    unknown = [m for m in methods if m not in (*BUDGET_METHODS, *MERGE_METHODS)]
    if unknown:
        raise SettingsError(
            f"unknown method {unknown[0]!r}: choose from {', '.join((*BUDGET_METHODS, *MERGE_METHODS))}"
        )
    needs = [m for m in methods if m in CALIBRATED_METHODS]
    if needs and not calibration:
        raise SettingsError(
            f"method {needs[0]} needs calibration data: give `calibration` NAME=FILE (each variant's own text)"
        )
    if any(m in ("task-arithmetic", "ties") for m in methods) and not base:
        raise SettingsError("methods task-arithmetic and ties need a base checkpoint: give `base` PATH")
    ref = ckpts[0]
    arch = ref.layout.architecture
    enc_dec = architecture(arch).encoder_decoder
    loaded = {n: load_data(data[n], enc_dec) for n in chosen}
    base_ckpt = open_checkpoint(base) if base else None
    total_expert_bytes = len(ckpts) * len(ref.moe_layers) * ref.num_experts * expert_nbytes(ref)

    plan = [(m, b) for m in methods for b in (budgets if m in BUDGET_METHODS else [None])]
    steps = len(chosen) + (1 if base_ckpt else 0) + len(plan)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress:
            progress("sweep", done, steps)

    originals: dict[str, Score] = {}
    for c in ckpts:
        if c.name in loaded:
            originals.update(score_checkpoint(c, arch, {c.name: loaded[c.name]}, settings))
            tick()
    base_scores = None
    if base_ckpt:
        toks = {}
        for c in ckpts:
            if c.name in loaded:
                toks[c.name] = load_tokenizer(c)
        base_scores = score_checkpoint(base_ckpt.path, arch, loaded, settings, toks)
        tick()
    metric = next(iter(originals.values()))
    points = []
    options = merge_options or {}
    with tempfile.TemporaryDirectory(prefix="moeconsol-sweep-", dir=workdir) as tmp:
        for k, (method, budget) in enumerate(plan):
            out = Path(tmp) / f"artifact-{k}"
            s = MergeSettings(
                mode="calibrated" if method == "deltas" else method,
                budget=None if budget is None else repr(budget),
                base=base if method in ("task-arithmetic", "ties") else None,
                calibration=calibration if method in CALIBRATED_METHODS else None,
                deltas=method == "deltas",
                **options.get(method, {}),
            )
            point = SweepPoint(method, budget, None, None, None)
            try:
                result = merge(ckpts, out, s)
            except MoeconsolError as e:
                point.error = str(e)
                points.append(point)
                tick()
                continue
            point.bank_bytes = result.bank_bytes
            point.delta_bytes = result.delta_bytes
            point.bank_experts = sum(result.bank_sizes.values())
            point.expert_fraction = (result.bank_bytes + result.delta_bytes) / total_expert_bytes
            scores = score_artifact(out, loaded, settings)
            for n, sc in scores.items():
                point.quality[n] = sc.value
                point.retained_gain[n] = _gain(None if base_scores is None else base_scores[n], sc, originals[n])
                point.details[n] = {k2: v for k2, v in sc.details.items() if k2 != "predictions"}
            points.append(point)
            import shutil

            shutil.rmtree(out, ignore_errors=True)
            tick()
    return SweepReport(
        models={c.name: c.source for c in ckpts},
        metric=metric.metric,
        lower_is_better=metric.lower_is_better,
        expert_bytes=total_expert_bytes,
        original={n: s.value for n, s in originals.items()},
        base=None if base_scores is None else {n: s.value for n, s in base_scores.items()},
        points=points,
        settings={
            "budgets": budgets,
            "methods": methods,
            "base": base,
            "calibration": calibration,
            "eval": asdict(settings or EvalSettings()),
        },
    )


def plot_sweep(report: SweepReport, path: str | Path) -> Path:
    """Bytes on x, quality on y, one line per method, one subplot per variant (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    names = list(report.original)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    methods = list(dict.fromkeys(p.method for p in report.points))
    for ax, n in zip(axes[0], names):
        for m in methods:
            pts = sorted(
                (p.expert_memory, p.quality[n])
                for p in report.points
                if p.method == m and p.error is None and n in p.quality
            )
            if pts:
                ax.plot([x / 2**20 for x, _ in pts], [y for _, y in pts], marker="o", label=m)
        ax.axhline(report.original[n], color="black", linestyle="--", linewidth=1, label="original")
        if report.base:
            ax.axhline(report.base[n], color="gray", linestyle=":", linewidth=1, label="base")
        ax.set_title(n)
        ax.set_xlabel("expert memory (MiB)")
        ax.set_ylabel(report.metric + (" (lower is better)" if report.lower_is_better else ""))
        if report.metric == "perplexity":
            ax.set_yscale("log")  # the scale of the loss: a failed baseline does not flatten the rest
            for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
                axis_formatter(FormatStrFormatter("%g"))
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
