"""Defences against slow, greedy or hostile clients, beneath the routes of :mod:`easyserve.http`.

- :class:`GuardedRunner` serves connections that close a client too slow to send its headers
  (``HeaderTimeoutS``), fail a body that stalls (``BodyTimeoutS``, 408), answer malformed HTTP with a
  JSON 400 and no traceback in the log, and name the server plain ``easyserve``. At a stop, it lets
  bodies still arriving arrive, and keeps a connection answered a moment ago open for the request
  its client may already have sent: each gets an answer. Near the open-file limit, past which new
  connections are closed unanswered, it says so in the log.
- :class:`Inflater` inflates ``gzip``/``deflate`` bodies up to ``MaxBodyMB``, off the event loop.

The bytes bodies may hold together are bounded in :mod:`easyserve.budget`, and what browsers may ask
in :mod:`easyserve.browsers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import math
import re
import select
import socket
import struct
import sys
import zlib
from typing import Any, Callable

from aiohttp import web, web_protocol
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.http_parser import HttpRequestParserPy
from aiohttp.web_protocol import RequestHandler

try:  # the kernel's queues of a socket (see _socket_queue); not on Windows
    import fcntl
    import termios
except ImportError:  # pragma: no cover
    fcntl = termios = None  # type: ignore[assignment]

from .children import keep_from_forks, release_to_forks
from .errors import BadRequest, NotReady, PayloadTooLarge, RequestTimeout, UnsupportedMediaType, megabytes
from .ports import SYN_RECV, tcp_sockets
from .runtime import RECHECK_S, OpenFilesWatch, held_for

__all__ = ["SERVER_NAME", "GuardedRunner", "answer_begins", "client_ended", "stop_listening", "Inflater",
           "content_coding"]

log = logging.getLogger("easyserve")

# The Server header: no versions for a scanner to match against a list of known bugs.
SERVER_NAME = "easyserve"
# A request's line and headers together, at most. aiohttp bounds each line (8,190 bytes) and their count
# (128), not their sum: 1,000 connections each sending 800 kB of headers they never finished held
# 1.6 GB until HeaderTimeoutS, counted by no limit. nginx takes 33 kB by default, Node.js 16 kB. (Head
# bytes that come in the read that ends a body are not counted: the bound is this and one read.)
MAX_HEAD_BYTES = 64 * 1024
HEAD_TOO_LARGE = f"the request's headers are longer than {MAX_HEAD_BYTES} bytes in all"  # the 431's error

# At a stop, how long after its last answer a kept-alive connection stays open for one more request.
LINGER_S = 0.5
# Connections the kernel holds for a listening socket until its process accepts them (capped at the
# kernel's net.core.somaxconn, 4,096 by default since Linux 5.4). aiohttp's 128 dropped the rest of a
# burst, which their clients sent again only 1 s, then 3 s, later: 1,024 clients connecting at once to
# an Echo server saw a p99 of 1.9-2.3 s where the server's queue held each 0.16 s (0.48-0.88 s with this).
LISTEN_BACKLOG = 2048
# A body's bytes must come at this rate at least, over each stretch of BodyTimeoutS or more (or its rest come,
# if less): a client sending a byte now and then, never pausing for BodyTimeoutS, held its connection (and
# the body's bytes against MaxBufferedMB) for as long as it liked, and a few hundred such held every
# descriptor the server had. Apache's mod_reqtimeout asks 500 bytes a second by default too.
MIN_BODY_RATE = 500
SLOW_GRACE_S = 1.0  # a connection's answer waiting this long at least may be cut for the slow-reader budget
SEND_LOOK_S = 1.0  # how often a paused answer's send queue is looked at (a quarter of BodyTimeoutS, if less)
LINGER_POLL_S = 0.02


# -- connections ------------------------------------------------------------------------------------


# Stopping listening: the connections that reached the socket just before (in its accept queue, or
# completing their handshake) are waited for until all are accepted, for 0.9 s at most. A new
# connection that comes meanwhile has its SYN dropped: its client sends it again a second later, and
# is refused then (the wait ends before that second does, or the SYN would be dropped once more).
QUEUED_MAX_S = 0.9
QUEUED_POLL_S = 0.002

# A classic BPF socket filter that drops TCP segments with SYN set and lets every other through: (code,
# jt, jf, k) for "load the byte at offset 13 of the TCP header (its flags); if SYN, drop; else keep".
_REFUSE_SYN = [(0x30, 0, 0, 13), (0x45, 0, 1, 0x02), (0x06, 0, 0, 0), (0x06, 0, 0, 0xFFFFFFFF)]
_SO_ATTACH_FILTER = 26  # Linux
_TCP_INFO_QUEUED = struct.Struct("8xIIIII")  # tcp_info up to tcpi_unacked: a listener's accept queue


async def stop_listening(site: web.BaseSite) -> None:
    """Stop ``site`` listening, without cutting the connections that reached it just before.

    Closing a listening socket resets the connections in its accept queue, whose clients may have
    sent a request already: from where they stand it was sent and never answered, where it should
    have been refused. So the socket first stops taking new connections (a socket filter drops
    their SYNs; a client sends its SYN again a second later, and is refused then, or reaches another
    front), the connections already queued, or completing their handshake, are accepted and
    answered as any other, and only then does the socket close. Where the filter cannot be set (not
    Linux), it closes at once, as before."""
    server = getattr(site, "_server", None)  # aiohttp's asyncio.Server, once the site has started
    sockets = list(server.sockets) if server is not None and server.is_serving() else []
    if sockets and all(_refuse_new_connections(sock) for sock in sockets):
        loop = asyncio.get_running_loop()
        ports = {sock.getsockname()[1] for sock in sockets}
        begun = loop.time()
        while loop.time() < begun + QUEUED_MAX_S:
            await asyncio.sleep(QUEUED_POLL_S)  # the loop accepts what is queued meanwhile
            if not any(_queued(sock) for sock in sockets) and not _handshakes_under_way(ports):
                break
    for sock in sockets:
        release_to_forks(sock.fileno())
    await site.stop()


def _refuse_new_connections(sock: Any) -> bool:
    if sys.platform != "linux" or sock.type != socket.SOCK_STREAM:
        return False
    program = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *op) for op in _REFUSE_SYN))
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER,
                        struct.pack("HL", len(_REFUSE_SYN), ctypes.addressof(program)))
    except OSError as exc:
        log.debug("could not filter new connections out of %s: %s", sock, exc)
        return False
    return True


def _handshakes_under_way(ports: set[int]) -> bool:
    """Whether a connection to one of ``ports`` has sent its SYN and not yet finished its handshake
    (``SYN_RECV``, state 03 in ``/proc/net/tcp``): its client may be sending its request already,
    and closing the socket now would reset it. ``False`` where there is no ``/proc``."""
    return any(state == SYN_RECV and own in ports for own, state, _ in tcp_sockets())


def _queued(sock: Any) -> int:
    """Connections in a listening socket's accept queue (0 if it cannot tell)."""
    try:
        return _TCP_INFO_QUEUED.unpack(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO,
                                                       _TCP_INFO_QUEUED.size))[4]
    except (OSError, struct.error):
        return 0


class GuardedRunner(web.AppRunner):
    """An :class:`aiohttp.web.AppRunner` whose connections are :class:`_GuardedHandler`; the app's
    ``on_response_prepare`` hook calls :func:`answer_begins`.

    ``error_response(status, message)`` builds the answer to malformed HTTP, and ``malformed()`` counts it
    (aiohttp answers it before any route, and the app's answer hooks). ``answers_budget`` bounds the
    bytes of answers waiting for slow readers (see :class:`SlowReaders`), and ``slow_reset()`` counts
    each connection reset for it; ``head_timed_out()`` counts each connection closed for
    ``header_timeout``. Other keyword arguments go
    to aiohttp (``keepalive_timeout``, ``auto_decompress``...).
    """

    def __init__(self, app: web.Application, *, header_timeout: float, body_timeout: float,
                 error_response: Callable[[int, str], web.StreamResponse],
                 malformed: Callable[[], None] = lambda: None, answers_budget: float = math.inf,
                 slow_reset: Callable[[], None] = lambda: None, head_timed_out: Callable[[], None] = lambda: None,
                 **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.slow_readers = SlowReaders(answers_budget, slow_reset)
        self._guard = {"header_timeout": header_timeout, "body_timeout": body_timeout,
                       "error_response": error_response, "malformed": malformed, "slow": self.slow_readers,
                       "head_timed_out": head_timed_out}
        self._files = OpenFilesWatch(lambda: len(self.server.connections) if self.server is not None else 0)

    async def setup(self) -> None:
        await super().setup()
        self._files.start()

    async def _make_server(self) -> web.Server:
        # aiohttp offers no setting for the protocol class; build the same web.Server it would
        # (after it has started and frozen the app), but one that makes guarded handlers.
        plain = await super()._make_server()
        return _GuardedServer(plain.request_handler, request_factory=plain.request_factory, guard=self._guard,
                              **self._kwargs)

    async def close_idle(self, linger: float = LINGER_S) -> None:
        """As a drain begins: close each kept-alive connection that waits for its next request and has
        been quiet for ``linger`` seconds, now and once more ``linger`` later (one answered just
        before). Left open to the drain's end, such a connection's next request got 503, and a
        client that talks to the server directly (a Kubernetes Service, ``docker run``) lost it: closed,
        its client's next request goes out on a new connection, to a server that is ready. Connections
        in a request are closed by their answer (``Connection: close`` while stopping)."""
        loop = asyncio.get_running_loop()
        for wait in (0.0, linger + LINGER_POLL_S):
            await asyncio.sleep(wait)
            quiet_since = loop.time() - linger
            for connection in list(self.server.connections if self.server is not None else ()):
                connection.close_if_idle(quiet_since)

    async def cleanup(self, linger: float = LINGER_S, grace: float = 0.0,
                      hurry: Callable[[], bool] = lambda: False) -> None:
        """Stop listening, then close every connection, as aiohttp does. But first, for ``grace``
        seconds at most, let each body still arriving arrive, and for ``linger`` seconds at most, keep
        open each connection active (opened, read from or answering) in the last ``linger`` seconds.

        A request whose body is arriving gets its answer (503 while stopping) once the body is in. One
        still arriving after ``grace`` gets its 503 then, without the rest of its body. aiohttp would
        close the connection under either, and the request would be lost: sent, never answered.

        A client that got a kept-alive answer just before the stop may send its next request on that
        connection at any moment. Lingering, that request is answered too, with ``Connection: close``,
        so the client's next connection goes elsewhere. A connection idle longer is closed at once: its
        client is not in the middle of a stream of requests, and will see the close before it next
        uses the connection. A client that keeps sending headers a byte at a time keeps its
        connection active, but does not hold the stop up past ``linger``. Once ``hurry()`` (a second
        signal: stop now), bodies still arriving get their 503 at once."""
        self._files.stop()
        for site in list(self.sites):
            await stop_listening(site)
        loop = asyncio.get_running_loop()
        begun = loop.time()

        def waited_for(connection: _GuardedHandler) -> bool:
            now = loop.time()
            if connection.transport is None:
                return False
            if connection.receiving:
                return now < begun + grace
            return now < begun + linger and connection.active > now - linger

        while self.server is not None and not hurry() and any(waited_for(c) for c in self.server.connections):
            await asyncio.sleep(LINGER_POLL_S)  # an answer while stopping closes its connection
        if self.server is not None:
            for connection in self.server.connections:
                connection.refuse_body(NotReady("server is shutting down", retry_after=1.0))
        await super().cleanup()


def answer_begins(request: web.BaseRequest, response: web.StreamResponse | None = None) -> None:
    """An answer to ``request`` is about to be written: its connection is active, and its body, if still
    arriving, no longer awaited. The app's ``on_response_prepare`` hook calls this for every answer of
    its own (aiohttp's own, to malformed HTTP, closes its connection).

    Marked as the answer begins, not once written: wrapping aiohttp's ``finish_response`` for the
    latter cost 5% of the server's time answering a no-op handle. An answer written at once ends in
    the same turn of the loop; a larger one after the last time the socket took more
    (:meth:`_GuardedHandler.resume_writing`)."""
    protocol = request.protocol
    if type(protocol) is _GuardedHandler:
        protocol.answering(request, response)


class SlowReaders:
    """The connections of one front whose answers wait for a client that takes them slower than they
    are sent, and the bytes they hold together (each answer whole, as the handler holds it until it is
    written, and what the transport's buffer holds of it): at most ``limit``.

    A stalled client is cut after BodyTimeoutS (:meth:`_GuardedHandler._check_sending`), but one that
    takes a little now and then never was: 64 kB every 5 s kept a 15 MB answer (held twice: in the
    handler and the transport) for 20 minutes, and 20 such connections held 700 MB. Past ``limit``
    (MaxBufferedMB, shared by the fronts), the connection taking its answer slowest, of those whose
    writing has waited ``SLOW_GRACE_S`` past the first look at its send queue, is reset, and so on until
    the rest fit: the one that has taken nothing for longest (in whole seconds), and of those the
    slowest since its writing paused. Ranked by that rate alone, a client that read nothing looked
    faster than one reading 20 kB/s for seconds: its kernel took a receive window's worth at once. An
    answer larger than the limit by itself is not counted, and so never cut for it. Counting the answers in
    MaxBufferedMB itself, as request bodies are, was tried: one slow reader of a 48 MB answer made
    every request 429. Here only slow readers pay, and only once together they hold too much."""

    def __init__(self, limit: float, counted: Callable[[], None] = lambda: None) -> None:
        self.limit = limit
        self.counted = counted  # told of each reset (/stats' slow_readers_reset)
        self.waiting: set[_GuardedHandler] = set()
        self._timer: asyncio.TimerHandle | None = None  # a trim due once the first to wait is ripe

    def add(self, handler: _GuardedHandler) -> None:
        self.waiting.add(handler)
        self.trim()

    def discard(self, handler: _GuardedHandler) -> None:
        self.waiting.discard(handler)

    def _on_timer(self) -> None:
        self._timer = None
        self.trim()

    def trim(self) -> None:
        held = {}
        for h in self.waiting:
            if h.transport is not None:
                size = h.answer_bytes + h.transport.get_write_buffer_size()
                if size <= self.limit:  # one larger by itself is let be
                    held[h] = size
        total = sum(held.values())
        if total <= self.limit:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        ranks = {h: h.slowness(now) for h in held if now >= h.ripe_at}
        while total > self.limit:
            if not ranks:  # all began to wait just now: look again once the first has waited long enough
                if self._timer is None:
                    self._timer = loop.call_at(min(h.ripe_at for h in held), self._on_timer)
                return
            slowest = max(ranks, key=ranks.__getitem__)
            total -= held.pop(slowest)
            stalled, rate, _ = ranks.pop(slowest)
            log.info("resetting a connection to %s: its client has taken nothing of its answer for %ds (%.0f bytes/s "
                     "since it began to wait), and the answers that slow clients hold together are past %s "
                     "(MaxBufferedMB, or this front's share of it)", slowest.transport.get_extra_info("peername"),
                     stalled, max(0.0, -rate), megabytes(int(self.limit)))
            slowest.cut_for_room = True
            slowest.reset()
            self.counted()


class _GuardedServer(web.Server):
    def __init__(self, *args: Any, guard: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._guard = guard

    def __call__(self) -> RequestHandler:
        return _GuardedHandler(self, loop=self._loop, **self._guard, **self._kwargs)


def _socket_queue(transport: asyncio.BaseTransport, request: str) -> int:
    """The bytes in a socket's kernel queue that ``termios.<request>`` reads: ``TIOCOUTQ``, those still to
    reach the peer; ``FIONREAD``, those come and not yet read. 0 where it cannot be read (not Linux, no
    socket)."""
    sock = transport.get_extra_info("socket")
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), getattr(termios, request), b"\0" * 4))[0]
    except (OSError, AttributeError, ValueError):
        return 0


# The peer ended its side of the connection, or it is reset: poll's word for it, on Linux (elsewhere 0)
_ENDED = getattr(select, "POLLRDHUP", 0)


def client_ended(request: web.BaseRequest) -> bool:
    """Whether ``request``'s client has ended its side of the connection, though the event loop may not
    have read its end yet. A request and its end of stream that arrive in one read (a client that gave up
    on a server frozen meanwhile, nginx's timeout among them) came to the handler before the loop saw
    the end: it went to an idle worker at once and ran, for no one. Asked of the socket itself, which
    a ``poll`` answers without reading anything from it (a request behind this one stays unread)."""
    transport = request.transport
    if transport is None or transport.is_closing():
        return True
    sock = transport.get_extra_info("socket")
    if not _ENDED or sock is None:
        return False
    poller = select.poll()
    try:
        poller.register(sock.fileno(), _ENDED)
    except (OSError, ValueError):  # closed meanwhile
        return True
    return bool(poller.poll(0))


class _GuardedHandler(RequestHandler):
    """One connection. aiohttp's keep-alive timer covers an idle connection, and (from the
    connection's start or the last response) headers arriving slowly; this adds a bound from a
    request's first byte to the end of its headers, and one on the pause between two body chunks.
    A client that ends its side of the connection is taken to have gone, and its requests not yet run
    are dropped: a half-close (``nc -N``) and a client that gave up (a timed-out ``urllib`` call) send
    the same end of stream, and the second is far the commoner."""

    __slots__ = ("_header_timeout", "_body_timeout", "_error_response", "_latest_body", "_last_data",
                 "_header_timer", "_body_timer", "_answered_body", "active", "_send_timer", "_unsent", "_malformed",
                 "_head_bytes", "_slow", "paused_at", "_unsent_at_pause", "taken_at", "answer_bytes", "cut_for_room",
                 "_framing_bytes", "_head_timed_out", "_keepalive_looked", "_fd", "_since", "_since_bytes",
                 "_body_length")

    def __init__(self, manager: web.Server, *, header_timeout: float, body_timeout: float,
                 error_response: Callable[[int, str], web.StreamResponse], malformed: Callable[[], None],
                 slow: SlowReaders, head_timed_out: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._head_timed_out = head_timed_out
        self._keepalive_looked = 0.0  # the keep-alive deadline put off to read first, once
        self._fd = -1  # its socket's descriptor, named to children forked meanwhile (children.keep_from_forks)
        self._slow = slow
        self.paused_at = 0.0  # when writing last paused: the client took less than was sent
        self.answer_bytes = 0  # the length of the answer being written (0: not said, as for a chunked one)
        self.cut_for_room = False  # reset by SlowReaders: its answer was given, not its client gone
        self._unsent_at_pause = 0
        self.taken_at = 0.0  # when a look at its send queue last found the client had taken more of it
        self._header_timeout = header_timeout
        self._body_timeout = body_timeout
        self._error_response = error_response
        self._malformed = malformed
        self._latest_body: Any = None  # the body stream of the last request whose headers arrived
        self._answered_body: Any = None  # the body stream of the last request answered
        self._last_data = 0.0
        self._since = 0.0  # when the body's rate was last looked at (MIN_BODY_RATE), and its bytes then
        self._since_bytes = 0
        self._body_length: int | None = None  # the Content-Length of the body being read, if it said one
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self._unsent = 0  # what was still to reach the client when the send queue was last looked at
        self._head_bytes = 0  # received of a request whose headers are not complete yet (MAX_HEAD_BYTES)
        self._framing_bytes = 0  # received of a body since its last byte of content: chunk sizes, trailers
        self.active = self._loop.time()  # when it opened, last received bytes, or last began or wrote an answer

    def data_received(self, data: bytes) -> None:
        now = self._loop.time()
        if data:
            self.active = now
        between_requests = self._latest_body is None or self._latest_body.is_eof()
        body = None if between_requests else self._latest_body
        content = body.total_bytes if body is not None else 0
        parsed = self._request_count
        super().data_received(data)
        if self._upgraded and not self._close:
            # An upgrade request (a WebSocket's; none is taken), in effect once its body is read, maybe
            # reads after its head: what came behind it, which aiohttp keeps to parse once it is
            # answered, was never measured, and 120 kB heads were served. A client may not send
            # requests behind one anyway (the connection might have changed protocol): it is answered,
            # then the connection closes.
            self.close()
        if self._request_count != parsed:  # a request's headers are complete
            self._cancel_timers()
            message = self._messages[-1][0] if self._messages else None
            if not hasattr(message, "method"):
                # The parser refused what came in a body being read (a bad chunk size): it queues its
                # refusal as a request of its own, answered once this one is. This one's body would
                # never end, and it waited for ever (no timer covered it): it ends in the refusal.
                said = " ".join(str(getattr(message, "message", message)).split())[:200]
                self.refuse_body(BadRequest(f"malformed HTTP request: {said}"))
            # every head completed, however its bytes came: one behind a request the same read completed,
            # or parsed later from aiohttp's buffer (past 32 requests queued), passed any count of reads
            self._refuse_large_heads(self._request_count - parsed)
            self._latest_body = self._messages[-1][1] if self._messages else None
            if self._latest_body is not None and not self._latest_body.is_eof():
                due = now + self._body_timeout
                self._body_timer = self._loop.call_at(due, self._check_body, due)
                self._since, self._since_bytes = now, self._latest_body.total_bytes
                length = getattr(self._messages[-1][0], "headers", {}).get("Content-Length", "")
                self._body_length = int(length) if length.isdigit() else None
            self._head_bytes = self._framing_bytes = 0
            self._last_data = now
        elif between_requests and data:
            if self._header_timer is None:
                due = now + self._header_timeout
                self._header_timer = self._loop.call_at(due, self._headers_too_slow, due)
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._head_too_large()
        elif body is not None and data:
            # A chunked body's trailer fields, after its last chunk, are headers the parser keeps (128 of
            # 8 kB) while the body is not yet done: neither the head's bound nor its timer covered them,
            # and a byte now and then held 1.9 MB a connection for ever. What comes between a body's
            # bytes of content (its chunks' sizes, and trailers) is bounded as a head is, and only
            # content keeps a body from stalling. (aiohttp's Python parser, paused by a full body, keeps
            # content it is given to feed later: there, any byte counts as the body's, as before.)
            if body.total_bytes != content or not _C_PARSER:
                self._last_data, self._framing_bytes = now, 0
            else:
                self._framing_bytes += len(data)
                if self._framing_bytes > MAX_HEAD_BYTES:
                    self.refuse_body(FramingTooLarge(f"the request's chunk sizes and trailer fields passed "
                                                     f"{MAX_HEAD_BYTES} bytes between two bytes of its body"))

    def _refuse_large_heads(self, new: int) -> None:
        """Of the ``new`` requests the last read completed, answer those whose line and headers pass
        :data:`MAX_HEAD_BYTES` with a 431 in their turn (aiohttp answers its parser's refusals so), and
        close the connection after it. A head that came whole in one read was only limited by the
        parser's buffer: 120 kB of headers at once were served."""
        queued = self._messages
        for index in range(len(queued) - new, len(queued)):
            message = queued[index][0]
            headers = getattr(message, "raw_headers", None)
            if headers is None:  # the parser's own refusal
                continue
            # "GET /path HTTP/1.1\r\n", each "Name: value\r\n", the blank line; the spaces around a value, which
            # the parser has stripped, are not kept, and not counted
            size = len(message.method) + len(message.path) + 14 + sum(len(k) + len(v) + 4 for k, v in headers)
            if size > MAX_HEAD_BYTES:
                exc = HeadTooLarge(message=HEAD_TOO_LARGE)
                queued[index] = (web_protocol._ErrInfo(status=431, exc=exc, message=exc.message), queued[index][1])

    def _head_too_large(self) -> None:
        """A request whose line and headers pass :data:`MAX_HEAD_BYTES` before they end: a 431, and the
        connection closed, before the rest is read (the parser holds what it has read of them). Behind a
        request still being answered (pipelined), no 431: the connection closes once that answer is
        written, which a 431 written at once would have taken the place of."""
        if self.transport is None or self._close or self._force_close:
            return
        log.debug("closing a connection from %s: its request's headers passed %d bytes",
                  self.transport.get_extra_info("peername"), MAX_HEAD_BYTES)
        self._malformed()
        if self._request_in_progress or self._messages:
            self.close()  # aiohttp's: no further request read, the connection closed after this answer
            return
        body = b'{"error":"%s"}' % HEAD_TOO_LARGE.encode()  # no character of it needs escaping in JSON
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\nServer: %s\r\nConnection: close\r\n\r\n%s"
                             % (len(body), SERVER_NAME.encode(), body))
        self._cancel_timers()
        self.force_close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        self._fd = sock.fileno() if sock is not None else -1
        if self._fd >= 0:
            keep_from_forks(self._fd)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._fd >= 0:  # kept from connection_made: a forced close has let go of the transport by now
            release_to_forks(self._fd)
        self._cancel_timers()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        self._slow.discard(self)
        super().connection_lost(exc)

    # An answer whose client stops reading it: the transport holds what the socket does not take, and
    # the handler the rest, for as long as the connection stays open (a 60 MB answer held for minutes,
    # eight such connections 600 MB; no timeout covered it). Past a pause of BodyTimeoutS in which
    # the client took nothing, the connection is cut, as a request body that stalls is.

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None and self.transport is not None:
            self._unsent = self._unsent_at_pause = self._bytes_unsent()
            self.paused_at = self.taken_at = self._loop.time()
            self._send_timer = self._loop.call_at(self.paused_at + self._look_every, self._check_sending)
            self._slow.add(self)

    @property
    def _look_every(self) -> float:
        return min(SEND_LOOK_S, self._body_timeout / 4)

    def _bytes_unsent(self) -> int:
        """What is still to reach the client: in the transport's buffer, and in the kernel's send queue
        (sent and not yet acknowledged, or not yet sent). The kernel's queue holds megabytes, and the
        transport's buffer moves only once it has drained by a third: looked at alone, a client reading
        25 kB/s (steadily) was cut."""
        return self.transport.get_write_buffer_size() + _socket_queue(self.transport, "TIOCOUTQ")

    def resume_writing(self) -> None:
        super().resume_writing()
        self.active = self._loop.time()  # an answer too large for the socket at once ends after the last resume
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        self._slow.discard(self)

    @property
    def ripe_at(self) -> float:
        """When its answer may be cut for the slow-reader budget (:class:`SlowReaders`): ``SLOW_GRACE_S``
        after the first look at its send queue, which finds what the client's kernel took into its
        receive window just after writing paused, reading or not."""
        return self.paused_at + self._look_every + SLOW_GRACE_S

    def slowness(self, now: float) -> tuple[int, float, float]:
        """How slowly the client takes its answer, to rank it for the slow-reader budget (the larger the
        slower): the whole seconds since it last took any, less how fast it has taken it since writing
        paused (bytes a second), and how long it has waited. One look at its send queue, now."""
        self._look(now)
        return (int((now - self.taken_at) / SLOW_GRACE_S),
                -(self._unsent_at_pause - self._unsent) / max(now - self.paused_at, 1e-3), now - self.paused_at)

    def _look(self, now: float) -> None:
        """Note whether the client has taken more of its answer since the last look (``taken_at``)."""
        unsent = self._bytes_unsent()
        if unsent < self._unsent:
            self._unsent, self.taken_at = unsent, now

    def _check_sending(self) -> None:
        # Looked at often, not once a BodyTimeoutS: just after writing pauses the client's kernel still
        # fills its receive window, and one look a pause later took that for reading (a client that read
        # nothing was cut after twice BodyTimeoutS).
        self._send_timer = None
        if self.transport is None or not self._paused:
            return
        now = self._loop.time()
        self._look(now)
        due = self.taken_at + self._body_timeout
        if now < due:
            self._send_timer = self._loop.call_at(min(now + self._look_every, due), self._check_sending)
            return
        log.debug("closing a connection to %s: its client read nothing of the answer for %gs (BodyTimeoutS)",
                  self.transport.get_extra_info("peername"), self._body_timeout)
        self.reset()

    def reset(self) -> None:
        """End the connection with a reset, not a close: a closed socket's kernel goes on sending what
        it holds (megabytes, at the pace of a client that reads nothing), and the client could not
        tell the answer was cut."""
        self._slow.discard(self)
        sock = self.transport.get_extra_info("socket")
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    @property
    def receiving(self) -> bool:
        """Whether the body of a request not yet answered is still arriving."""
        body = self._latest_body
        return (body is not None and body is not self._answered_body and not body.is_eof()
                and body.exception() is None)

    def refuse_body(self, exc: Exception) -> None:
        """The rest of the body still arriving, if any, will not be read. A request not yet answered
        gets ``exc`` as it reads; after an answer, aiohttp's reading of what is left ends now."""
        body = self._latest_body
        if body is None or body.is_eof() or body.exception() is not None:
            return
        if body is self._answered_body:
            body.feed_eof()  # aiohttp reads and drops a refused body for a while before closing
        else:
            self._lingering_time = 0.0  # after the answer, aiohttp would read on and meet exc again
            body.set_exception(exc)

    def close_if_idle(self, quiet_since: float) -> None:
        """Close the connection if it waits for its next request (as aiohttp's keep-alive timer tells
        idle) with none of its head begun, has had nothing since ``quiet_since``, and no bytes of the
        client's wait unread. (aiohttp waits so through a head that comes in parts: one whose rest
        came a second later was closed under it, unanswered.)"""
        waiting = self._waiter is not None and not self._waiter.done() and not self._head_bytes
        if waiting and self.active < quiet_since and not self._unread():
            self.force_close()

    def answering(self, request: web.BaseRequest, response: web.StreamResponse | None) -> None:
        """``request``'s answer begins (see :func:`answer_begins`)."""
        self.active = self._loop.time()
        self._answered_body = request.content
        # held whole until written whole: aiohttp hands the transport a piece at a time
        self.answer_bytes = (response.content_length or 0) if response is not None else 0

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None

    def _unread(self) -> bool:
        """Whether bytes from the client wait in the kernel, unread by this loop."""
        return self.transport is not None and _socket_queue(self.transport, "FIONREAD") > 0

    def _looked_at_after_a_read(self, due: float, looked: bool,
                                again: Callable[[float, bool], None]) -> asyncio.TimerHandle | None:
        """A timer on a client's bytes, due at ``due``, that found this loop held past it (the process
        stopped, a paused machine), or bytes of the client's waiting unread (a hold that ended just past
        it): a loop runs its due timers before it reads. ``again`` looks once more (``looked``) after a
        read, ``RECHECK_S`` later; ``None`` if there is nothing to read first. A client that went on
        sending through a 20 s pause got 408, its body said to have stalled; one whose head came in the
        pause was closed as a slow loris."""
        if looked or not (held_for(self._loop, due) or self._unread()):
            return None
        then = self._loop.time() + RECHECK_S
        return self._loop.call_at(then, again, then, True)

    def _process_keepalive(self) -> None:
        # an idle connection's deadline, run late or with a request unread: one sent in a pause was reset
        # unread, and its client told its request may have run (nginx: a 502)
        due = self._next_keepalive_close_time
        # (a timer run before its deadline, moved on by a later answer, sets itself again: aiohttp's)
        if due <= self._loop.time() and due != self._keepalive_looked and (held_for(self._loop, due)
                                                                           or self._unread()):
            self._next_keepalive_close_time = self._keepalive_looked = self._loop.time() + RECHECK_S
            self._keepalive_handle = self._loop.call_at(self._next_keepalive_close_time, self._process_keepalive)
            return
        super()._process_keepalive()

    def _headers_too_slow(self, due: float, looked: bool = False) -> None:
        self._header_timer = self._looked_at_after_a_read(due, looked, self._headers_too_slow)
        if self._header_timer is not None:
            return
        if self.transport is not None:
            log.debug("closing a connection from %s: its request headers took over %gs (HeaderTimeoutS)",
                      self.transport.get_extra_info("peername"), self._header_timeout)
            self._head_timed_out()  # a slow loris, held open for a head that never ends: seen in /metrics
            self.force_close()

    def _check_body(self, due: float, looked: bool = False) -> None:
        self._body_timer = self._looked_at_after_a_read(due, looked, self._check_body)
        if self._body_timer is not None:
            return
        body = self._latest_body
        if body is None or body.is_eof() or body.exception() is not None or self.transport is None:
            return
        now = self._loop.time()
        # While reading is paused the client is waiting on us (a full buffer), not stalling.
        if now - self._last_data >= self._body_timeout and not self._reading_paused:
            body.set_exception(RequestTimeout(
                f"the request body stalled: nothing arrived for {self._body_timeout:g}s (BodyTimeoutS)"))
            return
        if self._reading_paused:
            self._since, self._since_bytes = now, body.total_bytes
        elif now - self._since >= self._body_timeout:
            came, spent = body.total_bytes - self._since_bytes, now - self._since
            left = math.inf if self._body_length is None else self._body_length - self._since_bytes
            if came < min(MIN_BODY_RATE * spent, left):
                body.set_exception(RequestTimeout(
                    f"the request body came too slowly: {came} bytes in {spent:.1f}s, where a body must keep to "
                    f"{MIN_BODY_RATE} bytes a second over each BodyTimeoutS ({self._body_timeout:g}s)"))
                return
            self._since, self._since_bytes = now, body.total_bytes
        # Look again BodyTimeoutS after the last byte (a whole one from now while paused), not from now:
        # that made the 408 up to twice BodyTimeoutS late.
        due = (now if self._reading_paused else self._last_data) + self._body_timeout
        self._body_timer = self._loop.call_at(due, self._check_body, due)

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """Malformed HTTP (aiohttp's parser refused it) is the client's mistake: a short JSON answer
        and a debug line, not a traceback per request. Anything else is ours: logged in full."""
        if status < 500:
            log.debug("malformed HTTP request from %s: %s", request.remote, message or exc)
            self._malformed()
            text = " ".join(str(message or exc or "").split())[:200]
            text = f"malformed HTTP request: {text}" if text else "malformed HTTP request"
            if isinstance(exc, LineTooLong):
                status, text = _too_long(exc)
            elif isinstance(exc, HeadTooLarge):
                text = exc.message
            elif "Too many headers" in text:  # aiohttp's limit on their count (128), as a 400
                status, text = 431, "too many request headers (the limit is 128)"
        else:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
            text = "internal server error"
        if request.writer.output_size > 0:  # as aiohttp: a response was begun, the connection is broken
            raise ConnectionError("response already started, cannot send the error")
        response = self._error_response(status, text)
        response.headers["Server"] = SERVER_NAME
        response.force_close()
        return response


class FramingTooLarge(BadRequest):
    """A chunked body whose framing (chunk sizes, extensions, trailer fields) passed :data:`MAX_HEAD_BYTES`
    between two bytes of its content (a 431, as for a head)."""

    status = 431


class HeadTooLarge(HttpProcessingError):
    """A request's line and headers past :data:`MAX_HEAD_BYTES` in all (a 431)."""

    code = 431


_REQUEST_LINE = re.compile(rb"[A-Za-z0-9!#$%&'*+.^_`|~-]+ \S")  # a method (a token: no ":"), then its target
_C_PARSER = web_protocol.HttpRequestParser is not HttpRequestParserPy  # aiohttp's speedups, unless turned off


def _too_long(exc: LineTooLong) -> tuple[int, str]:
    """The status and message for a request line or header past aiohttp's limit: 414 for the request
    line (a long query string: options belong in the body), 431 for a header, not a 400 quoting its
    first bytes. The parser says which only by the text it quotes."""
    line, limit = (exc.args + ("", ""))[:2]
    # aiohttp's C parser quotes the request target it was gathering (a bytearray) or a header's name or
    # value (bytes, which may read "GET /..."); its Python parser, the whole line: "GET /..." or "Name: value"
    if isinstance(line, bytearray) if _C_PARSER else isinstance(line, bytes) and _REQUEST_LINE.match(line):
        return 414, (f"the request line is longer than {limit} bytes: send long options in the request's "
                     "body, not its query string")
    return 431, f"a request header is longer than {limit} bytes"


# -- compressed bodies ------------------------------------------------------------------------------

CODINGS = ("gzip", "deflate")
INLINE_INPUT = 1024  # a compressed chunk this small inflates to about 1 MB at most: not worth a thread
INFLATE_PIECE = 1 << 20  # inflated bytes made at a time, each reserved against MaxBufferedMB first
# A gzip body may be several members one after another (a client sends one; a file joined from parts a
# few). Each starts an inflater of its own in Python: 800,000 empty ones, a 16 MB body, took 8 s of the
# server's CPU and held the event loop's lock against every other request.
MAX_GZIP_MEMBERS = 64


class Inflater:
    """Inflates one ``gzip`` or ``deflate`` request body, chunk by chunk, onto the end of a buffer,
    ``INFLATE_PIECE`` bytes at a time, refusing it (413) once it would pass ``limit`` inflated bytes.
    Before each piece is made, ``reserve`` is told the size the body may reach with it, and may refuse
    it (the body budget's 429): so the memory a bomb would take is refused before it is taken. (Each
    chunk was inflated whole, up to all of ``limit`` at once, joined, and only then counted: 60 clients
    sending 64 kB of gzip each took a server with ``MaxBufferedMB`` 64 to 570 MB.) All but the smallest
    chunks inflate on the default executor: zlib releases the GIL, and a bomb must not hold the event
    loop while it is found out."""

    @classmethod
    def for_request(cls, request: web.BaseRequest, limit: int,
                    reserve: Callable[[int], Any] = lambda size: None) -> Inflater | None:
        """The inflater a request's ``Content-Encoding`` calls for, ``None`` for an uncompressed body;
        raises :class:`~easyserve.errors.UnsupportedMediaType` for any other coding."""
        coding = content_coding(request)
        return cls(coding, limit, reserve) if coding else None

    def __init__(self, coding: str, limit: int, reserve: Callable[[int], Any] = lambda size: None) -> None:
        self.coding = coding
        self.limit = limit
        self.reserve = reserve
        self.size = 0
        self._zlib: Any = None
        self._head = b""  # a deflate body's first byte, until the second tells zlib from raw deflate
        self._members = 0  # gzip members begun

    async def inflate(self, data: bytes, out: Any) -> None:
        """Inflate ``data`` onto the end of ``out`` (a ``bytearray``, or what ``+=`` extends as one)."""
        if self._zlib is None and self.coding == "deflate" and len(self._head + data) < 2:
            self._head += data
            return
        data, self._head = self._head + data, b""
        full = False  # the last piece filled its room: zlib may hold more of it, with no input left
        while data or (full and not self._zlib.eof):
            room = min(INFLATE_PIECE, self.limit - self.size + 1)  # a byte past the limit tells it is passed
            self.reserve(min(self.size + room, self.limit))
            if len(data) <= INLINE_INPUT:
                piece, data = self._piece(data, room)
            else:
                piece, data = await asyncio.get_running_loop().run_in_executor(None, self._piece, data, room)
            self.size += len(piece)
            if self.size > self.limit:
                raise PayloadTooLarge(f"body too large once inflated: over the limit of "
                                      f"{megabytes(self.limit)} (MaxBodyMB)")
            out += piece
            full = len(piece) == room

    def finish(self) -> None:
        """Raise :class:`~easyserve.errors.BadRequest` if the compressed stream ended early."""
        if self._head or (self._zlib is not None and not self._zlib.eof):
            raise BadRequest(f"the {self.coding} body is truncated: its compressed stream does not end")

    def _piece(self, data: bytes, room: int) -> tuple[bytes, bytes]:
        """Up to ``room`` bytes inflated from ``data``, and what is left of ``data`` to inflate."""
        try:
            if self._zlib is None or self._zlib.eof:
                if self._zlib is not None and self.coding != "gzip":  # gzip may hold several members
                    raise BadRequest("data follows the end of the deflate stream")
                self._members += 1
                if self._members > MAX_GZIP_MEMBERS:
                    raise BadRequest(f"the gzip body holds more than {MAX_GZIP_MEMBERS} members (gzip streams "
                                     "one after another): compress it as one")
                self._zlib = zlib.decompressobj(self._wbits(data))
            piece = self._zlib.decompress(data, room)
        except zlib.error as exc:
            raise BadRequest(f"the body is not valid {self.coding} data: {exc}") from None
        return piece, self._zlib.unused_data if self._zlib.eof else self._zlib.unconsumed_tail

    def _wbits(self, data: bytes) -> int:
        if self.coding == "gzip":
            return 16 + zlib.MAX_WBITS
        # "deflate" means a zlib stream, but some clients send raw deflate: tell them by the header
        zlib_header = data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
        return zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS


def content_coding(request: web.BaseRequest) -> str | None:
    """``"gzip"``, ``"deflate"`` or ``None`` (no Content-Encoding, or ``identity``); anything else is
    :class:`~easyserve.errors.UnsupportedMediaType` naming what is accepted."""
    if "Content-Encoding" not in request.headers:  # most requests
        return None
    given = [value.strip().lower() for value in request.headers.getall("Content-Encoding", [])]
    values = set(given)
    if len(values) > 1:  # the first won, where a proxy joining them sent "identity, gzip": refused
        raise BadRequest(f"Content-Encoding is given {len(values)} ways ({', '.join(map(repr, sorted(values)))}): "
                         "give it once")
    if values <= {"", "identity"}:
        return None
    # the same coding on two lines is that coding applied twice (RFC 9110 5.3), as "gzip, gzip" says:
    # it was taken once, and the handle got a body still compressed
    value = ", ".join(given)
    coding = {"x-gzip": "gzip"}.get(value, value)
    if coding not in CODINGS:
        raise UnsupportedMediaType(f"unsupported Content-Encoding {value!r}: send the body uncompressed, "
                                   "or compressed with gzip or deflate")
    return coding
