"""Which worker runs where: GPUs found on this machine, and one worker per (GPU, slot)."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import subprocess
from pathlib import Path

from .config import Config

log = logging.getLogger("easyserve")

__all__ = ["WorkerSpec", "visible_gpus", "plan"]


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """One worker to start: ``gpu`` is the config's GPU id (``None`` for CPU), ``visible`` the value of
    ``CUDA_VISIBLE_DEVICES`` in its process, ``threads`` its share of the CPU cores."""

    name: str
    gpu: int | None
    visible: str
    threads: int


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries, indexed by config GPU id.

    Where the environment already sets ``CUDA_VISIBLE_DEVICES`` (a scheduler gave us GPUs), config
    id ``i`` is its ``i``-th entry, as CUDA numbers them; otherwise the GPUs ``nvidia-smi`` lists.
    """
    found = _nvidia_smi_indices()
    preset = os.environ.get("CUDA_VISIBLE_DEVICES")
    if preset is not None:
        entries = [e.strip() for e in preset.split(",") if e.strip()]
        if entries and entries[0].startswith("-"):
            return []
        return entries if found else []
    return found


def _nvidia_smi_indices() -> list[str]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip().isdigit()]


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


def plan(config: Config) -> list[WorkerSpec]:
    """The workers a config asks for; GPU ids this machine lacks become CPU workers, with a warning."""
    gpus = visible_gpus()
    wanted = tuple(range(len(gpus))) if config.gpus == "auto" else config.gpus
    missing = [g for g in wanted if g >= len(gpus)]
    if missing:
        have = f"GPUs {', '.join(map(str, range(len(gpus))))}" if gpus else "no GPU"
        log.warning(
            "GPUs: asked for GPU %s but this machine has %s; those workers run on CPU instead",
            ", ".join(map(str, missing)), have,
        )
    slots = [g if g < len(gpus) else None for g in wanted] or [None]
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
