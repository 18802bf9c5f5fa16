"""The bounded admission queue and the one worker thread that owns the model.

The runtime runs one sequence at a time and its calls block, so the model lives on one thread: requests
become `Job`s, wait in a bounded FIFO, and run one after another. The event loop never blocks on the
model: submitting is a short locked append (or an immediate `QueueFull`, answered 429), and what a job
produces travels back to the loop through `call_soon_threadsafe` into an asyncio queue the request's
handler reads. A job is cancelled by its handler when the client goes away: a waiting job is skipped,
a running one sees it in its `cancelled()` callback (checked before every decode step) and stops.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

log = logging.getLogger("qcompile.serve")

# How a job starts: given its cancelled() callback, the iterable of the items it produces. Called at
# once, on the caller's thread, so it must only check and set up (e.g. generation.generate(), which
# checks the request and returns a lazy iterator); iterating it, the model's work, runs on the worker.
Start = Callable[[Callable[[], bool]], Iterable[Any]]

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
        self._items = start(self.is_cancelled)  # its checks raise here, before the job is queued

    def cancel(self) -> None:
        """Stop as soon as possible: skipped if still waiting, stopped at the next step if running."""
        self._cancelled.set()

    def is_cancelled(self) -> bool:
        return self._cancelled.is_set()

    async def output(self) -> AsyncIterator[Any]:
        """The items the work produced, in order; the work's exception, if it raised, at the end."""
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

    def _run(self) -> str:
        """Run the work to its end, handing over every item but the end marker; the outcome for Counts:
        "completed", "cancelled" (it saw cancel() before its end) or "failed"."""
        if self.is_cancelled():
            return "cancelled"
        try:
            for item in self._items:
                self._put(item)
        except Exception as e:  # reported to the request's handler, which answers it; the worker lives on
            log.exception("generation failed")
            self._put(_Failure(e))
            return "failed"
        return "cancelled" if self.is_cancelled() else "completed"


@dataclasses.dataclass
class Counts:
    """What the worker has done since it started (shown by /health)."""

    completed: int = 0  # ran to the end (stop or length)
    cancelled: int = 0  # their client went away: skipped while waiting, or stopped while running
    failed: int = 0  # raised
    rejected: int = 0  # refused with QueueFull


class ModelWorker:
    """Runs jobs one at a time on its own thread; at most `queue_size` jobs wait beside the running one."""

    def __init__(self, queue_size: int):
        if queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {queue_size}")
        self.queue_size = queue_size
        self.counts = Counts()
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: Job | None = None
        self._recent_seconds: collections.deque[float] = collections.deque([1.0], maxlen=16)
        self._lock = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="qcompile-model", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running job and every waiting one, and end the thread."""
        with self._lock:
            self._stopping = True
            for job in [*self._waiting, *([self._running] if self._running else [])]:
                job.cancel()
            self._lock.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue `job` (FIFO), or raise QueueFull at once when queue_size jobs already wait."""
        with self._lock:
            if self._stopping:
                raise QueueFull(len(self._waiting), self._retry_after())
            busy = len(self._waiting) + (self._running is not None)
            if busy > self.queue_size:
                self.counts.rejected += 1
                raise QueueFull(len(self._waiting), self._retry_after())
            self._waiting.append(job)
            self._lock.notify()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"waiting": len(self._waiting), "running": int(self._running is not None),
                    "queue_size": self.queue_size, **dataclasses.asdict(self.counts)}

    def _retry_after(self) -> int:
        """Seconds until a place is likely free: the recent mean job time times the jobs ahead (>= 1)."""
        mean = sum(self._recent_seconds) / len(self._recent_seconds)
        return max(1, math.ceil(mean * (len(self._waiting) + 1)))

    def _next(self) -> Job | None:
        with self._lock:
            while not self._waiting and not self._stopping:
                self._lock.wait()
            if self._stopping:
                for job in self._waiting:
                    job._put(_END)  # their handlers finish (they were cancelled by stop())
                self._waiting.clear()
                return None
            self._running = self._waiting.popleft()
            return self._running

    def _serve(self) -> None:
        while (job := self._next()) is not None:
            start = time.perf_counter()
            outcome = job._run()
            with self._lock:  # counted before the handler hears the end, so /health agrees with clients
                self._running = None
                setattr(self.counts, outcome, getattr(self.counts, outcome) + 1)
                if outcome == "completed":
                    self._recent_seconds.append(time.perf_counter() - start)
            job._put(_END)
