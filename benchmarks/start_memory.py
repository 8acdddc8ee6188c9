"""What a start costs in memory and time with the workers loading their handle all at once, or
``StartsPerGPU`` at a time.

Each of ``--workers`` CPU workers (one device) runs ``handles_bench:Loads``, whose setup reads a
``--load-mb`` checkpoint, keeps ``--keep-mb`` of it and takes ``--load-s``. The workers' resident
memory, summed, is sampled every 20 ms from the start's first moment until it returns::

    python benchmarks/start_memory.py --workers 4 --load-mb 400 --keep-mb 100 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from easyserve import Server  # noqa: E402


def workers_rss_mb() -> float:
    """The resident memory of this process's worker children, summed."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) != os.getpid():
                continue
            if b"easyserve.worker" not in (entry / "cmdline").read_bytes():
                continue
            total += int((entry / "status").read_text().split("VmRSS:")[1].split()[0])
        except (OSError, IndexError):
            continue
    return total / 1024


def one_start(starts: int | None, args: argparse.Namespace) -> tuple[float, float, float]:
    """(peak MB, MB once started, seconds the start took)."""
    server = Server(handle="handles_bench:Loads", GPUs="cpu", Port=0, ProcessPerGPU=args.workers,
                    StartsPerGPU=starts, HandleArgs={"load_mb": args.load_mb, "keep_mb": args.keep_mb,
                                                     "load_s": args.load_s})
    peak, done = [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], workers_rss_mb())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    began = time.monotonic()
    try:
        server.start(timeout=300)
        took = time.monotonic() - began
        done.set()
        sampler.join()
        return peak[0], workers_rss_mb(), took
    finally:
        done.set()
        server.stop(drain_timeout=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--load-mb", type=int, default=400)
    parser.add_argument("--keep-mb", type=int, default=100)
    parser.add_argument("--load-s", type=float, default=1.0)
    parser.add_argument("--starts", default="all,1,2", help="StartsPerGPU settings, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    settings = [None if s == "all" else int(s) for s in args.starts.split(",")]
    results: dict[int | None, list[tuple[float, float, float]]] = {s: [] for s in settings}
    for _ in range(args.rounds):  # the settings in turn, round after round
        for starts in settings:
            results[starts].append(one_start(starts, args))
    print(f"{args.workers} workers, {args.load_mb} MB read and {args.keep_mb} MB kept by each, "
          f"{args.load_s:g} s a load; medians of {args.rounds} starts")
    print("| StartsPerGPU | workers' peak MB | once started MB | start s |")
    print("|---|---:|---:|---:|")
    for starts, runs in results.items():
        peak, kept, took = (statistics.median(column) for column in zip(*runs))
        print(f"| {'all' if starts is None else starts} | {peak:,.0f} | {kept:,.0f} | {took:.2f} |")


if __name__ == "__main__":
    main()
