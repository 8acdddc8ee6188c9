"""Hot reload: every worker replaced by one running a new handle (or new ``HandleArgs``), one at a time
on each device (each GPU; the CPU workers are one device), while the others keep serving. No request is
refused or failed for it.

For each worker in turn, a new worker is started beside it with the new handle; once the new one is
ready and taking batches, the old one finishes the batch it holds (if any) and stops. At most one
extra model copy exists at a time on each device. If a new worker cannot start, the reload stops there, the workers
already replaced are put back on the old handle, and the error is raised with its traceback: the
server goes on serving the old handle. A reload abandoned (``reload(timeout=...)`` ran out, or the
caller was interrupted) ends the same way: the worker still starting is stopped, and the workers
already replaced are put back. One that cannot be put back (the old model file has gone) stops, and
its slot starts the old handle again as a worker that fails to start does: never two handles at once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Awaitable, Callable

from .errors import StartupError
from .loader import HandleRef
from .pool import ROLLBACK_AFTER, STOP_GRACE_S, Probation, handle_payload, start_hint
from .slots import Worker, said_last

if TYPE_CHECKING:
    from .config import Config
    from .pool import WorkerPool

log = logging.getLogger("easyserve")

__all__ = ["reload_workers"]


async def reload_workers(pool: WorkerPool, handle: HandleRef, config: Config,
                         abandon: asyncio.Event | None = None, stopping: asyncio.Event | None = None) -> None:
    """Replace ``pool``'s workers with ones running ``handle`` with ``config.handle_args``; once
    ``abandon`` is set, stop, put back what was replaced, and raise :class:`StartupError`. With
    ``stopping`` set as well, the server is about to stop: nothing is put back (that would start
    workers on the old handle, which takes as long as the reload, only to stop them)."""
    payload = handle_payload(handle, config)
    old_payload = pool._payload
    # a handle on probation is not the one to go back to if this one fails: the probation holds on then.
    # The handle to go back to is the last whose workers answered a batch: not one itself still on
    # probation, which two bad reloads in a row went back to, and kept for good.
    earlier = pool.probation
    last_good = earlier.old if earlier is not None else (old_payload, pool.handle, pool.config)
    # On probation from its first worker on, which takes batches as soon as it is ready: deaths counted
    # only once every worker had been replaced let a handle whose batches end its workers kill a batch a
    # setup's time, per worker already replaced, and the reload said it was done (3 workers: 6 deaths).
    failing = asyncio.Event()
    probation = pool.probation = Probation(payload, last_good, failing=failing, earlier=earlier)
    # the slots: not a worker an earlier reload replaced that is still finishing its batch (it was
    # replaced again, a model copy more for good), nor one starting beside another
    slots = [worker for worker in pool.workers if worker.is_slot]
    devices = len({worker.spec.gpu for worker in slots})
    log.info("reloading %d worker(s) with %s%s", len(slots), handle.describe(),
             f", one at a time on each of {devices} devices" if devices > 1 else "")
    replaced: list[Worker] = []
    relay = asyncio.ensure_future(_relayed(abandon, failing)) if abandon is not None else None

    async def replace(worker: Worker) -> None:
        try:
            # another device's failure starts nothing more here, but the worker just replaced is still let
            # finish its batch and exit: cut short, the put-back started a copy beside it and the new one
            replaced.append(await _swap(pool, worker, payload, failing, stop_waiting=abandon or asyncio.Event()))
        except BaseException:
            failing.set()  # every device's turn stops there, and what was replaced is put back
            raise

    try:
        errors = await _by_device(slots, replace)
        if errors:
            raise next((error for error in errors if not isinstance(error, Abandoned)), errors[0])
        if probation.deaths >= ROLLBACK_AFTER:  # as the last one's predecessor stopped: they start the old handle
            raise Abandoned("its workers died once every worker had been replaced")
    except StartupError as exc:
        # the handle put back is on probation still, if it was and has not answered meanwhile
        pool.probation = earlier if earlier is not None and not earlier.passed else None
        if stopping is not None and stopping.is_set():
            log.warning("reload abandoned: the server is stopping")
            pool.said_reload(handle.describe(), "abandoned", "the server is stopping")
            raise Abandoned("abandoned: the server is stopping") from None
        if probation.deaths >= ROLLBACK_AFTER:  # they start the old handle already (see died_on_probation)
            died = StartupError(f"the new handle's workers died {probation.deaths} times before answering any batch "
                                f"(the log says how); the {len(replaced)} worker(s) already replaced start the old "
                                "handle again")
            pool.said_reload(handle.describe(), "failed", str(died))
            raise died from None
        pool.said_reload(handle.describe(), "abandoned" if isinstance(exc, Abandoned) else "failed", str(exc))
        say = log.warning if isinstance(exc, Abandoned) else log.error
        say("reload %s; %s", "abandoned" if isinstance(exc, Abandoned) else "failed",
            f"putting back the {len(replaced)} worker(s) already replaced" if replaced
            else "no worker had been replaced: the old handle serves on")
        not_back: list[str] = []

        async def put_back(worker: Worker) -> None:
            try:
                await _swap(pool, worker, old_payload, stopping, "the old handle")
            except Abandoned:  # the server is stopping: this device's turn ends
                raise
            except StartupError as failure:  # the old handle no longer starts either (its model file gone)
                not_back.append(_retry_old(pool, worker, failure))

        left = await _by_device(replaced, put_back)
        if any(isinstance(error, Abandoned) for error in left):
            log.warning("putting back the old handle abandoned: the server is stopping")
        unexpected = [error for error in left if not isinstance(error, Abandoned)]
        if unexpected:
            raise unexpected[0]
        if not_back:
            told = type(exc)(f"{exc}\n\n" + "\n\n".join(not_back))
            told.not_put_back = not_back  # type: ignore[attr-defined]  # for reload(timeout=)'s own message
            raise told from None
        raise
    finally:
        if relay is not None:
            relay.cancel()
    # on probation until one of its workers has answered a batch (see WorkerPool.died_on_probation),
    # unless one already has; its deaths so far count, and from now on they roll it back
    probation.failing = probation.earlier = None
    pool._payload, pool.handle, pool.config = payload, handle, config
    pool.rolled_back = None
    pool.queue.forget_run_times()  # the new model's batches may cost more or less
    for listener in pool.listeners:  # the model's v2 name may have changed with the handle
        listener()
    log.info("reload done: %d worker(s) run %s", len(replaced), handle.describe())
    pool.said_reload(handle.describe(), "done")


async def _by_device(workers: list[Worker], each: Callable[[Worker], Awaitable[None]]) -> list[BaseException]:
    """``each`` on the workers of each device in turn, the devices at once; what each device's turn raised,
    where it ended. So a reload holds one model copy more on each GPU at a time (a GPU's memory is its own),
    where one for the whole machine made a reload of 8 GPUs with ProcessPerGPU 4 take 32 model loads end
    to end (56 s for a 1.75 s setup). CPU workers are one device: one at a time, as the machine's memory
    is shared."""
    turns: dict[int | None, list[Worker]] = {}
    for worker in workers:
        turns.setdefault(worker.spec.gpu, []).append(worker)

    async def turn(group: list[Worker]) -> None:
        for worker in group:
            await each(worker)

    ended = await asyncio.gather(*(turn(group) for group in turns.values()), return_exceptions=True)
    return [error for error in ended if isinstance(error, BaseException)]


async def _relayed(abandon: asyncio.Event, failing: asyncio.Event) -> None:
    """``abandon`` set sets ``failing``, which the reload's waits watch."""
    await abandon.wait()
    failing.set()


class Abandoned(StartupError):
    """The reload was told to stop before it finished."""


def _retry_old(pool: WorkerPool, worker: Worker, failure: StartupError) -> str:
    """``worker`` runs the new handle and could not be put back on the old one: it stops, and its slot
    starts the old handle again as any worker that fails to start does (backing off), serving nothing
    meanwhile. Left serving, it answered beside the old handle's workers: two versions behind one
    endpoint, while the server said the old one served. Returns what to tell the caller."""
    error = str(failure).split("\n", 1)[0].removeprefix(f"worker {worker.name} could not start the old handle: ")
    # reported_trace: this says why, and the watchdog's first word on the slot is its short line
    slot = Worker(worker.spec, state="dead", ring=worker.ring, start_failures=1, error=error, reported_trace=error)
    _carry(worker, slot)
    pool.workers.append(slot)
    pool.leave(worker)
    pool.watchdog.schedule_restart(slot)
    told = (f"worker {worker.name} could not be put back on the old handle: {error}; it stopped, and its slot "
            "starts it again, backing off, as for a worker that fails to start: no worker serves the new handle")
    log.error("%s", told)
    return told[0].upper() + told[1:]


async def _swap(pool: WorkerPool, old: Worker, payload: bytes, abandon: asyncio.Event | None = None,
                what: str = "the new handle", stop_waiting: asyncio.Event | None = None) -> Worker:
    """``old`` replaced by a worker running ``payload``, once that one is ready and ``old`` has exited (or
    10 s have passed); ``abandon`` set ends it (:class:`Abandoned`), except the wait for ``old`` to exit,
    which only ``stop_waiting`` (by default ``abandon``) cuts short."""
    stop_waiting = abandon if stop_waiting is None else stop_waiting
    if abandon is not None and abandon.is_set():
        raise Abandoned(f"abandoned before worker {old.name} was replaced")
    new = Worker(old.spec, payload=payload, ring=old.ring, candidate=True, recycling=True)
    pool.workers.append(new)
    try:
        await pool.spawn(new)
    except Exception as exc:
        pool.remove(new)
        raise StartupError(f"worker {new.name}: no process could be started: {type(exc).__name__}: {exc}") from None
    if not await _unless_abandoned(new.ready, abandon):  # the watchdog takes it out once it has exited
        pool.leave(new)
        raise Abandoned(f"abandoned while worker {new.name} was starting {what}")
    error = await new.ready
    if error and new.config_error:  # the config's fault, said alone, as at start: no traceback, no hint to read it
        # (its memory above MaxWorkerMemoryMB once set up, being ended: no trace; a handle with no forward: one)
        raise StartupError(f"worker {new.name} could not start {what}: {new.config_error if new.trace else error}")
    if error:  # its process has exited, and the watchdog took it out of the pool
        trace = said_last(new)
        raise StartupError(f"worker {new.name} could not start {what}: {error}\n\n{trace}\n"
                           f"{start_hint(error, trace)}")
    new.candidate = False
    pool.leave(old)
    if old.exited is not None and old.proc is not None:
        if not await _unless_abandoned(asyncio.shield(old.exited), stop_waiting, 2 * STOP_GRACE_S):
            log.warning("worker %s (pid %d) replaced by a reload has not exited yet", old.name, old.proc.pid)
    _carry(old, new)  # once its last batch is answered, where it exited in time
    return new


def _carry(old: Worker, new: Worker) -> None:
    """The counts of a slot go on with the worker that takes its place: after a reload, the restarts and
    batches of each slot (the dashboard's worker table) started again from 0, while the totals beside
    them kept the run's."""
    new.restarts += old.restarts
    new.earlier_batches += old.earlier_batches + old.batches  # not its handle's: see Watchdog._kill_stuck
    new.recycled += old.recycled


async def _unless_abandoned(waited: asyncio.Future, abandon: asyncio.Event | None,
                            timeout: float | None = None) -> bool:
    """Wait for ``waited`` until ``abandon`` is set or ``timeout`` passes; whether it is done."""
    told = asyncio.ensure_future(abandon.wait()) if abandon is not None else None
    try:
        await asyncio.wait([waited] + ([told] if told else []), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if told is not None:
            told.cancel()
    return waited.done()
