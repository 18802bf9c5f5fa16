"""The bounded admission queue and the worker thread that owns the model.

The model's engine runs on one thread: its `run.batching.Scheduler` steps every running request at once
(continuous batching: a request joins at the next step and leaves when done). Requests become `Job`s;
submitting is a short locked append to the scheduler's FIFO (or an immediate `QueueFull`, answered 429,
when `queue_size` requests already wait beyond the batch's free places), so the event loop never blocks
on the model. What a job produces travels back to the loop through `call_soon_threadsafe` into an asyncio
queue the request's handler reads. A job is cancelled by its handler when the client goes away: a
waiting job is answered without reaching the model, a running one leaves the batch before the next step.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from ..run.batching import Engine, Scheduler
from ..run.generation import Chunk, Generation

log = logging.getLogger("qcompile.serve")

# How a job's generation is made: given the job's cancelled() callback, the checked `Generation` (its
# checks raise UserError on the caller's thread, before the job is queued).
Start = Callable[[Callable[[], bool]], Generation]

_END = object()  # the last item of every job's output


@dataclasses.dataclass
class _Failure:
    error: BaseException


class QueueFull(Exception):
    """Every place in the queue is taken; try again after `retry_after` seconds."""

    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"the server is busy: {waiting} request(s) are waiting for the model; "
                         f"retry in {retry_after} s")
        self.retry_after = retry_after


class Job:
    """One request's work: made on the event loop, run on the worker thread, its output read on the loop."""

    def __init__(self, start: Start):
        self._loop = asyncio.get_running_loop()
        self._output: asyncio.Queue[Any] = asyncio.Queue()
        self._cancelled = threading.Event()
        self.generation = start(self.is_cancelled)  # its checks raise here, before the job is queued

    def cancel(self) -> None:
        """Stop as soon as possible: answered without model work if still waiting, out of the batch
        before the next step if running."""
        self._cancelled.set()

    def is_cancelled(self) -> bool:
        return self._cancelled.is_set()

    async def output(self) -> AsyncIterator[Chunk]:
        """The chunks the work produced, in order; the work's exception, if it failed, at the end."""
        while (item := await self._output.get()) is not _END:
            if isinstance(item, _Failure):
                raise item.error
            yield item

    def _put(self, item: Any) -> None:
        """From the worker thread: hand one item to the loop (a closed loop means nobody is reading)."""
        try:
            self._loop.call_soon_threadsafe(self._output.put_nowait, item)
        except RuntimeError:
            self.cancel()


@dataclasses.dataclass
class Counts:
    """What the worker has done since it started (shown by /health)."""

    completed: int = 0  # ran to the end (stop or length)
    cancelled: int = 0  # their client went away: skipped while waiting, or stopped while running
    failed: int = 0  # raised
    rejected: int = 0  # refused with QueueFull


class ModelWorker:
    """Runs jobs in a continuous batch over `engine` on its own thread; at most `queue_size` jobs wait
    beyond the batch's free places."""

    def __init__(self, engine: Engine, queue_size: int):
        if queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {queue_size}")
        self.engine, self.queue_size = engine, queue_size
        self.counts = Counts()
        self.scheduler = Scheduler(engine)
        self._jobs: set[Job] = set()  # submitted and not yet ended
        self._recent_seconds: collections.deque[float] = collections.deque([1.0], maxlen=16)
        self._lock = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="qcompile-model", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel every running and waiting job, and end the thread (it answers them first)."""
        with self._lock:
            self._stopping = True
            for job in self._jobs:
                job.cancel()
            self._lock.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue `job` (FIFO), or raise QueueFull at once when queue_size jobs already wait beyond the
        batch's free places; a UserError when the job could never fit the engine (see Scheduler.submit)."""
        with self._lock:
            waiting, running = self.scheduler.counts()
            if self._stopping:
                raise QueueFull(waiting, self._retry_after(waiting))
            if waiting >= self.queue_size + max(0, self.engine.max_batch - running):
                self.counts.rejected += 1
                raise QueueFull(waiting, self._retry_after(waiting))
            self.scheduler.submit(job.generation, self._deliverer(job))
            self._jobs.add(job)
            self._lock.notify()

    def snapshot(self) -> dict[str, Any]:
        """The requests waiting and running, and the counts (the batch itself: engine.snapshot())."""
        with self._lock:
            waiting, running = self.scheduler.counts()
            return {"waiting": waiting, "running": running, "queue_size": self.queue_size,
                    **dataclasses.asdict(self.counts)}

    def _retry_after(self, waiting: int) -> int:
        """Seconds until a place is likely free: the recent mean request time for each batch of requests
        ahead (>= 1)."""
        mean = sum(self._recent_seconds) / len(self._recent_seconds)
        return max(1, math.ceil(mean * (waiting // max(1, self.engine.max_batch) + 1)))

    def _deliverer(self, job: Job) -> Callable[[Chunk | Exception], None]:
        """The scheduler's `deliver` for `job`: chunks to its handler; at its end, the outcome counted
        (before the handler hears the end, so /health agrees with clients) and the end marker."""
        def deliver(item: Chunk | Exception) -> None:
            if isinstance(item, Chunk) and item.finish_reason is None:
                job._put(item)
                return
            if isinstance(item, Exception):  # reported to the request's handler, which answers it
                log.error("generation failed", exc_info=item)
                job._put(_Failure(item))
                outcome = "failed"
            else:
                job._put(item)
                outcome = "cancelled" if item.finish_reason == "cancelled" else "completed"
            with self._lock:
                self._jobs.discard(job)
                setattr(self.counts, outcome, getattr(self.counts, outcome) + 1)
                if outcome == "completed":
                    self._recent_seconds.append(job.generation.prefill_seconds + job.generation.decode_seconds)
            job._put(_END)
        return deliver

    def _serve(self) -> None:
        while True:
            with self._lock:
                while self.scheduler.idle() and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    break
            if not self.scheduler.step():  # nothing could run yet (cannot last: see Scheduler.submit)
                with self._lock:
                    self._lock.wait(0.01)
        self.scheduler.step()  # stop() cancelled every job: one step answers them all, no model work
