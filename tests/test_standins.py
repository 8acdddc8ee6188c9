"""easyserve.standins: the offline stand-ins have the zoo models' signatures, are deterministic, and run."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from typer.testing import CliRunner

from conftest import wait_until

from easyserve import Handle, standins
from easyserve.cli import app
from easyserve.models import ZOO

SIGNATURES = {  # the zoo models' inputs and outputs: (name, shape, element type)
    "resnet18": (
        [("data", ["N", 3, 224, 224], "tensor(float)")],
        [("resnetv15_dense0_fwd", ["N", 1000], "tensor(float)")],
    ),
    "yolov3": (
        [("input_1", ["N", 3, 416, 416], "tensor(float)"), ("image_shape", ["N", 2], "tensor(float)")],
        [("yolonms_layer_1/ExpandDims_1:0", ["N", "num_boxes", 4], "tensor(float)"),
         ("yolonms_layer_1/ExpandDims_3:0", ["N", 80, "num_boxes"], "tensor(float)"),
         ("yolonms_layer_1/concat_2:0", ["num_selected", 3], "tensor(int32)")],
    ),
}


def _signature(values) -> list[tuple[str, list, str]]:
    out = []
    for v in values:
        dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        out.append((v.name, dims, f"tensor({onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)})"))
    return [(n, s, t.replace("float32", "float")) for n, s, t in out]


def test_demo_command_writes_small_deterministic_standins_with_the_zoo_signatures(tmp_path):
    result = CliRunner().invoke(app, ["models", "demo", "all", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for name, (inputs, outputs) in SIGNATURES.items():
        path = tmp_path / ZOO[name].filename
        assert f"{name}: {path} (offline stand-in" in result.output
        assert path.stat().st_size < 1_000_000
        proto = onnx.load(path)
        onnx.checker.check_model(proto, full_check=True)
        assert (_signature(proto.graph.input), _signature(proto.graph.output)) == (inputs, outputs)
        assert standins.standin_of(path) == name
        assert path.read_bytes() == standins.build_standin(name).SerializeToString()  # same weights every time
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [(i.name, i.type) for i in session.get_inputs()] == [(n, t) for n, _, t in inputs]


def test_yolov3_standin_runs_nonmaxsuppression_per_image(tmp_path):
    session = ort.InferenceSession(standins.build_standin("yolov3").SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).random((2, 3, 416, 416), dtype=np.float32)
    shapes = np.array([[480, 640], [200, 100]], np.float32)
    boxes, scores, selected = session.run(None, {"input_1": images, "image_shape": shapes})
    assert boxes.shape == (2, 507, 4) and scores.shape == (2, 80, 507) and selected.dtype == np.int32
    assert set(selected[:, 0]) == {0, 1}
    assert (scores[selected[:, 0], selected[:, 1], selected[:, 2]] > 0.2).all()  # its score threshold
    for i, (height, width) in enumerate(shapes):
        y1, x1, y2, x2 = boxes[i].T
        assert (0 <= y1).all() and (y1 <= y2).all() and (y2 <= height).all()
        assert (0 <= x1).all() and (x1 <= x2).all() and (x2 <= width).all()


def test_demo_does_not_replace_a_real_model_unless_forced(tmp_path):
    real = tmp_path / ZOO["resnet18"].filename
    real.write_bytes(b"a downloaded model")
    refused = CliRunner().invoke(app, ["models", "demo", "resnet18", "--dir", str(tmp_path)])
    assert refused.exit_code == 1
    assert "is not a stand-in" in refused.output and "--force" in refused.output
    assert real.read_bytes() == b"a downloaded model"
    forced = CliRunner().invoke(app, ["models", "demo", "resnet18", "--dir", str(tmp_path), "--force"])
    assert forced.exit_code == 0 and standins.standin_of(real) == "resnet18"


def test_demo_into_a_folder_it_cannot_make_says_so_in_one_line(tmp_path):
    """A file where the folder goes was taken for a model that is not a stand-in ("File exists"), and a
    folder that cannot be made or written (read-only, under a file) was a traceback."""
    (tmp_path / "afile").write_text("")
    for folder, said in ((tmp_path / "afile", "it is a file, not a folder"),
                         (tmp_path / "afile" / "sub", "Not a directory")):
        result = CliRunner().invoke(app, ["models", "demo", "resnet18", "--dir", str(folder)])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
        assert result.output.strip() == f"cannot write resnet18 into {folder}: {said}", result.output


class OwnHandle(Handle):
    """A user's own handle on a stand-in file, through device.onnx_session as the README shows."""

    def setup(self, device):
        self.session = device.onnx_session(self.args["model"])

    def forward(self, batch):
        return [{"inputs": len(self.session.get_inputs())} for _ in batch]


def test_any_handle_on_a_standin_is_told_so_once_a_device(tmp_path, serve):
    """Only the example handles said that a model had random weights: a user's own handle, or OnnxModel,
    on `easyserve models demo`'s file answered as a model would, and nothing said it meant nothing."""
    path = standins.write_standin("resnet18", tmp_path)
    for handle in (OwnHandle, "OnnxModel"):
        with serve(handle, HandleArgs={"model": str(path)}, ProcessPerGPU=2) as server:
            wait_until(lambda: any("offline stand-in" in line.text for line in server.logs(tail=None)),
                       what="the warning")
            said = [(name, line.text) for name in ("cpu/0", "cpu/1") for line in server.logs(name, tail=None)
                    if "offline stand-in" in line.text]
        assert len(said) == 1 and said[0][0] == "cpu/0", said
        assert f"{path} is an offline stand-in with random weights" in said[0][1], said
        assert "`easyserve models fetch resnet18` gets the real model" in said[0][1]
