"""Inputs for the ResNet-18 benchmarks: a model of the real architecture and two test pictures.

The offline stand-in (``easyserve models demo resnet18``) is one convolution and a dense layer, far
cheaper than the real network, so it cannot tell how a server's costs compare with the model's. The
model built here has ResNet-18's layers and sizes, with random weights drawn from a fixed seed: its
answers mean nothing, but every layer does the work the real one does::

    python benchmarks/resnet18_inputs.py            # writes benchmarks/out/resnet18-arch.onnx and two JPEGs
    python benchmarks/resnet18_inputs.py --check    # and runs the model once in ONNX Runtime

The network (ResNet-18 of He et al. 2016): a 7x7/2 convolution with 64
channels, batch norm, ReLU, a 3x3/2 max pool; four stages of two basic blocks (two 3x3 convolutions
with batch norm) with 64, 128, 256 and 512 channels, the first block of stages 2-4 halving the size
with a stride-2 convolution and a 1x1/2 convolution on its shortcut; global average pooling; a dense
layer to 1000 classes. Input ``data`` [N,3,224,224] float32, output ``resnetv15_dense0_fwd`` [N,1000]
logits, the names the example handle uses. 11,689,512 parameters, as the real network has (batch-norm
running statistics not counted).

Weights are He-initialised, so each layer keeps its input's scale; the last batch norm of each
residual branch has a scale of 0.5, so the sum of a block does not double the scale eight times
over. Activations stay finite, and the logits of the pictures below lie within about -11..10.

The pictures are drawn, not photographed: a sky gradient, hills, a sun and a few shapes with texture
and a little noise, so a JPEG encoder meets what it meets in photographs (smooth areas, edges, fine
detail). ``picture-500x375.jpg`` is about 58 kB, the size of the ImageNet photo the original
easy-serve was shown with; ``picture-1920x1200.jpg`` is the same scene at a camera-like size.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "out"
MODEL = OUT / "resnet18-arch.onnx"
PICTURES = {"500x375": OUT / "picture-500x375.jpg", "1920x1200": OUT / "picture-1920x1200.jpg"}
INPUT, OUTPUT = "data", "resnetv15_dense0_fwd"
OPSET = 13  # what ONNX Runtime 1.10 and later run
STAGES = (64, 128, 256, 512)


class _Graph:
    """Nodes and weights of the network as it is built, layer by layer."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list = []
        self.weights: dict[str, np.ndarray] = {}
        self.count = 0

    def name(self, kind: str) -> str:
        self.count += 1
        return f"resnetv15_{kind}{self.count}"

    def conv_bn(self, x: str, cin: int, cout: int, kernel: int, stride: int, relu: bool, gamma: float = 1.0) -> str:
        from onnx import helper

        conv = self.name("conv")
        fan_in = cin * kernel * kernel
        self.weights[f"{conv}_weight"] = (self.rng.standard_normal((cout, cin, kernel, kernel))
                                          * np.sqrt(2.0 / fan_in)).astype(np.float32)
        pad = kernel // 2
        self.nodes.append(helper.make_node("Conv", [x, f"{conv}_weight"], [f"{conv}_fwd"], kernel_shape=[kernel] * 2,
                                           strides=[stride] * 2, pads=[pad] * 4))
        bn = self.name("batchnorm")
        # running statistics near what a trained network has: the conv output is close to centred
        self.weights[f"{bn}_gamma"] = np.full(cout, gamma, np.float32)
        self.weights[f"{bn}_beta"] = (0.05 * self.rng.standard_normal(cout)).astype(np.float32)
        self.weights[f"{bn}_mean"] = (0.05 * self.rng.standard_normal(cout)).astype(np.float32)
        self.weights[f"{bn}_var"] = self.rng.uniform(0.8, 1.2, cout).astype(np.float32)
        self.nodes.append(helper.make_node("BatchNormalization", [f"{conv}_fwd"] + [f"{bn}_{p}" for p in
                                           ("gamma", "beta", "mean", "var")], [f"{bn}_fwd"], epsilon=1e-5))
        if not relu:
            return f"{bn}_fwd"
        out = self.name("relu")
        self.nodes.append(helper.make_node("Relu", [f"{bn}_fwd"], [f"{out}_fwd"]))
        return f"{out}_fwd"

    def basic_block(self, x: str, cin: int, cout: int, stride: int) -> str:
        from onnx import helper

        branch = self.conv_bn(x, cin, cout, 3, stride, relu=True)
        branch = self.conv_bn(branch, cout, cout, 3, 1, relu=False, gamma=0.5)
        shortcut = x if stride == 1 and cin == cout else self.conv_bn(x, cin, cout, 1, stride, relu=False)
        total, out = self.name("add"), self.name("relu")
        self.nodes.append(helper.make_node("Add", [branch, shortcut], [f"{total}_fwd"]))
        self.nodes.append(helper.make_node("Relu", [f"{total}_fwd"], [f"{out}_fwd"]))
        return f"{out}_fwd"


def build_resnet18(seed: int = 18):
    """ResNet-18 as an ``onnx.ModelProto``, with He-initialised random weights from ``seed``."""
    from onnx import TensorProto, helper, numpy_helper

    g = _Graph(seed)
    x = g.conv_bn(INPUT, 3, 64, 7, 2, relu=True)
    g.nodes.append(helper.make_node("MaxPool", [x], ["resnetv15_pool0_fwd"], kernel_shape=[3, 3], strides=[2, 2],
                                    pads=[1, 1, 1, 1]))
    x, cin = "resnetv15_pool0_fwd", 64
    for stage, cout in enumerate(STAGES):
        for block in range(2):
            x = g.basic_block(x, cin, cout, 2 if stage and not block else 1)
            cin = cout
    g.nodes.append(helper.make_node("GlobalAveragePool", [x], ["resnetv15_pool1_fwd"]))
    g.nodes.append(helper.make_node("Flatten", ["resnetv15_pool1_fwd"], ["resnetv15_flatten0_fwd"]))
    g.weights["resnetv15_dense0_weight"] = (g.rng.standard_normal((1000, 512)) / np.sqrt(512)).astype(np.float32)
    g.weights["resnetv15_dense0_bias"] = np.zeros(1000, np.float32)
    g.nodes.append(helper.make_node("Gemm", ["resnetv15_flatten0_fwd", "resnetv15_dense0_weight",
                                             "resnetv15_dense0_bias"], [OUTPUT], transB=1))
    graph = helper.make_graph(
        g.nodes, "resnet18_architecture",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["N", 1000])],
        [numpy_helper.from_array(v, k) for k, v in g.weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="easyserve")
    model.ir_version = 8
    model.doc_string = "ResNet-18's architecture with random weights (a benchmark input: its answers mean nothing)"
    return model


def parameter_count(model) -> int:
    """Trainable parameters: convolution and dense weights, biases, batch-norm scales and shifts."""
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if not t.name.endswith(("_mean", "_var")))


def draw_scene(width: int, height: int, seed: int = 5) -> np.ndarray:
    """A landscape-like RGB picture, uint8 [height, width, 3], the same for the same arguments."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = x / width, y / height
    sky = np.stack([90 + 100 * v, 140 + 80 * v, 230 - 40 * v], -1)
    ground = np.stack([60 + 40 * v, 110 + 30 * np.sin(7 * u), 50 + 20 * v], -1)
    horizon = 0.55 + 0.08 * np.sin(5 * u + 1) + 0.04 * np.sin(17 * u)
    pixels = np.where((v > horizon)[..., None], ground, sky)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    s = width / 500  # shapes scale with the picture
    draw.ellipse([380 * s, 30 * s, 440 * s, 90 * s], fill=(250, 230, 150))
    for _ in range(12):  # trees, stones, a few bright objects
        cx, cy, r = rng.uniform(0, width), rng.uniform(0.6, 0.95) * height, rng.uniform(8, 40) * s
        colour = tuple(int(c) for c in rng.integers(20, 230, 3))
        if rng.random() < 0.5:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r * 0.7], fill=colour)
        else:
            draw.polygon([(cx, cy - 2 * r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(1.2 * s))
    texture = rng.normal(0, 6, (height, width, 1)) + rng.normal(0, 3, (height, width, 3))
    grass = (v > horizon)[..., None] * 10 * np.sin(x * 0.9 / s + 3 * np.sin(y * 0.35 / s))[..., None]
    return np.clip(np.asarray(image, np.float32) + texture + grass, 0, 255).astype(np.uint8)


def write_inputs(quality: int = 89) -> dict[str, Path]:
    """Write the model and the pictures under ``benchmarks/out/`` (if not there already); their paths."""
    import onnx
    from PIL import Image

    OUT.mkdir(exist_ok=True)
    if not MODEL.exists():
        tmp = MODEL.with_name(MODEL.name + ".tmp")
        onnx.save(build_resnet18(), tmp)
        os.replace(tmp, MODEL)
    for size, path in PICTURES.items():
        if not path.exists():
            width, height = (int(n) for n in size.split("x"))
            Image.fromarray(draw_scene(width, height)).save(path, quality=quality)
    return {"model": MODEL, **PICTURES}


def check(model_path: Path, picture: Path) -> str:
    """Run the model on a picture, preprocessed as the example handle does; one line saying what came out."""
    import onnx
    import onnxruntime as ort
    from PIL import Image

    pixels = np.asarray(Image.open(picture).convert("RGB").resize((224, 224), Image.BILINEAR), np.float32)
    mean, std = np.array([123.675, 116.28, 103.53], np.float32), np.array([58.395, 57.12, 57.375], np.float32)
    batch = np.stack([((pixels - mean) / std).transpose(2, 0, 1)] * 2)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    logits = session.run([OUTPUT], {INPUT: batch})[0]
    if logits.shape != (2, 1000) or not np.isfinite(logits).all():
        raise SystemExit(f"unexpected output: {logits.shape}, finite: {np.isfinite(logits).all()}")
    params = parameter_count(onnx.load(str(model_path)))
    return (f"{model_path.name}: {params:,} parameters, {model_path.stat().st_size / 2**20:.1f} MiB; "
            f"output {list(logits.shape)}, logits {logits.min():.2f}..{logits.max():.2f}, "
            f"class {int(logits[0].argmax())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="run the model once and print what it answers")
    args = parser.parse_args()
    paths = write_inputs()
    for what, path in paths.items():
        print(f"{what}: {path} ({path.stat().st_size / 1000:,.1f} kB)")
    if args.check:
        print(check(paths["model"], paths["500x375"]))


if __name__ == "__main__":
    main()
