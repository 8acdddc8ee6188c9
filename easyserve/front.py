"""An HTTP front process, one of ``HttpWorkers``: it serves HTTP on the server's port and sends each
request it admits to the server process, whose one queue feeds every worker.

Started by :mod:`easyserve.fronts` as ``python -m easyserve.front SOCK_FD LIFELINE_FD SERVER_PID``.
Each front binds the same port with ``SO_REUSEPORT``, so the kernel spreads new connections over
them; everything HTTP costs (parsing, guards, reading and inflating bodies, small JSON bodies,
writing answers) is spent here, in parallel. The server process keeps what must be one: the queue
and its batches, the workers, deadlines and the counters. A request is admitted, read and checked
exactly as with one process (the same app, :func:`easyserve.http.make_app`); only the pool it is
handed to is :class:`RemotePool`, which passes it over a socket pair and waits for the answer.

Like a worker, a front cannot outlive the server: the kernel kills it when the server dies (Linux),
and it exits when the server's end of its lifeline pipe or of its socket closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import mmap
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Iterator

from aiohttp import web

from . import logs, wire
from .children import STOP_SIGNALS
from .errors import BadRequest, EasyServeError, NotReady, StartupError
from .budget import TABLES, BodyBudget, SharedBodyBudget
from .guards import LISTEN_BACKLOG, GuardedRunner, stop_listening
from .worker import OTHER_CODE, _exit_with_server, die_with_parent

log = logging.getLogger("easyserve")

__all__ = ["RemotePool", "Ticket"]


class Ticket:
    """One request sent to the server process: what :func:`easyserve.http.queued` reads of a queue entry."""

    __slots__ = ("rid", "future", "retry_after")

    def __init__(self, rid: int, future: asyncio.Future) -> None:
        self.rid = rid
        self.future = future
        self.retry_after: float | None = None


class AnswerRelay:
    """The answers this front gave, and the requests whose clients left before theirs, sent to the
    server process's counters (``/stats``, ``/metrics``): gathered for one turn of the event loop, then
    sent in one message, with the body bytes held now."""

    def __init__(self, pool: RemotePool) -> None:
        self._pool = pool
        self._answers: list[tuple[int, float]] = []
        self._gone = 0
        self._malformed = 0
        self._slow_reset = 0
        self._heads_timed_out = 0
        self._access: list[str] = []  # AccessLog's lines, logged by the server process (see AccessLines)
        self.writing = 0  # answers written in pieces, under way: not yet passed on (see RemotePool.passed_on)

    def record_answer(self, status: int, seconds: float | None) -> None:
        """An answer this front gave (its status), ``seconds`` after its request arrived (``None``: cut)."""
        self._answers.append((status, seconds))
        self._soon()

    def record_gone(self) -> None:
        """A request whose client closed its connection before its answer. Counted here, not by the
        server process at "abandon": an answer it sent may cross the client's leaving, and neither
        side would then count the request."""
        self._gone += 1
        self._soon()

    @contextlib.contextmanager
    def writing_answer(self) -> Iterator[None]:
        """While an answer is written in pieces: should this front die meanwhile, the server process
        counts it cut off, not passed on (its client never had it whole, and no status came of it)."""
        self.writing += 1
        try:
            yield
        finally:
            self.writing -= 1

    def record_malformed(self) -> None:
        """A request this front's HTTP parser refused."""
        self._malformed += 1
        self._soon()

    def record_slow_reset(self) -> None:
        """A connection this front reset for the slow readers' bound."""
        self._slow_reset += 1
        self._soon()

    def record_head_timed_out(self) -> None:
        """A connection this front closed as its request's head took past HeaderTimeoutS."""
        self._heads_timed_out += 1
        self._soon()

    def record_access(self, line: str) -> None:
        """An access line (AccessLog) of an answer this front gave."""
        self._access.append(line)
        self._soon()

    @property
    def unsent(self) -> bool:
        """Whether it holds counts the server process has yet to be sent."""
        return bool(self._answers or self._gone or self._malformed or self._slow_reset or self._heads_timed_out
                    or self._access)

    def _soon(self) -> None:
        if len(self._answers) + self._gone + self._malformed + self._slow_reset + self._heads_timed_out \
                + len(self._access) == 1:
            self._pool.loop.call_soon(self.flush)

    def flush(self) -> None:
        counts = (self._answers, self._gone, self._malformed, self._slow_reset, self._heads_timed_out, self._access)
        self._answers, self._gone, self._malformed, self._slow_reset, self._heads_timed_out = [], 0, 0, 0, 0
        self._access = []
        self._pool.send(("answers", *counts, self._pool.held(), time.process_time(), self._pool.passed_on))


class AccessLines(logging.Handler):
    """Where an HTTP front's AccessLog lines go: to the server process, with the counts of the answers
    they describe, which logs them on ``easyserve.access`` as a server of one front does. As records
    of the front's own, through the pipe the workers' records come by, they were logged on
    ``easyserve.worker``, parsed again on the server's event loop, and counted against the lines a
    second the workers may log: past it, a failed batch's traceback went unlogged."""

    def __init__(self, relay: AnswerRelay) -> None:
        super().__init__()
        self.relay = relay

    def emit(self, record: logging.LogRecord) -> None:
        self.relay.record_access(record.getMessage())


class RemotePool(asyncio.BufferedProtocol):
    """The server process's pool, as the HTTP app sees it, over this front's socket pair, whose
    messages are read into buffers of their own: a large answer is not copied from chunk to chunk
    (see :class:`wire.FrameReader`)."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.loop = asyncio.get_running_loop()
        self.stats = AnswerRelay(self)
        self.stopping = False  # draining: new requests get 503, answers close their connection
        self.closing_soon = False  # a stop is coming (ShutdownDelayS): answers close their connection
        self.signature = None  # the model's inputs and outputs, as the server process last sent them
        self.specs: tuple = ()  # the worker processes (their devices), as it sent them with the signature
        self.held = lambda: 0  # the app's body budget, once there is an app
        self.runner: GuardedRunner | None = None  # the app's, once made
        # its idle connections' close, once stopping: held here, as asyncio keeps no task alive itself
        self.closing_idle: asyncio.Task | None = None
        self.done = self.loop.create_future()  # the server said exit: (linger, grace), see guards.GuardedRunner
        self._outbox: wire.Outbox | None = None  # the socket pair's, once connected
        self._reader = wire.FrameReader()
        self._ids = itertools.count(1)
        self._waiting: dict[int, Ticket] = {}
        self.answers_read = 0  # every answer the server process sent, said back with the counts it reads
        self._calls: dict[int, asyncio.Future] = {}
        self._reading = 0
        # where it writes how many bodies it is reading, for the server process to count them cut off
        # should it die: (the fronts' shared table, its slot); None without one
        self.arriving: tuple[memoryview, int] | None = None
        self.draining = False  # the server said drain
        self.hurried = False  # the server said stop now (a second signal): the final close waits for nothing
        self.leaving = False  # this front closes the socket pair itself, as it exits (see leave)
        self.transport: asyncio.BaseTransport | None = None
        self.site: web.TCPSite | None = None  # where this front listens, once it does

    @property
    def passed_on(self) -> int:
        """The answers the server process sent that are now this front's to account for: read, less
        those still being written in pieces. The server counts the rest cut off, should this die."""
        return self.answers_read - self.stats.writing

    # -- what http.py uses --------------------------------------------------------------------------

    def refusal(self) -> EasyServeError | None:
        """What a request is refused before its body is read (see ``WorkerPool.refusal``): nothing here;
        the queue and the workers are the server process's, which refuses a request as it comes."""
        return None

    def submit(self, task_info: Any, request_id: str | None = None, query: str = "",
               headers: tuple | None = None) -> Ticket:
        if self.stopping:
            raise NotReady("server is shutting down", retry_after=1.0)
        ticket = Ticket(next(self._ids), self.loop.create_future())
        try:
            frame = wire.pack(("submit", ticket.rid, wire.mark_large(task_info), request_id, query, headers))
        except Exception as exc:  # as WorkerPool._pack: JSON nested too deeply cannot be pickled
            raise BadRequest.unpicklable(exc) from None
        self._waiting[ticket.rid] = ticket
        self._outbox.put(frame)  # with the others of this turn of the loop
        return ticket

    def abandon(self, ticket: Ticket) -> None:
        """The client went away: the server process drops the request if it has not run yet."""
        if self._waiting.pop(ticket.rid, None) is not None:
            self.send(("abandon", ticket.rid))

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """A body being read. While the server drains, the server process counts these as in flight
        (as it counts its own with one front), so its drain waits for them to be answered."""
        self._reading += 1
        self._say_arriving()
        if self.stopping:
            self.send(("reading", 1))
        try:
            yield
        finally:
            self._reading -= 1
            self._say_arriving()
            if self.stopping:
                self.send(("reading", -1))

    def _say_arriving(self) -> None:
        if self.arriving is not None:
            table, slot = self.arriving
            table[slot] = self._reading

    async def call(self, name: str, *args: Any) -> Any:
        """Ask the server process for a report (see :class:`easyserve.http.LocalReports`)."""
        rid = next(self._ids)
        self._calls[rid] = future = self.loop.create_future()
        self.send(("call", rid, name, args))
        return await future

    async def _stop_listening(self) -> None:
        await stop_listening(self.site)  # new connections are refused: clients and nginx go elsewhere
        self.send(("closed",))

    def _stop_taking(self) -> None:
        """Requests on open connections get 503, and answers close their connections; those idle are
        closed (see :meth:`GuardedRunner.close_idle`)."""
        if not self.stopping:
            self.stopping = True
            if self.runner is not None:
                self.closing_idle = self.loop.create_task(self.runner.close_idle())
            if self._reading:  # from now on each read's end is reported (see reading())
                self.send(("reading", self._reading))

    # -- the socket pair ------------------------------------------------------------------------------

    def send(self, message: Any) -> None:
        if self._outbox is not None:
            self._outbox.send(wire.pack(message))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self._outbox = wire.Outbox(transport, self.loop)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        for message in self._reader.buffer_updated(nbytes):
            self._on_message(message)

    def connection_lost(self, exc: Exception | None) -> None:
        # the server process is gone: no request can be answered any more
        if not self.leaving:
            os._exit(0)

    def leave(self) -> None:
        """Close the socket pair as this front exits, what it has yet to write first (left open at the
        loop's close, it was a ResourceWarning in the log at each stop)."""
        self.leaving = True
        if self.transport is not None:
            self.transport.close()

    def _on_message(self, message: tuple) -> None:
        kind = message[0]
        if kind == "answer":
            self.answers_read += 1  # the server process counts one it sent and never heard of as cut off
            _, rid, status, payload, retry_after = message
            ticket = self._waiting.pop(rid, None)
            if ticket is not None and not ticket.future.done():
                ticket.retry_after = retry_after
                ticket.future.set_result((status, payload))
            else:  # it crossed the client's abandon: no answer given will carry the count back
                self.stats.flush()
        elif kind == "result":
            future = self._calls.pop(message[1], None)
            if future is not None and not future.done():
                if isinstance(message[2], BaseException):
                    future.set_exception(message[2])
                else:
                    future.set_result(message[2])
        elif kind == "held?":
            if self.stats.unsent:  # answers already given are counted before the snapshot is taken
                self.stats.flush()
            self.send(("held", self.held(), time.process_time(), self.passed_on))
        elif kind == "model":
            _, name, version, self.signature, self.specs = message
            # the server process worked these out (and checked what it was given); a reload may change them
            object.__setattr__(self.config, "model_name", name)
            object.__setattr__(self.config, "model_version", version)
        elif kind == "closing soon":
            self.closing_soon = True
        elif kind == "drain":  # first step: stop listening (see Fronts.drain)
            self.draining = True
            if self.site is not None:
                self.loop.create_task(self._stop_listening())
            else:  # still starting: serve() will not listen
                self.send(("closed",))
        elif kind == "stop taking":  # second step, once no front listens
            self._stop_taking()
        elif kind == "hurry":
            self.hurried = True
        elif kind == "exit" and not self.done.done():
            self.done.set_result(message[1:])


class RemoteReports:
    """``/ready``, ``/stats`` and ``/metrics`` for a front: the server process holds the numbers."""

    def __init__(self, pool: RemotePool) -> None:
        self.pool = pool

    async def readiness(self, detail: bool = True) -> tuple[bool, str, list[dict]]:
        return await self.pool.call("readiness", detail)

    async def snapshot(self) -> dict:
        return await self.pool.call("snapshot")

    async def model_stat(self, name: str, version: str) -> dict:
        return await self.pool.call("model_stat", name, version)

    async def metrics(self, accept: str) -> tuple[bytes, str]:
        return await self.pool.call("metrics", accept)


async def serve(pool: RemotePool, config: Any, port: int, budget: BodyBudget | None = None,
                arriving: tuple[memoryview, int] | None = None) -> None:
    from .http import BUDGET, make_app, make_runner

    pool.arriving = arriving
    app = make_app(pool, config, reports=RemoteReports(pool), budget=budget)
    pool.held = lambda: app[BUDGET].held
    # answers waiting for slow readers: this front's share of MaxBufferedMB (its config holds a share of
    # it already where the fronts share no table of bodies: divided again, it was MaxBufferedMB / N²)
    share = config.max_buffered_mb / config.http_workers if budget is not None else config.max_buffered_mb
    runner = make_runner(app, config, share)
    await runner.setup()
    pool.runner = runner
    # SO_REUSEPORT: every front binds the port; the kernel spreads connections over them
    site = web.TCPSite(runner, config.host, port, reuse_port=True, backlog=LISTEN_BACKLOG)
    if not pool.draining:  # started (as a replacement) while the server drains: it does not listen
        try:
            await site.start()
        except OSError as exc:
            pool.send(("failed", str(StartupError.cannot_listen(config.host, port, exc))))
            return
        pool.site = site
        if pool.draining:  # "drain" came while the site was starting
            await pool._stop_listening()
    pool.send(("listening", os.getpid(), time.process_time()))
    linger, grace = await pool.done
    # bodies still arriving get their 503, not a closed connection
    await runner.cleanup(linger, grace, hurry=lambda: pool.hurried)


def main(sock_fd: int, lifeline_fd: int, server_pid: int) -> int:
    die_with_parent(server_pid, signal.SIGKILL)
    for sig in STOP_SIGNALS:  # the server decides when fronts stop (drain first); they came blocked
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    threading.Thread(target=_exit_with_server, args=(lifeline_fd,), daemon=True, name="lifeline").start()
    sock = socket.socket(fileno=sock_fd)
    start = wire.recv(sock)
    if start[1] != wire.code_fingerprint():  # easyserve changed on disk since the server started
        logs.open_records().write(logs.leveled(OTHER_CODE.format(who="an HTTP front"), "ERROR") + "\n")
        return 3
    _, _, config, port, log_level, shared = start
    logs.configure_child(log_level)
    sock.setblocking(False)
    from .runtime import new_event_loop  # uvloop where installed, as the server's own loop

    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    budget = arriving = None
    if shared is not None:  # (descriptor, slots, this front's slot): the fronts' shared body budget
        fd, slots, index = shared
        table = memoryview(mmap.mmap(fd, TABLES * slots * 8)).cast("q")
        budget = SharedBodyBudget(int(config.max_buffered_mb * 2**20), table[:slots], index)
        arriving = (table, slots + index)
    _, pool = loop.run_until_complete(loop.connect_accepted_socket(lambda: RemotePool(config), sock))
    if config.access_log:
        from .http import ACCESS_LOG

        ACCESS_LOG.addHandler(AccessLines(pool.stats))
        ACCESS_LOG.propagate = False
        # every line goes: the server's own logger decides which it shows, not this process's level (the
        # server's "easyserve" logger's, which a log that shows access lines alone had at WARNING)
        ACCESS_LOG.setLevel(logging.INFO)
    try:
        loop.run_until_complete(serve(pool, config, port, budget, arriving))
    finally:
        # what is still pending (the drain's idle close in its second look) ends before the loop closes, as
        # asyncio.run ends it: destroyed pending, it was an error in the log
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.wait(pending, timeout=2))
        pool.leave()
        loop.run_until_complete(asyncio.sleep(0))  # its connection_lost
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
