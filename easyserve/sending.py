"""What a client sends: the body and Content-Type of a request, from a dict, a file, bytes, a numpy
array, a torch tensor or a PIL image (:func:`encode`), and the headers and fields a call may add.

A file or bytes go as they are, typed by their first bytes; an image array or PIL image as a PNG; an
array that is no image as ``.npy``; a dict, or anything with fields beside it, as JSON (the file's bytes
in base64 under ``key``)."""

from __future__ import annotations

import base64
import io
import json
import mimetypes
import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .npy import NPY, to_npy
from .tensors import from_torch

MAGIC = [  # what the first bytes of a file say it is: common image formats, and a numpy .npy file
    (b"\x93NUMPY", NPY), (b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF8", "image/gif"), (b"BM", "image/bmp"), (b"II*\x00", "image/tiff"), (b"MM\x00*", "image/tiff"),
]


def own_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
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


def request_fields(fields: dict[str, Any]) -> dict[str, Any]:
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
    if isinstance(data, np.ndarray) and not fields and (npy or not is_image(data)):
        body = to_npy(data)
        if body is None:
            raise TypeError(f"cannot send a {data.dtype} array: only numbers and booleans travel as .npy")
        return body, NPY
    if isinstance(data, np.ndarray) and not is_image(data):  # and fields: told it was no image
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
        if not is_file(path):
            raise FileNotFoundError(f"no file {short_name(str(path))!r} to send (to send text, put it in a dict)")
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


def is_file(name: str | os.PathLike) -> bool:
    """Whether ``name`` names a file to read: a regular one, or a pipe or device (``<(cmd)``,
    ``/dev/stdin``), which were "no file". Text given for one (base64, JSON) is none: past 255
    characters, Path.is_file raised OSError (File name too long)."""
    try:
        path = Path(name)
        return path.exists() and not path.is_dir()
    except OSError:
        return False


def short_name(name: str) -> str:
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
    return next((kind for magic, kind in MAGIC if raw.startswith(magic)), None)


def _png(image: Any) -> bytes:
    from PIL import Image

    if not isinstance(image, Image.Image):
        if not isinstance(image, np.ndarray):
            raise TypeError(f"cannot send a {type(image).__name__}: pass a dict, a file path, bytes, "
                            "a numpy image or a PIL image")
        pixels = image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image
        if not is_image(image):
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


def is_image(array: np.ndarray) -> bool:
    channels = array.shape[2] if array.ndim == 3 else None  # an empty one is no PNG: Pillow refuses it
    return array.dtype == np.uint8 and (array.ndim == 2 or channels in (1, 3, 4)) and array.size > 0
