"""A passing pause: every process of a server stopped and let go again (a paused container or virtual
machine, a laptop's sleep, a debugger), or the server process alone. What was healthy before is healthy
after: no worker killed as stuck or as slow to set up, no client's bytes that came in the pause taken
for a stall, no request run whose 504 was due. Real processes, signals and sockets."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from conftest import Background, post_json, wait_until, worker_children
from test_hostile import read_response
from test_http_workers import served_from_the_shell


def stats(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url + "/stats").read())


def every_process(proc) -> list[int]:
    """The server's process and its workers (each in a session of its own), as a paused machine stops them."""
    return [proc.pid, *worker_children(proc.pid)]


def send(pids: list[int], sig: int) -> None:
    for pid in pids:
        os.kill(pid, sig)


@contextlib.contextmanager
def held(proc, machine: bool = True) -> Iterator[None]:
    """Every process of the server stopped (a paused machine), or the server's alone, until the block ends."""
    pids = every_process(proc) if machine else [proc.pid]
    send(pids, signal.SIGSTOP)
    try:
        yield
    finally:
        send(pids, signal.SIGCONT)


def paused(proc, seconds: float, machine: bool = True) -> None:
    with held(proc, machine):
        time.sleep(seconds)


def stopped_cleanly(proc) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(30) == 0


def test_a_batch_held_with_its_worker_is_not_taken_for_stuck(tmp_path: Path):
    """A batch of 1.2 s of CPU, 0.5 s of it run before a 3 s pause of the whole machine, and TimeoutS 3: the
    worker was killed as stuck once the pause ended, its model to load again, though it had run 0.5 s. (It
    was given back only how late its timer ran, the pause's part past its limit: 0.5 s, and its 0.7 s left
    ended past that.) Not 2 s of CPU: on a busy CI machine its 1.5 s left took past the 2.5 s it had."""
    log = tmp_path / "log"
    config = {"Handle": "handles_ops:Burns", "HandleArgs": {"cpu_s": 1.2}, "TimeoutS": 3, "ProcessPerGPU": 1}
    with served_from_the_shell(tmp_path, log, **config) as (proc, url):
        pid = stats(url)["workers"][0]["pid"]
        late = Background(lambda: post_json(url + "/predict", {"n": 1}, timeout=30))
        wait_until(lambda: stats(url)["workers"][0]["state"] == "busy", 10, "the batch to start")
        time.sleep(0.5)
        paused(proc, 3)
        assert late.result(20)[0] == 504  # its client's time is its client's: 2 s had gone
        wait_until(lambda: stats(url)["workers"][0]["state"] == "idle", 10, "the batch to end")
        # a short batch: one of 2 s of CPU took past TimeoutS on a busy machine, and was rightly killed as stuck
        assert post_json(url + "/predict", {"n": 2, "cpu_s": 0.1}, timeout=30)[1]["pid"] == pid
        workers = stats(url)["workers"]
        stopped_cleanly(proc)
    assert workers[0]["pid"] == pid and workers[0]["restarts"] == 0, workers
    assert "is stuck" not in log.read_text()


def test_a_worker_that_was_set_up_while_the_server_was_held_is_not_killed_for_its_setups_time(tmp_path: Path):
    """A worker replacing a dead one set up (1.5 s of StartTimeoutS 3) while the server process was held
    for 5 s: its "ready" waited unread as the start's timer ran, which killed it, and the slot backed off."""
    log = tmp_path / "log"
    config = {"Handle": "handles_ops:Versioned", "HandleArgs": {"version": 1, "setup_s": 1.5}, "StartTimeoutS": 3,
              "ProcessPerGPU": 1}
    with served_from_the_shell(tmp_path, log, **config) as (proc, url):
        first = stats(url)["workers"][0]["pid"]
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: stats(url)["workers"][0]["pid"] not in (first, None), 10, "its replacement to start")
        paused(proc, 5, machine=False)
        wait_until(lambda: stats(url)["workers"][0]["state"] == "idle", 20, "the replacement to be ready")
        assert post_json(url + "/predict", {"n": 1}, timeout=30)[0] == 200
        workers = stats(url)["workers"]
        stopped_cleanly(proc)
    assert workers[0]["restarts"] == 1, workers  # the SIGKILL's alone
    assert "StartTimeoutS" not in log.read_text()


def _exchange_over_a_pause(url: str, proc, first: bytes, rest: bytes, then: bytes = b"",
                           pause: float = 3.0) -> tuple[int, bytes]:
    """Send ``first``, stop the server's whole group, send ``rest`` 0.2 s into a pause of ``pause`` s and
    ``then`` at its end, let the group go, and read the answer: (status, body)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(first)
        time.sleep(0.05)  # read by the server: the body's timer runs from it
        with held(proc):
            time.sleep(0.2)
            sock.sendall(rest)
            time.sleep(pause - 0.2)
            sock.sendall(then)
        status, _, body = read_response(sock)
    return status, body


def request_bytes(body: bytes, close: bool = True) -> bytes:
    return (b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n%s\r\n%s" % (len(body), b"Connection: close\r\n" if close else b"", body))


@pytest.mark.parametrize("where", ["between requests", "in the head", "in the body", "just past the body's time"])
def test_what_a_client_sent_during_a_pause_is_read_before_its_connection_is_judged(tmp_path: Path, where: str):
    """KeepAliveTimeoutS, HeaderTimeoutS and BodyTimeoutS of 1 s, and a pause of 3 s in which the client
    went on sending: its kept-alive connection was reset with its next request unread (the Client said the
    request may have run), its head taken for a slow loris's, its body for one that had stalled (408)."""
    body = b'{"value": 7}'
    whole = request_bytes(body)
    config = {"KeepAliveTimeoutS": 1, "HeaderTimeoutS": 1, "BodyTimeoutS": 1, "ProcessPerGPU": 1}
    with served_from_the_shell(tmp_path, **config) as (proc, url):
        if where == "between requests":
            host, port = url.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port)), timeout=20) as sock:
                sock.sendall(request_bytes(body, close=False))
                assert read_response(sock)[0] == 200
                # the same connection, its keep-alive deadline inside the pause
                with held(proc):
                    time.sleep(0.3)
                    sock.sendall(whole)
                    time.sleep(2.7)
                status, _, answer = read_response(sock)
        elif where == "in the head":
            cut = whole.index(b"Content-Type")
            status, answer = _exchange_over_a_pause(url, proc, whole[:cut], whole[cut:])
        elif where == "in the body":
            cut = whole.index(body) + 3
            status, answer = _exchange_over_a_pause(url, proc, whole[:cut], whole[cut:-3], whole[-3:])
        else:  # a hold that ends within a moment of the body's deadline: its timer barely late, the rest unread
            cut = whole.index(body) + 3
            status, answer = _exchange_over_a_pause(url, proc, whole[:cut], whole[cut:-3], whole[-3:], pause=1.1)
        assert status == 200 and json.loads(answer)["value"] == 7.0, answer
        stopped_cleanly(proc)


@pytest.mark.parametrize("s, timeout_s, pause", [(1.0, 2, 3.0), (2.5, 4.5, 3.2)],
                         ids=["due in the pause", "due as it runs after the pause"])
def test_a_request_queued_while_the_server_process_was_held_is_run_once_it_goes_on(tmp_path: Path, s: float,
                                                                                     timeout_s: float, pause: float):
    """One worker on a batch of ``s`` seconds, a second request queued behind it, and the server process held
    for ``pause`` s, the first batch ending in it: the queued request's wait counted the pause, in which the
    server did nothing, against its TimeoutS. Its deadline came in the pause (looked at once more after a read,
    it got 504 as the pause ended, the worker idle), or as it ran once let go on. Either way it runs, once, and
    is answered."""
    config = {"Handle": "handles_ops:Versioned", "HandleArgs": {"version": 1, "s": s}, "TimeoutS": timeout_s,
              "ProcessPerGPU": 1, "MaxBatchSize": 1}
    with served_from_the_shell(tmp_path, **config) as (proc, url):
        running = Background(lambda: post_json(url + "/predict", {"n": 1}, timeout=30))
        wait_until(lambda: stats(url)["workers"][0]["state"] == "busy", 10, "the first batch to start")
        queued = Background(lambda: post_json(url + "/predict", {"n": 2}, timeout=30))
        wait_until(lambda: stats(url)["queue_depth"] == 1, 10, "the second request to wait")
        paused(proc, pause, machine=False)
        assert running.result(20)[0] == 200  # it had been answered in the pause
        status, answer = queued.result(20)
        assert status == 200 and answer["n"] == 2, answer
        after = stats(url)
        assert after["workers"][0]["batches"] == 2 and after["workers"][0]["restarts"] == 0, after["workers"]
        assert after["statuses"] == {"200": 2}, after["statuses"]
        stopped_cleanly(proc)


def test_a_keep_alive_timer_run_before_its_deadline_with_a_request_unread_keeps_the_connection(tmp_path: Path):
    """aiohttp's keep-alive timer stays where the first answer set it, and a later answer moves only its
    deadline: run early with a request's head unread (the server held a moment), it looked again 0.1 s
    later and closed the connection, 1.7 s into a keep-alive of 2 s."""
    body = b'{"value": 7}'
    whole = request_bytes(body)
    cut = whole.index(b"Content-Type")
    config = {"KeepAliveTimeoutS": 2, "HeaderTimeoutS": 10, "BodyTimeoutS": 10, "ProcessPerGPU": 1}
    with served_from_the_shell(tmp_path, **config) as (proc, url):
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=20) as sock:
            sock.sendall(request_bytes(body, close=False))
            assert read_response(sock)[0] == 200
            first = time.monotonic()  # the timer: at first + 2
            time.sleep(1.0)
            sock.sendall(request_bytes(body, close=False))
            assert read_response(sock)[0] == 200  # the deadline: about first + 3; the timer stays
            time.sleep(max(0.0, first + 1.8 - time.monotonic()))
            with held(proc, machine=False):  # around the timer's time
                time.sleep(0.1)
                sock.sendall(whole[:cut])  # the next request's head begins
                time.sleep(0.4)
            time.sleep(0.4)
            sock.sendall(whole[cut:])
            status, _, answer = read_response(sock)
        assert status == 200, answer
        stopped_cleanly(proc)
