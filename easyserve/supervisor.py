"""``easyserve run --supervise``: the guardian that restarts the whole server process when it dies.

The server runs as a child in its own session, so a terminal's Ctrl-C reaches only the guardian,
which passes SIGINT/SIGTERM on and then waits for the server to drain and exit (a second signal:
passed on as ``HURRY``, SIGUSR2, and the server stops at once; a third: it is killed, for a server
that no signal reaches; the server's own stop signals, which systemd's stop sends it too, only drain); SIGHUP
passes on as it comes (the server re-reads its config). A signal that comes while a server is being
started reaches the new one; once told to stop, the guardian starts none. Stopped by a signal, it
exits 0 once its server drained (or was stopped before it was ready: nothing to drain), else with
the server's code (128+N for one killed by signal N, as shells say). If the guardian dies, the server
gets ``GUARDIAN_GONE`` (SIGUSR1) from Linux, once for each of the guardian's threads: it drains and
stops, however many come.

A server that crashes is restarted after a delay that doubles with each quick failure (0.5 s up to
60 s) and resets once a run has lasted a minute. Not restarted: a config error (exit code 2: it
would fail the same way); a server that exits 0 by itself (someone stopped it on purpose, e.g.
``kill -TERM``: the guardian stops too, with 0); and one that failed ``MAX_FAILED_STARTS`` starts in
a row before it was ready (a wrong model path), where no server of this guardian's ever was: the
guardian exits with its code, naming its error. Once one has served, failed starts are a passing
fault (a model store down a while), and the restarts go on, at most a minute apart.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from typing import Any

from .children import module_command
from .runtime import tell_pid_1
from .signals import SAME_STOP_S

log = logging.getLogger("easyserve.supervisor")

__all__ = ["supervise"]

HEALTHY_RUN_S = 60.0
MAX_DELAY_S = 60.0
MAX_FAILED_STARTS = 5  # starts in a row that never reached ready before the guardian gives up
CONFIG_ERROR = 2
SUPERVISOR_ENV = "EASYSERVE_SUPERVISOR_PID"  # tells the server to stop (GUARDIAN_GONE) if its guardian dies
REPORT_ENV = "EASYSERVE_SUPERVISOR_REPORT"  # the pipe on which the server tells its guardian how it started
# Linux sends a child's "parent death" signal as each thread of the parent ends: as SIGTERM, the
# second one stopped the drain at once (a second SIGTERM's meaning), and requests in flight got 503.
GUARDIAN_GONE = getattr(signal, "SIGUSR1", signal.SIGTERM)
# The guardian's second stop, which the server takes as "stop at once"; a stop signal of its own that
# comes again only drains. systemd's stop (KillMode=control-group) and `pkill -f "easyserve run"` send
# SIGTERM to the guardian and its server alike: the server had its own, then the one passed on, took
# the two for an operator's second signal, and cut the drain short (its requests in flight got 503).
HURRY = getattr(signal, "SIGUSR2", signal.SIGTERM)
READY = "ready"  # what the server says on that pipe once every worker is ready, whatever its log level
FAILED = "could not start:"  # and what it says before it exits when it cannot start
PORT = "port"  # and, once ready with Port 0, "port N": the port it chose, where a restarted server listens again
_report_fd: int | None = None  # in a supervised server: that pipe


def supervise(run_args: list[str]) -> int:
    """Run ``easyserve run RUN_ARGS`` in a child process until told to stop; returns the exit code."""
    command = [*module_command("easyserve.cli"), "run", *run_args]  # as -m, less the current folder
    tell_pid_1()  # the guardian is the container's first process then, where the orphans pile up
    stop = threading.Event()
    child: subprocess.Popen | None = None
    stops = unsent = 0
    stopped_at = -float("inf")  # when the first stop signal came

    def forward(signum: int, frame: Any) -> None:
        nonlocal stops, unsent, stopped_at
        if signum != signal.SIGHUP and stops and time.monotonic() - stopped_at < SAME_STOP_S:
            # the same stop come twice (to the process group, and passed on by a wrapper): the first's drain
            log.info("%s again within %g s: the same stop, sent twice; the server drains", signal.Signals(signum).name,
                     SAME_STOP_S)
            return
        if signum != signal.SIGHUP:  # SIGHUP re-reads the config: the server goes on
            stop.set()
            stops += 1
            stopped_at = time.monotonic() if stops == 1 else stopped_at
        if child is not None and child.poll() is None:
            # each step taken before it is logged: a log line may block (stderr a full pipe), and this
            # handler with it, where a signal that comes meanwhile runs its own inside this one's write
            if stops >= 3:  # a server that answers no signal (stopped, wedged in native code)
                child.kill()
                log.warning("a third signal: killing server pid %d", child.pid)
            else:  # a second signal passes on as HURRY: the server then stops at once
                child.send_signal(signum if signum == signal.SIGHUP or stops == 1 else HURRY)
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    log.info("%s: passed on to server pid %d, which re-reads its config", name, child.pid)
                elif stops == 1:
                    log.info("%s: passed on to server pid %d, which drains (a second signal stops it at once, "
                             "a third kills it)", name, child.pid)
                else:
                    log.info("%s again: passed on to server pid %d, which stops at once (a third signal kills "
                             "it)", name, child.pid)
        elif signum != signal.SIGHUP:
            unsent = signum  # no server to pass it to: the one being started, if any, gets it

    # SIGHUP's default would end the guardian, and with it the service, for good
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    failures = failed_starts = 0
    served = False  # a server of this guardian's has been ready: see the give-up below
    try:
        while True:
            started = time.monotonic()
            report, report_to = os.pipe()
            env = {**os.environ, SUPERVISOR_ENV: str(os.getpid()), REPORT_ENV: str(report_to)}
            # born with SIGHUP blocked: one passed on while it still imports waits for it to say what
            # SIGHUP does (its default action would end it, and count as a crash)
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
            try:
                child = None if stop.is_set() else subprocess.Popen(command, start_new_session=True, env=env,
                                                                      pass_fds=(report_to,))
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                os.close(report_to)
            if child is None:  # told to stop while the server was down
                os.close(report)
                return 0
            if unsent:  # a stop handled while Popen ran found the dead server: the new one gets it
                child.send_signal(unsent)
                unsent = 0
            log.info("supervising server pid %d", child.pid)
            code = child.wait()
            ready, error, port = _read_report(report)
            if port is not None and command[-2:] != ["--port", port]:
                # Port 0 (a free port, chosen at each start): the next server listens where this one did,
                # rather than on a port of its own that no client or balancer looks for
                command = [*command, "--port", port]
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            if stop.is_set():
                clean = code == 0 or not ready  # drained, or stopped before it had anything to drain
                return 0 if clean else _exit_code(code)
            if code == 0:
                log.info("server pid %d exited with code 0 without being told to (stopped on purpose); "
                         "stopping too", child.pid)
                return 0
            if code == CONFIG_ERROR:
                log.error("server exited with a config error; not restarting it")
                return code
            failed_starts = 0 if ready else failed_starts + 1
            served = served or ready
            # Given up on only while no server has been ready: a config or model path that never worked.
            # One that served, killed while its model store was unreachable a few seconds more than five
            # starts take, was given up on for good, the service down until someone started it again.
            if failed_starts >= MAX_FAILED_STARTS and not served:
                log.error("server failed %d starts in a row before it was ready; giving up. Last: %s",
                          failed_starts, error or f"server pid {child.pid} {how}")
                return _exit_code(code)
            failures = 1 if time.monotonic() - started > HEALTHY_RUN_S else failures + 1
            delay = min(MAX_DELAY_S, 0.5 * 2 ** (failures - 1))
            log.error("server pid %d %s; restarting in %.1fs", child.pid, how, delay)
            if stop.wait(delay):
                return 0  # stopped while the server was down: nothing left to drain
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _exit_code(code: int) -> int:
    return 128 - code if code < 0 else code  # killed by signal N: 128+N, as shells say


def _read_report(fd: int) -> tuple[bool, str, str | None]:
    # Whether the server that just exited became ready, its start-up error, and the port it listened on.
    # It writes only those lines here, so they fit the pipe; its workers may still hold it.
    os.set_blocking(fd, False)
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except BlockingIOError:
        pass
    finally:
        os.close(fd)
    lines = b"".join(chunks).decode(errors="replace").splitlines()
    errors = [line for line in lines if line.startswith(FAILED)]
    ports = [words[1] for words in map(str.split, lines) if len(words) == 2 and words[0] == PORT and words[1].isdigit()]
    return READY in lines, errors[-1] if errors else "", ports[-1] if ports else None


def report_to_guardian() -> bool:
    """In a server that ``supervise()`` started: take the pipe on which it tells its guardian how its
    start went (:func:`tell_guardian`); ``True`` if there is one."""
    global _report_fd
    fd = os.environ.pop(REPORT_ENV, "")
    if fd.isdigit():
        _report_fd = int(fd)
        os.set_blocking(_report_fd, False)
    return _report_fd is not None


def tell_guardian(line: str) -> None:
    """Tell the guardian, if any, one line: :data:`READY`, the :data:`PORT`, or the :data:`FAILED` error.
    Never waits: a
    guardian that is gone, or not reading, must not hold the server up. (A log line would not do: at
    ``--log-level warning`` the server says nothing when it is ready.)"""
    if _report_fd is not None:
        try:
            os.write(_report_fd, (" ".join(line.split())[:4000] + "\n").encode(errors="replace"))
        except OSError:
            pass
