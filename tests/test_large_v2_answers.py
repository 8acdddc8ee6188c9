"""Large Open Inference Protocol answers: byte-exact through one front and two, handed to the socket
a piece at a time (as /predict's, see test_binary_answers), and never in the way of /health."""

from __future__ import annotations

import json
import socket
import urllib.request

import numpy as np
import pytest
from aiohttp import http_writer
from conftest import request
from test_openinference import HEADER

from easyserve.http import BODY_PIECE

ECHO = "handles_v2:Echo"  # answers each input back under its own name
MB = 2**20


def pattern(n: int) -> bytes:
    return np.tile(np.arange(251, dtype=np.uint8), n // 251 + 1)[:n].tobytes()


def binary_echo(n: int) -> tuple[dict, bytes]:
    """A request for ``n`` bytes of UINT8 back as binary tensor data: its JSON and its binary data."""
    doc = {"inputs": [{"name": "x", "datatype": "UINT8", "shape": [n], "parameters": {"binary_data_size": n}}],
           "outputs": [{"name": "x", "parameters": {"binary_data": True}}]}
    return doc, pattern(n)


def text(n: int) -> str:
    return (bytes(97 + i % 26 for i in range(256)) * (n // 256 + 1))[:n].decode()


def infer(url: str, doc: dict, data: bytes) -> tuple[int, dict, tuple[dict, bytes]]:
    """POST an inference request to Echo by urllib (aiohttp's client warns of large bodies, and its
    writer would be the server's beside it); (status, headers, the answer's JSON and binary tail)."""
    head = json.dumps(doc).encode()
    req = urllib.request.Request(f"{url}/v2/models/Echo/infer", data=head + data, headers={HEADER: str(len(head))})
    with urllib.request.urlopen(req, timeout=60) as resp:
        raw = resp.read()
        size = int(resp.headers.get(HEADER, len(raw)))
        return resp.status, dict(resp.headers), (json.loads(raw[:size]), raw[size:])


@pytest.mark.parametrize("http_workers", [1, 2])
def test_large_v2_answers_arrive_byte_exact_as_binary_data_and_json(serve, http_workers):
    """24 MB outputs, out of band from the worker (and on to a front), written in pieces: every byte as
    the handle gave it, with the answer's Content-Type and JSON length."""
    n = 24 * MB
    with serve(ECHO, MaxBodyMB=32, HttpWorkers=http_workers) as server:
        doc, data = binary_echo(n)
        status, headers, (answer, tail) = infer(server.url, doc, data)
        assert status == 200 and headers["Content-Type"] == "application/octet-stream"
        assert answer["outputs"] == [{"name": "x", "datatype": "UINT8", "shape": [n],
                                      "parameters": {"binary_data_size": n}}]
        assert int(headers["Content-Length"]) == int(headers[HEADER]) + n and tail == data
        # a BYTES input of one 24 MB string, answered in the JSON
        string = text(n)
        doc = {"inputs": [{"name": "t", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": n + 4}}]}
        data = n.to_bytes(4, "little") + string.encode()  # binary BYTES: each element's length, then its bytes
        status, headers, (answer, tail) = infer(server.url, doc, data)
        assert status == 200 and headers["Content-Type"] == "application/json" and HEADER not in headers
        assert answer["outputs"][0] == {"name": "t", "datatype": "BYTES", "shape": [1], "data": [string]}
        assert tail == b""
        # small answers after them, as before
        doc, data = binary_echo(1000)
        status, _, (answer, tail) = infer(server.url, doc, data)
        assert status == 200 and tail == data


def test_a_large_v2_answer_goes_to_the_socket_a_piece_at_a_time(serve, monkeypatch):
    """Handed to aiohttp whole, a 24 MB answer was copied on the event loop in one go (joined with its
    headers); in pieces, each drained before the next, the loop serves others between them."""
    handed: list[int] = []
    for name in ("write", "write_eof"):
        original = getattr(http_writer.StreamWriter, name)

        async def spy(self, chunk=b"", *args, _original=original, **kwargs):
            handed.append(len(memoryview(chunk).cast("B")))
            return await _original(self, chunk, *args, **kwargs)

        monkeypatch.setattr(http_writer.StreamWriter, name, spy)
    n = 24 * MB
    with serve(ECHO, MaxBodyMB=32) as server:
        doc, data = binary_echo(n)
        status, _, (_, tail) = infer(server.url, doc, data)
    assert status == 200 and tail == data
    assert sum(handed) > n and max(handed) <= BODY_PIECE


@pytest.mark.parametrize("http_workers", [1, 2])
def test_health_answers_while_a_large_v2_answer_is_read_slowly(serve, http_workers):
    """A client that reads a 32 MB v2 answer a megabyte at a time holds nothing up: /health is answered
    meanwhile (by any front), and the answer still arrives whole."""
    n = 32 * MB
    doc, data = binary_echo(n)
    head = json.dumps(doc).encode()
    with serve(ECHO, MaxBodyMB=40, HttpWorkers=http_workers) as server:
        host, port = server.url.split("//")[1].split(":")
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
            sock.sendall(f"POST /v2/models/Echo/infer HTTP/1.1\r\nHost: {host}:{port}\r\n"
                         f"Content-Type: application/octet-stream\r\n{HEADER}: {len(head)}\r\n"
                         f"Content-Length: {len(head) + n}\r\n\r\n".encode() + head + data)
            received = bytearray()
            while b"\r\n\r\n" not in received:
                received += sock.recv(65536)
            status_and_headers, _, received = bytes(received).partition(b"\r\n\r\n")
            lines = status_and_headers.decode("latin-1").lower().split("\r\n")
            assert lines[0].startswith("http/1.1 200")
            length = int(next(line.split(":")[1] for line in lines if line.startswith("content-length:")))
            json_length = int(next(line.split(":")[1] for line in lines if line.startswith(HEADER.lower() + ":")))
            assert length == json_length + n
            received = bytearray(received)
            healths = 0
            while len(received) < length:
                received += sock.recv(MB)
                if healths < 5 and len(received) > healths * (4 * MB):
                    assert request(server.url + "/health", timeout=10)[0] == 200
                    healths += 1
        assert healths == 5
        assert json.loads(received[:json_length])["outputs"][0]["parameters"] == {"binary_data_size": n}
        assert received[json_length:] == data
