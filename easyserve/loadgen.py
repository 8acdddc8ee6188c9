"""The client side of ``easyserve bench``: a process that keeps a number of requests in flight.

:func:`easyserve.bench` starts one or more of these (``python -m easyserve.loadgen``) and steers
them over standard input and output, in frames of a length and a pickle of plain values (tuples,
dicts, bytes), so the two sides share no classes:

- it sends the job first: ``{"url", "requests": [(body, headers), ...], "concurrency", "timeout_s"}``;
- the process answers ``("ready",)`` once its connection pool exists;
- ``("warmup", seconds)``: it runs the loop that long, waits for the requests in flight and answers
  ``("warm", tally)``; the tally's CPU time tells whether this process was too busy to keep up;
- ``("measure", seconds or None, requests or None)``: the same, sending ``("progress", requests,
  errors)`` every quarter second and then ``("done", tally)`` once every request it sent is answered;
- ``("quit",)``, or its standard input closing (the parent died), ends it.

Each of the ``concurrency`` users sends a request, waits for its answer and sends the next: a
closed loop, so the load follows the server's pace and the queue never grows without bound. Nothing
is encoded during the run: the bodies come ready-made and are sent in turn.
"""

from __future__ import annotations

import array
import asyncio
import collections
import math
import os
import pickle
import struct
import sys
import threading
import time
from typing import Any, BinaryIO

import aiohttp

LENGTH = struct.Struct("!Q")
PROGRESS_S = 0.25  # how often the parent hears how far a measurement is
RETRY_PAUSE_S = 0.01  # after a failed connection: a server that is down is not hammered in a tight loop


def write(stream: BinaryIO, message: Any) -> None:
    """One frame: the pickle's length, then the pickle."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(LENGTH.pack(len(data)) + data)
    stream.flush()


def read(stream: BinaryIO) -> Any:
    """The next frame's value; ``EOFError`` when the stream has ended."""
    head = stream.read(LENGTH.size)
    if len(head) < LENGTH.size:
        raise EOFError
    size = LENGTH.unpack(head)[0]
    data = stream.read(size)
    if len(data) < size:
        raise EOFError
    return pickle.loads(data)


class Loop:
    """The closed loop of one process: ``concurrency`` users over one aiohttp connection pool."""

    def __init__(self, job: dict, session: aiohttp.ClientSession, report: Any) -> None:
        self.url = job["url"]
        self.requests = job["requests"]
        self.concurrency = job["concurrency"]
        self.session = session
        self.report = report  # sends a message to the parent
        self.sent = 0

    async def run(self, seconds: float | None, tickets: int | None, progress: bool) -> dict:
        """Run until ``seconds`` have passed or ``tickets`` requests are sent, whichever comes first;
        return what was measured once every request sent has its answer."""
        latencies = array.array("d")  # seconds, of successful (2xx) answers
        statuses: collections.Counter = collections.Counter()
        failures: collections.Counter = collections.Counter()  # no HTTP answer, by exception
        end = math.inf if seconds is None else time.perf_counter() + seconds
        left = math.inf if tickets is None else tickets
        answered = errors = 0
        url, requests, session = self.url, self.requests, self.session

        async def user(first: int) -> None:
            nonlocal left, answered, errors
            turn = first  # users start at different bodies, so a mix of bodies is mixed at once
            while left > 0 and time.perf_counter() < end:
                left -= 1
                data, headers = requests[turn % len(requests)]
                turn += 1
                started = time.perf_counter()
                try:
                    async with session.post(url, data=data, headers=headers) as response:
                        await response.read()
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                    failures[_failure(exc)] += 1
                    answered += 1
                    errors += 1
                    await asyncio.sleep(RETRY_PAUSE_S)
                    continue
                took = time.perf_counter() - started
                answered += 1
                statuses[response.status] += 1
                if 200 <= response.status < 300:
                    latencies.append(took)
                else:
                    errors += 1

        async def tell() -> None:
            while True:
                await asyncio.sleep(PROGRESS_S)
                self.report(("progress", answered, errors))

        teller = asyncio.ensure_future(tell()) if progress else None
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            await asyncio.gather(*(user(i) for i in range(self.concurrency)))
        finally:
            if teller is not None:
                teller.cancel()
        return {"latencies": latencies.tobytes(), "statuses": dict(statuses), "failures": dict(failures),
                "seconds": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}


def _failure(exc: BaseException) -> str:
    """How a request got no answer, for the report: the exception's class (``ClientConnectorError``:
    refused; ``ServerDisconnectedError``: closed mid-request; ``TimeoutError``: past the timeout)."""
    if isinstance(exc, asyncio.TimeoutError):
        return "TimeoutError"
    return type(exc).__name__


async def serve(job: dict, commands: asyncio.Queue, report: Any) -> None:
    """Answer the parent's commands until ``quit``."""
    connector = aiohttp.TCPConnector(limit=job["concurrency"], limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=job["timeout_s"])
    # no cookie jar, no compression: the client should spend its time on requests, not on extras
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, cookie_jar=aiohttp.DummyCookieJar(),
                                     auto_decompress=False) as session:
        loop = Loop(job, session, report)
        report(("ready",))
        while True:
            command = await commands.get()
            if command[0] == "warmup":
                report(("warm", await loop.run(command[1], None, progress=False)))
            elif command[0] == "measure":
                report(("done", await loop.run(command[1], command[2], progress=True)))
            else:
                return


def main() -> None:
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print() must not corrupt the frames
    job = read(stdin)
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    commands: asyncio.Queue = asyncio.Queue()

    def listen() -> None:
        while True:
            try:
                command = read(stdin)
            except (EOFError, OSError):
                os._exit(0)  # the parent has gone: nobody wants the results
            loop.call_soon_threadsafe(commands.put_nowait, command)

    threading.Thread(target=listen, name="commands", daemon=True).start()
    loop.run_until_complete(serve(job, commands, lambda message: write(stdout, message)))
    loop.close()


if __name__ == "__main__":
    main()
