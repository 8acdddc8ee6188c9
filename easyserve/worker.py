"""The worker process: loads one handle on one device and runs the batches the server sends it.

Started by :mod:`easyserve.pool` as ``python -m easyserve.worker SOCK_FD LIFELINE_FD SERVER_PID`` with
``CUDA_VISIBLE_DEVICES`` already in its environment, so no CUDA library can see another GPU.
It exits by itself when the server goes away, however it goes: on Linux the kernel signals it
when the server dies, and everywhere the server holds the write end of the lifeline pipe, which
the kernel closes when the server dies.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import socket
import sys
import threading
import time
import traceback

from . import wire
from .bodies import JsonBody, parse_json_object
from .errors import BadRequest
from .npy import NPY, NpyAnswer, to_npy
from .v2.protocol import InferTask, Signature, encode_response
from .wire import EXIT_MEMORY_ERROR

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def main(sock_fd: int, lifeline_fd: int, server_pid: int) -> int:
    die_with_parent(server_pid, signal.SIGKILL)
    # Ctrl-C in a terminal reaches the whole process group; the server decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_server, args=(lifeline_fd,), daemon=True, name="lifeline").start()
    sock = socket.socket(fileno=sock_fd)
    boot = wire.recv(sock)
    for path in reversed(boot["sys_path"]):
        if path not in sys.path:
            sys.path.insert(0, path)
    name = boot["device"]["name"]
    # the server stamps each line of this process's output with the time and the worker's name
    logging.basicConfig(level=boot["log_level"], format="%(levelname)s %(name)s: %(message)s")
    try:
        from .handle import Device, to_json
        from .loader import build

        payload = pickle.loads(wire.recv(sock))
        device = Device(**boot["device"])
        handle = build(payload["handle"], dict(payload["handle_args"]))
        handle.setup(device)
        info = _describe(device)
        # the model's metadata, for the server, which never imports the handle: a wrong declaration
        # fails the start, with its message
        signature = Signature.of(type(handle))
    except BaseException:
        wire.send(sock, ("failed", traceback.format_exc()))
        return 3
    wire.send(sock, ("ready", info, signature))
    while True:
        try:
            message = wire.recv(sock)
        except EOFError:
            return 0
        if message[0] == "stop":
            return 0
        _, batch_id, tasks = message
        started = time.perf_counter()
        results, answers = _run_decoded(handle, tasks, signature)
        run_s = time.perf_counter() - started
        encoded = [_encode(status, value, to_json, name, answer, signature)
                   for (status, value), answer in zip(results, answers)]
        wire.send(sock, ("done", batch_id, encoded, run_s, rss_bytes()))


def _run_decoded(handle, tasks: list[tuple[str, object]], signature: Signature) -> tuple[list, list]:
    """Decode what the server left to this worker (large JSON bodies, inference requests: a malformed
    one fails alone, with the 400 the server would have given), then run the rest as one batch.

    Returns each task's ``(status, result)``, and, for an inference request, how to answer it
    (``(task, request)``; ``None`` for ``/predict``).
    """
    results: list = [None] * len(tasks)
    answers: list = [None] * len(tasks)
    kept, envelopes = [], []
    for i, (task_id, info) in enumerate(tasks):
        try:
            if isinstance(info, NpyAnswer):  # answer an array result as .npy
                info, answers[i] = info.task_info, NPY
            if isinstance(info, JsonBody):
                info = parse_json_object(info)
            elif isinstance(info, InferTask):
                request, inputs = info.open(signature)
                answers[i] = (info, request)
                envelopes.append({"task_id": task_id, "task_info": inputs, "protocol": "v2",
                                  "parameters": request.parameters})
                kept.append(i)
                continue
        except BadRequest as exc:
            results[i] = (400, str(exc))
            continue
        kept.append(i)
        envelopes.append({"task_id": task_id, "task_info": info})
    if envelopes:
        for i, result in zip(kept, _run(handle, envelopes)):
            results[i] = result
    return results, answers


def _run(handle, tasks: list[dict]) -> list[tuple[int, object]]:
    """``handle.run_batch``, made safe: whatever a handle does, each task gets one answer."""
    try:
        results = handle.run_batch(tasks)
    except MemoryError:
        # Allocations fail in this process (a leak, fragmentation): every batch after this one would
        # fail too. Exit unanswered: the server retries the batch on a fresh worker and replaces this one.
        traceback.print_exc()
        os._exit(EXIT_MEMORY_ERROR)
    except Exception as exc:  # an overridden run_batch that raised
        traceback.print_exc()
        return [(500, f"run_batch failed: {type(exc).__name__}: {exc}")] * len(tasks)
    if not isinstance(results, list) or len(results) != len(tasks) or not all(
        isinstance(r, tuple) and len(r) == 2 for r in results
    ):
        count = len(results) if isinstance(results, list) else type(results).__name__
        return [(500, f"the handle returned {count} results for a batch of {len(tasks)}")] * len(tasks)
    return results


def _encode(status: int, value, to_json, name: str, answer, signature: Signature) -> tuple[int, object]:
    """A result as the server sends it: JSON for ``/predict`` (``.npy`` for an array when ``answer`` is
    :data:`~easyserve.npy.NPY`), an inference response when ``answer`` is an inference request's."""
    if status == 500:  # the traceback went to this worker's output, which the server keeps
        return status, f"{value} (traceback in worker {name}'s log)"
    if status != 200:
        return status, str(value)
    if answer is NPY:
        npy = to_npy(value)
        if npy is not None:
            return 200, npy
    elif answer is not None:
        task, request = answer
        return encode_response(value, request, task, signature)
    try:
        return 200, to_json(value)
    except (TypeError, ValueError, RecursionError) as exc:
        return 500, f"postprocess returned a value JSON cannot hold: {type(exc).__name__}: {exc}"


def rss_bytes() -> int:
    """This process's resident memory now (Linux); elsewhere its peak, which is what getrusage knows."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE_SIZE
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def _describe(device) -> dict:
    info = {
        "pid": os.getpid(),
        "device": device.kind if device.gpu is None else f"cuda (GPU {device.gpu})",
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "threads": device.threads,
    }
    if "onnxruntime" in sys.modules:  # report the providers only if the handle uses ONNX Runtime
        info["onnx_providers"] = [p if isinstance(p, str) else p[0] for p in device.providers()]
    return info


def die_with_parent(parent: int, sig: int) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies (the lifeline thread needs this
    process to run; this does not). Exits at once if the parent is already gone."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            PR_SET_PDEATHSIG = 1
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(0)


def _exit_with_server(fd: int) -> None:
    while True:
        try:
            if os.read(fd, 1) == b"":
                break
        except InterruptedError:
            continue
        except OSError:
            break
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
