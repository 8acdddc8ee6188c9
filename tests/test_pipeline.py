"""A worker's data path: preprocess and postprocess on threads, and the next batch prepared while
forward runs the current one. Checked from what the handle writes down (which thread, which batch,
when), never from how long anything took."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Background, caught, post_json, post_many, request, wait_busy, wait_draining, wait_queued
from conftest import wait_until

from easyserve import Server
from easyserve.pipeline import CHEAP_CALL_S, Lanes


def timeline(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_behind_gate(server: Server, gate: Path, bodies: list[Any]) -> list[tuple[int, Any]]:
    """Hold the worker in forward (on a request of value -1) until ``bodies`` all wait in the queue,
    then let it go: they form one batch. Returns the blocker's answer, then theirs."""
    url = server.url + "/predict"
    blocker = Background(lambda: post_json(url, {"value": -1}))
    wait_busy(server)
    rest = Background(lambda: post_many(url, bodies, concurrency=len(bodies)))
    wait_queued(server.url, len(bodies))
    gate.touch()
    return [blocker.result(), *rest.result()]


@pytest.mark.parametrize("threads", [1, 4])
def test_preprocess_and_postprocess_run_on_as_many_threads_as_configured(serve, tmp_path, threads):
    log, gate = tmp_path / "timeline.jsonl", tmp_path / "gate"
    args = {"log": str(log), "gate": str(gate), "preprocess_s": 0.05}
    with serve("handles_for_tests:Timeline", HandleArgs=args, MaxBatchSize=8, PreprocessThreads=threads,
               Pipeline=False) as server:
        bodies: list[dict] = [{"value": i} for i in range(7)] + [{"reject": "bad picture"}]
        answers = run_behind_gate(server, gate, bodies)
        assert server.workers[0]["preprocess_threads"] == threads
    # in order, each its own; the failing preprocess fails its request alone
    assert answers[1:8] == [(200, {"value": i}) for i in range(7)]
    assert answers[8] == (400, {"error": "preprocess failed: ValueError: rejected: bad picture"})
    entries = timeline(log)
    forwards = [e for e in entries if e["stage"] == "forward"]
    assert [sorted(f["values"]) for f in forwards] == [[-1], list(range(7))]  # one batch of the seven
    for stage in ("preprocess", "postprocess"):
        used = {e["thread"] for e in entries if e["stage"] == stage and e["values"][0] >= 0}
        assert len(used) > 1 if threads > 1 else len(used) == 1, (stage, used)
    # a batch of one runs in the worker's own thread, not a pool's
    lone = {e["thread"] for e in entries if e["values"] == [-1]}
    assert lone == {forwards[0]["thread"]}


def test_one_preprocess_thread_never_runs_a_handles_calls_at_once_even_with_the_pipeline(serve, tmp_path):
    """PreprocessThreads: 1 is for a handle whose calls are not safe at once (a tokenizer shared by
    preprocess and postprocess), but a pipelined worker ran a batch's postprocess beside the next
    batch's preprocess: "Already borrowed", 234 of 500 requests failed."""
    log = tmp_path / "timeline.jsonl"
    with serve("handles_for_tests:Timeline", HandleArgs={"log": str(log), "preprocess_s": 0.01}, MaxBatchSize=4,
               PreprocessThreads=1, Pipeline=True) as server:
        bodies = [{"value": i} for i in range(60)]
        assert post_many(server.url + "/predict", bodies, concurrency=12) == [(200, b) for b in bodies]
        assert server.workers[0]["pipeline"] is True
    entries = timeline(log)
    calls = [e for e in entries if e["stage"] in ("preprocess", "postprocess")]
    at_once = [(a, b) for a in calls for b in calls if a is not b and a["start"] < b["start"] < a["end"]]
    assert not at_once, at_once[:3]


def test_calls_too_cheap_to_hand_to_a_thread_run_in_the_callers_and_dearer_ones_go_back_to_threads():
    lanes, caller = Lanes(4), threading.get_ident()
    state = {"sleep": 0.0}

    def call(item: int) -> int:
        if state["sleep"]:  # (a sleep of 0 hands the GIL on: a cheap call held up behind the others')
            time.sleep(state["sleep"])
        return threading.get_ident()

    assert caller not in lanes.map(call, range(8), "pre")  # its cost unknown: on the threads
    # known cheap: a plain loop (a batch or two later on a loaded machine, where a call can be held up)
    assert any(set(lanes.map(call, range(8), "pre")) == {caller} for _ in range(5))
    assert lanes.cost["pre"] < CHEAP_CALL_S
    state["sleep"] = 0.005  # the calls grow dear (larger pictures): one batch's cost sends them back
    lanes.map(call, range(8), "pre")
    assert caller not in lanes.map(call, range(8), "pre")
    assert caller not in lanes.map(call, range(8), "post")  # each kind has its own cost


def test_memory_error_in_a_threaded_preprocess_ends_the_worker_and_the_batch_is_retried(serve, tmp_path):
    log, gate = tmp_path / "timeline.jsonl", tmp_path / "gate"
    args = {"log": str(log), "gate": str(gate)}
    with serve("handles_for_tests:Timeline", HandleArgs=args, MaxBatchSize=8, PreprocessThreads=4,
               Pipeline=False) as server:
        pid = server.workers[0]["pid"]
        bodies: list[dict] = [{"value": i} for i in range(5)] + [{"value": 5, "oom": True}]
        answers = run_behind_gate(server, gate, bodies)
        assert answers[0] == (200, {"value": -1})
        assert answers[1:6] == [(200, {"value": i}) for i in range(5)]  # retried, each alone
        status, body = answers[6]
        assert status == 500 and "ran out of memory (its handle raised MemoryError)" in body["error"]
        assert wait_until(lambda: server.workers[0]["state"] == "idle" and server.workers[0]["pid"] != pid)
        assert server.workers[0]["restarts"] == 2  # its first worker and the retry's
        assert request(server.url + "/health")[0] == 200


# -- the pipeline: the next batch handed over, and prepared, while forward runs the current one -------


def overlaps(entries: list[dict]) -> list[tuple[dict, dict]]:
    """Each (preprocess, forward) pair that ran at once, the preprocess being for another batch."""
    forwards = [e for e in entries if e["stage"] == "forward"]
    return [(p, f) for p in entries if p["stage"] == "preprocess" for f in forwards
            if p["values"][0] not in f["values"] and p["start"] < f["end"] and f["start"] < p["end"]]


def preprocessed(log: Path, value: int) -> bool:
    return any(e["stage"] == "preprocess" and e["values"] == [value] for e in timeline(log))


@pytest.mark.parametrize("pipeline", [True, False], ids=["pipeline", "no-pipeline"])
def test_the_next_batch_is_preprocessed_while_forward_runs_only_with_the_pipeline(serve, tmp_path, pipeline):
    log, gate = tmp_path / "timeline.jsonl", tmp_path / "gate"
    args = {"log": str(log), "gate": str(gate), "preprocess_s": 0.02}
    with serve("handles_for_tests:Timeline", HandleArgs=args, MaxWaitMs=0, Pipeline=pipeline) as server:
        url = server.url + "/predict"
        blocker = Background(lambda: post_json(url, {"value": -1}))  # its forward waits for the gate
        wait_busy(server)
        rest = Background(lambda: post_many(url, [{"value": i} for i in (1, 2, 3)], concurrency=3))
        if pipeline:  # handed to the busy worker, which prepares it while forward waits
            wait_until(lambda: preprocessed(log, 1) or preprocessed(log, 2) or preprocessed(log, 3))
        else:  # nothing reaches a busy worker: they wait in the queue
            wait_queued(server.url, 3)
        gate.touch()
        assert blocker.result() == (200, {"value": -1})
        assert rest.result() == [(200, {"value": i}) for i in (1, 2, 3)]
        assert server.workers[0]["pipeline"] is pipeline
        stats = request(server.url + "/stats")[2]
    entries = timeline(log)
    forwards = [e["values"] for e in entries if e["stage"] == "forward"]
    assert stats["batches"] == len(forwards) and sum(int(n) * c for n, c in stats["batch_sizes"].items()) == 4
    found = overlaps(entries)
    if pipeline:
        # the batch handed over while the blocker's forward waited was prepared during it (later batches
        # may overlap the forwards before them too: that is the pipeline working, not a fault)
        assert any(f["values"] == [-1] for _, f in found), found
    else:
        assert not found, found


def hold_two_batches(server: Server, log: Path) -> tuple[Background, Background]:
    """A batch held in forward (value -1) and the next one (value 1), handed over and prepared."""
    url = server.url + "/predict"
    first = Background(lambda: post_json(url, {"value": -1}, timeout=60))
    wait_busy(server)
    second = Background(lambda: post_json(url, {"value": 1}, timeout=60))
    wait_until(lambda: preprocessed(log, 1), what="the second batch to be prepared")
    return first, second


def test_a_worker_killed_holding_two_batches_has_both_retried(serve, tmp_path, caplog):
    log, gate = tmp_path / "timeline.jsonl", tmp_path / "gate"
    with serve("handles_for_tests:Timeline", HandleArgs={"log": str(log), "gate": str(gate)}, MaxWaitMs=0,
               Pipeline=True) as server:
        first, second = hold_two_batches(server, log)
        pid = server.workers[0]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: server.workers[0]["pid"] != pid and server.workers[0]["state"] in ("idle", "busy"))
        gate.touch()
        assert first.result() == (200, {"value": -1})
        assert second.result() == (200, {"value": 1})
        stats = request(server.url + "/stats")[2]
        assert server.workers[0]["restarts"] == 1
        assert stats["batches"] == 4  # two handed to the killed worker, then each retried alone
    # the two apart: "a batch of 2" read as one of more than MaxBatchSize (1 here)
    [died] = [r.getMessage() for r in caught(caplog) if "died with signal 9" in r.getMessage()]
    assert re.search(r" while running a batch of 1 \(request \S+\), with a batch of 1 handed to it ahead \(request "
                     r"\S+\)$", died), died


def test_a_worker_stuck_with_a_batch_ahead_is_killed_and_both_batches_get_504(serve, tmp_path):
    log, gate = tmp_path / "timeline.jsonl", tmp_path / "gate"  # the gate never opens
    with serve("handles_for_tests:Timeline", HandleArgs={"log": str(log), "gate": str(gate)}, MaxWaitMs=0,
               Pipeline=True, TimeoutS=1.5) as server:
        pid = server.workers[0]["pid"]
        first, second = hold_two_batches(server, log)
        assert first.result()[0] == 504 and second.result()[0] == 504
        wait_until(lambda: server.workers[0]["pid"] != pid and server.workers[0]["state"] == "idle")
        assert server.workers[0]["restarts"] == 1
        gate.touch()
        assert post_json(server.url + "/predict", {"value": 2}) == (200, {"value": 2})


def test_a_drain_waits_for_both_batches_a_worker_holds(tmp_path):
    log, gate = tmp_path / "timeline.jsonl", tmp_path / "gate"
    server = Server(handle="handles_for_tests:Timeline", HandleArgs={"log": str(log), "gate": str(gate)},
                    GPUs="cpu", Port=0, MaxWaitMs=0, Pipeline=True).start(timeout=60)
    try:
        first, second = hold_two_batches(server, log)
        stopping = Background(lambda: server.stop(drain_timeout=30))
        wait_draining(server.url)
        gate.touch()
        assert first.result() == (200, {"value": -1})
        assert second.result() == (200, {"value": 1})
        stopping.result()
    finally:
        server.stop(drain_timeout=0)


def test_a_worker_due_for_replacement_answers_both_batches_first(serve, tmp_path):
    log, gate = tmp_path / "timeline.jsonl", tmp_path / "gate"
    with serve("handles_for_tests:Timeline", HandleArgs={"log": str(log), "gate": str(gate)}, MaxWaitMs=0,
               Pipeline=True, MaxBatchesPerWorker=2) as server:
        pid = server.workers[0]["pid"]
        first, second = hold_two_batches(server, log)
        gate.touch()
        assert first.result() == (200, {"value": -1})
        assert second.result() == (200, {"value": 1})
        wait_until(lambda: server.workers[0]["pid"] != pid and server.workers[0]["state"] == "idle")
        assert (server.workers[0]["recycled"], server.workers[0]["restarts"]) == (1, 0)


@pytest.mark.parametrize("pipeline", [True, False, "auto"], ids=["pipeline", "no-pipeline", "auto"])
def test_batches_stay_large_under_64_concurrent_clients(serve, pipeline):
    # handing batches ahead must not take requests from the queue one at a time
    with serve("handles_for_tests:Recorder", HandleArgs={"delay": 0.005}, ProcessPerGPU=2, MaxBatchSize=16,
               Pipeline=pipeline) as server:
        assert [w["pipeline"] for w in server.workers] == [pipeline is True] * 2  # auto: off on a CPU
        answers = post_many(server.url + "/predict", [{"value": i} for i in range(640)], concurrency=64)
        assert [(status, body["value"]) for status, body in answers] == [(200, i) for i in range(640)]
        stats = request(server.url + "/stats")[2]
    sizes = {int(size): count for size, count in stats["batch_sizes"].items()}
    assert sum(size * count for size, count in sizes.items()) == 640 and sum(sizes.values()) == stats["batches"]
    assert 640 / stats["batches"] > 4, sizes


@pytest.mark.parametrize("handle,body,expected", [
    ("handles_for_tests:OriginalStyle", {"n": 2}, lambda body: body["task_info"]["doubled"] == 4),
    ("handles_robust:ShortRunBatch", {"i": 7}, lambda body: body == {"i": 7}),
], ids=["original-easy-serve", "own-run-batch"])
def test_a_handle_with_its_own_run_batch_runs_it_whole_never_pipelined(serve, handle, body, expected):
    with serve(handle, Pipeline=True, PreprocessThreads=4) as server:
        assert (server.workers[0]["pipeline"], server.workers[0]["preprocess_threads"]) == (False, 1)
        status, answer = post_json(server.url + "/predict", body)
        assert status == 200 and expected(answer), answer


def test_a_retried_request_runs_with_no_batch_prepared_beside_it(serve, tmp_path):
    """A request retried after its worker died runs alone, so that a death under it is its own doing. A
    pipelined worker took the next batch while it ran it, and prepared it meanwhile: a request that ends
    the worker as it is read (a decoder's segfault on a malformed picture) took the retried request down
    a second time, and that one failed 500, blamed for a crash it had no part in."""
    journal, release = tmp_path / "journal", tmp_path / "release"

    def ran(mark: str) -> int:
        return journal.read_text().split().count(mark) if journal.exists() else 0

    def let_go(mark: str) -> None:
        Path(f"{release}-{mark}").touch()

    args = {"journal": str(journal), "release": str(release)}
    with serve("handles_robust:CrashesAsItReads", ProcessPerGPU=2, Pipeline=True, MaxBatchSize=1, MaxWaitMs=0,
               TimeoutS=60, HandleArgs=args) as server:
        url = server.url + "/predict"
        x = Background(lambda: post_json(url, {"mark": "x", "hold": True}))
        wait_until(lambda: ran("x") == 1, what="x running")
        b = Background(lambda: post_json(url, {"mark": "b", "hold": True}))
        wait_until(lambda: ran("b") == 1, what="b running")
        # both workers busy: the first crashing request is handed to x's worker, which it ends; x is retried
        first = Background(lambda: post_json(url, {"crash": True}))
        wait_until(lambda: ran("x") == 2, what="x running again, alone")
        let_go("b")  # b's worker takes the crashing request's retry next, and dies of it too
        assert b.result()[0] == 200
        assert first.result()[0] == 500
        wait_until(lambda: [w["state"] for w in server.workers].count("idle") == 1, what="a worker idle again")
        b2 = Background(lambda: post_json(url, {"mark": "b2", "hold": True}))
        wait_until(lambda: ran("b2") == 1, what="b2 running")
        # both busy again: the worker this one is handed to, ahead, must not be the one running x alone
        restarts = server.stats()["restarts"]
        second = Background(lambda: post_json(url, {"crash": True}))
        wait_until(lambda: server.stats()["restarts"] > restarts, what="the second crash")
        let_go("x")
        let_go("b2")
        status, body = x.result()
        assert (status, body) == (200, {"mark": "x", "hold": True})
        assert b2.result()[0] == 200  # a first attempt: retried once its worker died
        assert second.result()[0] == 500


def test_the_log_names_a_request_whose_items_a_batch_holds_once():
    """An inference request holding a batch of 3 items is 3 tasks: named once each, a batch of 7 read
    "requests X, X, X, Y, Z, Z, W"."""
    from easyserve.pipeline import named_ids

    assert named_ids(["X", "X", "X", "Y", "Z", "Z", "W"]) == "requests X (x3), Y, Z (x2), W"
    assert named_ids(["X"]) == "request X" and named_ids(["X", "X"]) == "requests X (x2)"
