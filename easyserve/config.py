"""Server configuration: the YAML keys, their defaults, and the checks that name what is wrong.

>>> Config.from_dict({"GPUs": "0,1", "ProcessPerGPU": 2, "Handle": "ImagenetResnet18Handle"}).gpus
(0, 1)
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import ConfigError, brief

__all__ = ["Config"]

# The YAML key of each field, in the order `repr` and the docs show them.
KEYS: dict[str, str] = {
    "GPUs": "gpus",
    "ProcessPerGPU": "process_per_gpu",
    "Handle": "handle",
    "HandleArgs": "handle_args",
    "Host": "host",
    "Port": "port",
    "HttpWorkers": "http_workers",
    "MaxBatchSize": "max_batch_size",
    "MaxWaitMs": "max_wait_ms",
    "MaxQueueSize": "max_queue_size",
    "TimeoutS": "timeout_s",
    "ShutdownDelayS": "shutdown_delay_s",
    "QueueOrder": "queue_order",
    "MaxBodyMB": "max_body_mb",
    "StartTimeoutS": "start_timeout_s",
    "StartsPerGPU": "starts_per_gpu",
    "FirstBatchTimeoutS": "first_batch_timeout_s",
    "MaxWorkerMemoryMB": "max_worker_memory_mb",
    "MaxBatchesPerWorker": "max_batches_per_worker",
    "PreprocessThreads": "preprocess_threads",
    "Pipeline": "pipeline",
    "ApiKey": "api_key",
    "KeepAliveTimeoutS": "keep_alive_timeout_s",
    "HeaderTimeoutS": "header_timeout_s",
    "BodyTimeoutS": "body_timeout_s",
    "MaxBufferedMB": "max_buffered_mb",
    "AllowedHosts": "allowed_hosts",
    "CorsOrigins": "cors_origins",
    "PassHeaders": "pass_headers",
    "ModelName": "model_name",
    "ModelVersion": "model_version",
    "AccessLog": "access_log",
}
FIELDS = {field: key for key, field in KEYS.items()}


def handle_name(handle: Any) -> Any:
    """A class handle by the name the YAML gives it (``module:Class``); any other as it is."""
    return f"{handle.__module__}:{handle.__qualname__}" if isinstance(handle, type) else handle


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a :class:`~easyserve.Server` needs to know, validated.

    ``gpus`` is ``"auto"`` (every GPU found, else CPU), ``()`` for CPU workers, or a tuple of GPU ids.
    ``handle`` is a class name found in a ``handles/`` folder, ``"module:Class"``,
    ``"path/to/file.py:Class"``, or a class object.
    """

    handle: Any = "easyserve.builtin:Demo"
    gpus: str | tuple[int, ...] = "auto"
    process_per_gpu: int = 1
    handle_args: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 9876
    # Processes that serve HTTP on Port (SO_REUSEPORT), all feeding the one queue; 1: the server
    # process serves HTTP itself. More help when one process's HTTP work is the limit (many cores,
    # many small requests); see easyserve/fronts.py.
    http_workers: int = 1
    max_batch_size: int = 8
    max_wait_ms: float = 2.0
    max_queue_size: int = 1024
    timeout_s: float = 30.0
    # After a stop signal, keep serving this long, with /ready (and the protocol's) answering 503 and
    # every answer closing its connection, before the drain stops taking connections: long enough for
    # a load balancer (a Kubernetes Service) to stop sending here. 0: drain at once.
    shutdown_delay_s: float = 0.0
    # "deadline": arrival order, but a request that can no longer be answered in time (overload: see
    # easyserve/batching.py) is passed over while another can; "fifo": arrival order always.
    queue_order: str = "deadline"
    max_body_mb: float = 16.0
    start_timeout_s: float = 300.0
    # Workers of one GPU that load the handle at once (at start, and when several restart together), the
    # GPUs side by side; None: all. 1 for a model whose loading needs more memory than it keeps (a
    # checkpoint read into host memory before it moves to the GPU, an engine built in GPU memory). The
    # CPU workers are one device. A worker waiting its turn has not begun its StartTimeoutS.
    starts_per_gpu: int | None = None
    # How long a process's first batch may run before the worker is taken for stuck (None: TimeoutS):
    # for a model that compiles or warms up on its first call. Its requests get their 504 at TimeoutS.
    first_batch_timeout_s: float | None = None
    # Replace a worker, between batches, once its resident memory is above this (a leaking handle).
    max_worker_memory_mb: float | None = None
    # Replace a worker after this many batches (give or take 10%, so workers do not all go at once).
    max_batches_per_worker: int | None = None
    # Threads a worker runs a batch's preprocess (and postprocess) calls on, side by side; None: the
    # worker's share of the CPU cores. 1 runs them one after another, for handles not safe in threads.
    preprocess_threads: int | None = None
    # A worker prepares its next batch while forward runs the current one (the server hands it one
    # batch ahead). None ("auto"): on for GPU workers, off for CPU ones, whose forward needs the same
    # cores (benchmarks/RESULTS.md). False for handles whose preprocess must not run beside forward.
    pipeline: bool | None = None
    # Required as "Authorization: Bearer <key>" on /predict, /stats and /metrics when set (or when the
    # EASYSERVE_API_KEY environment variable is); kept out of repr and to_dict.
    api_key: str | None = dataclasses.field(default=None, repr=False)
    # Slow or stalled clients: an idle keep-alive connection is closed after keep_alive_timeout_s, one
    # whose request headers take longer than header_timeout_s (from their first byte) is closed, and a
    # body that stalls for body_timeout_s between two chunks gets 408.
    keep_alive_timeout_s: float = 15.0
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    # Request bodies held in memory at once, across all connections; past it, 429 with Retry-After.
    max_buffered_mb: float = 512.0
    # Host names answered besides the loopback ones; None: any when bound to a public address, only
    # loopback names when bound to loopback (against DNS rebinding). ("*",) answers any.
    allowed_hosts: tuple[str, ...] | None = None
    # Browser origins (e.g. "https://app.example.com") allowed to call the API; ("*",) allows any.
    cors_origins: tuple[str, ...] = ()
    # Request headers the handle is given, as task["headers"] (names in lower case): the ones named,
    # no others, so that none the handle has no use for (a cookie, the API key) reaches it or its log.
    pass_headers: tuple[str, ...] = ()
    # The model's name and version in the Open Inference Protocol's paths (/v2/models/<name>/versions/<v>);
    # no name: the handle's class name.
    model_name: str | None = None
    model_version: str = "1"
    # A line at INFO for every request answered (logger easyserve.access): client, request line, status,
    # bytes, milliseconds, request id. Off: nginx in front keeps one, and a line a request costs a busy server.
    access_log: bool = False
    # Where relative paths (a handle's file, the handles/ folder) are looked up: the YAML's folder.
    base_dir: Path = dataclasses.field(default_factory=Path.cwd, compare=False)

    def __post_init__(self) -> None:
        for field, check in _CHECKS.items():
            object.__setattr__(self, field, check(FIELDS[field], getattr(self, field)))
        if self.max_buffered_mb < self.max_body_mb:
            raise ConfigError(
                f"MaxBufferedMB ({self.max_buffered_mb:g}) is below MaxBodyMB ({self.max_body_mb:g}): a body of "
                "the largest size allowed could never be held; raise MaxBufferedMB"
            )
        if self.first_batch_timeout_s is not None and self.first_batch_timeout_s < self.timeout_s:
            raise ConfigError(
                f"FirstBatchTimeoutS ({self.first_batch_timeout_s:g}) is below TimeoutS ({self.timeout_s:g}): it "
                "gives a process's first batch longer than TimeoutS, never less; raise it or leave it out"
            )

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> Config:
        """Read a YAML file; ``overrides`` (YAML or field names, ``None`` values skipped) win over it."""
        path = Path(path)
        try:
            with open(path, "rb") as f:  # at most a little past the limit: /dev/zero filled memory
                raw = f.read(MAX_CONFIG_BYTES + 1)
        except OSError as exc:
            where = "" if path.is_absolute() else f" (a path from the current directory, {os.getcwd()})"
            raise ConfigError(f"cannot read config file {str(path)!r}{where}: {exc.strerror}"
                              f"{_handle_named(str(path))}") from None
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path} is over {MAX_CONFIG_BYTES // 2**20} MB: is it the config?")
        text = _text(path, raw)
        if path.suffix.lower() == ".py":  # "is not valid YAML: line 4, column 17", of a handle's file
            raise ConfigError(f"{path} is a Python file, not a config: serve a handle it defines with `easyserve "
                              f"run --handle {path}:ClassName`, or name it in a YAML config (Handle: "
                              f"{path}:ClassName, from the config's folder or the current directory)")
        try:
            data = yaml.load(text, Loader=_UniqueKeys)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(exc)}{_odd_spaces(text)}"
                              f"{_colon_without_space(text)}") from None
        except RecursionError:
            raise ConfigError(f"{path} is nested too deeply to read") from None
        except ValueError:  # Python's limit on an integer's digits (4,300), met inside the parser
            raise ConfigError(f"{path} holds a number of more than 4,300 digits: is it the config?") from None
        if data is None:
            data = {}
        if isinstance(data, dict):  # a name's octal number kept as written, to be refused; any other, a number
            data = {key: value if key in ("ModelName", "ModelVersion") else _octal_as_int(value)
                    for key, value in data.items()}
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of keys (GPUs, Handle, ...), not {type(data).__name__}"
                              f"{_odd_spaces(text)}{_colon_without_space(text)}")
        try:
            named = by_field(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}{_odd_spaces(text)}") from None
        if "base_dir" in named:  # it reached the constructor twice: a TypeError's traceback
            raise ConfigError(f"{path}: {named['base_dir'][0]!r} is no setting of a config file: the paths in it "
                              "are taken from the file's own folder")
        named.update({_field_of(k): (k, v) for k, v in (overrides or {}).items() if v is not None})
        # the folder the path names, links left as they are: a project's configs/ linked to a shared folder
        # looked for handles/ and models/ one folder up from the shared one, not the project's
        return cls(**{field: value for field, (_, value) in named.items()}, base_dir=Path(os.path.abspath(path)).parent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base_dir: str | os.PathLike | None = None) -> Config:
        """Build from YAML-style keys (``ProcessPerGPU``); field names (``process_per_gpu``) work too,
        but not both for one setting."""
        kwargs = {field: value for field, (_, value) in by_field(data).items()}
        if base_dir is not None:
            kwargs["base_dir"] = Path(base_dir)
        return cls(**kwargs)

    def replace(self, **changes: Any) -> Config:
        """A copy with some values changed (field or YAML names); ``None`` values are skipped. One
        value given under two names (``handle=`` and ``Handle=``) is an error: the last one won."""
        named = by_field({key: value for key, value in changes.items() if value is not None})
        return dataclasses.replace(self, **{field: value for field, (_, value) in named.items()})

    def to_dict(self) -> dict[str, Any]:
        """The YAML keys and values (a class handle shown by name)."""
        out = {key: getattr(self, field) for key, field in KEYS.items()}
        if isinstance(out["GPUs"], tuple):
            out["GPUs"] = ",".join(map(str, out["GPUs"])) or "cpu"
        out["Handle"] = handle_name(out["Handle"])
        out["HandleArgs"] = dict(out["HandleArgs"])
        if out["Pipeline"] is None:
            out["Pipeline"] = "auto"
        if out["ApiKey"] is not None:
            out["ApiKey"] = "***"
        for key in ("AllowedHosts", "CorsOrigins", "PassHeaders"):
            if out[key] is not None:
                out[key] = list(out[key])
        return out

    @property
    def required_key(self) -> str | None:
        """The API key clients must send: ``ApiKey``, else ``$EASYSERVE_API_KEY``, else none. The
        environment's key may be short (its owner's choice), but not hold a space: no ``Bearer``
        header can carry one, and a key of one space locked every client out."""
        key = self.api_key or os.environ.get("EASYSERVE_API_KEY") or None
        if key is not None and (not key.strip() or any(c.isspace() for c in key)):
            raise ConfigError("$EASYSERVE_API_KEY: expected a key without spaces (value hidden)")
        return key

    @property
    def first_batch_limit_s(self) -> float:
        """How long a process's first batch may run before its worker is taken for stuck."""
        return self.first_batch_timeout_s or self.timeout_s

    @property
    def served_model_name(self) -> str:
        """The model's name in the Open Inference Protocol: ``ModelName``, else the handle's class name."""
        if self.model_name:
            return self.model_name
        spec = self.handle if isinstance(self.handle, str) else self.handle.__qualname__
        return spec.replace(":", ".").rpartition(".")[2]  # "module:Class", "file.py:Class", "Class"

    @property
    def model_identity(self) -> tuple[str, str]:
        """The served model's name and version in the Open Inference Protocol (its routes, statistics and
        metrics are the model's so named)."""
        return self.served_model_name, self.model_version


def _handle_named(given: str) -> str:
    """Where a config file's name that cannot be read names a handle as ``Handle`` would (``handles/x.py:Class``,
    ``module:Class``, ``Class``), the hint to give it with ``--handle``: only a Python file had one."""
    module, colon, name = given.rpartition(":")
    if (colon and module and name.isidentifier()) or (not colon and given.isidentifier()):
        return f"; to serve a handle, give it with --handle: `easyserve run --handle {given}`"
    return ""


def _text(path: Path, raw: bytes) -> str:
    """A config file's text: UTF-8 (a BOM, which YAML reads, included), or UTF-16 with its BOM (Notepad's
    "Unicode", PowerShell 5's ``>``). Either was said to be no text file, with no word of where."""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError:
            pass
    if b"\0" in raw:
        raise ConfigError(f"{path} is not a text file: is it the config?")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path} is not UTF-8 text: byte 0x{raw[exc.start]:02x} on line {line} (an editor's Latin-1 "
                          "or Windows-1252?); save it as UTF-8") from None


# what looks like a space or a colon, and is not one to YAML: pasted from a web page, or typed on a keyboard
# set for another language
_ODD_SPACES = {"\u00a0": "a non-breaking space (U+00A0)", "\u3000": "an ideographic space (U+3000)",
               "\uff1a": "a full-width colon (U+FF1A)", "\u2007": "a figure space (U+2007)",
               "\u202f": "a narrow non-breaking space (U+202F)"}


def _odd_spaces(text: str) -> str:
    """Where a config that failed holds a character YAML does not read as a space or a colon: what to
    say of it, the first such line named (or nothing). It was a YAML error on the next line, a file read
    as one string, or a key named with the spaces in it."""
    for number, line in enumerate(text.splitlines(), 1):
        for char, name in _ODD_SPACES.items():
            if char in line:
                return f" (line {number} holds {name}, which YAML does not read as such: type it again)"
    return ""


def _colon_without_space(text: str) -> str:
    """Where a config that failed has a line of a setting's name and a colon with no space after it (YAML
    reads ``GPUs:cpu`` as one string, not a key and its value): what to say of it, the line named. Only a
    line that begins a setting (settings are not indented; a line inside a block of text may read so), and
    never the API key's value, which an error goes on to logs with."""
    for number, line in enumerate(text.splitlines(), 1):
        found = re.match(r"([A-Za-z]\w*):([^\s:/].*)", line)  # not a URL's "http://"
        if found and (found[1] in KEYS or found[1] in FIELDS):
            value = "***" if _field_of(found[1]) == "api_key" else found[2].strip()
            shown = f"{found[1]}:{value}"
            return f" (line {number}, {shown!r}: a setting needs a space after its colon, '{found[1]}: {value}')"
    return ""


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong, and where, in one line: PyYAML's message is several, each naming "<unicode string>"."""
    if isinstance(exc, yaml.reader.ReaderError):  # a character YAML takes in no file (a control character)
        return f"character {chr(exc.character)!r} at offset {exc.position}: {exc.reason}"
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if mark is None or not problem:
        return " ".join(str(exc).split())
    context, begun = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    why = f" ({context}, begun on line {begun.line + 1})" if context and begun is not None else ""
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}{why}"


def by_field(data: Mapping[str, Any]) -> dict[str, tuple[str, Any]]:
    """Each setting's field, with the key it was given under and its value. One setting given under two
    names (``Port`` and ``port``) is an error: the YAML loader refuses a key given twice, and the second
    spelling got past it, the last one silently winning."""
    named: dict[str, tuple[str, Any]] = {}
    for key, value in data.items():
        field = _field_of(key)
        if field in named:
            raise ConfigError(f"{key!r} and {named[field][0]!r} name the same setting: give one")
        named[field] = (key, value)
    return named


def _field_of(key: str) -> str:
    if key in KEYS:
        return KEYS[key]
    if key in FIELDS:
        return key
    # compare without case and separators, so "max_batch" finds MaxBatchSize and "gpu" finds GPUs
    plain = {_plain(k): k for k in KEYS}
    guess = difflib.get_close_matches(_plain(str(key)), list(plain), n=1, cutoff=0.6)
    hint = f"; did you mean {plain[guess[0]]!r}?" if guess else "."
    raise ConfigError(f"unknown config key {key!r}{hint} Known keys: {', '.join(KEYS)}")


def _plain(key: str) -> str:
    return key.lower().replace("_", "").replace("-", "")


def _bad(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{key}: got {brief(value)}; expected {allowed}")


def _integer(low: int, high: int):
    def check(key: str, value: Any) -> int:
        allowed = f"an integer from {low} to {high}"
        if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,30}", value.strip()):  # not "²", nor "--5"
            value_int = int(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            value_int = value
        else:
            raise _bad(key, value, allowed)
        if not low <= value_int <= high:
            raise _bad(key, value, allowed)
        return value_int

    return check


def _number(low: float, high: float, low_open: bool = False):
    def check(key: str, value: Any) -> float:
        allowed = (f"a number {'above' if low_open else 'from'} {_figure(low)}{' up' if low_open else ''} to "
                   f"{_figure(high)}")
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
        except OverflowError:  # an integer of 400 digits: no float holds it
            raise ConfigError(f"{key}: got an integer of {len(str(value))} digits; expected {allowed}") from None
        except (TypeError, ValueError):
            raise _bad(key, value, allowed) from None
        if math.isnan(number) or number > high or number < low or (low_open and number == low):
            raise _bad(key, value, allowed)
        return number

    return check


def _figure(number: float) -> str:
    """1048576, not 1.04858e+06; 0.001 as it is."""
    return str(int(number)) if number == int(number) else f"{number:g}"


MAX_GPU_ID = 64  # GPU ids a config may name are below this: 1,000 of them asked for 64,000 workers


def _gpus(key: str, value: Any) -> str | tuple[int, ...]:
    allowed = '"auto", "cpu" (or empty), or GPU ids such as "0,1" or [0, 1]'
    if value is None:
        return ()
    if value == "auto" or (isinstance(value, tuple) and all(type(i) is int and 0 <= i < MAX_GPU_ID for i in value)
                           and len(set(value)) == len(value)):
        return value  # already checked (dataclasses.replace runs the checks again); a tuple given, as a list is
    items: Any = value
    if isinstance(value, bool):
        raise _bad(key, value, allowed)
    if isinstance(value, int):
        if value == -1:  # as the text "-1", CUDA_VISIBLE_DEVICES's way of saying none
            return ()
        items = [value]
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        if text in ("", "cpu", "none", "-1"):
            return ()
        items = [part.strip() for part in text.split(",")]
    if not isinstance(items, (list, tuple)):
        raise _bad(key, value, allowed)
    ids: list[int] = []
    for item in items:
        if isinstance(item, bool) or not (isinstance(item, int) or (isinstance(item, str)
                                                                     and re.fullmatch("[0-9]{1,9}", item))):
            raise _bad(key, value, allowed)
        if not 0 <= int(item) < MAX_GPU_ID:  # past any machine's: each one it lacks is CPU workers
            raise _bad(key, value, f"{allowed}, each below {MAX_GPU_ID}")
        if int(item) in ids:
            raise ConfigError(
                f"{key}: GPU {int(item)} is listed twice in {brief(value)}; use ProcessPerGPU for more workers per GPU"
            )
        ids.append(int(item))
    return tuple(ids)


def _handle(key: str, value: Any) -> Any:
    if isinstance(value, type):
        return value
    kind = type(value)
    if kind.__module__ != "builtins" and any(hasattr(kind, name) for name in ("forward", "run_batch", "setup")):
        name = kind.__qualname__
        raise ConfigError(f"{key}: got an instance of {name}; pass the class itself ({name}, not {name}()): each "
                          "worker makes its own, in its own process, with HandleArgs as its arguments")
    if not isinstance(value, str) or not value.strip():
        raise _bad(key, value, 'a handle class name, "module:Class", "path/to/file.py:Class", or a class')
    return value.strip()


def _handle_args(key: str, value: Any) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise _bad(key, value, "a mapping of keyword arguments for the handle, e.g. {model: models/x.onnx}")
    return dict(value)


def _host(key: str, value: Any) -> str:
    # a control character too: "127.0.0.1\0" bound 127.0.0.1 (the socket's name ends at the NUL), but
    # was taken for no loopback address, which opened the server to any Host
    if not isinstance(value, str) or not value.strip() or any(c.isspace() or not c.isprintable()
                                                              for c in value.strip()):
        raise _bad(key, value, 'an address to bind, e.g. "127.0.0.1" or "0.0.0.0"')
    return value.strip()


def _api_key(key: str, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):  # YAML read the digits as a number
        raise ConfigError(f"{key}: YAML read it as a number, and a key is a string: put it in quotes, "
                          f"{key}: \"...\" (value hidden)")
    if not isinstance(value, str) or len(value.strip()) < 8 or any(c.isspace() for c in value):
        raise ConfigError(f"{key}: expected a string of at least 8 characters without spaces (value hidden)")
    return value


def _optional(check):
    def optional(key: str, value: Any) -> Any:
        return None if value is None or value == "" else check(key, value)

    return optional


def _names(kind: str, check_one, unset: tuple[str, ...] | None, normal=lambda name: name):
    """A list of names, or one comma-separated string; ``"*"`` among them means any. Each is checked
    with ``check_one``, then written as ``normal`` writes it."""

    def check(key: str, value: Any) -> tuple[str, ...] | None:
        if value is None:
            return unset
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
            raise _bad(key, value, f'a list of {kind} or one comma-separated string; "*" for any')
        names = tuple(item.strip().lower().rstrip("/") for item in items if item.strip())
        if "*" in names:
            return ("*",)
        for name in names:
            if not check_one(name):
                raise _bad(key, value, f'{kind}; "*" for any')
        return tuple(dict.fromkeys(normal(name) for name in names))

    return check


def _host_name(name: str) -> bool:
    # "api.example.com", "api.example.com:8443", "10.0.0.5" or "[::1]:9876": no scheme, path or spaces
    return "/" not in name and not any(c.isspace() for c in name)


def _origin_as_sent(name: str) -> str:
    """An origin as a browser writes it: without its scheme's own port. "https://app.example.com:443"
    was taken, and never matched: a page there sends "https://app.example.com", and got 403."""
    for scheme, port in (("https://", ":443"), ("http://", ":80")):
        if name.startswith(scheme) and name.endswith(port):
            return name[: -len(port)]
    return name


def _origin(name: str) -> bool:
    scheme, sep, rest = name.partition("://")
    return name == "null" or (scheme in ("http", "https") and bool(sep) and bool(rest) and "/" not in rest
                              and not any(c.isspace() for c in rest))


_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")  # RFC 9110 5.6.2, lower case
MAX_PASSED_HEADERS = 32


def _header_names(key: str, value: Any) -> tuple[str, ...]:
    """Header names: a list, or one comma-separated string; in lower case, each once. No ``"*"``: a
    handle is given what it names, never a client's cookies or the API key by default."""
    items = [] if value is None else value.split(",") if isinstance(value, str) else value
    allowed = 'a list of header names such as ["X-Tenant", "traceparent"], or one comma-separated string'
    if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
        raise _bad(key, value, allowed)
    names = tuple(dict.fromkeys(item.strip(" \t").lower() for item in items if item.strip(" \t")))
    if any(name == "*" for name in names):
        raise _bad(key, value, allowed + ' (name each one: "*" would hand the handle cookies and keys too)')
    wrong = next((name for name in names if not set(name) <= _TOKEN), None)
    if wrong is not None:
        raise ConfigError(f"{key}: {wrong!r} is not a header name (letters, digits and !#$%&'*+-.^_`|~); "
                          "separate names with commas")
    if len(names) > MAX_PASSED_HEADERS:
        raise _bad(key, value, f"{allowed}, at most {MAX_PASSED_HEADERS}")
    return names


LABEL = "a name of letters, digits, '.', '_' and '-', such as resnet18 or 1"  # ModelName's, ModelVersion's


def _model_label(key: str, value: Any) -> str:
    # a segment of a URL path: letters, digits and . _ - need no quoting (a version of 1 is "1")
    # 010 read as 8 (served as "8"), 1.10 as 1.1 (told 1.1 is no name): not what was written
    if isinstance(value, _Octal):
        raise ConfigError(f'{key}: YAML read {value.text} as the octal number {int(value)}: put it in quotes, '
                          f'{key}: "...", for the name as written')
    if isinstance(value, float):
        raise ConfigError(f"{_bad(key, value, LABEL)}, as a string: in a YAML config, put it in quotes, "
                          f'{key}: "...", for the name as written (YAML reads 1.10 as the number 1.1)')
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        value = str(value)
    if not isinstance(value, str) or not value or value in (".", "..") or not all(
        c.isascii() and (c.isalnum() or c in "._-") for c in value
    ):
        raise _bad(key, value, LABEL)
    return value


_TRUTH = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}  # as the command line says


def _switch(key: str, value: Any) -> bool | None:
    """true, false, or auto (``None``: the server decides); YAML reads true and false itself, strings
    come from the command line."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    return _flag(key, value, "true, false or auto")


def _flag(key: str, value: Any, allowed: str = "true or false") -> bool:
    """true or false (YAML reads them itself; strings come from the command line)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUTH:
        return _TRUTH[value.strip().lower()]
    raise _bad(key, value, allowed)


def _one_of(*words: str):
    def check(key: str, value: Any) -> str:
        if isinstance(value, str) and value.strip().lower() in words:
            return value.strip().lower()
        raise _bad(key, value, " or ".join(words))

    return check


def _base_dir(key: str, value: Any) -> Path:
    return Path(value)


MAX_CONFIG_BYTES = 2**20  # a config is a page of YAML; a larger file is something else

# Below these, a setting only breaks the server (TimeoutS 1e-300 answered every request 504, MaxBodyMB
# 1e-12 refused every body): 10 ms for a time, 1 KB for a body.
MIN_SECONDS = 0.01
MIN_MB = 0.001

_CHECKS = {
    "handle": _handle,
    "gpus": _gpus,
    "process_per_gpu": _integer(1, 64),
    "http_workers": _integer(1, 64),
    "handle_args": _handle_args,
    "host": _host,
    "port": _integer(0, 65535),
    "max_batch_size": _integer(1, 4096),
    "max_wait_ms": _number(0, 10_000),
    "max_queue_size": _integer(1, 1_000_000),
    "timeout_s": _number(MIN_SECONDS, 86_400),
    "shutdown_delay_s": _number(0, 3_600),
    "queue_order": _one_of("deadline", "fifo"),
    "max_body_mb": _number(MIN_MB, 4096),
    "start_timeout_s": _number(MIN_SECONDS, 86_400),
    "first_batch_timeout_s": _optional(_number(MIN_SECONDS, 86_400)),
    "max_worker_memory_mb": _optional(_number(MIN_MB, 10_000_000)),
    "max_batches_per_worker": _optional(_integer(1, 10**12)),
    "preprocess_threads": _optional(_integer(1, 256)),
    "starts_per_gpu": _optional(_integer(1, 1024)),
    "pipeline": _switch,
    "api_key": _api_key,
    "keep_alive_timeout_s": _number(MIN_SECONDS, 86_400),
    "header_timeout_s": _number(MIN_SECONDS, 86_400),
    "body_timeout_s": _number(MIN_SECONDS, 86_400),
    "max_buffered_mb": _number(MIN_MB, 1_048_576),
    "allowed_hosts": _names('host names such as "api.example.com" (a port is optional)', _host_name, None),
    "cors_origins": _names('origins such as "https://app.example.com"', _origin, (), _origin_as_sent),
    "pass_headers": _header_names,
    "model_name": _optional(_model_label),
    "model_version": _model_label,
    "access_log": _flag,
    "base_dir": _base_dir,
}
FIELDS["base_dir"] = "base_dir"


class _Octal(int):
    """A number YAML 1.1 read as octal (``010`` is 8), with its ``text``: a name given so (ModelVersion) is
    refused for it, where it became "8"."""

    text: str


def _octal_as_int(value: Any) -> Any:
    """``value`` (as YAML read it) with each :class:`_Octal` in it the ``int`` it is, changed where it is:
    each list and mapping once, however many aliases share it (nine levels of nine were 387 million
    items to walk), and one that holds itself."""
    if isinstance(value, _Octal):
        return int(value)
    seen: set[int] = set()
    todo = [value]
    while todo:
        container = todo.pop()
        if not isinstance(container, (dict, list)) or id(container) in seen:
            continue
        seen.add(id(container))
        if isinstance(container, dict) and any(isinstance(key, _Octal) for key in container):  # {00: background}
            items = list(container.items())
            container.clear()
            container.update((int(key) if isinstance(key, _Octal) else key, item) for key, item in items)
        for key, item in list(container.items() if isinstance(container, dict) else enumerate(container)):
            if isinstance(item, _Octal):
                container[key] = int(item)
            else:
                todo.append(item)
    return value


class _UniqueKeys(yaml.SafeLoader):
    """``yaml.safe_load``, except that a key given twice is an error: the last one silently won, and
    a ``Port`` or ``Handle`` written further up was not the one served. A number in exponent form
    without a point (``1e-3``) is a float, as YAML 1.2 and JSON read it: it reached a handle's
    HandleArgs as the string "1e-3" (where ``TimeoutS: 1e2`` was 100.0, read as a number by its key)."""

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        value = super().construct_yaml_int(node)
        digits = node.value.lstrip("+-").replace("_", "")
        if len(digits) > 1 and digits[0] == "0" and digits.isdigit():
            octal = _Octal(value)
            octal.text = node.value
            return octal
        return value

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: keys after it may override
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):  # a list or a mapping as a key: YAML's to refuse
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice (also on line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_UniqueKeys.add_constructor("tag:yaml.org,2002:int", _UniqueKeys.construct_yaml_int)
_UniqueKeys.add_implicit_resolver("tag:yaml.org,2002:float",
                                  re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))
