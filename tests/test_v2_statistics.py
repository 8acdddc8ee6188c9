"""The Open Inference Protocol's statistics extension (``GET /v2/models[/<m>[/versions/<v>]]/stats``):
Triton's per-request accounting, read by Triton's own client, against real servers and known sleeps."""

from __future__ import annotations

import concurrent.futures
import json
import time

import pytest
import tritonclient.http as triton
from conftest import http, post_json, post_many, wait_until
from test_openinference import infer
from tritonclient.utils import InferenceServerException

MS = 1_000_000  # nanoseconds


def stats_of(server, path: str = "/v2/models/stats", headers: dict | None = None) -> tuple[int, dict]:
    status, _, body = http("GET", server.url + path, headers=headers or {})
    return status, body if isinstance(body, dict) else json.loads(body)


def test_each_request_counts_its_time_its_wait_and_the_phases_of_its_batch(serve, tmp_path):
    # preprocess and postprocess sleep 20 ms a request, forward 50 ms a batch: one request at a time
    args = {"log": str(tmp_path / "timeline"), "preprocess_s": 0.02, "forward_s": 0.05}
    with serve("handles_for_tests:Timeline", HandleArgs=args, ModelName="timeline") as server:
        url = server.url + "/predict"
        for value in range(3):
            assert post_json(url, {"value": value}) == (200, {"value": value})
        assert post_json(url, {"reject": "no"})[0] == 400  # preprocess refused it: a failure, no execution
        began = time.time()
        status, answer = stats_of(server)
        # the same with the model named, and its version; in the server metadata's extensions
        assert stats_of(server, "/v2/models/timeline/stats") == (200, answer)
        assert stats_of(server, "/v2/models/timeline/versions/1/stats") == (200, answer)
        assert "statistics" in http("GET", server.url + "/v2")[2]["extensions"]
    assert status == 200 and len(answer["model_stats"]) == 1
    model = answer["model_stats"][0]
    assert (model["name"], model["version"]) == ("timeline", "1")
    assert (model["inference_count"], model["execution_count"]) == (3, 3)
    # the fields Triton gives a model that answers each request once and reports no memory: empty, not absent
    assert model["response_stats"] == {} and model["memory_usage"] == []
    assert 0 < began * 1000 - model["last_inference"] < 10_000  # milliseconds since the epoch
    stats = model["inference_stats"]
    assert {name: stats[name]["count"] for name in stats} == {
        "success": 3, "fail": 1, "queue": 3, "compute_input": 3, "compute_infer": 3, "compute_output": 3,
        "cache_hit": 0, "cache_miss": 0}
    assert all(isinstance(stats[name]["ns"], int) for name in stats)  # integers, as Triton's readers take them
    assert stats["compute_input"]["ns"] >= 3 * 20 * MS and stats["compute_output"]["ns"] >= 3 * 20 * MS
    assert stats["compute_infer"]["ns"] >= 3 * 50 * MS
    # a request's whole time holds its wait and its batch's phases
    parts = sum(stats[name]["ns"] for name in ("queue", "compute_input", "compute_infer", "compute_output"))
    assert parts <= stats["success"]["ns"]
    assert 0 < stats["fail"]["ns"] < stats["success"]["ns"]  # the refused one's time, to its 400
    [batches] = model["batch_stats"]
    assert batches["batch_size"] == 1
    assert {phase: batches[phase] for phase in ("compute_input", "compute_infer", "compute_output")} == {
        phase: stats[phase] for phase in ("compute_input", "compute_infer", "compute_output")}


def test_every_request_of_a_batch_is_charged_the_batchs_whole_time_as_triton_charges_it(serve, tmp_path):
    gate = tmp_path / "gate"
    args = {"log": str(tmp_path / "timeline"), "gate": str(gate), "forward_s": 0.05}
    with serve("handles_for_tests:Timeline", HandleArgs=args, MaxBatchSize=8, MaxWaitMs=0) as server:
        url = server.url + "/predict"
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            first = pool.submit(post_json, url, {"value": -1})  # waits in forward for the gate
            wait_until(lambda: server.stats()["queue_depth"] == 0 and server.stats()["batches"] == 1,
                       what="the first batch to run")
            rest = [pool.submit(post_json, url, body) for body in ({"value": 1}, {"value": 2}, {"value": 3},
                                                                    {"reject": "no"})]
            wait_until(lambda: server.stats()["queue_depth"] == 4, what="four requests queued behind it")
            gate.touch()
            assert [f.result()[0] for f in (first, *rest)] == [200] * 4 + [400]
        model = stats_of(server)[1]["model_stats"][0]
    # the batch of four ran forward on three (preprocess refused one): an execution of 3, as Triton counts what
    # the model executed; the refused one a failure
    assert (model["inference_count"], model["execution_count"]) == (4, 2)
    assert model["inference_stats"]["fail"]["count"] == 1
    sizes = {batch["batch_size"]: batch for batch in model["batch_stats"]}
    assert sorted(sizes) == [1, 3] and all(sizes[n]["compute_infer"]["count"] == 1 for n in sizes)
    stats = model["inference_stats"]
    for phase in ("compute_input", "compute_infer", "compute_output"):
        # each request of the batch of 3 is charged its whole time: the requests' sum is 1x + 3x the batches'
        charged = sizes[1][phase]["ns"] + 3 * sizes[3][phase]["ns"]
        assert abs(stats[phase]["ns"] - charged) <= 4, (phase, stats[phase], charged)
        assert stats[phase]["count"] == 4
    assert stats["compute_infer"]["ns"] >= 4 * 50 * MS
    assert stats["queue"]["ns"] >= 3 * 50 * MS  # the three waited at least the first batch's forward


@pytest.mark.parametrize("pad", [0, 70_000], ids=["read by the server", "large: read by the worker"])
def test_an_inference_request_holding_a_batch_counts_its_items(serve, pad):
    # a body large enough for the worker alone to read it (the server knew not its items) counted as one
    with serve("handles_v2:Rows", MaxBatchSize=8) as server:
        doc = {"inputs": [{"name": "n", "datatype": "INT64", "shape": [3, 1], "data": [2, 2, 2]}]}
        assert infer(server.url, doc | ({"parameters": {"pad": "x" * pad}} if pad else {}), model="Rows")[0] == 200
        model = stats_of(server, "/v2/models/Rows/stats")[1]["model_stats"][0]
    assert (model["inference_count"], model["execution_count"]) == (3, 1)
    assert model["inference_stats"]["success"]["count"] == 1  # one request
    assert [batch["batch_size"] for batch in model["batch_stats"]] == [3]


@pytest.mark.parametrize("pad", [0, 70_000], ids=["read by the server", "large: read by the worker"])
def test_a_malformed_inference_request_never_reaches_the_model_and_is_not_counted(serve, pad):
    # refused as it was read: a small body by the server, before the queue; a large one by the worker, which
    # counted it as a failure of the model's
    with serve("handles_v2:Rows") as server:
        doc = {"inputs": [{"name": "n", "datatype": "INT64", "shape": [2], "data": [1, 2]}]}  # declared [1]
        assert infer(server.url, doc | ({"parameters": {"pad": "x" * pad}} if pad else {}), model="Rows")[0] == 400
        stats = stats_of(server)[1]["model_stats"][0]["inference_stats"]
    assert (stats["success"]["count"], stats["fail"]["count"]) == (0, 0)


def test_a_prepared_batch_waiting_for_the_one_before_it_waits_in_the_queue_as_triton_counts_it(serve, tmp_path):
    # Pipeline: the worker prepares a batch while the one before it runs forward, then the batch waits for
    # it; that wait was in no phase, and the queue left it out
    args = {"log": str(tmp_path / "timeline"), "preprocess_s": 0.01, "forward_s": 0.15}
    with serve("handles_for_tests:Timeline", HandleArgs=args, Pipeline=True, MaxBatchSize=1,
               PreprocessThreads=1) as server:
        answers = post_many(server.url + "/predict", [{"value": n} for n in range(6)], concurrency=6)
        model = stats_of(server)[1]["model_stats"][0]
    assert [status for status, _ in answers] == [200] * 6
    stats = model["inference_stats"]
    parts = sum(stats[name]["ns"] for name in ("queue", "compute_input", "compute_infer", "compute_output"))
    # every part of a request's time is in one phase or the queue, but the moments between (the socket, the loop)
    assert 0 <= stats["success"]["ns"] - parts < 6 * 20 * MS, (stats["success"]["ns"], parts)


def test_a_timeout_is_a_failure_and_a_client_that_left_is_neither(serve):
    with serve("handles_robust:Sleeper", TimeoutS=1) as server:
        assert post_json(server.url + "/predict", {"sleep": 5})[0] == 504
        wait_until(lambda: server.workers[0]["state"] == "idle", what="the stuck worker's replacement")
        with pytest.raises(Exception):  # the client leaves while its request runs
            http("POST", server.url + "/predict", json={"sleep": 0.6}, timeout=0.2)
        wait_until(lambda: server.stats()["client_gone"] == 1, what="the departure noticed")
        wait_until(lambda: server.stats()["batches"] == 2 and server.workers[0]["state"] == "idle",
                   what="its batch to end")
        model = stats_of(server)[1]["model_stats"][0]
    stats = model["inference_stats"]
    assert (stats["success"]["count"], stats["fail"]["count"]) == (0, 1)
    assert stats["fail"]["ns"] >= 990 * MS  # its time to the 504 at TimeoutS (the loop's clock counts milliseconds)
    assert stats["compute_infer"]["count"] == 0
    # the batch that ran for the client who left answered nobody: no execution (it was one, of a batch of 1)
    assert (model["inference_count"], model["execution_count"], model["batch_stats"]) == (0, 0, [])


def test_tritons_client_reads_the_statistics(serve):
    with serve("handles_v2:Rows", ModelName="rows") as server:
        client = triton.InferenceServerClient(server.url.removeprefix("http://"))
        try:
            assert infer(server.url, {"inputs": [{"name": "n", "datatype": "INT64", "shape": [1],
                                                  "data": [2]}]}, model="rows")[0] == 200
            every = client.get_inference_statistics()
            named = client.get_inference_statistics("rows", "1")
            with pytest.raises(InferenceServerException, match="Request for unknown model: 'resnet' is not found"):
                client.get_inference_statistics("resnet")
            # Triton's quotes around the name whatever it holds (Python's repr chose double quotes for this one)
            status, _, said = http("GET", server.url + "/v2/models/it's/stats")
            assert (status, said["error"]) == (404, "Request for unknown model: 'it's' is not found (this server "
                                                    "serves 'rows')")
            # a path of the protocol's that is none of its routes is told them, the statistics' among them
            status, _, said = http("GET", server.url + "/v2/models/rows/stats/")
            assert status == 404 and "/v2/models/<name>[/versions/<v>][/ready|/config|/stats], /v2/models/stats" \
                in said["error"], said
        finally:
            client.close()
    assert every == named and every["model_stats"][0]["inference_stats"]["success"]["count"] == 1


@pytest.mark.parametrize("fronts", [1, 2], ids=["one front", "two fronts"])
def test_the_statistics_need_the_api_key_and_every_front_gives_them(serve, fronts):
    with serve("handles_v2:Rows", HttpWorkers=fronts, ApiKey="k" * 16) as server:
        key = {"Authorization": "Bearer " + "k" * 16}
        for _ in range(4):
            status, _, _ = http("POST", server.url + "/v2/models/Rows/infer", headers=key,
                                json={"inputs": [{"name": "n", "datatype": "INT64", "shape": [1], "data": [1]}]})
            assert status == 200
        assert stats_of(server)[0] == 401
        # each read may reach either front: every one answers the server's numbers
        reads = [stats_of(server, headers=key) for _ in range(6)]
    assert all(status == 200 and answer == reads[0][1] for status, answer in reads)
    assert reads[0][1]["model_stats"][0]["inference_stats"]["success"]["count"] == 4


def test_a_reload_to_another_model_counts_it_afresh_and_one_back_goes_on(serve):
    # Triton's statistics are a model's: a reload that serves another (its class names it) was handed the
    # first one's counts under its own name
    def successes(server, model):
        status, answer = stats_of(server, f"/v2/models/{model}/stats")
        assert status == 200, answer
        return answer["model_stats"][0]["inference_stats"]["success"]["count"]

    with serve("handles_for_tests:Recorder") as server:
        for value in range(3):
            assert post_json(server.url + "/predict", {"value": value})[0] == 200
        server.reload(handle="handles_for_tests:Args")
        assert stats_of(server, "/v2/models/Recorder/stats")[0] == 404  # the model served is Args
        assert successes(server, "Args") == 0
        assert post_json(server.url + "/predict", {"value": 1})[0] == 200
        assert successes(server, "Args") == 1
        server.reload(handle="handles_for_tests:Recorder")
        assert successes(server, "Recorder") == 3
