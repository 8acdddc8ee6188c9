"""The queue's order under overload, simulated: easyserve's own ``BatchQueue`` driven as the pool and the
watchdog drive it (workers take batches when idle, a request still queued at its deadline gets its
504 there, one that ends past it gets a 504 too), on a simulated clock, so hundreds of workloads run
in seconds. It compares ``QueueOrder: fifo`` (arrival order) with ``deadline`` (a request that the
quickest recent batch could not answer in time is passed over while one behind it can).

The workloads: closed loops (each client sends its next request once answered) and open loops (Poisson
arrivals) above and below capacity, bursts followed by a stream below capacity, and a random sweep of
all of these with 1-3 workers, batches of 1-8 and run times with jitter. What ``benchmarks/overload.py``
measures on a real server, this covers more widely; the two agree where they overlap (RESULTS.md).
It leaves out what the pool adds: batches handed ahead to pipelined workers, and a process's first
batch not counted (both measured on the server instead)::

    python benchmarks/queue_order.py
"""

from __future__ import annotations

import heapq
import itertools
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from easyserve.batching import BatchQueue, Pending  # noqa: E402


class _Answer:
    """What the queue needs of a request's future: whether it has been answered."""

    def __init__(self) -> None:
        self.answered = False

    def done(self) -> bool:
        return self.answered


def simulate(order: str, timeout_s: float = 2.0, run_s: float = 0.05, burst: int = 0, rate: float = 0.0,
             seconds: float = 10.0, workers: int = 1, batch: int = 1, clients: int = 0, requests: int = 0,
             jitter: float = 0.0, seed: int = 1) -> dict:
    """Requests answered in time, answered 504 after running, and answered 504 in the queue, with the
    median time a 200 took. A batch of n runs ``run_s * n`` seconds, times up to ``1 + jitter``."""
    chance = random.Random(seed)
    queue = BatchQueue(1_000_000, batch, 0.002, pass_over_late=order == "deadline")
    events: list = []
    ticket = itertools.count()

    def arrive(at: float) -> None:
        heapq.heappush(events, (at, next(ticket), "arrive", None))

    for _ in range(burst):
        arrive(0.0)
    at = 0.0
    while rate and at < seconds:
        at += chance.expovariate(rate)
        arrive(at)
    for _ in range(clients):
        arrive(0.0)
    sent, idle = clients, workers
    tally = {"in time": 0, "ran late": 0, "expired": 0}
    took: list[float] = []

    def answered(now: float) -> None:  # a closed loop's client sends its next request
        nonlocal sent
        if clients and sent < requests:
            sent += 1
            arrive(now)

    def pump(now: float) -> None:
        nonlocal idle
        while idle:
            taken = queue.take(now, idle < workers)
            if taken is None or isinstance(taken, float):
                return
            idle -= 1
            for pending in taken:
                pending.started = now
            seconds_run = run_s * len(taken) * (1 + chance.uniform(0, jitter))
            heapq.heappush(events, (now + seconds_run, next(ticket), "done", (taken, seconds_run)))

    while events:
        now, _, kind, what = heapq.heappop(events)
        if kind == "arrive":
            pending = Pending("", None, _Answer(), now, now + timeout_s)
            queue.put(pending)
            heapq.heappush(events, (pending.deadline, next(ticket), "deadline", pending))
        elif kind == "deadline":
            if not what.future.done() and what.started is None:
                queue.remove(what)
                what.future.answered = True
                tally["expired"] += 1
                answered(now)
        else:
            taken, seconds_run = what
            idle += 1
            queue.ran(seconds_run)
            for pending in taken:
                pending.future.answered = True
                if now <= pending.deadline:
                    tally["in time"] += 1
                    took.append(now - pending.arrived)
                else:
                    tally["ran late"] += 1
                answered(now)
        pump(now)
    took.sort()
    return {**tally, "median 200 s": round(took[len(took) // 2], 2) if took else None}


CASES = {
    "closed loop: 20 clients, 133 requests, 0.15 s each, TimeoutS 2": dict(run_s=0.15, clients=20, requests=133),
    "the same, run times +0-20%": dict(run_s=0.15, clients=20, requests=133, jitter=0.2),
    "open loop at 1.5x capacity (10/s, 0.15 s each)": dict(run_s=0.15, rate=10, seconds=20),
    "open loop at 1.05x (7/s)": dict(run_s=0.15, rate=7, seconds=28),
    "open loop at 0.9x (6/s)": dict(run_s=0.15, rate=6, seconds=33),
    "burst of 24, then 6/s (0.6x), 0.1 s each, TimeoutS 3": dict(timeout_s=3, run_s=0.1, burst=24, rate=6),
    "burst of 24, then 8/s (0.8x)": dict(timeout_s=3, run_s=0.1, burst=24, rate=8),
    "2 workers, batches of 4: burst of 64, then 24/s (0.6x)": dict(burst=64, rate=24, workers=2, batch=4),
    "2 workers, batches of 4: open loop at 1.5x (60/s)": dict(rate=60, workers=2, batch=4, seconds=20),
}


def main() -> None:
    for name, case in CASES.items():
        print(name)
        for order in ("fifo", "deadline"):
            print(f"  {order:8} {simulate(order, **case)}")
    pick = random.Random(7)
    fewer, cases = [], 0
    for seed in range(400):
        case = dict(timeout_s=pick.choice([1.0, 2.0, 3.0]), run_s=pick.choice([0.02, 0.05, 0.1, 0.2]),
                    burst=pick.choice([0, 8, 24, 64]), rate=pick.choice([0, 3, 6, 9, 12, 20, 40]),
                    seconds=pick.choice([5, 10]), workers=pick.choice([1, 2, 3]), batch=pick.choice([1, 2, 4, 8]),
                    jitter=pick.choice([0, 0.2, 0.5]), seed=seed)
        if not case["burst"] and not case["rate"]:
            continue
        cases += 1
        fifo, deadline = simulate("fifo", **case)["in time"], simulate("deadline", **case)["in time"]
        if deadline < fifo:
            fewer.append((fifo, deadline, case))
    print(f"random sweep: {cases} workloads; deadline answered fewer in time than fifo in {len(fewer)}")
    for fifo, deadline, case in fewer:
        print(f"  fifo {fifo}, deadline {deadline}: {case}")


if __name__ == "__main__":
    main()
