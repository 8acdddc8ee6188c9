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
import os
import secrets
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from . import wire
from .batching import BatchQueue, Pending
from .config import Config
from .devices import WorkerSpec
from .errors import NotReady, StartupError
from .loader import HandleRef

log = logging.getLogger("easyserve")

__all__ = ["WorkerPool", "Worker"]

PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
MAX_START_FAILURES = 3  # a worker that fails to start this many times in a row is given up on
STOP_GRACE_S = 5.0


@dataclasses.dataclass(eq=False)
class Worker:
    """One worker slot; its process is replaced when it dies. ``state`` is one of
    starting, idle, busy, stopping, dead, failed (given up: it keeps failing to start)."""

    spec: WorkerSpec
    state: str = "starting"
    proc: subprocess.Popen | None = None
    transport: asyncio.Transport | None = None
    lifeline: int | None = None
    pidfd: int | None = None
    batch: list[Pending] = dataclasses.field(default_factory=list)
    batch_id: int = 0
    batch_timer: asyncio.TimerHandle | None = None
    ready: asyncio.Future | None = None
    exited: asyncio.Future | None = None
    info: dict = dataclasses.field(default_factory=dict)
    start_failures: int = 0
    restarts: int = 0
    error: str | None = None  # why the last process ended or failed to start
    kill_reason: str | None = None
    reaping: bool = False

    @property
    def name(self) -> str:
        return self.spec.name

    def describe(self) -> dict[str, Any]:
        out = {"name": self.name, "state": self.state, "restarts": self.restarts, **self.info}
        if self.error and self.state in ("starting", "dead", "failed"):
            out["error"] = self.error
        return out


class WorkerPool:
    """Workers plus the queue that feeds them. Create, ``await start()``, ``submit``, ``await stop()``."""

    def __init__(self, config: Config, handle: HandleRef, specs: list[WorkerSpec]) -> None:
        self.config = config
        self.handle = handle
        self.workers = [Worker(spec) for spec in specs]
        self.queue = BatchQueue(config.max_queue_size, config.max_batch_size, config.max_wait_ms / 1000)
        self.stats = Stats()
        self.stopping = False
        self._loop = asyncio.get_running_loop()
        self._idle: collections.deque[Worker] = collections.deque()
        self._pump_timer: asyncio.TimerHandle | None = None
        self._ids = itertools.count(1)
        self._prefix = secrets.token_hex(4)
        self._drained = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker; raise :class:`StartupError` with the first failure's traceback."""
        await asyncio.gather(*(self._spawn(w) for w in self.workers))
        pending = {w.ready for w in self.workers}
        failed = None
        while pending and failed is None:  # fail fast: the first worker that cannot start ends it
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            failed = next((w for w in self.workers if w.ready in done and w.ready.result()), None)
        if failed is not None:
            await self.stop(drain_timeout=0)
            raise StartupError(
                f"worker {failed.name} could not start handle {self.handle.describe()}:\n{failed.error}\n"
                "Hint: the traceback above comes from the handle's __init__ or setup; check its "
                "HandleArgs (model path?) and that it imports in a plain `python -c`."
            ) from None

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Refuse new requests, let queued and running ones finish (up to ``drain_timeout``), then stop
        every worker; requests still unanswered get 503."""
        self.stopping = True
        if drain_timeout > 0 and self._busy_or_queued():
            try:
                await asyncio.wait_for(self._drained.wait(), drain_timeout)
            except asyncio.TimeoutError:
                log.warning("drain timeout (%.1fs) reached; stopping with requests unanswered", drain_timeout)
        for pending in self.queue.clear():
            pending.finish(503, "server stopped before this request ran")
        for worker in self.workers:  # after an aborted drain, running requests are not waited for
            for pending in worker.batch:
                pending.finish(503, "server stopped while this request ran")
        if self._pump_timer:
            self._pump_timer.cancel()
        await asyncio.gather(*(self._stop_worker(w) for w in self.workers))

    def abort_drain(self) -> None:
        """End a graceful stop's wait now: unanswered requests get 503."""
        self._drained.set()

    async def _stop_worker(self, worker: Worker) -> None:
        if worker.proc is None or worker.exited is None:
            return
        if not worker.exited.done():
            worker.state = "stopping"
            if worker.transport is not None and not worker.transport.is_closing():
                worker.transport.writelines(wire.pack(("stop",)))
            try:
                await asyncio.wait_for(asyncio.shield(worker.exited), STOP_GRACE_S)
            except asyncio.TimeoutError:
                log.warning("worker %s did not stop within %.0fs; killing it", worker.name, STOP_GRACE_S)
                worker.proc.kill()
                await worker.exited

    # -- requests ----------------------------------------------------------------------------------

    def submit(self, task_info: Any) -> asyncio.Future:
        """Queue one request; the future resolves to ``(status, JSON bytes or error message)``.

        Raises :class:`~easyserve.errors.Overloaded` when the queue is full and
        :class:`~easyserve.errors.NotReady` while stopping or when no worker can run it.
        """
        if self.stopping:
            raise NotReady("server is shutting down")
        if not any(w.state != "failed" for w in self.workers):
            raise NotReady(f"no worker can run requests: {self.workers[0].error}")
        now = self._loop.time()
        pending = Pending(
            f"{self._prefix}-{next(self._ids)}", task_info, self._loop.create_future(), now, now + self.config.timeout_s
        )
        self.queue.put(pending)
        pending.timer = self._loop.call_at(pending.deadline, self._expire, pending)
        self.stats.requests += 1
        self._pump()
        return pending.future

    def _pump(self) -> None:
        if self._pump_timer is not None:
            self._pump_timer.cancel()
            self._pump_timer = None
        while self._idle:
            others_busy = any(w.state == "busy" for w in self.workers)
            batch = self.queue.take(self._loop.time(), others_busy)
            if batch is None:
                break
            if isinstance(batch, float):
                self._pump_timer = self._loop.call_at(batch, self._pump)
                break
            self._run(self._idle.popleft(), batch)
        if self.stopping and not self._busy_or_queued():
            self._drained.set()

    def _run(self, worker: Worker, batch: list[Pending]) -> None:
        now = self._loop.time()
        for pending in batch:
            pending.attempts += 1
            pending.started = now
            self.stats.queue_wait_s += now - pending.arrived
        worker.state = "busy"
        worker.batch = batch
        worker.batch_id = next(self._ids)
        worker.transport.writelines(wire.pack(("run", worker.batch_id, [(p.task_id, p.task_info) for p in batch])))
        # A batch still running when its last request's deadline passes is stuck: its requests have
        # had their 504s, so the worker is killed and replaced.
        worker.batch_timer = self._loop.call_at(
            max(p.deadline for p in batch) + 0.05, self._kill_stuck, worker, worker.batch_id
        )
        self.stats.record_batch(len(batch))

    def _expire(self, pending: Pending) -> None:
        if pending.future.done():
            return
        now = self._loop.time()
        if pending.started is None:
            self.queue.remove(pending)
            where = f"it waited {now - pending.arrived:.2f}s in the queue"
        else:
            where = (f"it waited {pending.started - pending.arrived:.2f}s in the queue and ran "
                     f"{now - pending.started:.2f}s")
        pending.finish(504, f"no answer within TimeoutS={self.config.timeout_s:g}s: {where}")
        self.stats.timeouts += 1

    def _kill_stuck(self, worker: Worker, batch_id: int) -> None:
        if worker.batch_id == batch_id and worker.state == "busy" and worker.proc is not None:
            worker.kill_reason = f"its batch ran past TimeoutS={self.config.timeout_s:g}s"
            log.warning("worker %s (pid %s) is stuck: %s; killing it", worker.name, worker.proc.pid, worker.kill_reason)
            worker.proc.kill()

    # -- worker processes --------------------------------------------------------------------------

    async def _spawn(self, worker: Worker) -> None:
        spec = worker.spec
        ours, theirs = socket.socketpair()
        life_read, life_write = os.pipe()
        env = dict(os.environ)
        env["CUDA_VISIBLE_DEVICES"] = spec.visible  # empty hides every GPU from a CPU worker
        env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env.setdefault(var, str(spec.threads))
        try:
            worker.proc = subprocess.Popen(
                [sys.executable, "-m", "easyserve.worker", str(theirs.fileno()), str(life_read)],
                pass_fds=(theirs.fileno(), life_read), env=env,
            )
        finally:
            theirs.close()
            os.close(life_read)
        worker.lifeline = life_write
        worker.state = "starting"
        worker.kill_reason = None
        worker.info = {"pid": worker.proc.pid}
        worker.ready = self._loop.create_future()
        worker.exited = self._loop.create_future()
        transport, _ = await self._loop.connect_accepted_socket(lambda: _WorkerProtocol(self, worker), ours)
        worker.transport = transport
        try:
            worker.pidfd = os.pidfd_open(worker.proc.pid)
            self._loop.add_reader(worker.pidfd, self._on_exit, worker)
        except (AttributeError, OSError):  # no pidfd (not Linux): the end of the socket stream tells
            worker.pidfd = None
        init = {
            "sys_path": [os.getcwd(), *(p for p in sys.path if p)],
            "handle": self.handle,
            "handle_args": dict(self.config.handle_args),
            "device": {"kind": "cpu" if spec.gpu is None else "cuda", "gpu": spec.gpu,
                       "threads": spec.threads, "name": spec.name},
        }
        transport.writelines(wire.pack(init))

    def _on_message(self, worker: Worker, message: tuple) -> None:
        kind = message[0]
        if kind == "done":
            _, batch_id, results, run_s = message
            if batch_id != worker.batch_id:
                return
            if worker.batch_timer is not None:
                worker.batch_timer.cancel()
            for pending, (status, payload) in zip(worker.batch, results):
                pending.finish(status, payload)
            self.stats.run_s += run_s
            worker.batch = []
            worker.start_failures = 0
            self._make_idle(worker)
        elif kind == "ready":
            worker.info = message[1]
            worker.error = None
            if not worker.ready.done():
                worker.ready.set_result(None)  # None: no error
            log.info("worker %s ready: %s", worker.name, _summary(worker.info))
            self._make_idle(worker)
        elif kind == "failed":
            worker.error = message[1].rstrip()
            if not worker.ready.done():
                worker.ready.set_result(worker.error)

    def _make_idle(self, worker: Worker) -> None:
        if worker.state in ("starting", "busy"):
            worker.state = "idle"
            self._idle.append(worker)
        self._pump()

    def _on_exit(self, worker: Worker) -> None:
        """The worker's process ended (pidfd) or its stream closed; called once or twice, acts once."""
        if worker.exited is None or worker.exited.done() or worker.reaping:
            return
        worker.reaping = True
        self._loop.create_task(self._reap(worker))

    async def _reap(self, worker: Worker) -> None:
        proc = worker.proc
        code = await self._loop.run_in_executor(None, _wait_or_kill, proc)
        worker.reaping = False
        if worker.pidfd is not None:
            self._loop.remove_reader(worker.pidfd)
            os.close(worker.pidfd)
            worker.pidfd = None
        if worker.transport is not None:
            worker.transport.close()
        if worker.lifeline is not None:
            os.close(worker.lifeline)
            worker.lifeline = None
        if worker.batch_timer is not None:
            worker.batch_timer.cancel()
        if worker in self._idle:
            self._idle.remove(worker)
        was = worker.state
        cause = worker.kill_reason or _exit_cause(code)
        batch, worker.batch = worker.batch, []
        worker.exited.set_result(code)
        if was == "stopping" or (self.stopping and was != "busy"):
            worker.state = "dead"
            return
        if was == "starting":
            worker.start_failures += 1
            worker.error = worker.error or f"worker {cause} before it was ready"
            if not worker.ready.done():
                worker.ready.set_result(worker.error)
        else:
            worker.error = f"worker {worker.name} (pid {proc.pid}) {cause}"
            log.error("%s%s", worker.error, f" while running a batch of {len(batch)}" if batch else "")
        self._retry_or_fail(batch, f"worker {cause} while running this request")
        worker.state = "dead"
        if self.stopping:
            return
        if worker.start_failures >= MAX_START_FAILURES:
            worker.state = "failed"
            log.error("worker %s failed to start %d times in a row; giving up on it:\n%s",
                      worker.name, worker.start_failures, worker.error)
            self._fail_queue_if_hopeless()
            return
        delay = 0.0 if worker.start_failures == 0 else min(30.0, 0.5 * 2 ** (worker.start_failures - 1))
        worker.restarts += 1
        self._loop.call_later(delay, self._respawn, worker)

    def _respawn(self, worker: Worker) -> None:
        if not self.stopping and worker.state == "dead":
            log.info("restarting worker %s (restart %d)", worker.name, worker.restarts)
            self._loop.create_task(self._spawn(worker))

    def _retry_or_fail(self, batch: list[Pending], cause: str) -> None:
        retry = []
        for pending in batch:
            if pending.future.done():
                continue
            if pending.attempts >= 2:
                pending.finish(500, f"{cause}; it had already been retried once after its first worker died")
            else:
                pending.solo = True
                retry.append(pending)
        if retry:
            self.queue.put_front(retry)
            self._pump()

    def _fail_queue_if_hopeless(self) -> None:
        if any(w.state != "failed" for w in self.workers):
            return
        for pending in self.queue.clear():
            pending.finish(503, f"no worker can run requests: {self.workers[0].error}")

    def _busy_or_queued(self) -> bool:
        return bool(self.queue) or any(w.state == "busy" for w in self.workers)

    # -- reporting ---------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return not self.stopping and all(w.state in ("idle", "busy") for w in self.workers)

    def describe(self) -> list[dict[str, Any]]:
        return [w.describe() for w in self.workers]


@dataclasses.dataclass
class Stats:
    """Counters behind ``/stats``."""

    requests: int = 0
    batches: int = 0
    timeouts: int = 0
    queue_wait_s: float = 0.0
    run_s: float = 0.0
    batch_sizes: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def record_batch(self, size: int) -> None:
        self.batches += 1
        self.batch_sizes[size] += 1


class _WorkerProtocol(asyncio.Protocol):
    def __init__(self, pool: WorkerPool, worker: Worker) -> None:
        self.pool = pool
        self.worker = worker
        self.reader = wire.FrameReader()

    def data_received(self, data: bytes) -> None:
        for message in list(self.reader.feed(data)):
            self.pool._on_message(self.worker, message)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.worker.transport is not None and self.worker.transport.get_protocol() is self:
            self.pool._on_exit(self.worker)


def _wait_or_kill(proc: subprocess.Popen, grace: float = 2.0) -> int:
    try:
        return proc.wait(grace)
    except subprocess.TimeoutExpired:  # closed its socket but lives on: not a worker we can use
        proc.kill()
        return proc.wait()


def _exit_cause(code: int) -> str:
    if code < 0:
        try:
            return f"died with signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"died with signal {-code}"
    return f"exited with code {code}"


def _summary(info: dict) -> str:
    parts = [f"pid {info.get('pid')}", info.get("device", "?")]
    if info.get("cuda_visible_devices"):
        parts.append(f"CUDA_VISIBLE_DEVICES={info['cuda_visible_devices']}")
    if info.get("onnx_providers"):
        parts.append("onnxruntime " + "+".join(info["onnx_providers"]))
    parts.append(f"{info.get('threads')} CPU thread(s)")
    return ", ".join(parts)
