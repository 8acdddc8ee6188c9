"""Handles the Open Inference Protocol tests serve (workers import this module by name)."""

from __future__ import annotations

import os
import time

import numpy as np

from easyserve import Handle, Tensor


class Affine(Handle):
    """``y = x * scale + 1`` on a vector, with its sum and length: declared inputs and outputs.

    On ``/predict`` it takes ``{"x": [...], "scale": s}`` and answers the same three values as JSON,
    so both protocols can be compared.
    """

    inputs = [Tensor("x", "FP32", [-1]), Tensor("scale", "FP32", [1], optional=True)]
    outputs = [Tensor("y", "FP32", [-1]), Tensor("total", "FP64", [1]), Tensor("count", "INT64", [1]),
               Tensor("pid", "INT64", [1])]

    def preprocess(self, task):
        info = task["task_info"]
        if task.get("protocol") == "v2":
            x, scale = info["x"], float(info["scale"][0]) if "scale" in info else 2.0
        else:
            x, scale = np.asarray(info["x"], np.float32), float(info.get("scale", 2.0))
        if x.size and x[0] == -1:
            raise ValueError("x may not start with -1")
        return x * np.float32(scale) + np.float32(1)

    def stack(self, inputs):
        return list(inputs)  # vectors of different lengths

    def forward(self, batch):
        return batch

    def postprocess(self, y, task):
        # float64 and a Python int: cast to the declared FP64 and INT64
        return {"y": y, "total": [float(y.astype(np.float64).sum())], "count": [len(y)], "pid": [os.getpid()]}


class Echo(Handle):
    """Declares nothing; answers each input back under its own name, and reports what it was given."""

    def stack(self, inputs):
        return list(inputs)

    def forward(self, batch):
        return batch

    def postprocess(self, info, task):
        if task.get("protocol") != "v2":
            return info
        out = dict(info)
        out["seen"] = [f"{name}:{a.dtype}:{list(a.shape)}:{a.flags.writeable}" for name, a in info.items()]
        if task["parameters"]:
            out["parameters"] = [f"{k}={v}" for k, v in sorted(task["parameters"].items())]
        return out


class BadOutputs(Affine):
    """Affine, whose postprocess gets its v2 answer wrong as ``parameters.fail`` asks."""

    def postprocess(self, y, task):
        fail = task.get("parameters", {}).get("fail")
        result = super().postprocess(y, task)
        if fail == "not-a-dict":
            return [y]
        if fail == "missing":
            del result["total"]
        if fail == "extra":
            result["more"] = [1]
        if fail == "datatype":
            result["count"] = ["three"]
        if fail == "shape":
            result["total"] = [1.0, 2.0]
        if fail == "nan":
            result["y"] = np.full_like(y, np.nan)
        if fail == "masked":  # the second value hidden
            result["y"] = np.ma.masked_array(y, mask=[False, True])
        if fail == "complex":
            result["y"] = y.astype(np.complex64)
        if fail == "unreadable":
            result["y"] = NeedsDetach()
        if fail == "number-keys":
            result = {1: y}
        if fail == "huge-int":
            result["count"] = [2**64 + 1]
        return result


class NeedsDetach:
    """What a torch tensor that requires grad does when numpy reads it."""

    def __array__(self, dtype=None, copy=None):
        raise RuntimeError("Can't call numpy() on Tensor that requires grad. Use tensor.detach().numpy() instead.")


class BadDeclaration(Handle):
    """Declares its inputs as names rather than tensors: it must not start."""

    inputs = ["x", "y"]

    def forward(self, batch):
        return batch


class SlowStart(Affine):
    """Affine, whose setup waits until the file HandleArgs["go"] exists."""

    def setup(self, device):
        import time

        while not os.path.exists(self.args["go"]):
            time.sleep(0.02)


class Pixels(Handle):
    """Declares one input, float pixels (3, 4, 4), and answers their sum: for tensor bodies on /predict."""

    inputs = [Tensor("pixels", "FP32", [3, 4, 4])]

    def preprocess(self, task):
        info = task["task_info"]
        return info["pixels"] if task.get("protocol") == "v2" else info["data"]

    def forward(self, batch):
        return batch.reshape(len(batch), -1).sum(axis=1)

    def postprocess(self, total, task):
        return {"sum": float(total)}


class CrashingPixels(Pixels):
    """Pixels, whose every batch ends its process: a model that loads, then crashes when it runs."""

    def forward(self, batch):
        os._exit(3)


class Float32Pixels(Pixels):
    """Pixels, whose model takes float32 alone, as an ONNX Runtime session or a torch model does."""

    def forward(self, batch):
        if batch.dtype != np.float32:
            raise TypeError(f"expected float32, got {batch.dtype}")
        return super().forward(batch)


class Gated(Affine):
    """Affine, whose forward waits while the file HandleArgs["gate"] names is there."""

    def forward(self, batch):
        import time

        while os.path.exists(self.args["gate"]):
            time.sleep(0.01)
        return super().forward(batch)


class Renamed(Affine):
    """Affine, whose output ``y`` is called ``z``: a new model that renamed an output."""

    outputs = [Tensor("z", "FP32", [-1]), *Affine.outputs[1:]]

    def postprocess(self, y, task):
        result = super().postprocess(y, task)
        result["z"] = result.pop("y")
        return result


class TwoWidths(Handle):
    """Declares two float inputs of one shape, FP16 then FP32; answers the datatype and values it was given."""

    inputs = [Tensor("half", "FP16", [-1]), Tensor("single", "FP32", [-1])]

    def preprocess(self, task):
        data = task["task_info"]["data"]
        return {"dtype": str(data.dtype), "values": data.tolist()}

    def forward(self, batch):
        return batch


class Rows(Handle):
    """Answers ``y``, the numbers 0 to n - 1, for an input ``n``; each ``forward`` appends its batch's
    size to the file HandleArgs["journal"] (if given) and takes HandleArgs["forward_s"] (default 0)."""

    inputs = [Tensor("n", "INT64", [1])]
    outputs = [Tensor("y", "FP32", [-1])]

    def preprocess(self, task):
        n = int(task["task_info"]["n"][0])
        if n < 0:
            raise ValueError(f"n is {n}; it may not be negative")
        return n

    def stack(self, inputs):
        return list(inputs)

    def forward(self, batch):
        if self.args.get("journal"):
            with open(self.args["journal"], "a") as journal:
                journal.write(f"{len(batch)}\n")
        time.sleep(float(self.args.get("forward_s", 0)))
        return batch

    def postprocess(self, n, task):
        return {"y": np.arange(n, dtype=np.float32)}


class RowsWhole(Rows):
    """:class:`Rows` with a ``run_batch`` of its own, which a worker calls with the whole batch."""

    def run_batch(self, tasks):
        rows = self.forward([self.preprocess(task) for task in tasks])
        return [(200, self.postprocess(row, task)) for row, task in zip(rows, tasks)]


class RowsDown(Rows):
    """:class:`Rows` whose own ``run_batch`` answers every item 500: the model behind it is down."""

    def run_batch(self, tasks):
        return [(500, "the model's server is down") for _ in tasks]


class Scores(Handle):
    """Scores over 4 classes named in setup (as a model's labels are read from its files): ``x`` is the
    scores, answered as they are, beside their sum (a number of one element) and a word."""

    inputs = [Tensor("x", "FP32", [4])]

    def setup(self, device):
        self.outputs = [Tensor("scores", "FP32", [4], labels=["cat", "dog", "bird", "fish"]),
                        Tensor("counts", "INT64", [4]), Tensor("word", "BYTES", [1]), Tensor("grid", "FP32", [2, 2])]

    def preprocess(self, task):
        return task["task_info"]["x"]

    def forward(self, batch):
        return batch

    def postprocess(self, output, task):
        return {"scores": output, "counts": (output * 10).astype(np.int64), "word": ["w"], "grid": output.reshape(2, 2)}
