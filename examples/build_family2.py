"""Build a SECOND example family, made differently from the first, to test on what was never tuned on.

    python examples/build_family2.py --out /tmp/family2 [--force] [--small]

Same output shape as examples/build_family.py (OUT/mixtral/..., OUT/switch/..., OUT/data/
train|eval, OUT/family.json), so every tool reads both alike; the building blocks (data
writers, training loop, evaluation, saving) are build_family.py's, imported. What differs
is the family itself, given here as data:

- Mixtral: other text styles (`dialogue`: two-speaker chat; `records`: CSV and JSON-like
  records; `sql`: SQL queries), other seeds, another recipe: `dialogue` and `sql` are full
  fine-tunes (sql with a lower learning rate and more steps), `records` is expert-only
  (experts trained; routers, attention, norms and embeddings frozen).
- Switch: other character tasks on another word list (`sort` the letters of each word,
  `devowel`: drop the vowels, `rot13` every letter), a base that learns two generic tasks
  (`repeat` the words, give the `first` word), and another recipe: `sort` and `rot13` full
  fine-tunes (rot13 with more steps at a lower rate), `devowel` expert-only.

This family is for evaluation only: no default of moeconsol is chosen by looking at it
(docs/quality.md). `make demo` does not build it.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path


def _load_first_builder():
    """examples/build_family.py as a module (examples/ is not a package)."""
    if "build_family" in sys.modules:
        return sys.modules["build_family"]
    spec = importlib.util.spec_from_file_location("build_family", Path(__file__).with_name("build_family.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_family"] = module
    spec.loader.exec_module(module)
    return module


bf = _load_first_builder()

SEED = 9001

# ---------------------------------------------------------------------------------------------
# Mixtral: dialogue, records, SQL
# ---------------------------------------------------------------------------------------------

_PEOPLE = ["Ana", "Bo", "Carl", "Dina", "Emil", "Faye", "Gil", "Hugo", "Iris", "Jon", "Kai", "Lena"]
_CITIES = ["Oslo", "Lima", "Cairo", "Quito", "Riga", "Perth", "Dakar", "Hanoi", "Porto", "Bern"]
_FOODS = ["soup", "pasta", "rice", "salad", "bread", "cake", "tea", "coffee", "pie", "curry"]
_TIMES = ["today", "tomorrow", "tonight", "on Monday", "this weekend", "later"]
_TABLES = {
    "users": ["id", "name", "city", "age"],
    "orders": ["id", "user_id", "item", "price"],
    "items": ["id", "title", "stock", "price"],
}


def dialogue_doc(rng: random.Random) -> str:
    """A short two-speaker exchange, one turn a line."""
    a, b = rng.sample(_PEOPLE, 2)
    food, city, when = rng.choice(_FOODS), rng.choice(_CITIES), rng.choice(_TIMES)
    turns = [
        f"{a}: Hi {b}, how are you?",
        f"{b}: I am fine, thanks. And you?",
        f"{a}: Good. Do you want some {food} {when}?",
        f"{b}: Yes, I would like that.",
        f"{a}: Great. I will meet you in {city}.",
        f"{b}: See you there, {a}.",
    ]
    return "\n".join(turns[: rng.randint(3, len(turns))])


def records_doc(rng: random.Random) -> str:
    """A few records, as a CSV table or as JSON-like lines."""
    rows = [
        (rng.randint(1, 99), rng.choice(_PEOPLE), rng.choice(_CITIES), rng.randint(18, 80))
        for _ in range(rng.randint(2, 5))
    ]
    if rng.random() < 0.5:
        return "\n".join(["id,name,city,age"] + [f"{i},{n},{c},{a}" for i, n, c, a in rows])
    return "\n".join(f'{{"id": {i}, "name": "{n}", "city": "{c}", "age": {a}}}' for i, n, c, a in rows)


def sql_doc(rng: random.Random) -> str:
    """One or two SQL statements over a few fixed tables."""
    statements = []
    for _ in range(rng.randint(1, 2)):
        table = rng.choice(list(_TABLES))
        cols = _TABLES[table]
        picked = ", ".join(rng.sample(cols, rng.randint(1, 3)))
        col, n = rng.choice(cols[1:]), rng.randint(1, 50)
        forms = [
            f"SELECT {picked} FROM {table} WHERE {col} > {n};",
            f"SELECT {picked} FROM {table} ORDER BY {col} LIMIT {n};",
            f"SELECT COUNT(*) FROM {table} WHERE {col} = {n};",
            f"UPDATE {table} SET {col} = {n} WHERE id = {rng.randint(1, 99)};",
            f"DELETE FROM {table} WHERE {col} < {n};",
        ]
        statements.append(rng.choice(forms))
    return "\n".join(statements)


TEXT_DOMAINS = {"dialogue": dialogue_doc, "records": records_doc, "sql": sql_doc}
MIXTRAL_VARIANTS = (
    bf.Variant("dialogue", "dialogue", "all"),
    bf.Variant("records", "records", "experts", save="fused", step_factor=1.2),
    bf.Variant("sql", "sql", "all", save="sharded", step_factor=1.2, lr=2e-3),
)

# ---------------------------------------------------------------------------------------------
# Switch: character tasks
# ---------------------------------------------------------------------------------------------

WORDS = (
    "amber",
    "basil",
    "cedar",
    "delta",
    "ember",
    "fable",
    "grape",
    "harbor",
    "igloo",
    "jelly",
    "kayak",
    "lemon",
    "mango",
    "nectar",
    "olive",
    "pepper",
    "quilt",
    "raven",
    "salsa",
    "tulip",
    "velvet",
    "walnut",
    "yarrow",
    "zebra",
    "bison",
    "comet",
    "dune",
    "flint",
    "maple",
    "pilot",
)


def _rot13(word: str) -> str:
    return "".join(chr((ord(c) - 97 + 13) % 26 + 97) if "a" <= c <= "z" else c for c in word)


def _devowel(word: str) -> str:
    return "".join(c for c in word if c not in "aeiou") or word


SEQ2SEQ_TASKS = {
    "repeat": lambda w: ("repeat: " + " ".join(w), " ".join(w)),
    "first": lambda w: ("first: " + " ".join(w), w[0]),
    "sort": lambda w: ("sort: " + " ".join(w), " ".join("".join(sorted(x)) for x in w)),
    "devowel": lambda w: ("devowel: " + " ".join(w), " ".join(_devowel(x) for x in w)),
    "rot13": lambda w: ("rot13: " + " ".join(w), " ".join(_rot13(x) for x in w)),
}
BASE_TASKS = ("repeat", "first")
SWITCH_VARIANTS = (
    bf.Variant("sort", "sort", "all"),
    bf.Variant("devowel", "devowel", "experts"),
    bf.Variant("rot13", "rot13", "all", save="sharded", step_factor=4 / 3, lr=3e-3),
)

MIXTRAL_FAMILY = bf.TextFamily(TEXT_DOMAINS, MIXTRAL_VARIANTS, seed=SEED)
SWITCH_FAMILY = bf.Seq2SeqFamily(SEQ2SEQ_TASKS, BASE_TASKS, SWITCH_VARIANTS, vocabulary=WORDS, seed=SEED)

FULL = replace(bf.FULL, base_steps=800, variant_steps=250)
"""The first family's sizes with a shorter Mixtral base run and longer default fine-tunes."""
SMALL = bf.SMALL


def build(out: str | Path, small: bool = False, force: bool = False, log=print, size=None):
    """Build (or reuse) the second family under `out` (build_family.build with this family's data)."""
    return bf.build(
        out, force=force, size=size or (SMALL if small else FULL), log=log, text=MIXTRAL_FAMILY, seq2seq=SWITCH_FAMILY
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory to build the family in")
    parser.add_argument("--force", action="store_true", help="rebuild every model even if it exists")
    parser.add_argument("--small", action="store_true", help="a smaller, faster family (what the tests build)")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    bf.print_report(build(args.out, small=args.small, force=args.force))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
