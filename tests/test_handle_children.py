"""The processes a handle starts end with its worker: stopped, replaced, killed as stuck, or orphaned."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import Background, _alive, post_json, wait_busy, wait_until

TESTS = Path(__file__).resolve().parent


def helpers(pidfile: Path, count: int = 1) -> list[int]:
    """The pids of the helpers the handle's setups started so far, once there are ``count`` of them."""

    def read() -> list[int] | None:
        pids = [int(line) for line in pidfile.read_text().split()] if pidfile.exists() else []
        return pids if len(pids) >= count else None

    return wait_until(read, 30, f"{count} helper(s) started")


@contextlib.contextmanager
def killed_after(pidfile: Path):
    """Whatever the test finds, no helper outlives it."""
    try:
        yield
    finally:
        for pid in [int(line) for line in pidfile.read_text().split()] if pidfile.exists() else []:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def test_a_helper_started_in_setup_ends_with_stop(serve, tmp_path):
    pidfile = tmp_path / "helpers"
    with killed_after(pidfile):
        with serve("handles_robust:StartsAHelper", HandleArgs={"pidfile": str(pidfile)}) as server:
            assert post_json(server.url + "/predict", {"x": 1}) == (200, {"x": 1})
            [helper] = helpers(pidfile)
            assert _alive(helper)
        wait_until(lambda: not _alive(helper), 10, "the helper to end with the server's stop()")


def test_a_helper_ends_with_its_worker_killed_as_stuck(serve, tmp_path):
    # the server kills a stuck worker (SIGKILL): it reads the worker's descendants first, and ends them
    pidfile = tmp_path / "helpers"
    with killed_after(pidfile):
        with serve("handles_robust:StartsAHelper", HandleArgs={"pidfile": str(pidfile)}, TimeoutS=1,
                   MaxBatchSize=1) as server:
            [first] = helpers(pidfile)
            stuck = server.workers[0]["pid"]
            assert post_json(server.url + "/predict", {"sleep": 60})[0] == 504
            wait_until(lambda: not _alive(stuck), 10, "the stuck worker to be killed")
            wait_until(lambda: not _alive(first), 10, "the stuck worker's helper to end")
            wait_until(lambda: server.workers[0]["state"] == "idle", 30, "a replacement")
            assert post_json(server.url + "/predict", {"x": 2}) == (200, {"x": 2})
            assert _alive(helpers(pidfile)[-1])  # the replacement's own helper runs


def test_a_helper_ends_with_its_worker_recycled(serve, tmp_path):
    pidfile = tmp_path / "helpers"
    with killed_after(pidfile):
        with serve("handles_robust:StartsAHelper", HandleArgs={"pidfile": str(pidfile)},
                   MaxBatchesPerWorker=1) as server:
            [first] = helpers(pidfile)
            assert post_json(server.url + "/predict", {"x": 1}) == (200, {"x": 1})
            second = helpers(pidfile, 2)[1]  # the successor's setup ran
            wait_until(lambda: not _alive(first), 10, "the recycled worker's helper to end")
            assert _alive(second)
            assert server.stats()["restarts"] == 0


def test_a_helper_ends_with_its_worker_dead_by_itself(serve, tmp_path):
    """A worker that dies by itself (a segfault, the OOM killer, ``os._exit``) ends nothing on its way
    out: its helper, then below PID 1, ran on for good, and one more with each crash (the retry's)."""
    pidfile = tmp_path / "helpers"
    with killed_after(pidfile):
        with serve("handles_robust:StartsAHelper", HandleArgs={"pidfile": str(pidfile)}, MaxBatchSize=1) as server:
            [first] = helpers(pidfile)
            status, answer = post_json(server.url + "/predict", {"die": True})  # its retry's worker dies too
            assert status == 500 and "exited with code 7" in answer["error"], answer
            second = helpers(pidfile, 2)[1]
            wait_until(lambda: not _alive(first) and not _alive(second), 10, "the dead workers' helpers to end")
            wait_until(lambda: server.workers[0]["state"] == "idle", 30, "a replacement")
            assert post_json(server.url + "/predict", {"x": 2}) == (200, {"x": 2})
            assert _alive(helpers(pidfile)[-1])  # the replacement's own helper runs


def test_a_helper_a_shell_put_in_the_background_ends_with_stop(serve, tmp_path):
    """``os.system("sidecar &")``: the shell has exited, and the helper's parent is PID 1, where the
    worker's walk of its own children on its way out did not find it. It is in the worker's process
    group still."""
    pidfile = tmp_path / "helpers"
    with killed_after(pidfile):
        with serve("handles_robust:StartsAHelper", HandleArgs={"pidfile": str(pidfile), "background": True}):
            [helper] = helpers(pidfile)
            assert _alive(helper)
        wait_until(lambda: not _alive(helper), 10, "the helper to end with the server's stop()")


def test_a_helper_ends_with_its_worker_when_the_server_is_killed(tmp_path):
    # a notebook's kernel SIGKILLed: its workers exit as their parent died, and end their helpers first
    pidfile = tmp_path / "helpers"
    script = textwrap.dedent(f"""
        import time
        from easyserve import Server
        Server(handle="handles_robust:StartsAHelper", HandleArgs={{"pidfile": {str(pidfile)!r}}},
               GPUs="cpu", Port=0).start(timeout=60)
        print("ready", flush=True)
        time.sleep(600)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, start_new_session=True)
    with killed_after(pidfile):
        try:
            assert server.stdout.readline() == b"ready\n"
            [helper] = helpers(pidfile)
            assert _alive(helper)
            server.kill()  # that process alone, not its group
            server.wait(10)
            wait_until(lambda: not _alive(helper), 10, "the helper to end once the server was killed")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.stdout.close()


def test_a_worker_wedged_holding_the_gil_ends_with_its_helpers_when_the_server_is_killed(tmp_path):
    # a notebook's kernel killed while its worker is stuck in native code with the GIL held: the worker
    # runs neither its signal handler nor its lifeline thread, and it and its helper outlived the kernel
    # (its session out of reach of the kernel group's SIGKILL); its reaper ends them
    pidfile = tmp_path / "helpers"
    script = textwrap.dedent(f"""
        import time
        from easyserve import Server
        server = Server(handle="handles_robust:WedgesHoldingTheGil", HandleArgs={{"pidfile": {str(pidfile)!r}}},
                        GPUs="cpu", Port=0, TimeoutS=600).start(timeout=60)
        print(server.url, server.workers[0]["pid"], flush=True)
        time.sleep(600)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, start_new_session=True)
    with killed_after(pidfile):
        try:
            url, worker = server.stdout.readline().split()
            worker = int(worker)
            [helper] = helpers(pidfile)
            wedged = Background(lambda: post_json(url.decode() + "/predict", {"wedge": True}, timeout=60))
            wait_busy(url.decode())
            server.kill()  # that process alone, as a kernel killed
            server.wait(10)
            wait_until(lambda: not _alive(worker) and not _alive(helper), 15, "the wedged worker and its helper to end")
            with contextlib.suppress(Exception):
                wedged.result(5)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.stdout.close()


SUBREAPER = """
    import ctypes, os, signal, sys, time, urllib.request
    ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER: orphans come here, as to a container's PID 1
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited by the workers through exec
    from easyserve import Server

    def zombies():  # workers' reapers left to this process (a forkserver's helpers outlive their worker)
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                name, fields = open(f"/proc/{{pid}}/stat").read().rsplit(")", 1)
            except OSError:
                continue
            fields = fields.split()
            found += [pid] if fields[0] == "Z" and int(fields[1]) == os.getpid() and "easyserve-reap" in name else []
        return found
"""

REAPED = SUBREAPER + """
    with Server(handle={handle!r}, HandleArgs={args!r}, GPUs="cpu", Port=0, MaxBatchesPerWorker=1) as server:
        for x in range(4):  # a recycle after each
            request = urllib.request.Request(server.url + "/predict", data=b'{{"x": -3}}',
                                             headers={{"Content-Type": "application/json"}})
            assert urllib.request.urlopen(request, timeout=60).status == 200
    print("zombies", len(zombies()), flush=True)
"""


@pytest.mark.parametrize("handle,args", [
    ("handles_for_tests:Recorder", {}),
    ("handles_robust:UsesAProcessPool", {"context": "fork"}),
    ("handles_robust:UsesAProcessPool", {"context": "forkserver"}),
    ("handles_robust:StuckThreadPool", {}),  # a thread pool's task is not waited for, as no thread is
    ("handles_robust:StartsAProcess", {}),  # multiprocessing's exit joined it, for ever
], ids=["plain", "process pool", "forkserver pool", "stuck thread pool", "process"])
def test_workers_leave_at_once_and_leave_nothing_to_reap(tmp_path, handle, args):
    # each leaving worker left its reaper a zombie for PID 1 to reap (a server that is a container's PID
    # 1 never does), and waited out its 2 s grace where SIGTERM came ignored; a handle's process pool
    # held every worker's exit 5 s, to the kill (multiprocessing's exit waited for its processes)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(REAPED.format(handle=handle, args=args))], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "zombies 0\n", done.stdout + done.stderr
    assert "killing it" not in done.stderr and "did not stop" not in done.stderr, done.stderr


ORPHANED = SUBREAPER + """
    marker = {marker!r}
    with Server(handle="handles_robust:HangingSetup", HandleArgs={{"marker": marker}}, GPUs="cpu", Port=0) as server:
        open(marker, "w").close()  # from now on a worker's setup never returns
        os.kill(server.workers[0]["pid"], signal.SIGKILL)  # as the kernel's out-of-memory killer does
        time.sleep(2)  # its reaper dead with it; its replacement's forked, its setup hanging
        print("killed", len(zombies()), server.workers[0]["state"], flush=True)
    print("stopped", len(zombies()), flush=True)  # the worker that was loading its model, killed at the stop
"""


def test_a_worker_killed_leaves_no_zombie_to_a_server_that_reaps_orphans(tmp_path):
    """A worker's reaper dies with it; a worker killed (by the kernel, or at a stop while it loaded its
    model) could not reap it, and the kernel gave it to the nearest subreaper: a server that is a
    container's PID 1 with no init kept a zombie for each."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(ORPHANED.format(marker=str(tmp_path / "hang")))],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "killed 0 starting\nstopped 0\n", done.stdout + done.stderr


def test_a_child_the_handle_ends_itself_at_exit_is_left_to_end_its_way(serve, tmp_path):
    # its non-daemon children were ended before the handle's own exit functions ran: a writer fed through a
    # queue lost what it had not written yet
    out = tmp_path / "written"
    with serve("handles_robust:EndsItsWriterAtExit", HandleArgs={"out": str(out)}, MaxBatchSize=1) as server:
        for x in range(10):
            assert post_json(server.url + "/predict", {"x": x})[0] == 200
    assert out.read_text().split() == [str(x) for x in range(10)] + ["closed"]


def test_a_handle_found_by_name_can_use_spawned_processes(tmp_path):
    """A handle in handles/ is imported under its file's name, so a spawned process (the start method
    CUDA needs, and a DataLoader's) can import what it is sent: it was ``easyserve_handle_<name>``,
    which no fresh process could import."""
    (tmp_path / "handles").mkdir()
    (tmp_path / "handles" / "spawning.py").write_text(textwrap.dedent("""
        import multiprocessing
        from easyserve import Handle

        def square(n):
            return n * n

        class Spawning(Handle):
            def setup(self, device):
                self.pool = multiprocessing.get_context("spawn").Pool(1)
            def preprocess(self, task):
                return task["task_info"]["n"]
            def forward(self, batch):
                return self.pool.map(square, list(batch))
    """))
    (tmp_path / "serve.yaml").write_text("Handle: Spawning\nGPUs: cpu\nPort: 0\nMaxBatchSize: 1\nTimeoutS: 10\n")
    from easyserve import Server

    with Server.from_yaml(tmp_path / "serve.yaml") as server:
        assert post_json(server.url + "/predict", {"n": 7}, timeout=60) == (200, 49)
