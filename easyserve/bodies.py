"""Bodies that travel uncopied: JSON and urlencoded-form requests (one decoder for the server and the
workers), and a handle's binary answers (:class:`Binary`).

A small JSON or form body is decoded on the event loop as it arrives, so a malformed one gets its
400 at once. A large one (``LARGE_JSON`` bytes or more) is not: decoding megabytes of numbers and
pickling the result for a worker held the event loop for seconds (eight 15 MB bodies of floats
stopped ``/health`` for 2.8-4.7 s; two 15 MB forms of ``%41``, 2 s). It travels to the worker as
:class:`JsonBody` or :class:`FormBody`, out of band and uncopied (see :mod:`easyserve.wire`), and the
worker decodes it with the same function, so the handle sees the same dict and the client the same
400 for the same mistake. A small JSON body, once found good, travels as its bytes too, and is
decoded again by the worker: what waits in the queue is the bytes ``MaxBufferedMB`` counts, where
its objects were up to 27 times as large (500 bodies of 64 kB of ``{}`` held 870 MB, counted as 32).

A result the handle wraps in :class:`Binary` (a PNG, a WAV) is answered as its bytes, with its
Content-Type, rather than as base64 in JSON; it too crosses from the worker out of band.
"""

from __future__ import annotations

import pickle
import re
import urllib.parse
from typing import Any, Callable

import orjson

from .errors import BadRequest
from .wire import OUT_OF_BAND

__all__ = ["LARGE_JSON", "MAX_FORM_FIELDS", "Binary", "FormBody", "JsonBody", "example_text", "parse_form",
           "parse_json_object", "parse_query"]

# A body's example where the handle declares no inputs: it was {"img": "<base64>"}, told to a handle of any
# inputs, which read as "send an image"
EXAMPLE = '{"<field the handle reads>": <value>}'
LARGE_JSON = 64 * 1024
MAX_FORM_FIELDS = 256

# orjson's wording, where Python's json module (which clients may know) says it better
JSON_MESSAGES = {"unexpected content after document": "Extra data after the JSON value"}


class JsonBody:
    """A JSON body still to be decoded, by the worker that runs it: its bytes (or, once received, the
    buffer they arrived in), a large one never copied on the way (a ``bytes`` subclass would copy
    them, twice)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: int) -> Any:
        if protocol >= 5 and len(self.data) >= OUT_OF_BAND:
            return type(self), (pickle.PickleBuffer(self.data),)
        return type(self), (bytes(self.data),)  # a small one in the pickle: one piece less to send

    def decode(self, example: str | Callable[[], str] = EXAMPLE) -> dict:
        """The body's fields; :class:`~easyserve.errors.BadRequest` saying what is wrong."""
        return parse_json_object(self.data, example)


class FormBody(JsonBody):
    """An urlencoded form still to be decoded, by the worker that runs it, as a JSON body is."""

    __slots__ = ()

    def decode(self, example: str | Callable[[], str] = EXAMPLE) -> dict:
        return parse_form(self.data)


# type/subtype, then parameters; printable ASCII only, so nothing can end the header line (RFC 9110 8.3)
_MEDIA_TYPE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+/[!#$%&'*+.^_`|~0-9A-Za-z-]+([ \t]*;[ -~]*)?")


class Binary:
    """A result answered as it is, not as JSON: ``return easyserve.Binary(png, "image/png")`` from
    ``postprocess`` (or ``run_batch``, one per request) answers ``/predict`` with those bytes and that
    Content-Type. Without it, ``bytes`` are answered as base64 in JSON: a third larger, and decoded
    by every client. It must be the whole result: inside a dict or a list there is no body of its own
    to give it (return its bytes there, which go as base64).

    ``ValueError`` for a Content-Type that is not ``type/subtype`` (with parameters) in printable
    ASCII, ``TypeError`` for data that is not bytes-like, whether given at first or set later: raised
    in the handle, so its author sees them in the worker's log with the line that made them. (Set
    later, they went unchecked: the answer failed to pickle, or to unpickle in the server, ending the
    worker, and on the retry a second one.)"""

    __slots__ = ("_data", "_content_type")

    def __init__(self, data: bytes | bytearray | memoryview, content_type: str = "application/octet-stream"
                 ) -> None:
        self.data = data
        self.content_type = content_type

    @property
    def data(self) -> bytes | bytearray | memoryview:
        return self._data

    @data.setter
    def data(self, data: bytes | bytearray | memoryview) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"Binary holds bytes (or a bytearray or memoryview), not {type(data).__name__}")
        if isinstance(data, memoryview) and not data.c_contiguous:
            data = data.tobytes()
        self._data = data

    @property
    def content_type(self) -> str:
        return self._content_type

    @content_type.setter
    def content_type(self, content_type: str) -> None:
        if not isinstance(content_type, str) or not _MEDIA_TYPE.fullmatch(content_type):
            raise ValueError(f"Binary's content_type must be a media type such as 'image/png', not {content_type!r}")
        # a plain str: a subclass (a str Enum) was pickled to the server as itself, made it import the
        # handle's module (or failed the answer, for a class it could not find) and went into the
        # header as str() gives it ("Mime.PNG")
        self._content_type = str.__str__(content_type)

    def __reduce_ex__(self, protocol: int) -> Any:
        return Binary, (pickle.PickleBuffer(self.data) if protocol >= 5 else bytes(self.data), self.content_type)

    def __len__(self) -> int:
        return memoryview(self.data).nbytes

    def __repr__(self) -> str:
        return f"Binary({len(self)} bytes, {self.content_type!r})"


def example_text(example: str | Callable[[], str]) -> str:
    """A body's example, or what ``example`` makes of the handle's inputs (built only for a refusal)."""
    return example() if callable(example) else example


def parse_json_object(body: bytes | bytearray, example: str | Callable[[], str] = EXAMPLE) -> dict:
    """The JSON object ``body`` holds; :class:`~easyserve.errors.BadRequest` saying what is wrong (a body
    that is not an object is told to look like ``example``, or what it makes: the handle's inputs)."""
    # orjson holds to RFC 8259: NaN and Infinity are refused, and so is a number past a double's range
    # (1e999), which Python's json would read as inf, a value no handle expects and JSON cannot carry back.
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(_json_problem(exc)) from None
    if not isinstance(data, dict):
        raise BadRequest(f"body must be a JSON object such as {example_text(example)}, not a JSON {_json_kind(data)}")
    return data


def parse_form(body: bytes | bytearray | memoryview) -> dict:
    """The fields of an urlencoded form (a name given twice: a list of its values); :class:`BadRequest`
    for more than ``MAX_FORM_FIELDS`` fields, or for text that is not UTF-8 once unescaped."""
    body = bytes(body)  # in a worker, the memory it arrived in
    if body.count(b"&") >= MAX_FORM_FIELDS:  # fields are split at "&" alone (a ";" is a value's)
        raise BadRequest(f"too many form fields: the limit is {MAX_FORM_FIELDS}")
    try:
        # errors="strict": a field's %ff, not UTF-8 once unescaped, is refused as the same bytes sent
        # unescaped are, not made U+FFFD and run
        pairs = urllib.parse.parse_qsl(body.decode(), keep_blank_values=True, strict_parsing=True,
                                       max_num_fields=MAX_FORM_FIELDS, errors="strict")
    except UnicodeDecodeError:
        # curl --data-binary @photo.jpg, without -H 'Content-Type: image/jpeg', sends it as a form
        raise BadRequest("form body is not valid UTF-8: to send a file's bytes, give its Content-Type "
                         "(such as image/jpeg or application/octet-stream); a form's is the default of "
                         "curl --data") from None
    except ValueError as exc:
        raise BadRequest(f"malformed form body: {exc}") from None
    return _fields(pairs)


def parse_query(query: str) -> dict:
    """A URL's query string (``top_k=5&tag=a&tag=b``) as the handle's ``task["parameters"]``: each value
    a ``str``, a name given twice a list of its values, a name without ``=`` an empty string (``?verbose``);
    :class:`BadRequest` for more than ``MAX_FORM_FIELDS`` of them, or for text that is not UTF-8 once
    unescaped. As a form's fields, but without the form's strictness: ``?verbose`` and ``?a=1&`` are
    what people type."""
    if query.count("&") >= MAX_FORM_FIELDS:
        raise BadRequest(f"too many query parameters: the limit is {MAX_FORM_FIELDS}")
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS,
                                       errors="strict")
        query.encode()  # raw bytes past ASCII, which a lenient HTTP parser passes on as surrogates
    except (UnicodeDecodeError, UnicodeEncodeError):
        raise BadRequest("query string is not UTF-8 once unescaped (%xx)") from None
    except ValueError as exc:
        raise BadRequest(f"malformed query string: {exc}") from None
    return _fields(pairs)


def _fields(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, value in pairs:
        add_field(fields, name, value)
    return fields


def add_field(fields: dict[str, Any], name: str, value: Any) -> None:
    """``value`` under ``name`` in a form's ``fields``: a name given again (several files) makes a list."""
    if name in fields:
        existing = fields[name]
        fields[name] = existing + [value] if isinstance(existing, list) else [existing, value]
    else:
        fields[name] = value


def _json_problem(exc: orjson.JSONDecodeError) -> str:
    if exc.msg.startswith("str is not valid UTF-8"):
        return "body is not valid UTF-8 JSON"
    # orjson 3.12 and later say "depth limit exceeded"; 3.9.15 to 3.11 "array and object recursion depth exceeded"
    if exc.msg in ("depth limit exceeded", "array and object recursion depth exceeded"):
        return "body is JSON nested too deeply"
    where = f" at line {exc.lineno} column {exc.colno}"
    if "infinity" in exc.msg or exc.doc.startswith(("NaN", "Infinity"), exc.pos):
        return "body is not valid JSON: numbers must be finite (no NaN, Infinity or 1e999)" + where
    return f"body is not valid JSON: {JSON_MESSAGES.get(exc.msg, exc.msg)}{where}"


def _json_kind(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")
