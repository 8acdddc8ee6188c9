"""Clients that end their side of the connection (``shutdown(SHUT_WR)``, as ``nc -N`` does, or a close),
and the timing of ``BodyTimeoutS``. Real servers and sockets, with one HTTP front and with two.

The server cannot tell a client that ended its side from one that closed the connection and gave up:
both send the same end of stream. Either is taken to have gone, whatever its request said
(``Connection: close``, HTTP/1.0, keep-alive), and its request is dropped if it has not run: answering
a half-close instead ran the requests of every ``urllib`` client that timed out (it sends
``Connection: close``), and counted 200s nobody received (see also test_robustness.py)."""

from __future__ import annotations

import json
import select
import socket
import time
import urllib.request
from typing import Iterator

import pytest
from conftest import post_json, request, wait_until
from test_hostile import closed_by_server, head, read_response

from easyserve import Server

BODY_TIMEOUT_S = 3


@pytest.fixture(scope="module", params=[1, 2], ids=["HttpWorkers1", "HttpWorkers2"])
def server(request, tmp_path_factory) -> Iterator[Server]:
    """Echoes each request and journals its ``mark``. HeaderTimeoutS is long, so a prompt close here is
    the half-close's doing, never the header timer's."""
    journal = tmp_path_factory.mktemp("half-close") / "journal.txt"
    journal.touch()
    with Server(handle="handles_robust:Sleeper", HandleArgs={"journal": str(journal)}, GPUs="cpu", Port=0,
                HttpWorkers=request.param, HeaderTimeoutS=30, BodyTimeoutS=BODY_TIMEOUT_S,
                KeepAliveTimeoutS=30) as running:
        running.journal = journal
        yield running


def connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def predict(obj: dict, *lines: str, version: str = "HTTP/1.1") -> bytes:
    body = json.dumps(obj).encode()
    data = head("POST", "/predict", "Content-Type: application/json", f"Content-Length: {len(body)}", *lines) + body
    return data.replace(b" HTTP/1.1\r\n", f" {version}\r\n".encode(), 1)


def rest(sock: socket.socket, within: float = 5) -> bytes:
    """What the server sends until it closes ``sock``; fails if it is still open after ``within`` s."""
    data = b""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if select.select([sock], [], [], max(0.0, deadline - time.monotonic()))[0]:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk
    raise AssertionError(f"the connection is still open after {within:g}s; it sent {data!r}")


def answered_200s(server: Server) -> int:
    return request(server.url + "/stats")[2]["statuses"].get("200", 0)


def journal(server: Server) -> list[str]:
    return server.journal.read_text().split()


# -- ended after a whole request ----------------------------------------------------------------


@pytest.mark.parametrize("lines, version", [(("Connection: close",), "HTTP/1.1"), ((), "HTTP/1.0"),
                                            ((), "HTTP/1.1")], ids=["close", "http1.0", "keep-alive"])
def test_a_client_that_ends_the_connection_after_its_request_is_taken_for_gone(server, lines, version):
    mark = f"gone-{version}-{len(lines)}"
    gone = request(server.url + "/stats")[2]["client_gone"]
    with connect(server) as busy:  # the only worker runs this meanwhile: the request below waits in the queue
        busy.sendall(predict({"mark": "busy", "sleep": 1}))
        wait_until(lambda: server.workers[0]["state"] == "busy", 5, "the worker to be busy")
        with connect(server) as sock:
            sock.sendall(predict({"mark": mark}, *lines, version=version))
            sock.shutdown(socket.SHUT_WR)
            assert rest(sock, within=3) == b""  # closed with no answer
        assert read_response(busy)[0] == 200
    assert post_json(server.url + "/predict", {"mark": "after"})[0] == 200  # queued behind it, had it stayed
    assert mark not in journal(server) and "after" in journal(server)
    # counted: a request queued and never answered was in "requests" and in no status
    assert request(server.url + "/stats")[2]["client_gone"] == gone + 1


def test_half_close_after_an_answer_closes_the_kept_alive_connection(server):
    with connect(server) as sock:
        sock.sendall(predict({"mark": "kept"}))
        assert read_response(sock)[0] == 200
        sock.shutdown(socket.SHUT_WR)
        assert rest(sock) == b""


# -- half-closed inside a request -------------------------------------------------------------------


def test_half_close_inside_the_request_head_closes_at_once(server):
    with connect(server) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Le")
        sock.shutdown(socket.SHUT_WR)
        assert rest(sock, within=3) == b""  # nothing to answer; not held until HeaderTimeoutS (30 s)


def test_half_close_inside_the_body_of_a_keep_alive_request_closes_at_once(server):
    with connect(server) as sock:
        sock.sendall(head("POST", "/predict", "Content-Type: application/json", "Content-Length: 100")
                     + b'{"mark": "cut-short-kept"')
        sock.shutdown(socket.SHUT_WR)
        assert rest(sock, within=2) == b""  # not held until BodyTimeoutS


def test_a_client_that_closes_inside_its_body_is_counted_gone(server):
    """Gone while its body arrived, it was in no count at all: not client_gone, not a status."""
    before = request(server.url + "/stats")[2]
    with connect(server) as sock:
        sock.sendall(head("POST", "/predict", "Content-Type: application/json", "Content-Length: 100")
                     + b'{"mark": "left-inside-its-body"')
        wait_until(lambda: request(server.url + "/stats")[2]["buffered_bytes"] >= before["buffered_bytes"] + 25, 10,
                   "its handler to be reading the body")
    wait_until(lambda: request(server.url + "/stats")[2]["client_gone"] == before["client_gone"] + 1, 5,
               "the request to be counted gone")
    after = request(server.url + "/stats")[2]
    assert after["statuses"] == before["statuses"] and after["requests"] == before["requests"]


@pytest.mark.parametrize("raw, status", [
    (b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1x\r\n\r\n{}", b"400"),
    (b"POST /predict HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n{}\r\n0\r\n\r\n", b"400"),
    (b"POST /predict HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 10000 + b"\r\nContent-Length: 2\r\n\r\n{}",
     b"431"),
    (b"POST /predict HTTP/1.1\r\nHost: localhost\r\n" + b"X-Filler: %s\r\n" % (b"a" * 1000) * 100, b"431"),  # 100 kB
], ids=["bad-length", "bad-chunk", "header-too-long", "head-too-long"])
def test_a_request_the_http_parser_refuses_is_counted_malformed(server, raw, status):
    """aiohttp's parser answers these 400 before any route or answer hook: the client saw a 400 and the
    server's counts said nothing of it."""
    before = request(server.url + "/stats")[2]
    with connect(server) as sock:
        sock.sendall(raw)
        assert rest(sock).split(b" ", 2)[1] == status  # (aiohttp answers its refusals in HTTP/1.0)
    wait_until(lambda: request(server.url + "/stats")[2]["malformed"] == before["malformed"] + 1, 5,
               "the refusal to be counted")
    assert request(server.url + "/stats")[2]["statuses"] == before["statuses"]
    metrics = urllib.request.urlopen(server.url + "/metrics", timeout=10).read().decode()
    assert f"easyserve_requests_malformed_total {before['malformed'] + 1}.0" in metrics


def test_a_head_past_64_kb_behind_a_request_being_answered_closes_the_connection_after_its_answer(server):
    """A 431 written at once went out before the answer of the request ahead of it on the connection,
    and took its place: the client read the 431 as that request's answer."""
    before = request(server.url + "/stats")[2]
    with connect(server) as sock:
        sock.sendall(predict({"mark": "ahead", "sleep": 0.3}))
        wait_until(lambda: request(server.url + "/stats")[2]["requests"] == before["requests"] + 1, 10,
                   "its request to be queued")  # and its batch runs
        sock.sendall(head("GET", "/health", *[f"X-Filler-{i}: {'a' * 1000}" for i in range(70)])[:-2])
        answers = rest(sock)
    status_line, _, body = answers.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 200 OK" and answers.count(b"HTTP/1.1 ") == 1, answers[:300]
    assert json.loads(body.partition(b"\r\n\r\n")[2]) == {"mark": "ahead", "sleep": 0.3}
    wait_until(lambda: request(server.url + "/stats")[2]["malformed"] == before["malformed"] + 1, 5,
               "the head to be counted malformed")


def test_a_bad_chunk_in_a_body_being_read_is_answered_400_at_once(server):
    """The parser's refusal of a chunk that came after the handler began reading was queued as a
    request of its own, to be answered once the first one was; that one's body never ended, and no
    timer covered it: the client waited for ever."""
    before = request(server.url + "/stats")[2]
    with connect(server) as sock:
        sock.sendall(head("POST", "/predict", "Content-Type: application/json", "Transfer-Encoding: chunked")
                     + b'7\r\n{"mark"\r\n')
        wait_until(lambda: request(server.url + "/stats")[2]["buffered_bytes"] >= before["buffered_bytes"] + 7, 10,
                   "its handler to be reading the body")
        sock.sendall(b'ZZ\r\n: "x"}\r\n0\r\n\r\n')
        answer = rest(sock, within=BODY_TIMEOUT_S)  # before any timer could have ended it
    head_, _, body = answer.partition(b"\r\n\r\n")
    assert head_.split(b" ", 2)[1] == b"400", answer
    assert b"malformed HTTP request: Invalid character in chunk size" in body, answer
    after = request(server.url + "/stats")[2]
    assert after["statuses"].get("400", 0) == before["statuses"].get("400", 0) + 1 and after["requests"] == before[
        "requests"]


# -- BodyTimeoutS --------------------------------------------------------------------------------


def test_stalled_body_gets_408_body_timeout_after_its_last_byte(server):
    # Bytes at 0 and 0.2 s, then a stall: the 408 is due BodyTimeoutS after the second. It once came a
    # whole BodyTimeoutS after the first look at the body found it still arriving: ~2 x BodyTimeoutS.
    with connect(server) as sock:
        sock.sendall(head("POST", "/predict", "Content-Type: application/json", "Content-Length: 100") + b"{")
        time.sleep(0.2)
        sock.sendall(b" ")
        last = time.monotonic()
        status, _, body = read_response(sock)
        waited = time.monotonic() - last
        assert closed_by_server(sock, within=3)
    assert status == 408 and "BodyTimeoutS" in json.loads(body)["error"]
    assert BODY_TIMEOUT_S - 0.5 < waited < BODY_TIMEOUT_S + 1.4, waited

