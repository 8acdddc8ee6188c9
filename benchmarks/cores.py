"""Where a machine's cores go while easyserve serves the ResNet-18 example, against the handle alone.

Served by ``easyserve run`` on CPU workers and driven by ``easyserve.bench``, as in
``resnet18_targets.py``; over a steady window of each measurement, every process's CPU time is read
from /proc and summed by kind (the workers, the server process, the load generator's clients,
everything else), and the cores nobody used from /proc/stat. Beside it, the direct baseline of
``resnet18_targets.py`` (the same processes calling the handle in a loop) and its idle cores. Each
``--checkout`` is an easyserve source tree to serve from (default: this one), so two commits are
compared side by side, the load generator and the model the same for both::

    python benchmarks/resnet18_inputs.py           # once: the model and the pictures
    git worktree add /tmp/easyserve-before HEAD~1
    python benchmarks/cores.py --checkout /tmp/easyserve-before --checkout . --rounds 3
    python benchmarks/cores.py --setting 2x2      # another ProcessPerGPU x MaxBatchSize

Rounds go over the checkouts (and direct) in turn, the order reversed each round. Figures are in
cores (of ``os.cpu_count()``), and per request in CPU-milliseconds.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import resnet18_targets as targets  # noqa: E402
from resnet18_inputs import PICTURES, write_inputs  # noqa: E402

import easyserve  # noqa: E402
from easyserve.payloads import ImagePayload  # noqa: E402

KINDS = {"easyserve.worker": "workers", "easyserve.loadgen": "load generator", "easyserve.cli": "server process"}


def processes() -> dict[int, tuple[str, int]]:
    """Every process's kind and CPU ticks (user and system) so far."""
    found = {}
    for pid, fields in targets.process_stats():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        kind = next((k for key, k in KINDS.items() if key in command), "other")
        found[pid] = (kind, int(fields[11]) + int(fields[12]))
    return found


def cores_by_kind(before: dict, after: dict, seconds: float) -> dict[str, float]:
    cores: dict[str, float] = collections.Counter()
    for pid, (kind, ticks) in after.items():
        cores[kind] += (ticks - before.get(pid, (kind, 0))[1]) / targets.TICK / seconds
    return cores


def served(checkout: Path, picture: Path, form: str, concurrency: int, duration: float,
           setting: tuple[int, int]) -> dict:
    port = targets.free_port()
    env = {**targets.thread_env(1, easyserve_path=False), "PYTHONPATH": str(checkout.resolve())}
    command = targets.easyserve_command(*setting, port)
    url = f"http://127.0.0.1:{port}"
    with targets.serving(command, url + "/ready", targets.OUT / "cores.log", env, cwd=checkout):
        bench = threading.Thread(target=easyserve.bench, args=(url, ImagePayload(picture, raw=form == "raw")),
                                 kwargs={"concurrency": concurrency, "duration": duration + 3, "warmup": 1,
                                         "progress": False})
        bench.start()
        time.sleep(2)  # past the warm-up
        count = json.load(urllib.request.urlopen(url + "/stats"))["requests"]
        procs, idle, started = processes(), targets.machine_idle_seconds(), time.perf_counter()
        time.sleep(duration)
        seconds = time.perf_counter() - started
        cores = cores_by_kind(procs, processes(), seconds)
        idle = (targets.machine_idle_seconds() - idle) / seconds
        count = json.load(urllib.request.urlopen(url + "/stats"))["requests"] - count
        bench.join()
    return {"rps": count / seconds, **cores, "idle": idle}


def direct(picture: Path, form: str, concurrency: int, duration: float, setting: tuple[int, int]) -> dict:
    idle, started = targets.machine_idle_seconds(), time.perf_counter()
    result = targets.measure_direct(*setting, picture, form, concurrency, duration, 2.0)
    seconds = time.perf_counter() - started  # start-up and warm-up too: idle is an upper bound
    return {"rps": result["rps"], "workers": result["cores"], "other": result["others_cores"],
            "idle": (targets.machine_idle_seconds() - idle) / seconds}


def label(checkout: Path) -> str:
    """The checkout and its commit, marked when it has changes not committed."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "not a git checkout"
    return f"{checkout} ({commit}{', with changes' if git('status', '--porcelain', '--untracked-files=no') else ''})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", action="append", type=Path, help="an easyserve source tree (repeatable)")
    parser.add_argument("--picture", default="1920x1200", choices=list(PICTURES))
    parser.add_argument("--form", default="base64", choices=["raw", "base64"])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of each steady window")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--setting", default="2x1", help="ProcessPerGPU x MaxBatchSize")
    args = parser.parse_args()
    write_inputs()
    setting = tuple(int(n) for n in args.setting.split("x"))
    picture = PICTURES[args.picture]
    checkouts = args.checkout or [targets.ROOT]
    contenders = ["direct", *[str(c) for c in checkouts]]
    rows: dict[str, list[dict]] = {name: [] for name in contenders}
    for round_ in range(args.rounds):
        for name in contenders if round_ % 2 == 0 else contenders[::-1]:
            if name == "direct":
                row = direct(picture, args.form, args.concurrency, args.duration, setting)
            else:
                row = served(Path(name), picture, args.form, args.concurrency, args.duration, setting)
            rows[name].append(row)
            print(f"round {round_}: {name}: {json.dumps({k: round(v, 3) for k, v in row.items()})}", file=sys.stderr)
    columns = ["workers", "server process", "load generator", "other", "idle"]
    print(f"{os.cpu_count()} cores; {args.picture} as {args.form}, concurrency {args.concurrency}, ProcessPerGPU "
          f"{setting[0]}, MaxBatchSize {setting[1]}; {args.rounds} rounds of {args.duration:g} s; median over rounds\n")
    print("| contender | requests/s | " + " | ".join(f"{c} (cores)" for c in columns) + " | workers' CPU-ms/request |")
    print("|---|---:|" + "---:|" * (len(columns) + 1))
    for name in contenders:
        def median(key: str) -> float:
            return statistics.median(r.get(key, 0.0) for r in rows[name])

        per_request = statistics.median(r["workers"] / r["rps"] * 1000 for r in rows[name])
        shown = name if name == "direct" else label(Path(name))
        print(f"| {shown} | {median('rps'):.1f} | " + " | ".join(f"{median(c):.3f}" for c in columns) +
              f" | {per_request:.1f} |")


if __name__ == "__main__":
    main()
