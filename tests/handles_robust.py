"""Handles for the robustness tests. Workers import this module by name (the tests folder is on sys.path)."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np

from easyserve import Handle


class Sleeper(Handle):
    """Echoes each request's task_info; a batch takes as long as its largest {"sleep": s};
    preprocess rejects {"reject": why} (a 400 for that request alone).

    HandleArgs: ``setup_s`` makes setup take that long; ``journal`` names a file to which every task
    run is appended (its ``mark``, one per line) before the batch sleeps.
    """

    def setup(self, device):
        if self.args.get("setup_s"):
            print(f"sleeping {float(self.args['setup_s']):g} s in setup", flush=True)
        time.sleep(float(self.args.get("setup_s", 0)))

    def preprocess(self, task):
        info = task["task_info"]
        if "reject" in info:
            raise ValueError(f"rejected: {info['reject']}")
        return info

    def forward(self, batch):
        journal = self.args.get("journal")
        if journal:
            with open(journal, "a") as f:
                f.writelines(f"{info.get('mark', '?')}\n" for info in batch)
        time.sleep(max(float(info.get("sleep", 0)) for info in batch))
        return batch


class Rows(Handle):
    """{"x": [3 numbers]} -> the numbers times 10; forward returns a Python list with one row per request.

    A batch holding a row whose first number is negative takes half a second (to let others queue up).
    """

    def preprocess(self, task):
        return np.asarray(task["task_info"]["x"], dtype=np.float64)

    def forward(self, batch):
        if any(row[0] < 0 for row in batch):
            time.sleep(0.5)
        return [row * 10 for row in batch]

    def postprocess(self, output, task):
        return np.asarray(output).tolist()


class TwoOutputs(Handle):
    """{"x": number} -> {"box": [x] * 4, "score": 2x}, from a model of two outputs returned as a list, as
    ONNX Runtime's ``session.run`` gives them (boxes [N, 4], scores [N]). A batch holding a negative x
    takes half a second (to let others queue up)."""

    def preprocess(self, task):
        return np.float64(task["task_info"]["x"])

    def forward(self, batch):
        if (batch < 0).any():
            time.sleep(0.5)
        return [np.repeat(batch[:, None], 4, axis=1), batch * 2]

    def postprocess(self, output, task):
        boxes, scores = output
        return {"box": np.asarray(boxes).tolist(), "score": np.asarray(scores).tolist()}


class Features(Handle):
    """{"x": [numbers]} -> the numbers doubled; preprocess keeps the JSON's own types (int64 or float64),
    and forward needs one array. A batch holding a negative number takes half a second."""

    def preprocess(self, task):
        return np.asarray(task["task_info"]["x"])

    def forward(self, batch):
        if (batch < 0).any():
            time.sleep(0.5)
        return batch.astype(np.float64) * 2


class StopsItsChildren(Handle):
    """Starts a child process (exec'd, and forked by multiprocessing) and stops it with SIGTERM; answers
    how each ended (``-15``: the signal ended it)."""

    def forward(self, batch):
        import multiprocessing
        import subprocess
        import sys

        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        time.sleep(0.2)
        child.terminate()
        forked = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
        forked.start()
        time.sleep(0.2)
        forked.terminate()
        forked.join(10)
        return [{"exec": child.wait(10), "fork": forked.exitcode} for _ in batch]


class PreprocessFaults(Handle):
    """preprocess fails as {"fault": ...} asks: "misspelt" (a NameError), "self" (an attribute
    missing on the handle) and "task" (a key missing on the task), the handle's faults; "module" (numpy
    has no dtype of the name the request gives), "input" (``.lower()`` on the request's number) and
    "canvas" (an array of {"h", "w"} bytes), the client's; "dtype" (numpy reads the dtype the request
    names), the client's; "unwritten" (the handle's own NotImplementedError) and "helper" (one from a
    helper module of its own), the handle's; "dispatch" (a method of the handle the request names, and
    none has that name), the client's; else it echoes the request."""

    def preprocess(self, task):
        info = task["task_info"]
        fault = info.get("fault")
        if fault == "misspelt":
            return infoo  # noqa: F821
        if fault == "self":
            return self.sesion
        if fault == "dispatch":  # a method the request names ({"mode": "lower"}), none of that name
            return getattr(self, "mode_" + info.get("mode", "upper"))(info)
        if fault == "task":  # a key misspelt on the task itself, not on the request's fields
            return task["task_inf"]
        if fault == "module":  # a name from the request
            return getattr(np, info.get("dtype", "flaot32"))(1)
        if fault == "input":
            return info["x"].lower()
        if fault == "canvas":  # sized by the request: numpy refuses it at once, without taking any memory
            return np.zeros((int(info["h"]), int(info["w"])), np.uint8).sum()
        if fault == "dtype":  # numpy reads the request's "(,)i4" with ast: a SyntaxError, the request's
            return np.dtype(info["descr"]).name
        if fault == "unwritten":
            raise NotImplementedError("this handle reads no such request yet")
        if fault == "helper":  # in a module of the handle's own, beside it
            from handles_for_tests import decode_tiff

            return decode_tiff(b"II*\x00")
        return info

    def forward(self, batch):
        return batch


class Dot(Handle):
    """Each request's "x", three numbers, dotted with (1, 2, 3); forward takes the batch as one array, so
    a request of another length fails the batch it is in. An "x" beginning with -1 makes forward raise
    asyncio's CancelledError (a BaseException), as a handle's own asyncio code may; {"hold": s} sleeps
    s seconds in preprocess. Answers {"dot": ..., "forwards": calls of forward this worker made so far}."""

    def setup(self, device):
        self.forwards = 0

    def preprocess(self, task):
        info = task["task_info"]
        time.sleep(float(info.get("hold", 0)))
        return np.asarray(info["x"], np.float64)

    def forward(self, batch):
        self.forwards += 1
        batch = np.asarray(batch)
        if (batch[:, 0] == -1).any():
            import asyncio

            raise asyncio.CancelledError()
        return batch @ np.array([1.0, 2.0, 3.0])

    def postprocess(self, output, task):
        return {"dot": float(output), "forwards": self.forwards}


class RemembersLastBatch(Handle):
    """Answers whether the array the previous request's preprocess made was still alive when this
    request's preprocess ran (a worker that holds its last batch while idle keeps it)."""

    def setup(self, device):
        self.previous = None
        self.alive: list[bool] = []

    def preprocess(self, task):
        import weakref

        self.alive.append(self.previous is not None and self.previous() is not None)
        array = np.zeros(1000)
        self.previous = weakref.ref(array)
        return array

    def forward(self, batch):
        return batch.sum(axis=1)

    def postprocess(self, output, task):
        return {"previous_alive": self.alive.pop(0)}


class KeepsAThread(Handle):
    """Starts a thread in setup that never ends and is not a daemon (a metrics pusher, a prefetcher)."""

    def setup(self, device):
        import threading

        threading.Thread(target=time.sleep, args=(3600,), name="forgotten").start()

    def forward(self, batch):
        return batch


class Staged(Handle):
    """The n-th setup of this server (counted in files under HandleArgs["dir"]): 0 is ready at once and
    writes its pid to ``pid0``; 1 takes 4 s; 2 raises (a passing fault); the rest are ready at once."""

    def setup(self, device):
        folder, n = self.args["dir"], 0
        while True:
            try:
                os.close(os.open(os.path.join(folder, str(n)), os.O_CREAT | os.O_EXCL))
                break
            except FileExistsError:
                n += 1
        if n == 0:
            with open(os.path.join(folder, "pid0"), "w") as f:
                f.write(str(os.getpid()))
        elif n == 1:
            time.sleep(4)
        elif n == 2:
            raise RuntimeError("the model store is unreachable, for now")

    def forward(self, batch):
        return [os.getpid() for _ in batch]


class DaemonChild(Handle):
    """setup starts a daemonic multiprocessing child (a prefetcher, say) that sleeps an hour, and writes
    its pid to HandleArgs["pidfile"]: multiprocessing ends such children as the interpreter exits."""

    def setup(self, device):
        import multiprocessing

        self.child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(3600,), daemon=True)
        self.child.start()
        with open(self.args["pidfile"], "w") as f:
            f.write(str(self.child.pid))

    def forward(self, batch):
        return batch


class Statuses(Handle):
    """An overridden run_batch that answers each task with the status and message it asks for."""

    def run_batch(self, tasks):
        return [(t["task_info"]["status"], t["task_info"].get("message", "ok")) for t in tasks]


class TimedRunBatch(Handle):
    """A run_batch that only wraps the default stages (to time them, say); forward fails for a batch that
    holds {"fail": true}."""

    def run_batch(self, tasks):
        return super().run_batch(tasks)

    def forward(self, batch):
        if any(task.get("fail") for task in batch):
            raise RuntimeError("the GPU fell off")
        return batch


class ShortRunBatch(Handle):
    """An overridden run_batch that answers only the first task of each batch."""

    def run_batch(self, tasks):
        time.sleep(max(float(t["task_info"].get("sleep", 0)) for t in tasks))
        return [(200, {"i": t["task_info"].get("i")}) for t in tasks[:1]]


class ShortUnstack(Handle):
    """An overridden unstack that returns one row fewer than the batch holds (for batches above one), and
    none for a request {"short": true}, however batched."""

    def forward(self, batch):
        time.sleep(max(float(info.get("sleep", 0)) for info in batch))
        if any(info.get("short") for info in batch):
            return [info for info in batch if not info.get("short")]
        return batch[:-1] if len(batch) > 1 else batch

    def unstack(self, outputs, n):
        return list(outputs)


class FlakySetup(Handle):
    """setup raises while the file HandleArgs["marker"] exists."""

    def setup(self, device):
        if os.path.exists(self.args["marker"]):
            raise RuntimeError("transient setup failure")

    def forward(self, batch):
        return batch


class DiesWhile(Handle):
    """forward ends its process (exit code 3) while the file HandleArgs["marker"] exists (a machine at
    fault: every batch), or for a request {"die": true} (a request at fault); else echoes."""

    def forward(self, batch):
        if os.path.exists(self.args["marker"]) or any(info.get("die") for info in batch):
            os._exit(3)
        return batch


class HangingSetup(Handle):
    """setup never returns while the file HandleArgs["marker"] exists, or always with {"always": true}."""

    def setup(self, device):
        if self.args.get("always") or os.path.exists(self.args["marker"]):
            time.sleep(3600)

    def forward(self, batch):
        return batch


class FailsWithASlowExit(Handle):
    """setup registers an exit function of HandleArgs["exit_s"] seconds (a writer flushing, a pool
    joining its tasks), then fails."""

    def setup(self, device):
        import atexit

        atexit.register(time.sleep, self.args["exit_s"])
        raise RuntimeError("setup failed on purpose")

    def forward(self, batch):
        return batch


class Printer(Handle):
    """Prints to standard output in setup and in every batch."""

    def setup(self, device):
        print("setup done", flush=True)

    def forward(self, batch):
        print("forward got", len(batch), flush=True)
        return batch


class CallsArgs(Handle):
    """Uses what HandleArgs hold: {"f": callable} is called on "n"; {"cfg": object} reports its threshold."""

    def forward(self, batch):
        return batch

    def postprocess(self, info, task):
        out = {}
        if "f" in self.args:
            out["f"] = self.args["f"](info["n"])
        if "cfg" in self.args:
            out["threshold"] = self.args["cfg"].threshold
        return out


class StartsAHelper(Handle):
    """setup starts a helper process with plain ``subprocess`` (a tokenizer server, a sidecar), which
    watches nothing and would sleep 1,000 s, and appends its pid to HandleArgs["pidfile"]; with
    HandleArgs["background"], a shell puts it in the background and exits (``os.system("x &")``). A
    request {"sleep": s} sleeps s seconds in forward (a stuck batch); {"die": true} ends the worker
    there (``os._exit``, as a segfault or the OOM killer would, with no way out run)."""

    def setup(self, device):
        import subprocess

        if self.args.get("background"):
            pid = int(subprocess.run(["sh", "-c", "sleep 1000 > /dev/null 2>&1 & echo $!"], capture_output=True,
                                     text=True, check=True).stdout)
        else:
            self.helper = subprocess.Popen(["sleep", "1000"])
            pid = self.helper.pid
        with open(self.args["pidfile"], "a") as f:
            f.write(f"{pid}\n")

    def forward(self, batch):
        if any(task.get("die") for task in batch):
            os._exit(7)
        time.sleep(max(float(task.get("sleep", 0)) for task in batch))
        return batch


class AnswersThroughAHelper(Handle):
    """setup starts a helper process (``cat``, standing for a tokenizer server or a process pool) and
    appends its pid to HandleArgs["pidfile"]; forward sends each request through it and reads it back,
    so that a request fails once the helper is gone. A request {"sleep": s} waits s seconds first."""

    def setup(self, device):
        import subprocess

        self.helper = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        with open(self.args["pidfile"], "a") as f:
            f.write(f"{self.helper.pid}\n")

    def forward(self, batch):
        time.sleep(max(float(task.get("sleep", 0)) for task in batch))
        answers = []
        for task in batch:
            self.helper.stdin.write(json.dumps(task).encode() + b"\n")
            self.helper.stdin.flush()
            line = self.helper.stdout.readline()
            if not line:
                raise RuntimeError(f"the helper is gone (exit code {self.helper.poll()})")
            answers.append(json.loads(line))
        return answers


class WedgesHoldingTheGil(Handle):
    """setup starts a helper process (pid appended to HandleArgs["pidfile"]); a request {"wedge": true}
    deadlocks forward in native code with the GIL held (a C extension stuck on a lock): the worker then
    runs no Python at all, neither a signal handler nor another thread."""

    def setup(self, device):
        import subprocess

        self.helper = subprocess.Popen(["sleep", "1000"])
        with open(self.args["pidfile"], "a") as f:
            f.write(f"{self.helper.pid}\n")

    def forward(self, batch):
        if any(task.get("wedge") for task in batch):
            import ctypes

            libc, mutex = ctypes.PyDLL(None), ctypes.create_string_buffer(64)  # PyDLL: the GIL stays held
            libc.pthread_mutex_lock(mutex)
            libc.pthread_mutex_lock(mutex)  # never returns
        return batch


class StartsAProcess(Handle):
    """setup starts a ``multiprocessing.Process`` (not a daemon, its default) that runs for ever: a
    prefetcher written as a script would start it, never ended."""

    def setup(self, device):
        import multiprocessing

        self.child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(3600,))
        self.child.start()

    def forward(self, batch):
        return batch


def _write_slowly(queue, path):
    with open(path, "a") as out:
        for item in iter(queue.get, None):
            time.sleep(0.05)  # a slow sink: a disk, a network
            out.write(f"{item}\n")
            out.flush()
        out.write("closed\n")


class EndsItsWriterAtExit(Handle):
    """Hands each request's "x" to a writer process (not a daemon) that appends it to HandleArgs["out"];
    at exit (atexit: a handle has no teardown of its own), tells it to end and waits for it."""

    def setup(self, device):
        import atexit
        import multiprocessing

        context = multiprocessing.get_context("fork")
        self.queue = context.Queue()
        self.writer = context.Process(target=_write_slowly, args=(self.queue, self.args["out"]))
        self.writer.start()
        atexit.register(self._finish)

    def _finish(self):
        self.queue.put(None)
        self.writer.join(10)

    def forward(self, batch):
        for task in batch:
            self.queue.put(task["x"])
        return batch


class UsesAProcessPool(Handle):
    """setup makes a ``ProcessPoolExecutor`` (HandleArgs["context"]: fork, spawn or forkserver); forward
    has it take each request's "x" absolute value."""

    def setup(self, device):
        import concurrent.futures
        import multiprocessing

        self.pool = concurrent.futures.ProcessPoolExecutor(2, multiprocessing.get_context(self.args["context"]))

    def forward(self, batch):
        return [{"x": self.pool.submit(abs, task["x"]).result()} for task in batch]


class StuckThreadPool(Handle):
    """setup gives a ``ThreadPoolExecutor`` a task that never ends (a handle's background poller)."""

    def setup(self, device):
        import concurrent.futures
        import threading

        self.pool = concurrent.futures.ThreadPoolExecutor(1)
        self.pool.submit(threading.Event().wait)

    def forward(self, batch):
        return batch


class SlowFirstBatch(Handle):
    """A model with a warm-up: the process's first forward takes HandleArgs["first_s"] seconds, later ones
    HandleArgs["s"] a request (lazy loading, autotuning, compiling)."""

    def setup(self, device):
        self.first = True

    def preprocess(self, task):
        if task["task_info"].get("refuse"):  # refused before the model: no warm-up
            raise ValueError("refused")
        return task["task_info"]

    def forward(self, batch):
        time.sleep(float(self.args["first_s"]) if self.first else float(self.args["s"]) * len(batch))
        self.first = False
        return [{"n": info["n"]} for info in batch]


class Unreadable(Exception):
    """An exception whose message cannot be read: its ``__str__`` raises."""

    def __str__(self):
        raise RuntimeError("this message cannot be read")


class BadMessages(Handle):
    """Fails as {"fault": ...} asks, with a message that is hard to report: "preprocess" and "postprocess"
    raise an :class:`Unreadable` there; "quote" has preprocess raise a ValueError quoting the whole request,
    "quote-forward" forward a RuntimeError (a 500), "quote-answer" postprocess an answer that raises as it
    is read. Else it echoes the request; a batch takes as long as
    its largest {"sleep": s}."""

    def preprocess(self, task):
        info = task["task_info"]
        if info.get("fault") == "preprocess":
            raise Unreadable()
        if info.get("fault") == "quote":
            raise ValueError(f"cannot read {info}")
        return info

    def forward(self, batch):
        for info in batch:
            if info.get("fault") == "quote-forward":
                raise RuntimeError(f"cannot run {info}")
        time.sleep(max(float(info.get("sleep", 0)) for info in batch))
        return batch

    def postprocess(self, output, task):
        if output.get("fault") == "postprocess":
            raise Unreadable()
        if output.get("fault") == "quote-answer":
            return {"answer": _ReadsBadly(str(output))}
        return output


@dataclasses.dataclass
class _ReadsBadly:
    """An answer that raises as it is read (as a torch tensor that needs ``.detach()`` does), quoting
    what it holds."""

    text: str

    def __getattribute__(self, name):
        if name == "text":
            raise RuntimeError("cannot read " + object.__getattribute__(self, "__dict__")["text"])
        return object.__getattribute__(self, name)


class OddStatuses(Handle):
    """An overridden run_batch answering {"odd": ...} with a status or message the server cannot take as
    they are: "numpy" numpy's 404, "unreadable" 422 with an :class:`Unreadable` message, "lambda" a
    status that cannot be pickled; else 200 with the request."""

    def run_batch(self, tasks):
        odd = {"numpy": (np.int64(404), "no such item"), "unreadable": (422, Unreadable()),
               "lambda": (lambda: 400, "a status that is a function")}
        return [odd.get(t["task_info"].get("odd"), (200, t["task_info"])) for t in tasks]


class ClosesStderr(Handle):
    """setup closes ``sys.stderr`` (as a library redirecting output may leave it); forward raises for
    {"fail": true}."""

    def setup(self, device):
        import sys

        sys.stderr.close()

    def forward(self, batch):
        if any(info.get("fail") for info in batch):
            raise RuntimeError("forward failed on purpose")
        return batch


class Chatty(Handle):
    """{"flood": true} starts a thread that prints short lines as fast as it can, for good (a debug print
    left in a loop); {"burst": n} prints n lines, then "quiet"; {"fail": text} raises RuntimeError(text);
    {"say": text} prints text; {"long_warning": n} logs a warning of n lines of 8,000 characters;
    {"last_words": text} writes text with no line's end, then ends the worker (a child of it holding its
    stdout open for 3 s); others are echoed."""

    def forward(self, batch):
        import logging
        import os
        import sys
        import threading

        for info in batch:
            if "fail" in info:
                raise RuntimeError(info["fail"])
            if "say" in info:
                print(info["say"], flush=True)
            if "long_warning" in info:
                logging.getLogger("chatty").warning("\n".join(["w" * 8000] * int(info["long_warning"])))
            if "last_words" in info:
                import subprocess

                subprocess.Popen(["sleep", "3"])  # holds the pipe open: its end comes seconds after the death
                sys.stdout.write(info["last_words"])
                sys.stdout.flush()
                os._exit(3)

        def flood():
            while True:
                sys.stdout.write("tick\n" * 1000)

        if any(info.get("flood") for info in batch):
            threading.Thread(target=flood, daemon=True).start()
        for info in batch:
            if "burst" in info:
                sys.stdout.write("burst\n" * int(info["burst"]) + "quiet\n")
                sys.stdout.flush()
        return batch


class Exits(Handle):
    """preprocess reads the request's "args" with argparse (which exits on an option it does not know);
    forward calls ``sys.exit`` for {"exit": true} and raises KeyboardInterrupt for {"interrupt": true}, a
    BaseException of its own for {"own_base": true} and GeneratorExit for {"generator_exit": true} (as
    a library's own code may); a batch takes as long as its largest {"sleep": s}."""

    def preprocess(self, task):
        import argparse

        info = task["task_info"]
        parser = argparse.ArgumentParser(prog="options", exit_on_error=False)
        parser.add_argument("--top", type=int, default=1)
        return {**info, "top": parser.parse_args(info.get("args", [])).top}

    def forward(self, batch):
        import sys

        if any(info.get("exit") for info in batch):
            sys.exit("forward gave up")
        if any(info.get("interrupt") for info in batch):
            raise KeyboardInterrupt("from a library")
        if any(info.get("own_base") for info in batch):  # gevent's Timeout, trio's Cancelled are such
            raise type("Cancelled", (BaseException,), {})("a library's own BaseException")
        if any(info.get("generator_exit") for info in batch):
            raise GeneratorExit("closed")
        time.sleep(max(float(info.get("sleep", 0)) for info in batch))
        return batch


class TakesSignals(Handle):
    """setup gives SIGTERM and SIGINT their default actions back, as a library installing its own handlers
    may leave them (PyTorch Lightning's Trainer, Ray); with HandleArgs["lazily"], the first batch does,
    as a library set up on its first call would."""

    def setup(self, device):
        if not self.args.get("lazily"):
            self._take()

    def _take(self):
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def forward(self, batch):
        if self.args.get("lazily") and not getattr(self, "taken", False):
            self._take()
            self.taken = True
        return batch


class DropsItsLink(Handle):
    """Answers each request's pid; {"drop": s} has the worker, s seconds after answering and idle by
    then, end its connection to the server and then linger a while (``linger_s``, 1.5 by default)
    before it exits: a worker dying that the server has seen go but not yet reaped. With
    {"dropped": path} as well, it makes that file once its connection is ended."""

    def forward(self, batch):
        for info in batch:
            if "drop" in info:
                import atexit
                import socket
                import threading

                def drop(dropped: str | None = info.get("dropped")) -> None:
                    for fd in map(int, os.listdir("/proc/self/fd")):
                        try:
                            is_socket = os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
                        except OSError:
                            continue
                        if is_socket:
                            link = socket.socket(fileno=os.dup(fd))
                            link.shutdown(socket.SHUT_RDWR)
                            link.close()
                    if dropped:
                        open(dropped, "w").close()

                atexit.register(time.sleep, float(self.args.get("linger_s", 1.5)))
                threading.Timer(float(info["drop"]), drop).start()
        return [{"pid": os.getpid()} for _ in batch]


class CrashesAsItReads(Handle):
    """Echoes each request. ``{"crash": true}`` ends the worker in ``preprocess``, as a native decoder's
    segfault on a malformed picture does; ``{"hold": true, "mark": m}`` makes ``forward`` wait until the
    file ``<release>-<m>`` exists. ``forward`` appends each request's mark to the file ``journal`` first.
    """

    def preprocess(self, task):
        info = task["task_info"]
        if info.get("crash"):
            os.kill(os.getpid(), 9)
        return info

    def forward(self, batch):
        with open(self.args["journal"], "a") as f:
            f.writelines(f"{info.get('mark', '?')}\n" for info in batch)
        for info in batch:
            if info.get("hold"):
                release = f"{self.args['release']}-{info['mark']}"
                end = time.monotonic() + 60
                while not os.path.exists(release) and time.monotonic() < end:
                    time.sleep(0.01)
        return batch


class TwoFaults(Handle):
    """forward raises ValueError for items with "token" (one line: its message names the item) and for
    items with "nan" (another line); a batch takes as long as its largest {"sleep": s}."""

    def forward(self, batch):
        time.sleep(max(float(item.get("sleep", 0)) for item in batch))
        for item in batch:
            if "token" in item:
                raise ValueError(f"model rejected token {item['token']}")
            if "nan" in item:
                raise ValueError(f"image tensor has NaN in channel {item['nan']}")
        return batch
