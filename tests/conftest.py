"""Fixtures: a real server on a free port, always stopped, and small HTTP helpers."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.client import HTTPConnection
from pathlib import Path
from typing import Any, Callable, Iterator

import aiohttp
import pytest

from easyserve import Server


def _escaped(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A report's text with lone surrogates in it (a file name that is not UTF-8, in a log line a test
    captured or in a failure's message) is escaped: pytest-xdist sends reports to the main process as
    UTF-8, and one it cannot encode ended the whole run with an INTERNALERROR."""
    outcome = yield
    report = outcome.get_result()
    report.sections = [(title, _escaped(text)) for title, text in report.sections]
    if report.longrepr is not None and _escaped(str(report.longrepr)) != str(report.longrepr):
        report.longrepr = _escaped(str(report.longrepr))


@pytest.fixture
def serve():
    """``with serve(handle, **config) as server:`` starts a server on a free port and stops it after."""

    @contextlib.contextmanager
    def start(handle: Any = "handles_for_tests:Recorder", **config: Any) -> Iterator[Server]:
        config.setdefault("GPUs", "cpu")
        server = Server(handle=handle, Port=0, **config).start(timeout=60)
        try:
            yield server
        finally:
            pids = [w["pid"] for w in server.workers if "pid" in w]  # not a slot waiting to start again
            server.stop(drain_timeout=5)
            for pid in pids:
                assert not _alive(pid), f"worker {pid} outlived stop()"

    return start


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie counts as gone: it has exited and only waits to be reaped
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # reaped between the two looks
        return False


def request(url: str, data: bytes | None = None, headers: dict | None = None, method: str | None = None,
            timeout: float = 30) -> tuple[int, dict, Any]:
    """Send one HTTP request; returns (status, headers, JSON body)."""
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), json.loads(err.read())


def post_json(url: str, obj: Any, **kw: Any) -> tuple[int, Any]:
    status, _, body = request(url, json.dumps(obj).encode(), {"Content-Type": "application/json"}, **kw)
    return status, body


def post_many(url: str, bodies: list[Any], concurrency: int = 32) -> list[tuple[int, Any]]:
    """POST each JSON body, ``concurrency`` at a time, over real connections; (status, body) in order."""
    return [(status, body) for status, _, body in send_many(url, bodies, concurrency)]


def send_many(url: str, bodies: list[Any], concurrency: int = 32,
              headers: dict | None = None) -> list[tuple[int, dict, Any]]:
    """:func:`post_many` with request ``headers``, answering (status, response headers, body) in order."""

    async def run() -> list[tuple[int, dict, Any]]:
        limit = asyncio.Semaphore(concurrency)
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            async def one(body: Any) -> tuple[int, dict, Any]:
                async with limit, session.post(url, json=body, headers=headers) as resp:
                    return resp.status, dict(resp.headers), await resp.json()

            return await asyncio.gather(*(one(b) for b in bodies))

    return asyncio.run(run())


@pytest.fixture
def fake_gpus(tmp_path, monkeypatch):
    """``fake_gpus(n)`` puts an ``nvidia-smi`` on PATH that lists ``n`` GPUs, so the GPU mapping runs
    on a machine without one (the workers' engines then find no CUDA device, which tests don't need).

    Asked for readings (the server's GPU monitoring, in loop mode: ``--loop-ms=``), it prints one
    line per GPU every 0.1 s until its output is closed: GPU ``i`` has index ``i``, UUID
    ``GPU-0000000i-fake``, utilisation ``30 + 5 i`` % (or what ``fake_gpus.level(i, percent)`` set
    last), ``1000 + i`` MiB of 81559 MiB used, and name "Fake GPU, 80GB". Each such run appends its
    pid to ``fake_gpus.monitors()``. ``fake_gpus.install(script)`` puts another script there.
    """
    folder = tmp_path / "fake-bin"
    monitors = tmp_path / "nvidia-smi-monitors"
    levels = tmp_path / "nvidia-smi-levels"
    levels.mkdir()

    def install_script(script: str) -> None:
        folder.mkdir(exist_ok=True)
        path = folder / "nvidia-smi"
        path.write_text(script)
        path.chmod(0o755)
        monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def install(count: int) -> None:
        readings = "".join(f'    echo "{i}, GPU-0000000{i}-fake, $(cat {levels}/{i} 2>/dev/null || echo {30 + 5 * i}), '
                           f'{1000 + i}, 81559, Fake GPU, 80GB"\n' for i in range(count))
        install_script(
            "#!/bin/sh\n"
            'case "$*" in\n'
            "  *--loop-ms=*utilization.gpu*|*utilization.gpu*--loop-ms=*)\n"
            f"    echo $$ >> {monitors}\n"
            f"    while :; do\n{readings}    sleep 0.1\n    done ;;\n"
            '  *utilization.gpu*) echo "Invalid combination of input arguments."; exit 2 ;;\n'
            "  *)\n" + "".join(f"    echo {i}\n" for i in range(count)) + "    ;;\n"
            "esac\n")

    def level(index: int, percent: int) -> None:
        (levels / f"{index}.tmp").write_text(f"{percent}\n")
        (levels / f"{index}.tmp").rename(levels / str(index))  # whole, never half written

    def pids() -> list[int]:
        return [int(line) for line in monitors.read_text().split()] if monitors.exists() else []

    install.install = install_script
    install.monitors = pids
    install.level = level
    return install


def raw_listener(each: Callable[[socket.socket], None]) -> socket.socket:
    """A listening socket on 127.0.0.1 whose every connection is given to ``each`` (which closes it), on
    a thread, until the socket is closed: a server that misbehaves below HTTP."""
    listener = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            each(connection)

    threading.Thread(target=accept, daemon=True).start()
    return listener


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on now, for a process the test starts itself."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def held_by_debugger(pid: int) -> Iterator[None]:
    """A debugger's hold (ptrace) on process ``pid`` while in the block: killed meanwhile, it stays a
    zombie that its parent cannot reap. Skips the test where the system lets no process trace another."""
    debugger = subprocess.Popen([sys.executable, "-c", (
        "import ctypes, sys\n"
        f"assert ctypes.CDLL(None, use_errno=True).ptrace(0x4206, {pid}, None, None) == 0, 'PTRACE_SEIZE'\n"
        "print('attached', flush=True)\n"
        "sys.stdin.read()\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        if debugger.stdout.readline().strip() != "attached":
            pytest.skip("this system does not let a process trace another (ptrace)")
        yield
    finally:
        debugger.stdin.close()
        debugger.wait(10)
        debugger.stdout.close()


def http(method: str, url: str, **kwargs: Any) -> tuple[int, dict, Any]:
    """One request through aiohttp (forms, chunked bodies, raw headers); returns (status, headers, JSON),
    or the body as text when it is not JSON (``/metrics``)."""

    async def run() -> tuple[int, dict, Any]:
        async with aiohttp.ClientSession() as session:
            async with session.request(method, url, **kwargs) as resp:
                text = await resp.text()
                try:
                    body = json.loads(text) if text.strip() else None
                except ValueError:
                    body = text
                return resp.status, dict(resp.headers), body

    return asyncio.run(run())


def worker_children(parent: int | None = None, module: bytes = b"easyserve.worker") -> list[int]:
    """Live ``easyserve.worker`` processes (or of another ``module``) whose parent is ``parent`` (default:
    this process)."""
    parent = os.getpid() if parent is None else parent
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == parent and fields[0] != "Z" and module in cmdline:
            found.append(int(entry.name))
    return found


# -- waiting on state, never on a guessed sleep ----------------------------------------------------------


def wait_until(condition: Callable[[], Any], timeout: float = 20.0, what: str = "the condition",
               interval: float = 0.02) -> Any:
    """Poll ``condition`` until it returns something true, and return that; fail the test after ``timeout`` s."""
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < end, f"timed out after {timeout:g}s waiting for {what}"
        time.sleep(interval)


def reset_peak_rss() -> int:
    """This process's resident bytes now, its peak (``VmHWM``) reset to them: what a server running in
    it (as ``serve`` starts one) takes at most afterwards is ``peak_rss() - reset_peak_rss()``. Skips
    the test where the kernel does not let a process reset its peak."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as exc:
        pytest.skip(f"this process's peak RSS cannot be reset: {exc}")
    return _memory_status("VmRSS")


def peak_rss() -> int:
    """This process's peak resident bytes since :func:`reset_peak_rss`."""
    return _memory_status("VmHWM")


def _memory_status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def workers_of(server: Server | str) -> list[dict]:
    """A server's workers (name, state, pid...): ``server`` is a :class:`Server`, or the base URL of one
    running in another process (read from its /ready, which lists them to a client on this machine with
    no key: its server must have none)."""
    if isinstance(server, str):
        return request(server + "/ready", timeout=5)[2]["workers"]
    return server.workers


def wait_busy(server: Server | str, count: int = 1, timeout: float = 10.0) -> list[dict]:
    """Wait until ``count`` workers are busy, i.e. requests have reached them; returns the busy workers."""

    def busy() -> list[dict] | None:
        found = [w for w in workers_of(server) if w["state"] == "busy"]
        return found if len(found) >= count else None

    return wait_until(busy, timeout, f"{count} busy worker(s)")


def wait_queued(url: str, depth: int, timeout: float = 10.0, headers: dict | None = None) -> dict:
    """Wait until ``depth`` requests wait in the queue of the server at ``url``; returns its /stats."""

    def queued() -> dict | None:
        stats = request(url + "/stats", headers=headers, timeout=5)[2]
        return stats if stats["queue_depth"] == depth else None

    return wait_until(queued, timeout, f"{depth} queued request(s)")


def wait_draining(url: str, timeout: float = 10.0) -> None:
    """Wait until the server at ``url`` has begun to stop. It stops listening first, so new connections
    are refused; requests on connections already open (see :class:`KeptAlive`) get 503 while it drains."""
    address = (urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port)

    def refused() -> bool:
        try:
            socket.create_connection(address, timeout=0.2).close()
        except ConnectionRefusedError:
            return True
        except (ConnectionResetError, socket.timeout):
            # reset: caught in the backlog of a listening socket closing; a timeout: its SYN dropped in
            # the moment the server accepts what is queued before it closes (a second until it is
            # sent again). Ask again either way.
            pass
        return False

    wait_until(refused, timeout, "the server to stop listening as its drain begins")


class KeptAlive:
    """One HTTP connection to the server at ``url``, opened (and used once) now, so that a request sent
    on it later still reaches a server that has stopped listening, as a draining server has."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self.connection = HTTPConnection(parts.hostname, parts.port, timeout=30)
        assert self.send("GET", "/health")[0] == 200

    def send(self, method: str, path: str, body: Any = None) -> tuple[int, dict, Any]:
        """One request on this connection; returns (status, headers, JSON body)."""
        data = None if body is None else json.dumps(body).encode()
        headers = {} if body is None else {"Content-Type": "application/json"}
        self.connection.request(method, path, body=data, headers=headers)
        response = self.connection.getresponse()
        return response.status, dict(response.headers), json.loads(response.read())

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> KeptAlive:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class Background:
    """Runs ``fn`` (a request, a stop) in a thread; ``result(timeout)`` returns its value or raises what it
    raised. ``started``, ``finished_at`` and ``took`` are what the caller's clock saw."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.finished_at: float | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.value = fn()
        except BaseException as exc:  # handed to result()
            self.error = exc
        self.finished_at = time.monotonic()

    def result(self, timeout: float = 30) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"still running after {timeout}s"
        if self.error is not None:
            raise self.error
        return self.value

    @property
    def took(self) -> float:
        assert self.finished_at is not None, "not finished"
        return self.finished_at - self.started


def clients_until_refused(url: str, act: Callable[[], Any], clients: int = 8) -> collections.Counter:
    """``clients`` keep-alive clients POST ``{"value": n}`` as fast as they are answered; after 1 s, and
    once they have had ``2 * clients`` answers between them (a loaded machine may take longer), ``act()``
    runs (in a thread: it may block, as ``Server.stop`` does); each client goes on until a
    connection is refused. Returns the outcomes: statuses, ``"refused"``, and ``"lost: <error>"`` for
    a request sent and never answered."""
    outcomes: collections.Counter = collections.Counter()

    async def client(n: int) -> None:
        async with aiohttp.ClientSession() as session:
            i = 0
            while True:
                i += 1
                try:
                    async with session.post(url, json={"value": n * 1000 + i}) as resp:
                        await resp.read()
                        outcomes[resp.status] += 1
                except aiohttp.ClientConnectorError:
                    outcomes["refused"] += 1
                    return
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    outcomes[f"lost: {type(exc).__name__}"] += 1

    async def run() -> None:
        running = [asyncio.ensure_future(client(n)) for n in range(clients)]
        await asyncio.sleep(1.0)
        end = time.monotonic() + 30
        while outcomes[200] <= 2 * clients and time.monotonic() < end:
            await asyncio.sleep(0.05)
        await asyncio.get_running_loop().run_in_executor(None, act)
        await asyncio.wait_for(asyncio.gather(*running), 30)

    asyncio.run(run())
    return outcomes


def caught(caplog) -> list:
    """caplog's records, each once: pytest attaches its handler to the non-propagating ``easyserve``
    logger as well as to the root, to which easyserve hands its records on, so it may hold one twice (the
    second a copy, made for the log's writer thread)."""
    return list({(r.created, r.levelno, r.getMessage()): r for r in caplog.records}.values())
