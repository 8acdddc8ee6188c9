"""The example handles and configs (ImageNet ResNet-18, COCO YOLOv3) served end to end with their offline
stand-in models, against the same handles called directly. Test images are drawn here."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
import pytest
import tritonclient.http as triton
from conftest import _alive, post_json, request
from onnx import numpy_helper
from PIL import Image, ImageDraw, ImageOps
from tritonclient.utils import InferenceServerException

from easyserve import BadRequest, Client, ConfigError, Device, Server
from easyserve.config import Config
from easyserve.loader import build, resolve
from easyserve.models import ZOO
from easyserve.standins import write_standin
from easyserve.v2.protocol import InferTask, Request, Signature, encode_response

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"resnet18": ROOT / "configs" / "imagenet_resnet18.yaml", "yolov3": ROOT / "configs" / "coco_yolov3.yaml"}
MEAN = np.array([123.675, 116.28, 103.53])
STD = np.array([58.395, 57.12, 57.375])


@pytest.fixture(scope="module")
def standins(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    for name in ZOO:
        write_standin(name, folder)
    return folder


@contextlib.contextmanager
def serve_example(name: str, standins: Path, **overrides: Any) -> Iterator[Server]:
    """The example's own config, on CPU, on a free port, with the stand-in model."""
    config = Config.from_yaml(CONFIGS[name])
    args = {**config.handle_args, "model": str(standins / ZOO[name].filename), **overrides.pop("HandleArgs", {})}
    server = Server(config, Port=0, GPUs="cpu", HandleArgs=args, **overrides).start(timeout=60)
    try:
        yield server
    finally:
        pids = [w["pid"] for w in server.workers]
        server.stop(drain_timeout=5)
        assert not any(_alive(pid) for pid in pids)


def direct(name: str, standins: Path, **args: Any):
    """The example's handle, built and set up in this process as a worker would."""
    config = Config.from_yaml(CONFIGS[name])
    handle = build(resolve(config.handle, config.base_dir),
                   {**config.handle_args, "model": str(standins / ZOO[name].filename), **args})
    handle.setup(Device())
    return handle


def answer(handle, data: bytes) -> Any:
    """What the handle answers for one request, as JSON would carry it."""
    [(status, result)] = handle.run_batch([{"task_id": "t", "task_info": {"data": data}}])
    assert status == 200, result
    return json.loads(json.dumps(result))


def encoded(image: Image.Image, format: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def scene(width: int, height: int, seed: int) -> Image.Image:
    """A picture of coloured rectangles and ellipses on a coloured ground."""
    rng = np.random.default_rng(seed)
    colour = lambda: tuple(int(c) for c in rng.integers(0, 256, 3))  # noqa: E731
    image = Image.new("RGB", (width, height), colour())
    draw = ImageDraw.Draw(image)
    for i in range(8):
        x, y = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
        box = [x, y, x + int(rng.integers(20, width // 2)), y + int(rng.integers(20, height // 2))]
        (draw.rectangle if i % 2 else draw.ellipse)(box, fill=colour())
    return image


def assert_close(got: Any, want: Any, path: str = "answer") -> None:
    """Equal, except floats within 1e-5 (a batch of several may round its last digit differently)."""
    if isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-5), path
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), path
        for key in want:
            assert_close(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, f"{path}[{i}]")
    else:
        assert got == want, path


# -- configs -------------------------------------------------------------------------------------------


def test_configs_name_the_example_handles_and_the_zoo_files():
    for name, handle in (("resnet18", "ImagenetResnet18Handle"), ("yolov3", "CocoYolov3Handle")):
        config = Config.from_yaml(CONFIGS[name])
        assert config.handle == handle
        assert config.handle_args["model"] == f"models/{ZOO[name].filename}"
        ref = resolve(config.handle, config.base_dir)
        assert Path(ref.target).parent == ROOT / "handles"
    assert Config.from_yaml(CONFIGS["resnet18"]).handle_args["channel_order"] == "RGB"


@pytest.mark.parametrize("name", list(ZOO))
def test_a_missing_model_fails_startup_naming_fetch_and_demo(name, tmp_path):
    config = Config.from_yaml(CONFIGS[name])
    with pytest.raises(ConfigError) as caught:
        Server(config, Port=0, GPUs="cpu", ProcessPerGPU=1,
               HandleArgs={**config.handle_args, "model": str(tmp_path / ZOO[name].filename)}).start(timeout=60)
    assert f"easyserve models fetch {name}" in str(caught.value)
    assert f"easyserve models demo {name}" in str(caught.value)


def test_a_missing_model_is_a_config_error_that_the_guardian_does_not_retry(tmp_path):
    """It was a start that failed (exit 1): the guardian started the server five times over, each to
    fail the same way, though the README has the examples' missing model a config error (exit 2)."""
    config = tmp_path / "resnet18.yaml"
    config.write_text(CONFIGS["resnet18"].read_text().replace("Handle: ImagenetResnet18Handle",
                                                              f"Handle: {ROOT / 'handles' / 'imagenet_resnet18.py'}:"
                                                              "ImagenetResnet18Handle")
                      .replace("models/resnet18-v1-7.onnx", "models/not-here.onnx"))
    ran = subprocess.run(["easyserve", "run", str(config), "--port", "0", "--gpus", "cpu", "--supervise"],
                         capture_output=True, text=True, timeout=120)
    assert ran.returncode == 2, ran.stderr
    assert "config error: model file 'models/not-here.onnx' not found" in ran.stderr
    assert "not restarting it" in ran.stderr and "restarting in" not in ran.stderr


# -- ImageNet ResNet-18 ------------------------------------------------------------------------------


def test_imagenet_labels_are_the_1000_classes_in_order():
    labels = (ROOT / "handles" / "imagenet_labels.txt").read_text().splitlines()
    assert len(labels) == 1000 and all(label.strip() == label and label for label in labels)
    assert (labels[0], labels[281], labels[285], labels[409], labels[999]) == (
        "tench", "tabby", "Egyptian cat", "analog clock", "toilet tissue")


def test_resnet18_served_answers_equal_the_handle_called_directly(standins):
    handle = direct("resnet18", standins)
    pictures = [encoded(scene(320, 240, 0)), encoded(scene(200, 300, 1), "JPEG"), encoded(scene(640, 480, 2))]
    expected = [answer(handle, p) for p in pictures]
    with serve_example("resnet18", standins, ProcessPerGPU=1) as server:
        client = Client(server.url)
        raw = [client.predict(p) for p in pictures]  # image bytes as the body
        as_json = [post_json(server.url + "/predict", {"img": base64.b64encode(p).decode()}) for p in pictures]
        client.close()
    for got, want in zip(raw, expected):
        assert_close(got, want)
    assert [status for status, _ in as_json] == [200] * 3  # the original {"img": base64} body
    for (_, got), want in zip(as_json, expected):
        assert_close(got, want)
    assert len(expected[0]["top"]) == 5 and expected[0]["top"][0]["class"] == expected[0]["class"]
    labels = (ROOT / "handles" / "imagenet_labels.txt").read_text().splitlines()
    assert expected[0]["label"] == labels[expected[0]["class"]]


def _implied_class(standins: Path, rgb: tuple[int, int, int], channel_order: str) -> tuple[int, float]:
    """The class the stand-in's weights give a picture of one colour: its 7x7 convolution (no padding)
    sees the same pixels everywhere, so the network reduces to sums over the kernels."""
    weights = {w.name: numpy_helper.to_array(w).astype(np.float64)
               for w in onnx.load(standins / ZOO["resnet18"].filename).graph.initializer}
    pixel = np.array(rgb[::-1] if channel_order == "BGR" else rgb, np.float64)
    x = (pixel - MEAN) / STD
    features = np.maximum(weights["conv0_weight"].sum(axis=(2, 3)) @ x + weights["conv0_bias"], 0)
    logits = weights["dense0_weight"] @ features + weights["dense0_bias"]
    probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    return int(logits.argmax()), float(probabilities.max())


COLOURS = [(255, 0, 0), (0, 128, 255), (20, 200, 20), (250, 250, 250), (40, 10, 90)]


def test_resnet18_top_class_on_a_plain_colour_is_what_the_weights_imply(standins):
    implied = [_implied_class(standins, rgb, "RGB") for rgb in COLOURS]
    assert len({cls for cls, _ in implied}) >= 3  # the colour decides the class
    with serve_example("resnet18", standins, ProcessPerGPU=1) as server:
        with Client(server.url) as client:
            got = [client.predict(encoded(Image.new("RGB", (300, 200), rgb))) for rgb in COLOURS]
    for answer_, (cls, probability) in zip(got, implied):
        assert answer_["class"] == cls
        assert answer_["score"] == pytest.approx(probability, rel=1e-3)  # float32 against float64


def test_resnet18_channel_order_bgr_feeds_the_model_as_the_original_did(standins):
    handle = direct("resnet18", standins, channel_order="BGR")
    for rgb in COLOURS:
        got = answer(handle, encoded(Image.new("RGB", (64, 64), rgb)))
        assert got["class"] == _implied_class(standins, rgb, "BGR")[0]


def test_pictures_are_decoded_upright_and_in_rgb(standins):
    """EXIF orientation applied and every mode made RGB, as a reference decoding that copies does."""
    handle = direct("yolov3", standins)
    stored = scene(320, 200, 4)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turn 90 degrees clockwise to show
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", exif=exif)
    with Image.open(io.BytesIO(buffer.getvalue())) as reference:
        upright = ImageOps.exif_transpose(reference).convert("RGB")
    assert upright.size == (200, 320)
    turned = answer(handle, buffer.getvalue())
    assert turned["image_size"] == [320, 200]  # [height, width] of the picture as shown
    assert turned == answer(handle, encoded(upright))  # the same pixels, sent without the tag
    for mode in ("L", "RGBA", "P", "CMYK"):
        picture = stored.convert(mode)
        data = encoded(picture, "JPEG" if mode == "CMYK" else "PNG")
        with Image.open(io.BytesIO(data)) as reference:
            assert answer(handle, data) == answer(handle, encoded(reference.convert("RGB")))


def test_a_16_bit_picture_is_scaled_to_8_bits_and_one_of_floats_is_refused(standins):
    """Pillow's conversion of a 16-bit picture (a scanner's, a microscope's) to RGB clips each value at
    255: a grey ramp was classified as a white picture. Its upper byte is the 8-bit picture's value."""
    handle = direct("resnet18", standins)
    ramp = np.tile(np.linspace(0, 255, 320).astype(np.uint8), (240, 1))
    eight = answer(handle, encoded(Image.fromarray(ramp)))
    assert eight != answer(handle, encoded(Image.new("L", (320, 240), 255)))
    for wide, format in [(Image.fromarray(ramp.astype(np.uint16) * 257), "PNG"),
                         (Image.fromarray(ramp.astype(np.uint16) * 256 + 200), "TIFF"),  # the lower byte aside
                         (Image.fromarray(ramp.astype(np.int32) * 256), "TIFF")]:  # mode I
        assert wide.mode in ("I;16", "I") and answer(handle, encoded(wide, format)) == eight
    decode_image = sys.modules["vision"].decode_image
    with pytest.raises(ValueError, match=r"^'img' is a picture of floating-point values: send 8 or 16 bits a channel$"):
        decode_image(encoded(Image.fromarray(ramp / np.float32(255)), "TIFF"), "img")
    with pytest.raises(ValueError, match=r"^'img' is a picture of 32-bit integers, from 0 to 16711680: send 8 or 16 "):
        decode_image(encoded(Image.fromarray(ramp.astype(np.int32) << 16), "TIFF"), "img")
    # 32-bit integers of 8-bit values (decoded as they were before), and signed ones, which have no scale
    assert answer(handle, encoded(Image.fromarray(ramp.astype(np.int32)), "TIFF")) == eight
    with pytest.raises(ValueError, match=r"^'img' is a picture of signed integers, from -1 to 254: send unsigned"):
        decode_image(encoded(Image.fromarray(ramp.astype(np.int32) - 1), "TIFF"), "img")


def _jpeg_of_scans(picture: Image.Image, repeats: int) -> bytes:
    """A progressive JPEG of ``picture`` whose first AC scan (with the Huffman table before it) comes
    ``repeats`` times more before its end: a valid file, each scan decoded over the whole picture."""
    data, at, segments = _progressive(picture), 2, []
    while data[at + 1] != 0xD9:  # the end of the image
        end = at + 2 + struct.unpack(">H", data[at + 2:at + 4])[0]
        if data[at + 1] == 0xDA:  # a scan's coded data runs to the next marker that is neither 0xFF00 nor RSTn
            end = re.search(rb"\xff[^\x00\xd0-\xd7]", data[end:]).start() + end
        segments.append((data[at + 1], at, end))
        at = end
    for (before, first, _), (marker, start, end) in zip(segments, segments[1:]):
        components = data[start + 4]
        if marker == 0xDA and data[start + 5 + 2 * components] > 0 and data[start + 7 + 2 * components] >> 4 == 0:
            scan = data[first if before == 0xC4 else start:end]
            return data[:at] + scan * repeats + data[at:]
    raise AssertionError("no AC scan")


def _sequential_of_scans(repeats: int) -> bytes:
    """A baseline JPEG of 64 x 48 pixels in three colours whose scans hold one colour each, the first
    coming ``repeats`` times: libjpeg decodes each over the whole picture, however many there are."""
    def segment(marker: int, payload: bytes) -> bytes:
        return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload

    frame = struct.pack(">BHHB", 8, 48, 64, 3) + b"".join(bytes([i, 0x11, 0]) for i in (1, 2, 3))
    one_code = bytes([1] + [0] * 15) + b"\x00"  # a table of one code, 0: a DC difference of 0, or the block's end
    scan = segment(0xDA, b"\x01\x01\x00\x00\x3f\x00")  # colour 1 alone, no coded data
    return (b"\xff\xd8" + segment(0xDB, b"\x00" + bytes([1] * 64)) + segment(0xC0, frame)
            + segment(0xC4, b"\x00" + one_code + b"\x10" + one_code) + scan * repeats + b"\xff\xd9")


def _progressive(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", progressive=True)
    return buffer.getvalue()


def test_a_jpeg_of_more_scans_than_encoders_write_is_refused_before_its_decoding(standins):
    """libjpeg decodes each scan of a progressive JPEG over the whole picture: 1.3 MB of 8000 x 8000
    pixels repeating one scan 9,000 times held a worker 30 s, and the requests queued behind it."""
    direct("resnet18", standins)
    vision = sys.modules["vision"]  # the handles' helpers, imported with the handle
    ordinary, many = _progressive(scene(64, 48, 1)), _jpeg_of_scans(scene(64, 48, 1), vision.MAX_JPEG_SCANS)
    # a baseline JPEG whose first scan holds one colour, which libjpeg lets any number of scans follow;
    # and one stray byte before the first scan, which libjpeg passes over (and so hid every scan)
    at = many.index(b"\xff\xda")
    refused = [many, _sequential_of_scans(vision.MAX_JPEG_SCANS + 1), many[:at] + b"\x00" + many[at:]]
    # and the scans after a stuffed zero read as a marker, whose "length" would pass over them
    sequential = _sequential_of_scans(vision.MAX_JPEG_SCANS + 1)
    first = sequential.index(b"\xff\xda")
    refused.append(sequential[:first] + b"\xff\x00" + struct.pack(">H", len(sequential) - first)
                   + sequential[first:])
    for picture in refused:
        with Image.open(io.BytesIO(picture)) as image:  # a picture Pillow decodes, as the handle did
            image.load()
            assert image.size == (64, 48)
        assert picture.count(b"\xff\xda") > vision.MAX_JPEG_SCANS
    assert vision.decode_image(_sequential_of_scans(3), "img").size == (64, 48)  # one scan a colour, as some write
    # a phone's "motion photo": a video after the picture's end, whose bytes hold start-of-scan markers
    # too, were counted as scans of the picture
    motion = ordinary + np.random.default_rng(2).integers(0, 256, 8_000_000, np.uint8).tobytes()
    assert motion.count(b"\xff\xda") > vision.MAX_JPEG_SCANS
    with serve_example("resnet18", standins, ProcessPerGPU=1) as server:
        with Client(server.url) as client:
            for picture in refused:
                with pytest.raises(BadRequest, match="'img' is a JPEG of more than 100 scans: save it again"):
                    client.predict(picture)
            assert client.predict(motion) == client.predict(ordinary)


def _tiff_of_pieces(shorts: dict[int, int], offsets_tag: int, sizes_tag: int, count: int, size: int) -> bytes:
    """A TIFF of the fields ``shorts`` (tag: SHORT value) and ``count`` pieces of ``size`` bytes (their
    offsets and sizes under ``offsets_tag`` and ``sizes_tag``), every piece pointing to the same 16 bytes:
    a small file of as many pieces as a client likes."""
    tags = sorted([*((tag, 3, value) for tag, value in shorts.items()), (offsets_tag, 4, None), (sizes_tag, 4, None)])
    first = 8 + 2 + 12 * len(tags) + 4
    offsets = first + 16
    entries = b""
    for tag, kind, value in tags:
        if value is None:
            entries += struct.pack("<HHII", tag, kind, count, offsets if tag == offsets_tag else offsets + 4 * count)
        else:
            entries += struct.pack("<HHIHH", tag, kind, 1, value, 0)
    return (b"II*\0" + struct.pack("<IH", 8, len(tags)) + entries + b"\0\0\0\0" + bytes(16)
            + struct.pack(f"<{count}I", *[first] * count) + struct.pack(f"<{count}I", *[size] * count))


def _tiff_of_tiles(side: int, tile: int) -> bytes:
    """``side`` x ``side`` grey pixels in tiles of ``tile`` x ``tile``."""
    return _tiff_of_pieces({256: side, 257: side, 258: 8, 259: 1, 262: 1, 277: 1, 322: tile, 323: tile}, 324, 325,
                           (side // tile) ** 2, 16)


def _tiff_of_strips(rows: int) -> bytes:
    """One grey column of ``rows`` pixels, a strip a row (written here: Pillow before 10.x wrote one strip
    whatever RowsPerStrip it was given)."""
    return _tiff_of_pieces({256: 1, 257: rows, 258: 8, 259: 1, 262: 1, 277: 1, 278: 1}, 273, 279, rows, 1)


def test_a_tiff_of_more_pieces_than_writers_make_and_a_webp_too_large_to_decode_are_refused_at_once(standins):
    """Each tile of a TIFF is decoded on its own, and Pillow makes an object for each as it opens the
    file: a million tiles pointing to one 99-scan JPEG held a worker past its TimeoutS, and four
    million uncompressed ones took 1.4 GB. A WebP is decoded through libwebp's animation decoder, four
    copies of its canvas: 2.5 kB of 8000 x 8000 pixels took a worker 1 GB."""
    direct("resnet18", standins)
    vision = sys.modules["vision"]
    assert vision.decode_image(_tiff_of_tiles(256, 16), "img").size == (256, 256)  # 256 tiles: a picture
    many = _tiff_of_tiles(4096, 16)  # 65,536 tiles, 512 kB
    assert vision._tiff_pieces(many) == 65536
    with pytest.raises(ValueError, match=r"^'img' is a TIFF stored in 65536 strips or tiles, more than 32768: save"):
        vision.decode_image(many, "img")
    # the malformed headers Pillow opens too, and strips hidden behind a directory of 4,097 junk entries
    strips = _tiff_of_strips(40_000)  # a strip a row
    assert vision.decode_image(_tiff_of_strips(100), "img").size == (1, 100)
    for header in (b"II\x00*", b"II*\x00"):
        with pytest.raises(ValueError, match=r"^'img' is a TIFF stored in 40000 strips or tiles"):
            vision.decode_image(header + strips[4:], "img")
    junk = b"II*\x00" + struct.pack("<IH", 8, 4097) + struct.pack("<HHII", 65000, 1, 1, 0) * 4097 + bytes(4)
    assert vision._tiff_pieces(junk) == 4097
    for big in (False, True):  # strips, as Pillow writes them, in a TIFF and a BigTIFF
        assert vision.decode_image(encoded(scene(64, 48, 2), "TIFF", big_tiff=big), "img").size == (64, 48)
    wide = io.BytesIO()
    Image.new("RGB", (4100, 4000), (1, 2, 3)).save(wide, "WEBP", lossless=True, method=0)  # 40 bytes
    with pytest.raises(ValueError, match=r"^'img' is too large an image: 4100 x 4000 pixels, more than 16 million "
                                         r"for a WebP; send it smaller$"):
        vision.decode_image(wide.getvalue(), "img")
    assert vision.decode_image(encoded(scene(64, 48, 2), "WEBP"), "img").size == (64, 48)


def test_resnet18_jpeg_draft_decodes_a_large_photo_smaller_and_the_input_barely_moves(standins):
    full, drafted = direct("resnet18", standins), direct("resnet18", standins, jpeg_draft=True)
    decode_image = sys.modules["vision"].decode_image  # the handles' helpers, imported with the handle
    photo = encoded(scene(1920, 1200, 5), "JPEG")
    assert decode_image(photo, "img").size == (1920, 1200)
    assert decode_image(photo, "img", 224).size == (480, 300)  # 1/4: 1/8 would leave 150 < 224 rows
    task = {"task_id": "t", "task_info": {"data": photo}}
    whole, scaled = full.preprocess(task), drafted.preprocess(task)
    assert whole.shape == scaled.shape == (3, 224, 224)
    assert not np.array_equal(whole, scaled)
    assert np.abs(whole - scaled).mean() < 0.01  # normalised units: about half of one of 255 levels
    png = encoded(scene(1920, 1200, 5))  # not a JPEG: decoded whole either way
    assert np.array_equal(full.preprocess({"task_id": "t", "task_info": {"data": png}}),
                          drafted.preprocess({"task_id": "t", "task_info": {"data": png}}))
    with serve_example("resnet18", standins, ProcessPerGPU=1, HandleArgs={"jpeg_draft": True}) as server:
        with Client(server.url) as client:
            assert_close(client.predict(photo), answer(drafted, photo))


def test_resnet18_jpeg_draft_must_be_true_or_false(standins):
    with pytest.raises(ValueError, match="HandleArgs jpeg_draft: got 'yes'; expected true or false"):
        direct("resnet18", standins, jpeg_draft="yes")


def test_yolov3_jpeg_draft_keeps_the_full_pictures_geometry_and_its_pixels_for_boxes(standins):
    full, drafted = direct("yolov3", standins), direct("yolov3", standins, jpeg_draft=True)
    decode_image = sys.modules["vision"].decode_image
    photo = encoded(scene(1920, 1200, 5), "JPEG")
    # 1/4: the longer side 480 >= 416 (a square bound would have stopped at 1/2, for the shorter side)
    small = decode_image(photo, "img", 416, fit=True)
    assert small.size == (480, 300) and small.info["full_size"] == (1920, 1200)
    assert decode_image(photo, "img").info["full_size"] == (1920, 1200)
    task = {"task_id": "t", "task_info": {"data": photo}}
    (whole, whole_shape), (scaled, scaled_shape) = full.preprocess(task), drafted.preprocess(task)
    assert whole_shape.tolist() == scaled_shape.tolist() == [1200, 1920]  # boxes map to the full picture
    assert 0 < np.abs(whole - scaled).mean() < 0.01  # of 1.0: under three of 255 levels on average
    assert answer(drafted, photo)["image_size"] == [1200, 1920]
    # 1664x901 decodes at 416x226, which would letterbox 226 rows high; the full picture's 225 it is
    odd = {"task_id": "t", "task_info": {"data": encoded(scene(1664, 901, 7), "JPEG")}}
    assert decode_image(odd["task_info"]["data"], "img", 416, fit=True).size == (416, 226)
    for pixels, _ in (full.preprocess(odd), drafted.preprocess(odd)):  # grey rows above and below
        grey_rows = np.isclose(pixels, 128 / 255).all(axis=(0, 2))
        assert grey_rows[:95].all() and grey_rows[320:].all() and not grey_rows[95:320].any()


def test_yolov3_jpeg_draft_of_a_turned_photo_answers_in_the_upright_pictures_pixels(standins):
    full, drafted = direct("yolov3", standins), direct("yolov3", standins, jpeg_draft=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 1920x1200, shown turned: 1200 wide, 1920 high
    buffer = io.BytesIO()
    scene(1920, 1200, 6).save(buffer, format="JPEG", exif=exif)
    photo = buffer.getvalue()
    small = sys.modules["vision"].decode_image(photo, "img", 416, fit=True)
    assert small.size == (300, 480) and small.info["full_size"] == (1200, 1920)
    task = {"task_id": "t", "task_info": {"data": photo}}
    assert drafted.preprocess(task)[1].tolist() == full.preprocess(task)[1].tolist() == [1920, 1200]
    assert answer(drafted, photo)["image_size"] == answer(full, photo)["image_size"] == [1920, 1200]
    with serve_example("yolov3", standins, ProcessPerGPU=1, HandleArgs={"jpeg_draft": True}) as server:
        with Client(server.url) as client:
            assert client.predict(photo) == answer(drafted, photo)


def test_yolov3_jpeg_draft_must_be_true_or_false(standins):
    with pytest.raises(ValueError, match="HandleArgs jpeg_draft: got 1; expected true or false"):
        direct("yolov3", standins, jpeg_draft=1)


def test_a_request_that_is_not_an_image_is_a_400_naming_the_problem(standins):
    with serve_example("resnet18", standins, ProcessPerGPU=1) as server:
        with Client(server.url) as client:
            with pytest.raises(BadRequest, match=r"'img' is not an image in a format this handle reads \(JPEG, "
                                                 r"PNG, WEBP, BMP, GIF, TIFF\)") as caught:
                client.predict(b"GIF89a but not really")
            # a DDS file (of a pixel format Pillow lacks, whose NotImplementedError was a 500): not a photo's
            # format, none of whose decoders a client may reach
            odd = b"DDS " + struct.pack("<7I", 124, 0x1007, 4, 4, 0, 0, 0) + bytes(44) + struct.pack(
                "<2I4s", 32, 4, b"ZZZZ") + bytes(104)
            with pytest.raises(BadRequest, match="'img' is not an image in a format this handle reads") as unreadable:
                client.predict({"img": base64.b64encode(odd).decode()})
            # a truncated PNG: damaged, also the request's
            with pytest.raises(BadRequest, match="'img' is a damaged image: OSError: ") as damaged:
                client.predict(encoded(scene(100, 100, 3))[:400])
            # 72 million black pixels in 9 kB: Pillow only warns below 179 million, and decoded it (750 MB)
            vast = io.BytesIO()
            Image.new("1", (9000, 8000)).save(vast, "PNG")
            with pytest.raises(BadRequest, match=r"'img' is too large an image: 9000 x 8000 pixels, more than 64 "
                                                 r"million; send it smaller") as too_large:
                client.predict(vast.getvalue())
            # past Pillow's own bound (179 million), its message named that bound and a "DOS attack"; past its
            # warning's (89 million), each worker logged the warning
            for side in (10_000, 20_000):
                vast = io.BytesIO()
                Image.new("1", (side, side)).save(vast, "PNG")
                said = rf"(more than 64 million pixels|{side} x {side} pixels, more than 64 million)"
                with pytest.raises(BadRequest, match=rf"'img' is too large an image: {said}; send it smaller"):
                    client.predict(vast.getvalue())
            fine = client.predict(encoded(scene(100, 100, 3)))  # the worker is unharmed
            assert "DecompressionBomb" not in str(server.logs(tail=None))
        # a body that is not one is told what to send: the picture, as /predict takes it (it was told to
        # send both of the handle's optional inputs, as the protocol's lists, which the handle refused)
        empty = request(server.url + "/predict", b"", {"Content-Type": "application/json"})
        array = request(server.url + "/predict", b"[1, 2]", {"Content-Type": "application/json"})
    assert empty[:3:2] == (400, {"error": 'empty body: send a JSON object such as {"img": "<text or base64>"}, '
                                          'raw bytes, or a form'}), empty
    assert array[:3:2] == (400, {"error": 'body must be a JSON object such as {"img": "<text or base64>"}, '
                                          'not a JSON array'}), array
    assert caught.value.status == unreadable.value.status == damaged.value.status == too_large.value.status == 400
    assert "class" in fine


def test_a_postscript_picture_is_never_handed_to_ghostscript(standins, tmp_path, monkeypatch):
    """Pillow reads EPS by running Ghostscript on it: where one was installed, a client's PostScript ran in
    its interpreter (a loop without end held the worker until it was killed). A stand-in `gs` on PATH
    notes every run of it."""
    ran = tmp_path / "gs-ran"
    gs = tmp_path / "bin" / "gs"
    gs.parent.mkdir()
    gs.write_text(f'#!/bin/sh\necho "$*" >> {ran}\n')
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{gs.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    eps = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
           b"{} loop\nshowpage\n%%EOF\n")
    with serve_example("resnet18", standins, ProcessPerGPU=1) as server:
        with Client(server.url) as client:
            with pytest.raises(BadRequest, match="'img' is not an image in a format this handle reads") as refused:
                client.predict(eps)
            fine = client.predict(encoded(scene(100, 100, 3)))
    assert refused.value.status == 400 and "class" in fine
    assert not ran.exists(), ran.read_text()


# -- COCO YOLOv3 -------------------------------------------------------------------------------------


def test_yolov3_served_answers_equal_the_handle_called_directly(standins):
    handle = direct("yolov3", standins)
    sizes = [(640, 480), (300, 500), (1000, 200), (416, 416)]
    pictures = [encoded(scene(w, h, seed)) for seed, (w, h) in enumerate(sizes)]
    expected = [answer(handle, p) for p in pictures]
    assert sum(len(e["detections"]) for e in expected) > 0
    with serve_example("yolov3", standins, MaxWaitMs=50) as server:
        with Client(server.url) as client:
            got = [client.predict(p) for p in pictures]
    for g, want in zip(got, expected):
        assert_close(g, want)


def test_yolov3_batch_splits_the_selected_indices_per_image(standins):
    # The model's NMS output is one list for the whole batch: each image must get only its own boxes.
    handle = direct("yolov3", standins)
    pictures = [encoded(scene(w, h, 10 + i)) for i, (w, h) in enumerate([(500, 300), (120, 400), (640, 640)])]
    alone = [answer(handle, p) for p in pictures]
    together = handle.run_batch([{"task_id": str(i), "task_info": {"data": p}} for i, p in enumerate(pictures)])
    assert [status for status, _ in together] == [200] * 3
    for (_, got), want in zip(together, alone):
        assert_close(json.loads(json.dumps(got)), want)
    assert len({json.dumps(a["detections"]) for a in alone}) == 3


def test_yolov3_boxes_are_in_the_original_images_pixels(standins):
    handle = direct("yolov3", standins)
    # The same picture at two sizes fills the 416x416 frame identically: boxes must scale with the image.
    small = answer(handle, encoded(Image.new("RGB", (320, 200), (40, 160, 90))))
    large = answer(handle, encoded(Image.new("RGB", (640, 400), (40, 160, 90))))
    assert small["image_size"] == [200, 320] and large["image_size"] == [400, 640]
    assert small["detections"] and len(small["detections"]) == len(large["detections"])
    for one, twice in zip(small["detections"], large["detections"]):
        assert (one["label"], one["score"]) == (twice["label"], twice["score"])
        assert twice["box"] == pytest.approx([2 * v for v in one["box"]], abs=0.02)
    # Tall and wide pictures: [y1, x1, y2, x2] within (height, width), reaching past the 416 frame.
    for width, height in ((300, 900), (1200, 250)):
        result = answer(handle, encoded(scene(width, height, 5)))
        assert result["image_size"] == [height, width]
        boxes = np.array([d["box"] for d in result["detections"]])
        assert len(boxes) > 0
        y1, x1, y2, x2 = boxes.T
        assert (0 <= y1).all() and (y1 <= y2).all() and (y2 <= height).all()
        assert (0 <= x1).all() and (x1 <= x2).all() and (x2 <= width).all()
        assert max(y2.max(), x2.max()) > 416


@pytest.mark.parametrize("threshold", [0.3, 0.6])
def test_yolov3_answers_hold_exactly_the_selected_boxes_over_the_score_threshold(standins, threshold):
    handle = direct("yolov3", standins, score_threshold=threshold)
    picture = scene(640, 480, 0)
    # what the model itself selected, run here on the handle's own preprocessing
    image, shape = handle.preprocess({"task_info": {"data": encoded(picture)}})
    boxes, scores, selected = handle.session.run(None, {"input_1": image[None], "image_shape": shape[None]})
    kept = {(int(c), round(float(scores[0, c, b]), 6)) for _, c, b in selected}
    over = {k for k in kept if k[1] >= threshold}
    assert over and over != kept  # some boxes pass and some do not: the threshold matters here

    with serve_example("yolov3", standins, HandleArgs={"score_threshold": threshold}) as server:
        with Client(server.url) as client:
            result = client.predict(np.asarray(picture))  # a numpy image, sent as PNG
    got = {(d["class"], d["score"]) for d in result["detections"]}
    assert got == over
    assert all(d["score"] >= threshold for d in result["detections"])
    scores = [d["score"] for d in result["detections"]]
    assert scores == sorted(scores, reverse=True)
    coco = (ROOT / "handles" / "coco_labels.txt").read_text().splitlines()
    assert len(coco) == 80 and all(d["label"] == coco[d["class"]] for d in result["detections"])


def test_a_request_sets_its_own_top_k_and_score_threshold_and_one_out_of_range_is_its_400(standins):
    """The examples' settings, request by request: in the query string (a picture sent as it is has no
    other room for them) or as an inference request's parameter. One the handle cannot take is refused
    with a 400 that says so, before the picture is decoded; the next request is served."""
    picture, png = encoded(scene(640, 480, 0)), {"Content-Type": "image/png"}
    with serve_example("resnet18", standins, ProcessPerGPU=1) as server:
        url = server.url + "/predict"
        five = request(url, picture, png)[2]["top"]  # the config's top_k
        assert len(five) == 5
        status, _, two = request(url + "?top_k=2", picture, png)
        assert (status, two["top"]) == (200, five[:2])
        for bad in ("0", "1001", "two", "2.5", "2&top_k=3", "1_0", "%D9%A5"):  # (the last: an Arabic-Indic 5)
            status, _, body = request(url + "?top_k=" + bad, picture, png)
            assert status == 400 and body["error"].startswith("top_k: got "), (bad, body)
        assert request(url + "?top_k=1000", picture, png)[0] == 200
        # or beside the picture in a JSON body, as Client.predict's keywords send it (they were ignored: 5 classes)
        as_json, TYPE_JSON = {"img": base64.b64encode(picture).decode()}, {"Content-Type": "application/json"}
        status, _, three = request(url, json.dumps({**as_json, "top_k": 3}).encode(), TYPE_JSON)
        assert (status, three["top"]) == (200, five[:3])
        assert [row["class"] for row in Client(server.url).predict(picture, top_k=4)["top"]] == [
            row["class"] for row in five[:4]]
        status, _, body = request(url, json.dumps({**as_json, "top_k": 0}).encode(), TYPE_JSON)
        assert status == 400 and body["error"].startswith("top_k: got 0"), body
        status, _, body = request(url + "?top_k=2", json.dumps({**as_json, "top_k": 3}).encode(), TYPE_JSON)
        assert status == 400 and body["error"] == "top_k: given twice, '2' in the query string and 3 in the body; " \
            "give it once", body
        assert request(url + "?top_k=2", json.dumps({**as_json, "top_k": 2}).encode(), TYPE_JSON)[2]["top"] == five[:2]
        # the same number written two ways is given once; a picture under "data" (Client(url, key="data")) is JSON too
        assert request(url + "?top_k=2", json.dumps({**as_json, "top_k": 2.0}).encode(), TYPE_JSON)[0] == 200
        status, _, two = request(url, json.dumps({"data": as_json["img"], "top_k": 2}).encode(), TYPE_JSON)
        assert (status, two["top"]) == (200, five[:2])
        # an inference request is answered every class's score: a top_k there is not the handle's to refuse
        client = triton.InferenceServerClient(server.url.removeprefix("http://"))
        try:
            inputs = [triton.InferInput("img", [1], "BYTES")]
            inputs[0].set_data_from_numpy(np.array([picture], dtype=object))
            assert client.infer("resnet18", inputs, parameters={"top_k": 0}).as_numpy("scores").shape == (1000,)
        finally:
            client.close()
    with serve_example("yolov3", standins, ProcessPerGPU=1) as server:
        url = server.url + "/predict"
        default = request(url, picture, png)[2]["detections"]  # the config's score_threshold, 0.3
        assert all(abs(d["score"] - 0.6) > 1e-4 for d in default)  # the answer's rounding decides none below
        status, _, high = request(url + "?score_threshold=0.6", picture, png)
        assert status == 200 and high["detections"] == [d for d in default if d["score"] >= 0.6]
        assert 0 < len(high["detections"]) < len(default)
        for bad in ("1.5", "-0.1", "nan", "high"):
            status, _, body = request(url + "?score_threshold=" + bad, picture, png)
            assert status == 400 and body["error"].startswith("score_threshold: got "), (bad, body)
        client = triton.InferenceServerClient(server.url.removeprefix("http://"))
        try:
            inputs = [triton.InferInput("img", [1], "BYTES")]
            inputs[0].set_data_from_numpy(np.array([picture], dtype=object))
            result = client.infer("yolov3", inputs, parameters={"score_threshold": 0.6})
            with pytest.raises(InferenceServerException, match="score_threshold: got 2"):
                client.infer("yolov3", inputs, parameters={"score_threshold": 2})
        finally:
            client.close()
        assert len(result.as_numpy("scores")) == len(high["detections"])


# -- the Open Inference Protocol -----------------------------------------------------------------------


def v2_image(client: triton.InferenceServerClient, model: str, outputs: list[str], *, img: bytes | None = None,
             pixels: np.ndarray | None = None, binary: bool = True) -> Any:
    """One inference with the picture as ``img`` (its file's bytes) or ``pixels``; the result."""
    inputs = []
    if img is not None:
        inputs.append(triton.InferInput("img", [1], "BYTES"))
        inputs[-1].set_data_from_numpy(np.array([img], dtype=object), binary_data=True)
    if pixels is not None:
        inputs.append(triton.InferInput("pixels", list(pixels.shape), "UINT8"))
        inputs[-1].set_data_from_numpy(pixels, binary_data=binary)
    return client.infer(model, inputs, outputs=[triton.InferRequestedOutput(o, binary_data=binary) for o in outputs])


def test_resnet18_over_the_open_inference_protocol_answers_as_predict(standins):
    pictures = [encoded(scene(320, 240, 0)), encoded(scene(200, 300, 1), "JPEG"), encoded(scene(64, 48, 2))]
    with serve_example("resnet18", standins, ProcessPerGPU=1) as server:
        with Client(server.url) as easy:
            expected = [easy.predict(p) for p in pictures]
        client = triton.InferenceServerClient(server.url.removeprefix("http://"))
        try:
            metadata = client.get_model_metadata("resnet18")
            config = client.get_model_config("resnet18")
            by_file = [v2_image(client, "resnet18", ["scores", "class", "label"], img=p) for p in pictures]
            pixels = [np.asarray(Image.open(io.BytesIO(p)).convert("RGB")) for p in pictures]
            as_json = v2_image(client, "resnet18", ["scores", "class", "label"], pixels=pixels[2], binary=False)
            by_pixels = v2_image(client, "resnet18", ["scores", "class", "label"], pixels=pixels[0])
            batch_of_one = v2_image(client, "resnet18", ["scores", "class"], pixels=pixels[0][np.newaxis])
            img = triton.InferInput("img", [1], "BYTES")
            img.set_data_from_numpy(np.array([pictures[0]], dtype=object))
            classified = client.infer("resnet18", [img], outputs=[triton.InferRequestedOutput("scores", class_count=3)])
            with pytest.raises(InferenceServerException, match="send one input, 'img'.* or 'pixels'.*not both"):
                v2_image(client, "resnet18", ["class"], img=pictures[0], pixels=pixels[0])
        finally:
            client.close()
    assert metadata["name"] == "resnet18"
    assert metadata["inputs"] == [{"name": "img", "datatype": "BYTES", "shape": [-1, 1]},
                                  {"name": "pixels", "datatype": "UINT8", "shape": [-1, -1, -1, 3]}]
    assert metadata["outputs"] == [{"name": "scores", "datatype": "FP32", "shape": [-1, 1000]},
                                   {"name": "class", "datatype": "INT64", "shape": [-1, 1]},
                                   {"name": "label", "datatype": "BYTES", "shape": [-1, 1]}]
    # the scores' labels file, named as Triton's configuration names it
    assert [o.get("label_filename") for o in config["output"]] == ["imagenet_labels.txt", None, None]
    for result, want in zip([*by_file, as_json, by_pixels], [*expected, expected[2], expected[0]]):
        scores = result.as_numpy("scores")
        assert scores.shape == (1000,) and scores.dtype == np.float32 and scores.sum() == pytest.approx(1, abs=1e-4)
        assert result.as_numpy("class").tolist() == [want["class"]] == [int(scores.argmax())]
        label = result.as_numpy("label")[0]
        assert (label.decode() if isinstance(label, bytes) else label) == want["label"]
        assert scores[want["class"]] == pytest.approx(want["score"], abs=1e-6)  # the answer rounds to 6 places
        top = [t["class"] for t in want["top"]]
        assert np.argsort(-scores, kind="stable")[:5].tolist() == top
    # the top classes, as Triton's classification extension answers them, with the example's labels
    assert [c.decode() for c in classified.as_numpy("scores")] == [
        f"{t['score']:f}:{t['class']}:{t['label']}" for t in expected[0]["top"][:3]]
    assert batch_of_one.as_numpy("scores").shape == (1, 1000)
    assert batch_of_one.as_numpy("class").tolist() == [[expected[0]["class"]]]
    np.testing.assert_allclose(batch_of_one.as_numpy("scores")[0], by_pixels.as_numpy("scores"), atol=1e-6)


def test_an_image_as_base64_text_in_a_bytes_element_answers_as_its_bytes_do(standins):
    """KServe's and MLServer's clients put a picture in JSON's BYTES element as base64 text, where the
    element is the bytes themselves: it was "not an image in a format this handle reads"."""
    picture = encoded(scene(120, 90, 4), "JPEG")
    infer = lambda text: {"inputs": [{"name": "img", "datatype": "BYTES", "shape": [1], "data": [text]}]}  # noqa: E731
    with serve_example("resnet18", standins, ProcessPerGPU=1) as server:
        with Client(server.url) as client:
            expected = client.predict(picture)
        url = server.url + "/v2/models/resnet18/infer"
        answers = [post_json(url, {**infer(text), "outputs": [{"name": "class"}]})
                   for text in (base64.b64encode(picture).decode(), base64.encodebytes(picture).decode())]
        status, refused = post_json(url, infer("not an image, nor base64"))
        # spaces then a character base64 has not: a pattern that backtracked over them held the worker until
        # it was killed as stuck, for 200 kB of them (the bound is for that hang, not a speed)
        began = time.monotonic()
        spaces = post_json(url, infer(" " * 1_000_000 + "!"))
        took = time.monotonic() - began
    assert spaces[0] == 400 and took < 5, (spaces, took)
    for status_, answer_ in answers:
        assert status_ == 200 and answer_["outputs"][0]["data"] == [expected["class"]]
    assert status == 400 and "'img' is not an image in a format this handle reads" in refused["error"]


def test_yolov3_over_the_open_inference_protocol_answers_as_predict(standins):
    sizes = [(640, 480), (300, 500), (1000, 200)]
    pictures = [encoded(scene(w, h, seed)) for seed, (w, h) in enumerate(sizes)]
    outputs = ["boxes", "scores", "classes", "labels"]
    with serve_example("yolov3", standins) as server:
        with Client(server.url) as easy:
            expected = [easy.predict(p) for p in pictures]
        client = triton.InferenceServerClient(server.url.removeprefix("http://"))
        try:
            metadata = client.get_model_metadata("yolov3")
            got = [v2_image(client, "yolov3", outputs, img=p, binary=i != 1) for i, p in enumerate(pictures)]
            got.append(v2_image(client, "yolov3", outputs, pixels=np.asarray(Image.open(io.BytesIO(pictures[0])))))
        finally:
            client.close()
    assert [o["name"] for o in metadata["outputs"]] == outputs
    assert metadata["outputs"][0] == {"name": "boxes", "datatype": "FP32", "shape": [-1, -1, 4]}
    assert sum(len(e["detections"]) for e in expected) > 0
    for result, want in zip(got, [*expected, expected[0]]):
        detections = want["detections"]
        labels = [s.decode() if isinstance(s, bytes) else s for s in result.as_numpy("labels").tolist()]
        assert labels == [d["label"] for d in detections]
        assert result.as_numpy("classes").tolist() == [d["class"] for d in detections]
        assert result.as_numpy("scores").tolist() == pytest.approx([d["score"] for d in detections], abs=1e-6)
        assert result.as_numpy("boxes").shape == (len(detections), 4)
        assert result.as_numpy("boxes").reshape(-1).tolist() == pytest.approx(
            [v for d in detections for v in d["box"]], abs=0.01)  # the answer rounds to 2 places


def test_yolov3_with_nothing_found_answers_empty_tensors(standins):
    handle = direct("yolov3", standins, score_threshold=1.0)
    task = {"task_id": "t", "task_info": {"img": np.array([encoded(scene(200, 200, 7))], dtype=object)},
            "protocol": "v2", "parameters": {}}
    [(status, result)] = handle.run_batch([task])
    assert status == 200
    signature = Signature.of(type(handle))
    status, (length, body) = encode_response([result], Request([]), InferTask(None, None, "yolov3", "1"), signature)
    outputs = json.loads(body)["outputs"]
    assert status == 200 and length is None
    assert [(o["name"], o["datatype"], o["shape"], o["data"]) for o in outputs] == [
        ("boxes", "FP32", [0, 4], []), ("scores", "FP32", [0], []), ("classes", "INT64", [0], []),
        ("labels", "BYTES", [0], [])]


# -- the quickstart, as a user types it ------------------------------------------------------------------


def test_quickstart_demo_run_predict_from_a_fresh_folder(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    easyserve = [sys.executable, "-m", "easyserve.cli"]
    built = subprocess.run([*easyserve, "models", "demo", "resnet18"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    (tmp_path / "cat.png").write_bytes(encoded(scene(320, 240, 4)))
    server = subprocess.Popen(
        [*easyserve, "run", str(CONFIGS["resnet18"]), "--port", "0", "--gpus", "cpu", "--process-per-gpu", "1"],
        cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True,
    )
    try:
        url = None
        log = []
        for line in server.stderr:  # the model is found under the current directory's models/
            log.append(line)
            if match := re.search(r"listening on (http://\S+)", line):
                url = match.group(1)
                break
        assert url, "".join(log)
        printed = subprocess.run([*easyserve, "predict", url, "cat.png"], cwd=tmp_path, env=env,
                                 capture_output=True, text=True, timeout=60)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            log.append(server.communicate(timeout=30)[1])
        except subprocess.TimeoutExpired:
            server.kill()
            log.append(server.communicate()[1])
    assert printed.returncode == 0, printed.stderr
    result = json.loads(printed.stdout)
    assert set(result) == {"class", "label", "score", "top"}
    assert server.returncode == 0
    # The worker's warning reaches the server's log through the worker's output pipe and the log's
    # writer thread, so it may come before or after "listening on": look for it in the whole log.
    assert "offline stand-in" in "".join(log), "".join(log)


def test_resnet18_takes_decoded_pixels_as_a_tensor_body(standins):
    pixels = np.asarray(scene(320, 240, 3))
    with serve_example("resnet18", standins, ProcessPerGPU=1) as server:
        with Client(server.url) as as_png, Client(server.url, npy=True) as as_tensor:
            want = as_png.predict(pixels)  # PNG is lossless: the handle decodes the very same pixels
            assert as_tensor.predict(pixels) == want
            # what to do is said: a notebook's user had pixels scaled to 0-1, or channels first, as models take them
            refused = (r"^the tensor is float32 of shape \[240, 320, 3\], and the model takes pixels "
                       r"\(UINT8 \[-1, -1, 3\]\); send uint8 values, as they are before any scaling \(pixels of 0 to "
                       r"1: \(array \* 255\)\.round\(\)\.astype\(np\.uint8\)\)$")
            with pytest.raises(BadRequest, match=refused):
                as_tensor.predict(pixels.astype(np.float32) / 255)
            with pytest.raises(BadRequest, match=r"\[3, 240, 320\], .*; channels last, \(240, 320, 3\): "
                                                 r"array\.transpose\(1, 2, 0\)$"):
                as_tensor.predict(pixels.transpose(2, 0, 1).copy())
            scaled = pixels.astype(np.float32) / 255  # and what it says to do is served
            assert as_tensor.predict((scaled * 255).round().astype(np.uint8)) == want


def test_the_demo_takes_x_or_a_tensor_body_and_says_what_it_expects(serve):
    # a body without "x" was told `"x" must be a list of 4 numbers, got shape ()`, and a tensor body
    # (as the README shows one sent) the same
    from conftest import http

    with serve("easyserve.builtin:Demo") as server:
        url = server.url + "/predict"
        as_json = post_json(url, {"x": [5.1, 3.5, 1.4, 0.2]})
        tensor = {"Content-Type": "application/octet-stream", "X-Tensor-Dtype": "float32", "X-Tensor-Shape": "4"}
        as_tensor = http("POST", url, data=np.array([5.1, 3.5, 1.4, 0.2], np.float32).tobytes(), headers=tensor)
        # integers too: its preprocess makes them float32 itself (checks_tensor_bodies)
        whole = {**tensor, "X-Tensor-Dtype": "int64"}
        as_integers = http("POST", url, data=np.array([5, 3, 1, 0], np.int64).tobytes(), headers=whole)
        missing = post_json(url, {"y": 1})
        # a batch of one as a tensor body, as other handles' (and the protocol's) lose it: it was a 400
        batched = http("POST", url, data=np.array([[5.1, 3.5, 1.4, 0.2]], np.float32).tobytes(),
                       headers={**tensor, "X-Tensor-Shape": "1,4"})
        two = http("POST", url, data=np.zeros((2, 4), np.float32).tobytes(),
                   headers={**tensor, "X-Tensor-Shape": "2,4"})
    assert batched[0] == 200 and batched[2] == as_json[1], batched
    assert two[0] == 400 and "got shape (2, 4)" in two[2]["error"], two
    assert as_json[0] == 200 and as_json[1]["label"] == "setosa"
    assert as_tensor[0] == 200 and as_tensor[2] == as_json[1]
    assert as_integers[0] == 200 and as_integers[2]["label"] == "setosa", as_integers
    assert missing == (400, {"error": "preprocess failed: ValueError: expected {\"x\": [4 numbers]} (or a tensor of 4 "
                                      "numbers), got the fields ['y']"})


def test_the_demo_takes_only_numbers_in_x(serve):
    # numpy made true 1.0 and "5.1" 5.1: an answer to a request that was not what its client meant
    refused = [[True, 1, 1, 1], ["5.1", "3.5", "1.4", "0.2"], [[5.1, 3.5, 1.4, 0.2]], [*range(10**5), "x"]]
    with serve("easyserve.builtin:Demo") as server:
        answers = [post_json(server.url + "/predict", {"x": x}) for x in refused]
    for status, answer in answers:
        assert status == 400 and '"x" must be a list of 4 numbers, got [' in answer["error"], answer
        assert len(answer["error"]) < 200  # a long list is not sent back whole
    # as its client wrote it: JSON's true, not Python's True
    assert answers[0][1]["error"].endswith('got [true,1,1,1]')
    assert answers[1][1]["error"].endswith('got ["5.1","3.5","1.4","0.2"]')


def test_the_demo_answers_numbers_it_cannot_compute_with_400_not_500(serve, caplog):
    """1e308 (infinity as float32), NaN in a tensor body, or finite numbers so large that the model's
    arithmetic overflows were 500s, each with a warning or a traceback logged: a client could raise
    the server's error rate at will."""
    from conftest import http

    tensor = {"Content-Type": "application/octet-stream", "X-Tensor-Dtype": "float32", "X-Tensor-Shape": "4"}
    with serve("easyserve.builtin:Demo") as server:
        url = server.url + "/predict"
        huge = post_json(url, {"x": [1e308, 1e308, -1e308, 1e308]})
        nan = http("POST", url, data=np.array([np.nan, 1, 1, 1], np.float32).tobytes(), headers=tensor)
        overflowing = http("POST", url, data=np.full(4, 3e38, np.float32).tobytes(), headers=tensor)
        fine = post_json(url, {"x": [5.1, 3.5, 1.4, 0.2]})
        logs = str(server.logs())
        statuses = server.stats()["statuses"]
    assert huge[0] == 400 and "4 finite numbers within float32's range, got [inf, inf, -inf, inf]" in huge[1]["error"]
    assert nan[0] == 400 and "got [nan, 1.0, 1.0, 1.0]" in nan[2]["error"], nan
    assert overflowing[0] == 400 and "too large for the model's float32 arithmetic" in overflowing[2]["error"]
    assert fine[0] == 200 and statuses == {"400": 3, "200": 1}
    assert "RuntimeWarning" not in logs and not [r for r in caplog.records if r.levelno >= logging.ERROR]
