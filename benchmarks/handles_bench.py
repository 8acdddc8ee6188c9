"""Handles the benchmarks serve: light on purpose, so that what is measured is the serving, not a model."""

from __future__ import annotations

import numpy as np

from easyserve import Handle, Tensor

SHAPE = (224, 224, 3)


class Pixels(Handle):
    """A uint8 224x224 RGB image, sent to ``/predict`` as ``.npy`` (or raw bytes) or as a v2 UINT8
    tensor; answers the brightest channel. Both APIs reach the same preprocess, forward and postprocess."""

    inputs = [Tensor("pixels", "UINT8", list(SHAPE))]
    outputs = [Tensor("class", "INT64", [1])]

    def preprocess(self, task: dict) -> np.ndarray:
        if task.get("protocol") == "v2":
            return task["task_info"]["pixels"]
        data = task["task_info"]["data"]  # an array for application/x-npy, else bytes
        return data if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8).reshape(SHAPE)

    def forward(self, batch: np.ndarray) -> np.ndarray:
        return batch.mean(axis=(1, 2)).argmax(axis=1)

    def postprocess(self, output: np.ndarray, task: dict) -> dict:
        if task.get("protocol") == "v2":
            return {"class": [int(output)]}
        return {"class": int(output)}


class Loads(Handle):
    """A model whose loading needs more memory than it keeps, as a checkpoint read into host memory before
    it moves to a GPU: ``setup`` reads ``load_mb`` (HandleArgs), keeps ``keep_mb`` of it, and takes
    ``load_s``. Answers its inputs."""

    def setup(self, device) -> None:
        import time

        began = time.monotonic()
        checkpoint = np.ones(int(self.args.get("load_mb", 400)) * 2**20, np.uint8)  # touched: resident
        self.weights = checkpoint[: int(self.args.get("keep_mb", 100)) * 2**20].copy()
        time.sleep(max(0.0, float(self.args.get("load_s", 1.0)) - (time.monotonic() - began)))
        del checkpoint

    def forward(self, batch: list) -> list:
        return batch
