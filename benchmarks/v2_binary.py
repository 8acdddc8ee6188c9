"""The Open Inference Protocol's binary tensors against ``/predict``, side by side in one run.

The same uint8 224x224x3 image goes to one server two ways: as raw bytes to ``/predict``
(``application/octet-stream``) and as a UINT8 tensor with the binary data extension to
``/v2/models/Pixels/infer``. The handle (``handles_bench.Pixels``) does almost nothing, so the
figure is the cost of each API's path, not of a model. Runs alternate (each API first in turn), and
the median of each is kept::

    python benchmarks/v2_binary.py                      # concurrency 32, 3 rounds of 10,000 requests
    python benchmarks/v2_binary.py --requests 20000 --rounds 5

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


def bodies(folder: Path) -> dict[str, tuple[Path, dict[str, str]]]:
    array = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    pixels = array.tobytes()
    npy = folder / "pixels.npy"
    np.save(npy, array)
    header = json.dumps({
        "inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [224, 224, 3],
                    "parameters": {"binary_data_size": len(pixels)}}],
        "outputs": [{"name": "class"}],
    }, separators=(",", ":")).encode()
    v2 = folder / "pixels.v2"
    v2.write_bytes(header + pixels)
    binary = {"Inference-Header-Content-Length": str(len(header))}
    return {"/predict": (npy, {"Content-Type": "application/x-npy"}), V2_PATH: (v2, binary)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="ProcessPerGPU (CPU workers here)")
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
            paths = bodies(Path(tmp))
            results: dict[str, list[dict]] = {path: [] for path in paths}
            for path, (body, headers) in paths.items():  # warm up both paths
                hey(url + path, args.concurrency, min(2000, args.requests), body, headers)
            for round_ in range(args.rounds):
                order = list(paths.items())
                for path, (body, headers) in order if round_ % 2 == 0 else order[::-1]:  # neither always first
                    results[path].append(hey(url + path, args.concurrency, args.requests, body, headers))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)

    print(f"uint8 224x224x3 image, concurrency {args.concurrency}, {args.rounds} alternating rounds of "
          f"{args.requests} requests each, median shown; {args.workers} worker(s), {os.cpu_count()} cores\n")
    print("| request | requests/s | p50 ms | p99 ms | non-200 |")
    print("|---|---|---|---|---|")
    median = {}
    for path, runs in results.items():
        median[path] = statistics.median(r["rps"] for r in runs)
        p50 = statistics.median(r["p50_ms"] for r in runs)
        p99 = statistics.median(r["p99_ms"] for r in runs)
        label = ".npy to /predict" if path == "/predict" else "v2 binary tensor"
        print(f"| {label} | {median[path]:,.0f} | {p50:.1f} | {p99:.1f} | {sum(r['non_200'] for r in runs)} |")
    print(f"\nv2 / predict: {median[V2_PATH] / median['/predict']:.3f}")


if __name__ == "__main__":
    main()
