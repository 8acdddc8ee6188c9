"""The Dockerfile and docker-compose.yml agree with the package: no Docker engine runs here, so these
check what can go stale (the entry point, the paths, the ports, the nginx config gen-nginx makes)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from conftest import http
from typer.testing import CliRunner

from easyserve.cli import app
from easyserve.config import Config
from easyserve.nginx import parse_hosts
from easyserve.server import DRAIN_MARGIN_S

ROOT = Path(__file__).parent.parent


def dockerfile() -> dict[str, list[str]]:
    """Each instruction of the Dockerfile (continuation lines joined), by keyword, in order."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            found.setdefault(keyword.upper(), []).append(rest.strip())
    return found


def exec_form(value: str) -> list[str]:
    return json.loads(value)


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_the_image_installs_as_the_readme_does_and_runs_as_a_user():
    docker = dockerfile()
    assert docker["FROM"][0].startswith("nvidia/cuda:") and "runtime" in docker["FROM"][0]
    readme = (ROOT / "README.md").read_text()
    install = re.search(r"```bash\n(pip install -e \.) && easyserve run\n```", readme)[1]
    assert any(install in run for run in docker["RUN"])
    # a number: Kubernetes checks runAsNonRoot only against one, and refuses a pod whose image names its user
    uid, _, gid = docker["USER"][-1].partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit()
    assert any("useradd" in run and f"--uid {uid}" in run for run in docker["RUN"])
    # what the installed package needs is in the image
    for source in docker["COPY"]:
        *paths, _ = source.split()
        for path in paths:
            assert (ROOT / path).exists(), f"COPY {path}: not in the repository"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "models" in ignored and ".venv" in ignored  # big and machine-specific: never sent to the builder


# the first onnxruntime-gpu on PyPI built for CUDA 13 (its wheel's extras name the CUDA libraries it needs)
FIRST_FOR_CUDA_13 = (1, 27)


def test_the_images_onnxruntime_gpu_is_one_built_for_its_cuda():
    """onnxruntime-gpu 1.27 on is built for CUDA 13: installed unpinned on the CUDA 12 base image, its CUDA
    provider could not load, and every model ran on the CPU, reported as on the GPU."""
    docker = dockerfile()
    cuda = int(re.match(r"nvidia/cuda:(\d+)\.", docker["FROM"][0])[1])
    install = next(run for run in docker["RUN"] if "pip install -e ." in run)
    bound = re.search(r'"onnxruntime-gpu<(\d+)\.(\d+)" > (\S+) .* PIP_CONSTRAINT=(\S+) pip install -e \.', install)
    assert bound and bound[3] == bound[4], install
    assert cuda == 12 and (int(bound[1]), int(bound[2])) == FIRST_FOR_CUDA_13, f"CUDA {cuda}: {install}"
    assert "libonnxruntime_providers_cuda.so" in install and "exit 1" in install  # a provider lacking a library
    assert any(env.startswith("XDG_CACHE_HOME=/tmp/") for env in docker["ENV"])


def test_the_entry_point_serves_a_config_on_the_exposed_port_with_a_health_check_on_ready():
    docker = dockerfile()
    init, separator, *entry = exec_form(docker["ENTRYPOINT"][0])
    # an init as process 1, which reaps orphans: easyserve as process 1 left a killed worker's children zombies
    assert (init, separator) == ("tini", "--") and any("install" in run and " tini" in run for run in docker["RUN"])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entry[0] in scripts and entry[1] == "run"
    assert entry[entry.index("--host") + 1] == "0.0.0.0"
    port = entry[entry.index("--port") + 1]
    assert docker["EXPOSE"] == [port]
    health = docker["HEALTHCHECK"][0]
    assert f"http://127.0.0.1:{port}/ready" in health and "--start-period" in health
    assert exec_form(docker["CMD"][-1]) == []  # no config: the built-in demo, which needs no model file
    # the flags the entry point passes are the CLI's, and a config given after them is its argument
    result = CliRunner().invoke(app, [*entry[1:], "--help"])
    assert result.exit_code == 0 and "CONFIG" in result.output


@pytest.mark.parametrize("path", ["Dockerfile", "docs/operations.md"])
def test_the_docker_run_line_gives_a_drain_its_time(path):
    """Docker kills a container 10 s after docker stop's SIGTERM by default: the documented line, a
    config of TimeoutS 30, cut short the requests a drain would have answered."""
    text = re.sub(r"\\\n#?\s*", " ", (ROOT / path).read_text())
    [line] = [line for line in text.splitlines() if "docker run " in line]
    args = shlex.split(line.lstrip("# "))
    config = Config.from_yaml(ROOT / "configs" / Path(args[-1]).name)
    assert int(args[args.index("--stop-timeout") + 1]) > config.timeout_s + DRAIN_MARGIN_S


def test_compose_runs_two_replicas_of_the_image_behind_nginx():
    services = compose()["services"]
    replicas = {name: s for name, s in services.items() if s.get("build") == "."}
    assert len(replicas) == 2
    for name, service in replicas.items():
        mounts = {inside: outside for outside, inside, *_ in (v.split(":") for v in service["volumes"])}
        config = service["command"][-1]
        inside = next(m for m in mounts if config.startswith(m + "/"))
        local = ROOT / mounts[inside] / Path(config).relative_to(inside)
        assert local.is_file(), f"{name} serves {config}, which is {local}: missing"
        assert "/app/models" in mounts  # the image's working directory's models/, where HandleArgs look
        grace = int(service["stop_grace_period"].rstrip("s"))
        assert grace > Config.from_yaml(local).timeout_s + DRAIN_MARGIN_S  # a drain is never cut short
    nginx = services["nginx"]
    assert set(nginx["depends_on"]) == set(replicas)
    conf = next(v.split(":")[0] for v in nginx["volumes"] if v.split(":")[1].startswith("/etc/nginx/conf.d/"))
    text = (ROOT / conf).read_text()
    listen = re.search(r"listen (\d+);", text)[1]
    assert any(p.split(":")[-1] == listen for p in nginx["ports"])
    upstreams = re.findall(r"^\s*server (\S+?)[ ;](?!.*backup)", text, re.M)  # the backups list them again
    port = exec_form(dockerfile()["ENTRYPOINT"][0])[-1]
    assert sorted(upstreams) == sorted(f"{name}:{port}" for name in replicas)


def test_the_compose_nginx_config_is_what_gen_nginx_makes():
    conf = ROOT / "deploy/nginx/easyserve.conf"
    hosts = ROOT / "deploy/nginx/hosts.txt"
    command = next(line for line in hosts.read_text().splitlines() if "easyserve gen-nginx" in line)
    args = shlex.split(command.split("easyserve gen-nginx", 1)[1])
    assert args[args.index("-o") + 1] == "deploy/nginx/easyserve.conf"
    args[args.index("-o"):args.index("-o") + 2] = []
    made = subprocess.run([sys.executable, "-m", "easyserve.cli", "gen-nginx", *args], capture_output=True,
                          text=True, cwd=ROOT, check=True).stdout
    without_command = [line for line in made.splitlines() if "easyserve gen-nginx " not in line]
    assert without_command == [line for line in conf.read_text().splitlines() if "easyserve gen-nginx " not in line]
    assert len(parse_hosts(hosts.read_text())) == 2


@pytest.mark.parametrize("path", ["Dockerfile", "docker-compose.yml", "deploy/nginx/easyserve.conf"])
def test_the_deploy_files_are_documented(path):
    assert path in (ROOT / "README.md").read_text()


# -- KServe ----------------------------------------------------------------------------------------------


def kserve(name: str) -> dict:
    return yaml.safe_load((ROOT / "deploy/kserve" / name).read_text())


def test_the_kserve_runtime_runs_the_image_on_its_port_with_v2_probes(serve):
    runtime = kserve("servingruntime.yaml")
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1" and runtime["kind"] == "ServingRuntime"
    spec = runtime["spec"]
    assert spec["protocolVersions"] == ["v2"] and spec["multiModel"] is False
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"  # the name KServe merges the predictor's settings into
    entry = exec_form(dockerfile()["ENTRYPOINT"][0])
    port = int(entry[entry.index("--port") + 1])
    assert [p["containerPort"] for p in container["ports"]] == [port]
    assert spec["annotations"]["prometheus.kserve.io/port"] == str(port)
    # the image's entry point with the runtime's arguments is a command the CLI takes
    result = CliRunner().invoke(app, [*entry[entry.index("easyserve") + 1:], *container["args"], "--help"])
    assert result.exit_code == 0, result.output
    assert container["args"][-1].startswith("/mnt/models/")  # where KServe puts the storageUri's files
    probes = {kind: container[kind]["httpGet"] for kind in ("readinessProbe", "livenessProbe", "startupProbe")}
    assert {probe["port"] for probe in probes.values()} == {port}
    with serve("handles_for_tests:Recorder") as server:  # each probe's path answers 200 on a ready server
        for kind, probe in probes.items():
            assert http("GET", server.url + probe["path"])[0] == 200, (kind, probe["path"])
        assert http("GET", server.url + spec["annotations"]["prometheus.kserve.io/path"])[0] == 200
    assert probes["readinessProbe"]["path"] == "/v2/health/ready"  # the one that says "not ready" while loading


def test_the_inference_service_uses_the_runtime_and_drains_within_its_grace_period():
    runtime, service = kserve("servingruntime.yaml"), kserve("inferenceservice.yaml")
    assert service["apiVersion"] == "serving.kserve.io/v1beta1" and service["kind"] == "InferenceService"
    predictor = service["spec"]["predictor"]
    model = predictor["model"]
    assert model["runtime"] == runtime["metadata"]["name"] and model["protocolVersion"] == "v2"
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    args = runtime["spec"]["containers"][0]["args"]
    config_path = ROOT / "deploy/kserve/model" / Path(args[-1]).name
    config = Config.from_yaml(config_path)
    # /v2/models/<the InferenceService's name>: KServe puts it in the runtime's arguments, for any service
    assert "--model-name={{.Name}}" in args and "ModelName:" not in config_path.read_text()
    assert str(config.handle_args["model"]).startswith("/mnt/models/")
    # after ShutdownDelayS, a drain answers what is in flight, which takes at most TimeoutS (and a margin),
    # then the server exits; Knative sets the grace period from the timeout (and refuses
    # terminationGracePeriodSeconds), RawDeployment has Kubernetes' 30 s
    stopping = config.shutdown_delay_s + config.timeout_s + DRAIN_MARGIN_S
    assert "terminationGracePeriodSeconds" not in predictor
    assert predictor["timeout"] >= stopping + 5 and stopping < 30
    assert config.shutdown_delay_s > 0  # RawDeployment's Service may still send connections after SIGTERM
    # the runtime's prometheus.kserve.io annotations reach the pod only where the service asks for scraping
    assert service["metadata"]["annotations"]["serving.kserve.io/enable-prometheus-scraping"] == "true"
