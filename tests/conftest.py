"""Session-wide test settings."""

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The tests run tiny models: threads gain nothing there, and lose a lot when other work
    shares the CPUs (spin-waiting for cores that are busy)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def small_family(tmp_path_factory):
    """base (sharded) and ft (one file) tiny Mixtrals, and their lossless artifact `art`:
    the inputs that tests of bad input tamper with (copies, never these)."""
    from moeconsol.consolidate.pipeline import merge
    from moeconsol.io.checkpoint import open_checkpoints
    from moeconsol.testing import derive_variant, save_model, tiny_mixtral, tiny_tokenizer

    root = tmp_path_factory.mktemp("small_family")
    tok = tiny_tokenizer()
    base = tiny_mixtral(seed=3)
    save_model(base, root / "base", tok, max_shard_size="100KB")
    save_model(derive_variant(base, 4, [(0, 2)]), root / "ft", tok)
    merge(open_checkpoints([f"base={root / 'base'}", f"ft={root / 'ft'}"]), root / "art")
    return root
