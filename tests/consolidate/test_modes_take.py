"""Which settings each merge mode takes: `settings.APPLIES_TO` is what the planners refuse,
and what their messages say."""

from __future__ import annotations

import pytest

from moeconsol import testing as T
from moeconsol.consolidate.modes import Mode
from moeconsol.consolidate.planners import planner_for
from moeconsol.consolidate.settings import APPLIES_TO, MergeSettings
from moeconsol.errors import SettingsError
from moeconsol.io.checkpoint import open_checkpoints

VALUES = {
    "metric": "cosine",
    "threshold": 0.5,
    "budget": "0.5",
    "base": "x",
    "calibration": {"*": "f.txt"},
    "holdout": 0.2,
    "check_margin": 0.1,
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("modes")
    base = T.tiny_mixtral(seed=3)
    T.save_model(base, root / "base")
    T.save_model(T.derive_variant(base, 4, [(0, 2)]), root / "ft")
    return open_checkpoints([str(root / "base"), str(root / "ft")])


@pytest.mark.parametrize("option", list(APPLIES_TO))
@pytest.mark.parametrize("mode", list(Mode))
def test_a_mode_refuses_exactly_the_settings_it_does_not_take(ckpts, mode, option):
    try:
        planner_for(mode).check(MergeSettings(mode=mode, **{option: VALUES[option]}), ckpts)
        refused = None
    except SettingsError as e:
        refused = str(e)
    takes = mode in APPLIES_TO[option]
    if takes:
        assert refused is None or "applies to" not in refused, refused
    else:
        assert refused is not None and refused.startswith(f"`{option}` applies to `mode` "), refused
        assert refused.endswith(f" only, not {mode.value}") and all(m.value in refused for m in APPLIES_TO[option])
