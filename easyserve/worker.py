"""The worker process: loads one handle on one device and runs the batches the server sends it.

Started by :mod:`easyserve.pool` as ``python -m easyserve.worker SOCK_FD LIFELINE_FD`` with
``CUDA_VISIBLE_DEVICES`` already in its environment, so no CUDA library can see another GPU.
It exits by itself when the server goes away: the server holds the write end of the lifeline pipe,
which the kernel closes when the server dies, however it dies.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback

from . import wire


def main(sock_fd: int, lifeline_fd: int) -> int:
    # Ctrl-C in a terminal reaches the whole process group; the server decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_server, args=(lifeline_fd,), daemon=True, name="lifeline").start()
    sock = socket.socket(fileno=sock_fd)
    init = wire.recv(sock)
    # the handle's own logging (and ours) reads like the server's, marked with the worker's name
    name = init["device"]["name"]
    logging.basicConfig(level=init["log_level"], format=f"%(asctime)s %(levelname)s worker {name}: %(message)s")
    for path in reversed(init["sys_path"]):
        if path not in sys.path:
            sys.path.insert(0, path)
    try:
        from .handle import Device, to_json
        from .loader import build

        device = Device(**init["device"])
        handle = build(init["handle"], dict(init["handle_args"]))
        handle.setup(device)
    except BaseException:
        wire.send(sock, ("failed", traceback.format_exc()))
        return 3
    wire.send(sock, ("ready", _describe(device)))
    while True:
        try:
            message = wire.recv(sock)
        except EOFError:
            return 0
        if message[0] == "stop":
            return 0
        _, batch_id, tasks = message
        started = time.perf_counter()
        results = handle.run_batch([{"task_id": task_id, "task_info": info} for task_id, info in tasks])
        forward_s = time.perf_counter() - started
        wire.send(sock, ("done", batch_id, [_encode(status, value, to_json) for status, value in results], forward_s))


def _encode(status: int, value, to_json) -> tuple[int, bytes | str]:
    if status != 200:
        return status, value
    try:
        return 200, to_json(value)
    except (TypeError, ValueError) as exc:
        return 500, f"postprocess returned a value JSON cannot hold: {exc}"


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
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2])))
