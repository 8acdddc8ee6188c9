"""The ``easyserve`` command. ``easyserve run CONFIG`` serves a handle; flags override the file."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from .config import Config
from .errors import ConfigError, StartupError

app = typer.Typer(
    help="Serve deep-learning models over HTTP: GPU worker pools, dynamic batching, crash-safe workers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

log = logging.getLogger("easyserve")


@app.callback()
def _root() -> None:
    """Serve deep-learning models over HTTP: GPU worker pools, dynamic batching, crash-safe workers.

    Start with `easyserve run` (a built-in demo model) or `easyserve run CONFIG.yaml`.
    """


@app.command()
def run(
    config: Optional[Path] = typer.Argument(
        None, help="YAML config (GPUs, ProcessPerGPU, Handle, ...). Omit it to serve the built-in demo model."
    ),
    host: Optional[str] = typer.Option(None, help="Address to bind (Host, default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, help="Port; 0 picks a free one (Port, default 9876)."),
    gpus: Optional[str] = typer.Option(None, help='GPU ids "0,1", "cpu" or "auto" (GPUs).'),
    process_per_gpu: Optional[int] = typer.Option(None, help="Worker processes per GPU (ProcessPerGPU)."),
    handle: Optional[str] = typer.Option(
        None, help='Handle class: "Name", "module:Class" or "file.py:Class" (Handle).'
    ),
    max_batch_size: Optional[int] = typer.Option(None, help="Largest batch given to forward (MaxBatchSize)."),
    max_wait_ms: Optional[float] = typer.Option(None, help="Longest a batch waits to fill (MaxWaitMs)."),
    max_queue_size: Optional[int] = typer.Option(None, help="Requests that may wait; more get 429 (MaxQueueSize)."),
    timeout_s: Optional[float] = typer.Option(None, help="Queue wait plus run time before 504 (TimeoutS)."),
    max_body_mb: Optional[float] = typer.Option(None, help="Largest request body; more get 413 (MaxBodyMB)."),
    log_level: str = typer.Option("info", help="debug, info, warning or error."),
    supervise: bool = typer.Option(
        False, "--supervise", help="Restart the whole server if its process dies (with backoff)."
    ),
) -> None:
    """Serve a handle until Ctrl-C or SIGTERM (which drain requests in flight first). SIGHUP re-reads
    CONFIG and replaces the workers one at a time with its Handle and HandleArgs, without downtime.

    Set EASYSERVE_API_KEY (or ApiKey in the config) to require "Authorization: Bearer <key>".
    """
    from .server import Server

    _setup_logging(log_level)
    _stop_with_supervisor()
    overrides = {
        "Host": host, "Port": port, "GPUs": gpus, "ProcessPerGPU": process_per_gpu, "Handle": handle,
        "MaxBatchSize": max_batch_size, "MaxWaitMs": max_wait_ms, "MaxQueueSize": max_queue_size,
        "TimeoutS": timeout_s, "MaxBodyMB": max_body_mb,
    }
    if supervise:
        from .supervisor import supervise as run_supervised

        args = [str(config)] if config is not None else []
        for key, value in overrides.items():
            if value is not None:
                args += [_FLAGS[key], str(value)]
        raise typer.Exit(run_supervised([*args, "--log-level", log_level]))
    try:
        if config is None:
            cfg = Config.from_dict({k: v for k, v in overrides.items() if v is not None})
            server = Server(cfg)
        else:  # kept as file and overrides, so that SIGHUP re-reads the file
            server = Server.from_yaml(config, **{k: v for k, v in overrides.items() if v is not None})
        server.serve_forever()
    except ConfigError as exc:
        _fail(f"config error: {exc}", code=2)
    except StartupError as exc:
        _fail(f"could not start: {exc}", code=1)


def _stop_with_supervisor() -> None:
    # Run under --supervise, the server drains and stops if its guardian is killed, rather than
    # holding the port with nobody to restart it.
    import os
    import signal

    from .supervisor import SUPERVISOR_ENV
    from .worker import die_with_parent

    guardian = os.environ.pop(SUPERVISOR_ENV, None)
    if guardian and guardian.isdigit():
        die_with_parent(int(guardian), signal.SIGTERM)


_FLAGS = {
    "Host": "--host", "Port": "--port", "GPUs": "--gpus", "ProcessPerGPU": "--process-per-gpu", "Handle": "--handle",
    "MaxBatchSize": "--max-batch-size", "MaxWaitMs": "--max-wait-ms", "MaxQueueSize": "--max-queue-size",
    "TimeoutS": "--timeout-s", "MaxBodyMB": "--max-body-mb",
}


def _setup_logging(level: str) -> None:
    numeric = getattr(logging, level.upper(), None)
    if not isinstance(numeric, int):
        _fail(f"--log-level: got {level!r}; expected debug, info, warning or error", code=2)
    logging.basicConfig(level=numeric, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _fail(message: str, code: int) -> None:
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


from .models import models_app  # noqa: E402  (light: it imports ONNX only when a command runs)

app.add_typer(models_app, name="models", help="Download the example models, or build offline stand-ins.")


@app.command()
def predict(
    url: str = typer.Argument(..., help="The server, e.g. http://127.0.0.1:9876 (/predict is added)."),
    file: Optional[str] = typer.Argument(
        None, help="A file to send as it is (an image); a .json file is sent as JSON; - reads standard input."
    ),
    data: Optional[str] = typer.Option(
        None, "--data", "-d", help='A JSON object to send, e.g. \'{"x": [5.1, 3.5, 1.4, 0.2]}\'; with FILE, '
        'its fields go along with the file (base64 under "img").'
    ),
    timeout: float = typer.Option(60.0, help="Seconds to wait for the answer."),
    api_key: Optional[str] = typer.Option(None, help="For a server with an ApiKey (default: $EASYSERVE_API_KEY)."),
) -> None:
    """Send one request to a running server and print its JSON answer."""
    from .client import run_predict

    raise typer.Exit(run_predict(url, file, data, timeout, api_key))


@app.command("gen-nginx")
def gen_nginx(
    hosts: Path = typer.Argument(..., help="The servers, one host:port a line, then an optional weight; # comments."),
    listen: str = typer.Option("8080", help="Where nginx listens: a port, or address:port."),
    server_name: str = typer.Option("_", help="nginx server_name: the public host name(s); _ answers any."),
    config: Optional[Path] = typer.Option(
        None, help="The servers' easyserve config: the body limit and timeouts follow its MaxBodyMB, "
        "TimeoutS and KeepAliveTimeoutS (and its Port is used for lines with no port)."
    ),
    balancing: str = typer.Option("least_conn", help="least_conn, round_robin, ip_hash or random."),
    max_fails: int = typer.Option(3, help="Failures within --fail-timeout that take a server out."),
    fail_timeout: int = typer.Option(10, help="Seconds a failed server is left out (and the failures' window)."),
    upstream: str = typer.Option("easyserve", help="The upstream's name (two configs in one nginx need two)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write here rather than to standard output."),
) -> None:
    """Write an nginx config that balances requests over several easyserve servers, with failover."""
    from .nginx import HostsError, NginxSettings, parse_hosts, render

    try:
        settings = {"listen": listen, "server_name": server_name, "balancing": balancing, "max_fails": max_fails,
                    "fail_timeout_s": fail_timeout, "upstream": upstream,
                    "source": "easyserve gen-nginx " + " ".join(sys.argv[2:])}
        if config is not None:
            cfg = Config.from_yaml(config)
            nginx_settings = NginxSettings.from_config(cfg, **settings)
            default_port = cfg.port
        else:
            nginx_settings, default_port = NginxSettings(**settings), Config.port
        try:
            text = hosts.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read {hosts}: {exc.strerror}") from None
        backends = parse_hosts(text, default_port)
        rendered = render(backends, nginx_settings)
    except HostsError as exc:
        _fail("\n".join(f"{hosts} {problem}" for problem in str(exc).splitlines()), code=2)
    except ConfigError as exc:
        _fail(f"gen-nginx: {exc}", code=2)
    if output is None:
        sys.stdout.write(rendered)
        return
    output.write_text(rendered)
    typer.echo(f"wrote {output}: nginx in front of {len(backends)} server(s), listening on {listen}.\n"
               f"On the nginx machine, put it in /etc/nginx/conf.d/{upstream}.conf, then check it and reload:\n"
               "    sudo nginx -t && sudo nginx -s reload", err=True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
