"""ImageNet classification with ResNet-18 from the ONNX model zoo (``resnet18-v1-7.onnx``).

Send an image (``{"img": "<base64>"}``, a form file or a raw body); the answer is the top class with
its label and softmax probability, and the ``top_k`` best (``HandleArgs``, or a request's own:
``/predict?top_k=3``)::

    {"class": 285, "label": "Egyptian cat", "score": 0.62,
     "top": [{"class": 285, "label": "Egyptian cat", "score": 0.62}, ...]}

Over the Open Inference Protocol it takes ``img`` (BYTES [1]: the encoded picture) or ``pixels`` (UINT8
[height, width, 3], RGB) and answers the tensors ``scores`` (FP32 [1000], every class's probability),
``class`` (INT64 [1]) and ``label`` (BYTES [1]).
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from vision import IMAGE_INPUTS, draft_bound, open_model, read_labels, request_image, request_option

from easyserve import ConfigError, Device, Handle, Tensor
from easyserve.errors import brief

SIZE = 224
# ImageNet statistics in 0-255 pixel units, applied channel by channel in the order given.
MEAN = np.array([123.675, 116.28, 103.53], np.float32)
STD = np.array([58.395, 57.12, 57.375], np.float32)


class ImagenetResnet18Handle(Handle):
    """ResNet-18 on ImageNet: input ``data`` [N,3,224,224] float32, output ``resnetv15_dense0_fwd`` [N,1000].

    Preprocessing is the original easy-serve handle's: resize to 224x224, then subtract ``MEAN`` and
    divide by ``STD``, channel by channel. The original read images with OpenCV, so its channels were
    in BGR order, against the model's training; ``channel_order: RGB`` (the default) feeds the model
    the order it was trained on, ``BGR`` reproduces the original's answers. (Resizing differs
    slightly: Pillow smooths when it shrinks an image, OpenCV's default does not.) ``jpeg_draft: true``
    lets libjpeg decode a large JPEG at a reduced scale, no smaller than 224x224, before the resize:
    half the decoding time of a 1920x1200 photo, pixels a little different from the full decoding.
    """

    INPUT = "data"
    OUTPUT = "resnetv15_dense0_fwd"
    inputs = IMAGE_INPUTS
    outputs = [Tensor("scores", "FP32", [1000]), Tensor("class", "INT64", [1]), Tensor("label", "BYTES", [1])]

    def __init__(self, model: str = "models/resnet18-v1-7.onnx", top_k: int = 5, channel_order: str = "RGB",
                 jpeg_draft: bool = False) -> None:
        super().__init__(model=model, top_k=top_k, channel_order=channel_order, jpeg_draft=jpeg_draft)
        if str(channel_order).upper() not in ("BGR", "RGB"):
            raise ConfigError(f"HandleArgs channel_order: got {brief(channel_order)}; expected BGR or RGB")
        if not isinstance(top_k, int) or not 1 <= top_k <= 1000:
            raise ConfigError(f"HandleArgs top_k: got {brief(top_k)}; expected an integer from 1 to 1000")
        self.model = model
        self.top_k = top_k
        self.bgr = str(channel_order).upper() == "BGR"
        self.draft = draft_bound(jpeg_draft, SIZE)

    def setup(self, device: Device) -> None:
        self.session = open_model(device, self.model, "resnet18")
        self.labels = read_labels("imagenet_labels.txt")
        # the scores' class names: an inference request that asks for the top classes (tritonclient's
        # class_count) gets "score:index:label", and the model configuration names the file
        scores = Tensor("scores", "FP32", [1000], labels=self.labels, label_filename="imagenet_labels.txt")
        self.outputs = [scores, *type(self).outputs[1:]]

    def preprocess(self, task: dict) -> np.ndarray:
        if task.get("protocol") != "v2":  # (an inference request is answered every class's score)
            self.top(task)  # a request's top_k it cannot take is refused before its picture is decoded
        image = request_image(task, self.draft).resize((SIZE, SIZE), Image.BILINEAR)
        pixels = np.asarray(image, np.float32)  # height, width, RGB
        if self.bgr:
            pixels = pixels[:, :, ::-1]
        return np.ascontiguousarray(((pixels - MEAN) / STD).transpose(2, 0, 1))

    def forward(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.OUTPUT], {self.INPUT: batch})[0]

    def postprocess(self, logits: np.ndarray, task: dict) -> dict:
        shifted = np.exp(logits - logits.max())  # the model gives logits; the answer gives probabilities
        probabilities = shifted / shifted.sum()
        if task.get("protocol") == "v2":
            best = int(probabilities.argmax())
            return {"scores": probabilities, "class": [best], "label": [self.labels[best]]}
        best = np.argsort(-probabilities, kind="stable")[: self.top(task)]
        top = [{"class": int(i), "label": self.labels[i], "score": round(float(probabilities[i]), 6)} for i in best]
        return {**top[0], "top": top}

    def top(self, task: dict) -> int:
        """How many classes the answer lists: the request's ``top_k``, else the handle's."""
        return int(request_option(task, "top_k", self.top_k, 1, 1000, integer=True))
