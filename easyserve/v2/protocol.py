"""Open Inference Protocol documents: an inference request read and checked, a response written.

A request is a JSON object, optionally followed by binary tensor data (its JSON's length is then in
the ``Inference-Header-Content-Length`` header, and each binary input says its size in
``parameters.binary_data_size``). Every field, count and size is checked against the request itself
and against the model's metadata (:class:`Signature`), and a mistake is a 400 that names the input
and what was expected.

Both sides of the pool use this module. The server reads a request whose JSON is small on its event
loop, so a malformed one is refused at once; a large one (``LARGE_JSON`` bytes of JSON or more) is
left to the worker that runs it, which reads it with the same function, off the loop. Either way
the body travels to the worker uncopied, and the worker reads it (again): what waits in the queue
is the body's bytes, which ``MaxBufferedMB`` counts, not the objects read from it (500 requests of
64 kB of ``"parameters"`` held 860 MB, counted as 32). Binary inputs become arrays on its bytes there
(``np.frombuffer``). The worker also writes the response, JSON and binary, so the event loop only
copies bytes to the client.

Declared shapes are per item. An input may come with one more, leading, batch dimension (as clients
written for Triton send ``[N, H, W, 3]``, ``[1, ...]`` for one item). A batch of one is taken off
before the handle sees the input, and every output gets it back. A request holding a batch of N
items (every input with the same leading N, at most ``MaxBatchSize``) is N items of work: the worker
hands the handle each item as a request of its own, batched with the rest, and joins their outputs
along a new leading dimension of N. It weighs N in the batches the queue forms (:attr:`InferTask.items`),
known once the request is read: by the server for a small JSON, else by the worker alone, which runs
the requests whose items fit in one batch and gives the others back to be queued again, weighed by
their items (see :meth:`~easyserve.worker._Batch._put_back`).
"""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import orjson

from ..bodies import EXAMPLE as BODY_EXAMPLE
from ..bodies import LARGE_JSON, parse_json_object
from ..errors import BadRequest, brief
from ..tensors import (
    DATATYPES,
    MAX_DIMS,
    Tensor,
    binary_size,
    binary_to_array,
    cast_in_range,
    check_datatype,
    json_example,
    json_to_array,
    output_binary,
    output_json_data,
    shape_fits,
    to_output,
)

__all__ = ["HEADER_LENGTH", "EXTENSIONS", "Signature", "Request", "InferTask", "infer_task", "encode_response"]

HEADER_LENGTH = "Inference-Header-Content-Length"
# what the server metadata lists: the extensions implemented
EXTENSIONS = ("binary_tensor_data", "classification", "statistics")
EXAMPLE = '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1.5, 2]}]}'


@dataclasses.dataclass(frozen=True)
class Signature:
    """The inputs and outputs a model's metadata lists: what its handle declares, else nothing; and
    its ``platform``, what runs it (a handle's own ``platform``, a string: ``onnxruntime_onnx`` for
    :class:`~easyserve.OnnxModel`, as Triton names it; else ``easyserve``)."""

    inputs: tuple[Tensor, ...] = ()
    outputs: tuple[Tensor, ...] = ()
    platform: str = "easyserve"
    # the handle takes /predict's JSON as its tensors, lists of them (OnnxModel, the demo): not a string
    # where a BYTES input of one element is declared, as the examples' preprocess reads their picture
    tensor_bodies: bool = False

    @classmethod
    def of(cls, handle: Any) -> Signature:
        """What a handle (class, or instance after ``setup``: a model's own, read from its file)
        declares in its ``inputs`` and ``outputs`` attributes; ``TypeError`` naming the attribute if
        either is not a list of :class:`~easyserve.Tensor`."""
        handle_class = handle if isinstance(handle, type) else type(handle)
        found = {}
        for attribute in ("inputs", "outputs"):
            value = getattr(handle, attribute, ())
            if handle is not handle_class and not _tensors(value):  # its own use of the name (output names)
                value = getattr(handle_class, attribute, ())
            if isinstance(value, (str, bytes, Mapping, Tensor)) or not isinstance(value, Iterable):
                value = [value]
            items = tuple(value)
            wrong = [item for item in items if not isinstance(item, Tensor)]
            if wrong:
                raise TypeError(f"{handle_class.__qualname__}.{attribute} must be a list of easyserve.Tensor, "
                                f"and holds {wrong[0]!r}")
            names = [t.name for t in items]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise TypeError(f"{handle_class.__qualname__}.{attribute} names {', '.join(twice)} more than once")
            found[attribute] = items
        platform = getattr(handle, "platform", None)
        if isinstance(platform, str) and platform:
            found["platform"] = platform
        return cls(**found, tensor_bodies=getattr(handle, "checks_tensor_bodies", False) is True)

    def example(self) -> str:
        """A ``/predict`` body's example: the declared inputs by name, else an image's (the examples')."""
        return json_example(self.inputs, bare=not self.tensor_bodies) if self.inputs else BODY_EXAMPLE

    @property
    def batches(self) -> bool:
        """Whether a request may carry a leading batch dimension (where the handle declares its inputs;
        one that declares none takes each as it comes)."""
        return bool(self.inputs)

    def input(self, name: str) -> Tensor | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> Tensor | None:
        return next((t for t in self.outputs if t.name == name), None)


def _tensors(value: Any) -> bool:
    """Whether ``value`` is a non-empty list (or tuple) of :class:`~easyserve.Tensor`."""
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(item, Tensor) for item in value)


@dataclasses.dataclass
class Input:
    """One input of a request: JSON ``data`` already made an array, or where its binary data lies."""

    name: str
    datatype: str
    shape: tuple[int, ...]  # as the request gives it
    data: np.ndarray | None = None
    offset: int = 0  # its binary data: where it starts in the body, and how many bytes
    size: int = 0
    batched: bool = False  # it came with a leading batch dimension, taken off for the handle


@dataclasses.dataclass
class Request:
    """An inference request, read and checked."""

    inputs: list[Input]
    id: str | None = None
    parameters: dict = dataclasses.field(default_factory=dict)
    # the outputs asked for, each as binary data or not, and the top classes asked for of it (0: its values)
    outputs: list[tuple[str, bool, int]] | None = None
    binary_output: bool = False  # for outputs not asked for by name (parameters.binary_data_output)

    @property
    def batched(self) -> bool:
        return any(i.batched for i in self.inputs)

    @property
    def items(self) -> int:
        """How many items the request holds: its inputs' leading batch dimension (:func:`_check_inputs`
        makes them agree), else 1."""
        return next((i.shape[0] for i in self.inputs if i.batched), 1)

    def arrays(self, body: Any) -> list[dict[str, np.ndarray]]:
        """Each item's inputs by name as arrays (views of the request's: binary ones on ``body``'s own
        bytes); one item for a request that holds no batch."""
        arrays = {}
        for i in self.inputs:
            if i.data is not None:
                arrays[i.name] = i.data
                continue
            try:
                arrays[i.name] = binary_to_array(body, i.offset, i.size, i.datatype, i.shape)
            except ValueError as exc:
                raise BadRequest(f"input {i.name!r}: {exc}") from None
        if not self.batched:
            return [arrays]
        # an input sent without the batch dimension (allowed beside a batch of 1) is every item's
        return [{i.name: arrays[i.name][k] if i.batched else arrays[i.name] for i in self.inputs}
                for k in range(self.items)]


class InferTask:
    """An inference request on its way to a worker, which reads it: the body (sent out of band, arriving
    as a writable ``bytearray``), and how many items it holds, if the server read it (``None`` if not:
    its JSON was large, see the module's notes), which the queue weighs it by."""

    def __init__(self, body: Any, header_length: int | None, model_name: str, model_version: str,
                 items: int | None = None) -> None:
        self.body = body
        self.header_length = header_length
        self.model_name = model_name
        self.model_version = model_version
        self.items = items

    def __reduce_ex__(self, protocol: int) -> Any:
        body = pickle.PickleBuffer(self.body) if protocol >= 5 and self.body is not None else self.body
        return _rebuild, (body, self.header_length, self.model_name, self.model_version, self.items)

    def open(self, signature: Signature, max_items: int) -> tuple[Request, list[dict[str, np.ndarray]]]:
        """The request, read against ``signature``, this worker's, and each item's inputs as arrays;
        :class:`BadRequest`, as for a batch of more than ``max_items``. (The server, which checked a
        small one as it came, knew the metadata of its time: during a reload that changes the model's
        inputs or outputs, another model's.)"""
        request = read_request(self.body, self.header_length, signature)
        check_items(request.items, max_items)
        return request, request.arrays(self.body)


def check_items(items: int, max_items: int) -> None:
    """:class:`BadRequest` for a request holding a batch larger than ``MaxBatchSize`` (``max_items``), as
    Triton refuses one larger than its model's ``max_batch_size``."""
    if items > max_items:
        raise BadRequest(f"the request holds a batch of {items} items, and this server runs batches of at most "
                         f"{max_items} (MaxBatchSize): send at most {max_items} items a request")


def _rebuild(body: Any, *rest: Any) -> InferTask:
    if isinstance(body, memoryview):  # an out-of-band buffer: pickle hands it over read-only
        body = body.obj if isinstance(body.obj, bytearray) else bytearray(body)
    return InferTask(body, *rest)


def infer_task(body: bytes | bytearray | memoryview, header_value: str | None, signature: Signature,
               model_name: str, model_version: str, max_items: int = 1) -> InferTask:
    """The task for an inference request's body, checked now if its JSON is small (see the module's
    notes), a batch of more than ``max_items`` (``MaxBatchSize``) among what is refused."""
    header_length = _header_length(header_value, len(body))
    items = None
    if (len(body) if header_length is None else header_length) < LARGE_JSON:
        items = read_request(body, header_length, signature).items  # its 400 now; the worker reads it again
        check_items(items, max_items)
    return InferTask(body, header_length, model_name, model_version, items)


def _header_length(value: str | None, body_size: int) -> int | None:
    if value is None:
        return None
    text = value.strip()
    if not (text.isascii() and text.isdigit()):
        raise BadRequest(f"{HEADER_LENGTH} must be the JSON's length in bytes, got {brief(value)}")
    digits = text.lstrip("0")
    if len(digits) > 18:  # past any body (and int() refuses strings of over 4300 digits)
        raise BadRequest(f"{HEADER_LENGTH} is {digits[:20]}..., but the body has {body_size} bytes: it must be "
                         "the length of the JSON at the body's start")
    length = int(digits or "0")
    if not 0 < length <= body_size:
        raise BadRequest(f"{HEADER_LENGTH} is {length}, but the body has {body_size} bytes: it must be the length "
                         "of the JSON at the body's start")
    return length


def read_request(body: Any, header_length: int | None, signature: Signature) -> Request:
    """Read and check an inference request; :class:`BadRequest` says what is wrong."""
    json_size = len(body) if header_length is None else header_length
    doc = _parse(memoryview(body)[:json_size], header_length)
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest(f'"id" must be a string, got {brief(request_id)}')
    parameters = _parameters(doc.get("parameters"), "the request")
    binary_output = _flag(parameters, "binary_data_output", "the request's parameters")
    items = doc.get("inputs")
    if not isinstance(items, list) or not items:
        raise BadRequest(f'an inference request needs "inputs", a non-empty array of tensors, e.g. {EXAMPLE}')
    inputs: list[Input] = []
    names: set[str] = set()
    offset = json_size
    for position, item in enumerate(items):
        one = _read_input(item, position, names, body, offset, header_length)
        offset += one.size
        inputs.append(one)
        names.add(one.name)
    if offset != len(body):
        raise BadRequest(f"{len(body) - offset} byte(s) follow the binary data of the inputs: their binary_data_size "
                         f"add up to {offset - json_size}, and the body has {len(body) - json_size} after its JSON")
    if signature.inputs:
        _check_inputs(inputs, signature)
    # the handle's: what the client gave, less the protocol's own flag (tritonclient sets it on every
    # request that names no outputs, so a handle that refused keys it did not know refused them all)
    own = {key: value for key, value in parameters.items() if key != "binary_data_output"}
    return Request(inputs, request_id, own, _read_outputs(doc.get("outputs"), binary_output, signature), binary_output)


def _parse(header: memoryview, header_length: int | None) -> dict:
    try:
        return parse_json_object(header, example=EXAMPLE)
    except BadRequest as exc:
        if header_length is not None:
            raise BadRequest(f"{exc} (in the first {header_length} bytes, as {HEADER_LENGTH} says)") from None
        if b"binary_data_size" in header.tobytes():  # binary data was sent, but not where its JSON ends
            raise BadRequest(f"{exc} (binary tensor data after the JSON needs the {HEADER_LENGTH} header)") from None
        raise


def _read_input(item: Any, position: int, seen: set, body: Any, offset: int, header_length: int | None) -> Input:
    if not isinstance(item, dict):
        raise BadRequest(f"inputs[{position}] must be an object with name, datatype, shape and data")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest(f'inputs[{position}] needs a "name", a non-empty string')
    where = f"input {name!r}"
    if name in seen:
        raise BadRequest(f"{where} is given twice")
    try:
        datatype = check_datatype(item.get("datatype"))
    except ValueError as exc:
        raise BadRequest(f"{where}: {exc}") from None
    shape = item.get("shape")
    if isinstance(shape, list) and len(shape) > MAX_DIMS:
        # no array has that many; and the product of thousands of sizes is too long a number to print (which
        # killed the worker that read it) and, of 100,000, took a minute to compute
        raise BadRequest(f"{where}: shape has {len(shape)} dimensions, and a tensor may have at most {MAX_DIMS}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        # orjson reads an integer past 64 bits as a float: printed as one, it looked like a fraction
        huge = next((d for d in shape if type(d) is float and d >= 2**63), None) if isinstance(shape, list) else None
        if huge is not None:
            raise BadRequest(f"{where}: shape holds a size past 64 bits ({huge:.4g})")
        raise BadRequest(f"{where}: shape must be an array of sizes (integers from 0), got {brief(shape)}")
    shape = tuple(shape)
    parameters = _parameters(item.get("parameters"), where)
    if "shared_memory_region" in parameters:
        raise BadRequest(f"{where}: shared memory is not supported; send the data in the body")
    # "data": null is no data, as Triton and KServe read it: KServe's client writes it beside the
    # binary_data_size of an input whose binary data is empty (shape [0])
    data = item.get("data")
    if "binary_data_size" not in parameters:
        if data is None:
            raise BadRequest(f'{where} has no data: give "data", or binary data and parameters.binary_data_size')
        try:
            return Input(name, datatype, shape, data=json_to_array(data, datatype, shape))
        except ValueError as exc:
            raise BadRequest(f"{where}: {exc}") from None
    size = parameters["binary_data_size"]
    if type(size) is not int or size < 0:
        raise BadRequest(f"{where}: binary_data_size must be a number of bytes, got {brief(size)}")
    if data is not None:
        raise BadRequest(f"{where} has both data and binary_data_size: send it one way")
    left = len(body) - offset
    if size > left:
        hint = (f"; check binary_data_size and {HEADER_LENGTH}" if header_length is not None
                else f"; binary data after the JSON needs the {HEADER_LENGTH} header")
        raise BadRequest(f"{where}: binary_data_size {size} runs past the end of the body, which has {left} byte(s) "
                         f"left at this input{hint}")
    expected = binary_size(datatype, shape)
    if expected is not None and size != expected:
        raise BadRequest(f"{where}: binary_data_size is {size}, but shape {list(shape)} of {datatype} takes "
                         f"{expected} bytes")
    return Input(name, datatype, shape, offset=offset, size=size)


def check_tensor_body(array: np.ndarray, signature: Signature) -> np.ndarray:
    """A ``/predict`` tensor body (``.npy``, raw bytes) as one of the tensors a handle declares takes it
    (a leading batch dimension of 1 taken off, as the protocol's own requests have it); :class:`BadRequest`
    for one that none takes: of another kind of number (integers where it takes floats: raw pixels for
    a model of normalised ones) or another shape. A handle that declares none takes anything, as does
    one whose ``checks_tensor_bodies`` says its ``preprocess`` checks them itself. Unchecked, such a
    body reached the model and failed there, a 500 as if the model had, and the batch it was in was
    run again in parts to find it; or, batched with others of the right type, was promoted and answered."""
    declared = [t for t in signature.inputs if t.datatype != "BYTES"]
    if not declared:
        return array
    # one that takes its very datatype first: float32 was made float16 for an FP16 input declared before an FP32 one
    for tensor in sorted(declared, key=lambda t: DATATYPES[t.datatype] != array.dtype):
        dtype = DATATYPES[tensor.datatype]
        if array.dtype != dtype and (array.dtype.kind in "biu") != (dtype.kind in "biu"):
            continue
        if shape_fits(array.shape, tensor.shape):
            return _as_declared(array, tensor)
        if array.shape[:1] == (1,) and shape_fits(array.shape[1:], tensor.shape):
            return _as_declared(array[0], tensor)
    batch = len(array.shape) and any(shape_fits(array.shape[1:], t.shape) for t in declared)
    takes = " or ".join(f"{t.name} ({t.datatype} {list(t.shape)})" for t in declared)
    hint = (": send one item per request, without a batch dimension (the server batches requests itself)"
            if batch else _tensor_hint(array, declared))
    raise BadRequest(f"the tensor is {array.dtype} of shape {list(array.shape)}, and the model takes {takes}{hint}")


def _tensor_hint(array: np.ndarray, declared: list[Tensor]) -> str:
    """What to change, where a tensor body is one or two steps from one a handle takes (and those steps
    then make it one): its kind of number (pixels scaled to 0-1, as a model's input is, for a handle that
    takes the picture's own), its picture's channels on the other side (C, H, W for H, W, C, or the other
    way round), or both. Nothing where no such change would do."""
    moves = [(None, "")] + ([((1, 2, 0), "last"), ((2, 0, 1), "first")] if array.ndim == 3 else [])
    for axes, side in moves:  # as it is first: a shape that fits needs no transpose
        shape = array.shape if axes is None else tuple(array.shape[axis] for axis in axes)
        for tensor in declared:
            if not shape_fits(shape, tensor.shape):
                continue
            said = [] if axes is None else [f"channels {side}, {shape}: array.transpose{axes}"]
            dtype = DATATYPES[tensor.datatype]
            if (array.dtype.kind in "biu") != (dtype.kind in "biu"):  # the kind check_tensor_body makes
                said.append(f"send {tensor.datatype.lower()} values, as they are before any scaling (pixels of 0 "
                            f"to 1: (array * 255).round().astype(np.uint8))" if dtype.kind in "biu" else
                            f"send {tensor.datatype.lower()} values (array.astype(np.{dtype.name}), scaled as the "
                            "model takes them)")
            if said:
                return f"; {' and '.join(said)}"
    return ""


def _as_declared(array: np.ndarray, tensor: Tensor) -> np.ndarray:
    """A tensor body of the declared tensor's kind of number as its very datatype: float64 or float16 for
    FP32, int64 for INT32, big-endian for little. Passed on as sent, float64 reached a model that takes
    float32 (ONNX Runtime, torch) and failed there, a 500 as if the model had, its batch run again in
    parts to find it. :class:`BadRequest` for a value the declared type cannot hold."""
    dtype = DATATYPES[tensor.datatype]
    if array.dtype == dtype:
        return array
    cast = cast_in_range(array, dtype)
    if cast is None:
        raise BadRequest(f"the tensor is {array.dtype} and holds values out of range for {tensor.datatype}, which "
                         f"the model takes ({tensor.name} {tensor.datatype} {list(tensor.shape)})")
    return cast


def _check_inputs(inputs: list[Input], signature: Signature) -> None:
    for i in inputs:
        declared = signature.input(i.name)
        if declared is None:
            raise BadRequest(f"the model has no input {i.name!r}; its inputs are {_describe(signature.inputs)}")
        if i.datatype != declared.datatype:
            raise BadRequest(f"input {i.name!r} is {i.datatype}, and the model takes {declared.datatype}")
        if shape_fits(i.shape, declared.shape):
            continue
        if len(i.shape) == len(declared.shape) + 1 and shape_fits(i.shape[1:], declared.shape):
            if i.shape[0] == 0:
                raise BadRequest(f"input {i.name!r} holds a batch of 0 items (shape {list(i.shape)}): send one "
                                 "item at least")
            i.batched = True
            continue
        raise BadRequest(f"input {i.name!r} has shape {list(i.shape)}, and the model takes {list(declared.shape)} "
                         "(-1: any size; a leading batch dimension may be added)")
    given = {i.name for i in inputs}
    missing = [t for t in signature.inputs if not t.optional and t.name not in given]
    if missing:
        raise BadRequest(f"missing input(s): {_describe(missing)}")
    _check_batch(inputs)


def _check_batch(inputs: list[Input]) -> None:
    """A batch of more than one item is in every input, the same size: which item an input without it
    belongs to would be a guess. (One of 1 may stand beside inputs without it, as before batches.)"""
    sizes = {i.shape[0] for i in inputs if i.batched}
    if not sizes or sizes == {1}:
        return
    first = next(i for i in inputs if i.batched and i.shape[0] > 1)
    for i in inputs:
        if not i.batched or i.shape[0] != first.shape[0]:
            holds = f"a batch of {i.shape[0]}" if i.batched else "no batch dimension"
            raise BadRequest(f"input {first.name!r} holds a batch of {first.shape[0]} (shape {list(first.shape)}), "
                             f"and input {i.name!r} {holds} (shape {list(i.shape)}): every input of a batch gives "
                             "each item's, with the same leading dimension")


def _read_outputs(items: Any, binary_output: bool, signature: Signature) -> list[tuple[str, bool, int]] | None:
    if items is None:
        return None
    if not isinstance(items, list):
        raise BadRequest(f'"outputs" must be an array of objects such as {{"name": "y"}}, got {brief(items)}')
    outputs: list[tuple[str, bool, int]] = []
    names: set[str] = set()
    for position, item in enumerate(items):
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or not name:
            raise BadRequest(f'outputs[{position}] must be an object with a "name"')
        where = f"output {name!r}"
        if name in names:
            raise BadRequest(f"{where} is asked for twice")
        names.add(name)
        if signature.outputs and signature.output(name) is None:
            raise BadRequest(f"the model has no output {name!r}; its outputs are {_describe(signature.outputs)}")
        parameters = _parameters(item.get("parameters"), where)
        if "shared_memory_region" in parameters:
            raise BadRequest(f"{where}: shared memory is not supported")
        classes = parameters.get("classification", 0)
        if type(classes) is not int or classes < 0:  # (not a bool); 0, as tritonclient sends by default: none
            raise BadRequest(f"classification in {where}'s parameters must be how many top classes to answer, a "
                             f"whole number (0: the output's values), got {brief(classes)}")
        binary = _flag(parameters, "binary_data", f"{where}'s parameters")
        outputs.append((name, binary_output if binary is None else binary, classes))
    return outputs or None  # none named: all of them, as when "outputs" is left out


def _parameters(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f'"parameters" of {where} must be an object, got {brief(value)}')
    return value


def _flag(parameters: dict, key: str, where: str) -> Any:
    value = parameters.get(key)
    if value is not None and not isinstance(value, bool):
        raise BadRequest(f"{key} in {where} must be true or false, got {brief(value)}")
    return value


def _describe(tensors: Iterable[Tensor]) -> str:
    return ", ".join(f"{t.name} ({t.datatype} {list(t.shape)}{', optional' if t.optional else ''})"
                     for t in tensors)


# -- responses -----------------------------------------------------------------------------------------


def encode_response(results: list, request: Request, task: InferTask, signature: Signature) -> tuple[int, Any]:
    """A handle's results for ``request``, one for each of its items, as ``(200, (JSON length or None,
    body))``, or an error's ``(status, message)``: 400 for an output the client asked for that the model
    does not give, or asked for as JSON that JSON cannot carry (NaN, bytes that are not UTF-8: binary
    data can), or that its items give in shapes or datatypes that cannot be joined into one; 500 for a
    result that is not a dict of output tensors, or that its metadata does not describe."""
    for result in results:
        refused = _not_outputs(result, signature)
        if refused is not None:
            return 500, refused
    every = [t.name for t in signature.outputs] or list(results[0])
    wanted = request.outputs or [(name, request.binary_output, 0) for name in every]
    outputs, blobs = [], []
    batched = request.batched  # a walk of every input: once, not once an output (20,000 of each took 7 s)
    for name, binary, classes in wanted:
        missing = next((result for result in results if name not in result), None)
        if missing is not None:
            if signature.output(name) is None and not signature.outputs:
                return 400, f"the model gave no output {name!r}; it gives {', '.join(missing) or 'none'}"
            return 500, f"postprocess returned no output {name!r} (it returned {', '.join(missing) or 'none'})"
        declared = signature.output(name)
        try:
            items = [to_output(result[name], declared) for result in results]
        except (ValueError, TypeError) as exc:
            return 500, f"output {name!r} {exc}"
        try:
            if classes:
                items = [top_classes(*item, classes, declared.labels if declared else None) for item in items]
            array, datatype = _joined(name, items, batched)
        except (_Unjoinable, _Unclassifiable) as exc:
            return 400, f"output {name!r} {exc}"
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            blobs.append(output_binary(array, datatype))
            entry["parameters"] = {"binary_data_size": len(blobs[-1])}
        else:
            try:
                entry["data"] = output_json_data(array, datatype)
            except ValueError as exc:  # the answer is there, but not in the form asked for: the client's to change
                return 400, f"output {name!r} {exc}; ask for it as binary data (parameters.binary_data)"
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": task.model_name, "model_version": task.model_version}
    if request.id is not None:
        doc["id"] = request.id
    doc["outputs"] = outputs
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return 200, (None, header)
    return 200, (len(header), b"".join([header, *blobs]))


def _not_outputs(result: Any, signature: Signature) -> str | None:
    """Why what postprocess returned is no item's outputs, if it is not: the message of its 500."""
    if not isinstance(result, Mapping):
        return (f"postprocess returned {type(result).__name__}; for an inference request it must return a "
                "dict of output name -> array")
    odd = [name for name in result if not isinstance(name, str)]
    if odd:
        return (f"postprocess returned a dict whose keys {', '.join(map(repr, odd[:3]))} are not strings; "
                "for an inference request its keys are the outputs' names")
    if signature.outputs:  # the metadata lists every output: the handle gives those, and only those
        extra = [name for name in result if signature.output(name) is None]
        if extra:
            return (f"postprocess returned {', '.join(map(repr, extra))}, which the model's metadata does not "
                    f"list; its outputs are {_describe(signature.outputs)}")
    return None


def top_classes(array: np.ndarray, datatype: str, count: int, labels: Sequence[str] | None) -> tuple[np.ndarray, str]:
    """An item's output as the protocol's classification extension answers it: its ``count`` largest
    values, largest first, each as ``"value:index"`` (``"value:index:label"`` where the output has labels),
    a BYTES tensor. The values are one dimension of classes (a model's ``[1000]``, or ``[1, 1000]``);
    :class:`_Unclassifiable` for an output of other shapes or of no numbers."""
    if datatype in ("BYTES", "BOOL"):
        raise _Unclassifiable(f"is {datatype}, and classification ranks numbers")
    if sum(size > 1 for size in array.shape) > 1:
        raise _Unclassifiable(f"has shape {list(array.shape)} for an item, and classification ranks one "
                              "dimension of classes")
    values = array.reshape(-1)
    floats = datatype.startswith(("FP", "BF"))  # written as Triton writes them: floats with 6 decimals
    if floats:  # negated: NaN last
        best = np.argsort(-values.astype(np.float64), kind="stable")[:count]  # ties: the lower index first
    else:  # as they are: int64's past 2**53 were ties as float64 (and an unsigned value cannot be negated)
        best = (len(values) - 1 - np.argsort(values[::-1], kind="stable")[::-1])[:count]
    named = labels is not None  # a class with an empty label (a blank line of its file) is written as one without
    classes = [(f"{float(values[i]):f}" if floats else str(int(values[i]))) + f":{i}"
               + (f":{labels[i]}" if named and i < len(labels) and labels[i] else "") for i in best]
    answer = np.empty(len(classes), dtype=object)
    answer[:] = [text.encode() for text in classes]
    return answer, "BYTES"


class _Unclassifiable(Exception):
    """An output asked for by its top classes that has no one dimension of numbers to rank."""


class _Unjoinable(Exception):
    """A batch's items gave an output in shapes (or datatypes) that do not join into one tensor."""


def _joined(name: str, items: list[tuple[np.ndarray, str]], batched: bool) -> tuple[np.ndarray, str]:
    """An output as the request gets it: its one item's (with the batch dimension of 1 back on, if the
    request came with it), or its items' stacked along a new leading dimension."""
    array, datatype = items[0]
    if len(items) == 1:
        return (array[np.newaxis] if batched else array), datatype
    for k, (other, other_type) in enumerate(items[1:], 1):
        if other.shape != array.shape or other_type != datatype:
            raise _Unjoinable(f"is {datatype} {list(array.shape)} for item 0 of the batch, and "
                              f"{other_type} {list(other.shape)} for item {k}: its items cannot be joined into "
                              "one tensor; send them one a request")
    return np.stack([array for array, _ in items]), datatype
