"""The documentation as a reader meets it: the README's examples run as written (the code in its
blocks, not a copy of it), and the notebooks as committed."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import pytest
from conftest import post_json
from PIL import Image

from easyserve import Server
from easyserve.standins import write_standin

ROOT = Path(__file__).parent.parent


def block(first_line: str) -> str:
    """The README's fenced block that begins with ``first_line`` (a file's name, as a comment)."""
    found = re.findall(r"```\w*\n(" + re.escape(first_line) + r"\n.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(found) == 1, f"README.md has {len(found)} blocks beginning {first_line!r}"
    return found[0]


def test_a_handle_of_your_own_runs_as_the_readme_writes_it(tmp_path, monkeypatch):
    # The README's handle called a decode() it never wrote: copied as it was, every request was a 500.
    (tmp_path / "handles").mkdir()
    (tmp_path / "configs").mkdir()
    (tmp_path / "handles" / "classifier.py").write_text(block("# handles/classifier.py"))
    (tmp_path / "configs" / "classifier.yaml").write_text(block("# configs/classifier.yaml"))
    write_standin("resnet18", tmp_path / "models")  # what `easyserve models demo resnet18` writes
    monkeypatch.chdir(tmp_path)
    picture = io.BytesIO()
    Image.new("RGB", (500, 375), (200, 120, 40)).save(picture, "JPEG")
    # the file as written, but for the machine: no GPU here, and one worker is enough
    with Server.from_yaml("configs/classifier.yaml", GPUs="cpu", ProcessPerGPU=1, Port=0).start(timeout=60) as server:
        status, answer = post_json(server.url + "/predict", {"img": base64.b64encode(picture.getvalue()).decode()})
    assert status == 200 and set(answer) == {"class"} and 0 <= answer["class"] < 1000, answer


def test_the_pytorch_handle_runs_where_torch_is_and_is_python_everywhere(tmp_path, monkeypatch):
    """The README's PyTorch handle: served where torch and torchvision are installed (not on CI: they
    are gigabytes), compiled everywhere."""
    code = block("# handles/torch_classifier.py")
    compile(code, "torch_classifier.py", "exec")
    pytest.importorskip("torchvision")
    import torch
    import torchvision

    for folder in ("handles", "models"):
        (tmp_path / folder).mkdir()
    (tmp_path / "handles" / "classifier.py").write_text(block("# handles/classifier.py"))
    (tmp_path / "handles" / "torch_classifier.py").write_text(code)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "models" / "resnet18.pt")
    monkeypatch.chdir(tmp_path)
    picture = io.BytesIO()
    Image.new("RGB", (300, 200), (10, 120, 200)).save(picture, "JPEG")
    with Server(handle="handles/torch_classifier.py:TorchClassifier", GPUs="cpu", Port=0).start(timeout=120) as server:
        status, answer = post_json(server.url + "/predict", {"img": base64.b64encode(picture.getvalue()).decode()})
    assert status == 200 and set(answer) == {"class"} and 0 <= answer["class"] < 1000, answer


def test_the_committed_notebooks_render_their_dashboards_not_empty_saved_widgets():
    # A notebook run without --ExecutePreprocessor.store_widget_state=False saves its widgets' state,
    # and a page that renders it (GitHub, nbconvert) then shows an empty widget where the dashboard's
    # card would be: the saved state is looked for and not found
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        notebook = json.loads(path.read_text())
        assert "widgets" not in notebook["metadata"], f"{path.name}: run it again with store_widget_state=False"
        for cell in notebook["cells"]:
            for output in cell.get("outputs", []):
                assert "application/vnd.jupyter.widget-view+json" not in output.get("data", {}) or \
                    "text/html" in output["data"], f"{path.name}: a widget saved without the card it shows"


def test_every_field_of_a_bench_run_is_in_the_benchmark_docs_table():
    import dataclasses

    from easyserve.bench import Run
    from easyserve.wire import STAGES

    table = "\n".join(line for line in (ROOT / "docs" / "benchmark.md").read_text().splitlines()
                      if line.startswith("| `"))
    named = set(re.findall(r"`([a-z0-9_]+)`", table))
    kept_elsewhere = {"settings", "backlog"}  # a sweep's columns first; backlog_halfway and backlog_end
    missing = [f.name for f in dataclasses.fields(Run) if f.name not in named | kept_elsewhere]
    missing += [f"server_{stage}_ms" for stage in STAGES if f"server_{stage}_ms" not in named]  # the CSV's
    assert not missing, f"docs/benchmark.md's table of fields lacks {missing}"
