"""HTTP front: body formats, endpoints and every status code, over a real socket."""

from __future__ import annotations

import asyncio
import json
import os

import aiohttp
import pytest
from conftest import http, post_json, post_many, request


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


def test_urlencoded_form_and_curl_style_json(payload_server):
    url = payload_server.url + "/predict"
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    assert http("POST", url, data=b"a=1&b=two", headers=form)[::2] == (200, {"a": "1", "b": "two"})
    # `curl -d '{"x": 1}'` labels JSON as a form
    assert http("POST", url, data=b'{"x": 1}', headers=form)[::2] == (200, {"x": 1})


def test_health_ready_stats(payload_server):
    assert request(payload_server.url + "/health")[::2] == (200, {"status": "ok", "pid": os.getpid()})
    status, _, ready = request(payload_server.url + "/ready")
    assert status == 200 and ready["ready"] is True and ready["workers"][0]["state"] in ("idle", "busy")
    status, _, stats = request(payload_server.url + "/stats")
    assert status == 200 and stats["requests"] >= 0 and "batch_sizes" in stats


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
    assert status == 413 and "MaxBodyMB" in body["error"]


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
    status, _, body = http("GET", payload_server.url + "/predict")
    assert status == 405 and "GET" in body["error"]


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
    ("json", "JSON cannot hold"),
    ("nan", "JSON cannot hold"),
])
def test_handle_errors_are_500_and_the_server_goes_on(misbehaving, fail, expected):
    status, body = post_json(misbehaving.url + "/predict", {"fail": fail})
    assert status == 500 and expected in body["error"]
    assert post_json(misbehaving.url + "/predict", {"n": 1}) == (200, {"ok": True, "echo": {"n": 1}})


def test_forward_error_fails_its_batch_only(misbehaving):
    url = misbehaving.url + "/predict"

    async def run():
        async with aiohttp.ClientSession() as session:
            async def post(body):
                async with session.post(url, json=body) as resp:
                    return resp.status
            blocker = asyncio.ensure_future(post({"sleep": 0.3}))  # holds the worker: the rest queue up
            await asyncio.sleep(0.1)
            bodies = [{"fail": "forward"}] + [{"n": i} for i in range(3)]
            first = [asyncio.ensure_future(post(body)) for body in bodies]
            return await blocker, await asyncio.gather(*first)

    blocker, statuses = asyncio.run(run())
    assert blocker == 200
    assert statuses == [500, 500, 500, 500]  # one batch of four: forward failed for all of it
    assert post_json(url, {"n": 9})[0] == 200


def test_queue_full_is_503_with_retry_after(serve):
    with serve("handles_for_tests:Misbehaving", MaxQueueSize=2, MaxBatchSize=1) as server:
        results = post_many(server.url + "/predict", [{"sleep": 0.3}] * 8, concurrency=8)
        statuses = sorted(s for s, _ in results)
        status, headers, body = http("POST", server.url + "/predict", json={"n": 1})
    assert statuses.count(200) == 3  # one running, two queued
    assert statuses.count(503) == 5
    assert all("MaxQueueSize" in b["error"] for s, b in results if s == 503)
    assert status == 200


def test_retry_after_header_on_503(serve):
    with serve("handles_for_tests:Misbehaving", MaxQueueSize=1, MaxBatchSize=1) as server:
        async def run():
            async with aiohttp.ClientSession() as session:
                running = [asyncio.ensure_future(session.post(server.url + "/predict", json={"sleep": 0.3}))
                           for _ in range(2)]
                await asyncio.sleep(0.1)
                async with session.post(server.url + "/predict", json={"n": 1}) as resp:
                    refused = resp.status, resp.headers.get("Retry-After"), await resp.json()
                for r in await asyncio.gather(*running):
                    r.release()
                return refused

        status, retry_after, body = asyncio.run(run())
    assert status == 503 and retry_after == "1" and "at capacity" in body["error"]


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
    assert http("POST", url, data=png, headers={"Content-Type": "image/png"})[::2] == (200, [5, 4])
    assert http("POST", url, data=form)[::2] == (200, [5, 4])


HANDLE_LEVEL_BAD_INPUTS = [
    ("invalid base64", {"img": "not*base64!"}, "'img' is not valid base64"),
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


MORE_BAD_BODIES = [
    ("deeply nested JSON", b"[" * 20_000 + b"]" * 20_000, "application/json", 400, "nested too deeply"),
    ("trailing garbage after JSON", b'{"a": 1} x', "application/json", 400, "not valid JSON: Extra data"),
    ("text field that is not UTF-8",
     b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\n\xff\xfe\r\n--b--\r\n',
     "multipart/form-data; boundary=b", 400, "form field 'note' is not valid text"),
    ("empty multipart form", b"--b--\r\n", "multipart/form-data; boundary=b", 400, "empty multipart form"),
    ("CSV", b"a,b\n1,2\n", "text/csv", 415, "unsupported Content-Type 'text/csv'"),
]


@pytest.mark.parametrize("name,data,content_type,status,expected", MORE_BAD_BODIES, ids=[b[0] for b in MORE_BAD_BODIES])
def test_more_bad_bodies(payload_server, name, data, content_type, status, expected):
    got, _, body = http("POST", payload_server.url + "/predict", data=data, headers={"Content-Type": content_type})
    assert (got, expected in body["error"]) == (status, True), body
    assert http("POST", payload_server.url + "/predict", json={"still": "serving"})[0] == 200


def test_api_key_guards_predict_and_stats_but_not_health(serve):
    with serve(ApiKey="s3cret-key-123") as server:
        url = server.url
        assert http("POST", url + "/predict", json={"value": 1})[::2] == (401, {
            "error": "this server requires an API key: send the header 'Authorization: Bearer <key>'"})
        status, headers, body = http("POST", url + "/predict", json={"value": 1},
                                     headers={"Authorization": "Bearer wrong-key-456"})
        assert status == 401 and "wrong API key" in body["error"] and headers["WWW-Authenticate"].startswith("Bearer")
        good = {"Authorization": "Bearer s3cret-key-123"}
        assert http("POST", url + "/predict", json={"value": 1}, headers=good)[0] == 200
        assert http("GET", url + "/stats")[0] == 401
        assert http("GET", url + "/stats", headers=good)[0] == 200
        assert http("GET", url + "/health")[0] == 200
        assert http("GET", url + "/ready")[0] == 200
        assert "s3cret" not in repr(server.config) and server.config.to_dict()["ApiKey"] == "***"


def test_api_key_from_the_environment(serve, monkeypatch):
    monkeypatch.setenv("EASYSERVE_API_KEY", "env-key-7890")
    with serve() as server:
        assert http("POST", server.url + "/predict", json={"value": 1})[0] == 401
        assert http("POST", server.url + "/predict", json={"value": 1},
                    headers={"Authorization": "Bearer env-key-7890"})[0] == 200
