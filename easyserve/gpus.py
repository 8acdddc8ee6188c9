"""How busy the server's GPUs are, and how full, for ``/stats``, ``/metrics``, the dashboard and
``easyserve bench``.

One ``nvidia-smi`` in loop mode, started with the pool, prints every GPU's utilisation and memory each
``SAMPLE_MS``; the server keeps the lines of the GPUs its workers use, under the config's GPU ids
(workers get ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` unless it is set, so that an index means the same GPU
to CUDA as to ``nvidia-smi``). Utilisation is the driver's: the share of its last sample period (1/6 s
to 1 s) in which a kernel ran on the GPU. Memory is what every process on the GPU holds, not only
the workers'. MIG instances are not monitored: the driver reports no utilisation for one.

Beside the last reading, each GPU keeps two running sums: ``busy_s``, utilisation times the time since
the previous reading, and ``sampled_s``, that time. Between two reads of ``/stats`` (or two scrapes of
``/metrics``), the difference of the first over the difference of the second is the GPU's mean
utilisation over that interval: how ``easyserve bench`` reports it for each measurement, without
sampling anything itself. It is an estimate: readings are timed by their arrival, so each end of an
interval is uncertain by about a sampling period (half a second in a 10 s measurement: 5%).

Why ``nvidia-smi`` and not NVML's Python bindings: it comes with the driver (and into containers with
NVIDIA's container toolkit), so there is nothing more to install; the server already asks it which
GPUs there are (:mod:`easyserve.devices`); and a test can put a script in its place. Its output is
asked for by field name, and a line that does not read as those fields is skipped.

Its stdout is its only tie to the server: if the server dies, however it dies, its next line finds the
pipe closed and it exits (SIGPIPE). If it fails, exits, or prints nothing for ``SILENT_S`` (a hung
driver hangs its tools), it is stopped and started again every ``RETRY_S``, its GPUs' numbers are
unknown (``None``) meanwhile, not the last ones; the first failure of a streak is logged, and so is
the recovery, once it has answered ``RECOVERED_AFTER_S``. A GPU whose lines stop while the others'
come (lost from the bus) is unknown too after ``DROPPED_AFTER_S``, said once, as its return is. It
never holds a request up: it runs on the event loop, reading a line every ``SAMPLE_MS``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
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
# a GPU whose lines stop coming while others' come (lost from the bus, "GPU is lost"): after this long
# its numbers are unknown, not its last ones
DROPPED_AFTER_S = 3 * SAMPLE_MS / 1000
# an nvidia-smi that answers again is said to once it has answered this long: one that prints a line
# and exits, every RETRY_S, logged a recovery and a failure each time
RECOVERED_AFTER_S = 3 * SAMPLE_MS / 1000
EXIT_WAIT_S = 5  # how long a stopped nvidia-smi is waited for, without blocking the loop, before it is left
SILENT_S = 10.0  # nvidia-smi that prints nothing for this long is taken for hung, and restarted
STOP_WAIT_S = 2.0  # how long a server's stop waits for the monitor to end; then its nvidia-smi is killed
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
    seen: float | None = dataclasses.field(default=None, repr=False)  # when a line of it last came
    dropped: bool = dataclasses.field(default=False, repr=False)  # its lines stopped; said in the log

    def matches(self, index: str, uuid: str) -> bool:
        # CUDA takes a UUID's unambiguous prefix as well as the whole of it
        return self.entry == index or (self.entry.startswith("GPU-") and uuid.startswith(self.entry))

    def record(self, fields: dict[str, str], now: float) -> None:
        self.seen = now
        self.index, self.uuid, self.name = fields["index"], fields["uuid"], fields["name"]
        self.utilization = _percent(fields["utilization.gpu"])
        self.memory_used_bytes = _mib(fields["memory.used"])
        self.memory_total_bytes = _mib(fields["memory.total"])
        if self._last is not None and self.utilization is not None and 0 < now - self._last <= MAX_GAP_S:
            self.busy_s += self.utilization * (now - self._last)
            self.sampled_s += now - self._last
        self._last = now

    def lapse(self) -> None:
        """No reading comes: the numbers are unknown (not the last ones), and the time until the
        next reading counts in neither sum."""
        self.utilization = self.memory_used_bytes = self.memory_total_bytes = None
        self._last = None

    def to_dict(self) -> dict[str, Any]:
        return {"gpu": self.gpu, "index": self.index, "uuid": self.uuid, "name": self.name,
                "utilization": self.utilization, "memory_used_bytes": self.memory_used_bytes,
                "memory_total_bytes": self.memory_total_bytes, "busy_s": round(self.busy_s, 6),
                "sampled_s": round(self.sampled_s, 6)}


def _read_into(reader: asyncio.StreamReader, fd: int, loop: asyncio.AbstractEventLoop) -> None:
    """Feed what the pipe ``fd`` delivers to ``reader``, and its end, from the event loop (``add_reader``).
    Not ``connect_read_pipe``: under uvloop, its transport and the file object it is given both closed the
    descriptor, and the second close could hit one another thread had just opened (a client's socket, in
    a server run in a notebook: a request that failed with EBADF once, in a test run)."""
    os.set_blocking(fd, False)

    def readable() -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:  # the pipe failed: as its end
            data = b""
        if data:
            reader.feed_data(data)
        else:
            loop.remove_reader(fd)
            reader.feed_eof()

    loop.add_reader(fd, readable)


class GpuMonitor:
    """Keeps the readings of ``gpus`` (config GPU id to ``CUDA_VISIBLE_DEVICES`` entry) while started;
    with no GPUs it starts nothing. Runs on the event loop."""

    def __init__(self, gpus: dict[int, str], command: str = "nvidia-smi") -> None:
        # A MIG instance (CUDA_VISIBLE_DEVICES "MIG-..."): the driver reports no utilisation of its
        # own, and its GPU's memory is every instance's, so there is nothing of it to show.
        self.mig = {gpu: entry for gpu, entry in gpus.items() if entry.startswith("MIG-")}
        self.gpus = [GpuReading(gpu, entry) for gpu, entry in sorted(gpus.items()) if gpu not in self.mig]
        self.command = command
        self._task: asyncio.Task | None = None
        self._problem: str | None = None  # what went wrong, while failing: logged, and the recovery not yet
        self._unlisted = False  # logged which of the workers' GPUs nvidia-smi does not list
        self._said = ""  # what nvidia-smi printed last in place of a reading, when a GPU was found unread
        self._proc: subprocess.Popen | None = None  # the nvidia-smi it reads now
        self._stopping = False

    def start(self) -> None:
        if self.mig:
            log.info("GPU monitoring: MIG instances (%s) are not monitored: the driver reports no utilisation "
                     "for one", ", ".join(f"GPU {gpu} {entry}" for gpu, entry in sorted(self.mig.items())))
        if self.gpus and self._task is None:
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """End the monitor and its ``nvidia-smi``. Told by a flag as well as by a cancel: on Python 3.10
        and 3.11, ``asyncio.wait_for`` loses a cancel that lands in the turn its read completes (nvidia-smi
        prints every ``SAMPLE_MS``), the monitor read on, and a server's stop under load waited for it
        for ever. The wait is bounded all the same."""
        self._stopping = True
        task, self._task = self._task, None
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()  # its output ends: the read returns, and the monitor sees the flag
        if task is not None:
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=STOP_WAIT_S)
            if not done:
                log.warning("GPU monitoring did not stop within %gs; leaving it", STOP_WAIT_S)

    @property
    def up(self) -> bool:
        """Whether ``nvidia-smi`` reads the GPUs: it has, is not failing (or silent) now, and lists each
        (one it never listed, or no longer lists, read as up while the others were read)."""
        return self._problem is None and any(gpu.index is not None for gpu in self.gpus) and not self._unread()

    def _unread(self) -> list[GpuReading]:
        """The GPUs ``nvidia-smi``, answering, has been found not to list: never, or no longer."""
        return [gpu for gpu in self.gpus if gpu.dropped or self._unlisted and gpu.index is None]

    def state(self) -> dict[str, Any] | None:
        """For ``/stats``: whether ``nvidia-smi`` reads the GPUs (``up``), and if it fails, why
        (``problem``); ``None`` with no GPU to monitor (a CPU server). Without it, a GPU server whose
        monitoring never answered listed no GPU, as a CPU server does."""
        if not self.gpus:
            return None if not self.mig else {"up": False, "problem": "MIG instances are not monitored: the driver "
                                                                      "reports no utilisation for one"}
        if self._problem is not None:
            return {"up": False, "problem": self._problem}
        unread = self._unread()
        if unread:
            listed = ", ".join(f"GPU {gpu.gpu} (CUDA_VISIBLE_DEVICES entry {gpu.entry})" for gpu in unread)
            said = f" (it said: {self._said[:200]})" if self._said else ""
            return {"up": False, "problem": f"{self.command} does not list {listed}{said}"}
        return {"up": self.up, "problem": None}

    def readings(self) -> list[dict[str, Any]]:
        """The GPUs read at least once, by config GPU id."""
        return [gpu.to_dict() for gpu in self.gpus if gpu.index is not None]

    async def _run(self) -> None:
        while not self._stopping:
            try:
                problem = await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # whatever it was, the server goes on, and so does monitoring
                problem = f"{type(exc).__name__}: {exc}"
            if self._stopping:
                return
            if self._problem is None:
                log.warning("GPU monitoring: %s; GPU utilisation and memory are not reported until it answers "
                            "(tried again every %gs)", problem, RETRY_S)
            self._problem = problem  # the latest, for /stats
            for gpu in self.gpus:  # no number is shown as current while none arrives
                gpu.lapse()
                gpu.seen = None  # the next run's lines say afresh which GPUs it lists
            await asyncio.sleep(RETRY_S)

    async def _follow(self) -> str:
        """Run ``nvidia-smi`` until it stops, or stays silent for ``SILENT_S``; why it stopped."""
        try:
            # a session of its own: a terminal's Ctrl-C stops the server, which stops it, rather than
            # reaching it first and reading as a failure
            proc = subprocess.Popen(
                [self.command, f"--query-gpu={','.join(QUERY)}", "--format=csv,noheader,nounits",
                 f"--loop-ms={SAMPLE_MS}"],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            return f"cannot run {self.command} ({exc.strerror or exc})"
        self._proc = proc
        loop = asyncio.get_running_loop()
        began, listed, last_other = time.monotonic(), set(), ""
        last_line = resumed = began  # when a line was last read; when reading resumed after all were silent
        reader = asyncio.StreamReader()
        _read_into(reader, proc.stdout.fileno(), loop)
        try:
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), SILENT_S)
                except asyncio.TimeoutError:  # a driver that hangs hangs its tools: not a reading to trust
                    return f"{self.command} printed nothing for {SILENT_S:g}s"
                if not line or self._stopping:
                    break
                fields = _fields(line)
                if fields is None:
                    last_other = line.decode(errors="replace").strip() or last_other
                else:
                    self._record(fields, listed, began)
                now = time.monotonic()
                if now - last_line > DROPPED_AFTER_S:
                    # nothing read for that long, from any GPU: this process was held (a paused server, a
                    # long stall), or the tool was. Every GPU's lines since wait in the pipe, one read at a
                    # time: judged by the first, the others had fallen silent, and were said to
                    resumed = now
                last_line = now
                # on every line, read or not: one that only ever printed its errors was never said to
                if not self._unlisted and len(listed) < len(self.gpus) and now - began > UNLISTED_AFTER_S:
                    self._unlisted, self._said = True, last_other
                    missing = [gpu for gpu in self.gpus if gpu.gpu not in listed]
                    log.warning("GPU monitoring: %s does not list %s%s", self.command,
                                ", ".join(f"GPU {gpu.gpu} (CUDA_VISIBLE_DEVICES entry {gpu.entry})" for gpu in missing),
                                f" (it said: {last_other[:200]})" if last_other else "")
                self._drop_silent_gpus(now, last_other, resumed)
        except ValueError:  # a line past the reader's limit: not nvidia-smi's output
            last_other = "a line too long to be nvidia-smi's"
        finally:
            loop.remove_reader(proc.stdout.fileno())
            proc.stdout.close()
            if proc.poll() is None:
                proc.kill()
            for _ in range(EXIT_WAIT_S * 20):  # reaped without blocking the loop: it has been killed, or has
                if proc.poll() is not None:  # closed its output, so exits at once
                    break
                await asyncio.sleep(0.05)
        said = f": {last_other[:200]}" if last_other else ""
        return f"{self.command} exited with status {proc.returncode}{said}"

    def _record(self, fields: dict[str, str], listed: set[int], began: float) -> None:
        now = time.monotonic()
        for gpu in self.gpus:
            if gpu.matches(fields["index"], fields["uuid"]):
                gpu.record(fields, now)
                listed.add(gpu.gpu)
                if gpu.dropped:
                    gpu.dropped = False
                    log.info("GPU monitoring: %s lists GPU %d again", self.command, gpu.gpu)
                if self._problem is not None and now - began >= RECOVERED_AFTER_S:
                    self._problem = None
                    log.info("GPU monitoring: %s answers again", self.command)

    def _drop_silent_gpus(self, now: float, said: str, resumed: float) -> None:
        """A GPU read before whose lines have stopped coming while the others' come: its numbers are
        unknown from now (they stayed as its last ones, current to /stats and /metrics), said once. Its
        silence counts from its last line, or from when reading ``resumed`` after all were silent."""
        for gpu in self.gpus:
            if gpu.seen is not None and not gpu.dropped and now - max(gpu.seen, resumed) > DROPPED_AFTER_S:
                gpu.dropped, self._said = True, said
                gpu.lapse()
                log.warning("GPU monitoring: %s no longer lists GPU %d (CUDA_VISIBLE_DEVICES entry %s); its "
                            "utilisation and memory are unknown until it does%s", self.command, gpu.gpu, gpu.entry,
                            f" (it said: {said[:200]})" if said else "")


def _fields(line: bytes) -> dict[str, str] | None:
    values = [value.strip() for value in line.decode(errors="replace").split(",", len(QUERY) - 1)]
    if len(values) != len(QUERY) or not values[0].isdigit():
        return None
    return dict(zip(QUERY, values))


def _percent(text: str) -> float | None:
    value = _number(text)
    return value / 100 if value is not None and value <= 100 else None


def _mib(text: str) -> int | None:
    value = _number(text)
    return int(value * MIB) if value is not None else None


def _number(text: str) -> float | None:
    """A finite number of at least 0, else None ("[N/A]", "[Not Supported]", "[GPU requires reset]")."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None
