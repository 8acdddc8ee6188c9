"""Which worker runs where: GPUs found on this machine, and one worker per (GPU, slot)."""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess

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
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


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
