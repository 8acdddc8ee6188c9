"""The watchdog with real processes: crashes, hangs, restarts, a handle that cannot start again."""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import Background, KeptAlive, _alive, http, post_json, post_many, request, wait_busy, wait_draining
from conftest import caught, held_by_debugger, wait_queued, worker_children
from conftest import wait_until as wait_for

from test_cli import wait_for_url

import easyserve
import easyserve.watchdog
from easyserve import Server, records
from easyserve.errors import DIED_TWICE


def ready_workers(server) -> list[dict]:
    return [w for w in server.workers if w["state"] in ("idle", "busy")]


def test_a_server_stays_ready_while_one_worker_restarts_and_says_it_is_degraded(serve, tmp_path):
    # /ready was 503 while any worker was down: a crash took a server that still served out of its load
    # balancer's rotation for as long as the model took to load, and a service of one replica with it
    marker = tmp_path / "slow"
    with serve("handles_ops:Slow", HandleArgs={"s": 0.01, "slow_restart": str(marker), "restart_s": 60},
               ProcessPerGPU=2, ApiKey="degraded-key") as server:
        marker.touch()  # from now on, a worker takes a minute to load its model
        os.kill(server.workers[0]["pid"], signal.SIGKILL)
        wait_for(lambda: server.workers[0]["state"] == "starting", what="the restart")
        status, _, ready = request(server.url + "/ready")
        v2 = request(server.url + "/v2/health/ready")
        metrics = http("GET", server.url + "/metrics", headers={"Authorization": "Bearer degraded-key"})[2]
        auth = {"Authorization": "Bearer degraded-key"}
        answers = [request(server.url + "/predict", b'{"n": 1}', auth)[0] for _ in range(3)]

        os.kill(server.workers[1]["pid"], signal.SIGKILL)  # now no worker can run a request
        wait_for(lambda: server.workers[1]["state"] == "starting", what="the second restart")
        down = request(server.url + "/ready")
        v2_down = request(server.url + "/v2/health/ready")
    assert status == 200 and ready["ready"] is True, ready
    assert re.fullmatch(r"cpu/0 is starting: worker cpu/0 \(pid \d+\) died with signal 9 \(SIGKILL, not sent by the "
                        r"server: most often the kernel's out-of-memory killer, see `dmesg`\)",
                        ready["degraded"]), ready
    assert v2[0] == 200 and v2[2] == {"ready": True}
    assert "easyserve_ready 1.0" in metrics and "easyserve_degraded 1.0" in metrics, metrics
    assert answers == [200] * 3
    assert down[0] == 503 and down[2]["ready"] is False and "cpu/0 is starting" in down[2]["error"]
    assert "cpu/1 is starting" in down[2]["error"] and v2_down[0] == 400


def test_a_worker_replaced_on_purpose_is_not_named_as_down(serve, tmp_path):
    # with one worker down, "degraded" also named the other, being replaced after its batches
    # (MaxBatchesPerWorker), as if it were down too
    marker = tmp_path / "slow"
    with serve("handles_ops:Slow", HandleArgs={"s": 0.01, "slow_restart": str(marker), "restart_s": 60},
               ProcessPerGPU=2, MaxBatchesPerWorker=1) as server:
        marker.touch()  # from now on, a worker takes a minute to load its model
        assert post_json(server.url + "/predict", {"n": 1})[0] == 200
        replaced = wait_for(lambda: next((w for w in server.workers if w["state"] == "starting"), None),
                            what="the replacement after one batch")
        other = next(w for w in server.workers if w["name"] != replaced["name"])
        os.kill(other["pid"], signal.SIGKILL)
        wait_for(lambda: all(w["state"] == "starting" for w in server.workers), what="the restart")
        status, _, ready = request(server.url + "/ready")
    assert status == 200 and re.fullmatch(rf"{other['name']} is starting: worker {other['name']} \(pid \d+\) "
                                          r"died with signal 9 \(SIGKILL, not sent by the server: most often the "
                                          r"kernel's out-of-memory killer, see `dmesg`\)", ready["degraded"]), ready


def test_every_worker_must_be_up_once_before_the_server_is_ready(tmp_path):
    # a balancer must not send a fresh server its share while one worker serves and the rest still load
    from easyserve import Server

    server = Server(handle="handles_ops:Slow", HandleArgs={"slow_first": str(tmp_path / "first"), "restart_s": 4},
                    GPUs="cpu", Port=0, ProcessPerGPU=2)
    starting = Background(lambda: server.start(timeout=60))
    try:
        wait_for(lambda: server.url and any(w["state"] == "idle" for w in server.workers), what="one worker up")
        status, _, ready = request(server.url + "/ready")
        starting.result(60)
        after = request(server.url + "/ready")
    finally:
        server.stop(drain_timeout=0)
    assert status == 503 and re.fullmatch(r"cpu/\d is starting", ready["error"]), ready
    assert "degraded" not in ready
    assert after[0] == 200 and "degraded" not in after[2], after


def _setups(journal) -> dict[str, list[tuple[float, float]]]:
    """handles_ops:SetsUp's journal: each device's setups, (began, ended), in order."""
    by_device: dict[str, list[tuple[float, float]]] = {}
    for device, began, ended in (line.rsplit(" ", 2) for line in journal.read_text().splitlines()):
        by_device.setdefault(device, []).append((float(began), float(ended)))
    return {device: sorted(times) for device, times in by_device.items()}


def _one_at_a_time(times: list[tuple[float, float]]) -> bool:
    return all(first[1] <= second[0] for first, second in zip(times, times[1:]))


def test_starts_per_gpu_loads_one_handle_at_a_time_on_each_gpu_the_gpus_at_once_at_start_and_restart(
        serve, fake_gpus, tmp_path):
    """32 workers of a 64 MB model loading at once held twice the memory they kept: 8 GPUs with a large
    checkpoint need their loads spread out, and one GPU's 4 engine builds may not fit where one does."""
    fake_gpus(2)
    journal = tmp_path / "journal"
    with serve("handles_ops:SetsUp", GPUs="0,1", ProcessPerGPU=3, StartsPerGPU=1,
               HandleArgs={"setup_s": 0.3, "journal": str(journal)}) as server:
        started = _setups(journal)
        assert [len(started[device]) for device in "01"] == [3, 3], started
        assert all(_one_at_a_time(started[device]) for device in "01"), started
        (a, _), (b, _) = started["0"][0], started["1"][0]  # the GPUs at once
        assert a < started["1"][0][1] and b < started["0"][0][1], started
        journal.unlink()
        for worker in server.workers:  # all of GPU 0's at once: their restarts take turns too
            if worker["name"].startswith("gpu0/"):
                os.kill(worker["pid"], signal.SIGKILL)
        wait_for(lambda: journal.exists() and len(_setups(journal).get("0", [])) == 3, what="three restarts")
        wait_for(lambda: all(w["state"] == "idle" for w in server.workers), what="every worker back")
        assert _one_at_a_time(_setups(journal)["0"]), _setups(journal)
        assert post_json(server.url + "/predict", {})[0] == 200


def test_a_worker_waiting_its_turn_to_set_up_has_not_begun_its_start_timeout(serve, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(easyserve.pool, "STILL_STARTING_S", 0.3)
    journal = tmp_path / "journal"
    # each setup well inside StartTimeoutS (a setup of 0.6 s under a bound of 1 s was killed once on a loaded
    # machine), the three together well past it
    with serve("handles_ops:SetsUp", ProcessPerGPU=3, StartsPerGPU=1, StartTimeoutS=2,
               HandleArgs={"setup_s": 1.0, "journal": str(journal)}) as server:
        assert [w["state"] for w in server.workers] == ["idle"] * 3 and server.stats()["restarts"] == 0
    times = _setups(journal)[""]
    assert len(times) == 3 and _one_at_a_time(times) and times[-1][1] - times[0][0] > 2.5, times
    notices = [r.getMessage() for r in caught(caplog) if r.getMessage().startswith("still starting after 0.3 s")]
    assert notices == ["still starting after 0.3 s: cpu/0 loading the handle (its setup() running), 2 more "
                       "waiting their turn (StartsPerGPU=1); StartTimeoutS (2 s) ends the start if it goes "
                       "on"], notices


def test_a_worker_waiting_its_turn_says_so_and_gets_none_once_a_stop_has_begun(serve, tmp_path, caplog):
    """Restarted workers waiting their turn were "starting" like the one loading, in /stats, /ready and the
    log alike; and a stop's drain gave them their turns, each loading a model only to be stopped."""
    caplog.set_level(logging.INFO, logger="easyserve")
    journal = tmp_path / "journal"
    with serve("handles_ops:SetsUp", ProcessPerGPU=3, StartsPerGPU=1,
               HandleArgs={"setup_s": 0.5, "journal": str(journal), "forward_s": 3}) as server:
        first, *others = server.workers
        busy = Background(lambda: post_json(server.url + "/predict", {}, timeout=30))  # a drain of 3 s
        wait_for(lambda: any(w["state"] == "busy" for w in server.workers), what="a busy worker")
        kept = next(w for w in server.workers if w["state"] == "busy")
        journal.unlink()
        for worker in server.workers:
            if worker["name"] != kept["name"]:
                os.kill(worker["pid"], signal.SIGKILL)
        wait_for(lambda: sum(bool(w.get("waiting_turn")) for w in server.workers) == 1, what="one waiting its turn")
        queued = next(w for w in server.workers if w.get("waiting_turn"))
        ready = request(server.url + "/ready")[2]
        shown = repr(server)  # as the dashboard marks it, too
        server.stop(drain_timeout=10)
        assert busy.result(10)[0] == 200
    assert f"{queued['name']} is starting (waiting its turn to load the handle: StartsPerGPU)" in ready["degraded"]
    assert f"{queued['name']} starting (waiting its turn)" in shown, shown
    said = [r.getMessage() for r in caught(caplog) if "waits its turn" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"worker {queued['name']} waits its turn to load the handle: ")
    assert len(journal.read_text().splitlines()) == 1  # the one loading; none begun during the drain


def test_a_setup_that_fails_ends_a_start_whose_other_workers_wait_their_turn(tmp_path):
    from easyserve import Server

    server = Server(handle="handles_for_tests:BrokenSetup", GPUs="cpu", Port=0, ProcessPerGPU=3, StartsPerGPU=1)
    began = time.monotonic()
    with pytest.raises(easyserve.StartupError, match="model file 'missing.onnx' not found"):
        server.start(timeout=60)
    assert time.monotonic() - began < 30 and worker_children() == []


def test_a_worker_whose_exit_hangs_after_its_setup_failed_is_killed_and_the_start_ends(tmp_path):
    # the server reads the end of a worker's socket as its exit, and kills one slow to end: a socket held
    # open through the exit functions kept the start waiting on a 40 s one, and said the setup still ran
    server = Server(handle="handles_robust:FailsWithASlowExit", HandleArgs={"exit_s": 40}, GPUs="cpu", Port=0)
    began = time.monotonic()
    with pytest.raises(easyserve.StartupError, match="setup failed on purpose"):
        server.start(timeout=120)
    assert time.monotonic() - began < 25 and worker_children() == []


def test_killed_worker_is_noticed_restarted_and_counted(serve):
    # batches of one, so that each request is handed to a worker slot of its own
    with serve("handles_for_tests:Crashing", ProcessPerGPU=2, MaxBatchSize=1, TimeoutS=5) as server:
        victim = server.workers[0]
        os.kill(victim["pid"], signal.SIGKILL)
        wait_for(lambda: server.workers[0]["restarts"] == 1 and server.workers[0]["state"] == "idle", what="restart")
        assert server.workers[0]["pid"] != victim["pid"] and not _alive(victim["pid"])
        status, _, stats = request(server.url + "/stats")
        assert stats["restarts"] == 1
        assert request(server.url + "/ready")[2]["workers"][0]["restarts"] == 1
        assert "restarts=1" in repr(server)
        pids = {w["pid"] for w in server.workers}
        bodies = [{"n": i} for i in range(10)]
        answers = post_many(server.url + "/predict", bodies)
        after = request(server.url + "/stats")[2]
    # every request answered with its own result, by a live worker (none sent to the dead one)
    assert [status for status, _ in answers] == [200] * 10, answers
    assert [body["echo"] for _, body in answers] == bodies
    assert {body["pid"] for _, body in answers} <= pids
    assert after["restarts"] == 1 and after["requests"] == 10, after


@pytest.mark.parametrize("fronts", [1, 2])
def test_a_worker_gone_while_idle_gets_no_batch_before_it_is_reaped(serve, fronts, tmp_path):
    """A worker's connection closed while it was idle, its process not yet reaped (uvloop closes the
    connection at once; the watchdog hears of it a moment later, and waits up to EXIT_GRACE_S for the
    process to exit): a request then was written to the closed connection. uvloop raised in whatever
    asked for the batch: the request's own handler (a 500 for a request that had not run), another
    worker's answer (that healthy worker cut off), or with HttpWorkers a front's message (the front
    and every connection it held cut off)."""
    dropped = tmp_path / "dropped"
    with serve("handles_robust:DropsItsLink", HttpWorkers=fronts) as server:
        url = server.url + "/predict"
        status, first = post_json(url, {"drop": 0.2, "dropped": str(dropped)})
        assert status == 200
        # idle, its connection closed, the process lingering (linger_s 1.5): a fixed 0.6 s wait could
        # end before a late drop, and the request went to the worker still linked
        wait_for(dropped.exists, what="the worker to end its connection")
        status, second = post_json(url, {"n": 1})
        assert status == 200 and second["pid"] != first["pid"], second  # its successor ran it
        stats = server.stats()
        assert stats["statuses"] == {"200": 2} and stats["cut_off"] == 0, stats
        assert server.workers[0]["restarts"] == 1
        assert "unable to perform operation" not in str(server.logs(tail=None))


def test_crash_mid_batch_is_retried_on_another_worker(serve, tmp_path):
    marker = str(tmp_path / "died-once")
    with serve("handles_for_tests:Crashing", ProcessPerGPU=2, MaxBatchSize=8) as server:
        bodies = [{"n": i} for i in range(12)] + [{"die_once": marker}] + [{"n": i} for i in range(12, 24)]
        results = post_many(server.url + "/predict", bodies, concurrency=32)
        workers = server.workers
    assert os.path.exists(marker)  # a worker really died
    assert [s for s, _ in results] == [200] * len(bodies)  # ...and nobody noticed
    assert [b["echo"] for _, b in results] == bodies
    assert sum(w["restarts"] for w in workers) == 1


def test_a_request_that_kills_two_workers_fails_alone_naming_the_signal(serve):
    with serve("handles_for_tests:Crashing", ProcessPerGPU=2, MaxBatchSize=8) as server:
        bodies = [{"n": i} for i in range(10)] + [{"die": "kill"}] + [{"n": i} for i in range(10, 20)]
        results = post_many(server.url + "/predict", bodies, concurrency=32)
        wait_for(lambda: len(ready_workers(server)) == 2, what="both workers back")
        after = post_json(server.url + "/predict", {"n": 99})
    poisoned = results[10]
    assert poisoned[0] == 500
    assert ("worker died with signal 9 (SIGKILL, not sent by the server: most often the kernel's out-of-memory "
            "killer, see `dmesg`) while running this request") in poisoned[1]["error"]
    assert "retried once" in poisoned[1]["error"]
    others = results[:10] + results[11:]
    assert [s for s, _ in others] == [200] * 20
    assert after[0] == 200


def test_a_server_whose_workers_die_on_every_batch_answers_503_for_another_server_to_answer(serve, tmp_path, caplog):
    """A machine at fault (its GPU, its driver) ends its workers on every batch, whichever the request:
    each request ran twice there and was answered 500, which a load balancer does not send elsewhere, and
    /ready said 200 whenever the worker was back. Three batches in a row of different requests ending
    their workers, none lived through between, say it is the server's fault: then 503 at once."""
    marker = tmp_path / "broken"
    with serve("handles_robust:DiesWhile", HandleArgs={"marker": str(marker)}) as server:
        url = server.url + "/predict"

        def back() -> None:
            wait_for(lambda: ready_workers(server), 30, "the worker back")

        # a request at fault, three times, with others answered between: each its 500, never a 503
        for n in range(3):
            status, body = post_json(url, {"die": True}, timeout=60)
            assert status == 500 and DIED_TWICE in body["error"], body
            back()
            assert post_json(url, {"n": n}, timeout=60) == (200, {"n": n})
        marker.touch()  # from now on every batch ends its worker
        for n in range(2):  # may each be the request's doing: run alone again, then its 500
            assert post_json(url, {"n": n}, timeout=60)[0] == 500
            back()
        restarts = sum(w["restarts"] for w in server.workers)
        status, headers, body = http("POST", url, json={"n": 2})
        assert status == 503 and 0 < float(headers["Retry-After"]) <= 60, (status, body)
        assert body["error"].startswith("worker exited with code 3 while running this request; this server's "
                                        "workers died on each of the last 3 batches, of different requests"), body
        assert body["error"].endswith("so it was not run here again: send it to another server"), body
        status, _, ready = http("GET", server.url + "/ready")
        assert status == 503 and ready["error"].startswith("this server's workers died on each of the last 3 "), ready
        assert "ready again in " in ready["error"]
        back()
        assert sum(w["restarts"] for w in server.workers) == restarts + 1  # run once, not twice
        marker.unlink()  # mended: the next request is run, and answered; the server is ready again
        assert post_json(url, {"n": 3}, timeout=60) == (200, {"n": 3})
        assert http("GET", server.url + "/ready")[0] == 200
        marker.touch()  # and counts from 0 again: a death is retried once more
        assert post_json(url, {"n": 4}, timeout=60)[0] == 500
        back()
    said = [r.getMessage() for r in caught(caplog) if "batches in a row" in r.getMessage()]
    assert len(said) == 2, said
    assert said[0].startswith("the workers died on 3 batches in a row, of different requests"), said
    assert said[1].startswith("a worker lived through a batch, after 3 batches in a row"), said


def test_exit_code_is_named_too(serve):
    with serve("handles_for_tests:Crashing") as server:
        status, body = post_json(server.url + "/predict", {"die": "exit"})
    assert status == 500 and "worker exited with code 3 while running this request" in body["error"]


def test_a_segfault_leaves_the_python_stack_in_the_log(serve):
    # A crash in native code left nothing in the worker's log: where in the handle was it?
    with serve("handles_for_tests:Crashing") as server:
        status, body = post_json(server.url + "/predict", {"die": "segfault"})
        assert status == 500 and "signal 11 (SIGSEGV)" in body["error"], body
        assert wait_for(lambda: "Fatal Python error: Segmentation fault" in str(server.logs(tail=None)), 10)
    logs = str(server.logs(tail=None))
    assert re.search(r'File ".*handles_for_tests.py", line \d+ in forward', logs), logs


def test_a_segfaults_stack_is_one_error_record_even_at_log_level_warning(serve, caplog):
    # faulthandler writes the dump straight to the pipe, unmarked: read as prints, its lines were INFO
    # records, one per line, and at --log-level warning the one clue to where a worker crashed was gone
    caplog.set_level(logging.WARNING, logger="easyserve")
    with serve("handles_for_tests:Crashing") as server:
        assert post_json(server.url + "/predict", {"die": "segfault"})[0] == 500
        assert wait_for(lambda: any("Fatal Python error" in r.getMessage() for r in caplog.records), 10), caplog.text
        assert post_json(server.url + "/predict", {"n": 1})[0] == 200  # the worker restarted
    # the request is run twice (retried once), each time killing its worker: one record per death (pytest
    # sees each record twice once the server's log routing is installed: records are told by time made)
    records = list({r.created: r for r in caplog.records}.values())
    died = [re.search(r"\(pid (\d+)\) died with signal 11", r.getMessage()) for r in records]
    died = [found[1] for found in died if found]
    dumps = [r for r in records if "Fatal Python error" in r.getMessage()]
    assert len(died) == 2 and [f"cpu/0 [{pid}] Fatal Python error: Segmentation fault" for pid in died] == \
        [r.getMessage().split("\n")[0] for r in dumps], caplog.text
    for dump in dumps:
        assert dump.levelno == logging.ERROR and dump.name == "easyserve.worker"
        assert re.search(r'File ".*handles_for_tests.py", line \d+ in forward', dump.getMessage()), dump.getMessage()
    assert not any(r.levelno < logging.WARNING for r in records if r.name == "easyserve.worker")


def test_sigkill_from_outside_under_concurrent_load_loses_nothing(serve):
    with serve("handles_for_tests:Crashing", ProcessPerGPU=2, MaxBatchSize=4) as server:
        url = server.url + "/predict"
        done = threading.Event()
        sent: list = []
        answers: list = []

        def load() -> None:  # requests in flight until the last kill has been recovered from
            while not done.is_set():
                bodies = [{"n": len(sent) + i, "sleep": 0.01} for i in range(48)]
                sent.extend(bodies)
                answers.extend(post_many(url, bodies, 16))

        loader = threading.Thread(target=load)
        loader.start()
        try:
            for kill in range(3):
                busy = wait_busy(server)[0]  # a worker in the middle of a batch
                os.kill(busy["pid"], signal.SIGKILL)
                # back in service before the next kill, so no retried request meets a second kill
                wait_for(lambda: any(w["name"] == busy["name"] and w["restarts"] == busy["restarts"] + 1
                                     and w["state"] in ("idle", "busy") for w in server.workers),
                         what=f"the restart after kill {kill + 1}")
        finally:
            done.set()
            loader.join(60)
        restarts = sum(w["restarts"] for w in server.workers)
    assert len(answers) == len(sent) > 0
    assert [b.get("echo") for s, b in answers] == sent
    assert all(status == 200 for status, _ in answers)
    assert restarts == 3


def test_a_worker_killed_as_stuck_says_where_it_was_stuck(serve, caplog):
    """Killed at once, a stuck worker's log said only that it was stuck: where a deadlock, or a call waiting
    on the network, held its batch (or its setup), the user could not tell."""
    with serve("handles_ops:StuckHere", TimeoutS=0.5) as server:
        assert post_json(server.url + "/predict", {"n": 1})[0] == 504
        said = wait_for(lambda: [r.getMessage() for r in caught(caplog) if "was stuck here" in r.getMessage()],
                        what="where it was stuck")
    assert re.search(r'File ".*handles_ops\.py", line \d+ in waiting_on_the_network\n.*in forward', said[0],
                     re.DOTALL), said[0]
    # 5 s, not 1: the timer starts as the worker is sent the handle, which it imports before its setup
    # runs, and on a busy CI machine one was killed before it got there ("It wrote nothing", no stack)
    with pytest.raises(easyserve.StartupError) as raised:
        Server(handle="handles_ops:StuckHere", GPUs="cpu", Port=0, StartTimeoutS=5,
               HandleArgs={"setup_s": 60}).start(timeout=60)
    assert "It was here (its threads, most recent call first):" in str(raised.value), str(raised.value)
    assert re.search(r"in waiting_on_the_network\n.*in setup", str(raised.value), re.DOTALL), str(raised.value)


def test_a_worker_that_finishes_while_it_writes_where_it_is_is_replaced_between_batches(serve, caplog, monkeypatch):
    """The worker asked where its threads are is killed STACKS_WAIT_S later (given 2 s here): one whose batch
    ended meanwhile is not killed, which would retry what it was handed meanwhile, but replaced between
    batches: the signal may have cut short a wait in native code, whose library is not trusted on."""
    monkeypatch.setattr(easyserve.watchdog, "STACKS_WAIT_S", 2.0)
    caplog.set_level(logging.INFO, logger="easyserve")
    with serve("handles_ops:StuckHere", TimeoutS=0.5, HandleArgs={"forward_s": 1.0}) as server:
        pid = server.workers[0]["pid"]
        assert post_json(server.url + "/predict", {"n": 1})[0] == 504
        wait_for(lambda: server.workers[0]["pid"] != pid and server.workers[0]["state"] == "idle",
                 what="the worker's replacement")
        stats = server.stats()
    assert stats["replacements"]["stuck"] == 1 and stats["restarts"] == 0, stats
    assert any("it finished as it was to be killed as stuck" in r.getMessage() for r in caught(caplog))
    assert not any("was stuck here" in r.getMessage() for r in caught(caplog))


def test_each_worker_holds_one_stacks_file_across_reloads_and_none_once_stopped(serve):
    """A reload's replaced workers kept theirs open: one more for each worker and reload, for good."""
    def stacks_files() -> int:
        return sum("easyserve-stacks" in os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                   if os.path.exists(f"/proc/self/fd/{fd}"))

    before = stacks_files()
    with serve("handles_ops:StuckHere", ProcessPerGPU=2) as server:
        for _ in range(3):
            server.reload()
        assert stacks_files() - before == 2
    assert stacks_files() == before


def test_hung_batch_gets_504_and_its_worker_is_replaced(serve):
    with serve("handles_for_tests:Crashing", TimeoutS=0.5) as server:
        stuck_pid = server.workers[0]["pid"]
        started = time.monotonic()
        status, body = post_json(server.url + "/predict", {"sleep": 30})
        elapsed = time.monotonic() - started
        wait_for(lambda: server.workers[0]["state"] == "idle" and server.workers[0]["pid"] != stuck_pid,
                 what="the stuck worker's replacement")
        after = post_json(server.url + "/predict", {"n": 1})
    assert status == 504 and "TimeoutS=0.5s" in body["error"] and "ran" in body["error"]
    assert elapsed < 5
    assert not _alive(stuck_pid)
    assert after[0] == 200


def test_timeout_counts_queue_wait(serve):
    with serve("handles_for_tests:Crashing", TimeoutS=0.8, MaxBatchSize=1) as server:
        blocker = Background(lambda: post_json(server.url + "/predict", {"sleep": 3}))
        wait_busy(server)  # the only worker is busy: the next request can only wait in the queue
        status, body = post_json(server.url + "/predict", {"n": 1})
        first = blocker.result(10)
        waits = server.stats()["histograms"]["queue_wait_s"]
    assert status == 504, body
    # its stay in the queue counts, ended by its deadline rather than a worker: under overload the
    # histogram held only the shorter waits of the requests run, none of those that waited out TimeoutS
    assert waits["count"] == 2 and 0.79 <= waits["sum"] < 2.0, waits
    waited = re.fullmatch(r"no answer within TimeoutS=0\.8s: it waited (\d+\.\d\d)s in the queue", body["error"])
    assert waited, body
    # answered at its deadline: not before (the timer may fire a millisecond early), nor long after
    assert 0.79 <= float(waited.group(1)) < 2.0, body
    assert first[0] == 504 and "ran" in first[1]["error"]


def test_each_504_is_found_in_the_log_by_its_request_id(serve, caplog):
    """A 504 was logged nowhere, at any level: a client's report of one found nothing. The first is
    logged at once; those that come within the next second together, in one line naming them."""
    caplog.set_level(logging.WARNING, logger="easyserve")
    with serve("handles_for_tests:Crashing", TimeoutS=0.6, MaxBatchSize=1) as server:
        headers = {"Content-Type": "application/json"}
        blocker = Background(lambda: request(server.url + "/predict", b'{"sleep": 3}',
                                             {**headers, "X-Request-Id": "running-0"}))
        wait_busy(server)
        queued = [Background(lambda i=i: request(server.url + "/predict", b'{"n": 1}',
                                                 {**headers, "X-Request-Id": f"queued-{i}"})) for i in range(3)]
        statuses = [blocker.result(10)[0]] + [each.result(10)[0] for each in queued]

        def lines() -> list[str]:
            return [r.getMessage() for r in caught(caplog) if "answered 504" in r.getMessage()]

        wait_for(lambda: all(f"queued-{i}" in " ".join(lines()) for i in range(3)), what="every 504 to be logged")
    assert statuses == [504] * 4
    told = lines()
    assert told[0].startswith("request running-0 answered 504: no answer within TimeoutS=0.6s: it waited "), told
    assert "ran" in told[0]
    assert len(told) == 2 and told[1].startswith("requests queued-"), told  # together: not a line each


@pytest.mark.parametrize("pipeline", [False, True])
def test_overload_answers_504_without_killing_healthy_workers(serve, pipeline):
    """More requests than the worker can answer within TimeoutS: the late ones get 504, but a batch
    that starts late and runs its 0.3 s is not a stuck worker. It used to be killed once it ran past
    its requests' deadlines, and its model loaded again, again and again, while the queue grew."""
    with serve("handles_for_tests:Crashing", TimeoutS=1, MaxBatchSize=1, Pipeline=pipeline) as server:
        pid = server.workers[0]["pid"]
        answers = post_many(server.url + "/predict", [{"sleep": 0.3, "n": i} for i in range(16)], concurrency=16)
        statuses = collections.Counter(status for status, _ in answers)
        wait_for(lambda: server.workers[0]["state"] == "idle", what="the last batch to be answered")
        assert server.workers[0]["pid"] == pid and server.stats()["restarts"] == 0
    assert statuses[504] >= 6 and statuses[200] >= 3, statuses


def _forward_order(log) -> list[list[int]]:
    return [line["values"] for line in map(json.loads, log.read_text().splitlines()) if line["stage"] == "forward"]


@pytest.mark.parametrize("order", ["deadline", "fifo"])
def test_a_request_that_cannot_be_answered_in_time_is_passed_over(serve, tmp_path, caplog, order):
    """A batch takes 0.5 s. Request 1 has 0.25 s left when the worker is free, request 2 has 1.25 s: in
    arrival order, 1 runs and ends past its deadline (a 504 all the same, and request 2 waits for
    it); passed over, 1 gets its 504 at its deadline without running, and 2 is answered."""
    caplog.set_level(logging.INFO, logger="easyserve")
    log, gate = tmp_path / "timeline.jsonl", tmp_path / "gate"
    args = {"log": str(log), "gate": str(gate), "forward_s": 0.5}
    with serve("handles_for_tests:Timeline", HandleArgs=args, MaxBatchSize=1, MaxWaitMs=0, TimeoutS=3,
               QueueOrder=order) as server:
        url = server.url + "/predict"
        for _ in range(2):  # a batch's cost: 0.5 s (a worker's first batch is not counted: a model's warm-up)
            assert post_json(url, {"value": 0}) == (200, {"value": 0})
        held = Background(lambda: post_json(url, {"value": -1}, timeout=30))
        wait_busy(server)
        began = time.monotonic()
        first = Background(lambda: post_json(url, {"value": 1}, timeout=30))
        wait_queued(server.url, 1)
        wait_for(lambda: time.monotonic() - began > 1.0, what="a second")
        second = Background(lambda: post_json(url, {"value": 2}, timeout=30))
        wait_queued(server.url, 2)
        wait_for(lambda: time.monotonic() - began > 2.25, what="request 1 to have 0.75 s left")
        gate.touch()  # the held batch ends 0.5 s later: request 1 then has 0.25 s left
        answers = held.result(), first.result(), second.result()
        assert post_json(url, {"value": 3}) == (200, {"value": 3})  # nothing left to pass over
        stats = server.stats()
    assert answers[0] == (200, {"value": -1}) and answers[2] == (200, {"value": 2})
    status, body = answers[1]
    assert status == 504
    if order == "deadline":
        assert "ran" not in body["error"] and _forward_order(log) == [[0], [0], [-1], [2], [3]]
        assert stats["passed_over"] == 1
        assert "overloaded: requests with less time left than the quickest recent batch took" in caplog.text
        assert "the queue has caught up" in caplog.text
    else:
        assert "ran" in body["error"] and _forward_order(log) == [[0], [0], [-1], [1], [2], [3]]
        assert stats["passed_over"] == 0 and "overloaded" not in caplog.text


def test_a_models_slow_first_batch_is_not_taken_for_what_a_batch_costs(serve):
    """The first batch takes 1.8 s (warm-up), later ones 0.1 s a request. Taken for a batch's cost, it
    had the 8 requests of a burst passed over for 8 that came later: they then ran past their deadline,
    where arrival order answers all 17 in time. A process's first batch is not counted now."""
    with serve("handles_robust:SlowFirstBatch", HandleArgs={"first_s": 1.8, "s": 0.1}, MaxBatchSize=8,
               MaxWaitMs=0, TimeoutS=3) as server:
        url = server.url + "/predict"
        began = time.monotonic()

        def at(delay: float, n: str):
            return Background(lambda: (time.sleep(max(0.0, began + delay - time.monotonic())),
                                       post_json(url, {"n": n}, timeout=30))[1])

        sent = [at(0.0, "first")] + [at(0.05, f"burst{i}") for i in range(8)]
        sent += [at(0.9 + 0.1 * i, f"stream{i}") for i in range(8)]
        answers = [background.result() for background in sent]
        stats = server.stats()
    assert [status for status, _ in answers] == [200] * 17, answers
    assert stats["passed_over"] == 0


def test_a_first_batch_that_warms_the_model_up_past_timeout_s_is_not_killed_as_stuck(serve, caplog):
    """A model compiled on its first call (torch.compile) for longer than TimeoutS was killed as stuck,
    and the next process compiled it again, for ever: every request a 504. FirstBatchTimeoutS gives a
    process's first batch longer; its request still gets its 504 at TimeoutS, and the log says why."""
    with serve("handles_robust:SlowFirstBatch", HandleArgs={"first_s": 2.5, "s": 0.01}, TimeoutS=1,
               FirstBatchTimeoutS=10) as server:
        pid = server.workers[0]["pid"]
        # a batch refused whole in preprocess ran no model: the next is still the first the model runs
        assert post_json(server.url + "/predict", {"refuse": True})[0] == 400
        first = post_json(server.url + "/predict", {"n": "first"}, timeout=30)
        wait_for(lambda: server.workers[0]["state"] == "idle", 10, "the first batch to end")
        later = post_json(server.url + "/predict", {"n": "later"}, timeout=30)
        assert server.workers[0]["pid"] == pid and server.stats()["restarts"] == 0
    assert first[0] == 504 and later == (200, {"n": "later"})
    warned = [r.getMessage() for r in caught(caplog) if "first batch has run past TimeoutS" in r.getMessage()]
    assert len(warned) == 1 and "warming the model up in setup()" in warned[0], warned


@pytest.mark.parametrize("first", [None, 1.5])
def test_a_first_batch_past_its_time_is_killed_saying_how_to_give_it_more(serve, caplog, first):
    """Without FirstBatchTimeoutS, a first batch has TimeoutS, as any: a request that hangs a fresh
    worker holds it no longer. Killed, its worker says why, and the way out."""
    with serve("handles_robust:SlowFirstBatch", HandleArgs={"first_s": 30, "s": 0.01}, TimeoutS=0.5,
               FirstBatchTimeoutS=first) as server:
        pid = server.workers[0]["pid"]
        status, body = post_json(server.url + "/predict", {"n": 1}, timeout=30)
        wait_for(lambda: server.workers[0]["pid"] not in (None, pid), 10, "the worker replaced")
    said = [r.getMessage() for r in caught(caplog)]
    key = "TimeoutS=0.5s" if first is None else "FirstBatchTimeoutS=1.5s"
    assert status == 504 and any(f"was killed: its first batch ran past {key} (a model that compiles or warms up on "
                                 "its first call: do that in setup(), or set FirstBatchTimeoutS)" in m for m in said)


def test_a_restarted_workers_first_batch_larger_than_any_before_is_not_said_to_be_a_warm_up_alone(serve, caplog):
    """Under a queue that built up while a worker restarted, its first batch, of MaxBatchSize requests, ran
    past TimeoutS, and the log named a warm-up on the first call as the cause, pointing at the wrong fix."""
    with serve("handles_robust:Sleeper", HandleArgs={"setup_s": 1}, TimeoutS=2, MaxBatchSize=4) as server:
        url = server.url + "/predict"
        assert post_json(url, {"sleep": 0.05})[0] == 200
        pid = server.workers[0]["pid"]
        os.kill(pid, signal.SIGKILL)
        # once its death is seen: a request sent before could reach it and be retried alone after it
        wait_for(lambda: server.workers[0]["pid"] != pid and server.workers[0]["state"] == "starting", 10, "a restart")
        queued = [Background(lambda: post_json(url, {"sleep": 3}, timeout=30)) for _ in range(4)]
        wait_queued(server.url, 4)  # while the worker sets up again
        assert [call.result()[0] for call in queued] == [504] * 4
        wait_for(lambda: server.workers[0]["restarts"] == 2, 10, "the restarted worker killed in its turn")
    said = [r.getMessage() for r in caught(caplog) if "was killed" in r.getMessage()]
    assert any("was killed: its first batch, of 4 requests, ran past TimeoutS=2s (a batch that large may take "
               "longer than that: a smaller MaxBatchSize, or a longer TimeoutS; or a model that warms up" in m
               for m in said), said


def test_a_batch_killed_after_batches_that_all_failed_is_not_called_the_first(serve, caplog):
    """A process warms up on its first request answered: one whose batches had all failed, then hung,
    was said to have had "its first batch" run past its time, and told to compile its model in setup()."""
    with serve("handles_for_tests:Crashing", TimeoutS=0.5, MaxBatchSize=1) as server:
        pid = server.workers[0]["pid"]
        assert [post_json(server.url + "/predict", {"fail": True})[0] for _ in range(2)] == [500, 500]
        assert post_json(server.url + "/predict", {"sleep": 30}, timeout=30)[0] == 504
        wait_for(lambda: server.workers[0]["pid"] not in (None, pid), 10, "the worker replaced")
    said = [r.getMessage() for r in caught(caplog) if "was killed" in r.getMessage()]
    assert any("was killed: its batch ran past TimeoutS=0.5s, after 2 batch(es) that answered no request with "
               "success" in m for m in said), said
    assert not any("first batch" in m for m in said), said


def test_worker_that_keeps_failing_to_start_is_retried_with_backoff_and_ready_says_why(serve, tmp_path):
    marker = tmp_path / "broken"
    with serve("handles_for_tests:FailsOnRestart", HandleArgs={"marker": str(marker)}) as server:
        assert request(server.url + "/ready")[0] == 200
        marker.touch()
        os.kill(server.workers[0]["pid"], signal.SIGKILL)
        wait_for(lambda: server.workers[0]["state"] == "failed", timeout=30, what="three failed starts in a row")
        status, _, ready = request(server.url + "/ready")
        predict = post_json(server.url + "/predict", {"value": 1})
        # never given up: the attempts go on, each after a longer wait (0.5 s, 1 s, 2 s, 4 s...)
        wait_for(lambda: server.workers[0]["restarts"] >= 5, timeout=30, what="a fifth attempt")
        worker_log = "\n".join(map(str, server.logs(tail=None)))
    assert status == 503 and ready["ready"] is False
    # what keeps it down is in its own log (Server.logs(), the dashboard), once while the fault lasts
    assert worker_log.count("RuntimeError: GPU out of memory while loading weights") == 1, worker_log
    assert "cpu/0" in worker_log and "could not start (attempt 1):\nTraceback" in worker_log
    assert "GPU out of memory while loading weights" in ready["error"]
    assert predict[0] == 503 and "no worker can run requests" in predict[1]["error"]
    # the next start's time in tenths of a second: in whole ones, under half a second said "retrying in 0s"
    assert re.search(r" \(retrying in \d+\.\ds\)$", predict[1]["error"]), predict[1]["error"]


@pytest.mark.parametrize("http_workers", [1, 2])
def test_ready_names_a_failed_starts_exception_and_only_readers_of_stats_its_message(serve, tmp_path, http_workers):
    """/ready is open to anyone (a load balancer needs no key), and a setup's message may hold a secret
    ("cannot connect to postgres://admin:password@db"): those who may not read /stats get its type."""
    marker = tmp_path / "broken"
    with serve("handles_for_tests:FailsOnRestart", HandleArgs={"marker": str(marker)}, ApiKey="k3y-s3cr3t",
               HttpWorkers=http_workers) as server:
        marker.touch()
        os.kill(server.workers[0]["pid"], signal.SIGKILL)
        wait_for(lambda: server.workers[0]["state"] == "failed", timeout=30, what="three failed starts in a row")
        keyed = {"Authorization": "Bearer k3y-s3cr3t"}
        stranger = request(server.url + "/ready")
        wrong_host = request(server.url + "/ready", headers={**keyed, "Host": "evil.example"})
        reader = request(server.url + "/ready", headers=keyed)
        v2_stranger = request(server.url + "/v2/health/ready")
        v2_reader = request(server.url + "/v2/health/ready", headers=keyed)
    brief = "cpu/0 is failed: RuntimeError (its message: /stats, and the server's log)"
    assert stranger[0] == wrong_host[0] == 503 and stranger[2]["error"] == wrong_host[2]["error"] == brief
    assert "workers" not in stranger[2] and "workers" not in wrong_host[2]
    assert reader[0] == 503 and "RuntimeError: GPU out of memory while loading weights" in reader[2]["error"]
    assert v2_stranger[0] == 400 and v2_stranger[2]["error"] == brief
    assert "GPU out of memory" in v2_reader[2]["error"]


@pytest.mark.parametrize("secret", ["lines", "note"])
def test_ready_shows_no_line_of_a_failed_starts_message_when_its_last_is_not_the_exceptions(serve, tmp_path,
                                                                                           secret):
    """The last line of a traceback is the exception's own only when its message is one line and no
    note was added to it: a message's second line, or a note, went to /ready whole."""
    marker = tmp_path / "broken"
    with serve("handles_for_tests:FailsOnRestart", HandleArgs={"marker": str(marker), "secret": secret},
               ApiKey="k3y-s3cr3t") as server:
        marker.touch()
        os.kill(server.workers[0]["pid"], signal.SIGKILL)
        wait_for(lambda: server.workers[0]["state"] == "failed", timeout=30, what="three failed starts in a row")
        stranger = request(server.url + "/ready")
        reader = request(server.url + "/ready", headers={"Authorization": "Bearer k3y-s3cr3t"})
    assert stranger[2]["error"] == ("cpu/0 is failed: its handle raised an exception (its message: /stats, and "
                                    "the server's log)"), stranger
    assert "hunter2" in reader[2]["error"]


def test_a_failed_starts_long_message_is_cut_where_clients_read_it(serve, tmp_path):
    # /ready (no API key, polled by load balancers) answered a setup's 1 MB message twice over, and every
    # request's 503 once, each encoded as JSON on the event loop
    marker = tmp_path / "broken"
    with serve("handles_for_tests:FailsOnRestart", HandleArgs={"marker": str(marker), "pad": 2**20}) as server:
        marker.touch()
        os.kill(server.workers[0]["pid"], signal.SIGKILL)
        wait_for(lambda: server.workers[0]["state"] == "failed", timeout=30, what="three failed starts in a row")
        status, _, ready = request(server.url + "/ready")
        predict = post_json(server.url + "/predict", {"value": 1})
    assert status == 503 and len(json.dumps(ready)) < 10_000, len(json.dumps(ready))  # the message is in it twice
    assert re.search(r"GPU out of memory while loading weightsq+ \.\.\. \[10\d{5} more characters\]$", ready["error"])
    assert predict[0] == 503 and len(predict[1]["error"]) < 5000, len(predict[1]["error"])
    assert predict[1]["error"].startswith("no worker can run requests: RuntimeError: GPU out of memory"), predict


def test_stop_with_drain_timeout_answers_503_for_what_is_left():
    from easyserve import Server

    server = Server(handle="handles_for_tests:Crashing", GPUs="cpu", Port=0, MaxBatchSize=1).start()
    try:
        url = server.url
        running = Background(lambda: post_json(url + "/predict", {"sleep": 5}))
        wait_busy(server)
        waiting = Background(lambda: post_json(url + "/predict", {"n": 1}))
        wait_queued(url, 1)
        begun = time.monotonic()
        server.stop(drain_timeout=0.2)
        took = time.monotonic() - begun
        ran, waited = running.result(10), waiting.result(10)
    finally:
        server.stop(drain_timeout=0)
    assert ran == (503, {"error": "server stopped while this request ran"})
    assert waited == (503, {"error": "server stopped before this request ran"})
    assert took < 4, f"stop(drain_timeout=0.2) took {took:.1f}s"


def test_a_stop_drains_for_as_long_as_timeout_s_allows_a_request_to_run():
    """The drain was 30 s whatever TimeoutS said: with TimeoutS 40, a request of 35 s got "server
    stopped while this request ran" (a 503 that nginx passed to another server, which ran it again).
    Now a drain lasts TimeoutS, and a few seconds more. (A test of 31 s: nothing shorter shows it.)"""
    from easyserve import Server

    server = Server(handle="handles_for_tests:Crashing", GPUs="cpu", Port=0, TimeoutS=36).start()
    try:
        running = Background(lambda: post_json(server.url + "/predict", {"sleep": 31}, timeout=60))
        wait_busy(server)
        server.stop()
        assert running.result(10)[0] == 200
    finally:
        server.stop(drain_timeout=0)


def test_new_requests_get_503_while_draining():
    # A stopping server stops listening at once (new connections are refused, so clients and a proxy go
    # elsewhere) and answers a request on a connection already open with 503, closing that connection.
    from easyserve import Server

    server = Server(handle="handles_for_tests:Crashing", GPUs="cpu", Port=0).start()
    try:
        url = server.url
        load = Background(lambda: post_json(url + "/predict", {"sleep": 1.0}))
        pid = wait_busy(server)[0]["pid"]
        with KeptAlive(url) as one, KeptAlive(url) as another:
            stopper = Background(server.stop)
            wait_draining(url)
            late = one.send("POST", "/predict", {"n": 1})
            ready = another.send("GET", "/ready")
        stopper.result(10)
        slow = load.result(10)
    finally:
        server.stop(drain_timeout=0)
    assert slow == (200, {"echo": {"sleep": 1.0}, "pid": pid})  # the request in flight was drained
    assert (late[0], late[2]) == (503, {"error": "server is shutting down"}) and late[1]["Connection"] == "close"
    assert late[1]["Retry-After"] == "1"
    assert ready[0] == 503 and ready[2]["ready"] is False and ready[2]["error"] == "server is shutting down"


def test_a_worker_that_keeps_dying_before_answering_backs_off_and_recovers(serve, caplog, tmp_path):
    # A process that dies by itself before it answers anything (not under a request: that is the
    # request's doing, and it is retried alone) is a crash loop: its restarts back off.
    marker = tmp_path / "crash-after-ready"
    with serve("handles_ops:DiesAfterReady", HandleArgs={"marker": str(marker)}) as server:
        marker.touch()
        os.kill(server.workers[0]["pid"], signal.SIGKILL)
        wait_for(lambda: server.workers[0]["restarts"] >= 3, what="the restarts to die by themselves")
        marker.unlink()
        wait_for(lambda: server.workers[0]["state"] == "idle", timeout=20, what="the restart after the backoff")
        after = post_json(server.url + "/predict", {"n": 1})
    records.flush()
    assert "keeps dying before it answers anything; restarting it in 0.5s" in caplog.text
    assert after[0] == 200


def test_a_retried_request_adds_only_its_time_in_the_queue_to_queue_wait_s(serve, tmp_path):
    journal = tmp_path / "journal.txt"
    with serve("handles_robust:Sleeper", HandleArgs={"journal": str(journal)}) as server:
        # runs 2 s: the kill half a second in must land while it runs, however late this thread wakes
        answer = Background(lambda: post_json(server.url + "/predict", {"mark": "m", "sleep": 2}))
        pid = wait_busy(server)[0]["pid"]
        wait_for(journal.exists, what="the first run to begin")
        time.sleep(0.5)  # the first run lasts half a second before its worker dies
        os.kill(pid, signal.SIGKILL)
        answered = answer.result(30)
        stats = request(server.url + "/stats")[2]
    assert answered == (200, {"mark": "m", "sleep": 2}) and journal.read_text().split() == ["m", "m"]
    # in the queue: before the first run, and while the worker was replaced; not the half second it ran
    # on the worker that died, nor the second run's two seconds
    assert 0 < stats["queue_wait_s"] < answer.took - 2.5, (stats, answer.took)


def test_a_worker_that_keeps_failing_to_start_says_so_at_attempts_2_4_8_not_each_one(serve, tmp_path, caplog,
                                                                                     monkeypatch):
    """Every attempt logged an ERROR, every 10 s for as long as the fault lasted: in a notebook, in
    whichever cell ran. The traceback once, then a line at attempts 2, 4, 8, 16..."""
    from easyserve import watchdog

    monkeypatch.setattr(watchdog, "MAX_BACKOFF_S", 0.05)
    marker = tmp_path / "cannot-start"
    with serve("handles_for_tests:FailsOnRestart", HandleArgs={"marker": str(marker)}) as server:
        marker.touch()
        with caplog.at_level(logging.DEBUG, logger="easyserve"):
            os.kill(server.workers[0]["pid"], signal.SIGKILL)
            wait_for(lambda: server.workers[0]["restarts"] >= 10, 30, "ten attempts")
        marker.unlink()
        wait_for(lambda: server.workers[0]["state"] == "idle", 30, "the worker back")
    said = [(r.levelname, r.getMessage()) for r in caught(caplog) if "start (attempt" in r.getMessage()]
    errors = [message for level, message in said if level == "ERROR"]
    assert re.match(r"worker cpu/0 could not start \(attempt 1\); retrying in .*\nTraceback", errors[0]), errors
    assert [re.search(r"attempt (\d+)", m).group(1) for m in errors[1:4]] == ["2", "4", "8"], errors
    assert errors[1].endswith("(said again at attempt 4)")
    assert any(level == "DEBUG" and "(attempt 3)" in message for level, message in said)


def test_a_worker_started_after_easyserves_code_changed_on_disk_refuses_to_run_it(tmp_path):
    """An upgrade, a git pull or an edit under a live server: each worker it started again ran the new code
    against the old server's messages, failed its first batch, and was started again at once (71 restarts
    in 55 s, a third of the answers 500s). It now refuses to start, saying why, backing off; the workers
    already running serve on."""
    shutil.copytree(Path(easyserve.__file__).parent, tmp_path / "easyserve",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "easyserve.cli", "run", "--port", "0", "--gpus", "cpu",
                             "--process-per-gpu", "2", "--http-workers", "2"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    try:
        url = wait_for_url(proc, lines)
        reader.start()
        assert post_json(url + "/predict", {"x": [5.1, 3.5, 1.4, 0.2]})[0] == 200
        with open(tmp_path / "easyserve" / "handle.py", "a") as f:
            f.write("\n# a line more: other code\n")
        first = request(url + "/ready")[2]["workers"][0]
        os.kill(first["pid"], signal.SIGKILL)
        ready = wait_for(lambda: (lambda r: "degraded" in r and "code on disk has changed" in r["degraded"]
                                    and r)(request(url + "/ready")[2]), what="the refusal, in /ready")
        assert ready["ready"] is True and "restart the server to run the new code" in ready["degraded"], ready
        # an HTTP front started again refuses as well, and the other goes on
        os.kill(worker_children(proc.pid, b"easyserve.front")[0], signal.SIGKILL)
        wait_for(lambda: "an HTTP front started now would run other code" in "".join(lines), what="its refusal")
        # the other worker and front, of the old code, serve on
        assert [post_json(url + "/predict", {"x": [5.1, 3.5, 1.4, 0.2]})[0] for _ in range(5)] == [200] * 5
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        if reader.is_alive():
            reader.join(10)
        proc.stdout.close()
    text = "".join(lines)
    assert "could not start (attempt 1)" in text and "restart the server to run the new code" in text, text
    assert "Traceback" not in text, text


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def test_a_killed_worker_that_cannot_be_reaped_yet_does_not_hold_up_the_server(serve, tmp_path):
    """A worker that closed its connection but lived on is killed after EXIT_GRACE_S, and was then waited
    for on the event loop: a process that takes its time to go once killed (a GPU driver releasing its
    memory, a debugger holding it) held every request, /health included, until it was reaped. Here a
    debugger's hold (ptrace) keeps the killed worker from being reaped; the other worker serves on."""
    dropped = tmp_path / "dropped"
    with serve("handles_robust:DropsItsLink", ProcessPerGPU=2, HandleArgs={"linger_s": 60}) as server:
        url = server.url
        status, answer = post_json(url + "/predict", {"drop": 0.2, "dropped": str(dropped)})
        assert status == 200
        held = answer["pid"]
        with held_by_debugger(held):
            wait_for(dropped.exists, what="the worker to end its connection")
            wait_for(lambda: _zombie(held), what="the worker to be killed (it lives on past EXIT_GRACE_S)")
            assert request(url + "/health", timeout=5)[0] == 200
            answers = [post_json(url + "/predict", {"value": i}, timeout=5) for i in range(5)]
            assert [status for status, _ in answers] == [200] * 5
            assert all(answer["pid"] != held for _, answer in answers)
            name = next(w["name"] for w in server.workers if w["pid"] == held)
            assert request(url + "/ready", timeout=5)[2]["degraded"] == f"{name} is dead"
        # let go, it is reaped at last, and its slot started again
        wait_for(lambda: held not in {w.get("pid") for w in server.workers} and
                 all(w["state"] == "idle" for w in server.workers), 30, "the worker's replacement")


def test_a_server_whose_only_worker_is_killed_but_not_reaped_is_not_ready(serve, tmp_path):
    """A worker whose process is gone keeps its last state (idle) until it is reaped, which a killed one
    held by a GPU driver or a debugger may not be for a long while: /ready said 200, and a load balancer
    sent requests that could only wait for their 504."""
    dropped = tmp_path / "dropped"
    with serve("handles_robust:DropsItsLink", ProcessPerGPU=1, HandleArgs={"linger_s": 60}) as server:
        url = server.url
        held = post_json(url + "/predict", {"drop": 0.2, "dropped": str(dropped)})[1]["pid"]
        with held_by_debugger(held):
            wait_for(lambda: _zombie(held), what="the worker to be killed (it lives on past EXIT_GRACE_S)")
            assert [(w["pid"], w["state"]) for w in server.workers] == [(held, "dead")]  # not reaped yet
            status, _, answer = request(url + "/ready", timeout=5)
            assert (status, answer["error"]) == (503, f"{server.workers[0]['name']} is dead"), answer
        wait_for(lambda: request(url + "/ready", timeout=5)[0] == 200, 30, "the worker's replacement ready")
        assert server.workers[0]["pid"] != held


def test_a_worker_that_closed_its_connection_and_lives_on_is_said_to_be_killed(serve, tmp_path, caplog):
    """Killed after EXIT_GRACE_S, such a worker's end said only that it "died with signal 9 (SIGKILL)", as if
    something else (the kernel's OOM killer) had killed it; and while it was not reaped, nothing at all."""
    caplog.set_level(logging.WARNING, logger="easyserve")
    dropped = tmp_path / "dropped"
    with serve("handles_robust:DropsItsLink", ProcessPerGPU=1, HandleArgs={"linger_s": 60}) as server:
        held = post_json(server.url + "/predict", {"drop": 0.2, "dropped": str(dropped)})[1]["pid"]
        wait_for(lambda: not _alive(held), 15, "the lingering worker to be killed")
        said = wait_for(lambda: next((r.getMessage() for r in caplog.records if "killing it" in r.getMessage()), None),
                        5, "the kill to be logged")
        assert said == (f"worker cpu/0 (pid {held}) closed its connection to the server and had not exited "
                        f"{easyserve.watchdog.EXIT_GRACE_S:g}s later: killing it")
        # and its death, once reaped, says why it was killed, not only "died with signal 9 (SIGKILL)"
        death = wait_for(lambda: next((r.getMessage() for r in caplog.records if f"(pid {held})" in r.getMessage()
                                       and "killing it" not in r.getMessage()), None), 15, "its death to be logged")
        assert death == (f"worker cpu/0 (pid {held}) was killed: it closed its connection to the server and had not "
                         f"exited {easyserve.watchdog.EXIT_GRACE_S:g}s later"), death


def test_a_worker_stopped_with_sigstop_is_let_go_on_and_one_that_writes_no_stacks_says_why(serve, caplog):
    """A stopped process holds the signal that asks for its stacks: the log said it was stuck, and nothing
    of where, or why. It is let go on (SIGCONT) first: one that was not stuck finishes, and is replaced
    between batches. One whose handle takes the signal for its own writes none, and the log says so."""
    caplog.set_level(logging.INFO, logger="easyserve")
    with serve("handles_ops:StuckHere", TimeoutS=1, HandleArgs={"forward_s": 0}) as server:
        assert post_json(server.url + "/predict", {"n": 1})[0] == 200
        pid = server.workers[0]["pid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            assert post_json(server.url + "/predict", {"n": 2})[0] == 504
            wait_for(lambda: server.workers[0]["pid"] != pid and server.workers[0]["state"] == "idle",
                     what="its replacement")
        finally:
            if _alive(pid):
                os.kill(pid, signal.SIGCONT)
        assert server.stats()["replacements"]["stuck"] == 1
        assert post_json(server.url + "/predict", {"n": 3})[0] == 200
    # said to be stopped, not stuck: a slow model was all the log told of
    said = [r.getMessage() for r in caught(caplog)]
    assert f"worker cpu/0 (pid {pid}) is stopped (SIGSTOP, or a debugger), past its batch's time: let go on to " \
           "write where it was, then killed if its batch goes on" in said, said
    assert any(f"replacing worker cpu/0 (pid {pid}): it had been stopped (SIGSTOP, or a debugger) past its batch's "
               "time, and finished once let go on" in m for m in said), said
    with serve("handles_ops:StuckHere", TimeoutS=0.5, HandleArgs={"own_sigusr2": True}) as server:
        assert post_json(server.url + "/predict", {"n": 1})[0] == 504
        said = wait_for(lambda: [r.getMessage() for r in caught(caplog) if "was stuck here" in r.getMessage()],
                        what="why it said nothing")
    assert said[0].endswith("(it wrote none within 0.3 s: held by a debugger, or its handle takes SIGUSR2 for its "
                            "own)"), said[0]
