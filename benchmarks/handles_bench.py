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
