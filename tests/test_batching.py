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


def test_a_late_queue_hands_out_its_newest_requests_first():
    """Once the oldest request has waited past late_after_s, batches come from the newest end (in
    arrival order within the batch); once no more than a batch is left, arrival order again."""
    queue = BatchQueue(100, max_batch_size=2, max_wait_s=0, late_after_s=1.0)
    items = make(5)
    for item in items:
        queue.put(item)
    assert queue.take(now=0.5, others_busy=False) == items[:2]  # not late yet: oldest first
    assert not queue.late and queue.newest_first == 0
    assert queue.oldest_wait(1.5) == 1.5
    assert queue.take(now=1.5, others_busy=False) == items[3:]
    assert queue.late and queue.newest_first == 1
    assert queue.take(now=1.6, others_busy=True) == [items[2]]  # a batch or less left: it all goes
    assert not queue.late


def test_a_fifo_queue_never_reorders():
    queue = BatchQueue(100, max_batch_size=2, max_wait_s=0, late_after_s=None)
    items = make(5)
    for item in items:
        queue.put(item)
    assert [queue.take(now=100.0, others_busy=False) for _ in range(3)] == [items[:2], items[2:4], items[4:]]
    assert queue.newest_first == 0


def test_retries_lead_a_late_queue_and_its_lateness_is_read_past_them():
    queue = BatchQueue(100, max_batch_size=2, max_wait_s=0, late_after_s=1.0)
    normal = make(4)
    for item in normal:
        queue.put(item)
    retried = make(1, solo=True)
    queue.put_front(retried, now=5.0)
    assert queue.take(now=5.0, others_busy=False) == retried  # first and alone, however late the queue
    assert queue.take(now=5.0, others_busy=False) == normal[2:]  # then the newest: the oldest waited 5 s
    assert queue.take(now=5.0, others_busy=False) == normal[:2]
