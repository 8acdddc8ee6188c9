"""Overload: more requests than the workers can answer within ``TimeoutS``. How many are answered in
time, and how much of the workers' time goes to requests answered 504 all the same?

One server (``easyserve run``, CPU workers) runs a handle whose ``forward`` sleeps ``--run-s`` a
request, one request a batch (``MaxBatchSize: 1``), ``TimeoutS: 2``. ``--clients`` closed-loop
clients send ``--requests`` requests in all, each waiting for its answer before it sends the next:
with the defaults, three times what the server answers in ``TimeoutS``. With ``--rate``, an open loop
instead: requests arrive at that rate (Poisson) whatever the answers. The queue never fills, so
every request is queued and answered 200 or 504. Each request appends a line to a file as it runs,
so the runs are counted, not guessed: a run whose request was answered 504 was wasted, and a
worker killed as stuck shows as a restart in ``/stats``.

The server runs the easyserve that ``PYTHONPATH`` finds first, so an older commit (in a worktree) is
measured the same way::

    git worktree add /tmp/easyserve-before 6eb0dfd
    cd /tmp && PYTHONPATH=/tmp/easyserve-before python /path/to/benchmarks/overload.py
    cd /tmp && PYTHONPATH=/path/to/easyserve python /path/to/benchmarks/overload.py
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_http_workers import served_from_the_shell  # noqa: E402

import easyserve  # noqa: E402

HANDLE = '''
import os, time
from easyserve import Handle

class Sleepy(Handle):
    """Sleeps each request's "sleep" seconds in forward, and notes each run in $OVERLOAD_RUNS."""

    def forward(self, batch):
        for info in batch:
            time.sleep(info["sleep"])
            with open(os.environ["OVERLOAD_RUNS"], "a") as runs:
                runs.write(f"{info['n']}\\n")
        return [{"n": info["n"]} for info in batch]
'''


async def drive(url: str, clients: int, requests: int, run_s: float, rate: float | None = None,
                burst: int = 0) -> dict:
    statuses: collections.Counter = collections.Counter()
    late_after_running = 0
    answered_in_time = []  # seconds each 200 took
    served = collections.Counter()  # 200s by client
    numbers = iter(range(requests))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        async def client(me: int, once: bool = False) -> None:
            nonlocal late_after_running
            for n in numbers:
                sent = time.monotonic()
                async with session.post(url + "/predict", json={"n": n, "sleep": run_s}) as response:
                    body = await response.json()
                    statuses[response.status] += 1
                    late_after_running += response.status == 504 and " ran " in body["error"]
                    if response.status == 200:
                        answered_in_time.append(time.monotonic() - sent)
                        served[me] += 1
                if once:
                    break

        if rate is None:
            await asyncio.gather(*(client(me) for me in range(clients)))
        else:  # an open loop: ``burst`` requests at once, then one every 1/rate s (Poisson), each its own client
            arrivals = random.Random(5)
            sending = [asyncio.ensure_future(client(me, once=True)) for me in range(burst)]
            for me in range(burst, requests):
                sending.append(asyncio.ensure_future(client(me, once=True)))
                await asyncio.sleep(arrivals.expovariate(rate))
            await asyncio.gather(*sending)
    answered_in_time.sort()
    return {"statuses": dict(statuses), "504 after running": late_after_running,
            "200 median s": answered_in_time[len(answered_in_time) // 2] if answered_in_time else None,
            "clients answered": len(served)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--requests", type=int, default=133)
    parser.add_argument("--run-s", type=float, default=0.15)
    parser.add_argument("--rate", type=float,
                        help="an open loop instead: requests a second (Poisson arrivals), --clients unused")
    parser.add_argument("--burst", type=int, default=0, help="with --rate: this many of the requests at once, first")
    parser.add_argument("--timeout-s", type=float, default=2.0, help="the server's TimeoutS")
    parser.add_argument("--pipeline", choices=["true", "false"],
                        help="Pipeline for the server (on CPU workers it is off unless set)")
    parser.add_argument("--queue-order", choices=["deadline", "fifo"],
                        help="QueueOrder for the server (leave it out for versions without the key)")
    args = parser.parse_args()
    print(f"serving from {Path(easyserve.__file__).parent.parent}")
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "sleepy.py").write_text(HANDLE)
        runs = folder / "runs.txt"
        runs.touch()
        os.environ["OVERLOAD_RUNS"] = str(runs)
        config = {"Handle": f"{folder / 'sleepy.py'}:Sleepy", "MaxBatchSize": 1, "TimeoutS": args.timeout_s}
        if args.queue_order:
            config["QueueOrder"] = args.queue_order
        if args.pipeline:
            config["Pipeline"] = args.pipeline == "true"
        with served_from_the_shell(folder, **config) as (proc, url):
            started = time.monotonic()
            outcome = asyncio.run(drive(url, args.clients, args.requests, args.run_s, args.rate, args.burst))
            took = time.monotonic() - started
            time.sleep(1)  # a run still under way ends, and is written
            with urllib.request.urlopen(url + "/stats") as response:
                stats = json.load(response)
        ran = runs.read_text().split()
    in_time = outcome["statuses"].get(200, 0)
    source = f"{args.clients} clients" if args.rate is None else f"an open loop at {args.rate:g}/s"
    if args.burst and args.rate is not None:
        source += f" after a burst of {args.burst}"
    print(f"{args.requests} requests from {source} in {took:.1f} s: {outcome['statuses']}")
    print(f"answered in time: {in_time}; runs: {len(ran)} ({len(ran) - len(set(ran))} of a request run before), "
          f"wasted (answered 504): {len(ran) - in_time}; 504 after running: {outcome['504 after running']}; "
          f"workers killed and restarted: {stats['restarts']}")
    median = outcome["200 median s"]
    print(f"a 200 took {'-' if median is None else f'{median:.2f} s'} (median); "
          + (f"clients answered at least once: {outcome['clients answered']} of {args.clients}; "
             if args.rate is None else "")
          + f"requests passed over: {stats.get('passed_over', '-')}")


if __name__ == "__main__":
    main()
