"""calibration.capture runs its data by a token budget: until every slot is full, the data
ends, or max_run_tokens tokens have run (not a fixed number of chunks)."""

from __future__ import annotations

import pytest

from moeconsol.analysis.calibration import DEFAULT_RUN_TOKENS, capture
from moeconsol.io.checkpoint import open_checkpoint
from moeconsol.testing import SAMPLE_TEXT, save_model, tiny_mixtral, tiny_tokenizer


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("cal")
    save_model(tiny_mixtral(seed=3), root / "m", tiny_tokenizer())
    (root / "text.txt").write_text(SAMPLE_TEXT * 20)
    return open_checkpoint(str(root / "m")), str(root / "text.txt")


def counts(acts) -> dict:
    return {layer: [(s.count, s.kept, round(s.mass, 6)) for s in slots] for layer, slots in acts.slots.items()}


def test_a_token_budget_runs_exactly_the_chunks_it_allows(model):
    ckpt, text = model
    chunk = 16
    by_budget = capture(ckpt, text, max_tokens=10**6, chunk_len=chunk, max_run_tokens=3 * chunk)
    by_count = capture(ckpt, text, max_tokens=10**6, chunk_len=chunk, max_chunks=3, max_run_tokens=10**9)
    assert by_budget.tokens == by_count.tokens == 3 * chunk
    assert counts(by_budget) == counts(by_count)


def test_capture_stops_once_every_slot_is_full(model):
    ckpt, text = model
    chunk = 16
    early = capture(ckpt, text, max_tokens=1, chunk_len=chunk, max_run_tokens=10**9)
    k = early.tokens // chunk
    assert early.tokens == k * chunk and all(s.kept == 1 for slots in early.slots.values() for s in slots)

    def reached_all(n_chunks: int) -> bool:  # every slot routed a token within the first n chunks
        acts = capture(ckpt, text, max_tokens=10**6, chunk_len=chunk, max_chunks=n_chunks, max_run_tokens=10**9)
        return all(s.count >= 1 for slots in acts.slots.values() for s in slots)

    assert reached_all(k) and (k == 1 or not reached_all(k - 1))
    whole = capture(ckpt, text, max_tokens=10**6, chunk_len=chunk, max_run_tokens=DEFAULT_RUN_TOKENS)
    assert whole.tokens > early.tokens  # with room left in the slots, the data runs on
