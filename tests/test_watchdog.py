"""The watchdog with real processes: crashes, hangs, restarts, a handle that cannot start again."""

from __future__ import annotations

import os
import signal
import threading
import time

from conftest import _alive, post_json, post_many, request


def wait_for(condition, timeout: float = 20.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def ready_workers(server) -> list[dict]:
    return [w for w in server.workers if w["state"] in ("idle", "busy")]


def test_killed_worker_is_noticed_restarted_and_counted(serve):
    with serve("handles_for_tests:Crashing", ProcessPerGPU=2) as server:
        victim = server.workers[0]
        os.kill(victim["pid"], signal.SIGKILL)
        wait_for(lambda: server.workers[0]["restarts"] == 1 and server.workers[0]["state"] == "idle", what="restart")
        assert server.workers[0]["pid"] != victim["pid"] and not _alive(victim["pid"])
        status, _, stats = request(server.url + "/stats")
        assert stats["restarts"] == 1
        assert request(server.url + "/ready")[2]["workers"][0]["restarts"] == 1
        assert "restarts=1" in repr(server)
        assert post_many(server.url + "/predict", [{"n": i} for i in range(10)])[-1][0] == 200


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
    assert "worker died with signal 9 (SIGKILL) while running this request" in poisoned[1]["error"]
    assert "retried once" in poisoned[1]["error"]
    others = results[:10] + results[11:]
    assert [s for s, _ in others] == [200] * 20
    assert after[0] == 200


def test_exit_code_is_named_too(serve):
    with serve("handles_for_tests:Crashing") as server:
        status, body = post_json(server.url + "/predict", {"die": "exit"})
    assert status == 500 and "worker exited with code 3 while running this request" in body["error"]


def test_sigkill_from_outside_under_concurrent_load_loses_nothing(serve):
    with serve("handles_for_tests:Crashing", ProcessPerGPU=2, MaxBatchSize=4) as server:
        bodies = [{"n": i, "sleep": 0.005} for i in range(300)]
        result: list = []
        load = threading.Thread(target=lambda: result.extend(post_many(server.url + "/predict", bodies, 16)))
        load.start()
        for _ in range(3):
            time.sleep(0.3)
            pid = next(w["pid"] for w in server.workers if w["state"] in ("idle", "busy"))
            os.kill(pid, signal.SIGKILL)
        load.join(60)
        restarts = sum(w["restarts"] for w in server.workers)
    assert len(result) == 300
    assert [b["echo"]["n"] for s, b in result] == list(range(300))
    assert all(status == 200 for status, _ in result)
    assert restarts == 3


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
        first: list = []
        blocker = threading.Thread(target=lambda: first.append(post_json(server.url + "/predict", {"sleep": 3})))
        blocker.start()
        time.sleep(0.2)  # the only worker is busy: the next request can only wait in the queue
        status, body = post_json(server.url + "/predict", {"n": 1})
        blocker.join(10)
    assert status == 504 and "it waited 0.8" in body["error"] and "in the queue" in body["error"]
    assert first[0][0] == 504 and "ran" in first[0][1]["error"]


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
    assert status == 503 and ready["ready"] is False
    assert "GPU out of memory while loading weights" in ready["error"]
    assert predict[0] == 503 and "no worker can run requests" in predict[1]["error"]


def test_stop_with_drain_timeout_answers_503_for_what_is_left(serve):
    from easyserve import Server

    server = Server(handle="handles_for_tests:Crashing", GPUs="cpu", Port=0, MaxBatchSize=1).start()
    result: list = []
    load = threading.Thread(target=lambda: result.extend(
        post_many(server.url + "/predict", [{"sleep": 2}, {"n": 1}], concurrency=2)))
    load.start()
    time.sleep(0.3)
    begun = time.monotonic()
    server.stop(drain_timeout=0.2)
    took = time.monotonic() - begun
    load.join(10)
    assert sorted(s for s, _ in result) == [503, 503]
    assert all("server stopped" in b["error"] for _, b in result)
    assert took < 8


def test_new_requests_get_503_while_draining(serve):
    from easyserve import Server

    server = Server(handle="handles_for_tests:Crashing", GPUs="cpu", Port=0).start()
    url = server.url
    slow: list = []
    load = threading.Thread(target=lambda: slow.append(post_json(url + "/predict", {"sleep": 1.0})))
    load.start()
    time.sleep(0.2)
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    time.sleep(0.2)
    late = post_json(url + "/predict", {"n": 1})
    ready = request(url + "/ready")
    stopper.join(10)
    load.join(10)
    assert slow == [(200, {"echo": {"sleep": 1.0}, "pid": slow[0][1]["pid"]})]
    assert late == (503, {"error": "server is shutting down"})
    assert ready[0] == 503 and "shutting down" in ready[2]["error"]


def test_a_worker_that_keeps_dying_before_answering_backs_off_and_recovers(serve, caplog):
    with serve("handles_for_tests:Crashing") as server:
        poisoned = post_json(server.url + "/predict", {"die": "kill"})  # kills the worker, then its retry
        wait_for(lambda: server.workers[0]["state"] == "idle", what="the restart after the backoff")
        after = post_json(server.url + "/predict", {"n": 1})
    assert poisoned[0] == 500
    assert "keeps dying before it answers anything; restarting it in 0.5s" in caplog.text
    assert after[0] == 200
