"""CPU seconds by part in /stats and /metrics (the server's event loop, HTTP front processes, workers),
and the cores the bench reports from them, against CPU a handle is known to spend and the kernel's
own count."""

from __future__ import annotations

import pytest
from conftest import http, post_many, request, wait_until

import easyserve as es
from easyserve.children import CLOCK_TICKS, process_cpu_s

TICK = 1 / CLOCK_TICKS  # /proc's unit of CPU time


def cpu(server) -> dict:
    return request(server.url + "/stats")[2]["cpu_s"]


def test_the_workers_cpu_counts_what_the_handle_spent(serve):
    with serve("handles_for_tests:Spinner", HandleArgs={"spin_s": 0.02}, ProcessPerGPU=2, MaxBatchSize=4) as server:
        before = cpu(server)
        answers = post_many(server.url + "/predict", [{}] * 40, concurrency=8)
        after = cpu(server)
        stats = request(server.url + "/stats")[2]
    assert {status for status, _ in answers} == {200}
    spent = after["workers"] - before["workers"]
    assert 40 * 0.02 <= spent < 40 * 0.02 + 0.5  # the spinning, and a little for the rest of each request
    assert 0 < after["server"] - before["server"] < spent  # the server's work on these requests is lighter
    assert after["server"] < stats["uptime_s"]


def test_a_workers_start_up_is_not_counted_and_its_first_batch_is(serve):
    # setting a handle up (imports, a model) can take seconds of CPU; it is not serving's
    with serve("handles_for_tests:Spinner", HandleArgs={"spin_s": 0.02, "setup_s": 0.5}, MaxBatchSize=1) as server:
        assert cpu(server)["workers"] == 0
        post_many(server.url + "/predict", [{}] * 10, concurrency=1)
        spent = cpu(server)["workers"]
    assert 10 * 0.02 <= spent < 10 * 0.02 + 0.2


def test_http_fronts_cpu_is_counted_apart_as_the_kernel_counts_it(serve):
    with serve("handles_for_tests:Spinner", HandleArgs={"spin_s": 0.0}, HttpWorkers=2) as server:
        fronts = [front.proc.pid for front in server._fronts.fronts]
        first = server.stats()["cpu_s"]["fronts"]  # each front reports its CPU as it counts its answers
        kernel_first = sum(map(process_cpu_s, fronts))
        post_many(server.url + "/predict", [{"value": i} for i in range(600)], concurrency=16)
        last = server.stats()["cpu_s"]["fronts"]
        kernel_last = sum(map(process_cpu_s, fronts))
        report = es.bench(server.url, {}, concurrency=[4], duration=1, warmup=0.2, progress=False)
    spent = kernel_last - kernel_first
    assert spent > 0.05  # 600 requests of HTTP in those processes
    assert abs((last - first) - spent) <= 4 * TICK + 0.02  # all of it, once (the kernel counts in ticks)
    assert report.runs[0].front_cores > 0 and ">fronts cpu</th>" in report._repr_html_()


def test_metrics_carry_the_same_cpu_seconds(serve):
    with serve("handles_for_tests:Spinner", HandleArgs={"spin_s": 0.01}) as server:
        post_many(server.url + "/predict", [{}] * 10, concurrency=2)
        stats = cpu(server)
        metrics = http("GET", server.url + "/metrics")[2]
    line = next(x for x in metrics.splitlines() if x.startswith('easyserve_cpu_seconds_total{part="workers"}'))
    assert float(line.split()[-1]) == pytest.approx(stats["workers"], abs=1e-3)  # no batch ran in between
    assert 'easyserve_cpu_seconds_total{part="server"}' in metrics


def test_bench_reports_the_cores_each_part_used(serve):
    with serve("handles_for_tests:Spinner", HandleArgs={"spin_s": 0.01}, ProcessPerGPU=1, MaxBatchSize=1) as server:
        report = es.bench(server.url, {}, concurrency=[2], duration=1.5, warmup=0.3, progress=False)
    [run] = report.runs
    assert run.errors == 0
    # each answer cost the one worker 10 ms of CPU (the reads of /stats bracket the measurement, a
    # little wider than it); one spinning thread is at most one core
    assert 0.01 * run.requests_per_s * 0.8 <= run.worker_cores < 1.2
    assert 0 < run.server_cores < run.worker_cores and run.front_cores is None
    html = report._repr_html_()
    assert ">srv cpu</th>" in html and ">wkr cpu</th>" in html and "fronts cpu" not in html


def test_a_worker_killed_mid_batch_has_its_last_cpu_counted(serve):
    # a request that spins past its deadline (TimeoutS): its worker is killed as stuck, before it could
    # report the CPU it spent; the kernel's count of the dead process is taken before it is reaped
    with serve("handles_for_tests:Spinner", HandleArgs={"spin_s": 5.0}, TimeoutS=1) as server:
        assert post_many(server.url + "/predict", [{}], concurrency=1)[0][0] == 504
        wait_until(lambda: server.workers[0]["restarts"] == 1 and server.workers[0]["state"] == "idle",
                   what="the stuck worker's replacement")
        spent = cpu(server)["workers"]
    assert 0.6 <= spent <= 1.5  # spun from its start until killed at the deadline, about a second
