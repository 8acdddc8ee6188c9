"""The signals a server run from the shell heeds (:meth:`Server.serve_forever`, ``easyserve run``).

- SIGINT or SIGTERM: serve on for ``ShutdownDelayS`` (not ready, each answer closing its connection),
  then drain and stop; one while workers still start abandons the start. A second one stops at once.
- SIGHUP: read the config file again and reload the handle; one while the server starts is acted on
  once it is ready.
- Under ``--supervise``, SIGUSR1: the guardian died; drain and stop, however often it comes.

Python runs a signal's handler in the main thread, between two of its bytecodes: so the main thread
never blocks for longer than :data:`SIGNAL_POLL_S` while a server runs.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

from .errors import StartupError

if TYPE_CHECKING:
    from .server import Server

__all__ = ["Signals", "StoppedStarting", "SIGNAL_POLL_S"]

log = logging.getLogger("easyserve")

# How long the main thread blocks at most before it looks for a signal that came. Linux gives a
# process's signal to any thread that does not block it; caught on another thread (the event loop's,
# under load), its Python handler waits for the main thread to run, and a main thread blocked in a
# wait with no timeout never did: a server sent SIGTERM just after it started went on serving.
SIGNAL_POLL_S = 0.2
# A stop signal this soon after the first is the same stop, come twice: one sent to the process group,
# which a wrapper (a shell's trap, runuser, timeout) passes on to the server as well, arrived a moment
# after the first, was taken for an operator's "stop now", and requests in flight were answered 503.
SAME_STOP_S = 0.5


class StoppedStarting(StartupError):
    """A stop signal (``signum``) came before the server was ready: asked for, not a failure to start."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class Signals:
    """The handlers of one :meth:`Server.serve_forever`, installed while it runs (in the main thread
    only: Python lets no other set them), the ones before put back after."""

    def __init__(self, server: Server, guardian: bool) -> None:
        self.server, self.guardian = server, guardian
        self.ready = False  # start() has returned: before, a stop signal abandons the start
        self.signalled = threading.Event()  # a stop signal came (not stop() from elsewhere): ShutdownDelayS first
        self.hurry = threading.Event()  # a second stop signal: no ShutdownDelayS, no drain
        self.hangup_while_starting = False
        self.previous: dict[int, Any] = {}
        self.stopped_at = -float("inf")  # when the first stop signal came (time.monotonic())

    def __enter__(self) -> Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._on_stop)
            if hasattr(signal, "SIGHUP"):  # re-read the config and reload, as servers do
                self.previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_hangup)
            if self.guardian:
                from .supervisor import GUARDIAN_GONE, HURRY

                self.previous[GUARDIAN_GONE] = signal.signal(GUARDIAN_GONE, self._on_guardian_gone)
                self.previous[HURRY] = signal.signal(HURRY, self._on_hurry)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def start(self) -> None:
        """Start the server; a stop signal meanwhile raises :class:`StoppedStarting`."""
        server = self.server
        try:
            server.start()
        except KeyboardInterrupt as exc:
            raise StoppedStarting(f"stopped before the server was ready ({exc or 'interrupted'})",
                                  signal.SIGTERM if "SIGTERM" in str(exc) else signal.SIGINT) from None
        self.ready = True
        if self.guardian:
            from .supervisor import PORT, READY, tell_guardian

            tell_guardian(READY)  # it counts failed starts: this one did not fail
            if server.config.port == 0:  # the port chosen: where a server restarted after this one listens
                tell_guardian(f"{PORT} {server.port}")
        if self.hangup_while_starting:
            server._hangup()

    def wait(self) -> None:
        """Until a stop signal (or ``stop()`` from another thread); after a signal, :meth:`serve_on`."""
        while not self.server._wake.wait(SIGNAL_POLL_S):
            pass
        if self.signalled.is_set():
            self.serve_on()

    def serve_on(self) -> None:
        """Before a signal's drain: serve on for ``ShutdownDelayS`` (unless a second signal comes first,
        or the server stops otherwise), not ready meanwhile, each answer closing its connection.

        A load balancer learns of a stop after it has begun: Kubernetes takes a pod's address out of
        its Service while the pod already has SIGTERM, and until then sends new connections to a
        port that a drain has closed (refused: lost requests). The usual mend is a ``preStop`` sleep
        in every deployment; this is the same, said once in the config."""
        server = self.server
        delay, loop = server.config.shutdown_delay_s, server._loop
        if delay <= 0 or loop is None or server.state != "running":
            return
        # no model loaded through the delay, for a server about to exit; the workers a reload replaced already
        # are put back (that is over soon, or the drain cuts it short), so that one handle serves on
        server._abandon_reload(put_back=True)
        loop.call_soon_threadsafe(server._announce_stop)
        end = time.monotonic() + delay
        while server.state == "running" and not self.hurry.wait(min(SIGNAL_POLL_S, max(0.0, end - time.monotonic()))):
            if time.monotonic() >= end:
                break

    def _starting(self) -> bool:
        server = self.server
        # Before start() sets "starting", it looks for GPUs (nvidia-smi may hang for its 20 s): a
        # signal there set the flag that start() then cleared, and the server ran on, deaf to it.
        if server.state == "starting":
            # Every worker ready (/ready says so), the port serving: start() is about to return. A
            # signal there abandoned the start, without a drain, so what had just been sent got 503.
            pool = server._pool
            return pool is None or not pool.ready
        return server.state == "stopped" and not self.ready

    def _on_stop(self, signum: int, frame: Any) -> None:
        server, name = self.server, signal.Signals(signum).name
        if self._starting():
            raise KeyboardInterrupt(f"{name} while the server was starting")
        if server._wake.is_set() and self.guardian:  # the guardian's is HURRY: this one is the same stop
            log.info("%s again: still draining (under --supervise, a second signal to the guardian stops at once)",
                     name)
            return
        if server._wake.is_set() and time.monotonic() - self.stopped_at < SAME_STOP_S:
            log.info("%s again within %g s: the same stop, sent twice (to the process group, and passed on by a "
                     "wrapper); still draining (send it again later to stop at once)", name, SAME_STOP_S)
            return
        if server._wake.is_set():
            log.warning("second %s: stopping now without draining", name)
            self._abort()
            return
        # set before the line is logged: a signal that comes during it (systemd's stop reaches a supervised
        # server and its guardian at once) is then seen as the same stop, and said once
        self.stopped_at = time.monotonic()
        self.signalled.set()
        server._wake.set()
        delay = server.config.shutdown_delay_s
        then = (f"not ready, but still serving for {delay:g} s (ShutdownDelayS), then draining" if delay
                else "draining")
        again = "signal the supervisor again" if self.guardian else "send it again"
        log.info("%s received: %s (%s to stop at once)", name, then, again)

    def _on_hurry(self, signum: int, frame: Any) -> None:
        """The guardian's second stop: stop at once (see supervisor.HURRY)."""
        if self._starting():
            raise KeyboardInterrupt("a second stop while the server was starting")
        log.warning("a second stop, passed on by the guardian: stopping now without draining")
        self.signalled.set()
        self.server._wake.set()
        self._abort()

    def _abort(self) -> None:
        self.hurry.set()
        loop = self.server._loop
        if loop is not None:
            loop.call_soon_threadsafe(self.server._abort)

    def _on_hangup(self, signum: int, frame: Any) -> None:
        server = self.server
        if server._wake.is_set():  # through ShutdownDelayS: stopping, though still serving
            log.info("SIGHUP: no reload: the server is stopping")
        elif server.state == "running":
            server._hangup()
        elif server.state == "starting" or self._starting():  # the file may have changed: read it once ready
            log.info("SIGHUP while starting: the config file will be read again once the server is ready")
            self.hangup_while_starting = True
        else:
            log.info("SIGHUP: no reload: the server is %s", server.state)

    def _on_guardian_gone(self, signum: int, frame: Any) -> None:
        # `easyserve run --supervise` lost its guardian: drain and stop, whichever time this comes
        if self._starting():
            raise KeyboardInterrupt("the supervisor is gone")
        if not self.server._wake.is_set():
            log.warning("the supervisor is gone: draining, then stopping")
            self.server._wake.set()
