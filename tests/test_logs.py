"""Worker output is read by the server and kept per worker; no log, however stuck, stops the server."""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from conftest import Background, caught, free_port, post_json, post_many, request, wait_until
from test_cli import TESTS
from test_robustness import wait_for

from easyserve import records

JSON = {"Content-Type": "application/json"}


def test_a_handles_output_and_a_failed_batchs_traceback_are_in_server_logs(serve):
    with serve("handles_ops:Noisy", ProcessPerGPU=2) as server:
        assert post_json(server.url + "/predict", {"n": 7})[0] == 200
        status, body = post_json(server.url + "/predict", {"n": 8, "fail": True})
        assert status == 500 and "ValueError: bad n=8" in body["error"]
        worker = body["error"].split("traceback in worker ")[1].split("'")[0]  # the error says where to look
        assert worker in ("cpu/0", "cpu/1")

        assert wait_for(lambda: "ValueError: bad n=8" in str(server.logs()), 5), server.logs()
        text = str(server.logs(worker, tail=None))
        assert "Traceback (most recent call last)" in text and "forward sees n=8" in text
        # in the order written, the last lines (tail) too: a traceback's lines come in one read
        for tail in (None, 50):
            texts = [line.text for line in server.logs(worker, tail=tail)]
            assert texts.index("Traceback (most recent call last):") < texts.index("ValueError: bad n=8"), texts
        # from the handle's own code: the worker's calls that led there are easyserve's, not the reader's
        frames = [t for t in texts[texts.index("Traceback (most recent call last):"):] if t.startswith("  File ")]
        assert frames and all("handles_ops.py" in frame for frame in frames), texts
        assert "noisy setup on cpu/0" in str(server.logs("cpu/0", tail=None))
        assert "noisy setup on cpu/0" not in str(server.logs("cpu/1", tail=None))
        assert "noisy setup on cpu/1" in str(server.logs(1, tail=None))
        assert len(server.logs(tail=3)) == 3
        with pytest.raises(ValueError, match="no worker 'gpu9/0'; workers are cpu/0, cpu/1"):
            server.logs("gpu9/0")
        line = server.logs(worker)[-1]
        assert line.worker == worker and line.pid in [w["pid"] for w in server.workers]
    # kept after stop: why a worker failed is still there to read
    assert "ValueError: bad n=8" in str(server.logs(tail=None))


def test_what_a_worker_wrote_before_it_said_ready_or_answered_an_error_is_logged_before_that(serve, caplog):
    """A setup's warning came out after start() had returned (below a notebook's server card, or in
    the next cell), and a failed batch's traceback after its 500: the pipe the worker writes to and
    the socket it answers on were read in whichever order the event loop saw them."""
    caplog.set_level(logging.INFO, logger="easyserve")
    messages: list[str] = []

    class InOrder(logging.Handler):  # on the logger: run where each record is made, in that order
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = InOrder(logging.INFO)
    logging.getLogger("easyserve").addHandler(handler)
    try:
        for _ in range(3):
            messages.clear()
            with serve("handles_ops:Noisy") as server:
                ready = next(i for i, m in enumerate(messages) if m.startswith("worker cpu/0 ready"))
                said = [i for i, m in enumerate(messages) if "noisy setup on cpu/0" in m or "a warning from setup" in m]
                assert len(said) == 2 and max(said) < ready, messages
                assert post_json(server.url + "/predict", {"n": 8, "fail": True})[0] == 500
                assert any("ValueError: bad n=8" in m for m in messages), messages  # logged before the answer
    finally:
        logging.getLogger("easyserve").removeHandler(handler)


def test_the_first_request_each_line_of_preprocess_refuses_is_logged_at_info_with_its_traceback(serve, caplog):
    """A handle's own bug in preprocess (a reshape to the wrong size) may be what refuses a request: its
    ValueError was a 400 whose traceback went only to DEBUG, and `easyserve run` answered every request
    400 with nothing in its log. A BadRequest, a refusal on purpose, stays at DEBUG."""
    caplog.set_level(logging.INFO, logger="easyserve")
    with serve("handles_robust:Sleeper") as server:
        url = server.url + "/predict"
        assert request(url, b'{"reject": "first"}', {**JSON, "X-Request-Id": "refused-1"})[0] == 400
        said = "preprocess refused request refused-1 (answered 400: said once for each line that refuses"
        assert wait_until(lambda: said in caplog.text, 10)
        time.sleep(1.5)  # past the pause between two such tracebacks: the same line is still not said again
        assert request(url, b'{"reject": "again"}', {**JSON, "X-Request-Id": "refused-2"})[0] == 400
        assert post_json(url, {"mark": "after"})[0] == 200
    infos = [r.getMessage() for r in caught(caplog)
             if r.levelno == logging.INFO and "preprocess refused" in r.getMessage()]
    assert len(infos) == 1 and "ValueError: rejected: first" in infos[0] and "Traceback" in infos[0], infos
    assert "refused-2" not in caplog.text


def test_a_request_that_fails_alone_where_its_batch_failed_says_its_own_error_and_where(serve):
    """A batch fails at a line, then its bad request alone at the same line with another message: its line
    said "(raised where the traceback above shows)", the traceback above being another exception."""
    with serve("handles_ops:CountsInItsError", MaxBatchSize=4) as server:
        url = server.url + "/predict"
        blocker = Background(lambda: post_json(url, {"sleep": 1}))  # holds the worker: the two queue up
        wait_until(lambda: server.workers[0]["state"] == "busy", 10, "the worker busy")
        bad = Background(lambda: request(url, b'{"bad": true}', {**JSON, "X-Request-Id": "the-bad-one"}))
        good = Background(lambda: post_json(url, {}))
        wait_until(lambda: request(server.url + "/stats")[2]["queue_depth"] == 2, 10, "both queued")
        assert blocker.result(20)[0] == 200 and good.result(20) == (200, {"ok": True})
        assert bad.result(20)[0] == 500
        time.sleep(0.5)
        logs = str(server.logs(tail=None))
    assert logs.count("Traceback") == 1 and "ValueError: a batch of 2 holds a bad request" in logs, logs
    assert ("forward failed for request the-bad-one: ValueError: a batch of 1 holds a bad request (raised at the line "
            "where its batch's traceback above ends)") in logs, logs


def test_a_dying_workers_last_record_is_logged_before_its_death(serve, caplog):
    """A record at the end of a read waits a moment for more lines (see the test below); a worker's
    last one, followed at once by its exit, came out after the server's line saying it had died,
    where the event loop (busy for a moment: a large answer, a collection) saw both in one turn."""
    caplog.set_level(logging.INFO, logger="easyserve")
    messages: list[str] = []

    class InOrder(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = InOrder(logging.INFO)
    logging.getLogger("easyserve").addHandler(handler)
    try:
        with serve("handles_ops:WarnsAndDies") as server:
            for _ in range(3):
                messages.clear()
                sent = Background(lambda: post_json(server.url + "/predict", {"die": 0.3}))
                time.sleep(0.15)
                server._loop.call_soon_threadsafe(time.sleep, 0.5)  # busy while it warns and dies
                assert sent.result()[0] == 500  # run twice: on two workers
                said = [m for m in messages if "about to run out of memory" in m or "exited with code 3" in m]
                assert len(said) == 4 and all("about to run out" in m for m in said[::2]), said
                wait_for(lambda: server.workers[0]["state"] == "idle", 20)
                # a request answered between: three in a row, each ending its workers, read as the server's fault
                assert post_json(server.url + "/predict", {"n": 1})[0] == 200
    finally:
        logging.getLogger("easyserve").removeHandler(handler)


def test_taking_in_a_pipe_reads_what_it_holds_and_no_more_while_a_child_writes_on():
    """take_in() read until the pipe was empty: with a process writing on (a child the handle started),
    it held the event loop for as long as that writer kept ahead, 20-800 ms with `yes`."""
    import asyncio

    from easyserve import logs

    read, write = os.pipe()
    writer = subprocess.Popen(["yes"], stdout=write)
    os.close(write)
    taken: list[int] = []

    class Counted(logs.WorkerOutput):
        def data_received(self, data: bytes) -> None:
            taken.append(len(data))

    async def take_in_while_it_writes() -> None:
        output = Counted("cpu/0", writer.pid, logs.new_ring())
        output.attach(asyncio.get_running_loop(), read)
        asyncio.get_running_loop().remove_reader(read)  # this test reads by take_in alone
        for _ in range(10):
            await asyncio.sleep(0.05)  # the pipe full again, the writer blocked on it
            before = len(taken)
            output.take_in()
            assert 0 < sum(taken[before:]) <= 4 * 65536, sum(taken[before:])  # the pipe's 64 kB, not more
        writer.kill()
        output._loop.add_reader(read, output._readable)  # as attach left it, for close()
        output.close()

    try:
        asyncio.run(asyncio.wait_for(take_in_while_it_writes(), 20))
    finally:
        writer.kill()
        writer.wait()


def run_script(script: str) -> subprocess.CompletedProcess:
    """``script`` run by Python with the tests' handles at hand and logging not configured; it must pass."""
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return done


def test_with_logging_not_configured_warnings_and_errors_show_with_their_level_and_prints_do_not():
    """A notebook or a script that configures no logging: records go where Python's last resort sends
    them (stderr, WARNING and above), but that one writes the message alone, so a worker's warning and
    a failed batch's traceback read alike. A handle's prints stay in Server.logs(): shown in a cell,
    they would land in whichever cell runs when they come."""
    script = (
        "from easyserve import Server\n"
        "from conftest import post_json\n"
        "with Server(handle='handles_ops:Noisy', GPUs='cpu', Port=0) as server:\n"
        "    assert post_json(server.url + '/predict', {'n': 8, 'fail': True})[0] == 500\n"
        "    assert 'noisy setup on cpu/0' in str(server.logs())\n"
    )
    done = run_script(script)
    lines = done.stderr.splitlines()
    assert any(re.fullmatch(r"WARNING: cpu/0 \[\d+\] easyserve: a warning from setup on cpu/0", line)
               for line in lines), done.stderr
    failed = next(i for i, line in enumerate(lines) if line.startswith("ERROR: cpu/0 ["))  # after the request it cost
    assert re.search(r"\] forward failed for request [0-9a-f]{32}:$", lines[failed]), done.stderr
    assert lines[failed + 1] == "Traceback (most recent call last):", done.stderr
    assert "noisy setup" not in done.stderr + done.stdout and "INFO" not in done.stderr


def test_with_two_servers_in_a_process_the_shown_lines_name_their_server():
    """A notebook comparing two models: each server has a cpu/0, and a worker's death was said of
    neither in particular. Where more than one server runs, a server's lines name it by its port."""
    script = (
        "from easyserve import Server\n"
        "from conftest import post_json\n"
        "with Server(handle='handles_ops:Noisy', GPUs='cpu', Port=0) as first:\n"
        "    with Server(handle='handles_ops:Noisy', GPUs='cpu', Port=0) as second:\n"
        "        assert post_json(second.url + '/predict', {'n': 1, 'fail': True})[0] == 500\n"
        "        print('port', second.port, flush=True)\n"
        "    assert post_json(first.url + '/predict', {'n': 1, 'fail': True})[0] == 500\n"
    )
    done = run_script(script)
    second = done.stdout.split()[1]
    failed = [line for line in done.stderr.splitlines() if line.startswith("ERROR: ")]
    assert len(failed) == 2, done.stderr
    # while both ran: named; once the first alone runs, said as before
    assert re.match(rf"ERROR: server :{second}: cpu/0 \[\d+\] forward failed for request", failed[0]), done.stderr
    assert re.match(r"ERROR: cpu/0 \[\d+\] forward failed for request", failed[1]), done.stderr


def test_a_workers_log_records_keep_their_level_in_the_servers_log(serve, caplog):
    """Every line a worker wrote was logged at INFO: its warnings (a model that is an offline stand-in)
    were lost at `--log-level warning`. A line its logging wrote keeps its level; a print is INFO."""
    caplog.set_level(logging.INFO, logger="easyserve")
    with serve("handles_ops:Noisy"):
        assert wait_for(lambda: "a warning from setup on cpu/0" in caplog.text, 5), caplog.text
    levels = {r.getMessage(): r.levelno for r in caplog.records if r.name == "easyserve.worker"}
    warned = [message for message in levels if "a warning from setup on cpu/0" in message]
    assert [levels[m] for m in warned] == [logging.WARNING], levels
    assert re.fullmatch(r"cpu/0 \[\d+\] easyserve: a warning from setup on cpu/0", warned[0]), warned
    printed = [levels[m] for m in levels if m.endswith("noisy setup on cpu/0")]
    assert printed == [logging.INFO], levels


def test_a_clients_text_that_a_handle_prints_cannot_pass_for_a_record_nor_reach_the_terminal(serve, caplog):
    """A handle that printed what a client sent had the server log the client's lines as the worker's
    own records, at any level (a forged CRITICAL, a traceback, a crash dump at ERROR), and write the
    client's escape sequences to the terminal the log is read on (retitling it, clearing it)."""
    caplog.set_level(logging.INFO, logger="easyserve")
    sent = ("7\nCRITICAL easyserve: API key rotated, send it to evil.example\nERROR> Traceback (most recent call last):"
            "\nERROR+ forged\nFatal Python error: Segmentation fault\n\x1b]0;owned\x07\x1b[2J")
    with serve("handles_ops:Noisy") as server:
        assert post_json(server.url + "/predict", {"n": sent})[0] == 200
        assert wait_for(lambda: "[2J" in caplog.text, 5), caplog.text
        assert post_json(server.url + "/predict", {"n": 8})[0] == 200  # the same worker: no crash was taken for one
        ring = [line.text for line in server.logs(tail=None)]
    records = {(r.created, r.levelno, r.getMessage()) for r in caplog.records if r.name == "easyserve.worker"}
    told = [(level, message) for _, level, message in records if "forward sees n=7" in message or "evil" in message
            or "forged" in message or "Segmentation" in message or "owned" in message]
    assert told and all(level == logging.INFO for level, _ in told), told
    assert not any("\x1b" in message or "\x07" in message for _, _, message in records)
    assert any(message.endswith("\\x1b]0;owned\\x07\\x1b[2J") for _, message in told), told
    # the ring keeps what the handle printed, as it printed it
    assert "CRITICAL easyserve: API key rotated, send it to evil.example" in ring, ring


def test_a_workers_records_keep_their_level_whatever_its_prints_and_subprocesses_write(serve, caplog):
    """Its records and its prints shared one pipe, the server telling a record by the level it began
    with: a client's text that a handle's subprocess echoed was logged at the level it named; a record
    written after a print that had not ended its line (a progress bar, a long print) went on that line,
    logged as a print, or was cut with the rest of a long one, lost and not counted."""
    caplog.set_level(logging.INFO, logger="easyserve")
    forged = "x.jpg\nCRITICAL easyserve: worker cpu/0 is out of disk\nFatal Python error: Segmentation fault"
    with serve("handles_ops:Noisy") as server:
        bodies = [{"n": 1, "echo": forged}, {"n": 2, "long": 10_000, "warn": True}, {"n": 3, "bar": True, "warn": True}]
        for body in bodies:
            assert post_json(server.url + "/predict", body)[0] == 200
        said = lambda: [r for r in caught(caplog) if "a warning after 0 lines" in r.getMessage()]  # noqa: E731
        assert wait_for(lambda: len(said()) == 2, 5), caplog.text  # each once: caplog may hold a record twice
        assert post_json(server.url + "/predict", {"n": 4})[0] == 200  # the same worker: no crash was taken for one
    records = {(r.created, r.levelno, r.getMessage()) for r in caplog.records if r.name == "easyserve.worker"}
    assert [level for _, level, message in records if "a warning after 0 lines" in message] == [logging.WARNING] * 2
    told = [(level, message) for _, level, message in records if "out of disk" in message or "Segmentation" in message]
    assert len(told) == 2 and all(level == logging.INFO for level, _ in told), told


def test_tracebacks_and_python_warnings_from_a_worker_are_logged_whole_at_their_level(serve, caplog):
    """Only a record's first line kept its level: at --log-level warning the log had "caught and logged"
    without its traceback, nothing at all of a forward that raised (though the client's 500 said "traceback
    in worker cpu/0's log") or of a thread's exception, and no Python warning (printed, so INFO). Each
    line was a record of its own, so a traceback came apart (in a notebook, across cells)."""
    caplog.set_level(logging.WARNING, logger="easyserve")
    with serve("handles_ops:Faults", MaxBatchSize=1) as server:
        answers = [post_json(server.url + "/predict", {"fault": fault}) for fault in ("raise", "logged", "thread")]
        assert wait_for(lambda: "helper-thread" in caplog.text and "ZeroDivisionError" in caplog.text, 5), caplog.text
        ring = [line.text for line in server.logs(tail=None)]
    assert [status for status, _ in answers] == [500, 200, 200], answers
    assert "traceback in worker cpu/0's log" in answers[0][1]["error"]
    # (pytest's handlers see each record twice: dict.fromkeys keeps one of each)
    records = dict.fromkeys((r.created, r.levelno, r.getMessage().split(" ", 2)[2])
                            for r in caplog.records if r.name == "easyserve.worker")
    records = [(level, text) for _, level, text in records]
    assert [level for level, _ in records] == [logging.WARNING] * 2 + [logging.ERROR] * 3, records
    warning, alert, raised, logged, thread = (text.split("\n") for _, text in records)
    # a level of its own is logged as the standard one below it: its marks leaked, as "ALERT+ ..."
    assert alert == ["handle: an alert", "in two lines"], alert
    assert warning[0].startswith("py.warnings: ") and warning[0].endswith("UserWarning: weights cast to float16")
    assert [line.strip() for line in warning[1:]] == ['warnings.warn("weights cast to float16", stacklevel=1)']
    assert re.fullmatch("forward failed for request [0-9a-f]{32}:", raised[0]), raised  # whose answer it cost
    assert raised[1] == "Traceback (most recent call last):" and raised[-1] == "ValueError: a fault in forward"
    assert '    raise ValueError("a fault in forward")' in raised
    assert logged[:2] == ["handle: caught and logged", "Traceback (most recent call last):"]
    assert logged[-1] == "KeyError: 'missing key'"
    assert thread[:2] == ["Exception in thread helper-thread:", "Traceback (most recent call last):"]
    assert thread[-1] == "ZeroDivisionError: division by zero"
    # the worker's ring (server.logs(), the dashboard) has what it wrote, without the marks
    assert "ERROR handle: caught and logged" in ring and "KeyError: 'missing key'" in ring
    assert "Traceback (most recent call last):" in ring and "ValueError: a fault in forward" in ring
    assert not [line for line in ring if line.startswith(("ERROR+", "ERROR>", "WARNING+"))], ring
    assert "WARNING handle: an alert" in ring and "in two lines" in ring, ring


def test_prints_the_log_would_not_show_do_not_crowd_a_workers_warning_out(serve, caplog):
    """At --log-level warning, a handle's prints used the lines a second the workers may log (and were
    then not shown): a warning right after them was dropped, under a count of lines nobody would see."""
    caplog.set_level(logging.WARNING, logger="easyserve")
    with serve("handles_ops:Noisy") as server:
        assert post_json(server.url + "/predict", {"n": 1, "lines": 5000, "size": 10, "warn": True})[0] == 200
        assert wait_for(lambda: "a warning after 5000 lines" in caplog.text, 5), caplog.text
    assert "lines not logged" not in caplog.text


def test_a_worker_that_crashes_leaves_its_last_words_in_the_log(serve):
    with serve("handles_ops:Noisy") as server:
        first = server.workers[0]["pid"]
        status, body = post_json(server.url + "/predict", {"n": 1, "die": True})
        assert status == 500 and "exited with code 9" in body["error"]
        assert wait_for(lambda: str(server.logs()).count("about to crash") == 2, 5), server.logs()
        pids = {line.pid for line in server.logs(tail=None) if line.text == "about to crash"}
        assert first in pids and len(pids) == 2  # the first worker's and its replacement's (the retry)


def test_cpythons_own_fatal_error_among_the_prints_is_one_error_record_where_the_process_died(serve, caplog):
    """CPython's fatal error (Py_FatalError, an extension's) writes its dump to stderr, among the prints,
    not to faulthandler's file: with the prints apart from the records, it came out as 27 INFO lines, and
    at --log-level warning nothing of it. A print that only looks like one stays a print."""
    caplog.set_level(logging.WARNING, logger="easyserve")
    with serve("handles_ops:Noisy") as server:
        status, body = post_json(server.url + "/predict", {"n": 1, "fatal": True})
        assert status == 500 and "signal 6 (SIGABRT)" in body["error"], body
        assert post_json(server.url + "/predict", {"n": 2, "echo": "Fatal Python error: not really"})[0] == 200
    dumps = {(r.created, r.getMessage()) for r in caplog.records
             if r.name == "easyserve.worker" and r.levelno == logging.ERROR and "Fatal Python error" in r.getMessage()}
    assert len(dumps) == 2, dumps  # the worker, and the one its request was retried on
    assert all("an extension gave up" in message and "(most recent call first)" in message for _, message in dumps)
    assert not [r for r in caplog.records if "not really" in r.getMessage()]  # at INFO, below the log's level


def test_a_print_that_only_begins_as_a_fatal_error_is_logged_in_its_place(serve, caplog):
    """Held as a crash's dump until the process died or 2 s passed, it came after the prints that
    followed it, and took them into the dump (cut past 64 kB, the rest lost and not counted)."""
    caplog.set_level(logging.INFO, logger="easyserve")
    with serve("handles_ops:Noisy") as server:
        assert post_json(server.url + "/predict", {"n": 1, "echo": "Fatal Python error: not really"})[0] == 200
        assert post_json(server.url + "/predict", {"n": 2})[0] == 200
        # as it comes (a second, however loaded the machine), not after the 2 s a dump was waited for, twice
        assert wait_for(lambda: "forward sees n=2" in caplog.text, 1.5), caplog.text
    told = [r.getMessage() for r in caplog.records if r.name == "easyserve.worker"]
    order = [next(i for i, message in enumerate(told) if message.endswith(text))
             for text in ("forward sees n=1", "Fatal Python error: not really", "forward sees n=2")]
    assert order == sorted(order), told


def test_a_full_stderr_pipe_that_nobody_reads_never_stops_the_server(tmp_path):
    """Every failed batch prints a traceback and 100 kB of output; with stderr a pipe nobody reads, the
    server used to hang after about a hundred of them (its event loop blocked writing a log line), and
    then could not exit."""
    port = free_port()
    config = tmp_path / "noisy.yaml"
    config.write_text(f'GPUs: cpu\nHandle: "handles_ops:Noisy"\nPort: {port}\nProcessPerGPU: 2\n')
    env = {"PYTHONPATH": str(TESTS), "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "easyserve.cli", "run", str(config), "--log-level", "debug"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**_env(), **env})
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: _ok(url + "/health"), 60), "the server did not come up"
        assert wait_for(lambda: _ok(url + "/ready"), 60)
        bodies = [{"n": i, "fail": True, "lines": 100, "size": 1000} for i in range(400)]
        answers = post_many(url + "/predict", bodies, concurrency=8)
        assert [status for status, _ in answers] == [500] * 400  # every one answered, none hung
        started = time.monotonic()
        assert request(url + "/health", timeout=5)[0] == 200
        assert time.monotonic() - started < 2
        assert post_json(url + "/predict", {"n": 1}, timeout=10)[0] == 200
        # what could not be written is counted, not waited for: once the queue to the stuck writer is
        # full (10,000 records, at the 1,000 lines a second the workers may log)

        def dropped() -> bool:
            post_many(url + "/predict", bodies[:40], concurrency=8)
            return request(url + "/stats", timeout=5)[2]["log_records_dropped"] > 0

        assert wait_for(dropped, 60)
        # and it stops when told, though its log's writer is stuck: it waited for that in logging's shutdown
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def _logging_to_a_small_disk(tmp_path: Path, limit: int, hard: int) -> tuple[subprocess.Popen, str, Path]:
    """``easyserve run`` of a handle that logs, its log the file it returns on a disk of ``limit`` bytes:
    the file's limit (RLIMIT_FSIZE, soft; ``hard``, the most it may be raised to), past which a write
    fails as on a full disk; with its URL."""
    import resource

    port = free_port()
    config = tmp_path / "noisy.yaml"
    config.write_text(f'GPUs: cpu\nHandle: "handles_ops:Noisy"\nPort: {port}\nProcessPerGPU: 1\n')
    log = tmp_path / "server.log"

    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))

    cmd = [sys.executable, "-m", "easyserve.cli", "run", str(config)]
    with open(log, "ab") as out:  # appended to: once emptied, written from its start
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=out, preexec_fn=small_disk,
                                env={**_env(), "PYTHONPATH": str(TESTS)})
    return proc, f"http://127.0.0.1:{port}", log


def test_records_a_full_disk_would_not_take_are_counted_and_said_once_it_takes_them_again(tmp_path):
    """The log a file on a disk that filled up, then had room again: the records written meanwhile (the
    tracebacks of failed batches) were lost without a trace, /stats' count at 0. The disk's limit is
    the file's (RLIMIT_FSIZE: writes past it fail as on a full disk)."""
    limit = 4 << 20
    proc, url, log = _logging_to_a_small_disk(tmp_path, limit, limit)
    try:
        assert wait_for(lambda: _ok(url + "/ready"), 60), log.read_text()
        with open(log, "ab") as filler:  # the disk full
            filler.write(b"#" * (limit - log.stat().st_size))
        for n in range(5):
            assert post_json(url + "/predict", {"n": n, "fail": True}, timeout=10)[0] == 500
        wait_until(lambda: request(url + "/stats", timeout=5)[2]["log_records_dropped"] >= 5, 10, "the count")
        os.truncate(log, 0)  # room again
        assert post_json(url + "/predict", {"n": 9, "fail": True}, timeout=10)[0] == 500
        said = wait_until(lambda: re.search(r"(\d+) log record\(s\) dropped here: .*could not be written \(a full "
                                            r"disk\)", log.read_text()), 10, "the count said")
        assert int(said[1]) >= 5
        wait_until(lambda: "ValueError: bad n=9" in log.read_text(), 10, "the last traceback")
        with open(log, "ab") as filler:  # full again, and told to stop: it stops, the count unsaid
            filler.write(b"#" * (limit - log.stat().st_size))
        dropped = request(url + "/stats", timeout=5)[2]["log_records_dropped"]
        assert post_json(url + "/predict", {"n": 10, "fail": True}, timeout=10)[0] == 500
        wait_until(lambda: request(url + "/stats", timeout=5)[2]["log_records_dropped"] > dropped, 10, "a drop")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def _python(script: str, **pipes: Any) -> Iterator[subprocess.Popen]:
    """``python -c script`` in a process of its own, killed after whatever happened, its pipes closed."""
    proc = subprocess.Popen([sys.executable, "-c", script], env=_env(), **pipes)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def _logging_as_easyserve_run(stream: str) -> str:
    """The start of a script whose records go as ``easyserve run``'s do (every thread's through the log's
    writer thread), to ``stream`` (Python's text for it), one a line; its logger is ``log``."""
    return ("import logging, os, sys\n"
            "from easyserve import records\n"
            f"logging.basicConfig(level=logging.INFO, stream=records.counted({stream}), format='%(message)s')\n"
            "records.install(every_thread=True)\n"
            "log = logging.getLogger('easyserve.test')\n")


def test_a_signal_handler_that_logs_while_the_main_thread_logs_never_hangs_the_process():
    """``easyserve run`` and its guardian queue every thread's records for the log's writer thread, and
    their signal handlers log on the main thread, inside whatever it was doing: a signal that came while
    it queued a record of its own waited for the queue's lock, which that thread held, for ever."""
    script = _logging_as_easyserve_run("open(os.devnull, 'w')") + (
        "import signal\n"
        "seen = 0\n"
        "def on_signal(signum, frame):\n"
        "    global seen\n"
        "    seen += 1\n"
        "    log.info('signal %d', seen)\n"
        "signal.signal(signal.SIGUSR1, on_signal)\n"
        "print('ready', flush=True)\n"
        "while seen < 200:\n"
        "    log.info('working')\n"
        "signal.signal(signal.SIGUSR1, signal.SIG_IGN)\n"
    )
    with _python(script, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as proc:
        assert proc.stdout.readline() == b"ready\n"
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:  # signals until it has seen 200
            proc.send_signal(signal.SIGUSR1)
            time.sleep(0.005)
        assert proc.poll() == 0, "the process hung: a signal handler's record waited for its own thread"


def test_a_slow_reader_of_the_log_gets_every_line_before_the_process_exits():
    """A command whose log's writer could not write exited after 2 s, the records still queued lost: a
    stuck reader must not hold the exit for ever, but a slow one, still reading, lost the last lines
    ("easyserve stopped ..."). The exit waits for as long as the writer writes."""
    script = _logging_as_easyserve_run("sys.stderr") + (
        "for i in range(3000):\n"
        "    log.info('line %05d %s', i, 'x' * 90)\n"
        "log.info('the last line')\n"
        "records.written_or_exit(3, 0.5)\n"
    )
    said = b""
    with _python(script, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as proc:
        while chunk := proc.stderr.read1(16384):  # about 160 kB/s: the 300 kB take some 2 s, 0.5 s at a time
            said += chunk
            time.sleep(0.1)
        assert proc.wait(30) == 0, said[-300:]
    lines = said.decode().splitlines()
    assert len(lines) == 3001 and lines[-1] == "the last line", lines[-3:]


def test_a_slow_reader_of_one_long_record_gets_it_and_the_lines_after_it():
    """One record longer than a pipe holds (a traceback quoting a large input) took its reader seconds,
    in one write() that showed no progress: the exit took the reader for gone and lost the last line."""
    script = _logging_as_easyserve_run("sys.stderr") + (
        "log.error('batch failed on %s', 'x' * 150_000)\n"
        "log.info('the last line')\n"
        "records.written_or_exit(3, 1.5)\n"
    )
    said = b""
    with _python(script, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as proc:
        while chunk := proc.stderr.read1(8192):  # 32 kB/s: the record takes some 4.7 s, 0.25 s a read
            said += chunk
            time.sleep(0.25)
        assert proc.wait(30) == 0, said[-300:]
    assert said.decode().splitlines()[-1] == "the last line" and len(said) > 150_000


# 30,000 records, more than the writer's queue (10,000) and a pipe (some 900 of these) hold, then "logged"
# on stdout: a test that reads stderr only once it has that finds records dropped
_PAST_THE_QUEUE = ("for i in range(30000):\n"
                   "    log.info('line %05d %s', i, 'x' * 60)\n"
                   "print('logged', flush=True)\n")


# stderr's pipe filled to the brim by 64-character lines (F_GETPIPE_SZ: 1032), before any record: the
# writer cannot write one until the test reads
_FILLER = "f" * 63
_PIPE_FILLED = f"import fcntl\nos.write(2, b'{_FILLER}\\n' * (fcntl.fcntl(2, 1032) // 64))\n"


@pytest.mark.parametrize("more_after", [True, False])
def test_records_dropped_while_the_log_was_not_read_are_counted_where_they_are_missing(more_after):
    """A reader that paused (a terminal's Ctrl-S, a log shipper that stalled) and then read on lost the
    records that overflowed the writer's queue meanwhile, the last line among them, without a word.
    The pipe is filled first: a writer that still wrote now and then while the records came freed a place
    in its queue for the last of them at times, and the count was not the last line."""
    script = _logging_as_easyserve_run("sys.stderr") + _PIPE_FILLED + _PAST_THE_QUEUE + (
        ("records.flush(60)\nlog.info('the last line')\n" if more_after else "")
        + "records.written_or_exit(3, 30)\n"
    )
    with _python(script, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout.readline() == b"logged\n"  # while the process logged, nothing read
        lines = proc.stderr.read().decode().splitlines()
        assert proc.wait(30) == 0
    filler = next(i for i, line in enumerate(lines) if line != _FILLER)  # the pipe's size of them
    assert filler * 64 >= 4096
    lines = lines[filler:]
    expected = counted = 0  # every gap in the numbered lines is said, with its size, where it is
    for line in lines[:-1] if more_after else lines:
        said = re.fullmatch(r"(\d+) log record\(s\) dropped here: stderr was not read as fast as they came.*", line)
        if said:
            expected, counted = expected + int(said[1]), counted + 1
        else:
            assert line == f"line {expected:05d} {'x' * 60}", (line, expected)
            expected += 1
    assert expected == 30000 and counted == 1
    assert lines[-1] == "the last line" if more_after else lines[-1].endswith("counts them all)")


def test_a_signal_handler_logging_inside_a_record_that_carries_a_drop_count_does_not_carry_it_again():
    """The count of dropped records rides on the first record queued after them; a signal handler that
    logged while that record was being queued (the queue's lock is reentrant) carried it too: said twice,
    later as a negative count, and the exit, waiting for the counts to match, never came."""
    script = _logging_as_easyserve_run("sys.stderr") + _PIPE_FILLED + _PAST_THE_QUEUE + (
        "records.flush(60)\n"
        "signal_ = __import__('signal')\n"
        "signal_.signal(signal_.SIGUSR1, lambda *_: log.warning('from the signal handler'))\n"
        "class Record(logging.LogRecord):\n"
        "    def __setattr__(self, name, value):\n"
        "        super().__setattr__(name, value)\n"
        "        if name == 'dropped_before':  # inside put(), the count taken\n"
        "            logging.setLogRecordFactory(logging.LogRecord)\n"
        "            os.kill(os.getpid(), signal_.SIGUSR1)\n"
        "logging.setLogRecordFactory(Record)\n"
        "log.warning('the first record after the gap')\n"
        "log.warning('a later record')\n"
        "records.written_or_exit(3, 5)\n"
    )
    with _python(script, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout.readline() == b"logged\n"
        lines = proc.stderr.read().decode().splitlines()
        assert proc.wait(30) == 0
    # each gap said once, with its size (a slot freed as the writer takes a record lets one more in: a
    # loaded machine makes several gaps): counts carried twice added up to more than were dropped
    counts = [int(line.split()[0]) for line in lines if "dropped here" in line]
    numbered = sum(line.startswith("line ") for line in lines)
    assert counts and min(counts) > 0 and sum(counts) == 30000 - numbered, counts
    assert lines[-2:] == ["the first record after the gap", "a later record"], lines[-4:]
    assert "from the signal handler" in lines


@pytest.mark.parametrize("call, shown_most, kinds", [
    ("log.error('request %s failed: its worker died under it twice', ident)", records.SHOWN_REPEATS, 1),
    # a format that says nothing but its value: up to SHAPES_PER_LINE shapes of message, then one more kind
    ("log.error('%s', f'request {ident} failed: its worker died under it twice')",
     records.SHAPES_PER_LINE + records.SHOWN_REPEATS, records.SHAPES_PER_LINE + 1),
], ids=["format", "bare-format"])
def test_a_line_whose_message_quotes_a_clients_id_is_capped_as_one_kind(call, shown_most, kinds):
    """Where logging is not configured (a notebook), each kind of record is shown a few times in a
    window; the kind took in the message's shape, and a client's own X-Request-Id (letters, no digits)
    made every message a kind of its own: all shown, the cell flooded, and the kinds kept grew."""
    script = (
        "import logging, random, string, time\n"
        "from easyserve import records\n"
        "records.SHOWN_WINDOW_S = 4.0  # the 300 records in one window, however loaded the machine\n"
        "records.install()  # as a server's start does\n"
        "log = logging.getLogger('easyserve.test')\n"
        "for _ in range(300):\n"
        "    ident = ''.join(random.choices(string.ascii_letters, k=24))\n"
        f"    {call}\n"
        "print(len(records._last_resort.windows), flush=True)\n"
        "time.sleep(5)  # the window ends: how many were not shown is said\n"
    )
    with _python(script, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        kept = int(proc.stdout.readline())
        lines = proc.stderr.read().decode().splitlines()
        assert proc.wait(30) == 0
    shown = [line for line in lines if line.startswith("ERROR: request ")]
    hidden = [int(line.split()[1]) for line in lines if line.startswith("WARNING: ") and " more like " in line]
    assert (len(shown), kept) == (shown_most, kinds), lines[:3]
    assert len(shown) + sum(hidden) == 300, (len(shown), hidden)


def _stderr_lines(script: str, timeout: float = 30) -> list[str]:
    """What ``script`` writes to stderr, by lines, once it has exited 0."""
    with _python(script, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as proc:
        lines = proc.stderr.read().decode().splitlines()
        assert proc.wait(timeout) == 0
    return lines


def test_a_message_without_values_logged_by_one_line_for_every_cause_shows_each_cause():
    """asyncio logs every unhandled error of the event loop from one line, a message with no values
    ("Task exception was never retrieved", "Exception in callback ..."): taken as one kind with its
    line, a callback's error went unshown behind five tasks' that came before it."""
    script = (
        "import logging\n"
        "from easyserve import records\n"
        "records.install()  # as a server's start does\n"
        "log = logging.getLogger('asyncio')\n"
        "for text in ['Task exception was never retrieved'] * 7 + ['Exception in callback later()']:\n"
        "    log.error(text)\n"
    )
    lines = _stderr_lines(script)
    assert lines[:-1] == ["ERROR: Task exception was never retrieved"] * records.SHOWN_REPEATS + [
        "ERROR: Exception in callback later()"], lines
    # the two not shown are said as the process ends, within their window
    assert lines[-1].startswith('WARNING: 2 more like "ERROR: Task exception was never retrieved" in these'), lines


def test_what_was_not_shown_is_said_as_the_server_stops():
    """Records not shown in a window were counted, the count said by a timer as the window ended: a
    script that stopped its server and ended within 10 s never said that workers had died more times
    than it showed."""
    script = (
        "import logging, os, sys\n"
        "from easyserve import Server\n"
        "log = logging.getLogger('easyserve.test')\n"
        "server = Server(Handle='easyserve.builtin:Demo', GPUs='cpu', ProcessPerGPU=1,"
        f" Port={free_port()}).start()\n"
        "for _ in range(8):\n"
        "    log.error('worker cpu/0 exited with code 1; restarting it')\n"
        "server.stop()\n"
        "sys.stderr.write('stopped\\n')\n"
        "sys.stderr.flush()\n"
        "os._exit(0)  # no exit calls: the stop said it\n"
    )
    lines = _stderr_lines(script, 60)
    assert lines.count("ERROR: worker cpu/0 exited with code 1; restarting it") == records.SHOWN_REPEATS, lines
    said = [line for line in lines if line.startswith("WARNING: 3 more like ")]
    assert len(said) == 1 and "exited with code 1" in said[0], lines
    assert lines.index(said[0]) < lines.index("stopped"), lines


def test_long_records_for_a_stderr_nobody_reads_are_dropped_past_a_bound_on_their_size():
    """The queue for the log's writer was bounded by its count of records alone: with stderr a pipe
    nobody read, 10,000 records of a megabyte each could wait in it, the server's memory growing by
    every one. Past QUEUE_BYTES of their text, they are dropped and counted."""
    script = _logging_as_easyserve_run("sys.stderr") + (
        "for _ in range(100):\n"
        "    log.info('x' * 2**20)\n"
        "print(records.dropped(), flush=True)\n"
        "os._exit(0)\n"
    )
    read_end, write_end = os.pipe()  # a stderr nobody reads
    try:
        with _python(script, stdout=subprocess.PIPE, stderr=write_end) as proc:
            os.close(write_end)
            dropped = int(proc.stdout.readline())
            assert proc.wait(30) == 0
    finally:
        os.close(read_end)
    # of 100 megabytes, the queue held 32 and the pipe a little
    assert 100 - records.QUEUE_BYTES // 2**20 - 2 <= dropped < 100, dropped


def test_a_ctrl_c_while_the_exit_waits_for_a_full_stderr_ends_the_process():
    """SIGINT while the exit waited for the log's writer, stderr a pipe nobody read: the KeyboardInterrupt's
    traceback went to that stderr, and the process blocked there for good."""
    script = _logging_as_easyserve_run("sys.stderr") + (
        "log.info('x' * 200_000)\n"  # more than the pipe holds: the writer blocks
        "print('waiting', flush=True)\n"
        "records.written_or_exit(3, 60)\n"
    )
    read_end, write_end = os.pipe()
    try:
        with _python(script, stdout=subprocess.PIPE, stderr=write_end) as proc:
            os.close(write_end)
            assert proc.stdout.readline() == b"waiting\n"
            time.sleep(0.3)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(20) == 3
    finally:
        os.close(read_end)


def test_a_message_that_fails_to_be_written_does_not_end_the_log_writer():
    """A message written in its turn (``records.in_turn``) that raised (stderr's reader gone: a
    BrokenPipeError) ended the writer thread: every later record waited unwritten."""
    script = _logging_as_easyserve_run("sys.stderr") + (
        "records.in_turn(lambda: 1 / 0)\n"
        "log.info('written after it')\n"
        "records.written_or_exit(3, 5)\n"
    )
    with _python(script, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as proc:
        said = proc.stderr.read().decode()
        assert proc.wait(30) == 0
    assert "ZeroDivisionError" in said and said.splitlines()[-1] == "written after it", said


def test_a_process_forked_after_a_server_started_writes_its_own_event_loops_records():
    """A child forked (multiprocessing's default on Linux) from a process whose records go through the
    writer thread inherited the queue but not the thread: its event loop's records were never written."""
    script = (
        "import logging, os, sys, threading\n"
        "from easyserve import records\n"
        "records.install()  # as a Server's start does\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    loop = threading.Thread(target=lambda: logging.getLogger('easyserve').warning('from the child'),\n"
        "                            name=records.LOOP_THREAD + '-loop')\n"
        "    loop.start(); loop.join()\n"
        "    records.flush(10)\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
    )
    with _python(script, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as proc:
        said = proc.stderr.read().decode()
        assert proc.wait(30) == 0
    assert said == "WARNING: from the child\n"


def test_a_server_that_cannot_start_exits_though_its_stderr_is_a_full_pipe():
    """With stderr a pipe nobody reads (a guardian's, whose reader stalled), a server that could not start
    blocked for good writing "could not start: ..." straight to it, once its log's writer had given up:
    its guardian, waiting for it, neither restarted it nor gave up."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    with contextlib.suppress(BlockingIOError):  # full before it starts: its first write blocks
        while True:
            os.write(write_end, b"x" * 4096)
    os.set_blocking(write_end, True)
    cmd = [sys.executable, "-m", "easyserve.cli", "run", "--handle", "handles_for_tests:BrokenSetup", "--gpus", "cpu",
           "--port", str(free_port())]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=write_end, env={**_env(), "PYTHONPATH": str(TESTS)})
    os.close(write_end)
    try:
        assert proc.wait(60) == 1
    finally:
        proc.kill()
        proc.wait()
        os.close(read_end)


def test_warnings_a_client_can_trigger_never_reach_a_full_stderr(tmp_path):
    """aiohttp warns (warnings.warn, straight to stderr, once per distinct text) about a malformed
    Content-Disposition; with each request's a new 4 kB text and stderr a pipe nobody reads, a few
    dozen requests used to block the event loop in write()."""
    port = free_port()
    config = tmp_path / "echo.yaml"
    config.write_text(f'GPUs: cpu\nHandle: "easyserve.builtin:Echo"\nPort: {port}\n')
    cmd = [sys.executable, "-m", "easyserve.cli", "run", str(config), "--log-level", "error"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: _ok(url + "/ready"), 60), "the server did not come up"
        for i in range(60):
            disposition = f'bad{i} {"x" * 4000}'
            body = (f"--b\r\nContent-Disposition: {disposition}\r\n\r\nvalue\r\n--b--\r\n").encode()
            status, _, _ = request(url + "/predict", body, {"Content-Type": "multipart/form-data; boundary=b"},
                                   timeout=5)
            assert status == 400
        started = time.monotonic()
        assert request(url + "/health", timeout=5)[0] == 200
        assert time.monotonic() - started < 2
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_a_handle_printing_lines_as_fast_as_it_can_never_holds_the_event_loop(serve, caplog):
    """Each line went to the logger, at tens of microseconds a record: a handle printing short lines in a
    loop held the event loop for about a second per 64 kB read, and /health, every other request and
    the watchdog with it. Past LOG_LINES_PER_S a second lines are counted, not logged."""
    caplog.set_level(logging.INFO, logger="easyserve")  # as `easyserve run` logs: every line a record
    with serve("handles_robust:Chatty", ProcessPerGPU=2) as server:
        url = server.url
        assert post_json(url + "/predict", {"flood": True}) == (200, {"flood": True})
        assert wait_for(lambda: str(server.logs(tail=1)).endswith("tick"), 10), server.logs(tail=1)
        took = [0.0]
        while len(took) <= 20 and took[-1] < 0.5:
            started = time.monotonic()
            assert request(url + "/health", timeout=10)[0] == 200
            took.append(time.monotonic() - started)
        assert max(took) < 0.5, [round(t, 3) for t in took]
        assert post_json(url + "/predict", {"n": 1}, timeout=10) == (200, {"n": 1})
        assert str(server.logs(tail=1)).endswith("tick")  # the ring still has its latest lines
        assert wait_for(lambda: "lines not logged" in caplog.text, 5)
        assert server.stats()["worker_lines_not_logged"] > 0
    assert re.search(r"cpu/\d \[\d+\]: \d+ lines not logged, past the 1000 a second the workers may log together",
                     caplog.text)


def test_a_failed_batchs_traceback_reaches_the_log_and_the_ring_through_a_print_flood(serve, caplog):
    """Prints and records drew on one allowance of lines a second, and shared one ring: with a debug
    print left in a loop, a failed batch's traceback, which its 500 pointed to, was in neither the log
    nor ``Server.logs()``, only counted among the lines not logged."""
    caplog.set_level(logging.INFO, logger="easyserve")  # as `easyserve run` logs: every print a record
    with serve("handles_robust:Chatty") as server:
        assert post_json(server.url + "/predict", {"flood": True}) == (200, {"flood": True})
        assert wait_for(lambda: server.stats()["worker_lines_not_logged"] > 0, 10)  # the prints' allowance spent
        status, body = post_json(server.url + "/predict", {"fail": "drowned-out"}, timeout=30)
        assert status == 500 and "traceback in worker cpu/0's log" in body["error"], body
        assert wait_for(lambda: "RuntimeError: drowned-out" in caplog.text, 5), "the traceback was not logged"
        assert any("RuntimeError: drowned-out" in line.text for line in server.logs(tail=None))
        assert any(line.text == "tick" for line in server.logs(tail=None))  # the prints are kept too


def test_worker_output_read_back_writes_its_control_characters_out_and_a_long_record_is_cut(serve, caplog,
                                                                                            monkeypatch):
    """``Server.logs()`` printed a client's escape sequences to the terminal (retitling it, clearing
    it), where the log wrote them out; a worker's record was logged whatever its length (900 lines of 8 kB
    a request, queued whole while stderr stalled)."""
    from easyserve import logs

    monkeypatch.setattr(logs, "_allowance", logs._Allowance(logs.LOG_LINES_PER_S))  # a test before may have spent it
    caplog.set_level(logging.INFO, logger="easyserve")
    sent = "client says \x1b]0;PWNED\x07\x1b[2J\u2028FORGED"
    with serve("handles_robust:Chatty") as server:
        assert post_json(server.url + "/predict", {"say": sent})[0] == 200
        assert wait_for(lambda: any(line.text == sent for line in server.logs()), 10), server.logs()
        shown = str(server.logs())
        assert "\x1b" not in shown and "\u2028" not in shown and "client says \\x1b]0;PWNED\\x07" in shown, shown
        assert repr(server.logs()) == shown
        assert post_json(server.url + "/predict", {"long_warning": 40})[0] == 200
        assert wait_for(lambda: "more characters, in Server.logs()" in caplog.text, 10)
    longest = max(len(record.getMessage()) for record in caplog.records if record.name == logs.WORKER_LOGGER)
    assert logs.MAX_RECORD < longest < logs.MAX_RECORD + 200, longest


def test_a_dying_workers_last_line_without_its_end_is_logged_before_its_death(serve, caplog, monkeypatch):
    """A last line with no line's end (``print(..., end="")``, a C library's message before abort())
    waited for the pipe's end: it was logged after the server's record of the death, and after the
    replacement's start."""
    from easyserve import logs

    monkeypatch.setattr(logs, "_allowance", logs._Allowance(logs.LOG_LINES_PER_S))  # a test before may have spent it
    caplog.set_level(logging.INFO, logger="easyserve")
    with serve("handles_robust:Chatty") as server:
        status, _ = post_json(server.url + "/predict", {"last_words": "last words, no end"}, timeout=30)
        assert status == 500
        assert wait_for(lambda: "exited with code 3" in caplog.text, 10)
    messages = [record.getMessage() for record in caplog.records]
    said = next(i for i, m in enumerate(messages) if m.endswith("last words, no end"))
    died = next(i for i, m in enumerate(messages) if "exited with code 3" in m)
    assert said < died, messages


def test_lines_past_the_rate_are_counted_and_said_though_the_worker_then_falls_silent(serve, caplog):
    """The count of lines not logged was said only when the worker printed again: after a burst, a
    worker that went quiet never said it. And the rate was each worker's, so 16 workers running one
    chatty handle logged 16,000 lines a second."""
    from easyserve import logs

    caplog.set_level(logging.INFO, logger="easyserve")  # prints are logged (at INFO) and so rationed
    said: list[int] = []

    class Counts(logging.Handler):  # on the worker logger itself: each record once
        def emit(self, record: logging.LogRecord) -> None:
            found = re.search(r"cpu/\d \[\d+\]: (\d+) lines not logged", record.getMessage())
            if found:
                said.append(int(found.group(1)))

    counts = Counts(logging.WARNING)
    logs.worker_log.addHandler(counts)
    try:
        _burst_from_each_of_four_workers(serve, said)
    finally:
        logs.worker_log.removeHandler(counts)


def _burst_from_each_of_four_workers(serve, said: list[int]) -> None:
    with serve("handles_robust:Chatty", ProcessPerGPU=4, MaxBatchSize=1) as server:
        url = server.url
        before = server.stats()["worker_lines_not_logged"]
        # a burst from each worker at once: 4 x 3,000 lines, where the workers may log 1,000 in a second
        # together (each its own 1,000 would be 4,000)
        answers = post_many(url + "/predict", [{"burst": 3000}] * 4, concurrency=4)
        assert answers == [(200, {"burst": 3000})] * 4
        assert wait_for(lambda: [line.text for line in server.logs(tail=None)].count("quiet") == 4, 10)
        not_logged = server.stats()["worker_lines_not_logged"] - before
        # each worker says how many, unasked, a second on
        assert wait_for(lambda: sum(said) == not_logged, 5), (said, not_logged)
    printed = 4 * (3000 + 1)  # and a "quiet" each
    # a second's 1,000 logged, and the next second's if the burst crossed into it
    assert printed - 2 * 1000 <= not_logged <= printed


def _env() -> dict:
    import os

    env = dict(os.environ)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _ok(url: str) -> bool:
    try:
        return request(url, timeout=2)[0] == 200
    except OSError:
        return False


@contextlib.contextmanager
def worker_records(at: int = logging.INFO) -> Iterator[list[tuple[str, str]]]:
    """The records the worker logger makes meanwhile, at level ``at`` and above, each once: (level, the
    text after the worker's name and pid), with a second of lines to log of its own."""
    from easyserve import logs

    records: list[tuple[str, str]] = []

    class Records(logging.Handler):  # on the worker logger itself: each record once
        def emit(self, record: logging.LogRecord) -> None:
            records.append((record.levelname, record.getMessage().split(" ", 2)[2]))

    handler, level, allowances = Records(at), logs.worker_log.level, (logs._allowance, logs._records_allowance)
    # the tests before may have spent this second's
    logs._allowance, logs._records_allowance = (logs._Allowance(logs.LOG_LINES_PER_S) for _ in range(2))
    logs.worker_log.addHandler(handler)
    logs.worker_log.setLevel(at)
    try:
        yield records
    finally:
        logs.worker_log.removeHandler(handler)
        logs.worker_log.setLevel(level)
        logs._allowance, logs._records_allowance = allowances


def read_output_of(script: str) -> tuple[collections.deque, int]:
    """Run ``script`` in a process whose standard output a WorkerOutput reads until it ends: its ring
    and the process's pid."""
    import asyncio

    from easyserve import logs

    read, write = os.pipe()
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=write)
    os.close(write)
    ring = logs.new_ring()
    output = logs.WorkerOutput("cpu/0", proc.pid, ring)

    async def read_all() -> None:
        output.attach(asyncio.get_running_loop(), read)
        while output._fd >= 0:
            await asyncio.sleep(0.05)

    asyncio.run(asyncio.wait_for(read_all(), 20))
    assert proc.wait(5) == 0
    return ring, proc.pid


def test_the_ring_keeps_what_a_process_wrote_long_lines_cut_marks_and_carriage_returns_off():
    """A read is taken in with bytes methods (one decode for the ring when no line needs more): the
    lines of a read that does (a marked traceback, a line past MAX_LINE, one ending in \\r\\n) and
    those of one that does not must come out the same, in the ring and in the log."""
    from easyserve import logs

    script = (
        "import sys, time\n"
        "out = sys.stdout\n"
        "out.write('plain one\\nplain two\\n'); out.flush(); time.sleep(0.2)\n"
        "out.write('ERROR> Traceback (most recent call last):\\nERROR+   boom\\nERROR+ ValueError: bad\\n')\n"
        "out.write('dos line\\r\\n' + 'y' * 20000 + '\\n' + 'WARNING easyserve: careful\\n'); out.flush()\n"
        "time.sleep(0.2); out.write('tick\\n' * 3000 + 'no newline at the end')\n"
    )
    with worker_records() as records:
        # a traceback whose last line is too long to wait for its newline: still one record
        logs.WorkerOutput("cpu/0", 1, logs.new_ring()).data_received(
            b"ERROR> Traceback (most recent call last):\nERROR+ ValueError: " + b"z" * 9000)
        assert [(name, text.split("\n")[0]) for name, text in records] == [
            ("ERROR", "Traceback (most recent call last):")]
        records.clear()
        ring, pid = read_output_of(script)
    texts = [line.text for line in logs.ring_lines(ring)]
    cut = "y" * logs.MAX_LINE + f" ... [{20000 - logs.MAX_LINE} more bytes]"
    assert len(texts) == logs.RING_LINES and texts[-1] == "no newline at the end" and texts[-2] == "tick"
    assert texts.count("tick") == logs.RING_LINES - 1  # the last 1,000 lines
    assert records[:6] == [("INFO", "plain one"), ("INFO", "plain two"),
                           ("ERROR", "Traceback (most recent call last):\n  boom\nValueError: bad"),
                           ("INFO", "dos line"), ("INFO", cut), ("WARNING", "easyserve: careful")]
    # and the ring of those lines, read by themselves
    ring = logs.new_ring()
    output = logs.WorkerOutput("cpu/0", pid, ring)
    output.data_received(b"plain one\nERROR> Traceback (most recent call last):\nERROR+   boom\n"
                         b"dos line\r\n" + b"y" * 20000 + b"\nWARNING easyserve: careful\n")
    assert [line.text for line in logs.ring_lines(ring)] == [
        "plain one", "Traceback (most recent call last):", "  boom", "dos line", cut, "WARNING easyserve: careful"]
    assert all(line.worker == "cpu/0" and line.pid == pid for line in logs.ring_lines(ring))


def test_a_line_longer_than_a_read_is_its_head_once_at_its_level_and_its_rest_is_dropped():
    """The rest of a line past MAX_LINE, read after its head was taken, was lines of its own, unmarked:
    prints, logged at INFO. A preprocess traceback quoting a 16 MB body, DEBUG, put 8 MB in the log."""
    from easyserve import logs

    with worker_records(logging.DEBUG) as records:
        output = logs.WorkerOutput("cpu/0", 1, logs.new_ring())
        output.data_received(b"before\nDEBUG+ ValueError: " + b"\0" * 65000)
        for _ in range(5):
            output.data_received(b"\0" * 65536)
        output.data_received(b"\0" * 100 + b"\nafter\n" + b"q" * 100)
        output.data_received(b"q\n")
    cut = "ValueError: " + "\0" * (logs.MAX_LINE - len(logs._CUT) - len("DEBUG+ ValueError: ")) + logs._CUT.decode()
    cut = cut.replace("\0", "\\x00")  # as the log shows control characters: written out
    assert records == [("INFO", "before"), ("DEBUG", cut), ("INFO", "after"), ("INFO", "q" * 101)], [
        (name, len(text)) for name, text in records]
    with worker_records(logging.INFO) as records:  # the DEBUG line's rest no longer shows at INFO
        output = logs.WorkerOutput("cpu/0", 1, logs.new_ring())
        output.data_received(b"DEBUG+ " + b"\0" * 65000)
        output.data_received(b"\0" * 65536 + b"\r\0\0 carriage returns quoted in a record\n")
    assert records == []


def test_a_progress_bar_is_its_last_state_in_the_log_and_the_ring():
    """A bar drawn over after each \r was kept whole, each state in it: a notebook showed a download's
    bar as 21 lines of its own, without the worker's prefix."""
    from easyserve import logs

    ring = logs.new_ring()
    with worker_records() as records:
        output = logs.WorkerOutput("cpu/0", 1, ring)
        output.data_received(b"".join(b"\rdownloading weights %d%%" % i for i in range(0, 101, 5)) + b"\n")
        output.data_received(b"ready\r\n")
    assert records == [("INFO", "downloading weights 100%"), ("INFO", "ready")]
    assert [line.text for line in logs.ring_lines(ring)] == ["downloading weights 100%", "ready"]
    # a record quoting a \r is no bar: its level and its lines stay whole (the \r written out, as the log
    # shows control characters: in a terminal, "dog" was written over "cat")
    records.clear()
    with worker_records() as records:
        output.data_received(b"ERROR easyserve.handle: refused label 'cat\rdog'\n"
                             b"ERROR+ Traceback (most recent call last):\n"
                             b"ERROR+ ValueError: unknown label 'cat\rdog'\n")
    assert records == [("ERROR", "easyserve.handle: refused label 'cat\\x0ddog'\nTraceback (most recent call last):\n"
                                 "ValueError: unknown label 'cat\\x0ddog'")]
    assert "ValueError: unknown label 'cat\rdog'" in [line.text for line in logs.ring_lines(ring)]  # as it was


def test_a_progress_bar_longer_than_a_line_ends_in_its_last_state():
    """A download's bar in setup draws itself over again after each \\r, with no newline till the end:
    past MAX_LINE, the rest of it was dropped, its 100% with it."""
    from easyserve import logs

    def bar(i: int) -> bytes:
        return b"\rweights.onnx: %3d%%|%-20s| %d/1000" % (i // 10, b"#" * (i // 50), i)

    with worker_records() as records:
        output = logs.WorkerOutput("cpu/0", 1, logs.new_ring())
        drawn = b"".join(bar(i) for i in range(1001))
        for at in range(0, len(drawn), 4096):  # as the pipe's reads cut it
            output.data_received(drawn[at:at + 4096])
        output.data_received(b"\nready\n")
    assert [(level, text.endswith(logs._CUT.decode())) for level, text in records[:1]] == [("INFO", True)]
    assert records[1:] == [("INFO", "weights.onnx: 100%|####################| 1000/1000"), ("INFO", "ready")]


def test_a_dying_processs_dump_is_one_error_record_across_reads_and_cut_past_max_dump():
    """faulthandler's dump ("Fatal Python error: ..." and the stacks after it, unmarked) is one ERROR
    record, logged when the pipe ends, however many reads it came in; the lines before it are as usual."""
    from easyserve import logs

    script = (
        "import sys, time\n"
        "out = sys.stdout\n"
        "out.write('a print\\nFatal Python error: Segmentation fault\\n\\n')\n"
        "out.write('Current thread 0x1 (most recent call first):\\n')\n"
        "out.flush(); time.sleep(0.2)\n"
        "out.write('  File \"handle.py\", line 7 in forward\\n'); out.flush(); time.sleep(0.2)\n"
        "out.write('  File \"deep.py\", line 1 in recurse\\n' * 3000)\n"
    )
    with worker_records() as records:
        ring, _ = read_output_of(script)
    assert [name for name, _ in records] == ["INFO", "ERROR"], records
    assert records[0][1] == "a print"
    dump = records[1][1]
    assert dump.startswith("Fatal Python error: Segmentation fault\n\nCurrent thread 0x1 (most recent call first):\n"
                           '  File "handle.py", line 7 in forward\n  File "deep.py", line 1 in recurse\n')
    assert dump.endswith("[... cut: the rest is in Server.logs()]") and len(dump) < logs.MAX_DUMP + 100
    texts = [line.text for line in logs.ring_lines(ring)]
    assert texts[-1] == '  File "deep.py", line 1 in recurse' and len(texts) == logs.RING_LINES


def test_a_childs_dump_ends_at_its_last_line_or_in_a_while_and_the_workers_lines_after_are_its_own():
    """A child process that dies so (a data loader's, sharing the worker's pipe) leaves the worker
    running: its later lines were held as part of the dump until the worker ended, and a traceback
    among them logged inside the dump's record, markers and all."""
    from easyserve import logs

    script = (
        "import sys, time\n"
        "out = sys.stdout\n"
        "out.write('Fatal Python error: Segmentation fault\\n\\nCurrent thread 0x2 (most recent call first):\\n'\n"
        "          '  File \"loader.py\", line 3 in read\\n\\nExtension modules: numpy (total: 1)\\n'\n"
        "          'ERROR> Traceback (most recent call last):\\nERROR+ ValueError: later\\nstill serving\\n')\n"
        "out.flush(); time.sleep(0.3)\n"
        "out.write('Fatal Python error: Aborted\\n\\nStack (most recent call first):\\n'); out.flush()\n"
        f"time.sleep({logs.DUMP_WAIT_S + 1})\n"
        "out.write('served on\\n')\n"
    )
    with worker_records() as records:
        read_output_of(script)
    assert records == [
        ("ERROR", "Fatal Python error: Segmentation fault\n\nCurrent thread 0x2 (most recent call first):\n"
                  '  File "loader.py", line 3 in read\n\nExtension modules: numpy (total: 1)'),
        ("ERROR", "Traceback (most recent call last):\nValueError: later"),
        ("INFO", "still serving"),
        # no last line: the dump ends DUMP_WAIT_S after it began, before the line after it comes
        ("ERROR", "Fatal Python error: Aborted\n\nStack (most recent call first):"),
        ("INFO", "served on"),
    ], records


def test_a_traceback_that_comes_in_two_reads_is_one_record_and_a_record_waits_for_more_only_a_moment():
    """A worker writing faster than the server reads (a print flood) has its traceback split between
    two reads of the pipe: each read's lines were records of their own, and the traceback's last lines
    came out as a record that began mid-traceback."""
    import asyncio

    from easyserve import logs

    async def reads() -> None:
        read, write = os.pipe()
        output = logs.WorkerOutput("cpu/0", 1, logs.new_ring())
        output.attach(asyncio.get_running_loop(), read)  # the hold's timer runs on this loop
        output.data_received(b'ERROR> Traceback (most recent call last):\nERROR+   File "handle.py", line 9\n')
        output.data_received(b"ERROR+ ValueError: split\na print\nWARNING> careful\n")
        await asyncio.sleep(logs.HOLD_S * 3)
        output.data_received(b"WARNING+ much later\n")
        os.close(write)
        output.close()

    with worker_records() as records:
        asyncio.run(reads())
    assert records == [
        ("ERROR", 'Traceback (most recent call last):\n  File "handle.py", line 9\nValueError: split'),
        ("INFO", "a print"),
        # held for its next lines HOLD_S at most: what comes after that is not of it
        ("WARNING", "careful"),
        ("WARNING", "much later"),
    ], records


def test_a_line_a_client_wrote_into_a_record_cannot_pass_for_a_record_of_the_servers(tmp_path):
    """A handle's error quoting its input (or a handle logging a request's option) carried the client's
    line breaks into `easyserve run`'s log: a line of the client's making, a timestamp and a level at its
    start, read there as the server's own record, to a reader and to a shipper that starts a record at
    each timestamp. Each line of a record after its first is indented."""
    from test_http_workers import served_from_the_shell

    forged = "2026-12-05 16:59:14,000 CRITICAL easyserve: worker cpu/0 killed (signal 9)"
    log = tmp_path / "log"
    with served_from_the_shell(tmp_path, log, Handle="handles_ops:Noisy", ProcessPerGPU=1) as (proc, url):
        # and the breaks str.splitlines() makes where "\n" does not: Unicode's line separator passed as is
        for n, sep in enumerate(["\n", "\u2028", "\u2029", "\x0b"], 1):
            status, _ = post_json(url + "/predict", {"n": f"{n}{sep}{forged}", "fail": True})
            assert status == 500
            assert wait_until(lambda: f"ValueError: bad n={n}" in log.read_text(), 10)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 0
    lines = log.read_text().splitlines()
    assert f"    {forged}" in lines  # the traceback's last line went on with it (a printed line is a record)
    assert not [line for line in lines if line.startswith(forged)], lines
    assert "ValueError: bad n=2\\u2028" + forged in log.read_text()


def test_a_record_a_full_disk_cut_short_is_not_run_on_into_the_next(tmp_path):
    """The record being written as the disk filled was cut off without its line's end, and the next one
    written once there was room (the notice of those dropped) went on in the same line: a WARNING in the
    middle of an INFO line, which a reader of one record a line misses."""
    import resource

    limit = 4 << 20
    proc, url, log = _logging_to_a_small_disk(tmp_path, limit, resource.RLIM_INFINITY)  # a limit it may raise
    try:
        assert wait_for(lambda: _ok(url + "/ready"), 60), log.read_text()
        with open(log, "ab") as filler:  # room for a line's start, not its end
            filler.write(b"#" * (limit - log.stat().st_size - 40) + b"\n")
        assert post_json(url + "/predict", {"n": 1, "fail": True}, timeout=10)[0] == 500
        wait_until(lambda: request(url + "/stats", timeout=5)[2]["log_records_dropped"] >= 1, 10, "a drop")
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        assert post_json(url + "/predict", {"n": 2, "fail": True}, timeout=10)[0] == 500
        wait_until(lambda: "ValueError: bad n=2" in log.read_text(), 10, "the last traceback")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()
    tail = log.read_bytes()[limit - 40:].decode(errors="replace")
    assert re.search(r"^\S+ \S+ WARNING easyserve: \d+ log record\(s\) dropped here", tail, re.MULTILINE), tail


def test_onnx_runtimes_own_lines_are_logged_at_their_severity_without_their_colours():
    """ONNX Runtime writes its C++ log to stderr, in a terminal's colours: its error that the CUDA provider
    failed to load was a print at INFO, unseen at --log-level warning, with its escape codes written out,
    in the log and in the ring (Server.logs(), the dashboard)."""
    from easyserve import logs

    warning = b"\x1b[0;93m2026-12-06 11:24:05.58 [W:onnxruntime:Default, x.cc:856 operator()] careful\x1b[m\n"
    error = b"\x1b[1;31m2026-12-06 11:24:05.59 [E:onnxruntime:Default, p.cc:2458 operator()] Failed to load\n\x1b[m\n"
    with worker_records(logging.WARNING) as records:
        ring = logs.new_ring()
        output = logs.WorkerOutput("cpu/0", 1, ring, prints=True)
        output.data_received(b"a print\n" + warning + error + b"[I:onnxruntime:] info, not shown at WARNING\n")
        assert records == [("WARNING", "2026-12-06 11:24:05.58 [W:onnxruntime:Default, x.cc:856 operator()] careful"),
                           ("ERROR", "2026-12-06 11:24:05.59 [E:onnxruntime:Default, p.cc:2458 operator()] Failed "
                                     "to load")]
        assert [line.text for line in logs.ring_lines(ring)] == [
            "a print", "2026-12-06 11:24:05.58 [W:onnxruntime:Default, x.cc:856 operator()] careful",
            "2026-12-06 11:24:05.59 [E:onnxruntime:Default, p.cc:2458 operator()] Failed to load",
            "[I:onnxruntime:] info, not shown at WARNING"]
        # past the lines a second may log, the errors first, and the rest counted as not logged
        records.clear()
        output.data_received(warning * (logs.LOG_LINES_PER_S + 200) + error)
        assert len(records) == logs.LOG_LINES_PER_S - 2 and records[-1][0] == "ERROR", records[-1]  # 2 logged above
        assert output._unlogged == logs.LOG_LINES_PER_S + 201 - len(records)


@pytest.mark.parametrize("http_workers", [1, 2])
def test_access_log_says_each_request_answered_with_its_id_and_a_clients_control_characters_written_out(
        serve, caplog, http_workers):
    """A server run without nginx had no line per request at all: with AccessLog, one at INFO for each
    answer on ``easyserve.access``, whichever front answered it (HTTP fronts' came as worker records on
    ``easyserve.worker``, counted against the lines the workers may log); a client's User-Agent cannot
    send the terminal a control code, nor its quotes end a field early."""
    import socket

    caplog.set_level(logging.INFO, logger="easyserve")
    with serve(AccessLog=True, HttpWorkers=http_workers) as server:
        status, headers, _ = request(server.url + "/predict?top_k=1", b'{"value": 1}',
                                     {"Content-Type": "application/json", "User-Agent": 'probe/1.0 "x" \\x41'})
        forged = request(server.url + "/predict", b'{"value": 2}', {"Content-Type": "application/json",
                                                                    "X-Request-Id": 'own"x'})
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nUser-Agent: a\xc2\x9b31mred\r\n"
                         b"Connection: close\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 200")
        lines = lambda: [r.getMessage() for r in caught(caplog) if r.name == "easyserve.access"]  # noqa: E731
        assert wait_for(lambda: len(lines()) >= 3, 10), caplog.text
    assert status == 200 and forged[0] == 200
    predicted, probed = sorted((line for line in lines() if "own" not in line), key=lambda line: "GET" in line)
    assert re.search(r'127\.0\.0\.1 "POST /predict\?top_k=1 HTTP/1\.1" 200 \d+ B \d+\.\d ms id=' +
                     headers["X-Request-Id"] + r' "probe/1\.0 \\x22x\\x22 \\x5cx41"$', predicted), predicted
    assert [line for line in lines() if ' id=own\\x22x "' in line], lines()
    assert re.search(r'"GET /health HTTP/1\.1" 200 \d+ B \d+\.\d ms id=\S+ "a\\x9b31mred"$', probed), probed
    assert "\x9b" not in probed


@pytest.mark.parametrize("http_workers", [1, 2])
def test_access_lines_follow_their_own_loggers_level_not_the_servers(serve, caplog, http_workers):
    """A log of access lines without the server's INFO: with HTTP fronts, each front dropped its lines at
    the level of the server's "easyserve" logger, which it was started with."""
    caplog.set_level(logging.WARNING, logger="easyserve")
    caplog.set_level(logging.INFO, logger="easyserve.access")
    with serve(AccessLog=True, HttpWorkers=http_workers) as server:
        assert post_json(server.url + "/predict", {"value": 1})[0] == 200
        lines = lambda: [r for r in caught(caplog) if r.name == "easyserve.access"]  # noqa: E731
        assert wait_for(lambda: len(lines()) == 1, 10), caplog.text
    assert not [r for r in caught(caplog) if r.levelno == logging.INFO and r.name == "easyserve"]


def test_an_access_log_the_log_would_not_show_is_said_at_start(serve, caplog):
    """AccessLog: true with --log-level warning (or a notebook's log) wrote nothing and said nothing."""
    caplog.set_level(logging.WARNING, logger="easyserve")
    with serve(AccessLog=True):
        pass
    said = [r.getMessage() for r in caught(caplog) if "AccessLog" in r.getMessage()]
    assert said == ["AccessLog: true, but the log shows no INFO records, where its lines are: none will be seen "
                    "(easyserve run --log-level info shows them; in Python, give the logger easyserve.access level "
                    "INFO and a handler)"], said
    caplog.clear()
    logging.getLogger("easyserve.access").setLevel(logging.INFO)
    try:
        with serve(AccessLog=True):
            pass
    finally:
        logging.getLogger("easyserve.access").setLevel(logging.NOTSET)
    assert not [r for r in caught(caplog) if "AccessLog" in r.getMessage()]


def test_no_access_log_by_default(serve, caplog):
    caplog.set_level(logging.INFO, logger="easyserve")
    with serve() as server:
        assert post_json(server.url + "/predict", {"value": 1})[0] == 200
    assert not [r for r in caught(caplog) if "access" in r.name], caplog.text
