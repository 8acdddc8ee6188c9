"""Readers against predictions: how many predictions a second a server still answers while many
clients read ``/health``, ``/stats``, ``/metrics`` or the Open Inference Protocol's statistics as fast
as they are answered.

One server (``easyserve run``, one CPU worker, the tests' ``Recorder`` handle, which answers at once)
takes ``--predictors`` closed-loop clients posting to ``/predict``; beside them, ``--readers``
closed-loop clients each read one path, in turn: none, ``/health``, ``/stats``, ``/metrics``,
``/v2/models/Recorder/stats``. Each
case runs ``--seconds``; the table gives predictions and reads a second, and predictions as a
share of those with no readers. The clients share the machine with the server, as a scraper on
the same host would. Run it from any folder::

    python benchmarks/reader_flood.py [--readers 32] [--predictors 8] [--seconds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_http_workers import served_from_the_shell  # noqa: E402

PATHS = (None, "/health", "/stats", "/metrics", "/v2/models/Recorder/stats")


async def loop_until(session: aiohttp.ClientSession, method: str, url: str, end: float, counts: dict,
                     key: str) -> None:
    while time.monotonic() < end:
        async with session.request(method, url, json={"value": 1} if method == "POST" else None) as response:
            await response.read()
            counts[key, response.status] = counts.get((key, response.status), 0) + 1


async def case(url: str, path: str | None, readers: int, predictors: int, seconds: float) -> dict:
    counts: dict = {}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        await loop_until(session, "POST", url + "/predict", time.monotonic() + 0.5, {}, "warm")
        end = time.monotonic() + seconds
        jobs = [loop_until(session, "POST", url + "/predict", end, counts, "predict") for _ in range(predictors)]
        if path is not None:
            jobs += [loop_until(session, "GET", url + path, end, counts, "read") for _ in range(readers)]
        await asyncio.gather(*jobs)
    odd = {key: n for key, n in counts.items() if key[1] != 200}
    return {"predict": counts.get(("predict", 200), 0) / seconds, "read": counts.get(("read", 200), 0) / seconds,
            "odd": odd}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readers", type=int, default=32)
    parser.add_argument("--predictors", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, served_from_the_shell(Path(folder)) as (_, url):
        rows = [(path, asyncio.run(case(url, path, args.readers, args.predictors, args.seconds))) for path in PATHS]
    alone = rows[0][1]["predict"]
    print("| readers of | predictions/s | share of no readers | reads/s | not 200 |")
    print("|---|---:|---:|---:|---|")
    for path, row in rows:
        print(f"| {path or '(none)'} | {row['predict']:,.0f} | {row['predict'] / alone:.2f} | {row['read']:,.0f} | "
              f"{row['odd'] or 'none'} |")


if __name__ == "__main__":
    main()
