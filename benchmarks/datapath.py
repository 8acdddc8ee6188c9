"""The worker's data path: the ResNet-18 example served, against the same handle called in a loop.

Each request is a 640x480 JPEG (45 kB), sent as a raw body; the handle decodes it with Pillow, resizes
it to 224x224 and normalises it (``preprocess``), runs the model (``forward``) and turns the logits
into the top classes (``postprocess``). Measured in one run, side by side:

- the handle called directly, no server: ``preprocess + forward + postprocess`` per picture, and the
  same on batches of 8 (``stack``, one ``forward``);
- served by easyserve with ``PreprocessThreads`` 1 or auto and ``Pipeline`` off or on, at concurrency 8
  and 32 (hey).

``--model standin`` (default) runs the offline stand-in of resnet18-v1-7.onnx on the CPU (ONNX Runtime);
``--model accelerator`` replaces ``forward`` by a wait that takes no CPU (``--accelerator-ms`` per batch
plus a quarter of a millisecond per picture), as a GPU's would, to show what overlapping buys when
the model runs elsewhere::

    python benchmarks/datapath.py                       # prints markdown tables
    python benchmarks/datapath.py --model accelerator --accelerator-ms 8

Needs `hey` (Debian: apt-get install hey).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "handles"))  # the example handle imports its helpers (vision.py) by name

from imagenet_resnet18 import ImagenetResnet18Handle  # noqa: E402


class AcceleratorStandIn(ImagenetResnet18Handle):
    """The ResNet-18 handle whose ``forward`` waits instead of computing, holding no CPU and no GIL, as a
    call into a GPU does: ``ms`` per batch plus 0.25 ms per picture. Logits are fixed random numbers."""

    def setup(self, device) -> None:
        self.labels = [f"class {i}" for i in range(1000)]
        self.ms = float(os.environ.get("ACCELERATOR_MS", "8"))
        self.logits = np.random.default_rng(0).standard_normal(1000).astype(np.float32)

    def forward(self, batch: np.ndarray) -> np.ndarray:
        time.sleep((self.ms + 0.25 * len(batch)) / 1000)
        return np.broadcast_to(self.logits, (len(batch), 1000))


def picture() -> bytes:
    """A 640x480 JPEG with gradients, shapes and grain: about what a camera's picture costs to decode."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(0)
    height, width = 480, 640
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 / width, y * 255 / height, (x + y) * 128 / (width + height)], -1)
    pixels += rng.normal(0, 12, pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(30):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        size, color = rng.integers(20, 120, 2), tuple(int(v) for v in rng.integers(0, 255, 3))
        draw.ellipse([x0, y0, x0 + int(size[0]), y0 + int(size[1])], fill=color)
    out = io.BytesIO()
    image.filter(ImageFilter.GaussianBlur(1)).save(out, "JPEG", quality=90)
    return out.getvalue()


def handle_for(kind: str, model: Path) -> ImagenetResnet18Handle:
    cls = AcceleratorStandIn if kind == "accelerator" else ImagenetResnet18Handle
    return cls(model=str(model))


def direct(kind: str, model: Path, data: bytes, count: int, batch: int) -> float:
    """Pictures per second through the handle called in a loop, ``batch`` at a time, in this process."""
    from easyserve import Device

    handle = handle_for(kind, model)
    handle.setup(Device(threads=os.cpu_count() or 1))
    task = {"task_id": "t", "task_info": {"data": data, "content_type": "image/jpeg"}}
    for _ in range(5):  # warm up
        handle.postprocess(handle.forward(handle.stack([handle.preprocess(task)]))[0], task)
    begun = time.perf_counter()
    done = 0
    while done < count:
        inputs = [handle.preprocess(task) for _ in range(batch)]
        rows = handle.unstack(handle.forward(handle.stack(inputs)), batch)
        for row in rows:
            handle.postprocess(row, task)
        done += batch
    return done / (time.perf_counter() - begun)


def hey(url: str, body: Path, concurrency: int, requests: int) -> dict:
    out = subprocess.run(["hey", "-n", str(requests), "-c", str(concurrency), "-m", "POST", "-T", "image/jpeg",
                          "-D", str(body), url], capture_output=True, text=True, check=True).stdout
    codes = dict(re.findall(r"\[(\d{3})\]\s+(\d+) responses", out))
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": float(re.search(r"50% in ([\d.]+) secs", out).group(1)) * 1000,
        "non_200": sum(int(n) for c, n in codes.items() if c != "200"),
    }


def stats(base: str) -> dict:
    with urllib.request.urlopen(base + "/stats", timeout=10) as resp:
        return json.loads(resp.read())


def wait_ready(base: str, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            urllib.request.urlopen(base + "/ready", timeout=1).read()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{base} did not become ready")


class Served:
    """An easyserve server for one variant, started in its own process group and stopped whole."""

    def __init__(self, kind: str, model: Path, folder: Path, threads: int | None, pipeline: bool, port: int,
                 args) -> None:
        self.name = f"served, PreprocessThreads {threads or 'auto'}, Pipeline {str(pipeline).lower()}"
        handle = f"{HERE / 'datapath.py'}:AcceleratorStandIn" if kind == "accelerator" else \
            f"{ROOT / 'handles' / 'imagenet_resnet18.py'}:ImagenetResnet18Handle"
        config = {"GPUs": "cpu", "ProcessPerGPU": args.workers, "Handle": handle, "HandleArgs": {"model": str(model)},
                  "MaxBatchSize": args.max_batch_size, "Port": port, "PreprocessThreads": threads,
                  "Pipeline": pipeline}
        path = folder / f"config-{port}.yaml"
        path.write_text(json.dumps(config))  # JSON is YAML
        self.base = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(["easyserve", "run", str(path), "--log-level", "warning"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def measure(self, body: Path, concurrency: int, requests: int) -> dict:
        """hey's numbers for one run, with the mean size of the batches formed during it (from /stats)."""
        before = stats(self.base)
        result = hey(self.base + "/predict", body, concurrency, requests)
        after = stats(self.base)
        pictures = sum(int(k) * v for k, v in after["batch_sizes"].items()) - \
            sum(int(k) * v for k, v in before["batch_sizes"].items())
        return {**result, "mean_batch": pictures / max(after["batches"] - before["batches"], 1)}

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        finally:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def median(runs: list[dict], key: str) -> float:
    return float(np.median([r[key] for r in runs]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["standin", "accelerator"], default="standin")
    parser.add_argument("--accelerator-ms", type=float, default=8.0, help="--model accelerator: ms per batch")
    parser.add_argument("--requests", type=int, default=600, help="requests per measurement")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="rounds over every variant; medians are shown")
    parser.add_argument("--port", type=int, default=9931, help="the first of four consecutive ports")
    args = parser.parse_args()
    if not shutil.which("hey"):
        sys.exit("hey is not installed (Debian: apt-get install hey)")
    from easyserve.standins import write_standin

    variants = [(1, False), (None, False), (1, True), (None, True)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = write_standin("resnet18", folder)
        body = folder / "picture.jpg"
        body.write_bytes(picture())
        os.environ["ACCELERATOR_MS"] = str(args.accelerator_ms)  # for the servers' workers, and direct()
        servers = [Served(args.model, model, folder, t, p, args.port + i, args) for i, (t, p) in enumerate(variants)]
        try:
            for server in servers:
                wait_ready(server.base)
                hey(server.base + "/predict", body, 8, 200)  # warm up
            # Rounds, each variant in turn, and the median of each: the machine's other load drifts,
            # and every variant gets its share of it.
            loops: dict[int, list] = {1: [], 8: []}
            runs: dict[tuple[int, int], list] = {}
            for _ in range(args.rounds):
                for batch in (1, 8):
                    loops[batch].append({"rps": direct(args.model, model, body.read_bytes(), args.requests // 2,
                                                       batch)})
                for concurrency in (8, 32):
                    for i, server in enumerate(servers):
                        runs.setdefault((i, concurrency), []).append(server.measure(body, concurrency, args.requests))
        finally:
            for server in servers:
                server.stop()

    loop_1, loop_8 = median(loops[1], "rps"), median(loops[8], "rps")
    print(f"model: {args.model}{f' ({args.accelerator_ms:g} ms per batch)' if args.model == 'accelerator' else ''}, "
          f"{args.workers} worker(s), MaxBatchSize {args.max_batch_size}, {os.cpu_count()} cores, "
          f"median of {args.rounds} rounds of {args.requests} requests\n")
    print("| run | concurrency | pictures/s | vs loop, batch 1 | vs threads 1, no pipeline | p50 ms | mean batch |"
          " non-200 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| handle in a loop, batch 1, no server | - | {loop_1:,.0f} | 1.00 | - | - | 1 | - |")
    print(f"| handle in a loop, batches of 8, no server | - | {loop_8:,.0f} | {loop_8 / loop_1:.2f} | - | - | 8 | - |")
    for i, server in enumerate(servers):
        for concurrency in (8, 32):
            got, first = runs[(i, concurrency)], runs[(0, concurrency)]
            rps = median(got, "rps")
            print(f"| {server.name} | {concurrency} | {rps:,.0f} | {rps / loop_1:.2f} | "
                  f"{rps / median(first, 'rps'):.2f} | {median(got, 'p50_ms'):.1f} | {median(got, 'mean_batch'):.1f} | "
                  f"{sum(r['non_200'] for r in got)} |")


if __name__ == "__main__":
    main()
