"""ResNet-18 served against the same work done with no server, and against LitServe, in one run.

The ImageNet example (``handles/imagenet_resnet18.py``, ``configs/imagenet_resnet18.yaml``) with a
model of ResNet-18's real architecture (random weights, ``resnet18_inputs.py``) on CPU workers, for a
500x375 and a 1920x1200 JPEG, at concurrency 8 and 32::

    python benchmarks/resnet18_inputs.py          # once: the model and the pictures, in benchmarks/out/
    python benchmarks/resnet18_targets.py --litserve-python /tmp/litserve-venv/bin/python
    python benchmarks/resnet18_targets.py --settings 2x1 --rounds 3 --duration 10   # one setting, longer

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
- The original easy-serve is not measured: neither its source nor a package is available here.

First, every ``--settings`` entry (``PxB``: ProcessPerGPU x MaxBatchSize) is measured once on the
500x375 JPEG (raw for easyserve and direct, base64 for LitServe); then each server's best setting
(most requests per second, geometric mean over the concurrencies) is measured in ``--rounds``
rounds on both pictures and both forms, against the direct baseline with easyserve's best setting.
Servers run in their own process groups, stopped whole when done, whatever happens.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

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


def thread_env(threads: int) -> dict[str, str]:
    """The environment of an easyserve CPU worker with ``threads`` threads (as the pool sets it)."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.setdefault(var, str(threads))
    return env


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pgid: int) -> float:
    """CPU time (user and system) of the processes now in process group ``pgid``, and of this process's
    children (the load generator's clients)."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) == pgid or int(fields[1]) == os.getpid():
            total += int(fields[11]) + int(fields[12])
    return total / TICK


def machine_busy_seconds() -> float:
    """CPU time every process on the machine has used since it started, over all cores."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return (sum(values) - values[3] - values[4]) / TICK  # less idle and iowait


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


def direct_worker(spec: dict) -> None:
    """In a child process: set the handle up as a worker does, warm up, say ``ready``, wait for ``go``,
    run batches for ``duration`` seconds, and print what it did as one JSON line."""
    from easyserve.handle import Device
    from easyserve.loader import build, resolve

    handle = build(resolve(HANDLE, ROOT), {"model": spec["model"]})
    handle.setup(Device(kind="cpu", threads=spec["threads"], name=f"cpu/{spec['index']}"))
    info = task_info(Path(spec["picture"]), spec["form"])
    tasks = [{"task_id": f"direct-{i}", "task_info": info} for i in range(spec["batch"])]
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
    batch = min(max_batch, math.ceil(concurrency / processes))
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
def serving(command: list[str], ready_url: str, log: Path, env: dict | None = None):
    """Run a server in its own process group until the block ends; wait for ``ready_url`` to answer 200."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=ROOT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{command[0]} exited with {proc.returncode}; see {log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{ready_url} not ready after 180 s; see {log}")
            with contextlib.suppress(OSError, urllib.error.HTTPError):
                with urllib.request.urlopen(ready_url, timeout=2) as response:
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
        if who == "easyserve":
            path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
            command, ready = easyserve_command(processes, max_batch, port), "/ready"
            env = {**os.environ, "PYTHONPATH": path}
        else:
            command = [a.litserve_python, str(HERE / "peer_litserve_resnet18.py"), "--model", str(MODEL),
                       "--port", str(port), "--workers", str(processes), "--max-batch-size", str(max_batch),
                       "--batch-timeout", str(a.max_wait_ms / 1000)]
            ready, env = "/health", None
            cases = [(picture, "base64") for picture, _ in dict.fromkeys(cases)]
            cases = list(dict.fromkeys(cases))
        url = f"http://127.0.0.1:{port}"
        with serving(command, url + ready, OUT / f"{who}.log", env) as proc:
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
    lines = ["| ProcessPerGPU x MaxBatchSize | conc. | direct req/s | easyserve req/s | easyserve/direct | "
             "per core-s: easyserve/direct | mean batch | easyserve p99 ms | LitServe req/s | LitServe p99 ms | "
             "other jobs' cores |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    settings = list(dict.fromkeys(r["setting"] for r in run.rows if r["stage"] == "search"))
    for setting in settings:
        for c in run.args.concurrency:
            pick = {who: [r for r in run.rows if r["stage"] == "search" and r["setting"] == setting
                          and r["concurrency"] == c and r["who"] == who] for who in ("direct", "easyserve", "LitServe")}
            d, e, lit = (mean_of(pick[w], "rps") for w in ("direct", "easyserve", "LitServe"))
            lines.append(f"| {setting} | {c} | {d or 0:.1f} | {e or 0:.1f} | "
                         f"{ratio_text(pick['easyserve'], pick['direct'])}"
                         f" | {ratio_text(pick['easyserve'], pick['direct'], 'rps_per_core')}"
                         f" | {mean_of(pick['easyserve'], 'mean_batch') or 0:.2f} | "
                         f"{mean_of(pick['easyserve'], 'p99_ms') or 0:.0f} | "
                         f"{f'{lit:.1f}' if lit else '-'} | {mean_of(pick['LitServe'], 'p99_ms') or 0:.0f} | "
                         f"{mean_of([r for rows in pick.values() for r in rows], 'others_cores'):.2f} |")
    return "\n".join(lines)


def final_table(run: Run) -> str:
    lines = ["| picture | form | conc. | direct req/s | p50 ms | p99 ms | easyserve req/s | p50 ms | p99 ms | "
             "LitServe req/s | p50 ms | p99 ms | easyserve/direct | easyserve/LitServe | per core-s: "
             "easyserve/direct | per core-s: easyserve/LitServe | other jobs' cores |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    final = [r for r in run.rows if r["stage"] == "final"]
    for picture in dict.fromkeys(r["picture"] for r in final):
        for form in FORMS:
            for c in run.args.concurrency:
                pick = {who: [r for r in final if r["who"] == who and r["picture"] == picture
                              and r["form"] == form and r["concurrency"] == c] for who in ("direct", "easyserve")}
                pick["LitServe"] = [r for r in final if r["who"] == "LitServe" and r["picture"] == picture
                                    and r["concurrency"] == c]  # JSON only: against both forms
                if not pick["easyserve"]:
                    continue
                lines.append(f"| {picture} | {form} | {c} | {cell(pick['direct'])} | {cell(pick['easyserve'])} | "
                             f"{cell(pick['LitServe'])} | {ratio_text(pick['easyserve'], pick['direct'])} | "
                             f"{ratio_text(pick['easyserve'], pick['LitServe'])} | "
                             f"{ratio_text(pick['easyserve'], pick['direct'], 'rps_per_core')} | "
                             f"{ratio_text(pick['easyserve'], pick['LitServe'], 'rps_per_core')} | "
                             f"{mean_of([r for rows in pick.values() for r in rows], 'others_cores'):.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="1x1,2x1,1x8,2x8",
                        help="ProcessPerGPU x MaxBatchSize pairs to try (one: no search)")
    parser.add_argument("--concurrency", default="8,32", type=lambda s: [int(c) for c in s.split(",")])
    parser.add_argument("--duration", type=float, default=6.0, help="seconds each measurement lasts")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up before each")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the final comparison, order reversed each")
    parser.add_argument("--litserve-python", help="a python with litserve, onnxruntime and pillow installed")
    parser.add_argument("--direct-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.direct_worker:
        return direct_worker(json.loads(args.direct_worker))

    write_inputs()
    args.max_wait_ms = float(yaml.safe_load(CONFIG.read_text()).get("MaxWaitMs", 2))
    settings = [tuple(int(n) for n in s.split("x")) for s in args.settings.split(",")]
    who = ["direct", "easyserve"] + (["LitServe"] if args.litserve_python else [])
    run = Run(args)
    small, large = PICTURES["500x375"], PICTURES["1920x1200"]
    print(f"{cpu_count()} cores, no GPU; model {MODEL.name}; the original easy-serve is not available on this "
          "machine (no source, no package), so it is not measured", file=sys.stderr)
    best = {name: settings[0] for name in who}
    if len(settings) > 1:
        for i, setting in enumerate(settings):
            for name in who if i % 2 == 0 else who[::-1]:
                run.measure(name, setting, [(small, "raw")], "search", 0)
        best = {name: run.select(name, "search") for name in ("easyserve", "LitServe") if name in who}
        best["direct"] = best["easyserve"]
    cases = [(picture, form) for picture in (small, large) for form in FORMS]
    for round_ in range(args.rounds):
        for name in who if round_ % 2 == 0 else who[::-1]:
            run.measure(name, best[name], cases, "final", round_)
    (OUT / "resnet18_targets.json").write_text(json.dumps(run.rows, indent=1) + "\n")

    print(f"{cpu_count()} cores, no GPU. Original easy-serve: not available on this machine (no source, no "
          "package), not measured.\n")
    if len(settings) > 1:
        print(f"Settings, 500x375 JPEG ({args.duration:g} s each; easyserve and direct raw, LitServe base64):\n")
        print(search_table(run) + "\n")
    print("Best settings: " + ", ".join(f"{name} {p}x{b}" for name, (p, b) in best.items()) +
          f" (ProcessPerGPU x MaxBatchSize); {args.rounds} round(s) of {args.duration:g} s each, order reversed "
          "each round; ratios: mean (range over rounds). LitServe takes JSON only: its base64 rows are shown "
          "against both forms.\n")
    print(final_table(run))


if __name__ == "__main__":
    main()
