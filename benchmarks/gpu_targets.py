"""The GPU half of the throughput targets in one run short enough for a brief loan of a GPU machine.

ResNet-18 of the real architecture (random weights, ``resnet18_inputs.py``) served by the example
handle on one GPU, at each ``--settings`` entry (ProcessPerGPU x MaxBatchSize, or PxBxH with H
``HttpWorkers``), measured by ``easyserve.bench`` at ``--concurrency`` with two payloads:

- the 500x375 JPEG as ``{"img": "<base64>"}`` JSON (target: 4,000 requests/s at concurrency 256);
- random uint8 224x224x3 pixels as ``application/x-npy`` (target: 7,000 images/s).

Beside each measurement, ``nvidia-smi`` samples the GPU's utilisation every 200 ms; the mean over the
measured seconds goes in the table, beside the server's own reading of it (``/stats``, which the bench
reports as ``gpu_util``). Before the servers, the engine alone gives the ceiling: one
ONNX Runtime session at batch 32 from numpy, no server. Every result is written to ``--out`` as it
comes (``gpu_targets.json``, a sweep table per payload as JSON, CSV and a plot when matplotlib is
there, and ``gpu_targets.md``), so a run cut short by its time limit still leaves what it measured;
``--budget-s`` skips the settings that would not fit::

    python benchmarks/gpu_targets.py --out /tmp/gpu --settings 4x32,8x32,8x32x4 --budget-s 400
    python benchmarks/gpu_targets.py --device cpu --settings 1x4 --duration 2 --concurrency 16   # a dry run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from resnet18_inputs import MODEL, PICTURES, write_inputs  # noqa: E402

import easyserve  # noqa: E402
from easyserve import Server  # noqa: E402
from easyserve.config import Config  # noqa: E402
from easyserve.payloads import ImagePayload, NpyPayload  # noqa: E402
from easyserve.sweep import SweepReport  # noqa: E402

CONFIG = ROOT / "configs" / "imagenet_resnet18.yaml"
TARGETS = {"jpeg": 4000.0, "uint8": 7000.0}  # requests (= images) per second


class GpuSampler:
    """``nvidia-smi`` in loop mode: (time, utilisation %, memory MiB) of one GPU every ``period_ms``."""

    def __init__(self, index: int, period_ms: int = 200) -> None:
        self.samples: list[tuple[float, float, float]] = []
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(
                ["nvidia-smi", f"--id={index}", "--query-gpu=utilization.gpu,memory.used",
                 "--format=csv,noheader,nounits", f"--loop-ms={period_ms}"], stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                utilisation, memory = (float(v) for v in line.split(","))
            except ValueError:
                continue
            self.samples.append((time.monotonic(), utilisation, memory))

    def mean(self, start: float, end: float) -> dict | None:
        window = [s for s in self.samples if start <= s[0] <= end]
        if not window:
            return None
        return {"gpu_util_mean": round(statistics.fmean(s[1] for s in window), 1),
                "gpu_util_p50": statistics.median(s[1] for s in window),
                "gpu_memory_mib_max": max(s[2] for s in window), "samples": len(window)}

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()


def engine_ceiling(device: str, batch: int = 32, seconds: float = 5.0) -> dict:
    """Images/s of one ONNX Runtime session at ``batch``, float32 from numpy, nothing else."""
    import numpy as np
    import onnxruntime as ort

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "gpu" else ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(MODEL), providers=providers)
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    for _ in range(5):
        session.run(None, {name: x})
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run(None, {name: x})
        done += batch
    return {"providers": session.get_providers(), "batch": batch,
            "images_per_s": round(done / (time.perf_counter() - start), 1)}


def parse_setting(text: str) -> tuple[int, int, int]:
    numbers = [int(n) for n in text.split("x")]
    if len(numbers) not in (2, 3) or min(numbers) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected PxB or PxBxH, such as 8x32 or 8x32x4")
    return numbers[0], numbers[1], numbers[2] if len(numbers) == 3 else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", HERE / "out" / "gpu")))
    parser.add_argument("--device", choices=["gpu", "cpu"], default="gpu")
    parser.add_argument("--gpu", type=int, default=0, help="the GPU to serve on (its index)")
    parser.add_argument("--settings", default="4x32,8x32,8x32x4",
                        type=lambda s: [parse_setting(t) for t in s.split(",")])
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--budget-s", type=float, default=None, help="skip what would not end within this")
    args = parser.parse_args()
    started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    write_inputs()
    results: dict = {"device": args.device, "concurrency": args.concurrency, "duration_s": args.duration,
                     "cores": os.cpu_count(), "engine": None, "runs": []}

    def save() -> None:
        (args.out / "gpu_targets.json").write_text(json.dumps(results, indent=1) + "\n")

    if args.device == "gpu":
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        results["gpu"] = smi.stdout.strip()
    results["engine"] = engine_ceiling(args.device)
    print(f"engine alone: {results['engine']}", file=sys.stderr, flush=True)
    save()

    base = Config.from_yaml(CONFIG).replace(GPUs=[args.gpu] if args.device == "gpu" else "cpu")
    base = base.replace(HandleArgs={**base.handle_args, "model": str(MODEL)})
    payloads = {"jpeg": ImagePayload(PICTURES["500x375"]), "uint8": NpyPayload(["img=uint8:224x224x3"])}
    reports: dict[str, SweepReport] = {}
    sampler = GpuSampler(args.gpu) if args.device == "gpu" else None
    per_setting = None
    try:
        for processes, batch, fronts in args.settings:
            if args.budget_s is not None and per_setting is not None:
                if time.monotonic() - started + per_setting > args.budget_s:
                    print(f"skipped {processes}x{batch}x{fronts}: past the budget", file=sys.stderr)
                    continue
            setting_start = time.monotonic()
            settings = {"ProcessPerGPU": processes, "MaxBatchSize": batch}
            if fronts > 1:
                settings["HttpWorkers"] = fronts
            server = Server(base, Port=0, **settings).start(timeout=300)
            try:
                for kind, payload in payloads.items():
                    report = easyserve.bench(server.url, payload, concurrency=args.concurrency,
                                             duration=args.duration, warmup=args.warmup, progress=False,
                                             settings=settings)
                    end = time.monotonic()
                    [run] = report.runs
                    gpu = sampler.mean(end - run.seconds, end) if sampler else None
                    row = {"payload": kind, **settings, "requests_per_s": run.requests_per_s, "p50_ms": run.p50_ms,
                           "p99_ms": run.p99_ms, "errors": run.errors, "mean_batch": run.mean_batch,
                           "client_cpu": run.client_cpu, "client_processes": run.processes, "gpu": gpu,
                           "server_gpu_percent": run.gpu_percent, "target": TARGETS[kind]}
                    results["runs"].append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
                    if kind not in reports:
                        reports[kind] = SweepReport("ImagenetResnet18Handle", report.payload, [], None)
                    reports[kind].runs.append(run)
                    reports[kind].notes.extend(report.notes)
                    save()
            finally:
                server.stop()
            per_setting = time.monotonic() - setting_start
    finally:
        if sampler is not None:
            sampler.close()
        save()
        write_reports(args.out, reports, results)


def write_reports(out: Path, reports: dict[str, SweepReport], results: dict) -> None:
    for kind, report in reports.items():
        report.to_json(out / f"sweep-{kind}.json")
        report.to_csv(out / f"sweep-{kind}.csv")
        try:
            report.plot(out / f"sweep-{kind}.png")
        except ImportError:  # matplotlib is an extra
            pass
    lines = [f"{results.get('gpu', results['device'])}; {results['cores']} cores; concurrency "
             f"{results['concurrency']}; {results['duration_s']:g} s each; engine alone "
             f"{results['engine']['images_per_s']:,.0f} images/s at batch {results['engine']['batch']} "
             f"({', '.join(results['engine']['providers'])})", "",
             "| payload | ProcessPerGPU | MaxBatchSize | HttpWorkers | requests/s | target | p50 ms | p99 ms | "
             "errors | mean batch | GPU util % (mean) | the server's GPU % | GPU memory MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["runs"]:
        gpu = r["gpu"] or {}
        served = r.get("server_gpu_percent")  # the server's own reading (/stats), beside this script's sampler
        served = "-" if served is None else f"{served:.1f}"
        lines.append(f"| {r['payload']} | {r['ProcessPerGPU']} | {r['MaxBatchSize']} | {r.get('HttpWorkers', 1)} | "
                     f"{r['requests_per_s']:,.0f} | {r['target']:,.0f} | {r['p50_ms']} | {r['p99_ms']} | "
                     f"{r['errors']} | {r['mean_batch']} | {gpu.get('gpu_util_mean', '-')} | {served} | "
                     f"{gpu.get('gpu_memory_mib_max', '-')} |")
    (out / "gpu_targets.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
