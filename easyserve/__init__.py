"""easyserve: serve deep-learning models over HTTP with GPU worker pools and dynamic batching."""

from __future__ import annotations

from .bench import bench
from .bodies import Binary
from .client import Client
from .config import Config
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
)
from .handle import Device, Handle, payload_bytes
from .onnxmodel import OnnxModel
from .server import Server
from .sweep import sweep
from .tensors import Tensor

__version__ = "0.1.0"

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
