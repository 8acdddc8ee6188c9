"""A server in a notebook: the live dashboard (``server.dashboard()``) and the status card a
:class:`~easyserve.Server` shows as a cell's result (``_repr_html_``).

Both draw :meth:`Server.stats() <easyserve.Server.stats>`, the numbers ``/stats`` answers: nothing
here counts anything. The server imports this module only when a notebook asks for one of them, and
ipywidgets only when a dashboard is made, so a server that never runs in Jupyter never loads it.

Every value shown (a handle's name, its arguments, a worker's error, a log line) is HTML-escaped.
"""

from __future__ import annotations

import html
import http
import reprlib
import threading
import time
from typing import TYPE_CHECKING, Any

from .answers import one_line
from .slots import marked, slots
from .stats import RATE_S, answered

if TYPE_CHECKING:
    from .logs import LogLine
    from .server import Server

__all__ = ["Dashboard", "card"]

UP = ("idle", "busy")
STATE_COLOURS = {"running": "#1a7f37", "idle": "#1a7f37", "busy": "#0969da", "starting": "#9a6700",
                 "retiring": "#9a6700", "stopping": "#9a6700", "dead": "#cf222e", "failed": "#cf222e",
                 "stopped": "#6e7781"}
TABLE = "border-collapse: collapse; font-size: 12px"
CELL = "padding: 1px 8px; text-align: left"
ARGS_SHOWN = 120  # characters of HandleArgs a card shows


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _state(state: str) -> str:
    return f'<b style="color: {STATE_COLOURS.get(state, "inherit")}">{_e(state)}</b>'


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f} ms"


def _table(head: list[str], rows: list[list[str]]) -> str:
    """A table whose cells are HTML already escaped by the caller."""
    heads = "".join(f'<th style="{CELL}">{h}</th>' for h in head)
    body = "".join("<tr>" + "".join(f'<td style="{CELL}">{c}</td>' for c in row) + "</tr>" for row in rows)
    return f'<table style="{TABLE}"><tr>{heads}</tr>{body}</table>'


def _arguments(server: Server) -> str:
    # reprlib, bounded as it goes: a plain repr of arguments a YAML alias bomb had expanded a billion
    # times ran for half a minute and out of memory before it was cut short
    shown = reprlib.Repr()
    shown.maxlevel, shown.maxdict, shown.maxlist, shown.maxtuple = 4, 16, 16, 16
    shown.maxstring = shown.maxother = ARGS_SHOWN
    text = shown.repr(dict(server.config.handle_args))
    return text if len(text) <= ARGS_SHOWN else text[:ARGS_SHOWN - 1] + "…"


# -- the card ----------------------------------------------------------------------------------------


def card(server: Server) -> str:
    """The compact HTML status card of ``server``: state, URL, handle, workers, queue, requests, and
    why a worker is down; once stopped, what its last run did."""
    lines = [f"<b>easyserve</b> {_state(server.state)}"
             + (f' <a href="{_e(server.url)}" target="_blank">{_e(server.url)}</a>' if server.url else "")]
    handle = f"handle <code>{_e(server._handle_name())}</code>"
    if server.config.handle_args:
        handle += f" args <code>{_e(_arguments(server))}</code>"
    lines.append(handle)
    if server.state != "stopped":
        try:
            stats = server.stats(timeout=1.0)
        except TimeoutError:
            lines.append("(the server's event loop did not answer within 1 s)")
        else:
            workers = stats["workers"]
            counted = slots(workers)
            ready = sum(w["state"] in UP for w in counted)
            states = ", ".join(f"{_e(w['name'])} {marked(w, _state(w['state']))}" for w in workers)
            lines.append(f"workers {ready}/{len(counted)} ready ({states}) · queue {stats['queue_depth']} · "
                         f"answered {answered(stats)} · restarts {stats['restarts']}")
            # why a worker is down, in its one line (the traceback is in stats() and logs())
            lines.extend(f'<span style="color: {STATE_COLOURS["failed"]}">{_e(w["name"])}: '
                         f'{_e(one_line(w["error"], 160))}</span>' for w in workers if w.get("error"))
    elif server._start_failure is not None:  # its last run never served: why, rather than "last run: 0 s"
        lines.append(f'<span style="color: {STATE_COLOURS["failed"]}">{_e(server._start_failure)}</span>')
    elif server._last_stats is not None:  # what its last run did
        stats = server._last_stats
        answers = ", ".join(f"{count} × {status}" for status, count in stats["statuses"].items())
        lines.append(f"last run: {stats['uptime_s']:.0f} s · answered {answered(stats)}"
                     + (f" ({_e(answers)})" if answers else "") + f" · restarts {stats['restarts']}")
    return ('<div style="display: inline-block; border: 1px solid #d0d7de; border-radius: 6px; '
            'padding: 4px 10px; font-family: sans-serif; font-size: 13px; line-height: 1.6">'
            + "<br>".join(lines) + "</div>")


# -- the dashboard's parts ---------------------------------------------------------------------------


def _header(server: Server, state: str, note: str = "", again: bool = False) -> str:
    """The dashboard's first line; ``again``: the server was started again since the run it followed ended."""
    parts = [f"<b>easyserve</b> {_state(state)}"]
    if state != "stopped" and server.url:
        parts.append(f'<a href="{_e(server.url)}" target="_blank">{_e(server.url)}</a>')
    parts.append(f"handle <code>{_e(server._handle_name())}</code>")
    if state != "stopped":
        parts.append(f"updated {time.strftime('%H:%M:%S')}")
    elif again:
        parts.append("final numbers of the run it followed")
        note = note or _since(server)
    elif server._start_failure is not None:
        note = note or server._start_failure
    else:
        parts.append("final numbers of its last run" if server._last_stats is not None else "not started yet")
    if note:
        parts.append(f'<span style="color: #cf222e">{_e(note)}</span>')
    return '<div style="font-family: sans-serif; font-size: 14px">' + " · ".join(parts) + "</div>"


def _since(server: Server) -> str:
    """What became of a server since the run a dashboard followed ended: started again, and how it went."""
    if server._start_failure is not None:
        return f"a start since failed: {server._start_failure}"
    if server.state == "stopped":
        return "the server was started again, and stopped, since"
    return "the server was started again since: server.dashboard() shows the new run"


def _workers(workers: list[dict[str, Any]]) -> str:
    rows = [[_e(w["name"]), _e(w.get("device", "–")), _e(w.get("pid", "–")),
             marked(w, _state(w["state"])),
             _e(w["restarts"]), _e(w["batches"]), _e(w.get("error", ""))] for w in workers]
    return _table(["worker", "device", "pid", "state", "restarts", "batches", ""], rows)


def _numbers(stats: dict[str, Any], previous: dict[str, Any] | None = None) -> str:
    # the rate is of the last seconds and the latencies of the last minute (a reader took a stopped server's
    # rate for an average of its run), the cores of the time since the last look
    numbers = {"queue": stats["queue_depth"], f"answers/s, last {RATE_S} s": f"{stats['requests_per_s']:.1f}",
               "p50": _ms(stats["latency_p50_ms"]), "p99": _ms(stats["latency_p99_ms"]),
               "answered": answered(stats), "timeouts": stats["timeouts"], "restarts": stats["restarts"],
               "CPU cores: server · workers": _cores(stats, previous),
               "ms a batch: pre · fwd · post": _stages(stats.get("stages", {}))}
    for gpu in stats.get("gpus", []):
        numbers[f"GPU {gpu['gpu']}"] = _gpu(gpu)
    monitoring = stats.get("gpu_monitoring") or {}
    if monitoring.get("problem"):  # why the GPUs' numbers are missing, or stand at "–"
        numbers["GPUs not read"] = monitoring["problem"][:120]
    return _table(list(numbers), [[f"<b>{_e(v)}</b>" for v in numbers.values()]])


def _cores(stats: dict[str, Any], previous: dict[str, Any] | None) -> str:
    """``0.12 · 1.85``: the CPU cores the server (its event loop and any HTTP fronts) and the workers
    used since the ``previous`` numbers, or since the start."""
    previous = previous or {"uptime_s": 0.0, "cpu_s": dict.fromkeys(stats["cpu_s"], 0.0)}
    elapsed = stats["uptime_s"] - previous["uptime_s"]
    if elapsed <= 0:
        return "–"
    spent = {part: max(0.0, seconds - previous["cpu_s"].get(part, 0.0)) for part, seconds in stats["cpu_s"].items()}
    return f"{(spent['server'] + spent['fronts']) / elapsed:.2f} · {spent['workers'] / elapsed:.2f}"


def _stages(stages: dict[str, dict]) -> str:
    """``2.10 · 11.52 · 0.31``: the mean ms of the handle's preprocess, forward (or its own run_batch)
    and postprocess on a batch, since the start; ``–`` for one that has not run."""
    def mean(*names: str) -> str:
        for name in names:
            if stages.get(name, {}).get("batches"):
                return f"{stages[name]['seconds'] / stages[name]['batches'] * 1000:.2f}"
        return "–"
    return f"{mean('preprocess')} · {mean('forward', 'run_batch')} · {mean('postprocess')}"


def _gpu(reading: dict[str, Any]) -> str:
    """``87% · 12.3/140 GiB``: utilisation, then memory held of the GPU's whole."""
    busy = "–" if reading["utilization"] is None else f"{reading['utilization']:.0%}"
    used, total = reading["memory_used_bytes"], reading["memory_total_bytes"]
    if used is None or total is None:
        return busy
    return f"{busy} · {used / 2**30:.1f}/{total / 2**30:.0f} GiB"


def _statuses(statuses: dict[str, int]) -> str:
    rows = []
    for status, count in statuses.items():
        try:
            phrase = http.HTTPStatus(int(status)).phrase
        except ValueError:
            phrase = ""
        colour = "#cf222e" if int(status) >= 400 else "inherit"
        rows.append([f'<span style="color: {colour}">{_e(status)}</span>', _e(phrase), _e(count)])
    return _table(["status", "", "answers"], rows) if rows else "<i>no answers yet</i>"


def _batch_sizes(sizes: dict[str, int]) -> str:
    most = max(sizes.values(), default=0)
    rows = [[_e(size), f'<div style="background: #0969da; height: 0.8em; width: {8 * count / most:.2f}em"></div>',
             _e(count)] for size, count in sizes.items()]
    return _table(["batch size", "", "batches"], rows) if rows else "<i>no batches yet</i>"


def _log(lines: list[LogLine]) -> str:
    text = _e("\n".join(map(str, lines))) if lines else "(no worker output yet)"
    return ('<pre style="font-family: monospace; font-size: 11px; line-height: 1.3; max-height: 20em; '
            f'overflow: auto; margin: 0">{text}</pre>')


def _section(title: str) -> str:
    return f'<div style="font-family: sans-serif; font-size: 12px; color: #57606a; margin-top: 6px">{title}</div>'


# -- the dashboard -----------------------------------------------------------------------------------


class Dashboard:
    """A live view of a :class:`~easyserve.Server` (``server.dashboard()``): workers, queue,
    requests per second, latency percentiles, answers by status, batch sizes and the workers' last
    log lines, refreshed every ``interval`` seconds from a thread of its own until the server stops
    (its last view then says so, with the run's final numbers) or :meth:`close` is called. One made
    for a stopped server shows its last run's numbers once.

    Show it as a cell's result; its parts are ipywidgets ``HTML`` widgets (``header``, ``workers``,
    ``numbers``, ``statuses``, ``batch_sizes``, ``log``) laid out in ``view``.
    """

    def __init__(self, server: Server, interval: float = 1.0, log_lines: int = 15) -> None:
        import ipywidgets as widgets

        self.server = server
        self.interval = interval
        self.log_lines = log_lines
        made: list[Any] = []  # every widget it makes, to close them all

        def make(kind: Any, *args: Any, **kwargs: Any) -> Any:
            made.append(kind(*args, **kwargs))
            return made[-1]

        self.header, self.workers, self.numbers, self.statuses, self.batch_sizes, self.log = (
            make(widgets.HTML) for _ in range(6))
        self.view = make(widgets.VBox, [
            self.header, self.workers, self.numbers,
            make(widgets.HBox, [
                make(widgets.VBox, [make(widgets.HTML, _section("answers by status")), self.statuses],
                     layout=make(widgets.Layout, margin="0 32px 0 0")),
                make(widgets.VBox, [make(widgets.HTML, _section("batch sizes")), self.batch_sizes]),
            ]),
            make(widgets.HTML, _section(f"the workers' output, up to its last {log_lines} lines")), self.log,
        ])
        self._widgets = made
        self._over = server._over  # this run's end: the dashboard follows one run of the server
        self._wake = threading.Event()  # set at the run's end, and by close(): a closed one's thread ends at once
        self._over.woken.add(self._wake)
        self._closed = False
        self._lock = threading.Lock()  # a refresh and close() never interleave
        self._previous: dict[str, Any] | None = None  # the numbers of the refresh before, for rates
        self.refresh()
        self.thread = threading.Thread(target=self._follow, name="dashboard", daemon=True)
        if not self._over.is_set():
            self.thread.start()

    @property
    def running(self) -> bool:
        """Whether it still refreshes."""
        return self.thread.is_alive()

    def refresh(self) -> None:
        """Read the server's numbers and logs now and show them."""
        with self._lock:
            if self._closed:
                return
            stopped = self._over.is_set()
            # started again before this looked (stop(); start() in one cell): the server's numbers are the new
            # run's, and this view shows the end of its own
            again = stopped and self.server._over is not self._over
            note = ""
            try:
                stats = self._over.final_stats if again else self.server.stats()
                lines = self.server.logs(tail=self.log_lines)
            except TimeoutError as exc:  # a busy loop: keep the last numbers, say why
                stats, note = None, str(exc)
            self.header.value = _header(self.server, "stopped" if stopped else self.server.state, note, again)
            if stats is not None:
                self.workers.value = _workers(stats["workers"])
                self.numbers.value = _numbers(stats, self._previous)
                self._previous = stats
                self.statuses.value = _statuses(stats["statuses"])
                self.batch_sizes.value = _batch_sizes(stats["batch_sizes"])
                self.log.value = _log(lines)

    def close(self) -> None:
        """Stop refreshing and close its widgets."""
        with self._lock:
            self._closed = True
            self._wake.set()
            for widget in reversed(self._widgets):  # the view first, then its parts
                widget.close()
                # the layout and style each widget made for itself are widgets too, registered until closed:
                # 21 of them stayed for each dashboard a new one replaced
                for part in (getattr(widget, "layout", None), getattr(widget, "style", None)):
                    if part is not None:
                        part.close()

    def _follow(self) -> None:
        while not self._closed:
            self._wake.wait(self.interval)  # wakes at once when the server stops, or this closes
            over = self._over.is_set()
            if self._closed:
                return
            try:
                self.refresh()
            except Exception as exc:  # a view that stops updating would look like a server that hangs
                with self._lock:
                    if not self._closed:
                        self.header.value = _header(self.server, self.server.state,
                                                    f"refresh failed: {type(exc).__name__}: {exc}")
            if over:
                return

    def html(self) -> str:
        """What it shows now, as one static HTML fragment."""
        with self._lock:
            parts = [self.header.value, self.workers.value, self.numbers.value,
                     _section("answers by status"), self.statuses.value,
                     _section("batch sizes"), self.batch_sizes.value,
                     _section(f"the workers' output, up to its last {self.log_lines} lines"), self.log.value]
        return "<div>" + "".join(parts) + "</div>"

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        # The live widget where a frontend runs widgets; beside it, the view as static HTML at the
        # moment it was shown, for a saved notebook read where widgets do not run (GitHub, nbconvert).
        bundle = self.view._repr_mimebundle_(**kwargs)
        data, metadata = bundle if isinstance(bundle, tuple) else (bundle, None)
        data = {**(data or {}), "text/html": self.html(), "text/plain": repr(self)}
        return data if metadata is None else (data, metadata)

    def __repr__(self) -> str:
        return f"<Dashboard of {self.server!r}{'' if self.running else ' (not refreshing)'}>"
