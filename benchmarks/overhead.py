"""Server overhead: a handle that does no work, served by easyserve, against a bare aiohttp app.

Both are driven by the same load generator (hey, or wrk) in one run, at concurrency 1 and 32::

    python benchmarks/overhead.py                 # prints a markdown table
    python benchmarks/overhead.py --requests 40000 --tool wrk
    python benchmarks/overhead.py --litserve-python /path/to/venv/bin/python   # add LitServe, side by side

Needs `hey` (Debian: apt-get install hey) or `wrk`. On Linux it also reports the CPU time each request
cost the server's process and its workers (from /proc): steadier than requests/s where the load
generator, the server and its workers share a few cores.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
BODY = '{"x": 1}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except urllib.error.HTTPError:  # it answers: up
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def hey(url: str, concurrency: int, requests: int, body_file: Path | None = None,
        headers: dict[str, str] | None = None) -> dict:
    """POST ``BODY`` (or the file ``body_file``) ``requests`` times, ``concurrency`` at a time. A
    ``Content-Type`` in ``headers`` replaces JSON's."""
    headers = dict(headers or {})
    command = ["hey", "-n", str(requests), "-c", str(concurrency), "-m", "POST",
               "-T", headers.pop("Content-Type", "application/json")]
    command += ["-D", str(body_file)] if body_file is not None else ["-d", BODY]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    out = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout
    codes = dict(re.findall(r"\[(\d{3})\]\s+(\d+) responses", out))
    return {
        "requests": sum(int(n) for n in codes.values()),
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": float(re.search(r"50% in ([\d.]+) secs", out).group(1)) * 1000,
        "p99_ms": float(re.search(r"99% in ([\d.]+) secs", out).group(1)) * 1000,
        "non_200": sum(int(n) for c, n in codes.items() if c != "200"),
        "statuses": codes,
        "errors": re.findall(r"\[(\d+)\]\s+(.+)", out.partition("Error distribution:")[2]),
    }


def wrk(url: str, concurrency: int, requests: int) -> dict:
    script = HERE / "out" / "post.lua"
    script.parent.mkdir(exist_ok=True)
    script.write_text(f"wrk.method = 'POST'\nwrk.body = '{BODY}'\nwrk.headers['Content-Type'] = 'application/json'\n")
    seconds = max(3, requests // 5000)
    out = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout

    def ms(label: str) -> float:
        value, unit = re.search(rf"{label}\s+([\d.]+)(us|ms|s)", out).groups()
        return float(value) * {"us": 0.001, "ms": 1, "s": 1000}[unit]

    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"requests": int(re.search(r"(\d+) requests in", out).group(1)),
            "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50_ms": ms("50%"),
            "p99_ms": ms("99%"), "non_200": int(non_2xx.group(1)) if non_2xx else 0}


def cpu_seconds(pid: int) -> tuple[float, float] | None:
    """CPU seconds (user + system) of process ``pid`` and of its children now alive (its workers), or
    ``None`` where /proc cannot tell (not Linux)."""
    def of(p: int) -> float:
        fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    try:
        children = [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
                    for c in (task / "children").read_text().split()]
        return of(pid), sum(of(c) for c in children)
    except (OSError, ValueError):
        return None


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM a server started in its own session, then SIGKILL whatever of its group is left."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000, help="requests per measurement")
    parser.add_argument("--tool", choices=["hey", "wrk"], default="hey")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="easyserve worker counts to try")
    parser.add_argument("--litserve-python", help="a python with litserve installed, to add LitServe to the run")
    args = parser.parse_args()
    if not shutil.which(args.tool):
        sys.exit(f"{args.tool} is not installed (Debian: apt-get install {args.tool})")
    load = hey if args.tool == "hey" else wrk

    targets = []
    port = free_port()
    targets.append(("plain aiohttp (parse JSON, answer)", port,
                    [sys.executable, str(HERE / "plain_aiohttp.py"), "--port", str(port)]))
    for n in args.workers:
        port = free_port()
        targets.append((f"easyserve, no-op handle, {n} worker(s)", port,
                        ["easyserve", "run", "--handle", "easyserve.builtin:Echo", "--gpus", "cpu",
                         "--process-per-gpu", str(n), "--port", str(port), "--log-level", "warning"]))

    if args.litserve_python:
        port = free_port()
        targets.append(("LitServe, no-op LitAPI, 1 worker", port,
                        [args.litserve_python, str(HERE / "peer_litserve.py"), "--port", str(port)]))

    rows = []
    for name, port, command in targets:
        # its own process group: a server that starts processes of its own is stopped whole
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}/predict"
            wait_ready(url.replace("/predict", "/ready" if "easyserve" in name else "/health" if "LitServe" in name
                                   else "/"))
            load(url, 8, 2000)  # warm up
            for concurrency in (1, 32):
                requests = args.requests // 4 if concurrency == 1 else args.requests
                before = cpu_seconds(proc.pid)
                result = load(url, concurrency, requests)
                after = cpu_seconds(proc.pid)
                if before and after and result["requests"]:
                    result["cpu_us"] = [(b - a) / result["requests"] * 1e6 for a, b in zip(before, after)]
                rows.append((name, concurrency, result))
        finally:
            stop_group(proc)

    print(f"| server | concurrency | requests/s | p50 ms | p99 ms | non-200 | CPU us a request: server, workers |"
          f"  ({args.tool}, {os.cpu_count()} cores)")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, concurrency, r in rows:
        server_us, workers_us = r.get("cpu_us", (None, None))
        cpu = "" if server_us is None else f"{server_us:.0f}" + (f", {workers_us:.0f}" if workers_us else "")
        print(f"| {name} | {concurrency} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['non_200']} "
              f"| {cpu} |")


if __name__ == "__main__":
    main()
