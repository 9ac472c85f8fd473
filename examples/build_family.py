"""Build a small family of REAL fine-tuned MoE models on the CPU, for the moeconsol demo.

    python examples/build_family.py --out examples/family [--force]

Two families, each one base model plus variants fine-tuned from it by a real optimizer run
on their own data (no network, no downloads, seeded):

    OUT/mixtral/{base,code,math,story}     tiny Mixtral (causal LM)
    OUT/switch/{base,reverse,upper,prefix} tiny Switch Transformers (seq2seq)
    OUT/data/train/*, OUT/data/eval/*      the generated training and held-out data
    OUT/family.json                        what was built: paths, layouts, eval files, losses

The variants differ in what they train, so that consolidation has something to find:

- "non-experts": experts frozen, so every expert stays bit-identical to the base and can be
  shared losslessly (Mixtral `code`, Switch `upper`);
- "all": everything trains (Mixtral `math`, Switch `reverse`);
- "experts+routers": attention, norms and embeddings frozen, so those non-expert tensors stay
  identical to the base (Mixtral `story`, Switch `prefix`).

They are also saved in every on-disk form moeconsol reads: per-expert (the default), fused
(transformers 5 in-memory names; Mixtral `math`) and sharded (`model.safetensors.index.json`;
Mixtral `story`, Switch `prefix`).

The data is made so that each fine-tune has a clear gain of its own to keep or lose in
consolidation. Mixtral: the base trains on all three text domains (code, Python-like
snippets; math, integer arithmetic; story, simple English) towards convergence at its size,
each variant then on its own domain only. Switch: the base learns the generic `copy` task,
each variant a task the base has never seen (`reverse` the words, `upper`-case them, `prefix`
them with "out:"). Training and evaluation read the data the way `moeconsol eval` does: the
text file's token stream in windows of max_position_embeddings tokens (= the training
window), and seq2seq inputs without an appended EOS.

A model whose OUT/<family>/<name>/config.json exists is reused, so a second run is fast;
if a base has to be (re)built, its variants are rebuilt too since they derive from it.
`--force` rebuilds everything. The summary shows, per variant, the loss (and for Switch the
teacher-forced token accuracy) on its own held-out data before (the base) and after fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from moeconsol.testing import save_model, tiny_mixtral_config, tiny_switch_config, tiny_tokenizer

SEED = 1234

# ---------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Size:
    """Model dimensions, data sizes and training lengths of one build."""

    hidden: int
    intermediate: int
    layers: int
    experts: int
    vocab: int
    base_steps: int
    variant_steps: int
    batch: int
    """Blocks of `seq_len` tokens per causal-LM step."""
    pairs: int
    """(input, target) examples per seq2seq step (they are short)."""
    seq_len: int
    """Training window of the causal LM, and its max_position_embeddings: `moeconsol eval`
    scores perplexity in windows of min(2048, max_position_embeddings) tokens, so the
    evaluation sees exactly the context lengths the model was trained on."""
    train_docs: int
    """Documents per text domain (the base's mixed text has all domains: 3x as many)."""
    eval_docs: int
    train_pairs: int
    """Training examples per seq2seq task."""
    eval_pairs: int
    """Held-out examples per seq2seq task (one JSONL file each)."""
    switch_base_steps: int
    switch_variant_steps: int
    lr: float = 3e-3


FULL = Size(
    hidden=64,
    intermediate=128,
    layers=4,
    experts=8,
    vocab=512,
    base_steps=900,
    variant_steps=200,
    batch=16,
    pairs=32,
    seq_len=64,
    train_docs=1000,
    eval_docs=120,
    train_pairs=4000,
    eval_pairs=300,
    switch_base_steps=600,
    switch_variant_steps=300,
    lr=5e-3,
)
"""The demo family: 3.8 minutes of CPU on one thread (measured: 227 s user time); the wall time on
an idle machine, several times that on a busy one."""

SMALL = Size(
    hidden=32,
    intermediate=64,
    layers=2,
    experts=4,
    vocab=320,
    base_steps=40,
    variant_steps=40,
    batch=8,
    pairs=16,
    seq_len=32,
    train_docs=120,
    eval_docs=24,
    train_pairs=600,
    eval_pairs=24,
    switch_base_steps=40,
    switch_variant_steps=40,
    lr=5e-3,
)
"""For tests: same structure, a few seconds."""


# ---------------------------------------------------------------------------------------------
# Data: generated deterministically from a seed
# ---------------------------------------------------------------------------------------------

_NAMES = ["Ada", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivy", "Jack", "Kira", "Leo", "Mia", "Nora"]
_ANIMALS = ["fox", "cat", "dog", "owl", "bear", "frog", "duck", "mouse", "horse", "rabbit"]
_ADJECTIVES = ["small", "brave", "quiet", "happy", "clever", "sleepy", "kind", "curious", "old", "tiny"]
_PLACES = ["forest", "village", "garden", "river", "hill", "castle", "farm", "meadow", "cave", "town"]
_THINGS = ["red ball", "golden key", "old map", "blue hat", "little boat", "shiny stone", "lost book", "warm coat"]
_FEELINGS = ["happy", "surprised", "proud", "tired", "hungry", "glad", "calm"]
_WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "green",
    "tiger",
    "music",
    "paper",
    "light",
    "sugar",
    "north",
    "chair",
    "ocean",
    "plant",
    "storm",
    "bread",
    "glass",
    "horse",
    "smile",
    "train",
    "water",
    "night",
    "field",
    "house",
    "queen",
    "robot",
    "spoon",
    "table",
    "union",
    "voice",
]


def story_doc(rng: random.Random) -> str:
    """A few simple English sentences about an animal."""
    name, animal, adj = rng.choice(_NAMES), rng.choice(_ANIMALS), rng.choice(_ADJECTIVES)
    place, thing, feeling = rng.choice(_PLACES), rng.choice(_THINGS), rng.choice(_FEELINGS)
    friend = rng.choice([a for a in _ANIMALS if a != animal])
    sentences = [
        f"Once upon a time there was a {adj} {animal} named {name}.",
        f"{name} lived near the {place}.",
        f"One day {name} found a {thing}.",
        f"The {friend} asked {name} to share the {thing}.",
        f"{name} felt {feeling} and said yes.",
        f"They played by the {place} until the sun went down.",
    ]
    return " ".join(sentences[: rng.randint(3, len(sentences))])


def math_doc(rng: random.Random) -> str:
    """A few lines of correct integer arithmetic, e.g. "12 + 7 = 19"."""
    lines = []
    for _ in range(rng.randint(3, 6)):
        op = rng.choice("+-*")
        a, b = rng.randint(0, 50), rng.randint(0, 50 if op != "*" else 12)
        value = a + b if op == "+" else a - b if op == "-" else a * b
        lines.append(f"{a} {op} {b} = {value}")
    return "\n".join(lines)


def code_doc(rng: random.Random) -> str:
    """A small Python snippet."""
    f = rng.choice(["add", "scale", "total", "mean", "clip", "square", "pair", "count"])
    a, b = rng.sample(["x", "y", "n", "k", "a", "b", "value", "items"], 2)
    op = rng.choice(["+", "-", "*"])
    n = rng.randint(2, 9)
    forms = [
        f"def {f}({a}, {b}):\n    return {a} {op} {b}\n",
        f"for {a} in range({n}):\n    print({a} {op} {n})\n",
        f"def {f}({a}):\n    if {a} > {n}:\n        return {n}\n    return {a}\n",
        f"{a} = [{', '.join(str(rng.randint(0, 9)) for _ in range(n))}]\nprint(len({a}), sum({a}))\n",
        f"def {f}({a}):\n    {b} = 0\n    for i in {a}:\n        {b} = {b} {op} i\n    return {b}\n",
        f"class {f.capitalize()}:\n    def __init__(self, {a}):\n        self.{a} = {a}\n",
    ]
    return rng.choice(forms).rstrip("\n")


TextDomains = dict[str, Callable[[random.Random], str]]
TEXT_DOMAINS: TextDomains = {"code": code_doc, "math": math_doc, "story": story_doc}


def text_docs(
    domain: str, n: int, seed: int, domains: TextDomains = TEXT_DOMAINS, base: Sequence[str] | None = None
) -> list[str]:
    """`n` documents of one domain (a key of `domains`), of several in turn ("a+b"), or of the
    base's domains in turn ("mixed"; `base`, default every domain)."""
    rng = random.Random(f"{domain}-{seed}")
    parts = list(base or domains) if domain == "mixed" else domain.split("+")
    gens = [domains[p] for p in parts]
    return [gens[i % len(gens)](rng) for i in range(n)]


def _words(rng: random.Random, vocabulary: Sequence[str] = _WORDS) -> list[str]:
    return rng.sample(list(vocabulary), rng.randint(2, 5))


Seq2SeqTasks = dict[str, Callable[[list[str]], tuple[str, str]]]
SEQ2SEQ_TASKS: Seq2SeqTasks = {
    "copy": lambda w: ("copy: " + " ".join(w), " ".join(w)),
    "reverse": lambda w: ("reverse: " + " ".join(w), " ".join(reversed(w))),
    "upper": lambda w: ("upper: " + " ".join(w), " ".join(w).upper()),
    "prefix": lambda w: ("prefix: " + " ".join(w), "out: " + " ".join(w)),
}
BASE_TASKS = ("copy",)
"""The Switch base's data ("mixed"): the generic skill every variant builds on. The variants'
tasks are new to the base, so each fine-tune has a clear gain to keep (or lose) in
consolidation; a base trained on them too would leave the variants little to gain."""


def seq2seq_pairs(
    task: str,
    n: int,
    seed: int,
    tasks: Seq2SeqTasks = SEQ2SEQ_TASKS,
    base_tasks: Sequence[str] = BASE_TASKS,
    vocabulary: Sequence[str] = _WORDS,
) -> list[dict[str, str]]:
    """`n` {"input", "target"} examples of one task, of several in turn ("a+b"), or of the
    base's tasks in turn ("mixed")."""
    rng = random.Random(f"{task}-{seed}")
    chosen = list(base_tasks) if task == "mixed" else task.split("+")
    pairs = []
    for i in range(n):
        source, target = tasks[chosen[i % len(chosen)]](_words(rng, vocabulary))
        pairs.append({"input": source, "target": target})
    return pairs


def text_of(docs: Sequence[str]) -> str:
    """Documents separated by a blank line: the text files' content, trained on and scored as is."""
    return "\n\n".join(docs) + "\n"


def write_text(path: Path, docs: Sequence[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text_of(docs))
    return path


def write_jsonl(path: Path, pairs: Sequence[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return path


# ---------------------------------------------------------------------------------------------
# Batches and losses
# ---------------------------------------------------------------------------------------------


def token_stream(tokenizer, docs: Sequence[str], seq_len: int) -> torch.Tensor:
    """The documents' text (`text_of`) tokenized as one stream, as `moeconsol eval` reads a file."""
    ids = tokenizer(text_of(docs))["input_ids"]
    if len(ids) <= seq_len:
        raise ValueError(f"{len(ids)} tokens make no window of {seq_len}")
    return torch.tensor(ids)


def windows(stream: torch.Tensor, starts: Sequence[int], seq_len: int) -> torch.Tensor:
    """[len(starts), seq_len] windows of the stream (training batches start anywhere)."""
    return torch.stack([stream[s : s + seq_len] for s in starts])


def encode_seq2seq(tokenizer, pairs: Sequence[dict[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels), padded with the pad id; labels padded with -100.

    Inputs are tokenized as `moeconsol eval` does (no EOS appended); targets end in EOS so
    that greedy generation learns to stop.
    """
    sources = [tokenizer(p["input"])["input_ids"] for p in pairs]
    targets = [tokenizer(p["target"])["input_ids"] + [tokenizer.eos_token_id] for p in pairs]

    def pad(rows: list[list[int]], value: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        return torch.tensor([r + [value] * (width - len(r)) for r in rows])

    input_ids = pad(sources, tokenizer.pad_token_id)
    return input_ids, (input_ids != tokenizer.pad_token_id).long(), pad(targets, -100)


def causal_loss(model, blocks: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every position of the blocks."""
    logits = model(input_ids=blocks).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))


def seq2seq_loss(model, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the target tokens (router auxiliary losses left out)."""
    input_ids, mask, labels = batch
    logits = model(input_ids=input_ids, attention_mask=mask, labels=labels).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


@torch.no_grad()
def eval_causal(model, tokenizer, docs: Sequence[str], seq_len: int) -> float:
    """Held-out loss of a causal LM on `docs` (nats per token): the log of the perplexity
    `moeconsol eval` reports for the held-out file (windows of `seq_len` tokens)."""
    from moeconsol.quality.metrics import perplexity

    model.eval()
    return math.log(perplexity(model, tokenizer, text_of(docs), chunk_len=seq_len).perplexity)


@torch.no_grad()
def eval_seq2seq(model, tokenizer, pairs: Sequence[dict[str, str]]) -> tuple[float, float]:
    """Held-out (loss, token accuracy) of a seq2seq model on `pairs`.

    Loss: nats per target token, EOS included. Token accuracy: teacher-forced argmax over
    the target's own tokens (EOS excluded), the definition `moeconsol eval` uses.
    """
    model.eval()
    input_ids, mask, labels = encode_seq2seq(tokenizer, pairs)
    logits = model(input_ids=input_ids, attention_mask=mask, labels=labels).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    scored = (labels != -100) & (labels != tokenizer.eos_token_id)
    correct = (logits.argmax(-1) == labels) & scored
    return float(loss), int(correct.sum()) / int(scored.sum())


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

TRAINABLE: dict[str, Callable[[str], bool]] = {
    "all": lambda name: True,
    "non-experts": lambda name: ".experts." not in name,
    "experts+routers": lambda name: ".experts." in name or ".mlp.gate." in name or ".router." in name,
    "experts": lambda name: ".experts." in name,
}
"""What a fine-tune trains, by parameter name (Mixtral and Switch names alike)."""


def train(
    model,
    loss_of_batch: Callable[[list[int]], torch.Tensor],
    n_examples: int,
    batch: int,
    lr: float,
    steps: int,
    trainable: str,
    seed: int,
    experts: Sequence[int] | None = None,
) -> float:
    """AdamW over the parameters `trainable` selects, on random batches of `batch` example indices.
    With `experts`, only those expert indices (in every MoE layer) train; the others stay
    bit-identical (a fused expert tensor's other rows get a zero gradient, which AdamW without
    weight decay leaves unmoved).

    Returns the mean training loss of the last 10 steps.
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    keep = TRAINABLE[trainable]
    params, hooks = [], []
    for name, p in model.named_parameters():
        p.requires_grad_(keep(name) and _expert_trains(name, experts))
        if p.requires_grad:
            params.append(p)
            mask = _fused_expert_mask(name, p, experts)
            if mask is not None:
                hooks.append(p.register_hook(lambda g, m=mask: g * m))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.1, 1 - s / steps))
    model.train()
    recent: list[float] = []
    for _ in range(steps):
        loss = loss_of_batch(rng.sample(range(n_examples), min(batch, n_examples)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        recent = (recent + [loss.item()])[-10:]
    for h in hooks:
        h.remove()
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return sum(recent) / len(recent)


_PER_EXPERT = re.compile(r"\.experts\.expert_(\d+)\.")


def _expert_trains(name: str, experts: Sequence[int] | None) -> bool:
    """False for a per-expert parameter (Switch `experts.expert_{j}.`) of an expert not in `experts`."""
    m = _PER_EXPERT.search(name)
    return experts is None or m is None or int(m.group(1)) in experts


def _fused_expert_mask(name: str, p: torch.Tensor, experts: Sequence[int] | None) -> torch.Tensor | None:
    """For a fused expert tensor (Mixtral `experts.gate_up_proj`, one row per expert on dim 0)
    when only `experts` train: 1 on their rows, 0 elsewhere; None otherwise."""
    if experts is None or ".experts." not in name or _PER_EXPERT.search(name):
        return None
    mask = torch.zeros(p.shape[0], *[1] * (p.dim() - 1), dtype=p.dtype)
    mask[list(experts)] = 1
    return mask


# ---------------------------------------------------------------------------------------------
# Families
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    name: str
    data: str
    """Text domain or seq2seq task it is fine-tuned on."""
    trainable: str
    """Key of TRAINABLE."""
    save: str = "per-expert"
    """"per-expert", "fused" or "sharded"."""
    step_factor: float = 1.0
    """Fine-tuning steps as a multiple of the Size's variant steps."""
    lr: float | None = None
    """Learning rate (None: the Size's)."""
    experts: tuple[int, ...] | None = None
    """Only these expert indices train, in every MoE layer (None: every expert `trainable` allows)."""


MIXTRAL_VARIANTS = (
    Variant("code", "code", "non-experts"),
    Variant("math", "math", "all", save="fused"),
    Variant("story", "story", "experts+routers", save="sharded"),
)
SWITCH_VARIANTS = (
    Variant("reverse", "reverse", "all"),
    Variant("upper", "upper", "non-experts"),
    Variant("prefix", "prefix", "experts+routers", save="sharded"),
)


@dataclass(frozen=True)
class TextFamily:
    """A causal-LM family as data: its text domains, its fine-tunes and its seed."""

    domains: TextDomains
    variants: tuple[Variant, ...]
    seed: int = SEED
    base_domains: tuple[str, ...] | None = None
    """The domains the base trains on ("mixed"); None: every domain."""


@dataclass(frozen=True)
class Seq2SeqFamily:
    """A seq2seq family as data: its tasks, what the base learns, its words, fine-tunes and seed."""

    tasks: Seq2SeqTasks
    base_tasks: tuple[str, ...]
    variants: tuple[Variant, ...]
    vocabulary: tuple[str, ...] = tuple(_WORDS)
    seed: int = SEED


MIXTRAL_FAMILY = TextFamily(TEXT_DOMAINS, MIXTRAL_VARIANTS)
SWITCH_FAMILY = Seq2SeqFamily(SEQ2SEQ_TASKS, BASE_TASKS, SWITCH_VARIANTS)


@dataclass
class ModelReport:
    """One built (or reused) model of a family, as printed and written to family.json."""

    family: str
    name: str
    path: str
    status: str
    """"built" or "reused"."""
    data: str
    trainable: str
    save: str
    steps: int
    train_loss: float | None
    """Mean loss of the last training steps (None when reused)."""
    eval_file: str
    base_eval_loss: float
    """The base model's loss on this model's held-out data."""
    eval_loss: float
    """This model's loss on its own held-out data."""
    base_eval_accuracy: float | None = None
    """Seq2seq only: the base model's teacher-forced token accuracy on this model's held-out data."""
    eval_accuracy: float | None = None
    """Seq2seq only: this model's token accuracy on its own held-out data."""
    train_file: str = ""
    """The data it was trained on (calibration reads it)."""
    lr: float | None = None
    experts: list[int] | None = None
    """The expert indices it trained (None: every expert its `trainable` allows)."""


@dataclass
class FamilyReport:
    out: str
    size: dict
    seconds: float
    models: list[ModelReport] = field(default_factory=list)


def _save(model, path: Path, tokenizer, how: str) -> None:
    if path.exists():
        shutil.rmtree(path)
    if how == "sharded":
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        save_model(model, path, tokenizer, max_shard_size=total // 3 + 1)
    else:
        save_model(model, path, tokenizer, fused=how == "fused")


def _built(path: Path) -> bool:
    return (path / "config.json").is_file()


def build_text_family(
    out: Path, size: Size, force: bool = False, log: Callable[[str], None] = print, spec: TextFamily = MIXTRAL_FAMILY
) -> list[ModelReport]:
    """The Mixtral family `spec` in OUT/mixtral, data in OUT/data; returns one report per model."""
    from transformers import MixtralForCausalLM, PreTrainedTokenizerFast

    root = out / "mixtral"
    seed, domains = spec.seed, spec.domains
    base_domains = spec.base_domains
    keys = dict.fromkeys(["mixed", *domains, *(v.data for v in spec.variants)])
    train_docs = {
        d: text_docs(
            d,
            size.train_docs * len(base_domains or domains) if d == "mixed" else size.train_docs,
            seed,
            domains,
            base_domains,
        )
        for d in keys
    }
    eval_docs = {d: text_docs(d, size.eval_docs, seed + 1, domains, base_domains) for d in keys}
    train_files = {d: write_text(out / "data" / "train" / f"mixtral-{d}.txt", train_docs[d]) for d in train_docs}
    eval_files = {d: write_text(out / "data" / "eval" / f"mixtral-{d}.txt", eval_docs[d]) for d in eval_docs}

    base_dir = root / "base"
    rebuild_base = force or not _built(base_dir)
    reports = []
    if rebuild_base:
        log("mixtral/base: training on mixed text")
        tokenizer = tiny_tokenizer("\n".join(sum(train_docs.values(), [])), vocab_size=size.vocab)
        config = tiny_mixtral_config(
            vocab_size=len(tokenizer),
            hidden_size=size.hidden,
            intermediate_size=size.intermediate,
            num_hidden_layers=size.layers,
            num_local_experts=size.experts,
            max_position_embeddings=size.seq_len,
        )
        torch.manual_seed(seed)
        base = MixtralForCausalLM(config)
        stream = token_stream(tokenizer, train_docs["mixed"], size.seq_len)
        loss = train(
            base,
            lambda idx: causal_loss(base, windows(stream, idx, size.seq_len)),
            len(stream) - size.seq_len + 1,
            size.batch,
            size.lr,
            size.base_steps,
            "all",
            seed,
        )
        _save(base, base_dir, tokenizer, "per-expert")
    else:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(base_dir)
        base = MixtralForCausalLM.from_pretrained(base_dir).eval()
        loss = None
    base_mixed = eval_causal(base, tokenizer, eval_docs["mixed"], size.seq_len)
    reports.append(
        ModelReport(
            "mixtral",
            "base",
            str(base_dir),
            "built" if rebuild_base else "reused",
            "mixed",
            "all",
            "per-expert",
            size.base_steps,
            loss,
            str(eval_files["mixed"]),
            base_mixed,
            base_mixed,
            train_file=str(train_files["mixed"]),
            lr=size.lr,
        )
    )

    for i, v in enumerate(spec.variants):
        path = root / v.name
        steps, lr = round(v.step_factor * size.variant_steps), v.lr or size.lr
        base_loss = eval_causal(base, tokenizer, eval_docs[v.data], size.seq_len)
        if rebuild_base or not _built(path):
            log(f"mixtral/{v.name}: fine-tuning {v.trainable} on {v.data}")
            model = MixtralForCausalLM.from_pretrained(base_dir)
            stream = token_stream(tokenizer, train_docs[v.data], size.seq_len)
            loss = train(
                model,
                lambda idx: causal_loss(model, windows(stream, idx, size.seq_len)),
                len(stream) - size.seq_len + 1,
                size.batch,
                lr,
                steps,
                v.trainable,
                seed + 10 + i,
                v.experts,
            )
            _save(model, path, tokenizer, v.save)
            status = "built"
        else:
            model, loss, status = MixtralForCausalLM.from_pretrained(path).eval(), None, "reused"
        own = eval_causal(model, tokenizer, eval_docs[v.data], size.seq_len)
        reports.append(
            ModelReport(
                "mixtral",
                v.name,
                str(path),
                status,
                v.data,
                v.trainable,
                v.save,
                steps,
                loss,
                str(eval_files[v.data]),
                base_loss,
                own,
                train_file=str(train_files[v.data]),
                lr=lr,
                experts=None if v.experts is None else list(v.experts),
            )
        )
    return reports


def build_seq2seq_family(
    out: Path, size: Size, force: bool = False, log: Callable[[str], None] = print, spec: Seq2SeqFamily = SWITCH_FAMILY
) -> list[ModelReport]:
    """The Switch Transformers family `spec` in OUT/switch, data in OUT/data; one report per model."""
    from transformers import PreTrainedTokenizerFast
    from transformers import SwitchTransformersForConditionalGeneration as Switch

    root = out / "switch"
    seed = spec.seed
    tasks = ["mixed", *(v.data for v in spec.variants)]

    def pairs_of(task: str, n: int, s: int) -> list[dict[str, str]]:
        return seq2seq_pairs(task, n, s, spec.tasks, spec.base_tasks, spec.vocabulary)

    train_pairs = {t: pairs_of(t, size.train_pairs, seed) for t in tasks}
    eval_pairs = {t: pairs_of(t, size.eval_pairs, seed + 1) for t in tasks}
    train_files = {t: write_jsonl(out / "data" / "train" / f"switch-{t}.jsonl", train_pairs[t]) for t in tasks}
    eval_files = {t: write_jsonl(out / "data" / "eval" / f"switch-{t}.jsonl", eval_pairs[t]) for t in tasks}

    base_dir = root / "base"
    rebuild_base = force or not _built(base_dir)
    reports = []
    if rebuild_base:
        log("switch/base: training on a mix of tasks")
        text = "\n".join(p["input"] + "\n" + p["target"] for t in tasks for p in train_pairs[t])
        tokenizer = tiny_tokenizer(text, vocab_size=size.vocab)
        config = tiny_switch_config(
            vocab_size=len(tokenizer),
            d_model=size.hidden,
            d_ff=size.intermediate,
            d_kv=size.hidden // 4,
            num_layers=size.layers,
            num_decoder_layers=size.layers,
            num_experts=size.experts,
            dropout_rate=0.0,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(seed)
        base = Switch(config)
        pairs = train_pairs["mixed"]
        loss = train(
            base,
            lambda idx: seq2seq_loss(base, encode_seq2seq(tokenizer, [pairs[j] for j in idx])),
            len(pairs),
            size.pairs,
            size.lr,
            size.switch_base_steps,
            "all",
            seed,
        )
        _save(base, base_dir, tokenizer, "per-expert")
    else:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(base_dir)
        base, loss = Switch.from_pretrained(base_dir).eval(), None
    base_mixed, base_acc = eval_seq2seq(base, tokenizer, eval_pairs["mixed"])
    reports.append(
        ModelReport(
            "switch",
            "base",
            str(base_dir),
            "built" if rebuild_base else "reused",
            "mixed",
            "all",
            "per-expert",
            size.switch_base_steps,
            loss,
            str(eval_files["mixed"]),
            base_mixed,
            base_mixed,
            base_acc,
            base_acc,
            train_file=str(train_files["mixed"]),
            lr=size.lr,
        )
    )

    for i, v in enumerate(spec.variants):
        path = root / v.name
        steps, lr = round(v.step_factor * size.switch_variant_steps), v.lr or size.lr
        base_loss, base_acc = eval_seq2seq(base, tokenizer, eval_pairs[v.data])
        if rebuild_base or not _built(path):
            log(f"switch/{v.name}: fine-tuning {v.trainable} on {v.data}")
            model = Switch.from_pretrained(base_dir)
            pairs = train_pairs[v.data]
            loss = train(
                model,
                lambda idx: seq2seq_loss(model, encode_seq2seq(tokenizer, [pairs[j] for j in idx])),
                len(pairs),
                size.pairs,
                lr,
                steps,
                v.trainable,
                seed + 10 + i,
                v.experts,
            )
            _save(model, path, tokenizer, v.save)
            status = "built"
        else:
            model, loss, status = Switch.from_pretrained(path).eval(), None, "reused"
        own, own_acc = eval_seq2seq(model, tokenizer, eval_pairs[v.data])
        reports.append(
            ModelReport(
                "switch",
                v.name,
                str(path),
                status,
                v.data,
                v.trainable,
                v.save,
                steps,
                loss,
                str(eval_files[v.data]),
                base_loss,
                own,
                base_acc,
                own_acc,
                train_file=str(train_files[v.data]),
                lr=lr,
                experts=None if v.experts is None else list(v.experts),
            )
        )
    return reports


def build(
    out: str | Path,
    small: bool = False,
    force: bool = False,
    size: Size | None = None,
    log: Callable[[str], None] = print,
    text: TextFamily = MIXTRAL_FAMILY,
    seq2seq: Seq2SeqFamily = SWITCH_FAMILY,
) -> FamilyReport:
    """Build (or reuse) both families (`text`, `seq2seq`) under `out`; write OUT/family.json;
    return the report."""
    out = Path(out)
    size = size or (SMALL if small else FULL)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # Models this small gain nothing from intra-op threads, and on a busy machine the
    # threads' spin-waiting makes training several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        models = build_text_family(out, size, force, log, text) + build_seq2seq_family(out, size, force, log, seq2seq)
    finally:
        torch.set_num_threads(threads)
    report = FamilyReport(str(out), asdict(size), time.perf_counter() - start, models)
    (out / "family.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


def print_report(report: FamilyReport) -> None:
    from rich.console import Console
    from rich.table import Table

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    table = Table(title=f"Model family in {report.out}")
    columns = [
        "model",
        "status",
        "trains",
        "saved",
        "steps",
        "train loss",
        "own data: base",
        "own data: model",
        "token acc: base",
        "token acc: model",
    ]
    for col in columns:
        left = col in ("model", "status", "trains", "saved")
        table.add_column(col, justify="left" if left else "right", no_wrap=True)
    for m in report.models:
        table.add_row(
            f"{m.family}/{m.name}",
            m.status,
            m.trainable,
            m.save,
            str(m.steps),
            fmt(m.train_loss),
            fmt(m.base_eval_loss),
            fmt(m.eval_loss),
            fmt(m.base_eval_accuracy),
            fmt(m.eval_accuracy),
        )
    console = Console(width=max(Console().width, 150))
    console.print(table)
    console.print(
        f"Losses are mean cross-entropy (nats/token) on held-out data in {report.out}/data/eval/ "
        "(Mixtral: log of `moeconsol eval`'s perplexity); token accuracy is teacher-forced (Switch). "
        f"Total time: {report.seconds:.1f} s."
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory to build the family in")
    parser.add_argument("--force", action="store_true", help="rebuild every model even if it exists")
    parser.add_argument("--small", action="store_true", help="a smaller, faster family (what the tests build)")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    report = build(args.out, small=args.small, force=args.force)
    print_report(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
