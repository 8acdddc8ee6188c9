"""Handles the tests serve. Workers import this module by name (the tests folder is on sys.path)."""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np

from easyserve import Handle


class Recorder(Handle):
    """Echoes a value and reports which process, device and batch size served it."""

    def setup(self, device):
        self.device = device
        self.delay = float(self.args.get("delay", 0.0))

    def preprocess(self, task):
        info = task["task_info"]
        if "reject" in info:
            raise ValueError(f"rejected: {info['reject']}")
        return float(info.get("value", 0))

    def forward(self, batch):
        if self.delay:
            time.sleep(self.delay)
        return np.stack([batch, np.full(len(batch), len(batch), dtype=np.float64)], axis=1)

    def postprocess(self, output, task):
        return {
            "value": output[0],  # numpy float64: must come back as JSON
            "batch_size": int(output[1]),
            "pid": os.getpid(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "device": self.device.kind,
            "gpu": self.device.gpu,
            "task_id": task["task_id"],
            "request_id": task["request_id"],
        }


class Misbehaving(Handle):
    """Fails or stalls on request: {"fail": "forward"|"postprocess"|"json"|"nan"|"nan-alone"|"inf-in-array"|"masked"} or
    {"sleep": s}."""

    def forward(self, batch):
        for info in batch:
            if info.get("fail") == "forward":
                raise RuntimeError("model exploded")
            if "sleep" in info:
                time.sleep(float(info["sleep"]))
        return batch

    def postprocess(self, output, task):
        fail = output.get("fail")
        if fail == "postprocess":
            raise KeyError("no such label")
        if fail == "json":
            return {"value": object()}
        if fail == "nan":
            return {"value": float("nan")}
        if fail == "nan-alone":
            return np.float32("nan")
        if fail == "inf-in-array":
            return {"label": "cat", "scores": [np.array([1.0, 2.0]), np.array([3.0, np.inf])]}
        if fail == "masked":  # the second value hidden: no answer may give it as a number
            return np.ma.masked_array([1.0, 2.0], mask=[False, True])
        return {"ok": True, "echo": output}


class BrokenSetup(Handle):
    def setup(self, device):
        raise FileNotFoundError(f"model file {self.args.get('model', 'missing.onnx')!r} not found")

    def forward(self, batch):
        return batch


class DiesQuietly(Handle):
    """Its setup says two lines (one to stderr) and ends the process, without a traceback: a CUDA library
    that runs out of memory and exits."""

    def setup(self, device):
        import os
        import sys

        print("loading weights", flush=True)
        print("CUDA error: out of memory", file=sys.stderr, flush=True)
        os._exit(1)

    def forward(self, batch):
        return batch


class NamesABadFile(Handle):
    """Its errors name a file whose name is not UTF-8, as Python decodes it (a lone surrogate): setup's
    while the file HandleArgs["marker"] exists, preprocess's for {"bad": true}, forward's for {"fail": true}."""

    BAD = os.fsdecode(b"/data/caf\xe9.onnx")

    def setup(self, device):
        if os.path.exists(self.args["marker"]):
            raise RuntimeError(f"cannot load {self.BAD}")

    def preprocess(self, task):
        if task["task_info"].get("bad"):
            raise ValueError(f"no such file: {self.BAD}")
        return task["task_info"]

    def forward(self, batch):
        if any(info.get("fail") for info in batch):
            raise RuntimeError(f"cannot open {self.BAD}")
        return batch


def decode_tiff(data: bytes):
    """A helper a handle's author has yet to write."""
    raise NotImplementedError("TIFF decoding: to do")


class NoForward(Handle):
    """A handle whose author forgot forward."""

    def postprocess(self, output, task):
        return output


class MisspeltForward(Handle):
    """forward spelt ``foward``; a property that raises until setup has run."""

    def foward(self, batch):
        return batch

    @property
    def session(self):
        raise RuntimeError("model not loaded yet")


class SetsForward(Handle):
    """Its forward is set in setup, as a compiled model's call may be: it doubles the inputs."""

    def setup(self, device):
        self.forward = lambda batch: [2 * x for x in batch]

    def preprocess(self, task):
        return task["task_info"]["value"]


class Payload(Handle):
    """Reports what kind of task_info arrived, for the body-decoding tests."""

    def forward(self, batch):
        return batch

    def postprocess(self, info, task):
        return {k: (f"<{len(v)} bytes>" if isinstance(v, bytes) else v) for k, v in info.items()}


class Parameters(Handle):
    """Answers with the request's parameters (the query string, to /predict) and its body's fields;
    refuses a request whose parameters say ``refuse``."""

    def preprocess(self, task):
        if "refuse" in task["parameters"]:
            raise ValueError(f"refused: {task['parameters']['refuse']}")
        return task["task_info"]

    def forward(self, batch):
        return batch

    def postprocess(self, info, task):
        return {"parameters": task["parameters"], "fields": sorted(info)}


class Greeting(Handle):
    """A handle with an ``__init__`` of its own, which HandleArgs are checked against."""

    def __init__(self, greeting, times=1):
        super().__init__(greeting=greeting, times=times)
        self.text = greeting.upper() * times  # a TypeError of its own when given a number

    def forward(self, batch):
        return [{"text": self.text} for _ in batch]


class Headers(Handle):
    """Answers with the request headers it was given (PassHeaders), to /predict and to the protocol."""

    def forward(self, batch):
        return batch

    def postprocess(self, output, task):
        if task.get("protocol") == "v2":
            return {"headers": [json.dumps(task["headers"], sort_keys=True)]}
        return {"headers": task["headers"]}


class OriginalStyle:
    """Written exactly as handles for the original easy-serve were: __init__(gpu), __call__(data)."""

    def __init__(self, gpu):
        self.gpu = int(gpu)

    def preprocess(self, data):
        data["task_info"]["doubled"] = data["task_info"]["n"] * 2
        return data

    def forward(self, data):
        data["task_info"]["gpu_seen"] = self.gpu
        return data

    def postprocess(self, data):
        data["state"] = "finish"
        return data

    def __call__(self, data):
        return self.postprocess(self.forward(self.preprocess(data)))


class TinyOnnx(Handle):
    """A small ONNX model (MatMul, Add, Relu) run by ONNX Runtime: {"x": [8 numbers]} -> 5 numbers."""

    def setup(self, device):
        self.session = device.onnx_session(tiny_model())

    def preprocess(self, task):
        return np.asarray(task["task_info"]["x"], dtype=np.float32)

    def forward(self, batch):
        return self.session.run(None, {"x": batch})[0]

    def postprocess(self, output, task):
        return output


def tiny_model() -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = rng.standard_normal((8, 5)).astype(np.float32)
    bias = rng.standard_normal(5).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["z"]),
         helper.make_node("Relu", ["z"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


class Args(Handle):
    """Answers with the HandleArgs it was built with."""

    def forward(self, batch):
        return [self.args] * len(batch)


class Crashing(Handle):
    """Dies on request: {"die": "exit"} calls os._exit(3), {"die": "kill"} SIGKILLs itself,
    {"die": "segfault"} reads address 0,
    {"die_once": path} dies only if ``path`` does not exist yet (creating it first),
    {"sleep": s} stalls, {"fail": true} raises (500); anything else is echoed with the worker's pid."""

    def forward(self, batch):
        for info in batch:
            if info.get("fail"):
                raise RuntimeError("failed on request")
            if info.get("die") == "exit":
                os._exit(3)
            if info.get("die") == "kill":
                os.kill(os.getpid(), 9)
            if info.get("die") == "segfault":
                import ctypes

                ctypes.string_at(0)
            marker = info.get("die_once")
            if marker and not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(1)
            if "sleep" in info:
                time.sleep(float(info["sleep"]))
        return [{"echo": info, "pid": os.getpid()} for info in batch]


class CrashesOnEveryBatch(Handle):
    """Sets up, then ends its process on every batch: a model that loads but crashes when it runs. A
    request {"refuse": true} is refused (400) before the model runs."""

    def preprocess(self, task):
        if task["task_info"].get("refuse"):
            raise ValueError("refused before the model ran")
        return task["task_info"]

    def forward(self, batch):
        os._exit(3)


class CrashesOnEveryBatchSlowly(CrashesOnEveryBatch):
    """The same, its setup taking HandleArgs["setup_s"]: a reload's first workers serve while the rest start."""

    def setup(self, device):
        time.sleep(float(self.args.get("setup_s", 0)))


class CrashesOnEveryBatchToo(CrashesOnEveryBatch):
    """The same, under another name: a second bad reload."""


class NotFoundByDesign(Handle):
    """A lookup whose every key is unknown: its run_batch answers each request 404, by design."""

    def run_batch(self, tasks):
        return [(404, "no such key") for _ in tasks]


class FailsOnRestart(Recorder):
    """Starts normally until the file HandleArgs["marker"] exists; from then on setup fails (its message
    followed by HandleArgs["pad"] characters, if given: a message quoting a whole file). HandleArgs
    "secret" puts a password on the message's second line ("lines"), or in a note added to the
    exception ("note")."""

    def setup(self, device):
        if os.path.exists(self.args["marker"]):
            secret = self.args.get("secret")
            if secret == "lines":
                raise RuntimeError("cannot connect\n  to postgres://admin:hunter2@db")
            if secret == "note":
                error = RuntimeError("cannot connect")
                error.add_note("dsn=postgres://admin:hunter2@db")
                raise error
            raise RuntimeError("GPU out of memory while loading weights" + "q" * self.args.get("pad", 0))
        super().setup(device)


class StartsOnce(Recorder):
    """Starts once; every later setup (in any process) fails, as a larger setting might for want of GPU
    memory. The starts are counted in the file HandleArgs["counter"]."""

    def setup(self, device):
        with open(self.args["counter"], "a") as counter:
            counter.write("x")
        if os.path.getsize(self.args["counter"]) > 1:
            raise RuntimeError("CUDA out of memory (a test's)")
        super().setup(device)


class FailsWhenCrowded(Recorder):
    """Starts every time, but its forward fails once more than one process has started (counted in the
    file HandleArgs["counter"]): a larger setting whose copies all load, then run out of GPU memory."""

    def setup(self, device):
        with open(self.args["counter"], "a") as counter:
            counter.write("x")
        super().setup(device)

    def forward(self, batch):
        if os.path.getsize(self.args["counter"]) > 1:
            raise RuntimeError("CUDA out of memory (crowded)")
        return super().forward(batch)


class FailsOnLargeBatches(Recorder):
    """Its forward fails on a batch of more than HandleArgs["most"] inputs (out of GPU memory on a large batch),
    and runs smaller ones."""

    def forward(self, batch):
        if len(batch) > int(self.args.get("most", 2)):
            raise RuntimeError(f"CUDA out of memory (a batch of {len(batch)})")
        return super().forward(batch)


class FailsAfter(Recorder):
    """Answers its first HandleArgs["most"] requests, then fails every one (a model that runs out of memory
    once its cache has filled)."""

    def setup(self, device):
        super().setup(device)
        self.answered = 0

    def forward(self, batch):
        self.answered += len(batch)
        if self.answered > int(self.args["most"]):
            raise RuntimeError("CUDA out of memory (full)")
        return super().forward(batch)


class OneCopyFits(Recorder):
    """Starts while no other process holds HandleArgs["lock"] (an exclusive lock, let go when the process
    ends), and fails otherwise: one copy of a model fits the GPU's memory, two do not."""

    def setup(self, device):
        import fcntl

        self.lock = open(self.args["lock"], "a")
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError("CUDA out of memory (another copy holds the GPU)") from None
        super().setup(device)


class ImageInfo(Handle):
    """Decodes the image a request carries (base64 JSON, raw bytes or a form file) and reports its size."""

    def preprocess(self, task):
        import io

        from PIL import Image

        from easyserve import payload_bytes

        with Image.open(io.BytesIO(payload_bytes(task["task_info"], "img"))) as image:
            image.load()  # decode it all: a truncated file fails here, not after its header
            return np.array(image.size)

    def forward(self, batch):
        return batch


class ImageSize(ImageInfo):
    """ImageInfo, answering a dict of outputs as the README's handles do (an inference request needs one)."""

    def postprocess(self, output, task):
        return {"size": output}


class Tensors(Handle):
    """For tensor bodies: describes the array a request brought; a float array is answered doubled,
    as an array (which the server sends as .npy when the client accepts it)."""

    def forward(self, batch):
        return batch

    def postprocess(self, info, task):
        data = info["data"]
        if isinstance(data, np.ndarray) and data.dtype.kind == "f":
            return data * 2
        if not isinstance(data, np.ndarray):
            return {"type": type(data).__name__}
        return {"dtype": str(data.dtype), "shape": list(data.shape), "sum": int(data.sum()),
                "c_order": bool(data.flags.c_contiguous), "writable": bool(data.flags.writeable),
                "content_type": info["content_type"]}


class Sizes(Handle):
    """Answers how many numbers a request brought: a tensor body (.npy), or every input of a v2 request."""

    def forward(self, batch):
        return batch

    def postprocess(self, info, task):
        if task.get("protocol") == "v2":
            return {"size": [sum(int(array.size) for array in info.values())]}
        return {"size": int(np.asarray(info["data"]).size)}


class Timeline(Handle):
    """Writes down when each call ran and on which thread, one JSON line per call to the file named by
    HandleArgs ``log``: ``{"stage", "start", "end", "thread", "values"}`` (monotonic clock, which all
    processes share on Linux). Takes ``{"value": n}``; ``preprocess_s`` and ``forward_s`` make the
    stages take time. ``{"reject": ...}`` fails its preprocess, ``{"oom": true}`` raises MemoryError
    there. A batch holding the value -1 waits in ``forward`` until the file HandleArgs ``gate`` names
    exists, so a test can queue requests behind it."""

    def setup(self, device):
        self.log = self.args["log"]
        self.gate = self.args.get("gate")
        self.preprocess_s = float(self.args.get("preprocess_s", 0.0))
        self.forward_s = float(self.args.get("forward_s", 0.0))

    def _record(self, stage, start, values):
        line = json.dumps({"stage": stage, "start": start, "end": time.monotonic(),
                           "thread": threading.get_ident(), "values": values})
        with open(self.log, "a") as f:  # one short append per line: lines from threads never interleave
            f.write(line + "\n")

    def preprocess(self, task):
        start = time.monotonic()
        info = task["task_info"]
        if "reject" in info:
            raise ValueError(f"rejected: {info['reject']}")
        if info.get("oom"):
            raise MemoryError("cannot allocate the picture")
        time.sleep(self.preprocess_s)
        self._record("preprocess", start, [info["value"]])
        return float(info["value"])

    def forward(self, batch):
        start = time.monotonic()
        values = [int(v) for v in batch]
        if -1 in values and self.gate:
            end = time.monotonic() + 30
            while not os.path.exists(self.gate) and time.monotonic() < end:
                time.sleep(0.01)
        time.sleep(self.forward_s)
        self._record("forward", start, values)
        return batch

    def postprocess(self, output, task):
        start = time.monotonic()
        time.sleep(self.preprocess_s)
        self._record("postprocess", start, [int(output)])
        return {"value": int(output)}


class Modèle(Recorder):
    """A class name that Python allows and ModelName's rule (ASCII) would not."""


class Spinner(Handle):
    """Spends ``spin_s`` (HandleArgs, default 0.01) seconds of CPU time on each request in ``forward``,
    and ``setup_s`` (default 0) in ``setup``."""

    def setup(self, device):
        self.spin_s = float(self.args.get("spin_s", 0.01))
        spin(float(self.args.get("setup_s", 0.0)))

    def forward(self, batch):
        spin(self.spin_s * len(batch))
        return [0] * len(batch)

    def postprocess(self, output, task):
        return {"spun_s": self.spin_s}


def spin(seconds: float) -> None:
    end = time.thread_time() + seconds  # CPU time, not wall time: preemption cannot shorten it
    while time.thread_time() < end:
        pass


class Thumbnail(Handle):
    """Answers a request ``{"w": W, "h": H, "as": ...}`` with a grey W x H PNG whose shade is W % 256:
    ``as`` "binary" (default) as easyserve.Binary, "bytes" as plain bytes (base64 JSON), "nested" as
    ``{"png": Binary}`` (and so for any v2 request), "bad_type" with a Content-Type that would end its
    header line ("bad_type_later", "bad_data_later": a bad Content-Type, or data, set after it was made),
    "enum" with a Content-Type that a str Enum holds, "big" as ``w * 1000`` random bytes (seeded by
    ``h``) of application/octet-stream."""

    def preprocess(self, task):
        return task["task_info"]

    def forward(self, batch):
        return batch

    def postprocess(self, req, task):
        import io

        from PIL import Image

        from easyserve import Binary

        if task.get("protocol") == "v2":  # an inference request: a dict of outputs, which cannot hold one
            req = {"w": 4, "h": 4, "as": "nested"}
        kind = req.get("as", "binary")
        if kind == "big":
            return Binary(np.random.default_rng(req["h"]).bytes(req["w"] * 1000))
        if kind == "html":  # a report a handle renders
            return Binary(b"<html><head><title>a report</title></head></html>", "text/html; charset=utf-8")
        out = io.BytesIO()
        Image.new("L", (req["w"], req["h"]), req["w"] % 256).save(out, format="PNG")
        png = out.getvalue()
        if kind == "bytes":
            return png
        if kind == "nested":
            return {"png": Binary(png, "image/png")}
        if kind == "bad_type":
            return Binary(png, "image/png\r\nSet-Cookie: x=1")
        if kind in ("bad_type_later", "bad_data_later"):  # checked when set, as when given
            answer = Binary(png, "image/png")
            if kind == "bad_type_later":
                answer.content_type = "image/png\r\nSet-Cookie: x=1"
            else:
                answer.data = None
            return answer
        if kind == "enum":  # a media type a str Enum holds (defined here: no other process could import it)
            import enum

            class Media(str, enum.Enum):
                PNG = "image/png"

            return Binary(png, Media.PNG)
        return Binary(png, "image/png")


class ReadsArgs(Handle):
    """No ``__init__`` of its own: ``setup`` reads ``threshold`` from ``self.args`` (0.5 when not
    given), and every request is answered with it."""

    def setup(self, device):
        self.threshold = self.args.get("threshold", 0.5)
        self.top_p = self.args.get("top_p", 1.0)

    def forward(self, batch):
        self.args.get("top_k")  # asked for only while requests run
        return [{"threshold": self.threshold} for _ in batch]


class TakesArgs(ReadsArgs):
    """Takes ``model`` as its ``__init__``'s parameter, reads it there and passes it on to Handle's, as the
    built-in and example handles do; other keys go on to ``self.args`` too."""

    def __init__(self, model="m.onnx", **rest):
        super().__init__(model=model, **rest)
        self.model = model


class RefusesInItsOwnRunBatch(Handle):
    """Its own run_batch raises BadRequest for a batch holding {"refuse": true}; echoes otherwise."""

    def run_batch(self, tasks):
        from easyserve.errors import BadRequest

        if any(task["task_info"].get("refuse") for task in tasks):
            raise BadRequest("this model takes no refuse")
        return [(200, task["task_info"]) for task in tasks]


class SelfLess(Handle):
    """Its preprocess leaves out self."""

    def preprocess(task):  # noqa: N805  (the mistake this handle makes)
        return task["task_info"]

    def forward(self, batch):
        return batch


class AsyncPreprocess(Handle):
    """Its preprocess is a coroutine function."""

    async def preprocess(self, task):
        return task["task_info"]

    def forward(self, batch):
        return batch


class AsyncSetup(Handle):
    """Its setup is a coroutine function: run as easyserve calls it, it sets nothing up."""

    async def setup(self, device):
        self.scale = 2

    def forward(self, batch):
        return [x * self.scale for x in batch]


class MisCalled(Handle):
    """A preprocess set in setup takes no task (a TypeError of the call itself); ``{"interrupt": true}``
    has the next one raise KeyboardInterrupt."""

    def setup(self, device):
        self.preprocess = lambda: None

    def forward(self, batch):
        return batch


class Interrupts(Handle):
    """Its preprocess raises KeyboardInterrupt, as a library's code may."""

    def preprocess(self, task):
        raise KeyboardInterrupt

    def forward(self, batch):
        return batch


class ForgetsReturn(Handle):
    """Its preprocess computes a value and forgets to return it."""

    def preprocess(self, task):
        task["task_info"]["x"] * 2

    def forward(self, batch):
        return [x * 2 for x in batch]


class ForgetsPostprocessReturn(Handle):
    """Its postprocess computes an answer and forgets to return it, but for {"keep": true}."""

    def forward(self, batch):
        return batch

    def postprocess(self, output, task):
        answer = {"x": output["x"]}
        if output.get("keep"):
            return answer


class OpensRelative(Handle):
    """Its setup opens a file by a relative path, read from wherever the server was started."""

    def setup(self, device):
        with open("labels-beside-the-config.txt") as labels:
            self.labels = labels.read().split()

    def forward(self, batch):
        return batch


class RunsMissingTool(Handle):
    """Its setup runs a program that is not installed (an engine builder, say)."""

    def setup(self, device):
        import subprocess

        subprocess.run(["easyserve-no-such-tool", "--build"], check=True)

    def forward(self, batch):
        return batch


class CpuSideModel(Handle):
    """An ONNX model it asks to run on the CPU, whatever the worker's device (a small model beside one on
    a GPU): the built-in demo's iris classifier."""

    def setup(self, device):
        from easyserve.builtin import demo_model

        self.session = device.onnx_session(demo_model(), providers=["CPUExecutionProvider"])

    def forward(self, batch):
        return batch


class Doubles(Handle):
    """Answers twice its request's "x", as an array (the default postprocess: the row itself)."""

    def preprocess(self, task):
        return np.asarray(task["task_info"]["x"], dtype=np.float32)

    def forward(self, batch):
        return batch * 2
