"""The server's statistics: one set of counters that ``/stats``, ``Server.stats()`` and the notebook
dashboard all read, so no two of them can disagree.

Everything is recorded on the event loop (no locks): a request's queueing by the pool, a batch when it
is handed to a worker, a timeout by the watchdog, and every answer to ``POST /predict`` (its HTTP
status and how long it took) by the HTTP front, at the one place where a response's status is final.
Recording costs O(1); rates and percentiles are worked out only when a :func:`snapshot` is taken.

Every field of :class:`Stats` but the recent window is a running total since the server started, so
``/metrics`` (:mod:`easyserve.metrics`) reads the same object as Prometheus counters and histograms:
``statuses`` as one counter labelled by status, ``batch_sizes`` as a histogram of batch sizes, and the
three :class:`Histogram` fields (answer latency, queue wait, batch run time) as they are.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import dataclasses
import itertools
import logging
import math
import time
from typing import TYPE_CHECKING, Any, Iterator

from . import logs, records
from .wire import STAGES

if TYPE_CHECKING:
    from .pool import WorkerPool

# the kinds of replacement on purpose (pool.WorkerPool._retire), as /stats' "replacements" and /metrics'
# easyserve_worker_replacements_total count them: above MaxWorkerMemoryMB, past MaxBatchesPerWorker, by a
# reload, by a reload's rollback
REPLACEMENTS = ("memory", "batches", "reload", "rollback", "stuck")

__all__ = ["Stats", "Histogram", "Inferences", "snapshot", "STAGES", "PHASES"]


WINDOW_S = 60.0  # latency percentiles cover the answers of the last minute...
WINDOW_ANSWERS = 10_000  # ...or the last this many, if fewer: memory and the sort stay bounded
RATE_S = 5  # requests per second: over the last this many seconds
# Percentiles are worked out again once this old, or once the window has changed by 1%: sorting the
# window (10,000 answers) took 1.5 ms, and a flood of /stats readers starved predictions of the loop.
PERCENTILES_FRESH_S = 0.25
# upper bounds of the buckets of every histogram of seconds: from a fast model's millisecond to a
# minute, past the default TimeoutS (30 s); slower observations fall in the last bucket, +Inf
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    """Running counts of observations in fixed buckets, and their sum: what a Prometheus histogram
    exposes. Recording costs a bisect over the few bounds; the cumulative counts are worked out when read.

    >>> h = Histogram((0.1, 1.0))
    >>> h.observe(0.05); h.observe(0.5); h.observe(3.0)
    >>> h.cumulative(), h.count
    ([(0.1, 1), (1.0, 2), (inf, 3)], 3)
    """

    def __init__(self, bounds: tuple[float, ...] = SECONDS_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # per bucket; the last holds what is above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # a value equal to a bound belongs to that bound's bucket (Prometheus's "le": less or equal)
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations at or below it)`` for each bound, then ``(inf, count)``."""
        return list(zip((*self.bounds, math.inf), itertools.accumulate(self.counts)))

    def to_dict(self) -> dict[str, Any]:
        """The same numbers as JSON: cumulative counts keyed by upper bound (``"+Inf"`` last), sum, count."""
        buckets = {("+Inf" if bound == math.inf else f"{bound:g}"): n for bound, n in self.cumulative()}
        return {"buckets": buckets, "sum": self.sum, "count": self.count}


def _duration(count: int, seconds: float) -> dict[str, int]:
    """A duration statistic of Triton's: ``{"count", "ns"}``."""
    return {"count": count, "ns": round(seconds * 1e9)}


# the parts of a request's time in the server that Triton's statistics count apart, and the worker's stages
# each holds: preparing the inputs (reading the bodies, preprocess), running the model, the outputs
PHASES = {"compute_input": ("read", "preprocess"), "compute_infer": ("forward", "run_batch"),
          "compute_output": ("postprocess", "encode")}


_PHASE_PLACES = [(phase, [STAGES.index(stage) for stage in names]) for phase, names in PHASES.items()]


def phases(stages: tuple) -> dict[str, float]:
    """A batch's stages' seconds (as a worker sends them: :data:`~easyserve.wire.WIRE_STAGES`) as the
    :data:`PHASES` they fall in."""
    return {phase: sum(stages[i] or 0.0 for i in places) for phase, places in _PHASE_PLACES}


class Inferences:
    """The inference requests' accounting of the Open Inference Protocol's statistics extension, as
    Triton keeps it (``GET /v2/models/<m>/stats``): per request, not per batch. A request that
    succeeds counts its time from its arrival to its answer (``success``), its time in the queue
    (``queue``) and the compute phases of the batch it ran in, whole (each request of a batch of 8 is
    charged the batch's time, as Triton charges it); one that fails, its time to its error (``fail``).
    ``inference_count`` counts items (an inference request holding a batch of 4 counts 4);
    ``execution_count`` the batches that answered a request, and ``by_batch_size`` their phases by
    their items. Requests whose client left before their answer was ready are in neither count
    (``client_gone`` has them); one whose client left as an answer of 1 MB or more was written to it was
    answered by the model, and is a success (and in ``client_gone``), as Triton counts the answers it
    hands over, not what clients read.

    Each duration is kept as ``[count, seconds]``, added to in place, and the requests a batch answers
    200 are counted together (:meth:`succeeded`): the event loop's time for each request is its cost."""

    def __init__(self) -> None:
        # success, fail, queue, then PHASES' in their order: [count, seconds] each
        self.durations = {name: [0, 0.0] for name in ("success", "fail", "queue", *PHASES)}
        self.inference_count = self.execution_count = 0
        self.last_inference: float | None = None  # time.time() of the latest answer
        self.by_batch_size: dict[int, list[list]] = {}  # items -> PHASES' [count, seconds]

    def executed(self, items: int, seconds: dict[str, float]) -> None:
        """A batch of ``items`` ran and answered a request; ``seconds``: its :func:`phases`."""
        self.execution_count += 1
        each = self.by_batch_size.get(items)
        if each is None:
            each = self.by_batch_size[items] = [[0, 0.0] for _ in PHASES]
        for duration, value in zip(each, seconds.values()):
            duration[0] += 1
            duration[1] += value

    def answered(self, ok: bool, seconds: float, items: int, queued_s: float) -> None:
        """A request answered after ``seconds`` other than by a batch's 200 (:meth:`succeeded` counts
        those): an error (``ok`` false), or a 200 a batch of no phases gave (none yet)."""
        if ok:
            self.succeeded(1, seconds, queued_s, items, None)
            return
        self.last_inference = time.time()
        fail = self.durations["fail"]
        fail[0] += 1
        fail[1] += seconds

    def succeeded(self, count: int, seconds: float, queued_s: float, items: int,
                  charged: dict[str, float] | None) -> None:
        """``count`` requests a batch answered 200, their seconds from arrival to answer and in the queue
        together, their ``items``, and the batch's :func:`phases` (``charged``), each charged to every
        one of them: counted per batch, not per request, as a request costs the event loop for each call."""
        if not count:
            return
        self.last_inference = time.time()
        durations = self.durations
        for name, value in (("success", seconds), ("queue", queued_s)):
            duration = durations[name]
            duration[0] += count
            duration[1] += value
        self.inference_count += items
        if charged is not None:
            for phase, value in charged.items():
                duration = durations[phase]
                duration[0] += count
                duration[1] += count * value

    def model_stat(self, name: str, version: str) -> dict[str, Any]:
        """The model's ``$model_stat`` object of the statistics extension, as Triton writes it: durations
        in integer nanoseconds, ``last_inference`` in milliseconds since the epoch (0 before any), a
        response cache's counts 0 (there is none), and no ``response_stats`` (they are a decoupled model's,
        which answers a request more than once: Triton gives every other model an empty map)."""
        stats = {name: _duration(*duration) for name, duration in self.durations.items()}
        stats.update(cache_hit=_duration(0, 0.0), cache_miss=_duration(0, 0.0))
        batches = [{"batch_size": size, **{phase: _duration(*d) for phase, d in zip(PHASES, each)}}
                   for size, each in sorted(self.by_batch_size.items())]
        last = 0 if self.last_inference is None else int(self.last_inference * 1000)  # never ahead of the clock
        return {"name": name, "version": version, "last_inference": last, "inference_count": self.inference_count,
                "execution_count": self.execution_count, "inference_stats": stats, "batch_stats": batches,
                "response_stats": {}, "memory_usage": []}


log = logging.getLogger("easyserve")
FAULTS_TOLD_EVERY_S = 60.0  # client faults that no answer shows are logged this often at most
FAULTS_SAID = {  # their lines: the count, then " in the last N s" but for the first
    "malformed": "refused %d request(s) whose HTTP the parser could not read (400)%s",
    "heads_timed_out": "closed %d connection(s) whose request's line and headers were not all in within "
                       "HeaderTimeoutS%s: slow or stalled clients, or a slow-loris attack holding connections",
}


@dataclasses.dataclass
class Stats:
    """Counters behind ``/stats`` and ``/metrics``. Only the event loop's thread records into them or
    reads them."""

    requests: int = 0  # requests queued for a worker
    batches: int = 0  # batches handed to workers
    # batches whose forward failed whole and ran again in parts, to tell the failing requests apart: each cost
    # more calls of forward, and batch_sizes counts it at the size it was formed (a batch that runs out of GPU
    # memory whole and in halves does not, looks healthy there)
    batches_run_apart: int = 0
    timeouts: int = 0  # requests answered 504
    cut_off: int = 0  # requests whose connection went with an HTTP front process that died: no answer
    client_gone: int = 0  # requests whose client closed its connection before their answer (nginx's 499)
    malformed: int = 0  # requests refused by the HTTP parser (a bad header, chunk or length): their route unknown
    slow_readers_reset: int = 0  # connections reset because slow readers held too many answers (MaxBufferedMB)
    heads_timed_out: int = 0  # connections closed as a request's head took past HeaderTimeoutS (slow loris)
    restarts: int = 0  # worker processes restarted after a death or a failed start (not replacements on purpose)
    front_restarts: int = 0  # HTTP front processes (HttpWorkers) restarted after they died
    # worker processes replaced on purpose, between batches, by kind (REPLACEMENTS): not restarts
    replacements: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    latency: Histogram = dataclasses.field(default_factory=Histogram)  # seconds from arrival to answer, of 2xx answers
    queue_wait: Histogram = dataclasses.field(default_factory=Histogram)  # seconds of each stay in the queue
    run_time: Histogram = dataclasses.field(default_factory=Histogram)  # seconds a worker took on a batch it answered
    # seconds each stage (STAGES) took on a batch, for every batch a worker answered in which it ran
    stage_time: dict = dataclasses.field(default_factory=lambda: {stage: Histogram() for stage in STAGES})
    batch_sizes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    inferences: Inferences = dataclasses.field(default_factory=Inferences)  # per request, Triton's statistics
    by_model: dict = dataclasses.field(default_factory=dict)  # (name, version) -> its Inferences (count_for)
    statuses: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # answers by status
    started: float = dataclasses.field(default_factory=time.monotonic)
    # client faults not yet logged, by kind, and when the last line of that kind was (see _tell)
    _unsaid_faults: dict = dataclasses.field(default_factory=dict)
    # CPU seconds spent by the HTTP front processes (HttpWorkers) and by the workers, running totals
    # (count_cpu); "server" stays 0 here: its event loop thread is read when a snapshot is taken
    cpu_s: dict = dataclasses.field(default_factory=lambda: {"server": 0.0, "fronts": 0.0, "workers": 0.0})
    # (time.monotonic() when answered, seconds it took) of recent answers, oldest first
    recent: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=WINDOW_ANSWERS))
    # [whole second, answers in it] for the last minute: the rate stays right however many answers
    # the bounded window above has had to forget
    per_second: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=int(WINDOW_S)))
    answers: int = 0  # every answer recorded
    # the last percentiles worked out: (percents, when, answers then, values)
    _percentiles: tuple | None = dataclasses.field(default=None, repr=False)

    @property
    def queue_wait_s(self) -> float:
        """Time requests spent waiting in the queue, all together."""
        return self.queue_wait.sum

    @property
    def run_s(self) -> float:
        """Time workers spent on batches they answered, all together."""
        return self.run_time.sum

    def count_cpu(self, part: str, mark: float | None, cpu_s: float) -> float | None:
        """A process of ``part`` ("fronts" or "workers") says it has spent ``cpu_s`` CPU seconds since it
        started; ``mark`` is what it said last (``None``: nothing yet, so its start-up is not counted).
        What it spent in between is added to ``part``'s total. Returns the new mark."""
        if mark is not None and cpu_s > mark:
            self.cpu_s[part] += cpu_s - mark
        return cpu_s if mark is None or cpu_s > mark else mark

    def record_batch(self, size: int) -> None:
        self.batches += 1
        self.batch_sizes[size] += 1

    def count_for(self, model: tuple[str, str]) -> None:
        """Count the statistics extension's numbers as ``model``'s (its name and version) from now on. Triton's
        are a model's: a reload to another model starts from none, and one back to an earlier model goes on
        with that one's."""
        if not self.by_model:  # the first model: what was counted so far is its own
            self.by_model[model] = self.inferences
        self.inferences = self.by_model.setdefault(model, Inferences())

    def record_stages(self, stages: tuple) -> None:
        """The seconds each stage took on a batch a worker answered, as a worker sends them
        (:data:`~easyserve.wire.WIRE_STAGES`; ``None`` for a stage that did not run)."""
        for histogram, seconds in zip(self.stage_time.values(), stages):
            if seconds is not None:
                histogram.observe(seconds)

    def record_gone(self, count: int = 1) -> None:
        """Requests whose client closed its connection before their answer."""
        self.client_gone += count

    @contextlib.contextmanager
    def writing_answer(self) -> Iterator[None]:
        """While an answer is written in pieces; nothing to do where the server answers HTTP itself (an
        HTTP front's counts it: see ``front.AnswerRelay``)."""
        yield

    def record_malformed(self, count: int = 1) -> None:
        """Requests that aiohttp's HTTP parser refused (400), before any route: none is in ``statuses``."""
        self.malformed += count
        self._tell("malformed", count)

    def record_slow_reset(self, count: int = 1) -> None:
        """Connections reset because the answers slow readers held together passed their bound (see
        ``guards.SlowReaders``): each answer, counted in ``statuses`` when it began, never arrived whole."""
        self.slow_readers_reset += count

    def record_head_timed_out(self, count: int = 1) -> None:
        """Connections closed because a request's line and headers, begun, were not all in within
        HeaderTimeoutS (a slow loris holds connections open so): no answer, so in no other count."""
        self.heads_timed_out += count
        self._tell("heads_timed_out", count)

    def _tell(self, kind: str, count: int, now: float | None = None) -> None:
        """Log the client faults of ``kind`` that no answer shows: the first at once, then those since,
        ``FAULTS_TOLD_EVERY_S`` after the last line (or with the next that comes later). They were only
        counted, and a log read alone showed nothing of a slow-loris attack or a flood of malformed HTTP; and
        a burst's faults after its first were said only with the next fault, however much later."""
        if count <= 0:  # an HTTP front's report of its counts, with none of this kind
            return
        now = time.monotonic() if now is None else now
        unsaid, said_at = self._unsaid_faults.get(kind, (0, -math.inf))
        if now - said_at < FAULTS_TOLD_EVERY_S:
            self._unsaid_faults[kind] = (unsaid + count, said_at)
            if not unsaid:  # the first since the last line: said then, should no other come (a burst's rest)
                try:
                    asyncio.get_running_loop().call_later(said_at + FAULTS_TOLD_EVERY_S - now, self._say_unsaid, kind)
                except RuntimeError:  # no loop runs (a test's own calls)
                    pass
            return
        self._say(kind, unsaid + count, said_at, now)

    def _say_unsaid(self, kind: str) -> None:
        unsaid, said_at = self._unsaid_faults[kind]
        if unsaid:
            self._say(kind, unsaid, said_at, time.monotonic())

    def _say(self, kind: str, count: int, said_at: float, now: float) -> None:
        self._unsaid_faults[kind] = (0, now)
        since = "" if said_at == -math.inf else f" in the last {now - said_at:.0f} s"
        log.info(FAULTS_SAID[kind] + " (counted in /stats %s; said once a minute at most)", count, since, kind)

    def record_answer(self, status: int, seconds: float | None, now: float | None = None) -> None:
        """One answer to a request: its HTTP status and the seconds from its arrival to the answer. The
        latencies are of successful (2xx) answers alone: under overload, a flood of quick 429s took the
        median down to 0.09 ms while the requests served waited 290 ms; errors have counts of their own.
        ``None``: an answer that never reached its end (a slow reader's, reset), which has no latency."""
        now = time.monotonic() if now is None else now
        self.statuses[status] += 1
        self.answers += 1
        if 200 <= status < 300 and seconds is not None:
            self.latency.observe(seconds)
            self.recent.append((now, seconds))
        second = int(now)
        if self.per_second and self.per_second[-1][0] == second:
            self.per_second[-1][1] += 1
        else:
            self.per_second.append([second, 1])

    def requests_per_s(self, now: float | None = None) -> float:
        """Answers per second over the last ``RATE_S`` seconds (or since the start, if less)."""
        now = time.monotonic() if now is None else now
        since = int(now) - RATE_S + 1  # this second, so far, and the RATE_S - 1 whole ones before it
        count = sum(n for second, n in self.per_second if second >= since)
        span = min(now - since, now - self.started)
        return count / span if span > 0 else 0.0

    def latency_percentiles(self, *percents: float, now: float | None = None) -> list[float | None]:
        """The given percentiles (nearest rank) of 2xx answers' seconds over the last ``WINDOW_S``
        seconds; ``None`` for each when nothing was answered in that time. The same as a moment ago
        (``PERCENTILES_FRESH_S``) while under 1% of the window has been answered since."""
        now = time.monotonic() if now is None else now
        last = self._percentiles
        if (last is not None and last[0] == percents and 0 <= now - last[1] < PERCENTILES_FRESH_S
                and self.answers - last[2] <= len(self.recent) // 100):
            return list(last[3])
        values = self._work_out_percentiles(percents, now)
        self._percentiles = (percents, now, self.answers, values)
        return list(values)

    def _work_out_percentiles(self, percents: tuple[float, ...], now: float) -> list[float | None]:
        recent = self.recent
        while recent and recent[0][0] < now - WINDOW_S:
            recent.popleft()
        ordered = sorted(seconds for _, seconds in recent)
        if not ordered:
            return [None for _ in percents]
        return [ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] for p in percents]


def answered(stats: dict[str, Any]) -> int:
    """The requests a :func:`snapshot` says were answered, whatever their status: the sum of its answers by
    status. Its ``requests`` counts those queued for a worker, which a 400 for bad JSON, a 413 or a drain's
    503 never were: a card said "requests 5" beside "(5 × 200, 4 × 400, 1 × 413)"."""
    return sum(stats["statuses"].values())


def snapshot(pool: WorkerPool | None, buffered_bytes: int = 0, detail: bool = False) -> dict[str, Any]:
    """What ``/stats`` answers and the dashboard shows; call it on the event loop's thread.

    ``pool`` is ``None`` for a server that never started (every count zero). ``detail`` adds a failing
    worker's start-up traceback, which may quote secrets: only for those allowed to see ``/stats``.
    """
    stats = pool.stats if pool is not None else Stats()
    workers = pool.describe(detail) if pool is not None else []
    now = time.monotonic()
    p50, p99 = stats.latency_percentiles(50, 99, now=now)
    return {
        "requests": stats.requests,
        "buffered_bytes": buffered_bytes,
        "batches": stats.batches,
        "batches_run_apart": stats.batches_run_apart,
        "timeouts": stats.timeouts,
        "restarts": stats.restarts,
        "front_restarts": stats.front_restarts,
        # worker processes replaced on purpose, by kind: MaxWorkerMemoryMB, MaxBatchesPerWorker, a reload, a rollback
        "replacements": {kind: stats.replacements[kind] for kind in REPLACEMENTS},
        "cut_off": stats.cut_off,
        "client_gone": stats.client_gone,
        "malformed": stats.malformed,
        "slow_readers_reset": stats.slow_readers_reset,
        "heads_timed_out": stats.heads_timed_out,
        "queue_depth": len(pool.queue) if pool is not None else 0,
        "queue_wait_s": stats.queue_wait_s,
        "run_s": stats.run_s,
        "batch_sizes": {str(k): v for k, v in sorted(stats.batch_sizes.items())},
        "passed_over": pool.queue.passed_over if pool is not None else 0,
        "statuses": {str(k): v for k, v in sorted(stats.statuses.items())},
        "requests_per_s": round(stats.requests_per_s(now), 3),
        "latency_p50_ms": None if p50 is None else round(p50 * 1000, 3),
        "latency_p99_ms": None if p99 is None else round(p99 * 1000, 3),
        # where workers' time went: each stage's seconds and the batches it ran in, of batches answered
        "stages": {stage: {"seconds": round(h.sum, 6), "batches": h.count}
                   for stage, h in stats.stage_time.items() if h.count},
        "histograms": {"latency_s": stats.latency.to_dict(), "queue_wait_s": stats.queue_wait.to_dict(),
                       "run_s": stats.run_time.to_dict()},
        "log_records_dropped": records.dropped(),
        "worker_lines_not_logged": logs.unlogged(),
        "uptime_s": round(now - stats.started, 3) if pool is not None else 0.0,
        "cpu_s": {part: round(seconds, 3) for part, seconds in (pool.cpu_seconds() if pool is not None
                                                                 else stats.cpu_s).items()},
        "gpus": pool.gpus.readings() if pool is not None else [],
        # None with no GPU; else whether nvidia-smi reads them, and why not (the GPUs above are those read)
        "gpu_monitoring": pool.gpus.state() if pool is not None else None,
        # why the last reload was undone (its workers died before answering anything), if it was
        "reload_rolled_back": pool.rolled_back if pool is not None else None,
        # the last reload tried (server.reload(), SIGHUP): its handle, when, and "done", "failed", "abandoned" or
        # "rolled back", with the error's last line
        "last_reload": pool.last_reload if pool is not None else None,
        "workers": workers,
    }
