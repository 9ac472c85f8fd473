"""The server with cross-variant batching: requests of every variant in one decode step, for a
decoder-only family (Mixtral) and an encoder-decoder (Switch Transformers).

Expected completions come from transformers' own models loaded from the original
checkpoints (greedy), not from the runtime under test.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from builders import greedy, samples, served_family
from cli_helpers import cli
from fastapi.testclient import TestClient

from moeconsol.serving.crossvariant import ServingMode
from moeconsol.serving.engine import GenerationSettings
from moeconsol.serving.runtime import Runtime
from moeconsol.serving.scheduler import Job, Scheduler
from moeconsol.serving.server import create_app
from moeconsol.testing import tiny_switch

PROMPTS = [
    "Once upon a time",
    "The quick brown fox jumps",
    "def add(a, b):",
    "0123456789 + -",
    "Experts are small",
    "a router",
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    return served_family(tmp_path_factory.mktemp("serve-xv"), mode=ServingMode.CROSS_VARIANT)


def _serve(scheduler: Scheduler, jobs: list[Job], timeout: float = 120):
    futures = [scheduler.submit(j) for j in jobs]
    scheduler.start()  # the queue is full before the worker looks at it
    try:
        return [f.result(timeout=timeout) for f in futures]
    finally:
        scheduler.stop()


def test_requests_of_every_variant_run_in_one_batch_without_swaps(served):
    out, runtime, refs, tok = served
    runtime.activate("base")
    jobs = [
        Job(m, tok(p)["input_ids"], GenerationSettings(3 + 2 * i))
        for i, p in enumerate(PROMPTS)
        for m in ("ft", "base")
    ]
    scheduler = Scheduler(runtime, max_wait=60.0, max_batch_size=8)
    results = _serve(scheduler, jobs)
    assert runtime.swaps == [] and runtime.active == "base"
    assert list(scheduler.served)[:8] == ["ft", "base"] * 4  # admitted in arrival order, whatever the variant
    assert scheduler.engine.peak_batch_size == 8  # --max-batch-size counts the rows of every variant
    for job, r in zip(jobs, results):
        assert r.model == job.model and r.swap.bytes_moved == 0
        assert r.token_ids == greedy(refs[job.model], job.prompt_ids, job.settings.max_new_tokens), job


def test_the_bound_on_tokens_in_flight_counts_every_variant(served):
    out, runtime, refs, tok = served
    ids = tok(PROMPTS[0])["input_ids"]
    per_request = len(ids) + 4
    scheduler = Scheduler(runtime, max_tokens_in_flight=2 * per_request)
    seen: list[tuple[int, int]] = []
    step = scheduler.engine.step

    def watched_step():
        seen.append((scheduler.engine.tokens_in_flight(), scheduler.engine.running()))
        return step()

    scheduler.engine.step = watched_step
    results = _serve(scheduler, [Job(m, ids, GenerationSettings(4)) for m in ["ft", "base"] * 3])
    assert max(t for t, _ in seen) <= 2 * per_request and max(n for _, n in seen) == 2
    for r in results:
        assert r.token_ids == greedy(refs[r.model], ids, 4)


def test_a_cancelled_job_leaves_the_mixed_batch_at_the_next_step(served):
    out, runtime, refs, tok = served
    scheduler = Scheduler(runtime)
    ids = tok(PROMPTS[0])["input_ids"]
    gone = Job("base", ids, GenerationSettings(200))
    gone.on_text = lambda piece: scheduler.cancel(gone)  # the client goes away at its first piece of text
    keep = Job("ft", ids, GenerationSettings(6))
    g, k = _serve(scheduler, [gone, keep])
    assert g.finish_reason == "cancelled" and len(g.token_ids) <= 2 + len(tok.encode(g.text))
    assert k.token_ids == greedy(refs["ft"], ids, 6)
    assert scheduler.engine.running() == 0


def test_metrics_count_the_extra_resident_buffers_and_no_swaps(served):
    out, runtime, refs, tok = served
    swap_mode = Runtime.from_artifact(out).resident_bytes()
    with TestClient(create_app(runtime)) as c:
        for model in ("ft", "base", "ft"):
            r = c.post(
                "/v1/completions", json={"model": model, "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}
            )
            assert r.json()["choices"][0]["text"] == tok.decode(
                greedy(refs[model], tok(PROMPTS[0])["input_ids"], 4), skip_special_tokens=True
            )
        m = samples(c.get("/metrics").text)
    total = m[("moeconsol_resident_bytes", frozenset({("part", "total")}))]
    region = swap_mode.host // 2  # two variants, each its own swap region
    assert total == runtime.resident_bytes().total == swap_mode.total + region
    assert m[("moeconsol_resident_bytes", frozenset({("part", "host")}))] == 0
    assert sum(v for (name, _), v in m.items() if name == "moeconsol_swaps_total") == 0


@pytest.fixture(scope="module")
def switch(tmp_path_factory):
    """Switch Transformers (an encoder-decoder) merged losslessly: (artifact, cross-variant
    runtime, transformers' own models by name, tokenizer)."""
    return served_family(
        tmp_path_factory.mktemp("serve-xv-switch"),
        tiny_switch,
        transformers.SwitchTransformersForConditionalGeneration,
        mode=ServingMode.CROSS_VARIANT,
    )


def _seq2seq_greedy(ref, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    out = ref.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False)
    return out[0, 1:].tolist()  # after the decoder start token


def test_an_encoder_decoder_serves_every_variant_in_one_batch(switch):
    out, runtime, refs, tok = switch
    runtime.activate("base")
    jobs = [
        Job(m, tok(p)["input_ids"], GenerationSettings(3 + 2 * i))
        for i, p in enumerate(PROMPTS[:4])
        for m in ("ft", "base")
    ]
    scheduler = Scheduler(runtime, max_wait=60.0, max_batch_size=8)
    results = _serve(scheduler, jobs)
    assert runtime.swaps == [] and runtime.active == "base"
    assert (
        scheduler.engine.peak_batch_size == 8
    )  # prompts of both variants and four lengths: one encoder pass, one step
    for job, r in zip(jobs, results):
        assert r.model == job.model and r.swap.bytes_moved == 0
        assert r.token_ids == _seq2seq_greedy(refs[job.model], job.prompt_ids, job.settings.max_new_tokens), job
    assert len({tuple(r.token_ids) for r in results[:2]}) == 2  # the variants answer differently


@pytest.mark.parametrize(
    "family, prompt, expected",
    [("served", PROMPTS[0], greedy), ("switch", PROMPTS[1], _seq2seq_greedy)],
    ids=["mixtral", "switch"],
)
@pytest.mark.slow
def test_cli_serves_with_cross_variant_batching(request, family, prompt, expected):
    out, runtime, refs, tok = request.getfixturevalue(family)
    r = cli(
        "serve-local",
        out,
        "--prompt",
        prompt,
        "--model",
        "ft",
        "--model",
        "base",
        "--max-new-tokens",
        "5",
        "--cross-variant-batching",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    ids = tok(prompt)["input_ids"]
    assert [c["token_ids"] for c in got["completions"]] == [expected(refs[m], ids, 5) for m in ("ft", "base")]
    assert all(c["swap"]["bytes_moved"] == 0 for c in got["completions"])
    assert got["resident_bytes"]["total"] == runtime.resident_bytes().total
    assert got["resident_bytes"]["host"] == 0
