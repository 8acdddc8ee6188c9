"""COCO object detection with YOLOv3 from the ONNX model zoo (``yolov3-10.onnx``).

Send an image; the answer lists the objects found with a score of at least ``score_threshold``
(``HandleArgs``, or a request's own: ``/predict?score_threshold=0.5``, or the inference request's
parameter of that name), best first, each box in the original image's pixels as ``[y1, x1, y2, x2]``
(top, left, bottom, right)::

    {"detections": [{"class": 16, "label": "dog", "score": 0.93, "box": [112.4, 60.0, 410.9, 301.2]}],
     "image_size": [480, 640]}

Over the Open Inference Protocol it takes ``img`` (BYTES [1]: the encoded picture) or ``pixels`` (UINT8
[height, width, 3], RGB) and answers the same objects, in the same order, as the tensors ``boxes``
(FP32 [N, 4], ``[y1, x1, y2, x2]``), ``scores`` (FP32 [N]), ``classes`` (INT64 [N]) and ``labels``
(BYTES [N]), unrounded.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from vision import IMAGE_INPUTS, draft_bound, open_model, read_labels, request_image, request_option

from easyserve import ConfigError, Device, Handle, Tensor
from easyserve.errors import brief

SIZE = 416
GREY = (128, 128, 128)


class CocoYolov3Handle(Handle):
    """YOLOv3 on COCO: inputs ``input_1`` [N,3,416,416] float32 (RGB in 0..1, letterboxed) and
    ``image_shape`` [N,2] float32 (original height, width); outputs boxes [N,B,4], scores [N,80,B]
    and the (batch, class, box) indices that the model's own non-maximum suppression kept.
    ``jpeg_draft: true`` lets libjpeg decode a large JPEG at a reduced scale, its longer side no
    shorter than 416, before the letterbox; boxes stay in the original picture's pixels.
    """

    INPUTS = ("input_1", "image_shape")
    OUTPUTS = ("yolonms_layer_1/ExpandDims_1:0", "yolonms_layer_1/ExpandDims_3:0", "yolonms_layer_1/concat_2:0")
    inputs = IMAGE_INPUTS
    outputs = [Tensor("boxes", "FP32", [-1, 4]), Tensor("scores", "FP32", [-1]), Tensor("classes", "INT64", [-1]),
               Tensor("labels", "BYTES", [-1])]

    def __init__(self, model: str = "models/yolov3-10.onnx", score_threshold: float = 0.3,
                 jpeg_draft: bool = False) -> None:
        super().__init__(model=model, score_threshold=score_threshold, jpeg_draft=jpeg_draft)
        if isinstance(score_threshold, bool) or not isinstance(score_threshold, (int, float)) \
                or not 0 <= score_threshold <= 1:
            raise ConfigError(f"HandleArgs score_threshold: got {brief(score_threshold)}; "
                              "expected a number from 0 to 1")
        self.model = model
        self.score_threshold = float(score_threshold)
        self.draft = draft_bound(jpeg_draft, SIZE)

    def setup(self, device: Device) -> None:
        self.session = open_model(device, self.model, "yolov3")
        self.labels = read_labels("coco_labels.txt")

    def preprocess(self, task: dict) -> tuple[np.ndarray, np.ndarray]:
        self.threshold(task)  # a request's threshold it cannot take is refused before its picture is decoded
        image = request_image(task, self.draft, fit=True)
        width, height = image.info.get("full_size", image.size)  # a JPEG decoded at a reduced scale: its own
        pixels = np.asarray(letterbox(image, SIZE, (width, height)), np.float32) / 255.0
        return pixels.transpose(2, 0, 1).copy(), np.array([height, width], np.float32)

    def forward(self, batch: tuple[np.ndarray, np.ndarray]) -> list[np.ndarray]:
        images, shapes = batch
        outputs = self.session.run(list(self.OUTPUTS), {self.INPUTS[0]: images, self.INPUTS[1]: shapes})
        return [*outputs, shapes]  # the sizes go along so that each answer can say its image's size

    def unstack(self, outputs: list[np.ndarray], n: int) -> list[tuple[np.ndarray, ...]]:
        # Boxes and scores have a row per image, but the selected indices are one list for the whole
        # batch, tagged with the image's position in it: split them by that tag.
        boxes, scores, selected, shapes = outputs
        selected = np.asarray(selected).reshape(-1, 3)
        selected = selected[(selected >= 0).all(axis=1)]  # some exports pad the list with -1 rows
        return [(boxes[i], scores[i], selected[selected[:, 0] == i, 1:], shapes[i]) for i in range(n)]

    def postprocess(self, row: tuple[np.ndarray, ...], task: dict) -> dict:
        boxes, scores, selected, shape = row
        threshold = self.threshold(task)
        kept = [(int(cls), float(scores[cls, box]), boxes[box]) for cls, box in selected
                if float(scores[cls, box]) >= threshold]
        kept.sort(key=lambda k: -round(k[1], 6))  # best first, as the answer rounds them
        if task.get("protocol") == "v2":
            return {"boxes": np.array([box for _, _, box in kept], np.float32).reshape(-1, 4),
                    "scores": np.array([score for _, score, _ in kept], np.float32),
                    "classes": [cls for cls, _, _ in kept], "labels": [self.labels[cls] for cls, _, _ in kept]}
        detections = [{"class": cls, "label": self.labels[cls], "score": round(score, 6),
                       "box": [round(float(v), 2) for v in box]} for cls, score, box in kept]
        return {"detections": detections, "image_size": [int(shape[0]), int(shape[1])]}

    def threshold(self, task: dict) -> float:
        """The lowest score an answer lists: the request's ``score_threshold``, else the handle's."""
        return request_option(task, "score_threshold", self.score_threshold, 0, 1)


def letterbox(image: Image.Image, size: int, full_size: tuple[int, int] | None = None) -> Image.Image:
    """``image`` scaled to fit a ``size`` square without changing its aspect ratio, centred on grey.

    ``full_size`` is the picture's (width, height) at full scale, where ``image`` was decoded at a
    reduced one: the letterbox keeps the full picture's geometry, so the model's boxes, mapped back
    with that size, fall where the full decoding's would."""
    full_width, full_height = full_size or image.size
    scale = min(size / full_width, size / full_height)
    width, height = max(1, int(full_width * scale)), max(1, int(full_height * scale))
    canvas = Image.new("RGB", (size, size), GREY)
    canvas.paste(image.resize((width, height), Image.BICUBIC), ((size - width) // 2, (size - height) // 2))
    return canvas
