"""Any ONNX model served as it is (``OnnxModel``, ``easyserve run model.onnx``): its inputs and
outputs read from the file, requests batched, each answered with its own rows."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import http, post_json, post_many, request, wait_until
from onnx import TensorProto, helper, numpy_helper
from test_cli import easyserve, wait_for_url

from easyserve import ConfigError, Server


def _save(tmp_path, name: str, nodes: list, inputs: list, outputs: list, initializers: list = ()) -> str:
    graph = helper.make_graph(nodes, name, inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / f"{name}.onnx"
    path.write_bytes(model.SerializeToString())
    return str(path)


def _one_item(tensors: list[dict]) -> list[dict]:
    """The metadata's tensors as one item of a request gives them: each shape without the batch's leading
    -1, which the metadata lists as Triton lists a batching model's."""
    assert all(t["shape"][:1] == [-1] for t in tensors), tensors
    return [{**t, "shape": t["shape"][1:]} for t in tensors]


def _batched(server, bodies: list, concurrency: int) -> list:
    """POST ``bodies`` until the server has formed a batch of more than one (on busy cores they may come
    one at a time, each running alone, so they are sent again, up to 5 times); the last answers."""
    for _ in range(5):
        answers = post_many(server.url + "/predict", bodies, concurrency=concurrency)
        if max(int(size) for size in server.stats()["batch_sizes"]) > 1:
            break
    assert max(int(size) for size in server.stats()["batch_sizes"]) > 1, "no batch of more than one formed"
    return answers


def scale_and_sum(tmp_path, times: float = 1.0) -> str:
    """a (FP32 [N, 3]) times b (INT64 [N]) (and ``times``): scaled [N, 3] and its row sums, total [N]."""
    return _save(tmp_path, "scale_and_sum", [
        helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["bf", "one"], ["column"]),
        helper.make_node("Mul", ["a", "column"], ["product"]),
        helper.make_node("Mul", ["product", "times"], ["scaled"]),
        helper.make_node("ReduceSum", ["scaled", "one"], ["total"], keepdims=0),
    ], [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3]),
        helper.make_tensor_value_info("b", TensorProto.INT64, ["N"])],
       [helper.make_tensor_value_info("scaled", TensorProto.FLOAT, ["N", 3]),
        helper.make_tensor_value_info("total", TensorProto.FLOAT, ["N"])],
       [numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.array(times, np.float32), "times")])


def test_an_onnx_file_is_served_as_it_is_each_request_answered_with_its_own_rows(serve, tmp_path, caplog):
    caplog.set_level("WARNING", logger="easyserve")
    with serve("OnnxModel", HandleArgs={"model": scale_and_sum(tmp_path)}, MaxBatchSize=8, MaxWaitMs=20) as server:
        url = server.url
        bodies = [{"a": [i, i + 0.5, -i], "b": i % 5} for i in range(32)]
        answers = _batched(server, bodies, concurrency=16)
        for body, (status, answer) in zip(bodies, answers):  # batched, and each its rows
            expected = [x * body["b"] for x in body["a"]]
            assert status == 200 and answer == {"scaled": expected, "total": sum(expected)}, (body, answer)
        # a leading batch dimension of 1, as a client used to batches sends one
        assert post_json(url + "/predict", {"a": [[1, 2, 3]], "b": [2]}) == (200, {"scaled": [2, 4, 6], "total": 12})

        # the Open Inference Protocol: metadata read from the model, one item a request
        status, _, meta = http("GET", url + "/v2/models/OnnxModel")
        assert status == 200 and meta["platform"] == "onnxruntime_onnx"  # as Triton names what runs it
        assert _one_item(meta["inputs"]) == [{"name": "a", "datatype": "FP32", "shape": [3]},
                                  {"name": "b", "datatype": "INT64", "shape": []}]
        assert _one_item(meta["outputs"]) == [{"name": "scaled", "datatype": "FP32", "shape": [3]},
                                   {"name": "total", "datatype": "FP32", "shape": []}]
        status, _, answer = http("POST", url + "/v2/models/OnnxModel/infer", json={"inputs": [
            {"name": "a", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]},
            {"name": "b", "datatype": "INT64", "shape": [1], "data": [3]}]})
        assert status == 200, answer
        assert {o["name"]: o["data"] for o in answer["outputs"]} == {"scaled": [3, 6, 9], "total": [18]}
    assert "HandleArgs:" not in caplog.text  # its model, taken by its __init__, was read


def test_what_the_model_cannot_take_is_a_400_saying_what_it_takes(serve, tmp_path):
    with serve("OnnxModel", HandleArgs={"model": scale_and_sum(tmp_path)}) as server:
        url = server.url + "/predict"
        takes = "a (FP32 [3]), b (INT64 [])"
        for body, said in [
            ({"a": [1, 2, 3]}, f"missing input 'b': the model takes {takes}, e.g. {{\"a\": [0, 0, 0], \"b\": 0}}"),
            ({"a": [1, 2, 3], "b": 1, "c": 2}, f"the model has no input 'c'; its inputs are {takes}"),
            ({"a": [1, 2, 3, 4], "b": 1}, "input 'a' has shape [4], and the model takes [3] for one request"),
            ({"a": [[1, 2, 3], [4, 5, 6]], "b": 1}, "input 'a' has shape [2, 3], and the model takes [3]"),
            ({"a": [1, 2, 3], "b": 1.5}, "input 'b': "),
            ({"a": [1, [2], 3], "b": 1}, "input 'a': "),
            ({"a": [1, "x", 3], "b": 1}, "input 'a': "),
            ({"a": [1, 2, 1e39], "b": 1}, "input 'a': 1e+39 is out of range for FP32"),
        ]:
            status, answer = post_json(url, body)
            assert status == 400 and said in answer["error"], (body, answer)
        # a body that is no JSON object is shown the model's inputs, where it was shown an image's: small,
        # large (decoded by the worker) and empty
        for body, said in [(b"[1, 2, 3]", 'body must be a JSON object such as {"a": [0, 0, 0], "b": 0}, not a JSON '
                                          "array"),
                           (b"[" + b"1, " * 40_000 + b"1]", 'body must be a JSON object such as {"a": [0, 0, 0], '),
                           (b"", 'empty body: send a JSON object such as {"a": [0, 0, 0], "b": 0}, raw bytes')]:
            status, _, answer = request(url, body, {"Content-Type": "application/json"})
            assert status == 400 and said in answer["error"], answer
        # a tensor body is for a model of one input
        array = io.BytesIO()
        np.save(array, np.ones(3, np.float32))
        status, _, answer = request(url, array.getvalue(), {"Content-Type": "application/x-npy"})
        assert status == 400 and f"a tensor body is for a model of one input; this one takes {takes}" in answer["error"]
        status, _, answer = request(url, b"\xff\xd8\xff", {"Content-Type": "image/jpeg"})
        assert status == 400 and "a body of type image/jpeg is not a tensor: send .npy" in answer["error"]
        assert post_json(url, {"a": [1, 2, 3], "b": 2}) == (200, {"scaled": [2, 4, 6], "total": 12})
    ids = _save(tmp_path, "ids", [helper.make_node("Identity", ["ids"], ["same"])],
                [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 2])],
                [helper.make_tensor_value_info("same", TensorProto.INT64, ["N", 2])])
    with serve("OnnxModel", HandleArgs={"model": ids}) as server:
        body = io.BytesIO()
        np.save(body, np.array([1.5, 2], np.float32))
        status, _, answer = request(server.url + "/predict", body.getvalue(), {"Content-Type": "application/x-npy"})
        assert status == 400 and "input 'ids' is INT64; float32 does not convert to it" in answer["error"]
        np.save(body := io.BytesIO(), np.array([2**63, 1], np.uint64))  # it wrapped to -2**63
        status, _, answer = request(server.url + "/predict", body.getvalue(), {"Content-Type": "application/x-npy"})
        assert status == 400 and "input 'ids': 9223372036854775808 is out of range for INT64" in answer["error"]
        np.save(body := io.BytesIO(), np.array([7, 8], np.uint8))  # an integer of any size does
        status, _, answer = request(server.url + "/predict", body.getvalue(), {"Content-Type": "application/x-npy"})
        assert (status, answer) == (200, {"same": [7, 8]})
    pixels = _save(tmp_path, "pixels", [helper.make_node("Identity", ["x"], ["same"])],
                   [helper.make_tensor_value_info("x", TensorProto.UINT8, ["N", 2])],
                   [helper.make_tensor_value_info("same", TensorProto.UINT8, ["N", 2])])
    with serve("OnnxModel", HandleArgs={"model": pixels}) as server:
        # signed integers for an unsigned input, as numpy's arithmetic leaves pixels: refused whatever they held
        np.save(body := io.BytesIO(), np.array([0, 255], np.int64))
        status, _, answer = request(server.url + "/predict", body.getvalue(), {"Content-Type": "application/x-npy"})
        assert (status, answer) == (200, {"same": [0, 255]})
        np.save(body := io.BytesIO(), np.array([-1, 3], np.int64))
        status, _, answer = request(server.url + "/predict", body.getvalue(), {"Content-Type": "application/x-npy"})
        assert status == 400 and "input 'x': -1 is out of range for UINT8 (0 to 255)" in answer["error"], answer


def test_a_model_with_a_fixed_batch_of_one_runs_each_request_alone_and_takes_a_tensor_body(serve, tmp_path):
    doubled = _save(tmp_path, "doubled", [helper.make_node("Mul", ["x", "two"], ["y"])],
                    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
                    [numpy_helper.from_array(np.array(2, np.float32), "two")])
    with serve("OnnxModel", HandleArgs={"model": doubled}, MaxBatchSize=4, MaxWaitMs=20) as server:
        bodies = [{"x": [i, -i]} for i in range(12)]
        answers = post_many(server.url + "/predict", bodies, concurrency=12)
        assert answers == [(200, {"y": [2 * i, -2 * i]}) for i in range(12)]
        body = io.BytesIO()
        np.save(body, np.array([1e39, 2]))  # a float64 past FP32's range: it was cast to infinity
        status, _, answer = request(server.url + "/predict", body.getvalue(), {"Content-Type": "application/x-npy"})
        assert status == 400 and "input 'x': 1e+39 is out of range for FP32" in answer["error"], answer
        for array in (np.array([1.5, 2], np.float32), np.array([3, 4], np.uint8), np.array([[5, 6]], np.float64)):
            body = io.BytesIO()
            np.save(body, array)
            status, _, answer = request(server.url + "/predict", body.getvalue(), {"Content-Type": "application/x-npy"})
            assert status == 200 and answer == {"y": (2 * array.reshape(2)).tolist()}, answer
        status, _, meta = http("GET", server.url + "/v2/models/OnnxModel")
        assert _one_item(meta["inputs"]) == [{"name": "x", "datatype": "FP32", "shape": [2]}]


def test_a_file_or_a_tensor_of_numbers_where_the_model_takes_otherwise_is_a_400(serve, tmp_path):
    with serve("OnnxModel", HandleArgs={"model": scale_and_sum(tmp_path)}) as server:
        form = (b'--b\r\nContent-Disposition: form-data; name="a"; filename="a.bin"\r\n'
                b'Content-Type: application/octet-stream\r\n\r\n\x01\x02\x03\r\n'
                b'--b\r\nContent-Disposition: form-data; name="b"\r\n\r\n1\r\n--b--\r\n')
        status, _, answer = request(server.url + "/predict", form, {"Content-Type": "multipart/form-data; boundary=b"})
        assert status == 400 and "input 'a' is FP32: send it as numbers (JSON) or as a tensor, not a file" in \
            answer["error"], answer
        assert post_json(server.url + "/predict", {"a": [1, 2, 3], "b": 2})[0] == 200
    words = _save(tmp_path, "words", [helper.make_node("Identity", ["s"], ["same"])],
                  [helper.make_tensor_value_info("s", TensorProto.STRING, ["N", 1])],
                  [helper.make_tensor_value_info("same", TensorProto.STRING, ["N", 1])])
    with serve("OnnxModel", HandleArgs={"model": words}) as server:
        np.save(body := io.BytesIO(), np.ones(1, np.float32))
        status, _, answer = request(server.url + "/predict", body.getvalue(), {"Content-Type": "application/x-npy"})
        assert status == 400 and "input 's' takes strings, got float32" in answer["error"], answer
        assert post_json(server.url + "/predict", {"s": ["text"]}) == (200, {"same": ["text"]})


def test_a_tensor_past_an_fp16_inputs_range_is_a_400_however_numpy_rounds_it(serve, tmp_path, caplog):
    """65519 rounds to float16's largest, 65504: numpy 2 compared it as a float16 and let it through (and a
    value past float32's was cast, with an overflow warning in the log, only to be compared)."""
    half = _save(tmp_path, "half", [helper.make_node("Identity", ["x"], ["y"])],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 1])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 1])])
    with serve("OnnxModel", HandleArgs={"model": half}) as server:
        for values, said in [(np.array([65519.0]), "65519.0 is out of range for FP16"),
                             (np.array([65505]), "65505 is out of range for FP16"),
                             (np.array([-1e39]), "-1e+39 is out of range for FP16")]:
            np.save(body := io.BytesIO(), values)
            status, _, answer = request(server.url + "/predict", body.getvalue(), {"Content-Type": "application/x-npy"})
            assert status == 400 and said in answer["error"], (values, answer)
        np.save(body := io.BytesIO(), np.array([65504.0]))
        status, _, answer = request(server.url + "/predict", body.getvalue(), {"Content-Type": "application/x-npy"})
        assert (status, answer) == (200, {"y": [65504.0]})
    assert "overflow" not in caplog.text


@pytest.mark.parametrize("args, said", [
    ({}, "OnnxModel needs the model: HandleArgs: {model: path/to/model.onnx}"),
    ({"model": 5}, "OnnxModel: model must be the path to an .onnx file (or its bytes), got 5"),
    ({"model": ["m.onnx"]}, "OnnxModel: model must be the path to an .onnx file (or its bytes), got ['m.onnx']"),
], ids=["no model", "a number", "a list"])
def test_an_onnx_model_without_a_model_path_is_refused_at_start_saying_what_to_give(serve, args, said):
    with pytest.raises(ConfigError, match=re.escape(said)):
        with serve("OnnxModel", HandleArgs=args):
            pass


def test_a_model_file_without_its_inputs_shapes_is_refused_at_start_saying_how_to_export_it(serve, tmp_path):
    shapeless = _save(tmp_path, "shapeless", [helper.make_node("Relu", ["x"], ["y"])],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    with pytest.raises(ConfigError, match=re.escape("OnnxModel: the model file gives 'x', 'y' no shape (any rank); "
                                                    "OnnxModel needs each input's and output's rank: export the "
                                                    "model with its inputs' shapes")):
        with serve("OnnxModel", HandleArgs={"model": shapeless}):
            pass


def test_a_string_input_of_one_elements_example_is_a_list_as_onnx_model_takes_it(serve, tmp_path):
    """The example handles read their picture, a BYTES [1] input, as one string; told so, a client of an
    ONNX model of a [N, 1] string input sent one, and got another 400 ("has shape []")."""
    words = _save(tmp_path, "words", [helper.make_node("Identity", ["s"], ["same"])],
                  [helper.make_tensor_value_info("s", TensorProto.STRING, ["N", 1])],
                  [helper.make_tensor_value_info("same", TensorProto.STRING, ["N", 1])])
    with serve("OnnxModel", HandleArgs={"model": words}) as server:
        status, _, refused = request(server.url + "/predict", b"[1]", {"Content-Type": "application/json"})
        assert status == 400 and 'such as {"s": ["text"]}, not a JSON array' in refused["error"], refused
        assert post_json(server.url + "/predict", {"s": ["text"]}) == (200, {"same": ["text"]})


def test_sequences_of_other_lengths_in_one_batch_and_strings_each_get_their_own_answer(serve, tmp_path):
    lengths = _save(tmp_path, "lengths", [
        helper.make_node("ReduceSum", ["tokens", "one"], ["total"], keepdims=0),
        helper.make_node("Identity", ["word"], ["same"]),
    ], [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["N", "T"]),
        helper.make_tensor_value_info("word", TensorProto.STRING, ["N"])],
       [helper.make_tensor_value_info("total", TensorProto.INT64, ["N"]),
        helper.make_tensor_value_info("same", TensorProto.STRING, ["N"])],
       [numpy_helper.from_array(np.array([1], np.int64), "one")])
    with serve("OnnxModel", HandleArgs={"model": lengths}, MaxBatchSize=8, MaxWaitMs=30) as server:
        bodies = [{"tokens": list(range(1, 2 + i % 4)), "word": f"w{i}é"} for i in range(16)]
        answers = _batched(server, bodies, concurrency=16)
        assert answers == [(200, {"total": sum(b["tokens"]), "same": b["word"]}) for b in bodies]
        # requests of other lengths in a batch ran one by one, not as a batch that failed first
        assert "Traceback" not in str(server.logs(tail=None)), server.logs(tail=None)
        # one string in a batch of one, as JSON and as the protocol's clients send it
        answer = post_json(server.url + "/predict", {"tokens": [[4, 5]], "word": ["one"]})
        assert answer == (200, {"total": 9, "same": "one"})
        status, _, answer = http("POST", server.url + "/v2/models/OnnxModel/infer", json={"inputs": [
            {"name": "tokens", "datatype": "INT64", "shape": [1, 2], "data": [4, 5]},
            {"name": "word", "datatype": "BYTES", "shape": [1], "data": ["one"]}]})
        assert status == 200 and {o["name"]: o["data"] for o in answer["outputs"]} == {"total": [9], "same": ["one"]}
        # bytes that are not text: ONNX Runtime's strings are text, and replaced by U+FFFD the model
        # answered for other bytes than those sent, with a 200
        header = json.dumps({"inputs": [
            {"name": "tokens", "datatype": "INT64", "shape": [1], "data": [4]},
            {"name": "word", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 8}}]}).encode()
        status, _, answer = http("POST", server.url + "/v2/models/OnnxModel/infer",
                                 data=header + struct.pack("<I", 4) + b"caf\xe9",
                                 headers={"Inference-Header-Content-Length": str(len(header))})
        assert status == 400 and "input 'word' holds bytes that are not UTF-8 text" in answer["error"], answer
        status, _, meta = http("GET", server.url + "/v2/models/OnnxModel")
        assert _one_item(meta["inputs"]) == [{"name": "tokens", "datatype": "INT64", "shape": [-1]},
                                  {"name": "word", "datatype": "BYTES", "shape": []}]


def test_easyserve_run_serves_an_onnx_file_given_in_place_of_a_config(tmp_path):
    model = scale_and_sum(tmp_path)
    lines: list[str] = []
    with easyserve("run", model, "--port", "0", "--gpus", "cpu") as proc:
        try:
            url = wait_for_url(proc, lines)
            assert request(url + "/ready")[0] == 200
            assert post_json(url + "/predict", {"a": [1, 2, 3], "b": 2}) == (200, {"scaled": [2, 4, 6], "total": 12})
            status, _, meta = http("GET", url + "/v2/models/scale_and_sum")  # named after its file
            assert status == 200 and [t["name"] for t in meta["outputs"]] == ["scaled", "total"]
            # a new model in its place, and SIGHUP: loaded again, the workers replaced one at a time
            scale_and_sum(tmp_path, times=10)
            proc.send_signal(signal.SIGHUP)
            answers: list = []

            def answered_by_the_new_model() -> bool:
                answers.append(post_json(url + "/predict", {"a": [1, 2, 3], "b": 2}))
                return answers[-1] == (200, {"scaled": [20, 40, 60], "total": 120})

            wait_until(answered_by_the_new_model, 30, "the new model's answer")
            assert {status for status, _ in answers} == {200}, answers
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 0
        finally:
            proc.kill()


# a handle written as the README's: device.onnx_session(self.args["model"]), a relative path
SESSION_HANDLE = textwrap.dedent("""
    import numpy as np
    from easyserve import Handle

    class Session(Handle):
        def setup(self, device):
            self.session = device.onnx_session(self.args["model"])
        def preprocess(self, task):
            return np.asarray(task["task_info"]["a"], np.float32)
        def forward(self, batch):
            return self.session.run(["total"], {"a": batch, "b": np.ones(len(batch), np.int64)})[0]
""")


def test_a_config_finds_the_module_and_the_files_it_names_beside_it_from_any_directory(tmp_path, monkeypatch):
    """A config that works from its own folder works from any other (``cd /``, systemd): a "module:Class"
    handle, a module it imports, a HandleArgs file opened with ``device.path`` and OnnxModel's model are
    all looked for beside the config, where they were looked for only from the current directory."""
    app, elsewhere = tmp_path / "app", tmp_path / "elsewhere"
    app.mkdir()
    elsewhere.mkdir()
    (app / "words.py").write_text("PREFIX = 'tagged'\n")
    (app / "table.json").write_text('{"a": 1, "b": 2}')
    (app / "tagger.py").write_text(textwrap.dedent("""
        import json
        from easyserve import Handle
        from words import PREFIX

        class Tagger(Handle):
            def setup(self, device):
                self.table = json.loads(device.path(self.args["table"]).read_text())
            def preprocess(self, task):
                return task["task_info"]["key"]
            def forward(self, batch):
                return [f"{PREFIX} {self.table[key]}" for key in batch]
    """))
    (app / "tagger.yaml").write_text("Handle: tagger:Tagger\nHandleArgs: {table: table.json}\nGPUs: cpu\nPort: 0\n")
    assert Path(scale_and_sum(app)).name == "scale_and_sum.onnx"
    (app / "onnx.yaml").write_text("Handle: OnnxModel\nHandleArgs: {model: scale_and_sum.onnx}\nGPUs: cpu\nPort: 0\n")
    monkeypatch.chdir(elsewhere)
    with Server.from_yaml(app / "tagger.yaml") as server:
        assert post_json(server.url + "/predict", {"key": "b"}) == (200, "tagged 2")
    with Server.from_yaml(app / "onnx.yaml") as server:
        assert post_json(server.url + "/predict", {"a": [1, 2, 3], "b": 2}) == (200, {"scaled": [2, 4, 6], "total": 12})
    (app / "session.py").write_text(SESSION_HANDLE)
    (app / "session.yaml").write_text("Handle: session:Session\nHandleArgs: {model: scale_and_sum.onnx}\n"
                                      "GPUs: cpu\nPort: 0\n")
    with Server.from_yaml(app / "session.yaml") as server:
        assert post_json(server.url + "/predict", {"a": [1, 2, 3]}) == (200, 6)
    # a file in no place: the error names each, once
    (app / "gone.yaml").write_text("Handle: OnnxModel\nHandleArgs: {model: gone.onnx}\nGPUs: cpu\nPort: 0\n")
    looked = f"{app / 'gone.onnx'}, {elsewhere / 'gone.onnx'}, {tmp_path / 'gone.onnx'}"
    with pytest.raises(ConfigError, match=re.escape(f"no model file 'gone.onnx' (looked for {looked})")):
        Server.from_yaml(app / "gone.yaml").start()
    monkeypatch.chdir(app)
    looked = f"{app / 'gone.onnx'}, {tmp_path / 'gone.onnx'})"
    with pytest.raises(ConfigError, match=re.escape(f"no model file 'gone.onnx' (looked for {looked}")):
        Server.from_yaml(app / "gone.yaml").start()


def test_a_project_s_config_finds_its_model_from_the_project_root_wherever_it_runs(tmp_path, monkeypatch):
    # README's layout: configs/classifier.yaml names models/..., a path from the project's root, and
    # handles/ one folder up from the config is where the handle is found. The model was looked for
    # beside the config and in the current directory only, and ONNX Runtime's error named one place.
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    for folder in ("configs", "handles", "models"):
        (project / folder).mkdir(parents=True)
    elsewhere.mkdir()
    scale_and_sum(project / "models")
    (project / "handles" / "session.py").write_text(SESSION_HANDLE)
    config = project / "configs" / "session.yaml"
    config.write_text("Handle: Session\nHandleArgs: {model: models/scale_and_sum.onnx}\nGPUs: cpu\nPort: 0\n")
    monkeypatch.chdir(elsewhere)
    with Server.from_yaml(config) as server:
        assert post_json(server.url + "/predict", {"a": [1, 2, 3]}) == (200, 6)
    # in none of them: the config's mistake, in one line naming each (ONNX Runtime's named one, and
    # --supervise started the server again and again)
    config.write_text("Handle: Session\nHandleArgs: {model: models/gone.onnx}\nGPUs: cpu\nPort: 0\n")
    with pytest.raises(ConfigError) as caught:
        Server.from_yaml(config).start()
    looked = ", ".join(str(place / "models" / "gone.onnx") for place in (project / "configs", elsewhere, project))
    assert str(caught.value) == f"no model file 'models/gone.onnx' (looked for {looked})"


@pytest.mark.parametrize("content", [None, b"not a model"])
def test_a_missing_or_broken_model_file_fails_the_start_saying_so(tmp_path, content):
    path = tmp_path / "model.onnx"
    if content is not None:
        path.write_bytes(content)
    with easyserve("run", str(path), "--port", "0", "--gpus", "cpu") as proc:
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 2, out
    said = f"no model file {str(path)!r}" if content is None else f"ONNX Runtime cannot load {str(path)!r}"
    assert said in out, out


def test_an_output_with_a_first_dimension_of_its_own_is_not_split_among_requests(serve, tmp_path):
    """A detector's boxes (first dimension num_boxes, not the batch's): split by rows, a batch's boxes
    would go to requests by position, each given others' boxes, or none. Such a model runs each
    request alone, unless the HandleArgs say it batches."""
    flat = _save(tmp_path, "flat", [helper.make_node("Reshape", ["x", "shape"], ["y"])],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["num_values"])],
                 [numpy_helper.from_array(np.array([-1], np.int64), "shape")])
    with serve("OnnxModel", HandleArgs={"model": flat}, MaxBatchSize=8, MaxWaitMs=30) as server:
        bodies = [{"x": [i, -i]} for i in range(16)]
        # batches, run a request at a time
        assert _batched(server, bodies, concurrency=16) == [(200, {"y": b["x"]}) for b in bodies]
        status, _, meta = http("GET", server.url + "/v2/models/OnnxModel")
        assert _one_item(meta["inputs"]) == [{"name": "x", "datatype": "FP32", "shape": [2]}]
        assert _one_item(meta["outputs"]) == [{"name": "y", "datatype": "FP32", "shape": [-1]}]
    # told that it batches, a model is run on the batch: here, one whose output really has its rows
    with serve("OnnxModel", HandleArgs={"model": scale_and_sum(tmp_path), "batched": True}, MaxBatchSize=8,
               MaxWaitMs=30) as server:
        bodies = [{"a": [i, 1, 2], "b": 2} for i in range(16)]
        answers = post_many(server.url + "/predict", bodies, concurrency=16)
        assert answers == [(200, {"scaled": [2 * i, 2, 4], "total": 2 * i + 6}) for i in range(16)]
    with pytest.raises(Exception, match="OnnxModel: batched must be true or false"):
        with serve("OnnxModel", HandleArgs={"model": flat, "batched": "yes"}):
            pass


def test_an_output_that_is_not_a_tensor_is_left_out_and_said_so(serve, tmp_path, caplog):
    """scikit-learn's classifiers give their probabilities as a ZipMap (a sequence of maps) beside a
    label tensor: served, the label; the ZipMap left out, with a warning, not the whole model refused."""
    import logging

    caplog.set_level(logging.WARNING, logger="easyserve")
    zip_type = helper.make_sequence_type_proto(
        helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])))
    graph = helper.make_graph(
        [helper.make_node("ArgMax", ["x"], ["label"], axis=1, keepdims=0),
         helper.make_node("ZipMap", ["x"], ["probabilities"], domain="ai.onnx.ml", classlabels_int64s=[0, 1, 2])],
        "sklearn_like", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
         helper.make_value_info("probabilities", zip_type)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("ai.onnx.ml", 1)])
    model.ir_version = 8
    with serve("OnnxModel", HandleArgs={"model": model}, MaxBatchSize=4, MaxWaitMs=20) as server:
        bodies = [{"x": [0.1, 0.2, 0.3][i % 3:] + [0.1, 0.2, 0.3][:i % 3]} for i in range(8)]
        answers = post_many(server.url + "/predict", bodies, concurrency=8)
        assert answers == [(200, {"label": int(np.argmax(b["x"]))}) for b in bodies]
        assert "OnnxModel: the model's output(s) 'probabilities' not served: only tensors of the types" in caplog.text
        assert "skl2onnx's options={id(model): {'zipmap': False}} for its probabilities as a tensor" in caplog.text
    # a bfloat16 output is a tensor, which ONNX Runtime's Python API cannot give: the warning said "only
    # tensors are", and a model of that output alone had "no tensor output"
    caplog.clear()
    halves = _save(tmp_path, "bf16", [helper.make_node("Cast", ["x"], ["half"], to=TensorProto.BFLOAT16),
                                      helper.make_node("Relu", ["x"], ["y"])],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                   [helper.make_tensor_value_info("half", TensorProto.BFLOAT16, ["N", 3]),
                    helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    with serve("OnnxModel", HandleArgs={"model": halves}) as server:
        assert post_json(server.url + "/predict", {"x": [-1, 0, 2]}) == (200, {"y": [0, 0, 2]})
    assert "cannot return bfloat16 to Python: export the output as float16 or float32 (a Cast node)" in caplog.text
    alone = _save(tmp_path, "bf16_alone", [helper.make_node("Cast", ["x"], ["half"], to=TensorProto.BFLOAT16)],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                  [helper.make_tensor_value_info("half", TensorProto.BFLOAT16, ["N", 3])])
    with pytest.raises(ConfigError, match=r"no tensor output to answer with \(half: tensor\(bfloat16\)\); ONNX Runtime "
                                          "cannot return bfloat16"):
        with serve("OnnxModel", HandleArgs={"model": alone}):
            pass
    # nor be given one: requests carry BF16 now, and "a type easyserve's requests do not carry" would mislead
    taking = _save(tmp_path, "bf16_in", [helper.make_node("Cast", ["half"], ["y"], to=TensorProto.FLOAT)],
                   [helper.make_tensor_value_info("half", TensorProto.BFLOAT16, ["N", 3])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    with pytest.raises(ConfigError, match=r"input 'half' is a tensor of bfloat16, which ONNX Runtime's Python API "
                                          r"cannot be given: export it as float16 or float32"):
        with serve("OnnxModel", HandleArgs={"model": taking}):
            pass


def test_an_export_naming_its_outputs_dimensions_otherwise_is_batched_after_a_trial_run(serve, tmp_path, caplog):
    """torch.onnx.export with a dynamic batch axis on the input only names the output's first dimension
    after the operation that makes it: batched after a trial run shows that the output follows the
    batch. A model with a scalar input cannot take a batch: each request runs alone."""
    import logging

    caplog.set_level(logging.INFO, logger="easyserve")
    weights = np.arange(12, dtype=np.float32).reshape(4, 3)
    linear = _save(tmp_path, "linear", [helper.make_node("Gemm", ["x", "W"], ["logits"]),
                                        helper.make_node("Mul", ["logits", "two"], ["scaled"])],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch_size", 4])],
                   [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["Gemmlogits_dim_0", 3]),
                    helper.make_tensor_value_info("scaled", TensorProto.FLOAT, ["Mulscaled_dim_0", 3])],
                   [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(np.array(2, np.float32), "two")])
    with serve("OnnxModel", HandleArgs={"model": linear}, MaxBatchSize=8, MaxWaitMs=30) as server:
        bodies = [{"x": [i, 0, 0, 1]} for i in range(16)]
        answers = _batched(server, bodies, concurrency=16)
        expected = [(np.array(b["x"], np.float32) @ weights).tolist() for b in bodies]
        assert answers == [(200, {"logits": e, "scaled": [2 * v for v in e]}) for e in expected]
        status, _, meta = http("GET", server.url + "/v2/models/OnnxModel")
        assert _one_item(meta["outputs"]) == [{"name": "logits", "datatype": "FP32", "shape": [3]},
                                   {"name": "scaled", "datatype": "FP32", "shape": [3]}]
    assert "OnnxModel: requests batched: every output followed the batch in a trial run" in caplog.text

    scaled = _save(tmp_path, "scaled", [helper.make_node("Mul", ["x", "scale"], ["y"])],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2]),
                    helper.make_tensor_value_info("scale", TensorProto.FLOAT, [])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])])
    with serve("OnnxModel", HandleArgs={"model": scaled}, MaxBatchSize=8, MaxWaitMs=30) as server:
        bodies = [{"x": [[i, 1]], "scale": i} for i in range(8)]  # x as the model takes it: [N, 2]
        answers = post_many(server.url + "/predict", bodies, concurrency=8)
        assert answers == [(200, {"y": [[i * i, i]]}) for i in range(8)]
        status, _, answer = http("POST", server.url + "/v2/models/OnnxModel/infer", json={"inputs": [
            {"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [3, 1]},
            {"name": "scale", "datatype": "FP32", "shape": [], "data": [2]}]})
        assert status == 200 and answer["outputs"][0]["data"] == [6, 2], answer
    assert "OnnxModel: each request runs alone: not every input's first dimension is left open" in caplog.text


def test_an_output_json_cannot_carry_is_a_400_naming_it_and_the_way_to_get_it(serve, tmp_path):
    """The model's answer for this input, which binary data carries: no fault of the server's (it was a
    500, with a traceback logged each time, so a client could raise the error rate at will)."""
    logarithm = _save(tmp_path, "logarithm", [helper.make_node("Log", ["x"], ["y"])],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    with serve("OnnxModel", HandleArgs={"model": logarithm}) as server:
        status, answer = post_json(server.url + "/predict", {"x": [0, 1, -1]})
        assert status == 400 and "output 'y' holds NaN or infinity for this input, which JSON cannot carry" in (
            answer["error"])
        assert "binary_data_output" in answer["error"]
        assert post_json(server.url + "/predict", {"x": [1, 1, 1]}) == (200, {"y": [0, 0, 0]})


def test_a_sweep_serves_an_onnx_file_with_each_setting(tmp_path):
    """``easyserve bench model.onnx --sweep``: the settings compared on the model as it is."""
    from easyserve import sweep

    report = sweep(scale_and_sum(tmp_path), {"a": [1, 2, 3], "b": 2}, process_per_gpu=[1], max_batch_size=[1, 8],
                   concurrency=8, duration=1, warmup=0.3, progress=False, GPUs="cpu")
    assert [run.settings["MaxBatchSize"] for run in report.runs] == [1, 8]
    assert all(run.statuses == {"200": run.requests} for run in report.runs), [run.statuses for run in report.runs]


def test_a_value_the_model_refuses_is_a_400_for_its_request_alone(serve, tmp_path):
    # ONNX Runtime's INVALID_ARGUMENT for inputs of the right type and shape: a value the model cannot
    # take (a token id past the table). It was a 500, as if the server had failed, for every request
    # batched with it until the batch was split apart, and the 500 for the one that sent it.
    table = numpy_helper.from_array(np.arange(20, dtype=np.float32).reshape(10, 2), "table")
    lookup = _save(tmp_path, "lookup", [helper.make_node("Gather", ["table", "ids"], ["vectors"])],
                   [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 3])],
                   [helper.make_tensor_value_info("vectors", TensorProto.FLOAT, ["N", 3, 2])], [table])
    with serve("OnnxModel", HandleArgs={"model": lookup}, MaxBatchSize=8, MaxWaitMs=50) as server:
        bodies = [{"ids": [i % 10, 1, 30 if i == 5 else 2]} for i in range(8)]
        for _ in range(5):  # on busy cores the 8 may come one at a time, each running alone: send them again
            answers = post_many(server.url + "/predict", bodies, concurrency=8)
            for body, (status, answer) in zip(bodies, answers):
                if body["ids"][2] == 30:
                    assert status == 400, answer
                    assert answer["error"] == ("the model cannot take this input: its Gather node '' says: indices "
                                               "element out of data bounds, idx=30 must be within the inclusive "
                                               "range [-10,9]")
                else:
                    assert (status, answer) == (200, {"vectors": [[2 * i, 2 * i + 1] for i in body["ids"]]})
            if max(int(size) for size in server.stats()["batch_sizes"]) > 1:
                break
        assert max(int(size) for size in server.stats()["batch_sizes"]) > 1  # some of them batched
        status, _, answer = http("POST", server.url + "/v2/models/OnnxModel/infer", json={"inputs": [
            {"name": "ids", "datatype": "INT64", "shape": [1, 3], "data": [1, 2, -11]}]})
        assert status == 400 and "idx=-11 must be within the inclusive range [-10,9]" in answer["error"], answer
        assert post_json(server.url + "/predict", {"ids": [9, 9, 9]}) == (200, {"vectors": [[18, 19]] * 3})
        # a client's mistake, answered: no line of ONNX Runtime's own in the worker's log for it
        assert "onnxruntime" not in str(server.logs(tail=None)), server.logs(tail=None)


def test_a_first_dimension_a_model_mixes_across_is_no_batch_and_a_request_sends_it_whole(serve, tmp_path, caplog):
    """Names decided alone: a cumulative sum over a model's [L] ran across requests, each answered with
    a sum of the others' values; and a model summing over its keys ([M, 4], named apart from the
    queries' N) passed a trial on zeros, which cannot show rows mixing, and gave each request the
    others' keys. A trial of two random rows, together then alone, shows both."""
    import logging

    import onnxruntime as ort

    caplog.set_level(logging.INFO, logger="easyserve")
    cumsum = _save(tmp_path, "cumsum", [helper.make_node("CumSum", ["x", "axis"], ["y"])],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["L"])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["L"])],
                   [numpy_helper.from_array(np.array(0, np.int64), "axis")])
    keyed = _save(tmp_path, "keyed", [helper.make_node("ReduceSum", ["keys", "axes"], ["total"], keepdims=1),
                                      helper.make_node("Add", ["q", "total"], ["y"])],
                  [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["N", 4]),
                   helper.make_tensor_value_info("keys", TensorProto.FLOAT, ["M", 4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                  [numpy_helper.from_array(np.array([0], np.int64), "axes")])
    cases = [(cumsum, [{"x": [float(i), 1.0, 2.0]} for i in range(12)]),
             (keyed, [{"q": [[float(i)] * 4], "keys": [[100.0 * i] * 4, [1.0] * 4]} for i in range(12)])]
    for model, bodies in cases:
        session = ort.InferenceSession(model)
        expected = [{"y": session.run(None, {k: np.array(v, np.float32) for k, v in b.items()})[0].tolist()}
                    for b in bodies]
        with serve("OnnxModel", HandleArgs={"model": model}, MaxBatchSize=8, MaxWaitMs=30) as server:
            assert post_many(server.url + "/predict", bodies, concurrency=12) == [(200, e) for e in expected]
            inputs = http("GET", server.url + "/v2/models/OnnxModel")[2]["inputs"]
        assert [i["shape"][0] for i in inputs] == [-1] * len(inputs)  # the first dimension, sent whole
    assert "OnnxModel: each request runs alone: output 'y' of a row changed with the row beside it" in caplog.text


def test_batched_true_for_a_model_whose_output_cannot_follow_a_batch_is_refused_at_start(tmp_path):
    """It was taken, the log's advice for such a model, and every request was then a 500."""
    model = _save(tmp_path, "total", [helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0)],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                  [helper.make_tensor_value_info("total", TensorProto.FLOAT, [])])
    with pytest.raises(ConfigError, match="OnnxModel: HandleArgs batched: true, but output 'total' does not follow "
                                          "the batch .*: leave batched out"):
        Server(handle="OnnxModel", HandleArgs={"model": model, "batched": True}, GPUs="cpu", Port=0).start()
    # an input without a batch dimension: a batch stacked the requests' temperatures into one of [B], which
    # ONNX Runtime took and broadcast over x's columns where B was 4, each answer a 200 and wrong
    for shape, what in (([], "no dimension"), ([1, 4], "a first dimension fixed at 1")):
        model = _save(tmp_path, "tempered", [helper.make_node("Div", ["x", "temperature"], ["y"])],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
                       helper.make_tensor_value_info("temperature", TensorProto.FLOAT, shape)],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
        with pytest.raises(ConfigError, match=f"OnnxModel: HandleArgs batched: true, but input 'temperature' has "
                                              f"{what}, so a batch's requests cannot be stacked on it: leave batched"):
            Server(handle="OnnxModel", HandleArgs={"model": model, "batched": True}, GPUs="cpu", Port=0).start()


def test_an_integer_division_by_zero_is_the_requests_400_once_the_model_has_run(serve, tmp_path):
    """ONNX Runtime's FAIL from a node, for a value the request sent: a 500 with a traceback logged for
    each, so a client could raise the server's error rate at will."""
    model = _save(tmp_path, "divide", [helper.make_node("Div", ["a", "b"], ["y"])],
                  [helper.make_tensor_value_info("a", TensorProto.INT32, ["N"]),
                   helper.make_tensor_value_info("b", TensorProto.INT32, ["N"])],
                  [helper.make_tensor_value_info("y", TensorProto.INT32, ["N"])])
    with serve("OnnxModel", HandleArgs={"model": model}, MaxBatchSize=8, MaxWaitMs=30) as server:
        bodies = [{"a": 7, "b": 0 if i % 4 == 1 else 2} for i in range(12)]
        answers = post_many(server.url + "/predict", bodies, concurrency=12)
        for body, (status, answer) in zip(bodies, answers):
            if body["b"]:
                assert (status, answer) == (200, {"y": 3})
            else:
                assert status == 400 and answer["error"].startswith("the model cannot take this input: its Div "
                                                                     "node '' says: "), answer
        assert set(server.stats()["statuses"]) == {"200", "400"}  # never a 500, the server's own failure


def test_a_models_own_failure_is_a_500_whose_traceback_keeps_onnxmodels_frames(serve, tmp_path):
    # The model's own bug (a Reshape by its own constant, which no input it ran on fits) is ONNX
    # Runtime's FAIL: the server's fault, 500. (A model that has run, on the sample it is given at
    # start, fails so for an input's doing: the request's 400.) Its traceback began in onnxruntime's
    # package: OnnxModel's frames, which say which path ran, were trimmed with the worker's own.
    broken = _save(tmp_path, "broken", [helper.make_node("Reshape", ["x", "shape"], ["y"])],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "L"])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [7, 5, 3])],
                   [numpy_helper.from_array(np.array([7, 5, 3], np.int64), "shape")])
    with serve("OnnxModel", HandleArgs={"model": broken}) as server:
        status, answer = post_json(server.url + "/predict", {"x": [1, 2, 3]})
        assert status == 500 and "Reshape" in answer["error"], answer
        assert wait_until(lambda: "Traceback" in str(server.logs(tail=None)), 10)
        frames = [line.text for line in server.logs(tail=None) if line.text.startswith("  File ")]
    assert any("onnxmodel.py" in frame and "in forward" in frame for frame in frames), frames
    assert not any(name in frame for frame in frames for name in ("pipeline.py", "worker.py"))


def test_inputs_whose_first_dimensions_are_named_apart_are_sent_whole_where_no_trial_ran(serve, tmp_path, caplog):
    """A model that takes its table beside the ids to look up (first dimensions ``batch`` and ``V``),
    whose trial failed on the trial's one-row table: each request ran alone, but the ids' dimension
    was taken off the table too (it had to be ``[4]``), so only a table of one row was ever taken, and
    the log's hint (``batched: true``) would have stacked the requests' tables into one."""
    import logging

    caplog.set_level(logging.INFO, logger="easyserve")
    lookup = _save(tmp_path, "lookup_table", [helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0)],
                   [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"]),
                    helper.make_tensor_value_info("table", TensorProto.FLOAT, ["V", 4])],
                   [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["batch", 4])])
    table = [[float(i)] * 4 for i in range(3)]
    with serve("OnnxModel", HandleArgs={"model": lookup}, MaxBatchSize=4, MaxWaitMs=30) as server:
        assert "each request runs alone: a trial run failed" in caplog.text, caplog.text
        assert "batched: true batches all the same" not in caplog.text, caplog.text
        status, _, meta = http("GET", server.url + "/v2/models/OnnxModel")
        assert _one_item(meta["inputs"]) == [{"name": "ids", "datatype": "INT64", "shape": [-1]},
                                             {"name": "table", "datatype": "FP32", "shape": [-1, 4]}]
        assert _one_item(meta["outputs"]) == [{"name": "rows", "datatype": "FP32", "shape": [-1, 4]}]
        bodies = [{"ids": [i % 3, 2], "table": table} for i in range(6)]
        assert post_many(server.url + "/predict", bodies, concurrency=6) == [
            (200, {"rows": [table[i % 3], table[2]]}) for i in range(6)]
        status, _, answer = http("POST", server.url + "/v2/models/OnnxModel/infer", json={"inputs": [
            {"name": "ids", "datatype": "INT64", "shape": [2], "data": [1, 0]},
            {"name": "table", "datatype": "FP32", "shape": [3, 4], "data": sum(table, [])}]})
        rows = answer["outputs"][0]
        assert (status, rows["shape"], rows["data"]) == (200, [2, 4], [1.0] * 4 + [0.0] * 4)


def test_models_a_trial_of_random_rows_must_not_misjudge_still_batch_or_fall_back_to_their_names(serve, tmp_path,
                                                                                                  caplog):
    """The random trial's first form took a dynamically quantized model (its scale taken over the batch
    moves a row's answer by a percent) and one with a random node for models whose rows mix: requests
    then had to send the whole batch dimension, a 400 for the usual one item. And its integers 1 and 2
    failed a BERT's token types (a table of 2 rows): not batched, and an extra leading 1 on answers."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    caplog.set_level(logging.INFO, logger="easyserve")
    rng = np.random.default_rng(1)
    classifier = _save(tmp_path, "classifier", [helper.make_node("MatMul", ["x", "W"], ["logits"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                       [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
                       [numpy_helper.from_array(rng.normal(size=(64, 10)).astype(np.float32), "W")])
    quantized = str(tmp_path / "quantized.onnx")
    quantize_dynamic(classifier, quantized, weight_type=QuantType.QInt8)
    # its probabilities too: beside a row of hundreds, a small row's moved past the tolerance
    softmax = _save(tmp_path, "softmax", [helper.make_node("MatMul", ["x", "W1"], ["hidden"]),
                                          helper.make_node("Relu", ["hidden"], ["positive"]),
                                          helper.make_node("MatMul", ["positive", "W2"], ["logits"]),
                                          helper.make_node("Softmax", ["logits"], ["probs"], axis=1)],
                    [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                    [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 10])],
                    [numpy_helper.from_array((rng.normal(size=(64, 32)) * 0.2).astype(np.float32), "W1"),
                     numpy_helper.from_array((rng.normal(size=(32, 10)) * 0.3).astype(np.float32), "W2")])
    quantized_softmax = str(tmp_path / "quantized_softmax.onnx")
    quantize_dynamic(softmax, quantized_softmax, weight_type=QuantType.QInt8)
    bert = _save(tmp_path, "bert", [helper.make_node("Gather", ["words", "input_ids"], ["a"]),
                                    helper.make_node("Gather", ["types", "token_type_ids"], ["b"]),
                                    helper.make_node("Add", ["a", "b"], ["hidden"])],
                 [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
                  helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["batch", "seq"])],
                 [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["Add_dim_0", "Add_dim_1", 8])],
                 [numpy_helper.from_array(rng.normal(size=(100, 8)).astype(np.float32), "words"),
                  numpy_helper.from_array(rng.normal(size=(2, 8)).astype(np.float32), "types")])
    sampling = _save(tmp_path, "sampling", [helper.make_node("RandomNormalLike", ["mu"], ["noise"]),
                                            helper.make_node("Add", ["mu", "noise"], ["z"])],
                     [helper.make_tensor_value_info("mu", TensorProto.FLOAT, ["N", 8])],
                     [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 8])])
    cases = [(quantized, {"x": [0.5] * 64}, {"logits": (10,)}), (sampling, {"mu": [0.0] * 8}, {"z": (8,)}),
             (quantized_softmax, {"x": [0.5] * 64}, {"probs": (10,)}),
             (bert, {"input_ids": [5, 6, 7], "token_type_ids": [0, 0, 1]}, {"hidden": (3, 8)})]
    for model, body, shapes in cases:
        with serve("OnnxModel", HandleArgs={"model": model}, MaxBatchSize=8, MaxWaitMs=30) as server:
            answers = _batched(server, [body] * 8, concurrency=8)
            assert all(status == 200 for status, _ in answers), answers[0]
            assert {name: np.asarray(value).shape for name, value in answers[0][1].items()} == shapes, model
        assert "OnnxModel: requests batched" in caplog.text, (model, caplog.text)
        caplog.clear()


def test_a_model_that_looks_at_its_batch_as_a_whole_answers_each_request_as_if_alone(serve, tmp_path, caplog):
    """An export of ``if x.max() > 1: x = x / 255`` answered the trial's random rows alike (both past 1)
    and was batched: a request of pixels scaled to 0-1 then got 1/255 of its answer when a raw one came
    in its batch. And two trial rows of one integer each were drawn alike, so a model that centres each
    row on the batch's mean was batched too."""
    import logging

    caplog.set_level(logging.INFO, logger="easyserve")
    row = ["N", 16]
    branches = [helper.make_graph([helper.make_node(op, ["x", *extra], [out])], out, [],
                                  [helper.make_tensor_value_info(out, TensorProto.FLOAT, row)])
                for op, extra, out in (("Div", ["c255"], "scaled"), ("Identity", [], "same"))]
    normalising = _save(tmp_path, "normalising", [
        helper.make_node("ReduceMax", ["x"], ["largest"], keepdims=0),
        helper.make_node("Greater", ["largest", "one"], ["raw"]),
        helper.make_node("If", ["raw"], ["x01"], then_branch=branches[0], else_branch=branches[1]),
        helper.make_node("ReduceSum", ["x01", "axis"], ["y"], keepdims=0),
    ], [helper.make_tensor_value_info("x", TensorProto.FLOAT, row)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])],
        [numpy_helper.from_array(np.array(value, dtype), name)
         for value, dtype, name in ((255, np.float32, "c255"), (1, np.float32, "one"), ([1], np.int64, "axis"))])
    with serve("OnnxModel", HandleArgs={"model": normalising}, MaxBatchSize=8, MaxWaitMs=30) as server:
        bodies = [{"x": [0.5] * 16}, {"x": [200.0] * 16}] * 4
        answers = _batched(server, bodies, concurrency=8)
        assert answers == [(200, {"y": 8.0}), (200, {"y": pytest.approx(3200 / 255)})] * 4
    assert "each request runs alone: output 'y' of a row changed with the row beside it in a trial run (a row " \
           "of small numbers beside one of larger ones" in caplog.text
    centring = _save(tmp_path, "centring", [helper.make_node("Gather", ["table", "id"], ["vector"]),
                                            helper.make_node("ReduceMean", ["vector"], ["mean"], axes=[0]),
                                            helper.make_node("Sub", ["vector", "mean"], ["centred"])],
                     [helper.make_tensor_value_info("id", TensorProto.INT64, ["N"])],
                     [helper.make_tensor_value_info("centred", TensorProto.FLOAT, ["Sub_dim_0", 4])],
                     [numpy_helper.from_array(np.arange(40, dtype=np.float32).reshape(10, 4), "table")])
    with serve("OnnxModel", HandleArgs={"model": centring}, MaxBatchSize=8, MaxWaitMs=30) as server:
        assert post_json(server.url + "/predict", {"id": [3, 5]}) == (200, {"centred": [[-4.0] * 4, [4.0] * 4]})
    assert "each request runs alone: output 'centred' of a row changed with the row beside it in a trial run " \
           "(two random rows together" in caplog.text


def test_no_trial_divides_by_zero_where_onnx_runtime_would_end_the_process_for_it(tmp_path, monkeypatch):
    """ONNX Runtime before 1.25 (the last built for Python 3.10, as in the Docker image) ends the process
    with SIGFPE on an integer division by zero: a trial's first rows, of 0 and 1, kept a model that
    divides by an input from ever starting. There, the trial's integers are 1 and 2 alone."""
    import onnxruntime

    from easyserve import Device
    from easyserve.onnxmodel import OnnxModel

    model = _save(tmp_path, "divide", [helper.make_node("Div", ["a", "b"], ["y"])],
                  [helper.make_tensor_value_info("a", TensorProto.INT32, ["N"]),
                   helper.make_tensor_value_info("b", TensorProto.INT32, ["N"])],
                  [helper.make_tensor_value_info("y", TensorProto.INT32, ["N"])])
    divisors = []

    class Watched:  # the real session, each run's divisors noted
        def __init__(self, session):
            self.session = session

        def run(self, names, feeds, options=None):
            divisors.extend(np.asarray(feeds["b"]).ravel().tolist())
            return self.session.run(names, feeds, options)

        def __getattr__(self, name):
            return getattr(self.session, name)

    for version, zero in (("1.23.2", False), ("1.25.0", True)):
        monkeypatch.setattr(onnxruntime, "__version__", version)
        handle, divisors[:] = OnnxModel(model=model), []
        real = Device.onnx_session
        monkeypatch.setattr(Device, "onnx_session", lambda self, path, **kw: Watched(real(self, path, **kw)))
        handle.setup(Device())
        monkeypatch.setattr(Device, "onnx_session", real)
        assert handle.batched is True and divisors and (0 in divisors) is zero, (version, divisors)


def test_a_division_by_zero_is_a_400_from_the_first_request_where_no_trial_ran(serve, tmp_path):
    """A model of a fixed first dimension has no trial: a FAIL was the request's only once another request
    had run, so the same request was a 500 first, then a 400. The model runs once on a sample at start."""
    model = _save(tmp_path, "divide_one", [helper.make_node("Div", ["a", "b"], ["y"])],
                  [helper.make_tensor_value_info("a", TensorProto.INT32, [1]),
                   helper.make_tensor_value_info("b", TensorProto.INT32, [1])],
                  [helper.make_tensor_value_info("y", TensorProto.INT32, [1])])
    with serve("OnnxModel", HandleArgs={"model": model}, ProcessPerGPU=1) as server:
        status, answer = post_json(server.url + "/predict", {"a": [7], "b": [0]})
        assert status == 400 and "its Div node '' says: " in answer["error"], answer
        assert post_json(server.url + "/predict", {"a": [7], "b": [2]}) == (200, {"y": 3})


def test_an_onnx_file_named_from_the_home_folder_is_found(tmp_path, monkeypatch):
    """``Server.from_onnx("~/models/x.onnx")`` looked for a folder named "~" in the working directory,
    where ``HandleArgs: {model: ~/...}`` found the file."""
    from easyserve.onnxmodel import onnx_settings

    monkeypatch.setenv("HOME", str(tmp_path))
    assert onnx_settings("~/models/clf.onnx")["HandleArgs"]["model"] == str(tmp_path / "models" / "clf.onnx")


WRITE_ONLY = Path("/proc/sys/vm/compact_memory")  # a file no one may read, root included (mode 200)


@pytest.mark.skipif(not WRITE_ONLY.exists(), reason=f"needs {WRITE_ONLY}, a file no one may read")
def test_a_model_file_the_server_may_not_read_says_so():
    """A container's user that may not read a mounted model (a file of root's, mode 600) got ONNX Runtime's
    "system error number 13", and a hint to check HandleArgs."""
    with pytest.raises(ConfigError) as raised:  # as a missing file is: a worker started again fails alike
        Server(handle="OnnxModel", HandleArgs={"model": str(WRITE_ONLY)}, GPUs="cpu", Port=0).start(timeout=60)
    assert (f"model file '{WRITE_ONLY}' cannot be read by this process (user id {os.getuid()}): permission denied; "
            "make it readable to that user (chmod a+r), and its folders") in str(raised.value), raised.value


def test_a_model_or_labels_file_that_is_a_named_pipe_or_a_folder_says_so_at_once(tmp_path):
    """A named pipe as the model or its labels waited for a writer until StartTimeoutS (300 s), then said
    the setup was slow; a folder was "no labels file", beside a folder of that name."""
    model = scale_and_sum(tmp_path)
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "folder").mkdir()
    cases = [({"model": str(tmp_path / "pipe")}, f"'{tmp_path / 'pipe'}' is a named pipe (FIFO), not a file"),
             ({"model": model, "labels": str(tmp_path / "pipe")}, "is a named pipe (FIFO), not a file"),
             ({"model": model, "labels": str(tmp_path / "folder")}, f"'{tmp_path / 'folder'}' is a folder, not")]
    for args, said in cases:
        began = time.monotonic()
        with pytest.raises(ConfigError, match=re.escape(said)):
            Server(handle="OnnxModel", HandleArgs=args, GPUs="cpu", Port=0, StartTimeoutS=20).start(timeout=60)
        assert time.monotonic() - began < 15  # not StartTimeoutS: the error is the config's, at once


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0 or not shutil.which("setpriv"),
                    reason="drops root's right to enter any folder, which needs root and setpriv")
def test_a_model_in_a_folder_the_server_may_not_enter_says_so(tmp_path):
    """Python 3.11's Path.exists() raises where a folder on the way may not be entered: the start failed
    with a PermissionError's traceback, which --supervise took for a passing failure."""
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "m.onnx").write_bytes(b"not read")
    os.chown(locked, 65534, 65534)  # nobody's, and only theirs
    locked.chmod(0o700)
    script = (f"from easyserve import ConfigError\nfrom easyserve.handle import Device\n"
              f"try:\n    Device(config_dir={str(tmp_path)!r}).find('locked/m.onnx', 'model file')\n"
              f"except ConfigError as exc:\n    print(exc)\n")
    caps = "-dac_override,-dac_read_search"
    done = subprocess.run(["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", sys.executable, "-c", script],
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == (f"model file '{locked / 'm.onnx'}' cannot be read by this process (user id 0): "
                                   "permission denied; make it readable to that user (chmod a+r), and its folders"), \
        done.stdout + done.stderr
