"""The worker process: loads one handle on one device and runs the batches the server sends it.

Started by :mod:`easyserve.pool` as ``python -m easyserve.worker SOCK_FD LIFELINE_FD SERVER_PID`` with
``CUDA_VISIBLE_DEVICES`` already in its environment, so no CUDA library can see another GPU.
It exits by itself when the server goes away, however it goes: on Linux the kernel signals it
when the server dies, and everywhere the server holds the write end of the lifeline pipe, which
the kernel closes when the server dies. However it exits, short of being killed, it first ends the
processes it started (a handle's helper, a sidecar): see :func:`leave`.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import faulthandler
import functools
import gc
import logging
import operator
import os
import pickle
import queue
import signal
import socket
import sys
import threading
import time
from typing import Callable, Iterator

import numpy as np

from . import logs, pipeline, wire
from .bodies import Binary, JsonBody, parse_query
from .children import DESCENDANTS_GRACE_S, REAPER_NAME, STACKS_SIGNAL, STOP_SIGNALS, Descendants
from .errors import BadRequest, ConfigError, shortened
from .npy import NPY, NpyAnswer, to_npy
from .pipeline import (Lanes, Prepared, Task, Traced, failure_message, finish, handle_errors, named, prepare,
                       print_fault, safe_str, write_fault)
from .v2.protocol import InferTask, Signature, check_tensor_body, encode_response
from .wire import EXIT_MEMORY_ERROR, WIRE_STAGES

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
MEMORY_STEP = 2**20  # a change of the worker's memory by this much is told to the server

# What Linux sends a worker when its server dies: a signal it handles (by leaving, processes it started
# first), not SIGKILL, after which they outlived every killed notebook kernel.
PARENT_GONE = signal.SIGUSR2
_LEAVING = threading.RLock()  # reentrant: the signal may come while the main thread leaves


# why a worker refuses to start when its code is not its server's (see wire.code_fingerprint)
OTHER_CODE = ("easyserve's code on disk has changed since this server started (an upgrade, a git pull, an edit): "
              "{who} started now would run other code than the server's; restart the server to run the new code")


MAX_BATCH = sys.maxsize  # MaxBatchSize: the most items a batch runs (see _Batch._put_back)


def main(sock_fd: int, lifeline_fd: int, server_pid: int) -> int:
    _start_reaper(lifeline_fd)  # first: a fork before any thread or handler of this process's
    signal.signal(PARENT_GONE, lambda signum, frame: leave(0))
    die_with_parent(server_pid, PARENT_GONE)
    ignore_stop_signals()
    # a crash in native code (a segfault) leaves the Python stack in the log, as one record
    faulthandler.enable(file=logs.open_records())
    threading.Thread(target=_exit_with_server, args=(lifeline_fd,), daemon=True, name="lifeline").start()
    sock = socket.socket(fileno=sock_fd)
    boot = wire.recv(sock)
    if boot.get("code") != wire.code_fingerprint():  # before anything of the boot's is read: it may differ too
        wire.send(sock, ("failed", OTHER_CODE.format(who="a worker"), None))
        return 3
    if boot["stacks_fd"] is not None:  # where its threads are, when the watchdog calls it stuck
        _write_stacks_when_told(boot["stacks_fd"])
    for path in reversed(boot["sys_path"]):
        if path not in sys.path:
            sys.path.insert(0, path)
    # a "module:Class" handle, or a module a handle imports, beside the config is found wherever the
    # server was started from, and one in the folder it was started from, or that the server imported
    # from a folder it has left (pool.folders_off_the_path); last, so that a file there cannot hide an
    # installed package (or the standard library: children.module_command)
    for path in (boot["device"]["config_dir"], boot["cwd"], *boot["module_dirs"]):
        if path not in sys.path:
            sys.path.append(path)
    name = boot["device"]["name"]
    # the server stamps each line of this process's output with the time and the worker's name
    logs.configure_child(boot["log_level"])
    pipeline.FAULT_LEVEL = "ERROR"  # a traceback it prints is logged at ERROR, as one record
    pipeline.IN_WORKER = True
    # multiprocessing's exit joins the handle's children that are no daemons (Process's default), for ever:
    # each stop, and each worker a reload replaced, waited 5 s, to the kill. They are ended just before it,
    # after the exit functions the handle registers later (atexit runs the last first), which may end them
    # their own way (a sentinel, then join: a writer's last items)
    import multiprocessing.util  # noqa: F401  (registers that exit function now, before the one below)

    atexit.register(_end_children_that_are_no_daemons)
    threading.excepthook = pipeline.thread_fault  # as Python prints it, at that level too
    try:
        from .handle import Device, Handle, tell_misspelt_args, to_json
        from .loader import build, check_set_up, left_training, pin, shadowed

        payload = pickle.loads(wire.recv(sock))
        pin(payload["handle"])  # first: the HandleArgs may import the handle's module
        device = Device(**boot["device"])
        handle = build(payload["handle"], dict(pickle.loads(payload["handle_args"])))
        warning = shadowed(payload["handle"], boot["device"]["config_dir"])
        if warning and name.endswith("/0"):  # once a device, not once a worker
            logging.getLogger("easyserve").warning("%s", warning)
        handle.setup(device)
        check_set_up(handle)
        training = left_training(handle) if name.endswith("/0") else None
        if training:
            logging.getLogger("easyserve").warning("%s", training)
        keep_stop_signals_ignored()
        info = _describe(device)
        # the model's metadata, for the server, which never imports the handle: a wrong declaration
        # fails the start, with its message (read after setup: OnnxModel reads it from the model)
        signature = Signature.of(handle)
    except BaseException as exc:
        # a config mistake (a class the module lacks) says so: the server then fails as for a bad config
        wire.send(sock, ("failed", pipeline.fault_text(), str(exc) if isinstance(exc, ConfigError) else None))
        return 3
    staged = type(handle).run_batch is Handle.run_batch  # else run its own run_batch whole
    lanes = Lanes((boot["preprocess_threads"] or device.threads) if staged else 1)
    pipeline.RETRY_MOST_S = boot["timeout_s"] / 2  # a failed batch's parts never run its worker past TimeoutS
    global MAX_BATCH
    MAX_BATCH = boot["max_batch_size"]
    # auto: where forward runs on a GPU; on a CPU it needs the cores preprocess would use meanwhile
    pipelined = staged and (device.is_gpu if boot["pipeline"] is None else boot["pipeline"])
    limit = None if boot["max_memory_mb"] is None else boot["max_memory_mb"] * 2**20  # MaxWorkerMemoryMB
    info_rss = held_memory(limit)  # what setup left: a model file read whole, then freed, is not
    info.update(preprocess_threads=lanes.threads, pipeline=pipelined, rss_mb=round(info_rss / 2**20, 1))
    wire.send(sock, ("ready", info, signature, time.process_time()))
    step = functools.partial(_Batch, handle, signature, lanes, staged)
    count = _Count()
    said = (info_rss, 0)  # the memory and batches held the server was last told of
    batches = _pipelined(sock, step, count) if pipelined else _one_by_one(sock, step, count)
    # of the HandleArgs the handle lacked or left unread, once its setup and first batch have run: said by the
    # first process to run this handle alone
    told = not boot.get("tell_args", True)
    with _out_of_memory_ends_it():  # encoding the answers, or receiving and decoding a batch
        for batch in batches:
            results = batch.finish()
            # a library set up on its first call, in the batch: undone before the answer leaves, as a stop
            # signal sent once it has (a drain's) ended the worker in the moment before this was looked at
            keep_stop_signals_ignored("batch")
            began = time.perf_counter()
            encoded = [_encode(status, value, to_json, name, answer, signature, request_id)
                       for (status, value), answer, request_id in zip(results, batch.answers, batch.request_ids)]
            encoded = [(status, wire.mark_bulk(value)) for status, value in encoded]  # large answers: no copies
            batch.stages["encode"] = time.perf_counter() - began
            stages = tuple(map(batch.stages.get, WIRE_STAGES))
            items = None if all(count == 1 for count in batch.items) else batch.items  # /predict's: one each
            done = ("done", batch.batch_id, encoded, batch.seconds, time.process_time(), batch.ran, stages, items,
                    batch.apart)
            # An idle worker holds no batch: the last one's bodies, arrays (on a GPU, its tensors) and answers
            # stayed alive until the next had been received and preprocessed, two batches at once. Let go
            # before the answer leaves, as the next batch may come as soon as it has.
            del batch, results, encoded
            wire.send(sock, done)
            del done
            count.answered += 1
            # Its memory (MaxWorkerMemoryMB, /metrics), read once the batch and its answers are let go:
            # read as the answer was built, it held them (a handle that keeps nothing, fed 15 MB bodies,
            # read 158 MB where it held 39 between batches, and was replaced after each). With how many
            # batches it holds now (Pipeline: the next one, received and prepared meanwhile), whose
            # memory the reading includes: the server decides on a reading that holds none. Sent when
            # either has changed (by a MiB, for the memory): a message more for every batch cost the
            # server's event loop, which small requests keep busy, for a number that had not moved.
            rss = held_memory(limit) if count.received == count.answered else rss_bytes()
            held = count.held()  # after the reading: a batch that began to arrive before it is counted
            if abs(rss - said[0]) >= MEMORY_STEP or held != said[1]:
                said = rss, held
                wire.send(sock, ("memory", rss, held))
            if not told:
                told = True
                tell_misspelt_args(handle)
    return 0


_stacks = None  # the file faulthandler writes to (kept open for it)


def _write_stacks_when_told(fd: int) -> None:
    """On STACKS_SIGNAL, write every thread's Python stack to the file ``fd`` (see
    :func:`~easyserve.children.stacks_file`), from C, so even where the handle is stuck in native code
    holding the GIL. The server sends it before it kills this process as stuck: its log then shows where
    the batch (or the setup) was, where it said only that the process was killed."""
    global _stacks
    os.set_inheritable(fd, False)  # not the handle's subprocesses'
    _stacks = open(fd, "w")
    faulthandler.register(STACKS_SIGNAL, file=_stacks, all_threads=True)


@contextlib.contextmanager
def _out_of_memory_ends_it() -> Iterator[None]:
    """A ``MemoryError`` outside the handle's stages ends the worker as one inside them does (its batch is
    retried on a fresh worker, and the client told why): it ended it with code 1 (0 from the thread
    that prepares batches), which said only "exited with code 1"."""
    try:
        yield
    except MemoryError:
        print_fault()
        leave(EXIT_MEMORY_ERROR)


class _Count:
    """Batches received (by the thread that receives them) and answered (by the main thread): each
    written by one thread only, their difference is what the worker holds; and the reader of the
    server's messages, which may be receiving one more (Pipeline: while the main thread answers)."""

    def __init__(self) -> None:
        self.received = 0
        self.answered = 0
        self.reader = wire.FrameReader()

    def held(self) -> int:
        return self.received - self.answered + self.reader.midway


def _one_by_one(sock: socket.socket, step: Callable[[int, list], _Batch], count: _Count) -> Iterator[_Batch]:
    """Receive a batch and prepare it, then hand it on to be finished; receive the next after that."""
    for batch_id, tasks in _received(sock, count):
        prepared = [step(batch_id, tasks)]
        del tasks
        yield prepared.pop()  # neither it nor its tasks held here while it runs: its memory is read after it


def _pipelined(sock: socket.socket, step: Callable[[int, list], _Batch], count: _Count) -> Iterator[_Batch]:
    """Receive and prepare batches in a thread of their own, while this one finishes the one before:
    ``forward`` never waits for the next batch's ``preprocess``. The server hands a worker at most one
    batch beyond the one it runs, so at most one prepared batch waits here."""
    ready: queue.SimpleQueue = queue.SimpleQueue()

    def read() -> None:
        try:
            with _out_of_memory_ends_it():
                for batch_id, tasks in _received(sock, count):
                    ready.put(step(batch_id, tasks))
                    del tasks  # not held while the next batch is awaited
        finally:
            ready.put(None)  # stop, end of stream, or a fault here: the worker ends either way

    threading.Thread(target=read, daemon=True, name="easyserve-prepare").start()
    while True:
        batch = [ready.get()]
        if batch[0] is None:
            return
        yield batch.pop()  # so that this frame holds nothing of it once it is answered


def _received(sock: socket.socket, count: _Count) -> Iterator[tuple[int, list]]:
    """Each batch the server sends, as ``(batch_id, tasks)``, until it says stop or goes away."""
    for message in wire.messages(sock, count.reader):
        if message[0] == "stop":
            return
        count.received += 1
        batch = [message[1:]]
        del message
        yield batch.pop()  # its tasks not held here while they are used, nor while the next batch is awaited


class _Batch:
    """One batch in this worker: decoded and preprocessed when made (:meth:`finish` runs the rest).

    What the server left to the worker is decoded first (large JSON bodies, inference requests): a
    malformed one fails alone, with the 400 the server would have given. ``answers`` says how to
    answer each task (``(task, request)`` for an inference request; :data:`~easyserve.npy.NPY` for
    an array as ``.npy``; ``None`` for JSON). ``seconds`` is the time this batch's own work took,
    not the time it waited for the batch before it.
    """

    def __init__(self, handle, signature: Signature, lanes: Lanes, staged: bool, batch_id: int,
                 tasks: list[tuple[str, object, str, str, tuple | None]]) -> None:
        started = time.perf_counter()
        self.handle, self.lanes, self.staged, self.batch_id = handle, lanes, staged, batch_id
        self.results: list = [None] * len(tasks)
        self.answers: list = [None] * len(tasks)
        self.kept: list[int] = []  # each envelope's task: an inference request holding a batch has several
        self.envelopes: list[dict] = []
        # each task's items as read (an inference request may hold several), which the server knew only for
        # a body it read itself; 0 for one refused as it was read, which never reached the handle
        self.items = [1] * len(tasks)
        self.request_ids = [task[2] for task in tasks]
        for i, (task_id, info, request_id, query, headers) in enumerate(tasks):
            envelope = Task(task_id=task_id, request_id=request_id, headers=dict(headers or ()))
            try:
                envelope["parameters"] = parse_query(query) if query else {}
                if isinstance(info, NpyAnswer):  # answer an array result as .npy
                    info, self.answers[i] = info.task_info, NPY
                if isinstance(info, JsonBody):  # or a FormBody: a large body, decoded here
                    info = info.decode(signature.example)
                elif _tensor_body(info) and not getattr(handle, "checks_tensor_bodies", False):
                    info = {**info, "data": check_tensor_body(info["data"], signature)}
                elif isinstance(info, InferTask):
                    request, items = info.open(signature, MAX_BATCH)
                    self.answers[i] = (info, request)
                    envelope.update(protocol="v2", parameters=request.parameters)
                    self.items[i] = len(items)
                    info = items.pop()
                    for item in items:  # all but the last, each a task of its own (in the order they came)
                        self.kept.append(i)
                        self.envelopes.append(Task(envelope, task_info=item))
            except BadRequest as exc:
                self.results[i], self.items[i] = (400, str(exc)), 0
                continue
            except MemoryError:
                raise
            except Exception as exc:  # a fault of ours in reading it: this request's 500, not the worker's end
                print_fault(f"{named([envelope])} could not be read")
                self.results[i] = (500, f"the request could not be read: {type(exc).__name__}: {_message(exc)}")
                self.items[i] = 0
                continue
            envelope["task_info"] = info
            self.kept.append(i)
            self.envelopes.append(envelope)
        if len(self.envelopes) > MAX_BATCH:
            self._put_back()
        self.prepared = None
        self.apart = False  # forward failed on the whole batch and ran again in parts (Prepared.apart)
        # each stage's seconds on the whole batch, by name (STAGES), for /stats and /metrics: where its time goes
        self.stages: dict[str, float] = {"read": time.perf_counter() - started}
        if staged and self.envelopes:
            self.prepared = _safely("preprocess", lambda: prepare(handle, self.envelopes, lanes), self.envelopes)
        self.prepared_at = time.perf_counter()  # then it waits for the batch before it, in a pipelined worker
        self.seconds = self.prepared_at - started

    def _put_back(self) -> None:
        """Keep the first tasks whose items fit in one batch (``MaxBatchSize``); give the others back to the
        server unrun (:data:`~easyserve.wire.PUT_BACK`), with how many items each holds. Inference requests
        whose JSON was large are read here alone: the queue weighed each as one, and a batch of them held
        up to ``MaxBatchSize`` times its items. Run in parts, one after another, such a batch ran past
        ``TimeoutS``, and a healthy worker was killed as stuck, while other workers idled."""
        counts = collections.Counter(self.kept)
        room, kept = MAX_BATCH, set()
        for i in counts:  # the tasks in their order (a request's items are the same task)
            if kept and counts[i] > room:
                break
            kept.add(i)
            room -= counts[i]
        for i in counts:
            if i not in kept:
                self.results[i] = (wire.PUT_BACK, counts[i])
        pairs = [(i, envelope) for i, envelope in zip(self.kept, self.envelopes) if i in kept]
        self.kept, self.envelopes = [i for i, _ in pairs], [envelope for _, envelope in pairs]

    def finish(self) -> list[tuple[int, object]]:
        """Run the rest of the batch (``forward`` and ``postprocess``, or the handle's own ``run_batch``);
        each task's ``(status, result)``."""
        started = time.perf_counter()
        # prepared, it waited for the batch before it to finish (Pipeline): a wait, as the queue's is, not a
        # stage (Triton's statistics count it in the request's queue time)
        self.stages["wait"] = started - self.prepared_at
        # how many items the model ran on (forward, or the handle's own run_batch): 0 where only preprocess's
        # refusals were answered; the statistics' batch size (Triton's counts what was executed)
        self.ran = (0 if not self.envelopes else len(self.envelopes) if not self.staged
                    else len(self.prepared.kept) if isinstance(self.prepared, Prepared) else 0)
        if self.envelopes:
            if not self.staged:
                results = _safely("run_batch", lambda: self.handle.run_batch(self.envelopes), self.envelopes)
                self.stages["run_batch"] = time.perf_counter() - started
            elif isinstance(self.prepared, Prepared):
                prepared = self.prepared
                results = _safely("forward", lambda: finish(self.handle, prepared, self.lanes), self.envelopes)
                self.stages.update(prepared.seconds)
                self.apart = prepared.apart
            else:  # preparing it failed: the 500s are here already
                results = self.prepared
            items: dict[int, list] = {}
            for i, result in zip(self.kept, results):
                items.setdefault(i, []).append(result)
            for i, each in items.items():
                self.results[i] = each[0] if len(each) == 1 else _joined(each)
        self.seconds += time.perf_counter() - started
        return self.results


class _Items(list):
    """The results of an inference request's items (a batch in one request), for its one answer."""


def _joined(results: list[tuple[int, object]]) -> tuple[int, object]:
    """One answer for a request's items: their results, or the first failure, saying which item's it was."""
    for k, (status, value) in enumerate(results):
        if status != 200:
            text = f"item {k} of the request's batch of {len(results)}: {_message(value)}"
            return status, _Logged(text) if isinstance(value, _Logged) else text
    return 200, _Items(value for _, value in results)


def _safely(stage: str, run: Callable[[], object], tasks: list):
    """``run()``, made safe: whatever a handle does, each of ``tasks`` gets one answer (or the batch its
    :class:`Prepared` inputs)."""
    count = len(tasks)
    try:
        results = run()
    except MemoryError:
        # Allocations fail in this process (a leak, fragmentation): every batch after this one would
        # fail too. Exit unanswered: the server retries the batch on a fresh worker and replaces this one.
        print_fault()
        leave(EXIT_MEMORY_ERROR)
    except handle_errors() as exc:  # an overridden run_batch that raised, or a stage's own fault
        if isinstance(exc, BadRequest) and count == 1:  # refusing its one request (a legacy handle's too);
            return [(exc.status, str(exc) or f"{stage} refused the request")]  # in a batch, which: unknown
        print_fault()
        return [(500, failure_message(stage, exc))] * count
    if isinstance(results, Prepared):
        return results
    if not isinstance(results, list) or len(results) != count or not all(
        isinstance(r, tuple) and len(r) == 2 for r in results
    ):
        got = len(results) if isinstance(results, list) else type(results).__name__
        text = f"the handle returned {got} results for a batch of {count}"
        # said in the log too, where its 500s send the reader: a batch failed whole left no trace there
        write_fault(f"{stage}: {text}: every request of the batch is answered 500", "ERROR")
        return [(500, _Logged(text))] * count
    return _statuses(results, tasks, own=stage == "run_batch")


def _statuses(results: list[tuple], tasks: list, own: bool) -> list[tuple[int, object]]:
    """Each result as the server reads it (see :func:`_status`); what is to be said of them in the log,
    said once for the batch, naming its requests (an inference request of 16 items said it 16 times,
    naming none)."""
    said: dict[str, list] = {}
    read = []
    for (status, value), task in zip(results, tasks):
        number, value, line = _status(status, value, own)
        if line is not None:
            said.setdefault(line, []).append(task)
        read.append((number, value))
    for line, which in said.items():
        write_fault(f"{named(which)}: {line}", "ERROR")
    return read


class _Logged(str):
    """A 500's message whose cause the worker's log says in a line of its own, with no traceback."""


def _said(text: str, request_id: str | None = None) -> _Logged:
    """``text`` said in this worker's log at ERROR, as the cause of a 500 (see :class:`_Logged`): such 500s
    left nothing in the log they pointed to. With ``request_id``, the line names the request (as its
    client's ``X-Request-Id``), which a client's 500 among many is found by."""
    write_fault(f"request {request_id}: {text}" if request_id else text, "ERROR")
    return _Logged(text)


def _pointed(value: object, name: str) -> str:
    """A 500's message, and where in the log its cause is: a line of its own, or a traceback."""
    said = "said" if isinstance(value, _Logged) else "traceback"
    return f"{_message(value)} ({said} in worker {name}'s log)"


def _status(status: object, value: object, own: bool) -> tuple[int, object, str | None]:
    """A ``run_batch``'s answer as the server reads it, and the line the worker's log is to say of it, if
    any: its status a whole number (numpy's ``int64(404)`` is 404), or a 500 that says what the status
    was. It went to the server as it was: numpy's 404 was answered 500 with the handle's own message
    and no word why, and a status that cannot be pickled ended the worker. A 500 of the handle's ``own``
    run_batch is said in the log: its answer pointed to a traceback there, of which the log had nothing
    (the default stages' 500s, passed on by a run_batch that calls them, are :class:`Traced`)."""
    try:
        number = operator.index(status)
    except Exception:
        # printed, it was a line at INFO, which the log at its default left out
        text = f"run_batch answered status {_message(repr(status))} ({type(status).__name__}), not a whole number"
        return 500, _Logged(f"{text}: {_message(value)}"), text
    if number == 500 and own and not isinstance(value, (_Logged, Traced)):
        text = f"run_batch answered 500: {_message(value)}"
        return 500, _Logged(text), text
    if number == 200 or 400 <= number <= 500:
        return number, value, None
    # 302, 204, 999: the server answers 200, a 4xx or a 500; such a status was a 500 with the handle's text alone
    text = f"run_batch answered status {number}, which easyserve does not pass on (200, 400-499 or 500)"
    return 500, _Logged(f"{text}: {_message(value)}"), text


def _encode(status: int | None, value, to_json, name: str, answer, signature: Signature,
            request_id: str | None = None) -> tuple[int, object]:
    """A result as the server sends it: JSON for ``/predict`` (``.npy`` for an array when ``answer`` is
    :data:`~easyserve.npy.NPY`), an inference response when ``answer`` is an inference request's. A 500 of
    its own is said in the log with ``request_id``, the request's."""
    if status == wire.PUT_BACK:  # not run: how many items it holds
        return status, value
    if status == 500:  # the traceback (or a line) went to this worker's output, which the server keeps
        return status, _pointed(value, name)
    if status != 200:
        return status, _message(value)
    try:
        if isinstance(value, Binary) and (answer is None or answer is NPY):
            return 200, value  # answered as it is
        if answer is NPY:
            try:
                npy = to_npy(value)
            except TypeError as exc:  # a masked array: as its JSON is refused
                return 500, _pointed(_said(f"postprocess returned a value .npy cannot hold: {_message(exc)}",
                                           request_id), name)
            if npy is not None:
                return 200, npy
        elif answer is not None:
            task, request = answer
            status, encoded = encode_response(value if isinstance(value, _Items) else [value], request, task,
                                              signature)
            if status == 500:  # what postprocess returned is no inference response: said where the 500 points
                return 500, _pointed(_said(encoded, request_id), name)
            return status, encoded
        return 200, to_json(value)
    except (TypeError, ValueError, RecursionError) as exc:
        from .handle import unfit_at  # imported by now, with the handle

        return 500, _pointed(_said(f"postprocess returned a value JSON cannot hold: {type(exc).__name__}: "
                                   f"{_message(exc)}{unfit_at(value)}", request_id), name)
    except MemoryError:
        raise
    except Exception as exc:  # a value that raises as it is read (a torch tensor that needs .detach()): this task's 500
        print_fault()
        return 500, (f"postprocess returned a value that could not be read: {type(exc).__name__}: {_message(exc)} "
                     f"(traceback in worker {name}'s log)")


def _tensor_body(info: object) -> bool:
    """Whether a /predict request's body was a tensor (``.npy``, or raw bytes with X-Tensor-* headers)."""
    return type(info) is dict and info.keys() == {"data", "content_type"} and isinstance(info["data"], np.ndarray)


def _message(value: object) -> str:
    """A failure's message as its client gets it: never raising, and cut short (``errors.shortened``).
    A dict or list (a run_batch's ``(422, {"field": "text", "problem": ...})``) as JSON text, which a
    client can read back, where its repr was Python's (``np.int64(3)``)."""
    if isinstance(value, (dict, list)):
        from .handle import to_json  # imported by now, with the handle

        with contextlib.suppress(Exception):
            return shortened(to_json(value).decode())
    return shortened(safe_str(value))


_statm: tuple[int, int] | None = None  # (pid, descriptor of its /proc/self/statm), kept open


def held_memory(limit: float | None) -> int:
    """This process's resident memory (:func:`rss_bytes`); above ``limit`` (MaxWorkerMemoryMB), read
    again once Python's cycle collector has run and the C allocator has given its free memory back to
    the system (glibc's ``malloc_trim``; elsewhere, the collector alone): large bodies freed stay in
    its arenas, and counted as memory the worker held (a handle that keeps nothing, fed 12 MB bodies,
    Pipeline on, read 100 MB where it held 38). Under the bound a worker has one arena, which the trim
    gives back whole (see ``pool.WorkerPool.spawn``). Only above the bound: a full collection may take
    milliseconds."""
    rss = rss_bytes()
    if limit is None or rss <= limit:
        return rss
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):  # not glibc (musl, macOS)
            _malloc_trim = False
    gc.collect()  # a batch's bodies may be in a reference cycle (Pipeline), alive until the collector runs
    if _malloc_trim:
        _malloc_trim(0)
    return rss_bytes()


_malloc_trim = None


def rss_bytes() -> int:
    """This process's resident memory now (Linux); elsewhere its peak, which is what getrusage knows.
    Read after every batch: one ``pread`` of a file kept open (0.8 us, where opening it took 5)."""
    global _statm
    try:
        if _statm is None or _statm[0] != os.getpid():  # a child the handle forked reads its own
            _statm = (os.getpid(), os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC))
        return int(os.pread(_statm[1], 256, 0).split()[1]) * PAGE_SIZE
    except (OSError, ValueError, IndexError, AttributeError):  # AttributeError: no os.pread
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def _describe(device) -> dict:
    from .handle import onnx_providers_placed  # imported by now, with the handle

    info = {
        "pid": os.getpid(),
        "device": device.kind if device.gpu is None else f"cuda (GPU {device.gpu})",
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "threads": device.threads,
    }
    if "torch" in sys.modules:  # what torch runs with: a handle's set_num_threads, or a user's OMP_NUM_THREADS
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    if "onnxruntime" in sys.modules:  # report the providers only if the handle uses ONNX Runtime
        # those its sessions run on (a GPU worker's may be on the CPU alone), else those it would ask for
        info["onnx_providers"] = onnx_providers_placed() or [p if isinstance(p, str) else p[0]
                                                             for p in device.providers()]
    return info


def ignore_stop_signals() -> None:
    """Signals meant for the server do nothing here: the server decides when its workers stop (a drain
    first). A worker has a session of its own, out of reach of the server's group's (a terminal's
    Ctrl-C, a notebook's interrupt), but systemd's stop (``KillMode=control-group``) signals every
    process of the service: a worker that died of it had its batch run again on a fresh one, which
    first loads the model. A handler that does nothing, not ``SIG_IGN``, which the handle's own child
    processes would inherit (and then ignore their ``terminate()``): ``exec`` sets a handler back to
    the default, and so does a fork (multiprocessing). The signals came blocked (see :mod:`easyserve.children`), so
    none could end this process before now; one that came meanwhile is let through, to this handler."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _not_for_this_process)
    os.register_at_fork(after_in_child=_default_stop_signals)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _not_for_this_process(signum: int, frame: object) -> None:
    pass


def keep_stop_signals_ignored(when: str = "setup") -> None:
    """Undo what the handle's setup (or a batch: ``when``) did to the stop signals (a library that
    installs its own SIGTERM or SIGINT handler as it starts, as training and cluster frameworks can,
    some on their first call): systemd's stop, or a signal sent to the worker itself, then ended the
    worker in the middle of the drain, and its batch ran again on a fresh one. Said in the log
    (written to the descriptor: the handle may have closed ``sys.stderr`` too)."""
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is not _not_for_this_process:
            signal.signal(sig, _not_for_this_process)
            with contextlib.suppress(OSError):
                os.write(2, f"the handle's {when} changed what {signal.Signals(sig).name} does in this worker; set "
                            f"back to nothing: the server decides when its workers stop\n".encode())


def _default_stop_signals() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    signal.signal(PARENT_GONE, signal.SIG_DFL)  # a forked child is not a worker, and has not its parent


REAPER_WAIT_S = DESCENDANTS_GRACE_S + 1.0  # after the server's end, the time a worker has to leave by itself
_reaper: int | None = None  # this worker's reaper's pid (see _start_reaper)


def _start_reaper(lifeline_fd: int) -> None:
    """Fork a process that ends this worker's session (the worker and what its handle started) when
    the server has died and the worker has not left by itself ``REAPER_WAIT_S`` later. A worker wedged
    in native code that holds the GIL runs neither its signal handler nor its lifeline thread: it and its
    handle's processes outlived a killed notebook kernel, holding their memory (a GPU's), once workers
    had sessions of their own. Linux: it dies with the worker (``PR_SET_PDEATHSIG``), however the worker
    ends, and a leaving worker ends it first (SIGKILL: it has nothing to clean up) and reaps it: where
    the server is a container's PID 1, an orphaned zombie was left for each worker that ever exited."""
    if not sys.platform.startswith("linux"):
        return
    global _reaper
    worker = os.getpid()
    try:
        pid = os.fork()
    except OSError:  # no process to spare: the worker runs without its reaper
        return
    if pid != 0:
        _reaper = pid
        return
    try:
        die_with_parent(worker, signal.SIGKILL)
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(15, REAPER_NAME)  # PR_SET_NAME: what ps and top show
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # the worker's output pipe stays the worker's: the server waits for its end
            os.dup2(devnull, fd)
        for fd in map(int, os.listdir("/proc/self/fd")):  # the server's socket above all: its end tells it
            if fd > 2 and fd != lifeline_fd:  # that the worker has gone
                with contextlib.suppress(OSError):
                    os.close(fd)
        # a SIGTERM ends it (one ignored in the server's process came down through exec and fork)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        while True:
            try:
                if os.read(lifeline_fd, 1) == b"":
                    break  # the server is gone
            except InterruptedError:
                continue
            except OSError:
                break
        time.sleep(REAPER_WAIT_S)
        if os.getpgid(worker) == worker:  # its session, as the server started it
            os.killpg(worker, signal.SIGKILL)
        else:
            os.kill(worker, signal.SIGKILL)
    except BaseException:
        pass
    finally:
        os._exit(0)


def die_with_parent(parent: int, sig: int) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies (the lifeline thread needs this
    process to run; this does not). Exits at once if the parent is already gone."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            PR_SET_PDEATHSIG = 1
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(0)


def _exit_with_server(fd: int) -> None:
    while True:
        try:
            if os.read(fd, 1) == b"":
                break
        except InterruptedError:
            continue
        except OSError:
            break
    leave(0)


def leave(code: int) -> None:
    """End the processes this one started (SIGTERM, then SIGKILL for those left after a grace), then exit
    with ``code`` at once. Whichever thread comes first does it; another waits here for the exit. A
    handle that stops its own children has done so by now, or they go as they would have."""
    _LEAVING.acquire()
    try:
        if _reaper is not None:
            with contextlib.suppress(OSError):
                os.kill(_reaper, signal.SIGKILL)
                os.waitpid(_reaper, 0)
        Descendants(os.getpid()).end()
        with contextlib.suppress(ChildProcessError):  # those it ended, reaped here: not left to PID 1
            while os.waitpid(-1, os.WNOHANG)[0] != 0:
                pass
    except BaseException:  # nothing may keep this process from exiting
        pass
    finally:
        os._exit(code)


def _end_children_that_are_no_daemons() -> None:
    processes = sys.modules["multiprocessing"]
    for child in processes.active_children():
        if not child.daemon:
            with contextlib.suppress(Exception):
                child.terminate()


def run(argv: list[str]) -> None:
    """``main``, then exit at once: a thread the handle started and never ended (not a daemon) would
    keep the process alive past its stop, and each recycle or stop would wait for it to be killed."""
    try:
        code = main(int(argv[1]), int(argv[2]), int(argv[3]))
    except BaseException:
        print_fault()
        code = 1
    try:
        # what an interpreter's exit runs, less the wait for threads: a ProcessPoolExecutor's shutdown
        # (registered with threading, whose own shutdown is not run: without it, multiprocessing's exit
        # below waited for the executor's processes for ever, and each recycle or stop took 5 s, to
        # the kill), not a ThreadPoolExecutor's, which would wait for its threads (one stuck held every
        # exit to the kill); multiprocessing ends the handle's daemonic children, and logging flushes
        for call in reversed(getattr(threading, "_threading_atexits", [])):
            if getattr(getattr(call, "func", call), "__module__", None) == "concurrent.futures.process":
                with contextlib.suppress(Exception):
                    call()
        atexit._run_exitfuncs()
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    finally:
        leave(code)


if __name__ == "__main__":
    run(sys.argv)
