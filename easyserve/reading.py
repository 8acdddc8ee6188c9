"""Reading a request's body, as it arrives, into what a handle gets (``task_info``): JSON, ``.npy``, raw
bytes (a tensor when ``X-Tensor-Dtype`` says so), an image, or a form (urlencoded or multipart), each
bounded by ``MaxBodyMB`` and counted against ``MaxBufferedMB`` as it comes; a client's mistake is a
:class:`~easyserve.errors.BadRequest` saying what is wrong."""

from __future__ import annotations

import mmap
import re
from typing import Any, Callable

from aiohttp import BadContentDispositionHeader, BadContentDispositionParam, BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.multipart import content_disposition_filename, parse_content_disposition
from aiohttp.web_protocol import RequestPayloadError

from .bodies import (EXAMPLE, LARGE_JSON, MAX_FORM_FIELDS, FormBody, JsonBody, add_field, example_text, parse_form,
                     parse_json_object)
from . import wire
from .budget import Reservation
from .errors import BadRequest, EasyServeError, PayloadTooLarge, UnsupportedMediaType, megabytes
from .guards import Inflater
from .npy import DTYPE_HEADER, NPY, SHAPE_HEADER, Writable, read_npy, read_raw_tensor

__all__ = ["read_task", "read_body", "single_header"]

JSON_TYPES = ("application/json", "text/plain", "")
RAW_TYPES = ("application/octet-stream",)


async def read_task(request: web.Request, limit: int, held: Reservation,
                    example: str | Callable[[], str] = EXAMPLE) -> Any:
    """The request body as the handle's ``task_info``; raises :class:`BadRequest` saying what is wrong.

    Past ``limit`` bytes (``MaxBodyMB``), :class:`PayloadTooLarge`. The bytes it holds grow ``held``
    (:class:`~easyserve.errors.Overloaded` past ``MaxBufferedMB``).
    """
    if request.content_length is not None and request.content_length > limit:
        raise too_large(request.content_length, limit)
    content_type = _content_type(request)
    if content_type.startswith("multipart/"):
        return await _read_multipart(request, limit, held)
    body = await read_body(request, limit, held)
    tensor = content_type in RAW_TYPES and DTYPE_HEADER in request.headers
    if not body and not tensor:  # a tensor of no elements (shape 0,3) is an empty body
        raise BadRequest(f"empty body: send a JSON object such as {example_text(example)}, raw bytes, or a form")
    if content_type in JSON_TYPES or content_type.endswith("+json") or (
        content_type == "application/x-www-form-urlencoded" and _starts_json(body)  # curl -d '{...}', '[...]'
    ):
        # decoded by the worker that runs it (see bodies.py); a small one here too, for its 400 at once
        if len(body) < LARGE_JSON:
            try:
                parse_json_object(body, example)
            except BadRequest as exc:
                if content_type != "text/plain":
                    raise
                raise BadRequest(f"{exc} (a text/plain body is read as JSON, as many clients label JSON so: "
                                 'send text as JSON, such as {"text": "..."})') from None
        return JsonBody(body)
    if content_type == NPY:  # a writable array in the worker, as a v2 tensor is
        return {"data": Writable(read_npy(body)), "content_type": content_type}
    if content_type in RAW_TYPES:
        dtype, shape = single_header(request, DTYPE_HEADER), single_header(request, SHAPE_HEADER)
        if dtype is not None:
            return {"data": Writable(read_raw_tensor(body, dtype, shape)), "content_type": content_type}
        if shape is not None:  # the handle got bytes where the client meant a tensor
            raise BadRequest(f"{SHAPE_HEADER} without {DTYPE_HEADER}: name the element type too, such as "
                             f"{DTYPE_HEADER}: float32 (or send neither, for the bytes as they are)")
    if content_type.startswith("image/") or content_type in RAW_TYPES:
        return {"data": _as_bytes(body), "content_type": content_type}
    if content_type == "application/x-www-form-urlencoded":  # a large one, as JSON, by the worker
        return FormBody(body) if len(body) >= LARGE_JSON else parse_form(body)
    raise UnsupportedMediaType(
        f"unsupported Content-Type {content_type!r}: send application/json, image/*, "
        "application/octet-stream, application/x-npy, multipart/form-data or application/x-www-form-urlencoded"
    )


def _as_bytes(body: bytes | bytearray | memoryview) -> Any:
    """A body as the handle gets it, ``bytes``: a large one gathered in a buffer (see :func:`read_body`)
    travels to the worker as it is (:class:`~easyserve.wire.Blob`), and is ``bytes`` there, not copied
    here first."""
    if type(body) is bytes:
        return body
    return bytes(body) if len(body) < wire.OUT_OF_BAND else wire.Blob(body)


_SPACE = re.compile(rb"[ \t\n\r\x0b\x0c]*")  # what bytes.lstrip() strips


def _starts_json(body: bytes | bytearray | memoryview) -> bool:
    """Whether ``body``'s first byte past white space is ``{`` or ``[`` (without copying it, as lstrip would):
    JSON that curl -d labels a form. An array, read as a form, was "malformed form body: bad query field";
    as JSON, it is told the object it should be."""
    start = _SPACE.match(body).end()  # type: ignore[union-attr]
    return body[start:start + 1] in (b"{", b"[")


def _content_type(request: web.Request) -> str:
    """The body's media type, lower case; "" when none is given. One that cannot be read (``a/b/c``, two
    types) is a 415: aiohttp reads it as application/octet-stream, and the handle got raw bytes."""
    given = single_header(request, "Content-Type")
    if given is None or not given.strip():
        return ""
    content_type = request.content_type
    if content_type != given.split(";", 1)[0].strip().lower():
        raise UnsupportedMediaType(f"Content-Type {given[:100]!r} cannot be read: give one type, such as "
                                   "application/json or image/jpeg")
    return content_type


def single_header(request: web.Request, name: str) -> str | None:
    """A header that must have one value: given twice differently, which one the client meant is a guess
    (and a proxy on the way may guess the other)."""
    values = request.headers.getall(name, [])
    if len(set(values)) > 1:
        raise BadRequest(f"{name} is given {len(values)} times ({', '.join(map(repr, values))}): give it once")
    return values[0] if values else None


async def read_body(request: web.Request, limit: int, held: Reservation) -> bytes | bytearray | memoryview:
    """The whole body, inflated if it came compressed; past ``limit`` bytes, :class:`PayloadTooLarge`.

    A body that came whole with its headers, as a small one does, is the ``bytes`` it came in; any
    other is gathered in one buffer as it arrives (:class:`Gathered`), each chunk counted before it is
    added, and an inflated body's each piece before it is made (see :class:`~easyserve.guards.Inflater`).
    The chunks were kept and joined at the end, which held the body twice for a moment: a 200 MB
    upload took the server from 69 to 470 MB.
    """
    inflater = Inflater.for_request(request, limit, held.grow_to)
    content = request.content
    if inflater is None and content.is_eof() and content.exception() is None:
        # the whole body came with its headers, as a small one does: taken without a loop of awaits
        body = content.read_nowait()
        _hold(len(body), limit, held)
        return body
    gathered = Gathered(request.content_length if inflater is None else None)
    try:
        async for chunk in content.iter_any():
            if inflater is not None:
                await inflater.inflate(chunk, gathered)
            else:
                _hold(len(gathered) + len(chunk), limit, held)
                gathered += chunk
    except (RequestPayloadError, HttpProcessingError) as exc:  # e.g. a broken chunked encoding
        raise BadRequest(f"malformed request body: {exc}") from None
    if inflater is not None:
        inflater.finish()
        held.shrink_to(len(gathered))  # the room its next piece would have taken
    return gathered.result()


MAPPED = 1 << 20  # a body this large is gathered in memory mapped for it alone


class Gathered:
    """A request body's bytes, gathered as they arrive into one buffer: a ``bytearray`` while small,
    and from ``MAPPED`` bytes (or a Content-Length that large) an anonymous memory map of its own. A
    map's pages are taken as they are written, so one sized to the Content-Length at once holds what
    has arrived, as the body budget counts it, not what a client declared and trickles; it grows
    without a copy (``mremap``), and is given back to the system whole once the body is freed. (Large
    buffers grown from malloc's heap left holes it kept: 60 gzip bodies refused at ``MaxBufferedMB``
    64 left the server at 340 MB, and it stayed over 200 MB idle; as maps, 171 MB, and 75 MB idle.)"""

    def __init__(self, expected: int | None = None) -> None:
        self._size = 0
        # a body's first piece, kept as it came until a second comes: most bodies below MAPPED arrive in
        # one (aiohttp joins what it has buffered), and copying it into the bytearray cost the server
        # process 10% more CPU a request for a 600 kB JSON body
        self._first: bytes | None = None
        self._small: bytearray | None = None
        self._map: mmap.mmap | None = None
        if expected is not None and expected >= MAPPED:
            self._map = mmap.mmap(-1, expected, flags=mmap.MAP_PRIVATE)
        else:
            self._small = bytearray()

    def __len__(self) -> int:
        return self._size

    def __iadd__(self, data: bytes) -> Gathered:
        end = self._size + len(data)
        if self._small is not None:
            if end < MAPPED:
                if not self._size and type(data) is bytes:
                    self._first = data
                else:
                    if self._first is not None:
                        self._small += self._first
                        self._first = None
                    self._small += data
                self._size = end
                return self
            self._map = mmap.mmap(-1, 2 * end, flags=mmap.MAP_PRIVATE)
            self._map[:self._size] = self._small if self._first is None else self._first
            self._small = self._first = None
        assert self._map is not None
        if end > len(self._map):
            # address space only: its pages are taken as they are written. (Private: a shared anonymous
            # map, mmap's default, grown so, raised SIGBUS past its first size)
            self._map.resize(2 * end)
        self._map[self._size:end] = data
        self._size = end
        return self

    def result(self) -> bytes | bytearray | memoryview:
        """The body: its one piece, the ``bytearray``, or a view of the map (which it keeps alive), as long
        as the body."""
        if self._first is not None:
            return self._first
        if self._small is not None:
            return self._small
        assert self._map is not None
        if self._size == 0:  # a map cannot be of no bytes
            return bytearray()
        if len(self._map) != self._size:
            self._map.resize(self._size)
        return memoryview(self._map)


def _hold(size: int, limit: int, held: Reservation) -> None:
    """A body of which ``size`` bytes have arrived: held against MaxBufferedMB, or past ``limit``
    (MaxBodyMB), refused."""
    if size > limit:
        raise too_large(None, limit)
    held.grow_to(size)


def too_large(size: int | None, limit: int) -> PayloadTooLarge:
    # three figures: a limit of 0.05 MB is 52,428 bytes, which :g printed as 0.0499992
    got, most = f"{(size or 0) / 2**20:.3g} MB", megabytes(limit)
    if got == most:  # a byte over 16 MB: "(16 MB): the limit is 16 MB" said nothing
        got, most = f"{size:,} bytes", f"{limit:,} bytes, {most}"
    return PayloadTooLarge(f"body too large{f' ({got})' if size else ''}: the limit is {most} (MaxBodyMB)")


async def _read_multipart(request: web.Request, limit: int, held: Reservation) -> dict:
    fields: dict[str, Any] = {}
    total = 0
    count = 0
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            count += 1
            if count > MAX_FORM_FIELDS:
                raise BadRequest(f"too many form fields: the limit is {MAX_FORM_FIELDS}")
            if not isinstance(part, BodyPartReader):
                raise BadRequest("nested multipart bodies are not supported")
            name, filename = _part_names(part, count)
            codec = _codec(name, part.get_charset("utf-8")) if filename is None else None  # before its bytes
            chunks = []
            while chunk := await part.read_chunk(1 << 16):
                total += len(chunk)
                _hold(total, limit, held)
                chunks.append(chunk)
            data = b"".join(chunks)
            if codec is not None:
                try:
                    value: Any = data.decode(codec)
                except UnicodeDecodeError:
                    raise BadRequest(f"form field {name!r} is not valid text; send it as a file") from None
            else:
                value = data
            add_field(fields, name, value)
    except EasyServeError:
        raise
    except (BadContentDispositionHeader, BadContentDispositionParam):  # aiohttp warns; raised under -W error
        raise BadRequest(BAD_DISPOSITION.format(number=count)) from None
    except HttpProcessingError as exc:  # a part's header block: a line without a colon, too long, too many
        raise BadRequest(f"malformed multipart body: {' '.join(exc.message.split())[:200]}") from None
    except (ValueError, AssertionError, RuntimeError, KeyError, RequestPayloadError) as exc:
        raise BadRequest(f"malformed multipart body: {exc or type(exc).__name__}") from None
    if not fields:
        raise BadRequest("empty multipart form: send at least one field")
    return fields


def _part_names(part: BodyPartReader, number: int) -> tuple[str, str | None]:
    """A form part's field name and file name, from its Content-Disposition."""
    kind, params = parse_content_disposition(part.headers.get("Content-Disposition"))
    name = content_disposition_filename(params, "name")
    if kind is None or name is None:
        raise BadRequest(BAD_DISPOSITION.format(number=number))
    coding = part.headers.get("Content-Encoding", "identity").strip().lower()
    if coding != "identity":
        raise UnsupportedMediaType(f"form part {name!r} has Content-Encoding {coding!r}: send form parts "
                                   "uncompressed")
    # base64 or quoted-printable: the handle got the encoded text as if it were the file (RFC 7578 4.7)
    transfer = part.headers.get("Content-Transfer-Encoding", "binary").strip().lower()
    if transfer not in ("binary", "8bit", "7bit"):
        raise UnsupportedMediaType(f"form part {name!r} has Content-Transfer-Encoding {transfer!r}: send form "
                                   "parts as they are (binary)")
    return name, content_disposition_filename(params, "filename")


# the charsets a text field may name, each by Python's name for it: those whose ASCII is ASCII's bytes.
# Not any codec Python has: punycode's decoder takes time quadratic in its input (200 kB held the event
# loop 4 s), and utf-7 (as utf-16 would) turns bytes no filter reads as "<script>" into it
_CHARSETS = {
    "utf-8": "utf-8", "utf8": "utf-8", "us-ascii": "ascii", "ascii": "ascii", "iso-8859-1": "latin-1",
    "latin-1": "latin-1", "latin1": "latin-1", "iso8859-1": "latin-1", "windows-1252": "cp1252", "cp1252": "cp1252",
}


def _codec(name: str, charset: str) -> str:
    """Python's codec for a text field's charset; :class:`UnsupportedMediaType` for one not allowed."""
    codec = _CHARSETS.get(charset.strip().strip('"').lower().replace("_", "-"))
    if codec is None:
        allowed = ", ".join(sorted({"utf-8", "us-ascii", "iso-8859-1", "windows-1252"}))
        raise UnsupportedMediaType(f"form field {name!r} has charset {charset[:40]!r}: send text as utf-8 "
                                   f"(or one of {allowed})")
    return codec


BAD_DISPOSITION = ("form part {number} has a bad or no Content-Disposition: each part needs "
                   "'Content-Disposition: form-data; name=\"...\"'")
