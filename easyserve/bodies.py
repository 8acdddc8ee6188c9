"""JSON request bodies: one decoder for the server and the workers.

A small JSON body is decoded on the event loop as it arrives, so a malformed one gets its 400 at
once. A large one (``LARGE_JSON`` bytes or more) is not: decoding megabytes of numbers and pickling
the result for a worker held the event loop for seconds (eight 15 MB bodies of floats stopped
``/health`` for 2.8-4.7 s). It travels to the worker as :class:`JsonBody`, out of band and uncopied
(see :mod:`easyserve.wire`), and the worker decodes it with the same function, so the handle sees
the same dict and the client the same 400 for the same mistake.
"""

from __future__ import annotations

import pickle
from typing import Any

import orjson

from .errors import BadRequest

__all__ = ["LARGE_JSON", "JsonBody", "parse_json_object"]

LARGE_JSON = 64 * 1024

# orjson's wording, where Python's json module (which clients may know) says it better
JSON_MESSAGES = {"unexpected content after document": "Extra data after the JSON value"}


class JsonBody:
    """A JSON body still to be decoded, by the worker that runs it: its bytes (or, once received, the
    buffer they arrived in), never copied on the way (a ``bytes`` subclass would copy them, twice)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: int) -> Any:
        return JsonBody, (pickle.PickleBuffer(self.data) if protocol >= 5 else bytes(self.data),)


def parse_json_object(body: bytes | bytearray, example: str = '{"img": "<base64>"}') -> dict:
    """The JSON object ``body`` holds; :class:`~easyserve.errors.BadRequest` saying what is wrong (a body
    that is not an object is told to look like ``example``)."""
    # orjson holds to RFC 8259: NaN and Infinity are refused, and so is a number past a double's range
    # (1e999), which Python's json would read as inf, a value no handle expects and JSON cannot carry back.
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(_json_problem(exc)) from None
    if not isinstance(data, dict):
        raise BadRequest(f"body must be a JSON object such as {example}, not a JSON {_json_kind(data)}")
    return data


def _json_problem(exc: orjson.JSONDecodeError) -> str:
    if exc.msg.startswith("str is not valid UTF-8"):
        return "body is not valid UTF-8 JSON"
    if exc.msg == "depth limit exceeded":
        return "body is JSON nested too deeply"
    where = f" at line {exc.lineno} column {exc.colno}"
    if "infinity" in exc.msg or exc.doc.startswith(("NaN", "Infinity"), exc.pos):
        return "body is not valid JSON: numbers must be finite (no NaN, Infinity or 1e999)" + where
    return f"body is not valid JSON: {JSON_MESSAGES.get(exc.msg, exc.msg)}{where}"


def _json_kind(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")
