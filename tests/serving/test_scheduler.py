"""The scheduler: which variant runs next (`pick_model`, `decide`, pure), batching, failures,
cancellation and the bound on tokens in flight, driven directly (no HTTP).

Expected completions come from transformers' own models loaded from the original
checkpoints (greedy), not from the runtime under test.
"""

from __future__ import annotations

import threading

import pytest
from builders import greedy, served_family

from moeconsol.serving.engine import GenerationSettings
from moeconsol.serving.scheduler import Decision, Job, Limits, Scheduler, Snapshot, decide, pick_model

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    return served_family(tmp_path_factory.mktemp("schedule"))


def test_pick_model_prefers_the_active_model_within_the_wait_bound():
    waiting = [("a", 0.0), ("b", 1.0), ("a", 2.0)]
    assert pick_model("b", False, waiting, now=3.0, max_wait=10.0) == "b"  # active model first
    assert pick_model("b", True, [("a", 0.0)], now=3.0, max_wait=10.0) == "b"  # its running batch goes on
    assert pick_model("c", False, waiting, now=3.0, max_wait=10.0) == "a"  # else the oldest
    assert pick_model("b", True, waiting, now=10.5, max_wait=10.0) == "a"  # 'a' waited too long: it goes first
    assert pick_model("a", True, [("b", 0.0), ("c", 1.0)], now=11.5, max_wait=10.0) == "b"  # overdue: oldest first
    assert pick_model("a", True, waiting, now=3.0, max_wait=0.0) == "b"  # max_wait 0: first come, first served
    assert pick_model("a", False, [], now=3.0, max_wait=1.0) is None


@pytest.mark.parametrize("n_models, max_wait", [(2, 5.0), (3, 5.0), (4, 2.0), (3, 0.0)])
def test_pick_model_bounds_every_wait(n_models, max_wait):
    """Every model always has work (a request arrives for each model at every step); each step
    takes 1 time unit and so does each swap. No model waits longer than the documented bound
    max_wait + (N - 1) x (one step + one swap), plus the step it is served in."""
    models = [f"m{i}" for i in range(n_models)]
    since = {m: 0.0 for m in models}  # oldest waiting item of each model
    active, now, worst = models[0], 0.0, 0.0
    for _ in range(400):
        waiting = [(m, since[m]) for m in models if m != active]
        model = pick_model(active, True, waiting, now, max_wait)
        if model != active:
            since[active] = now  # the old batch is parked now
            now += 1.0  # the swap
            active = model
        worst = max(worst, now - since[active])
        now += 1.0  # the step
        since[active] = now  # the active model has no one waiting behind the step
    bound = max_wait + (n_models - 1) * 2.0 + 1.0
    assert worst <= bound, (worst, bound)


@pytest.mark.parametrize(
    "max_wait, expect_swaps, expect_served", [(60.0, 1, ["base"] * 3 + ["ft"] * 3), (0.0, 2, ["ft"] * 3 + ["base"] * 3)]
)
def test_scheduler_groups_requests_of_the_active_model(served, max_wait, expect_swaps, expect_served):
    out, runtime, refs, tok = served
    runtime.activate("base")
    swaps_before = len(runtime.swaps)
    scheduler = Scheduler(runtime, max_wait=max_wait)
    ids = tok(PROMPT)["input_ids"]
    futures = [scheduler.submit(Job(m, ids, GenerationSettings(2))) for m in ["ft", "base"] * 3]
    scheduler.start()  # the queue is full before the worker looks at it
    try:
        results = [f.result(timeout=120) for f in futures]
    finally:
        scheduler.stop()
    assert [r.model for r in results] == ["ft", "base"] * 3  # each request got its own model
    assert len(runtime.swaps) - swaps_before == expect_swaps
    assert list(scheduler.served) == expect_served  # a model's requests are admitted together, as one batch
    assert scheduler.engine.peak_batch_size == 3
    for r in results:
        assert r.token_ids == greedy(refs[r.model], ids, 2)


def test_concurrent_requests_decode_together_and_answer_as_alone(served):
    """Requests of two models and different lengths, all queued at once: each answer equals
    transformers' greedy answer for that prompt alone, and the engine really batched them."""
    out, runtime, refs, tok = served
    prompts = ["Once upon a time", "The quick brown fox jumps", "def add(a, b):", "0123456789 + -", "Experts are small"]
    scheduler = Scheduler(runtime, max_wait=0.5, max_batch_size=4)
    jobs = [
        Job(m, tok(p)["input_ids"], GenerationSettings(3 + 2 * i))
        for i, p in enumerate(prompts)
        for m in ("base", "ft")
    ]
    futures = [scheduler.submit(j) for j in jobs]
    scheduler.start()
    try:
        results = [f.result(timeout=300) for f in futures]
    finally:
        scheduler.stop()
    for job, r in zip(jobs, results):
        assert r.token_ids == greedy(refs[job.model], job.prompt_ids, job.settings.max_new_tokens), job
    assert scheduler.engine.peak_batch_size == 4  # the bound holds and is reached


def test_scheduler_keeps_serving_after_a_failed_request(served):
    out, runtime, refs, tok = served
    scheduler = Scheduler(runtime, max_wait=1.0)
    scheduler.start()
    try:
        bad = scheduler.submit(Job("ft", [], GenerationSettings(2)))
        good = scheduler.submit(Job("ft", [5, 6], GenerationSettings(2)))
        with pytest.raises(Exception, match="empty"):
            bad.result(timeout=60)
        assert len(good.result(timeout=60).token_ids) == 2
    finally:
        scheduler.stop()
    assert scheduler.served.maxlen is not None  # the record of served models is bounded


def test_a_cancelled_job_leaves_the_batch_at_the_next_step(served):
    out, runtime, refs, tok = served
    scheduler = Scheduler(runtime, max_wait=1.0)
    ids = tok(PROMPT)["input_ids"]
    gone = Job("base", ids, GenerationSettings(200))
    gone.on_text = lambda piece: scheduler.cancel(gone)  # the client goes away at its first piece of text
    keep = Job("base", ids, GenerationSettings(6))
    futures = [scheduler.submit(gone), scheduler.submit(keep)]
    scheduler.start()
    try:
        g, k = (f.result(timeout=120) for f in futures)
    finally:
        scheduler.stop()
    assert g.finish_reason == "cancelled" and len(g.token_ids) <= 2 + len(tok.encode(g.text))
    assert k.token_ids == greedy(refs["base"], ids, 6)
    assert scheduler.engine.running() == 0


def test_the_bound_on_tokens_in_flight_holds_and_everyone_is_served(served):
    """Each request reserves prompt + max_tokens; with room for two at a time, six requests of
    two models are all served, never more than two admitted at once, each as alone."""
    out, runtime, refs, tok = served
    ids = tok(PROMPT)["input_ids"]
    per_request = len(ids) + 4
    scheduler = Scheduler(runtime, max_wait=0.05, max_tokens_in_flight=2 * per_request)
    seen: list[int] = []
    step = scheduler.engine.step

    def watched_step():
        seen.append(scheduler.engine.tokens_in_flight())
        return step()

    scheduler.engine.step = watched_step
    futures = [scheduler.submit(Job(m, ids, GenerationSettings(4))) for m in ["ft", "base"] * 3]
    scheduler.start()
    try:
        results = [f.result(timeout=120) for f in futures]
    finally:
        scheduler.stop()
    assert max(seen) <= 2 * per_request
    for r in results:
        assert r.token_ids == greedy(refs[r.model], ids, 4)


# -- the decision on a snapshot ----------------------------------------------------------------


def _job(model: str, arrival: float, tokens: int = 10) -> Job:
    return Job(model, [1] * (tokens - 2), GenerationSettings(2), arrival=arrival)


def _snapshot(queue, active="a", running=None, parked=None, tokens_in_flight=0, now=10.0, cross_variant=False):
    running = {"a": 0, "b": 0, **(running or {})}
    return Snapshot(now, active, queue, parked or {}, running, tokens_in_flight, cross_variant)


def test_decide_admits_the_picked_variants_jobs_that_fit():
    queue = [_job("b", 1.0), _job("a", 2.0), _job("a", 3.0), _job("a", 4.0)]
    d = decide(_snapshot(queue), Limits(max_wait=60.0, max_batch_size=2))
    assert d.model == "a" and d.admit == queue[1:3]  # the active variant, two free slots
    d = decide(_snapshot(queue, now=100.0), Limits(max_wait=60.0))
    assert d.model == "b" and d.admit == queue[:1]  # 'b' waited past max_wait
    assert decide(_snapshot([]), Limits()) == Decision(None)  # idle: wait for a request


def test_decide_cross_variant_admits_in_arrival_order_without_swaps():
    queue = [_job("b", 1.0), _job("a", 2.0), _job("b", 3.0)]
    d = decide(_snapshot(queue, running={"a": 1}, cross_variant=True), Limits(max_batch_size=3))
    assert d.model == "a" and d.admit == queue[:2]  # the one batch has two free rows, whatever the variant


def test_decide_when_the_bound_on_tokens_in_flight_keeps_the_picked_variant_out():
    queue = [_job("b", 1.0, tokens=50)]
    limits = Limits(max_wait=5.0, max_tokens_in_flight=60)
    d = decide(_snapshot(queue, running={"a": 1}, tokens_in_flight=20, now=100.0), limits)
    assert d.model == "a" and d.admit == []  # 'b' is due but does not fit: the active batch goes on
    parked = _snapshot(queue, running={"c": 1}, parked={"c": 8.0}, tokens_in_flight=20, now=10.0)
    assert decide(parked, limits) == Decision("c")  # none running: the parked batch resumes, to make room


def test_decide_always_has_a_step_while_parked_batches_hold_the_bound():
    """'b' is active and idle; 'a' is parked holding most of the bound; 'c' has waited longer than
    'a' and does not fit. Both are overdue: deciding must not pick 'c' again and again with
    nothing to run (the worker would spin), but resume 'a' so that 'c' fits later."""
    queue = [_job("c", 0.0, tokens=50)]
    s = _snapshot(queue, active="b", running={"a": 2}, parked={"a": 2.0}, tokens_in_flight=40, now=4.0)
    assert decide(s, Limits(max_wait=2.0, max_tokens_in_flight=60)) == Decision("a")


# -- liveness: what clients that go away leave behind --------------------------------------------


def test_a_parked_batch_whose_clients_all_left_does_not_stall_the_other_variants(served):
    """Four streamed requests of 'ft' run; a request of 'base' makes 'ft' park; then every 'ft'
    client goes away. The emptied parked batch must not hold the worker: later requests of
    'base' are answered without anyone asking for 'ft' again."""
    out, runtime, refs, tok = served
    runtime.activate("base")
    scheduler = Scheduler(runtime, max_wait=0.0)
    ids = tok(PROMPT)["input_ids"]
    streaming = threading.Event()
    parked = [Job("ft", ids, GenerationSettings(200), on_text=lambda piece: streaming.set()) for _ in range(4)]

    def leave(piece: str) -> None:  # 'ft' is parked now; its clients all go away
        for job in parked:
            scheduler.cancel(job)

    futures = [scheduler.submit(job) for job in parked]
    scheduler.start()
    try:
        assert streaming.wait(timeout=60)
        other = scheduler.submit(Job("base", ids, GenerationSettings(4), on_text=leave))
        assert len(other.result(timeout=60).token_ids) == 4
        assert {f.result(timeout=60).finish_reason for f in futures} == {"cancelled"}
        later = scheduler.submit(Job("base", ids, GenerationSettings(3)))
        assert later.result(timeout=20).token_ids == greedy(refs["base"], ids, 3)
    finally:
        scheduler.stop()
    assert scheduler.engine.running() == 0


# -- isolation: one request's settings never fail its batch-mates -------------------------------


def test_extreme_sampling_settings_and_their_batch_mates_are_all_answered(served):
    """Admitted in the same step: a temperature and a top_p that are 0 in float32, and a plain
    greedy request. Each is answered; top_p 1e-46 keeps only the top token (greedy)."""
    out, runtime, refs, tok = served
    ids = tok(PROMPT)["input_ids"]
    settings = [
        GenerationSettings(4, temperature=1e-300, seed=1),
        GenerationSettings(4, temperature=1.0, top_p=1e-46, seed=2),
        GenerationSettings(4),
    ]
    scheduler = Scheduler(runtime, max_wait=60.0)
    futures = [scheduler.submit(Job("ft", ids, s)) for s in settings]
    scheduler.start()
    try:
        cold, top_only, plain = (f.result(timeout=60) for f in futures)
    finally:
        scheduler.stop()
    assert list(scheduler.served) == ["ft"] * 3 and scheduler.engine.peak_batch_size == 3
    assert top_only.token_ids == plain.token_ids == greedy(refs["ft"], ids, 4)
    assert cold.finish_reason in ("stop", "length") and cold.token_ids


def test_a_failed_swap_fails_the_requests_that_needed_it_and_the_rest_go_on(served, monkeypatch):
    """Driven turn by turn: 'ft' is parked when swapping back to it starts failing. Its parked
    request and its queued one get the error (else the worker would try that swap forever);
    'base' is answered."""
    out, runtime, refs, tok = served
    runtime.activate("base")
    scheduler = Scheduler(runtime, max_wait=0.0)
    ids = tok(PROMPT)["input_ids"]
    parked = scheduler.submit(Job("ft", ids, GenerationSettings(50)))
    scheduler.turn()
    other = scheduler.submit(Job("base", ids, GenerationSettings(6)))
    scheduler.turn()
    assert scheduler.engine.parked().keys() == {"ft"}
    activate = runtime.activate

    def broken(name: str):
        if name == "ft":
            raise RuntimeError("the variant's tensors cannot be read")
        return activate(name)

    monkeypatch.setattr(runtime, "activate", broken)
    queued = scheduler.submit(Job("ft", ids, GenerationSettings(2)))
    for _ in range(10):
        scheduler.turn()
    for f in (parked, queued):
        with pytest.raises(RuntimeError, match="cannot be read"):
            f.result(timeout=0)
    assert other.result(timeout=0).token_ids == greedy(refs["base"], ids, 6)
    assert scheduler.engine.batches == {} and scheduler.turn().model is None
