"""A worker slot as the pool keeps it: the state of its process, the batches it holds, why it is down,
and how the server shows it (``describe``, :func:`slots`, :func:`marked`). The pool
(:mod:`easyserve.pool`) starts its processes and moves it between states; this is what it moves."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
from typing import Any

from . import logs
from .batching import Pending
from .devices import WorkerSpec

__all__ = ["LAST_LINES", "WORKER_STATES", "Worker", "marked", "said_last", "slots"]

LAST_LINES = 20  # of a worker that died starting without a traceback, quoted in its error
WORKER_STATES = ("starting", "idle", "busy", "retiring", "stopping", "dead", "failed", "stopped")


@dataclasses.dataclass(eq=False)
class Worker:
    """One worker slot; its process is replaced when it dies. ``state`` is one of :data:`WORKER_STATES`:
    starting, idle, busy, retiring (being replaced between batches), stopping, dead, failed (it keeps
    failing to start; still retried), stopped (told to stop, and gone)."""

    spec: WorkerSpec
    state: str = "starting"
    proc: subprocess.Popen | None = None
    transport: asyncio.Transport | None = None
    lifeline: int | None = None
    pidfd: int | None = None
    batch: list[Pending] = dataclasses.field(default_factory=list)
    batch_id: int = 0
    batch_timer: asyncio.TimerHandle | None = None
    batch_began: float = 0.0  # loop time at which ``batch`` began to run
    # the batch handed to it while it runs ``batch`` (Pipeline): it prepares it meanwhile
    next_batch: list[Pending] = dataclasses.field(default_factory=list)
    next_id: int = 0
    retire_reason: str | None = None  # replace it once it has answered the batches it holds
    retire_kind: str | None = None  # and the kind of that replacement: memory, batches, reload, rollback
    ready: asyncio.Future | None = None
    exited: asyncio.Future | None = None
    info: dict = dataclasses.field(default_factory=dict)
    start_failures: int = 0
    restarts: int = 0
    error: str | None = None  # why the last process ended or failed to start: one line, safe to show clients
    trace: str | None = None  # the traceback this process sent when its handle failed to start: log and /stats only
    config_error: str | None = None  # when that failure was the config's (a ConfigError): its message
    reported_trace: str | None = None  # the last start-up traceback logged in full
    said_too_big: bool = False  # warned that it is above MaxWorkerMemoryMB once set up (each replacement is too)
    said_growing: bool = False  # warned that its memory grew past GROWING_TIMES what it held (see base_rss)
    # what its process held after its largest batch yet (0: the next reading, holding no batch, is it): a
    # model's arenas and workspaces grow with the batch, once, and a leak with every batch
    base_rss: int = 0
    largest_batch: int = 0  # the most requests a batch of its process held
    base_served: int = 0  # its process's batches (served) as that largest batch was answered
    rss: int | None = None  # its process's resident memory, in bytes, as it last said (set up, then between batches)
    rss_held: int = 0  # the batches it held as it read that (Pipeline: the next one), whose memory that includes
    recheck: bool = False  # that reading is above MaxWorkerMemoryMB, a batch held: none handed ahead till it holds none
    deferred: bool = False  # said that its replacement waits for another slot's (see WorkerPool._planned)
    reading_due: bool = False  # idle, kept from batches until its next memory reading (see WorkerPool._on_message)
    retry_at: float = 0.0  # loop time of the next restart while it is dead or failed
    kill_reason: str | None = None
    reaping: bool = False
    left_behind: Any = None  # children.Descendants: what its last process's handle left in its session, ended
    start_timer: asyncio.TimerHandle | None = None
    waiting_turn: bool = False  # started, and waiting for its device's turn to load the handle (StartsPerGPU)
    output: logs.ProcessOutput | None = None  # reads the process's pipes: its prints, its records
    stacks: int | None = None  # its process's stacks file (children.stacks_file), read before it is killed as stuck
    stuck_at: str | None = None  # what that file said, of a setup killed past StartTimeoutS
    ring: logs.Ring = dataclasses.field(default_factory=logs.new_ring)  # recent output of its processes
    served: int = 0  # batches this process has answered
    warm: bool = False  # whether this process has answered a batch its model ran (one request answered 200)
    ran_model: bool = False  # whether it has lived through a batch its model ran, whatever the answers
    batches: int = 0  # batches this slot has answered, across restarts
    earlier_batches: int = 0  # and those it answered before a reload put this handle in it (shown in its count)
    batch_limit: int | None = None  # batches after which this process is replaced (MaxBatchesPerWorker)
    recycled: int = 0  # processes replaced on purpose (memory, batch count), not counted as restarts
    recycling: bool = False  # from a replacement on purpose until its successor is ready
    payload: bytes | None = None  # the pickled handle it runs (a reload gives new workers a new one)
    runs: bytes | None = None  # the pickled handle its process was given: payload, or the pool's, when it started
    candidate: bool = False  # a reload's new worker, until it is ready: not restarted if it fails
    leaving: bool = False  # replaced by a reload: stops after its batch and is not restarted
    barren_deaths: int = 0  # deaths in a row of processes that answered no batch: restarts back off
    cpu_mark: float | None = None  # the CPU seconds its process said it had spent when it last answered

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def is_slot(self) -> bool:
        """Whether it is its slot's worker: not a reload's new process starting beside the one it
        replaces, nor one a reload replaced, finishing its batch."""
        return not self.candidate and not self.leaving

    @property
    def linked(self) -> bool:
        """Whether a message can be written to its process: its connection is open."""
        return self.transport is not None and not self.transport.is_closing()

    def close_stacks(self) -> None:
        """Let go of its process's stacks file, if it holds one (a new process gets its own)."""
        if self.stacks is not None:
            os.close(self.stacks)
            self.stacks = None

    def summary(self) -> str:
        """Its process, as the log says it is ready: pid, device, CUDA_VISIBLE_DEVICES, providers, threads."""
        info = self.info
        parts = [f"pid {info.get('pid')}", info.get("device", "?")]
        if info.get("cuda_visible_devices"):
            parts.append(f"CUDA_VISIBLE_DEVICES={info['cuda_visible_devices']}")
        if info.get("onnx_providers"):
            parts.append("onnxruntime " + "+".join(info["onnx_providers"]))
        torch_threads = info.get("torch_threads")
        parts.append(f"{info.get('threads')} CPU thread(s)"
                     + (f" (torch runs {torch_threads})" if torch_threads not in (None, info.get("threads")) else ""))
        return ", ".join(parts)

    def describe(self, detail: bool = False) -> dict[str, Any]:
        """Name, state, restarts, batches answered, pid and device; why it is down (one line); with
        ``detail``, the start-up traceback too (it may name paths or secrets: never for unauthenticated
        clients)."""
        # its process gone, being reaped (which may take long: one killed may be held by a GPU driver)
        state = "dead" if self.reaping and self.state in ("idle", "busy") else self.state
        out = {"name": self.name, "state": state, "restarts": self.restarts, "recycled": self.recycled,
               "batches": self.batches + self.earlier_batches, **self.info}
        if self.waiting_turn and self.state == "starting":  # holding no model yet: others of its GPU load theirs
            out["waiting_turn"] = True
        if self.candidate:  # a reload's new process for the slot, beside the one it replaces: no slot of its own
            out["replacing"] = True
        elif self.leaving:  # one a reload replaced, finishing the batch it holds: no longer the slot's
            out["leaving"] = True
        if self.error and self.state in ("starting", "dead", "failed"):
            out["error"] = self.error
            if detail and self.trace:
                out["trace"] = self.trace
        return out


def slots(workers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The workers (as ``describe`` gives them) that are the server's slots: a reload's new process, starting
    beside the one it replaces, is none of its own, nor one it replaced, finishing its batch."""
    return [w for w in workers if not w.get("replacing") and not w.get("leaving")]


def marked(worker: dict[str, Any], state: str) -> str:
    """A worker's ``state`` as shown to a person: "(replacement)" after it for a reload's new process,
    "(leaving)" for one a reload replaced, "(waiting its turn)" for one waiting to load (StartsPerGPU)."""
    return state + (" (replacement)" if worker.get("replacing") else " (leaving)" if worker.get("leaving") else "") \
        + (" (waiting its turn)" if worker.get("waiting_turn") else "")


def said_last(worker: Worker) -> str:
    """For the error of a worker that could not start: its traceback, else (it was killed, or died
    without one) its last lines of output, which were only in the logs of a server whose ``start()``
    raised, so never returned it."""
    if worker.trace and "Traceback" in worker.trace:  # not the watchdog's line for a setup past StartTimeoutS
        return worker.trace
    pid = worker.proc.pid if worker.proc is not None else None  # a reload's worker shares its slot's ring
    said = [line.text for line in logs.ring_lines(worker.ring) if line.pid == pid][-LAST_LINES:]
    lines = "Its last lines:\n" + "".join(f"  {text}\n" for text in said) if said else "It wrote nothing."
    if worker.stuck_at:  # killed as its setup ran past StartTimeoutS: where it was
        return f"It was here (its threads, most recent call first):\n{worker.stuck_at}\n\n{lines}"
    return lines

