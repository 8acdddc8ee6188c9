"""GET /metrics: Prometheus's text, read from the same counters as /stats, over real servers and sockets."""

from __future__ import annotations

import asyncio
import math
import os
import platform
import signal
import threading
import time

import aiohttp
import prometheus_client
import pytest
from conftest import Background, KeptAlive, http, post_json, request, wait_busy, wait_draining, wait_queued, wait_until
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

import easyserve
from easyserve.http import READ_INTERVAL_S, REPORTS, Coalesced

JSON = {"Content-Type": "application/json"}
API_KEY = "metrics-key-2468"
SECONDS = {"easyserve_request_duration_seconds": "latency_s", "easyserve_queue_wait_seconds": "queue_wait_s",
           "easyserve_batch_run_seconds": "run_s"}


def scrape(url: str, headers: dict | None = None) -> dict[str, dict[tuple, float]]:
    """GET /metrics, parsed: each sample's value by name, then by its labels (sorted pairs)."""
    status, answer_headers, text = http("GET", url + "/metrics", headers=headers)
    assert status == 200, (status, text)
    assert answer_headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    return parse(text)


def parse(text: str, parser=text_string_to_metric_families) -> dict[str, dict[tuple, float]]:
    samples: dict[str, dict[tuple, float]] = {}
    for family in parser(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[name][tuple(sorted(labels.items()))]


def histogram(samples: dict, name: str) -> dict:
    """A histogram's samples in /stats's shape: cumulative counts by upper bound, sum and count."""
    buckets = {float(dict(labels)["le"]): n for labels, n in samples[name + "_bucket"].items()}
    return {"buckets": dict(sorted(buckets.items())), "sum": value(samples, name + "_sum"),
            "count": value(samples, name + "_count")}


def from_stats(shape: dict) -> dict:
    """A /stats histogram with its bounds as numbers, to compare with :func:`histogram`."""
    return {**shape, "buckets": {float(le): n for le, n in shape["buckets"].items()}}


def assert_cumulative(shape: dict) -> None:
    counts = list(shape["buckets"].values())
    assert counts == sorted(counts) and list(shape["buckets"])[-1] == math.inf and counts[-1] == shape["count"], shape


def test_answers_are_counted_by_status_with_their_latency(serve):
    with serve("handles_robust:Sleeper") as server:
        url = server.url + "/predict"
        before = scrape(server.url)
        # the usual statuses are there at 0 before any answer: increase() sees a server's first 5xx
        assert before["easyserve_requests_total"] == {(("status", str(s)),): 0 for s in (200, 400, 429, 500, 503, 504)}
        assert value(before, "easyserve_request_duration_seconds_count") == 0
        for i in range(5):
            assert post_json(url, {"mark": i}) == (200, {"mark": i})
        assert post_json(url, {"reject": "no"})[0] == 400  # preprocess refused it: queued and run
        assert http("POST", url, data=b'{"x": ', headers=JSON)[0] == 400  # malformed: never queued
        samples = scrape(server.url)
        for _ in range(3):  # reading /metrics (or /stats) counts as no answer
            scrape(server.url)

    assert samples["easyserve_requests_total"] == {
        (("status", "200"),): 5, (("status", "400"),): 2, **{(("status", str(s)),): 0 for s in (429, 500, 503, 504)}}
    assert value(samples, "easyserve_requests_queued_total") == 6
    latency = histogram(samples, "easyserve_request_duration_seconds")
    assert latency["count"] == 5 and 0 < latency["sum"] < 5, latency  # every 2xx answer once, in seconds
    assert_cumulative(latency)
    assert latency["buckets"][1.0] == 5  # each counted in its bucket, not only in +Inf: all took under a second
    # each of the six queued requests waited once, and each of their six batches was run
    assert histogram(samples, "easyserve_queue_wait_seconds")["count"] == 6
    assert histogram(samples, "easyserve_batch_run_seconds")["count"] == 6
    assert value(samples, "easyserve_build_info", python=platform.python_version(), version=easyserve.__version__) == 1


def test_metrics_and_stats_read_the_same_numbers(serve):
    # One slow request keeps the only worker busy while five queue behind it; they then run as a
    # batch of MaxBatchSize (4) and a batch of 1. /stats and /metrics are read at both moments.
    with serve("handles_robust:Sleeper", MaxBatchSize=4, MaxQueueSize=50) as server:
        url = server.url + "/predict"
        slow = Background(lambda: post_json(url, {"mark": "slow", "sleep": 2}))
        wait_busy(server)
        queued = [Background(lambda i=i: post_json(url, {"mark": i})) for i in range(5)]
        during_stats = wait_queued(server.url, 5)
        during = scrape(server.url)
        assert slow.result()[0] == 200 and [q.result()[0] for q in queued] == [200] * 5
        after_stats = request(server.url + "/stats")[2]
        after = scrape(server.url)

    assert value(during, "easyserve_queue_depth") == during_stats["queue_depth"] == 5
    assert value(during, "easyserve_queue_capacity") == 50 and value(during, "easyserve_max_batch_size") == 4
    assert {state: value(during, "easyserve_workers", state=state) for state in ("idle", "busy", "starting")} == {
        "idle": 0, "busy": 1, "starting": 0}
    assert value(during, "easyserve_ready") == 1
    assert value(after, "easyserve_queue_depth") == 0 and value(after, "easyserve_workers", state="idle") == 1

    assert after_stats["batch_sizes"] == {"1": 2, "4": 1}
    assert histogram(after, "easyserve_batch_size") == {
        "buckets": {1.0: 2, 2.0: 2, 4.0: 3, math.inf: 3}, "sum": 6, "count": 3}
    # everything the two share, number for number
    counted = {str(int(dict(labels)["status"])): n for labels, n in after["easyserve_requests_total"].items()}
    assert {status: n for status, n in counted.items() if n} == after_stats["statuses"] == {"200": 6}
    assert value(after, "easyserve_requests_queued_total") == after_stats["requests"] == 6
    assert value(after, "easyserve_request_timeouts_total") == after_stats["timeouts"] == 0
    assert value(after, "easyserve_worker_restarts_total") == after_stats["restarts"] == 0
    assert value(after, "easyserve_request_body_buffered_bytes") == after_stats["buffered_bytes"] == 0
    assert value(after, "easyserve_log_records_dropped_total") == after_stats["log_records_dropped"]
    assert value(after, "easyserve_worker_lines_not_logged_total") == after_stats["worker_lines_not_logged"]
    for name, key in SECONDS.items():
        shape = histogram(after, name)
        assert shape == from_stats(after_stats["histograms"][key]), name
        assert_cumulative(shape)
    assert value(after, "easyserve_queue_wait_seconds_sum") == after_stats["queue_wait_s"] > 1  # behind "slow"
    assert value(after, "easyserve_batch_run_seconds_sum") == after_stats["run_s"] >= 1.9  # "slow" slept 2 s


def test_restarts_count_killed_and_stuck_workers_and_never_go_down(serve):
    with serve("handles_robust:Sleeper", TimeoutS=1) as server:
        victim = server.workers[0]["pid"]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: server.workers[0]["restarts"] == 1 and server.workers[0]["state"] == "idle",
                   what="the killed worker's replacement")
        killed = scrape(server.url)
        assert post_json(server.url + "/predict", {"mark": "stuck", "sleep": 30})[0] == 504  # killed too
        wait_until(lambda: server.workers[0]["restarts"] == 2 and server.workers[0]["state"] == "idle",
                   what="the stuck worker's replacement")
        stuck = scrape(server.url)
        server.reload()  # new workers in the slots, whose counts go on with them, as the total does
        reloaded = scrape(server.url)
        stats = request(server.url + "/stats")[2]

    assert value(killed, "easyserve_worker_restarts_total") == 1
    assert value(killed, "easyserve_workers", state="idle") == 1
    assert value(stuck, "easyserve_worker_restarts_total") == 2
    assert value(stuck, "easyserve_request_timeouts_total") == 1
    assert value(stuck, "easyserve_requests_total", status="504") == 1
    assert [w["restarts"] for w in stats["workers"]] == [2]
    assert value(reloaded, "easyserve_worker_restarts_total") == stats["restarts"] == 2


def test_replacements_on_purpose_and_each_workers_memory_are_exposed(serve):
    """/stats had each worker's rss_mb and recycled, /metrics neither: 20 replacements for memory left
    easyserve_worker_restarts_total at 0 and nothing else to see them by."""
    with serve("handles_ops:Leaky", HandleArgs={"mb": 40}, MaxWorkerMemoryMB=150, MaxBatchesPerWorker=50) as server:
        fresh = scrape(server.url)
        for i in range(12):
            assert post_json(server.url + "/predict", {"n": i})[0] == 200

        def settled() -> tuple[dict, dict] | None:
            """/stats and /metrics of an idle worker, with no memory reading between them (one comes after
            each batch is answered, a moment after the worker is idle)."""
            before = request(server.url + "/stats")[2]
            time.sleep(READ_INTERVAL_S * 2)  # each read worked out anew, not one shared with the read before
            read = scrape(server.url)
            time.sleep(READ_INTERVAL_S * 2)
            after = request(server.url + "/stats")[2]
            workers = [s["workers"][0] for s in (before, after)]
            steady = [w["state"] for w in workers] == ["idle"] * 2 and workers[0].get("rss_mb") == workers[1]["rss_mb"]
            return (after, read) if steady else None

        stats, samples = wait_until(settled, what="the worker idle, its memory read")
    # every reason there from the start, at 0
    assert {dict(labels)["reason"]: n for labels, n in fresh["easyserve_worker_replacements_total"].items()} == {
        "memory": 0, "batches": 0, "reload": 0, "rollback": 0, "stuck": 0}
    worker = stats["workers"][0]
    assert value(samples, "easyserve_worker_replacements_total", reason="memory") == stats["replacements"]["memory"] \
        == worker["recycled"] >= 3
    assert value(samples, "easyserve_worker_replacements_total", reason="batches") == 0
    assert value(samples, "easyserve_worker_restarts_total") == 0  # replacements on purpose are no restarts
    memory = value(samples, "easyserve_worker_resident_memory_bytes", worker="cpu/0")
    assert abs(memory / 2**20 - worker["rss_mb"]) <= 0.1 and 0 < memory < 190 * 2**20


def test_a_key_is_needed_when_one_is_set_and_pages_may_preflight(serve):
    page = "https://grafana.example.com"
    with serve(ApiKey=API_KEY, CorsOrigins=[page]) as server:
        status, headers, body = http("GET", server.url + "/metrics")
        assert (status, headers["WWW-Authenticate"]) == (401, 'Bearer realm="easyserve"'), body
        assert http("GET", server.url + "/metrics", headers={"Authorization": "Bearer wrong"})[0] == 401
        samples = scrape(server.url, headers={"Authorization": f"Bearer {API_KEY}"})
        assert value(samples, "easyserve_ready") == 1

        async def preflight() -> tuple[int, dict]:
            headers = {"Origin": page, "Access-Control-Request-Method": "GET",
                       "Access-Control-Request-Headers": "authorization"}
            async with aiohttp.ClientSession() as session, session.options(server.url + "/metrics",
                                                                          headers=headers) as resp:
                return resp.status, dict(resp.headers)

        status, headers = asyncio.run(preflight())
        assert status == 204 and headers["Access-Control-Allow-Origin"] == page
        assert "authorization" in headers["Access-Control-Allow-Headers"].lower()
    with serve() as server:  # no key set: open, like /stats
        assert value(scrape(server.url), "easyserve_ready") == 1


def test_metrics_are_answered_while_draining(serve):
    # the moment an operator most wants numbers: the server is stopping and not ready
    with serve("handles_robust:Sleeper") as server:
        running = Background(lambda: post_json(server.url + "/predict", {"mark": "last", "sleep": 1}))
        wait_busy(server)
        with KeptAlive(server.url) as kept:  # open before the drain: new connections are refused
            stopping = Background(lambda: server.stop(drain_timeout=10))
            wait_draining(server.url)
            kept.connection.request("GET", "/metrics")
            response = kept.connection.getresponse()
            status, text = response.status, response.read().decode()
        assert running.result()[0] == 200
        stopping.result()
    assert status == 200, text
    samples = parse(text)
    assert value(samples, "easyserve_ready") == 0
    assert value(samples, "easyserve_workers", state="busy") == 1
    assert value(samples, "easyserve_requests_queued_total") == 1


def test_openmetrics_for_a_scraper_that_asks_for_it(serve):
    with serve() as server:
        assert post_json(server.url + "/predict", {"value": 1})[0] == 200
        status, headers, text = http("GET", server.url + "/metrics",
                                     headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert status == 200 and headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    assert text.endswith("# EOF\n")
    samples = parse(text, parse_openmetrics)
    assert value(samples, "easyserve_requests_total", status="200") == 1
    assert value(samples, "easyserve_request_duration_seconds_count") == 1


@pytest.mark.parametrize("scheme", ["values", "dots"])
def test_a_scraper_asking_for_an_escaping_scheme_reads_the_same_names(serve, scheme):
    """Every name is a legacy one, which no scheme escapes: under "values" the samples' names were
    escaped (U__easyserve__requests__total) but not their HELP and TYPE lines, and the parser read 76
    families where there are 34; under "dots" every underscore was doubled."""
    with serve() as server:
        assert post_json(server.url + "/predict", {"value": 1})[0] == 200
        plain = {family.name for family in parse_openmetrics(http(
            "GET", server.url + "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})[2])}
        for kind, parser in (("application/openmetrics-text", parse_openmetrics), ("text/plain", None)):
            status, headers, text = http("GET", server.url + "/metrics",
                                         headers={"Accept": f"{kind}; version=1.0.0; escaping={scheme}"})
            assert status == 200 and headers["Content-Type"].endswith("escaping=underscores"), headers
            assert value(parse(text, *([parser] if parser else [])), "easyserve_requests_total", status="200") == 1
            if parser is not None:
                assert {family.name for family in parser(text)} == plain


def test_each_server_in_a_process_reports_its_own_numbers(serve):
    # a notebook may run several servers: each has its own registry, none uses prometheus-client's global one
    with serve() as first, serve() as second:
        for i in range(3):
            assert post_json(first.url + "/predict", {"value": i})[0] == 200
        assert post_json(second.url + "/predict", {"value": 9})[0] == 200
        ours, theirs = scrape(first.url), scrape(second.url)
    assert value(ours, "easyserve_requests_total", status="200") == 3
    assert value(theirs, "easyserve_requests_total", status="200") == 1
    assert b"easyserve_" not in prometheus_client.generate_latest(prometheus_client.REGISTRY)


# -- floods of readers -------------------------------------------------------------------------------


def test_readers_who_ask_together_share_one_read_made_after_they_asked():
    """A flood of /metrics readers, each body worked out on the event loop, starved predictions
    (5% of what the server answered alone). Readers who ask while a read is due share it; it is
    made after they asked, so it includes all that happened before."""

    async def main():
        loop = asyncio.get_running_loop()
        begun: list[float] = []

        async def read():
            begun.append(loop.time())
            await asyncio.sleep(0.05)  # as an HttpWorkers read waits for the fronts' counts
            return len(begun)

        shared = Coalesced(read, interval=0.2)
        assert await shared() == 1  # alone, and none before: at once
        asked = loop.time()
        assert await asyncio.gather(*(shared() for _ in range(50))) == [2] * 50  # together: one read
        assert begun[1] >= asked and begun[1] - begun[0] >= 0.2 - 1e-3  # made after they asked, an interval on
        # one who asks while a read runs waits for the next: the running one began before it asked
        running = asyncio.ensure_future(shared())
        while len(begun) < 3:
            await asyncio.sleep(0.005)
        assert await asyncio.gather(running, shared()) == [3, 4]
        # one who gives up does not take the read from the others
        leaving, staying = asyncio.ensure_future(shared()), asyncio.ensure_future(shared())
        await asyncio.sleep(0.01)
        leaving.cancel()
        assert await staying == 5

    asyncio.run(main())


def test_a_flood_of_readers_gets_one_read_an_interval_and_a_failed_read_fails_those_who_shared_it():
    async def main():
        loop = asyncio.get_running_loop()
        begun: list[float] = []

        async def read():
            begun.append(loop.time())
            if len(begun) == 2:
                raise RuntimeError("the second read fails")
            return len(begun)

        shared = Coalesced(read, interval=0.05)

        async def reader(until: float) -> list:
            got = []
            while loop.time() < until:
                try:
                    got.append(await shared())
                except RuntimeError as exc:
                    got.append(str(exc))
            return got

        started = loop.time()
        results = await asyncio.gather(*(reader(started + 0.5) for _ in range(64)))
        took = loop.time() - started
        assert len(begun) <= took / 0.05 + 2, (len(begun), took)  # not 64 reads at a time
        # each read begins at least an interval after the one before, give or take when its task
        # first runs on a loop that 64 readers keep busy (a few ms on a loaded machine)
        assert all(b - a >= 0.05 - 0.02 for a, b in zip(begun, begun[1:])), begun
        assert (begun[-1] - begun[0]) / (len(begun) - 1) >= 0.05 - 0.005, begun
        # the 64 asked together each time: all shared the failed read, and only that one
        assert [got[:3] for got in results] == [[1, "the second read fails", 3]] * 64
        assert await shared() == len(begun)  # the reads go on after one failed

    asyncio.run(main())


def _flood(url: str, readers: int, stop: threading.Event) -> int:
    """``readers`` clients read ``url`` as fast as they are answered until ``stop``; the reads answered 200."""

    async def main():
        answered = 0
        async with aiohttp.ClientSession() as session:

            async def reader():
                nonlocal answered
                while not stop.is_set():
                    async with session.get(url) as response:
                        await response.read()
                        answered += response.status == 200

            await asyncio.gather(*(reader() for _ in range(readers)))
        return answered

    return asyncio.run(main())


@pytest.mark.parametrize("fronts", [1, 2])
def test_under_a_flood_of_readers_each_read_counts_every_answer_given_before_it(serve, fronts):
    """Shared reads must not be stale: each reader still sees every answer given before it asked."""
    with serve(HttpWorkers=fronts) as server:
        stop = threading.Event()
        floods = [Background(lambda path=path: _flood(server.url + path, 8, stop)) for path in ("/metrics", "/stats")]
        try:
            for i in range(1, 31):
                assert post_json(server.url + "/predict", {"value": i})[0] == 200
                assert value(scrape(server.url), "easyserve_requests_total", status="200") == i
                assert request(server.url + "/stats")[2]["statuses"]["200"] == i
        finally:
            stop.set()
        assert all(flood.result(30) > 30 for flood in floods)


def test_scrapes_asking_for_many_versions_share_a_few_bodies(serve):
    """The Content-Type names the version a scraper asked for (any 1.0.<n>), and shared bodies were
    kept by it: each new version made one more, kept for good, and read at once, past the sharing."""
    with serve() as server:
        for n in range(100):
            status, headers, text = http("GET", server.url + "/metrics",
                                         headers={"Accept": f"application/openmetrics-text; version=1.0.{n}"})
            assert status == 200 and f"version=1.0.{n};" in headers["Content-Type"] and text.endswith("# EOF\n")
        assert scrape(server.url)  # the text format, as before
        assert len(server._runner.app[REPORTS]._metrics) == 2


def test_every_metric_name_ends_in_its_unit_as_prometheus_names_them(serve):
    """A unit goes last, before a counter's _total (easyserve_request_body_buffered_bytes, not
    ..._bytes_buffered): dashboards and tools that read units from names rely on it."""
    with serve() as server:
        assert post_json(server.url + "/predict", {"value": 1})[0] == 200
        text = http("GET", server.url + "/metrics")[2]
    families = list(text_string_to_metric_families(text))
    ours = [family for family in families if family.name.startswith("easyserve_")]
    assert len(ours) > 20
    for family in ours:
        words = family.name.removesuffix("_total").split("_")
        for unit in ("bytes", "seconds", "ratio"):
            assert unit not in words[:-1], f"{family.name}: {unit!r} should be the last word"
        if family.type == "counter":
            assert family.name + "_total" in {sample.name for sample in family.samples}, family.name


def test_the_models_statistics_under_tritons_metric_names_as_its_dashboards_query_them(serve, tmp_path):
    """Triton's own Grafana dashboard queries nv_inference_request_success, nv_inference_queue_duration_us,
    nv_inference_compute_infer_duration_us... by model: a team moving from Triton kept its dashboards and
    alerts, and they read nothing. The same numbers as the statistics extension, without _total."""
    args = {"log": str(tmp_path / "timeline"), "forward_s": 0.02}
    with serve("handles_for_tests:Timeline", HandleArgs=args, ModelName="m") as server:
        for n in range(3):
            assert post_json(server.url + "/predict", {"value": n})[0] == 200
        assert post_json(server.url + "/predict", {"reject": "no"})[0] == 400
        text = http("GET", server.url + "/metrics")[2]
        stats = http("GET", server.url + "/v2/models/m/stats")[2]["model_stats"][0]
    samples = parse(text)
    model = {"model": "m", "version": "1"}
    inference = stats["inference_stats"]
    assert value(samples, "nv_inference_request_success", **model) == 3
    assert value(samples, "nv_inference_request_failure", **model) == 1
    assert value(samples, "nv_inference_count", **model) == stats["inference_count"] == 3
    assert value(samples, "nv_inference_exec_count", **model) == stats["execution_count"] == 3
    assert value(samples, "nv_inference_pending_request_count", **model) == 0
    for name, key in (("request", "success"), ("queue", "queue"), ("compute_input", "compute_input"),
                      ("compute_infer", "compute_infer"), ("compute_output", "compute_output")):
        # the same seconds, rounded once to microseconds, once to nanoseconds
        assert abs(value(samples, f"nv_inference_{name}_duration_us", **model) - inference[key]["ns"] / 1000) <= 1
    assert value(samples, "nv_inference_compute_infer_duration_us", **model) >= 3 * 20_000
    # the names as Triton writes them (a counter's samples here would end in _total), as PromQL finds them
    assert "\nnv_inference_request_success{model=\"m\",version=\"1\"} 3.0\n" in text
    assert "nv_inference_request_success_total" not in text and "nv_gpu_utilization" not in text  # no GPU here

