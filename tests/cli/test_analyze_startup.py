"""What `moeconsol analyze` imports, and that a fresh interpreter (torch imported on another
thread while the first layers are hashed) gives exactly the in-process results."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import typer
from cli_helpers import cli, imported_after, one_error_line

from moeconsol import testing as T
from moeconsol.analysis.similarity import layer_similarity
from moeconsol.cli import COMMANDS, app, load_commands
from moeconsol.io.checkpoint import open_checkpoints
from moeconsol.io.safetensors_file import ITEMSIZE, dtype_names, torch_dtypes


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("startup")
    base = T.tiny_mixtral(seed=3)
    return {
        "base": T.save_model(base, root / "base"),
        "code": T.save_model(T.derive_variant(base, 1, [(0, 1), (1, 3)]), root / "code", fused=True),
        "math": T.save_model(T.derive_variant(base, 2, [(0, 2)]), root / "math"),
    }


def test_help_and_bad_input_import_nothing_heavy(tmp_path):
    code, heavy, _ = imported_after(["analyze", "--help"])
    assert code == 0 and heavy == []
    code, heavy, err = imported_after(["analyze", str(tmp_path / "absent"), str(tmp_path / "other")])
    assert code == 2 and heavy == []
    one_error_line(err, "no such directory")


def test_a_fresh_interpreter_gives_the_in_process_results(family):
    """The subprocess imports torch while it hashes (`similarity._identity_ahead`); this
    process has torch already and hashes layer by layer: the same matrices, bit for bit."""
    args = [str(family["base"]), f"code={family['code']}", f"math={family['math']}"]
    proc = cli(
        "analyze", *args, "-m", "cosine,l2,relative-l2", "--json", "-", env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    ckpts = open_checkpoints(args)
    for li, layer in enumerate(ckpts[0].moe_layers):
        expected = layer_similarity(ckpts, layer, ["cosine", "l2", "relative-l2"])
        for metric in ("cosine", "l2", "relative-l2"):
            assert np.array_equal(
                np.array(doc["metrics"][metric]["layers"][li]["matrix"]), expected.matrices[metric]
            ), (layer, metric)
    pairs = {d["layer"]: d["pairs"] for d in doc["identical"]}
    # code changed expert 1 of layer 0 and expert 3 of layer 1, math expert 2 of layer 0
    assert (
        [0, 4] in pairs["model.layers.0"]
        and [1, 5] not in pairs["model.layers.0"]
        and [2, 10] not in pairs["model.layers.0"]
    )
    assert [3, 7] not in pairs["model.layers.1"] and [3, 11] in pairs["model.layers.1"]


def test_commands_table_matches_the_registered_commands():
    load_commands()
    assert set(COMMANDS) == set(typer.main.get_command(app).commands)


def test_itemsize_table_matches_torch():
    assert set(ITEMSIZE) == set(torch_dtypes())
    for name, dtype in torch_dtypes().items():
        assert ITEMSIZE[name] == torch.empty((), dtype=dtype).element_size(), name
        assert dtype_names()[dtype] == name
