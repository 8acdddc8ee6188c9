"""Offline stand-ins for the example models: the zoo files' inputs and outputs, with random weights.

From the shell::

    easyserve models demo yolov3        # models/yolov3-10.onnx: random weights, same inputs and outputs

A stand-in answers in the right shapes but its answers mean nothing: it lets the example configs run
on a machine that cannot download. Its weights come from a fixed seed, so every machine builds the
same file, and its metadata entry ``STANDIN_KEY`` says it is a stand-in.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import numpy as np

from .models import _zoo

__all__ = ["STANDIN_KEY", "build_standin", "write_standin", "standin_of"]

STANDIN_KEY = "easyserve.standin"  # metadata entry that marks a stand-in, valued with its zoo name


def build_standin(name: str):
    """An ``onnx.ModelProto`` with the zoo model's input and output names, shapes and dtypes, and random
    weights drawn from a fixed seed (so every machine builds the same file)."""
    spec = _zoo(name)
    model = {"resnet18": _resnet18_standin, "yolov3": _yolov3_standin}[spec.name]()
    model.doc_string = (f"Offline stand-in for {spec.filename} with random weights: same inputs and outputs, "
                        f"meaningless answers. Get the real model with `easyserve models fetch {name}`.")
    entry = model.metadata_props.add()
    entry.key, entry.value = STANDIN_KEY, name
    return model


def write_standin(name: str, dest_dir: str | os.PathLike = "models", force: bool = False) -> Path:
    """Build the stand-in for ``name`` and save it where :func:`easyserve.models.fetch` puts the real file.

    Raises ``FileExistsError`` rather than replace a file that is not a stand-in, unless ``force``.
    """
    import onnx

    dest = Path(dest_dir) / _zoo(name).filename
    if dest.exists() and not force and not standin_of(dest):
        raise FileExistsError(f"{dest} exists and is not a stand-in (the downloaded model?); "
                              "pass --force to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    # a temporary file of its own: two writers at once (two notebooks, two `models demo`) each put a whole
    # file in place, where with one shared name one moved the other's half-written file, then failed
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # made with the umask's mode
    try:
        onnx.save(build_standin(name), tmp)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def standin_of(model: str | os.PathLike) -> str | None:
    """The zoo name if the ONNX file at ``model`` is a stand-in built here, else ``None``."""
    import onnx

    if os.path.getsize(model) > 16 * 2**20:  # stand-ins are small: spare reading a real model whole
        return None
    try:
        proto = onnx.load(os.fspath(model), load_external_data=False)
    except Exception:  # not ONNX at all, so not ours
        return None
    return next((p.value for p in proto.metadata_props if p.key == STANDIN_KEY), None)


def _model(nodes: list, inputs: list, outputs: list, weights: dict[str, np.ndarray], name: str):
    from onnx import helper, numpy_helper

    initializers = [numpy_helper.from_array(np.asarray(v), k) for k, v in weights.items()]
    graph = helper.make_graph(nodes, name, inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="easyserve")
    model.ir_version = 8  # readable by older ONNX Runtime releases too
    return model


def _resnet18_standin():
    """data [N,3,224,224] -> resnetv15_dense0_fwd [N,1000] logits: a 7x7/2 convolution (no padding, so a
    uniform image gives a uniform feature map), ReLU, global average pooling, a dense layer."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(18)
    f32 = np.float32
    weights = {
        "conv0_weight": (rng.standard_normal((32, 3, 7, 7)) / np.sqrt(3 * 49)).astype(f32),
        "conv0_bias": (0.1 * rng.standard_normal(32)).astype(f32),
        "dense0_weight": rng.standard_normal((1000, 32)).astype(f32),
        "dense0_bias": (0.1 * rng.standard_normal(1000)).astype(f32),
    }
    nodes = [
        helper.make_node("Conv", ["data", "conv0_weight", "conv0_bias"], ["conv0"],
                         kernel_shape=[7, 7], strides=[2, 2]),
        helper.make_node("Relu", ["conv0"], ["relu0"]),
        helper.make_node("GlobalAveragePool", ["relu0"], ["pool0"]),
        helper.make_node("Flatten", ["pool0"], ["flat0"]),
        helper.make_node("Gemm", ["flat0", "dense0_weight", "dense0_bias"], ["resnetv15_dense0_fwd"], transB=1),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("resnetv15_dense0_fwd", TensorProto.FLOAT, ["N", 1000])],
        weights, "resnet18_standin",
    )


def _yolov3_standin():
    """input_1 [N,3,416,416] and image_shape [N,2] -> boxes [N,B,4], scores [N,80,B] and NonMaxSuppression's
    selected (batch, class, box) [K,3] int32, as yolov3-10 names them.

    A 13x13 grid with 3 anchors per cell (B = 507) predicts box offsets and class scores from pooled
    pixels. Boxes are turned from the letterboxed 416x416 frame back into the original image's pixels
    ([y1, x1, y2, x2], clipped to the image) using ``image_shape``, as the real model does.
    """
    from onnx import TensorProto, helper

    side, grid, anchors, classes = 416, 13, 3, 80
    boxes_n = anchors * grid * grid
    rng = np.random.default_rng(3)
    f32 = np.float32
    # box b = anchor * 169 + row * 13 + col, matching how Reshape flattens the conv channels below
    anchor, row, col = np.unravel_index(np.arange(boxes_n), (anchors, grid, grid))
    anchor_hw = np.array([[0.10, 0.08], [0.22, 0.28], [0.45, 0.40]])  # (height, width) / 416
    zeros = np.zeros(boxes_n)
    weights = {
        "conv0_weight": rng.standard_normal((16, 3, 1, 1)).astype(f32),
        "conv0_bias": (0.5 * rng.standard_normal(16)).astype(f32),
        "box_weight": (0.5 * rng.standard_normal((4 * anchors, 16, 1, 1))).astype(f32),
        "box_bias": (0.5 * rng.standard_normal(4 * anchors)).astype(f32),
        "cls_weight": (0.8 * rng.standard_normal((classes * anchors, 16, 1, 1))).astype(f32),
        "cls_bias": (rng.normal(-9.0, 1.5, classes * anchors)).astype(f32),
        # sigmoid outputs (ty, tx, th, tw) -> (cy, cx, h, w) in the 416 frame, as fractions of 416
        "cell_scale": np.stack([zeros + 1 / grid, zeros + 1 / grid, 2 * anchor_hw[anchor, 0],
                                2 * anchor_hw[anchor, 1]])[None].astype(f32),
        "cell_shift": np.stack([row / grid, col / grid, zeros, zeros])[None].astype(f32),
        # (cy, cx, h, w) @ corners = (y1, x1, y2, x2)
        "corners": np.array([[1, 0, 1, 0], [0, 1, 0, 1], [-0.5, 0, 0.5, 0], [0, -0.5, 0, 0.5]], f32),
        "centre_only": np.array([1, 1, 0, 0], f32),  # the letterbox margin moves centres, not sizes
        # fixed per-(class, box) score offsets: cells with the same pixels still score differently
        "cls_offset": rng.standard_normal((1, classes, boxes_n)).astype(f32),
        "side": np.array([side], f32),
        "twice_side": np.array([2 * side], f32),
        "zero": np.array([0], f32),
        "rows_by_4": np.array([0, 1, 4], np.int64),
        "box_shape": np.array([0, 4, boxes_n], np.int64),
        "score_shape": np.array([0, classes, boxes_n], np.int64),
        "max_per_class": np.array([2], np.int64),
        "iou_threshold": np.array([0.45], f32),
        "score_threshold": np.array([0.2], f32),
    }
    node = helper.make_node
    nodes = [
        node("AveragePool", ["input_1"], ["pooled"], kernel_shape=[32, 32], strides=[32, 32]),
        node("Conv", ["pooled", "conv0_weight", "conv0_bias"], ["conv0"]),
        node("Relu", ["conv0"], ["hidden"]),
        # geometry in the letterboxed frame
        node("Conv", ["hidden", "box_weight", "box_bias"], ["box_raw"]),
        node("Reshape", ["box_raw", "box_shape"], ["box_flat"]),
        node("Sigmoid", ["box_flat"], ["box_t"]),
        node("Mul", ["box_t", "cell_scale"], ["box_scaled"]),
        node("Add", ["box_scaled", "cell_shift"], ["box_cxhw"]),
        node("Transpose", ["box_cxhw"], ["box_frame"], perm=[0, 2, 1]),
        # to the original image's pixels: scale = min(416 / h, 416 / w); the image filled
        # round(shape * scale) of the frame, centred
        node("Div", ["side", "image_shape"], ["ratio"]),
        node("ReduceMin", ["ratio"], ["scale"], axes=[1], keepdims=1),
        node("Mul", ["image_shape", "scale"], ["fitted_raw"]),
        node("Round", ["fitted_raw"], ["fitted"]),
        node("Sub", ["side", "fitted"], ["margin"]),
        node("Div", ["margin", "twice_side"], ["offset"]),
        node("Div", ["side", "fitted"], ["stretch"]),
        node("Mul", ["stretch", "image_shape"], ["to_pixels"]),
        node("Concat", ["offset", "offset"], ["offset2"], axis=1),
        node("Reshape", ["offset2", "rows_by_4"], ["offset_all"]),
        node("Mul", ["offset_all", "centre_only"], ["offset4"]),
        node("Concat", ["to_pixels", "to_pixels"], ["to_pixels2"], axis=1),
        node("Reshape", ["to_pixels2", "rows_by_4"], ["to_pixels4"]),
        node("Concat", ["image_shape", "image_shape"], ["limit2"], axis=1),
        node("Reshape", ["limit2", "rows_by_4"], ["limit4"]),
        node("Sub", ["box_frame", "offset4"], ["box_shifted"]),
        node("Mul", ["box_shifted", "to_pixels4"], ["box_pixels"]),
        # centres in the grey margin move to the image's edge, so no box ends up empty
        node("Max", ["box_pixels", "zero"], ["box_low"]),
        node("Min", ["box_low", "limit4"], ["box_inside"]),
        node("MatMul", ["box_inside", "corners"], ["box_corners"]),
        node("Max", ["box_corners", "zero"], ["corners_low"]),
        node("Min", ["corners_low", "limit4"], ["yolonms_layer_1/ExpandDims_1:0"]),
        # class scores
        node("Conv", ["hidden", "cls_weight", "cls_bias"], ["cls_raw"]),
        node("Reshape", ["cls_raw", "score_shape"], ["cls_flat"]),
        node("Add", ["cls_flat", "cls_offset"], ["cls_logits"]),
        node("Sigmoid", ["cls_logits"], ["yolonms_layer_1/ExpandDims_3:0"]),
        node("NonMaxSuppression", ["yolonms_layer_1/ExpandDims_1:0", "yolonms_layer_1/ExpandDims_3:0",
                                   "max_per_class", "iou_threshold", "score_threshold"], ["selected"]),
        node("Cast", ["selected"], ["yolonms_layer_1/concat_2:0"], to=TensorProto.INT32),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["N", 3, side, side]),
         helper.make_tensor_value_info("image_shape", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info(name, dtype, shape) for name, dtype, shape in (
            ("yolonms_layer_1/ExpandDims_1:0", TensorProto.FLOAT, ["N", "num_boxes", 4]),
            ("yolonms_layer_1/ExpandDims_3:0", TensorProto.FLOAT, ["N", classes, "num_boxes"]),
            ("yolonms_layer_1/concat_2:0", TensorProto.INT32, ["num_selected", 3]),
        )],
        weights, "yolov3_standin",
    )
