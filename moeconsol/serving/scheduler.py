"""The scheduler: the queue of generation requests and the one worker thread that owns the
runtime and its `Engine` (engine.py).

Each turn of the worker (`Scheduler.turn`): drop the requests whose client went away (queued,
running or parked), decide what runs next (`decide`, a pure function of the queue, the
engine's batches and its load), swap to that variant if needed, admit its requests into its
running batch, decode one step for the whole batch, answer the finished requests. While any
request is queued or in a batch, every turn decodes or admits something: the worker never
waits with work it could do, and never turns without progress. A failure (a swap, a prefill,
a step, one request's sampling) is delivered to the requests it was for; the worker keeps
serving.

Swaps happen only between decode steps; a batch whose variant is swapped out is parked with
its KV cache and goes on when its variant is back. The parked batches are the engine's
batches of inactive variants (`Engine.parked`), never a list of their own. A request's next
token (its first, or the next after its batch was parked) comes within `max_wait` plus
(N + 1) decode steps and swaps for N variants (see `pick_model`), while the bounds on batch
size and tokens in flight let it in. On a runtime with cross-variant batching
(`ServingMode.CROSS_VARIANT`) there is nothing to pick: queued requests of any variant are
admitted in arrival order into one batch and every step decodes all of them, without swaps.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from ..errors import MoeconsolError, SettingsError
from .engine import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_TOKENS_IN_FLIGHT,
    DEFAULT_MAX_WAIT,
    Engine,
    FinishReason,
    Request,
)
from .metrics import Metrics
from .runtime import Runtime, SwapReport

_SERVED_KEPT = 1024


@dataclass(eq=False)
class Job(Request):
    """One generation request as the server queues it: an engine `Request` plus the future
    its HTTP handler waits on."""

    future: Future = field(default_factory=Future)


# -- the decision (pure) ------------------------------------------------------------------------


def pick_model(
    active: str, active_busy: bool, waiting: Sequence[tuple[str, float]], now: float, max_wait: float
) -> str | None:
    """The variant to run the next decode step on. `waiting` holds (model, since) for every
    request not being decoded: queued ones (since arrival) and parked batches of inactive
    models (since they were parked); `active_busy` says the active model has work.

    A model other than the active one whose oldest waiting item has waited `max_wait` or
    longer goes first (the oldest such item first); else the active model keeps the runtime
    while it has work; else the model of the oldest waiting item; None when idle. So with N
    models a waiting item is served (admitted, or its batch resumed, and decoded) within
    max_wait + (N + 1) x (one step + one swap): the turn under way when it becomes overdue,
    one turn for each other model with an older item (each model's older items are served
    together, by one step), then its own swap and step. `max_wait` 0 makes the order first
    come, first served."""
    others = [(since, model) for model, since in waiting if model != active]
    overdue = [x for x in others if now - x[0] >= max_wait]
    if overdue:
        return min(overdue)[1]
    if active_busy or any(model == active for model, _ in waiting):
        return active
    return min(others)[1] if others else None


@dataclass(frozen=True)
class Limits:
    """The scheduler's bounds (serve-local's options of the same names)."""

    max_wait: float = DEFAULT_MAX_WAIT
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_tokens_in_flight: int = DEFAULT_MAX_TOKENS_IN_FLIGHT


@dataclass(frozen=True)
class Snapshot:
    """What a decision looks at, taken under the scheduler's lock."""

    now: float
    active: str
    """the runtime's active variant"""
    queue: Sequence[Job]
    """queued jobs, in arrival order"""
    parked: Mapping[str, float]
    """variant -> when its parked batch last got a token (`Engine.parked`)"""
    running: Mapping[str, int]
    """variant -> its requests in the engine (running or parked)"""
    tokens_in_flight: int
    """prompt + max_tokens of every request in the engine"""
    cross_variant: bool
    """one batch holds every variant (nothing to pick, nothing to swap)"""


@dataclass(frozen=True)
class Decision:
    """What the worker does this turn."""

    model: str | None
    """the variant whose batch the next step decodes (swapped to if not active); None: no
    work, nothing to do until a request comes"""
    admit: list[Job] = field(default_factory=list)
    """queued jobs it admits first"""


def admissible(s: Snapshot, model: str | None, limits: Limits) -> list[Job]:
    """Queued jobs of `model` (None: of any model) that fit, oldest first: free batch slots and
    the bound on tokens in flight (prompt + max_tokens of every admitted request; one job is
    admitted into an empty engine whatever its size)."""
    free = limits.max_batch_size - (sum(s.running.values()) if model is None else s.running.get(model, 0))
    budget = limits.max_tokens_in_flight - s.tokens_in_flight
    busy = sum(s.running.values()) > 0
    taken: list[Job] = []
    for job in s.queue:
        if len(taken) >= free:
            break
        if model is not None and job.model != model:
            continue
        if job.reserved_tokens > budget and (taken or busy):
            break
        taken.append(job)
        budget -= job.reserved_tokens
    return taken


def decide(s: Snapshot, limits: Limits) -> Decision:
    """The variant the next step runs and the jobs it admits (`pick_model`, then
    `admissible`). When the bound on tokens in flight keeps the picked variant out, the
    requests in flight must finish first: the active batch goes on, or with none running the
    parked batch that has waited longest resumes. So with any work there is a step to run."""
    busy = {m for m, n in s.running.items() if n > 0}
    if s.cross_variant:  # one step serves every variant: admit in arrival order, never swap
        admit = admissible(s, None, limits)
        return Decision(s.active, admit) if admit or busy else Decision(None)
    waiting = [(j.model, j.arrival) for j in s.queue]
    waiting += [(m, t) for m, t in s.parked.items() if m != s.active]
    model = pick_model(s.active, s.active in busy, waiting, s.now, limits.max_wait)
    if model is None:
        return Decision(None)
    admit = admissible(s, model, limits)
    if admit or model in busy:
        return Decision(model, admit)
    if s.active in busy:
        return Decision(s.active)
    parked = sorted((s.parked.get(m, s.now), m) for m in busy)
    return Decision(parked[0][1]) if parked else Decision(None)


# -- the worker ---------------------------------------------------------------------------------


class Scheduler:
    """The queue and the one worker thread that owns the runtime and its engine."""

    def __init__(
        self,
        runtime: Runtime,
        max_wait: float = DEFAULT_MAX_WAIT,
        metrics: Metrics | None = None,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_tokens_in_flight: int = DEFAULT_MAX_TOKENS_IN_FLIGHT,
        clock: Callable[[], float] = time.perf_counter,
    ):
        if not max_wait >= 0 or not math.isfinite(max_wait):
            raise SettingsError(f"max wait must be a finite number of seconds >= 0, got {max_wait}")
        if max_tokens_in_flight < 1:
            raise SettingsError(f"max tokens in flight must be at least 1, got {max_tokens_in_flight}")
        self.runtime = runtime
        self.clock = clock
        """the time of decisions, admissions and answers (a simulated clock in tests)"""
        self.engine = Engine(runtime, max_batch_size, clock)
        self.limits = Limits(max_wait, max_batch_size, max_tokens_in_flight)
        self.metrics = metrics or Metrics(runtime.names)
        self.served: deque[str] = deque(maxlen=_SERVED_KEPT)
        """models of the last admitted requests, in order (for tests and benchmarks)"""
        self._pending: list[Job] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="moeconsol-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> Future:
        with self._cond:
            self._pending.append(job)
            self._cond.notify()
        return job.future

    def cancel(self, job: Job) -> None:
        """The client went away: the job leaves the queue or its batch before the next step."""
        job.cancel()
        with self._cond:
            self._cond.notify()

    def _run(self) -> None:
        """The worker: turns while there is work, else waits for a request (or a cancel)."""
        while True:
            with self._cond:
                while not self._stop and not self._pending and not self.engine.running():
                    self._cond.wait()
                if self._stop:
                    self._shut_down()
                    return
            self.turn()

    def turn(self) -> Decision:
        """One turn: drop what was cancelled, decide, then at most one swap, one admission and
        one decode step, and answer what finished. Returns the decision (model None: no work).
        Only the worker calls it (or a test, in its place, with the worker not started)."""
        with self._cond:
            dropped = self._drop_cancelled()
            decision = decide(self._snapshot(self.clock()), self.limits)
            self._dequeue(decision.admit)
        self._answer(dropped)
        finished = self._run_step(decision) if decision.model is not None else []
        with self._cond:
            self._gauges()  # before the answers go out, so a client reading /metrics next sees them
        self._answer(finished)
        return decision

    # -- the steps of a turn ----------------------------------------------------------------------

    def _run_step(self, decision: Decision) -> list[Job]:
        """Swap to the decision's variant, admit its jobs, decode one step; returns the jobs
        that finished in the step."""
        try:
            swap = self._swap_to(decision.model)
        except Exception as e:  # the requests that needed this variant fail; the worker keeps serving
            self._fail(decision.admit + self._evict(decision.model), e)
            return []
        self._answer(self._admit(decision.admit, swap))
        return self._step()

    def _drop_cancelled(self) -> list[Job]:
        """Jobs whose client went away leave the queue and every batch, running or parked."""
        dropped = [j for j in self._pending if j.cancelled]
        self._pending = [j for j in self._pending if not j.cancelled]
        return dropped + self.engine.drop_cancelled()

    def _snapshot(self, now: float) -> Snapshot:
        return Snapshot(
            now=now,
            active=self.runtime.active,
            queue=list(self._pending),
            parked=self.engine.parked(),
            running={m: self.engine.running(m) for m in self.runtime.names},
            tokens_in_flight=self.engine.tokens_in_flight(),
            cross_variant=self.engine.cross_variant,
        )

    def _dequeue(self, jobs: list[Job]) -> None:
        self._pending = [j for j in self._pending if j not in jobs]

    def _swap_to(self, model: str) -> SwapReport | None:
        """Make `model` active (the active batch, if any, is parked); None if it already is."""
        if model == self.runtime.active:
            return None
        swap = self.runtime.activate(model)
        self.metrics.swap(swap)
        return swap

    def _evict(self, model: str) -> list[Job]:
        """The requests of `model`'s batch, which leaves the engine (a failed swap or step)."""
        batch = self.engine.batches.pop(self.engine.batch_key(model), None)
        return batch.requests if batch else []

    def _admit(self, jobs: list[Job], swap: SwapReport | None) -> list[Job]:
        """Admit `jobs` into the active batch with one prefill; returns those already finished
        (their first token was their last). A job that cannot be admitted fails alone."""
        ready = []
        for job in jobs:
            if not job.future.set_running_or_notify_cancel():
                continue
            try:
                self.engine.check_request(job)
            except Exception as e:  # delivered to the request; the worker keeps serving
                job.future.set_exception(e)
                continue
            ready.append(job)
        try:
            at_once = self.engine.admit_all(ready, swap)
        except Exception as e:  # a failed prefill fails the requests admitted with it
            self._fail(ready, e)
            return []
        self.served.extend(job.model for job in ready)
        return at_once

    def _step(self) -> list[Job]:
        """One decode step of the active batch; returns the jobs that finished. A failed step
        fails its batch, not the server."""
        try:
            return self.engine.step()
        except Exception as e:
            self._fail(self._evict(self.runtime.active), e)
            return []

    def _answer(self, jobs: list[Job]) -> None:
        """Count each finished (or cancelled) job and hand its completion to its handler; a
        job that failed alone gets its error."""
        for job in jobs:
            if job.error is not None:
                self._fail([job], job.error)
                continue
            job.finish = job.finish or FinishReason.CANCELLED
            job.finished_at = job.finished_at or self.clock()
            completion = job.completion()
            self.metrics.record(completion)
            if _claim(job.future):
                job.future.set_result(completion)

    def _fail(self, jobs: list[Job], error: Exception) -> None:
        for job in jobs:
            if _claim(job.future):
                job.future.set_exception(error)

    def _gauges(self) -> None:
        for m in self.runtime.names:
            self.metrics.batch_size.labels(m).set(self.engine.running(m))
            self.metrics.queue_length.labels(m).set(sum(1 for j in self._pending if j.model == m))

    def _shut_down(self) -> None:
        error = MoeconsolError("the server is shutting down")
        for job in self._pending + [j for b in self.engine.batches.values() for j in b.requests]:
            job.cancel()
            if not job.future.done():
                job.future.set_exception(error)
        self._pending, self.engine.batches = [], {}


def _claim(future: Future) -> bool:
    """Whether the worker may answer `future`: not answered yet, and not cancelled by its waiter."""
    return not future.done() and (future.running() or future.set_running_or_notify_cancel())
