"""What a request costs the server's event loop, by how many requests a second it serves.

The built-in ``Echo`` handle on 2 CPU workers (MaxBatchSize 2), its ``forward`` sleeping ``delay_ms``
per batch like a model whose work happens elsewhere, driven by ``easyserve.bench`` at concurrency 8
with the demo model's small JSON body. The delay sets the rate (no delay: thousands of requests a
second; 31 ms: about the ResNet-18 example's 60 on 2 cores), and the table gives the event loop's
CPU time per answer (``/stats`` ``cpu_s.server``, the bench's srv cpu column). The same code runs
per request at every rate, so a cost that grows as the rate falls is the price of running cold:
between two requests the core sleeps or runs other processes, and comes back to the loop's code and
data with its caches holding something else (or, in a virtual machine, after the host has run
others); which of these it is, this does not tell apart::

    python benchmarks/server_cost.py                         # delays 0, 5, 31 and 100 ms, 2 rounds
    python benchmarks/server_cost.py --delays 0,31 --rounds 4 --duration 10
    python benchmarks/server_cost.py --delays 0 --payload big.json        # a body of your own
"""

from __future__ import annotations

import argparse
import statistics

import logging

import easyserve
from easyserve import Server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delays", default="0,5,31,100", type=lambda s: [float(x) for x in s.split(",")],
                        help="ms each batch's forward sleeps")
    parser.add_argument("--rounds", type=int, default=2, help="each over every delay, the order reversed in turn")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--payload", help="a .json file to send instead of the demo's small body (see bench)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)  # the servers' start and stop lines would come between the rounds
    found: dict[float, list[tuple[float, float]]] = {delay: [] for delay in args.delays}
    for round_ in range(args.rounds):
        for delay in args.delays if round_ % 2 == 0 else reversed(args.delays):
            with Server(GPUs="cpu", ProcessPerGPU=2, MaxBatchSize=2, Handle="easyserve.builtin:Echo",
                        HandleArgs={"delay_ms": delay}, Port=0) as server:
                run = easyserve.bench(server.url, concurrency=args.concurrency, duration=args.duration, warmup=2,
                                      payload=args.payload, progress=False).runs[0]
            found[delay].append((run.requests_per_s, run.server_cores / run.requests_per_s * 1e6))
            print(f"round {round_}, delay {delay:g} ms: {run.requests_per_s:,.1f} req/s, "
                  f"{found[delay][-1][1]:,.0f} CPU-us a request", flush=True)
    print(f"\nEcho on 2 CPU workers, MaxBatchSize 2, concurrency {args.concurrency}; medians of {args.rounds} "
          f"rounds of {args.duration:g} s\n")
    print("| forward sleeps | req/s | event loop CPU-us a request |")
    print("|---:|---:|---:|")
    for delay, runs in found.items():
        print(f"| {delay:g} ms | {statistics.median(r for r, _ in runs):,.1f} | "
              f"{statistics.median(c for _, c in runs):,.0f} |")


if __name__ == "__main__":
    main()
