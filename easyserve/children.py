"""Starting the server's child processes, workers and HTTP fronts, the one way.

Each is ``python -m MODULE SOCK_FD LIFELINE_FD SERVER_PID`` and gets:
- one end of a socket pair, for the server's messages (:mod:`easyserve.wire`);
- the read end of a "lifeline" pipe whose write end only the server holds: when the server dies,
  however it dies, the kernel closes that end and the child exits (see ``worker.die_with_parent``);
- stdout and stderr into one pipe that the server's event loop reads (:mod:`easyserve.logs`), never
  the server's own stderr, where a full pipe would block the child;
- SIGINT, SIGTERM and SIGHUP blocked until it has said what they do there (each child ignores
  them: the server alone decides when its children stop, and they die with it, the lifeline). A
  terminal's Ctrl-C, a notebook's interrupt and ``kill -TERM -PGID`` signal every process of the
  server's group, and a child still importing its modules died of them.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Mapping

__all__ = ["Child", "LIFELINES", "SOCKET_BUFFER", "cut_lifeline", "process_cpu_s", "start_child"]

PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)

# What a terminal, a notebook or a service manager sends to stop the server, and its children ignore.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

# Room in the socket pair for a whole batch of large requests (8 MiB, or what net.core.wmem_max and
# rmem_max allow: the kernel caps it). With the default (about 200 kB), a 1 MB request reached a
# worker in five writes, the worker waiting for the server process to be scheduled again between
# two, and two cores busy with two workers stood idle 3% of the time; with room for the whole
# request, 0.2% (benchmarks/RESULTS.md, "Where the cores go").
SOCKET_BUFFER = 8 * 2**20

# The write ends of every child's lifeline. A child this process forks (a notebook's multiprocessing,
# say) must not hold them, or workers would outlive a killed server for as long as that child lives.
LIFELINES: set[int] = set()


def _close_lifelines_in_child() -> None:
    for fd in LIFELINES:
        try:
            os.close(fd)
        except OSError:
            pass
    LIFELINES.clear()


os.register_at_fork(after_in_child=_close_lifelines_in_child)


@dataclasses.dataclass
class Child:
    """A started child: its process, this side of its socket pair, its lifeline's write end and the
    read end of its output pipe (each for the caller to hand on or close)."""

    proc: subprocess.Popen
    sock: socket.socket
    lifeline: int
    output: int


def start_child(module: str, env: Mapping[str, str]) -> Child:
    """Start ``python -m module`` with ``env`` (less the API key, and with this package importable)."""
    env = dict(env)
    env.pop("EASYSERVE_API_KEY", None)  # a handle (or what it runs) has no business with the server's key
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"  # a print() reaches the log when it happens, not at exit
    fds: list[int] = []  # the pipes' ends, until each is handed on or closed
    ours, theirs = socket.socketpair()
    for sock in (ours, theirs):
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
            except OSError:  # Linux caps the size; some systems refuse one past their limit: keep theirs
                pass
    try:
        fds += os.pipe()  # the lifeline: read end for the child, write end held by this process
        fds += os.pipe()  # the child's stdout and stderr
        life_read, life_write, out_read, out_write = fds
        # the child inherits this thread's signal mask through fork and exec, and unblocks them itself
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", module, str(theirs.fileno()), str(life_read), str(os.getpid())],
                pass_fds=(theirs.fileno(), life_read), env=env, stdin=subprocess.DEVNULL,
                stdout=out_write, stderr=out_write,
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    except BaseException:
        ours.close()
        for fd in fds:
            os.close(fd)
        raise
    finally:
        theirs.close()
    os.close(life_read)
    os.close(out_write)
    LIFELINES.add(life_write)
    return Child(proc, ours, life_write, out_read)


def process_cpu_s(pid: int) -> float | None:
    """A process's user and system CPU seconds as the kernel counts them (a zombie's too, until it is
    reaped: what a process spent after its last report); ``None`` where there is no ``/proc``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # the name, in parentheses, may hold anything
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    except (OSError, IndexError, ValueError):
        return None


CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cut_lifeline(fd: int) -> None:
    """Close this process's end of a child's lifeline: the child exits once it reads the end."""
    LIFELINES.discard(fd)
    os.close(fd)
