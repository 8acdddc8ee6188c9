"""``Server``: the one object a user meets. It composes config, worker pool, queue and HTTP front.

From a notebook or script::

    server = Server.from_yaml("configs/imagenet_resnet18.yaml").start()   # returns once workers are ready
    server.url                                                            # 'http://127.0.0.1:9876'
    server.stop()

or with a class defined right there::

    with Server(handle=MyHandle, GPUs="0", ProcessPerGPU=2, Port=0) as server:
        ...

The event loop runs in a background thread, so the caller (a notebook's kernel) stays free.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import inspect
import logging
import operator
import os
import socket
import sys
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from . import logs as _logs
from . import notebook, pipeline, records, runtime
from .browsers import binds_loopback
from .children import keep_from_forks
from .config import FIELDS, KEYS, Config, handle_name
from .devices import ProbeStopped, plan
from .errors import ConfigError, EasyServeError, StartupError
from .fronts import Fronts
from .guards import LINGER_S, LISTEN_BACKLOG, stop_listening
from .http import BUDGET, forget_apps, make_app, make_runner
from .loader import resolve
from .logs import Logs
from .onnxmodel import onnx_settings
from .pool import WorkerPool
from .signals import SIGNAL_POLL_S, Signals
from .slots import Worker, marked, slots
from .stats import answered, snapshot

log = logging.getLogger("easyserve")
STOPPED_STARTING = "stopped while starting: stop() was called before the workers were ready"

__all__ = ["Server"]


class RunEnd(threading.Event):
    """Set when one run of a server (a start() to its stop()) is over, with that run's final numbers: a
    dashboard that follows the run shows them, though the server was started again before it looked
    (``stop(); start()`` in one cell showed a new run's empty numbers as "not started yet")."""

    def __init__(self) -> None:
        super().__init__()
        self.final_stats: dict[str, Any] | None = None
        # what those who follow the run wait on, set with it: a dashboard's one event, which its close() sets too
        self.woken: weakref.WeakSet[threading.Event] = weakref.WeakSet()

    def set(self) -> None:
        super().set()
        for event in list(self.woken):
            event.set()


# what a run's last line says beside its answers, of the counts no answer shows
UNANSWERED_SAID = (("malformed", "malformed, refused by the HTTP parser"),
                   ("heads_timed_out", "connection(s) closed, their request's head not in within HeaderTimeoutS"),
                   ("slow_readers_reset", "answer(s) cut, their slow readers reset past MaxBufferedMB"),
                   ("client_gone", "request(s) whose client left before the answer"))


def stopped_line(final: dict[str, Any]) -> str:
    """The last line of ``easyserve run``: how long it ran, every answer by status ("requests" counts those
    queued, which a drain's 503s never were), and the client faults counted where no answer shows them
    (it said the malformed requests alone: a slow-loris attack's closed connections were in no line)."""
    by_status = ", ".join(f"{count} {status}" for status, count in sorted(final["statuses"].items()))
    line = (f"easyserve stopped after {final['uptime_s']:.0f} s: {answered(final)} request(s) answered"
            + (f" ({by_status})" if by_status else ""))
    return line + "".join(f"; {final[key]} {words}" for key, words in UNANSWERED_SAID if final.get(key))


class Server:
    """Serve a handle over HTTP with a pool of worker processes.

    ``config`` gives every setting (default: :class:`Config` defaults), or a YAML file's path (as
    :meth:`from_yaml`), or a dict of them (YAML names); ``handle`` and keyword overrides (YAML names
    such as ``ProcessPerGPU=2``, or field names) replace its values.
    """

    def __init__(self, config: Config | None = None, handle: Any = None, **overrides: Any) -> None:
        if handle is not None:
            overrides["handle"] = handle
        source = None
        # a config file's path, or the settings as a dict, as one would first try (they were Python's own
        # errors, of a replace() they have not)
        if isinstance(config, (str, os.PathLike)):
            config, source = Config.from_yaml(config), (config, dict(overrides))
        elif isinstance(config, Mapping):
            config = Config.from_dict(config)
        elif config is not None and not isinstance(config, Config):
            raise TypeError(f"Server() takes a Config, a config file's path or a dict of settings, not a "
                            f"{type(config).__name__}")
        try:
            self.config = (config or Config()).replace(**overrides)
        except ConfigError as exc:
            raise _as_handle_args(exc, handle, overrides) from None
        self.state = "stopped"
        self.port: int | None = None
        self._last_port: int | None = None  # the port the last run listened on (Port: 0 picks one)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pool: WorkerPool | None = None
        self._workers: list[Worker] = []  # the last pool's worker slots: their logs outlive a stop
        self._runner: web.AppRunner | None = None
        self._fronts: Fronts | None = None  # HttpWorkers above 1: the HTTP front processes
        self._lock = threading.Lock()  # start() and stop() run one at a time
        self._wake = threading.Event()  # serve_forever() waits on it: a signal, or stop() elsewhere
        self._stops = 0  # stop() calls, which a start() under way compares
        self._source: tuple[str | os.PathLike, dict] | None = source  # the YAML file and overrides, for SIGHUP
        self._last_stats: dict[str, Any] | None = None  # the last run's final numbers, for stats() once stopped
        self._start_failure: str | None = None  # why the last start() failed, in a line; None once one succeeds
        self._cell: tuple[str, str] | None = None  # the notebook cell that started it, and that run (notebook.py)
        self._over = RunEnd()  # set when this run has stopped: a new one for each start()
        self._dashboard: Any = None  # the last dashboard made, which the next one replaces
        self._reloading: concurrent.futures.Future | None = None  # the last reload, until it is over
        self._reload_events: tuple[asyncio.Event, asyncio.Event] | None = None  # its (abandon, stopping)
        self._started = 0.0  # time.monotonic() when it last became ready
        self._hangup_waiting = threading.Lock()  # held while a SIGHUP's reload waits for the one before
        self._over.set()

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides: Any) -> Server:
        """A server for a YAML config file; keyword overrides win over the file (and over a re-read
        of it, on SIGHUP)."""
        server = cls(Config.from_yaml(path), **overrides)
        # its full path, read now: a deploy that replaced the folder the server was started in (the new
        # release's file at the same place) failed every SIGHUP, a relative path read against the old one
        server._source = (os.path.abspath(path), overrides)
        return server

    @classmethod
    def from_onnx(cls, path: str | os.PathLike, **overrides: Any) -> Server:
        """A server for an ONNX file served as it is (:class:`~easyserve.OnnxModel`), named after the
        file in the Open Inference Protocol's paths; keyword overrides as for :meth:`from_yaml`
        (``GPUs``, ``ProcessPerGPU``, ``HandleArgs={"batched": True}``...). SIGHUP loads the file
        again, replacing the workers one at a time::

            Server.from_onnx("models/classifier.onnx", GPUs="0", ProcessPerGPU=2).start()
        """
        settings = onnx_settings(path)
        given = dict(overrides)
        settings["HandleArgs"].update(given.pop("HandleArgs", None) or given.pop("handle_args", None) or {})
        server = cls(Config.from_dict(settings), **given)
        server._source = (settings["HandleArgs"]["model"], overrides)
        return server

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self, timeout: float | None = None) -> Server:
        """Start workers and the HTTP server; return once every worker is ready.

        Raises :class:`~easyserve.errors.StartupError` with the worker's traceback if the handle
        cannot start (or, with ``timeout``, is not ready in time), and
        :class:`~easyserve.errors.ConfigError` for a config it cannot run. Interrupted (Ctrl-C, a
        notebook's interrupt), it stops the workers it started and raises ``KeyboardInterrupt``.

        A notebook cell that starts a server can be run again: the servers its earlier runs started are
        stopped first, with a warning (where the notebook does not say which cell runs, the server this
        process runs on the same fixed ``Port``); a fixed port that another cell's server holds is a
        :class:`StartupError`. This server, if it is running already, is left as it is (a cell with
        ``server.start()`` alone, run again).
        """
        if pipeline.IN_WORKER:  # each worker would start a server of its own, with workers of their own
            raise StartupError("Server.start() called in a worker process, as the handle's module was imported: "
                               "a file that defines a handle and starts a server must start it under "
                               "`if __name__ == \"__main__\":`, which a worker's import of the file does not run")
        asked = self._stops  # a stop() from here on ends this start
        with self._lock:
            if self.state == "running":
                log.info("server already running at %s", self.url)
                return self
            if self.state != "stopped":
                raise RuntimeError(f"server is already {self.state}; stop() it first")
            records.install()  # first: plan's warning (no such GPU) had no "WARNING:" in a fresh notebook
            if self._source is not None and self.config.handle == Config.handle:  # (from_onnx's is OnnxModel)
                # an empty file, or one whose Handle line is commented out, and none given beside it
                log.warning("%s names no Handle: serving the built-in demo model (an iris classifier)",
                            self._source[0])
            redefined = _redefined(self.config.handle, "start")
            if redefined is not self.config.handle:  # stopped, its cell edited and run again, started again
                self.config = self.config.replace(handle=redefined)
            try:
                handle = resolve(self.config.handle, self.config.base_dir)
                specs = plan(self.config, stopped=lambda: self._stops != asked)
            except ProbeStopped:  # a hung nvidia-smi: stop() waited out its 20 s
                raise StartupError(STOPPED_STARTING) from None
            except EasyServeError as exc:
                # its message says all: in a notebook, the frames it came through quoted the f-string
                # that made it, the message shown twice in 4 kB
                raise _bare(exc)
            try:
                notebook.make_room(self)  # a cell run again
            except EasyServeError as exc:  # a port another cell's server holds: the message says which, and what to do
                raise _bare(exc) from None
            runtime.prepare_process()
            self._wake.clear()  # before the count is read: a stop() after the read sets it again
            if self._stops != asked:  # one during the steps above (a GPU probe takes up to 20 s)
                raise StartupError(STOPPED_STARTING)
            self.state = "starting"
            # what the time until the next line goes to: a handle's import and setup may take a while
            log.info("starting %d worker(s) running %s: the server answers once they are ready", len(specs),
                     handle.describe())
            self._over = RunEnd()
            self._last_stats = self._start_failure = None
            self._loop = runtime.new_event_loop()
            self._thread = threading.Thread(target=self._run_loop, name="easyserve", daemon=True)
            self._thread.start()
            startup = asyncio.run_coroutine_threadsafe(self._startup(handle, specs), self._loop)
            try:
                # stop() on another thread: it waited for the whole load, then for a drain of the server
                # that came up meanwhile, and the port answered in between
                _result(startup, timeout, self._wake)
            except BaseException as exc:  # a failure, the timeout, stop(), or Ctrl-C while models load
                ran_out = isinstance(exc, concurrent.futures.TimeoutError) and not startup.done()
                startup.cancel()
                if ran_out:  # not a TimeoutError the startup raised itself
                    exc = StartupError(f"workers were not ready within start(timeout={timeout:g})")
                # what the card and dashboard of a server that never ran say (not "last run: 0 s")
                self._start_failure = ("start() interrupted" if isinstance(exc, KeyboardInterrupt) else
                                      _first_line(exc) if isinstance(exc, StartupError) else
                                      f"could not start: {_first_line(exc)}")
                try:
                    self._close(drain_timeout=0)
                except KeyboardInterrupt:  # a second interrupt, as the close waited: it ends all the same
                    exc = KeyboardInterrupt()
                if isinstance(exc, KeyboardInterrupt):
                    log.warning("start() interrupted: the workers it had started are stopped, and the port closed")
                if ran_out:
                    raise exc from None
                if isinstance(exc, (EasyServeError, KeyboardInterrupt)):
                    raise _bare(exc) from None  # an interrupt's frames: 4 kB of the threads' waits
                raise
            self.state = "running"
            self._started = time.monotonic()
            atexit.register(self._stop_at_exit)
            notebook.started(self)
        records.flush()  # what start-up logged (workers' output too) comes out before this line
        log.info("easyserve listening on %s with %d worker(s) running %s", self._listening(), len(specs),
                 handle.describe())
        if self.config.access_log and not logging.getLogger("easyserve.access").isEnabledFor(logging.INFO):
            # asked for, and written nowhere: --log-level warning (or a notebook's log, which shows warnings)
            log.warning("AccessLog: true, but the log shows no INFO records, where its lines are: none will be seen "
                        "(easyserve run --log-level info shows them; in Python, give the logger easyserve.access "
                        "level INFO and a handler)")
        return self

    @staticmethod
    def running() -> list[Server]:
        """The servers this process runs now, oldest first: in a notebook, also those whose variable a
        cell run again has replaced."""
        return notebook.running()

    def stop(self, drain_timeout: float | None = None) -> None:
        """Stop taking requests, finish those in flight (up to ``drain_timeout`` seconds), stop every
        worker process and close the socket. Safe to call twice, and from several threads; called while
        another thread's ``start()`` loads the models, it ends that start, which raises ``StartupError``.

        By default the drain lasts ``TimeoutS`` and ``DRAIN_MARGIN_S`` more: every request that came
        before the stop is answered by then (or has its 504), so none is cut short, however long
        ``TimeoutS`` is (a fixed 30 s cut a 35 s request of a TimeoutS of 40 short, with a 503). Requests
        still queued when ``drain_timeout`` runs out get 503, as does a body still arriving then, without
        the rest. ``drain_timeout=0`` waits for nothing."""
        if drain_timeout is None:
            drain_timeout = self.config.timeout_s + DRAIN_MARGIN_S
        if self._thread is not None and threading.current_thread() is self._thread:
            raise RuntimeError("stop() cannot be called from the server's own event loop thread")
        self._stops += 1
        self._wake.set()
        self._abandon_reload()
        try:
            self._lock.acquire()
        except KeyboardInterrupt:  # interrupted before it began: the server runs on, and may be reloaded
            self._wake.clear()
            raise
        try:
            if self.state == "stopped":
                return
            atexit.unregister(self._stop_at_exit)
            self._close(drain_timeout)
        finally:
            self._lock.release()
        records.say_hidden()  # the counts of what was not shown, said with the stop, not 10 s on in another cell

    def _abandon_reload(self, put_back: bool = False) -> None:
        """A reload holds the lock stop() waits for, for as long as new workers take to start (minutes,
        for a large model): the port kept taking requests meanwhile, whatever signal came. Tell it
        to give up, and to put nothing back, as the server stops; with ``put_back``, to put back the
        workers it replaced already, for a server that serves on a while (``ShutdownDelayS``): it had
        its workers run two handles side by side, through the whole delay."""
        loop, events = self._loop, self._reload_events
        if loop is not None and events is not None:
            abandon, stopping = events

            def tell() -> None:
                if not put_back:
                    stopping.set()
                abandon.set()

            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing left to tell
                loop.call_soon_threadsafe(tell)

    def _close(self, drain_timeout: float) -> None:
        """Shut down and wait for it; raises ``KeyboardInterrupt`` once stopped if interrupted meanwhile.

        An interrupt (Ctrl-C, a notebook's stop button, or the interrupt a kernel restart sends first)
        means "stop now": the drain ends as on a second signal, and the requests still in flight get
        their 503. The shutdown is still waited for: leaving it then stopped the loop under it, the
        requests were cut off with no answer, and processes it had not waited for stayed zombies."""
        loop, thread = self._loop, self._thread
        self.state = "stopping"
        notebook.stopping(self)
        interrupted: float | None = None  # when the first interrupt came
        try:
            closing = asyncio.run_coroutine_threadsafe(self._shutdown(drain_timeout), loop)
            while True:
                try:
                    closing.result(None if interrupted is None else
                                   max(0.0, interrupted + ABORTED_CLOSE_S - time.monotonic()))
                    break
                except KeyboardInterrupt:
                    if interrupted is None:
                        interrupted = time.monotonic()
                        log.warning("interrupted: stopping now; requests still in flight get 503")
                        loop.call_soon_threadsafe(self._abort)
                except concurrent.futures.TimeoutError:
                    log.error("the shutdown did not end within %gs of an interrupt; leaving it", ABORTED_CLOSE_S)
                    break
        finally:
            loop.call_soon_threadsafe(loop.stop)
            joined_by = time.monotonic() + ABORTED_CLOSE_S
            while thread.is_alive() and time.monotonic() < joined_by:
                try:
                    thread.join(max(0.0, joined_by - time.monotonic()))
                except KeyboardInterrupt:  # the loop ends by itself now: not waiting would leave it half-closed
                    interrupted = interrupted or time.monotonic()
            self._loop = self._thread = self._pool = self._runner = self._fronts = None
            self.state = "stopped"
            self._last_port, self.port = self.port, None
            self._over.final_stats = self._last_stats
            self._over.set()
        if interrupted is not None:
            raise KeyboardInterrupt

    def reload(self, handle: Any = None, timeout: float | None = None, **overrides: Any) -> Server:
        """Replace every worker, one at a time, by one running ``handle`` (default: the current one,
        as its module defines it now: a class edited in a notebook cell and run again is the one the new
        workers run) with ``HandleArgs`` overrides, while the others keep serving: nothing is refused or
        failed.

        Use it for a fixed bug in a handle, a new model file, new thresholds::

            server.reload(handle=FixedClassifier)
            server.reload(HandleArgs={"model": "models/v2.onnx"})

        If a new worker cannot start, the workers already replaced go back to the old handle and
        :class:`~easyserve.errors.StartupError` is raised with its traceback (a
        :class:`~easyserve.errors.ConfigError` for ``HandleArgs`` that cannot be sent to workers). Only ``Handle``,
        ``HandleArgs``, ``ModelName`` and ``ModelVersion`` (the name v2 requests use, which new weights may
        change) can change this way; other keys need ``stop()`` and ``start()``.

        A reload that outlives ``timeout`` seconds, or is interrupted (Ctrl-C, a notebook's
        interrupt), is abandoned: the worker still starting is stopped and the workers already
        replaced are put back on the old handle, as for a handle that fails, before this returns (a
        second interrupt stops waiting for that; it goes on in the background). Either way the server
        serves the handle ``server.config`` names, never two at once. ``timeout`` counts the wait for
        another reload (or a start or stop) to end, too: if it runs out before this one begins,
        ``StartupError`` says so and nothing changes.
        """
        from .reload import reload_workers

        began = time.monotonic()
        # another reload (or a start or stop) holds the lock: that wait counts against the timeout too
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            raise StartupError(f"reload did not start within reload(timeout={timeout:g}): another reload (or a stop) "
                               "held the server meanwhile; nothing was changed")
        try:
            if self.state != "running":
                raise RuntimeError(f"server is {self.state}; reload() needs a running server")
            try:
                config = self.config.replace(handle=handle, **overrides)
                if config.handle is self.config.handle:  # none given: the class as its module defines it now
                    config = config.replace(handle=_redefined(config.handle, "reload"))
                _check_reloadable(self.config, config)
                ref = resolve(config.handle, config.base_dir)
            except Exception as exc:  # no worker was started: said here (reload_workers says the rest)
                asked = handle or overrides.get("Handle") or self.config.handle
                self._pool.said_reload(str(handle_name(asked)), "failed", str(exc))
                raise
            if self._reloading is not None and not self._reloading.done():
                # a reload abandoned by a second interrupt is still putting the old handle back: two at
                # once would leave a worker of each beside the others
                log.info("waiting for the reload abandoned before to put back the old handle")
                with contextlib.suppress(Exception):
                    self._reloading.result()
            abandon, stopping = self._reload_events = asyncio.Event(), asyncio.Event()
            if self._wake.is_set():  # stop() or a signal came while this waited for the lock
                raise RuntimeError("the server is stopping; reload() needs a running server")
            done = asyncio.run_coroutine_threadsafe(reload_workers(self._pool, ref, config, abandon, stopping),
                                                    self._loop)
            self._reloading = done
            try:
                done.result(None if timeout is None else max(0.0, timeout - (time.monotonic() - began)))
            except EasyServeError as exc:  # a new worker failed, or its HandleArgs: the old ones serve on
                raise _bare(exc) from None
            except (concurrent.futures.TimeoutError, KeyboardInterrupt) as exc:
                self._loop.call_soon_threadsafe(abandon.set)
                why = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"out of time (timeout={timeout:g}s)"
                log.warning("reload %s: abandoning it", why)
                try:
                    done.result()  # the rollback; or the reload, if it finished before it saw the word
                except StartupError as rollback:
                    if isinstance(exc, KeyboardInterrupt):
                        raise _bare(exc) from None  # the frames of the waits it came through say nothing
                    if stopping.is_set():  # stop() cut the rollback short as well
                        raise StartupError(f"reload did not finish within reload(timeout={timeout:g}); abandoned, "
                                           "and the server is stopping") from None
                    not_back = getattr(rollback, "not_put_back", [])
                    raise StartupError(f"reload did not finish within reload(timeout={timeout:g}); abandoned, "
                                       "and the workers already replaced were put back on the old handle"
                                       + "".join(f"\n\nBut: {note}" for note in not_back)) from None
                # every worker had been replaced (the last replaced one may still be finishing its batch):
                # not abandoned, though the warning above said it would be
                log.warning("the reload was done before it could be abandoned: the new handle serves")
                self._follow_pool()
                if isinstance(exc, KeyboardInterrupt):
                    raise _bare(exc) from None  # the frames of the waits it came through say nothing
            # the pool's, not ``config``: the pool told this server its new config as the reload ended, and a
            # rollback that came since (a third death on probation) has told it the old one's again
            self._follow_pool()
        finally:
            self._lock.release()
        return self

    def _reload_from_file(self) -> None:
        """SIGHUP: read the YAML file again and reload with its :data:`RELOADABLE` keys; log, never raise."""
        if self._source is None:
            log.warning("SIGHUP: this server was not made from a file; nothing to re-read")
            return
        path, overrides = self._source
        if str(path).lower().endswith(".onnx"):  # Server.from_onnx: the same model file, loaded again
            log.info("SIGHUP: loading %s again", path)
            try:
                self.reload(handle=self.config.handle, HandleArgs=self.config.handle_args)
            except Exception as exc:
                log.error("SIGHUP: reload of %s failed; still serving the model as it was: %s", path, exc)
            return
        try:
            fresh = Config.from_yaml(path).replace(**overrides)
        except Exception as exc:  # a file that no longer reads: the old workers go on serving
            log.error("SIGHUP: reload from %s failed; still serving the old handle: %s", path, exc)
            self._pool.said_reload(str(path), "failed", str(exc))
            return
        try:
            ignored = _unreloadable(self.config, fresh)
            if ignored:
                log.warning("SIGHUP: %s changed in %s; %s a restart, and %s ignored", ", ".join(ignored), path,
                            *(("needs", "is") if len(ignored) == 1 else ("need", "are")))
            self.reload(handle=fresh.handle, HandleArgs=fresh.handle_args, ModelName=fresh.model_name,
                        ModelVersion=fresh.model_version)
        except Exception as exc:  # a bad file or a handle that fails: the old workers go on serving
            from .reload import Abandoned

            if self._wake.is_set():  # a reload under way said so already, and how it left the workers
                log.info("SIGHUP: %s: the server is stopping", "reload abandoned" if isinstance(exc, Abandoned)
                         else "no reload")
            else:
                log.error("SIGHUP: reload from %s failed; still serving the old handle: %s", path, exc)

    def _hangup(self) -> None:
        """SIGHUP: reload from the file in a thread of its own. Signals that come while one waits to
        start make no more (it reads the file as it is then): each used to be a full reload, run one
        after another, and a stop waited for them all."""
        if self._hangup_waiting.acquire(blocking=False):
            def reload() -> None:
                with self._lock:  # only to wait for a reload under way: reload() takes it itself
                    self._hangup_waiting.release()
                self._reload_from_file()

            threading.Thread(target=reload, name="easyserve-reload", daemon=True).start()
        else:
            log.info("SIGHUP: a reload already waits to start; it will read the file as it is then")

    def serve_forever(self, drain_timeout: float | None = None, *, guardian: bool = False) -> None:
        """Start, then serve until SIGINT or SIGTERM (or ``stop()`` from another thread).

        A signal drains requests in flight first (for ``drain_timeout``, by default as :meth:`stop`
        says), after ``ShutdownDelayS``; a second one stops without waiting. A signal while workers are
        still starting abandons the start. SIGHUP re-reads the config file. With ``guardian``
        (``easyserve run --supervise``), SIGUSR1 says the guardian died: drain and stop, however often
        it comes. (:mod:`easyserve.signals` has the handlers.)
        """
        with Signals(self, guardian) as signals:  # until the last line is said: a late signal is heeded
            signals.start()
            signals.wait()
            self.stop(drain_timeout)
            # in a terminal, the last line says the process is done, and what it did
            log.info("%s", stopped_line(self.stats()))

    def _announce_stop(self) -> None:
        """A stop is coming (:meth:`Signals.serve_on`): not ready, and every answer closes its connection."""
        if self._pool is not None:
            self._pool.closing_soon = True
        if self._fronts is not None:
            self._fronts.close_soon()

    def __enter__(self) -> Server:
        if self.state == "stopped":
            self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc_info: Any) -> None:
        if kind is not None and issubclass(kind, KeyboardInterrupt):
            # The block was interrupted (Ctrl-C, a notebook's stop button): "stop now", as an interrupt
            # of stop() itself means. A drain waited for the requests in flight, the block's own among
            # them: the interrupted cell ran on for as long as that request took, saying nothing.
            log.warning("interrupted: stopping now; requests still in flight get 503")
            self.stop(drain_timeout=0)
        else:
            self.stop()

    def _stop_at_exit(self) -> None:
        self.stop(drain_timeout=0)

    # -- the event loop thread ---------------------------------------------------------------------

    def _run_loop(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        loop.run_forever()
        try:
            loop.run_until_complete(loop.shutdown_default_executor())
        except RuntimeError:  # at interpreter exit no thread can be started to shut it down
            pass
        loop.close()
        records.served()

    async def _startup(self, handle, specs) -> None:
        self._pool = WorkerPool(self.config, handle, specs)
        self._pool.listeners.append(self._follow_pool)
        self._workers = self._pool.workers
        api_key = self.config.required_key
        # Bind before starting workers: a port in use fails at once, not after the model loads.
        if self.config.http_workers > 1:
            if not hasattr(socket, "SO_REUSEPORT"):
                raise ConfigError("HttpWorkers above 1 needs SO_REUSEPORT, which this system lacks; use 1")
            self._fronts = Fronts(self._pool, self.config)
            self.port = self._fronts.bind()
            await self._fronts.start()
        else:
            self._runner = make_runner(make_app(self._pool, self.config), self.config)
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.config.host, self.config.port, backlog=LISTEN_BACKLOG)
            try:
                await site.start()
            except OSError as exc:
                raise StartupError.cannot_listen(self.config.host, self.config.port, exc) from None
            self.port = self._runner.addresses[0][1]
            for sock in site._server.sockets:  # aiohttp's asyncio.Server (see guards.stop_listening)
                keep_from_forks(sock.fileno())
        records.serving(self.port)
        if not binds_loopback(self.config.host):  # 127.0.0.2, [::1], this machine's own name: none reachable
            log.warning("listening on %s:%d: reachable from other machines%s", self.config.host, self.port,
                        "" if api_key else " and open to anyone who can reach it (set ApiKey to require a key)")
        if api_key:
            log.info("an API key is required on /predict, /stats, /metrics and /v2 (but for /v2/health)")
        secret = [name for name in self.config.pass_headers if name in SECRET_HEADERS]
        if secret:  # the operator's choice, said once: a handle that logs its tasks writes them out
            log.warning("PassHeaders names %s: each request's credentials reach the handle, and whatever it logs",
                        ", ".join(secret))
        await self._pool.start()

    def _follow_pool(self) -> None:
        """The config the pool serves is this server's: after a reload it rolled back, the old one's."""
        if self._pool is not None:
            self.config = self._pool.config

    def _abort(self) -> None:
        """A second signal, on the loop: the drain ends now, and the final close waits for nothing."""
        if self._pool is not None:
            self._pool.abort_drain()
        if self._fronts is not None:
            self._fronts.hurry()

    def _aborted(self) -> bool:
        return self._pool is not None and self._pool.aborted

    async def _shutdown(self, drain_timeout: float) -> None:
        closing_idle = None
        if self._runner is not None:
            # Stop listening first: new connections are refused at once, so clients and a proxy go
            # elsewhere; connections already open are answered (with "Connection: close") meanwhile.
            for site in list(self._runner.sites):
                await stop_listening(site)
            closing_idle = asyncio.get_running_loop().create_task(self._runner.close_idle())
        if self._fronts is not None:
            await self._fronts.drain()  # the same for every front process
        began = time.monotonic()
        try:
            if self._pool is not None:
                await self._pool.stop(drain_timeout)
            # Unless told not to wait: bodies still arriving get the drain's time left to arrive, and a
            # request sent on a connection answered a moment ago is answered too (see
            # guards.GuardedRunner.cleanup). Those left get 503, never a connection closed under them.
            # (At least 5 s more, clients trickling their bodies in held a stop 10 s past TimeoutS, past
            # the --stop-timeout the docs give, and the container was killed under its requests.)
            now = drain_timeout <= 0 or self._aborted()
            grace = 0.0 if now else max(0.0, drain_timeout - (time.monotonic() - began))
            linger = 0.0 if now else LINGER_S
            if self._runner is not None:
                await self._runner.cleanup(linger, grace, hurry=self._aborted)
            if self._fronts is not None:
                await self._fronts.stop(grace, linger)
        finally:
            if closing_idle is not None:  # still in its second look, where nothing was in flight
                closing_idle.cancel()
                await asyncio.wait({closing_idle})
            self._last_stats = self._snapshot()  # what stats() answers once stopped
            forget_apps()  # nor is anything else of this server's kept by aiohttp once it is over

    # -- what a user looks at ----------------------------------------------------------------------

    def _listening(self) -> str:
        """Where the server listens, for its start's line: on every address (0.0.0.0, ::), that
        and the URL to reach it from this machine, where :attr:`url` alone read as if ``--host``
        had been ignored (a container's log said 127.0.0.1)."""
        if self.config.host in ("0.0.0.0", "", "::"):
            return f"{self.config.host or '0.0.0.0'} port {self.port} ({self.url} from this machine)"
        return str(self.url)

    @property
    def url(self) -> str | None:
        """The base URL, e.g. ``http://127.0.0.1:9876``, while running."""
        if self.port is None:
            return None
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.config.host, self.config.host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def workers(self) -> list[dict[str, Any]]:
        """Each worker's name, state, pid, device and restarts."""
        return self._pool.describe() if self._pool is not None else []

    def stats(self, timeout: float = 2.0) -> dict[str, Any]:
        """The numbers ``/stats`` answers (requests, answers by status, requests per second, latency
        percentiles, queue depth, batch sizes, workers...), read on the event loop, so they are
        consistent; once stopped, the last run's final numbers. Raises ``TimeoutError`` if the loop
        does not answer within ``timeout`` seconds::

            server.stats()["statuses"]        # {'200': 1520, '503': 12}
        """
        fronts, loop = self._fronts, self._loop
        if fronts is not None and loop is not None:
            # each front first sends the answers it has given (and the body bytes it holds), so the
            # numbers include every answer a client has had
            try:
                asyncio.run_coroutine_threadsafe(fronts.count_held(), loop).result(timeout)
            except (RuntimeError, concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
                pass  # a loop stopping meanwhile: the snapshot below says what it can
        found = self._call_on_loop(self._snapshot, timeout)
        if found is _NOT_RUN:
            return self._last_stats if self._last_stats is not None else snapshot(None)
        return found

    def _snapshot(self) -> dict[str, Any]:
        # on the loop's thread; the owner of the server may see start-up tracebacks, as /stats shows them
        if self._fronts is not None:
            buffered = self._fronts.budget.held
        else:
            buffered = self._runner.app[BUDGET].held if self._runner is not None else 0
        return snapshot(self._pool, buffered, detail=True)

    def _call_on_loop(self, fn: Any, timeout: float) -> Any:
        """``fn()`` run on the event loop's thread; ``_NOT_RUN`` if the loop is not running, or ends
        (a stop) before it runs. Raises ``TimeoutError`` if a running loop takes over ``timeout``."""
        loop = self._loop
        if loop is None or not loop.is_running():
            return _NOT_RUN
        future: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:  # a plain callback, not a coroutine: a loop closed before it runs leaves nothing behind
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)

        try:
            loop.call_soon_threadsafe(run)
        except RuntimeError:  # closed since
            return _NOT_RUN
        deadline = time.monotonic() + timeout
        while True:  # in short waits: a loop that stops without running fn must not be waited out
            try:
                return future.result(min(0.05, max(0.0, deadline - time.monotonic())))
            except concurrent.futures.TimeoutError:
                if future.done():  # it ran just as this wait ran out
                    return future.result()
                if loop.is_closed() or self._loop is not loop:
                    future.cancel()
                    return _NOT_RUN
                if time.monotonic() >= deadline:
                    future.cancel()
                    raise TimeoutError(f"the server's event loop did not answer within {timeout:g}s") from None

    def logs(self, worker: str | int | None = None, tail: int | None = 50) -> Logs:
        """The workers' recent output, oldest first: a handle's ``print()``, warnings, the traceback of
        a batch that failed, the last words of a worker that died. Kept after ``stop()`` too.

        ``worker`` picks one worker by name (``"cpu/0"``, ``"gpu0/1"``) or index; ``tail`` keeps the
        last lines (``None``: all kept, up to 1,000 a worker)::

            server.logs()                 # the last 50 lines of every worker
            server.logs("cpu/0", tail=None)
        """
        chosen = self._workers
        if worker is not None:
            names = [w.name for w in chosen]
            if isinstance(worker, int) and not isinstance(worker, bool) and -len(chosen) <= worker < len(chosen):
                chosen = [chosen[worker]]
            elif worker in names:
                chosen = [chosen[names.index(worker)]]
            else:
                raise ValueError(f"no worker {worker!r}; workers are {', '.join(names) or 'none (never started)'}")
        lines = self._call_on_loop(lambda: _lines(chosen, tail), 5)  # the rings are appended to on the loop's thread
        if lines is _NOT_RUN:
            lines = _lines(chosen, tail)
        return Logs(lines)

    def dashboard(self, interval: float = 1.0, log_lines: int = 15) -> Any:
        """A live view of this server for a notebook: workers, queue, requests per second, latency,
        answers by status, batch sizes and the workers' last log lines, refreshed every ``interval``
        seconds until the server stops. Make it a cell's last expression to show it::

            server.dashboard()

        A new dashboard replaces the one before it, which stops refreshing and closes: running its
        cell again leaves one view, and one thread, as a reader expects.
        """
        from .dashboard import Dashboard  # ipywidgets is imported only by those who ask for it

        if self._dashboard is not None:
            self._dashboard.close()
        self._dashboard = Dashboard(self, interval=interval, log_lines=log_lines)
        return self._dashboard

    def _repr_html_(self) -> str:
        """A compact status card, shown when the server is a notebook cell's result."""
        from .dashboard import card

        return card(self)

    def _handle_name(self) -> str:
        # the handle as the config names it: a class's name, or the reference it was given as
        handle = self.config.handle
        return handle.__qualname__ if isinstance(handle, type) else str(handle)

    def __repr__(self) -> str:
        name = self._handle_name()
        if self.state == "stopped" or self._pool is None:
            port = self.config.port or self._last_port or 0  # Port: 0 says which one it had
            return f"<Server stopped handle={name} port={port}>"
        workers = self.workers
        counted = slots(workers)
        ready = sum(w["state"] in ("idle", "busy") for w in counted)
        # the server's count, as its card, the dashboard and /stats give it: each worker's own begins again
        # at 0 when a reload replaces it, and the repr beside the card said 4 where it said 6
        restarts = self._pool.stats.restarts
        detail = ", ".join(f"{w['name']} {marked(w, w['state'])}" for w in workers)
        return (f"<Server {self.state} {self.url} handle={name} workers={ready}/{len(counted)} ready "
                f"[{detail}] queue={len(self._pool.queue)} restarts={restarts}>")


def _redefined(handle: Any, doing: str) -> Any:
    """A handle class as its module now defines it under its name: ``reload()`` after a notebook cell
    defined it again served the old class, silently, though a function it calls was the new one, and so
    did ``start()`` after ``stop()`` (``doing``: which of the two asks, for the log)."""
    if not isinstance(handle, type):
        return handle
    current: Any = sys.modules.get(handle.__module__)
    for name in handle.__qualname__.split("."):
        current = getattr(current, name, None)
    # the same class defined again (a cell run again keeps its module and name), not another that took
    # the name since (``from collections import Counter``, a built-in Echo imported over the user's)
    if (isinstance(current, type) and current is not handle and current.__module__ == handle.__module__
            and current.__qualname__ == handle.__qualname__):
        log.info("%s: %s as %s now defines it", doing, handle.__qualname__,
                 "the notebook" if handle.__module__ == "__main__" else handle.__module__)
        return current
    return handle


RELOADABLE = ("Handle", "HandleArgs", "ModelName", "ModelVersion")  # the last two: the v2 name it is served by
SECRET_HEADERS = ("authorization", "cookie", "proxy-authorization")  # warned of when PassHeaders names them
DRAIN_MARGIN_S = 5.0  # a drain's time past TimeoutS: for the last deadline's 504, or a stuck worker's kill
ABORTED_CLOSE_S = 30.0  # how long a shutdown told to stop now (an interrupt) is waited for at most


def _as_handle_args(exc: ConfigError, handle: Any, overrides: dict) -> ConfigError:
    """``exc``, or, for keywords that are no config key but the handle class's ``__init__`` takes
    (``Server(handle=Classifier, top_k=5)``), the error saying to give them in ``HandleArgs``."""
    if not isinstance(handle, type) or not str(exc).startswith("unknown config key"):
        return exc
    try:
        takes = inspect.signature(handle.__init__).parameters
    except (TypeError, ValueError):
        return exc
    unknown = [key for key in overrides if key not in KEYS and key not in FIELDS]
    theirs = {key: overrides[key] for key in unknown if key in takes and key != "self"}
    if not theirs:
        return exc
    given = ", ".join(f"{key!r}: {value!r}" for key, value in theirs.items())
    others = [key for key in unknown if key not in theirs]
    return ConfigError(f"unknown config key {', '.join(map(repr, unknown))}: {handle.__qualname__}.__init__ takes "
                       f"{', '.join(theirs)}, from HandleArgs={{{given}}}"
                       + (f"; {', '.join(others)}: neither a config key nor the handle's" if others else ""))


def _unreloadable(old: Config, new: Config) -> list[str]:
    """The keys whose change ``new`` makes that a reload cannot carry out. The API key is compared as
    it is: ``to_dict()`` shows any as ``***``, so a new key (a leaked one rotated) passed unseen, and the
    old one went on opening the server."""
    before, after = old.to_dict(), new.to_dict()
    changed = [key for key in after if key not in RELOADABLE and after[key] != before[key]]
    if old.api_key != new.api_key and "ApiKey" not in changed:
        changed.append("ApiKey")
    return changed


def _check_reloadable(old: Config, new: Config) -> None:
    changed = _unreloadable(old, new)
    if changed:
        raise ConfigError(f"reload() changes {' and '.join(RELOADABLE)} only; {', '.join(changed)} "
                          f"{'needs' if len(changed) == 1 else 'need'} stop() and start()")


def _lines(slots: list[Worker], tail: int | None) -> list:
    # each ring is in time order: the last `tail` lines of all are among the last `tail` of each
    # (in their order: the lines of one read share a time, and the sort keeps the order of equals).
    # A worker being replaced (a reload) shares its ring with its successor: read it once.
    shared = {id(w.ring): w.ring for w in slots}.values()
    rings = [ring if not tail else ring.last(tail) for ring in shared]
    lines = sorted((line for ring in rings for line in ring), key=operator.itemgetter(0))  # by time
    return _logs.ring_lines(lines[-tail:] if tail else lines)


_NOT_RUN = object()  # what _call_on_loop answers when no loop ran the function


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def _bare(exc: BaseException) -> BaseException:
    """``exc``, one of easyserve's errors, whose message says all (a handle's traceback included), made
    to be raised without the frames it came through: the event loop's thread, and concurrent.futures
    handing it over. In a notebook those were some 35 lines above the handle's own traceback."""
    return exc.with_traceback(None)


def _result(future: concurrent.futures.Future, timeout: float | None, stop: threading.Event | None = None) -> Any:
    """``future.result(timeout)``, in waits of at most SIGNAL_POLL_S, so that signals are heeded meanwhile;
    once ``stop`` is set (``stop()`` called on another thread), :class:`StartupError`."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        try:
            return future.result(SIGNAL_POLL_S if left is None else max(0.0, min(left, SIGNAL_POLL_S)))
        except concurrent.futures.TimeoutError:
            if future.done():  # it ended just as this wait did (a start raised TimeoutError), or with its own
                return future.result()
            if stop is not None and stop.is_set():
                raise StartupError(STOPPED_STARTING) from None
            if left is not None and left <= SIGNAL_POLL_S:  # this wait's, at the deadline
                raise
