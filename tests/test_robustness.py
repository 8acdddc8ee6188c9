"""Robustness: hostile bodies, misbehaving handles, dying and hanging workers, racing stops, lost parents.

Real worker processes and sockets throughout; every test is bounded in time and leaves no process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import traceback
import typing
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import aiohttp
import numpy as np
import pytest
from conftest import (Background, _alive, caught, post_json, post_many, request, wait_busy, wait_draining,
                      wait_until, worker_children)

from easyserve import BadRequest, Client, ConfigError, Handle, Server, StartupError

TESTS = Path(__file__).parent


# -- helpers -----------------------------------------------------------------------------------------


def post_raw(url: str, body: bytes, timeout: float = 10) -> tuple[int, str, Any]:
    """POST a JSON body; returns (status, Content-Type, the body as JSON, or as text if it is not JSON)."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, ctype, raw = resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as err:
        with err:
            status, ctype, raw = err.code, err.headers.get("Content-Type", ""), err.read()
    try:
        return status, ctype, json.loads(raw)
    except ValueError:
        return status, ctype, raw.decode(errors="replace")


def wait_for(condition: Callable[[], Any], timeout: float, interval: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() > end:
            return False
        time.sleep(interval)


def kill_quietly(*pids: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def env_with_tests() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def run_script(path: Path, code: str, timeout: float) -> tuple[int | None, str, str, float]:
    """Run a Python script; returns (exit code or None if it ran past ``timeout`` and was killed,
    stdout, stderr, seconds it took)."""
    path.write_text(textwrap.dedent(code))
    begun = time.monotonic()
    with subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env_with_tests(), cwd=path.parent) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
            code_ = proc.returncode
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            code_ = None
    return code_, out, err, time.monotonic() - begun


class Lines:
    """Collects a text stream's lines in a thread, so a test can wait for one without blocking."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(stream), daemon=True)
        self.thread.start()

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        end = time.monotonic() + timeout
        while True:
            for line in list(self.lines):
                found = re.search(pattern, line)
                if found:
                    return found
            assert time.monotonic() < end, f"no {pattern!r} within {timeout}s in:\n" + "".join(self.lines)
            time.sleep(0.05)


def is_json(ctype: str) -> bool:
    return ctype.split(";")[0].strip() == "application/json"


# -- hostile request bodies --------------------------------------------------------------------------


@pytest.mark.parametrize("busy", [False, True], ids=["idle-worker", "busy-worker"])
def test_deeply_nested_json_is_a_400_and_the_server_keeps_answering(serve, busy):
    # past the 1,024 levels the JSON parser reads (500 went to the handle once JSON travelled to the workers
    # as its bytes: it had been a 400 only because pickle could not take the objects)
    deep = ('{"x":' + "[" * 1100 + "]" * 1100 + "}").encode()
    config: dict[str, Any] = {"TimeoutS": 5}
    if busy:
        config["HandleArgs"] = {"delay_ms": 1000}  # every batch takes a second
    with serve("easyserve.builtin:Echo", **config) as server:
        url = server.url + "/predict"
        slow = None
        if busy:
            slow = Background(lambda: post_raw(url, b'{"slow": 1}', timeout=15))
            assert wait_for(lambda: server.workers[0]["state"] == "busy", 5)
        status, ctype, body = post_raw(url, deep, timeout=15)
        assert status == 400, (status, ctype, body)
        assert is_json(ctype) and "error" in body, (ctype, body)
        begun = time.monotonic()
        status, ctype, body = post_raw(url, b'{"after": 1}', timeout=5)
        assert (status, body) == (200, {"after": 1})
        assert time.monotonic() - begun < 5
        if slow is not None:
            assert slow.result(15)[::2] == (200, {"slow": 1})


def test_a_5000_digit_integer_is_a_400_json_error(serve):
    with serve("easyserve.builtin:Echo") as server:
        url = server.url + "/predict"
        status, ctype, body = post_raw(url, b'{"a": ' + b"7" * 5000 + b"}")
        assert status == 400, (status, ctype, body)
        assert is_json(ctype) and isinstance(body, dict) and "error" in body, (ctype, body)
        assert post_raw(url, b'{"a": 1}')[::2] == (200, {"a": 1})


# -- process lifetime --------------------------------------------------------------------------------


def test_a_script_that_never_calls_stop_exits_by_itself(tmp_path):
    script = tmp_path / "forgets_stop.py"
    script.write_text(textwrap.dedent("""
        from easyserve import Server
        server = Server(handle="easyserve.builtin:Echo", GPUs="cpu", ProcessPerGPU=2, Port=0).start()
        print(" ".join(str(w["pid"]) for w in server.workers), flush=True)
        # no stop(): the interpreter exits here
    """))
    pids: list[int] = []
    with subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True, env=env_with_tests()) as proc:
        try:
            pids = [int(p) for p in proc.stdout.readline().split()]
            assert len(pids) == 2
            try:
                code = proc.wait(15)
            except subprocess.TimeoutExpired:
                code = None
            assert code is not None, "the script did not exit within 15s"
            assert wait_for(lambda: not any(_alive(p) for p in pids), 3), "a worker outlived the script"
        finally:
            proc.kill()
            kill_quietly(*pids)


def test_workers_exit_when_the_killed_server_left_a_forked_child(tmp_path):
    script = tmp_path / "forks.py"
    script.write_text(textwrap.dedent("""
        import os, signal, time
        from easyserve import Server
        server = Server(handle="easyserve.builtin:Echo", GPUs="cpu", ProcessPerGPU=2, Port=0).start()
        workers = [w["pid"] for w in server.workers]
        child = os.fork()
        if child == 0:  # a helper process the user's code forked, living on
            time.sleep(8)
            os._exit(0)
        print(child, *workers, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """))
    pids: list[int] = []
    with subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True, env=env_with_tests()) as proc:
        try:
            pids = [int(p) for p in proc.stdout.readline().split()]
            assert len(pids) == 3
            proc.wait(10)
            assert proc.returncode == -signal.SIGKILL
            workers = pids[1:]
            assert wait_for(lambda: not any(_alive(p) for p in workers), 3), \
                "workers outlived their killed server while a forked child of it lived"
        finally:
            proc.kill()
            kill_quietly(*pids)
            proc.stdout.close()


def test_a_child_forked_while_a_server_runs_holds_neither_its_port_nor_its_connections():
    """A notebook's multiprocessing pool (fork) made while a server ran inherited its listening socket and its
    connections: after stop() the port stayed bound, a client's connect hung where it would have been refused,
    a start on the same port failed "address already in use", and a kept-alive connection the server had closed
    stayed open (its client saw no end) for as long as the child lived. (With HttpWorkers, the port and the
    connections are the fronts', which are not forked.)"""
    server = Server(handle="easyserve.builtin:Echo", GPUs="cpu", Port=0).start(timeout=60)
    port = server.port
    kept = socket.create_connection(("127.0.0.1", port), timeout=10)
    child = None
    try:
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert kept.recv(65536).startswith(b"HTTP/1.1 200")
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(120,))
        child.start()
        server.stop(drain_timeout=5)
        assert kept.recv(65536) == b"", "the server closed the connection; its client should see the end"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        with socket.socket() as again:  # as a server started on it again would
            again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            again.bind(("127.0.0.1", port))
        assert child.is_alive()
    finally:
        kept.close()
        server.stop()
        if child is not None:
            child.kill()
            child.join(10)


def test_sigkill_of_the_supervisor_takes_its_server_down():
    command = [sys.executable, "-m", "easyserve.cli", "run", "--supervise", "--handle", "easyserve.builtin:Echo",
               "--gpus", "cpu", "--port", "0"]
    server_pid = None
    worker_pids: list[int] = []
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env=env_with_tests()) as supervisor:
        log = Lines(supervisor.stderr)
        try:
            url = log.wait_for(r"listening on (http://\S+)", 30).group(1)
            server_pid = request(url + "/health", timeout=5)[2]["pid"]
            worker_pids = [w["pid"] for w in request(url + "/ready", timeout=5)[2]["workers"]]
            assert server_pid != supervisor.pid
            supervisor.kill()
            supervisor.wait(5)
            assert wait_for(lambda: not _alive(server_pid), 5), "the server outlived its killed supervisor"
            assert wait_for(lambda: not any(_alive(p) for p in worker_pids), 3)
        finally:
            supervisor.kill()
            if server_pid is not None and _alive(server_pid):
                os.kill(server_pid, signal.SIGTERM)
                if not wait_for(lambda: not _alive(server_pid), 5):
                    kill_quietly(server_pid)
            wait_for(lambda: not any(_alive(p) for p in worker_pids), 5)
            kill_quietly(*worker_pids)
            log.thread.join(5)


# -- what a handle returns ---------------------------------------------------------------------------


def test_forward_returning_a_list_of_rows_answers_each_request_with_its_own_row(serve):
    with serve("handles_robust:Rows", MaxBatchSize=3, TimeoutS=20) as server:
        url = server.url + "/predict"
        slow = Background(lambda: post_json(url, {"x": [-1, -1, -1]}, timeout=15))  # holds the worker 0.5 s
        assert wait_for(lambda: server.workers[0]["state"] == "busy", 5)
        inputs = [[i, i + 0.25, i + 0.5] for i in range(1, 7)]  # queue up: two batches of exactly 3
        answers = post_many(url, [{"x": x} for x in inputs], concurrency=6)
        assert slow.result(15) == (200, [-10, -10, -10])
        sizes = request(server.url + "/stats")[2]["batch_sizes"]
    assert sizes.get("3", 0) >= 1, sizes  # batches of three did form
    assert answers == [(200, [v * 10 for v in x]) for x in inputs]


def test_a_bug_in_preprocess_is_a_500_with_its_traceback_and_bad_input_a_400(serve, caplog):
    # A misspelt name in preprocess answered every request 400, as if each client had erred, and
    # left nothing in the log
    caplog.set_level(logging.INFO, logger="easyserve")
    with serve("handles_robust:PreprocessFaults") as server:
        url = server.url + "/predict"
        faults = ("module", "misspelt", "self", "task", "input", "dtype", "unwritten", "helper", "dispatch")
        answers = {fault: post_json(url, {"fault": fault, "x": 3, "descr": "(,)i4", "mode": "lower"})
                   for fault in faults}
        assert post_json(url, {"x": 1}) == (200, {"x": 1})
        assert wait_for(lambda: str(server.logs()).count("Traceback") >= 5, 10), server.logs()
        # a 400's traceback is for the handle's author (whose own bug may have refused the request):
        # in server.logs() and the log at INFO, once for the line that raised it, whatever a flood
        # sends: the lines would push out of server.logs() the traceback a 500 points to
        began = time.monotonic()
        flood = []
        while time.monotonic() - began < 2.5:  # past the one a second they are written at most
            flood.append(post_json(url, {"fault": "input", "x": 3}))
            time.sleep(0.05)
        took = time.monotonic() - began
        time.sleep(0.3)
        logs = str(server.logs(tail=None))
    assert flood == [answers["input"]] * len(flood)
    assert 'return getattr(np, info.get("dtype", "flaot32"))(1)' in logs, logs  # the first 400's
    assert logs.count('return info["x"].lower()') <= 1, (took, logs)  # once for a place that raised, at most
    told = [r.getMessage() for r in caught(caplog) if r.levelno < logging.ERROR and "Traceback" in r.getMessage()]
    assert all(r.startswith("cpu/0 [") and "preprocess refused request" in r for r in told), told
    assert sum('return info["x"].lower()' in r for r in told) == 1, "\n\n".join(told)
    assert answers["misspelt"] == (500, {"error": "preprocess failed: NameError: name 'infoo' is not defined "
                                                  "(traceback in worker cpu/0's log)"})
    status, body = answers["self"]
    assert status == 500 and "'PreprocessFaults' object has no attribute 'sesion'" in body["error"]
    # a key misspelt on the task was each client's 400, the log silent at INFO
    assert answers["task"] == (500, {"error": "preprocess failed: TaskKeyError: the task has no key 'task_inf'; it has "
                                              "headers, parameters, request_id, task_id, task_info (traceback in "
                                              "worker cpu/0's log)"})
    # a name the request chose, looked up on the handle: its own mistake too, where any attribute missing on the
    # handle was the handle's, a 500 and a traceback a request (a name the code writes is: "self" above)
    assert answers["dispatch"] == (400, {"error": "preprocess failed: AttributeError: 'PreprocessFaults' object has "
                                                  "no attribute 'mode_lower'"})
    status, body = answers["module"]  # a name the request chose, looked up on a module: its own mistake
    assert status == 400 and "has no attribute 'flaot32'" in body["error"]
    assert answers["input"] == (400, {"error": "preprocess failed: AttributeError: 'int' object has no "
                                               "attribute 'lower'"})
    # SyntaxError and NotImplementedError are the handle's where its own code raised them: numpy's
    # SyntaxError for the request's dtype was a 500 (as was Pillow's NotImplementedError for a format)
    status, body = answers["dtype"]
    assert status == 400 and body["error"].startswith("preprocess failed: SyntaxError: "), body
    assert answers["unwritten"] == (500, {"error": "preprocess failed: NotImplementedError: this handle reads no "
                                                   "such request yet (traceback in worker cpu/0's log)"})
    assert answers["helper"] == (500, {"error": "preprocess failed: NotImplementedError: TIFF decoding: to do "
                                                "(traceback in worker cpu/0's log)"})
    assert "return infoo" in logs and "return self.sesion" in logs and 'return task["task_inf"]' in logs


@pytest.mark.parametrize("handle,error", [
    # a preprocess set in setup that takes no task: its TypeError was each client's 400, the log silent
    ("MisCalled", "preprocess failed: TypeError: MisCalled.setup.<locals>.<lambda>() takes 0 positional arguments "
                  "but 1 was given (traceback in worker cpu/0's log)"),
    ("Interrupts", "preprocess failed: KeyboardInterrupt (traceback in worker cpu/0's log)"),
    # was "forward failed: TypeError: unsupported operand..." alone
    ("ForgetsReturn", "forward failed: TypeError: unsupported operand type(s) for *: 'NoneType' and 'int' (preprocess "
                      "returned None for each request: a return missing?) (traceback in worker cpu/0's log)"),
])
def test_a_handles_own_mistake_in_preprocess_is_its_500_with_a_traceback_not_the_clients_400(serve, handle, error):
    with serve(f"handles_for_tests:{handle}") as server:
        assert post_json(server.url + "/predict", {"x": 3}) == (500, {"error": error})
        assert wait_for(lambda: "Traceback" in str(server.logs()), 10), server.logs()


def test_a_postprocess_that_forgets_its_return_is_said_once_in_the_log(serve, caplog):
    """Every request was answered 200 with null, the log silent. Not a handle that answers null to some
    requests (a detector that found nothing), once it has answered anything else."""
    said = lambda server: [line for line in server.logs() if "A return missing?" in line.text]  # noqa: E731
    with serve("handles_for_tests:ForgetsPostprocessReturn", ProcessPerGPU=2) as server:
        url = server.url + "/predict"
        assert post_many(url, [{"x": n} for n in range(20)]) == [(200, None)] * 20
        assert wait_for(lambda: said(server), 10)
        assert re.search(r"postprocess returned None for each of the first \d+ requests it answered: each was "
                         r"answered 200 with null\. A return missing\? \(Said once\.\)$", said(server)[0].text)
        assert len({line.pid for line in said(server)}) == len(said(server)) <= 2  # once a process
    with serve("handles_for_tests:ForgetsPostprocessReturn") as server:
        url = server.url + "/predict"
        assert post_json(url, {"x": 1, "keep": True}) == (200, {"x": 1})
        assert post_many(url, [{"x": n} for n in range(10)]) == [(200, None)] * 10
        assert post_json(url, {"x": 2, "keep": True}) == (200, {"x": 2})  # what each batch wrote is logged by now
        assert said(server) == []


def test_a_setup_that_opens_a_relative_path_is_told_where_it_was_looked_for_and_how_to_read_it_beside_the_config():
    """The hint said to check a model path in HandleArgs, where the file was beside the config and the server
    started from another directory."""
    with pytest.raises(StartupError) as raised:
        Server(handle="handles_for_tests:OpensRelative", GPUs="cpu", Port=0).start(timeout=60)
    assert str(raised.value).endswith(
        f"Hint: 'labels-beside-the-config.txt' is a relative path, which is read from the directory the server was "
        f"started in ({os.getcwd()}); to read a file beside the config, open "
        "device.path('labels-beside-the-config.txt') in setup."), str(raised.value)
    with pytest.raises(StartupError) as raised:  # a program not installed is no path to read beside the config
        Server(handle="handles_for_tests:RunsMissingTool", GPUs="cpu", Port=0).start(timeout=60)
    assert "No such file or directory: 'easyserve-no-such-tool'" in str(raised.value)
    assert "relative path" not in str(raised.value), str(raised.value)


@pytest.mark.parametrize("ends_by", ["stop", "recycle"])
def test_a_worker_whose_handle_left_a_thread_running_exits_when_told(serve, ends_by):
    # A thread that is not a daemon kept the worker's interpreter alive after it was told to stop:
    # killed once its grace ran out, each recycle and each stop() waited for it
    recycle = {"MaxBatchesPerWorker": 1} if ends_by == "recycle" else {}
    with serve("handles_robust:KeepsAThread", **recycle) as server:
        first = server._pool.workers[0].proc
        if ends_by == "recycle":
            assert post_json(server.url + "/predict", {"n": 1}) == (200, {"n": 1})
            assert wait_for(lambda: first.poll() is not None, 10)
            assert post_json(server.url + "/predict", {"n": 2}) == (200, {"n": 2})
    assert first.returncode == 0, first.returncode  # exited by itself, not killed (-9)


def test_a_request_sizing_an_array_past_the_machines_memory_is_a_400_and_keeps_the_worker(serve):
    # numpy's MemoryError for a 10^14-byte canvas ended the worker, then its successor on the retry:
    # one request, two model reloads, and a 500
    with serve("handles_robust:PreprocessFaults", ProcessPerGPU=1) as server:
        pid = server.workers[0]["pid"]
        # 10**16 bytes: past any machine's memory, and past what even an overcommitting kernel maps
        status, body = post_json(server.url + "/predict", {"fault": "canvas", "h": 10**8, "w": 10**8})
        assert status == 400 and "preprocess failed: MemoryError: Unable to allocate" in body["error"], body
        assert post_json(server.url + "/predict", {"fault": "canvas", "h": 2, "w": 3}) == (200, 0)
        assert server.workers[0]["pid"] == pid and server.stats()["restarts"] == 0


def test_a_request_that_fails_the_batch_it_is_in_fails_alone(serve):
    # A request of another shape than the others (two numbers where the model takes three) could not be
    # stacked with them, and forward failed the whole batch: every request batched with it got its 500
    with serve("handles_robust:Dot", MaxBatchSize=4, MaxWaitMs=2000) as server:
        url = server.url + "/predict"
        pid = server.workers[0]["pid"]
        holding = Background(lambda: post_json(url, {"x": [0, 0, 1], "hold": 1}))  # the next four wait
        assert wait_for(lambda: server.workers[0]["state"] == "busy", 5)
        bodies = [{"x": [1, 1, 1]}, {"x": [1, 2]}, {"x": [2, 0, 0]}, {"x": [0, 1, 0]}]
        answers = post_many(url, bodies, concurrency=4)  # a batch of four
        assert holding.result(15) == (200, {"dot": 3.0, "forwards": 1})
        # asyncio's CancelledError (a BaseException) fails its request as any exception does: it ended
        # the worker, then its successor on the retry
        cancelled = post_json(url, {"x": [-1, 0, 0]})
        stats = server.stats()
        workers = server.workers
    assert stats["batch_sizes"] == {"1": 2, "4": 1}, stats["batch_sizes"]
    # the batch, then the three of one shape together, then the odd one alone: 3 calls, not 5
    assert [answers[i] for i in (0, 2, 3)] == [(200, {"dot": dot, "forwards": 4}) for dot in (6.0, 2.0, 2.0)], answers
    status, body = answers[1]
    assert status == 500 and body["error"].startswith("forward failed: ValueError: matmul: "), body
    assert cancelled == (500, {"error": "forward failed: CancelledError (traceback in worker cpu/0's log)"})
    assert workers[0]["pid"] == pid and workers[0]["restarts"] == 0, workers


@pytest.mark.parametrize("pipeline", [False, True])
def test_an_idle_worker_holds_no_batch(serve, pipeline):
    # The last batch (bodies, arrays, on a GPU its tensors, answers) stayed alive in an idle worker until
    # the next had been received and preprocessed: two batches' memory at once
    with serve("handles_robust:RemembersLastBatch", Pipeline=pipeline) as server:
        answers = [post_json(server.url + "/predict", {"n": n}) for n in range(3)]
    assert answers == [(200, {"previous_alive": False})] * 3, answers


def test_a_model_of_two_outputs_in_a_batch_of_two_answers_each_request_with_its_own_row(serve):
    # session.run's list of 2 outputs in a batch of 2 was read as one result per request: each
    # request got 200 with the other's data, under load only
    with serve("handles_robust:TwoOutputs", MaxBatchSize=2, TimeoutS=20) as server:
        url = server.url + "/predict"
        assert post_json(url, {"x": 7}) == (200, {"box": [7.0] * 4, "score": 14.0})  # a batch of 1
        slow = Background(lambda: post_json(url, {"x": -1}, timeout=15))  # holds the worker 0.5 s
        assert wait_for(lambda: server.workers[0]["state"] == "busy", 5)
        answers = post_many(url, [{"x": 1}, {"x": 2}], concurrency=2)  # a batch of exactly 2
        assert slow.result(15) == (200, {"box": [-1.0] * 4, "score": -2.0})
        sizes = request(server.url + "/stats")[2]["batch_sizes"]
    assert sizes.get("2") == 1, sizes
    assert answers == [(200, {"box": [1.0] * 4, "score": 2.0}), (200, {"box": [2.0] * 4, "score": 4.0})]


def test_arrays_of_different_number_types_batched_together_are_stacked(serve):
    # [1, 2, 3] is int64 and [1.5, 2, 3] float64: batched together they were handed to forward as a
    # list, and one client's 1.5 failed the others' requests with 500
    with serve("handles_robust:Features", MaxBatchSize=3, TimeoutS=20) as server:
        url = server.url + "/predict"
        slow = Background(lambda: post_json(url, {"x": [-1, 0, 0]}, timeout=15))
        assert wait_for(lambda: server.workers[0]["state"] == "busy", 5)
        inputs = [[1, 2, 3], [4, 5, 6], [1.5, 2, 3]]
        answers = post_many(url, [{"x": x} for x in inputs], concurrency=3)  # one batch of 3
        assert slow.result(15)[0] == 200
        sizes = request(server.url + "/stats")[2]["batch_sizes"]
    assert sizes.get("3") == 1, sizes
    assert answers == [(200, [2.0 * v for v in x]) for x in inputs]


def test_each_requests_forward_failure_is_in_the_log_its_500_points_to(serve):
    """A batch logged one traceback for each type of exception: of two requests failing with a
    ValueError, on two lines of forward or with two messages, one's 500 said its traceback was in the
    log, where only the other's was (800 of 14,000 failures in a soak)."""
    with serve("handles_robust:TwoFaults", MaxBatchSize=4, TimeoutS=20) as server:
        url = server.url + "/predict"
        slow = Background(lambda: post_json(url, {"sleep": 0.5}, timeout=15))
        assert wait_for(lambda: server.workers[0]["state"] == "busy", 5)
        sent = [{"token": 17}, {"token": 23}, {"nan": 2}, {"n": 1}]
        answers = post_many(url, sent, concurrency=4)  # one batch of 4
        assert slow.result(15)[0] == 200
        assert server.stats()["batch_sizes"].get("4") == 1
        for message in ("model rejected token 17", "model rejected token 23", "image tensor has NaN in channel 2"):
            assert wait_for(lambda: any(message in line.text for line in server.logs(tail=None)), 5), message
    assert [status for status, _ in answers] == [500, 500, 500, 200], answers


def test_run_batch_may_answer_a_request_with_any_client_error_status(serve):
    # a 404 or a 422 from an overridden run_batch was answered 500, as if the handle had failed
    asked = [(404, "no item 7"), (422, "text too long"), (503, "busy"), ("200", "not a number"), (200, "fine"),
             (302, "elsewhere"), (422, {"field": "text", "most": 10}), (500, "the model's server is down")]
    with serve("handles_robust:Statuses", MaxBatchSize=1) as server:
        answers = [post_json(server.url + "/predict", {"status": status, "message": message})
                   for status, message in asked]
        assert server.stats()["statuses"] == {"404": 1, "422": 2, "500": 4, "200": 1}
        logged = "\n".join(line.text for line in server.logs(tail=None))
        with pytest.raises(BadRequest, match="text too long") as raised:  # the client's fault, for Client too
            Client(server.url).predict({"status": 422, "message": "text too long"})
        assert raised.value.status == 422
    # a status the server does not pass on was a 500 with the handle's text alone, and no word of why
    assert answers == [(404, {"error": "no item 7"}), (422, {"error": "text too long"}),
                       (500, {"error": "run_batch answered status 503, which easyserve does not pass on (200, "
                                       "400-499 or 500): busy (said in worker cpu/0's log)"}),
                       (500, {"error": "run_batch answered status '200' (str), not a whole number: not a number "
                                       "(said in worker cpu/0's log)"}), (200, "fine"),
                       (500, {"error": "run_batch answered status 302, which easyserve does not pass on (200, "
                                       "400-499 or 500): elsewhere (said in worker cpu/0's log)"}),
                       # a dict as JSON text a client can read back, where it was Python's repr
                       (422, {"error": '{"field":"text","most":10}'}),
                       # the handle's own 500 pointed to a traceback in the log, which had nothing of it
                       (500, {"error": "run_batch answered 500: the model's server is down (said in worker cpu/0's "
                                       "log)"})]
    assert "run_batch answered status 302, which easyserve does not pass on" in logged, logged
    # said once, naming its request
    assert len(re.findall(r"request \S+: run_batch answered 500: the model's server is down", logged)) == 1, logged


def test_a_run_batch_that_wraps_the_default_stages_passes_their_500s_on_as_they_are(serve):
    """Their tracebacks are in the log: they were said again, once a request, and their answers pointed
    to a line rather than the traceback."""
    with serve("handles_robust:TimedRunBatch", MaxBatchSize=1) as server:
        status, answer = post_json(server.url + "/predict", {"fail": True})
        assert post_json(server.url + "/predict", {"fail": False})[0] == 200
        logged = "\n".join(line.text for line in server.logs(tail=None))
    assert (status, answer) == (500, {"error": "forward failed: RuntimeError: the GPU fell off (traceback in worker "
                                               "cpu/0's log)"})
    assert "RuntimeError: the GPU fell off" in logged and "run_batch answered" not in logged, logged


def test_run_batch_with_too_few_results_answers_the_rest_500_at_once(serve):
    with serve("handles_robust:ShortRunBatch", MaxBatchSize=4, TimeoutS=6) as server:
        url = server.url + "/predict"
        slow = Background(lambda: post_json(url, {"i": 0, "sleep": 0.5}, timeout=15))
        assert wait_for(lambda: server.workers[0]["state"] == "busy", 5)
        begun = time.monotonic()
        answers = post_many(url, [{"i": i} for i in (1, 2, 3)], concurrency=3)  # one batch of 3
        took = time.monotonic() - begun
        assert slow.result(15) == (200, {"i": 0})
        # the log the 500s point to says so: it held nothing at all, where they promised a traceback
        said = "run_batch: the handle returned 1 results for a batch of 3: every request of the batch is answered 500"
        assert wait_for(lambda: said in str(server.logs()), 5), server.logs()
    assert took < 4, f"answered after {took:.1f}s: {answers}"
    # the two requests left without a result get 500 (failing the whole batch is fine too: the
    # results cannot be matched to requests); a 200 carries that request's own answer
    assert sum(status == 500 for status, _ in answers) >= 2, answers
    for i, (status, body) in zip((1, 2, 3), answers):
        assert status in (200, 500), answers
        if status == 200:
            assert body == {"i": i}, answers
        else:
            assert re.search(r"returned 1 results?\b.*\b3\b.*\(said in worker cpu/0's log\)$", body["error"]), body


def test_unstack_with_too_few_rows_fails_requests_not_the_worker(serve):
    with serve("handles_robust:ShortUnstack", MaxBatchSize=3, TimeoutS=20) as server:
        url = server.url + "/predict"
        pid = server.workers[0]["pid"]
        slow = Background(lambda: post_json(url, {"n": 0, "sleep": 0.5}, timeout=15))
        assert wait_for(lambda: server.workers[0]["state"] == "busy", 5)
        sent = [{"n": i} for i in (1, 2, 3)]
        answers = post_many(url, sent, concurrency=3)  # one batch of 3; unstack gives 2 rows
        assert slow.result(15) == (200, {"n": 0, "sleep": 0.5})
        stats = request(server.url + "/stats")[2]
        workers = server.workers
    assert stats["restarts"] == 0, stats
    assert workers[0]["pid"] == pid and workers[0]["state"] == "idle", workers
    assert stats["batch_sizes"].get("3") == 1, stats
    # the batch failed (2 rows for 3), and each request, run again alone, got its own answer
    assert answers == [(200, body) for body in sent], answers


def test_a_request_whose_row_unstack_leaves_out_is_named_as_unstacks_failure_not_forwards(serve):
    """The line naming the requests a batch's failure was told apart to said "forward failed" for every
    stage: an unstack's was read as the model's."""
    with serve("handles_robust:ShortUnstack", MaxBatchSize=3, TimeoutS=20) as server:
        url = server.url + "/predict"
        slow = Background(lambda: post_json(url, {"n": 0, "sleep": 0.5}, timeout=15))
        assert wait_for(lambda: server.workers[0]["state"] == "busy", 5)
        sent = [{"n": 1}, {"n": 2, "short": True}, {"n": 3}]
        answers = post_many(url, sent, concurrency=3)  # one batch of 3, whose unstack gives 2 rows
        assert slow.result(15)[0] == 200
        told = lambda: [line.text for line in server.logs(tail=None) if "told apart" in line.text]  # noqa: E731
        assert wait_for(told, 10), server.logs()
    assert [status for status, _ in answers] == [200, 500, 200], answers
    assert re.search(r"unstack failed for request \S+ of a batch of 3, told apart$", told()[0]), told()


@pytest.mark.parametrize("stage,status", [("preprocess", 400), ("postprocess", 500)])
def test_an_exception_whose_message_cannot_be_read_fails_its_request_alone(serve, stage, status):
    # The code that reported the failure called str() on it, which raised there: every request of the
    # batch got 500 ("forward failed: RuntimeError", whatever the stage), the others' answers lost
    with serve("handles_robust:BadMessages", MaxBatchSize=4, TimeoutS=20) as server:
        url = server.url + "/predict"
        slow = Background(lambda: post_json(url, {"n": 0, "sleep": 0.5}, timeout=15))
        assert wait_for(lambda: server.workers[0]["state"] == "busy", 5)
        sent = [{"fault": stage}, {"n": 1}, {"n": 2}, {"n": 3}]
        answers = post_many(url, sent, concurrency=4)  # one batch of 4
        assert slow.result(15) == (200, {"n": 0, "sleep": 0.5})
        stats = server.stats()
    assert stats["batch_sizes"].get("4") == 1 and stats["restarts"] == 0, stats
    assert answers[1:] == [(200, body) for body in sent[1:]], answers
    assert answers[0][0] == status, answers
    assert answers[0][1]["error"].startswith(f"{stage} failed: Unreadable: (its message could not be read"), answers


def test_a_handle_calling_sys_exit_fails_its_request_not_its_worker(serve):
    # argparse exits on an option it does not know (exit_on_error=False does not cover all of them):
    # the SystemExit ended the worker, then its successor on the retry, so one client's bad option
    # cost two model loads and was answered "worker exited with code 1"
    with serve("handles_robust:Exits", MaxBatchSize=4, TimeoutS=20) as server:
        url = server.url + "/predict"
        pid = server.workers[0]["pid"]
        slow = Background(lambda: post_json(url, {"n": 0, "sleep": 0.5}, timeout=15))
        assert wait_for(lambda: server.workers[0]["state"] == "busy", 5)
        sent = [{"args": ["--colour"]}, {"n": 1}, {"n": 2, "args": ["--top", "3"]}, {"n": 3}]
        answers = post_many(url, sent, concurrency=4)  # one batch of 4
        assert slow.result(15) == (200, {"n": 0, "sleep": 0.5, "top": 1})
        failed = post_json(url, {"exit": True})
        # a KeyboardInterrupt a handle raises itself (a worker ignores SIGINT): it ended two workers
        interrupted = post_json(url, {"interrupt": True})
        # and a library's own BaseException (gevent's, trio's), or a GeneratorExit: each ended two workers
        based = [post_json(url, {"own_base": True}), post_json(url, {"generator_exit": True})]
        stats = server.stats()
        assert server.workers[0]["pid"] == pid, server.workers
    assert stats["batch_sizes"].get("4") == 1 and stats["restarts"] == 0, stats
    assert answers == [(400, {"error": "preprocess failed: SystemExit: 2"}), (200, {"n": 1, "top": 1}),
                       (200, {"n": 2, "args": ["--top", "3"], "top": 3}), (200, {"n": 3, "top": 1})], answers
    assert failed == (500, {"error": "forward failed: SystemExit: forward gave up (traceback in worker cpu/0's log)"})
    assert interrupted == (500, {"error": "forward failed: KeyboardInterrupt: from a library (traceback in worker "
                                          "cpu/0's log)"})
    assert based == [(500, {"error": "forward failed: Cancelled: a library's own BaseException (traceback in worker "
                                     "cpu/0's log)"}),
                     (500, {"error": "forward failed: GeneratorExit: closed (traceback in worker cpu/0's log)"})], based


def test_a_failures_message_quoting_a_whole_request_is_cut(serve):
    # a ValueError quoting the request it could not read was answered whole: a megabyte back for a
    # megabyte sent, encoded as JSON on the event loop
    with serve("handles_robust:BadMessages") as server:
        status, body = post_json(server.url + "/predict", {"fault": "quote", "text": "z" * 2**20})
    assert status == 400, (status, str(body)[:200])
    assert body["error"].startswith("preprocess failed: ValueError: cannot read {'fault': 'quote', 'text': 'zzz")
    assert len(body["error"]) < 5000 and re.search(r"\.\.\. \[10\d{5} more characters\]$", body["error"]), body


@pytest.mark.parametrize("fault,said", [
    ("quote-forward", r"forward failed: RuntimeError: cannot run \{'fault': 'quote-forward', 'text': 'z+"),
    ("quote-answer", r"postprocess returned a value that could not be read: RuntimeError: cannot read "
                     r"\{'fault': 'quote-answer', 'text': 'z+"),
], ids=["forward", "postprocess"])
def test_a_long_500_still_names_the_worker_whose_log_has_the_traceback(serve, fault, said):
    """The worker cut the message and named itself after the cut; the server then cut it a second time,
    4,096 characters in: the worker's name was gone, and "[61 more characters]" counted the second
    cut alone where some 1,000,000 had been left out."""
    with serve("handles_robust:BadMessages") as server:
        status, body = post_json(server.url + "/predict", {"fault": fault, "text": "z" * 2**20})
    assert status == 500, (status, str(body)[:200])
    cut = re.fullmatch(said + r" \.\.\. \[(\d+) more characters\] \(traceback in worker cpu/\d's log\)",
                       body["error"])
    assert cut and 1_040_000 < int(cut[1]) < 1_050_000 and len(body["error"]) < 4300, body["error"][-200:]


def test_run_batch_statuses_that_are_not_plain_numbers_or_messages_cannot_end_the_worker(serve):
    # numpy's 404 was answered 500; a status that could not be pickled, or a 4xx whose message could not
    # be read, ended the worker twice (the request retried alone), with "worker exited with code 1"
    with serve("handles_robust:OddStatuses", MaxBatchSize=1) as server:
        pid = server.workers[0]["pid"]
        answers = {odd: post_json(server.url + "/predict", {"odd": odd}) for odd in ("numpy", "unreadable", "lambda")}
        assert post_json(server.url + "/predict", {"n": 1}) == (200, {"n": 1})
        assert server.workers[0]["pid"] == pid and server.stats()["restarts"] == 0, server.workers
        # and its log says why (it said nothing)
        assert wait_for(lambda: any("(function), not a whole number" in line.text for line in server.logs(tail=None)),
                        5), server.logs()
    assert answers["numpy"] == (404, {"error": "no such item"}), answers
    assert answers["unreadable"] == (422, {"error": "(its message could not be read: RuntimeError)"}), answers
    status, body = answers["lambda"]
    assert status == 500 and body["error"].startswith("run_batch answered status <function"), answers
    assert "(function), not a whole number: a status that is a function" in body["error"], answers


def test_a_handle_that_closed_stderr_still_fails_a_request_alone_with_its_traceback_in_the_log(serve):
    # printing the traceback to the closed sys.stderr raised: the worker died, and its successor on
    # the retry, and the client read "worker exited with code 1" instead of the handle's error
    with serve("handles_robust:ClosesStderr") as server:
        pid = server.workers[0]["pid"]
        answer = post_json(server.url + "/predict", {"fail": True})
        assert post_json(server.url + "/predict", {"n": 1}) == (200, {"n": 1})
        assert wait_for(lambda: "RuntimeError: forward failed on purpose" in str(server.logs()), 5), server.logs()
        assert server.workers[0]["pid"] == pid and server.stats()["restarts"] == 0, server.workers
    assert answer == (500, {"error": "forward failed: RuntimeError: forward failed on purpose "
                                     "(traceback in worker cpu/0's log)"}), answer
    assert "I/O operation on closed file" not in str(server.logs(tail=None))


# -- restarts and start-up ---------------------------------------------------------------------------


@pytest.mark.parametrize("fault,hint", [
    ("setup", r"Traceback.*model file 'gone.onnx' not found.*\nHint: the traceback above comes from the handle's "
              r"__init__ or setup"),
    # from the handle module's own line: the loader's and importlib's frames on the way to it are not its
    ("import", r"Traceback \(most recent call last\):\n  File \"[^\"]*handles_broken_import\.py\", line 3, in "
               r"<module>\n.*ModuleNotFoundError.*\nHint: the traceback above is an import that fails"),
    ("syntax", r"Traceback.*SyntaxError: .*\nHint: the handle's module does not compile: the traceback above ends "
               r"at the line, marked with \^\.$"),
    ("top level", r"Traceback \(most recent call last\):\n  File \"[^\"]*handles_loads_early\.py\", line 3, in "
                  r"<module>\n.*FileNotFoundError: .*\nHint: the traceback above comes from the top level of the "
                  r"handle's module, as it was imported, before __init__ or setup"),
    # what it wrote last, once: the line was said twice, and a download's progress not at all
    # and where it was, as it was killed
    # the limit on processes and threads (ulimit -u, a container's pids.max) met as the worker starts: easyserve's
    # own thread failed first, and the hint blamed what the handle loads
    ("threads", r"RuntimeError: can't start new thread\nHint: the worker could not start a thread or process: the "
                r"limit on this user's processes and threads \(ulimit -u\)"),
    ("hang", r"StartTimeoutS=5s\n\nIt was here \(its threads, most recent call first\):\n.*handles_robust\.py\", line "
             r"\d+ in setup\n.*\n\nIts last lines:\n  sleeping 30 s in setup\n\nHint: a setup that takes this long"),
])
def test_a_start_that_fails_says_why_once_and_promises_no_retry(caplog, fault, hint, tmp_path, monkeypatch):
    # Each worker logged "could not start (attempt 1); retrying in 0.5s" with the traceback, then the
    # start failed with it again, and nothing retried; a setup that hung was told to read a
    # traceback "above" that was not there, and a module that does not compile to check HandleArgs.
    (tmp_path / "handles_broken.py").write_text("from easyserve import Handle\n\n\nclass Broken(Handle)\n    pass\n")
    (tmp_path / "handles_threads.py").write_text(
        "from easyserve import Handle\n\n\nclass Threads(Handle):\n    def setup(self, device):\n"
        "        raise RuntimeError(\"can't start new thread\")  # as threading's start() at the limit\n")
    (tmp_path / "handles_loads_early.py").write_text(
        "from easyserve import Handle\n\nWEIGHTS = open('weights-not-here.bin', 'rb').read()\n\n\n"
        "class LoadsEarly(Handle):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    handle, args = {"setup": ("handles_for_tests:BrokenSetup", {"model": "gone.onnx"}),
                    "import": ("handles_broken_import:Lacks", {}),  # there, importing what is not
                    "syntax": ("handles_broken:Broken", {}),
                    "top level": (f"{tmp_path / 'handles_loads_early.py'}:LoadsEarly", {}),
                    "threads": ("handles_threads:Threads", {}),
                    "hang": ("handles_robust:Sleeper", {"setup_s": 30})}[fault]
    # only the hang needs the start's time to run out; the others fail by themselves. On 2 busy cores two
    # workers may take more than a second to import: with StartTimeoutS=1 one CI run killed a worker before
    # its setup began ("It wrote nothing")
    server = Server(handle=handle, GPUs="cpu", Port=0, ProcessPerGPU=2, HandleArgs=args,
                    StartTimeoutS=5 if fault == "hang" else 30)
    try:
        with caplog.at_level(logging.INFO, logger="easyserve"):
            with pytest.raises(StartupError, match=re.compile(hint, re.S)):
                server.start(timeout=30)
    finally:
        server.stop(drain_timeout=0)
    assert not [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert server.state == "stopped" and worker_children() == []


def test_a_worker_that_dies_after_the_servers_folder_was_removed_starts_again(serve, tmp_path, monkeypatch):
    """A deploy that replaced the release folder the server was started from: every worker start after it
    failed (FileNotFoundError, naming nothing), and each worker that died was lost for good."""
    start = tmp_path / "release"
    start.mkdir()
    monkeypatch.chdir(start)
    with serve("handles_for_tests:Recorder", ProcessPerGPU=1) as server:
        start.rmdir()
        os.kill(server.workers[0]["pid"], signal.SIGKILL)
        wait_until(lambda: server.workers[0]["state"] == "idle" and server.workers[0]["restarts"] == 1, 30,
                   "the worker to start again")
        assert post_json(server.url + "/predict", {"value": 3})[0] == 200
        server.reload(handle="handles_for_tests:Recorder")  # new workers too
        assert post_json(server.url + "/predict", {"value": 4})[0] == 200
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    told = subprocess.run([sys.executable, "-m", "easyserve", "run"], capture_output=True, text=True, timeout=60)
    assert (told.returncode, told.stderr) == (2, "easyserve: the current folder no longer exists (removed since the "
                                                 "shell entered it): cd to one that does\n")


def test_a_worker_killed_while_another_still_starts_is_restarted_even_if_its_restart_fails(tmp_path):
    # start() fails with a worker whose first start fails, and retries nothing; but a worker that was
    # ready, died, and failed to restart while another still started was left dead for good
    server = Server(handle="handles_robust:Staged", GPUs="cpu", Port=0, ProcessPerGPU=2,
                    HandleArgs={"dir": str(tmp_path)})
    starting = Background(lambda: server.start(timeout=60))
    try:
        assert wait_for(lambda: (tmp_path / "pid0").exists() and (tmp_path / "1").exists(), 30)
        first = int((tmp_path / "pid0").read_text())
        # its "ready" reaches the server while the other sleeps in its setup (4 s)
        assert wait_for(lambda: any(w.get("pid") == first and w["state"] == "idle" for w in server.workers), 3), \
            server.workers
        os.kill(first, signal.SIGKILL)
        starting.result(60)
        assert wait_for(lambda: [w["state"] for w in server.workers] == ["idle", "idle"], 20), server.workers
        assert (tmp_path / "3").exists()  # the third setup failed, the fourth started it again
        assert post_json(server.url + "/predict", {})[0] == 200
    finally:
        server.stop(drain_timeout=0)


def test_stop_signals_do_nothing_to_a_worker_from_the_moment_it_is_started(serve):
    # A terminal's Ctrl-C or `kill -TERM -PGID` reaches a worker being started too: one still
    # importing its modules, before it could say to ignore them, died of it, and was started again
    with serve("handles_robust:Sleeper", HandleArgs={"setup_s": 1}) as server:
        first = server.workers[0]["pid"]
        os.kill(first, signal.SIGKILL)
        assert wait_for(lambda: server.workers[0]["pid"] not in (None, first), 10)
        second = server.workers[0]["pid"]
        hits = 0
        while server.workers[0]["state"] != "idle" and hits < 2000:  # from its first moment until ready
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(second, sig)
            hits += 1
            time.sleep(0.002)
        assert server.workers[0]["state"] == "idle" and server.workers[0]["pid"] == second, server.workers
        assert server.stats()["restarts"] == 1 and hits > 10
        assert post_json(server.url + "/predict", {"n": 1}) == (200, {"n": 1})


@pytest.mark.parametrize("lazily", [False, True])
def test_stop_signals_still_do_nothing_to_a_worker_whose_setup_gave_them_handlers(serve, lazily):
    # a library in setup that put back SIGTERM's default action (or SIGINT's KeyboardInterrupt) had the
    # worker die of a group's signal, in the middle of a drain, its batch run again on a fresh worker;
    # one set up on its first call, in a batch, did so after the check that followed setup
    with serve("handles_robust:TakesSignals", HandleArgs={"lazily": lazily}) as server:
        pid = server.workers[0]["pid"]
        assert post_json(server.url + "/predict", {"n": 0}) == (200, {"n": 0})
        for sig in (signal.SIGTERM, signal.SIGINT):
            os.kill(pid, sig)
            # the worker runs the signal's action before it reads the request that wakes it
            assert post_json(server.url + "/predict", {"n": 1}) == (200, {"n": 1})
            assert server.workers[0]["pid"] == pid and server.stats()["restarts"] == 0, (sig, server.workers)
        said = f"the handle's {'batch' if lazily else 'setup'} changed what SIGTERM does"
        assert wait_for(lambda: said in str(server.logs()), 5), server.logs()


def test_a_daemonic_child_of_the_handle_ends_with_its_worker(serve, tmp_path):
    # A worker ends with os._exit once told to stop, and first runs what an interpreter runs at exit:
    # without it, multiprocessing's daemonic children outlived every stop and every recycle
    pidfile = tmp_path / "child.pid"
    with serve("handles_robust:DaemonChild", HandleArgs={"pidfile": str(pidfile)}):
        child = int(pidfile.read_text())
        assert _alive(child)
    try:
        assert wait_for(lambda: not _alive(child), 10)
    finally:
        kill_quietly(child)


def test_start_failures_reset_once_a_worker_is_ready_again(serve, tmp_path):
    marker = tmp_path / "fail-setup"
    with serve("handles_robust:FlakySetup", HandleArgs={"marker": str(marker)}) as server:
        for cycle in range(3):
            worker = server.workers[0]
            assert worker["state"] == "idle", (cycle, worker)
            marker.touch()
            os.kill(worker["pid"], signal.SIGKILL)  # an idle worker dies; its restart fails once

            def failed_once() -> bool:
                now = server.workers[0]
                return "transient setup failure" in now.get("error", "") or now["restarts"] >= worker["restarts"] + 2

            assert wait_for(failed_once, 10), (cycle, server.workers)
            marker.unlink()
            assert wait_for(lambda: server.workers[0]["state"] in ("idle", "failed"), 10), (cycle, server.workers)
            assert server.workers[0]["state"] == "idle", (cycle, server.workers)
        status, _, ready = request(server.url + "/ready", timeout=5)
    assert status == 200, ready


def test_a_restarted_worker_whose_setup_hangs_is_killed_after_start_timeout(serve, tmp_path):
    marker = tmp_path / "hang-setup"
    with serve("handles_robust:HangingSetup", HandleArgs={"marker": str(marker)}, StartTimeoutS=1) as server:
        marker.touch()
        os.kill(server.workers[0]["pid"], signal.SIGKILL)

        def reported() -> bool:
            worker = server.workers[0]
            ready = request(server.url + "/ready", timeout=5)[2]
            return "StartTimeoutS" in worker.get("error", "") or "StartTimeoutS" in ready.get("error", "")

        assert wait_for(reported, 10, interval=0.1), server.workers
        assert server.workers[0]["restarts"] >= 1
        # let it give up (three failed starts) so that stopping does not wait on a hung setup
        wait_for(lambda: server.workers[0]["state"] == "failed", 10)


def test_start_raises_when_setup_never_returns_within_start_timeout():
    server = Server(handle="handles_robust:HangingSetup", HandleArgs={"always": True}, GPUs="cpu", Port=0,
                    StartTimeoutS=1)
    begun = time.monotonic()
    try:
        with pytest.raises(StartupError, match="StartTimeoutS"):
            server.start(timeout=20)
        took = time.monotonic() - begun
    finally:
        server.stop(drain_timeout=0)
    assert took < 8, f"start() took {took:.1f}s to give up"
    assert server.state == "stopped"
    assert wait_for(lambda: worker_children() == [], 2), worker_children()


# -- stopping ----------------------------------------------------------------------------------------


def test_a_worker_killed_during_the_drain_has_its_request_retried(tmp_path):
    journal = tmp_path / "journal.txt"
    server = Server(handle="handles_robust:Sleeper", GPUs="cpu", Port=0,
                    HandleArgs={"journal": str(journal)}).start(timeout=30)
    try:
        answer = Background(lambda: post_raw(server.url + "/predict", b'{"mark": "m", "sleep": 2}', timeout=20))
        pid = wait_busy(server)[0]["pid"]
        stopping = Background(lambda: server.stop(drain_timeout=10))
        stop_begun = time.monotonic()
        wait_draining(server.url)
        os.kill(pid, signal.SIGKILL)  # the worker dies (out of memory, say) while the drain waits for it
        status, ctype, body = answer.result(20)
        stopping.result(20)
        stop_took = stopping.finished_at - stop_begun
    finally:
        server.stop(drain_timeout=0)
    # retried on the restarted worker, within the drain, and answered with its own result
    assert (status, body) == (200, {"mark": "m", "sleep": 2}) and is_json(ctype)
    assert journal.read_text().split() == ["m", "m"], "the request did not run a second time"
    assert stop_took < 7, f"stop(drain_timeout=10) took {stop_took:.1f}s"
    assert wait_for(lambda: worker_children() == [], 2), worker_children()


def test_a_drain_ends_once_a_stuck_batch_is_killed_at_its_deadline():
    server = Server(handle="handles_robust:Sleeper", GPUs="cpu", ProcessPerGPU=2, Port=0, TimeoutS=1).start(timeout=30)
    try:
        answer = Background(lambda: post_raw(server.url + "/predict", b'{"sleep": 30}', timeout=20))
        assert wait_for(lambda: any(w["state"] == "busy" for w in server.workers), 5)
        begun = time.monotonic()
        server.stop(drain_timeout=15)
        took = time.monotonic() - begun
        status, ctype, body = answer.result(10)
    finally:
        server.stop(drain_timeout=0)
    assert took < 5, f"stop(drain_timeout=15) took {took:.1f}s though nothing was left to wait for"
    assert status == 504 and is_json(ctype), (status, body)
    assert wait_for(lambda: worker_children() == [], 2), worker_children()


@pytest.mark.parametrize("where", ["main-thread", "other-thread"])
def test_serve_forever_returns_when_another_thread_calls_stop(tmp_path, where):
    if where == "main-thread":
        code = """
            import threading, time
            from easyserve import Server
            server = Server(handle="easyserve.builtin:Echo", GPUs="cpu", Port=0)
            def stop_later():
                end = time.monotonic() + 20
                while server.state != "running" and time.monotonic() < end:
                    time.sleep(0.02)
                time.sleep(0.5)
                server.stop()
                print("stopped", server.state, flush=True)
            threading.Thread(target=stop_later, daemon=True).start()
            server.serve_forever()
            print("serve_forever returned", flush=True)
        """
    else:
        code = """
            import sys, threading, time
            from easyserve import Server
            server = Server(handle="easyserve.builtin:Echo", GPUs="cpu", Port=0)
            errors = []
            def serve():
                try:
                    server.serve_forever()
                except BaseException as exc:
                    errors.append(repr(exc))
            thread = threading.Thread(target=serve)
            thread.start()
            end = time.monotonic() + 20
            while server.state != "running" and time.monotonic() < end and thread.is_alive():
                time.sleep(0.02)
            print("state", server.state, flush=True)
            time.sleep(0.5)
            server.stop()
            thread.join(5)
            if thread.is_alive() or errors:
                print("serve_forever did not return cleanly:", errors, flush=True)
                sys.exit(1)
            print("serve_forever returned", flush=True)
        """
    exit_code, out, err, took = run_script(tmp_path / "serve_forever.py", code, timeout=15)
    assert exit_code == 0, f"exit code {exit_code} after {took:.1f}s\nstdout:\n{out}\nstderr:\n{err}"
    assert "serve_forever returned" in out
    assert took < 10, f"took {took:.1f}s"


def test_two_threads_calling_stop_at_once_both_succeed():
    for trial in range(3):
        server = Server(handle="easyserve.builtin:Echo", GPUs="cpu", Port=0).start(timeout=30)
        pids = [w["pid"] for w in server.workers]
        both = threading.Barrier(2)
        errors: list[str] = []

        def stop() -> None:
            both.wait(5)
            try:
                server.stop()
            except BaseException as exc:  # reported below
                errors.append(repr(exc))

        threads = [threading.Thread(target=stop) for _ in range(2)]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(15)
            assert not any(t.is_alive() for t in threads), f"trial {trial}: stop() hung"
            assert errors == [], f"trial {trial}: {errors}"
            assert server.state == "stopped" and server.url is None
        finally:
            if server.state != "stopped":
                server.stop(drain_timeout=0)
        assert wait_for(lambda: not any(_alive(p) for p in pids), 2), f"trial {trial}: a worker outlived stop()"


def test_stop_racing_a_start_with_a_timeout_leaves_the_server_stopped():
    # start(timeout=2) on a 3 s setup, and another thread's stop() once the workers have started: start()
    # gives up (the stop ends it; on a machine so loaded that the workers came late, its timeout may come
    # first), stop() waits for it to finish giving up, and start() says why it gave up.
    server = Server(handle="handles_robust:Sleeper", GPUs="cpu", Port=0, HandleArgs={"setup_s": 3})
    seen: dict[str, Any] = {}

    def stopper() -> None:
        wait_for(lambda: any(w.get("pid") for w in server.workers), 10)
        seen["pids"] = [w["pid"] for w in server.workers if w.get("pid")]
        seen["port"] = server.port
        server.stop()

    stopping = Background(stopper)
    begun = time.monotonic()
    try:
        why = r"^(stopped while starting: stop\(\) was called before the workers were ready|workers were not " \
              r"ready within start\(timeout=2\))$"
        with pytest.raises(StartupError, match=why):
            server.start(timeout=2)
        gave_up_after = time.monotonic() - begun
        stopping.result(15)
        assert seen.get("pids"), seen
        assert server.state == "stopped" and server.url is None, (server.state, seen)
    finally:
        if server.state != "stopped":
            server.stop(drain_timeout=0)
    assert gave_up_after < 3, f"start(timeout=2) gave up after {gave_up_after:.1f}s, not at its timeout"
    assert wait_for(lambda: not any(_alive(p) for p in seen["pids"]), 3), seen
    with pytest.raises(OSError):
        request(f"http://127.0.0.1:{seen['port']}/health", timeout=2)
    server.start(timeout=30)  # the server is not wedged: it starts again
    try:
        assert post_json(server.url + "/predict", {"a": 1}, timeout=10) == (200, {"a": 1})
    finally:
        server.stop()


# -- a handle's environment --------------------------------------------------------------------------


def test_a_handle_printing_to_a_closed_stdout_still_answers():
    command = [sys.executable, "-m", "easyserve.cli", "run", "--handle", "handles_robust:Printer", "--gpus", "cpu",
               "--port", "0"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env_with_tests()) as proc:
        log = Lines(proc.stderr)
        try:
            url = log.wait_for(r"listening on (http://\S+)", 30).group(1)
            proc.stdout.close()  # whoever read the server's output went away (`easyserve run | head`)
            answers = [post_raw(url + "/predict", json.dumps({"n": i}).encode(), timeout=10) for i in range(3)]
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.thread.join(5)
    assert [(status, body) for status, _, body in answers] == [(200, {"n": i}) for i in range(3)], answers


def test_handle_args_holding_a_lambda_work(serve):
    # HandleArgs are shipped to workers by value (cloudpickle), as a notebook needs: a lambda works
    with serve("handles_robust:CallsArgs", HandleArgs={"f": lambda n: n + 1}) as server:
        assert post_json(server.url + "/predict", {"n": 2}, timeout=10) == (200, {"f": 3})


def test_handle_args_that_cannot_be_sent_to_workers_fail_at_start_naming_them(serve):
    server = Server(handle="handles_robust:CallsArgs", GPUs="cpu", Port=0, HandleArgs={"lock": threading.Lock()})
    begun = time.monotonic()
    try:
        with pytest.raises(ConfigError, match=r"^HandleArgs: cannot be sent to worker processes: TypeError: .*lock"):
            server.start(timeout=20)
    finally:
        server.stop(drain_timeout=0)
    assert time.monotonic() - begun < 10
    assert server.state == "stopped" and server.url is None
    assert worker_children() == []
    # and at a reload, raised from reload() itself, without the event loop's frames above its message
    with serve("handles_robust:CallsArgs", HandleArgs={"f": abs}) as running:
        with pytest.raises(ConfigError, match=r"^HandleArgs: cannot be sent") as raised:
            running.reload(HandleArgs={"lock": threading.Lock()})
        assert [frame.name for frame in traceback.extract_tb(raised.value.__traceback__)][1:] == ["reload"]
        assert post_json(running.url + "/predict", {"n": -2})[1] == {"f": 2}


_LOCK = threading.Lock()  # a global of this module, which a class made in a test uses (see below)


class _Rows(typing.Protocol):  # a global too: issubclass() of a Protocol raises, and hid the ConfigError
    def tolist(self) -> list: ...


def test_a_handle_class_using_what_cannot_be_sent_to_workers_fails_at_start_saying_what_to_do():
    # A notebook's class that uses a session made in another cell: a bare "cannot pickle" TypeError,
    # naming the object's type ('_thread.lock'), not which of the notebook's names holds it
    lock = threading.Lock()

    class UsesALock(Handle):
        def forward(self, batch):
            with lock:
                return batch

    class UsesAGlobalLock(Handle):
        limit = 3

        def setup(self, device):  # super() and its own name: the class itself is no culprit
            super().setup(device)
            self.name = UsesAGlobalLock.__name__

        def forward(self, batch):
            with _LOCK:
                return [len(str(task)) < self.limit for task in typing.cast(_Rows, batch)]

    for handle, culprit in [(UsesALock, "the variable `lock` of the function that made it, a _thread.lock"),
                            (UsesAGlobalLock, "the global `_LOCK`, a _thread.lock")]:
        server = Server(handle=handle, GPUs="cpu", Port=0)
        try:
            with pytest.raises(ConfigError) as raised:
                server.start(timeout=20)
        finally:
            server.stop(drain_timeout=0)
        assert re.match(rf"^Handle: {handle.__name__} cannot be sent to the worker processes: TypeError: .*lock.* "
                        rf"\(it uses {re.escape(culprit)}\)\..*Create it in setup\(\)", str(raised.value)), raised.value
        assert server.state == "stopped" and worker_children() == []
        # raised from start() itself: the frames it came through quoted the message's f-string, in 4 kB
        assert [frame.name for frame in traceback.extract_tb(raised.value.__traceback__)][1:] == ["start"]


def test_a_handle_class_that_takes_a_large_array_with_it_is_said_to_naming_it(serve, caplog):
    """A notebook's class using a 200 MB array made in another cell went, silently, into every worker's
    memory (and stayed in the notebook's), start() taking seconds the longer for it."""
    weights = np.random.default_rng(0).random(2_000_000)  # 15 MB as float64: pickled as it is

    class Heavy(Handle):
        def forward(self, batch):
            return [float(weights[0]) for _ in batch]

    with caplog.at_level(logging.WARNING, logger="easyserve"):
        with serve(Heavy) as server:
            assert post_json(server.url + "/predict", {"n": 1}) == (200, float(weights[0]))
    said = [r.getMessage() for r in caught(caplog) if "goes to each worker" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("Handle: test_a_handle_class_that_takes_a_large_array_with_it"), said
    assert "goes to each worker as 15 MB, 15 MB of it the variable `weights` of the function that made it" in said[0]
    assert "Load a model or large array in setup() instead" in said[0]


class Settings:
    """A plain class defined in this test module, passed to a handle inside HandleArgs."""

    threshold = 0.25


def test_handle_args_holding_an_instance_of_a_test_module_class_work(serve):
    with serve("handles_robust:CallsArgs", HandleArgs={"cfg": Settings()}) as server:
        assert post_json(server.url + "/predict", {"n": 1}, timeout=10) == (200, {"threshold": 0.25})


def test_handle_args_holding_an_instance_of_a_script_class_work(tmp_path):
    code = """
        import json, urllib.request
        from easyserve import Server

        class Settings:  # defined in the script itself (__main__), as in a notebook
            threshold = 0.75

        server = Server(handle="handles_robust:CallsArgs", GPUs="cpu", Port=0, HandleArgs={"cfg": Settings()})
        server.start(timeout=20)
        try:
            req = urllib.request.Request(server.url + "/predict", data=b'{"n": 1}',
                                         headers={"Content-Type": "application/json"})
            print("ANSWER", urllib.request.urlopen(req, timeout=10).read().decode(), flush=True)
        finally:
            server.stop()
    """
    exit_code, out, err, _ = run_script(tmp_path / "script_args.py", code, timeout=30)
    assert exit_code == 0 and 'ANSWER {"threshold":0.75}' in out, f"stdout:\n{out}\nstderr:\n{err}"


# -- clients that go away ----------------------------------------------------------------------------


@pytest.mark.parametrize("http_workers", [1, 2])  # 2: the front tells the server process the client has gone
def test_requests_whose_clients_gave_up_are_not_run(serve, tmp_path, http_workers):
    journal = tmp_path / "journal.txt"
    with serve("handles_robust:Sleeper", HandleArgs={"journal": str(journal)}, TimeoutS=20,
               HttpWorkers=http_workers) as server:
        url = server.url + "/predict"
        # busy long enough that the impatient clients give up behind it, however late it is seen busy
        busy = Background(lambda: post_json(url, {"mark": "busy", "sleep": 2}, timeout=15))
        assert wait_for(lambda: server.workers[0]["state"] == "busy", 5)

        async def impatient() -> list[str]:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.2)) as session:
                async def one(i: int) -> str:
                    try:
                        async with session.post(url, json={"mark": f"gone-{i}"}) as resp:
                            return f"answered {resp.status}"
                    except asyncio.TimeoutError:
                        return "gave up"

                return await asyncio.gather(*(one(i) for i in range(6)))

        assert asyncio.run(impatient()) == ["gave up"] * 6
        assert busy.result(15) == (200, {"mark": "busy", "sleep": 2})
        assert post_json(url, {"mark": "after"}, timeout=10) == (200, {"mark": "after"})
        time.sleep(0.3)
        ran = journal.read_text().split()
    assert ran == ["busy", "after"], f"the handle ran requests whose clients had gone: {ran}"
