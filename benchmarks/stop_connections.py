"""Stops under clients that open a connection for every request: is each request answered or refused?

A client that opens a connection, sends its request and reads the answer meets a stopping server in
one of three ways: answered (200, or 503 while it drains), refused (no listening socket: it retries
elsewhere), or lost (the kernel accepted the connection, the request went out, and then it was
reset: the client cannot know whether it ran). A drain must never do the last.

Each round starts ``easyserve run`` and drives it with the test suite's own clients
(``tests/test_http_workers.py``: 8 threads, each asking for ``/health`` on a new connection as fast
as it is answered), sends SIGTERM to its process group after a second, and counts each client's
outcomes until its connection is refused. The server runs the easyserve that ``PYTHONPATH`` finds
first, so an older commit (in a worktree) is measured the same way::

    git worktree add /tmp/easyserve-before a150d10
    cd /tmp && PYTHONPATH=/tmp/easyserve-before python /path/to/benchmarks/stop_connections.py --rounds 10
    cd /tmp && PYTHONPATH=/path/to/easyserve python /path/to/benchmarks/stop_connections.py --http-workers 2
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_http_workers import fresh_connections_until_refused, served_from_the_shell  # noqa: E402

import easyserve  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--http-workers", type=int, default=1)
    args = parser.parse_args()
    print(f"serving from {Path(easyserve.__file__).parent.parent}, {args.http_workers} front(s)")
    total: collections.Counter = collections.Counter()
    losing = 0
    for i in range(args.rounds):
        with tempfile.TemporaryDirectory() as folder:
            with served_from_the_shell(Path(folder), HttpWorkers=args.http_workers) as (proc, url):
                outcomes = fresh_connections_until_refused(url, lambda: os.killpg(proc.pid, signal.SIGTERM))
                proc.wait(30)
        lost = sum(v for k, v in outcomes.items() if str(k).startswith("lost"))
        losing += lost > 0
        total.update(outcomes)
        print(f"round {i + 1}: {dict(outcomes)}", flush=True)
    lost = sum(v for k, v in total.items() if str(k).startswith("lost"))
    answered = sum(v for k, v in total.items() if isinstance(k, int))
    print(f"answered {answered:,}, refused {total['refused']:,}, lost {lost:,}; rounds losing any: "
          f"{losing} / {args.rounds}")


if __name__ == "__main__":
    main()
