"""The statistics behind /stats, Server.stats() and the dashboard: exact counts, rates, percentiles."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from conftest import Background, caught, http, post_json, request, wait_busy, wait_queued, wait_until
from test_hostile import connect, exchange, head, read_response

from easyserve import Server
from easyserve.stats import FAULTS_TOLD_EVERY_S, PERCENTILES_FRESH_S, WINDOW_ANSWERS, Histogram, Stats, snapshot

JSON = {"Content-Type": "application/json"}
TIMING = ("queue_wait_s", "run_s", "requests_per_s", "latency_p50_ms", "latency_p99_ms", "cpu_s", "uptime_s")


# -- the counters on their own, on a clock the test sets ----------------------------------------------


def test_percentiles_cover_the_last_minute_of_answers():
    stats = Stats(started=0.0)
    for i in range(1, 101):  # 1 ms ... 100 ms, one answer every 0.1 s from t=100 s
        stats.record_answer(200, i / 1000, now=100 + i / 10)
    assert stats.latency_percentiles(50, 99, 100, now=111) == [0.050, 0.099, 0.100]
    stats.record_answer(200, 5.0, now=140)
    assert stats.latency_percentiles(50, 99, now=140)[1] == 0.100  # one slow answer in 101 is past p99
    assert stats.latency_percentiles(100, now=140) == [5.0]
    for _ in range(500):  # errors are no latencies: a flood of quick 429s took the median down to nothing
        stats.record_answer(429, 0.00001, now=140)
    stats.record_answer(504, 30.0, now=140)
    assert stats.latency_percentiles(50, 100, now=140) == [0.051, 5.0] and stats.latency.count == 101
    # a minute later the first answers have left the window: only those after t=105.05 remain
    assert stats.latency_percentiles(0.1, now=165.05) == [0.051]
    assert stats.latency_percentiles(50, 99, now=300) == [None, None]  # nothing answered in the last minute
    assert stats.statuses == {200: 101, 429: 500, 504: 1}  # the totals are kept whatever the window holds


def test_percentiles_of_a_full_window_are_worked_out_again_after_a_moment_or_1_percent_more_answers():
    """A flood of /stats readers sorted the window (10,000 answers, 1.5 ms) for each: predictions starved
    of the event loop. Within PERCENTILES_FRESH_S, and under 1% more answers, the last values stand."""
    stats = Stats(started=0.0)
    for i in range(WINDOW_ANSWERS):
        stats.record_answer(200, 0.010, now=100 + i / 1000)
    assert stats.latency_percentiles(100, now=110.0) == [0.010]
    for _ in range(WINDOW_ANSWERS // 100):  # 1% of the window, all slow: the same as a moment ago
        stats.record_answer(200, 5.0, now=110.0)
    assert stats.latency_percentiles(100, now=110.1) == [0.010]
    assert stats.latency_percentiles(50, 100, now=110.1) == [0.010, 5.0]  # other percentiles: worked out
    assert stats.latency_percentiles(100, now=110.1 + PERCENTILES_FRESH_S) == [5.0]  # a moment later
    stats = Stats(started=0.0)
    for i in range(WINDOW_ANSWERS):
        stats.record_answer(200, 0.010, now=100 + i / 1000)
    assert stats.latency_percentiles(100, now=110.0) == [0.010]
    for _ in range(WINDOW_ANSWERS // 100 + 1):  # more than 1%: at once
        stats.record_answer(200, 5.0, now=110.0)
    assert stats.latency_percentiles(100, now=110.0) == [5.0]


def test_requests_per_second_over_the_last_five_seconds():
    stats = Stats(started=0.0)
    for i in range(200):  # 20 a second from t=10 s to t=20 s
        stats.record_answer(200, 0.001, now=10 + i / 20)
    assert stats.requests_per_s(now=19.999) == pytest.approx(20, rel=0.06)
    assert stats.requests_per_s(now=22.5) == pytest.approx(20 * 2 / 4.5, rel=0.06)  # t=18..20 of the 18..22.5 span
    assert stats.requests_per_s(now=30) == 0
    young = Stats(started=100.0)
    for i in range(10):  # a server up for half a second is not averaged over five
        young.record_answer(200, 0.001, now=100 + i / 20)
    assert young.requests_per_s(now=100.5) == pytest.approx(20)


def test_the_window_is_bounded_and_the_rate_stays_right():
    stats = Stats(started=0.0)
    for i in range(3 * WINDOW_ANSWERS):  # more answers in a second than the window keeps
        stats.record_answer(200, 0.001, now=10 + i / (3 * WINDOW_ANSWERS))
    assert len(stats.recent) == WINDOW_ANSWERS
    assert stats.requests_per_s(now=11.5) == pytest.approx(3 * WINDOW_ANSWERS / 4.5)  # t=7..11.5


def test_histograms_count_each_value_in_the_first_bucket_that_holds_it():
    # Prometheus's buckets are "less than or equal": a value on a bound counts in that bound's bucket
    histogram = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 7.0):
        histogram.observe(value)
    assert histogram.cumulative() == [(0.1, 2), (1.0, 4), (float("inf"), 5)]
    assert (histogram.count, histogram.sum) == (5, pytest.approx(8.65))
    assert histogram.to_dict() == {"buckets": {"0.1": 2, "1": 4, "+Inf": 5}, "sum": histogram.sum, "count": 5}
    stats = Stats(started=0.0)
    stats.record_answer(200, 0.003, now=1.0)
    assert stats.latency.count == 1 and stats.latency.sum == 0.003  # every answer, beside the recent window


def test_client_faults_no_answer_shows_are_logged_at_once_then_once_a_minute_at_most(caplog):
    """Malformed HTTP and heads past HeaderTimeoutS were only counted: a log read alone showed nothing of
    a slow-loris attack. The first is said at once, those after it with the next that comes a minute on."""
    caplog.set_level("INFO", logger="easyserve")
    stats = Stats()
    stats._tell("malformed", 1, now=100.0)
    stats._tell("malformed", 3, now=120.0)
    stats._tell("heads_timed_out", 0, now=121.0)  # an HTTP front's report with none of that kind
    stats._tell("heads_timed_out", 5, now=130.0)
    stats._tell("malformed", 2, now=100.0 + FAULTS_TOLD_EVERY_S + 1)
    said = [record.getMessage() for record in caught(caplog)]
    assert said == [
        "refused 1 request(s) whose HTTP the parser could not read (400) (counted in /stats malformed; said once "
        "a minute at most)",
        "closed 5 connection(s) whose request's line and headers were not all in within HeaderTimeoutS: slow or "
        "stalled clients, or a slow-loris attack holding connections (counted in /stats heads_timed_out; said once "
        "a minute at most)",
        "refused 5 request(s) whose HTTP the parser could not read (400) in the last 61 s (counted in /stats "
        "malformed; said once a minute at most)"], said


def test_a_server_that_never_ran_has_every_count_zero():
    server = Server(handle="handles_for_tests:Recorder", GPUs="cpu", Port=0)
    assert server.stats() == snapshot(None)
    assert server.stats()["statuses"] == {} and server.stats()["workers"] == []


# -- a real server ------------------------------------------------------------------------------------


def test_answers_are_counted_by_their_final_status_and_time(serve):
    # Every way an answer is made counts: the handle's (200, and 400 from preprocess), a body refused
    # before it was queued (400), a refusal sent instead of "100 Continue" (413), a foreign Host (403),
    # a full queue (429) and the watchdog's deadline (504). Reading /stats itself counts nothing.
    with serve("handles_robust:Sleeper", TimeoutS=2, MaxQueueSize=1, MaxBodyMB=1) as server:
        url = server.url + "/predict"
        for i in range(3):
            assert post_json(url, {"mark": i}) == (200, {"mark": i})
        assert post_json(url, {"reject": "no"})[0] == 400
        assert http("POST", url, data=b'{"x": ', headers=JSON)[0] == 400
        with connect(server) as sock:
            sock.sendall(head("POST", "/predict", "Content-Type: image/png", "Expect: 100-continue",
                              f"Content-Length: {2 * 2**20}"))
            assert read_response(sock)[0] == 413
        assert exchange(server, head("POST", "/predict", "Content-Length: 0", host="evil.example"))[0] == 403

        slow = Background(lambda: post_json(url, {"mark": "slow", "sleep": 1}))
        wait_busy(server)
        queued = Background(lambda: post_json(url, {"mark": "queued"}))
        wait_queued(server.url, 1)
        assert post_json(url, {"mark": "refused"})[0] == 429
        assert slow.result()[0] == 200 and queued.result()[0] == 200
        assert post_json(url, {"mark": "stuck", "sleep": 30})[0] == 504  # its worker is killed and replaced
        wait_until(lambda: server.workers[0]["restarts"] == 1 and server.workers[0]["state"] == "idle",
                   what="the stuck worker's replacement")

        over_http = request(server.url + "/stats")[2]
        in_python = server.stats()
    statuses = {"200": 5, "400": 2, "403": 1, "413": 1, "429": 1, "504": 1}
    assert over_http["statuses"] == in_python["statuses"] == statuses
    # one snapshot function: the same numbers by either way
    assert {k: v for k, v in over_http.items() if k not in TIMING} == {
        k: v for k, v in in_python.items() if k not in TIMING}
    assert over_http["requests"] == 7  # queued: 3 + the rejected one + slow + queued + stuck
    # per worker: batches answered, across its restart (the stuck batch was never answered)
    assert [(w["restarts"], w["batches"]) for w in in_python["workers"]] == [(1, 6)]
    assert server.stats()["statuses"] == statuses  # kept once stopped

    # five successful answers within the last minute (the errors are counted, not timed): p99 is the
    # slowest of them, the one that slept a second, not the 504 at TimeoutS
    p50, p99 = in_python["latency_p50_ms"], in_python["latency_p99_ms"]
    assert 0 < p50 <= p99 and p50 < 1000 and 1000 <= p99 < 1900, (p50, p99)
    assert in_python["requests_per_s"] > 0  # the 504 and the /stats read came within a few seconds


def test_waits_under_a_millisecond_are_in_the_queue_wait_histogram_as_the_statistics_extension_has_them(serve):
    """The histogram read the event loop's clock, which uvloop keeps in whole milliseconds: each wait of
    an idle server's requests was 0 or 1 ms, and its sum up to twice the extension's, or a fifth of it."""
    with serve(ModelName="recorder") as server:
        for value in range(60):
            assert post_json(server.url + "/predict", {"value": value})[0] == 200
        histogram = server.stats()["histograms"]["queue_wait_s"]
        queue = http("GET", server.url + "/v2/models/stats")[2]["model_stats"][0]["inference_stats"]["queue"]
    assert histogram["count"] == queue["count"] == 60
    milliseconds = histogram["sum"] * 1000
    assert abs(milliseconds - round(milliseconds)) > 1e-6, milliseconds  # not each 0 or 1 ms
    # the same stays, which the extension's queue time holds with a pipelined batch's wait for the one before it
    assert 0 < histogram["sum"] <= queue["ns"] / 1e9 + 1e-6, (histogram, queue)


def test_expect_refusals_are_counted(serve):
    # the Expect handler runs before any middleware: its answers still count (an error: not timed)
    with serve("handles_robust:Sleeper", MaxBodyMB=1) as server:
        with connect(server) as sock:
            sock.sendall(head("POST", "/predict", "Content-Type: image/png", "Expect: 100-continue",
                              f"Content-Length: {2 * 2**20}"))
            assert read_response(sock)[0] == 413
        stats = server.stats()
    assert stats["statuses"] == {"413": 1} and stats["requests"] == 0
    assert stats["latency_p50_ms"] is None and stats["histograms"]["latency_s"]["count"] == 0


def test_each_stage_of_a_batch_is_timed_where_it_ran(serve, tmp_path):
    # preprocess and postprocess sleep 50 ms a request, forward 100 ms a batch; requests one at a time
    args = {"log": str(tmp_path / "timeline"), "preprocess_s": 0.05, "forward_s": 0.1}
    with serve("handles_for_tests:Timeline", HandleArgs=args) as server:
        url = server.url + "/predict"
        for value in range(3):
            assert post_json(url, {"value": value}) == (200, {"value": value})
        assert post_json(url, {"reject": "no"})[0] == 400  # its batch: preprocess alone
        stats = request(server.url + "/stats")[2]
        metrics = http("GET", server.url + "/metrics")[2]
    stages = stats["stages"]
    assert list(stages) == ["read", "preprocess", "forward", "postprocess", "encode"]  # in the order they run
    assert {stage: each["batches"] for stage, each in stages.items()} == {
        "read": 4, "preprocess": 4, "forward": 3, "postprocess": 3, "encode": 4}
    assert stages["preprocess"]["seconds"] >= 0.15 and stages["postprocess"]["seconds"] >= 0.15
    assert stages["forward"]["seconds"] >= 0.3
    # parts of the batches' run time (encoding the answers follows it)
    parts = sum(stages[stage]["seconds"] for stage in ("read", "preprocess", "forward", "postprocess"))
    assert parts <= stats["run_s"] + 1e-6 and stats["histograms"]["run_s"]["count"] == 4
    assert 'easyserve_batch_stage_seconds_count{stage="forward"} 3.0' in metrics
    assert 'easyserve_batch_stage_seconds_count{stage="preprocess"} 4.0' in metrics
    assert 'stage="run_batch"' not in metrics


def test_a_handles_own_run_batch_is_timed_as_one_stage(serve):
    with serve("handles_for_tests:RefusesInItsOwnRunBatch") as server:
        assert post_json(server.url + "/predict", {"x": 1}) == (200, {"x": 1})
        stages = server.stats()["stages"]
    assert list(stages) == ["read", "run_batch", "encode"] and stages["run_batch"]["batches"] == 1


def test_reading_stats_while_the_server_stops_never_hangs_or_fails(serve):
    # Server.stats() hands the snapshot to the event loop; a loop that stops meanwhile must not leave
    # the caller (a dashboard's thread) waiting out its timeout, or raising
    with serve() as server:
        assert post_json(server.url + "/predict", {"value": 1})[0] == 200
        took, errors, done = [], [], threading.Event()

        def read() -> None:
            while not done.is_set():
                started = time.monotonic()
                try:
                    stats = server.stats()
                except Exception as exc:
                    errors.append(exc)
                    return
                took.append(time.monotonic() - started)
                assert stats["statuses"] == {"200": 1}

        readers = [threading.Thread(target=read) for _ in range(3)]
        for reader in readers:
            reader.start()
        wait_until(lambda: len(took) > 10 or errors, 10, "the readers to be reading")
        server.stop()
        time.sleep(0.2)
        done.set()
        for reader in readers:
            reader.join(5)
    assert not errors and not any(reader.is_alive() for reader in readers)
    assert len(took) > 10 and max(took) < 1, max(took)


def test_a_loop_that_stops_before_running_a_read_is_not_waited_for():
    # The race above, made certain: the read is scheduled on a loop that then stops and closes
    # without running it. The reader gets the last numbers at once, not after its timeout.
    server = Server(handle="handles_for_tests:Recorder", GPUs="cpu", Port=0)
    loop = asyncio.new_event_loop()
    busy, release, scheduled = threading.Event(), threading.Event(), threading.Event()

    def hold() -> None:  # keeps the loop running but taking no new callbacks, until released
        busy.set()
        release.wait(10)
        loop.stop()

    schedule = loop.call_soon_threadsafe

    def spy(*args):
        handle = schedule(*args)
        scheduled.set()
        return handle

    loop.call_soon_threadsafe = spy
    loop.call_soon(hold)
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    assert busy.wait(10)
    server._loop = loop
    reading = Background(lambda: server.stats(timeout=10))
    assert scheduled.wait(10)
    release.set()
    thread.join(10)
    loop.close()
    assert reading.result(5) == snapshot(None)
    assert reading.took < 2, reading.took
