"""Workers that go bad are replaced between batches, and nothing they held is lost."""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import signal
import threading
import time
from typing import Iterator

import pytest
from conftest import caught, post_json, request, wait_until
from test_robustness import wait_for

from easyserve import records
from easyserve.errors import ConfigError, StartupError


def test_a_leaking_worker_is_replaced_once_past_max_worker_memory(serve):
    with serve("handles_ops:Leaky", HandleArgs={"mb": 40}, MaxWorkerMemoryMB=150) as server:
        answers = [post_json(server.url + "/predict", {"n": i}) for i in range(12)]
        assert [status for status, _ in answers] == [200] * 12
        assert [body["n"] for _, body in answers] == list(range(12))
        pids = [body["pid"] for _, body in answers]
        assert len(set(pids)) >= 3  # about every third batch takes a worker past 150 MB
        # once idle: the last batch may have taken its worker past the bound too, and replaced it
        # (a loaded machine read /stats after that; a quiet one, before)

        def idle() -> dict | None:
            worker = request(server.url + "/stats")[2]["workers"][0]
            return worker if worker["state"] == "idle" else None

        worker = wait_until(idle, 30, "the worker idle")
        replaced_last = worker["pid"] != pids[-1]
        assert worker["recycled"] == len(set(pids)) - 1 + replaced_last and worker["restarts"] == 0, (worker, pids)
        assert worker["rss_mb"] < 150 + 40


def set_up_mb(serve) -> float:
    """The memory a Leaky worker holds once set up, before any batch, on this machine (for a bound above it)."""
    if not _SET_UP_MB:
        with serve("handles_ops:Leaky", HandleArgs={"mb": 0}) as server:
            _SET_UP_MB.append(server.workers[0]["rss_mb"])
    return _SET_UP_MB[0]


_SET_UP_MB: list[float] = []


def test_a_limit_below_what_a_worker_holds_once_set_up_fails_the_start(serve):
    """MaxWorkerMemoryMB below the memory a worker holds once set up replaced it after every batch (its
    model loaded again each time: 1.5 requests a second), with /ready at 200 and one warning; now the
    start fails, saying the worker's memory, the bound and what to set."""
    with pytest.raises(ConfigError) as failed, serve("handles_ops:Leaky", HandleArgs={"setup_mb": 60},
                                                     MaxWorkerMemoryMB=set_up_mb(serve) + 30):
        pass
    message = str(failed.value)
    held = int(re.search(r"holds (\d+) MB once its handle is set up", message).group(1))
    assert held > set_up_mb(serve) + 30, message
    assert f"MaxWorkerMemoryMB={set_up_mb(serve) + 30:g}" in message
    assert f"set MaxWorkerMemoryMB above {held}" in message
    assert message.startswith("worker cpu/0 holds"), message


def test_a_reload_to_a_handle_above_max_worker_memory_once_set_up_fails(serve):
    with serve("handles_ops:Leaky", HandleArgs={"mb": 0}, MaxWorkerMemoryMB=set_up_mb(serve) + 30) as server:
        pid = server.workers[0]["pid"]
        with pytest.raises(StartupError) as failed:
            server.reload(HandleArgs={"mb": 0, "setup_mb": 60})
        message = str(failed.value)
        assert "could not start the new handle: it holds" in message, message
        assert "set MaxWorkerMemoryMB above" in message, message
        assert "Hint" not in message  # not a process killed without a traceback: the server ended it, and says why
        status, body = post_json(server.url + "/predict", {"n": 1})
        assert status == 200 and body["pid"] == pid  # the old handle serves on
        wait_until(lambda: len(server.workers) == 1, 10, "the new handle's worker gone")
        assert [w["pid"] for w in server.workers] == [pid]


@pytest.mark.parametrize("pipeline", [False, True])
def test_a_worker_is_judged_by_what_it_keeps_not_by_the_batch_it_just_answered(serve, pipeline):
    """A handle that keeps nothing, fed 12 MB bodies: its memory was read while the batch was alive (its
    bodies, their decoded text), 110 MB for 38 between batches, and it was replaced after each batch."""
    bound = set_up_mb(serve) + 25
    with serve("handles_ops:Leaky", HandleArgs={"mb": 0}, MaxWorkerMemoryMB=bound, MaxBatchSize=4, MaxWaitMs=50,
               Pipeline=pipeline) as server:
        pid = server.workers[0]["pid"]
        for _ in range(4):
            answers: list = [None] * 4

            def send(i: int) -> None:
                answers[i] = post_json(server.url + "/predict", {"n": i, "pad": "x" * (12 * 2**20)})

            senders = [threading.Thread(target=send, args=(i,)) for i in range(4)]
            for sender in senders:
                sender.start()
            for sender in senders:
                sender.join()
            assert [(status, body["n"]) for status, body in answers] == [(200, i) for i in range(4)]
        assert server.workers[0]["recycled"] == 0, server.workers
        assert {body["pid"] for _, body in answers} == {pid} and server.workers[0]["pid"] == pid
        assert server.workers[0]["rss_mb"] < bound


def test_a_pipelined_worker_gives_back_a_large_body_it_received_in_its_own_thread(serve):
    """With Pipeline, batches are received in a thread of their own, whose allocator arena kept a freed
    15 MB body resident (glibc's trim gives back the top of the main arena alone): a handle keeping
    nothing read 66 MB for 38, and was replaced after every other body, its model loaded again."""
    bound = set_up_mb(serve) + 10
    with serve("handles_ops:Leaky", HandleArgs={"mb": 0}, MaxWorkerMemoryMB=bound, Pipeline=True) as server:
        pid = server.workers[0]["pid"]
        answers = [post_json(server.url + "/predict", {"n": i, "pad": "x" * (15 * 2**20)}) for i in range(6)]
        assert [(status, body["n"]) for status, body in answers] == [(200, i) for i in range(6)]
        assert server.workers[0]["recycled"] == 0 and server.workers[0]["pid"] == pid, server.workers


def test_workers_past_max_worker_memory_are_replaced_one_at_a_time(serve, caplog):
    """Two workers that leak alike cross the bound within a batch of each other: both were replaced at
    once, and for the model's load no worker served (while /ready said 200). Now one at a time: the
    other serves on until the first is back, unless it runs away (past 1.5 times the bound)."""
    caplog.set_level(logging.INFO, logger="easyserve")
    args = {"mb": 2, "s": 0.05, "setup_s": 0.5}
    bound = set_up_mb(serve) + 40
    with serve("handles_ops:Leaky", HandleArgs=args, ProcessPerGPU=2, MaxBatchSize=1,
               MaxWorkerMemoryMB=bound) as server, _loaded(server) as answers:
        wait_until(lambda: sum(w["recycled"] for w in server.workers) >= 6, 60, "six replacements")
    assert set(answers) == {200}, collections.Counter(answers)
    replacing: set[str] = set()  # slots being replaced, from "replacing worker" to "worker ... ready"
    overlaps = []
    for record in caught(caplog):
        said = record.getMessage()
        replaced = re.match(r"replacing worker (\S+) \(pid \d+\): its memory", said)
        if replaced:
            if replacing and "times it" not in said:  # a runaway goes whatever else is being replaced
                overlaps.append(said)
            replacing.add(replaced.group(1))
        ready = re.match(r"worker (\S+) ready", said)
        if ready:
            replacing.discard(ready.group(1))
    assert not overlaps, overlaps
    assert "is to be replaced (its memory" in caplog.text  # one waited for the other at least once


def test_max_batches_per_worker_recycles_workers_and_loses_nothing(serve):
    with serve("handles_ops:Slow", HandleArgs={"s": 0}, MaxBatchesPerWorker=3) as server:
        pids = []
        for i in range(12):
            status, body = post_json(server.url + "/predict", {"n": i})
            assert status == 200 and body["n"] == i
            pids.append(body["pid"])
        # three batches each (3 is below the 10% jitter's first step): four processes in turn
        assert [len(set(pids[i:i + 3])) for i in range(0, 12, 3)] == [1, 1, 1, 1]
        assert len(set(pids)) == 4
        assert server.workers[0]["recycled"] == 4 or server.workers[0]["state"] == "retiring"


def test_a_handle_raising_memory_error_gets_its_worker_replaced_and_the_request_retried(serve, tmp_path):
    marker = tmp_path / "oom-once"
    with serve("handles_ops:Leaky", ProcessPerGPU=2) as server:
        status, body = post_json(server.url + "/predict", {"n": 1, "oom": str(marker)})
        assert status == 200 and body["n"] == 1  # retried on a fresh worker, which had memory
        assert wait_for(lambda: sum(w["restarts"] for w in server.workers) == 1, 10), server.workers
        assert "MemoryError: cannot allocate 4.0 GiB" in str(server.logs(tail=None))
        # one that runs out of memory everywhere fails alone, and says why
        status, body = post_json(server.url + "/predict", {"n": 2, "oom": True})
        assert status == 500 and "ran out of memory (its handle raised MemoryError)" in body["error"]
        assert post_json(server.url + "/predict", {"n": 3})[0] == 200
        # and so does one whose answer runs out of memory as it is encoded: it said "exited with code 1"
        status, body = post_json(server.url + "/predict", {"n": 4, "oom": "answer"})
        assert status == 500 and "ran out of memory (its handle raised MemoryError)" in body["error"], body
        assert post_json(server.url + "/predict", {"n": 5})[0] == 200


def test_a_retried_request_that_reaches_its_deadline_leaves_the_queue(serve, tmp_path):
    marker = tmp_path / "slow-restart"
    args = {"s": 1.0, "slow_restart": str(marker), "restart_s": 4}
    with serve("handles_ops:Slow", HandleArgs=args, TimeoutS=2) as server:
        answer: list = []
        sender = threading.Thread(target=lambda: answer.append(post_json(server.url + "/predict", {"n": 1})))
        sender.start()
        assert wait_for(lambda: server.workers[0]["state"] == "busy", 5)
        marker.touch()  # the replacement takes 4 s to load: the retry waits in the queue past TimeoutS
        os.kill(server.workers[0]["pid"], signal.SIGKILL)
        sender.join(10)
        status, body = answer[0]
        assert status == 504 and "in the queue" in body["error"]
        stats = request(server.url + "/stats")[2]
        assert stats["queue_depth"] == 0 and stats["timeouts"] == 1
        # nothing left to answer: a drain does not wait for the slow replacement
        assert wait_for(lambda: request(server.url + "/ready")[0] == 200, 10)


@contextlib.contextmanager
def _loaded(server, clients: int = 4) -> Iterator[list[int]]:
    """``clients`` threads posting to ``server`` one request after another while the block runs; the
    statuses they got, in the list it yields."""
    done = threading.Event()
    answers: list[int] = []

    def load() -> None:
        while not done.is_set():
            answers.append(post_json(server.url + "/predict", {"n": 1})[0])

    senders = [threading.Thread(target=load) for _ in range(clients)]
    for sender in senders:
        sender.start()
    try:
        yield answers
    finally:
        done.set()
        for sender in senders:
            sender.join()


def test_the_api_key_is_not_in_the_workers_environment(serve, monkeypatch):
    monkeypatch.setenv("EASYSERVE_API_KEY", "a-key-the-workers-must-not-see")
    with serve("handles_ops:Noisy") as server:
        status, _, body = request(server.url + "/predict", b'{"n": 1}', {
            "Authorization": "Bearer a-key-the-workers-must-not-see", "Content-Type": "application/json"})
        assert status == 200 and body["n"] == 1 and body["env_key"] is None


def test_ready_stays_200_while_workers_are_replaced_on_purpose(serve):
    with serve("handles_ops:Slow", HandleArgs={"s": 0.01}, ProcessPerGPU=2, MaxBatchesPerWorker=1) as server:
        polls = []
        deadline = time.monotonic() + 30
        with _loaded(server) as answers:  # 40 polls at least, and until replacements happened meanwhile
            while len(polls) < 40 or (sum(w["recycled"] for w in server.workers) < 4 and time.monotonic() < deadline):
                polls.append(request(server.url + "/ready")[0])
                time.sleep(0.05)
        assert sum(w["recycled"] for w in server.workers) >= 4
    assert set(answers) == {200} and set(polls) == {200}, (collections.Counter(answers), collections.Counter(polls))


def test_a_worker_whose_memory_grows_without_a_bound_set_is_warned_of_once(serve, caplog, monkeypatch):
    """Without MaxWorkerMemoryMB a leak grew unseen until the kernel's out-of-memory killer ended the
    worker. Past twice what it held after its largest batch (and 500 MB more: here 20), it is said once a
    slot; not what a first batch, or a larger one, takes once (a model's arena: here 60 MB)."""
    import easyserve.pool

    monkeypatch.setattr(easyserve.pool, "GROWING_MB", 20.0)
    for leak, once, bound in ((0, 60, None), (10, 0, None), (10, 0, 10_000)):
        caplog.clear()
        args = {"mb": leak, "first_mb": once}
        with serve("handles_ops:Leaky", HandleArgs=args, MaxWorkerMemoryMB=bound) as server:
            for n in range(12):
                assert post_json(server.url + "/predict", {"n": n})[0] == 200
            held = server.workers[0]["rss_mb"]
        said = [r.getMessage() for r in caught(caplog) if "between batches" in r.getMessage()]
        if leak and bound is None:
            assert len(said) == 1 and re.fullmatch(r"worker cpu/0 holds \d+ MB between batches, \d+ MB after its "
                                                   r"largest batch \(1 requests\) \d+ batches ago: should it grow "
                                                   r"on, a leak .* losing no request", said[0]), said
            assert held > 2 * set_up_mb(serve)
        else:  # a first batch's memory, taken once; or a bound set, which replaces the worker
            assert said == [], said
            assert once == 0 or held > set_up_mb(serve) + once


def test_requests_that_kill_workers_do_not_slow_the_restarts_of_everyone_else(serve, caplog):
    # Each of these requests makes its worker raise MemoryError, twice (it is retried once). Those
    # deaths are the requests' doing: the workers come back at once, with no crash-loop backoff, and
    # answer the request that follows each.
    with serve("handles_ops:Leaky") as server:
        for n in range(3):
            status, body = post_json(server.url + "/predict", {"n": 1, "oom": True})
            assert status == 500 and "ran out of memory" in body["error"]
            status, body = post_json(server.url + "/predict", {"n": n}, timeout=10)
            assert status == 200 and body["n"] == n
        assert server.workers[0]["restarts"] == 6
    records.flush()
    assert "keeps dying before it answers anything" not in caplog.text


def test_a_pipelined_worker_under_steady_load_is_replaced_at_max_worker_memory_not_past_it(serve, caplog):
    """With Pipeline on, the worker's reading after a batch was taken as the next batch, handed at once
    to the idle worker, arrived: every reading held a batch, none counted, and a leaking worker was
    replaced only past 1.5 times MaxWorkerMemoryMB (the runaway's ceiling), never at the bound."""
    caplog.set_level(logging.INFO, logger="easyserve")
    bound = set_up_mb(serve) + 30
    with serve("handles_ops:Leaky", HandleArgs={"mb": 2, "s": 0.02}, MaxBatchSize=1, Pipeline=True,
               MaxWorkerMemoryMB=bound) as server, _loaded(server, clients=2) as answers:
        wait_until(lambda: server.workers[0]["recycled"] >= 3, 60, "three replacements")
    assert set(answers) == {200}, collections.Counter(answers)
    replaced = [r.getMessage() for r in caught(caplog) if r.getMessage().startswith("replacing worker")]
    assert replaced and not [said for said in replaced if "times it" in said], replaced
