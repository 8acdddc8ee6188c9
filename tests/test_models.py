"""easyserve.models: downloads against a local HTTP server (never the internet), the commands, model lookup."""

from __future__ import annotations

import hashlib
import http.server
import errno
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import free_port, raw_listener, wait_until

from easyserve import ChecksumError, DownloadError, WriteError, downloads, models, standins
from easyserve.cli import app
from easyserve.models import ZOO

PAYLOAD = np.random.default_rng(7).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class FileServer(http.server.ThreadingHTTPServer):
    """Serves ``files`` on 127.0.0.1, honouring Range, with faults to order: ``drop_after`` bytes cut the
    first ``drops`` answers short; ``fail`` answers 503 that many times first; ``ignore_range`` sends the
    whole file even when asked for a part; ``misrange`` answers that many Range requests with the part
    from byte 0; ``no_length`` sends no Content-Length (the body ends as the connection closes);
    ``trickle_s`` sends a byte at a time, that long apart; ``slow_s`` waits that long before the body;
    ``head_trickle_s`` sends the headers a byte at a time, that long apart, one of them 400 bytes long;
    ``chunk_cut`` sends the body chunked and closes the connection in its first chunk; ``last_apart``
    sends the body's last bytes, that many, 0.2 s after the rest; ``then`` is what the file becomes once
    an answer is cut short (a new version put in its place); ``retry_after`` is the Retry-After of a
    503. A Range past the end is a 416 that says the file's size, as RFC 9110 has it.
    ``requests`` records (path, Range header) of each request."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _FileHandler)
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.drop_after: int | None = None
        self.drops = 0
        self.fail = 0
        self.ignore_range = False
        self.misrange = 0
        self.no_length = False
        self.trickle_s = 0.0
        self.slow_s = 0.0
        self.head_trickle_s = 0.0
        self.chunk_cut = False
        self.redirects: dict[str, str] = {}  # path: where a 302 sends it
        self.last_apart = 0  # the body's last bytes, this many, sent 0.2 s after the rest
        self.then: bytes | None = None  # the file's next version, in place once an answer is cut short
        self.retry_after: str | None = None
        self.content_type: str | None = None  # the answers' Content-Type, if any
        self.etags = False  # an ETag with each answer (the body's hash), and a Range kept only with an If-Range of it
        self.if_ranges: list[str | None] = []  # the If-Range header of each request

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _FileHandler(http.server.BaseHTTPRequestHandler):
    server: FileServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        if srv.head_trickle_s:
            self.close_connection = True
            self._trickle(b"HTTP/1.1 200 OK\r\nX-Padding: " + b"x" * 400 + b"\r\nContent-Length: 0\r\n\r\n",
                          srv.head_trickle_s)
            return
        if srv.fail > 0:
            srv.fail -= 1
            self._reply(503, b"busy", {"Retry-After": srv.retry_after} if srv.retry_after else {})
            return
        if self.path in srv.redirects:
            self.send_response(302)
            self.send_header("Location", srv.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = srv.files.get(self.path)
        if body is None:
            self._reply(404, b"no such file")
            return
        if srv.chunk_cut:
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"%x\r\n" % len(body) + body[:len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        start = 0
        wanted = self.headers.get("Range")
        etag = f'"{hashlib.sha256(body).hexdigest()[:16]}"'
        srv.if_ranges.append(self.headers.get("If-Range"))
        if srv.etags and self.headers.get("If-Range") not in (None, etag):  # replaced since: sent whole
            wanted = None
        if wanted and not srv.ignore_range:
            start = int(wanted.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        partial = bool(start)
        if partial and srv.misrange > 0:
            srv.misrange -= 1
            start = 0
        self.send_response(206 if partial else 200)
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        if srv.content_type:
            self.send_header("Content-Type", srv.content_type)
        if srv.etags:
            self.send_header("ETag", etag)
        if srv.no_length:
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        time.sleep(srv.slow_s)
        if srv.trickle_s:
            self._trickle(body[start:], srv.trickle_s)
            return
        if srv.drop_after is not None and srv.drops > 0:
            srv.drops -= 1
            self.wfile.write(body[start:start + srv.drop_after])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)  # the connection drops mid-body
            if srv.then is not None:
                srv.files[self.path] = srv.then
            return
        if srv.last_apart:
            self.wfile.write(body[start:-srv.last_apart])
            self.wfile.flush()
            time.sleep(0.2)
            body, start = body[-srv.last_apart:], 0
        self.wfile.write(body[start:])

    def _trickle(self, data: bytes, pause_s: float) -> None:
        """``data`` a byte at a time, ``pause_s`` apart, until the client gives up."""
        try:
            for byte in data:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(pause_s)
        except OSError:  # the client gave up
            pass

    def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def file_server() -> Iterator[FileServer]:
    server = FileServer()
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def get(server: FileServer, dest: Path, path: str = "/m.onnx", **kwargs) -> str:
    server.files["/m.onnx"] = PAYLOAD
    kwargs.setdefault("backoff", 0.01)
    return models.download(server.url + path, dest, **kwargs)


# -- download ----------------------------------------------------------------------------------------


def test_download_checks_size_and_sha256_and_reports_progress(file_server, tmp_path):
    seen = []
    digest = get(file_server, tmp_path / "m.onnx", sha256=PAYLOAD_SHA, size=len(PAYLOAD),
                 progress=lambda done, total: seen.append((done, total)))
    assert digest == PAYLOAD_SHA
    assert (tmp_path / "m.onnx").read_bytes() == PAYLOAD
    assert not (tmp_path / "m.onnx.part").exists()
    assert seen[0] == (0, len(PAYLOAD)) and seen[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)


def test_a_dropped_connection_resumes_from_the_bytes_already_there(file_server, tmp_path):
    file_server.drop_after, file_server.drops = 100_000, 2
    get(file_server, tmp_path / "m.onnx", sha256=PAYLOAD_SHA)
    assert (tmp_path / "m.onnx").read_bytes() == PAYLOAD
    assert [r for _, r in file_server.requests] == [None, "bytes=100000-", "bytes=200000-"]


def test_a_server_that_ignores_ranges_gets_the_whole_file_again(file_server, tmp_path):
    file_server.drop_after, file_server.drops, file_server.ignore_range = 100_000, 1, True
    get(file_server, tmp_path / "m.onnx", sha256=PAYLOAD_SHA)
    assert (tmp_path / "m.onnx").read_bytes() == PAYLOAD
    assert len(file_server.requests) == 2


def test_a_part_other_than_the_one_asked_for_is_not_appended(file_server, tmp_path):
    file_server.drop_after, file_server.drops, file_server.misrange = 100_000, 1, 1
    get(file_server, tmp_path / "m.onnx", sha256=PAYLOAD_SHA)
    assert (tmp_path / "m.onnx").read_bytes() == PAYLOAD
    assert [r for _, r in file_server.requests] == [None, "bytes=100000-", None]


@pytest.mark.parametrize("planted", [".part", ".lock"])
def test_a_download_writes_through_no_link_someone_put_in_its_place(file_server, tmp_path, planted):
    """In a shared models folder, another user's FILE.part linked to a file of the fetching user's had the
    model appended to it, and a FILE.lock link created the file it named; both links were then removed."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "rc").write_text("one line of the user's own\n")
    shared = tmp_path / "shared"
    shared.mkdir()
    link = shared / f"m.onnx{planted}"
    link.symlink_to(victim / ("rc" if planted == ".part" else "made_by_fetch"))
    with pytest.raises(DownloadError, match=f"m.onnx{planted} is a symbolic link: a download writes through none"):
        get(file_server, shared / "m.onnx", sha256=PAYLOAD_SHA)
    assert (victim / "rc").read_text() == "one line of the user's own\n" and not (victim / "made_by_fetch").exists()
    assert link.is_symlink() and not (shared / "m.onnx").exists()  # left for its owner to see
    # one that comes between the check and the opening is not written through either
    link.unlink()
    part = shared / "m.onnx.part"
    part.symlink_to(victim / "rc")
    with pytest.raises(DownloadError, match="is a symbolic link"), downloads._writing(part, "ab"):
        pass
    assert (victim / "rc").read_text() == "one line of the user's own\n"


def test_a_redirect_is_followed_to_http_only(file_server, tmp_path):
    file_server.redirects["/moved.onnx"] = "/m.onnx"
    get(file_server, tmp_path / "m.onnx", sha256=PAYLOAD_SHA, path="/moved.onnx")
    assert (tmp_path / "m.onnx").read_bytes() == PAYLOAD
    with socket.socket() as listener:  # an FTP server the redirect names, which is never asked
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.5)
        elsewhere = f"ftp://127.0.0.1:{listener.getsockname()[1]}/m.onnx"
        file_server.redirects["/ftp.onnx"] = elsewhere
        with pytest.raises(DownloadError, match=f"redirects to {elsewhere}, and a download follows redirects to "
                                                "http:// and https:// only"):
            get(file_server, tmp_path / "other.onnx", path="/ftp.onnx")
        with pytest.raises(socket.timeout):
            listener.accept()
    assert not (tmp_path / "other.onnx").exists()
    file_server.redirects["/loop.onnx"] = "/loop.onnx"  # urllib's word for it was three lines
    with pytest.raises(DownloadError) as raised:
        get(file_server, tmp_path / "loop.onnx", path="/loop.onnx")
    assert str(raised.value) == (f"cannot download {file_server.url}/loop.onnx: HTTP 302 The HTTP server returned a "
                                 "redirect error that would lead to an infinite loop."), str(raised.value)


def test_server_errors_are_retried_then_reported(file_server, tmp_path):
    file_server.fail = 2
    get(file_server, tmp_path / "m.onnx", sha256=PAYLOAD_SHA, retries=2)
    assert (tmp_path / "m.onnx").read_bytes() == PAYLOAD

    file_server.fail = 10
    with pytest.raises(DownloadError, match=r"HTTP 503.*tried 2 times"):
        get(file_server, tmp_path / "other.onnx", retries=1)
    assert not (tmp_path / "other.onnx").exists()


def test_a_server_that_asks_to_be_retried_later_is_retried_no_sooner(file_server, tmp_path, monkeypatch):
    # its Retry-After was not read: a rate-limited host was asked again after the backoff's 1 s and 2 s
    waits: list[float] = []  # the download's, and the file server's own sleeps of 0 s between
    monkeypatch.setattr(downloads.time, "sleep", lambda seconds: seconds and waits.append(seconds))
    file_server.fail, file_server.retry_after = 2, "7"
    get(file_server, tmp_path / "m.onnx", sha256=PAYLOAD_SHA, retries=2)
    assert waits == [7, 7]
    waits.clear()
    file_server.fail, file_server.retry_after = 1, "86400"  # a day: up to MAX_RETRY_AFTER_S
    get(file_server, tmp_path / "other.onnx", sha256=PAYLOAD_SHA, retries=1)
    assert waits == [downloads.MAX_RETRY_AFTER_S]


def test_a_download_resumed_onto_another_version_of_the_file_starts_again(file_server, tmp_path):
    """The file changed between a dropped answer and the retry's Range request: the part held the start
    of one version and the end of another, and only a part left by an earlier run was downloaded again."""
    old = bytes(reversed(PAYLOAD))  # an older version of the file, of the same size
    file_server.files["/m.onnx"] = old
    file_server.drop_after, file_server.drops, file_server.then = 40_000, 1, PAYLOAD
    assert models.download(file_server.url + "/m.onnx", tmp_path / "m.onnx", sha256=PAYLOAD_SHA,
                           backoff=0.01) == PAYLOAD_SHA
    assert (tmp_path / "m.onnx").read_bytes() == PAYLOAD
    assert [r for _, r in file_server.requests] == [None, "bytes=40000-", None]


def test_a_resume_asks_for_the_rest_of_the_file_it_began_and_gets_a_new_version_whole(file_server, tmp_path):
    """The file replaced between a dropped answer and the retry's Range request, no hash given: the part held
    the start of one version and the end of the other, kept as the file. The Range goes with an If-Range
    of the file's ETag, which a server that has another version answers with the whole of it."""
    file_server.etags = True
    file_server.files["/m.onnx"] = bytes(reversed(PAYLOAD))
    file_server.drop_after, file_server.drops, file_server.then = 40_000, 1, PAYLOAD
    assert models.download(file_server.url + "/m.onnx", tmp_path / "m.onnx", backoff=0.01) == PAYLOAD_SHA
    assert (tmp_path / "m.onnx").read_bytes() == PAYLOAD
    old_etag = f'"{hashlib.sha256(bytes(reversed(PAYLOAD))).hexdigest()[:16]}"'
    assert [r for _, r in file_server.requests] == [None, "bytes=40000-"] and file_server.if_ranges == [None, old_etag]
    # the same version: the rest of it, appended
    file_server.requests.clear()
    file_server.drop_after, file_server.drops, file_server.then = 40_000, 1, None
    assert models.download(file_server.url + "/m.onnx", tmp_path / "again.onnx", backoff=0.01) == PAYLOAD_SHA
    assert [r for _, r in file_server.requests] == [None, "bytes=40000-"]


def test_without_a_hash_a_part_left_by_an_earlier_run_is_not_resumed_from(file_server, tmp_path):
    """A killed download's part held the start of one version; the server had another since: the resume
    joined the two, and with no hash to check, kept that as the file."""
    (tmp_path / "m.onnx.part").write_bytes(bytes(reversed(PAYLOAD))[:40_000])
    assert get(file_server, tmp_path / "m.onnx") == PAYLOAD_SHA
    assert (tmp_path / "m.onnx").read_bytes() == PAYLOAD and file_server.requests == [("/m.onnx", None)]


PROXIED = """
import sys
from easyserve.downloads import DownloadError, download
try:
    download(sys.argv[1], sys.argv[2], retries=int(sys.argv[3]), backoff=0.01, timeout=5)
except DownloadError as exc:
    print(exc)
"""


def test_a_failure_through_a_proxy_names_the_proxy_and_its_refusal_is_not_retried(tmp_path):
    """Through HTTPS_PROXY, a refused connection was said of the server, which the operator then looked
    into, and the proxy's 407 to https's CONNECT was retried like a dropped connection."""
    asked = []

    def refuse(connection: socket.socket) -> None:
        with connection:
            asked.append(connection.recv(4096).split(b"\r\n")[0])
            connection.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")

    proxy = raw_listener(refuse)
    port = proxy.getsockname()[1]
    env = {name: value for name, value in os.environ.items() if "proxy" not in name.lower()}
    env["HTTPS_PROXY"] = f"http://user:secret@127.0.0.1:{port}"
    env["HTTP_PROXY"] = "http://127.0.0.1:9"  # nothing listens there
    try:
        said = [subprocess.run([sys.executable, "-c", PROXIED, url, str(tmp_path / "m.onnx"), "2"], env=env,
                               capture_output=True, text=True, timeout=60).stdout.strip()
                for url in ("https://models.example/m.onnx", "http://models.example/m.onnx")]
    finally:
        proxy.close()
    assert said[0] == ("cannot download https://models.example/m.onnx: OSError: Tunnel connection failed: 407 Proxy "
                       f"Authentication Required (through the proxy http://127.0.0.1:{port}, from HTTPS_PROXY)")
    # once: a refusal, not a dropped connection
    assert [line.rsplit(b" ", 1)[0] for line in asked] == [b"CONNECT models.example:443"]
    assert said[1].startswith("cannot download http://models.example/m.onnx: ConnectionRefusedError: ")
    assert said[1].endswith("(through the proxy http://127.0.0.1:9, from HTTP_PROXY) (tried 3 times)"), said[1]


def test_a_missing_file_is_not_retried(file_server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        models.download(file_server.url + "/nothing.onnx", tmp_path / "m.onnx", retries=3, backoff=0.01)
    assert len(file_server.requests) == 1


def open_sockets() -> int:
    """How many sockets this process has open."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except FileNotFoundError:  # the descriptor listdir itself used
            pass
    return count


def test_a_refused_download_leaves_no_connection_open(file_server, tmp_path):
    # The HTTP error is also the response and holds its socket until closed. Left open, the socket lives
    # as long as the error (a traceback keeps it, or a reference cycle until some later garbage
    # collection), and closing it then raises ResourceWarning in whatever code happens to be running.
    before = open_sockets()
    with pytest.raises(DownloadError, match="HTTP 404") as caught:  # ``caught`` keeps the error and its context
        models.download(file_server.url + "/m.onnx", tmp_path / "m.onnx", retries=1, backoff=0.01)
    deadline = time.monotonic() + 3  # the file server's side closes once it sees the client's close
    while open_sockets() > before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert open_sockets() == before, f"a refused download left its connection open ({caught.value})"


def test_a_wrong_checksum_keeps_no_file(file_server, tmp_path):
    with pytest.raises(ChecksumError, match="SHA-256 is .*expected 0000"):
        get(file_server, tmp_path / "m.onnx", sha256="0" * 64)
    with pytest.raises(ChecksumError, match="the server sends 300000 bytes, expected 12"):
        get(file_server, tmp_path / "m.onnx", size=12)
    assert list(tmp_path.iterdir()) == []


def test_a_stale_partial_file_is_replaced_by_a_fresh_download(file_server, tmp_path):
    # a .part left by an interrupted download of another version of the file
    (tmp_path / "m.onnx.part").write_bytes(b"x" * 1000)
    get(file_server, tmp_path / "m.onnx", sha256=PAYLOAD_SHA)
    assert (tmp_path / "m.onnx").read_bytes() == PAYLOAD
    assert [r for _, r in file_server.requests] == ["bytes=1000-", None]


def test_more_bytes_than_the_file_has_are_refused_as_they_come(file_server, tmp_path):
    """Without a size to stop at, a server sending without end filled the disk (2 GB in 8 s for a
    47 MB model); one that announced 10**15 bytes was believed."""
    file_server.no_length = True
    file_server.files["/m.onnx"] = PAYLOAD * 4
    with pytest.raises(ChecksumError, match=f"the server sent more than the {len(PAYLOAD)} bytes expected"):
        models.download(file_server.url + "/m.onnx", tmp_path / "m.onnx", size=len(PAYLOAD), retries=0)
    file_server.no_length = False
    with pytest.raises(ChecksumError, match=f"the server sends {len(PAYLOAD) * 4} bytes, expected {len(PAYLOAD)}"):
        models.download(file_server.url + "/m.onnx", tmp_path / "m.onnx", size=len(PAYLOAD), retries=0)
    assert list(tmp_path.iterdir()) == []


def test_without_a_size_the_download_stops_at_max_bytes(file_server, tmp_path):
    """With no size to stop at, an endless body was written until the disk was full (75 GB)."""
    file_server.files["/m.onnx"] = PAYLOAD * 4
    file_server.no_length = True  # the body ends only when the server stops sending
    with pytest.raises(DownloadError, match="the server sent more than the 500000 bytes allowed"):
        models.download(file_server.url + "/m.onnx", tmp_path / "m.onnx", max_bytes=500_000, retries=0)
    file_server.no_length = False  # announced: refused before a byte is written
    with pytest.raises(DownloadError, match=f"the server sends {len(PAYLOAD) * 4} bytes, over the 500000 allowed"):
        models.download(file_server.url + "/m.onnx", tmp_path / "m.onnx", max_bytes=500_000, retries=0)
    assert list(tmp_path.iterdir()) == []
    assert downloads.DEFAULT_MAX_BYTES < 2**40  # there is a cap even when none is given


def test_the_download_stops_before_the_disk_is_full(file_server, tmp_path, monkeypatch):
    """Free space is checked as the bytes come, not only at the start: a file system that other
    writers fill too, and a body of unknown length, are both stopped while a margin is left."""
    file_server.files["/m.onnx"] = PAYLOAD
    file_server.no_length = True
    part = tmp_path / "m.onnx.part"
    # a small disk (simulated): 10 MB free less what the download wrote, and 9.9 MB to be kept free
    monkeypatch.setattr(downloads, "MIN_FREE_BYTES", 9_900_000)
    monkeypatch.setattr(downloads, "_free_bytes", lambda _: 10_000_000 - (part.stat().st_size if part.exists() else 0))
    stopped = r"MB free on .*: stopped to keep 9\.9 MB free; the partial download was removed"
    with pytest.raises(DownloadError, match=stopped):
        models.download(file_server.url + "/m.onnx", tmp_path / "m.onnx", retries=3, backoff=0.01)
    assert list(tmp_path.iterdir()) == []
    assert len(file_server.requests) == 1  # not the server's fault: not retried
    file_server.no_length = False  # announced: refused before a byte is written
    with pytest.raises(DownloadError, match=f"{len(PAYLOAD) / 1e6:.1f} MB still to come"):
        models.download(file_server.url + "/m.onnx", tmp_path / "m.onnx", retries=0)
    assert list(tmp_path.iterdir()) == []


def test_a_disk_found_full_as_the_bytes_are_written_keeps_no_part(file_server, tmp_path, monkeypatch):
    """A quota or a network file system that the free-space check does not see: the write fails, and the
    part, kept to resume from, held the disk full."""
    real = os.fdopen

    class Full:  # a part's file on a disk that fills after 1,000 bytes
        def __init__(self, out) -> None:
            self.out, self.written = out, 0

        def write(self, chunk: bytes) -> int:
            if self.written + len(chunk) > 1000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.written += len(chunk)
            return self.out.write(chunk)

        def __getattr__(self, name: str):
            return getattr(self.out, name)

    def fdopen(fd: int, *args, **kwargs):
        out = real(fd, *args, **kwargs)
        return Full(out) if os.readlink(f"/proc/self/fd/{fd}").endswith(".part") else out

    monkeypatch.setattr(os, "fdopen", fdopen)
    removed = r"m\.onnx\.part: No space left on device; the partial download was removed"
    with pytest.raises(DownloadError, match=removed):
        get(file_server, tmp_path / "m.onnx", retries=3)
    assert list(tmp_path.iterdir()) == [] and len(file_server.requests) == 1


def test_a_web_page_answered_in_place_of_the_file_is_refused(file_server, tmp_path):
    """A sign-in page, or an error page answered 200, was kept as the model where no size or hash was given."""
    file_server.content_type = "text/html; charset=utf-8"
    with pytest.raises(DownloadError, match=r"the server answered a web page \(text/html\), not the file"):
        get(file_server, tmp_path / "m.onnx", retries=3)
    assert list(tmp_path.iterdir()) == [] and len(file_server.requests) == 1  # not retried
    # where a hash or size tells the file from a page, a store that labels its files text/html is served
    assert get(file_server, tmp_path / "m.onnx", sha256=PAYLOAD_SHA) == PAYLOAD_SHA
    (tmp_path / "m.onnx").unlink()
    assert get(file_server, tmp_path / "m.onnx", size=len(PAYLOAD)) == PAYLOAD_SHA


def test_two_downloads_of_one_file_at_once_make_one_download(file_server, tmp_path):
    """Two `easyserve models fetch` at once wrote into one .part over each other, and both failed."""
    file_server.slow_s = 0.5
    results: list = []

    def fetch() -> None:
        try:
            results.append(get(file_server, tmp_path / "m.onnx", sha256=PAYLOAD_SHA, size=len(PAYLOAD)))
        except Exception as exc:  # the assertion shows it
            results.append(exc)

    both = [threading.Thread(target=fetch) for _ in range(2)]
    for thread in both:
        thread.start()
        time.sleep(0.1)
    for thread in both:
        thread.join(30)
    assert results == [PAYLOAD_SHA, PAYLOAD_SHA]
    assert len(file_server.requests) == 1  # the second found the first's file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_without_a_hash_a_file_already_there_is_downloaded_again(file_server, tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"an older one")  # nothing says it is the file asked for
    assert get(file_server, tmp_path / "m.onnx") == PAYLOAD_SHA
    assert (tmp_path / "m.onnx").read_bytes() == PAYLOAD


def test_the_file_in_place_in_a_folder_where_no_lock_can_be_made_is_found(file_server, tmp_path):
    """Models baked into an image, its file system read-only: the file asked for was there, but its lock
    could not be made, and every worker's setup failed ("cannot write in ...")."""
    (tmp_path / "m.onnx").write_bytes(PAYLOAD)
    (tmp_path / "m.onnx.lock").mkdir()  # no lock file can be made there, as in a read-only folder
    assert get(file_server, tmp_path / "m.onnx", sha256=PAYLOAD_SHA) == PAYLOAD_SHA
    assert file_server.requests == []
    (tmp_path / "m.onnx").write_bytes(b"an older one")  # not it: downloading it needs the lock, and says so
    with pytest.raises(DownloadError, match="cannot write in"):
        get(file_server, tmp_path / "m.onnx", sha256=PAYLOAD_SHA)


def test_a_file_that_cannot_be_written_here_is_not_asked_for_again(file_server, tmp_path):
    (tmp_path / "m.onnx.part").mkdir()  # in the way, as a full or read-only disk would be
    with pytest.raises(DownloadError, match="cannot write .*m.onnx.part"):
        get(file_server, tmp_path / "m.onnx", size=len(PAYLOAD), retries=3)
    assert len(file_server.requests) == 1  # not retried: the server was not at fault


def test_a_write_that_fails_as_the_file_closes_is_a_write_error_not_a_download(file_server, tmp_path):
    """The last bytes are written as the file closes: a full disk there (a quota, a network file system)
    raised unseen, and a file short of its end was returned as the download. Here the kernel refuses
    bytes past a file size limit (RLIMIT_FSIZE), and the last 100 come apart, to be held in the buffer."""
    file_server.files["/m.onnx"], file_server.last_apart = PAYLOAD, 100
    script = f"""
import resource, signal, sys
from easyserve import downloads, WriteError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, rather than ending the process
resource.setrlimit(resource.RLIMIT_FSIZE, ({len(PAYLOAD) - 50}, resource.RLIM_INFINITY))
try:
    downloads.download({file_server.url + "/m.onnx"!r}, {str(tmp_path / "m.onnx")!r}, retries=0)
except WriteError as exc:
    print("refused:", exc)
else:
    print("downloaded")
"""
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith(f"refused: cannot download {file_server.url}/m.onnx: cannot write "), ran.stdout
    assert "File too large" in ran.stdout
    assert not (tmp_path / "m.onnx").exists()


def test_a_part_longer_than_the_file_a_416_says_is_downloaded_again(file_server, tmp_path):
    """A 416 (nothing past the bytes asked from) took the part as whole: an older version's longer part
    was kept as the file where a hash was not given (a part an earlier run left is not resumed from now),
    and failed its check where one was. The 416 says the file's size."""
    (tmp_path / "m.onnx.part").write_bytes(os.urandom(len(PAYLOAD) + 50_000))
    assert get(file_server, tmp_path / "m.onnx", sha256=PAYLOAD_SHA) == PAYLOAD_SHA
    assert (tmp_path / "m.onnx").read_bytes() == PAYLOAD
    assert [r for _, r in file_server.requests] == [f"bytes={len(PAYLOAD) + 50_000}-", None]
    (tmp_path / "m.onnx").unlink()
    (tmp_path / "m.onnx.part").write_bytes(PAYLOAD)  # whole already: the 416 says so, and it is kept
    assert get(file_server, tmp_path / "m.onnx", sha256=PAYLOAD_SHA) == PAYLOAD_SHA
    assert [r for _, r in file_server.requests][2:] == [f"bytes={len(PAYLOAD)}-"]


def test_retries_count_the_tries_that_get_nowhere_not_those_that_go_on(file_server, tmp_path, monkeypatch):
    """Each try went on where the last had stopped, and the download gave up all the same after
    ``retries`` of them, a third of the way through a file over a link that drops now and then."""
    monkeypatch.setattr(downloads, "PROGRESS_BYTES", 50_000)
    file_server.drop_after, file_server.drops = 60_000, 4
    assert get(file_server, tmp_path / "m.onnx", retries=1) == PAYLOAD_SHA
    assert [r for _, r in file_server.requests] == [None] + [f"bytes={n * 60_000}-" for n in range(1, 5)]
    file_server.requests.clear()
    file_server.drop_after, file_server.drops = 10_000, 3  # under PROGRESS_BYTES a try: counted
    with pytest.raises(DownloadError, match=r"bytes still to come \(tried 2 times\)"):
        get(file_server, tmp_path / "other.onnx", retries=1)
    # a server that ignores Range starts each try over: as far as the last, which is no progress (each
    # such try started the count again, and a link that cut every answer at 60 kB was tried for ever)
    file_server.requests.clear()
    file_server.drop_after, file_server.drops, file_server.ignore_range = 60_000, 100, True
    with pytest.raises(DownloadError, match=r"bytes still to come \(tried 3 times\)"):
        get(file_server, tmp_path / "third.onnx", retries=2)
    assert len(file_server.requests) == 3


def test_a_fetch_that_fails_on_this_machine_is_not_told_to_find_a_mirror(file_server, tmp_path, monkeypatch, tiny):
    """A folder that cannot be written, a full disk: the advice for a machine offline (copy the file,
    name a mirror) was added to these too, and its stand-in would fail the same way."""
    monkeypatch.setenv(models.BASE_URL_ENV, file_server.url)
    file_server.files["/m.onnx"] = PAYLOAD
    (tmp_path / "tiny.onnx.part").mkdir()  # in the way, as a full or read-only disk would be
    with pytest.raises(WriteError, match="cannot write .*tiny.onnx.part") as caught:
        models.fetch("tiny", tmp_path, retries=0)
    assert "offline" not in str(caught.value) and models.BASE_URL_ENV not in str(caught.value)


def test_a_server_that_sends_a_byte_now_and_then_is_a_dropped_download(file_server, tmp_path):
    """Each byte comes within the timeout, so no read timed out: the download went on for ever."""
    file_server.trickle_s = 0.1
    with pytest.raises(DownloadError, match="under 1024 bytes a second"):
        get(file_server, tmp_path / "m.onnx", size=len(PAYLOAD), retries=0, timeout=0.5)


def test_a_server_that_sends_its_headers_a_byte_now_and_then_is_a_dropped_download(file_server, tmp_path):
    """Each byte of the headers came within the timeout, so no read timed out: the download waited for
    them as long as they came (a 400-byte header at 0.05 s a byte: 20 s, for a timeout of 0.5 s)."""
    file_server.head_trickle_s = 0.05
    with pytest.raises(DownloadError, match="no status line and headers within 1s"):
        get(file_server, tmp_path / "m.onnx", size=len(PAYLOAD), retries=0, timeout=0.5)


def test_the_head_timer_comes_due_too_late_to_cut_an_answer_whose_head_was_read(file_server):
    """The timer on an answer's head came due on its own thread: as the head arrived just in time, it shut
    the socket down under the body all the same (an answer without Content-Length then read as whole)."""
    import http.client

    file_server.files["/m.onnx"] = PAYLOAD
    connection = downloads._in_time(http.client.HTTPConnection)("127.0.0.1", file_server.server_port, timeout=5)
    try:
        connection.request("GET", "/m.onnx")
        response = connection.getresponse()
        connection._too_late()  # the timer's call, as it comes due a moment after the head was read
        assert response.status == 200 and response.read() == PAYLOAD
    finally:
        connection.close()


def test_a_connection_that_fails_leaves_no_head_timer_behind(tmp_path):
    """The timer on an answer's head was started before connecting, and left to run out (twice the
    timeout: a thread each minute for each failed try) where no connection was made."""
    def timers() -> set:
        return {t for t in threading.enumerate() if isinstance(t, threading.Timer)}

    before = timers()
    with pytest.raises(DownloadError, match="Connection refused"):
        models.download(f"http://127.0.0.1:{free_port()}/m.onnx", tmp_path / "m.onnx", retries=0, timeout=30)
    wait_until(lambda: not timers() - before, 5, "the head timer's thread to end")  # cancelled: it ends at once


def test_unknown_checksum_returns_the_computed_one(file_server, tmp_path):
    assert get(file_server, tmp_path / "m.onnx", sha256=None) == PAYLOAD_SHA


# -- fetch: the zoo files, the base URL from the environment, and what to do offline ------------------


def test_fetch_builds_the_zoo_url_from_the_environment_and_rejects_wrong_bytes(file_server, tmp_path, monkeypatch):
    spec = ZOO["resnet18"]
    file_server.files["/mirror/" + spec.path] = PAYLOAD  # not the real model: its hash cannot match
    monkeypatch.setenv(models.BASE_URL_ENV, file_server.url + "/mirror/")
    standins.write_standin("resnet18", tmp_path)
    standin = (tmp_path / spec.filename).read_bytes()

    result = CliRunner().invoke(app, ["models", "fetch", "resnet18", "--dir", str(tmp_path), "--retries", "0"])

    assert result.exit_code == 1
    assert file_server.requests == [("/mirror/" + spec.path, None)]
    assert "is an offline stand-in; downloading the real model over it" in result.output
    assert f"the server sends {len(PAYLOAD)} bytes, expected {spec.size}" in result.output
    # the failed download left the stand-in as it was, and no partial file
    assert (tmp_path / spec.filename).read_bytes() == standin
    assert sorted(p.name for p in tmp_path.iterdir()) == [spec.filename]


@pytest.mark.parametrize("served", [None, PAYLOAD], ids=["missing", "wrong-bytes"])
def test_a_failed_fetch_leaves_no_folder_it_made_behind(file_server, tmp_path, monkeypatch, served):
    spec = ZOO["resnet18"]
    if served is not None:
        file_server.files["/" + spec.path] = served
    monkeypatch.setenv(models.BASE_URL_ENV, file_server.url)
    monkeypatch.chdir(tmp_path)

    result = CliRunner().invoke(app, ["models", "fetch", "resnet18", "--retries", "0"])
    assert result.exit_code == 1
    assert ("HTTP 404" if served is None else f"expected {spec.size}") in result.output
    assert list(tmp_path.iterdir()) == []  # no models/ folder

    (tmp_path / "kept").mkdir()
    result = CliRunner().invoke(app, ["models", "fetch", "resnet18", "--dir", "kept/a/b", "--retries", "0"])
    assert result.exit_code == 1
    assert list(tmp_path.iterdir()) == [tmp_path / "kept"] and list((tmp_path / "kept").iterdir()) == []


def test_fetch_offline_says_what_to_do(tmp_path, monkeypatch):
    port = free_port()
    monkeypatch.setenv(models.BASE_URL_ENV, f"http://127.0.0.1:{port}")
    with pytest.raises(DownloadError) as caught:
        models.fetch("yolov3", tmp_path, retries=0)
    message = str(caught.value)
    assert "ConnectionRefusedError" in message
    # the stand-in it offers goes where the model was to go, not to models/
    assert f"`easyserve models demo yolov3 --dir {tmp_path}`" in message
    assert f"copy yolov3-10.onnx from a machine that has it to {tmp_path / 'yolov3-10.onnx'}" in message
    assert models.BASE_URL_ENV in message
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DownloadError) as into_models:  # the command's own folder goes without --dir
        models.fetch("yolov3", retries=0)
    assert "`easyserve models demo yolov3`." in str(into_models.value)


@pytest.fixture
def tiny(monkeypatch) -> models.ZooModel:
    """A zoo entry for PAYLOAD, served as ``/m.onnx`` under the base URL."""
    spec = models.ZooModel("tiny", "tiny.onnx", "m.onnx", PAYLOAD_SHA, len(PAYLOAD), "a test file")
    monkeypatch.setitem(ZOO, "tiny", spec)
    return spec


def test_a_fetch_of_several_goes_on_past_one_that_fails_and_names_it(file_server, tmp_path, monkeypatch, tiny):
    # `models fetch all` stopped at its first failure, the models after it not tried
    monkeypatch.setitem(ZOO, "gone", models.ZooModel("gone", "gone.onnx", "gone.onnx", None, None, "a test file"))
    monkeypatch.setenv(models.BASE_URL_ENV, file_server.url)
    file_server.files["/m.onnx"] = PAYLOAD
    result = CliRunner().invoke(app, ["models", "fetch", "gone", "tiny", "--dir", str(tmp_path), "--retries", "0"])
    assert result.exit_code == 1 and "HTTP 404" in result.stderr, result.output
    assert (tmp_path / "tiny.onnx").read_bytes() == PAYLOAD and f"tiny: {tmp_path / 'tiny.onnx'}" in result.stdout
    assert result.stderr.rstrip().endswith("not fetched: gone")


def test_a_local_folder_or_a_file_url_is_a_mirror_and_anything_else_is_named(tmp_path, monkeypatch, tiny):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "m.onnx").write_bytes(PAYLOAD)
    for base in (str(mirror), mirror.as_uri()):
        monkeypatch.setenv(models.BASE_URL_ENV, base)
        got = models.fetch("tiny", tmp_path / base[:4])
        assert got.read_bytes() == PAYLOAD

    # a missing file in a folder is not retried: waiting will not make it appear
    started = time.monotonic()
    with pytest.raises(DownloadError, match="No such file"):
        models.download(mirror.as_uri() + "/other.onnx", tmp_path / "other.onnx", retries=3, backoff=1)
    assert time.monotonic() - started < 1

    # was: ValueError "unknown url type", a traceback from `easyserve models fetch`
    with pytest.raises(DownloadError, match="expected an http://, https:// or file:// URL"):
        models.download("/srv/models/m.onnx", tmp_path / "m.onnx")
    monkeypatch.setenv(models.BASE_URL_ENV, str(tmp_path / "nowhere"))
    result = CliRunner().invoke(app, ["models", "fetch", "tiny", "--dir", str(tmp_path / "d")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert (f"{models.BASE_URL_ENV}={tmp_path / 'nowhere'} is neither a URL nor a folder here: expected "
            "https://host/path, file:///path or a local folder") in result.output
    assert not (tmp_path / "d").exists()


def test_a_file_that_cannot_be_read_is_named_in_one_line(file_server, tmp_path, monkeypatch, tiny):
    dest = tmp_path / tiny.filename
    if os.geteuid() == 0:  # root reads any file it owns; a write-only kernel setting it cannot read
        if not os.path.isfile("/proc/sys/vm/compact_memory"):
            pytest.skip("no file here that root cannot read")
        dest.symlink_to("/proc/sys/vm/compact_memory")
    else:
        dest.write_bytes(PAYLOAD)
        dest.chmod(0)
    monkeypatch.setenv(models.BASE_URL_ENV, file_server.url)
    file_server.files["/m.onnx"] = PAYLOAD
    result = CliRunner().invoke(app, ["models", "fetch", "tiny", "--dir", str(tmp_path)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert f"cannot read {dest}: Permission denied" in result.output
    assert file_server.requests == []  # nothing downloaded over a file that may be someone else's
    listed = CliRunner().invoke(app, ["models", "list", "--dir", str(tmp_path)])
    assert listed.exit_code == 0 and "unreadable" in listed.output


def test_a_file_that_fails_its_check_is_moved_aside_and_said_so(file_server, tmp_path, monkeypatch, tiny):
    """A failed fetch left a corrupt file where `easyserve run` would load it, and did not say so."""
    monkeypatch.setenv(models.BASE_URL_ENV, file_server.url)
    dest, aside = tmp_path / tiny.filename, tmp_path / (tiny.filename + ".bad")
    dest.write_bytes(b"junk")
    listed = CliRunner().invoke(app, ["models", "list", "--dir", str(tmp_path)])
    assert [line for line in listed.output.splitlines() if line.startswith("tiny")][0].split()[2:4] == [
        "incomplete:", "4"]

    result = CliRunner().invoke(app, ["models", "fetch", "tiny", "--dir", str(tmp_path), "--retries", "0"])
    assert result.exit_code == 1 and "HTTP 404" in result.output
    assert (f"The file that was at {dest} (incomplete: 4 of 300,000 bytes) is now {aside}, where nothing loads it"
            in result.output)
    assert not dest.exists() and aside.read_bytes() == b"junk"
    file_server.files["/m.onnx"] = PAYLOAD  # the next fetch that succeeds takes the old file away too
    result = CliRunner().invoke(app, ["models", "fetch", "tiny", "--dir", str(tmp_path), "--retries", "0"])
    assert result.exit_code == 0 and not aside.exists() and f"removed {aside}" in result.output, result.output

    # the right size, the wrong bytes
    dest.write_bytes(bytes(len(PAYLOAD)))
    listed = CliRunner().invoke(app, ["models", "list", "--dir", str(tmp_path)])
    assert "corrupt: wrong SHA-256" in listed.output
    file_server.files["/m.onnx"] = PAYLOAD
    result = CliRunner().invoke(app, ["models", "fetch", "tiny", "--dir", str(tmp_path), "--retries", "0"])
    assert result.exit_code == 0, result.output
    assert dest.read_bytes() == PAYLOAD and not aside.exists()  # replaced by the right file: nothing kept
    listed = CliRunner().invoke(app, ["models", "list", "--dir", str(tmp_path)])
    assert "0.3 MB, SHA-256 ok" in listed.output


def test_a_second_fetch_checks_the_file_once_the_first_has_replaced_it(file_server, tmp_path, monkeypatch, tiny):
    """The check and the move aside were made outside the download's lock: a second fetch that checked
    the bad file while the first replaced it moved the good download aside as "corrupt"."""
    monkeypatch.setenv(models.BASE_URL_ENV, file_server.url)
    file_server.files["/m.onnx"] = PAYLOAD
    file_server.slow_s = 1.0  # the first holds its lock meanwhile
    dest = tmp_path / tiny.filename
    dest.write_bytes(bytes(len(PAYLOAD)))  # the right size, the wrong bytes
    said: dict[str, list[str]] = {"first": [], "second": []}

    def fetch(who: str) -> Path:
        return models.fetch("tiny", tmp_path, retries=0, say=said[who].append)

    first = threading.Thread(target=fetch, args=("first",))
    first.start()
    assert wait_until(lambda: any("downloading" in line for line in said["first"]), 10), said
    second = fetch("second")  # waits for the first, then finds its download
    first.join(10)
    assert second == dest and dest.read_bytes() == PAYLOAD and sorted(os.listdir(tmp_path)) == [tiny.filename]
    assert said["second"] == [f"{dest} is already there (SHA-256 checked)"], said
    assert len(file_server.requests) == 1


def test_zoo_urls_default_to_the_onnx_model_zoo(monkeypatch):
    monkeypatch.delenv(models.BASE_URL_ENV, raising=False)
    assert ZOO["resnet18"].url() == (
        "https://github.com/onnx/models/raw/main/validated/vision/classification/resnet/model/resnet18-v1-7.onnx")
    assert ZOO["yolov3"].url() == ("https://github.com/onnx/models/raw/main/validated/vision/"
                                   "object_detection_segmentation/yolov3/model/yolov3-10.onnx")
    assert all(len(spec.sha256 or "") == 64 for spec in ZOO.values())


def _write_standin_at_the_barrier(barrier, folder: str, answers) -> None:
    barrier.wait()
    try:
        standins.write_standin("resnet18", folder)
        answers.put("ok")
    except Exception as err:  # the test shows what failed
        answers.put(repr(err))


def test_stand_ins_written_by_several_processes_at_once_all_succeed_and_leave_one_whole_file(tmp_path):
    """Two notebooks (or two ``easyserve models demo``) that wrote the same stand-in at once shared one
    temporary name: one moved the other's half-written file into place, and the other then failed
    ``FileNotFoundError``. Eight processes start writing together, six times over; with the shared name,
    most rounds lost one."""
    import multiprocessing

    forked = multiprocessing.get_context("fork")
    expected = standins.build_standin("resnet18").SerializeToString()
    for round_ in range(6):
        folder = tmp_path / str(round_)
        barrier, answers = forked.Barrier(8), forked.SimpleQueue()
        writers = [forked.Process(target=_write_standin_at_the_barrier, args=(barrier, str(folder), answers))
                   for _ in range(8)]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join(60)
        assert [answers.get() for _ in writers] == ["ok"] * 8
        assert [p.name for p in folder.iterdir()] == [ZOO["resnet18"].filename]  # no temporary file left
        assert (folder / ZOO["resnet18"].filename).read_bytes() == expected


# -- models list, and unknown names -------------------------------------------------------------------


def test_list_and_unknown_names(tmp_path):
    standins.write_standin("yolov3", tmp_path)
    listed = CliRunner().invoke(app, ["models", "list", "--dir", str(tmp_path)])
    assert listed.exit_code == 0
    lines = listed.output.splitlines()
    assert lines[0].split()[:3] == ["resnet18", str(tmp_path / "resnet18-v1-7.onnx"), "missing"]
    assert "offline stand-in" in lines[1]
    unknown = CliRunner().invoke(app, ["models", "demo", "resnet50", "--dir", str(tmp_path)])
    assert unknown.exit_code == 2 and "unknown model 'resnet50'; choose resnet18, yolov3 or all" in unknown.output


# -- finding a handle's model file ---------------------------------------------------------------------


def test_find_model_tries_beside_the_config_then_the_current_directory_then_the_project(tmp_path, monkeypatch):
    here, project, configs = tmp_path / "here", tmp_path / "project", tmp_path / "mine" / "configs"
    for folder in (here, project, configs, configs.parent):
        (folder / "models").mkdir(parents=True, exist_ok=True)
    (project / "models" / "a.onnx").write_bytes(b"project")
    monkeypatch.chdir(here)
    assert models.find_model("models/a.onnx", "resnet18", root=project, beside=configs) == project / "models" / "a.onnx"
    # one folder up from the config, as the README says (mine/configs/x.yaml, mine/models/a.onnx), before the
    # handle's own project: it was not looked in, and a project laid out so failed to start from elsewhere
    (configs.parent / "models" / "a.onnx").write_bytes(b"up")
    assert models.find_model("models/a.onnx", "resnet18", root=project, beside=configs) == \
        configs.parent / "models" / "a.onnx"
    (here / "models" / "a.onnx").write_bytes(b"here")
    assert models.find_model("models/a.onnx", "resnet18", root=project, beside=configs) == here / "models" / "a.onnx"
    (configs / "models" / "a.onnx").write_bytes(b"beside")
    assert models.find_model("models/a.onnx", "resnet18", root=project, beside=configs) == configs / "models" / "a.onnx"
    assert models.find_model(project / "models" / "a.onnx") == project / "models" / "a.onnx"


def test_a_missing_model_names_both_ways_to_get_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as caught:
        models.find_model("models/resnet18-v1-7.onnx", "resnet18", root=tmp_path / "project")
    message = str(caught.value)
    assert "easyserve models fetch resnet18" in message and "easyserve models demo resnet18" in message
    assert str(tmp_path / "models/resnet18-v1-7.onnx") in message
    assert str(tmp_path / "project/models/resnet18-v1-7.onnx") in message
    assert "point HandleArgs model" not in message

    with pytest.raises(FileNotFoundError, match="both write models/yolov3-10.onnx, so point HandleArgs model at that"):
        models.find_model("elsewhere/yolo.onnx", "yolov3")
    # the same name in another folder: doing as told wrote models/, and the next start failed the same way
    configs = tmp_path / "configs"
    configs.mkdir()
    with pytest.raises(FileNotFoundError) as caught:
        models.find_model("weights/resnet18-v1-7.onnx", "resnet18", beside=configs)
    assert str(caught.value).endswith("; both write to models/ unless told: add `--dir configs/weights` to write it "
                                      "where it is looked for")
    Path("configs/weights").mkdir()  # as `--dir configs/weights` makes it, from here
    Path("configs/weights/resnet18-v1-7.onnx").write_bytes(b"stand-in")
    assert models.find_model("weights/resnet18-v1-7.onnx", "resnet18", beside=configs) == \
        configs / "weights" / "resnet18-v1-7.onnx"


def test_a_chunked_answer_cut_short_and_a_redirect_to_no_host_say_what_happened(file_server, tmp_path):
    """A chunked body cut short said "connection closed with None bytes still to come", and a
    redirect to a host that does not exist named the host that sent the redirect."""
    file_server.files["/m.onnx"] = PAYLOAD
    file_server.chunk_cut = True
    with pytest.raises(DownloadError, match=r"connection closed before the answer's last chunk \(tried 1 time\)"):
        models.download(file_server.url + "/m.onnx", tmp_path / "m.onnx", retries=0)
    file_server.chunk_cut = False
    file_server.redirects["/moved.onnx"] = "http://no-such-host.invalid/m.onnx"
    with pytest.raises(DownloadError, match=r"cannot look up no-such-host\.invalid \("):
        models.download(file_server.url + "/moved.onnx", tmp_path / "m.onnx", retries=0)


def test_a_model_of_ones_own_where_the_file_goes_is_left_unless_forced(file_server, tmp_path, monkeypatch, tiny):
    """A model exported to the name the example config loads was taken for a download gone wrong:
    `models fetch all` moved it aside, then removed it once the zoo's was in, unasked."""
    from onnx import TensorProto, helper

    monkeypatch.setenv(models.BASE_URL_ENV, file_server.url)
    file_server.files["/m.onnx"] = PAYLOAD
    dest = tmp_path / tiny.filename
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "own",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    own = helper.make_model(graph).SerializeToString()
    dest.write_bytes(own)
    result = CliRunner().invoke(app, ["models", "fetch", "tiny", "--dir", str(tmp_path), "--retries", "0"])
    assert result.exit_code == 1, result.output
    assert f"{dest} is an ONNX model, not the zoo's tiny" in result.output and "--force" in result.output
    assert dest.read_bytes() == own and sorted(os.listdir(tmp_path)) == [tiny.filename]
    assert file_server.requests == []
    result = CliRunner().invoke(app, ["models", "fetch", "tiny", "--dir", str(tmp_path), "--retries", "0", "--force"])
    assert result.exit_code == 0 and dest.read_bytes() == PAYLOAD, result.output
