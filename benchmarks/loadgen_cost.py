"""What the load generator itself costs: CPU-ms per request of one client process, against a server
that does nothing (nginx's ``return 200``), side by side with ``wrk`` and with aiohttp's client.

On a machine that the server shares with its load, every CPU-ms the client spends is taken from the
model, so ``easyserve bench``'s client (:mod:`easyserve.loadgen`) should cost about what ``wrk``
costs. Each contender runs in a process of its own at the same concurrency with the same bodies (the
ResNet-18 benchmark's pictures, raw and as base64 JSON); its CPU time comes from the kernel
(``os.wait4``), its requests from itself, and the rounds alternate contenders so that the machine's
drift falls on all alike::

    python benchmarks/resnet18_inputs.py     # once: the pictures
    python benchmarks/loadgen_cost.py        # needs nginx and wrk
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import resnet18_targets as targets  # noqa: E402
from resnet18_inputs import PICTURES, write_inputs  # noqa: E402

from easyserve import loadgen  # noqa: E402
from easyserve.nginx import find_nginx  # noqa: E402
from easyserve.payloads import ImagePayload  # noqa: E402

NGINX = """worker_processes 1;
daemon off;
error_log {dir}/error.log;
pid {dir}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  server {{
    listen 127.0.0.1:{port};
    keepalive_requests 1000000000;
    location / {{ client_max_body_size 16m; client_body_buffer_size 2m; return 200 '{{"label": 281}}'; }}
  }}
}}
"""


def wait_listening(port: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def cpu_of_child(proc: subprocess.Popen) -> float:
    """Wait for ``proc``; the CPU seconds (user and system) it used."""
    _, _, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0
    return usage.ru_utime + usage.ru_stime


def easyserve_client(url: str, body: bytes, headers: dict, concurrency: int, seconds: float) -> tuple[int, float]:
    proc = subprocess.Popen(loadgen.COMMAND, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=targets.checkout_env())
    loadgen.write(proc.stdin, {"url": url, "requests": [(body, headers)], "concurrency": concurrency,
                               "timeout_s": 60.0})
    assert loadgen.read(proc.stdout) == ("ready",)
    loadgen.write(proc.stdin, ("measure", seconds, None))
    while (message := loadgen.read(proc.stdout))[0] != "done":
        pass
    loadgen.write(proc.stdin, ("quit",))
    proc.stdin.close()
    cpu = cpu_of_child(proc)
    proc.stdout.close()
    return sum(message[1]["statuses"].values()), cpu


def aiohttp_client(url: str, body: bytes, headers: dict, concurrency: int, seconds: float) -> tuple[int, float]:
    """aiohttp's client in a process of its own, the way ``easyserve.loadgen`` used it until it had its own:
    one session on uvloop, no cookie jar, bodies as bytes, each answer read whole."""
    with tempfile.NamedTemporaryFile() as f:
        f.write(body)
        f.flush()
        proc = subprocess.Popen([sys.executable, __file__, "--aiohttp-client", url, f.name, headers["Content-Type"],
                                 str(concurrency), str(seconds)], stdout=subprocess.PIPE, text=True)
        out = proc.stdout.read()
        cpu = cpu_of_child(proc)
    return int(out), cpu


def run_aiohttp_client(url: str, path: str, content_type: str, concurrency: int, seconds: float) -> None:
    import aiohttp
    import uvloop

    body = Path(path).read_bytes()

    async def main() -> int:
        done = 0
        end = time.perf_counter() + seconds
        connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0)
        async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                         auto_decompress=False) as session:
            async def user() -> None:
                nonlocal done
                while time.perf_counter() < end:
                    async with session.post(url, data=body, headers={"Content-Type": content_type}) as response:
                        await response.read()
                    done += response.status == 200
            await asyncio.gather(*(user() for _ in range(concurrency)))
        return done

    print(uvloop.run(main()))


def wrk_client(url: str, body: bytes, headers: dict, concurrency: int, seconds: float) -> tuple[int, float]:
    with tempfile.TemporaryDirectory(prefix="easyserve-wrk-") as tmp:
        Path(tmp, "body").write_bytes(body)
        script = Path(tmp, "post.lua")
        script.write_text(f'wrk.method = "POST"\nlocal f = assert(io.open("{tmp}/body", "rb"))\n'
                          f'wrk.body = f:read("*a")\nf:close()\n'
                          f'wrk.headers["Content-Type"] = "{headers["Content-Type"]}"\n')
        proc = subprocess.Popen(["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "-s", str(script), url],
                                stdout=subprocess.PIPE, text=True)
        out = proc.stdout.read()
        cpu = cpu_of_child(proc)
    match = re.search(r"(\d+) requests in", out)
    if not match or "Non-2xx" in out:
        raise RuntimeError(f"wrk: {out}")
    return int(match.group(1)), cpu


CLIENTS = {"easyserve.bench": easyserve_client, "aiohttp client": aiohttp_client, "wrk": wrk_client}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--aiohttp-client", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.aiohttp_client:
        url, path, content_type, concurrency, seconds = args.aiohttp_client
        return run_aiohttp_client(url, path, content_type, int(concurrency), float(seconds))
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed: apt-get install wrk")
    write_inputs()
    port = targets.free_port()
    url = f"http://127.0.0.1:{port}/predict"
    with tempfile.TemporaryDirectory(prefix="easyserve-nginx-") as tmp:
        Path(tmp, "nginx.conf").write_text(NGINX.format(dir=tmp, port=port))
        Path(tmp, "body").mkdir()
        nginx = find_nginx()
        if nginx is None:
            raise SystemExit("nginx is needed: apt-get install nginx")
        server = subprocess.Popen([nginx, "-c", f"{tmp}/nginx.conf", "-p", tmp], stderr=subprocess.DEVNULL)
        try:
            wait_listening(port)
            rows = []
            for name, picture in PICTURES.items():
                for form in ("raw", "base64"):
                    [body] = ImagePayload(picture, raw=form == "raw").bodies()
                    per_request: dict[str, list[float]] = {client: [] for client in CLIENTS}
                    rates: dict[str, list[float]] = {client: [] for client in CLIENTS}
                    for _ in range(args.rounds):
                        for client, run in CLIENTS.items():
                            answered, cpu = run(url, body.data, body.headers, args.concurrency, args.seconds)
                            per_request[client].append(1000 * cpu / answered)
                            rates[client].append(answered / args.seconds)
                    rows.append((name, form, len(body.data), {c: statistics.median(v) for c, v in per_request.items()},
                                 {c: statistics.median(v) for c, v in rates.items()}))
                    print(f"  {name} {form}: " + ", ".join(f"{c} {statistics.median(v):.3f}"
                                                            for c, v in per_request.items()), file=sys.stderr)
        finally:
            server.terminate()
            server.wait()
    print(f"{os.cpu_count()} cores; one client process each at concurrency {args.concurrency} against nginx's "
          f"`return 200`; medians of {args.rounds} rounds of {args.seconds:g} s\n")
    names = list(CLIENTS)
    print("| picture | form | body | " + " | ".join(f"{c} CPU-ms/request" for c in names) + " | "
          + " | ".join(f"{c} req/s" for c in names) + " |")
    print("|---|---|---:|" + "---:|" * (2 * len(names)))
    for name, form, size, cost, rate in rows:
        print(f"| {name} | {form} | {size / 1000:.0f} kB | " + " | ".join(f"{cost[c]:.3f}" for c in names) + " | "
              + " | ".join(f"{rate[c]:.0f}" for c in names) + " |")


if __name__ == "__main__":
    main()
