"""Downloading one file safely: resumed after a dropped connection, checked by size and SHA-256 before
it takes its name, bounded in size and in the disk it may fill, and alone (two downloads of one file
wait for each other, across processes).

:func:`download` writes ``FILE.part`` first and resumes from it (an HTTP Range request); the file only
takes its final name once its size and SHA-256 match. It never leaves under ``MIN_FREE_BYTES`` free on
the disk it writes to. :mod:`easyserve.models` uses it for the example models.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import http.client
import itertools
import logging
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from .errors import ChecksumError, DownloadError, WriteError, retry_after_seconds

__all__ = ["download", "sha256_of", "Progress"]

CHUNK = 1 << 16
URL_SCHEMES = ("http", "https", "file")
# A file of unknown size stops here: an ONNX file is at most 2 GB (protobuf's limit), so twice that is
# a server sending without end (one wrote 75 GB, until the disk was full).
DEFAULT_MAX_BYTES = 4_000_000_000
# Left free on the download's file system: a full disk breaks more than this download.
MIN_FREE_BYTES = 100_000_000
# A try that got this many bytes before its connection dropped starts the count of retries again: the
# count is for a download that gets nowhere, and one over a link that drops now and then gave up, a
# third of the way through, while each try went on where the last had stopped.
PROGRESS_BYTES = 1 << 20
# An answer's status line and headers must come within this many times the timeout (see _HeadInTime).
HEAD_TIMEOUTS = 2
# A 429 or 503's Retry-After (seconds, or an HTTP date) is waited for, up to this many seconds.
MAX_RETRY_AFTER_S = 60.0

log = logging.getLogger("easyserve")

Progress = Callable[[int, Optional[int]], None]  # (bytes so far, total bytes or None)


def download(url: str, dest: str | os.PathLike, *, sha256: str | None = None, size: int | None = None,
             progress: Progress | None = None, retries: int = 3, timeout: float = 30.0,
             backoff: float = 1.0, max_bytes: int | None = DEFAULT_MAX_BYTES) -> str:
    """Download ``url`` (``http(s)://`` or ``file://``) to ``dest`` through ``dest.part``; return the
    file's SHA-256 (hex).

    Without a ``size``, a body over ``max_bytes`` (``None``: no limit) is refused as it comes. Either
    way, the download stops, removing ``dest.part``, while it would leave under ``MIN_FREE_BYTES`` free
    on its file system.

    A dropped connection or a 5xx (or 429) answer is retried ``retries`` times, waiting ``backoff``
    seconds and doubling, or the seconds a 429 or 503's ``Retry-After`` asks if longer (up to
    :data:`MAX_RETRY_AFTER_S`; a try that got :data:`PROGRESS_BYTES` starts the count again), each
    time resuming from the bytes already in ``dest.part`` (an HTTP Range request; a server that
    ignores it sends the whole file again; one that has nothing past them, a 416, must say the file's
    size is theirs). A resumed file whose hash is wrong (a part left by an earlier run, or by a
    dropped try of this one) is downloaded once more from the start, since the old part may be from
    another version of the file; without ``sha256``, a part left by an earlier run is not resumed from,
    as nothing could tell. A resume within the run sends what the server said the file is (its ETag, or
    Last-Modified) as If-Range, and a file replaced meanwhile comes whole. What fails on this machine (a
    full disk, a link in the way) is a :class:`WriteError`.
    """
    if urllib.parse.urlsplit(url).scheme not in URL_SCHEMES:
        raise DownloadError(f"cannot download {url}: expected an http://, https:// or file:// URL")
    dest = Path(dest)
    # the file in place already, read before any lock: in a read-only folder (models baked into an image)
    # the lock file could not be made, and every worker's setup failed with the right file there
    kept = _in_place(dest, sha256, size)
    if kept is not None:
        return kept
    # the folders this makes, deepest first, so that a failed download can take them away again
    made = list(itertools.takewhile(lambda f: not f.exists(), [dest.parent, *dest.parent.parents]))
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(f"cannot make the folder {dest.parent}: {exc.strerror or exc}") from None
    part = dest.with_name(dest.name + ".part")
    for path in (dest.with_name(dest.name + ".lock"), part):
        _not_a_link(path)
    fetch_part = functools.partial(_download_part, url, part, size, max_bytes, progress, retries, timeout,
                                   backoff, sha256 is not None or size is not None)
    try:
        with alone(dest):  # a second download of the same file waits for the first, then finds it
            kept = _in_place(dest, sha256, size)
            if kept is not None:
                return kept
            if sha256 is None:  # an earlier run's part: nothing could tell that the file was not replaced since,
                with contextlib.suppress(OSError):  # and its start was joined to another version's end, kept
                    part.unlink(missing_ok=True)  # (what stands in the way is said as the download writes)
            resumed = part.exists() and part.stat().st_size > 0
            resumed = fetch_part() or resumed  # a resume after a drop within this run may splice versions too
            try:
                digest = _check(part, sha256, size)
            except ChecksumError:
                part.unlink(missing_ok=True)
                if not resumed:
                    raise
                log.warning("the resumed download of %s does not match; downloading it again from the start", url)
                fetch_part()
                try:
                    digest = _check(part, sha256, size)
                except ChecksumError:
                    part.unlink(missing_ok=True)
                    raise
            try:
                os.replace(part, dest)
            except OSError as exc:
                raise WriteError(f"cannot put the download in place as {dest}: {exc.strerror or exc} "
                                    f"(it is kept as {part})") from None
    except BaseException:
        for folder in made:  # a .part kept to resume from keeps its folder
            if any(folder.iterdir()):
                break
            folder.rmdir()
        raise
    return digest


def _in_place(dest: Path, sha256: str | None, size: int | None) -> str | None:
    """``dest``'s digest where it is the file ``sha256`` names (the hash says it is, not an older one)."""
    if sha256 is None or not dest.is_file():
        return None
    try:
        return _check(dest, sha256, size)
    except ChecksumError:
        return None
    except OSError as exc:
        raise WriteError(f"cannot read {dest}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def alone(dest: Path, optional: bool = False) -> Iterator[None]:
    """Hold ``dest``'s lock file (``dest.lock``) while downloading it: two downloads into one
    ``.part`` (a second ``easyserve models fetch``) wrote over each other, and both failed. The lock
    file goes once the download ends; one that another process took meanwhile is taken again. A
    thread that holds it already goes on (fetch holds it over its check and its download);
    ``optional``: where no lock file can be made, go on without one."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        yield
        return
    held = _held.__dict__.setdefault("paths", set())
    key = os.path.abspath(dest)
    if key in held:  # this thread holds it already: fetch's check, then its download
        yield
        return
    lock = dest.with_name(dest.name + ".lock")
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_RDWR | NO_FOLLOW, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                _not_a_link(lock)
            if optional:  # a folder that cannot be written: a file there is checked all the same
                yield
                return
            raise WriteError(f"cannot write in {dest.parent}: {exc.strerror or exc}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.warning("another download of %s is under way: waiting for it", dest.name)
                fcntl.flock(fd, fcntl.LOCK_EX)
            if lock.exists() and os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break  # the lock file that is there now, not one its holder took away as it finished
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    held.add(key)
    try:
        yield
    finally:
        held.discard(key)
        lock.unlink(missing_ok=True)
        os.close(fd)


_held = threading.local()  # the locks each thread holds (alone), by path


def _download_part(url: str, part: Path, size: int | None, max_bytes: int | None, progress: Progress | None,
                   retries: int, timeout: float, backoff: float, checked: bool) -> bool:
    """Returns whether any answer was appended to bytes already in the part (a 206). ``checked``: a size or
    hash will tell the file from anything else."""
    failures, spliced = 0, False
    # what the server said the file is (a strong ETag, or else its Last-Modified), sent with a Range as
    # If-Range: a file replaced since the part began is sent whole, not its end after the old one's start
    validator: str | None = None
    most = size if size is not None else max_bytes
    furthest = part.stat().st_size if part.exists() else 0  # the most bytes any try has left in the part
    while True:
        have = part.stat().st_size if part.exists() else 0
        if size is not None and have == size:
            return spliced  # a previous run got every byte; the checksum decides whether they are right
        request = urllib.request.Request(url, headers={"User-Agent": "easyserve"})
        if have:
            request.add_header("Range", f"bytes={have}-")
            if validator:
                request.add_header("If-Range", validator)
        try:
            with _OPENER.open(request, timeout=timeout) as response:
                if response.status == 206 and _range_start(response) != have:
                    part.unlink(missing_ok=True)
                    raise http.client.HTTPException("the server sent another part than the one asked for")
                if (not checked and response.headers.get_content_type() == "text/html"
                        and not url.lower().startswith("file:")):
                    # a sign-in page, an error page answered 200, the page about the file rather than its
                    # link: kept as the model where no size or hash was given (with one, a store that
                    # labels its files text/html serves them all the same: the check finds a page out)
                    raise DownloadError(f"cannot download {url}: the server answered a web page (text/html), not "
                                        "the file: is it the file's own link, one that needs no sign-in?")
                if response.status != 206:
                    have = 0  # the server sent the whole file: start over
                    etag = response.headers.get("ETag")  # what it is, for a resume of this run's part
                    validator = etag if etag and not etag.startswith("W/") else response.headers.get("Last-Modified")
                elif have:
                    spliced = True
                length = response.headers.get("Content-Length")
                total = have + int(length) if length and length.isdigit() else size
                if size is not None and total != size:  # before the bytes: 10^15 of them were taken in
                    raise _refused(part, f"the server sends {total} bytes, expected {size}")
                if most is not None and total is not None and total > most:
                    raise _refused(part, f"the server sends {total} bytes, over the {most} allowed (max_bytes)")
                _keep_room(part, total - have if total is not None else 0)
                with _writing(part, "ab" if have else "wb") as write:
                    if progress:
                        progress(have, total)
                    stalled = _Stall(timeout)
                    while chunk := response.read1(CHUNK):
                        write(chunk)
                        have += len(chunk)
                        if most is not None and have > most:
                            limit = "expected" if size is not None else "allowed (max_bytes)"
                            raise _refused(part, f"the server sent more than the {most} bytes {limit}")
                        _keep_room(part)
                        stalled.check(len(chunk))
                        if progress:
                            progress(have, total)
                if total is not None and have < total:
                    raise http.client.IncompleteRead(b"", total - have)
            return spliced
        except _LocalError as exc:
            raise WriteError(f"cannot download {url}: {exc}") from None
        except urllib.error.HTTPError as exc:
            # The error is also the response: until closed it holds the connection's socket open, and
            # an exception kept in a reference cycle is only freed by a garbage collection, at any later
            # moment, where the unclosed socket then raises ResourceWarning.
            exc.close()
            if exc.code == 416 and have:
                if _whole_size(exc) == have:
                    return spliced  # nothing past what we have: the part is whole
                # longer than the file, or a size not said: an older version's part (which, without a
                # hash to check, was kept as the file)
                log.warning("%s is not the start of %s (the server has nothing past its %d bytes); downloading "
                            "it again from the start", part, url, have)
                part.unlink(missing_ok=True)
                continue
            # urllib's reason for a redirect loop is three lines, the last of them the status's own word
            said = str(exc.reason).splitlines()[0] if str(exc.reason).strip() else ""
            if exc.code < 500 and exc.code != 429:
                raise DownloadError(f"cannot download {url}: HTTP {exc.code} {said}".rstrip()) from None
            reason = f"HTTP {exc.code} {said}".rstrip()
            asked = exc.headers.get("Retry-After") if exc.headers else None
            retry_after = (retry_after_seconds(asked, MAX_RETRY_AFTER_S) if asked else None) or 0.0
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason, retry_after = _reason(exc) + _through_proxy(url), 0.0
            if urllib.parse.urlsplit(url).scheme == "file":  # a missing local file will not appear by waiting
                raise DownloadError(f"cannot download {url}: {reason}") from None
            if "Tunnel connection failed: 4" in str(exc):  # the proxy refused https's CONNECT: 407, 403...
                raise DownloadError(f"cannot download {url}: {reason}") from None
            if isinstance(getattr(exc, "reason", None), socket.gaierror):
                # no such host, or no network to ask: waiting will not change that
                redirects = list(getattr(request, "redirect_dict", ()))  # urllib's record, in order
                host = urllib.parse.urlsplit(redirects[-1] if redirects else url).hostname
                raise DownloadError(f"cannot download {url}: cannot look up {host} ({exc.reason.strerror})") from None
        if have >= furthest + PROGRESS_BYTES:  # further than any try before: not one that starts over each time
            failures, furthest = 0, have  # a connection that drops now and then, not a download that gets nowhere
        failures += 1
        if failures > retries:
            raise DownloadError(f"cannot download {url}: {reason} (tried {failures} time{'s' * (failures > 1)})")
        wait = max(backoff * 2 ** (failures - 1), retry_after)  # a 429/503's Retry-After (seconds), up to a cap
        log.warning("%s: %s; retry %d of %d in %gs, from byte %d", url, reason, failures, retries, wait, have)
        time.sleep(wait)


class _HttpRedirectsOnly(urllib.request.HTTPRedirectHandler):
    """Redirects followed to http:// and https:// only: urllib's own followed one to ftp:// (any host and
    port a server named) as well."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 (urllib's signature)
        if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
            fp.close()
            raise DownloadError(f"cannot download {req.full_url}: it redirects to {newurl}, and a download "
                                "follows redirects to http:// and https:// only")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _HeadInTime:
    """A connection whose answer's head (connecting, a TLS handshake, the status line and headers) must
    come within ``HEAD_TIMEOUTS`` times its timeout: a server that sent its headers a byte now and then
    never let a read time out, and held a download (``--timeout 2 --retries 0``) for days. The body's
    own pace is :class:`_Stall`'s to judge."""

    timeout: Any
    sock: Any

    def connect(self) -> None:
        self._late = False
        self._headed = False  # the head was read (or given up on): the timer has nothing left to cut
        self._lock = threading.Lock()  # between the timer's thread and this one
        self._timer = None
        if isinstance(self.timeout, (int, float)) and self.timeout > 0:
            self._timer = threading.Timer(HEAD_TIMEOUTS * self.timeout, self._too_late)
            self._timer.daemon = True
            self._timer.start()
        try:
            super().connect()  # type: ignore[misc]
        except BaseException:
            self._head_done()  # no thread left waiting out the timeout for a connection that never was
            raise
        if self._late:  # it came due while connecting, before there was a socket to close
            self._head_done()
            self.close()  # type: ignore[attr-defined]
            raise TimeoutError(f"no status line and headers within {HEAD_TIMEOUTS * self.timeout:g}s")

    def _too_late(self) -> None:
        with self._lock:
            if self._headed:  # came due as the head was read: the body is _Stall's to judge
                return
            self._late = True
            sock = self.sock
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # the blocked read returns: nothing more comes

    def _head_done(self) -> None:
        if getattr(self, "_timer", None) is not None:
            with self._lock:
                self._headed = True
            self._timer.cancel()

    def getresponse(self):  # noqa: ANN201 (http.client's signature)
        try:
            response = super().getresponse()  # type: ignore[misc]
        except (OSError, http.client.HTTPException):
            response = None
            if not getattr(self, "_late", False):
                raise
        finally:
            self._head_done()
        if getattr(self, "_late", False):  # headers cut off where the socket closed read as if whole
            if response is not None:
                response.close()
            raise TimeoutError(f"no status line and headers within {HEAD_TIMEOUTS * self.timeout:g}s")
        return response


@functools.lru_cache(maxsize=None)
def _in_time(connection_class: type) -> type:
    return type(f"InTime{connection_class.__name__}", (_HeadInTime, connection_class), {})


class _HttpInTime(urllib.request.HTTPHandler):
    def do_open(self, http_class, req, **kwargs):  # noqa: ANN001, ANN201 (urllib's signature)
        return super().do_open(_in_time(http_class), req, **kwargs)


class _HttpsInTime(urllib.request.HTTPSHandler):
    def do_open(self, http_class, req, **kwargs):  # noqa: ANN001, ANN201 (urllib's signature)
        return super().do_open(_in_time(http_class), req, **kwargs)


_OPENER = urllib.request.build_opener(_HttpRedirectsOnly, _HttpInTime, _HttpsInTime)


def _refused(part: Path, why: str) -> ChecksumError:
    """The error for a download refused as it comes; what it left of ``part`` is removed."""
    part.unlink(missing_ok=True)
    return ChecksumError(f"{part.name.removesuffix('.part')}: {why}; nothing was kept")


def _free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def _keep_room(part: Path, to_come: int = 0) -> None:
    """Stop the download, removing ``part``, where it would leave under ``MIN_FREE_BYTES`` free on its
    file system; checked as the bytes come, since other programs write there too."""
    try:
        free = _free_bytes(part.parent)
    except OSError:  # a file system that cannot say: the write itself will fail if it is full
        return
    if free - to_come < MIN_FREE_BYTES:
        part.unlink(missing_ok=True)
        coming = f", {mb(to_come)} still to come" if to_come > 0 else ""
        raise _LocalError(f"{mb(free)} free on {part.parent}{coming}: stopped to keep {mb(MIN_FREE_BYTES)} "
                          "free; the partial download was removed")


class _Stall:
    """A server that sends a byte now and then never lets a read time out: under ``MIN_RATE`` bytes a
    second over ``timeout`` seconds, the download counts as dropped (and is resumed)."""

    MIN_RATE = 1024

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.since, self.got = time.monotonic(), 0

    def check(self, got: int) -> None:
        self.got += got
        elapsed = time.monotonic() - self.since
        if elapsed >= self.timeout:
            if self.got < self.MIN_RATE * elapsed:
                raise TimeoutError(f"under {self.MIN_RATE} bytes a second for {elapsed:.0f}s")
            self.since, self.got = time.monotonic(), 0


class _LocalError(Exception):
    """Writing the download failed here (a full or read-only disk): not the network's fault, and not
    worth asking the server again."""


# A download's own files (FILE.part, FILE.lock) are opened only where they are not symbolic links: in a
# shared folder, another user's link there had a fetch append the model to, or create, a file of theirs
# choosing that the fetching user may write (and the link was then removed, leaving no trace).
NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)


def _not_a_link(path: Path) -> None:
    if path.is_symlink():
        raise WriteError(f"{path} is a symbolic link: a download writes through none (one put in a shared folder "
                            "would have it write to a file of its maker's choosing); remove it and fetch again")


@contextlib.contextmanager
def _writing(part: Path, mode: str) -> Iterator[Callable[[bytes], object]]:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC) | NO_FOLLOW
    try:
        out = os.fdopen(os.open(part, flags, 0o644), mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            _not_a_link(part)
        raise _LocalError(f"cannot write {part}: {exc.strerror or exc}") from None

    def failed(exc: OSError) -> _LocalError:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # kept to resume from, it held the disk full
            part.unlink(missing_ok=True)
            return _LocalError(f"cannot write {part}: {exc.strerror}; the partial download was removed")
        return _LocalError(f"cannot write {part}: {exc.strerror or exc}")

    def write(chunk: bytes) -> None:
        try:
            out.write(chunk)
        except OSError as exc:
            raise failed(exc) from None

    try:
        yield write
    except BaseException:
        with contextlib.suppress(OSError):
            out.close()
        raise
    try:  # the last bytes are written as it closes: a full disk (a quota that disk_usage does not see, a
        # network file system) raised there, unseen, and a file short of its end was taken as the download
        out.flush()
        os.fsync(out.fileno())
        out.close()
    except OSError as exc:
        with contextlib.suppress(OSError):
            out.close()
        raise failed(exc) from None


def _whole_size(answer) -> int | None:
    """The size of the whole file, as a 416 answer says it (``Content-Range: bytes */5000``)."""
    value = answer.headers.get("Content-Range", "")
    unit, _, size = value.partition(" */")
    return int(size) if unit.strip() == "bytes" and size.strip().isdigit() else None


def _range_start(response) -> int | None:
    # "Content-Range: bytes 1000-4999/5000"
    value = response.headers.get("Content-Range", "")
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _through_proxy(url: str) -> str:
    """`` (through the proxy ...)`` where the environment sends ``url`` through one (``HTTPS_PROXY``): its
    failures were said of the server, which an operator then looked into. Without the proxy's password."""
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        return ""
    shown = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    where = shown._replace(netloc=shown.netloc.rpartition("@")[2]).geturl()
    return f" (through the proxy {where}, from {parts.scheme.upper()}_PROXY)"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc.reason, str):
        exc = exc.reason
    if isinstance(exc, http.client.IncompleteRead):
        if exc.expected is None:  # chunked: no length was said
            return "connection closed before the answer's last chunk"
        return f"connection closed with {exc.expected} bytes still to come"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _check(path: Path, sha256: str | None, size: int | None) -> str:
    name = path.name.removesuffix(".part")
    got_size = path.stat().st_size
    if size is not None and got_size != size:
        raise ChecksumError(f"{name}: got {got_size} bytes, expected {size}; the file was not kept")
    digest = sha256_of(path)
    if sha256 is not None and digest != sha256.lower():
        raise ChecksumError(f"{name}: SHA-256 is {digest}, expected {sha256}; the file was not kept")
    return digest


def sha256_of(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"
