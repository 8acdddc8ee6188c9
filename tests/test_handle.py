"""The handle contract's plumbing, called directly: stack, unstack and run_batch, and payload_bytes."""

from __future__ import annotations

import base64
import collections
import logging
import json
import os
import re
import time

import numpy as np
import pytest

from conftest import caught, post_json

from easyserve import Handle, payload_bytes
from easyserve.errors import BadRequest, PayloadTooLarge
from easyserve import handle as handle_module


@pytest.fixture(autouse=True)
def no_batch_run_yet(monkeypatch):
    """How long this process's last batch took sets how long a failed one's parts are retried: each test
    starts as a fresh worker does."""
    from easyserve import pipeline

    monkeypatch.setattr(pipeline, "_last_run", 0.0)


class Square(Handle):
    def preprocess(self, task):
        value = task["task_info"]["n"]
        if value < 0:
            raise ValueError("n must be >= 0")
        return np.float32(value)

    def forward(self, batch):
        if (batch == 13).any():
            raise RuntimeError("unlucky batch")
        return batch**2

    def postprocess(self, output, task):
        if output == 49:
            raise KeyError("seven")
        return float(output)


def tasks(*values):
    return [{"task_id": str(i), "task_info": {"n": v}} for i, v in enumerate(values)]


def test_stack_shapes():
    h = Handle()
    a, b = np.zeros((2, 3), np.float32), np.ones((2, 3), np.float32)
    assert h.stack([a, b]).shape == (2, 2, 3)
    assert h.stack([1.0, 2.0]).tolist() == [1.0, 2.0]
    stacked = h.stack([{"image": a, "shape": np.array([4, 5])}, {"image": b, "shape": np.array([6, 7])}])
    assert stacked["image"].shape == (2, 2, 3) and stacked["shape"].tolist() == [[4, 5], [6, 7]]
    pair = h.stack([(a, np.array(1)), (b, np.array(2))])
    assert isinstance(pair, tuple) and pair[0].shape == (2, 2, 3) and pair[1].tolist() == [1, 2]
    # JSON objects, strings and arrays of different shapes stay one item per request
    assert h.stack([{"x": 1}, {"x": 2}]) == [{"x": 1}, {"x": 2}]
    assert h.stack(["a", "b"]) == ["a", "b"]
    assert len(h.stack([np.zeros(2), np.zeros(3)])) == 2


def test_unstack_shapes():
    h = Handle()
    assert [r.tolist() for r in h.unstack(np.arange(6).reshape(3, 2), 3)] == [[0, 1], [2, 3], [4, 5]]
    rows = h.unstack({"boxes": np.zeros((2, 4)), "scores": np.ones(2)}, 2)
    assert rows[1]["boxes"].shape == (4,) and rows[1]["scores"] == 1
    outputs = [np.zeros((2, 4)), np.ones((2, 80)), np.ones((2, 1))]  # ONNX Runtime's list of 3 outputs
    rows = h.unstack(outputs, 2)
    assert len(rows) == 2 and rows[0][0].shape == (4,) and rows[0][1].shape == (80,) and rows[0][2].shape == (1,)
    assert h.unstack(["a", "b"], 2) == ["a", "b"]
    with pytest.raises(ValueError, match="forward returned an array of shape \\(3,\\) for a batch of 2"):
        h.unstack(np.zeros(3), 2)
    # "a dict of 2" for a batch of 7 read as two rows; a detector's boxes are told how to go
    with pytest.raises(ValueError, match=r"forward returned a dict \('boxes': list of 7, 'scores': list of 7\) for "
                                         r"a batch of 7; .* A result whose size differs from request to request"):
        h.unstack({"boxes": [np.zeros((2, 4))] * 7, "scores": [np.zeros(2)] * 7}, 7)


def test_run_batch_isolates_each_kind_of_failure():
    assert Square().run_batch(tasks(2, -1, 7, 3)) == [
        (200, 4.0),
        (400, "preprocess failed: ValueError: n must be >= 0"),
        (500, "postprocess failed: KeyError: 'seven'"),
        (200, 9.0),
    ]
    # a batch forward fails is run a request at a time: only the request that fails alone fails
    assert Square().run_batch(tasks(13, 1, -5, 13, 2)) == [
        (500, "forward failed: RuntimeError: unlucky batch"),
        (200, 1.0),
        (400, "preprocess failed: ValueError: n must be >= 0"),
        (500, "forward failed: RuntimeError: unlucky batch"),
        (200, 4.0),
    ]


def test_a_batch_that_fails_whatever_it_holds_is_not_run_again_a_request_at_a_time(capsys):
    # Run again a request at a time, a batch of 16 whose forward fails for any input (a broken model)
    # cost 17 calls of forward: past TimeoutS for a slow model, and the worker killed as stuck
    class Broken(Square):
        calls = 0

        def forward(self, batch):
            Broken.calls += 1
            time.sleep(0.05)
            raise RuntimeError(f"model broken (batch of {len(batch)})")

    results = Broken().run_batch(tasks(*range(16)))
    assert [status for status, _ in results] == [500] * 16
    assert results[0][1].startswith("forward failed on a part of its batch (")  # not "this request failed"
    assert "not told apart in time), this one or another: RuntimeError: model broken (batch of " in results[0][1]
    # the batch, its halves (both fail, as two requests at fault would make them), then parts for as long again
    assert Broken.calls <= 7, Broken.calls
    assert capsys.readouterr().err.count("Traceback") == 1  # one a kind of exception, not one a call


def test_a_bad_request_raised_in_preprocess_or_postprocess_is_its_own_status_and_message(capsys):
    # an option the request gave, checked where it is used (a top_k past the classes): the request's 4xx
    # with the handle's words, where postprocess's was a 500 with a traceback in the log
    class Options(Square):
        def preprocess(self, task):
            if task["task_info"]["n"] == 5:
                raise PayloadTooLarge("5 is too large")
            return super().preprocess(task)

        def postprocess(self, output, task):
            if output == 9:
                raise BadRequest("top_k: got 9")
            return super().postprocess(output, task)

    assert Options().run_batch(tasks(2, 3, 5, 4)) == [
        (200, 4.0), (400, "top_k: got 9"), (413, "5 is too large"), (200, 16.0)]
    assert "Traceback" not in capsys.readouterr().err


def test_a_bad_request_raised_in_forward_is_a_400_for_the_request_that_raises_it_alone():
    # a handle (OnnxModel) may learn only in forward that a request's values are at fault: its batch is
    # split apart, and only the request that still raises alone gets the 4xx, the others their rows
    class Picky(Square):
        def forward(self, batch):
            if (batch == 13).any():
                raise BadRequest("13 is not a number this model takes")
            return batch**2

    assert Picky().run_batch(tasks(2, 13, 3, 4)) == [
        (200, 4.0), (400, "13 is not a number this model takes"), (200, 9.0), (200, 16.0)]

    # a model whose every call takes as long, whatever its batch (a GPU's): each halving takes as long as
    # the batch did, and with the time fixed at once again, 6 of 15 innocent requests failed with 13
    class SlowPicky(Picky):
        bad = (13,)

        def forward(self, batch):
            time.sleep(0.03)
            if np.isin(batch, self.bad).any():
                raise BadRequest(f"{int(batch[np.isin(batch, self.bad)][0])} is not a number this model takes")
            return batch**2

    values = range(8, 24)  # 13 among them (and not 7, whose postprocess fails)
    results = SlowPicky().run_batch(tasks(*values))
    assert results == [(400, "13 is not a number this model takes") if v == 13 else (200, float(v * v))
                       for v in values]

    # two requests at fault, one in each half: both halves fail, and a model taking as long whatever its batch
    # spent the time it was given on that halving alone: 13 of the 14 innocent requests failed
    class TwoPicky(SlowPicky):
        bad = (10, 19)

    results = TwoPicky().run_batch(tasks(*values))
    assert results == [(400, f"{v} is not a number this model takes") if v in TwoPicky.bad else (200, float(v * v))
                       for v in values]

    # out of time to tell the requests apart (a fault in every part: no halving comes nearer), a part
    # that still fails is the server's 500 for all of it: a 400 would tell the innocent ones they erred
    class SlowerPicky(SlowPicky):
        bad = (9, 13, 17, 21)

    results = SlowerPicky().run_batch(tasks(*values))
    refused = [(status, message) for status, message in results if status != 200]
    assert {status for status, _ in refused} == {500} and len(refused) > 4, results
    assert all(re.fullmatch(r"forward refused a part of its batch \(\d+ requests, not told apart in time\), this "
                            r"one or another: \d+ is not a number this model takes", m) for _, m in refused), refused
    assert [r for r in results if r[0] == 200] == [(200, float(v * v)) for v, r in zip(values, results) if r[0] == 200]


class OutOfMemory(Square):
    """Fails at once for a batch of more than 3 (as CUDA's out-of-memory error does, in milliseconds);
    runs a batch of 3 or fewer in ``delay`` seconds."""

    delay = 0.05

    def forward(self, batch):
        if len(batch) > 3:
            raise RuntimeError(f"CUDA out of memory (a batch of {len(batch)})")
        time.sleep(self.delay)
        return batch**2


def test_a_batch_that_fails_at_once_is_told_apart_in_as_long_as_a_batch_runs():
    """The time to tell a failed batch apart was twice its own run: a batch failing in a millisecond
    left its halves, which ran for 50 ms each, no time, and a half never tried got its parent's failure
    as its own: "forward failed: ... CUDA out of memory" for a request that was never run alone."""
    handle = OutOfMemory()
    handle.delay = 0.5  # a batch runs in 0.5 s (its parts below in 0.02 s: time to spare on a busy machine)
    assert handle.run_batch(tasks(1, 2)) == [(200, 1.0), (200, 4.0)]
    handle.delay = 0.02
    values = [2, 3, 4, 5, 6, 8, 9, 10]
    assert handle.run_batch(tasks(*values)) == [(200, float(v * v)) for v in values]


def test_a_part_the_time_ran_out_before_is_said_not_told_apart():
    """A half the time ran out before got its parent's failure as its own: an innocent request was told
    "forward failed: ..." in the words of the one at fault, as if it had been run alone and failed."""

    class SlowAlone(Square):
        def forward(self, batch):
            if (batch == 13).any():
                time.sleep(0.3 if len(batch) == 1 else 0)  # alone, it fails slowly: the time runs out
                raise RuntimeError("13 is cursed")
            return batch**2

    # the halves [13, 2] and [13, 3] both fail (at once), which is given its time back; then the first 13
    # alone fails slowly, and the time runs out before 2 is tried alone, and before [13, 3] is halved
    apart = (500, "forward failed on a part of its batch (2 requests, not told apart in time), this one or another: "
                  "RuntimeError: 13 is cursed")
    assert SlowAlone().run_batch(tasks(13, 2, 13, 3)) == [
        (500, "forward failed: RuntimeError: 13 is cursed"), apart, apart, apart]


def test_batches_that_fail_whole_for_inputs_of_several_shapes_say_so_once(capsys, monkeypatch):
    """A text handle that did not pad its token ids: every batch of mixed lengths failed whole and ran a
    length at a time, every answer a 200, batching gone, /stats showing the sizes batches were formed at."""
    from easyserve import pipeline

    monkeypatch.setattr(pipeline, "_unstackable_told", False)

    class Unpadded(Handle):
        def preprocess(self, task):
            return np.arange(task["task_info"]["n"], dtype=np.int64)

        def forward(self, batch):
            return np.asarray(batch).sum(axis=1)  # a list of arrays of several lengths: it raises

    for _ in range(2):
        assert Unpadded().run_batch(tasks(2, 3, 2, 4)) == [(200, 1), (200, 3), (200, 1), (200, 6)]
    said = capsys.readouterr().err
    assert said.count("forward failed on a batch of 4 requests whose inputs have 3 shapes, and ran each shape "
                      "apart") == 1, said
    assert "Pad the inputs to one shape in stack() (see Handle.stack)" in said


def test_forward_must_be_written():
    assert Handle().run_batch(tasks(1)) == [
        (500, "forward failed: NotImplementedError: Handle must define forward(self, batch)")]


def test_a_list_of_n_results_is_one_per_request_even_when_rows_have_length_n():
    class RowTimesTen(Handle):
        def preprocess(self, task):
            return np.asarray(task["task_info"]["n"], np.float64)

        def forward(self, batch):
            return [row * 10 for row in batch]  # one result per request, each of length 3

    handle = RowTimesTen()
    assert handle.run_batch(tasks([1, 2, 3], [4, 5, 6]))[0][1].tolist() == [10, 20, 30]  # 2 rows of 3
    results = handle.run_batch(tasks([1, 2, 3], [4, 5, 6], [7, 8, 9]))
    assert [r[1].tolist() for r in results] == [[10, 20, 30], [40, 50, 60], [70, 80, 90]]


def test_a_list_both_readings_fit_is_read_as_the_handles_earlier_lists_were(caplog):
    # two outputs in a batch of 2: two arrays with first dimension 2, as one result per request
    # would be too
    outputs = [np.array([[1, 1], [2, 2]]), np.array([10, 20])]
    learnt = Handle()
    assert len(learnt.unstack([np.ones((3, 2)), np.ones(3)], 3)) == 3  # a list of 2 in a batch of 3: outputs
    rows = learnt.unstack(outputs, 2)
    assert [(r[0].tolist(), int(r[1])) for r in rows] == [([1, 1], 10), ([2, 2], 20)]
    per_request = Handle()
    assert per_request.unstack([np.ones(3), np.ones(3)], 2)  # a list of 2 results of length 3: per request
    assert per_request.unstack(outputs, 2) is outputs
    # nothing learnt yet: a batch of one is its one result; a larger one fails, saying what to return
    fresh = Handle()
    one = [np.array([[1, 1]])]
    with caplog.at_level(logging.WARNING, logger="easyserve"):
        assert fresh.unstack(one, 1) is one
        assert fresh.unstack(one, 1) is one
    # said, once: session.run's list gave a lone request the array, and a request in a batch a tuple of rows
    said = [r.getMessage() for r in caught(caplog) if "for a request alone" in r.getMessage()]
    assert len(said) == 1 and "return tuple(outputs) for a model's outputs" in said[0], said
    with pytest.raises(ValueError, match=r"a list of 2 arrays, each with first dimension 2, for a batch of 2: "
                                         r"either .* Return tuple\(outputs\)"):
        fresh.unstack(outputs, 2)


def test_outputs_of_the_wrong_number_of_rows_are_refused_in_words_that_fit_the_batch():
    """A batch of one was told to return "a list of 1 results", whose rows "would go to other requests
    whenever there were 1"."""
    with pytest.raises(ValueError) as caught:
        Handle().unstack(np.zeros((3, 2)), 1)
    said = str(caught.value)
    assert "for a batch of 1;" in said, said
    assert "a list of 1 result (or override unstack)" in said and "1 results" not in said, said
    assert "whenever there were" not in said and "whenever their counts happened to add up to the batch's size" in said
    with pytest.raises(ValueError, match=r"or a list of 4 results \(or override unstack\)"):
        Handle().unstack(np.zeros((3, 2)), 4)


def test_a_list_that_reads_one_way_only_is_refused_where_it_would_mix_requests_rows():
    # a model's two outputs, the second without a batch dimension: in a batch of 2 it read as one result
    # per request, and each request got the other's rows (a 200); in any other batch, a 500
    outputs = [np.array([[10.0], [20.0]]), np.array([0.5, 0.25, 0.125])]
    with pytest.raises(ValueError, match=r"a list of 2 arrays for a batch of 2, some with first dimension 2: "
                                         r"either a model's outputs, one without a batch dimension"):
        Handle().unstack(outputs, 2)
    # one result per request as arrays of one rank and type (a detector's boxes, 3, 5 and 2 of them),
    # one of which happens to have as many rows as the batch has requests: not refused
    boxes = [np.zeros((3, 6), np.float32), np.zeros((5, 6), np.float32), np.zeros((2, 6), np.float32)]
    assert Handle().unstack(boxes, 3) is boxes
    # a handle whose lists were one result per request, as arrays of other lengths, reads them so still
    per_request = Handle()
    assert len(per_request.unstack([np.ones(3), np.ones(5)], 2)) == 2
    assert per_request.unstack(outputs, 2) is outputs
    # and once a handle's lists were one reading, a list that only reads the other way is refused
    with pytest.raises(ValueError, match="reads only as a model's outputs for a batch of 3, where this worker's "
                                         "earlier lists were one result per request"):
        per_request.unstack([np.ones((3, 2)), np.ones(3)], 3)
    columns = Handle()
    assert len(columns.unstack([np.ones((3, 2)), np.ones(3)], 3)) == 3
    with pytest.raises(ValueError, match="reads only as one result per request for a batch of 2, where this "
                                         "worker's earlier lists were a model's outputs"):
        columns.unstack([np.ones(3), np.ones(5)], 2)


def test_integers_that_only_a_float_holds_together_are_not_stacked():
    # int64 with uint64 stacks as float64: 2**53 + 1 would come back as 2**53
    inputs = [np.array([2**53 + 1], np.int64), np.array([1], np.uint64)]
    assert isinstance(Handle().stack(inputs), list)
    assert Handle().stack([np.array([2**53 + 1], np.int64), np.array([1], np.int32)]).tolist() == [[2**53 + 1], [1]]
    # nor does one past 2**53 join JSON's floats, which would round it (one client's 1.5 changing another's
    # 9007199254740993); integers a float64 holds exactly still do
    big = np.array([2**53 + 1, np.iinfo(np.int64).max, -np.iinfo(np.int64).max])
    assert isinstance(Handle().stack([big, np.array([1.5, 2.0, 3.0])]), list)
    assert isinstance(Handle().stack([np.array([2**64 - 1], np.uint64), np.array([1.5])]), list)
    held = np.array([2**53, -(2**53), 7])
    assert Handle().stack([held, np.array([1.5, 2.0, 3.0])]).tolist() == [[2**53, -(2**53), 7], [1.5, 2, 3]]
    # numbers, as preprocess returns a JSON field, by the same rules: 2**53 + 1 came back 2**53 beside 0.5
    assert Handle().stack([2**53 + 1, 0.5]) == [2**53 + 1, 0.5]
    assert Handle().stack([np.True_, np.float32(2.5)]) == [True, 2.5]
    assert Handle().stack([np.uint8(200), np.float32(0.5)]) == [200, 0.5]
    stacked = Handle().stack([3, 0.5, np.int32(2)])
    assert stacked.dtype == np.float64 and stacked.tolist() == [3, 0.5, 2]


def test_arrays_of_different_number_types_stack_as_numpy_promotes_them_but_integers_join_no_narrow_float():
    h = Handle()
    stacked = h.stack([np.array([1, 2]), np.array([3, 4], np.int32)])
    assert stacked.dtype == np.int64 and stacked.tolist() == [[1, 2], [3, 4]]
    # bools join no numbers: JSON's true came back 1.0 beside a float request, and 1 beside an integer one
    for numbers in (np.array([3, 4]), np.array([0.5, 1.5]), np.array([3, 4], np.uint8)):
        assert isinstance(h.stack([numbers, np.array([True, False])]), list), numbers.dtype
    assert h.stack([np.array([True, False]), np.array([False, False])]).dtype == np.bool_
    assert h.stack([np.zeros(2, np.float32), np.zeros(2, np.float64)]).dtype == np.float64
    stacked = h.stack([np.array([1, 2]), np.array([1.5, 2.0])])  # JSON's [1, 2] and [1.5, 2.0], as numpy reads them
    assert stacked.dtype == np.float64 and stacked.tolist() == [[1, 2], [1.5, 2]]
    # uint8 pixels among float32 ones were made floats of 0-255 and answered 200, where alone they failed
    assert isinstance(h.stack([np.zeros(2, np.uint8), np.zeros(2, np.float32)]), list)
    # arrays of strings or objects only stack with their own kind
    assert isinstance(h.stack([np.array(["a", "b"]), np.array([1, 2])]), list)


def test_a_tuple_is_several_model_outputs():
    rows = Handle().unstack((np.zeros((3, 4)), np.ones((3, 3))), 3)
    assert len(rows) == 3 and rows[0][0].shape == (4,) and rows[0][1].shape == (3,)


def test_unstack_returning_too_few_rows_fails_the_batch_with_500():
    class Short(Square):
        def unstack(self, outputs, n):
            return list(outputs)[:-1]

    message = "unstack failed: ValueError: unstack returned 0 rows for a batch of 1"  # each alone, after the batch
    assert Short().run_batch(tasks(1, 2)) == [(500, message)] * 2


def test_a_stack_or_unstack_that_fails_is_named_as_itself_not_as_forward():
    # forward's outputs that unstack cannot split (a dict of outputs, a scalar) read "forward failed", and
    # sent the reader to the model
    class BadUnstack(Square):
        def forward(self, batch):
            return {"scores": batch**2}  # a dict of outputs: unstack splits arrays along their first dimension

        def unstack(self, outputs, n):
            return [outputs["score"][i] for i in range(n)]

    class BadStack(Square):
        def stack(self, inputs):
            raise TypeError("cannot stack these")

    assert BadUnstack().run_batch(tasks(2)) == [(500, "unstack failed: KeyError: 'score'")]
    assert BadStack().run_batch(tasks(2)) == [(500, "stack failed: TypeError: cannot stack these")]


def test_payload_bytes_of_a_tensor_body_says_the_body_was_a_tensor():
    """It said "'img' must be a base64 string, got ndarray" to a client that sent no img and no base64."""
    with pytest.raises(ValueError, match=r"the body is a tensor \(uint8 \[4, 4, 3\]\), where this handle takes "
                                         r"bytes \(an image file\): send the file itself"):
        payload_bytes({"data": np.zeros((4, 4, 3), np.uint8), "content_type": "application/x-npy"})
    with pytest.raises(ValueError, match="'img' must be a base64 string, got list"):
        payload_bytes({"img": [1, 2]})


# Base64 as the strict decoder takes it, and as tools write it otherwise (in lines, with a newline at its
# end, URL-safe, unpadded; a capitalised data: URI), which was a bare "not valid base64": each decodes,
# and what is not base64 is told with what is wrong and where. Padding after a complete group decodes,
# as the standard library (not pybase64) decodes it.
BASE64_EDGES = [
    ("", b""), ("QQ==", b"A"), ("QQ=", b"A"), ("QQ", b"A"), ("QUJD", b"ABC"), ("QUJD====", b"ABC"),
    ("QUJD\n", b"ABC"), (" QUJD", b"ABC"), ("QU JD", b"ABC"), ("QUJD\r\nQUJD\r\n", b"ABCABC"),
    ("-_-_", b"\xfb\xff\xbf"), ("+/+/", b"\xfb\xff\xbf"), ("Zm9vYmF", b"fooba"), ("Zm9vYmE=", b"fooba"),
    ("data:image/jpeg;base64,QUJD", b"ABC"), ("DATA:image/png;base64,QUJD", b"ABC"),
    ("Q", "its last character makes no whole byte (was the text cut short?)"),
    ("==", "it holds no base64 characters, only padding or whitespace"), (" \n ", "it holds no base64 characters, "
                                                                         "only padding or whitespace"),
    ("data:image/png;base64,QUJD*", "'*' at character 26 is not a base64 character"),  # of what was sent
    ("QU=JD", "padding ('=') at character 2, before its end"),
    ("QQ==QQ==", "padding ('=') at character 2, before its end"),
    ("QUJD\nQU=\nJD", "padding ('=') at character 7, before its end"),
    ("+/-_", "it mixes the standard alphabet ('+', '/') with the URL-safe one ('-', '_')"),
    ("QUJD\u00e9", "'\u00e9' at character 4 is not a base64 character"),
    ("QUJD\x00", "'\\x00' at character 4 is not a base64 character"),
]


@pytest.mark.parametrize("text, decoded", BASE64_EDGES, ids=[repr(text) for text, _ in BASE64_EDGES])
def test_base64_payloads_decode_as_tools_write_them_and_say_what_is_wrong_where_they_do_not(text, decoded):
    if isinstance(decoded, bytes):
        assert payload_bytes({"img": text}) == decoded
    else:
        with pytest.raises(ValueError) as raised:
            payload_bytes({"img": text})
        assert str(raised.value) == f"'img' is not valid base64: {decoded}"


def test_base64_that_is_not_is_told_without_a_search_that_backtracks():
    """A regular expression looking for padding before the end backtracked over a run of "=": 32 kB of
    them took 3.8 s of a worker's time, a megabyte an hour, and its worker was killed as stuck. A
    megabyte of each such text is told in milliseconds; the bound is for a hang, not a speed."""
    for text in ("=" * 1_000_000, "= " * 500_000, "QUJD\n" + "=\n" * 500_000 + "QUJD", "A" + " " * 1_000_000 + "*"):
        began = time.perf_counter()
        with pytest.raises(ValueError, match="'img' is not valid base64: "):
            payload_bytes({"img": text})
        assert time.perf_counter() - began < 2.0


def test_base64_of_a_megabyte_decodes_in_every_form_tools_write():
    data = os.urandom(1 << 20)
    for text in (base64.b64encode(data).decode(), base64.encodebytes(data).decode(),
                 base64.urlsafe_b64encode(data).decode().rstrip("=")):
        assert payload_bytes({"img": text}) == data


def test_base64_payloads_take_the_fast_decoder():
    import pybase64

    assert handle_module._fast_b64decode is pybase64.b64decode
    data = os.urandom(1 << 20)
    assert payload_bytes({"img": base64.b64encode(data).decode()}) == data


def test_an_interrupt_stops_a_handle_called_in_this_process():
    # with every BaseException taken as the handle's, Ctrl-C in a notebook became a 500, and the batch
    # then ran again in parts
    class Interrupted(Square):
        calls = 0

        def forward(self, batch):
            Interrupted.calls += 1
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Interrupted().run_batch(tasks(1, 2, 3, 4))
    assert Interrupted.calls == 1


def test_an_answer_is_written_or_refused_alike_whichever_encoder_writes_it():
    """Answers go through orjson, and through the standard library where orjson refuses (keys that are
    not strings, integers past 64 bits) or may have written NaN as null. orjson wrote dataclasses,
    datetimes, UUIDs and enums itself, the standard library refused them: the same handle answered
    200 or 500 depending on whether its answer held a None."""
    import dataclasses
    import datetime
    import enum
    import json
    import uuid

    from easyserve.handle import to_json

    @dataclasses.dataclass
    class Detection:
        label: str
        score: float
        track: int | None = None

    class Kind(enum.Enum):
        CAT = 1

    when, ident = datetime.datetime(2024, 5, 1, 12, 30), uuid.UUID(int=5)
    for with_none in (False, True):
        extra = {"none": None} if with_none else {}
        for value, expected in [
            (Detection("cat", 0.9, 7), {"label": "cat", "score": 0.9, "track": 7}),
            ({"at": when, "id": ident, "kind": Kind.CAT}, {"at": "2024-05-01T12:30:00", "id": str(ident), "kind": 1}),
            ({1: "int key"}, {"1": "int key"}),
            # numpy's numbers as keys, as argsort's indices give them, nested too
            ({np.int64(3): 0.5, np.float32(0.5): "half", np.bool_(True): [{np.uint8(1): "one"}]},
             {"3": 0.5, "0.5": "half", "true": [{"1": "one"}]}),
            (Detection("cat", 0.9, {np.int64(2): "track"}), {"label": "cat", "score": 0.9, "track": {"2": "track"}}),
            ({"big": 2**70}, {"big": 2**70}),
            ({"scores": np.array([0.5, 1e-7], np.float32)}, {"scores": [0.5, float(np.float32(1e-7))]}),
        ]:
            assert json.loads(to_json([value, *extra.values()])) == [expected, *extra.values()], value
        # a NaN in what a conversion gives (an object or structured array's items, an enum's value) was
        # answered null, with a 200
        odd = enum.Enum("Odd", {"NAN": float("nan")})
        for bad in (Detection("x", float("nan")), {"x": [1.0, float("inf")]}, np.array([1.0, np.nan]),
                    {"x": np.float32("nan")}, {1: float("nan")}, np.array([float("nan"), 1], dtype=object),
                    np.array([(1, float("nan"))], dtype=[("x", "i4"), ("y", "f8")]), {"k": odd.NAN},
                    np.array([(1, float("inf"))], dtype=[("x", "i4"), ("y", "f8")])[0]):
            with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
                to_json([bad, *extra.values()])
    for complex_number in (1j, np.complex64(1j), np.array([1j, 2])):  # said what to answer instead
        with pytest.raises(TypeError, match="complex numbers have no JSON form: answer their real and imaginary"):
            to_json({"z": complex_number, "none": None})
    # two keys JSON writes alike: both were written, and a client read the last alone
    for twins, said in (({1: "a", "1": "b"}, "1 and '1', are both '1'"), ({True: 1, "true": 2}, "True and 'true'"),
                        ({np.int64(2): 1, 2.0: 0, "2": 3}, "np.int64(2) and '2'")):
        with pytest.raises(ValueError, match=f"two keys of a dict, {re.escape(said)}"):
            to_json({"x": twins})
    assert json.loads(to_json({1: "a", 1.5: "b", None: "c"})) == {"1": "a", "1.5": "b", "null": "c"}
    # a masked array's masked values were null in JSON, where .npy and the Open Inference Protocol had them
    with pytest.raises(TypeError, match=r"a masked array is not JSON serializable: answer array.filled\(value\)"):
        to_json({"x": np.ma.masked_array([1.0, 2.0], mask=[0, 1])})
    assert json.loads(to_json(np.array([(1, 2.5)], dtype=[("x", "i4"), ("y", "f8")]))) == [[1, 2.5]]
    # dates and times as ISO text whatever their unit: pandas' nanoseconds were answered as integers
    times = {"ns": np.array(["2024-01-01T10:00"], dtype="datetime64[ns]"), "s": np.datetime64("2024-01-01", "s")}
    assert json.loads(to_json(times)) == {"ns": ["2024-01-01T10:00:00.000000000"], "s": "2024-01-01T00:00:00"}


class TorchLike:
    """What easyserve reads of a PyTorch tensor, for machines without torch (CI): a class of the torch
    module that detaches to itself and gives its numbers with .cpu().numpy(). The test after it runs
    the same with torch itself where it is installed."""

    __module__ = "torch"

    def __init__(self, array):
        self.array = np.asarray(array)
        self.dtype = f"torch.{self.array.dtype}"
        self.shape = self.array.shape

    def detach(self):
        return self

    def cpu(self):
        return self

    def numpy(self):
        return self.array


def test_torch_tensors_are_read_as_the_arrays_they_hold():
    """A tensor returned as the model gave it was "an array of shape (1, 1000) for a batch of 1" to
    unstack, "not JSON serializable" to the answer, and "cannot send a Tensor" to the Client."""
    from easyserve.client import encode
    from easyserve.handle import to_json
    from easyserve.npy import read_npy, to_npy

    rows = Handle().unstack(TorchLike(np.arange(6.0).reshape(3, 2)), 3)
    assert [row.tolist() for row in rows] == [[0, 1], [2, 3], [4, 5]]
    rows = Handle().unstack({"scores": TorchLike(np.ones((2, 3))), "ids": np.array([7, 8])}, 2)
    assert rows[1]["scores"].tolist() == [1, 1, 1] and rows[1]["ids"] == 8
    assert [row[0].shape for row in Handle().unstack((TorchLike(np.zeros((2, 4))), np.ones(2)), 2)] == [(4,), (4,)]
    assert json.loads(to_json({"scores": TorchLike([0.5, 1.5]), "top": TorchLike(1)})) == {"scores": [0.5, 1.5],
                                                                                             "top": 1}
    with pytest.raises(ValueError, match="Out of range float"):
        to_json({"scores": TorchLike([float("nan")])})
    assert read_npy(to_npy(TorchLike(np.arange(3, dtype=np.int16)))).tolist() == [0, 1, 2]
    assert encode(TorchLike(np.zeros((2, 2), np.float32)))[1] == "application/x-npy"
    # a model's outputs as a named tuple (its fields taken one by one) failed every batch
    Outputs = collections.namedtuple("Outputs", "scores boxes")
    rows = Handle().unstack(Outputs(TorchLike(np.ones((2, 3))), TorchLike(np.zeros((2, 4)))), 2)
    assert [(row[0].shape, row[1].shape) for row in rows] == [((3,), (4,))] * 2
    # each row of the type the batch came as, its fields read by name: rows were plain tuples and dicts,
    # and postprocess's row.scores, as a model's output reads, failed every request
    assert [(type(row), row.scores.shape, row.boxes.shape) for row in rows] == [(Outputs, (3,), (4,))] * 2

    class ModelOutput(collections.OrderedDict):  # a library's: a dict whose keys read as attributes
        def __getattr__(self, name):
            try:
                return self[name]
            except KeyError:
                raise AttributeError(name) from None

    rows = Handle().unstack(ModelOutput(logits=TorchLike(np.eye(2))), 2)
    assert [(type(row), row.logits.tolist()) for row in rows] == [(ModelOutput, [1, 0]), (ModelOutput, [0, 1])]
    assert json.loads(to_json(rows[0])) == {"logits": [1, 0]}
    rows = Handle().unstack(collections.defaultdict(list, {"a": np.eye(2)}), 2)  # made from no plain dict
    assert [type(row) for row in rows] == [dict, dict] and rows[1]["a"].tolist() == [0, 1]

    class Described(dict):  # made from a plain dict, it takes it for another thing: an empty dict, not the row
        def __init__(self, meta=None, **fields):
            super().__init__(**fields)
            self.meta = meta

    rows = Handle().unstack(Described("about", a=np.eye(2)), 2)
    assert [type(row) for row in rows] == [dict, dict] and rows[1]["a"].tolist() == [0, 1]
    # a typed row, answered as it is, is written as its plain tuple is (by orjson: its floats alike)
    typed = Handle().unstack(Outputs(np.array([1e-5], np.float32), np.array([[1, 2]])), 1)[0]
    assert to_json(typed) == to_json(tuple(typed)) == b"[9.999999747378752e-6,[1,2]]"
    assert json.loads(encode({"x": TorchLike([1.0, 2.0])})[0]) == {"x": [1.0, 2.0]}


def test_torch_tensors_with_torch_itself():
    torch = pytest.importorskip("torch")
    from easyserve.handle import to_json

    model = torch.nn.Linear(4, 3)  # its output needs its graph detached
    out = model(torch.ones(2, 4))
    rows = Handle().unstack(out, 2)
    assert len(rows) == 2 and rows[0].shape == (3,) and isinstance(rows[0], np.ndarray)
    rows = Handle().unstack(torch.tensor([[1.0, 3.0], [4.0, 2.0]]).max(-1), 2)  # torch's (values, indices)
    assert [(row.values.item(), row.indices.item()) for row in rows] == [(3.0, 1), (4.0, 0)]
    assert json.loads(to_json(rows[0])) == [3.0, 1]
    stacked = Handle().stack([torch.ones(4), torch.zeros(4)])
    assert isinstance(stacked, torch.Tensor) and tuple(stacked.shape) == (2, 4)
    assert json.loads(to_json({"half": torch.tensor([1.5], dtype=torch.bfloat16)})) == {"half": [1.5]}
    with pytest.raises(TypeError, match="a tensor on the meta device holds no values"):  # a TypeError, as promised
        to_json({"x": torch.empty(2, device="meta")})
    scores = torch.tensor([0.1, 0.7, 0.2])
    from easyserve.handle import unfit_at  # a NaN in a tensor is named where it is, as in an array

    assert unfit_at({"v": torch.tensor([1.0, float("nan")])}).startswith("; the part it cannot hold: ['v'][1] = nan")
    assert json.loads(to_json({scores.argmax(): "top"})) == {"1": "top"}  # a one-number tensor as a key


def test_the_package_offers_its_api_to_a_notebooks_completion():
    # dir() is what Jupyter completes `easyserve.` from: it offered Any, TYPE_CHECKING, importlib, sys...
    import easyserve

    offered = dir(easyserve)
    assert set(easyserve.__all__) <= set(offered) and "__version__" in offered
    assert not {"Any", "TYPE_CHECKING", "annotations", "importlib", "sys", "types"} & set(offered)
    assert all(getattr(easyserve, name) is not None for name in easyserve.__all__)


def test_a_handle_found_by_name_is_read_as_python_reads_its_file(serve, tmp_path, monkeypatch):
    """The search by class name read files as plain UTF-8: a class on the first line of a file saved
    with a BOM (and CRLF, as on Windows) was not found, nor one named in Latin-1 under a coding line,
    where another file's class was suggested instead."""
    (tmp_path / "handles").mkdir()
    (tmp_path / "handles" / "legacy.py").write_bytes(
        b"\xef\xbb\xbfclass Legacy:\r\n    def __init__(self, gpu):\r\n        pass\r\n\r\n"
        b"    def __call__(self, data):\r\n        return {'legacy': data['task_info']['a']}\r\n")
    (tmp_path / "handles" / "latin.py").write_bytes(
        "# -*- coding: latin-1 -*-\nfrom easyserve import Handle\n\n\nclass Modèle(Handle):\n"
        "    def forward(self, batch):\n        return [{'modèle': 1} for _ in batch]\n".encode("latin-1"))
    monkeypatch.chdir(tmp_path)
    with serve("Legacy") as server:
        assert post_json(server.url + "/predict", {"a": 1}) == (200, {"legacy": 1})
    with serve("Modèle") as server:
        assert post_json(server.url + "/predict", {}) == (200, {"modèle": 1})


def test_a_module_handle_imported_from_elsewhere_than_beside_its_config_is_said(tmp_path, monkeypatch, caplog):
    """``Handle: myhandle:H`` beside the config lost to another project's ``myhandle`` earlier on the
    module path (PYTHONPATH), which was served without a word."""
    import logging

    from easyserve import Server

    for project in ("mine", "other"):
        (tmp_path / project).mkdir()
        (tmp_path / project / "myhandle.py").write_text(
            "from easyserve import Handle\n\n\nclass H(Handle):\n    def forward(self, batch):\n"
            f"        return [{{'project': {project!r}}} for _ in batch]\n")
    (tmp_path / "mine" / "c.yaml").write_text("GPUs: cpu\nHandle: myhandle:H\nPort: 0\n")
    monkeypatch.syspath_prepend(str(tmp_path / "other"))
    caplog.set_level(logging.WARNING, logger="easyserve")
    with Server.from_yaml(tmp_path / "mine" / "c.yaml").start(timeout=60) as server:
        assert post_json(server.url + "/predict", {}) == (200, {"project": "other"})
    assert (f"Handle: myhandle:H was imported from {tmp_path / 'other' / 'myhandle.py'}, not from "
            f"{tmp_path / 'mine' / 'myhandle.py'} beside the config") in caplog.text, caplog.text


def test_a_config_in_a_linked_folder_finds_the_handles_and_models_of_the_project_it_is_linked_into(tmp_path):
    """``app/configs`` linked to a shared folder: "one folder up" from the config was the shared
    folder's parent, where neither handles/ nor models/ were, not the project's."""
    from easyserve import Server

    (tmp_path / "shared" / "configs").mkdir(parents=True)
    (tmp_path / "app" / "handles").mkdir(parents=True)
    (tmp_path / "app" / "models").mkdir()
    (tmp_path / "app" / "models" / "words.txt").write_text("linked\n")
    (tmp_path / "app" / "handles" / "linked.py").write_text(
        "from easyserve import Handle\n\n\nclass Linked(Handle):\n    def setup(self, device):\n"
        "        self.word = device.find(self.args['words']).read_text().strip()\n\n"
        "    def forward(self, batch):\n        return [{'word': self.word} for _ in batch]\n")
    (tmp_path / "shared" / "configs" / "c.yaml").write_text(
        "GPUs: cpu\nHandle: Linked\nHandleArgs: {words: models/words.txt}\nPort: 0\n")
    (tmp_path / "app" / "configs").symlink_to(tmp_path / "shared" / "configs")
    with Server.from_yaml(tmp_path / "app" / "configs" / "c.yaml").start(timeout=60) as server:
        assert post_json(server.url + "/predict", {}) == (200, {"word": "linked"})


def test_a_hook_is_checked_as_it_is_called_a_decorators_wrapper_not_the_function_it_wraps():
    """A decorator that passes its method one argument more (functools.wraps over it) serves well; checked
    as the function it wraps, its handle was refused at start."""
    import functools

    from easyserve.errors import ConfigError
    from easyserve.loader import check_class

    def with_cache(fn):
        @functools.wraps(fn)
        def wrapper(self, task):
            return fn(self, task, cache={})
        return wrapper

    class Cached(Handle):
        @with_cache
        def preprocess(self, task, cache):
            return task["task_info"]

        def forward(self, batch):
            return batch

    check_class(Cached)
    assert Cached().run_batch([{"task_id": "t", "task_info": 3}]) == [(200, 3)]

    class Wrong(Cached):
        def postprocess(self, output):
            return output

    with pytest.raises(ConfigError, match=re.escape("Wrong.postprocess(self, output) cannot be called as easyserve "
                                                    "calls it, with (output, task)")):
        check_class(Wrong)

    class OwnWay(Handle):  # its own run_batch: the worker calls it and setup only, and its helpers as it likes
        def preprocess(self, text, max_len):
            return text[:max_len]

        async def forward(self, ids, mask):
            return ids

        def run_batch(self, tasks):
            return [(200, self.preprocess(task["task_info"], 2)) for task in tasks]

    check_class(OwnWay)
    assert OwnWay().run_batch([{"task_id": "t", "task_info": "abc"}]) == [(200, "ab")]


@pytest.mark.parametrize("read_all", [list, dict, lambda args: {**args}, lambda args: list(args.keys()),
                                      lambda args: list(args.items()), lambda args: list(args.values())],
                         ids=["a loop", "dict()", "**args", "keys()", "items()", "values()"])
def test_a_handle_that_reads_all_its_args_at_once_is_never_told_one_is_misspelt(read_all):
    """A handle that hands its args on whole (``Model(**self.args)``) reads the key it was given, whatever
    the key it also asked for by name and lacked: no misspelling to warn of."""
    from easyserve.handle import HandleArgs

    alone = HandleArgs({"treshold": 0.9})
    alone.get("threshold", 0.5)
    assert alone.misspelt() == [("threshold", "treshold")]
    args = HandleArgs({"treshold": 0.9})
    args.get("threshold", 0.5)
    read_all(args)
    assert args.misspelt() == []
    assert args.unread() == []  # nor of a key it did not read


@pytest.mark.parametrize("read", [lambda args: args.get("k"), lambda args: args["k"], lambda args: "k" in args,
                                  lambda args: args.setdefault("k", 1), lambda args: args.pop("k")],
                         ids=["get", "[]", "in", "setdefault", "pop"])
def test_a_key_read_any_way_is_not_named_as_unread(read):
    from easyserve.handle import HandleArgs

    args = HandleArgs({"k": 3, "other": 1})
    assert args.unread() == ["k", "other"]
    read(args)
    assert args.unread() == ["other"]
    args.taken_by_init()  # as the loader marks those a handle's own __init__ took
    assert args.unread() == []
    taken = HandleArgs({"treshold": 0.9})
    taken.taken_by_init()
    taken.get("threshold", 0.5)  # a misspelling is still said: the key asked for here lacks
    assert taken.unread() == [] and taken.misspelt() == [("threshold", "treshold")]
