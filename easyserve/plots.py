"""Plots of measured runs (``easyserve bench`` and ``sweep``), with matplotlib, an optional extra.

A figure here is made without pyplot (whose global state a library should leave alone), and shows
itself in a notebook once its cell has run, as a pyplot figure does (:func:`figure_class`)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from .bench import Run

PLOT_EXTRA = "pip install 'easyserve[plot]'"  # what a user without matplotlib is told


LOG_SCALE_RATIO = 20.0  # latencies further apart than this share a log scale: one overload hid every other point


def latency_scale(axis: Any, values: Sequence[float | None]) -> None:
    """Latencies on ``axis`` from 0 with room above, or on a log scale where the highest is more than
    :data:`LOG_SCALE_RATIO` times the lowest: a level that fell behind (seconds) put every other point, the
    recommended one's star and the bound among them, on the axis's floor."""
    shown = [value for value in values if value is not None and value > 0 and math.isfinite(value)]
    if shown and max(shown) > LOG_SCALE_RATIO * min(shown):
        axis.set_yscale("log")
        axis.set_ylim(min(shown) / 1.5, max(shown) * 4)  # room above for the legend
        axis.set_ylabel(f"{axis.get_ylabel()}, log scale")
    else:
        axis.set_ylim(0, 1.35 * max(shown, default=0) or 1)  # room above the highest point, a star and the legend


def mark_doubtful(rate: Any, latency: Any, xs: Sequence[int], runs: Sequence[Run], names: Sequence[str]) -> None:
    """Ring the points that are not what they seem: on ``rate``, runs with errors (red); on ``latency``, the
    percentiles ``names`` that are lower bounds (an open loop's requests due and never sent, which would have
    waited longer: ``≥`` in the table), as upward triangles. Each kind is in its axis's legend once."""
    wrong = [(x, run.requests_per_s) for x, run in zip(xs, runs) if run.errors]
    if wrong:
        rate.plot(*zip(*wrong), marker="o", markersize=13, markerfacecolor="none", markeredgecolor="red",
                  linestyle="none", label=legend_once(rate, "with errors"))
    for name in names:
        bounds = [(x, getattr(run, name)) for x, run in zip(xs, runs) if run.unsent and getattr(run, name) is not None]
        if bounds:
            latency.plot(*zip(*bounds), marker="^", markersize=11, markerfacecolor="none", markeredgecolor="black",
                         linestyle="none", label=legend_once(latency, "at least (requests never sent)"))


def legend_once(axis: Any, label: str) -> str:
    """``label`` for the first line of ``axis`` that has it; matplotlib's no-legend label after that."""
    return "_nolegend_" if label in [line.get_label() for line in axis.get_lines()] else label


def figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(f"plotting needs matplotlib, an optional extra: {PLOT_EXTRA}") from None

    class ShownFigure(Figure):
        """A figure that a notebook shows as a picture even where pyplot was never imported (pyplot is
        what registers the inline display; a bare Figure keeps clear of its global state).

        Made in a Jupyter kernel, it shows itself once its cell has run (:meth:`show_in_notebook`), as
        a pyplot figure does: shown only as the cell's value, ``sweep.plot();``, ``plt.show()`` after
        it, or a line after it, showed nothing. Shown as that cell's value, it is not shown again; and
        either way it is drawn as the cell left it (a title set after ``plot()``)."""

        def _png(self) -> bytes:
            import io

            buffer = io.BytesIO()
            self.savefig(buffer, format="png", dpi=90)
            return buffer.getvalue()

        def show_in_notebook(self) -> None:
            """In a Jupyter kernel, show it when the running cell ends, unless the cell shows it itself."""
            from .notebook import running_kernel

            if running_kernel() is None:  # a script, a terminal's IPython: the caller shows or saves it
                return
            _show_after_cell(self)

        def _ipython_display_(self) -> None:
            _UNSHOWN[:] = [figure for figure in _UNSHOWN if figure is not self]  # shown here: not again at the end
            self.show_now()

        def show_now(self) -> None:
            """Show it in the notebook's output, as it is now."""
            from IPython.display import display

            display({"image/png": self._png(), "text/plain": repr(self)}, raw=True)

    ShownFigure.__name__ = ShownFigure.__qualname__ = "Figure"  # a bench's plot said it was a "SweepFigure"
    return ShownFigure


_UNSHOWN: list = []  # figures a cell made, to show once it has run (ShownFigure.show_in_notebook)
_shows_after_cells = False  # whether this kernel has been asked to, once: the callback stays for every cell


def _show_after_cell(figure: Any) -> None:
    global _shows_after_cells
    from IPython import get_ipython

    _UNSHOWN.append(figure)
    if not _shows_after_cells:
        get_ipython().events.register("post_execute", _show_unshown)
        _shows_after_cells = True


def _show_unshown() -> None:
    """After a cell: show the figures it made and did not show itself, as it left them."""
    figures, _UNSHOWN[:] = list(_UNSHOWN), []
    for figure in figures:
        figure.show_now()
