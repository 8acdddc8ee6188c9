"""``easyserve.bench``: how many requests a server answers per second, and how fast, at given concurrencies.

::

    report = easyserve.bench("http://127.0.0.1:9876", "picture.jpg", concurrency=[1, 8, 32], duration=10)
    report                      # a table: requests/s, p50/p90/p99, errors by status, batch sizes formed
    report.to_json("bench.json"); report.to_csv("bench.csv")
    easyserve.bench(url, "picture.jpg", rate=[200, 400], arrivals="poisson")   # an open loop: p99 at a load

With ``concurrency`` alone, the load is a closed loop: that many users, each sending its next request
once the last is answered, so the server sets the pace, and requests/s is what it can do. With
``rate``, requests are due on a schedule whatever the server's pace (see :mod:`easyserve.loadgen`),
``concurrency`` being the most that may be in flight at once, and each latency runs from when its
request was due: what users would see at that load, queueing included.

The load comes from separate client processes (:mod:`easyserve.loadgen`), never from the caller's:
in a notebook the server may run in the caller's process, and the two would share one interpreter
lock. Each concurrency level runs a warm-up (connections opened, caches filled, not counted), then
the measurement. Between the two every client waits for its requests in flight, and ``/stats`` is
read before and after, so the server's counts (batch sizes, answers by status) cover exactly the
measured requests. ``clients_processes=None`` picks the number of client processes: one per
``CONNECTIONS_PER_PROCESS`` users, and more when a warm-up finds a client process busier than
``BUSY_CLIENT`` of a core, since a saturated client would measure itself rather than the server.
"""

from __future__ import annotations

import array
import collections
import dataclasses
import heapq
import itertools
import json
import math
import numbers
import os
import random
import statistics
import textwrap
import time
import urllib.parse
from pathlib import Path
from typing import Any, Sequence

from . import loadgen
from .benchclients import Clients, ClientsFailed, split
from .benchstats import ServerStats, add_server_side, gpus_unread
from .client import ROUTES
from .devices import cpu_count
from .payloads import payload_from
from .reports import Display, print_report, runs_html, runs_table, settings_text, write_csv

__all__ = ["bench", "Run", "BenchReport", "Interrupted", "NothingMeasured", "Unreachable", "Rejected", "LoadFailed"]

CONNECTIONS_PER_PROCESS = 256  # users one client process starts with, at most
RATE_CONNECTIONS = 256  # an open loop's most requests in flight, unless told: opened only as needed
# Users (each a connection of its own) at most: -c 100000000 took a client process 12 GB before the
# kernel killed it, past what one machine's ports or descriptors would give it anyway.
MAX_CONCURRENCY = 100_000
START_DELAY_S = 0.05  # from sending "measure" to the start of the client processes' common schedule
SHARED_CORES = 0.1  # share of this machine's cores the clients may take from a server on it unremarked
BUSY_CLIENT = 0.7  # share of a core above which a client process may be what limits the run
CLIENT_TARGET = 0.4  # share of a core each client process is given when the load is spread again
MIN_TOLD_S = 0.5  # a level measured for less is too short to say that its clients were busy
BUSY_LOOP = 0.85  # share of a core above which the server's one event loop may be what limits a level
IDLE_GPU = 0.6  # mean utilisation under which a level's GPUs waited for work much of the time
QUEUED = 0.25  # a mean queue wait, as a share of a batch's run, from which requests waited for the workers
OUTSIDE_MS = 250.0  # a mean latency at the clients this much above the server's own, and twice it, is told


@dataclasses.dataclass
class Run:
    """What one level (a concurrency, or an open loop's rate) measured. Latencies are of successful
    (2xx) answers, in ms, to reading the whole answer from sending the request (a closed loop) or
    from when it was due (an open loop), their percentiles by nearest rank over every client process's
    latencies together; ``requests_per_s`` counts those answers over ``seconds``, from the first
    request to the last answer. An open loop's requests due and never sent (``unsent``, every
    connection busy until the time was up) are errors too, and each counts among the latencies with
    its wait from when it was due to the run's end: the percentiles are then lower bounds (the table
    marks them ``≥``), since those requests would have waited longer still."""

    concurrency: int
    processes: int  # client processes that shared the users
    requests: int  # requests sent in the measurement (answered or not)
    seconds: float
    requests_per_s: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    max_ms: float | None
    errors: int  # answers that were not 2xx, plus requests that got no answer (an open loop's unsent among them)
    statuses: dict[str, int]  # every answer by HTTP status
    connection_errors: dict[str, int]  # requests with no answer, by what went wrong ("unsent": never sent)
    client_cpu: float  # the busiest client process's share of a core while measuring
    clients_cores: float | None = None  # CPU cores all the client processes used while measuring
    # what went wrong, once for each key of the errors: the first answer's text for each error status
    # (its body on one line, at most 300 characters), the first exception's for each kind of failure
    error_texts: dict[str, str] = dataclasses.field(default_factory=dict)
    rate: float | None = None  # an open loop's requests per second, due on a schedule; None: a closed loop
    unsent: int = 0  # an open loop's requests still waiting for a free connection when the time was up
    seed: int | None = None  # Poisson arrivals': the same seed, the same gaps (rate for rate)
    backlog: list[int] | None = None  # an open loop's requests due and unanswered halfway and at the end (unsent in)
    batch_sizes: dict[str, int] | None = None  # batches the server formed meanwhile, by size (from /stats)
    mean_batch: float | None = None
    # mean time from a request's arrival at the server (its headers read) to its answer written, of 2xx answers
    server_latency_ms: float | None = None
    server_queue_ms: float | None = None  # mean time a request waited in the server's queue, meanwhile
    server_batch_ms: float | None = None  # mean time a worker took over one batch, meanwhile
    # of that, the mean time of each stage on a batch it ran in (read, preprocess, forward...), meanwhile
    server_stages_ms: dict[str, float] | None = None
    server_cores: float | None = None  # CPU cores the server's event loop used meanwhile
    front_cores: float | None = None  # CPU cores its HTTP front processes used meanwhile (HttpWorkers above 1)
    worker_cores: float | None = None  # CPU cores the workers used meanwhile
    # server processes (workers, HTTP fronts) that died and were started again meanwhile (from /stats): a
    # setting whose workers crash under the load (out of memory) is not one to choose, whatever its numbers
    server_restarts: int | None = None
    # batches whose forward failed whole and ran again in parts meanwhile (from /stats): the batch sizes above
    # count them at the size they were formed, so a batch size that fails (out of GPU memory) looked healthy
    batches_run_apart: int | None = None
    gpu_util: dict[str, float] | None = None  # each GPU's mean utilisation meanwhile (0-1), by config GPU id
    # requests the server took meanwhile (from /stats): more than ``requests`` when other clients sent some too,
    # whose batches, queue waits and CPU the server columns then include
    server_requests: int | None = None
    # seconds into the measurement at which the server stopped answering: the first request that got no answer
    # after the last answered one, where none was answered after it (it went away, or hangs); None: it answered
    # to the end. Its requests/s is still over the whole level, the time it was gone included
    stopped_answering_s: float | None = None
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)  # a sweep's ProcessPerGPU, MaxBatchSize

    def row(self) -> dict[str, Any]:
        """One flat row for CSV: the settings first, counts by status as ``status_200``..., what the
        server said with each error status as ``error_text_401``..."""
        values = dataclasses.asdict(self)
        row = {**values.pop("settings")}
        for key in ("statuses", "connection_errors", "batch_sizes", "gpu_util", "error_texts", "server_stages_ms"):
            values.pop(key)
        backlog = values.pop("backlog") or ["", ""]  # two numbers, two columns (not a list's repr)
        row.update(values, fell_behind=self.fell_behind, backlog_halfway=backlog[0], backlog_end=backlog[1])
        row.update({f"server_{stage}_ms": ms for stage, ms in (self.server_stages_ms or {}).items()})
        row.update({f"status_{code}": n for code, n in self.statuses.items()})
        row.update({f"failed_{kind}": n for kind, n in self.connection_errors.items()})
        row.update({f"batches_of_{size}": n for size, n in (self.batch_sizes or {}).items()})
        row.update({f"gpu{gpu}_util": value for gpu, value in (self.gpu_util or {}).items()})
        row.update({f"error_text_{key}": text for key, text in self.error_texts.items()})
        return row

    def to_dict(self) -> dict[str, Any]:
        """Every field, and :attr:`fell_behind`, for JSON: a script reading it sees an open loop whose
        server did not keep up without working it out again."""
        return {**dataclasses.asdict(self), "fell_behind": self.fell_behind}

    @property
    def fell_behind(self) -> bool:
        """An open loop whose server did not keep up with its rate: requests due were never sent,
        or its backlog (requests due and not yet answered) grew from halfway through the schedule
        to its end by more than it fluctuates. A server that keeps up holds about rate x latency of
        them whenever one looks, by Little's law, give or take about their square root; one that
        falls behind adds what it cannot answer, more the longer the run."""
        if self.rate is None or not self.backlog:
            return False
        halfway, end = self.backlog
        return self.unsent > 0 or end - halfway > 2 * math.sqrt(halfway + end + 1)

    @property
    def level(self) -> str:
        """What was varied: ``concurrency 8``, or an open loop's ``rate 400/s``."""
        return f"concurrency {self.concurrency}" if self.rate is None else f"rate {self.rate:g}/s"

    @property
    def gpu_percent(self) -> float | None:
        """The mean utilisation of the server's GPUs meanwhile, in percent; ``None`` where unknown."""
        return 100 * statistics.fmean(self.gpu_util.values()) if self.gpu_util else None

    def errors_text(self, texts: bool = False) -> str:
        """``400: 12, ConnectionRefusedError: 3``; ``0`` when there were none. ``texts`` adds what
        went wrong to each: ``401: 12 (wrong API key)``."""
        return errors_text(self.statuses, self.connection_errors, self.error_texts if texts else {})


def errors_text(statuses: dict[str, int], failures: dict[str, int], texts: dict[str, str]) -> str:
    """Counts of error statuses and of failures by kind, each with its text from ``texts``, if any."""
    counts = [(code, n) for code, n in statuses.items() if not code.startswith("2")] + list(failures.items())
    return ", ".join(f"{key}: {n}" + (f" ({texts[key]})" if texts.get(key) else "") for key, n in counts) or "0"


@dataclasses.dataclass
class BenchReport:
    """The runs of one :func:`bench` call, one per concurrency, and what was sent where.
    Shown as a table in a notebook; :meth:`print` for a terminal."""

    url: str
    payload: str
    runs: list[Run]
    notes: list[str] = dataclasses.field(default_factory=list)  # what the reader should know (a busy client)
    setup: dict[str, Any] = dataclasses.field(default_factory=dict)  # how it was measured, and on what (the JSON's)

    def table(self, title: str | None = None) -> Any:
        """The runs as a ``rich`` table."""
        return runs_table(self.runs, title or self._title())

    def _title(self) -> str:
        return f"{self.url} · {self.payload}"

    def print(self) -> None:
        """The table, and the notes, on the terminal (or a notebook's output)."""
        print_report(self.runs, self._title(), self.notes)

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "payload": self.payload, "setup": self.setup, "notes": self.notes,
                "runs": [run.to_dict() for run in self.runs]}

    def to_json(self, path: str | os.PathLike) -> None:
        """Everything measured, as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def to_csv(self, path: str | os.PathLike) -> None:
        """One row per run."""
        write_csv(path, [run.row() for run in self.runs])

    def plot(self, path: str | os.PathLike | None = None) -> Any:
        """Requests/s, and p50, p90 and p99, against the levels (concurrency, or rate), and, where the
        server reported its GPUs, their mean utilisation: where throughput stops growing and latency
        starts to; written to ``path`` if given (``--plot``), shown in a notebook. Returns the
        matplotlib figure (matplotlib is the ``plot`` extra)."""
        from .plots import figure_class, latency_scale, mark_doubtful

        levels = [run.level.removeprefix("concurrency ").removeprefix("rate ") for run in self.runs]
        on_gpus = any(run.gpu_util for run in self.runs)
        figure = figure_class()(figsize=(max(6.0, 0.9 * len(levels) + 3), 8.5 if on_gpus else 6.0),
                                 layout="constrained")
        axes = figure.subplots(3 if on_gpus else 2, 1, sharex=True)
        xs = range(len(self.runs))
        axes[0].plot(xs, [run.requests_per_s for run in self.runs], marker="o")
        axes[0].set_ylabel("requests/s (2xx)")
        axes[0].set_ylim(0, 1.12 * max((run.requests_per_s for run in self.runs), default=0) or 1)
        for name in ("p50_ms", "p90_ms", "p99_ms"):
            axes[1].plot(xs, [math.nan if getattr(run, name) is None else getattr(run, name) for run in self.runs],
                         marker="o", label=name.removesuffix("_ms"))
        axes[1].set_ylabel("latency (ms)")
        latency_scale(axes[1], [getattr(run, name) for run in self.runs for name in ("p50_ms", "p90_ms", "p99_ms")])
        mark_doubtful(axes[0], axes[1], list(xs), self.runs, ["p50_ms", "p90_ms", "p99_ms"])
        axes[1].legend(fontsize="small")
        if any(run.errors for run in self.runs):
            axes[0].legend(fontsize="small")
        if on_gpus:
            axes[2].plot(xs, [math.nan if run.gpu_percent is None else run.gpu_percent for run in self.runs],
                         marker="o")
            axes[2].set_ylabel("GPU utilisation (%)")
            axes[2].set_ylim(0, 105)
        for axis in axes:
            axis.grid(alpha=0.3)
        axes[-1].set_xticks(list(xs), levels)
        axes[-1].set_xlabel("concurrency" if all(run.rate is None for run in self.runs) else "requests/s offered")
        figure.suptitle(textwrap.fill(self._title(), 70), fontsize="medium")
        if path is not None:
            figure.savefig(path, dpi=110)
        figure.show_in_notebook()
        return figure

    def _repr_html_(self) -> str:
        return runs_html(self.runs, self._title(), self.notes)

    def __repr__(self) -> str:  # a notebook's plain text of it: not the machine's name and kernel (setup)
        return f"<BenchReport {self._title()}: {len(self.runs)} run(s)>"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped :func:`bench` or :func:`~easyserve.sweep`: ``report`` holds the levels
    measured before it (a note says which one it stopped), ``level`` names that one. A
    ``KeyboardInterrupt``, so that code catching that sees it as one."""

    def __init__(self, report: Any, level: str) -> None:
        runs = len(getattr(report, "runs", None) or ())
        kept = (f"{runs} run(s) measured before it are in this exception's .report (in a notebook: "
                "sys.last_value.report)" if runs else "nothing was measured before it")
        super().__init__(f"interrupted during {level}: {kept}")
        self.report, self.level = report, level


class NothingMeasured(Exception):
    """A level could not be measured: its warm-up found nothing to measure (:class:`Unreachable`,
    :class:`Rejected`), or the load generator failed (:class:`LoadFailed`). ``report`` holds the levels
    measured before it (none when the server was never there)."""

    report: Any = None


class LoadFailed(NothingMeasured, RuntimeError):
    """A client process of the load generator exited during a level (the out-of-memory killer's choice,
    say) or stopped answering. ``report`` holds the levels measured before it, which were lost with it."""


class Unreachable(NothingMeasured, ConnectionRefusedError):
    """A level's warm-up had no request answered: every connection refused (nothing listens at the URL),
    every request timed out (a server slower than ``timeout_s``), or failed otherwise (a host name
    that does not resolve, a server that hangs up), as ``failures`` count by kind, ``texts`` say.
    ``report`` holds the levels measured before it (none when the server was never there)."""

    def __init__(self, url: str, report: Any, failures: dict[str, int], texts: dict[str, str],
                 timeout_s: float | None = None) -> None:
        self.failures, self.texts, self.report = failures, texts, report
        if set(failures) <= {"ConnectionRefusedError"}:
            super().__init__(f"cannot reach {url}: connection refused; is the server running?")
        elif set(failures) == {"TimeoutError"} and timeout_s is not None:  # there, but slower than the timeout
            super().__init__(f"the server at {url} answered no warm-up request within --timeout {timeout_s:g} s: "
                             "raise --timeout (timeout= from Python)")
        else:
            super().__init__(f"cannot reach {url}: every warm-up request failed: {errors_text({}, failures, texts)}")


class Rejected(NothingMeasured):
    """A level's warm-up had every request answered with an error status (a wrong payload, an API key
    missing): nothing would be measured. ``statuses`` counts them, ``failures`` the requests with no
    answer, ``texts`` holds what the server said with each; ``report`` the levels measured before."""

    def __init__(self, url: str, report: Any, statuses: dict[str, int], failures: dict[str, int],
                 texts: dict[str, str], api_key: bool) -> None:
        self.statuses, self.failures, self.texts, self.report = statuses, failures, texts, report
        self.api_key = api_key
        why = (f"every warm-up request to {url} was answered with an error, so nothing would be measured: "
               f"{errors_text(statuses, failures, texts)}")
        if "401" in statuses:
            why += ("; the API key sent (--api-key, or $EASYSERVE_API_KEY) is not the server's" if api_key else
                    "; the server wants an API key: give it in $EASYSERVE_API_KEY (api_key= from Python; --api-key KEY "
                    "is seen by every user of the machine)")
        super().__init__(why)


def bench(url: str, payload: Any = None, *, concurrency: int | Sequence[int] | None = None,
          rate: float | Sequence[float] | None = None, arrivals: str = "constant", seed: int | None = None,
          duration: float = 10.0, requests: int | None = None, warmup: float = 2.0,
          clients_processes: int | None = None, timeout: float = 60.0, api_key: str | None = None,
          progress: bool | None = None, settings: dict[str, Any] | None = None) -> BenchReport:
    """Measure the server at ``url`` with closed-loop load at each ``concurrency`` in turn (default 1,
    8 and 32), or with ``rate``, open-loop load at each rate in turn (requests per second, due
    ``constant``-ly spaced or as ``poisson`` ``arrivals``; ``concurrency``, one number, the most in
    flight at once, default :data:`RATE_CONNECTIONS`). Poisson arrivals draw their gaps from ``seed``
    (default: a new one, kept in each :class:`Run`), so a run can be repeated with the very same ones.

    ``payload`` is what each request carries: a :class:`~easyserve.payloads.Payload`, a dict (or a
    list of dicts, sent in turn), a ``.json`` file, an image file (sent as ``{"img": "<base64>"}``),
    or ``None`` for the built-in demo model's request. Each level warms up for ``warmup`` seconds,
    then measures for ``duration`` seconds, or until ``requests`` requests if given. A warm-up whose
    requests all fail raises at once: :class:`Unreachable` when none was answered (refused connections,
    a host name that does not resolve), :class:`Rejected` when all were answered with an error status
    (what the server said with each in the message); a client process that dies (the out-of-memory
    killer's) raises :class:`LoadFailed`; Ctrl-C raises :class:`Interrupted`; each carries
    the report of the levels measured before. Each error status's first answer is kept, as text, in
    :attr:`Run.error_texts`.
    ``clients_processes`` fixes the number of client processes (``None``: as many as the load needs).
    ``api_key`` (default ``$EASYSERVE_API_KEY``) goes with every request and the ``/stats`` reads; a
    query string in ``url`` (``http://host:9876?top_k=1``) goes with every request, as its options.
    ``progress`` shows a live count (default: in a terminal, and in a notebook, where each level's line stays)::

        easyserve.bench(server.url, {"x": [5.1, 3.5, 1.4, 0.2]}, concurrency=[1, 16], duration=5)
        easyserve.bench(server.url, {"x": [5.1, 3.5, 1.4, 0.2]}, rate=[100, 1000], arrivals="poisson")
    """
    base, query = server_url(url)  # the query goes with every request: the handle's task["parameters"]
    levels, connections = load_levels(concurrency, rate, arrivals)
    seed = arrivals_seed(arrivals, seed)
    check_options(requests, duration, clients_processes, timeout, warmup)
    body = payload_from(payload)
    api_key = api_key or os.environ.get("EASYSERVE_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    job = {"url": base + body.path + (f"?{query}" if query else ""), "concurrency": 0,
           "timeout_s": float(timeout), "arrivals": arrivals, "seed": seed,
           "requests": [(b.data, {**b.headers, **headers}) for b in body.bodies()]}
    loadgen.Target(job["url"], job["requests"])  # a header that cannot be sent fails here, not in a client
    report = BenchReport(base, body.describe() + (f" ?{query}" if query else ""), [], setup={
        "levels": "concurrency" if rate is None else "rate", "concurrency": levels if rate is None else connections,
        "rate": None if rate is None else levels, "arrivals": arrivals, "seed": seed,
        "duration_s": None if requests else duration, "requests": requests, "warmup_s": warmup, "timeout_s": timeout,
        "clients_processes": clients_processes or "auto", "client": client_machine()})
    stats = ServerStats(base, headers, report.notes)
    label = "the start"
    local = on_this_machine(base)
    try:
        with Display(progress) as display:
            for level in levels:
                each = {**job, "rate": None if rate is None else level}
                label = settings_text(settings) + (f"c={level}" if rate is None else f"rate={level:g}/s")
                display.start(label, requests, None if requests else duration)
                run = _run_level(each, connections or level, duration if requests is None else None, requests,
                                 warmup, clients_processes, stats, display, label)
                run.settings, run.seed = dict(settings or {}), seed
                display.done(run.requests, run.errors, run.requests_per_s)
                report.runs.append(run)
                if stats.devices:  # what it was measured on: a sweep compares it with the GPUs its config asked for
                    report.setup["server_devices"] = stats.devices
                if run.client_cpu > BUSY_CLIENT and run.seconds >= MIN_TOLD_S:  # a few ms tell nothing of it
                    report.notes.append(f"{label}: a client process was {run.client_cpu:.0%} busy, so the client "
                                        "may have limited this run; try more --clients-processes")
                if run.fell_behind:
                    report.notes.append(_behind_note(label, run))
                if run.stopped_answering_s is not None:
                    report.notes.append(_gone_note(label, run))
                if run.server_restarts:
                    report.notes.append(f"{label}: {run.server_restarts} server process(es) died and were started "
                                        "again during the measurement (its /stats restarts): its numbers include "
                                        "the recovery, and a setting whose processes crash under load will crash "
                                        "in service (the server's log says why)")
                if run.batches_run_apart:
                    report.notes.append(_apart_note(label, run))
                outside = outside_note(run)
                if outside is not None:
                    report.notes.append(f"{label}: {outside}")
                if run.server_requests is not None and run.server_requests > run.requests:
                    report.notes.append(_others_note(label, run))
                limit = limit_note(run)
                if limit is not None:
                    report.notes.append(f"{label}: {limit}")
                if local and (run.clients_cores or 0) >= SHARED_CORES * cpu_count():
                    report.notes.append(f"{label}: the clients used {run.clients_cores:.2f} of this machine's "
                                        f"{cpu_count()} cores, which the server on it shares: its requests/s "
                                        "may be the more for a load sent from another machine")
    except NothingMeasured as exc:  # a warm-up found nothing to measure: what was measured before goes with it
        exc.report = report
        raise
    except ClientsFailed as exc:
        report.notes.append(f"{label} was not measured: {str(exc).splitlines()[0]}")
        failed = LoadFailed(f"the load generator failed during {label}: {exc}")
        failed.report = report
        raise failed from None
    except KeyboardInterrupt:
        report.notes.append(f"interrupted during {label}, which was not measured")
        raise Interrupted(report, label) from None
    return report


def limit_note(run: Run) -> str | None:
    """What may have limited a level, where the server's own numbers say it plainly, and what to change:
    its one event loop near a whole core (HTTP), or its GPUs idle much of the time while a batch spent
    longer in the CPU's stages than in ``forward`` and requests waited for a worker (the GPU waited on
    the CPU; without that wait, on the clients: one request at a time, a low rate). ``None`` where
    neither."""
    if run.seconds < MIN_TOLD_S:
        return None
    if run.front_cores is None and (run.server_cores or 0.0) >= BUSY_LOOP:
        return (f"the server's event loop used {run.server_cores:.2f} of a core, about all that one process has: "
                "reading and answering HTTP may have limited this level; HttpWorkers 2 or more share that work "
                "out among processes, where the machine has cores to spare")
    stages = run.server_stages_ms or {}
    forward = stages.get("forward")
    cpu = stages.get("preprocess", 0.0) + stages.get("postprocess", 0.0)
    gpu = run.gpu_percent
    queued = (run.server_queue_ms or 0.0) >= QUEUED * (run.server_batch_ms or math.inf)
    if gpu is not None and gpu < 100 * IDLE_GPU and forward and cpu > forward and queued:
        return (f"the GPUs were busy {gpu:.0f}% of the time while requests waited {run.server_queue_ms:,.1f} ms "
                f"for a worker, and a batch spent {cpu:,.1f} ms in preprocess and postprocess against "
                f"{forward:,.1f} ms in forward: the GPUs waited on that CPU work. A higher ProcessPerGPU gives "
                "each GPU more workers to take batches from, PreprocessThreads spreads a batch's preprocess over "
                "cores, and Pipeline (on by default on a GPU) prepares the next batch during forward")
    return None


def outside_note(run: Run) -> str | None:
    """Where the clients waited far longer than the server says it took (from its headers read to its answer
    written): the time went outside the server's handlers, and the latency columns do not measure the server.
    ``None`` where the two are near, or unknown, or an open loop fell behind (its requests waited for a free
    connection at the clients, said apart)."""
    if run.mean_ms is None or run.server_latency_ms is None or run.fell_behind:
        return None
    outside = run.mean_ms - run.server_latency_ms
    if outside < OUTSIDE_MS or run.mean_ms < 2 * run.server_latency_ms:
        return None
    from .guards import LISTEN_BACKLOG  # here: the module takes aiohttp, which a bench has no need of otherwise

    return (f"a request took {run.mean_ms:,.1f} ms on average at the clients, {outside:,.1f} ms more than the "
            f"{run.server_latency_ms:,.1f} ms the server took from reading its headers to writing its answer: that "
            "time went outside the server, in a proxy, the network, or connecting (where more clients connect at once "
            f"than an easyserve server holds waiting to be accepted, {LISTEN_BACKLOG:,}, the kernel drops a new "
            "connection's first packet, and the client sends it again 1 s, 3 s, 7 s later). The latency columns "
            "include that time; the server columns do not")


def on_this_machine(url: str) -> bool:
    """Whether the server at ``url`` runs on this machine (its address is one of this machine's)."""
    import socket

    try:
        infos = socket.getaddrinfo(urllib.parse.urlsplit(url).hostname, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    for family, _, _, _, address in infos:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((address[0], 0))  # only an address of this machine can be bound
                return True
            except OSError:
                continue
    return False


def client_machine() -> dict[str, Any]:
    """What the load came from: its cores (which a server on the same machine shares), and versions."""
    import platform
    import sys

    from . import __version__

    return {"host": platform.node(), "cpus": cpu_count(), "platform": platform.platform(),
            "python": sys.version.split()[0], "easyserve": __version__,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _apart_note(label: str, run: Run) -> str:
    return (f"{label}: {run.batches_run_apart:,} of the batches failed whole in forward and ran again in parts "
            "(the server's /stats batches_run_apart; its log says why): the batch column counts them at the size "
            "they were formed, and their time includes the failed call. Where the batch's size was the cause (out "
            "of GPU memory), it fails so in service: lower MaxBatchSize; where one request was (a 500 names it), "
            "the payload is")


def _gone_note(label: str, run: Run) -> str:
    at = run.stopped_answering_s
    answered = sum(n for code, n in run.statuses.items() if code.startswith("2"))
    while_up = (f"; {answered / at:,.1f} requests/s over the {at:.2f} s it answered" if at > 0 and answered else "")
    return (f"{label}: the server stopped answering {at:.2f} s into the measurement: no request sent after that was "
            f"answered (the errors column counts them), and its req/s, {run.requests_per_s:,.1f}, is over the whole "
            f"{run.seconds:.1f} s of the level, the time it was gone included{while_up}; is the server running?")


def _others_note(label: str, run: Run) -> str:
    more = run.server_requests - run.requests
    return (f"{label}: the server took {run.server_requests:,} requests during the measurement, {more:,} more than "
            f"the {run.requests:,} sent by this bench: other clients sent it requests meanwhile, and its server "
            "columns (batch, queue, run, pre/fwd/post, CPU, GPU) include their traffic; measure a server no one "
            "else uses for them to be this load's alone")


def _behind_note(label: str, run: Run) -> str:
    halfway, end = run.backlog or (0, 0)
    unsent = (f"; {run.unsent:,} of them were never sent, all {run.concurrency} connections being busy"
              if run.unsent else "")
    return (f"{label}: the server fell behind this rate: the requests due and not yet answered went from {halfway:,} "
            f"halfway through the schedule to {end:,} at its end{unsent}")


def check_options(requests: int | None, duration: float, clients_processes: int | None, timeout: float,
                  warmup: float) -> None:
    """Refuse the options :func:`bench` cannot measure with (``ValueError``): told before a sweep starts
    its first server, not once it has loaded its model."""
    if requests is not None and requests < 1:
        raise ValueError(f"requests: expected at least 1, got {requests}")
    if requests is None and not 0 < duration < math.inf:  # inf (or nan) would measure for ever
        raise ValueError(f"duration: expected a number of seconds above 0, got {duration}")
    if clients_processes is not None and clients_processes < 1:
        raise ValueError(f"clients_processes: expected at least 1 (or None for automatic), got {clients_processes}")
    if not 0 < timeout < math.inf:  # 0 counted every request as timed out, even at a port that refused them
        raise ValueError(f"timeout: expected a number of seconds above 0, got {timeout}")
    if not 0 <= warmup < math.inf:
        raise ValueError(f"warmup: expected a number of seconds, 0 or more, got {warmup}")


def load_levels(concurrency: int | Sequence[int] | None, rate: float | Sequence[float] | None,
                arrivals: str) -> tuple[list, int | None]:
    """What each level varies (concurrencies, or rates), and an open loop's most requests in flight."""
    if arrivals not in loadgen.ARRIVALS:
        raise ValueError(f"arrivals: expected one of {', '.join(loadgen.ARRIVALS)}, got {arrivals!r}")
    if rate is None:
        if arrivals != "constant":
            raise ValueError(f"arrivals={arrivals!r} needs a rate: a closed loop's requests follow the answers")
        levels = [(1, 8, 32) if concurrency is None else concurrency]
        levels = levels if isinstance(levels[0], numbers.Integral) else list(levels[0])
        if not levels or any(not _whole(c) for c in levels):
            raise ValueError(f"concurrency: expected whole numbers from 1 to {MAX_CONCURRENCY:,}, got {concurrency!r}")
        return [int(c) for c in levels], None
    try:
        rates = [rate] if isinstance(rate, (str, bytes)) else list(rate)
    except TypeError:  # one number (numpy's too)
        rates = [rate]
    if not rates:
        raise ValueError("rate: expected one or more numbers of requests per second, got none")
    for each in rates:
        loadgen.arrival_gaps(each, arrivals)  # refuses a rate, or a kind of arrivals, that it cannot send
    connections = RATE_CONNECTIONS if concurrency is None else concurrency
    if not _whole(connections):
        raise ValueError("concurrency: with a rate, the most requests in flight at once: one whole number from 1 "
                         f"to {MAX_CONCURRENCY:,}, got {concurrency!r}")
    return [float(r) for r in rates], int(connections)  # plain numbers, numpy's too: JSON reads back alike


def arrivals_seed(arrivals: str, seed: int | None) -> int | None:
    """The seed of Poisson arrivals' gaps: the one given, else a new one; ``None`` for other arrivals."""
    if seed is not None and (arrivals != "poisson" or not isinstance(seed, numbers.Integral)
                             or isinstance(seed, bool)):
        raise ValueError(f"seed: a whole number, for Poisson arrivals only; got {seed!r} with arrivals={arrivals!r}")
    if arrivals != "poisson":
        return None
    return random.randrange(2**32) if seed is None else int(seed)


def _whole(value: Any) -> bool:
    """A concurrency: a whole number from 1 to MAX_CONCURRENCY."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and 1 <= value <= MAX_CONCURRENCY


def _run_level(job: dict, concurrency: int, duration: float | None, requests: int | None, warmup: float,
               fixed: int | None, stats: ServerStats, display: Display, label: str) -> Run:
    """One level (``label``, in notes), warmed up and measured; :class:`Unreachable` (or :class:`Rejected`)
    when every request of the warm-up failed (its ``report`` left for the caller to fill)."""
    limit = max(1, min(cpu_count(), concurrency))
    processes = fixed or min(limit, math.ceil(concurrency / CONNECTIONS_PER_PROCESS))
    while True:
        with Clients(job, concurrency, processes) as clients:
            if warmup > 0:
                display.note("warming up")
                warm = clients.ask(("warmup", warmup), "warm")
                _check_warmup(warm, stats.base, "Authorization" in stats.headers, job["timeout_s"])
                busy = max(_busy(tally) for tally in warm)
                if fixed is None and busy > BUSY_CLIENT and processes < limit:
                    # a saturated client measures itself: start again, spread over more processes
                    processes = min(limit, max(processes + 1, math.ceil(processes * busy / CLIENT_TARGET)))
                    continue
            display.note("measuring")
            before = stats.read(f"{label}, before measuring")
            # an open loop's processes each take an equal part of the rate, so as many of the requests
            parts = [1] * len(clients.shares) if job["rate"] else clients.shares
            shares = split(requests, parts) if requests else [None] * len(clients.shares)
            # each process takes up the bodies' turn where the one before it leaves off
            firsts = itertools.accumulate([share or 0 for share in shares[:-1]], initial=0)
            start = time.monotonic() + START_DELAY_S  # an open loop's common schedule begins then
            tallies = clients.ask([("measure", duration, share, first, start) for share, first in zip(shares, firsts)],
                                  "done", display.progress)
            after = stats.read(f"{label}, after measuring")
            run = _summarise(concurrency, len(clients.shares), tallies, job["rate"], counted=bool(requests))
            why = add_server_side(run, before, after) if before is not None and after is not None else None
            if why:
                stats.notes.append(f"{label}: {why}: the server columns of that level are left empty")
            unread = gpus_unread(after)
            if unread and not any(unread in note for note in stats.notes):  # once, not at every level
                stats.notes.append(f"{label}: the server's GPU monitoring did not read every GPU ({unread}): "
                                   "the GPU column leaves out what it could not read")
            return run


def _check_warmup(tallies: list[dict], url: str, api_key: bool, timeout_s: float) -> None:
    """Raise :class:`Unreachable` when no request of a warm-up's tallies was answered (within ``timeout_s``),
    :class:`Rejected` when they all were with an error status: either way, there is nothing to measure."""
    statuses, failures, texts = _counts(tallies)
    if any(code.startswith("2") for code in statuses) or not (statuses or failures):
        return
    if statuses:
        raise Rejected(url, None, statuses, failures, texts, api_key)
    raise Unreachable(url, None, failures, texts, timeout_s)


def _counts(tallies: list[dict]) -> tuple[dict[str, int], dict[str, int], dict[str, str]]:
    """The tallies' answers by status and failures by kind, in order, and the first text of each
    (client processes in turn: each keeps its own first)."""
    statuses: collections.Counter = collections.Counter()
    failures: collections.Counter = collections.Counter()
    texts: dict[str, str] = {}
    for tally in tallies:
        statuses.update(tally["statuses"])
        failures.update(tally["failures"])
        for key, text in tally.get("texts", {}).items():
            texts.setdefault(str(key), text)
    return {str(k): v for k, v in sorted(statuses.items())}, dict(sorted(failures.items())), texts


def _summarise(concurrency: int, processes: int, tallies: list[dict], rate: float | None = None,
               counted: bool = False) -> Run:
    latencies = array.array("d")
    for tally in tallies:
        latencies.frombytes(tally["latencies"])
    statuses, failures, texts = _counts(tallies)
    ordered = sorted(latencies)
    seconds = max(tally["seconds"] for tally in tallies)
    strays = sum(tally.get("strays", 0) for tally in tallies)  # answers no request asked for: errors, not requests
    sent = sum(statuses.values()) + sum(failures.values()) - strays
    unsent = sum(tally["unsent"] for tally in tallies)
    waits: collections.Counter = collections.Counter()  # the unsent's waits until the end, in whole ms: counts
    for tally in tallies:
        waits.update(tally.get("unsent_waits", {}))
    if unsent:  # errors, as a kind of failure of their own; not among the requests, which were sent
        failures["unsent"] = unsent
        texts["unsent"] = f"due, but never sent: all {concurrency} connections were busy until the time was up"
    if rate is not None and counted:  # n requests of a schedule (not a duration's): n/rate, not n - 1 gaps
        seconds = max(seconds, sent / rate)
    # a client's CPU is counted from before its first request (its connection made): over a window of a
    # few ms (-n 1) a process of one thread was "772% busy"; at most a core each, as it can use
    cores = [min(tally["cpu_s"] / seconds, 1.0) if seconds > 0 else 0.0 for tally in tallies]

    stopped = _stopped_answering(tallies)
    p50, p90, p99, most = (None if value is None else round(value * 1000, 3)
                           for value in _percentiles(ordered, waits, (50, 90, 99, 100)))
    timed = len(ordered) + unsent  # latencies, and waits of the unsent
    total = sum(ordered) + sum(ms / 1000 * n for ms, n in waits.items())

    return Run(
        concurrency=concurrency, processes=processes, requests=sent, seconds=round(seconds, 3),
        requests_per_s=round(len(ordered) / seconds, 2) if seconds > 0 else 0.0,
        p50_ms=p50, p90_ms=p90, p99_ms=p99,
        mean_ms=round(total / timed * 1000, 3) if timed else None, max_ms=most,
        errors=sent + strays + unsent - len(ordered), statuses=statuses, connection_errors=failures,
        # over the level's time, not each client's own: one given a request or none ran for microseconds,
        # and its CPU over them made "2.75 of this machine's 2 cores"
        client_cpu=round(max(cores), 3), clients_cores=round(sum(cores), 3),
        error_texts={key: texts[key] for key in [*statuses, *failures] if key in texts},
        rate=rate, unsent=unsent,
        # (a closed loop's requests are never due before they are sent: no backlog)
        backlog=None if rate is None else [sum(tally["backlog"][i] for tally in tallies) for i in (0, 1)],
        stopped_answering_s=None if stopped is None else round(stopped, 3),
    )


def _stopped_answering(tallies: list[dict]) -> float | None:
    """Seconds from the measurement's start to the first request that got no answer after the last one answered
    (by any client process), where :data:`~easyserve.loadgen.FAILED_ENOUGH` or more got none after it: the server
    went away (or hangs) and did not come back. ``None`` where it answered to the end, or a request or two at
    the end failed alone (a connection reset)."""
    last = max((tally["last_answer"] for tally in tallies if tally["last_answer"] is not None), default=-math.inf)
    # a process's silence that began before another's last answer was not the server's: it answered after
    after = [tally for tally in tallies if tally["silent_since"] is not None and tally["silent_since"] >= last]
    if sum(tally["silent"] for tally in after) < loadgen.FAILED_ENOUGH:
        return None
    # from when the first request that got no answer went out, not when it failed: a hung server's fail a
    # timeout later (60 s by default), and one frozen 1.5 s into a 4 s level "stopped answering 6.4 s into it"
    went = max(last, min(tally["silent_sent"] for tally in after))
    return max(0.0, went - min(tally["began"] for tally in tallies))


def _percentiles(ordered: list[float], waits: dict[int, int], ps: Sequence[float]) -> list[float | None]:
    """Each of ``ps`` by nearest rank, in seconds, over the latencies ``ordered`` (sorted) and the waits
    of requests never sent (counts by whole ms): merged as counts, since a server that answered nothing
    for minutes leaves millions of them; ``None`` where there is neither."""
    total = len(ordered) + sum(waits.values())
    ranks = [max(1, math.ceil(p / 100 * total)) for p in ps]
    if not total:
        return [None] * len(ps)
    if not waits:
        return [ordered[rank - 1] for rank in ranks]
    found: dict[int, float] = {}
    left, seen = sorted(set(ranks)), 0
    for value, n in heapq.merge(((value, 1) for value in ordered), sorted((ms / 1000, n) for ms, n in waits.items())):
        seen += n
        while left and left[0] <= seen:
            found[left.pop(0)] = value
        if not left:
            break
    return [found[rank] for rank in ranks]


def _busy(tally: dict) -> float:
    """How busy one client process was over its own warm-up, which lasts as long as every other's."""
    return tally["cpu_s"] / tally["seconds"] if tally["seconds"] > 0 else 0.0


def server_url(url: str) -> tuple[str, str]:
    """``http://host:port`` from what a user gives (a URL with or without ``/predict``, or ``host:port``),
    and the query string given with it (``?top_k=1``: every request's options). A file (a config, a
    model) is refused, naming ``--sweep``, which serves one: it was taken for a host name."""
    if "://" not in url and (url.lower().endswith((".yaml", ".yml", ".onnx")) or Path(url).is_file()):
        raise ValueError(f"{url} is a file, not a server's URL: give the URL of a running server "
                         "(http://127.0.0.1:9876), or add --sweep to serve that config or model and measure it "
                         "(easyserve.sweep from Python)")
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not a server URL: {url!r}; expected e.g. http://127.0.0.1:9876")
    path = parts.path.rstrip("/").removesuffix("/predict")
    if ROUTES.search(path):
        raise ValueError(f"{url}: that is one of the server's routes; give the server's own URL (http://host:port, "
                         "with the path prefix it is served under, if any): bench sends to /predict, or with "
                         "--form v2 to /v2/models/NAME/infer")
    if parts.fragment:  # the requests would go without it
        raise ValueError(f"{url}: a fragment (#...) is not sent; give the server's URL without it")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", "")), parts.query
