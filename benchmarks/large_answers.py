"""Large answers against the event loop: how long ``/health`` waits while the server passes on answers
of many megabytes, and how fast those answers arrive.

One server (``easyserve run``, one CPU worker, :class:`LargeAnswers`: the tests' ``LargeAnswer``,
which also answers the Open Inference Protocol) answers ``--requests`` requests, one after another,
each for ``--mb`` MB: on ``/predict``, a uint8 array as ``.npy`` (``Accept: application/x-npy``), an
``easyserve.Binary``, or JSON holding a string of that size; on ``/v2/models/LargeAnswers/infer``, a
UINT8 output as binary tensor data (``v2-binary``) or a BYTES output, one string, in the JSON
(``v2-json``). Beside them a probe asks ``/health`` every 10 ms, on a connection of its own (with
``--http-workers`` above 1, a new one each time, so it reaches every front); the table gives its
slowest and 99th-percentile answer, and the answers' megabytes a second (client included: it reads
each answer into a buffer of its own). Run it from any folder::

    python benchmarks/large_answers.py [--mb 200] [--requests 5] [--kinds npy,binary,json,v2-binary,v2-json]
                                       [--http-workers 1]

``--front-receive`` measures instead a front's side of the socket pair alone, where the machine's
other work blurs the whole: one ``--mb`` answer frame sent to an event loop that reads it as chunks
(``data_received``) or into the reader's own buffers (``BufferedProtocol``), its bytes marked as the
server process marks them (``Blob``: the front gets ``bytes``, a copy) or as a worker does (``Bulk``);
the loop's longest stall (a heartbeat every 1 ms) and its thread's CPU time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from handles_ops import LargeAnswer  # noqa: E402

from easyserve import wire  # noqa: E402

KINDS = {"npy": ("array", "application/x-npy"), "binary": ("binary", "*/*"), "json": ("json", "application/json"),
         "v2-binary": ("array", "*/*"), "v2-json": ("json", "*/*")}


class LargeAnswers(LargeAnswer):
    """``LargeAnswer``, and on the Open Inference Protocol: input ``mb`` (FP64 [1]) asks for output ``y``,
    that many MB of uint8, or with ``parameters.as`` ``"json"``, output ``s``, a string of that length."""

    def preprocess(self, task):
        if task.get("protocol") != "v2":
            return task["task_info"]
        return {"mb": float(task["task_info"]["mb"][0]), "as": task["parameters"].get("as", "array"), "v2": True}

    def postprocess(self, output, task):
        return {"y": output} if task.get("protocol") == "v2" and not isinstance(output, dict) else output


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


def probe(host: str, port: int, stop: threading.Event, waits: list, fresh: bool) -> None:
    """``/health`` every 10 ms until ``stop``; on one connection, or (``fresh``) a new one each time,
    which the kernel hands to any of the fronts (a kept one stays with one front)."""
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    sock = None
    try:
        while not stop.is_set():
            started = time.perf_counter()
            if sock is None:
                sock = socket.create_connection((host, port))
            exchange(sock, request)
            waits.append(time.perf_counter() - started)
            if fresh:
                sock.close()
                sock = None
            time.sleep(0.01)
    finally:
        if sock is not None:
            sock.close()


def request_for(kind: str, mb: float) -> bytes:
    as_, accept = KINDS[kind]
    path = "/predict"
    body = json.dumps({"mb": mb, "as": as_}).encode()
    if kind.startswith("v2-"):
        path = "/v2/models/LargeAnswers/infer"
        body = json.dumps({"inputs": [{"name": "mb", "datatype": "FP64", "shape": [1], "data": [mb]}],
                           "parameters": {"as": as_, "binary_data_output": kind == "v2-binary"}}).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nAccept: {accept}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def case(url: str, kind: str, mb: float, requests: int, fresh: bool) -> dict:
    host, port = url.split("//")[1].split(":")
    request = request_for(kind, mb)
    with socket.create_connection((host, int(port))) as sock:
        status, _ = exchange(sock, request)  # warm: the worker's first batch, numpy's pages
        assert status == 200, status
        waits: list = []
        stop = threading.Event()
        prober = threading.Thread(target=probe, args=(host, int(port), stop, waits, fresh))
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


class ChunkReader(asyncio.Protocol):
    def __init__(self, done: asyncio.Future) -> None:
        self.reader, self.done = wire.FrameReader(), done

    def data_received(self, data: bytes) -> None:
        for message in list(self.reader.feed(data)):
            self.done.set_result(message)


class BufferReader(asyncio.BufferedProtocol):
    def __init__(self, done: asyncio.Future) -> None:
        self.reader, self.done = wire.FrameReader(), done

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        for message in self.reader.buffer_updated(nbytes):
            self.done.set_result(message)


def front_receive(mb: float, protocol: type, mark: type) -> dict:
    """One answer frame of ``mb`` MB into ``protocol`` on a fresh loop: its longest stall and CPU."""
    from easyserve.runtime import new_event_loop  # uvloop where installed, as a front's loop

    ours, theirs = socket.socketpair()
    answer = memoryview(bytearray(os.urandom(1 << 20)) * int(mb))
    frame = wire.pack(("answer", 1, 200, mark(answer), None))
    loop = new_event_loop()
    gaps: list = []

    async def run() -> tuple[float, float]:
        done = loop.create_future()
        ours.setblocking(False)
        await loop.connect_accepted_socket(lambda: protocol(done), ours)

        async def beat() -> None:
            last = time.perf_counter()
            while not done.done():
                await asyncio.sleep(0.001)
                gaps.append(time.perf_counter() - last)
                last = time.perf_counter()

        beating = loop.create_task(beat())
        await asyncio.sleep(0.05)
        cpu, started = time.thread_time(), time.perf_counter()
        threading.Thread(target=lambda: [theirs.sendall(part) for part in frame], daemon=True).start()
        message = await done
        elapsed, cpu = time.perf_counter() - started, time.thread_time() - cpu
        await beating
        assert message[3] == answer
        return elapsed, cpu

    try:
        elapsed, cpu = loop.run_until_complete(run())
    finally:
        loop.close()
        theirs.close()
    return {"stall": max(gaps), "cpu": cpu, "elapsed": elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=200.0)
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated: " + ", ".join(KINDS))
    parser.add_argument("--http-workers", type=int, default=1, help="HttpWorkers: front processes")
    parser.add_argument("--front-receive", action="store_true", help="a front's side of the socket pair alone")
    args = parser.parse_args()
    if args.front_receive:
        print(f"one {args.mb:g} MB answer frame to a front's event loop")
        print("| read as | marked | loop's longest stall (ms) | loop CPU (s) | whole after (s) |")
        print("|---|---|---:|---:|---:|")
        for protocol in (ChunkReader, BufferReader):
            for mark in (wire.Blob, wire.Bulk):
                row = front_receive(args.mb, protocol, mark)
                print(f"| {protocol.__name__} | {mark.__name__} | {row['stall'] * 1000:.0f} | {row['cpu']:.3f} | "
                      f"{row['elapsed']:.3f} |")
        return
    kinds = args.kinds.split(",")
    from test_http_workers import served_from_the_shell  # here: a worker imports this file for its handle

    with tempfile.TemporaryDirectory() as folder, served_from_the_shell(
        Path(folder), Handle=f"{Path(__file__).resolve()}:LargeAnswers", MaxBatchSize=1,
        HttpWorkers=args.http_workers,
    ) as (_, url):
        rows = [(kind, case(url, kind, args.mb, args.requests, args.http_workers > 1)) for kind in kinds]
    print(f"{args.requests} answers of {args.mb:g} MB each, one after another; /health every 10 ms beside them; "
          f"HttpWorkers {args.http_workers}")
    print("| answer | MB each | /health max (s) | /health p99 (s) | probes | answers MB/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind, row in rows:
        print(f"| {kind} | {row['mb']:,.1f} | {row['max']:.3f} | {row['p99']:.3f} | {row['probes']} | "
              f"{row['mb_s']:,.0f} |")


if __name__ == "__main__":
    main()
