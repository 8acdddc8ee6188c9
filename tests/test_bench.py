"""``easyserve bench`` and ``sweep`` against real servers: every request counted, statuses and batch sizes
right, files written, a server per sweep setting and nothing left running. Speeds are measured, never
asserted."""

from __future__ import annotations

import base64
import contextlib
import csv
import dataclasses
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from conftest import Background, _alive, free_port, request, wait_until, worker_children

import easyserve.server
from easyserve import Server, bench, reports, sweep
from easyserve.bench import BenchReport, Rejected, Run
from easyserve.devices import cpu_count
from easyserve.nginx import LocalNginx, find_nginx
from easyserve.errors import ConfigError, StartupError
from easyserve.payloads import ImagePayload, JsonPayload, TensorPayload, TensorSpec, payload_from
from easyserve.reports import headers
from easyserve.bench_cli import _finish
from easyserve.sweep import SweepReport

BENCH = sys.modules["easyserve.bench"]  # the module; `easyserve.bench` is the function
SLOW = {"HandleArgs": {"delay": 0.01}}  # a forward that takes a while, so requests queue and batch


def loadgen_children() -> list[int]:
    """Client processes of this process that are still running."""
    return _loadgens(parent=os.getpid())


def _loadgens(parent: int | None = None, group: int | None = None) -> list[int]:
    """Client processes still running whose parent is ``parent``, or in the process group ``group``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if (int(stat[1]) == parent or int(stat[2]) == group) and stat[0] != "Z" and b"easyserve.loadgen" in cmdline:
                found.append(int(entry.name))
    return found


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def served_by_size(run: Run) -> int:
    """Requests in the batches the server formed during the run."""
    return sum(int(size) * n for size, n in run.batch_sizes.items())


def test_counts_every_request_and_takes_batches_from_the_server(serve):
    with serve(MaxBatchSize=8, **SLOW) as server:
        before = request(server.url + "/stats")[2]["statuses"].get("200", 0)
        report = bench(server.url, {"value": 2}, concurrency=16, requests=300, warmup=0.3, progress=False)
        after = request(server.url + "/stats")[2]["statuses"]["200"]
    [run] = report.runs
    assert run.requests == 300 and run.statuses == {"200": 300} and run.errors == 0
    assert run.connection_errors == {} and run.stopped_answering_s is None
    # the /stats difference covers exactly the measured requests: the warm-up's ended before it began
    assert served_by_size(run) == 300 and run.server_requests == 300
    assert not [note for note in report.notes if "other clients" in note]
    assert after - before > 300  # the warm-up's requests reached the server too, and were not counted
    assert run.mean_batch > 1 and max(map(int, run.batch_sizes)) <= 8
    assert run.server_batch_ms is not None and run.server_batch_ms >= 10  # the forward sleeps 10 ms
    # where the batches' time went: mostly forward's sleep, stage by stage in the order they run
    stages = run.server_stages_ms
    assert list(stages) == ["read", "preprocess", "forward", "postprocess", "encode"], stages
    assert 10 <= stages["forward"] <= run.server_batch_ms and stages["preprocess"] < stages["forward"]
    row = run.row()
    assert row["server_forward_ms"] == stages["forward"] and "server_stages_ms" not in row
    assert dict(zip(reports.headers([run]), reports.cells(run, stages=True)))["fwd"] == f"{stages['forward']:,.2f}"
    assert None not in (run.p50_ms, run.p90_ms, run.p99_ms) and run.p50_ms <= run.p90_ms <= run.p99_ms
    assert run.requests_per_s > 0
    assert not loadgen_children()


def test_other_clients_traffic_during_a_level_is_noted_with_how_much_more_the_server_took(serve, tmp_path):
    """With another load beside bench's, the server columns said "mean batch 8.0" of batches holding four
    times the requests bench sent, and nothing said that they were not bench's own."""
    import threading

    stop, answered = threading.Event(), []

    def other_client(url: str) -> None:
        while not stop.is_set():
            answered.append(request(url + "/predict", json.dumps({"value": 3}).encode(),
                                    {"Content-Type": "application/json"})[0])

    with serve(MaxBatchSize=4, **SLOW) as server:
        others = [threading.Thread(target=other_client, args=(server.url,)) for _ in range(2)]
        for thread in others:
            thread.start()
        try:
            _wait_for(lambda: len(answered) >= 2, "the other clients' first answers")
            report = bench(server.url, {"value": 1}, concurrency=2, requests=200, warmup=0, progress=False)
        finally:
            stop.set()
            for thread in others:
                thread.join(60)
    [run] = report.runs
    assert run.requests == 200 and run.statuses == {"200": 200}
    more = run.server_requests - run.requests
    assert more > 0 and served_by_size(run) > 200  # the batches held the others' requests too
    said = (f"c=2: the server took {run.server_requests:,} requests during the measurement, {more:,} more than the "
            f"200 sent by this bench: other clients sent it requests meanwhile, and its server columns")
    assert [note for note in report.notes if "other clients" in note] == [report.notes[-1]]
    assert report.notes[-1].startswith(said), report.notes
    report.to_json(tmp_path / "b.json")
    saved = json.loads((tmp_path / "b.json").read_text())
    assert any(note.startswith(said) for note in saved["notes"]) and saved["runs"][0]["server_requests"] > 200
    assert set(answered) == {200} and not loadgen_children()


@pytest.mark.skipif(find_nginx() is None, reason="nginx is not installed (.ci/run installs it)")
def test_time_the_clients_waited_outside_the_server_is_noted_and_a_direct_run_says_nothing(serve, tmp_path):
    """At concurrencies past what the server can accept at once, the clients' latencies were seconds above
    the server's queue wait and run, and nothing said so. nginx holding each request (limit_req, 20 a
    second) stands for any time outside the server: a proxy, the network, connections waiting to be taken."""
    site = f"""limit_req_zone $binary_remote_addr zone=slow:1m rate=20r/s;
server {{
    listen 127.0.0.1:{free_port()};
    location = /predict {{ limit_req zone=slow burst=1000; proxy_pass http://127.0.0.1:PORT; }}
    location / {{ proxy_pass http://127.0.0.1:PORT; }}
}}
"""
    with serve() as server:
        direct = bench(server.url, {"value": 1}, concurrency=8, duration=1.0, warmup=0.2, progress=False)
        with LocalNginx(site.replace("PORT", str(server.port)), prefix=tmp_path / "nginx") as nginx:
            held = bench(nginx.url, {"value": 1}, concurrency=8, duration=1.5, warmup=0.2, progress=False)
    [run] = held.runs
    assert run.statuses and set(run.statuses) == {"200"} and run.server_latency_ms < 100 < 250 < run.mean_ms
    said = [note for note in held.notes if "at the clients" in note]
    outside = run.mean_ms - run.server_latency_ms
    assert len(said) == 1 and said[0].startswith(
        f"c=8: a request took {run.mean_ms:,.1f} ms on average at the clients, {outside:,.1f} ms more than"), said
    assert "outside the server, in a proxy, the network, or connecting" in said[0]
    assert direct.runs[0].server_latency_ms is not None and direct.runs[0].server_latency_ms <= direct.runs[0].mean_ms
    assert not [note for note in direct.notes if "at the clients" in note], direct.notes
    assert "server_latency_ms" in run.row() and not loadgen_children()


def test_a_bench_plots_throughput_and_latency_against_its_levels(serve, tmp_path):
    pytest.importorskip("matplotlib")
    with serve(MaxBatchSize=4, **SLOW) as server:
        report = bench(server.url, {"value": 1}, concurrency=[1, 4], requests=40, warmup=0, progress=False)
    figure = report.plot(tmp_path / "levels.png")
    assert repr(figure).startswith("<Figure size ")  # a bench's plot said it was a "SweepFigure"
    rate, latency = figure.axes
    assert [t.get_text() for t in latency.get_xticklabels()] == ["1", "4"] and latency.get_xlabel() == "concurrency"
    assert list(rate.lines[0].get_ydata()) == [run.requests_per_s for run in report.runs]
    assert [t.get_text() for t in latency.get_legend().get_texts()] == ["p50", "p90", "p99"]
    assert list(latency.lines[2].get_ydata()) == [run.p99_ms for run in report.runs]
    assert (tmp_path / "levels.png").read_bytes().startswith(b"\x89PNG")


def test_duration_mode_counts_what_it_sent_at_each_concurrency(serve):
    with serve(MaxBatchSize=4, **SLOW) as server:
        report = bench(server.url, {"value": 1}, concurrency=[1, 4], duration=0.8, warmup=0.2, progress=True)
    assert [run.concurrency for run in report.runs] == [1, 4]
    for run in report.runs:
        assert run.requests > 0 and run.statuses == {"200": run.requests}
        assert served_by_size(run) == run.requests
        assert 0.8 <= run.seconds < 5
    assert report.runs[0].batch_sizes == {"1": report.runs[0].requests}  # one at a time: nothing to batch


def test_progress_asked_for_where_stderr_is_no_terminal_is_a_line_as_each_level_starts_and_ends(serve):
    """In CI or a pipe rich drew nothing, with --progress too: a sweep of many minutes said nothing until it
    ended, and a CI job that waits that long for output is cut. Unasked, nothing is written there."""
    with serve() as server:
        def run(*flags: str) -> str:
            done = subprocess.run(["easyserve", "bench", server.url, "-c", "1,2", "-n", "5", "--warmup", "0", *flags],
                                  capture_output=True, text=True, env=_env(), timeout=120)
            assert done.returncode == 0, done.stderr
            return done.stderr

        said = run("--progress").splitlines()
        assert said[:2] == ["c=1: starting clients", "c=1: measuring"], said
        assert re.fullmatch(r"c=1: 5 requests, [\d,]+/s, 0 errors", said[2]), said
        assert said[3:5] == ["c=2: starting clients", "c=2: measuring"] and len(said) == 6, said
        assert run() == "" and run("--no-progress") == ""


def test_rejected_requests_are_errors_by_status(serve):
    bodies = [{"value": 1}, {"reject": "not this one"}]  # sent in turn: half are refused by preprocess
    with serve() as server:
        report = bench(server.url, bodies, concurrency=4, requests=100, warmup=0, progress=False)
    [run] = report.runs
    assert run.statuses == {"200": 50, "400": 50}
    assert run.errors == 50 and run.errors_text() == "400: 50"
    assert run.requests == 100 and served_by_size(run) == 100


def test_a_query_string_in_the_url_goes_with_every_request(serve):
    # a request's options (?top_k=1) change what the handle does, so what a bench measures: they go along
    with serve("handles_for_tests:Parameters") as server:
        refused = bench(server.url + "/predict?refuse=yes", {"value": 1}, concurrency=2, requests=20, warmup=0,
                        clients_processes=2, progress=False)
        served = bench(server.url + "?keep=1", {"value": 1}, concurrency=2, requests=20, warmup=0, progress=False)
    assert refused.runs[0].statuses == {"400": 20} and refused.payload.endswith(" ?refuse=yes")
    assert served.runs[0].statuses == {"200": 20}


def test_bodies_go_in_turn_across_client_processes(serve):
    # 101 requests over 3 processes (34, 34, 33): bodies in one turn over all of them send the
    # refused one 34 times; each process starting the turn afresh would send it 33 times
    bodies = [{"value": 1}, {"reject": "not this one"}, {"value": 2}]
    with serve() as server:
        report = bench(server.url, bodies, concurrency=6, requests=101, warmup=0, clients_processes=3,
                       progress=False)
    [run] = report.runs
    assert run.processes == 3
    assert run.statuses == {"200": 67, "400": 34}


def test_requests_that_get_no_answer_are_counted():
    with Server(GPUs="cpu", Port=0) as server:  # a port that surely refuses once its server has stopped
        url = server.url
    report = bench(url, concurrency=2, requests=10, warmup=0, progress=False)
    [run] = report.runs
    assert run.connection_errors == {"ConnectionRefusedError": 10} and run.errors == 10
    assert run.statuses == {} and run.requests_per_s == 0 and run.p99_ms is None
    assert run.batch_sizes is None  # no /stats to read


def test_several_client_processes_share_the_load(serve):
    with serve(ProcessPerGPU=2, **SLOW) as server:
        report = bench(server.url, {"value": 3}, concurrency=6, requests=120, warmup=0.2, clients_processes=3,
                       progress=False)
    [run] = report.runs
    assert run.processes == 3
    assert run.requests == 120 and run.statuses == {"200": 120} and served_by_size(run) == 120
    assert not loadgen_children()


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: no second client process to add")
def test_a_busy_client_is_spread_over_more_processes(serve, monkeypatch):
    monkeypatch.setattr(BENCH, "BUSY_CLIENT", 0.0)  # every client process counts as too busy
    with serve() as server:
        report = bench(server.url, concurrency=4, requests=40, warmup=0.2, progress=False)
    assert report.runs[0].processes == min(os.cpu_count(), 4)
    assert report.runs[0].requests == 40
    with serve() as server:
        fixed = bench(server.url, concurrency=4, requests=40, warmup=0.2, clients_processes=1, progress=False)
    assert fixed.runs[0].processes == 1  # a number given is kept


def test_an_open_loop_sends_at_its_rate_and_says_when_the_server_falls_behind(serve, tmp_path):
    with serve() as server:
        report = bench(server.url, {"value": 1}, rate=[100, 200], requests=40, warmup=0, clients_processes=2,
                       progress=False)
    with serve(MaxBatchSize=4, **SLOW) as server:
        # one connection, a forward of 10 ms and more: far fewer than the 400 due in a second can go
        behind = bench(server.url, {"value": 1}, rate=400, concurrency=1, duration=1.0, warmup=0, progress=False)
    for run, rate in zip(report.runs, [100, 200]):
        assert run.rate == rate and run.processes == 2 and run.concurrency == BENCH.RATE_CONNECTIONS
        assert run.requests == 40 and run.statuses == {"200": 40} and served_by_size(run) == 40
        assert run.unsent == 0
        assert run.seconds >= 39 / rate - 0.02  # paced: a closed loop of 256 would send all 40 at once
    # kept up, clients never busy (the clients' share of this machine's cores, 0.2 at most at these rates,
    # may pass the tenth that makes a note of its own, when other tests load the machine)
    assert not [note for note in report.notes if "cores, which the server on it shares" not in note], report.notes
    [late] = behind.runs
    assert late.unsent > 200 and late.requests + late.unsent >= 380 and late.statuses == {"200": late.requests}
    assert late.fell_behind and late.backlog[1] >= late.unsent and late.backlog[1] > late.backlog[0]
    assert behind.notes == [f"rate=400/s: the server fell behind this rate: the requests due and not yet answered went "
                            f"from {late.backlog[0]:,} halfway through the schedule to {late.backlog[1]:,} at its end; "
                            f"{late.unsent:,} of them were never sent, all 1 connections being busy"]
    html = report._repr_html_()
    assert "<th style=\"text-align: right\">rate</th>" in html and "open loop" in html
    report.to_csv(tmp_path / "rate.csv")
    rows = read_csv(tmp_path / "rate.csv")
    assert [(row["rate"], row["unsent"]) for row in rows] == [("100.0", "0"), ("200.0", "0")]
    assert "backlog" in html and not any(run.fell_behind for run in report.runs)


@pytest.mark.parametrize("options, message", [
    ({"rate": 0}, "rate: expected a number of requests per second above 0"),
    ({"rate": []}, "rate: expected one or more"),
    ({"rate": [10, float("inf")]}, "rate: expected a number"),
    ({"rate": 10, "concurrency": [1, 2]}, "with a rate, the most requests in flight at once: one whole number"),
    ({"rate": 10, "concurrency": 0}, "one whole number from 1 to 100,000"),
    # a client process held 12 GB before the kernel killed it, and a traceback
    ({"concurrency": [8, 100_000_000]}, "concurrency: expected whole numbers from 1 to 100,000, got"),
    ({"rate": 10, "arrivals": "bursty"}, "arrivals: expected one of constant, poisson"),
    ({"concurrency": [1, True]}, "concurrency: expected whole numbers"),
    ({"rate": "100"}, "rate: expected a number"),
    ({"arrivals": "poisson"}, "needs a rate"),
    ({"rate": 10, "seed": 3}, "seed: a whole number, for Poisson arrivals only"),
    ({"rate": 10, "arrivals": "poisson", "seed": "3"}, "seed: a whole number"),
])
def test_open_loop_options_are_checked_before_any_client_starts(options, message):
    with pytest.raises(ValueError, match=message):
        bench("http://127.0.0.1:9", **options)  # nothing listens there: it never gets that far
    assert not loadgen_children()


def test_json_and_csv_files(serve, tmp_path):
    with serve() as server:
        report = bench(server.url, [{"value": 1}, {"reject": "x"}], concurrency=[1, 2], requests=20, warmup=0,
                       progress=False)
    report.to_json(tmp_path / "bench.json")
    report.to_csv(tmp_path / "bench.csv")
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["url"] == report.url and [r["concurrency"] for r in saved["runs"]] == [1, 2]
    assert saved["runs"][1]["statuses"] == {"200": 10, "400": 10}
    rows = read_csv(tmp_path / "bench.csv")
    assert [row["concurrency"] for row in rows] == ["1", "2"]
    assert all(row["status_200"] == "10" and row["status_400"] == "10" and row["requests"] == "20" for row in rows)
    assert "conc." in report._repr_html_()


def test_payloads():
    spec = TensorSpec.parse("uint8:2x3")
    assert (spec.name, spec.dtype, spec.shape) == ("x", "uint8", (2, 3))
    assert TensorSpec.parse("img=float32:4").name == "img"
    for bad in ("uint8", "u8:2", "float32:2x0", "object:3"):
        with pytest.raises(ValueError):
            TensorSpec.parse(bad)
    tensors = TensorPayload(["uint8:2x3", "y=float32:5"], variants=3)
    bodies = [json.loads(body.data) for body in tensors.bodies()]
    assert len(bodies) == 3 and bodies[0] != bodies[1]
    assert [len(row) for row in bodies[0]["x"]] == [3, 3] and len(bodies[0]["y"]) == 5
    assert "random x=uint8:2x3, y=float32:5 as JSON lists to /predict" in tensors.describe()

    assert json.loads(JsonPayload({"a": 1}).bodies()[0].data) == {"a": 1}
    assert payload_from().bodies()[0].headers["Content-Type"] == "application/json"
    with pytest.raises(ValueError):
        JsonPayload([1, 2])


def test_image_payload_as_base64_json_or_raw(tmp_path):
    png = tmp_path / "picture.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    [body] = ImagePayload(png).bodies()
    assert json.loads(body.data) == {"img": base64.b64encode(png.read_bytes()).decode()}
    [raw] = payload_from(png, raw=True).bodies()
    assert raw.data == png.read_bytes() and raw.headers["Content-Type"] == "image/png"
    (tmp_path / "body.json").write_text('[{"x": 1}, {"x": 2}]')
    assert len(payload_from(tmp_path / "body.json").bodies()) == 2
    (tmp_path / "number.json").write_text("42")  # it raised "'int' object is not iterable"
    with pytest.raises(ValueError, match=r'a JSON payload is an object such as \{"x": \[1, 2\]\}'):
        payload_from(tmp_path / "number.json")


def test_bench_command(serve, tmp_path):
    np.save(tmp_path / "x.npy", np.array([5.1, 3.5, 1.4, 0.2], np.float32))
    with serve() as server:
        done = subprocess.run(
            ["easyserve", "bench", server.url, "-c", "1,2", "-n", "30", "--warmup", "0", "--tensor", "float32:4",
             "--json", str(tmp_path / "b.json"), "--csv", str(tmp_path / "b.csv"), "--plot", str(tmp_path / "b.png")],
            capture_output=True, text=True, timeout=60, env=_env())
        # a .npy file, sent as the tensor it holds, as `easyserve predict` sends it (it went as an image: 400)
        npy = subprocess.run(["easyserve", "bench", server.url, "-n", "5", "--warmup", "0", "--payload",
                              str(tmp_path / "x.npy"), "--json", str(tmp_path / "npy.json")],
                             capture_output=True, text=True, timeout=60, env=_env())
    assert npy.returncode == 0 and "x.npy as .npy" in npy.stdout, npy.stdout + npy.stderr
    assert json.loads((tmp_path / "npy.json").read_text())["runs"][0]["statuses"] == {"200": 5}
    assert done.returncode == 0, done.stderr
    assert "req/s" in done.stdout and "random x=float32:4 as JSON lists" in done.stdout
    assert [run["requests"] for run in json.loads((tmp_path / "b.json").read_text())["runs"]] == [30, 30]
    assert len(read_csv(tmp_path / "b.csv")) == 2
    assert (tmp_path / "b.png").read_bytes().startswith(b"\x89PNG")  # requests/s and latency by level
    refused = subprocess.run(["easyserve", "bench", "http://127.0.0.1:9", "--p99-ms", "50"], capture_output=True,
                             text=True, env=_env())
    assert refused.returncode == 2 and "--p99-ms only applies with --sweep" in refused.stderr
    for flags, message in ((["--rate", "0"], "--rate: expected requests per second above 0"),
                           (["--rate", "ten"], "--rate: expected requests per second"),
                           (["--rate", "10", "-c", "1,8"], "one whole number from 1 to 100,000, got [1, 8]"),
                           (["-c", "100000000"], "concurrency: expected whole numbers from 1 to 100,000"),
                           (["--rate", "10", "--arrivals", "bursty"], "arrivals: expected one of"),
                           (["--timeout", "0"], "timeout: expected a number of seconds above 0"),
                           (["--warmup", "-1"], "warmup: expected a number of seconds, 0 or more"),
                           (["--tensor", "float32:1000000x1000000", "-n", "1"], "does not fit in this machine's")):
        refused = subprocess.run(["easyserve", "bench", "http://127.0.0.1:9", *flags], capture_output=True,
                                 text=True, env=_env())
        assert refused.returncode == 2 and message in refused.stderr.replace("\n", " "), (flags, refused.stderr)
    with serve() as server:
        done = subprocess.run(["easyserve", "bench", server.url, "--rate", "50,100", "--arrivals", "poisson", "--seed",
                               "11", "-n", "20", "--warmup", "0", "-c", "4", "--json", str(tmp_path / "r.json")],
                              capture_output=True, text=True, timeout=60, env=_env())
    assert done.returncode == 0, done.stderr
    assert "rate" in done.stdout and "open loop" in done.stdout
    runs = json.loads((tmp_path / "r.json").read_text())["runs"]
    assert [(r["rate"], r["concurrency"], r["requests"], r["seed"]) for r in runs] == [(50.0, 4, 20, 11),
                                                                                        (100.0, 4, 20, 11)]
    with serve("handles_for_tests:Sizes") as server:
        done = subprocess.run(["easyserve", "bench", server.url, "-c", "2", "-n", "20", "--warmup", "0", "--tensor",
                               "pixels=uint8:8x8x3", "--form", "v2", "--model", "Sizes"],
                              capture_output=True, text=True, timeout=60, env=_env())
    assert done.returncode == 0, done.stderr
    title = " ".join(done.stdout.split())  # wrapped at the table's width
    assert "as v2 binary tensors" in title and "/v2/models/Sizes/infer" in title


def _env() -> dict[str, str]:
    tests = str(Path(__file__).parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}


# -- sweeps ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swept():
    """One real sweep, 2 x 2 settings at concurrency 8, with every server it started recorded."""
    started: list[tuple[Server, list[int]]] = []

    class Recording(Server):
        def start(self, timeout=None):
            super().start(timeout)
            started.append((self, [w["pid"] for w in self.workers]))
            return self

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(easyserve.server, "Server", Recording)
        report = sweep("handles_for_tests:Recorder", {"value": 1}, GPUs="cpu", HandleArgs={"delay": 0.005},
                       process_per_gpu=[1, 2], max_batch_size=[1, 4], concurrency=8, duration=0.6, warmup=0.2,
                       progress=False)
    return report, started


def test_sweep_starts_and_stops_a_server_per_setting(swept):
    report, started = swept
    settings = [(s.config.process_per_gpu, s.config.max_batch_size) for s, _ in started]
    assert settings == [(1, 1), (1, 4), (2, 1), (2, 4)]
    assert [len(pids) for _, pids in started] == [1, 1, 2, 2]
    assert all(s.state == "stopped" for s, _ in started)
    assert not [pid for _, pids in started for pid in pids if _alive(pid)]
    assert not worker_children() and not loadgen_children()
    assert not report.on_cpu and "CPU" not in report.recommendation  # GPUs: cpu, as the config asked
    assert [(r.settings["ProcessPerGPU"], r.settings["MaxBatchSize"]) for r in report.runs] == settings
    assert all(r.statuses == {"200": r.requests} and served_by_size(r) == r.requests for r in report.runs)
    assert all(max(map(int, r.batch_sizes)) <= r.settings["MaxBatchSize"] for r in report.runs)


def test_sweep_recommends_the_fastest_setting_under_the_bound(swept):
    report, _ = swept
    p99s = sorted(run.p99_ms for run in report.runs)
    report.p99_ms = p99s[1]  # two runs meet it, two may not
    fit = [run for run in report.runs if run.p99_ms <= report.p99_ms]
    best = report.best
    assert best in fit and best.requests_per_s == max(run.requests_per_s for run in fit)
    assert report.recommendation.startswith(f"Recommended under a p99 of {report.p99_ms:g} ms: ProcessPerGPU "
                                            f"{best.settings['ProcessPerGPU']}, MaxBatchSize "
                                            f"{best.settings['MaxBatchSize']}")
    assert report.to_dict()["recommended"] == {**best.settings, "concurrency": 8}

    report.p99_ms = p99s[0] / 2  # none meets it
    assert report.best is None and report.to_dict()["recommended"] is None
    assert report.recommendation.startswith(f"No setting qualifies under a p99 of {report.p99_ms:g} ms")
    assert f"{p99s[0]:,.2f} ms" in report.recommendation  # and it says how close the best came

    report.p99_ms = None
    assert report.best.requests_per_s == max(run.requests_per_s for run in report.runs)


def test_a_run_with_errors_is_not_recommended():
    def run(rps: float, p99: float, errors: int) -> Run:
        return Run(8, 1, 100, 1.0, rps, 1.0, 1.0, p99, 1.0, p99, errors, {"200": 100 - errors}, {}, 0.1,
                   settings={"ProcessPerGPU": 1, "MaxBatchSize": int(rps)})

    report = SweepReport("h", "p", [run(100, 5, 0), run(900, 5, 3)], p99_ms=10)
    assert report.best is report.runs[0]


def test_a_run_that_fell_behind_its_rate_is_not_recommended():
    def run(rate: float, unsent: int, p99: float = 5.0, batch: int = 1, rps: float | None = None) -> Run:
        return Run(256, 1, 100, 1.0, rps or rate, 1.0, 1.0, p99, 1.0, p99, 0, {"200": 100}, {}, 0.1, rate=rate,
                   unsent=unsent, backlog=[3, 4], settings={"ProcessPerGPU": 1, "MaxBatchSize": batch})

    report = SweepReport("h", "p", [run(100, 0), run(900, 40, batch=8)], p99_ms=10)
    behind = run(500, 0, batch=4)
    behind.backlog = [20, 60]  # the server fell behind, though every request went out
    report.runs.append(behind)
    assert report.best is report.runs[0]
    assert report.recommendation.endswith("p99 5.00 ms at rate 100/s.")
    assert report.to_dict()["recommended"] == {"ProcessPerGPU": 1, "MaxBatchSize": 1, "concurrency": 256,
                                               "rate": 100}
    assert SweepReport("h", "p", [run(900, 40)], p99_ms=10).best is None
    # at the same rate, requests/s differ by the schedule's chance: the lower p99 is what tells them apart
    same = SweepReport("h", "p", [run(400, 0, p99=8.0, rps=404.0), run(400, 0, p99=3.0, batch=8, rps=396.0)],
                       p99_ms=10)
    assert same.best is same.runs[1]


def test_a_sweep_at_rates(tmp_path):
    report = sweep("handles_for_tests:Recorder", {"value": 1}, GPUs="cpu", HandleArgs={"delay": 0.005},
                   process_per_gpu=[1], max_batch_size=[1, 4], rate=[50, 100], arrivals="poisson", concurrency=16,
                   requests=60, warmup=0, progress=False)
    assert [(r.settings["MaxBatchSize"], r.rate, r.concurrency) for r in report.runs] == [
        (1, 50, 16), (1, 100, 16), (4, 50, 16), (4, 100, 16)]
    assert all(r.statuses == {"200": 60} and r.unsent == 0 for r in report.runs), [
        (r.statuses, r.unsent, r.backlog) for r in report.runs]
    # no bound: the highest rate held. Whether one fell behind is the machine's speed at the time (a
    # timing, which a test does not assert: on a busy CI machine a pause of 0.2 s at 100/s tripped it)
    held = [r for r in report.runs if not r.fell_behind]
    if held:
        assert report.to_dict()["recommended"]["rate"] == max(r.rate for r in held) and report.best in held
    else:
        assert report.best is None and report.to_dict()["recommended"] is None
    # every setting met the same arrivals: one seed for the sweep, drawn as none was given
    assert len({r.seed for r in report.runs}) == 1 and isinstance(report.runs[0].seed, int)
    assert not worker_children() and not loadgen_children()
    if _has_matplotlib():
        figure = report.plot(tmp_path / "rates.png")
        assert [t.get_text() for t in figure.axes[1].get_legend().get_texts()] == ["rate 50/s", "rate 100/s"]


def test_the_recommended_row_is_marked_where_styles_are_dropped_and_the_plain_text_names_no_machine(swept):
    # GitHub's notebook view drops style attributes: the bold green row looked as every other; and the
    # report's plain text, saved beside its HTML in a notebook, held the machine's name and kernel
    report, _ = swept
    assert report.best is not None
    bare = re.sub(r' style="[^"]*"', "", report._repr_html_())
    assert bare.count("★") == 1 and bare.count("<strong>") == len(headers(report.runs))
    said = repr(report)
    assert said.startswith("<SweepReport ") and "recommended" in said and "host" not in said and "Linux" not in said


def test_sweep_plot(swept, tmp_path):
    pytest.importorskip("matplotlib")
    report, _ = swept
    report.p99_ms = max(run.p99_ms for run in report.runs)
    figure = report.plot(tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes().startswith(b"\x89PNG")
    assert len(figure.axes) == 2


def test_plot_without_matplotlib_names_the_extra(swept, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'easyserve\[plot\]'"):
        swept[0].plot(tmp_path / "sweep.png")
    assert not (tmp_path / "sweep.png").exists()


def test_a_plot_rings_errors_marks_lower_bounds_and_keeps_the_other_points_apart_from_an_overload():
    """A level that fell behind (2.3 s, a lower bound) drew like any other point, and on a linear scale put every
    other one, the recommended star and the bound among them, on the floor of the latency axis."""
    def run(rps: float, p99: float, rate: float, **fields: object) -> Run:
        return dataclasses.replace(_closed(rps, p99), rate=rate, **fields)

    overloaded = run(1300, 2300, 2500, unsent=1500, errors=1500)
    report = BenchReport("u", "p", [run(500, 10, 500), run(1000, 30, 1000), overloaded])
    rate, latency = report.plot().axes
    assert latency.get_yscale() == "log" and latency.get_ylim()[0] < 10 / 3
    assert "with errors" in [line.get_label() for line in rate.get_lines()]
    bounds = [line for line in latency.get_lines() if line.get_marker() == "^"]  # p50, p90, p99 of the third level
    assert [(list(line.get_xdata()), list(line.get_ydata())) for line in bounds] == [
        ([2], [overloaded.p50_ms]), ([2], [overloaded.p90_ms]), ([2], [overloaded.p99_ms])]
    assert [line.get_label() for line in bounds][0] == "at least (requests never sent)"
    swept = SweepReport("h", "p", [_closed(500, 12), _closed(900, 25, batch=8),
                                   _closed(200, 2352, processes=2, errors=30)], p99_ms=50)
    rate, p99 = swept.plot().axes
    assert p99.get_yscale() == "log" and p99.get_ylim()[0] < 12
    assert [line.get_label() for line in rate.get_lines()][-1] == "with errors"
    calm = SweepReport("h", "p", [_closed(500, 12), _closed(900, 25, batch=8)], p99_ms=50)
    assert calm.plot().axes[1].get_yscale() == "linear"


def test_sweep_command(tmp_path):
    config = tmp_path / "recorder.yaml"
    config.write_text('GPUs: cpu\nHandle: "handles_for_tests:Recorder"\nHandleArgs: {delay: 0.005}\n')
    done = subprocess.run(
        ["easyserve", "bench", str(config), "--sweep", "--process-per-gpu", "1", "--max-batch-size", "1,4", "-c", "4",
         "--duration", "0.5", "--warmup", "0.1", "--p99-ms", "0.001", "--json", str(tmp_path / "s.json"),
         "--csv", str(tmp_path / "s.csv"), "--plot", str(tmp_path / "s.png")],
        capture_output=True, text=True, timeout=120, env=_env())
    assert done.returncode == 0, done.stderr
    assert "No setting qualifies under a p99 of 0.001 ms" in done.stdout.replace("\n", " ")
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["recommended"] is None and len(saved["runs"]) == 2
    assert [row["MaxBatchSize"] for row in read_csv(tmp_path / "s.csv")] == ["1", "4"]
    if _has_matplotlib():
        assert (tmp_path / "s.png").stat().st_size > 0


def test_sweep_command_at_a_rate(tmp_path):
    config = tmp_path / "recorder.yaml"
    config.write_text('GPUs: cpu\nHandle: "handles_for_tests:Recorder"\n')
    done = subprocess.run(
        ["easyserve", "bench", str(config), "--sweep", "--process-per-gpu", "1", "--max-batch-size", "1", "--rate",
         "40", "--arrivals", "poisson", "-n", "20", "--warmup", "0", "--json", str(tmp_path / "s.json")],
        capture_output=True, text=True, timeout=120, env=_env())
    assert done.returncode == 0, done.stderr
    saved = json.loads((tmp_path / "s.json").read_text())
    assert [(run["rate"], run["requests"]) for run in saved["runs"]] == [(40.0, 20)]
    assert isinstance(saved["runs"][0]["seed"], int)
    assert saved["recommended"] == {"ProcessPerGPU": 1, "MaxBatchSize": 1, "concurrency": 256, "rate": 40.0}
    assert "at rate 40/s." in done.stdout.replace("\n", " ")


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_sweep_command_without_matplotlib_says_so_before_measuring(tmp_path):
    hidden = tmp_path / "no-matplotlib" / "matplotlib"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('hidden for this test')\n")
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(hidden.parent), env["PYTHONPATH"]])
    done = subprocess.run(["easyserve", "bench", "handles_for_tests:Recorder", "--sweep", "--plot", "s.png"],
                          capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert done.returncode == 2 and "pip install 'easyserve[plot]'" in done.stderr
    assert "req/s" not in done.stdout  # nothing was measured


@pytest.mark.parametrize("form, source, tensors, size", [
    ("npy", None, ["uint8:16x16x3"], 768),
    ("v2", None, ["pixels=uint8:16x16x3", "scale=float16:2"], 770),
    ("v2", "picture", [], 1),  # an image file: one BYTES element holding it
])
def test_tensors_travel_as_npy_or_v2_binary_requests(serve, tmp_path, form, source, tensors, size):
    picture = tmp_path / "picture.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    payload = payload_from(picture if source else None, tensors=tensors, form=form, model="Sizes")
    body = payload.bodies()[0]
    with serve("handles_for_tests:Sizes") as server:
        report = bench(server.url, payload, concurrency=4, requests=40, warmup=0.1, progress=False)
        status, _, answer = request(server.url + payload.path, body.data, dict(body.headers))
    [run] = report.runs
    assert run.statuses == {"200": 40} and run.errors == 0, run
    assert served_by_size(run) == 40
    assert status == 200  # and the handle saw every number of every tensor, or the one BYTES element
    if form == "npy":
        assert answer == {"size": size}
    else:
        assert answer["outputs"] == [{"name": "size", "datatype": "INT64", "shape": [1], "data": [size]}]


def test_payload_forms_say_what_they_need(tmp_path):
    # with the option that names it: "give its name" left the bench's user to find --model
    with pytest.raises(ValueError, match="v2 requests name the model: give it with --model NAME"):
        payload_from(tensors=["uint8:4"], form="v2")
    # a .npy file went to v2 as an image, the BYTES tensor "img", which a model of tensors refused each time
    np.save(tmp_path / "x.npy", np.zeros(4, np.float32))
    with pytest.raises(ValueError, match=r"x.npy: v2 sends an image file, or random tensors \(--tensor"):
        payload_from(tmp_path / "x.npy", form="v2", model="Demo")
    with pytest.raises(ValueError, match=".npy carries one array; got 2"):
        payload_from(tensors=["a=uint8:4", "b=uint8:4"], form="npy")
    with pytest.raises(ValueError, match=".npy sends random tensors"):
        payload_from({"x": [1]}, form="npy")
    with pytest.raises(ValueError, match="form 'xml'"):
        payload_from(form="xml")
    with pytest.raises(ValueError, match=r".npy cannot carry bfloat16 \(numpy has no such type of its own\): send it "
                                         "with --form v2"):
        payload_from(tensors=["bfloat16:4"], form="npy")


def test_bench_sends_bf16_tensors_over_v2_and_as_json_numbers(serve):
    """A model of BF16 inputs could be served but not measured: bfloat16 was "not a number type", and
    float32 was refused by the model ("input 'x' is FP32, and the model takes BF16")."""
    with serve("handles_v2:Echo") as server:
        v2 = bench(server.url, payload_from(tensors=["x=bfloat16:4"], form="v2", model="Echo"), concurrency=2,
                   requests=20, warmup=0, progress=False).runs[0]
        as_json = bench(server.url, payload_from(tensors=["x=bfloat16:4"]), concurrency=2, requests=20, warmup=0,
                        progress=False).runs[0]
    assert v2.statuses == {"200": 20} and as_json.statuses == {"200": 20}
    [first, *_] = payload_from(tensors=["x=bfloat16:2"], form="v2", model="Echo").bodies()
    header = json.loads(first.data[:int(first.headers["Inference-Header-Content-Length"])])
    assert header["inputs"] == [{"name": "x", "datatype": "BF16", "shape": [2],
                                 "parameters": {"binary_data_size": 4}}]


class _Raw:
    """A server on a raw socket: ``reset`` resets each connection as it is accepted; otherwise
    ``/predict`` is answered 200 (the first ``answers`` times; then never) and ``/stats`` with ``stats``
    (not what this easyserve writes; a body, or a status and a body). ``posts`` counts the requests to
    ``/predict``."""

    def __init__(self, reset: bool, stats=lambda: b"{}", answers: int | None = None, stats_status: int = 200) -> None:
        import itertools
        import socket
        import struct
        import threading

        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.posts = 0
        counter = itertools.count(1)

        def serve(connection: socket.socket) -> None:
            with connection:
                if reset:
                    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                reader = connection.makefile("rb")
                while True:
                    try:
                        head = reader.readline()
                    except OSError:  # reset by a client that left an answer unread
                        head = b""
                    if not head:
                        reader.close()
                        return
                    length = 0
                    while (line := reader.readline()) not in (b"\r\n", b""):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":")[1])
                    reader.read(length)
                    if b" /stats " not in head:
                        self.posts = next(counter)
                        if answers is not None and self.posts > answers:
                            continue  # no answer: the client waits, until it gives up
                    body = stats() if b" /stats " in head else b'{"ok": true}'
                    status = stats_status if b" /stats " in head else 200
                    if isinstance(body, tuple):
                        status, body = body
                    try:
                        connection.sendall(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n"
                                           b"Content-Length: %d\r\n\r\n%s" % (status, len(body), body))
                    except OSError:  # the client left without reading it all
                        reader.close()
                        return

        def accept() -> None:
            while True:
                try:
                    connection, _ = self.listener.accept()
                except OSError:
                    return
                threading.Thread(target=serve, args=(connection,), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()


def test_bench_counts_connections_reset_as_they_are_made_and_says_nothing_was_measured(tmp_path):
    """The load generator died of uvloop's RuntimeError (a write on a transport already closed), and
    bench lost every number; a run with nothing but errors also exited 0, as if it had measured."""
    server = _Raw(reset=True)
    try:
        done = subprocess.run(["easyserve", "bench", server.url, "-c", "4", "--duration", "1", "--warmup", "0",
                               "--no-progress"], capture_output=True, text=True, timeout=60, env=_env())
    finally:
        server.close()
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "no request was answered with success" in done.stderr
    assert "ConnectionResetError" in done.stdout or "Disconnected" in done.stdout


def test_bench_piped_to_a_reader_that_leaves_writes_its_files_all_the_same(tmp_path):
    """`easyserve bench ... --json r.json | head -1`: printing the table to the closed pipe raised, and
    the run (minutes, for a sweep) exited 1 without a word, its files never written."""
    server = _Raw(reset=False)
    try:
        proc = subprocess.Popen(["easyserve", "bench", server.url, "-c", "1", "-n", "20", "--warmup", "0",
                                 "--no-progress", "--json", str(tmp_path / "r.json"), "--csv", str(tmp_path / "r.csv")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
        proc.stdout.close()  # as head does once it has its line: here, before the table comes
        with proc.stderr:
            err = proc.stderr.read().decode()
        assert proc.wait(60) == 0, err
    finally:
        server.close()
    assert json.loads((tmp_path / "r.json").read_text())["runs"][0]["statuses"] == {"200": 20}
    assert (tmp_path / "r.csv").read_text().count("\n") == 2
    assert "Traceback" not in err and f"wrote {tmp_path / 'r.json'}" in err, err


def test_bench_to_an_output_that_is_not_utf8_prints_its_table_and_writes_its_files(tmp_path):
    """With ``LANG=C`` or ``PYTHONIOENCODING=ascii``, the title's "·" raised UnicodeEncodeError: a traceback,
    and the files asked for, written after the table, were lost with the measuring."""
    server = _Raw(reset=False)
    try:
        done = subprocess.run(["easyserve", "bench", server.url, "-c", "1", "-n", "20", "--warmup", "0",
                               "--no-progress", "--csv", str(tmp_path / "r.csv")], capture_output=True,
                              timeout=60, env={**_env(), "PYTHONIOENCODING": "ascii"})
    finally:
        server.close()
    assert done.returncode == 0 and b"Traceback" not in done.stderr, done.stderr.decode()
    assert b"req/s" in done.stdout and (tmp_path / "r.csv").read_text().count("\n") == 2


def test_bench_measures_a_server_whose_stats_are_not_this_easyserves(tmp_path):
    """An older easyserve (no "fronts" in cpu_s), or another server: its columns stay empty, and the
    measurement is kept (it was a KeyError, after the whole run)."""
    import time

    server = _Raw(reset=False, stats=lambda: json.dumps({"batch_sizes": {}, "uptime_s": time.monotonic(),
                                                         "cpu_s": {"server": 0.5, "workers": 1.0}}).encode())
    try:
        report = bench(server.url, concurrency=2, requests=40, warmup=0, progress=False)
        missing = subprocess.run(["easyserve", "bench", server.url, "--json", str(tmp_path / "no" / "r.json")],
                                 capture_output=True, text=True, timeout=60, env=_env())
    finally:
        server.close()
    [run] = report.runs
    assert run.statuses == {"200": 40} and run.requests_per_s > 0
    assert missing.returncode == 2 and f"--json: the folder {tmp_path / 'no'} does not exist" in missing.stderr
    folder = subprocess.run(["easyserve", "bench", "http://127.0.0.1:9", "--csv", str(tmp_path)],
                            capture_output=True, text=True, timeout=60, env=_env())
    assert folder.returncode == 2 and "is a folder; name a file" in folder.stderr
    # a folder that is there but takes no file: told after the measuring, as a traceback, the files after
    # it in turn unwritten
    refused = subprocess.run(["easyserve", "bench", "http://127.0.0.1:9", "--json", "/proc/r.json"],
                             capture_output=True, text=True, timeout=60, env=_env())
    assert refused.returncode == 2 and "--json: cannot write /proc/r.json: " in refused.stderr, refused.stderr
    (tmp_path / "serve.yaml").write_text('GPUs: cpu\nHandle: "handles_for_tests:Recorder"\n')
    plot = subprocess.run(["easyserve", "bench", str(tmp_path / "serve.yaml"), "--sweep", "--plot",
                           str(tmp_path / "sweep.xyz")], capture_output=True, text=True, timeout=60, env=_env())
    assert plot.returncode == 2 and "--plot: matplotlib cannot write a .xyz file here: Format 'xyz' is not " \
        "supported" in plot.stderr, plot.stderr
    if shutil.which("latex") is None and shutil.which("xelatex") is None:  # a format matplotlib lists, and needs LaTeX
        plot = subprocess.run(["easyserve", "bench", str(tmp_path / "serve.yaml"), "--sweep", "--plot",
                               str(tmp_path / "sweep.pgf")], capture_output=True, text=True, timeout=60, env=_env())
        assert plot.returncode == 2 and "--plot: matplotlib cannot write a .pgf file here" in plot.stderr, plot.stderr
    assert not list(tmp_path.glob("sweep*"))
    # and one that stops taking files while it measures: the others are written, the exit status says so
    written = _finish(report, Path("/proc/r.json"), tmp_path / "r.csv", None, 0, None)
    assert written == 1 and (tmp_path / "r.csv").read_text().startswith("concurrency,")


@pytest.mark.parametrize("stats", [
    {"batch_sizes": {"1": 5}, "uptime_s": 10**400, "cpu_s": {"server": 1, "workers": 1}},  # overflowed
    {"batch_sizes": {"1": 5}, "uptime_s": 1e6, "batches_run_apart": math.nan},  # written to --json as NaN
    {"batch_sizes": {"-1000": 5, "1": 1}, "uptime_s": 1e6},  # a mean batch of -909
    {"batch_sizes": {str(size): 1 for size in range(1, 5000)}, "uptime_s": 1e6},  # 5,000 CSV columns
    {"batch_sizes": {"1": 5}, "uptime_s": 1e6, "histograms": {"run_s": {"count": 10, "sum": math.inf}}},
])
def test_a_stats_that_no_easyserve_writes_leaves_the_server_columns_empty_and_the_measurement_whole(tmp_path, stats):
    """Another server, or a hostile one: a 400-digit uptime was a traceback that lost every level
    measured, and NaN went into the table and --json."""
    reads = itertools.count()

    def answer() -> bytes:  # counters that grow, as a live server's do
        grown = json.loads(json.dumps(stats))
        grown["batch_sizes"] = {size: n + next(reads) for size, n in grown["batch_sizes"].items()}
        if isinstance(grown["uptime_s"], int):
            grown["uptime_s"] += next(reads)
        return json.dumps(grown).encode()

    server = _Raw(reset=False, stats=answer)
    try:
        report = bench(server.url, concurrency=2, requests=40, warmup=0, progress=False)
        report.to_json(tmp_path / "r.json")
    finally:
        server.close()
    [run] = report.runs
    assert run.statuses == {"200": 40} and run.requests_per_s > 0
    assert run.mean_batch is None and run.batch_sizes is None and run.batches_run_apart is None, run
    json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda word: pytest.fail(f"{word} in the JSON"))


def test_a_proxy_that_refuses_stats_and_says_why_is_noted():
    """Through the nginx config gen-nginx writes, /stats is a 404 that says to read each server: the
    server's columns were left empty unsaid, as for a server that has no /stats at all."""
    said = b'{"error": "/stats and /metrics describe one server: read them from each, not through nginx"}'
    notes = []
    for stats in (said, b"<html>Not Found</html>"):
        server = _Raw(reset=False, stats=lambda stats=stats: stats, stats_status=404)
        try:
            report = bench(server.url, concurrency=2, requests=20, warmup=0, progress=False)
        finally:
            server.close()
        [run] = report.runs
        assert run.statuses == {"200": 20} and run.batch_sizes is None
        notes.append([note for note in report.notes if "/stats" in note])
    assert notes == [["the server's /stats answered 404 (/stats and /metrics describe one server: read them from "
                      "each, not through nginx): the server columns are left empty"], []]


def _stats_reads(*answers):
    """A ``/stats`` that gives ``answers`` in turn (a body, or a status and a body), then the last again."""
    left = list(answers)
    return lambda: left.pop(0) if len(left) > 1 else left[0]


def _stats_body(uptime: float, batches: int) -> bytes:
    return json.dumps({"batch_sizes": {"1": batches}, "uptime_s": uptime}).encode()


@pytest.mark.parametrize("last,said", [
    ((500, b'{"error": "boom"}'), "c=2, after measuring: the server's /stats answered 500 (boom): the server "
                                  "columns of that level are left empty"),
    (_stats_body(1, 1), "c=2: the server restarted during the measurement (by its /stats, whose counters went back "
                        "or whose uptime grew by less than the measurement lasted): the server columns of that level "
                        "are left empty"),
])
def test_a_level_left_without_server_columns_says_why(last, said):
    """The /stats read after a level failed, or showed that the server had restarted meanwhile: that
    level's server columns were left empty, with no word, though the level before had them."""
    server = _Raw(reset=False, stats=_stats_reads(_stats_body(10, 0), _stats_body(11, 10), _stats_body(12, 10), last))
    try:
        report = bench(server.url, concurrency=[1, 2], requests=10, warmup=0, progress=False)
    finally:
        server.close()
    first, second = report.runs
    assert first.batch_sizes == {"1": 10} and second.batch_sizes is None
    assert [note for note in report.notes if "/stats" in note] == [said]


@pytest.mark.parametrize("uptime_after, restarted", [(0.1, True), (10.0, False), (None, False)])
def test_a_server_restarted_early_in_a_level_is_told_by_its_uptime(uptime_after, restarted):
    """A server that restarted early in a level had run longer by its end than the old one had at its
    start: neither its uptime nor its counters went back, and the level's server columns took the new
    process's batches for the old one's, unsaid. Its uptime is less than the level lasted. A /stats
    without an uptime (an older easyserve's) tells nothing: it was taken for a restart."""
    if uptime_after is None:
        reads = [json.dumps({"batch_sizes": {"1": n}}).encode() for n in (0, 40)]
    else:
        reads = [_stats_body(0.05, 0), _stats_body(uptime_after, 40)]
    server = _Raw(reset=False, stats=_stats_reads(*reads))
    try:
        report = bench(server.url, concurrency=1, duration=0.5, warmup=0, progress=False)
    finally:
        server.close()
    [run] = report.runs
    notes = [note for note in report.notes if "restarted" in note]
    assert (run.batch_sizes is None, len(notes)) == ((True, 1) if restarted else (False, 0)), (run, notes)


@pytest.mark.parametrize("stats", [
    b'{"batch_sizes": {}, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # RecursionError in the parser
    b'{"batch_sizes": {"1": 1}, "uptime_s": 1, "latency_p99_ms": {"a": 1}}',  # a table cell that is a dict
    b'{"batch_sizes": {"1": 1}, "uptime_s": 1, "latency_p99_ms": "12"}',
    b'{"batch_sizes": {"1": 1}, "uptime_s": 1, "latency_p99_ms": true}',
    b'{"batch_sizes": {"1": 1}, "uptime_s": 1, "latency_p99_ms": 5, "pad": "' + b"x" * 17_000_000 + b'"}',  # not read
    b'{"batch_sizes": {"1": 1}, "uptime_s": 1, "stages": [1, 2]}',
], ids=["nested 100,000 deep", "a p99 that is a dict", "a p99 in a string", "a p99 of true", "17 MB of padding",
        "stages that are a list"])  # short: a test's id goes in an environment variable, which holds 128 kB at most
def test_bench_keeps_its_measurement_whatever_a_servers_stats_hold(tmp_path, stats):
    """An odd /stats leaves the server's columns empty: bench crashed instead (RecursionError, TypeError
    in the table), with no table and no --json file, the whole measurement lost."""
    server = _Raw(reset=False, stats=lambda: stats)
    try:
        done = subprocess.run(["easyserve", "bench", server.url, "-c", "2", "-n", "20", "--warmup", "0",
                               "--no-progress", "--json", str(tmp_path / "r.json")],
                              capture_output=True, text=True, timeout=60, env=_env())
    finally:
        server.close()
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    [run] = json.loads((tmp_path / "r.json").read_text())["runs"]
    assert run["statuses"] == {"200": 20} and run["server_queue_ms"] is None and not run["server_stages_ms"]


def test_bench_takes_the_stages_easyserve_times_and_no_others_a_server_lists():
    """A /stats listing stages of other names (a server that is not easyserve, or a hostile one) got a
    column each in the bench's CSV, as many as it listed."""
    def stats(batches: int, uptime: float) -> bytes:
        stages = {f"s{n}": {"seconds": batches / 100, "batches": batches} for n in range(500)}
        stages["forward"] = {"seconds": batches / 100, "batches": batches}
        return json.dumps({"batch_sizes": {"1": batches}, "uptime_s": uptime, "stages": stages}).encode()

    server = _Raw(reset=False, stats=_stats_reads(stats(0, 0.05), stats(40, 10.0)))
    try:
        report = bench(server.url, concurrency=1, requests=10, warmup=0, progress=False)
    finally:
        server.close()
    [run] = report.runs
    assert run.server_stages_ms == {"forward": 10.0}


def _stats_of_a_level(loop_cores: float, gpu_busy: float, stages_ms: dict[str, float],
                      queue_ms: float) -> list[bytes]:
    """``/stats`` before and after a level of 10 s and 40 batches of one request: the event loop's cores,
    the GPU's share of time busy, each stage's ms a batch, a request's wait in the queue."""
    def read(uptime: float, share: float) -> bytes:
        batches = round(40 * share)
        run_s = sum(stages_ms.values()) / 1000
        return json.dumps({
            "batch_sizes": {"1": batches}, "uptime_s": uptime,
            "histograms": {"queue_wait_s": {"count": batches, "sum": batches * queue_ms / 1000},
                           "run_s": {"count": batches, "sum": batches * run_s}},
            "cpu_s": {"server": loop_cores * 10 * share, "workers": 10 * share},
            "gpus": [{"gpu": 0, "busy_s": gpu_busy * 10 * share, "sampled_s": 10 * share}],
            "stages": {stage: {"seconds": ms / 1000 * 40 * share, "batches": round(40 * share)}
                       for stage, ms in stages_ms.items()}}).encode()
    return [read(1.0, 0.0), read(11.0, 1.0)]


@pytest.mark.parametrize("loop_cores, gpu_busy, stages_ms, queue_ms, said", [
    (0.95, 0.9, {"preprocess": 2, "forward": 10, "postprocess": 1}, 0,
     "c=1: the server's event loop used 0.95 of a core, about all that one process has: reading and answering "
     "HTTP may have limited this level; HttpWorkers 2 or more share that work out among processes, where the "
     "machine has cores to spare"),
    (0.2, 0.3, {"preprocess": 20, "forward": 10, "postprocess": 5}, 30,
     "c=1: the GPUs were busy 30% of the time while requests waited 30.0 ms for a worker, and a batch spent 25.0 "
     "ms in preprocess and postprocess against 10.0 ms in forward: the GPUs waited on that CPU work. A higher "
     "ProcessPerGPU gives each GPU more workers to take batches from, PreprocessThreads spreads a batch's "
     "preprocess over cores, and Pipeline (on by default on a GPU) prepares the next batch during forward"),
    (0.2, 0.9, {"preprocess": 20, "forward": 10, "postprocess": 5}, 30, None),  # the GPU kept busy: not waiting
    (0.2, 0.3, {"preprocess": 2, "forward": 10, "postprocess": 1}, 30, None),  # idle, not for the CPU's stages
    # idle, and the CPU's stages the longer, but no request waited for a worker: the load was light (one at a
    # time, a low rate), and the GPU waited on the clients, which no setting changes
    (0.2, 0.3, {"preprocess": 20, "forward": 10, "postprocess": 5}, 0.1, None),
])
def test_a_level_says_what_limited_it_where_the_servers_numbers_show_it(loop_cores, gpu_busy, stages_ms, queue_ms,
                                                                        said):
    """An ML engineer sizing a fleet reads the table for what limits a setting: the server's one event loop
    at a whole core, or GPUs idle while each batch spends longer in preprocess than in forward."""
    server = _Raw(reset=False, stats=_stats_reads(*_stats_of_a_level(loop_cores, gpu_busy, stages_ms, queue_ms)))
    try:
        report = bench(server.url, concurrency=1, duration=0.6, warmup=0, progress=False)
    finally:
        server.close()
    [run] = report.runs
    assert run.server_cores == loop_cores and run.gpu_percent == pytest.approx(100 * gpu_busy)
    limits = [note for note in report.notes if "event loop" in note or "GPUs were busy" in note]
    assert limits == ([said] if said else []), report.notes


def _wait_for(condition, what: str, seconds: float = 60) -> None:
    import time

    deadline = time.monotonic() + seconds  # only so that a broken run fails rather than hangs
    while not condition():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.05)


def _struck_in_the_second_level(tmp_path: Path, strike: Callable[[int], None]) -> tuple[subprocess.Popen, str, str]:
    """`easyserve bench -c 1,2 -n 10` of a server that answers the first level's 10 requests, then none,
    ``strike`` called with its pid during the second level; the command, its stdout and stderr."""
    server = _Raw(reset=False, answers=10)
    try:
        command = subprocess.Popen(
            ["easyserve", "bench", server.url, "-c", "1,2", "-n", "10", "--warmup", "0", "--no-progress",
             "--json", str(tmp_path / "b.json"), "--csv", str(tmp_path / "b.csv")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True)
        try:
            _wait_for(lambda: server.posts > 10, "the second level's requests")
            strike(command.pid)
            out, err = command.communicate(timeout=60)
        finally:
            if command.poll() is None:
                os.killpg(command.pid, signal.SIGKILL)
                command.wait()
    finally:
        server.close()
    return command, out, err


@pytest.mark.parametrize("sig,to_group,status,said", [
    ("SIGINT", True, 130, "interrupted during c=2"),
    ("SIGTERM", False, 143, "terminated (SIGTERM) during c=2"),
    ("SIGTERM", True, 143, "terminated (SIGTERM) during c=2"),
], ids=["ctrl-c", "sigterm to the process", "sigterm to its group, as timeout sends it"])
def test_ctrl_c_or_sigterm_keeps_the_levels_measured_before(tmp_path, sig, to_group, status, said):
    """SIGINT to the whole group (as Ctrl-C sends it) during the second level: the first level's table
    and files were thrown away ("interrupted", exit 2). SIGTERM (timeout, a cancelled CI job) ended the
    command at once: no table, no --json."""
    import signal

    command, out, err = _struck_in_the_second_level(
        tmp_path, lambda pid: (os.killpg if to_group else os.kill)(pid, getattr(signal, sig)))
    assert command.returncode == status, err
    assert "Traceback" not in err and said in err
    assert "req/s" in out and "interrupted during c=2" in out.replace("\n", " ")  # the table, and the note
    saved = json.loads((tmp_path / "b.json").read_text())
    assert [(run["concurrency"], run["statuses"]) for run in saved["runs"]] == [(1, {"200": 10})]
    assert any("interrupted during c=2" in note for note in saved["notes"])
    assert [row["concurrency"] for row in read_csv(tmp_path / "b.csv")] == ["1"]
    _wait_for(lambda: not _loadgens(group=command.pid), "the client processes to end")


def test_a_client_process_killed_keeps_the_levels_measured_before(tmp_path):
    """A client process killed during the second level (the out-of-memory killer's choice): a traceback,
    and the first level's table and files were lost."""
    command, out, err = _struck_in_the_second_level(
        tmp_path, lambda pid: os.kill(_loadgens(parent=pid)[0], signal.SIGKILL))
    assert command.returncode == 1, err
    assert "Traceback" not in err and "the load generator failed during c=2: a client process exited (code -9)" in err
    assert "req/s" in out and "c=2 was not measured: a client process exited (code -9)" in " ".join(out.split())
    saved = json.loads((tmp_path / "b.json").read_text())
    assert [(run["concurrency"], run["statuses"]) for run in saved["runs"]] == [(1, {"200": 10})]
    _wait_for(lambda: not _loadgens(group=command.pid), "the other client processes to end")


def test_a_client_process_killed_between_its_warm_up_and_its_measurement_is_said_so(tmp_path):
    """Killed as the bench read /stats between the two, its next command went to a closed pipe: a
    BrokenPipeError traceback, where a death during either is said."""
    bench_pid: list[int] = []

    def stats() -> bytes:  # the read before measuring (the warm-up's requests came first): the client dies
        if bench_pid and _loadgens(parent=bench_pid[0]):
            for pid in _loadgens(parent=bench_pid[0]):
                os.kill(pid, signal.SIGKILL)
            _wait_for(lambda: not _loadgens(parent=bench_pid[0]), "the client process to die")
        return b"{}"

    server = _Raw(reset=False, stats=lambda: stats() if server.posts else b"{}")
    try:
        command = subprocess.Popen(["easyserve", "bench", server.url, "-c", "1", "-n", "10", "--warmup", "0.2",
                                    "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=_env())
        bench_pid.append(command.pid)
        out, err = command.communicate(timeout=60)
    finally:
        server.close()
    assert command.returncode == 1, err
    assert "Traceback" not in err and "the load generator failed during c=1: a client process exited (code -9)" in err


def test_sigterm_to_a_sweep_keeps_the_settings_measured_and_leaves_no_server_behind(tmp_path):
    """SIGTERM to the group during a sweep's second setting: the first setting's runs are written, and the
    second's server (its workers, in sessions of their own) and the client processes end with the command."""
    config = tmp_path / "recorder.yaml"
    config.write_text('GPUs: cpu\nHandle: "handles_for_tests:Recorder"\n')
    command = subprocess.Popen(
        ["easyserve", "bench", str(config), "--sweep", "--process-per-gpu", "1", "--max-batch-size", "1,2", "-c", "2",
         "--duration", "3", "--warmup", "0", "--no-progress", "--json", str(tmp_path / "s.json")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True)
    workers: set[int] = set()
    try:
        def second_server() -> bool:
            workers.update(worker_children(command.pid))
            return len(workers) > 1 or command.poll() is not None

        _wait_for(second_server, "the second setting's server")
        os.killpg(command.pid, signal.SIGTERM)
        out, err = command.communicate(timeout=60)
    finally:
        if command.poll() is None:
            os.killpg(command.pid, signal.SIGKILL)
            command.wait()
    assert command.returncode == 143, err
    assert "Traceback" not in err and "terminated (SIGTERM) during" in err and "req/s" in out
    saved = json.loads((tmp_path / "s.json").read_text())
    assert [run["settings"] for run in saved["runs"]] == [{"ProcessPerGPU": 1, "MaxBatchSize": 1}]
    assert saved["recommended"] is None and not saved["complete"]
    _wait_for(lambda: not [pid for pid in workers if _alive(pid)], "the sweep's workers to end")
    _wait_for(lambda: not _loadgens(group=command.pid), "the client processes to end")


def test_a_server_that_is_down_stops_the_bench_at_once(tmp_path):
    """Its warm-up's connections all refused, bench stops there, rather than measure refusals for the
    whole warm-up and duration of every level."""
    with Server(GPUs="cpu", Port=0) as server:  # a port that surely refuses once its server has stopped
        url = server.url
    with pytest.raises(BENCH.Unreachable, match=f"cannot reach {url}: connection refused; is the server running"):
        bench(url, concurrency=[2, 4], duration=30, warmup=30, progress=False)
    with pytest.raises(ConnectionRefusedError):  # what it is, to code that catches it
        bench(url, rate=5, duration=30, warmup=30, progress=False)
    assert not loadgen_children()
    done = subprocess.run(["easyserve", "bench", url, "-c", "1,8", "--json", str(tmp_path / "b.json")],
                          capture_output=True, text=True, timeout=60, env=_env())
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip() == f"cannot reach {url}: connection refused; is the server running?"
    assert not (tmp_path / "b.json").exists()  # nothing was measured


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGSTOP], ids=["SIGTERM", "SIGKILL", "SIGSTOP"])
def test_a_server_gone_during_the_last_level_is_noted_with_when_and_fails_the_command(tmp_path, sig):
    """`easyserve run` stopped 2 s into a 3 s level: bench gave req/s over the whole level, the time after the
    server was gone included, noted only that /stats could not be read, and exited 0. A server that hangs
    (SIGSTOP) was said to have stopped answering when its first unanswered request timed out: a timeout
    later than it stopped, past the level's end."""
    log = tmp_path / "server.log"
    with log.open("w") as written:
        server = subprocess.Popen(["easyserve", "run", "--handle", "handles_for_tests:Recorder", "--gpus", "cpu",
                                   "--port", str(free_port())], stdout=written, stderr=subprocess.STDOUT, env=_env(),
                                  start_new_session=True)
    workers: list[int] = []
    try:
        _wait_for(lambda: "listening on" in log.read_text() or server.poll() is not None, "the server to listen")
        url = re.search(r"listening on (http://\S+)", log.read_text()).group(1)
        workers = worker_children(server.pid)
        began = time.monotonic()
        command = subprocess.Popen(["easyserve", "bench", url, "-c", "8", "--duration", "4", "--warmup", "0",
                                    "--timeout", "4", "--no-progress", "--json", str(tmp_path / "b.json")],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        try:
            # no warm-up: the level's measurement is what the server has answered
            _wait_for(lambda: request(url + "/stats")[2]["requests"] >= 50, "the measurement's first answers")
            server.send_signal(sig)
            stopped = time.monotonic() - began  # at most this long after the measurement began
            if sig != signal.SIGSTOP:
                server.wait(60)
            out, err = command.communicate(timeout=120)
        finally:
            if command.poll() is None:
                command.kill()
                command.wait()
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()
        for pid in workers:  # a SIGKILLed server's workers end once they find it gone; none is left either way
            with contextlib.suppress(AssertionError):
                _wait_for(lambda: not _alive(pid), "the server's workers to end", seconds=30)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert command.returncode == 1, err
    [run] = json.loads((tmp_path / "b.json").read_text())["runs"]
    # what was measured is kept: the 50 requests the server had counted, less the 8 in flight as it was killed
    assert run["statuses"].get("200", 0) >= 50 - 8 and run["connection_errors"], run
    gone = run["stopped_answering_s"]
    assert gone is not None and 0 < gone < min(run["seconds"], stopped + 0.5), (run, stopped)
    notes = json.loads((tmp_path / "b.json").read_text())["notes"]
    said = f"c=8: the server stopped answering {gone:.2f} s into the measurement: no request sent after that was"
    assert [note for note in notes if note.startswith(said)], notes
    assert f"is over the whole {run['seconds']:.1f} s of the level, the time it was gone included" in " ".join(
        out.split()), out
    assert "Traceback" not in err and (f"the server at {url} stopped answering {gone:.2f} s into concurrency 8, the "
                                       "last level") in " ".join(err.split()), err


@pytest.mark.parametrize("where", ["a host name that does not resolve", "a server that resets every connection"])
def test_a_warm_up_whose_every_request_fails_stops_the_bench_at_once_naming_the_failure(tmp_path, where):
    """Only refused connections stopped it: a host name that did not resolve (a config's path taken for
    one) measured every level for its whole duration, gaierror after gaierror."""
    server = _Raw(reset=True) if "reset" in where else None
    url = server.url if server else "http://no-such-host.invalid:9876"
    failure = "(ConnectionResetError|Disconnected)" if server else "gaierror"
    try:
        with pytest.raises(BENCH.Unreachable, match=f"cannot reach {url}: every warm-up request failed: {failure}: "
                                                    r"\d+ \(.+\)") as stopped:
            bench(url, concurrency=[2, 4], duration=10, warmup=10, progress=False)
        done = subprocess.run(["easyserve", "bench", url, "-c", "1,8", "--json", str(tmp_path / "b.json")],
                              capture_output=True, text=True, timeout=60, env=_env())
    finally:
        if server:
            server.close()
    assert stopped.value.report.runs == [] and set(stopped.value.failures) <= {"ConnectionResetError", "Disconnected",
                                                                               "gaierror"}
    assert not loadgen_children()
    assert done.returncode == 1 and done.stdout == "" and "Traceback" not in done.stderr, done.stderr
    assert f"cannot reach {url}: every warm-up request failed: " in done.stderr.replace("\n", "")
    assert not (tmp_path / "b.json").exists()


@pytest.mark.parametrize("target", ["configs/imagenet_resnet18.yaml", "classifier.onnx", "model.yml", "a file"])
def test_a_config_or_model_file_for_a_url_is_refused_naming_sweep(tmp_path, target):
    """``easyserve bench configs/imagenet_resnet18.yaml`` (no --sweep) sent its requests to the host
    "configs", for every level's whole duration."""
    (tmp_path / "a file").write_text("Port: 9876\n")  # any file that exists, whatever its name
    done = subprocess.run(["easyserve", "bench", target, "--no-progress"], capture_output=True, text=True,
                          timeout=60, env=_env(), cwd=tmp_path)
    said = done.stderr.replace("\n", " ")
    assert done.returncode == 2 and done.stdout == "" and "Traceback" not in said, said
    assert f"{target} is a file, not a server's URL" in said and "or add --sweep to serve that config" in said
    with pytest.raises(ValueError, match="is a file, not a server's URL"):
        bench(str(tmp_path / "a file"), progress=False)


KEY = "b3nch-key-2024"


def test_a_warm_up_answered_only_with_errors_stops_the_bench_with_what_the_server_said(serve, monkeypatch, tmp_path):
    """Every request refused (401 for a key not given, 400 for a payload the handle does not take): bench
    measured the errors for every level's whole duration, then said only "401: 9960"."""
    monkeypatch.delenv("EASYSERVE_API_KEY", raising=False)
    with serve(ApiKey=KEY) as server:
        url = server.url
        with pytest.raises(BENCH.Rejected) as keyless:
            bench(server.url, {"value": 1}, concurrency=[1, 8], duration=10, warmup=10, progress=False)
        with pytest.raises(BENCH.Rejected) as wrong:
            bench(server.url, {"value": 1}, concurrency=[1, 8], duration=10, warmup=10, api_key="not-" + KEY,
                  progress=False)
        done = subprocess.run(["easyserve", "bench", server.url, "-c", "1,8", "--json", str(tmp_path / "b.json")],
                              capture_output=True, text=True, timeout=60, env=_env())
        with pytest.raises(BENCH.NothingMeasured):  # what a sweep stops at, as at a server gone away
            bench(server.url, {"value": 1}, concurrency=2, duration=10, warmup=10, progress=False)
    with serve() as server:
        with pytest.raises(BENCH.Rejected) as refused:
            bench(server.url, {"reject": "no such field"}, concurrency=2, duration=10, warmup=10, progress=False)
    assert not loadgen_children()
    said = str(keyless.value)
    assert said.startswith(f"every warm-up request to {url} was answered with an error, so nothing would be "
                           "measured: 401: ")
    assert "(this server requires an API key: send the header 'Authorization: Bearer <key>')" in said
    assert said.endswith("the server wants an API key: give it in $EASYSERVE_API_KEY (api_key= from Python; "
                         "--api-key KEY is seen by every user of the machine)")
    assert keyless.value.statuses.keys() == {"401"} and keyless.value.report.runs == []
    assert "(wrong API key (expected 'Authorization: Bearer <key>'))" in str(wrong.value)
    assert str(wrong.value).endswith("the API key sent (--api-key, or $EASYSERVE_API_KEY) is not the server's")
    assert done.returncode == 1 and done.stdout == "" and "Traceback" not in done.stderr, done.stderr
    assert "this server requires an API key" in done.stderr and "--api-key KEY" in done.stderr.replace("\n", " ")
    assert not (tmp_path / "b.json").exists()
    assert "400: " in str(refused.value) and "rejected: no such field" in str(refused.value)
    assert "API key" not in str(refused.value)


def test_each_error_status_keeps_what_the_server_said_from_whichever_client_process(serve, tmp_path):
    """Errors were counts alone ("400: 1050"), in the table and in the files: what the server said was lost."""
    bodies = [{"value": 1}, {"reject": "[b]bold[/b] \x1b[31mred"}, {"value": 2}]  # markup, a terminal's escape
    said = "preprocess failed: ValueError: rejected: [b]bold[/b] [31mred"  # on one line, printable
    (tmp_path / "bodies.json").write_text(json.dumps(bodies))
    with serve() as server:
        # three processes, one request each: only the second sends the refused body
        report = bench(server.url, bodies, concurrency=3, requests=3, clients_processes=3, warmup=0, progress=False)
        done = subprocess.run(["easyserve", "bench", server.url, "--payload", str(tmp_path / "bodies.json"), "-c", "3",
                               "-n", "3", "--clients-processes", "3", "--warmup", "0", "--no-progress",
                               "--json", str(tmp_path / "b.json"), "--csv", str(tmp_path / "b.csv")],
                              capture_output=True, text=True, timeout=60, env=_env())
    [run] = report.runs
    assert run.processes == 3 and run.statuses == {"200": 2, "400": 1}
    assert run.error_texts == {"400": said} and run.errors_text(texts=True) == f"400: 1 ({said})"
    assert run.errors_text() == "400: 1"  # as it was, for the notes that name errors
    assert done.returncode == 0, done.stderr
    assert "[b]bold[/b]" in done.stdout and "\x1b" not in done.stdout  # shown as sent, not as markup
    [saved] = json.loads((tmp_path / "b.json").read_text())["runs"]
    assert saved["error_texts"] == {"400": said} and saved["statuses"] == {"200": 2, "400": 1}
    [row] = read_csv(tmp_path / "b.csv")
    assert row["error_text_400"] == said and row["status_400"] == "1"


def test_a_server_behind_an_api_key_is_measured_with_what_it_said_and_why_its_columns_are_empty(serve, monkeypatch):
    """Without a warm-up: every answer a 401 and the server's columns empty (its /stats is behind the
    key too), with no word of the key."""
    monkeypatch.delenv("EASYSERVE_API_KEY", raising=False)
    with serve(ApiKey=KEY) as server:
        report = bench(server.url, {"value": 1}, concurrency=2, requests=20, warmup=0, progress=False)
    [run] = report.runs
    assert run.statuses == {"401": 20} and run.batch_sizes is None
    assert run.error_texts == {"401": "this server requires an API key: send the header 'Authorization: Bearer <key>'"}
    assert ("the server's /stats answered 401 (this server requires an API key: send the header 'Authorization: "
            "Bearer <key>'): the server columns are left empty; give the server's API key in $EASYSERVE_API_KEY "
            "(api_key= from Python, or --api-key KEY)") in report.notes


def test_what_an_error_answer_said_is_read_from_the_bytes_it_began_in():
    """The body of the final answer (interim ones skipped, chunks joined), an ``{"error": ...}``'s
    message, on one printable line of at most 300 characters; what a cut or garbled answer allows."""
    from easyserve.loadgen import answer_text

    head = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    assert answer_text(b"HTTP/1.1 100 Continue\r\n\r\n" + head + b"Content-Length: 22\r\n\r\n"
                       b'{"error": "too\\nbusy"}') == "too busy"
    assert answer_text(b"HTTP/1.1 502 Bad Gateway\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"6\r\n<html>\r\n9\r\n\tbad\x00gate\r\n0\r\n\r\n") == "<html> bad gate"
    long = answer_text(head + b"Content-Length: 1000\r\n\r\n" + b"x" * 1000)
    assert len(long) == 300 and long.endswith("...")
    assert answer_text(head + b"Content-Length: 100\r\n\r\n" + b'{"error": "cut') == '{"error": "cut'
    assert answer_text(b"SSH-2.0-OpenSSH_9.6\r\n") == "" and answer_text(b"") == ""


@pytest.mark.parametrize("flags, message", [
    (["--duration", "inf"], "duration: expected a number of seconds above 0, got inf"),
    (["--duration", "nan"], "duration: expected a number of seconds above 0, got nan"),
    (["--warmup", "inf"], "warmup: expected a number of seconds, 0 or more, got inf"),
    (["--timeout", "inf"], "timeout: expected a number of seconds above 0, got inf"),
    (["--clients-processes", "\u00b2"], "--clients-processes: expected auto or a whole number of at least 1"),
    (["--clients-processes", "\u0663"], "--clients-processes: expected auto or a whole number of at least 1"),
])
def test_values_that_would_run_for_ever_or_are_not_numbers_are_refused(flags, message):
    """``--duration inf`` measured for ever; ``--clients-processes ²`` said "invalid literal for int()"."""
    done = subprocess.run(["easyserve", "bench", "http://127.0.0.1:9", *flags], capture_output=True, text=True,
                          timeout=60, env=_env())
    assert done.returncode == 2 and message in done.stderr.replace("\n", " "), done.stderr
    assert "invalid literal" not in done.stderr


def test_a_sweep_checks_every_setting_before_starting_a_server(monkeypatch, tmp_path):
    """``--max-batch-size 1,5000`` measured the first setting, then failed on 5000 and lost it; a p99
    bound of -5 or nan was taken, and no setting could meet it."""
    started = []
    monkeypatch.setattr(easyserve.server.Server, "start", lambda self, timeout=None: started.append(self))
    with pytest.raises(ConfigError, match="MaxBatchSize: got 5000"):
        sweep("handles_for_tests:Recorder", max_batch_size=[1, 5000], GPUs="cpu", progress=False)
    with pytest.raises(ConfigError, match="ProcessPerGPU: got 500"):
        sweep("handles_for_tests:Recorder", process_per_gpu=[1, 500], GPUs="cpu", progress=False)
    for bound in (-5, 0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="p99_ms: expected a number of milliseconds above 0"):
            sweep("handles_for_tests:Recorder", p99_ms=bound, GPUs="cpu", progress=False)
    # bench's own checks were made once the first server had loaded its model
    for options, message in (({"duration": -1}, "duration: expected a number of seconds above 0"),
                             ({"timeout": 0}, "timeout: expected a number of seconds above 0"),
                             ({"warmup": -1}, "warmup: expected a number of seconds, 0 or more"),
                             ({"requests": 0}, "requests: expected at least 1"),
                             ({"clients_processes": 0}, "clients_processes: expected at least 1")):
        with pytest.raises(ValueError, match=message):
            sweep("handles_for_tests:Recorder", GPUs="cpu", progress=False, **options)
    with pytest.raises(FileNotFoundError):
        sweep("handles_for_tests:Recorder", tmp_path / "not-there.jpg", GPUs="cpu", progress=False)
    assert started == []
    config = tmp_path / "recorder.yaml"
    config.write_text('GPUs: cpu\nHandle: "handles_for_tests:Recorder"\n')
    for flags, message in ((["--p99-ms", "-5"], "p99_ms: expected a number of milliseconds above 0"),
                           (["--p99-ms", "nan"], "got nan"),
                           (["--max-batch-size", "1,5000"], "MaxBatchSize: got 5000")):
        done = subprocess.run(["easyserve", "bench", str(config), "--sweep", "--process-per-gpu", "1", *flags],
                              capture_output=True, text=True, timeout=60, env=_env())
        assert done.returncode == 2 and message in done.stderr and "req/s" not in done.stdout, done.stderr


def test_a_second_ctrl_c_while_a_sweep_stops_its_server_keeps_what_the_first_kept():
    """Ctrl-C during the second setting's second level, then again while its server drains: the second
    KeyboardInterrupt replaced the first's Interrupted, and with it the second setting's first level."""
    import signal
    import threading
    import time

    def second_setting() -> Server | None:
        running = [s for s in Server.running() if s.config.max_batch_size == 2]
        return running[0] if running else None

    def interrupt_twice() -> None:
        deadline = time.monotonic() + 60  # only so that a broken run ends
        while time.monotonic() < deadline:
            server = second_setting()
            # its first level's request and the second's in, the second's running: Ctrl-C
            if server is not None and server.stats()["requests"] >= 2 and server.workers[0]["state"] == "busy":
                break
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)
        while time.monotonic() < deadline and server.state != "stopping":
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)  # it waits for the running request (1 s) as it stops

    thread = threading.Thread(target=interrupt_twice, daemon=True)
    thread.start()
    with pytest.raises(KeyboardInterrupt) as caught:
        sweep("handles_for_tests:Recorder", {"value": 1}, GPUs="cpu", HandleArgs={"delay": 1.0},
              max_batch_size=[1, 2], concurrency=[1, 2], requests=1, warmup=0, progress=False)
    thread.join(10)
    report = caught.value.report
    assert [(run.settings["MaxBatchSize"], run.concurrency) for run in report.runs] == [(1, 1), (1, 2), (2, 1)]
    assert any("interrupted during" in note and "c=2" in note for note in report.notes), report.notes
    # the message says where what was measured is: the notebook cell shows only it
    assert str(caught.value).endswith(": 3 run(s) measured before it are in this exception's .report (in a notebook: "
                                      "sys.last_value.report)"), str(caught.value)
    assert not Server.running() and not worker_children() and not loadgen_children()


def test_a_ctrl_c_during_a_sweeps_second_setting_says_the_first_ones_runs_are_kept():
    """Ctrl-C while the second setting was measured: its bench's Interrupted, message and all, was
    raised again with the sweep's report put in, and said "nothing was measured before it" of a report
    holding the first setting's run."""
    import signal
    import threading
    import time

    def interrupt() -> None:
        deadline = time.monotonic() + 60  # only so that a broken run ends
        while time.monotonic() < deadline:
            running = [s for s in Server.running() if s.config.max_batch_size == 2]
            if running and running[0].workers[0].get("state") == "busy":  # measuring it: Ctrl-C
                break
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=interrupt, daemon=True)
    thread.start()
    with pytest.raises(BENCH.Interrupted) as caught:
        sweep("handles_for_tests:Recorder", {"value": 1}, GPUs="cpu", HandleArgs={"delay": 0.5},
              max_batch_size=[1, 2], concurrency=[1], requests=2, warmup=0, progress=False)
    thread.join(10)
    report = caught.value.report
    assert [(run.settings["MaxBatchSize"], run.concurrency) for run in report.runs] == [(1, 1)]
    assert not report.complete and caught.value.level == "ProcessPerGPU 1, MaxBatchSize 2, c=1"
    assert str(caught.value) == ("interrupted during ProcessPerGPU 1, MaxBatchSize 2, c=1: 1 run(s) measured before "
                                 "it are in this exception's .report (in a notebook: sys.last_value.report)")
    assert not Server.running() and not worker_children() and not loadgen_children()


def test_a_ctrl_c_while_a_sweep_stops_a_measured_settings_server_keeps_its_measurement(monkeypatch):
    """Ctrl-C as the server of a setting just measured stops (a GPU model may take its time): the
    setting was dropped, and the note said it was interrupted during it, as if it had not run."""
    import signal

    stop, pressed = Server.stop, []

    def stop_with_ctrl_c(self, *args, **kwargs):  # the signal comes as the first real stop begins
        if not pressed:
            pressed.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        return stop(self, *args, **kwargs)

    monkeypatch.setattr(Server, "stop", stop_with_ctrl_c)
    with pytest.raises(KeyboardInterrupt) as caught:
        sweep("handles_for_tests:Recorder", {"value": 1}, GPUs="cpu", max_batch_size=[1, 2], concurrency=[1],
              requests=2, warmup=0, progress=False)
    report = caught.value.report
    assert [(run.settings["MaxBatchSize"], run.concurrency) for run in report.runs] == [(1, 1)]
    assert any("once it was measured" in note for note in report.notes), report.notes
    assert not report.complete
    assert not Server.running() and not worker_children() and not loadgen_children()


# -- what a sweep recommends, and how it is read ---------------------------------------------------------------


def _closed(rps: float, p99: float, processes: int = 1, batch: int = 1, errors: int = 0, conc: int = 8) -> Run:
    return Run(conc, 1, 100, 1.0, rps, 1.0, 1.0, p99, 1.0, p99, errors, {"200": 100 - errors, **(
        {"500": errors} if errors else {})}, {}, 0.1, settings={"ProcessPerGPU": processes, "MaxBatchSize": batch})


def test_of_runs_within_a_few_percent_of_the_most_requests_the_lowest_p99_is_recommended_and_a_close_one_named():
    """1000 requests/s at p99 50 ms was recommended over 999.99 at 5 ms: the first in the sweep won a tie."""
    report = SweepReport("h", "p", [_closed(1000, 50, batch=1), _closed(999.99, 5, batch=8)], p99_ms=None)
    assert report.best is report.runs[1]
    assert report.recommendation.endswith("(ProcessPerGPU 1, MaxBatchSize 1 served 1,000.0 requests/s at "
                                          "concurrency 8, within 5%, with a higher p99: 50.00 ms.)")
    apart = SweepReport("h", "p", [_closed(1000, 5, processes=1), _closed(920, 4, processes=2),
                                   _closed(700, 3, processes=4)], p99_ms=None)
    assert apart.best is apart.runs[0]  # 8% fewer requests/s is not a tie...
    assert "ProcessPerGPU 2, MaxBatchSize 1 came close (920.0 requests/s at concurrency 8)" in apart.recommendation
    assert "ProcessPerGPU 4" not in apart.recommendation  # ...but close enough to name; 30% fewer is not
    same = SweepReport("h", "p", [_closed(1000, 5, conc=8), _closed(990, 9, conc=32)], p99_ms=None)
    assert same.best is same.runs[0] and "came close" not in same.recommendation  # one setting, two levels
    # the fastest run the recommended setting's own at another level: another setting close by went unnamed
    both = SweepReport("h", "p", [_closed(970, 5, conc=8), _closed(1000, 50, conc=32),
                                  _closed(935, 4, processes=2, conc=8)], p99_ms=None)
    assert both.best is both.runs[0]
    assert "within 5%, with a higher p99: 50.00 ms.) ProcessPerGPU 2, MaxBatchSize 1 came close (935.0 requests/s" \
           in both.recommendation, both.recommendation


def test_a_faster_run_left_out_for_its_errors_is_named():
    report = SweepReport("h", "p", [_closed(1000, 5), _closed(5000, 5, batch=8, errors=1)], p99_ms=None)
    assert report.best is report.runs[0]
    assert report.recommendation.endswith("Left out for its errors (500: 1): ProcessPerGPU 1, MaxBatchSize 8, "
                                          "concurrency 8, 5,000.0 requests/s.")
    every = SweepReport("h", "p", [_closed(5000, 5, errors=1)], p99_ms=None)
    assert every.recommendation == "No setting qualifies: every run had errors (see the errors column)."


def test_a_sweep_that_did_not_measure_every_setting_recommends_none():
    report = SweepReport("h", "p", [_closed(1000, 5)], p99_ms=None, complete=False)
    assert report.best is None and report.to_dict()["recommended"] is None
    assert report.to_dict()["complete"] is False
    assert report.recommendation == ("No recommendation: the sweep stopped before every setting was measured (the "
                                     "best measured: ProcessPerGPU 1, MaxBatchSize 1, concurrency 8).")


def test_a_setting_whose_server_does_not_start_is_noted_and_the_sweep_goes_on(tmp_path):
    """Out of GPU memory at a larger setting threw away every setting measured before it."""
    counter = tmp_path / "starts"
    report = sweep("handles_for_tests:StartsOnce", {"value": 1}, GPUs="cpu", HandleArgs={"counter": str(counter)},
                   process_per_gpu=[1], max_batch_size=[1, 4, 8], concurrency=2, requests=10, warmup=0,
                   progress=False)
    assert [run.settings for run in report.runs] == [{"ProcessPerGPU": 1, "MaxBatchSize": 1}]
    assert [(f["MaxBatchSize"], "CUDA out of memory (a test's)" in f["error"]) for f in report.failed] == [
        (4, True), (8, True)]
    assert ("ProcessPerGPU 1, MaxBatchSize 4: the server did not start: worker cpu/0 could not start handle "
            "handles_for_tests:StartsOnce: RuntimeError: CUDA out of memory (a test's)") in report.notes
    assert report.best is report.runs[0] and report.to_dict()["failed"] == report.failed
    assert not Server.running() and not worker_children()
    # the CSV and the plot, read alone, say those settings were tried and failed (they had the run alone)
    report.to_csv(tmp_path / "s.csv")
    rows = read_csv(tmp_path / "s.csv")
    assert [(row["MaxBatchSize"], row["setting_error"][:40]) for row in rows] == [
        ("1", ""), ("4", "worker cpu/0 could not start handle hand"), ("8", "worker cpu/0 could not start handle hand")]
    # a setting not measured has no numbers, not counts of 0; the recommended run is marked, as in the table
    assert [(row["status_200"], row["batches_of_1"], row["recommended"]) for row in rows] == [
        ("10", str(report.runs[0].batch_sizes.get("1", 0)), "True"), ("", "", ""), ("", "", "")]
    ticks = [tick.get_text() for tick in report.plot().axes[-1].get_xticklabels()]
    assert ticks == ["1x1", "1x4\nfailed", "1x8\nfailed"]
    counter.write_text("xx")  # the first setting fails too: a handle that cannot start at all
    with pytest.raises(StartupError, match="CUDA out of memory"):
        sweep("handles_for_tests:StartsOnce", {"value": 1}, GPUs="cpu", HandleArgs={"counter": str(counter)},
              process_per_gpu=[1], max_batch_size=[1, 4], concurrency=2, requests=10, warmup=0, progress=False)


def test_a_later_setting_that_starts_but_fails_every_request_is_noted_and_the_sweep_goes_on(tmp_path):
    """Its copies loaded, then every forward ran out of memory: the warm-up's refusal ended the sweep, the
    settings after it never tried, and no recommendation."""
    counter = tmp_path / "starts"
    report = sweep("handles_for_tests:FailsWhenCrowded", {"value": 1}, GPUs="cpu", HandleArgs={"counter": str(counter)},
                   process_per_gpu=[1, 2], max_batch_size=[1, 2], concurrency=2, requests=10, warmup=0.2,
                   progress=False)
    assert [run.settings for run in report.runs] == [{"ProcessPerGPU": 1, "MaxBatchSize": 1}]
    assert [(f["ProcessPerGPU"], f["MaxBatchSize"]) for f in report.failed] == [(1, 2), (2, 1), (2, 2)]
    assert all("500" in f["error"] and "CUDA out of memory (crowded)" in f["error"] for f in report.failed)
    said = "ProcessPerGPU 2, MaxBatchSize 1: every warm-up request failed"
    assert any(note.startswith(said) for note in report.notes), report.notes
    assert report.complete and report.best is report.runs[0]
    assert not Server.running() and not worker_children()
    # a setting measured at a first level that failed every request at a later one: its tick says it, in red, and
    # it is not recommended, however fast at the level it passed (out of memory under more load: so in service)
    partly = SweepReport("h", "p", [_closed(1000, 5), _closed(2000, 5, batch=2)], p99_ms=None,
                         failed=[{"ProcessPerGPU": 1, "MaxBatchSize": 2, "error": "every warm-up request failed"}])
    assert partly.best is partly.runs[0]
    assert partly.recommendation.endswith("Left out for its setting's failing every request at another level: "
                                          "ProcessPerGPU 1, MaxBatchSize 2, concurrency 8, 2,000.0 requests/s.")
    alone = SweepReport("h", "p", [_closed(2000, 5, batch=2)], p99_ms=None, failed=partly.failed)
    assert alone.recommendation == ("No setting qualifies: every run was of a setting that failed every request at "
                                    "another level.")  # none had errors: not said to
    died = SweepReport("h", "p", [dataclasses.replace(_closed(2000, 5), server_restarts=1)], p99_ms=None)
    assert died.recommendation == "No setting qualifies: every run had server processes that died."
    ticks = partly.plot().axes[-1].get_xticklabels()
    assert [(tick.get_text(), tick.get_color()) for tick in ticks] == [("1x1", "black"),
                                                                      ("1x2\npartly failed", "red")]
    counter.unlink()  # the first setting failing every request: the payload's fault, not a setting's
    counter.write_text("xx")
    with pytest.raises(Rejected) as rejected:
        sweep("handles_for_tests:FailsWhenCrowded", {"value": 1}, GPUs="cpu", HandleArgs={"counter": str(counter)},
              process_per_gpu=[1], max_batch_size=[1, 2], concurrency=2, requests=10, warmup=0.2, progress=False)
    # named by its setting: the URL of a server stopped since said nothing
    assert str(rejected.value).startswith("every warm-up request to the server of the smallest setting (ProcessPerGPU "
                                          "1, MaxBatchSize 1), so likely for the payload, not the setting, was "
                                          "answered with an error, so nothing would be measured: 500: "), rejected.value
    assert rejected.value.report.failed == [] and "http://" not in str(rejected.value)


def test_a_run_in_which_a_server_process_died_is_noted_and_never_recommended(serve):
    """A setting whose workers were killed (for their memory) answered every request on fresh ones: no error,
    no note, and it was recommended."""
    with serve("handles_for_tests:Crashing", ProcessPerGPU=2, MaxBatchSize=1) as server:
        body = {"value": 1}

        def kill_once_measuring() -> None:  # no warm-up: /stats is read before the first request is sent
            wait_until(lambda: server.stats()["batches"] >= 3, what="the measurement to begin")
            os.kill(server.workers[0]["pid"], signal.SIGKILL)

        killed = Background(kill_once_measuring)
        report = bench(server.url, body, concurrency=2, duration=1.5, warmup=0, progress=False)
        killed.result()
    [run] = report.runs
    assert run.server_restarts == 1 and run.errors == 0, run
    assert any("1 server process(es) died and were started again during the measurement" in note
               for note in report.notes), report.notes
    assert run.row()["server_restarts"] == 1
    crashed = dataclasses.replace(_closed(5000, 5, batch=8), server_restarts=2)
    swept = SweepReport("h", "p", [_closed(1000, 5), crashed], p99_ms=None)
    assert swept.best is swept.runs[0]
    assert swept.recommendation.endswith("Left out for its 2 server process(es) that died: ProcessPerGPU 1, "
                                         "MaxBatchSize 8, concurrency 8, 5,000.0 requests/s.")


def test_batches_that_fail_whole_and_run_again_in_parts_are_counted_noted_and_never_recommended(serve, tmp_path):
    """A batch of 8 that ran out of memory, then ran in halves, answered every request: the bench read a mean
    batch of 7.97, no error, no note, and a sweep recommended the batch size that fails in service."""
    handle_args = {"most": 2, "delay": 0.01}
    with serve("handles_for_tests:FailsOnLargeBatches", MaxBatchSize=8, HandleArgs=handle_args) as server:
        report = bench(server.url, {"value": 1}, concurrency=8, requests=64, warmup=0, progress=False)
        stats = server.stats()
        with urllib.request.urlopen(server.url + "/metrics", timeout=10) as answer:
            metrics = answer.read().decode()
    [run] = report.runs
    assert run.errors == 0 and run.batches_run_apart > 0 and run.mean_batch > 2, run
    assert stats["batches_run_apart"] >= run.batches_run_apart
    assert f"easyserve_batches_run_apart_total {float(stats['batches_run_apart'])}" in metrics
    said = f"c=8: {run.batches_run_apart:,} of the batches failed whole in forward and ran again in parts"
    assert any(note.startswith(said) for note in report.notes), report.notes
    assert run.row()["batches_run_apart"] == run.batches_run_apart
    # a sweep: the batch size that fails is never recommended, however fast its parts made it
    swept = sweep("handles_for_tests:FailsOnLargeBatches", {"value": 1}, GPUs="cpu", HandleArgs={"most": 2},
                  process_per_gpu=[1], max_batch_size=[1, 8], concurrency=8, requests=48, warmup=0, progress=False)
    [one, eight] = swept.runs
    assert one.batches_run_apart == 0 and eight.batches_run_apart > 0, swept.runs
    assert swept.best is one, swept.recommendation
    if eight.requests_per_s > one.requests_per_s:
        assert f"Left out for its {eight.batches_run_apart:,} batches that failed whole in forward" in \
            swept.recommendation


def test_a_setting_whose_processes_died_or_batches_failed_at_one_level_is_not_recommended_at_another():
    """A worker that crashed on batches of 8 at concurrency 16 answered concurrency 4's batches of 4 fast: that
    setting was recommended at concurrency 4, and crashes in service under more load."""
    calm = dataclasses.replace(_closed(5000, 5, batch=8, conc=4))
    crashed = dataclasses.replace(_closed(300, 500, batch=8, conc=16), server_restarts=10)
    swept = SweepReport("h", "p", [_closed(1000, 5), calm, crashed], p99_ms=None)
    assert swept.best is swept.runs[0]
    assert swept.recommendation.endswith("Left out for its setting's processes dying or batches failing whole at "
                                         "another level: ProcessPerGPU 1, MaxBatchSize 8, concurrency 4, 5,000.0 "
                                         "requests/s.")
    apart = dataclasses.replace(_closed(300, 500, batch=8, conc=16), batches_run_apart=7)
    swept = SweepReport("h", "p", [_closed(1000, 5), calm, apart], p99_ms=None)
    assert swept.best is swept.runs[0]
    alone = SweepReport("h", "p", [calm, apart], p99_ms=None)
    assert alone.best is None
    assert alone.recommendation == ("No setting qualifies: every run had batches that failed whole in forward or was "
                                    "of a setting whose processes died or batches failed whole at another level.")
    # under a bound, a run within it that was left out for another reason is named: "allow a higher p99" was all
    # that was said beside an error-free 20 ms run whose setting's batches failed whole at another level
    slow = _closed(900, 80)
    bounded = SweepReport("h", "p", [slow, calm, apart], p99_ms=50)
    assert bounded.best is None and bounded.recommendation == (
        "No setting qualifies under a p99 of 50 ms: the lowest p99 of a setting that may be recommended was 80.00 ms "
        "(ProcessPerGPU 1, MaxBatchSize 1, concurrency 8). Allow a higher p99, or expect fewer requests at once. "
        "Within the bound, but left out for its setting's processes dying or batches failing whole at another "
        "level: ProcessPerGPU 1, MaxBatchSize 8, concurrency 4, p99 5.00 ms.")


def test_a_sweep_plot_marks_settings_left_out_for_deaths_or_batches_run_apart_and_says_when_none_is_recommended(
        tmp_path):
    """A setting whose worker died, or whose batches failed whole and ran again in parts, was drawn as any other
    point, though the text left it out; and under a bound that no setting held, the plot drew the bound and
    nothing said that no setting was recommended."""
    pytest.importorskip("matplotlib")
    died = sweep("handles_for_tests:Crashing", {"die_once": str(tmp_path / "died")}, GPUs="cpu", process_per_gpu=[1],
                 max_batch_size=[1], concurrency=2, requests=20, warmup=0, progress=False)
    split = sweep("handles_for_tests:FailsOnLargeBatches", {"value": 1}, GPUs="cpu", HandleArgs={"most": 2},
                  process_per_gpu=[1], max_batch_size=[1, 8], concurrency=8, requests=48, warmup=0, p99_ms=0.001,
                  progress=False)
    assert not Server.running() and not worker_children()
    [crashed] = died.runs
    assert crashed.server_restarts and died.best is None, died.runs
    [one, eight] = split.runs
    assert not one.batches_run_apart and eight.batches_run_apart and split.best is None, split.runs

    def marks(figure, label: str) -> list[tuple[list, list]]:
        return [(list(line.get_xdata()), list(line.get_ydata())) for axis in figure.axes for line in axis.get_lines()
                if line.get_label() == label]

    figure = died.plot(tmp_path / "died.png")
    assert marks(figure, "left out: processes died") == [([0], [crashed.requests_per_s]), ([0], [crashed.p99_ms])]
    assert [(tick.get_text(), tick.get_color()) for tick in figure.axes[-1].get_xticklabels()] == [
        ("1x1\nprocesses died", "darkviolet")]
    assert "No setting qualifies: every run had " in " ".join(figure.get_suptitle().split())
    figure = split.plot(tmp_path / "split.png")
    assert (tmp_path / "split.png").read_bytes().startswith(b"\x89PNG")
    assert marks(figure, "left out: batches run apart") == [([1], [eight.requests_per_s]), ([1], [eight.p99_ms])]
    assert not marks(figure, "recommended")
    assert [(tick.get_text(), tick.get_color()) for tick in figure.axes[-1].get_xticklabels()] == [
        ("1x1", "black"), ("1x8\nbatches run apart", "darkorange")]
    title = " ".join(figure.get_suptitle().split())  # wrapped to the figure's width
    assert ("No setting qualifies under a p99 of 0.001 ms: the lowest p99 of a setting that may be recommended was "
            f"{one.p99_ms:,.2f} ms (ProcessPerGPU 1, MaxBatchSize 1, concurrency 8).") in title, title


def test_the_smallest_setting_failing_every_request_at_a_later_level_keeps_the_level_it_passed():
    """The smallest setting, having passed concurrency 2, refused every warm-up request at 4: the sweep raised
    Rejected as if the payload were at fault, and the settings after it were never tried."""
    report = sweep("handles_for_tests:FailsAfter", {"value": 1}, GPUs="cpu", HandleArgs={"most": 4},
                   process_per_gpu=[1], max_batch_size=[1, 2], concurrency=[2, 4], requests=10, warmup=0.2,
                   progress=False)
    assert report.complete and [run.level for run in report.runs][:1] == ["concurrency 2"], report.runs
    assert {(f["ProcessPerGPU"], f["MaxBatchSize"]) for f in report.failed} == {(1, 1), (1, 2)}, report.failed
    assert report.best is None and not Server.running() and not worker_children()


def test_a_larger_setting_listed_first_that_does_not_start_is_noted_and_the_smaller_ones_measured(tmp_path):
    """Listing the largest setting first stopped the sweep at it, the smaller ones, which fit, never tried."""
    lock = tmp_path / "gpu"
    report = sweep("handles_for_tests:OneCopyFits", {"value": 1}, GPUs="cpu", HandleArgs={"lock": str(lock)},
                   process_per_gpu=[2, 1], max_batch_size=[1], concurrency=2, requests=10, warmup=0, progress=False)
    assert [run.settings for run in report.runs] == [{"ProcessPerGPU": 1, "MaxBatchSize": 1}]
    assert [(f["ProcessPerGPU"], "another copy holds the GPU" in f["error"]) for f in report.failed] == [(2, True)]
    assert report.best is report.runs[0] and report.complete
    assert not Server.running() and not worker_children()
    # the smallest setting failing too, with nothing measured: the handle cannot start at all, tried last
    with open(lock, "a") as held:
        import fcntl

        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(StartupError, match="another copy holds the GPU"):
            sweep("handles_for_tests:OneCopyFits", {"value": 1}, GPUs="cpu", HandleArgs={"lock": str(lock)},
                  process_per_gpu=[2, 1], max_batch_size=[4, 1], concurrency=2, requests=10, warmup=0,
                  progress=False)
    assert not Server.running() and not worker_children()


def test_the_json_says_how_and_where_it_was_measured(tmp_path):
    config = tmp_path / "recorder.yaml"
    config.write_text('GPUs: cpu\nHandle: "handles_for_tests:Recorder"\nHandleArgs: {delay: 0.001, hub_token: hf_x}\n')
    report = sweep(str(config), {"value": 1}, process_per_gpu=[1], max_batch_size=[2], concurrency=[2], requests=10,
                   warmup=0.1, progress=False)
    report.to_json(tmp_path / "s.json")
    setup = json.loads((tmp_path / "s.json").read_text())["setup"]
    assert setup["config"]["Handle"] == "handles_for_tests:Recorder" and setup["config"]["HandleArgs"] == {
        "delay": 0.001, "hub_token": "***"}  # a credential stays out of a file that is passed around
    assert (setup["process_per_gpu"], setup["max_batch_size"], setup["concurrency"]) == ([1], [2], [2])
    assert (setup["requests"], setup["duration_s"], setup["warmup_s"], setup["timeout_s"]) == (10, None, 0.1, 60.0)
    assert setup["client"]["cpus"] == cpu_count() and setup["client"]["easyserve"] == easyserve.__version__
    assert report.runs[0].clients_cores > 0  # the load's cost, beside the server's


def test_a_sweep_refuses_an_override_of_a_swept_key_and_records_the_values_its_servers_ran_with(tmp_path):
    """``sweep(config, ProcessPerGPU=2, MaxBatchSize=4)`` measured the swept values all the same, and its JSON's
    config said 2 and 4 (or the file's own values), which no server had run with."""
    config = tmp_path / "recorder.yaml"
    config.write_text('GPUs: cpu\nHandle: "handles_for_tests:Recorder"\nProcessPerGPU: 3\nMaxBatchSize: 16\n')
    for override, message in (({"ProcessPerGPU": 2}, "ProcessPerGPU=2: the sweep sets ProcessPerGPU itself, for "
                                                     "each setting; give process_per_gpu=[2] to measure that value"),
                              ({"MaxBatchSize": 4}, "MaxBatchSize=4: the sweep sets MaxBatchSize itself"),
                              ({"max_batch_size_": 4}, "unknown config key 'max_batch_size_'")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            sweep(str(config), {"value": 1}, process_per_gpu=[1], max_batch_size=[1, 2], progress=False, **override)
    assert not Server.running()
    report = sweep(str(config), {"value": 1}, process_per_gpu=[1], max_batch_size=[1, 2], concurrency=[2],
                   requests=6, warmup=0, progress=False)
    report.to_json(tmp_path / "s.json")
    setup = json.loads((tmp_path / "s.json").read_text())["setup"]
    assert (setup["config"]["ProcessPerGPU"], setup["config"]["MaxBatchSize"]) == ([1], [1, 2])  # not 3 and 16
    assert setup["config"]["Port"] == 0  # each on a free port
    assert [run["settings"] for run in json.loads((tmp_path / "s.json").read_text())["runs"]] == [
        {"ProcessPerGPU": 1, "MaxBatchSize": 1}, {"ProcessPerGPU": 1, "MaxBatchSize": 2}]
    assert not Server.running() and not worker_children() and not loadgen_children()


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a machine with GPUs serves GPU 0 on it")
def test_a_sweep_asked_for_gpus_that_ran_on_cpu_workers_says_so_and_so_does_its_recommendation(tmp_path):
    """``--sweep --gpus 0`` on a machine without GPUs ran CPU workers (the server's log said so), and its report
    and JSON said nothing (notes: []), recommending a setting as if measured on the GPU."""
    report = sweep("handles_for_tests:Recorder", {"value": 1}, GPUs="0", process_per_gpu=[1], max_batch_size=[1, 2],
                   concurrency=[2], requests=6, warmup=0, progress=False)
    said = ("the config asks for GPU 0, but the server ran its workers on CPU (this machine has none it could use; "
            "the server's log says why): every number here was measured on CPU")
    assert len([note for note in report.notes if note.startswith(said)]) == 1, report.notes  # once, not per setting
    assert report.recommendation.startswith("Recommended (measured on CPU workers, not the GPUs the config asks "
                                            "for): ProcessPerGPU 1, MaxBatchSize ")
    report.to_json(tmp_path / "s.json")
    saved = json.loads((tmp_path / "s.json").read_text())
    assert any(note.startswith(said) for note in saved["notes"]) and saved["setup"]["server_devices"] == ["cpu"]
    assert "measured on CPU workers" in saved["recommendation"]
    assert not Server.running() and not worker_children()


def test_the_load_cost_of_clients_that_sent_a_request_or_none_is_over_the_levels_time(serve):
    # each client's CPU over its own time, summed: one given a request or none ran for microseconds, and
    # the note said the clients used 2.75 of this machine's 2 cores
    with serve() as server:
        report = bench(server.url, {"value": 1}, concurrency=8, requests=4, clients_processes=8, warmup=0,
                       progress=False)
    [run] = report.runs
    assert run.processes == 8 and 0 < run.clients_cores <= cpu_count(), run
    assert run.client_cpu <= run.clients_cores
    # a schedule of one request, answered in a few ms: its process "772% busy", a note to add processes,
    # and 258.9 requests/s at a rate of 1/s; n requests of a schedule take n/rate, not n - 1 gaps
    with serve() as server:
        one = bench(server.url, {"value": 1}, rate=1, requests=1, warmup=0, progress=False)
        three = bench(server.url, {"value": 1}, rate=5, requests=3, warmup=0, progress=False)
        # but a duration's requests at random times are what they are: 61 in 1 s at a rate of 50/s is 61/s
        poisson = bench(server.url, {"value": 1}, rate=50, duration=1, arrivals="poisson", seed=3, warmup=0,
                        progress=False)
    [run] = one.runs
    assert run.client_cpu <= 1.0 and run.requests_per_s <= 1.0, run
    assert not [note for note in one.notes if "busy" in note], one.notes
    assert three.runs[0].requests_per_s <= 5.0, three.runs[0]
    [run] = poisson.runs
    assert run.requests > 55 and run.seconds < 1.1 and run.requests_per_s > 55, run


def test_the_cores_a_container_may_use_are_its_quota_not_the_machines(tmp_path):
    """A container given 2 CPUs on a 64-core machine sees 64 cores: its workers' threads split 64, and
    bench's note on the clients' share of the cores could never fire."""
    from easyserve.devices import cgroup_quota

    assert cgroup_quota(tmp_path) is None  # nothing to read: no quota
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota(tmp_path) is None  # cgroup v2, unlimited
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_quota(tmp_path) is None  # cgroup v1, unlimited
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    assert cgroup_quota(tmp_path) == 2.0
    assert 1 <= cpu_count() <= len(os.sched_getaffinity(0))


def test_a_server_on_this_machine_is_told_from_one_elsewhere():
    assert BENCH.on_this_machine("http://127.0.0.1:9") and BENCH.on_this_machine("http://localhost:9")
    assert not BENCH.on_this_machine("http://192.0.2.1:9")  # TEST-NET-1: no machine's address
    assert not BENCH.on_this_machine("http://no-such-host.invalid:9")


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/stats", "http://127.0.0.1:9/v2/models/Demo/infer",
                                 "http://127.0.0.1:9/metrics/", "http://127.0.0.1:9/predict#x",
                                 "http://127.0.0.1:9/api/v2/health/ready", "http://127.0.0.1:9/v2"])
def test_a_url_of_a_route_or_with_a_fragment_is_refused(url):
    """``bench http://host/stats`` sent its requests to /stats/predict for the whole run: 404s."""
    done = subprocess.run(["easyserve", "bench", url], capture_output=True, text=True, timeout=60, env=_env())
    assert done.returncode == 2 and "req/s" not in done.stdout, done.stderr
    assert ("one of the server's routes" in done.stderr or "a fragment (#...) is not sent" in done.stderr)
    for prefix in ("/models/a", "/api/v2", "/v2x"):  # a path prefix a proxy serves it under, however named
        assert BENCH.server_url(f"http://127.0.0.1:9{prefix}/predict?a=1") == (f"http://127.0.0.1:9{prefix}", "a=1")


@pytest.mark.parametrize("flags, message", [
    (["--sweep", "--api-key", "k"], "--api-key does not apply with --sweep"),
    (["--sweep"], "--sweep starts servers of its own: give it a config (.yaml), an .onnx model or a handle"),
    (["--tensor", "float32:4", "--raw"], "--raw only applies to an image file"),
    (["--key", "image"], "--key only applies to an image file"),
    (["--model", "Demo"], "--model names the model of v2 requests: it applies with --form v2"),
    (["--payload", "body.json", "--key", "image"], "--key only applies to an image file"),
    (["--payload", "body.json", "--key", "image", "--raw"], "--raw and --key only apply to an image file"),
    (["--payload", "picture.ppm", "--form", "v2", "--model", "m", "--raw"], "--raw does not apply with --form v2"),
])
def test_options_that_would_be_ignored_are_refused(flags, message):
    done = subprocess.run(["easyserve", "bench", "http://127.0.0.1:9", *flags], capture_output=True, text=True,
                          timeout=60, env=_env())
    assert done.returncode == 2 and message in done.stderr, done.stderr


@pytest.mark.parametrize("flags, message", [
    (["--payload", "{bad}"], "{bad} is not valid JSON: Expecting ',' delimiter"),
    (["--payload", "{missing}"], "no file '{missing}' to send"),
    (["--payload", "{good}", "--tensor", "uint8:3"], "send either a file or random tensors, not both"),
    (["--payload", "{good}", "--form", "v2", "--model", "m"], "v2 sends random tensors (--tensor) or an image file"),
    (["--tensor", "a=uint8:3", "--tensor", "a=float32:2"], "tensor names must differ; got a, a (name them: "),
    (["--tensor", "uint8:224x0"], "tensor 'uint8:224x0': every size in the shape must be at least 1"),
    (["--tensor", "complex64:3"], "tensor 'complex64:3': 'complex64' is not a number type; use one of uint8, "),
], ids=["a JSON file that is not JSON", "no such file", "a file and tensors", "v2 and a JSON file", "a name twice",
        "a size of 0", "a type that is no number"])
def test_a_payload_that_cannot_be_sent_is_refused_saying_why(tmp_path, flags, message):
    files = {"bad": tmp_path / "bad.json", "good": tmp_path / "good.json", "missing": tmp_path / "gone.jpg"}
    files["bad"].write_text('{"a": 1\n')
    files["good"].write_text('{"a": 1}')
    flags = [flag.format(**files) for flag in flags]
    done = subprocess.run(["easyserve", "bench", "http://127.0.0.1:9", *flags], capture_output=True, text=True,
                          timeout=60, env=_env())
    assert done.returncode == 2 and message.format(**files) in done.stderr.replace("\n", " "), done.stderr


@pytest.mark.parametrize("flags, message", [
    (["-c", "1,,8"], "--concurrency: an empty item in '1,,8'; give the values with one comma between each"),
    (["-c", "1,8,"], "--concurrency: an empty item in '1,8,'"),
    (["--rate", "50,,100"], "--rate: an empty item in '50,,100'"),
    (["--tensor", "x=float32:1000000x1000000"], "x=float32:1000000x1000000 (1,000,000,000,000 float32 values, "
                                                 "3,725.3 GiB), 4 different draws sent in turn: 14,901.2 GiB in all"),
    (["--tensor", "a=int16:4", "--tensor", "b=uint8:1000000x2000000"],
     "a=int16:4 (4 int16 values, 8 B), b=uint8:1000000x2000000 (2,000,000,000,000 uint8 values, 1,862.6 GiB)"),
], ids=["an empty item", "a trailing comma", "an empty rate", "a float32 tensor too large", "two tensors"])
def test_a_list_with_an_empty_item_or_a_tensor_too_large_is_refused_saying_what_it_is(flags, message):
    """``-c 1,,8`` measured 1 and 8 as if meant; a float32 tensor too large was said to be "74.5 GiB ... float64",
    the type numpy drew it in, twice its size."""
    done = subprocess.run(["easyserve", "bench", "http://127.0.0.1:9", "-n", "1", *flags], capture_output=True,
                          text=True, timeout=60, env=_env())
    said = " ".join(done.stderr.split())
    assert done.returncode == 2 and message in said and "float64" not in said and "req/s" not in done.stdout, said


def test_a_level_with_no_success_fails_the_command_though_another_had_some(tmp_path):
    """c=1 answered, c=2 all timed out: the command exited 0."""
    server = _Raw(reset=False, answers=10)
    try:
        done = subprocess.run(["easyserve", "bench", server.url, "-c", "1,2", "-n", "10", "--warmup", "0",
                               "--timeout", "0.5", "--no-progress", "--csv", str(tmp_path / "b.csv")],
                              capture_output=True, text=True, timeout=60, env=_env())
    finally:
        server.close()
    assert done.returncode == 1, done.stderr
    said = done.stderr.replace("\n", " ")
    assert "no request was answered with success (2xx) at concurrency 2: nothing was measured there" in said
    rows = read_csv(tmp_path / "b.csv")
    assert [row["status_200"] for row in rows] == ["10", "0"]
    assert rows[0]["backlog_halfway"] == rows[0]["backlog_end"] == ""  # a closed loop has none


def test_a_table_wider_than_the_terminal_is_cut_between_columns_never_inside_a_number():
    """At 80 columns a row read `1,90` over `1.8` for 1,901.8 requests/s."""
    from rich.console import Console

    from easyserve.reports import _stacked, fitting_tables, headers

    runs = [_closed(1901.8, 2.06, processes=p, batch=b) for p in (1, 2) for b in (1, 8)]
    for run in runs:
        run.rate, run.backlog, run.server_queue_ms, run.mean_batch = 4000.0, [3, 12], 12.0234, 2.19
    for width in (60, 80, 130):
        tables = fitting_tables(runs, "a long title " * 4, width)
        console = Console(width=width, record=True)
        shown = set()
        for table in tables:
            assert console.measure(table).maximum <= width
            shown.update(column.header.replace("\n", " ") for column in table.columns)
            console.print(table)
        text = console.export_text()
        assert shown == {_stacked(name).replace("\n", " ") for name in headers(runs)}  # every column, somewhere
        assert "1,901.8" in text and "12.02" in text and "3 → 12" in text and "…" not in text
    assert len(fitting_tables(runs, "t", 400)) == 1 and len(fitting_tables(runs, "t", 80)) > 1


def test_a_warm_up_that_begins_with_a_loads_failures_goes_on_to_measure():
    # A server still loading its model answers 503 (as a busy one 429): the warm-up's first answers were
    # three such failures with no success, which ended it as if every request would fail, and the bench
    # stopped ("every warm-up request was answered with an error") a second before the server was ready.
    import threading

    from conftest import wait_until

    server = Server(handle="handles_robust:Sleeper", HandleArgs={"setup_s": 1.5}, GPUs="cpu", Port=0)
    starting = threading.Thread(target=server.start)
    starting.start()
    try:
        assert wait_until(lambda: server.port is not None, 30)
        report = bench(server.url, {"value": 1}, concurrency=2, duration=1, warmup=4, progress=False)
        run = report.runs[0]
        assert run.requests_per_s > 0 and run.errors == 0, run
    finally:
        starting.join(60)
        server.stop()
