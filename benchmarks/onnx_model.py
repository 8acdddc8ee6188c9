"""An ONNX file served as it is (``OnnxModel``) against the same model called directly.

ResNet-18 of the real architecture (``resnet18_inputs.py``), fed float32 [3,224,224] tensors as
``.npy`` bodies. For each ProcessPerGPU x MaxBatchSize setting, side by side in one run:

- *direct*: that many processes, each calling ``session.run`` on batches of that size, as fast as it
  can, with the thread budget a worker gets (the cores shared out among the processes);
- *served*: ``easyserve.sweep`` on the file, ``concurrency`` clients (in processes of their own), the
  server's batches formed from their requests.

The ratio is served images/s over direct images/s; direct pays no HTTP, no copying of bodies and no
waiting for a batch to fill, so it is the ceiling a server can come near, not pass::

    python benchmarks/onnx_model.py --settings 1x1,1x8,2x4 --concurrency 16 --seconds 8
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def direct(model: str, processes: int, batch: int, seconds: float) -> float:
    """Images a second that ``processes`` processes calling the model on batches of ``batch`` reach."""
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        threads = max(1, (os.cpu_count() or 1) // processes)
        counts = pool.starmap(_direct_worker, [(model, batch, seconds, threads)] * processes)
    return sum(counts) / seconds


def _direct_worker(model: str, batch: int, seconds: float, threads: int) -> int:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    data = np.random.default_rng(0).random((batch, 3, 224, 224), dtype=np.float32)
    session.run(None, {name: data})  # warm
    done, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        session.run(None, {name: data})
        done += batch
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="1x1,1x8,2x4", help="ProcessPerGPU x MaxBatchSize pairs")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()

    from resnet18_inputs import write_inputs

    from easyserve import sweep
    from easyserve.payloads import NpyPayload

    model = str(write_inputs()["model"])
    payload = NpyPayload(["data=float32:3x224x224"])
    print(f"{'setting':>8} {'direct img/s':>13} {'served req/s':>13} {'mean batch':>11} {'served/direct':>14}")
    for setting in args.settings.split(","):
        processes, batch = (int(part) for part in setting.split("x"))
        alone = direct(model, processes, batch, args.seconds)
        report = sweep(model, payload, process_per_gpu=[processes], max_batch_size=[batch], GPUs="cpu",
                       concurrency=args.concurrency, duration=args.seconds, warmup=2.0, progress=False)
        run = report.runs[0]
        print(f"{setting:>8} {alone:13,.1f} {run.requests_per_s:13,.1f} {run.mean_batch:11.2f} "
              f"{run.requests_per_s / alone:14.3f}", flush=True)


if __name__ == "__main__":
    main()
