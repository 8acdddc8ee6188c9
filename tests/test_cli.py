"""`easyserve run` as a user starts it: a real process, real signals."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import _alive, post_json, request, wait_busy, wait_until

TESTS = Path(__file__).parent
ROOT = TESTS.parent


def easyserve(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.Popen(["easyserve", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, **kw)


def wait_for_url(proc: subprocess.Popen, lines: list[str]) -> str:
    for line in proc.stdout:
        lines.append(line)
        found = re.search(r"listening on (http://\S+)", line)
        if found:
            return found.group(1)
    raise AssertionError("server exited before listening:\n" + "".join(lines))


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "recorder.yaml"
    path.write_text('GPUs: cpu\nProcessPerGPU: 1\nHandle: "handles_for_tests:Recorder"\nPort: 9876\nMaxBatchSize: 8\n')
    return path


def test_version_short_help_and_python_m_easyserve(config):
    from easyserve import __version__

    out = subprocess.run(["easyserve", "--version"], capture_output=True, text=True, check=True).stdout
    assert out.startswith(f"easyserve {__version__} (Python ")
    short = subprocess.run(["easyserve", "run", "-h"], capture_output=True, text=True, check=True).stdout
    assert short == subprocess.run(["easyserve", "run", "--help"], capture_output=True, text=True, check=True).stdout
    # where the script is not on PATH (a venv not activated): the same command, serving
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    with subprocess.Popen([sys.executable, "-m", "easyserve", "run", str(config), "--port", "0"], env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        lines: list[str] = []
        url = wait_for_url(proc, lines)
        assert request(url + "/ready")[0] == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0


def test_help_reads_well():
    out = subprocess.run(["easyserve", "--help"], capture_output=True, text=True, check=True).stdout
    assert "run" in out and "Serve" in out
    out = subprocess.run(["easyserve", "run", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--host", "--port", "--gpus", "--process-per-gpu", "--max-batch-size", "--max-wait-ms"):
        assert flag in out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_with_flag_overrides_then_stop_cleanly(config, sig):
    lines: list[str] = []
    with easyserve("run", str(config), "--port", "0", "--process-per-gpu", "2", "--max-wait-ms", "0",
                   "--model-name=recorder-7") as proc:
        try:
            url = wait_for_url(proc, lines)
            status, _, ready = request(url + "/ready")
            assert status == 200 and len(ready["workers"]) == 2  # the flag won over ProcessPerGPU: 1
            assert request(url + "/v2/models/recorder-7/ready")[0] == 200  # as KServe names it: {{.Name}}
            pids = [w["pid"] for w in ready["workers"]]
            assert post_json(url + "/predict", {"value": 3})[1]["value"] == 3
            proc.send_signal(sig)
            rest = proc.communicate(timeout=30)[0]
        finally:
            proc.kill()
    log = "".join(lines) + rest
    assert proc.returncode == 0, log
    assert log.count(" ready: pid ") == 2 and "cpu" in log
    # the last line says the process is done (after "draining", a user could not tell when it ended)
    assert re.search(r"easyserve stopped after \d+ s: 1 request\(s\) answered \(1 200\)\n$", log), log
    assert not any(_alive(p) for p in pids)


def test_the_last_line_counts_the_client_faults_no_answer_shows():
    """It said the malformed requests alone: the connections a slow loris held till HeaderTimeoutS, the
    answers cut for slow readers and the clients that left were in no line of a log read alone."""
    from easyserve.server import stopped_line

    final = {"uptime_s": 61.4, "statuses": {"200": 5, "400": 2}, "malformed": 3, "heads_timed_out": 5,
             "slow_readers_reset": 0, "client_gone": 2}
    assert stopped_line(final) == (
        "easyserve stopped after 61 s: 7 request(s) answered (5 200, 2 400); 3 malformed, refused by the HTTP "
        "parser; 5 connection(s) closed, their request's head not in within HeaderTimeoutS; 2 request(s) whose "
        "client left before the answer")
    assert stopped_line({"uptime_s": 0.2, "statuses": {}, "malformed": 0, "heads_timed_out": 0,
                         "slow_readers_reset": 1, "client_gone": 0}) == (
        "easyserve stopped after 0 s: 0 request(s) answered; 1 answer(s) cut, their slow readers reset past "
        "MaxBufferedMB")


@pytest.mark.parametrize("supervise", [(), ("--supervise",)], ids=["alone", "supervised"])
def test_as_a_containers_first_process_it_says_to_start_under_an_init(supervise):
    """Run as process 1 (a container's command without an init), the orphans a handle's tools leave are its
    children, which nothing collects: one zombie a request, against the container's process limit, unsaid."""
    import shutil

    if shutil.which("unshare") is None or subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                                                         capture_output=True).returncode != 0:
        pytest.skip("no PID namespace to run in here (unshare, as root)")
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "easyserve", "run",
                             "--port", "0", *supervise], stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if "listening on" in line:
                break
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        os.kill(int(children[0]), signal.SIGTERM)  # process 1 inside: the server, or its guardian
        lines += proc.stderr.read().splitlines(keepends=True)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    said = [line for line in lines if "runs as process 1" in line]
    assert len(said) == 1 and "WARNING" in said[0] and "docker run --init" in said[0], lines


def test_signals_that_come_while_it_exits_after_a_drain_do_not_end_it_by_their_default(config):
    """serve_forever() put the default handlers back once it had stopped, and a SIGHUP in the moment
    before the process exited (0.12-0.26 s after SIGTERM on an idle server) killed it: exit 129, a
    failed stop to systemd, after a clean drain. SIGHUPs go on arriving until it has exited."""
    lines: list[str] = []
    with easyserve("run", str(config), "--port", "0") as proc:
        try:
            url = wait_for_url(proc, lines)
            assert post_json(url + "/predict", {"value": 1})[0] == 200
            reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
            reader.start()
            proc.send_signal(signal.SIGTERM)
            while proc.poll() is None:
                proc.send_signal(signal.SIGHUP)
                try:
                    proc.wait(0.005)
                except subprocess.TimeoutExpired:
                    pass
            reader.join(10)
        finally:
            proc.kill()
    assert proc.returncode == 0, "".join(lines)


def test_sigterm_drains_requests_in_flight(tmp_path):
    lines: list[str] = []
    with easyserve("run", "--handle", "handles_for_tests:Misbehaving", "--gpus", "cpu", "--port", "0") as proc:
        try:
            url = wait_for_url(proc, lines)
            answer = {}
            slow = threading.Thread(target=lambda: answer.update(r=post_json(url + "/predict", {"sleep": 1.0})))
            slow.start()
            wait_busy(url)  # the request has reached the worker: SIGTERM must let it finish
            proc.send_signal(signal.SIGTERM)
            slow.join(10)
            proc.communicate(timeout=30)
        finally:
            proc.kill()
    assert answer["r"] == (200, {"ok": True, "echo": {"sleep": 1.0}})
    assert proc.returncode == 0


def test_bad_config_exits_2_naming_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("ProcessPerGPU: 0\n")
    out = subprocess.run(["easyserve", "run", str(path)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "ProcessPerGPU: got 0; expected an integer from 1 to 64" in out.stderr


@pytest.mark.parametrize("level", ["notset", "fatal", "basic_format", "loud"])
def test_a_log_level_other_than_the_five_named_exits_2(level):
    """logging's other names (NOTSET, FATAL) went through, undocumented; BASIC_FORMAT is no level."""
    out = subprocess.run(["easyserve", "run", "--log-level", level], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert f"--log-level: got {level!r}; expected debug, info, warning, error or critical" in out.stderr


def test_handle_that_cannot_start_exits_1_with_its_traceback(config):
    with easyserve("run", str(config), "--handle", "handles_for_tests:BrokenSetup", "--port", "0") as proc:
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 1
    assert "could not start" in out and "FileNotFoundError" in out and "Traceback" in out


@pytest.mark.parametrize("handle,message", [
    ("handles_for_tests:Recordr", "config error: Handle: handles_for_tests has no 'Recordr' (did you mean "
                                  "'Recorder'?); its handles: Args, "),
    ("handles_for_tests:spin", "config error: Handle: <function spin"),
    # it started, and answered every request 500
    ("handles_for_tests:NoForward", "config error: Handle: NoForward defines no forward(self, batch) (nor "
                                    "run_batch): it would answer no request"),
    # each request's 400, as if every client had erred, and nothing in the log
    ("handles_for_tests:SelfLess", "config error: Handle: SelfLess.preprocess(task) cannot be called as easyserve "
                                   "calls it, with (task): define it as def preprocess(self, task)"),
    # forward got coroutines; an async setup set nothing up, and the server reported ready
    ("handles_for_tests:AsyncPreprocess", "config error: Handle: AsyncPreprocess.preprocess is async def: easyserve "
                                          "calls it in a worker's thread and would never run its coroutine"),
    ("handles_for_tests:AsyncSetup", "config error: Handle: AsyncSetup.setup is async def"),
])
def test_a_handle_the_module_lacks_is_a_config_error_and_is_not_restarted(config, handle, message):
    """A misspelt class (its file found) was a failure to start: exit 1, a hint about HandleArgs, and
    under --supervise a server restarted for ever."""
    with easyserve("run", str(config), "--handle", handle, "--port", "0") as proc:
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 2 and message in out, out
    with easyserve("run", str(config), "--handle", handle, "--port", "0", "--supervise") as proc:
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 2 and "not restarting it" in out and out.count(message) == 1, out


@pytest.mark.parametrize("handle,args,message", [
    ("no_such_module:Cls", {}, "config error: Handle: no module 'no_such_module' to import 'Cls' from: not "
                               "installed, nor beside the config"),
    ("no_such_package.inner:Cls", {}, "config error: Handle: no module 'no_such_package' to import 'Cls' from"),
    # no module at all, or a relative one: every worker failed with a traceback blaming the handle's code
    (":Cls", {}, "config error: Handle: ':Cls': '' is not a module name"),
    (".mod:Cls", {}, "config error: Handle: '.mod:Cls': '.mod' is not a module name"),
    # an example handle's own check of a value, as a misspelt key is: it exited 1, with a traceback
    (f"{ROOT / 'handles' / 'imagenet_resnet18.py'}:ImagenetResnet18Handle", {"top_k": 0},
     "config error: HandleArgs top_k: got 0; expected an integer from 1 to 1000"),
    (f"{ROOT / 'handles' / 'coco_yolov3.py'}:CocoYolov3Handle", {"jpeg_draft": "yes"},
     "config error: HandleArgs jpeg_draft: got 'yes'; expected true or false"),
    ("handles_for_tests:Greeting", {"greting": "hi"},
     "config error: HandleArgs: Greeting takes no 'greting' (did you mean 'greeting'?); it takes greeting, times"),
    ("handles_for_tests:Greeting", {"times": 2},
     "config error: HandleArgs: Greeting needs 'greeting', which HandleArgs does not give"),
])
def test_a_module_not_there_or_handle_args_its_init_does_not_take_are_config_errors(tmp_path, handle, args, message):
    """Both failed every worker's start with a traceback (exit 1), and --supervise started it again."""
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({"GPUs": "cpu", "Handle": handle, "HandleArgs": args, "Port": 0}))
    with easyserve("run", str(path), "--supervise") as proc:
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 2 and "not restarting it" in out and out.count(message) == 1, out
    assert "Traceback" not in out


@pytest.mark.parametrize("handle,args,error", [
    ("handles_broken_import:Lacks", {}, "ModuleNotFoundError: No module named 'easyserve_no_such_dependency'"),
    ("handles_for_tests:Greeting", {"greeting": 5}, "AttributeError: 'int' object has no attribute 'upper'"),
])
def test_a_module_that_fails_to_import_or_an_init_that_fails_is_the_handles_error_with_its_traceback(
        tmp_path, handle, args, error):
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({"GPUs": "cpu", "Handle": handle, "HandleArgs": args, "Port": 0}))
    with easyserve("run", str(path)) as proc:
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 1 and "could not start" in out and "Traceback" in out and error in out, out


HANDLE_FILE = """
import os
import sys

import easyserve
from easyserve import Handle, Server


class Paths(Handle):
    def forward(self, batch):  # easyserve's own folder on a worker's path puts its http.py in place of the stdlib's
        package = os.path.dirname(easyserve.__file__)
        return [{"package_on_path": package in sys.path} for _ in batch]
"""


def test_a_handle_file_that_starts_a_server_as_it_is_imported_fails_saying_so(tmp_path):
    """A file that defines a handle and starts a server with no `if __name__ == "__main__":`: each worker's
    import of it started a server of its own, whose workers failed with "No module named 'http.cookies'",
    as `python -m easyserve`'s __main__ had put easyserve's own folder (its http.py) on their path."""
    (tmp_path / "handles").mkdir()
    (tmp_path / "handles" / "paths.py").write_text(HANDLE_FILE)
    (tmp_path / "handles" / "starts.py").write_text(HANDLE_FILE + 'Server(handle=Paths, GPUs="cpu", Port=0).start()\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    for name in ("paths", "starts"):
        (tmp_path / f"{name}.yaml").write_text(f"GPUs: cpu\nHandle: handles/{name}.py:Paths\nPort: 0\n")
    with subprocess.Popen([sys.executable, "-m", "easyserve", "run", str(tmp_path / "paths.yaml")], env=env,
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        try:
            url = wait_for_url(proc, [])
            assert post_json(url + "/predict", {}) == (200, {"package_on_path": False})
        finally:
            proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    with subprocess.Popen([sys.executable, "-m", "easyserve", "run", str(tmp_path / "starts.yaml")], env=env,
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1 and "http.cookies" not in out, out
    assert ("StartupError: Server.start() called in a worker process, as the handle's module was imported: a file "
            "that defines a handle and starts a server must start it under `if __name__ == \"__main__\":`") in out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_it_looks_for_gpus_stops_it(config, fake_gpus, tmp_path, sig):
    """Before the workers start, the server asks nvidia-smi for GPUs (a wedged driver makes it hang
    up to its 20 s timeout): a signal then was taken as "drain", which the start that followed
    forgot, and the server served on as if none had come."""
    asked = tmp_path / "nvidia-smi-asked"
    fake_gpus.install(f"#!/bin/sh\ntouch {asked}\nexec sleep 60\n")
    with easyserve("run", str(config), "--port", "0", "--gpus", "0") as proc:  # a CPU config asks it nothing
        try:
            wait_until(asked.exists, timeout=30, what="the server to ask nvidia-smi for GPUs")
            proc.send_signal(sig)
            out = proc.communicate(timeout=15)[0]
        finally:
            proc.kill()
    # asked to stop, it did: no failure (systemctl stop during a long model load marked the unit failed)
    assert proc.returncode == (0 if sig == signal.SIGTERM else 130), out
    assert f"INFO easyserve: stopped before the server was ready ({sig.name} while the server was starting)" in out
    assert "listening on" not in out and "could not start" not in out


def test_default_run_serves_the_demo_model_offline():
    lines: list[str] = []
    with easyserve("run", "--port", "0") as proc:
        try:
            url = wait_for_url(proc, lines)
            status, body = post_json(url + "/predict", {"x": [5.1, 3.5, 1.4, 0.2]})
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=30)
        finally:
            proc.kill()
    assert status == 200 and body["label"] == "setosa"


def test_gen_nginx_says_in_one_line_what_it_cannot_read_or_write(tmp_path):
    """Each was a traceback: FileNotFoundError, IsADirectoryError, UnicodeDecodeError. A file saved as
    UTF-16 (Windows Notepad) is read."""
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("127.0.0.1:9876\n")
    (tmp_path / "utf16.txt").write_text("127.0.0.1:9876\n", encoding="utf-16")  # as Windows Notepad saves
    (tmp_path / "latin1.txt").write_bytes("h\u00f4te:9876\n".encode("latin-1"))
    (tmp_path / "a folder").mkdir()

    def gen_nginx(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["easyserve", "gen-nginx", *args], capture_output=True, text=True, timeout=60)

    no_folder = gen_nginx(str(hosts), "-o", str(tmp_path / "missing" / "x.conf"))
    a_folder = gen_nginx(str(hosts), "-o", str(tmp_path / "a folder"))
    utf16 = gen_nginx(str(tmp_path / "utf16.txt"))
    latin1 = gen_nginx(str(tmp_path / "latin1.txt"))
    assert (no_folder.returncode, no_folder.stderr) == (
        1, f"gen-nginx: cannot write {tmp_path / 'missing' / 'x.conf'}: No such file or directory\n")
    assert (a_folder.returncode, a_folder.stderr) == (
        1, f"gen-nginx: cannot write {tmp_path / 'a folder'}: Is a directory\n")
    assert utf16.returncode == 0 and "server 127.0.0.1:9876 " in utf16.stdout, utf16.stderr
    assert (latin1.returncode, latin1.stderr) == (
        2, f"{tmp_path / 'latin1.txt'}: not UTF-8 or UTF-16 text (byte 0xf4 at offset 1); save it as UTF-8\n")


def test_gen_nginx_with_a_config_on_port_0_wants_each_servers_port(tmp_path):
    """It wrote `server hostA:0`, exit 0, and nginx -t refused it: invalid port in upstream."""
    (tmp_path / "hosts.txt").write_text("hostA\nhostB:9001\n")
    (tmp_path / "p0.yaml").write_text("Port: 0\n")
    command = ["easyserve", "gen-nginx", str(tmp_path / "hosts.txt"), "--config", str(tmp_path / "p0.yaml")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == "", done.stdout
    assert "line 1: no port, and the config's Port is 0 (a free port at each start)" in done.stderr, done.stderr
    (tmp_path / "hosts.txt").write_text("hostA:9000\nhostB:9001\n")
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "server hostA:9000 " in done.stdout, done.stderr


def test_each_commands_line_in_the_help_is_one_sentence_unbroken():
    # a docstring's first paragraph is the command's line in `easyserve --help`, its line breaks kept:
    # "SIGHUP re-reads" ended one line and "CONFIG and replaces..." began the next
    from easyserve.cli import app
    from easyserve.models import models_app

    for group in (app, models_app):
        for command in group.registered_commands:
            line = command.short_help or (command.callback.__doc__ or "").strip().split("\n\n")[0]
            assert line and "\n" not in line, (command.name, line)


@pytest.mark.parametrize("command,flags", [("run", ["--supervise"]), ("bench", ["--raw", "--sweep", "--progress"])])
def test_help_shows_a_flag_that_takes_no_value_without_one(command, flags):
    """Help listed `--supervise <bool>`, read as a flag that takes a value: `--supervise true` then took
    "true" for the config file."""
    done = subprocess.run(["easyserve", command, "-h"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "160"})
    assert done.returncode == 0, done.stdout + done.stderr
    for flag in flags:
        line = next(line for line in done.stdout.splitlines() if f" {flag} " in line or f" {flag}/" in line)
        assert "<bool>" not in line, line
    assert "<int" in done.stdout or "<str>" in done.stdout  # the options that take one still say which
