"""Deadlines for blocking HTTP calls (:class:`easyserve.Client`'s, and the bench's reads of ``/stats``):
a socket's timeout bounds each read and write alone, so a server that sends a byte now and then could
hold a call for ever."""

from __future__ import annotations

import http.client
import math
import os
import socket
import threading
import time

__all__ = ["DEADLINES", "Deadlines"]


class Deadlines:
    """Ends the requests of blocking calls that outlive their deadline: a socket's timeout bounds each
    read and write alone, so a server that sends a byte now and then could hold a call for ever. One
    thread, started with the first call, shuts a late connection down, and the call that waits on it
    raises :class:`~easyserve.errors.Timeout`. The thread ends once no call has been under way for a
    while, so a client dropped without ``close()`` leaves nothing running. Every client of a process
    shares one (:data:`DEADLINES`): one each, a client made for each call (``Client(url).predict(x)``
    in a loop) left a thread behind it for its timeout and ``LINGER_S`` more, thousands at a time."""

    LINGER_S = 10.0  # how long the thread waits for another call before it ends

    def __init__(self) -> None:
        self._reset()
        # a forked child has the thread's state, not the thread (nor maybe the lock's holder): its own,
        # made at the fork, in the one thread there is then. Made at its first call, two threads could
        # each make one, and the first one's call lost its deadline.
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        # each call's connection: its deadline, and its socket once the answer may own it
        self._watched: dict[http.client.HTTPConnection, tuple[float, socket.socket | None]] = {}
        self._shut: set[http.client.HTTPConnection] = set()  # shut down at their deadline, not yet forgotten
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._wakes_at = math.inf  # when the thread looks next, unless woken

    def watch(self, connection: http.client.HTTPConnection, deadline: float, sock: socket.socket | None = None) -> None:
        """Shut ``connection`` down at ``deadline`` (``sock``: its socket, which http.client hands to an
        answer that ends when the connection closes, leaving the connection's ``sock`` None)."""
        if deadline == math.inf:  # no timeout
            return
        with self._changed:
            self._watched[connection] = (deadline, sock)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="easyserve-client-deadlines", daemon=True)
                self._thread.start()
            elif deadline < self._wakes_at:  # calls of one timeout come due in order: seldom
                self._changed.notify()

    def forget(self, connection: http.client.HTTPConnection) -> bool:
        """Stop watching ``connection``; whether its deadline came first, and it was shut down."""
        with self._changed:
            self._watched.pop(connection, None)
            late = connection in self._shut
            self._shut.discard(connection)
            return late

    def _run(self) -> None:
        changed = self._changed  # its own, whatever a fork of this process makes
        with changed:
            while True:
                now = time.monotonic()
                for connection, (deadline, sock) in list(self._watched.items()):
                    if deadline > now:
                        continue
                    sock = sock or connection.sock
                    if sock is None:  # still connecting (a name lookup): once it has a socket
                        self._watched[connection] = (now + 0.01, None)
                    else:
                        del self._watched[connection]
                        self._shut.add(connection)
                        _shut_down(sock)
                if self._watched:
                    self._wakes_at = min(deadline for deadline, _ in self._watched.values())
                    changed.wait(max(0.0, self._wakes_at - now))
                    continue
                self._wakes_at = math.inf  # idle: any call wakes it
                if not changed.wait(self.LINGER_S) and not self._watched:
                    self._thread = None  # the next call starts another
                    return


DEADLINES = Deadlines()  # the process's: every Client's calls and the bench's reads of /stats


def _shut_down(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked on it; that thread closes it
    except OSError:
        pass
