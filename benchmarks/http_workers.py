"""HttpWorkers: what the server process spends per request with 1 front (its own) and with N front processes.

The server process holds the one queue that every worker is fed from, so its event loop is what a
server cannot outgrow by adding GPUs. With ``HttpWorkers: 1`` it also does all the HTTP work; with N
it only queues what the fronts pass it. This starts ``easyserve run`` with a handle that does no
work, once per setting, drives it with ``hey`` (or ``wrk``) and reads each process's CPU time from
/proc, so the table says how many CPU-microseconds each request cost the server process, the fronts
and the workers, side by side in one run::

    python benchmarks/http_workers.py                          # HttpWorkers 1 and 2, concurrency 64
    python benchmarks/http_workers.py --http-workers 1 2 4 --requests 40000 --rounds 3

"server-process ceiling" is 1e6 / (server-process CPU-us per request): the requests a second that
process could queue with a core to itself, the bound on the whole server however many cores the
fronts and workers get. Needs `hey` or `wrk` (Debian: apt-get install hey wrk).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import free_port, hey, stop_group, wrk  # noqa: E402

from easyserve.children import process_cpu_s  # noqa: E402


def wait_ready(url: str, timeout: float = 60) -> None:
    """Until ``url`` (/ready) answers 200: its 503 while the worker loads is not ready."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:  # refused, or HTTPError 503
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {timeout:g}s")


def children(pid: int) -> dict[int, str]:
    """The direct children of ``pid`` and what each is: front, worker or other."""
    out = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            for child in f.read().split():
                with open(f"/proc/{child}/cmdline", "rb") as c:
                    cmd = c.read().replace(b"\0", b" ").decode()
                out[int(child)] = ("front" if "easyserve.front" in cmd else "worker" if "easyserve.worker" in cmd
                                   else "other")
    return out


def measure(n: int, args: argparse.Namespace) -> list[dict]:
    port = free_port()
    command = ["easyserve", "run", "--handle", "easyserve.builtin:Echo", "--gpus", "cpu", "--process-per-gpu",
               str(args.workers), "--max-batch-size", str(args.max_batch_size), "--http-workers", str(n),
               "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    load = hey if args.tool == "hey" else wrk
    rows = []
    try:
        url = f"http://127.0.0.1:{port}/predict"
        wait_ready(url.replace("/predict", "/ready"))
        load(url, args.concurrency, 2000)  # warm up
        for _ in range(args.rounds):
            kids = children(proc.pid)
            pids = {proc.pid: "server", **kids}
            before = {pid: process_cpu_s(pid) for pid in pids}
            start = time.perf_counter()
            result = load(url, args.concurrency, args.requests)
            if result["non_200"] or result.get("errors"):
                print(f"HttpWorkers {n}: statuses {result.get('statuses')}, errors {result.get('errors')}",
                      file=sys.stderr)
            wall = time.perf_counter() - start
            spent = {"server": 0.0, "front": 0.0, "worker": 0.0, "other": 0.0}
            for pid, kind in pids.items():
                spent[kind] += process_cpu_s(pid) - before[pid]
            served = result["rps"] * wall
            rows.append({"http_workers": n, **result,
                         **{f"{kind}_us": spent[kind] / served * 1e6 for kind in ("server", "front", "worker")}})
    finally:
        stop_group(proc)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--http-workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--requests", type=int, default=20000, help="requests per measurement")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="worker processes (ProcessPerGPU on CPU)")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="measurements per setting, alternating settings")
    parser.add_argument("--tool", choices=["hey", "wrk"], default="hey")
    args = parser.parse_args()
    if not shutil.which(args.tool):
        sys.exit(f"{args.tool} is not installed (Debian: apt-get install {args.tool})")
    rows = []
    for n in args.http_workers:
        rows += measure(n, args)
    print("| HttpWorkers | requests/s | p50 ms | p99 ms | non-200 | server-process CPU-us/request "
          "| fronts CPU-us/request | workers CPU-us/request | server-process ceiling, requests/s "
          f"|  ({args.tool}, concurrency "
          f"{args.concurrency}, {os.cpu_count()} cores)")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['http_workers']} | {r['rps']:,.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['non_200']} | "
              f"{r['server_us']:.0f} | {r['front_us']:.0f} | {r['worker_us']:.0f} | {1e6 / r['server_us']:,.0f} |")


if __name__ == "__main__":
    main()
