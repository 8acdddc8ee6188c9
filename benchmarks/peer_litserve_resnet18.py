"""The ResNet-18 example served by LitServe, for a side-by-side run (install litserve in its own venv).

It does what ``handles/imagenet_resnet18.py`` does, written again here because LitServe's venv has no
easyserve: read ``{"img": "<base64>"}``, decode the picture with Pillow (EXIF orientation applied,
RGB), resize it to 224x224 (bilinear), normalise it with ImageNet's statistics, run the model with
ONNX Runtime on a batch, and answer the softmax's top 5 with their labels::

    /tmp/litserve-venv/bin/python benchmarks/peer_litserve_resnet18.py --model benchmarks/out/resnet18-arch.onnx \
        --port 9902 --workers 2 --max-batch-size 8 --batch-timeout 0.002

Each worker gets ``cores // workers`` ONNX Runtime threads, as an easyserve CPU worker does. LitServe
reads a request body as JSON (or a form), so there is no raw ``image/jpeg`` form here.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
from pathlib import Path

import litserve as ls
import numpy as np
from PIL import Image, ImageOps

LABELS = Path(__file__).resolve().parent.parent / "handles" / "imagenet_labels.txt"
MEAN = np.array([123.675, 116.28, 103.53], np.float32)
STD = np.array([58.395, 57.12, 57.375], np.float32)


class Resnet18(ls.LitAPI):
    def __init__(self, model: str, threads: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.threads = threads

    def setup(self, device):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(self.model, options, providers=["CPUExecutionProvider"])
        self.labels = LABELS.read_text(encoding="utf-8").splitlines()

    def decode_request(self, request):
        with Image.open(io.BytesIO(base64.b64decode(request["img"], validate=True))) as image:
            image.load()  # decoded as easyserve's example does (handles/vision.py): no copies
            ImageOps.exif_transpose(image, in_place=True)
            picture = image if image.mode == "RGB" else image.convert("RGB")
        pixels = np.asarray(picture.resize((224, 224), Image.BILINEAR), np.float32)
        return np.ascontiguousarray(((pixels - MEAN) / STD).transpose(2, 0, 1))

    def batch(self, inputs):
        return np.stack(inputs)

    def predict(self, batch):
        if batch.ndim == 3:  # no batching: one picture
            return self.session.run(["resnetv15_dense0_fwd"], {"data": batch[None]})[0][0]
        return self.session.run(["resnetv15_dense0_fwd"], {"data": batch})[0]

    def unbatch(self, output):
        return list(output)

    def encode_response(self, logits):
        shifted = np.exp(logits - logits.max())
        probabilities = shifted / shifted.sum()
        best = np.argsort(-probabilities, kind="stable")[:5]
        top = [{"class": int(i), "label": self.labels[i], "score": round(float(probabilities[i]), 6)} for i in best]
        return {**top[0], "top": top}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, default=9902)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=1)
    parser.add_argument("--batch-timeout", type=float, default=0.002, help="seconds a batch waits to fill")
    args = parser.parse_args()
    threads = max(1, len(os.sched_getaffinity(0)) // args.workers)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, str(threads))  # inherited by the worker processes LitServe starts
    batching = {"max_batch_size": args.max_batch_size, "batch_timeout": args.batch_timeout} \
        if args.max_batch_size > 1 else {}
    api = Resnet18(str(Path(args.model).resolve()), threads, **batching)
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=args.workers)
    # no access log: easyserve writes none either
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False, access_log=False)


if __name__ == "__main__":
    main()
