"""The hostile soak (``python benchmarks/soak.py --hostile``): load, drains and restarts, worker kills,
slow clients and malformed requests, all at once against one port. Nothing may be lost.

- **Load:** ``--concurrency`` keep-alive clients (aiohttp, one shared connector) send ``--requests``
  requests. One in ``--malformed-every`` is malformed (round-robin over ``MALFORMED``, each with the
  status it must get); the rest are JSON objects that the Echo handle answers back, checked against
  the request. A request answered 429 or 503 or refused (no connection could be opened) is sent again after
  a short pause, as a client behind a retry policy would; every attempt is counted.
- **Drains and restarts:** every ``--restart-every`` seconds of serving, SIGTERM the server, wait for
  it to exit (its exit code must be 0), start it again on the same port and wait for ``/ready``.
- **Worker kills:** a random worker is SIGKILLed every ``--kill-every`` seconds, as in the plain soak.
- **Slow clients:** ``--slow-clients`` raw connections, half sending their headers one byte a second,
  half stalling in a 1 MB body; each one the server cuts is reconnected.
- **/health:** a separate process asks for it every 0.5 s, to show the event loop never stalls.

Each attempt ends in exactly one outcome: ``correct`` (200, the echo matches), ``4xx as expected``
(a malformed request got its status), ``503``, ``refused`` (the connection could not be opened: the
server was down between a drain and its restart), ``wrong`` (a 200 with another body, or any other
status), ``lost`` (the connection broke after the request may have been sent, with no answer) or
``hung`` (no answer within ``--client-timeout``). Exits 1 if any is lost, wrong or hung, if a request
was given up, or if a drain exited non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gzip
import json
import os
import random
import re
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

HOST = "127.0.0.1"
MB = 2**20

# The server's settings for this soak: small limits, so that the guards act during a short run.
MAX_BODY_MB = 1
HEADER_TIMEOUT_S = 3
BODY_TIMEOUT_S = 3
KEEP_ALIVE_TIMEOUT_S = 5

OUTCOMES = ("correct", "4xx as expected", "503", "refused", "wrong", "lost", "hung")
RETRIED = ("503", "refused")
FAILURES = ("wrong", "lost", "hung")
SLOW_UPLOAD = "good, slow upload"


def _malformed() -> list[tuple[str, bytes, dict[str, str], int]]:
    """(name, body, headers, expected status) of each malformed request."""
    json_type = {"Content-Type": "application/json"}
    boundary = "soakBoundary"
    return [
        ("invalid JSON", b'{"id": 1, "x": ', json_type, 400),
        ("NaN in JSON", b'{"id": 1, "x": NaN}', json_type, 400),
        ("JSON array", b"[1, 2, 3]", json_type, 400),
        ("unsupported Content-Type", b"<id>1</id>", {"Content-Type": "application/xml"}, 415),
        ("body over MaxBodyMB", b"x" * (MAX_BODY_MB * MB + 4096), {"Content-Type": "application/octet-stream"}, 413),
        ("gzip inflating past MaxBodyMB", gzip.compress(b'{"x": "' + b"0" * (2 * MAX_BODY_MB * MB) + b'"}'),
         {**json_type, "Content-Encoding": "gzip"}, 413),
        ("malformed multipart",
         f"--{boundary}\r\nthis header line has no colon\r\n\r\nvalue\r\n--{boundary}--\r\n".encode(),
         {"Content-Type": f"multipart/form-data; boundary={boundary}"}, 400),
        ("unknown Content-Encoding", b'{"id": 1}', {**json_type, "Content-Encoding": "br"}, 415),
    ]


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- the server, drained and restarted ---------------------------------------------------------------


@dataclass
class Incarnation:
    number: int
    pid: int = 0
    start_attempts: int = 0  # starts refused because the port was still busy count here too
    start_s: float = 0.0  # from the first start attempt to /ready
    ready_at: float = 0.0
    rss_ready: float = float("nan")
    rss_end: float = float("nan")
    restarts: int | None = None  # worker restarts, from /stats just before the drain
    requests: int | None = None
    sigterm_at: float | None = None
    drain_s: float | None = None  # SIGTERM to exit
    exited_at: float | None = None
    exit_code: int | str | None = None
    log_path: str = ""
    final: bool = False  # the last drain, after the load


class Server:
    """One ``easyserve run`` process at a time on one port; ``phase`` is what clients face now."""

    def __init__(self, config_path: str, base: str, logdir: str) -> None:
        self.config_path = config_path
        self.base = base
        self.logdir = logdir
        self.proc: asyncio.subprocess.Process | None = None
        self.incarnations: list[Incarnation] = []
        self.phase = "down"  # starting, up, draining, down
        self.windows: list[list[float]] = []  # [SIGTERM time, ready-again time] of each drain
        self.ctl: aiohttp.ClientSession | None = None  # control requests: a new connection each

    async def get(self, path: str, timeout: float = 5.0) -> tuple[int, Any]:
        async with self.ctl.get(self.base + path, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            return resp.status, await resp.json()

    async def start(self, deadline_s: float = 120.0) -> None:
        inc = Incarnation(len(self.incarnations) + 1)
        self.incarnations.append(inc)
        self.phase = "starting"
        began = time.monotonic()
        while True:
            if time.monotonic() - began > deadline_s:
                raise RuntimeError(f"server did not come up within {deadline_s:g}s")
            inc.start_attempts += 1
            inc.log_path = os.path.join(self.logdir, f"server-{inc.number}-{inc.start_attempts}.log")
            with open(inc.log_path, "wb") as log:
                self.proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "easyserve.cli", "run", self.config_path, "--log-level", "warning",
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            inc.pid = self.proc.pid
            while self.proc.returncode is None and time.monotonic() - began < deadline_s:
                try:
                    status, body = await self.get("/ready", timeout=2.0)
                    if status == 200 and body.get("ready"):
                        break
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                    pass
                await asyncio.sleep(0.05)
            if self.proc.returncode is None:
                break
            with open(inc.log_path, errors="replace") as f:
                text = f.read()
            if "cannot listen" not in text:  # failed for another reason than a port still busy
                raise RuntimeError(f"server exited {self.proc.returncode} at start:\n{text[-3000:]}")
            await asyncio.sleep(0.2)
        inc.ready_at = time.monotonic()
        inc.start_s = inc.ready_at - began
        inc.rss_ready = rss_mb(inc.pid)
        if self.windows and len(self.windows[-1]) == 1:
            self.windows[-1].append(inc.ready_at)
        self.phase = "up"

    async def drain(self) -> None:
        inc = self.incarnations[-1]
        inc.rss_end = rss_mb(inc.pid)
        try:
            status, stats = await self.get("/stats")
            inc.restarts, inc.requests = stats["restarts"], stats["requests"]
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError):
            pass
        inc.sigterm_at = time.monotonic()
        self.windows.append([inc.sigterm_at])
        self.phase = "draining"
        self.proc.send_signal(signal.SIGTERM)
        try:
            inc.exit_code = await asyncio.wait_for(self.proc.wait(), 60)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            inc.exit_code = "did not exit within 60 s (SIGKILLed)"
        inc.exited_at = time.monotonic()
        inc.drain_s = inc.exited_at - inc.sigterm_at
        self.phase = "down"

    def kill_now(self) -> None:
        """Last resort on the way out (an exception): leave no process behind."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()


async def restarter(server: Server, every: float, stop: asyncio.Event, broken: list) -> None:
    try:
        while not stop.is_set():
            wait = server.incarnations[-1].ready_at + every - time.monotonic()
            try:
                await asyncio.wait_for(stop.wait(), max(wait, 0.0))
                return
            except asyncio.TimeoutError:
                pass
            await server.drain()
            await server.start()
    except Exception as exc:  # the server could not be restarted: end the run, report it
        broken.append(f"{type(exc).__name__}: {exc}")
        stop.set()


async def killer(server: Server, every: float, stop: asyncio.Event, kills: list) -> None:
    rng = random.Random(0)
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), every)
            return
        except asyncio.TimeoutError:
            pass
        if server.phase != "up":
            continue
        try:
            _, body = await server.get("/ready")
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            continue
        if server.phase != "up":  # a drain began meanwhile
            continue
        server_pid = server.incarnations[-1].pid
        alive = [w["pid"] for w in body.get("workers", []) if w["state"] in ("idle", "busy")]
        alive = [pid for pid in alive if parent_pid(pid) == server_pid]  # only the server's own workers
        if alive:
            pid = rng.choice(alive)
            try:
                os.kill(pid, signal.SIGKILL)
                kills.append((time.monotonic(), pid))
            except ProcessLookupError:
                pass


# -- the load --------------------------------------------------------------------------------------


@dataclass
class Load:
    attempts: collections.Counter = field(default_factory=collections.Counter)  # (kind, outcome)
    by_phase: collections.Counter = field(default_factory=collections.Counter)  # (outcome, phase)
    final: collections.Counter = field(default_factory=collections.Counter)  # ("good"|"malformed", outcome)
    retry_after: collections.Counter = field(default_factory=collections.Counter)  # 503s: with / without
    examples: dict = field(default_factory=lambda: collections.defaultdict(list))  # outcome -> details
    failures: list = field(default_factory=list)  # (time, kind, outcome, detail, phase)
    sent: int = 0
    unsent: int = 0  # not begun before --max-seconds
    gave_up: int = 0  # still 503 / refused after --retry-for seconds
    elapsed: float = 0.0


async def load(server: Server, args: argparse.Namespace, result: Load, deadline: float, stop: asyncio.Event) -> None:
    url = server.base + "/predict"
    malformed = _malformed()
    ids = iter(range(args.requests))
    timeout = aiohttp.ClientTimeout(total=args.client_timeout)
    rng = random.Random(1)

    def note(outcome: str, kind: str, detail: str) -> None:
        if len(result.examples[outcome]) < 5:
            result.examples[outcome].append(f"{kind}: {detail}")

    async def attempt(session: aiohttp.ClientSession, kind: str, data: bytes, headers: dict,
                      expected: int | None, good: dict | None) -> str:
        phase = server.phase
        try:
            async with session.post(url, data=data, headers=headers) as resp:
                raw = await resp.read()
                status = resp.status
                has_retry_after = "Retry-After" in resp.headers
        except aiohttp.ClientConnectorError:  # before sending: the connection could not be opened
            return "refused"
        except asyncio.TimeoutError as exc:  # aiohttp's timeouts are asyncio.TimeoutError too
            result.failures.append((time.monotonic(), kind, "hung", repr(exc), phase))
            note("hung", kind, f"{exc!r} (server {phase})")
            return "hung"
        except (aiohttp.ClientError, OSError) as exc:
            result.failures.append((time.monotonic(), kind, "lost", f"{type(exc).__name__}: {exc}", phase))
            note("lost", kind, f"{type(exc).__name__}: {exc} (server {phase})")
            return "lost"
        if status in (429, 503):  # busy or draining: a client with a retry policy sends it again
            result.retry_after["with Retry-After" if has_retry_after else "without Retry-After"] += 1
            note("503", kind, f"{raw[:160].decode(errors='replace')} (server {phase})")
            return "503"
        if good is not None and status == 200:
            try:
                if json.loads(raw) == good:
                    return "correct"
            except ValueError:
                pass
        elif expected is not None and status == expected:
            return "4xx as expected"
        detail = f"{status} {raw[:200].decode(errors='replace')}"
        result.failures.append((time.monotonic(), kind, "wrong", detail, phase))
        note("wrong", kind, detail)
        return "wrong"

    async def client(session: aiohttp.ClientSession) -> None:
        for i in ids:
            if time.monotonic() > deadline or stop.is_set():
                result.unsent += 1
                continue
            result.sent += 1
            if i % args.malformed_every == args.malformed_every - 1:
                kind, data, headers, expected = malformed[(i // args.malformed_every) % len(malformed)]
                good = None
            else:
                good = {"id": i, "pad": "x" * (i % 64)}
                kind, expected = "good", None
                data, headers = json.dumps(good).encode(), {"Content-Type": "application/json"}

            async def send(phase: str) -> str:
                return await attempt(session, kind, data, headers, expected, good)

            outcome = await until_answered(send, kind, server, result, args, stop, rng)
            result.final["good" if good is not None else "malformed", outcome] += 1

    connector = aiohttp.TCPConnector(limit=args.concurrency)
    started = time.monotonic()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(args.concurrency)))
    result.elapsed = time.monotonic() - started


async def slow_uploader(number: int, server: Server, port: int, args: argparse.Namespace, result: Load,
                        no_new: asyncio.Event, stop: asyncio.Event) -> None:
    """Good requests whose ~16 kB body is sent 1 kB every 0.1 s: a slow link, far within BodyTimeoutS.
    A new connection each (``Connection: close``); until ``no_new`` is set."""
    kind = SLOW_UPLOAD
    rng = random.Random(100 + number)
    count = 0
    await asyncio.sleep(number * 0.3)
    while not no_new.is_set():
        count += 1
        result.sent += 1
        good = {"id": f"slow-{number}-{count}", "pad": "y" * 16000}
        data = json.dumps(good).encode()
        head = (f"POST /predict HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode()

        async def send(phase: str) -> str:
            outcome, detail = await upload_once(port, head, data, good, args.client_timeout)
            if outcome in FAILURES:
                phases = phase if phase == server.phase else f"{phase} at start, {server.phase} at the end"
                result.failures.append((time.monotonic(), kind, outcome, detail, phases))
                if len(result.examples[outcome]) < 5:
                    result.examples[outcome].append(f"{kind}: {detail} (server {phases})")
            return outcome

        outcome = await until_answered(send, kind, server, result, args, stop, rng)
        result.final[SLOW_UPLOAD, outcome] += 1


async def until_answered(send, kind: str, server: Server, result: Load, args: argparse.Namespace,
                         stop: asyncio.Event, rng: random.Random) -> str:
    """Attempts of one request (``await send(phase)`` gives each one's outcome, all counted) until one is
    not a 503 or a refused connection, as a client with a retry policy would; gives up after
    ``--retry-for`` seconds. Returns the last outcome."""
    first = time.monotonic()
    while True:
        phase = server.phase
        outcome = await send(phase)
        result.attempts[kind, outcome] += 1
        result.by_phase[outcome, phase] += 1
        if outcome not in RETRIED:
            return outcome
        if time.monotonic() - first > args.retry_for or stop.is_set():
            result.gave_up += 1
            return outcome
        await asyncio.sleep(args.retry_pause * (0.5 + rng.random()))


async def upload_once(port: int, head: bytes, data: bytes, good: dict, timeout: float) -> tuple[str, str]:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 5)
    except (OSError, asyncio.TimeoutError):
        return "refused", ""
    sent = 0
    try:
        try:
            writer.write(head)
            for sent in range(0, len(data), 1024):
                writer.write(data[sent:sent + 1024])
                await writer.drain()
                await asyncio.sleep(0.1)
            sent = len(data)
        except OSError:
            pass  # the server may have answered early and closed: read what it said
        raw = await asyncio.wait_for(reader.read(-1), timeout)
    except asyncio.TimeoutError:
        return "hung", f"no answer within {timeout:g}s, {sent} of {len(data)} body bytes sent"
    except OSError as exc:
        return "lost", f"{type(exc).__name__}: {exc}, {sent} of {len(data)} body bytes sent"
    finally:
        writer.close()
    if not raw.startswith(b"HTTP/1.1 "):
        return "lost", f"connection closed with no answer, {sent} of {len(data)} body bytes sent"
    head_end = raw.find(b"\r\n\r\n")
    status, body = int(raw.split(b" ", 2)[1]), raw[head_end + 4:]
    if status in (429, 503):
        return "503", ""
    try:
        if status == 200 and json.loads(body) == good:
            return "correct", ""
    except ValueError:
        pass
    return "wrong", f"{status} {body[:200].decode(errors='replace')}"


# -- slow clients ----------------------------------------------------------------------------------


@dataclass
class Slow:
    opened: collections.Counter = field(default_factory=collections.Counter)  # kind
    connect_failed: int = 0
    cuts: dict = field(default_factory=lambda: collections.defaultdict(list))  # (kind, how) -> lifetimes
    not_cut: collections.Counter = field(default_factory=collections.Counter)  # kind: lived --slow-max-life


def draining_at(server: Server, t: float) -> bool:
    """Whether ``t`` falls between a SIGTERM and that server's exit (then the drain may have cut it)."""
    return any(inc.sigterm_at is not None and inc.sigterm_at <= t <= (inc.exited_at or float("inf"))
               for inc in server.incarnations)


async def slow_client(number: int, server: Server, port: int, stop: asyncio.Event, slow: Slow,
                      max_life: float) -> None:
    kind = "slowloris (headers 1 byte/s)" if number % 2 == 0 else "stalled 1 MB body"
    await asyncio.sleep(number * 0.05)  # spread the first connections out
    while not stop.is_set():
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 5)
        except (OSError, asyncio.TimeoutError):
            slow.connect_failed += 1
            await asyncio.sleep(0.2)
            continue
        slow.opened[kind] += 1
        born = time.monotonic()
        how = None
        try:
            if kind.startswith("slowloris"):
                request = (b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           b"X-Slow: " + b"s" * 200 + b"\r\nContent-Length: 2\r\n\r\n{}")
                pieces = [request[i:i + 1] for i in range(len(request))]
                wait = 1.0
            else:
                request = (b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 1000000\r\n\r\n")
                pieces = [request + b'{"id": ']
                wait = max_life
            for piece in pieces:
                writer.write(piece)
                await writer.drain()
                how = await wait_for_cut(reader, wait, stop)
                if how is not None or stop.is_set() or time.monotonic() - born > max_life:
                    break
        except (ConnectionResetError, BrokenPipeError):
            how = "reset"
        except OSError as exc:
            how = f"error {type(exc).__name__}"
        lived = time.monotonic() - born
        writer.close()
        if how is None:
            if not stop.is_set():
                slow.not_cut[kind] += 1
            continue
        if draining_at(server, born + lived):
            how += ", during a drain"
        slow.cuts[kind, how].append(lived)
        await asyncio.sleep(0.05)


async def wait_for_cut(reader: asyncio.StreamReader, seconds: float, stop: asyncio.Event) -> str | None:
    """How the server ended the connection within ``seconds`` (EOF, reset, or an answer's status), or None."""
    end = time.monotonic() + seconds
    while not stop.is_set() and time.monotonic() < end:
        try:
            data = await asyncio.wait_for(reader.read(65536), min(0.5, end - time.monotonic()))
        except asyncio.TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return "reset"
        if not data:
            return "closed (EOF)"
        status = data.split(b" ", 2)[1].decode(errors="replace") if data.startswith(b"HTTP/") else "?"
        try:  # the answer, then the server's close
            while await asyncio.wait_for(reader.read(65536), 5):
                pass
        except (asyncio.TimeoutError, ConnectionResetError):
            pass
        return f"answered {status}"
    return None


# -- /health, from another process -----------------------------------------------------------------


def probe(base: str, interval: float, max_seconds: float) -> None:
    """``GET /health`` every ``interval`` s on a kept-alive connection, until stdin closes or
    ``max_seconds``; prints one JSON object: latencies (ms) and failures by kind."""
    import http.client

    host, port = base.rsplit("/", 1)[1].split(":")
    latencies: list[float] = []
    failures: collections.Counter = collections.Counter()
    idle_closed = 0
    conn = None
    end = time.monotonic() + max_seconds
    while time.monotonic() < end:
        readable, _, _ = select.select([sys.stdin], [], [], interval)
        if readable and not sys.stdin.read(1):
            break
        if conn is not None and conn.sock is not None and select.select([conn.sock], [], [], 0)[0]:
            idle_closed += 1  # not a failure: no request was on it
            conn.close()
            conn = None
        began = time.perf_counter()
        try:
            if conn is None:
                conn = http.client.HTTPConnection(host, int(port), timeout=5)
            conn.request("GET", "/health")
            resp = conn.getresponse()
            resp.read()
            if resp.status == 200:
                latencies.append((time.perf_counter() - began) * 1000)
            else:
                failures[f"status {resp.status}"] += 1
            if resp.getheader("Connection", "").lower() == "close":
                conn.close()
                conn = None
        except ConnectionRefusedError:
            failures["refused (server down)"] += 1
            conn = None
        except (OSError, http.client.HTTPException) as exc:
            failures[type(exc).__name__] += 1
            if conn is not None:
                conn.close()
            conn = None
    print(json.dumps({"latencies_ms": latencies, "failures": failures, "idle_closed": idle_closed}))


# -- the run ---------------------------------------------------------------------------------------


async def hostile(args: argparse.Namespace, server: Server, port: int) -> dict:
    stop = asyncio.Event()  # set when the load is over, or when the server cannot be restarted
    broken: list = []
    kills: list = []
    slow = Slow()
    result = Load()
    server.ctl = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
    probe_proc = None
    out = ""
    try:
        await server.start()
        probe_proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "probe", server.base, "0.5", str(args.max_seconds + 300)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        tasks = [asyncio.create_task(restarter(server, args.restart_every, stop, broken)),
                 asyncio.create_task(killer(server, args.kill_every, stop, kills))]
        tasks += [asyncio.create_task(slow_client(n, server, port, stop, slow, args.slow_max_life))
                  for n in range(args.slow_clients)]
        no_new = asyncio.Event()  # the slow uploads end with the load
        uploads = [asyncio.create_task(slow_uploader(n, server, port, args, result, no_new, stop))
                   for n in range(args.slow_uploads)]
        try:
            await load(server, args, result, time.monotonic() + args.max_seconds, stop)
            no_new.set()
            await asyncio.gather(*uploads)
        finally:
            no_new.set()
            stop.set()
            await asyncio.gather(*uploads, *tasks, return_exceptions=False)
        if not broken:
            if server.phase != "up":
                await server.start()
            await server.drain()  # the last drain: with no load
            server.incarnations[-1].final = True
    finally:
        server.kill_now()
        if probe_proc is not None:
            out, _ = probe_proc.communicate(input="", timeout=30)  # closing its stdin stops it
        await server.ctl.close()
    health = json.loads(out) if out.strip() else {"latencies_ms": [], "failures": {}, "idle_closed": 0}
    return {"result": result, "kills": kills, "slow": slow, "health": health, "broken": broken}


KILLED = "died with signal 9 (SIGKILL)"  # the ERROR line each worker SIGKILL should log


def server_log_problems(server: Server) -> tuple[collections.Counter, list[str]]:
    """The log records with a traceback or at ERROR and above: a count of each first line (those for
    the killed workers as one), and the full text of the first few unexpected ones."""
    found: collections.Counter = collections.Counter()
    unexpected: list[str] = []
    records: list[list[str]] = []
    for name in sorted(os.listdir(server.logdir)):
        if name.startswith("server-"):
            with open(os.path.join(server.logdir, name), errors="replace") as f:
                for line in f:
                    if re.match(r"\d{4}-\d\d-\d\d ", line) or not records:
                        records.append([])
                    records[-1].append(line.rstrip("\n"))
    for record in records:
        first, text = record[0], "\n".join(record)
        if KILLED in first:
            found[f"ERROR easyserve: worker ... {KILLED} while running a batch"] += 1
        elif "Traceback" in text or re.search(r" (ERROR|CRITICAL) ", first):
            found[" ".join(first.split()[2:])[:160]] += 1
            if len(unexpected) < 3:
                unexpected.append(text[-4000:])
    return found, unexpected


def run(args: argparse.Namespace) -> int:
    port = _free_port()
    base = f"http://{HOST}:{port}"
    logdir = tempfile.mkdtemp(prefix="easyserve-soak-")
    config_path = os.path.join(logdir, "config.yaml")
    with open(config_path, "w") as f:
        json.dump({"Handle": "easyserve.builtin:Echo", "HandleArgs": {"delay_ms": args.delay_ms}, "GPUs": "cpu",
                   "ProcessPerGPU": args.workers, "Port": port, "MaxBatchSize": 16,
                   "MaxQueueSize": args.max_queue_size, "MaxBodyMB": MAX_BODY_MB, "HttpWorkers": args.http_workers,
                   "HeaderTimeoutS": HEADER_TIMEOUT_S, "BodyTimeoutS": BODY_TIMEOUT_S,
                   "KeepAliveTimeoutS": KEEP_ALIVE_TIMEOUT_S}, f)  # JSON is YAML
    server = Server(config_path, base, logdir)
    out = asyncio.run(hostile(args, server, port))
    problems, unexpected = server_log_problems(server)
    text, failed = report(args, server, out, problems)
    print(text)
    for record in unexpected:
        print("unexpected server log record:\n" + record)
    if failed or unexpected:
        print(f"server logs kept in {logdir}")
    else:
        for name in os.listdir(logdir):
            os.unlink(os.path.join(logdir, name))
        os.rmdir(logdir)
    return 1 if failed else 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def report(args: argparse.Namespace, server: Server, out: dict, problems: collections.Counter) -> tuple[str, bool]:
    result: Load = out["result"]
    slow: Slow = out["slow"]
    kinds = ["good"] + ([SLOW_UPLOAD] if args.slow_uploads else []) + [m[0] for m in _malformed()]
    total_attempts = sum(result.attempts.values())
    lines = [f"hostile soak: {result.sent:,} requests sent ({result.unsent:,} not begun) at concurrency "
             f"{args.concurrency}" + (f" plus {args.slow_uploads} slow uploaders" if args.slow_uploads else "")
             + f" in {result.elapsed:.1f}s, 1 in {args.malformed_every} malformed; "
             f"{total_attempts:,} attempts ({total_attempts / result.elapsed:,.0f}/s)", ""]

    def row(cells: list) -> str:
        return "| " + " | ".join(str(c) for c in cells) + " |"

    lines.append(row(["attempts by outcome"] + list(OUTCOMES) + ["total"]))
    lines.append(row(["---"] + ["---:"] * (len(OUTCOMES) + 1)))
    for kind in kinds:
        counts = [result.attempts[kind, o] for o in OUTCOMES]
        lines.append(row([kind] + [f"{n:,}" for n in counts] + [f"{sum(counts):,}"]))
    totals = [sum(result.attempts[k, o] for k in kinds) for o in OUTCOMES]
    lines.append(row(["all"] + [f"{n:,}" for n in totals] + [f"{sum(totals):,}"]))
    lines.append("")
    good_sent = sum(n for (k, _), n in result.final.items() if k == "good")
    bad_sent = sum(n for (k, _), n in result.final.items() if k == "malformed")
    good_ok = result.final["good", "correct"]
    bad_ok = result.final["malformed", "4xx as expected"]
    lines.append(f"good requests finally answered correctly: {good_ok:,} / {good_sent:,}; malformed finally "
                 f"answered their 4xx: {bad_ok:,} / {bad_sent:,}; given up (still 503/refused after "
                 f"{args.retry_for:g}s): {result.gave_up}")
    slow_sent = sum(n for (k, _), n in result.final.items() if k == SLOW_UPLOAD)
    slow_ok = result.final[SLOW_UPLOAD, "correct"]
    if args.slow_uploads:
        lines.append(f"slow uploads ({args.slow_uploads} clients, ~16 kB bodies sent 1 kB every 0.1 s) finally "
                     f"answered correctly: {slow_ok:,} / {slow_sent:,}")
    phases = ("up", "draining", "down", "starting")
    for outcome in ("503", "refused"):
        by = ", ".join(f"{p}: {result.by_phase[outcome, p]:,}" for p in phases if result.by_phase[outcome, p])
        lines.append(f"{outcome} attempts by server phase when sent: {by or 'none'}")
    if result.retry_after:
        lines.append("503s: " + ", ".join(f"{k}: {v:,}" for k, v in sorted(result.retry_after.items())))
    for outcome in ("503", "wrong", "lost", "hung"):
        for example in result.examples.get(outcome, []):
            lines.append(f"  {outcome} e.g. {example}")

    incs = server.incarnations
    drains = [inc for inc in incs if inc.sigterm_at is not None]
    bad_exits = [inc for inc in drains if inc.exit_code != 0]
    during = [inc for inc in drains if not inc.final]
    durations = [inc.drain_s for inc in during]
    lines.append("")
    lines.append(f"drains under load: {len(during)} (every {args.restart_every:g}s of serving), exit codes "
                 f"{dict(collections.Counter(str(i.exit_code) for i in during))}, SIGTERM to exit "
                 + (f"median {statistics.median(durations):.2f}s, max {max(durations):.2f}s" if durations else "-")
                 + f"; restart to /ready median {statistics.median([i.start_s for i in incs[1:]] or [0]):.2f}s "
                 f"(start attempts refused with the port busy: {sum(i.start_attempts - 1 for i in incs)})")
    final = [inc for inc in drains if inc.final]
    if final:
        lines.append(f"final drain, no load: exit code {final[0].exit_code}, {final[0].drain_s:.2f}s")
    restarts = sum(i.restarts or 0 for i in incs)
    lines.append(f"worker SIGKILLs: {len(out['kills'])} ({args.kill_every:g}s apart, only while up); worker "
                 f"restarts counted by the servers: {restarts}")
    lines.append("server RSS per incarnation (MB, at /ready -> before SIGTERM): "
                 + ", ".join(f"{i.rss_ready:.1f}->{i.rss_end:.1f}" for i in incs))

    lines.append("")
    opened = sum(slow.opened.values())
    cuts = sum(len(lives) for lives in slow.cuts.values())
    lines.append(f"slow clients: {args.slow_clients} kept connected; {opened:,} connections opened, "
                 f"{cuts:,} cut by the server, {sum(slow.not_cut.values())} outlived {args.slow_max_life:g}s, "
                 f"{slow.connect_failed:,} connects refused (server down)")
    for kind in sorted(slow.opened):
        lines.append(f"  {kind}: opened {slow.opened[kind]:,}")
        for (k, how), lives in sorted(slow.cuts.items()):
            if k == kind:
                lines.append(f"    {how}: {len(lives):,}, lifetime median {statistics.median(lives):.2f}s, "
                             f"max {max(lives):.2f}s")

    health = out["health"]
    lat = health["latencies_ms"]
    lines.append("")
    lines.append(f"/health every 0.5s from another process: {len(lat)} answered, p50 {percentile(lat, 0.5):.1f} ms, "
                 f"p99 {percentile(lat, 0.99):.1f} ms, max {max(lat, default=float('nan')):.1f} ms; failures: "
                 + (", ".join(f"{k}: {v}" for k, v in sorted(health["failures"].items())) or "none")
                 + f"; its kept-alive connection found closed while idle and reopened: {health['idle_closed']}")
    if problems:
        lines.append("server log lines with Traceback/ERROR:")
        lines += [f"  {n} x {line}" for line, n in problems.most_common(10)]
    failures = {o: totals[OUTCOMES.index(o)] for o in FAILURES}
    failed = bool(any(failures.values()) or bad_exits or result.gave_up or good_ok != good_sent
                  or bad_ok != bad_sent or result.unsent or out["broken"])
    failed = failed or slow_ok != slow_sent
    if out["broken"]:
        lines.append(f"the server could not be restarted: {out['broken'][0]}")
    lines.append("")
    lines.append(("FAIL: " if failed else "PASS: ") + ", ".join(f"{o} {n}" for o, n in failures.items())
                 + f", drains exiting non-zero {len(bad_exits)}, given up {result.gave_up}, not begun {result.unsent}")
    if result.failures:
        t0 = incs[0].ready_at
        lines.append("first failures (s since the first /ready, kind, outcome, detail, server phase):")
        lines += [f"  {t - t0:.3f} {k} {o} {d} {p}" for t, k, o, d, p in result.failures[:20]]
        lines.append("drains (SIGTERM s, ready-again s): "
                     + ", ".join(f"{w[0] - t0:.2f}-{(w[1] - t0) if len(w) > 1 else float('nan'):.2f}"
                                 for w in server.windows))
    return "\n".join(lines), failed


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "probe":
    probe(sys.argv[2], float(sys.argv[3]), float(sys.argv[4]))
