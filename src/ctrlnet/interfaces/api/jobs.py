"""One device, one worker thread, a bounded FIFO of jobs with ids, progress, cancel and expiry.

No web imports: the HTTP routers (``/v1``, the A1111 routes) and anything else that runs work on
the device submit here, so there is one executor and one notion of "busy".

- ``submit(fn, total_steps)`` admits a job while fewer than ``capacity`` jobs are running or
  waiting, else raises :class:`QueueFull` with a ``Retry-After`` measured from this server's own
  step times. ``fn(progress, cancel)`` runs on the worker thread; ``progress(done, total)`` after
  each step, ``cancel()`` returns True once the job was cancelled (``generate()`` then raises
  ``GenerationCancelled`` at its next step).
- Finished jobs (done, failed, cancelled) are kept ``keep_s`` seconds and at most ``keep_count``
  of them; asking for an expired one raises :class:`JobExpired` (HTTP 410), an unknown id
  :class:`JobNotFound` (404).
- Timing: a running mean of seconds per step over the steps of recent finished jobs (setup and
  decode time included, spread over the steps, since a client waits for those too). A queued
  job's ETA is (steps ahead of it + its own steps) x that mean; before anything has been measured,
  the running job's own pace is used, and before that a one-second guess.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)

Work = Callable[[Callable[[int, int], None], Callable[[], bool]], Any]

_log = logging.getLogger(__name__)
_PRIOR_S_PER_STEP = 1.0  # used only until the first step of this server has been timed
_TIMING_WINDOW = 32  # finished jobs whose pace makes the running mean


class QueueFull(Exception):
    """``capacity`` jobs are running or waiting; ``retry_after_s`` (>= 1) is when a slot should free."""

    def __init__(self, retry_after_s: int, pending: int, capacity: int):
        super().__init__(f"busy: {pending} jobs running or waiting (limit {capacity}); retry in {retry_after_s} s")
        self.retry_after_s, self.pending, self.capacity = retry_after_s, pending, capacity


class JobNotFound(KeyError):
    """No job with this id was ever known here (or it expired so long ago that it was forgotten)."""


class JobExpired(KeyError):
    """The job finished and its result was dropped (older than ``keep_s`` or beyond ``keep_count``)."""


@dataclass
class Job:
    """A unit of device work. ``state``: queued -> running -> done | failed | cancelled (a queued job
    can go straight to cancelled). ``step``/``total``: sampling steps done / expected. Times:
    ``*_at`` are ``time.monotonic()``, ``*_wall`` are ``time.time()`` (for clients). ``result``: what
    ``fn`` returned (done), or what a cancelled ``fn`` kept of its work (``GenerationCancelled.partial``,
    else None); ``error``: the exception it raised (failed)."""

    fn: Work
    total: int
    kind: str = "job"  # what the work is ("generate", "annotate"), for clients listing jobs
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    state: str = QUEUED
    step: int = 0
    created_at: float = field(default_factory=time.monotonic)
    created_wall: float = field(default_factory=time.time)
    started_at: float | None = None
    started_wall: float | None = None
    finished_at: float | None = None
    finished_wall: float | None = None
    eta_s: float | None = None
    first_step_at: float | None = None  # when its first step was reported (its own pace starts there)
    result: Any = None
    error: BaseException | None = None
    preview: Any = None  # the work's latest live-preview source (a generation's x0 estimate), set as it runs
    cancel_event: threading.Event = field(default_factory=threading.Event)
    done_event: threading.Event = field(default_factory=threading.Event)
    _listeners: list = field(default_factory=list, repr=False)

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    def snapshot(self) -> dict:
        """The job's public state (no result), as events and polls report it."""
        return {"id": self.id, "kind": self.kind, "state": self.state, "step": self.step, "total": self.total,
                "eta_s": None if self.eta_s is None else round(self.eta_s, 3),
                "created": self.created_wall, "started": self.started_wall, "finished": self.finished_wall}


class JobQueue:
    """See the module docstring. ``capacity``: jobs running + waiting; ``keep_s``/``keep_count``:
    how long and how many finished jobs stay readable."""

    def __init__(self, capacity: int = 4, keep_s: float = 600.0, keep_count: int = 64,
                 clock: Callable[[], float] = time.monotonic):
        if capacity < 1 or keep_count < 1 or keep_s <= 0:
            raise ValueError(f"need capacity >= 1, keep_count >= 1, keep_s > 0; got {capacity}, {keep_count}, {keep_s}")
        self.capacity, self.keep_s, self.keep_count = capacity, float(keep_s), keep_count
        self._clock = clock  # monotonic seconds; a test passes a fake one
        self._cv = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: Job | None = None
        self._jobs: dict[str, Job] = {}  # every job not yet expired
        self._finished: collections.deque[Job] = collections.deque()  # in finishing order
        self._expired: collections.OrderedDict[str, None] = collections.OrderedDict()  # ids, for 410
        self._timing: collections.deque[tuple[float, int]] = collections.deque(maxlen=_TIMING_WINDOW)
        self._thread: threading.Thread | None = None
        self._closed = False

    # ---- admission ------------------------------------------------------------------------------

    def submit(self, fn: Work, total_steps: int, kind: str = "job") -> Job:
        """Queue ``fn`` (``kind`` labels it for clients); raises :class:`QueueFull` when ``capacity`` jobs are running or waiting,
        RuntimeError after :meth:`shutdown`."""
        job = Job(fn=fn, total=max(1, int(total_steps)), kind=kind, created_at=self._clock())
        with self._cv:
            if self._closed:
                raise RuntimeError("the job queue is shut down")
            self._expire()
            pending = len(self._waiting) + (self._running is not None)
            if pending >= self.capacity:
                raise QueueFull(self.retry_after_s(), pending, self.capacity)
            self._jobs[job.id] = job
            self._waiting.append(job)
            self._update_etas()
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="ctrlnet-jobs", daemon=True)
                self._thread.start()
            self._cv.notify_all()
        self._notify(job)
        return job

    @property
    def pending(self) -> int:
        """Jobs running + waiting."""
        with self._cv:
            return len(self._waiting) + (self._running is not None)

    # ---- lookup and control ---------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        """The job, or :class:`JobExpired` / :class:`JobNotFound`."""
        with self._cv:
            self._expire()
            job = self._jobs.get(job_id)
            if job is not None:
                return job
            if job_id in self._expired:
                raise JobExpired(f"job {job_id} finished more than {self.keep_s:g} s ago or was pushed out by "
                                 f"newer results (the server keeps {self.keep_count}); its result is gone")
            raise JobNotFound(f"no job {job_id!r} on this server")

    def cancel(self, job_id: str) -> Job:
        """Cancel a job: a queued one never starts; a running one stops at its next step (the
        state turns ``cancelled`` when it has); a finished one is left as it is."""
        job = self.get(job_id)
        with self._cv:
            if job.state == QUEUED:
                self._waiting.remove(job)
                job.cancel_event.set()
                self._finish(job, CANCELLED)
                self._update_etas()
                self._notify(job)
            elif job.state == RUNNING:
                job.cancel_event.set()
        return job

    def position(self, job: Job) -> int | None:
        """0 = running, k = k-th waiting, None = finished."""
        with self._cv:
            if job is self._running:
                return 0
            try:
                return self._waiting.index(job) + 1
            except ValueError:
                return None

    def jobs(self) -> list[Job]:
        """Every job still readable: finished (oldest first), running, then waiting."""
        with self._cv:
            self._expire()
            return [*self._finished, *([self._running] if self._running else []), *self._waiting]

    def current(self) -> Job | None:
        """The running job, if any."""
        with self._cv:
            return self._running

    def seconds_per_step(self) -> float:
        """The measured mean (see the module docstring)."""
        with self._cv:
            return self._pace()

    def retry_after_s(self) -> int:
        """Whole seconds until a slot should free: the running job's remaining steps at the measured pace."""
        with self._cv:
            run = self._running
            if run is not None:
                return max(1, math.ceil(self._running_eta(run)))
            left = self._waiting[0].total if self._waiting else 0
            return max(1, math.ceil(left * self._pace()))

    # ---- waiting --------------------------------------------------------------------------------

    async def events(self, job: Job) -> AsyncIterator[dict]:
        """The job's snapshots in order: the current one, then one per change (start, each step,
        the end); ends after the finished one."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def push(snap: dict) -> None:
            try:
                loop.call_soon_threadsafe(q.put_nowait, snap)
            except RuntimeError:  # the loop is closed: the listener is gone
                pass

        with self._cv:
            job._listeners.append(push)
            first = self._snapshot(job)
        try:
            snap = first
            while True:
                yield snap
                if snap["state"] in FINISHED:
                    return
                snap = await q.get()
        finally:
            with self._cv:
                if push in job._listeners:
                    job._listeners.remove(push)

    async def wait(self, job: Job) -> Job:
        """Return once the job has finished."""
        async for _ in self.events(job):
            pass
        return job

    def shutdown(self) -> None:
        """Cancel everything; the worker ends after its current step."""
        with self._cv:
            self._closed = True
            waiting = list(self._waiting)
            self._waiting.clear()
            for job in waiting:
                job.cancel_event.set()
                self._finish(job, CANCELLED)
            if self._running is not None:
                self._running.cancel_event.set()
            self._cv.notify_all()
        for job in waiting:
            self._notify(job)

    # ---- the worker -----------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._closed:
                    self._cv.wait(timeout=max(1.0, self.keep_s))
                    self._expire()
                if self._closed and not self._waiting:
                    return
                job = self._waiting.popleft()
                self._running = job
                job.state, job.started_at, job.started_wall = RUNNING, self._clock(), time.time()
                self._update_etas()
            self._notify(job)
            self._run(job)

    def _run(self, job: Job) -> None:
        def progress(done: int, total: int) -> None:
            with self._cv:
                if job.first_step_at is None and done >= 1:
                    job.first_step_at = self._clock()
                job.step, job.total = int(done), max(1, int(total))
                self._update_etas()
            self._notify(job)

        state, result, error = DONE, None, None
        try:
            result = job.fn(progress, job.cancel_event.is_set)
        except BaseException as e:  # noqa: BLE001 - every failure is reported through the job
            from ctrlnet.generation.run import GenerationCancelled

            state = CANCELLED if isinstance(e, GenerationCancelled) else FAILED
            error = None if state == CANCELLED else e
            if state == CANCELLED:
                result = e.partial  # what the work kept of a stopped run (None: nothing)
            if error is not None:  # the client gets a short message; the operator the traceback
                _log.info("job %s (%s) failed", job.id, job.kind, exc_info=error)
        if state == DONE and job.cancel_event.is_set() and job.step < job.total:
            state = CANCELLED  # work that ignores cancel() still reports what the client asked for
        with self._cv:
            elapsed = self._clock() - job.started_at
            if job.step > 0:  # time spread over the steps done (setup and decode included)
                self._timing.append((elapsed, job.step))
            job.result, job.error = (result if state in (DONE, CANCELLED) else None), error
            self._running = None
            self._finish(job, state)
            self._update_etas()
            self._cv.notify_all()
        self._notify(job)

    # ---- internals (call with the lock held) ----------------------------------------------------

    def _pace(self) -> float:
        secs = sum(s for s, _ in self._timing)
        steps = sum(n for _, n in self._timing)
        if steps:
            return secs / steps
        run = self._running
        if run is not None and run.step > 0:
            return (self._clock() - run.started_at) / run.step
        return _PRIOR_S_PER_STEP

    def _running_eta(self, run: Job) -> float:
        """Seconds left for the running job: its own pace once it has two steps to time (from the
        end of its first, which also carried its setup: prompts, control maps), as A1111's progress
        does; before that the measured pace of earlier jobs, which may have had other sizes."""
        left = run.total - run.step
        if run.step >= 2 and run.first_step_at is not None:
            return left * (self._clock() - run.first_step_at) / (run.step - 1)
        return left * self._pace()

    def _update_etas(self) -> None:
        pace = self._pace()
        ahead_s = 0.0
        if self._running is not None:
            ahead_s = self._running.eta_s = self._running_eta(self._running)
        for job in self._waiting:
            ahead_s += job.total * pace
            job.eta_s = ahead_s

    def _finish(self, job: Job, state: str) -> None:
        job.fn = None  # the work's closure holds the request's images; the result is what stays
        job.state, job.eta_s = state, 0.0
        job.finished_at, job.finished_wall = self._clock(), time.time()
        self._finished.append(job)
        job.done_event.set()
        self._expire()

    def _expire(self) -> None:
        now = self._clock()
        while self._finished and (len(self._finished) > self.keep_count
                                  or now - self._finished[0].finished_at > self.keep_s):
            old = self._finished.popleft()
            self._jobs.pop(old.id, None)
            old.result = None
            self._expired[old.id] = None
            while len(self._expired) > 100_000:  # ids only; bounded all the same
                self._expired.popitem(last=False)

    def _snapshot(self, job: Job) -> dict:
        snap = job.snapshot()
        snap["position"] = (0 if job is self._running else
                            next((i + 1 for i, j in enumerate(self._waiting) if j is job), None))
        return snap

    def _notify(self, job: Job) -> None:
        # under the lock, so every listener sees changes in the order they happened (pushing only
        # schedules a put on the listener's event loop; it never blocks)
        with self._cv:
            snap = self._snapshot(job)
            for push in list(job._listeners):
                push(snap)
