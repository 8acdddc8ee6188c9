"""The request-body bytes a server holds in memory at once, across all connections (``MaxBufferedMB``):
past them, 429 with ``Retry-After``. With ``HttpWorkers``, the fronts share one count in memory they
all map (:class:`SharedBodyBudget`)."""

from __future__ import annotations

from typing import Any

from .errors import Overloaded, megabytes

__all__ = ["BodyBudget", "SharedBodyBudget", "Reservation"]


class BodyBudget:
    """The request-body bytes held in memory at once, across all connections (``MaxBufferedMB``).

    A request is admitted only if its Content-Length fits beside what is held now; then it holds the
    bytes that have actually arrived (growing as they come, refused with 429 if the total would pass
    the limit) until it is answered. Holding only what arrived matters: when each request held its
    declared length from the start, a few clients trickling a byte every ``BodyTimeoutS`` held the
    whole budget with almost no data, and every other upload was refused. Only the event loop touches it.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def total(self) -> int:
        """The bytes held by all who share the limit."""
        return self.held

    def check(self, size: int) -> None:
        """Raise :class:`~easyserve.errors.Overloaded` if ``size`` more bytes would not fit now."""
        if self.total() + size > self.limit:
            raise Overloaded(f"the server holds as many request bodies as it may ({megabytes(self.limit)}, "
                             "MaxBufferedMB): retry shortly", retry_after=1.0)

    def reserve(self, size: int) -> Reservation:
        """Reserve ``size`` bytes for one request (raising if they do not fit)."""
        self.check(size)
        self.held += size
        return Reservation(self, size)


# The tables of one count per front that HTTP fronts share with the server process (``fronts._Table``):
# the body bytes each holds, then the bodies each is reading.
TABLES = 2


class SharedBodyBudget(BodyBudget):
    """The :class:`BodyBudget` of one HTTP front process among several (``HttpWorkers``): each writes
    what it holds in its own slot of a table in shared memory, and admits a body only if it fits
    beside what all of them hold, so ``MaxBufferedMB`` bounds the server as a whole. (Each front
    used to get a fixed share: an upload was refused with 429 while the others held nothing, and
    with ``MaxBodyMB`` above the share, N fronts held N bodies past the limit.) Two fronts admitting
    at the same instant may pass it by what they admit then; nothing waits on a lock for it."""

    def __init__(self, limit: int, table: memoryview, index: int) -> None:
        self._table, self._index = table, index
        super().__init__(limit)

    @property
    def held(self) -> int:  # type: ignore[override]
        return self._table[self._index]

    @held.setter
    def held(self, value: int) -> None:
        self._table[self._index] = value

    def total(self) -> int:
        return sum(self._table)


class Reservation:
    """One request's share of a :class:`BodyBudget`; ``with`` gives it back."""

    def __init__(self, budget: BodyBudget, size: int) -> None:
        self.budget = budget
        self.size = size

    def grow_to(self, size: int) -> None:
        """Hold ``size`` bytes in all (no change if already as much), or raise Overloaded."""
        if size > self.size:
            self.budget.check(size - self.size)
            self.budget.held += size - self.size
            self.size = size

    def shrink_to(self, size: int) -> None:
        """Hold ``size`` bytes in all, where more were held ahead of bytes that did not come (room
        reserved for a compressed body's next inflated piece)."""
        if size < self.size:
            self.budget.held -= self.size - size
            self.size = size

    def release(self) -> None:
        self.budget.held -= self.size
        self.size = 0

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()
