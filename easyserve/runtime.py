"""The process a server runs in (the user's, or an HTTP front's): its event loop, and the limits and
descriptors serving needs of it."""

from __future__ import annotations

import asyncio
import logging
import os

log = logging.getLogger("easyserve")

MAX_OPEN_FILES = 1 << 20  # where the hard limit is unlimited


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
