"""The batching rule, driven with explicit clock values."""

from __future__ import annotations

import asyncio

import pytest

from easyserve import Overloaded
from easyserve.batching import BatchQueue, Pending


def make(n: int, arrived: float = 0.0, solo: bool = False) -> list[Pending]:
    loop = asyncio.new_event_loop()
    try:
        return [Pending(str(i), {}, loop.create_future(), arrived, arrived + 30, solo=solo) for i in range(n)]
    finally:
        loop.close()


def test_lone_request_goes_at_once_even_with_a_wait_window():
    queue = BatchQueue(10, max_batch_size=8, max_wait_s=1.0)
    queue.put(make(1)[0])
    assert len(queue.take(now=0.0, others_busy=False)) == 1


def test_batch_is_held_only_while_it_can_still_grow():
    queue = BatchQueue(100, max_batch_size=4, max_wait_s=0.01)
    for item in make(3, arrived=1.0):
        queue.put(item)
    assert queue.take(now=1.001, others_busy=True) == pytest.approx(1.01)  # other workers busy: wait to fill
    assert len(queue.take(now=1.001, others_busy=False)) == 3  # nobody else busy: waiting gains nothing
    for item in make(6, arrived=2.0):
        queue.put(item)
    assert len(queue.take(now=2.0, others_busy=True)) == 4  # full: goes at once
    assert queue.take(now=2.0, others_busy=True) == pytest.approx(2.01)
    assert len(queue.take(now=2.02, others_busy=True)) == 2  # the window has passed


def test_a_batch_due_within_a_floats_rounding_of_now_goes_now():
    # arrived at a loop time of whole milliseconds, plus 2 ms: due a float's rounding past the clock's 4843.003,
    # when its timer runs; found not due, the timer was set again, hundreds of times in that millisecond
    queue = BatchQueue(100, max_batch_size=4, max_wait_s=0.002)
    for item in make(2, arrived=4843.001):
        queue.put(item)
    due = queue.take(now=4843.002, others_busy=True)
    assert due == pytest.approx(4843.003) and due > 4843.003
    assert len(queue.take(now=4843.003, others_busy=True)) == 2


def test_max_wait_zero_never_holds():
    queue = BatchQueue(100, max_batch_size=4, max_wait_s=0)
    for item in make(2):
        queue.put(item)
    assert len(queue.take(now=0.0, others_busy=True)) == 2


def test_retried_requests_run_alone_and_first():
    queue = BatchQueue(100, max_batch_size=8, max_wait_s=0)
    normal = make(3)
    retried = make(2, solo=True)
    for item in normal:
        queue.put(item)
    queue.put_front(retried)
    assert queue.take(0.0, False) == [retried[0]]
    assert queue.take(0.0, False) == [retried[1]]
    assert queue.take(0.0, False) == normal


def test_full_queue_refuses_but_retries_always_fit():
    queue = BatchQueue(2, max_batch_size=8, max_wait_s=0)
    first, second, third = make(3)
    queue.put(first)
    queue.put(second)
    with pytest.raises(Overloaded, match="MaxQueueSize"):
        queue.put(third)
    queue.put_front(make(1, solo=True))
    assert len(queue) == 3


def test_a_retry_is_never_handed_to_a_worker_as_its_next_batch():
    queue = BatchQueue(100, max_batch_size=8, max_wait_s=0)
    retried = make(1, solo=True)
    queue.put_front(retried)
    assert queue.take(0.0, True, solo=False) is None  # it waits for an idle worker
    assert queue.take(0.0, True) == retried


def test_requests_that_cannot_be_answered_in_time_are_passed_over_while_others_can():
    """A request with less time left than the quickest recent batch took is passed over (it stays at the
    head, to get its 504 at its deadline) while one behind it can be answered in time."""
    queue = BatchQueue(100, max_batch_size=2, max_wait_s=0, pass_over_late=True)
    old, newer = make(3, arrived=0.0), make(3, arrived=1.0)  # deadlines 30 and 31
    for item in old + newer:
        queue.put(item)
    assert queue.take(now=29.0, others_busy=False) == old[:2]  # nothing ran yet: no guess, arrival order
    queue.ran(0.5)
    queue.ran(2.0)  # the quickest of the recent batches counts: 0.5 s
    assert queue.take(now=29.6, others_busy=False) == newer[:2]  # old[2] has 0.4 s left
    assert queue.late and queue.passed_over == 1
    assert queue.take(now=29.6, others_busy=False) == [newer[2]]  # passed over again, counted once
    assert queue.passed_over == 1
    assert queue.take(now=29.7, others_busy=False) == [old[2]]  # nothing else left: it goes, the guess may be wrong
    assert not queue.late


def test_a_fifo_queue_never_passes_a_request_over():
    queue = BatchQueue(100, max_batch_size=2, max_wait_s=0, pass_over_late=False)
    items = make(5)
    for item in items:
        queue.put(item)
    queue.ran(5.0)
    assert [queue.take(now=29.0, others_busy=False) for _ in range(3)] == [items[:2], items[2:4], items[4:]]
    assert queue.passed_over == 0


def test_retries_lead_even_when_they_cannot_be_answered_in_time_and_the_wait_counts_past_those_passed_over():
    queue = BatchQueue(100, max_batch_size=4, max_wait_s=1.0, pass_over_late=True)
    late, fresh = make(1, arrived=0.0), make(2, arrived=29.5)
    for item in late + fresh:
        queue.put(item)
    retried = make(1, solo=True)  # deadline 30
    queue.put_front(retried)
    queue.ran(0.5)
    assert queue.take(now=29.8, others_busy=False) == retried  # first and alone, whatever its time left
    # past the late one, the batch could still grow: it waits out MaxWaitMs from its own oldest request
    assert queue.take(now=29.8, others_busy=True) == pytest.approx(30.5)
    assert queue.take(now=29.8, others_busy=False) == fresh
    assert queue.take(now=29.8, others_busy=False) == late


def test_a_batch_that_starts_later_needs_the_time_left_from_then():
    """A batch handed to a busy worker (Pipeline) starts once the worker's batch ends: a request with
    time for one batch from now, but not from then, is passed over for one that has it."""
    queue = BatchQueue(100, max_batch_size=1, max_wait_s=0, pass_over_late=True)
    soon, later = make(1, arrived=0.0), make(1, arrived=1.0)  # deadlines 30 and 31
    for item in soon + later:
        queue.put(item)
    queue.ran(0.5)
    assert queue.quickest() == 0.5
    assert queue.take(now=29.4, others_busy=True, solo=False, starts_in=0.5) == later
    assert queue.take(now=29.4, others_busy=False) == soon  # from now it has the time
