"""HTTP front: body formats, endpoints and every status code, over a real socket."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import socket
import time

import aiohttp
import pytest
from conftest import (Background, KeptAlive, caught, http, post_json, post_many, request, send_many, wait_busy,
                      wait_draining, wait_queued, wait_until)


JSON = {"Content-Type": "application/json"}
PNG = {"Content-Type": "image/png"}


@pytest.fixture(scope="module")
def payload_server():
    from easyserve import Server

    with Server(handle="handles_for_tests:Payload", GPUs="cpu", Port=0, MaxBodyMB=0.05) as server:
        yield server


@pytest.fixture(scope="module")
def misbehaving():
    from easyserve import Server

    with Server(handle="handles_for_tests:Misbehaving", GPUs="cpu", Port=0, MaxBatchSize=4) as server:
        yield server


def test_json_object_in_the_original_format(payload_server):
    status, headers, body = http("POST", payload_server.url + "/predict", json={"img": "aGVsbG8=", "k": [1, 2]})
    assert (status, body) == (200, {"img": "aGVsbG8=", "k": [1, 2]})
    assert headers["Content-Type"].startswith("application/json")


@pytest.mark.parametrize("content_type", ["image/jpeg", "image/png", "application/octet-stream"])
def test_raw_bytes_arrive_as_data(payload_server, content_type):
    status, _, body = http("POST", payload_server.url + "/predict", data=b"\xff\xd8\x00" * 10,
                           headers={"Content-Type": content_type})
    assert (status, body) == (200, {"data": "<30 bytes>", "content_type": content_type})


def test_multipart_form_with_a_file_and_text(payload_server):
    form = aiohttp.FormData()
    form.add_field("img", b"\x89PNG" + bytes(100), filename="a.png", content_type="image/png")
    form.add_field("threshold", "0.5")
    status, _, body = http("POST", payload_server.url + "/predict", data=form)
    assert (status, body) == (200, {"img": "<104 bytes>", "threshold": "0.5"})


def test_a_text_field_in_a_charset_it_names_arrives_as_text(payload_server):
    for charset, encoded in (("iso-8859-1", "café".encode("latin-1")), ("US-ASCII", b"cafe"),
                             ("windows-1252", "café €".encode("cp1252")), ("utf-8", "café".encode())):
        body = PART % (f"text/plain; charset={charset}".encode(), encoded)
        status, _, answer = http("POST", payload_server.url + "/predict", data=body,
                                 headers={"Content-Type": "multipart/form-data; boundary=b"})
        expected = {"windows-1252": "café €", "US-ASCII": "cafe"}.get(charset, "café")
        assert (status, answer) == (200, {"t": expected}), charset


def test_urlencoded_form_and_curl_style_json(payload_server):
    url = payload_server.url + "/predict"
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    assert http("POST", url, data=b"a=1&b=two", headers=form)[::2] == (200, {"a": "1", "b": "two"})
    # a ";" is a value's, not a field separator: 300 of them were "too many form fields"
    assert http("POST", url, data=b"css=" + b"a;" * 300, headers=form)[::2] == (200, {"css": "a;" * 300})
    # `curl -d '{"x": 1}'` labels JSON as a form
    assert http("POST", url, data=b'{"x": 1}', headers=form)[::2] == (200, {"x": 1})
    # and an array so: it was "malformed form body: bad query field", and a handle that declares no inputs
    # was told to send {"img": "<base64>"}, whatever it reads
    assert http("POST", url, data=b" [1, 2, 3, 4]", headers=form)[::2] == (400, {
        "error": 'body must be a JSON object such as {"<field the handle reads>": <value>}, not a JSON array'})


def test_health_and_ready(payload_server):
    assert request(payload_server.url + "/health")[::2] == (200, {"status": "ok", "pid": os.getpid()})
    status, _, ready = request(payload_server.url + "/ready")
    assert status == 200 and ready.keys() == {"ready", "workers"} and ready["ready"] is True, ready
    assert [(w["name"], w["state"], w["pid"]) for w in ready["workers"]] == [
        (w["name"], "idle", w["pid"]) for w in payload_server.workers]


def test_stats_count_exactly_the_traffic_sent(serve):
    # Whatever shows these numbers (a dashboard, /metrics) must be able to trust them. A request counts
    # once it is queued: one that a handle's preprocess rejects (400) or that times out (504) counts;
    # a body that cannot be read (400) or one refused by a full queue (429) is never queued and does not.
    with serve("handles_robust:Sleeper", TimeoutS=2, MaxQueueSize=1) as server:
        url = server.url + "/predict"
        fresh = request(server.url + "/stats")[2]
        dropped = fresh.pop("log_records_dropped")  # counted for the whole process, not per server
        unlogged = fresh.pop("worker_lines_not_logged")  # likewise
        assert fresh.pop("cpu_s")["workers"] == 0  # none answered yet (the server's own start counts)
        assert 0 < fresh.pop("uptime_s") < 60
        histograms = fresh.pop("histograms")
        assert {name: (h["count"], h["sum"], set(h["buckets"].values())) for name, h in histograms.items()} == {
            name: (0, 0, {0}) for name in ("latency_s", "queue_wait_s", "run_s")}
        assert fresh == {"requests": 0, "batches": 0, "batches_run_apart": 0, "timeouts": 0, "restarts": 0,
                         "front_restarts": 0, "cut_off": 0,
                         "client_gone": 0, "malformed": 0, "slow_readers_reset": 0, "heads_timed_out": 0,
                         "replacements": {"batches": 0, "memory": 0, "reload": 0, "rollback": 0, "stuck": 0},
                         "queue_depth": 0,
                         "passed_over": 0, "queue_wait_s": 0, "run_s": 0, "batch_sizes": {}, "stages": {},
                         "buffered_bytes": 0, "statuses": {}, "requests_per_s": 0, "latency_p50_ms": None,
                         "latency_p99_ms": None, "gpus": [], "gpu_monitoring": None, "reload_rolled_back": None,
                         "last_reload": None,
                         "workers": server.workers}
        answered = []
        for i in range(3):  # one after another
            answered.append(Background(lambda i=i: post_json(url, {"mark": i})))
            assert answered[-1].result() == (200, {"mark": i})
        rejected = Background(lambda: post_json(url, {"reject": "no"}))
        assert rejected.result() == (400, {"error": "preprocess failed: ValueError: rejected: no"})
        assert http("POST", url, data=b'{"x": ', headers=JSON)[0] == 400  # never queued

        slow = Background(lambda: post_json(url, {"mark": "slow", "sleep": 1}))
        wait_busy(server)
        queued = Background(lambda: post_json(url, {"mark": "queued"}))
        during = wait_queued(server.url, 1)
        seen_queued = time.monotonic()
        status, headers, body = request(url, b'{"mark": "refused"}', JSON)  # the queue (1) is full
        assert (status, headers.get("Retry-After")) == (429, "1"), (status, headers, body)
        assert slow.result()[0] == 200 and queued.result()[0] == 200

        stuck = Background(lambda: post_json(url, {"mark": "stuck", "sleep": 30}))  # 504; its worker is replaced
        assert stuck.result()[0] == 504, stuck.value
        wait_until(lambda: server.workers[0]["restarts"] == 1 and server.workers[0]["state"] == "idle",
                   what="the stuck worker's replacement")
        stats = request(server.url + "/stats")[2]
        workers = server.workers

    assert during["queue_depth"] == 1 and during["requests"] == 6 and during["batches"] == 5, during
    timing = ("queue_wait_s", "run_s", "requests_per_s", "latency_p50_ms", "latency_p99_ms", "histograms", "cpu_s",
              "uptime_s", "stages")
    assert {k: v for k, v in stats.items() if k not in timing} == {
        "requests": 7,  # 3 answered + 1 rejected by preprocess + slow + queued + stuck
        "batches": 7,  # each ran alone: nothing else was waiting when a worker took it
        "batches_run_apart": 0,  # none failed whole: each ran alone
        "timeouts": 1,
        "restarts": 1,
        "front_restarts": 0,
        "cut_off": 0,
        "client_gone": 0,
        "malformed": 0,  # the bad JSON above is the app's 400, not the HTTP parser's
        "slow_readers_reset": 0,
        "heads_timed_out": 0,
        "replacements": {"batches": 0, "memory": 0, "reload": 0, "rollback": 0, "stuck": 0},
        "queue_depth": 0,
        "passed_over": 0,
        "batch_sizes": {"1": 7},
        "statuses": {"200": 5, "400": 2, "429": 1, "504": 1},  # every answer, queued or not
        "buffered_bytes": 0,  # no body held once every request is answered
        "log_records_dropped": dropped,  # none dropped by this traffic
        "worker_lines_not_logged": unlogged,
        "gpus": [], "gpu_monitoring": None,  # CPU workers
        "reload_rolled_back": None,
        "last_reload": None,
        "workers": workers,
    }
    assert [(w["state"], w["restarts"]) for w in stats["workers"]] == [("idle", 1)]
    # each stage, in the batches it ran in: the 6 answered (the stuck one was killed), forward in the 5 that
    # preprocess did not refuse whole
    assert {stage: each["batches"] for stage, each in stats["stages"].items()} == {
        "read": 6, "preprocess": 6, "forward": 5, "postprocess": 5, "encode": 6}
    # queue_wait_s: "queued" waited at least from when the queue was seen holding it until "slow" had
    # slept its second; each wait is at most what its client waited for the answer.
    waited_at_least = slow.started + 1 - seen_queued
    answered_took = sum(t.took for t in (*answered, rejected, slow, queued))
    assert max(0.0, waited_at_least) <= stats["queue_wait_s"] < answered_took + stuck.took, (stats, waited_at_least)
    assert stats["queue_wait_s"] > 0
    # run_s: the handle's time on the batches it answered (the stuck one was killed, not answered):
    # at least the second "slow" slept, at most what those requests' clients waited
    assert 1 <= stats["run_s"] < answered_took, stats
    # the histograms behind those totals: every successful answer (its errors, 429s among them, would
    # take the latency down as the server sheds load), each stay in the queue, each batch answered
    histograms = stats["histograms"]
    assert (histograms["queue_wait_s"]["sum"], histograms["run_s"]["sum"]) == (stats["queue_wait_s"], stats["run_s"])
    assert [h["count"] for h in histograms.values()] == [5, 7, 6], histograms


BAD_BODIES = [
    ("malformed JSON", b'{"img": ', "application/json", "not valid JSON"),
    ("JSON array", b"[1, 2]", "application/json", "not a JSON array"),
    ("JSON string", b'"hello"', "application/json", "not a JSON string"),
    ("JSON number", b"42", "application/json", "not a JSON number"),
    ("JSON null", b"null", "application/json", "not a JSON null"),
    ("empty JSON body", b"", "application/json", "empty body"),
    ("empty raw body", b"", "image/jpeg", "empty body"),
    ("invalid UTF-8", b'{"a": "\xff\xfe"}', "application/json", "not valid UTF-8"),
    ("malformed urlencoded", b"a=1&&=&b", "application/x-www-form-urlencoded", "malformed form body"),
    # curl --data-binary @photo.jpg without a Content-Type: it said only "form body is not valid UTF-8"
    ("a JPEG sent as a form", b"\xff\xd8\xff\xe0\x00\x10JFIF", "application/x-www-form-urlencoded",
     "form body is not valid UTF-8: to send a file's bytes, give its Content-Type (such as image/jpeg"),
    ("multipart without boundary", b"--x\r\n", "multipart/form-data", "malformed multipart"),
    ("truncated multipart", b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\nv",
     "multipart/form-data; boundary=b", "malformed multipart"),
]


@pytest.mark.parametrize("name,data,content_type,expected", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_bodies_get_400_saying_what_is_wrong(payload_server, name, data, content_type, expected):
    status, _, body = http("POST", payload_server.url + "/predict", data=data, headers={"Content-Type": content_type})
    assert status == 400
    assert expected in body["error"]


def test_unsupported_content_type_is_415(payload_server):
    xml = {"Content-Type": "application/xml"}
    status, _, body = http("POST", payload_server.url + "/predict", data=b"<x/>", headers=xml)
    assert status == 415 and "application/xml" in body["error"] and "application/json" in body["error"]


def test_body_over_max_body_mb_is_413(payload_server):
    big = json.dumps({"img": "a" * 60_000}).encode()
    status, _, body = http("POST", payload_server.url + "/predict", data=big, headers=JSON)
    # the limit as it was set, not the 0.0499992 MB its whole bytes make; the body's size not as 0.1 MB
    assert status == 413 and body["error"] == "body too large (0.0572 MB): the limit is 0.05 MB (MaxBodyMB)"
    # a byte over: "(0.05 MB): the limit is 0.05 MB" said nothing
    limit = int(0.05 * 2**20)
    status, _, body = http("POST", payload_server.url + "/predict", data=b"x" * (limit + 1), headers=PNG)
    assert status == 413 and body["error"] == (f"body too large ({limit + 1:,} bytes): the limit is {limit:,} bytes, "
                                               "0.05 MB (MaxBodyMB)")


def test_a_limit_under_a_kilobyte_is_said_as_it_was_set():
    """``MaxBodyMB: 0.001`` is 1,048 whole bytes, which a 413 printed as "0.000999 MB"."""
    from easyserve import Server

    with Server(handle="handles_for_tests:Payload", GPUs="cpu", Port=0, MaxBodyMB=0.001) as server:
        status, _, body = http("POST", server.url + "/predict", data=b"x" * 4000, headers=PNG)
        assert status == 413 and body["error"] == "body too large (0.00381 MB): the limit is 0.001 MB (MaxBodyMB)"
        squeezed = gzip.compress(b"x" * 4000)
        status, _, body = http("POST", server.url + "/predict", data=squeezed,
                               headers={**PNG, "Content-Encoding": "gzip"})
        assert status == 413 and body["error"] == "body too large once inflated: over the limit of 0.001 MB (MaxBodyMB)"


def test_chunked_body_over_the_limit_is_413(payload_server):
    async def chunks():
        for _ in range(20):
            yield b"x" * 4096

    status, _, body = http("POST", payload_server.url + "/predict", data=chunks(), headers=PNG)
    assert status == 413 and "MaxBodyMB" in body["error"]


def test_multipart_over_the_limit_is_413(payload_server):
    form = aiohttp.FormData()
    form.add_field("img", bytes(70_000), filename="big.bin")
    assert http("POST", payload_server.url + "/predict", data=form)[0] == 413


@pytest.mark.parametrize("multipart", [True, False], ids=["multipart", "urlencoded"])
def test_too_many_form_fields_is_400(payload_server, multipart):
    form = aiohttp.FormData()
    for i in range(300):
        form.add_field(f"f{i}", "v")
    if multipart:
        form.add_field("file", b"x", filename="x.bin")
    status, _, body = http("POST", payload_server.url + "/predict", data=form)
    assert status == 400 and "too many form fields" in body["error"]


def test_unknown_route_and_wrong_method_answer_json(payload_server):
    status, _, body = http("GET", payload_server.url + "/nope")
    assert status == 404 and "POST /predict" in body["error"]
    # a client of the protocol (tritonclient asks for /v2/repository/index) is told the protocol's routes
    status, _, body = http("GET", payload_server.url + "/v2/repository/index")
    assert status == 404 and "POST /v2/models/<name>[/versions/<v>]/infer" in body["error"], body
    # a 405 says what is allowed, in its text and in the Allow header (RFC 9110); it had no Allow
    status, headers, body = http("GET", payload_server.url + "/predict")
    assert status == 405 and body["error"] == "GET is not allowed on /predict: use POST", body
    assert headers["Allow"] == "OPTIONS, POST"
    status, headers, body = http("POST", payload_server.url + "/health")
    assert status == 405 and headers["Allow"] == "GET, HEAD, OPTIONS" and body["error"].endswith(": use GET"), body


def test_preprocess_error_fails_that_request_alone(serve):
    with serve(MaxBatchSize=8, HandleArgs={"delay": 0.05}) as server:
        bodies = [{"value": i} if i % 4 else {"reject": f"bad {i}"} for i in range(32)]
        results = post_many(server.url + "/predict", bodies, concurrency=32)
    for i, (status, body) in enumerate(results):
        if i % 4:
            assert (status, body["value"]) == (200, i)
        else:
            assert status == 400 and body["error"] == f"preprocess failed: ValueError: rejected: bad {i}"
    assert max(body.get("batch_size", 0) for _, body in results) > 1  # good and bad shared batches


@pytest.mark.parametrize("fail,expected", [
    ("forward", "forward failed: RuntimeError: model exploded"),
    ("postprocess", "postprocess failed: KeyError: 'no such label'"),
    ("json", "JSON cannot hold: TypeError: object is not JSON serializable; the part it cannot hold: ['value'] = "
             "<object>"),
    # which part of the answer, and what to do: it said only the first sentence
    ("nan", "JSON cannot hold: ValueError: Out of range float values are not JSON compliant; the part it cannot hold: "
            "['value'] = nan (NaN and infinity are no JSON numbers: answer None or a string in their place)"),
    # the whole answer: no part to name, what to do all the same
    ("nan-alone", "JSON cannot hold: ValueError: Out of range float values are not JSON compliant (NaN and infinity "
                  "are no JSON numbers: answer None or a string in their place)"),
    ("inf-in-array", "JSON cannot hold: ValueError: Out of range float values are not JSON compliant; the part it "
                     "cannot hold: ['scores'][1][1] = inf (NaN and infinity"),
    # (the whole answer: no part of it to name)
    ("masked", "JSON cannot hold: TypeError: a masked array is not JSON serializable: answer array.filled(value), "
               "or array.data"),
    # asked for as .npy, which would carry its hidden values as numbers
    ("masked-npy", ".npy cannot hold: a masked array has no .npy form"),
])
def test_handle_errors_are_500_and_the_server_goes_on(misbehaving, fail, expected):
    accept = {"Accept": "application/x-npy"} if fail.endswith("-npy") else {}
    rid = f"misbehaving-{fail}"
    status, _, body = request(misbehaving.url + "/predict", json.dumps({"fail": fail.removesuffix("-npy")}).encode(),
                              {**JSON, **accept, "X-Request-Id": rid})
    assert status == 500 and expected in body["error"], body
    # in the log the 500 points to: an answer that could not be encoded left nothing there, and then a line that
    # did not say which request's it was
    assert body["error"].endswith("in worker cpu/0's log)"), body
    if fail not in ("forward", "postprocess"):
        said = f"request {rid}: postprocess returned a value {expected}"
        assert wait_until(lambda: any(said in line.text for line in misbehaving.logs(tail=None)), 10)
    assert post_json(misbehaving.url + "/predict", {"n": 1}) == (200, {"ok": True, "echo": {"n": 1}})


def test_forward_error_fails_only_the_request_that_fails_alone(misbehaving):
    url = misbehaving.url + "/predict"
    blocker = Background(lambda: post_json(url, {"sleep": 1}))  # holds the worker: the rest queue up
    wait_busy(misbehaving)
    bodies = [{"fail": "forward"}] + [{"n": i} for i in range(3)]
    queued = [Background(lambda body=body: post_json(url, body)) for body in bodies]
    wait_queued(misbehaving.url, 4)
    assert blocker.result()[0] == 200
    # one batch of four: forward failed for all of it, and then for the one request alone
    answers = [q.result() for q in queued]
    assert [status for status, _ in answers] == [500, 200, 200, 200], answers
    assert answers[0][1]["error"].startswith("forward failed: RuntimeError: model exploded"), answers
    assert post_json(url, {"n": 9})[0] == 200


@pytest.mark.parametrize("http_workers", [1, 2])
def test_the_query_string_reaches_the_handle_as_its_parameters_whatever_the_body(serve, http_workers):
    """A request's options where its body has no room for them (an image sent as it is):
    ``/predict?top_k=5`` gives the handle ``task["parameters"] == {"top_k": "5"}``, as the protocol's
    inference requests carry theirs, through one process or several fronts."""
    with serve("handles_for_tests:Parameters", HttpWorkers=http_workers) as server:
        url = server.url + "/predict"
        status, _, body = request(url + "?top_k=5&tag=a&tag=b&verbose&note=two+words%21&empty=",
                                  b'{"img": "aGk="}', JSON)
        assert (status, body) == (200, {"parameters": {"top_k": "5", "tag": ["a", "b"], "verbose": "",
                                                       "note": "two words!", "empty": ""}, "fields": ["img"]})
        status, _, body = request(url + "?top_k=1&lang=%C3%A9", b"\xff\xd8\xff", {"Content-Type": "image/jpeg"})
        assert (status, body) == (200, {"parameters": {"top_k": "1", "lang": "\u00e9"},
                                        "fields": ["content_type", "data"]})
        assert request(url, b'{"img": "aGk="}', JSON)[2] == {"parameters": {}, "fields": ["img"]}
        assert request(url + "?", b'{"img": "aGk="}', JSON)[2] == {"parameters": {}, "fields": ["img"]}
        # a client's mistake in it is the request's 400, saying where; the next request is served
        status, _, body = request(url + "?name=%ff", b'{"img": "aGk="}', JSON)
        assert status == 400 and "query string is not UTF-8" in body["error"], body
        status, _, body = request(url + "?" + "a=1&" * 300, b'{"img": "aGk="}', JSON)
        assert status == 400 and "too many query parameters" in body["error"], body
        assert request(url + "?ok=1", b'{"img": "aGk="}', JSON)[:1] == (200,)
        assert server.stats()["statuses"] == {"200": 5, "400": 2}


@pytest.mark.parametrize("http_workers", [1, 2])
def test_the_headers_pass_headers_names_reach_the_handle_and_no_others(serve, http_workers):
    """A tenant, a trace id: the headers PassHeaders names are the handle's ``task["headers"]``, in
    lower case, through /predict and the protocol, through one process or several fronts. None other
    reaches it (a cookie, the API key)."""
    import socket

    from test_hostile import head, read_response

    key = "Authorization: Bearer s3cret-key"
    with serve("handles_for_tests:Headers", HttpWorkers=http_workers, PassHeaders=["X-Tenant", "traceparent"],
               ApiKey="s3cret-key") as server:
        url, keyed = server.url + "/predict", {**JSON, "Authorization": "Bearer s3cret-key"}
        sent = {**keyed, "X-Tenant": "acme", "Traceparent": "00-4bf9-01", "Cookie": "session=1"}
        assert request(url, b"{}", sent)[::2] == (200, {"headers": {"x-tenant": "acme", "traceparent": "00-4bf9-01"}})
        assert request(url, b"{}", keyed)[::2] == (200, {"headers": {}})
        doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}
        status, _, answer = request(server.url + "/v2/models/Headers/infer", json.dumps(doc).encode(),
                                    {**keyed, "x-tenant": "acme"})
        assert status == 200 and json.loads(answer["outputs"][0]["data"][0]) == {"x-tenant": "acme"}, answer
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            # sent twice: one value, as RFC 9110 combines them
            sock.sendall(head("POST", "/predict", "Content-Type: application/json", "Content-Length: 2", key,
                              "X-Tenant: a", "X-Tenant: b") + b"{}")
            assert json.loads(read_response(sock)[2]) == {"headers": {"x-tenant": "a, b"}}
            # bytes that are not UTF-8: the request's 400, with Expect: 100-continue before Continue
            sock.sendall(head("POST", "/predict", "Content-Type: application/json", "Content-Length: 2", key,
                              "X-Tenant: \xff\xfe", "Expect: 100-continue"))
            status, _, body = read_response(sock)
            assert (status, json.loads(body)) == (400, {"error": "header 'x-tenant' is not UTF-8 text"})
        assert server.stats()["statuses"] == {"200": 4, "400": 1}


def test_credentials_pass_headers_names_reach_the_handle_and_the_log_says_so(serve, caplog):
    # the operator's choice (a handle that checks the key itself), said at the start: a handle that
    # logs its tasks writes each client's credentials out
    import logging

    caplog.set_level(logging.INFO, logger="easyserve")
    with serve("handles_for_tests:Headers", PassHeaders="Authorization, Cookie, X-Tenant") as server:
        sent = {**JSON, "Authorization": "Bearer abc", "Cookie": "s=1", "X-Tenant": "acme"}
        assert request(server.url + "/predict", b"{}", sent)[2] == {
            "headers": {"authorization": "Bearer abc", "cookie": "s=1", "x-tenant": "acme"}}
    assert [r.getMessage() for r in caught(caplog) if "PassHeaders" in r.getMessage()] == [
        "PassHeaders names authorization, cookie: each request's credentials reach the handle, and whatever it logs"]


def test_a_query_string_of_raw_bytes_past_ascii_is_refused_as_its_escapes_are():
    # aiohttp's C parser refuses such bytes in the request line; its Python parser (AIOHTTP_NO_EXTENSIONS)
    # passes them on as surrogates, which a handle echoing them could not answer in JSON (a 500)
    from easyserve.bodies import parse_query
    from easyserve.errors import BadRequest

    assert parse_query("a=%C3%A9&b=%E2%82%AC") == {"a": "\u00e9", "b": "\u20ac"}
    for query in ("a=\udcc3\udca9", "a=%C3"):
        with pytest.raises(BadRequest, match="query string is not UTF-8"):
            parse_query(query)


def test_every_answer_says_its_request_id_which_the_handle_and_the_log_know(serve):
    """An operator given a failed request's X-Request-Id (by its client, or in nginx's log) finds it in
    the worker's log, beside the traceback; a client's own id (nginx's, behind the generated config)
    is kept, and reaches the handle."""
    with serve(MaxBodyMB=0.01) as server:
        url = server.url + "/predict"
        status, headers, body = request(url, b'{"value": 1}', {"Content-Type": "application/json"})
        assert status == 200 and re.fullmatch("[0-9a-f]{32}", headers["X-Request-Id"]), headers
        assert body["request_id"] == headers["X-Request-Id"] and body["task_id"] != body["request_id"]
        mine = {"Content-Type": "application/json", "X-Request-Id": "checkout-7f3a:2"}
        status, headers, body = request(url, b'{"value": 1}', mine)
        assert (status, headers["X-Request-Id"], body["request_id"]) == (200, "checkout-7f3a:2", "checkout-7f3a:2")
        # one a log line could not quote as it is (spaces, a line break's escape, too long) is replaced
        for odd in ("two words", "a\tb", "x" * 201, "é"):
            status, headers, body = request(url, b'{"value": 1}', {**mine, "X-Request-Id": odd})
            assert status == 200 and re.fullmatch("[0-9a-f]{32}", headers["X-Request-Id"]) and \
                body["request_id"] == headers["X-Request-Id"], odd
        # refusals say it too, whether the handle, the body's reading or the size refused
        status, headers, _ = request(url, b'{"reject": "no"}', mine)
        assert (status, headers["X-Request-Id"]) == (400, "checkout-7f3a:2")
        status, headers, _ = request(url, b'{"value": ', mine)
        assert (status, headers["X-Request-Id"]) == (400, "checkout-7f3a:2")
        status, headers, _ = request(url, b'{"value": "' + b"x" * 20_000 + b'"}', mine)
        assert (status, headers["X-Request-Id"]) == (413, "checkout-7f3a:2")
        infer = f"{server.url}/v2/models/Recorder/infer"
        v2 = {"inputs": [{"name": "value", "shape": [1], "datatype": "FP32", "data": [1]}]}
        status, headers, _ = request(infer, json.dumps(v2).encode(), mine)
        assert headers["X-Request-Id"] == "checkout-7f3a:2", (status, headers)
        assert "X-Request-Id" not in request(server.url + "/ready")[1]  # not a request to the model


def test_a_failed_requests_id_is_in_the_workers_log_beside_its_traceback(misbehaving):
    url = misbehaving.url + "/predict"
    blocker = Background(lambda: post_json(url, {"sleep": 1}))  # the rest queue up and share a batch
    wait_busy(misbehaving)
    bodies = [{"fail": "forward"}, {"n": 1}, {"fail": "postprocess"}, {"n": 2}]
    queued = [Background(lambda i=i, body=body: request(url, json.dumps(body).encode(), {"X-Request-Id": f"r-{i}"}))
              for i, body in enumerate(bodies)]
    wait_queued(misbehaving.url, 4)
    assert blocker.result()[0] == 200
    assert [(q.result()[0], q.result()[1]["X-Request-Id"]) for q in queued] == [
        (500, "r-0"), (200, "r-1"), (500, "r-2"), (200, "r-3")]
    # forward's traceback, after the batch it failed on, then whose answer it cost: the one request told apart
    wait_until(lambda: "forward failed for request r-0 of a batch of 4, told apart" in str(misbehaving.logs(tail=None)))
    logs = [line.text for line in misbehaving.logs(tail=None)]
    # (the four reach the queue in whichever order their connections do)
    failed = next(i for i, line in enumerate(logs) if line.startswith("forward failed on a batch of 4 (requests r-"))
    assert sorted(logs[failed].removesuffix("):").split("(requests ")[1].split(", ")) == ["r-0", "r-1", "r-2", "r-3"]
    assert logs[failed + 1].startswith("Traceback") and "RuntimeError: model exploded" in logs[failed + 1:]
    said = logs.index(next(line for line in logs if "postprocess failed for request r-2:" in line))
    assert logs[said + 1].startswith("Traceback") and any("KeyError: 'no such label'" in line for line in logs[said:])


def test_a_bad_request_from_a_handles_own_run_batch_is_its_4xx_in_a_batch_of_one(serve):
    # forward raising BadRequest is the request's 400; a handle with its own run_batch (or a legacy
    # handle, whose calls run inside one) raising it answered 500 and logged a traceback
    with serve("handles_for_tests:RefusesInItsOwnRunBatch", MaxBatchSize=1) as server:
        url = server.url + "/predict"
        assert post_json(url, {"refuse": True}) == (400, {"error": "this model takes no refuse"})
        assert post_json(url, {"n": 1}) == (200, {"n": 1})
        assert "Traceback" not in str(server.logs(tail=None))
    # in a batch of several, which request it meant is not known: the batch's 500
    from easyserve.errors import BadRequest
    from easyserve.worker import _safely

    def refuse():
        raise BadRequest("one of them")

    assert _safely("run_batch", refuse, [{}, {}]) == [(500, "run_batch failed: BadRequest: one of them")] * 2


def test_an_error_naming_a_file_that_is_not_utf8_is_answered_with_its_message(serve, tmp_path, caplog):
    """A message holding a lone surrogate (a file name that is not UTF-8, as Python decodes it) made the
    JSON encoder raise: the handle's 400 or 500 became "internal server error", /ready 500 where it was
    503, /stats 500 for as long as a worker's error held it. And the log of a setup's failure held the
    surrogate itself, which a log written as UTF-8 cannot hold: it is written as the worker's stderr is."""
    marker = tmp_path / "cannot-start"
    with serve("handles_for_tests:NamesABadFile", HandleArgs={"marker": str(marker)}) as server:
        status, _, body = http("POST", server.url + "/predict", json={"bad": True})
        assert (status, body) == (400, {"error": "preprocess failed: ValueError: no such file: /data/caf\udce9.onnx"})
        status, _, body = http("POST", server.url + "/predict", json={"fail": True})
        assert status == 500 and "RuntimeError: cannot open /data/caf\udce9.onnx" in body["error"], body
        marker.touch()
        os.kill(server.workers[0]["pid"], signal.SIGKILL)
        wait_until(lambda: server.workers[0].get("error", "").startswith("RuntimeError: cannot load"), 20)
        status, _, body = http("GET", server.url + "/ready")
        assert status == 503 and body["ready"] is False, body
        assert http("GET", server.url + "/stats")[0] == 200
        marker.unlink()
    logged = "\n".join(record.getMessage() for record in caplog.records if record.name.startswith("easyserve"))
    assert "RuntimeError: cannot load /data/caf\\udce9.onnx" in logged
    logged.encode()  # no lone surrogate left


def test_queue_full_is_429_with_retry_after(serve):
    with serve("handles_for_tests:Misbehaving", MaxQueueSize=2, MaxBatchSize=1) as server:
        url = server.url + "/predict"
        running = Background(lambda: post_json(url, {"sleep": 1}))
        wait_busy(server)
        queued = [Background(lambda i=i: post_json(url, {"n": i})) for i in range(2)]
        wait_queued(server.url, 2)
        refused = send_many(url, [{"n": i} for i in range(2, 7)], concurrency=5)
        answers = [running.result()] + [q.result() for q in queued]
        after = http("POST", url, json={"n": 9})
    assert [status for status, _ in answers] == [200, 200, 200]  # one running, two queued
    for status, headers, body in refused:
        assert (status, headers.get("Retry-After")) == (429, "1"), (status, headers, body)
        assert body == {"error": "server is at capacity: 2 requests are already waiting (MaxQueueSize)"}
    assert after[::2] == (200, {"ok": True, "echo": {"n": 9}}) and "Retry-After" not in after[1]


def test_a_full_queue_is_answered_429_before_the_body_is_sent(serve):
    """The queue was looked at only once the body had been read: a client uploaded a whole image to be
    told 429 at its end, even after asking with Expect: 100-continue (and being told to go on), and
    under overload every refused client's upload was read and thrown away."""
    from test_hostile import head, read_response

    with serve("handles_for_tests:Misbehaving", MaxQueueSize=1, MaxBatchSize=1, BodyTimeoutS=30) as server:
        url = server.url + "/predict"
        running = Background(lambda: post_json(url, {"sleep": 2}))
        wait_busy(server)
        queued = Background(lambda: post_json(url, {"n": 1}))
        wait_queued(server.url, 1)
        for expect in ((), ("Expect: 100-continue",)):  # the head alone sent, its 6 MB body never
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
                sock.sendall(head("POST", "/predict", "Content-Type: application/octet-stream",
                                  "Content-Length: 6000000", *expect))
                status, headers, body = read_response(sock)
            assert (status, headers.get("retry-after")) == (429, "1"), (status, body)
            assert b"MaxQueueSize" in body
        assert running.result()[0] == queued.result()[0] == 200


def test_a_server_shutting_down_answers_503_with_retry_after(serve):
    # Retry-After tells a client (or a proxy) to go elsewhere for now, or come back once restarted
    with serve("handles_for_tests:Misbehaving") as server:
        url = server.url + "/predict"
        running = Background(lambda: post_json(url, {"sleep": 1}))
        wait_busy(server)
        with KeptAlive(server.url) as connection:  # open before the drain: new ones are refused
            stopping = Background(lambda: server.stop(drain_timeout=10))
            wait_draining(server.url)
            status, headers, body = connection.send("POST", "/predict", {"n": 1})
        assert running.result()[0] == 200
        stopping.result()
    assert (status, body) == (503, {"error": "server is shutting down"})
    assert (headers.get("Retry-After"), headers.get("Connection")) == ("1", "close"), headers


def test_timeout_is_504(serve):
    with serve("handles_for_tests:Misbehaving", TimeoutS=0.3) as server:
        status, body = post_json(server.url + "/predict", {"sleep": 1.0})
    assert status == 504 and "TimeoutS=0.3s" in body["error"]


def test_numpy_results_become_json(serve):
    with serve() as server:
        status, body = post_json(server.url + "/predict", {"value": 2.5})
    assert status == 200 and body["value"] == 2.5 and isinstance(body["batch_size"], int)


def png_bytes(width: int = 3, height: int = 2) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (255, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def image_server():
    from easyserve import Server

    with Server(handle="handles_for_tests:ImageInfo", GPUs="cpu", Port=0) as server:
        yield server


def test_an_image_arrives_the_same_in_every_format(image_server):
    import base64

    url = image_server.url + "/predict"
    png = png_bytes(5, 4)
    form = aiohttp.FormData()
    form.add_field("img", png, filename="x.png", content_type="image/png")
    assert http("POST", url, json={"img": base64.b64encode(png).decode()})[::2] == (200, [5, 4])
    data_uri = "data:image/png;base64," + base64.b64encode(png).decode()
    assert http("POST", url, json={"img": data_uri})[::2] == (200, [5, 4])
    # as `base64 file` writes it (lines of 76), and URL-safe with its padding left off
    assert http("POST", url, json={"img": base64.encodebytes(png_bytes(50, 40)).decode()})[::2] == (200, [50, 40])
    urlsafe = base64.urlsafe_b64encode(png_bytes(5, 4)).decode().rstrip("=")
    assert http("POST", url, json={"img": urlsafe})[::2] == (200, [5, 4])
    assert http("POST", url, data=png, headers={"Content-Type": "image/png"})[::2] == (200, [5, 4])
    assert http("POST", url, data=form)[::2] == (200, [5, 4])
    # two files under the one name: "'img' must be a base64 string, got list"
    form = aiohttp.FormData()
    for _ in range(2):
        form.add_field("img", png, filename="x.png", content_type="image/png")
    status, _, answer = http("POST", url, data=form)
    assert (status, answer) == (400, {"error": "preprocess failed: ValueError: 'img' is a list of 2: send one picture, "
                                               "as one base64 string or one form file named 'img'"}), answer


HANDLE_LEVEL_BAD_INPUTS = [
    ("invalid base64", {"img": "not*base64!"}, "'img' is not valid base64: '*' at character 3 is not a base64"),
    ("base64 of something that is not an image", {"img": "aGVsbG8gd29ybGQ="}, "cannot identify image file"),
    ("truncated image", None, "preprocess failed"),
    ("missing field", {"image": "aGVsbG8="}, "missing 'img'"),
    ("field of the wrong type", {"img": 42}, "'img' must be a base64 string, got int"),
]


@pytest.mark.parametrize("name,body,expected", HANDLE_LEVEL_BAD_INPUTS, ids=[b[0] for b in HANDLE_LEVEL_BAD_INPUTS])
def test_inputs_the_handle_rejects_get_400_and_the_server_goes_on(image_server, name, body, expected):
    import base64

    if body is None:
        body = {"img": base64.b64encode(png_bytes(40, 40)[:60]).decode()}
    status, _, answer = http("POST", image_server.url + "/predict", json=body)
    assert status == 400 and expected in answer["error"]
    assert http("POST", image_server.url + "/predict", data=png_bytes(), headers=PNG)[0] == 200


PART = b'--b\r\nContent-Disposition: form-data; name="t"\r\nContent-Type: %s\r\n\r\n%s\r\n--b--\r\n'
MORE_BAD_BODIES = [
    ("deeply nested JSON", b"[" * 20_000 + b"]" * 20_000, "application/json", 400, "nested too deeply"),
    ("trailing garbage after JSON", b'{"a": 1} x', "application/json", 400, "not valid JSON: Extra data"),
    ("text field that is not UTF-8",
     b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\n\xff\xfe\r\n--b--\r\n',
     "multipart/form-data; boundary=b", 400, "form field 'note' is not valid text"),
    ("empty multipart form", b"--b--\r\n", "multipart/form-data; boundary=b", 400, "empty multipart form"),
    ("a multipart part that is itself multipart",
     b'--b\r\nContent-Disposition: form-data; name="x"\r\nContent-Type: multipart/mixed; boundary=c\r\n\r\n'
     b'--c\r\nContent-Disposition: form-data; name="y"\r\n\r\n1\r\n--c--\r\n\r\n--b--\r\n',
     "multipart/form-data; boundary=b", 400, "nested multipart bodies are not supported"),
    # punycode's decoder takes time quadratic in its input: 200 kB of it held the event loop 4 s
    ("a text field in punycode", PART % (b"text/plain; charset=punycode", b"x-" + b"99" * 20_000),
     "multipart/form-data; boundary=b", 415, "form field 't' has charset 'punycode': send text as utf-8 (or one of"),
    # utf-7 made "+ADw-script+AD4-" "<script>", past whatever read the bytes
    ("a text field in utf-7", PART % (b'text/plain; charset="UTF-7"', b"+ADw-script+AD4-"),
     "multipart/form-data; boundary=b", 415, "form field 't' has charset 'UTF-7'"),
    # the handle got the base64 text as the file
    ("a base64 part", PART.replace(b"\r\n\r\n", b"\r\nContent-Transfer-Encoding: base64\r\n\r\n", 1)
     % (b"text/plain", b"aGVsbG8="), "multipart/form-data; boundary=b", 415,
     "form part 't' has Content-Transfer-Encoding 'base64': send form parts as they are (binary)"),
    ("CSV", b"a,b\n1,2\n", "text/csv", 415, "unsupported Content-Type 'text/csv'"),
    # aiohttp reads these as application/octet-stream: the handle got the body as raw bytes
    ("a Content-Type that cannot be read", b'{"x": 1}', "a/b/c", 415,
     "Content-Type 'a/b/c' cannot be read: give one type, such as application/json or image/jpeg"),
    ("two Content-Types", b'{"x": 1}', "application/x-npy, application/json", 415, "cannot be read: give one type"),
    # said why: a text handle's author did not know text/plain was read as JSON
    ("plain text", b"the cat sat", "text/plain", 400,
     'at line 1 column 1 (a text/plain body is read as JSON, as many clients label JSON so: send text '
     'as JSON, such as {"text": "..."})'),
]


@pytest.mark.parametrize("name,data,content_type,status,expected", MORE_BAD_BODIES, ids=[b[0] for b in MORE_BAD_BODIES])
def test_more_bad_bodies(payload_server, name, data, content_type, status, expected):
    got, _, body = http("POST", payload_server.url + "/predict", data=data, headers={"Content-Type": content_type})
    assert (got, expected in body["error"]) == (status, True), body
    assert http("POST", payload_server.url + "/predict", json={"still": "serving"})[0] == 200


API_KEY = "s3cret-key-123"
WITH_KEY = {"Authorization": f"Bearer {API_KEY}"}
# the Open Inference Protocol's routes, for the model these tests serve: Recorder, version 1
V2_MODELS = ["/v2/models/Recorder", "/v2/models/Recorder/versions/1"]
GUARDED_ROUTES = [("POST", "/predict"), ("GET", "/stats"), ("GET", "/metrics"), ("GET", "/v2"), ("GET", "/v2/"),
                  ("GET", "/v2/models/stats")]
GUARDED_ROUTES += [(method, model + path) for model in V2_MODELS for method, path in
                   (("GET", ""), ("GET", "/ready"), ("GET", "/config"), ("GET", "/stats"), ("POST", "/infer"))]
OPEN_ROUTES = [("GET", "/health"), ("GET", "/ready"), ("GET", "/v2/health/live"), ("GET", "/v2/health/ready")]
V2_INFER = {"inputs": [{"name": "value", "datatype": "FP64", "shape": [], "data": [1]}], "outputs": [{"name": "value"}]}
BODIES = {"/predict": {"value": 1}, **{model + "/infer": V2_INFER for model in V2_MODELS}}  # what each POST is sent

NOT_BEARER = "the API key must follow the word Bearer: send 'Authorization: Bearer <key>'"
BAD_AUTHORIZATION = [
    ("missing", None, "this server requires an API key: send the header 'Authorization: Bearer <key>'"),
    ("empty", "", "this server requires an API key: send the header 'Authorization: Bearer <key>'"),
    ("wrong key", "Bearer wrong-key-456", "wrong API key (expected 'Authorization: Bearer <key>')"),
    ("a prefix of the key", f"Bearer {API_KEY[:-1]}", "wrong API key (expected 'Authorization: Bearer <key>')"),
    ("the key and more", f"Bearer {API_KEY}4", "wrong API key (expected 'Authorization: Bearer <key>')"),
    ("the key without a scheme", API_KEY, NOT_BEARER),
    ("the key as Basic", f"Basic {API_KEY}", NOT_BEARER),
    ("the key as Token", f"Token {API_KEY}", NOT_BEARER),
]


@pytest.fixture(scope="module")
def keyed_server():
    from easyserve import Server

    with Server(handle="handles_for_tests:Recorder", GPUs="cpu", Port=0, ApiKey=API_KEY) as server:
        yield server


def test_every_route_is_guarded_or_declared_open(keyed_server):
    # A route added to the app must be put in GUARDED_ROUTES (and so be tried by the tests below) or,
    # on purpose, in OPEN_ROUTES. CORS preflights (OPTIONS) carry no credentials by design.
    served = {(route.method, route.resource.canonical) for route in keyed_server._runner.app.router.routes()
              if route.method not in ("HEAD", "OPTIONS")}
    patterns = {(method, path.replace("/Recorder", "/{name}").replace("/versions/1", "/versions/{version}"))
                for method, path in GUARDED_ROUTES + OPEN_ROUTES}
    assert served == patterns


@pytest.mark.parametrize("method,path", GUARDED_ROUTES, ids=[p for _, p in GUARDED_ROUTES])
@pytest.mark.parametrize("name,authorization,message", BAD_AUTHORIZATION, ids=[b[0] for b in BAD_AUTHORIZATION])
def test_a_guarded_route_refuses_a_missing_or_wrong_key(keyed_server, method, path, name, authorization, message):
    headers = {} if authorization is None else {"Authorization": authorization}
    status, answer_headers, body = http(method, keyed_server.url + path, json=BODIES.get(path), headers=headers)
    assert (status, body) == (401, {"error": message})
    assert answer_headers["WWW-Authenticate"] == 'Bearer realm="easyserve"'


def test_the_right_key_opens_every_guarded_route_and_refused_requests_never_run(serve):
    with serve(ApiKey=API_KEY) as server:
        for method, path in GUARDED_ROUTES:
            for authorization in ("Bearer nope", f"Basic {API_KEY}"):
                assert http(method, server.url + path, json=BODIES.get(path),
                            headers={"Authorization": authorization})[0] == 401, (method, path)
        for method, path in GUARDED_ROUTES:
            assert http(method, server.url + path, json=BODIES.get(path), headers=WITH_KEY)[0] == 200, (method, path)
        for method, path in OPEN_ROUTES:
            assert http(method, server.url + path)[0] == 200, (method, path)
        # /ready, open to balancers, lists the workers (pids, memory, batches run) only with the key
        assert http("GET", server.url + "/ready")[2] == {"ready": True}
        assert http("GET", server.url + "/ready", headers={"Authorization": "Bearer nope"})[2] == {"ready": True}
        listed = http("GET", server.url + "/ready", headers=WITH_KEY)[2]
        assert listed["ready"] is True and [w["pid"] for w in listed["workers"]] == [w["pid"] for w in server.workers]
        stats = http("GET", server.url + "/stats", headers=WITH_KEY)[2]
        assert API_KEY not in repr(server.config) and server.config.to_dict()["ApiKey"] == "***"
    # only the requests that carried the key were queued
    assert stats["requests"] == stats["batches"] == sum(method == "POST" for method, _ in GUARDED_ROUTES)


def test_api_key_from_the_environment(serve, monkeypatch):
    monkeypatch.setenv("EASYSERVE_API_KEY", "env-key-7890")
    with serve() as server:
        assert http("POST", server.url + "/predict", json={"value": 1})[0] == 401
        assert http("POST", server.url + "/predict", json={"value": 1},
                    headers={"Authorization": "Bearer env-key-7890"})[0] == 200
