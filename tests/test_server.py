"""Server end to end: real worker processes, real sockets."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import signal
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from typing import Callable

import numpy as np
import pytest
from conftest import _alive, caught, free_port, post_json, post_many, request, wait_until, worker_children
from handles_for_tests import TinyOnnx

from easyserve import ConfigError, Device, Server, StartupError
from easyserve.config import Config


def test_served_output_equals_direct_output_bit_for_bit(serve):
    rng = np.random.default_rng(1)
    inputs = [rng.standard_normal(8).astype(np.float32).tolist() for _ in range(48)]
    direct = TinyOnnx()
    direct.setup(Device())
    expected = [direct.postprocess(direct.forward(direct.preprocess({"task_info": {"x": x}})[None])[0], {}).tolist()
                for x in inputs]
    with serve("handles_for_tests:TinyOnnx", MaxBatchSize=8, ProcessPerGPU=2) as server:
        one_by_one = [post_json(server.url + "/predict", {"x": x}) for x in inputs[:8]]
        concurrent = post_many(server.url + "/predict", [{"x": x} for x in inputs], concurrency=32)
    assert one_by_one == [(200, e) for e in expected[:8]]
    assert [s for s, _ in concurrent] == [200] * len(inputs)
    # float32 values survive JSON exactly, so equality here is bit for bit
    assert [np.float32(v).tolist() for _, b in concurrent for v in b] == [v for e in expected for v in e]


def test_a_handle_whose_forward_is_set_in_setup_serves(serve):
    # refused at start as a handle without forward, since the check looked at its class alone
    with serve("handles_for_tests:SetsForward") as server:
        assert post_json(server.url + "/predict", {"value": 21}) == (200, 42)


def test_batches_form_under_load_and_never_exceed_max(serve):
    with serve(MaxBatchSize=4, HandleArgs={"delay": 0.02}) as server:
        results = post_many(server.url + "/predict", [{"value": i} for i in range(64)], concurrency=32)
        stats = request(server.url + "/stats")[2]
    assert all(status == 200 for status, _ in results)
    assert [body["value"] for _, body in results] == list(range(64))  # each answer reached its own request
    sizes = {body["batch_size"] for _, body in results}
    assert max(sizes) > 1
    assert max(sizes) <= 4
    assert stats["requests"] == 64
    assert max(int(k) for k in stats["batch_sizes"]) <= 4


def test_light_load_sends_batches_of_one_at_once(serve):
    # Two workers: a request that finds no other worker busy goes at once, though MaxWaitMs is long
    with serve(MaxBatchSize=8, MaxWaitMs=5000, ProcessPerGPU=2) as server:
        answers, took = [], []
        for i in range(5):  # one request at a time
            begun = time.monotonic()
            answers.append(post_json(server.url + "/predict", {"value": i}, timeout=10))
            took.append(time.monotonic() - begun)
        stats = request(server.url + "/stats")[2]
    assert [(s, b["value"], b["batch_size"]) for s, b in answers] == [(200, i, 1) for i in range(5)]
    # "at once": each answer well inside MaxWaitMs (5 s); a lone request held for it would take 5 s
    assert max(took) < 1, f"lone requests took {took}"
    assert stats["queue_wait_s"] < 1 and stats["batch_sizes"] == {"1": 5}, stats


def test_process_per_gpu_gives_distinct_workers_pinned_to_their_gpu(serve, fake_gpus):
    fake_gpus(2)
    with serve(GPUs="0,1", ProcessPerGPU=2, HandleArgs={"delay": 0.01}) as server:
        workers = server.workers
        results = post_many(server.url + "/predict", [{"value": i} for i in range(80)], concurrency=16)
    assert sorted(w["name"] for w in workers) == ["gpu0/0", "gpu0/1", "gpu1/0", "gpu1/1"]
    assert len({w["pid"] for w in workers}) == 4
    pinned = {w["pid"]: w["cuda_visible_devices"] for w in workers}
    assert sorted(pinned.values()) == ["0", "0", "1", "1"]
    for _, body in results:  # each answer was computed in a process that saw only its own GPU
        assert body["cuda_visible_devices"] == pinned[body["pid"]]
        assert body["device"] == "cuda"
        assert body["gpu"] == int(pinned[body["pid"]])
    assert len({body["pid"] for _, body in results}) > 1


def test_workers_share_the_cores_unless_a_thread_count_is_given_then_every_library_takes_it(serve, monkeypatch):
    """An OMP_NUM_THREADS=4 of the user's was kept, but MKL's was set to the workers' share, and torch,
    which takes MKL's, ran on 1 thread."""
    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    for name in names:
        monkeypatch.delenv(name, raising=False)
    with serve("handles_ops:ThreadSettings", ProcessPerGPU=2) as server:
        share = post_json(server.url + "/predict", {})[1]
    assert len(set(share.values())) == 1 and int(share["OMP_NUM_THREADS"]) >= 1, share
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    with serve("handles_ops:ThreadSettings", ProcessPerGPU=2) as server:
        assert post_json(server.url + "/predict", {})[1] == {name: "4" for name in names}
    monkeypatch.setenv("MKL_NUM_THREADS", "2")  # one set by itself stays as it is
    with serve("handles_ops:ThreadSettings", ProcessPerGPU=2) as server:
        assert post_json(server.url + "/predict", {})[1] == {"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "2",
                                                             "OPENBLAS_NUM_THREADS": "4"}


def test_a_thread_count_in_the_environment_that_is_none_is_said_and_each_library_gets_the_share(serve, monkeypatch,
                                                                                                 caplog):
    """OMP_NUM_THREADS=abc (or 0) was copied to MKL's and OpenBLAS's as it was, unsaid."""
    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    for name in names:
        monkeypatch.delenv(name, raising=False)
    with serve("handles_ops:ThreadSettings", ProcessPerGPU=2) as server:
        share = post_json(server.url + "/predict", {})[1]["OMP_NUM_THREADS"]
    for wrong in ("abc", "0"):
        monkeypatch.setenv("OMP_NUM_THREADS", wrong)
        with serve("handles_ops:ThreadSettings", ProcessPerGPU=2) as server:
            assert post_json(server.url + "/predict", {})[1] == {name: share for name in names}
        said = [r.getMessage() for r in caught(caplog) if "no count of threads" in r.getMessage()]
        assert said[-1] == (f"OMP_NUM_THREADS={wrong!r} in the server's environment is no count of threads (a whole "
                            f"number above 0): the workers' libraries are given {share} instead"), said
    monkeypatch.setenv("OMP_NUM_THREADS", "4,2")  # OpenMP's count for each level of nesting: a count
    with serve("handles_ops:ThreadSettings", ProcessPerGPU=1) as server:
        assert post_json(server.url + "/predict", {})[1]["OMP_NUM_THREADS"] == "4,2"


def test_gpu_ids_index_into_a_preset_cuda_visible_devices(serve, fake_gpus, monkeypatch):
    fake_gpus(8)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")  # a scheduler gave this job GPUs 5 and 7
    with serve(GPUs="0,1") as server:
        assert sorted(w["cuda_visible_devices"] for w in server.workers) == ["5", "7"]


def test_missing_gpus_beside_present_ones_are_left_out_with_a_warning(serve, fake_gpus, caplog):
    """A GPU id the machine lacks, listed beside one it has (a typo, a config for a larger machine), ran as
    a CPU worker beside the GPU one: it took its share of the batches at a fraction of their speed."""
    fake_gpus(1)
    with serve(GPUs="0,3", ProcessPerGPU=2) as server:
        workers = {w["name"]: w for w in server.workers}
        status, body = post_json(server.url + "/predict", {"value": 1})
    assert ("asked for GPU 3 but this machine has GPUs 0; serving on GPU 0 alone (a CPU worker beside GPU ones "
            "would take its share of the batches at a fraction of their speed)") in caplog.text
    assert sorted(workers) == ["gpu0/0", "gpu0/1"]
    assert {w["cuda_visible_devices"] for w in workers.values()} == {"0"}
    assert status == 200


def test_missing_gpus_with_none_of_them_here_fall_back_to_cpu(serve, fake_gpus, caplog):
    fake_gpus(1)
    with serve(GPUs="2,3") as server:
        workers = {w["name"]: w for w in server.workers}
        status, body = post_json(server.url + "/predict", {"value": 1})
    assert "asked for GPU 2, 3 but this machine has GPUs 0; those workers run on CPU instead" in caplog.text
    assert sorted(workers) == ["cpu/0", "cpu/1"] and {w["device"] for w in workers.values()} == {"cpu"}
    assert {w["cuda_visible_devices"] for w in workers.values()} == {""}
    assert status == 200


def test_no_gpu_at_all_runs_cpu_workers(serve, caplog, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no nvidia-smi
    with serve(GPUs="0", ProcessPerGPU=2) as server:
        assert [w["device"] for w in server.workers] == ["cpu", "cpu"]
    assert "asked for GPU 0 but this machine has no GPU" in caplog.text


def test_a_config_file_that_names_no_handle_says_it_serves_the_demo_unless_one_is_given_beside_it(tmp_path, caplog):
    # an empty file, or its Handle line commented out, served the iris demo without a word
    path = tmp_path / "mine.yaml"
    path.write_text("# Handle: Classifier\nGPUs: cpu\nPort: 0\n")
    said = f"{path} names no Handle: serving the built-in demo model (an iris classifier)"
    for made, warned in ((lambda: Server.from_yaml(path), True), (lambda: Server(str(path)), True),
                         (lambda: Server.from_yaml(path, Handle="handles_for_tests:Recorder"), False),
                         (lambda: Server(str(path), handle="handles_for_tests:Recorder"), False)):
        caplog.clear()
        with made().start(timeout=60):
            pass
        assert (said in caplog.text) is warned, caplog.text


def test_original_style_handle_runs_unchanged(serve):
    with serve("handles_for_tests:OriginalStyle") as server:
        status, body = post_json(server.url + "/predict", {"n": 21})
    assert status == 200
    assert body["task_info"] == {"n": 21, "doubled": 42, "gpu_seen": 0}
    assert body["state"] == "finish"
    assert isinstance(body["task_id"], str) and body["task_id"]


def test_handle_args_reach_the_handle(serve):
    with serve("handles_for_tests:Args", HandleArgs={"model": "m.onnx", "threshold": 0.25}) as server:
        status, body = post_json(server.url + "/predict", {"any": 1})
    assert (status, body) == (200, {"model": "m.onnx", "threshold": 0.25})
    # any name, that of Handle.__init__'s own first parameter too: it failed every worker's start with a traceback
    with serve("handles_for_tests:Args", HandleArgs={"self": 1}) as server:
        assert post_json(server.url + "/predict", {"any": 1}) == (200, {"self": 1})


def test_handle_named_by_file_path(serve, tmp_path):
    (tmp_path / "mine.py").write_text(textwrap.dedent("""
        from easyserve import Handle
        class Doubler(Handle):
            def preprocess(self, task):
                return task["task_info"]["n"]
            def forward(self, batch):
                return batch * 2
    """))
    with serve(f"{tmp_path / 'mine.py'}:Doubler") as server:
        assert post_json(server.url + "/predict", {"n": 4}) == (200, 8)


def test_handle_found_by_class_name_in_handles_folder(tmp_path):
    (tmp_path / "handles").mkdir()
    (tmp_path / "configs").mkdir()
    (tmp_path / "handles" / "zoo.py").write_text(textwrap.dedent("""
        from easyserve import Handle
        class Negator(Handle):
            def preprocess(self, task):
                return task["task_info"]["n"]
            def forward(self, batch):
                return -batch
    """))
    config = tmp_path / "configs" / "neg.yaml"
    config.write_text('GPUs: ""\nProcessPerGPU: 1\nHandle: Negator\nPort: 0\n')
    with Server.from_yaml(config) as server:
        assert post_json(server.url + "/predict", {"n": 5}) == (200, -5)


class OriginalStyleWithoutCall:
    def __init__(self, gpu):
        self.gpu = gpu


@pytest.mark.parametrize("handle, said", [
    ("handles_for_tests:1abc", "Handle: 'handles_for_tests:1abc' must end in a class name after ':'"),
    ("gone.py:Missing", "Handle: file 'gone.py' not found (looked in "),
    ("two words", 'Handle: \'two words\' is not a class name; use "ClassName", "module:Class" or "file.py:Class"'),
    (OriginalStyleWithoutCall, "Handle: OriginalStyleWithoutCall is neither an easyserve.Handle subclass nor an "
                               "original-style handle (__init__(self, gpu) and __call__(self, data))"),
], ids=["no class name after the colon", "no such file", "not a name", "a class with no __call__"])
def test_a_handle_named_wrongly_is_refused_at_start_saying_how_to_name_one(handle, said):
    with pytest.raises(ConfigError) as raised:
        Server(handle=handle, GPUs="cpu", Port=0).start(timeout=60)
    assert str(raised.value).startswith(said), raised.value


def test_handle_class_defined_in_main_script_without_guard(tmp_path):
    # A class in __main__ (a script, or a notebook cell) ships by value; the script has no
    # `if __name__ == "__main__"` guard, which workers started with multiprocessing would need.
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent("""
        import json, urllib.request
        from easyserve import Handle, Server

        SCALE = 3

        class Scaler(Handle):
            def preprocess(self, task):
                return task["task_info"]["n"]
            def forward(self, batch):
                return batch * SCALE

        server = Server(handle=Scaler, GPUs="cpu", Port=0).start()
        req = urllib.request.Request(server.url + "/predict", data=b'{"n": 7}',
                                     headers={"Content-Type": "application/json"})
        print("ANSWER", urllib.request.urlopen(req).read().decode())
        server.stop()
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert "ANSWER 21" in out.stdout, out.stderr


def test_start_stop_start_in_one_process_and_repr(serve):
    server = Server(handle="handles_for_tests:Recorder", GPUs="cpu", ProcessPerGPU=2, Port=0)
    assert "stopped" in repr(server)
    for _ in range(2):
        server.start()
        text = repr(server)
        assert "running" in text and server.url in text and "workers=2/2 ready" in text
        pids = [w["pid"] for w in server.workers]
        assert post_json(server.url + "/predict", {"value": 1})[0] == 200
        server.stop()
        assert server.url is None and "stopped" in repr(server)
        assert not any(_alive(pid) for pid in pids)
    server.stop()  # a second stop is harmless


def test_context_manager_stops_on_exit(serve):
    with Server(handle="handles_for_tests:Recorder", GPUs="cpu", Port=0) as server:
        url = server.url
        pid = server.workers[0]["pid"]
        assert post_json(url + "/predict", {"value": 2})[1]["value"] == 2
    assert not _alive(pid)
    with pytest.raises(OSError):
        request(url + "/health", timeout=2)


def test_start_raises_with_the_handle_traceback_and_leaves_nothing(serve):
    server = Server(handle="handles_for_tests:BrokenSetup", HandleArgs={"model": "nope.onnx"}, GPUs="cpu", Port=0,
                    ProcessPerGPU=2)
    with pytest.raises(StartupError) as info:
        server.start()
    message = str(info.value)
    assert "FileNotFoundError" in message and "nope.onnx" in message and "Traceback" in message
    # raised from start() itself: the message holds the handle's traceback, and the frames it came
    # through (the event loop's thread, concurrent.futures) were some 35 lines above it in a notebook
    assert [frame.name for frame in traceback.extract_tb(info.value.__traceback__)][1:] == ["start"]
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert server.state == "stopped" and server.url is None
    assert worker_children() == []


def _starting(server: Server) -> tuple[threading.Thread, list[BaseException]]:
    """``server.start()`` run on a thread of its own, and what it raises, once it has."""
    raised: list[BaseException] = []

    def start() -> None:
        try:
            server.start()
        except BaseException as exc:  # the tests' assertions say what it should be
            raised.append(exc)

    starting = threading.Thread(target=start)
    starting.start()
    return starting, raised


def test_stop_from_another_thread_ends_a_start_still_loading_the_models():
    """stop() waited for the whole load (minutes, for a large model), then for the drain of the server
    that had come up meanwhile: start() returned a running server, its port answering, after the stop."""
    server = Server(handle="handles_for_tests:Spinner", HandleArgs={"setup_s": 30}, GPUs="cpu", Port=0,
                    ProcessPerGPU=2)
    starting, raised = _starting(server)
    assert wait_until(lambda: server.state == "starting" and len(worker_children()) == 2, 20)
    began = time.monotonic()
    server.stop()
    took = time.monotonic() - began
    starting.join(10)
    assert took < 10, took  # not the setup's 30 s
    assert len(raised) == 1 and isinstance(raised[0], StartupError), raised
    assert str(raised[0]) == "stopped while starting: stop() was called before the workers were ready"
    assert server.state == "stopped" and server.url is None and worker_children() == []


def test_stop_from_another_thread_ends_a_start_still_finding_its_gpus(fake_gpus, tmp_path):
    """A stop() before the workers were started (while start() asked nvidia-smi for the GPUs, or
    imported the handle) was forgotten: start() went on to load the models and returned a running
    server, and stop() waited for all of it before it stopped what had just come up."""
    asked = tmp_path / "asked"
    fake_gpus.install(f"#!/bin/sh\ntouch {asked}\nsleep 3\necho 0\n")
    server = Server(handle="handles_for_tests:Spinner", HandleArgs={"setup_s": 30}, GPUs="0", Port=0)
    starting, raised = _starting(server)
    assert wait_until(asked.exists, 10)
    server.stop()
    starting.join(20)
    assert len(raised) == 1 and isinstance(raised[0], StartupError), raised
    assert str(raised[0]) == "stopped while starting: stop() was called before the workers were ready"
    assert server.state == "stopped" and server.url is None and worker_children() == []


def test_port_in_use_fails_fast_with_a_clear_error(serve):
    with serve() as first:
        with pytest.raises(StartupError, match=f"cannot listen on 127.0.0.1:{first.port}: .*choose another") as held:
            Server(handle="handles_for_tests:Recorder", GPUs="cpu", Port=first.port).start()
        assert f"(listening on it: this process (pid {os.getpid()}: a server it started and did not stop, or " \
               "another socket of its own))" in str(held.value)
    # an address of another machine (TEST-NET-1): the Host is wrong, not the Port, as it used to say
    with pytest.raises(StartupError, match="cannot listen on 192.0.2.1:0: .*check Host"):
        Server(handle="handles_for_tests:Recorder", GPUs="cpu", Host="192.0.2.1", Port=0).start()
    assert worker_children() == []


def test_a_port_in_use_names_the_process_that_holds_it_with_its_secrets_hidden(tmp_path, serve):
    """"address already in use" left the user to find the holder (an earlier `easyserve run` in another
    terminal) with ss -ltnp; the message names it, its command line's options left out and secrets hidden,
    as it may be logged; its children that hold the socket too folded into it, and an easyserve server's
    HTTP fronts named by the server, the one to stop. A connection whose own end is the port (a client's,
    given it by the kernel) holds it too."""
    holder = tmp_path / "hold.py"
    holder.write_text("import os, socket, sys, time\n"
                      "s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen()\n"
                      "first = os.getpid(); children = [os.fork() for _ in range(2)]  # 3: the first child forks too\n"
                      "if os.getpid() == first and sys.argv[2] == 'close': s.close()  # a master that holds none\n"
                      "os.getpid() == first and print('ok', flush=True); time.sleep(60)\n")
    for how, held in (("keep", "and 3 process(es) it started"), ("close", "through 3 process(es) it started")):
        port = free_port()
        words = [str(port), how, "token=t0ps3cret", "https://ghp_t0k3n@github.com/x", "Authorization:", "Bearer",
                 "b3ar3r", "X-Auth: Bearer s3cr3t-one", "\x1b]52;c;cHduZWQ=\x07", "--api-key", "hunter2"]
        proc = subprocess.Popen(["python3", "-u", "hold.py", *words], stdout=subprocess.PIPE, cwd=tmp_path,
                                start_new_session=True)
        try:
            assert proc.stdout.readline() == b"ok\n"
            with pytest.raises(StartupError) as raised:
                Server(handle="handles_for_tests:Recorder", GPUs="cpu", Port=port).start()
            said = str(raised.value)
            assert said.startswith(f"cannot listen on 127.0.0.1:{port}: "), said
            # its control characters written out: a terminal shown the message is sent no escape sequence
            assert said.endswith(f" (listening on it: pid {proc.pid} (python3 -u hold.py {port} {how} token=*** "
                                 "https://***@github.com/x Authorization: ... X-Auth: Bearer *** "
                                 "\\x1b]52;c;cHduZWQ=\\x07 ...), "
                                 f"{held}); choose another Port (0 picks a free one)"), said
            hidden = ("hunter2", "t0ps3cret", "t0k3n", "b3ar3r", "s3cr3t", "\x1b")
            assert not [word for word in hidden if word in said], said
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
    port = free_port()  # not the last holder's: its processes, killed, may hold it a moment yet
    with socket.create_server(("127.0.0.1", 0)) as other, socket.socket() as client:
        client.bind(("127.0.0.1", port))
        client.connect(other.getsockname())
        with pytest.raises(StartupError) as held:
            Server(handle="handles_for_tests:Recorder", GPUs="cpu", Port=port).start()
        assert f"(with a connection whose own end it is: this process (pid {os.getpid()}: a server it started and " \
               "did not stop, or another socket of its own))" in str(held.value)
    with serve(HttpWorkers=2) as fronted:
        with pytest.raises(StartupError) as held:
            Server(handle="handles_for_tests:Recorder", GPUs="cpu", Port=fronted.port).start()
        assert f"(listening on it: this process (pid {os.getpid()}: a server it started and did not stop, or another " \
               "socket of its own), through 2 HTTP front process(es) it started)" in str(held.value)
    assert worker_children() == []


def test_the_built_in_handles_refuse_handle_args_they_do_not_take():
    """``Handle: Demo`` with a model path served the demo, silently, where its user meant their model."""
    with pytest.raises(ConfigError, match=r"Handle: Demo takes no HandleArgs, got 'model'\. To serve an ONNX "
                                          r"file, use Handle: OnnxModel"):
        Server(handle="Demo", HandleArgs={"model": "mine.onnx"}, GPUs="cpu", Port=0).start()
    with pytest.raises(ConfigError, match="Handle: Echo takes only delay_ms, got 'delay'"):
        Server(handle="Echo", HandleArgs={"delay": 5}, GPUs="cpu", Port=0).start()
    with Server(handle="Echo", HandleArgs={"delay_ms": 1}, GPUs="cpu", Port=0) as server:
        assert post_json(server.url + "/predict", {"n": 1}) == (200, {"n": 1})
    assert worker_children() == []


def test_a_worker_that_dies_in_setup_without_a_traceback_has_its_last_lines_in_the_error():
    """The error said its one line twice, then pointed to server.logs() of a server that start() had
    not returned (``server = Server(...).start()`` raised): what the process said was nowhere."""
    with pytest.raises(StartupError) as failed:
        Server(handle="handles_for_tests:DiesQuietly", GPUs="cpu", Port=0).start()
    message = str(failed.value)
    assert message.count("exited with code 1 before it was ready") == 1, message
    assert "Its last lines:\n  loading weights\n  CUDA error: out of memory\n" in message, message
    assert "server.logs()" not in message
    assert worker_children() == []


def test_workers_exit_when_the_server_process_is_killed(tmp_path):
    script = tmp_path / "serve.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        from easyserve import Server
        server = Server(handle="easyserve.builtin:Echo", GPUs="cpu", ProcessPerGPU=2, Port=0).start()
        print(" ".join(str(w["pid"]) for w in server.workers), flush=True)
        time.sleep(600)
    """))
    with subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True) as proc:
        try:
            pids = [int(p) for p in proc.stdout.readline().split()]
            assert len(pids) == 2 and all(_alive(p) for p in pids)
        finally:
            proc.kill()  # SIGKILL: no cleanup code runs in the server
    wait_until(lambda: not any(_alive(p) for p in pids), 10, what="the workers to exit")


def test_config_from_yaml_with_the_original_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text('GPUs: "0,1"\nProcessPerGPU: 2\nHandle: ImagenetResnet18Handle\n')
    config = Config.from_yaml(path)
    expected = ((0, 1), 2, "ImagenetResnet18Handle", 9876)
    assert (config.gpus, config.process_per_gpu, config.handle, config.port) == expected


def test_binds_loopback_by_default_and_warns_loudly_otherwise(serve, caplog):
    with serve() as server:
        assert server.config.host == "127.0.0.1"
    assert "reachable from other machines" not in caplog.text
    caplog.set_level(logging.INFO, logger="easyserve")
    with serve(Host="0.0.0.0") as server:
        assert request(server.url + "/health")[0] == 200
        port = server.port
    assert "listening on 0.0.0.0" in caplog.text and "open to anyone" in caplog.text
    # its start's line said only the URL to reach it here, as if the host had been ignored
    assert f"easyserve listening on 0.0.0.0 port {port} (http://127.0.0.1:{port} from this machine)" in caplog.text
    # and before the workers load, a line saying so: a slow import and setup were silence until then
    said = [r.getMessage() for r in caught(caplog)]
    starting = said.index("starting 1 worker(s) running handles_for_tests:Recorder: the server answers once they are "
                         "ready")
    assert starting < next(i for i, m in enumerate(said) if m.startswith("worker cpu/0 ready")), said
    caplog.clear()
    with serve(Host="127.0.0.2"):  # loopback too: it said "reachable from other machines"
        pass
    assert "reachable from other machines" not in caplog.text


def test_stop_leaves_no_thread_socket_or_descriptor_behind():
    import threading

    def snapshot():
        # the threads and descriptors alive now: one of an earlier test's that ends meanwhile (a
        # leftover of a test that failed) is not this test's to count, as a count compared did
        return set(threading.enumerate()), set(os.listdir("/proc/self/fd"))

    server = Server(handle="handles_for_tests:Recorder", GPUs="cpu", ProcessPerGPU=2, Port=0)
    server.start()  # a first cycle: imports and lazily created objects stay, as they should
    post_json(server.url + "/predict", {"value": 1})
    server.stop()
    before = snapshot()
    for _ in range(3):
        server.start()
        post_many(server.url + "/predict", [{"value": i} for i in range(20)], concurrency=8)
        server.stop()
    threads, descriptors = snapshot()
    assert threads <= before[0], threads - before[0]
    assert descriptors <= before[1], descriptors - before[1]


@pytest.mark.parametrize("one, other, clash", [
    ("127.0.0.1", "localhost", True), ("::1", "localhost", True), ("[::1]", "::1", True),
    ("0.0.0.0", "127.0.0.1", True), ("::", "127.0.0.1", True), ("", "10.0.0.5", True),
    ("0.0.0.0", "::1", False), ("10.0.0.5", "127.0.0.1", False),
])
def test_hosts_that_bind_the_same_addresses_count_as_one_for_a_cell_run_again(one, other, clash):
    # a server started on a fixed port stops an earlier one of this process only where the two would
    # clash: 0.0.0.0 and [::1] bind side by side, and an earlier server on one was stopped for nothing
    from easyserve.notebook import overlap as _overlap

    assert _overlap(one, other) is clash and _overlap(other, one) is clash


def test_a_misspelt_handle_arg_that_the_handle_asks_for_is_said_in_the_log(serve, caplog):
    """A handle with no ``__init__`` of its own reads ``self.args.get("threshold", 0.5)``: given
    ``treshold``, it ran on its default, and nothing said why the setting had no effect."""
    import logging

    caplog.set_level(logging.WARNING, logger="easyserve")
    with serve("handles_for_tests:ReadsArgs", HandleArgs={"treshold": 0.9}) as server:
        assert post_json(server.url + "/predict", {}) == (200, {"threshold": 0.5})
        said = "HandleArgs: the handle asked for 'threshold', which was not given, and never read 'treshold', which was"
        wait_until(lambda: said in caplog.text, 10, "the warning")
    assert "has not read" not in caplog.text  # the misspelt key is said once, as such
    caplog.clear()
    # a key asked for and lacking beside one given and read, spelt nearly alike, is two settings
    with serve("handles_for_tests:ReadsArgs", HandleArgs={"threshold": 0.9, "top_p": 1}) as server:
        assert post_json(server.url + "/predict", {}) == (200, {"threshold": 0.9})
    assert "HandleArgs:" not in caplog.text
    # a key it never reads, spelt like none it asks for: it did nothing, and nothing said so; said by the first
    # worker to run the handle, not by each (nor by each restart)
    with serve("handles_for_tests:ReadsArgs", HandleArgs={"threshold": 0.9, "model": "other.onnx", "k": 3},
               ProcessPerGPU=2) as server:
        assert post_many(server.url + "/predict", [{}] * 16, concurrency=4) == [(200, {"threshold": 0.9})] * 16
        wait_until(lambda: all(w["batches"] for w in server.workers), 10, "both workers to answer a batch")
        said = ("HandleArgs: the handle has not read 'model', 'k', given in the config, by the end of its first batch: "
                "a key it does not know does nothing (misspelt, or meant for another handle?)")
        wait_until(lambda: said in caplog.text, 10, "the warning")
        os.kill(server.workers[0]["pid"], signal.SIGKILL)
        wait_until(lambda: server.workers[0]["restarts"] == 1 and server.workers[0]["state"] == "idle", 20, "restart")
        assert post_many(server.url + "/predict", [{}] * 8, concurrency=4) == [(200, {"threshold": 0.9})] * 8
    assert len([r for r in caught(caplog) if "has not read" in r.getMessage()]) == 1, caplog.text
    caplog.clear()
    # a handle with an __init__ of its own took its keys there, though it passed them on to self.args, where
    # nothing reads them again (OnnxModel's model, the examples'), or read them from its **kw: none is said
    with serve("handles_for_tests:TakesArgs", HandleArgs={"model": "other.onnx", "k": 3}) as server:
        assert post_json(server.url + "/predict", {}) == (200, {"threshold": 0.5})
        wait_until(lambda: all(w["batches"] for w in server.workers), 10, "its first batch answered")
    assert "HandleArgs:" not in caplog.text
    # a first worker that dies before its first batch is done has said nothing: its restart says it
    with serve("handles_for_tests:ReadsArgs", HandleArgs={"k": 3}) as server:
        os.kill(server.workers[0]["pid"], signal.SIGKILL)
        wait_until(lambda: server.workers[0]["restarts"] == 1 and server.workers[0]["state"] == "idle", 20, "restart")
        assert post_json(server.url + "/predict", {}) == (200, {"threshold": 0.5})
        wait_until(lambda: "HandleArgs: the handle has not read 'k'" in caplog.text, 10, "the warning")


SIGNAL_ON_ANOTHER_THREAD = """
import logging, signal, threading, time
from easyserve import Server

logging.basicConfig(level=logging.INFO)

server = Server(GPUs="cpu", Port=0)

def send() -> None:
    while server.state != "running":
        time.sleep(0.05)
    # as Linux may deliver a process's SIGTERM: to a thread other than the main one (here the event loop's)
    signal.pthread_kill(server._thread.ident, signal.SIGTERM)

threading.Thread(target=send, daemon=True).start()
server.serve_forever()
print("stopped", flush=True)
"""


def test_serve_forever_heeds_a_signal_caught_on_another_thread():
    """Its main thread waited with no timeout, and a signal caught on the event loop's thread (which the
    kernel may pick under load) has its Python handler run only by the main thread: a server sent
    SIGTERM just as it started went on serving (a supervised server's stop hung)."""
    done = subprocess.run([sys.executable, "-c", SIGNAL_ON_ANOTHER_THREAD], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "stopped" in done.stdout, done.stdout + done.stderr
    assert "SIGTERM received: draining" in done.stderr


def test_a_module_in_the_current_folder_hides_no_library_from_the_workers_and_fronts(tmp_path, monkeypatch):
    """Python put the folder a server was started from first on its children's path (``python -m``):
    a ``queue.py`` there (a user's own, or one planted in a shared folder) ran in every worker and HTTP
    front, in place of the standard library's. A handle's own module there is still found."""
    here = tmp_path / "project"
    here.mkdir()
    planted = tmp_path / "ran"
    for name in ("queue", "selectors", "numpy"):  # one each of easyserve's, asyncio's and the handle's imports
        (here / f"{name}.py").write_text(f"open({str(planted)!r} + '.{name}', 'w').close()\n")
    (here / "myhandle.py").write_text(textwrap.dedent("""
        from easyserve import Handle
        class Doubler(Handle):
            def forward(self, batch):
                return [2 * info["n"] for info in batch]
    """))
    monkeypatch.chdir(here)
    with Server(handle="myhandle:Doubler", GPUs="cpu", Port=0, HttpWorkers=2, base_dir=tmp_path) as server:
        assert post_json(server.url + "/predict", {"n": 21}) == (200, 42)
    assert sorted(p.name for p in tmp_path.glob("ran.*")) == []


def test_the_bootstrap_for_python_3_10_runs_a_module_as_m_does_less_the_current_folder(tmp_path):
    """On 3.10 (the image's Python), which has no -P, a child runs children.RUN_MODULE: it must run the
    module as __main__ with its arguments, and take no module from the current folder."""
    from easyserve.children import RUN_MODULE

    (tmp_path / "argparse.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    done = subprocess.run([sys.executable, "-c", RUN_MODULE, "json.tool", "--sort-keys"], input='{"b": 1, "a": 2}',
                          capture_output=True, text=True, cwd=tmp_path, timeout=30)
    assert (done.returncode, done.stdout) == (0, '{\n    "a": 2,\n    "b": 1\n}\n'), done.stderr
    assert not (tmp_path / "ran").exists()


def test_a_stopped_server_leaves_nothing_of_its_own_in_memory(serve):
    """aiohttp's cache of middleware chains held every stopped server's app, and through it its pool, its
    counters and its workers' last log lines: a notebook that started and stopped a server 200 times held
    70 MB more."""
    import gc
    import weakref

    pools = []
    for _ in range(3):
        with serve() as server:
            assert post_json(server.url + "/predict", {"value": 1})[0] == 200
            assert request(server.url + "/v2/models/Recorder")[0] == 200  # a route of another app's chain
            pools.append(weakref.ref(server._pool))
        assert server.stats()["statuses"] == {"200": 1}  # what it answered, still told
    del server
    gc.collect()
    assert [pool() for pool in pools] == [None] * 3


def test_a_worker_imports_none_of_the_server_and_the_package_names_stay_its_functions():
    """A worker process imports this package before its own module; the package imported the server,
    the bench and aiohttp's client with it, 0.3 s of every worker's start. They come when asked for
    now, and ``easyserve.bench`` and ``easyserve.sweep`` stay functions once their modules are imported."""
    worker = subprocess.run(
        [sys.executable, "-c", "import sys, easyserve.worker; print(sorted(m for m in sys.modules "
                               "if m.split('.')[0] == 'aiohttp' or m in ('easyserve.server', 'easyserve.bench')))"],
        capture_output=True, text=True, check=True)
    assert worker.stdout.strip() == "[]"
    names = subprocess.run(
        [sys.executable, "-c", "import easyserve.bench, easyserve.sweep, easyserve\n"
                               "from easyserve import Server, bench, sweep\n"
                               "print(callable(easyserve.bench), callable(bench), callable(easyserve.sweep), "
                               "Server.__module__, easyserve.Client.__name__)"],
        capture_output=True, text=True, check=True)
    assert names.stdout.split() == ["True", "True", "True", "easyserve.server", "Client"]


def test_a_long_start_says_it_is_still_going_on(monkeypatch, caplog):
    """A setup of minutes (a download, a compilation) left a notebook's cell silent until it ended, or
    StartTimeoutS did: a hung download looked like a slow load for 5 minutes."""
    import easyserve.pool

    monkeypatch.setattr(easyserve.pool, "STILL_STARTING_S", 0.4)  # 30 s for users
    server = Server(handle="handles_robust:Sleeper", HandleArgs={"setup_s": 1.5}, GPUs="cpu", ProcessPerGPU=2,
                    Port=0, StartTimeoutS=60)
    with server:
        said = [r.getMessage() for r in caught(caplog) if r.getMessage().startswith("still starting")]
    assert len(said) >= 2 and said[0] == ("still starting after 0.4 s: cpu/0, cpu/1 loading the handle (its "
                                          "setup() running); StartTimeoutS (60 s) ends the start if it goes on"), said
    # ever further apart: 0.4, 0.8, 1.6 s... (how many, and which workers are still loading, a loaded
    # machine's start decides)
    after = [float(re.match(r"still starting after ([\d.]+) s: cpu/", line)[1]) for line in said]
    assert after == [0.4 * 2**i for i in range(len(said))], said


class _EndsAsTheWaitDoes(concurrent.futures.Future):
    """A future that is set the moment its first wait runs out, as a start ending on a busy machine was:
    the wait's TimeoutError, and by the time it was looked at, the future done."""

    def __init__(self, outcome: Callable[[concurrent.futures.Future], None]) -> None:
        super().__init__()
        self.outcome = outcome

    def result(self, timeout=None):
        if not self.done():
            self.outcome(self)
            raise concurrent.futures.TimeoutError()
        return super().result(timeout)


def test_a_start_that_ends_just_as_a_wait_for_it_runs_out_is_not_a_timeout():
    """``Server.start()`` raised a bare TimeoutError, its server started, when the start ended in the
    moment between a 0.2 s wait for it running out and the check that followed."""
    from easyserve.server import _result

    assert _result(_EndsAsTheWaitDoes(lambda f: f.set_result("started")), 60) == "started"
    with pytest.raises(TimeoutError, match="its own"):  # a start's own TimeoutError is still its own
        _result(_EndsAsTheWaitDoes(lambda f: f.set_exception(TimeoutError("its own"))), 60)


def test_a_server_takes_a_config_files_path_or_a_dict_of_settings(tmp_path):
    """Server("config.yaml") and Server({...}), the first things one tries, were Python's own errors
    (a str has no replace() of that kind); the path's server re-reads it on SIGHUP, as from_yaml's does."""
    path = tmp_path / "served.yaml"
    path.write_text("GPUs: cpu\nProcessPerGPU: 2\nMaxBatchSize: 4\n")
    for given in (str(path), path):
        server = Server(given, MaxBatchSize=3)
        assert (server.config.process_per_gpu, server.config.max_batch_size) == (2, 3)
        assert server._source == (given, {"MaxBatchSize": 3})
    assert Server({"GPUs": "cpu", "ProcessPerGPU": 2}).config.process_per_gpu == 2
    with pytest.raises(ConfigError, match="unknown config key 'ProcessPerGpus'"):
        Server({"ProcessPerGpus": 2})
    with pytest.raises(TypeError, match="takes a Config, a config file's path or a dict of settings, not a list"):
        Server([("GPUs", "cpu")])


def test_a_keyword_the_handle_takes_is_told_to_go_in_handle_args():
    """Server(handle=Greeting, greeting="hi") said only "unknown config key 'greeting'", and listed the
    config's keys."""
    from handles_for_tests import Greeting

    with pytest.raises(ConfigError) as raised:
        Server(handle=Greeting, GPUs="cpu", greeting="hi", times=2)
    assert str(raised.value) == ("unknown config key 'greeting', 'times': Greeting.__init__ takes greeting, times, "
                                 "from HandleArgs={'greeting': 'hi', 'times': 2}")
    with pytest.raises(ConfigError) as raised:  # beside one that is neither: both said at once
        Server(handle=Greeting, GPUs="cpu", greeting="hi", Bogus=1)
    assert str(raised.value) == ("unknown config key 'greeting', 'Bogus': Greeting.__init__ takes greeting, from "
                                 "HandleArgs={'greeting': 'hi'}; Bogus: neither a config key nor the handle's")
    with pytest.raises(ConfigError, match="unknown config key 'greting'. Known keys: GPUs, "):  # not its own: as before
        Server(handle=Greeting, GPUs="cpu", greting="hi")


@pytest.mark.parametrize("http_workers", [1, 2])
def test_a_drain_does_not_wait_for_a_batch_whose_clients_have_all_left(serve, caplog, http_workers):
    """A batch that runs for no one (its client left; with HttpWorkers, its front died) held the drain to
    its limit, which then warned of requests unanswered."""
    import json
    import socket
    import urllib.parse

    with serve("handles_robust:Sleeper", HttpWorkers=http_workers) as server:
        address = urllib.parse.urlsplit(server.url)
        body = json.dumps({"sleep": 20}).encode()
        with socket.create_connection((address.hostname, address.port)) as sock:
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (address.netloc.encode(), len(body), body))
            wait_until(lambda: server.stats()["batches"] == 1, what="its batch to run")
        wait_until(lambda: server.stats()["client_gone"] == 1, what="the client's departure noticed")
        caplog.set_level(logging.WARNING)
        began = time.monotonic()
        server.stop(drain_timeout=10)
        took = time.monotonic() - began
    assert took < 5, took  # the worker is stopped without its batch's 20 s, and no warning
    assert not [r for r in caught(caplog) if "drain timeout" in r.getMessage()], caught(caplog)
