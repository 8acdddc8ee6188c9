"""easyserve.Client and `easyserve predict` against real servers on free ports."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import email.utils
import http.server
import io
import itertools
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import (Background, free_port, post_json, raw_listener, request, wait_busy, wait_draining,
                      wait_queued, wait_until)
from PIL import Image
from typer.testing import CliRunner

from easyserve import (BadRequest, Client, EasyServeError, HandleError, NoAnswer, NotFound, NotReady, Overloaded,
                       PayloadTooLarge, Server, Timeout, Unauthorized, UnsupportedMediaType, WorkerDied)
from easyserve.errors import Forbidden, RequestTimeout
from easyserve.cli import app
from easyserve.client import encode
from easyserve.predict_cli import pretty_json
from easyserve.standins import write_standin

ROOT = Path(__file__).resolve().parent.parent
RESNET = f"{ROOT}/handles/imagenet_resnet18.py:ImagenetResnet18Handle"


def png(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def picture() -> Image.Image:
    """A smooth colour gradient, 120 wide and 80 high."""
    pixels = np.zeros((80, 120, 3), np.uint8)
    pixels[..., 0] = np.linspace(0, 255, 120, dtype=np.uint8)[None, :]
    pixels[..., 1] = np.linspace(255, 0, 80, dtype=np.uint8)[:, None]
    pixels[..., 2] = 90
    return Image.fromarray(pixels)


# -- what is sent ----------------------------------------------------------------------------------


def test_each_kind_of_input_arrives_as_the_server_expects(serve, tmp_path):
    jpeg = png(picture(), "JPEG")
    (tmp_path / "photo.jpg").write_bytes(jpeg)
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01 not an image")
    (tmp_path / "body.json").write_text('{"value": 3, "name": "from a file"}')
    np.save(tmp_path / "tensor.npy", np.arange(4, dtype=np.int16).reshape(2, 2))
    with serve("handles_for_tests:Payload") as server, Client(server.url) as client:
        # a .npy file goes as the tensor it holds, whatever its name, as does its bytes
        npy = {"data": [[0, 1], [2, 3]], "content_type": "application/x-npy"}
        assert client.predict(tmp_path / "tensor.npy") == npy
        assert client.predict((tmp_path / "tensor.npy").read_bytes()) == npy
        assert client.predict(tmp_path / "photo.jpg") == {"data": f"<{len(jpeg)} bytes>", "content_type": "image/jpeg"}
        assert client.predict(str(tmp_path / "blob.bin"))["content_type"] == "application/octet-stream"
        assert client.predict(png(picture()))["content_type"] == "image/png"
        assert client.predict(np.asarray(picture()))["content_type"] == "image/png"
        assert client.predict(picture())["content_type"] == "image/png"
        assert client.predict({"value": 1, "array": np.arange(3), "scalar": np.float32(0.5)}) == {
            "value": 1, "array": [0, 1, 2], "scalar": 0.5}
        assert client.predict(value=2) == {"value": 2}
        assert client.predict(tmp_path / "body.json") == {"value": 3, "name": "from a file"}
        # a file together with fields: the original JSON format, the file base64-encoded under "img"
        together = client.predict(tmp_path / "photo.jpg", top_k=3)
        assert together.keys() == {"img", "top_k"} and base64.b64decode(together["img"]) == jpeg


def test_a_pil_image_goes_upright_and_in_any_colour_space(serve, tmp_path):
    """Sent as a PNG, a PIL image lost its EXIF orientation: a phone's photo opened with Pillow reached
    the server on its side, where the same file sent by path was turned upright there; and a CMYK image
    (a print shop's JPEG) was a bare OSError from PNG's encoder."""
    from PIL import Image

    photo = Image.new("RGB", (64, 48), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side: shown turned a quarter, 48 x 64
    photo.save(tmp_path / "phone.jpg", exif=exif)
    Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(tmp_path / "print.jpg")
    with serve("handles_for_tests:ImageSize") as server, Client(server.url) as client:
        with Image.open(tmp_path / "phone.jpg") as opened:
            assert client.predict(opened) == {"size": [48, 64]}
            assert opened.size == (64, 48) and opened.getexif()[0x0112] == 6  # the caller's image left as it was
        with Image.open(tmp_path / "print.jpg") as opened:
            assert client.predict(opened) == {"size": [20, 10]}
        with pytest.raises(TypeError, match="floating-point values"):
            client.predict(Image.new("F", (4, 4)))
        # every mode Pillow makes goes in one a PNG holds (32-bit integers as 16 where they fit)
        for mode in ("PA", "La", "RGBa", "I", "I;16L", "RGBX", "HSV", "LAB", "YCbCr", "1", "P"):
            assert client.predict(Image.new(mode, (6, 5))) == {"size": [6, 5]}, mode
        with pytest.raises(TypeError, match=r"32-bit integers from 70000 to 70000 \(mode I\): scale it"):
            client.predict(Image.fromarray(np.full((4, 4), 70_000, np.int32)))


def test_encode_refuses_what_it_cannot_send(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file"):
        encode(str(tmp_path / "missing.jpg"))
    # an array that is not an image goes as .npy; one that numbers cannot hold, nowhere
    assert encode(np.zeros((4, 4, 3), np.float32))[1] == "application/x-npy"
    assert encode(np.zeros((4, 4, 5), np.uint8))[1] == "application/x-npy"
    assert encode(np.zeros((4, 4, 3), np.uint8))[1] == "image/png"
    with pytest.raises(TypeError, match="only numbers and booleans travel as .npy"):
        encode(np.array([{}], dtype=object))
    # hidden values, sent as numbers (as .npy) or pixels (PNG)
    for masked, npy in ((np.ma.masked_array([1.0, 2.0], mask=[False, True]), True),
                        (np.ma.masked_equal(np.zeros((4, 4, 3), np.uint8), 0), False)):
        for data, fields in ((masked, None), ({"x": masked}, None), (None, {"x": masked})):  # in a field, nulls
            with pytest.raises(TypeError, match=r"^cannot send a masked array: send array.filled\(value\), or "
                                                r"array.data$"):
                encode(data, fields, npy=npy)
    assert encode(np.zeros((0, 5), np.uint8))[1] == "application/x-npy"  # no picture: Pillow's own error
    # with fields, an array goes as an image: one that is none was told it was no image of uint8
    with pytest.raises(TypeError, match=r"a float32 array of shape \(4, 4, 3\) cannot go with fields \(threshold\): "
                                        "an array that is not an image travels alone, as .npy"):
        encode(np.zeros((4, 4, 3), np.float32), {"threshold": 0.5})
    # a client's setting given to a call was a field: no timeout, and the API key in the body, to the handle
    client = Client("http://127.0.0.1:9")
    for setting in ("timeout", "api_key", "npy", "max_answer_mb"):
        told = rf"^{setting}= is a setting of the Client \(Client\(url, {setting}=...\)\), not a field of a request"
        with pytest.raises(TypeError, match=told + "; for a field of that name, put it in the dict"):
            client.predict({"n": 1}, **{setting: 5})
        with pytest.raises(TypeError, match=rf"^{setting}= is a setting of the Client"):
            asyncio.run(client.apredict({"n": 1}, **{setting: 5}))
    with pytest.raises(TypeError, match="nothing to send"):
        encode(None)
    with pytest.raises(TypeError, match="cannot send a set"):
        encode({1, 2})
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        encode(tmp_path / "list.json")


def test_text_given_for_a_file_is_no_file_said_in_a_short_message():
    """Text given where a file's name goes (base64, JSON without --data) was tried as one: past 255
    characters, OSError "File name too long" quoting all of it, and `easyserve predict` printed a
    traceback; shorter, "no file" quoted all of it too."""
    server = RawServer(_answers(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"))
    base64_text = "iVBORw0KGgo" * 100  # the start of a PNG, base64-encoded, over and over
    try:
        with Client(server.url) as client:
            for text in (base64_text, "ab/" * 300):
                with pytest.raises(FileNotFoundError) as missing:
                    client.predict(text)
                assert str(missing.value) == f"no file '{text[:100]}...' to send (to send text, put it in a dict)"
        cli = CliRunner().invoke(app, ["predict", server.url, base64_text])
    finally:
        server.close()
    assert server.requests == 0
    assert (cli.exit_code, cli.stderr) == (1, f"no file '{base64_text[:100]}...' to send (to send JSON, give it with "
                                              "--data '{...}'; - reads standard input)\n")


def test_an_image_gives_the_same_answer_however_it_is_sent(serve, tmp_path):
    models = write_standin("resnet18", tmp_path).parent
    image = picture()
    (tmp_path / "picture.png").write_bytes(png(image))
    with serve(RESNET, HandleArgs={"model": str(models / "resnet18-v1-7.onnx")}) as server:
        with Client(server.url) as client:
            answers = [
                client.predict(tmp_path / "picture.png"),
                client.predict(png(image)),
                client.predict(np.asarray(image)),
                client.predict(image),
                client.predict(tmp_path / "picture.png", note="fields go along"),
            ]
    assert all(a == answers[0] for a in answers)
    assert set(answers[0]) == {"class", "label", "score", "top"}


# -- answers and errors --------------------------------------------------------------------------------


def test_refused_requests_raise_the_error_class_of_their_status(serve):
    with serve("handles_for_tests:Recorder") as server, Client(server.url) as client:
        with pytest.raises(BadRequest, match="preprocess failed: ValueError: rejected: no thanks") as refused:
            client.predict(reject="no thanks")
        assert refused.value.status == 400
        assert client.predict(value=5)["value"] == 5  # the connection is still good after an error
    with serve("handles_for_tests:Misbehaving") as server:
        with Client(server.url) as client:
            with pytest.raises(HandleError, match="model exploded") as failed:
                client.predict(fail="forward")
            assert failed.value.status == 500
            # what the server's log calls it, beside the traceback
            named = failed.value.request_id
            assert re.fullmatch("[0-9a-f]{32}", named), named
            wait_until(lambda: f"forward failed for request {named}:" in str(server.logs(tail=None)))
        with Client(server.url, timeout=0.3) as impatient:
            with pytest.raises(Timeout, match="no answer .* within 0.3 s") as late:
                impatient.predict(sleep=1.0)
            assert late.value.status is None  # the client's own timeout: no server answered 504
    # the other 500: a request that ended two workers is WorkerDied (it was HandleError, as the status said)
    with serve("handles_for_tests:Crashing") as server, Client(server.url) as client:
        with pytest.raises(WorkerDied, match="it had already been retried once after its first worker died") as died:
            client.predict(die="exit")
        with pytest.raises(WorkerDied):
            asyncio.run(client.apredict(die="exit"))
    assert died.value.status == 500 and not isinstance(died.value, HandleError)


def test_api_key_is_sent_from_the_argument_or_the_environment(serve, monkeypatch):
    monkeypatch.delenv("EASYSERVE_API_KEY", raising=False)
    with serve("handles_for_tests:Recorder", ApiKey="s3cret-key") as server:
        with Client(server.url, api_key="s3cret-key") as client:
            assert client.predict(value=2)["value"] == 2
            assert asyncio.run(client.apredict(value=3))["value"] == 3
        cli = CliRunner().invoke(app, ["predict", server.url, "-d", '{"value": 4}', "--api-key", "s3cret-key"])
        monkeypatch.setenv("EASYSERVE_API_KEY", "s3cret-key")
        with Client(server.url) as from_environment:
            assert from_environment.predict(value=5)["value"] == 5
    assert cli.exit_code == 0 and json.loads(cli.stdout)["value"] == 4


def test_a_key_no_header_can_carry_is_refused_without_showing_it(serve, monkeypatch):
    """A key read from a file keeps its line break: each call raised Python's ValueError, "Invalid
    header value b'Bearer <the key>\\n'", putting the key in whatever log took the message."""
    monkeypatch.delenv("EASYSERVE_API_KEY", raising=False)
    with serve("handles_for_tests:Recorder", ApiKey="s3cret-key") as server:
        for key in ("s3cret-key\n", "s3cret-key\r\n", "\ts3cret-key", "s3cret-key\x00"):
            with pytest.raises(ValueError) as refused:
                Client(server.url, api_key=key)
            assert str(refused.value) == ("api_key: expected a key without line breaks or control characters "
                                          "(value hidden; one read from a file: strip it)")
        monkeypatch.setenv("EASYSERVE_API_KEY", "s3cret-key\n")
        with pytest.raises(ValueError, match=r"^\$EASYSERVE_API_KEY: expected a key without line breaks"):
            Client(server.url)
        cli = CliRunner().invoke(app, ["predict", server.url, "-d", '{"value": 1}'])
        given = CliRunner().invoke(app, ["predict", server.url, "-d", '{"value": 1}', "--api-key", "s3cret-key\n"])
        monkeypatch.setenv("EASYSERVE_API_KEY", "s3cret-key")
        with Client(server.url) as client:
            assert client.predict(value=2)["value"] == 2
    assert cli.exit_code == 1 and cli.stderr.startswith("$EASYSERVE_API_KEY: expected a key without line breaks")
    assert "s3cret" not in cli.stderr
    assert (given.exit_code, given.stderr) == (2, "--api-key: expected a key without line breaks or control "
                                                   "characters (value hidden)\n")


def test_nan_or_infinity_in_a_json_body_is_refused_before_it_is_sent(serve):
    """JSON has no numbers for them: the Client sent the whole body, and the server answered 400."""
    with serve("handles_for_tests:Recorder") as server, Client(server.url) as client:
        for body in ({"x": [1.0, float("nan")]}, {"x": np.array([np.inf], dtype=np.float32)}):
            with pytest.raises(ValueError) as refused:
                client.predict(body)
            assert str(refused.value) == (
                "cannot send the request as JSON: it holds NaN or infinity, which JSON has no numbers for; send "
                "the array itself as .npy (Client(url, npy=True).predict(array)), which carries them")
        looped: dict = {"value": 1}
        looped["me"] = looped  # was refused as holding NaN or infinity
        with pytest.raises(ValueError, match=r"^cannot send the request as JSON: it holds a dict or list inside it"):
            client.predict(looped)
        assert server.stats()["requests"] == 0
        assert client.predict({"value": 2.5})["value"] == 2.5


@pytest.mark.parametrize("key", ["clé-secrète", "ключ-секрет"])
def test_a_key_beyond_ascii_is_sent_as_the_server_reads_it(serve, key):
    """The server reads the key as UTF-8, as apredict sent it; predict sent Latin-1, a 401 "wrong API
    key" for the first, and a UnicodeEncodeError for the second."""
    with serve("handles_for_tests:Recorder", ApiKey=key) as server, Client(server.url, api_key=key) as client:
        outcomes = _both(client, value=3)
    assert [outcome["value"] for outcome in outcomes] == [3, 3], outcomes


MISSING_KEY = "this server requires an API key: send the header 'Authorization: Bearer <key>'"
WRONG_KEY = "wrong API key (expected 'Authorization: Bearer <key>')"


@pytest.mark.parametrize("api_key,message", [(None, MISSING_KEY), ("wrong-key", WRONG_KEY), ("s3cret", WRONG_KEY),
                                             ("Bearer s3cret-key", WRONG_KEY)],
                         ids=["missing", "wrong", "a prefix", "with the scheme again"])
def test_a_missing_or_wrong_key_raises_unauthorized(serve, monkeypatch, api_key, message):
    monkeypatch.delenv("EASYSERVE_API_KEY", raising=False)
    with serve("handles_for_tests:Recorder", ApiKey="s3cret-key") as server:
        with Client(server.url, api_key=api_key) as client:
            with pytest.raises(Unauthorized) as refused:
                client.predict(value=1)
            with pytest.raises(Unauthorized) as refused_async:
                asyncio.run(client.apredict(value=1))
        cli = CliRunner().invoke(app, ["predict", server.url, "-d", '{"value": 1}',
                                       *(["--api-key", api_key] if api_key else [])])
        stats = request(server.url + "/stats", headers={"Authorization": "Bearer s3cret-key"})[2]
    assert (refused.value.status, str(refused.value)) == (401, message)
    assert (refused_async.value.status, str(refused_async.value)) == (401, message)
    # and the command says how to give it one
    assert cli.exit_code == 1 and cli.stderr == f"401 error: {message} (give it in $EASYSERVE_API_KEY, or with " \
                                                "--api-key KEY, which every user of the machine sees)\n"
    assert stats["requests"] == 0  # nothing was queued


def test_a_full_queue_raises_overloaded_and_a_stopping_server_not_ready_with_retry_after(serve):
    with serve("handles_for_tests:Misbehaving", MaxQueueSize=1, MaxBatchSize=1) as server:
        url = server.url + "/predict"
        running = Background(lambda: post_json(url, {"sleep": 1}))
        wait_busy(server)
        queued = Background(lambda: post_json(url, {"n": 1}))
        wait_queued(server.url, 1)
        with Client(server.url) as client:
            with pytest.raises(Overloaded) as full:
                client.predict(n=2)
            with pytest.raises(Overloaded) as full_async:
                asyncio.run(client.apredict(n=3))
            cli = CliRunner().invoke(app, ["predict", server.url, "-d", '{"n": 4}'])
            assert running.result()[0] == 200 and queued.result()[0] == 200
            # a draining server refuses new connections: the client's kept-alive one reaches it
            assert client.predict(n=5) == {"ok": True, "echo": {"n": 5}}
            running = Background(lambda: post_json(url, {"sleep": 1}))
            wait_busy(server)
            stopping = Background(lambda: server.stop(drain_timeout=10))
            wait_draining(server.url)
            with pytest.raises(NotReady) as stopping_refused:
                client.predict(n=6)
            assert running.result()[0] == 200
            stopping.result()
    message = "server is at capacity: 1 requests are already waiting (MaxQueueSize)"
    for refused in (full.value, full_async.value):
        assert (type(refused), refused.status, refused.retry_after, str(refused)) == (Overloaded, 429, 1.0, message)
    assert cli.exit_code == 1 and cli.stderr == f"429 error: {message}\n"
    # a draining server's 503 carries Retry-After too: the client says when to come back
    refused = stopping_refused.value
    assert (type(refused), refused.status, refused.retry_after, str(refused)) == (
        NotReady, 503, 1.0, "server is shutting down")


class _Busy(http.server.BaseHTTPRequestHandler):
    """Answers every POST 429 (503 on /down/...), with ``Retry-After: <first part of the path>``
    unless that is ``none``."""

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b'{"error": "busy"}'
        self.send_response(503 if self.path.startswith("/down/") else 429)
        self.path = self.path.removeprefix("/down")
        if self.path != "/none/predict":
            self.send_header("Retry-After", self.path.split("/")[1])
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Request-Id", "r-1")  # as easyserve's own answers
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_the_client_takes_retry_after_from_the_header():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Busy)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with Client(f"{base}/7") as client, pytest.raises(Overloaded) as seven:
            client.predict(n=1)
        with Client(f"{base}/0.5") as client, pytest.raises(Overloaded) as half:
            asyncio.run(client.apredict(n=1))
        with Client(f"{base}/none") as client, pytest.raises(Overloaded) as plain:
            client.predict(n=1)
        with Client(f"{base}/down/3") as client, pytest.raises(NotReady) as down:
            client.predict(n=1)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert (seven.value.retry_after, seven.value.status, str(seven.value)) == (7.0, 429, "busy")
    assert half.value.retry_after == 0.5
    assert plain.value.status == 429 and plain.value.retry_after == 1.0  # Overloaded's own default
    assert (down.value.retry_after, down.value.status) == (3.0, 503)


def test_an_unreachable_server_says_so():
    """As NoAnswer: a ConnectionError, as it was, and an EasyServeError, so that a notebook's loop that
    caught EasyServeError was not killed by a server restarting under it."""
    url = f"http://127.0.0.1:{free_port()}"
    for call in (lambda: Client(url).predict(value=1), lambda: asyncio.run(Client(url).apredict(value=1))):
        with pytest.raises(NoAnswer, match="cannot reach .* is the server running") as unreached:
            call()
        # the way to start one from where a notebook's user is, too (a stopped server's Client said the shell's)
        assert str(unreached.value).endswith("(server.start() in Python, easyserve run CONFIG in a shell)?")
        assert isinstance(unreached.value, ConnectionError) and isinstance(unreached.value, EasyServeError)
        assert unreached.value.status is None
    # a password in the URL (sent as Basic auth) is in no message, nor the repr or url, which are logged
    with_password = url.replace("http://", "http://user:s3cret@")
    client = Client(with_password)
    for call in (lambda: client.predict(value=1), lambda: asyncio.run(client.apredict(value=1))):
        with pytest.raises(NoAnswer, match=f"cannot reach {re.escape(url)}: ") as unreached:
            call()
        assert "s3cret" not in str(unreached.value)
    assert repr(client) == f"Client('{url}')" and client.url == f"{url}/predict"
    told = subprocess.run([sys.executable, "-m", "easyserve", "predict", with_password, "-d", "{}"],
                          capture_output=True, text=True, timeout=60)
    assert told.returncode != 0 and "cannot reach" in told.stderr and "s3cret" not in told.stdout + told.stderr


def test_a_connection_this_machine_cannot_make_is_said_to_be_its_own_not_the_servers():
    """Out of file descriptors, the blocking call said the server "closed the connection before the request
    was sent", and the async one asked whether the server was running: neither was the server's doing."""
    code = textwrap.dedent(f"""
        import os, resource
        from easyserve import Client, NoAnswer
        client = Client("http://127.0.0.1:{free_port()}")
        try:
            client.predict(value=1)  # refused: what a call imports is imported, before the limit
        except NoAnswer:
            pass
        used = len(os.listdir("/proc/self/fd")) - 1  # (less the listing's own)
        resource.setrlimit(resource.RLIMIT_NOFILE, (used, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        try:
            client.predict(value=1)
        except NoAnswer as exc:
            print(exc)
    """)
    told = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "cannot connect to http://127.0.0.1:" in told.stdout, (told.stdout, told.stderr)
    assert told.stdout.rstrip().endswith("Too many open files; this process has no file descriptor left (ulimit -n), "
                                         "nor a connection to make"), told.stdout


@pytest.mark.parametrize("status,kind", [(403, Forbidden), (404, NotFound), (408, RequestTimeout),
                                         (415, UnsupportedMediaType), (418, BadRequest), (502, NotReady)])
def test_an_error_status_raises_its_own_class(status, kind):
    """404, 403, 408 and 415 were BadRequest, though easyserve.errors has a class for each. An answer with no
    mark of easyserve's (its Server header, or an X-Request-Id) says so: another service on that port, taken
    for easyserve, was "no model of that name", "the handle failed" or "not ready, retry", and no more."""
    body = b'{"error": "no"}'
    for mark in (b"Server: easyserve/0.1\r\n", b"X-Request-Id: r-1\r\n", b""):
        answer = b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s" % (
            status, mark, len(body), body)
        outcomes, server = _both_against(_answers(answer))
        said = "no" if mark else (f"no (an answer with no mark of easyserve's: is {server.url}/predict an easyserve "
                                  "server, or a proxy before one?)")
        for outcome in outcomes:
            assert (type(outcome), outcome.status, str(outcome)) == (kind, status, said)


def test_urls_with_or_without_predict_and_scheme():
    assert Client("127.0.0.1:9876").url == "http://127.0.0.1:9876/predict"
    assert Client("http://host:1/predict/").url == "http://host:1/predict"
    assert Client("https://host/api/").url == "https://host/api/predict"
    with pytest.raises(ValueError, match="not a server URL"):
        Client("ftp://host")
    for url in ("http://[::1", "[::1:9876", "http://::1]:9876"):  # urllib's own ValueError named no URL
        with pytest.raises(ValueError, match=f"^not a server URL: {re.escape(repr(url))} \\(Invalid IPv6 URL\\)"):
            Client(url)
    # another of the server's routes: it sent to .../v2/models/m/infer/predict, and said 404
    for route in ("/v2/models/m/infer", "/v2", "/v2/health/ready", "/stats", "/api/metrics"):
        with pytest.raises(ValueError, match="that is one of the server's routes; a Client sends to /predict"):
            Client(f"http://host:1{route}")
    assert Client("http://host:1/models/predict").url == "http://host:1/models/predict"  # a prefix
    # the url of a Server not started yet, or stopped: it was a TypeError from deep in urllib
    with pytest.raises(ValueError, match="not a server URL: None; a Server's url is None until start"):
        Client(Server(handle="handles_for_tests:Recorder", GPUs="cpu").url)


def test_a_running_server_is_a_clients_url_and_api_key(serve):
    # Client(server) in a notebook said "not a server URL: <Server running http://...>", a URL in view
    with serve(ApiKey="k" * 16) as server:
        assert Client(server).predict({"value": 3})["value"] == 3  # its key too, not given again
        with pytest.raises(Unauthorized):
            Client(server, api_key="w" * 16).predict({"value": 3})  # a key given is the one sent
    with pytest.raises(ValueError, match="^<Server stopped .*> has no URL: it is not running; start"):
        Client(server)


def test_headers_given_to_a_client_go_with_every_request_and_reach_a_handle_that_passes_them(serve):
    # a client had no way to send them: predict(x, headers={...}) sent a field named "headers"
    sent = {"X-Tenant": "acme", "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "X-Note": "café"}
    with serve("handles_for_tests:Headers", PassHeaders="X-Tenant, traceparent, X-Note") as server:
        client = Client(server, headers=sent)
        expected = {"headers": {name.lower(): value for name, value in sent.items()}}
        assert client.predict({"n": 1}) == expected
        assert asyncio.run(client.apredict({"n": 1})) == expected
        with pytest.raises(TypeError, match=r"^headers= is a setting of the Client \(Client\(url, headers=...\)\)"):
            client.predict({"n": 1}, headers={"X-Tenant": "other"})
        cli = CliRunner().invoke(app, ["predict", server.url, "-d", "{}", "-H", "X-Tenant: acme", "--header",
                                       "traceparent:00-1-2-01"])
        assert cli.exit_code == 0 and json.loads(cli.stdout) == {
            "headers": {"x-tenant": "acme", "traceparent": "00-1-2-01"}}, cli.output
    for line, said in (("X-Tenant acme", "--header: expected 'Name: value', got 'X-Tenant acme'"),
                       ("Host: elsewhere", "--header: Host is written by the client itself")):
        cli = CliRunner().invoke(app, ["predict", "http://127.0.0.1:9", "-d", "{}", "-H", line])
        assert cli.exit_code == 2 and cli.stderr.strip() == said, cli.output
    for headers, message in [
        ({"X Tenant": "a"}, "headers: 'X Tenant' is no header name"),
        ({"Authorization": "Bearer x"}, r"headers: Authorization is written by the client itself \(api_key= sends"),
        ({"content-type": "text/plain"}, "headers: content-type is written by the client itself"),
        ({"X-Tenant": "a\r\nX-Admin: 1"}, "headers: the value of X-Tenant must be text on one line"),
    ]:
        with pytest.raises(ValueError, match=message):
            Client("http://127.0.0.1:9", headers=headers)


def test_a_client_alone_imports_none_of_the_server():
    # Client(url) imported the server to tell a Server apart: 200 modules and 0.2 s more for every client script
    code = ("import sys; from easyserve import Client; Client('http://127.0.0.1:9'); "
            "print('easyserve.server' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stdout + done.stderr


def test_a_url_with_spaces_or_letters_beyond_ascii_is_sent_percent_encoded_and_a_bad_port_refused_at_once():
    """apredict percent-encoded such a path as aiohttp does; predict raised UnicodeEncodeError, or NoAnswer
    "closed the connection before the request was sent" for a space. A port that is no port was a bare
    ValueError from urllib on the first call ("Port out of range 0-65535"), naming no URL."""
    server = RawServer(_answers(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"))
    try:
        with Client(f"{server.url}/modèle v2?name=ann lee&q=a%26b") as client:
            assert _both(client, n=1) == [{}, {}]
    finally:
        server.close()
    assert server.targets == ["/mod%C3%A8le%20v2/predict?name=ann%20lee&q=a%26b"] * 2
    for url in ("http://127.0.0.1:99999", "127.0.0.1:port", "http://127.0.0.1:-1"):
        with pytest.raises(ValueError, match=f"^not a server URL: {re.escape(repr(url))} \\(Port "):
            Client(url)


# -- connections: kept alive, async, notebooks -----------------------------------------------------------


def test_a_kept_alive_connection_recovers_when_the_server_restarts():
    port = free_port()
    client = Client(f"http://127.0.0.1:{port}")
    for round_ in range(2):  # the second server finds the first one's connection closed under the client
        server = Server(handle="handles_for_tests:Recorder", Port=port, GPUs="cpu").start(timeout=60)
        try:
            first = client.predict(value=round_)
            second = client.predict(value=round_ + 10)
        finally:
            server.stop(drain_timeout=5)
        assert (first["value"], second["value"]) == (round_, round_ + 10)
    client.close()


def test_async_and_blocking_calls_work_inside_a_running_event_loop(serve):
    # A notebook cell runs inside an event loop that is already running: both calls must work there.
    # each batch takes 50 ms, so while one runs the others queue up and go together
    with serve("handles_for_tests:Recorder", MaxBatchSize=8, HandleArgs={"delay": 0.05}) as server:
        client = Client(server.url)

        async def cell():
            blocking = client.predict(value=1)
            alone = await client.apredict(value=2)
            async with Client(server.url) as shared:
                many = await asyncio.gather(*(shared.apredict(value=v) for v in range(10)))
            return blocking, alone, many

        blocking, alone, many = asyncio.run(cell())
        client.close()
    assert (blocking["value"], alone["value"]) == (1, 2)
    assert [m["value"] for m in many] == list(range(10))
    assert max(m["batch_size"] for m in many) > 1  # concurrent requests really were in flight together


# -- easyserve predict ---------------------------------------------------------------------------------


def test_cli_predict_prints_the_json_answer(serve, tmp_path):
    image = png(picture())
    (tmp_path / "picture.png").write_bytes(image)
    runner = CliRunner()
    with serve("handles_for_tests:Payload") as server:
        from_file = runner.invoke(app, ["predict", server.url, str(tmp_path / "picture.png")])
        from_data = runner.invoke(app, ["predict", server.url + "/predict", "--data", '{"x": [5.1, 3.5]}'])
        from_stdin = runner.invoke(app, ["predict", server.url, "-"], input=image)
        # a JSON object on standard input was sent as bytes: the handle got b'{"x": ...}', and the client a 200
        json_stdin = runner.invoke(app, ["predict", server.url, "-", "-d", '{"k": 1}'], input=' {"x": [5.1, 3.5]}\n')
        bad_stdin = runner.invoke(app, ["predict", server.url, "-"], input='{"x": [5.1,')
        # as PowerShell writes it: after a byte order mark, and in UTF-16 (sent as bytes, they were 200s too)
        encoded = [('\ufeff{"x": [1]}', "utf-8"), ('{"x": [2]}', "utf-16"), ('\ufeff {"x": [3]}', "utf-16-be")]
        marked = [runner.invoke(app, ["predict", server.url, "-"], input=text.encode(codec)) for text, codec in encoded]
        # and bytes that no text begins with, then a brace (a pixel of 255, 123, 40): sent as bytes
        pixels = runner.invoke(app, ["predict", server.url, "-"], input=b"\xff{(\x01")
        both = runner.invoke(app, ["predict", server.url, str(tmp_path / "picture.png"), "-d", '{"k": 1}'])
        missing = runner.invoke(app, ["predict", server.url, str(tmp_path / "nope.png")])
        not_json = runner.invoke(app, ["predict", server.url, "--data", "{x"])
        # the shell command itself, as a user runs it
        shell = subprocess.run([sys.executable, "-m", "easyserve.cli", "predict", server.url, "picture.png"],
                               cwd=tmp_path, capture_output=True, text=True, timeout=60)
    expected = {"data": f"<{len(image)} bytes>", "content_type": "image/png"}
    assert from_file.exit_code == 0 and json.loads(from_file.stdout) == expected
    assert from_file.stdout.count("\n") == 1  # short: one line
    assert json.loads(from_data.stdout) == {"x": [5.1, 3.5]}
    assert json.loads(from_stdin.stdout) == expected
    assert json_stdin.exit_code == 0 and json.loads(json_stdin.stdout) == {"x": [5.1, 3.5], "k": 1}
    assert bad_stdin.exit_code == 2
    assert [json.loads(result.stdout) for result in marked] == [{"x": [1]}, {"x": [2]}, {"x": [3]}]
    assert json.loads(pixels.stdout) == {"data": "<4 bytes>", "content_type": "application/octet-stream"}
    assert "standard input starts like a JSON object but is not valid JSON" in bad_stdin.stderr
    assert json.loads(both.stdout).keys() == {"img", "k"}
    assert missing.exit_code == 1 and "no file" in missing.stderr
    assert not_json.exit_code == 2 and "--data is not valid JSON" in not_json.stderr
    assert shell.returncode == 0 and json.loads(shell.stdout) == expected


def test_the_one_call_predict_and_an_answer_that_cannot_be_written(serve, tmp_path):
    from easyserve.client import predict

    out = tmp_path / "gone" / "out.json"
    with serve("handles_for_tests:Payload") as server:
        assert predict(server.url, {"x": [1, 2]}) == {"x": [1, 2]}  # a Client for one request, closed after it
        assert predict(server.url, png(picture()))["content_type"] == "image/png"
        cli = CliRunner().invoke(app, ["predict", server.url, "-d", '{"x": 1}', "-o", str(out)])
        with pytest.raises(TypeError, match="^headers: expected a dict of header name -> value, not list$"):
            Client(server.url, headers=[("X-Tenant", "acme")])
    # the path once, not again in the system's words ("[Errno 2] No such file or directory: '...'")
    assert (cli.exit_code, cli.stderr) == (1, f"cannot write the answer to {out}: No such file or directory\n")


def test_predict_asks_for_an_npy_answer_with_npy_or_an_output_named_npy(serve, tmp_path):
    """easyserve predict had no way to ask for .npy: -o out.npy got JSON text in a file named .npy, and
    -H 'Accept: ...' is the client's own header."""
    with serve("handles_for_tests:Doubles") as server:
        run = lambda *args: CliRunner().invoke(app, ["predict", server.url, "-d", '{"x": [1, 2.5]}', *args])  # noqa
        named, asked, plain = run("-o", str(tmp_path / "a.npy")), run("--npy", "-o", str(tmp_path / "b")), run()
    for result, path in ((named, "a.npy"), (asked, "b")):
        assert result.exit_code == 0, result.stderr
        answer = np.load(tmp_path / path, allow_pickle=False)
        assert (answer.dtype, answer.tolist()) == (np.float32, [2.0, 5.0])
    assert plain.exit_code == 0 and json.loads(plain.stdout) == [2.0, 5.0]
    with serve("handles_for_tests:Payload") as server:  # an answer that is no array: said, written as JSON
        result = CliRunner().invoke(app, ["predict", server.url, "-d", '{"x": 1}', "-o", str(tmp_path / "c.npy")])
    assert result.exit_code == 0 and json.loads((tmp_path / "c.npy").read_text()) == {"x": 1}
    assert result.stderr == f"the answer is JSON, not an array: {tmp_path / 'c.npy'} holds it as JSON\n"


def test_pretty_json_keeps_short_parts_on_one_line():
    answer = {"detections": [{"class": 16, "label": "dog", "score": 0.93, "box": [1.5, 2.0, 300.25, 400.0]}] * 3,
              "image_size": [480, 640]}
    text = pretty_json(answer)
    assert json.loads(text) == answer
    assert text.splitlines() == [
        "{",
        '  "detections": [',
        '    {"class": 16, "label": "dog", "score": 0.93, "box": [1.5, 2.0, 300.25, 400.0]},',
        '    {"class": 16, "label": "dog", "score": 0.93, "box": [1.5, 2.0, 300.25, 400.0]},',
        '    {"class": 16, "label": "dog", "score": 0.93, "box": [1.5, 2.0, 300.25, 400.0]}',
        "  ],",
        '  "image_size": [480, 640]',
        "}",
    ]


def test_cli_predict_reports_refusals_with_their_status(serve):
    with serve("handles_for_tests:Misbehaving") as server:
        failed = CliRunner().invoke(app, ["predict", server.url, "--data", '{"fail": "forward"}'])
    assert failed.exit_code == 1
    assert failed.stderr.startswith("500 error: forward failed: RuntimeError: model exploded")
    # what the server's log calls it, by the traceback an operator is to find
    assert re.search(r"\(request [0-9a-f]{32}\)$", failed.stderr.strip()), failed.stderr
    unreachable = CliRunner().invoke(app, ["predict", f"http://127.0.0.1:{free_port()}", "-d", '{"value": 1}'])
    assert unreachable.exit_code == 1 and "is the server running" in unreachable.stderr


class RawServer:
    """A server on raw sockets that answers each request as ``behave(connection, index)`` says, where
    ``index`` counts the requests it has read (from 0), over all connections; ``requests`` is that count,
    ``targets``, ``heads`` and ``bodies`` what each request named in its request line, its head, and
    sent; ``closed`` counts the connections it has closed."""

    def __init__(self, behave) -> None:
        self.behave = behave
        self.requests = 0
        self.targets: list[str] = []
        self.heads: list[str] = []
        self.bodies: list[bytes] = []
        self.closed = 0
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        try:
            with connection, connection.makefile("rb") as reader:
                self._answer(connection, reader)
        finally:
            with self.lock:
                self.closed += 1

    def _answer(self, connection: socket.socket, reader) -> None:
        while True:
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                line = reader.readline()
                if not line:
                    return
                head += line
            lengths = [h.split(b":")[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")]
            body = reader.read(int(lengths[0]))
            with self.lock:
                index, self.requests = self.requests, self.requests + 1
                self.targets.append(head.split(b" ")[1].decode())
                self.heads.append(head.decode())
                self.bodies.append(body)
            if not self.behave(connection, index):
                return  # closed

    def close(self) -> None:
        self.listener.close()


def _ok(connection: socket.socket, body: bytes = b'{"ok": true}') -> bool:
    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                       % (len(body), body))
    return True


def test_a_request_the_server_read_and_then_dropped_is_not_sent_again():
    """The first request is answered on a kept-alive connection; the second is read, then the
    connection closes with no answer (a front process killed mid-request). It may have run: the client
    says so, where it used to send it again, and the handle ran it twice."""
    server = RawServer(lambda connection, index: index == 0 and _ok(connection))
    try:
        client = Client(server.url)
        assert client.predict(n=1) == {"ok": True}
        with pytest.raises(ConnectionError, match="closed the connection without answering .*the request may have run"):
            client.predict(n=2)

        async def in_a_session():
            async with Client(server.url) as shared:
                return await shared.apredict(n=3)

        with pytest.raises(ConnectionError, match="closed the connection without answering .*may have run"):
            asyncio.run(in_a_session())
    finally:
        server.close()
    assert server.requests == 3  # each sent once


def test_a_kept_alive_connection_the_server_closed_while_idle_is_replaced_before_sending():
    """The server closes each connection after its answer, without saying so (a keep-alive timeout):
    the next request goes on a new connection, not to the closed one, and each is read once; from an
    ``async with`` block too, whose loop was busy as the connection closed."""
    server = RawServer(lambda connection, index: _ok(connection, b'{"n": %d}' % index) and False)
    try:
        client = Client(server.url)
        answers = []
        for _ in range(3):
            answers.append(client.predict(n=1))
            wait_until(lambda: server.closed == len(answers), 10, "the server to close the connection")

        async def busy_between_requests() -> None:
            # inside `async with`, the loop busy (a cell decoding pictures) while the server closed the
            # connection: aiohttp had not seen the close, sent the request on it, and raised "may have run"
            async with Client(server.url) as shared:
                for _ in range(2):
                    answers.append(await shared.apredict(n=1))
                    wait_until(lambda: server.closed == len(answers), 10, "the server to close the connection")
                    time.sleep(1.1)  # the loop held, as a cell's work holds it

        asyncio.run(busy_between_requests())
    finally:
        server.close()
    assert answers == [{"n": n} for n in range(5)] and server.requests == 5


def test_timeout_bounds_the_whole_answer_not_each_read():
    """A server that sends its answer a byte at a time, each within the timeout: the call still ends at
    ``timeout`` (it took as long as the server liked, 12 s here)."""
    def trickle(connection: socket.socket, index: int) -> bool:
        body = b'{"ok": true}' + b" " * 28
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                           % len(body))
        try:
            for byte in body:
                connection.sendall(bytes([byte]))
                time.sleep(0.3)
        except OSError:  # the client gave up
            pass
        return False

    server = RawServer(trickle)
    try:
        with pytest.raises(Timeout, match="no answer from .* within 1 s"):
            Client(server.url, timeout=1).predict(n=1)
        with pytest.raises(Timeout, match="no answer from .* within 1 s"):
            asyncio.run(Client(server.url, timeout=1).apredict(n=1))
        # the deadline passes while the connection is still being made (a slow name lookup)
        connect = socket.create_connection

        def slowly(*args, **kwargs):
            time.sleep(1.2)
            return connect(*args, **kwargs)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(socket, "create_connection", slowly)
            with pytest.raises(Timeout, match="no answer from .* within 1 s"):
                Client(server.url, timeout=1).predict(n=1)
        # in a forked child of a process whose client has its deadline thread running
        client = Client(server.url, timeout=1)
        with pytest.raises(Timeout):
            client.predict(n=1)
        child = os.fork()
        if child == 0:
            try:
                client.predict(n=1)
                os._exit(1)
            except Timeout:
                os._exit(0)
            except BaseException:
                os._exit(2)
        assert os.waitpid(child, 0)[1] == 0
    finally:
        server.close()


def test_threads_that_come_and_go_share_a_bounded_pool_of_connections(serve):
    """A thread per request (a web app, a job runner) sharing one Client: connections are reused, not
    one left open for each thread that ever called, which ran a process out of file descriptors."""

    def client_sockets(port: int) -> int:  # this process's connections to the server: open, or closed by it only
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
        return sum(line.split()[2].endswith(f":{port:04X}") and line.split()[3] in ("01", "08") for line in lines)

    with serve() as server:
        client = Client(server.url)
        for value in range(60):
            thread = threading.Thread(target=client.predict, kwargs={"value": value})
            thread.start()
            thread.join()
        one_at_a_time = client_sockets(server.port)
        together = [threading.Thread(target=client.predict, kwargs={"value": v}) for v in range(50)]
        for thread in together:
            thread.start()
        for thread in together:
            thread.join()
        at_most = client_sockets(server.port)
        client.close()
        after_close = client_sockets(server.port)
    assert one_at_a_time == 1
    assert at_most <= 32  # kept alive for the next requests
    assert after_close == 0


def test_clients_made_for_each_call_leave_no_thread_behind(serve):
    """``Client(url).predict(x)`` in a loop, as the README writes it: each client started a thread of its
    own to end late calls, which outlived the call by its timeout and 10 s more; at a few hundred calls
    a second, thousands of threads at a time, until the process could start no more."""
    with serve() as server:
        for value in range(20):
            assert Client(server.url).predict(value=value)["value"] == value
            with Client(server.url, timeout=5) as client:
                client.predict(value=value)
        asyncio.run(Client(server.url).apredict(value=1))
        watching = [t for t in threading.enumerate() if t.name == "easyserve-client-deadlines"]
    assert len(watching) == 1, len(watching)


def test_a_forked_child_opens_its_own_connection_and_leaves_its_parents_alone():
    """A child forked with a kept-alive connection in the pool (multiprocessing, a DataLoader's
    workers) sent its requests on the parent's connection: two processes reading one stream took
    each other's answers, a wrong prediction returned without an error."""
    peers = []  # the client's end of the connection each request came on

    def answer(connection: socket.socket, index: int) -> bool:
        peers.append(connection.getpeername())
        return _ok(connection, b'{"n": %d}' % index)

    server = RawServer(answer)
    try:
        client = Client(server.url)
        assert client.predict(n=1) == {"n": 0}
        child = os.fork()
        if child == 0:
            try:
                os._exit(0 if client.predict(n=2) == {"n": 1} else 1)
            except BaseException:
                os._exit(2)
        assert os.waitpid(child, 0)[1] == 0
        assert client.predict(n=3) == {"n": 2}  # the parent's connection still open, and still its own
        client.close()
    finally:
        server.close()
    assert peers[0] == peers[2] != peers[1], peers


def test_calls_a_forked_child_makes_at_once_each_keep_their_timeout():
    """A forked child reset the deadlines' state at its first call: two threads making their first
    calls at once could each reset it, and the first one's call lost its deadline, held for as long
    as its server trickled bytes (the timeout of each read alone), while the deadline thread died on a
    lock it did not hold. The child's state is made at the fork now, before any thread runs."""
    from easyserve.deadlines import DEADLINES

    server = RawServer(_sending(b"HTTP/1.1 200 OK\r\nContent-Length: 400\r\n\r\n", b" ", every=0.1, times=None))
    try:
        Client(server.url, timeout=5).predict  # noqa: B018
        parent_state = DEADLINES._changed
        with pytest.raises(Timeout):
            Client(server.url, timeout=0.2).predict(n=0)  # the deadline thread runs in the parent
        child = os.fork()
        if child == 0:
            code = 3
            try:
                fresh = DEADLINES._changed is not parent_state and DEADLINES._thread is None
                took: list[float] = []

                def call() -> None:
                    began = time.monotonic()
                    with contextlib.suppress(Timeout):
                        Client(server.url, timeout=1).predict(n=1)
                    took.append(time.monotonic() - began)

                threads = [threading.Thread(target=call) for _ in range(4)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(20)
                code = 0 if fresh and len(took) == 4 and max(took) < 3 else 1
            finally:
                os._exit(code)
        assert os.waitpid(child, 0)[1] == 0
    finally:
        server.close()


def test_a_client_goes_to_other_processes_as_its_settings(serve):
    """pool.map(client.predict, inputs) pickles the client for each process: it was a TypeError, "cannot
    pickle '_thread.lock' object" ('socket' once it had called). It goes as the server and settings it
    was made with, and opens connections of its own there."""
    import concurrent.futures
    import pickle

    with serve("handles_for_tests:Recorder", ApiKey="s3cret-key") as server:
        client = Client(server.url + "?v=1", timeout=30, api_key="s3cret-key", max_answer_mb=5)
        assert client.predict(value=1)["value"] == 1
        copy = pickle.loads(pickle.dumps(client))
        assert (copy.url, copy.timeout, copy.max_answer_mb) == (client.url, 30, 5)
        with concurrent.futures.ProcessPoolExecutor(2) as pool:
            answers = list(pool.map(client.predict, [{"value": v} for v in range(4)]))
        assert copy.predict(value=9)["value"] == 9 and client.predict(value=8)["value"] == 8
        client.close()
        copy.close()
    assert [answer["value"] for answer in answers] == [0, 1, 2, 3]


# -- misbehaving servers: each answer raises one of easyserve's errors, never a library's own ------------


def test_a_servers_words_reach_an_exception_with_their_control_characters_written_out():
    """Escaped in the server's JSON, decoded by the client: a script's uncaught error wrote a server's (or
    an echoed client's) escape sequences to the terminal, which can retitle it, clear it, or rewrite
    lines. easyserve predict wrote them out; the library did not."""
    def answer(status: bytes, body: bytes, *more: bytes) -> bytes:
        return b"HTTP/1.1 %s\r\nContent-Length: %d\r\n%s\r\n%s" % (status, len(body), b"".join(more), body)

    cases = [
        (answer(b"400 X", b'{"error": "bad \\u001b]0;owned\\u0007 \\u009b2J\\tend"}',
                b"Content-Type: application/json\r\n"), "bad \\x1b]0;owned\\x07 \\x9b2J\tend"),
        (answer(b"502 X", b"proxy \x1b[2J down", b"Content-Type: text/plain\r\n"), "proxy \\x1b[2J down"),
        (answer(b"302 X", b"", b"Location: /a\x1b[2Jb\r\n"), "\\x1b[2J"),
    ]
    for raw, shown in cases:
        outcomes, _ = _both_against(_answers(raw))
        for outcome in outcomes:
            assert isinstance(outcome, Exception) and shown in str(outcome), outcome
            assert not any(ord(c) < 32 and c not in "\t\n" or 0x7f <= ord(c) <= 0x9f for c in str(outcome)), outcome


# what an easyserve answer carries, and a stand-in's bytes must too to be taken for one: its request's id
MARK = b"X-Request-Id: 0123abcd\r\n"


def _answers(*answers: bytes, close: bool = False):
    """A behaviour that answers request ``i`` with ``answers[i]`` (the last one again after that)."""
    def behave(connection: socket.socket, index: int) -> bool:
        connection.sendall(answers[min(index, len(answers) - 1)])
        return not close
    return behave


def _both_against(behave) -> tuple[list, RawServer]:
    """What ``predict`` and ``apredict`` each did against a server that behaves so; the server, closed."""
    server = RawServer(behave)
    try:
        with Client(server.url) as client:
            return _both(client, n=1), server
    finally:
        server.close()


def _both(client: Client, **fields):
    """What ``predict`` and ``apredict`` each raised (or returned)."""
    outcomes = []
    for call in (lambda: client.predict(**fields), lambda: asyncio.run(client.apredict(**fields))):
        try:
            outcomes.append(call())
        except Exception as exc:  # noqa: BLE001  (the test looks at what it was)
            outcomes.append(exc)
    return outcomes


def _sending(head: bytes, piece: bytes, every: float = 0.1, times: int | None = 100):
    """A behaviour that sends ``head``, then ``piece`` every ``every`` seconds, ``times`` times (``None``:
    without end), or until the client leaves."""
    def behave(connection: socket.socket, index: int) -> bool:
        try:
            connection.sendall(head)
            for _ in itertools.repeat(None) if times is None else range(times):
                time.sleep(every)
                connection.sendall(piece)
        except OSError:
            pass
        return False
    return behave


@pytest.mark.parametrize("head,each", [
    (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\nPART", b"x"),
    (b"HTTP/1.1 200 OK\r\n", b"X-A: b\r\n"),
    (b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n", b"X-A: b\r\n"),
], ids=["a body that ends when the connection closes", "headers", "the headers of an image"])
def test_timeout_holds_while_the_headers_or_a_body_with_no_length_trickle_in(head, each):
    """The first ran as long as the server sent (http.client hands the socket to such an answer, out of
    the deadline's reach); the others, cut at the deadline, came back as b'' or as 'not JSON: b'''."""
    server = RawServer(_sending(head, each))
    try:
        started = time.monotonic()
        with Client(server.url, timeout=0.5) as client:
            outcomes = _both(client, n=1)
        took = time.monotonic() - started
    finally:
        server.close()
    for outcome in outcomes:
        assert isinstance(outcome, Timeout) and str(outcome).endswith("within 0.5 s"), repr(outcome)
    assert took < 3


def test_none_or_a_huge_timeout_waits_for_ever_and_a_bad_one_is_refused(tmp_path):
    """None was a TypeError; inf or 1e10 an OverflowError, and 5e9 crashed the deadline thread."""
    server = RawServer(_answers(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"))
    try:
        for timeout in (None, float("inf"), 1e10, 5e9):
            with Client(server.url, timeout=timeout) as client:
                assert _both(client, n=1) == [{}, {}]
        for timeout in ("0", "inf", "1e10"):
            cli = CliRunner().invoke(app, ["predict", server.url, "-d", '{"n": 1}', "--timeout", timeout])
            assert (cli.exit_code, cli.stdout) == (0, "{}\n")
    finally:
        server.close()
    for timeout in (0, -1, float("nan"), "5"):
        with pytest.raises(ValueError, match="timeout: got .*; expected seconds above 0"):
            Client(server.url, timeout=timeout)
    # on the command line, a usage mistake (exit 2) told as the command takes it: 0 is allowed
    cli = CliRunner().invoke(app, ["predict", server.url, "-d", '{"n": 1}', "--timeout", "-1"])
    assert (cli.exit_code, cli.stderr) == (2, "--timeout: expected seconds, 0 or more (0 waits for ever), got -1\n")


def test_cli_predict_with_nothing_to_send_or_data_that_is_no_object_is_a_usage_mistake():
    """`-d '[1,2]'` exited 1 where `-d 'not json'` exited 2; with nothing to send it said "pass a dict,
    a file path, bytes or an image array", Python's words."""
    for args, said in ((["-d", "[1, 2]"], "--data must be a JSON object such as '{\"x\": [1, 2]}', got '[1, 2]'"),
                       ([], "nothing to send: give a FILE (an image, a .json file, - for standard input) or --data "
                            "JSON")):
        cli = CliRunner().invoke(app, ["predict", "http://127.0.0.1:9", *args])
        assert (cli.exit_code, cli.stderr) == (2, said + "\n"), cli.stderr


def test_cli_predict_names_a_missing_file_in_the_commands_words(tmp_path):
    # it said "(to send text, put it in a dict)", the Client's words, to someone at a shell
    cli = CliRunner().invoke(app, ["predict", "http://127.0.0.1:9", str(tmp_path / "nope.jpg")])
    assert cli.exit_code == 1
    assert cli.stderr == (f"no file {str(tmp_path / 'nope.jpg')!r} to send (to send JSON, give it with --data "
                          "'{...}'; - reads standard input)\n")


def test_cli_predict_sends_an_empty_object_given_as_data(serve):
    # a handle whose options all come from the query string: `-d '{}'` was refused, "nothing to send"
    with serve("handles_for_tests:Parameters") as server:
        cli = CliRunner().invoke(app, ["predict", server.url + "/predict?top_k=3", "-d", "{}"])
    assert cli.exit_code == 0, cli.stderr
    assert json.loads(cli.stdout) == {"parameters": {"top_k": "3"}, "fields": []}


def test_json_nested_too_deeply_is_an_error_not_a_recursion_error(tmp_path):
    deep = b"[" * 100_000 + b"]" * 100_000
    outcomes, server = _both_against(_answers(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(deep), deep)))
    for outcome in outcomes:
        assert type(outcome) is EasyServeError
        assert str(outcome) == "the server answered 200 with JSON nested too deeply to read"
    with pytest.raises(ValueError, match="nested too deeply"):
        encode({"x": _nested(5000)})
    (tmp_path / "deep.json").write_bytes(b'{"x": ' + deep)
    from_file = CliRunner().invoke(app, ["predict", server.url, str(tmp_path / "deep.json")])
    from_data = CliRunner().invoke(app, ["predict", server.url, "-d", deep.decode()])
    assert from_file.exit_code == 1
    assert from_file.stderr == f"{tmp_path / 'deep.json'} is JSON nested too deeply to read\n"
    assert from_data.exit_code == 2 and from_data.stderr == "--data is nested too deeply to read\n"


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def test_redirects_are_refused_naming_where_they_point_and_the_post_is_not_sent_again():
    """apredict followed a 307 loop, POSTing the body ten times, then let aiohttp.TooManyRedirects out."""
    outcomes, server = _both_against(_answers(
        b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n"))
    for outcome in outcomes:
        assert type(outcome) is EasyServeError and outcome.status == 307
        assert str(outcome) == (f"{server.url}/predict answered 307, a redirect to {server.url}/elsewhere; the client "
                                "does not follow redirects: if that is the server, use its URL")
    assert server.targets == ["/predict", "/predict"]  # one each


def test_an_answer_that_is_not_http_is_an_easyserve_error():
    """apredict let aiohttp.ClientResponseError out; predict's message held the banner's line breaks."""
    outcomes, server = _both_against(_answers(b"SSH-2.0-OpenSSH_9.2\r\n", close=True))
    for outcome in outcomes:
        assert type(outcome) is EasyServeError and "\n" not in str(outcome)
        assert str(outcome).startswith(f"{server.url} answered something that is not HTTP (")
        assert "SSH-2.0-OpenSSH_9.2" in str(outcome) and str(outcome).endswith("): is this an easyserve server?")


@pytest.mark.parametrize("head,piece,kind", [
    (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n[", b"1," * 32768, None),
    (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
     b"10000\r\n" + b" " * 65536 + b"\r\n", None),
    (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n", b" " * 65536, None),
    (b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\nX-Request-Id: r\r\nConnection: close\r\n\r\n"
     b"oops ",
     b"x" * 65536, HandleError),
], ids=["no length", "chunked", "a length of 10 GB", "an error without end"])
def test_an_answer_without_end_is_read_no_further_than_max_answer_mb(head, piece, kind):
    """Every answer was read whole, whatever its size: a server (or whatever listens at its address)
    sending without end took the caller's memory, 5-12 GB in 20 s, before any timeout ended it."""
    server = RawServer(_sending(head, piece, every=0, times=None))
    try:
        with Client(server.url, max_answer_mb=2) as client:
            outcomes = _both(client, n=1)
    finally:
        server.close()
    for outcome in outcomes:
        if kind is None:
            assert type(outcome) is EasyServeError, repr(outcome)
            assert str(outcome) == (f"{server.url}/predict answered more than max_answer_mb=2 MB; the rest was not "
                                    "read (Client(url, max_answer_mb=...) for a larger one)")
        else:  # an error's message: its first 64 kB, on one line
            assert type(outcome) is kind and str(outcome).startswith("oops xxx") and len(str(outcome)) <= 200, outcome
    with pytest.raises(ValueError, match="max_answer_mb: got 0; expected megabytes above 0"):
        Client(server.url, max_answer_mb=0)


def test_an_answer_without_end_takes_about_max_answer_mb_of_memory_not_three_times_it():
    """Read in pieces, joined, then cut to the bound, an answer without end held three times
    max_answer_mb at once: 3 GB for the default 1 GiB, enough to end a notebook's kernel."""
    import tracemalloc

    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    server = RawServer(_sending(head, b"10000\r\n" + b" " * 65536 + b"\r\n", every=0, times=None))
    peaks = []
    try:
        with Client(server.url, max_answer_mb=24) as client:
            for call in (lambda: client.predict(n=1), lambda: asyncio.run(client.apredict(n=1))):
                tracemalloc.start()
                try:
                    with pytest.raises(EasyServeError, match="answered more than max_answer_mb=24 MB"):
                        call()
                    peaks.append(tracemalloc.get_traced_memory()[1] / 2**20)
                finally:
                    tracemalloc.stop()
    finally:
        server.close()
    assert max(peaks) < 1.5 * 24, f"peaks of {peaks} MB for a bound of 24 MB"


def _then_stray(connection: socket.socket, index: int) -> bool:
    """Answer; the first request's answer is followed, 0.3 s on, by one nobody asked for (a broken proxy's)."""
    _ok(connection, b'{"n": %d}' % index)
    if index == 0:
        time.sleep(0.3)
        _ok(connection, b'{"n": 999}')
    return True


def test_an_answer_nobody_asked_for_is_never_the_next_requests_answer_in_an_async_block():
    """Inside ``async with``, aiohttp read a stray answer into the idle connection's buffer while the
    loop ran, and the next request on that connection took it for its own: a wrong prediction, no
    error. The blocking client dropped such a connection already."""
    server = RawServer(_then_stray)

    async def two_calls() -> list:
        async with Client(server.url) as shared:
            first = await shared.apredict(n=1)
            await asyncio.sleep(0.6)  # the loop runs, and reads the stray answer
            return [first, await shared.apredict(n=1)]

    try:
        assert asyncio.run(two_calls()) == [{"n": 0}, {"n": 1}]
        client = Client(server.url)
        first = client.predict(n=1)
        time.sleep(0.6)
        assert [first, client.predict(n=1)] == [{"n": 2}, {"n": 3}]
    finally:
        server.close()


def test_a_connection_the_server_closed_just_after_answering_is_not_used_by_the_next_async_call():
    """A server that closes right after its answer, without saying so: a connection idle for under a
    second was not looked at, and the next call in an ``async with`` block, its loop busy meanwhile,
    went out on it and failed, "may have run", though the server never saw it."""
    server = RawServer(lambda connection, index: _ok(connection, b'{"n": %d}' % index) and False)

    async def busy_between_calls() -> list:
        answers = []
        async with Client(server.url) as shared:
            for _ in range(3):
                answers.append(await shared.apredict(n=1))
                wait_until(lambda: server.closed == len(answers), 10, "the server to close the connection")
                time.sleep(0.05)  # the loop held, briefly
        return answers

    try:
        assert asyncio.run(busy_between_calls()) == [{"n": 0}, {"n": 1}, {"n": 2}]
    finally:
        server.close()
    assert server.requests == 3


def test_a_connection_idle_near_the_servers_keep_alive_timeout_is_not_used_for_the_next_request():
    """A request sent just as the server closed the idle connection it went on was lost, "may have run"
    though the server never read it: a script calling every 15 s met the server's 15 s now and then. The
    server says how long it keeps one (Keep-Alive: timeout=2 here); a connection idle for a second less is
    not used. This server drops a request that comes on a connection idle for 1.2 s, as one whose timer
    fired as the request came."""
    answered_at: dict[socket.socket, float] = {}

    def behave(connection: socket.socket, index: int) -> bool:
        if time.monotonic() - answered_at.get(connection, math.inf) >= 1.2:
            return False  # closed unanswered
        body = b'{"n": %d}' % index
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nKeep-Alive: timeout=2\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        answered_at[connection] = time.monotonic()
        return True

    server = RawServer(behave)

    async def in_a_block() -> list:
        async with Client(server.url) as shared:
            answers = [await shared.apredict(n=1), await shared.apredict(n=1)]
            await asyncio.sleep(1.3)
            return [*answers, await shared.apredict(n=1)]

    try:
        client = Client(server.url)
        answers = [client.predict(n=1), client.predict(n=1)]  # one connection, kept
        time.sleep(1.3)
        answers.append(client.predict(n=1))  # a new one
        answers += asyncio.run(in_a_block())
    finally:
        server.close()
    assert answers == [{"n": n} for n in range(6)] and server.requests == 6


def test_an_async_call_whose_body_the_server_refused_early_leaves_no_socket_behind(serve):
    """A 413 read while most of the body was still unsent: the connection's close waited to send the rest
    to a server reading no more of it, and the socket outlived the event loop (a ResourceWarning as
    asyncio.run ended, in every script whose last call was refused so)."""
    import gc
    import warnings

    with serve(MaxBodyMB=1) as server:
        client = Client(server.url, timeout=20)

        async def refused_in_a_block() -> None:
            async with client:
                with pytest.raises(PayloadTooLarge):
                    await client.apredict(b"x" * (32 << 20))

        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always", ResourceWarning)
            with pytest.raises(PayloadTooLarge, match="body too large"):
                asyncio.run(client.apredict(b"x" * (32 << 20)))
            asyncio.run(refused_in_a_block())
            gc.collect()
    assert not [w for w in said if issubclass(w.category, ResourceWarning)], [str(w.message) for w in said]


def test_the_server_says_how_long_it_keeps_an_idle_connection(serve):
    from conftest import http as through_aiohttp  # (this module's http is the standard library's)

    with serve(KeepAliveTimeoutS=7.5) as server:
        status, headers, _ = through_aiohttp("GET", server.url + "/health")
        assert (status, headers.get("Keep-Alive")) == (200, "timeout=7")
        status, headers, _ = through_aiohttp("GET", server.url + "/health", headers={"Connection": "close"})
        assert status == 200 and "Keep-Alive" not in headers
        # an Upgrade request's connection closes after its answer: said so, not kept (curl sent its next on it)
        status, headers, _ = through_aiohttp("GET", server.url + "/health",
                                             headers={"Connection": "Upgrade", "Upgrade": "websocket"})
        assert status == 200 and "Keep-Alive" not in headers and headers.get("Connection") == "close", headers
    with serve(KeepAliveTimeoutS=0.5) as server:  # under a second: as it is, where "timeout=0" said none
        assert through_aiohttp("GET", server.url + "/health")[1].get("Keep-Alive") == "timeout=0.5"
        # used for half as long: a second less, none was used, and each request opened a connection of its own
        client = Client(server.url)
        client.predict(value=1)
        kept = list(client._idle)
        for _ in range(5):
            client.predict(value=1)
        assert len(kept) == 1 and client._idle == kept
        client.close()


def test_an_answer_with_more_headers_than_http_client_reads_is_not_http_not_a_request_that_may_have_run():
    """http.client refuses an answer of more than 100 headers with a bare HTTPException, which the
    blocking client took for a connection closed under the request ("may have run")."""
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200))
    outcomes, server = _both_against(_answers(head + b"Content-Length: 2\r\n\r\n{}"))
    for outcome in outcomes:
        assert type(outcome) is EasyServeError, repr(outcome)
        assert str(outcome).startswith(f"{server.url} answered something that is not HTTP ("), outcome


def test_interim_answers_before_the_answer_are_skipped():
    """http.client skips 100 Continue alone: a 103 Early Hints was taken for the answer (an
    EasyServeError "Early Hints"), and the answer itself was lost."""
    body = b'{"ok": true}'
    answer = (b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
              b"HTTP/1.1 102 Processing\r\n\r\n"
              b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
                  len(body), body))
    outcomes, _ = _both_against(_answers(answer))
    assert outcomes == [{"ok": True}, {"ok": True}], outcomes


def test_a_compressed_answer_is_read_no_further_than_max_answer_mb_once_inflated():
    """aiohttp inflates as it reads: a gzip answer under max_answer_mb by its Content-Length was read
    whole, 300 MB from 300 kB."""
    import gzip

    bomb = gzip.compress(b" " * (64 * 2**20), compresslevel=9)  # 64 MB of JSON's white space, in 64 kB
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
            b"Content-Length: %d\r\n\r\n" % len(bomb))
    server = RawServer(_answers(head + bomb))
    try:
        with Client(server.url, max_answer_mb=2) as client:
            with pytest.raises(EasyServeError, match=r"answered more than max_answer_mb=2 MB"):
                asyncio.run(client.apredict(n=1))
    finally:
        server.close()


def test_an_answer_of_known_length_is_read_in_one_piece_not_twice_its_size():
    """Read in pieces and joined, a 200 MB answer took 400 MB at its peak."""
    import tracemalloc

    size = 48 * 2**20
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n%sContent-Length: %d\r\n\r\n" % (MARK, size)
    server = RawServer(_answers(answer + b"\0" * size))
    try:
        with Client(server.url) as client:
            tracemalloc.start()
            try:
                got = client.predict(n=1)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
    finally:
        server.close()
    assert len(got) == size and peak < 1.5 * size, f"peak {peak / 2**20:.0f} MB for a {size / 2**20:.0f} MB answer"


def test_cli_predict_writes_a_servers_control_characters_out_not_to_the_terminal():
    """A server's message reached the terminal as it was: an escape sequence in it could set the
    window's title, clear the screen and print a fake "all good" in its place."""
    def json_answer(status: bytes, doc: dict) -> bytes:
        body = json.dumps(doc).encode()
        head = b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nX-Request-Id: r\r\nContent-Length: %d\r\n\r\n" % (
            status, len(body))
        return head + body

    hostile = "\x1b]0;pwned\x07\x1b[2J\rFAKE: all good\x9b31m"
    server = RawServer(_answers(json_answer(b"400 Bad Request", {"error": hostile}),
                                json_answer(b"200 OK", {"label": hostile, "tab": "a\tb"}),
                                b"\x1b[2JSSH-2.0\r\n"))
    try:
        runs = [CliRunner().invoke(app, ["predict", server.url, "-d", '{"n": 1}']) for _ in range(3)]
    finally:
        server.close()
    refused, answered, banner = runs
    assert refused.exit_code == 1 and "\x1b" not in refused.stderr and "\x9b" not in refused.stderr
    assert refused.stderr.strip() == "400 error: \\x1b]0;pwned\\x07\\x1b[2J\\x0dFAKE: all good\\x9b31m"
    # JSON escapes what is below a space itself; what it leaves (DEL, the 8-bit controls) is escaped too
    assert answered.exit_code == 0 and not any(c in answered.stdout for c in "\x1b\x07\x9b\r")
    assert json.loads(answered.stdout) == {"label": hostile, "tab": "a\tb"}  # the same value, still JSON
    assert banner.exit_code == 1 and "\x1b" not in banner.stderr and "\\x1b[2JSSH-2.0" in banner.stderr


NGINX_502 = (b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1>"
             b"</center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n")


def test_an_html_page_is_an_error_and_a_proxys_page_is_one_line(tmp_path):
    """A wrong URL that reaches some web server's default page was a successful answer (and
    `easyserve predict -o` wrote it, exiting 0); nginx's own 502 page became a seven-line message."""
    page = b"<html><head><title>Welcome to nginx!</title></head><body>Welcome</body></html>"
    html = b"HTTP/1.1 %d %s\r\nContent-Type: text/html\r\nContent-Length: %d\r\n\r\n%s"
    server = RawServer(_answers(*[html % (200, b"OK", len(page), page)] * 3,
                                html % (502, b"Bad Gateway", len(NGINX_502), NGINX_502)))
    try:
        with Client(server.url) as client:
            outcomes = _both(client, n=1)
            cli = CliRunner().invoke(app, ["predict", server.url, "-d", '{"n": 1}', "-o", str(tmp_path / "out.json")])
            with pytest.raises(NotReady) as bad_gateway:
                client.predict(n=1)
    finally:
        server.close()
    for outcome in outcomes:
        assert type(outcome) is EasyServeError and outcome.status is None  # no server refused it
        assert str(outcome) == (f"{server.url}/predict answered an HTML page ('Welcome to nginx!'): "
                                "is this an easyserve server?")
    assert cli.exit_code == 1 and "answered an HTML page" in cli.stderr and not (tmp_path / "out.json").exists()
    assert (bad_gateway.value.status, str(bad_gateway.value)) == (
        502, f"502 Bad Gateway (an HTML page from {server.url}/predict, not an easyserve answer)")


def test_a_200_of_another_kind_from_something_that_is_not_easyserve_is_no_answer():
    """A health-check sidecar's "OK", or bytes, at the wrong port were returned as the model's answer:
    only an HTML page was taken for another server's. An easyserve answer names its server, or carries
    its request's id where a proxy (Envoy) wrote its own Server header."""
    ok = b"HTTP/1.1 200 OK\r\nServer: envoy\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n%s"
    server = RawServer(_answers(ok % (b"text/plain", 2, b"", b"OK"), ok % (b"text/plain", 2, b"", b"OK"),
                                ok % (b"application/octet-stream", 2, b"", b"\0\1"),
                                ok % (b"application/octet-stream", 2, b"", b"\0\1"),
                                ok % (b"image/png", 3, b"X-Request-Id: abc\r\n", b"png")))
    try:
        with Client(server.url) as client:
            outcomes = _both(client, n=1) + _both(client, n=1) + _both(client, n=1)
    finally:
        server.close()
    said = f"{server.url}/predict answered %s with no mark of easyserve's: is this an easyserve server?"
    assert [str(outcome) for outcome in outcomes[:4]] == [said % "'text/plain'"] * 2 + [
        said % "'application/octet-stream'"] * 2
    assert all(type(outcome) is EasyServeError and outcome.status is None for outcome in outcomes[:4])
    assert outcomes[4:] == [b"png", b"png"]


def test_an_html_page_a_handle_answers_is_its_answer(serve):
    with serve("handles_for_tests:Thumbnail") as server, Client(server.url) as client:
        assert client.predict(w=4, h=4, **{"as": "html"}) == b"<html><head><title>a report</title></head></html>"


def test_a_query_string_in_the_url_goes_with_every_request_and_stays_out_of_messages():
    ok = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    server = RawServer(_answers(ok, ok, ok, b"HTTP/1.1 404 Not Found\r\nLocation: /x\r\nContent-Length: 0\r\n\r\n",
                                b"HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n"))
    try:
        with Client(f"{server.url}/models/x?token=abc&v=2") as client:
            assert client.url == f"{server.url}/models/x/predict?token=abc&v=2"
            assert _both(client, n=1) == [{}, {}]
        with Client(f"{server.url}/predict?token=abc") as client:
            client.predict(n=1)
            refused = _both(client, n=1)  # a 404, then a redirect: a token in the URL may be a secret
    finally:
        server.close()
    assert server.targets == ["/models/x/predict?token=abc&v=2"] * 2 + ["/predict?token=abc"] * 3
    assert all("token" not in str(error) for error in refused) and "a redirect to" in str(refused[1]), refused


def test_a_query_string_stays_out_of_the_message_of_a_server_that_closes_connections_at_once():
    """aiohttp's words for a request body it could not write name the URL, ``?token=...`` and all: the
    async call's error quoted them."""
    listener = raw_listener(socket.socket.close)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/?token=secret-token-42"
    errors = []
    try:
        for body in ({"n": 1}, b"\0" * (1 << 20)) * 4:  # a body too large to go before the close is seen
            with pytest.raises(NoAnswer) as caught_async:
                asyncio.run(Client(url, timeout=10).apredict(body))
            with pytest.raises(NoAnswer) as caught_blocking:
                Client(url, timeout=10).predict(body)
            errors += [str(caught_async.value), str(caught_blocking.value)]
    finally:
        listener.close()
    assert not [error for error in errors if "secret" in error], errors
    assert any("Can not write request body for http://127.0.0.1" in error for error in errors), errors


def test_a_call_left_running_as_its_async_with_block_ends_says_so_not_that_the_server_closed(serve):
    async def main(client):
        async with client:
            late = asyncio.create_task(client.apredict({"sleep": 0.5, "n": 1}))
            await asyncio.sleep(0.1)  # sent; the block ends before its answer, closing its connections
        with pytest.raises(NoAnswer) as caught:
            await late
        return str(caught.value)

    with serve("handles_for_tests:Misbehaving") as server:
        said = asyncio.run(main(Client(server)))
        assert said == (f"the request to {server.url}/predict was left unanswered: the `async with` block of the "
                        "client it was sent in ended before its answer came (await the calls a block starts before "
                        "it ends); the server may have run it")


def test_a_connection_out_on_a_request_as_the_client_is_closed_is_closed_when_answered(serve):
    with serve("handles_for_tests:Misbehaving") as server:
        with Client(server) as client:
            call = Background(lambda: client.predict({"sleep": 0.5, "n": 1}))
            wait_busy(server)
        # closed, its request under way: the connection that comes back is closed, not kept
        assert call.result() == {"ok": True, "echo": {"sleep": 0.5, "n": 1}}
        assert client._idle == []
        client.predict({"n": 2})  # a client closed may still be used, and keeps its new connections
        assert len(client._idle) == 1


def test_a_client_made_from_a_server_started_again_elsewhere_says_where_it_went(serve):
    with serve() as server:
        client = Client(server)
        first = server.url
        server.stop()
        server.start(timeout=60)  # Port 0: another port
        assert server.url != first
        with pytest.raises(NoAnswer) as caught:
            client.predict({"value": 1})
        assert str(caught.value).endswith(f"; the Server this client was made from now runs at {server.url}: a "
                                          "client keeps the URL it was made with; Client(server) again")
        assert Client(server).predict({"value": 1})["value"] == 1


def test_retry_after_is_kept_within_reason_and_read_as_an_http_date_too():
    in_two_minutes = email.utils.format_datetime(datetime.datetime.now(datetime.timezone.utc)
                                                 + datetime.timedelta(seconds=120), usegmt=True)
    values = ["inf", "nan", "-10", "1e12", "Wed, 21 Oct 2015 07:28:00 GMT", in_two_minutes, "soon", "7"]
    busy = (b"HTTP/1.1 %d Busy\r\nRetry-After: %s\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n"
            b'{"error":"busy"}')
    server = RawServer(_answers(*(busy % (503 if i % 2 else 429, v.encode()) for i, v in enumerate(values))))
    refused = []
    try:
        with Client(server.url) as client:
            for _ in values:
                with pytest.raises((Overloaded, NotReady)) as caught:
                    client.predict(n=1)
                refused.append(caught.value.retry_after)
    finally:
        server.close()
    assert refused[:5] == [3600.0, 1.0, 0.0, 3600.0, 0.0]  # inf, nan, below 0, far off, in the past
    assert 110 < refused[5] <= 120 and refused[6:] == [1.0, 7.0]


def test_small_things_a_file_a_npy_answer_and_a_numpy_scalar(tmp_path):
    damaged = b"\x93NUMPY garbage"
    server = RawServer(_answers(
        *[b"HTTP/1.1 200 OK\r\nContent-Type: application/x-npy\r\n%sContent-Length: %d\r\n\r\n%s"
          % (MARK, len(damaged), damaged)] * 2,
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"))
    (tmp_path / "body.json").write_text('{"x": ')
    try:
        with Client(server.url, npy=True) as client:
            outcomes = _both(client, n=1)
            assert client.predict(np.float32(3)) == {}  # a numpy scalar goes as the 0-d array it is
        cli = CliRunner().invoke(app, ["predict", server.url, str(tmp_path / "body.json")])
    finally:
        server.close()
    for outcome in outcomes:  # it was numpy's ValueError
        assert type(outcome) is EasyServeError
        assert str(outcome).startswith("the server answered 200 with a .npy body that cannot be read: .npy format")
    sent = np.load(io.BytesIO(server.bodies[2]), allow_pickle=False)
    assert (sent.shape, sent.dtype, sent.item()) == ((), np.float32, 3.0)
    # it said "--data is not valid JSON", of a file
    assert cli.exit_code == 1 and cli.stderr.startswith(f"{tmp_path / 'body.json'} is not valid JSON: Expecting value")


def test_two_async_with_blocks_at_once_each_keep_their_own_connections(serve):
    """The blocks of two tasks shared one attribute: the second's session, which the first closed as it
    ended, with the second's request in flight (run by the server, lost to the client), and the
    first's session was never closed."""
    with serve("handles_for_tests:Recorder", HandleArgs={"delay": 1.0}, MaxBatchSize=1, ProcessPerGPU=2) as server:
        client = Client(server.url)

        async def first():
            async with client:
                answer = await client.apredict(value=1)  # then leaves its block as the second's request runs
            return answer

        async def second():
            await asyncio.sleep(0.3)
            async with client:
                return await client.apredict(value=2)

        async def both():
            return await asyncio.gather(first(), second())

        answers = asyncio.run(both())
    assert [a["value"] for a in answers] == [1, 2]


def test_an_async_call_on_another_threads_loop_is_outside_a_block_open_on_this_one(serve):
    """A call from another thread's event loop used the session of a block open on this one: a bare
    RuntimeError (a future attached to a different loop), raised after its request had run."""
    with serve("handles_for_tests:Recorder") as server:
        client = Client(server.url)
        inside, other = threading.Event(), []

        async def hold():
            async with client:
                await client.apredict(value=1)
                inside.set()
                while not other:
                    await asyncio.sleep(0.05)
                return await client.apredict(value=3)

        holding = Background(lambda: asyncio.run(hold()))
        assert inside.wait(20)
        other.append(asyncio.run(client.apredict(value=2)))
        assert other[0]["value"] == 2 and holding.result(20)["value"] == 3


def test_a_refusal_sent_from_the_headers_alone_is_read_though_the_body_could_not_be_sent():
    """A proxy refuses a body too large (413) or a busy server (429) from the headers alone, and closes
    without reading the rest: the broken pipe as the body was sent lost the answer waiting in the
    socket, and the call said the server had closed the connection before the request was sent."""
    def refuse(connection: socket.socket) -> None:
        with connection, connection.makefile("rb") as reader:
            while reader.readline() not in (b"\r\n", b""):
                pass
            body = b'{"error": "body too large: the limit is 1 MB"}'
            connection.sendall(b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\n"
                               b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            time.sleep(0.1)

    import resource

    listener = socket.create_server(("127.0.0.1", 0))
    accepting = Background(lambda: [refuse(listener.accept()[0]) for _ in range(4)])
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list = []
    try:
        client = Client(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=20)
        for _ in range(3):  # async: the first way of streaming a large body read no answer after its broken pipe
            with pytest.raises(PayloadTooLarge, match="body too large: the limit is 1 MB"):
                asyncio.run(_settled(client.apredict(b"x" * (32 << 20))))
        # in a process with a descriptor past 1024, which select() refused (a ValueError); poll() does not
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(limits[0], min(4096, limits[1])), limits[1]))
        held = [open(os.devnull) for _ in range(1100)]
        with pytest.raises(PayloadTooLarge, match="body too large: the limit is 1 MB"):
            client.predict(b"x" * (32 << 20))
        accepting.result(20)
    finally:
        for file in held:
            file.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
        listener.close()


async def _settled(call):
    """``call``'s outcome, once the transports it closed have closed: ``asyncio.run`` ends its loop at once,
    and a TLS transport still closing then is an unclosed one (a ResourceWarning, which fails a test)."""
    try:
        return await call
    finally:
        await asyncio.sleep(0.2)


def test_a_failed_tls_handshake_is_said_as_one_not_as_a_server_that_closed_the_connection(tmp_path):
    import ssl

    import trustme

    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(tls)  # a CA the client does not know
    plain = socket.create_server(("127.0.0.1", 0))  # and a server that speaks no TLS

    def accept(listener: socket.socket, wrap: bool) -> None:
        connection = listener.accept()[0]
        with contextlib.suppress(OSError), (tls.wrap_socket(connection, server_side=True) if wrap else connection):
            connection.recv(1024)
            connection.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")  # to a TLS hello

    secure = socket.create_server(("127.0.0.1", 0))
    try:
        for listener, wrap in ((secure, True), (plain, False)):
            for call in (lambda c: c.predict(n=1), lambda c: asyncio.run(_settled(c.apredict(n=1)))):
                accepting = Background(lambda: accept(listener, wrap))
                client = Client(f"https://127.0.0.1:{listener.getsockname()[1]}", timeout=10)
                said = r"the TLS handshake with https://127\.0\.0\.1:\d+ failed \(.*"
                why = r"(CERTIFICATE_VERIFY_FAILED|WRONG_VERSION_NUMBER).*\): a server whose certificate"
                with pytest.raises(NoAnswer, match=said + why):
                    call(client)
                accepting.result(10)
    finally:
        secure.close()
        plain.close()


def test_a_tls_error_after_the_request_was_sent_is_a_connection_closed_whose_request_may_have_run(tmp_path):
    """Any TLS error was said as a failed handshake (a certificate to trust, or http:// to use), though
    the handshake had gone through and the request had been sent: it may have run. The calls run in a
    process of their own, told to trust the test's CA by SSL_CERT_FILE."""
    import ssl

    import trustme

    authority = trustme.CA()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(tls)
    authority.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    listener = socket.create_server(("127.0.0.1", 0))

    def garble() -> None:  # the request read, then a record no key decrypts, written past TLS on the socket
        for _ in range(2):
            secure = tls.wrap_socket(listener.accept()[0], server_side=True)
            with secure, socket.socket(fileno=os.dup(secure.fileno())) as raw:
                head = b""
                while b"\r\n\r\n" not in head:
                    head += secure.recv(65536)
                raw.sendall(b"\x17\x03\x03\x00\x10" + bytes(16))
                time.sleep(0.2)

    script = (f"import asyncio\nfrom easyserve import Client, NoAnswer\n"
              f"client = Client('https://127.0.0.1:{listener.getsockname()[1]}', timeout=10)\n"
              "for call in (lambda: client.predict(n=1), lambda: asyncio.run(client.apredict(n=1))):\n"
              "    try:\n        call()\n    except NoAnswer as exc:\n        print(exc)\n")
    answering = Background(garble)
    try:
        ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "SSL_CERT_FILE": str(tmp_path / "ca.pem")})
        said = ran.stdout.splitlines()
        assert len(said) == 2, (ran.stdout, ran.stderr)
        answering.result(10)
    finally:
        listener.close()
    for line in said:
        assert re.search(r"closed the connection without answering \(.*BAD_RECORD_MAC.*\); the request may have run",
                         line), line


def test_a_user_and_password_in_the_url_are_sent_by_both_ways_of_calling():
    """http://user:pass@host (a proxy's Basic authentication): the blocking call dropped them, aiohttp
    sent them; beside an api_key, aiohttp refused in its own words, and the blocking call sent the key."""
    server = RawServer(lambda connection, index: _ok(connection))
    try:
        url = server.url.replace("http://", "http://user:p%40ss@")
        client = Client(url)
        assert client.predict(n=1) == {"ok": True} and asyncio.run(client.apredict(n=2)) == {"ok": True}
        assert "user" not in repr(client) and "p%40ss" not in client._shown
        with pytest.raises(ValueError, match="a user and password in the URL and api_key too"):
            Client(url, api_key="key-1234567")
        os.environ["EASYSERVE_API_KEY"] = "key-1234567"  # the environment's default: the URL's own win
        try:
            assert Client(url)._headers["Authorization"].startswith("Basic ")
        finally:
            del os.environ["EASYSERVE_API_KEY"]
    finally:
        server.close()
    sent = base64.b64encode(b"user:p@ss").decode()
    assert server.requests == 2 and all(f"Authorization: Basic {sent}" in head for head in server.heads), server.heads


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
def test_cli_predict_says_when_standard_output_cannot_take_the_answer(serve):
    """A full disk (/dev/full) was a traceback, and a closed standard output exited 0 with the answer
    lost."""
    with serve() as server:
        command = f"easyserve predict {server.url} -d '{{\"value\": 1}}'"
        full = subprocess.run(["sh", "-c", command + " > /dev/full"], capture_output=True, text=True, timeout=60)
        closed = subprocess.run(["sh", "-c", command + " >&-"], capture_output=True, text=True, timeout=60)
    assert full.returncode == 1 and "cannot write the answer to standard output: No space left" in full.stderr
    assert "Traceback" not in full.stderr, full.stderr
    assert closed.returncode == 1 and "cannot write the answer to standard output: there is none" in closed.stderr, \
        closed.stderr


def _npy_answer(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    body = out.getvalue()
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/x-npy\r\n%sContent-Length: %d\r\n\r\n%s"
            % (MARK, len(body), body))


def test_cli_predict_writes_an_npy_answer_as_it_came(tmp_path):
    """An .npy answer (a handle's Binary, or a server answering arrays so) was a traceback, and with
    --output no file was written."""
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    server = RawServer(_answers(_npy_answer(array)))
    try:
        written = CliRunner().invoke(app, ["predict", server.url, "-d", '{"n": 1}', "-o", str(tmp_path / "a.npy")])
        piped = subprocess.run([sys.executable, "-m", "easyserve", "predict", server.url, "-d", '{"n": 1}'],
                               capture_output=True, timeout=60)
    finally:
        server.close()
    assert written.exit_code == 0, written.output
    assert np.array_equal(np.load(tmp_path / "a.npy"), array)
    assert piped.returncode == 0 and piped.stderr == b"", piped.stderr
    assert np.array_equal(np.load(io.BytesIO(piped.stdout)), array)  # to a pipe, as the bytes came


def test_cli_predict_reads_a_pipe_named_as_its_file(tmp_path):
    """`easyserve predict URL <(cmd)` and /dev/stdin on a pipe were "no file '/dev/fd/63' to send"."""
    server = RawServer(_answers(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"))
    try:
        done = subprocess.run([sys.executable, "-m", "easyserve", "predict", server.url, "/dev/stdin"],
                              input=b'{"x": [1, 2]}', capture_output=True, timeout=60)
    finally:
        server.close()
    assert done.returncode == 0, done.stderr
    assert json.loads(server.bodies[0]) == {"x": [1, 2]} and "application/json" in server.heads[0]


@pytest.mark.parametrize("status, kind", [(b"429 Too Many Requests", Overloaded), (b"500 Internal Server Error",
                                                                                    HandleError)])
def test_an_error_answer_cut_short_keeps_its_status_and_request_id(status, kind):
    """Its status line and headers whole, its body cut short: it was a NoAnswer "the request may have
    run", without its status or request id (for a 429, the server had refused the request)."""
    head = (b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: 100\r\nX-Request-Id: rid9\r\n"
            b"Retry-After: 1\r\n\r\n" % status)
    outcomes, _ = _both_against(_answers(head + b'{"error": "th', close=True))
    for outcome in outcomes:
        assert isinstance(outcome, kind), outcome
        assert outcome.status == int(status[:3]) and outcome.request_id == "rid9", outcome


def test_a_compressed_answer_the_client_did_not_ask_for_is_read_alike_blocking_or_async():
    """The blocking client sends Accept-Encoding: identity, yet a server or proxy may compress all the
    same: its gzip bytes were "a body that is not JSON", an error's message garbled, and a binary
    answer returned still compressed, as if it were the answer; the async client inflated each."""
    import gzip

    def gzipped(status: bytes, content_type: bytes, body: bytes) -> bytes:
        packed = gzip.compress(body)
        return (b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Encoding: gzip\r\n%sContent-Length: %d\r\n\r\n%s"
                % (status, content_type, MARK, len(packed), packed))

    for answer, expected in ((gzipped(b"200 OK", b"application/json", b'{"ok": 1}'), {"ok": 1}),
                             (gzipped(b"200 OK", b"image/png", b"\x89PNG-ish"), b"\x89PNG-ish")):
        outcomes, _ = _both_against(_answers(answer))
        assert outcomes == [expected, expected], outcomes
    outcomes, _ = _both_against(_answers(gzipped(b"500 Internal Server Error", b"application/json",
                                                 b'{"error": "zipped"}')))
    assert [str(outcome) for outcome in outcomes] == ["zipped", "zipped"], outcomes
    brotli = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: br\r\nContent-Length: 2\r\n\r\n{}"
    server = RawServer(_answers(brotli))
    try:
        with pytest.raises(EasyServeError, match="in Content-Encoding 'br', which this client cannot read"):
            Client(server.url).predict(n=1)
    finally:
        server.close()


def test_an_answer_cut_off_in_its_headers_is_no_answer_not_an_empty_one():
    """http.client takes the end of the stream for the end of the head: ``predict`` returned ``b""`` for a
    200 whose connection closed in the middle of its headers, a prediction that never came."""
    for cut in (b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n", b"HTTP/1.1 200 OK\r\nContent-Ty"):
        outcomes, _ = _both_against(_answers(cut, close=True))
        for outcome in outcomes:
            assert isinstance(outcome, NoAnswer) and "the request may have run" in str(outcome), (cut, outcome)


def test_a_connection_switched_away_from_http_is_not_used_again():
    """After a 101 the stream is no longer HTTP's: kept for the next call, the connection took its request
    and the call waited out its whole timeout."""
    let_go = threading.Event()

    def behave(connection: socket.socket, index: int) -> bool:
        if index == 0:
            connection.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n")
            let_go.wait(30)  # holding the switched stream open, reading nothing more from it
            return False
        return _ok(connection)

    server = RawServer(behave)
    try:
        with Client(server.url, timeout=5) as client:
            with pytest.raises(EasyServeError) as switched:
                client.predict(n=1)
            assert client.predict(n=2) == {"ok": True}
    finally:
        let_go.set()
        server.close()
    assert vars(switched.value).get("status") == 101


def test_a_redirect_to_no_url_is_an_easyserve_error_naming_it():
    raw = b"HTTP/1.1 307 X\r\nLocation: http://[bad/\r\nContent-Length: 0\r\n\r\n"
    outcomes, _ = _both_against(_answers(raw))
    for outcome in outcomes:  # a bare ValueError ("Invalid IPv6 URL"), where every error is an EasyServeError
        assert isinstance(outcome, EasyServeError) and "a redirect to http://[bad/" in str(outcome), outcome
        assert outcome.status == 307


def test_a_compressed_answer_past_max_answer_mb_is_refused_holding_about_the_bound():
    """Inflated in one call up to the bound, zlib grew its buffer to twice it: 4 MB of gzip that inflate to
    4 GB took 2.1 GB to refuse at the default 1 GiB."""
    import zlib

    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(2**20)
    bomb = b"".join(packer.compress(zeros) for _ in range(1024)) + packer.flush()  # 1 GB in about 1 MB
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Encoding: gzip\r\n"
            b"Content-Length: %d\r\n\r\n" % len(bomb))
    server = RawServer(_answers(head + bomb))
    script = (  # the peak of resident memory (VmHWM) over what was resident as the call began (VmRSS)
        "import sys\n"
        "from easyserve import Client, EasyServeError\n"
        "def kb(field):\n"
        "    return int(open('/proc/self/status').read().split(field + ':')[1].split()[0])\n"
        "client = Client(sys.argv[1], max_answer_mb=256)\n"
        "before = kb('VmRSS')\n"
        "try:\n"
        "    client.predict(n=1)\n"
        "except EasyServeError as exc:\n"
        "    print(exc)\n"
        "print((kb('VmHWM') - before) // 1024)\n"
    )
    try:
        done = subprocess.run([sys.executable, "-c", script, server.url], capture_output=True, text=True, timeout=60)
    finally:
        server.close()
    said, grew = done.stdout.splitlines()
    assert "answered more than max_answer_mb=256 MB" in said, done
    assert int(grew) < 1.4 * 256, done.stdout  # MB: about the bound (twice it before)


def test_cli_predict_takes_a_larger_answer_bound_and_names_it_where_an_answer_is_past_it(capsys):
    from easyserve.predict_cli import run_predict

    server = RawServer(lambda connection, index: _ok(connection, b'{"x": "%s"}' % (b"a" * 3000)))
    try:
        refused = run_predict(server.url, None, '{"n": 1}', max_answer_mb=0.001)
        said = capsys.readouterr().err
        taken = run_predict(server.url, None, '{"n": 1}', max_answer_mb=0.01)
        printed = capsys.readouterr().out
        unbounded = run_predict(server.url, None, '{"n": 1}', max_answer_mb=float("inf"))  # an OverflowError
    finally:
        server.close()
    assert refused == 1 and "answered more than max_answer_mb=0.001 MB" in said and "--max-answer-mb MB" in said
    assert taken == 0 and json.loads(printed) == {"x": "a" * 3000} and unbounded == 0
    bad = CliRunner().invoke(app, ["predict", server.url, "-d", "{}", "--max-answer-mb", "0"])
    assert bad.exit_code == 2 and "--max-answer-mb: expected megabytes above 0, got 0" in bad.output


def test_a_gzip_answer_cut_short_is_refused_and_one_of_several_members_is_read_whole():
    """A gzip answer cut short (its Content-Length honest about what was sent) was returned short by the
    blocking client, a binary answer missing its end; and of a gzip of several members (concatenated,
    as RFC 1952 allows and some proxies write), only the first was read."""
    import gzip

    def answer(packed: bytes) -> bytes:
        return (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Encoding: gzip\r\n%s"
                b"Content-Length: %d\r\n\r\n%s" % (MARK, len(packed), packed))

    payload = bytes(range(256)) * 400
    whole = gzip.compress(payload)
    outcomes, _ = _both_against(_answers(answer(whole[:len(whole) // 2])))
    for outcome in outcomes:
        assert isinstance(outcome, EasyServeError) and "gzip" in str(outcome), outcome
    outcomes, _ = _both_against(_answers(answer(gzip.compress(payload[:1000]) + gzip.compress(payload[1000:]))))
    assert outcomes == [payload, payload], [len(o) if isinstance(o, bytes) else o for o in outcomes]
    for after in (b"\0" * 8, b"\n"):  # what follows the last member and is none: left, as Python's gzip leaves it
        outcomes, _ = _both_against(_answers(answer(whole + after)))
        assert outcomes == [payload, payload], [len(o) if isinstance(o, bytes) else o for o in outcomes]


@pytest.mark.parametrize("size", [b"f" * 24, b"-1"], ids=["past 64 bits", "negative"])
def test_a_chunk_size_past_64_bits_is_not_http_at_once_blocking_or_async(size):
    """Read as a length, a chunk-size line of 24 hex digits had the blocking client wait out its whole
    timeout for the data (and -1, read to the end); aiohttp's parser said at once that it was no HTTP."""
    raw = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
           + size + b"\r\n{}")
    server = RawServer(_answers(raw))
    try:
        with Client(server.url, timeout=20) as client:
            began = time.monotonic()
            outcomes = _both(client, n=1)
            took = time.monotonic() - began
    finally:
        server.close()
    for outcome in outcomes:
        assert isinstance(outcome, EasyServeError) and "not HTTP" in str(outcome), outcome
    assert took < 10, took  # not the timeout (20 s), which the blocking call waited out


def test_an_interrupted_call_says_so_in_a_few_lines_not_http_clients_frames():
    """A cell interrupted while it waited for an answer showed 65 lines of socket and http.client frames
    and an empty message; the client stays usable after it."""
    let_go = threading.Event()

    def behave(connection: socket.socket, index: int) -> bool:
        if index == 0:
            let_go.wait(30)  # never answers the first request
            return False
        return _ok(connection)

    server = RawServer(behave)
    script = ("import sys\nfrom easyserve import Client\nclient = Client(sys.argv[1])\n"
              "try:\n    client.predict(n=1)\nexcept KeyboardInterrupt:\n    print(client.predict(n=2))\n    raise\n")
    try:
        proc = subprocess.Popen([sys.executable, "-c", script, server.url], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        wait_until(lambda: server.requests, what="the request to arrive")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        let_go.set()
        server.close()
    assert out.strip() == "{'ok': True}", (out, err)
    assert err.rstrip().endswith(f"KeyboardInterrupt: the request to {server.url}/predict was left unanswered: "
                                 "the server may still run it"), err
    assert "http/client.py" not in err and "socket.py" not in err and len(err.splitlines()) < 12, err


def test_a_cancelled_async_call_says_so_without_aiohttps_frames():
    """A notebook cell awaiting apredict, interrupted, showed aiohttp's 5 kB of frames under a bare
    CancelledError; predict's interrupt says one line. The cancellation itself is asyncio's, as it was."""
    import traceback

    let_go = threading.Event()

    def behave(connection: socket.socket, index: int) -> bool:
        let_go.wait(30)  # never answers
        return False

    server = RawServer(behave)

    async def cancelled() -> BaseException:
        task = asyncio.ensure_future(Client(server.url).apredict(n=1))
        await asyncio.sleep(0.5)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError as exc:
            return exc
        raise AssertionError("not cancelled")

    try:
        exc = asyncio.run(cancelled())
    finally:
        let_go.set()
        server.close()
    shown = "".join(traceback.format_exception(exc))
    assert "aiohttp" not in shown and len(shown.splitlines()) < 12, shown
    if sys.version_info >= (3, 11):
        assert f"the request to {server.url}/predict was left unanswered: the server may still run it" in shown, shown
