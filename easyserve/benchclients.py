"""The client processes of one :func:`easyserve.bench` level, started and steered from the caller's
process over their pipes (their side is :mod:`easyserve.loadgen`)."""

from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from . import loadgen

START_TIMEOUT_S = 60.0  # for a client process to start and report ready


def split(total: int, parts: Sequence[int]) -> list[int]:
    """``total`` split in proportion to ``parts``, in whole numbers that add up to it."""
    weight = sum(parts)
    shares = [total * part // weight for part in parts]
    for i in range(total - sum(shares)):
        shares[i % len(shares)] += 1
    return shares


class ClientsFailed(RuntimeError):
    """A client process exited (killed by the out-of-memory killer, say) or did not answer in time: the
    level under way cannot be measured."""


class Clients:
    """The client processes of one level (a concurrency, or a rate), steered over their pipes (see
    :mod:`easyserve.loadgen`). Leaving the ``with`` block stops them, whatever happened."""

    def __init__(self, job: dict, concurrency: int, processes: int) -> None:
        self.shares = [share for share in split(concurrency, [1] * processes) if share]
        self.messages: queue.Queue = queue.Queue()
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Any] = []
        try:
            for index, share in enumerate(self.shares):
                log = tempfile.TemporaryFile()  # its stderr: read back only if it fails
                proc = subprocess.Popen(loadgen.COMMAND, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=log, env=_child_env())
                self.procs.append(proc)
                self.logs.append(log)
                own = {"concurrency": share}
                if job.get("rate"):  # an equal part of the rate, its schedule offset from the others' by a step
                    own.update(rate=job["rate"] / len(self.shares), phase=index / len(self.shares))
                    if job.get("seed") is not None:  # and gaps of its own, the same from one run to the next
                        own["seed"] = f"{job['seed']}/{index}"
                loadgen.write(proc.stdin, {**job, **own})
                threading.Thread(target=self._listen, args=(index, proc.stdout), daemon=True).start()
            self.ask(None, "ready", timeout=START_TIMEOUT_S)
        except BaseException:
            self.close()
            raise

    def _listen(self, index: int, stream: Any) -> None:
        while True:
            try:
                message = loadgen.read(stream)
            except (EOFError, OSError, ValueError):
                self.messages.put((index, None))
                return
            self.messages.put((index, message))

    def ask(self, command: Any, answer: str, progress: Callable[[int, int], None] | None = None,
            timeout: float | None = None) -> list[Any]:
        """Send ``command`` (one for all, or a list with one each), then wait for every process's
        ``answer``; its value, in process order. Progress messages on the way go to ``progress``."""
        if command is not None:
            for index, (proc, each) in enumerate(zip(self.procs, command if isinstance(command, list)
                                                     else [command] * len(self.procs))):
                try:
                    loadgen.write(proc.stdin, each)
                except OSError:  # it died between two steps (after its warm-up, say): its pipe is closed
                    raise self._exited(index) from None
        answers: dict[int, Any] = {}
        counts = [(0, 0)] * len(self.procs)
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(answers) < len(self.procs):
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                raise ClientsFailed(f"client processes did not answer {answer!r} within {timeout:g}s")
            try:
                index, message = self.messages.get(timeout=min(wait or 0.5, 0.5))
            except queue.Empty:
                continue
            if message is None:
                raise self._exited(index)
            if message[0] == "progress":
                counts[index] = message[1:]
                if progress is not None:
                    progress(sum(c[0] for c in counts), sum(c[1] for c in counts))
            elif message[0] == answer:
                answers[index] = message[1] if len(message) > 1 else None
        return [answers[i] for i in range(len(self.procs))]

    def _exited(self, index: int) -> ClientsFailed:
        """The error for client process ``index`` gone, with what it wrote on its way out, if anything."""
        said = self._log(index).strip()
        code = self.procs[index].wait()
        return ClientsFailed(f"a client process exited (code {code})" + (f":\n{said}" if said else ""))

    def _log(self, index: int) -> str:
        log = self.logs[index]
        log.seek(0)
        return log.read().decode(errors="replace")[-4000:]

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(OSError, ValueError):
                loadgen.write(proc.stdin, ("quit",))
                proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        for log in self.logs:
            log.close()

    def __enter__(self) -> Clients:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _child_env() -> dict[str, str]:
    # the child imports this very easyserve, wherever it was imported from (a checkout, not installed)
    root = str(Path(__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}
