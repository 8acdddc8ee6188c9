"""The example models: the ONNX model zoo files they use, downloading them, and finding them on disk.

From the shell::

    easyserve models fetch resnet18     # models/resnet18-v1-7.onnx, 47 MB, SHA-256 checked
    easyserve models demo yolov3        # models/yolov3-10.onnx: random weights, same inputs and outputs

Downloads go to ``FILE.part`` first and resume from it after a dropped connection; the file only takes
its final name once its size and SHA-256 match; a file already there that does not match is moved aside
to ``FILE.bad``, where nothing loads it. ``EASYSERVE_MODELS_URL`` replaces the base URL: a mirror, a
local server in tests, or a local folder (``/srv/models`` or ``file:///srv/models``) holding the zoo's
folders. A download stops while less than ``MIN_FREE_BYTES`` would be left free on its disk. The offline
stand-ins that ``demo`` writes are built in :mod:`easyserve.standins`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import http.client
import itertools
import logging
import os
import shutil
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, Optional

import typer

from .errors import ChecksumError, DownloadError

__all__ = ["ZOO", "ZooModel", "fetch", "download", "sha256_of", "find_model", "models_app"]

BASE_URL_ENV = "EASYSERVE_MODELS_URL"
DEFAULT_BASE_URL = "https://github.com/onnx/models/raw/main/validated/vision"
CHUNK = 1 << 16
URL_SCHEMES = ("http", "https", "file")
# A file of unknown size stops here: an ONNX file is at most 2 GB (protobuf's limit), so twice that is
# a server sending without end (one wrote 75 GB, until the disk was full).
DEFAULT_MAX_BYTES = 4_000_000_000
# Left free on the download's file system: a full disk breaks more than this download.
MIN_FREE_BYTES = 100_000_000

log = logging.getLogger("easyserve")

Progress = Callable[[int, Optional[int]], None]  # (bytes so far, total bytes or None)


@dataclasses.dataclass(frozen=True)
class ZooModel:
    """One downloadable model: where it lives under the base URL and what its bytes hash to."""

    name: str
    filename: str
    path: str  # under the base URL
    sha256: str | None  # None: unknown, the computed hash is printed instead of checked
    size: int | None
    about: str

    def url(self, base_url: str | None = None) -> str:
        """The file's URL under ``base_url``, else ``$EASYSERVE_MODELS_URL``, else the zoo's; a local
        folder becomes a ``file://`` URL. Raises :class:`DownloadError` for anything else."""
        base = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
        if urllib.parse.urlsplit(base).scheme not in URL_SCHEMES:
            folder = Path(base).expanduser()
            if not folder.is_dir():
                raise DownloadError(
                    f"{'base_url' if base_url else BASE_URL_ENV}={base} is neither a URL nor a folder here: expected "
                    f"https://host/path, file:///path or a local folder (holding {self.path} and the like)")
            base = folder.resolve().as_uri()
        return f"{base.rstrip('/')}/{self.path}"


# The hashes are the Git LFS object ids of the zoo's files, which are their SHA-256.
ZOO: dict[str, ZooModel] = {
    "resnet18": ZooModel(
        "resnet18", "resnet18-v1-7.onnx", "classification/resnet/model/resnet18-v1-7.onnx",
        "4e8f8653e7a2222b3904cc3fe8e304cd8b339ce1d05fd24688162f86fb6df52c", 46_820_737,
        "ImageNet classifier for configs/imagenet_resnet18.yaml",
    ),
    "yolov3": ZooModel(
        "yolov3", "yolov3-10.onnx", "object_detection_segmentation/yolov3/model/yolov3-10.onnx",
        "1f4613c3d04416dfd2c1960b8737aa5292994238dfecbe9c1ee7147e9a92439f", 247_908_721,
        "COCO object detector for configs/coco_yolov3.yaml",
    ),
}


def _zoo(name: str) -> ZooModel:
    try:
        return ZOO[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(ZOO)}") from None


# -- downloading -------------------------------------------------------------------------------------


def fetch(name: str, dest_dir: str | os.PathLike = "models", *, base_url: str | None = None,
          progress: Progress | None = None, retries: int = 3, timeout: float = 30.0,
          say: Callable[[str], None] = lambda line: None) -> Path:
    """Download zoo model ``name`` into ``dest_dir`` unless a file with the right SHA-256 is there already.

    Raises :class:`DownloadError` (with what to do when offline) or :class:`ChecksumError`.
    """
    # standins builds on ZOO, so it is imported where it is used, here and in the commands below
    from .standins import standin_of

    spec = _zoo(name)
    dest = Path(dest_dir) / spec.filename
    # the check, the move aside and the download, under one lock: a second fetch that checked the
    # file while the first replaced it took the good download for the bad file and moved it aside
    with _alone(dest, optional=True) if dest.parent.is_dir() else contextlib.nullcontext():
        return _fetch(spec, dest, base_url, progress, retries, timeout, say, standin_of)


def _fetch(spec: ZooModel, dest: Path, base_url: str | None, progress: Progress | None, retries: int,
           timeout: float, say: Callable[[str], None], standin_of: Callable[[Path], object]) -> Path:
    name = spec.name
    standin = problem = None
    if dest.is_file():
        standin = standin_of(dest)
        try:
            problem = None if standin else _problem(dest, spec)
        except OSError as exc:  # not ours to replace: it may be someone else's
            raise DownloadError(f"cannot read {dest}: {exc.strerror or exc}; make it readable, "
                                "or remove it to download it again") from None
        if not standin and not problem:
            say(f"{dest} is already there" + (" (SHA-256 checked)" if spec.sha256 else ""))
            return dest
    url = spec.url(base_url)
    aside = dest.with_name(dest.name + ".bad")
    if standin:
        say(f"{dest} is an offline stand-in; downloading the real model over it")
    elif problem:
        # out of the way first: should the download fail, `easyserve run` must not load it as the model
        try:
            os.replace(dest, aside)
        except OSError as exc:
            raise DownloadError(f"{dest} is {problem}, and cannot be moved aside: {exc.strerror or exc}; "
                                "remove it") from None
        say(f"{dest} is {problem}: moved it aside to {aside}; downloading it again")
    say(f"downloading {url}")
    try:
        digest = download(url, dest, sha256=spec.sha256, size=spec.size, progress=progress,
                          retries=retries, timeout=timeout)
    except DownloadError as exc:
        message = str(exc)
        if not isinstance(exc, ChecksumError):
            message += (f"\nIf this machine is offline, either copy {spec.filename} from a machine that has it to "
                        f"{dest}, or build an offline stand-in (random weights, same inputs and outputs) with "
                        f"`easyserve models demo {name}`. A mirror can be named with "
                        f"{BASE_URL_ENV}=URL (or a local folder).")
        if problem:
            message += f"\nThe file that was at {dest} ({problem}) is now {aside}, where nothing loads it."
        raise type(exc)(message) from None
    if aside.exists():  # moved aside now, or by an earlier fetch that failed
        aside.unlink(missing_ok=True)
        say(f"removed {aside}: the download replaces it")
    if spec.sha256 is None:
        say(f"SHA-256 {digest} (no published hash to check it against)")
    return dest


def download(url: str, dest: str | os.PathLike, *, sha256: str | None = None, size: int | None = None,
             progress: Progress | None = None, retries: int = 3, timeout: float = 30.0,
             backoff: float = 1.0, max_bytes: int | None = DEFAULT_MAX_BYTES) -> str:
    """Download ``url`` (``http(s)://`` or ``file://``) to ``dest`` through ``dest.part``; return the
    file's SHA-256 (hex).

    Without a ``size``, a body over ``max_bytes`` (``None``: no limit) is refused as it comes. Either
    way, the download stops, removing ``dest.part``, while it would leave under ``MIN_FREE_BYTES`` free
    on its file system.

    A dropped connection or a 5xx answer is retried ``retries`` times, waiting ``backoff`` seconds
    and doubling, each time resuming from the bytes already in ``dest.part`` (an HTTP Range request;
    a server that ignores it sends the whole file again). A resumed file whose hash is wrong is
    downloaded once more from the start, since the old part may be from another version of the file.
    """
    if urllib.parse.urlsplit(url).scheme not in URL_SCHEMES:
        raise DownloadError(f"cannot download {url}: expected an http://, https:// or file:// URL")
    dest = Path(dest)
    # the folders this makes, deepest first, so that a failed download can take them away again
    made = list(itertools.takewhile(lambda f: not f.exists(), [dest.parent, *dest.parent.parents]))
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot make the folder {dest.parent}: {exc.strerror or exc}") from None
    part = dest.with_name(dest.name + ".part")
    fetch_part = functools.partial(_download_part, url, part, size, max_bytes, progress, retries, timeout,
                                   backoff)
    try:
        with _alone(dest):  # a second download of the same file waits for the first, then finds it
            if sha256 is not None and dest.is_file():  # the hash says it is the file, not an older one
                try:
                    return _check(dest, sha256, size)
                except ChecksumError:
                    pass
                except OSError as exc:
                    raise DownloadError(f"cannot read {dest}: {exc.strerror or exc}") from None
            resumed = part.exists() and part.stat().st_size > 0
            fetch_part()
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
                raise DownloadError(f"cannot put the download in place as {dest}: {exc.strerror or exc} "
                                    f"(it is kept as {part})") from None
    except BaseException:
        for folder in made:  # a .part kept to resume from keeps its folder
            if any(folder.iterdir()):
                break
            folder.rmdir()
        raise
    return digest


@contextlib.contextmanager
def _alone(dest: Path, optional: bool = False) -> Iterator[None]:
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
            fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as exc:
            if optional:  # a folder that cannot be written: a file there is checked all the same
                yield
                return
            raise DownloadError(f"cannot write in {dest.parent}: {exc.strerror or exc}") from None
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


_held = threading.local()  # the locks each thread holds (_alone), by path


def _download_part(url: str, part: Path, size: int | None, max_bytes: int | None, progress: Progress | None,
                   retries: int, timeout: float, backoff: float) -> None:
    failures = 0
    most = size if size is not None else max_bytes
    while True:
        have = part.stat().st_size if part.exists() else 0
        if size is not None and have == size:
            return  # a previous run got every byte; the checksum decides whether they are right
        request = urllib.request.Request(url, headers={"User-Agent": "easyserve"})
        if have:
            request.add_header("Range", f"bytes={have}-")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                if response.status == 206 and _range_start(response) != have:
                    part.unlink(missing_ok=True)
                    raise http.client.HTTPException("the server sent another part than the one asked for")
                if response.status != 206:
                    have = 0  # the server sent the whole file: start over
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
            return
        except _LocalError as exc:
            raise DownloadError(f"cannot download {url}: {exc}") from None
        except urllib.error.HTTPError as exc:
            # The error is also the response: until closed it holds the connection's socket open, and
            # an exception kept in a reference cycle is only freed by a garbage collection, at any later
            # moment, where the unclosed socket then raises ResourceWarning.
            exc.close()
            if exc.code == 416 and have:
                return  # nothing past what we have: the part is whole (or too long, which the hash shows)
            if exc.code < 500 and exc.code != 429:
                raise DownloadError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from None
            reason = f"HTTP {exc.code} {exc.reason}"
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = _reason(exc)
            if urllib.parse.urlsplit(url).scheme == "file":  # a missing local file will not appear by waiting
                raise DownloadError(f"cannot download {url}: {reason}") from None
            if isinstance(getattr(exc, "reason", None), socket.gaierror):
                # no such host, or no network to ask: waiting will not change that
                host = urllib.parse.urlsplit(url).hostname
                raise DownloadError(f"cannot download {url}: cannot look up {host} ({exc.reason.strerror})") from None
        failures += 1
        if failures > retries:
            raise DownloadError(f"cannot download {url}: {reason} (tried {failures} time{'s' * (failures > 1)})")
        wait = backoff * 2 ** (failures - 1)
        log.warning("%s: %s; retry %d of %d in %gs, from byte %d", url, reason, failures, retries, wait, have)
        time.sleep(wait)


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
        coming = f", {_mb(to_come)} still to come" if to_come > 0 else ""
        raise _LocalError(f"{_mb(free)} free on {part.parent}{coming}: stopped to keep {_mb(MIN_FREE_BYTES)} "
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


@contextlib.contextmanager
def _writing(part: Path, mode: str) -> Iterator[Callable[[bytes], object]]:
    try:
        out = open(part, mode)
    except OSError as exc:
        raise _LocalError(f"cannot write {part}: {exc.strerror or exc}") from None

    def write(chunk: bytes) -> None:
        try:
            out.write(chunk)
        except OSError as exc:
            raise _LocalError(f"cannot write {part}: {exc.strerror or exc}") from None

    try:
        yield write
    finally:
        try:
            out.close()
        except OSError:
            pass


def _range_start(response) -> int | None:
    # "Content-Range: bytes 1000-4999/5000"
    value = response.headers.get("Content-Range", "")
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc.reason, str):
        exc = exc.reason
    if isinstance(exc, http.client.IncompleteRead):
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


def _problem(path: Path, spec: ZooModel) -> str | None:
    """What is wrong with the file at ``path`` as ``spec``'s model, or ``None`` if its size and SHA-256
    are right. Raises ``OSError`` where it cannot be read."""
    with open(path, "rb") as f:  # first, so that an unreadable file says so whatever its size
        got = os.fstat(f.fileno()).st_size
    if spec.size is not None and got < spec.size:
        return f"incomplete: {got:,} of {spec.size:,} bytes"
    if spec.size is not None and got > spec.size:
        return f"corrupt: {got:,} bytes, expected {spec.size:,}"
    if spec.sha256 is not None and sha256_of(path) != spec.sha256:
        return "corrupt: wrong SHA-256"
    return None


def sha256_of(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# -- finding a model file ------------------------------------------------------------------------------


def find_model(path: str | os.PathLike, name: str | None = None, root: str | os.PathLike | None = None) -> Path:
    """Where a handle's model file is: ``path`` itself if absolute, else under the current directory,
    else under ``root`` (the project folder). Raises ``FileNotFoundError`` naming both ways to get it."""
    path = Path(path).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path] + ([Path(root) / path] if root else [])
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = " or ".join(str(c) for c in dict.fromkeys(candidates))
    message = f"model file {str(path)!r} not found (looked for {looked})"
    if name in ZOO:
        spec = ZOO[name]
        size = f" ({spec.size / 1e6:.0f} MB)" if spec.size else ""
        message += (f". Download it with `easyserve models fetch {name}`{size}, or build "
                    f"an offline stand-in with random weights with `easyserve models demo {name}`")
        if path.name != spec.filename:
            message += f"; both write models/{spec.filename}, so point HandleArgs model at that"
    raise FileNotFoundError(message)


# -- the `easyserve models` commands -------------------------------------------------------------------

models_app = typer.Typer(
    help="Download the example models (checked by SHA-256), or build offline stand-ins with the same signature.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

NAMES_HELP = f"{', '.join(ZOO)} or all"


def _names(names: list[str]) -> list[str]:
    chosen = list(ZOO) if "all" in names else names
    unknown = [n for n in chosen if n not in ZOO]
    if unknown:
        typer.secho(f"unknown model {unknown[0]!r}; choose {NAMES_HELP}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    return list(dict.fromkeys(chosen))


@models_app.command("fetch")
def fetch_command(
    names: list[str] = typer.Argument(..., help=NAMES_HELP),
    dir: Path = typer.Option(Path("models"), "--dir", help="Where to put the files."),
    retries: int = typer.Option(3, min=0, help="Retries after a dropped connection or a server error."),
    timeout: float = typer.Option(30.0, min=0.1, help="Seconds to wait for the server before retrying."),
) -> None:
    """Download model files from the ONNX model zoo, resuming partial downloads; checks their SHA-256."""
    for name in _names(names):
        bar = _ProgressBar(ZOO[name].filename)
        try:
            path = fetch(name, dir, progress=bar, retries=retries, timeout=timeout, say=_say)
        except DownloadError as exc:
            bar.close()
            typer.secho(str(exc), fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None
        bar.close()
        typer.echo(f"{name}: {path}")


@models_app.command("demo")
def demo_command(
    names: list[str] = typer.Argument(..., help=NAMES_HELP),
    dir: Path = typer.Option(Path("models"), "--dir", help="Where to put the files."),
    force: bool = typer.Option(False, "--force", help="Replace a file that is not a stand-in (a downloaded model)."),
) -> None:
    """Build offline stand-ins: the real models' inputs and outputs with random weights, under 1 MB each.

    The example configs then run without a download; their answers have the right form but mean nothing.
    """
    from .standins import write_standin

    for name in _names(names):
        try:
            path = write_standin(name, dir, force=force)
        except FileExistsError as exc:
            typer.secho(str(exc), fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None
        typer.echo(f"{name}: {path} (offline stand-in, {path.stat().st_size / 1e3:.0f} kB, random weights)")


@models_app.command("list")
def list_command(dir: Path = typer.Option(Path("models"), "--dir", help="Where the files are.")) -> None:
    """The example models and what is in the models folder, each file's size and SHA-256 checked."""
    from .standins import standin_of

    for spec in ZOO.values():
        path = dir / spec.filename
        state = "missing"
        if path.is_file():
            try:
                state = "offline stand-in" if standin_of(path) else _problem(path, spec) or (
                    _mb(path.stat().st_size) + (", SHA-256 ok" if spec.sha256 else ""))
            except OSError as exc:
                state = f"unreadable: {exc.strerror or exc}"
        typer.echo(f"{spec.name:<10} {str(path):<32} {state:<18} {spec.about}")


def _say(line: str) -> None:
    typer.echo(line, err=True)


class _ProgressBar:
    """A one-line progress bar on stderr; on a non-terminal, a line at the start and one at the end."""

    WIDTH = 30

    def __init__(self, label: str) -> None:
        self.label = label
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()
        self.shown = 0.0
        self.last: tuple[int, int | None] | None = None

    def __call__(self, done: int, total: int | None) -> None:
        if self.last is None:
            self.started = time.monotonic()
            if not self.tty:
                print(f"{self.label}: {_mb(total) if total else 'size unknown'} ...", file=sys.stderr, flush=True)
        self.last = (done, total)
        now = time.monotonic()
        if self.tty and (now - self.shown >= 0.1 or done == total):
            self.shown = now
            print("\r" + self._line(done, total, now), end="", file=sys.stderr, flush=True)

    def _line(self, done: int, total: int | None, now: float) -> str:
        rate = f"{_mb(done / max(now - self.started, 1e-3))}/s"
        if not total:
            return f"{self.label} {_mb(done)} {rate}"
        filled = int(self.WIDTH * min(done / total, 1.0))
        bar = "#" * filled + "." * (self.WIDTH - filled)
        return f"{self.label} [{bar}] {100 * done / total:3.0f}% {_mb(done)}/{_mb(total)} {rate}"

    def close(self) -> None:
        if self.last is None:
            return
        if self.tty:
            print(file=sys.stderr)
        else:
            print(self._line(*self.last, time.monotonic()), file=sys.stderr)
        self.last = None


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"
