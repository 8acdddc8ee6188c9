"""The request queue and the rule that turns waiting requests into batches.

Batching must never cost latency at light load: an idle worker takes what is waiting at once, unless
other workers are busy (so more requests are in flight and the batch can still grow), in which case
it holds the batch until it is full or its oldest request has waited ``MaxWaitMs``.

Requests go in arrival order, except that, unless ``QueueOrder: fifo``, a request with less time
left before its deadline than the quickest of the last batches took is passed over while one that
can still be answered in time waits behind it. Under overload, arrival order hands every worker
requests that have already spent most of their time waiting: they run, end past their deadline, and
are answered 504 all the same, while those that could be answered in time wait behind them. Passed
over, such a request gets its 504 at its deadline without costing a worker anything, and it still
runs if nothing else can (the guess of a batch's cost may be wrong). Since every request has the same
``TimeoutS``, deadlines are in arrival order: those passed over are the oldest, at the head.
(Newest first while the queue ran late, adaptive LIFO, was tried first: after a burst that arrival
order cleared in time it let the burst's last requests reach their deadline, 4-15% of them.)
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import time
from typing import Any, Callable

from .errors import EasyServeError, Overloaded

__all__ = ["Pending", "BatchQueue"]

RECENT_BATCHES = 32  # the batches whose quickest run time tells which requests can still be answered in time
# A due time within this of now is now: an arrival plus MaxWaitMs lands a float's rounding past the loop's
# clock (uvloop's counts milliseconds), and its timer, run in that millisecond, found the batch not due
# and set itself again, 150-200 times a hold
DUE_SLACK_S = 1e-6


@dataclasses.dataclass(eq=False)
class Pending:
    """One request on its way through the server. ``future`` gets ``(status, JSON bytes or message)``."""

    task_id: str
    task_info: Any
    future: asyncio.Future
    arrived: float
    deadline: float
    attempts: int = 0
    started: float | None = None
    # Set once a worker died under this request: it then runs alone, so it cannot take others down.
    solo: bool = False
    timer: asyncio.TimerHandle | None = None
    retry_after: float | None = None  # with a 429 or 503: when the client may try again
    passed_over: bool = False  # a batch was taken past it: it could not be answered in time (BatchQueue.take)
    # what the client, the log and the handle call it: the client's X-Request-Id, else one of the server's
    request_id: str = ""
    query: str = ""  # the URL's query string, as sent (the handle's task["parameters"], parsed in the worker)
    headers: tuple | None = None  # the (name, value) pairs of PassHeaders it came with (task["headers"])
    items: int = 1  # the items it holds (an inference request may hold a batch), which it weighs in a batch
    # for the statistics extension, on a clock finer than the event loop's (uvloop's counts milliseconds):
    # when it arrived, when it last entered the queue, and its seconds in the queue, all its stays together
    clock: float = dataclasses.field(default_factory=time.perf_counter)
    entered: float = 0.0
    waited: float = 0.0
    gone: bool = False  # its client left before its answer
    unread: bool = False  # refused as the worker read it (a large body, malformed): it never reached the handle
    # called with it and its status once it is answered (the statistics extension's count): here, where
    # every answer is set, and not as the future's callback, which cost each request a turn of the loop
    answered: Callable[[Pending, int], None] | None = None

    def finish(self, status: int, payload: bytes | str) -> None:
        if not self.future.done():
            self.future.set_result((status, payload))
            if self.answered is not None:
                self.answered(self, status)
        if self.timer is not None:
            self.timer.cancel()

    def fail(self, error: EasyServeError) -> None:
        """Answer with an error: its class's status and its message (and ``Retry-After``, if it has one)."""
        if not self.future.done():
            self.retry_after = getattr(error, "retry_after", None)
        self.finish(error.status, str(error))


class BatchQueue:
    """A bounded queue of :class:`Pending` requests that hands out batches, oldest first; with
    ``pass_over_late``, a request that cannot be answered in time by the quickest of the last
    batches (:meth:`ran`) is passed over while one behind it can."""

    def __init__(self, max_size: int, max_batch_size: int, max_wait_s: float, pass_over_late: bool = False) -> None:
        self.max_size = max_size
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.pass_over_late = pass_over_late
        self.passed_over = 0  # requests passed over, each counted once
        self.late = False  # whether the last batch was taken past requests that could not be answered in time
        self._items: collections.deque[Pending] = collections.deque()
        self._recent: collections.deque[float] = collections.deque(maxlen=RECENT_BATCHES)  # seconds each ran

    def __len__(self) -> int:
        return len(self._items)

    def full(self) -> Overloaded | None:
        """The 429 for a request that comes while the queue is full; ``None`` while there is room."""
        if len(self._items) >= self.max_size:
            return Overloaded(f"server is at capacity: {self.max_size} requests are already waiting (MaxQueueSize)")
        return None

    def put(self, item: Pending) -> None:
        """Add a request; raises :class:`Overloaded` when the queue is full."""
        full = self.full()
        if full is not None:
            raise full
        item.entered = time.perf_counter()
        self._items.append(item)

    def put_front(self, items: list[Pending]) -> None:
        """Put requests back at the head (a retry after a worker died); never refused."""
        entered = time.perf_counter()
        for item in items:
            item.entered = entered
        self._items.extendleft(reversed(items))

    def ran(self, seconds: float) -> None:
        """A batch ran for ``seconds``."""
        self._recent.append(seconds)

    def quickest(self) -> float:
        """The quickest of the last batches' run times; 0 before any (or with ``QueueOrder: fifo``)."""
        return min(self._recent) if self.pass_over_late and self._recent else 0.0

    def forget_run_times(self) -> None:
        """The model changed (a reload): what its batches cost is not known any more."""
        self._recent.clear()

    def remove(self, item: Pending) -> bool:
        """Take ``item`` out of the queue; whether it was in it."""
        try:
            self._items.remove(item)
        except ValueError:
            return False
        return True

    def clear(self) -> list[Pending]:
        items = list(self._items)
        self._items.clear()
        return items

    def take(self, now: float, others_busy: bool, solo: bool = True,
             starts_in: float = 0.0) -> list[Pending] | float | None:
        """The next batch to run, ``starts_in`` seconds from now (one handed to a busy worker starts
        once its batch ends); else the loop time at which it is due; ``None`` when empty, or when the
        next request must run alone (a retry) and ``solo`` is false."""
        items = self._items
        # Past their deadline, their 504 due: its timer, run late with a loop held past it (a paused
        # machine), looks again once what came meanwhile is read, and this may run first. Handed out,
        # such a request held a worker for a batch whose answer nobody would get, while requests still in
        # time waited behind it. Whatever QueueOrder says: fifo runs late requests, not answered ones.
        expired = 0
        for item in items:
            if item.deadline > now:
                break
            expired += 1
        if expired == len(items):
            return None
        if items[expired].solo:  # retries are put at the head (put_front): they go first, alone
            if not solo:
                return None
            items.rotate(-expired)
            batch = [items.popleft()]
            items.rotate(expired)
            return batch
        start = max(expired, self._past_the_late(now + starts_in))
        n = weight = 0  # requests, and the items they hold: at most max_batch_size, unless the first holds more
        for item in itertools.islice(items, start, start + self.max_batch_size):
            if item.solo or n and weight + item.items > self.max_batch_size:
                break
            n += 1
            weight += item.items
        could_grow = weight < self.max_batch_size and start + n == len(items)
        if could_grow and others_busy and self.max_wait_s > 0:
            due = items[start].arrived + self.max_wait_s
            if due - now > DUE_SLACK_S:
                return due
        self.late = start > expired
        for item in itertools.islice(items, expired, start):
            if not item.passed_over:
                item.passed_over = True
                self.passed_over += 1
        items.rotate(-start)  # those passed over go to the back for a moment, and then back to the head
        batch = [items.popleft() for _ in range(n)]
        items.rotate(start)
        return batch

    def _past_the_late(self, start: float) -> int:
        """How many requests at the head cannot be answered in time by the quickest recent batch begun
        at ``start``, if a request behind them can; else 0 (none can: the oldest still goes, as the
        guess may be wrong; or none known yet)."""
        quickest = self.quickest()
        if not quickest:
            return 0
        for index, item in enumerate(self._items):
            if item.deadline - start >= quickest:
                return index
        return 0
