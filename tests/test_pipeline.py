"""A worker's data path: preprocess and postprocess on threads, and the next batch prepared while
forward runs the current one. Checked from what the handle writes down (which thread, which batch,
when), never from how long anything took."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import Background, post_json, post_many, request, wait_busy, wait_queued, wait_until

from easyserve import Server


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
