"""quality.py against independent computations on tiny real models."""

from __future__ import annotations

import math

import pytest
import torch

from moeconsol.errors import MoeconsolError
from moeconsol.quality.metrics import (
    chunk_spans,
    perplexity,
    retained_gain,
    seq2seq_accuracy,
)
from moeconsol.testing import SAMPLE_TEXT, tiny_mixtral, tiny_switch, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def mixtral():
    return tiny_mixtral(seed=1)


@pytest.fixture(scope="module")
def switch():
    return tiny_switch(seed=2)


# ---------------------------------------------------------------- perplexity


def manual_nonoverlapping_nll(model, ids: list[int], chunk_len: int) -> tuple[float, int]:
    """Chunk by slicing, score every position but the first with log_softmax, in float64."""
    nll, n = 0.0, 0
    for start in range(0, len(ids), chunk_len):
        chunk = ids[start : start + chunk_len]
        if len(chunk) < 2:
            continue
        with torch.no_grad():
            logits = model(torch.tensor([chunk])).logits[0].double()
        for t in range(1, len(chunk)):
            nll -= torch.log_softmax(logits[t - 1], dim=-1)[chunk[t]].item()
            n += 1
    return nll, n


@pytest.mark.parametrize("chunk_len", [32, None])
def test_perplexity_matches_manual_loop(mixtral, tok, chunk_len):
    ids = tok(SAMPLE_TEXT)["input_ids"]
    # None: one full chunk and a 1-token remainder, which must be dropped
    chunk_len = chunk_len or len(ids) - 1
    nll, n = manual_nonoverlapping_nll(mixtral, ids, chunk_len)
    r = perplexity(mixtral, tok, SAMPLE_TEXT, chunk_len=chunk_len)
    assert r.text_tokens == len(ids)
    assert r.tokens == n
    assert r.nll == pytest.approx(nll, rel=1e-6)
    assert r.perplexity == pytest.approx(math.exp(nll / n), rel=1e-6)
    assert r.mean_nll == pytest.approx(nll / n, rel=1e-6)


def test_perplexity_token_counts_by_hand(mixtral, tok):
    ids = tok(SAMPLE_TEXT)["input_ids"]
    t = len(ids)
    # chunks of 32: ceil(t/32) chunks, each loses its first token
    assert perplexity(mixtral, tok, SAMPLE_TEXT, chunk_len=32).tokens == t - math.ceil(t / 32)
    # one chunk of t-1 tokens, remainder of 1 token dropped: t-2 scored tokens
    r = perplexity(mixtral, tok, SAMPLE_TEXT, chunk_len=t - 1)
    assert (r.chunks, r.tokens) == (1, t - 2)


def test_perplexity_with_stride_scores_each_token_once_with_its_window(mixtral, tok):
    text = SAMPLE_TEXT[:120]
    ids = tok(text)["input_ids"]
    L, s = 16, 5
    nll = 0.0
    for p in range(1, len(ids)):
        # the first window [k*s, k*s+L) that holds p at a non-first position
        k = next(k for k in range(len(ids)) if k * s < p < k * s + L)
        context = ids[k * s : p]  # the last logit of the context predicts ids[p]
        with torch.no_grad():
            logits = mixtral(torch.tensor([context])).logits[0, -1].double()
        nll -= torch.log_softmax(logits, dim=-1)[ids[p]].item()
    r = perplexity(mixtral, tok, text, chunk_len=L, stride=s)
    assert r.tokens == len(ids) - 1
    assert r.nll == pytest.approx(nll, rel=1e-5)
    # stride equal to the chunk length is the default, non-overlapping chunking
    a = perplexity(mixtral, tok, text, chunk_len=L, stride=L)
    b = perplexity(mixtral, tok, text, chunk_len=L)
    assert (a.nll, a.tokens) == (b.nll, b.tokens)


def test_chunk_spans_worked_examples():
    assert chunk_spans(10, 4) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    assert chunk_spans(9, 4) == [(0, 4, 1), (4, 8, 5)]  # 1-token remainder dropped
    assert chunk_spans(10, 4, stride=2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert chunk_spans(1, 4) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"chunk_len": 1}, "`chunk_len` must be at least 2"),
        ({"chunk_len": 8, "stride": 9}, "stride must be between 1"),
    ],
)
def test_perplexity_bad_options(mixtral, tok, kwargs, message):
    with pytest.raises(MoeconsolError, match=message):
        perplexity(mixtral, tok, SAMPLE_TEXT, **kwargs)


def test_perplexity_refuses_short_text_and_encoder_decoder(mixtral, switch, tok):
    with pytest.raises(MoeconsolError, match="perplexity needs at least 2"):
        perplexity(mixtral, tok, "T", chunk_len=8)
    with pytest.raises(MoeconsolError, match="encoder-decoder"):
        perplexity(switch, tok, SAMPLE_TEXT)


# ---------------------------------------------------------------- accuracy


def manual_greedy_seq2seq(model, tok, text: str, n: int) -> str:
    """Greedy decoding by recomputing the whole decoder prefix each step (no cache)."""
    enc = torch.tensor([tok(text)["input_ids"]])
    dec = [model.config.decoder_start_token_id]
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=enc, decoder_input_ids=torch.tensor([dec])).logits[0, -1].argmax())
            dec.append(nxt)
            if nxt == model.config.eos_token_id:
                break
    return tok.decode(dec[1:], skip_special_tokens=True).strip()


def manual_token_hits_seq2seq(model, tok, text: str, target: str) -> tuple[int, int]:
    """Per target position j, one forward pass on [start] + target[:j]; is argmax target[j]?"""
    enc = torch.tensor([tok(text)["input_ids"]])
    tgt = tok(target)["input_ids"]
    hits = 0
    with torch.no_grad():
        for j in range(len(tgt)):
            dec = torch.tensor([[model.config.decoder_start_token_id] + tgt[:j]])
            hits += int(model(input_ids=enc, decoder_input_ids=dec).logits[0, -1].argmax()) == tgt[j]
    return hits, len(tgt)


INPUTS = ["The quick brown fox", "def add(a, b):", "Once upon a time", "Experts are small", "0123456789 + -"]


def test_seq2seq_accuracy_matches_hand_computation(switch, tok):
    # targets: the model's own greedy output for some examples (exact match), wrong ones for others
    greedy = [manual_greedy_seq2seq(switch, tok, text, 6) for text in INPUTS]
    examples = [
        {"input": t, "target": g if i % 2 == 0 else g + " router"} for i, (t, g) in enumerate(zip(INPUTS, greedy))
    ]
    exact = sum(g == e["target"].strip() for g, e in zip(greedy, examples))
    hits = [manual_token_hits_seq2seq(switch, tok, e["input"], e["target"]) for e in examples]
    correct, total = sum(h for h, _ in hits), sum(n for _, n in hits)
    assert exact == 3 and total > 0

    r = seq2seq_accuracy(switch, tok, examples, max_new_tokens=6)
    assert (r.examples, r.exact, r.correct_tokens, r.target_tokens) == (5, exact, correct, total)
    assert r.exact_match == pytest.approx(exact / 5)
    assert r.token_accuracy == pytest.approx(correct / total)
    assert r.predictions == greedy
    assert "predictions" not in r.to_dict() and len(r.to_dict(predictions=True)["predictions"]) == 5

    # without generation: the same token accuracy, and no exact match to report
    fast = seq2seq_accuracy(switch, tok, examples, max_new_tokens=6, exact_match=False)
    assert (fast.correct_tokens, fast.target_tokens, fast.token_accuracy) == (correct, total, r.token_accuracy)
    assert math.isnan(fast.exact_match) and fast.predictions == [] and fast.exact == 0


def test_causal_accuracy_matches_hand_computation(mixtral, tok):
    prompt = tok("Once upon a time")["input_ids"]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(4):
            seq.append(int(mixtral(torch.tensor([seq])).logits[0, -1].argmax()))
    own = tok.decode(seq[len(prompt) :], skip_special_tokens=True).strip()
    wrong = "jumps over"
    examples = [{"input": "Once upon a time", "target": own}, {"input": "Once upon a time", "target": wrong}]
    correct = total = 0
    for e in examples:
        tgt = tok(e["target"], add_special_tokens=False)["input_ids"]
        for j in range(len(tgt)):
            with torch.no_grad():
                logits = mixtral(torch.tensor([prompt + tgt[:j]])).logits[0, -1]
            correct += int(logits.argmax()) == tgt[j]
        total += len(tgt)
    r = seq2seq_accuracy(mixtral, tok, examples, max_new_tokens=4)
    assert (r.exact, r.correct_tokens, r.target_tokens) == (1 + (own == wrong), correct, total)
    assert r.predictions == [own, own]


def test_accuracy_bad_input(switch, tok):
    with pytest.raises(MoeconsolError, match="no examples"):
        seq2seq_accuracy(switch, tok, [])
    with pytest.raises(MoeconsolError, match="max new tokens"):
        seq2seq_accuracy(switch, tok, [{"input": "a", "target": "b"}], max_new_tokens=0)


# ---------------------------------------------------------------- retained gain


def test_retained_gain():
    assert retained_gain(10.0, 7.0, 6.0) == pytest.approx(0.75)  # perplexity: (10-7)/(10-6)
    assert retained_gain(0.4, 0.55, 0.6, lower_is_better=False) == pytest.approx(0.75)  # (0.55-0.4)/(0.6-0.4)
    assert retained_gain(10.0, 10.0, 6.0) == 0.0
    assert retained_gain(10.0, 5.0, 6.0) == pytest.approx(1.25)
    assert retained_gain(0.4, 0.3, 0.6, lower_is_better=False) == pytest.approx(-0.5)
    assert math.isnan(retained_gain(5.0, 4.0, 5.0))
    assert math.isnan(retained_gain(0.5, 0.5, 0.5, lower_is_better=False))
    assert math.isnan(retained_gain(5.0, float("nan"), 4.0))
