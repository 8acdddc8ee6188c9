"""Showing what :func:`easyserve.bench` and :func:`easyserve.sweep` measured: a live line while a run
goes, and tables (``rich``) for a terminal or a notebook, CSV for a spreadsheet."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Sequence

from .notebook import running_kernel

if TYPE_CHECKING:
    from .bench import Run

__all__ = ["Display", "runs_table", "fitting_tables", "runs_html", "print_report", "write_csv"]


class Display:
    """A live line while a level runs (requests, requests/s, errors), drawn by ``rich``; nothing at all
    when turned off. On by default in a terminal and in a notebook. Turned on where stderr is neither (CI,
    ``| tee``), a line as each level starts, warms up, measures and ends: rich drew nothing there, and a
    sweep of many minutes said nothing until it ended (a CI job that waits that long for output is cut).

    In a notebook the lines are one output of the cell, redrawn in place (an IPython display handle,
    a few times a second): each level's line stays, finished, as a record of the run, in the saved
    notebook too. rich's own notebook display is a widget, which a saved notebook or a page made from
    it shows as ``Output()``, or not at all."""

    REDRAW_S = 0.25  # in a notebook: at most this often

    def __init__(self, enabled: bool | None) -> None:
        self.jupyter = running_kernel() is not None if enabled is not False else False
        self.enabled = (sys.stderr.isatty() or self.jupyter) if enabled is None else enabled
        self.lines = self.enabled and not self.jupyter and not sys.stderr.isatty()  # plain lines, not drawn
        self._label = ""
        self._progress: Any = None
        self._task: Any = None
        self._started = 0.0
        self._total: int | None = None
        self._seconds: float | None = None
        self._handle: Any = None  # the notebook's display handle
        self._drawn = -float("inf")

    def __enter__(self) -> Display:
        if self.enabled and not self.lines:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                       TextColumn("{task.fields[detail]}"))
            if self.jupyter:
                from IPython.display import display

                # drawn into a record, never shown by rich itself: exported as HTML and text, and displayed
                self._console = Console(file=_Nowhere(), record=True, width=110, force_terminal=True,
                                        force_jupyter=False, color_system="truecolor")
                self._progress = Progress(*columns, console=self._console, auto_refresh=False)
                self._handle = display({"text/plain": ""}, raw=True, display_id=True)
            else:
                self._progress = Progress(*columns, console=Console(stderr=True), transient=True)
                self._progress.start()
        return self

    def start(self, label: str, requests: int | None, seconds: float | None) -> None:
        self._total, self._seconds, self._label = requests, seconds, label
        self._line("starting clients")
        if self._progress is not None:
            if self._task is not None and not self.jupyter:  # a notebook keeps each level's line
                self._progress.remove_task(self._task)
            self._task = self._progress.add_task(label, total=requests or seconds, detail="starting clients")
            self._draw(now=True)

    def note(self, what: str) -> None:
        self._started = time.monotonic()
        self._line(what)
        if self._progress is not None:
            self._progress.update(self._task, completed=0, detail=what)
            self._draw(now=True)

    def progress(self, done: int, errors: int) -> None:
        if self._progress is None:
            return
        elapsed = time.monotonic() - self._started
        rate = done / elapsed if elapsed > 0 else 0.0
        self._progress.update(self._task, completed=done if self._total else min(elapsed, self._seconds or 0),
                              detail=f"{done:,} requests, {rate:,.0f}/s, {errors:,} errors")
        self._draw()

    def done(self, requests: int, errors: int, per_s: float) -> None:
        """The level's own figures, as it ended (the last count came a moment before)."""
        self._line(f"{requests:,} requests, {per_s:,.0f}/s, {errors:,} errors")
        if self._progress is not None:
            self._progress.update(self._task, completed=requests if self._total else self._seconds or 0,
                                  detail=f"{requests:,} requests, {per_s:,.0f}/s, {errors:,} errors")
            self._draw(now=True)

    def _line(self, text: str) -> None:
        if self.lines:
            print(f"{self._label}: {text}", file=sys.stderr, flush=True)

    def _draw(self, now: bool = False) -> None:
        if self._handle is None or (not now and time.monotonic() - self._drawn < self.REDRAW_S):
            return
        self._drawn = time.monotonic()
        self._console.print(self._progress.get_renderable())
        text = self._console.export_text(clear=False)  # then the record is cleared, for the next drawing
        html = self._console.export_html(inline_styles=True, clear=True,
                                         code_format='<pre style="line-height:normal">{code}</pre>')
        # rich pads each line to the widest of its column: a level whose figures are shorter than the next's
        # ended in spaces
        plain = "\n".join(line.rstrip() for line in text.rstrip("\n").splitlines())
        self._handle.update({"text/html": html, "text/plain": plain}, raw=True)

    def __exit__(self, *exc_info: Any) -> None:
        if self._handle is not None:
            self._draw(now=True)
        elif self._progress is not None:
            self._progress.stop()


class _Nowhere:
    """A file that keeps nothing: what a recording console would write besides its record (every
    drawing's text, kept for the whole run in a StringIO)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def settings_text(settings: dict[str, Any] | None) -> str:
    """``ProcessPerGPU 2, MaxBatchSize 8, `` before a level's label; nothing outside a sweep."""
    return "".join(f"{key} {value}, " for key, value in (settings or {}).items())


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def runs_table(runs: Sequence[Run], title: str | None, best: Run | None = None,
               columns: Sequence[str] | None = None, caption_too: bool = True) -> Any:
    """A ``rich`` table of runs, a sweep's settings in the first columns; ``best`` is marked. ``columns``
    keeps those of :func:`headers` named (default: all). A number is never folded (a number cut in two
    reads as two numbers): a column too narrow for it ends it with an ellipsis."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    names = headers(runs)
    kept = [i for i, name in enumerate(names) if columns is None or name in columns]
    flags = _on_gpus(runs), _fronts(runs), _rates(runs), _stages(runs)
    rows = [cells(run, *flags) for run in runs]
    table = Table(title=title, title_justify="left", caption=caption(runs) if caption_too else None,
                  caption_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
    for i in kept:
        header = _stacked(names[i])
        if names[i] == "errors":  # words, which fold at their spaces (what a server said, over several lines)
            table.add_column(header, justify="left", overflow="fold", min_width=len(header), max_width=ERRORS_WIDTH)
        else:
            table.add_column(header, justify="right", no_wrap=True, overflow="ellipsis",
                             min_width=max(len(text) for text in [*header.split("\n"), *(row[i] for row in rows)]))
    for run, row in zip(runs, rows):  # as Text: what a server said is not markup ("[/b]" broke the table)
        table.add_row(*(Text(row[i]) for i in kept), style="bold green" if run is best else None)
    return table


ERRORS_WIDTH = 40  # of the errors column at most: a server's 300 characters fold, rather than split the table


def _stacked(name: str) -> str:
    """A column's name in lines of about :data:`HEADER_LINE` characters, at its spaces and the capitals
    of a setting's name (``Process`` over ``PerGPU``), so that it is no wider than the numbers below it."""
    import re

    lines: list[str] = []
    for i, word in enumerate(name.split(" ")):
        for j, part in enumerate(re.findall(r"[A-Z]+[^A-Z]*|[^A-Z]+", word)):
            joined = lines[-1] + (" " if i and not j else "") + part if lines else part
            if lines and len(joined) <= HEADER_LINE:
                lines[-1] = joined
            else:
                lines.append(part)
    return "\n".join(lines)


HEADER_LINE = 8


def fitting_tables(runs: Sequence[Run], title: str, width: int, best: Run | None = None) -> list[Any]:
    """The runs in one table (its caption left to the caller) if it fits in ``width`` characters, else in
    several: what the clients saw, then what the server said, each in as many tables as it takes, and
    each with the settings and the level, to read across."""
    from rich.console import Console

    def wide(columns: Sequence[str]) -> int:
        return Console(width=10_000).measure(runs_table(runs, None, best, columns, caption_too=False)).maximum

    names = headers(runs)
    if wide(names) <= width:
        return [runs_table(runs, title, best, caption_too=False)]
    level = names[:names.index("conc.") + 1]
    client = [name for name in names[len(level):] if name in (*CLIENT_COLUMNS, "backlog")]
    server = [name for name in names[len(level):] if name not in client]
    tables = []
    for part, columns in (("what the clients saw", client), ("what the server said meanwhile", server)):
        groups: list[list[str]] = [[]]
        for name in columns:
            if groups[-1] and wide([*level, *groups[-1], name]) > width:
                groups.append([])
            groups[-1].append(name)
        for group in groups:
            heading = part if group is groups[0] else f"{part} (continued)"
            tables.append(runs_table(runs, heading if tables else f"{title} · {heading}", best,
                                     [*level, *group], caption_too=False))
    return tables


def runs_html(runs: Sequence[Run], title: str, notes: Sequence[str], best: Run | None = None) -> str:
    """The same table in HTML, for a notebook (box-drawing characters do not line up in every font)."""
    from html import escape

    right = ' style="text-align: right"'
    head = "".join(f"<th{'' if name == 'errors' else right}>{escape(name)}</th>" for name in headers(runs))
    rows = []
    names, flags = headers(runs), (_on_gpus(runs), _fronts(runs), _rates(runs), _stages(runs))
    for run in runs:
        chosen = run is best
        # starred and in <strong> as well as green: GitHub's notebook view drops style attributes, and
        # left the recommended row looking as every other
        texts = [escape(cell) for cell in cells(run, *flags)]
        if chosen:
            texts = [f"<strong>{'★ ' if i == 0 else ''}{text}</strong>" for i, text in enumerate(texts)]
        row = "".join(f"<td{'' if name == 'errors' else right}>{text}</td>" for name, text in zip(names, texts))
        green = ' style="color: #107010"' if chosen else ""
        rows.append(f"<tr{green}>{row}</tr>")
    lines = "".join(f"<p>{escape(note)}</p>" for note in notes)
    return (f"<div><p><i>{escape(title)}</i></p><table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}"
            f"</tbody></table><p style=\"font-size: smaller; color: #666\">{escape(caption(runs))}</p>{lines}</div>")


def headers(runs: Sequence[Run]) -> list[str]:
    """Column names: a sweep's settings, an open loop's rate, the concurrency, then :data:`COLUMNS`, an
    open loop's backlog, "fronts cpu" where a server had HTTP front processes, "GPU %" where it
    reported its GPUs."""
    return [*(runs[0].settings if runs else []), *(["rate"] if _rates(runs) else []), "conc.", *COLUMNS,
            *(STAGE_COLUMNS if _stages(runs) else []), *(["backlog"] if _rates(runs) else []),
            *(["fronts cpu"] if _fronts(runs) else []), *(["GPU %"] if _on_gpus(runs) else [])]


def cells(run: Run, gpu: bool = False, fronts: bool = False, rates: bool = False, stages: bool = False) -> list[str]:
    """One run's row, as text; ``rates`` adds the open loop's rate and backlog, ``fronts`` the cores of
    the HTTP front processes, ``gpu`` the mean utilisation of the server's GPUs, ``stages`` the mean
    time of the handle's stages on a batch. Percentiles that are lower bounds (requests due were never
    sent, and would have waited longer) begin with ``≥``."""
    bound = "≥" if run.unsent and run.p50_ms is not None else ""
    row = [*(str(value) for value in run.settings.values()),
           *(["-" if run.rate is None else f"{run.rate:,g}"] if rates else []), str(run.concurrency),
           _number(run.requests_per_s), *(bound + _number(p, 2) for p in (run.p50_ms, run.p90_ms, run.p99_ms)),
           run.errors_text(texts=True), _number(run.clients_cores, 2), _number(run.mean_batch, 2),
           _number(run.server_queue_ms, 2), _number(run.server_batch_ms, 2),
           _number(run.server_cores, 2), _number(run.worker_cores, 2)]
    if stages:
        ms = run.server_stages_ms or {}
        row += [_number(ms.get("preprocess"), 2), _number(ms.get("forward", ms.get("run_batch")), 2),
                _number(ms.get("postprocess"), 2)]
    if rates:
        row.append(f"{run.backlog[0]:,} → {run.backlog[1]:,}" if run.backlog else "-")
    if fronts:
        row.append(_number(run.front_cores, 2))
    if gpu:
        row.append(_number(run.gpu_percent, 0))
    return row


def caption(runs: Sequence[Run]) -> str:
    """What the columns mean."""
    return ((RATE_CAPTION if _rates(runs) else "") + CAPTION + (STAGES_CAPTION if _stages(runs) else "")
            + (FRONTS_CAPTION if _fronts(runs) else "") + (GPU_CAPTION if _on_gpus(runs) else ""))


def _stages(runs: Sequence[Run]) -> bool:
    return any(run.server_stages_ms for run in runs)


def _on_gpus(runs: Sequence[Run]) -> bool:
    return any(run.gpu_util for run in runs)


def _fronts(runs: Sequence[Run]) -> bool:
    return any(run.front_cores for run in runs)


def _rates(runs: Sequence[Run]) -> bool:
    return any(run.rate is not None for run in runs)


CLIENT_COLUMNS = ["req/s", "p50", "p90", "p99", "errors", "load cpu"]  # what the clients measured; the rest, the server
COLUMNS = [*CLIENT_COLUMNS, "batch", "queue", "run", "srv cpu", "wkr cpu"]
CAPTION = ("req/s: successful (2xx) answers per second; p50, p90, p99: their latency, ms; errors: answers by "
           "non-2xx status, and requests with no answer, with what the first of each said; load cpu: CPU cores "
           "the client processes sending the load used; batch: mean batch size the server formed; queue: mean "
           "wait in its queue, ms; run: mean time a worker took per batch, ms; srv cpu, wkr cpu: CPU cores the "
           "server's event loop (which reads HTTP with one front, and forms batches) and the workers used meanwhile")
RATE_CAPTION = ("rate: requests sent per second on a schedule, whatever the server's pace (an open loop; latencies "
                "run from when each request was due); conc.: the most in flight at once; backlog: requests due and "
                "not yet answered halfway through the schedule and at its end, about even when the server keeps "
                "up, growing when it falls behind; ≥: a lower bound, where requests due were never sent (unsent, "
                "among the errors), each counted with its wait until the time was up; ")
STAGE_COLUMNS = ["pre", "fwd", "post"]
STAGES_CAPTION = ("; pre, fwd, post: of a batch's run, the mean ms of the handle's preprocess, forward (or its own "
                  "run_batch) and postprocess, each over the batches it ran in (a pipelined worker's preprocess "
                  "runs beside the batch before it)")
FRONTS_CAPTION = "; fronts cpu: CPU cores the HTTP front processes (HttpWorkers) used meanwhile"
GPU_CAPTION = "; GPU %: the mean utilisation of the server's GPUs meanwhile (the driver's, from /stats)"


def _console(**kwargs: Any) -> Any:
    from rich.console import Console

    # an output that is not UTF-8 (LANG=C, PYTHONIOENCODING=ascii): the title's "·" raised, and a bench's
    # files, written after the table, were lost with minutes of measuring; such characters go as "?"
    if "file" not in kwargs and hasattr(sys.stdout, "reconfigure") and not _utf8(sys.stdout):
        with contextlib.suppress(Exception):
            sys.stdout.reconfigure(errors="replace")
    console = Console(**kwargs)
    if not console.is_terminal and not console.is_jupyter:
        console.width = max(console.width, WIDTH)  # a file or a pipe: no need to squeeze the table
    console.on_broken_pipe = _reader_gone  # rich's own exits 1: a bench's files, after the table, went unwritten
    return console


def _utf8(stream: Any) -> bool:
    return (getattr(stream, "encoding", None) or "").lower().replace("-", "").replace("_", "") in ("utf8", "utf8sig")


def _reader_gone() -> None:
    """Standard output's reader has left (``| head``): nothing more goes to it (exit's flush included),
    and :class:`BrokenPipeError` tells the caller, which carries on with what it has left to do."""
    closed = os.open(os.devnull, os.O_WRONLY)
    os.dup2(closed, sys.stdout.fileno())
    os.close(closed)
    raise BrokenPipeError("standard output's reader has gone")


WIDTH = 130


def print_report(runs: Sequence[Run], title: str, notes: Sequence[str], best: Run | None = None) -> None:
    """The runs' table (several, where one is wider than the terminal), what its columns mean, and the
    notes, on standard output."""
    console = _console()
    for table in fitting_tables(runs, title, console.width, best):
        console.print(table)
    console.print(caption(runs), style="dim")
    for note in notes:
        console.print(note)


def write_csv(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> None:
    """Rows as CSV; the columns are every key any row has, in the order first seen. A count absent
    from a row is 0 there, unless the row is of a setting that was not measured (its ``setting_error``);
    any other value (a GPU's utilisation, say) is left empty: unknown."""
    import csv

    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows({column: row.get(column, 0 if column.startswith(COUNTS) and "setting_error" not in row
                                           else "") for column in columns} for row in rows)


COUNTS = ("status_", "failed_", "batches_of_")  # Run.row's columns of counts
