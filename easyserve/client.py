"""Talking to a running server from Python: ``Client(url).predict(...)`` (``easyserve predict`` from the shell,
in :mod:`easyserve.predict_cli`). What a call sends is :mod:`easyserve.sending`'s; what it makes of the
answer, :mod:`easyserve.answers`'.

::

    from easyserve import Client

    client = Client("http://127.0.0.1:9876")
    client.predict("cat.jpg")                      # an image file, sent as it is
    client.predict({"x": [5.1, 3.5, 1.4, 0.2]})    # a JSON object (the original format)
    client.predict(jpeg_bytes)                     # bytes
    client.predict(pixels)                         # a uint8 numpy image (H, W, 3 RGB), sent as PNG
    client.predict("cat.jpg", user="ann")          # a file plus fields: {"img": "<base64>", "user": "ann"}
    await client.apredict("cat.jpg")               # the same from async code

``predict`` blocks without using an event loop, so it also works in a notebook cell, where a loop is
already running; ``apredict`` runs on the caller's loop. A request the server refuses raises the
:mod:`easyserve.errors` class of its status (``BadRequest`` for 400 and any 4xx without a class of
its own, ``NotFound`` for 404, ``Overloaded`` for 429 with ``Retry-After``, ``NotReady`` for 503...),
with the server's message and the status in ``.status``. Where no server said an error status,
``.status`` is ``None``: no answer came (:class:`~easyserve.errors.NoAnswer`, a ``ConnectionError``
too), none within the client's ``timeout`` (:class:`~easyserve.errors.Timeout`), or one it cannot
use (an HTML page). Every error a call raises is an :class:`~easyserve.errors.EasyServeError`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import errno
import http.client
import math
import os
import re
import select
import socket
import ssl
import sys
import threading
import time
import urllib.parse
import warnings
import weakref
from typing import Any, Callable, Mapping

from .answers import answer, one_line, unusable
from .deadlines import DEADLINES
from .errors import EasyServeError, NoAnswer, Timeout
from .npy import NPY
from .sending import encode, own_headers, request_fields

__all__ = ["Client", "predict", "encode"]

DEFAULT_URL = "http://127.0.0.1:9876"
# the server's routes other than /predict: a Client given one sent to ROUTE/predict, and answered 404
ROUTES = re.compile(r"/(stats|metrics|health|ready)$|^/v2$|/v2/(models|health)(/|$)")


class Client:
    """Sends requests to one easyserve server. Safe to share between threads: connections are kept
    alive in a pool (up to 32 between requests), not one for each thread that ever called. A process
    forked from one that used it (multiprocessing, a DataLoader's workers) opens connections of its own,
    and one pickled for another process (``pool.map(client.predict, inputs)``) goes as its settings.

    ``url`` is the server (``http://host:port``; ``/predict`` is added unless given; a query string,
    such as ``?token=...``, goes along with every request). ``timeout`` is how long to wait for an
    answer, in seconds, from sending to the last byte: past it, :class:`~easyserve.errors.Timeout`;
    ``None`` (or ``math.inf``) waits for ever. A connection the server closes after the request was
    sent raises :class:`~easyserve.errors.NoAnswer` (a ``ConnectionError``) and is not sent again: the
    request may have run, which only the caller can judge safe to repeat. Redirects are not followed
    (a POST sent on elsewhere might run twice, or carry the API key to another host): one raises
    :class:`~easyserve.errors.EasyServeError` naming where it pointed, and so does a 200 that is neither
    JSON nor bytes easyserve sent (a web server's page, a sidecar's ``OK`` at the wrong port).

    ``max_answer_mb`` bounds the answer a call reads (default 1 GiB; ``None``: no bound): past it,
    :class:`~easyserve.errors.EasyServeError`, and the connection is closed, so that a server (or
    anything at its address) sending without end cannot take the caller's memory. An error's
    message is read up to 64 kB.

    ``url`` may be a running :class:`~easyserve.Server` of this process: its URL as it is now (started
    again on ``Port: 0``, it listens elsewhere: ``Client(server)`` again), and its ``ApiKey``.
    ``key`` names the field a file goes in when it is sent along with other fields (the original
    format: ``{"img": "<base64>"}``). ``api_key`` (default: ``$EASYSERVE_API_KEY``) is sent as
    ``Authorization: Bearer <key>`` to a server that requires one (a key with a line break or another
    control character, which no header carries, is a ``ValueError`` here); a user and password in the
    URL (``http://user:pass@host``, for a proxy in front) go as Basic authentication instead, and with a
    key too are a ``ValueError``, one header carrying one of them. With ``npy=True``, numpy arrays
    are sent as ``.npy`` (``application/x-npy``; by default an image array goes as PNG), and an
    answer that is an array comes back as one rather than as JSON. ``headers`` go with every request
    (``{"X-Tenant": "acme"}``: a server whose ``PassHeaders`` names them gives them to the handle)::

        Client(url, npy=True).predict(np.zeros((224, 224, 3), np.uint8))   # a tensor in, an array out
    """

    def __init__(self, url: str = DEFAULT_URL, timeout: float | None = 60.0, key: str = "img",
                 api_key: str | None = None, npy: bool = False, max_answer_mb: float | None = 1024,
                 headers: Mapping[str, str] | None = None) -> None:
        servers = sys.modules.get(f"{__package__}.server")  # not imported here: a client alone needs none of it
        if servers is not None and isinstance(url, servers.Server):  # Client(server), in a notebook: its URL,
            # and its API key unless one is given
            server, url = url, url.url
            if url is None:
                raise ValueError(f"{server!r} has no URL: it is not running; start() it first")
            api_key = api_key or server.config.api_key
            # followed only to say where it went: started again on Port 0, it listens elsewhere
            self._server: Callable[[], Any] | None = weakref.ref(server)
        else:
            self._server = None
        if not isinstance(url, str):  # Client(server.url) of a server not started, or stopped: its url is None
            raise ValueError(f"not a server URL: {url!r}; a Server's url is None until start() and after stop()")
        try:  # an IPv6 host's bracket left open: urllib's "Invalid IPv6 URL", naming no URL
            parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        except ValueError as exc:
            raise ValueError(f"not a server URL: {url!r} ({exc}); expected e.g. {DEFAULT_URL}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not a server URL: {url!r}; expected e.g. {DEFAULT_URL}")
        if timeout is not None and (not isinstance(timeout, (int, float)) or not timeout > 0):
            raise ValueError(f"timeout: got {timeout!r}; expected seconds above 0 (None or inf: wait for ever)")
        if max_answer_mb is not None and (not isinstance(max_answer_mb, (int, float)) or not max_answer_mb > 0):
            raise ValueError(f"max_answer_mb: got {max_answer_mb!r}; expected megabytes above 0 (None or inf: no "
                             "limit)")
        try:
            parts.port  # a port that is no number, or past 65535: said now, not by urllib on the first call
        except ValueError as exc:
            raise ValueError(f"not a server URL: {url!r} ({exc}); expected e.g. {DEFAULT_URL}") from None
        # a space or a letter beyond ASCII percent-encoded, as aiohttp sends it (http.client refuses both);
        # what is encoded already stays as it is
        path = urllib.parse.quote(parts.path.rstrip("/").removesuffix("/predict"), safe="/%!$&'()*+,;=:@")
        parts = parts._replace(query=urllib.parse.quote(parts.query, safe="/?%!$&'()*+,;=:@"))
        if ROUTES.search(path):
            raise ValueError(f"{url}: that is one of the server's routes; a Client sends to /predict: give the "
                             "server's own URL (http://host:port, with the path prefix it is served under, if "
                             "any). For the Open Inference Protocol's /v2 routes, use tritonclient or KServe's "
                             "client (docs/openinference.md)")
        # http://user:pass@host: Basic authentication (for a proxy in front), sent by both ways of calling;
        # the blocking one dropped it, and aiohttp sent it, or refused it beside an api_key, in its words
        userinfo, _, host = parts.netloc.rpartition("@")
        basic = None
        if userinfo:
            user, _, password = userinfo.partition(":")
            credentials = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}"
            basic = "Basic " + base64.b64encode(credentials.encode()).decode()
            parts = parts._replace(netloc=host)
        self.base_url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))
        self.url = f"{self.base_url}/predict" + (f"?{parts.query}" if parts.query else "")
        # in messages and repr, which may be logged: no ?token=..., nor the password of http://user:pass@host
        self._shown_base = urllib.parse.urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], path, "", ""))
        self._shown = f"{self._shown_base}/predict"
        # past threading.TIMEOUT_MAX (292 years) a wait overflows the clocks: that is for ever
        self.timeout = None if timeout is None or timeout >= threading.TIMEOUT_MAX else float(timeout)
        self.key = key
        self.npy = npy
        self.max_answer_mb = max_answer_mb
        self._larger = "Client(url, max_answer_mb=...)"  # how a larger answer is asked for (the CLI: its option)
        # past 2**62 bytes (4 exabytes) no bound is meant: inf was an OverflowError
        self._most = math.inf if max_answer_mb is None or max_answer_mb >= 2**42 else int(max_answer_mb * 2**20)
        # JSON first; anything else a handle answers as easyserve.Binary (an image) is taken as it is
        accept = f"{NPY}, application/json;q=0.9" if npy else "application/json"
        self._headers = {**own_headers(headers), "Accept": f"{accept}, */*;q=0.1"}
        named = "api_key" if api_key else "$EASYSERVE_API_KEY"
        # a user and password written in the URL win over the environment's key, not over one given here
        api_key = api_key or (None if basic else os.environ.get("EASYSERVE_API_KEY"))
        if api_key:
            # no header carries such a key (nor would the server take it), and the libraries' errors about
            # one quote the header, key and all, into the caller's log
            if not isinstance(api_key, str) or not api_key.isprintable():
                raise ValueError(f"{named}: expected a key without line breaks or control characters (value "
                                 "hidden; one read from a file: strip it)")
            if basic:
                raise ValueError(f"{self._shown_base}: a user and password in the URL and {named} too: one "
                                 "Authorization header carries one of them; give the one the server (or the "
                                 "proxy before it) takes")
            self._headers["Authorization"] = f"Bearer {api_key}"
        elif basic:
            self._headers["Authorization"] = basic
        self._parts = parts
        self._path = urllib.parse.urlsplit(self.url)._replace(scheme="", netloc="").geturl()  # with the query
        self._start_in_this_process()

    def _start_in_this_process(self) -> None:
        """What belongs to the process using the client, and is never copied to another."""
        self._idle: list[http.client.HTTPConnection] = []  # kept alive for the next request, newest last
        self._lock = threading.Lock()
        self._pid = os.getpid()  # the process the kept-alive connections belong to
        self._deadlines = DEADLINES  # the process's: one thread for every client's calls
        self._tokens: dict[Any, contextvars.Token] = {}  # each `async with` block's session: its way back out
        self._closes = 0  # close() calls: a connection out on a request when one came is closed when it is back
        self._kept_s = math.inf  # how long the server keeps an idle connection, by its last answer (_kept_for)

    def __getstate__(self) -> dict[str, Any]:
        # pickled for another process (pool.map(client.predict, inputs)): the server and the settings, not
        # this process's connections, lock, deadline thread or aiohttp session
        return {name: value for name, value in vars(self).items() if name not in _IN_THIS_PROCESS + ("_server",)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        vars(self).update(state)
        self._server = None  # a Server of the process that pickled it
        self._start_in_this_process()

    def __repr__(self) -> str:
        return f"Client({self._shown_base!r})"

    # -- blocking -----------------------------------------------------------------------------------

    def predict(self, data: Any = None, /, **fields: Any) -> Any:
        """Send one request and return the server's answer: its JSON, an array (``npy=True``), or the
        bytes of a binary answer (a handle's :class:`~easyserve.Binary`, such as an image).

        ``data`` is a dict (sent as JSON), a path to a file (sent as it is; a ``.json`` file as JSON),
        bytes, or an image as a uint8 numpy array or PIL image (sent as PNG). Keyword ``fields`` go in
        the JSON body; with a file, bytes or image, that body carries it base64-encoded under ``key``.
        """
        body, content_type = encode(data, request_fields(fields), self.key, self.npy)
        status, headers, payload = self._post(body, content_type)
        return answer(self._shown, status, headers, self._decoded(status, headers, payload))

    def _decoded(self, status: int, headers: Mapping[str, str], payload: bytes | bytearray) -> bytes | bytearray:
        """``payload`` inflated, if the server compressed it although this client asked it not to (as
        the async client's aiohttp inflates it): its gzip bytes were a body "that is not JSON", an
        error's message garbled, and a binary answer returned still compressed, as if it were the answer."""
        encoding = headers.get("Content-Encoding", "").strip().lower()
        if encoding in ("", "identity"):
            return payload
        if encoding not in ("gzip", "x-gzip", "deflate"):
            raise unusable(f"{self._shown} answered {status} in Content-Encoding {encoding!r}, which this client "
                            "cannot read")
        import zlib

        most = int(min(self._bound(status), 2**62))
        body, data = bytearray(), payload
        try:  # gzip's header, or deflate's zlib one (or none, as some servers send it)
            wbits = 47 if encoding != "deflate" or payload[:1] == b"\x78" else -15
            first = True
            # gzip's members, one after another (RFC 1952 allows several); what follows the last that is no
            # member (zeros a server padded it with, a newline) is left, as Python's gzip leaves it
            while data and len(body) <= most and (first or data[:2] == b"\x1f\x8b"):
                first = False
                inflater = zlib.decompressobj(wbits=wbits)
                # in pieces: asked for the bound at once, zlib grew its buffer to twice it (4 MB of gzip that
                # inflate to 4 GB took 2.1 GB to refuse at the 1 GiB default)
                while len(body) <= most and not inflater.eof:
                    piece = inflater.decompress(data, _PIECE)
                    data = inflater.unconsumed_tail
                    if not piece and not data:
                        break
                    body += piece
                if len(body) > most:
                    break
                if not inflater.eof:  # returned as it was, an answer lacked its end (an error's start will do)
                    if status < 400:
                        raise zlib.error("it ends before its compressed stream does (cut short)")
                    break
                data = inflater.unused_data if encoding != "deflate" else b""
        except zlib.error as exc:
            raise unusable(f"{self._shown} answered {status} with a {encoding} body that cannot be read: {exc}") \
                from None
        if len(body) > most:
            if status < 400:
                raise self._too_large()
            del body[most:]
        return body

    def _post(self, body: bytes, content_type: str) -> tuple[int, Mapping[str, str], bytes | bytearray]:
        # as UTF-8, as aiohttp sends them and the server reads an API key; http.client would send Latin-1
        headers = {name: value.encode() for name, value in {**self._headers, "Content-Type": content_type}.items()}
        deadline = time.monotonic() + (math.inf if self.timeout is None else self.timeout)
        for attempt in range(2):
            closes = self._closes
            connection, reused = self._checkout()
            sent = False
            self._deadlines.watch(connection, deadline)
            try:
                try:
                    if connection.sock is None:  # connected apart: what fails here is no server's close
                        _connect(connection)
                    connection.request("POST", self._path, body=body, headers=headers)
                except (BrokenPipeError, ConnectionResetError):
                    if not _answered_early(connection):
                        raise
                sent = True
                # an answer that ends when the connection closes takes the socket from the connection
                self._deadlines.watch(connection, deadline, connection.sock)
                response = connection.getresponse()
                while 100 < response.status < 200 and response.status != 101:  # 103 Early Hints, say
                    # an interim answer, which http.client takes for the answer (it skips 100 alone): the
                    # request's own follows on the same buffered stream, read by begin() once more
                    response.headers = None
                    response.begin()
                payload, whole = _read_some(response, self._bound(response.status))
            except (ConnectionRefusedError, socket.gaierror, _Unconnected) as exc:
                connection.close()
                raise self._unreachable(exc.__cause__ if isinstance(exc, _Unconnected) else exc) from None
            except (TimeoutError, http.client.HTTPException, OSError) as exc:
                connection.close()
                if time.monotonic() >= deadline:
                    raise self._late() from None
                if isinstance(exc, ssl.SSLError) and not sent and not reused:  # as it connected: not "closed"
                    raise self._no_tls(exc) from None
                if reused and not sent and attempt == 0:
                    continue  # closed by the server while idle, as the request was written: it was not read
                if not sent:
                    raise NoAnswer(f"{self._shown_base} closed the connection before the request was "
                                   f"sent ({type(exc).__name__}: {exc})") from None
                # RemoteDisconnected is both; a bare HTTPException is http.client's "got more than 100 headers"
                if (isinstance(exc, _NOT_HTTP) or type(exc) is http.client.HTTPException) and not isinstance(
                        exc, ConnectionError):
                    raise self._not_http(exc) from None
                raise NoAnswer(f"{self._shown_base} closed the connection without answering "
                               f"({type(exc).__name__}: {exc}); the request may have run") from None
            except KeyboardInterrupt:  # a notebook's interrupted cell: one line, not http.client's and socket's frames
                connection.close()
                raise KeyboardInterrupt(f"the request to {self._shown} was left unanswered: the server may still "
                                        "run it") from None
            except BaseException:
                connection.close()
                raise
            finally:
                late = self._deadlines.forget(connection)
            # shut down at the deadline: headers, or a body that ends at the close, may have been cut short
            # (a body of known length or in chunks read whole is whole)
            if late and response.length is None and not response.chunked:
                response.close()
                connection.close()
                raise self._late()
            if not whole:  # left unread: the connection cannot carry another request
                response.close()
                connection.close()
                if response.status < 400:
                    raise self._too_large()
            elif response.will_close or response.status < 200:  # 101: the stream is no longer HTTP's
                connection.close()
            else:
                connection.reuse_before = time.monotonic() + _kept_for(response.headers)  # type: ignore[attr-defined]
                self._checkin(connection, closes)
            return response.status, response.headers, payload
        raise AssertionError("unreachable")  # pragma: no cover

    def _no_tls(self, exc: BaseException) -> NoAnswer:
        """The error for a TLS handshake that failed: the client's refusal (a certificate it does not
        trust), or a server that speaks no TLS; neither is a server that closed the connection."""
        return NoAnswer(f"the TLS handshake with {self._shown_base} failed ({type(exc).__name__}: {one_line(exc)}): "
                        "a server whose certificate a private CA signed needs that CA in SSL_CERT_FILE, and one "
                        "without TLS is reached with http://")

    def _unreachable(self, exc: object) -> NoAnswer:
        """The error for a connection that could not be made: the server refused it, or its name did not
        resolve; or this machine could not make it (no descriptor, port or route left), said as such, not
        as a server that closed a connection, or that is not running."""
        local = _LOCAL_FAULTS.get(getattr(exc, "errno", None))
        if local is not None:
            return NoAnswer(f"cannot connect to {self._shown_base}: {exc}; {local}")
        hint = "is the server running (server.start() in Python, easyserve run CONFIG in a shell)?"
        server = self._server() if self._server is not None else None
        moved = getattr(server, "url", None)
        if moved is not None and moved != self.base_url:  # Client(server), then stop() and start() on Port 0
            hint = (f"the Server this client was made from now runs at {moved}: a client keeps the URL it was "
                    "made with; Client(server) again")
        return NoAnswer(f"cannot reach {self._shown_base}: {exc}; {hint}")

    def _bound(self, status: int) -> float:
        """How much of an answer of ``status`` is read: an error's message, or at most ``max_answer_mb``."""
        return min(ERROR_BYTES, self._most) if status >= 400 else self._most

    def _too_large(self) -> EasyServeError:
        return unusable(f"{self._shown} answered more than max_answer_mb={self.max_answer_mb:g} MB; "
                         f"the rest was not read ({self._larger} for a larger one)")

    def _late(self) -> Timeout:
        late = Timeout(f"no answer from {self._shown} within {self.timeout:g} s")
        late.status = None  # type: ignore[assignment]  # no server said 504, as its class's status would
        return late

    def _not_http(self, exc: object) -> EasyServeError:
        return unusable(f"{self._shown_base} answered something that is not HTTP ({one_line(exc)}): "
                         "is this an easyserve server?")

    def _checkout(self) -> tuple[http.client.HTTPConnection, bool]:
        """A kept-alive connection that the server has not closed (and whether it is one), else a new one."""
        if self._pid != os.getpid():
            self._forget_parents()
        with self._lock:
            while self._idle:
                connection = self._idle.pop()
                if _open_and_quiet(connection) and time.monotonic() < getattr(connection, "reuse_before", math.inf):
                    return connection, True
                # the server closed it while it was idle (KeepAliveTimeoutS, a restart), or is about to
                connection.close()
        kind = _HTTPSConnection if self._parts.scheme == "https" else _HTTPConnection
        return kind(self._parts.hostname, self._parts.port, timeout=self.timeout), False

    def _forget_parents(self) -> None:
        """In a forked child: the kept-alive connections are the parent's too, and two processes sending on
        one stream read each other's answers. The child closes its copies of their sockets (the parent's
        stay open) and opens its own; the lock is new, as a thread of the parent may have held it."""
        idle, self._idle = self._idle, []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        for connection in idle:
            connection.close()

    def _checkin(self, connection: http.client.HTTPConnection, closes: int) -> None:
        with self._lock:
            if len(self._idle) < MAX_IDLE_CONNECTIONS and closes == self._closes:
                self._idle.append(connection)
                return
        connection.close()

    def close(self) -> None:
        """Close the kept-alive connections; a request under way keeps its own until it is answered, and then
        closes it. The client may still be used: it opens new ones."""
        with self._lock:
            idle, self._idle = self._idle, []
            self._closes += 1
        for connection in idle:
            connection.close()

    def __del__(self) -> None:
        # a client dropped without close() must not leave sockets open (nor ResourceWarnings behind)
        try:
            self.close()
        except Exception:  # during interpreter shutdown, modules may already be gone
            pass

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- async --------------------------------------------------------------------------------------

    async def apredict(self, data: Any = None, /, **fields: Any) -> Any:
        """:meth:`predict` for async code (a notebook cell: ``await client.apredict("cat.jpg")``).

        Inside ``async with client:`` requests share one connection pool; outside, each opens its own.
        """

        body, content_type = encode(data, request_fields(fields), self.key, self.npy)
        session, loop = _SESSIONS.get().get(self, (None, None))
        if session is not None and not session.closed and loop is asyncio.get_running_loop():
            _drop_closed(session, self._kept_s)
            return await self._apost(session, body, content_type)
        async with _session() as session:
            return await self._apost(session, body, content_type)

    async def _apost(self, session: Any, body: bytes, content_type: str) -> Any:
        import aiohttp

        headers = {**self._headers, "Content-Type": content_type}
        try:
            async with session.post(self.url, data=_whole(body), headers=headers, allow_redirects=False,
                                    timeout=aiohttp.ClientTimeout(total=self.timeout)) as response:
                payload, whole = await _aread_some(response, self._bound(response.status))
                self._kept_s = _kept_for(response.headers)
                held = response.connection.transport if response.connection is not None else None
                if response.status >= 400 and held is not None and held.get_write_buffer_size():
                    # a body refused before it was all sent (a 413): what is left of it is dropped, where the
                    # close waited to send it to a server reading no more, and the socket outlived the loop
                    held.abort()
                if not whole:
                    response.close()  # the rest unread: the connection is not put back for another request
                    if response.status < 400:
                        raise self._too_large()
        except aiohttp.ClientSSLError as exc:  # a ClientConnectorError too: "is the server running?"
            raise self._no_tls(getattr(exc, "os_error", exc)) from None
        except aiohttp.ClientConnectorError as exc:
            raise self._unreachable(exc.os_error) from None
        except asyncio.TimeoutError:
            raise self._late() from None
        except asyncio.CancelledError as exc:  # the task cancelled (a notebook's interrupt of an awaiting cell)
            # as predict()'s interrupt says it, and without aiohttp's frames (5 kB in a notebook); the same
            # exception, so that asyncio's own bookkeeping of the cancellation is as it was
            if hasattr(exc, "add_note"):  # Python 3.11
                exc.add_note(f"the request to {self._shown} was left unanswered: the server may still run it")
            raise exc.with_traceback(None) from None
        except aiohttp.ClientResponseError as exc:  # what aiohttp raises for an answer it cannot parse
            raise self._not_http(exc.message) from None
        except aiohttp.ClientError as exc:  # the server closed the connection, or a body was cut short
            if session.closed:  # not the server: the `async with client:` block it was sent in has ended
                raise NoAnswer(f"the request to {self._shown} was left unanswered: the `async with` block of the "
                               "client it was sent in ended before its answer came (await the calls a block "
                               "starts before it ends); the server may have run it") from None
            # aiohttp's words name the URL, its ?token=... with it
            said = _QUERY.sub(r"\1", one_line(exc))
            raise NoAnswer(f"{self._shown_base} closed the connection without answering "
                           f"({type(exc).__name__}: {said}); the request may have run") from None
        return answer(self._shown, response.status, response.headers,
                       self._decoded(response.status, response.headers, payload))

    async def __aenter__(self) -> Client:

        session = _session()
        held = _SESSIONS.get()
        self._tokens[session] = _SESSIONS.set({**held, self: (session, asyncio.get_running_loop())})
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        session, _ = _SESSIONS.get().get(self, (None, None))
        token = self._tokens.pop(session, None)
        if token is None:  # not this task's block (an __aexit__ called by hand elsewhere): nothing of its own
            return
        with contextlib.suppress(ValueError):  # a block left in another task than it began in: its own context
            _SESSIONS.reset(token)
        await session.close()


# what _start_in_this_process sets
_IN_THIS_PROCESS = ("_idle", "_lock", "_pid", "_deadlines", "_tokens", "_closes", "_kept_s")
# The aiohttp session of each client's `async with` block the running code is in, by client, with its
# event loop: a context variable, so that a block belongs to the task that entered it and to the tasks
# it starts, and to no other. One attribute held the session: two blocks at once (two tasks) shared the
# second's, which the first closed as it ended, the other's request in flight with it (answered by the
# server, lost to the client); a call from another thread's loop used it too, and raised a bare
# RuntimeError (a future of another loop) after its request had run.
_SESSIONS: contextvars.ContextVar[Mapping[Any, tuple[Any, asyncio.AbstractEventLoop]]] = contextvars.ContextVar(
    "easyserve_client_sessions", default={})
MAX_IDLE_CONNECTIONS = 32  # kept-alive connections a Client holds between requests; more threads at once use more
ERROR_BYTES = 65536  # of an error's answer, read for its message; the rest is left (the connection closed)
_PIECE = 1 << 20


def _whole(body: bytes) -> Any:
    """``body`` for aiohttp to send at once, without the ResourceWarning it gives bytes of more than 1 MB
    (that the write may hold the event loop: it copies them into the transport's buffer, which is what
    a request of that size costs). Sent as a stream in pieces instead, a refusal the server answered
    from the headers before closing (a proxy's 413) was lost: aiohttp read no answer after the broken
    pipe, and the call said the request may have run."""
    import aiohttp

    with warnings.catch_warnings():  # no await inside: only this payload's own warning is let go
        warnings.simplefilter("ignore", ResourceWarning)
        return aiohttp.payload.BytesPayload(body)


def _answered_early(connection: http.client.HTTPConnection) -> bool:
    """Whether a server that closed the connection as the request's body was sent had answered first: a
    proxy refuses a body too large, or a busy server's, from the headers alone (413, 429), and closes
    without reading the rest. The answer waits in the socket; the send's broken pipe lost it, where
    curl and aiohttp, reading as they send, gave the status."""
    sock = connection.sock
    if sock is None:
        return False
    try:
        poller = select.poll()  # not select(): a descriptor past 1024 is a ValueError there
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(1000)) and sock.recv(5, socket.MSG_PEEK) == b"HTTP/"
    except OSError:  # reset: what it held is gone with it
        return False


class _HeadReader:
    """An answer's stream, which notes whether it ended while a line was read."""

    def __init__(self, stream: Any) -> None:
        self._stream, self.ended = stream, False

    def readline(self, limit: int = -1) -> bytes:
        line = self._stream.readline(limit)
        self.ended = self.ended or not line
        return line

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _Response(http.client.HTTPResponse):
    """http.client's answer, which takes the end of the stream for the end of the head: an answer whose
    connection closed in the middle of its headers was read whole, with an empty body (``predict``
    returned ``b""``, where the async client said no answer came)."""

    def begin(self) -> None:
        reader = self.fp = _HeadReader(self.fp) if not isinstance(self.fp, _HeadReader) else self.fp
        super().begin()
        if reader.ended:  # the status line's end is RemoteDisconnected already: this is the headers'
            raise http.client.RemoteDisconnected("the connection closed in the middle of the answer's headers")

    def _read_next_chunk_size(self) -> int:
        size = super()._read_next_chunk_size()
        if not 0 <= size < 2**63:  # read as a length (-1: to the end), it waited out the timeout for data
            self._close_conn()
            raise http.client.HTTPException(f"a chunk of {size:#x} bytes" + (", past any body" if size > 0 else ""))
        return size


class _HTTPConnection(http.client.HTTPConnection):
    response_class = _Response


class _HTTPSConnection(http.client.HTTPSConnection):
    response_class = _Response


def _read_some(response: http.client.HTTPResponse, most: float) -> tuple[bytes | bytearray, bool]:
    """The answer's body, up to ``most`` bytes; and whether that is all of it (else the rest is unread).
    A successful answer that says it is longer is not read at all, nor kept once it is past ``most``.
    One growing buffer: pieces joined, then cut to ``most``, held three times the bound at once (3 GB
    for the 1 GiB default, from a server sending without end)."""
    try:
        if response.length is not None and response.length <= most:  # in one read: pieces joined took twice
            return response.read(), True
        if response.status < 400 and response.length is not None:
            return b"", False
        buffer = bytearray()
        while len(buffer) <= most:
            piece = response.read(int(min(_PIECE, most + 1 - len(buffer))))
            if not piece:
                if response.length:  # read(amt) ends quietly where the connection did: short of its length
                    raise http.client.IncompleteRead(bytes(buffer), response.length)
                return buffer, True
            buffer += piece
    except http.client.IncompleteRead as exc:
        if response.status < 400:
            raise
        # an error cut short: its status and headers say what it was (a 429, not "may have run") and name it
        return exc.partial, False
    return _cut(buffer, most, response.status)


def _cut(buffer: bytearray, most: float, status: int) -> tuple[bytes | bytearray, bool]:
    """An answer read past ``most``: nothing of a success (it is refused whole), an error's start."""
    if status < 400:
        return b"", False
    del buffer[int(most):]
    return buffer, False


def _session() -> Any:
    """An aiohttp session for the async calls. It leaves a compressed answer as it came, for
    :meth:`Client._decoded` to inflate, as the blocking client's are: aiohttp's own inflating returned a
    gzip answer cut short as if it were whole."""
    import aiohttp

    return aiohttp.ClientSession(auto_decompress=False, headers={"Accept-Encoding": "gzip, deflate"})


async def _aread_some(response: Any, most: float) -> tuple[bytes | bytearray, bool]:
    """:func:`_read_some` for an aiohttp answer: in pieces, up to ``most`` bytes, where its
    ``Content-Length`` is unknown or may not be taken at its word (an error's)."""
    length = None if response.headers.get("Content-Encoding") or response.status >= 400 else response.content_length
    if length is not None and length <= most:
        return await response.read(), True
    if response.status < 400 and length is not None:
        return b"", False
    import aiohttp

    buffer = bytearray()
    while len(buffer) <= most:
        try:
            piece = await response.content.read(int(min(_PIECE, most + 1 - len(buffer))))
        except aiohttp.ClientPayloadError:
            if response.status < 400:
                raise
            return buffer, False  # an error cut short, as _read_some's
        if not piece:
            return buffer, True
        buffer += piece
    return _cut(buffer, most, response.status)


def _open_and_quiet(connection: http.client.HTTPConnection) -> bool:
    """Whether a kept-alive connection may carry a request: open, and nothing to read on it. A server
    that closed it (its keep-alive timeout, a restart) has made it readable (the end of the stream):
    a request written to it would be lost, and one written and then failed could not be told from
    one that the server had read, and maybe run."""
    return connection.sock is not None and not _readable_now(connection.sock)


def _readable_now(sock: Any) -> bool:
    """Whether ``sock`` has something to read, or its end, now (poll, not select: a descriptor past
    1024 is a ValueError there)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def _drop_closed(session: Any, kept_s: float = math.inf) -> None:
    """Close the connections of ``session``'s pool that may not carry another request: those the server
    has closed, as :func:`_open_and_quiet` finds them, those idle for ``kept_s`` (:func:`_kept_for`), and
    those holding bytes no request asked for.
    aiohttp learns of a server's close only when its loop runs, and after the loop had been busy past
    the server's keep-alive timeout (a cell decoding pictures between two requests), the next request
    went out on a closed connection and failed, "may have run", though the server never saw it. And
    where the loop had run, it had read a stray answer (a broken server's or proxy's) into the
    connection's buffer, which the next request on it then took for its own: a wrong prediction, no
    error. Every pooled connection is looked at (a poll each, microseconds): a server that closes
    right after answering closed it within a second, which a second's grace left in the pool. The pool
    is aiohttp's own: where it is not kept as aiohttp 3.14 keeps it, this does nothing."""
    pooled = getattr(session.connector, "_conns", None)
    if not isinstance(pooled, dict):
        return
    for idle in pooled.values():
        for entry in list(idle):
            protocol = entry[0] if isinstance(entry, tuple) and len(entry) == 2 else None
            transport = getattr(protocol, "transport", None)
            if transport is None:
                continue
            # bytes read that no request asked for, or closing; or idle as long as the server keeps it (aiohttp
            # puts a connection back with the time.monotonic() it was put back at)
            if getattr(protocol, "should_close", False) or time.monotonic() - entry[1] >= kept_s:
                protocol.close()
                continue
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.fileno() >= 0 and _readable_now(sock):
                protocol.close()


# What a connection that this machine could not make is told (not "is the server running?")
_LOCAL_FAULTS = {
    errno.EMFILE: "this process has no file descriptor left (ulimit -n), nor a connection to make",
    errno.ENFILE: "this machine has no file descriptor left, nor a connection to make",
    errno.EADDRNOTAVAIL: "no local port was free to connect from: many connections opened and closed at once "
                         "leave theirs waiting (TIME_WAIT); keep a Client and reuse it",
    errno.ENETUNREACH: "this machine has no route to that network: is the address right, and the network up?",
    errno.EHOSTUNREACH: "this machine has no route to that host: is the address right, and the host up?",
}


class _Unconnected(Exception):
    """A connection that could not be made for a reason other than a refusal (its cause says which)."""


def _connect(connection: http.client.HTTPConnection) -> None:
    """Connect ``connection`` (a TLS handshake's failure is the caller's to tell apart)."""
    try:
        connection.connect()
    except (ConnectionRefusedError, socket.gaierror, ssl.SSLError, TimeoutError):
        raise
    except OSError as exc:
        raise _Unconnected() from exc


KEEP_ALIVE_MARGIN_S = 1.0  # an idle connection is used this long before the server's Keep-Alive timeout at most
# (or half that timeout, if less: a server keeping connections 1 s had every request open a new one)
_KEEP_ALIVE = re.compile(r"(?:^|[,;\s])timeout\s*=\s*(\d+(?:\.\d*)?)", re.I)


def _kept_for(headers: Mapping[str, str]) -> float:
    """How long a kept-alive connection may wait for its next request: what the server's ``Keep-Alive:
    timeout=N`` says it keeps one idle (easyserve's ``KeepAliveTimeoutS``), less :data:`KEEP_ALIVE_MARGIN_S`
    (or N/2).
    A request sent as the server closes one is lost, and said "may have run" though it was never read: a
    client calling every 15 s met the server's 15 s now and then. Unsaid: as long as it stays open."""
    found = _KEEP_ALIVE.search(headers.get("Keep-Alive", ""))
    if found is None:
        return math.inf
    kept = float(found[1])
    return kept - min(KEEP_ALIVE_MARGIN_S, kept / 2)


_NOT_HTTP = (http.client.BadStatusLine, http.client.LineTooLong, http.client.UnknownProtocol)


def predict(url: str, data: Any = None, /, *, timeout: float | None = 60.0, api_key: str | None = None,
            **fields: Any) -> Any:
    """One request to the server at ``url``: ``predict("http://127.0.0.1:9876", "cat.jpg")``."""
    with Client(url, timeout=timeout, api_key=api_key) as client:
        return client.predict(data, **fields)


_QUERY = re.compile(r"(https?://[^\s?#]*)\?\S*")  # a URL's query string, in a library's message





