"""Build K generated families of REAL fine-tuned MoE models per architecture, each drawn from a seed.

    python examples/build_families.py --seed S --count K --out DIR
                                      [--archs mixtral,switch] [--size small|full] [--force]

Family `seed-N` (N = S .. S+K-1) is drawn from its seed alone, so a family is the same on
every machine and in every run (up to torch's training numerics). Per architecture the seed
draws:

- its data: text styles for the causal LM (Mixtral), from a pool of 18 generated styles
  (the example families' six and twelve more: C headers, legal clauses, recipes, server
  logs, HTML, weather reports, chess moves, shell sessions, Markdown notes, emails, YAML
  configs, rhymes); character and word tasks for the seq2seq model (Switch), from a pool of
  22 (the example families' nine and thirteen more) on one of three word lists; what the base
  learns (Mixtral: the variants' styles among up to two others, so each fine-tune
  specialises; Switch: one or two generic tasks, so each variant's task is new to it);
- its size, within CPU-trainable ranges (`--size`): hidden size, expert FFN, layers, experts,
  window length, base and fine-tuning steps, learning rates;
- its variants, 2 to 5, each with its own steps, learning rate and on-disk layout;
- its recipe, the seed modulo 5 (so any 5 consecutive seeds cover every recipe):
  0 `full` every variant a full fine-tune; 1 `experts` expert-only fine-tunes (routers,
  attention, norms, embeddings frozen); 2 `some-experts` only some expert indices tuned,
  the others frozen bit-identical to the base; 3 `overlap` variants trained on overlapping
  data (variant i on domains i and i+1); 4 `mixed` each variant its own recipe.

Output, per family, the shape of examples/build_family.py (so benchmarks/quality.py reads
both alike): DIR/seed-N/{mixtral,switch}/{base,<variant>...}, DIR/seed-N/data/{train,eval}/,
DIR/seed-N/family.json (models with their training and held-out files, and each
architecture's drawn spec). The building blocks (data writers, training loop, evaluation,
saving) are build_family.py's, imported.

Reuse: an architecture whose saved spec (DIR/seed-N/ARCH/spec.json) equals the one drawn
now keeps every model already saved; a different or missing spec rebuilds it; `--force`
rebuilds everything. Seeds 0 and 1 are the tuning families of benchmarks/quality.py, the
others its report families (docs/quality.md, "Over many generated families").
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import json
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path


def _load(name: str, file: str):
    """A sibling example script as a module (examples/ is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(file))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


bf = _load("build_family", "build_family.py")
bf2 = _load("build_family2", "build_family2.py")

ARCHS = ("mixtral", "switch")
RECIPES = ("full", "experts", "some-experts", "overlap", "mixed")
SAVES = {"mixtral": ("per-expert", "fused", "sharded"), "switch": ("per-expert", "sharded")}
"""The on-disk layouts a variant is saved in (Switch has no fused layout)."""
TUNING_SEEDS = (0, 1)
"""The families defaults may be chosen on; every other seed is for reporting only."""

# ---------------------------------------------------------------------------------------------
# Text styles (causal LM)
# ---------------------------------------------------------------------------------------------

_NAMES = ["Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hiro", "Ines", "Jonas", "Kemal", "Lucia"]
_NOUNS = ["buffer", "socket", "parser", "queue", "token", "vector", "stream", "handle", "cache", "thread"]
_C_TYPES = ["int", "size_t", "char *", "const char *", "void *", "uint32_t", "double", "bool"]
_PARTIES = ["Licensee", "Licensor", "Tenant", "Landlord", "Supplier", "Customer", "Contractor", "Company"]
_DUTIES = ["pay", "deliver", "return", "maintain", "disclose", "insure", "repair", "report"]
_OBJECTS = ["the fees", "the goods", "the premises", "all records", "the software", "the deposit", "the invoice"]
_EVENTS = ["termination", "delivery", "written notice", "the effective date", "each quarter", "any breach"]
_DISHES = ["pancakes", "tomato soup", "fried rice", "apple pie", "lentil stew", "banana bread", "omelette"]
_INGREDIENTS = ["flour", "sugar", "eggs", "milk", "butter", "salt", "rice", "onion", "garlic", "tomatoes", "oil"]
_SERVICES = ["api", "auth", "db", "worker", "cache", "gateway", "scheduler"]
_LEVELS = ["INFO", "INFO", "INFO", "WARN", "ERROR", "DEBUG"]
_MESSAGES = ["request served", "connection closed", "retrying job", "cache miss", "user logged in", "timeout"]
_CITIES = ["Oslo", "Lima", "Cairo", "Quito", "Riga", "Perth", "Dakar", "Hanoi", "Porto", "Bern", "Lyon", "Kyiv"]
_SKIES = ["sunny", "cloudy", "light rain", "heavy rain", "snow", "fog", "thunderstorms", "clear skies"]
_WINDS = ["north", "south", "east", "west", "north-west", "south-east"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_MOVES = [
    "e4", "e5", "d4", "d5", "Nf3", "Nc6", "Bb5", "a6", "Ba4", "Nf6", "O-O", "Be7", "c4", "e6",
    "Nc3", "Bb4", "Qc2", "c5", "g3", "g6", "Bg2", "Bg7", "Re1", "b5", "Bb3", "d6", "h3", "Qxd4",
]  # fmt: skip
_COMMANDS = [
    "ls -la {d}",
    "cd {d}",
    "grep -rn {w} src/",
    "cat {d}/{w}.txt",
    "mkdir -p {d}/{w}",
    'git commit -m "fix {w}"',
    "tar -czf {w}.tar.gz {d}",
    "rm {w}.log",
    "python {w}.py --verbose",
    "chmod +x {w}.sh",
]
_DIRS = ["/var/log", "/etc", "~/projects", "/tmp", "/usr/local/bin", "./build", "./data"]
_TOPICS = ["Release notes", "Meeting", "Todo", "Travel plan", "Reading list", "Ideas", "Shopping"]
_ITEMS = ["update the docs", "call the bank", "buy milk", "fix the tests", "book a train", "water plants"]
_SUBJECTS = ["Invoice", "Meeting tomorrow", "Your order", "Project update", "Quick question", "Holiday"]
_KEYS = ["name", "port", "host", "replicas", "timeout", "level", "image", "region"]
_ADJS = ["silver", "quiet", "golden", "gentle", "ancient", "restless", "lonely", "bright"]
_THINGS = ["moon", "river", "wind", "forest", "sea", "mountain", "star", "rain"]
_RHYMES = [("night", "light"), ("sea", "free"), ("day", "away"), ("song", "long"), ("sky", "by"), ("tree", "me")]


def c_header_doc(rng: random.Random) -> str:
    """A C header: include guard, macros, prototypes, a struct."""
    guard = rng.choice(_NOUNS).upper()
    lines = [f"#ifndef {guard}_H", f"#define {guard}_H"]
    for _ in range(rng.randint(2, 4)):
        noun, other = rng.sample(_NOUNS, 2)
        t1, t2, t3 = (rng.choice(_C_TYPES) for _ in range(3))
        lines.append(
            rng.choice(
                [
                    f"#define {noun.upper()}_MAX {rng.randint(8, 4096)}",
                    f"{t1} {noun}_{rng.choice(['open', 'close', 'read', 'write', 'init'])}({t2} {other}, {t3} n);",
                    f"typedef struct {{ {t1} {noun}; {t2} {other}; }} {noun}_t;",
                    f"extern {t1} {noun}_{other};",
                ]
            )
        )
    lines.append(f"#endif /* {guard}_H */")
    return "\n".join(lines)


def legal_doc(rng: random.Random) -> str:
    """Numbered contract clauses."""
    section = rng.randint(1, 12)
    clauses = []
    for k in range(rng.randint(2, 3)):
        a, b = rng.sample(_PARTIES, 2)
        clauses.append(
            f"{section}.{k + 1} The {a} shall {rng.choice(_DUTIES)} {rng.choice(_OBJECTS)} within "
            f"{rng.choice([5, 10, 14, 30, 60, 90])} days of {rng.choice(_EVENTS)}, unless otherwise "
            f"agreed in writing by the {b}."
        )
    return "\n".join(clauses)


def recipe_doc(rng: random.Random) -> str:
    """A short recipe: ingredients, then numbered steps."""
    ingredients = rng.sample(_INGREDIENTS, rng.randint(3, 5))
    amounts = [f"{rng.randint(1, 4)} {rng.choice(['cups', 'tbsp', 'g', 'pinch'])} {i}" for i in ingredients]
    steps = [
        f"Mix the {ingredients[0]} and the {ingredients[1]}.",
        f"Add the {ingredients[2]} and stir for {rng.randint(1, 10)} minutes.",
        f"Cook at {rng.choice([160, 180, 200, 220])} degrees for {rng.randint(10, 60)} minutes.",
        "Serve warm.",
    ]
    body = "\n".join(f"{k + 1}. {s}" for k, s in enumerate(steps[: rng.randint(2, 4)]))
    return f"Recipe: {rng.choice(_DISHES)}\nIngredients: {', '.join(amounts)}\n{body}"


def logs_doc(rng: random.Random) -> str:
    """Server log lines with timestamps, levels and timings."""
    day, hour = rng.randint(1, 28), rng.randint(0, 23)
    lines = []
    for _ in range(rng.randint(3, 6)):
        lines.append(
            f"2024-03-{day:02d} {hour:02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d} "
            f"{rng.choice(_LEVELS)} {rng.choice(_SERVICES)}: {rng.choice(_MESSAGES)} "
            f"id={rng.randint(100, 999)} took {rng.randint(1, 900)}ms"
        )
    return "\n".join(lines)


def html_doc(rng: random.Random) -> str:
    """A small HTML fragment: a heading and a list of links."""
    items = rng.sample(_NOUNS, rng.randint(2, 4))
    links = "\n".join(f'  <li><a href="/{i}">{i.capitalize()}</a></li>' for i in items)
    return f'<div class="{rng.choice(_SERVICES)}">\n<h2>{rng.choice(_TOPICS)}</h2>\n<ul>\n{links}\n</ul>\n</div>'


def weather_doc(rng: random.Random) -> str:
    """A weather report for a city and a few days."""
    city = rng.choice(_CITIES)
    lines = []
    for day in rng.sample(_DAYS, rng.randint(2, 4)):
        high = rng.randint(-5, 35)
        lines.append(
            f"Weather for {city} on {day}: {rng.choice(_SKIES)}, high {high}C, low {high - rng.randint(3, 12)}C, "
            f"wind {rng.randint(0, 60)} km/h from the {rng.choice(_WINDS)}."
        )
    return "\n".join(lines)


def chess_doc(rng: random.Random) -> str:
    """A game header and numbered moves."""
    white, black = rng.sample(_NAMES, 2)
    moves = " ".join(f"{k + 1}. {rng.choice(_MOVES)} {rng.choice(_MOVES)}" for k in range(rng.randint(4, 9)))
    return f'[White "{white}"]\n[Black "{black}"]\n{moves} {rng.choice(["1-0", "0-1", "1/2-1/2"])}'


def shell_doc(rng: random.Random) -> str:
    """A shell session: prompts and commands."""
    return "\n".join(
        "$ " + rng.choice(_COMMANDS).format(d=rng.choice(_DIRS), w=rng.choice(_NOUNS)) for _ in range(rng.randint(3, 6))
    )


def markdown_doc(rng: random.Random) -> str:
    """A Markdown note: a heading, a bullet list, a bold remark."""
    items = "\n".join(f"- {i}" for i in rng.sample(_ITEMS, rng.randint(2, 4)))
    return f"# {rng.choice(_TOPICS)}\n\n{items}\n\n**Note:** due {rng.choice(_DAYS)}."


def email_doc(rng: random.Random) -> str:
    """A short business email."""
    a, b = rng.sample(_NAMES, 2)
    return (
        f"Subject: {rng.choice(_SUBJECTS)}\n\nDear {a},\n\nThank you for your message about "
        f"{rng.choice(_OBJECTS)}. I will {rng.choice(_DUTIES)} it by {rng.choice(_DAYS)}.\n\n"
        f"Best regards,\n{b}"
    )


def yaml_doc(rng: random.Random) -> str:
    """A YAML service configuration."""
    lines = [f"{rng.choice(_SERVICES)}:"]
    for key in rng.sample(_KEYS, rng.randint(2, 5)):
        value = rng.choice([str(rng.randint(1, 9000)), rng.choice(_CITIES).lower(), rng.choice(["true", "false"])])
        lines.append(f"  {key}: {value}")
    return "\n".join(lines)


def rhyme_doc(rng: random.Random) -> str:
    """Two rhyming couplets."""
    lines = []
    for _ in range(2):
        end1, end2 = rng.choice(_RHYMES)
        adj, thing = rng.choice(_ADJS), rng.choice(_THINGS)
        lines += [f"The {adj} {thing} sang through the {end1},", f"and all the {rng.choice(_THINGS)}s went {end2}."]
    return "\n".join(lines)


TEXT_POOL: bf.TextDomains = {
    **bf.TEXT_DOMAINS,
    **bf2.TEXT_DOMAINS,
    "c-header": c_header_doc,
    "legal": legal_doc,
    "recipe": recipe_doc,
    "logs": logs_doc,
    "html": html_doc,
    "weather": weather_doc,
    "chess": chess_doc,
    "shell": shell_doc,
    "markdown": markdown_doc,
    "email": email_doc,
    "yaml": yaml_doc,
    "rhyme": rhyme_doc,
}
"""Every text style a generated causal-LM family draws from (the example families' six first)."""

# ---------------------------------------------------------------------------------------------
# Character and word tasks (seq2seq)
# ---------------------------------------------------------------------------------------------

WORDS3 = (
    "anchor", "bridge", "candle", "desert", "engine", "falcon", "garden", "hammer", "island", "jacket",
    "kettle", "ladder", "marble", "needle", "orange", "pencil", "rocket", "saddle", "tunnel", "violin",
    "window", "yellow", "zipper", "button", "circle", "dragon", "forest", "guitar", "helmet", "magnet",
)  # fmt: skip
VOCABULARIES = {"words1": tuple(bf._WORDS), "words2": bf2.WORDS, "words3": WORDS3}


def _shift(word: str) -> str:
    return "".join(chr((ord(c) - 97 + 1) % 26 + 97) if "a" <= c <= "z" else c for c in word)


def _task(name: str, out: Callable[[list[str]], str]) -> Callable[[list[str]], tuple[str, str]]:
    return lambda w: (f"{name}: " + " ".join(w), out(w))


_NEW_TASKS = {
    "last": lambda w: w[-1],
    "count": lambda w: str(len(w)),
    "shift": lambda w: " ".join(_shift(x) for x in w),
    "double": lambda w: " ".join(x + " " + x for x in w),
    "initials": lambda w: " ".join(x[0] for x in w),
    "swap": lambda w: " ".join([w[-1], *w[1:-1], w[0]]),
    "lengths": lambda w: " ".join(str(len(x)) for x in w),
    "title": lambda w: " ".join(x.capitalize() for x in w),
    "plural": lambda w: " ".join(x + "s" for x in w),
    "mirror": lambda w: " ".join(x[::-1] for x in w),
    "alpha": lambda w: " ".join(sorted(w)),
    "vowels": lambda w: " ".join("".join(c for c in x if c in "aeiou") or "-" for x in w),
    "hyphen": lambda w: "-".join(w),
}
SEQ2SEQ_POOL: bf.Seq2SeqTasks = {
    **bf.SEQ2SEQ_TASKS,
    **bf2.SEQ2SEQ_TASKS,
    **{name: _task(name, out) for name, out in _NEW_TASKS.items()},
}
"""Every seq2seq task a generated family draws from (the example families' nine first)."""
GENERIC_TASKS = ("copy", "repeat", "first", "last", "hyphen", "count")
"""Tasks a Switch base learns (one or two of them); its variants' tasks are others."""

# ---------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SizeRange:
    """The ranges a family's `bf.Size` is drawn from (choices, or inclusive (low, high) ints)."""

    hidden: tuple[int, ...]
    ffn_factor: tuple[int, ...]
    layers: tuple[int, ...]
    switch_layers: tuple[int, ...]
    """Switch blocks per stack; every second one is sparse (an MoE layer)."""
    experts: tuple[int, ...]
    seq_len: tuple[int, ...]
    base_steps: tuple[int, int]
    variant_steps: tuple[int, int]
    switch_base_steps: tuple[int, int]
    switch_variant_steps: tuple[int, int]
    lr: tuple[float, ...]
    variant_lr: tuple[float, ...]
    train_docs: int
    eval_docs: int
    train_pairs: int
    eval_pairs: int
    batch: int = 8
    pairs: int = 16
    vocab: int = 384


SIZES = {
    "small": SizeRange(
        hidden=(32, 48, 64),
        ffn_factor=(2, 3),
        layers=(2, 3),
        switch_layers=(2, 4),
        experts=(4, 6, 8),
        seq_len=(32, 48),
        base_steps=(200, 320),
        variant_steps=(80, 150),
        switch_base_steps=(150, 250),
        switch_variant_steps=(80, 150),
        lr=(3e-3, 5e-3),
        variant_lr=(2e-3, 3e-3, 5e-3),
        train_docs=300,
        eval_docs=60,
        train_pairs=600,  # also the calibration file: a calibrated merge runs it one example at a time
        eval_pairs=80,
    ),
    "full": SizeRange(
        hidden=(48, 64, 96),
        ffn_factor=(2, 3),
        layers=(3, 4),
        switch_layers=(4, 6),
        experts=(6, 8),
        seq_len=(48, 64),
        base_steps=(600, 900),
        variant_steps=(150, 300),
        switch_base_steps=(400, 600),
        switch_variant_steps=(200, 350),
        lr=(3e-3, 5e-3),
        variant_lr=(2e-3, 3e-3, 5e-3),
        train_docs=800,
        eval_docs=120,
        train_pairs=4000,
        eval_pairs=200,
        batch=16,
        pairs=32,
        vocab=512,
    ),
}
"""`--size`: small builds a family of one architecture in well under a minute on 2 CPU cores
(docs/quality.md has the measured times); full is about the example families' size."""

# ---------------------------------------------------------------------------------------------
# A family drawn from its seed
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One architecture's family, as drawn from its seed: everything its build depends on."""

    arch: str
    seed: int
    recipe: str
    size: dict
    """`bf.Size` fields."""
    base_data: tuple[str, ...]
    """The text domains (Mixtral) or tasks (Switch) the base trains on."""
    variants: tuple[dict, ...]
    """`bf.Variant` fields, one dict per fine-tune."""
    vocabulary: str | None = None
    """Switch: the key of VOCABULARIES its examples are made of."""

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


UNUSED = {
    "mixtral": ("pairs", "train_pairs", "eval_pairs", "switch_base_steps", "switch_variant_steps"),
    "switch": ("batch", "seq_len", "train_docs", "eval_docs", "base_steps", "variant_steps"),
}
"""`bf.Size` fields an architecture's build never reads: 0 in its spec, so that they cannot
make a spec differ (and a family rebuild) without a change to what is built."""


def _size(rng: random.Random, r: SizeRange, arch: str) -> bf.Size:
    hidden = rng.choice(r.hidden)
    size = bf.Size(
        hidden=hidden,
        intermediate=hidden * rng.choice(r.ffn_factor),
        layers=rng.choice(r.layers if arch == "mixtral" else r.switch_layers),
        experts=rng.choice(r.experts),
        vocab=r.vocab,
        base_steps=rng.randint(*r.base_steps),
        variant_steps=rng.randint(*r.variant_steps),
        batch=r.batch,
        pairs=r.pairs,
        seq_len=rng.choice(r.seq_len),
        train_docs=r.train_docs,
        eval_docs=r.eval_docs,
        train_pairs=r.train_pairs,
        eval_pairs=r.eval_pairs,
        switch_base_steps=rng.randint(*r.switch_base_steps),
        switch_variant_steps=rng.randint(*r.switch_variant_steps),
        lr=rng.choice(r.lr),
    )
    return replace(size, **dict.fromkeys(UNUSED[arch], 0))


def _recipe_of(rng: random.Random, recipe: str, experts: int) -> tuple[str, tuple[int, ...] | None]:
    """(trainable, tuned expert indices or None) of one variant under `recipe`."""
    if recipe == "full":
        return "all", None
    if recipe == "experts":
        return "experts", None
    if recipe == "some-experts":
        some = tuple(sorted(rng.sample(range(experts), rng.randint(1, experts // 2))))
        return rng.choice(["experts", "experts+routers", "all"]), some
    if recipe == "overlap":
        return rng.choice(["all", "experts"]), None
    trainable = rng.choice(["all", "experts", "experts+routers", "non-experts"])
    some = None
    if trainable != "non-experts" and rng.random() < 0.3:
        some = tuple(sorted(rng.sample(range(experts), rng.randint(1, experts // 2))))
    return trainable, some


def draw_spec(arch: str, seed: int, size: str = "small") -> Spec:
    """The family of `arch` that `seed` draws (deterministic: a function of its arguments)."""
    rng = random.Random(f"families-{arch}-{seed}-{size}")
    recipe = RECIPES[seed % len(RECIPES)]
    s = _size(rng, SIZES[size], arch)
    n = rng.randint(2, 5)
    if arch == "mixtral":
        pool = list(TEXT_POOL)
    else:
        base_tasks = tuple(rng.sample(GENERIC_TASKS, rng.randint(1, 2)))
        pool = [t for t in SEQ2SEQ_POOL if t not in base_tasks]
    chosen = rng.sample(pool, n + 1 if recipe == "overlap" else n)
    data = [f"{a}+{b}" for a, b in zip(chosen, chosen[1:])] if recipe == "overlap" else chosen
    if arch == "mixtral":
        # The base knows the variants' styles, among up to two more: the fine-tunes specialise.
        # (On a style the base has never seen its perplexity is in the thousands, and every
        # consolidation would keep ~100% of a gain measured from there.)
        others = [d for d in pool if d not in chosen]
        base_data = tuple(chosen) + tuple(rng.sample(others, rng.randint(0, 2)))
    else:
        base_data = base_tasks
    variants = []
    for d in data:
        trainable, experts = _recipe_of(rng, recipe, s.experts)
        variants.append(
            asdict(
                bf.Variant(
                    name=d.replace("+", "-"),
                    data=d,
                    trainable=trainable,
                    save=rng.choice(SAVES[arch]),
                    step_factor=round(rng.uniform(0.6, 1.6), 2),
                    lr=rng.choice(SIZES[size].variant_lr),
                    experts=experts,
                )
            )
        )
    vocabulary = rng.choice(sorted(VOCABULARIES)) if arch == "switch" else None
    return Spec(arch, seed, recipe, asdict(s), base_data, tuple(variants), vocabulary)


def _variants(spec: Spec) -> tuple:
    return tuple(
        bf.Variant(**{**v, "experts": None if v["experts"] is None else tuple(v["experts"])}) for v in spec.variants
    )


def build_arch(out: Path, spec: Spec, force: bool, log: Callable[[str], None]) -> list:
    """Build (or reuse) one architecture's family of `spec` under `out`; its model reports."""
    root = out / spec.arch
    saved = root / "spec.json"
    same = saved.is_file() and json.loads(saved.read_text()) == spec.to_json()
    root.mkdir(parents=True, exist_ok=True)
    if not same:  # a model built from another spec is stale: rebuild them all
        force = True
        _write_atomic(saved, json.dumps(spec.to_json(), indent=2) + "\n")
    size = bf.Size(**spec.size)
    variants = _variants(spec)
    if spec.arch == "mixtral":
        used = dict.fromkeys([*spec.base_data, *(p for v in variants for p in v.data.split("+"))])
        family = bf.TextFamily({d: TEXT_POOL[d] for d in used}, variants, spec.seed, tuple(spec.base_data))
        return bf.build_text_family(out, size, force, log, family)
    words = VOCABULARIES[spec.vocabulary]
    family = bf.Seq2SeqFamily(SEQ2SEQ_POOL, tuple(spec.base_data), variants, words, spec.seed)
    return bf.build_seq2seq_family(out, size, force, log, family)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def family_name(seed: int) -> str:
    return f"seed-{seed}"


def build_family(
    out: Path,
    seed: int,
    archs: Sequence[str] = ARCHS,
    size: str = "small",
    force: bool = False,
    log: Callable[[str], None] = print,
    specs: dict[str, Spec] | None = None,
) -> dict:
    """Build (or reuse) family `seed` of every arch in `archs` in `out`; write out/family.json
    (the models of every architecture built there, this run's and earlier ones') and return it.
    Two processes may build the same family's two architectures at once: family.json is
    read, merged and written under a lock. `specs` (tests): a spec to build instead of the
    drawn one, by architecture."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    built: dict[str, dict] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: intra-op threads only spin on a busy machine
    try:
        for arch in archs:
            spec = (specs or {}).get(arch) or draw_spec(arch, seed, size)
            start, cpu = time.perf_counter(), time.process_time()
            reports = build_arch(out, spec, force, lambda m: log(f"{out.name}/{m}"))
            built[arch] = {
                "seconds": round(time.perf_counter() - start, 2),
                "cpu_seconds": round(time.process_time() - cpu, 2),
                "spec": spec.to_json(),
                "models": [asdict(r) for r in reports],
            }
    finally:
        torch.set_num_threads(threads)
    with _locked(out / "family.json.lock"):
        record = out / "family.json"
        family = json.loads(record.read_text()) if record.is_file() else {}
        family.update(out=str(out), seed=seed, size=size)
        for key in ("seconds", "cpu_seconds", "specs"):
            family[key] = {a: v for a, v in family.get(key, {}).items() if a not in built}
        models = [m for m in family.get("models", []) if m["family"] not in built]
        for arch, b in built.items():
            family["seconds"][arch], family["cpu_seconds"][arch] = b["seconds"], b["cpu_seconds"]
            family["specs"][arch] = b["spec"]
            models += b["models"]
        family["models"] = sorted(models, key=lambda m: ARCHS.index(m["family"]))
        _write_atomic(record, json.dumps(family, indent=2) + "\n")
    return family


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on `path` (created if absent) for the duration of the block."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build(
    out: str | Path,
    seed: int,
    count: int,
    archs: Sequence[str] = ARCHS,
    size: str = "small",
    force: bool = False,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Families `seed` .. `seed + count - 1` under `out` (one directory each); their records."""
    out = Path(out)
    return [build_family(out / family_name(s), s, archs, size, force, log) for s in range(seed, seed + count)]


def print_summary(families: list[dict]) -> None:
    """One line per model: recipe, what it trains, steps, and its own held-out loss base -> model."""
    for f in families:
        for arch in ARCHS:
            if arch not in f["specs"]:
                continue
            spec = f["specs"][arch]
            s = spec["size"]
            print(
                f"{Path(f['out']).name}/{arch}: recipe {spec['recipe']}, hidden {s['hidden']}, "
                f"{s['layers']} layers x {s['experts']} experts, base on {'+'.join(spec['base_data'])}, "
                f"{f['seconds'][arch]:.1f} s ({f['cpu_seconds'][arch]:.1f} s of CPU)"
            )
            for m in f["models"]:
                if m["family"] != arch or m["name"] == "base":
                    continue
                acc = (
                    f", token accuracy {m['base_eval_accuracy']:.3f} -> {m['eval_accuracy']:.3f}"
                    if m["eval_accuracy"] is not None
                    else ""
                )
                experts = "" if m["experts"] is None else f" (experts {','.join(map(str, m['experts']))})"
                print(
                    f"  {m['name']:<20} {m['trainable']}{experts}, {m['steps']} steps at lr {m['lr']:g}: "
                    f"loss {m['base_eval_loss']:.3f} -> {m['eval_loss']:.3f}{acc}"
                )


def parse_archs(text: str) -> list[str]:
    archs = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in archs if a not in ARCHS]
    if unknown or not archs:
        raise argparse.ArgumentTypeError(
            f"unknown architecture {unknown[0] if unknown else text!r}: choose from {', '.join(ARCHS)}"
        )
    return archs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory to build the families in (one subdirectory each)")
    parser.add_argument("--seed", type=int, default=0, help="the first family's seed (default 0)")
    parser.add_argument("--count", type=int, default=1, help="how many families (seeds seed .. seed+count-1)")
    parser.add_argument("--archs", type=parse_archs, default=list(ARCHS), help="comma-separated: mixtral,switch")
    parser.add_argument("--size", choices=list(SIZES), default="small")
    parser.add_argument("--force", action="store_true", help="rebuild every model even if it exists")
    args = parser.parse_args(argv)
    if args.count < 1 or args.seed < 0:
        parser.error("--count must be at least 1 and --seed at least 0")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    families = build(args.out, args.seed, args.count, args.archs, args.size, args.force)
    print_summary(families)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
