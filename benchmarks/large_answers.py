"""Large answers against the event loop: how long ``/health`` waits while the server passes on answers
of many megabytes, and how fast those answers arrive.

One server (``easyserve run``, one CPU worker, the tests' ``LargeAnswer`` handle) answers
``--requests`` requests, one after another, each for ``--mb`` MB: a uint8 array as ``.npy``
(``Accept: application/x-npy``), an ``easyserve.Binary``, or JSON holding a string of that size.
Beside them a probe asks ``/health`` on a connection of its own every 10 ms; the table gives its
slowest and 99th-percentile answer, and the answers' megabytes a second (client included: it reads
each answer into a buffer of its own). Run it from any folder::

    python benchmarks/large_answers.py [--mb 200] [--requests 5] [--kinds npy,binary,json]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_http_workers import served_from_the_shell  # noqa: E402

KINDS = {"npy": ("array", "application/x-npy"), "binary": ("binary", "*/*"), "json": ("json", "application/json")}


def exchange(sock: socket.socket, request: bytes) -> tuple[int, bytearray]:
    """Send ``request`` on a kept-alive connection; its status and body (Content-Length framed)."""
    sock.sendall(request)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        head += chunk
    head, rest = head.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:"))
    body = bytearray(length)
    view = memoryview(body)
    view[: len(rest)] = rest
    got = len(rest)
    while got < length:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("server closed the connection")
        got += n
    return int(lines[0].split()[1]), body


def probe(host: str, port: int, stop: threading.Event, waits: list) -> None:
    with socket.create_connection((host, port)) as sock:
        request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        while not stop.is_set():
            started = time.perf_counter()
            exchange(sock, request)
            waits.append(time.perf_counter() - started)
            time.sleep(0.01)


def case(url: str, kind: str, mb: float, requests: int) -> dict:
    host, port = url.split("//")[1].split(":")
    as_, accept = KINDS[kind]
    body = json.dumps({"mb": mb, "as": as_}).encode()
    request = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nAccept: {accept}\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    with socket.create_connection((host, int(port))) as sock:
        status, _ = exchange(sock, request)  # warm: the worker's first batch, numpy's pages
        assert status == 200, status
        waits: list = []
        stop = threading.Event()
        prober = threading.Thread(target=probe, args=(host, int(port), stop, waits))
        prober.start()
        time.sleep(0.2)
        total, started = 0, time.perf_counter()
        for _ in range(requests):
            status, answer = exchange(sock, request)
            assert status == 200, status
            total += len(answer)
        elapsed = time.perf_counter() - started
        stop.set()
        prober.join()
    waits.sort()
    return {"max": waits[-1], "p99": waits[int(0.99 * (len(waits) - 1))], "probes": len(waits),
            "mb_s": total / 2**20 / elapsed, "mb": total / requests / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=200.0)
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--kinds", default="npy,binary,json", help="comma-separated: npy, binary, json")
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    with tempfile.TemporaryDirectory() as folder, served_from_the_shell(
        Path(folder), Handle="handles_ops:LargeAnswer", MaxBatchSize=1
    ) as (_, url):
        rows = [(kind, case(url, kind, args.mb, args.requests)) for kind in kinds]
    print(f"{args.requests} answers of {args.mb:g} MB each, one after another; /health every 10 ms beside them")
    print("| answer | MB each | /health max (s) | /health p99 (s) | probes | answers MB/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind, row in rows:
        print(f"| {kind} | {row['mb']:,.1f} | {row['max']:.3f} | {row['p99']:.3f} | {row['probes']} | "
              f"{row['mb_s']:,.0f} |")


if __name__ == "__main__":
    main()
