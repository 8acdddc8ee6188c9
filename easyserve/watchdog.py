"""The watchdog: no request is lost or left hanging, whatever a worker does.

It runs on the server's event loop, beside the pool, rather than in a thread of its own: a worker's
exit reaches the loop as an event the moment it happens (its pidfd becomes readable, its socket
reaches end of stream), so there is nothing to poll, and no lock between a watcher and the pool.

- a request past its deadline (``TimeoutS``, queue wait plus run time; not the time this loop was held while
  it was queued) is answered 504;
- a batch that has itself run for ``TimeoutS`` means a stuck worker: it is killed (its requests have
  had their 504 by then; a request that spent its time in the queue says nothing of the worker). A
  process's first batch may be given longer (``FirstBatchTimeoutS``: a model that compiles on its first
  call);
- a worker that dies is restarted at once; one that keeps dying before it answers a single batch,
  or cannot start, is restarted after a growing delay;
- a worker whose setup runs past ``StartTimeoutS`` is killed; that counts as a failure to start;
- the requests of the batch it held are retried once, each alone (so one poisonous request cannot
  take the others down again); one that kills a second worker fails with 500 and the cause;
- a worker that cannot start is never given up on: a passing fault (a model store briefly
  unreachable, the open-file limit reached) must not become a permanent outage. It is retried with
  a delay that doubles up to ``MAX_BACKOFF_S``; after ``FAILING_AFTER`` failures in a row it counts as
  ``failed``, and while every worker is failed, requests get 503 with ``Retry-After`` at once and
  ``/ready`` says why.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import subprocess
import time
from typing import TYPE_CHECKING, Any, Callable

from .batching import Pending
from .children import (STACKS_SIGNAL, cut_lifeline, end_group, is_stopped, kill_with_descendants, process_cpu_s,
                       read_stacks, reap_orphaned_reapers)
from .errors import DIED_TWICE, Timeout, WorkerDied, shortened
from .pipeline import NAMED_MOST, named_ids
from .runtime import RECHECK_S, HoldMeter, held_for
from .wire import EXIT_MEMORY_ERROR

if TYPE_CHECKING:
    from .pool import WorkerPool
    from .slots import Worker

log = logging.getLogger("easyserve")

__all__ = ["Watchdog"]

FAILING_AFTER = 3  # failures to start in a row after which a worker counts as failed (still retried)
MAX_BACKOFF_S = 10.0  # the longest wait between restarts: how soon the server recovers once the fault passes
EXIT_GRACE_S = 2.0  # how long a worker whose socket closed may take to exit before it is killed
REAP_AFTER_S = 0.5  # after a worker is reaped, when its reaper (dying with it) is looked for among our zombies
# where a stack is while torch.compile compiles, whatever its backend (inductor's files are on the stack
# of a compiled model running too)
COMPILING = ("/torch/_dynamo/convert_frame.py",)
STACKS_WAIT_S = 0.3  # how long a stuck worker is given to write its threads' stacks before it is killed
# how a process that crashed ends: native code's fault, or CPython's abort() after a fatal error
CRASHES = {-signal.SIGSEGV, -signal.SIGABRT, -signal.SIGBUS, -signal.SIGFPE, -signal.SIGILL}
TIMEOUTS_TOLD_EVERY_S = 1.0  # a 504 is logged at once, those after it together, this often at most


class Watchdog:
    """Deadlines, deaths and restarts for one :class:`~easyserve.pool.WorkerPool`."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self._timeouts_told = -math.inf  # when a 504 was last logged
        self._untold: list[str] = []  # ids of the 504s since, the first NAMED_MOST of them...
        self._untold_count = 0  # ...and how many
        self._tell_timer: asyncio.TimerHandle | None = None
        self.holds = HoldMeter(self.loop)  # how long this loop was held: a worker's limits get it back

    # -- requests ----------------------------------------------------------------------------------

    def track(self, pending: Pending) -> None:
        """Answer 504 if ``pending`` is still unanswered at its deadline."""
        pending.timer = self.loop.call_at(pending.deadline, self._expire, pending)

    def _expire(self, pending: Pending, again: bool = False) -> None:
        if pending.future.done():
            return
        now = self.loop.time()
        if self._queue_held(pending, now):
            return
        if not again and self._put_off(pending.deadline, self._expire, pending, True):
            return
        if pending.started is None:
            self.pool.left_queue(pending)
            where = f"it waited {now - pending.arrived:.2f}s in the queue"
        else:
            where = (f"it waited {pending.started - pending.arrived:.2f}s in the queue and ran "
                     f"{now - pending.started:.2f}s")
        pending.fail(Timeout(f"no answer within TimeoutS={self.pool.config.timeout_s:g}s: {where}"))
        self.pool.stats.timeouts += 1
        self._tell_timeout(pending.request_id, where)
        self.pool.check_drained()

    def _queue_held(self, pending: Pending, now: float) -> bool:
        """Whether ``pending``'s deadline has moved on, past ``now``, by the time this loop was held (the server
        process stopped, a paused machine) while it waited in the queue: that wait is the server's, which did
        nothing meanwhile, not the request's, and it is given its ``TimeoutS`` of a running server. Looked at
        once after a read only (``_put_off``), the requests queued in a 20 s pause got 504 as it ended, with
        the workers idle. Its time running is its client's, as before (a worker may have run on)."""
        queued_until = pending.started if pending.started is not None else now
        deadline = pending.arrived + self.pool.config.timeout_s + self.holds.between(pending.arrived, queued_until)
        if deadline <= max(now, pending.deadline):  # no hold since it was last looked at, or its time is up even so
            return False
        pending.deadline = deadline  # the queue hands out no request past its deadline (BatchQueue.take)
        pending.timer = self.loop.call_at(deadline, self._expire, pending)
        self.pool.pump()  # passed over as it was past its old deadline, with a worker idle
        return True

    def _tell_timeout(self, request_id: str, where: str) -> None:
        """Log a 504 by its request's id: a client's report of one found nothing in the log, at any
        level. Under overload, one line a second (``TIMEOUTS_TOLD_EVERY_S``) names those since the last."""
        if self._tell_timer is None and self.loop.time() - self._timeouts_told >= TIMEOUTS_TOLD_EVERY_S:
            self._timeouts_told = self.loop.time()
            log.warning("request %s answered 504: no answer within TimeoutS=%gs: %s", request_id,
                        self.pool.config.timeout_s, where)
            return
        self._untold_count += 1
        if len(self._untold) < NAMED_MOST:
            self._untold.append(request_id)
        if self._tell_timer is None:
            self._tell_timer = self.loop.call_at(self._timeouts_told + TIMEOUTS_TOLD_EVERY_S, self.tell_timeouts)

    def tell_timeouts(self) -> None:
        """Log the 504s not logged yet (see :meth:`_tell_timeout`), if any."""
        if self._tell_timer is not None:
            self._tell_timer.cancel()
            self._tell_timer = None
        if not self._untold_count:
            return
        ids, count = self._untold, self._untold_count
        self._untold, self._untold_count = [], 0
        self._timeouts_told = self.loop.time()
        more = f" and {count - len(ids)} more" if count > len(ids) else ""
        log.warning("%s%s answered 504: no answer within TimeoutS=%gs", named_ids(ids), more,
                    self.pool.config.timeout_s)

    def batch_started(self, worker: Worker, batch_id: int) -> asyncio.TimerHandle:
        """The timer that kills ``worker`` if batch ``batch_id``, which it starts now, runs for ``TimeoutS``.

        Every request of the batch arrived before it started, so each has had its 504 by then. The
        requests' own deadlines would count their wait in the queue: under overload a batch of
        requests that had waited almost ``TimeoutS`` ran past them in a healthy worker, which was
        killed, and its model loaded again, while the queue grew. A batch handed to a worker ahead
        of the one it runs (Pipeline) starts when that one is answered, and is timed from then.

        A process's first batch (until one has answered a request: a batch refused whole in
        ``preprocess`` ran no model) may run for ``FirstBatchTimeoutS`` where that is longer: a model
        compiled on its first call (torch.compile, a TensorRT engine, cuDNN's autotuning) for longer
        than ``TimeoutS`` was killed as stuck, and compiled again in the next process, for ever. Its
        requests still get their 504 at ``TimeoutS``; the log says why, once a process. (Not given by
        default: a request that hangs a fresh worker would hold it that long.)"""
        config = self.pool.config
        limit = self._batch_limit(worker)
        if limit > config.timeout_s:
            self.loop.call_at(self.loop.time() + config.timeout_s + 0.05, self._warming_up, worker, batch_id)
        due = self.loop.time() + limit + 0.05
        return self.loop.call_at(due, self._kill_stuck, worker, batch_id, due, self.holds.now())

    def _batch_limit(self, worker: Worker) -> float:
        """How long ``worker``'s batch may run: ``TimeoutS``, or until it has answered a request with
        success, the first batch's limit (see :meth:`batch_started`)."""
        config = self.pool.config
        return config.timeout_s if worker.warm else config.first_batch_limit_s

    def _put_off(self, due: float, *again: Any) -> bool:
        """Whether a timer due at ``due`` ran late and has put itself off: this loop was held (the server
        process stopped, a paused container) past it, and an answer that came meanwhile waits unread (a
        loop runs its due timers before it reads): a worker that had answered was killed as stuck, its
        client answered 504. ``again`` (a function and its arguments) looks once more, after a read."""
        if not (held_for(self.loop, due) or self.holds.recently()):  # a hold that ended just past it, too
            return False
        self.loop.call_later(RECHECK_S, *again)
        return True

    def _given_back(self, due: float, mark: float, *again: Any) -> asyncio.TimerHandle | None:
        """For a worker's own time limit (a batch's, a setup's), due at ``due`` and begun when the loop had
        been held ``mark`` seconds in all (:class:`~easyserve.runtime.HoldMeter`): if the loop was held since,
        the worker may have been held as long (a paused machine or container stops every process of the
        server), its work waiting as this loop did. The limit is lengthened by that time, and ``again`` (a
        function and its arguments, then the new due time and mark) runs then: the timer that replaces this
        one. Looked at once more after a read only, a batch of 2.8 s that had run 1 s of it before a 20 s
        pause was killed as stuck, and every busy worker's model loaded again; a worker whose "ready" came in
        the pause was killed as out of time for its setup. A timer late with no hold counted looks once more
        after a read. ``None``: the limit has run out."""
        held = self.holds.now() - mark
        if held <= 0 and not held_for(self.loop, due):
            return None
        then = max(due + held, self.loop.time() + RECHECK_S)
        return self.loop.call_at(then, *again, then, self.holds.total)

    def _warming_up(self, worker: Worker, batch_id: int) -> None:
        if batch_id == worker.batch_id and worker.state == "busy" and worker.proc is not None:
            config = self.pool.config
            log.warning("worker %s (pid %s): its first batch has run past TimeoutS=%gs, and may run until "
                        "FirstBatchTimeoutS=%gs; its requests get 504 meanwhile (warming the model up in setup(), "
                        "with a batch of the sizes that matter, spares them)", worker.name, worker.proc.pid,
                        config.timeout_s, config.first_batch_timeout_s)

    def _kill_stuck(self, worker: Worker, batch_id: int, due: float, mark: float) -> None:
        later = self._given_back(due, mark, self._kill_stuck, worker, batch_id)
        if later is not None:
            if batch_id == worker.batch_id:  # cancelled with the batch's answer, as the one it replaces
                worker.batch_timer = later
            return
        # not one being reaped: killed already, or gone (it was called stuck, its cause overwritten)
        if batch_id == worker.batch_id and worker.state == "busy" and worker.proc is not None and not worker.reaping:
            config = self.pool.config
            limit = self._batch_limit(worker)
            key = "FirstBatchTimeoutS" if limit > config.timeout_s else "TimeoutS"
            if worker.warm:
                worker.kill_reason = f"was killed: its batch ran past TimeoutS={config.timeout_s:g}s"
            elif worker.served:  # its batches so far all failed: not its first, and compiling is not the likely cause
                worker.kill_reason = (f"was killed: its batch ran past {key}={limit:g}s, after {worker.served} "
                                      "batch(es) that answered no request with success")
            elif worker.batches and len(worker.batch) > 1:
                # its slot's earlier processes answered in time, running its handle (a reload's new one's count
                # begins at 0): under a queue that built up while it restarted,
                # a batch larger than theirs is as likely a cause as a warm-up, which the hint alone named
                worker.kill_reason = (f"was killed: its first batch, of {len(worker.batch)} requests, ran past "
                                      f"{key}={limit:g}s (a batch that large may take longer than that: a smaller "
                                      "MaxBatchSize, or a longer TimeoutS; or a model that warms up on its first "
                                      "call, which each new process does again: do that in setup(), or set "
                                      "FirstBatchTimeoutS)")
            else:  # a model compiled on its first call is compiled again in the next process, for ever
                worker.kill_reason = (f"was killed: its first batch ran past {key}={limit:g}s (a model that compiles "
                                      "or warms up on its first call: do that in setup(), or set FirstBatchTimeoutS)")
            if worker.output is not None:  # what it wrote as it ran, logged before it is called stuck
                worker.output.take_in()
            name, pid = worker.name, worker.proc.pid
            # a process stopped (SIGSTOP, a debugger) reads as stuck: said, as letting it go on may end its batch
            stopped = is_stopped(pid)
            log.warning("worker %s (pid %s) is %s", name, pid,
                        "stopped (SIGSTOP, or a debugger), past its batch's time: let go on to write where it was, "
                        "then killed if its batch goes on" if stopped else "stuck; killing it")
            self._kill_after_stacks(
                worker, worker.proc, lambda: batch_id == worker.batch_id and worker.state == "busy",
                lambda stacks: log.error("worker %s (pid %s) was stuck here (its threads, most recent call first, "
                                         "as it was killed)%s:\n%s", name, pid, _compiling(stacks), stacks),
                stopped)

    def _kill_after_stacks(self, worker: Worker, proc: subprocess.Popen, still: Callable[[], bool],
                           told: Callable[[str], None], stopped: bool = False) -> None:
        """Kill ``proc``, ``worker``'s process, stuck: first it is told to write where its threads are (to
        its stacks file: see :func:`~easyserve.children.stacks_file`), and ``STACKS_WAIT_S`` later that goes
        to ``told``, and it is killed, if ``still()`` says it is stuck yet. Killed at once, its log said
        only that it was stuck: of a deadlock, or a call waiting on the network, not where."""
        fd = worker.stacks
        if fd is not None and proc.poll() is None:
            try:  # emptied first: a dump the process lived past (or a handle's own handler of the signal)
                os.ftruncate(fd, 0)  # read as this one's showed another place
                os.lseek(fd, 0, os.SEEK_SET)  # the offset the process writes at too: one open file
                os.kill(proc.pid, signal.SIGCONT)  # one stopped (SIGSTOP) holds the next signal unhandled
                os.kill(proc.pid, STACKS_SIGNAL)
            except OSError:  # gone (ProcessLookupError), or the file refused
                pass
            else:
                self.loop.call_later(STACKS_WAIT_S, self._kill_now, worker, proc, still, told, stopped)
                return
        kill_with_descendants(proc, self.loop)

    def _kill_now(self, worker: Worker, proc: subprocess.Popen, still: Callable[[], bool],
                  told: Callable[[str], None], stopped: bool = False) -> None:
        if worker.proc is not proc or worker.reaping:  # it ended meanwhile
            return
        if not still():  # it finished in that moment: replaced between batches, as the signal may have cut a
            worker.kill_reason = None  # native call's wait short, and the library it was in is not trusted on
            reason = ("it had been stopped (SIGSTOP, or a debugger) past its batch's time, and finished once let go "
                      "on" if stopped else "it finished as it was to be killed as stuck, told to write where its "
                      "threads were")
            if worker.state == "idle":
                self.pool._retire(worker, reason, "stuck")
            elif worker.state == "busy" and worker.retire_reason is None:
                worker.retire_reason, worker.retire_kind = reason, "stuck"
            return
        stacks = read_stacks(worker.stacks) if worker.stacks is not None else ""
        told(stacks or f"(it wrote none within {STACKS_WAIT_S:g} s: held by a debugger, or its handle takes "
                       f"{signal.Signals(STACKS_SIGNAL).name} for its own)")
        kill_with_descendants(proc, self.loop)

    # -- worker processes --------------------------------------------------------------------------

    def watch(self, worker: Worker) -> None:
        """Learn of the worker process's exit the moment it happens."""
        try:
            worker.pidfd = os.pidfd_open(worker.proc.pid)
            self.loop.add_reader(worker.pidfd, self.exited, worker)
        except (AttributeError, OSError):  # no pidfd (not Linux): the socket's end of stream tells
            worker.pidfd = None

    def setup_began(self, worker: Worker) -> None:
        """Bound the time the worker's setup takes: from when its process was sent the handle (with
        ``StartsPerGPU``, it may have waited for its turn since it started)."""
        due = self.loop.time() + self.pool.config.start_timeout_s
        worker.start_timer = self.loop.call_at(due, self._start_timed_out, worker, worker.proc, due, self.holds.now())

    def _start_timed_out(self, worker: Worker, proc: subprocess.Popen, due: float, mark: float) -> None:
        later = self._given_back(due, mark, self._start_timed_out, worker, proc)
        if later is not None:
            if worker.proc is proc:
                worker.start_timer = later
            return
        if worker.proc is proc and worker.state == "starting":
            limit = self.pool.config.start_timeout_s
            worker.kill_reason = f"was killed: its handle's setup ran past StartTimeoutS={limit:g}s"
            worker.trace = f"worker {worker.name} did not finish its handle's setup within StartTimeoutS={limit:g}s"
            log.warning("%s; killing it", worker.trace)
            self._kill_after_stacks(worker, proc, lambda: worker.proc is proc and worker.state == "starting",
                                    lambda stacks: setattr(worker, "stuck_at", stacks))

    def exited(self, worker: Worker) -> None:
        """The worker's process ended (pidfd) or its stream closed; either may come first, or both."""
        if worker.exited is None or worker.exited.done() or worker.reaping:
            return
        worker.reaping = True
        self.pool.forget_idle(worker)  # no batch for it while it is reaped (EXIT_GRACE_S at most)
        self._unwatch(worker)
        self._collect(worker, worker.exited, self.loop.time() + EXIT_GRACE_S)

    def _collect(self, worker: Worker, exited: asyncio.Future, deadline: float) -> None:
        # No executor thread: this also runs while the interpreter exits, when none can start.
        cpu_s = process_cpu_s(worker.proc.pid)  # before it is reaped: what it spent after its last batch counts
        code = worker.proc.poll()
        if code is None:  # its stream closed a moment before it exits; or it lives on
            if self.loop.time() >= deadline:  # closed its socket but lives on: not a worker we can use
                log.warning("worker %s (pid %d) closed its connection to the server and had not exited %gs later: "
                            "killing it", worker.name, worker.proc.pid, EXIT_GRACE_S)
                worker.kill_reason = worker.kill_reason or (f"was killed: it closed its connection to the server "
                                                            f"and had not exited {EXIT_GRACE_S:g}s later")
                kill_with_descendants(worker.proc, self.loop)
                # Killed, it may still take a while to be reaped (a GPU driver releasing its memory, a
                # debugger holding it): looked at again, never waited for on the loop every request needs.
                deadline = math.inf
            self.loop.call_later(0.01 if deadline < math.inf else 0.1, self._collect, worker, exited, deadline)
            return
        if cpu_s is not None:
            worker.cpu_mark = self.pool.stats.count_cpu("workers", worker.cpu_mark, cpu_s)
        worker.left_behind = end_group(worker.proc.pid, self.loop)  # what its handle started, left in its session
        self.loop.call_later(REAP_AFTER_S, reap_orphaned_reapers)  # its reaper, dying with it, if given to us
        worker.reaping = False
        try:
            self._after_death(worker, code)
        finally:
            if not exited.done():
                exited.set_result(code)

    def _after_death(self, worker: Worker, code: int) -> None:
        pool = self.pool
        if worker.output is not None:  # its last words, logged before its death is
            worker.output.died(crashed=code in CRASHES)
        self._release(worker)
        cause = worker.kill_reason or exit_cause(code)
        was = worker.state
        # the batch it ran and the one handed to it ahead: both are retried
        ran, ahead = worker.batch, worker.next_batch
        batch, worker.batch, worker.next_batch, worker.next_id = ran + ahead, [], [], 0
        worker.state = "dead"
        if was == "stopping":  # told to: a stopped server's dashboard showed every worker "dead", in red
            worker.state = "stopped"
            return
        if was == "retiring" and not worker.leaving:  # replaced on purpose, between batches: back at once,
            # not counted as a restart
            worker.recycled += 1
            worker.error = None
            self.schedule_restart(worker, count=False)
            pool.check_drained()
            return
        if was == "starting":
            worker.recycling = False  # a successor that cannot start is a failure like any other
            worker.start_failures += 1
            if worker.trace:
                worker.error = exception_line(worker.trace)
            else:
                worker.error = f"worker {worker.name} {cause} before it was ready"
            if not worker.ready.done():
                worker.ready.set_result(worker.error)
        elif was != "retiring":
            worker.error = f"worker {worker.name} (pid {worker.proc.pid}) {cause}"
            # with Pipeline, the batch handed ahead apart: "a batch of 7" under MaxBatchSize 4 read as a bound ignored
            log.error("%s%s%s", worker.error, f" while running a batch of {len(ran)} "
                      f"({named_ids([pending.request_id for pending in ran])})" if ran else "",
                      f"{',' if ran else ''} with a batch of {len(ahead)} handed to it ahead "
                      f"({named_ids([pending.request_id for pending in ahead])})" if ahead else "")
            # Back off only for processes that die on their own before answering anything (a handle
            # that crash-loops); a death in the middle of a batch is the batch's doing (it is retried
            # alone), and must not slow every other request's recovery.
            worker.barren_deaths = worker.barren_deaths + 1 if worker.served == 0 and not batch else 0
            if worker.kill_reason is None and pool.ran_a_new_handle(worker):
                # first, before a rollback makes it the pool's handle no more: the new handle's death, not its
                # requests', which run again (on the old handle, once rolled back) and are charged no try: the
                # first request of a reload to a handle that crashed on every batch was answered 500
                for pending in batch:
                    pending.attempts -= 1
            # died of itself, its model never having run a batch it lived through (a batch refused
            # before the model ran is none): a reload's handle may be at fault
            if ran and worker.kill_reason is None:  # first: a death that rolls a reload back is the handle's
                pool.died_running(worker, ran)
            if not worker.ran_model and worker.kill_reason is None:
                pool.died_on_probation(worker)
        self._retry_or_fail(batch, f"worker {cause} while running this request")
        if worker.leaving or worker.candidate:  # replaced by a reload, or a reload's worker that failed
            pool.remove(worker)
        else:
            self.schedule_restart(worker)
        pool.check_drained()

    def schedule_restart(self, worker: Worker, count: bool = True) -> None:
        if self.pool.closing:
            return
        if worker.start_failures:
            delay = 0.5 * 2 ** (worker.start_failures - 1)
        elif worker.barren_deaths > 1:  # it keeps dying before it answers anything: no tight reload loop
            delay = 0.5 * 2 ** (worker.barren_deaths - 2)
        else:
            delay = 0.0
        delay = min(delay, MAX_BACKOFF_S)
        worker.retry_at = self.loop.time() + delay
        if self.pool.ends_start(worker):  # start() raises this worker's error, and retries nothing
            return
        if worker.start_failures:
            self._report_start_failure(worker, delay)
        elif delay:
            log.warning("worker %s keeps dying before it answers anything; restarting it in %.1fs", worker.name, delay)
        worker.restarts += count
        self.pool.stats.restarts += count  # a running total: a reload's replaced workers take theirs away
        self.loop.call_later(delay, self._restart, worker)
        if worker.start_failures >= FAILING_AFTER:
            worker.state = "failed"
            self._fail_queue_if_hopeless()

    def _report_start_failure(self, worker: Worker, delay: float) -> None:
        # The whole traceback once; while the same fault lasts, one line at attempts 2, 4, 8, 16...: one
        # every attempt, every 10 s for as long as it lasted, landed in whichever notebook cell ran.
        trace = worker.trace or worker.error
        attempt = worker.start_failures
        if trace != worker.reported_trace:
            worker.reported_trace = trace
            log.error("worker %s could not start (attempt %d); retrying in %.1fs:\n%s",
                      worker.name, attempt, delay, trace)
            # in the worker's own log too (Server.logs(), the dashboard), once a fault: the log's line landed
            # in whichever notebook cell ran, and the worker's log held its prints, not what kept it down
            pid = worker.proc.pid if worker.proc is not None else 0
            said_why = f"could not start (attempt {attempt}):\n{trace}"
            worker.ring.records.append((time.time(), worker.name, pid, said_why))
        else:
            said = attempt & (attempt - 1) == 0  # a power of two
            log.log(logging.ERROR if said else logging.DEBUG, "worker %s still cannot start (attempt %d): %s; "
                    "retrying in %.1fs%s", worker.name, attempt, worker.error, delay,
                    f" (said again at attempt {2 * attempt})" if said else "")

    def _restart(self, worker: Worker) -> None:
        if not self.pool.closing and worker.state in ("dead", "failed") and worker in self.pool.workers:
            if worker.recycling:  # replaced on purpose: "replacing worker ..." said why
                log.debug("starting worker %s's replacement", worker.name)
            else:
                log.info("restarting worker %s (restart %d)", worker.name, worker.restarts)
            self.loop.create_task(self._spawn(worker))

    async def _spawn(self, worker: Worker) -> None:
        if self.pool.closing:  # stop() came in the turn since _restart: it stopped the workers without this one
            return
        try:
            await self.pool.spawn(worker)
        except Exception as exc:  # no process could be started (out of file descriptors, memory...)
            worker.state = "dead"
            worker.start_failures += 1
            worker.error = f"could not start a process for worker {worker.name}: {type(exc).__name__}: {exc}"
            worker.trace = None
            self.schedule_restart(worker)

    def _unwatch(self, worker: Worker) -> None:
        if worker.pidfd is not None:
            self.loop.remove_reader(worker.pidfd)
            os.close(worker.pidfd)
            worker.pidfd = None

    def _release(self, worker: Worker) -> None:
        self._unwatch(worker)
        if worker.transport is not None:
            worker.transport.close()
        if worker.lifeline is not None:
            cut_lifeline(worker.lifeline)
            worker.lifeline = None
        for timer in (worker.batch_timer, worker.start_timer):
            if timer is not None:
                timer.cancel()
        self.pool.forget_idle(worker)
        self.pool.set_up_ended(worker)

    def _retry_or_fail(self, batch: list[Pending], cause: str) -> None:
        retry = []
        for pending in batch:
            if pending.future.done():
                continue
            if self.pool.failing:  # run again here, it would end another worker: elsewhere, it may be answered
                pending.fail(self.pool.failing_error(cause))
            elif pending.attempts >= 2:  # run alone, it ended a worker again: the request's doing, it seems
                log.error("request %s failed: its worker died under it twice (answered 500)", pending.request_id)
                pending.fail(WorkerDied(f"{cause}; {DIED_TWICE}"))
            else:
                pending.solo = True
                pending.started = None  # back in the queue: its deadline must take it out of there
                retry.append(pending)
        if retry:
            self.pool.queue.put_front(retry)
            self.pool.pump()

    def _fail_queue_if_hopeless(self) -> None:
        unusable = self.pool.unusable()
        if unusable is not None:
            for pending in self.pool.queue.clear():
                pending.fail(unusable)


def exception_line(trace: str) -> str:
    """The last line of a traceback: the exception and its message, without file paths or locals, cut
    short (``/ready`` and every 503 carry it)."""
    lines = [line for line in trace.strip().splitlines() if line.strip()]
    return shortened(lines[-1].strip() if lines else trace)


def exit_cause(code: int) -> str:
    """How a child process ended, from its exit status (``Popen.returncode``), in words."""
    if code == EXIT_MEMORY_ERROR:
        return "ran out of memory (its handle raised MemoryError)"
    if code == -signal.SIGKILL:  # not the server's (its kills say why): the kernel's, for memory, as often as not
        return ("died with signal 9 (SIGKILL, not sent by the server: most often the kernel's out-of-memory "
                "killer, see `dmesg`)")
    if code < 0:
        try:
            return f"died with signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"died with signal {-code}"
    return f"exited with code {code}"


def _compiling(stacks: str) -> str:
    """What to do, where the stacks show torch.compile compiling: it compiles again for each new shape
    of its inputs, a batch's size among them, and a warm-up of one size leaves the others to requests."""
    if not any(place in stacks for place in COMPILING):
        return ""
    return (", compiling: torch.compile compiles again for each new input shape, a batch's size among them; warm "
            "it up in setup() as requests run it, self.forward(self.stack([item] * n)) for n = 1 and 2, after which "
            "it takes any size")
