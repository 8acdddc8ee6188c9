"""What a closed loop's numbers hide: the ResNet-18 example at a fixed load, with requests arriving on a
schedule (``easyserve bench --rate``), beside the closed loop that measured its capacity.

A closed loop of ``c`` clients answers "how many requests a second can this server take?": when the
server slows down, so do the clients. What users see at a given load is another question: their
requests arrive whether or not the last one was answered. This starts the example (``easyserve run``,
CPU workers, the model of ResNet-18's real architecture from ``resnet18_inputs.py``), measures its
capacity with a closed loop, then sends it fixed rates, a share of that capacity each, with requests
evenly spaced and as Poisson arrivals (independent users), and prints the latencies of each, all in
one run::

    python benchmarks/resnet18_inputs.py        # once: the model and the pictures
    python benchmarks/open_loop.py              # 2x2, the 500x375 JPEG raw, loads of 50-90% of capacity
    python benchmarks/open_loop.py --setting 2x8 --concurrency 32 --loads 0.5,0.8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import resnet18_targets as targets  # noqa: E402
from resnet18_inputs import PICTURES, write_inputs  # noqa: E402

import easyserve  # noqa: E402
from easyserve.bench import Run  # noqa: E402
from easyserve.payloads import ImagePayload  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", default="2x2", help="ProcessPerGPU x MaxBatchSize")
    parser.add_argument("--picture", default="500x375", choices=list(PICTURES))
    parser.add_argument("--form", default="raw", choices=["raw", "base64"])
    parser.add_argument("--concurrency", type=int, default=8, help="of the closed loop that finds the capacity")
    parser.add_argument("--loads", default="0.5,0.7,0.9", type=lambda s: [float(x) for x in s.split(",")],
                        help="rates to send, as shares of the closed loop's requests/s")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    args = parser.parse_args()
    write_inputs()
    processes, max_batch = (int(n) for n in args.setting.split("x"))
    payload = ImagePayload(PICTURES[args.picture], raw=args.form == "raw")
    port = targets.free_port()
    url = f"http://127.0.0.1:{port}"
    runs = []
    with targets.serving(targets.easyserve_command(processes, max_batch, port), url + "/ready",
                         targets.OUT / "open_loop.log", targets.checkout_env()):
        closed = easyserve.bench(url, payload, concurrency=args.concurrency, duration=args.duration,
                                 warmup=args.warmup, progress=False)
        runs.append(("closed", closed.runs[0]))
        capacity = closed.runs[0].requests_per_s
        for load in args.loads:
            for arrivals in ("constant", "poisson"):
                rate = round(capacity * load, 1)
                found = easyserve.bench(url, payload, rate=rate, arrivals=arrivals, duration=args.duration,
                                        warmup=args.warmup, progress=False)
                runs.append((f"{load:.0%} of it, {arrivals}", found.runs[0]))
                for note in found.notes:
                    print(note, file=sys.stderr)
    print(f"ResNet-18 example, {args.setting} on {targets.cpu_count()} cores, {args.picture} as {args.form}; "
          f"{args.duration:g} s a load\n")
    print("| load | sent | req/s | p50 ms | p90 ms | p99 ms | mean batch | backlog |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for what, run in runs:
        sent = f"closed loop, concurrency {run.concurrency}" if run.rate is None else f"{run.rate:,g}/s"
        print(f"| {what} | {sent} | {run.requests_per_s:,.1f} | {run.p50_ms:,.1f} | {run.p90_ms:,.1f} | "
              f"{run.p99_ms:,.1f} | {run.mean_batch or 0:.2f} | {backlog(run)} |")


def backlog(run: Run) -> str:
    """Requests due and unanswered halfway through the schedule and at its end, and whether that
    means the server fell behind; nothing for the closed loop."""
    if not run.backlog:
        return "-"
    return f"{run.backlog[0]} → {run.backlog[1]}" + (" (fell behind)" if run.fell_behind else "")


if __name__ == "__main__":
    main()
