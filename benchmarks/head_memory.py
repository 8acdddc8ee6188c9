"""What clients that never finish their request headers cost the server process's memory.

Each of ``--connections`` connections sends a request line and ``--headers`` headers of ``--size``
bytes each (every line, and their count, within aiohttp's own limits), and never the blank line that
ends them. The server process's resident memory is sampled every 50 ms while they are open; a server
that bounds a request's head answers 431 and closes each connection early::

    python benchmarks/head_memory.py                          # this checkout's code
    PYTHONPATH=/tmp/old python benchmarks/head_memory.py      # another copy of the package, to compare
"""

from __future__ import annotations

import argparse
import os
import socket
import threading
import time

import easyserve
from easyserve import Server


def rss_mb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(status.read().split("VmRSS:")[1].split()[0]) // 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--headers", type=int, default=100)
    parser.add_argument("--size", type=int, default=8000, help="bytes of each header's value")
    args = parser.parse_args()
    head = b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"".join(
        b"X-Filler-%d: %s\r\n" % (i, b"v" * args.size) for i in range(args.headers))
    with Server(handle="easyserve.builtin:Echo", GPUs="cpu", Port=0) as server:
        pid, before, peak, done = os.getpid(), rss_mb(os.getpid()), [0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss_mb(pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        opened, cut = [], 0
        for _ in range(args.connections):
            sock = socket.create_connection(("127.0.0.1", server.port))
            try:
                sock.sendall(head)
                opened.append(sock)
            except OSError:  # the server closed it before the whole head was sent
                cut += 1
                sock.close()
        time.sleep(2)
        done.set()
        sampler.join()
        for sock in opened:
            sock.close()
        print(f"easyserve from {os.path.dirname(easyserve.__file__)}")
        print(f"{args.connections} connections x {args.headers} headers x {args.size} B, never ended "
              f"({cut} cut while sending): server process RSS {before} MB before, {peak[0]} MB at most, "
              f"{rss_mb(pid)} MB 2 s after the last was sent")


if __name__ == "__main__":
    main()
