"""What ``easyserve bench`` sends: request bodies prepared before the run and sent in turn.

A :class:`Payload` is a path on the server and a few ready :class:`Body` values. The load generator
only cycles through them, so encoding (base64, JSON, tensors) costs nothing while it measures::

    JsonPayload({"x": [5.1, 3.5, 1.4, 0.2]})            # one JSON object, or a list sent in turn
    ImagePayload("picture.jpg")                        # {"img": "<base64>"}, the original format
    ImagePayload("picture.jpg", raw=True)              # the file's bytes, Content-Type: image/jpeg
    TensorPayload(["uint8:224x224x3"])                 # {"x": [[[...]]]}: random tensors as JSON lists
    NpyPayload(["uint8:224x224x3"])                    # the same tensor as application/x-npy
    InferPayload(["pixels=uint8:224x224x3"], "resnet18")   # v2 binary tensors to /v2/models/resnet18/infer

Another wire format is one more class: the binary forms of tensors subclass :class:`TensorPayload`
and override :meth:`TensorPayload.encode` (and :attr:`Payload.path` for another route); the random
arrays are made for them, and ``bench(url, payload=...)`` sends what they encode, body and headers
as they are.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
import re
import urllib.parse
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .npy import NPY, to_npy
from .tensors import BF16, output_binary, output_json_data, to_output
from .v2.protocol import HEADER_LENGTH

__all__ = ["Body", "Payload", "JsonPayload", "ImagePayload", "TensorPayload", "TensorSpec", "NpyPayload",
           "InferPayload", "InferImagePayload", "payload_from", "DEFAULT_BODY"]

DEFAULT_BODY = {"x": [5.1, 3.5, 1.4, 0.2]}  # what the built-in demo model answers (`easyserve run`)
FORMS = ("json", "npy", "v2")  # how tensors travel


@dataclasses.dataclass(frozen=True)
class Body:
    """One request as it goes over the wire: its bytes and headers (Content-Type among them)."""

    data: bytes
    headers: Mapping[str, str]

    @classmethod
    def json(cls, value: Any) -> Body:
        """A JSON body; numpy arrays become lists."""
        return cls(json.dumps(value, separators=(",", ":"), default=_plain).encode(),
                   {"Content-Type": "application/json"})


class Payload:
    """Requests for the load generator: :attr:`path` on the server and the :meth:`bodies` to send,
    one after the other, round and round. Subclasses build their bodies once, in ``__init__``."""

    path = "/predict"

    def __init__(self, bodies: Sequence[Body], about: str) -> None:
        if not bodies:
            raise ValueError("a payload needs at least one body to send")
        self._bodies = list(bodies)
        self.about = about

    def bodies(self) -> list[Body]:
        """The prepared requests, sent in this order and then again."""
        return self._bodies

    def describe(self) -> str:
        """One line for reports: what is sent, and how big it is."""
        sizes = [len(body.data) for body in self._bodies]
        size = _size(sizes[0]) if len(set(sizes)) == 1 else f"{_size(min(sizes))}-{_size(max(sizes))}"
        variants = f", {len(sizes)} variants" if len(sizes) > 1 else ""
        return f"{self.about} to {self.path} ({size}{variants})"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


class JsonPayload(Payload):
    """JSON objects, as ``/predict`` takes them: one object, a list of them (sent in turn: mix good and
    bad requests, say), or a ``.json`` file holding either."""

    def __init__(self, value: Mapping[str, Any] | Sequence[Mapping[str, Any]] | str | os.PathLike) -> None:
        about = "JSON"
        if isinstance(value, (str, os.PathLike)):
            path = Path(value)
            try:
                value = json.loads(path.read_text())
            except OSError as exc:
                raise FileNotFoundError(f"cannot read {path}: {exc.strerror}") from None
            except ValueError as exc:
                raise ValueError(f"{path} is not valid JSON: {exc}") from None
            about = f"JSON from {path.name}"
        # a file holding a bare number raised "'int' object is not iterable"
        objects = [value] if isinstance(value, Mapping) else list(value) if isinstance(value, list) else [value]
        if not objects or not all(isinstance(obj, Mapping) for obj in objects):
            raise ValueError('a JSON payload is an object such as {"x": [1, 2]}, or a list of objects')
        super().__init__([Body.json(obj) for obj in objects], about)


class ImagePayload(Payload):
    """An image file: base64 in a JSON object under ``key`` (``{"img": "<base64>"}``, the original
    easy-serve format), or with ``raw=True`` the file's bytes with its image Content-Type. A ``.npy``
    file is sent as the tensor it holds (``application/x-npy``), as the Client sends it: it went as an
    image, base64 under ``key``, where ``easyserve predict`` sent the same file as a tensor."""

    def __init__(self, path: str | os.PathLike, raw: bool = False, key: str = "img") -> None:
        from .client import encode  # the same sniffing of image types as Client.predict

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no file {str(path)!r} to send")
        data, content_type = encode(path)
        if content_type == NPY:  # a tensor, sent as the tensor it holds, as Client.predict and predict send it
            body, about = Body(data, {"Content-Type": content_type}), f"{path.name} as .npy"
        elif raw:
            body, about = Body(data, {"Content-Type": content_type}), f"{path.name} as raw {content_type}"
        else:
            body = Body.json({key: base64.b64encode(data).decode()})
            about = f'{path.name} as {{"{key}": "<base64>"}}'
        super().__init__([body], about)


_SPEC = re.compile(r"^(?:(?P<name>[A-Za-z_][\w.-]*)=)?(?P<dtype>[a-z]+\d*):(?P<shape>\d+(?:x\d+)*)$")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A random tensor's name, element type and shape: ``TensorSpec.parse("x=uint8:224x224x3")``."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def parse(cls, text: str, default_name: str = "x") -> TensorSpec:
        """``[NAME=]DTYPE:SHAPE``, the shape's sizes joined by ``x``: ``uint8:224x224x3``, ``x=float32:4``."""
        found = _SPEC.match(text.strip())
        if not found:
            raise ValueError(f"tensor {text!r}: expected [NAME=]DTYPE:SHAPE, such as uint8:224x224x3 or x=float32:4")
        try:
            dtype = BF16 if found["dtype"] == "bfloat16" else np.dtype(found["dtype"])
        except TypeError:
            dtype = None
        if dtype is None or (dtype.kind not in "uif" and dtype != BF16) or found["dtype"] != dtype.name:
            raise ValueError(f"tensor {text!r}: {found['dtype']!r} is not a number type; use one of "
                             "uint8, int8, int16, int32, int64, float16, float32, float64, bfloat16")
        shape = tuple(int(n) for n in found["shape"].split("x"))
        if 0 in shape:
            raise ValueError(f"tensor {text!r}: every size in the shape must be at least 1")
        return cls(found["name"] or default_name, dtype.name, shape)

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """Random values: every byte value for 8-bit types, 0..99 for wider integers, a standard
        normal for floats. Drawn in the tensor's own type where numpy can: drawn as int64 or float64
        first, a float32 tensor took twice its size."""
        kind = np.dtype(self.dtype)
        if kind.kind in "ui" and kind.itemsize == 1:
            info = np.iinfo(kind)
            return rng.integers(info.min, info.max, self.shape, dtype=kind, endpoint=True)
        if kind.kind in "ui":
            return rng.integers(0, 100, self.shape, dtype=kind)
        if kind in (np.float32, np.float64):
            return rng.standard_normal(self.shape, dtype=kind)
        return rng.standard_normal(self.shape, dtype=np.float32).astype(kind)

    @property
    def nbytes(self) -> int:
        """The tensor's size in memory, in bytes."""
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def size_text(self) -> str:
        """``x=float32:100000x100000 (10,000,000,000 float32 values, 37.3 GiB)``."""
        return f"{self} ({math.prod(self.shape):,} {self.dtype} values, {_gib(self.nbytes)})"

    def __str__(self) -> str:
        return f"{self.name}={self.dtype}:{'x'.join(map(str, self.shape))}"


def _gib(nbytes: int) -> str:
    """``37.3 GiB``; a smaller size in MiB, KiB or bytes."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:,.1f} {unit}"
    return f"{nbytes} B"


def _memory() -> int:
    """This machine's memory, in bytes (no bound where it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 2**63


class TensorPayload(Payload):
    """Random tensors, ``variants`` different draws sent in turn, as JSON lists by name:
    ``{"x": [[...], ...]}``. Subclasses send the same arrays in other forms by overriding :meth:`encode`."""

    form = "JSON lists"  # how describe() names the encoding

    def __init__(self, specs: Sequence[TensorSpec | str], variants: int = 4, seed: int = 0) -> None:
        self.specs = [spec if isinstance(spec, TensorSpec) else TensorSpec.parse(spec) for spec in specs]
        if not self.specs:
            raise ValueError("a tensor payload needs at least one tensor, such as uint8:224x224x3")
        names = [spec.name for spec in self.specs]
        if len(set(names)) != len(names):
            raise ValueError(f"tensor names must differ; got {', '.join(names)} (name them: a=float32:4)")
        rng = np.random.default_rng(seed)
        variants = max(1, variants)
        sizes = f"{', '.join(spec.size_text() for spec in self.specs)}, {variants} different draws sent in turn"
        needed = variants * sum(spec.nbytes for spec in self.specs)
        memory = _memory()
        if needed > memory:  # said before numpy tries: its own message named the float64 it drew in
            raise MemoryError(f"{sizes}: {_gib(needed)} in all, more than this machine's {_gib(memory)}")
        try:
            draws = [{spec.name: spec.sample(rng) for spec in self.specs} for _ in range(variants)]
            bodies = [self.encode(arrays) for arrays in draws]
        except MemoryError:
            raise MemoryError(f"{sizes}: {_gib(needed)} in all, and more once encoded as {self.form}") from None
        super().__init__(bodies, f"random {', '.join(map(str, self.specs))} as {self.form}")

    def encode(self, arrays: Mapping[str, np.ndarray]) -> Body:
        """One request carrying ``arrays`` (name -> array): bfloat16 as the numbers it holds."""
        return Body.json({name: array.astype(np.float64) if array.dtype == BF16 else array
                          for name, array in arrays.items()})


class NpyPayload(TensorPayload):
    """One random tensor as a ``.npy`` body to ``/predict`` (``application/x-npy``): the bytes, no text."""

    form = ".npy"

    def encode(self, arrays: Mapping[str, np.ndarray]) -> Body:
        if len(arrays) != 1:
            raise ValueError(f".npy carries one array; got {len(arrays)} tensors (send several as JSON or v2)")
        (array,) = arrays.values()
        if array.dtype == BF16:
            raise ValueError(".npy cannot carry bfloat16 (numpy has no such type of its own): send it with --form v2")
        return Body(to_npy(array), {"Content-Type": NPY})


class InferPayload(TensorPayload):
    """Random tensors as an Open Inference Protocol (v2) request to ``/v2/models/<model>/infer``, each
    input named by its spec, as binary tensor data (``binary=False``: as JSON ``data``)."""

    def __init__(self, specs: Sequence[TensorSpec | str], model: str, binary: bool = True, variants: int = 4,
                 seed: int = 0) -> None:
        self.path = infer_path(model)
        self.binary = binary
        self.form = "v2 binary tensors" if binary else "v2 JSON tensors"
        super().__init__(specs, variants, seed)

    def encode(self, arrays: Mapping[str, np.ndarray]) -> Body:
        return infer_body({name: to_output(array) for name, array in arrays.items()}, self.binary)


class InferImagePayload(Payload):
    """An image file as a v2 BYTES tensor (``img`` by default: the example handles' input), binary."""

    def __init__(self, path: str | os.PathLike, model: str, name: str = "img") -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no file {str(path)!r} to send")
        self.path = infer_path(model)
        image = np.array([path.read_bytes()], dtype=object)
        super().__init__([infer_body({name: (image, "BYTES")}, binary=True)],
                         f"{path.name} as the v2 BYTES tensor {name!r}")


def infer_path(model: str) -> str:
    """Where a v2 inference request for ``model`` goes."""
    return f"/v2/models/{urllib.parse.quote(model, safe='')}/infer"


def infer_body(tensors: Mapping[str, tuple[np.ndarray, str]], binary: bool) -> Body:
    """An inference request carrying ``tensors`` (name -> (array, datatype)), as binary data or JSON."""
    inputs, chunks = [], []
    for name, (array, datatype) in tensors.items():
        item: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            chunks.append(output_binary(array, datatype))
            item["parameters"] = {"binary_data_size": len(chunks[-1])}
        else:
            item["data"] = _plain(output_json_data(array, datatype))
        inputs.append(item)
    header = json.dumps({"inputs": inputs}, separators=(",", ":")).encode()
    if not binary:
        return Body(header, {"Content-Type": "application/json"})
    return Body(header + b"".join(chunks), {"Content-Type": "application/octet-stream",
                                            HEADER_LENGTH: str(len(header))})


def payload_from(source: Any = None, raw: bool = False, key: str = "img",
                 tensors: Sequence[str | TensorSpec] = (), form: str = "json", model: str | None = None) -> Payload:
    """The payload for what a user names: a :class:`Payload` as it is; a dict (or list of dicts) as
    JSON; a ``.json`` file as JSON; any other file as an image (``raw``: its bytes as they are);
    ``tensors`` as random tensors; nothing at all: the built-in demo model's request.

    ``form`` says how tensors travel: ``json`` (lists in a JSON object), ``npy`` (``application/x-npy``)
    or ``v2`` (the Open Inference Protocol's binary tensors, to ``model``; an image file goes as a
    BYTES tensor named ``key``)."""
    if form not in FORMS:
        raise ValueError(f"form {form!r}: expected one of {', '.join(FORMS)}")
    if form == "v2" and not model:
        raise ValueError("v2 requests name the model: give it with --model NAME (model= from Python): the config's "
                         "ModelName, else the handle's class, or the file's name for an .onnx file served as it is")
    if tensors:
        if source is not None:
            raise ValueError("send either a file or random tensors, not both")
        if form == "v2":
            return InferPayload(tensors, model)
        return NpyPayload(tensors) if form == "npy" else TensorPayload(tensors)
    if form == "npy":
        raise ValueError(".npy sends random tensors: give --tensor DTYPE:SHAPE")
    if form == "v2" and isinstance(source, (str, os.PathLike)) and Path(source).suffix.lower() == ".npy":
        # it went as an image, the v2 BYTES tensor "img", which a model of tensors refused every time
        raise ValueError(f"{Path(source).name}: v2 sends an image file, or random tensors (--tensor NAME=DTYPE:SHAPE, "
                         "named as the model's inputs); a .npy file goes to /predict as it is (leave --form out)")
    if form == "v2" and isinstance(source, (str, os.PathLike)) and Path(source).suffix.lower() != ".json":
        return InferImagePayload(source, model, name=key)
    if form == "v2":
        raise ValueError("v2 sends random tensors (--tensor) or an image file")
    if source is None:
        return JsonPayload(DEFAULT_BODY)
    if isinstance(source, Payload):
        return source
    if isinstance(source, (Mapping, list, tuple)):
        return JsonPayload(source)
    if isinstance(source, (str, os.PathLike)):
        if Path(source).suffix.lower() == ".json":
            if raw:
                raise ValueError("--raw sends an image file's bytes; a .json file is always sent as JSON")
            return JsonPayload(source)
        return ImagePayload(source, raw=raw, key=key)
    raise TypeError(f"cannot send a {type(source).__name__}: pass a dict, a list of dicts, a file path or a Payload")


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot send a {type(value).__name__} as JSON")


def _size(n: int) -> str:
    return f"{n} B" if n < 1000 else f"{n / 1e3:.1f} kB" if n < 1e6 else f"{n / 1e6:.1f} MB"
