"""Handles that ship with easyserve: a no-op for measuring the server itself, a small ONNX classifier
built in memory (the default that ``easyserve run`` serves offline), and any ONNX model served as it is
(``easyserve run model.onnx``)."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np

from .errors import ConfigError
from .handle import Device, Handle
from .tensors import DATATYPES, Tensor, json_to_array, shape_fits

__all__ = ["Echo", "Demo", "OnnxModel"]

log = logging.getLogger("easyserve")


class Echo(Handle):
    """Answers each request with its own ``task_info``. For benchmarks and tests.

    ``HandleArgs: {delay_ms: 5}`` makes each batch take that long, like a model would.
    """

    def setup(self, device: Device) -> None:
        self.delay_s = float(self.args.get("delay_ms", 0)) / 1000

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

    def setup(self, device: Device) -> None:
        self.session = device.onnx_session(demo_model())

    def preprocess(self, task: dict) -> np.ndarray:
        info = task["task_info"]
        x = info["x"] if "x" in info else info.get("data")  # JSON, or a tensor body (.npy, X-Tensor-*)
        if x is None:  # it said "got shape ()", as if x were there
            raise ValueError(f'expected {{"x": [4 numbers]}} (or a tensor of 4 numbers), got the fields {sorted(info)}')
        try:
            features = np.asarray(x, dtype=np.float32)
        except (TypeError, ValueError):
            raise ValueError(f'"x" must be a list of 4 numbers, got {x!r}') from None
        if features.shape != (4,):
            raise ValueError(f'"x" must be a list of 4 numbers, got shape {features.shape}')
        return features

    def forward(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"x": batch})[0]

    def postprocess(self, output: np.ndarray, task: dict) -> dict[str, Any]:
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


# ONNX Runtime's names for the tensor types a request can carry, as the Open Inference Protocol names them
_ONNX_DATATYPES = {
    "tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(double)": "FP64", "tensor(bool)": "BOOL",
    "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32", "tensor(uint64)": "UINT64",
    "tensor(string)": "BYTES",
}


class OnnxModel(Handle):
    """Any ONNX model served as it is, its inputs and outputs read from the file: ``HandleArgs: {model:
    path/to/model.onnx}`` (or ``easyserve run model.onnx``). A path that is not absolute is taken from
    the working directory; ``model`` may also be the model's bytes or an ``onnx.ModelProto``.

    A request names each input and gives one item, without the model's batch dimension: easyserve makes
    the batch (``{"x": [5.1, 3.5, 1.4, 0.2]}`` for an input of shape ``[N, 4]``; a leading batch
    dimension of 1 is also taken). A model of one input takes a tensor body too (``.npy``, or raw bytes
    with ``X-Tensor-Dtype`` and ``X-Tensor-Shape``). The answer holds each output by name, the
    request's row of it. Over the Open Inference Protocol, the metadata lists the inputs and outputs
    (``-1`` for a dimension the model leaves open), and an inference request carries the tensors.

    Requests are batched where every input and output has the same named first dimension (``N``,
    ``batch_size``, as exporters write it); requests whose other open dimensions differ (sequences of
    other lengths) run one by one within their batch. Any other model runs each request alone (an
    output with a first dimension of its own, as a detector's boxes, is not split into rows);
    ``HandleArgs: {batched: true}`` batches it all the same, ``false`` never.
    """

    def __init__(self, model: Any = None, batched: bool | None = None) -> None:
        if hasattr(model, "SerializeToString"):  # an onnx.ModelProto: sent to the workers as its bytes
            model = model.SerializeToString()
        if model is None:
            raise ConfigError("OnnxModel needs the model: HandleArgs: {model: path/to/model.onnx}")
        if not isinstance(model, (str, bytes, os.PathLike)):
            raise ConfigError(f"OnnxModel: model must be the path to an .onnx file (or its bytes), got {model!r}")
        if batched not in (None, True, False):
            raise ConfigError(f"OnnxModel: batched must be true or false (or left out: read from the model), "
                              f"got {batched!r}")
        super().__init__(model=model, batched=batched)
        self.model, self.batched = model, batched

    def setup(self, device: Device) -> None:
        if not isinstance(self.model, bytes) and not os.path.isfile(self.model):
            raise ConfigError(f"OnnxModel: no model file {os.fspath(self.model)!r} (looked from {os.getcwd()})")
        try:
            self.session = device.onnx_session(self.model)
        except Exception as exc:
            named = "the model's bytes" if isinstance(self.model, bytes) else repr(os.fspath(self.model))
            raise ConfigError(f"OnnxModel: ONNX Runtime cannot load {named}: {exc}") from None
        ins, outs = self.session.get_inputs(), self.session.get_outputs()
        # an output that is not a tensor (scikit-learn's ZipMap: a sequence of maps) is not asked for
        left_out = [o for o in outs if o.type not in _ONNX_DATATYPES]
        outs = [o for o in outs if o.type in _ONNX_DATATYPES]
        if left_out and device.name.endswith("/0"):
            log.warning("OnnxModel: the model's output(s) %s not served: only tensors are (%s)",
                        ", ".join(repr(o.name) for o in left_out), ", ".join(o.type for o in left_out))
        if not outs:
            kinds = ", ".join(f"{o.name}: {o.type}" for o in left_out)
            raise ConfigError(f"OnnxModel: the model has no tensor output to answer with ({kinds}); "
                              "write a handle of your own for it")
        # The batch dimension: a name every input's first dimension has (N, batch_size). Requests are
        # batched where every output's first dimension has that name too: an output whose first
        # dimension is another (a detector's boxes: num_boxes) is not one row per request, and split
        # by rows it would give requests each other's answers. Else each request runs alone, given
        # without that dimension (or a fixed first dimension of 1), which is added for it and taken
        # off the outputs that have it.
        firsts = {_first(i.shape) for i in ins}
        batch = firsts.pop() if len(firsts) == 1 and isinstance(next(iter(firsts)), str) else None
        if self.batched is None:
            self.batched = batch is not None and all(_first(o.shape) == batch for o in outs)
        per_request = {batch, 1} - {None} if not self.batched else None
        self.lead = {i.name: self.batched or _first(i.shape) in per_request for i in ins}
        self.drop = {o.name: self.batched or (any(self.lead.values()) and _first(o.shape) in per_request)
                     for o in outs}
        self.inputs = [_tensor(i, "input", self.lead[i.name]) for i in ins]
        self.outputs = [_tensor(o, "output", self.drop[o.name]) for o in outs]
        self.names = [o.name for o in outs]

    def preprocess(self, task: dict) -> dict[str, np.ndarray]:
        info = task["task_info"]
        if not isinstance(info, dict):
            raise ValueError(f"expected a JSON object of the model's inputs by name, e.g. {self._example()}")
        if "content_type" in info and set(info) == {"data", "content_type"}:  # a body that is not JSON
            info = {self._only_input(info): info["data"]}
        names = [t.name for t in self.inputs]
        unknown = [name for name in info if name not in names]
        if unknown:
            raise ValueError(f"the model has no input {unknown[0]!r}; its inputs are {self._described()}")
        missing = [name for name in names if name not in info]
        if missing:
            raise ValueError(f"missing input {missing[0]!r}: the model takes {self._described()}, "
                             f"e.g. {self._example()}")
        return {t.name: _array(info[t.name], t) for t in self.inputs}

    def forward(self, batch: Any) -> Any:
        if self.batched and isinstance(batch, dict):  # stacked: every request's inputs of one shape
            return dict(zip(self.names, self.session.run(self.names, batch)))
        if isinstance(batch, dict):  # run alone, one request after another
            rows = len(next(iter(batch.values())))
            batch = [{name: array[i] for name, array in batch.items()} for i in range(rows)]
        return [self._run_one(inputs) for inputs in batch]

    def postprocess(self, output: dict[str, np.ndarray], task: dict) -> dict[str, np.ndarray]:
        return output  # each output by name: an array (JSON lists), or the protocol's output tensors

    def _run_one(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {name: array[None] if self.lead[name] else array for name, array in inputs.items()}
        outs = self.session.run(self.names, feeds)
        return {name: out[0] if self.drop[name] and out.shape[:1] == (1,) else out
                for name, out in zip(self.names, outs)}

    def _only_input(self, body: dict) -> str:
        """The input a tensor body (.npy, or raw bytes with X-Tensor-* headers) is for: a model's only one."""
        if not isinstance(body["data"], np.ndarray):
            raise ValueError(f"a {body['content_type']} body is not a tensor: send .npy (Content-Type: "
                             "application/x-npy), raw bytes with X-Tensor-Dtype and X-Tensor-Shape, or JSON")
        if len(self.inputs) != 1:
            raise ValueError(f"a tensor body is for a model of one input; this one takes {self._described()}: "
                             f"send JSON, e.g. {self._example()}, or the Open Inference Protocol's tensors")
        return self.inputs[0].name

    def _described(self) -> str:
        return ", ".join(f"{t.name} ({t.datatype} {list(t.shape)})" for t in self.inputs)

    def _example(self) -> str:
        def value(t: Tensor) -> Any:
            sample: Any = '"text"' if t.datatype == "BYTES" else "true" if t.datatype == "BOOL" else "0"
            for size in reversed(t.shape):
                items = ", ".join([sample] * (2 if size == -1 else min(size, 3)))
                sample = f"[{items}, ...]" if size > 3 else f"[{items}]"
            return sample

        return "{" + ", ".join(f'"{t.name}": {value(t)}' for t in self.inputs) + "}"


def _first(shape: list) -> Any:
    return shape[0] if shape else None


def _tensor(port: Any, kind: str, lead: bool) -> Tensor:
    """A model input's or output's metadata, as one request gives or gets it (its batch dimension off)."""
    datatype = _ONNX_DATATYPES.get(port.type)
    if datatype is None:
        raise ConfigError(f"OnnxModel: the model's {kind} {port.name!r} is a {port.type}; only tensors are served "
                          "(write a handle of your own for it)")
    shape = [d if isinstance(d, int) and d >= 0 else -1 for d in port.shape]
    return Tensor(port.name, datatype, shape[1:] if lead else shape)


def _array(value: Any, tensor: Tensor) -> np.ndarray:
    """One request's value for ``tensor``: of its datatype and shape, or ``ValueError`` saying why not."""
    name, dtype = tensor.name, DATATYPES[tensor.datatype]
    if isinstance(value, (np.ndarray, np.generic)):  # a tensor body, or the protocol's tensor (checked already)
        value = np.asarray(value)  # one element of a batch of one is a numpy scalar
        if tensor.datatype == "BYTES":
            if value.dtype.kind not in "OSU":
                raise ValueError(f"input {name!r} takes strings, got {value.dtype}")
        elif value.dtype != dtype and not np.can_cast(value.dtype, dtype, "same_kind"):
            raise ValueError(f"input {name!r} is {tensor.datatype}; {value.dtype} does not convert to it")
        array = value if tensor.datatype == "BYTES" else value.astype(dtype, copy=False)
    else:
        try:
            shape = _nested_shape(value)
            array = json_to_array(value if shape else [value], tensor.datatype, shape or [1]).reshape(shape)
        except ValueError as exc:
            raise ValueError(f"input {name!r}: {exc}") from None
    if not shape_fits(array.shape, tensor.shape):
        if array.shape[:1] == (1,) and shape_fits(array.shape[1:], tensor.shape):
            array = array[0]  # a batch of one, as a client used to batches sends it
        else:
            raise ValueError(f"input {name!r} has shape {list(array.shape)}, and the model takes "
                             f"{list(tensor.shape)} for one request (-1: any size; easyserve adds the batch dimension)")
    if tensor.datatype == "BYTES":  # ONNX Runtime's string tensors hold str
        texts = [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in array.ravel()]
        array = np.array(texts, dtype=object).reshape(array.shape)
    return array


def _nested_shape(value: Any) -> list[int]:
    """The shape nested JSON lists have, read along their first elements (json_to_array checks the rest)."""
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        value = value[0] if value else None
    return shape
