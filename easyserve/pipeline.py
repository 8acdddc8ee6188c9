"""A batch's way through a handle, in two stages that a worker may run in threads and overlap.

``prepare`` runs ``preprocess`` on each task of a batch; ``finish`` stacks the inputs, runs
``forward`` once, and runs ``postprocess`` on each row. ``Handle.run_batch`` is exactly
``finish(prepare(tasks))``, one task after another. A worker runs the same two stages with
:class:`Lanes`, which spreads a batch's per-task calls over a few threads (image decoding in Pillow,
numpy and most codecs release the GIL, so they run side by side), and, with ``Pipeline`` on,
prepares its next batch while ``forward`` runs the current one.

Failures keep their meaning whatever runs where: an exception in ``preprocess`` fails its task alone
(400: the request's fault, or 500 for what only the handle's own code can raise, see
:func:`handle_fault`), one in ``forward`` the batch (500), one in ``postprocess`` its task (500),
and ``MemoryError`` propagates to the worker, which exits so that the server retries the batch
elsewhere (but an array larger than the machine's memory, asked for in ``preprocess``, is that
request's 400). A 500's traceback goes to the worker's log.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import importlib
import math
import os
import sys
import sysconfig
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from . import logs
from .errors import BadRequest

__all__ = ["Lanes", "Prepared", "prepare", "finish", "failure_message", "print_fault", "safe_str", "HANDLE_ERRORS",
           "handle_errors", "Traced"]

# What a handle's call may raise and still fail only its task or batch (MemoryError is caught before
# it, where it ends the worker). SystemExit too: argparse exits on a request's bad options; and
# asyncio's CancelledError, from a handle's own asyncio code. Each ended the worker, then its
# successor on the retry (two model loads for one request). Not KeyboardInterrupt: a handle called in
# a notebook's own process (run_batch) must stop when interrupted.
HANDLE_ERRORS = (Exception, SystemExit, asyncio.CancelledError)
IN_WORKER = False  # set in a worker process, which ignores SIGINT: a KeyboardInterrupt there is the handle's own


def handle_errors() -> tuple[type[BaseException], ...]:
    """:data:`HANDLE_ERRORS`, and in a worker any exception at all (MemoryError is caught before it): a
    library's own raise of KeyboardInterrupt, or of its own BaseException (gevent's Timeout, trio's
    Cancelled, a GeneratorExit) ended the worker, then its successor on the retry, and a server of one
    worker per GPU went unready for every such request. Called only as a raised exception is matched."""
    return (BaseException,) if IN_WORKER else HANDLE_ERRORS


# A call cheaper than this runs in the calling thread: handing it to another costs more (a future,
# a lock, a thread woken: 20-30 us a call), and a no-op handle's worker spent 40% of its time on it.
CHEAP_CALL_S = 100e-6
CALL_COST_WEIGHT = 0.2  # of the latest batch, in the running mean of a call's seconds


class Lanes:
    """Maps a function over a batch's items on up to ``threads`` threads; results keep the items' order.

    With one thread, or one item, the calls run in the calling thread, as a plain loop: a batch of
    one costs no hand-off to another thread. So do the calls of a ``kind`` that took under
    :data:`CHEAP_CALL_S` each, on a running mean: a ``preprocess`` that decodes a picture runs on
    the threads, one that reads a number does not. An exception ``fn`` raises reaches the caller (the
    first, in the items' order), as from a loop.

    With one thread, the loops of two threads (a pipelined worker prepares its next batch while it
    finishes the last) take turns: ``PreprocessThreads: 1`` is for a handle whose calls are not safe
    to run at once, and its ``postprocess`` ran beside its next batch's ``preprocess`` (a tokenizer
    shared by both: "Already borrowed").

    >>> Lanes(1).map(str, [1, 2])
    ['1', '2']
    """

    def __init__(self, threads: int = 1) -> None:
        self.threads = max(1, threads)
        # created lazily, and its threads too (ThreadPoolExecutor starts one per call while none is
        # free): a worker that only sees batches of one never starts a thread
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()  # a pipelined worker maps from two threads: one pool between them
        self._turns = threading.RLock()  # with one thread, its loops', one at a time
        self.cost: dict[str, float] = {}  # a call's seconds by kind, a running mean; unknown: on threads

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], kind: str = "") -> list[Any]:
        if self.threads == 1:
            with self._turns:
                return [fn(item) for item in items]
        if len(items) < 2:
            return [fn(item) for item in items]
        clock = time.perf_counter
        if self.cost.get(kind, math.inf) < CHEAP_CALL_S:
            began = clock()
            results = [fn(item) for item in items]
            self._learn(kind, (clock() - began) / len(items))
            return results
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="easyserve-lane")
        spent = []

        def timed(item: Any) -> Any:  # its own time, on its thread: not the hand-off's
            began = clock()
            try:
                return fn(item)
            finally:
                spent.append(clock() - began)

        results = list(self._executor.map(timed, items))
        self._learn(kind, sorted(spent)[len(spent) // 2])  # the median: not a call the others held up
        return results

    def _learn(self, kind: str, seconds: float) -> None:
        known = self.cost.get(kind)
        self.cost[kind] = seconds if known is None else known + CALL_COST_WEIGHT * (seconds - known)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)


SERIAL = Lanes(1)


@dataclasses.dataclass
class Prepared:
    """A batch after ``preprocess``: the tasks, the results known so far (a 400 for each task whose
    preprocess failed, ``None`` for the others), and the inputs of the ``kept`` tasks, in order.
    ``seconds``: the time each stage took on the whole batch, by its name, as it runs (``preprocess``,
    then :func:`finish`'s ``forward`` and ``postprocess``; a stage that did not run has none)."""

    tasks: list[dict]
    results: list[Any]
    inputs: list[Any]
    kept: list[int]
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    # forward failed on the whole batch (of several) and ran again in parts, to tell the failing requests apart:
    # the batch cost more calls than one, and /stats' batch sizes say it ran whole (batches_run_apart)
    apart: bool = False


class Traced(str):
    """A 500's message whose traceback the worker's log has already: one a handle's own ``run_batch``
    returns without it (``(500, "down")``) is written there too, where its answer points."""


class _Failed:
    """What a per-task call returns instead of raising, so one task's exception spares the others."""

    __slots__ = ("status", "message", "stage")

    def __init__(self, status: int, message: str, stage: str = "forward") -> None:
        # a 500's traceback (or its line) is in the log already: a run_batch that calls the default one
        # and passes its 500s on is not said again (see Traced)
        self.status, self.message = status, Traced(message) if status >= 500 else message
        self.stage = stage  # which call failed: forward, or stack or unstack around it


def _guarded(stage: str, fn: Callable[..., Any], handle: Any = None) -> Callable[[tuple], Any]:
    """``fn`` made to return a :class:`_Failed` where it raises: a 500, the handle's fault, or with
    ``handle`` (preprocess: the request is read there) a 400 unless :func:`handle_fault` says so. A
    :class:`BadRequest` is the request's fault in either stage, answered with its own status and message
    (``postprocess`` checking an option the request gave, as ``forward`` may: it was a 500)."""

    def call(args: tuple) -> Any:  # (task,) for preprocess, (row, task) for postprocess
        try:
            return fn(*args)
        except BadRequest as exc:  # the handle's own refusal, on purpose
            tell_refusal(f"{stage} refused {named([args[-1]])}", "DEBUG")
            return _Failed(exc.status, safe_str(exc) or f"{stage} refused the request")
        except MemoryError as exc:
            if handle is not None and impossible_allocation(exc):  # what the request asked for, not the worker's state
                return _Failed(400, failure_message(stage, exc))
            raise  # the worker's state, not the task's: the worker exits, the batch is retried
        except handle_errors() as exc:
            if handle is not None and not handle_fault(exc, handle):
                tell_refusal(f"{stage} refused {named([args[-1]])} (answered 400: said once for each line that "
                             f"refuses, as the handle's own bug may be what refused it)")
                return _Failed(400, failure_message(stage, exc))
            print_fault(f"{stage} failed for {named([args[-1]])}")  # the handle's fault: to the worker's log
            return _Failed(500, failure_message(stage, exc))

    return call


def impossible_allocation(exc: MemoryError) -> bool:
    """Whether numpy refused an array larger than this machine's memory, as a request sized from its
    own numbers (``np.zeros((h, w))``) can ask: that request alone fails (400), where a worker that
    runs out of memory is replaced (and ending a worker for it let one request take down two, each
    reloading its model)."""
    shape, dtype = getattr(exc, "shape", None), getattr(exc, "dtype", None)
    if not isinstance(shape, tuple) or getattr(dtype, "itemsize", None) is None:
        return False
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return False
    return math.prod(shape) * dtype.itemsize > physical


class Task(dict):
    """A request as a worker hands it to ``preprocess`` and ``postprocess`` (``task_info``,
    ``request_id``, ``parameters``...). A key it lacks is the handle's own mistake (``task["task_inf"]``),
    whatever the request held: it raises :class:`TaskKeyError`, a 500 with its traceback logged, where a
    ``KeyError`` was taken for a missing field of the request's, each client's 400, the log silent."""

    __slots__ = ()

    def __missing__(self, key: Any) -> Any:
        raise TaskKeyError(key, sorted(map(str, self)))


class TaskKeyError(KeyError):
    """A key a :class:`Task` lacks; a ``KeyError``, as a plain dict's would be."""

    def __str__(self) -> str:
        key, keys = self.args
        return f"the task has no key {key!r}; it has {', '.join(keys)}"


def handle_fault(exc: BaseException, handle: Any) -> bool:
    """Whether an exception can only be the handle's own bug, whatever the request held: a name
    misspelt or never imported, an import that fails, something left unwritten, an attribute its code
    names missing on the handle itself (``self.sesion``), or a key missing on the task itself
    (``task["task_inf"]``). Anything else that ``preprocess`` raises is taken as the request's fault
    (a ``KeyError`` for a missing field, a ``ValueError`` for bad base64, an ``AttributeError`` on a
    value of the wrong type, or for a name the request chose, on a module or the handle:
    ``getattr(np, info["dtype"])``, ``getattr(self, "mode_" + info["mode"])``). A ``SyntaxError`` or
    ``NotImplementedError`` is the handle's where its own code raised it; so is a ``TypeError`` of the
    call itself (a method set on the handle that takes other arguments), and a ``KeyboardInterrupt`` (a
    worker ignores SIGINT: its code raised it)."""
    if isinstance(exc, (NameError, ImportError, TaskKeyError, KeyboardInterrupt)):  # a worker ignores SIGINT
        return True
    if isinstance(exc, TypeError) and exc.__traceback__ is not None and exc.__traceback__.tb_next is None:
        return True  # raised by the call itself, which no frame of the method's began: its signature's
    if isinstance(exc, (SyntaxError, NotImplementedError)):  # the handle's, unless a library raised it
        return _raised_in_own_code(exc, handle)
    return isinstance(exc, AttributeError) and getattr(exc, "obj", None) is handle and _written(exc)


def _written(exc: AttributeError) -> bool:
    """Whether the attribute ``exc`` missed is named in the code that raised it (``self.sesion``, or
    ``getattr(self, "sesion")``): else the name was made as it ran, from what the request held
    (``getattr(self, "mode_" + info["mode"])``), and a name of the request's missing is its mistake."""
    tb = exc.__traceback__
    if tb is None or not isinstance(exc.name, str):
        return True
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    return exc.name in code.co_names or exc.name in code.co_consts


def _raised_in_own_code(exc: BaseException, handle: Any) -> bool:
    """Whether ``exc`` was raised in the handle's own code: the source file of its class or of a class
    it derives from, or any file outside the standard library, the installed packages and easyserve
    (a helper module beside the handle). A ``SyntaxError`` from numpy reading a dtype the request
    named (``"(,)i4"``), or a ``NotImplementedError`` from Pillow meeting a format it lacks, is the
    request's, and was a 500."""
    tb = exc.__traceback__
    if tb is None:
        return True
    while tb.tb_next is not None:
        tb = tb.tb_next
    where = tb.tb_frame.f_code.co_filename
    own = {getattr(fn, "__code__", None) and fn.__code__.co_filename
           for cls in type(handle).__mro__ for fn in vars(cls).values()}
    return where in own or not where.startswith(("<", *_LIBRARIES))


# where the code that is not a handle's own lies: the standard library, installed packages, easyserve
_LIBRARIES = tuple(sorted({*(os.path.join(path, "") for key, path in sysconfig.get_paths().items()
                             if key in ("stdlib", "platstdlib", "purelib", "platlib")),
                           os.path.join(os.path.dirname(os.path.abspath(__file__)), "")}))


def prepare(handle: Any, tasks: list[dict], lanes: Lanes = SERIAL) -> Prepared:
    """Run ``handle.preprocess`` on every task; a task whose preprocess raised gets its 400 (or 500) now."""
    began = time.perf_counter()
    outcomes = lanes.map(_guarded("preprocess", handle.preprocess, handle), [(task,) for task in tasks], "preprocess")
    prepared = Prepared(tasks, [None] * len(tasks), [], [], {"preprocess": time.perf_counter() - began})
    for i, outcome in enumerate(outcomes):
        if isinstance(outcome, _Failed):  # fail it alone
            prepared.results[i] = (outcome.status, outcome.message)
        else:
            prepared.inputs.append(outcome)
            prepared.kept.append(i)
    return prepared


_Kind = tuple  # an exception's type name and where it was raised: (name, (file, line))


def finish(handle: Any, prepared: Prepared, lanes: Lanes = SERIAL) -> list[tuple[int, Any]]:
    """Run ``forward`` on the prepared inputs as one batch, then ``postprocess`` on each row; returns
    one ``(status, result or message)`` per task.

    A batch whose ``forward`` fails is run again in parts (see :func:`_apart`), so that a request that
    fails does not fail the others with it: one whose input theirs cannot be stacked with (a list of
    two numbers among lists of three) failed every request batched with it."""
    results, kept = prepared.results, prepared.kept
    if not kept:
        return results
    global _last_run
    told: set[_Kind] = set()  # the kinds of exception (and where raised) whose traceback this batch logged
    began = time.perf_counter()
    tasks = [prepared.tasks[i] for i in kept]  # each input's request, which a traceback names
    rows = _forward(handle, prepared.inputs, told, tasks)
    took = time.perf_counter() - began
    if isinstance(rows, _Failed):
        prepared.apart = len(kept) > 1
        rows = _apart(handle, prepared.inputs, tasks, rows, told, max(took, _last_run)) if len(kept) > 1 else [rows]
    else:
        _last_run = took
    prepared.seconds["forward"] = time.perf_counter() - began  # with the failed batch's parts run again, if it was
    ran, failed, stages = [], [], []
    for i, row in zip(kept, rows):
        if isinstance(row, _Failed):
            results[i] = (row.status, row.message)
            if row.status >= 500:
                failed.append(prepared.tasks[i])
                stages += [row.stage] if row.stage not in stages else []
        else:
            ran.append((i, row))
    if failed and len(kept) > 1:  # the traceback (one of each kind) named the batch: which it was
        write_fault(f"{' or '.join(stages)} failed for {named(failed)} of a batch of {len(kept)}, told apart")
    post = _guarded("postprocess", handle.postprocess)
    began = time.perf_counter()
    outcomes = lanes.map(post, [(row, prepared.tasks[i]) for i, row in ran], "postprocess")
    if ran:
        prepared.seconds["postprocess"] = time.perf_counter() - began
    for (i, _), outcome in zip(ran, outcomes):
        results[i] = (outcome.status, outcome.message) if isinstance(outcome, _Failed) else (200, outcome)
    if _nones is not None and outcomes:
        _tell_none(handle, outcomes)
    return results


# this process's postprocess answers of None so far, while it has answered nothing else; None once it has,
# or once the warning below is said
_nones: int | None = 0


def _tell_none(handle: Any, outcomes: list) -> None:
    """Once a process: the handle's own postprocess returned None for each of its first requests (two at
    least), answered 200 with a JSON null, silently, where a ``return`` was missing (preprocess's None is
    said where forward fails on it). Not a handle that answers None to some requests, such as a detector
    that found nothing: one answer of anything else, and this is never said."""
    global _nones
    answers = [outcome for outcome in outcomes if not isinstance(outcome, _Failed)]
    if any(answer is not None for answer in answers) or \
            getattr(getattr(type(handle), "postprocess", None), "__qualname__", "") == "Handle.postprocess":
        _nones = None
        return
    _nones += len(answers)
    if _nones >= 2:
        write_fault(f"postprocess returned None for each of the first {_nones} requests it answered: each was "
                    "answered 200 with null. A return missing? (Said once.)", "WARNING")
        _nones = None


RETRY_SHARE = 2.0  # a failed batch's parts are run again for up to this many times its own run (a halving's
RETRY_LEAST_S = 0.05  # two calls), and this long at least; each halving that finds a part that runs adds its time
# how long this process's last batch that ran took: a batch that fails at once (CUDA out of memory, in
# milliseconds) is given as long as a batch runs to be told apart, not the moment it took to fail
_last_run = 0.0
RETRY_MOST_S = math.inf  # and never longer than this (half of TimeoutS, in a worker), lengthened or not


def _apart(handle: Any, inputs: list[Any], tasks: list[dict], failure: _Failed, told: set[_Kind],
           took: float) -> list[Any]:
    """The rows of a batch whose ``forward`` failed with ``failure``: each request's row, or its 500.
    ``took`` is the time it failed after, or that the last batch that ran took, if longer.

    Inputs of one shape run together: a request of a shape the others lack (one a batch cannot stack)
    costs the batch two more calls of ``forward``. A part that still fails is halved, and the halves
    that fail halved again, breadth first, down to the requests that fail, for as long as
    ``RETRY_SHARE`` times the batch's own run (``RETRY_LEAST_S`` at least), lengthened by each halving
    one of whose halves ran (that halving came nearer the request at fault) and by the first whose
    halves both failed (two requests at fault, one in each half, do that); never past ``RETRY_MOST_S``
    (half of ``TimeoutS``), past which the worker would be taken for stuck. What is left then fails,
    saying it was not told apart (a request the time ran out before too: the failure it would get is its
    part's, not its own). So a model that fails whatever it is given costs a batch at most three
    times its run (or the last batch's that ran), its first halving's two calls and one call more, where
    running each request alone cost N more calls (past ``TimeoutS``, for a slow model), and one
    request's fault costs two calls a halving, down to it: with the time fixed, a model taking 50 ms a
    call failed 6 of 15 innocent requests with it."""
    groups: dict[Any, list[int]] = {}
    for i, x in enumerate(inputs):
        groups.setdefault(_shape_of(x), []).append(i)
    rows: list[Any] = [None] * len(inputs)
    # each part still failing: its requests, the failure, and how many requests the call that failed held
    # (more than the part's own, for a half the time ran out before: its parent's failure is not its own)
    parts: collections.deque[tuple[list[int], _Failed, int]] = collections.deque()
    for members in groups.values():
        outcome = failure if len(groups) == 1 else _forward(handle, [inputs[i] for i in members], told,
                                                              [tasks[i] for i in members])
        if isinstance(outcome, _Failed):
            parts.append((members, outcome, len(members)))
        else:
            for i, row in zip(members, outcome):
                rows[i] = row
    start = time.perf_counter()
    until = start + min(max(RETRY_LEAST_S, RETRY_SHARE * took), RETRY_MOST_S)
    spare = True  # a halving both of whose halves fail is yet to be given its time back
    while parts:
        members, outcome, held = parts.popleft()
        if held == 1 or time.perf_counter() >= until:
            if held > 1:  # one of them, or several, is at fault: which, is not known
                # a 400 would tell the innocent ones they erred; a 500 in the words of one that did, that theirs failed
                how = "refused" if outcome.status < 500 else "failed on"
                why = outcome.message.removeprefix("forward failed: ")
                outcome = _Failed(500, f"forward {how} a part of its batch ({held} requests, not told apart "
                                       f"in time), this one or another: {why}")
            for i in members:
                rows[i] = outcome
            continue
        middle = len(members) // 2  # 0 for one request whose part failed: it is run alone
        began, ran = time.perf_counter(), False
        for half in filter(None, (members[:middle], members[middle:])):
            # the time is looked at before each call: looked at for each part, two halves' calls past it
            # took a slow model's failed batch of 7 from 0.6 s to 1.8 s, a breath from TimeoutS
            if time.perf_counter() >= until:
                parts.append((half, outcome, held))
                continue
            tried = _forward(handle, [inputs[i] for i in half], told, [tasks[i] for i in half])
            if isinstance(tried, _Failed):
                parts.append((half, tried, len(half)))
            else:
                ran = True
                for i, row in zip(half, tried):
                    rows[i] = row
        # nearer the request at fault: as long again for the next halving. Once, a halving both of whose
        # halves failed is too: two requests at fault, one in each half, fail it (a model taking as long
        # whatever its batch then spent the whole time on it, and 13 of 16 innocent requests failed)
        if ran or spare:
            until = min(until + time.perf_counter() - began, start + RETRY_MOST_S)
        spare = spare and ran
    if len(groups) > 1 and not any(isinstance(row, _Failed) for row in rows):
        _tell_unstackable(len(inputs), len(groups))
    return rows


_unstackable_told = False  # whether this process said that its batches of several shapes fail whole


def _tell_unstackable(n: int, shapes: int) -> None:
    """Once a process: a batch of inputs of several shapes failed whole and every request ran in a part of
    one shape. Its batches of mixed shapes are run apart, costing their batching, while /stats shows
    the sizes they were formed at: a text handle that did not pad its token ids batched nothing."""
    global _unstackable_told
    if not _unstackable_told:
        _unstackable_told = True
        write_fault(f"forward failed on a batch of {n} requests whose inputs have {shapes} shapes, and ran each "
                    "shape apart: such batches run apart, costing their batching. Pad the inputs to one shape in "
                    "stack() (see Handle.stack) so that they run together. (Said once.)", "WARNING")


def _shape_of(value: Any) -> Any:
    """What decides whether inputs stack together: an array's shape and type, field by field for a
    dict or tuple of them; anything else, nothing (one group)."""
    shape = getattr(value, "shape", None)
    if isinstance(shape, tuple):
        return shape, str(getattr(value, "dtype", ""))
    if isinstance(value, dict):
        return tuple((str(key), _shape_of(v)) for key, v in value.items())
    if isinstance(value, tuple):
        return tuple(_shape_of(v) for v in value)
    return None


def _forward(handle: Any, inputs: list[Any], told: set[_Kind], tasks: list[dict]) -> list[Any] | _Failed:
    """``forward``'s rows for ``inputs`` (``tasks``' own), or the 500 its failure is; its traceback goes to
    the log, after the requests it was for, unless the batch ``told`` one of the same kind already."""
    stage = "stack"  # which of the three failed, named where it is told: an unstack's error read as the model's
    try:
        batch = handle.stack(inputs)
        stage = "forward"
        output = handle.forward(batch)
        stage = "unstack"
        rows = handle.unstack(output, len(inputs))
        if len(rows) != len(inputs):
            raise ValueError(f"unstack returned {len(rows)} rows for a batch of {len(inputs)}")
        return rows
    except MemoryError:
        raise
    except BadRequest as exc:  # the handle says what it was given is at fault (a model refusing a value)
        tell_refusal(level="DEBUG")
        return _Failed(exc.status, str(exc) or f"{stage} refused the request")
    except handle_errors() as exc:
        about = (f"{stage} failed for {named(tasks)}" if len(tasks) == 1 else
                 f"{stage} failed on a batch of {len(tasks)} ({named(tasks)})")
        kind = (type(exc).__name__, _raised_at(exc))
        if kind not in told:  # one traceback for each kind, and where it was raised, in a batch and its parts
            told.add(kind)
            print_fault(about)
        elif len(tasks) == 1:  # the same again: its own message, where its 500 points (a traceback named another's)
            # said as where it came from, not as the traceback's exception: that may have said another thing
            # (the whole batch's "inhomogeneous shape", this one's "matmul: size 4 is different from 3")
            write_fault(f"{about}: {type(exc).__name__}: {safe_str(exc)} (raised at the line where its batch's "
                        f"traceback above ends)")
        message = failure_message(stage, exc)
        if all(x is None for x in inputs):  # what forward was given says more than what it did with it
            message += " (preprocess returned None for each request: a return missing?)"
        return _Failed(500, message, stage)


def _raised_at(exc: BaseException) -> tuple[str, int]:
    """Where ``exc`` was raised: its traceback's innermost frame (file, line)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return (tb.tb_frame.f_code.co_filename, tb.tb_lineno) if tb is not None else ("", 0)


def failure_message(stage: str, exc: BaseException) -> str:
    """The line a client sees for an exception raised in ``stage``: its type and message, no traceback."""
    text = safe_str(exc)
    return f"{stage} failed: {type(exc).__name__}: {text}" if text else f"{stage} failed: {type(exc).__name__}"


def safe_str(value: Any) -> str:
    """``str(value)``, never raising: a ``__str__`` that raised in the code that reports a task's
    failure failed every task of its batch (and in a worker, answering a ``run_batch``'s 4xx, ended it)."""
    try:
        return str(value)
    except Exception as exc:
        return f"(its message could not be read: {type(exc).__name__})"


FAULT_LEVEL = ""  # a worker sets "ERROR": each line of a traceback it prints is logged at that level
REFUSAL_EVERY_S = 1.0  # a worker writes the traceback of a request preprocess refused at most this often
_refusal_told = -math.inf  # time.monotonic() when it last did
REFUSALS_TOLD = 100  # it writes the tracebacks of this many places at most
_refusals: set = set()  # (exception's type, file, line) of those it wrote


def print_fault(about: str = "") -> None:
    """The exception being handled, with its traceback, to this process's log, after the line ``about``
    (what failed, for which request); never raises."""
    write_fault(_headed(about))


def _headed(about: str) -> str:
    """The exception being handled, as :func:`fault_text` writes it, after the line ``about``, if any."""
    return f"{about}:\n{fault_text()}" if about else fault_text()


NAMED_MOST = 10  # request ids a line of the log names, at most


def named(tasks: list[Any]) -> str:
    """"request <id>", "requests <id>, <id> and 3 more": the requests ``tasks`` are, as the log names
    them (``task["request_id"]``, the one its client's answer carries in ``X-Request-Id``)."""
    return named_ids([str(task.get("request_id") or task.get("task_id")) if isinstance(task, dict) else "?"
                      for task in tasks])


def named_ids(ids: list[str]) -> str:
    """:func:`named`, of the requests' ids; an id that comes n times (an inference request's items, each
    a task) once, with ``(xn)``."""
    counts = collections.Counter(ids)
    shown = [f"{id_} (x{counts[id_]})" if counts[id_] > 1 else id_ for id_ in counts]
    more = f" and {len(shown) - NAMED_MOST} more" if len(shown) > NAMED_MOST else ""
    return f"request{'s' if len(ids) > 1 else ''} {', '.join(shown[:NAMED_MOST])}{more}"


# the worker's own machinery, whose frames lead to a handle's call (a built-in handle's are kept), and
# the import machinery, whose lead to the line of the handle's module that failed as it was imported
_MACHINERY = {os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
              for name in ("pipeline", "worker", "handle", "loader")}
_IMPORTLIB = os.path.dirname(os.path.abspath(importlib.__file__)) + os.sep


def _machinery(filename: str) -> bool:
    return filename in _MACHINERY or filename.startswith(("<frozen importlib.", _IMPORTLIB))


def fault_text() -> str:
    """The exception being handled, as Python writes it, from the first frame outside the worker's
    machinery (the pipeline, the worker's loop, the Handle base class, the import of the handle's
    module): a handle's author reads from their own code, not through the calls that led to it (in a
    notebook, paths of the machine that ran it, and line numbers that moved with every release). A
    built-in handle's frames (OnnxModel's) are kept, and an exception the machinery raised itself keeps
    the frame that raised it."""
    exc = sys.exc_info()[1]
    if exc is None:
        return traceback.format_exc()
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None and _machinery(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def tell_refusal(about: str = "", level: str = "INFO") -> None:
    """In a worker, the traceback of the exception that made ``preprocess`` refuse a request (a 400),
    at ``level``: in ``server.logs()`` and the log for the handle's author, whose own bug (a reshape to
    the wrong size) may be what refused it (at DEBUG, where easyserve run's log said nothing of it, and
    a handle broken so answered every request 400 in silence; a :class:`BadRequest`, raised on
    purpose, stays at DEBUG). Once for each kind of exception and line that raised it
    (``REFUSALS_TOLD`` of them), one a second at most: a flood of bad requests costs nothing, and
    never pushes out of the worker's last lines the traceback a 500 points to."""
    global _refusal_told
    now = time.monotonic()
    if not FAULT_LEVEL or now - _refusal_told < REFUSAL_EVERY_S or len(_refusals) >= REFUSALS_TOLD:
        return
    exc, tb = sys.exc_info()[1:]
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = (type(exc).__name__, tb.tb_frame.f_code.co_filename, tb.tb_lineno) if tb is not None else None
    if where not in _refusals:
        _refusals.add(where)
        _refusal_told = now
        write_fault(_headed(about), level)


def thread_fault(args: Any) -> None:
    """``threading.excepthook`` for a worker: a thread's uncaught exception, as Python says it, at ERROR."""
    if args.exc_type is not SystemExit:
        name = args.thread.name if args.thread is not None else "?"
        write_fault(f"Exception in thread {name}:\n"
                    + "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)))


def write_fault(text: str, level: str | None = None) -> None:
    """``text`` to this process's log (at ``level``, or ``FAULT_LEVEL``, in a worker); never raises. A
    handle that closed ``sys.stderr`` turned each failure into the worker's death."""
    if FAULT_LEVEL:
        text = logs.leveled(text, level or FAULT_LEVEL) + "\n"
    out = logs.records_out or sys.stderr  # in a worker, its records' pipe: a record of the worker's own
    try:
        out.write(text)
        out.flush()
    except Exception:
        try:  # the descriptor under it, which the server reads
            os.write(out.fileno(), text.encode("utf-8", "replace"))
        except (OSError, ValueError, AttributeError):
            pass
