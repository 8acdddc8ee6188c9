"""HttpWorkers: several HTTP front processes on one port, feeding one queue. Real processes and sockets.

The drain and gone-client tests of test_hostile.py and test_robustness.py run with HttpWorkers 2 too."""

from __future__ import annotations

import concurrent.futures
import gzip
import json
import os
import signal
import time
import urllib.error

import pytest
from conftest import _alive, http, post_json, request

from easyserve import Server, StartupError

AUTH = {"Authorization": "Bearer s3cret-key"}


def front_pids(server: Server, tries: int = 40) -> set[int]:
    """The processes answering /health, each on a fresh connection (the kernel spreads those)."""
    pids = set()
    for _ in range(tries):
        try:
            pids.add(request(server.url + "/health")[2]["pid"])
        except (ConnectionError, urllib.error.URLError):  # see test_a_killed_front_is_replaced...
            pass
    return pids


def wait_until(check, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.05)
    return False


def test_fronts_share_the_port_and_feed_one_queue(serve):
    with serve(HttpWorkers=2, MaxBatchSize=8, HandleArgs={"delay": 0.01}) as server:
        pids = front_pids(server)
        assert len(pids) == 2 and os.getpid() not in pids, pids  # the server process serves no HTTP itself

        def one(i: int) -> tuple[int, dict]:
            return post_json(server.url + "/predict", {"value": i})

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(one, range(300)))
        assert [status for status, _ in answers] == [200] * 300
        assert [body["value"] for _, body in answers] == list(range(300))
        assert len({body["pid"] for _, body in answers}) == 1  # one worker served both fronts' requests...
        assert max(body["batch_size"] for _, body in answers) > 1  # ...in batches

        stats = server.stats()  # every answer counted once, in the server process
        assert stats["statuses"] == {"200": 300} and stats["requests"] == 300
        status, _, ready = request(server.url + "/ready")
        assert status == 200 and ready["ready"] is True and ready["workers"][0]["state"] in ("idle", "busy")
        status, _, text = http("GET", server.url + "/metrics")
        assert status == 200 and 'easyserve_requests_total{status="200"} 300.0' in text
        fronts = [pid for pid in front_pids(server, 10)]
    for pid in fronts:
        assert not _alive(pid), f"front {pid} outlived stop()"


def test_fronts_check_requests_as_one_process_does(serve):
    with serve("easyserve.builtin:Demo", HttpWorkers=2, ApiKey="s3cret-key", MaxBodyMB=1) as server:
        url = server.url
        assert request(url + "/predict", b'{"x": [1, 2, 3, 4]}', {"Content-Type": "application/json"})[0] == 401
        status, _, body = request(url + "/predict", b'{"x": [1, 2,', {**AUTH, "Content-Type": "application/json"})
        assert status == 400 and "not valid JSON" in body["error"]
        status, _, body = request(url + "/predict", b'{"x": [1, 2, 3, 4]}', {**AUTH, "Content-Type": "application/json"})
        assert status == 200 and body["label"] in ("setosa", "versicolor", "virginica")
        big = gzip.compress(json.dumps({"x": "a" * 3_000_000}).encode())  # inflates past MaxBodyMB
        status, _, body = request(url + "/predict", big, {**AUTH, "Content-Type": "application/json",
                                                          "Content-Encoding": "gzip"})
        assert status == 413 and "MaxBodyMB" in body["error"]
        # the Open Inference Protocol: the model's metadata reached the fronts from the workers
        status, _, meta = request(url + "/v2/models/Demo", headers=AUTH)
        assert status == 200 and meta["inputs"][0]["name"]
        infer = {"inputs": [{"name": meta["inputs"][0]["name"], "shape": [4], "datatype": "FP32",
                             "data": [5.1, 3.5, 1.4, 0.2]}]}
        status, _, body = request(url + "/v2/models/Demo/infer", json.dumps(infer).encode(),
                                  {**AUTH, "Content-Type": "application/json"})
        assert status == 200 and body["model_name"] == "Demo" and body["outputs"]
        assert http("GET", url + "/v2/health/ready")[0] == 200
        status, _, stats = request(url + "/stats", headers=AUTH)
        assert status == 200 and stats["statuses"] == {"200": 2, "400": 1, "401": 1, "413": 1}, stats["statuses"]
        assert request(url + "/stats")[0] == 401


def test_a_killed_front_is_replaced_and_the_others_go_on(serve):
    with serve(HttpWorkers=2) as server:
        before = front_pids(server)
        victim = min(before)
        # Connections the killed front held, or that reached its socket's backlog as it died, are
        # reset, as with a killed server (Linux's net.ipv4.tcp_migrate_req=1 moves the backlog's to
        # the other fronts); new ones reach the others.
        os.kill(victim, signal.SIGKILL)
        # the other front answers meanwhile; a new one takes the dead one's place
        assert wait_until(lambda: len(front_pids(server, 10) - {victim}) == 2, 15), front_pids(server)
        assert victim not in front_pids(server)
        answers = [post_json(server.url + "/predict", {"value": i}) for i in range(50)]
        assert [status for status, _ in answers] == [200] * 50
        assert server.workers[0]["restarts"] == 0 and request(server.url + "/ready")[0] == 200
        fronts = front_pids(server, 10)
    for pid in fronts:
        assert not _alive(pid), f"front {pid} outlived stop()"


def test_a_port_held_by_fronts_is_not_shared_with_another_server(serve):
    # SO_REUSEPORT would let a second server's fronts bind the port too and quietly take half the traffic
    with serve(HttpWorkers=2) as server:
        for http_workers in (2, 1):
            other = Server(handle="handles_for_tests:Recorder", GPUs="cpu", Port=server.port, HttpWorkers=http_workers)
            with pytest.raises(StartupError, match="cannot listen"):
                other.start(timeout=60)
        assert post_json(server.url + "/predict", {"value": 7})[0] == 200
