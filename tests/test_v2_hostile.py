"""Open Inference requests built to hurt: each is a 400 (never a 500), costs the server little, and
leaves the workers running."""

from __future__ import annotations

import json
import time

import orjson
import pytest
from test_openinference import infer, infer_body, send, x_input

from easyserve import Server
from easyserve.tensors import binary_to_array
from easyserve.v2.protocol import InferTask, Signature, encode_response, read_request


@pytest.fixture(scope="module")
def echo():
    with Server(handle="handles_v2:Echo", GPUs="cpu", Port=0, ModelName="affine") as server:
        yield server


def still_serving(url: str) -> None:
    status, _, (answer, _) = infer(url, {"inputs": [x_input([1.0, 2.0])], "outputs": [{"name": "x"}]})
    assert (status, answer["outputs"][0]["data"]) == (200, [1.0, 2.0]), answer


def test_a_header_length_of_thousands_of_digits_is_a_400(echo):
    status, _, (answer, _) = infer(echo.url, {"inputs": [x_input([1.0])]}, length="9" * 5000)
    assert status == 400 and "Inference-Header-Content-Length is 9999" in answer["error"], answer
    doc = {"inputs": [x_input([1.0])], "outputs": [{"name": "x"}]}
    status, _, (answer, _) = infer(echo.url, doc, length="0" * 5000 + str(len(json.dumps(doc))))
    assert (status, answer["outputs"][0]["data"]) == (200, [1.0]), answer  # leading zeros: still a number
    still_serving(echo.url)


def test_a_bytes_shape_of_trillions_with_no_data_is_refused_without_allocating():
    started = time.perf_counter()
    for count in (2**26, 2**40):
        with pytest.raises(ValueError, match=f"binary data holds 0 BYTES element.s., but its shape holds {count}"):
            binary_to_array(b"", 0, 0, "BYTES", [count])
    assert time.perf_counter() - started < 0.5  # no array of 2**26 elements was made


def test_a_bytes_shape_of_trillions_is_a_400_and_kills_no_worker(echo):
    pid = echo.workers[0]["pid"]
    doc = {"inputs": [{"name": "b", "datatype": "BYTES", "shape": [2**40], "parameters": {"binary_data_size": 4}}]}
    status, _, (answer, _) = infer(echo.url, doc, b"\x00\x00\x00\x00")
    assert (status, answer) == (400, {"error": "input 'b': binary data holds 1 BYTES element(s), but its shape "
                                                "holds 1099511627776"})
    still_serving(echo.url)
    assert echo.workers[0]["pid"] == pid and echo.stats()["restarts"] == 0


@pytest.mark.parametrize("part", ["inputs", "outputs"])
def test_tens_of_thousands_of_inputs_or_outputs_are_read_in_linear_time(part):
    count = 20_000
    many = [{"name": f"t{i}", "datatype": "BOOL", "shape": [0], "data": []} for i in range(count)]
    if part == "inputs":
        doc = {"inputs": many}
    else:
        doc = {"inputs": many[:1], "outputs": [{"name": f"t{i}"} for i in range(count)]}
    body = orjson.dumps(doc)
    started = time.perf_counter()
    request = read_request(body, None, Signature())
    assert time.perf_counter() - started < 2.0  # quadratic, it took 10-20 s
    assert len(request.inputs if part == "inputs" else request.outputs) == count
    twice = orjson.dumps({**doc, part: doc[part] + doc[part][:1]})
    with pytest.raises(Exception, match="twice"):
        read_request(twice, None, Signature())


def test_tens_of_thousands_of_outputs_are_answered_in_linear_time():
    # each output asked whether any input came batched: 40,000 inputs echoed back held a worker 30 s
    count = 20_000
    doc = {"inputs": [{"name": f"t{i}", "datatype": "FP32", "shape": [1, 1], "data": [i]} for i in range(count)]}
    body = orjson.dumps(doc)
    request = read_request(body, None, Signature())
    result = request.arrays(body)  # what an echo's postprocess returns: every input, as an output
    started = time.perf_counter()
    status, (_, answer) = encode_response(result, request, InferTask(body, None, "echo", "1"), Signature())
    assert time.perf_counter() - started < 2.0  # quadratic, it took 7 s
    outputs = orjson.loads(answer)["outputs"]
    assert status == 200 and len(outputs) == count
    assert outputs[-1] == {"name": f"t{count - 1}", "datatype": "FP32", "shape": [1, 1], "data": [count - 1]}


@pytest.mark.parametrize("dims", [2_000, 5_000])  # a body read on the event loop; one left to the worker (64 KB+)
def test_a_shape_of_thousands_of_dimensions_is_a_400_and_kills_no_worker(echo, dims):
    """It was a 500: thousands of sizes multiplied make a number too long to print, and in a worker that
    killed the worker, and the one that ran the request again. (100,000 sizes took a minute to multiply.)"""
    pid = echo.workers[0]["pid"]
    doc = {"inputs": [{"name": "b", "datatype": "FP64", "shape": [2**63 - 1] * dims,
                       "parameters": {"binary_data_size": 8}}]}
    status, _, (answer, _) = infer(echo.url, doc, b"\0" * 8)
    assert (status, answer) == (400, {"error": f"input 'b': shape has {dims} dimensions, and a tensor may have at "
                                                "most 32"})
    still_serving(echo.url)
    assert echo.workers[0]["pid"] == pid and echo.stats()["restarts"] == 0


def test_an_inference_header_content_length_given_twice_with_two_values_is_a_400(echo):
    """The first was taken: a proxy that takes the last would read another JSON, and other binary data."""
    doc = {"inputs": [{"name": "b", "datatype": "UINT8", "shape": [2], "parameters": {"binary_data_size": 2}}],
           "outputs": [{"name": "b"}]}
    body, headers = infer_body(doc, b"\x01\x02")
    (name, value), = headers.items()
    url = f"{echo.url}/v2/models/affine/infer"
    status, _, raw = send("POST", url, body, [(name, value), (name, str(int(value) - 1))])
    assert (status, json.loads(raw)) == (400, {"error": f"{name} is given 2 times ('{value}', '{int(value) - 1}'): "
                                                        "give it once"})
    status, _, raw = send("POST", url, body, [(name, value), (name, value)])  # the same twice: no doubt
    assert (status, json.loads(raw)["outputs"][0]["data"]) == (200, [1, 2])


def test_an_error_quotes_a_long_value_the_client_sent_in_brief(echo):
    """An id of 10,000 numbers was quoted whole: 58 kB of error. Errors made on the event loop are cut
    short as a worker's are, and a value the request sent is quoted in brief."""
    status, _, (answer, _) = infer(echo.url, {"id": list(range(10_000)), "inputs": [x_input([1.0])]})
    assert (status, answer) == (400, {"error": '"id" must be a string, got [0, 1, 2, 3, 4, 5, ...]'})
    # nested 1,000 deep (JSON allows it; the body is 2 kB): quoting it made repr raise, a 500
    deep = b'{"id": ' + b"[" * 1000 + b"]" * 1000 + b', "inputs": [' + json.dumps(x_input([1.0])).encode() + b"]}"
    status, _, (answer, _) = infer(echo.url, deep)
    assert (status, answer) == (400, {"error": '"id" must be a string, got [[[[...]]]]'})
    status, _, (answer, _) = infer(echo.url, {"inputs": [{**x_input([1.0]), "datatype": "X" * 100_000}]})
    assert status == 400 and answer["error"].endswith(" more characters]") and len(answer["error"]) < 4200
    still_serving(echo.url)
