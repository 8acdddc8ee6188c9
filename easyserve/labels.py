"""An output's class names from ``HandleArgs``, as Triton's ``label_filename`` gives them: what a request
asking for the output's top classes (the Open Inference Protocol's classification) gets beside each
score, ``"0.872100:3:cat"``.

``labels`` is a text file (one label a line, in class order, UTF-8; a byte order mark and blank lines
at its end are left out), a list of the labels, or a mapping of output name to either. A file or list
alone is for the one output whose last dimension is the count of labels (or, where none is, the one
whose last dimension the model leaves open): several alike, or none, is a :class:`ConfigError` that
names the outputs. Where an output's last dimension is known, the count must be it.

>>> outputs = [Tensor("scores", "FP32", [3]), Tensor("total", "FP32", [])]
>>> labelled(outputs, ["cat", "dog", "bird"], None)[0].labels
('cat', 'dog', 'bird')
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError, brief
from .tensors import Tensor

__all__ = ["check_labels", "labelled", "read_labels"]

UNRANKED = ("BYTES", "BOOL")  # outputs the classification extension does not rank: no labels for them


def check_labels(given: Any, where: str = "OnnxModel") -> None:
    """A :class:`ConfigError` unless ``given`` is one of the forms ``labels`` takes (or ``None``)."""
    if given is None:
        return
    if isinstance(given, Mapping):
        if not given:
            raise ConfigError(f"{where}: labels is an empty mapping; give {{output name: labels file}}")
        for name, value in given.items():
            if not isinstance(name, str):
                raise ConfigError(f"{where}: labels' keys are output names (strings), got {brief(name)}")
            _check_one(value, f"{where}: labels for output {name!r}")
        return
    _check_one(given, f"{where}: labels")


def _check_one(value: Any, said: str) -> None:
    if isinstance(value, (str, os.PathLike)):
        if not os.fspath(value):
            raise ConfigError(f"{said} is an empty path; give a labels file (one label a line)")
        return
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{said} must be a labels file (one label a line), a list of labels, or a mapping "
                          f"{{output name: labels file}}; got {brief(value)}")
    if not value:
        raise ConfigError(f"{said} is an empty list")
    wrong = next((i for i, label in enumerate(value) if not isinstance(label, str)), None)
    if wrong is not None:  # YAML reads `- 1` as a number and `- yes` as true: quoted, they are the names
        raise ConfigError(f"{said}: label {wrong} is {brief(value[wrong])} ({type(value[wrong]).__name__}), not a "
                          "string; quote it in the YAML")


def read_labels(path: str | os.PathLike) -> list[str]:
    """The labels in the text file at ``path``: one a line (``\\n`` or ``\\r\\n``), UTF-8, a byte order
    mark left out, and blank lines at the end too (an editor's last newline, or a few). A blank line
    elsewhere is a class without a name, which keeps the others' indices. :class:`ConfigError` where
    the file cannot be read, is not UTF-8, or holds no label."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"labels file {os.fspath(path)!r} cannot be read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(f"labels file {os.fspath(path)!r} is not UTF-8 text (byte {data[exc.start]:#04x} on line "
                          f"{line}); save it as UTF-8") from None
    # "\n" alone: str.splitlines would also split at form feeds and U+2028, which a label may hold
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ConfigError(f"labels file {os.fspath(path)!r} holds no label (one a line)")
    return lines


def labelled(outputs: Sequence[Tensor], given: Any, find: Callable[[str | os.PathLike], Path] | None,
             where: str = "OnnxModel", not_served: Sequence[str] = ()) -> list[Tensor]:
    """``outputs`` with the labels ``given`` (see the module's docstring) on those they are for. ``find``
    turns a file's name into its path (:meth:`Device.find`, beside the config as the model is); it is
    not called for a list. ``not_served`` names outputs left out of ``outputs`` (a type requests do not
    carry), which a mapping may not label either."""
    if given is None:
        return list(outputs)
    check_labels(given, where)
    by_name = {t.name: t for t in outputs}
    if isinstance(given, Mapping):
        chosen = {}
        for name, value in given.items():
            if name not in by_name:
                why = " (it is not served)" if name in not_served else ""
                raise ConfigError(f"{where}: labels for output {name!r}, which the model does not have{why}; its "
                                  f"outputs are {_described(outputs)}")
            chosen[name] = _read(value, find, where)
    else:
        labels, named, filename = _read(given, find, where)
        chosen = {_fitting(outputs, labels, named, where).name: (labels, named, filename)}
    answer = []
    for tensor in outputs:
        if tensor.name in chosen:
            labels, named, filename = chosen[tensor.name]
            _check_count(tensor, labels, named, where)
            tensor = dataclasses.replace(tensor, labels=labels, label_filename=filename)
        answer.append(tensor)
    return answer


def _read(value: Any, find: Callable[[str | os.PathLike], Path] | None,
          where: str) -> tuple[list[str], str | None, str | None]:
    """The labels ``value`` gives, the file as the config names it, and the name of the file they were
    read from (the last two ``None`` for a list)."""
    if isinstance(value, (list, tuple)):
        return list(value), None, None
    if find is None:
        raise ConfigError(f"{where}: labels file {os.fspath(value)!r} given where no file can be looked for")
    try:
        path = find(value)
        return read_labels(path), os.fspath(value), path.name
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _fitting(outputs: Sequence[Tensor], labels: list[str], named: str | None, where: str) -> Tensor:
    """The one output that labels given without an output's name are for: the only one whose last
    dimension is their count, else the only one whose last dimension is left open."""
    ranked = [t for t in outputs if t.datatype not in UNRANKED and t.shape]
    for size in (len(labels), -1):
        fit = [t for t in ranked if t.shape[-1] == size]
        if len(fit) == 1:
            return fit[0]
        if len(fit) > 1:
            names = ", ".join(repr(t.name) for t in fit)
            raise ConfigError(f"{where}: {_source(named)} has {_count(labels)}, which could be for outputs {names} "
                              f"(each with last dimension {'left open' if size == -1 else size}): say which, "
                              f"labels: {{{fit[0].name}: {named or '[...]'}}}")
    raise ConfigError(f"{where}: {_source(named)} has {_count(labels)}, and no output's last dimension is "
                      f"{len(labels)} (or left open) to be their classes; the model's outputs are "
                      f"{_described(outputs)}")


def _check_count(tensor: Tensor, labels: list[str], named: str | None, where: str) -> None:
    if tensor.datatype in UNRANKED:
        raise ConfigError(f"{where}: labels for output {tensor.name!r}, which is {tensor.datatype}: classification "
                          "ranks numbers, so its labels would never be given")
    classes = tensor.shape[-1] if tensor.shape else 1
    if classes not in (-1, len(labels)):
        raise ConfigError(f"{where}: {_source(named)} has {_count(labels)}, and output {tensor.name!r} has {classes} "
                          f"classes (its last dimension; shape {list(tensor.shape)})")


def _source(named: str | None) -> str:
    return f"labels file {named!r}" if named else "the labels list"


def _count(labels: list[str]) -> str:
    return f"{len(labels)} label{'s' * (len(labels) != 1)}"


def _described(outputs: Sequence[Tensor]) -> str:
    return ", ".join(f"{t.name!r} ({t.datatype} {list(t.shape)})" for t in outputs)
