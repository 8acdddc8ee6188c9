"""Tensors as binary bodies on ``/predict``: numpy's ``.npy`` format (``application/x-npy``), or raw
bytes with the dtype and shape in headers.

A client sends an array without turning every number into text::

    curl localhost:9876/predict -H 'Content-Type: application/x-npy' --data-binary @pixels.npy
    curl localhost:9876/predict -H 'Content-Type: application/octet-stream' \\
         -H 'X-Tensor-Dtype: uint8' -H 'X-Tensor-Shape: 224,224,3' --data-binary @pixels.raw

and the handle gets ``task_info = {"data": <numpy array>, "content_type": ...}``: an array over the
request's own bytes, not a copy. With ``Accept: application/x-npy``, a ``postprocess`` that returns
an array is answered as ``.npy`` too (anything else is answered as JSON, and the Content-Type says
which). Everything is checked before an array is made: the header, the dtype (no Python objects: a
``.npy`` file can hold pickles, which are never loaded), and that the bytes are exactly what the
shape and dtype need.
"""

from __future__ import annotations

import io
import math
import pickle
import re
import sys
from typing import Any

import numpy as np

from .errors import BadRequest
from .tensors import MAX_DIMS, from_torch

__all__ = ["NPY", "NpyAnswer", "Writable", "DTYPE_HEADER", "SHAPE_HEADER", "read_npy", "read_raw_tensor", "to_npy",
           "wants_npy"]

NPY = "application/x-npy"
DTYPE_HEADER = "X-Tensor-Dtype"
SHAPE_HEADER = "X-Tensor-Shape"
MAGIC = b"\x93NUMPY"
MAX_HEADER = 65_535  # numpy's own limit for a header it will read
# the element types a tensor may have: numbers and booleans, in either byte order
KINDS = "biuf"
# one entry of a header's dict, as np.save writes it ({'descr': '<f4', 'fortran_order': False, 'shape':
# (224, 224, 3), }) or any writer with other spacing, quotes or order: a name, then a string, a bool,
# or a tuple (or list) of whole numbers; matched in time linear in its length. Python's own parser
# (ast.literal_eval, which numpy uses) took 50-110 ms of the event loop for a 64 KB header.
_ENTRY = re.compile(r"""\s*(?P<q>['"])(?P<key>\w{1,20})(?P=q)\s*:\s*(?:"""
                    r"""(?P<sq>['"])(?P<text>[^'"]{0,64})(?P=sq)|(?P<bool>True|False)|"""
                    r"""(?P<open>[(\[])(?P<items>[-+\d\s,]*)(?P<close>[)\]]))\s*(?:,|\Z)""", re.ASCII)
_SIZE = re.compile(r"[-+]?(?:0+|[1-9][0-9]*)")  # a whole number as Python writes one (ASCII digits alone; 00 too)
_HEADER_KEYS = {"descr", "fortran_order", "shape"}
_FIELDS = re.compile(r"""\s*['"]descr['"]\s*:\s*\[""")  # a structured type's list of fields


class NpyAnswer:
    """A ``/predict`` request whose client asked for ``application/x-npy``: the worker answers an
    array result as ``.npy``."""

    __slots__ = ("task_info",)

    def __init__(self, task_info: Any) -> None:
        self.task_info = task_info

    def __reduce__(self) -> tuple:
        return NpyAnswer, (self.task_info,)


def wants_npy(accept: str) -> bool:
    """Whether an ``Accept`` header asks for ``.npy``: it names it, with a weight above 0 (``q=0``
    refuses it), and not below JSON's where it names ``application/json`` too. Whichever came first was
    taken: ``application/json, application/x-npy;q=0.1`` (JSON preferred) was answered ``.npy``."""
    if "x-npy" not in accept.lower():  # most requests: no Accept, or one naming JSON or */* alone
        return False
    weights: dict[str, float] = {}
    for item in accept.split(","):
        kind, *params = (part.strip() for part in item.split(";"))
        kind = kind.lower()
        if kind in (NPY, "application/json") and kind not in weights:
            weights[kind] = _weight(params)
    npy = weights.get(NPY, 0.0)
    return npy > 0 and npy >= weights.get("application/json", 0.0)


def _weight(params: list[str]) -> float:
    """A media range's ``q`` (1 unless given; parameter names are case-insensitive, RFC 9110); one that is
    not a number from 0 to 1 counts as 1, as the range is named all the same."""
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            try:
                weight = float(value.strip())
            except ValueError:
                return 1.0
            return weight if 0 <= weight <= 1 else 1.0
    return 1.0


class Writable:
    """A request's tensor, read over the body's ``bytes`` (so read-only here), that a worker unpickles as
    a plain writable array over the buffer it arrived in, uncopied (see :mod:`easyserve.wire`). A
    handle that clamped such an array in place got "assignment destination is read-only", answered
    400 as if the client had erred, where a v2 tensor, made in the worker, was writable."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __reduce_ex__(self, protocol: int) -> Any:
        array = self.array
        order = "C" if array.flags.c_contiguous else "F"  # as read_npy makes them: one or the other
        data = pickle.PickleBuffer(array) if protocol >= 5 else array.tobytes(order=order)
        return _writable, (data, array.dtype.str, array.shape, order)


def _writable(data: Any, dtype: str, shape: tuple, order: str) -> np.ndarray:
    view = memoryview(data)
    # the buffer a worker received it in, which pickle hands over read-only as it was sent; else a copy
    owner = view.obj if type(view.obj) is bytearray and len(view.obj) == view.nbytes else bytearray(view)
    return np.frombuffer(owner, dtype=np.dtype(dtype)).reshape(shape, order=order)


def read_npy(body: bytes | bytearray | memoryview) -> np.ndarray:
    """The array a ``.npy`` body holds, as a view on ``body``; :class:`BadRequest` saying what is wrong."""
    view = memoryview(body)
    if bytes(view[:6]) != MAGIC or len(view) < 10:
        raise BadRequest("not a .npy body: it must start with numpy's magic bytes \\x93NUMPY "
                         "(np.save writes one)")
    major = view[6]
    if major == 1:
        length, start = int.from_bytes(view[8:10], "little"), 10
    elif major in (2, 3) and len(view) >= 12:
        length, start = int.from_bytes(view[8:12], "little"), 12
    else:
        raise BadRequest(f".npy format version {major}.{view[7]} is not one numpy writes (1.0, 2.0, 3.0)")
    if length > MAX_HEADER or start + length > len(view):
        raise BadRequest(f".npy header of {length} bytes: longer than the body or than {MAX_HEADER} bytes")
    try:
        text = bytes(view[start:start + length]).decode("latin-1" if major < 3 else "utf-8")
        descr, fortran, shape = _header(text)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("damaged .npy header: expected a dict with 'descr', 'fortran_order' and 'shape'") from None
    if not isinstance(fortran, bool) or not isinstance(shape, tuple):
        raise BadRequest(".npy header: 'fortran_order' must be True or False and 'shape' a tuple")
    dtype = _dtype(descr, "the .npy header's 'descr'")
    return _array(view[start + length:], dtype, shape, "the .npy data", order="F" if fortran else "C")


def _header(text: str) -> tuple[Any, Any, Any]:
    """The ``descr``, ``fortran_order`` and ``shape`` of a ``.npy`` header's dict, each once and nothing
    else; ``ValueError`` for anything else. A shape is a tuple as Python reads one: ``(3)`` is 3."""
    text = text.rstrip()  # the spaces and newline that pad it
    if not (text.startswith("{") and text.endswith("}")):
        raise ValueError("not a dict")
    entries: dict[str, Any] = {}
    position, end = 1, len(text) - 1
    while text[position:end].strip():
        found = _ENTRY.match(text, position, end)
        if found is None and _FIELDS.match(text, position, end):
            raise BadRequest("the .npy header's 'descr' is a structured type (named fields); expected a number "
                             "or boolean type such as uint8, float32, <f4, int64 or bool")
        if found is None or found["key"] in entries or found["key"] not in _HEADER_KEYS:
            raise ValueError("not a header entry")
        position = found.end()
        if found["open"]:
            entries[found["key"]] = _sizes(found["open"], found["items"], found["close"])
        else:
            entries[found["key"]] = found["text"] if found["bool"] is None else found["bool"] == "True"
    if entries.keys() != _HEADER_KEYS:
        raise ValueError("a key missing")
    return entries["descr"], entries["fortran_order"], entries["shape"]


def _sizes(opening: str, inside: str, closing: str) -> Any:
    """A shape's tuple (or list) of whole numbers as Python reads it: ``(3,)`` and ``()`` are tuples,
    ``(3)`` is 3; ``(,)`` and ``(1,,)`` are not Python."""
    if "([".index(opening) != ")]".index(closing):
        raise ValueError("brackets that do not pair")
    items = inside.split(",") if inside.strip() else []
    ended = bool(items) and not items[-1].strip()
    if ended:
        items.pop()
    if any(not item.strip() for item in items):
        raise ValueError("an empty size")
    if not all(_SIZE.fullmatch(item.strip()) for item in items):  # int() takes "01", Python does not
        raise ValueError("a size Python does not read as a number")
    numbers = [int(item) for item in items]  # ValueError for more than 4,300 digits
    if opening == "[":
        return numbers
    return numbers[0] if len(numbers) == 1 and not ended else tuple(numbers)


def read_raw_tensor(body: bytes | bytearray | memoryview, dtype_text: str, shape_text: str | None) -> np.ndarray:
    """The array raw bytes hold, given the ``X-Tensor-Dtype`` and ``X-Tensor-Shape`` headers (no shape:
    one dimension, as long as the bytes make)."""
    dtype = _dtype(dtype_text.strip(), DTYPE_HEADER)
    if shape_text is None:
        if len(body) % dtype.itemsize:
            raise BadRequest(f"{len(body)} bytes are not a whole number of {dtype.name} elements "
                             f"({dtype.itemsize} bytes each)")
        shape: tuple = (len(body) // dtype.itemsize,)
    else:
        parts = [p.strip() for p in shape_text.replace("x", ",").split(",")] if shape_text.strip() else []
        if not all(p.isascii() and p.isdigit() and len(p) <= 18 for p in parts):  # "²" is a digit to isdigit()
            raise BadRequest(f"{SHAPE_HEADER}: got {shape_text!r}; expected sizes separated by commas, "
                             "such as 224,224,3 (an empty header for a scalar)")
        shape = tuple(int(p) for p in parts)
    return _array(memoryview(body), dtype, shape, "the body")


def to_npy(value: Any) -> bytes | None:
    """``value`` as a ``.npy`` file if it is a numeric or boolean numpy array (or scalar, or torch tensor),
    else ``None``."""
    tensor = from_torch(value)
    value = value if tensor is None else tensor
    if not isinstance(value, (np.ndarray, np.generic)) or value.dtype.kind not in KINDS:
        return None
    if isinstance(value, np.ma.MaskedArray):  # written as its data: the masked values as if they were numbers
        raise TypeError("a masked array has no .npy form: give array.filled(value), or array.data")
    out = io.BytesIO()
    np.lib.format.write_array(out, np.asanyarray(value), allow_pickle=False)
    return out.getvalue()


def _dtype(text: Any, where: str) -> np.dtype:
    try:
        dtype = np.dtype(text) if isinstance(text, str) else None
    # DeprecationWarning for 'a' where warnings are errors (-W error); SyntaxError where numpy reads a
    # repeat count ("(,)i4") with ast: it escaped as a 500
    except (TypeError, ValueError, SyntaxError, DeprecationWarning):
        dtype = None
    if dtype is None or dtype.kind not in KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise BadRequest(f"{where}: got {text!r}; expected a number or boolean type such as uint8, float32, "
                         "<f4, int64 or bool")
    if dtype.itemsize > 8:  # long double: 80-bit on x86, 128-bit on ARM, so the same bytes are other numbers
        raise BadRequest(f"{where}: got {text!r}, a long double, whose bytes mean different numbers on different "
                         "machines; send float64")
    return dtype


def _array(data: memoryview, dtype: np.dtype, shape: tuple, what: str, order: str = "C") -> np.ndarray:
    if len(shape) > MAX_DIMS:  # said by their number: a list of thousands would be the message
        raise BadRequest(f"shape has {len(shape)} dimensions; an array may have at most {MAX_DIMS}")
    # sizes past sys.maxsize: no array has them, and the product of a few 4,000-digit ones is too long to print
    if not all(
        isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= sys.maxsize for n in shape
    ):
        raise BadRequest(f"shape: expected sizes that are whole numbers from 0 to {sys.maxsize}")  # not repeated
    needed = math.prod(shape) * dtype.itemsize  # Python integers: no overflow, however large the shape
    if needed != data.nbytes:
        raise BadRequest(f"{what} is {data.nbytes} bytes, but shape {list(shape)} of {dtype.name} takes {needed}")
    if dtype.kind == "b" and data.nbytes and np.frombuffer(data, dtype=np.uint8).max() > 1:
        # numpy keeps the byte as it is: a "True" that is 2 compares unequal to True, and sums as 2
        raise BadRequest(f"{what}: bool elements must be the bytes 0 (False) and 1 (True)")
    try:
        return np.frombuffer(data, dtype=dtype).reshape(shape, order=order)
    except ValueError:  # no elements, but sizes whose product numpy cannot hold: (0, 2**62) of float64
        raise BadRequest(f"shape {list(shape)} of {dtype.name} is larger than numpy can index, although it holds "
                         "no elements") from None
