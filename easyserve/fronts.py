"""``HttpWorkers``: several HTTP front processes on one port, feeding the server process's one pool.

One process's event loop can parse only so many HTTP requests a second; on a many-core GPU machine
that, not the GPUs, can cap a server. With ``HttpWorkers: N`` above 1 the server process stops
serving HTTP itself and starts N front processes (:mod:`easyserve.front`) that bind its port with
``SO_REUSEPORT``: the kernel spreads connections over them, and each does the HTTP work for its own.
Every request they admit comes here over the front's socket pair and enters the one queue, so the
workers' capacity is shared as with one front: first come, first served, in the same batches,
whichever front a client reached. The queue, deadlines, retries, drains and counters stay in one
process, where they need no locks; what crosses is one small message each way per request, large
bodies out of band (:mod:`easyserve.wire`).

A front that dies is started again (its clients' connections are lost with it, as with a killed
server; nginx retries them elsewhere); requests it had sent and that have not run are dropped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import mmap
import os
import signal
import socket
import subprocess
from typing import Any

from . import logs, wire
from .budget import TABLES
from .children import cut_lifeline, is_stopped, start_child
from .errors import EasyServeError, StartupError
from .guards import LINGER_S
from .http import ACCESS_LOG, LocalReports
from .metrics import server_registry
from .pool import WorkerPool
from .runtime import RECHECK_S, held_for
from .watchdog import exit_cause

log = logging.getLogger("easyserve")

__all__ = ["Fronts"]

LISTEN_TIMEOUT_S = 60.0  # a front is up in well under a second; this bounds a machine under load
STOP_GRACE_S = 5.0
EXIT_S = 5.0  # a front's last answers and exit, after its grace (aiohttp's shutdown: 2 s for a handler, 2 for its task)
HURRY_S = 1.0  # after a second signal: long enough for a front to write the 503s it was just sent
DRAIN_ACK_S = 2.0  # how long a drain waits for every front to say it no longer listens
DRAIN_KILL_S = 8.0  # when one that has not said so by then is killed (stopped or wedged)
COUNT_WAIT_S = 1.0  # how long /stats and /metrics wait for each front's count of what it holds
EXIT_WAIT_S = 0.5  # how long a front whose socket pair closed may take to exit, looked at again each...
EXIT_RECHECK_S = 0.05  # ...of these, before its death is said without a cause, and it is killed
RESTART_DELAYS_S = (0.5, 1.0, 2.0, 5.0, 10.0)  # after deaths in a row before a front listened
HEARTBEAT_S = 2.0  # how often each listening front is asked for its count: an answer says its loop runs
HUNG_S = 15.0  # a front that has not answered for this long (its loop wedged) is killed and replaced; one stopped
# (SIGSTOP) is let go on first, and killed only if it has not answered a heartbeat later


class Budget:
    """The body bytes all fronts hold (for ``/stats`` and ``/metrics``): as they hold them now, in the
    table they share; without one, as each last reported it."""

    def __init__(self, fronts: Fronts, limit: int) -> None:
        self._fronts = fronts
        self.limit = limit

    @property
    def held(self) -> int:
        table = self._fronts.table
        return sum(table.counts) if table is not None else sum(front.held for front in self._fronts.fronts)


class _Table:
    """Two tables of one 64-bit count per front in memory the fronts share: the body bytes each holds
    (``counts``: ``SharedBodyBudget``), then the bodies each is reading (``arriving``: the requests a
    front that dies cuts off before the server process has heard of them). An anonymous file (memfd)
    that each front maps, its descriptor passed on as the front starts (see :data:`TABLES`)."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.fd = os.memfd_create("easyserve-bodies")
        try:
            os.ftruncate(self.fd, TABLES * slots * 8)
            self._map = mmap.mmap(self.fd, TABLES * slots * 8)
        except BaseException:
            os.close(self.fd)
            raise
        self._whole = memoryview(self._map).cast("q")
        self.counts, self.arriving = self._whole[:slots], self._whole[slots:]

    def close(self) -> None:
        for view in (self.counts, self.arriving, self._whole):
            view.release()
        self._map.close()
        os.close(self.fd)


def _shared_table(slots: int) -> _Table | None:
    try:
        return _Table(slots)
    except (AttributeError, OSError) as exc:  # no memfd (not Linux): each front gets its share instead
        log.debug("no shared memory for the fronts' body budget (%s): each gets a share", exc)
        return None


@dataclasses.dataclass(eq=False)
class Front:
    """One front process slot: its process, socket pair and the requests it has in the queue."""

    index: int
    proc: subprocess.Popen | None = None
    transport: asyncio.Transport | None = None
    outbox: wire.Outbox | None = None  # its transport's (answers are written a turn of the loop at a time)
    lifeline: int | None = None
    output: logs.ProcessOutput | None = None
    ring: logs.Ring = dataclasses.field(default_factory=logs.new_ring)  # outlives its processes
    pending: dict = dataclasses.field(default_factory=dict)  # its request id -> the pool's Pending
    held: int = 0
    answered: int = 0  # answers sent to its process...
    passed_on: int = 0  # ...and how many of those it last said it had read (each went on to its client)
    reading: int = 0  # bodies it is reading, as it reports them while the server drains
    listening: asyncio.Future | None = None
    counted: asyncio.Future | None = None  # its answer to "how many body bytes do you hold now?"
    asked_at: float = 0.0  # when that was asked (the loop's clock)
    let_go: bool = False  # found stopped with that question unanswered, and sent SIGCONT
    closed: asyncio.Future | None = None  # its word that it no longer listens (a drain)
    deaths: int = 0  # in a row, before listening
    gone_at: float = 0.0  # when its socket pair closed (the loop's clock)
    killed: subprocess.Popen | None = None  # its process that the server killed, if it did
    cpu_mark: float | None = None  # the CPU seconds its process said it had spent, last

    @property
    def name(self) -> str:
        return f"http/{self.index}"

    @property
    def listened(self) -> bool:
        """Whether its process came to listen (it may have stopped since, or died)."""
        return self.listening is not None and self.listening.done() and self.listening.result() is None

    @property
    def connected(self) -> bool:
        """Whether its socket pair is open (it is up, or starting)."""
        return self.transport is not None and not self.transport.is_closing()


class Fronts:
    """The front processes of one server. ``bind()``, ``await start()``, ``drain()``, ``await stop()``."""

    def __init__(self, pool: WorkerPool, config: Any) -> None:
        self.pool = pool
        self.config = config
        self.loop = asyncio.get_running_loop()
        count = config.http_workers
        self.table = _shared_table(count)
        if self.table is not None:  # every front admits a body against what all hold (SharedBodyBudget)
            self.share_mb = config.max_buffered_mb
            self.budget = Budget(self, int(config.max_buffered_mb * 2**20))
        else:  # each may hold its share of MaxBufferedMB, and always one body of the largest size allowed
            self.share_mb = max(config.max_buffered_mb / count, config.max_body_mb)
            self.budget = Budget(self, int(self.share_mb * count * 2**20))
        self.reports = LocalReports(pool, self.budget, server_registry(pool, self.budget), before=self.count_held)
        self.fronts = [Front(i) for i in range(count)]
        self.port: int | None = None
        self.draining = False  # fronts stop listening: none is restarted
        self.closing = False
        self._holder: socket.socket | None = None
        self._model: tuple | None = None  # what the fronts were last told of the model
        self._tasks: set[asyncio.Task] = set()  # replacements starting, a drain's checks: stop() waits for them
        self._heartbeat: asyncio.TimerHandle | None = None
        self._last_check = 0.0  # when the heartbeat last ran (the loop's clock)
        pool.listeners.append(self._pool_changed)

    # -- lifecycle ---------------------------------------------------------------------------------

    def bind(self) -> int:
        """Take the port (a free one for ``Port: 0``) and hold it for the fronts; return it.

        First a plain bind, so a port any other socket holds fails at once, with ``SO_REUSEPORT``
        sockets among them (another server's fronts would otherwise silently share it); then a bound,
        never listening ``SO_REUSEPORT`` socket holds it while fronts come and go."""
        host, port = self.config.host, self.config.port
        family, _, _, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
        probe = socket.socket(family, socket.SOCK_STREAM)
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a listening socket would
            probe.bind(address)
            port = probe.getsockname()[1]
        except OSError as exc:
            raise StartupError.cannot_listen(host, port, exc) from None
        finally:
            probe.close()
        holder = socket.socket(family, socket.SOCK_STREAM)
        try:
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            holder.bind((address[0], port, *address[2:]))
        except OSError as exc:  # taken in the moment between the two binds
            holder.close()
            raise StartupError.cannot_listen(host, port, exc) from None
        self._holder, self.port = holder, port
        return port

    async def start(self) -> None:
        """Start every front; return once all listen, or raise :class:`StartupError` saying why not."""
        await asyncio.gather(*(self._spawn(front) for front in self.fronts))
        for front in self.fronts:
            try:
                error = await asyncio.wait_for(asyncio.shield(front.listening), LISTEN_TIMEOUT_S)
            except asyncio.TimeoutError:
                error = f"it did not listen within {LISTEN_TIMEOUT_S:g}s"
            if error is not None:
                lines = "\n".join(map(str, logs.ring_lines(front.ring)))
                raise StartupError(f"HTTP front {front.name} could not start: {error}"
                                   + (f"\n{lines}" if lines else ""))
        self._last_check = self.loop.time()
        self._heartbeat = self.loop.call_later(HEARTBEAT_S, self._check_fronts)

    def _check_fronts(self) -> None:
        """Ask each listening front for its count, as /stats does; one that has left a question
        unanswered for ``HUNG_S`` is killed (and so replaced): stopped or wedged, it went on listening,
        and the kernel handed it new connections that nobody answered."""
        now = self.loop.time()
        # This loop ran late (it was held, or the whole process stopped): an answer may be waiting unread
        # on the socket pair, as timers run before the sockets are read. Judge no front on this turn.
        late = now - self._last_check > 2 * HEARTBEAT_S
        self._last_check = now
        try:
            for front in self.fronts:
                waiting = front.counted is not None and not front.counted.done()  # since front.asked_at
                if self._ask(front) is None or not waiting:
                    continue
                if late:
                    front.asked_at = max(front.asked_at, now - HEARTBEAT_S)
                elif now - front.asked_at >= HUNG_S and front.proc is not None and front.proc.poll() is None:
                    self._hung(front, now - front.asked_at)
        finally:
            self._heartbeat = self.loop.call_later(HEARTBEAT_S, self._check_fronts)

    def _hung(self, front: Front, silent: float) -> None:
        """A front that has left a question unanswered for ``silent`` seconds: one stopped (SIGSTOP, a
        debugger) is let go on (SIGCONT), as a stopped worker is, and looked at again at the next heartbeat;
        one still silent then, or not stopped (its loop wedged), is killed. Killed stopped, the answers the
        workers had made for its clients, waiting in its socket pair, were lost with it."""
        pid = front.proc.pid
        if not front.let_go and is_stopped(pid):
            log.warning("HTTP front %s (pid %d) has not answered for %.0fs: it is stopped (SIGSTOP, or a debugger); "
                        "letting it go on, and killing it if it has not answered %gs later", front.name, pid, silent,
                        HEARTBEAT_S)
            front.let_go = True
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:  # it ended meanwhile: its socket pair tells
                pass
            return
        log.error("HTTP front %s (pid %d) has not answered for %.0fs (%s): killing it; another takes its place",
                  front.name, pid, silent, "still, once let go on" if front.let_go else
                  "stopped, or its event loop is wedged")
        self._kill(front)

    def close_soon(self) -> None:
        """A stop is coming (ShutdownDelayS): every front still serves, and closes each connection it
        answers (the pool, already told, answers /ready 503 through any of them)."""
        for front in self.fronts:
            self._send(front, ("closing soon",))

    async def drain(self) -> None:
        """Every front stops listening (new connections are refused, so clients and nginx go elsewhere);
        once all have, each answers new requests on open connections 503 with ``Connection: close``.

        In two steps: a client told to reconnect by one front while another still listened could land
        in that one's backlog, and be reset (not refused) when it closed."""
        self.draining = True
        self._stop_heartbeat()  # a drain bounds a front that does not answer itself (it is killed)
        closed = []
        for front in self.fronts:
            if front.connected:
                front.closed = self.loop.create_future()
                closed.append(front.closed)
                self._send(front, ("drain",))
        if closed:  # a front that died or hangs does not hold the drain up
            await asyncio.wait(closed, timeout=DRAIN_ACK_S)
        for front in self.fronts:
            if front.closed is not None and not front.closed.done():
                task = self.loop.create_task(self._kill_if_still_listening(front, front.closed))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        for front in self.fronts:
            self._send(front, ("stop taking",))

    async def _kill_if_still_listening(self, front: Front, closed: asyncio.Future) -> None:
        """A front that has not said it stopped listening ``DRAIN_KILL_S`` after the drain began is
        killed: stopped (SIGSTOP, a debugger) or its loop wedged, it still listens, and the kernel hands
        it new connections that nobody answers, for as long as the stop waits for it (35 s). A front still
        starting never listens: it is left to start and be told to exit."""
        await asyncio.wait({closed}, timeout=DRAIN_KILL_S - DRAIN_ACK_S)
        proc = front.proc
        if not closed.done() and front.listened and proc is not None and proc.poll() is None:
            log.warning("HTTP front %s (pid %d) did not stop listening within %gs of the drain: killing it, so "
                        "that new connections are refused", front.name, proc.pid, DRAIN_KILL_S)
            self._kill(front)

    def hurry(self) -> None:
        """A second signal: fronts stop waiting for bodies still arriving (each gets its 503 now)."""
        for front in self.fronts:
            self._send(front, ("hurry",))

    async def stop(self, grace: float = STOP_GRACE_S, linger: float = LINGER_S) -> None:
        """After the pool's drain (every request answered): fronts write their last answers, let bodies
        still arriving arrive for up to ``grace`` seconds (their requests get 503: stopping), keep
        connections active in the last ``linger`` seconds open that long (see
        :meth:`easyserve.guards.GuardedRunner.cleanup`), and exit. After a second signal, a front
        still running a second later is killed."""
        self.closing = True
        self._stop_heartbeat()
        if self._tasks:  # a replacement still starting: it gets "exit" like the others
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for front in self.fronts:
            if front.listened:
                self._send(front, ("exit", linger, grace))
            elif front.proc is not None and front.proc.poll() is None:
                # never listened, so no client's: ended now, where one stalled as it started (a wedged
                # import, a stop) held the server's exit for the fronts' grace, linger and more
                self._kill(front)
        await asyncio.gather(*(self._reap(front, max(grace, linger) + EXIT_S) for front in self.fronts))
        if self._holder is not None:
            self._holder.close()
            self._holder = None
        if self.table is not None:  # every front has exited: nothing reads it any more
            table, self.table = self.table, None
            table.close()

    def _stop_heartbeat(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None

    async def _reap(self, front: Front, timeout: float) -> None:
        proc = front.proc
        if proc is None:
            return
        if not await _exited(proc, timeout, hurry=lambda: self.pool.aborted):
            if not self.pool.aborted:  # a second signal asked for this; otherwise it is news
                log.warning("HTTP front %s did not stop within %.0fs; killing it", front.name, timeout)
            self._kill(front)
            if not await _exited(proc, STOP_GRACE_S):
                log.error("HTTP front %s (pid %d) could not be reaped", front.name, proc.pid)
        self._forget(front)

    # -- processes ---------------------------------------------------------------------------------

    async def _spawn(self, front: Front) -> None:
        self._empty(front)
        table = self.table
        # the key goes over the socket pair; the body budget's table is passed on as a descriptor
        child = start_child("easyserve.front", os.environ, pass_fds=(table.fd,) if table is not None else ())
        front.proc, ours, front.lifeline = child.proc, child.sock, child.lifeline
        front.output = logs.ProcessOutput(front.name, front.proc.pid, front.ring)
        front.output.attach(self.loop, child.output, child.records)
        front.listening = self.loop.create_future()
        front.cpu_mark = None
        try:
            front.transport, _ = await self.loop.connect_accepted_socket(lambda: _FrontProtocol(self, front), ours)
            front.outbox = wire.Outbox(front.transport, self.loop)
        except BaseException:
            ours.close()
            self._kill(front)
            raise
        # What a front needs of the config. The key (ApiKey, or $EASYSERVE_API_KEY) and the model's
        # name are sent as worked out here, not put through the config's checks again: a key from the
        # environment and a handle's class name are not held to ApiKey's and ModelName's rules.
        config = self.config.replace(handle="easyserve.front:HTTP", handle_args={}, max_buffered_mb=self.share_mb,
                                     port=self.port)
        object.__setattr__(config, "api_key", self.config.required_key)
        object.__setattr__(config, "model_name", self.pool.config.served_model_name)
        object.__setattr__(config, "model_version", self.pool.config.model_version)
        shared = (table.fd, table.slots, front.index) if table is not None else None
        # the code first: a front whose code is not this server's refuses to start before it reads more
        start = ("start", wire.code_fingerprint(), config, self.port, log.getEffectiveLevel(), shared)
        front.transport.writelines(wire.pack(start))
        self._send(front, self._model_message())
        if self.pool.closing_soon:
            self._send(front, ("closing soon",))
        if self.draining:  # a drain began while it started: it must not listen at all
            self._send(front, ("drain",))
            self._send(front, ("stop taking",))

    def _send(self, front: Front, message: Any) -> None:
        if front.connected:
            front.outbox.send(wire.pack(message))

    def _exited(self, front: Front) -> None:
        """A front's socket pair closed: it exited (asked to, or died)."""
        if front.output is not None:  # its last words, logged before what is said of its death
            front.output.take_in()
        was_listening = front.listened
        # its clients' connections went with it: not run yet, dropped; running, its answer goes nowhere;
        # answered, but the answer still on its way to the front (one that stalled), lost with it
        unread = front.answered - front.passed_on
        front.answered = front.passed_on = 0
        # and the requests whose bodies it was reading: counted nowhere, where one front would have
        # answered them (a 408, a client gone). Known where the fronts share a table; else only as a
        # drain made the front report them
        arriving = self.table.arriving[front.index] if self.table is not None else front.reading
        cut_off = len(front.pending) + unread + arriving
        ran = sum(p.started is not None for p in front.pending.values())
        for pending in front.pending.values():
            self.pool.abandon(pending)
        front.pending.clear()
        self.pool.stats.cut_off += cut_off
        self._empty(front)
        if front.reading:
            self.pool.add_reading(-front.reading)
            front.reading = 0
        for question in (front.counted, front.closed):  # it will never answer
            if question is not None and not question.done():
                question.set_result(None)
        if front.listening is not None and not front.listening.done():
            front.listening.set_result("it exited before it listened")
        front.gone_at = self.loop.time()
        # the last answers it wrote may have reached their clients: it reports them once per turn of its loop
        answered = f"; {unread} answered, not yet said to be passed on" if unread else ""
        answered += f"; {arriving} whose body was arriving" if arriving else ""
        lost = (f", cutting off {cut_off} request(s) in flight ({ran} had been handed to a worker{answered}): their "
                "clients got no answer" + (", but for any it answered in its last moment" if unread else "")
                if cut_off else "")
        if self.closing or self.draining:  # not restarted; exiting as told is no news, losing requests is
            if cut_off:
                self._say_died(front, front.proc, f" while the server stopped{lost}", wait=False)  # before it exits
            return
        front.deaths = 0 if was_listening else front.deaths + 1
        self.pool.stats.front_restarts += 1  # an alert's to see: a front that keeps dying loses connections each time
        delay = RESTART_DELAYS_S[min(front.deaths - 1, len(RESTART_DELAYS_S) - 1)] if front.deaths else 0.0
        self._say_died(front, front.proc, f"{lost}; starting another" + (f" in {delay:g}s" if delay else ""))
        self.loop.call_later(delay, self._restart, front)

    def _kill(self, front: Front) -> None:
        """Kill a front's process (the server's reason is logged beside each call)."""
        if front.proc is not None:
            front.killed = front.proc
            front.proc.kill()

    def _say_died(self, front: Front, proc: subprocess.Popen | None, rest: str, tries: int = 0,
                  wait: bool = True) -> None:
        """Log a front's death, with its cause once its process is reaped: its socket pair may close just
        before, and the log said "died" with no cause (or a raw "exit code -9"), one death in three.
        Looked at again for up to EXIT_WAIT_S (unless not to ``wait``), never waited for on the event loop."""
        code = proc.poll() if proc is not None else None
        if code is None and proc is not None and wait and tries * EXIT_RECHECK_S < EXIT_WAIT_S:
            self.loop.call_later(EXIT_RECHECK_S, self._say_died, front, proc, rest, tries + 1)
            return
        if code is not None and proc is front.killed:
            cause = "was killed by the server"  # and why, said as it was
        else:
            cause = exit_cause(code) if code is not None else "died"
        log.warning("HTTP front %s (pid %s) %s%s", front.name, proc.pid if proc else "?", cause, rest)

    def _restart(self, front: Front) -> None:
        if self.closing or self.draining:
            return
        self._forget(front)
        if front.proc is not None and front.proc.poll() is None:  # its socket closed: it has exited or is exiting
            if self.loop.time() - front.gone_at < EXIT_WAIT_S:  # its own exit, and its cause, first
                self.loop.call_later(EXIT_RECHECK_S, self._restart, front)
                return
            self._kill(front)
            # reaped once gone, which a process held up on its way out (a debugger holding it) may take a
            # while to be: looked at again, never waited for on the event loop that every request needs
            self.loop.call_later(0.05, self._restart, front)
            return
        task = self.loop.create_task(self._respawn(front))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _respawn(self, front: Front) -> None:
        """Start a replacement front; if no process can be started (out of file descriptors or memory),
        try again after a growing delay, as for a worker. The failure was left in a task nobody read, and
        the slot had no front for as long as the server ran, once the fault had passed too."""
        try:
            await self._spawn(front)
        except Exception as exc:
            front.deaths += 1
            delay = RESTART_DELAYS_S[min(front.deaths - 1, len(RESTART_DELAYS_S) - 1)]
            log.error("HTTP front %s could not be started again: %s: %s; trying again in %gs", front.name,
                      type(exc).__name__, exc, delay)
            self.loop.call_later(delay, self._restart, front)
            return
        # bounded as the first start is: one stalled before it listened (a wedged import, a stop) held its
        # slot for as long as the server ran, unsaid, its share of the connections' work lost. A timer, not
        # a wait in this task, which stop() waits for: a stop waited out the minute
        due = self.loop.time() + LISTEN_TIMEOUT_S
        self.loop.call_at(due, self._listened_in_time, front, front.proc, due)

    def _listened_in_time(self, front: Front, proc: subprocess.Popen, due: float) -> None:
        if held_for(self.loop, due):  # this loop was held past it: its "listening" may wait unread
            self.loop.call_later(RECHECK_S, self._listened_in_time, front, proc, self.loop.time())
            return
        if (front.proc is proc and proc.poll() is None and not front.listening.done()
                and not (self.closing or self.draining)):
            log.error("HTTP front %s (pid %d) did not listen within %gs of its start: killing it; another takes "
                      "its place", front.name, proc.pid, LISTEN_TIMEOUT_S)
            self._kill(front)

    def _empty(self, front: Front) -> None:
        """A front that exited holds no body any more (it may have died with its count in the table)."""
        front.held = 0
        if self.table is not None:
            self.table.counts[front.index] = self.table.arriving[front.index] = 0

    def _forget(self, front: Front) -> None:
        if front.transport is not None:
            front.transport.close()
        if front.lifeline is not None:
            cut_lifeline(front.lifeline)
            front.lifeline = None
        if front.output is not None:
            front.output.close()
            front.output = None

    # -- messages from a front ---------------------------------------------------------------------

    def _on_message(self, front: Front, message: tuple) -> None:
        kind = message[0]
        if kind == "submit":
            _, rid, task_info, request_id, query, headers = message
            try:
                pending = self.pool.submit(task_info, request_id, query, headers)
            except EasyServeError as exc:  # full, stopping, not ready: answered at once, as with one front
                self._send_answer(front, rid, exc.status, str(exc), getattr(exc, "retry_after", None))
                return
            front.pending[rid] = pending
            pending.future.add_done_callback(lambda future: self._answer(front, rid, pending))
        elif kind == "abandon":
            pending = front.pending.pop(message[1], None)
            if pending is not None:
                self.pool.abandon(pending)
        elif kind == "answers":
            _, answers, gone, malformed, slow_reset, heads_timed_out, access, held, cpu_s, front.passed_on = message
            for line in access:
                ACCESS_LOG.info("%s", line)
            for status, seconds in answers:
                self.pool.stats.record_answer(status, seconds)
            self.pool.stats.record_gone(gone)
            self.pool.stats.record_malformed(malformed)
            self.pool.stats.record_slow_reset(slow_reset)
            self.pool.stats.record_head_timed_out(heads_timed_out)
            front.held = held
            front.cpu_mark = self.pool.stats.count_cpu("fronts", front.cpu_mark, cpu_s)
        elif kind == "reading":
            front.reading += message[1]
            self.pool.add_reading(message[1])
        elif kind == "held":
            _, front.held, cpu_s, front.passed_on = message
            front.cpu_mark = self.pool.stats.count_cpu("fronts", front.cpu_mark, cpu_s)
            if front.counted is not None and not front.counted.done():
                front.counted.set_result(None)
        elif kind == "call":
            _, rid, name, args = message
            self.loop.create_task(self._call(front, rid, name, args))
        elif kind == "closed":
            if front.closed is not None and not front.closed.done():
                front.closed.set_result(None)
        elif kind == "listening":
            front.cpu_mark = message[2]  # its start-up is not counted
            front.listening.set_result(None)
            log.debug("HTTP front %s listening (pid %d)", front.name, message[1])
        elif kind == "failed":
            if not front.listening.done():
                front.listening.set_result(message[1])

    def _answer(self, front: Front, rid: int, pending: Any) -> None:
        if front.pending.get(rid) is not pending:  # abandoned, or its front has gone (a replacement's ids
            return  # start again at 1: the same id may be another request's now)
        del front.pending[rid]
        status, payload = pending.future.result()
        self._send_answer(front, rid, status, wire.mark_large(payload), pending.retry_after)

    def _send_answer(self, front: Front, rid: int, status: int, payload: Any, retry_after: float | None) -> None:
        if front.connected:
            front.answered += 1  # not yet its client's: see _exited
            front.outbox.put(wire.pack(("answer", rid, status, payload, retry_after)))
        else:  # its link is closing, and _exited, to come, no longer holds it among the pending: counted here
            self.pool.stats.cut_off += 1

    async def _call(self, front: Front, rid: int, name: str, args: tuple) -> None:
        if name not in ("readiness", "snapshot", "metrics", "model_stat"):
            return
        asker = front.transport  # the process that asked: should it die meanwhile, its replacement's
        try:  # ids start again at 1, and this result must not answer the call it numbers the same
            result = await getattr(self.reports, name)(*args)
        except Exception as exc:  # the front must get an answer, or its request waits forever
            log.exception("HTTP front %s: %s failed", front.name, name)
            result = RuntimeError(f"{type(exc).__name__}: {exc}")
        if front.transport is asker:
            self._send(front, ("result", rid, result))

    async def count_held(self) -> None:
        """Ask every front for the body bytes it holds now (a body may be arriving at one front while
        another is asked for /stats); each answers at once, unless it has died meanwhile."""
        asked = [question for front in self.fronts if (question := self._ask(front)) is not None]
        if asked:
            await asyncio.wait(asked, timeout=COUNT_WAIT_S)

    def _ask(self, front: Front) -> asyncio.Future | None:
        """Ask a listening front for its count, unless a question waits for its answer already (which
        then serves both); the future its answer resolves. ``None`` for a front not listening: one still
        starting holds nothing yet, and answers only once it has imported."""
        if not (front.connected and front.listened):
            return None
        if front.counted is None or front.counted.done():
            front.counted, front.asked_at, front.let_go = self.loop.create_future(), self.loop.time(), False
            self._send(front, ("held?",))
        return front.counted

    def _model_message(self) -> tuple:
        """The model as the fronts must know it (v2 paths, checks and configuration): its name, version,
        tensors and worker processes."""
        config = self.pool.config  # a reload replaces it (with the handle, its class name)
        return ("model", *config.model_identity, self.pool.signature, self.pool.specs)

    def _pool_changed(self) -> None:
        message = self._model_message()
        if message != self._model:
            self._model = message
            for front in self.fronts:
                self._send(front, message)


async def _exited(proc: subprocess.Popen, timeout: float, hurry=lambda: False) -> bool:
    """Whether ``proc`` exits (and is reaped) within ``timeout`` seconds, or within ``HURRY_S`` of when
    ``hurry()`` says to stop waiting (a second signal: stop now). Polled: this runs only while a
    server stops, and a thread could not be started at interpreter exit."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while proc.poll() is None and loop.time() < deadline:
        if hurry():
            deadline = min(deadline, loop.time() + HURRY_S)
        await asyncio.sleep(0.02)
    return proc.poll() is not None


def _submitted_and_abandoned(messages: list[tuple]) -> set[int]:
    """The ids of the requests that ``messages`` (a front's, in the order sent) both submit and abandon."""
    submitted: set[int] = set()
    both: set[int] = set()
    for message in messages:
        if message[0] == "submit":
            submitted.add(message[1])
        elif message[0] == "abandon" and message[1] in submitted:
            both.add(message[1])
    return both


class _FrontProtocol(asyncio.Protocol):
    def __init__(self, fronts: Fronts, front: Front) -> None:
        self.fronts = fronts
        self.front = front
        self.reader = wire.FrameReader()

    def data_received(self, data: bytes) -> None:
        messages = list(self.reader.feed(data))
        if len(messages) > 1:
            # A request and its abandon read together (this process was held, its front not: a pause, a
            # debugger): submitted first, it went to an idle worker before its abandon was read, and ran
            # for no one. Neither is passed on; the front counted its client gone.
            dropped = _submitted_and_abandoned(messages)
            if dropped:
                messages = [m for m in messages if not (m[0] in ("submit", "abandon") and m[1] in dropped)]
        for message in messages:
            self.fronts._on_message(self.front, message)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.front.transport is not None and self.front.transport.get_protocol() is self:
            self.front.transport = None
            self.fronts._exited(self.front)
