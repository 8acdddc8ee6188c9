"""The errors easyserve raises, each mapped to one HTTP status.

::

    EasyServeError                 500
    ├── ConfigError                (raised at start-up, never over HTTP)
    ├── DownloadError              (never over HTTP) `easyserve models fetch` could not download a model file
    │   ├── ChecksumError          (never over HTTP) the file's size or SHA-256 was wrong; it was not kept
    │   └── WriteError             (never over HTTP) it could not be written here (a full disk, a link in the way)
    ├── StartupError               a worker could not load or set up its handle
    ├── BadRequest                 400  the request body is malformed or the handle rejected it
    │   ├── PayloadTooLarge        413
    │   ├── UnsupportedMediaType   415
    │   └── RequestTimeout         408  the request body stalled past BodyTimeoutS
    ├── Unauthorized               401
    ├── Forbidden                  403  a Host or browser origin this server does not answer
    ├── NotFound                   404  no model or version of that name (Open Inference Protocol)
    ├── HandleError                500  the handle raised while running a batch
    ├── WorkerDied                 500  the worker running the request died, twice
    ├── Overloaded                 429  the queue is full, or MaxBufferedMB of bodies are held (Retry-After)
    ├── NotReady                   503  no worker can take requests, or the server is stopping
    ├── Timeout                    504  queue wait plus execution ran past TimeoutS
    └── NoAnswer                   (Client only) the server could not be reached, or closed the
                                   connection without answering; also a ``ConnectionError``

The HTTP layer answers ``{"error": str(exc)}`` with ``exc.status``; nothing else maps errors.
"""

from __future__ import annotations

import errno
import math
import re
import reprlib
from typing import Any

import asyncio

__all__ = [
    "EasyServeError",
    "ConfigError",
    "DownloadError",
    "ChecksumError",
    "WriteError",
    "StartupError",
    "BadRequest",
    "PayloadTooLarge",
    "UnsupportedMediaType",
    "RequestTimeout",
    "Unauthorized",
    "Forbidden",
    "NotFound",
    "HandleError",
    "WorkerDied",
    "Overloaded",
    "NotReady",
    "Timeout",
    "NoAnswer",
]


# characters of a handle's error message that a client is sent: one quoting a whole request, or a setup's
# quoting a file, went to every client whole (/ready's twice), encoded as JSON on the event loop
MAX_MESSAGE = 4096


def shortened(text: str) -> str:
    """``text``, cut to :data:`MAX_MESSAGE` characters, saying how many were left out. A text cut so
    already, with at most :data:`SAID_AFTER_CUT` characters said before the cut's mark (what failed)
    and after it (the worker whose log has the traceback), is left as it is: a worker's message cut
    again on the event loop said "[30 more characters]" where it had left out 100,000, and lost the
    worker's name."""
    if len(text) <= MAX_MESSAGE:
        return text
    cut = _CUT.search(text, MAX_MESSAGE, MAX_MESSAGE + SAID_AFTER_CUT + 40)  # a prefix may have moved it on
    if cut is not None and len(text) - cut.end() <= SAID_AFTER_CUT:
        return text
    return f"{text[:MAX_MESSAGE]} ... [{len(text) - MAX_MESSAGE} more characters]"


_CUT = re.compile(r" \.\.\. \[\d+ more characters\]")
SAID_AFTER_CUT = 200


def megabytes(limit: int) -> str:
    """A limit of ``int(MB * 2**20)`` bytes as the MB it was set to, in three figures: ``MaxBodyMB:
    0.001`` is 1,048 bytes, which is 0.000999 MB (half a byte back makes up for the whole bytes)."""
    return f"{(limit + 0.5) / 2**20:.3g} MB"


class EasyServeError(Exception):
    """Root of every error easyserve raises."""

    status = 500
    # a server's refusal, as the Client raises it: the X-Request-Id it answered, which its log names it by
    request_id: str | None = None


class ConfigError(EasyServeError, ValueError):
    """A configuration value is wrong; the message names the key, the value and what is allowed."""


class DownloadError(EasyServeError):
    """A model file could not be downloaded; the message says why and what to do instead.

    Raised by ``easyserve models fetch`` and :func:`easyserve.models.fetch`, never answered over HTTP.
    """


class ChecksumError(DownloadError):
    """A downloaded file's size or SHA-256 is not the one expected; the file was not kept."""


class WriteError(DownloadError):
    """A download could not be made or kept on this machine (a full or read-only disk, a folder that
    cannot be made, a symbolic link in the way): the network is not at fault, and no mirror helps."""


class StartupError(EasyServeError, RuntimeError):
    """A worker failed to start its handle; the message carries the worker's traceback."""

    @classmethod
    def cannot_listen(cls, host: str, port: int, exc: OSError) -> StartupError:
        if exc.errno == errno.EADDRINUSE:
            from .ports import holders

            held = holders(port)
            return cls(f"cannot listen on {host}:{port}: {exc.strerror}{f' ({held})' if held else ''}; choose another "
                       "Port (0 picks a free one)")
        if exc.errno == errno.EACCES:  # below 1024 without the right
            return cls(f"cannot listen on {host}:{port}: {exc.strerror}; choose another Port (0 picks a free one)")
        return cls(f"cannot listen on {host}:{port}: {exc.strerror}; check Host: an address of this machine "
                   "(127.0.0.1, or 0.0.0.0 for all of them)")


class BadRequest(EasyServeError):
    """The request cannot be run as sent (bad body, or ``preprocess`` rejected it)."""

    status = 400

    @classmethod
    def unpicklable(cls, exc: Exception) -> BadRequest:
        """A request that cannot be sent to another process (what pickle refuses)."""
        return cls(f"the request cannot be passed to a worker ({type(exc).__name__}: {exc})")


class PayloadTooLarge(BadRequest):
    """The request body is larger than ``MaxBodyMB`` (once inflated, for a compressed one)."""

    status = 413


class UnsupportedMediaType(BadRequest):
    """The body's Content-Type or Content-Encoding is one the server does not read; the message names
    those it does."""

    status = 415


class RequestTimeout(BadRequest, asyncio.TimeoutError):
    """The client stopped sending its request body for longer than ``BodyTimeoutS``.

    A ``TimeoutError`` too, so that aiohttp, finding it raised by the body it would drain after the
    response, closes the connection at once instead of reporting it.
    """

    status = 408


class Unauthorized(EasyServeError):
    """The server has an ``ApiKey`` and the request did not send it (``Authorization: Bearer <key>``)."""

    status = 401


class Forbidden(EasyServeError):
    """The request names a Host, or comes from a browser page (``Origin``), that this server does not answer."""

    status = 403


class NotFound(EasyServeError):
    """The request names a model, or a version of it, that this server does not serve."""

    status = 404


class HandleError(EasyServeError):
    """The handle raised while running the batch that held this request."""


class WorkerDied(EasyServeError):
    """The worker process died while running this request, and so did the one it was retried on. Its
    message ends with :data:`DIED_TWICE`, by which :class:`~easyserve.Client` tells it from the other 500,
    :class:`HandleError` (only the status crosses the wire: it raised HandleError for both)."""


DIED_TWICE = "it had already been retried once after its first worker died"


def retry_after_seconds(value: str, most: float) -> float | None:
    """A ``Retry-After`` header's wait in seconds, from 0 to ``most``: a number, or an HTTP-date; ``None``
    where it is neither."""
    try:
        seconds = float(value)
    except ValueError:
        import datetime  # here: every worker imports this module, and none reads a Retry-After
        import email.utils

        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:  # "-0000": UTC, with no claim about the sender's zone
            when = when.replace(tzinfo=datetime.timezone.utc)
        seconds = (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
    return None if math.isnan(seconds) else min(max(seconds, 0.0), most)


class Overloaded(EasyServeError):
    """The server is at capacity (the queue is full, or ``MaxBufferedMB`` of request bodies are held in
    memory); the client should retry after ``retry_after`` seconds.

    429, not 503: a load balancer retries a 503 elsewhere and counts it against the server (nginx's
    ``max_fails``), so a burst answered 503 would take every server out of rotation at once. Busy is
    not broken: the client gets this answer, with ``Retry-After``, and backs off."""

    status = 429

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotReady(EasyServeError):
    """No worker can take the request now, or the server is stopping; ``retry_after`` (seconds) when
    it is known when one may."""

    status = 503

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Timeout(EasyServeError, TimeoutError):
    """The request was not answered within ``TimeoutS`` (queue wait plus run time); from a
    :class:`~easyserve.Client`, no answer came within its ``timeout``."""

    status = 504


class NoAnswer(EasyServeError, ConnectionError):
    """Raised by :class:`~easyserve.Client` where no answer came: the server could not be reached, or
    it closed the connection (the message says whether the request may have run). A ``ConnectionError``
    too, as it was; an ``EasyServeError`` so that one ``except`` takes whatever a call raises. Its
    ``status`` is ``None``: no server said it."""

    status = None  # type: ignore[assignment]


_BRIEF = reprlib.Repr()  # its limits set one by one: Python 3.11's takes no arguments
_BRIEF.maxlevel, _BRIEF.maxlist, _BRIEF.maxdict, _BRIEF.maxstring, _BRIEF.maxother, _BRIEF.maxlong = 3, 6, 4, 60, 60, 40
_BRIEF.maxtuple = _BRIEF.maxset = _BRIEF.maxfrozenset = _BRIEF.maxdeque = _BRIEF.maxarray = 6


def brief(value: Any) -> str:
    """A value a client or a config gave, as an error quotes it: a few items, a few levels deep, built
    as far as it is shown. A request's id of 10,000 numbers was quoted whole; one nested 1,000 deep,
    which JSON allows, made repr raise; and a config's YAML aliases, which share one list among nine
    others nine levels down, made a 355-byte file's error a line of gigabytes."""
    return _BRIEF.repr(value)

