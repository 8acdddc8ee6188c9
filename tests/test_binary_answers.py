"""A handle's binary answers (easyserve.Binary): the bytes and Content-Type it gave, through every path."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import pty
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Iterator

import aiohttp
import numpy as np
import pytest
from PIL import Image
from conftest import request, wait_until
from test_openinference import infer
from typer.testing import CliRunner

from easyserve import Binary, Client
from easyserve.cli import app

THUMBNAIL = "handles_for_tests:Thumbnail"


def post(url: str, body: dict) -> tuple[int, dict, bytes]:
    """POST ``body`` as JSON; (status, headers, the body's bytes)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), err.read()


def post_concurrently(url: str, bodies: list[dict]) -> list[tuple[int, dict, bytes]]:
    async def run():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=len(bodies))) as session:
            async def one(body):
                async with session.post(url, json=body) as resp:
                    return resp.status, dict(resp.headers), await resp.read()

            return await asyncio.gather(*(one(b) for b in bodies))

    return asyncio.run(run())


def shade_and_size(png: bytes) -> tuple[int, tuple[int, int]]:
    with Image.open(io.BytesIO(png)) as image:
        return int(np.asarray(image)[0, 0]), image.size


def test_binary_checks_its_content_type_and_data():
    assert Binary(b"\x89PNG", "image/png").content_type == "image/png"
    assert Binary(bytearray(3)).content_type == "application/octet-stream"
    assert len(Binary(memoryview(np.zeros((4, 4), np.uint8))[::2])) == 8  # not contiguous: copied
    assert Binary(b"x", "text/plain; charset=utf-8").content_type == "text/plain; charset=utf-8"
    for bad in ("png", "image/png\r\nSet-Cookie: x=1", "image/png\r\n;Set-Cookie: x=1", "image/png\n\n;x",
                "image/png\x0b;x", "image/pngé", "", "image/ png"):
        with pytest.raises(ValueError, match="media type"):
            Binary(b"x", bad)
    with pytest.raises(TypeError, match="not str"):
        Binary("text")
    made = Binary(b"x", "text/plain")
    with pytest.raises(ValueError, match="media type"):
        made.content_type = "text/plain\r\nX: 1"
    with pytest.raises(TypeError, match="not NoneType"):
        made.data = None
    made.data = memoryview(np.zeros((4, 4), np.uint8))[::2]
    assert (made.content_type, len(made), bytes(made.data)) == ("text/plain", 8, bytes(8))


@pytest.mark.parametrize("http_workers", [1, 2])
def test_each_request_gets_its_own_bytes_with_their_content_type(serve, http_workers):
    """Batches of 8 from 48 concurrent clients: each answer is the PNG its own request asked for, and
    a 1 MB answer (out of band on the worker's socket, and the front's) arrives whole."""
    with serve(THUMBNAIL, MaxBatchSize=8, MaxWaitMs=20, HttpWorkers=http_workers) as server:
        sizes = [(8 + i, 3 + i % 5) for i in range(48)]
        answers = post_concurrently(server.url + "/predict", [{"w": w, "h": h} for w, h in sizes])
        big = post(server.url + "/predict", {"as": "big", "w": 1000, "h": 7})
        batch_sizes = server.stats()["batch_sizes"]
    for (w, h), (status, headers, body) in zip(sizes, answers):
        assert status == 200 and headers["Content-Type"] == "image/png"
        assert shade_and_size(body) == (w % 256, (w, h))
    assert big[0] == 200 and big[1]["Content-Type"] == "application/octet-stream"
    assert big[2] == np.random.default_rng(7).bytes(1_000_000)
    assert max(int(size) for size in batch_sizes) > 1  # they were batched


def test_the_client_returns_the_bytes_blocking_async_and_with_npy(serve):
    with serve(THUMBNAIL) as server:
        png = Client(server.url).predict(w=9, h=4)
        from_npy_client = Client(server.url, npy=True).predict(w=10, h=4)
        as_base64 = Client(server.url).predict({"w": 11, "h": 4, "as": "bytes"})

        async def both():
            async with Client(server.url) as client:
                return await asyncio.gather(client.apredict(w=12, h=4), client.apredict(w=13, h=4))

        from_async = asyncio.run(both())
    assert shade_and_size(png) == (9, (9, 4))
    assert shade_and_size(from_npy_client) == (10, (10, 4))  # an Accept that prefers .npy still gets it
    assert isinstance(as_base64, str)  # plain bytes go as base64 JSON, as before
    assert [shade_and_size(p)[0] for p in from_async] == [12, 13]


def test_a_binary_the_server_cannot_answer_as_it_is_is_a_500_that_says_why(serve):
    with serve(THUMBNAIL) as server:
        url = server.url + "/predict"
        nested = post(url, {"w": 4, "h": 4, "as": "nested"})
        bad_type = post(url, {"w": 4, "h": 4, "as": "bad_type"})
        # set after it was made: unchecked, they ended the worker, and on the retry a second one
        bad_later = [post(url, {"w": 4, "h": 4, "as": kind}) for kind in ("bad_type_later", "bad_data_later")]
        restarts = server.workers[0]["restarts"]
        status, _, (answer, _) = infer(server.url, {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1],
                                                                "data": [1.0]}]}, model="Thumbnail")
        after = post(url, {"w": 5, "h": 4})
    assert nested[0] == 500 and "only when it is the whole result" in json.loads(nested[2])["error"]
    assert bad_type[0] == 500 and "media type" in json.loads(bad_type[2])["error"]
    assert "Set-Cookie" not in bad_type[1]
    assert status == 500 and "'png' is an easyserve.Binary, which answers /predict alone" in answer["error"]
    assert after[0] == 200 and shade_and_size(after[2]) == (5, (5, 4))  # the worker served on
    assert [(status, json.loads(body)["error"].split(":")[0]) for status, _, body in bad_later] == [
        (500, "postprocess failed"), (500, "postprocess failed")]
    said = [json.loads(body)["error"] for _, _, body in bad_later]
    assert "media type" in said[0] and "not NoneType" in said[1], said
    assert restarts == 0


def test_a_content_type_held_by_a_str_enum_is_answered_as_its_value(serve):
    # The Enum went into the pickle as itself: a class no other process could import ended the worker
    # (then its successor, on the retry), and one it could would have been written as "Media.PNG"
    with serve(THUMBNAIL) as server:
        status, headers, body = post(server.url + "/predict", {"w": 6, "h": 4, "as": "enum"})
        workers = server.workers
    assert status == 200 and headers["Content-Type"] == "image/png" and shade_and_size(body) == (6, (6, 4))
    assert workers[0]["restarts"] == 0


def test_cli_predict_writes_a_binary_answer_to_a_file_or_a_pipe_never_a_terminal(serve, tmp_path):
    with serve(THUMBNAIL) as server:
        command = [sys.executable, "-m", "easyserve.cli", "predict", server.url, "-d", '{"w": 6, "h": 3}']
        to_file = CliRunner().invoke(app, ["predict", server.url, "-d", '{"w": 7, "h": 3}',
                                           "-o", str(tmp_path / "a.png")])
        json_to_file = CliRunner().invoke(app, ["predict", server.url, "-d", '{"w": 7, "as": "bytes", "h": 3}',
                                                "--output", str(tmp_path / "a.json")])
        piped = subprocess.run(command, capture_output=True, timeout=60)
        primary, secondary = pty.openpty()
        try:
            on_terminal = subprocess.run(command, stdout=secondary, stderr=subprocess.PIPE, timeout=60)
        finally:
            os.close(secondary)
            os.close(primary)
    assert to_file.exit_code == 0 and to_file.stdout == ""
    assert shade_and_size((tmp_path / "a.png").read_bytes()) == (7, (7, 3))
    assert json_to_file.exit_code == 0 and isinstance(json.loads((tmp_path / "a.json").read_text()), str)
    assert piped.returncode == 0 and shade_and_size(piped.stdout) == (6, (6, 3))
    assert on_terminal.returncode == 1 and b"--output FILE" in on_terminal.stderr


def large_answer(url: str, mb: float, kind: str, accept: str) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url + "/predict", data=json.dumps({"mb": mb, "as": kind}).encode(),
                                 headers={"Content-Type": "application/json", "Accept": accept})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return resp.status, dict(resp.headers), resp.read()


@pytest.mark.parametrize("http_workers", [1, 2])
def test_large_answers_arrive_byte_exact_as_npy_binary_and_json(serve, http_workers):
    """Answers of 24 MB, out of band from the worker (and on to a front), written in pieces: every byte
    as the handle made it, with its Content-Type and length."""
    n = 24 * 2**20
    pattern = np.tile(np.arange(251, dtype=np.uint8), n // 251 + 1)[:n]
    with serve("handles_ops:LargeAnswer", HttpWorkers=http_workers) as server:
        status, headers, body = large_answer(server.url, 24, "array", "application/x-npy")
        assert status == 200 and headers["Content-Type"] == "application/x-npy"
        assert np.array_equal(np.load(io.BytesIO(body)), pattern)
        status, headers, body = large_answer(server.url, 24, "binary", "*/*")
        assert status == 200 and headers["Content-Type"] == "application/octet-stream"
        assert int(headers["Content-Length"]) == n and body == pattern.tobytes()
        status, headers, body = large_answer(server.url, 24, "json", "application/json")
        assert status == 200 and headers["Content-Type"].startswith("application/json")
        letters = bytes(97 + i % 26 for i in range(256))
        assert json.loads(body) == {"s": pattern.tobytes().translate(letters).decode()}
        # the worker and the server go on answering after them, small answers as before
        assert large_answer(server.url, 0.001, "binary", "*/*")[2] == pattern[:1048].tobytes()


def test_health_answers_while_a_large_answer_is_read_slowly(serve):
    """A client that reads a 64 MB answer a megabyte at a time holds nothing up: /health is answered
    meanwhile, and the answer still arrives whole."""
    n = 64 * 2**20
    with serve("handles_ops:LargeAnswer") as server:
        host, port = server.url.split("//")[1].split(":")
        body = json.dumps({"mb": 64, "as": "binary"}).encode()
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
            sock.sendall(f"POST /predict HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            received = bytearray()
            while b"\r\n\r\n" not in received:
                received += sock.recv(65536)
            head, _, received = bytes(received).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and f"content-length: {n}".encode() in head.lower()
            received = bytearray(received)
            healths = 0
            while len(received) < n:
                received += sock.recv(1 << 20)
                if healths < 5 and len(received) > healths * (8 << 20):
                    assert request(server.url + "/health", timeout=10)[0] == 200
                    healths += 1
        assert healths == 5
        assert received == np.tile(np.arange(251, dtype=np.uint8), n // 251 + 1)[:n].tobytes()


@pytest.mark.parametrize("http_workers", [1, 2])
def test_a_large_answer_counts_once_written_whole_and_its_client_gone_if_it_left_before(serve, http_workers):
    """A 24 MB answer counted as a 200 as its headers went out: a client that left after them, or
    a few MB in, counted as answered; and its time stopped at the headers, not the last byte."""
    with serve("handles_ops:LargeAnswer", HttpWorkers=http_workers) as server:
        for _ in range(2):
            with answer_begun(server, mb=24):
                pass  # left with its headers read
        assert wait_until(lambda: server.stats()["client_gone"] == 2, 30), server.stats()
        assert server.stats()["statuses"] == {}
        assert large_answer(server.url, 24, "binary", "*/*")[0] == 200  # read whole: counted
        assert wait_until(lambda: server.stats()["statuses"] == {"200": 1}, 10), server.stats()
        assert server.stats()["client_gone"] == 2 and server.stats()["histograms"]["latency_s"]["count"] == 1


def test_a_large_answer_cut_short_by_its_fronts_death_counts_as_cut_off(serve):
    """The front said it had passed the answer on (a /stats read asks) as it began writing it, and then
    died: the request was in no count at all, neither a status, nor gone, nor cut off."""
    with serve("handles_ops:LargeAnswer", HttpWorkers=2) as server:
        with answer_begun(server, mb=24):
            assert request(server.url + "/stats")[2]["statuses"] == {}  # every front has said what it passed on
            for front in server._fronts.fronts:
                os.kill(front.proc.pid, signal.SIGKILL)
            assert wait_until(lambda: server.stats()["front_restarts"] == 2, 30), server.stats()
        stats = server.stats()
    assert (stats["cut_off"], stats["client_gone"], stats["statuses"]) == (1, 0, {}), stats


@contextlib.contextmanager
def answer_begun(server, mb: float) -> Iterator[socket.socket]:
    """A connection whose request for an answer of ``mb`` MB has had the answer's headers, and reads no
    more (a small receive buffer: the server soon has to wait for it)."""
    host, port = server.url.split("//")[1].split(":")
    body = json.dumps({"mb": mb, "as": "binary"}).encode()
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        sock.sendall(f"POST /predict HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        received = b""
        while b"\r\n\r\n" not in received:
            received += sock.recv(65536)
        assert received.startswith(b"HTTP/1.1 200"), received
        yield sock
