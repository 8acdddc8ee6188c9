"""Open Inference requests built to hurt: each is a 400 (never a 500), costs the server little, and
leaves the workers running."""

from __future__ import annotations

import json

import pytest
from test_openinference import infer, x_input

from easyserve import Server


@pytest.fixture(scope="module")
def echo():
    with Server(handle="handles_v2:Echo", GPUs="cpu", Port=0, ModelName="affine") as server:
        yield server


def still_serving(url: str) -> None:
    status, _, (answer, _) = infer(url, {"inputs": [x_input([1.0, 2.0])], "outputs": [{"name": "x"}]})
    assert (status, answer["outputs"][0]["data"]) == (200, [1.0, 2.0]), answer


def test_a_header_length_of_thousands_of_digits_is_a_400(echo):
    status, _, (answer, _) = infer(echo.url, {"inputs": [x_input([1.0])]}, length="9" * 5000)
    assert status == 400 and "Inference-Header-Content-Length is 9999" in answer["error"], answer
    doc = {"inputs": [x_input([1.0])], "outputs": [{"name": "x"}]}
    status, _, (answer, _) = infer(echo.url, doc, length="0" * 5000 + str(len(json.dumps(doc))))
    assert (status, answer["outputs"][0]["data"]) == (200, [1.0]), answer  # leading zeros: still a number
    still_serving(echo.url)
