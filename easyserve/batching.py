"""The request queue and the rule that turns waiting requests into batches.

Batching must never cost latency at light load: an idle worker takes what is waiting at once, unless
other workers are busy (so more requests are in flight and the batch can still grow), in which case
it holds the batch until it is full or its oldest request has waited ``MaxWaitMs``.

Requests go in arrival order, except while the queue runs late: once its oldest request has waited
``late_after_s`` (three quarters of ``TimeoutS``, unless ``QueueOrder: fifo``), batches are taken
from the newest end (adaptive LIFO). Under overload, arrival order hands every worker requests that have
already spent most of their time waiting: they run, end past their deadline, and are answered 504
all the same, while the requests that could still be answered in time wait behind them. Newest
first answers those, and the oldest get their 504 at their deadline without costing a worker any
time. Once the backlog is gone (answered, or past its deadline) the order is arrival order again.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
from typing import Any

from .errors import EasyServeError, Overloaded

__all__ = ["Pending", "BatchQueue"]


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
    queued: float = 0.0  # when it last entered the queue (arrival, or its retry after a worker died)

    def finish(self, status: int, payload: bytes | str) -> None:
        if not self.future.done():
            self.future.set_result((status, payload))
        if self.timer is not None:
            self.timer.cancel()

    def fail(self, error: EasyServeError) -> None:
        """Answer with an error: its class's status and its message (and ``Retry-After``, if it has one)."""
        if not self.future.done():
            self.retry_after = getattr(error, "retry_after", None)
        self.finish(error.status, str(error))


class BatchQueue:
    """A bounded queue of :class:`Pending` requests that hands out batches: oldest first, newest
    first while its oldest request has waited more than ``late_after_s`` (``None``: never)."""

    def __init__(self, max_size: int, max_batch_size: int, max_wait_s: float,
                 late_after_s: float | None = None) -> None:
        self.max_size = max_size
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.late_after_s = late_after_s
        self.newest_first = 0  # batches taken from the newest end
        self.late = False  # whether the last batch was taken newest first
        self._items: collections.deque[Pending] = collections.deque()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Pending) -> None:
        """Add a request; raises :class:`Overloaded` when the queue is full."""
        if len(self._items) >= self.max_size:
            raise Overloaded(f"server is at capacity: {self.max_size} requests are already waiting (MaxQueueSize)")
        item.queued = item.arrived
        self._items.append(item)

    def put_front(self, items: list[Pending], now: float | None = None) -> None:
        """Put requests back at the head (a retry after a worker died, at loop time ``now``); never refused."""
        for item in items:
            item.queued = item.arrived if now is None else now
        self._items.extendleft(reversed(items))

    def oldest_wait(self, now: float) -> float:
        """Seconds the request longest in the queue has waited; 0 when it is empty."""
        return now - self._items[0].queued if self._items else 0.0

    def remove(self, item: Pending) -> None:
        try:
            self._items.remove(item)
        except ValueError:
            pass

    def clear(self) -> list[Pending]:
        items = list(self._items)
        self._items.clear()
        return items

    def take(self, now: float, others_busy: bool, solo: bool = True) -> list[Pending] | float | None:
        """The next batch to run now; else the loop time at which it is due; ``None`` when empty, or
        when the next request must run alone (a retry) and ``solo`` is false."""
        items = self._items
        if not items:
            return None
        if items[0].solo:  # retries are put at the head (put_front): they go first in either order
            return [items.popleft()] if solo else None
        if (self.late_after_s is not None and len(items) > self.max_batch_size
                and self.oldest_wait(now) > self.late_after_s):
            self.newest_first += 1
            self.late = True
            batch = [items.pop() for _ in range(self.max_batch_size)]  # no retry among them: those lead
            batch.reverse()
            return batch
        n = 0
        for item in itertools.islice(items, self.max_batch_size):
            if item.solo:
                break
            n += 1
        could_grow = n < self.max_batch_size and n == len(items)
        if could_grow and others_busy and self.max_wait_s > 0:
            due = items[0].arrived + self.max_wait_s
            if now < due:
                return due
        self.late = False
        return [items.popleft() for _ in range(n)]
