"""Large JSON bodies are decoded by the worker that runs them, never on the event loop."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time

import aiohttp
from conftest import post_json, request

from easyserve.bodies import LARGE_JSON


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
