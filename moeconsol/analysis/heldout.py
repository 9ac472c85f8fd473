"""Held-back calibration data: the deterministic split, and a model's loss on the held-back part.

`merge --mode calibrated` plans on the first part of each variant's calibration file and
measures candidate plans on the rest, which the planner never sees (`split_calibration`):

- text: the first `floor(n * (1 - holdout))` characters plan, the rest is held back
  (n = the file's characters; a word may be cut in two at the boundary);
- JSONL examples: the first `floor(n * (1 - holdout))` examples plan, the rest are held back
  (n = the examples; both parts must hold at least one).

`heldout_batches` turns the held-back part into scored model inputs, at most `max_tokens`
scored tokens (`DEFAULT_HELDOUT_TOKENS`): text in windows of the calibration chunk length,
each window scored on every token but its first (as `quality.metrics.perplexity` with
non-overlapping chunks); JSONL examples on their target tokens, teacher-forced (causal LM:
input then target ids, the target predicted; encoder-decoder: the decoder fed
`[start] + target[:-1]`); text for an encoder-decoder is both encoder input and decoder
target. `heldout_loss` runs a loaded model over them: the summed negative log-likelihood in
nats and the tokens scored, so a loss is `nll / tokens` (the log of the perplexity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SettingsError
from ..io.data import read_seq2seq_data, read_text_data

DEFAULT_HELDOUT = 0.2
"""Share of each calibration file held back from planning (the last 20%)."""
DEFAULT_HELDOUT_TOKENS = 4096
"""At most this many held-back tokens are scored per variant (the first ones)."""
TEXT_BATCH = 8
"""Text windows of one length scored together (each still its own sequence)."""


@dataclass(frozen=True)
class CalibrationData:
    """A calibration file's content, or one part of it: text, or JSONL examples."""

    source: str
    """The file it came from (for messages)."""
    text: str | None = None
    examples: list[dict] | None = None

    @property
    def is_examples(self) -> bool:
        return self.examples is not None


def read_calibration(path: str | Path) -> CalibrationData:
    """A calibration file: JSONL `{"input", "target"}` examples (`.jsonl`), else UTF-8 text."""
    if str(path).endswith(".jsonl"):
        return CalibrationData(str(path), examples=read_seq2seq_data(path))
    return CalibrationData(str(path), text=read_text_data(path))


def planning_size(n: int, holdout: float) -> int:
    """How many of n characters or examples plan: floor(n * (1 - holdout))."""
    return int(math.floor(n * (1.0 - holdout) + 1e-9))


def split_calibration(data: CalibrationData, holdout: float) -> tuple[CalibrationData, CalibrationData | None]:
    """(the part the planner sees, the part held back: None when `holdout` is 0)."""
    if not 0.0 <= holdout < 1.0:
        raise SettingsError(
            f"holdout must be at least 0 and less than 1 (a share of each calibration file), got {holdout}"
        )
    if holdout == 0.0:
        return data, None
    if data.examples is not None:
        n = len(data.examples)
        cut = planning_size(n, holdout)
        if cut < 1 or cut >= n:
            raise SettingsError(
                f"{data.source}: {n} example(s) cannot be split into planning and held-back parts at holdout "
                f"{holdout:g}; give more examples or turn the held-back check off (holdout 0)"
            )
        return (
            CalibrationData(data.source, examples=data.examples[:cut]),
            CalibrationData(data.source, examples=data.examples[cut:]),
        )
    assert data.text is not None
    cut = planning_size(len(data.text), holdout)
    plan, held = data.text[:cut], data.text[cut:]
    if not plan.strip() or not held.strip():
        raise SettingsError(
            f"{data.source}: too little text to split into planning and held-back parts at holdout {holdout:g}; "
            "give more text or turn the held-back check off (holdout 0)"
        )
    return CalibrationData(data.source, text=plan), CalibrationData(data.source, text=held)


@dataclass(frozen=True)
class ScoredBatch:
    """Model inputs and the ids each scored position must predict (-100: not scored)."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    """[batch, positions] aligned with the logits: labels[b, q] is predicted by logits[b, q]."""

    @property
    def tokens(self) -> int:
        return int((self.labels != -100).sum())


def heldout_batches(
    data: CalibrationData,
    tokenizer,
    decoder_start: int | None,
    chunk_len: int,
    max_tokens: int = DEFAULT_HELDOUT_TOKENS,
) -> list[ScoredBatch]:
    """The scored inputs of a held-back part (module docstring), at most `max_tokens` scored
    tokens. `decoder_start` is None for a causal LM."""
    encoder_decoder = decoder_start is not None
    batches: list[ScoredBatch] = []
    scored = 0
    if data.examples is not None:
        for ex in data.examples:
            if scored >= max_tokens:
                break
            src = tokenizer(ex["input"])["input_ids"]
            tgt = tokenizer(ex["target"], add_special_tokens=encoder_decoder)["input_ids"]
            if not tgt or not src:
                continue
            tgt = tgt[: max_tokens - scored]
            if encoder_decoder:
                inputs = {
                    "input_ids": torch.tensor([src]),
                    "decoder_input_ids": torch.tensor([[decoder_start] + tgt[:-1]]),
                }
                labels = torch.tensor([tgt])
            else:
                ids = src + tgt
                labels = torch.full((1, len(ids)), -100, dtype=torch.long)
                labels[0, len(src) - 1 : len(ids) - 1] = torch.tensor(tgt)
                inputs = {"input_ids": torch.tensor([ids])}
            batches.append(ScoredBatch(inputs, labels))
            scored += len(tgt)
    else:
        assert data.text is not None
        ids = tokenizer(data.text, verbose=False)["input_ids"]
        windows = []
        for start in range(0, len(ids), chunk_len):
            window = ids[start : start + chunk_len]
            if scored >= max_tokens:
                break
            window = window[: max_tokens - scored + 1]
            if len(window) < 2:
                continue
            windows.append(window)
            scored += len(window) - 1
        for window_group in _same_length(windows):
            t = torch.tensor(window_group)
            if encoder_decoder:
                start_col = torch.full((t.shape[0], 1), decoder_start, dtype=torch.long)
                inputs = {"input_ids": t, "decoder_input_ids": torch.cat([start_col, t[:, :-1]], dim=1)}
                labels = t.clone()
                labels[:, 0] = -100  # as for a causal LM: a window's first token is not scored
            else:
                inputs = {"input_ids": t}
                labels = torch.full_like(t, -100)
                labels[:, :-1] = t[:, 1:]
            batches.append(ScoredBatch(inputs, labels))
    if not batches:
        raise SettingsError(f"{data.source}: the held-back part has no token to score; give more calibration data")
    return batches


def _same_length(windows: list[list[int]]) -> list[list[list[int]]]:
    """Consecutive windows grouped by length, at most TEXT_BATCH a group."""
    groups: list[list[list[int]]] = []
    for w in windows:
        if groups and len(groups[-1]) < TEXT_BATCH and len(groups[-1][0]) == len(w):
            groups[-1].append(w)
        else:
            groups.append([w])
    return groups


@dataclass(frozen=True)
class HeldoutLoss:
    nll: float
    """Summed negative log-likelihood of the scored tokens, in nats."""
    tokens: int
    correct: int = 0
    """Scored tokens whose logits' argmax is the token (teacher-forced token accuracy)."""

    @property
    def loss(self) -> float:
        """Mean nats per scored token."""
        return self.nll / self.tokens

    @property
    def accuracy(self) -> float:
        return self.correct / self.tokens


def heldout_loss(model, batches: list[ScoredBatch]) -> HeldoutLoss:
    """A loaded model's loss (and token accuracy) on scored batches (`heldout_batches`)."""
    nll, tokens, correct = 0.0, 0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(**b.inputs, use_cache=False).logits.float()
            mask = b.labels != -100
            scored, labels = logits[mask], b.labels[mask]
            logp = torch.log_softmax(scored, dim=-1)
            nll -= float(logp.gather(1, labels.unsqueeze(1)).double().sum())
            tokens += int(mask.sum())
            correct += int((scored.argmax(-1) == labels).sum())
    return HeldoutLoss(nll, tokens, correct)
