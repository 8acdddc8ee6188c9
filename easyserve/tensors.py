"""Tensors on the wire: the Open Inference Protocol's datatypes, and numpy arrays to and from JSON
``data`` and binary tensor data, with every count, size and range checked before anything is built.

The datatypes and their numpy dtypes::

    BOOL   bool      INT8  int8     UINT8  uint8     FP16  float16
    BYTES  object    INT16 int16    UINT16 uint16    FP32  float32
    (of bytes)       INT32 int32    UINT32 uint32    FP64  float64
                     INT64 int64    UINT64 uint64    BF16  ml_dtypes.bfloat16

BF16 is ``ml_dtypes``' bfloat16 (numpy has none; ``ml_dtypes`` comes with onnx, and tritonclient sends
BF16 from it): a handle gets such arrays, whose values ``astype(np.float32)`` reads, and torch takes as
``torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)``.

Binary data is little-endian and row-major, with no padding; a BOOL is one byte (0 or 1); a BYTES
element is its length as a 4-byte little-endian unsigned integer, then its bytes. JSON ``data`` is an
array of the elements in row-major order, flat or nested; BYTES elements are strings (UTF-8).

Nothing here knows about HTTP: a malformed tensor raises ``ValueError`` with a message that says what
is wrong, which the caller turns into the answer it needs (400 for a request's input, 500 for a
handle's output).

>>> json_to_array([[1, 2], [3, 4]], "UINT32", [2, 2]).dtype
dtype('uint32')
>>> binary_to_array(b"\\x02\\x00\\x00\\x00hi", 0, 6, "BYTES", [1])
array([b'hi'], dtype=object)
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import sys
from typing import Any, Iterable, Sequence

import numpy as np

from .bodies import Binary

__all__ = [
    "DATATYPES",
    "Tensor",
    "check_datatype",
    "json_example",
    "shape_fits",
    "binary_size",
    "cast_in_range",
    "json_to_array",
    "binary_to_array",
    "to_output",
    "output_json_data",
    "output_binary",
    "from_torch",
    "is_torch_tensor",
]

DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(bool),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
try:
    import ml_dtypes
except ImportError:  # pragma: no cover  (onnx requires it)
    BF16: np.dtype | None = None
else:
    BF16 = DATATYPES["BF16"] = np.dtype(ml_dtypes.bfloat16)
_BY_DTYPE = {dtype: name for name, dtype in DATATYPES.items() if name != "BYTES"}
_LITTLE = sys.byteorder == "little"
LENGTH_PREFIX = 4  # bytes before each BYTES element in binary data
_LENGTH = struct.Struct("<I")
COMPLEX_HINT = "answer their real and imaginary parts, z.real and z.imag (torch: torch.view_as_real(t))"
MAX_DIMS = 32  # numpy's limit on an array's dimensions (64 since numpy 2)


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One input or output of a model, as its metadata describes it: a name, a datatype (``"FP32"``,
    ``"UINT8"``, ``"BYTES"``... see :data:`DATATYPES`) and a shape, where ``-1`` is a dimension of
    any size. Shapes are per request: the server batches requests itself.

    ``optional=True`` on an input lets a request leave it out (a model that takes either an encoded
    picture or its pixels declares both, optional, and its ``preprocess`` says which it needs)::

        class Classifier(Handle):
            inputs = [Tensor("img", "BYTES", [1], optional=True),
                      Tensor("pixels", "UINT8", [-1, -1, 3], optional=True)]
            outputs = [Tensor("scores", "FP32", [1000]), Tensor("label", "BYTES", [1])]
    """

    name: str
    datatype: str
    shape: Sequence[int]
    optional: bool = False
    # an output's class names, by index: what a request that asks for its top classes (the protocol's
    # classification, tritonclient's class_count) gets beside each score, "0.9:3:cat"
    labels: Sequence[str] | None = dataclasses.field(default=None, repr=False)
    # the file the labels were read from (its name, without its folder), which the model configuration
    # gives as Triton's gives an output's: ``label_filename``
    label_filename: str | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Tensor name must be a non-empty string, got {self.name!r}")
        if self.datatype not in DATATYPES:
            raise ValueError(f"Tensor {self.name!r}: unknown datatype {self.datatype!r}; expected one of "
                             f"{', '.join(DATATYPES)}")
        given = self.shape
        shape = tuple(given) if isinstance(given, Iterable) and not isinstance(given, (str, bytes)) else None
        if shape is None or not all(type(d) is int and d >= -1 for d in shape):
            raise ValueError(f"Tensor {self.name!r}: shape must be a list of sizes (-1 for any), got {given!r}")
        if len(shape) > MAX_DIMS:  # no request could then match it: each is refused past MAX_DIMS
            raise ValueError(f"Tensor {self.name!r}: shape has {len(shape)} dimensions; at most {MAX_DIMS}")
        object.__setattr__(self, "shape", shape)
        if self.labels is not None:
            labels = self.labels
            if isinstance(labels, (str, bytes)) or not isinstance(labels, Iterable):
                raise ValueError(f"Tensor {self.name!r}: labels must be a list of names, got {type(labels).__name__}")
            labels = tuple(labels)
            if not all(isinstance(label, str) for label in labels):
                raise ValueError(f"Tensor {self.name!r}: labels must be strings")
            object.__setattr__(self, "labels", labels)
        if self.label_filename is not None and (not isinstance(self.label_filename, str) or self.labels is None):
            raise ValueError(f"Tensor {self.name!r}: label_filename must be a string, and given with the labels")

    def metadata(self, batched: bool = False) -> dict[str, Any]:
        """The protocol's ``$metadata_tensor``: ``{"name", "datatype", "shape"}``; with ``batched``, the
        shape begins with the batch's ``-1``, as Triton lists a batching model's tensors."""
        return {"name": self.name, "datatype": self.datatype, "shape": [-1] * batched + list(self.shape)}


def json_example(tensors: Sequence[Tensor], bare: bool = True) -> str:
    """A JSON object of ``tensors`` by name, as a request's example: ``{"x": [0, 0, 0, 0]}``. Inputs a
    request may leave out are left out, unless every one may: then the first, as they are alternatives
    (the examples' ``img`` or ``pixels``). With ``bare``, a single string or bytes input is shown as one
    string, as a handle's own ``preprocess`` reads a ``/predict`` field, not as the protocol's list of one
    (which a handle that takes its tensors as they come, ``OnnxModel``, wants).

    >>> json_example([Tensor("img", "BYTES", [1], optional=True), Tensor("pixels", "UINT8", [-1, 3], optional=True)])
    '{"img": "<text or base64>"}'
    """
    required = [t for t in tensors if not t.optional]

    def value(t: Tensor) -> str:
        if bare and t.datatype == "BYTES" and list(t.shape) == [1]:
            return '"<text or base64>"'
        sample = '"text"' if t.datatype == "BYTES" else "true" if t.datatype == "BOOL" else "0"
        for size in reversed(t.shape):
            items = ", ".join([sample] * (2 if size == -1 else min(size, 3)))
            sample = f"[{items}, ...]" if size > 3 else f"[{items}]"
        return sample

    return "{" + ", ".join(f'"{t.name}": {value(t)}' for t in required or tensors[:1]) + "}"


def check_datatype(datatype: Any) -> str:
    """``datatype`` if the protocol has it, else ``ValueError`` listing those it has."""
    if datatype == "BF16" and BF16 is None:  # pragma: no cover
        raise ValueError("datatype BF16 needs the ml_dtypes package (pip install ml_dtypes); send FP16 or FP32")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise ValueError(f"unknown datatype {datatype!r}; expected one of {', '.join(DATATYPES)}")
    return datatype


def shape_fits(shape: Sequence[int], declared: Sequence[int]) -> bool:
    """Whether ``shape`` is one that ``declared`` (``-1``: any size) allows."""
    return len(shape) == len(declared) and all(d == -1 or d == s for s, d in zip(shape, declared))


def binary_size(datatype: str, shape: Sequence[int]) -> int | None:
    """How many bytes of binary data a tensor of ``datatype`` and ``shape`` takes; ``None`` for BYTES,
    whose elements have lengths of their own."""
    if datatype == "BYTES":
        return None
    return math.prod(shape) * DATATYPES[datatype].itemsize


def json_to_array(data: Any, datatype: str, shape: Sequence[int]) -> np.ndarray:
    """The array that JSON ``data`` (flat or nested, row-major) holds for a tensor of ``datatype`` and
    ``shape``; ``ValueError`` if an element is of the wrong kind or range, or the count is not the
    shape's."""
    if not isinstance(data, list):
        raise ValueError(f"data must be a JSON array of the elements, not {_one_value(data)}")
    flat = _flatten(data)
    if flat is not data:  # nested: as the shape is, not ragged, or two readings of the data would be possible
        _check_nesting(data, shape)
    count = math.prod(shape)
    if len(flat) != count:
        raise ValueError(f"data has {len(flat)} element(s) but shape {list(shape)} holds {count}")
    kinds = set(map(type, flat))
    if datatype == "BYTES":
        _expect_kinds(kinds, {str}, "strings", datatype)
        array = np.empty(count, dtype=object)
        array[:] = [element.encode() for element in flat]
        return array.reshape(shape)
    dtype = DATATYPES[datatype]
    if datatype == "BOOL":
        _expect_kinds(kinds, {bool}, "true or false", datatype)
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        if float in kinds:  # orjson reads an integer past 64 bits as a float: say so, not "with a fraction"
            huge = next((x for x in flat if type(x) is float and not -2**63 < x < 2**64), None)
            if huge is not None:
                raise ValueError(f"{huge:g} is out of range for {datatype} ({info.min} to {info.max})")
        _expect_kinds(kinds, {int}, "integers", datatype)
        if flat:
            low, high = min(flat), max(flat)
            if low < info.min or high > info.max:
                raise ValueError(f"{low if low < info.min else high} is out of range for {datatype} "
                                 f"({info.min} to {info.max})")
    else:
        _expect_kinds(kinds, {int, float}, "numbers", datatype)
        if flat:
            largest = max(map(abs, flat))
            # out of range: what the type would round to infinity; its largest value written in full
            # (3.4028235e+38, as this server writes it) rounds to that value, and is in range
            with np.errstate(over="ignore"):
                try:
                    beyond = bool(np.isinf(dtype.type(largest)))
                except OverflowError:  # an int past any float
                    beyond = True
            if beyond:
                raise ValueError(f"{largest} is out of range for {datatype} (largest {_largest(dtype):.8g})")
    return np.array(flat, dtype=dtype).reshape(shape)


def binary_to_array(buffer: Any, offset: int, size: int, datatype: str, shape: Sequence[int]) -> np.ndarray:
    """The array that ``size`` bytes of binary tensor data at ``offset`` in ``buffer`` hold.

    Fixed-size datatypes are read in place (``np.frombuffer``: no copy, unless the data is not aligned
    for its type); BYTES elements are copied out. ``ValueError`` if the byte count is not the shape's,
    a BOOL byte is not 0 or 1, or a BYTES length runs past the data.
    """
    count = math.prod(shape)
    if datatype == "BYTES":
        return _bytes_elements(memoryview(buffer)[offset : offset + size], count).reshape(shape)
    dtype = DATATYPES[datatype]
    if size != binary_size(datatype, shape):
        raise ValueError(f"binary data is {size} bytes, but shape {list(shape)} of {datatype} takes "
                         f"{binary_size(datatype, shape)} ({count} x {dtype.itemsize})")
    if datatype == "BOOL":
        raw = np.frombuffer(buffer, dtype=np.uint8, count=count, offset=offset)
        if count and raw.max() > 1:
            raise ValueError("BOOL binary data must hold only bytes 0 (false) and 1 (true)")
        return raw.view(bool).reshape(shape)
    array = np.frombuffer(buffer, dtype=dtype.newbyteorder("<"), count=count, offset=offset)
    if not _LITTLE:
        array = array.astype(dtype)
    elif offset % dtype.itemsize:
        array = array.copy()  # aligned for engines that expect it (ONNX Runtime, torch.from_numpy)
    return array.reshape(shape)


def to_output(value: Any, declared: Tensor | None = None) -> tuple[np.ndarray, str]:
    """A handle's output value (an array, a list, a number, a string) as an array and its datatype.

    Strings become BYTES (UTF-8). With ``declared``, numbers are cast to its datatype when no value
    changes, and the shape must fit it. ``ValueError`` (or ``TypeError``) otherwise.
    """
    if isinstance(value, Binary):
        raise TypeError("is an easyserve.Binary, which answers /predict alone; give its bytes here (a BYTES output)")
    if isinstance(value, np.ma.MaskedArray):  # read as its data: the masked values as if they were numbers
        raise TypeError("is a masked array, which the protocol has no form for: give array.filled(value), or "
                        "array.data")
    array = _as_array(value)
    if not array.dtype.isnative:  # big-endian data (FITS, a .npy from elsewhere) is still FP32, INT16...
        array = array.astype(array.dtype.newbyteorder("="))
    kind = array.dtype.kind
    if kind in "OSU":
        datatype = "BYTES"
        array = _as_bytes_array(array)
    elif array.dtype in _BY_DTYPE:
        datatype = _BY_DTYPE[array.dtype]
    else:
        raise TypeError(f"is an array of {array.dtype}, which the protocol has no datatype for"
                        + (f"; {COMPLEX_HINT}" if kind == "c" else ""))
    if declared is not None:
        if declared.datatype != datatype:
            array = _cast(array, datatype, declared.datatype)
            datatype = declared.datatype
        if not shape_fits(array.shape, declared.shape):
            raise ValueError(f"has shape {list(array.shape)}, but its metadata says {list(declared.shape)}")
    return array, datatype


def output_json_data(array: np.ndarray, datatype: str) -> Any:
    """The flat JSON ``data`` of an output: a list of strings for BYTES, else a 1-d array (orjson
    writes numpy arrays itself). ``ValueError`` for what JSON cannot carry: NaN, infinities, bytes
    that are not UTF-8."""
    if datatype == "BYTES":
        try:
            return [element.decode() for element in array.flat]
        except UnicodeDecodeError:
            raise ValueError("holds bytes that are not UTF-8 text, which JSON cannot carry") from None
    if _kind(array.dtype) == "f" and not np.isfinite(array).all():
        raise ValueError("holds NaN or infinity, which JSON cannot carry")
    if array.dtype == BF16:  # which orjson cannot write: as float64, each written as its exact value
        array = array.astype(np.float64)
    return np.ascontiguousarray(array).reshape(-1)


def output_binary(array: np.ndarray, datatype: str) -> bytes:
    """An output as binary tensor data."""
    if datatype == "BYTES":
        return b"".join(len(element).to_bytes(LENGTH_PREFIX, "little") + element for element in array.flat)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


# -- helpers -------------------------------------------------------------------------------------------


def _flatten(data: list) -> list:
    """The leaves of nested lists, in order; iterative, as nesting may be as deep as JSON allows."""
    if not any(type(item) is list for item in data):
        return data
    flat: list = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if type(item) is list:
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _check_nesting(data: list, shape: Sequence[int]) -> None:
    """``ValueError`` unless nested ``data`` has the shape's lists: at each depth, as many items as its
    dimension, lists above the last dimension and no lists in it (iterative, as :func:`_flatten`)."""
    rank = len(shape)
    if rank == 0:
        raise ValueError("data is nested, but shape [] holds one element: send it as [x]")
    stack = [(data, 0)]
    while stack:
        items, depth = stack.pop()
        where = f"a list at depth {depth + 1}" if depth else "data"
        if len(items) != shape[depth]:
            raise ValueError(f"{where} has {len(items)} item(s), but dimension {depth} of shape {list(shape)} "
                             f"is {shape[depth]}: send the data flat, or nested as the shape is")
        inner = depth + 1 < rank
        for item in items:
            if (type(item) is list) != inner:
                found, wanted = ("an element", "a list") if inner else ("a list", "an element")
                raise ValueError(f"{where} holds {found} where shape {list(shape)} has {wanted}: send the data "
                                 "flat, or nested as the shape is")
            if inner:
                stack.append((item, depth + 1))


# a float is what JSON writes with a point or an exponent: 2.0 is one, and "with a fraction" misled
_JSON_KINDS = {bool: "booleans", int: "integers", float: "numbers with a point or an exponent (2.0 is one: write 2)",
               str: "strings", list: "arrays", dict: "objects", type(None): "null"}


def _expect_kinds(kinds: set, allowed: set, what: str, datatype: str) -> None:
    wrong = kinds - allowed
    if wrong:
        found = " and ".join(sorted(_JSON_KINDS.get(kind, kind.__name__) for kind in wrong))
        raise ValueError(f"{datatype} data must hold {what}, and holds {found}")


def _one_value(value: Any) -> str:
    """What ``value``, data that is no array, is, and for one element, how to send it: ``[1.5]``."""
    if isinstance(value, (bool, int, float, str)) and len(text := json.dumps(value)) <= 40:
        return f"one {'string' if isinstance(value, str) else 'value'}: write [{text}]"
    return {dict: "an object", type(None): "null"}.get(type(value), f"one {type(value).__name__}")


def _bytes_elements(view: memoryview, count: int) -> np.ndarray:
    # a list, not np.empty(count): the count is the client's word, and a shape of [2**31] would make an
    # array of 16 GB before the data is found to hold nothing
    # sliced as bytes, lengths read by a struct: a million elements in 0.35 s, where slicing the view and
    # int.from_bytes took 1.0 s (empty ones) to 1.8 s (5 bytes each)
    data = view.tobytes()
    unpack = _LENGTH.unpack_from
    elements: list[bytes] = []
    append = elements.append
    size = len(data)
    at = found = 0
    while at < size:
        if found == count:
            raise ValueError(f"binary data holds more than the {count} BYTES element(s) its shape holds "
                             f"({size - at} byte(s) left after element {count})")
        if size - at < LENGTH_PREFIX:
            raise ValueError(f"BYTES element {found}: its 4-byte length is cut off at the end of the data")
        (length,) = unpack(data, at)
        at += LENGTH_PREFIX
        if length > size - at:
            raise ValueError(f"BYTES element {found} says it has {length} bytes, but only {size - at} are left")
        append(data[at : at + length])
        at += length
        found += 1
    if found != count:
        raise ValueError(f"binary data holds {found} BYTES element(s), but its shape holds {count}")
    array = np.empty(count, dtype=object)
    array[:] = elements
    return array


def from_torch(value: Any) -> np.ndarray | None:
    """A PyTorch tensor as the numpy array it holds: on the CPU, off its autograd graph, bfloat16 (which
    numpy lacks) as float32; ``None`` for anything else. torch is not imported: a value is a tensor if
    its class comes from torch and it can be detached. A handle's tensor, returned as it came from the
    model, was "an array of shape (1, 1000) for a batch of 1" to unstack, and "not JSON serializable"
    to the answer."""
    if not is_torch_tensor(value):
        return None
    if getattr(value, "is_nested", False):  # as forward's outputs, its tensors are taken one a request
        raise TypeError("a nested tensor holds tensors of other shapes, which no one array holds: return "
                        "list(tensor.unbind()), or each tensor by itself")
    if getattr(value, "is_meta", False):  # torch's own error was a NotImplementedError: "no data!"
        raise TypeError("a tensor on the meta device holds no values (only a shape): make it on the CPU or a GPU")
    tensor = value.detach().cpu()
    if getattr(tensor, "is_quantized", False):  # its integers stand for the numbers they quantise
        tensor = tensor.dequantize()
    if hasattr(tensor, "resolve_conj"):  # a conjugate or negative view's bit, which numpy cannot take
        tensor = tensor.resolve_conj().resolve_neg()
    try:
        return tensor.numpy()
    except TypeError:  # a type numpy lacks: bfloat16, float8 (as float32)
        return tensor.float().numpy()


def is_torch_tensor(value: Any) -> bool:
    """Whether ``value`` is a PyTorch tensor (or of a class made from one), without importing torch."""
    return hasattr(value, "detach") and any(c.__module__.partition(".")[0] == "torch" for c in type(value).__mro__)


def _as_array(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    tensor = from_torch(value)
    if tensor is not None:
        return tensor
    if isinstance(value, (str, bytes)):
        array = np.empty((), dtype=object)
        array[()] = value
        return array
    array = np.asarray(value)
    if array.dtype.kind in "SU":  # numpy drops the trailing zero bytes of "S" elements: keep them
        array = np.asarray(value, dtype=object)
    elif array.dtype.kind == "f" and array.size and 2**53 <= np.abs(array).max() < math.inf:
        # numpy makes [3, 2**64 - 1] float64, [3.0, 1.8446744073709552e+19]: a 64-bit hash loses its last
        # digits (NaN and infinities are floats: a list holding one is no list of integers)
        elements = np.asarray(value, dtype=object).ravel()
        if all(type(e) is int for e in elements):
            if min(elements) >= 0 and max(elements) < 2**64:
                return np.asarray(value, dtype=np.uint64)
            raise ValueError(f"holds the integers {min(elements)} and {max(elements)}, which no one datatype of the "
                             "protocol holds (INT64 or UINT64)")
        # and [2**53 + 1, 0.5] FP64, the integer rounded, where /predict's JSON answers it exactly
        rounded = [int(e) for e in elements if isinstance(e, (int, np.integer)) and not isinstance(e, bool)
                   and abs(int(e)) > 2**53 and int(float(e)) != int(e)]
        if rounded:
            raise ValueError(f"holds the integer {rounded[0]} among floats, which FP64 cannot hold exactly; give "
                             "the integers and the floats as outputs of their own")
    return array


def _as_bytes_array(array: np.ndarray) -> np.ndarray:
    out = np.empty(array.shape, dtype=object)
    for index, element in np.ndenumerate(array):
        if isinstance(element, str):
            out[index] = element.encode()
        elif isinstance(element, bytes):
            out[index] = bytes(element)
        elif isinstance(element, int) and not -2**63 <= element < 2**64:  # numpy keeps these as objects
            raise ValueError(f"holds the integer {element}, which no datatype of the protocol holds (64 bits at most)")
        else:
            raise TypeError(f"holds a {type(element).__name__}: elements must all be numbers, or all strings "
                            "or bytes")
    return out


def _cast(array: np.ndarray, datatype: str, declared: str) -> np.ndarray:
    target = DATATYPES[declared]
    if not array.size:  # an empty list is float64 to numpy: nothing in it to disagree
        return np.empty(array.shape, dtype=target)
    numeric = "iuf"
    if declared == "BYTES" or datatype == "BYTES" or declared == "BOOL" or datatype == "BOOL" or (
        target.kind in "iu" and _kind(array.dtype) == "f"
    ) or _kind(array.dtype) not in numeric:
        raise ValueError(f"is {datatype}, but its metadata says {declared}")
    cast = cast_in_range(array, target)
    if cast is None:
        too = "out of range" if target.kind in "iu" else "too large"
        raise ValueError(f"holds values {too} for {declared}, its datatype in the metadata")
    return cast


def cast_in_range(array: np.ndarray, dtype: np.dtype) -> np.ndarray | None:
    """``array`` as ``dtype``, numbers of one kind to another width or byte order; ``None`` where a value
    does not fit (an integer out of range, or for floats a finite number that becomes infinite)."""
    with np.errstate(over="ignore", invalid="ignore"):  # checked just below
        cast = array.astype(dtype)
    if _kind(dtype) == "f":
        lost = np.count_nonzero(np.isfinite(cast)) != np.count_nonzero(np.isfinite(array))
    else:
        lost = not np.array_equal(cast, array)
    return None if lost else cast


def _kind(dtype: np.dtype) -> str:
    """numpy's kind of ``dtype``, bfloat16 a float ("f") as it is (ml_dtypes' types are "V" to numpy)."""
    return "f" if dtype == BF16 else dtype.kind


def _largest(dtype: np.dtype) -> float:
    """The largest finite value of a float ``dtype``."""
    return float(ml_dtypes.finfo(dtype).max if dtype == BF16 else np.finfo(dtype).max)
