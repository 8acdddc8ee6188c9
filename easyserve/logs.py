"""Workers' output, read by the event loop without ever blocking a worker or the loop.

Workers wrote to the server's stderr directly; once that was a full pipe nobody read, a worker
blocked on a ``print`` in the middle of a batch. Now each worker's stdout and stderr go to a pipe,
and its own records to another, that the event loop reads without blocking (:class:`ProcessOutput`).
Their lines land in a bounded ring
per worker, which ``Server.logs()`` and ``/stats`` show, and are passed on to the ``easyserve.worker``
logger, each at its level. How the server's own records (those included) are written, without ever
blocking the loop either, is :mod:`easyserve.records`.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import heapq
import math
import operator
import os
import re
import struct
import sys
import threading
import time
from typing import Any, Iterable, Iterator, NamedTuple

from .children import RECORDS_FD_ENV
from .records import WORKER_LOGGER

try:  # how much a pipe holds (see WorkerOutput.take_in); not on Windows
    import fcntl
    import termios
except ImportError:  # pragma: no cover
    fcntl = termios = None  # type: ignore[assignment]

__all__ = ["LogLine", "Logs", "ProcessOutput", "Ring", "WorkerOutput", "unlogged"]

RING_LINES = 1000  # recent lines kept per worker
MAX_LINE = 8192  # longer lines are cut: a handle printing a huge array must not fill the ring's memory
MAX_DUMP = 65536  # of a dying process's dump (faulthandler's), logged as one record
MAX_RECORD = 2 * MAX_DUMP  # characters of any one record of a worker's, logged at most (the ring has them all)
_CUT = b" ... [cut: a line longer than %d bytes]" % MAX_LINE  # ends the head kept of a line that has no end yet
_FATAL = b"Fatal Python error: "  # how CPython (and faulthandler) begin the last words of a process
_LAST_OF_DUMP = b"Extension modules: "  # and how they end, where any are loaded (numpy: always, in a worker)
DUMP_WAIT_S = 2.0  # a dump without that last line ends this long after it began (a dying process's takes ms)
HOLD_S = 0.1  # how long a record at the end of a read waits for its further lines in the next one
# Lines that the workers of this process's servers, together, may pass to the logger in a second, of
# their prints and, apart, of their own records (a print flood took the allowance a failed batch's
# traceback needed, and the traceback its 500 pointed to was in no log). Each record costs the event
# loop tens of microseconds: a handle printing short lines in a loop held it for a second per 64 kB
# read, and every worker runs the same handle. Lines past this still reach their worker's ring; they
# are counted (``unlogged()``), and each worker's count is logged a second later.
LOG_LINES_PER_S = 1000

worker_log = logging.getLogger(WORKER_LOGGER)


class LogLine(NamedTuple):
    """One line a worker printed: when (``time.time()``), which worker, which process, the text."""

    time: float
    worker: str
    pid: int
    text: str

    def __str__(self) -> str:  # its control characters written out, as the log writes them; .text as it came
        stamp = time.strftime("%H:%M:%S", time.localtime(self.time))
        return f"{stamp} {self.worker} [{self.pid}] {self.text.translate(VISIBLE)}"


class Logs(list):
    """A list of :class:`LogLine` that prints as the log it is (in a terminal or a notebook cell)."""

    def __str__(self) -> str:
        return "\n".join(map(str, self))

    def __repr__(self) -> str:
        return str(self) if self else "(no worker output yet)"

    def _repr_pretty_(self, printer, cycle: bool) -> None:  # IPython
        printer.text(repr(self))


class WorkerOutput:
    """Reads one of a worker process's pipes (its records', or with ``prints`` its stdout and stderr) on
    the event loop: lines into its part of ``ring`` (a :class:`Ring`, shared by every process of the
    worker slot, so a crash's last words outlive it) and to the log.

    The ring holds each line as a plain tuple, ``LogLine``'s fields (read it with :func:`ring_lines`):
    a tuple of a float, strings and an int is one the garbage collector does not track, where the
    LogLines of a print flood (a ring's worth each read) lived long enough to be promoted and set off
    full collections of all the server's objects, 55 ms each with 300,000 of them.

    It owns the pipe's read end and watches it with ``add_reader``, rather than handing it to
    ``connect_read_pipe``: under uvloop, that transport and the file object it is given both close the
    same descriptor number, and the second close can hit a descriptor another thread has just opened.
    """

    def __init__(self, name: str, pid: int, ring: Ring, prints: bool = False):
        self.name = name
        self.pid = pid
        self.ring = ring.prints if prints else ring.records  # its part of the ring
        self.prints = prints  # a process's stdout and stderr: every line a print, none read as a record
        self._partial = b""
        self._cutting = False  # in a line past MAX_LINE, whose head was taken: the rest is dropped...
        self._redrawn: bytes | None = None  # ...but for what follows its last \r, a progress bar's final state
        self._bar = False  # whether that line is a print, which may be a progress bar (a record's text is not)
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unlogged = 0  # lines not logged since this worker last said how many
        self._dump: list[bytes] | None = None  # what followed "Fatal Python error:" (see _lines)
        self._dump_size = 0
        self._dump_timer: asyncio.TimerHandle | None = None
        self._died = False  # the process has died (see died)
        self._suspect: bytes | None = None  # a dump among prints, logged as one once the process has died
        self._suspect_timer: asyncio.TimerHandle | None = None
        self._suspect_since = 0.0
        self._held: tuple[int, list[str]] | None = None  # a record whose next lines may come in the next read
        self._held_timer: asyncio.TimerHandle | None = None

    def attach(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        """Read ``fd`` (now this object's to close) whenever it is readable, until end of file."""
        os.set_blocking(fd, False)
        self._loop, self._fd = loop, fd
        loop.add_reader(fd, self._readable)

    def close(self) -> None:
        """Stop reading, after taking in what the pipe holds now; close the descriptor, once."""
        if self._fd < 0:
            return
        self._read_what_it_holds()
        self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self._fd = -1
        self.end_line()
        self._log_held()
        self._end_dump()  # a dump among prints still waits for the word of a crash: the pipe ends first
        self._say_unlogged()

    def end_line(self) -> None:
        """Take the line begun and not ended (a progress bar, a print with ``end=""``) as a whole one."""
        if self._partial:
            self._lines(self._partial)
            self._partial = b""

    def died(self, crashed: bool) -> None:
        """The process has ended, ``crashed`` (a fatal signal): a dump it wrote among its prints is then a
        crash's, logged as one ERROR record (see _route); else what it was, prints. What the pipe holds
        should be taken in first. A last line without its end (a print with ``end=""``, a C library's
        message before ``abort()``) is logged now, before the server's record of the death: it waited for
        the pipe's end, and came after that record and the replacement's start."""
        self.end_line()
        self._died = crashed
        self._end_dump()
        if self._suspect is not None and crashed:
            self._record(logging.ERROR, self._suspect.decode("utf-8", "replace").rstrip())
            self._suspect = None
        self._settle()

    def take_in(self) -> None:
        """Read what the pipe holds now (no more: a child of the process may be writing on), and log
        the record held for more lines, if any. For when the process has said, on its socket, that it
        is ready or that a batch failed, or has died: what it wrote before (a setup's warning, the
        batch's traceback, its last words) is in the pipe, and is logged before what the server logs
        or answers of it, rather than after, below a notebook's next cell."""
        self._read_what_it_holds()
        self._log_held()

    def _read_what_it_holds(self) -> None:
        # no more than the pipe holds now: a child of the process (one that outlived it, even) may be
        # writing on, and reading until the pipe was empty held the event loop for as long as it did
        left = _unread(self._fd) if self._fd >= 0 else 0
        while left > 0:
            try:
                data = os.read(self._fd, min(left, 65536))
            except OSError:  # nothing after all, or the pipe failed: its reader sees to that
                break
            if not data:
                break
            left -= len(data)
            self.data_received(data)

    def _readable(self) -> None:
        if self._read_once() == "end":
            self.close()

    def _read_once(self) -> str:
        """One read: "data", "empty" (nothing now) or "end" (end of file, or the pipe failed)."""
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return "empty"
        except OSError:
            return "end"
        if not data:
            return "end"
        self.data_received(data)
        return "data"

    def data_received(self, data: bytes) -> None:
        if self._cutting:  # the rest of a line too long to keep, dropped to its end
            end = data.find(b"\n")
            self._dropped(data if end < 0 else data[:end])
            if end < 0:
                return
            last, self._redrawn, self._cutting = self._redrawn, None, False
            data = data[end + 1:] if last is None else last + data[end:]  # the bar's last state: a line
        data = self._partial + data
        end = data.rfind(b"\n")
        lines, self._partial = (data[:end], data[end + 1:]) if end >= 0 else (None, data)
        if len(self._partial) > MAX_LINE:  # no newline coming: keep the head, drop the rest of the line
            # Its rest, read after, was taken for lines of their own, unmarked: prints, logged at INFO
            # however quiet the line's own level (a 16 MB request quoted in a DEBUG traceback: 8 MB of log).
            head = self._partial[:MAX_LINE - len(_CUT)] + _CUT
            # with the lines before it, in one call: a traceback's long last line is of its record
            lines = head if lines is None else lines + b"\n" + head
            self._cutting, self._redrawn = True, None
            self._bar = self.prints or not _leveled(head)  # a print may be a progress bar; a record's text is no bar
            self._dropped(self._partial)
            self._partial = b""
        if lines is not None:
            self._lines(lines)

    def _dropped(self, rest: bytes) -> None:
        """Part of a line too long to keep, dropped. But a print that draws itself over again after each
        \\r (a progress bar: a download's, in setup) ends in its last state, which is kept for the log:
        its 100% went with the rest."""
        if not self._bar:
            return
        drawn = rest.rfind(b"\r")
        if drawn >= 0:
            self._redrawn = rest[drawn + 1:drawn + 1 + MAX_LINE]
        elif self._redrawn is not None:
            self._redrawn = (self._redrawn + rest)[:MAX_LINE]

    def _lines(self, lines: bytes) -> None:
        """``lines``: whole lines, joined by newlines (one read's, without the last newline), into the
        log and the ring."""
        if self.prints and b":onnxruntime:" in lines:  # its lines in a terminal's colours: as text, without them
            lines = _SGR.sub(b"", _COLOURS_ONLY.sub(b"", lines)).rstrip(b"\n")
            if not lines:
                return
        self._route(lines)
        kept = lines.rsplit(b"\n", self.ring.maxlen)[-self.ring.maxlen:] if self.ring.maxlen else lines.split(b"\n")
        when, name, pid = time.time(), self.name, self.pid
        self.ring.extend([(when, name, pid, text) for text in _ring_texts(kept, self.prints)])

    def _route(self, lines: bytes) -> None:
        """Log ``lines``, where a dying process's last words are one record.

        From a line ``Fatal Python error: ...`` on, a process is dying (a segfault in native code, an
        abort): what follows is faulthandler's dump of the Python stack, written straight to the pipe,
        unmarked. It is logged as one ERROR record, rather than as INFO lines, which ``--log-level
        warning`` hid: the one clue to where a worker crashed was lost. The dump ends at its last line
        (``Extension modules: ...``), at the pipe's end, or DUMP_WAIT_S after it began: a child process
        (a data loader's) that dies so leaves the worker running, and its lines after are its own.

        faulthandler writes to the records' pipe; CPython's own fatal errors (``Py_FatalError``, from an
        extension) to stderr, among the prints, where a print may pose as one: such a dump is logged as
        one ERROR record only once the process has died (:meth:`died`); else as the prints it was, and at
        once where a line follows that no such dump has (a handle echoing a client's text, then going on).
        One held while the process ends (a core dump of a large process takes seconds) waits for it."""
        while lines:
            if self._dump is None:
                start = _line_starting(lines, _FATAL)
                if start is None:
                    self._log(lines)
                    return
                if start:
                    self._log(lines[:start - 1])
                self._log_held()
                self._dump, self._dump_size, lines = [], 0, lines[start:]
                if self._loop is not None:
                    self._dump_timer = self._loop.call_later(DUMP_WAIT_S, self._end_dump)
            last = _line_starting(lines, _LAST_OF_DUMP)
            odd = _NOT_DUMP.search(lines) if self.prints else None
            if odd is not None and (last is None or odd.start() < last):  # no dump: prints, in their order
                if odd.start():
                    self._keep(lines[:odd.start() - 1])
                self._end_dump(as_prints=True)
                lines = lines[odd.start():]
                continue
            if last is None:
                self._keep(lines)
                return
            end = lines.find(b"\n", last)
            self._keep(lines if end < 0 else lines[:end])
            self._end_dump()
            lines = b"" if end < 0 else lines[end + 1:]

    def _keep(self, dump: bytes) -> None:
        """Part of a dying process's dump, kept for one record (at most MAX_DUMP bytes of it)."""
        if self._dump_size < MAX_DUMP:
            self._dump.append(dump[:MAX_DUMP - self._dump_size])
            self._dump_size += len(dump)
            if self._dump_size >= MAX_DUMP:
                self._dump.append(b"[... cut: the rest is in Server.logs()]")

    def _end_dump(self, as_prints: bool = False) -> None:
        """Log the dump taken in so far, if any, as one ERROR record (``as_prints``: as the prints it was);
        what comes next is logged as usual. Among prints, of a process not known to have died, it waits
        for the process's death (see died), while the process is ending."""
        if self._dump_timer is not None:
            self._dump_timer.cancel()
            self._dump_timer = None
        dump, self._dump = self._dump, None
        if not dump:
            return
        text = b"\n".join(dump)
        if as_prints:
            self._settle()
            self._log_prints(text)
        elif not self.prints or self._died:
            self._record(logging.ERROR, text.decode("utf-8", "replace").rstrip())
        else:
            self._settle()  # one held before it: the process lived on past it
            self._suspect, self._suspect_since = text, time.monotonic()
            if self._loop is not None:
                self._suspect_timer = self._loop.call_later(DUMP_WAIT_S, self._settle_unless_ending)
            else:
                self._settle()

    def _settle_unless_ending(self) -> None:
        """DUMP_WAIT_S after a dump among prints: the process lives on (its lines are prints), or it is
        still ending, and the wait goes on (for at most SUSPECT_WAIT_S)."""
        self._suspect_timer = None
        if _ending(self.pid) and time.monotonic() - self._suspect_since < SUSPECT_WAIT_S:
            self._suspect_timer = self._loop.call_later(0.5, self._settle_unless_ending)
        else:
            self._settle()

    def _settle(self) -> None:
        """The process lived on past a dump among its prints (or it is gone unseen): its lines are prints."""
        if self._suspect_timer is not None:
            self._suspect_timer.cancel()
            self._suspect_timer = None
        suspect, self._suspect = self._suspect, None
        if suspect is not None:
            self._log_prints(suspect)

    def _log(self, lines: bytes) -> None:
        """Log ``lines`` (joined by newlines), at each one's level.

        The work is bounded whatever a read holds, and most of it done by bytes methods, not a Python
        loop over the lines: a handle printing short lines as fast as it can fills each 64 kB read with
        13,000 of them, and looping over them all kept the event loop busy, /health waiting 0.5-1 s.
        Only the lines the ring keeps are made, and at most LOG_LINES_PER_S logged in a second, whatever
        the number of workers. Lines the log would not show (prints at --log-level warning, DEBUG lines
        at info) use none of it: they crowded a warning out."""
        if self.prints:
            self._log_prints(lines)
            return
        if worker_log.isEnabledFor(logging.DEBUG):
            shown, count = _ANY_LINE, lines.count(b"\n") + 1
        elif worker_log.isEnabledFor(logging.INFO):
            quiet = _starting(lines, _QUIET) if b"DEBUG" in lines else 0
            shown, count = _NOT_QUIET_LINE, lines.count(b"\n") + 1 - quiet
        else:
            shown, count = _LOUD_LINE, _starting(lines, _LOUD)
        logged = _records_allowance.take(count)
        # a traceback's lines are one record: one piece in the log, though it came in two reads
        records: list[tuple[int, list[str]]] = [self._held] if self._held else []
        self._release()
        found = None
        for found in itertools.islice(shown.finditer(lines), logged):
            level, text, more, _ = _level_of(_text(found.group()))
            if more and records and records[-1][0] == level:
                records[-1][1].append(text)
            else:
                records.append((level, [text]))
        if found is not None and found.end() == len(lines) and _leveled(found.group()) and self._loop is not None:
            # the read ended in a record its next lines may go on with ("LEVEL+ "): wait for the next read
            self._held = records.pop()
            self._held_timer = self._loop.call_later(HOLD_S, self._log_held)
        for level, texts in records:
            self._record(level, "\n".join(texts))
        self._count_unlogged(count - logged)

    def _count_unlogged(self, count: int) -> None:
        if count > 0:
            if not self._unlogged and self._loop is not None:  # the first of a run: say how many in a second
                self._loop.call_later(1.0, self._say_unlogged)
            self._unlogged += count

    def _log_prints(self, lines: bytes) -> None:
        """Log ``lines`` of prints at INFO, each a record (at most what the allowance gives; see _log);
        ONNX Runtime's own lines at their severity."""
        if b":onnxruntime:" in lines:
            lines = self._log_native(lines)
        if not lines or not worker_log.isEnabledFor(logging.INFO):
            return
        count = lines.count(b"\n") + 1
        logged = _allowance.take(count)
        for found in itertools.islice(_ANY_LINE.finditer(lines), logged):
            self._record(logging.INFO, _drawn(_text(found.group())))
        self._count_unlogged(count - logged)

    def _log_native(self, lines: bytes) -> bytes:
        """Log ONNX Runtime's own lines among ``lines`` at the severity each gives (its C++ writes them to
        stderr), the most severe first where the allowance runs short, and return the other lines. As
        prints, its error that the CUDA provider failed to load (the GPU worker then on the CPU) was
        INFO, unseen at --log-level warning."""
        found = [(match, _NATIVE_LEVELS[match.group(1)]) for match in _NATIVE.finditer(lines)]
        shown = sorted(((match, level) for match, level in found if worker_log.isEnabledFor(level)),
                       key=lambda item: -item[1])
        granted = _allowance.take(len(shown))
        for match, level in sorted(shown[:granted], key=lambda item: item[0].start()):  # in their order
            self._record(level, _text(match.group().rstrip(b"\n")))
        self._count_unlogged(len(shown) - granted)
        return _NATIVE.sub(b"", lines).rstrip(b"\n")

    def _release(self) -> None:
        self._held = None
        if self._held_timer is not None:
            self._held_timer.cancel()
            self._held_timer = None

    def _log_held(self) -> None:
        """Log the record held for the lines that may have gone on with it, if any: none came."""
        if self._held:
            level, texts = self._held
            self._record(level, "\n".join(texts))
        self._release()

    def _record(self, level: int, text: str) -> None:
        """One record of this process's output, in the log: which worker, which process, the text, its
        control characters written out (:data:`VISIBLE`), and at most MAX_RECORD characters of it (a
        record of 900 lines of 8 kB, each request's, queued 7 MB at a time while stderr stalled)."""
        if len(text) > MAX_RECORD:
            text = f"{text[:MAX_RECORD]}\n[... cut: {len(text) - MAX_RECORD} more characters, in Server.logs()]"
        worker_log.log(level, "%s [%d] %s", self.name, self.pid, text.translate(VISIBLE))

    def _say_unlogged(self) -> None:
        if self._unlogged:
            worker_log.warning("%s [%d]: %d lines not logged, past the %d a second the workers may log together "
                               "(its last %d lines are kept: Server.logs(), and the dashboard)", self.name,
                               self.pid, self._unlogged, LOG_LINES_PER_S, RING_LINES,
                               extra={"says_unlogged": True})  # shown in a notebook's cell, however many hidden
            self._unlogged = 0


class ProcessOutput:
    """A worker's or HTTP front's output, from its two pipes: its prints (stdout and stderr), each line
    logged at INFO as it is, and its own records (:func:`open_records`), each at its level; into one
    :class:`Ring`, each pipe's lines apart."""

    def __init__(self, name: str, pid: int, ring: Ring):
        self.prints = WorkerOutput(name, pid, ring, prints=True)
        self.records = WorkerOutput(name, pid, ring)

    def attach(self, loop: asyncio.AbstractEventLoop, prints_fd: int, records_fd: int) -> None:
        """Read both descriptors (now this object's to close) until their ends (see WorkerOutput.attach)."""
        self.prints.attach(loop, prints_fd)
        self.records.attach(loop, records_fd)

    def take_in(self) -> None:
        """What both pipes hold now, logged (see WorkerOutput.take_in): the prints first, the records
        after them, so that a failed batch's traceback is the last before its answer."""
        self.prints.take_in()
        self.records.take_in()

    def died(self, crashed: bool) -> None:
        """The process has ended (``crashed``: by a fatal signal): what both pipes hold is logged, a fatal
        error's dump among its prints as one ERROR record where it crashed (see WorkerOutput.died)."""
        self.take_in()
        self.records.end_line()
        self.prints.died(crashed)

    def close(self) -> None:
        self.prints.close()
        self.records.close()


# What lines CPython's own fatal error writes (Py_FatalError): a line of another shape among them is a
# print, and what seemed a dump was prints too.
_NOT_DUMP = re.compile(rb"^(?!(?:|  .*|Fatal Python error: .*|Python runtime state: .*|(?:Current thread|Thread|Stack)"
                       rb"\b.*|<no Python frame>|Extension modules: .*)$).*$", re.MULTILINE)
SUSPECT_WAIT_S = 120.0  # the longest a dump among prints waits for a process still ending (a core dumped)


def _ending(pid: int) -> bool:
    """Whether process ``pid`` is ending: exiting, dumping its core, or a zombie (Linux; elsewhere, no)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return False
    PF_EXITING, PF_DUMPCORE = 0x4, 0x200  # noqa: N806 (the kernel's names)
    return fields[0] in (b"Z", b"X") or bool(int(fields[6]) & (PF_EXITING | PF_DUMPCORE))


def _unread(fd: int) -> int:
    """The bytes a pipe holds now (one read's worth where the system cannot tell)."""
    if fcntl is None:
        return 65536
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return 65536


class _Allowance:
    """Lines the workers may log in the current second, shared by every worker of this process (the
    servers' event loop threads take from it)."""

    def __init__(self, per_second: int) -> None:
        self.per_second = per_second
        self.left = per_second
        self.window = -math.inf  # when the current second began
        self.refused = 0  # lines refused, ever
        self.lock = threading.Lock()

    def take(self, wanted: int) -> int:
        """How many of ``wanted`` lines may be logged now."""
        with self.lock:
            now = time.monotonic()
            if now - self.window >= 1.0:
                self.window, self.left = now, self.per_second
            granted = min(wanted, self.left)
            self.left -= granted
            self.refused += wanted - granted
            return granted


_allowance = _Allowance(LOG_LINES_PER_S)  # the prints'
_records_allowance = _Allowance(LOG_LINES_PER_S)  # the records'


_LEVELS = {name: logging.getLevelName(name) for name in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")}
_BY_LEVEL = sorted(_LEVELS.items(), key=lambda item: -item[1])  # highest first
# how a worker's lines above INFO begin (see _level_of)
_LOUD = tuple(f"{name}{mark}".encode() for name in ("WARNING", "ERROR", "CRITICAL") for mark in (" ", "> ", "+ "))
_QUIET = (b"DEBUG ", b"DEBUG> ", b"DEBUG+ ")  # and at DEBUG
# a read's lines that each level shows (see WorkerOutput._lines), from the prefixes above
_ANY_LINE = re.compile(rb"^.*$", re.MULTILINE)
_NOT_QUIET_LINE = re.compile(rb"^(?!" + b"|".join(map(re.escape, _QUIET)) + rb").*$", re.MULTILINE)
_LOUD_LINE = re.compile(rb"^(?:" + b"|".join(map(re.escape, _LOUD)) + rb").*$", re.MULTILINE)


# ONNX Runtime's own log lines, from C++ to stderr: "<time> [W:onnxruntime:<logger>, <file>:<line> <function>]
# <message>", in a terminal's colours; the letter is the severity (verbose, info, warning, error, fatal)
_NATIVE = re.compile(rb"^[0-9 :.-]{0,40}\[([VIWEF]):onnxruntime:.*$\n?", re.MULTILINE)
_NATIVE_LEVELS = {b"V": logging.DEBUG, b"I": logging.INFO, b"W": logging.WARNING, b"E": logging.ERROR,
                  b"F": logging.CRITICAL}
_SGR = re.compile(rb"\x1b\[[0-9;]*m")  # a terminal's colours, which ONNX Runtime writes its lines in
_COLOURS_ONLY = re.compile(rb"^(?:\x1b\[[0-9;]*m)+$\n?", re.MULTILINE)  # a line of them alone: a colour's reset


# What a line a worker writes may begin with (see _level_of): a record's own first line is "LEVEL "
# (logging's, "LEVEL name: message"), or "LEVEL> " before text of its own (a traceback printed whole);
# each further line of the record begins "LEVEL+ ".
BEGIN, MORE = ">", "+"
_MARKED = tuple(f"{name}{mark} ".encode() for name in _LEVELS for mark in (BEGIN, MORE))


def _starting(lines: bytes, prefixes: tuple[bytes, ...]) -> int:
    """How many of ``lines`` (joined by newlines) begin with one of ``prefixes``."""
    return sum(lines.count(b"\n" + prefix) for prefix in prefixes if prefix in lines) + lines.startswith(prefixes)


def _leveled(line: bytes) -> bool:
    """Whether ``line`` begins a record of a level, or goes on with one: one that ``LEVEL+ `` lines may follow."""
    word = line[:10].partition(b" ")[0].rstrip(b">+")
    return word.decode("ascii", "replace") in _LEVELS


def _line_starting(lines: bytes, prefix: bytes) -> int | None:
    """Where the first of ``lines`` (joined by newlines) that begins with ``prefix`` begins, if one does."""
    if lines.startswith(prefix):
        return 0
    at = lines.find(b"\n" + prefix)
    return None if at < 0 else at + 1


def _level_of(text: str) -> tuple[int, str, bool, str]:
    """How the server reads a line from a worker: its level, the text to log, whether it continues the
    record before it, and the text for the worker's ring (what the handle wrote, without the marks).

    ``LEVEL name: message`` (a record as the worker's logging writes it) is logged at that level, and
    kept as it is; ``LEVEL> text`` begins a record, ``LEVEL+ text`` continues one (a traceback's lines),
    each kept as ``text``. Any other line (a print) is INFO. Re-logged at INFO, a worker's warning (a
    model that is a stand-in) was lost at ``--log-level warning``, and so was a traceback after its
    first line; each line a record of its own, a traceback came apart (in a notebook, across cells)."""
    word, space, rest = text.partition(" ")
    mark = word[-1:] if word[-1:] in (BEGIN, MORE) else ""
    level = _LEVELS.get(word[:-1] if mark else word)
    if level is None or not space:
        # a print drawn over after each \r (a progress bar): its last state, as a terminal shows it; each
        # was kept, and a notebook showed a download's bar as 21 lines. Not a record's text: a \r it quotes
        # is the message's, and cutting there lost the record's level
        text = _drawn(text)
        return logging.INFO, text, False, text
    return level, rest, mark == MORE, rest if mark else text


def _drawn(text: str) -> str:
    """A print drawn over after each \\r (a progress bar): its last state, as a terminal shows it."""
    return text[text.rfind("\r") + 1:]


def leveled(text: str, levelname: str, begun: bool = False) -> str:
    """``text`` (several lines: a traceback) marked as one record at ``levelname`` for the server to log
    (see :func:`_level_of`); ``begun``: its first line is marked already (logging's ``LEVEL name:``)."""
    lines = text.rstrip("\n").split("\n")
    first = lines[0] if begun else f"{levelname}{BEGIN} {lines[0]}"
    return "\n".join([first, *(f"{levelname}{MORE} {line}" for line in lines[1:])])


records_out: Any = None  # in a worker or front: the stream its own records (and tracebacks) are written to


def open_records() -> Any:
    """In a worker or HTTP front: the stream its own records go to (opened once, and kept in
    :data:`records_out`), a pipe of their own, which the server reads as records (:class:`ProcessOutput`);
    its stdout and stderr, another, are only ever prints. They shared one, and the server told records
    by the level they began with: a client's text that a handle's subprocess echoed (a line break, then
    ``CRITICAL ...``) was logged as a record at that level; a record written after a print without a
    line's end (a progress bar) went on that line, logged as a print, or cut with the rest of a long one
    and lost uncounted; and a crash's dump after a bar hid at ``--log-level warning``."""
    global records_out
    if records_out is None:
        fd = os.environ.pop(RECORDS_FD_ENV, None)
        if fd is None:  # not started by the server (a test's own process): stderr, as a process has
            records_out = sys.stderr
        else:
            os.set_inheritable(int(fd), False)  # a handle's subprocess writes prints, never records
            records_out = open(int(fd), "w", encoding="utf-8", errors="backslashreplace", buffering=1)
    return records_out


def configure_child(level: int | str) -> None:
    """A worker's or HTTP front's logging, whose records the server reads and logs again: as
    :class:`WorkerFormatter` writes them, to :func:`open_records`, and Python's warnings among them (at
    WARNING; printed, they were INFO to the server)."""
    handler = logging.StreamHandler(open_records())
    handler.setFormatter(WorkerFormatter())
    logging.basicConfig(level=level, handlers=[handler])
    logging.captureWarnings(True)


class WorkerFormatter(logging.Formatter):
    """``LEVEL name: message`` for a worker's records, every further line (an exception's traceback, a
    warning's source line) marked as the same record's: see :func:`leveled`."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        # a level of a library's own (NOTICE, 25) as the standard one below it, which the server knows
        name = next((name for name, level in _BY_LEVEL if record.levelno >= level), "DEBUG")
        return leveled(f"{name} {super().format(record)}", name, begun=True)


def _ring_texts(lines: list[bytes], prints: bool = False) -> list[str]:
    """What the ring keeps of ``lines``: :func:`_text` of each, without its marks (see :func:`_level_of`;
    ``prints`` have none); in one decode when no line is marked, \\r-ended or too long (a print flood's
    lines), as bytes methods do it far faster than a Python loop over a 64 kB read's 13,000 lines."""
    block = b"\n".join(lines)
    marked = not prints and (b">" in block or b"+" in block) and _starting(block, _MARKED)  # memchr first
    if marked or b"\r" in block or max(map(len, lines), default=0) > MAX_LINE:
        return [_drawn(_text(raw)) if prints else _level_of(_text(raw))[3] for raw in lines]
    return block.decode("utf-8", "replace").split("\n")


# Control characters of a worker's output as the log shows them: "\x1b" as those four characters, not an
# escape sequence for the terminal the log is read on (a handle that printed what a client sent let the
# client retitle it, clear it, or set its clipboard). A tab stays, and a record's further lines.
# Unicode's line and paragraph separators too: str.splitlines() breaks lines there, and a log read so
# took a client's text after one for a record of the server's own.
VISIBLE = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7f, 0xa0)) if chr(code) not in "\t\n"}
VISIBLE.update({0x2028: "\\u2028", 0x2029: "\\u2029"})
# and the marks that turn text right to left, which make a line read other than it is
VISIBLE.update({code: f"\\u{code:04x}" for code in (*range(0x202a, 0x202f), *range(0x2066, 0x206a))})


def _text(raw: bytes) -> str:
    text = raw[:MAX_LINE].decode("utf-8", "replace").rstrip("\r")
    if len(raw) > MAX_LINE:
        text += f" ... [{len(raw) - MAX_LINE} more bytes]"
    return text


class Ring:
    """A worker slot's recent output: its prints' lines and its own records' lines, each in a bounded deque
    of its own (:class:`ProcessOutput` fills them), so that a print flood (a debug print left in a loop)
    cannot push out the traceback a 500 pointed to; in one, a thousand ticks did so in milliseconds.
    Iterated, the lines of both in time order."""

    __slots__ = ("prints", "records")

    def __init__(self) -> None:
        self.prints: collections.deque = collections.deque(maxlen=RING_LINES)
        self.records: collections.deque = collections.deque(maxlen=RING_LINES)

    def __iter__(self) -> Iterator[tuple]:
        return heapq.merge(self.prints, self.records, key=operator.itemgetter(0))

    def last(self, count: int) -> list[tuple]:
        """The last ``count`` lines of both, in time order."""
        parts = [list(itertools.islice(reversed(part), count))[::-1] for part in (self.prints, self.records)]
        return list(heapq.merge(*parts, key=operator.itemgetter(0)))[-count:]


def new_ring() -> Ring:
    return Ring()


def ring_lines(ring: Iterable[tuple]) -> list[LogLine]:
    """A ring's lines (see :class:`WorkerOutput`) as :class:`LogLine`."""
    return list(map(LogLine._make, ring))


def unlogged() -> int:
    """Lines of workers' output not passed to the log, past ``LOG_LINES_PER_S`` (they are in the rings)."""
    return _allowance.refused + _records_allowance.refused
