"""The client side of ``easyserve bench``: a process that keeps a number of requests in flight.

:func:`easyserve.bench` starts one or more of these (``COMMAND``: this module's ``main()``) and steers
them over standard input and output, in frames of a length and a pickle of plain values (tuples,
dicts, bytes), so the two sides share no classes:

- it sends the job first: ``{"url", "requests": [(body, headers), ...], "concurrency", "timeout_s"}``,
  with ``"rate"`` (this process's requests per second), ``"arrivals"``, ``"phase"`` and ``"seed"`` (of
  Poisson arrivals' random gaps) for an open loop;
- the process answers ``("ready",)`` once its connection pool exists;
- ``("warmup", seconds)``: it runs the loop that long, waits for the requests in flight and answers
  ``("warm", tally)``; the tally's CPU time tells whether this process was too busy to keep up; a
  warm-up whose first ``FAILED_ENOUGH`` requests (or one for each of the job's bodies, if there are
  more) all fail as every request will (no answer, or a 4xx but a 408 or 429), with no success among
  them, sends no more (nobody listens, or the server refuses what is sent: the parent says so rather
  than measure failures); a load's failures (429, 5xx) do not end it early;
- ``("measure", seconds or None, requests or None, first, start)``: the same, sending ``("progress",
  requests, errors)`` every quarter second and then ``("done", tally)`` once every request it sent
  is answered; its first request is ``requests[first]`` of the job; an open loop's schedule begins at
  ``start`` (a ``time.monotonic()`` instant, the same clock in every process), so that the client
  processes' schedules interleave as planned;
- ``("quit",)``, or its standard input closing (the parent died), ends it at once, even mid-run (the
  parent was interrupted). Ctrl-C and SIGTERM are the parent's to handle: the process ignores them.

Each of the ``concurrency`` users sends a request, waits for its answer and sends the next: a
closed loop, so the load follows the server's pace and the queue never grows without bound. With a
``rate``, requests are due on a schedule instead (an open loop, as traffic from many independent users
arrives): evenly spaced, or with the exponential gaps of a Poisson process, whatever the server's
pace. Each goes out on a free connection, at most ``concurrency`` of them open; a request that finds
every one busy waits for the first to come free. Its latency counts from when it was due, not from
when it went out, so a server that falls behind shows it in the latencies rather than slowing the
load down (which a closed loop does, and which hides the wait from its latencies: "coordinated
omission"); only the first millisecond of the client's own timer's lateness is left out (uvloop's
timers are that coarse). Requests still waiting when a timed run ends are not sent, and are counted
as ``unsent``, with the wait each had until then (``unsent_waits``: counts by whole milliseconds,
rounded down), which the parent takes as a lower bound of its latency. The tally's ``backlog`` is
the requests due that had no answer yet halfway through the schedule and as it ended (those unsent
among them): a server that keeps up holds about as many at both, one that falls behind holds more
and more. Its ``last_answer`` is when the last answer (of any status) came, ``silent_since`` when the
first request after it that got no answer failed and ``silent_sent`` when that request was sent (or
due), and ``silent`` how many have failed since (``time.monotonic()`` instants, as is ``began``, the
run's start): a server gone mid-run, or hung (whose requests fail a timeout after they went out).

Nothing is encoded during the run: each request (head and body) is made once, as bytes. The job's
requests are sent in turn, whichever user sends next, so a run of ``n`` requests sends each of ``k``
bodies ``n / k`` times, give or take one.

A tally's ``texts`` says what went wrong, once for each kind: for each error status, the first such
answer's body as one printable line (:func:`answer_text`; easyserve's ``{"error": message}`` as its
message), and for each kind of request with no answer, the first one's exception. A success costs
nothing for it: the parser is given no body callback (httptools would copy every body for one); a
connection keeps the bytes read in which its answer began, and an error answer's body is read back
from them, for the first of its status only.
"""

from __future__ import annotations

import array
import asyncio
import collections
import itertools
import json
import math
import os
import pickle
import random
import signal
import struct
import ssl
import sys
import threading
import time
import urllib.parse
from typing import Any, BinaryIO, Callable, Iterator

import httptools

LENGTH = struct.Struct("!Q")
# how a client process is started: not ``-m easyserve.loadgen``, since importing the package imports
# this module first, and runpy would warn on every start that it runs a module imported already
# less the current folder, which -c puts first on the path (see children.module_command)
COMMAND = [sys.executable, "-c", "import sys\nif sys.path[:1] == ['']: del sys.path[0]\n"
           "from easyserve.loadgen import main\nmain()"]
PROGRESS_S = 0.25  # how often the parent hears how far a measurement is
RETRY_PAUSE_S = 0.01  # a closed loop's pause after a failed connection: a server that is down is not hammered
FAILED_ENOUGH = 3  # failed requests, and no success, after which a warm-up stops (every body tried): nothing to measure
PASSING = (408, 429)  # a client's statuses that a load, not the request, brings about
SAMPLE_CHARS = 300  # of what the server said in an error answer, kept at most
SAMPLE_BYTES = 4096  # of an error answer's body, read for its text at most
HEAD_BYTES = 64 * 1024  # of an answer's status line and headers, read at most (as http.client's bound on a line)
TIMER_SLACK_S = 0.001  # the lateness of an open loop's timer that is not counted in latencies: its rounding
ARRIVALS = ("constant", "poisson")  # how an open loop spaces its requests
# An open loop's schedule is kept in Python, a few microseconds a request: past this rate it cannot
# keep up with itself, and --rate 1e8 held the loop 35 s and 800 MB of due times for 20 requests
MAX_RATE = 200_000
CATCH_UP_TURN = 64  # requests due in a row, behind the clock, after which the senders get a turn
MAX_WAITING = 1_000_000  # requests due that wait for a connection, past which the next ones count as unsent


def arrival_gaps(rate: float, arrivals: str, rng: random.Random | None = None) -> Iterator[float]:
    """Seconds between one request's due time and the next at ``rate`` requests per second: all
    ``1 / rate`` (``constant``), or drawn from the exponential distribution of that mean (``poisson``:
    independent arrivals, bursts and lulls included)."""
    try:
        value = float(rate) if not isinstance(rate, (bool, str, bytes)) else math.nan
    except (TypeError, ValueError):
        value = math.nan
    if not 0 < value < math.inf:
        raise ValueError(f"rate: expected a number of requests per second above 0, got {rate!r}")
    if value > MAX_RATE:
        raise ValueError(f"rate: at most {MAX_RATE:,} requests per second (each is scheduled in Python), got {rate!r}")
    rate = value
    if arrivals == "constant":
        return itertools.repeat(1.0 / rate)
    if arrivals == "poisson":
        draw = (rng or random.Random()).expovariate
        return (draw(rate) for _ in itertools.repeat(None))
    raise ValueError(f"arrivals: expected one of {', '.join(ARRIVALS)}, got {arrivals!r}")


def write(stream: BinaryIO, message: Any) -> None:
    """One frame: the pickle's length, then the pickle."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(LENGTH.pack(len(data)) + data)
    stream.flush()


def read(stream: BinaryIO) -> Any:
    """The next frame's value; ``EOFError`` when the stream has ended."""
    head = stream.read(LENGTH.size)
    if len(head) < LENGTH.size:
        raise EOFError
    size = LENGTH.unpack(head)[0]
    data = stream.read(size)
    if len(data) < size:
        raise EOFError
    return pickle.loads(data)


def answer_text(opening: bytes) -> str:
    """What the server said in the answer that begins in ``opening`` (the bytes read with its head, maybe
    after interim answers, and for an error those read after it): the start of its body as one printable
    line, at most :data:`SAMPLE_CHARS`;
    easyserve's ``{"error": message}`` (and the Open Inference Protocol's) as its message."""
    body = _Body()
    try:
        body.parser.feed_data(opening)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        pass  # what it read before is what there is
    return body_text(bytes(body.data))


def body_text(data: bytes) -> str:
    """An answer's body as one printable line, at most :data:`SAMPLE_CHARS`; ``{"error": message}`` as
    its message."""
    text = data[:SAMPLE_BYTES].decode("utf-8", "replace")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # not JSON, or cut short
        value = None
    if isinstance(value, dict) and isinstance(value.get("error"), str):
        text = value["error"]
    return one_line(text)


def one_line(text: str, most: int = SAMPLE_CHARS) -> str:
    """``text`` as one line of printable characters (a terminal's escapes, line breaks as spaces), cut short."""
    line = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return line if len(line) <= most else line[:most - 3] + "..."


class _Body:
    """The start of the body of the first final (not interim) answer fed to ``parser``."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.data = bytearray()
        self.done = False

    def on_body(self, body: bytes) -> None:
        if not self.done and len(self.data) < SAMPLE_BYTES:
            self.data += body[:SAMPLE_BYTES - len(self.data)]

    def on_message_complete(self) -> None:
        self.done = self.done or self.parser.get_status_code() >= 200


class Disconnected(ConnectionError):
    """The server closed the connection before its answer was whole."""


class BadAnswer(ConnectionError):
    """What came back is not HTTP/1.1 (the parser's complaint), or is an answer no request asked for."""


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection with at most one request on it at a time, as ``wrk`` holds
    them. A request goes out ready-made in one write; the answer is parsed (``httptools``, llhttp) for
    its status and its end, and its body is not kept. A few callbacks per request, where a general
    client builds request and response objects, header maps and timers: on a machine the server
    shares, the load generator should take as little of the cores as it can.

    Interim answers (``103 Early Hints``, ``100 Continue``) are skipped: the answer follows them. An
    answer with neither ``Content-Length`` nor ``Transfer-Encoding`` ends when the connection does
    (HTTP/1.0's way). Bytes that come when no request waits (a second answer to one request) are no
    request's answer: ``unasked`` hears of them, and the connection is dropped, since what comes on it
    next could not be told apart from the next request's answer."""

    def __init__(self, unasked: Callable[[], None] | None = None) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.answer: asyncio.Future | None = None
        self.unasked = unasked
        self.stray = False  # an answer began after the one asked for, in the same bytes
        self.told = False  # unasked heard of this connection's stray answer: once is enough
        self.head_whole = False  # the current answer's status line and headers are in
        self.framed = False  # its body's end is given (Content-Length, chunked), not the connection's close
        self.data = b""  # the bytes read last
        self.opening = b""  # those in which the current answer began, and an error's later ones: its body
        self.sampling = False  # the current answer is an error: its later reads join the opening, up to a sample
        self.head_read = 0  # bytes read of the current answer's head that is not whole yet

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def exchange(self, request: bytes, timeout_s: float) -> asyncio.Future:
        """Send ``request``; the future's value is the answer's status, or it fails (``Disconnected``,
        ``BadAnswer``, ``TimeoutError``, which also closes the connection)."""
        loop = asyncio.get_running_loop()
        self.answer = answer = loop.create_future()
        timer = loop.call_later(timeout_s, self._fail, TimeoutError())
        answer.add_done_callback(lambda _: timer.cancel())
        try:
            self.transport.write(request)  # on a connection closing meanwhile: connection_lost fails the answer
        except RuntimeError as exc:  # uvloop's, for a transport already closed (reset as it was accepted)
            self._fail(Disconnected(str(exc)))
        return answer

    @property
    def usable(self) -> bool:
        """Open for the next request: neither side has closed it or begun to, and the last answer did
        not ask for it to be closed."""
        return self.transport is not None and not self.transport.is_closing()

    def data_received(self, data: bytes) -> None:
        self.data = data  # a reference: nothing is copied
        if self.sampling:  # an error's body that came after its head: read back for what it said
            self.opening += data[:SAMPLE_BYTES]
            self.sampling = len(self.opening) < SAMPLE_BYTES + 4096  # its head, and the sample's bytes
        if not self._waiting():
            self._unasked()
            return
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._fail(BadAnswer(str(exc) or "the server switched protocols"))
            return
        if self.stray:  # an answer began after this one's end, in the same bytes
            self.stray = False
            self._unasked()
        elif not self.head_whole and self._waiting():
            # httptools joins a header's pieces as they come, with no bound of its own: an endless
            # header took 400 MB and a core for the whole timeout
            self.head_read += len(data)
            if self.head_read > HEAD_BYTES:
                self._fail(BadAnswer(f"an answer's head longer than {HEAD_BYTES // 1024} kB"))

    def _waiting(self) -> bool:
        return self.answer is not None and not self.answer.done()

    def on_message_begin(self) -> None:
        self.head_whole = self.framed = False
        self.sampling = True  # until its status is known: a head that comes in two reads is read whole
        self.opening = self.data
        if not self._waiting():
            self.stray = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.head_whole, self.head_read = True, 0
        self.sampling = self.parser.get_status_code() >= 400

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            return  # an interim answer: the request's own follows on the same connection
        self._answered(status)
        if not self.parser.should_keep_alive():
            self.close()  # e.g. a draining server's 503 with "Connection: close": the next request reconnects

    def _answered(self, status: int) -> None:
        answer, self.answer = self.answer, None
        if answer is not None and not answer.done():
            answer.set_result(status)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._waiting() and self.head_whole and not self.framed:
            status = self.parser.get_status_code()
            if status >= 200:  # a body that ends with the connection (HTTP/1.0): the close is its end
                self._answered(status)
                return
        self._fail(Disconnected(str(exc) if exc else "the server closed the connection"))

    def _unasked(self) -> None:
        if self.unasked is not None and not self.told:
            self.told = True
            self.unasked()
        self.close()

    def _fail(self, exc: BaseException) -> None:
        self.close()
        answer, self.answer = self.answer, None
        if answer is not None and not answer.done():
            answer.set_exception(exc)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()  # nothing of ours is left to write that the server still wants


class Target:
    """Where the requests go, and each of them as the bytes to send."""

    def __init__(self, url: str, requests: list[tuple[bytes, dict[str, str]]]) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        host = parts.netloc.rpartition("@")[2]  # never a user name and password, should the URL hold them
        head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: easyserve-bench\r\n"
        self.requests = [self._encode(head, body, headers) for body, headers in requests]

    @staticmethod
    def _encode(head: str, body: bytes, headers: dict[str, str]) -> bytes:
        lines = [head]
        for name, value in headers.items():
            if name.lower() in ("host", "content-length", "transfer-encoding"):
                continue  # this client writes those
            line = f"{name}: {value}\r\n"
            if any(c in f"{name}{value}" for c in "\r\n\0") or ":" in name or not name:
                raise ValueError(f"header {name!r}: {value!r} cannot be sent (a line break or a colon in it)")
            try:
                line.encode("latin-1")
            except UnicodeEncodeError:
                raise ValueError(f"header {name!r}: {value!r} cannot be sent (HTTP headers are Latin-1)") from None
            lines.append(line)
        lines.append(f"Content-Length: {len(body)}\r\n\r\n")
        return "".join(lines).encode("latin-1") + bytes(body)

    async def connect(self, unasked: Callable[[], None] | None = None) -> Connection:
        """A new connection; ``unasked`` is told of each answer on it that no request asked for."""
        _, connection = await asyncio.get_running_loop().create_connection(
            lambda: Connection(unasked), self.host, self.port, ssl=self.ssl)
        return connection


class Loop:
    """The load of one process: a closed loop of ``concurrency`` users, each on a connection of its
    own; or, with a ``rate``, an open loop over at most ``concurrency`` connections."""

    def __init__(self, job: dict, report: Any) -> None:
        self.target = Target(job["url"], job["requests"])
        self.concurrency = job["concurrency"]
        self.timeout_s = job["timeout_s"]
        self.rate: float | None = job.get("rate")  # requests per second: an open loop
        self.arrivals: str = job.get("arrivals", "constant")
        self.phase: float = job.get("phase", 0.0)  # of a mean gap, before the first request: processes interleave
        self.seed: str | None = job.get("seed")  # Poisson gaps drawn alike in every run given it
        self.report = report  # sends a message to the parent
        self.connections: list[Connection | None] = [None] * self.concurrency
        # a warm-up gives up only once each of the bodies, sent in turn, has failed: a list whose first
        # few the server refuses may hold one further on that it takes
        self.give_up = max(FAILED_ENOUGH, len(self.target.requests))

    async def run(self, seconds: float | None, tickets: int | None, progress: bool, first: int = 0,
                  start: float | None = None, probe: bool = False) -> dict:
        """Run until ``seconds`` have passed or ``tickets`` requests are sent, whichever comes first,
        the job's requests in turn from ``requests[first]``; return what was measured once every
        request sent has its answer. An open loop's schedule begins at ``start`` (``time.monotonic()``).
        ``probe`` (a warm-up): stop as soon as the connections are seen to be refused."""
        self.probe = probe
        self.latencies = array.array("d")  # seconds, of successful (2xx) answers
        self.statuses: collections.Counter = collections.Counter()
        self.failures: collections.Counter = collections.Counter()  # no HTTP answer, by exception
        self.texts: dict[int | str, str] = {}  # what the first error of each status, of each failed kind, said
        self.answered = self.errors = self.unsent = self.due = 0
        self.unsent_waits: dict[int, int] = {}  # ms from when each unsent request was due to the run's end: counts
        self.lasting = 0  # failures that every request would meet (see _failed)
        self.strays = 0  # answers no request asked for (among failures, as BadAnswer, not among requests)
        self.backlog = [0, 0]  # requests due and unanswered: halfway through the schedule, at its end
        # when (time.perf_counter()) the last answer came, and the first request since then that got none, and how
        # many have since: a server gone mid-run leaves failures to the end, which the parent tells apart
        self.last_answer: float | None = None
        self.silent_since: float | None = None
        self.silent_sent: float | None = None
        self.silent = 0
        self.turn = first
        self.left = math.inf if tickets is None else tickets  # requests still to send
        begin = time.perf_counter()
        if self.rate is not None and start is not None:
            # the common start, even one already past (a client slow to get its command catches up,
            # its requests' latencies counting from when they were due)
            begin += start - time.monotonic()
        end = math.inf if seconds is None else begin + seconds

        async def tell() -> None:
            while True:
                await asyncio.sleep(PROGRESS_S)
                self.report(("progress", self.answered, self.errors))

        teller = asyncio.ensure_future(tell()) if progress else None
        cpu = time.process_time()
        try:
            if self.rate is None:
                await asyncio.gather(*(self._user(i, end) for i in range(self.concurrency)))
            else:
                await self._paced(begin, end)
        finally:
            if teller is not None:
                teller.cancel()
        # as time.monotonic() instants, which every process shares, to be set side by side with the others'
        shift = time.monotonic() - time.perf_counter()
        return {"latencies": self.latencies.tobytes(), "statuses": dict(self.statuses),
                "failures": dict(self.failures), "texts": self.texts, "unsent": self.unsent,
                "unsent_waits": self.unsent_waits, "backlog": self.backlog,
                "strays": self.strays, "seconds": time.perf_counter() - begin, "cpu_s": time.process_time() - cpu,
                "began": begin + shift, "last_answer": None if self.last_answer is None else self.last_answer + shift,
                "silent_since": None if self.silent_since is None else self.silent_since + shift,
                "silent_sent": None if self.silent_sent is None else self.silent_sent + shift,
                "silent": self.silent}

    async def _user(self, index: int, end: float) -> None:
        """One user of the closed loop: a request, its answer, the next, until ``end`` or until the
        requests to send run out."""
        while self.left > 0 and time.perf_counter() < end:
            self.left -= 1
            if not await self._exchange(index, time.perf_counter()):
                await asyncio.sleep(RETRY_PAUSE_S)

    async def _paced(self, begin: float, end: float) -> None:
        """The open loop: requests due on the schedule, each sent on a free connection (opened when
        none is and fewer than ``concurrency`` are), waiting for one otherwise. A timed run lasts
        until ``end`` whatever the rate; what then still waits for a connection is not sent."""
        loop = asyncio.get_running_loop()
        waiting: collections.deque[float] = collections.deque()  # since when each request has waited for a connection
        idle: list[asyncio.Future] = []  # connections' senders waiting for a request
        senders: list[asyncio.Task] = []
        done = False

        async def sender(index: int) -> None:
            while True:
                if waiting:
                    await self._exchange(index, waiting.popleft())
                elif done:
                    return
                else:
                    wake = loop.create_future()
                    idle.append(wake)
                    await wake

        gaps = arrival_gaps(self.rate, self.arrivals, None if self.seed is None else random.Random(self.seed))
        # the gaps add up from the schedule's start, not on the clock's reading: a clock far from its zero
        # (a machine up a day) rounds each step, and 300 steps of 1/300 s ended short of 1 s, one too many
        offset, span = self.phase / self.rate, end - begin
        # halfway: through the time of a timed run, through the requests of a counted one
        halfway, half = (begin + span / 2, math.inf) if end != math.inf else (math.inf, self.left / 2)
        behind = 0  # requests due in a row that the clock had passed
        # requests never sent, by when they were due (ms from the start, rounded up): counts, not a due
        # time each, so that a million unsent past MAX_WAITING take no more memory than its span in ms
        never: collections.Counter = collections.Counter()
        while self.left > 0 and offset < span - 1e-9:  # (a sum of gaps that should land on the end may fall short)
            at = begin + offset
            now = time.perf_counter()
            if at > now:
                behind = 0
                await asyncio.sleep(at - now)
                now = time.perf_counter()
            else:  # catching up: the senders never ran meanwhile, and every request was counted unsent
                behind += 1
                if behind % CATCH_UP_TURN == 0:
                    await asyncio.sleep(0)
                    now = time.perf_counter()
            if at >= halfway or self.due >= half:
                self.backlog[0] = self.due - self.answered
                halfway = half = math.inf
            self.due += 1
            self.left -= 1
            if len(waiting) >= MAX_WAITING:  # a server that answers nothing for minutes: memory stays bounded
                self.unsent += 1
                never[math.ceil(offset * 1000)] += 1
                offset += next(gaps)
                continue
            # its latency runs from when it was due, less the timer's rounding: a client that wakes
            # late (starved of the CPU) or catches up in a burst does not hide its lateness
            waiting.append(at + min(now - at, TIMER_SLACK_S))
            if idle:
                idle.pop().set_result(None)
            elif len(senders) < self.concurrency:
                senders.append(asyncio.ensure_future(sender(len(senders))))
            offset += next(gaps)
        done = True
        if end != math.inf and self.left > 0:  # a timed run, not a probe stopped early: what still finds no
            # connection at its end was never sent (at least one turn of the loop: senders just woken or
            # started take their requests first)
            await asyncio.sleep(max(0.0, end - time.perf_counter()))
            self.unsent += len(waiting)
            never.update(math.ceil((since - begin) * 1000) for since in waiting)
            waiting.clear()
        # each unsent request waited at least from when it was due to now (both rounded to make it no more)
        ended = math.floor((time.perf_counter() - begin) * 1000)
        waits: collections.Counter = collections.Counter()
        for due, n in never.items():
            waits[max(0, ended - due)] += n
        self.unsent_waits = dict(waits)
        self.backlog[1] = self.due - self.answered  # as the schedule ends, the unsent included
        for wake in idle:
            wake.set_result(None)
        await asyncio.gather(*senders)

    async def _exchange(self, index: int, since: float) -> bool:
        """Send the next request in turn on connection ``index`` (connecting first when it is not
        open), and count its answer; its latency runs from ``since``. False: no answer came."""
        request = self.target.requests[self.turn % len(self.target.requests)]
        self.turn += 1
        try:
            connection = self.connections[index]
            if connection is None or not connection.usable:
                connection = self.connections[index] = await asyncio.wait_for(
                    self.target.connect(self._unasked), self.timeout_s)
            status = await connection.exchange(request, self.timeout_s)
        except (OSError, asyncio.TimeoutError) as exc:
            kind = type(exc).__name__
            self.failures[kind] += 1
            if kind not in self.texts:
                self.texts[kind] = one_line(str(exc) or f"no answer within {self.timeout_s:g} s")
            self.answered += 1
            if self.silent_since is None:
                self.silent_since, self.silent_sent = time.perf_counter(), since
            self.silent += 1
            self._failed(lasting=True)
            return False
        now = time.perf_counter()
        took = now - since
        self.last_answer, self.silent_since, self.silent = now, None, 0
        self.answered += 1
        self.statuses[status] += 1
        if 200 <= status < 300:
            self.latencies.append(took)
        else:
            if status not in self.texts:
                self.texts[status] = answer_text(connection.opening)
            self._failed(lasting=400 <= status < 500 and status not in PASSING)
        return True

    def _failed(self, lasting: bool) -> None:
        """One more request failed; ``lasting``: in a way every request will (no answer, or the client's
        mistake), not a load's (a 429, a 503 while the model loads, a 504), which the first answers of a
        busy server may all be."""
        self.errors += 1
        self.lasting += lasting
        if self.probe and self.lasting >= self.give_up and not self.latencies:
            self.left = 0  # nothing but failures: the warm-up sends no more, and the parent says why

    def _unasked(self) -> None:
        self.failures["BadAnswer"] += 1
        self.errors += 1
        self.strays += 1

    def close(self) -> None:
        for connection in self.connections:
            if connection is not None:
                connection.close()


async def serve(job: dict, commands: asyncio.Queue, report: Any) -> None:
    """Answer the parent's commands until ``quit``."""
    loop = Loop(job, report)
    report(("ready",))
    try:
        while True:
            command = await commands.get()
            if command[0] == "warmup":
                report(("warm", await loop.run(command[1], None, progress=False, probe=True)))
            elif command[0] == "measure":
                report(("done", await loop.run(command[1], command[2], progress=True, first=command[3],
                                               start=command[4])))
            else:
                return
    finally:
        loop.close()


def main() -> None:
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    # Ctrl-C reaches the whole group, as does the SIGTERM of timeout or a cancelled CI job: the parent ends this
    # one (and were it gone, the end of standard input would), having kept what was measured
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    sys.stdout = sys.stderr  # a stray print() must not corrupt the frames
    job = read(stdin)
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    commands: asyncio.Queue = asyncio.Queue()

    def listen() -> None:
        while True:
            try:
                command = read(stdin)
            except (EOFError, OSError):
                os._exit(0)  # the parent has gone: nobody wants the results
            if command[0] == "quit":
                os._exit(0)  # even mid-run: the parent was interrupted, or has what it asked for
            loop.call_soon_threadsafe(commands.put_nowait, command)

    threading.Thread(target=listen, name="commands", daemon=True).start()
    loop.run_until_complete(serve(job, commands, lambda message: write(stdout, message)))
    loop.close()
    # not a normal exit: the thread above is blocked reading standard input, and the interpreter's
    # shutdown would wait for its lock on that stream and abort ("could not acquire lock")
    os._exit(0)


if __name__ == "__main__":
    main()
