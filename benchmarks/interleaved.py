"""Served against the handle alone, in windows of a few seconds taken in turn: a ratio that the
machine's drift does not decide.

``resnet18_targets.py`` measures each contender for a few seconds after the other, and on a shared
machine the speed of the same work moved by up to 35% from one minute to the next: more than the 5%
in question when asking whether a served model reaches 95% of the handle called directly. Here both
run side by side for the whole measurement, and only one of them at a time is let run:

- *direct*: ``P`` processes (ProcessPerGPU) with a worker's environment and thread budget, calling
  the example handle's ``run_batch`` in a closed loop on the request as ``/predict`` hands it over
  (the same work as ``resnet18_targets.py``'s direct baseline), each counting its requests in a
  shared file;
- *easyserve*: ``easyserve run`` with the example config and the same ProcessPerGPU, driven by
  ``easyserve.bench`` (or ``wrk``, with ``--load wrk``) at the concurrency, counting the 200s it
  answers (``/stats``).

Windows alternate: one of the two is stopped (SIGSTOP: the direct processes, or the load generator's
clients, and then the server is waited for until it has answered every request it holds), the other
continued (SIGCONT). The first ``--settle`` seconds of a window are not counted (the load comes back,
queues fill); the next ``--window`` seconds are. Three seconds: with one, the served windows came out
20% slower than with three, as if what had been stopped had to be paged back in.
Each pair of neighbouring windows gives a ratio, served over direct, so that every window but the
first and last counts twice, whichever side it belongs to.

Processes started alike do not run alike: two sets of the same direct processes, measured this way
against each other (``--calibrate``), came out 0.96-1.04 apart in five tries, each keeping its
ratio for its whole life. So one set of processes is one draw, however many windows it is given,
and a case runs in ``--rounds`` rounds, each with fresh processes on both sides, the rounds going
over every case in turn. And the second set's first counted window ran fast in 5 of 6 rounds,
which put the second set 2% ahead of its twin: so each round first gives both sides one window that
is not counted, and every other round starts with the other side instead of direct (the twins then
read 1.000, 95% interval 0.965-1.013, over 6 rounds). The ratio reported is the median over the
pairs of all rounds, with a 95% interval that resamples whole rounds (the pairs of one round are not
independent draws), the rounds' own medians and the middle half of the pairs. The latency of a
request held over a stopped window means nothing, so none is reported: ``resnet18_targets.py`` has
them::

    python benchmarks/resnet18_inputs.py          # once: the model and the pictures
    python benchmarks/interleaved.py              # every picture and form at concurrency 8 and 32
    python benchmarks/interleaved.py --load wrk   # the load from wrk (C), which takes less of the cores
    python benchmarks/interleaved.py --setting 2x8 --concurrency 32   # another ProcessPerGPU x MaxBatchSize
    python benchmarks/interleaved.py --calibrate --pictures 500x375 --forms raw   # the method against itself
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import mmap
import os
import random
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import resnet18_targets as targets  # noqa: E402
from resnet18_inputs import PICTURES, write_inputs  # noqa: E402

import easyserve  # noqa: E402
from easyserve.devices import cpu_count  # noqa: E402
from easyserve.payloads import ImagePayload  # noqa: E402

COUNT = struct.Struct("q")


def direct_worker(spec: dict) -> None:
    """In a child process: set the handle up as a worker does, warm up, say ``ready``, then run batches
    for ever, writing the number of requests done to the shared file after each."""
    handle, tasks = targets.direct_handle(spec)
    for _ in range(3):
        handle.run_batch(tasks)
    with open(spec["counter"], "r+b") as f:
        counter = mmap.mmap(f.fileno(), COUNT.size)
    print("ready", flush=True)
    done = 0
    while True:
        results = handle.run_batch(tasks)
        if any(status != 200 for status, _ in results):
            sys.exit("a direct batch failed")
        done += len(tasks)
        COUNT.pack_into(counter, 0, done)


class Direct:
    """``processes`` direct workers, stopped until :meth:`resume`; :meth:`done` sums their counts."""

    def __init__(self, processes: int, max_batch: int, picture: Path, form: str, concurrency: int) -> None:
        self.counters: list[str] = []
        self.procs: list[subprocess.Popen] = []
        try:
            self._start(processes, max_batch, picture, form, concurrency)
        except BaseException:
            self.close()
            raise
        self.pause()

    def _start(self, processes: int, max_batch: int, picture: Path, form: str, concurrency: int) -> None:
        threads = max(1, cpu_count() // processes)
        for index in range(processes):
            shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
            fd, path = tempfile.mkstemp(prefix="easyserve-direct-", dir=shm)
            os.write(fd, bytes(COUNT.size))
            os.close(fd)
            spec = {"model": str(targets.MODEL), "threads": threads, "index": index, "picture": str(picture),
                    "form": form, "batch": targets.direct_batch(processes, max_batch, concurrency), "counter": path}
            self.counters.append(path)
            self.procs.append(subprocess.Popen([sys.executable, __file__, "--direct-worker", json.dumps(spec)],
                                               stdout=subprocess.PIPE, text=True, env=targets.thread_env(threads),
                                               cwd=targets.ROOT, start_new_session=True))
        for proc in self.procs:
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("a direct worker failed to start")

    def done(self) -> int:
        total = 0
        for path in self.counters:
            with open(path, "rb") as f:
                total += COUNT.unpack(f.read(COUNT.size))[0]
        return total

    def pause(self) -> None:
        signal_all([p.pid for p in self.procs], signal.SIGSTOP)

    def resume(self) -> None:
        signal_all([p.pid for p in self.procs], signal.SIGCONT)

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGCONT)
            targets.stop_group(proc)
        for path in self.counters:
            with contextlib.suppress(OSError):
                os.unlink(path)


def signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def loadgen_clients() -> list[int]:
    """This process's children that are the load generator's clients."""
    found = []
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        with open(f"/proc/{os.getpid()}/task/{task}/children") as f:
            for pid in f.read().split():
                with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as c:
                    if b"easyserve.loadgen" in c.read():
                        found.append(int(pid))
    return found


class BenchLoad:
    """``easyserve.bench``'s clients, at ``concurrency``, for longer than the windows can last."""

    def __init__(self, url: str, picture: Path, form: str, concurrency: int) -> None:
        self.url, self.payload, self.concurrency = url, ImagePayload(picture, raw=form == "raw"), concurrency
        self.thread = threading.Thread(target=self._run)
        self.clients: list[int] = []

    def _run(self) -> None:
        with contextlib.suppress(Exception):  # its clients are killed after the last window
            easyserve.bench(self.url, self.payload, concurrency=self.concurrency, duration=86400, warmup=1,
                            progress=False, timeout=86400)

    def start(self, running: Callable[[], bool]) -> list[int]:
        """Start; the processes to stop and continue, once ``running()`` says the load is on."""
        self.thread.start()
        deadline = time.monotonic() + 60
        while not loadgen_clients() or not running():
            if time.monotonic() > deadline:
                raise RuntimeError("the load generator did not start")
            time.sleep(0.2)
        self.clients = loadgen_clients()
        return self.clients

    def stop(self) -> None:
        signal_all(self.clients, signal.SIGKILL)
        self.thread.join()


class WrkLoad(BenchLoad):
    """``wrk`` (one thread, ``concurrency`` connections), posting the same body as ``easyserve.bench``."""

    SCRIPT = ('wrk.method = "POST"\n'
              'local f = assert(io.open(os.getenv("EASYSERVE_BODY"), "rb"))\n'
              'wrk.body = f:read("*a")\nf:close()\n'
              'wrk.headers["Content-Type"] = os.getenv("EASYSERVE_CONTENT_TYPE")\n')

    def start(self, running: Callable[[], bool]) -> list[int]:
        [body] = self.payload.bodies()
        self.files = tempfile.TemporaryDirectory(prefix="easyserve-wrk-")
        script, data = Path(self.files.name) / "post.lua", Path(self.files.name) / "body"
        script.write_text(self.SCRIPT)
        data.write_bytes(body.data)
        env = {**os.environ, "EASYSERVE_BODY": str(data), "EASYSERVE_CONTENT_TYPE": body.headers["Content-Type"]}
        self.proc = subprocess.Popen(["wrk", "-t1", f"-c{self.concurrency}", "-d86400s", "--timeout", "600s",
                                      "-s", str(script), self.url + self.payload.path], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.clients = [self.proc.pid]
        deadline = time.monotonic() + 60
        while not running():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("wrk did not start")
            time.sleep(0.2)
        return self.clients

    def stop(self) -> None:
        targets.stop_group(self.proc)
        self.files.cleanup()


def stats(url: str) -> dict:
    with urllib.request.urlopen(url + "/stats", timeout=10) as response:
        return json.load(response)


def answered(url: str) -> int:
    return stats(url)["statuses"].get("200", 0)


def wait_idle(url: str) -> None:
    """Until the server has answered every request it holds (its load generator stopped)."""
    deadline = time.monotonic() + 60
    while True:
        now = stats(url)
        if now["queue_depth"] == 0 and all(w["state"] == "idle" for w in now["workers"]):
            return
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not finish its requests within 60 s")
        time.sleep(0.05)


class Served:
    """``easyserve run`` with the example config under its load generator, kept until ``stack`` closes.
    Paused: the load generator stopped and every request the server held answered, so that nothing of
    it runs beside direct."""

    def __init__(self, stack: contextlib.ExitStack, processes: int, max_batch: int, picture: Path, form: str,
                 concurrency: int, wrk: bool) -> None:
        port = targets.free_port()
        self.url = f"http://127.0.0.1:{port}"
        stack.enter_context(targets.serving(targets.easyserve_command(processes, max_batch, port),
                                            self.url + "/ready", targets.OUT / "interleaved.log",
                                            targets.checkout_env()))
        load = (WrkLoad if wrk else BenchLoad)(self.url, picture, form, concurrency)
        stack.callback(load.stop)
        self.clients = load.start(lambda: answered(self.url) >= 2 * concurrency)
        self.pause()

    def pause(self) -> None:
        signal_all(self.clients, signal.SIGSTOP)
        wait_idle(self.url)

    def resume(self) -> None:
        signal_all(self.clients, signal.SIGCONT)

    def done(self) -> int:
        return answered(self.url)


def one_round(picture: Path, form: str, concurrency: int, processes: int, max_batch: int, pairs: int,
              window: float, settle: float, wrk: bool, calibrate: bool, other_first: bool) -> dict:
    """Fresh processes for both sides; one window of each not counted; then ``2 * pairs + 1`` windows
    in turn, starting and ending with direct (or with ``other_first``, the other side). The other side
    is easyserve, or with ``calibrate`` another set of direct processes (the method against itself).
    Each pair of neighbouring windows gives a ratio, the other side's rate over direct's.
    """
    windows: list[tuple[int, float]] = []  # (side, requests/s) of each counted window, in time order
    with contextlib.ExitStack() as stack:
        sides = [Direct(processes, max_batch, picture, form, concurrency)]
        stack.callback(sides[0].close)
        if calibrate:
            sides.append(Direct(processes, max_batch, picture, form, concurrency))
            stack.callback(sides[1].close)
        else:
            sides.append(Served(stack, processes, max_batch, picture, form, concurrency, wrk))
        lead = int(other_first)
        for k in range(-2, 2 * pairs + 1):
            turn = lead if k % 2 == 0 else 1 - lead
            sides[1 - turn].pause()  # served: once the server has answered what it holds
            sides[turn].resume()
            time.sleep(settle)
            before, started = sides[turn].done(), time.perf_counter()
            time.sleep(window)
            if k >= 0:  # the first two windows only warm both sides up
                windows.append((turn, (sides[turn].done() - before) / (time.perf_counter() - started)))
        sides[turn].pause()
    neighbours = [dict(pair) for pair in zip(windows, windows[1:])]
    return {"direct": [rate for side, rate in windows if side == 0], "other": [rate for side, rate in windows if side],
            "other_first": other_first, "ratios": [both[1] / both[0] for both in neighbours]}


def summary(case: dict, rounds: list[dict]) -> dict:
    """A case's rounds taken together: the median ratio over every pair of windows, and its 95% interval."""
    ratios = [r for one in rounds for r in one["ratios"]]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return {**case, "rounds": rounds, "ratios": ratios, "median": statistics.median(ratios),
            "q1": quartiles[0], "q3": quartiles[-1],
            "round_medians": [statistics.median(one["ratios"]) for one in rounds],
            "interval": rounds_interval(rounds) if len(rounds) > 1 else median_interval(ratios),
            "direct": [d for one in rounds for d in one["direct"]],
            "other": [o for one in rounds for o in one["other"]]}


def rounds_interval(rounds: list[dict], confidence: float = 0.95, resamples: int = 4000) -> tuple[float, float]:
    """A 95% interval for the median ratio that counts each round's processes as one draw: rounds are
    resampled with replacement (a cluster bootstrap), their ratios pooled and the median taken.
    Windows of one round share processes, and processes started alike ran up to 4% apart for their
    whole life (see ``--calibrate``), so treating windows as independent draws would claim too much."""
    draw = random.Random(0)
    medians = sorted(statistics.median([r for one in draw.choices(rounds, k=len(rounds)) for r in one["ratios"]])
                     for _ in range(resamples))
    tail = (1 - confidence) / 2
    return medians[int(tail * resamples)], medians[int((1 - tail) * resamples) - 1]


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """A confidence interval for the median that assumes nothing of the distribution: the k-th lowest
    and the k-th highest value, k the largest for which fewer than k of n values fall below the
    median with probability at most (1 - confidence) / 2 (a binomial tail; with 8 values that is the
    lowest and the highest, with 24 the 7th of each end). Neighbouring ratios share a window,
    so they are not quite independent: read it as a guide."""
    n, ordered = len(values), sorted(values)
    k, tail = 0, 0.0
    while k < n // 2 and tail + math.comb(n, k) / 2 ** n <= (1 - confidence) / 2:
        tail += math.comb(n, k) / 2 ** n
        k += 1
    k = max(k, 1)
    return ordered[k - 1], ordered[n - k]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pictures", default=",".join(PICTURES), type=lambda s: s.split(","))
    parser.add_argument("--forms", default="raw,base64", type=lambda s: s.split(","))
    parser.add_argument("--concurrency", default="8,32", type=lambda s: [int(c) for c in s.split(",")])
    parser.add_argument("--setting", default="2x1", help="ProcessPerGPU x MaxBatchSize")
    parser.add_argument("--rounds", type=int, default=6,
                        help="rounds per case, each with fresh processes; rounds go over every case in turn")
    parser.add_argument("--pairs", type=int, default=4,
                        help="windows per round of the side that does not lead it (the other gets one more)")
    parser.add_argument("--window", type=float, default=5.0, help="seconds counted in each window")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds not counted at the start of each window")
    parser.add_argument("--load", choices=["bench", "wrk"], default="bench",
                        help="the load generator: easyserve.bench (Python), or wrk (C), which takes less of the cores")
    parser.add_argument("--calibrate", action="store_true",
                        help="direct against a second set of direct processes instead of easyserve: what the "
                             "method reads where there is no difference")
    parser.add_argument("--direct-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.direct_worker:
        return direct_worker(json.loads(args.direct_worker))
    write_inputs()
    processes, max_batch = (int(n) for n in args.setting.split("x"))
    other = "direct (second set)" if args.calibrate else "easyserve"
    cases = [{"picture": PICTURES[name].stem, "form": form, "concurrency": concurrency, "path": PICTURES[name]}
             for name in args.pictures for form in args.forms for concurrency in args.concurrency]
    rounds: list[list[dict]] = [[] for _ in cases]
    for n in range(args.rounds):
        for case, done in zip(cases, rounds):
            done.append(one_round(case["path"], case["form"], case["concurrency"], processes, max_batch, args.pairs,
                                  args.window, args.settle, args.load == "wrk", args.calibrate, other_first=n % 2 == 1))
            print(f"  round {n + 1}/{args.rounds} {case['picture']} {case['form']} c={case['concurrency']}: "
                  f"{other}/direct {statistics.median(done[-1]['ratios']):.3f}", file=sys.stderr, flush=True)
    results = [summary({k: v for k, v in case.items() if k != "path"}, done) for case, done in zip(cases, rounds)]
    (targets.OUT / "interleaved.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"{cpu_count()} cores, no GPU; ProcessPerGPU x MaxBatchSize {args.setting}; {args.rounds} rounds of fresh "
          f"processes per case, each of {2 * args.pairs + 1} counted windows of {args.window:g} s in turn (after one "
          f"window of each side not counted; {args.settle:g} s of each window not counted), led by direct and by "
          f"{other} in turn; a ratio for each pair of neighbouring windows\n")
    print(f"| picture | form | conc. | direct req/s | {other} req/s | {other}/direct: median | "
          f"95% interval ({'rounds resampled' if args.rounds > 1 else 'order statistics'}) | round medians | "
          "middle half | lowest | highest |")
    print("|---|---|---:|---:|---:|---:|---|---|---|---:|---:|")
    for r in results:
        print(f"| {r['picture']} | {r['form']} | {r['concurrency']} | {statistics.median(r['direct']):.1f} | "
              f"{statistics.median(r['other']):.1f} | {r['median']:.3f} | "
              f"{r['interval'][0]:.3f}-{r['interval'][1]:.3f} | "
              f"{min(r['round_medians']):.3f}-{max(r['round_medians']):.3f} | {r['q1']:.3f}-{r['q3']:.3f} | "
              f"{min(r['ratios']):.3f} | {max(r['ratios']):.3f} |")


if __name__ == "__main__":
    main()
