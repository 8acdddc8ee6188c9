"""What a client makes of a server's answer: the value a call returns, or the
:mod:`easyserve.errors` class of its status, raised with the server's words (written out safe for a
terminal). An answer that is no easyserve answer (a proxy's HTML page, a redirect, a body that is not
what it says) is an error whose ``status`` is ``None``."""

from __future__ import annotations

import html
import http.client
import json
import re
import urllib.parse
from typing import Any, Mapping

from .errors import (
    DIED_TWICE,
    BadRequest,
    EasyServeError,
    Forbidden,
    HandleError,
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
from .npy import NPY, read_npy

ERRORS: dict[int, type[EasyServeError]] = {
    400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 408: RequestTimeout, 413: PayloadTooLarge,
    415: UnsupportedMediaType, 429: Overloaded, 500: HandleError, 503: NotReady, 504: Timeout,
    502: NotReady,  # 502: a balancer in front (nginx) with no server left to try
}


def joined(url: str, location: str) -> str:
    """Where a redirect's ``Location`` points from ``url``; as it is written where it is no URL (an
    unclosed ``[``: a ValueError, where every error of a call is an EasyServeError)."""
    try:
        return urllib.parse.urljoin(url, location)
    except ValueError:
        return location


def unusable(message: str) -> EasyServeError:
    """An answer the client cannot use (an HTML page, a body that is not what it says): its ``status`` is
    ``None``, where its class's 500 read as the server's."""
    error = EasyServeError(message)
    error.status = None  # type: ignore[assignment]
    return error


def answer(url: str, status: int, headers: Mapping[str, str], payload: bytes | bytearray) -> Any:
    """What a call to ``url`` returns for this answer, or the error it raises."""
    content_type = headers.get("Content-Type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    if 300 <= status < 400:
        where = shown(joined(url, headers["Location"])) if headers.get("Location") else "nowhere"
        error = EasyServeError(f"{url} answered {status}, a redirect to {where}; the client does not follow "
                               "redirects: if that is the server, use its URL")
        error.status = status
        raise error
    # A wrong URL that reached some other web server: its page, or a sidecar's "OK", is no answer. easyserve's own
    # bytes (a handle's easyserve.Binary) are kept: its answers name it in Server, and carry their request's
    # X-Request-Id, which a proxy that writes its own Server header (Envoy, under KServe) passes on.
    marked = headers.get("Server", "").startswith("easyserve") or "X-Request-Id" in headers
    if 200 <= status < 300 and content_type and not is_json(content_type) and not marked:
        title = html_title(payload) if media == "text/html" else None
        what = "an HTML page" if media == "text/html" else f"{shown(media)[:100]!r} with no mark of easyserve's"
        raise unusable(f"{url} answered {what}{f' ({title!r})' if title else ''}: is this an easyserve server?")
    if 200 <= status < 300 and media == NPY:
        try:
            # checked as the server checks one; writable, as np.load's
            return read_npy(payload if isinstance(payload, bytearray) else bytearray(payload))
        except BadRequest as exc:
            raise unusable(f"the server answered {status} with a .npy body that cannot be read: {exc}") from None
    if 200 <= status < 300 and content_type and not is_json(content_type):
        return bytes(payload)  # a handle's easyserve.Binary (an image, audio), as it was given
    try:
        value, unread = json.loads(payload), ""
    except RecursionError:
        value, unread = None, "JSON nested too deeply to read"
    except ValueError:
        value, unread = None, f"a body that is not JSON: {bytes(payload[:200])!r}"
    if 200 <= status < 300:
        if unread:
            raise unusable(f"the server answered {status} with {unread}")
        return value
    # a server's words, in an exception a script may print to a terminal: no escape sequence of theirs
    if isinstance(value, dict) and isinstance(value.get("error"), str):
        message = shown(value["error"])
    else:  # not easyserve's own refusal (a proxy's page): one line, of what it says
        text = html_title(payload) if media == "text/html" else payload.decode(errors="replace")
        message = one_line(text) or http.client.responses.get(status, "error")
        if media == "text/html":  # "Error response" alone told nothing of where it came from
            message += f" (an HTML page from {url}, not an easyserve answer)"
    if not marked and not message.endswith("not an easyserve answer)"):
        # another service on that port, or a proxy's own refusal: a 404 read as "no model of that name", a
        # 500 as the handle's fault, a 503 as worth retrying, and nothing said that the URL led elsewhere
        message += f" (an answer with no mark of easyserve's: is {url} an easyserve server, or a proxy before one?)"
    kind = ERRORS.get(status, BadRequest if 400 <= status <= 499 else EasyServeError)  # 4xx: the request's fault
    if status == 500 and message.endswith(DIED_TWICE):  # not the handle's exception: worth retrying elsewhere
        kind = WorkerDied
    if kind in (Overloaded, NotReady) and headers.get("Retry-After"):
        error = kind(message, retry_after=retry_seconds(headers["Retry-After"]))
    else:
        error = kind(message)
    error.status = status
    error.request_id = headers.get("X-Request-Id")  # what the server's log calls it, beside its traceback
    raise error


def is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def html_title(payload: bytes | bytearray) -> str:
    found = re.search(rb"<title[^>]*>(.*?)</title", payload[:65536], re.IGNORECASE | re.DOTALL)
    return one_line(html.unescape(found[1].decode(errors="replace"))) if found else ""


def one_line(text: object, limit: int = 200) -> str:
    """``text`` on one line, cut short: a proxy's error page or a banner that is not HTTP goes in a message."""
    line = shown(" ".join(str(text).split()))
    return line if len(line) <= limit else line[:limit - 3] + "..."


MAX_RETRY_AFTER_S = 3600.0  # a Retry-After beyond this (or inf) is taken as this


def retry_seconds(value: str) -> float:
    """A ``Retry-After`` in seconds, from 0 to ``MAX_RETRY_AFTER_S``: a number, or an HTTP-date (1 if neither)."""
    seconds = retry_after_seconds(value, MAX_RETRY_AFTER_S)
    return 1.0 if seconds is None else seconds


# What a server's words may not carry to a terminal as they are: control characters (an escape sequence
# can set the window's title, clear the screen and print a fake "all good"), line breaks and tabs kept.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def shown(text: str) -> str:
    """``text`` from a server, its control characters written out (``\\x1b``) for a terminal."""
    return _CONTROL.sub(lambda found: f"\\x{ord(found[0]):02x}", text)
