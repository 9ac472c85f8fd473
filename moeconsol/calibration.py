"""Each variant's own activations: which tokens reach which expert, and what an expert swap costs.

`capture` runs one original model over its calibration data (text for a causal LM, JSONL
`{"input", "target"}` or text for a seq2seq model) with a forward pre-hook on every MoE
layer's experts module (`f"{layer}.mlp.experts"`). The hook sees exactly what the experts
see: the hidden states entering them and the router's choice per token (Mixtral: top-k
indices and their renormalised weights; Switch: the capacity-masked top-1 one-hot and its
probability). Per (layer, expert) it keeps the first `max_tokens` routed inputs X (float32),
their routing weights w, the number of routed tokens and their routing mass (sum of w).

Memory: the whole original model (one at a time), plus at most
layers x experts x max_tokens x hidden x 4 bytes of kept inputs per model (Mixtral-8x7B,
512 tokens: 32 x 8 x 512 x 4096 x 4 B = 2 GiB).

`substitution_costs` turns this into the cost of serving slot i (model m, expert e) with
expert j, for one layer:

    cost[i, j] = (count_i / kept_i) * sum_{t kept for i} w_t^2 ||f_j(x_t) - f_i(x_t)||^2 / energy_m

    energy_m   = sum over the slots i' of model m of (count_i' / kept_i') * sum_t w_t^2 ||f_i'(x_t)||^2

i.e. the share of model m's routed expert-output energy in this layer that the swap
perturbs: a routing-weighted relative output error, weighted by how much the slot is used.
A slot no calibration token reached costs 0 to replace.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .checkpoint import Checkpoint
from .errors import CheckpointError, SettingsError
from .layouts import RouterFormat
from .quality import read_seq2seq_data, read_text_data
from .similarity import expert_function

DEFAULT_MAX_TOKENS = 512
"""Routed inputs kept per (layer, expert) of each model."""
DEFAULT_CHUNK_LEN = 128
"""Tokens per forward pass over calibration text (capped by the model's context)."""
DEFAULT_RUN_TOKENS = 16384
"""Calibration data is run until every slot holds `max_tokens` inputs, or the data ends, or
this many tokens (input ids) have been run per model: a budget in tokens, not in forward
passes, so that a family of short examples (seq2seq) gets as many routed inputs per slot as
one of long text windows."""


@dataclass
class SlotActivations:
    """What one model routed to one of its experts in one layer."""

    x: list[torch.Tensor] = field(default_factory=list)
    """Kept routed inputs, [n, H] blocks (float32)."""
    w: list[torch.Tensor] = field(default_factory=list)
    """Their routing weights, [n] blocks."""
    count: int = 0
    """Tokens routed here in all (kept or not)."""
    mass: float = 0.0
    """Sum of the routing weights of all routed tokens."""

    @property
    def kept(self) -> int:
        return sum(len(w) for w in self.w)

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.w:
            return torch.zeros(0, 0), torch.zeros(0)
        return torch.cat(self.x), torch.cat(self.w)


@dataclass
class ModelActivations:
    """One model's calibration run: slots[layer][expert], and the tokens run."""

    name: str
    slots: dict[str, list[SlotActivations]]
    tokens: int


def load_model(ckpt: Checkpoint):
    """The original transformers model of a checkpoint, in eval mode (the whole model)."""
    from transformers.utils import logging as hf_logging

    from .runtime import _model_classes

    hf_logging.disable_progress_bar()  # no "Loading weights" bar per model on stderr
    model_class = _model_classes(ckpt.layout.architecture)[1]
    return model_class.from_pretrained(str(ckpt.path)).eval()


def load_tokenizer(ckpt: Checkpoint):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(ckpt.path))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{ckpt.path}: no usable tokenizer for calibration ({e}); save the tokenizer with the model") from e


def calibration_batches(path: str, tokenizer, decoder_start: int | None, chunk_len: int, max_chunks: int | None = None) -> list[dict]:
    """Model inputs for a calibration file: JSONL examples (input, teacher-forced target) or
    fixed-length chunks of the tokenized text (as both encoder and decoder input for a
    seq2seq model). `decoder_start` is None for a causal LM."""
    encoder_decoder = decoder_start is not None
    if str(path).endswith(".jsonl"):
        batches = []
        for ex in read_seq2seq_data(path)[:max_chunks]:
            src = torch.tensor([tokenizer(ex["input"])["input_ids"]])
            tgt = tokenizer(ex["target"], add_special_tokens=encoder_decoder)["input_ids"]
            if encoder_decoder:
                batches.append({"input_ids": src, "decoder_input_ids": torch.tensor([[decoder_start] + tgt[:-1]])})
            else:
                batches.append({"input_ids": torch.cat([src, torch.tensor([tgt], dtype=torch.long)], dim=1)})
        return batches
    ids = tokenizer(read_text_data(path), verbose=False)["input_ids"]
    chunks = [ids[i : i + chunk_len] for i in range(0, len(ids), chunk_len)][:max_chunks]
    batches = []
    for chunk in chunks:
        if len(chunk) < 2:
            continue
        t = torch.tensor([chunk])
        batches.append({"input_ids": t, "decoder_input_ids": t} if encoder_decoder else {"input_ids": t})
    if not batches:
        raise SettingsError(f"{path}: too little calibration text (fewer than 2 tokens)")
    return batches


def _routing(args: tuple, num_experts: int, router: RouterFormat) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden [T, H], expert index [T, k], weight [T, k]) from the experts module's inputs;
    index -1 marks a token a Switch router dropped (over capacity)."""
    hidden, choice, weights = args[:3]
    if router is RouterFormat.ONE_HOT:  # one-hot [T, 1, E] (all zero when dropped), weights [T, 1]
        onehot = choice.reshape(choice.shape[0], num_experts)
        index = torch.where(onehot.sum(-1) > 0, onehot.argmax(-1), -1).unsqueeze(1)
        return hidden, index, weights.reshape(-1, 1)
    return hidden, choice, weights


def capture(
    ckpt: Checkpoint,
    data_path: str,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    chunk_len: int = DEFAULT_CHUNK_LEN,
    max_chunks: int | None = None,
    max_run_tokens: int = DEFAULT_RUN_TOKENS,
    progress: Callable[[int, int], None] | None = None,
) -> ModelActivations:
    """Run `ckpt`'s original model over its calibration data (at most `max_chunks` chunks or
    examples, None: all) and keep its routed inputs; stop early once every slot holds
    `max_tokens` inputs or `max_run_tokens` tokens have been run."""
    model = load_model(ckpt)
    tokenizer = load_tokenizer(ckpt)
    enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
    start = (model.config.decoder_start_token_id or 0) if enc_dec else None
    limit = model.config.to_dict().get("max_position_embeddings") or chunk_len
    batches = calibration_batches(data_path, tokenizer, start, min(chunk_len, int(limit)), max_chunks)
    E = ckpt.num_experts
    slots = {layer: [SlotActivations() for _ in range(E)] for layer in ckpt.moe_layers}
    handles = []

    def hook_for(layer: str):
        def hook(module, args, kwargs):
            if len(args) < 3:
                args = tuple(args) + tuple(kwargs.values())
            hidden, index, weights = _routing(args, E, ckpt.layout.record.router_format)
            hidden = hidden.reshape(-1, hidden.shape[-1]).detach().float()
            for e in range(E):
                rows, cols = torch.where(index == e)
                if rows.numel() == 0:
                    continue
                s = slots[layer][e]
                w = weights[rows, cols].detach().float()
                s.count += int(rows.numel())
                s.mass += float(w.sum())
                room = max_tokens - s.kept
                if room > 0:
                    s.x.append(hidden[rows[:room]].clone())
                    s.w.append(w[:room].clone())

        return hook

    try:
        for layer in ckpt.moe_layers:
            module = model.get_submodule(f"{layer}.mlp.experts")
            handles.append(module.register_forward_pre_hook(hook_for(layer), with_kwargs=True))
        tokens = 0
        with torch.no_grad():
            for i, batch in enumerate(batches):
                model(**batch, use_cache=False)
                tokens += int(batch["input_ids"].numel())
                if progress:
                    progress(i + 1, len(batches))
                full = all(s.kept >= max_tokens for layer in slots.values() for s in layer)
                if full or tokens >= max_run_tokens:
                    break
    finally:
        for h in handles:
            h.remove()
    return ModelActivations(ckpt.name, slots, tokens)


@dataclass
class LayerCosts:
    """One layer's calibrated costs: cost[i, j], usage[i], and each model's routed energy."""

    cost: np.ndarray
    usage: np.ndarray
    energy: np.ndarray

    def weighted(self, weights: np.ndarray) -> "LayerCosts":
        """The same costs with model m's rows scaled by weights[m] (> 0): its energy divided
        by it, so that a candidate costed later (`candidate_cost`) is scaled alike."""
        E = self.cost.shape[0] // len(self.energy)
        rows = np.repeat(np.asarray(weights, dtype=np.float64), E)
        return LayerCosts(self.cost * rows[:, None], self.usage, self.energy / np.asarray(weights, dtype=np.float64))


def _slot_error(fn, own_params: dict, candidate: dict, x: torch.Tensor, w2: torch.Tensor, own: torch.Tensor | None = None) -> float:
    own = fn(own_params, x).double() if own is None else own
    diff = fn(candidate, x).double() - own
    return float((w2 * diff**2).sum())


def substitution_costs(
    ckpt: Checkpoint,
    layer: str,
    experts: list[dict[str, torch.Tensor]],
    activations: list[ModelActivations],
) -> LayerCosts:
    """Costs of serving each slot of one layer by each expert of it (definition in the module
    docstring). `experts` is the layer's flat expert list (model * E + expert); usage is each
    slot's routing mass per calibration token of its model."""
    fn = expert_function(ckpt)
    E = ckpt.num_experts
    n = len(experts)
    params = [{p: t.float() for p, t in ex.items()} for ex in experts]
    usage = np.zeros(n, dtype=np.float64)
    energy = np.zeros(len(activations), dtype=np.float64)
    raw = np.zeros((n, n), dtype=np.float64)
    with torch.no_grad():
        for i in range(n):
            m, e = divmod(i, E)
            slot = activations[m].slots[layer][e]
            usage[i] = slot.mass / max(1, activations[m].tokens)
            if slot.kept == 0:
                continue
            x, w = slot.inputs()
            scale = slot.count / slot.kept
            w2 = (w.double() ** 2).unsqueeze(1)
            own = fn(params[i], x).double()
            energy[m] += scale * float((w2 * own**2).sum())
            for j in range(n):
                if j != i:
                    raw[i, j] = scale * _slot_error(fn, params[i], params[j], x, w2, own)
    cost = np.zeros((n, n), dtype=np.float64)
    for i in range(n):
        if energy[i // E] > 0:
            cost[i] = raw[i] / energy[i // E]
    return LayerCosts(cost, usage, energy)


def candidate_cost(
    ckpt: Checkpoint,
    layer: str,
    experts: list[dict[str, torch.Tensor]],
    members: list[int],
    candidate: dict[str, torch.Tensor],
    activations: list[ModelActivations],
    energy: np.ndarray,
) -> float:
    """Sum over `members` of the cost of serving that slot by `candidate` (any expert, e.g. a
    weighted mean), in the units of `substitution_costs`."""
    fn = expert_function(ckpt)
    E = ckpt.num_experts
    cand = {p: t.float() for p, t in candidate.items()}
    total = 0.0
    with torch.no_grad():
        for i in members:
            m, e = divmod(i, E)
            slot = activations[m].slots[layer][e]
            if slot.kept == 0 or energy[m] <= 0:
                continue
            x, w = slot.inputs()
            w2 = (w.double() ** 2).unsqueeze(1)
            own = {p: t.float() for p, t in experts[i].items()}
            total += slot.count / slot.kept * _slot_error(fn, own, cand, x, w2) / energy[m]
    return total
