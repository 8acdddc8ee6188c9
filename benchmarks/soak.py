"""Soak: many concurrent requests while a worker is SIGKILLed every few seconds. Nothing may be lost.

    python benchmarks/soak.py                       # 20,000 requests, concurrency 64, a kill every 2 s
    python benchmarks/soak.py --requests 5000 --kill-every 1
    python benchmarks/soak.py --hostile --requests 40000 --concurrency 32   # see benchmarks/soak_hostile.py

Each request carries a unique id; the no-op handle answers it back, so every 200 is checked against
its own request. Reports sent / answered / 200 / correct / errors by status / lost (the connection
broke with no answer) / hung (no answer within --client-timeout), and the server's memory.

--hostile also drains and restarts the server every --restart-every seconds, keeps --slow-clients
slow connections open, sends one malformed request in --malformed-every, watches /health, and
reports every attempt by outcome; it exits 1 if anything is lost, wrong or hung
(benchmarks/soak_hostile.py).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import aiohttp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def get_json(url: str) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:  # /ready answers 503 while a worker restarts
        with err:
            return json.loads(err.read())


async def load(url: str, total: int, concurrency: int, client_timeout: float) -> dict:
    outcome: dict = {"status": collections.Counter(), "errors": collections.defaultdict(set), "correct": 0,
                     "lost": 0, "hung": 0, "answered": 0}
    ids = iter(range(total))
    timeout = aiohttp.ClientTimeout(total=client_timeout)

    async def client(session: aiohttp.ClientSession) -> None:
        for i in ids:
            body = {"id": i, "pad": "x" * (i % 64)}
            try:
                async with session.post(url, json=body) as resp:
                    answer = await resp.json()
                    outcome["answered"] += 1
                    outcome["status"][resp.status] += 1
                    if resp.status == 200:
                        outcome["correct"] += answer == body
                    elif len(outcome["errors"][resp.status]) < 3:
                        outcome["errors"][resp.status].add(answer.get("error", "")[:160])
            except asyncio.TimeoutError:
                outcome["hung"] += 1
            except aiohttp.ClientError:
                outcome["lost"] += 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return outcome


async def killer(base: str, every: float, done: asyncio.Event, kills: list) -> None:
    rng = random.Random(0)
    while not done.is_set():
        try:
            await asyncio.wait_for(done.wait(), every)
            return
        except asyncio.TimeoutError:
            pass
        workers = await asyncio.to_thread(get_json, base + "/ready")
        alive = [w["pid"] for w in workers["workers"] if w["state"] in ("idle", "busy")]
        if alive:
            pid = rng.choice(alive)
            os.kill(pid, signal.SIGKILL)
            kills.append(pid)


async def soak(args: argparse.Namespace, base: str) -> tuple[dict, list, float]:
    done = asyncio.Event()
    kills: list = []
    kill_task = asyncio.create_task(killer(base, args.kill_every, done, kills))
    started = time.monotonic()
    outcome = await load(base + "/predict", args.requests, args.concurrency, args.client_timeout)
    elapsed = time.monotonic() - started
    done.set()
    await kill_task
    return outcome, kills, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--kill-every", type=float, default=2.0, help="seconds between worker SIGKILLs")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--delay-ms", type=float, default=20.0, help="time each batch takes, like a model")
    parser.add_argument("--max-queue-size", type=int, default=1024, help="past it, requests get 429 (overload)")
    parser.add_argument("--client-timeout", type=float, default=60.0, help="no answer after this is 'hung'")
    parser.add_argument("--http-workers", type=int, default=1, help="HTTP front processes (HttpWorkers)")
    hostile = parser.add_argument_group("--hostile")
    hostile.add_argument("--hostile", action="store_true",
                         help="also drain and restart the server, keep slow clients and send malformed requests")
    hostile.add_argument("--restart-every", type=float, default=8.0,
                         help="seconds of serving between a restart and the next SIGTERM")
    hostile.add_argument("--slow-clients", type=int, default=32, help="slowloris and stalled-body connections")
    hostile.add_argument("--slow-max-life", type=float, default=60.0,
                         help="a slow connection the server has not cut by then is closed and counted")
    hostile.add_argument("--slow-uploads", type=int, default=0,
                         help="also this many clients sending good requests with a body that trickles in")
    hostile.add_argument("--malformed-every", type=int, default=20, help="one request in this many is malformed")
    hostile.add_argument("--retry-pause", type=float, default=0.1,
                         help="mean pause (s) before sending again a request answered 429/503 or refused")
    hostile.add_argument("--retry-for", type=float, default=60.0,
                         help="a request still 429/503 or refused after this many seconds is given up")
    hostile.add_argument("--max-seconds", type=float, default=300.0, help="no request is begun after this")
    args = parser.parse_args()
    if args.hostile:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import soak_hostile

        sys.exit(soak_hostile.run(args))

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    with config:
        json.dump({"Handle": "easyserve.builtin:Echo", "HandleArgs": {"delay_ms": args.delay_ms}, "GPUs": "cpu",
                   "ProcessPerGPU": args.workers, "Port": port, "MaxBatchSize": 16,
                   "MaxQueueSize": args.max_queue_size, "HttpWorkers": args.http_workers}, config)  # JSON is YAML
    server = subprocess.Popen(["easyserve", "run", config.name, "--log-level", "warning"],
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if get_json(base + "/ready").get("ready"):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                sys.exit("server did not come up:\n" + (server.stderr.read() if server.poll() is not None else ""))
            time.sleep(0.1)
        rss_start = rss_mb(server.pid)
        outcome, kills, elapsed = asyncio.run(soak(args, base))
        stats = get_json(base + "/stats")
        rss_end = rss_mb(server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        log = server.communicate(timeout=60)[1]
        os.unlink(config.name)

    sent = args.requests
    lines = [
        f"sent {sent:,} at concurrency {args.concurrency} in {elapsed:.1f}s ({sent / elapsed:,.0f} req/s), "
        f"{len(kills)} worker SIGKILLs ({args.kill_every:g}s apart), {stats['restarts']} restarts",
        f"answered {outcome['answered']:,} · 200: {outcome['status'][200]:,} · correct: {outcome['correct']:,} · "
        f"lost: {outcome['lost']} · hung: {outcome['hung']}",
        "errors by status: "
        + (", ".join(f"{s}: {n}" for s, n in sorted(outcome["status"].items()) if s != 200) or "none"),
        f"server memory (RSS): {rss_start:.1f} MB at start, {rss_end:.1f} MB at end",
    ]
    for status, messages in sorted(outcome["errors"].items()):
        for message in sorted(messages):
            lines.append(f"  {status}: {message}")
    print("\n".join(lines))
    if server.returncode not in (0, None):
        print("server log:\n" + log)


if __name__ == "__main__":
    main()
