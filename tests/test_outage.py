"""A passing fault never becomes a permanent outage, and what clients see of it gives nothing away.

A worker that cannot start is retried with a capped backoff for as long as it takes: the two faults
below (a model store briefly unreachable, the open-file limit reached) used to leave the server up but
answering 503 for good, where no supervisor would restart it.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import threading
import time
from typing import Iterator

import pytest

from conftest import post_json, request
from test_cli import easyserve, wait_for_url
from test_robustness import wait_for

KEY = "outage-test-key"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


def predict(url: str, body: bytes) -> tuple[int, dict, dict]:
    return request(url + "/predict", body, AUTH)


def test_a_setup_that_fails_for_a_while_after_a_crash_comes_back_by_itself(serve, tmp_path):
    down = tmp_path / "db-down"
    with serve("handles_ops:NeedsDatabase", HandleArgs={"down": str(down)}, ApiKey=KEY) as server:
        assert predict(server.url, b'{"n": 1}')[0] == 200
        down.touch()  # the database goes away...
        os.kill(server.workers[0]["pid"], signal.SIGKILL)  # ...and the worker must reload
        outage = time.monotonic()
        assert wait_for(lambda: server.workers[0]["state"] == "failed", 15), server.workers

        status, _, ready = request(server.url + "/ready")
        assert status == 503 and ready["ready"] is False
        # to a reader without the key, its type; with the key, its line
        assert ready["error"] == "cpu/0 is failed: ConnectionError (its message: /stats, and the server's log)"
        assert "ConnectionError: database unreachable" in request(server.url + "/ready", headers=AUTH)[2]["error"]
        status, headers, body = predict(server.url, b'{"n": 2}')
        assert status == 503 and "no worker can run requests" in body["error"]
        assert 1 <= int(headers["Retry-After"]) <= 10  # when the next attempt is due, within the backoff cap

        # Clients get the exception's line at most; the traceback (whose source line holds a password)
        # goes to the log and to /stats, which needs the key.
        for text in (str(ready), str(body)):
            assert "hunter2" not in text and "Traceback" not in text
        assert request(server.url + "/stats")[0] == 401
        status, _, stats = request(server.url + "/stats", headers=AUTH)
        assert status == 200 and "hunter2" in stats["workers"][0]["trace"]

        time.sleep(max(0.0, 6.0 - (time.monotonic() - outage)))
        down.unlink()  # six seconds later it is back
        assert wait_for(lambda: server.workers[0]["state"] == "idle", 20), server.workers
        status, _, body = predict(server.url, b'{"n": 3}')
        assert status == 200 and body["n"] == 3


@contextlib.contextmanager
def served_with_64_files(tmp_path, fronts: int = 1) -> Iterator[tuple[str, int, list[str]]]:
    """``easyserve run`` of a quick handle under an open-file limit of 64, soft and hard (the server may
    raise its soft limit, not past this): its host, port, and the lines of its log so far. It must
    exit 0 on SIGTERM at the end."""
    config = tmp_path / "slow.yaml"
    config.write_text(f'GPUs: cpu\nHandle: "handles_ops:Slow"\nHandleArgs: {{s: 0}}\nPort: 0\nHttpWorkers: {fronts}\n')

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    lines: list[str] = []
    with easyserve("run", str(config), preexec_fn=low_limit) as proc:
        try:
            url = wait_for_url(proc, lines)
            threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
            host, port = url.removeprefix("http://").split(":")
            yield host, int(port), lines
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            proc.kill()


def test_running_out_of_file_descriptors_does_not_outlast_the_connections_that_caused_it(tmp_path):
    with served_with_64_files(tmp_path) as (host, port, lines):
        url = f"http://{host}:{port}"
        worker = request(url + "/ready")[2]["workers"][0]["pid"]
        held = [socket.create_connection((host, port), timeout=5) for _ in range(80)]  # every descriptor
        time.sleep(0.5)
        os.kill(worker, signal.SIGKILL)
        # three failed restarts in a row: where the server used to give the worker up for good
        assert wait_for(lambda: "".join(lines).count("Too many open files") >= 3, 15), "".join(lines[-20:])
        for sock in held:
            sock.close()

        # The connections are gone: within the backoff cap the worker is back and answering.
        def answers() -> bool:
            try:
                return post_json(url + "/predict", {"n": 1}, timeout=5)[0] == 200
            except OSError:
                return False

        assert wait_for(answers, 30, interval=0.5), "".join(lines[-30:])


@pytest.mark.parametrize("fronts", [1, 2])
def test_a_server_near_its_open_file_limit_says_so_and_says_when_it_is_back_under(tmp_path, fronts):
    # Past the limit uvloop closes each new connection unanswered and logs nothing: the warning is the
    # only sign in the log of why clients see resets. Each HTTP front process has a limit of its own.
    with served_with_64_files(tmp_path, fronts) as (host, port, lines):
        url = f"http://{host}:{port}"
        assert post_json(url + "/predict", {"n": 1})[0] == 200
        time.sleep(2.5)  # a check or more with the server well under its limit
        assert "files this process may open" not in "".join(lines)

        held = [socket.create_connection((host, port), timeout=5) for _ in range(80 * fronts)]
        assert wait_for(lambda: "files this process may open" in "".join(lines), 10), "".join(lines[-20:])
        warning = next(line for line in lines if "files this process may open" in line)
        assert "WARNING" in warning and "of the 64 files" in warning and "ulimit -n" in warning
        for sock in held:
            sock.close()

        def said(what: str) -> int:
            return "".join(lines).count(what)

        # each process that warned says it is back, and warned once, not at every check
        assert wait_for(lambda: said("open files back to") == said("files this process may open"), 10), \
            "".join(lines[-20:])
        assert said("files this process may open") <= fronts
        assert post_json(url + "/predict", {"n": 2})[0] == 200
