"""The server's own log records, written from a thread of their own: a log can never stop the server.

The event loop's own ``log.error`` blocked in ``write()`` once stderr was a pipe nobody read, and with
it ``/health``, timeouts and the watchdog. Every record logged under ``easyserve`` (workers' lines
among them, see :mod:`easyserve.logs`), ``aiohttp`` or ``asyncio`` on the event loop's thread now goes
through a bounded queue to a writer thread (:func:`install`); when that thread is stuck, records are
dropped and counted (:func:`dropped`), never waited for. Records logged from other threads (a
notebook's) are handled as usual, except in ``easyserve run`` and its guardian, where every thread's
go the same way (:func:`install` ``every_thread``): there the main thread starts, drains and restarts
servers. Where logging is not configured, warnings and errors go to stderr with their level.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import logging.handlers
import math
import os
import queue
import re
import sys
import threading
import time
from typing import Any, Callable

__all__ = ["install", "in_turn", "dropped", "flush", "say_hidden", "written_or_exit", "counted"]

LOOP_THREAD = "easyserve"  # the name of the thread that runs the server's event loop
SERVER_THREAD = LOOP_THREAD + " :"  # that thread's name once its server listens, with the port after it
QUEUE_RECORDS = 10_000
QUEUE_BYTES = 32 * 2**20  # of the queued records' text, at most: a record may be long (a worker's, 128 kB)
WORKER_LOGGER = "easyserve.worker"  # the workers' output (see easyserve.logs)
SHOWN_WORKER_RECORDS = 20  # of the workers' records, shown at most in a window where logging is not configured
_WORKER_ERRORS = (WORKER_LOGGER, "errors")  # their errors, with a window of their own
SHOWN_REPEATS = 5  # of the server's own records of one kind (logged by one line), shown at most in a window
SHOWN_WINDOW_S = 10.0
EXAMPLE_SHOWN = 160  # characters of a record not shown that its count quotes
KIND_CHARS = 48  # of a record's message, those that tell its kind from others logged by the same line
SHAPES_PER_LINE = 8  # kinds of message one line of code may have in a window; its others count as one
WRITE_PIECE = 4096  # characters a counted stream writes at a time (see counted())


class _Records(queue.Queue):
    """A bounded queue whose lock the thread holding it may take again. With ``every_thread`` the main
    thread queues its records too, and a signal handler runs on that thread inside whatever it was
    doing: one that logged (a stop passed on, "draining") while the thread was queuing a record of its
    own waited for the queue's lock, which that thread held, for ever."""

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize)
        self.mutex = threading.RLock()
        self.not_empty = threading.Condition(self.mutex)
        self.not_full = threading.Condition(self.mutex)
        self.all_tasks_done = threading.Condition(self.mutex)
        self.size = 0  # the queued records' text, in characters (see QUEUE_BYTES)

    def _put(self, record: logging.LogRecord) -> None:  # with the mutex held, as queue.Queue calls it
        super()._put(record)
        self.size += _size(record)

    def _get(self) -> logging.LogRecord:
        record = super()._get()
        self.size -= _size(record)
        return record


def _size(record: Any) -> int:
    return len(record.msg) if isinstance(getattr(record, "msg", None), str) else 0


_serving: set[int | None] = set()  # the threads (idents) of this process's servers' loops that listen (see serving)


def serving(port: int) -> None:
    """On a server's event loop, once it listens on ``port``: the thread is named for the server, whose
    records the notebook's log names it in while another server listens beside (see _LastResort.format)."""
    thread = threading.current_thread()
    thread.name = f"{SERVER_THREAD}{port}"
    _serving.add(thread.ident)


def served() -> None:
    """On a server's event loop thread, as it ends."""
    _serving.discard(threading.get_ident())


class _OffLoop(logging.handlers.QueueHandler):
    """On the event loop's thread (on every thread, once ``every_thread``): queue the record for the
    writer thread, or drop and count it when the queue is full. On any other thread: hand it to the
    usual handlers at once."""

    def __init__(self) -> None:
        super().__init__(_Records(QUEUE_RECORDS))
        self.dropped = 0
        self.marked = 0  # of those, the ones a record queued since carries the count of (see put())
        self._depth = 0  # calls of put() under way on the thread that holds the queue's lock
        self.every_thread = False

    def emit(self, record: logging.LogRecord) -> None:
        if not (self.every_thread or threading.current_thread().name.startswith(LOOP_THREAD)):
            _to_usual_handlers(record)
            return
        try:
            record._easyserve_template = record.msg  # prepare() puts the values in; the last resort keys on it
            if record.thread in _serving:  # a server's, where more may listen: see _LastResort.format
                record._easyserve_servers = len(_serving)
            self.put(self.prepare(record))
        except Exception:
            self.handleError(record)

    def put(self, record: logging.LogRecord, count: bool = True) -> bool:
        """Queue ``record``, or drop it (and ``count`` it) when the queue is full; whether it was queued.
        The first record queued after some were dropped carries their number, which the writer says just
        before it: where the lines are missing. A reader that paused and read on had lost lines without
        a word."""
        with self.queue.mutex:
            # A signal handler that logs runs inside this, on this thread (the lock is reentrant): its
            # record carried the same count again, said twice and then as a negative one. Only the
            # outermost call carries the count.
            self._depth += 1
            try:
                lost = self.dropped - self.marked if self._depth == 1 else 0
                record.dropped_before = lost
                try:
                    if self.queue.size + _size(record) > QUEUE_BYTES:  # long records: stderr stalled, memory bounded
                        raise queue.Full
                    self.queue.put_nowait(record)
                except queue.Full:
                    self.dropped += count
                    return False
                self.marked += lost
                return True
            finally:
                self._depth -= 1

    def lost(self, record: logging.LogRecord) -> None:
        """A handler could not write ``record`` (a full disk): it is dropped and counted, and said where the
        lines are missing once one can be written. Records written to a full disk were lost without a
        trace, the count at 0. A notice of records dropped that is itself lost is carried again."""
        with self.queue.mutex:
            said = getattr(record, "says_dropped", 0)
            if said:
                self.marked -= said
            else:
                self.dropped += 1


class LogHandler(logging.StreamHandler):
    """``easyserve run``'s handler of its log (stderr): a record it cannot write (a full disk, a file
    past its size limit) is counted with those dropped (see :meth:`_OffLoop.lost`), where logging's own
    handler reported the failure to the same stderr, which failed too."""

    cut = False  # whether a write failed: the log may end in the middle of a line

    def emit(self, record: logging.LogRecord) -> None:
        if self.cut:  # the line a full disk cut short is ended first: the next record went on with it
            try:
                self.stream.write(self.terminator)
                self.flush()
            except Exception:
                self.handleError(record)
                return
            self.cut = False
        super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        if _handler is not None and isinstance(sys.exc_info()[1], OSError):
            self.cut = True
            _handler.lost(record)
        else:  # a record that cannot be formatted (its arguments wrong) is logging's error, said as before
            super().handleError(record)


class _Writer(logging.Handler):
    """The writer thread's one handler. A record that fails to be written (stderr closed) is logging's
    error, not the thread's end: an exception here ended the thread, and every later record waited in
    the queue unwritten, the exit for its 2 s."""

    def emit(self, record: logging.LogRecord) -> None:
        _say_dropped(getattr(record, "dropped_before", 0))
        try:
            write = getattr(record, "write", None)  # see in_turn()
            if write is not None:
                write()
            else:
                _to_usual_handlers(record)
        except Exception:
            self.handleError(record)
        _progressed()


def _say_dropped(lost: int) -> None:
    if not lost:
        return
    text = ("%d log record(s) dropped here: stderr was not read as fast as they came, or could not be written "
            "(a full disk) (/stats' log_records_dropped counts them all)")
    said = logging.LogRecord("easyserve", logging.WARNING, __file__, 0, text, (lost,), None)
    said.says_dropped = lost
    with contextlib.suppress(Exception):
        _to_usual_handlers(said)


class _Window:
    """Records of one kind in a window of :data:`SHOWN_WINDOW_S`: how many were shown and how many
    not, and the first of those not shown."""

    __slots__ = ("began", "shown", "hidden", "example")

    def __init__(self, began: float) -> None:
        self.began, self.shown, self.hidden, self.example = began, 0, 0, ""


class _LastResort(logging.Handler):
    """Where records go when logging is not configured (a notebook, a script): to stderr, as Python's
    own last resort, warnings and above; but with their level, which that one leaves out. A notebook
    showed a worker's warning and the traceback of a failed batch alike, as plain text in red.

    Of the workers' records, at most :data:`SHOWN_WORKER_RECORDS` are shown in :data:`SHOWN_WINDOW_S`,
    and as many of their errors apart (a handle's warning for each request hid a failed batch's
    traceback); the rest are counted, and the count is said once the window ends. A handle that logged a warning
    for each request put thousands of lines a second in a notebook's cell, and into its saved file:
    every line is in the worker's ring (``Server.logs()``) anyway, and a configured log gets them all.

    The server's own records are shown up to :data:`SHOWN_REPEATS` of each kind (the line of code
    that logs them, and for some the shape of their message: see :meth:`_kind`) in a window, and the
    rest counted the same way: a handle that ended its worker on some inputs put three lines in the
    cell for each such request (its worker's death twice, then the request's failure), hundreds for a
    loop over a data set."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        # the window of each kind of record: WORKER_LOGGER for the workers' output, else what _kind says
        self.windows: dict[Any, _Window] = {}
        self.shapes: dict[tuple[str, int], tuple[float, set[str]]] = {}  # each line's shapes in its window

    def format(self, record: logging.LogRecord) -> str:
        """As its formatter writes it; and where this process runs more than one server (a notebook
        comparing two models), a record of a server's event loop names the server by its port: each has
        a ``cpu/0``, and a worker's death was said of neither in particular."""
        text = super().format(record)
        if getattr(record, "_easyserve_servers", 0) > 1:  # as many as listened when it was made
            level, _, message = text.partition(": ")
            text = f"{level}: server :{record.threadName.removeprefix(SERVER_THREAD)}: {message}"
        return text

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "says_unlogged", False):  # how many lines the log itself lacks: hidden, the count was wrong
            kind, limit = "unlogged", math.inf
        elif record.name.startswith(WORKER_LOGGER):  # errors apart: a handle's warning a request hid them all
            kind = _WORKER_ERRORS if record.levelno >= logging.ERROR else WORKER_LOGGER
            limit = SHOWN_WORKER_RECORDS
        else:
            kind, limit = self._kind(record), SHOWN_REPEATS
        if not self._may_show(kind, limit, record):
            return
        try:
            self._write(self.format(record))
        except Exception:
            self.handleError(record)

    def _kind(self, record: logging.LogRecord) -> tuple[str, int, str]:
        """The line of code that logs ``record``; and where its format is not words with values in them
        (``"%s%s"``: one line logs every worker's death; a message with no values: asyncio logs each
        unhandled error, whatever it is, from one line), the shape of its message, of which a line may
        have :data:`SHAPES_PER_LINE` in a window; its further ones count as one kind, "", so that they
        neither fill the cell nor the windows. A format's values (a client's request id) never make
        kinds of their own: each was shown, the cell flooded."""
        line = (record.pathname, record.lineno)
        template = getattr(record, "_easyserve_template", record.msg)
        if _words_with_values(template):
            return (*line, "")
        now = time.monotonic()
        began, seen = self.shapes.get(line, (0.0, set()))
        if now - began >= SHOWN_WINDOW_S:
            if len(self.shapes) >= 1000:  # lines that log: not many, but none is kept past its window
                self.shapes = {k: v for k, v in self.shapes.items() if now - v[0] < SHOWN_WINDOW_S}
            began, seen = now, set()
            self.shapes[line] = (began, seen)
        shape = _shape(record)
        if shape not in seen:
            if len(seen) >= SHAPES_PER_LINE:
                return (*line, "")
            seen.add(shape)
        return (*line, shape)

    def _may_show(self, kind: Any, limit: int, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        window = self.windows.get(kind)
        if window is None or now - window.began >= SHOWN_WINDOW_S:
            if window is not None and window.hidden:  # its end came before the timer that says its count
                self._say_hidden(kind)
            if len(self.windows) >= 1000:  # the lines that log something: not many, but a stale one is not kept
                self.windows = {k: w for k, w in self.windows.items() if now - w.began < SHOWN_WINDOW_S or w.hidden}
            window = self.windows[kind] = _Window(now)
        if window.shown < limit:
            window.shown += 1
            return True
        if not window.hidden:  # the first hidden: the count is said when the window ends
            window.example = self.format(record).splitlines()[0][:EXAMPLE_SHOWN]
            timer = threading.Timer(window.began + SHOWN_WINDOW_S - now, self._say_hidden, (kind,))
            timer.daemon = True
            timer.start()
        window.hidden += 1
        return False

    def _say_hidden(self, kind: Any) -> None:
        with self.lock:
            window = self.windows.get(kind)
            if window is None or not window.hidden:  # said already
                return
            hidden, example, window.hidden = window.hidden, window.example, 0
        if kind in (WORKER_LOGGER, _WORKER_ERRORS):
            what = "errors" if kind == _WORKER_ERRORS else "lines"
            text = (f"WARNING: {hidden} more {what} of the workers' output in these {SHOWN_WINDOW_S:g} s not shown "
                    f"here ({SHOWN_WORKER_RECORDS} are, each {SHOWN_WINDOW_S:g} s): Server.logs() keeps each "
                    "worker's last lines, and a configured log (logging.basicConfig()) gets them, up to the "
                    f"{_lines_per_s()} a second the workers may log together (a line says how many more there were)")
        else:
            text = (f'WARNING: {hidden} more like "{example}" in these {SHOWN_WINDOW_S:g} s not shown here '
                    f"({SHOWN_REPEATS} of each kind are, each {SHOWN_WINDOW_S:g} s): a configured log "
                    "(logging.basicConfig()) gets every one")
        with contextlib.suppress(Exception):  # stderr gone (a kernel ending): nowhere to say it
            self._write(text)

    @staticmethod
    def _write(text: str) -> None:
        sys.stderr.write(text + "\n")  # the stderr of now: a kernel replaces it


def _lines_per_s() -> int:
    from .logs import LOG_LINES_PER_S  # which imports this module

    return LOG_LINES_PER_S


_PLACEHOLDERS = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[diouxXeEfFgGcrsa%]")
_WORDED = re.compile(r"[A-Za-z]")


def _words_with_values(template: object) -> bool:
    """Whether a log call's format is words with values put in (``"request %s failed"``), not values
    alone (``"%s%s"``) nor a message with none."""
    if not isinstance(template, str):
        return False
    literal = template.replace("%%", "")
    bare = _PLACEHOLDERS.sub("", literal)
    return bare != literal and _WORDED.search(bare) is not None


def _shape(record: logging.LogRecord) -> str:
    """The start of a record's message with its numbers and ids blanked: the same for one worker's
    death and the next (``pid 412 exited with code 1``), different for another cause. One line logs
    every worker's death, and a SIGKILL (the OOM killer) was hidden among a handle's own exits."""
    try:
        start = record.getMessage()[:KIND_CHARS]
    except Exception:  # its arguments do not fit its format: logging says so when it is shown
        return ""
    return re.sub(r"\S*\d\S*|[0-9a-f]{8,}", "#", start)  # a word with a digit in it: a pid, an id, a time


_last_resort = _LastResort()


def say_hidden() -> None:
    """Say now how many records of each kind were not shown in windows that have not ended (see
    :class:`_LastResort`), once the records queued so far are written: at a server's stop, and at the
    process's exit. A timer says each count as its window ends, but a script that stopped its server and
    ended within the window never said it, and a worker's death went unseen with no word of it."""
    kinds = [kind for kind, window in list(_last_resort.windows.items()) if window.hidden]
    if not kinds:
        return
    flush()

    def say() -> None:
        for kind in kinds:
            _last_resort._say_hidden(kind)

    # on a thread of its own: a stderr nobody reads (a full pipe) holds it, not the exit
    thread = threading.Thread(target=say, daemon=True, name="easyserve-hidden-counts")
    thread.start()
    thread.join(1.0)


atexit.register(say_hidden)


def _to_usual_handlers(record: logging.LogRecord) -> None:
    # Where the record would have gone had `easyserve` propagated: the root logger's handlers (the
    # root's level is not checked on propagation; each handler's own level is).
    root = logging.getLogger()
    if root.handlers:
        root.callHandlers(record)
    elif logging.lastResort is not None and record.levelno >= _last_resort.level:
        _last_resort.handle(record)


_handler: _OffLoop | None = None
_install_lock = threading.Lock()


def install(every_thread: bool = False) -> None:
    """Route the ``easyserve``, ``aiohttp`` and ``asyncio`` loggers' records from the event loop
    through the writer thread (once per process); with ``every_thread``, those of every thread from now
    on. Handlers a user attached to those loggers themselves still run where the record is made."""
    global _handler
    with _install_lock:
        if _handler is not None:
            _handler.every_thread = _handler.every_thread or every_thread
            return
        handler = _OffLoop()
        handler.every_thread = every_thread
        _start_writer(handler)
        # aiohttp's and asyncio's records are made on the event loop too (a malformed request, say)
        for name in ("easyserve", "aiohttp", "asyncio"):
            logger = logging.getLogger(name)
            logger.addHandler(handler)
            logger.propagate = False
        _handler = handler


def _start_writer(handler: _OffLoop) -> None:
    logging.handlers.QueueListener(handler.queue, _Writer()).start()  # a daemon thread


def _writer_in_child() -> None:
    """A process forked after :func:`install` (multiprocessing's default on Linux) has the loggers'
    handler but not its writer thread: its records went to a queue that nobody read. It gets a queue and
    a writer of its own (the one it inherited may hold records its parent had queued, and a lock taken)."""
    handler = _handler
    if handler is not None:
        handler.queue = _Records(QUEUE_RECORDS)
        handler.dropped = handler.marked = handler._depth = 0
        _start_writer(handler)


os.register_at_fork(after_in_child=_writer_in_child)


def in_turn(write: Callable[[], None]) -> None:
    """Call ``write`` (a message straight to stderr) once the records queued so far are written, on the
    log's writer thread where every thread's records go that way (:func:`install` ``every_thread``): a
    stderr nobody reads then holds that thread, not this one. Elsewhere, at once."""
    handler = _handler
    if handler is None or not handler.every_thread:
        write()
        return
    handler.put(_turn(write))


def _turn(write: Callable[[], None]) -> logging.LogRecord:
    """A record that the writer does not write but calls ``write`` for, in its turn."""
    record = logging.LogRecord("easyserve", logging.CRITICAL, __file__, 0, "", None, None)
    record.write = write
    return record


def dropped() -> int:
    """Log records dropped because the log's writer could not keep up (stderr full, say)."""
    return _handler.dropped if _handler is not None else 0


_progress = 0  # records and pieces of them written: see written_or_exit()


def _progressed() -> None:
    global _progress
    _progress += 1  # one writer thread: no lock needed


class _Counted:
    """A stream that writes in pieces of at most :data:`WRITE_PIECE` characters, counting each as the
    writer's progress: a reader that takes a large record (a traceback holding an input) slowly is
    then told apart from one that is gone, where the record's one ``write()`` showed nothing for
    seconds and the exit gave up on a reader that still read."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        for start in range(0, len(text), WRITE_PIECE):
            self.stream.write(text[start:start + WRITE_PIECE])
            if len(text) > WRITE_PIECE:
                self.stream.flush()
                _progressed()
        return len(text)

    def __getattr__(self, name: str) -> Any:  # flush, isatty, fileno... as the stream's
        return getattr(self.stream, name)


def counted(stream: Any) -> Any:
    """``stream`` for a log handler whose records :func:`written_or_exit` waits for (``easyserve run``'s)."""
    return _Counted(stream)


def written_or_exit(code: int, stalled_s: float = 2.0) -> None:
    """Before a command exits: wait until the records queued so far are written, for as long as the
    writer gets on with them. One that writes nothing in ``stalled_s`` (stderr a pipe nobody reads)
    would hold the exit for ever, in logging's shutdown, and a guardian waiting for this process with
    it: the process then ends at once, with ``code``. A reader that is slow, not gone, gets every line
    (records written through :func:`counted` show progress in pieces). Records that were dropped are
    said last. A Ctrl-C meanwhile ends it at once: its traceback would wait for the same stderr."""
    try:
        seen = _progress
        while True:
            owed = _handler.dropped - _handler.marked if _handler is not None else 0
            # a record to carry the count of those dropped since the last one queued, once one fits
            carried = owed > 0 and _handler.put(_turn(lambda: None), count=False)
            if flush(stalled_s):
                left = _handler.dropped - _handler.marked if _handler is not None else 0
                # said; or its notice could not be written either (a full disk): the exit waited for room
                if left <= 0 or carried and left >= owed:
                    return
            elif _progress == seen:
                os._exit(code)
            seen = _progress
    except KeyboardInterrupt:
        os._exit(code)


def flush(timeout: float = 1.0) -> bool:
    """Wait (up to ``timeout``) until the records queued so far are written; whether they were."""
    if _handler is None:
        return True
    deadline = time.monotonic() + timeout
    while _handler.queue.unfinished_tasks and time.monotonic() < deadline:
        time.sleep(0.005)
    return not _handler.queue.unfinished_tasks
