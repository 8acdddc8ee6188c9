"""Talking to a running server: ``Client(url).predict(...)`` from Python, ``easyserve predict`` from the shell.

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
import html
import http.client
import io
import json
import math
import mimetypes
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
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .deadlines import DEADLINES
from .npy import NPY, read_npy, to_npy
from .tensors import from_torch
from .errors import (
    DIED_TWICE,
    BadRequest,
    EasyServeError,
    Forbidden,
    HandleError,
    NoAnswer,
    NotFound,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    Timeout,
    Unauthorized,
    UnsupportedMediaType,
    WorkerDied,
    retry_after_seconds,
)

__all__ = ["Client", "predict", "encode"]

DEFAULT_URL = "http://127.0.0.1:9876"
_ERRORS: dict[int, type[EasyServeError]] = {
    400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 408: RequestTimeout, 413: PayloadTooLarge,
    415: UnsupportedMediaType, 429: Overloaded, 500: HandleError, 503: NotReady, 504: Timeout,
    502: NotReady,  # 502: a balancer in front (nginx) with no server left to try
}
# the server's routes other than /predict: a Client given one sent to ROUTE/predict, and answered 404
ROUTES = re.compile(r"/(stats|metrics|health|ready)$|^/v2$|/v2/(models|health)(/|$)")
_MAGIC = [  # what the first bytes of a file say it is: common image formats, and a numpy .npy file
    (b"\x93NUMPY", NPY), (b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF8", "image/gif"), (b"BM", "image/bmp"), (b"II*\x00", "image/tiff"), (b"MM\x00*", "image/tiff"),
]


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
        self._headers = {**_own_headers(headers), "Accept": f"{accept}, */*;q=0.1"}
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
        body, content_type = encode(data, _fields(fields), self.key, self.npy)
        status, headers, payload = self._post(body, content_type)
        return _answer(self._shown, status, headers, self._decoded(status, headers, payload))

    def _decoded(self, status: int, headers: Mapping[str, str], payload: bytes | bytearray) -> bytes | bytearray:
        """``payload`` inflated, if the server compressed it although this client asked it not to (as
        the async client's aiohttp inflates it): its gzip bytes were a body "that is not JSON", an
        error's message garbled, and a binary answer returned still compressed, as if it were the answer."""
        encoding = headers.get("Content-Encoding", "").strip().lower()
        if encoding in ("", "identity"):
            return payload
        if encoding not in ("gzip", "x-gzip", "deflate"):
            raise _unusable(f"{self._shown} answered {status} in Content-Encoding {encoding!r}, which this client "
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
            raise _unusable(f"{self._shown} answered {status} with a {encoding} body that cannot be read: {exc}") \
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
            except (ConnectionRefusedError, socket.gaierror) as exc:
                connection.close()
                raise self._unreachable(exc) from None
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
                self._checkin(connection, closes)
            return response.status, response.headers, payload
        raise AssertionError("unreachable")  # pragma: no cover

    def _no_tls(self, exc: BaseException) -> NoAnswer:
        """The error for a TLS handshake that failed: the client's refusal (a certificate it does not
        trust), or a server that speaks no TLS; neither is a server that closed the connection."""
        return NoAnswer(f"the TLS handshake with {self._shown_base} failed ({type(exc).__name__}: {_one_line(exc)}): "
                        "a server whose certificate a private CA signed needs that CA in SSL_CERT_FILE, and one "
                        "without TLS is reached with http://")

    def _unreachable(self, exc: object) -> NoAnswer:
        """The error for a server that refused the connection, or whose name did not resolve."""
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
        return _unusable(f"{self._shown} answered more than max_answer_mb={self.max_answer_mb:g} MB; "
                         f"the rest was not read ({self._larger} for a larger one)")

    def _late(self) -> Timeout:
        late = Timeout(f"no answer from {self._shown} within {self.timeout:g} s")
        late.status = None  # type: ignore[assignment]  # no server said 504, as its class's status would
        return late

    def _not_http(self, exc: object) -> EasyServeError:
        return _unusable(f"{self._shown_base} answered something that is not HTTP ({_one_line(exc)}): "
                         "is this an easyserve server?")

    def _checkout(self) -> tuple[http.client.HTTPConnection, bool]:
        """A kept-alive connection that the server has not closed (and whether it is one), else a new one."""
        if self._pid != os.getpid():
            self._forget_parents()
        with self._lock:
            while self._idle:
                connection = self._idle.pop()
                if _open_and_quiet(connection):
                    return connection, True
                connection.close()  # the server closed it while it was idle (KeepAliveTimeoutS, a restart)
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

        body, content_type = encode(data, _fields(fields), self.key, self.npy)
        session, loop = _SESSIONS.get().get(self, (None, None))
        if session is not None and not session.closed and loop is asyncio.get_running_loop():
            _drop_closed(session)
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
        except aiohttp.ClientResponseError as exc:  # what aiohttp raises for an answer it cannot parse
            raise self._not_http(exc.message) from None
        except aiohttp.ClientError as exc:  # the server closed the connection, or a body was cut short
            if session.closed:  # not the server: the `async with client:` block it was sent in has ended
                raise NoAnswer(f"the request to {self._shown} was left unanswered: the `async with` block of the "
                               "client it was sent in ended before its answer came (await the calls a block "
                               "starts before it ends); the server may have run it") from None
            # aiohttp's words name the URL, its ?token=... with it
            said = _QUERY.sub(r"\1", _one_line(exc))
            raise NoAnswer(f"{self._shown_base} closed the connection without answering "
                           f"({type(exc).__name__}: {said}); the request may have run") from None
        return _answer(self._shown, response.status, response.headers,
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


_IN_THIS_PROCESS = ("_idle", "_lock", "_pid", "_deadlines", "_tokens", "_closes")  # what _start_in_this_process sets
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


def _joined(url: str, location: str) -> str:
    """Where a redirect's ``Location`` points from ``url``; as it is written where it is no URL (an
    unclosed ``[``: a ValueError, where every error of a call is an EasyServeError)."""
    try:
        return urllib.parse.urljoin(url, location)
    except ValueError:
        return location


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


def _drop_closed(session: Any) -> None:
    """Close the connections of ``session``'s pool that may not carry another request: those the server
    has closed, as :func:`_open_and_quiet` finds them, and those holding bytes no request asked for.
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
            if getattr(protocol, "should_close", False):  # bytes read that no request asked for, or closing
                protocol.close()
                continue
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.fileno() >= 0 and _readable_now(sock):
                protocol.close()


_NOT_HTTP = (http.client.BadStatusLine, http.client.LineTooLong, http.client.UnknownProtocol)


def predict(url: str, data: Any = None, /, *, timeout: float | None = 60.0, api_key: str | None = None,
            **fields: Any) -> Any:
    """One request to the server at ``url``: ``predict("http://127.0.0.1:9876", "cat.jpg")``."""
    with Client(url, timeout=timeout, api_key=api_key) as client:
        return client.predict(data, **fields)


# -- what goes over the wire ----------------------------------------------------------------------------


def _own_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """``Client(url, headers=...)``, checked: names HTTP allows, values on one line, none of those the
    client writes itself."""
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise TypeError(f"headers: expected a dict of header name -> value, not {type(headers).__name__}")
    for name, value in headers.items():
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"headers: {name!r} is no header name (letters, digits and -_.!#$%&'*+^`|~)")
        if name.lower() in _WRITTEN:
            raise ValueError(f"headers: {name} is written by the client itself"
                             + (" (api_key= sends a key)" if name.lower() == "authorization" else ""))
        if not isinstance(value, str) or not value.isprintable():
            raise ValueError(f"headers: the value of {name} must be text on one line, without control characters")
    return dict(headers)


_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")  # RFC 9110's token
_WRITTEN = {"accept", "authorization", "connection", "content-encoding", "content-length", "content-type", "expect",
            "host", "transfer-encoding"}


def _fields(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` of a call to :meth:`Client.predict`, none of them named as the client's own settings:
    ``predict(x, timeout=5)`` sent ``"timeout": 5`` to the handle and waited the client's 60 s, and
    ``api_key=`` put the key in the body, for the handle to see (and log), and was refused its 401."""
    for name in ("timeout", "api_key", "npy", "max_answer_mb", "headers"):
        if name in fields:
            raise TypeError(f"{name}= is a setting of the Client (Client(url, {name}=...)), not a field of a request; "
                            f"for a field of that name, put it in the dict: predict({{{name!r}: ...}})")
    return fields


def encode(data: Any, fields: Mapping[str, Any] | None = None, key: str = "img",
           npy: bool = False) -> tuple[bytes, str]:
    """The request body and its Content-Type for ``predict(data, **fields)``: an array is sent as
    ``.npy`` when ``npy`` is set or when it is not an image (PNG takes uint8 (H, W[, 3|4]) arrays)."""
    fields = dict(fields or {})
    if isinstance(data, np.ma.MaskedArray):  # as .npy or PNG, its hidden values would go as if they were data
        raise TypeError(_MASKED)
    if isinstance(data, np.generic):  # a numpy scalar (np.float32(3)): as the 0-d array it stands for
        data = np.asarray(data)
    tensor = from_torch(data)
    if tensor is not None:  # a torch tensor: as the array it holds
        data = tensor
    if isinstance(data, np.ndarray) and not fields and (npy or not _is_image(data)):
        body = to_npy(data)
        if body is None:
            raise TypeError(f"cannot send a {data.dtype} array: only numbers and booleans travel as .npy")
        return body, NPY
    if isinstance(data, np.ndarray) and not _is_image(data):  # and fields: told it was no image
        raise TypeError(f"a {data.dtype} array of shape {data.shape} cannot go with fields ({', '.join(fields)}): "
                        "an array that is not an image travels alone, as .npy; send it alone, or put it in the "
                        "dict with them (as array.tolist())")
    if data is None:
        if not fields:
            raise TypeError("nothing to send: pass a dict, a file path, bytes or an image array")
        return _json(fields)
    if isinstance(data, Mapping):
        return _json({**data, **fields})
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not _is_file(path):
            raise FileNotFoundError(f"no file {_name(str(path))!r} to send (to send text, put it in a dict)")
        if path.suffix.lower() == ".json":
            try:
                body = json.loads(path.read_bytes())  # UTF-8, or the UTF-16/32 a BOM or zero bytes show
            except RecursionError:
                raise ValueError(f"{path} is JSON nested too deeply to read") from None
            except ValueError as exc:
                raise ValueError(f"{path} is not valid JSON: {exc}") from None
            if not isinstance(body, dict):
                raise ValueError(f"{path} must hold a JSON object, such as {{\"img\": \"<base64>\"}}")
            return _json({**body, **fields})
        raw = path.read_bytes()
        guessed = mimetypes.guess_type(path.name)[0] or ""
        content_type = _sniff(raw) or (guessed if guessed.startswith("image/") else "application/octet-stream")
    elif isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
        content_type = _sniff(raw) or "application/octet-stream"
    else:
        raw, content_type = _png(data), "image/png"
    if fields:
        return _json({key: base64.b64encode(raw).decode(), **fields})
    return raw, content_type


def _is_file(name: str | os.PathLike) -> bool:
    """Whether ``name`` names a file to read: a regular one, or a pipe or device (``<(cmd)``,
    ``/dev/stdin``), which were "no file". Text given for one (base64, JSON) is none: past 255
    characters, Path.is_file raised OSError (File name too long)."""
    try:
        path = Path(name)
        return path.exists() and not path.is_dir()
    except OSError:
        return False


def _name(name: str) -> str:
    """``name`` for a message: its first 100 characters (text given for a file's name may be megabytes)."""
    return name if len(name) <= 100 else f"{name[:100]}..."


def _json(body: Mapping[str, Any]) -> tuple[bytes, str]:
    try:
        return (json.dumps(body, default=_json_default, separators=(",", ":"), allow_nan=False).encode(),
                "application/json")
    except RecursionError:
        raise ValueError("cannot send the request as JSON: it is nested too deeply") from None
    except ValueError as exc:  # a dict or list inside itself (once told as NaN or infinity), or NaN or
        # infinity, which JSON has no numbers for: the server refused them, once sent whole
        if "Circular reference" in str(exc):
            raise ValueError("cannot send the request as JSON: it holds a dict or list inside itself") from None
        raise ValueError("cannot send the request as JSON: it holds NaN or infinity, which JSON has no numbers "
                         "for; send the array itself as .npy (Client(url, npy=True).predict(array)), which "
                         "carries them") from None


_MASKED = "cannot send a masked array: send array.filled(value), or array.data"


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ma.MaskedArray):  # its hidden values went as null
        raise TypeError(_MASKED)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode()
    tensor = from_torch(value)
    if tensor is not None:
        return tensor.tolist()
    raise TypeError(f"cannot send a {type(value).__name__} as JSON")


def _sniff(raw: bytes) -> str | None:
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "image/webp"
    return next((kind for magic, kind in _MAGIC if raw.startswith(magic)), None)


def _png(image: Any) -> bytes:
    from PIL import Image

    if not isinstance(image, Image.Image):
        if not isinstance(image, np.ndarray):
            raise TypeError(f"cannot send a {type(image).__name__}: pass a dict, a file path, bytes, "
                            "a numpy image or a PIL image")
        pixels = image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image
        if not _is_image(image):
            raise ValueError(f"an image array must be uint8 of shape (H, W), (H, W, 3) RGB or (H, W, 4) RGBA; "
                             f"got {pixels.dtype} {pixels.shape} (for floats in 0..1: (x * 255).astype(np.uint8))")
        image = Image.fromarray(np.ascontiguousarray(pixels))
    else:
        image = _upright_and_storable(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # lossless, and fast rather than small
    return buffer.getvalue()


def _upright_and_storable(image: Any) -> Any:
    """A PIL image as a PNG can hold it, and as it is seen: a PNG carries no EXIF orientation, and a
    phone's photo opened with Pillow (stored on its side, with the tag that turns it) reached the server
    on its side, where the same file sent by path was turned upright; and a CMYK JPEG (a print shop's)
    or an image of another colour space was a bare ``OSError`` from PNG's encoder."""
    from PIL import ImageOps

    if image.mode == "F":
        raise TypeError("cannot send a PIL image of floating-point values (mode F): scale it to 8 bits first, "
                        "as image.point(...) or a numpy uint8 array")
    if image.mode == "I":  # 32-bit integers: sent as 16 bits where they fit (a PNG holds no more)
        low, high = image.getextrema() if image.width and image.height else (0, 0)
        if low < 0 or high > 0xFFFF:
            raise TypeError(f"cannot send a PIL image of 32-bit integers from {low} to {high} (mode I): scale it "
                            "to 8 or 16 bits first")
    upright = ImageOps.exif_transpose(image)
    convert = _PNG_MODES.get(upright.mode)
    return upright.convert(convert) if convert else upright


# modes a PNG cannot hold, as the mode it holds them in
_PNG_MODES = {"CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB", "RGBX": "RGB", "PA": "RGBA", "La": "LA",
              "RGBa": "RGBA", "I": "I;16", "I;16L": "I;16", "I;16N": "I;16"}


def _is_image(array: np.ndarray) -> bool:
    channels = array.shape[2] if array.ndim == 3 else None  # an empty one is no PNG: Pillow refuses it
    return array.dtype == np.uint8 and (array.ndim == 2 or channels in (1, 3, 4)) and array.size > 0


def _unusable(message: str) -> EasyServeError:
    """An answer the client cannot use (an HTML page, a body that is not what it says): its ``status`` is
    ``None``, where its class's 500 read as the server's."""
    error = EasyServeError(message)
    error.status = None  # type: ignore[assignment]
    return error


def _answer(url: str, status: int, headers: Mapping[str, str], payload: bytes | bytearray) -> Any:
    """What a call to ``url`` returns for this answer, or the error it raises."""
    content_type = headers.get("Content-Type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    if 300 <= status < 400:
        where = _shown(_joined(url, headers["Location"])) if headers.get("Location") else "nowhere"
        error = EasyServeError(f"{url} answered {status}, a redirect to {where}; the client does not follow "
                               "redirects: if that is the server, use its URL")
        error.status = status
        raise error
    # A wrong URL that reached some other web server: its page, or a sidecar's "OK", is no answer. easyserve's own
    # bytes (a handle's easyserve.Binary) are kept: its answers name it in Server, and carry their request's
    # X-Request-Id, which a proxy that writes its own Server header (Envoy, under KServe) passes on.
    if 200 <= status < 300 and content_type and not _is_json(content_type) and not (
            headers.get("Server", "").startswith("easyserve") or "X-Request-Id" in headers):
        title = _html_title(payload) if media == "text/html" else None
        what = "an HTML page" if media == "text/html" else f"{_shown(media)[:100]!r} with no mark of easyserve's"
        raise _unusable(f"{url} answered {what}{f' ({title!r})' if title else ''}: is this an easyserve server?")
    if 200 <= status < 300 and media == NPY:
        try:
            # checked as the server checks one; writable, as np.load's
            return read_npy(payload if isinstance(payload, bytearray) else bytearray(payload))
        except BadRequest as exc:
            raise _unusable(f"the server answered {status} with a .npy body that cannot be read: {exc}") from None
    if 200 <= status < 300 and content_type and not _is_json(content_type):
        return bytes(payload)  # a handle's easyserve.Binary (an image, audio), as it was given
    try:
        value, unread = json.loads(payload), ""
    except RecursionError:
        value, unread = None, "JSON nested too deeply to read"
    except ValueError:
        value, unread = None, f"a body that is not JSON: {bytes(payload[:200])!r}"
    if 200 <= status < 300:
        if unread:
            raise _unusable(f"the server answered {status} with {unread}")
        return value
    # a server's words, in an exception a script may print to a terminal: no escape sequence of theirs
    if isinstance(value, dict) and isinstance(value.get("error"), str):
        message = _shown(value["error"])
    else:  # not easyserve's own refusal (a proxy's page): one line, of what it says
        text = _html_title(payload) if media == "text/html" else payload.decode(errors="replace")
        message = _one_line(text) or http.client.responses.get(status, "error")
        if media == "text/html":  # "Error response" alone told nothing of where it came from
            message += f" (an HTML page from {url}, not an easyserve answer)"
    kind = _ERRORS.get(status, BadRequest if 400 <= status <= 499 else EasyServeError)  # 4xx: the request's fault
    if status == 500 and message.endswith(DIED_TWICE):  # not the handle's exception: worth retrying elsewhere
        kind = WorkerDied
    if kind in (Overloaded, NotReady) and headers.get("Retry-After"):
        error = kind(message, retry_after=_seconds(headers["Retry-After"]))
    else:
        error = kind(message)
    error.status = status
    error.request_id = headers.get("X-Request-Id")  # what the server's log calls it, beside its traceback
    raise error


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _html_title(payload: bytes | bytearray) -> str:
    found = re.search(rb"<title[^>]*>(.*?)</title", payload[:65536], re.IGNORECASE | re.DOTALL)
    return _one_line(html.unescape(found[1].decode(errors="replace"))) if found else ""


_QUERY = re.compile(r"(https?://[^\s?#]*)\?\S*")  # a URL's query string, in a library's message


def _one_line(text: object, limit: int = 200) -> str:
    """``text`` on one line, cut short: a proxy's error page or a banner that is not HTTP goes in a message."""
    line = _shown(" ".join(str(text).split()))
    return line if len(line) <= limit else line[:limit - 3] + "..."


MAX_RETRY_AFTER_S = 3600.0  # a Retry-After beyond this (or inf) is taken as this


def _seconds(value: str) -> float:
    """A ``Retry-After`` in seconds, from 0 to ``MAX_RETRY_AFTER_S``: a number, or an HTTP-date (1 if neither)."""
    seconds = retry_after_seconds(value, MAX_RETRY_AFTER_S)
    return 1.0 if seconds is None else seconds


# -- `easyserve predict` ------------------------------------------------------------------------------


def run_predict(url: str, file: str | None = None, data: str | None = None, timeout: float | None = 60.0,
                api_key: str | None = None, output: Path | None = None, max_answer_mb: float | None = 1024,
                header: Sequence[str] = ()) -> int:
    """``easyserve predict URL [FILE] [--data JSON] [-o OUTPUT] [-H 'Name: value']...``: print the answer
    as JSON, or write it to ``output``; a binary answer goes to standard output only where that is not a
    terminal. A ``timeout`` of 0 (or ``None``, or inf) waits for ever. Returns the exit status."""
    import typer

    def usage(message: str) -> int:  # the command's mistake, as the CLI's own: exit status 2
        typer.secho(message, fg=typer.colors.RED, err=True)
        return 2

    fields, problem = _read_json(data) if data else ({}, None)
    if problem:
        return usage(f"--data is {problem}")
    if not isinstance(fields, dict):
        return usage(f"--data must be a JSON object such as '{{\"x\": [1, 2]}}', got {_one_line(data, 60)!r}")
    if file is None and not data:
        return usage("nothing to send: give a FILE (an image, a .json file, - for standard input) or --data JSON")
    if timeout is not None and not timeout >= 0:
        return usage(f"--timeout: expected seconds, 0 or more (0 waits for ever), got {timeout:g}")
    if max_answer_mb is not None and not max_answer_mb > 0:
        return usage(f"--max-answer-mb: expected megabytes above 0, got {max_answer_mb:g}")
    if api_key and not api_key.isprintable():  # in the command's words: Client names its own argument
        return usage("--api-key: expected a key without line breaks or control characters (value hidden)")
    headers = {}
    for line in header:
        name, colon, value = line.partition(":")
        if not colon:
            return usage(f"--header: expected 'Name: value', got {_one_line(line, 60)!r}")
        headers[name.strip()] = value.strip()
    try:
        _own_headers(headers)
    except ValueError as exc:
        return usage("--header" + str(exc).removeprefix("headers"))
    source: Any = file
    if file not in (None, "-") and not _is_file(file):  # said in the command's words, not Client's
        typer.secho(_shown(f"no file {_name(file)!r} to send (to send JSON, give it with --data '{{...}}'; "
                           "- reads standard input)"), fg=typer.colors.RED, err=True)
        return 1
    piped = file not in (None, "-") and not Path(file).is_file()  # <(cmd), /dev/stdin on a pipe: read as - is
    if file == "-" or piped:
        try:
            source = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
        except OSError as exc:
            typer.secho(_shown(f"cannot read {_name(file)!r}: {exc.strerror or exc}"), fg=typer.colors.RED, err=True)
            return 1
        if _starts_an_object(source):  # a JSON object, sent as JSON (as a .json file is), not as bytes
            source, problem = _read_json(source)
            if problem:
                where = "standard input" if file == "-" else _name(file)
                return usage(f"{where} starts like a JSON object but is {problem}")
    if file is None:  # --data alone is the body, {} too (a handle whose options are in the URL's query)
        source, fields = fields, {}
    try:
        with Client(url, timeout=timeout or None, api_key=api_key, max_answer_mb=max_answer_mb,
                    headers=headers) as client:
            client._larger = "--max-answer-mb MB"
            answer = client.predict(source, **fields)
    except EasyServeError as exc:
        status = vars(exc).get("status")  # the status the server answered; not a class's own (a Timeout's 504)
        message = f"{status} error: {exc}" if status else str(exc)
        if status == 401:  # the server's words are for any client: this command takes the key so
            message += " (give it in $EASYSERVE_API_KEY, or with --api-key KEY, which every user of the machine sees)"
        named = vars(exc).get("request_id")
        typer.secho(_shown(message + (f" (request {named})" if named and status >= 500 else "")),
                    fg=typer.colors.RED, err=True)
        return 1
    except (OSError, ValueError, TypeError) as exc:
        typer.secho(_shown(str(exc)), fg=typer.colors.RED, err=True)
        return 1
    if isinstance(answer, np.ndarray) and (output is not None or sys.stdout is None or not sys.stdout.isatty()):
        answer = to_npy(answer) or b""  # an .npy answer, written as it came (it was a traceback)
    elif isinstance(answer, np.ndarray):  # on a terminal: its values, as JSON
        answer = answer.tolist()
    if not isinstance(answer, bytes):
        try:
            text = pretty_json(answer)
        except RecursionError:  # nested too deeply to indent: on one line
            text = json.dumps(answer, ensure_ascii=False)
        text = _C1.sub(lambda found: f"\\u{ord(found[0]):04x}", text)  # in strings only: JSON escapes the rest
        if output is None:
            return _to_stdout(lambda: typer.echo(text))
        answer = (text + "\n").encode()
    elif output is None:
        if sys.stdout is not None and sys.stdout.isatty():
            typer.secho(f"the answer is {len(answer):,} bytes that are not JSON (an image, a file): write them with "
                        "--output FILE, or redirect standard output", fg=typer.colors.RED, err=True)
            return 1
        return _to_stdout(lambda: sys.stdout.buffer.write(answer))
    try:
        output.write_bytes(answer)
    except OSError as exc:
        typer.secho(f"cannot write the answer to {output}: {exc.strerror or exc}", fg=typer.colors.RED, err=True)
        return 1
    return 0


def _to_stdout(write: Callable[[], Any]) -> int:
    """``write`` the answer to standard output and flush it: 0, or 1 saying why it could not be (a full
    disk, no standard output at all), where a full disk was a traceback and a closed output exited 0 with
    the answer lost. A reader that left (``| head``) is told as before, by ``BrokenPipeError``."""
    import typer

    try:
        if sys.stdout is None:
            raise OSError("there is none (closed)")
        write()
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        typer.secho(f"cannot write the answer to standard output: {exc.strerror or exc}; write it with --output FILE",
                    fg=typer.colors.RED, err=True)
        return 1
    return 0


def _starts_an_object(raw: bytes) -> bool:
    """Whether ``raw`` begins like a JSON object, in any encoding JSON allows, after a byte order mark
    (PowerShell writes one, and UTF-16; such input was sent as bytes)."""
    head = raw[:64].decode(json.detect_encoding(raw[:64]), "replace")  # a byte no text has stays in the way
    return head.lstrip("\ufeff \t\r\n")[:1] == "{"


def _read_json(text: str | bytes) -> tuple[Any, str | None]:
    """The value ``text`` holds, or what is wrong with it (for a message)."""
    try:
        return json.loads(text), None
    except RecursionError:
        return None, "nested too deeply to read"
    except ValueError as exc:
        return None, f"not valid JSON: {exc}"


# What a server's words may not carry to a terminal as they are: control characters (an escape sequence
# can set the window's title, clear the screen and print a fake "all good"), line breaks and tabs kept.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_C1 = re.compile(r"[\x7f-\x9f]")  # the ones JSON leaves as they are (the 8-bit CSI among them)


def _shown(text: str) -> str:
    """``text`` from a server, its control characters written out (``\\x1b``) for a terminal."""
    return _CONTROL.sub(lambda found: f"\\x{ord(found[0]):02x}", text)


def pretty_json(value: Any, indent: int = 0, width: int = 120) -> str:
    """JSON for people: what fits in ``width`` columns stays on one line (a box, one detection), the
    rest is indented, one item a line."""
    flat = json.dumps(value, ensure_ascii=False)
    if indent + len(flat) <= width or not isinstance(value, (dict, list)) or not value:
        return flat
    pad = " " * (indent + 2)
    if isinstance(value, dict):
        items = [f"{pad}{json.dumps(str(k), ensure_ascii=False)}: {pretty_json(v, indent + 2, width)}"
                 for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    items = [pad + pretty_json(v, indent + 2, width) for v in value]
    return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"
