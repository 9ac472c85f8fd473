"""Measuring quality: perplexity of a causal LM, accuracy of a seq2seq model, retained gain.

These functions take a loaded transformers model and its tokenizer, so the same code scores
an original checkpoint, a consolidated variant served from an artifact, and a merging
baseline. docs/quality.md states every definition; in short:

Perplexity (causal LMs). The text is tokenized once, with the tokenizer's defaults (a
Mixtral tokenizer prepends one BOS to the whole text, not to each chunk). The token ids
t_0 .. t_{T-1} are cut into windows of `chunk_len` tokens starting at 0, s, 2s, ... where
s = `stride` (default `chunk_len`: non-overlapping chunks). Each window is one independent
forward pass, with no context carried from an earlier window. In a window, the token at
position p is scored, as -log softmax(logits[p-1])[t_p], if it is not the window's first
token and no earlier window scored it. So with non-overlapping chunks the first token of
every chunk is never predicted; with s < chunk_len every token but t_0 is scored exactly
once, with up to chunk_len - 1 tokens of context. A last, partial window is kept if it has
at least 2 tokens. Then
    NLL = sum of the scored tokens' negative log-likelihoods (nats)
    perplexity = exp(NLL / number of scored tokens)
i.e. a token-weighted mean over all chunks.

Seq2seq accuracy. Each example is {"input", "target"}. Exact match: greedy generation
(no sampling, one beam) from the input; the generated tokens, decoded without special
tokens and stripped of surrounding white space, must equal the stripped target string.
Token accuracy: teacher forcing on the target's token ids (encoder-decoder: the tokenizer's
defaults, so a T5-style tokenizer's closing `</s>` is a target token; decoder inputs are the
decoder start token followed by the target shifted right); a target token counts as
correct when the argmax of the logits at its position equals it. Token accuracy is
correct target tokens / all target tokens over the whole data set (micro average).
Causal LMs are accepted too: the prompt is the input's ids, the target's ids (without
special tokens) follow it, and the logits at the position before each target token predict
it.

Retained gain. How much of a fine-tune's improvement over its base survives consolidation:
    lower is better (perplexity):   (base - consolidated) / (base - original)
    higher is better (accuracy):    (consolidated - base) / (original - base)
1.0: everything retained; 0.0: no better than the base; NaN when original == base (no gain
to retain), or when any input is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from ..errors import CheckpointError, SettingsError

DEFAULT_CHUNK_LEN = 2048
"""As in the reference system's WikiText-2 evaluation (2048-token chunks)."""

Progress = Callable[[int, int], None]
"""Called as progress(done, total) after each chunk or example."""


# ---------------------------------------------------------------- perplexity


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float
    """Sum of the scored tokens' negative log-likelihoods, in nats."""
    tokens: int
    """Number of scored (predicted) tokens."""
    chunks: int
    text_tokens: int
    """Length of the tokenized text."""

    @property
    def mean_nll(self) -> float:
        return self.nll / self.tokens

    def to_dict(self) -> dict:
        return {**asdict(self), "mean_nll": self.mean_nll}


def chunk_spans(n_tokens: int, chunk_len: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """The windows `perplexity` scores: (start, end, first_scored) for ids[start:end].

    Targets first_scored .. end-1 are predicted in that window (see the module docstring).
    """
    if chunk_len < 2:
        raise SettingsError(f"`chunk_len` must be at least 2 tokens, got {chunk_len}")
    stride = chunk_len if stride is None else stride
    if not 1 <= stride <= chunk_len:
        raise SettingsError(f"stride must be between 1 and the chunk length ({chunk_len}), got {stride}")
    spans = []
    scored_until = 0  # every position below this is scored or is t_0
    start = 0
    while start < n_tokens:
        end = min(start + chunk_len, n_tokens)
        first = max(start + 1, scored_until)
        if end - start >= 2 and first < end:
            spans.append((start, end, first))
            scored_until = end
        if end == n_tokens:
            break
        start += stride
    return spans


def _same_length_batches(spans: list[tuple[int, int, int]], batch_size: int) -> list[list[tuple[int, int, int]]]:
    """Consecutive spans grouped into batches of at most `batch_size` windows of one length."""
    if batch_size < 1:
        raise SettingsError(f"batch size must be at least 1, got {batch_size}")
    batches: list[list[tuple[int, int, int]]] = []
    for span in spans:
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and last[0][1] - last[0][0] == span[1] - span[0]:
            last.append(span)
        else:
            batches.append([span])
    return batches


def _device(model) -> torch.device:
    return next(model.parameters()).device


def perplexity(
    model,
    tokenizer,
    text: str,
    chunk_len: int = DEFAULT_CHUNK_LEN,
    stride: int | None = None,
    progress: Progress | None = None,
    batch_size: int = 8,
) -> PerplexityResult:
    """Perplexity of a causal LM on `text` (definition in the module docstring).

    Windows of equal length are scored `batch_size` at a time (each window is still its own
    sequence: no padding, no attention across windows), which only changes the speed.
    """
    if getattr(model.config, "is_encoder_decoder", False):
        raise SettingsError(
            f"perplexity needs a causal language model; {model.config.model_type} is an encoder-decoder: "
            "measure it with seq2seq accuracy instead"
        )
    ids = tokenizer(text, verbose=False)["input_ids"]
    spans = chunk_spans(len(ids), chunk_len, stride)
    if not spans:
        raise SettingsError(f"the text has {len(ids)} token(s); perplexity needs at least 2")
    device = _device(model)
    all_ids = torch.tensor(ids, dtype=torch.long)
    nll = 0.0
    tokens = 0
    done = 0
    with torch.no_grad():
        for batch in _same_length_batches(spans, batch_size):
            windows = torch.stack([all_ids[start:end] for start, end, _ in batch]).to(device)
            logits = model(input_ids=windows, use_cache=False).logits.float()
            for row, (start, end, first) in enumerate(batch):
                # logits[q] predicts window[q + 1]; targets first..end-1 sit at q = target - start - 1
                lo, hi = first - start - 1, end - start - 1
                logp = torch.log_softmax(logits[row, lo:hi], dim=-1)
                targets = windows[row, lo + 1 : hi + 1]
                nll -= logp.gather(1, targets.unsqueeze(1)).double().sum().item()
                tokens += hi - lo
            done += len(batch)
            if progress:
                progress(done, len(spans))
    return PerplexityResult(math.exp(nll / tokens), nll, tokens, len(spans), len(ids))


# ---------------------------------------------------------------- accuracy


@dataclass
class AccuracyResult:
    exact_match: float
    """Fraction of examples whose greedy output equals the target (stripped strings)."""
    token_accuracy: float
    """Correct target tokens / all target tokens, teacher-forced (NaN if no target tokens)."""
    examples: int
    exact: int
    correct_tokens: int
    target_tokens: int
    predictions: list[str] = field(default_factory=list)
    """The decoded, stripped greedy output of each example, in order."""

    def to_dict(self, predictions: bool = False) -> dict:
        d = asdict(self)
        if not predictions:
            d.pop("predictions")
        return d


def _encoder_decoder(model) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def _target_ids(tokenizer, target: str, encoder_decoder: bool) -> list[int]:
    return tokenizer(target, add_special_tokens=encoder_decoder)["input_ids"]


def _greedy(model, tokenizer, input_ids: torch.Tensor, max_new_tokens: int) -> str:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad,
    )
    # encoder-decoder output starts with the decoder start token; causal output with the prompt
    new = out[0, 1:] if _encoder_decoder(model) else out[0, input_ids.shape[1] :]
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def _teacher_forced_correct(model, input_ids: torch.Tensor, target: list[int]) -> int:
    device = input_ids.device
    labels = torch.tensor([target], dtype=torch.long, device=device)
    if _encoder_decoder(model):
        start = model.config.decoder_start_token_id
        if start is None:
            raise CheckpointError(
                f"{model.config.model_type}: config has no decoder_start_token_id; set it in config.json"
            )
        decoder_in = torch.cat([torch.tensor([[start]], device=device), labels[:, :-1]], dim=1)
        logits = model(input_ids=input_ids, decoder_input_ids=decoder_in, use_cache=False).logits[0]
        predicted = logits.argmax(-1)
    else:
        full = torch.cat([input_ids, labels], dim=1)
        logits = model(input_ids=full, use_cache=False).logits[0]
        p = input_ids.shape[1]
        predicted = logits[p - 1 : p - 1 + len(target)].argmax(-1)
    return int((predicted == labels[0]).sum().item())


def seq2seq_accuracy(
    model,
    tokenizer,
    examples: list[dict],
    max_new_tokens: int | None = None,
    progress: Progress | None = None,
    exact_match: bool = True,
) -> AccuracyResult:
    """Exact match (greedy) and teacher-forced token accuracy over `examples`.

    `max_new_tokens` caps generation; None means "as many tokens as the example's target
    has", so a model that reproduces the target and then keeps talking still matches.
    Generation also stops at the model's EOS. `exact_match=False` skips generation (most of
    the time): token accuracy only, exact match NaN and no predictions.
    """
    if not examples:
        raise SettingsError('no examples to score; give at least one {"input", "target"} line')
    if max_new_tokens is not None and max_new_tokens < 1:
        raise SettingsError(f"max new tokens must be at least 1, got {max_new_tokens}")
    enc_dec = _encoder_decoder(model)
    device = _device(model)
    exact = correct = total = 0
    predictions = []
    with torch.no_grad():
        for i, ex in enumerate(examples):
            input_ids = torch.tensor([tokenizer(ex["input"])["input_ids"]], dtype=torch.long, device=device)
            if input_ids.shape[1] == 0:
                raise SettingsError(f"example {i + 1}: the input is empty after tokenization")
            target = _target_ids(tokenizer, ex["target"], enc_dec)
            if exact_match:
                prediction = _greedy(model, tokenizer, input_ids, max_new_tokens or max(1, len(target)))
                predictions.append(prediction)
                exact += prediction == ex["target"].strip()
            if target:
                correct += _teacher_forced_correct(model, input_ids, target)
                total += len(target)
            if progress:
                progress(i + 1, len(examples))
    token_acc = correct / total if total else math.nan
    matched = exact / len(examples) if exact_match else math.nan
    return AccuracyResult(matched, token_acc, len(examples), exact, correct, total, predictions)


# ---------------------------------------------------------------- retained gain


def retained_gain(base: float, consolidated: float, original: float, lower_is_better: bool = True) -> float:
    """Fraction of the fine-tune's gain over `base` that the consolidated model keeps.

    lower_is_better (perplexity): (base - consolidated) / (base - original);
    otherwise (accuracy):          (consolidated - base) / (original - base).
    The two expressions are the same number (numerator and denominator both change sign),
    so the flag only states which metric is meant; it does not change the value. NaN when
    original == base or any input is NaN. Values above 1 mean the consolidated model beats
    the original; negative values mean it is worse than the base.
    """
    if lower_is_better:
        num, den = base - consolidated, base - original
    else:
        num, den = consolidated - base, original - base
    if den == 0 or math.isnan(den) or math.isnan(num):
        return math.nan
    return num / den
