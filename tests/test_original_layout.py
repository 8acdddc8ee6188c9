"""A project laid out like the original easy-serve runs unchanged: `configs/x.yaml` names a class that
lives in `src/handle.py`, and `easyserve run configs/x.yaml` is typed from the project's root."""

from __future__ import annotations

import base64
import io
import signal
import textwrap

import numpy as np
from conftest import post_json
from PIL import Image
from test_cli import easyserve, wait_for_url

from easyserve.standins import write_standin

# Written the way the original's handles were (a registry decorator, an abstract base, the GPU id as a
# string, the model found from the file's own location, the request dict passed through every step),
# decoding with Pillow where the original used OpenCV.
ORIGINAL_HANDLE = '''
from abc import ABCMeta, abstractmethod
import base64, io, os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

project_path = Path(__file__).parent.parent
classes = {}


def register(cls):
    classes[cls.__name__] = cls
    return cls


class BaseHandle(metaclass=ABCMeta):
    @abstractmethod
    def __call__(self, data):
        raise NotImplementedError


@register
class ImagenetResnet18Handle(BaseHandle):
    def __init__(self, gpu):
        path = os.path.join(str(project_path), "models", "resnet18-v1-7.onnx")
        providers = [("CUDAExecutionProvider", {"device_id": int(gpu)}), "CPUExecutionProvider"]
        self.session = ort.InferenceSession(path, providers=providers)

    def preprocess(self, data):
        raw = base64.b64decode(data["task_info"]["img"])
        img = Image.open(io.BytesIO(raw)).convert("RGB").resize((224, 224))
        img = (np.asarray(img, dtype=np.float32) - 127.5) / 64.0
        data["task_info"]["img"] = np.transpose(img, (2, 0, 1))[None]
        return data

    def forward(self, data):
        data["task_info"]["result"] = self.session.run(None, {"data": data["task_info"]["img"]})
        del data["task_info"]["img"]
        return data

    def postprocess(self, data):
        data["task_info"]["result"] = np.argmax(data["task_info"]["result"][0], axis=1).tolist()
        return data

    def __call__(self, data):
        return self.postprocess(self.forward(self.preprocess(data)))
'''


def test_the_original_projects_config_and_handle_run_from_its_root(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "imagenet_resnet18.yaml").write_text(
        'GPUs: "0"\nProcessPerGPU: 2\nHandle: ImagenetResnet18Handle\n'
    )
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "handle.py").write_text(textwrap.dedent(ORIGINAL_HANDLE))
    write_standin("resnet18", tmp_path / "models")
    jpeg = io.BytesIO()
    Image.fromarray(np.arange(64 * 48 * 3, dtype=np.uint8).reshape(48, 64, 3)).save(jpeg, "JPEG")
    task = {"img": base64.b64encode(jpeg.getvalue()).decode()}

    lines: list[str] = []
    # The config has no Port key: the original's default port, overridden here only to run beside other tests.
    with easyserve("run", "configs/imagenet_resnet18.yaml", "--port", "0", cwd=tmp_path) as proc:
        try:
            url = wait_for_url(proc, lines)
            # The original's sample client: JSON {"img": base64 JPEG}, and the handle's dict comes back.
            status, body = post_json(url + "/predict", task)
            assert status == 200, body
            assert body["task_info"]["result"][0] in range(1000) and "task_id" in body
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            proc.kill()
    assert "src/handle.py:ImagenetResnet18Handle" in "".join(lines)
