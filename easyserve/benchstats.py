"""What a server says it did while :func:`easyserve.bench` measured it: its ``/stats``, read before and
after each measurement (:class:`ServerStats`), and the difference of the two written into the
:class:`~easyserve.bench.Run` (batch sizes formed, cores used, server-side latency, GPU utilisation).
A server that is not easyserve, or hides ``/stats``, leaves those columns empty; one that trickles its
answer in, or wants an API key it was not given, is said so once rather than holding the run up."""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from typing import TYPE_CHECKING

from . import loadgen
from .wire import STAGES
from .deadlines import DEADLINES

if TYPE_CHECKING:
    from .bench import Run

STATS_TIMEOUT_S = 10.0  # for the whole of a /stats answer: one that trickles in must not hold the run up
READ_AT = "_read_at"  # added to a read /stats: when (time.monotonic()) the read began and ended
STATS_MOST = 16 * 2**20  # bytes of a /stats answer read at most (easyserve's: a few kB, 100 per GPU)
_DEADLINES = DEADLINES  # ends /stats reads that outlive it


class Unreadable(Exception):
    """A ``/stats`` read that failed or was refused for a reason of the moment (a closed connection, a
    500): of a server known to have one, worth saying, since a level's server columns stay empty."""


class ServerStats:
    """Reads of a server's ``/stats`` for one :func:`bench` call. One that does not answer within
    :data:`STATS_TIMEOUT_S`, or that refuses the API key, is noted, once, in ``notes``, and not asked
    again: the server columns stay empty rather than every level waiting for it. Once a read has
    succeeded, one that fails is noted with the level it leaves without server columns."""

    def __init__(self, base: str, headers: dict, notes: list[str]) -> None:
        self.base, self.headers, self.notes = base, headers, notes
        self.silent = False
        self.known = False  # a read has found easyserve's /stats: a later failure is news
        self.devices: list[str] = []  # what its workers ran on, by the last read that said

    def read(self, when: str = "") -> dict | None:
        """The server's ``/stats`` now; ``when`` (``"c=8, after measuring"``) names the moment in a note."""
        if self.silent:
            return None
        began = time.monotonic()
        try:
            stats = read_stats(self.base, self.headers)
        except Unreadable as exc:
            if self.known:
                self.notes.append(f"{when}: the server's /stats {exc}: the server columns of that level are left empty")
            return None
        except TimeoutError as exc:
            self.silent = True
            self.notes.append(f"{exc}: the server columns are left empty")
            return None
        except PermissionError as exc:
            self.silent = True
            hint = ("the API key sent (--api-key, or $EASYSERVE_API_KEY) is not the server's" if self.headers else
                    "give the server's API key in $EASYSERVE_API_KEY (api_key= from Python, or --api-key KEY)")
            self.notes.append(f"{exc}: the server columns are left empty; {hint}")
            return None
        except LookupError as exc:  # a proxy that refuses /stats, and says why: said too
            self.silent = True
            self.notes.append(f"{exc}: the server columns are left empty")
            return None
        self.known = self.known or stats is not None
        if stats is not None:
            stats[READ_AT] = (began, time.monotonic())
            self.devices = devices(stats) or self.devices
        return stats


def read_stats(base: str, headers: dict, timeout: float | None = None) -> dict | None:
    """The server's ``/stats``; ``None`` where it has none (not easyserve, or behind a proxy that hides it).
    ``TimeoutError`` when the whole answer takes longer than ``timeout`` (default :data:`STATS_TIMEOUT_S`):
    a socket's timeout bounds each read, and a server sending a byte now and then would never reach it.
    ``PermissionError`` when the server refuses the API key sent (or wants one); ``LookupError`` when it
    answers 404 with an error of its own to say why (the config ``gen-nginx`` writes refuses ``/stats``);
    :class:`Unreadable` when it answers another status, or the connection fails."""
    timeout = STATS_TIMEOUT_S if timeout is None else timeout
    refused = hidden = None
    parts = urllib.parse.urlsplit(base)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = kind(parts.hostname, parts.port, timeout=timeout)
    deadline = time.monotonic() + timeout
    _DEADLINES.watch(connection, deadline)  # the Client's: it shuts the connection down when it comes
    try:
        connection.request("GET", parts.path + "/stats", headers=headers)
        _DEADLINES.watch(connection, deadline, connection.sock)  # the answer may take the socket
        with connection.getresponse() as response:
            data = response.read(STATS_MOST + 1)  # a server sending without end: not read past it
            if response.status in (401, 403):  # behind an API key: said, rather than columns left empty unsaid
                refused = f"{response.status} ({loadgen.body_text(data)})"
            elif response.status == 404 and _says_why(data):
                hidden = f"404 ({loadgen.body_text(data)})"
            elif response.status != 200:
                raise Unreadable(f"answered {response.status} ({loadgen.body_text(data)})")
            elif len(data) > STATS_MOST:
                return None  # not easyserve's
        stats = json.loads(data) if refused is None and hidden is None else None
    except (OSError, ValueError, RecursionError, http.client.HTTPException) as exc:  # HTTPException: cut short
        if _DEADLINES.forget(connection) or isinstance(exc, TimeoutError):
            raise TimeoutError(f"the server's /stats did not answer within {timeout:g} s") from None
        if isinstance(exc, (ValueError, RecursionError)):
            return None  # not JSON: not easyserve's
        raise Unreadable(f"could not be read ({type(exc).__name__}: {exc})") from None
    finally:
        _DEADLINES.forget(connection)
        connection.close()
    if refused is not None:
        raise PermissionError(f"the server's /stats answered {refused}")
    if hidden is not None:
        raise LookupError(f"the server's /stats answered {hidden}")
    return stats if isinstance(stats, dict) and isinstance(stats.get("batch_sizes"), dict) else None


def _says_why(data: bytes) -> bool:
    """Whether a 404's body is ``{"error": "..."}``, as easyserve's errors and nginx's before it are: a
    server that has no /stats at all (another kind) answers its own page, and its columns stay empty unsaid."""
    try:
        value = json.loads(data[:loadgen.SAMPLE_BYTES])
    except (ValueError, RecursionError):
        return False
    return isinstance(value, dict) and isinstance(value.get("error"), str)


def add_server_side(run: Run, before: dict, after: dict) -> str | None:
    """What the server did during the measurement: the difference of two ``/stats`` reads. A ``/stats``
    that is not as this easyserve writes it (an older one, another server) leaves those columns
    empty, rather than losing the measurement to a ``KeyError``. Returns why they are empty where a
    user should hear it: the server restarted in between."""
    try:
        for stats in (before, after):
            _check_numbers(stats)
        return _read_server_side(run, before, after)
    except (KeyError, TypeError, ValueError, AttributeError, ArithmeticError):
        return None


def devices(stats: dict) -> list[str]:
    """What the server's workers run on, each once (``cpu``, ``cuda (GPU 0)``), by its ``/stats``: a config's
    GPUs that the machine lacks become CPU workers, and ``gpus`` is empty then, as it is on GPUs whose
    monitoring fails."""
    workers = stats.get("workers")
    found = [w.get("device") for w in workers if isinstance(w, dict)] if isinstance(workers, list) else []
    return sorted({device for device in found if isinstance(device, str)})


def gpus_unread(stats: dict | None) -> str | None:
    """Why a GPU server's ``/stats`` lacks some GPU's utilisation (``nvidia-smi`` fails, or does not list
    a GPU), or ``None``: on CPU, while it reads them all, or from a server that does not say."""
    monitoring = stats.get("gpu_monitoring") if isinstance(stats, dict) else None
    if isinstance(monitoring, dict) and monitoring.get("up") is False and isinstance(monitoring.get("problem"), str):
        return monitoring["problem"][:300]
    return None


MOST_BATCH_SIZES = 4096  # MaxBatchSize's own bound: a batch size past it, or more sizes, is no easyserve's
_NUMBERS = ("uptime_s", "restarts", "front_restarts", "batches_run_apart", "requests")


def _check_numbers(stats: dict) -> None:
    """``ValueError`` unless the numbers the bench reads from ``stats`` are ones a server could have
    written: finite, at least 0 (not NaN, which --json then wrote, nor a 400-digit integer, which
    overflowed into a traceback that lost every level measured), batch sizes whole and at most 4096."""
    sizes = stats["batch_sizes"]
    if len(sizes) > MOST_BATCH_SIZES or not all(
            isinstance(size, str) and size.isdigit() and 1 <= int(size) <= MOST_BATCH_SIZES for size in sizes):
        raise ValueError("batch sizes that no easyserve writes")
    numbers = [*sizes.values(), *(stats[name] for name in _NUMBERS if stats.get(name) is not None),
               *dict(stats.get("cpu_s", {})).values()]
    for histogram in dict(stats.get("histograms", {})).values():
        numbers += [histogram["count"], histogram["sum"]]
    for stage in dict(stats.get("stages", {})).values():
        numbers += [stage["batches"], stage["seconds"]]
    for gpu in stats.get("gpus", []):
        numbers += [gpu["busy_s"], gpu["sampled_s"]]
    if not all(type(n) in (int, float) and 0 <= n < 1e15 for n in numbers):  # NaN compares false
        raise ValueError("a number that no easyserve writes")


def _read_server_side(run: Run, before: dict, after: dict) -> str | None:
    sizes = {size: n - before["batch_sizes"].get(size, 0) for size, n in after["batch_sizes"].items()}
    if any(n < 0 for n in sizes.values()) or _restarted(before, after):
        # the difference means nothing; a restart is also why some requests may have failed
        return ("the server restarted during the measurement (by its /stats, whose counters went back or whose "
                "uptime grew by less than the measurement lasted)")
    run.gpu_util = _gpu_utilisation(before.get("gpus", []), after.get("gpus", []))
    if "restarts" in before and "restarts" in after:
        run.server_restarts = sum(max(0, after.get(name, 0) - before.get(name, 0))
                                  for name in ("restarts", "front_restarts"))
    elapsed = after.get("uptime_s", 0) - before.get("uptime_s", 0)
    if elapsed > 0 and "cpu_s" in before and "cpu_s" in after:
        for field, part in (("server_cores", "server"), ("front_cores", "fronts"), ("worker_cores", "workers")):
            spent = after["cpu_s"].get(part, 0.0) - before["cpu_s"].get(part, 0.0)  # "fronts": since 0.1
            setattr(run, field, round(max(0.0, spent) / elapsed, 3))
        if not run.front_cores:
            run.front_cores = None  # one front: the server's event loop is it
    run.batch_sizes = {size: n for size, n in sorted(sizes.items(), key=lambda item: int(item[0])) if n}
    batches = sum(run.batch_sizes.values())
    if batches:
        run.mean_batch = round(sum(int(size) * n for size, n in run.batch_sizes.items()) / batches, 2)
    if "requests" in before and "requests" in after:  # bench's, and any other client's
        run.server_requests = max(0, after["requests"] - before["requests"])
    if "batches_run_apart" in before and "batches_run_apart" in after:  # since 0.1
        run.batches_run_apart = max(0, after["batches_run_apart"] - before["batches_run_apart"])
    hist_before, hist_after = before.get("histograms", {}), after.get("histograms", {})
    for field, name in (("server_latency_ms", "latency_s"), ("server_queue_ms", "queue_wait_s"),
                        ("server_batch_ms", "run_s")):
        if name in hist_before and name in hist_after:
            count = hist_after[name]["count"] - hist_before[name]["count"]
            total = hist_after[name]["sum"] - hist_before[name]["sum"]
            if count > 0:
                setattr(run, field, round(total / count * 1000, 3))
    stages_before, stages_after, stages = before.get("stages", {}), after.get("stages", {}), {}
    # the stages easyserve times, in the order they run: a column each, whatever else a server's /stats holds
    for stage, after_stage in ((stage, stages_after[stage]) for stage in STAGES if stage in stages_after):
        first = stages_before.get(stage, {"batches": 0, "seconds": 0.0})
        count = after_stage["batches"] - first["batches"]
        if count > 0:
            stages[stage] = round((after_stage["seconds"] - first["seconds"]) / count * 1000, 3)
    run.server_stages_ms = stages or None
    return None


def _restarted(before: dict, after: dict) -> bool:
    """Whether the server that answered ``after`` started after the one that answered ``before`` was
    read: its uptime went back, or is less than the time between the reads (a server restarted early
    in a level has run longer, by the end, than the old one had at its start; it was missed). A
    ``/stats`` without ``uptime_s`` (an older easyserve's) tells nothing."""
    if "uptime_s" not in before or "uptime_s" not in after:
        return False
    if after["uptime_s"] < before["uptime_s"]:
        return True
    # between the end of one read and the start of the other, the same server's uptime grows by as much,
    # on top of what it was: its uptime before is the margin, and 1% for clocks that run at other rates
    return after["uptime_s"] < 0.99 * (after[READ_AT][0] - before[READ_AT][1])


def _gpu_utilisation(before: list[dict], after: list[dict]) -> dict[str, float] | None:
    """Each GPU's mean utilisation between two reads: the growth of its busy time over that of the
    time its readings covered (see :mod:`easyserve.gpus`)."""
    earlier = {gpu["gpu"]: gpu for gpu in before}
    means = {}
    for gpu in after:
        first = earlier.get(gpu["gpu"], {"busy_s": 0.0, "sampled_s": 0.0})  # first read during the measurement
        sampled = gpu["sampled_s"] - first["sampled_s"]
        if sampled > 0 and gpu["busy_s"] >= first["busy_s"]:
            means[str(gpu["gpu"])] = round((gpu["busy_s"] - first["busy_s"]) / sampled, 3)
    return means or None
