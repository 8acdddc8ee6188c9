"""The worker pool: spawns one process per (GPU, slot), feeds idle workers batches, and handles deaths.

Everything here runs on the server's event loop, so no state needs a lock. A worker's results and its
death both arrive as events: its socket (results, then end of stream) and its pidfd (exit).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import math
import os
import random
import re
import secrets
import sys
import time
from typing import Any, Callable, Mapping

import cloudpickle

from . import logs, wire
from .batching import BatchQueue, Pending
from .children import kill_with_descendants, reap_orphaned_reapers, stacks_file, start_child
from .config import Config
from .devices import WorkerSpec
from .errors import BadRequest, ConfigError, EasyServeError, HandleError, NotReady, StartupError
from .gpus import GpuMonitor
from .loader import HandleRef
from .slots import Worker, said_last
from .stats import Stats, phases
from .v2.protocol import InferTask, Signature
from .watchdog import Watchdog

log = logging.getLogger("easyserve")

__all__ = ["WorkerPool"]

STOP_GRACE_S = 5.0
THREAD_SETTINGS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")  # numeric libraries' thread counts
DRAIN_QUIET_S = 0.1  # a drain ends once nothing has been in flight for this long
LATE_LOG_EVERY_S = 60.0  # the warning that requests are passed over (QueueOrder), at most this often
STILL_STARTING_S = 30.0  # a start that takes longer says so then, and again at twice that, and so on
RELOADED = "a reload put a new worker in its place"  # on the new handle or model file, or back after a failure
# Deaths of processes of a reload's new handle, before any of them has answered a batch, that roll the
# reload back (see WorkerPool.died_on_probation). They are the handle's, not charged to the requests they
# ran, which run again: so one request that ends every worker it runs on, sent first, rolls a reload back.
ROLLBACK_AFTER = 3
ROLLED_BACK = "its reload was rolled back"
# A worker above MaxWorkerMemoryMB while another slot is being replaced (or is down) waits for that one to
# be back, serving meanwhile, unless its memory is past this many times the bound: a runaway goes at once.
MEMORY_CEILING = 1.5
# Without MaxWorkerMemoryMB, a worker whose memory between batches passes this many times what it held after
# its largest batch yet, and by GROWING_MB at least, is warned of once a slot: a leak grew unseen until the
# kernel killed it. (Not what it held once set up: ONNX Runtime's arena took a model of 66 MB to 600 on its
# first batch, and no more after.)
GROWING_TIMES = 2.0
GROWING_MB = 500.0
# Batches in a row whose worker died of itself, each holding a request on its first run, with no batch that
# ran the model answered between: the server's fault (its GPU, its driver, its memory), not the requests'.
# A request that ends every worker it runs on costs one such death (its retry runs it alone, a second
# run): three takes three of them in a row, and any other request answered in between starts the count again.
FAILING_AFTER_DEATHS = 3
FAILING_FOR_S = 60.0  # /ready answers 503 for this long after each such death; then a request may try it again


@dataclasses.dataclass
class Probation:
    """A reload's new handle, from the reload's start until one of its workers has answered a batch."""

    payload: bytes
    old: tuple[bytes, Any, Any]  # the payload, handle and config it replaced, to go back to
    deaths: int = 0
    # set while the reload still runs, which ROLLBACK_AFTER deaths fail (this is set) rather than roll back
    failing: asyncio.Event | None = None
    # the probation this reload's began during, put back should this reload fail, unless passed meanwhile
    earlier: Probation | None = None
    passed: bool = False  # one of its workers lived through a batch its model ran


def thread_setting(env: Mapping[str, str]) -> tuple[str, str] | None:
    """The first of THREAD_SETTINGS that env sets to a count, as (name, value): the count the user chose, if any."""
    return next(((var, env[var]) for var in THREAD_SETTINGS if env.get(var) and _a_count(env[var])), None)


def _a_count(value: str) -> bool:
    """Whether ``value`` is a count of threads: a whole number above 0 (OpenMP's, one for each level of
    nesting, comma-separated)."""
    return re.fullmatch(r"\s*[1-9][0-9]*(\s*,\s*[1-9][0-9]*)*\s*", value) is not None


def folders_off_the_path() -> list[str]:
    """The folders of the top-level modules this process imported that no entry of its ``sys.path``
    holds now: found through ``""`` (the folder it was in then), before an ``os.chdir``. A notebook's
    helper module beside it, imported by a cell, then the folder changed (three of the tutorials change
    it): a handle that uses the module failed in every worker with "No module named", though it had
    imported in the notebook."""
    try:
        os.getcwd()
    except FileNotFoundError:  # a relative path names nothing now (the folder was removed): none is read
        return []
    on_path = {os.path.abspath(p) for p in sys.path if p}
    found: list[str] = []
    for name, module in list(sys.modules.items()):
        if "." in name:
            continue
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.name != name:  # an alias: __main__ of `python -m easyserve`, whose folder
            continue  # (easyserve's own) on a worker's path put its http.py in the standard library's place
        file = getattr(module, "__file__", None)
        if isinstance(file, str):
            folder = os.path.dirname(os.path.abspath(file))
            if os.path.splitext(os.path.basename(file))[0] == "__init__":  # a package: the folder that holds it
                folder = os.path.dirname(folder)
            folders = [folder]
        else:  # a namespace package (a folder without __init__.py), maybe in several places; or built in
            try:
                folders = [os.path.dirname(os.path.abspath(p)) for p in getattr(module, "__path__", ())
                           if isinstance(p, str)]
            except Exception:  # a module whose __path__ is not a plain list (some lazy loaders')
                folders = []
        found += [folder for folder in folders if folder not in on_path and folder not in found]
    return found


def current_folder(known: str = "removed since") -> str:
    """The folder this process is in; ``known`` where it was removed since (a deploy replaced it)."""
    try:
        return os.getcwd()
    except FileNotFoundError:
        return known


def start_hint(error: str, trace: str) -> str:
    """What a worker's failed start most likely means, from its error and its last lines (``trace``):
    one line under the traceback, for a start and a reload alike."""
    if "Traceback" not in trace:  # killed (StartTimeoutS) or died without a traceback
        return ("Hint: a setup that takes this long may be downloading or compiling; raise StartTimeoutS if it "
                "is meant to" if "StartTimeoutS" in error else
                "Hint: a process that ends without a traceback was killed (out of memory: see `dmesg`), or its "
                "handle or a library it calls ended it (os._exit, a crash in native code)")
    if re.search(r"^(SyntaxError|IndentationError|TabError): ", trace, re.MULTILINE):
        return "Hint: the handle's module does not compile: the traceback above ends at the line, marked with ^."
    if "ModuleNotFoundError" in trace or "ImportError" in trace:
        return ("Hint: the traceback above is an import that fails in the worker process; check that the module "
                "imports in a plain `python -c` run from the same directory and environment.")
    if re.search(r"can't start new thread|^BlockingIOError: \[Errno 11\]", trace, re.MULTILINE):
        # easyserve's own threads fail first, and the traceback, its frames left out, blamed the handle
        return ("Hint: the worker could not start a thread or process: the limit on this user's processes and "
                "threads (ulimit -u), or the container's (pids.max; Kubernetes' podPidsLimit), is reached. Raise "
                "it, or run fewer workers (ProcessPerGPU) or threads (PreprocessThreads).")
    # (not a program that subprocess could not find: not installed, or not on PATH)
    missing = re.search(r"^FileNotFoundError: \[Errno 2\] No such file or directory: '([^'/][^']*)'$", trace,
                        re.MULTILINE)
    if missing and re.search(r", in (__init__|setup)\n", trace) and ", in _execute_child\n" not in trace:
        return (f"Hint: {missing[1]!r} is a relative path, which is read from the directory the server was started "
                f"in ({current_folder()}); to read a file beside the config, open device.path({missing[1]!r}) in "
                "setup.")
    if re.search(r"Torch not compiled with CUDA enabled|Found no NVIDIA driver|No CUDA GPUs are available|"
                 r"CUDA driver initialization failed|no CUDA-capable device", trace):
        return ("Hint: this worker has no GPU to use (a CPU worker: GPUs: cpu, or the GPUs listed are not on this "
                "machine, see the warning above); move the model with .to(device.torch_device), which is the "
                "worker's GPU or the CPU, not with .cuda() or 'cuda'.")
    if "Can't get attribute" in trace and "cloudpickle" in trace:
        return ("Hint: the handle's class is no longer in its module under the name it was imported by (renamed or "
                "moved since): import it again, and pass the class that is there now.")
    if re.search(r", in <module>\n", trace) and not re.search(r", in (__init__|setup)\n", trace):
        return ("Hint: the traceback above comes from the top level of the handle's module, as it was imported, "
                "before __init__ or setup; work such as loading a model belongs in setup().")
    return ("Hint: the traceback above comes from the handle's __init__ or setup; check what it loads (a model "
            "path in HandleArgs, or the .onnx file served).")


class WorkerPool:
    """Workers plus the queue that feeds them. Create, ``await start()``, ``submit``, ``await stop()``."""

    def __init__(self, config: Config, handle: HandleRef, specs: list[WorkerSpec]) -> None:
        self.config = config
        self.handle = handle
        self.workers = [Worker(spec) for spec in specs]
        self._folder = os.getcwd()  # the current folder when a worker was last started (see spawn)
        self.queue = BatchQueue(config.max_queue_size, config.max_batch_size, config.max_wait_ms / 1000,
                                pass_over_late=config.queue_order == "deadline")
        self.stats = Stats()
        # the model's inputs and outputs, as the workers running each handle (payload) reported them: the
        # server never imports the handle itself (see the signature property)
        self._signatures: dict[bytes, Signature | None] = {}
        self.stopping = False  # refusing new requests (draining)
        self.closing_soon = False  # a stop is coming (ShutdownDelayS): still serving, not ready, answers close
        self.closing = False  # the drain is over: workers are being stopped, none restarted
        self._first_ready: set[asyncio.Future] = set()  # what start() waits for: one failing ends the start
        self.serving = False  # a worker has been ready: before that, the handle is still loading
        self.started = False  # start() has returned: every worker was ready once
        # called when a worker is ready (the signature may change) and after a reload (the model's name may)
        self.listeners: list[Callable[[], None]] = [self._count_for_model]
        self._count_for_model()
        self._loop = asyncio.get_running_loop()
        self._idle: collections.deque[Worker] = collections.deque()
        self._pump_timer: asyncio.TimerHandle | None = None
        self._late = False  # whether its last batch was taken past requests that could not be answered in time
        self._late_said = -math.inf  # loop time of the last warning that it does
        self._late_told = False  # warned, and not yet told that it caught up
        self._ids = itertools.count(1)
        self._prefix = secrets.token_hex(4)
        self._drained = asyncio.Event()
        self._aborted = False  # a second signal: stop without waiting for the drain
        self._reading = 0  # requests whose body is being read
        self.watchdog = Watchdog(self)
        self._loop_cpu = time.thread_time()  # created on the event loop's thread: its CPU from here is the server's
        self.gpus = GpuMonitor({spec.gpu: spec.visible for spec in specs if spec.gpu is not None})
        self._payload = handle_payload(handle, config)
        # by handle (payload), the worker whose process is to say what its HandleArgs lacked or left unread, after
        # its first batch; None once one has: one process says it, not every worker and every restart
        self._args_teller: dict[bytes, Worker | None] = {}
        wire.code_fingerprint()  # the code this server runs, read now: its workers must run the same
        self.probation: Probation | None = None  # a reload's new handle, on probation (see died_on_probation)
        # StartsPerGPU: by device (a GPU's id; None, the CPU workers), the workers loading the handle, and
        # those started that wait for their turn to (see set_up_in_turn)
        self._setting_up: dict[int | None, set[Worker]] = {}
        self._turns: dict[int | None, collections.deque[Worker]] = {}
        self.rolled_back: str | None = None  # why the last reload was rolled back, if it was
        self.last_reload: dict | None = None  # the last reload tried: what, when, how it ended (see said_reload)
        self.deaths_in_a_row = 0  # see FAILING_AFTER_DEATHS and died_running
        self._said_threads = False  # see _tell_threads
        self._said_threads_unset = False  # a thread count in the environment that is none (see spawn)
        self._last_death = -math.inf

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker; raise :class:`StartupError` with the first failure's traceback."""
        self.gpus.start()  # before the workers: their model loading shows in the GPUs' memory
        await asyncio.gather(*(self.spawn(w) for w in self.workers))
        pending = self._first_ready = {w.ready for w in self.workers}
        failed = None
        began, notice = time.monotonic(), STILL_STARTING_S
        while pending and failed is None:  # fail fast: the first worker that cannot start ends it
            done, pending = await asyncio.wait(pending, timeout=max(0.0, began + notice - time.monotonic()),
                                               return_when=asyncio.FIRST_COMPLETED)
            if not done:  # a long setup (a download, a compilation) said to be going on, not a silent cell
                queued = {w for turns in self._turns.values() for w in turns}
                loading = [w.name for w in self.workers if not w.ready.done() and w not in queued]
                log.warning("still starting after %g s: %s loading the handle (its setup() running)%s; "
                            "StartTimeoutS (%g s) ends the start if it goes on", notice,
                            ", ".join(loading), f", {len(queued)} more waiting their turn (StartsPerGPU="
                            f"{self.config.starts_per_gpu})" if queued else "", self.config.start_timeout_s)
                notice *= 2
                continue
            failed = next((w for w in self.workers if w.ready in done and w.ready.result()), None)
        if failed is not None:
            await self.stop(drain_timeout=0)
            if failed.config_error:  # it would fail the same way every time: a config error, not a start's
                raise ConfigError(failed.config_error)
            trace = said_last(failed)
            raise StartupError(f"worker {failed.name} could not start handle {self.handle.describe()}: "
                               f"{failed.error}\n\n{trace}\n{start_hint(failed.error, trace)}") from None
        self.started = True

    def ends_start(self, worker: Worker) -> bool:
        """Whether this worker's failure ends ``start()``, which then raises it: its first start failed
        (one that was ready, and died while others still start, is restarted as at any other time).
        Once ``start()`` has returned, every first start succeeded: this is never true again."""
        ready = worker.ready
        return ready in self._first_ready and ready.done() and bool(ready.result())

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Refuse new requests, let queued and running ones finish (up to ``drain_timeout``), then stop
        every worker; requests still unanswered get 503."""
        self.stopping = True
        if drain_timeout > 0:
            try:
                await asyncio.wait_for(self._quiet(), drain_timeout)
            except asyncio.TimeoutError:
                if self.unanswered() > self._reading:
                    log.warning("drain timeout (%.1fs) reached; stopping with requests unanswered", drain_timeout)
                else:  # bodies trickling in, which were to be answered 503 once in: answered so now
                    log.warning("drain timeout (%.1fs) reached with %d request bod%s still arriving: answered 503 "
                                "without the rest", drain_timeout, self._reading, "y" if self._reading == 1 else "ies")
        self.closing = True
        for pending in self.queue.clear():
            pending.fail(NotReady("server stopped before this request ran"))
        for worker in self.workers:  # after an aborted drain, running requests are not waited for
            for pending in worker.batch + worker.next_batch:
                pending.fail(NotReady("server stopped while this request ran"))
        if self._pump_timer:
            self._pump_timer.cancel()
        self.watchdog.tell_timeouts()
        try:
            await asyncio.gather(*(self._stop_worker(w) for w in self.workers))
            for worker in self.workers:  # pipes a worker's own children may still hold open
                if worker.output is not None:
                    worker.output.close()
                worker.close_stacks()
        finally:
            self.watchdog.holds.close()
            await self.gpus.stop()

    async def _quiet(self) -> None:
        # Drained, and still so a moment later: a request already on the wire when the drain began
        # (sent on an open connection, not yet read) gets that moment to arrive and be answered,
        # rather than have its connection closed under it.
        while not self._aborted:
            if self._busy_or_queued():
                self._drained.clear()
                self.check_drained()
                await self._drained.wait()
                continue
            await asyncio.sleep(DRAIN_QUIET_S)
            if not self._busy_or_queued():
                return

    def abort_drain(self) -> None:
        """End a graceful stop's wait now: unanswered requests get 503."""
        self._aborted = True
        self._drained.set()

    @property
    def aborted(self) -> bool:
        """Whether a stop was told not to wait (:meth:`abort_drain`)."""
        return self._aborted

    async def _stop_worker(self, worker: Worker) -> None:
        if worker.proc is None or worker.exited is None or worker.exited.done():
            return
        exited = worker.exited
        was, worker.state = worker.state, "stopping"
        # Still running after the drain (its requests had their 503s), or still in setup (it reads
        # nothing until its model is loaded): no reason to wait for either.
        # A worker told to stop ends the processes its handle started; one killed cannot, so this process
        # does, and waits for them here: the event loop may end with this stop.
        killed = []
        if was in ("busy", "starting") or not worker.linked:
            killed.append(kill_with_descendants(worker.proc, self._loop))
        else:
            worker.transport.writelines(wire.pack(("stop",)))
        for _ in range(2):
            try:
                await asyncio.wait_for(asyncio.shield(exited), STOP_GRACE_S)
                break
            except asyncio.TimeoutError:
                log.warning("worker %s did not stop within %.0fs; killing it", worker.name, STOP_GRACE_S)
                killed.append(kill_with_descendants(worker.proc, self._loop))
        else:
            log.error("worker %s (pid %d) could not be reaped", worker.name, worker.proc.pid)
        for descendants in [*killed, worker.left_behind]:
            if descendants is not None:
                await descendants.ended()
        reap_orphaned_reapers()  # that of a worker killed (still loading its model), given to this process

    # -- requests ----------------------------------------------------------------------------------

    def submit(self, task_info: Any, request_id: str | None = None, query: str = "",
               headers: tuple | None = None) -> Pending:
        """Queue one request; its future resolves to ``(status, JSON bytes or error message)``.
        ``request_id`` names it to the handle and in the log (by default, its task id); ``query`` is the
        URL's query string, which the worker gives the handle as ``task["parameters"]``, and ``headers``
        the (name, value) pairs of the request's headers that ``PassHeaders`` names (``task["headers"]``).

        Raises :class:`~easyserve.errors.Overloaded` when the queue is full and
        :class:`~easyserve.errors.NotReady` while stopping or when no worker can run it.
        """
        if self.stopping:  # Retry-After: a client (or proxy) should go elsewhere, or come back once restarted
            raise NotReady("server is shutting down", retry_after=1.0)
        unusable = self.unusable()
        if unusable is not None:
            raise unusable
        now = self._loop.time()
        task_id = f"{self._prefix}-{next(self._ids)}"
        pending = Pending(task_id, wire.mark_large(task_info), self._loop.create_future(), now,
                          now + self.config.timeout_s, request_id=request_id or task_id, query=query,
                          headers=headers,
                          items=task_info.items or 1 if isinstance(task_info, InferTask) else 1)
        pending.answered = self._answered
        self.queue.put(pending)
        self.watchdog.track(pending)
        self.stats.requests += 1
        self.pump()
        return pending

    def _answered(self, pending: Pending, status: int) -> None:
        """Count a request's answer in the inference statistics (``stats.Inferences``): every way it
        ends (a worker's answer, a 504, a worker's death, a stop) answers it once, by ``Pending.finish``
        (a future cancelled, its client gone, is not answered there)."""
        if pending.gone or pending.unread:  # its client left, or it was malformed
            return
        self.stats.inferences.answered(status == 200, time.perf_counter() - pending.clock, pending.items,
                                       pending.waited)

    def reading(self) -> _Reading:
        """Count a request whose body is still arriving as in flight: a drain waits for it, and it
        then gets its answer (a 503, as the server is stopping) rather than a closed connection."""
        return _Reading(self)

    def add_reading(self, count: int) -> None:
        """Bodies being read elsewhere (an HTTP front process), counted as :meth:`reading` counts them."""
        self._reading += count
        self.check_drained()

    def abandon(self, pending: Pending) -> None:
        """The client went away (or its connection went with an HTTP front that died): drop the
        request if it has not run yet."""
        if pending.started is None:
            self.left_queue(pending)
        pending.gone = True
        pending.fail(NotReady("the client closed the connection"))
        self.check_drained()

    def left_queue(self, pending: Pending) -> None:
        """``pending`` leaves the queue without a worker (its deadline, its client gone): its stay counts
        in the queue-wait histogram all the same, or under overload it held only the shorter waits of
        the requests that were run (136 of 300), and none of those that waited out TimeoutS."""
        if self.queue.remove(pending):
            self._stayed(pending, time.perf_counter())

    def _stayed(self, pending: Pending, clock: float) -> None:
        """``pending`` leaves the queue at ``clock`` (``perf_counter``): its stay, in its own wait and the
        queue-wait histogram, on a clock finer than the event loop's, which uvloop keeps in milliseconds."""
        stay = clock - pending.entered
        pending.waited += stay
        self.stats.queue_wait.observe(stay)

    def pump(self) -> None:
        """Hand waiting requests to idle workers, as batches (see :meth:`BatchQueue.take`); while none
        is idle, hand a pipelined worker its next batch (see :meth:`_ahead`)."""
        if self._pump_timer is not None:
            self._pump_timer.cancel()
            self._pump_timer = None
        while True:
            while self._idle and not self._idle[0].linked:
                # its process has closed the connection (it died) and the watchdog has yet to hear of it:
                # a batch written to it would raise in whatever called pump (a request's own handler)
                self._idle.popleft()
            worker = self._idle[0] if self._idle else self._ahead()
            if worker is None:
                break
            ahead = worker.state == "busy"
            now = self._loop.time()
            # a batch handed ahead starts once the one the worker runs ends, at the soonest when it has run
            # as long as the quickest recent batch: its requests must have the time left for both
            waits = max(0.0, self.queue.quickest() - (now - worker.batch_began)) if ahead else 0.0
            # a retried request runs alone and at once on an idle worker, never behind another batch
            batch = self.queue.take(now, ahead or any(w.state == "busy" for w in self.workers),
                                    solo=not ahead, starts_in=waits)
            if batch is None:
                break
            if isinstance(batch, float):
                self._pump_timer = self._loop.call_at(batch, self.pump)
                break
            if self.queue.late != self._late:
                self._turned_late()
            batch = [p for p in batch if not p.future.done()]  # clients gone, deadlines passed
            packed = self._pack(batch) if batch else None
            if packed is not None:
                if not ahead:
                    self._idle.popleft()
                self._run(worker, *packed)
        self.check_drained()

    def _turned_late(self) -> None:
        """Say when requests start to be passed over (at most once a minute), and when that stops."""
        self._late = self.queue.late
        now = self._loop.time()
        if self._late and now - self._late_said >= LATE_LOG_EVERY_S:
            self._late_said, self._late_told = now, True
            log.warning("overloaded: requests with less time left than the quickest recent batch took are passed "
                        "over for ones that can still be answered within TimeoutS=%gs; they get their 504 at their "
                        "deadline without running (QueueOrder: fifo runs them all the same)", self.config.timeout_s)
        elif not self._late and self._late_told:
            self._late_told = False
            log.info("the queue has caught up: no request is passed over any more")

    def _ahead(self) -> Worker | None:
        """The busy worker to hand its next batch to now, if any: one that prepares batches while it
        runs one (Pipeline), holds only that one, and is not about to be replaced; of those, the one
        whose batch began first, as the likeliest to finish first.

        Only while no worker is idle (an idle one takes the batch), and only one batch ahead: the
        batch is then taken at about the moment the worker's last one ends, so it holds what the
        queue gathered over a whole batch's run, as a batch taken by an idle worker would.

        Never to a worker running a retried request (``solo``): it runs alone so that a death under it
        is its own doing, and a batch prepared beside it (a request whose preprocess crashes the
        process) ended it a second time, failing it with 500 for another request's crash."""
        if not self.queue:
            return None
        chosen = None
        for w in self.workers:
            if (w.state == "busy" and not w.next_batch and w.info.get("pipeline") and not w.leaving and w.linked
                    and not w.batch[0].solo and w.retire_reason is None and not w.recheck
                    and (w.batch_limit is None or w.served + 1 < w.batch_limit)
                    and (chosen is None or w.batch[0].started < chosen.batch[0].started)):
                chosen = w
        return chosen

    def check_drained(self) -> None:
        if self.stopping and not self._busy_or_queued():
            self._drained.set()

    def _pack(self, batch: list[Pending]) -> tuple[list[Pending], int, list[bytes]] | None:
        """The message that sends ``batch`` to a worker. A request that cannot be pickled fails alone with
        400 (JSON travels as its bytes, so none of a client's body should: this is a last guard); ``None``
        if none is left."""
        batch_id = next(self._ids)
        try:
            tasks = [(p.task_id, p.task_info, p.request_id, p.query, p.headers) for p in batch]
            return batch, batch_id, wire.pack(("run", batch_id, tasks))
        except Exception:
            kept = []
            for pending in batch:
                try:
                    wire.pack(pending.task_info)
                    kept.append(pending)
                except Exception as exc:
                    pending.fail(BadRequest.unpicklable(exc))
            if not kept or len(kept) == len(batch):
                for pending in kept:
                    pending.fail(HandleError("the batch holding this request could not be passed to a worker"))
                return None
            return self._pack(kept)

    def _run(self, worker: Worker, batch: list[Pending], batch_id: int, message: list[bytes]) -> None:
        now, clock = self._loop.time(), time.perf_counter()
        for pending in batch:
            pending.attempts += 1
            pending.started = now
            self._stayed(pending, clock)  # this stay in the queue only, not a retry's first
        if worker.batch:  # it runs one: this is the next, which it prepares meanwhile (timed once it runs)
            worker.next_batch, worker.next_id = batch, batch_id
        else:
            worker.state = "busy"
            worker.batch, worker.batch_id = batch, batch_id
            worker.batch_began = now
            worker.batch_timer = self.watchdog.batch_started(worker, batch_id)
        worker.transport.writelines(message)
        self.stats.record_batch(sum(p.items for p in batch))  # counted when handed over, ahead or not; in items

    # -- worker processes --------------------------------------------------------------------------

    async def spawn(self, worker: Worker) -> None:
        """Start a process for this worker slot; it reports ``ready`` (or ``failed``) when set up."""
        spec = worker.spec
        self._folder = current_folder(self._folder)
        env = dict(os.environ)
        env["CUDA_VISIBLE_DEVICES"] = spec.visible  # empty hides every GPU from a CPU worker
        # CUDA numbers GPUs fastest first unless told otherwise, nvidia-smi (whose indices these are, and
        # whose readings /stats shows) by PCI bus: on a machine of mixed GPUs the two orders differ
        env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        if self.config.max_worker_memory_mb is not None:
            # One allocator arena (glibc), whose free memory the worker's trim gives back whole: with
            # Pipeline, batches are received in a thread of their own, whose arena kept a freed 15 MB body
            # resident at the top of its heap, which trimming leaves, and a handle keeping nothing read 66 MB
            # for 38 and was replaced after every other large body. (Not otherwise: an arena for each
            # thread spares preprocess's threads a lock, and the memory is taken again by the next body.)
            env.setdefault("MALLOC_ARENA_MAX", "1")
        # the worker's share of the cores, unless a count is given: then that one for each library (an
        # OMP_NUM_THREADS=4 of the user's left MKL's at the share, and torch, which takes MKL's, at it)
        given = thread_setting(env)
        count = given[1] if given else str(spec.threads)
        for var in THREAD_SETTINGS:
            if env.get(var) and not _a_count(env[var]):  # "abc", "0": no count, taken as unset, and said once
                if not self._said_threads_unset:
                    self._said_threads_unset = True
                    log.warning("%s=%r in the server's environment is no count of threads (a whole number above 0): "
                                "the workers' libraries are given %s instead", var, env[var], count)
                del env[var]
            env.setdefault(var, count)
        if worker.output is not None:  # the last process's pipe, held open by something it started
            worker.output.close()
            worker.output = None
        worker.close_stacks()
        worker.stacks = stacks_file()
        child = start_child("easyserve.worker", env, () if worker.stacks is None else (worker.stacks,))
        worker.cpu_mark = None
        worker.proc, ours, worker.lifeline = child.proc, child.sock, child.lifeline
        worker.state = "starting"
        worker.kill_reason = worker.trace = worker.transport = worker.retire_reason = worker.retire_kind = None
        worker.stuck_at = None
        worker.rss, worker.rss_held, worker.recheck, worker.deferred, worker.reading_due = None, 0, False, False, False
        worker.served = 0
        worker.warm = worker.ran_model = False
        every = self.config.max_batches_per_worker
        worker.batch_limit = None if every is None else every + random.randint(0, every // 10)
        worker.info = {"pid": worker.proc.pid}
        worker.ready = self._loop.create_future()
        worker.exited = self._loop.create_future()
        self.watchdog.watch(worker)  # before anything can fail: its exit is noticed whatever happens
        worker.output = logs.ProcessOutput(worker.name, worker.proc.pid, worker.ring)
        worker.output.attach(self._loop, child.output, child.records)
        try:
            transport, _ = await self._loop.connect_accepted_socket(lambda: _WorkerProtocol(self, worker), ours)
        except BaseException:
            ours.close()
            kill_with_descendants(worker.proc, self._loop)
            raise
        worker.transport = transport
        boot = {  # plain values only: the worker reads this before it can import anything of the user's
            # the server's path; the folder it was started from goes last (see worker.main)
            "sys_path": [p for p in sys.path if p],
            # the last folder known where it is gone: a deploy that replaced the release folder the server was
            # started from failed every worker's start after it, for ever, each worker that died lost for good
            "cwd": self._folder,
            "module_dirs": folders_off_the_path(),
            "device": {"kind": "cpu" if spec.gpu is None else "cuda", "gpu": spec.gpu,
                       "threads": spec.threads, "name": spec.name, "config_dir": os.path.abspath(self.config.base_dir)},
            "log_level": log.getEffectiveLevel(),
            "preprocess_threads": self.config.preprocess_threads,
            "pipeline": self.config.pipeline,
            "timeout_s": self.config.timeout_s,
            "max_batch_size": self.config.max_batch_size,  # a batch never runs more items (worker._Batch._put_back)
            "stacks_fd": worker.stacks,  # where it writes its threads' stacks when told (watchdog: stuck)
            "max_memory_mb": self.config.max_worker_memory_mb,  # above it, the worker trims its allocator
            "code": wire.code_fingerprint(),  # the worker refuses to run other code than this server's
            "tell_args": self._tells_args(worker, worker.payload or self._payload),
        }
        transport.writelines(wire.pack(boot))
        self._set_up_in_turn(worker)

    def _tells_args(self, worker: Worker, payload: bytes) -> bool:
        """Whether ``worker``'s new process is to say what its handle's HandleArgs lacked or left unread: none
        has said it of ``payload``, nor is to (a process that died before its first batch was done, its
        worker restarting it or dead, never will)."""
        if payload in self._args_teller:
            teller = self._args_teller[payload]
            if teller is None or (teller is not worker and teller.state not in ("dead", "failed", "stopped")):
                return False
        self._args_teller[payload] = worker
        return True

    def _told_args(self, worker: Worker) -> None:
        """``worker``'s process has answered its first batch: it has said what it was to say of its HandleArgs."""
        if worker.runs is not None and self._args_teller.get(worker.runs) is worker:
            self._args_teller[worker.runs] = None

    def _set_up_in_turn(self, worker: Worker) -> None:
        """Send ``worker``'s process its handle, which it loads on receiving it, or, with ``StartsPerGPU``
        of its device's workers loading theirs, queue it until one has done (``set_up_ended``). Its
        imports and connection are made meanwhile: it waits, ``starting``, holding no model."""
        limit = self.config.starts_per_gpu
        loading = self._setting_up.get(worker.spec.gpu, set())
        if limit is not None and len(loading) >= limit:
            self._turns.setdefault(worker.spec.gpu, collections.deque()).append(worker)
            worker.waiting_turn = True
            if self.started:  # at the start, its notice counts them: a restart's wait is said here
                log.info("worker %s waits its turn to load the handle: %s loading (StartsPerGPU=%d)", worker.name,
                         ", ".join(sorted(w.name for w in loading)), limit)
            return
        worker.waiting_turn = False
        self._setting_up.setdefault(worker.spec.gpu, set()).add(worker)
        worker.runs = worker.payload or self._payload  # read now: a reload's rollback may have come meanwhile
        worker.transport.writelines(wire.pack(worker.runs))
        self.watchdog.setup_began(worker)
        ready = worker.ready
        ready.add_done_callback(lambda _: ready is worker.ready and self.set_up_ended(worker))

    def set_up_ended(self, worker: Worker) -> None:
        """``worker``'s process is set up, failed to be, or has exited: the next waiting for its device's
        turn (``StartsPerGPU``) begins."""
        device = worker.spec.gpu
        loading, waiting = self._setting_up.get(device, set()), self._turns.get(device)
        loading.discard(worker)
        if not waiting:
            return
        if worker in waiting:
            waiting.remove(worker)
        limit = self.config.starts_per_gpu
        # not once a stop has begun, unless no worker is up to answer what is queued: a model loaded during
        # the drain was only stopped with it (a reload's worker, a restart)
        needed = not self.stopping or (bool(self.queue) and not any(_up(w) for w in self.workers))
        while waiting and (limit is None or len(loading) < limit) and not self.closing and needed:
            turn = waiting.popleft()
            if turn.state == "starting" and turn.transport is not None and not turn.transport.is_closing():
                self._set_up_in_turn(turn)

    def _on_message(self, worker: Worker, message: tuple) -> None:
        kind = message[0]
        if kind == "done":
            self._on_done(worker, message)
        elif kind == "memory":
            self._on_memory(worker, message)
        elif kind == "ready":
            self._on_ready(worker, message)
        elif kind == "failed":
            self._on_failed(worker, message)

    def _on_done(self, worker: Worker, message: tuple) -> None:
        _, batch_id, results, run_s, cpu_s, ran, stages, read_items, apart = message
        worker.cpu_mark = self.stats.count_cpu("workers", worker.cpu_mark, cpu_s)
        if batch_id != worker.batch_id:
            return
        if worker.batch_timer is not None:
            worker.batch_timer.cancel()
        batch = worker.batch
        if worker.output is not None:
            # the traceback logged before the error is answered; and what a batch answered with success
            # wrote (a handle's warning), logged before its answers: read as it came, it was logged up to
            # 0.1 s later, and a notebook showed it under the next cell, not the one that asked
            worker.output.take_in()
        charged = phases(stages)
        again, ok = self._hand_out(batch, results, read_items, stages[-1] or 0.0)
        if again:  # at the head, in order: they came first, and run next (see _after_batch)
            self.queue.put_front([p for p in again if not p.future.done()])
        self.stats.run_time.observe(run_s)
        self.stats.record_stages(stages)
        self.stats.batches_run_apart += apart
        # what a batch costs, for passing over requests that cannot be answered in time: not a process's
        # first batch (a model's warm-up: lazy loading, autotuning, compiling), nor one that answered
        # nothing but errors (a request refused in a millisecond says nothing of the model's cost)
        answered = any(result[0] == 200 for result in results)
        if ok[0]:  # an execution that answered a request: not one whose 200s all went to clients gone
            # (or requests a 504 answered before), of as many items as the model ran on
            self.stats.inferences.executed(ran, charged)
            self.stats.inferences.succeeded(*ok, charged)
        if worker.served and answered:
            self.queue.ran(run_s)
        worker.served += 1
        if worker.served == 1:
            self._told_args(worker)
        worker.ran_model = worker.ran_model or ran > 0
        if ran:
            self._lived_through_a_batch()
        if ran and self.probation is not None:
            self._passed(worker, self.probation)
        worker.warm = worker.warm or answered
        if len(batch) > worker.largest_batch:  # its next reading is what a batch this large leaves
            worker.largest_batch, worker.base_rss, worker.base_served = len(batch), 0, worker.served
        worker.batches += 1
        worker.barren_deaths = 0
        worker.batch = []
        self._after_batch(worker)

    def died_running(self, worker: Worker, batch: list[Pending]) -> None:
        """``worker`` died of itself (the server did not kill it) as it ran ``batch``: counted towards
        :attr:`failing` where a request of it ran for the first time (a retry's death is the request's),
        and the worker ran the handle the pool serves, past its probation: the deaths of a reload's new
        handle are the handle's, which a rollback answers (see died_on_probation), and those requests
        run again on the old one. Counted here too, they were answered 503, the machine blamed."""
        if self.ran_a_new_handle(worker):
            return
        if not any(pending.attempts <= 1 for pending in batch):
            return
        self.deaths_in_a_row += 1
        self._last_death = self._loop.time()
        if self.deaths_in_a_row == FAILING_AFTER_DEATHS:
            log.error("the workers died on %d batches in a row, of different requests, and none lived through one "
                      "between: the fault looks like this server's (its GPU, its driver, its memory), not the "
                      "requests'. Until a worker lives through a batch, a request whose worker dies is answered "
                      "503 at once, not run here again, so that a load balancer sends it to another server, and "
                      "/ready answers 503 for %g s after each such death", self.deaths_in_a_row, FAILING_FOR_S)

    def _lived_through_a_batch(self) -> None:
        if self.deaths_in_a_row >= FAILING_AFTER_DEATHS:
            log.warning("a worker lived through a batch, after %d batches in a row that its workers died on: "
                        "requests are run again as usual", self.deaths_in_a_row)
        self.deaths_in_a_row = 0

    @property
    def failing(self) -> bool:
        """Whether the workers die on every batch, whichever its requests (see FAILING_AFTER_DEATHS): a
        request whose worker dies is answered 503, not run here again. (:attr:`ready` is false for
        FAILING_FOR_S after each death: a server that answers no request again is never tried again.)"""
        return self.deaths_in_a_row >= FAILING_AFTER_DEATHS

    def failing_error(self, cause: str) -> NotReady:
        """The 503 of a request whose worker died while :attr:`failing`: ``cause``, how it died."""
        return NotReady(f"{cause}; {self.failing_reason()}, so it was not run here again: send it to another "
                        "server", retry_after=self.failing_left_s() or 1.0)

    def failing_reason(self) -> str:
        return (f"this server's workers died on each of the last {self.deaths_in_a_row} batches, of different "
                "requests, and lived through none between: more likely the server's fault (its GPU, its driver, its "
                "memory) than each request's")

    def failing_left_s(self) -> float:
        """Seconds until :attr:`ready` may be true again, after the last death of :attr:`failing`."""
        if not self.failing:
            return 0.0
        return max(0.0, self._last_death + FAILING_FOR_S - self._loop.time())

    def _after_batch(self, worker: Worker) -> None:
        """A worker has answered its batch: it runs the one it prepared meanwhile, is replaced (a retirement
        planned: its memory, its batch count, a reload), waits for its memory's reading, or is idle."""
        if worker.next_batch:  # the batch it prepared meanwhile runs now
            worker.batch, worker.batch_id = worker.next_batch, worker.next_id
            worker.batch_began = self._loop.time()
            worker.batch_timer = self.watchdog.batch_started(worker, worker.batch_id)
            worker.next_batch, worker.next_id = [], 0
        if worker.retire_reason is not None:
            planned = worker.retire_reason, worker.retire_kind
        else:
            planned = (RELOADED, "reload") if worker.leaving else self._planned(worker)
        if worker.batch:  # still busy: replaced, if it must be, once it has answered that batch too
            worker.retire_reason, worker.retire_kind = planned or (None, None)
            self.pump()
        elif planned is None and worker.recheck:
            # its last reading, above MaxWorkerMemoryMB, held a batch: no batch for it until the one it
            # takes now, holding none, has come (a "memory" message is sure to follow, as what it holds
            # has changed). Handed one at once, it was receiving it as it read its memory, and under
            # load every reading held one: with Pipeline, replaced only at MEMORY_CEILING times the bound
            worker.state, worker.reading_due = "idle", True
            self.pump()
        elif planned is None:
            self._make_idle(worker)
        else:
            self._retire(worker, *planned)

    @staticmethod
    def _hand_out(batch: list[Pending], results: list, read_items: list[int] | None,
                  waited: float) -> tuple[list[Pending], list]:
        """Each request of a batch its answer: those the worker put back (their items did not fit beside
        others') are returned to go again, with the count, seconds, waits and items of those answered 200."""
        again, ok = [], [0, 0.0, 0.0, 0]  # ok: those answered 200: how many, their seconds, their waits, items
        now = time.perf_counter()
        for i, pending in enumerate(batch):
            if read_items is not None and i < len(read_items):  # as the worker read it: a large
                # inference request's items, or none (refused as it was read); None: one each
                pending.unread = read_items[i] == 0
                pending.items = read_items[i] or pending.items
            if (i >= len(results) or results[i][0] != wire.PUT_BACK) and not pending.unread:
                pending.waited += waited  # prepared, it waited for the batch before it
            if i >= len(results):
                pending.fail(HandleError(f"the handle returned {len(results)} results for a batch of {len(batch)}"))
            elif results[i][0] == 200:
                if pending.answered is not None and not pending.future.done() and not pending.gone:
                    # counted with the batch's others below, not one call each (the loop's time)
                    pending.answered = None
                    ok[0] += 1
                    ok[1] += now - pending.clock
                    ok[2] += pending.waited
                    ok[3] += pending.items
                pending.finish(200, results[i][1])
            elif results[i][0] == wire.PUT_BACK:  # its items, which the worker read, did not fit beside others'
                pending.items, pending.started = results[i][1], None
                pending.attempts -= 1
                again.append(pending)
            else:
                pending.fail(_failure(*results[i]))
        return again, ok

    def _on_memory(self, worker: Worker, message: tuple) -> None:
        # read once the batch it answered was let go: see worker.main
        _, worker.rss, worker.rss_held = message
        worker.info["rss_mb"] = round(worker.rss / 2**20, 1)
        limit = self.config.max_worker_memory_mb
        worker.recheck = limit is not None and worker.rss_held > 0 and worker.rss > limit * 2**20
        if limit is None and not worker.rss_held and not worker.said_growing:
            self._tell_growing(worker)
        if worker.state in ("idle", "busy") and worker.is_slot and worker.retire_reason is None:
            planned = self._planned(worker)
            if planned is not None and worker.state == "idle":
                self._retire(worker, *planned)
            elif planned is not None:  # handed a batch since: replaced once it has answered it
                worker.retire_reason, worker.retire_kind = planned
        if worker.reading_due:  # the reading it was kept idle for, out of the pool's reach (see "done")
            worker.reading_due = False
            if worker.state == "idle":
                self._idle.append(worker)
                self.pump()

    def _tell_threads(self, worker: Worker) -> None:
        """Warn, once a server, of CPU workers whose torch runs more threads than their share of the cores."""
        threads, share = worker.info.get("torch_threads"), worker.info.get("threads")
        if self._said_threads or worker.info.get("device") != "cpu" or not threads or not share or threads <= share:
            return
        self._said_threads = True
        given = thread_setting(os.environ)
        why = f"{given[0]}={given[1]} in the server's environment" if given else "the handle's torch.set_num_threads"
        log.warning("torch runs %d threads in each CPU worker, where a worker's share of the cores is %d (%s): "
                    "the workers' threads contend for the cores, each slower than in its share. Leave the thread "
                    "count to easyserve (it sets OMP_NUM_THREADS to the share), or call "
                    "torch.set_num_threads(device.threads) in setup", threads, share, why)

    def _tell_growing(self, worker: Worker) -> None:
        """Warn, once a slot, of a worker whose memory grows from batch to batch (see GROWING_TIMES)."""
        base = worker.base_rss
        if not base:  # after a batch larger than any before: this reading is what such a batch leaves
            worker.base_rss = worker.rss
        elif worker.rss > max(GROWING_TIMES * base, base + GROWING_MB * 2**20):
            worker.said_growing = True
            log.warning("worker %s holds %.0f MB between batches, %.0f MB after its largest batch (%d requests) "
                        "%d batches ago: should it grow on, a leak (answers or tensors kept on self, a cache keyed "
                        "by request) ends it out of memory. MaxWorkerMemoryMB replaces a worker past a bound, "
                        "between batches, losing no request", worker.name, worker.rss / 2**20, base / 2**20,
                        worker.largest_batch, worker.served - worker.base_served)

    def _on_ready(self, worker: Worker, message: tuple) -> None:
        _, worker.info, signature, worker.cpu_mark = message
        self._signatures.pop(worker.runs, None)  # the latest last; a few kept (a rollback goes one back)
        self._signatures[worker.runs] = signature
        while len(self._signatures) > 4:
            del self._signatures[next(iter(self._signatures))]
        if worker.output is not None:
            worker.output.take_in()  # what setup wrote, logged before "ready"
        limit, held_mb = self.config.max_worker_memory_mb, worker.info.get("rss_mb", 0)
        worker.rss, worker.rss_held = round(held_mb * 2**20), 0
        worker.base_rss, worker.largest_batch = worker.rss, 0  # a new process: its first batch sets the base
        too_big = limit is not None and held_mb > limit
        if too_big and (worker.candidate or not self.started):  # a start's or a reload's
            self._too_big(worker, limit)
            return
        worker.recycling = False
        worker.error = None
        worker.start_failures = 0
        if worker.start_timer is not None:
            worker.start_timer.cancel()
        if not worker.ready.done():
            worker.ready.set_result(None)  # None: no error
        log.info("worker %s ready: %s", worker.name, worker.summary())
        self._tell_threads(worker)
        if too_big and not worker.said_too_big:
            # a later process larger than the first (a start or a reload fails: see _too_big): the
            # server serves on. Said once: it is replaced after every batch, and each replacement is too
            worker.said_too_big = True
            log.warning("worker %s holds %.0f MB once set up, above MaxWorkerMemoryMB=%g: it will be replaced "
                        "after every batch; set MaxWorkerMemoryMB above what the model needs", worker.name,
                        held_mb, limit)
        self.serving = True
        for listener in self.listeners:
            listener()
        if worker.runs is not (worker.payload or self._payload):  # started before a rollback, on the new handle
            self._retire(worker, ROLLED_BACK, "rollback")
            return
        self._make_idle(worker)
        self._replace_waiting()

    def _on_failed(self, worker: Worker, message: tuple) -> None:
        _, trace, worker.config_error = message
        if worker.output is not None:
            worker.output.take_in()
        # a file name that is not UTF-8 as the worker's own stderr shows it (``caf\\udce9``): a lone
        # surrogate in the log's text failed wherever the log was written as UTF-8
        worker.trace = trace.rstrip().encode("utf-8", "backslashreplace").decode()

    def _too_big(self, worker: Worker, limit: float) -> None:
        """A worker of the server's start, or of a reload, holds more than MaxWorkerMemoryMB once set up,
        before any batch: the start (a :class:`ConfigError`) or the reload fails, saying so. It served,
        replaced after every batch (the model loaded again each time: 1.5 requests a second), with
        /ready at 200 and one warning."""
        held = worker.info["rss_mb"]
        worker.config_error = (
            f"worker {worker.name} holds {held:.0f} MB once its handle is set up, before any batch, above "
            f"MaxWorkerMemoryMB={limit:g}: it would be replaced after every batch, its model loaded again each "
            f"time; set MaxWorkerMemoryMB above {held:.0f}, with room for what a batch holds, or leave it out")
        worker.kill_reason = f"was stopped: it holds {held:.0f} MB once set up, above MaxWorkerMemoryMB={limit:g}"
        if worker.start_timer is not None:
            worker.start_timer.cancel()
        kill_with_descendants(worker.proc, self._loop)
        if not worker.ready.done():
            worker.ready.set_result("it " + worker.config_error.removeprefix(f"worker {worker.name} "))

    def _planned(self, worker: Worker) -> tuple[str, str] | None:
        """Why to replace ``worker`` now, and the kind of replacement (``memory``, ``batches``), if it
        is due: its memory, read holding no batch, above MaxWorkerMemoryMB, or its batches past
        MaxBatchesPerWorker. One slot at a time: while another is being replaced (or is down, for any
        reason), it serves on, and is replaced once that one is back, after its next batch or, idle,
        then; unless its memory is past MEMORY_CEILING times the bound. Two workers of one handle leak
        alike: both crossed the bound within a batch of each other and were replaced together, and for
        the model's load (seconds) no worker served, while /ready said 200."""
        limit, rss = self.config.max_worker_memory_mb, worker.rss
        due = None
        if limit is not None and rss is not None and rss > limit * 2**20:
            if rss > MEMORY_CEILING * limit * 2**20:  # a runaway: replaced whatever else is
                return (f"its memory ({rss / 2**20:.0f} MB) is above MaxWorkerMemoryMB={limit:g}, past "
                        f"{MEMORY_CEILING:g} times it"), "memory"
            if not worker.rss_held:  # read holding a batch, it says nothing of what the worker keeps
                due = f"its memory ({rss / 2**20:.0f} MB) is above MaxWorkerMemoryMB={limit:g}", "memory"
        if due is None and worker.batch_limit is not None and worker.served >= worker.batch_limit:
            due = (f"it has run {worker.served} batches (MaxBatchesPerWorker={self.config.max_batches_per_worker})",
                   "batches")
        if due is None:
            return None
        away = self._away(worker)
        if away is None:
            return due
        if not worker.deferred:
            worker.deferred = True
            log.info("worker %s is to be replaced (%s) once worker %s is back: one is replaced at a time, the "
                     "others serving", worker.name, due[0], away.name)
        return None

    def _away(self, worker: Worker) -> Worker | None:
        """Another slot than ``worker`` that does not serve now: being replaced (or to be, once it has
        answered its batch), restarting after a death, failing to start."""
        for other in self.workers:
            if other is not worker and other.is_slot and (other.state not in ("idle", "busy") or other.reaping
                                                          or other.retire_reason is not None):
                return other
        return None

    def _replace_waiting(self) -> None:
        """A slot is back: an idle worker whose replacement waited for it (see :meth:`_planned`) goes now
        (a busy one goes once it has answered its batch)."""
        for other in list(self._idle):
            if other.deferred and other.state == "idle" and other.is_slot:
                planned = self._planned(other)
                if planned is not None:
                    self._retire(other, *planned)
                    return

    def _retire(self, worker: Worker, reason: str, kind: str) -> None:
        """Replace a worker between batches: it has answered everything it held, gets no more, and
        stops; the watchdog starts its successor at once. Nothing it ran is lost. ``kind``: one of
        :data:`~easyserve.stats.REPLACEMENTS`, as counted. An idle one leaves the idle workers."""
        log.info("replacing worker %s (pid %d): %s", worker.name, worker.proc.pid, reason)
        self.stats.replacements[kind] += 1
        self.forget_idle(worker)
        worker.state = "retiring"
        worker.recycling = True
        worker.kill_reason = f"was replaced: {reason}"
        if worker.linked:  # else it is gone already
            worker.transport.writelines(wire.pack(("stop",)))
        proc = worker.proc
        self._loop.call_later(STOP_GRACE_S, lambda: worker.proc is proc and worker.state == "retiring"
                              and kill_with_descendants(proc, self._loop))
        self.pump()

    def _make_idle(self, worker: Worker) -> None:
        if worker.state in ("starting", "busy"):
            worker.state = "idle"
            self._idle.append(worker)
        self.pump()

    def leave(self, worker: Worker) -> None:
        """A reload replaced this worker: it finishes its batch (if any), stops, and is not restarted."""
        worker.leaving = worker.recycling = True
        if worker.state == "idle":
            self._retire(worker, RELOADED, "reload")
        elif worker.state == "starting" and worker.proc is not None:
            kill_with_descendants(worker.proc, self._loop)
        elif worker.state in ("dead", "failed"):  # no process: nothing to wait for
            self.remove(worker)

    def remove(self, worker: Worker) -> None:
        """Take a worker slot out of the pool for good (see :meth:`leave`)."""
        self.forget_idle(worker)
        if worker in self.workers:
            self.workers.remove(worker)
        worker.close_stacks()  # a reload's replaced workers held theirs for good

    def _passed(self, worker: Worker, probation: Probation) -> None:
        """``worker`` lived through a batch its model ran. If it runs the handle on ``probation`` (or on
        the probation a reload under way began during), that handle passed it: a death from now on is a
        request's doing (not after a batch refused before the model ran, whose 400 kept a crashing handle
        for good; yet after one it answered 404 by design, which kept it on probation for ever)."""
        if worker.runs is probation.payload:
            probation.passed = True
            self.probation = None
        elif probation.earlier is not None and worker.runs is probation.earlier.payload:
            # the handle a reload under way replaces answered meanwhile: should the reload fail, it is not put
            # back on probation (where one request that ended workers rolled it back, its model seen to run),
            # and should it be rolled back, it goes back to that handle, not the one before it
            probation.earlier.passed = True
            if self._payload is probation.earlier.payload:
                probation.old = (self._payload, self.handle, self.config)

    def said_reload(self, handle: str, outcome: str, error: str | None = None) -> None:
        """The last reload tried, for /stats: a SIGHUP's (``systemctl reload``) ended in the log alone."""
        said = [line for line in (error or "").strip().splitlines() if line.strip() and not line.startswith("Hint:")]
        self.last_reload = {"handle": handle, "at": round(time.time(), 3), "outcome": outcome,
                            "error": said[-1] if said else None}

    def ran_a_new_handle(self, worker: Worker) -> bool:
        """Whether ``worker`` ran a reload's handle still on probation, or one rolled back since: its death
        is that handle's, which a rollback answers, not its requests'."""
        return ((self.probation is not None and worker.runs is self.probation.payload)
                or worker.runs is not (worker.payload or self._payload))

    def died_on_probation(self, worker: Worker) -> None:
        """A process that answered no batch died of itself (not stopped, not killed as stuck past its
        time). If it ran a reload's new handle, none of whose workers has answered a batch yet, this is
        one more death of that handle; at ``ROLLBACK_AFTER`` the reload is rolled back: the old handle
        is the pool's again, its workers are replaced by ones running it (the dead at once, the idle
        now, the busy once their batch is answered), and the log says why. A reload to a handle whose
        setup runs but whose first batch crashes the process (a segfault in a model that loads, CUDA
        out of memory on the first real input) was a success: every request then ended a worker, for ever."""
        probation = self.probation
        if probation is None or worker.runs is not probation.payload:
            return
        probation.deaths += 1
        if probation.deaths < ROLLBACK_AFTER:
            return
        if probation.failing is not None:
            # the reload still runs, and fails (see reload_workers): the workers it replaced, each of which
            # would end on its next batch, start again the handle that is still the pool's
            log.error("the reload's new handle: its workers died %d times before answering any batch (the log "
                      "above says how); the workers already replaced start the old handle again", probation.deaths)
            probation.failing.set()
            self._send_back(probation.payload, self._payload)
            return
        self.probation = None
        payload, handle, config = probation.old
        went, back = self.handle.describe(), handle.describe()
        to = f"to {back}" if back != went else "to the handle and HandleArgs that served before it"
        self.rolled_back = (f"the reload to {went} was rolled back {to}: its workers died {probation.deaths} "
                            f"times before answering any batch")
        log.error("%s (the log above says how); serving the old handle again", self.rolled_back)
        self.said_reload(went, "rolled back", self.rolled_back)
        self._payload, self.handle, self.config = payload, handle, config
        self.queue.forget_run_times()
        self._send_back(probation.payload, payload)
        for listener in self.listeners:  # the model's v2 name is the old handle's again
            listener()

    def _count_for_model(self) -> None:
        """The statistics extension's counts are the served model's (its name and version, which a reload
        may change): a reload to another model does not hand it the one before's."""
        self.stats.count_for(self.config.model_identity)

    def _send_back(self, gone: bytes, payload: bytes) -> None:
        """The workers of ``gone`` start ``payload`` again: the dead at once, the idle now, the busy once
        their batch is answered, the starting once set up (see ``ready``)."""
        for other in self.workers:
            if other.payload is gone:
                other.payload = payload  # what it starts again with
                if other.state == "idle" and other.runs is gone:
                    self._retire(other, ROLLED_BACK, "rollback")
                elif other.state == "busy" and other.runs is gone:
                    other.retire_reason, other.retire_kind = ROLLED_BACK, "rollback"

    @property
    def signature(self) -> Signature | None:
        """The model's inputs and outputs: the serving handle's, as its workers reported them (the last
        reported, before any has). A rollback makes it the old handle's at once, not once a worker of
        the old handle is set up again (until then, v2 requests were checked against the inputs of the
        handle that had been rolled back); a reload makes it the new handle's once the reload is done."""
        if self._payload in self._signatures:
            return self._signatures[self._payload]
        return next(reversed(self._signatures.values()), None)

    @property
    def specs(self) -> tuple[WorkerSpec, ...]:
        """The worker processes the config asks for: each one's device (the model configuration's
        instance groups)."""
        return tuple(w.spec for w in self.workers)

    def forget_idle(self, worker: Worker) -> None:
        if worker in self._idle:
            self._idle.remove(worker)

    def refusal(self) -> EasyServeError | None:
        """What :meth:`submit` would refuse a request with now, asked before its body is read: a client
        uploaded a whole image only to be answered 429 (MaxQueueSize) at its end, even after ``Expect:
        100-continue``, and under overload every refused client's upload was held, then thrown away.
        ``submit`` still decides: the queue may fill while the body arrives. (Not a drain's 503: a body
        begun then is read and answered, the connection closing as the drain ends.)"""
        unusable = self.unusable()
        if unusable is not None:
            return unusable
        return self.queue.full()

    def unusable(self) -> NotReady | None:
        """The 503 to answer while every worker keeps failing to start (with the time until the next
        attempt as ``Retry-After``); ``None`` while any worker runs or may soon.

        Until the first worker is ready the handle is still loading, which may take minutes: a request
        is answered 503 at once rather than queued, so a client or a load balancer goes elsewhere."""
        if not self.serving:
            return NotReady("the server is starting: its workers are loading the handle", retry_after=1.0)
        if any(w.state != "failed" for w in self.workers):
            return None
        retry_in = max(0.0, min(w.retry_at for w in self.workers) - self._loop.time())
        # in tenths, as the log says it: whole seconds said "retrying in 0s" for the next start in 0.4 s
        return NotReady(f"no worker can run requests: {self.workers[0].error} (retrying in {retry_in:.1f}s)",
                        retry_after=retry_in)

    def _busy_or_queued(self) -> bool:
        """Whether a drain has requests to wait for: queued, arriving, or running for a client that waits.
        A batch whose every request was answered already (its clients left, their front died, a 504)
        runs for no one: a drain waited it out, to its limit, and then warned of requests unanswered."""
        return self.unanswered() > 0

    def unanswered(self) -> int:
        """How many requests a drain would wait for now (see :meth:`_busy_or_queued`). Read from another
        thread too (a notebook's warning): a count of the moment."""
        try:
            return len(self.queue) + self._reading + sum(
                not p.future.done() for w in list(self.workers) if w.state == "busy" for p in w.batch + w.next_batch)
        except RuntimeError:  # changed as it was read, from another thread; the loop's own reads never are
            return 0

    # -- reporting ---------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Whether a load balancer should send requests here: not stopping, and every worker up, or,
        once the start is over, at least one.

        A worker replaced on purpose (MaxBatchesPerWorker, MaxWorkerMemoryMB) counts as up: a routine
        replacement must not take a healthy server out of rotation. So does a crash, while another worker
        serves: one worker's restart (the model loading again, seconds) made a whole server unready, and
        a service of one replica (Kubernetes drops an unready pod's address) refused every new client
        meanwhile, though the other workers served. :attr:`degraded` says which workers are down."""
        if self.stopping or self.closing_soon or self.failing_left_s():
            return False
        up = [_up(w) for w in self.workers]
        return all(up) or (self.started and any(up))

    @property
    def degraded(self) -> bool:
        """Ready, with a worker down (crashed and restarting, or failing to start)."""
        return self.ready and not all(_up(w) for w in self.workers)

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds spent since the start: ``server``, the event loop's thread (HTTP with one front,
        the queue, batching; not the process's other threads, which in a notebook are the kernel's);
        ``fronts``, the HTTP front processes (``HttpWorkers`` above 1); ``workers``, the worker
        processes. A process counts from its first report (start-up is not serving) to its last: a
        batch it answered, or its exit. Call on the event loop's thread."""
        return {**self.stats.cpu_s, "server": time.thread_time() - self._loop_cpu}

    def describe(self, detail: bool = False) -> list[dict[str, Any]]:
        return [w.describe(detail) for w in self.workers]


def _up(worker: Worker) -> bool:
    """Whether ``worker`` counts as up for ``/ready``: serving, or replaced on purpose. Not one whose
    process is gone and not yet reaped (``reaping``): it keeps its last state until then, which may be
    long (killed, it is held by a GPU driver or a debugger), and a server of one such worker said it was
    ready while its requests could only wait for their 504."""
    return (worker.state in ("idle", "busy") and not worker.reaping) or worker.recycling


def _failure(status: int, message: str) -> EasyServeError:
    """A handle's answer other than 200: a 4xx is the request's fault, answered with that status (a
    ``run_batch`` may say 404 or 422); anything else is the handle's, a 500."""
    if isinstance(status, int) and 400 <= status <= 499:
        error = BadRequest(message)
        error.status = status
        return error
    return HandleError(message)


def handle_payload(handle: HandleRef, config: Config) -> bytes:
    """What every worker needs to build the handle, pickled once: unpicklable HandleArgs fail here. The
    HandleArgs are pickled apart, for the worker to read once the handle's module is pinned to the text
    the server read (``loader.pin``): an object of a class of that module among them imported the module
    from disk as they were read, before the handle's own text ran, and then matched none of its classes."""
    try:
        return cloudpickle.dumps({"handle": handle, "handle_args": cloudpickle.dumps(dict(config.handle_args))})
    except Exception as exc:
        raise ConfigError(f"HandleArgs: cannot be sent to worker processes: {type(exc).__name__}: {exc}") from None


class _WorkerProtocol(asyncio.BufferedProtocol):
    """A worker's messages, read into buffers of their own: a large answer costs the event loop no copy
    beyond the kernel's (see :class:`wire.FrameReader`)."""

    def __init__(self, pool: WorkerPool, worker: Worker) -> None:
        self.pool = pool
        self.worker = worker
        self.reader = wire.FrameReader()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        for message in self.reader.buffer_updated(nbytes):
            self.pool._on_message(self.worker, message)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.worker.transport is not None and self.worker.transport.get_protocol() is self:
            self.pool.watchdog.exited(self.worker)


class _Reading:
    """:meth:`WorkerPool.reading`: a class, where a generator's context manager took a microsecond more a request."""

    __slots__ = ("pool",)

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    def __enter__(self) -> None:
        self.pool.add_reading(1)

    def __exit__(self, *exc_info: Any) -> None:
        self.pool.add_reading(-1)
