"""The generation engine: continuous batching over the runtime's model.

Expected tokens come from transformers' own `generate` on the original models, one prompt
at a time: an independent path from the engine's batches, padding and caches.
"""

from __future__ import annotations

import pytest
import torch

from moeconsol.errors import MoeconsolError, SettingsError
from moeconsol.serving import engine as engine_module
from moeconsol.serving.engine import (
    MIN_TEMPERATURE,
    Engine,
    FinishReason,
    GenerationSettings,
    Request,
    check_settings,
    penalize,
    sample,
)
from moeconsol.serving.runtime import Runtime
from moeconsol.serving.variants import Family
from moeconsol.testing import derive_variant, tiny_mixtral, tiny_switch, tiny_tokenizer

PROMPTS = [
    "The quick brown fox",
    "Once upon a time there was a model",
    "def add(a, b):",
    "0123",
    "Experts are small feed-forward networks",
]


@pytest.fixture(scope="module", params=["mixtral", "switch"])
def family(request):
    tok = tiny_tokenizer()
    base = tiny_mixtral(0) if request.param == "mixtral" else tiny_switch(0)
    models = {"base": base, "ft": derive_variant(base, 1, changed_experts=[(0, 1), (1, 2)], scale=0.5)}
    rt = Runtime(Family.from_models(models, {n: tok for n in models}))
    return request.param, models, rt, tok


def alone(model, ids: list[int], n: int, **generate) -> list[int]:
    x = torch.tensor([ids])
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, **generate)
    return out[0, 1:].tolist() if model.config.is_encoder_decoder else out[0, len(ids) :].tolist()


def run(engine: Engine, requests: list[Request], join_every: int = 1) -> None:
    """Admit one request every `join_every` steps (so they join a running batch), step to the end."""
    waiting = list(requests)
    steps = 0
    while waiting or engine.running():
        if waiting and steps % join_every == 0:
            engine.admit(waiting.pop(0))
        engine.step()
        steps += 1


def test_batched_greedy_equals_transformers_alone(family):
    arch, models, rt, tok = family
    for name in ("ft", "base"):
        rt.activate(name)
        engine = Engine(rt, max_batch_size=8)
        requests = [
            Request(name, tok(p)["input_ids"], GenerationSettings(max_new_tokens=6 + 2 * i))
            for i, p in enumerate(PROMPTS)
        ]
        run(engine, requests, join_every=2)  # requests join and leave a running batch
        for r in requests:
            assert r.token_ids == alone(models[name], r.prompt_ids, r.settings.max_new_tokens), (name, r.prompt_ids)
            assert r.finish in (FinishReason.STOP, FinishReason.LENGTH)
            assert r.text == tok.decode(r.token_ids, skip_special_tokens=True)
    assert engine.running() == 0 and not engine.batches


def test_a_parked_batch_continues_after_its_variant_comes_back(family):
    arch, models, rt, tok = family
    rt.activate("base")
    engine = Engine(rt)
    ids = [tok(p)["input_ids"] for p in PROMPTS[:3]]
    parked = [Request("base", i, GenerationSettings(max_new_tokens=8)) for i in ids[:2]]
    for r in parked:
        engine.admit(r)
    engine.step()
    rt.activate("ft")  # base's batch is parked with its cache
    other = Request("ft", ids[2], GenerationSettings(max_new_tokens=8))
    engine.admit(other)
    while engine.running("ft"):
        engine.step()
    assert engine.running("base") == 2
    rt.activate("base")
    while engine.running():
        engine.step()
    assert other.token_ids == alone(models["ft"], ids[2], 8)
    for r in parked:
        assert r.token_ids == alone(models["base"], r.prompt_ids, 8)


def test_seeded_sampling_gives_the_same_text_batched_or_alone(family):
    arch, models, rt, tok = family
    rt.activate("ft")
    settings = [
        GenerationSettings(max_new_tokens=10, temperature=t, top_p=p, seed=s)
        for t, p, s in [(1.0, 1.0, 1), (1.5, 0.9, 2), (0.7, 0.5, 3), (1.2, 1.0, 2**63 - 1)]
    ]
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:4]]

    def one(ids, s):
        engine = Engine(rt, max_batch_size=1)
        r = Request("ft", ids, s)
        run(engine, [r])
        return r.token_ids

    alone_ids = [one(ids, s) for ids, s in zip(prompts, settings)]
    engine = Engine(rt)
    batched = [Request("ft", ids, s) for ids, s in zip(prompts, settings)]
    run(engine, batched)
    assert [r.token_ids for r in batched] == alone_ids
    # a greedy request in the same batch is unaffected by its neighbours' sampling
    assert len({tuple(t) for t in alone_ids}) > 1


def test_sample_follows_temperature_and_top_p():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    assert sample(logits, GenerationSettings(temperature=0), None) == 0
    g = torch.Generator().manual_seed(0)
    # top_p 0.5: only the most likely token (probability 0.57 at temperature 1) can be drawn
    assert {sample(logits, GenerationSettings(temperature=1.0, top_p=0.5), g) for _ in range(50)} == {0}
    draws = [sample(logits, GenerationSettings(temperature=1.0), g) for _ in range(4000)]
    freq = torch.bincount(torch.tensor(draws), minlength=4).float() / len(draws)
    torch.testing.assert_close(freq, torch.softmax(logits, -1), atol=0.03, rtol=0)


def test_sample_keeps_only_the_top_k():
    logits = torch.tensor([2.0, 1.0, 1.5, -1.0, 0.0])
    g = torch.Generator().manual_seed(0)
    draws = [sample(logits, GenerationSettings(temperature=1.0, top_k=2), g) for _ in range(4000)]
    freq = torch.bincount(torch.tensor(draws), minlength=5).float() / len(draws)
    top2 = torch.softmax(torch.tensor([2.0, 1.5]), -1)  # the two largest logits, renormalized
    torch.testing.assert_close(freq, torch.tensor([top2[0], 0, top2[1], 0, 0]), atol=0.03, rtol=0)
    assert {sample(logits, GenerationSettings(temperature=5.0, top_k=1), g) for _ in range(50)} == {0}
    # top_k 0 = every token
    assert len({sample(logits, GenerationSettings(temperature=5.0, top_k=0), g) for _ in range(400)}) == 5


def test_sampling_keeps_a_distribution_at_extreme_settings():
    """A temperature or top_p that is 0 in float32 still leaves a token to draw: top_p keeps the
    top token, a temperature below MIN_TEMPERATURE samples at MIN_TEMPERATURE."""
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    g = torch.Generator().manual_seed(0)
    for extreme in (
        GenerationSettings(temperature=1e-300),
        GenerationSettings(temperature=5e-324, top_k=2),
        GenerationSettings(temperature=1.0, top_p=1e-46),
        GenerationSettings(temperature=2.0, top_p=float.fromhex("0x1p-149") / 2),
    ):
        assert {sample(logits, extreme, g) for _ in range(20)} == {0}, extreme
    close = torch.tensor([0.0, 0.01])  # at the floor: probabilities 0.27 and 0.73
    low, floor = (torch.Generator().manual_seed(1) for _ in range(2))
    below = [sample(close, GenerationSettings(temperature=1e-9), low) for _ in range(100)]
    assert below == [sample(close, GenerationSettings(temperature=MIN_TEMPERATURE), floor) for _ in range(100)]
    assert 15 < below.count(0) < 45


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_scores_that_are_not_finite_are_refused_not_drawn_from(temperature):
    with pytest.raises(RuntimeError, match="not finite"):
        sample(torch.tensor([1.0, float("nan"), 0.5]), GenerationSettings(temperature=temperature), None)


def test_a_request_whose_sampling_fails_fails_alone(family, monkeypatch):
    """Requests admitted together, one failing at its first token and one at its fourth: each
    leaves with its error; the others, extreme settings included, answer as alone."""
    arch, models, rt, tok = family
    rt.activate("base")
    calls: dict[int, int] = {}

    def failing(logits, settings, generator):
        calls[settings.seed] = calls.get(settings.seed, 0) + 1
        if settings.seed == 13 or (settings.seed == 14 and calls[14] == 4):
            raise RuntimeError(f"sampling failed for seed {settings.seed}")
        return sample(logits, settings, generator)

    monkeypatch.setattr(engine_module, "sample", failing)
    ids = [tok(p)["input_ids"] for p in PROMPTS[:4]]
    doomed = [Request("base", i, GenerationSettings(8, temperature=1.0, seed=s)) for i, s in zip(ids, (13, 14))]
    greedy = Request("base", ids[2], GenerationSettings(8))
    top_only = Request("base", ids[3], GenerationSettings(8, temperature=1.0, top_p=1e-46, seed=1))
    cold = Request("base", ids[0], GenerationSettings(8, temperature=1e-300, seed=2))
    engine = Engine(rt)
    assert engine.admit_all([*doomed, greedy, top_only, cold]) == [doomed[0]]
    while engine.running():
        engine.step()
    assert [str(r.error) for r in doomed] == ["sampling failed for seed 13", "sampling failed for seed 14"]
    assert len(doomed[1].token_ids) == 3 and doomed[1].finish is None
    for r in (greedy, top_only):  # top_p 1e-46: only the most likely token, greedy
        assert r.token_ids == alone(models["base"], r.prompt_ids, 8) and r.error is None
    assert cold.error is None and cold.finish in (FinishReason.STOP, FinishReason.LENGTH)


def test_penalize_follows_transformers_rule():
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0])
    out = penalize(logits, [0, 1, 1], 2.0)  # a repeated token is penalized once
    assert out.tolist() == [1.0, -2.0, 0.5, -3.0]
    assert penalize(logits, [0], 1.0).tolist() == logits.tolist()


@pytest.mark.parametrize(
    "bad",
    [
        GenerationSettings(top_k=-1),
        GenerationSettings(top_k=True),
        GenerationSettings(repetition_penalty=0.0),
        GenerationSettings(repetition_penalty=float("nan")),
        GenerationSettings(repetition_penalty=1e-40),  # penalized scores overflow float32
        GenerationSettings(repetition_penalty=101.0),
    ],
)
def test_bad_top_k_and_penalty_are_refused(bad):
    with pytest.raises(SettingsError, match="top_k|repetition_penalty"):
        check_settings(bad)


def test_repetition_penalty_equals_transformers_generate(family):
    """Greedy with a repetition penalty, batched, equals transformers' generate alone; a penalty
    in the variant's generation config applies when the request leaves it unset."""
    arch, models, rt, tok = family
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:3]]
    rt.activate("ft")
    engine = Engine(rt)
    requests = [Request("ft", ids, GenerationSettings(max_new_tokens=10, repetition_penalty=1.8)) for ids in prompts]
    run(engine, requests)
    expected = [alone(models["ft"], ids, 10, repetition_penalty=1.8) for ids in prompts]
    assert [r.token_ids for r in requests] == expected
    assert expected != [alone(models["ft"], ids, 10) for ids in prompts]  # the penalty changed something
    variant = rt.family.variants["base"]
    variant.generation_config.repetition_penalty = 1.8
    try:
        rt.activate("base")
        defaulted = Request("base", prompts[0], GenerationSettings(max_new_tokens=10))
        off = Request("base", prompts[0], GenerationSettings(max_new_tokens=10, repetition_penalty=1.0))
        run(Engine(rt), [defaulted, off])
        assert defaulted.token_ids == alone(models["base"], prompts[0], 10, repetition_penalty=1.8)
        assert off.token_ids == alone(models["base"], prompts[0], 10, repetition_penalty=1.0)
    finally:
        variant.generation_config.repetition_penalty = None
        rt.activate("ft")


def test_cancel_frees_the_slot_within_one_step(family):
    arch, models, rt, tok = family
    rt.activate("base")
    engine = Engine(rt)
    ids = tok(PROMPTS[0])["input_ids"]
    keep = Request("base", ids, GenerationSettings(max_new_tokens=8))
    gone = Request("base", ids, GenerationSettings(max_new_tokens=200))
    engine.admit(keep)
    engine.admit(gone)
    engine.step()
    gone.cancel()  # the client goes away (from the HTTP thread, between two steps)
    produced = len(gone.token_ids)
    finished = engine.step()
    assert gone in finished and gone.finish is FinishReason.CANCELLED
    assert len(gone.token_ids) == produced and engine.running() == 1  # no token after the cancel
    while engine.running():
        engine.step()
    assert keep.token_ids == alone(models["base"], ids, 8)


def test_stop_strings_end_the_text_before_them(family):
    arch, models, rt, tok = family
    rt.activate("base")
    texts = {p: tok.decode(alone(models["base"], tok(p)["input_ids"], 12), skip_special_tokens=True) for p in PROMPTS}
    prompt = next(p for p, t in texts.items() if len(t) >= 6)
    ids, full = tok(prompt)["input_ids"], texts[prompt]
    stop = full[3:5]
    pieces: list[str] = []
    r = Request("base", ids, GenerationSettings(max_new_tokens=12, stop=(stop,)), on_text=pieces.append)
    run(Engine(rt), [r])
    assert r.text == full[: full.index(stop)] and r.finish is FinishReason.STOP
    assert "".join(pieces) == r.text


def test_bad_requests_are_refused(family):
    arch, models, rt, tok = family
    rt.activate("base")
    engine = Engine(rt)
    with pytest.raises(MoeconsolError, match="empty"):
        engine.admit(Request("base", [], GenerationSettings()))
    with pytest.raises(MoeconsolError, match="temperature"):
        engine.admit(Request("base", [5], GenerationSettings(temperature=float("nan"))))
    with pytest.raises(MoeconsolError, match="seed"):
        engine.admit(Request("base", [5], GenerationSettings(temperature=1.0, seed=2**63)))
    with pytest.raises(MoeconsolError, match="while 'base' is active"):
        engine.admit(Request("ft", [5], GenerationSettings()))
    with pytest.raises(MoeconsolError, match="max batch size"):
        Engine(rt, max_batch_size=0)
    assert engine.running() == 0


def test_requests_prefilled_together_equal_transformers_alone(family):
    """admit_all: prompts of different lengths prefilled in one left-padded forward, then
    joined by more requests prefilled together while the batch runs."""
    arch, models, rt, tok = family
    rt.activate("ft")
    engine = Engine(rt)
    first = [Request("ft", tok(p)["input_ids"], GenerationSettings(max_new_tokens=9)) for p in PROMPTS[:3]]
    later = [
        Request("ft", tok(p)["input_ids"], GenerationSettings(max_new_tokens=1 + 4 * i))
        for i, p in enumerate(PROMPTS[2:])
    ]
    assert engine.admit_all(first) == []
    engine.step()
    done = engine.admit_all(later)
    assert done == [later[0]]  # max_new_tokens 1: finished at its prefill
    while engine.running():
        engine.step()
    for r in first + later:
        assert r.token_ids == alone(models["ft"], r.prompt_ids, r.settings.max_new_tokens), r.prompt_ids
