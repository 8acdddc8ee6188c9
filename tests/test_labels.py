"""An output's class names from ``HandleArgs: {labels: ...}`` (``OnnxModel``, as Triton's ``label_filename``):
read from a file beside the config, given to the classification extension's answers and the model
configuration, checked against the model at start, and read again on SIGHUP."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from conftest import http, post_json, wait_until
from onnx import TensorProto, helper
from test_cli import easyserve, wait_for_url
from test_onnx_model import WRITE_ONLY, _save

from easyserve import ConfigError, Server
from easyserve.handle import Device
from easyserve.labels import check_labels, labelled, read_labels
from easyserve.tensors import Tensor

CLASSES = ["cat", "dög", "bird"]


def scores_and_total(folder: Path) -> str:
    """x (FP32 [N, 3]) as it is, ``scores``, and its sum, ``total`` [N]: one output of 3 classes."""
    return _save(folder, "scores_and_total", [
        helper.make_node("Identity", ["x"], ["scores"]),
        helper.make_node("ReduceSum", ["x", "one"], ["total"], keepdims=0),
    ], [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
       [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 3]),
        helper.make_tensor_value_info("total", TensorProto.FLOAT, ["N"])],
       [helper.make_tensor(name="one", data_type=TensorProto.INT64, dims=[1], vals=[1])])


def scores_twice(folder: Path) -> str:
    """x (FP32 [N, 3]) as it is, ``scores``, and negated, ``losses``: two outputs of 3 classes each."""
    return _save(folder, "scores_twice", [helper.make_node("Identity", ["x"], ["scores"]),
                                          helper.make_node("Neg", ["x"], ["losses"])],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                 [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 3]),
                  helper.make_tensor_value_info("losses", TensorProto.FLOAT, ["N", 3])])


def top(url: str, model: str, x: list, output: str = "scores", classes: int = 2) -> list[str]:
    """The top ``classes`` of ``output`` for the item ``x``, as the classification extension answers."""
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": x}],
           "outputs": [{"name": output, "parameters": {"classification": classes}}]}
    status, _, answer = http("POST", f"{url}/v2/models/{model}/infer", json=doc)
    assert status == 200, answer
    return answer["outputs"][0]["data"]


def test_a_labels_file_beside_the_config_names_an_onnx_models_top_classes(tmp_path, monkeypatch):
    app, elsewhere = tmp_path / "app", tmp_path / "elsewhere"
    app.mkdir()
    elsewhere.mkdir()
    scores_and_total(app)
    # as editors on Windows write it: a byte order mark, CRLF, blank lines at the end
    (app / "classes.txt").write_bytes(("\ufeff" + "\r\n".join(CLASSES) + "\r\n\r\n \n").encode())
    (app / "m.yaml").write_text("Handle: OnnxModel\nHandleArgs: {model: scores_and_total.onnx, labels: classes.txt}\n"
                                "ModelName: m\nGPUs: cpu\nPort: 0\n")
    monkeypatch.chdir(elsewhere)  # found beside the config, as the model is
    with Server.from_yaml(app / "m.yaml") as server:
        assert top(server.url, "m", [0.1, 0.9, 0.5]) == ["0.900000:1:dög", "0.500000:2:bird"]
        client = triton.InferenceServerClient(server.url.removeprefix("http://"))
        try:  # tritonclient's class_count, a batch of two: each item its classes
            x = triton.InferInput("x", [2, 3], "FP32")
            x.set_data_from_numpy(np.array([[3, 2, 1], [1, 2, 3]], np.float32))
            result = client.infer("m", [x], outputs=[triton.InferRequestedOutput("scores", class_count=1)])
            assert [v.decode() for v in result.as_numpy("scores").ravel()] == ["3.000000:0:cat", "3.000000:2:bird"]
            # the model configuration names the file on the output it labels, as Triton's does
            config = client.get_model_config("m")
            assert [o.get("label_filename") for o in config["output"]] == ["classes.txt", None]
        finally:
            client.close()
        # the total has no labels; /predict answers the outputs as they are
        assert top(server.url, "m", [1, 2, 3], output="total", classes=1) == ["6.000000:0"]
        assert post_json(server.url + "/predict", {"x": [1, 2, 3]}) == (200, {"scores": [1, 2, 3], "total": 6})


def test_labels_given_by_output_a_file_for_one_and_a_list_for_the_other(serve, tmp_path):
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    labels = {"scores": str(tmp_path / "classes.txt"), "losses": ["x", "", "z"]}
    with serve("OnnxModel", HandleArgs={"model": scores_twice(tmp_path), "labels": labels}, ModelName="m") as server:
        assert top(server.url, "m", [0.1, 0.9, 0.5]) == ["0.900000:1:dög", "0.500000:2:bird"]
        # a class whose label is empty is written as one without a label, as Triton writes it: no ":" after
        assert top(server.url, "m", [0.1, 0.9, 0.5], output="losses", classes=3) == [
            "-0.100000:0:x", "-0.500000:2:z", "-0.900000:1"]
        status, _, config = http("GET", server.url + "/v2/models/m/config")
        assert status == 200 and [o.get("label_filename") for o in config["output"]] == ["classes.txt", None]
    # a list alone, for a model's one output of its count
    alone = {"model": scores_and_total(tmp_path), "labels": CLASSES}
    with serve("OnnxModel", HandleArgs=alone, ModelName="m") as server:
        assert top(server.url, "m", [0.1, 0.9, 0.5], classes=1) == ["0.900000:1:dög"]


def test_a_changed_labels_file_is_read_again_on_sighup(tmp_path):
    scores_and_total(tmp_path)
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES))
    (tmp_path / "m.yaml").write_text("Handle: OnnxModel\nHandleArgs: {model: scores_and_total.onnx, labels: "
                                     "classes.txt}\nModelName: m\nGPUs: cpu\nProcessPerGPU: 1\n")
    lines: list[str] = []
    with easyserve("run", str(tmp_path / "m.yaml"), "--port", "0") as proc:
        try:
            url = wait_for_url(proc, lines)
            assert top(url, "m", [0.1, 0.9, 0.5], classes=1) == ["0.900000:1:dög"]
            (tmp_path / "classes.txt").write_text("ant\nbee\nwasp\n")
            proc.send_signal(signal.SIGHUP)
            wait_until(lambda: top(url, "m", [0.1, 0.9, 0.5], classes=1) == ["0.900000:1:bee"], 30, "the new labels")
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 0
        finally:
            proc.kill()


def test_an_onnx_file_served_from_the_command_line_takes_its_labels_from_a_flag(tmp_path, monkeypatch):
    model = scores_and_total(tmp_path)
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES))
    monkeypatch.chdir(tmp_path)  # a path relative to where the command runs, as a shell's user gives it
    lines: list[str] = []
    with easyserve("run", model, "--labels", "classes.txt", "--port", "0", "--gpus", "cpu") as proc:
        try:
            url = wait_for_url(proc, lines)
            assert top(url, "scores_and_total", [0.1, 0.9, 0.5]) == ["0.900000:1:dög", "0.500000:2:bird"]
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 0
        finally:
            proc.kill()
    # a config names its labels itself
    (tmp_path / "m.yaml").write_text("Handle: OnnxModel\nHandleArgs: {model: scores_and_total.onnx}\n")
    with easyserve("run", "m.yaml", "--labels", "classes.txt") as refused:
        assert refused.wait(30) == 2
        assert "--labels applies to an .onnx model served as it is; in a config, set HandleArgs: {labels: FILE}" \
            in refused.stdout.read()


def test_labels_that_do_not_fit_the_model_fail_the_start_saying_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a config made in Python: files beside it are in its working directory
    two, one = scores_twice(tmp_path), scores_and_total(tmp_path)
    (tmp_path / "four.txt").write_text("a\nb\nc\nd\n")
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    (tmp_path / "latin1.txt").write_bytes("cat\nd\xf6g\n".encode("latin-1"))
    (tmp_path / "blank.txt").write_text("\n \n")
    for model, labels, said in [
        (one, "gone.txt", f"OnnxModel: no labels file 'gone.txt' (looked for {tmp_path / 'gone.txt'}"),
        (one, "four.txt", "OnnxModel: labels file 'four.txt' has 4 labels, and no output's last dimension is 4 (or "
                          "left open) to be their classes; the model's outputs are 'scores' (FP32 [3]), 'total' (FP32 "
                          "[])"),
        (one, {"scores": "four.txt"}, "OnnxModel: labels file 'four.txt' has 4 labels, and output 'scores' has 3 "
                                      "classes (its last dimension; shape [3])"),
        (one, {"score": "three.txt"}, "OnnxModel: labels for output 'score', which the model does not have; its "
                                      "outputs are 'scores' (FP32 [3]), 'total' (FP32 [])"),
        (two, "three.txt", "OnnxModel: labels file 'three.txt' has 3 labels, which could be for outputs 'scores', "
                           "'losses' (each with last dimension 3): say which, labels: {scores: three.txt}"),
        # the file found named where it was found
        (one, "latin1.txt", f"OnnxModel: labels file '{tmp_path / 'latin1.txt'}' is not UTF-8 text (byte 0xf6 on "
                            "line 2); save it as UTF-8"),
        (one, "blank.txt", f"OnnxModel: labels file '{tmp_path / 'blank.txt'}' holds no label (one a line)"),
        (one, ["a", 2, "c"], "OnnxModel: labels: label 1 is 2 (int), not a string; quote it in the YAML"),
    ]:
        with pytest.raises(ConfigError) as raised:
            Server(handle="OnnxModel", HandleArgs={"model": model, "labels": labels}, GPUs="cpu",
                   Port=0).start(timeout=60)
        assert said in str(raised.value), (labels, raised.value)


def test_a_labels_file_is_text_one_label_a_line(tmp_path):
    path = tmp_path / "labels.txt"
    # a blank line inside is a class without a name (the others keep their indices); "\n" alone ends
    # a line, not a form feed; blank lines at the end are left out
    path.write_bytes(b"\xef\xbb\xbfcat\r\n\r\ndog \x0cx\n\n\t\n")
    assert read_labels(path) == ["cat", "", "dog \x0cx"]
    path.write_bytes(b"only")
    assert read_labels(path) == ["only"]
    for content, said in [(b"", "holds no label"), (b"\xef\xbb\xbf\n\n", "holds no label"),
                          (b"a\nb\n\xff\n", "is not UTF-8 text (byte 0xff on line 3)")]:
        path.write_bytes(content)
        with pytest.raises(ConfigError, match=re.escape(said)):
            read_labels(path)
    with pytest.raises(ConfigError, match=re.escape(f"labels file {str(tmp_path)!r} cannot be read: Is a directory")):
        read_labels(tmp_path)


@pytest.mark.skipif(not WRITE_ONLY.exists(), reason=f"needs {WRITE_ONLY}, a file no one may read")
def test_a_labels_file_the_server_may_not_read_says_so():
    outputs = [Tensor("scores", "FP32", [3])]
    with pytest.raises(ConfigError, match=re.escape(f"OnnxModel: labels file '{WRITE_ONLY}' cannot be read by this "
                                                    "process")):
        labelled(outputs, str(WRITE_ONLY), lambda name: Device().find(name, "labels file"))


def test_which_output_labels_given_alone_are_for():
    def find(name):
        raise AssertionError(f"looked for {name!r}: a list is no file")

    scores, total, word = Tensor("scores", "FP32", [3]), Tensor("total", "FP32", []), Tensor("word", "BYTES", [3])
    # the one whose last dimension is their count: not a string output's, nor one of no dimension
    got = labelled([word, total, scores], ["a", "b", "c"], find)
    assert [t.labels for t in got] == [None, None, ("a", "b", "c")] and got[2].label_filename is None
    assert got[2] == Tensor("scores", "FP32", [3], labels=("a", "b", "c"))
    # else the one whose last dimension is left open: its count cannot be checked
    opened = Tensor("scores", "FP32", [1, -1])
    assert labelled([total, opened], ["a", "b"], find)[1].labels == ("a", "b")
    assert labelled([Tensor("s", "FP32", [4]), opened], ["a", "b", "c", "d"], find)[0].labels == ("a", "b", "c", "d")
    with pytest.raises(ConfigError, match=re.escape("could be for outputs 's', 'scores' (each with last dimension "
                                                    "left open): say which, labels: {s: [...]}")):
        labelled([Tensor("s", "FP32", [-1]), opened], ["a"], find)
    # by name: an output of no dimension is one class; one not served, or of strings, is refused
    assert labelled([total], {"total": ["sum"]}, find)[0].labels == ("sum",)
    with pytest.raises(ConfigError, match=re.escape("labels for output 'probabilities', which the model does not have "
                                                    "(it is not served); its outputs are 'total' (FP32 [])")):
        labelled([total], {"probabilities": ["a"]}, find, not_served=["probabilities"])
    with pytest.raises(ConfigError, match=re.escape("OnnxModel: labels for output 'word', which is BYTES: "
                                                    "classification ranks numbers")):
        labelled([word], {"word": ["a", "b", "c"]}, find)
    with pytest.raises(ConfigError, match=re.escape("the labels list has 2 labels, and output 'total' has 1 classes")):
        labelled([total], {"total": ["a", "b"]}, find)
    with pytest.raises(ConfigError, match="labels file 'x.txt' given where no file can be looked for"):
        labelled([scores], "x.txt", None)
    assert labelled([scores], None, None) == [scores]


@pytest.mark.parametrize("given, said", [
    ({}, "labels is an empty mapping; give {output name: labels file}"),
    ({1: "a.txt"}, "labels' keys are output names (strings), got 1"),
    ("", "labels is an empty path; give a labels file"),
    ([], "labels is an empty list"),
    ({"scores": 3}, "labels for output 'scores' must be a labels file (one label a line), a list of labels, or a "
                    "mapping {output name: labels file}; got 3"),
    (True, "labels must be a labels file"),
    (["a", None], "labels: label 1 is None (NoneType), not a string; quote it in the YAML"),
])
def test_labels_of_a_form_not_taken_are_refused_before_any_worker_starts(given, said):
    with pytest.raises(ConfigError, match=re.escape(f"OnnxModel: {said}")):
        check_labels(given)
    from easyserve import OnnxModel

    with pytest.raises(ConfigError, match=re.escape(f"OnnxModel: {said}")):
        OnnxModel(model="m.onnx", labels=given)


def test_a_tensors_label_filename_goes_with_its_labels():
    assert Tensor("s", "FP32", [2], labels=["a", "b"], label_filename="ab.txt").label_filename == "ab.txt"
    for labels, filename in ((None, "ab.txt"), (["a", "b"], 3)):
        with pytest.raises(ValueError, match="label_filename must be a string, and given with the labels"):
            Tensor("s", "FP32", [2], labels=labels, label_filename=filename)
