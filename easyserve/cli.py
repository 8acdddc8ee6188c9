"""The ``easyserve`` command. ``easyserve run CONFIG`` serves a handle; flags override the file."""

from __future__ import annotations

import logging
import shlex
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from . import records
from .config import Config
from .errors import ConfigError, StartupError
from .logs import VISIBLE

# a key on the command line is in every user's `ps`: the environment is the process's own
API_KEY_HELP = ("For a server with an ApiKey. Better given in $EASYSERVE_API_KEY, the default: a key on the "
                "command line is seen by every user of the machine (ps).")
FLAG = ""  # the metavar of an option that takes no value: typer's help wrote <bool>, read as one to give
app = typer.Typer(
    help="Serve deep-learning models over HTTP: GPU worker pools, dynamic batching, crash-safe workers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

log = logging.getLogger("easyserve")

LOG_FLUSH_S = 2.0  # how long an exiting command waits for a log's writer that writes nothing
MAX_HOSTS_BYTES = 2**20  # a hosts file lists servers, a line each; a larger file is something else


def _version(asked: bool) -> None:
    if asked:
        from . import __version__

        typer.echo(f"easyserve {__version__} (Python {sys.version.split()[0]})")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, metavar=FLAG,
                                       help="Print easyserve's version and exit.")) -> None:
    """Serve deep-learning models over HTTP: GPU worker pools, dynamic batching, crash-safe workers.

    Start with `easyserve run` (a built-in demo model) or `easyserve run CONFIG.yaml`.
    """


# each command's one line in `easyserve --help`, where a docstring's line breaks were kept as they are
@app.command(short_help="Serve a handle until Ctrl-C or SIGTERM; SIGHUP reloads its handle without downtime.")
def run(
    config: Optional[Path] = typer.Argument(
        None, help="YAML config (GPUs, ProcessPerGPU, Handle, ...), or an .onnx model to serve as it is. "
        "Omit it to serve the built-in demo model."
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
    http_workers: Optional[int] = typer.Option(
        None, help="Processes serving HTTP on the port, all feeding one queue (HttpWorkers, default 1)."
    ),
    labels: Optional[Path] = typer.Option(
        None, help="An .onnx model's class names, one a line, for its top classes over /v2 (HandleArgs labels)."
    ),
    model_name: Optional[str] = typer.Option(
        None, help="The model's name in /v2/models/<name> (ModelName); under KServe, --model-name={{.Name}}."
    ),
    log_level: str = typer.Option("info", help="debug, info, warning, error or critical."),
    supervise: bool = typer.Option(
        False, "--supervise", metavar=FLAG, help="Restart the whole server if its process dies (with backoff)."
    ),
) -> None:
    """Serve a handle until Ctrl-C or SIGTERM (which drain requests in flight first). SIGHUP re-reads
    CONFIG and replaces the workers one at a time with its Handle and HandleArgs (and ModelName and ModelVersion, the
    v2 name it is served by), without downtime.

    Set EASYSERVE_API_KEY (or ApiKey in the config) to require "Authorization: Bearer <key>".
    """
    import signal

    from .server import Server
    from .signals import StoppedStarting

    if labels is not None and (config is None or config.suffix.lower() != ".onnx"):
        _fail("--labels applies to an .onnx model served as it is; in a config, set HandleArgs: {labels: FILE}",
              code=2)
    _setup_logging(log_level)
    # every record through the log's writer thread: with stderr a pipe nobody reads, a line logged while
    # starting, draining or restarting a server blocked that for good (see main())
    records.install(every_thread=True)
    supervised = _stop_with_supervisor()
    overrides = {
        "Host": host, "Port": port, "GPUs": gpus, "ProcessPerGPU": process_per_gpu, "Handle": handle,
        "MaxBatchSize": max_batch_size, "MaxWaitMs": max_wait_ms, "MaxQueueSize": max_queue_size,
        "TimeoutS": timeout_s, "MaxBodyMB": max_body_mb, "HttpWorkers": http_workers, "ModelName": model_name,
    }
    if supervise:
        from .supervisor import supervise as run_supervised

        # absolute: a relative path that begins with "-" read as an option in the supervised command
        args = [str(config.absolute())] if config is not None else []
        for key, value in overrides.items():
            if value is not None:
                args += [_FLAGS[key], str(value)]
        if labels is not None:
            args += ["--labels", str(labels.absolute())]
        _ignore_signals_once_stopped(False)  # what supervise() puts back as the guardian exits: its exit code
        raise typer.Exit(run_supervised([*args, "--log-level", log_level]))
    try:
        given = {k: v for k, v in overrides.items() if v is not None}
        if config is None:
            server = Server(Config.from_dict(given))
        elif config.suffix.lower() == ".onnx":  # served by OnnxModel (or by --handle, given its path)
            named = {"HandleArgs": {"labels": str(labels.absolute())}} if labels is not None else {}
            server = Server.from_onnx(config, **named, **given)
        else:  # kept as file and overrides, so that SIGHUP re-reads the file
            server = Server.from_yaml(config, **given)
        _ignore_signals_once_stopped(supervised)
        server.serve_forever(guardian=supervised)
    except ConfigError as exc:
        _fail(f"config error: {exc}", code=2)
    except StoppedStarting as exc:  # asked to stop (systemctl stop during a long model load): no failure
        log.info("%s", exc)
        raise typer.Exit(0 if exc.signum == signal.SIGTERM else 128 + exc.signum) from None
    except StartupError as exc:
        if supervised:
            from .supervisor import FAILED, tell_guardian

            tell_guardian(f"{FAILED} {(str(exc).strip().splitlines() or [''])[0]}")
        _fail(f"could not start: {exc}", code=1)


def _ignore_signals_once_stopped(supervised: bool) -> None:
    """What serve_forever() puts back once it has stopped, while this process exits: nothing. A SIGHUP
    (a reload sent to a stopping service) or a second SIGTERM that came then ended the process by the
    signal's default action after a clean drain: exit 129 or 143, a failed stop to systemd.

    Only signals serve_forever() catches while it serves: a child process inherits an ignored signal
    as ignored, but one caught by a handler as its default."""
    import signal

    from .supervisor import GUARDIAN_GONE, HURRY

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) + ((GUARDIAN_GONE, HURRY) if supervised else ()):
        signal.signal(sig, signal.SIG_IGN)


def _stop_with_supervisor() -> bool:
    # Run under --supervise, the server drains and stops if its guardian is killed, rather than
    # holding the port with nobody to restart it.
    import os
    import signal

    from .supervisor import GUARDIAN_GONE, SUPERVISOR_ENV, report_to_guardian
    from .worker import die_with_parent

    report_to_guardian()
    guardian = os.environ.pop(SUPERVISOR_ENV, None)
    if guardian and guardian.isdigit():
        # The guardian passes SIGHUP on as it comes, and started this process with it blocked: one
        # sent before serve_forever() reads it as "re-read the config" is dropped (the config is
        # read once it starts), rather than end this process by its default action, as a crash.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        die_with_parent(int(guardian), GUARDIAN_GONE)
    return bool(guardian)


_FLAGS = {
    "Host": "--host", "Port": "--port", "GPUs": "--gpus", "ProcessPerGPU": "--process-per-gpu", "Handle": "--handle",
    "MaxBatchSize": "--max-batch-size", "MaxWaitMs": "--max-wait-ms", "MaxQueueSize": "--max-queue-size",
    "TimeoutS": "--timeout-s", "MaxBodyMB": "--max-body-mb", "HttpWorkers": "--http-workers",
    "ModelName": "--model-name",
}


LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
              "critical": logging.CRITICAL}


def _setup_logging(level: str) -> None:
    numeric = LOG_LEVELS.get(level.lower())
    if numeric is None:  # logging's other names (notset, fatal, warn) went through, undocumented
        _fail(f"--log-level: got {level!r}; expected debug, info, warning, error or critical", code=2)
    # counted: before the command exits, a reader slow to take a long record is told from one that is gone
    handler = records.LogHandler(records.counted(sys.stderr))  # a record it cannot write is counted dropped
    handler.setFormatter(_Indented("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=numeric, handlers=[handler])


class _Indented(logging.Formatter):
    """The log's format, each line of a record after its first indented: a record's lines (a traceback, a
    handle's message quoting a client's text) went on as they came, and a line of a client's making, a
    timestamp and a level at its start, read as a record of the server's own, to a reader and to a log
    shipper that starts a record at each timestamp alike."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).translate(_LINE_BREAKS).replace("\n", "\n    ")


# where str.splitlines() breaks a line but "\n" does not, as a record's text shows it: a reader that splits
# so took a client's text after one for a record of the server's own
_LINE_BREAKS = {code: VISIBLE[code] for code in (0x0B, 0x0C, 0x0D, 0x1C, 0x1D, 0x1E, 0x85, 0x2028, 0x2029)}


def _fail(message: str, code: int) -> None:
    # after what was logged before it; in `easyserve run`, from the log's writer thread: with stderr a pipe
    # nobody reads, this write blocked the process for good, and a guardian waiting for it
    records.in_turn(lambda: typer.secho(message, fg=typer.colors.RED, err=True))
    raise typer.Exit(code)


from .models import models_app  # noqa: E402  (light: it imports ONNX only when a command runs)

app.add_typer(models_app, name="models", help="Download the example models, or build offline stand-ins.")


@app.command()
def predict(
    url: str = typer.Argument(..., help="The server, e.g. http://127.0.0.1:9876 (/predict is added)."),
    file: Optional[str] = typer.Argument(
        None, help="A file to send as it is (an image); a .json file is sent as JSON; - reads standard input "
        "(sent as JSON if it holds a JSON object, else as it is)."
    ),
    data: Optional[str] = typer.Option(
        None, "--data", "-d", help='A JSON object to send, e.g. \'{"x": [5.1, 3.5, 1.4, 0.2]}\'; with FILE, '
        'its fields go along with the file (base64 under "img").'
    ),
    timeout: float = typer.Option(60.0, help="Seconds to wait for the answer; 0 (or inf) waits for ever."),
    api_key: Optional[str] = typer.Option(None, help=API_KEY_HELP),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="Write the answer to this file: JSON, or the bytes of a binary answer (an image)."
    ),
    max_answer_mb: float = typer.Option(1024, help="The largest answer read, in MB; past it, an error (inf: no "
                                        "limit)."),
    header: Optional[List[str]] = typer.Option(
        None, "--header", "-H", help="A header to send, 'Name: value' (as curl's -H); again for more. A server's "
        "PassHeaders gives those it names to the handle."
    ),
    npy: bool = typer.Option(False, "--npy", help="Ask for an array answer as .npy (as an --output named .npy "
                             "does): written to --output, or to standard output where that is no terminal."),
) -> None:
    """Send one request to a running server and print its JSON answer (a binary answer: see --output)."""
    from .predict_cli import run_predict

    raise typer.Exit(run_predict(url, file, data, timeout, api_key, output, max_answer_mb, header or [], npy))


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
    access_log: str = typer.Option("/var/log/nginx/access.log", help="Where nginx logs each request, with the "
                                   "server that answered it and any it was tried on first (a path, "
                                   "syslog:server=..., or off)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write here rather than to standard output."),
) -> None:
    """Write an nginx config that balances requests over several easyserve servers, with failover."""
    from .nginx import BACKUP_BALANCING, NO_BACKUPS, HostsError, NginxSettings, parse_hosts, render

    try:
        settings = {"listen": listen, "server_name": server_name, "balancing": balancing, "max_fails": max_fails,
                    "fail_timeout_s": fail_timeout, "upstream": upstream, "access_log": access_log,
                    "source": "easyserve gen-nginx " + shlex.join(sys.argv[2:])}
        if config is not None:
            cfg = Config.from_yaml(config)
            nginx_settings = NginxSettings.from_config(cfg, **settings)
            default_port = cfg.port
        else:
            nginx_settings, default_port = NginxSettings(**settings), Config.port
        try:
            with open(hosts, "rb") as f:  # at most a little past the limit: /dev/zero filled memory
                data = f.read(MAX_HOSTS_BYTES + 1)  # parse_hosts decodes it: UTF-8, or UTF-16 as Notepad saves
        except OSError as exc:
            raise ConfigError(f"cannot read {hosts}: {exc.strerror}") from None
        if len(data) > MAX_HOSTS_BYTES:
            raise ConfigError(f"{hosts} is over {MAX_HOSTS_BYTES // 2**20} MB: is it the hosts file (one host:port "
                              "a line)?")
        backends = parse_hosts(data, default_port)
        rendered = render(backends, nginx_settings)
        if nginx_settings.balancing not in BACKUP_BALANCING and nginx_settings.max_fails > 0:
            typer.echo(f"gen-nginx: note: {NO_BACKUPS.format(balancing=nginx_settings.balancing)}.", err=True)
    except HostsError as exc:
        _fail("\n".join(f"{hosts}: {problem}" for problem in str(exc).splitlines()), code=2)
    except ConfigError as exc:
        _fail(f"gen-nginx: {exc}", code=2)
    if output is None:
        sys.stdout.write(rendered)
        return
    try:
        output.write_text(rendered)
    except OSError as exc:
        _fail(f"gen-nginx: cannot write {output}: {exc.strerror or exc}", code=1)
    typer.echo(f"wrote {output}: nginx in front of {len(backends)} server(s), listening on {listen}.\n"
               f"On the nginx machine, put it in /etc/nginx/conf.d/{upstream}.conf, then check it and reload:\n"
               "    sudo nginx -t && sudo nginx -s reload", err=True)


@app.command("bench", short_help="Measure a server (requests/s, latency, errors, batches), or with --sweep "
                                 "compare settings of a config.")
def bench(
    target: str = typer.Argument(..., help="The server, e.g. http://127.0.0.1:9876 (a query string, ?top_k=1, goes "
                                 "with every request); with --sweep, a config YAML, "
                                 'an .onnx model or a handle ("module:Class") to serve.'),
    payload: Optional[str] = typer.Option(
        None, "--payload", "-p", help='A file to send: an image (as {"img": "<base64>"}, or its bytes with --raw) or '
        'a .json file (an object, or a list of objects sent in turn). Default: the demo model\'s {"x": [...]}.'),
    raw: bool = typer.Option(False, "--raw", metavar=FLAG,
                             help="Send the image file's bytes as they are, with its Content-Type."),
    key: str = typer.Option("img", help="The JSON field that carries the image, base64-encoded."),
    tensor: List[str] = typer.Option(
        [], "--tensor", help="A random tensor [NAME=]DTYPE:SHAPE, e.g. uint8:224x224x3, sent as JSON lists under "
        "NAME (default x); repeat it for several."),
    form: str = typer.Option("json", "--form", help="How tensors travel: json (lists), npy (application/x-npy "
                             "to /predict) or v2 (Open Inference Protocol binary tensors; an image file as a BYTES "
                             "tensor named --key)."),
    model: Optional[str] = typer.Option(None, help="--form v2: the model's name (ModelName; with --sweep, the "
                                        "config's)."),
    concurrency: Optional[str] = typer.Option(
        None, "--concurrency", "-c", help="Requests kept in flight; each of a comma-separated list is measured in "
        "turn (default 1,8,32; with --sweep 8,32). With --rate: the most in flight at once (default 256)."),
    rate: Optional[str] = typer.Option(
        None, "--rate", help="Requests per second, sent on a schedule whatever the server's pace (an open loop: "
        "latencies include any queueing); each of a comma-separated list is measured in turn."),
    arrivals: str = typer.Option("constant", help="--rate: requests evenly spaced (constant) or as independent "
                                 "arrivals (poisson: bursts and lulls, the same mean)."),
    seed: Optional[int] = typer.Option(None, help="--arrivals poisson: the random gaps' seed, to repeat a run's "
                                       "arrivals (default: a new one, in the JSON and CSV)."),
    duration: float = typer.Option(10.0, help="Seconds to measure each concurrency or rate."),
    requests: Optional[int] = typer.Option(None, "--requests", "-n", help="Measure this many requests instead of "
                                           "--duration."),
    warmup: float = typer.Option(2.0, help="Seconds of load before each measurement, not counted."),
    clients_processes: str = typer.Option("auto", help="Processes that send the load; auto adds some when one "
                                          "would be too busy to keep up."),
    timeout: float = typer.Option(60.0, help="Seconds a request may take before it counts as failed."),
    api_key: Optional[str] = typer.Option(None, help=API_KEY_HELP),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Write every number measured here, as JSON."),
    csv_file: Optional[Path] = typer.Option(None, "--csv", help="Write a row per run here, as CSV."),
    sweep: bool = typer.Option(False, "--sweep", metavar=FLAG, help="Serve TARGET with each ProcessPerGPU x "
                               "MaxBatchSize pair in turn, on a free port, measure each, and recommend one."),
    process_per_gpu: Optional[str] = typer.Option(None, help="--sweep: ProcessPerGPU values (default 1,2)."),
    max_batch_size: Optional[str] = typer.Option(None, help="--sweep: MaxBatchSize values (default 1,8)."),
    gpus: Optional[str] = typer.Option(None, help='--sweep: GPU ids "0,1", "cpu" or "auto", over the config\'s.'),
    p99_ms: Optional[float] = typer.Option(None, help="--sweep: recommend only settings whose p99 (ms) is at most "
                                           "this."),
    plot: Optional[Path] = typer.Option(None, help="Plot requests/s and latency against the levels (with --sweep: "
                                        "requests/s and p99 against the settings) to this PNG (needs the plot "
                                        "extra: pip install 'easyserve\\[plot]')."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", metavar=FLAG, show_default=False,
                                            help="Show a live count while measuring (default: in a terminal); "
                                            "where stderr is no terminal (CI, a pipe), --progress writes a line "
                                            "as each level starts and ends."),
) -> None:
    """Measure a server: requests/s, latency percentiles, errors and the batches it formed, at each
    concurrency, or at each --rate. With --sweep, compare ProcessPerGPU and MaxBatchSize settings of a config."""
    from .bench_cli import run_command

    _setup_logging("warning")  # the servers a sweep starts would otherwise log over the table
    raise typer.Exit(run_command(
        target, payload=payload, raw=raw, key=key, tensors=tensor, form=form, model=model, concurrency=concurrency,
        rate=rate, arrivals=arrivals, seed=seed, duration=duration,
        requests=requests, warmup=warmup, clients_processes=clients_processes, timeout=timeout, api_key=api_key,
        json_file=json_file, csv_file=csv_file, sweep_=sweep, process_per_gpu=process_per_gpu,
        max_batch_size=max_batch_size, gpus=gpus, p99_ms=p99_ms, plot=plot, progress=progress))


def main() -> None:
    code = 1
    try:
        try:
            os.getcwd()
        except FileNotFoundError:  # typer's own Path handling raised it: a 40-line traceback naming no folder
            print("easyserve: the current folder no longer exists (removed since the shell entered it): cd to "
                  "one that does", file=sys.stderr)
            raise SystemExit(2) from None
        app()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        raise
    finally:
        records.written_or_exit(code, LOG_FLUSH_S)  # the records still queued for the log's writer thread


if __name__ == "__main__":
    main()
