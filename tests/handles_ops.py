"""Handles for the operational tests: passing outages, leaks, noisy output, secrets in tracebacks."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np

from easyserve import Binary, Handle


def connect(url: str):
    raise ConnectionError("database unreachable")


class NeedsDatabase(Handle):
    """Setup reaches a database whose URL (with a password) is written in the source: the traceback
    shows that line, the exception line does not. Fails while the file HandleArgs["down"] exists."""

    def setup(self, device):
        if os.path.exists(self.args["down"]):
            self.db = connect("postgresql://admin:hunter2@db.internal/models")

    def forward(self, batch):
        return [{"pid": os.getpid(), **info} for info in batch]


class _Unencodable(set):
    def __iter__(self):  # JSON encodes a set as the list of its items
        raise MemoryError("cannot allocate the answer")


class Leaky(Handle):
    """Keeps HandleArgs["mb"] megabytes per batch forever (touched, so resident), HandleArgs["first_mb"]
    from its first batch on, and HandleArgs["setup_mb"] from its setup on, which takes HandleArgs["setup_s"]
    seconds; a batch takes HandleArgs["s"] seconds at least. {"oom": path} raises MemoryError unless ``path``
    exists (creating it first: once); {"oom": true} always does; {"oom": "answer"} answers a value whose
    encoding as JSON runs out of memory."""

    def setup(self, device):
        self.kept = []
        time.sleep(self.args.get("setup_s", 0))
        self.held = np.ones(int(self.args.get("setup_mb", 0) * 2**20), dtype=np.uint8)

    def forward(self, batch):
        if not hasattr(self, "first"):  # HandleArgs["first_mb"] on its first batch alone: a model's arena
            self.first = np.ones(int(self.args.get("first_mb", 0) * 2**20), dtype=np.uint8)
        for info in batch:
            oom = info.get("oom")
            if oom == "answer":
                return [{"n": _Unencodable()} for _ in batch]
            if oom is True or (isinstance(oom, str) and not os.path.exists(oom)):
                if isinstance(oom, str):
                    open(oom, "w").close()
                raise MemoryError("cannot allocate 4.0 GiB")
        self.kept.append(np.ones(int(self.args.get("mb", 0) * 2**20), dtype=np.uint8))
        time.sleep(self.args.get("s", 0))
        return [{"pid": os.getpid(), "n": info.get("n")} for info in batch]


class Noisy(Handle):
    """Prints to stdout and stderr; {"fail": true} raises in forward (a traceback in the log);
    {"lines": k, "size": s} prints k lines of s characters ({"warn": true}: then logs a warning);
    {"echo": text} has a subprocess write text, {"long": k} prints k characters and {"bar": true} a
    progress bar's state, neither ending its line (before the warning, if any);
    {"die": true} prints, then exits with code 9; {"fatal": true} ends it with CPython's fatal error."""

    def setup(self, device):
        print("noisy setup on", device.name)
        logging.getLogger("easyserve").warning("a warning from setup on %s", device.name)

    def forward(self, batch):
        for info in batch:
            print(f"forward sees n={info.get('n')}")
            for _ in range(int(info.get("lines", 0))):
                print("x" * int(info.get("size", 80)), file=sys.stderr)
            if "echo" in info:
                subprocess.run(["echo", str(info["echo"])], check=True)
            if "long" in info:
                print("y" * int(info["long"]), end="", flush=True)
            if info.get("bar"):
                sys.stderr.write("\r 40%|####      | 4/10")
            if info.get("warn"):
                logging.getLogger("easyserve").warning("a warning after %s lines", info.get("lines", 0))
            if info.get("fail"):
                raise ValueError(f"bad n={info.get('n')}")
            if info.get("die"):
                print("about to crash", file=sys.stderr)
                os._exit(9)
            if info.get("fatal"):  # as an extension's own call of it: CPython's dump to stderr, then abort()
                import ctypes

                ctypes.pythonapi.Py_FatalError(b"an extension gave up")
        return [{"n": info.get("n"), "env_key": os.environ.get("EASYSERVE_API_KEY")} for info in batch]


class Faults(Handle):
    """Warns in setup (Python's warnings), and logs two lines at a level of its own (ALERT, 35);
    {"fault": "raise"} raises in forward, "logged" logs a caught
    exception with its traceback, "thread" raises in a thread of its own."""

    def setup(self, device):
        import warnings

        warnings.warn("weights cast to float16", stacklevel=1)
        logging.addLevelName(35, "ALERT")  # a library's level of its own
        logging.getLogger("handle").log(35, "an alert\nin two lines")

    def forward(self, batch):
        import threading

        fault = batch[0].get("fault")
        if fault == "raise":
            raise ValueError("a fault in forward")
        if fault == "logged":
            try:
                {}["missing key"]
            except KeyError:
                logging.getLogger("handle").exception("caught and logged")
        if fault == "thread":
            thread = threading.Thread(target=lambda: 1 / 0, name="helper-thread")
            thread.start()
            thread.join()
        return [{"ok": True} for _ in batch]


class CountsInItsError(Handle):
    """forward sleeps {"sleep": s}; a batch holding {"bad": true} fails at one line, with a message of the
    batch's size: the whole batch's and the bad request's own differ."""

    def forward(self, batch):
        time.sleep(max(float(info.get("sleep", 0)) for info in batch))
        if any(info.get("bad") for info in batch):
            raise ValueError(f"a batch of {len(batch)} holds a bad request")
        return [{"ok": True} for _ in batch]


class Slow(Handle):
    """Each batch takes HandleArgs["s"] seconds; setup takes HandleArgs["restart_s"] seconds once the
    file HandleArgs["slow_restart"] exists, and in the first process to create the file
    HandleArgs["slow_first"]."""

    def setup(self, device):
        marker, first = self.args.get("slow_restart"), self.args.get("slow_first")
        if marker and os.path.exists(marker) or first and _created(first):
            time.sleep(float(self.args.get("restart_s", 3)))

    def forward(self, batch):
        time.sleep(float(self.args.get("s", 0.05)))
        return [{"n": info.get("n"), "pid": os.getpid()} for info in batch]


class SetsUp(Handle):
    """Its setup takes HandleArgs["setup_s"] seconds, and writes when it began and ended, with the worker's
    CUDA_VISIBLE_DEVICES, to the file HandleArgs["journal"] (if given): "<device> <began> <ended>". Each
    batch takes HandleArgs["forward_s"] (default 0)."""

    def setup(self, device):
        began = time.time()
        time.sleep(float(self.args.get("setup_s", 0)))
        if self.args.get("journal"):
            with open(self.args["journal"], "a") as journal:
                journal.write(f"{os.environ.get('CUDA_VISIBLE_DEVICES')} {began} {time.time()}\n")

    def forward(self, batch):
        time.sleep(float(self.args.get("forward_s", 0)))
        return [{"pid": os.getpid()} for _ in batch]


class SetsUpByGpu(Handle):
    """Its setup takes HandleArgs["setup_s"][gpu] seconds (by CUDA_VISIBLE_DEVICES; 0 where none is given)
    and then raises on the GPUs listed in HandleArgs["fails_on"]; each batch takes HandleArgs["forward_s"]."""

    def setup(self, device):
        gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        time.sleep(float(self.args.get("setup_s", {}).get(gpu, 0)))
        if gpu in self.args.get("fails_on", ()):
            raise MemoryError(f"CUDA out of memory on GPU {gpu}")

    def forward(self, batch):
        time.sleep(float(self.args.get("forward_s", 0)))
        return [{"pid": os.getpid()} for _ in batch]


class Burns(Handle):
    """Each batch spends HandleArgs["cpu_s"] seconds of its own CPU time (or a request's own {"cpu_s": s},
    the most of its batch's), as a model does (a sleep goes on while its process is stopped; a
    computation does not), and answers its pid."""

    def forward(self, batch):
        default = float(self.args.get("cpu_s", 1.0))
        until = time.process_time() + max(float(info.get("cpu_s", default)) for info in batch)
        while time.process_time() < until:
            pass
        return [{"n": info.get("n"), "pid": os.getpid()} for info in batch]


def _created(path: str) -> bool:
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True


class Sums(Handle):
    """Answers the length and sum of the list under "x" (whatever its size)."""

    def forward(self, batch):
        return [{"n": len(info["x"]), "sum": float(sum(info["x"]))} for info in batch]


class Versioned(Handle):
    """Answers its HandleArgs["version"] and pid, after HandleArgs["s"] seconds a batch; its setup takes
    HandleArgs["setup_s"] seconds."""

    def setup(self, device):
        print(f"version {self.args.get('version')} setting up in {os.getpid()}", flush=True)
        time.sleep(float(self.args.get("setup_s", 0)))

    def forward(self, batch):
        time.sleep(float(self.args.get("s", 0.01)))
        return [{"version": self.args.get("version"), "pid": os.getpid(), "n": info.get("n")} for info in batch]


class DiesAfterReady(Handle):
    """While the file HandleArgs["marker"] exists, the process exits 0.2 s after its setup, by itself."""

    def setup(self, device):
        if os.path.exists(self.args["marker"]):
            import threading

            threading.Timer(0.2, os._exit, args=(4,)).start()

    def forward(self, batch):
        return [{"n": info.get("n")} for info in batch]


class WireBuffers(Handle):
    """Answers the send and receive buffer sizes of this worker's socket to the server (its first argument)."""

    def forward(self, batch):
        import socket

        with socket.socket(fileno=os.dup(int(sys.argv[1]))) as sock:
            sizes = {"send": sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
                     "receive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)}
        return [sizes for _ in batch]


LETTERS = bytes(97 + i % 26 for i in range(256))


class LargeAnswer(Handle):
    """Answers ``{"mb": N, "as": "array" | "binary" | "json"}`` with N MB: a uint8 array (``.npy`` when
    asked), an ``easyserve.Binary``, or a JSON object holding a string; byte ``i`` is ``i % 251`` (in
    JSON, the letter ``i % 251 % 26``)."""

    def forward(self, batch):
        out = []
        for info in batch:
            n = int(float(info["mb"]) * 2**20)
            data = np.tile(np.arange(251, dtype=np.uint8), n // 251 + 1)[:n]
            kind = info.get("as", "array")
            if kind == "binary":
                out.append(Binary(data.data))
            elif kind == "json":
                out.append({"s": data.tobytes().translate(LETTERS).decode()})
            else:
                out.append(data)
        return out


class WarnsAndDies(Handle):
    """{"die": s}: after s seconds, logs a warning, then the process exits with code 3 at once."""

    def forward(self, batch):
        if any(info.get("die") is not None for info in batch):
            time.sleep(max(float(info.get("die") or 0) for info in batch))
            logging.getLogger("easyserve").warning("about to run out of memory")
            os._exit(3)
        return batch


class ThreadSettings(Handle):
    """Answers the thread counts the worker's environment gives the numeric libraries."""

    def run_batch(self, batch):
        names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
        return [(200, {name: os.environ.get(name) for name in names})] * len(batch)


def waiting_on_the_network(seconds: float) -> None:
    time.sleep(seconds)  # a call that never returns in time: a deadlock, a socket, a GPU's queue


class StuckHere(Handle):
    """Its forward waits in :func:`waiting_on_the_network` for HandleArgs["forward_s"] (60) seconds; its setup,
    for HandleArgs["setup_s"] (0); with HandleArgs["own_sigusr2"], SIGUSR2 is its own."""

    def setup(self, device):
        if self.args.get("own_sigusr2"):  # a handle that takes the signal for its own
            signal.signal(signal.SIGUSR2, lambda signum, frame: None)
        waiting_on_the_network(float(self.args.get("setup_s", 0)))

    def forward(self, batch):
        waiting_on_the_network(float(self.args.get("forward_s", 60)))
        return batch
