"""An error that names an option names it as the user types it (`--force`, `--shard-size`);
from Python the same message names the parameter (`force`), never a flag."""

from __future__ import annotations

import pytest
from cli_helpers import one_error_line, run_main

from moeconsol import testing as T
from moeconsol.errors import OutputError
from moeconsol.io.writer import check_destination


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("names")
    tok = T.tiny_tokenizer()
    base = T.tiny_mixtral(seed=3)
    T.save_model(base, root / "base", tok)
    T.save_model(T.derive_variant(base, 4, [(0, 2)]), root / "ft", tok)
    (root / "text.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 20)
    assert run_main("merge", f"base={root / 'base'}", f"ft={root / 'ft'}", "-o", root / "art").returncode == 0
    return root


MERGE_CASES = [
    ([], ["already exists", "replace it with --force"]),
    (
        ["--force", "--mode", "threshold", "--budget", "0.5"],
        ["--budget applies to --mode budget, calibrated and reference"],
    ),
    (
        ["--force", "--mode", "budget", "--budget", "0.5", "--threshold", "0.9"],
        ["--threshold applies to --mode threshold"],
    ),
    (["--force", "--metric", "l2"], ["--metric applies to --mode threshold, budget and calibrated only, not lossless"]),
    (["--force", "--base", "x"], ["--base applies to --mode task-arithmetic, ties and calibrated only, not lossless"]),
    (["--force", "--mode", "threshold"], ["--mode threshold needs a --threshold", "--metric cosine"]),
    (["--force", "--mode", "ties"], ["--mode ties needs a --base"]),
    (["--force", "--mode", "reference"], ["--mode reference needs a --budget"]),
    (["--force", "--mode", "budget"], ["--mode budget needs a --budget"]),
    (["--force", "--mode", "budget", "--budget", "0.01"], ["--budget too small"]),
    (["--force", "--representative", "best"], ["--representative best needs --mode calibrated"]),
    (["--force", "--representative", "median"], ["unknown --representative 'median'"]),
    (["--force", "--deltas"], ["--deltas apply to --mode calibrated only"]),
    (["--force", "--delta-format", "sign"], ["--delta-format sign needs --deltas"]),
    (["--force", "--non-expert-codec", "gzip"], ["unknown --non-expert-codec 'gzip'"]),
    (["--force", "--mode", "nope"], ["unknown --mode 'nope'"]),
    (["--force", "--mode", "ties", "--base", "B", "--density", "2"], ["--density must be in (0, 1]"]),
    (["--force", "--mode", "ties", "--base", "B", "--scale", "nan"], ["--scale must be a finite number"]),
    (["--force", "--mode", "calibrated", "--budget", "0.5"], ["give --calibration base=FILE"]),
    (
        ["--force", "--mode", "calibrated", "--budget", "0.5", "--calibration", "T", "--calibration", "nobody=T"],
        ["--calibration names unknown"],
    ),
    (
        ["--force", "--mode", "calibrated", "--budget", "0.5", "--calibration", "T", "--calibration-tokens", "0"],
        ["--calibration-tokens must be at least 1"],
    ),
]


@pytest.mark.parametrize("args, fragments", MERGE_CASES)
def test_merge_errors_name_options_as_typed(family, args, fragments):
    text = str(family / "text.txt")
    args = [str(family / "base") if a == "B" else text if a == "T" else a.replace("=T", f"={text}") for a in args]
    r = run_main("merge", f"base={family / 'base'}", f"ft={family / 'ft'}", "-o", family / "art", *args)
    one_error_line(r, *fragments)
    assert "`" not in r.stderr


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["serve-local", "ART", "--prompt", "hi", "--top-p", "0"], ["--top-p must be in (0, 1]"]),
        (["serve-local", "ART", "--prompt", "hi", "--temperature", "-1"], ["--temperature must be"]),
        (["serve-local", "ART", "--prompt", "hi", "--max-new-tokens", "0"], ["--max-new-tokens must be"]),
        (["serve-local", "ART", "--prompt", "hi", "--top-k", "-1"], ["--top-k must be"]),
        (["serve-local", "ART", "--prompt", "hi", "--device", "tpu"], ["unknown --device 'tpu'"]),
        (["serve-local", "ART", "--prompt", "hi", "--dtype", "int3"], ["unknown --dtype 'int3'"]),
        (["export", "ART", "ft", "-o", "ART"], ["ART"]),
        (["eval", "ART", "--data", "base=T", "--variant", "ft"], ["no data for variant 'ft': give --data ft=FILE"]),
        (["eval", "ART", "--data", "base=T", "--chunk-len", "1"], ["--chunk-len must be at least 2"]),
        (["analyze", "BASE", "FT", "--probes", "1", "-m", "cka"], ["--probes must be at least 2"]),
        (["analyze", "BASE", "FT", "-m", "euclid"], ["unknown --metric 'euclid'"]),
    ],
)
def test_other_commands_name_options_as_typed(family, args, fragments):
    paths = {"ART": family / "art", "T": family / "text.txt", "BASE": family / "base", "FT": family / "ft"}
    args = [str(paths[a]) if a in paths else a.replace("=T", f"={paths['T']}") for a in args]
    fragments = [str(paths["ART"]) if f == "ART" else f for f in fragments]
    r = run_main(*args)
    one_error_line(r, *fragments)
    assert "`" not in r.stderr


def test_from_python_the_message_names_the_parameter(family):
    with pytest.raises(OutputError) as e:
        check_destination(family / "art", force=False, inputs=[])
    assert "replace it with `force`" in str(e.value) and "--" not in str(e.value)
