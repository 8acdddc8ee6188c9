"""``easyserve bench``: the command's options checked before minutes of measuring, a bench or a sweep
run, the table printed and the files written; Ctrl-C and SIGTERM keep what was measured."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any, Iterator, Sequence

from .bench import BenchReport, Interrupted, NothingMeasured, bench
from .errors import ConfigError
from .payloads import payload_from
from .plots import figure_class
from .reports import settings_text
from .sweep import as_config, sweep


def run_command(target: str, *, payload: str | None, raw: bool, key: str, tensors: Sequence[str], form: str,
                model: str | None, concurrency: str | None, rate: str | None, arrivals: str, seed: int | None,
                duration: float, requests: int | None, warmup: float, clients_processes: str, timeout: float,
                api_key: str | None, json_file: Path | None, csv_file: Path | None, sweep_: bool,
                process_per_gpu: str | None, max_batch_size: str | None, gpus: str | None, p99_ms: float | None,
                plot: Path | None, progress: bool | None) -> int:
    """``easyserve bench``: measure, print the table, write the files asked for; the exit status."""
    import typer

    from .answers import one_line
    from .errors import StartupError

    def fail(message: str) -> int:
        typer.secho(message, fg=typer.colors.RED, err=True)
        return 2

    for flag, path in (("--json", json_file), ("--csv", csv_file), ("--plot", plot)):
        if path is not None and Path(path).is_dir():  # before minutes of measuring, not after
            return fail(f"{flag}: {path} is a folder; name a file")
        if path is not None and not Path(path).resolve().parent.is_dir():
            return fail(f"{flag}: the folder {Path(path).resolve().parent} does not exist")
        if path is not None and (problem := _unwritable(Path(path))):  # a read-only folder, /proc
            return fail(f"{flag}: {problem}")
    signalled: list[int] = []  # SIGTERM, once it has come
    with _sigterm_as_ctrl_c(signalled):
        try:
            if not sweep_:
                given = [flag for flag, value in (("--process-per-gpu", process_per_gpu), ("--max-batch-size",
                         max_batch_size), ("--gpus", gpus), ("--p99-ms", p99_ms)) if value is not None]
                if given:
                    verb = "apply" if len(given) > 1 else "applies"
                    return fail(f"{', '.join(given)} only {verb} with --sweep (which starts servers to compare)")
            elif api_key is not None:
                return fail("--api-key does not apply with --sweep: its servers take the config's ApiKey")
            elif "://" in target:  # it was told "Handle: '...' must end in a class name after ':'"
                return fail(f"--sweep starts servers of its own: give it a config (.yaml), an .onnx model or a handle "
                            f"(module:Class), not a server's URL ({target})")
            unused = [flag for flag, given in (("--raw", raw), ("--key", key != "img")) if given]
            if unused and (tensors or payload is None or Path(payload).suffix.lower() == ".json"):
                verb = "apply" if len(unused) > 1 else "applies"
                return fail(f"{' and '.join(unused)} only {verb} to an image file (--payload picture.jpg)")
            if raw and form == "v2":
                return fail("--raw does not apply with --form v2, which sends an image file as a BYTES tensor")
            if model is not None and form != "v2":
                return fail("--model names the model of v2 requests: it applies with --form v2")
            if plot is not None:  # before minutes of measuring, not after: an empty figure, in the file's format
                kind = plot.suffix[1:].lower() or "png"
                try:  # with a word on it: matplotlib lists .pgf where no LaTeX is installed to write text
                    figure = figure_class()()
                    figure.text(0.5, 0.5, "requests/s")
                    figure.savefig(io.BytesIO(), format=kind)
                except ImportError:
                    raise
                except Exception as exc:
                    return fail(f"--plot: matplotlib cannot write a .{kind} file here: {one_line(str(exc), 300)}")
            if form == "v2" and model is None and sweep_:  # the model the config serves
                model = _model_name(target)
            if rate is None and concurrency is None:
                levels: Any = None  # bench's 1, 8 and 32, a sweep's 8 and 32
            elif rate is None:
                levels = _list(concurrency, "--concurrency")
            else:  # the most in flight at once: one number, checked as such by bench
                levels = None if concurrency is None else _list(concurrency, "--concurrency")
                levels = levels[0] if levels and len(levels) == 1 else levels
            options = {"payload": payload_from(payload, raw=raw, key=key, tensors=tensors, form=form, model=model),
                       "concurrency": levels, "rate": None if rate is None else _rates(rate), "arrivals": arrivals,
                       "seed": seed, "duration": duration, "requests": requests,
                       "warmup": warmup, "clients_processes": _processes(clients_processes), "timeout": timeout,
                       "progress": progress}
            if sweep_:
                overrides = {"GPUs": gpus} if gpus is not None else {}
                report: Any = sweep(target, process_per_gpu=_list(process_per_gpu or "1,2", "--process-per-gpu"),
                                    max_batch_size=_list(max_batch_size or "1,8", "--max-batch-size"), p99_ms=p99_ms,
                                    **options, **overrides)
            else:
                report = bench(target, api_key=api_key, **options)
        except ImportError as exc:
            return fail(str(exc))
        except (ValueError, TypeError, FileNotFoundError, ConfigError) as exc:
            return fail(str(exc))
        except MemoryError as exc:  # --tensor float32:100000x100000
            return fail(f"the payload does not fit in this machine's memory: {exc}")
        except StartupError as exc:
            return fail(f"could not start a server: {exc}")
        except Interrupted as exc:  # Ctrl-C or SIGTERM: what was measured before is kept, shown and written
            said, code = _stopped_by(signalled)
            return _finish(exc.report, json_file, csv_file, plot, code, f"{said} during {exc.level}")
        except NothingMeasured as exc:
            return _finish(exc.report, json_file, csv_file, plot, 1, str(exc))
        except KeyboardInterrupt:  # before any measuring began
            said, code = _stopped_by(signalled)
            typer.secho(f"{said}: nothing was measured", fg=typer.colors.RED, err=True)
            return code
        return _finish(report, json_file, csv_file, plot, 0, None)


INTERRUPTED = 130  # the exit status of a command stopped by Ctrl-C (128 + SIGINT), as shells report it
TERMINATED = 143  # and by SIGTERM (128 + 15)


def _stopped_by(signalled: list[int]) -> tuple[str, int]:
    """What stopped the command, in words, and its exit status: SIGTERM where it came, else Ctrl-C."""
    return ("terminated (SIGTERM)", TERMINATED) if signalled else ("interrupted", INTERRUPTED)


@contextlib.contextmanager
def _sigterm_as_ctrl_c(signalled: list[int]) -> Iterator[None]:
    """Within it, SIGTERM stops the command as Ctrl-C does (a ``KeyboardInterrupt``, ``signalled`` noting it):
    what ``timeout`` and a cancelled CI job send ended the process at once, every level measured lost, no
    --json written. The handler before is put back after."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        signalled.append(signum)
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _finish(report: Any, json_file: Path | None, csv_file: Path | None, plot: Path | None, code: int,
            stopped: str | None) -> int:
    """Print the report and write the files asked for, if anything was measured; say why the run
    stopped early (``stopped``), if it did; the exit status."""
    import typer

    unwritten = False
    if report.runs:
        with contextlib.suppress(BrokenPipeError):  # its reader left (| head): the files, minutes of
            report.print()  # measuring, are written all the same (reports._reader_gone)
        for path, write in ((json_file, report.to_json), (csv_file, report.to_csv),
                            (plot, getattr(report, "plot", None))):
            if path is not None:
                try:
                    write(path)
                except Exception as exc:  # the disk filled, or the folder went, while it measured: the others still
                    said = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
                    typer.secho(f"cannot write {path}: {said}", fg=typer.colors.RED, err=True)
                    unwritten = True
                    continue
                typer.echo(f"wrote {path}", err=True)
    if stopped is not None:
        kept = "; what was measured before it is above" if report.runs else ""
        typer.secho(stopped + kept, fg=typer.colors.RED, err=True)
        return code
    empty = [settings_text(run.settings) + run.level for run in report.runs
             if not any(status.startswith("2") for status in run.statuses)]
    if empty:  # a script running bench must not take a level of nothing but errors for a measurement
        where = "" if len(empty) == len(report.runs) else f" at {'; '.join(empty)}"
        typer.secho(f"no request was answered with success (2xx){where}: nothing was measured there; see the errors "
                    "above", fg=typer.colors.RED, err=True)
    # the server gone by the end (at an earlier level, the next one's warm-up stops the bench): as one down at the
    # start, though what was measured is kept. (A sweep's next setting starts a server of its own.)
    last = report.runs[-1] if report.runs and isinstance(report, BenchReport) else None
    gone = last is not None and last.stopped_answering_s is not None
    if gone:
        typer.secho(f"the server at {report.url} stopped answering {last.stopped_answering_s:.2f} s into {last.level}, "
                    "the last level, and had not answered again when it ended: its req/s there is over the whole "
                    "level; what was measured is above", fg=typer.colors.RED, err=True)
    return 1 if empty or gone or unwritten else 0


def _unwritable(path: Path) -> str | None:
    """Why ``path`` cannot be written, or ``None``: tried by opening it to append (and removing it again
    if that made it), not by permissions alone, which root passes wherever the kernel refuses."""
    there = path.exists()
    try:
        with open(path, "ab"):
            pass
    except OSError as exc:
        return f"cannot write {path}: {exc.strerror or exc}"
    if not there:
        path.unlink(missing_ok=True)
    return None


def _model_name(target: str) -> str:
    """The name v2 requests give the model a sweep serves: ``ModelName``, else the handle's class."""
    return as_config(target).served_model_name


def _items(text: str, flag: str, example: str = "1,8,32") -> list[str]:
    """The comma-separated items of a flag's value (none, for nothing but spaces); an empty one refused:
    ``-c 1,,8`` was taken as 1,8, a typo measured as if meant."""
    parts = [part.strip() for part in text.split(",")] if text.strip() else []
    if "" in parts:
        raise ValueError(f"{flag}: an empty item in {text!r}; give the values with one comma between each "
                         f"({example})")
    return parts


def _list(text: str, flag: str) -> list[int]:
    parts = _items(text, flag)
    try:
        values = [int(part) for part in parts]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"{flag}: expected whole numbers of at least 1, comma separated (1,8,32); got {text!r}")
    return values


def _rates(text: str) -> list[float]:
    parts = _items(text, "--rate", "100,200.5")
    try:
        values = [float(part) for part in parts]
    except ValueError:
        values = []
    if not values or not all(0 < value < float("inf") for value in values):
        raise ValueError(f"--rate: expected requests per second above 0, comma separated (100,200.5); got {text!r}")
    return values


def _processes(text: str) -> int | None:
    if text.strip().lower() == "auto":
        return None
    # isdecimal and isascii: "²" is a digit to isdigit(), and not a number to int()
    if not (text.strip().isascii() and text.strip().isdecimal()) or int(text) < 1:
        raise ValueError(f"--clients-processes: expected auto or a whole number of at least 1, got {text!r}")
    return int(text)
