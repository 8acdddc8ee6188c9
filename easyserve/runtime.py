"""The process a server runs in (the user's, or an HTTP front's): its event loop, and the limits and
descriptors serving needs of it."""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import math
import os
from typing import Callable

log = logging.getLogger("easyserve")

MAX_OPEN_FILES = 1 << 20  # where the hard limit is unlimited

# How often a serving process counts its open files, and the share of its limit at which it warns
# (once, until the count falls back under the second share).
OPEN_FILES_CHECK_S = 2.0
OPEN_FILES_LIST_EVERY = 15  # checks: far from the limit, the files are listed this much less often
OPEN_FILES_WARN = 0.9
OPEN_FILES_CLEAR = 0.75


# A timer this late found its event loop held past it (the process stopped, a paused container or
# machine, a debugger): what came meanwhile waits unread, as a loop runs its due timers before it reads
# its sockets. Its deadline is looked at again after a read, RECHECK_S later.
LATE_S = 0.25
RECHECK_S = 0.1


HOLD_TICK_S = 0.25  # how often a HoldMeter looks at its loop's clock
HOLDS_KEPT = 256  # the last holds a HoldMeter keeps the times of (each over LATE_S: seldom many within TimeoutS)


def held_for(loop: asyncio.AbstractEventLoop, due: float) -> float:
    """How long ``loop`` was held past a timer due at ``due``, as it runs: 0 unless over :data:`LATE_S`."""
    late = loop.time() - due
    return late if late > LATE_S else 0.0


class HoldMeter:
    """How long an event loop has been held in all (its process stopped: a paused machine or container, a
    debugger, or a loop blocked): a tick every :data:`HOLD_TICK_S` that runs over :data:`LATE_S` late adds
    its lateness. A timer's own lateness says only how far past it a hold ended, not how long the hold
    was: a batch begun before a 3 s pause got back only the part after its limit, and was killed as stuck
    with a second of its work done."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.total = 0.0  # seconds held, summed
        self.ended = -math.inf  # when the last hold counted ended (loop time)
        self.spans: collections.deque[tuple[float, float]] = collections.deque(maxlen=HOLDS_KEPT)  # (began, ended)
        self._due = loop.time() + HOLD_TICK_S
        self._tick = loop.call_at(self._due, self._ticked)

    def now(self) -> float:
        """:attr:`total`, a hold that has just ended counted (a timer due in it may run before the tick)."""
        now = self.loop.time()
        late = now - self._due
        if late > LATE_S:
            self.total += late
            self.spans.append((self._due, now))
            self.ended = self._due = now  # counted up to now: the tick due in the hold adds nothing
        return self.total

    def between(self, since: float, until: float) -> float:
        """How long the loop was held between loop times ``since`` and ``until`` (of the holds kept)."""
        self.now()
        held = 0.0
        for began, ended in reversed(self.spans):
            if ended <= since:
                break
            held += max(0.0, min(ended, until) - max(began, since))
        return held

    def recently(self, within: float = 1.0) -> bool:
        """Whether the loop was held within the last ``within`` seconds: what came meanwhile may wait unread."""
        self.now()
        return self.loop.time() - self.ended <= within

    def _ticked(self) -> None:
        self.now()
        self._due = self.loop.time() + HOLD_TICK_S
        self._tick = self.loop.call_at(self._due, self._ticked)

    def close(self) -> None:
        self._tick.cancel()
        self._due = math.inf  # nothing counted from now on


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop where it is installed, else asyncio's.

    uvloop halves the loop's share of a request's latency (a pipe round trip to a worker: 45 us
    against 85 us with asyncio's default loop on a 2-core machine)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def prepare_process() -> None:
    """Standard streams open and the open-file limit raised, before the process serves."""
    _open_standard_streams()
    _raise_open_file_limit()
    tell_pid_1()


_told_pid_1 = False


def tell_pid_1() -> None:
    """Warn, once, where this process is a PID namespace's first (a container started without an init):
    the orphans of every process in it become its children, which Python never collects. A handle that ran
    ``sh -c "tool &"`` left one zombie a request, each counted against the container's process limit."""
    global _told_pid_1
    if os.getpid() == 1 and not _told_pid_1:
        _told_pid_1 = True
        log.warning("easyserve runs as process 1 (a container started without an init): processes left behind by "
                    "what the handle runs are not collected when they end, and pile up as zombies against the "
                    "container's process limit; start it under an init: `docker run --init`, or tini as the "
                    "Dockerfile does")


def _raise_open_file_limit() -> None:
    # Each connection is a descriptor; a soft limit of 1024 (a common default) would refuse clients
    # long before the machine runs short. Raise it to the hard limit, as servers commonly do.
    try:
        import resource
    except ImportError:  # Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else MAX_OPEN_FILES
    if soft == resource.RLIM_INFINITY or soft >= target:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:  # e.g. macOS refuses more than kern.maxfilesperproc
        log.debug("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
    else:
        log.debug("raised the open-file limit from %d to %d", soft, target)


class OpenFilesWatch:
    """Warns when this process nears its open-file limit, and again once it is back under it.

    Past the limit the event loop cannot accept a connection: libuv accepts it and closes it at
    once, to keep the listening socket from waking the loop in a busy loop, and nothing reaches the
    log. A client sees its connection reset, a proxy marks the server down, and the log of the server
    says nothing. This is the line that tells its operator why, and what to raise.

    ``connections()`` says how many of the files are clients' connections, for the message.
    """

    def __init__(self, connections: Callable[[], int], interval: float = OPEN_FILES_CHECK_S) -> None:
        self._connections = connections
        self._interval = interval
        self._timer: asyncio.TimerHandle | None = None
        self._warned = False
        self._others = 0  # the files open at the start, before any connection: a floor for the count
        self._checks = 0

    def start(self) -> None:
        others = open_files()
        if others is not None:  # where a process cannot count its files, there is nothing to watch
            self._others = others
            self._timer = asyncio.get_running_loop().call_later(self._interval, self._check)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        limit = open_file_limit()
        self._checks += 1
        # Listing the files costs about 0.5 us each, 50 ms on the loop at 100,000: while the connections
        # and the files open at the start are far from the limit, only every OPEN_FILES_LIST_EVERY
        # checks, for the files opened since by other code of this process (the workers' pipes, a
        # notebook's own files, a leak)
        far = not self._warned and self._connections() + self._others < OPEN_FILES_WARN * (limit or 0) / 2
        used = None if limit is None or (far and self._checks % OPEN_FILES_LIST_EVERY) else open_files()
        if used is not None and limit is not None:
            if not self._warned and used >= OPEN_FILES_WARN * limit:
                self._warned = True
                log.warning(
                    "%d of the %d files this process may open are open (%d of them connections): past the "
                    "limit, new connections are closed unanswered. Raise the limit (ulimit -n; LimitNOFILE= "
                    "under systemd; --ulimit nofile= in Docker), or lower KeepAliveTimeoutS so that idle "
                    "connections close sooner", used, limit, self._connections())
            elif self._warned and used < OPEN_FILES_CLEAR * limit:
                self._warned = False
                log.warning("open files back to %d of %d: new connections are accepted again", used, limit)
        self._timer = asyncio.get_running_loop().call_later(self._interval, self._check)


def open_files() -> int | None:
    """How many descriptors this process holds, where the system lists them (Linux, macOS).

    At the limit, listing them takes one descriptor more than there is: the count is then the limit."""
    for listing in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(listing)) - 1  # less the one that lists them
        except OSError as exc:
            if exc.errno == errno.EMFILE:
                return open_file_limit()
    return None


def open_file_limit() -> int | None:
    """The open-file limit this process runs under (its soft limit), if it has one."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def _open_standard_streams() -> None:
    # A process started with stdin, stdout or stderr closed would hand those numbers to the event
    # loop's own descriptors, which libuv refuses (it aborts); fill them with /dev/null first.
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
