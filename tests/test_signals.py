"""Stop signals to a server run from the shell (easyserve.signals): ShutdownDelayS, a signal as the
server gets ready, a reload under way. Real processes, signals and sockets."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time

import pytest
from conftest import Background, _alive, post_json, request, wait_busy, wait_until
from test_handle_children import helpers, killed_after
from test_hostile import head, read_response
from test_http_workers import _answers, served_from_the_shell

from easyserve import Server
from easyserve.signals import SAME_STOP_S


def _raw(port: int, method: str, path: str, sock: socket.socket | None = None) -> tuple[int, dict, bytes]:
    """One request, on ``sock`` (kept open) or on a connection of its own."""
    body = b'{"value": 1}' if method == "POST" else b""
    lines = ("Content-Type: application/json", f"Content-Length: {len(body)}") if body else ()
    if sock is not None:
        sock.sendall(head(method, path, *lines) + body)
        return read_response(sock)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as own:
        own.sendall(head(method, path, *lines) + body)
        return read_response(own)


@pytest.mark.parametrize("http_workers", [1, 2])
def test_a_shutdown_delay_serves_on_not_ready_then_drains(tmp_path, http_workers):
    # Kubernetes takes a pod out of its Service while the pod already has SIGTERM: a port closed at
    # once refused the connections still sent to it. Through ShutdownDelayS it serves on, tells
    # probes it is not ready, and closes each connection it answers, so kept-alive clients move on.
    with served_from_the_shell(tmp_path, HttpWorkers=http_workers, ShutdownDelayS=6) as (proc, url):
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as kept:
            status, headers, _ = _raw(port, "POST", "/predict", kept)
            assert status == 200 and headers.get("connection") != "close"
            signalled = time.monotonic()  # before: the delay is timed from the signal, not from this line
            os.killpg(proc.pid, signal.SIGTERM)
            assert wait_until(lambda: _raw(port, "GET", "/ready")[0] == 503, 5)
            status, _, answer = _raw(port, "GET", "/ready")
            assert status == 503 and b"shutting down" in answer, answer
            assert _raw(port, "GET", "/v2/health/ready")[0] == 400  # the protocol's "not ready"
            assert _raw(port, "GET", "/health")[0] == 200  # alive: no probe should restart it
            status, headers, _ = _raw(port, "POST", "/predict", kept)  # the connection it had
            assert status == 200 and headers["connection"] == "close"
            status, headers, _ = _raw(port, "POST", "/predict")  # and new ones, still taken
            assert status == 200 and headers["connection"] == "close"
            assert time.monotonic() - signalled < 6  # all of that inside the delay
        assert wait_until(lambda: _answers(url + "/health") is None, 20)  # then the drain: refused
        assert time.monotonic() - signalled >= 6
        assert proc.wait(30) == 0


def test_a_second_signal_through_the_shutdown_delay_stops_at_once(tmp_path):
    log = tmp_path / "log"
    with served_from_the_shell(tmp_path, log, ShutdownDelayS=120) as (proc, url):
        os.killpg(proc.pid, signal.SIGTERM)
        assert wait_until(lambda: _answers(url + "/ready") == 503, 15)
        os.kill(proc.pid, signal.SIGHUP)  # a reload now would only be stopped: none begins
        assert wait_until(lambda: "SIGHUP: no reload: the server is stopping" in log.read_text(), 15)
        assert _answers(url + "/health") == 200 and _answers(url + "/ready") == 503
        time.sleep(SAME_STOP_S)  # sooner, it is the same stop come twice
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(20) == 0  # not the delay's 120 s
    text = log.read_text()
    assert "SIGTERM received: not ready, but still serving for 120 s (ShutdownDelayS), then draining" in text
    assert "second SIGINT: stopping now without draining" in text and "reloading" not in text, text


def test_one_stop_that_reaches_the_server_twice_drains(tmp_path):
    """systemd's stop, or Ctrl-C in a terminal, signals the process group; a wrapper in it (a shell's trap,
    runuser, timeout) passes the signal on to the server as well, a moment later. The second was taken for
    an operator's "stop now", and the request in flight was answered 503."""
    log = tmp_path / "log"
    with served_from_the_shell(tmp_path, log, ProcessPerGPU=1, MaxBatchSize=1, HandleArgs={"delay": 1.5}) as (
            proc, url):
        slow = Background(lambda: post_json(url + "/predict", {"value": 1}, timeout=30))
        wait_busy(url)
        os.kill(proc.pid, signal.SIGTERM)
        assert wait_until(lambda: "SIGTERM received" in log.read_text(), 10)
        os.kill(proc.pid, signal.SIGTERM)  # as the wrapper passes it on
        assert proc.wait(30) == 0
    assert slow.result(10)[0] == 200
    text = log.read_text()
    assert "SIGTERM again within 0.5 s: the same stop, sent twice" in text and "stopping now" not in text, text


@contextlib.contextmanager
def _stopped_in_a_reload(tmp_path, delay_s: float, setup_s: float, once: str):
    """``easyserve run`` serving ``Versioned`` 1 on two workers with ShutdownDelayS ``delay_s``, its file
    changed to version 2 (``setup_s`` to set up) and SIGHUP sent; SIGTERM once the log says ``once``.
    Yields the URL, the log and when the signal went; then the server must exit 0."""
    log = tmp_path / "log"
    settings = {"Handle": "handles_ops:Versioned", "ProcessPerGPU": 2, "MaxBatchSize": 1, "ShutdownDelayS": delay_s}
    with served_from_the_shell(tmp_path, log, **settings, HandleArgs={"version": 1}) as (proc, url):
        path = tmp_path / "config.yaml"
        written = json.loads(path.read_text())
        path.write_text(json.dumps({**written, "HandleArgs": {"version": 2, "setup_s": setup_s}}))
        os.kill(proc.pid, signal.SIGHUP)
        assert wait_until(lambda: once in log.read_text(), 20)
        os.kill(proc.pid, signal.SIGTERM)
        yield url, log, time.monotonic()
        assert proc.wait(30) == 0


def test_a_reload_under_way_when_the_shutdown_delay_begins_is_abandoned(tmp_path):
    # it went on through the delay: a model loaded for a server about to exit, and the old and new
    # handles answered in turn meanwhile
    with _stopped_in_a_reload(tmp_path, 5, 0.5, "version 2 setting up") as (url, log, signalled):
        assert wait_until(lambda: _answers(url + "/ready") == 503, 15)
        versions = set()
        while time.monotonic() - signalled < 3.5:  # time enough for the reload to be done (1 s or so)
            versions.add(post_json(url + "/predict", {"n": 1})[1]["version"])
            time.sleep(0.05)
        assert versions == {1}, versions  # the old handle only, through the delay
    text = log.read_text()
    assert "reload abandoned; no worker had been replaced: the old handle serves on" in text, text
    assert "reload done" not in text and "SIGHUP: reload abandoned: the server is stopping" in text, text


def test_a_worker_a_reload_replaced_before_the_shutdown_delay_began_is_put_back(tmp_path):
    # the reload abandoned kept what it had replaced, for a server about to stop: its workers answered
    # with the old handle and the new in turn through the whole delay, while the log said "abandoned"
    with _stopped_in_a_reload(tmp_path, 8, 3, "a reload put a new worker in its place") as (url, log, signalled):
        assert wait_until(lambda: "putting back the 1 worker(s) already replaced" in log.read_text(), 10)
        versions: list[int] = []
        while time.monotonic() - signalled < 7:
            versions.append(post_json(url + "/predict", {"n": 1})[1]["version"])
            time.sleep(0.02)
        assert 2 not in versions[len(versions) // 2:], versions  # put back in a moment: the old handle alone
    assert "reload done" not in log.read_text()


def test_a_signal_just_after_the_server_became_ready_drains(tmp_path):
    # /ready says 200 once every worker is ready, a moment before start() returns: a SIGTERM in
    # between abandoned the start without a drain, and requests just sent got 503. The signal follows
    # /ready's first 200 at once, five times.
    for attempt in range(5):
        log = tmp_path / f"log{attempt}"
        with served_from_the_shell(tmp_path, log, poll=0) as (proc, url):
            os.kill(proc.pid, signal.SIGTERM)
            assert proc.wait(30) == 0
        text = log.read_text()
        assert "SIGTERM received: draining" in text and "stopped before the server was ready" not in text, text


def test_a_shutdown_delay_is_for_signals_not_for_stop():
    # stop() (a notebook's, a test's, another thread's while serve_forever runs) asks for the stop
    # itself: nothing need be told first
    server = Server(handle="handles_for_tests:Recorder", GPUs="cpu", Port=0, ShutdownDelayS=120)
    with server:
        began = time.monotonic()
        server.stop()
        assert server.state == "stopped" and time.monotonic() - began < 60
    stopper = threading.Thread(target=lambda: wait_until(lambda: server.state == "running", 60) and server.stop())
    stopper.start()
    began = time.monotonic()
    server.serve_forever()  # in this (the main) thread, with its signal handlers, as `easyserve run` does
    stopper.join(60)
    assert server.state == "stopped" and time.monotonic() - began < 60


def test_a_front_started_through_the_shutdown_delay_closes_its_connections_too(tmp_path):
    with served_from_the_shell(tmp_path, HttpWorkers=2, ShutdownDelayS=10) as (proc, url):
        def pids() -> set[int]:  # as front_pids: a connection the killed front's backlog held is reset
            found = set()
            for _ in range(30):
                with contextlib.suppress(OSError):
                    found.add(request(url + "/health")[2]["pid"])
            return found

        before = pids()
        os.kill(proc.pid, signal.SIGTERM)  # the server process alone: the fronts are its to stop
        assert wait_until(lambda: _answers(url + "/ready") == 503, 15)
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: len(pids() - before) == 1, 8)  # its replacement serves, within the delay
        port = int(url.rsplit(":", 1)[1])
        answers = [_raw(port, "POST", "/predict") for _ in range(20)]
        assert {(status, headers["connection"]) for status, headers, _ in answers} == {(200, "close")}
        assert _answers(url + "/ready") == 503
        os.kill(proc.pid, signal.SIGTERM)  # a second signal ends the delay: the test has seen what it shows
        assert proc.wait(30) == 0


def test_ctrl_c_leaves_the_processes_a_handle_started_to_answer_the_requests_in_flight(tmp_path):
    # A terminal's Ctrl-C signals the server's whole process group. Workers ignore it, but what a
    # handle starts takes the default action back (a fork, an exec): its helper died at once, and
    # the request the drain was to answer failed on it.
    pidfile = tmp_path / "helpers"
    settings = {"Handle": "handles_robust:AnswersThroughAHelper", "HandleArgs": {"pidfile": str(pidfile)},
                "ProcessPerGPU": 1, "MaxBatchSize": 1}
    with killed_after(pidfile), served_from_the_shell(tmp_path, **settings) as (proc, url):
        [helper] = helpers(pidfile)
        in_flight = Background(lambda: post_json(url + "/predict", {"x": 1, "sleep": 2}))
        wait_busy(url)
        os.killpg(proc.pid, signal.SIGINT)
        assert in_flight.result(30) == (200, {"x": 1, "sleep": 2})
        assert proc.wait(30) == 0
    assert wait_until(lambda: not _alive(helper), 10)  # and it ended with its worker
