"""The example models: the ONNX model zoo files they use, downloading them, and finding them on disk.

From the shell::

    easyserve models fetch resnet18     # models/resnet18-v1-7.onnx, 47 MB, SHA-256 checked
    easyserve models demo yolov3        # models/yolov3-10.onnx: random weights, same inputs and outputs

Downloads go to ``FILE.part`` first and resume from it after a dropped connection; the file only takes
its final name once its size and SHA-256 match; a file already there that does not match is moved aside
to ``FILE.bad``, where nothing loads it. ``EASYSERVE_MODELS_URL`` replaces the base URL: a mirror, a
local server in tests, or a local folder (``/srv/models`` or ``file:///srv/models``) holding the zoo's
folders. A download stops while less than ``MIN_FREE_BYTES`` would be left free on its disk (see
:mod:`easyserve.downloads`). The offline stand-ins that ``demo`` writes are built in
:mod:`easyserve.standins`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import urllib.parse
from pathlib import Path
from typing import Any, Callable

import typer

from .downloads import URL_SCHEMES, Progress, alone, download, mb, sha256_of
from .errors import ChecksumError, ConfigError, DownloadError, WriteError

__all__ = ["ZOO", "ZooModel", "fetch", "download", "sha256_of", "find_model", "ModelNotFound", "models_app"]

BASE_URL_ENV = "EASYSERVE_MODELS_URL"
DEFAULT_BASE_URL = "https://github.com/onnx/models/raw/main/validated/vision"


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
          say: Callable[[str], None] = lambda line: None, force: bool = False) -> Path:
    """Download zoo model ``name`` into ``dest_dir`` unless a file with the right SHA-256 is there already.

    A whole ONNX model of another SHA-256 there (one's own, exported to the name the example config
    loads) is replaced only with ``force``; a stand-in, or a file that is no model (a download cut
    short), is replaced.

    Raises :class:`DownloadError` (with what to do when offline) or :class:`ChecksumError`.
    """
    # standins builds on ZOO, so it is imported where it is used, here and in the commands below
    from .standins import standin_of

    spec = _zoo(name)
    dest = Path(dest_dir) / spec.filename
    # the check, the move aside and the download, under one lock: a second fetch that checked the
    # file while the first replaced it took the good download for the bad file and moved it aside
    with alone(dest, optional=True) if dest.parent.is_dir() else contextlib.nullcontext():
        return _fetch(spec, dest, base_url, progress, retries, timeout, say, standin_of, force)


def _fetch(spec: ZooModel, dest: Path, base_url: str | None, progress: Progress | None, retries: int,
           timeout: float, say: Callable[[str], None], standin_of: Callable[[Path], object], force: bool) -> Path:
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
        if problem and not force and _whole_model(dest):
            # moved aside, then removed once the download was in: a model of one's own, gone unasked
            raise DownloadError(f"{dest} is an ONNX model, not the zoo's {name} ({problem}): fetch leaves it as it "
                                "is; move it away (or fetch into another --dir), or fetch with --force to replace it")
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
        if not isinstance(exc, (ChecksumError, WriteError)):  # the network's fault, or the server's
            # the stand-in goes where the model was to go: `models demo` writes to models/ unless told
            folder = "" if dest.parent == Path("models") else f" --dir {shlex.quote(str(dest.parent))}"
            message += (f"\nIf this machine is offline, either copy {spec.filename} from a machine that has it to "
                        f"{dest}, or build an offline stand-in (random weights, same inputs and outputs) with "
                        f"`easyserve models demo {name}{folder}`. A mirror can be named with "
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


def _whole_model(path: Path) -> bool:
    """Whether the file at ``path`` reads as an ONNX model with a graph: not a download cut short."""
    import onnx

    try:
        return len(onnx.load(str(path), load_external_data=False).graph.node) > 0
    except Exception:  # protobuf's DecodeError, and whatever a file of junk makes of the parser
        return False


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


# -- finding a model file ------------------------------------------------------------------------------


class ModelNotFound(ConfigError, FileNotFoundError):
    """A handle's model file is in none of the places looked in: a config error (``easyserve run``
    exits 2, and its guardian does not start it again to fail the same way), and a ``FileNotFoundError``."""


def find_model(path: str | os.PathLike, name: str | None = None, root: str | os.PathLike | None = None,
               beside: str | os.PathLike | None = None) -> Path:
    """Where a handle's model file is: ``path`` itself if absolute, else beside the config (``beside``,
    its folder: ``Device.config_dir``), else under the current directory, else one folder up from the
    config (a project's root, for ``configs/x.yaml``), as :meth:`Device.path` looks, else under ``root``
    (the handle's own project folder). Raises :class:`ModelNotFound` naming both ways to get it."""
    from .handle import places_near  # where Device.path looks: the example handles did not look one folder up

    path = Path(path).expanduser()
    near = places_near(path, beside) if beside is not None else [Path.cwd() / path]
    candidates = [path] if path.is_absolute() else near + ([Path(root) / path] if root is not None else [])
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
        elif path.parent != Path("models"):  # same name, another folder: models/ was written, and looked for in vain
            folder = candidates[0].parent
            if folder.is_relative_to(Path.cwd()):
                folder = folder.relative_to(Path.cwd())
            message += f"; both write to models/ unless told: add `--dir {folder}` to write it where it is looked for"
    raise ModelNotFound(message)


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
    force: bool = typer.Option(False, "--force", help="Replace an ONNX model of another SHA-256 found where the "
                               "file goes (one's own export, say), which is otherwise left as it is."),
) -> None:
    """Download model files from the ONNX model zoo, resuming partial downloads; checks their SHA-256."""
    chosen, failed = _names(names), []
    for name in chosen:
        bar = _ProgressBar(ZOO[name].filename)
        try:
            path = fetch(name, dir, progress=bar, retries=retries, timeout=timeout, say=_say, force=force)
        except DownloadError as exc:  # said, and the others fetched all the same (`fetch all`)
            bar.close()
            typer.secho(str(exc), fg=typer.colors.RED, err=True)
            failed.append(name)
            continue
        finally:  # Ctrl-C, a disk error: the live bar ends, and the terminal gets its cursor back
            bar.close()
        typer.echo(f"{name}: {path}")
    if failed:
        if len(chosen) > 1:
            typer.secho(f"not fetched: {', '.join(failed)}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


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
        if dir.exists() and not dir.is_dir():  # mkdir's FileExistsError read as "not a stand-in" otherwise
            typer.secho(f"cannot write {name} into {dir}: it is a file, not a folder", fg=typer.colors.RED, err=True)
            raise typer.Exit(1)
        try:
            path = write_standin(name, dir, force=force)
        except FileExistsError as exc:
            typer.secho(str(exc), fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None
        except OSError as exc:  # a folder that cannot be written: read-only, not ours
            typer.secho(f"cannot write {name} into {dir}: {exc.strerror or exc}", fg=typer.colors.RED, err=True)
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
                    mb(path.stat().st_size) + (", SHA-256 ok" if spec.sha256 else ""))
            except OSError as exc:
                state = f"unreadable: {exc.strerror or exc}"
        typer.echo(f"{spec.name:<10} {str(path):<32} {state:<18} {spec.about}")


def _say(line: str) -> None:
    typer.echo(line, err=True)


class _ProgressBar:
    """A download's progress on stderr, drawn by ``rich``: a live bar on a terminal; elsewhere (a log,
    a pipe) its last state, once, as the download ends."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._progress: Any = None
        self._task: Any = None

    def __call__(self, done: int, total: int | None) -> None:
        if self._progress is None:
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                      TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True))
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=total)
        self._progress.update(self._task, completed=done, total=total)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
