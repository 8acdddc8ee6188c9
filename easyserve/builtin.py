"""Handles that ship with easyserve: a no-op for measuring the server itself, a small ONNX classifier
built in memory (the default that ``easyserve run`` serves offline), and any ONNX model served as it is
(``easyserve run model.onnx``)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import orjson

from .errors import BadRequest, ConfigError
from .handle import Device, Handle
from .onnxmodel import OnnxModel
from .tensors import Tensor

__all__ = ["Echo", "Demo", "OnnxModel"]


class Echo(Handle):
    """Answers each request with its own ``task_info``. For benchmarks and tests.

    ``HandleArgs: {delay_ms: 5}`` makes each batch take that long, like a model would.
    """

    def __init__(self, delay_ms: float = 0, **unknown: Any) -> None:
        _refuse("Echo", unknown, "delay_ms")
        super().__init__(delay_ms=delay_ms)
        self.delay_s = float(delay_ms) / 1000

    def forward(self, batch: list) -> list:
        if self.delay_s:
            time.sleep(self.delay_s)
        return batch


IRIS_LABELS = ["setosa", "versicolor", "virginica"]


class Demo(Handle):
    """A 4-feature, 3-class linear classifier run by ONNX Runtime: ``{"x": [5.1, 3.5, 1.4, 0.2]}``, or
    the 4 numbers as a tensor body (``.npy``, or raw with ``X-Tensor-Dtype`` and ``X-Tensor-Shape``).

    The weights are fixed (a tiny iris-like model), so answers are the same on every machine. Over the
    Open Inference Protocol it takes ``x`` (FP32 [4]) and answers ``scores``, ``class`` and ``label``.
    """

    inputs = [Tensor("x", "FP32", [4])]
    outputs = [Tensor("scores", "FP32", [3]), Tensor("class", "INT64", [1]), Tensor("label", "BYTES", [1])]
    checks_tensor_bodies = True  # preprocess takes any 4 numbers, integers too, as float32

    def __init__(self, **unknown: Any) -> None:
        _refuse("Demo", unknown)
        super().__init__()

    def setup(self, device: Device) -> None:
        self.session = device.onnx_session(demo_model())

    def preprocess(self, task: dict) -> np.ndarray:
        info = task["task_info"]
        x = info["x"] if "x" in info else info.get("data")  # JSON, or a tensor body (.npy, X-Tensor-*)
        if x is None:  # it said "got shape ()", as if x were there
            raise ValueError(f'expected {{"x": [4 numbers]}} (or a tensor of 4 numbers), got the fields {sorted(info)}')
        try:
            if isinstance(x, list) and not all(type(v) in (int, float) for v in x):  # numpy takes true and "5.1"
                raise TypeError
            with np.errstate(over="ignore"):  # 1e308 as float32 is infinity, refused below: not a warning logged
                features = np.asarray(x, dtype=np.float32)
        except (TypeError, ValueError):
            raise ValueError(f'"x" must be a list of 4 numbers, got {_as_sent(x)}') from None
        if features.shape == (1, 4) and "x" not in info:  # a tensor body's batch of one, taken off as for others
            features = features[0]
        if features.shape != (4,):
            raise ValueError(f'"x" must be a list of 4 numbers, got shape {features.shape}')
        if not np.isfinite(features).all():  # NaN, infinity, or past float32's 3.4e38
            raise ValueError(f'"x" must be 4 finite numbers within float32\'s range, got {features.tolist()}')
        return features

    def forward(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"x": batch})[0]

    def postprocess(self, output: np.ndarray, task: dict) -> dict[str, Any]:
        if not np.isfinite(output).all():  # finite x so large that float32 arithmetic overflows
            raise BadRequest("these 4 numbers are too large for the model's float32 arithmetic: its scores came "
                             "out NaN; send measurements in centimetres, such as [5.1, 3.5, 1.4, 0.2]")
        best = int(output.argmax())
        if task.get("protocol") == "v2":
            return {"scores": output, "class": [best], "label": [IRIS_LABELS[best]]}
        return {"label": IRIS_LABELS[best], "class": best, "scores": [round(float(p), 6) for p in output]}


def demo_model() -> bytes:
    """The serialized ONNX model ``Demo`` serves: softmax(x @ W + b), x of shape [N, 4]."""
    from onnx import TensorProto, helper, numpy_helper

    weights = np.array([[0.4, 0.0, -0.4], [1.0, -0.2, -0.8], [-1.2, 0.1, 1.1], [-1.1, -0.3, 1.4]], np.float32)
    bias = np.array([0.9, 1.0, -1.9], np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)],
        "easyserve_demo",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="easyserve")
    model.ir_version = 8  # readable by older ONNX Runtime releases too
    return model.SerializeToString()


def _as_sent(value: Any, limit: int = 80) -> str:
    """``value`` as its client wrote it (JSON: ``true``, ``"5.1"``), shortened: a long list is not sent back whole."""
    try:
        text = orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY).decode()
    except TypeError:
        text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _refuse(handle: str, unknown: dict[str, Any], *known: str) -> None:
    """HandleArgs a built-in handle does not take fail the start: ``Handle: Demo`` with a model path
    served the demo, silently, where its user meant their model."""
    if unknown:
        takes = f"takes only {', '.join(known)}" if known else "takes no HandleArgs"
        raise ConfigError(f"Handle: {handle} {takes}, got {', '.join(map(repr, unknown))}. To serve an ONNX "
                          "file, use Handle: OnnxModel with HandleArgs: {model: path/to/model.onnx}")
