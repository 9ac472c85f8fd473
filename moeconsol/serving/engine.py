"""The generation engine: continuous batching over the runtime's resident model.

The runtime (`runtime.py`) owns the weights: the bank, every variant's non-expert tensors,
and `activate(name)`. The engine owns generation, as vLLM keeps its LoRA manager apart from
its engine: requests, their KV caches, decode steps and sampling. It never touches a weight.
The engine uses the runtime; the runtime knows nothing of the engine. `complete` is the
engine with one request.

A `Request` is admitted while its variant is active: the requests admitted together are
prefilled in one forward (left padding, an attention mask, position ids from the mask), then
their cache rows join the variant's running batch, padded the same way.
`step()` decodes one token for every request of the active variant's batch at once; a
finished or cancelled request leaves the batch between steps and its slot is free at once.
Each variant keeps its own batch: a batch whose variant is swapped out is parked, and its
cache stays valid, because it holds activations its own weights computed; it continues
where it stopped when its variant is active again. On a runtime with cross-variant batching
(`ServingMode.CROSS_VARIANT`, crossvariant.py) there is one batch for every variant instead:
requests of any variant are prefilled together and decoded in one step, the runtime told
which variant each row is (`Runtime.variant_rows`), each variant group's rows kept consecutive
(an encoder-decoder's encoder pass is told too; its encoder outputs and cross-attention
cache rows are reordered, joined and dropped with the self-attention cache's).

Sampling is per request inside a batch: a repetition penalty, then greedy (temperature 0) or
temperature, top-k and top-p, each request drawing from its own `torch.Generator` seeded from
its seed, so a seeded request draws the same numbers batched or alone. Top-k and the
repetition penalty a request leaves unset come from its variant's generation config. Stop strings, end-of-sequence and max_new_tokens
end a request; text is streamed per request through `on_text`. Sampling cannot empty the
distribution (top-p keeps the top token, temperatures are floored at `MIN_TEMPERATURE`), and
a request whose sampling fails anyway (scores that are not finite) leaves its batch with the
error in `Request.error`; its batch-mates go on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

import torch

from ..errors import MoeconsolError, SettingsError
from .crossvariant import ServingMode
from .runtime import Runtime, SwapReport
from .variants import generation_config as variant_generation_config

DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_MAX_TOKENS_IN_FLIGHT = 32768
DEFAULT_MAX_WAIT = 2.0
"""seconds a request of another variant may wait before the scheduler swaps to it (scheduler.pick_model)"""
DEFAULT_MAX_PROMPT_TOKENS = 2048
"""the longest prompt the server accepts, in tokens"""
MAX_SEED = 2**63 - 1
MIN_TEMPERATURE = 1e-2
"""a temperature in (0, MIN_TEMPERATURE) samples at MIN_TEMPERATURE (vLLM's floor): dividing
float32 scores by less overflows them into infinities, and their softmax into NaN"""
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-2, 100.0
"""the repetition penalties accepted: below 0.01 a penalized score overflows float32 as well"""
ALL_VARIANTS = "*"
"""the key of the one batch of a cross-variant engine (not a model name: NAME_RULE refuses it)"""


class FinishReason(str, Enum):
    STOP = "stop"
    """an end-of-sequence token or a stop string"""
    LENGTH = "length"
    """max_new_tokens reached"""
    CANCELLED = "cancelled"
    """the client went away; nothing is generated for nobody"""


@dataclass
class GenerationSettings:
    max_new_tokens: int = 32
    temperature: float = 0.0
    """0 means greedy"""
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    """strings that end the completion (not included in its text)"""
    top_k: int | None = None
    """keep the k most likely tokens (before top_p); 0 = all; None = the variant's generation
    config's top_k, all tokens if it has none"""
    repetition_penalty: float | None = None
    """transformers' rule: the logit of a token already in the sequence is divided by it (when
    positive) or multiplied by it (when negative); 1 = off; None = the variant's, else off"""


def with_defaults(s: GenerationSettings, config) -> GenerationSettings:
    """`s` with top_k and repetition_penalty taken from the generation config `config` where
    `s` leaves them unset (None), and switched off where neither sets them."""
    top_k = s.top_k if s.top_k is not None else getattr(config, "top_k", None)
    penalty = s.repetition_penalty if s.repetition_penalty is not None else getattr(config, "repetition_penalty", None)
    return replace(s, top_k=top_k or 0, repetition_penalty=1.0 if penalty is None else float(penalty))


def check_settings(s: GenerationSettings) -> None:
    """Bad settings -> SettingsError naming the setting (NaN and infinities included)."""
    if isinstance(s.max_new_tokens, bool) or not isinstance(s.max_new_tokens, int) or s.max_new_tokens < 1:
        raise SettingsError(f"`max_new_tokens` must be an integer of at least 1, got {s.max_new_tokens}")
    if not math.isfinite(s.temperature) or s.temperature < 0:
        raise SettingsError(f"`temperature` must be a finite number >= 0, got {s.temperature}")
    if not math.isfinite(s.top_p) or not 0 < s.top_p <= 1:
        raise SettingsError(f"`top_p` must be in (0, 1], got {s.top_p}")
    if s.seed is not None and not 0 <= s.seed <= MAX_SEED:
        raise SettingsError(f"`seed` must be in [0, 2^63 - 1], got {s.seed}")
    if any(not isinstance(x, str) or not x for x in s.stop):
        raise SettingsError("stop strings must be non-empty strings")
    if s.top_k is not None and (isinstance(s.top_k, bool) or not isinstance(s.top_k, int) or s.top_k < 0):
        raise SettingsError(f"`top_k` must be an integer >= 0 (0 = all tokens), got {s.top_k}")
    if (
        s.repetition_penalty is not None
        and not MIN_REPETITION_PENALTY <= s.repetition_penalty <= MAX_REPETITION_PENALTY
    ):
        raise SettingsError(
            f"`repetition_penalty` must be a number in [{MIN_REPETITION_PENALTY}, {MAX_REPETITION_PENALTY}],"
            f" got {s.repetition_penalty}"
        )


@dataclass
class Completion:
    model: str
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str
    """"stop" (end-of-sequence token or stop string), "length" (max_new_tokens) or "cancelled\""""
    swap: SwapReport
    """the swap made to admit this request (a no-op report when its model was active)"""
    time_to_first_token: float
    """seconds from the request's arrival (queue and swap included) to the first generated token"""
    generation_seconds: float
    """seconds from admission (after the swap) to the last token"""
    queued_seconds: float = 0.0
    """seconds between arrival and admission"""

    @property
    def tokens_per_second(self) -> float:
        return len(self.token_ids) / self.generation_seconds if self.generation_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_tokens": self.prompt_tokens,
            "finish_reason": self.finish_reason,
            "swap": self.swap.to_dict(),
            "time_to_first_token": self.time_to_first_token,
            "generation_seconds": self.generation_seconds,
            "tokens_per_second": self.tokens_per_second,
            "queued_seconds": self.queued_seconds,
        }


@dataclass(eq=False)
class Request:
    """One generation request and its progress. `cancel()` may be called from any thread."""

    model: str
    prompt_ids: list[int]
    settings: GenerationSettings
    arrival: float = field(default_factory=time.perf_counter)
    on_text: Callable[[str], None] | None = None
    """called from the engine's thread with each new piece of text"""
    token_ids: list[int] = field(default_factory=list)
    finish: FinishReason | None = None
    error: Exception | None = None
    """why this request failed alone (its sampling); it left its batch unfinished"""
    cancelled: bool = False
    swap: Any = None
    admitted_at: float = 0.0
    first_token_at: float = 0.0
    finished_at: float = 0.0
    text: str = ""
    _sent: int = 0
    _generator: torch.Generator | None = None
    _eos: frozenset[int] = frozenset()
    _tokenizer: Any = None
    _sampling: GenerationSettings | None = None
    """`settings` with the variant's defaults filled in (at admission)"""
    _decoder_start: int | None = None
    """encoder-decoder: the decoder's first input, part of the sequence a penalty looks at"""

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def done(self) -> bool:
        """Finished (stop, length, cancelled) or failed: out of every batch."""
        return self.finish is not None or self.error is not None

    @property
    def reserved_tokens(self) -> int:
        """Tokens this request may hold in the KV cache: prompt + max_new_tokens."""
        return len(self.prompt_ids) + self.settings.max_new_tokens

    def completion(self) -> Completion:
        end = self.finished_at or time.perf_counter()
        first = self.first_token_at or end
        return Completion(
            model=self.model,
            text=self.text,
            token_ids=list(self.token_ids),
            prompt_tokens=len(self.prompt_ids),
            finish_reason=(self.finish or FinishReason.CANCELLED).value,
            swap=self.swap,
            time_to_first_token=first - self.arrival,
            generation_seconds=end - self.admitted_at,
            queued_seconds=self.admitted_at - self.arrival,
        )


# -- sampling -----------------------------------------------------------------------------------


def sample(logits: torch.Tensor, settings: GenerationSettings, generator: torch.Generator | None) -> int:
    """One token from one row of logits: argmax at temperature 0, else temperature (floored at
    `MIN_TEMPERATURE`), then top-k (the k largest scores; ties with the k-th stay), then top-p
    (the smallest set of tokens whose probability reaches top_p; the top token always stays),
    drawn with `generator`. RuntimeError if the scores are not finite: nothing to draw from."""
    scores = logits.float()
    if settings.temperature > 0:
        scores = scores / max(settings.temperature, MIN_TEMPERATURE)
    _check_finite(scores)
    if settings.temperature == 0:
        return int(scores.argmax())
    if settings.top_k and settings.top_k < scores.numel():
        kth = torch.topk(scores, settings.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if settings.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        past = sorted_probs.cumsum(-1) - sorted_probs >= settings.top_p  # mass ranked above reaches top_p
        past[0] = False  # the top token stays, even for a top_p that is 0 in float32 (1e-46)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(past, 0))
    return int(torch.multinomial(probs, 1, generator=generator))


def _check_finite(scores: torch.Tensor) -> None:
    if not bool(torch.isfinite(scores).all()):
        raise RuntimeError("the model's scores for this request are not finite (NaN or infinite); nothing to sample")


def penalize(logits: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    """transformers' repetition penalty on one row of logits (float32): each token in `seen`
    has its logit divided by `penalty` if positive, multiplied by it if negative."""
    scores = logits.float()
    if penalty == 1.0 or not seen:
        return scores
    index = torch.tensor(seen, device=scores.device)
    picked = scores.gather(-1, index)
    return scores.scatter(-1, index, torch.where(picked < 0, picked * penalty, picked / penalty))


# -- batches: left-padded KV caches of one variant -----------------------------------------------


def _pad_left(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _cat_layers(a, b, length: int) -> None:
    """Append cache `b`'s rows to cache `a` (DynamicCache), both left-padded to `length`."""
    for la, lb in zip(a.layers, b.layers):
        la.keys = torch.cat([_pad_left(la.keys, length, -2), _pad_left(lb.keys, length, -2)])
        la.values = torch.cat([_pad_left(la.values, length, -2), _pad_left(lb.values, length, -2)])


def _select_layers(cache, keep: torch.Tensor, start: int) -> None:
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[keep, :, start:], layer.values[keep, :, start:]


class _Batch:
    """The running requests of one variant: one KV cache row each, left-padded.

    `mask` [B, L] marks real positions of the (decoder) self-attention cache; for an
    encoder-decoder model `enc` [B, S, D] and `enc_mask` [B, S] hold the encoder outputs, and
    the cache's cross-attention part is padded like them."""

    def __init__(
        self,
        requests: list[Request],
        cache,
        mask: torch.Tensor,
        enc: torch.Tensor | None = None,
        enc_mask: torch.Tensor | None = None,
    ):
        self.requests = requests
        self.cache, self.mask, self.enc, self.enc_mask = cache, mask, enc, enc_mask
        self.since = 0.0
        """when its requests last got a token (its prefill or its last step)"""

    def join(self, other: _Batch) -> None:
        length = max(self.mask.shape[1], other.mask.shape[1])
        self_cache = getattr(self.cache, "self_attention_cache", self.cache)
        _cat_layers(self_cache, getattr(other.cache, "self_attention_cache", other.cache), length)
        self.mask = torch.cat([_pad_left(self.mask, length, 1), _pad_left(other.mask, length, 1)])
        if self.enc is not None:
            s = max(self.enc.shape[1], other.enc.shape[1])
            _cat_layers(self.cache.cross_attention_cache, other.cache.cross_attention_cache, s)
            self.enc = torch.cat([_pad_left(self.enc, s, 1), _pad_left(other.enc, s, 1)])
            self.enc_mask = torch.cat([_pad_left(self.enc_mask, s, 1), _pad_left(other.enc_mask, s, 1)])
        self.requests += other.requests

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows`, and drop the leading columns no remaining row uses."""
        keep = torch.tensor(rows, device=self.mask.device)
        mask = self.mask[keep]
        start = int(mask.any(0).long().argmax())
        self_cache = getattr(self.cache, "self_attention_cache", self.cache)
        _select_layers(self_cache, keep, start)
        self.mask = mask[:, start:]
        if self.enc is not None:
            enc_mask = self.enc_mask[keep]
            s = int(enc_mask.any(0).long().argmax())
            _select_layers(self.cache.cross_attention_cache, keep, s)
            self.enc, self.enc_mask = self.enc[keep, s:], enc_mask[:, s:]
        self.requests = [self.requests[i] for i in rows]


# -- the engine ---------------------------------------------------------------------------------


class Engine:
    """Continuous batching over `runtime.model`: `admit` requests of the active variant,
    `step` decodes one token for all of them. Single-threaded: one thread drives it."""

    def __init__(
        self,
        runtime: Runtime,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        clock: Callable[[], float] = time.perf_counter,
    ):
        if max_batch_size < 1:
            raise SettingsError(f"max batch size must be at least 1, got {max_batch_size}")
        self.runtime, self.max_batch_size = runtime, max_batch_size
        self.clock = clock
        """the time of admissions, tokens and finishes (a simulated clock in tests)"""
        self.encoder_decoder = bool(self.model.config.is_encoder_decoder)
        self.cross_variant = getattr(runtime, "mode", None) is ServingMode.CROSS_VARIANT
        """one batch holds requests of every variant (the runtime serves any mix per forward)"""
        self.batches: dict[str, _Batch] = {}
        """variant -> its batch; cross-variant: one batch under `ALL_VARIANTS`"""
        self.peak_batch_size = 0
        """the most requests one decode step has served (for tests and benchmarks)"""

    @property
    def model(self):
        """The runtime's model as it is now (a runtime may hold one model object per variant:
        benchmarks/turnaround.py serves plain transformers models through this engine)."""
        return self.runtime.model

    # -- what is running ----------------------------------------------------------------------
    def batch_key(self, model: str) -> str:
        """The batch a request of `model` runs in."""
        return ALL_VARIANTS if self.cross_variant else model

    def running(self, model: str | None = None) -> int:
        """Requests running or parked (of `model`, if given)."""
        if model is None:
            return sum(len(b.requests) for b in self.batches.values())
        batch = self.batches.get(self.batch_key(model))
        return sum(r.model == model for r in batch.requests) if batch else 0

    def parked(self) -> dict[str, float]:
        """Variant -> when its batch last got a token, for every batch whose variant is not
        active (none on a cross-variant engine: its one batch always runs)."""
        if self.cross_variant:
            return {}
        return {m: b.since for m, b in self.batches.items() if m != self.runtime.active}

    def tokens_in_flight(self) -> int:
        return sum(r.reserved_tokens for b in self.batches.values() for r in b.requests)

    def free_slots(self) -> int:
        """Rows the next step may still take: the active variant's batch (cross-variant: the one batch)."""
        batch = self.batches.get(self.batch_key(self.runtime.active))
        return self.max_batch_size - (len(batch.requests) if batch else 0)

    # -- admission: prefill alone, then join the variant's batch -------------------------------
    def admit(self, request: Request, swap: SwapReport | None = None) -> bool:
        """Prefill `request` alone (its model must be active) and add it to its variant's
        batch. Returns False if it finished at once (its first token was its last)."""
        return not self.admit_all([request], swap)

    @torch.no_grad()
    def admit_all(self, requests: list[Request], swap: SwapReport | None = None) -> list[Request]:
        """Prefill `requests` of the active variant together (left-padded, one forward) and add
        them to its batch. Returns those that finished at once. Raises MoeconsolError for a
        bad request before anything runs (check each with `check_request` to admit the rest)."""
        for r in requests:
            self.check_request(r)
        if not requests:
            return []
        rt = self.runtime
        if self.cross_variant:  # each variant group's rows consecutive: the per-variant modules slice, not gather
            requests = sorted(requests, key=lambda r: rt.variant_group(r.model))
        for r in requests:
            config = generation_config(rt, r.model)  # the request's own variant's, whichever is active
            r.swap, swap = (
                (swap if swap is not None else rt.activate(rt.active)),
                None,
            )  # the first one reports the swap
            r.admitted_at = self.clock()
            r._eos = frozenset(_eos_ids(config))
            r._tokenizer = rt.tokenizer(r.model)
            r._sampling = with_defaults(r.settings, config)
            r._decoder_start = config.decoder_start_token_id if self.encoder_decoder else None
            if r.settings.temperature > 0:
                r._generator = torch.Generator(device=rt.device)
                if r.settings.seed is not None:
                    r._generator.manual_seed(r.settings.seed)
                else:
                    r._generator.seed()
        length = max(len(r.prompt_ids) for r in requests)
        pad = self.model.config.pad_token_id or 0  # any id: padded positions are masked out
        ids = torch.tensor([[pad] * (length - len(r.prompt_ids)) + r.prompt_ids for r in requests], device=rt.device)
        mask = torch.tensor(
            [[0] * (length - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in requests], device=rt.device
        )
        if self.encoder_decoder:
            from transformers.cache_utils import DynamicCache, EncoderDecoderCache

            start = torch.tensor([[r._decoder_start] for r in requests], device=rt.device)
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            with self._rows(requests):  # the encoder's rows and the decoder's are the same sequences
                encoded = self.model.get_encoder()(input_ids=ids, attention_mask=mask)
                out = self.model(
                    encoder_outputs=encoded, attention_mask=mask, decoder_input_ids=start, cache=cache, use_cache=True
                )
            self._encoder_output = type(encoded)
            batch = _Batch(list(requests), cache, torch.ones_like(start), encoded.last_hidden_state, mask)
        else:
            from transformers.cache_utils import DynamicCache

            cache = DynamicCache(config=self.model.config)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            with self._rows(requests):
                out = self.model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=positions,
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
            batch = _Batch(list(requests), cache, mask)
        for r, row in zip(requests, _rows(out.logits[:, -1], greedy=False)):
            self._advance(r, *row)
        batch.since = self.clock()
        done = [r for r in requests if r.done]
        if len(done) < len(requests):
            if done:
                batch.keep([i for i, r in enumerate(requests) if not r.done])
            key = self.batch_key(requests[0].model)
            if key in self.batches:
                self.batches[key].join(batch)
            else:
                self.batches[key] = batch
            if self.cross_variant:
                self._group_rows(self.batches[key])
        return done

    def _group_rows(self, batch: _Batch) -> None:
        """Reorder a cross-variant batch's rows (cache included) so that each variant group's
        rows are consecutive; leaving keeps the order, so only a join can break it."""
        groups = [self.runtime.variant_group(r.model) for r in batch.requests]
        order = sorted(range(len(groups)), key=groups.__getitem__)
        if order != list(range(len(groups))):
            batch.keep(order)

    def check_request(self, request: Request) -> None:
        """MoeconsolError if `request` cannot be admitted now."""
        if self.cross_variant:
            self.runtime.check_model(request.model)
        elif request.model != self.runtime.active:
            raise MoeconsolError(f"request for {request.model!r} admitted while {self.runtime.active!r} is active")
        check_settings(request.settings)
        if not request.prompt_ids:
            raise SettingsError("the prompt is empty")

    # -- one decode step ------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[Request]:
        """Drop cancelled requests (of every batch), then decode one token for each request of
        the active variant's batch (cross-variant: of the one batch, every variant). Returns
        the requests that finished (cancelled included) or failed (`Request.error`)."""
        done = self.drop_cancelled()
        batch = self.batches.get(self.batch_key(self.runtime.active))
        if batch is None:
            return done
        self.peak_batch_size = max(self.peak_batch_size, len(batch.requests))
        last = torch.tensor([[r.token_ids[-1]] for r in batch.requests], device=self.runtime.device)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.requests), 1)], dim=1)
        if self.encoder_decoder:
            encoded = self._encoder_output(last_hidden_state=batch.enc)
            with self._rows(batch.requests):
                out = self.model(
                    encoder_outputs=encoded,
                    attention_mask=batch.enc_mask,
                    decoder_input_ids=last,
                    decoder_attention_mask=batch.mask,
                    cache=batch.cache,
                    use_cache=True,
                )
        else:
            positions = batch.mask.sum(1, keepdim=True) - 1
            with self._rows(batch.requests):
                out = self.model(
                    input_ids=last, attention_mask=batch.mask, position_ids=positions, cache=batch.cache, use_cache=True
                )
        for r, row in zip(batch.requests, _rows(out.logits[:, -1], greedy=True)):
            self._advance(r, *row)
        batch.since = self.clock()
        finished = [r for r in batch.requests if r.done]
        if finished:
            self._keep(batch, [i for i, r in enumerate(batch.requests) if not r.done])
        return done + finished

    def drop_cancelled(self) -> list[Request]:
        """Cancelled requests leave every batch, running or parked (an emptied batch is
        gone); returns them, finished as CANCELLED."""
        done = []
        for batch in list(self.batches.values()):
            gone = [r for r in batch.requests if r.cancelled]
            if gone:
                for r in gone:
                    r.finish, r.finished_at = FinishReason.CANCELLED, self.clock()
                self._keep(batch, [i for i, r in enumerate(batch.requests) if not r.cancelled])
                done += gone
        return done

    def _rows(self, requests: list[Request]):
        """Tell a cross-variant runtime which variant each row of the next forward is."""
        return self.runtime.variant_rows([r.model for r in requests]) if self.cross_variant else nullcontext()

    def _keep(self, batch: _Batch, rows: list[int]) -> None:
        if rows:
            batch.keep(rows)
        else:
            del self.batches[self.batch_key(batch.requests[0].model)]

    def _advance(self, r: Request, logits: torch.Tensor, greedy: int | None, finite: bool) -> None:
        """Append one token to `r`, stream its text, and decide whether `r` is finished. A
        failure to pick its token fails `r` alone (`r.error`): its batch-mates go on."""
        try:
            token = self._token(r, logits, greedy, finite)
        except Exception as e:  # this request's sampling: it fails alone
            r.error, r.finished_at = e, self.clock()
            return
        now = self.clock()
        r.first_token_at = r.first_token_at or now
        r.token_ids.append(token)
        if token in r._eos:
            r.finish = FinishReason.STOP
        elif len(r.token_ids) >= r.settings.max_new_tokens:
            r.finish = FinishReason.LENGTH
        if r.on_text is not None or r.settings.stop or r.finish is not None:
            self._text(r)
        if r.finish is not None:
            r.finished_at = now

    def _token(self, r: Request, logits: torch.Tensor, greedy: int | None, finite: bool) -> int:
        s = r._sampling or r.settings
        if s.repetition_penalty not in (None, 1.0):  # the sequence so far: what transformers' generate penalizes
            seen = [r._decoder_start] if r._decoder_start is not None else list(r.prompt_ids)
            logits, greedy = penalize(logits, seen + r.token_ids, s.repetition_penalty), None
        if greedy is not None and finite and s.temperature == 0:
            return greedy
        return sample(logits, s, r._generator)

    def _text(self, r: Request) -> None:
        """Decode `r`'s text so far, cut it at a stop string, and send what is safe to send:
        not an incomplete multi-byte character, not what may be the start of a stop string."""
        text = r._tokenizer.decode(r.token_ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in r.settings.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, r.finish = text[:cut], FinishReason.STOP
        r.text = text
        if r.on_text is None:
            return
        ready = len(text)
        if r.finish is None:
            if text.endswith("\ufffd"):
                return
            ready -= max((len(s) - 1 for s in r.settings.stop), default=0)
        if ready > r._sent:
            try:
                r.on_text(text[r._sent : ready])
            except Exception:  # nobody left to hear it (a closed event loop): stop generating for nobody
                r.cancel()
            r._sent = ready


# -- one request alone ---------------------------------------------------------------------------


def complete(
    runtime: Runtime,
    name: str,
    prompt: str | list[int],
    settings: GenerationSettings | None = None,
    on_text: Callable[[str], None] | None = None,
    started: float | None = None,
) -> Completion:
    """Activate `name` and generate one completion alone (a batch of one; greedy when
    temperature is 0). `on_text` receives each new piece of text; `started` (a
    time.perf_counter() value) is when the request arrived."""
    settings = settings or GenerationSettings()
    check_settings(settings)
    started = time.perf_counter() if started is None else started
    swap = runtime.activate(name)
    ids = runtime.encode(name, prompt) if isinstance(prompt, str) else list(prompt)
    request = Request(name, ids, settings, arrival=started, on_text=on_text)
    engine = Engine(runtime, max_batch_size=1)
    if engine.admit(request, swap):
        while not request.done:
            engine.step()
    if request.error is not None:
        raise request.error
    return request.completion()


def _rows(logits: torch.Tensor, greedy: bool) -> Iterator[tuple[torch.Tensor, int | None, bool]]:
    """Each row of a step's `logits` [B, V] with its argmax (when `greedy`) and whether it is
    finite, read back from the device at once for the whole batch."""
    facts = torch.stack([logits.argmax(-1), torch.isfinite(logits).all(-1).long()], dim=1).tolist()
    return ((row, pick if greedy else None, bool(finite)) for row, (pick, finite) in zip(logits, facts))


def generation_config(runtime: Runtime, name: str):
    """The variant's generation config (its own file, else derived from the model config)."""
    return variant_generation_config(runtime.variant_set.variants[name], runtime.model.config)


def _eos_ids(config) -> set[int]:
    eos = config.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}
