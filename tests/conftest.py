"""Fixtures: a real server on a free port, always stopped, and small HTTP helpers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import pytest

from easyserve import Server


@pytest.fixture
def serve():
    """``with serve(handle, **config) as server:`` starts a server on a free port and stops it after."""

    @contextlib.contextmanager
    def start(handle: Any = "handles_for_tests:Recorder", **config: Any) -> Iterator[Server]:
        config.setdefault("GPUs", "cpu")
        server = Server(handle=handle, Port=0, **config).start(timeout=60)
        try:
            yield server
        finally:
            pids = [w["pid"] for w in server.workers]
            server.stop(drain_timeout=5)
            for pid in pids:
                assert not _alive(pid), f"worker {pid} outlived stop()"

    return start


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie counts as gone: it has exited and only waits to be reaped
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def request(url: str, data: bytes | None = None, headers: dict | None = None, method: str | None = None,
            timeout: float = 30) -> tuple[int, dict, Any]:
    """Send one HTTP request; returns (status, headers, JSON body)."""
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), json.loads(err.read())


def post_json(url: str, obj: Any, **kw: Any) -> tuple[int, Any]:
    status, _, body = request(url, json.dumps(obj).encode(), {"Content-Type": "application/json"}, **kw)
    return status, body


def post_many(url: str, bodies: list[Any], concurrency: int = 32) -> list[tuple[int, Any]]:
    """POST each JSON body, ``concurrency`` at a time, over real connections; results in order."""

    async def run() -> list[tuple[int, Any]]:
        limit = asyncio.Semaphore(concurrency)
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            async def one(body: Any) -> tuple[int, Any]:
                async with limit, session.post(url, json=body) as resp:
                    return resp.status, await resp.json()

            return await asyncio.gather(*(one(b) for b in bodies))

    return asyncio.run(run())


@pytest.fixture
def fake_gpus(tmp_path, monkeypatch):
    """``fake_gpus(n)`` puts an ``nvidia-smi`` on PATH that lists ``n`` GPUs, so the GPU mapping runs
    on a machine without one (the workers' engines then find no CUDA device, which tests don't need)."""

    def install(count: int) -> None:
        folder = tmp_path / "fake-bin"
        folder.mkdir(exist_ok=True)
        script = folder / "nvidia-smi"
        script.write_text("#!/bin/sh\n" + "".join(f"echo {i}\n" for i in range(count)))
        script.chmod(0o755)
        monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    return install


def http(method: str, url: str, **kwargs: Any) -> tuple[int, dict, Any]:
    """One request through aiohttp (forms, chunked bodies, raw headers); returns (status, headers, JSON)."""

    async def run() -> tuple[int, dict, Any]:
        async with aiohttp.ClientSession() as session:
            async with session.request(method, url, **kwargs) as resp:
                return resp.status, dict(resp.headers), await resp.json(content_type=None)

    return asyncio.run(run())


def worker_children(parent: int | None = None) -> list[int]:
    """Live ``easyserve.worker`` processes whose parent is ``parent`` (default: this process)."""
    parent = os.getpid() if parent is None else parent
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == parent and fields[0] != "Z" and b"easyserve.worker" in cmdline:
            found.append(int(entry.name))
    return found
