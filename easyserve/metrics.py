"""``GET /metrics``: the server's numbers in Prometheus's text format, for a Prometheus server to scrape.

Nothing here counts anything. A collector reads, when scraped, the same :class:`~easyserve.stats.Stats`
and pool that ``/stats`` reads, so the two can never disagree; it runs on the event loop's thread, like
every other reader of them. Each server has a registry of its own (not prometheus-client's global
one): several servers may run in one process, a notebook's, and each reports its own numbers.

What it exposes (counters end in ``_total``, times are in seconds)::

    easyserve_requests_total{status}        counter    answers to POST /predict and v2 inference, by HTTP status
    easyserve_request_duration_seconds      histogram  arrival to answer, of those answers that are 2xx
    easyserve_requests_queued_total         counter    requests queued for a worker
    easyserve_request_timeouts_total        counter    requests answered 504 at their deadline (TimeoutS)
    easyserve_requests_cut_off_total        counter    requests whose connection went with a front that died
    easyserve_requests_client_gone_total    counter    requests whose client left before their answer
    easyserve_requests_malformed_total      counter    requests refused by the HTTP parser, before any route
    easyserve_slow_readers_reset_total      counter    connections of slow readers reset past MaxBufferedMB
    easyserve_request_head_timeouts_total   counter    connections closed as a request's head took past HeaderTimeoutS
    easyserve_queue_depth                   gauge      requests waiting now
    easyserve_queue_capacity                gauge      MaxQueueSize
    easyserve_queue_wait_seconds            histogram  each stay in the queue: to a worker, a 504, or its client gone
    easyserve_batch_size                    histogram  items per batch handed to a worker
    easyserve_max_batch_size                gauge      MaxBatchSize
    easyserve_batch_run_seconds             histogram  a worker's time on a batch it answered
    easyserve_batches_run_apart_total       counter    batches whose forward failed whole and ran again in parts
    easyserve_batch_stage_seconds{stage}    histogram  the same time by stage: read, preprocess, forward...
    easyserve_workers{state}                gauge      worker slots in each state (every state, 0 when none)
    easyserve_workers_replacing             gauge      a reload's new processes, starting beside the ones they replace
    easyserve_workers_leaving               gauge      processes a reload replaced, finishing their batch
    easyserve_worker_restarts_total         counter    processes restarted after a death or a failed start
    easyserve_worker_replacements_total{reason}     counter  processes replaced on purpose (memory, batches, reload...)
    easyserve_worker_resident_memory_bytes{worker}  gauge    each worker's resident memory, as it last read it
    easyserve_front_restarts_total          counter    HTTP front processes (HttpWorkers) restarted after a death
    easyserve_ready                         gauge      1 when /ready would answer 200, else 0
    easyserve_degraded                      gauge      1 when ready with a worker down, else 0
    easyserve_request_body_buffered_bytes   gauge      request-body bytes held now
    easyserve_request_body_limit_bytes      gauge      MaxBufferedMB, in bytes
    easyserve_log_records_dropped_total     counter    log records dropped (stderr full), the whole process's
    easyserve_worker_lines_not_logged_total counter    workers' lines past 1,000 a second, not logged (kept in rings)
    easyserve_cpu_seconds_total{part}       counter    CPU seconds of the server's event loop, HTTP fronts, workers
    easyserve_build_info{version,python}    gauge      always 1
    easyserve_gpu_utilization_ratio{gpu}    gauge      share of the driver's last sample period a kernel ran
    easyserve_gpu_busy_seconds_total{gpu}   counter    utilisation times time, summed over the readings
    easyserve_gpu_sampled_seconds_total{gpu}  counter  time the readings covered (busy over it: mean utilisation)
    easyserve_gpu_memory_used_bytes{gpu}    gauge      memory every process on the GPU holds
    easyserve_gpu_memory_total_bytes{gpu}   gauge      the GPU's memory
    easyserve_gpu_info{gpu,index,uuid,name} gauge      always 1, for each GPU the workers use
    easyserve_gpu_monitoring_up             gauge      1 while nvidia-smi reads the GPUs, 0 while it fails
                                                       or does not list one of them
    process_*                                          the server process's CPU, memory and open files

And, under Triton's names, for dashboards and alerts written for Triton (its own Grafana dashboard's
queries read easyserve unchanged): the statistics extension's counts of the served model, labelled
``model`` and ``version``, untyped, as Triton writes them with no ``_total`` (cumulative: ``rate()``
reads them), and the GPUs' readings, labelled ``gpu_uuid``::

    nv_inference_request_success            requests the model answered (a request holding a batch counts 1)
    nv_inference_request_failure            requests it failed (a 504, a handle's refusal, a worker's death)
    nv_inference_count                      items it answered (a request holding a batch of 8 counts 8)
    nv_inference_exec_count                 batches that answered a request
    nv_inference_request_duration_us        microseconds from arrival to answer, of its successes
    nv_inference_queue_duration_us          their waits in the queue
    nv_inference_compute_input_duration_us  their batches' read and preprocess, each charged whole
    nv_inference_compute_infer_duration_us  their batches' forward (or run_batch)
    nv_inference_compute_output_duration_us their batches' postprocess and encoding
    nv_inference_pending_request_count      gauge: requests waiting for a worker
    nv_gpu_utilization, nv_gpu_memory_used_bytes, nv_gpu_memory_total_bytes   gauges, each GPU the workers use

The ``easyserve_gpu_*`` families appear where workers run on GPUs and ``nvidia-smi`` reads them
(:mod:`easyserve.gpus`); ``gpu`` is the config's GPU id.
"""

from __future__ import annotations

import functools
import math
import platform
from typing import TYPE_CHECKING, Callable, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric,
                                   UnknownMetricFamily)
from prometheus_client.exposition import choose_encoder
from prometheus_client.openmetrics.exposition import UNDERSCORES
from prometheus_client.registry import Collector
from prometheus_client.utils import parse_version

from . import logs, records
from .slots import WORKER_STATES
from .stats import REPLACEMENTS

if TYPE_CHECKING:
    from .budget import BodyBudget
    from .pool import WorkerPool
    from .stats import Histogram, Inferences

__all__ = ["ServerCollector", "encoder", "encoding", "render", "server_registry"]


USUAL_STATUSES = (200, 400, 429, 500, 503, 504)  # easyserve_requests_total's series from the start


class ServerCollector(Collector):
    """Reads one server's :class:`~easyserve.stats.Stats`, pool and body budget as Prometheus metric
    families; call ``collect()`` on the event loop's thread only."""

    def __init__(self, pool: WorkerPool, budget: BodyBudget) -> None:
        from . import __version__  # the package's __init__ imports this module: read it once it is complete

        self.pool = pool
        self.budget = budget
        self.build = {"version": __version__, "python": platform.python_version()}

    def collect(self) -> Iterator[Metric]:
        pool, stats = self.pool, self.pool.stats
        answers = CounterMetricFamily("easyserve_requests_total",
                                      "Answers to POST /predict and v2 inference, by HTTP status.", labels=["status"])
        # the statuses an alert watches are there from the start, at 0: a series born at its first count
        # hides that count from increase() and rate(), the first 5xx of a server among them
        for status, count in sorted({**dict.fromkeys(USUAL_STATUSES, 0), **stats.statuses}.items()):
            answers.add_metric([str(status)], count)
        yield answers
        yield _histogram("easyserve_request_duration_seconds",
                         "Seconds from a request's arrival to its successful (2xx) answer (POST /predict and v2 "
                         "inference); errors are counted by easyserve_requests_total.",
                         stats.latency)
        yield CounterMetricFamily("easyserve_requests_queued_total", "Requests queued for a worker.",
                                  value=stats.requests)
        yield CounterMetricFamily("easyserve_request_timeouts_total",
                                  "Requests answered 504 at their deadline (TimeoutS).", value=stats.timeouts)
        yield CounterMetricFamily("easyserve_requests_cut_off_total",
                                  "Requests left with no answer: their connection went with an HTTP front process "
                                  "(HttpWorkers) that died.", value=stats.cut_off)
        yield CounterMetricFamily("easyserve_requests_client_gone_total",
                                  "Requests whose client closed its connection before their answer; those not "
                                  "handed to a worker yet were dropped.", value=stats.client_gone)
        yield CounterMetricFamily("easyserve_requests_malformed_total",
                                  "Requests refused by the HTTP parser, before any route: a bad header, chunk "
                                  "or length (400), a request line or header too long (414, 431), another HTTP "
                                  "version (505). They are in no other count.", value=stats.malformed)
        yield CounterMetricFamily("easyserve_slow_readers_reset_total",
                                  "Connections reset while their answer was being written, because the answers "
                                  "that slow readers held together passed MaxBufferedMB.",
                                  value=stats.slow_readers_reset)
        yield CounterMetricFamily("easyserve_request_head_timeouts_total",
                                  "Connections closed because a request's line and headers, begun, were not all in "
                                  "within HeaderTimeoutS (a slow loris holds connections so). No answer is sent, "
                                  "so they are in no other count.", value=stats.heads_timed_out)

        yield GaugeMetricFamily("easyserve_queue_depth", "Requests waiting for a worker.", value=len(pool.queue))
        yield GaugeMetricFamily("easyserve_queue_capacity", "Requests the queue holds at most (MaxQueueSize).",
                                value=pool.queue.max_size)
        yield _histogram("easyserve_queue_wait_seconds",
                         "Seconds a request waited in the queue, until a worker took it, its deadline (504) or "
                         "its client left (a retried request's second wait counts apart).", stats.queue_wait)
        yield _batch_sizes(stats.batch_sizes, pool.queue.max_batch_size)
        yield CounterMetricFamily("easyserve_batches_run_apart_total",
                                  "Batches whose forward failed whole and ran again in parts, to tell the failing "
                                  "requests apart: each cost more calls of forward than one, while "
                                  "easyserve_batch_size counts it at the size it was formed.",
                                  value=stats.batches_run_apart)
        yield CounterMetricFamily("easyserve_requests_passed_over_total",
                                  "Requests passed over because they could no longer be answered within TimeoutS "
                                  "(QueueOrder: deadline); each gets its 504 at its deadline unless it runs after all.",
                                  value=pool.queue.passed_over)
        yield GaugeMetricFamily("easyserve_max_batch_size", "Items a batch holds at most (MaxBatchSize; an inference "
                                "request holding a batch of N is N items).",
                                value=pool.queue.max_batch_size)
        yield _histogram("easyserve_batch_run_seconds",
                         "Seconds a worker took on a batch it answered (preprocess, forward, postprocess).",
                         stats.run_time)
        stages = HistogramMetricFamily("easyserve_batch_stage_seconds",
                                       "Seconds a stage took on a batch a worker answered: read (the bodies the "
                                       "worker decodes), preprocess, forward, postprocess (or the handle's own "
                                       "run_batch), encode (the answers). Each batch is counted in the stages "
                                       "that ran for it.", labels=["stage"])
        for stage, histogram in stats.stage_time.items():
            if histogram.count:
                stages.add_metric([stage], [(_le(bound), count) for bound, count in histogram.cumulative()],
                                  histogram.sum)
        yield stages

        states = GaugeMetricFamily("easyserve_workers", "Worker slots in each state.", labels=["state"])
        for state in WORKER_STATES:  # a reload's new process, starting beside the one it replaces, is no slot,
            # nor one it replaced, finishing its batch
            states.add_metric([state], sum(w.state == state and w.is_slot for w in pool.workers))
        yield states
        yield GaugeMetricFamily("easyserve_workers_replacing", "A reload's new worker processes, starting beside "
                                "the ones they replace.", value=sum(w.candidate for w in pool.workers))
        yield GaugeMetricFamily("easyserve_workers_leaving", "Worker processes a reload replaced, finishing the "
                                "batch they hold before they stop.",
                                value=sum(w.leaving and not w.candidate for w in pool.workers))
        yield CounterMetricFamily("easyserve_front_restarts_total",
                                  "HTTP front processes (HttpWorkers) that died and were started again; each took "
                                  "its connections with it.", value=stats.front_restarts)
        yield CounterMetricFamily("easyserve_worker_restarts_total",
                                  "Worker processes restarted after a death or a failed start (not counting "
                                  "replacements on purpose: MaxBatchesPerWorker, MaxWorkerMemoryMB, reloads).",
                                  value=stats.restarts)
        replaced = CounterMetricFamily("easyserve_worker_replacements", "Worker processes replaced on purpose, "
                                       "between batches, losing nothing, by reason: memory (MaxWorkerMemoryMB), "
                                       "batches (MaxBatchesPerWorker), reload, rollback (a reload's), stuck (one that "
                                       "finished its batch as it was to be killed for being stuck past TimeoutS).",
                                       labels=["reason"])
        for kind in REPLACEMENTS:  # every reason from the start, at 0 (see easyserve_requests_total)
            replaced.add_metric([kind], stats.replacements[kind])
        yield replaced
        memory = GaugeMetricFamily("easyserve_worker_resident_memory_bytes",
                                   "Each worker's resident memory, as its process last read it: once set up, then "
                                   "after a batch, once that batch is let go (MaxWorkerMemoryMB bounds it).",
                                   labels=["worker"])
        for worker in pool.workers:  # a slot's process that is up: not one gone, nor a reload's beside it
            if worker.rss is not None and worker.is_slot and worker.state in ("idle", "busy", "retiring"):
                memory.add_metric([worker.name], worker.rss)
        yield memory
        yield GaugeMetricFamily("easyserve_ready", "1 while GET /ready answers 200 (not stopping; every worker "
                                "up, or once started at least one), else 0.", value=int(pool.ready))
        yield GaugeMetricFamily("easyserve_degraded", "1 while ready with a worker down (restarting or failing "
                                "to start): serving with less capacity than configured, else 0.",
                                value=int(pool.degraded))

        yield GaugeMetricFamily("easyserve_request_body_buffered_bytes", "Request-body bytes held in memory now.",
                                value=self.budget.held)
        yield GaugeMetricFamily("easyserve_request_body_limit_bytes",
                                "Request-body bytes the server holds at most (MaxBufferedMB).", value=self.budget.limit)
        yield CounterMetricFamily("easyserve_log_records_dropped_total",
                                  "Log records dropped because stderr could not take them (for the whole process).",
                                  value=records.dropped())
        yield CounterMetricFamily("easyserve_worker_lines_not_logged_total",
                                  "Lines of the workers' output not logged, past the 1,000 a second they may log "
                                  "together; kept in each worker's ring (for the whole process).",
                                  value=logs.unlogged())
        cpu = CounterMetricFamily("easyserve_cpu_seconds_total",
                                  "CPU seconds spent: part=server, the server process's event loop thread; "
                                  "part=fronts, the HTTP front processes (HttpWorkers); part=workers, the worker "
                                  "processes (each up to its last batch or its exit).", labels=["part"])
        for part, seconds in pool.cpu_seconds().items():
            cpu.add_metric([part], seconds)
        yield cpu
        info = GaugeMetricFamily("easyserve_build_info", "The easyserve and Python versions; always 1.",
                                 labels=list(self.build))
        info.add_metric(list(self.build.values()), 1)
        yield info
        if pool.gpus.gpus:  # while nvidia-smi fails, the GPUs' numbers go: this says why they are missing
            yield GaugeMetricFamily("easyserve_gpu_monitoring_up", "1 while nvidia-smi reads the workers' GPUs, "
                                    "0 while it fails, has yet to answer, or does not list one of them.",
                                    value=int(pool.gpus.up))
        yield from _gpu_families(pool.gpus.readings())
        yield from _triton_families(stats.inferences, list(pool.config.model_identity), len(pool.queue),
                                    pool.gpus.readings())


def server_registry(pool: WorkerPool, budget: BodyBudget) -> CollectorRegistry:
    """A registry of this server's own: its :class:`ServerCollector`, and the process's CPU, memory and
    open files (``process_*``, on Linux)."""
    registry = CollectorRegistry()
    registry.register(ServerCollector(pool, budget))
    ProcessCollector(registry=registry)
    return registry


def encoder(accept: str = "") -> tuple[Callable[[CollectorRegistry], bytes], str]:
    """How to write a scrape's body, and its Content-Type: Prometheus's text format, or OpenMetrics
    for a scraper whose ``Accept`` header asks for it."""
    try:
        encode, content_type = choose_encoder(accept)
    except (TypeError, ValueError):  # a malformed version (version=abc): the client's mistake, not a 500
        return choose_encoder("")
    escaping = getattr(encode, "keywords", {}).get("escaping")
    if escaping is not None and escaping != UNDERSCORES:
        # Every name here is a legacy one, which no scheme escapes: answered as such. prometheus-client
        # 0.26 escaped the samples' names under "values" (U__easyserve__requests__total) but not their
        # HELP and TYPE, and a parser read 76 families where there are 34.
        encode = functools.partial(encode.func, *encode.args, **{**encode.keywords, "escaping": UNDERSCORES})
        content_type = content_type.replace(f"escaping={escaping}", f"escaping={UNDERSCORES}")
    return encode, content_type


def encoding(encode: Callable[[CollectorRegistry], bytes]) -> tuple:
    """What an encoder's body depends on: its format, its escaping and, for OpenMetrics, whether its
    version is 2 or above. A few values, whatever the ``Accept`` header (whose version, any
    ``1.0.<n>``, goes into the Content-Type but changes nothing in the body)."""
    options = getattr(encode, "keywords", {})
    version = options.get("version")
    return getattr(encode, "func", encode), options.get("escaping"), version is not None and \
        parse_version(version) >= (2, 0, 0)


def render(registry: CollectorRegistry, accept: str = "") -> tuple[bytes, str]:
    """The scrape's body and its Content-Type (see :func:`encoder`)."""
    encode, content_type = encoder(accept)
    return encode(registry), content_type


def _gpu_families(readings: list[dict]) -> Iterator[Metric]:
    """The GPUs' families (see :mod:`easyserve.gpus`); none on a server without GPUs, and a GPU whose
    driver does not report a number is left out of that number's family."""
    if not readings:
        return
    families = [
        (GaugeMetricFamily, "easyserve_gpu_utilization_ratio",
         "Share of the driver's last sample period in which a kernel ran on the GPU (0 to 1).", "utilization"),
        (CounterMetricFamily, "easyserve_gpu_busy_seconds",
         "GPU utilisation times time, summed over the readings: its rate over "
         "easyserve_gpu_sampled_seconds_total's is the mean utilisation.", "busy_s"),
        (CounterMetricFamily, "easyserve_gpu_sampled_seconds", "Seconds the GPU's readings covered.", "sampled_s"),
        (GaugeMetricFamily, "easyserve_gpu_memory_used_bytes", "GPU memory held by every process on it.",
         "memory_used_bytes"),
        (GaugeMetricFamily, "easyserve_gpu_memory_total_bytes", "The GPU's memory.", "memory_total_bytes"),
    ]
    for kind, name, documentation, key in families:
        family = kind(name, documentation, labels=["gpu"])
        for reading in readings:
            if reading[key] is not None:
                family.add_metric([str(reading["gpu"])], reading[key])
        yield family
    info = GaugeMetricFamily("easyserve_gpu_info", "The GPUs the workers use, by config GPU id; always 1.",
                             labels=["gpu", "index", "uuid", "name"])
    for reading in readings:
        info.add_metric([str(reading["gpu"]), reading["index"], reading["uuid"], reading["name"]], 1)
    yield info


# Triton's metric families of a model's statistics: its name, what it says, and what it reads (a count of
# Inferences, or the seconds of one of its durations)
TRITON_COUNTS = (
    ("nv_inference_request_success", "Successful inference requests (a request holding a batch counts 1).",
     lambda counted: counted.durations["success"][0]),
    ("nv_inference_request_failure", "Failed inference requests: a 504, a handle's refusal, a worker's death.",
     lambda counted: counted.durations["fail"][0]),
    ("nv_inference_count", "Inferences performed: a request holding a batch of n counts n.",
     lambda counted: counted.inference_count),
    ("nv_inference_exec_count", "Batches the model ran that answered a request.",
     lambda counted: counted.execution_count),
)
TRITON_DURATIONS = (
    ("nv_inference_request_duration_us", "success",
     "Cumulative microseconds from a successful request's arrival to its answer."),
    ("nv_inference_queue_duration_us", "queue", "Cumulative microseconds successful requests waited in the queue."),
    ("nv_inference_compute_input_duration_us", "compute_input",
     "Cumulative microseconds of reading and preprocess, each request charged its batch's whole."),
    ("nv_inference_compute_infer_duration_us", "compute_infer",
     "Cumulative microseconds of forward (or run_batch), each request charged its batch's whole."),
    ("nv_inference_compute_output_duration_us", "compute_output",
     "Cumulative microseconds of postprocess and encoding, each request charged its batch's whole."),
)


def _triton_families(counted: Inferences, model: list[str], pending: int, readings: list[dict]) -> Iterator[Metric]:
    """The served model's statistics and the GPUs' readings under Triton's metric names (see the module's
    docstring). Untyped: prometheus-client writes a counter's samples with ``_total``, which Triton's
    names lack, and a query for ``nv_inference_request_success`` would find nothing."""
    for name, documentation, read in TRITON_COUNTS:
        family = UnknownMetricFamily(name, documentation, labels=["model", "version"])
        family.add_metric(model, read(counted))
        yield family
    for name, key, documentation in TRITON_DURATIONS:
        family = UnknownMetricFamily(name, documentation, labels=["model", "version"])
        family.add_metric(model, round(counted.durations[key][1] * 1e6))
        yield family
    family = GaugeMetricFamily("nv_inference_pending_request_count", "Requests waiting for a worker.",
                               labels=["model", "version"])
    family.add_metric(model, pending)
    yield family
    if not readings:  # a server without GPUs has none of their families
        return
    for name, documentation, key in (
            ("nv_gpu_utilization", "GPU utilisation in the driver's last sample period (0 to 1).", "utilization"),
            ("nv_gpu_memory_used_bytes", "GPU memory held by every process on it, in bytes.", "memory_used_bytes"),
            ("nv_gpu_memory_total_bytes", "The GPU's memory, in bytes.", "memory_total_bytes")):
        family = GaugeMetricFamily(name, documentation, labels=["gpu_uuid"])
        for reading in readings:
            if reading[key] is not None:
                family.add_metric([reading["uuid"]], reading[key])
        yield family


def _histogram(name: str, documentation: str, histogram: Histogram) -> HistogramMetricFamily:
    buckets = [(_le(bound), count) for bound, count in histogram.cumulative()]
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=histogram.sum)


def _batch_sizes(sizes: dict[int, int], max_batch_size: int) -> HistogramMetricFamily:
    # Batch sizes are counted exactly, by size (/stats shows them so); a histogram's buckets are the
    # powers of two below MaxBatchSize and MaxBatchSize itself, worked out from those counts.
    bounds = sorted({2**i for i in range(max(1, max_batch_size).bit_length()) if 2**i < max_batch_size}
                    | {max_batch_size})
    buckets = [(_le(bound), sum(n for size, n in sizes.items() if size <= bound)) for bound in bounds]
    buckets.append(("+Inf", sum(sizes.values())))
    return HistogramMetricFamily("easyserve_batch_size", "Items in each batch handed to a worker (a request is one, an "
                                 "inference request holding a batch of N is N, one whose JSON the worker reads "
                                 "is one).",
                                 buckets=buckets, sum_value=sum(size * n for size, n in sizes.items()))


def _le(bound: float) -> str:
    return "+Inf" if bound == math.inf else repr(float(bound))
