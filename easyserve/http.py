"""The HTTP front: reads request bodies (:mod:`easyserve.reading`), hands them to the pool, answers, and
maps errors to status codes.

``POST /predict`` takes a JSON object (the original format), a raw body (``image/*`` or
``application/octet-stream``, delivered to the handle as ``{"data": bytes, "content_type": ...}``) or a
form (``multipart/form-data`` or urlencoded: text fields as ``str``, files as ``bytes``); a body may
come compressed (``Content-Encoding: gzip`` or ``deflate``).
Every error is ``{"error": "..."}`` with the status of its :mod:`easyserve.errors` class.
What protects the server from slow, greedy or hostile clients lives in :mod:`easyserve.guards`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import random
import re
import time
import warnings
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import orjson
from aiohttp import BadContentDispositionHeader, BadContentDispositionParam, HttpVersion11, web, web_app
from aiohttp.abc import AbstractAccessLogger

from . import wire
from .bodies import Binary, parse_query
from .errors import BadRequest, EasyServeError, NotReady, Unauthorized, UnsupportedMediaType, shortened
from .browsers import PREFLIGHT_HEADERS, BrowserGuard, cors_headers
from .budget import BodyBudget, Reservation
from .guards import SERVER_NAME, GuardedRunner, answer_begins, client_ended, content_coding
from .logs import VISIBLE
from .metrics import encoder, encoding, server_registry
from .npy import NPY, NpyAnswer, wants_npy
from .npy import MAGIC as NPY_MAGIC
from .reading import read_task, too_large
from .stats import Inferences, snapshot

if TYPE_CHECKING:
    from .batching import Pending
    from .config import Config
    from .pool import WorkerPool

__all__ = ["make_app", "make_runner"]

log = logging.getLogger("easyserve")

# aiohttp warns about a malformed Content-Disposition (the client's mistake, answered 400 here) with
# warnings.warn, which writes to stderr on the event loop's thread, once per distinct text: a client
# sending new texts could fill memory with them and, with stderr a full pipe, block the loop in write().
warnings.filterwarnings("ignore", category=BadContentDispositionHeader)
warnings.filterwarnings("ignore", category=BadContentDispositionParam)

POOL = web.AppKey("pool", object)
MAX_BODY = web.AppKey("max_body", int)
KEEP_ALIVE = web.AppKey("keep_alive", str)  # the Keep-Alive header of an answer whose connection stays open
API_KEY = web.AppKey("api_key", str)
BUDGET = web.AppKey("budget", BodyBudget)
BROWSER = web.AppKey("browser", BrowserGuard)
REPORTS = web.AppKey("reports", object)  # what /ready, /stats and /metrics read (LocalReports, or a front's)
OPEN_PATHS = ("/health", "/ready")  # for load balancers: no Host or Origin checks
OPEN_PATHS += ("/v2/health/live", "/v2/health/ready")  # the same, in the Open Inference Protocol
COUNTED = {("POST", "/predict")}  # routes whose answers the stats count by status and time
# the Open Inference Protocol's inference routes, by their patterns
COUNTED |= {("POST", "/v2/models/{name}/infer"), ("POST", "/v2/models/{name}/versions/{version}/infer")}
# when easyserve's code first saw the request (time.perf_counter()); aiohttp 3.13 added typed keys
ARRIVED = web.RequestKey("arrived", float) if hasattr(web, "RequestKey") else "easyserve.arrived"
# an answer written in pieces (see body_response): counted once written whole, or its client gone, not as it begins
STREAMED = web.RequestKey("streamed", bool) if hasattr(web, "RequestKey") else "easyserve.streamed"
# refused for its framing (see _misframed): counted as malformed, as the parser's refusals are, not by status
MISFRAMED = web.RequestKey("misframed", bool) if hasattr(web, "RequestKey") else "easyserve.misframed"
# what the request is called (see request_id)
REQUEST_ID = web.RequestKey("request_id", str) if hasattr(web, "RequestKey") else "easyserve.request_id"
# a client's own X-Request-Id, taken as it is: printable ASCII without spaces, as a log line can quote it
CLIENT_REQUEST_ID = re.compile(r"[!-~]{1,200}")
# The server's own ids need only be unique, not unguessable (a client names its requests as it likes):
# drawn from a generator seeded from the system's, and seeded again in a forked child, where secrets'
# token_hex made a system call and a SystemRandom's bytes a request (see RESULTS, "partly won back").
_IDS = random.Random()
os.register_at_fork(after_in_child=_IDS.seed)
BODY_PIECE = 1 << 20  # answers this large or larger are written in pieces this large (see body_response)


def make_app(pool: WorkerPool, config: Config, reports: Any = None,
             budget: BodyBudget | None = None) -> web.Application:
    """The aiohttp application serving one pool; with an API key, /predict, /stats and /metrics require it.

    ``budget`` bounds the body bytes held (default: ``MaxBufferedMB`` for this process alone).
    ``reports`` answers /ready, /stats and /metrics: by default the pool's own (:class:`LocalReports`);
    an HTTP front process (:mod:`easyserve.front`) passes its way of asking the server process."""
    max_body = int(config.max_body_mb * 2**20)
    app = web.Application(client_max_size=max_body, middlewares=[_checked])
    app[POOL] = pool
    app[MAX_BODY] = max_body
    # How long a connection waits idle for a next request (whole seconds, as clients read them; under a
    # second, as it is): a client sending one as the server closes it loses it, so easyserve's Client uses
    # it a second less (half as long, under 2 s). Made once: every answer sends it
    kept = config.keep_alive_timeout_s
    app[KEEP_ALIVE] = f"timeout={int(kept) if kept >= 1 else kept:g}"
    app[BUDGET] = budget or BodyBudget(int(config.max_buffered_mb * 2**20))
    app[BROWSER] = BrowserGuard(config.host, config.allowed_hosts, config.cors_origins)
    app[REPORTS] = reports or LocalReports(pool, app[BUDGET], server_registry(pool, app[BUDGET]))
    if config.required_key:
        app[API_KEY] = config.required_key
    app.router.add_post("/predict", predict, expect_handler=_expect_predict)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/stats", stats)
    app.router.add_get("/metrics", metrics)
    # /health and /ready too: a page's fetch that sends the key (Authorization) asks first, and got 405
    for path in ("/predict", "/stats", "/metrics", "/health", "/ready"):
        app.router.add_route("OPTIONS", path, preflight)
    from .v2.routes import add_routes  # here: the v2 routes are built on this module's request path

    add_routes(app)
    app.on_response_prepare.append(_on_response_prepare)
    return app


def forget_apps() -> None:
    """Let stopped servers' apps go. aiohttp keeps the middleware chain it built for each route it served,
    in a cache (of 1,024) keyed by the apps it went through: a stopped server's app, and through it its
    pool, counters and the workers' last log lines, stayed in memory, 0.35 MB for each start and stop of
    a server in a notebook. Emptied as a server stops; a running server's chains are built again on its
    next request (microseconds). Where aiohttp has no such cache, nothing is done."""
    clear = getattr(getattr(web_app, "_cached_build_middleware", None), "cache_clear", None)
    if clear is not None:
        clear()


def make_runner(app: web.Application, config: Config, answers_mb: float | None = None) -> GuardedRunner:
    """The runner that serves ``app``, with the connection limits ``config`` sets; ``answers_mb``, the
    bytes of answers its slow readers may hold together (MaxBufferedMB where it is the only front)."""
    return GuardedRunner(
        app, header_timeout=config.header_timeout_s, body_timeout=config.body_timeout_s,
        error_response=error_response, malformed=lambda: app[POOL].stats.record_malformed(),
        answers_budget=(config.max_buffered_mb if answers_mb is None else answers_mb) * 2**20,
        slow_reset=lambda: app[POOL].stats.record_slow_reset(),
        head_timed_out=lambda: app[POOL].stats.record_head_timed_out(),
        keepalive_timeout=config.keep_alive_timeout_s,
        # inflating is ours (easyserve.guards.Inflater): bounded, and off the event loop
        auto_decompress=False,
        # a request whose client has gone is dropped before it runs
        handler_cancellation=True,
        access_log=ACCESS_LOG if config.access_log else None, access_log_class=AccessLine,
        handle_signals=False, shutdown_timeout=2.0,
    )


ACCESS_LOG = logging.getLogger("easyserve.access")
AGENT_CHARS = 200  # of a client's User-Agent, in its line


class AccessLine(AbstractAccessLogger):
    """``AccessLog: true``: a line for every request answered, at INFO on ``easyserve.access``::

        127.0.0.1 "POST /predict HTTP/1.1" 200 52 B 3.1 ms id=9f2c... "curl/8.5.0"

    What a client wrote (its path, its User-Agent, its request id) has its control characters, quotes and
    backslashes written out (``\\x1b``, ``\\x22``), so that no line can pass for two, no field end early,
    nor a terminal be sent an escape sequence. With ``HttpWorkers`` above 1, each front sends its lines
    to the server process, which logs them (see ``front.AccessLines``)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, seconds: float) -> None:
        version = request.version
        # from when easyserve first saw it, by a clock finer than the loop's, whose milliseconds (uvloop's)
        # wrote nearly every line's time as a whole number, and a fast request's as 0.0 ms
        arrived = request.get(ARRIVED)
        if arrived is not None:
            seconds = time.perf_counter() - arrived
        self.logger.info('%s "%s %s HTTP/%d.%d" %d %d B %.1f ms id=%s "%s"', request.remote or "-",
                         _quoted(request.method), _quoted(request.raw_path), version.major, version.minor,
                         response.status, response.body_length, seconds * 1000,
                         _quoted(response.headers.get("X-Request-Id", "-")),
                         _quoted(request.headers.get("User-Agent", "-")[:AGENT_CHARS]))


# A client's text in an access line: its control characters, and the quote and backslash that would
# let it end its field early or pass for an escape the line wrote, written out, as nginx writes them
_ACCESS_VISIBLE = {**VISIBLE, ord('"'): "\\x22", ord("\\"): "\\x5c"}


def _quoted(text: str) -> str:
    return text.translate(_ACCESS_VISIBLE)


def _cut(request: web.Request, response: web.StreamResponse, stats: Any) -> None:
    """Count an answer whose connection ended as it was written: a client that went never had it (not a
    200), but one the server reset for the room slow readers held (``guards.SlowReaders``) was given its
    answer, and is in ``statuses`` as a shorter answer is, not taken for a client gone."""
    if getattr(request.protocol, "cut_for_room", False):
        stats.record_answer(response.status, None)  # no time to its end: it had none
    else:
        stats.record_gone()


async def predict(request: web.Request) -> web.Response:
    try:
        # the query string (?top_k=5) goes to the handle as task["parameters"], parsed there, not here
        status, payload, pending = await queued(request, _read_predict, request.rel_url.raw_query_string)
    except EasyServeError as exc:
        return _answer(exc)
    if status == 200:  # a worker answers JSON, .npy when asked and the result is an array, or the handle's Binary
        if isinstance(payload, Binary):
            return await body_response(request, payload.data, payload.content_type)
        return await body_response(request, payload, NPY if payload[:6] == NPY_MAGIC else "application/json")
    return error_response(status, payload, pending.retry_after)


async def body_response(request: web.Request, body: bytes | bytearray | memoryview, content_type: str,
                        headers: dict[str, str] | None = None) -> web.StreamResponse:
    """``body`` as a 200 answer, with ``headers`` besides its Content-Type (a v2 binary answer's JSON
    length); a large one written a piece at a time, each piece drained before the next: aiohttp writes
    a whole body at once, copying what the socket does not take (and, for ``writelines``, joining it
    first), which held the event loop 0.2 s for a 200 MB answer."""
    headers = {"Content-Type": content_type, **(headers or {})}
    size = len(body) if type(body) is bytes else memoryview(body).nbytes  # (a view's len counts its items)
    if size < BODY_PIECE:
        return web.Response(body=body, headers=headers)
    view = memoryview(body).cast("B")
    response = web.StreamResponse(headers=headers)
    response.content_length = size
    request[STREAMED] = True
    await response.prepare(request)
    stats = request.app[POOL].stats
    try:  # a client that reads nothing of it for BodyTimeoutS has its connection reset (guards)
        with stats.writing_answer():
            for at in range(0, size, BODY_PIECE):
                await response.write(view[at : at + BODY_PIECE])
            await response.write_eof()
    except ConnectionError:  # the client went: nothing more to write, nobody to answer
        _cut(request, response, stats)
        return response
    except asyncio.CancelledError:  # the same, seen by the handler (handler_cancellation)
        _cut(request, response, stats)
        raise
    now = time.perf_counter()  # written whole: its time runs to the last byte, a slow reader's included
    stats.record_answer(response.status, now - request.get(ARRIVED, now))
    return response


async def queued(request: web.Request, read: Callable[[web.Request, Reservation], Awaitable[Any]],
                 query: str = "") -> tuple[int, Any, Pending]:
    """Run one request through the queue: admit it, turn its body into a task with ``read`` (which
    grows the reservation as the body arrives), submit the task (with ``query``, the URL's query string
    for the handle) and wait for its answer.

    Returns ``(status, payload, pending)``: the worker's answer (bytes, or an error's message) and the
    request's queue entry (its ``retry_after``). Raises what refuses it before it is queued.
    """
    pool: WorkerPool = request.app[POOL]
    _admit(request)
    headers = passed_headers(request, pool.config.pass_headers)  # refused (not UTF-8) before the body is read
    # the body's bytes count against MaxBufferedMB until the request is answered
    with request.app[BUDGET].reserve(0) as held:  # it grows as the body arrives (see budget.BodyBudget)
        with pool.reading():  # a drain waits for bodies still arriving: each gets an answer
            try:
                task_info = await read(request, held)
            except asyncio.CancelledError:  # the client closed the connection while sending its body
                pool.stats.record_gone()
                raise
        if client_ended(request):  # gone, though the loop has not read its end yet: not worth a worker's time
            pool.stats.record_gone()
            raise asyncio.CancelledError
        pending = pool.submit(task_info, request_id(request), query, headers)
        try:
            status, payload = await pending.future
        except asyncio.CancelledError:  # the client closed the connection: don't run its request
            pool.stats.record_gone()  # counted here, where it is known for sure: an answer may cross it
            pool.abandon(pending)
            raise
    return status, payload, pending


def _admit(request: web.Request) -> None:
    """Refuse what can be refused before the body is read: no key, too large, a compression we cannot
    inflate, no room to hold the body now, or none in the queue (or no worker to run it)."""
    _authorize(request)
    given = request.headers
    codings = ",".join(given.getall("Transfer-Encoding", ())).lower() if "Transfer-Encoding" in given else ""
    if codings and [c.strip() for c in codings.split(",")] != ["chunked"]:
        # aiohttp reads the chunks and ignores the rest: a gzipped body would reach the handle as it came
        raise BadRequest(f"Transfer-Encoding {codings!r}: only chunked is taken; a compressed body says "
                         "Content-Encoding: gzip")
    limit = request.app[MAX_BODY]
    size = request.content_length
    if size is not None and size > limit:
        raise too_large(size, limit)
    if content_coding(request) and request.content_type.startswith("multipart/"):
        raise UnsupportedMediaType("Content-Encoding is not supported on multipart bodies: send the form "
                                   "uncompressed")
    request.app[BUDGET].check(size or 0)
    refused = request.app[POOL].refusal()
    if refused is not None:
        raise refused


async def _expect(request: web.Request, also: Callable[[web.Request], Any] | None = None
                  ) -> web.StreamResponse | None:
    """``Expect: 100-continue``: a client waiting to hear whether to send its body gets the final
    answer now if it would be refused, so it never uploads a body only to have it thrown away;
    ``also(request)`` is a route's own check (an unknown model's 404)."""
    request[ARRIVED] = time.perf_counter()  # this runs before any middleware
    if request.version != HttpVersion11:  # HTTP/1.0 knows no 100 Continue: its expectation is ignored
        return None
    try:
        if request.path not in OPEN_PATHS:
            request.app[BROWSER].check(request)
        _admit(request)
        passed_headers(request, request.app[POOL].config.pass_headers)
        if also is not None:
            also(request)
        if request.app[POOL].stopping:  # draining: the body would be read only to be answered 503
            raise NotReady("server is shutting down", retry_after=1.0)
    except EasyServeError as exc:
        return _answer(exc)
    if request.headers["Expect"].lower() != "100-continue":
        return error_response(417, f"unsupported Expect: {request.headers['Expect']!r}; only 100-continue is")
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # as aiohttp's own: the interim answer is not the response begun
    return None


async def _expect_predict(request: web.Request) -> web.StreamResponse | None:
    """:func:`_expect` for /predict: a query string the worker would refuse (``%ff``, too many fields)
    is refused before the body is sent. Others' queries are parsed in the worker, off this loop."""
    return await _expect(request, also=lambda request: request.rel_url.raw_query_string
                         and parse_query(request.rel_url.raw_query_string))


async def preflight(request: web.Request) -> web.Response:
    """A browser asking whether a page of another origin may call this route (CORS preflight)."""
    if request.app[BROWSER].cross_origin(request) is None:  # same origin, or no browser at all
        return web.Response(status=204, headers={"Allow": "GET, POST, OPTIONS"})
    passed = request.app[POOL].config.pass_headers  # the headers the handle takes (PassHeaders): a page's
    if not passed:  # traceparent, say, which a browser would not send, and the request with it failed
        return web.Response(status=204, headers=PREFLIGHT_HEADERS)
    allowed = PREFLIGHT_HEADERS["Access-Control-Allow-Headers"] + "".join(f", {name}" for name in passed)
    return web.Response(status=204, headers={**PREFLIGHT_HEADERS, "Access-Control-Allow-Headers": allowed})


async def health(request: web.Request) -> web.Response:
    return json_answer({"status": "ok", "pid": os.getpid()})


async def ready(request: web.Request) -> web.Response:
    # open to load balancers, which need its status and reason alone; the workers (pids, memory, batches
    # run: the traffic /stats keeps behind the key), and a failed worker's message, only to whoever may
    # read /stats
    may = may_read_stats(request)
    is_ready, reason, workers = await request.app[REPORTS].readiness(may)
    listed = {"workers": workers} if may else {}
    if is_ready:  # with a worker down (restarting) while others serve, the reason is why it is degraded
        return json_answer({"ready": True, **({"degraded": reason} if reason else {}), **listed})
    return json_answer({"ready": False, "error": reason, **listed}, status=503)


def may_read_stats(request: web.Request) -> bool:
    try:
        request.app[BROWSER].check(request)
        _authorize(request)
    except EasyServeError:
        return False
    return True


READ_INTERVAL_S = 0.05  # /stats and /metrics are worked out at most this often, for every reader waiting


class Coalesced:
    """A costly read, such as a ``/metrics`` scrape's body, worked out at most once per ``interval``
    seconds, however many ask: those who ask while one is due wait for it and share its result.

    A flood of ``/metrics`` readers (each body takes about half a millisecond of the event loop)
    starved predictions: 5% of what the server answered alone. Each result is worked out after
    everyone sharing it asked, so it includes all that happened before they did, as a read of its
    own would. A lone reader waits for nothing; one who asks within ``interval`` of the last read's
    start waits out the rest (and, should that read still be under way then, the two overlap)."""

    def __init__(self, read: Callable[[], Awaitable[Any]], interval: float = READ_INTERVAL_S) -> None:
        self._read = read
        self._interval = interval
        self._began = float("-inf")  # when the last read began, on the loop's clock
        self._due: asyncio.Future | None = None  # the next read's result, for those waiting for it
        self._running: set[asyncio.Task] = set()

    async def __call__(self) -> Any:
        if self._due is None:
            loop = asyncio.get_running_loop()
            self._due = loop.create_future()
            self._due.add_done_callback(lambda due: due.cancelled() or due.exception())  # retrieved, if all left
            loop.call_at(max(loop.time(), self._began + self._interval), self._start)
        # shielded: a reader who leaves does not cancel the read the others wait for
        return await asyncio.shield(self._due)

    def _start(self) -> None:
        due, self._due = self._due, None  # whoever asks from now on waits for the next read
        loop = asyncio.get_running_loop()
        self._began = loop.time()
        task = loop.create_task(self._run(due))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, due: asyncio.Future) -> None:
        try:
            result = await self._read()
        except Exception as exc:
            due.set_exception(exc)
        else:
            due.set_result(result)


class LocalReports:
    """What ``/ready``, ``/stats`` and ``/metrics`` answer, read where the pool lives (on its loop).
    Coroutines, as an HTTP front process asks the server process for the same over its socket pair.

    ``/stats`` and ``/metrics`` are worked out at most every ``READ_INTERVAL_S`` (see
    :class:`Coalesced`), each after ``before()`` when given (with ``HttpWorkers``: every front sends
    the answers it has given, so the numbers include every answer a client has had)."""

    def __init__(self, pool: WorkerPool, budget: Any, registry: Any,
                 before: Callable[[], Awaitable[None]] | None = None) -> None:
        self.pool = pool
        self.budget = budget  # its .held: request-body bytes held now
        self.registry = registry  # this server's prometheus_client registry
        self.before = before
        self._snapshot = Coalesced(self._read_snapshot)
        self._metrics: dict[tuple, Coalesced] = {}  # by what the body depends on (metrics.encoding): a few
        self._model_stats: dict[tuple[str, str], Coalesced] = {}  # by the model's name and version

    async def readiness(self, detail: bool = True) -> tuple[bool, str, list[dict]]:
        """Whether the server is ready; why not, or, ready with a worker down, which is down and why
        (``""`` when every worker is up); and its workers. Without ``detail``, a failed worker's
        exception is named by its type alone (see :func:`unready_reason`)."""
        workers = self.pool.describe()
        ready = self.pool.ready
        reason = unready_reason(self.pool, workers, detail) if not ready or self.pool.degraded else ""
        return ready, reason, workers

    async def snapshot(self) -> dict:
        return await self._snapshot()

    async def model_stat(self, name: str, version: str) -> dict:
        """The statistics extension's numbers of the model (``stats.Inferences``), shared as ``/stats``'s
        are: 32 readers in a loop took a no-op model's predictions from 8,400 a second to 1,700-2,400 (on
        2 cores), and to 3,300-7,800 shared."""
        read = self._model_stats.get((name, version))
        if read is None:  # the model's name and version: one pair, or a few across reloads
            read = self._model_stats[name, version] = Coalesced(lambda: self._read_model_stat(name, version))
        return await read()

    async def _read_model_stat(self, name: str, version: str) -> dict:
        # the asked model's own counts: a front may ask by the name it knew just before a reload changed it
        counted = self.pool.stats.by_model.get((name, version)) or Inferences()
        return counted.model_stat(name, version)

    async def metrics(self, accept: str) -> tuple[bytes, str]:
        encode, content_type = encoder(accept)
        key = encoding(encode)
        scrape = self._metrics.get(key)
        if scrape is None:
            scrape = self._metrics[key] = Coalesced(lambda: self._read_metrics(encode))
        return await scrape(), content_type

    async def _read_snapshot(self) -> dict:
        if self.before is not None:
            await self.before()
        # start-up tracebacks too: /stats is behind the API key
        return snapshot(self.pool, self.budget.held, detail=True)

    async def _read_metrics(self, encode: Callable[[Any], bytes]) -> bytes:
        if self.before is not None:
            await self.before()
        return encode(self.registry)


def unready_reason(pool: WorkerPool, workers: list[dict] | None = None, detail: bool = True) -> str:
    """Why ``pool`` is not ready, or degraded: stopping, or which workers are down and why (one line
    each); not those being replaced on purpose (MaxBatchesPerWorker, a reload), which count as up.
    ``workers``: ``pool.describe()``, in the pool's order. Without ``detail`` (for ``/ready``'s readers
    who may not read ``/stats``), a handle's exception is named by its type, without its message: a
    setup's "cannot connect to postgres://admin:password@..." was there for anyone to read, key or not."""
    if pool.stopping:
        return "server is shutting down"
    if pool.closing_soon:
        return "server is shutting down: still answering while load balancers take it out of rotation"
    left = pool.failing_left_s()
    if left:
        return (f"{pool.failing_reason()}; ready again in {left:.0f}s to be tried, or once a worker lives through "
                "a batch")
    waiting = [f"{w['name']} is {w['state']}" + (" (waiting its turn to load the handle: StartsPerGPU)"
                                                  if w.get("waiting_turn") else "")
               + (f": {_error(w['error'], detail)}" if w.get("error") else "")
               for w, slot in zip(pool.describe() if workers is None else workers, pool.workers)
               if w["state"] not in ("idle", "busy") and not slot.recycling]
    return "; ".join(waiting)


_EXCEPTION = re.compile(r"([A-Za-z_][\w.]*): ")  # how a handle's exception begins ("RuntimeError: ...")
_OWN_ERRORS = ("worker ", "could not start a process")  # the pool's own words (an exit code, a signal)


def _error(error: str, detail: bool) -> str:
    """A worker's error, or without ``detail`` what of it anyone may read: the pool's own words, or the
    exception's type alone. Its last line is not always ``Type: message`` (a message of several lines,
    a note added to the exception, an exception group): then no part of it."""
    if detail or error.startswith(_OWN_ERRORS):
        return error
    found = _EXCEPTION.match(error)
    return f"{found[1] if found else 'its handle raised an exception'} (its message: /stats, and the server's log)"


async def stats(request: web.Request) -> web.Response:
    try:
        _authorize(request)
    except Unauthorized as exc:
        return _answer(exc)
    return json_answer(await request.app[REPORTS].snapshot())


async def metrics(request: web.Request) -> web.Response:
    """Prometheus's scrape: behind the API key like /stats (traffic by status describes the service), and
    answered while draining or not ready, when an operator most wants it."""
    _authorize(request)  # a refusal becomes its 401 in _checked
    body, content_type = await request.app[REPORTS].metrics(request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})


def json_answer(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON answer as the predictions go: ``application/json`` with no charset (JSON is UTF-8 by
    definition). KServe's v2 client reads an error's text only under exactly that type: with aiohttp's
    ``; charset=utf-8`` its users saw a bare "400 Bad Request", the reason lost."""
    try:
        body = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:  # a lone surrogate (a file name that is not UTF-8, in a message): the standard library
        body = json.dumps(value, separators=(",", ":")).encode()  # escapes it; orjson refuses it
    return web.Response(body=body, status=status, headers=headers, content_type="application/json")


def error_response(status: int, message: str, retry_after: float | None = None) -> web.Response:
    """The one shape of every error: ``{"error": message}`` with ``status``, the message cut short as a
    worker's are (a v2 request's 10,000-item id was quoted whole: 58 kB of error)."""
    headers = {"Retry-After": f"{max(1, round(retry_after))}"} if retry_after is not None else {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="easyserve"'
    response = json_answer({"error": shortened(message)}, status=status, headers=headers)
    if status == 408:  # the client stalled: the connection is not worth keeping
        response.force_close()
    return response


def _answer(exc: EasyServeError) -> web.Response:
    return error_response(exc.status, str(exc), getattr(exc, "retry_after", None))


def _authorize(request: web.Request) -> None:
    expected = request.app.get(API_KEY)
    if expected is None:
        return
    sent = request.headers.get("Authorization", "")
    if not sent:
        raise Unauthorized("this server requires an API key: send the header 'Authorization: Bearer <key>'")
    scheme, _, key = sent.strip().partition(" ")
    # The scheme is case-insensitive (RFC 9110). A header may hold any byte: aiohttp keeps those that
    # are not UTF-8 as surrogates, which encode back to the bytes sent.
    sent_key = key.strip().encode("utf-8", "surrogateescape")
    if scheme.lower() != "bearer":  # the key sent bare (never quoted back: it may be the right one)
        raise Unauthorized("the API key must follow the word Bearer: send 'Authorization: Bearer <key>'")
    if not hmac.compare_digest(sent_key, expected.encode()):
        raise Unauthorized("wrong API key (expected 'Authorization: Bearer <key>')")


def _misframed(request: web.Request) -> web.Response | None:
    """HTTP/1.0 and 1.1 only: aiohttp read an "HTTP/2.0" or "HTTP/0.9" request line as it does those, and
    answered in kind. And no chunked body in HTTP/1.0, which has no such framing (RFC 9112 6.1): what a
    proxy on the way made of it may not be what this server read. The refusal, if any."""
    version = request.version
    if version != (1, 1) and version != (1, 0):
        response = error_response(505, f"HTTP/{version.major}.{version.minor} is not spoken here: send HTTP/1.1")
    elif version == (1, 0) and "Transfer-Encoding" in request.headers:
        response = error_response(400, "Transfer-Encoding in an HTTP/1.0 request: send HTTP/1.1, or a Content-Length")
    else:
        return None
    response.force_close()
    return response


async def _on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    # Every answer passes here, whoever made it (a route, a middleware, the Expect handler, aiohttp's
    # own error handling): the one place to count answers by their final status.
    answer_begins(request, response)  # for the guards: the connection is active, the body no longer awaited
    app = request.app  # found through the matched route at each use: once here
    pool = app[POOL]
    if _counted(request):
        response.headers["X-Request-Id"] = request_id(request)
        if not request.get(STREAMED) and not request.get(MISFRAMED):
            now = time.perf_counter()
            pool.stats.record_answer(response.status, now - request.get(ARRIVED, now))
    response.headers["Server"] = SERVER_NAME
    # a browser takes an answer as the type it says, never guesses: an error quoting a path, or a
    # handle's bytes, is not run as a page
    response.headers["X-Content-Type-Options"] = "nosniff"
    origin = app[BROWSER].cross_origin(request)
    if origin is not None:
        response.headers.update(cors_headers(origin))
    # While draining, every answer says the connection ends, so clients (and nginx) open their next
    # one elsewhere rather than send a request into a connection about to close; and before, through
    # ShutdownDelayS, so that kept-alive clients reconnect (through a load balancer that has taken this
    # server out) before the drain refuses what they send. A body left unread (a refusal) would be
    # drained for a while and then cut: say so too.
    # (An Upgrade request's connection closes after its answer too: guards._GuardedHandler takes none.)
    if pool.stopping or pool.closing_soon or not request.content.is_eof() or "Upgrade" in request.headers:
        response.force_close()
        response.headers["Connection"] = "close"  # aiohttp may have written its headers before this hook
    elif response.keep_alive is not False and request.keep_alive:
        response.headers["Keep-Alive"] = app[KEEP_ALIVE]


def passed_headers(request: web.Request, names: tuple[str, ...]) -> tuple | None:
    """The (name, value) pairs of the request's headers that ``PassHeaders`` names, for the handle's
    ``task["headers"]``: in lower case, a header sent twice as one value, joined by ", " (RFC 9110 5.3)."""
    if not names:
        return None
    headers = request.headers
    passed = tuple((name, ", ".join(headers.getall(name))) for name in names if name in headers)
    for name, value in passed:
        try:  # aiohttp keeps bytes that are not UTF-8 as surrogates, which the handle's JSON could not carry
            value.encode()
        except UnicodeEncodeError:
            raise BadRequest(f"header {name!r} is not UTF-8 text") from None
    return passed or None


def request_id(request: web.Request) -> str:
    """What a request to /predict or the protocol's inference is called: in its answer's
    ``X-Request-Id``, to the handle (``task["request_id"]``) and in the worker's log of its failure.
    The client's own ``X-Request-Id`` (nginx's, behind the generated config) where it sends one a log
    can quote as it is (:data:`CLIENT_REQUEST_ID`); else 32 hex digits of the server's, as nginx makes."""
    name = request.get(REQUEST_ID)
    if name is None:
        sent = request.headers.get("X-Request-Id", "")
        name = request[REQUEST_ID] = sent if CLIENT_REQUEST_ID.fullmatch(sent) else f"{_IDS.getrandbits(128):032x}"
    return name


def _counted(request: web.Request) -> bool:
    if (request.method, request.path) in COUNTED:
        return True
    resource = getattr(getattr(request.match_info, "route", None), "resource", None)  # None: no route matched
    return resource is not None and (request.method, resource.canonical) in COUNTED


@web.middleware
async def _checked(request: web.Request, handler) -> web.StreamResponse:
    """What every request goes through, in one middleware (each is a coroutine and a call more a request;
    four, one for each of these, measured no slower, but read no clearer either):

    - when it reached the app is noted (unless its ``Expect`` header had it noted): its answer's time,
      in the stats, is counted from there;
    - its framing is checked (:func:`_misframed`), and its Host and Origin
      (:class:`~easyserve.browsers.BrowserGuard`) on all but /health and /ready;
    - aiohttp's own errors (404, 405, 413 while reading), ours, and any bug of ours, are JSON like the rest.
    """
    if ARRIVED not in request:
        request[ARRIVED] = time.perf_counter()
    try:
        refused = _misframed(request)
        if refused is not None:
            # the client's mistake in speaking HTTP, before any route: a 505 counted by its status
            # swelled the 5xx an operator is told to alert on
            request[MISFRAMED] = True
            request.app[POOL].stats.record_malformed()
            return refused
        if request.path not in OPEN_PATHS:
            request.app[BROWSER].check(request)
        return await handler(request)
    except asyncio.CancelledError:
        raise
    except EasyServeError as exc:
        return _answer(exc)
    except Exception as exc:
        if not isinstance(exc, web.HTTPException):
            log.exception("unexpected error handling %s %s", request.method, request.path)
            return error_response(500, f"internal server error: {type(exc).__name__}: {exc}")
        if exc.status < 400:
            raise
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        allowed = sorted(getattr(exc, "allowed_methods", ()))
        if exc.status == 404 and request.path.startswith("/v2/"):  # a client of the protocol: its own routes
            message = (f"no route {request.method} {request.path}; the Open Inference Protocol's are GET /v2, "
                       "/v2/health/live, /v2/health/ready, /v2/models/<name>[/versions/<v>][/ready|/config|/stats], "
                       "/v2/models/stats and POST /v2/models/<name>[/versions/<v>]/infer")
        elif exc.status == 404:
            message = (f"no route {request.method} {request.path}; try POST /predict, GET /health, /ready, /stats "
                       "or /metrics")
        elif exc.status == 405:  # (the Allow header lists OPTIONS and HEAD too: a browser's, a probe's)
            usable = [method for method in allowed if method not in ("OPTIONS", "HEAD")]
            message = f"{request.method} is not allowed on {request.path}" + (f": use {', '.join(usable)}"
                                                                             if usable else "")
        response = error_response(exc.status, message)
        if exc.status == 405 and allowed:
            response.headers["Allow"] = ", ".join(allowed)  # RFC 9110 15.5.6: a 405 says what is allowed
        return response


def _example(signature: Any) -> str:
    from .v2.protocol import Signature

    return (signature or Signature()).example()


async def _read_predict(request: web.Request, held: Reservation) -> Any:
    # a body that is no JSON object is shown one of the handle's inputs (an ONNX model's "x" was shown an image's)
    task_info = await read_task(request, request.app[MAX_BODY], held, lambda: _example(request.app[POOL].signature))
    if wants_npy(request.headers.get("Accept", "")):
        return NpyAnswer(wire.mark_large(task_info))  # its large bytes still travel uncopied
    return task_info
