"""What the example vision handles share: the request's image, the model session, the class names.

Both take an image from ``/predict`` (a JSON ``{"img": "<base64>"}``, a form file or a raw body) and
from the Open Inference Protocol, as one of two inputs (:data:`IMAGE_INPUTS`): ``img``, a BYTES tensor
holding an encoded picture (JPEG, PNG...), or ``pixels``, a UINT8 tensor of shape [height, width, 3]
(RGB).

The handles import this as a neighbour (``from vision import ...``): easyserve puts a handle file's
folder on ``sys.path`` before importing it.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import re
import struct
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from easyserve import BadRequest, ConfigError, Device, Tensor, payload_bytes
from easyserve.errors import brief
from easyserve.models import find_model

if TYPE_CHECKING:
    from PIL import Image

HERE = Path(__file__).resolve().parent
PROJECT_ROOT = HERE.parent  # relative model paths that are not under the current directory are tried here

log = logging.getLogger("easyserve")

ORIENTATION = 0x0112  # the EXIF tag
# Pixels a request's picture may have: a 48-megapixel phone's photo and more. Pillow's own bound (89
# million) only warns, up to twice that: a 500 kB PNG of 13000 x 13000 black pixels took 750 MB and a
# second of a worker's time, to be shrunk to 224 x 224.
MAX_PIXELS = 64_000_000
# Scans a progressive JPEG may have. libjpeg decodes each over the whole picture: a 1.3 MB JPEG of
# 8000 x 8000 pixels repeating one scan 9,000 times held a worker 30 s, past its TimeoutS, and the
# requests queued behind it with it. Encoders write some 10 (libjpeg's progression), mozjpeg up to 20s.
MAX_JPEG_SCANS = 100
# Pieces (strips or tiles) a TIFF's picture may be stored in. Each is decoded on its own: 1,000,000 tiles
# of 8 x 8 pixels, each pointing to the same 1.4 kB JPEG of 99 scans (7.8 MB in all), held a worker past
# its TimeoutS, and 4,000,000 uncompressed tiles took 1.4 GB and 7 s to open. Writers store a picture in
# strips of some kilobytes (one row each, at most, for a wide one) or tiles of 256 x 256.
MAX_TIFF_PIECES = 32_768
MAX_TIFF_ENTRIES = 4096  # a TIFF directory's entries: writers make some dozens
# Pixels a WebP may have: Pillow decodes one through libwebp's animation decoder, which holds the canvas
# and the frame before it, then copies it: a 2.5 kB lossless WebP of 8000 x 8000 took a worker 1 GB.
MAX_WEBP_PIXELS = MAX_PIXELS // 4

# The formats a request's picture may be in: photos' own. Pillow reads some 40 more, each a decoder a
# client could aim at (several have had their flaws), and EPS by handing the file to Ghostscript, whose
# interpreter ran the PostScript a client sent (a loop that never ends, or whatever a flaw of its
# -dSAFER lets through) on any server where Ghostscript was installed.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")  # a JPEG of several pictures (MPO) too

# Either one, as a request likes: the handle's metadata lists both as optional.
IMAGE_INPUTS = [Tensor("img", "BYTES", [1], optional=True), Tensor("pixels", "UINT8", [-1, -1, 3], optional=True)]


def request_option(task: dict, name: str, default: float, low: float, high: float, integer: bool = False) -> float:
    """The request's own ``name``, where it gives one (``/predict?score_threshold=0.5``, a field beside
    the picture in a JSON body, ``{"img": ..., "score_threshold": 0.5}``, as ``Client.predict(picture,
    score_threshold=0.5)`` sends it, or an inference request's ``"parameters": {"score_threshold": 0.5}``),
    else ``default`` (the handle's, from ``HandleArgs``). One that is not a number from ``low`` to ``high``
    (an integer, with ``integer``), or given in the query string and the body with two values, is the
    request's 400."""
    given = task.get("parameters", {}).get(name)
    body = task.get("task_info") if task.get("protocol") != "v2" else None
    raw = isinstance(body, dict) and body.keys() == {"data", "content_type"}  # a picture sent as it is
    field = body.get(name) if isinstance(body, dict) and not raw else None  # {"data": <base64>, "top_k": 2} too
    if field is not None:
        kind = int if integer else float
        read = None if given is None or given == field else _number(given, kind)  # 2 and 2.0 are one value
        if given is not None and given != field and (read is None or read != _number(field, kind)):
            raise BadRequest(f"{name}: given twice, {brief(given)} in the query string and {brief(field)} in the "
                             "body; give it once")
        given = field  # a body's field was ignored: the picture's answer had the config's top_k, silently
    if given is None:
        return default
    value = _number(given, int if integer else float)
    if value is None or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise BadRequest(f"{name}: got {brief(given)}; expected {kind} from {low:g} to {high:g}")
    return value


def _number(given: object, kind: type) -> float | None:
    """``given`` as ``kind`` (``int`` or ``float``), or ``None``: a JSON number (not a bool; a whole one
    for ``int``), or text as people write numbers (not Python's own forms, "1_0", nor other scripts' digits)."""
    try:
        if isinstance(given, str):
            value = kind(given) if given.isascii() and "_" not in given else None
        elif isinstance(given, (int, float)) and not isinstance(given, bool):
            value = kind(given)
            value = value if value == given else None  # 2.5 is no integer
        else:
            value = None
    except (ValueError, OverflowError):
        return None
    return None if value is None or value != value else value  # NaN


def request_image(task: dict, draft: int | None = None, fit: bool = False) -> Image.Image:
    """The image of a request to ``/predict`` or of an inference request, as upright RGB.

    With ``draft``, a JPEG may be decoded at a reduced scale (see :func:`decode_image`, and its
    ``full_size``). Raises ``ValueError`` with a message for the client when there is none
    or it cannot be read.
    """
    from PIL import Image

    if task.get("protocol") != "v2":
        data = task["task_info"].get("data") if isinstance(task["task_info"], dict) else None
        if isinstance(data, np.ndarray):  # a tensor body (application/x-npy): decoded pixels
            return Image.fromarray(image_pixels(data, "the tensor"))
        return read_image(task["task_info"], draft=draft, fit=fit)

    inputs = task["task_info"]
    if ("img" in inputs) == ("pixels" in inputs):
        raise ValueError("send one input, 'img' (BYTES: an encoded image) or 'pixels' (UINT8 [height, width, 3], "
                         f"RGB), not {'both' if inputs else 'neither'}")
    if "img" in inputs:
        return decode_image(inputs["img"].reshape(-1)[0], "img", draft, fit)
    return Image.fromarray(image_pixels(inputs["pixels"], "'pixels'"))


def draft_bound(jpeg_draft: bool, size: int) -> int | None:
    """The ``draft`` bound a handle's ``jpeg_draft`` HandleArg asks for: ``size``, or none."""
    if not isinstance(jpeg_draft, bool):
        raise ConfigError(f"HandleArgs jpeg_draft: got {brief(jpeg_draft)}; expected true or false")
    return size if jpeg_draft else None


def image_pixels(pixels: np.ndarray, what: str) -> np.ndarray:
    """``pixels`` checked to be an RGB image: uint8, [height, width, 3], not empty."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"{what} must be uint8 [height, width, 3] RGB pixels; "
                         f"got {pixels.dtype} {list(pixels.shape)}")
    if not pixels.shape[0] or not pixels.shape[1]:
        raise ValueError(f"{what} is an empty image (shape {list(pixels.shape)})")
    return pixels


def read_image(task_info: dict, key: str = "img", draft: int | None = None, fit: bool = False) -> Image.Image:
    """The request's image (base64 JSON field, form file or raw body) as upright RGB.

    EXIF orientation is applied, as OpenCV's ``imread`` (which the original handles used) does.
    Raises ``ValueError`` with a message for the client when the bytes are not a readable image.
    """
    return decode_image(payload_bytes(task_info, key), key, draft, fit)


def decode_image(data: bytes, key: str, draft: int | None = None, fit: bool = False) -> Image.Image:
    """An encoded picture (JPEG, PNG, ...) as upright RGB; ``ValueError`` naming ``key`` if it is not one.

    With ``draft``, libjpeg decodes a JPEG at 1/2, 1/4 or 1/8 of its size, the smallest that keeps
    both sides at least ``draft`` pixels, or with ``fit`` the longer side (for a picture then fitted
    inside a ``draft`` square). That skips most of the work of decoding a large photo that is then
    shrunk anyway; the pixels differ a little from shrinking the full decoding. Other formats decode
    whole. The image's ``info["full_size"]`` is its upright (width, height) at full scale."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    _quiet_pillow()
    if _jpeg_scans(data) > MAX_JPEG_SCANS:
        raise ValueError(f"{key!r} is a JPEG of more than {MAX_JPEG_SCANS} scans: save it again (baseline, or "
                         "progressive as encoders write it)")
    pieces = _tiff_pieces(data)
    if pieces > MAX_TIFF_PIECES:
        raise ValueError(f"{key!r} is a TIFF stored in {pieces} strips or tiles, more than {MAX_TIFF_PIECES}: save "
                         "it again (with larger strips or tiles)")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            stored = image.size
            most = MAX_WEBP_PIXELS if image.format == "WEBP" else MAX_PIXELS
            if stored[0] * stored[1] > most:  # said by its header, before any pixel is decoded
                raise _Refused(f"too large an image: {stored[0]} x {stored[1]} pixels, more than "
                               f"{most / 1e6:g} million{' for a WebP' if most != MAX_PIXELS else ''}; "
                               "send it smaller")
            if draft:
                # bounds that hold whichever way EXIF turns the picture: a square, or the longer side
                longer = (draft, 1) if image.width >= image.height else (1, draft)
                image.draft("RGB", longer if fit else (draft, draft))
            # in place, and no conversion of what is RGB already: each copy of a 1920x1200 picture is
            # 7 MB of fresh memory, and the two took a third of its decoding time
            image.load()
            drafted = image.size != stored
            turned = drafted and image.getexif().get(ORIENTATION) in (5, 6, 7, 8)  # a quarter turn to show
            ImageOps.exif_transpose(image, in_place=True)
            upright = image if image.mode == "RGB" else _eight_bits(image).convert("RGB")
            upright.info["full_size"] = (stored[::-1] if turned else stored) if drafted else upright.size
            return upright
    except UnidentifiedImageError:
        encoded = _base64_text(data)  # an Open Inference Protocol BYTES element holding base64, as clients send
        if encoded is not None:
            return decode_image(encoded, key, draft, fit)
        raise ValueError(f"{key!r} is not an image in a format this handle reads ({', '.join(FORMATS)})") from None
    except _Refused as exc:
        raise ValueError(f"{key!r} is {exc}") from None
    except Image.DecompressionBombError:  # Pillow's own bound, checked as it opens: twice its warning's
        raise ValueError(f"{key!r} is too large an image: more than {MAX_PIXELS / 1e6:g} million pixels; send "
                         "it smaller") from None
    except MemoryError:
        raise
    except Exception as exc:  # truncated or corrupt data, or a format Pillow reads only in part
        # (a NotImplementedError from a decoder was a 500, as if the handle were at fault)
        raise ValueError(f"{key!r} is a damaged image: {type(exc).__name__}: {exc}") from None


@functools.cache
def _quiet_pillow() -> None:
    """Pillow warns of a picture past its own bound (89 million pixels) as it opens it, before
    :data:`MAX_PIXELS`, which is lower, refuses it: each worker logged a warning for a client's request."""
    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # in a scan's coded data: not a stuffed 0xFF, nor RSTn


_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # start of a frame


def _tiff_pieces(data: bytes) -> int:
    """The strips or tiles a TIFF's first picture is stored in, as its directory says (0 for another
    format, or a directory that cannot be read, which Pillow then refuses), read before Pillow opens it:
    Pillow makes an object for each as it opens the file. The headers are those Pillow opens (the two
    malformed ones too), and a directory of more entries than any writer makes counts as that many
    pieces: one of 4,097 junk entries hid its strips from a count that stopped there."""
    tiff = data[:2] in (b"II", b"MM") and len(data) >= 8 and (0x2A in data[2:4] or 0x2B in data[2:4])
    if not tiff:
        return 0
    order = "<" if data[:2] == b"II" else ">"
    big = 0x2B in data[2:4]  # BigTIFF: 64-bit offsets and counts, 20-byte entries
    offset, count, entry, value = ("Q", "Q", "HHQ", 20) if big else ("I", "H", "HHI", 12)
    try:
        (at,) = struct.unpack_from(order + offset, data, 8 if big else 4)
        (entries,) = struct.unpack_from(order + count, data, at)
        if entries > MAX_TIFF_ENTRIES:
            return entries
        first = at + struct.calcsize(count)
        pieces = 0
        for index in range(entries):
            tag, _, number = struct.unpack_from(order + entry, data, first + value * index)
            if tag in (273, 324):  # StripOffsets, TileOffsets
                pieces = max(pieces, number)
        return pieces
    except struct.error:
        return 0


def _jpeg_scans(data: bytes) -> int:
    """The scans of a JPEG's picture (0 for another format), counted up to one past
    :data:`MAX_JPEG_SCANS`: each segment skipped by its length, a scan's coded data to the marker after
    it, and nothing after the picture's end. Counting the start-of-scan bytes anywhere in the file
    refused a phone's "motion photo" (a video after the picture) for the bytes of its video.

    It walks the markers as libjpeg does: bytes that are not a marker's are passed over (libjpeg warns and
    decodes on, so one stray byte before the first scan hid 3,000 of them), and a sequential frame is
    searched past its first scan unless that scan holds every colour: libjpeg then refuses another, but
    a first scan of one colour lets any number follow (5,000 empty ones in 50 kB held a worker 32 s)."""
    if data[:2] != b"\xff\xd8":
        return 0
    at, scans, progressive, colours = 2, 0, False, 0
    while at + 4 <= len(data) and scans <= MAX_JPEG_SCANS:
        if data[at] != 0xFF:  # not a marker: libjpeg looks for the next one
            at = data.find(b"\xff", at)
            if at < 0:
                break
            continue
        marker = data[at + 1]
        if marker == 0xD9:  # the picture's end
            break
        # fill, a stuffed zero (libjpeg passes over it, where a length read after it hid 64 kB of scans),
        # RSTn, TEM: no length
        if marker in (0xFF, 0x00, 0x01) or 0xD0 <= marker <= 0xD7:
            at += 1 if marker == 0xFF else 2
            continue
        if marker in _FRAMES and at + 9 < len(data):
            progressive, colours = marker in (0xC2, 0xC6, 0xCA, 0xCE), data[at + 9]
        in_scan = data[at + 4] if at + 4 < len(data) else 0
        at += 2 + int.from_bytes(data[at + 2:at + 4], "big")
        if marker == 0xDA:
            scans += 1
            if not progressive and in_scan >= colours:  # the only scan: the coded data of a photo's usual
                break  # JPEG, most of its bytes, is not searched (a 60 kB one cost 28 µs, 0.8% of its decoding)
            after = _NEXT_MARKER.search(data, at)
            if after is None:
                break
            at = after.start()
    return scans  # a file that is not laid out so is Pillow's to refuse


class _Refused(Exception):
    """A picture that this handle does not decode, and why (to follow "'img' is ")."""


def _eight_bits(image: Image.Image) -> Image.Image:
    """``image`` with 8 bits a channel, for its conversion to RGB: Pillow's conversion of a 16-bit picture
    (a scanner's, a microscope's: a PNG or TIFF of mode ``I;16``) clips each value to 255, and one of
    anything but black was classified as a white picture. Its values are scaled (the upper byte); a
    32-bit integer picture's too, where they are 16-bit ones; a floating-point one has no range to
    scale from, and is the request's 400."""
    from PIL import Image

    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return Image.fromarray((np.asarray(image) >> 8).astype(np.uint8), "L")
    if image.mode.startswith("I"):  # 32-bit (a TIFF's), or signed 16-bit: of a range its values tell
        # its range from Pillow, before any copy: refused, a picture of 64 million took 800 MB to be so
        low, high = image.getextrema() if image.width and image.height else (0, 0)
        if low < 0:
            raise _Refused(f"a picture of signed integers, from {low} to {high}: send unsigned values, 8 or 16 "
                           "bits a channel")
        if high > 0xFFFF:
            raise _Refused(f"a picture of 32-bit integers, from {low} to {high}: send 8 or 16 bits a channel")
        values = np.array(image)  # one copy, shifted in place
        if high > 0xFF:
            values >>= 8
        return Image.fromarray(values.astype(np.uint8), "L")
    if image.mode == "F":
        raise _Refused("a picture of floating-point values: send 8 or 16 bits a channel")
    return image


_BASE64_IMAGE = re.compile(rb"[A-Za-z0-9+/\-_\s]+")  # one class, matched once: linear (see _base64_text)


def _base64_text(data: bytes) -> bytes | None:
    """The bytes that ``data`` holds as base64 text, where that is all it is: an image sent as base64 in a
    BYTES element of the Open Inference Protocol's JSON, where the element is the bytes themselves."""
    # the padding and whitespace at its end taken off first: a pattern that also allowed them there
    # backtracked over a run of spaces, and 200 kB of them held a worker until it was killed as stuck
    if len(data) < 8 or not _BASE64_IMAGE.fullmatch(data.rstrip().rstrip(b"=")):
        return None
    try:
        return payload_bytes({"img": data.decode("ascii")})
    except ValueError:
        return None


def open_model(device: Device, model: str | os.PathLike, zoo_name: str):
    """An ONNX Runtime session for ``model`` on ``device``.

    A relative path is looked up beside the config file, then under the current directory, then one
    folder up from the config, then under this project's folder, so a config finds ``models/...``
    wherever it is run from. A missing file is a
    config error (``easyserve.models.ModelNotFound``, a ``FileNotFoundError`` too) saying how to
    download it or build an offline stand-in.
    """
    # a stand-in (random weights) is said so by the session's first worker on each device: Device.onnx_session
    return device.onnx_session(find_model(model, zoo_name, root=PROJECT_ROOT, beside=device.config_dir))


def read_labels(filename: str) -> list[str]:
    """Class names, one a line, from a text file beside this one."""
    return (HERE / filename).read_text(encoding="utf-8").splitlines()
