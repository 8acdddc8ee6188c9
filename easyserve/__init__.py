"""easyserve: serve deep-learning models over HTTP with GPU worker pools and dynamic batching."""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from .bodies import Binary
from .errors import (
    BadRequest,
    ChecksumError,
    ConfigError,
    DownloadError,
    EasyServeError,
    HandleError,
    NoAnswer,
    NotFound,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    StartupError,
    Timeout,
    Unauthorized,
    UnsupportedMediaType,
    WorkerDied,
    WriteError,
)
from .handle import Device, Handle, payload_bytes
from .tensors import Tensor

if TYPE_CHECKING:
    from .bench import bench
    from .client import Client
    from .config import Config
    from .onnxmodel import OnnxModel
    from .server import Server
    from .sweep import sweep

__version__ = "0.1.0"

# Imported when first asked for: a worker or HTTP front process imports this package before its own
# module, and needs none of these (the server, aiohttp's client...): 0.3 s more at every start.
_LAZY = {"Server": "server", "Client": "client", "bench": "bench", "sweep": "sweep", "Config": "config",
         "OnnxModel": "onnxmodel"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """What a notebook's completion offers after ``easyserve.``: the API, not this module's own imports
    (``Any``, ``sys``...), and the lazy names before they are first used."""
    return sorted([*__all__, "__version__"])


class _Package(types.ModuleType):
    """This package's module. Importing a submodule names it on its package: ``easyserve.bench`` and
    ``easyserve.sweep`` would then be their modules, not the functions this package gives."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = [
    "Server",
    "Client",
    "bench",
    "sweep",
    "Config",
    "Handle",
    "OnnxModel",
    "Device",
    "Tensor",
    "Binary",
    "payload_bytes",
    "EasyServeError",
    "ConfigError",
    "DownloadError",
    "ChecksumError",
    "WriteError",
    "StartupError",
    "BadRequest",
    "PayloadTooLarge",
    "Unauthorized",
    "UnsupportedMediaType",
    "HandleError",
    "WorkerDied",
    "NotFound",
    "Overloaded",
    "NotReady",
    "Timeout",
    "NoAnswer",
]
