"""The Open Inference Protocol (v2 REST), driven by clients we did not write (tritonclient's sync and
asyncio clients) and by raw HTTP for every refusal, against real servers; answers compared with
``/predict``'s for the same input."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gzip
import json
import os
import signal
import struct
import threading
from typing import Any

import aiohttp
import ml_dtypes
import numpy as np
import pytest
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from conftest import http, post_json, post_many, request, wait_until
from tritonclient.utils import InferenceServerException

import easyserve
from easyserve import Server, StartupError
from easyserve.errors import BadRequest
from easyserve.v2.protocol import Signature, infer_task

HEADER = "Inference-Header-Content-Length"
# Triton's words for an unknown model, which clients written for it look for
NO_RESNET = "Request for unknown model: 'resnet' is not found (this server serves 'affine')"
NO_VERSION_2 = "Request for unknown model: 'affine' version 2 is not found (it has version '1')"
AFFINE_METADATA = {
    "name": "affine", "versions": ["1"], "platform": "easyserve",
    # a leading -1 for the batch a request may carry, as Triton lists a batching model's
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, -1]},
               {"name": "scale", "datatype": "FP32", "shape": [-1, 1]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, -1]},
                {"name": "total", "datatype": "FP64", "shape": [-1, 1]},
                {"name": "count", "datatype": "INT64", "shape": [-1, 1]},
                {"name": "pid", "datatype": "INT64", "shape": [-1, 1]}],
}


@pytest.fixture(scope="module")
def affine():
    with Server(handle="handles_v2:Affine", GPUs="cpu", Port=0, ModelName="affine", MaxWaitMs=20) as server:
        yield server


@pytest.fixture(scope="module")
def echo():
    with Server(handle="handles_v2:Echo", GPUs="cpu", Port=0) as server:
        yield server


@pytest.fixture(scope="module")
def bad_outputs():
    with Server(handle="handles_v2:BadOutputs", GPUs="cpu", Port=0, ModelName="affine") as server:
        yield server


def address(server: Server) -> str:
    return server.url.removeprefix("http://")


def send(method: str, url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """One raw request; (status, headers, body bytes)."""

    async def run() -> tuple[int, dict, bytes]:
        async with aiohttp.ClientSession() as session:
            async with session.request(method, url, data=body, headers=headers) as resp:
                return resp.status, dict(resp.headers), await resp.read()

    return asyncio.run(run())


def infer_body(doc: Any, binary: bytes = b"", length: Any = "auto") -> tuple[bytes, dict]:
    """An inference request's body and headers: ``doc`` as JSON (or bytes as they are), then ``binary``;
    ``length`` is the Inference-Header-Content-Length to send (``"auto"``: the JSON's, if binary follows)."""
    head = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    headers = {}
    if length == "auto":
        length = len(head) if binary else None
    if length is not None:
        headers[HEADER] = str(length)
    return head + binary, headers


def infer(url: str, doc: Any, binary: bytes = b"", length: Any = "auto", model: str = "affine",
          extra: dict | None = None) -> tuple[int, dict, Any]:
    """POST an inference request; (status, headers, JSON header of the answer and its binary tail)."""
    body, headers = infer_body(doc, binary, length)
    status, answer_headers, raw = send("POST", f"{url}/v2/models/{model}/infer", body, {**headers, **(extra or {})})
    size = int(answer_headers.get(HEADER, len(raw)))
    return status, answer_headers, (json.loads(raw[:size]), raw[size:])


def x_input(values: list, datatype: str = "FP32", **extra: Any) -> dict:
    return {"name": "x", "datatype": datatype, "shape": [len(values)], "data": values, **extra}


def text(values: Any) -> Any:
    """BYTES elements as str: tritonclient gives JSON data as str, binary data as bytes."""
    if isinstance(values, list):
        return [text(v) for v in values]
    return values.decode() if isinstance(values, bytes) else values


def predict_affine(url: str, x: np.ndarray, scale: float = 2.0) -> dict:
    status, body = post_json(url + "/predict", {"x": x.tolist(), "scale": scale})
    assert status == 200, body
    return body


def still_serving(url: str) -> None:
    status, _, (answer, _) = infer(url, {"inputs": [x_input([1.0, 2.0])], "outputs": [{"name": "y"}]})
    assert (status, answer["outputs"][0]["data"]) == (200, [3.0, 5.0]), answer


# -- tritonclient: health, metadata, inference -------------------------------------------------------------


def test_tritonclient_sees_a_live_ready_server_and_the_models_metadata(affine):
    client = triton.InferenceServerClient(address(affine))
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("affine") and client.is_model_ready("affine", "1")
        assert not client.is_model_ready("other") and not client.is_model_ready("affine", "2")
        assert client.get_server_metadata() == {
            "name": "easyserve", "version": easyserve.__version__,
            "extensions": ["binary_tensor_data", "classification", "statistics"]}
        assert client.get_model_metadata("affine") == client.get_model_metadata("affine", "1") == AFFINE_METADATA
        with pytest.raises(InferenceServerException) as caught:
            client.get_model_metadata("resnet")
        assert caught.value.status() == "404"
        assert NO_RESNET in str(caught.value)
        with pytest.raises(InferenceServerException) as caught:
            client.get_model_metadata("affine", "2")
        assert caught.value.status() == "404" and str(caught.value).endswith(NO_VERSION_2)
    finally:
        client.close()


def as_perf_analyzer_reads(metadata: dict, config: dict, sizes: dict[str, int]) -> dict[str, list[int]]:
    """Each input's shape for one item as Triton's perf_analyzer reads a model: where the configuration's
    max_batch_size is above 0, the first dimension of every metadata shape is the batch's and is left
    out (its own -b goes there); -1 is a size the user gives (``--shape``)."""
    batching = config["max_batch_size"] > 0
    return {t["name"]: [sizes[t["name"]] if d == -1 else d for d in t["shape"][1 if batching else 0:]]
            for t in metadata["inputs"]}


def test_tritons_tools_read_the_model_configuration_and_batch_as_it_says(affine):
    client = triton.InferenceServerClient(address(affine))
    try:
        config = client.get_model_config("affine")
        assert client.get_model_config("affine", "1") == config
        assert config == {
            "name": "affine", "platform": "easyserve", "max_batch_size": 8,
            "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [-1], "format": "FORMAT_NONE", "optional": False},
                      {"name": "scale", "data_type": "TYPE_FP32", "dims": [1], "format": "FORMAT_NONE",
                       "optional": True}],
            "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [-1]},
                       {"name": "total", "data_type": "TYPE_FP64", "dims": [1]},
                       {"name": "count", "data_type": "TYPE_INT64", "dims": [1]},
                       {"name": "pid", "data_type": "TYPE_INT64", "dims": [1]}],
            "instance_group": [{"name": "affine", "kind": "KIND_CPU", "count": 1}],
            "dynamic_batching": {"max_queue_delay_microseconds": 20000},  # MaxWaitMs 20
        }
        for name, version, said in (("resnet", "", "unknown model: 'resnet' is not found"),
                                    ("affine", "2", "'affine' version 2 is not found")):
            with pytest.raises(InferenceServerException) as caught:
                client.get_model_config(name, version)
            assert caught.value.status() == "404" and said in str(caught.value)
        # a batch as perf_analyzer makes one from the two documents: -b 8, --shape x:3
        shapes = as_perf_analyzer_reads(client.get_model_metadata("affine"), config, {"x": 3})
        assert shapes == {"x": [3], "scale": [1]}
        for batch in (1, config["max_batch_size"]):
            values = {"x": np.arange(batch * 3, dtype=np.float32).reshape(batch, 3),
                      "scale": np.full((batch, 1), 2, np.float32)}
            inputs = [triton.InferInput(n, [batch, *shapes[n]], "FP32") for n in shapes]
            for i in inputs:
                i.set_data_from_numpy(values[i.name()])
            result = client.infer("affine", inputs)
            assert result.as_numpy("y").tolist() == (values["x"] * 2 + 1).tolist()
            assert result.as_numpy("count").tolist() == [[3]] * batch
        # past max_batch_size, refused as Triton refuses it
        x = triton.InferInput("x", [9, 3], "FP32")
        x.set_data_from_numpy(np.zeros((9, 3), np.float32))
        with pytest.raises(InferenceServerException) as caught:
            client.infer("affine", [x])
        assert caught.value.status() == "400"
    finally:
        client.close()


def test_the_classification_extension_answers_an_outputs_top_classes_as_triton_writes_them(serve):
    """tritonclient's class_count (the protocol's classification extension) was a 400: Triton's
    image_client.py and clients written like it ask for it."""
    with serve("handles_v2:Scores", ModelName="s", MaxWaitMs=50) as server:
        client = triton.InferenceServerClient(server.url.removeprefix("http://"))
        try:
            x = triton.InferInput("x", [4], "FP32")
            x.set_data_from_numpy(np.array([0.25, 3.5, 3.5, -1], np.float32))
            for binary in (True, False):
                wanted = [triton.InferRequestedOutput("scores", binary_data=binary, class_count=2),
                          triton.InferRequestedOutput("counts", binary_data=binary, class_count=3)]
                result = client.infer("s", [x], outputs=wanted)
                # the largest first, ties by index; floats with 6 decimals, integers as they are, labels
                assert text(result.as_numpy("scores").tolist()) == ["3.500000:1:dog", "3.500000:2:bird"]
                assert text(result.as_numpy("counts").tolist()) == ["35:1", "35:2", "2:0"]
            # a batch: each item's classes, along the batch dimension; more classes than there are: all
            two = triton.InferInput("x", [2, 4], "FP32")
            two.set_data_from_numpy(np.array([[1, 2, 3, 4], [4, 3, 2, 1]], np.float32))
            result = client.infer("s", [two], outputs=[triton.InferRequestedOutput("scores", class_count=9)])
            assert result.as_numpy("scores").shape == (2, 4)
            assert text(result.as_numpy("scores")[:, 0].tolist()) == ["4.000000:3:fish", "4.000000:0:cat"]
            for name, said in (("word", "output 'word' is BYTES, and classification ranks numbers"),
                               ("grid", "output 'grid' has shape [2, 2] for an item, and classification ranks one "
                                        "dimension of classes")):
                with pytest.raises(InferenceServerException) as caught:
                    client.infer("s", [x], outputs=[triton.InferRequestedOutput(name, class_count=1)])
                assert caught.value.status() == "400" and said in str(caught.value), caught.value
        finally:
            client.close()
        for classes in (-2, 1.5, True, "3"):
            doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [4], "data": [1, 2, 3, 4]}],
                   "outputs": [{"name": "scores", "parameters": {"classification": classes}}]}
            status, _, answer = http("POST", server.url + "/v2/models/s/infer", json=doc)
            assert status == 400 and answer["error"].startswith(
                "classification in output 'scores''s parameters must be how many top classes to answer"), answer
        extensions = http("GET", server.url + "/v2")[2]["extensions"]
        assert extensions == ["binary_tensor_data", "classification", "statistics"]


def test_top_classes_of_every_kind_of_number():
    from easyserve.v2.protocol import top_classes

    bf16 = np.array([1.5, 3.25, -2, 3.25], dtype=ml_dtypes.bfloat16)  # numpy calls its kind "V"
    assert top_classes(bf16, "BF16", 3, None)[0].tolist() == [b"3.250000:1", b"3.250000:3", b"1.500000:0"]
    assert top_classes(np.array([1, 5, 3], np.uint8), "UINT8", 2, ["a", "b"])[0].tolist() == [b"5:1:b", b"3:2"]
    assert top_classes(np.array([[0.5, 2]], np.float16), "FP16", 1, None)[0].tolist() == [b"2.000000:1"]
    # integers as they are: past 2**53, float64 made ties of them, and the lower index came first
    big = np.array([2**53 + 1, 2**53, 2**53 + 1, 2**53 + 3], np.int64)
    assert top_classes(big, "INT64", 3, None)[0].tolist() == [
        b"9007199254740995:3", b"9007199254740993:0", b"9007199254740993:2"]
    assert top_classes(np.array([2**64 - 1, 0, 2**64 - 2], np.uint64), "UINT64", 2, None)[0].tolist() == [
        b"18446744073709551615:0", b"18446744073709551614:2"]


def test_every_http_front_gives_the_model_configuration(serve):
    with serve("handles_v2:Affine", HttpWorkers=2, ModelName="m") as server:
        # a connection each, spread over the two fronts by the kernel (SO_REUSEPORT): both, but for 1 in 2,000
        answers = [http("GET", server.url + "/v2/models/m/config") for _ in range(12)]
    assert [status for status, _, _ in answers] == [200] * 12, answers
    assert all(config == answers[0][2] for _, _, config in answers)
    assert answers[0][2]["instance_group"] == [{"name": "m", "kind": "KIND_CPU", "count": 1}]


def test_a_handle_that_declares_no_inputs_has_no_batch_dimension_in_its_configuration(echo):
    client = triton.InferenceServerClient(address(echo))
    try:
        assert client.get_model_config("Echo") == {"name": "Echo", "platform": "easyserve", "max_batch_size": 0,
                                                   "input": [], "output": [],
                                                   "instance_group": [{"name": "Echo", "kind": "KIND_CPU", "count": 1}]}
    finally:
        client.close()


def test_the_configuration_gives_processpergpu_on_each_gpu_as_an_instance_group(fake_gpus):
    fake_gpus(2)
    with Server(handle="handles_v2:Affine", GPUs=[0, 1], ProcessPerGPU=2, MaxBatchSize=1, ModelName="m",
                Port=0) as server:
        status, _, config = http("GET", server.url + "/v2/models/m/config")
    assert status == 200
    assert config["instance_group"] == [{"name": "m", "kind": "KIND_GPU", "count": 2, "gpus": [0, 1]}]
    assert config["max_batch_size"] == 1 and "dynamic_batching" not in config  # no batches to wait for


@pytest.mark.parametrize("binary_in", [False, True], ids=["json-in", "binary-in"])
@pytest.mark.parametrize("binary_out", [False, True], ids=["json-out", "binary-out"])
def test_tritonclient_inference_equals_predict(affine, binary_in, binary_out):
    rng = np.random.default_rng(int(binary_in) * 2 + int(binary_out))
    x = rng.normal(size=7).astype(np.float32)
    expected = predict_affine(affine.url, x, 0.5)
    client = triton.InferenceServerClient(address(affine))
    try:
        inputs = [triton.InferInput("x", [7], "FP32"), triton.InferInput("scale", [1], "FP32")]
        inputs[0].set_data_from_numpy(x, binary_data=binary_in)
        inputs[1].set_data_from_numpy(np.array([0.5], np.float32), binary_data=binary_in)
        outputs = [triton.InferRequestedOutput(name, binary_data=binary_out) for name in ("y", "total", "count")]
        result = client.infer("affine", inputs, outputs=outputs, request_id="req-42")
        subset = client.infer("affine", inputs, outputs=[triton.InferRequestedOutput("count", binary_data=binary_out)])
    finally:
        client.close()
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == ("affine", "1", "req-42")
    assert [(o["name"], o["datatype"], o["shape"]) for o in response["outputs"]] == [
        ("y", "FP32", [7]), ("total", "FP64", [1]), ("count", "INT64", [1])]
    assert all(("parameters" in o) == binary_out and ("data" in o) != binary_out for o in response["outputs"])
    y = result.as_numpy("y")
    assert y.dtype == np.float32 and y.tolist() == np.float32(expected["y"]).tolist() == (x * 0.5 + 1).tolist()
    assert result.as_numpy("total").tolist() == expected["total"]
    assert result.as_numpy("count").tolist() == expected["count"] == [7]
    assert [o["name"] for o in subset.get_response()["outputs"]] == ["count"]
    assert "id" not in subset.get_response()


def test_32_concurrent_asyncio_infers_each_equal_predict(affine):
    vectors = [np.arange(i % 5 + 1, dtype=np.float32) * (i + 1) for i in range(32)]
    expected = [body for _, body in post_many(affine.url + "/predict", [{"x": v.tolist()} for v in vectors])]

    async def run() -> list:
        async with triton_aio.InferenceServerClient(address(affine)) as client:
            async def one(i: int, v: np.ndarray):
                tensor = triton.InferInput("x", [len(v)], "FP32")
                tensor.set_data_from_numpy(v, binary_data=i % 2 == 0)  # half binary, half JSON
                return await client.infer("affine", [tensor], request_id=str(i))

            return await asyncio.gather(*(one(i, v) for i, v in enumerate(vectors)))

    results = asyncio.run(run())
    for i, (result, want) in enumerate(zip(results, expected)):
        assert result.get_response()["id"] == str(i)
        assert result.as_numpy("y").tolist() == want["y"] and result.as_numpy("count").tolist() == want["count"]
        assert result.as_numpy("total").tolist() == want["total"]


DATATYPE_SAMPLES = {
    "BOOL": np.array([[True, False, True]]),
    "INT8": np.array([[-128, 0, 127]], np.int8), "INT16": np.array([[-32768, 1, 32767]], np.int16),
    "INT32": np.array([[-2**31, 2, 2**31 - 1]], np.int32), "INT64": np.array([[-2**63, 3, 2**63 - 1]], np.int64),
    "UINT8": np.array([[0, 4, 255]], np.uint8), "UINT16": np.array([[0, 5, 65535]], np.uint16),
    "UINT32": np.array([[0, 6, 2**32 - 1]], np.uint32), "UINT64": np.array([[0, 7, 2**64 - 1]], np.uint64),
    "FP16": np.array([[0.5, -65504, 3.140625]], np.float16), "FP32": np.array([[0.1, -3.4e38, 1e-30]], np.float32),
    "FP64": np.array([[0.1, 1.7e308, -2.5e-300]], np.float64),
    "BYTES": np.array([[b"caf\xc3\xa9", b"", b"text"]], dtype=object),
    # numpy has none: ml_dtypes', which tritonclient sends BF16 from (it was refused: "not supported")
    "BF16": np.array([[1.5, -0.1, 3.3e38]], ml_dtypes.bfloat16),
}


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_every_datatype_reaches_an_undeclared_handle_as_numpy_and_comes_back(echo, binary):
    # tritonclient sends BF16 as binary data only (below: as JSON, by hand)
    samples = {d: a for d, a in DATATYPE_SAMPLES.items() if binary or d != "BF16"}
    client = triton.InferenceServerClient(address(echo))
    try:
        assert client.get_model_metadata("Echo") == {"name": "Echo", "versions": ["1"], "platform": "easyserve",
                                                      "inputs": [], "outputs": []}
        inputs = []
        for datatype, array in samples.items():
            inputs.append(triton.InferInput(datatype, list(array.shape), datatype))
            inputs[-1].set_data_from_numpy(array, binary_data=binary)
        outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in [*samples, "seen"]]
        result = client.infer("Echo", inputs, outputs=outputs, parameters={"mode": "echo"})
    finally:
        client.close()
    for datatype, array in samples.items():
        got = result.as_numpy(datatype)
        assert result.get_output(datatype)["datatype"] == datatype and got.shape == array.shape
        assert got.dtype == array.dtype and text(got.tolist()) == text(array.tolist()), datatype
    seen = text(result.as_numpy("seen").tolist())
    dtypes = {"BOOL": "bool", "BYTES": "object", "FP16": "float16", "FP32": "float32", "FP64": "float64",
              "BF16": "bfloat16"}
    assert seen == [f"{d}:{dtypes.get(d, d.lower())}:[1, 3]:True" for d in samples]  # writable arrays
    # the same numbers, sent to /predict as JSON, come back the same
    numbers = {d: a.tolist() for d, a in DATATYPE_SAMPLES.items() if d not in ("BYTES", "FP16", "UINT64", "BF16")}
    status, body = post_json(echo.url + "/predict", numbers)
    assert status == 200 and all(body[d] == result.as_numpy(d).tolist() for d in numbers)


def test_bf16_travels_as_json_data_each_value_as_its_float32_and_one_past_its_range_is_a_400(echo):
    inputs = [{"name": "h", "datatype": "BF16", "shape": [3], "data": [1.5, -0.1, 3.3e38]}]
    status, answer = post_json(echo.url + "/v2/models/Echo/infer", {"inputs": inputs})
    out = {o["name"]: o for o in answer["outputs"]}
    assert status == 200 and out["h"]["datatype"] == "BF16" and out["seen"]["data"] == ["h:bfloat16:[3]:True"]
    nearest = np.array([1.5, -0.1, 3.3e38], ml_dtypes.bfloat16).astype(np.float64)  # bfloat16's, exactly
    assert out["h"]["data"] == nearest.tolist() and out["h"]["data"][1] == -0.10009765625, out["h"]
    inputs[0]["data"] = [1e39, 0, 0]
    status, refused = post_json(echo.url + "/v2/models/Echo/infer", {"inputs": inputs})
    assert status == 400 and "1e+39 is out of range for BF16 (largest 3.3895314e+38)" in refused["error"], refused


def test_request_parameters_reach_the_handle_and_bytes_travel_exactly(echo):
    raw = np.array([b"\x00\xff\x00\x00", b"\x89PNG\r\n\x1a\n" + bytes(200)], dtype=object)
    client = triton.InferenceServerClient(address(echo))
    try:
        tensor = triton.InferInput("blob", [2], "BYTES")
        tensor.set_data_from_numpy(raw)
        result = client.infer("Echo", [tensor], parameters={"threshold": 0.5, "tag": "a"})
    finally:
        client.close()
    assert result.as_numpy("blob").tolist() == raw.tolist()
    # less the protocol's own flag, which tritonclient adds where no output is named
    assert text(result.as_numpy("parameters").tolist()) == ["tag=a", "threshold=0.5"]
    # asked for as JSON, which cannot carry them: the client's to ask otherwise, a 400 saying how (a 500
    # told it the server had failed, and to try again)
    doc = {"inputs": [{"name": "blob", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 6}}],
           "outputs": [{"name": "blob", "parameters": {"binary_data": False}}]}
    status, _, (answer, _) = infer(echo.url, doc, struct.pack("<I", 2) + b"\xff\xfe", model="Echo")
    assert (status, answer) == (400, {"error": "output 'blob' holds bytes that are not UTF-8 text, which JSON cannot "
                                               "carry; ask for it as binary data (parameters.binary_data)"})


def test_payload_bytes_takes_one_bytes_element_so_a_predict_handle_answers_inference_requests(serve):
    # README's handle pattern (payload_bytes(task["task_info"], "img")) answered an inference request's
    # BYTES input 400 "'img' must be a base64 string, got ndarray"
    from test_http import png_bytes

    with serve("handles_for_tests:ImageSize") as server:
        picture = png_bytes(5, 3)
        doc = {"inputs": [{"name": "img", "datatype": "BYTES", "shape": [1],
                           "parameters": {"binary_data_size": 4 + len(picture)}}]}
        status, _, (answer, _) = infer(server.url, doc, struct.pack("<I", len(picture)) + picture, model="ImageSize")
        assert status == 200 and answer["outputs"][0]["data"] == [5, 3], answer
        two = {"inputs": [{"name": "img", "datatype": "BYTES", "shape": [2], "data": ["a", "b"]}]}
        status, _, (answer, _) = infer(server.url, two, model="ImageSize")
        assert (status, answer) == (400, {"error": "preprocess failed: ValueError: 'img' is a tensor of 2 BYTES "
                                                   "elements, where this handle takes bytes (an image file): send "
                                                   "one BYTES element"}), answer


def test_a_leading_batch_dimension_of_one_comes_off_for_the_handle_and_back_on_the_outputs(affine, echo):
    x = np.array([[1.0, 2.0, 3.0]], np.float32)
    client = triton.InferenceServerClient(address(affine))
    try:
        tensor = triton.InferInput("x", [1, 3], "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("affine", [tensor])
    finally:
        client.close()
    assert result.as_numpy("y").tolist() == [[3.0, 5.0, 7.0]]
    assert result.as_numpy("total").tolist() == [[15.0]] and result.as_numpy("count").shape == (1, 1)
    # a model that declares nothing gets the shape as sent
    status, _, (answer, _) = infer(echo.url, {"inputs": [x_input([[1.0, 2.0]]) | {"shape": [1, 2]}],
                                              "outputs": [{"name": "seen"}]}, model="Echo")
    assert (status, answer["outputs"][0]["data"]) == (200, ["x:float32:[1, 2]:True"])


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_a_request_holding_a_batch_is_answered_as_its_items_one_a_request_would_be(affine, binary):
    """tritonclient's users send [N, ...] for a model that batches: each item runs as a request of its own,
    and each output comes back with the items joined along a leading dimension of N."""
    x = np.array([[1.0, 2.0, 3.0], [0.5, 0.0, -1.0], [4.0, 4.0, 4.0]], np.float32)
    scale = np.array([[2.0], [3.0], [-1.0]], np.float32)
    client = triton.InferenceServerClient(address(affine))
    try:
        inputs = [triton.InferInput("x", [3, 3], "FP32"), triton.InferInput("scale", [3, 1], "FP32")]
        for tensor, array in zip(inputs, (x, scale)):
            tensor.set_data_from_numpy(array, binary_data=binary)
        outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in ("y", "total", "count")]
        result = client.infer("affine", inputs, outputs=outputs, request_id="three")
    finally:
        client.close()
    alone = [predict_affine(affine.url, row, float(s[0])) for row, s in zip(x, scale)]
    assert result.get_response()["id"] == "three"
    assert result.as_numpy("y").tolist() == [one["y"] for one in alone]
    assert result.as_numpy("total").tolist() == [[one["total"][0]] for one in alone]
    assert result.as_numpy("count").tolist() == [[3], [3], [3]]
    # an item that fails fails its request, saying which; the server goes on
    status, _, (answer, _) = infer(affine.url, {"inputs": [{"name": "x", "datatype": "FP32", "shape": [3, 2],
                                                             "data": [[1, 2], [-1, 2], [3, 4]]}]})
    assert (status, answer) == (400, {"error": "item 1 of the request's batch of 3: preprocess failed: ValueError: "
                                               "x may not start with -1"})
    still_serving(affine.url)


def test_items_whose_outputs_differ_in_shape_cannot_be_joined_so_the_request_is_told_to_send_them_apart(serve):
    with serve("handles_v2:Rows") as server:
        status, _, (answer, _) = infer(server.url, {"inputs": [{"name": "n", "datatype": "INT64", "shape": [2, 1],
                                                                 "data": [2, 2]}]}, model="Rows")
        assert (status, answer["outputs"]) == (200, [{"name": "y", "datatype": "FP32", "shape": [2, 2],
                                                      "data": [0.0, 1.0, 0.0, 1.0]}])
        status, _, (answer, _) = infer(server.url, {"inputs": [{"name": "n", "datatype": "INT64", "shape": [2, 1],
                                                                 "data": [1, 2]}]}, model="Rows")
    assert (status, answer) == (400, {"error": "output 'y' is FP32 [1] for item 0 of the batch, and FP32 [2] for "
                                               "item 1: its items cannot be joined into one tensor; send them one a "
                                               "request"})


def _rows(n: list[int], pad: int = 0) -> dict:
    """A Rows request of one item for each of ``n``; ``pad`` bytes more of JSON make it one the worker reads."""
    doc = {"inputs": [{"name": "n", "datatype": "INT64", "shape": [len(n), 1], "data": n}]}
    return doc | {"parameters": {"pad": "x" * pad}} if pad else doc


@pytest.mark.parametrize("handle,fronts", [("Rows", 1), ("Rows", 2), ("RowsWhole", 1)],
                         ids=["one front", "two fronts", "own run_batch"])
def test_a_request_weighs_its_items_in_a_batch_and_forward_never_gets_more_than_max_batch_size(serve, tmp_path,
                                                                                              handle, fronts):
    """MaxBatchSize 4: two requests of 3 items wait while the worker runs a batch, and are not taken together.
    Two whose JSON is large enough for the worker alone to read them (the server knows not how many items
    they hold) are: the worker runs the first and gives the second back, which runs next, weighed by its
    items. Run in parts of 4 and 2, such a batch could run past TimeoutS, and its worker was killed."""
    journal = tmp_path / "journal"
    with serve(f"handles_v2:{handle}", MaxBatchSize=4, MaxWaitMs=0, HttpWorkers=fronts,
               HandleArgs={"journal": str(journal), "forward_s": 0.5}) as server:
        for pad in (0, 100_000):
            journal.write_text("")
            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                first = pool.submit(infer, server.url, _rows([1]), model=handle)
                wait_until(lambda: journal.read_text(), what="the first batch to run")
                answers = [pool.submit(infer, server.url, _rows([2, 2, 2], pad), model=handle) for _ in range(2)]
                wait_until(lambda: server.stats()["queue_depth"] == 2, what="both requests to wait")
                assert first.result()[0] == 200
                for answer in answers:
                    status, _, (doc, _) = answer.result()
                    assert (status, doc["outputs"][0]["shape"]) == (200, [3, 2]), doc
            sizes = [int(line) for line in journal.read_text().split()]
            assert sizes == [1, 3, 3]
        # counted in items where the server knew them; the two it left to the worker, as one each, then the
        # one given back by its items
        stats = server.stats()
        assert stats["batch_sizes"] == {"1": 2, "2": 1, "3": 3} and stats["restarts"] == 0
        for pad in (0, 100_000):  # read by the server, or by the worker: refused alike
            status, _, (answer, _) = infer(server.url, _rows([1] * 5, pad), model=handle)
            assert (status, answer) == (400, {"error": "the request holds a batch of 5 items, and this server runs "
                                                       "batches of at most 4 (MaxBatchSize): send at most 4 items a "
                                                       "request"})


def test_requests_whose_items_the_server_could_not_weigh_never_run_a_worker_past_timeout(serve, tmp_path):
    """Four requests of 4 items, each with JSON large enough for the worker alone to read it, handed to one
    worker as one batch (weighed one each) under MaxBatchSize 4: run in four parts of 0.6 s, the batch ran
    past TimeoutS, and the worker was killed as stuck (its model loaded again), every request a 504."""
    journal = tmp_path / "journal"
    with serve("handles_v2:Rows", MaxBatchSize=4, MaxWaitMs=0, TimeoutS=2,
               HandleArgs={"forward_s": 0.6, "journal": str(journal)}) as server:
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            first = pool.submit(infer, server.url, _rows([1]), model="Rows")
            # in forward (an empty queue alone could be read before the first request has come)
            wait_until(lambda: journal.exists() and journal.read_text(), what="the first to run")
            answers = [pool.submit(infer, server.url, _rows([2] * 4, 70_000), model="Rows") for _ in range(4)]
            statuses = [first.result()[0]] + [answer.result()[0] for answer in answers]
        stats = server.stats()
    assert stats["restarts"] == 0, stats
    # each runs alone now, after the batch it came in: two in time; the others, passed over as they cannot be
    # answered in time (which of them, the queue's guess), get their 504
    assert statuses[0] == 200 and statuses.count(200) >= 3 and set(statuses) <= {200, 504}, statuses


def test_a_handles_own_500_for_a_requests_items_is_said_once_naming_the_request(serve):
    # each of the 16 items said it, in as many lines, none naming the request
    with serve("handles_v2:RowsDown", MaxBatchSize=16) as server:
        status, headers, (answer, _) = infer(server.url, _rows([1] * 16), model="RowsDown")
        lines = [line.text for line in server.logs(tail=None) if "run_batch answered" in line.text]
    assert (status, answer) == (500, {"error": "item 0 of the request's batch of 16: run_batch answered 500: the "
                                               "model's server is down (said in worker cpu/0's log)"})
    request_id = next(value for name, value in headers.items() if name.lower() == "x-request-id")
    assert len(lines) == 1 and f"requests {request_id} (x16): run_batch answered 500" in lines[0], lines


def test_a_large_request_is_read_by_the_worker_with_the_same_checks(affine, echo):
    x = np.linspace(-0.5, 1, 20_000, dtype=np.float32)
    doc = {"inputs": [x_input(x.tolist())], "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}
    # past LARGE_JSON: the server leaves it to the worker; a small one it reads for its 400, and leaves too
    # (an InferTask holds no request read by the server: the body, which the worker reads, is what goes)
    tiny = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}'
    for body in (json.dumps(doc).encode(), tiny):
        assert infer_task(body, None, Signature(), "affine", "1").body == body
    with pytest.raises(BadRequest, match="needs \"inputs\""):
        infer_task(b'{"inputs": []}', None, Signature(), "affine", "1")
    status, _, (answer, tail) = infer(affine.url, doc)
    assert status == 200 and np.frombuffer(tail, np.float32).tolist() == (x * 2 + 1).tolist()
    for values, message in (([1.0, "2"], "input 'x': FP32 data must hold numbers, and holds strings"),
                            ([1.0, None], "input 'x': FP32 data must hold numbers, and holds null")):
        big = {"inputs": [x_input(values * 10_000)]}
        small = {"inputs": [x_input(values)]}
        for request_doc in (big, small):
            status, _, (answer, _) = infer(affine.url, request_doc)
            assert (status, answer) == (400, {"error": message})
    large_bytes = {"inputs": [{"name": "s", "datatype": "BYTES", "shape": [3000], "data": ["word" * 8] * 3000}],
                   "outputs": [{"name": "seen"}]}
    status, _, (answer, _) = infer(echo.url, large_bytes, model="Echo")
    assert (status, answer["outputs"][0]["data"]) == (200, ["s:object:[3000]:True"])


@pytest.mark.parametrize("pad", [0, 100_000], ids=["read by the server", "read by the worker"])
def test_nested_data_for_a_scalar_is_the_clients_400_and_costs_no_worker(echo, pad):
    """Shape [] with data [[1.0]]: a 500, and from a body large enough for the worker to read, a worker
    that exited, and its successor on the retry."""
    pids = {w["pid"] for w in echo.workers}
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [], "data": [[1.0]]}],
           "parameters": {"pad": "x" * pad}}
    status, _, (answer, _) = infer(echo.url, doc, model="Echo")
    assert (status, answer) == (400, {"error": "input 'x': data is nested, but shape [] holds one element: "
                                               "send it as [x]"})
    assert {w["pid"] for w in echo.workers} == pids


def test_a_gzipped_binary_request_is_inflated_like_predicts(affine):
    x = np.arange(5, dtype=np.float32)
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [5], "parameters": {"binary_data_size": 20}}],
           "outputs": [{"name": "y"}]}
    body, headers = infer_body(doc, x.tobytes())
    status, _, raw = send("POST", affine.url + "/v2/models/affine/infer", gzip.compress(body),
                          {**headers, "Content-Encoding": "gzip"})
    assert status == 200 and json.loads(raw)["outputs"][0]["data"] == (x * 2 + 1).tolist()


# -- raw HTTP: every refusal, and the server answers afterwards -------------------------------------------

X_BINARY = {"name": "x", "datatype": "FP32", "shape": [3], "parameters": {"binary_data_size": 12}}
THREE = np.array([1, 2, 3], np.float32).tobytes()
SCALE = {"name": "scale", "datatype": "FP32", "data": [1, 2, 3]}
REFUSALS = [
    # (id, JSON (or bytes), binary, Inference-Header-Content-Length, status, message part)
    ("header length past the body", {"inputs": [X_BINARY]}, THREE, 10_000, 400,
     "Inference-Header-Content-Length is 10000, but the body has"),
    ("header length short of the JSON", {"inputs": [X_BINARY]}, THREE, 20, 400,
     "body is not valid JSON"),
    ("header length not a number", {"inputs": [X_BINARY]}, THREE, "12abc", 400,
     "Inference-Header-Content-Length must be the JSON's length in bytes, got '12abc'"),
    ("header length negative", {"inputs": [X_BINARY]}, THREE, "-5", 400,
     "Inference-Header-Content-Length must be the JSON's length in bytes, got '-5'"),
    ("binary_data_size past the end", {"inputs": [X_BINARY]}, THREE[:8], "auto", 400,
     "input 'x': binary_data_size 12 runs past the end of the body, which has 8 byte(s) left"),
    ("binary without the header", {"inputs": [X_BINARY]}, THREE, None, 400,
     "binary tensor data after the JSON needs the Inference-Header-Content-Length header"),
    ("bytes after the binary data", {"inputs": [X_BINARY]}, THREE + b"junk", "auto", 400,
     "4 byte(s) follow the binary data of the inputs"),
    ("binary size that disagrees with the shape",
     {"inputs": [X_BINARY | {"parameters": {"binary_data_size": 8}}]}, THREE[:8], "auto", 400,
     "input 'x': binary_data_size is 8, but shape [3] of FP32 takes 12 bytes"),
    ("JSON data that disagrees with the shape", {"inputs": [x_input([1.0, 2.0]) | {"shape": [3]}]}, b"", None, 400,
     "input 'x': data has 2 element(s) but shape [3] holds 3"),
    ("nested JSON data that disagrees with the shape", {"inputs": [x_input([[1.0, 2.0], [3.0]]) | {"shape": [3]}]},
     b"", None, 400, "input 'x': data has 2 item(s), but dimension 0 of shape [3] is 3: send the data flat, or nested"),
    ("a datatype the metadata does not give", {"inputs": [x_input([1.0], "FP64")]}, b"", None, 400,
     "input 'x' is FP64, and the model takes FP32"),
    ("an unknown datatype", {"inputs": [x_input([1.0], "FP8")]}, b"", None, 400,
     "input 'x': unknown datatype 'FP8'; expected one of BOOL, INT8"),
    ("a shape the metadata does not give", {"inputs": [x_input([1.0, 2.0]) | {"shape": [1, 1, 2]}]}, b"", None, 400,
     "input 'x' has shape [1, 1, 2], and the model takes [-1]"),
    ("a batch past MaxBatchSize", {"inputs": [x_input([1.0] * 9) | {"shape": [9, 1]}]}, b"", None, 400,
     "the request holds a batch of 9 items, and this server runs batches of at most 8 (MaxBatchSize): send at "
     "most 8 items a request"),
    ("a batch of none", {"inputs": [x_input([]) | {"shape": [0, 1]}]}, b"", None, 400,
     "input 'x' holds a batch of 0 items (shape [0, 1]): send one item at least"),
    ("inputs of two batch sizes", {"inputs": [x_input([1.0, 2.0]) | {"shape": [2, 1]}, SCALE | {"shape": [3, 1]}]},
     b"", None, 400, "input 'x' holds a batch of 2 (shape [2, 1]), and input 'scale' a batch of 3 (shape [3, 1]): "
     "every input of a batch gives each item's, with the same leading dimension"),
    ("an input beside a batch without one", {"inputs": [x_input([1.0, 2.0]) | {"shape": [2, 1]},
                                                        SCALE | {"shape": [1], "data": [3]}]},
     b"", None, 400, "input 'x' holds a batch of 2 (shape [2, 1]), and input 'scale' no batch dimension (shape [1])"),
    ("a missing input", {"inputs": [{"name": "scale", "datatype": "FP32", "shape": [1], "data": [2]}]}, b"", None,
     400, "missing input(s): x (FP32 [-1])"),
    ("an unknown input", {"inputs": [x_input([1.0]), {"name": "z", "datatype": "FP32", "shape": [1], "data": [2]}]},
     b"", None, 400, "the model has no input 'z'; its inputs are x (FP32 [-1]), scale (FP32 [1], optional)"),
    ("an unknown output", {"inputs": [x_input([1.0])], "outputs": [{"name": "w"}]}, b"", None, 400,
     "the model has no output 'w'; its outputs are y (FP32 [-1])"),
    ("a JSON array", [1, 2], b"", None, 400, 'body must be a JSON object such as {"inputs": '),
    ("not JSON", b"{inputs", b"", None, 400, "body is not valid JSON"),
    ("an empty body", b"", b"", None, 400, "empty body: send an inference request"),
    ("no inputs", {"outputs": []}, b"", None, 400, 'an inference request needs "inputs", a non-empty array'),
    ("no input in inputs", {"inputs": []}, b"", None, 400, 'an inference request needs "inputs", a non-empty array'),
    ("an input that is not an object", {"inputs": [3]}, b"", None, 400, "inputs[0] must be an object"),
    ("an input without a name", {"inputs": [{"datatype": "FP32"}]}, b"", None, 400, 'inputs[0] needs a "name"'),
    ("an input twice", {"inputs": [x_input([1.0]), x_input([2.0])]}, b"", None, 400, "input 'x' is given twice"),
    ("data and binary", {"inputs": [X_BINARY | {"data": [1, 2, 3]}]}, THREE, "auto", 400,
     "input 'x' has both data and binary_data_size"),
    ("no data", {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}, b"", None, 400,
     "input 'x' has no data"),
    ("a negative dimension", {"inputs": [x_input([1.0]) | {"shape": [-1]}]}, b"", None, 400,
     "input 'x': shape must be an array of sizes (integers from 0), got [-1]"),
    ("a dimension past 64 bits", {"inputs": [x_input([]) | {"shape": [0, 2**64]}]}, b"", None, 400,
     "input 'x': shape holds a size past 64 bits (1.845e+19)"),
    ("an id that is not a string", {"id": 7, "inputs": [x_input([1.0])]}, b"", None, 400,
     '"id" must be a string, got 7'),
    ("parameters that are not an object", {"parameters": [1], "inputs": [x_input([1.0])]}, b"", None, 400,
     '"parameters" of the request must be an object'),
    ("binary_data_output not a boolean", {"parameters": {"binary_data_output": "yes"}, "inputs": [x_input([1.0])]},
     b"", None, 400, "binary_data_output in the request's parameters must be true or false, got 'yes'"),
    ("binary_data not a boolean", {"inputs": [x_input([1.0])], "outputs": [{"name": "y", "parameters": {
        "binary_data": 1}}]}, b"", None, 400, "binary_data in output 'y''s parameters must be true or false"),
    ("a negative binary_data_size", {"inputs": [X_BINARY | {"parameters": {"binary_data_size": -12}}]}, THREE,
     "auto", 400, "input 'x': binary_data_size must be a number of bytes, got -12"),
    ("shared memory", {"inputs": [x_input([1.0]) | {"parameters": {"shared_memory_region": "r"}}]}, b"", None, 400,
     "input 'x': shared memory is not supported"),
    ("classification of no number", {"inputs": [x_input([1.0])], "outputs": [{"name": "y", "parameters": {
        "classification": "3"}}]}, b"", None, 400, "classification in output 'y''s parameters must be how many top "
     "classes to answer, a whole number (0: the output's values), got '3'"),
    ("shared memory for an output", {"inputs": [x_input([1.0])], "outputs": [{"name": "y", "parameters": {
        "shared_memory_region": "r"}}]}, b"", None, 400, "output 'y': shared memory is not supported"),
    ("outputs that are not a list", {"inputs": [x_input([1.0])], "outputs": {"name": "y"}}, b"", None, 400,
     '"outputs" must be an array of objects'),
    ("an output twice", {"inputs": [x_input([1.0])], "outputs": [{"name": "y"}, {"name": "y"}]}, b"", None, 400,
     "output 'y' is asked for twice"),
    ("an output without a name", {"inputs": [x_input([1.0])], "outputs": [{"name": "y"}, {"parameters": {}}]}, b"",
     None, 400, 'outputs[1] must be an object with a "name"'),
    ("an output that is not an object", {"inputs": [x_input([1.0])], "outputs": ["y"]}, b"", None, 400,
     'outputs[0] must be an object with a "name"'),
    ("an element of the wrong kind", {"inputs": [x_input([1.0, True])]}, b"", None, 400,
     "input 'x': FP32 data must hold numbers, and holds booleans"),
    ("a value out of range", {"inputs": [x_input([1.0, 1e39])]}, b"", None, 400,
     "input 'x': 1e+39 is out of range for FP32"),
    ("preprocess refuses it", {"inputs": [x_input([-1.0, 2.0])]}, b"", None, 400,
     "preprocess failed: ValueError: x may not start with -1"),
]


@pytest.mark.parametrize("name,doc,binary,length,status,message", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_a_bad_inference_request_is_refused_with_what_was_expected(affine, name, doc, binary, length, status, message):
    got, _, (answer, tail) = infer(affine.url, doc, binary, length)
    assert got == status and message in answer["error"] and tail == b"", answer
    still_serving(affine.url)


@pytest.mark.parametrize("datatype,shape,binary,message", [
    ("BYTES", [2], b"\x01\x00\x00\x00a\x09\x00\x00\x00bc",
     "input 'b': BYTES element 1 says it has 9 bytes, but only 2 are left"),
    ("BYTES", [1], b"\x01\x00\x00\x00ab",
     "input 'b': binary data holds more than the 1 BYTES element(s) its shape holds (1 byte(s) left after element 1)"),
    ("BYTES", [2], b"\x01\x00", "input 'b': BYTES element 0: its 4-byte length is cut off at the end of the data"),
    ("BOOL", [2], b"\x00\x02", "input 'b': BOOL binary data must hold only bytes 0 (false) and 1 (true)"),
])
def test_binary_elements_that_lie_are_refused(echo, datatype, shape, binary, message):
    doc = {"inputs": [{"name": "b", "datatype": datatype, "shape": shape,
                       "parameters": {"binary_data_size": len(binary)}}]}
    status, _, (answer, _) = infer(echo.url, doc, binary, model="Echo")
    assert (status, answer) == (400, {"error": message})
    status, _, (answer, _) = infer(echo.url, {"inputs": [x_input([1.0])], "outputs": [{"name": "x"}]}, model="Echo")
    assert (status, answer["outputs"][0]["data"]) == (200, [1.0])


def test_data_null_is_no_data_so_kserves_client_may_send_an_empty_binary_tensor(echo):
    """KServe's client writes ``"data": null`` beside the binary_data_size of an input whose binary data is
    empty (shape [0]), and Triton and KServe read such an input's binary data: it was a 400, "has both
    data and binary_data_size"."""
    empty = {"name": "empty", "datatype": "FP32", "shape": [0], "data": None, "parameters": {"binary_data_size": 0}}
    status, _, (answer, _) = infer(echo.url, {"id": "k", "inputs": [empty], "outputs": [{"name": "empty"}]},
                                   model="Echo")
    assert (status, answer["outputs"]) == (200, [{"name": "empty", "datatype": "FP32", "shape": [0], "data": []}])
    blob = {"name": "b", "datatype": "BYTES", "shape": [1], "data": None, "parameters": {"binary_data_size": 6}}
    doc = {"inputs": [empty, blob], "outputs": [{"name": "b"}]}
    status, _, (answer, _) = infer(echo.url, doc, struct.pack("<I", 2) + b"hi", model="Echo")
    assert (status, answer["outputs"][0]["data"]) == (200, ["hi"])
    # without binary data, null is still no data
    status, _, (answer, _) = infer(echo.url, {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1],
                                                          "data": None}]}, model="Echo")
    assert (status, answer) == (400, {"error": "input 'x' has no data: give \"data\", or binary data and "
                                               "parameters.binary_data_size"})


def test_an_unknown_model_or_version_is_404_on_every_route(affine):
    body, _ = infer_body({"inputs": [x_input([1.0])]})
    for path, message in (("/v2/models/resnet", NO_RESNET), ("/v2/models/affine/versions/2", NO_VERSION_2),
                          ("/v2/models/resnet/versions/1", NO_RESNET)):
        for method, suffix, data in (("GET", "", None), ("GET", "/ready", None), ("POST", "/infer", body)):
            status, _, raw = send(method, affine.url + path + suffix, data)
            assert (status, json.loads(raw)) == (404, {"error": message}), path + suffix
    assert send("GET", affine.url + "/v2/models/affine/infer")[0] == 405
    still_serving(affine.url)


def test_health_answers_are_the_protocols_json_and_open_to_any_host(affine):
    """The bodies KServe's client reads (``response.json()["live"]``); the server's metadata at /v2/ too."""
    for path, body in (("/v2/health/live", {"live": True}), ("/v2/health/ready", {"ready": True}),
                       ("/v2/models/affine/ready", {"name": "affine", "ready": True}),
                       ("/v2/models/affine/versions/1/ready", {"name": "affine", "ready": True})):
        status, headers, raw = send("GET", affine.url + path)
        assert (status, headers["Content-Type"], json.loads(raw)) == (200, "application/json", body)
    # an error's too: KServe's client reads its text only under exactly application/json (with aiohttp's
    # "; charset=utf-8" its users saw a bare "400 Bad Request")
    for path, body, status in (("/v2/models/nope/infer", b'{"inputs": []}', 404),
                               ("/v2/models/affine/infer", b'{"inputs": [', 400)):
        answered = send("POST", affine.url + path, body, {"Content-Type": "application/json"})
        assert (answered[0], answered[1]["Content-Type"]) == (status, "application/json"), answered
        assert json.loads(answered[2])["error"]
    assert json.loads(send("GET", affine.url + "/v2/")[2]) == json.loads(send("GET", affine.url + "/v2")[2])
    for path in ("/v2/health/live", "/v2/health/ready"):
        assert send("GET", affine.url + path, headers={"Host": "evil.example"})[0] == 200
    for path in ("/v2", "/v2/models/affine", "/v2/models/affine/ready", "/v2/models/affine/infer"):
        status, _, body = http("POST" if path.endswith("infer") else "GET", affine.url + path,
                               headers={"Host": "evil.example"})
        assert status == 403 and "AllowedHosts" in body["error"], path


@pytest.mark.parametrize("fail,message", [
    ("not-a-dict", "postprocess returned list; for an inference request it must return a dict of output name -> array"),
    ("missing", "postprocess returned no output 'total' (it returned y, count, pid)"),
    ("extra", "postprocess returned 'more', which the model's metadata does not list; its outputs are y (FP32 [-1]), "
              "total (FP64 [1]), count (INT64 [1]), pid (INT64 [1])"),
    ("datatype", "output 'count' is BYTES, but its metadata says INT64"),
    ("shape", "output 'total' has shape [2], but its metadata says [1]"),
    ("nan", "output 'y' holds NaN or infinity, which JSON cannot carry; ask for it as binary data "
            "(parameters.binary_data)"),
    ("complex", "output 'y' is an array of complex64, which the protocol has no datatype for; answer their real "
                "and imaginary parts, z.real and z.imag (torch: torch.view_as_real(t))"),
    ("masked", "output 'y' is a masked array, which the protocol has no form for: give array.filled(value), or "
               "array.data"),
    ("number-keys", "postprocess returned a dict whose keys 1 are not strings; for an inference request its keys "
                    "are the outputs' names"),
    ("huge-int", "output 'count' holds the integer 18446744073709551617, which no datatype of the protocol holds "
                 "(64 bits at most)"),
    # it used to escape the worker's encoding: the worker exited, and the batch was run again
    ("unreadable", "postprocess returned a value that could not be read: RuntimeError: Can't call numpy() on Tensor "
                   "that requires grad. Use tensor.detach().numpy() instead. (traceback in worker cpu/0's log)"),
])
def test_a_handle_whose_outputs_break_their_metadata_gets_500_saying_how_and_nan_as_json_400(bad_outputs, fail,
                                                                                              message):
    doc = {"parameters": {"fail": fail}, "inputs": [x_input([1.0, 2.0])]}
    status, _, (answer, _) = infer(bad_outputs.url, doc)
    # NaN is no fault of the handle's: JSON, the form asked for, cannot carry it (binary data can). A
    # handle's is said in the worker's log too, where its 500 points: such 500s left nothing there
    said = "" if fail in ("nan", "unreadable") else " (said in worker cpu/0's log)"
    assert (status, answer) == (400 if fail == "nan" else 500, {"error": message + said})
    if said:
        assert wait_until(lambda: any(message in line.text for line in bad_outputs.logs(tail=None)), 10)
    assert bad_outputs.stats()["restarts"] == 0
    if fail == "nan":  # binary data carries NaN
        doc["parameters"]["binary_data_output"] = True
        status, _, (answer, tail) = infer(bad_outputs.url, doc)
        assert status == 200 and np.isnan(np.frombuffer(tail[:8], np.float32)).all()
    still_serving(bad_outputs.url)


def test_a_handle_that_declares_something_other_than_tensors_does_not_start(serve):
    with pytest.raises(StartupError, match="BadDeclaration.inputs must be a list of easyserve.Tensor, and holds 'x'"):
        with serve("handles_v2:BadDeclaration"):
            pass


def test_a_page_at_a_cors_origin_may_send_binary_inference_and_read_its_answer(serve):
    page = "https://app.example.com"
    with serve("handles_v2:Affine", ModelName="affine", CorsOrigins=[page]) as server:
        preflight = {"Origin": page, "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "content-type, inference-header-content-length"}
        for path in ("/v2/models/affine/infer", "/v2/models/affine/versions/1/infer", "/v2/models/affine", "/v2"):
            status, headers, _ = send("OPTIONS", server.url + path, headers=preflight)
            assert status == 204 and headers["Access-Control-Allow-Origin"] == page, path
            assert "inference-header-content-length" in headers["Access-Control-Allow-Headers"].lower(), path
        doc = {"inputs": [X_BINARY], "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}
        status, headers, (answer, tail) = infer(server.url, doc, THREE, extra={"Origin": page})
        assert status == 200 and np.frombuffer(tail, np.float32).tolist() == [3.0, 5.0, 7.0]
        assert headers["Access-Control-Allow-Origin"] == page
        assert HEADER.lower() in headers["Access-Control-Expose-Headers"].lower()  # the page can find the tail


# -- one queue: statistics, API key, limits, readiness ------------------------------------------------------


def test_inference_answers_are_counted_like_predicts(serve):
    with serve("handles_v2:Affine", ModelName="affine") as server:
        assert infer(server.url, {"inputs": [x_input([1.0])]})[0] == 200
        body, headers = infer_body({"inputs": [x_input([1.0])]})
        assert send("POST", server.url + "/v2/models/affine/versions/1/infer", body, headers)[0] == 200
        assert infer(server.url, {"inputs": [x_input([1.0], "INT8")]})[0] == 400
        assert infer(server.url, {"inputs": [x_input([1.0])]}, model="other")[0] == 404
        assert post_json(server.url + "/predict", {"x": [1.0]})[0] == 200
        for path in ("/v2", "/v2/models/affine", "/v2/health/ready", "/v2/models/affine/ready"):
            assert send("GET", server.url + path)[0] == 200
        stats = server.stats()
    assert stats["statuses"] == {"200": 3, "400": 1, "404": 1}
    assert stats["requests"] == 3  # what reached the queue: the two inferences and the prediction


def test_the_api_key_and_body_limit_hold_for_inference(serve):
    key = "v2-secret-key"
    with serve("handles_v2:Affine", ModelName="affine", ApiKey=key, MaxBodyMB=1) as server:
        assert send("GET", server.url + "/v2/health/live")[0] == send("GET", server.url + "/v2/health/ready")[0] == 200
        assert infer(server.url, {"inputs": [x_input([1.0])]})[0] == 401
        assert send("GET", server.url + "/v2/models/affine")[0] == 401
        client = triton.InferenceServerClient(address(server))
        try:
            tensor = triton.InferInput("x", [2], "FP32")
            tensor.set_data_from_numpy(np.array([1, 2], np.float32))
            with pytest.raises(InferenceServerException, match="requires an API key") as caught:
                client.infer("affine", [tensor])
            assert caught.value.status() == "401"
            result = client.infer("affine", [tensor], headers={"Authorization": f"Bearer {key}"})
            assert result.as_numpy("y").tolist() == [3.0, 5.0]
            big = triton.InferInput("x", [300_000], "FP32")  # 1.2 MB of binary data
            big.set_data_from_numpy(np.zeros(300_000, np.float32))
            with pytest.raises(InferenceServerException, match="body too large") as caught:
                client.infer("affine", [big], headers={"Authorization": f"Bearer {key}"})
            assert caught.value.status() == "413"
        finally:
            client.close()


def test_readiness_tells_the_truth_like_ready(serve, tmp_path):
    down = tmp_path / "db-down"
    with serve("handles_ops:NeedsDatabase", HandleArgs={"down": str(down)}, ModelName="db") as server:
        for path in ("/v2/health/ready", "/v2/models/db/ready"):
            assert send("GET", server.url + path)[0] == 200
        down.touch()
        os.kill(server.workers[0]["pid"], signal.SIGKILL)
        wait_until(lambda: server.workers[0].get("error"), what="the worker to fail to restart")
        for path in ("/v2/health/ready", "/v2/models/db/ready"):
            status, _, raw = send("GET", server.url + path)
            assert status == 400 and json.loads(raw)["ready"] is False and "cpu/0 is " in json.loads(raw)["error"], raw
        assert request(server.url + "/ready")[0] == 503
        assert send("GET", server.url + "/v2/health/live")[0] == 200
        assert json.loads(send("GET", server.url + "/v2/models/db")[2])["name"] == "db"  # metadata is still known
        down.unlink()
        wait_until(lambda: server.workers[0]["state"] == "idle", what="the worker to come back")
        assert send("GET", server.url + "/v2/health/ready")[0] == 200


def test_before_any_worker_has_started_the_model_is_not_known(tmp_path):
    go = tmp_path / "go"
    server = Server(handle="handles_v2:SlowStart", GPUs="cpu", Port=0, ModelName="slow", HandleArgs={"go": str(go)})
    starting = threading.Thread(target=server.start, kwargs={"timeout": 60})
    starting.start()
    try:
        wait_until(lambda: server.port, what="the server to listen")
        url = f"http://127.0.0.1:{server.port}"
        for method, path in (("GET", "/v2/models/slow"), ("POST", "/v2/models/slow/infer")):
            status, headers, raw = send(method, url + path, json.dumps({"inputs": [x_input([1.0])]}).encode())
            assert status == 503
            assert json.loads(raw) == {"error": "model 'slow' is not loaded yet: no worker has started"}
            assert headers["Retry-After"] == "1"
        assert send("GET", url + "/v2/health/ready")[0] == 400
    finally:
        go.touch()
        starting.join(60)
        server.stop()


def test_a_handle_names_the_platform_its_metadata_gives():
    from easyserve import Handle

    class Torch(Handle):
        platform = "pytorch_libtorch"

    assert Signature.of(Torch).platform == "pytorch_libtorch"
    assert Signature.of(Torch()).platform == "pytorch_libtorch"
    assert Signature.of(Handle).platform == "easyserve"
    assert Signature.of(type("Odd", (Handle,), {"platform": 3})).platform == "easyserve"  # not a name: ignored


def test_the_built_in_demo_speaks_v2_with_its_metadata(serve):
    with serve("easyserve.builtin:Demo") as server:
        metadata = http("GET", server.url + "/v2/models/Demo")[2]
        body = {"id": "7", "inputs": [{"name": "x", "datatype": "FP32", "shape": [4], "data": [5.1, 3.5, 1.4, 0.2]}]}
        status, _, answer = http("POST", server.url + "/v2/models/Demo/infer", json=body)
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert [t["name"] for t in metadata["outputs"]] == ["scores", "class", "label"]
    assert status == 200 and answer["id"] == "7"
    outputs = {t["name"]: t["data"] for t in answer["outputs"]}
    assert outputs["label"] == ["setosa"] and outputs["class"] == [0]  # what /predict answers, in the README
    assert outputs["scores"][0] == pytest.approx(0.984557, abs=1e-6)


def test_a_request_read_before_a_reload_renames_an_output_is_checked_against_the_model_that_runs_it(serve, tmp_path):
    """A request is read and checked against the metadata the server knows as it arrives. One that waited
    in the queue through a reload whose model renamed an output (y to z) ran on the new model, which
    gave no y: a 500 blaming the handle, where the request is the client's to change (400), as it is
    for one that arrives after the reload."""
    from conftest import Background

    gate = tmp_path / "gate"
    x = {"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2]}
    with serve("handles_v2:Gated", HandleArgs={"gate": str(gate)}, ModelName="m", ProcessPerGPU=1,
               MaxBatchSize=1) as server:
        url = server.url + "/v2/models/m/infer"
        gate.touch()
        first = Background(lambda: post_json(url, {"inputs": [x]}))
        wait_until(lambda: server.workers[0]["state"] == "busy", what="the first request to hold the worker")
        second = Background(lambda: post_json(url, {"inputs": [x], "outputs": [{"name": "y"}]}))
        wait_until(lambda: server.stats()["queue_depth"] == 1, what="the second request to wait in the queue")
        reloading = Background(lambda: server.reload(handle="handles_v2:Renamed"))
        waited = second.result(60)
        gate.unlink()
        assert first.result(30)[0] == 200
        reloading.result(60)
        after = post_json(url, {"inputs": [x], "outputs": [{"name": "y"}]})
    refused = (400, {"error": "the model has no output 'y'; its outputs are z (FP32 [-1]), total (FP64 [1]), "
                              "count (INT64 [1]), pid (INT64 [1])"})
    assert after == refused
    assert waited == refused
