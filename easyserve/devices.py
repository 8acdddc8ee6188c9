"""Which worker runs where: GPUs found on this machine, and one worker per (GPU, slot)."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Callable

from .config import Config

log = logging.getLogger("easyserve")

__all__ = ["WorkerSpec", "visible_gpus", "plan", "ProbeStopped"]


class ProbeStopped(Exception):
    """The GPU probe was ended by a ``stop()`` of the server that was starting."""


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """One worker to start: ``gpu`` is the config's GPU id (``None`` for CPU), ``visible`` the value of
    ``CUDA_VISIBLE_DEVICES`` in its process, ``threads`` its share of the CPU cores."""

    name: str
    gpu: int | None
    visible: str
    threads: int


PROBE_TIMEOUT_S = 20.0  # for nvidia-smi to list the GPUs (a wedged driver makes it hang)
PROBE_POLL_S = 0.1  # how often a probe that has not answered looks whether its start was stopped
NOT_INSTALLED = "nvidia-smi is not installed"  # no driver: GPUs: auto falls back to CPU without a word


def visible_gpus() -> dict[int, str]:
    """The GPUs this process may use: config GPU id to ``CUDA_VISIBLE_DEVICES`` entry.

    Where the environment already sets ``CUDA_VISIBLE_DEVICES`` (a scheduler gave us GPUs), config
    id ``i`` is its ``i``-th entry, as CUDA numbers them; otherwise each GPU ``nvidia-smi`` lists, by
    its index there (a GPU it cannot read leaves a gap: the others keep their numbers).
    """
    return _visible()[0]


def _visible(stopped: Callable[[], bool] = lambda: False) -> tuple[dict[int, str], str | None, str | None]:
    """:func:`visible_gpus`, why there are none or why the list may be short (``None``: no word), and
    what to say of preset ``CUDA_VISIBLE_DEVICES`` entries that name no GPU ``nvidia-smi`` lists."""
    found, why = _nvidia_smi_gpus(stopped)
    preset = os.environ.get("CUDA_VISIBLE_DEVICES")
    if preset is None:
        # pinned by index, as nvidia-smi numbers them (CUDA_DEVICE_ORDER=PCI_BUS_ID); past a GPU it could
        # not read, by UUID: CUDA may not count that one, and would then give a worker its neighbour
        gapped = sorted(found) != list(range(len(found)))
        return {index: (uuid if gapped and uuid else str(index)) for index, uuid in sorted(found.items())}, why, None
    entries = []
    for entry in (e.strip() for e in preset.split(",")):
        if not entry or entry.startswith("-"):  # CUDA stops at the first entry it cannot take
            break
        entries.append(entry)
    if not entries:
        return {}, f"CUDA_VISIBLE_DEVICES={preset!r} hides every GPU", None
    if not found:
        if why == NOT_INSTALLED:  # a container given GPUs without the driver's utility capability, say
            why = (f"CUDA_VISIBLE_DEVICES={preset!r} names GPUs, but nvidia-smi is not installed, so none is used "
                   "(in a container: NVIDIA_DRIVER_CAPABILITIES needs utility beside compute)")
        return {}, why, None
    uuids = [uuid for uuid in found.values() if uuid]
    unlisted = [entry for entry in entries
                if entry.isdigit() and int(entry) not in found  # MIG instances are not listed by index or UUID
                or entry.startswith("GPU-") and uuids and not any(uuid.startswith(entry) for uuid in uuids)]
    said = None
    if unlisted:
        said = (f"CUDA_VISIBLE_DEVICES names {', '.join(unlisted)}, which nvidia-smi does not list (it lists "
                f"{', '.join(map(str, sorted(found)))}): CUDA will not find {'it' if len(unlisted) == 1 else 'them'}")
    return dict(enumerate(entries)), why, said


def _nvidia_smi_gpus(stopped: Callable[[], bool] = lambda: False) -> tuple[dict[int, str | None], str | None]:
    """The GPUs ``nvidia-smi`` lists, index to UUID (``None`` where it gave none), and what went wrong, if
    anything: a driver that does not answer, a failed exit (the GPUs it listed before failing are kept),
    output that is not UTF-8. :class:`ProbeStopped` once ``stopped()`` while it waits for a hung one: a
    ``stop()`` of the server starting waited out the probe's 20 s."""
    try:
        proc = subprocess.Popen(["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError:
        return {}, NOT_INSTALLED
    except OSError as exc:
        return {}, f"nvidia-smi could not run: {exc.strerror or exc}"
    end = time.monotonic() + PROBE_TIMEOUT_S
    try:
        while True:
            try:  # asked again after a timeout, communicate loses none of the output
                stdout, stderr = proc.communicate(timeout=max(0.0, min(PROBE_POLL_S, end - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                if stopped():
                    raise ProbeStopped() from None
                if time.monotonic() >= end:
                    return {}, f"nvidia-smi did not answer within {PROBE_TIMEOUT_S:g} s"
    finally:
        if proc.returncode is None:  # hung, stopped, or interrupted (Ctrl-C, a stop signal)
            proc.kill()
            try:  # one stuck in a wedged driver may not die: left, not waited for
                proc.wait(PROBE_POLL_S)
            except subprocess.TimeoutExpired:
                pass
            proc.stdout.close()
            proc.stderr.close()
    lines = [line.strip() for line in stdout.decode("utf-8", "replace").splitlines() if line.strip()]
    found: dict[int, str | None] = {}
    listed = set()
    for line in lines:
        index, _, uuid = (part.strip() for part in line.partition(","))
        if index.isascii() and index.isdigit():
            found[int(index)] = uuid if uuid.startswith("GPU-") else None
            listed.add(line)
    if proc.returncode == 0:
        return found, None if found else "nvidia-smi lists no GPU"
    said = next((line for line in [*lines, *stderr.decode("utf-8", "replace").splitlines()]
                 if line.strip() and line not in listed), "")
    return found, f"nvidia-smi exited with status {proc.returncode}" + (f": {said.strip()[:200]}" if said else "")


def cpu_count() -> int:
    """The cores this process may use: those it may run on, and no more than a container's CPU quota
    (a container limited to 2 CPUs on a 64-core machine sees 64 cores; its workers' threads split 64)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPUs a cgroup's quota allows this process (cgroup v2's ``cpu.max``, or v1's CFS quota), or
    ``None`` where none is set or none can be read."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return int(quota) / int(period) if quota != "max" else None
    except (OSError, ValueError):
        pass
    try:
        quota, period = (int((root / "cpu" / name).read_text()) for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def plan(config: Config, stopped: Callable[[], bool] = lambda: False) -> list[WorkerSpec]:
    """The workers a config asks for; GPU ids this machine lacks are left out where it has some of those
    listed, else become CPU workers (a config for another machine, a laptop), with a warning that says
    why (no GPU, or nvidia-smi failing). A CPU config asks nvidia-smi nothing: a hung one held
    its start 20 s, and output that was not UTF-8 failed it. :class:`ProbeStopped` where ``stopped()``
    turns true while nvidia-smi is yet to answer."""
    gpus, why, unlisted = _visible(stopped) if config.gpus != () else ({}, None, None)
    wanted = tuple(gpus) if config.gpus == "auto" else config.gpus
    missing = [g for g in wanted if g not in gpus]
    if unlisted:
        log.warning("GPUs: %s", unlisted)
    # CPU workers in their place, as many as this machine's cores keep busy: an 8-GPU config with
    # ProcessPerGPU 8 started 64 workers on a laptop, each with its copy of the model
    room = max(1, -(-cpu_count() // config.process_per_gpu))
    found = [g for g in wanted if g in gpus]
    if missing and found:
        # Some of the GPUs listed are here: the others' workers are left out. CPU workers in their place,
        # beside GPU ones, took their share of the batches at a fraction of the speed (the p99 theirs),
        # where a typo (GPUs: "0,1,7" on a 4-GPU machine) was said in one warning.
        log.warning("GPUs: asked for GPU %s but this machine has GPUs %s%s; serving on GPU %s alone (a CPU worker "
                    "beside GPU ones would take its share of the batches at a fraction of their speed)",
                    ", ".join(map(str, missing)), ", ".join(map(str, gpus)), f" ({why})" if why else "",
                    ", ".join(map(str, found)))
        wanted = found
    elif missing:
        have = f"GPUs {', '.join(map(str, gpus))}" if gpus else "no GPU"
        fewer = (f" ({room * config.process_per_gpu} of them, not {len(missing) * config.process_per_gpu}: this "
                 f"machine's {cpu_count()} cores would be shared by more)") if len(missing) > room else ""
        log.warning(
            "GPUs: asked for GPU %s but this machine has %s%s; those workers run on CPU instead%s",
            ", ".join(map(str, missing)), have, f" ({why})" if why else "", fewer,
        )
        wanted = missing[:room]
    elif why and (gpus or why != NOT_INSTALLED and config.gpus == "auto"):
        # a driver that fails, on a machine that has one: said, where "auto" fell back to CPU silently
        log.warning("GPUs: %s; %s", why, f"using the GPUs it listed ({', '.join(map(str, gpus))})" if gpus
                    else "the workers run on CPU")
    slots = [g if g in gpus else None for g in wanted] or [None]
    total = len(slots) * config.process_per_gpu
    threads = max(1, cpu_count() // total)
    specs = []
    cpu_index = 0
    for slot in range(config.process_per_gpu):
        for gpu in slots:
            if gpu is None:
                specs.append(WorkerSpec(f"cpu/{cpu_index}", None, "", threads))
                cpu_index += 1
            else:
                specs.append(WorkerSpec(f"gpu{gpu}/{slot}", gpu, gpus[gpu], threads))
    return specs
