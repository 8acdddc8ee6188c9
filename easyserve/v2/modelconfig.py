"""Triton's model configuration for the one model a server runs: ``GET /v2/models/<name>/config``.

Triton's tools read it beside the model's metadata. ``perf_analyzer`` takes ``max_batch_size`` from it
and, where that is above 0, reads the first dimension of every shape in the metadata as the batch's and
sends its own (``-b``) there; a client written for a Triton model (``image_client``) does the same.
A request to easyserve may carry a leading batch dimension on each input a handle declares (see
:mod:`easyserve.v2.protocol`), so both documents say so as Triton's do for a batching model: the
metadata's shapes begin with ``-1``, and the configuration gives the batch's bound (``MaxBatchSize``)
and each tensor's shape without it (``dims``). A handle that declares no inputs takes each input as
it comes: no batch dimension is spoken of, and ``max_batch_size`` is 0, as for a Triton model that
does not batch.

Only fields whose values are true of easyserve are written: the tensors (an output's ``label_filename``
where its labels were read from a file), the batch bound, the queue's wait (``dynamic_batching``) and
the worker processes (``instance_group``: ``ProcessPerGPU`` on each of the GPUs, or the CPU workers).
Triton's others (optimization, warm-up, ensembles) describe what easyserve does not have.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..tensors import Tensor

if TYPE_CHECKING:
    from ..config import Config
    from ..devices import WorkerSpec
    from .protocol import Signature

__all__ = ["CONFIG_TYPES", "model_config", "model_metadata"]

# The protocol's datatypes as Triton's configuration names them (its BYTES is TYPE_STRING)
CONFIG_TYPES = {
    "BOOL": "TYPE_BOOL", "UINT8": "TYPE_UINT8", "UINT16": "TYPE_UINT16", "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64", "INT8": "TYPE_INT8", "INT16": "TYPE_INT16", "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64", "FP16": "TYPE_FP16", "FP32": "TYPE_FP32", "FP64": "TYPE_FP64", "BF16": "TYPE_BF16",
    "BYTES": "TYPE_STRING",
}


def model_metadata(signature: Signature, name: str, version: str) -> dict[str, Any]:
    """The protocol's model metadata: each shape with a leading ``-1`` where requests may carry a batch."""
    batched = signature.batches
    return {"name": name, "versions": [version], "platform": signature.platform,
            "inputs": [t.metadata(batched) for t in signature.inputs],
            "outputs": [t.metadata(batched) for t in signature.outputs]}


def model_config(signature: Signature, name: str, config: Config, specs: Iterable[WorkerSpec]) -> dict[str, Any]:
    """Triton's model configuration (its JSON form) of what this server runs."""
    bound = config.max_batch_size if signature.batches else 0
    answer: dict[str, Any] = {
        "name": name, "platform": signature.platform, "max_batch_size": bound,
        # an input's format (its dimensions' meaning for an image: NCHW, NHWC) is not declared: Triton's
        # default, which its clients read (image_client.py fails on a configuration without one)
        "input": [{**_dims(t), "format": "FORMAT_NONE", "optional": t.optional} for t in signature.inputs],
        # an output's labels, read from a file (OnnxModel's HandleArgs labels), named as Triton names them
        "output": [{**_dims(t), "label_filename": t.label_filename} if t.label_filename else _dims(t)
                   for t in signature.outputs],
        "instance_group": _groups(name, list(specs)),
    }
    if bound > 1:  # requests wait up to MaxWaitMs for others to batch with
        answer["dynamic_batching"] = {"max_queue_delay_microseconds": round(config.max_wait_ms * 1000)}
    return answer


def _dims(tensor: Tensor) -> dict[str, Any]:
    return {"name": tensor.name, "data_type": CONFIG_TYPES[tensor.datatype], "dims": list(tensor.shape)}


def _groups(name: str, specs: list[WorkerSpec]) -> list[dict[str, Any]]:
    """The workers as Triton's instance groups: ``count`` processes on each of ``gpus``, and those on the
    CPU (all of them, or those of GPUs asked for and not found)."""
    groups = []
    gpus = sorted({spec.gpu for spec in specs if spec.gpu is not None})
    if gpus:
        count = sum(spec.gpu == gpus[0] for spec in specs)  # ProcessPerGPU, the same on each
        groups.append({"kind": "KIND_GPU", "count": count, "gpus": gpus})
    cpu = sum(spec.gpu is None for spec in specs)
    if cpu:
        groups.append({"kind": "KIND_CPU", "count": cpu})
    # named as Triton names groups the configuration leaves unnamed
    return [{"name": name if len(groups) == 1 else f"{name}_{i}", **group} for i, group in enumerate(groups)]
