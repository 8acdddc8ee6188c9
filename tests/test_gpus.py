"""GPU utilisation and memory in /stats, /metrics, the dashboard and the bench, read from an
``nvidia-smi`` on PATH (a script standing in for the driver's, see conftest's ``fake_gpus``), and
what the server does when that tool fails, lies or outlives it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import csv
import logging
import signal
import time

import pytest
from conftest import _alive, caught, http, post_json, request, wait_until
from test_cli import easyserve, wait_for_url

import easyserve as es
from easyserve import ConfigError, devices, gpus
from easyserve.reports import write_csv

MIB = 2**20


def gpus_read(server, count: int = 1, sampled: float = 0.3) -> list[dict]:
    """/stats' GPUs once ``count`` of them have readings covering ``sampled`` seconds."""
    def ready():
        found = request(server.url + "/stats")[2]["gpus"]
        return found if len(found) >= count and all(g["sampled_s"] >= sampled for g in found) else None

    return wait_until(ready, timeout=20, what=f"{count} GPUs read")


def samples(metrics: str) -> dict[str, float]:
    """The text exposition's samples, "name{labels}" to value, compared as numbers: prometheus-client before 0.26
    wrote an exponent of two digits with a 0 before it (8.5520809984e+010, which Prometheus reads as well)."""
    return {line.rpartition(" ")[0]: float(line.rpartition(" ")[2]) for line in metrics.splitlines()
            if line and not line.startswith("#")}


def dashboard_html(server) -> str:
    """What a dashboard of ``server`` shows once refreshed."""
    dashboard = server.dashboard(interval=60)
    try:
        dashboard.refresh()
        return dashboard.html()
    finally:
        dashboard.close()


def logged(caplog, text: str) -> int:
    """Records saying ``text`` (by time made: once the server's log routing is installed, pytest sees
    each record twice)."""
    return len({record.created for record in caplog.records if text in record.getMessage()})


def test_stats_and_metrics_report_each_gpu_the_workers_use(serve, fake_gpus):
    fake_gpus(2)
    with serve(GPUs="0,1") as server:
        found = gpus_read(server, 2)
        status, _, metrics = http("GET", server.url + "/metrics")
        answered = post_json(server.url + "/predict", {"value": 1})[0]
    assert [(g["gpu"], g["index"], g["uuid"], g["name"], g["utilization"]) for g in found] == [
        (0, "0", "GPU-00000000-fake", "Fake GPU, 80GB", 0.30),
        (1, "1", "GPU-00000001-fake", "Fake GPU, 80GB", 0.35),
    ]
    assert [(g["memory_used_bytes"], g["memory_total_bytes"]) for g in found] == [
        (1000 * MIB, 81559 * MIB), (1001 * MIB, 81559 * MIB)]
    for g in found:  # busy time over time covered is the (constant) utilisation
        assert g["busy_s"] == pytest.approx(g["utilization"] * g["sampled_s"], abs=1e-5)
    assert status == 200 and answered == 200
    values = samples(metrics)
    expected = {
        'easyserve_gpu_utilization_ratio{gpu="0"}': 0.3, 'easyserve_gpu_utilization_ratio{gpu="1"}': 0.35,
        'easyserve_gpu_memory_used_bytes{gpu="1"}': 1001 * MIB,
        'easyserve_gpu_memory_total_bytes{gpu="0"}': 81559 * MIB,
        'easyserve_gpu_info{gpu="1",index="1",name="Fake GPU, 80GB",uuid="GPU-00000001-fake"}': 1.0,
        "easyserve_gpu_monitoring_up": 1.0}
    assert {name: values.get(name) for name in expected} == expected
    assert "easyserve_gpu_busy_seconds_total{gpu=\"0\"}" in metrics
    assert "easyserve_gpu_sampled_seconds_total{gpu=\"1\"}" in metrics
    # and under Triton's names, by UUID, as its dashboards read them
    triton = {
        'nv_gpu_utilization{gpu_uuid="GPU-00000001-fake"}': 0.35,
        'nv_gpu_memory_used_bytes{gpu_uuid="GPU-00000000-fake"}': 1000 * MIB,
        'nv_gpu_memory_total_bytes{gpu_uuid="GPU-00000001-fake"}': 81559 * MIB}
    assert {name: values.get(name) for name in triton} == triton


def test_gpus_are_named_by_config_id_through_a_preset_cuda_visible_devices(serve, fake_gpus, monkeypatch):
    fake_gpus(8)
    # a scheduler gave this job GPU 5 by index and GPU 7 by a prefix of its UUID, as CUDA accepts
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,GPU-00000007")
    with serve(GPUs="0,1") as server:
        found = gpus_read(server, 2)
    assert [(g["gpu"], g["index"], g["utilization"]) for g in found] == [(0, "5", 0.55), (1, "7", 0.65)]


def test_a_cpu_server_runs_no_monitor_and_reports_no_gpu(serve, fake_gpus):
    fake_gpus(1)
    with serve(GPUs="cpu") as server:
        post_json(server.url + "/predict", {"value": 1})
        time.sleep(0.3)
        stats = request(server.url + "/stats")[2]
        metrics = http("GET", server.url + "/metrics")[2]
    assert stats["gpus"] == [] and stats["gpu_monitoring"] is None and "easyserve_gpu_" not in metrics
    assert fake_gpus.monitors() == []


def test_the_monitor_stops_with_the_server(serve, fake_gpus):
    fake_gpus(1)
    with serve(GPUs="0") as server:
        gpus_read(server)
        [pid] = fake_gpus.monitors()
        assert _alive(pid)
    wait_until(lambda: not _alive(pid), timeout=5, what="nvidia-smi to exit")


def test_a_killed_server_leaves_no_monitor_behind(tmp_path, fake_gpus):
    fake_gpus(1)
    config = tmp_path / "gpu.yaml"
    config.write_text('GPUs: "0"\nHandle: "handles_for_tests:Recorder"\nPort: 0\n')
    lines: list[str] = []
    with easyserve("run", str(config)) as proc:
        url = wait_for_url(proc, lines)
        wait_until(lambda: request(url + "/stats")[2]["gpus"], what="a GPU reading")
        [pid] = fake_gpus.monitors()
        workers = [w["pid"] for w in request(url + "/stats")[2]["workers"]]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    # its output pipe closed with the server: its next line ends it
    wait_until(lambda: not _alive(pid), timeout=5, what="nvidia-smi to exit after the server was killed")
    wait_until(lambda: not any(map(_alive, workers)), timeout=10, what="the workers to exit")


FAILS_ONCE = """#!/bin/sh
case "$*" in
  *utilization.gpu*)
    if [ ! -e {marker} ]; then
      touch {marker}
      echo "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."
      exit 9
    fi
    while :; do echo "0, GPU-00000000-fake, 40, 10, 100, Fake"; sleep 0.1; done ;;
  *) echo 0 ;;
esac
"""


def test_a_failing_nvidia_smi_is_logged_retried_and_never_holds_requests(serve, fake_gpus, monkeypatch, caplog,
                                                                         tmp_path):
    fake_gpus.install(FAILS_ONCE.format(marker=tmp_path / "failed-once"))
    monkeypatch.setattr(gpus, "RETRY_S", 1.0)
    caplog.set_level(logging.INFO, logger="easyserve")
    with serve(GPUs="0") as server:
        first = request(server.url + "/stats")[2]["gpus"]
        answered = post_json(server.url + "/predict", {"value": 1})[0]
        found = gpus_read(server)
        # said once it has answered a while (one that printed a line and died said so every RETRY_S)
        wait_until(lambda: "GPU monitoring: nvidia-smi answers again" in caplog.text, 10, "the recovery said")
    assert answered == 200
    assert first == []  # no reading before it answers
    assert found[0]["utilization"] == 0.4
    assert ("GPU monitoring: nvidia-smi exited with status 9: NVIDIA-SMI has failed because it couldn't "
            "communicate with the NVIDIA driver.") in caplog.text
    assert "GPU monitoring: nvidia-smi answers again" in caplog.text


FAILS_WHILE = """#!/bin/sh
case "$*" in
  *utilization.gpu*)
    if [ -e {broken} ]; then
      echo "Failed to initialize NVML: Driver/library version mismatch"
      exit 18
    fi
    while :; do echo "0, GPU-00000000-fake, 40, 10, 100, Fake"; sleep 0.1; done ;;
  *) echo 0 ;;
esac
"""


def test_stats_say_whether_nvidia_smi_reads_the_gpus_and_why_not(serve, fake_gpus, monkeypatch, tmp_path):
    """A GPU server whose monitoring had never answered listed no GPU in /stats, as a CPU server does:
    nothing there told a driver that fails (after an upgrade, until a reboot) from a server on CPU."""
    broken = tmp_path / "broken"
    broken.touch()
    fake_gpus.install(FAILS_WHILE.format(broken=broken))
    monkeypatch.setattr(gpus, "RETRY_S", 0.5)
    with serve(GPUs="0") as server:
        def stats() -> dict:
            return request(server.url + "/stats")[2]

        wait_until(lambda: stats()["gpu_monitoring"]["problem"], what="the failure read")
        failing = stats()
        report = es.bench(server.url, {"value": 1}, concurrency=[1, 2], requests=10, warmup=0, progress=False)
        shown = dashboard_html(server)
        broken.unlink()
        wait_until(lambda: stats()["gpu_monitoring"]["up"], what="nvidia-smi to answer again")
        up = stats()
    assert failing["gpus"] == [] and failing["gpu_monitoring"] == {
        "up": False, "problem": "nvidia-smi exited with status 18: Failed to initialize NVML: Driver/library version "
                                "mismatch"}
    assert up["gpu_monitoring"] == {"up": True, "problem": None} and up["gpus"][0]["utilization"] == 0.4
    # the bench says why its GPU column is empty, once; the dashboard, why it shows no GPU
    assert [run.gpu_util for run in report.runs] == [None, None]
    assert [note for note in report.notes if "GPU" in note] == [
        "c=1: the server's GPU monitoring did not read every GPU (nvidia-smi exited with status 18: Failed to "
        "initialize NVML: Driver/library version mismatch): the GPU column leaves out what it could not read"]
    assert "GPUs not read" in shown and "Driver/library version mismatch" in shown


def test_a_stop_ends_a_start_that_a_hung_nvidia_smi_holds(fake_gpus, monkeypatch, caplog, tmp_path):
    """A wedged driver hangs nvidia-smi: stop() from another thread, during the GPU probe of a start,
    waited for the probe to time out (20 s), and the start's log said the driver did not answer."""
    probes = tmp_path / "probes"
    fake_gpus.install(f"#!/bin/sh\necho $$ >> {probes}\nexec sleep 60\n")
    monkeypatch.setattr(devices, "PROBE_TIMEOUT_S", 30.0)
    caplog.set_level(logging.INFO, logger="easyserve")
    server = es.Server(GPUs="0", Port=0)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        started = pool.submit(server.start)
        wait_until(lambda: probes.exists() and probes.read_text().strip(), what="the probe to run")
        [pid] = map(int, probes.read_text().split())
        server.stop()
        with pytest.raises(es.StartupError, match="stopped while starting"):
            started.result()
    wait_until(lambda: not _alive(pid), timeout=5, what="the hung nvidia-smi to be killed")
    assert server.state == "stopped" and "did not answer" not in caplog.text


def test_no_nvidia_smi_to_run_is_logged_once(monkeypatch, caplog, tmp_path):
    monitor = gpus.GpuMonitor({0: "0"}, command=str(tmp_path / "no-such-nvidia-smi"))
    monkeypatch.setattr(gpus, "RETRY_S", 0.1)

    async def run() -> None:
        monitor.start()
        await asyncio.sleep(0.5)  # about five tries
        await monitor.stop()

    asyncio.run(run())
    assert logged(caplog, "cannot run") == 1 and "No such file or directory" in caplog.text
    assert monitor.readings() == []


def test_what_the_gpu_probe_finds_and_why_it_finds_none_is_said(fake_gpus, monkeypatch, caplog, tmp_path):
    """Every failure of nvidia-smi was "this machine has no GPU" (or nothing, with GPUs: auto); a GPU
    listed before a failed exit was dropped with the rest; output that was not UTF-8 failed every start,
    a CPU server's too, which asked nvidia-smi for GPUs it never used (a hung one held its start 20 s)."""
    from easyserve.config import Config
    from easyserve.devices import plan

    def planned(gpus: str) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="easyserve"):
            return [spec.name for spec in plan(Config.from_dict({"GPUs": gpus}))]

    asked = tmp_path / "asked"
    fake_gpus.install(f"#!/bin/sh\ntouch {asked}\nprintf '0\\n\\377 caf\\351\\n'\n")
    assert planned("cpu") == ["cpu/0"] and not asked.exists() and caplog.text == ""
    assert planned("0") == ["gpu0/0"] and asked.exists()  # the line that is not UTF-8 passed over
    fake_gpus.install("#!/bin/sh\necho 'Failed to initialize NVML: Driver/library version mismatch'\nexit 18\n")
    assert planned("0") == ["cpu/0"]
    assert ("asked for GPU 0 but this machine has no GPU (nvidia-smi exited with status 18: Failed to initialize "
            "NVML: Driver/library version mismatch)") in caplog.text
    assert planned("auto") == ["cpu/0"] and "GPUs: nvidia-smi exited with status 18" in caplog.text
    fake_gpus.install("#!/bin/sh\necho 0\necho 'Unable to determine the device handle for GPU 1: GPU is lost'\n"
                             "exit 15\n")
    assert planned("auto") == ["gpu0/0"] and "using the GPUs it listed (0)" in caplog.text
    fake_gpus(2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,-1,1")  # CUDA sees GPU 0 alone: it stops at the -1
    assert planned("auto") == ["gpu0/0"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert planned("0") == ["cpu/0"] and "(CUDA_VISIBLE_DEVICES='' hides every GPU)" in caplog.text


def test_gpus_keep_nvidia_smis_numbers_past_one_it_cannot_read_and_a_preset_it_cannot_check_is_said(
        fake_gpus, monkeypatch, caplog, tmp_path):
    """A GPU that fell off the bus left a gap in nvidia-smi's list (0, 1, 3): config id 2 was GPU 3, and
    GPUs: "0,1,3" ran GPU 3's workers on CPU, "this machine has GPUs 0, 1, 2". A preset
    CUDA_VISIBLE_DEVICES was dropped without a word where nvidia-smi was not installed, and one naming
    a GPU nvidia-smi does not list was taken as it was, its workers finding no GPU."""
    from easyserve.config import Config
    from easyserve.devices import plan

    def planned(gpus: str) -> list[tuple[str, str]]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="easyserve"):
            return [(spec.name, spec.visible) for spec in plan(Config.from_dict({"GPUs": gpus}))]

    fake_gpus.install("#!/bin/sh\n" + "".join(f"echo '{i}, GPU-0000000{i}-fake'\n" for i in (0, 1, 3))
                      + "echo 'Unable to determine the device handle for GPU 0000:83:00.0: Unknown Error'\nexit 15\n")
    # pinned by UUID past the gap: CUDA may not count the lost GPU, and would give index 3 to another
    assert planned("3") == [("gpu3/0", "GPU-00000003-fake")]
    assert planned("auto") == [("gpu0/0", "GPU-00000000-fake"), ("gpu1/0", "GPU-00000001-fake"),
                               ("gpu3/0", "GPU-00000003-fake")]
    assert "using the GPUs it listed (0, 1, 3)" in caplog.text
    assert planned("2") == [("cpu/0", "")] and "asked for GPU 2 but this machine has GPUs 0, 1, 3" in caplog.text
    fake_gpus(2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,7")
    assert planned("auto") == [("gpu0/0", "1"), ("gpu1/0", "7")]
    assert ("GPUs: CUDA_VISIBLE_DEVICES names 7, which nvidia-smi does not list (it lists 0, 1): CUDA will not "
            "find it") in caplog.text
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))  # no nvidia-smi at all
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert planned("auto") == [("cpu/0", "")]
    assert ("GPUs: CUDA_VISIBLE_DEVICES='0,1' names GPUs, but nvidia-smi is not installed, so none is used (in a "
            "container: NVIDIA_DRIVER_CAPABILITIES needs utility beside compute); the workers run on CPU"
            ) in caplog.text


UNREPORTED = """#!/bin/sh
case "$*" in
  *utilization.gpu*)
    while :; do
      echo "0, GPU-00000000-fake, [N/A], [Not Supported], [GPU requires reset], Fake"
      echo "0, GPU-00000000-fake, nan, inf, -1, Fake"
      echo "something that is not a reading"
      echo "7, 8"
      sleep 0.1
    done ;;
  *) echo 0 ;;
esac
"""


def test_numbers_the_driver_does_not_report_are_left_out(serve, fake_gpus):
    fake_gpus.install(UNREPORTED)
    with serve(GPUs="0") as server:
        found = wait_until(lambda: request(server.url + "/stats")[2]["gpus"], what="a GPU reading")
        time.sleep(0.3)
        found = request(server.url + "/stats")[2]["gpus"]
        metrics = http("GET", server.url + "/metrics")[2]
    assert found == [{"gpu": 0, "index": "0", "uuid": "GPU-00000000-fake", "name": "Fake", "utilization": None,
                      "memory_used_bytes": None, "memory_total_bytes": None, "busy_s": 0.0, "sampled_s": 0.0}]
    assert "easyserve_gpu_utilization_ratio{" not in metrics and "easyserve_gpu_memory_used_bytes{" not in metrics
    assert 'easyserve_gpu_info{gpu="0",index="0",name="Fake",uuid="GPU-00000000-fake"} 1.0' in metrics


LISTS_ANOTHER = """#!/bin/sh
case "$*" in
  *utilization.gpu*)
    while :; do echo "0, GPU-00000000-fake, 50, 10, 100, Fake"; echo "3, GPU-00000003-fake, 50, 10, 100, Fake"
                sleep 0.1; done ;;
  *) echo 0; echo 1; echo 2; echo 3 ;;
esac
"""


def test_gpus_nvidia_smi_does_not_list_are_warned_of(serve, fake_gpus, monkeypatch, caplog):
    fake_gpus.install(LISTS_ANOTHER)  # lists GPUs 0 and 3 of 4
    monkeypatch.setattr(gpus, "UNLISTED_AFTER_S", 0.3)
    with serve(GPUs="0,1") as server:
        wait_until(lambda: "does not list" in caplog.text, timeout=10, what="the warning")
        time.sleep(0.5)
        stats = request(server.url + "/stats")[2]
        metrics = http("GET", server.url + "/metrics")[2]
        report = es.bench(server.url, {"value": 1}, concurrency=[1], duration=1.0, warmup=0, progress=False)
    assert [g["gpu"] for g in stats["gpus"]] == [0]
    # the bench's GPU column holds the GPU read, and a note says which was not
    assert list(report.runs[0].gpu_util or {}) == ["0"]
    assert any("did not read every GPU (nvidia-smi does not list GPU 1" in note for note in report.notes), report.notes
    assert logged(caplog, "GPU monitoring: nvidia-smi does not list GPU 1 (CUDA_VISIBLE_DEVICES entry 1)") == 1
    # said where a look at /stats or an alert finds it, not only in the log (it read as "up")
    assert stats["gpu_monitoring"] == {"up": False,
                                       "problem": "nvidia-smi does not list GPU 1 (CUDA_VISIBLE_DEVICES entry 1)"}
    assert "easyserve_gpu_monitoring_up 0.0" in metrics


def test_bench_reports_each_gpus_mean_utilisation_over_the_measurement(serve, fake_gpus):
    fake_gpus(2)
    fake_gpus.level(0, 90)  # busy before the measurement: not the measurement's
    with serve(GPUs="0,1") as server:
        gpus_read(server, 2, sampled=1.0)
        fake_gpus.level(0, 30)
        wait_until(lambda: request(server.url + "/stats")[2]["gpus"][0]["utilization"] == 0.3,
                   what="a reading at 30%")  # past the last reading at 90%
        report = es.bench(server.url, {"value": 1}, concurrency=[2], duration=1.5, warmup=0.2, progress=False)
    [run] = report.runs
    assert run.errors == 0
    assert run.gpu_util == {"0": pytest.approx(0.30, abs=1e-3), "1": pytest.approx(0.35, abs=1e-3)}
    assert run.row()["gpu0_util"] == run.gpu_util["0"]
    html = report._repr_html_()
    assert ">GPU %</th>" in html and ">32</td>" in html  # the mean of the two, in percent
    assert "GPU %: the mean utilisation" in html


def test_bench_without_gpus_has_no_gpu_column(serve):
    with serve() as server:
        report = es.bench(server.url, {"value": 1}, concurrency=[1], requests=20, warmup=0, progress=False)
    assert report.runs[0].gpu_util is None and "GPU %" not in report._repr_html_()


def test_the_dashboard_shows_each_gpus_utilisation_and_memory(serve, fake_gpus):
    fake_gpus(1)
    with serve(GPUs="0") as server:
        gpus_read(server)
        shown = dashboard_html(server)
    assert "GPU 0" in shown and "30% · 1.0/80 GiB" in shown


def test_every_front_reports_the_gpus_with_http_workers(serve, fake_gpus):
    fake_gpus(1)
    with serve(GPUs="0", HttpWorkers=2) as server:
        gpus_read(server)
        scrapes = [http("GET", server.url + "/metrics")[2] for _ in range(6)]  # spread over both fronts
    for metrics in scrapes:
        assert 'easyserve_gpu_utilization_ratio{gpu="0"} 0.3' in metrics


LOSES_ONE = """#!/bin/sh
case "$*" in
  *utilization.gpu*)
    while :; do
      echo "0, GPU-00000000-fake, 30, 1000, 81559, Fake"
      if [ -e {listed} ]; then echo "1, GPU-00000001-fake, 35, 1001, 81559, Fake"
      else echo "Unable to determine the device handle for GPU 0000:41:00.0: GPU is lost"; fi
      sleep 0.1
    done ;;
  *) echo 0; echo 1 ;;
esac
"""


def test_a_gpu_whose_lines_stop_has_its_numbers_unknown_and_said_once(serve, fake_gpus, monkeypatch, caplog, tmp_path):
    # a GPU lost from the bus, the other still read: its last numbers stayed on /stats and /metrics as
    # current, and nothing was logged
    listed = tmp_path / "gpu1-listed"
    listed.touch()
    fake_gpus.install(LOSES_ONE.format(listed=listed))
    with caplog.at_level(logging.INFO, logger="easyserve"), serve(GPUs="0,1") as server:
        assert [g["utilization"] for g in gpus_read(server, 2)] == [0.3, 0.35]
        listed.unlink()
        wait_until(lambda: request(server.url + "/stats")[2]["gpus"][1]["utilization"] is None, 10, "GPU 1 unknown")
        metrics = http("GET", server.url + "/metrics")[2]
        assert 'easyserve_gpu_utilization_ratio{gpu="1"}' not in metrics
        assert 'easyserve_gpu_utilization_ratio{gpu="0"} 0.3' in metrics
        # /stats and /metrics say it too, not only the log: "up", for a GPU lost
        assert "easyserve_gpu_monitoring_up 0.0" in metrics
        assert request(server.url + "/stats")[2]["gpu_monitoring"] == {
            "up": False, "problem": "nvidia-smi does not list GPU 1 (CUDA_VISIBLE_DEVICES entry 1) (it said: Unable "
                                    "to determine the device handle for GPU 0000:41:00.0: GPU is lost)"}
        time.sleep(1)
        assert logged(caplog, "nvidia-smi no longer lists GPU 1 (CUDA_VISIBLE_DEVICES entry 1)") == 1
        assert "(it said: Unable to determine the device handle for GPU 0000:41:00.0: GPU is lost)" in caplog.text
        listed.touch()
        wait_until(lambda: request(server.url + "/stats")[2]["gpus"][1]["utilization"] == 0.35, 10, "GPU 1 back")
        assert logged(caplog, "nvidia-smi lists GPU 1 again") == 1


def test_a_server_held_for_longer_than_a_gpus_silence_drops_no_gpu(serve, fake_gpus, caplog):
    """Held 2 s (a paused server process, a long stall), the server read the GPUs' lines waiting in the
    pipe one at a time: judged by GPU 0's, GPU 1 had been silent 2 s, and was said to be lost, then found
    again a millisecond later. A warning that pages someone, from every pause."""
    fake_gpus(2)
    with caplog.at_level(logging.INFO, logger="easyserve"), serve(GPUs="0,1") as server:
        gpus_read(server, 2)
        server._loop.call_soon_threadsafe(time.sleep, 2.0)  # the server's loop held; nvidia-smi writes on
        time.sleep(2.5)
        assert [g["utilization"] for g in gpus_read(server, 2)] == [0.3, 0.35]
    assert logged(caplog, "no longer lists GPU") == 0 and logged(caplog, "lists GPU 1 again") == 0


ONLY_ERRORS = """#!/bin/sh
case "$*" in
  *utilization.gpu*)
    while :; do echo "Unable to determine the device handle for GPU 0000:01:00.0: Unknown Error"; sleep 0.1; done ;;
  *) echo 0 ;;
esac
"""

ONE_LINE_THEN_EXIT = """#!/bin/sh
case "$*" in
  *utilization.gpu*) echo "0, GPU-00000000-fake, 30, 1000, 81559, Fake" ;;
  *) echo 0 ;;
esac
"""


def test_an_nvidia_smi_that_never_reads_a_gpu_or_dies_after_each_line_is_said_once(serve, fake_gpus, monkeypatch,
                                                                                   caplog):
    # one that printed only its errors was never logged; one that printed a line and exited logged a
    # recovery and a failure every RETRY_S, for ever
    monkeypatch.setattr(gpus, "UNLISTED_AFTER_S", 0.5)
    monkeypatch.setattr(gpus, "RETRY_S", 0.2)
    fake_gpus.install(ONLY_ERRORS)
    with caplog.at_level(logging.INFO, logger="easyserve"), serve(GPUs="0"):
        wait_until(lambda: logged(caplog, "does not list GPU 0") == 1, 10, "the warning")
    assert "(it said: Unable to determine the device handle for GPU 0000:01:00.0: Unknown Error)" in caplog.text
    caplog.clear()
    fake_gpus.install(ONE_LINE_THEN_EXIT)
    with caplog.at_level(logging.INFO, logger="easyserve"), serve(GPUs="0"):
        time.sleep(3)  # about a dozen runs
    assert logged(caplog, "GPU monitoring: nvidia-smi exited") == 1 and logged(caplog, "answers again") == 0


HANGS = """#!/bin/sh
case "$*" in
  *utilization.gpu*)
    echo $$ >> {pids}
    echo "0, GPU-00000000-fake, 97, 10, 100, Fake"
    sleep 0.2
    echo "0, GPU-00000000-fake, 97, 10, 100, Fake"
    exec sleep 1000 ;;
  *) echo 0 ;;
esac
"""


def test_a_silent_nvidia_smi_is_stopped_and_its_last_numbers_not_shown_as_current(serve, fake_gpus, monkeypatch,
                                                                                   caplog, tmp_path):
    pids = tmp_path / "hung"
    fake_gpus.install(HANGS.format(pids=pids))
    monkeypatch.setattr(gpus, "SILENT_S", 0.5)
    monkeypatch.setattr(gpus, "RETRY_S", 30.0)
    with serve(GPUs="0") as server:
        wait_until(lambda: "printed nothing for 0.5s" in caplog.text, timeout=10, what="the warning")
        found = request(server.url + "/stats")[2]["gpus"]
        metrics = http("GET", server.url + "/metrics")[2]
        [pid] = map(int, pids.read_text().split())
        wait_until(lambda: not _alive(pid), timeout=5, what="the hung nvidia-smi to be killed")
    assert found[0]["name"] == "Fake" and found[0]["utilization"] is None and found[0]["memory_used_bytes"] is None
    assert found[0]["sampled_s"] > 0.1  # what was measured stays counted
    assert found[0]["busy_s"] == pytest.approx(0.97 * found[0]["sampled_s"], abs=1e-5)
    assert "easyserve_gpu_utilization_ratio{" not in metrics
    assert "easyserve_gpu_monitoring_up 0.0" in metrics  # why they are missing, for an alert to see


def test_mig_instances_are_not_monitored(serve, fake_gpus, monkeypatch, caplog):
    fake_gpus(1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-4f3c2a10-0d2e-5b8f-9a41-7c6d2e1b0a99")
    caplog.set_level(logging.INFO, logger="easyserve")
    with serve(GPUs="0") as server:
        assert [w["cuda_visible_devices"] for w in server.workers] == ["MIG-4f3c2a10-0d2e-5b8f-9a41-7c6d2e1b0a99"]
        time.sleep(0.3)
        stats = request(server.url + "/stats")[2]
    assert stats["gpus"] == [] and fake_gpus.monitors() == []
    assert "MIG instances (GPU 0 MIG-4f3c2a10-0d2e-5b8f-9a41-7c6d2e1b0a99) are not monitored" in caplog.text


def test_workers_number_gpus_as_nvidia_smi_does_unless_told_otherwise(serve, fake_gpus, monkeypatch):
    fake_gpus(1)
    with serve(GPUs="0") as server:
        [pid] = [w["pid"] for w in server.workers]
        assert environment(pid).get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID"
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")  # the user's choice is kept
    with serve(GPUs="0") as server:
        [pid] = [w["pid"] for w in server.workers]
        assert environment(pid).get("CUDA_DEVICE_ORDER") == "FASTEST_FIRST"


def environment(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        entries = f.read().split(b"\0")
    return dict(entry.decode().split("=", 1) for entry in entries if b"=" in entry)


def test_csv_leaves_an_unknown_gpu_utilisation_empty_and_absent_counts_zero(tmp_path):
    path = tmp_path / "runs.csv"
    write_csv(path, [{"concurrency": 1, "status_200": 5, "gpu0_util": 0.42}, {"concurrency": 8, "status_503": 2}])
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows == [{"concurrency": "1", "status_200": "5", "gpu0_util": "0.42", "status_503": "0"},
                    {"concurrency": "8", "status_200": "0", "gpu0_util": "", "status_503": "2"}]


def test_a_sweep_on_gpus_plots_their_utilisation(fake_gpus, tmp_path):
    pytest.importorskip("matplotlib")
    fake_gpus(1)
    report = es.sweep("handles_for_tests:Recorder", {"value": 1}, GPUs="0", process_per_gpu=[1], max_batch_size=[1, 4],
                      concurrency=[2], duration=1.0, warmup=0.6, progress=False)
    assert [run.gpu_util for run in report.runs] == [{"0": pytest.approx(0.3, abs=1e-3)}] * 2
    figure = report.plot(tmp_path / "sweep.png")
    rate, p99, gpu = figure.axes
    assert gpu.get_ylabel() == "GPU utilisation (%)" and gpu.get_xlabel() == "ProcessPerGPU x MaxBatchSize"
    assert list(gpu.lines[0].get_ydata()) == pytest.approx([30, 30], abs=0.1)
    assert ">GPU %</th>" in report._repr_html_()


def test_the_monitor_stops_though_its_read_completes_as_it_is_cancelled(tmp_path, caplog):
    """On Python 3.10 and 3.11, asyncio.wait_for loses a cancel that lands in the loop turn its read
    completes: the monitor read on, and a server's stop waited for it for ever (a CI run hung there).
    An nvidia-smi that prints without pause makes that turn the usual one; every stop must end it."""
    flood = tmp_path / "nvidia-smi"
    flood.write_text('#!/bin/sh\nwhile :; do echo "0, GPU-00000000-fake, 30, 1000, 81559, Fake GPU, 80GB"; done\n')
    flood.chmod(0o755)
    caplog.set_level(logging.WARNING, logger="easyserve")

    async def cycles() -> list[bool]:
        ended = []
        for _ in range(30):
            monitor = gpus.GpuMonitor({0: "0"}, command=str(flood))
            monitor.start()
            await asyncio.sleep(0.05)
            task = monitor._task
            await monitor.stop()
            ended.append(task.done())
        return ended

    assert asyncio.run(cycles()) == [True] * 30
    assert "did not stop within" not in caplog.text


def test_gpus_a_machine_lacks_become_as_many_cpu_workers_as_its_cores_keep_busy(fake_gpus, monkeypatch, caplog):
    """Each GPU id the machine lacked became ProcessPerGPU CPU workers: an 8-GPU config with ProcessPerGPU 8
    started 64 workers on a laptop, each with a copy of the model; and any id up to 999,999,999 was taken."""
    from easyserve import devices
    from easyserve.config import Config

    fake_gpus(1)
    monkeypatch.setattr(devices, "cpu_count", lambda: 4)
    with caplog.at_level(logging.WARNING, logger="easyserve"):  # none of them here: a config for another machine
        names = [spec.name for spec in devices.plan(Config.from_dict({"GPUs": "1,2,3,4,5,6,7",
                                                                       "ProcessPerGPU": 2}))]
    assert sorted(names) == ["cpu/0", "cpu/1", "cpu/2", "cpu/3"], names
    assert "those workers run on CPU instead (4 of them, not 14: this machine's 4 cores would be shared" in caplog.text
    with pytest.raises(ConfigError, match=r"^GPUs: got '0,64'; expected .*, each below 64$"):
        Config.from_dict({"GPUs": "0,64"})


def test_a_gpu_worker_whose_onnx_runtime_runs_on_the_cpu_says_so(serve, fake_gpus, caplog):
    """ONNX Runtime falls back to the CPU when its CUDA provider is missing or fails to load (libraries of
    another CUDA, as here, where onnxruntime-gpu finds no CUDA): the worker served from the CPU with its
    small share of the cores, its ready line and /stats said CUDA, and ONNX Runtime's own error was a
    print, at INFO, with its terminal colours written out."""
    import onnxruntime

    fake_gpus(1)
    with serve("easyserve.builtin:Demo", GPUs=[0]) as server:
        status, answer = post_json(server.url + "/predict", {"x": [5.1, 3.5, 1.4, 0.2]})
        workers = server.workers
    assert status == 200 and answer["label"] == "setosa"
    assert [w["onnx_providers"] for w in workers] == [["CPUExecutionProvider"]]
    records = caught(caplog)
    said = [r.getMessage() for r in records if r.levelno == logging.WARNING and "on the CPU" in r.getMessage()]
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():  # onnxruntime-gpu: it failed to load
        why = ("its CUDA provider failed to load (ONNX Runtime's error is above: the CUDA and cuDNN it needs are "
               "not those installed)")
        failed = [r.getMessage() for r in records if ":onnxruntime:" in r.getMessage()]
        assert any(r.levelno == logging.ERROR and "[E:onnxruntime:" in r.getMessage() for r in records), failed
        assert not any("\x1b" in m or "\\x1b" in m or m.endswith("] ") for m in failed), failed
    else:
        why = "the onnxruntime installed has no CUDA provider (pip install onnxruntime-gpu, in place of onnxruntime)"
    assert len(said) == 1 and said[0].endswith(
        f"gpu0/0 [{workers[0]['pid']}] easyserve: ONNX Runtime runs this GPU worker's model on the CPU: {why}"), said


def test_a_session_a_gpu_worker_asks_to_run_on_the_cpu_is_no_fallback(serve, fake_gpus, caplog):
    fake_gpus(1)
    with serve("handles_for_tests:CpuSideModel", GPUs=[0]) as server:
        workers = server.workers
    assert [w["onnx_providers"] for w in workers] == [["CPUExecutionProvider"]]
    assert not [r for r in caught(caplog) if "on the CPU" in r.getMessage()]
