"""The handle contract: what a user writes to put a model behind easyserve.

A handle is set up once per worker process and then runs batches::

    from easyserve import Handle

    class Classifier(Handle):
        def __init__(self, model="models/resnet18-v1-7.onnx"):   # HandleArgs arrive here
            self.model = model

        def setup(self, device):              # once per worker, in the worker process
            self.session = device.onnx_session(self.model)

        def preprocess(self, task):           # {"task_id", "task_info", ...} -> one model input
            return decode(task["task_info"]["img"])

        def forward(self, batch):             # inputs stacked to [N, ...] -> outputs with first dim N
            return self.session.run(None, {"data": batch})[0]

        def postprocess(self, output, task):  # one output row -> a JSON-able result
            return {"class": int(output.argmax())}

An exception in ``preprocess`` fails that request alone (HTTP 400), unless only the handle's own code
can have raised it (a ``NameError``, an ``ImportError``, an attribute missing on ``self``, a key missing
on ``task`` itself: HTTP 500, with its traceback in the log); one in ``forward`` fails its batch (HTTP
500), which is then run again in parts, so that only the requests that fail alone fail. ``forward`` may raise
:class:`~easyserve.errors.BadRequest` for values it cannot take (an id past a table): the request that
raises it alone gets the 400. Raised in ``preprocess`` or ``postprocess`` (an option the request gave
that the handle cannot take), it is that request's answer, with its own status and message. (A
handle's own ``run_batch`` answers each request's status itself; one that raises ``BadRequest`` gets
the 400 in a batch of one, and the batch's 500 otherwise.)
``preprocess`` and ``postprocess`` run on several threads at once (``PreprocessThreads``), and a
batch's ``preprocess`` calls all run before its ``postprocess`` calls: what belongs to one request
travels in what ``preprocess`` returns (or in its ``task``), never on ``self``, whose value would be
another request's. ``PreprocessThreads: 1`` is for objects that may not be called from two threads
at once, not for that.
A ``MemoryError`` anywhere ends the worker process: it is replaced and its batch retried (but a
request that has ``preprocess`` ask for an array larger than the machine's memory gets its 400).
A class written for the original easy-serve (``__init__(self, gpu)`` and ``__call__(data)``) runs
unchanged, one request at a time.

The same handle answers the Open Inference Protocol (``POST /v2/models/<name>/infer``). Its metadata
comes from two class attributes, lists of :class:`~easyserve.Tensor` (name, datatype, shape per
request, ``-1`` for a free dimension)::

    class Classifier(Handle):
        inputs = [Tensor("pixels", "UINT8", [-1, -1, 3])]
        outputs = [Tensor("scores", "FP32", [1000]), Tensor("label", "BYTES", [1])]

A request whose inputs disagree with them is refused (400) before it reaches the handle; a handle
that declares nothing gets whatever inputs come, and its metadata lists none. For such a request,
``task["protocol"]`` is ``"v2"``, ``task["task_info"]`` holds the inputs by name as numpy arrays
(BYTES as arrays of ``bytes``; a client's leading batch dimension taken off where the handle
declares its inputs: one that declares none gets each as it was sent), and
``task["parameters"]`` the request's parameters; ``postprocess`` returns a dict of output name ->
array-like (numbers, or strings for BYTES), each sent back as an output tensor, cast to the datatype
``outputs`` declares for it. Inputs sent as binary data are arrays on the request's own bytes, not
copies.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import difflib
import enum
import itertools
import json
import logging
import math
import os
import re
import stat
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import orjson

from .bodies import Binary
from .pipeline import Traced, failure_message, finish, handle_errors, named, prepare, print_fault
from .tensors import COMPLEX_HINT, Tensor, from_torch, is_torch_tensor

_log = logging.getLogger("easyserve")

try:  # SIMD base64: an 844 kB field (a 1920x1200 JPEG) in 0.05 ms, where the standard library takes 2.1
    from pybase64 import b64decode as _fast_b64decode
except ImportError:  # a dependency: absent only where easyserve was copied in without its requirements
    _fast_b64decode = None

__all__ = ["Handle", "Device", "payload_bytes"]


@dataclasses.dataclass(frozen=True)
class Device:
    """Where a worker runs, as its handle sees it.

    ``gpu`` is the GPU id from the config (``None`` on CPU). Only that GPU is visible in the worker
    (``CUDA_VISIBLE_DEVICES`` is set before the process starts), so inside it the GPU is always
    index 0: use ``torch_device`` or ``providers`` rather than the id. ``threads`` is this worker's
    share of the CPU cores, which ``session_options`` hands to ONNX Runtime. ``config_dir`` is the
    folder of the config file (for a config made in Python, the directory it was made in): ``path``
    finds a file a HandleArgs value names beside it, wherever the server was started from.
    """

    kind: str = "cpu"
    gpu: int | None = None
    threads: int = 1
    name: str = "cpu/0"
    config_dir: str | None = None

    def path(self, path: str | os.PathLike) -> Path:
        """Where the file ``path`` names is: an absolute path as it is; a relative one beside the config
        file, else from the current directory, else one folder up from the config (a project's root,
        for a config in its ``configs/``, where handles are found too). A file in none of them gives
        the path beside the config, for the error that follows to name (see :meth:`find`)."""
        places = self.places(path)
        return next((place for place in places if _there(place)), places[0])

    def places(self, path: str | os.PathLike) -> list[Path]:
        """Where :meth:`path` looks for ``path``, in its order, each folder once."""
        return places_near(path, self.config_dir)

    def find(self, path: str | os.PathLike, what: str = "file") -> Path:
        """:meth:`path`, for a file that must be there: a :class:`~easyserve.ConfigError` naming each
        place looked in when it is in none (the config's mistake: a worker started again would not find
        it either, so ``--supervise`` does not try)."""
        from .errors import ConfigError

        found = self.path(path)
        if _there(found, Path.is_file) and os.access(found, os.R_OK):
            return found
        for place in self.places(path):  # a folder, or a named pipe (whose open waited for a writer, for ever)
            kind = _not_a_file(place)
            if kind is not None:
                raise ConfigError(f"{what} {os.fspath(place)!r} is a {kind}, not a file")
        denied = next((place for place in self.places(path) if _denied(place)), None)
        if denied is not None:  # ONNX Runtime said "system error number 13"; a missing file was said of it too
            raise ConfigError(f"{what} {os.fspath(denied)!r} cannot be read by this process (user id {os.getuid()}): "
                              "permission denied; make it readable to that user (chmod a+r), and its folders")
        looked = ", ".join(str(place) for place in self.places(path))
        raise ConfigError(f"no {what} {os.fspath(path)!r} (looked for {looked})")

    @property
    def is_gpu(self) -> bool:
        return self.kind == "cuda"

    @property
    def torch_device(self) -> str:
        """``"cuda:0"`` on a GPU worker, else ``"cpu"``."""
        return "cuda:0" if self.is_gpu else "cpu"

    def providers(self) -> list:
        """ONNX Runtime execution providers for this device, best first, CPU always last."""
        if not self.is_gpu:
            return ["CPUExecutionProvider"]
        import onnxruntime as ort

        available = ort.get_available_providers()
        chosen: list = []
        if "CUDAExecutionProvider" in available:
            chosen.append(("CUDAExecutionProvider", {"device_id": 0}))
        return chosen + ["CPUExecutionProvider"]

    def session_options(self):
        """``onnxruntime.SessionOptions`` sized to this worker's share of the cores."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        return options

    def onnx_session(self, model: str | os.PathLike | bytes, **kwargs: Any):
        """An ``onnxruntime.InferenceSession`` on this device, with this worker's thread budget; a relative
        ``model`` path found as :meth:`find` finds it (beside the config file, from here, one folder up
        from the config), a config error naming each place when it is in none: ONNX Runtime's own names
        one place, and failed every start again."""
        import onnxruntime as ort

        chosen = kwargs.get("providers")  # the handle's own choice; else this device's
        kwargs.setdefault("providers", self.providers())
        kwargs.setdefault("sess_options", self.session_options())
        if not isinstance(model, bytes):
            model = os.fspath(self.find(model, "model file"))
        session = ort.InferenceSession(model, **kwargs)
        placed = session.get_providers()
        _PLACED.extend(p for p in placed if p not in _PLACED)  # what the worker reports
        # ONNX Runtime falls back to the CPU where its CUDA provider is missing or fails to load, and the
        # worker served from the CPU, slowly, reported as on the GPU; not a session the handle asked to
        # run on the CPU (a small model beside one on the GPU)
        if self.is_gpu and placed == ["CPUExecutionProvider"] and not _cpu_only(chosen):
            _log.warning("ONNX Runtime runs this GPU worker's model on the CPU: %s",
                         _why_on_the_cpu(ort.get_available_providers()))
        _tell_standin(session, model, self.name)
        return session


def places_near(path: str | os.PathLike, config_dir: str | os.PathLike | None) -> list[Path]:
    """Where a file a config names is looked for, in order, each folder once: an absolute path as it is; a
    relative one beside the config (in ``config_dir``), from the current directory, then one folder up
    from the config. With no config, the path as it is."""
    path = Path(path).expanduser()
    if path.is_absolute() or config_dir is None:
        return [path]
    config_dir = Path(config_dir)
    found: dict[Path, Path] = {}
    for place in (config_dir / path, Path.cwd() / path, config_dir.parent / path):
        found.setdefault(place.absolute(), place)
    return list(found.values())


def _tell_standin(session: Any, model: str | bytes, worker: str) -> None:
    """Warn, from the first worker on each device, where ``session``'s model is an offline stand-in
    (``easyserve models demo``: random weights): any handle's, not the examples' alone, whose answers
    read as a model's and mean nothing. (Every worker said it, and a sweep's cell showed it once each.)"""
    from .standins import STANDIN_KEY

    name = session.get_modelmeta().custom_metadata_map.get(STANDIN_KEY)
    if name and worker.endswith("/0"):
        shown = "the model" if isinstance(model, bytes) else _from_here(model)
        _log.warning("%s is an offline stand-in with random weights: answers have the right form but mean "
                     "nothing; `easyserve models fetch %s` gets the real model", shown, name)


def _from_here(path: str) -> str:
    """``path`` as the user would name it: from the current directory where it lies under it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path


def _cpu_only(providers: Any) -> bool:
    """Whether ``providers`` (an InferenceSession's argument: names, or (name, options) pairs) name the
    CPU's alone."""
    return providers is not None and all((p if isinstance(p, str) else p[0]) == "CPUExecutionProvider"
                                         for p in providers)


def _why_on_the_cpu(available: list[str]) -> str:
    if "CUDAExecutionProvider" in available:
        return ("its CUDA provider failed to load (ONNX Runtime's error is above: the CUDA and cuDNN it needs "
                "are not those installed)")
    return "the onnxruntime installed has no CUDA provider (pip install onnxruntime-gpu, in place of onnxruntime)"


def _there(path: Path, test: Callable[[Path], bool] = Path.exists) -> bool:
    """``path.exists()`` (or ``test``), false where a folder on the way may not be entered (Python 3.11
    raises there)."""
    try:
        return test(path)
    except OSError:
        return False


def _not_a_file(path: Path) -> str | None:
    """What ``path`` is, where it is there and not a regular file (``None`` otherwise)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    kinds = ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "named pipe (FIFO)"), (stat.S_ISSOCK, "socket"),
             (stat.S_ISCHR, "device"), (stat.S_ISBLK, "device"))
    return next((kind for test, kind in kinds if test(mode)), None)


def _denied(path: Path) -> bool:
    """Whether ``path`` is there, as a file this process may not read, or in a folder it may not enter.
    Opened without waiting: a named pipe's open waits for a writer."""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
        return False
    except PermissionError:
        return True
    except OSError:
        return False


_PLACED: list[str] = []  # the providers this process's ONNX Runtime sessions run on, in order


def onnx_providers_placed() -> list[str]:
    """The ONNX Runtime providers this worker's sessions (made by :meth:`Device.onnx_session`) run on."""
    return list(_PLACED)


class HandleArgs(dict):
    """``self.args``: the config's HandleArgs, a dict that notes which keys the handle read and which it
    asked for and lacked. After the first batch, :meth:`misspelt` pairs a key asked for and lacking
    with a given key spelt nearly alike that was never read (``threshold`` asked for, ``treshold``
    given): the handle ran on its own default, silently, where its user meant their value. A given
    key that the handle did read is no misspelling, though spelt nearly alike (``top_p`` given and
    read, ``top_k`` asked for and lacking: two settings)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read: set = set()  # keys given and read
        self._lacked: set = set()  # keys asked for and not given
        self._taken = False  # given to the handle's own __init__ (see taken_by_init)

    def _asked(self, key: Any) -> bool:
        found = dict.__contains__(self, key)
        (self._read if found else self._lacked).add(key)
        return found

    def get(self, key: Any, default: Any = None) -> Any:
        self._asked(key)
        return dict.get(self, key, default)

    def __contains__(self, key: object) -> bool:
        return self._asked(key)

    def __getitem__(self, key: Any) -> Any:
        self._asked(key)
        return dict.__getitem__(self, key)

    def _all_read(self) -> None:
        self._read.update(dict.keys(self))

    def __iter__(self) -> Any:  # dict(self.args), **self.args, a loop: every key read
        self._all_read()
        return dict.__iter__(self)

    def keys(self) -> Any:
        self._all_read()
        return dict.keys(self)

    def items(self) -> Any:
        self._all_read()
        return dict.items(self)

    def values(self) -> Any:
        self._all_read()
        return dict.values(self)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self._read.add(key)  # given or not, it is set now, and read
        return dict.setdefault(self, key, default)

    def misspelt(self) -> list[tuple[str, str]]:
        """(asked for and lacking, given and never read, spelt nearly alike) pairs."""
        unread = self._never_read()
        pairs = []
        for key in sorted(k for k in self._lacked if isinstance(k, str)):
            close = difflib.get_close_matches(key, unread, n=1, cutoff=0.75)
            if close:
                pairs.append((key, close[0]))
        return pairs

    def taken_by_init(self) -> None:
        """They were given to the handle's own ``__init__``, which may have read them from its ``**kw``,
        where no read is seen, before passing them on here (OnnxModel, the examples): none is called
        unread. A key asked for here and lacking is still paired with one spelt nearly alike."""
        self._taken = True

    def unread(self) -> list[str]:
        """The keys given and never read, in the order given (none where ``__init__`` took them)."""
        return [] if self._taken else self._never_read()

    def _never_read(self) -> list[str]:
        return [k for k in dict.keys(self) if isinstance(k, str) and k not in self._read]


def tell_misspelt_args(handle: Any) -> None:
    """Log, once a worker's first batch is done, the HandleArgs its handle lacked and was given spelt
    nearly alike (see :class:`HandleArgs`), and the others given that it has not read: ``model:
    other.onnx`` for a handle that never reads ``model`` did nothing, and its user believed that model
    served."""
    args = getattr(handle, "args", None)
    if not isinstance(args, HandleArgs):
        return
    paired = set()
    for lacked, given in args.misspelt():
        paired.add(given)
        _log.warning("HandleArgs: the handle asked for %r, which was not given, and never read %r, which was: "
                     "misspelt?", lacked, given)
    unread = [key for key in args.unread() if key not in paired]
    if unread:
        _log.warning("HandleArgs: the handle has not read %s, given in the config, by the end of its first batch: "
                     "a key it does not know does nothing (misspelt, or meant for another handle?); one it reads "
                     "only for some requests is fine", ", ".join(map(repr, unread)))


class Handle:
    """Base class of batch-aware handles. Override ``setup``, ``preprocess``, ``forward``, ``postprocess``.

    ``HandleArgs`` from the config are passed to ``__init__`` as keyword arguments; the default
    ``__init__`` keeps them in ``self.args``. ``stack`` and ``unstack`` turn per-request inputs into a
    batch and outputs back into rows; override them for inputs that do not stack (variable sizes).
    """

    # The model's inputs and outputs as the Open Inference Protocol's metadata lists them (see above).
    inputs: Sequence[Tensor] = ()
    outputs: Sequence[Tensor] = ()

    def __init__(self, /, **args: Any) -> None:  # positional: HandleArgs may hold a "self"
        self.args = HandleArgs(args)

    def setup(self, device: Device) -> None:
        """Load the model. Runs once in each worker process, before it takes requests."""

    def preprocess(self, task: dict) -> Any:
        """One request (``{"task_id": ..., "request_id": ..., "parameters": {...}, "headers": {...},
        "task_info": {...}}``) to one model input. ``request_id`` is what the client's answer
        (``X-Request-Id``) and the log call it: the client's own id where it sent one, the same each time
        a request is sent again. ``parameters`` are the request's options from its query string
        (``/predict?top_k=5``: ``{"top_k": "5"}``, strings; a name given twice, a list of its values),
        ``{}`` without one. ``headers`` are those of its headers the config's ``PassHeaders`` names
        (``{"x-tenant": "acme"}``: names in lower case), ``{}`` when it names none."""
        return task["task_info"]

    def forward(self, batch: Any) -> Any:
        """Run the model on a stacked batch; return outputs whose first dimension is the batch size.
        Leave the batch's items as they are: a batch that raises is run again in parts, on the same
        inputs (those :meth:`stack` passes as a list, dicts say, and not arrays it copies)."""
        raise NotImplementedError(f"{type(self).__name__} must define forward(self, batch)")

    def postprocess(self, output: Any, task: dict) -> Any:
        """One row of the output to the JSON-able answer for that request."""
        return output

    def stack(self, inputs: list) -> Any:
        """Stack preprocessed inputs into what ``forward`` gets.

        Arrays of one shape become one array (numbers of different types in the type that holds them
        all, as numpy promotes them: an int32 request batched with an int64 one gives int64, float32
        with float64 float64, and integers with float64, as JSON's numbers come, float64. But integers
        join no narrower float, each type running as it would alone: uint8 pixels batched with float32
        ones were made floats of 0-255 and answered, where alone they failed; nor do bools join
        numbers, nor integers past 2**53 floats, which would round them);
        numbers, a 1-d array; dicts and tuples whose values are all numpy arrays or torch tensors (several model
        inputs) are stacked field by field. Anything else (JSON objects, strings) is passed on as a
        list, one item per request.
        """
        first = inputs[0]
        if _stacks_as_torch(inputs):  # tensors preprocess made: as a tensor, on the device they are on
            import torch

            return torch.stack(inputs)
        if _numeric(first) and all(_numeric(x) for x in inputs):
            # as the 0-d arrays they stand for, by the arrays' rules: JSON's 2**53 + 1 beside another
            # request's 0.5 came back 2**53, a numpy bool beside a float 1.0
            arrays = [np.asarray(x) for x in inputs]
            return np.stack(arrays) if _stacks(arrays) else list(inputs)
        if isinstance(first, np.ndarray) and _stacks(inputs):
            return np.stack(inputs)
        if isinstance(first, dict) and first and all(_array_like(v) for v in first.values()) and all(
            isinstance(x, dict) and x.keys() == first.keys() for x in inputs
        ):
            return {key: self.stack([x[key] for x in inputs]) for key in first}
        if isinstance(first, tuple) and first and all(_array_like(v) for v in first) and all(
            isinstance(x, tuple) and len(x) == len(first) for x in inputs
        ):
            return tuple(self.stack([x[i] for x in inputs]) for i in range(len(first)))
        return list(inputs)

    def unstack(self, outputs: Any, n: int) -> list:
        """Split ``forward``'s outputs into ``n`` rows (the inverse of ``stack``).

        An array (or a dict of arrays) is split along its first dimension, which must be the batch: a
        result whose size differs from request to request (a detector's boxes) goes as a list of ``n``
        results, one a request, not as arrays concatenated over the batch, which, were their length
        ``n``, would be split one a request, each request getting others' rows. Several model outputs come
        as a tuple, each with first dimension ``n``. A list is either one result per request (``n``
        items) or, as ONNX Runtime's ``session.run`` returns it, a model's outputs, each with first
        dimension ``n``. Only a list of ``n`` arrays each with first dimension ``n`` can be both: it
        is read the way this handle's lists were read in a batch where only one way fitted. Before
        there has been one (in this worker), a batch of one reads it as its one result; a larger batch
        fails (500), rather than risk giving each request another's rows: return a tuple for a
        model's outputs, or an array or a list of dicts for one result per request.

        PyTorch tensors are taken as the numpy arrays they hold (on the CPU, off the autograd graph):
        postprocess gets numpy, not torch. A row keeps the type its batch's outputs came as: a named
        tuple's (``row.logits``), or a model output's that can be made from a dict.
        """
        outputs = _from_torch_outputs(outputs)
        if isinstance(outputs, np.ndarray) and outputs.ndim and len(outputs) == n:
            return list(outputs)
        if isinstance(outputs, dict) and outputs and all(_rows(v) == n for v in outputs.values()):
            rows = [{k: v[i] for k, v in outputs.items()} for i in range(n)]
            return rows if type(outputs) is dict else _remade(type(outputs), rows)
        if isinstance(outputs, tuple) and outputs and all(_rows(v) == n for v in outputs):
            return _columns(outputs, n)
        if isinstance(outputs, list) and outputs:
            columns = all(_rows(v) == n for v in outputs)
            learnt = getattr(self, "_easyserve_lists", None)
            if len(outputs) == n and columns:  # both readings fit: go by this handle's earlier batches
                if learnt == "outputs":
                    return _columns(outputs, n)
                if learnt == "requests" or n == 1:  # one request: both readings give it its own rows
                    if learnt is None and not getattr(self, "_easyserve_lone_told", False):
                        self._easyserve_lone_told = True  # a batch will read such a list as a model's outputs
                        _log.warning(
                            "forward returned a list of 1 array with first dimension 1 for a request alone: read as "
                            "its one result (postprocess gets the array, batch dimension and all). If it is a "
                            "model's outputs, as session.run gives them, a batch reads it so, and postprocess "
                            "gets a tuple of rows instead: return tuple(outputs) for a model's outputs, or an "
                            "array or a list of dicts for one result per request, the same either way")
                    return outputs
                raise ValueError(
                    f"forward returned a list of {n} arrays, each with first dimension {n}, for a batch of {n}: "
                    f"either a model's {n} outputs or one result per request, and this worker has not seen "
                    f"which yet. Return tuple(outputs) for a model's outputs (as session.run gives them), "
                    f"or an array, or a list of dicts, for one result per request")
            if len(outputs) == n or columns:
                reading = "requests" if len(outputs) == n else "outputs"
                arrays = all(isinstance(v, np.ndarray) for v in outputs)  # what both readings can be made of
                if arrays and learnt not in (None, reading):
                    raise ValueError(
                        f"forward returned a list that reads only as {_READINGS[reading]} for a batch of {n}, "
                        f"where this worker's earlier lists were {_READINGS[learnt]}. Return tuple(outputs) for "
                        f"a model's outputs, or an array, or a list of dicts, for one result per request")
                if reading == "requests" and arrays and learnt is None and n > 1 and any(
                        _rows(v) == n for v in outputs) and len({(v.ndim, v.dtype) for v in outputs}) > 1:
                    # a model's outputs, one of them without a batch dimension, read as one result
                    # per request, gave each request another's rows. Arrays that differ in rank or
                    # type are a model's several outputs; one model's results for each request
                    # (a detector's boxes, as many as it found) do not differ so
                    raise ValueError(
                        f"forward returned a list of {n} arrays for a batch of {n}, some with first dimension "
                        f"{n}: either a model's outputs, one without a batch dimension, or one result per "
                        f"request, and this worker has not seen which yet. Return tuple(outputs) for a "
                        f"model's outputs, or an array, or a list of dicts, for one result per request")
                self._easyserve_lists = reading
                return outputs if reading == "requests" else _columns(outputs, n)
        results = "1 result" if n == 1 else f"{n} results"
        raise ValueError(
            f"forward returned {_describe(outputs)} for a batch of {n}; return an array, a tuple or dict "
            f"of arrays with first dimension {n}, or a list of {results} (or override unstack). A result "
            f"whose size differs from request to request (boxes) goes as a list, one a request: "
            f"concatenated over the batch, its rows would go to the wrong requests whenever their counts "
            f"happened to add up to the batch's size"
        )

    def run_batch(self, tasks: list[dict]) -> list[tuple[int, Any]]:
        """Run one batch; one ``(status, result or message)`` per task: 200 with the result, a 4xx with
        a message for the request's own fault (400, or 404, 422... answered as given), or 500 with a
        message for the handle's (any other status is answered 500). The worker calls this only for a
        handle that overrides it; otherwise it runs the same stages itself, in threads and overlapped
        (see :mod:`easyserve.pipeline`)."""
        return finish(self, prepare(self, tasks))


class LegacyHandle(Handle):
    """Runs a handle written for the original easy-serve: ``cls(gpu)`` then ``instance(data)`` per request."""

    def __init__(self, cls: type, **args: Any) -> None:
        super().__init__(**args)
        self.cls = cls
        self.instance: Any = None

    def setup(self, device: Device) -> None:
        # The original passed the GPU id as a string; inside the worker the chosen GPU is index 0.
        self.instance = self.cls("0", **self.args) if self.args else self.cls("0")

    def run_batch(self, tasks: list[dict]) -> list[tuple[int, Any]]:
        results = []
        for task in tasks:
            try:
                results.append((200, self.instance(task)))
            except MemoryError:
                raise
            except handle_errors() as exc:
                print_fault(f"{type(self.instance).__name__} failed for {named([task])}")
                results.append((500, Traced(failure_message(type(self.instance).__name__, exc))))
        return results


def payload_bytes(task_info: dict, key: str = "img") -> bytes:
    """The bytes a request carried, however it was sent.

    Accepts a base64 string under ``key`` in a JSON body (the original format), a file part named
    ``key`` in a multipart form, or a raw body (``image/*``, ``application/octet-stream``), which
    easyserve delivers as ``{"data": <bytes>, "content_type": ...}``; or, in an inference request of
    the Open Inference Protocol, an input named ``key`` of one BYTES element. Raises ``ValueError``
    with a message for the client otherwise.
    """
    value = task_info.get(key, task_info.get("data"))
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        text = value.split(",", 1)[1] if value[:5].lower() == "data:" and "," in value else value
        try:
            return _b64decode(text)
        except (binascii.Error, ValueError):
            return _b64decode_as_written(text, key, len(value) - len(text))
    if value is None:
        raise ValueError(
            f"missing {key!r}: send {{{key!r}: <base64>}} as JSON, a form file named {key!r}, or raw bytes"
        )
    if key not in task_info and isinstance(value, np.ndarray):  # the body was a tensor: no bytes, no base64
        raise ValueError(f"the body is a tensor ({value.dtype} {list(value.shape)}), where this handle takes bytes "
                         f"(an image file): send the file itself, raw or as {{{key!r}: <base64>}}")
    if isinstance(value, np.ndarray):  # an input of the Open Inference Protocol's: one BYTES element is the bytes
        if value.dtype == object and value.size == 1 and isinstance(value.reshape(-1)[0], (bytes, bytearray)):
            return bytes(value.reshape(-1)[0])
        held = f"{value.size} BYTES elements" if value.dtype == object else f"{value.size} {value.dtype} value(s)"
        raise ValueError(f"{key!r} is a tensor of {held}, where this handle takes bytes (an image file): send "
                         "one BYTES element")
    if isinstance(value, list) and value and all(isinstance(v, (bytes, bytearray, str)) for v in value):
        # a form of two files (or fields) under one name reads as a list of them, as a JSON array does
        raise ValueError(f"{key!r} is a list of {len(value)}: send one picture, as one base64 string or one form "
                         f"file named {key!r}")
    raise ValueError(f"{key!r} must be a base64 string, got {type(value).__name__}")


def _b64decode(text: str | bytes) -> bytes:
    """Strict base64 (no characters outside the alphabet), as ``base64.b64decode(text, validate=True)``
    decodes it, and as fast as pybase64 can where it is installed. pybase64 refuses a little more than
    the standard library does (padding after a complete group, as in ``"QUJD===="``): what it refuses
    is tried again by the standard library, so a request decodes here exactly where it decoded before."""
    if _fast_b64decode is not None:
        try:
            return _fast_b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            pass
    return base64.b64decode(text, validate=True)


_URL_SAFE = str.maketrans("-_", "+/")
_NOT_BASE64 = re.compile(r"[^A-Za-z0-9+/\-_=\s]")
_LAST_DIGIT = re.compile(r"[^=\s][=\s]*\Z")  # linear: the runs after each character it tries are disjoint


def _b64decode_as_written(text: str, key: str, offset: int = 0) -> bytes:
    """Base64 that the strict decoder refused, as tools commonly write it: in lines (``base64 file``,
    ``base64.encodebytes``: a newline every 76 characters), with a newline at its end (``base64 -w0 f;
    echo``), in the URL-safe alphabet (``-`` and ``_``), its ``=`` padding left off. Each was a bare
    "not valid base64", with nothing to say why. What is still not base64 is a ``ValueError`` naming
    the first thing wrong with it, where it is in what the client sent (``offset``: a data: URI's head).
    Linear in the text, whatever it holds: a regular expression that backtracked over a run of ``=``
    held a worker for minutes."""
    bad = f"{key!r} is not valid base64"
    joined = "".join(text.split())  # whitespace anywhere, as MIME's lines have it
    url_safe = "-" in joined or "_" in joined
    if url_safe and ("+" in joined or "/" in joined):
        raise ValueError(f"{bad}: it mixes the standard alphabet ('+', '/') with the URL-safe one ('-', '_')")
    stray = _NOT_BASE64.search(text)
    if stray:
        raise ValueError(f"{bad}: {stray[0]!r} at character {offset + stray.start()} is not a base64 character")
    last = _LAST_DIGIT.search(text)  # where the padding and whitespace at the end begin
    early = text.find("=", 0, last.start() if last else 0)
    if early >= 0:
        raise ValueError(f"{bad}: padding ('=') at character {offset + early}, before its end")
    digits = joined.translate(_URL_SAFE).rstrip("=")
    if not digits:
        raise ValueError(f"{bad}: it holds no base64 characters, only padding or whitespace")
    if len(digits) % 4 == 1:
        raise ValueError(f"{bad}: its last character makes no whole byte (was the text cut short?)")
    return _b64decode(digits + "=" * (-len(digits) % 4))


def to_json(value: Any) -> bytes:
    """Encode a handle's result as JSON, converting numpy values; raises ``TypeError`` or ``ValueError``
    (NaN and infinity, which JSON has no number for, among them).

    orjson first: a model's 1,000 scores took the standard library 0.46 ms, orjson 0.03 (the same
    values, each float in its shortest digits, though written otherwise below 1e-4: 0.0000767 and
    1e-7 where Python writes 7.67e-05 and 1e-07; text as UTF-8, not escaped). What orjson refuses
    (keys that are not strings, integers past 64 bits, nesting past 254) goes to the standard
    library, whose rules were the answers' before. Both take the same types, so whether an answer
    can be written never depends on which of them wrote it: orjson's own handling of dataclasses and
    datetimes is turned off, and :func:`_json_default` gives both the same for those, UUIDs and enums."""
    try:
        encoded = orjson.dumps(value, default=_json_default, option=_ORJSON_OPTIONS)
    except TypeError:  # orjson.JSONEncodeError is one
        return json.dumps(_numpy_keys(value), default=lambda item: _numpy_keys(_json_default(item)), allow_nan=False,
                          separators=(",", ":")).encode()
    if b"null" in encoded and _nonfinite(value):  # orjson writes NaN and infinity as null
        raise ValueError(_NONFINITE)
    return encoded


def unfit_at(value: Any) -> str:
    """Which part of ``value``, refused by :func:`to_json`, JSON cannot hold (the first found), and what it
    is: "; the part it cannot hold: ['scores'][2] = nan". The 500 said only "Out of range float values are
    not JSON compliant", of a result of many fields. "" where no one part is refused (the whole is: nested
    too deeply, say), or the part is the whole."""
    found = _unfit(value, "", 0)
    if found is None:
        return ""
    path, part = found
    plain = isinstance(part, (str, int, float, np.number)) and len(repr(part)) <= 60
    nonfinite = isinstance(part, (float, np.floating)) and not math.isfinite(part)
    hint = " (NaN and infinity are no JSON numbers: answer None or a string in their place)" if nonfinite else ""
    if not path:  # the whole answer: no part to name, what to do all the same
        return hint
    return f"; the part it cannot hold: {path} = {repr(part) if plain else f'<{type(part).__name__}>'}{hint}"


def _unfit(value: Any, path: str, depth: int) -> tuple[str, Any] | None:
    # the path is written only for the part found: written for every item, a million-float list took a second
    if depth > 64:
        return None
    if isinstance(value, (dict, list, tuple)):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if type(item) is float:  # the common leaves, looked at here: encoding each one took seconds
                if math.isfinite(item):
                    continue
                return f"{path}[{key!r}]", item
            if item is None or type(item) in (int, str, bool):
                continue
            found = _unfit(item, f"{path}[{key!r}]", depth + 1)
            if found is not None:
                return found
        return None
    if is_torch_tensor(value):  # the array it holds, whose NaN is named as a numpy array's is
        value = from_torch(value)
    if isinstance(value, np.ndarray) and value.dtype.kind == "f" and value.size:
        bad = np.argwhere(~np.isfinite(value))
        if len(bad):
            index = tuple(int(i) for i in bad[0])
            return f"{path}[{', '.join(map(str, index))}]", value[index].item()
    if type(value) is float:
        return None if math.isfinite(value) else (path, value)
    try:
        to_json(value)
    except (TypeError, ValueError, RecursionError):
        return path, value
    return None


def _numpy_keys(value: Any) -> Any:
    """``value`` with the numpy numbers (and torch's one-number tensors) among its dicts' keys as the Python
    numbers they hold, which the standard library writes as it writes ``int`` keys: ``{i: scores[i] for i
    in np.argsort(scores)[-5:]}`` was a 500, "keys must be str, int, float, bool or None". Two keys that
    JSON writes alike (``1`` and ``"1"``) are refused (``ValueError``): written both, a client read the
    last alone, the other answer lost without a word."""
    if isinstance(value, dict):
        keys: dict[str, Any] = {}
        out = {}
        for given, item in value.items():
            key = given.item() if isinstance(given, np.generic) or (is_torch_tensor(given) and given.ndim == 0) \
                else given
            written = _written_key(key)
            if written in keys:  # named as given: "3 and 3" of a tensor's and an int's
                raise ValueError(f"two keys of a dict, {keys[written]!r} and {given!r}, are both {written!r} in JSON: "
                                 "a client would read one of them alone")
            keys[written] = given
            out[key] = _numpy_keys(item)
        return out
    if isinstance(value, (list, tuple)):
        return [_numpy_keys(item) for item in value]
    return value


def _written_key(key: Any) -> str:
    """A dict's key as JSON writes it (the standard library's rules: ``True`` is ``"true"``, ``1.0``
    ``"1.0"``); a key of another type as itself (the encoder refuses it)."""
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, bool):
        return json.dumps(key)
    if isinstance(key, (int, float)):
        return float.__repr__(key) if isinstance(key, float) else int.__repr__(key)
    return f"<{type(key).__name__} {id(key)}>"


_ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME
_NONFINITE = "Out of range float values are not JSON compliant"  # the standard library's words for it


def _nonfinite(value: Any) -> bool:
    """Whether a Python float in ``value`` is NaN or infinite (numpy's are refused by _json_default)."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_nonfinite(v) for v in value.values())
    if isinstance(value, (list, tuple, set, frozenset)):
        return any(_nonfinite(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return any(_nonfinite(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, enum.Enum):  # orjson writes an enum's value itself
        return _nonfinite(value.value)
    return False


def _json_default(value: Any) -> Any:
    # What a conversion gives is not looked at again for NaN: an object array's, a structured one's or
    # an enum's NaN was answered null with a 200. Each is checked here.
    if isinstance(value, np.ndarray):
        if isinstance(value, np.ma.MaskedArray):  # its masked values were null in JSON, and .npy had them
            raise TypeError("a masked array is not JSON serializable: answer array.filled(value), or array.data")
        if value.dtype.kind in "fc" and value.size and not np.isfinite(value).all():
            raise ValueError(_NONFINITE)
        if value.dtype.kind == "c":
            raise TypeError(f"complex numbers have no JSON form: {COMPLEX_HINT}")
        if value.dtype.kind == "M":  # ISO dates and times, whatever the unit (tolist() gave nanoseconds as integers)
            return np.datetime_as_string(value).tolist()
        listed = value.tolist()
        if value.dtype.kind in "OV" and _nonfinite(listed):
            raise ValueError(_NONFINITE)
        return listed
    if isinstance(value, np.datetime64):
        return str(np.datetime_as_string(value))
    if isinstance(value, np.generic):
        item = value.item()
        if _nonfinite(item):
            raise ValueError(_NONFINITE)
        return item
    if isinstance(value, (set, frozenset)):
        return list(value)
    if isinstance(value, tuple):  # a named tuple (a row of one, torch's values and indices), which orjson
        # refuses: as the standard library writes it, a list, without sending the whole answer there (12x slower)
        return list(value)
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode()
    if isinstance(value, Binary):
        raise TypeError("easyserve.Binary is answered as it is only when it is the whole result; "
                        "inside a dict or a list, return its bytes (answered as base64)")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, enum.Enum):
        if _nonfinite(value.value):
            raise ValueError(_NONFINITE)
        return value.value
    if isinstance(value, complex):
        raise TypeError(f"complex numbers have no JSON form: {COMPLEX_HINT}")
    tensor = from_torch(value)  # after numpy's types, which every answer of arrays asks this for
    if tensor is not None:  # a torch tensor: as the array it holds
        return _json_default(tensor)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


NUMBERS = ("biu", "fc")  # numpy's kinds of number that promote to one another when stacked: integers, floats


def _array_like(value: Any) -> bool:
    """A numpy array or a torch tensor: what stacks field by field in a dict or tuple of them (a
    tokenizer's {"input_ids", "attention_mask"})."""
    return isinstance(value, np.ndarray) or is_torch_tensor(value)


def _stacks_as_torch(inputs: list) -> bool:
    """Whether ``inputs`` are torch tensors of one shape, type and device."""
    first = inputs[0]
    if not is_torch_tensor(first):
        return False
    return all(type(x) is type(first) and x.shape == first.shape and x.dtype == first.dtype
               and x.device == first.device for x in inputs)


def _stacks(inputs: list) -> bool:
    """Whether ``inputs`` are arrays of one shape whose numbers stack as one type, every value kept."""
    first = inputs[0]
    return all(
        isinstance(x, np.ndarray) and x.shape == first.shape and (x.dtype == first.dtype or _alike(x, first))
        for x in inputs
    ) and _exact(inputs)


def _alike(x: np.ndarray, y: np.ndarray) -> bool:
    """Whether two arrays' numbers may stack as one type: both integers (or bools), both floats, or
    integers and float64 (JSON's numbers: [1, 2] and [1.5, 2] as numpy reads them); :func:`_exact`
    then says whether their values allow it."""
    kinds = {x.dtype.kind, y.dtype.kind}
    if any(kinds <= set(family) for family in NUMBERS):
        return True
    return kinds <= set("biuf") and all(d == np.float64 for d in (x.dtype, y.dtype) if d.kind == "f")


def _from_torch_outputs(outputs: Any) -> Any:
    """``forward``'s outputs with its torch tensors (it, or those in a tuple, list or dict) as numpy arrays;
    a nested tensor (ragged: one tensor a request, of shapes of their own) as the list of its tensors."""
    if is_torch_tensor(outputs) and getattr(outputs, "is_nested", False):
        outputs = list(outputs.unbind())
    tensor = from_torch(outputs)
    if tensor is not None:
        return tensor
    if isinstance(outputs, (tuple, list)):
        arrays = [from_torch(value) for value in outputs]
        if any(array is not None for array in arrays):
            converted = [value if array is None else array for value, array in zip(outputs, arrays)]
            # a named tuple takes its fields one by one; a tuple, a list (or torch's own return types) an iterable
            return type(outputs)(*converted) if hasattr(outputs, "_fields") else type(outputs)(converted)
    elif isinstance(outputs, dict):
        arrays = {key: from_torch(value) for key, value in outputs.items()}
        if any(array is not None for array in arrays.values()):
            converted = {key: value if arrays[key] is None else arrays[key] for key, value in outputs.items()}
            return converted if type(outputs) is dict else _remade(type(outputs), [converted])[0]
    return outputs


def _exact(arrays: list[np.ndarray]) -> bool:
    """Whether stacking keeps every value as it is, one client's numbers never changing another's: no
    integer past 2**53 made a float64 (int64 with uint64, which only a float holds together, or with
    JSON's floats), where it is rounded (2**53 + 1 came back 2**53, and int64's largest as 9.2e18); no
    bool made a number (true came back 1.0 beside a float request's numbers, and was run by a model that
    refused it alone)."""
    dtypes = {a.dtype for a in arrays}
    if len(dtypes) == 1:
        return True
    if any(d.kind == "b" for d in dtypes):
        return False
    if np.result_type(*dtypes).kind != "f":
        return True
    return all(_float_holds(a) for a in arrays if a.dtype.kind in "iu")


FLOAT64_EXACT = 2**53  # integers of this size or less a float64 holds exactly


def _float_holds(integers: np.ndarray) -> bool:
    """Whether a float64 holds each of ``integers`` exactly."""
    if integers.dtype.itemsize <= 4 or integers.size == 0:
        return True
    return int(integers.max()) <= FLOAT64_EXACT and int(integers.min()) >= -FLOAT64_EXACT


def _columns(outputs: Sequence, n: int) -> list[tuple]:
    """Each request's row of a model's several outputs: a tuple, or of the type a named tuple (or torch's
    ``values, indices``) came as, whose fields postprocess reads by name (``row.logits``)."""
    rows = [tuple(v[i] for v in outputs) for i in range(n)]
    kind = type(outputs)
    if kind in (tuple, list):
        return rows
    if hasattr(outputs, "_fields"):  # a named tuple takes its fields one by one
        return [kind._make(row) for row in rows]
    return _remade(kind, rows)


def _remade(kind: type, rows: list) -> list:
    """``rows`` made of ``kind`` (the type a batch's outputs came as: a dict or tuple of a library's own,
    such as a model output that reads its fields as attributes), where one made from a row holds that
    row's values, each as it is; else the rows as they are. A type that takes no plain dict or tuple (a
    defaultdict) raises; one whose first argument is another thing (``Sub(meta=None, **fields)``) made
    an empty dict, and every request was answered ``{}``."""
    try:
        made = [kind(row) for row in rows]
    except Exception:
        return rows
    return made if all(_holds(one, row) for one, row in zip(made, rows)) else rows


def _holds(made: Any, row: dict | tuple) -> bool:
    """Whether ``made`` holds ``row``'s values, the same objects, under the same keys (or in the same order)."""
    if isinstance(row, dict):
        return isinstance(made, dict) and made.keys() == row.keys() and all(made[k] is v for k, v in row.items())
    return isinstance(made, tuple) and len(made) == len(row) and all(a is b for a, b in zip(made, row))


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float, np.generic)) and not isinstance(value, bool)


_READINGS = {"requests": "one result per request", "outputs": "a model's outputs"}


def _rows(value: Any) -> int | None:
    shape = getattr(value, "shape", None)
    if shape:
        return shape[0]
    return None


def _describe(value: Any) -> str:
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"an array of shape {tuple(shape)}"
    if isinstance(value, dict):  # "a dict of 2" read as two rows; its values say what went wrong
        items = ", ".join(f"{key!r}: {_describe(v).removeprefix('a ').removeprefix('an ')}"
                          for key, v in itertools.islice(value.items(), 4))
        return f"a dict ({items}{', ...' if len(value) > 4 else ''})"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"
