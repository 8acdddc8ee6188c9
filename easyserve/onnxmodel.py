"""``OnnxModel``: any ONNX file served as it is, its inputs and outputs read from the model.

``easyserve run model.onnx``, or ``Handle: OnnxModel`` with ``HandleArgs: {model: path/to/model.onnx}``.
Each request is checked against the model's inputs with the functions that check the Open Inference
Protocol's tensors (:mod:`easyserve.tensors`), so a wrong name, shape or type, or a value out of the
type's range, is a 400 saying what the model takes, not a 500 from ONNX Runtime. A value the model
refuses only as it runs (a token id past its vocabulary) is a 400 too, with ONNX Runtime's words, for
the request that sent it alone.
"""

from __future__ import annotations

import io
import logging
import os
import re
from typing import Any

import numpy as np

from .config import Config
from .errors import BadRequest, ConfigError, brief
from .handle import Device, Handle
from .labels import check_labels, labelled
from .tensors import DATATYPES, Tensor, json_example, json_to_array, shape_fits

__all__ = ["OnnxModel", "onnx_settings"]

log = logging.getLogger("easyserve")

# ONNX Runtime's names for the tensor types a request can carry, as the Open Inference Protocol names them
_ONNX_DATATYPES = {
    "tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(double)": "FP64", "tensor(bool)": "BOOL",
    "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32", "tensor(uint64)": "UINT64",
    "tensor(string)": "BYTES",
}
TRIAL_SIZE = 64  # the size a trial run gives a dimension the model leaves open, other than the batch's


class OnnxModel(Handle):
    """Any ONNX model served as it is, its inputs and outputs read from the file: ``HandleArgs: {model:
    path/to/model.onnx}`` (or ``easyserve run model.onnx``). A path that is not absolute is looked for
    beside the config, then in the working directory, then one folder up from the config
    (:meth:`Device.find`); ``model`` may also be the model's bytes or an ``onnx.ModelProto``.

    A request names each input and gives one item, without the model's batch dimension: easyserve makes
    the batch (``{"x": [5.1, 3.5, 1.4, 0.2]}`` for an input of shape ``[N, 4]``; a leading batch
    dimension of 1 is also taken). A model of one input takes a tensor body too (``.npy``, or raw bytes
    with ``X-Tensor-Dtype`` and ``X-Tensor-Shape``). The answer holds each output by name, the
    request's row of it. Over the Open Inference Protocol, the metadata lists the inputs and outputs
    (``-1`` for a dimension the model leaves open), and an inference request carries the tensors.

    Requests are batched where every input's first dimension is left open and a trial run at setup
    shows it is a batch's: two random rows together, then each alone, every output following the
    batch and each row's answer its own. Requests whose other open dimensions differ (sequences of
    other lengths) run one by one within their batch. Any other model runs each request alone: an
    output whose first dimension is its own (a detector's boxes) split into rows would give requests
    each other's answers; where a row's answer changed with its batch-mate (a sequence, a set the model
    reduces over), the first dimension is no batch, and a request gives its inputs whole. Where the
    trial cannot run (values the model refuses), inputs and outputs whose first dimensions are named
    alike (``N``, ``batch_size``) batch. ``HandleArgs: {batched: true}`` batches all the same (refused
    where an output cannot follow a batch, or an input has no batch dimension), ``false`` never. The
    worker's log says which.
    A value the model refuses as it runs (ONNX Runtime's INVALID_ARGUMENT: an id past a table; or a
    node's FAIL, an integer division by zero, once the model has run) is a 400 for the request that
    sent it; the others of its batch get their answers.

    ``HandleArgs: {labels: imagenet.txt}`` names an output's classes, as Triton's ``label_filename``
    does: a text file (one label a line, UTF-8, looked for as ``model`` is), or a list of them, for the
    one output whose last dimension is their count; ``{labels: {scores: imagenet.txt}}`` names the
    output. An inference request asking for that output's top classes (``"parameters":
    {"classification": 3}``) gets ``"0.872100:3:cat"``, and the model configuration the file's name
    (:mod:`easyserve.labels` says the rules; a file that does not fit is a ``ConfigError`` at start).
    """

    platform = "onnxruntime_onnx"  # in the Open Inference Protocol's metadata, as Triton names it
    checks_tensor_bodies = True  # preprocess checks a tensor body against the model's inputs, and casts it

    def __init__(self, model: Any = None, batched: bool | None = None, labels: Any = None) -> None:
        if hasattr(model, "SerializeToString"):  # an onnx.ModelProto: sent to the workers as its bytes
            model = model.SerializeToString()
        if model is None:
            raise ConfigError("OnnxModel needs the model: HandleArgs: {model: path/to/model.onnx}")
        if not isinstance(model, (str, bytes, os.PathLike)):
            raise ConfigError(f"OnnxModel: model must be the path to an .onnx file (or its bytes), got {brief(model)}")
        if batched not in (None, True, False):
            raise ConfigError(f"OnnxModel: batched must be true or false (or left out: read from the model), "
                              f"got {brief(batched)}")
        check_labels(labels)
        super().__init__(model=model, batched=batched, labels=labels)
        self.model, self.batched, self.labels = model, batched, labels

    def setup(self, device: Device) -> None:
        if not isinstance(self.model, bytes):
            try:
                self.model = str(device.find(self.model, "model file"))
            except ConfigError as exc:
                raise ConfigError(f"OnnxModel: {exc}") from None
        try:
            self.session = device.onnx_session(self.model)
        except Exception as exc:
            named = "the model's bytes" if isinstance(self.model, bytes) else repr(os.fspath(self.model))
            raise ConfigError(f"OnnxModel: ONNX Runtime cannot load {named}: {exc}") from None
        import onnxruntime as ort

        # a run that fails raises with ONNX Runtime's message, which the answer (or the worker's log)
        # says: its own copy on stderr, in colour, put a line in the log for each refused request
        self._quiet = ort.RunOptions()
        self._quiet.log_severity_level = 4
        ins, outs = self.session.get_inputs(), self.session.get_outputs()
        for port in ins:
            _check_input(port)
        # an output that is not a tensor (scikit-learn's ZipMap: a sequence of maps) is not asked for
        left_out = [o for o in outs if o.type not in _ONNX_DATATYPES]
        outs = [o for o in outs if o.type in _ONNX_DATATYPES]
        said = device.name.endswith("/0")  # once a device, not once a worker
        bf16 = _BF16_HINT if any(o.type == "tensor(bfloat16)" for o in left_out) else ""
        if left_out and said:
            # scikit-learn's classifiers, converted by skl2onnx, give their probabilities so by default
            maps = any(o.type.startswith("seq(map(") for o in left_out)
            log.warning("OnnxModel: the model's output(s) %s not served: only tensors of the types requests carry "
                        "are (%s)%s%s", ", ".join(repr(o.name) for o in left_out), ", ".join(o.type for o in left_out),
                        "; convert a scikit-learn classifier with skl2onnx's options={id(model): {'zipmap': False}} "
                        "for its probabilities as a tensor" if maps else "", bf16)
        if not outs:
            kinds = ", ".join(f"{o.name}: {o.type}" for o in left_out)
            raise ConfigError(f"OnnxModel: the model has no tensor output to answer with ({kinds}){bf16}; "
                              "write a handle of your own for it")
        _check_ranks(self.model, [p for p in [*ins, *outs] if not p.shape])
        self._decide_batching(ins, outs, said)
        self.inputs = [_tensor(i, self.lead[i.name]) for i in ins]
        outputs = [_tensor(o, self.drop[o.name]) for o in outs]
        # files looked for as the model is: beside the config, in the working directory, one folder up
        self.outputs = labelled(outputs, self.labels, lambda name: device.find(name, "labels file"),
                                not_served=[o.name for o in left_out])
        self.names = [o.name for o in outs]

    def _decide_batching(self, ins: list, outs: list, said: bool) -> None:
        """Whether requests run together (``self.batched``), which inputs a request gives without a first
        dimension (``self.lead``) and which outputs it gets without one (``self.drop``).

        Where every input's first dimension is open, a trial run decides, as its names cannot: two random
        rows together, then each alone. An output that does not follow the batch, or a row whose answer
        changes with the row beside it, runs each request alone; in the second case the first dimension
        is no batch at all (a sequence, a set the model reduces over) and a request gives it whole. Names
        alone had a cumulative sum over a model's ``[L]`` served across requests, and a model whose
        inputs' first dimensions were named apart (queries and keys) gave each request the others' keys.
        Where the trial cannot run, names alike (``N``, ``batch_size``) batch, as before."""
        firsts = {_first(i.shape) for i in ins}
        # a name, or unknown (not a scalar input's: a model that takes one cannot take a batch of them)
        every_open = bool(ins) and all(i.shape and not isinstance(i.shape[0], int) for i in ins)
        name = next(iter(firsts)) if len(firsts) == 1 and every_open else None
        named = name is not None and all(_first(o.shape) == name for o in outs)
        found, trial = self._trial(ins, outs) if every_open else ("", "")
        ran = found in ("follows", "shape", "mixes", "whole", "random")
        silent = found in ("failed", "random")  # the trial said nothing of the first dimension
        alike = len(firsts) == 1  # every input's first dimension named alike
        self._ran = ran or (not every_open and self._runs(ins, outs))
        hint = ""
        unstackable = next((i for i in ins if not i.shape or isinstance(i.shape[0], int)), None)
        if self.batched is True and unstackable is not None:  # a batch of it, which ONNX Runtime may broadcast
            what = f"a first dimension fixed at {unstackable.shape[0]}" if unstackable.shape else "no dimension"
            raise ConfigError(f"OnnxModel: HandleArgs batched: true, but input {unstackable.name!r} has {what}, "
                              "so a batch's requests cannot be stacked on it: leave batched out")
        if self.batched is True and found in ("shape", "mixes", "whole"):
            if found == "shape":  # a batch could never be split into its requests' answers
                raise ConfigError(f"OnnxModel: HandleArgs batched: true, but {trial}: leave batched out")
            if said:
                log.warning("OnnxModel: HandleArgs batched: true, though %s: requests' answers depend on each "
                            "other's", trial)
        if self.batched is not None:
            why = f"HandleArgs say batched: {str(self.batched).lower()}"
        elif not every_open:
            self.batched, why = False, "not every input's first dimension is left open"
        elif found == "follows":
            self.batched, why = True, trial
        elif silent and named:
            self.batched, why = True, f"every input and output has first dimension {name!r} ({trial})"
        else:
            self.batched, why = False, trial
            # not where the inputs' first dimensions are named apart: a table beside its ids is no batch
            hint = " (HandleArgs batched: true batches all the same)" if silent and alike else ""
        if said:
            # a request's shape is not the usual, or its requests run alone for what they hold
            level = logging.WARNING if hint or found in ("mixes", "whole") else logging.INFO
            log.log(level, "OnnxModel: %s: %s%s", "requests batched" if self.batched else "each request runs alone",
                    why, hint)
        # run alone, a request gives an input without a first dimension left open (or fixed at 1), and
        # gets without one the outputs whose first dimension is that one (or 1); not where the trial
        # showed that dimension is not a batch's, nor where a trial that said nothing leaves the inputs'
        # names apart: a model taking a table beside its ids had the ids' dimension taken off the table
        # too, and no request could send the table it has
        shown = found in ("follows", "whole")  # every output followed the batch
        batch_axis = every_open and found != "mixes" and (not silent or alike)
        self.lead = {i.name: self.batched or batch_axis or _first(i.shape) == 1 for i in ins}
        per_request = {1, name} - {None}
        self.drop = {o.name: self.batched or (any(self.lead.values()) and (shown or _first(o.shape) in per_request))
                     for o in outs}

    def _trial(self, ins: list, outs: list) -> tuple[str, str]:
        """What a trial run shows of the first dimension: ``"follows"`` (a batch: each output follows it,
        each row's answer its own), ``"shape"`` (an output does not follow it), ``"mixes"`` (a row's
        answer changes with the row beside it), ``"whole"`` (it does so only where the rows' numbers are of
        other sizes: the first dimension is a batch, which the model looks at as a whole), ``"random"`` (a
        run's answer changes from one run to the next: a random node, of which a trial says nothing) or
        ``"failed"`` (the model did not run on the trial's values); and the words that say so. Integers 0
        and 1 first (ids every table has, a BERT's token types among them), then 1 and 2 (no divisor of
        zero); 1 and 2 alone where ONNX Runtime is older than 1.25 (the last built for Python 3.10), whose
        integer division by zero ends the process (SIGFPE): a model that divides by an input could not
        start."""
        import onnxruntime as ort

        names = [o.name for o in outs]
        failed = ""
        for low in (0, 1) if _version(ort.__version__) >= (1, 25) else (1,):
            rng = np.random.default_rng(0)
            rows = [{i.name: _sample(i, rng, low) for i in ins} for _ in range(2)]
            rows[1] = {name: _apart(value, rows[0][name], low) for name, value in rows[1].items()}
            try:
                alone, both = self._alone_and_together(names, ins, rows)
                again = self.session.run(names, rows[0], self._quiet)
                break
            except Exception as exc:
                failed = failed or f"a trial run failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        else:
            return "failed", failed
        for count, got in ((1, alone[0]), (2, both)):
            for output, out in zip(names, got):
                if out.shape[:1] != (count,):
                    return "shape", (f"output {output!r} does not follow the batch (first dimension "
                                     f"{out.shape[0] if out.ndim else 'none'} for a batch of {count} in a trial run)")
        if not all(_same(first, second) for first, second in zip(alone[0], again)):
            return "random", ("the model's answer to one input changed from one run to the next (a random node): "
                              "a trial run cannot tell whether its rows mix")
        mixed = _mixed(names, both, alone)
        if mixed is not None:
            return "mixes", (f"output {mixed!r} of a row changed with the row beside it in a trial run (two random "
                             "rows together, then each alone): its first dimension is no batch, and a request "
                             "gives each input whole")
        return self._scales(names, ins, rows[0])

    def _alone_and_together(self, names: list[str], ins: list, rows: list[dict]) -> tuple[list, list]:
        """The model's outputs for each of ``rows`` run alone, and for them run as one batch."""
        alone = [self.session.run(names, feeds, self._quiet) for feeds in rows]
        both = self.session.run(names, {i.name: np.concatenate([r[i.name] for r in rows]) for i in ins}, self._quiet)
        return alone, both

    def _scales(self, names: list[str], ins: list, row: dict) -> tuple[str, str]:
        """The trial's second half, for rows that followed the batch: a row of small numbers beside one of
        larger ones (pixels scaled to 0-1 beside raw ones), run alone and together. A model that looks at
        the batch as a whole to choose what it does (an exported ``if x.max() > 1: x = x / 255``) answers
        random rows alike, both past its threshold, and was batched: a request's answer then changed with
        the others of its batch. The larger row's numbers are 2-3, not hundreds: a dynamically quantized
        model takes its scale over the batch, and beside hundreds a small row's answer moved past the
        tolerance (its classifiers then ran each request alone). A model that does not run on them is
        left to the first half's word."""
        follows = "follows", "every output followed the batch in a trial run (rows together, then alone)"
        rng = np.random.default_rng(1)
        small = {i.name: _scaled(row[i.name], rng, False) for i in ins}
        large = {i.name: _scaled(row[i.name], rng, True) for i in ins}
        if all(large[name] is row[name] for name in row):  # no numbers: strings, booleans
            return follows
        try:
            alone, both = self._alone_and_together(names, ins, [small, large])
        except Exception:
            return follows
        mixed = _mixed(names, both, alone)
        if mixed is not None:
            return "whole", (f"output {mixed!r} of a row changed with the row beside it in a trial run (a row of "
                             "small numbers beside one of larger ones, together, then each alone): the model looks "
                             "at its batch as a whole")
        return follows

    def _runs(self, ins: list, outs: list) -> bool:
        """Whether the model runs on a sample of its inputs (see _run: a FAIL from a model that runs is
        the request's)."""
        feeds = {i.name: _sample(i, np.random.default_rng(0), 1) for i in ins}
        try:
            self.session.run([o.name for o in outs], feeds, self._quiet)
        except Exception:
            return False
        return True

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
        return {t.name: _array(info[t.name], t, self.lead[t.name]) for t in self.inputs}

    def stack(self, inputs: list[dict[str, np.ndarray]]) -> Any:
        """The batch: each input's arrays stacked, when the model batches and they are of one shape (their
        types are the model's already); else the requests' inputs as they are, to run one by one."""
        first = inputs[0]
        if self.batched and all(x[name].shape == first[name].shape for x in inputs[1:] for name in first):
            return {name: np.stack([x[name] for x in inputs]) for name in first}
        return list(inputs)

    def forward(self, batch: dict[str, np.ndarray] | list[dict[str, np.ndarray]]) -> Any:
        if isinstance(batch, dict):
            return dict(zip(self.names, self._run(batch)))
        return [self._run_one(inputs) for inputs in batch]

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The session's outputs for ``feeds``. ONNX Runtime's INVALID_ARGUMENT, for inputs already of
        the model's types and shapes, is a value the model cannot take (a token id past its vocabulary):
        raised as :class:`BadRequest`, the request that sent it gets 400 (the others of its batch, their
        answers), where it was a 500 the client could not tell from the server's own failure."""
        from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument

        try:
            outs = self.session.run(self.names, feeds, self._quiet)
        except (InvalidArgument, Fail) as exc:
            found = re.search(r"running (\S+) node\. Name:'([^']*)' Status Message: (.*)", str(exc), re.S)
            # FAIL from a node, in a model that has run (an integer division by zero): this input's doing,
            # not the model's, which was a 500 with a traceback logged for each such request
            if isinstance(exc, Fail) and not (found and self._ran):
                raise
            said = f"its {found[1]} node {found[2]!r} says: {found[3].strip()}" if found else str(exc)
            raise BadRequest(f"the model cannot take this input: {said}") from None
        self._ran = True
        return outs

    def postprocess(self, output: dict[str, np.ndarray], task: dict) -> dict[str, np.ndarray]:
        """The outputs by name. One holding NaN or infinity is a 400 over JSON: the model's answer for
        this input (NaN in, or numbers too large for its arithmetic), which the protocol's binary data
        carries as it is, but not JSON. It was a 500 with a traceback logged, so a client could raise
        the server's error rate at will."""
        if task.get("protocol") != "v2":  # the protocol's answers say it of each output themselves
            for name, value in output.items():
                if np.asarray(value).dtype.kind == "f" and not np.isfinite(value).all():
                    raise BadRequest(
                        f"output {name!r} holds NaN or infinity for this input, which JSON cannot carry; ask for it "
                        f"over the Open Inference Protocol as binary data (POST /v2/models/<name>/infer with "
                        f'"parameters": {{"binary_data_output": true}})')
        return output  # each output by name: an array (JSON lists), or the protocol's output tensors

    def _run_one(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {name: array[None] if self.lead[name] else array for name, array in inputs.items()}
        outs = self._run(feeds)
        return {name: out[0, ...] if self.drop[name] and out.shape[:1] == (1,) else out
                for name, out in zip(self.names, outs)}

    def _only_input(self, body: dict) -> str:
        """The input a tensor body (.npy, or raw bytes with X-Tensor-* headers) is for: a model's only one."""
        if not isinstance(body["data"], np.ndarray):
            raise ValueError(f"a body of type {body['content_type']} is not a tensor: send .npy (Content-Type: "
                             "application/x-npy), raw bytes with X-Tensor-Dtype and X-Tensor-Shape, or JSON")
        if len(self.inputs) != 1:
            raise ValueError(f"a tensor body is for a model of one input; this one takes {self._described()}: "
                             f"send JSON, e.g. {self._example()}, or the Open Inference Protocol's tensors")
        return self.inputs[0].name

    def _described(self) -> str:
        return ", ".join(f"{t.name} ({t.datatype} {list(t.shape)})" for t in self.inputs)

    def _example(self) -> str:
        return json_example(self.inputs, bare=False)


def onnx_settings(path: str | os.PathLike) -> dict[str, Any]:
    """The config settings that serve the ONNX file at ``path`` as it is: ``OnnxModel``, given the file,
    and named after it in the Open Inference Protocol's paths where its name suits a URL path as it is."""
    model = os.path.abspath(os.path.expanduser(path))  # "~/models/x.onnx", as HandleArgs' model takes it
    stem = os.path.splitext(os.path.basename(model))[0]
    settings: dict[str, Any] = {"Handle": "OnnxModel", "HandleArgs": {"model": model}}
    try:
        settings["ModelName"] = Config.from_dict({"ModelName": stem}).model_name
    except ConfigError:  # a name ModelName does not take: the handle's class names the model
        pass
    return settings


def _first(shape: list) -> Any:
    return shape[0] if shape else None


# ONNX Runtime's Python API returns no bfloat16 (numpy has no such type): such an output is cast in the model
_BF16_HINT = "; ONNX Runtime cannot return bfloat16 to Python: export the output as float16 or float32 (a Cast node)"


def _check_input(port: Any) -> None:
    if port.type not in _ONNX_DATATYPES:
        kind = port.type.removeprefix("tensor(").removesuffix(")")
        if port.type == "tensor(bfloat16)":  # requests carry BF16, but ONNX Runtime's Python API takes none
            raise ConfigError(f"OnnxModel: the model's input {port.name!r} is a tensor of bfloat16, which ONNX "
                              "Runtime's Python API cannot be given: export it as float16 or float32 (a Cast node "
                              "after it)")
        what = (f"a tensor of {kind}, a type easyserve's requests do not carry" if port.type.startswith("tensor(")
                else f"of type {port.type}, which OnnxModel does not serve")
        raise ConfigError(f"OnnxModel: the model's input {port.name!r} is {what}; write a handle of your own "
                          "that makes it from what requests carry")


def _check_ranks(model: str | bytes | os.PathLike, scalar: list) -> None:
    """ONNX Runtime reports a tensor the file gives no shape (any rank) as it reports a scalar: shape []. A
    request then could not be checked, nor the metadata say what the model takes."""
    if not scalar:
        return
    import onnx

    graph = onnx.load_model(io.BytesIO(model) if isinstance(model, bytes) else model, load_external_data=False).graph
    kinds = {v.name: v.type for v in [*graph.input, *graph.output]}
    shapeless = [p.name for p in scalar if p.name in kinds and not kinds[p.name].tensor_type.HasField("shape")]
    if shapeless:
        raise ConfigError(f"OnnxModel: the model file gives {', '.join(map(repr, shapeless))} no shape (any rank); "
                          "OnnxModel needs each input's and output's rank: export the model with its inputs' shapes "
                          "(onnx.shape_inference.infer_shapes then adds the outputs')")


def _version(text: str) -> tuple[int, ...]:
    """A version's leading numbers: ``"1.23.2"`` is (1, 23, 2), ``"1.25.0.dev1"`` (1, 25, 0)."""
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])


def _sample(port: Any, rng: np.random.Generator, low: int = 0) -> np.ndarray:
    """A trial input: one item (or the first dimension the model fixes) of random values, each other open
    dimension TRIAL_SIZE. Integers ``low`` and ``low + 1``, numbers about 1 of either sign, strings of one
    letter: two rows that differ."""
    dims = [d if isinstance(d, int) and d >= 0 else None for d in port.shape]
    shape = [1 if dims[0] is None else dims[0]] + [TRIAL_SIZE if d is None else d for d in dims[1:]] if dims else []
    datatype = _ONNX_DATATYPES[port.type]
    if datatype == "BYTES":
        return rng.choice(np.array(["a", "b"], dtype=object), shape)
    dtype = np.dtype(DATATYPES[datatype])
    if dtype.kind == "f":
        return rng.normal(size=shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(dtype)
    return rng.integers(low, low + 2, shape).astype(dtype)


def _apart(sample: np.ndarray, first: np.ndarray, low: int) -> np.ndarray:
    """The second trial row: ``sample`` where it is of numbers drawn at random (which differ from the
    first row's), else ``first`` with each value the other one: two rows of one integer each (a user id)
    were drawn alike, and a model that subtracted the batch's mean from each row was batched."""
    if first.dtype.kind == "O":
        return np.where(first == "a", "b", "a").astype(object)
    if first.dtype.kind == "b":
        return ~first
    if first.dtype.kind in "iu":
        return (2 * low + 1 - first).astype(first.dtype)  # low and low + 1 swapped
    return sample


def _scaled(sample: np.ndarray, rng: np.random.Generator, large: bool) -> np.ndarray:
    """``sample``'s shape and type, of numbers in [0, 0.5) or, ``large``, in [2, 3) (integers: ``sample``
    itself, or 100-126): pixels scaled to 0-1 and not. Strings and booleans are ``sample`` itself."""
    if sample.dtype.kind in "iu":
        return rng.integers(100, 127, sample.shape).astype(sample.dtype) if large else sample
    if sample.dtype.kind != "f":
        return sample
    return ((2 + rng.random(sample.shape)) if large else 0.5 * rng.random(sample.shape)).astype(sample.dtype)


def _mixed(names: list[str], both: list[np.ndarray], alone: list[list[np.ndarray]]) -> str | None:
    """The first output whose answer to two rows run together is not each row's answer run alone."""
    for output, together, first, second in zip(names, both, *alone):
        if not (_same(together[:len(first)], first) and _same(together[len(first):], second)):
            return output
    return None


def _same(batched: np.ndarray, alone: np.ndarray) -> bool:
    """Whether a row's output run in a batch is the one it has run alone: numbers within 5% of the
    output's largest, what another kernel's order of sums gives, or a dynamically quantized model's
    scale taken over the batch (which moves a row's answer by a percent or so: such a model batched as
    before); rows that mix (a sum over them) differ by as much as the values themselves."""
    if batched.shape != alone.shape:
        return False
    if batched.dtype.kind in "fc":
        scale = float(np.abs(alone[np.isfinite(alone)]).max(initial=0.0))
        within = {"rtol": 0, "atol": 0.05 * scale} if scale else {}  # all zeros: numpy's own tolerance
        return bool(np.allclose(batched, alone, equal_nan=True, **within))
    return bool(np.array_equal(batched, alone))


def _tensor(port: Any, lead: bool) -> Tensor:
    """A model input's or output's metadata, as one request gives or gets it (its batch dimension off)."""
    shape = [d if isinstance(d, int) and d >= 0 else -1 for d in port.shape]
    return Tensor(port.name, _ONNX_DATATYPES[port.type], shape[1:] if lead else shape)


def _array(value: Any, tensor: Tensor, lead: bool) -> np.ndarray:
    """One request's value for ``tensor``: of its datatype and shape, or ``ValueError`` saying why not."""
    name = tensor.name
    if isinstance(value, (bytes, bytearray)) and tensor.datatype == "BYTES":
        value = np.array(bytes(value), dtype=object)  # one string, as the protocol's batch of one gives it
    if isinstance(value, (np.ndarray, np.generic)):  # a tensor body, or the protocol's tensor (checked already)
        array = _converted(np.asarray(value), tensor)
    elif isinstance(value, (bytes, bytearray)):
        raise ValueError(f"input {name!r} is {tensor.datatype}: send it as numbers (JSON) or as a tensor, not a file")
    else:
        try:
            shape = _nested_shape(value)
            array = json_to_array(value if shape else [value], tensor.datatype, shape or [1]).reshape(shape)
        except ValueError as exc:
            raise ValueError(f"input {name!r}: {exc}") from None
    if not shape_fits(array.shape, tensor.shape):
        if array.shape[:1] == (1,) and shape_fits(array.shape[1:], tensor.shape):
            array = array[0, ...]  # a batch of one, as a client used to batches sends it (an array still)
        else:
            raise ValueError(f"input {name!r} has shape {list(array.shape)}, and the model takes {list(tensor.shape)}"
                             + (" for one request (-1: any size; easyserve adds the batch dimension)" if lead
                                else " (-1: any size)"))
    if tensor.datatype == "BYTES":  # ONNX Runtime's string tensors hold str: UTF-8 text only
        try:
            texts = [x.decode() if isinstance(x, bytes) else str(x) for x in array.ravel()]
        except UnicodeDecodeError as exc:  # replaced by U+FFFD, the model would answer for other bytes
            raise ValueError(f"input {name!r} holds bytes that are not UTF-8 text ({exc.reason} at byte "
                             f"{exc.start} of one element), and the model's strings can only be text") from None
        array = np.array(texts, dtype=object).reshape(array.shape)
    return array


def _converted(array: np.ndarray, tensor: Tensor) -> np.ndarray:
    """A tensor body's array as ``tensor``'s type, where no value changes but a float's rounding: JSON's
    numbers are range-checked, and an int64 token id of 300 sent to an INT8 input came out 44."""
    name, dtype = tensor.name, DATATYPES[tensor.datatype]
    if tensor.datatype == "BYTES":
        if array.dtype.kind not in "OSU":
            raise ValueError(f"input {name!r} takes strings, got {array.dtype}")
        return array
    if array.dtype == dtype:
        return array
    integers = array.dtype.kind in "iu" and dtype.kind in "iu"  # an int64 array of pixels, 0-255, for UINT8
    if not (integers or np.can_cast(array.dtype, dtype, "same_kind")):
        raise ValueError(f"input {name!r} is {tensor.datatype}; {array.dtype} does not convert to it")
    if array.size and array.dtype.kind in "iuf" and dtype.kind in "iuf":
        info = np.iinfo(dtype) if dtype.kind in "iu" else np.finfo(dtype)
        finite = array[np.isfinite(array)] if array.dtype.kind == "f" else array
        # as Python numbers on both sides, exactly: numpy 1.24 compared uint64 2**63 with int64's largest as
        # float64, equal, and it wrapped; numpy 2 casts a Python float to a float16 bound's type (65519 to 65504)
        low, high = (finite.min().item(), finite.max().item()) if finite.size else (0, 0)
        least, most = (int(info.min), int(info.max)) if dtype.kind in "iu" else (float(info.min), float(info.max))
        if finite.size and (low < least or high > most):
            wrong = low if low < least else high
            raise ValueError(f"input {name!r}: {wrong} is out of range for {tensor.datatype} "
                             f"({info.min} to {info.max})")
    return array.astype(dtype)


def _nested_shape(value: Any) -> list[int]:
    """The shape nested JSON lists have, read along their first elements (json_to_array checks the rest)."""
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        value = value[0] if value else None
    return shape
