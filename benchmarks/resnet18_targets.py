"""ResNet-18 served against the same work done with no server, against LitServe and the original easy-serve.

The ImageNet example (``handles/imagenet_resnet18.py``, ``configs/imagenet_resnet18.yaml``) with a
model of ResNet-18's real architecture (random weights, ``resnet18_inputs.py``) on CPU workers, for a
500x375 and a 1920x1200 JPEG, at concurrency 8 and 32::

    python benchmarks/resnet18_inputs.py          # once: the model and the pictures, in benchmarks/out/
    python benchmarks/resnet18_targets.py --litserve-python /tmp/litserve-venv/bin/python
    python benchmarks/resnet18_targets.py --settings 2x1 --rounds 3 --duration 10   # one setting, longer

With the original easy-serve beside them (a clone of its repository and a venv for it, once)::

    git clone https://github.com/cosimo17/easy-serve /tmp/easy-serve-orig
    python -m venv /tmp/orig-venv
    /tmp/orig-venv/bin/pip install 'aiohttp[speedups]' numpy opencv-python-headless onnxruntime pyyaml
    python benchmarks/resnet18_targets.py --litserve-python /tmp/litserve-venv/bin/python \
        --easy-serve-src /tmp/easy-serve-orig --easy-serve-python /tmp/orig-venv/bin/python

It prints markdown tables and writes every measurement to ``benchmarks/out/resnet18_targets.json``.
What is measured, each contender in turn, the order reversed from one round to the next:

- **direct**: the handle's own work with no server. ``P`` processes (``P`` = ProcessPerGPU), started
  with the environment and thread budget an easyserve CPU worker gets (``OMP_NUM_THREADS`` and
  ONNX Runtime's intra-op threads = cores // P, through ``Device``), each call ``handle.run_batch``
  (preprocess each request, stack, forward, postprocess each row: what a worker calls) in a closed
  loop, on the request as ``/predict`` hands it to the handle: ``{"data": <JPEG bytes>}`` for a raw
  body, ``{"img": "<base64>"}`` for JSON (already decoded from JSON: decoding it is the server's
  work). Its batches are of ``min(MaxBatchSize, ceil(concurrency / P))`` requests: with the workers
  the bottleneck, a closed loop of ``concurrency`` clients keeps about ``concurrency / P`` requests
  per worker waiting, so a worker that becomes free finds that many, up to MaxBatchSize. This is
  the ceiling a server with no cost at all would reach with the same processes and batches: every
  cost of serving (HTTP, the queue, moving bytes to the worker and the answer back as JSON, the load
  generator sharing the cores) shows as the gap to it. Its latency is a batch's run time, which a
  served request adds its queueing to, so compare latencies between servers, not with it.
- **easyserve**: ``easyserve run`` with the example config (HandleArgs ``model`` the built model,
  ``GPUs: cpu``, the setting's ProcessPerGPU and MaxBatchSize, MaxWaitMs as the config has it),
  measured by ``easyserve.bench`` with the JPEG sent raw (``image/jpeg``) and as ``{"img": "<base64>"}``.
- **LitServe** (with ``--litserve-python``): ``peer_litserve_resnet18.py``, the same model and
  preprocessing, with the same workers, MaxBatchSize and batch timeout, measured the same way; it
  takes JSON only.
- **easy-serve (original)** (with ``--easy-serve-src``, a clone of github.com/cosimo17/easy-serve, and
  ``--easy-serve-python``, a python with aiohttp, OpenCV, numpy, ONNX Runtime and PyYAML): its own
  ``src/app.py`` and its own ``ImagenetResnet18Handle``, unchanged, on its own ResNet-18 config with
  ``GPUs: "0"`` and the setting's ProcessPerGPU, measured the same way. For the run, the built model is
  linked in where that handle loads its model (``models/resnet18-v1-7.onnx``); nothing else in the
  checkout is touched. It takes JSON only, and has no batching: each worker runs one picture at a time,
  so its setting is ``Px1`` whatever the MaxBatchSize. Its handle asks ONNX Runtime for CUDA, then CPU:
  with the CPU build of ONNX Runtime (and ``CUDA_VISIBLE_DEVICES`` empty, as for the other contenders'
  workers) it runs on the CPU, with a warning in its log. It sets no thread count, so each of its workers
  has ONNX Runtime's default, a thread per physical core; its workers get the same environment
  (``OMP_NUM_THREADS``...) as easyserve's, which ONNX Runtime's own thread pool does not read. Its work per
  request is not quite easyserve's example handle's: it decodes with OpenCV (so in BGR order), resizes
  with OpenCV's bilinear (no smoothing when shrinking, unlike Pillow's, so less work on a large picture),
  normalises with the same statistics in that order, and answers the arg-max class index alone (no
  softmax, top 5 or labels). Its server puts each request on a worker's queue and looks for the answer
  every 20 ms.

The servers' own processes (easyserve's, LitServe's, the original's: each server's process group) and
the load generator's clients count in the cores used ("per core-s").

First, every ``--settings`` entry (``PxB``: ProcessPerGPU x MaxBatchSize) is measured once on the
500x375 JPEG (raw for easyserve and direct, base64 for LitServe and the original, the original once for
each ProcessPerGPU); then each server's best setting (most requests per second, geometric mean over the
concurrencies) is measured in ``--rounds`` rounds on both pictures (or ``--pictures``) and both forms,
against the direct baseline with easyserve's best setting.
Servers run in their own process groups, stopped whole when done, whatever happens.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import filecmp
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from resnet18_inputs import MODEL, PICTURES, write_inputs  # noqa: E402

import easyserve  # noqa: E402
from easyserve.devices import cpu_count  # noqa: E402
from easyserve.payloads import ImagePayload  # noqa: E402

OUT = HERE / "out"
CONFIG = ROOT / "configs" / "imagenet_resnet18.yaml"
HANDLE = f"{ROOT / 'handles' / 'imagenet_resnet18.py'}:ImagenetResnet18Handle"
FORMS = ("raw", "base64")
ORIGINAL = "easy-serve (original)"
# where the original's ResNet-18 handle loads its model, in its checkout (the older handle's
# "../models/..." from src/, where the original is started, is the same file)
ORIGINAL_MODEL = Path("models") / "resnet18-v1-7.onnx"


def checkout_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's environment) with this checkout first on ``PYTHONPATH``."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def thread_env(threads: int, easyserve_path: bool = True) -> dict[str, str]:
    """The environment of an easyserve CPU worker with ``threads`` threads (as the pool sets it);
    ``easyserve_path=False``: without this checkout put on ``PYTHONPATH``."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    if easyserve_path:
        env = checkout_env(env)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.setdefault(var, str(threads))
    return env


TICK = os.sysconf("SC_CLK_TCK")


def process_stats() -> Iterator[tuple[int, list[str]]]:
    """Each process now running: its pid, and the fields of its /proc/PID/stat after the name (state,
    parent, process group...; user and system CPU ticks at 11 and 12)."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        yield int(entry.name), fields


def cpu_seconds(pgid: int) -> float:
    """CPU time (user and system) of the processes now in process group ``pgid``, and of this process's
    children (the load generator's clients)."""
    total = 0
    for _, fields in process_stats():
        if int(fields[2]) == pgid or int(fields[1]) == os.getpid():
            total += int(fields[11]) + int(fields[12])
    return total / TICK


def _all_cores() -> list[int]:
    """The machine's CPU ticks since it started, over all cores: user, nice, system, idle, iowait..."""
    with open("/proc/stat") as f:
        return [int(v) for v in f.readline().split()[1:]]


def machine_busy_seconds() -> float:
    """CPU time every process on the machine has used since it started, over all cores."""
    values = _all_cores()
    return (sum(values) - values[3] - values[4]) / TICK  # less idle and iowait


def machine_idle_seconds() -> float:
    """CPU time no process used since the machine started (idle and iowait), over all cores."""
    values = _all_cores()
    return (values[3] + values[4]) / TICK


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


# -- direct: the handle's work with no server ----------------------------------------------------------

def task_info(picture: Path, form: str) -> dict:
    """A request to ``/predict`` as the handle receives it."""
    data = picture.read_bytes()
    if form == "raw":
        return {"data": data, "content_type": "image/jpeg"}
    return {"img": base64.b64encode(data).decode()}


def direct_batch(processes: int, max_batch: int, concurrency: int) -> int:
    """A direct process's batch: with the workers the bottleneck, a closed loop of ``concurrency``
    clients keeps about ``concurrency / processes`` requests per worker waiting (see the module's notes)."""
    return min(max_batch, math.ceil(concurrency / processes))


def direct_handle(spec: dict) -> tuple[Any, list[dict]]:
    """In a direct process: the handle, set up as a worker sets it up, and the batch it runs (with the
    ``handle_args`` a spec may add to the model's; ``handle``, another example's handle)."""
    from easyserve.handle import Device
    from easyserve.loader import build, resolve

    handle = build(resolve(spec.get("handle", HANDLE), ROOT), {"model": spec["model"], **spec.get("handle_args", {})})
    handle.setup(Device(kind="cpu", threads=spec["threads"], name=f"cpu/{spec['index']}"))
    info = task_info(Path(spec["picture"]), spec["form"])
    return handle, [{"task_id": f"direct-{i}", "task_info": info} for i in range(spec["batch"])]


def direct_worker(spec: dict) -> None:
    """In a child process: set the handle up as a worker does, warm up, say ``ready``, wait for ``go``,
    run batches for ``duration`` seconds, and print what it did as one JSON line."""
    handle, tasks = direct_handle(spec)
    end = time.perf_counter() + spec["warmup"]
    while time.perf_counter() < end:
        handle.run_batch(tasks)
    print("ready", flush=True)
    sys.stdin.readline()  # "go": every process starts measuring at once
    batch_s, failed = [], 0
    cpu = time.process_time()  # every thread of this process
    started = time.perf_counter()
    end = started + spec["duration"]
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        results = handle.run_batch(tasks)
        batch_s.append(time.perf_counter() - t0)
        failed += sum(status != 200 for status, _ in results)
    print(json.dumps({"batches": batch_s, "seconds": time.perf_counter() - started, "failed": failed,
                      "cpu_s": time.process_time() - cpu}), flush=True)


def measure_direct(processes: int, max_batch: int, picture: Path, form: str, concurrency: int,
                   duration: float, warmup: float) -> dict:
    """``processes`` direct workers side by side; requests/s summed over them, latencies of their batches."""
    batch = direct_batch(processes, max_batch, concurrency)
    threads = max(1, cpu_count() // processes)
    procs = []
    try:
        for index in range(processes):
            spec = {"model": str(MODEL), "threads": threads, "index": index, "picture": str(picture), "form": form,
                    "batch": batch, "duration": duration, "warmup": warmup}
            procs.append(subprocess.Popen([sys.executable, __file__, "--direct-worker", json.dumps(spec)],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                          env=thread_env(threads), cwd=ROOT, start_new_session=True))
        for proc in procs:
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("a direct worker failed to start")
        busy = machine_busy_seconds()
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        done = [json.loads(proc.stdout.readline()) for proc in procs]
        busy = machine_busy_seconds() - busy
    finally:
        for proc in procs:
            stop_group(proc)
    latencies = [s * 1000 for d in done for s in d["batches"] for _ in range(batch)]
    return {"rps": sum(len(d["batches"]) * batch / d["seconds"] for d in done),
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
            "errors": sum(d["failed"] for d in done), "mean_batch": float(batch),
            **cpu_use(sum(d["cpu_s"] for d in done), busy, max(d["seconds"] for d in done))}


def cpu_use(ours: float, busy: float, seconds: float) -> dict:
    """Cores used by what is measured, and by everything else on the machine (other jobs), meanwhile."""
    return {"cores": ours / seconds, "others_cores": max(0.0, busy - ours) / seconds}


# -- servers -------------------------------------------------------------------------------------------

def stop_group(proc: subprocess.Popen) -> None:
    """Stop a process started in its own session and everything it started: SIGTERM, then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is still there
    proc.wait()


@contextlib.contextmanager
def serving(command: list[str], ready_url: str, log: Path, env: dict | None = None, cwd: Path = ROOT,
            ready_body: bytes | None = None):
    """Run a server in its own process group until the block ends; wait for ``ready_url`` to answer 200
    (to a GET, or with ``ready_body`` to a POST of that JSON: a server with no readiness route)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{command[0]} exited with {proc.returncode}; see {log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{ready_url} not ready after 180 s; see {log}")
            probe = urllib.request.Request(ready_url, data=ready_body,
                                           headers={"Content-Type": "application/json"} if ready_body else {})
            with contextlib.suppress(OSError, urllib.error.HTTPError):  # a POST waits for a model to load
                with urllib.request.urlopen(probe, timeout=30 if ready_body else 2) as response:
                    if response.status == 200:
                        break
            time.sleep(0.3)
        yield proc
    finally:
        stop_group(proc)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def easyserve_command(processes: int, max_batch: int, port: int) -> list[str]:
    """``easyserve run`` on the example config, with the built model and this setting."""
    config = yaml.safe_load(CONFIG.read_text())
    config.update(GPUs="cpu", ProcessPerGPU=processes, MaxBatchSize=max_batch, Port=port, Handle=HANDLE)
    config["HandleArgs"] = {**config["HandleArgs"], "model": str(MODEL)}
    path = OUT / f"resnet18_{processes}x{max_batch}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return [sys.executable, "-m", "easyserve.cli", "run", str(path), "--log-level", "warning"]


@contextlib.contextmanager
def original_checkout(src: Path):
    """The original easy-serve's checkout at ``src``, with the built model where its ResNet-18 handle
    loads one: a link to ``MODEL``, made for the block and removed after it. A different file already
    there is left alone, and stops the run."""
    for needed in ("src/app.py", "src/handle.py", "configs/imagenet_resnet18.yaml"):
        if not (src / needed).is_file():
            raise SystemExit(f"--easy-serve-src {src}: no {needed} there; expected a clone of "
                             "https://github.com/cosimo17/easy-serve")
    target, made = src / ORIGINAL_MODEL, False
    if target.is_symlink() or target.exists():
        if not (target.exists() and filecmp.cmp(target, MODEL, shallow=False)):
            raise SystemExit(f"{target} is there already and is not {MODEL}: move it aside, so that the "
                             "original serves the same model as the others")
    else:
        target.parent.mkdir(exist_ok=True)
        target.symlink_to(MODEL)
        made = True
    try:
        yield src
    finally:
        if made:
            target.unlink(missing_ok=True)


def check_original_python(python: str) -> None:
    """Stop early, saying why, if ``python`` lacks what the original's server and handle import."""
    probe = subprocess.run([python, "-c", "import aiohttp, cv2, numpy, onnxruntime, yaml"], capture_output=True,
                           text=True, env=thread_env(1, easyserve_path=False))
    if probe.returncode:
        why = (probe.stderr.strip().splitlines() or [f"exit status {probe.returncode}"])[-1]
        raise SystemExit(f"--easy-serve-python {python}: {why}; the original easy-serve needs aiohttp, "
                         "opencv-python-headless, numpy, onnxruntime and pyyaml")


def original_command(python: str, src: Path, processes: int, port: int) -> list[str]:
    """The original's ``src/app.py`` on its own ResNet-18 config, with ``processes`` workers."""
    config = yaml.safe_load((src / "configs" / "imagenet_resnet18.yaml").read_text())
    # one device id: its handle asks for CUDA on it, and ONNX Runtime's CPU build falls back to the CPU
    config.update(GPUs="0", ProcessPerGPU=processes)
    path = OUT / f"original_{processes}x1.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return [python, str(src / "src" / "app.py"), "-c", str(path), "-p", str(port)]


def own_setting(who: str, setting: tuple[int, int]) -> tuple[int, int]:
    """A contender's setting for ``setting``: the original has no batching, so MaxBatchSize is 1 for it."""
    return (setting[0], 1) if who == ORIGINAL else setting


def bench(url: str, pgid: int, picture: Path, form: str, concurrency: int, duration: float, warmup: float) -> dict:
    """One ``easyserve.bench`` level, and the cores the server's processes and the clients used over it
    (warm-up included: it runs at the same rate)."""
    payload = ImagePayload(picture, raw=form == "raw")
    ours, busy, started = cpu_seconds(pgid), machine_busy_seconds(), time.perf_counter()
    r = easyserve.bench(url, payload, concurrency=concurrency, duration=duration, warmup=warmup,
                        progress=False).runs[0]
    ours, busy, seconds = cpu_seconds(pgid) - ours, machine_busy_seconds() - busy, time.perf_counter() - started
    ours += r.client_cpu * r.processes * (r.seconds + warmup)  # the clients have exited: their own count
    return {"rps": r.requests_per_s, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "errors": r.errors,
            "mean_batch": r.mean_batch, "client_cpu": r.client_cpu, **cpu_use(ours, busy, seconds)}


class Run:
    """The measurements of one invocation, each with what it measured."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rows: list[dict] = []

    def add(self, result: dict, **what) -> None:
        row = {**what, **result, "rps_per_core": result["rps"] / max(result["cores"], 1e-9)}
        self.rows.append(row)
        print(f"  {what}: {result['rps']:.1f} req/s, p50 {result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms, "
              f"errors {result['errors']}; {result['cores']:.2f} cores, others {result['others_cores']:.2f}",
              file=sys.stderr, flush=True)

    def measure(self, who: str, setting: tuple[int, int], cases: list[tuple[Path, str]], stage: str,
                round_: int) -> None:
        """Measure ``who`` at ``setting`` on each (picture, form) at every concurrency."""
        a, (processes, max_batch) = self.args, setting
        what = {"stage": stage, "round": round_, "who": who, "setting": f"{processes}x{max_batch}"}
        if who == "direct":
            for picture, form in cases:
                for c in a.concurrency:
                    self.add(measure_direct(processes, max_batch, picture, form, c, a.duration, a.warmup),
                             **what, picture=picture.stem, form=form, concurrency=c)
            return
        port = free_port()
        cwd, ready_body = ROOT, None
        if who == "easyserve":
            command, ready, env = easyserve_command(processes, max_batch, port), "/ready", checkout_env()
        elif who == "LitServe":
            command = [a.litserve_python, str(HERE / "peer_litserve_resnet18.py"), "--model", str(MODEL),
                       "--port", str(port), "--workers", str(processes), "--max-batch-size", str(max_batch),
                       "--batch-timeout", str(a.max_wait_ms / 1000)]
            ready, env = "/health", None
        else:  # the original easy-serve: started from its src/, ready once it answers a picture
            src = Path(a.easy_serve_src).resolve()
            command = original_command(a.easy_serve_python, src, processes, port)
            ready, cwd = "/predict", src / "src"
            env = thread_env(max(1, cpu_count() // processes), easyserve_path=False)
            ready_body = json.dumps(task_info(PICTURES["500x375"], "base64")).encode()
        if who != "easyserve":  # JSON bodies only
            cases = list(dict.fromkeys((picture, "base64") for picture, _ in cases))
        url = f"http://127.0.0.1:{port}"
        log = OUT / f"{re.sub(r'[^A-Za-z0-9.-]+', '-', who).strip('-')}.log"
        with serving(command, url + ready, log, env, cwd, ready_body) as proc:
            for picture, form in cases:
                for c in a.concurrency:
                    self.add(bench(url + "/predict", proc.pid, picture, form, c, a.duration, a.warmup),
                             **what, picture=picture.stem, form=form, concurrency=c)

    def select(self, who: str, stage: str) -> tuple[int, int]:
        """The setting with the most requests per second (geometric mean over the concurrencies)."""
        by_setting: dict[str, list[float]] = {}
        for row in self.rows:
            if row["stage"] == stage and row["who"] == who:
                by_setting.setdefault(row["setting"], []).append(max(row["rps"], 1e-9) if not row["errors"] else 1e-9)
        best = max(by_setting, key=lambda s: statistics.geometric_mean(by_setting[s]))
        return tuple(int(n) for n in best.split("x"))


# -- tables --------------------------------------------------------------------------------------------

def mean_of(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.fmean(values) if values else None


def ratio_text(top: list[dict], bottom: list[dict], key: str = "rps") -> str:
    """Mean over rounds of top/bottom requests per second (or ``key``), and the range of the rounds' ratios."""
    pairs = {r["round"]: r[key] for r in bottom}
    ratios = [r[key] / pairs[r["round"]] for r in top if pairs.get(r["round"])]
    if not ratios:
        return "-"
    text = f"{mean_of(top, key) / mean_of(bottom, key):.2f}"
    return text + (f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else "")


def cell(rows: list[dict]) -> str:
    if not rows:
        return "- | - | -"
    errors = sum(r["errors"] for r in rows)
    note = f" ({errors} errors)" if errors else ""
    return (f"{mean_of(rows, 'rps'):.1f}{note} | {mean_of(rows, 'p50_ms'):.0f} | {mean_of(rows, 'p99_ms'):.0f}")


def search_table(run: Run) -> str:
    search = [r for r in run.rows if r["stage"] == "search"]
    original = any(r["who"] == ORIGINAL for r in search)
    head = ["ProcessPerGPU x MaxBatchSize", "conc.", "direct req/s", "easyserve req/s", "easyserve/direct",
            "per core-s: easyserve/direct", "mean batch", "easyserve p99 ms", "LitServe req/s", "LitServe p99 ms"]
    head += ["original req/s (Px1)", "original p99 ms", "easyserve/original"] if original else []
    lines = ["| " + " | ".join(head + ["other jobs' cores"]) + " |", "|---|" + "---:|" * len(head)]
    for setting in dict.fromkeys(r["setting"] for r in search if r["who"] != ORIGINAL):
        for c in run.args.concurrency:
            pick = {who: [r for r in search if r["setting"] == setting and r["concurrency"] == c and r["who"] == who]
                    for who in ("direct", "easyserve", "LitServe")}
            processes = setting.split("x")[0]  # the original's run with as many processes, no batching
            pick[ORIGINAL] = [r for r in search if r["who"] == ORIGINAL and r["setting"] == f"{processes}x1"
                              and r["concurrency"] == c]
            d, e, lit = (mean_of(pick[w], "rps") for w in ("direct", "easyserve", "LitServe"))
            line = (f"| {setting} | {c} | {d or 0:.1f} | {e or 0:.1f} | "
                    f"{ratio_text(pick['easyserve'], pick['direct'])}"
                    f" | {ratio_text(pick['easyserve'], pick['direct'], 'rps_per_core')}"
                    f" | {mean_of(pick['easyserve'], 'mean_batch') or 0:.2f} | "
                    f"{mean_of(pick['easyserve'], 'p99_ms') or 0:.0f} | "
                    f"{f'{lit:.1f}' if lit else '-'} | {mean_of(pick['LitServe'], 'p99_ms') or 0:.0f} | ")
            if original:
                orig = mean_of(pick[ORIGINAL], "rps")
                line += (f"{f'{orig:.1f}' if orig else '-'} | {mean_of(pick[ORIGINAL], 'p99_ms') or 0:.0f} | "
                         f"{ratio_text(pick['easyserve'], pick[ORIGINAL])} | ")
            lines.append(line + f"{mean_of([r for rows in pick.values() for r in rows], 'others_cores'):.2f} |")
    return "\n".join(lines)


def final_table(run: Run) -> str:
    final = [r for r in run.rows if r["stage"] == "final"]
    peers = ["LitServe"] + ([ORIGINAL] if any(r["who"] == ORIGINAL for r in final) else [])
    head = ["picture", "form", "conc."]
    for who in ["direct", "easyserve", *peers]:
        head += [f"{who} req/s", "p50 ms", "p99 ms"]
    head += [f"easyserve/{who}" for who in ["direct", *peers]]
    head += [f"per core-s: easyserve/{who}" for who in ["direct", *peers]]
    lines = ["| " + " | ".join(head + ["other jobs' cores"]) + " |", "|---|---|" + "---:|" * (len(head) - 1)]
    for picture in dict.fromkeys(r["picture"] for r in final):
        for form in FORMS:
            for c in run.args.concurrency:
                pick = {who: [r for r in final if r["who"] == who and r["picture"] == picture
                              and r["form"] == form and r["concurrency"] == c] for who in ("direct", "easyserve")}
                for who in peers:  # JSON only: against both forms
                    pick[who] = [r for r in final if r["who"] == who and r["picture"] == picture
                                 and r["concurrency"] == c]
                if not pick["easyserve"]:
                    continue
                cells = [picture, form, str(c)] + [cell(pick[who]) for who in ["direct", "easyserve", *peers]]
                cells += [ratio_text(pick["easyserve"], pick[who]) for who in ["direct", *peers]]
                cells += [ratio_text(pick["easyserve"], pick[who], "rps_per_core") for who in ["direct", *peers]]
                cells.append(f"{mean_of([r for rows in pick.values() for r in rows], 'others_cores'):.2f}")
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="1x1,2x1,1x8,2x8",
                        help="ProcessPerGPU x MaxBatchSize pairs to try (one: no search)")
    parser.add_argument("--concurrency", default="8,32", type=lambda s: [int(c) for c in s.split(",")])
    parser.add_argument("--pictures", default=",".join(PICTURES), type=lambda s: s.split(","),
                        help=f"pictures of the final comparison, of {', '.join(PICTURES)}")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds each measurement lasts")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up before each")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the final comparison, order reversed each")
    parser.add_argument("--litserve-python", help="a python with litserve, onnxruntime and pillow installed")
    parser.add_argument("--easy-serve-src", metavar="DIR",
                        help="a clone of https://github.com/cosimo17/easy-serve: measure the original too")
    parser.add_argument("--easy-serve-python", default=sys.executable, metavar="PATH",
                        help="a python with aiohttp, opencv-python-headless, numpy, onnxruntime and pyyaml, to run "
                             "the original (default: this one)")
    parser.add_argument("--direct-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.direct_worker:
        return direct_worker(json.loads(args.direct_worker))

    write_inputs()
    args.max_wait_ms = float(yaml.safe_load(CONFIG.read_text()).get("MaxWaitMs", 2))
    settings = [tuple(int(n) for n in s.split("x")) for s in args.settings.split(",")]
    if unknown := [p for p in args.pictures if p not in PICTURES]:
        parser.error(f"--pictures: no picture {', '.join(unknown)}; choose from {', '.join(PICTURES)}")
    who = ["direct", "easyserve"] + (["LitServe"] if args.litserve_python else []) + \
        ([ORIGINAL] if args.easy_serve_src else [])
    run = Run(args)
    small = PICTURES["500x375"]
    if args.easy_serve_src:
        check_original_python(args.easy_serve_python)
        original = f"the original easy-serve from {Path(args.easy_serve_src).resolve()}"
    else:
        original = "the original easy-serve: not measured (no --easy-serve-src)"
    print(f"{cpu_count()} cores, no GPU; model {MODEL.name}; {original}", file=sys.stderr)
    best = {name: own_setting(name, settings[0]) for name in who}
    with contextlib.ExitStack() as stack:
        if args.easy_serve_src:
            stack.enter_context(original_checkout(Path(args.easy_serve_src).resolve()))
        if len(settings) > 1:
            done = set()
            for i, setting in enumerate(settings):
                for name in who if i % 2 == 0 else who[::-1]:
                    if (name, own_setting(name, setting)) not in done:  # the original: once per ProcessPerGPU
                        done.add((name, own_setting(name, setting)))
                        run.measure(name, own_setting(name, setting), [(small, "raw")], "search", 0)
            best = {name: run.select(name, "search") for name in who if name != "direct"}
            best["direct"] = best["easyserve"]
        cases = [(PICTURES[picture], form) for picture in args.pictures for form in FORMS]
        for round_ in range(args.rounds):
            for name in who if round_ % 2 == 0 else who[::-1]:
                run.measure(name, best[name], cases, "final", round_)
    (OUT / "resnet18_targets.json").write_text(json.dumps(run.rows, indent=1) + "\n")

    print(f"{cpu_count()} cores, no GPU; {original}.\n")
    if len(settings) > 1:
        print(f"Settings, 500x375 JPEG ({args.duration:g} s each; easyserve and direct raw, LitServe "
              f"{'and the original ' if args.easy_serve_src else ''}base64):\n")
        print(search_table(run) + "\n")
    peers = " and ".join(name for name in ("LitServe", ORIGINAL) if name in who) or "LitServe"
    print("Best settings: " + ", ".join(f"{name} {p}x{b}" for name, (p, b) in best.items()) +
          f" (ProcessPerGPU x MaxBatchSize); {args.rounds} round(s) of {args.duration:g} s each, order reversed "
          f"each round; ratios: mean (range over rounds). {peers} take{'s' if ' and ' not in peers else ''} JSON "
          "only: base64 rows are shown against both forms." +
          (" The original has no batching (one picture per forward): its MaxBatchSize is 1."
           if args.easy_serve_src else "") + "\n")
    print(final_table(run))


if __name__ == "__main__":
    main()
