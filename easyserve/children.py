"""Starting the server's child processes, workers and HTTP fronts, the one way.

Each is ``python -m MODULE SOCK_FD LIFELINE_FD SERVER_PID`` and gets:
- one end of a socket pair, for the server's messages (:mod:`easyserve.wire`);
- the read end of a "lifeline" pipe whose write end only the server holds: when the server dies,
  however it dies, the kernel closes that end and the child exits (see ``worker.die_with_parent``);
- stdout and stderr into one pipe that the server's event loop reads (:mod:`easyserve.logs`), never
  the server's own stderr, where a full pipe would block the child;
- a session of its own, so that what signals the server's process group reaches the server alone:
  a notebook's interrupt (``killpg`` of the kernel's group), meant for one cell, ended the processes a
  running handle had started (a process pool, a sidecar) and left every later request failing; a
  terminal's Ctrl-C ended them in the middle of the drain that answers the requests in flight. Each
  child dies with the server all the same (the lifeline, and ``PR_SET_PDEATHSIG``), and a worker
  ends what its handle started on its way out;
- SIGINT, SIGTERM and SIGHUP blocked until it has said what they do there (each child ignores
  them: the server alone decides when its children stop). systemd's stop signals every process of
  the service, and a child still importing its modules died of it.

What a child starts (a handle's helper process) ends with it: :class:`Descendants` finds those
processes in ``/proc`` and ends them, the worker itself on its way out and the server when it kills a
worker (:func:`kill_with_descendants`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping

__all__ = ["Child", "Descendants", "LIFELINES", "SOCKET_BUFFER", "cut_lifeline", "end_group", "keep_from_forks",
           "kill_with_descendants", "process_cpu_s", "release_to_forks", "start_child"]

PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)

# What a terminal, a notebook or a service manager sends to stop the server, and its children ignore.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# what has a worker write its threads' stacks to its stacks file (see stacks_file), before it is killed as stuck
STACKS_SIGNAL = getattr(signal, "SIGUSR2", None)
MAX_STACKS = 65536  # bytes of a stacks file read


def stacks_file() -> int | None:
    """A file in memory (Linux's memfd) for a worker to write its threads' stacks to on
    :data:`STACKS_SIGNAL`, which this process reads (:func:`read_stacks`); ``None`` where there is none."""
    if STACKS_SIGNAL is None:
        return None
    try:
        return os.memfd_create("easyserve-stacks")
    except (AttributeError, OSError):
        return None


def read_stacks(fd: int) -> str:
    """What a worker wrote to its stacks file, as text (a dump, the last part cut past MAX_STACKS bytes)."""
    try:
        data = os.pread(fd, MAX_STACKS + 1, 0)
    except OSError:
        return ""
    text = data[:MAX_STACKS].decode("utf-8", "replace").rstrip()
    return text + "\n[... cut]" if len(data) > MAX_STACKS else text


# Room in the socket pair for a whole batch of large requests (8 MiB, or what net.core.wmem_max and
# rmem_max allow: the kernel caps it). With the default (about 200 kB), a 1 MB request reached a
# worker in five writes, the worker waiting for the server process to be scheduled again between
# two, and two cores busy with two workers stood idle 3% of the time; with room for the whole
# request, 0.2% (benchmarks/RESULTS.md, "Where the cores go").
SOCKET_BUFFER = 8 * 2**20

# The write ends of every child's lifeline. A child this process forks (a notebook's multiprocessing,
# say) must not hold them, or workers would outlive a killed server for as long as that child lives.
LIFELINES: set[int] = set()


# Sockets of this process that a child it forks must not hold open either, by descriptor, with the
# (device, inode) each had when named: a descriptor closed and used again since is another's, and kept.
# A notebook's multiprocessing pool or DataLoader, forked while a server ran, held its port after stop()
# (a client waited where it would have been refused, and the next start found the port in use) and its
# connections open after the server closed them (a client saw no end, and sent on them into nothing).
_SOCKETS: dict[int, tuple[int, int]] = {}


def keep_from_forks(fd: int) -> None:
    """Name the socket ``fd`` as one a forked child must not hold (see :data:`_SOCKETS`)."""
    try:
        stat = os.fstat(fd)
    except OSError:
        return
    _SOCKETS[fd] = (stat.st_dev, stat.st_ino)


def release_to_forks(fd: int) -> None:
    """The socket ``fd`` is about to close: forget it (see :func:`keep_from_forks`)."""
    _SOCKETS.pop(fd, None)


def _let_go_in_child() -> None:
    for fd in LIFELINES:
        try:
            os.close(fd)
        except OSError:
            pass
    LIFELINES.clear()
    if not _SOCKETS:
        return
    # Not closed: the socket objects the child inherited would close the descriptor again some day, by
    # then maybe another file's. /dev/null takes the descriptor's place, and this process's socket is let go.
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        for fd, named in list(_SOCKETS.items()):
            try:
                stat = os.fstat(fd)
                if (stat.st_dev, stat.st_ino) == named:
                    os.dup2(null, fd, inheritable=False)
            except OSError:
                pass
    finally:
        os.close(null)
    _SOCKETS.clear()


os.register_at_fork(after_in_child=_let_go_in_child)


RECORDS_FD_ENV = "EASYSERVE_RECORDS_FD"  # in a child's environment: the descriptor its records go to


@dataclasses.dataclass
class Child:
    """A started child: its process, this side of its socket pair, its lifeline's write end and the
    read ends of its output pipe and its records' (each for the caller to hand on or close)."""

    proc: subprocess.Popen
    sock: socket.socket
    lifeline: int
    output: int
    records: int  # the read end of the pipe of its own records (logs.open_records)


# How a child runs ``module`` (its first argument) on Python 3.10 as ``python -m`` does, less the current
# folder that ``-m`` (and ``-c``) put first on the path (see module_command).
RUN_MODULE = ("import sys\n"
              "if sys.path[:1] == ['']: del sys.path[0]\n"
              "import runpy\n"
              "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)\n")


def module_command(module: str) -> list[str]:
    """The command that runs ``module`` as ``python -m`` does, but for the current folder first on its path:
    a ``queue.py`` or ``numpy.py`` in the folder a server was started from (a user's own, or one planted
    in a shared folder) ran in every worker and HTTP front in place of the library. ``-P`` from Python
    3.11 (``ps`` shows ``python -P -m easyserve.worker``); on 3.10 (Ubuntu 22.04's Python), :data:`RUN_MODULE`.
    A handle's module there is still found: the worker puts that folder last on its path."""
    if sys.version_info >= (3, 11):
        return [sys.executable, "-P", "-m", module]
    return [sys.executable, "-c", RUN_MODULE, module]


def start_child(module: str, env: Mapping[str, str], pass_fds: tuple[int, ...] = ()) -> Child:
    """Start ``module`` as ``python -m`` would, less the current folder on its path (:func:`module_command`),
    with ``env`` (less the API key, and with this package importable), and ``pass_fds`` open in it
    besides its own."""
    env = dict(env)
    env.pop("EASYSERVE_API_KEY", None)  # a handle (or what it runs) has no business with the server's key
    # less its empty entries, which name the current folder: one that was removed since (a deploy replaced
    # the release folder) ended Python as it began ("failed to make path absolute"), and -P keeps that
    # folder off the path anyway (module_command)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, *env.get("PYTHONPATH", "").split(os.pathsep)) if p)
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
        fds += os.pipe()  # its own records (logs.open_records)
        life_read, life_write, out_read, out_write, records_read, records_write = fds
        env[RECORDS_FD_ENV] = str(records_write)
        # the child inherits this thread's signal mask through fork and exec, and unblocks them itself
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            proc = subprocess.Popen(
                [*module_command(module), str(theirs.fileno()), str(life_read), str(os.getpid())],
                pass_fds=(theirs.fileno(), life_read, records_write, *pass_fds), env=env, stdin=subprocess.DEVNULL,
                stdout=out_write, stderr=out_write, start_new_session=True,
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
    os.close(records_write)
    LIFELINES.add(life_write)
    return Child(proc, ours, life_write, out_read, records_read)


def process_cpu_s(pid: int) -> float | None:
    """A process's user and system CPU seconds as the kernel counts them (a zombie's too, until it is
    reaped: what a process spent after its last report); ``None`` where there is no ``/proc``."""
    fields = stat_fields(pid)
    try:
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS if fields is not None else None
    except (IndexError, ValueError):
        return None


def is_stopped(pid: int) -> bool:
    """Whether a process is stopped (state T: SIGSTOP, job control; t: a debugger's), as ``/proc`` says;
    false where it cannot be read."""
    fields = stat_fields(pid)
    return bool(fields) and fields[0] in (b"T", b"t")


def pids() -> list[int]:
    """Every process's pid, as ``/proc`` lists them; none where there is no ``/proc`` (Linux alone)."""
    try:
        return [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return []


def _stat(pid: int) -> tuple[bytes, list[bytes]] | None:
    """``/proc/<pid>/stat``: the process's name and the fields after it (its state first); ``None``
    where it cannot be read (no ``/proc``, or the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            head, sep, rest = f.read().rpartition(b")")  # the name, in parentheses, may hold anything
    except OSError:
        return None
    return (head.partition(b"(")[2], rest.split()) if sep else None


def stat_fields(pid: int) -> list[bytes] | None:
    """The fields of ``/proc/<pid>/stat`` after the process's name (see :func:`_stat`)."""
    stat = _stat(pid)
    return None if stat is None else stat[1]


CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cut_lifeline(fd: int) -> None:
    """Close this process's end of a child's lifeline: the child exits once it reads the end."""
    LIFELINES.discard(fd)
    os.close(fd)


# How long the processes a worker started get to end after SIGTERM before they are killed: well within
# the server's wait for a worker told to stop (pool.STOP_GRACE_S), as the worker waits for them first.
DESCENDANTS_GRACE_S = 2.0

# multiprocessing's own helpers exit by themselves once their parent has (their pipe to it closes), and
# only then do their work: the resource tracker unlinks the shared memory and semaphores left behind.
# It ignores SIGTERM, so a SIGKILL would have been its end, with that work undone. Their children are not spared.
_EXIT_WITH_PARENT = (b"multiprocessing.resource_tracker", b"multiprocessing.forkserver")


class Descendants:
    """The processes below process ``pid`` (its children, theirs...) as found now, each held by a pidfd
    where Linux has them, so that a signal reaches that process and never a later one given its pid; and
    else known by its start time, checked before each signal. Found in ``/proc`` (Linux); elsewhere none.

    >>> Descendants(os.getpid()).end()  # SIGTERM, a grace, then SIGKILL for those left
    """

    def __init__(self, pid: int, group: bool = False) -> None:
        """With ``group``, the processes of process group ``pid`` instead (a worker's session, once the
        worker has gone: see :func:`end_group`)."""
        self._found: list[tuple[int, int, int | None]] = []  # (pid, start time, pidfd)
        if group:
            for member in _group(pid):
                self._hold(member, _start_time(member))
            return
        todo = [pid]
        while todo:
            parent = todo.pop()
            for child in _children(parent):
                start = _start_time(child, parent)
                if start is None:  # gone, or no longer below ``parent``: its pid may be another's now
                    continue
                todo.append(child)
                self._hold(child, start)

    def _hold(self, pid: int, start: int | None) -> None:
        """Hold ``pid``, which started at ``start``, unless it has ended or exits with its parent anyway."""
        if start is None or _exits_with_parent(pid):
            return
        try:
            fd: int | None = os.pidfd_open(pid)
        except (AttributeError, OSError):
            fd = None
        if _start_time(pid) != start:  # it ended before its pidfd was taken
            if fd is not None:
                os.close(fd)
            return
        self._found.append((pid, start, fd))

    def __len__(self) -> int:
        return len(self._found)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to each that still runs."""
        for pid, start, fd in self._found:
            try:
                if fd is not None:
                    signal.pidfd_send_signal(fd, sig)
                elif _start_time(pid) == start:
                    os.kill(pid, sig)
            except OSError:  # it has ended
                pass

    def running(self) -> bool:
        """Whether any of them still runs (one that exited and waits to be reaped does not)."""
        for pid, start, fd in self._found:
            if fd is not None:
                poll = select.poll()  # not select(), which refuses a descriptor past 1023 (a busy server's)
                poll.register(fd, select.POLLIN)
                if not poll.poll(0):  # a pidfd reads ready once its process exits
                    return True
            elif _start_time(pid) == start and not _zombie(pid):
                return True
        return False

    def kill(self) -> None:
        """SIGKILL those that still run, and let go of them (this object then holds none)."""
        self.signal(signal.SIGKILL)
        for _, _, fd in self._found:
            if fd is not None:
                os.close(fd)
        self._found = []

    def end(self, grace: float = DESCENDANTS_GRACE_S) -> None:
        """SIGTERM, then SIGKILL for those still running ``grace`` seconds later (blocks until then)."""
        if not self._found:
            return
        self.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.01)
        self.kill()

    def end_later(self, loop: asyncio.AbstractEventLoop) -> None:
        """:meth:`end` without blocking: SIGTERM now, SIGKILL ``DESCENDANTS_GRACE_S`` later on ``loop``."""
        self.signal(signal.SIGTERM)
        try:
            loop.call_later(DESCENDANTS_GRACE_S, self.kill)
        except RuntimeError:  # the loop is closed (the interpreter exits): wait here instead
            self.end()

    async def ended(self, grace: float = DESCENDANTS_GRACE_S) -> None:
        """:meth:`end` for an event loop, less the SIGTERM (sent already): wait, then SIGKILL those left."""
        deadline = time.monotonic() + grace
        while self._found and self.running() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self.kill()


def kill_with_descendants(proc: subprocess.Popen, loop: asyncio.AbstractEventLoop) -> Descendants:
    """SIGKILL ``proc`` (a worker this process started) and end the processes it started: SIGTERM now,
    SIGKILL ``DESCENDANTS_GRACE_S`` later. They are found first, with ``proc`` stopped so that it starts
    no more meanwhile: once it is dead they belong to another parent and are no longer told from others."""
    tree = None
    if proc.poll() is None:  # not reaped yet, so its pid is still its own
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGSTOP)
        tree = Descendants(proc.pid)
    proc.kill()
    if tree is None:
        return Descendants(-1)
    tree.end_later(loop)
    return tree


REAPER_NAME = b"easyserve-reap"  # what a worker's reaper is called (see worker._start_reaper)


def reap_orphaned_reapers() -> None:
    """Reap the workers' reapers that died as orphans given to this process. A reaper dies with its
    worker (PR_SET_PDEATHSIG); a worker killed (at a stop while it loaded its model, past StartTimeoutS,
    by the kernel's out-of-memory killer) cannot reap it first, and the kernel gives it to the nearest
    subreaper. Where that is this process (a container's PID 1 with no init, a process set as a
    subreaper), each was left a zombie for good: one more for each worker killed so."""
    me = str(os.getpid()).encode()
    for pid in pids():
        stat = _stat(pid)
        if stat is not None and stat[0] == REAPER_NAME and stat[1][:2] == [b"Z", me]:
            with contextlib.suppress(OSError):  # (ChildProcessError: reaped meanwhile)
                os.waitpid(pid, os.WNOHANG)


def end_group(pgid: int, loop: asyncio.AbstractEventLoop) -> Descendants:
    """End what is left of process group ``pgid``, a worker's session, once the worker has exited and
    been reaped: SIGTERM now, SIGKILL ``DESCENDANTS_GRACE_S`` later. A worker that dies by itself (a
    segfault, the OOM killer, ``os._exit``) ends nothing on its way out, and the processes its handle
    started (a process pool, a sidecar) are then below PID 1, where no walk from the worker finds
    them: they ran on for good, a set more for each crash (a GPU's memory held by each). So did a
    process a shell put in the background (``os.system("x &")``), whose parent had exited, at every
    stop. They stay in the worker's process group all the same (the pid of a group with members left
    is not given to another process), unless they made a session of their own."""
    left = Descendants(pgid, group=True)
    if len(left):
        left.end_later(loop)
    return left


def _group(pgid: int) -> list[int]:
    """The pids of the processes in process group ``pgid`` (Linux: from ``/proc``; elsewhere none)."""
    group, found = str(pgid).encode(), []
    for pid in pids():
        fields = stat_fields(pid)
        if fields is not None and len(fields) > 2 and fields[2] == group and fields[0] not in b"ZX":
            found.append(pid)
    return found


def _children(pid: int) -> list[int]:
    """The pids of ``pid``'s children: its threads' lists, or where the kernel keeps none (built
    without ``CONFIG_PROC_CHILDREN``), every process whose parent it is."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found: list[int] = []
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", "rb") as f:
                found += (int(child) for child in f.read().split())
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{task}"):
                continue  # the thread ended
            return [p for p in pids() if _start_time(p, pid) is not None]
        except (OSError, ValueError):
            continue
    return found


def _start_time(pid: int, parent: int | None = None) -> int | None:
    """When ``pid`` started (clock ticks since boot), or ``None`` if it has ended, or if its parent is not
    ``parent`` (when given)."""
    fields = stat_fields(pid)
    if fields is None or len(fields) < 20 or (parent is not None and int(fields[1]) != parent):
        return None
    return int(fields[19])


def _zombie(pid: int) -> bool:
    fields = stat_fields(pid)
    return fields is None or fields[0] in (b"Z", b"X")


def _exits_with_parent(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return any(marker in cmdline for marker in _EXIT_WITH_PARENT)
