"""``easyserve run --supervise``: the guardian that restarts the whole server process when it dies.

The server runs as a child in its own session, so a terminal's Ctrl-C reaches only the guardian,
which passes SIGINT/SIGTERM on and then waits for the server to drain and exit (a second signal:
the server stops at once; a third: it is killed, for a server that no signal reaches); SIGHUP
passes on as it comes (the server re-reads its config). If the guardian dies, the server gets
``GUARDIAN_GONE`` (SIGUSR1) from Linux, once for each of the guardian's threads: it drains and
stops, however many come. A server that exits by itself is restarted after a delay that doubles with
each quick failure (0.5 s up to 60 s) and resets once a run has lasted a minute. A config error
(exit code 2) is not retried: it would fail the same way.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

log = logging.getLogger("easyserve.supervisor")

__all__ = ["supervise"]

HEALTHY_RUN_S = 60.0
MAX_DELAY_S = 60.0
CONFIG_ERROR = 2
SUPERVISOR_ENV = "EASYSERVE_SUPERVISOR_PID"  # tells the server to stop (GUARDIAN_GONE) if its guardian dies
# Linux sends a child's "parent death" signal as each thread of the parent ends: as SIGTERM, the
# second one stopped the drain at once (a second SIGTERM's meaning), and requests in flight got 503.
GUARDIAN_GONE = getattr(signal, "SIGUSR1", signal.SIGTERM)


def supervise(run_args: list[str]) -> int:
    """Run ``easyserve run RUN_ARGS`` in a child process until told to stop; returns its last exit code."""
    command = [sys.executable, "-m", "easyserve.cli", "run", *run_args]
    stop = threading.Event()
    child: subprocess.Popen | None = None
    stops = 0

    def forward(signum: int, frame: Any) -> None:
        nonlocal stops
        if signum != signal.SIGHUP:  # SIGHUP re-reads the config: the server goes on
            stop.set()
            stops += 1
        if child is not None and child.poll() is None:
            if stops >= 3:  # a server that answers no signal (stopped, wedged in native code)
                log.warning("a third signal: killing server pid %d", child.pid)
                child.kill()
            else:
                child.send_signal(signum)  # a second signal passes on too: the server then stops at once

    # SIGHUP's default would end the guardian, and with it the service, for good
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    failures = 0
    try:
        while True:
            started = time.monotonic()
            env = {**os.environ, SUPERVISOR_ENV: str(os.getpid())}
            # born with SIGHUP blocked: one passed on while it still imports waits for it to say what
            # SIGHUP does (its default action would end it, and count as a crash)
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
            try:
                child = subprocess.Popen(command, start_new_session=True, env=env)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            log.info("supervising server pid %d", child.pid)
            code = child.wait()
            if stop.is_set():
                return code
            if code == CONFIG_ERROR:
                log.error("server exited with a config error; not restarting it")
                return code
            failures = 1 if time.monotonic() - started > HEALTHY_RUN_S else failures + 1
            delay = min(MAX_DELAY_S, 0.5 * 2 ** (failures - 1))
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            log.error("server pid %d %s; restarting in %.1fs", child.pid, how, delay)
            if stop.wait(delay):
                return 0  # stopped while the server was down: nothing left to drain
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
