"""How busy the server's GPUs are, and how full, for ``/stats``, ``/metrics``, the dashboard and
``easyserve bench``.

One ``nvidia-smi`` in loop mode, started with the pool, prints every GPU's utilisation and memory each
``SAMPLE_MS``; the server keeps the lines of the GPUs its workers use, under the config's GPU ids.
Utilisation is the driver's: the share of its last sample period in which a kernel ran on the GPU.
Memory is what every process on the GPU holds, not only the workers.

Beside the last reading, each GPU keeps two running sums: ``busy_s``, utilisation times the time since
the previous reading, and ``sampled_s``, that time. Between two reads of ``/stats`` (or two scrapes of
``/metrics``), the difference of the first over the difference of the second is the GPU's mean
utilisation over that interval: how ``easyserve bench`` reports it for each measurement, without
sampling anything itself.

Why ``nvidia-smi`` and not NVML's Python bindings: it comes with the driver (and into containers with
NVIDIA's container toolkit), so there is nothing more to install; the server already asks it which
GPUs there are (:mod:`easyserve.devices`); and a test can put a script in its place. Its output is
asked for by field name, and a line that does not read as those fields is skipped.

Its stdout is its only tie to the server: if the server dies, however it dies, its next line finds the
pipe closed and it exits (SIGPIPE). If it fails or exits, it is started again every ``RETRY_S``; the
first failure of a streak is logged, and so is the recovery. It never holds a request up: it runs
only on the event loop, reading a line every ``SAMPLE_MS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import subprocess
import time
from typing import Any

log = logging.getLogger("easyserve")

__all__ = ["GpuMonitor", "GpuReading"]

# the name last: it may hold a comma
QUERY = ("index", "uuid", "utilization.gpu", "memory.used", "memory.total", "name")
SAMPLE_MS = 500
RETRY_S = 10.0
MAX_GAP_S = 5.0  # a reading after a longer silence adds nothing to the sums: what happened meanwhile is unknown
UNLISTED_AFTER_S = 5.0  # warn when nvidia-smi has answered this long without listing a worker's GPU
EXIT_WAIT_S = 5
MIB = 2**20


@dataclasses.dataclass
class GpuReading:
    """One GPU's last reading and running sums; ``gpu`` is the config's GPU id, ``entry`` its
    ``CUDA_VISIBLE_DEVICES`` entry (an index or a UUID), by which its lines are recognised."""

    gpu: int
    entry: str
    index: str | None = None
    uuid: str | None = None
    name: str | None = None
    utilization: float | None = None  # 0 to 1; None where the driver does not report it
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    busy_s: float = 0.0
    sampled_s: float = 0.0
    _last: float | None = dataclasses.field(default=None, repr=False)

    def matches(self, index: str, uuid: str) -> bool:
        # CUDA takes a UUID's unambiguous prefix as well as the whole of it
        return self.entry == index or (self.entry.startswith("GPU-") and uuid.startswith(self.entry))

    def record(self, fields: dict[str, str], now: float) -> None:
        self.index, self.uuid, self.name = fields["index"], fields["uuid"], fields["name"]
        self.utilization = _percent(fields["utilization.gpu"])
        self.memory_used_bytes = _mib(fields["memory.used"])
        self.memory_total_bytes = _mib(fields["memory.total"])
        if self._last is not None and self.utilization is not None and 0 < now - self._last <= MAX_GAP_S:
            self.busy_s += self.utilization * (now - self._last)
            self.sampled_s += now - self._last
        self._last = now

    def to_dict(self) -> dict[str, Any]:
        return {"gpu": self.gpu, "index": self.index, "uuid": self.uuid, "name": self.name,
                "utilization": self.utilization, "memory_used_bytes": self.memory_used_bytes,
                "memory_total_bytes": self.memory_total_bytes, "busy_s": round(self.busy_s, 6),
                "sampled_s": round(self.sampled_s, 6)}


class GpuMonitor:
    """Keeps the readings of ``gpus`` (config GPU id to ``CUDA_VISIBLE_DEVICES`` entry) while started;
    with no GPUs it starts nothing. Runs on the event loop."""

    def __init__(self, gpus: dict[int, str], command: str = "nvidia-smi") -> None:
        self.gpus = [GpuReading(gpu, entry) for gpu, entry in sorted(gpus.items())]
        self.command = command
        self._task: asyncio.Task | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._failing = False  # a failure is logged, and the recovery not yet
        self._unlisted = False  # logged that nvidia-smi does not list the workers' GPUs

    def start(self) -> None:
        if self.gpus and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def readings(self) -> list[dict[str, Any]]:
        """The GPUs read at least once, by config GPU id."""
        return [gpu.to_dict() for gpu in self.gpus if gpu.index is not None]

    async def _run(self) -> None:
        while True:
            problem = await self._follow()
            if not self._failing:
                self._failing = True
                log.warning("GPU monitoring: %s; GPU utilisation and memory are not reported until it answers "
                            "(tried again every %gs)", problem, RETRY_S)
            for gpu in self.gpus:  # the time without readings counts in neither sum
                gpu._last = None
            await asyncio.sleep(RETRY_S)

    async def _follow(self) -> str:
        """Run ``nvidia-smi`` until it stops; why it stopped."""
        try:
            # a session of its own: a terminal's Ctrl-C stops the server, which stops it, rather than
            # reaching it first and reading as a failure
            proc = subprocess.Popen(
                [self.command, f"--query-gpu={','.join(QUERY)}", "--format=csv,noheader,nounits",
                 f"-lms={SAMPLE_MS}"],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            return f"cannot run {self.command} ({exc.strerror or exc})"
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), proc.stdout)
        began, listed, last_other = time.monotonic(), False, ""
        try:
            while line := await reader.readline():
                fields = _fields(line)
                if fields is None:
                    last_other = line.decode(errors="replace").strip() or last_other
                    continue
                now = time.monotonic()
                for gpu in self.gpus:
                    if gpu.matches(fields["index"], fields["uuid"]):
                        gpu.record(fields, now)
                        listed = True
                        if self._failing:
                            self._failing = False
                            log.info("GPU monitoring: %s answers again", self.command)
                if not listed and not self._unlisted and now - began > UNLISTED_AFTER_S:
                    self._unlisted = True
                    log.warning("GPU monitoring: %s does not list the workers' GPUs (CUDA_VISIBLE_DEVICES %s)",
                                self.command, ",".join(gpu.entry for gpu in self.gpus))
        except ValueError:  # a line past the reader's limit: not nvidia-smi's output
            last_other = "a line too long to be nvidia-smi's"
        finally:
            transport.close()
            if proc.poll() is None:
                proc.kill()
            for _ in range(EXIT_WAIT_S * 20):  # reaped without blocking the loop: it has been killed, or has
                if proc.poll() is not None:  # closed its output, so exits at once
                    break
                await asyncio.sleep(0.05)
        said = f": {last_other[:200]}" if last_other else ""
        return f"{self.command} exited with status {proc.returncode}{said}"


def _fields(line: bytes) -> dict[str, str] | None:
    values = [value.strip() for value in line.decode(errors="replace").split(",", len(QUERY) - 1)]
    if len(values) != len(QUERY) or not values[0].isdigit():
        return None
    return dict(zip(QUERY, values))


def _percent(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:  # "[N/A]", "[Not Supported]"
        return None
    return value / 100 if 0 <= value <= 100 else None


def _mib(text: str) -> int | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value * MIB) if value >= 0 else None
