"""The Open Inference Protocol's binary tensors against ``/predict``, side by side in one run.

The same uint8 224x224x3 image goes to one server two ways: as raw bytes to ``/predict``
(``application/octet-stream``) and as a UINT8 tensor with the binary data extension to
``/v2/models/Pixels/infer``. The handle (``handles_bench.Pixels``) does almost nothing, so the
figure is the cost of each API's path, not of a model. Runs alternate (each API first in turn), and
the median of each is kept::

    python benchmarks/v2_binary.py                      # concurrency 32, 3 rounds of 10,000 requests
    python benchmarks/v2_binary.py --requests 20000 --rounds 5
    python benchmarks/v2_binary.py --batch 8            # and 8 images in one v2 request ([8, 224, 224, 3])

With ``--batch N`` a third way goes beside them: N images in one v2 request, as Triton's clients send
a batch; the table then compares images/s.

Needs `hey` (Debian: apt-get install hey).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from overhead import free_port, hey, wait_ready

HERE = Path(__file__).resolve().parent
V2_PATH = "/v2/models/Pixels/infer"  # the model's name is the handle's (ModelName's default)


def bodies(folder: Path, batch: int = 0) -> dict[str, tuple[str, int, Path, dict[str, str]]]:
    """Each way to send: its label -> (path, images a request, body file, headers)."""
    array = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    npy = folder / "pixels.npy"
    np.save(npy, array)
    ways = {".npy to /predict": ("/predict", 1, npy, {"Content-Type": "application/x-npy"})}
    for label, images in (("v2 binary tensor", 1), (f"v2 batch of {batch}", batch)):
        if not images:
            continue
        pixels = (np.stack([array] * images) if images > 1 else array).tobytes()
        header = json.dumps({
            "inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [images] * (images > 1) + [224, 224, 3],
                        "parameters": {"binary_data_size": len(pixels)}}],
            "outputs": [{"name": "class"}],
        }, separators=(",", ":")).encode()
        v2 = folder / f"pixels-{images}.v2"
        v2.write_bytes(header + pixels)
        ways[label] = (V2_PATH, images, v2, {"Inference-Header-Content-Length": str(len(header))})
    return ways


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="ProcessPerGPU (CPU workers here)")
    parser.add_argument("--batch", type=int, default=0, help="also send this many images in one v2 request")
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen(
        [sys.executable, "-m", "easyserve.cli", "run", "--handle", "handles_bench:Pixels", "--gpus", "cpu",
         "--process-per-gpu", str(args.workers), "--port", str(port), "--max-batch-size", "16",
         "--log-level", "warning"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        wait_ready(url + "/ready")
        with tempfile.TemporaryDirectory() as tmp:
            ways = bodies(Path(tmp), args.batch)
            results: dict[str, list[dict]] = {label: [] for label in ways}
            for path, images, body, headers in ways.values():  # warm up every way
                hey(url + path, args.concurrency, min(2000, args.requests // images), body, headers)
            for round_ in range(args.rounds):
                order = list(ways.items())
                for label, (path, images, body, headers) in order if round_ % 2 == 0 else order[::-1]:
                    # a batch's requests each carry its images: as many images sent every way
                    results[label].append(hey(url + path, args.concurrency, args.requests // images, body, headers))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)

    print(f"uint8 224x224x3 image, concurrency {args.concurrency}, {args.rounds} alternating rounds of "
          f"{args.requests} images each, median shown; {args.workers} worker(s), {os.cpu_count()} cores\n")
    print("| request | images/s | requests/s | p50 ms | p99 ms | non-200 |")
    print("|---|---|---|---|---|---|")
    median = {}
    for label, runs in results.items():
        images = ways[label][1]
        median[label] = statistics.median(r["rps"] for r in runs) * images
        p50 = statistics.median(r["p50_ms"] for r in runs)
        p99 = statistics.median(r["p99_ms"] for r in runs)
        print(f"| {label} | {median[label]:,.0f} | {median[label] / images:,.0f} | {p50:.1f} | {p99:.1f} | "
              f"{sum(r['non_200'] for r in runs)} |")
    print(f"\nv2 / predict: {median['v2 binary tensor'] / median['.npy to /predict']:.3f}")
    if args.batch:
        print(f"v2 batch of {args.batch} / v2 one image: "
              f"{median[f'v2 batch of {args.batch}'] / median['v2 binary tensor']:.3f} (images/s)")


if __name__ == "__main__":
    main()
