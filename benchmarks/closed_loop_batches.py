"""The batches a closed loop gets: clients that each send their next request once answered (a
benchmark's, a pipeline's), against one or more workers whose batch costs the same whatever its size
(``--cost fixed``: a sleep of ``--batch-ms``, as a GPU's batch of 8 costs about what a batch of 1
does) or in proportion to it (``--cost linear``: ``--batch-ms`` an item, as on a CPU). Prints, for each
concurrency, requests/s, p50 and p99, the mean batch the server formed and, for a fixed cost, the
share of what the workers can serve (``ProcessPerGPU x MaxBatchSize`` requests every ``--batch-ms``,
where there are that many clients)::

    python benchmarks/closed_loop_batches.py --cost fixed --workers 1 --max-batch 8 --concurrency 2,4,8,9,16
    python benchmarks/closed_loop_batches.py --cost fixed --rate 40,150,300     # an open loop instead
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import easyserve  # noqa: E402
from easyserve import Handle, Server  # noqa: E402


class Cost(Handle):
    """Sums its input, after a sleep that stands for the model: per batch, or per item."""

    def setup(self, device):
        self.cost, self.batch_s = os.environ["BENCH_COST"], float(os.environ["BENCH_BATCH_MS"]) / 1000

    def preprocess(self, task):
        return np.asarray(task["task_info"]["x"], np.float32)

    def forward(self, batch):
        time.sleep(self.batch_s if self.cost == "fixed" else self.batch_s * len(batch))
        return batch.sum(axis=1, keepdims=True)

    def postprocess(self, output, task):
        return {"y": float(output[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("::")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--cost", choices=["fixed", "linear"], default="fixed")
    parser.add_argument("--batch-ms", type=float, default=20.0, help="a batch's cost (fixed), or an item's (linear)")
    parser.add_argument("--workers", type=int, default=1, help="ProcessPerGPU, on the CPU")
    parser.add_argument("--max-batch", type=int, default=8, help="MaxBatchSize")
    parser.add_argument("--concurrency", default="2,4,8,9,16", help="closed-loop clients, a level each")
    parser.add_argument("--rate", default=None, help="requests/s of an open loop (Poisson), a level each")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds a level")
    args = parser.parse_args()
    os.environ.update(BENCH_COST=args.cost, BENCH_BATCH_MS=str(args.batch_ms))  # the workers inherit them
    server = Server(handle=Cost, ProcessPerGPU=args.workers, MaxBatchSize=args.max_batch, GPUs="cpu", Port=0)
    server.start()
    try:
        if args.rate:
            levels = {"rate": [float(r) for r in args.rate.split(",")], "arrivals": "poisson", "seed": 1,
                      "concurrency": 256}
        else:
            levels = {"concurrency": [int(c) for c in args.concurrency.split(",")]}
        report = easyserve.bench(server.url, {"x": [1.0, 2.0]}, duration=args.duration, warmup=0.5, progress=False,
                                 **levels)
    finally:
        server.stop()
    places = args.workers * args.max_batch
    print(f"{args.cost} cost, {args.batch_ms:g} ms a {'batch' if args.cost == 'fixed' else 'request'}, "
          f"{args.workers} worker(s) x MaxBatchSize {args.max_batch}")
    print(f"{'level':>10} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'mean batch':>10} {'of ceiling':>10}")
    for run in report.runs:
        sizes = {int(k): v for k, v in (run.batch_sizes or {}).items()}
        mean = sum(k * v for k, v in sizes.items()) / max(1, sum(sizes.values()))
        level = f"rate {run.rate:g}" if run.rate else f"c={run.concurrency}"
        ceiling = ""
        if args.cost == "fixed" and not run.rate:  # each worker serves up to a batch of min(clients, places)
            ceiling = f"{run.requests_per_s / (min(run.concurrency, places) * 1000 / args.batch_ms):.2f}"
        print(f"{level:>10} {run.requests_per_s:8.1f} {run.p50_ms:7.1f} {run.p99_ms:7.1f} {mean:10.2f} {ceiling:>10}")


if __name__ == "__main__":
    main()
