"""`easyserve run --supervise`: the whole server process is restarted when it dies."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Iterator

import pytest
from conftest import Background, _alive, free_port, post_json, request, wait_busy, wait_until
from test_cli import TESTS, easyserve

from easyserve import supervisor
from easyserve.signals import SAME_STOP_S
from easyserve.supervisor import HURRY


class Log:
    """Collects a process's output in a thread, so the test can wait for lines without blocking."""

    def __init__(self, proc) -> None:
        self.lines: list[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(proc.stdout), daemon=True)
        self.thread.start()

    def wait_count(self, pattern: str, count: int, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while sum(bool(re.search(pattern, line)) for line in list(self.lines)) < count:
            assert time.monotonic() < end, f"no {count}x {pattern!r} in:\n" + "".join(self.lines)
            time.sleep(0.05)


@contextlib.contextmanager
def supervised(handle: str) -> Iterator[tuple[subprocess.Popen, Log, str]]:
    """``easyserve run --supervise`` serving ``handle`` on CPU on a free port, once it listens; the
    process, its output and its URL. Killed after, whatever happened."""
    port = free_port()
    with easyserve("run", "--supervise", "--handle", handle, "--gpus", "cpu", "--port", str(port)) as proc:
        log = Log(proc)
        try:
            log.wait_count("listening on", 1)
            yield proc, log, f"http://127.0.0.1:{port}"
        finally:
            proc.kill()


def test_supervisor_restarts_a_killed_server_and_passes_sigterm_on():
    with supervised("handles_for_tests:Recorder") as (proc, log, url):
        first = request(url + "/health")[2]["pid"]
        worker = request(url + "/ready")[2]["workers"][0]["pid"]
        os.kill(first, signal.SIGKILL)
        log.wait_count("restarting in", 1)
        log.wait_count("listening on", 2)
        second = request(url + "/health")[2]["pid"]
        assert second != first
        assert post_json(url + "/predict", {"value": 5})[1]["value"] == 5
        assert not _alive(worker)  # the killed server's worker went with it
        new_worker = request(url + "/ready")[2]["workers"][0]["pid"]
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0
    assert not _alive(second) and not _alive(new_worker)


def test_a_supervised_server_on_port_0_comes_back_on_the_port_it_had():
    """Port 0 chose a free port at each start: a server restarted after a crash came back on another,
    where no client or balancer looked for it, though the guardian said it was restarted."""
    with easyserve("run", "--supervise", "--handle", "handles_for_tests:Recorder", "--gpus", "cpu",
                   "--port", "0") as proc:
        log = Log(proc)
        try:
            log.wait_count("listening on", 1)
            url = re.search(r"listening on (http://\S+)", "".join(log.lines))[1]
            os.kill(request(url + "/health")[2]["pid"], signal.SIGKILL)
            log.wait_count("listening on", 2)
            assert post_json(url + "/predict", {"value": 5})[1]["value"] == 5
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            proc.kill()
    assert [found for found in re.findall(r"listening on (http://\S+)", "".join(log.lines))] == [url, url]


def test_one_stop_sent_to_the_guardian_and_its_server_alike_drains():
    """systemd's stop (KillMode=control-group) and `pkill -f "easyserve run"` send SIGTERM to both: the
    server had its own, then the guardian's, took them for an operator's second signal and stopped at
    once, its requests in flight a 503, and the guardian exited 0 all the same."""
    with supervised("handles_for_tests:Crashing") as (proc, log, url):
        server = request(url + "/health")[2]["pid"]
        slow = Background(lambda: post_json(url + "/predict", {"sleep": 3, "n": 1}, timeout=30))
        wait_until(lambda: request(url + "/stats")[2]["workers"][0]["state"] == "busy", 10, "the request to run")
        os.kill(server, signal.SIGTERM)
        time.sleep(0.2)  # at once, the two are one pending signal at times: apart, two
        proc.send_signal(signal.SIGTERM)
        status, answer = slow.result(30)
        assert status == 200 and answer["echo"] == {"sleep": 3, "n": 1}, answer
        assert proc.wait(30) == 0
    said = "".join(log.lines)
    assert "stopping now without draining" not in said and "SIGTERM again: still draining" in said
    # the way to stop at once that works, once: "send it again" (to the server) only drains
    assert said.count("SIGTERM received: draining (signal the supervisor again to stop at once)") == 1, said


def test_one_stop_that_reaches_the_guardian_twice_drains():
    """A wrapper around `easyserve run --supervise` (a shell's trap, runuser) passes on the stop its process
    group got: the guardian had two, took the second for an operator's, and the server stopped at once."""
    with supervised("handles_for_tests:Crashing") as (proc, log, url):
        slow = Background(lambda: post_json(url + "/predict", {"sleep": 3, "n": 1}, timeout=30))
        wait_until(lambda: request(url + "/stats")[2]["workers"][0]["state"] == "busy", 10, "the request to run")
        proc.send_signal(signal.SIGTERM)
        log.wait_count("SIGTERM: passed on", 1)
        proc.send_signal(signal.SIGTERM)  # as the wrapper passes it on
        status, answer = slow.result(30)
        assert status == 200 and answer["echo"] == {"sleep": 3, "n": 1}, answer
        assert proc.wait(30) == 0
    said = "".join(log.lines)
    assert "stopping now without draining" not in said and "SIGTERM again within 0.5 s: the same stop" in said, said


def test_second_sigterm_stops_at_once_without_draining():
    with easyserve("run", "--handle", "handles_for_tests:Crashing", "--gpus", "cpu", "--port", "0") as proc:
        log = Log(proc)
        try:
            log.wait_count("listening on", 1)
            url = re.search(r"listening on (http://\S+)", "".join(log.lines)).group(1)
            answer: list = []
            slow = threading.Thread(target=lambda: answer.append(post_json(url + "/predict", {"sleep": 20})))
            slow.start()
            wait_busy(url)  # the request has reached the worker before the first SIGTERM
            proc.send_signal(signal.SIGTERM)
            log.wait_count("draining", 1)
            time.sleep(SAME_STOP_S)  # sooner, it is the same stop come twice
            begun = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)
            took = time.monotonic() - begun
            slow.join(10)
        finally:
            proc.kill()
    assert took < 4  # not the 20 s the request would have taken
    assert answer[0][0] == 503 and "server stopped while this request ran" in answer[0][1]["error"]


def test_sighup_to_the_supervisor_reloads_its_server_from_the_config(tmp_path):
    """SIGHUP re-reads the config and replaces the workers; sent to the guardian, its default action
    ended the guardian, and with it the service, for good."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = tmp_path / "server.yaml"
    config.write_text(f"Handle: handles_ops:Versioned\nHandleArgs: {{version: 1}}\nGPUs: cpu\nPort: {port}\n")
    with easyserve("run", str(config), "--supervise") as proc:
        log = Log(proc)
        try:
            log.wait_count("listening on", 1)
            server = request(url + "/health")[2]["pid"]
            assert post_json(url + "/predict", {"value": 1})[1]["version"] == 1
            config.write_text(config.read_text().replace("version: 1", "version: 2"))
            proc.send_signal(signal.SIGHUP)
            log.wait_count("reload done", 1)
            assert post_json(url + "/predict", {"value": 1})[1]["version"] == 2
            assert proc.poll() is None and request(url + "/health")[2]["pid"] == server  # the same server
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        finally:
            proc.kill()
    assert proc.returncode == 0 and not _alive(server)


@pytest.mark.parametrize("how", ["guardian killed", "told twice"])
def test_a_server_whose_supervisor_died_drains_what_it_runs(how):
    """Linux tells the server its guardian died once for each of the guardian's threads. As SIGTERM,
    the second one ended the drain at once, and the request in flight got 503; now it drains."""
    with supervised("handles_for_tests:Crashing") as (proc, log, url):
        server = request(url + "/health")[2]["pid"]
        answers: list = []
        slow = threading.Thread(target=lambda: answers.append(post_json(url + "/predict", {"sleep": 1.5})))
        slow.start()
        wait_busy(url)
        if how == "guardian killed":
            proc.kill()
        else:  # what Linux sends as the guardian's threads end, twice
            os.kill(server, signal.SIGUSR1)
            os.kill(server, signal.SIGUSR1)
        log.wait_count("the supervisor is gone: draining", 1)
        slow.join(20)
        assert wait_for_exit(server, 20)
    assert [status for status, _ in answers] == [200] and answers[0][1]["echo"] == {"sleep": 1.5}
    assert not [line for line in log.lines if "second" in line]


def wait_for_exit(pid: int, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def test_a_third_signal_kills_a_server_that_no_signal_reaches():
    """A server stopped (SIGSTOP), or wedged in native code, was waited on for ever."""
    with supervised("handles_for_tests:Recorder") as (proc, log, url):
        server = request(url + "/health")[2]["pid"]
        worker = request(url + "/ready")[2]["workers"][0]["pid"]
        os.kill(server, signal.SIGSTOP)
        try:
            proc.send_signal(signal.SIGTERM)
            log.wait_count("SIGTERM: passed on to server pid", 1)  # each one handled (two at once would be one)
            time.sleep(SAME_STOP_S)  # sooner, it is the same stop come twice
            proc.send_signal(signal.SIGTERM)
            log.wait_count("SIGTERM again: passed on to server pid", 1)
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)
        except BaseException:  # a stopped server left behind holds the output pipe open: the test would hang
            with contextlib.suppress(ProcessLookupError):
                os.kill(server, signal.SIGKILL)
            raise
    assert wait_for_exit(server, 10) and wait_for_exit(worker, 10)
    assert "a third signal: killing server" in "".join(log.lines)


def _pending(pid: int) -> int:
    """The signals sent to process ``pid`` and not yet delivered (it is stopped), as a mask."""
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("ShdPnd:")).split()[1], 16)


def _stopped(pid: int) -> bool:
    """Whether every thread of process ``pid`` has stopped (SIGSTOP): until then, one may take a signal sent."""
    states = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):  # a thread that ended
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
    return bool(states) and all(state in "Tt" for state in states)


@contextlib.contextmanager
def supervised_into_a_pipe() -> Iterator[tuple[subprocess.Popen, int, str]]:
    """``easyserve run --supervise`` with its output (and its server's) into a pipe, read until the server
    listens; the guardian, the pipe's read end and the URL. Killed after, and its pipe closed."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    read_end, write_end = os.pipe()
    proc = subprocess.Popen(["easyserve", "run", "--supervise", "--handle", "handles_for_tests:Recorder", "--gpus",
                             "cpu", "--port", str(port)], stdout=write_end, stderr=write_end, env=env)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb", buffering=0, closefd=False) as output:
            said = b""
            while b"listening on" not in said:
                chunk = output.read(4096)
                assert chunk, said.decode(errors="replace")
                said += chunk
        yield proc, read_end, f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()
        os.close(read_end)


def fill(read_end: int) -> None:
    """Fill the pipe whose read end is ``read_end``, which nobody reads any more: a write to it blocks."""
    filler = os.open(f"/proc/self/fd/{read_end}", os.O_WRONLY | os.O_NONBLOCK)  # a description of its own
    try:
        with contextlib.suppress(BlockingIOError):
            while True:
                os.write(filler, b"x" * 4096)
    finally:
        os.close(filler)


def test_a_third_signal_kills_the_server_while_the_guardians_log_cannot_be_written():
    """The guardian said it killed the server before it did: with its stderr a full pipe (a log reader
    that stalled), the line never went, and the server that no signal reaches was never killed."""
    server = None
    with supervised_into_a_pipe() as (proc, read_end, url):
        try:
            server = request(url + "/health")[2]["pid"]
            os.kill(server, signal.SIGSTOP)
            wait_until(lambda: _stopped(server), 15, "the server to stop")
            fill(read_end)
            # two signals, each seen to reach the (stopped) server: the first as it came, the second as the
            # guardian's HURRY (stop at once); none is merged with another
            for sig, passed in ((signal.SIGTERM, signal.SIGTERM), (signal.SIGINT, HURRY)):
                proc.send_signal(sig)
                wait_until(lambda passed=passed: _pending(server) & 1 << (passed - 1), 15, f"{sig.name} passed on")
                time.sleep(SAME_STOP_S)  # sooner, it is the same stop come twice
            proc.send_signal(signal.SIGTERM)
            assert wait_for_exit(server, 15)
        finally:
            if server is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(server, signal.SIGKILL)


def test_a_guardian_whose_log_nobody_reads_restarts_its_server_and_stops_when_told():
    """With stderr a pipe nobody reads (a log reader that stalled), the guardian's "restarting in 0.5s"
    blocked it for good: a server that crashed then was never started again. And a server whose log
    could not be written could not exit: it waited for its log's writer in logging's shutdown."""
    with supervised_into_a_pipe() as (proc, read_end, url):
        first = request(url + "/health")[2]["pid"]
        fill(read_end)
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: _answers(url + "/ready") and request(url + "/health")[2]["pid"] != first, 30,
                   "a server started again")
        second = request(url + "/health")[2]["pid"]
        assert post_json(url + "/predict", {"value": 5})[1]["value"] == 5
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert wait_for_exit(second, 10)


def test_a_sighup_while_the_server_still_starts_is_not_a_crash(tmp_path):
    """The guardian passes SIGHUP on as it comes; before the server reads it as "re-read the config",
    its default action ended the server, which was then restarted as a crash."""
    port = free_port()
    config = tmp_path / "server.yaml"
    config.write_text(f"Handle: handles_ops:Versioned\nHandleArgs: {{version: 1, setup_s: 2}}\nGPUs: cpu\n"
                      f"Port: {port}\n")
    with easyserve("run", str(config), "--supervise") as proc:
        log = Log(proc)
        try:
            log.wait_count("supervising server pid", 1)
            time.sleep(0.5)  # importing, or its worker setting up
            proc.send_signal(signal.SIGHUP)
            log.wait_count("listening on", 1)
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        finally:
            proc.kill()
    out = "".join(log.lines)
    assert proc.returncode == 0 and "killed by signal" not in out and out.count("supervising server pid") == 1, out


RESTART_UNDER_SIGTERM = """
import logging, os, signal, subprocess, sys
from easyserve import supervisor
from easyserve.supervisor import HURRY
real, calls = subprocess.Popen, []
def popen(*args, **kw):  # the second start, a restart, gets a SIGTERM while Popen runs
    calls.append(args)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kw)
subprocess.Popen = popen
logging.basicConfig(level=logging.INFO)
sys.exit(supervisor.supervise(sys.argv[1:]))
"""


def test_a_sigterm_while_the_server_is_restarted_reaches_the_new_one():
    """Handled while Popen ran, it found the dead server: the new one was never told, and the
    guardian waited on it for ever."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-c", RESTART_UNDER_SIGTERM, "--handle", "handles_for_tests:Recorder", "--gpus", "cpu",
               "--port", str(free_port())]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        log = Log(proc)
        try:
            log.wait_count("listening on", 1)
            server = int(re.search(r"supervising server pid (\d+)", "".join(log.lines)).group(1))
            os.kill(server, signal.SIGKILL)
            log.wait_count("supervising server pid", 2)
            new_server = int(re.findall(r"supervising server pid (\d+)", "".join(log.lines))[1])
            proc.wait(30)
        finally:
            proc.kill()
    assert proc.returncode == 0 and wait_for_exit(new_server, 10)


def test_a_server_stopped_on_purpose_stops_its_supervisor_too():
    """`kill -TERM <server>`: it drains and exits 0. That was logged as an error and restarted."""
    with supervised("handles_for_tests:Recorder") as (proc, log, url):
        server = request(url + "/health")[2]["pid"]
        os.kill(server, signal.SIGTERM)
        proc.wait(30)
        log.thread.join(5)
    out = "".join(log.lines)
    assert proc.returncode == 0 and "stopping too" in out and "restarting" not in out and " ERROR " not in out, out


def test_a_server_that_never_gets_ready_is_given_up_on():
    """A wrong model path was restarted for ever, 60 s apart."""
    with easyserve("run", "--supervise", "--handle", "handles_for_tests:BrokenSetup", "--gpus", "cpu",
                   "--port", "0") as proc:
        log = Log(proc)
        try:
            proc.wait(90)
            log.thread.join(5)
        finally:
            proc.kill()
    out = "".join(log.lines)
    assert proc.returncode == 1 and out.count("supervising server pid") == supervisor.MAX_FAILED_STARTS, out
    last = [line for line in log.lines if "easyserve.supervisor" in line][-1]
    assert "giving up" in last and "'missing.onnx' not found" in last, out


def test_a_sigterm_while_the_server_still_imports_exits_0():
    """The server, ended by the SIGTERM before it set its handlers, was passed on as -15: exit code 241."""
    with easyserve("run", "--supervise", "--handle", "handles_for_tests:Recorder", "--gpus", "cpu",
                   "--port", "0") as proc:
        log = Log(proc)
        try:
            log.wait_count("supervising server pid", 1)
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
            log.thread.join(5)
        finally:
            proc.kill()
    out = "".join(log.lines)
    assert proc.returncode == 0 and "listening on" not in out, out


def test_at_log_level_warning_the_supervisor_still_knows_its_server_got_ready(tmp_path):
    """It read "listening on" in the server's log, which `--log-level warning` leaves out: a server that
    had served, killed during the drain, was taken for one stopped before it was ready (exit 0, as if
    drained), and a server killed five times for one that never started (given up)."""
    port = free_port()
    config = tmp_path / "slow.yaml"
    config.write_text(f'GPUs: cpu\nHandle: "handles_for_tests:Recorder"\nHandleArgs: {{delay: 30}}\nPort: {port}\n')
    url = f"http://127.0.0.1:{port}"
    with easyserve("run", str(config), "--supervise", "--log-level", "warning") as proc:
        log = Log(proc)
        try:
            wait_until(lambda: _answers(url + "/ready"), timeout=60, what="the server to get ready")
            server = request(url + "/health")[2]["pid"]
            threading.Thread(target=lambda: _answers(url + "/predict", {"value": 1}), daemon=True).start()
            wait_busy(url)  # a request the drain waits for
            proc.send_signal(signal.SIGTERM)
            wait_until(lambda: not _answers(url + "/health"), timeout=10, what="the drain to begin")
            os.kill(server, signal.SIGKILL)  # killed in the middle of its drain: it did not drain
            proc.wait(30)
        finally:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGKILL, "".join(log.lines)
    assert "listening on" not in "".join(log.lines)  # the log level held


def _answers(url: str, body: dict | None = None) -> bool:
    try:
        return (post_json(url, body, timeout=40) if body is not None else request(url, timeout=2))[0] == 200
    except OSError:
        return False


def test_a_server_that_has_served_is_restarted_through_an_outage_longer_than_five_starts(tmp_path):
    """Five failed starts in a row gave up for good, whether or not a server had ever been ready: one
    that had served, killed while its model store was out a little longer than five starts take (some
    20 s), left the service down until someone started it again. Giving up is for a server that never
    worked (a wrong path); after one has, the restarts go on."""
    marker = tmp_path / "store-is-out"
    config = tmp_path / "config.yaml"
    config.write_text(f"GPUs: cpu\nPort: {free_port()}\nHandle: handles_robust:FlakySetup\n"
                      f"HandleArgs: {{marker: {str(marker)!r}}}\n")
    with easyserve("run", "--supervise", str(config)) as proc:
        log = Log(proc)
        try:
            log.wait_count("listening on", 1)
            url = re.search(r"listening on (http://\S+)", "".join(log.lines)).group(1)
            marker.touch()  # the store goes out, and the server is killed (the OOM killer)
            os.kill(request(url + "/health")[2]["pid"], signal.SIGKILL)
            log.wait_count("restarting in", supervisor.MAX_FAILED_STARTS + 1, timeout=60)
            assert proc.poll() is None and "giving up" not in "".join(log.lines)
            marker.unlink()  # back: the next start serves
            log.wait_count("listening on", 2, timeout=60)
            assert request(url + "/health")[0] == 200
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            proc.kill()


def test_a_signal_as_the_guardian_exits_after_a_clean_drain_leaves_its_exit_code_0():
    """Once its server had drained, the guardian put the signals' default actions back while it waited
    to write its last lines (stderr a full pipe): a SIGHUP then (a reload sent to a stopping service)
    ended it with 129, a failed stop to systemd, after a clean drain."""
    with supervised_into_a_pipe() as (proc, read_end, url):
        server = request(url + "/health")[2]["pid"]
        fill(read_end)
        proc.send_signal(signal.SIGTERM)
        assert wait_for_exit(server, 30)
        time.sleep(0.2)
        proc.send_signal(signal.SIGHUP)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_a_supervised_config_whose_path_begins_with_a_dash_is_served(tmp_path):
    """The guardian put the config's path first in its server's command: "-odd.yaml" was read as an
    option there ("No such option: -o"), and the guardian took that for a config error and stopped."""
    port = free_port()
    (tmp_path / "-odd.yaml").write_text(f'GPUs: cpu\nHandle: "handles_for_tests:Recorder"\nPort: {port}\n')
    with easyserve("run", "--supervise", "--", "-odd.yaml", cwd=tmp_path) as proc:
        log = Log(proc)
        try:
            log.wait_count("listening on", 1)
            assert post_json(f"http://127.0.0.1:{port}/predict", {"value": 1})[1]["value"] == 1
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        finally:
            proc.kill()
    assert proc.returncode == 0
