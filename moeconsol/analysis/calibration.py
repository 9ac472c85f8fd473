"""Each variant's own activations: which tokens reach which expert, and what an expert swap costs.

`capture` runs one original model over its calibration data (text for a causal LM, JSONL
`{"input", "target"}` or text for a seq2seq model) with a forward pre-hook on every MoE
layer's experts module (`f"{layer}.mlp.experts"`). The hook sees exactly what the experts
see: the hidden states entering them and the router's choice per token (Mixtral: top-k
indices and their renormalised weights; Switch: the capacity-masked top-1 one-hot and its
probability). Per (layer, expert) it keeps the first `max_tokens` routed inputs X (float32),
their routing weights w, the number of routed tokens and their routing mass (sum of w).

Memory: the whole original model (one at a time), plus at most
layers x experts x max_tokens x (hidden + 3) x 4 bytes of kept inputs, weights and norms per model (Mixtral-8x7B,
512 tokens: 32 x 8 x 512 x 4096 x 4 B = 2 GiB).

`capture` also hooks the MoE layer itself (`layer`, the module holding `.mlp`): its output is
the hidden state the layer passes on (residual stream plus the MoE block's output), and for
each kept token it keeps that state's squared norm ||h_t||^2, and per layer the number of
tokens T_m that passed through it.

`substitution_costs` turns this into the cost of serving slot i (model m, expert e) with
expert j, for one layer:

    cost[i, j] = (count_i / kept_i) * sum_{t kept for i} w_t^2 ||f_j(x_t) - f_i(x_t)||^2 / ||h_t||^2 / T_m

i.e. the mean over model m's tokens of the squared *relative* perturbation of what the layer
passes on (the next layer normalises that state, so a relative error is what it sees),
weighted by how much the slot is used. Why the layer's output and not the experts' own output
energy: a variant whose fine-tune grew its expert outputs (they then dominate the residual
stream) looked cheap to perturb in shares of its own expert-output energy, yet its expert
errors reach the next layer almost whole; measured on the first example family's Switch
(docs/quality.md, "Calibrated mode: why it is built this way"). A slot no calibration token reached costs 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..architectures.layouts import RouterFormat, architecture
from ..errors import CheckpointError, SettingsError
from ..io.checkpoint import Checkpoint
from .heldout import CalibrationData, read_calibration
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
    h2: list[torch.Tensor] = field(default_factory=list)
    """Squared norm of the layer's output (residual stream after the MoE block) for each
    kept token, [n] blocks (float64)."""

    @property
    def kept(self) -> int:
        return sum(len(w) for w in self.w)

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.w:
            return torch.zeros(0, 0), torch.zeros(0)
        return torch.cat(self.x), torch.cat(self.w)

    def token_weights(self) -> torch.Tensor:
        """w_t^2 / ||h_t||^2 per kept token, [n, 1] (float64): what a squared output error
        of the slot is multiplied by in the costs."""
        w = torch.cat(self.w) if self.w else torch.zeros(0)  # not `inputs()`: that also joins the kept inputs
        h2 = torch.cat(self.h2) if self.h2 else torch.zeros(0, dtype=torch.float64)
        return (w.double() ** 2 / h2.clamp_min(torch.finfo(torch.float64).tiny)).unsqueeze(1)


@dataclass
class ModelActivations:
    """One model's calibration run: slots[layer][expert], and the tokens run."""

    name: str
    slots: dict[str, list[SlotActivations]]
    tokens: int
    """Input ids run (the budget `max_run_tokens` counts)."""
    layer_tokens: dict[str, int] = field(default_factory=dict)
    """Tokens that passed through each MoE layer (T_m; an encoder-decoder's decoder layers
    see the target tokens, its encoder layers the input tokens)."""


def load_model(ckpt: Checkpoint):
    """The original transformers model of a checkpoint, in eval mode (the whole model)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bar per model on stderr
    model_class = architecture(ckpt.layout.architecture).transformers_classes()[1]
    return ckpt.load_model(model_class).eval()


def load_tokenizer(ckpt: Checkpoint):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(ckpt.tokenizer_dir))
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{ckpt.path}: no usable tokenizer for calibration ({e}); save the tokenizer with the model"
        ) from e


def calibration_batches(
    data: str | CalibrationData, tokenizer, decoder_start: int | None, chunk_len: int, max_chunks: int | None = None
) -> list[dict]:
    """Model inputs for calibration data (a file, or a part of one: `heldout.split_calibration`):
    JSONL examples (input, teacher-forced target) or fixed-length chunks of the tokenized text
    (as both encoder and decoder input for a seq2seq model). `decoder_start` is None for a
    causal LM."""
    encoder_decoder = decoder_start is not None
    data = data if isinstance(data, CalibrationData) else read_calibration(data)
    path = data.source
    if data.examples is not None:
        batches = []
        for ex in data.examples[:max_chunks]:
            src = torch.tensor([tokenizer(ex["input"])["input_ids"]])
            tgt = tokenizer(ex["target"], add_special_tokens=encoder_decoder)["input_ids"]
            if encoder_decoder:
                batches.append({"input_ids": src, "decoder_input_ids": torch.tensor([[decoder_start] + tgt[:-1]])})
            else:
                batches.append({"input_ids": torch.cat([src, torch.tensor([tgt], dtype=torch.long)], dim=1)})
        return batches
    assert data.text is not None
    ids = tokenizer(data.text, verbose=False)["input_ids"]
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
    data_path: str | CalibrationData,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    chunk_len: int = DEFAULT_CHUNK_LEN,
    max_chunks: int | None = None,
    max_run_tokens: int = DEFAULT_RUN_TOKENS,
    progress: Callable[[int, int], None] | None = None,
) -> ModelActivations:
    """Run `ckpt`'s original model over its calibration data (a file, or the part of one the
    planner sees; at most `max_chunks` chunks or examples, None: all) and keep its routed inputs; stop early once every slot holds
    `max_tokens` inputs or `max_run_tokens` tokens have been run."""
    model = load_model(ckpt)
    tokenizer = load_tokenizer(ckpt)
    enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
    start = (model.config.decoder_start_token_id or 0) if enc_dec else None
    limit = model.config.to_dict().get("max_position_embeddings") or chunk_len
    batches = calibration_batches(data_path, tokenizer, start, min(chunk_len, int(limit)), max_chunks)
    E = ckpt.num_experts
    slots = {layer: [SlotActivations() for _ in range(E)] for layer in ckpt.moe_layers}

    layer_tokens = dict.fromkeys(ckpt.moe_layers, 0)
    pending: dict[str, list[tuple[int, torch.Tensor]]] = {layer: [] for layer in ckpt.moe_layers}
    handles = []

    def hook_for(layer: str):
        def hook(module, args, kwargs):
            if len(args) < 3:
                args = tuple(args) + tuple(kwargs.values())
            hidden, index, weights = _routing(args, E, ckpt.layout.record.router_format)
            hidden = hidden.reshape(-1, hidden.shape[-1]).detach().float()
            layer_tokens[layer] += int(hidden.shape[0])
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
                    pending[layer].append((e, rows[:room].clone()))

        return hook

    def output_hook_for(layer: str):
        def hook(module, args, output):  # the layer's output: what it passes on, per token
            out = output[0] if isinstance(output, tuple) else output
            h2 = out.detach().double().pow(2).sum(-1).reshape(-1)
            for e, rows in pending[layer]:
                slots[layer][e].h2.append(h2[rows])
            pending[layer].clear()

        return hook

    try:
        for layer in ckpt.moe_layers:
            module = model.get_submodule(f"{layer}.mlp.experts")
            handles.append(module.register_forward_pre_hook(hook_for(layer), with_kwargs=True))
            handles.append(model.get_submodule(layer).register_forward_hook(output_hook_for(layer)))
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
    return ModelActivations(ckpt.name, slots, tokens, layer_tokens)


@dataclass
class LayerCosts:
    """One layer's calibrated costs: cost[i, j], usage[i], and each model's normaliser."""

    cost: np.ndarray
    usage: np.ndarray
    norm: np.ndarray
    """Per model, what its summed slot errors are divided by: T_m, the tokens that passed
    through the layer (divided by the model's weight in `weighted`)."""

    def weighted(self, weights: np.ndarray) -> LayerCosts:
        """The same costs with model m's rows scaled by weights[m] (> 0): its normaliser
        divided by it, so that a candidate costed later (`candidate_cost`) is scaled alike."""
        E = self.cost.shape[0] // len(self.norm)
        rows = np.repeat(np.asarray(weights, dtype=np.float64), E)
        return LayerCosts(self.cost * rows[:, None], self.usage, self.norm / np.asarray(weights, dtype=np.float64))


def _slot_error(
    fn, own_params: dict, candidate: dict, x: torch.Tensor, tw: torch.Tensor, own: torch.Tensor | None = None
) -> float:
    """sum_t tw_t ||f_candidate(x_t) - f_own(x_t)||^2 (tw: `SlotActivations.token_weights`)."""
    own = fn(own_params, x).double() if own is None else own
    diff = fn(candidate, x).double() - own
    return float((tw * diff**2).sum())


def layer_norms(layer: str, activations: list[ModelActivations]) -> np.ndarray:
    """Each model's normaliser for one layer: T_m, the tokens that passed through it."""
    return np.array([float(a.layer_tokens.get(layer, 0)) for a in activations])


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
    norm = layer_norms(layer, activations)
    cost = np.zeros((n, n), dtype=np.float64)
    with torch.no_grad():
        for i in range(n):
            m, e = divmod(i, E)
            slot = activations[m].slots[layer][e]
            usage[i] = slot.mass / max(1, activations[m].tokens)
            if slot.kept == 0 or norm[m] <= 0:
                continue
            x, _ = slot.inputs()
            scale = slot.count / slot.kept / norm[m]
            tw = slot.token_weights()
            own = fn(params[i], x).double()
            for j in range(n):
                if j != i:
                    cost[i, j] = scale * _slot_error(fn, params[i], params[j], x, tw, own)
    return LayerCosts(cost, usage, norm)


def candidate_cost(
    ckpt: Checkpoint,
    layer: str,
    experts: list[dict[str, torch.Tensor]],
    members: list[int],
    candidate: dict[str, torch.Tensor],
    activations: list[ModelActivations],
    norm: np.ndarray,
) -> float:
    """Sum over `members` of the cost of serving that slot by `candidate` (any expert, e.g. a
    weighted mean), in the units of `substitution_costs` (`norm`: `LayerCosts.norm`)."""
    fn = expert_function(ckpt)
    E = ckpt.num_experts
    cand = {p: t.float() for p, t in candidate.items()}
    total = 0.0
    with torch.no_grad():
        for i in members:
            m, e = divmod(i, E)
            slot = activations[m].slots[layer][e]
            if slot.kept == 0 or norm[m] <= 0:
                continue
            x, _ = slot.inputs()
            own = {p: t.float() for p, t in experts[i].items()}
            total += slot.count / slot.kept * _slot_error(fn, own, cand, x, slot.token_weights()) / norm[m]
    return total
