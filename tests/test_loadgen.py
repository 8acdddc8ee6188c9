"""The bench's HTTP client (:mod:`easyserve.loadgen`) against servers that misbehave in one way each:
every request ends counted, as an answer by status or as a failure by kind, and the run ends.
The servers here are a few lines of asyncio over real sockets, answering with bytes written by hand."""

from __future__ import annotations

import array
import asyncio
import contextlib
import csv
import itertools
import math
import random
import ssl
import statistics
import sys
import threading
import time
from typing import Awaitable, Callable, Iterator

import pytest
import trustme

from easyserve import bench, loadgen, reports

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}"


class RawServer:
    """An asyncio server in a thread of its own, calling ``handler`` for each connection it accepts."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None) -> None:
        self.handler, self.tls = handler, tls
        self.heads: list[bytes] = []  # every POST's head, as received
        self.posting: set[asyncio.StreamReader] = set()  # the connections that carried a POST (not /stats)
        self.handlers: set[asyncio.Task] = set()
        self.transports: set[asyncio.BaseTransport] = set()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handlers.add(asyncio.current_task())
        self.transports.add(writer.transport)
        try:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                await self.handler(reader, writer)
        finally:  # also when cancelled at the end
            writer.close()

    def __enter__(self) -> RawServer:
        self.thread.start()
        started = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, "127.0.0.1", 0, ssl=self.tls), self.loop)
        self.server = started.result(10)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc_info: object) -> None:
        async def close() -> None:
            # a connection accepted just now gets its transport and handler first: closing the server
            # in between leaves the accepted socket with neither, open for ever
            await asyncio.sleep(0.05)
            self.server.close()
            for task in self.handlers:  # ending each handler closes its connection, however far it got
                task.cancel()
            await asyncio.gather(*self.handlers, return_exceptions=True)
            for transport in self.transports:
                transport.abort()  # closed already, or still flushing to a client that reads no more
            await asyncio.sleep(0.05)  # the transports' closing callbacks

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    @property
    def connections(self) -> int:
        return len(self.posting)

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        """Read one request, its head and its body (``Content-Length``); its head."""
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"POST "):
            self.heads.append(head)
            self.posting.add(reader)  # held, so that no two connections are ever counted as one
        lengths = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")]
        await reader.readexactly(lengths[0] if lengths else 0)
        return head


@contextlib.contextmanager
def raw_server(answer: Callable[[RawServer, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
               tls: ssl.SSLContext | None = None) -> Iterator[RawServer]:
    holder: list[RawServer] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await answer(holder[0], reader, writer)

    with RawServer(handler, tls) as server:
        holder.append(server)
        yield server


async def keep_alive_ok(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        await server.read_request(reader)
        writer.write(OK)
        await writer.drain()


def one_answer(data: bytes) -> Callable[[RawServer, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """A server's way with each connection: read a request, write ``data``, close."""
    async def answer(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(data)
        await writer.drain()

    return answer


def run_of(port: int, scheme: str = "http", payload: object = None, **options: object):
    options = {"concurrency": 2, "requests": 8, "warmup": 0, "progress": False, "timeout": 10, **options}
    [run] = bench(f"{scheme}://127.0.0.1:{port}", payload or {"x": [1.0, 2.0]}, **options).runs
    return run


def test_connections_are_kept_and_each_request_is_sent_whole():
    with raw_server(keep_alive_ok) as server:
        run = run_of(server.port, concurrency=3, requests=30)
    assert run.statuses == {"200": 30} and run.errors == 0
    assert server.connections == 3  # one per user, kept alive for all 30 requests
    head = server.heads[0].decode()
    assert head.startswith("POST /predict HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{server.port}\r\n" in head and "Content-Type: application/json\r\n" in head
    assert len(server.heads) == 30


def test_answers_that_close_the_connection_are_counted_and_the_next_request_reconnects():
    once = one_answer(b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    with raw_server(once) as server:
        run = run_of(server.port, requests=10)
    assert run.statuses == {"503": 10} and run.errors == 10 and run.connection_errors == {}
    assert server.connections == 10


def test_an_answer_before_the_body_is_sent_is_counted():
    async def refuse(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"GET"):  # the bench's reads of /stats
            writer.write(OK)
            return
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        while await reader.read(1 << 16):  # the body nobody wants, until the client closes
            pass

    with raw_server(refuse) as server:
        [run] = bench(f"http://127.0.0.1:{server.port}", {"x": [0.5] * 200_000}, concurrency=2, requests=6,
                      warmup=0, progress=False, timeout=10).runs
    assert run.statuses == {"413": 6} and run.connection_errors == {}


def test_a_server_that_closes_after_each_answer_without_saying_so():
    """No ``Connection: close``, then the connection closed: the next request goes on a new one, or,
    when it was sent before the close was seen, fails as a disconnect; the run goes on either way."""
    with raw_server(one_answer(OK)) as server:
        run = run_of(server.port, requests=40)
    assert run.statuses.get("200", 0) > 0 and set(run.connection_errors) <= {"Disconnected"}
    assert run.statuses.get("200", 0) + run.connection_errors.get("Disconnected", 0) == run.requests == 40


def test_a_request_on_a_connection_closed_meanwhile_fails_as_a_disconnect():
    async def exchange_after_close() -> BaseException:
        connection = await target.connect()
        connection.transport.close()  # as when the server's close is seen between two requests
        assert not connection.usable  # a user takes a new connection instead
        with pytest.raises(loadgen.Disconnected) as caught:
            await connection.exchange(target.requests[0], 5)
        return caught.value

    with raw_server(keep_alive_ok) as server:
        target = loadgen.Target(f"http://127.0.0.1:{server.port}/predict", [(b"{}", {})])
        assert "closed" in str(asyncio.run(exchange_after_close()))


def test_chunked_answers_are_read_to_their_end():
    async def chunked(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            await writer.drain()
            writer.write(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
            await writer.drain()

    with raw_server(chunked) as server:
        run = run_of(server.port, requests=12)
    assert run.statuses == {"200": 12} and server.connections == 2


def test_a_server_that_closes_before_answering_is_a_disconnect():
    async def hang_up(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)

    with raw_server(hang_up) as server:
        run = run_of(server.port, requests=6)
    assert run.connection_errors == {"Disconnected": 6} and run.errors == 6 and run.statuses == {}


def test_a_half_answer_is_a_disconnect():
    with raw_server(one_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"partial\":")) as server:
        run = run_of(server.port, requests=4)
    assert run.connection_errors == {"Disconnected": 4} and run.statuses == {}


def test_an_answer_that_never_comes_times_out():
    async def silent(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (await server.read_request(reader)).startswith(b"GET"):  # the bench's reads of /stats
            writer.write(OK)
        await reader.read()  # until the client gives up and closes

    with raw_server(silent) as server:
        run = run_of(server.port, requests=4, timeout=0.3)
    assert run.connection_errors == {"TimeoutError": 4} and run.statuses == {}
    assert server.connections == 4  # a connection that timed out is not used again


def test_an_answer_that_is_not_http_is_a_bad_answer():
    with raw_server(one_answer(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")) as server:
        run = run_of(server.port, requests=4)
    assert run.connection_errors == {"BadAnswer": 4} and run.statuses == {}


@pytest.mark.parametrize("head", [b"HTTP/1.1 200 OK\r\nX-Big: ", b"HTTP/1.1 200 OK\r\nX-"],
                         ids=["endless value", "endless name"])
def test_an_answer_head_without_end_is_a_bad_answer_not_memory_without_end(head):
    """httptools joins a header's pieces as they come, with no bound: a head without end took 400 MB
    and a core until the request's timeout. Past 64 kB it is a bad answer, long before the timeout."""
    async def endless(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(head)
        with contextlib.suppress(ConnectionError):
            for _ in range(20_000):  # 320 MB at most, should the client read on
                writer.write(b"a" * 16384)
                await writer.drain()

    with raw_server(endless) as server:
        run = run_of(server.port, requests=2, concurrency=1, timeout=60)
    assert run.connection_errors == {"BadAnswer": 2} and run.statuses == {}, run.connection_errors
    assert "head longer than 64 kB" in run.error_texts["BadAnswer"], run.error_texts


@pytest.mark.parametrize("version", [b"HTTP/1.0", b"HTTP/1.1"])
def test_an_answer_whose_body_ends_with_the_connection_is_whole(version):
    """No Content-Length, no chunks: the body runs to the close (HTTP/1.0's way). Every request was
    counted as Disconnected, the parser never being told that the connection had ended."""
    answer = version + b" 200 OK\r\nContent-Type: application/json\r\n\r\n{\"ok\": true}"
    with raw_server(one_answer(answer)) as server:
        run = run_of(server.port, requests=10)
    assert run.statuses == {"200": 10} and run.connection_errors == {} and run.errors == 0
    assert server.connections == 10


def test_a_second_answer_to_one_request_is_a_bad_answer_and_the_connection_is_dropped():
    """It was taken for the next request's answer: every number off, and no error."""
    async def twice(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.read_request(reader)
            writer.write(OK * 2)
            await writer.drain()

    with raw_server(twice) as server:
        run = run_of(server.port, requests=8)
    assert run.requests == 8 and run.statuses == {"200": 8}
    assert run.connection_errors == {"BadAnswer": 8} and run.errors == 8
    assert server.connections == 8  # none was used again after its stray answer


def test_interim_answers_are_skipped():
    """``103 Early Hints`` and ``100 Continue`` come before the answer, and were counted as it."""
    async def hints_first(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.read_request(reader)
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)  # apart, as a server that hints while it works sends them
            writer.write(OK)
            await writer.drain()

    with raw_server(hints_first) as server:
        run = run_of(server.port, requests=8)
    assert run.statuses == {"200": 8} and run.errors == 0 and run.connection_errors == {}
    assert server.connections == 2  # kept alive through the hints


def test_a_stats_answer_that_trickles_in_is_given_up_once(monkeypatch):
    """A /stats sending a byte now and then never met the 10 s timeout of each read: the bench never
    ended. A deadline for the whole answer (shortened here) leaves the server's columns empty."""
    monkeypatch.setattr(sys.modules["easyserve.benchstats"], "STATS_TIMEOUT_S", 0.5)
    asked: list[bytes] = []

    async def trickle(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await server.read_request(reader)
            if head.startswith(b"GET"):
                asked.append(head)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{")
                while True:
                    await asyncio.sleep(0.05)
                    writer.write(b" ")
                    await writer.drain()
            writer.write(OK)
            await writer.drain()

    with raw_server(trickle) as server:
        report = bench(f"http://127.0.0.1:{server.port}", {"x": [1.0]}, concurrency=[1, 2], requests=6, warmup=0,
                       progress=False, timeout=10)
    assert [run.statuses for run in report.runs] == [{"200": 6}, {"200": 6}]
    assert all(run.batch_sizes is None and run.server_cores is None for run in report.runs)
    assert len(asked) == 1  # not asked again, at that level or the next
    assert [note for note in report.notes if "/stats" in note] == [
        "the server's /stats did not answer within 0.5 s: the server columns are left empty"]


@pytest.mark.parametrize("api_key", ["secret\r\nX-Injected: 1", "secret\u2603"])
def test_a_header_that_cannot_be_sent_is_refused_before_any_request(api_key):
    with raw_server(keep_alive_ok) as server:
        with pytest.raises(ValueError, match="cannot be sent"):
            run_of(server.port, api_key=api_key)
    assert server.connections == 0


def test_https(tmp_path, monkeypatch):
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1")
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certificate.configure_cert(tls)
    authority.cert_pem.write_to_path(str(tmp_path / "ca.pem"))

    with raw_server(keep_alive_ok, tls) as server:
        # a certificate the client does not trust: refused, as a browser would
        refused = run_of(server.port, "https", requests=2)
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))  # the client processes inherit it
        trusted = run_of(server.port, "https", requests=6)
    assert refused.connection_errors == {"SSLCertVerificationError": 2} and refused.statuses == {}
    assert trusted.statuses == {"200": 6} and trusted.connection_errors == {}


# -- the open loop (rate) ----------------------------------------------------------------------------------


def slow_ok(seconds: float, arrived: list[float] | None = None):
    """A server's way with each connection: every POST answered ``seconds`` after it is read (its
    arrival time noted in ``arrived``), in turn."""
    async def answer(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            if (await server.read_request(reader)).startswith(b"POST"):
                if arrived is not None:
                    arrived.append(time.monotonic())
                await asyncio.sleep(seconds)
            writer.write(OK)
            await writer.drain()

    return answer


def test_arrival_gaps():
    assert list(itertools.islice(loadgen.arrival_gaps(200, "constant"), 3)) == [0.005] * 3
    drawn = list(itertools.islice(loadgen.arrival_gaps(200, "poisson", random.Random(7)), 20_000))
    mean = statistics.fmean(drawn)
    assert mean == pytest.approx(0.005, rel=0.03)
    assert statistics.pstdev(drawn) / mean == pytest.approx(1.0, abs=0.05)  # exponential: sd = mean
    for bad in (0, -5, math.inf, math.nan, True, "10"):
        with pytest.raises(ValueError, match="rate"):
            loadgen.arrival_gaps(bad, "constant")
    # past what a schedule in Python keeps up with: --rate 1e8 held the loop 35 s and 800 MB
    with pytest.raises(ValueError, match="rate: at most 200,000 requests per second"):
        loadgen.arrival_gaps(1e8, "constant")
    with pytest.raises(ValueError, match="arrivals: expected one of constant, poisson"):
        loadgen.arrival_gaps(10, "bursty")


def test_an_open_loop_sends_on_schedule_and_counts_the_wait_for_a_server_that_falls_behind():
    # one connection, each answer 0.1 s after its request, requests due every 0.02 s: the k-th (from 0)
    # goes out at 0.1 k s, when the one before is answered, so it waits 0.1 + 0.08 k s from when it was due
    arrived: list[float] = []
    with raw_server(slow_ok(0.1, arrived)) as server:
        opened = run_of(server.port, concurrency=1, rate=50, requests=10)
        closed = run_of(server.port, concurrency=1, requests=10)
    assert opened.statuses == {"200": 10} and closed.statuses == {"200": 10}
    assert opened.rate == 50 and closed.rate is None
    assert opened.unsent == 0  # a count of requests: each is sent, however late
    assert opened.p50_ms >= 380 and opened.max_ms >= 780  # 0.42 s and 0.82 s, less the timer's lateness
    # a closed loop waits for each answer before the next is due, and sees 0.1 s each
    assert closed.max_ms < 380
    assert len(server.heads) == 20 and server.connections == 2  # one connection each run


def test_an_open_loop_keeps_its_pace_when_the_server_keeps_up():
    arrived: list[float] = []
    with raw_server(slow_ok(0.001, arrived)) as server:
        run = run_of(server.port, concurrency=8, rate=100, requests=30)
    assert run.statuses == {"200": 30} and run.unsent == 0
    # 10 ms apart on the schedule (a closed loop of 8 would send them a fraction of a millisecond apart);
    # the median gap, since a client late to start catches up on the first few in a burst
    assert statistics.median(b - a for a, b in zip(arrived, arrived[1:])) >= 0.008
    # opened only as needed, far fewer than the 8 allowed: one answers in far less than a gap (a CI run's
    # load once made an answer outlast one, and a third was opened)
    assert server.connections <= 3
    with raw_server(slow_ok(0.001)) as server:
        timed = run_of(server.port, concurrency=8, rate=100, requests=None, duration=0.5)
    assert timed.unsent == 0 and timed.statuses == {"200": timed.requests} and 45 <= timed.requests <= 52
    assert not timed.fell_behind and max(timed.backlog) <= 2
    with raw_server(slow_ok(0.001)) as server:
        sparse = run_of(server.port, rate=2, requests=None, duration=1.2)
    # due at 0, 0.5 and 1 s: the run lasts its 1.2 s all the same, and so does the rate it reports
    assert sparse.requests == 3 and sparse.seconds >= 1.2 and sparse.requests_per_s <= 2.5
    with raw_server(slow_ok(0.001)) as server:
        exact = run_of(server.port, rate=10, requests=None, duration=1.0, clients_processes=2)
    # due at 0, 0.1 ... 0.9 s: the one that adding up the gaps would put at 1 s is after the run
    assert exact.requests == 10 and exact.processes == 2


def test_constant_and_poisson_arrivals_reach_the_server_as_such():
    def gaps(arrivals: str, **options: object) -> list[float]:
        arrived: list[float] = []
        with raw_server(slow_ok(0.0, arrived)) as server:
            run = run_of(server.port, concurrency=8, rate=100, requests=60, arrivals=arrivals, **options)
        assert run.statuses == {"200": 60}
        return [b - a for a, b in zip(arrived, arrived[1:])]

    # a seed whose 59 gaps average 0.01 s: unseeded, their mean strays by 13% (one standard deviation),
    # and past the 35% allowed for a loaded machine's timers about once in 150 runs
    constant, poisson = gaps("constant"), gaps("poisson", seed=11)
    for each in (constant, poisson):
        assert statistics.fmean(each) == pytest.approx(0.01, rel=0.35)
    # evenly spaced, give or take the timers; exponential gaps spread as wide as their median, and
    # wider (quartiles, not the standard deviation: a few gaps stretched by a busy machine move it)
    assert _spread(constant) < 0.5
    assert _spread(poisson) > 0.6  # 1.6 on average; above 0.7 for each of 5,000 seeds
    # three client processes share the schedule, each offset from the next by a step, not all at once
    shared = sorted(gaps("constant", clients_processes=3))
    assert shared[len(shared) // 4] > 0.004


def _spread(gaps: list[float]) -> float:
    first, middle, third = statistics.quantiles(gaps, n=4)
    return (third - first) / middle


def test_poisson_arrivals_repeat_with_their_seed():
    def due(seed: int | None) -> tuple[int, int | None]:
        # connections to spare: on a loaded machine, a burst of arrivals that found two busy at the
        # schedule's end was left unsent
        run = run_of(server.port, rate=200, requests=None, duration=0.3, arrivals="poisson", seed=seed,
                     concurrency=16)
        assert run.unsent == 0 and run.statuses == {"200": run.requests}
        return run.requests, run.seed

    with raw_server(slow_ok(0.0)) as server:
        # how many fall due within the second is the gaps' doing alone: the same seed, the same count
        assert due(7) == due(7) and due(7)[1] == 7
        counts = {due(seed)[0] for seed in range(1, 6)}
        drawn = [due(None)[1] for _ in range(2)]
    assert len(counts) > 1  # five seeds giving one count would be a 1-in-thousands chance
    assert all(isinstance(seed, int) for seed in drawn) and drawn[0] != drawn[1]  # a new one, told


def test_an_open_loop_counts_the_wait_of_a_client_that_was_held_up():
    """The client's own event loop blocked for 0.2 s: the requests due meanwhile go out late, in a
    burst, and their latencies say so (a server answering at once cannot hide it)."""
    async def measure(port: int) -> dict:
        job = {"url": f"http://127.0.0.1:{port}/predict", "requests": [(b"{}", {})], "concurrency": 8,
               "timeout_s": 10, "rate": 100}
        load = loadgen.Loop(job, report=lambda message: None)
        asyncio.get_running_loop().call_later(0.1, time.sleep, 0.2)  # what a starved client looks like
        try:
            return await load.run(None, 40, progress=False)
        finally:
            load.close()

    with raw_server(slow_ok(0.0)) as server:
        tally = asyncio.run(measure(server.port))
    latencies = array.array("d", tally["latencies"])
    assert len(latencies) == 40
    assert max(latencies) >= 0.15  # due at about 0.11 s, sent at 0.3 s


def test_a_timed_open_loop_sends_its_rate_times_its_seconds_however_long_the_machine_has_been_up(monkeypatch):
    """The schedule's instants on a clock a day from its zero (a machine up that long): adding 1/300 s
    to it 300 times rounds at each step, and the sum fell short of the end by more than its margin,
    so a 301st request went out within the second."""
    async def measure(port: int) -> dict:
        job = {"url": f"http://127.0.0.1:{port}/predict", "requests": [(b"{}", {})], "concurrency": 8,
               "timeout_s": 10, "rate": 300}
        load = loadgen.Loop(job, report=lambda message: None)
        try:
            return await load.run(1.0, None, progress=False)
        finally:
            load.close()

    counter = time.perf_counter
    monkeypatch.setattr(time, "perf_counter", lambda: counter() + 86_400.0)
    with raw_server(slow_ok(0.0)) as server:
        tally = asyncio.run(measure(server.port))
    assert tally["unsent"] == 0 and tally["statuses"] == {200: 300} and len(server.heads) == 300


def test_refused_connections_at_a_rate_are_failures_not_a_server_behind():
    with raw_server(keep_alive_ok) as server:
        port = server.port  # closed once the block ends: a port that refuses
    run = run_of(port, concurrency=2, rate=200, requests=None, duration=0.5)
    # 100 due in 0.5 s: a few fewer where a loaded machine delays the generator's own loop (92 seen)
    assert run.connection_errors == {"ConnectionRefusedError": run.requests} and 85 <= run.requests <= 102
    assert run.unsent == 0 and not run.fell_behind  # the schedule went on: nothing held back


def one_at_a_time(seconds: float):
    """A server's way with each connection: every POST answered ``seconds`` after the one before it,
    on whichever connection: ``1 / seconds`` answers a second for all of them together."""
    lock = asyncio.Lock()  # (bound to the server's loop when first used)

    async def answer(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            if (await server.read_request(reader)).startswith(b"POST"):
                async with lock:
                    await asyncio.sleep(seconds)
            writer.write(OK)
            await writer.drain()

    return answer


def test_a_server_slower_than_the_rate_is_seen_to_fall_behind():
    with raw_server(one_at_a_time(0.02)) as server:  # 50 answers a second
        report = bench(f"http://127.0.0.1:{server.port}", {"x": [1.0]}, rate=100, duration=1.0, warmup=0,
                       progress=False, timeout=30)
    [run] = report.runs
    # 100 due, at most about 50 answered within the second; every one was sent (256 connections)
    assert run.unsent == 0 and run.requests >= 95 and run.fell_behind and run.backlog[1] - run.backlog[0] >= 15
    assert run.statuses == {"200": run.requests} and run.p99_ms > 500
    assert len(report.notes) == 1 and "the server fell behind this rate" in report.notes[0]


def test_a_server_that_keeps_up_is_not_said_to_fall_behind_however_short_the_run_or_long_its_answers():
    with raw_server(slow_ok(0.0)) as server:
        short = [run_of(server.port, rate=10, requests=n, concurrency=4) for n in (3, 5, 9)]
    with raw_server(slow_ok(0.6)) as server:  # answers 0.6 s after each request, as many at once as come
        slow = run_of(server.port, rate=8, requests=None, duration=2.0, concurrency=64)
    for run in [*short, slow]:
        assert run.statuses == {"200": run.requests} and not run.fell_behind, run
    assert slow.backlog[0] >= 3 and slow.p50_ms >= 600  # holding several at any time, as it should


def test_a_server_a_little_slower_than_the_rate_is_seen_to_fall_behind_in_a_long_enough_run():
    with raw_server(one_at_a_time(0.025)) as server:  # 40 answers a second
        run = run_of(server.port, rate=50, requests=None, duration=4.0, concurrency=64)  # a quarter too many
    assert run.fell_behind and run.unsent == 0, run.backlog


def test_a_timed_open_loop_counts_what_it_could_not_send():
    with raw_server(slow_ok(0.2)) as server:
        run = run_of(server.port, concurrency=1, rate=50, requests=None, duration=1.0)
    # 50 due in the second; one connection answering in 0.2 s sends about 6 of them
    assert run.requests == len(server.heads) <= 8 and run.statuses == {"200": run.requests}
    assert run.unsent >= 40 and 45 <= run.requests + run.unsent <= 52


@pytest.mark.parametrize("split_at", ["head", "body"])
def test_what_an_error_said_is_kept_when_its_body_comes_in_a_later_read(split_at):
    """The sample of an error's text was read from the bytes that came with its head: a body written
    after the head (or a head written in two parts) left it empty."""
    said = b'{"error":"the model is resting"}'
    answer = b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(said)
    cut = 20 if split_at == "head" else len(answer)

    async def in_two(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await server.read_request(reader)
            if head.startswith(b"GET"):
                writer.write(OK)
                continue
            writer.write((answer + said)[:cut])
            await writer.drain()
            await asyncio.sleep(0.05)  # read apart, not as one
            writer.write((answer + said)[cut:])
            await writer.drain()

    with raw_server(in_two) as server:
        run = run_of(server.port, requests=4)
    assert run.statuses == {"400": 4} and run.error_texts == {"400": "the model is resting"}


def test_requests_an_open_loop_never_sent_are_errors_and_their_wait_is_in_the_latencies(tmp_path):
    """Requests due that found every connection busy until the time was up were counted as ``unsent``
    and nowhere else: 0 errors, and percentiles of the few that were answered, which looked good
    (a p50 of a millisecond here) while most of the load was never sent."""
    async def quick_then_held(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            if (await server.read_request(reader)).startswith(b"POST") and len(server.heads) > 5:
                await asyncio.sleep(2.0)  # the sixth and later: held, so every later one due waits
            writer.write(OK)
            await writer.drain()

    with raw_server(quick_then_held) as server:
        report = bench(f"http://127.0.0.1:{server.port}", {"x": [1.0]}, rate=50, concurrency=1, duration=1.0,
                       warmup=0, progress=False, timeout=30)
    [run] = report.runs
    # 50 due in the second: five answered at once, the sixth held 2 s, the rest never sent
    assert run.statuses == {"200": run.requests} and run.requests <= 7 and run.unsent >= 40
    assert run.connection_errors == {"unsent": run.unsent} and run.errors == run.unsent and run.fell_behind
    assert run.error_texts["unsent"] == "due, but never sent: all 1 connections were busy until the time was up"
    # each unsent request counts with its wait until the run's end (0 to 0.9 s): the median is among them
    assert run.p50_ms >= 250 and run.max_ms >= 1900
    row = dict(zip(reports.headers([run]), reports.cells(run, rates=True)))
    assert all(row[p].startswith("≥") for p in ("p50", "p90", "p99")), row  # lower bounds
    assert row["errors"].startswith(f"unsent: {run.unsent} (due, but never sent")
    saved = report.to_dict()["runs"][0]
    assert saved["fell_behind"] is True and saved["errors"] == run.unsent and saved["unsent"] == run.unsent
    report.to_csv(tmp_path / "r.csv")
    with open(tmp_path / "r.csv", newline="") as f:
        [line] = list(csv.DictReader(f))
    assert line["fell_behind"] == "True" and line["failed_unsent"] == str(run.unsent)
    assert line["errors"] == str(run.unsent)


def test_a_warm_up_tries_every_body_before_it_says_each_is_refused():
    """Bodies sent in turn, the first three refused and the fourth taken: one user's warm-up stopped
    after three refusals, before the fourth was ever sent, and bench said "every warm-up request ...
    was answered with an error, so nothing would be measured" (as it did not with --warmup 0 or -c 4)."""
    refused = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 15\r\n\r\n{\"error\":\"bad\"}"

    async def refuse_bad(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lengths = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")]
            body = await reader.readexactly(lengths[0] if lengths else 0)
            writer.write(refused if b"bad" in body else OK)
            await writer.drain()

    with raw_server(refuse_bad) as server:
        run = run_of(server.port, concurrency=1, requests=8, warmup=0.5,
                     payload=[{"x": "bad"}, {"x": "bad"}, {"x": "bad"}, {"x": [1]}])
    assert run.statuses == {"200": 2, "400": 6}, run


def test_a_server_slower_than_the_timeout_is_said_to_be_slow_not_unreachable():
    """Every warm-up request timed out on a server that answers in 2 s: bench said "cannot reach URL:
    every warm-up request failed: TimeoutError: 2", as if nothing listened, when --timeout was too short."""
    with raw_server(slow_ok(2.0)) as server:
        url = f"http://127.0.0.1:{server.port}"
        with pytest.raises(sys.modules["easyserve.bench"].Unreachable) as slow:
            bench(url, {"x": [1.0]}, concurrency=2, timeout=0.5, warmup=0.3, duration=5, progress=False)
    assert str(slow.value) == (f"the server at {url} answered no warm-up request within --timeout 0.5 s: raise "
                               "--timeout (timeout= from Python)")
    assert slow.value.failures == {"TimeoutError": 2}
