"""Large JSON and urlencoded bodies are decoded by the worker that runs them, never on the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import socket
import threading
import time
from pathlib import Path

import aiohttp
import pytest
from conftest import peak_rss, post_json, request, reset_peak_rss, wait_queued

from easyserve import wire
from easyserve.bodies import LARGE_JSON, FormBody, JsonBody
from easyserve.children import SOCKET_BUFFER

JSON = {"Content-Type": "application/json"}


def test_eight_15_mb_json_bodies_leave_health_answering(serve):
    values = [i / 7 for i in range(850_000)]
    body = json.dumps({"x": values}).encode()
    assert 14 * 2**20 < len(body) < 16 * 2**20
    with serve("handles_ops:Sums", ProcessPerGPU=2, MaxBatchSize=1) as server:
        answers: list = []

        async def send_all() -> None:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
                async def one() -> tuple[int, dict]:
                    headers = {"Content-Type": "application/json"}
                    async with session.post(server.url + "/predict", data=io.BytesIO(body), headers=headers) as resp:
                        return resp.status, await resp.json()

                answers.extend(await asyncio.gather(*(one() for _ in range(8))))

        sender = threading.Thread(target=lambda: asyncio.run(send_all()))
        sender.start()
        slowest = 0.0
        while sender.is_alive():
            started = time.monotonic()
            assert request(server.url + "/health", timeout=10)[0] == 200
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.05)
        sender.join()
        assert [status for status, _ in answers] == [200] * 8
        assert all(a["n"] == len(values) and abs(a["sum"] - sum(values)) < 1e-3 for _, a in answers)
        # decoding 15 MB and pickling 850,000 floats on the loop held /health 3-5 s a body
        assert slowest < 1.5, f"/health took {slowest:.2f}s while the bodies were processed"


def test_a_large_body_costs_the_server_its_size_once(serve):
    """A body's chunks were kept and joined at the end, which held it twice for a moment: a 200 MB upload
    took the server from 69 to 470 MB. It is gathered into one buffer as it arrives (271 MB), and the
    handle still gets ``bytes``."""
    mb = 2**20
    size = 64 * mb
    body = os.urandom(mb) * 64
    with serve("handles_for_tests:Payload", MaxBodyMB=80) as server:
        for _ in range(2):
            before = reset_peak_rss()
            with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
                sock.sendall(f"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/octet-stream"
                             f"\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n".encode())
                sock.sendall(body)
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
            rise = peak_rss() - before
            assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"data":"<67108864 bytes>",'
                                                                          b'"content_type":"application/octet-stream"}')
            assert rise < 1.5 * size, f"a {size // mb} MB body took the server {rise / mb:.0f} MB"


@pytest.mark.parametrize("path", ["/predict", "/v2/models/Slow/infer"])
def test_small_json_bodies_wait_in_the_queue_as_the_bytes_the_budget_counts(serve, path):
    """A small JSON body waited in the queue as the objects decoded from it, up to 27 times its bytes,
    which alone MaxBufferedMB counted: 500 bodies of 64 kB of {} took the server from 145 to 930 MB
    (counted: 32 MB). It waits as its bytes, and the worker decodes it, as it did a large one."""
    mb = 2**20
    empties = b",".join([b"{}"] * ((LARGE_JSON - 100) // 3))
    body = {"/predict": b'{"a":[' + empties + b"]}",
            "/v2/models/Slow/infer": b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[1]}],'
                                     b'"parameters":{"p":[' + empties + b"]}}"}[path]
    assert LARGE_JSON - 200 < len(body) < LARGE_JSON
    count = 150
    with serve("handles_ops:Slow", HandleArgs={"s": 5}, MaxBatchSize=1, MaxQueueSize=count) as server:
        before = reset_peak_rss()

        async def send_all() -> None:
            timeout = aiohttp.ClientTimeout(total=8)
            async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
                async def one() -> None:
                    with contextlib.suppress(asyncio.TimeoutError, aiohttp.ClientError):
                        async with session.post(server.url + path, data=body, headers=JSON) as resp:
                            await resp.read()

                await asyncio.gather(*(one() for _ in range(count)))

        sender = threading.Thread(target=lambda: asyncio.run(send_all()))
        sender.start()
        try:
            held = wait_queued(server.url, count - 1)["buffered_bytes"]
            rise = peak_rss() - before
        finally:
            sender.join()
    assert held == count * len(body)  # each body's bytes, from the queue to the worker
    # the bodies' bytes (9 MB), and what 150 connections cost: 1.3 MB of objects a body before
    assert rise < 64 * mb, f"{count} bodies of {len(body):,} bytes took the server {rise / mb:.0f} MB"


def test_a_large_malformed_or_non_object_body_gets_the_same_400_as_a_small_one(serve):
    padding = " " * LARGE_JSON
    with serve("handles_ops:Sums") as server:
        for small, large in (('{"x": [1, 2,]}', '{"x": [1, 2,]}' + padding),
                             ("[1, 2]", "[1, 2]" + padding),
                             ('{"x": [NaN]}', '{"x": [NaN]}' + padding)):
            got_small = request(server.url + "/predict", small.encode(), {"Content-Type": "application/json"})
            got_large = request(server.url + "/predict", large.encode(), {"Content-Type": "application/json"})
            assert got_small[0] == got_large[0] == 400
            assert got_small[2] == got_large[2]
        # a large valid body in a batch with a small one: each gets its own answer
        status, body = post_json(server.url + "/predict", {"x": [1.5] * 20_000})
        assert status == 200 and body == {"n": 20_000, "sum": 30_000.0}


def test_a_large_urlencoded_form_is_decoded_by_the_worker_with_the_same_answers(serve):
    """Two 15 MB forms of %41 held the event loop 2 s; a large form now travels as a JSON body does."""
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    text = "A" * LARGE_JSON
    with serve("handles_for_tests:Payload") as server:
        answers = [request(server.url + "/predict", body, form) for body in (
            b"note=" + b"%41" * LARGE_JSON + b"&k=1&k=2",  # a large form: decoded by the worker
            b"note=" + b"A" * LARGE_JSON + b"&k=1&k=2",
            b"k=" + b"%ff" * LARGE_JSON,  # not UTF-8: the same 400 as a small one's
            b"k=%ff",
            b"a" * LARGE_JSON,  # a field with no "="
            b"a=1&&=&b",
        )]
    assert [answer[0] for answer in answers] == [200, 200, 400, 400, 400, 400]
    assert answers[0][2] == answers[1][2] == {"note": text, "k": ["1", "2"]}
    assert answers[2][2] == answers[3][2] and answers[2][2]["error"].startswith("form body is not valid UTF-8")
    assert answers[4][2]["error"].startswith("malformed form body") and answers[5][2]["error"].startswith("malformed")


def test_the_socket_to_a_worker_holds_a_batch_of_large_requests(serve):
    # as large as the kernel allows (it doubles what it is asked, for its bookkeeping): with its ~200 kB
    # default, a 1 MB request reached the worker in several writes, each waiting for the server process
    # to be scheduled, while the worker's core stood idle
    limits = {name: int(Path(f"/proc/sys/net/core/{name}").read_text()) for name in ("wmem_max", "rmem_max")}
    with serve("handles_ops:WireBuffers") as server:
        status, sizes = post_json(server.url + "/predict", {})
        assert status == 200
        assert sizes == {"send": 2 * min(SOCKET_BUFFER, limits["wmem_max"]),
                         "receive": 2 * min(SOCKET_BUFFER, limits["rmem_max"])}
        for worker in server._pool.workers:  # and the server's end
            sock = worker.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == sizes["send"]


@pytest.mark.parametrize("form", ["raw", "json", "urlencoded"])
def test_a_large_body_goes_to_a_worker_as_it_came_never_copied(form):
    picture = bytes(range(256)) * 1024  # 256 kB, as a request body arrives
    body = picture if form == "raw" else b'{"img": "' + picture.hex().encode() + b'"}'
    if form == "urlencoded":
        body = b"img=" + picture.hex().encode()
    task_info = {"raw": lambda: wire.mark_large({"data": body}), "json": lambda: JsonBody(body),
                 "urlencoded": lambda: FormBody(body)}[form]()
    head, pickled, *buffers = wire.pack(("run", 1, [("t1", task_info)]))
    assert len(buffers) == 1 and buffers[0].obj is body  # the frame points at the body itself
    [(_, _, [(_, received)])] = wire.FrameReader().feed(b"".join([head, pickled, *buffers]))
    if form == "raw":
        assert type(received["data"]) is bytes and received["data"] == picture
    else:
        assert type(received) is type(task_info) and received.decode() == {"img": picture.hex()}


def test_a_worker_reads_every_batch_whole_however_the_stream_splits_them_and_stops_at_the_end():
    """The worker reads what has arrived at once (several small batches in one read, a large body
    straight into its place); each message comes whole and in order, and a stream cut mid-frame (the
    server gone) simply ends."""
    picture = bytes(range(256)) * 4096  # 1 MB: read into its own buffer, past the scratch one
    sent = [("run", n, [("t", {"n": n})]) for n in range(50)]
    sent.insert(25, ("run", 99, [("t", wire.mark_large({"data": picture}))]))
    stream = b"".join(bytes(piece) for message in sent for piece in wire.pack(message))
    theirs, ours = socket.socketpair()

    def write() -> None:
        for start in range(0, len(stream), 70_001):  # cuts through headers, pickles and the picture
            theirs.sendall(stream[start:start + 70_001])
        theirs.sendall(bytes(wire.pack(("run", 100, []))[0]))  # a header whose pickle never comes
        theirs.close()

    writer = threading.Thread(target=write)
    writer.start()
    received = list(wire.messages(ours))
    writer.join()
    ours.close()
    assert [m[1] for m in received] == [m[1] for m in sent]
    assert received[25][2][0][1] == {"data": picture} and received[:3] == sent[:3]


def test_a_fault_in_reading_a_body_in_the_worker_fails_that_request_alone(capsys):
    """A body the worker decodes (a large JSON or form, an inference request) that raised anything but
    BadRequest ended the worker, and each retry the next one: now its request's 500, the others run."""
    from easyserve.handle import Handle
    from easyserve.pipeline import Lanes
    from easyserve.v2.protocol import Signature
    from easyserve.worker import _Batch

    class Faulty(JsonBody):
        __slots__ = ()

        def decode(self, example: object = None) -> dict:
            raise KeyError("a fault of ours")

    class Values(Handle):
        def forward(self, batch):
            return batch

        def postprocess(self, info, task):
            return info["value"]

    handle = Values()
    batch = _Batch(handle, Signature.of(handle), Lanes(), True, 1,
                   [("a", JsonBody(b'{"value": 1}'), "a", "", None), ("b", Faulty(b"{}"), "b", "", None),
                    ("c", JsonBody(b'{"value": 3}'), "c", "", None)])
    assert batch.finish() == [(200, 1), (500, "the request could not be read: KeyError: 'a fault of ours'"), (200, 3)]
    said = capsys.readouterr().err  # its traceback, in the worker's log, after which request it was
    assert "request b could not be read:\n" in said and "KeyError: 'a fault of ours'" in said


@pytest.mark.parametrize("pieces,expected", [
    ([b"abc"], None), ([b"abc", b"def"], None), ([b"a", b"b", b"c"], None), ([bytearray(b"ab"), b"c"], None),
    ([b"", b"x"], None), ([], None), ([b"q", b"y" * (2**19 + 5), b"y" * (2**19 + 5)], None),
    ([b"y" * (2**19 + 5)] * 2, None), ([b"y" * 1000], 2**21),
])
def test_a_gathered_body_is_its_pieces_in_order_and_one_piece_is_kept_as_it_came(pieces, expected):
    """A body in one piece (most below 1 MB, which aiohttp joins) is the bytes it came in: copied into the
    bytearray, it cost the server process 5-10% more CPU for a 600 kB JSON body."""
    from easyserve.reading import Gathered

    gathered = Gathered(expected)
    for piece in pieces:
        gathered += piece
    body = gathered.result()
    assert bytes(body) == b"".join(pieces) and len(gathered) == len(body)
    if len(pieces) == 1 and type(pieces[0]) is bytes and expected is None:
        assert body is pieces[0]
