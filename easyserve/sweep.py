"""``easyserve.sweep``: find the ``ProcessPerGPU`` and ``MaxBatchSize`` that serve a model best.

For each pair in turn it starts a server (on a free port), measures it with :func:`easyserve.bench`
at each concurrency (or, with ``rate``, at each open-loop rate), and stops it. The report recommends
the setting with the most requests per second (or that held the highest rate) whose p99 latency
is within a bound (of runs within 5% of the most, the one with the lowest p99), and plots throughput
and p99 against the settings::

    report = easyserve.sweep("configs/imagenet_resnet18.yaml", "picture.jpg", process_per_gpu=[1, 2],
                             max_batch_size=[1, 8, 32], concurrency=[8, 32], p99_ms=100)
    report                      # the table, the best setting marked, and the recommendation
    report.plot("sweep.png")    # needs matplotlib: pip install 'easyserve[plot]'
    easyserve.sweep(config, "picture.jpg", rate=[500, 1000], p99_ms=100)   # which setting holds p99 at these loads

``easyserve bench --sweep CONFIG`` does the same from the shell.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import textwrap
from pathlib import Path
from typing import Any, Sequence

from .bench import (Interrupted, NothingMeasured, Rejected, Run, arrivals_seed, bench, check_options,
                    load_levels)
from .reports import print_report, runs_html, runs_table, settings_text, write_csv
from .config import Config
from .errors import ConfigError
from .onnxmodel import onnx_settings
from .payloads import payload_from
from .plots import PLOT_EXTRA, figure_class, latency_scale, legend_once, mark_doubtful

__all__ = ["sweep", "SweepReport", "PLOT_EXTRA"]


@dataclasses.dataclass
class SweepReport:
    """Every run of a sweep (a run per setting and concurrency or rate), and the setting it recommends."""

    handle: str
    payload: str
    runs: list[Run]
    p99_ms: float | None  # the bound a recommended setting keeps under; None: no bound
    notes: list[str] = dataclasses.field(default_factory=list)
    failed: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # settings whose server did not start
    setup: dict[str, Any] = dataclasses.field(default_factory=dict)  # the config, the settings, how each was measured
    complete: bool = True  # False: stopped (Ctrl-C, a server gone) before every setting was measured
    on_cpu: bool = False  # the config asked for GPUs, and the servers ran CPU workers: measured on CPU

    @property
    def best(self) -> Run | None:
        """The recommended run: none unless the sweep is :attr:`complete`; else, of the error-free runs
        whose p99 is within the bound, the one with the most requests per second, the lowest p99 among
        those within :data:`TIE` of it; at rates, the highest rate the server kept up with
        (:attr:`Run.fell_behind`), the lowest p99 among equals."""
        return self._best() if self.complete else None

    def _fit(self) -> list[Run]:
        """The runs that may be recommended: no errors, kept up with their rate, p99 within the bound, of a
        setting that did not fail every request, nor have its processes die or batches fail whole, at
        another level."""
        return [run for run in self.runs if _qualifies(run) and self._within_bound(run) and not self._failed(run)]

    def _failed(self, run: Run) -> bool:
        """Whether the run's setting failed every request at another level (this one measured), or had server
        processes die or batches fail whole in forward at any: under more load (larger batches, out of GPU
        memory) it fails in service too, whatever this level's numbers. (A worker that crashed at
        concurrency 16 was recommended at 4.)"""
        return _label(run) in self._failed_labels() or _label(run) in self._unsound_labels()

    def _unsound_labels(self) -> set[str]:
        """The labels of the settings that had server processes die or batches fail whole at some level."""
        return {_label(run) for run in self.runs if _unsound_itself(run)}

    def _failed_labels(self) -> set[str]:
        """The labels of the settings that failed (:attr:`failed`), at their start or at a level."""
        return {_label_of(each) for each in self.failed}

    def _within_bound(self, run: Run) -> bool:
        return self.p99_ms is None or (run.p99_ms is not None and run.p99_ms <= self.p99_ms)

    def _best(self) -> Run | None:
        fit = self._fit()
        if not fit or fit[0].rate is not None:
            return max(fit, key=_merit, default=None)
        most = max(run.requests_per_s for run in fit)
        return min((run for run in fit if run.requests_per_s >= (1 - TIE) * most),
                   key=lambda run: (run.p99_ms, -run.requests_per_s))

    @property
    def recommendation(self) -> str:
        """One sentence (or a few): the setting to use, or why none qualifies."""
        bound = "" if self.p99_ms is None else f" under a p99 of {self.p99_ms:g} ms"
        best = self._best()
        if not self.complete:
            so_far = "" if best is None else f" (the best measured: {_setting(best)}, {best.level})"
            return f"No recommendation: the sweep stopped before every setting was measured{so_far}."
        if best is not None:
            where = " (measured on CPU workers, not the GPUs the config asks for)" if self.on_cpu else ""
            return (f"Recommended{bound}{where}: {_setting(best)}: {best.requests_per_s:,.1f} requests/s with p99 "
                    f"{best.p99_ms:,.2f} ms at {best.level}.{self._close_second(best)}{self._faster_but(best)}")
        measured = [run for run in self.runs if _qualifies(run) and not self._failed(run)]
        if not measured:
            failed, unsound = self._failed_labels(), self._unsound_labels()
            why = ["had errors (see the errors column)"] * any(run.errors for run in self.runs) + [
                "had server processes that died"] * any(run.server_restarts for run in self.runs) + [
                "had batches that failed whole in forward"] * any(run.batches_run_apart for run in self.runs) + [
                "was of a setting that failed every request at another level"] * any(
                    _label(run) in failed for run in self.runs) + [
                "was of a setting whose processes died or batches failed whole at another level"] * any(
                    _label(run) in unsound and not _unsound_itself(run) for run in self.runs) + [
                "fell behind its rate"] * any(run.rate is not None for run in self.runs)
            why = why or ["gave no answer to judge it by"]
            said = why[0] if len(why) == 1 else f"{', '.join(why[:-1])} or {why[-1]}"
            return f"No setting qualifies: every run {said}."
        lowest = min(measured, key=lambda run: run.p99_ms)
        # a run within the bound that was left out for something else: the advice to allow a higher p99 was
        # given beside an error-free 20 ms run whose setting's batches had failed whole at another level
        within = [run for run in self.runs if run not in measured and run.p99_ms is not None
                  and self._within_bound(run) and self._left_out_for(run)]
        near = max(within, key=lambda run: run.requests_per_s, default=None)
        also = "" if near is None else (f" Within the bound, but left out for "
                                        f"{' and '.join(self._left_out_for(near))}: {_setting(near)}, {near.level}, "
                                        f"p99 {near.p99_ms:,.2f} ms.")
        return (f"No setting qualifies{bound}: the lowest p99 of a setting that may be recommended was "
                f"{lowest.p99_ms:,.2f} ms ({_setting(lowest)}, {lowest.level}). Allow a higher p99, or expect "
                f"fewer requests at once.{also}")

    def _close_second(self, best: Run) -> str:
        """A word on the runner-up of a closed loop: the run with the most requests/s, where that is not the
        recommended one (within :data:`TIE` of it, its p99 was higher); else another setting's within
        :data:`CLOSE`, which one run of each cannot tell apart."""
        fit = [run for run in self._fit() if run.rate is None]
        if best.rate is not None or not fit:
            return ""
        most = max(fit, key=lambda run: run.requests_per_s)
        said = ""
        if most is not best:
            said = (f" ({_setting(most)} served {most.requests_per_s:,.1f} requests/s at {most.level}, within "
                    f"{TIE:.0%}, with a higher p99: {most.p99_ms:,.2f} ms.)")
        # and another setting, not named already: where the fastest was one at another level, it went unsaid
        others = [run for run in fit if run.settings not in (best.settings, most.settings)]
        second = max(others, key=lambda run: run.requests_per_s, default=None)
        if second is None or second.requests_per_s < (1 - CLOSE) * best.requests_per_s:
            return said
        return said + (f" {_setting(second)} came close ({second.requests_per_s:,.1f} requests/s at {second.level}):"
                       " a difference this small may be noise; measure the two again, for longer, to tell them apart.")

    def _faster_but(self, best: Run) -> str:
        """A word on a closed-loop run that served more requests/s than the recommended one, but with errors:
        one error leaves a run out, and the reader should know what it cost. (At rates, the rates past what a
        setting holds fail as a matter of course.)"""
        beat = [run for run in self.runs if run.rate is None and self._left_out_for(run)
                and run.p99_ms is not None and self._within_bound(run) and run.requests_per_s > best.requests_per_s]
        top = max(beat, key=lambda run: run.requests_per_s, default=None)
        if top is None:
            return ""
        return (f" Left out for {' and '.join(self._left_out_for(top))}: {_setting(top)}, {top.level}, "
                f"{top.requests_per_s:,.1f} requests/s.")

    def _left_out_for(self, run: Run) -> list[str]:
        """Why a run is not recommended, its p99 and bound aside: its own errors, deaths or batches failed
        whole, its rate fallen behind, or its setting's failures at another level."""
        return [f"its errors ({run.errors_text()})"] * bool(run.errors) + [
            f"its {run.server_restarts} server process(es) that died"] * bool(run.server_restarts) + [
            f"its {run.batches_run_apart or 0:,} batches that failed whole in forward"] * bool(
                run.batches_run_apart) + [
            "falling behind its rate"] * bool(run.fell_behind) + [
            "its setting's failing every request at another level"] * (_label(run) in self._failed_labels()) + [
            "its setting's processes dying or batches failing whole at another level"] * (
                _label(run) in self._unsound_labels() and not _unsound_itself(run))

    def _order(self, label: str) -> tuple[int, str]:
        """Where a setting's label comes in the sweep (ProcessPerGPU, then MaxBatchSize, as they were given)."""
        pairs = ["x".join(map(str, pair)) for pair in itertools.product(self.setup.get("process_per_gpu", []),
                                                                         self.setup.get("max_batch_size", []))]
        return (pairs.index(label), "") if label in pairs else (len(pairs), label)

    def with_p99_bound(self, p99_ms: float | None) -> SweepReport:
        """The same runs judged against another bound: ``report.with_p99_bound(50).recommendation``."""
        _check_p99(p99_ms)
        return dataclasses.replace(self, p99_ms=p99_ms, runs=list(self.runs), notes=list(self.notes))

    def table(self) -> Any:
        """The runs as a ``rich`` table, the recommended one in bold green."""
        return runs_table(self.runs, self._title(), best=self.best)

    def _title(self) -> str:
        return f"{self.handle} · {self.payload}"

    def print(self) -> None:
        """The table, notes and recommendation on standard output."""
        print_report(self.runs, self._title(), [*self.notes, self.recommendation], self.best)

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        return {"handle": self.handle, "payload": self.payload, "p99_bound_ms": self.p99_ms, "complete": self.complete,
                "setup": self.setup,
                "recommended": None if best is None else {**best.settings, "concurrency": best.concurrency,
                                                          **({} if best.rate is None else {"rate": best.rate})},
                "recommendation": self.recommendation, "notes": self.notes, "failed": self.failed,
                "runs": [run.to_dict() for run in self.runs]}

    def to_json(self, path: str | os.PathLike) -> None:
        """Every run, the bound and the recommendation, as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")

    def to_csv(self, path: str | os.PathLike) -> None:
        """One row per run, the settings first, ``recommended`` true on the recommended one's; and one per
        setting that did not start or failed every request, with the first line of why in ``setting_error``
        (its other columns empty): read alone, the file said such a setting was never tried."""
        failed = [{**{k: v for k, v in each.items() if k != "error"},
                   "setting_error": str(each["error"]).partition("\n")[0]} for each in self.failed]
        best = self.best
        write_csv(path, [{**run.row(), "recommended": run is best} for run in self.runs] + failed)

    def plot(self, path: str | os.PathLike | None = None) -> Any:
        """Requests/s and p99 against the settings, a line per concurrency (or rate), the bound dashed and the
        recommended run starred (where none is, the title says why), runs whose server processes died or whose
        batches ran apart ringed as left out, and, where the server reported its GPUs, their mean utilisation;
        written to ``path`` if given. Returns the matplotlib figure."""
        Figure = figure_class()
        labels = list(dict.fromkeys(_label(run) for run in self.runs))
        # settings that failed: before any level was measured, or at a later level (its levels before kept)
        failed = [_label_of(each) for each in self.failed if _label_of(each) not in labels]
        partly = self._failed_labels() - set(failed)
        labels = sorted(labels + failed, key=self._order)  # in the sweep's order, those that failed among them
        on_gpus = any(run.gpu_util for run in self.runs)
        figure = Figure(figsize=(max(6.0, 1.1 * len(labels) + 2), 9.0 if on_gpus else 6.5), layout="constrained")
        axes = figure.subplots(3 if on_gpus else 2, 1, sharex=True)
        rate, p99, bottom = axes[0], axes[1], axes[-1]
        for level in dict.fromkeys(run.level for run in self.runs):
            runs = {_label(run): run for run in self.runs if run.level == level}
            xs = [i for i, label in enumerate(labels) if label in runs]
            rate.plot(xs, [runs[labels[i]].requests_per_s for i in xs], marker="o", label=level)
            p99.plot(xs, [_nan(runs[labels[i]].p99_ms) for i in xs], marker="o", label=level)
            if on_gpus:
                axes[2].plot(xs, [_nan(runs[labels[i]].gpu_percent) for i in xs], marker="o", label=level)
        best = self.best
        if best is not None:
            x = labels.index(_label(best))
            rate.plot([x], [best.requests_per_s], marker="*", markersize=16, color="gold", markeredgecolor="black",
                      linestyle="none", label="recommended")
            p99.plot([x], [best.p99_ms], marker="*", markersize=16, color="gold", markeredgecolor="black",
                     linestyle="none")
        if self.p99_ms is not None:
            p99.axhline(self.p99_ms, color="red", linestyle="--", label=f"p99 bound {self.p99_ms:g} ms")
        rate.set_ylabel("requests/s (2xx)")
        rate.set_ylim(0, 1.12 * max((run.requests_per_s for run in self.runs), default=0) or 1)
        p99.set_ylabel("p99 latency (ms)")
        latency_scale(p99, [run.p99_ms for run in self.runs] + [self.p99_ms])
        for level in dict.fromkeys(run.level for run in self.runs):
            runs = [(labels.index(_label(run)), run) for run in self.runs if run.level == level]
            mark_doubtful(rate, p99, [x for x, _ in runs], [run for _, run in runs], ["p99_ms"])
        # drawn as any other point, though never recommended: the text left them out, the plot did not say so
        unsound: dict[str, tuple[str, str]] = {}  # a setting's label: why it is left out, in what colour
        for why, (field, style) in UNSOUND.items():
            points = [(labels.index(_label(run)), run) for run in self.runs if getattr(run, field)]
            unsound.update({_label(run): (why, style["markeredgecolor"]) for _, run in points})
            for axis, name in ((rate, "requests_per_s"), (p99, "p99_ms")):
                shown = [(x, getattr(run, name)) for x, run in points if getattr(run, name) is not None]
                if shown:
                    axis.plot(*zip(*shown), markersize=13, markerfacecolor="none", markeredgewidth=1.5,
                              linestyle="none", label=legend_once(axis, f"left out: {why}"), **style)
        if on_gpus:
            axes[2].set_ylabel("GPU utilisation (%)")
            axes[2].set_ylim(0, 105)
        # a setting failed, or left out for what it did at one of its levels: at every level, as the text says
        ticks = [(f"{label}\nfailed", "red") if label in failed else (f"{label}\npartly failed", "red")
                 if label in partly else (f"{label}\n{unsound[label][0]}", unsound[label][1]) if label in unsound
                 else (label, None) for label in labels]
        bottom.set_xticks(range(len(labels)), [text for text, _ in ticks])
        for tick, (_, color) in zip(bottom.get_xticklabels(), ticks):
            if color is not None:
                tick.set_color(color)
        bottom.set_xlabel("ProcessPerGPU x MaxBatchSize")
        for axis in axes:
            axis.legend(fontsize="small")
            axis.grid(alpha=0.3)
        # wrapped: a payload's description is longer than a figure of few settings is wide
        title = textwrap.fill(f"{self.handle}: {self.payload}", 70)
        if best is None:  # no star, and the bound drawn: nothing said that no setting was recommended, nor why
            # (the recommendation's first sentence; its advice, and the runs it names, are the report's)
            title += "\n" + textwrap.fill(self.recommendation.split(". ")[0].removesuffix(".") + ".", 90)
        figure.suptitle(title, fontsize="medium")
        if path is not None:
            figure.savefig(path, dpi=110)
        figure.show_in_notebook()
        return figure

    def _repr_html_(self) -> str:
        return runs_html(self.runs, self._title(), [*self.notes, self.recommendation], best=self.best)

    def __repr__(self) -> str:  # a notebook's plain text of it: not the machine's name and kernel (setup)
        best = self.best
        return (f"<SweepReport {self.handle}: {len(self.runs)} run(s)"
                + (f", recommended {settings_text(best.settings)}{best.level}" if best is not None else "") + ">")


def sweep(config: Any = None, payload: Any = None, *, process_per_gpu: Sequence[int] = (1, 2),
          max_batch_size: Sequence[int] = (1, 8), concurrency: int | Sequence[int] | None = None,
          rate: float | Sequence[float] | None = None, arrivals: str = "constant", seed: int | None = None,
          duration: float = 10.0, requests: int | None = None, warmup: float = 2.0, p99_ms: float | None = None,
          clients_processes: int | None = None, timeout: float = 60.0, progress: bool | None = None,
          start_timeout: float | None = None, **overrides: Any) -> SweepReport:
    """Serve ``config`` with each ``ProcessPerGPU`` x ``MaxBatchSize`` pair in turn, measure each with
    :func:`~easyserve.bench` (``payload``, ``concurrency``, ``rate``, ``duration``... as there; the
    concurrencies 8 and 32 when neither is given), and recommend. Poisson arrivals are the same for
    every setting (one ``seed``, drawn once when none is given), so that settings meet the same bursts.

    ``config`` is a :class:`~easyserve.Config`, a YAML file, an ``.onnx`` model (served as it is, by
    :class:`~easyserve.OnnxModel`), or a handle (a class, or ``"module:Class"``); ``None`` serves the
    built-in demo model. Keyword ``overrides`` (``GPUs="cpu"``, ``HandleArgs={...}``)
    replace its values. Each server listens on a free port and is stopped before the next starts,
    whatever happens; every setting's config is checked before the first starts. A server that does not
    start raises :class:`~easyserve.errors.StartupError` for the smallest setting (the fewest processes,
    the smallest batches) when no setting was measured before it: the handle cannot start at all. Any
    other (too large for the GPU's memory, say) is noted, in :attr:`SweepReport.failed` too, and the
    sweep goes on, as it does past a setting that starts but fails every warm-up request (its copies
    loaded, then every ``forward`` out of memory), unless that is the smallest, with nothing measured
    (then the payload is at fault). A setting whose server processes died, or whose batches failed whole
    in ``forward`` (and ran again in parts), at any level, is not recommended. ``p99_ms`` bounds the
    recommendation. Ctrl-C raises :class:`~easyserve.bench.Interrupted`, and a server gone away, or
    refusing every request of the smallest setting, a :class:`~easyserve.bench.NothingMeasured` (``Unreachable``,
    ``Rejected``; ``from easyserve.bench import Interrupted, NothingMeasured``), with the report of
    what was measured before, which recommends nothing::

        easyserve.sweep("configs/imagenet_resnet18.yaml", "picture.jpg", max_batch_size=[1, 16], p99_ms=200)
    """
    from .answers import one_line
    from .errors import StartupError
    from .server import Server

    if rate is None and concurrency is None:
        concurrency = (8, 32)
    # every mistake is told now, not after a server has started or a setting has been measured
    load_levels(concurrency, rate, arrivals)
    check_options(requests, duration, clients_processes, timeout, warmup)
    payload = payload_from(payload)  # a file not there, before a model is loaded to measure it
    _check_p99(p99_ms)
    seed = arrivals_seed(arrivals, seed)
    _check_overrides(overrides)
    base = as_config(config).replace(**overrides)
    pairs = list(itertools.product(_numbers(process_per_gpu, "process_per_gpu"),
                                   _numbers(max_batch_size, "max_batch_size")))
    configs = [base.replace(ProcessPerGPU=processes, MaxBatchSize=batch, Port=0) for processes, batch in pairs]
    # what the servers ran with: the swept keys' values, each setting's in its runs (the base's 1 and 8 were
    # recorded, though no server used them)
    served = {**_shareable(configs[0].to_dict()), "ProcessPerGPU": list(dict.fromkeys(p for p, _ in pairs)),
              "MaxBatchSize": list(dict.fromkeys(b for _, b in pairs))}
    # the setting that needs the least (memory, above all): failing with nothing measured, no setting can run
    smallest = (min(p for p, _ in pairs), min(b for _, b in pairs))
    handle = base.handle.__qualname__ if isinstance(base.handle, type) else str(base.handle or "built-in demo")
    report = SweepReport(handle, "", [], p99_ms, setup={
        "config": served, "process_per_gpu": served["ProcessPerGPU"], "max_batch_size": served["MaxBatchSize"]})
    for (processes, batch), each in zip(pairs, configs):
        setting = {"ProcessPerGPU": processes, "MaxBatchSize": batch}
        stopped: Interrupted | NothingMeasured | None = None  # how bench ended, if it did not finish
        found = None  # what bench measured, once it has
        server = None
        try:
            server = Server(each).start(timeout=start_timeout)
            try:
                found = bench(server.url, payload, concurrency=concurrency, rate=rate, arrivals=arrivals, seed=seed,
                              duration=duration, requests=requests, warmup=warmup,
                              clients_processes=clients_processes, timeout=timeout, api_key=base.required_key,
                              progress=progress, settings=setting)
            except (Interrupted, NothingMeasured) as exc:
                stopped = exc
                raise
            finally:
                server.stop()
        except StartupError as exc:
            if not report.runs and (processes, batch) == smallest:  # a handle that cannot start at all
                raise
            # a larger setting may not fit (out of GPU memory), listed first or not: the settings measured are
            # kept, the rest tried
            report.failed.append({**setting, "error": str(exc)})
            first = str(exc).partition("\n")[0]  # the traceback below it is in the JSON
            report.notes.append(f"{_words(setting)}: the server did not start: {one_line(first, 300)}")
            continue
        except Rejected as exc:
            # the smallest setting, nothing measured, not even its own first level: the payload, not the setting
            if not report.runs and not exc.report.runs and (processes, batch) == smallest:
                _add(report, exc.report, each)
                report.complete = False
                # named by its setting, not the URL of a server stopped since, whose port meant nothing
                raise Rejected(f"the server of the smallest setting ({_words(setting)}), so likely for the "
                               "payload, not the setting,", report, exc.statuses, exc.failures, exc.texts,
                               exc.api_key) from None
            # started, then every request failed (out of GPU memory once more copies were loaded): as a
            # setting that does not start, noted, and the sweep goes on; the levels it measured are kept
            _add(report, exc.report, each)
            report.failed.append({**setting, "error": str(exc)})
            first = str(exc).partition("\n")[0]
            report.notes.append(f"{_words(setting)}: every warm-up request failed: {one_line(first, 300)}")
            continue
        except (Interrupted, NothingMeasured) as exc:  # keep the settings measured before, and this one's levels
            _add(report, exc.report, each)
            report.complete = False
            if isinstance(exc, Interrupted):  # its message counted this setting's runs alone: said again of all
                raise Interrupted(report, exc.level) from None
            exc.report = report
            raise
        except KeyboardInterrupt:  # while a server started or stopped
            if server is not None and server.state != "stopped":  # it came before stop() could begin
                server.stop(drain_timeout=0)
            label = _words(setting)
            if found is not None:  # measured whole, then its server stopping: the measurement is kept
                _add(report, found, each)
                report.notes.append(f"interrupted while stopping the server for {label}, once it was measured")
            else:
                if stopped is not None:  # a second Ctrl-C, as the server stopped: keep what the first kept
                    _add(report, stopped.report, each)
                report.notes.append(f"interrupted while starting or stopping the server for {label}")
            report.complete = False
            raise Interrupted(report, label) from None
        _add(report, found, each)
    return report


SWEPT = {"process_per_gpu": "ProcessPerGPU", "max_batch_size": "MaxBatchSize"}  # the fields a sweep sets itself


def _check_overrides(overrides: dict[str, Any]) -> None:
    """Refuse an override of a key the sweep sets for each setting (``ConfigError``): ``ProcessPerGPU=2`` was
    ignored, and the JSON said 2 though no server ran with it."""
    from .config import by_field

    for field, (key, value) in by_field({k: v for k, v in overrides.items() if v is not None}).items():
        if field in SWEPT:
            raise ConfigError(f"{key}={value!r}: the sweep sets {SWEPT[field]} itself, for each setting; give "
                              f"{field}=[{value!r}] to measure that value (--{field.replace('_', '-')} from the shell)")


def _shareable(config: dict[str, Any]) -> dict[str, Any]:
    """A config for a sweep's JSON, which is passed around: HandleArgs that look like credentials (a
    model hub's token) hidden, as ApiKey is."""
    secret = re.compile(r"token|secret|password|passwd|credential|key", re.IGNORECASE)
    config["HandleArgs"] = {name: "***" if secret.search(str(name)) else value
                            for name, value in config["HandleArgs"].items()}
    return config


def _add(report: SweepReport, found: Any, config: Config) -> None:
    report.payload = report.payload or found.payload
    report.setup = {**found.setup, **report.setup}  # how each setting was measured, and the config's
    report.runs.extend(found.runs)
    report.notes.extend(found.notes)
    devices = found.setup.get("server_devices")
    # GPU ids asked for, on a machine without them: the server ran CPU workers (its log said so), and the
    # sweep recommended a setting as if measured on the GPUs. ("auto" asks for GPUs only where there are some.)
    if isinstance(config.gpus, tuple) and config.gpus and devices and not any("cuda" in d for d in devices):
        if not report.on_cpu:
            asked = ", ".join(map(str, config.gpus))
            report.notes.append(f"the config asks for GPU {asked}, but the server ran its workers on CPU (this "
                                "machine has none it could use; the server's log says why): every number here was "
                                "measured on CPU, and a setting that serves best there may not on the GPUs")
        report.on_cpu = True


def _check_p99(p99_ms: float | None) -> None:
    if p99_ms is not None and (isinstance(p99_ms, bool) or not 0 < p99_ms < math.inf):
        raise ValueError(f"p99_ms: expected a number of milliseconds above 0 (or None for no bound), got {p99_ms!r}")


def as_config(config: Any) -> Config:
    if config is None:
        return Config()
    if isinstance(config, Config):
        return config
    if isinstance(config, (str, os.PathLike)) and Path(config).suffix.lower() in (".yaml", ".yml"):
        return Config.from_yaml(config)
    if isinstance(config, (str, os.PathLike)) and Path(config).suffix.lower() == ".onnx":
        return Config.from_dict(onnx_settings(config))  # the model served as it is
    return Config().replace(handle=config)


def _numbers(values: int | Sequence[int], name: str) -> list[int]:
    found = [values] if isinstance(values, int) else list(values)
    if not found or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in found):
        raise ValueError(f"{name}: expected whole numbers of at least 1, got {values!r}")
    return found


TIE = 0.05  # runs within this share of the most requests/s count as equal: the lowest p99 of them is recommended
CLOSE = 0.10  # another setting within this share of the recommended one's requests/s is named as close


def _qualifies(run: Run) -> bool:
    """Whether a run may be recommended, bound aside: answered, no errors, kept up with its rate, and
    no server process died meanwhile (a setting whose workers are killed for their memory, retried
    on fresh ones, answered every request and was recommended)."""
    return run.errors == 0 and not run.fell_behind and run.p99_ms is not None and not run.server_restarts


def _unsound_itself(run: Run) -> bool:
    """Whether the run itself had server processes die or batches fail whole (its setting's other runs aside)."""
    return bool(run.server_restarts or run.batches_run_apart)


def _merit(run: Run) -> tuple[float, float]:
    """How a run ranks: by requests per second in a closed loop (what the server did); by the rate
    it was offered in an open loop (its requests/s only tells the schedule's chance variations
    apart), then by the lowest p99."""
    if run.rate is None:
        return run.requests_per_s, 0.0
    return run.rate, -(run.p99_ms or 0.0)


def _setting(run: Run) -> str:
    return _words(run.settings)


def _words(settings: dict[str, Any]) -> str:
    return ", ".join(f"{key} {value}" for key, value in settings.items())


def _label(run: Run) -> str:
    return "x".join(str(value) for value in run.settings.values())


def _label_of(failed: dict[str, Any]) -> str:
    return "x".join(str(value) for key, value in failed.items() if key != "error")


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


# what leaves a sweep's setting out of the recommendation whatever its numbers, by the run field that counts it,
# and how its points are ringed (the errors' red circle apart)
UNSOUND = {"processes died": ("server_restarts", {"marker": "D", "markeredgecolor": "darkviolet"}),
           "batches run apart": ("batches_run_apart", {"marker": "s", "markeredgecolor": "darkorange"})}




