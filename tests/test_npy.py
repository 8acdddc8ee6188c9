"""Tensors as binary bodies on /predict: .npy and raw bytes with dtype and shape headers, in and out."""

from __future__ import annotations

import asyncio
import gzip
import io
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import numpy as np
import pytest
from conftest import http
from multidict import CIMultiDict

from easyserve import Client
from easyserve.npy import to_npy

NPY = {"Content-Type": "application/x-npy"}


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def with_header(header: str, data: bytes = b"", version: bytes = b"\x01\x00") -> bytes:
    raw = header.encode("latin-1")
    return b"\x93NUMPY" + version + len(raw).to_bytes(2, "little") + raw + data


@pytest.fixture(scope="module")
def server():
    from easyserve import Server

    with Server(handle="handles_for_tests:Tensors", GPUs="cpu", Port=0, MaxBodyMB=4) as server:
        yield server


def post(server, body: bytes, headers: dict) -> tuple[int, dict, object]:
    return http("POST", server.url + "/predict", data=body, headers=headers)


def post_bytes(url: str, body: bytes, headers: dict) -> tuple[int, dict, bytes]:
    async def run() -> tuple[int, dict, bytes]:
        async with aiohttp.ClientSession() as session, session.post(url, data=body, headers=headers) as resp:
            return resp.status, dict(resp.headers), await resp.read()

    return asyncio.run(run())


def test_an_npy_body_reaches_the_handle_as_the_array(server):
    pixels = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    status, _, answer = post(server, npy(pixels), NPY)
    assert status == 200
    # writable, as a v2 tensor is: a handle clamping it in place got "assignment destination is read-only"
    assert answer == {"dtype": "uint8", "shape": [224, 224, 3], "sum": int(pixels.sum()), "c_order": True,
                      "writable": True, "content_type": "application/x-npy"}
    for array in (np.arange(6, dtype=">i4").reshape(2, 3), np.array(True), np.array([True, False, True]),
                  np.zeros((0, 5), np.int16), np.zeros((0, 2), bool)):
        status, _, answer = post(server, npy(array), NPY)
        assert status == 200 and answer["shape"] == list(array.shape) and answer["sum"] == int(array.sum())
        assert answer["writable"] and answer["dtype"] == str(array.dtype)


def test_a_header_written_otherwise_than_np_save_writes_it_is_read(server):
    """Other quotes, order and spacing, no trailing comma: still the header."""
    for header in ('{"shape": (2, 3), "fortran_order": False, "descr": "<i2"}',
                   "{ 'fortran_order' : False ,'descr':'<i2', 'shape' : ( 2 ,3 ) }\n",
                   "{'descr': '<i2', 'fortran_order': False, 'shape': (+2, 3), }"):  # as numpy reads them
        status, _, answer = post(server, with_header(header, np.arange(6, dtype="<i2").tobytes()), NPY)
        assert status == 200 and answer["shape"] == [2, 3] and answer["sum"] == 15, (header, answer)
    # a size of zeros, which Python reads (00 is 0, where 01 is no number)
    status, _, answer = post(server, with_header("{'descr': '<i2', 'fortran_order': False, 'shape': (00, 3), }"), NPY)
    assert status == 200 and answer["shape"] == [0, 3], answer


def test_a_fortran_ordered_array_keeps_its_values(server):
    array = np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4))
    status, _, answer = post(server, npy(array), NPY)
    assert status == 200 and answer == (array * 2).tolist()


def test_raw_bytes_with_dtype_and_shape_headers(server):
    array = np.arange(24, dtype=np.int32).reshape(2, 3, 4)
    headers = {"Content-Type": "application/octet-stream", "X-Tensor-Dtype": "int32", "X-Tensor-Shape": "2,3,4"}
    status, _, answer = post(server, array.tobytes(), headers)
    assert status == 200 and answer["shape"] == [2, 3, 4] and answer["sum"] == int(array.sum()) and answer["writable"]
    del headers["X-Tensor-Shape"]  # no shape: one dimension, as long as the bytes make
    status, _, answer = post(server, array.tobytes(), headers)
    assert status == 200 and answer["shape"] == [24]
    # a tensor of no elements is an empty body: it was refused as one ("empty body: send a JSON object")
    for shape, expected in (("0,3", [0, 3]), (None, [0])):
        empty = {**headers, "X-Tensor-Shape": shape} if shape else headers
        status, _, answer = post(server, b"", empty)
        assert (status, answer["shape"], answer["sum"]) == (200, expected, 0), answer
    status, _, answer = post(server, b"", {**headers, "X-Tensor-Shape": "2"})
    assert status == 400 and answer["error"] == "the body is 0 bytes, but shape [2] of int32 takes 8"
    # without a dtype, raw bytes stay bytes, as before
    status, _, answer = post(server, array.tobytes(), {"Content-Type": "application/octet-stream"})
    assert status == 200 and answer == {"type": "bytes"}


def test_an_array_answer_comes_back_as_npy_when_accepted(server):
    array = np.linspace(0, 1, 10, dtype=np.float32).reshape(2, 5)
    status, headers, body = post_bytes(server.url + "/predict", npy(array), {**NPY, "Accept": "application/x-npy"})
    assert status == 200 and headers["Content-Type"] == "application/x-npy"
    answer = np.load(io.BytesIO(body), allow_pickle=False)
    assert answer.dtype == np.float32 and np.array_equal(answer, array * 2)
    # refused (q=0), not asked, or JSON preferred (whichever comes first): JSON
    for accept in ("application/x-npy;q=0, application/json", "application/x-npy; Q=0.0", "application/json",
                   "application/json, application/x-npy;q=0.1", "application/x-npy;q=0.5, application/json;q=0.9"):
        status, headers, answer = post(server, npy(array), {**NPY, "Accept": accept})
        assert headers["Content-Type"].startswith("application/json") and answer == (array * 2).tolist()
    # .npy asked for, and preferred to JSON or as welcome: .npy
    for accept in ("application/json;q=0.5, application/x-npy", "application/x-npy, application/json",
                   "application/x-npy, */*;q=0.1", "application/x-npy;q=1.5"):
        status, headers, _ = post_bytes(server.url + "/predict", npy(array), {**NPY, "Accept": accept})
        assert headers["Content-Type"] == "application/x-npy", accept
    # an answer that is not an array is JSON, whatever the client accepts
    status, headers, answer = post(server, npy(np.arange(3)), {**NPY, "Accept": "application/x-npy"})
    assert headers["Content-Type"].startswith("application/json") and answer["sum"] == 3


def test_a_compressed_npy_body_is_inflated(server):
    array = np.zeros((512, 512), np.uint8)
    status, _, answer = post(server, gzip.compress(npy(array)), {**NPY, "Content-Encoding": "gzip"})
    assert status == 200 and answer["shape"] == [512, 512]


def test_the_client_sends_arrays_as_npy_and_reads_array_answers(server):
    array = np.arange(8, dtype=np.float64).reshape(2, 4)
    with Client(server.url, npy=True) as client:
        answer = client.predict(array)
        assert isinstance(answer, np.ndarray) and np.array_equal(answer, array * 2)
        assert client.predict(np.zeros((4, 4, 3), np.uint8))["content_type"] == "application/x-npy"
    with Client(server.url) as client:
        assert client.predict(array) == (array * 2).tolist()  # not an image: .npy out, JSON back
        assert client.predict(np.zeros((4, 4, 3), np.uint8)) == {"type": "bytes"}  # an image: PNG, as before


BAD_NPY = [
    ("not npy", b"PK\x03\x04 a zip file", "not a .npy body"),
    ("version 9", with_header("{}", version=b"\x09\x00"), "format version 9.0"),
    ("header past the body", b"\x93NUMPY\x01\x00\xff\x00{'descr'", "longer than the body"),
    ("damaged header", with_header("{'descr': '<f4', 'shape': (2,"), "damaged .npy header"),
    ("header not a dict", with_header("[1, 2]"), "damaged .npy header"),
    ("code in the header", with_header("__import__('os').system('true')"), "damaged .npy header"),
    # a key np.save never writes, 64 KB of it: Python's parser, which read it, held the event loop 50-110 ms
    ("a key of its own", with_header("{'descr': '|u1', 'fortran_order': False, 'shape': (1,), 'x': (%s)}"
                                     % ("0," * 32_000), b"\1"), "damaged .npy header"),
    ("a key twice", with_header("{'descr': '|u1', 'descr': '|u1', 'fortran_order': False, 'shape': (1,)}", b"\1"),
     "damaged .npy header"),
    ("a size that is not a number", with_header("{'descr': '|u1', 'fortran_order': False, 'shape': (1 1,)}", b"\1"),
     "damaged .npy header"),
    ("a key missing", with_header("{'descr': '|u1', 'shape': (1,)}", b"\1"), "damaged .npy header"),
    ("brackets that do not pair", with_header("{'descr': '|u1', 'fortran_order': False, 'shape': (1,]}", b"\1"),
     "damaged .npy header"),
    ("shape not a tuple", with_header("{'descr': '<f4', 'fortran_order': False, 'shape': [2]}", b"\0" * 8),
     "'shape' a tuple"),
    ("negative size", with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (-1,)}", b"\0" * 4),
     "shape: expected sizes that are whole numbers from 0 to 9223372036854775807"),
    ("thousands of dimensions", with_header(f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({'1, ' * 16000}), }}",
                                            b"\0" * 4),
     "shape has 16000 dimensions; an array may have at most 32"),
    ("pickled objects", npy(np.array([{"a": 1}], dtype=object)), "expected a number or boolean type"),
    # numpy reads a repeat count with ast: its SyntaxError was a 500
    ("a repeat count numpy cannot read", with_header("{'descr': '(,)i4', 'fortran_order': False, 'shape': (1,), }",
                                                     b"\0" * 4), "expected a number or boolean type"),
    ("structured", npy(np.zeros(2, dtype=[("x", "<i4"), ("y", "<f8")])), "expected a number or boolean type"),
    ("strings", npy(np.array(["abc"])), "expected a number or boolean type"),
    ("too few bytes", npy(np.zeros(10, np.float32))[:-4], "takes 40"),
    ("too many bytes", npy(np.zeros(10, np.float32)) + b"\0", "takes 40"),
    ("a shape too large for memory",
     with_header(f"{{'descr': '<f8', 'fortran_order': False, 'shape': ({2**62}, {2**62})}}"),
     "is 0 bytes, but shape"),
    # these three were 500s: numpy's ValueError, or int() refusing to print a product of 8,000 digits
    ("an empty array too large to index",
     with_header(f"{{'descr': '<f8', 'fortran_order': False, 'shape': (0, {2**62}), }}"),
     "shape [0, 4611686018427387904] of float64 is larger than numpy can index, although it holds no elements"),
    ("sizes of thousands of digits",
     with_header(f"{{'descr': '<f8', 'fortran_order': False, 'shape': ({'9' * 4000}, {'9' * 4000})}}", b"\0" * 8),
     "shape: expected sizes that are whole numbers from 0 to 9223372036854775807"),
    ("a long double", with_header("{'descr': '<f16', 'fortran_order': False, 'shape': (1,), }", b"\0" * 16),
     "a long double, whose bytes mean different numbers on different machines"),
    # np.load refuses these; they were read as a scalar and as (1,)
    ("a shape of one comma", with_header("{'descr': '<f8', 'fortran_order': False, 'shape': (,), }", b"\0" * 8),
     "damaged .npy header"),
    ("a shape with an empty size", with_header("{'descr': '|u1', 'fortran_order': False, 'shape': (1,,), }", b"\1"),
     "damaged .npy header"),
    # and these, which Python does not read as numbers either: a leading zero, another script's digits (a
    # version 3 header is UTF-8)
    ("a size with a leading zero", with_header("{'descr': '|u1', 'fortran_order': False, 'shape': (01,), }", b"\1"),
     "damaged .npy header"),
    ("a size in Arabic-Indic digits", b"\x93NUMPY\x03\x00" + len(ARABIC_3 := "{'descr': '|u1', 'fortran_order': "
                                      "False, 'shape': (\u0663,), }".encode()).to_bytes(4, "little") + ARABIC_3
     + b"\1\1\1", "damaged .npy header"),
    # the handle got a bool array holding 2: unequal to True, yet true; the v2 protocol's BOOL refused it
    ("a bool that is neither 0 nor 1", with_header("{'descr': '|b1', 'fortran_order': False, 'shape': (3,), }",
                                                   b"\0\1\2"),
     "the .npy data: bool elements must be the bytes 0 (False) and 1 (True)"),
]


@pytest.mark.parametrize("body, problem", [case[1:] for case in BAD_NPY], ids=[case[0] for case in BAD_NPY])
def test_a_bad_npy_body_is_a_400_saying_what_is_wrong(server, body, problem):
    status, _, answer = post(server, body, NPY)
    assert status == 400 and problem in answer["error"], answer
    assert post(server, npy(np.ones(3, np.uint8)), NPY)[0] == 200  # and the server goes on


BAD_RAW = [
    ("object", "2", "X-Tensor-Dtype: got 'object'"),
    ("U10", "2", "expected a number or boolean type"),
    ("float32", "a,b", "X-Tensor-Shape: got 'a,b'"),
    ("float32", "-2", "X-Tensor-Shape: got '-2'"),
    ("float32", "3", "the body is 8 bytes, but shape [3] of float32 takes 12"),
    ("float32", None, "not a whole number of float32 elements"),
    ("uint8", "2,\u00b2", "X-Tensor-Shape: got '2,\u00b2'"),  # a digit to str.isdigit, not to int(): it was a 500
    ("float128", "1", "a long double, whose bytes mean different numbers on different machines"),
    ("a", "8", "X-Tensor-Dtype: got 'a'"),  # numpy 2 warns of it, an error here: it was a 500
    ("(1,,)f8", "1", "X-Tensor-Dtype: got '(1,,)f8'"),  # numpy's SyntaxError: it was a 500
    ("bool", "8", "the body: bool elements must be the bytes 0 (False) and 1 (True)"),  # the body is bytes 0, then 255
]


@pytest.mark.parametrize("dtype, shape, problem", BAD_RAW)
def test_bad_tensor_headers_are_a_400(server, dtype, shape, problem):
    headers = {"Content-Type": "application/octet-stream", "X-Tensor-Dtype": dtype}
    if shape is not None:
        headers["X-Tensor-Shape"] = shape
    status, _, answer = post(server, b"\0" * 7 + b"\xff" if dtype == "bool" else b"\0" * (8 if shape else 9), headers)
    assert status == 400 and problem in answer["error"], answer


@pytest.mark.parametrize("headers, problem", [
    # the shape was ignored without a dtype: the handle got bytes, and the client a 200 it did not mean
    ([("X-Tensor-Shape", "2,4")], "X-Tensor-Shape without X-Tensor-Dtype: name the element type too"),
    # the first of two was used, silently
    ([("X-Tensor-Dtype", "uint8"), ("X-Tensor-Dtype", "float32")],
     "X-Tensor-Dtype is given 2 times ('uint8', 'float32'): give it once"),
    ([("X-Tensor-Dtype", "uint8"), ("X-Tensor-Shape", "8"), ("X-Tensor-Shape", "2,4")],
     "X-Tensor-Shape is given 2 times ('8', '2,4'): give it once"),
])
def test_tensor_headers_that_contradict_or_lack_each_other_are_a_400(server, headers, problem):
    sent = CIMultiDict([("Content-Type", "application/octet-stream"), *headers])
    status, _, answer = post(server, b"\0" * 8, sent)
    assert status == 400 and answer["error"].startswith(problem), answer
    # the same value twice is one value
    twice = CIMultiDict([("Content-Type", "application/octet-stream"), ("X-Tensor-Dtype", "uint8"),
                         ("X-Tensor-Dtype", "uint8"), ("X-Tensor-Shape", "2,4")])
    status, _, answer = post(server, b"\0" * 8, twice)
    assert status == 200 and answer["shape"] == [2, 4], answer


def test_to_npy_takes_numbers_only():
    assert to_npy(np.float32(1.5)) is not None and to_npy(np.array(["x"])) is None and to_npy([1, 2]) is None


def test_a_tensor_the_handles_declared_input_does_not_take_is_a_400_before_the_model(serve):
    """A handle that declares its input (FP32 (3, 4, 4)) had a uint8 tensor body reach its model, fail
    there as a 500 "forward failed", and cost its batch a run in parts; batched with float32 ones it
    was promoted and answered. Now it is refused as the client's mistake, saying what the model takes."""
    takes = "and the model takes pixels (FP32 [3, 4, 4])"
    with serve("handles_v2:Pixels", MaxWaitMs=50) as server:
        sent = [np.ones((3, 4, 4), np.float32), np.ones((3, 4, 4), np.float64), np.ones((1, 3, 4, 4), np.float32),
                np.ones((3, 4, 4), np.uint8), np.ones((2, 3, 4, 4), np.float32), np.ones((4, 4, 3), np.float32)]
        answers = [post(server, npy(array), NPY) for array in sent]
        # a bad one among good ones: refused alone, the others answered
        with ThreadPoolExecutor(6) as pool:
            mixed = list(pool.map(lambda a: post(server, npy(a), NPY),
                                  [np.ones((3, 4, 4), np.float32)] * 5 + [np.ones((3, 4, 4), np.uint8)]))

        # a hint is given only where what it says makes the tensor one the handle takes: uint8 pixels of a
        # picture (H, W, C) for FP32 (C, H, W) need both, and the second error after the first step said nothing
        both = post(server, npy(np.ones((4, 4, 3), np.uint8)), NPY)[2]["error"]
        assert both.endswith("; channels first, (3, 4, 4): array.transpose(2, 0, 1) and send fp32 values "
                             "(array.astype(np.float32), scaled as the model takes them)"), both
        assert post(server, npy(np.ones((4, 4, 3), np.uint8).transpose(2, 0, 1).astype(np.float32)), NPY)[0] == 200
        assert post(server, npy(np.ones(7, np.float32)), NPY)[2]["error"].endswith("(FP32 [3, 4, 4])")  # none fits
    # float64 for float32; a leading batch of 1 taken off, as the protocol's requests have it
    assert [(status, answer.get("sum")) for status, _, answer in answers[:3]] == [(200, 48.0)] * 3
    assert answers[3][::2] == (400, {"error": f"the tensor is uint8 of shape [3, 4, 4], {takes}; send fp32 values "
                                              "(array.astype(np.float32), scaled as the model takes them)"})
    assert answers[4][::2] == (400, {"error": f"the tensor is float32 of shape [2, 3, 4, 4], {takes}: send one item "
                                              "per request, without a batch dimension (the server batches requests "
                                              "itself)"})
    assert answers[5][::2] == (400, {"error": f"the tensor is float32 of shape [4, 4, 3], {takes}; channels first, "
                                              "(3, 4, 4): array.transpose(2, 0, 1)"})
    assert [status for status, _, _ in mixed] == [200] * 5 + [400]


def test_a_tensor_of_another_width_or_byte_order_reaches_the_handle_as_its_declared_type(serve):
    """float64 (or float16, or big-endian float32) pixels for a handle that declares FP32 reached its model
    as sent, where a model that takes float32 alone failed: a 500 for the client's choice of width, and
    a run in parts for the batch it was in. They are the declared type when they reach the handle; a
    value that type cannot hold is the client's 400."""
    with serve("handles_v2:Float32Pixels", MaxWaitMs=50) as server:
        sent = [np.ones((3, 4, 4), np.float64), np.ones((3, 4, 4), np.float16), np.ones((3, 4, 4), ">f4"),
                np.ones((1, 3, 4, 4), np.float64)]
        answers = [post(server, npy(array), NPY) for array in sent]
        huge = post(server, npy(np.full((3, 4, 4), 1e300)), NPY)
    assert [(status, answer) for status, _, answer in answers] == [(200, {"sum": 48.0})] * 4
    assert huge[::2] == (400, {"error": "the tensor is float64 and holds values out of range for FP32, which the "
                                        "model takes (pixels FP32 [3, 4, 4])"})


def test_a_tensor_body_goes_as_the_declared_input_of_its_very_datatype_before_one_of_its_kind(serve):
    """Of a handle's inputs FP16 and FP32, float32 was made float16 (the first of its kind declared), its
    values rounded; it is taken as sent by the input that takes float32, and float64 by the first of its kind."""
    sent = np.array([0.1, 0.2, 0.3], np.float32)
    with serve("handles_v2:TwoWidths") as server:
        single, half, double = (post(server, npy(sent.astype(dtype)), NPY) for dtype in ("<f4", "<f2", "<f8"))
    assert single[::2] == (200, {"dtype": "float32", "values": sent.tolist()})
    assert half[::2] == (200, {"dtype": "float16", "values": sent.astype(np.float16).tolist()})
    assert double[::2] == (200, {"dtype": "float16", "values": sent.astype(np.float16).tolist()})
