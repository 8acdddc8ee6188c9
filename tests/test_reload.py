"""Hot reload: workers replaced one at a time with a new handle or HandleArgs, nothing refused or failed."""

from __future__ import annotations

import collections
import contextlib
import importlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import textwrap
import traceback
from pathlib import Path
from typing import Any, Iterator

import pytest
from conftest import Background, caught, http, post_json, post_many, request, wait_until, worker_children
from test_cli import easyserve, wait_for_url
from test_robustness import wait_for

from easyserve import ConfigError, StartupError


def test_a_reload_under_load_fails_no_request(serve):
    with serve("handles_ops:Versioned", HandleArgs={"version": 1}, ProcessPerGPU=2, MaxBatchSize=4) as server:
        old_pids = {w["pid"] for w in server.workers}
        stop = threading.Event()
        answers: list = []

        def client(k: int) -> None:
            i = 0
            while not stop.is_set():
                i += 1
                answers.append(post_json(server.url + "/predict", {"n": k * 100_000 + i}))

        clients = [threading.Thread(target=client, args=(k,)) for k in range(6)]
        for c in clients:
            c.start()
        polls = []
        try:
            assert wait_for(lambda: len(answers) > 20, 10)
            reloader = threading.Thread(target=server.reload, kwargs={"HandleArgs": {"version": 2}})
            reloader.start()
            while reloader.is_alive():
                polls.append(request(server.url + "/ready")[0])
            reloader.join()
            during = len(answers)
            assert wait_for(lambda: len(answers) > during + 20, 10)
        finally:
            stop.set()
            for c in clients:
                c.join()
        statuses = collections.Counter(status for status, _ in answers)
        assert statuses == {200: len(answers)}, statuses
        versions = [body["version"] for _, body in answers]
        assert versions[0] == 1 and versions[-1] == 2 and set(versions) == {1, 2}
        assert set(polls) == {200}  # a load balancer never takes it out of rotation
        assert not old_pids & {w["pid"] for w in server.workers} and len(server.workers) == 2
        assert server.config.handle_args == {"version": 2}
        assert post_json(server.url + "/predict", {"n": 0})[1]["version"] == 2


def test_each_slots_restarts_and_batches_go_on_across_a_reload(serve):
    """The dashboard's worker table showed a slot's restarts and batches back at 0 after a reload, beside
    totals that kept the run's: the slot's counts go on with the worker that takes its place."""
    with serve("handles_ops:Versioned", HandleArgs={"version": 1}, ProcessPerGPU=2) as server:
        for i in range(6):
            assert post_json(server.url + "/predict", {"n": i})[0] == 200
        victim = server.workers[0]
        os.kill(victim["pid"], signal.SIGKILL)
        assert wait_for(lambda: server.workers[0]["restarts"] == 1 and server.workers[0]["state"] == "idle", 30)
        assert post_json(server.url + "/predict", {"n": 7})[0] == 200
        before = server.stats()
        server.reload(HandleArgs={"version": 2})
        after = server.stats()
        assert after["restarts"] == before["restarts"] == 1 and after["batches"] == before["batches"] == 7
        slots = {w["name"]: (w["restarts"], w["batches"]) for w in after["workers"]}
        assert slots == {w["name"]: (w["restarts"], w["batches"]) for w in before["workers"]}, (before, after)
        assert sum(restarts for restarts, _ in slots.values()) == 1 and sum(b for _, b in slots.values()) == 7


def test_a_new_handle_that_cannot_start_leaves_the_old_one_serving(serve):
    with serve("handles_ops:Versioned", HandleArgs={"version": 1}, ProcessPerGPU=2) as server:
        pids = sorted(w["pid"] for w in server.workers)
        with pytest.raises(StartupError, match="could not start the new handle") as raised:
            server.reload(handle="handles_for_tests:BrokenSetup", HandleArgs={"model": "gone.onnx"})
        assert "Traceback" in str(raised.value) and "model file 'gone.onnx' not found" in str(raised.value)
        # the hint a start gives under its traceback, which a reload's lacked
        assert str(raised.value).endswith("\nHint: the traceback above comes from the handle's __init__ or setup; "
                                          "check what it loads (a model path in HandleArgs, or the .onnx file "
                                          "served)."), str(raised.value)
        assert [frame.name for frame in traceback.extract_tb(raised.value.__traceback__)][1:] == ["reload"]
        assert sorted(w["pid"] for w in server.workers) == pids
        assert request(server.url + "/ready")[0] == 200
        assert post_json(server.url + "/predict", {"n": 1})[1]["version"] == 1
        assert server.config.handle_args == {"version": 1}
        # one whose worker dies without a traceback: its last lines, not those of the worker it was to replace
        with pytest.raises(StartupError, match="could not start the new handle") as raised:
            server.reload(handle="handles_for_tests:DiesQuietly", HandleArgs={})
        assert "exited with code 1 before it was ready\n\nIts last lines:\n  loading weights\n  CUDA error: " \
               "out of memory\n" in str(raised.value), str(raised.value)
        assert "\nHint: a process that ends without a traceback was killed (out of memory" in str(raised.value)
        # and a good reload afterwards works
        server.reload(HandleArgs={"version": 3})
        assert post_json(server.url + "/predict", {"n": 2})[1]["version"] == 3


def test_a_new_handle_that_is_the_configs_fault_is_said_as_a_start_says_it_without_a_traceback(serve):
    """A SIGHUP to a handle whose forward is misspelt said the config's one line under a traceback of
    easyserve's own loader, and a hint to look at what the handle loads: the start says the line alone."""
    with serve("handles_ops:Versioned", HandleArgs={"version": 1}) as server:
        with pytest.raises(StartupError) as raised:
            server.reload(handle="handles_for_tests:NoForward")
        assert str(raised.value) == ("worker cpu/0 could not start the new handle: Handle: NoForward defines no "
                                     "forward(self, batch) (nor run_batch): it would answer no request")
        with pytest.raises(StartupError) as raised:  # the method's name nearly right: said which
            server.reload(handle="handles_for_tests:MisspeltForward")
        assert str(raised.value).endswith("it would answer no request (did you mean forward, not foward?)")
        assert post_json(server.url + "/predict", {"n": 1})[1]["version"] == 1


def test_a_second_reload_while_a_replaced_worker_finishes_its_batch_adds_no_worker(serve, monkeypatch):
    """A reload waits a while for each worker it replaced to exit, then is done; one still finishing a
    long batch was still in the pool, and the next reload replaced it as well: a model copy more for
    good, one per reload."""
    from easyserve import reload as reloading

    monkeypatch.setattr(reloading, "STOP_GRACE_S", 0.25)  # the wait for the replaced worker to exit
    with serve("handles_for_tests:Misbehaving", GPUs="cpu", ProcessPerGPU=1) as server:
        # long enough for two reloads (two worker starts) on a loaded machine
        long = Background(lambda: post_json(server.url + "/predict", {"sleep": 6}))
        assert wait_for(lambda: server.workers[0]["state"] == "busy", 10)
        server.reload()
        # the replaced worker, finishing its batch, is no slot of its own: sum(easyserve_workers) said 2
        assert [(w["state"], w.get("leaving", False)) for w in server.workers] == [("busy", True), ("idle", False)]
        metrics = _text(server.url + "/metrics")
        assert sum(float(v) for v in re.findall(r'^easyserve_workers\{state="\w+"\} (\S+)$', metrics, re.M)) == 1
        assert "easyserve_workers_leaving 1.0" in metrics
        assert "workers=1/1 ready [cpu/0 busy (leaving), cpu/0 idle]" in repr(server)
        server.reload()
        assert long.result(30)[0] == 200
        wait_for(lambda: len(server.workers) == 1, 10)
        time.sleep(0.5)  # nothing more is started
        assert [w["state"] for w in server.workers] == ["idle"], server.workers
        assert server.stats()["workers"] == server.workers


def test_a_reload_whose_workers_die_before_answering_anything_is_rolled_back(serve, caplog):
    """A new handle whose setup runs but whose first batch ends its process (a model that loads, then
    segfaults) made a reload that succeeded: every request after it ended a worker, for ever. Three deaths
    before any batch is answered roll it back, and the requests it ended workers under run on the old handle
    (the first was answered 500 after two deaths, which were the handle's doing, not the request's); no
    death once the new handle has answered rolls it back."""
    with serve(ProcessPerGPU=2, MaxBatchSize=1) as server:
        url = server.url + "/predict"
        assert post_json(url, {"value": 1})[0] == 200
        server.reload(handle="handles_for_tests:CrashesOnEveryBatch")  # its setup runs: the reload is done
        assert server.stats()["last_reload"]["outcome"] == "done"
        with pytest.raises(StartupError):  # a reload that fails puts it back, on probation still
            server.reload(handle="handles_for_tests:BrokenSetup")
        last = server.stats()["last_reload"]  # what /stats says of it, where SIGHUP's outcome was in the log alone
        assert (last["handle"], last["outcome"]) == ("handles_for_tests:BrokenSetup", "failed"), last
        assert last["error"] and time.time() - 60 < last["at"] <= time.time(), last
        first = post_json(url, {"value": 2})  # ends a worker, then its retries' twice: the old handle serves it
        assert first[0] == 200 and first[1]["value"] == 2, first
        assert [post_json(url, {"value": v})[1]["value"] for v in (3, 4, 5, 6)] == [3, 4, 5, 6]
        said = server.stats()["reload_rolled_back"]
        assert said.startswith("the reload to ") and "CrashesOnEveryBatch" in said and "Recorder" in said, said
        last = server.stats()["last_reload"]
        assert (last["handle"], last["outcome"], last["error"]) == ("handles_for_tests:CrashesOnEveryBatch",
                                                                    "rolled back", said), last
        assert "died 3 times before answering any batch" in said and said in caplog.text
        assert "Recorder" in repr(server)  # the server says what serves
        wait_until(lambda: [w["state"] for w in server.workers] == ["idle", "idle"], what="both workers back")
        # a handle that has answered is kept, though a request then ends two workers: that is the request's doing
        server.reload(handle="handles_for_tests:Crashing")
        assert server.stats()["reload_rolled_back"] is None
        assert post_json(url, {"n": 1})[0] == 200
        assert post_json(url, {"die": "exit"})[0] == 500
        assert post_json(url, {"n": 1})[0] == 200
        assert post_json(url, {"die": "exit"})[0] == 500
        assert server.stats()["reload_rolled_back"] is None and "Crashing" in repr(server)


def test_a_handle_that_answered_during_a_later_reload_that_failed_is_not_rolled_back_after(serve):
    """A reload's handle answered while a second reload, begun before it had, set up and failed: it was put
    back on probation all the same, and one request that ended its workers then rolled it back, "before
    answering any batch"."""
    with serve(MaxBatchSize=1) as server:
        url = server.url + "/predict"
        server.reload(handle="handles_for_tests:Crashing")
        second = Background(lambda: server.reload(handle="handles_ops:SetsUpByGpu",
                                                  HandleArgs={"setup_s": {"": 2}, "fails_on": [""]}))
        wait_until(lambda: any(w["state"] == "starting" for w in server.workers), what="the second reload's worker")
        assert post_json(url, {"n": 1})[0] == 200  # the first reload's handle, while the second's sets up
        with pytest.raises(StartupError, match="CUDA out of memory"):
            second.result()
        assert post_json(url, {"die": "exit"})[0] == 500  # the request's doing: it ran twice, and no more
        assert server.stats()["reload_rolled_back"] is None and "Crashing" in repr(server)
        last = server.stats()["last_reload"]  # the error's own line, not the hint after it
        assert (last["outcome"], last["error"]) == ("failed", "MemoryError: CUDA out of memory on GPU"), last


def test_the_deaths_of_a_reloads_new_handle_are_never_taken_for_the_machines_fault(serve, caplog):
    """A burst after a reload to a handle whose every batch ends its process: its deaths, three of requests
    on their first run, rolled it back and also made the server take the fault for its own, answering
    those requests 503 ("the server's fault"), where they run again on the old handle."""
    with serve(ProcessPerGPU=4, MaxBatchSize=1) as server:
        url = server.url + "/predict"
        server.reload(handle="handles_for_tests:CrashesOnEveryBatch")
        answers = post_many(url, [{"value": v} for v in range(8)], concurrency=8)
        assert server.stats()["reload_rolled_back"] is not None
        assert [(status, body["value"]) for status, body in answers] == [(200, v) for v in range(8)], answers
        wait_until(lambda: http("GET", server.url + "/ready")[0] == 200, what="ready")
    assert not [r for r in caught(caplog) if "batches in a row" in r.getMessage()]


def test_a_reload_whose_first_workers_die_on_their_batches_fails_at_three_deaths(serve, caplog):
    """A reload's first workers take batches while the others start: deaths were counted only once every
    worker had been replaced, so with 3 workers and a second's setup the reload said it was done after
    about 4 deaths, and 6 came before the rollback. They count from the first; the third fails the reload,
    whose workers start the old handle again."""
    with serve(ProcessPerGPU=3, MaxBatchSize=1, Pipeline=False) as server:
        url = server.url + "/predict"
        stop, statuses = threading.Event(), collections.Counter()

        def load() -> None:
            while not stop.is_set():
                statuses[post_json(url, {"value": 1})[0]] += 1
                time.sleep(0.05)

        threads = [threading.Thread(target=load) for _ in range(3)]
        for thread in threads:
            thread.start()
        try:
            with pytest.raises(StartupError) as failed:
                server.reload(handle="handles_for_tests:CrashesOnEveryBatchSlowly", HandleArgs={"setup_s": 1.5})
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        assert "the new handle's workers died 3 times before answering any batch" in str(failed.value)
        last = server.stats()["last_reload"]  # where the previous reload's "done" was said of this one
        assert (last["handle"], last["outcome"]) == ("handles_for_tests:CrashesOnEveryBatchSlowly", "failed"), last
        deaths = [r.getMessage() for r in caught(caplog) if "exited with code 3 while running" in r.getMessage()]
        assert 3 <= len(deaths) <= 4, deaths  # one more, at most: a batch already running as the third came
        assert "Recorder" in repr(server) and server.stats()["reload_rolled_back"] is None
        wait_until(lambda: [w["state"] for w in server.workers] == ["idle"] * 3, what="the workers back")
        assert [post_json(url, {"value": v})[1]["value"] for v in range(6)] == list(range(6))
        assert statuses[200] > 0 and set(statuses) <= {200, 500}, statuses


def test_a_reload_replaces_the_workers_of_each_gpu_in_turn_and_the_gpus_at_once(serve, fake_gpus, tmp_path):
    """One worker at a time for the whole machine: a reload of 8 GPUs with ProcessPerGPU 4 took 32 model
    loads end to end, where one copy more on each GPU at a time needs 4."""
    fake_gpus(2)
    journal = tmp_path / "journal"
    with serve("handles_ops:SetsUp", GPUs="0,1", ProcessPerGPU=2) as server:
        old = {w["pid"] for w in server.workers}
        server.reload(HandleArgs={"setup_s": 0.5, "journal": str(journal)})
        assert not old & {w["pid"] for w in server.workers} and len(server.workers) == 4
        assert post_json(server.url + "/predict", {})[0] == 200
    setups = [line.split() for line in journal.read_text().splitlines()]
    by_gpu = {gpu: sorted((float(began), float(ended)) for g, began, ended in setups if g == gpu) for gpu in "01"}
    assert [len(times) for times in by_gpu.values()] == [2, 2], setups
    for first, second in by_gpu.values():  # one model copy more on a GPU at a time
        assert first[1] <= second[0], by_gpu
    # the two GPUs at once: each one's first setup began before the other's first ended
    (a, _), (b, _) = by_gpu["0"], by_gpu["1"]
    assert a[0] < b[1] and b[0] < a[1], by_gpu


def _workers_by_gpu() -> collections.Counter:
    """This process's live workers, counted by the GPU each sees (CUDA_VISIBLE_DEVICES)."""
    found: collections.Counter = collections.Counter()
    for pid in worker_children():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        found.update(e.split(b"=", 1)[1].decode() for e in environ if e.startswith(b"CUDA_VISIBLE_DEVICES="))
    return found


def test_a_reload_that_fails_on_one_gpu_holds_no_more_copies_on_another_than_one_of_its_own_would(
        serve, fake_gpus):
    """GPU 1's new worker could not start while GPU 0's replaced worker still ran its batch: GPU 0's turn
    stopped waiting for it, and its put-back started the old handle beside it and the new one, two copies
    more than its slot (on a GPU sized for one more, the put-back is what runs out of memory)."""
    fake_gpus(2)
    with serve("handles_ops:SetsUpByGpu", GPUs="0,1", ProcessPerGPU=1, MaxBatchSize=1, Pipeline=False,
               HandleArgs={"forward_s": 3}) as server:
        url = server.url + "/predict"
        busy = [Background(lambda: post_json(url, {}, timeout=60)) for _ in range(2)]
        wait_until(lambda: all(w["state"] == "busy" for w in server.workers), what="both workers busy")
        peak: collections.Counter = collections.Counter()
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak.update({gpu: n - peak[gpu] for gpu, n in _workers_by_gpu().items() if n > peak[gpu]})
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            with pytest.raises(StartupError, match="CUDA out of memory on GPU 1"):
                server.reload(HandleArgs={"setup_s": {"0": 0.2, "1": 1.0}, "fails_on": ["1"]})
            wait_until(lambda: [w["state"] for w in server.workers] == ["idle"] * 2, what="the old handle back")
        finally:
            done.set()
            sampler.join()
        assert [b.result(30)[0] for b in busy] == [200, 200]
        assert post_json(url, {}, timeout=30)[0] == 200
    assert peak["0"] <= 2, peak


def test_a_rollback_follows_a_first_batch_refused_before_the_model_and_goes_back_to_the_last_handle_that_answered(
        serve):
    # a first batch of requests refused in preprocess (a 400: the model never ran) ended the probation,
    # and the crashing handle was kept for good; and of two bad reloads in a row, the second was rolled
    # back to the first, itself never seen to answer, and kept for good
    with serve(ProcessPerGPU=2, MaxBatchSize=1) as server:
        url = server.url + "/predict"
        assert post_json(url, {"value": 1})[0] == 200
        server.reload(handle="handles_for_tests:CrashesOnEveryBatch")
        assert post_json(url, {"refuse": True})[0] == 400
        assert post_json(url, {"value": 2})[1]["value"] == 2  # three deaths: rolled back, the retry answered
        assert "Recorder" in server.stats()["reload_rolled_back"]
        server.reload(handle="handles_for_tests:CrashesOnEveryBatch")
        server.reload(handle="handles_for_tests:CrashesOnEveryBatchToo")
        assert [post_json(url, {"value": v})[1]["value"] for v in (4, 5)] == [4, 5]
        said = server.stats()["reload_rolled_back"]
        assert said.startswith("the reload to handles_for_tests:CrashesOnEveryBatchToo was rolled back to "
                               "handles_for_tests:Recorder"), said
        assert [post_json(url, {"value": v})[1]["value"] for v in (6, 7)] == [6, 7] and "Recorder" in repr(server)


def test_a_new_handle_whose_model_ran_is_kept_though_it_answers_only_404s_and_workers_die_later(serve):
    # a handle that answers 404 by design (a lookup) stayed on probation for ever, ended by a 200 alone:
    # three deaths of any cause, hours later (the OOM killer), rolled it back to the handle before
    with serve(ProcessPerGPU=1, MaxBatchSize=1) as server:
        server.reload(handle="handles_for_tests:NotFoundByDesign")
        assert [post_json(server.url + "/predict", {"k": k})[0] for k in range(3)] == [404, 404, 404]
        for _ in range(3):
            wait_until(lambda: server.workers[0]["state"] == "idle", 30, "a worker ready")
            os.kill(server.workers[0]["pid"], signal.SIGKILL)
            wait_until(lambda: server.workers[0]["state"] != "idle", 10, "the death seen")
        wait_until(lambda: server.workers[0]["state"] == "idle", 30, "a worker ready")
        assert post_json(server.url + "/predict", {"k": 9})[0] == 404
        assert server.stats()["reload_rolled_back"] is None and "NotFoundByDesign" in repr(server)


def test_a_worker_that_cannot_be_put_back_stops_and_its_slot_retries_the_old_handle(serve, tmp_path):
    """A reload that failed on its second worker put the first back on the old handle; when that failed
    too (its model file gone), the first went on serving the new handle beside the old: two versions
    behind one endpoint, while the error said the old handle served."""
    marker, counter = tmp_path / "old-cannot-start", tmp_path / "new-starts"
    with serve("handles_for_tests:FailsOnRestart", HandleArgs={"marker": str(marker)}, ProcessPerGPU=2) as server:
        old = [w["pid"] for w in server.workers]
        marker.touch()
        with pytest.raises(StartupError) as raised:
            server.reload(handle="handles_for_tests:StartsOnce", HandleArgs={"counter": str(counter)})
        message = str(raised.value)
        assert "could not start the new handle" in message
        assert re.search(r"Worker cpu/\d could not be put back on the old handle: .*GPU out of memory while loading "
                         r"weights.*its slot starts it again", message, re.DOTALL), message
        # the new handle's worker has gone: every answer is the old handle's
        wait_for(lambda: sum(w["state"] == "idle" for w in server.workers) == 1, 10)
        pids = {post_json(server.url + "/predict", {"value": i})[1]["pid"] for i in range(20)}
        assert len(pids) == 1 and pids <= set(old), (pids, old)
        assert server.config.handle == "handles_for_tests:FailsOnRestart"
        # its slot retries the old handle, which starts once it can: two workers again
        marker.unlink()
        wait_for(lambda: [w["state"] for w in server.workers] == ["idle", "idle"], 15)
        assert len({post_json(server.url + "/predict", {"value": i})[1]["pid"] for i in range(40)}) == 2


def test_a_reload_done_as_its_timeout_runs_out_says_so_not_that_it_was_abandoned(serve, caplog):
    # the timeout ran out while the worker it replaced still finished a long batch: the log said
    # "reload abandoned", and reload() returned as done, with the new handle serving
    with serve("handles_ops:Versioned", HandleArgs={"version": 1, "s": 4}, MaxBatchSize=1) as server:
        long = Background(lambda: post_json(server.url + "/predict", {"n": 1}, timeout=30))
        wait_until(lambda: server.workers[0]["state"] == "busy", 10)
        with caplog.at_level(logging.INFO, logger="easyserve"):
            server.reload(timeout=2, HandleArgs={"version": 2})
        assert long.result(30)[1]["version"] == 1
        assert post_json(server.url + "/predict", {"n": 2})[1]["version"] == 2
    assert "reload out of time (timeout=2s): abandoning it" in caplog.text
    assert "the reload was done before it could be abandoned: the new handle serves" in caplog.text, caplog.text


def serves_only(server, version: int, workers: int) -> None:
    """``server`` has ``workers`` workers, all ready and all on ``version``, by 20 requests and its config."""
    assert len(server.workers) == workers and all(w["state"] == "idle" for w in server.workers), server.workers
    assert {post_json(server.url + "/predict", {"n": i})[1]["version"] for i in range(20)} == {version}
    assert server.config.handle_args["version"] == version


@pytest.mark.parametrize("stopped_by", ["timeout", "interrupt"])
def test_a_reload_abandoned_puts_back_the_old_handle(serve, stopped_by):
    # A reload that timed out, or that a notebook's interrupt stopped, went on in the background: a
    # second worker on the new handle joined the one, and requests were split between the versions
    # while server.config named the old one.
    with serve("handles_ops:Versioned", HandleArgs={"version": 1}, ProcessPerGPU=2) as server:
        pids = {w["pid"] for w in server.workers}
        slow = {"HandleArgs": {"version": 2, "setup_s": 1.5}}  # each swap 1.5 s at least: 3 s for both
        if stopped_by == "timeout":
            with pytest.raises(StartupError, match=r"within reload\(timeout=2.5\); abandoned"):
                server.reload(timeout=2.5, **slow)
        else:
            threading.Timer(2.5, os.kill, (os.getpid(), signal.SIGINT)).start()
            with pytest.raises(KeyboardInterrupt) as interrupted:
                server.reload(**slow)
            # raised from reload() itself: not 3 kB of the waits it came through, in a notebook
            assert [frame.name for frame in traceback.extract_tb(interrupted.value.__traceback__)][1:] == ["reload"]
        serves_only(server, version=1, workers=2)
        time.sleep(2)  # the new handle's setup would be done by now
        serves_only(server, version=1, workers=2)
        assert len(pids & {w["pid"] for w in server.workers}) >= 1  # one at least was never replaced
        server.reload(HandleArgs={"version": 3})
        serves_only(server, version=3, workers=2)


def test_a_reload_after_one_interrupted_twice_waits_for_its_rollback(serve):
    # A second interrupt leaves the rollback going on in the background; a reload started then ran
    # beside it, and the server ended with three workers for ProcessPerGPU=2
    with serve("handles_ops:Versioned", HandleArgs={"version": 1, "setup_s": 1}, ProcessPerGPU=2) as server:
        old = {w["pid"] for w in server.workers}
        rolling_back = threading.Event()

        class Watch(logging.Handler):
            def emit(self, record):
                if "putting back the 1 worker(s)" in record.getMessage():
                    rolling_back.set()

        def interrupt_twice() -> None:
            # once the first worker runs the new handle and the second's successor is starting (not
            # after: with both successors up and the second old worker leaving, there were three
            # workers too, and an interrupt then came after the reload had finished, with nothing
            # to put back: a CI run on a loaded machine failed so)
            # (a new worker has no pid until its process is started: .get, or a KeyError ended this thread
            # and the test waited for an interrupt that never came, as a CI run saw)
            wait_for(lambda: any(w["state"] == "idle" and w.get("pid") not in old for w in server.workers) and any(
                w["state"] == "starting" and w.get("pid") not in old for w in server.workers), 30)
            os.kill(os.getpid(), signal.SIGINT)
            if rolling_back.wait(10):  # putting it back takes a second (setup_s): interrupt that wait too
                time.sleep(0.2)
                os.kill(os.getpid(), signal.SIGINT)

        watch = Watch()
        logging.getLogger("easyserve").addHandler(watch)
        try:
            interrupter = threading.Thread(target=interrupt_twice)
            interrupter.start()
            with pytest.raises(KeyboardInterrupt):
                # 6 s a start: a loaded CI machine took the interrupter past the second one's 3 s, and the
                # reload was done before the interrupt came, with nothing to put back
                server.reload(HandleArgs={"version": 2, "setup_s": 6})
            interrupter.join()
        finally:
            logging.getLogger("easyserve").removeHandler(watch)
        assert rolling_back.is_set()
        server.reload(HandleArgs={"version": 3, "setup_s": 0})
        serves_only(server, version=3, workers=2)
        time.sleep(1.5)  # what a rollback left running would have started by now
        serves_only(server, version=3, workers=2)


def test_logs_during_a_reload_show_each_line_once(serve):
    # a worker being replaced shares its ring of lines with its successor: logs() and the dashboard
    # read it once for each, every line the slot ever printed twice
    with serve("handles_ops:Versioned", HandleArgs={"version": 1}) as server:
        old = server.workers[0]["pid"]
        reloader = threading.Thread(target=server.reload, kwargs={"HandleArgs": {"version": 2, "setup_s": 2}})
        reloader.start()
        try:
            assert wait_for(lambda: len(server.workers) == 2, 10)
            assert wait_for(lambda: any("version 2" in line.text for line in server.logs()), 10)
            texts = [line.text for line in server.logs(tail=None)]
            assert texts == [f"version 1 setting up in {old}", *texts[1:]] and len(texts) == 2, texts
            assert [line.text for line in server.logs("cpu/0", tail=None)] == texts
        finally:
            reloader.join()
        assert [line.text for line in server.logs()] == texts


def test_a_replacement_starting_during_a_reload_is_no_slot_of_its_own(serve):
    """sum(easyserve_workers) was 3 for 2 workers while a reload's new process started, and the card
    said "1/2 ready (cpu/0 idle, cpu/1 idle, cpu/0 starting)" of a server whose two workers served."""
    with serve("handles_ops:Versioned", HandleArgs={"version": 1}, ProcessPerGPU=2) as server:
        reloader = threading.Thread(target=server.reload, kwargs={"HandleArgs": {"version": 2, "setup_s": 2}})
        reloader.start()
        try:
            assert wait_for(lambda: len(server.workers) == 3, 10)
            metrics = _text(server.url + "/metrics")
            card, shown = repr(server), server._repr_html_()
            workers = server.workers
        finally:
            reloader.join()
    assert [(w["name"], w["state"], w.get("replacing", False)) for w in workers] == [
        ("cpu/0", "idle", False), ("cpu/1", "idle", False), ("cpu/0", "starting", True)]
    slots = sum(float(v) for v in re.findall(r'^easyserve_workers\{state="\w+"\} (\S+)$', metrics, re.M))
    assert slots == 2 and "easyserve_workers_replacing 1.0" in metrics
    assert "workers=2/2 ready [cpu/0 idle, cpu/1 idle, cpu/0 starting (replacement)]" in card
    assert "workers 2/2 ready (" in shown and "starting</b> (replacement)" in shown, shown


def _text(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as answer:
        return answer.read().decode()


def test_reload_changes_only_the_handle_its_args_and_the_models_v2_name(serve):
    with serve("handles_ops:Versioned", HandleArgs={"version": 1}) as server:
        with pytest.raises(ConfigError, match="ProcessPerGPU needs stop"):
            server.reload(ProcessPerGPU=3)
        last = server.stats()["last_reload"]
        assert (last["handle"], last["outcome"]) == ("handles_ops:Versioned", "failed"), last
        assert "ProcessPerGPU" in last["error"], last
        server.reload(ModelName="m", ModelVersion="7")
        assert http("GET", server.url + "/v2/models/m/versions/7")[2]["versions"] == ["7"]
        # the YAML's spelling, as HandleArgs= is: "'Handle' and 'handle' name the same setting"
        server.reload(Handle="handles_ops:Versioned", HandleArgs={"version": 5})
        assert post_json(server.url + "/predict", {"n": 1})[1]["version"] == 5
    with pytest.raises(RuntimeError, match="needs a running server"):
        server.reload(HandleArgs={"version": 2})


def test_a_new_api_key_is_refused_by_reload_and_said_to_be_ignored_by_sighup(serve, tmp_path):
    """Every key is shown as *** in the config's dict, which the check compared: a reload to a new key
    (a leaked one rotated) was taken, the server's config said the new key, and the old one went on
    opening it."""
    old, new = {"Authorization": "Bearer old-key-12345"}, {"Authorization": "Bearer new-key-12345"}
    with serve("handles_ops:Versioned", ApiKey="old-key-12345") as server:
        with pytest.raises(ConfigError, match="ApiKey needs stop"):
            server.reload(ApiKey="new-key-12345")
        assert server.config.api_key == "old-key-12345"
        assert http("GET", server.url + "/stats", headers=old)[0] == 200
    config = tmp_path / "keyed.yaml"
    config.write_text('GPUs: cpu\nHandle: "handles_ops:Versioned"\nApiKey: old-key-12345\n')
    lines: list[str] = []
    with served_from_file(config, lines) as (proc, url):
        config.write_text('GPUs: cpu\nHandle: "handles_ops:Versioned"\nApiKey: new-key-12345\n')
        proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "reload done" in "".join(lines), 30), "".join(lines)
        assert "SIGHUP: ApiKey changed in" in "".join(lines) and "needs a restart, and is ignored" in "".join(lines)
        assert "new-key-12345" not in "".join(lines)
        assert http("GET", url + "/stats", headers=old)[0] == 200 and http("GET", url + "/stats", headers=new)[0] == 401
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_sighup_serves_the_new_weights_under_the_model_version_the_file_names(tmp_path):
    """A file edited for new weights and a new ModelVersion: SIGHUP ignored the version ("needs a
    restart") and reloaded the rest, so the new weights were served as the old version."""
    config = tmp_path / "versioned.yaml"
    config.write_text('GPUs: cpu\nHandle: "handles_ops:Versioned"\nHandleArgs: {version: 1}\nModelName: m\n')
    lines: list[str] = []
    with served_from_file(config, lines) as (proc, url):
        config.write_text('GPUs: cpu\nHandle: "handles_ops:Versioned"\nHandleArgs: {version: 2}\nModelName: m\n'
                          'ModelVersion: "2"\n')
        proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "reload done" in "".join(lines), 30), "".join(lines)
        assert "needs a restart" not in "".join(lines)
        assert http("GET", url + "/v2/models/m")[2]["versions"] == ["2"]
        assert http("GET", url + "/stats")[2]["last_reload"]["outcome"] == "done"
        config.write_text("GPUs: [cpu\n")  # no longer YAML: said in /stats, not in the log alone
        proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: http("GET", url + "/stats")[2]["last_reload"]["outcome"] == "failed", 30)
        assert http("GET", url + "/stats")[2]["last_reload"]["handle"] == str(config)
        assert http("GET", url + "/v2/models/m/versions/1")[0] == 404
        assert post_json(url + "/predict", {"n": 1})[1]["version"] == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


@contextlib.contextmanager
def served_from_file(config: Path, lines: list[str]) -> Iterator[tuple[subprocess.Popen, str]]:
    """``easyserve run config`` once it listens, its output gathered into ``lines``; killed after."""
    with easyserve("run", str(config), "--port", "0") as proc:
        try:
            url = wait_for_url(proc, lines)
            threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
            yield proc, url
        finally:
            proc.kill()


def test_sighup_after_a_deploy_replaced_the_servers_folder_reads_the_new_release(tmp_path):
    """`cd /srv/release && easyserve run server.yaml`, then a deploy removes the folder and puts the new
    release's in its place: every SIGHUP failed, "[Errno 2] No such file or directory", the relative path
    read against the folder removed."""
    release = tmp_path / "release"
    release.mkdir()
    versioned = 'GPUs: cpu\nHandle: "handles_ops:Versioned"\nHandleArgs: {{version: {}}}\n'
    (release / "server.yaml").write_text(versioned.format(1))
    lines: list[str] = []
    with easyserve("run", "server.yaml", "--port", "0", cwd=release) as proc:
        try:
            url = wait_for_url(proc, lines)
            threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
            assert post_json(url + "/predict", {"n": 1})[1]["version"] == 1
            for file in release.iterdir():
                file.unlink()
            release.rmdir()
            release.mkdir()
            (release / "server.yaml").write_text(versioned.format(2))
            proc.send_signal(signal.SIGHUP)
            assert wait_for(lambda: post_json(url + "/predict", {"n": 2})[1]["version"] == 2, 30), "".join(lines)
        finally:
            proc.kill()


def test_sighup_rereads_the_config_file_and_reloads(tmp_path):
    config = tmp_path / "versioned.yaml"
    config.write_text('GPUs: cpu\nHandle: "handles_ops:Versioned"\nHandleArgs: {version: 1}\n')
    lines: list[str] = []
    with served_from_file(config, lines) as (proc, url):
        assert post_json(url + "/predict", {"n": 1})[1]["version"] == 1
        config.write_text('GPUs: cpu\nHandle: "handles_ops:Versioned"\nHandleArgs: {version: 2}\n')
        proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: post_json(url + "/predict", {"n": 2})[1]["version"] == 2, 30), "".join(lines)
        # a file whose new handle fails: logged, and the server goes on with version 2
        config.write_text('GPUs: cpu\nHandle: "handles_for_tests:BrokenSetup"\n')
        proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "reload from" in "".join(lines), 30), "".join(lines)
        assert post_json(url + "/predict", {"n": 3})[1]["version"] == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_stop_during_a_reload_stops_at_once(serve):
    """A reload held the lock stop() waits for until its new workers had started (minutes, for a large
    model), and the port took requests meanwhile. stop() now abandons it, puts nothing back, and
    stops; reload() says why."""
    with serve("handles_ops:Versioned", HandleArgs={"version": 1}, ProcessPerGPU=2) as server:
        url = server.url
        failed: list[BaseException] = []

        def reload() -> None:
            try:
                server.reload(HandleArgs={"version": 2, "setup_s": 60})
            except BaseException as exc:
                failed.append(exc)

        reloading = threading.Thread(target=reload)
        reloading.start()
        wait_for(lambda: len(server.workers) == 3, 30)  # the first new worker is loading
        began = time.monotonic()
        server.stop(drain_timeout=5)
        took = time.monotonic() - began
        reloading.join(30)
    assert took < 30, f"stop() took {took:.1f}s"
    assert server.state == "stopped"
    with pytest.raises(OSError):
        request(url + "/health", timeout=2)
    assert len(failed) == 1 and isinstance(failed[0], StartupError) and "the server is stopping" in str(failed[0])


def _served_version(url: str) -> int | None:
    status, body = post_json(url + "/predict", {"n": 1})
    return body["version"] if status == 200 else None


def test_sigterm_during_a_sighup_reload_drains_at_once_and_more_sighups_queue_one_reload(tmp_path):
    config = tmp_path / "versioned.yaml"
    config.write_text('GPUs: cpu\nProcessPerGPU: 2\nHandle: "handles_ops:Versioned"\nHandleArgs: {version: 1}\n')
    lines: list[str] = []
    with served_from_file(config, lines) as (proc, url):
        config.write_text('GPUs: cpu\nProcessPerGPU: 2\nHandle: "handles_ops:Versioned"\n'
                          'HandleArgs: {version: 2, setup_s: 60}\n')
        # the first reload begins (its thread no longer waits to start), a second waits for it, and the
        # two after it find one waiting: each once the one before was taken (a slow start of the first's
        # thread, or two signals delivered as one, changed the count)
        proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "reloading 2 worker(s)" in "".join(lines), 20), "".join(lines)
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.2)
        for n in (1, 2):
            proc.send_signal(signal.SIGHUP)
            assert wait_for(lambda: "".join(lines).count("a reload already waits to start") >= n, 10), "".join(lines)
        assert "".join(lines).count("a reload already waits to start") == 2, "".join(lines)
        assert _served_version(url) == 1
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        took = time.monotonic() - began
    log = "".join(lines)
    assert took < 30 and "reload abandoned: the server is stopping" in log, log
    assert log.count("reloading 2 worker(s)") == 1 and "SIGHUP: no reload: the server is stopping" in log, log


def test_a_sighup_while_starting_reloads_once_ready(tmp_path):
    """The file edited and SIGHUP sent while the workers load: the server came up on what it had read,
    and said nothing. It now reads the file again once it is ready."""
    config = tmp_path / "versioned.yaml"
    config.write_text('GPUs: cpu\nHandle: "handles_ops:Versioned"\nHandleArgs: {version: 1, setup_s: 3}\n')
    lines: list[str] = []
    with easyserve("run", str(config), "--port", "0") as proc:
        try:
            threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
            assert wait_for(lambda: worker_children(proc.pid), 30)  # loading: its setup takes 3 s
            assert "listening on" not in "".join(lines)
            config.write_text('GPUs: cpu\nHandle: "handles_ops:Versioned"\nHandleArgs: {version: 2}\n')
            proc.send_signal(signal.SIGHUP)
            assert wait_for(lambda: "listening on" in "".join(lines), 30), "".join(lines)
            url = re.search(r"listening on (http://\S+)", "".join(lines)).group(1)
            assert wait_for(lambda: _served_version(url) == 2, 30), "".join(lines)
            assert "SIGHUP while starting" in "".join(lines)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            proc.kill()


def test_a_reload_that_waits_for_another_keeps_to_its_timeout(serve):
    # reload(timeout=1) called while another reload ran waited for that one to end (all of it) before
    # its own timeout began to count
    with serve("handles_ops:Versioned", HandleArgs={"version": 1}, ProcessPerGPU=2) as server:
        first = Background(lambda: server.reload(HandleArgs={"version": 2, "setup_s": 3}))  # 6 s at least
        assert wait_for(lambda: len(server.workers) == 3, 10)  # under way: its first new worker starts
        began = time.monotonic()
        with pytest.raises(StartupError, match=r"did not start within reload\(timeout=1\)"):
            server.reload(timeout=1, HandleArgs={"version": 3})
        assert time.monotonic() - began < 4, "it waited for the other reload to end"
        first.result(30)
        serves_only(server, version=2, workers=2)


def test_a_rollback_makes_the_v2_metadata_the_old_handles_at_once(serve, tmp_path):
    """A rolled-back reload left the new handle's inputs as the model's metadata, which v2 requests are
    checked against, until a worker of the old handle was set up again (for a large model, minutes of
    valid requests refused 400)."""
    go = tmp_path / "go"
    go.touch()
    with serve("handles_v2:SlowStart", HandleArgs={"go": str(go)}, ModelName="m", MaxBatchSize=1) as server:
        def inputs() -> list[str]:
            return [tensor["name"] for tensor in http("GET", server.url + "/v2/models/m")[2]["inputs"]]

        assert inputs() == ["x", "scale"]
        server.reload(handle="handles_v2:CrashingPixels")
        assert inputs() == ["pixels"]
        go.unlink()  # the old handle's workers, started again, wait in their setup from now on
        body = {"x": [1.0, 2.0], "data": [1.0]}  # either handle's /predict input
        # three deaths (the request's and its retries', charged to the handle): rolled back, and run again on it
        third = Background(lambda: post_json(server.url + "/predict", body, timeout=30))
        wait_until(lambda: server.stats()["reload_rolled_back"] is not None, what="the rollback")
        # dead a moment (its restart may wait), then starting: held in setup, no old worker is ready yet
        wait_until(lambda: [w["state"] for w in server.workers] == ["starting"], what="the old handle's restart")
        assert inputs() == ["x", "scale"]
        go.touch()
        status, answer = third.result(30)
    assert status == 200 and answer["count"] == [2]


def _versioned_file(path: Path, version: int, forward: str = "") -> None:
    """A handle file answering ``version``, whose forward runs ``forward`` first; each version's text
    is of one size, as a template's would be."""
    path.write_text(textwrap.dedent(f"""\
        import os
        from easyserve import Handle


        class Edited(Handle):
            def forward(self, batch):
                {forward or "pass"}
                return [{{"version": {version}, "pid": os.getpid()}} for _ in batch]
        """))


def _kill_one_and_wait(server) -> None:
    pids = {w["pid"] for w in server.workers}
    os.kill(min(pids), signal.SIGKILL)
    wait_until(lambda: len(server.workers) == len(pids) and {w.get("state") for w in server.workers} == {"idle"}
               and min(pids) not in {w.get("pid") for w in server.workers}, what="the killed worker replaced")


@pytest.mark.parametrize("named", ["file", "module", "class"])
def test_a_worker_started_after_a_reload_runs_the_handle_file_as_it_was_read_not_as_it_is_now(serve, tmp_path,
                                                                                               monkeypatch, named):
    """Workers imported a handle file as it was on disk when they started, not as the server had read
    it: after a reload refused a syntax error, the next crash of a worker left its slot failing for ever
    (503s); a reload rolled back for a handle that crashed every batch went back to the same crashing
    code; and ``__pycache__`` served the first of two edits of one size saved within a second. So too
    where the handle is named as a module's (``"edited:Edited"``) or given as a class imported from one."""
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)  # the workers write __pycache__, as a user's
    module = f"edited_{named}"  # a module of its own for each: imported here, for the class
    handle = tmp_path / f"{module}.py"
    _versioned_file(handle, 1)
    monkeypatch.syspath_prepend(str(tmp_path))
    if named == "class":
        _import_fresh(monkeypatch, module)
    given = {"file": f"{handle}:Edited", "module": f"{module}:Edited"}.get(named) or sys.modules[module].Edited
    with serve(given, ProcessPerGPU=2, MaxBatchSize=1) as server:
        url = server.url + "/predict"
        assert post_json(url, {})[1]["version"] == 1
        handle.write_text(handle.read_text() + "\ndef broken(:\n")
        with pytest.raises(StartupError, match="SyntaxError"):
            server.reload()
        _kill_one_and_wait(server)  # its replacement runs what the server serves: version 1
        assert {post_json(url, {})[1]["version"] for _ in range(6)} == {1}
        # a new handle whose every batch ends its worker: rolled back to version 1, which serves
        _versioned_file(handle, 2, forward="os._exit(7)")
        server.reload()
        for _ in range(3):
            post_json(url, {})
        wait_until(lambda: server.stats()["reload_rolled_back"] is not None, what="the rollback")
        wait_until(lambda: {w.get("state") for w in server.workers} == {"idle"}, what="the workers back")
        assert {post_json(url, {})[0] for _ in range(6)} == {200}
        assert {post_json(url, {})[1]["version"] for _ in range(6)} == {1}
        # edits of one size, each reloaded within the second it was saved
        for version in (3, 4, 5):
            _versioned_file(handle, version)
            server.reload()
            assert {post_json(url, {})[1]["version"] for _ in range(4)} == {version}
        _kill_one_and_wait(server)
        handle.unlink()  # a restart needs no file: it runs the text read at the reload
        _kill_one_and_wait(server)
        assert {post_json(url, {})[1]["version"] for _ in range(4)} == {5}


@pytest.mark.parametrize("named", ["module", "class"])
def test_a_handle_module_in_a_package_runs_as_read_with_its_relative_imports(serve, tmp_path, monkeypatch, named):
    """A module's text read once runs under its own name, in its package: what it imports relatively is
    found, and read as it is when the worker starts (as any module a handle imports)."""
    package = tmp_path / f"shop_{named}"
    package.mkdir()
    (package / "__init__.py").write_text("OPENED = True\n")
    (package / "prices.py").write_text("def price(n):\n    return n * 2\n")
    (package / "handles.py").write_text(textwrap.dedent("""\
        from easyserve import Handle
        from . import OPENED
        from .prices import price


        class Till(Handle):
            def forward(self, batch):
                return [{"price": price(task["n"]), "opened": OPENED, "module": __name__} for task in batch]
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    name = f"{package.name}.handles"
    given = _import_fresh(monkeypatch, package.name, name).Till if named == "class" else f"{name}:Till"
    with serve(given) as server:
        assert post_json(server.url + "/predict", {"n": 3}) == (200, {"price": 6, "opened": True, "module": name})
        (package / "handles.py").write_text("raise RuntimeError('edited after the server read it')\n")
        (package / "prices.py").write_text("def price(n):\n    return n * 3\n")
        _kill_one_and_wait(server)
        assert post_json(server.url + "/predict", {"n": 3}) == (200, {"price": 9, "opened": True, "module": name})


def _import_fresh(monkeypatch, *names: str) -> Any:
    """Import the modules ``names`` here, each gone again after the test; the last one."""
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)  # undone last: gone again after the test
        monkeypatch.delitem(sys.modules, name)
    return [importlib.import_module(name) for name in names][-1]


@pytest.mark.parametrize("named", ["module", "class"])
def test_a_handle_module_its_package_imports_runs_once_in_a_worker(serve, tmp_path, monkeypatch, named):
    """A package whose __init__ imports its handle module (to offer the class as pkg.Handle): the module's
    text ran a second time in each worker, after the package had imported it, and a registry that refuses a
    name twice failed every worker, "'echoing' registered twice"."""
    package = tmp_path / f"registered_{named}"
    package.mkdir()
    (package / "__init__.py").write_text("from .handle import Echoing\n")
    (package / "registry.py").write_text(textwrap.dedent("""\
        NAMES = set()


        def register(name):
            if name in NAMES:
                raise ValueError(f"{name!r} registered twice")
            NAMES.add(name)
        """))
    (package / "handle.py").write_text(textwrap.dedent("""\
        import sys

        from easyserve import Handle

        from .registry import register

        register("echoing")


        class Echoing(Handle):
            def forward(self, batch):
                package = sys.modules[__name__.rpartition(".")[0]]
                return [{"same": package.Echoing is Echoing} for _ in batch]
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    given = (_import_fresh(monkeypatch, package.name, f"{package.name}.handle").Echoing if named == "class"
             else f"{package.name}.handle:Echoing")
    with serve(given) as server:
        assert post_json(server.url + "/predict", {}) == (200, {"same": True})


def test_handle_args_of_the_handle_modules_own_classes_are_of_the_classes_it_runs(serve, tmp_path, monkeypatch):
    """HandleArgs holding an Enum and a dataclass of the handle's module, the handle given as a class from
    it: reading them imported the module from disk, then the module's text as read ran again as the
    handle's, and the objects matched none of its classes (isinstance False), without a word."""
    (tmp_path / "modal.py").write_text(textwrap.dedent("""\
        import dataclasses
        import enum

        from easyserve import Handle


        class Mode(enum.Enum):
            FAST = 1
            SLOW = 2


        @dataclasses.dataclass
        class Settings:
            threshold: float


        class Modal(Handle):
            def __init__(self, mode, settings):
                super().__init__(mode=mode, settings=settings)
                self.mode, self.settings = mode, settings

            def forward(self, batch):
                return [{"slow": self.mode is Mode.SLOW, "settings": isinstance(self.settings, Settings)}
                        for _ in batch]
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    modal = _import_fresh(monkeypatch, "modal")
    with serve(modal.Modal, HandleArgs={"mode": modal.Mode.SLOW, "settings": modal.Settings(0.9)}) as server:
        assert post_json(server.url + "/predict", {}) == (200, {"slow": True, "settings": True})


def test_a_handle_files_text_read_once_shows_its_own_lines_in_tracebacks(serve, tmp_path):
    """The text the workers run is split into the lines tracebacks show at newlines alone: split also at
    a form feed (a page break, as PEP 8 allows) or U+2028, every line after one was shown for the line
    above it. A file that is not text in its encoding is a SyntaxError naming the file."""
    handle = tmp_path / "paged.py"
    handle.write_bytes('from easyserve import Handle\n\x0c\nNOTE = "a\u2028b"\n\n\nclass Paged(Handle):\n'
                       '    def forward(self, batch):\n        raise ValueError("from the line that raises")\n'
                       .encode())
    with serve(f"{handle}:Paged") as server:
        status, answer = post_json(server.url + "/predict", {})
        assert status == 500, answer
        logs = "\n".join(line.text for line in server.logs(tail=None))
        assert f'File "{handle}", line 8, in forward\n    raise ValueError("from the line that raises")' in logs, logs
    handle.write_bytes(b"from easyserve import Handle\n# caf\xe9\nclass Paged(Handle):\n"
                       b"    def forward(self, batch):\n        return batch\n")
    with serve(f"{handle}:Paged") as server:  # a Latin-1 byte in a comment: Python compiles it
        assert post_json(server.url + "/predict", {"a": 1}) == (200, {"a": 1})
    handle.write_bytes(b'from easyserve import Handle\nNAME = "caf\xe9"\nclass Paged(Handle):\n    pass\n')
    with pytest.raises(StartupError, match=re.escape(f'File "{handle}", line 2\n    NAME = "caf')):
        with serve(f"{handle}:Paged"):
            pass


def test_the_servers_repr_counts_restarts_before_a_reload_as_its_card_does(serve):
    # each worker's own count began again at 0 when a reload replaced it (it now goes on with the worker
    # that takes its slot): the repr summed those, and said restarts=0 beside a card, a dashboard and
    # /stats that said 1
    with serve() as server:
        victim = server.workers[0]["pid"]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: server.workers[0]["restarts"] == 1 and server.workers[0]["state"] == "idle",
                   what="the restart")
        server.reload(HandleArgs={"version": 2})
        assert server.workers[0]["restarts"] == 1 and server.stats()["restarts"] == 1
        assert "restarts=1>" in repr(server) and "restarts 1" in server._repr_html_()
