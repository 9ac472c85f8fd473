"""The scheduler: the queue of generation requests and the one worker thread that owns the
runtime and its `Engine` (engine.py).

Each turn of the worker: drop the queued requests whose client went away, decide what runs
next (`decide`, a pure function of the queue, the parked batches and the engine's load),
swap to that variant if needed, admit its requests into its running batch, decode one step
for the whole batch, answer the finished requests. A failure (a swap, a prefill, a step) is
delivered to the requests it was for; the worker keeps serving.

Swaps happen only between decode steps; a batch whose variant is swapped out is parked with
its KV cache and goes on when its variant is back. A request waits at most `max_wait` plus
(N - 1) decode steps and swaps for N variants (see `pick_model`); a client that goes away is
cancelled and leaves the batch at the next step. On a runtime with cross-variant batching
(`ServingMode.CROSS_VARIANT`) there is nothing to pick: queued requests of any variant are
admitted in arrival order into one batch and every step decodes all of them, without swaps.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
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
_IDLE_PAUSE = 0.05
"""seconds to wait before deciding again when the bound on tokens in flight keeps every request out"""


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
    models a waiting item is served after at most max_wait + (N - 1) x (one step + one swap):
    once overdue, only items older than it (at most one per other model) go before it, each
    for one step. `max_wait` 0 makes the order first come, first served."""
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
    """variant -> when its batch was parked"""
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
    """the variant whose batch the next step decodes (swapped to if not active); None: no step"""
    admit: list[Job] = field(default_factory=list)
    """queued jobs it admits first"""
    pause: float | None = None
    """with no step: seconds to wait before deciding again (None: until a request comes)"""


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
    active batch goes on; with none running, the worker waits until the oldest waiting item
    is due (parked batches hold the bound)."""
    if s.cross_variant:  # one step serves every variant: admit in arrival order, never swap
        return Decision(s.active, admissible(s, None, limits))
    waiting = [(j.model, j.arrival) for j in s.queue]
    waiting += [(m, t) for m, t in s.parked.items() if m != s.active]
    model = pick_model(s.active, s.running.get(s.active, 0) > 0, waiting, s.now, limits.max_wait)
    if model is None:
        return Decision(None)
    admit = admissible(s, model, limits)
    if admit or s.running.get(model, 0):
        return Decision(model, admit)
    if s.running.get(s.active, 0):
        return Decision(s.active)
    oldest = min((t for m, t in waiting if m != model), default=None)
    return Decision(None, pause=_IDLE_PAUSE if oldest is None else max(limits.max_wait - (s.now - oldest), 0.001))


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
    ):
        if not max_wait >= 0 or not math.isfinite(max_wait):
            raise SettingsError(f"max wait must be a finite number of seconds >= 0, got {max_wait}")
        if max_tokens_in_flight < 1:
            raise SettingsError(f"max tokens in flight must be at least 1, got {max_tokens_in_flight}")
        self.runtime = runtime
        self.engine = Engine(runtime, max_batch_size)
        self.limits = Limits(max_wait, max_batch_size, max_tokens_in_flight)
        self.metrics = metrics or Metrics(runtime.names)
        self.served: deque[str] = deque(maxlen=_SERVED_KEPT)
        """models of the last admitted requests, in order (for tests and benchmarks)"""
        self._pending: list[Job] = []
        self._parked: dict[str, float] = {}
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
        """The worker: one decision per turn, then at most one swap and one decode step."""
        while True:
            with self._cond:
                while not self._stop and not self._pending and not self.engine.running():
                    self._cond.wait()
                if self._stop:
                    self._shut_down()
                    return
                dropped = self._drop_cancelled()
                now = time.perf_counter()
                decision = decide(self._snapshot(now), self.limits)
                self._dequeue(decision.admit)
            self._answer(dropped)
            if decision.model is None:
                self._idle(decision.pause)
                continue
            try:
                swap = self._swap_to(decision.model, now)
            except Exception as e:  # delivered to the requests it was for; the worker keeps serving
                self._fail(decision.admit, e)
                continue
            self._answer(self._admit(decision.admit, swap))
            finished = self._step()
            with self._cond:
                self._gauges()  # before the answers go out, so a client reading /metrics next sees them
            self._answer(finished)

    # -- the steps of a turn ----------------------------------------------------------------------

    def _drop_cancelled(self) -> list[Job]:
        """Queued jobs whose client went away leave the queue (running ones leave their batch
        at the engine's next step)."""
        dropped = [j for j in self._pending if j.cancelled]
        self._pending = [j for j in self._pending if not j.cancelled]
        return dropped

    def _snapshot(self, now: float) -> Snapshot:
        return Snapshot(
            now=now,
            active=self.runtime.active,
            queue=list(self._pending),
            parked=dict(self._parked),
            running={m: self.engine.running(m) for m in self.runtime.names},
            tokens_in_flight=self.engine.tokens_in_flight(),
            cross_variant=self.engine.cross_variant,
        )

    def _dequeue(self, jobs: list[Job]) -> None:
        self._pending = [j for j in self._pending if j not in jobs]

    def _idle(self, pause: float | None) -> None:
        """No step this turn: update the gauges, then wait `pause` seconds (or until woken)."""
        with self._cond:
            self._gauges()
            if pause is not None:
                self._cond.wait(timeout=pause)

    def _swap_to(self, model: str, now: float) -> SwapReport | None:
        """Make `model` active (the active batch, if any, is parked); None if it already is."""
        active = self.runtime.active
        if model == active:
            return None
        if self.engine.running(active):
            self._parked[active] = now
        swap = self.runtime.activate(model)
        self._parked.pop(model, None)
        self.metrics.swap(swap)
        return swap

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
            batch = self.engine.batches.pop(self.engine.batch_key(self.runtime.active), None)
            self._fail(batch.requests if batch else [], e)
            return []

    def _answer(self, jobs: list[Job]) -> None:
        """Count each finished (or cancelled) job and hand its completion to its handler."""
        for job in jobs:
            job.finish = job.finish or FinishReason.CANCELLED
            job.finished_at = job.finished_at or time.perf_counter()
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
