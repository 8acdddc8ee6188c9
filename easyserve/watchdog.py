"""The watchdog: no request is lost or left hanging, whatever a worker does.

It runs on the server's event loop, beside the pool, rather than in a thread of its own: a worker's
exit reaches the loop as an event the moment it happens (its pidfd becomes readable, its socket
reaches end of stream), so there is nothing to poll, and no lock between a watcher and the pool.

- a request past its deadline (``TimeoutS``, queue wait plus run time) is answered 504;
- a batch still running past its last request's deadline means a stuck worker: it is killed;
- a worker that dies is restarted, at once the first time, then with a growing delay;
- the requests of the batch it held are retried once, each alone (so one poisonous request cannot
  take the others down again); one that kills a second worker fails with 500 and the cause;
- a worker that fails to start ``MAX_START_FAILURES`` times in a row is given up on, and ``/ready``
  says why.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
from typing import TYPE_CHECKING

from .batching import Pending
from .errors import NotReady, Timeout, WorkerDied

if TYPE_CHECKING:
    from .pool import Worker, WorkerPool

log = logging.getLogger("easyserve")

__all__ = ["Watchdog"]

MAX_START_FAILURES = 3
MAX_BACKOFF_S = 30.0


class Watchdog:
    """Deadlines, deaths and restarts for one :class:`~easyserve.pool.WorkerPool`."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.loop = asyncio.get_running_loop()

    # -- requests ----------------------------------------------------------------------------------

    def track(self, pending: Pending) -> None:
        """Answer 504 if ``pending`` is still unanswered at its deadline."""
        pending.timer = self.loop.call_at(pending.deadline, self._expire, pending)

    def _expire(self, pending: Pending) -> None:
        if pending.future.done():
            return
        now = self.loop.time()
        if pending.started is None:
            self.pool.queue.remove(pending)
            where = f"it waited {now - pending.arrived:.2f}s in the queue"
        else:
            where = (f"it waited {pending.started - pending.arrived:.2f}s in the queue and ran "
                     f"{now - pending.started:.2f}s")
        pending.fail(Timeout(f"no answer within TimeoutS={self.pool.config.timeout_s:g}s: {where}"))
        self.pool.stats.timeouts += 1

    def batch_started(self, worker: Worker) -> None:
        # Past its last request's deadline every request of the batch has had its 504, so a batch
        # still running then is stuck, and its worker is killed and replaced.
        deadline = max(p.deadline for p in worker.batch) + 0.05
        worker.batch_timer = self.loop.call_at(deadline, self._kill_stuck, worker, worker.batch_id)

    def _kill_stuck(self, worker: Worker, batch_id: int) -> None:
        if worker.batch_id == batch_id and worker.state == "busy" and worker.proc is not None:
            worker.kill_reason = f"was killed: its batch ran past TimeoutS={self.pool.config.timeout_s:g}s"
            log.warning("worker %s (pid %s) is stuck; killing it", worker.name, worker.proc.pid)
            worker.proc.kill()

    # -- worker processes --------------------------------------------------------------------------

    def watch(self, worker: Worker) -> None:
        """Learn of the worker process's exit the moment it happens."""
        try:
            worker.pidfd = os.pidfd_open(worker.proc.pid)
            self.loop.add_reader(worker.pidfd, self.exited, worker)
        except (AttributeError, OSError):  # no pidfd (not Linux): the socket's end of stream tells
            worker.pidfd = None

    def exited(self, worker: Worker) -> None:
        """The worker's process ended (pidfd) or its stream closed; either may come first, or both."""
        if worker.exited is None or worker.exited.done() or worker.reaping:
            return
        worker.reaping = True
        self.loop.create_task(self._reap(worker))

    async def _reap(self, worker: Worker) -> None:
        pool = self.pool
        proc = worker.proc
        code = await self.loop.run_in_executor(None, _wait_or_kill, proc)
        worker.reaping = False
        self._release(worker)
        cause = worker.kill_reason or _exit_cause(code)
        was = worker.state
        batch, worker.batch = worker.batch, []
        worker.state = "dead"
        worker.exited.set_result(code)
        if was == "stopping":
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
        if pool.stopping:
            return
        if worker.start_failures >= MAX_START_FAILURES:
            worker.state = "failed"
            log.error("worker %s failed to start %d times in a row; not restarting it. Last error:\n%s",
                      worker.name, worker.start_failures, worker.error)
            self._fail_queue_if_hopeless()
            return
        delay = 0.0 if worker.start_failures == 0 else min(MAX_BACKOFF_S, 0.5 * 2 ** (worker.start_failures - 1))
        worker.restarts += 1
        self.loop.call_later(delay, self._restart, worker)

    def _restart(self, worker: Worker) -> None:
        if not self.pool.stopping and worker.state == "dead":
            log.info("restarting worker %s (restart %d)", worker.name, worker.restarts)
            self.loop.create_task(self.pool.spawn(worker))

    def _release(self, worker: Worker) -> None:
        if worker.pidfd is not None:
            self.loop.remove_reader(worker.pidfd)
            os.close(worker.pidfd)
            worker.pidfd = None
        if worker.transport is not None:
            worker.transport.close()
        if worker.lifeline is not None:
            os.close(worker.lifeline)
            worker.lifeline = None
        if worker.batch_timer is not None:
            worker.batch_timer.cancel()
        self.pool.forget_idle(worker)

    def _retry_or_fail(self, batch: list[Pending], cause: str) -> None:
        retry = []
        for pending in batch:
            if pending.future.done():
                continue
            if pending.attempts >= 2:
                pending.fail(WorkerDied(f"{cause}; it had already been retried once after its first worker died"))
            else:
                pending.solo = True
                retry.append(pending)
        if retry:
            self.pool.queue.put_front(retry)
            self.pool.pump()

    def _fail_queue_if_hopeless(self) -> None:
        workers = self.pool.workers
        if any(w.state != "failed" for w in workers):
            return
        for pending in self.pool.queue.clear():
            pending.fail(NotReady(f"no worker can run requests: {workers[0].error}"))


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
