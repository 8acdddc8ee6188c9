"""A server in a notebook's process: the cell that starts it run again, and the kernel shut down or
restarted under it.

A notebook keeps its process between cells, so the servers a cell started live on after their
variable is replaced. This module keeps a registry of the process's running servers and uses it in
two places: a cell run again stops the servers its earlier runs started (where the notebook says
which cell runs, as JupyterLab and Notebook 7 do, and a fixed port another cell's server holds is a
:class:`StartupError`; elsewhere, one on a fixed port stops the server on that port, and one on
``Port: 0`` is warned of its twins), and a kernel told to shut down or restart
stops every server before ipykernel ends its child processes.
"""

from __future__ import annotations

import inspect
import logging
import sys
import threading
from typing import TYPE_CHECKING, Any, Callable

from .errors import StartupError

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("easyserve")

_RUNNING: set[Server] = set()  # servers of this process that are running
_names_cells = False  # whether a cell of this kernel has said which it is (JupyterLab, Notebook 7 do)


def running() -> list[Server]:
    """The servers this process runs now, oldest first."""
    return sorted(_RUNNING, key=lambda server: server._started)


def make_room(server: Server) -> None:
    """Before ``server`` starts: stop the servers that earlier runs of the cell starting it started;
    then, on a fixed port, refuse it if another cell's server holds that port (where the cell is known)
    or stop the server of this process on it (where it is not); on ``Port: 0``, warn of the ones like it
    set beside each other (see :func:`_stop_earlier_server_on`)."""
    server._cell = _cell()
    if server._cell is not None:
        _stop_earlier_runs_of(server._cell)
    config = server.config
    # what holds the port now is not this cell's: where the notebook names its cells, even for a server a
    # thread starts (which belongs to no cell), that stopped another cell's server
    if config.port != 0 and (server._cell is not None or _names_cells):
        _refuse_if_held(config.host, config.port)
    elif config.port != 0:
        _stop_earlier_server_on(config.host, config.port)
    elif server._cell is None:  # where the cell is known, its earlier runs' servers are stopped: any left
        _warn_of_twins(server)  # beside it, another cell's or this run's own (a loop), were started on purpose


def started(server: Server) -> None:
    _stop_before_kernel_shutdown()
    _RUNNING.add(server)


def stopping(server: Server) -> None:
    _RUNNING.discard(server)


def _cell() -> tuple[str, str] | None:
    """The notebook cell running now, as its id and this run's request id, where the notebook sends the
    cell's id with each run (JupyterLab, Notebook 7); ``None`` outside a kernel or where it does not,
    and on any thread but the one that runs cells. A thread a cell started asked after the cell that
    ran last (ipykernel tells another thread the latest request): its server was taken for that cell's,
    and stopped when that cell ran again."""
    if threading.current_thread() is not threading.main_thread():
        return None
    get_parent = getattr(running_kernel(), "get_parent", None)
    try:
        parent = get_parent("shell") if get_parent is not None else None
    except Exception:  # a kernel of another make: no cell to tell
        return None
    if not isinstance(parent, dict):
        return None
    cell, run = (parent.get("metadata") or {}).get("cellId"), (parent.get("header") or {}).get("msg_id")
    if not (isinstance(cell, str) and cell and isinstance(run, str)):
        return None
    global _names_cells
    _names_cells = True
    return cell, run


def _stop_earlier_runs_of(cell: tuple[str, str]) -> None:
    """A cell run again, edited or not (``server = Server(..., Port=0).start()`` with another
    MaxBatchSize), left the server of its last run running beside the new one, holding its own copy
    of the model (on a GPU, its memory): stop it, as a fixed port's is. Servers that one run of the
    cell starts together (a loop) stay."""
    for other in list(_RUNNING):
        earlier = other._cell is not None and other._cell[0] == cell[0] and other._cell[1] != cell[1]
        if earlier and other.state == "running":
            log.warning("this cell started %r in an earlier run: stopping it to start the new one (a server to keep "
                        "running goes in a cell of its own)%s", other, _drain_said(other))
            _stop_for_the_new_one(other)


def _stop_for_the_new_one(other: Any) -> None:
    """Stop ``other`` for the server about to start. An interrupt while its stop waited for its drain stopped
    it at once, as the warning said: the new one starts. An interrupt before its stop began (a reload held
    it) left it running: the start ends there."""
    try:
        other.stop()
    except KeyboardInterrupt:
        if other.state != "stopped":
            raise
        log.warning("interrupted: %r stopped at once; starting the new one", other)


def _refuse_if_held(host: str, port: int) -> None:
    """Where the notebook names the cell that runs, a server of this process on the same fixed port is
    another cell's (this cell's earlier runs were stopped above), or a thread's: serving two models
    from two cells on the default port stopped the first, with a warning the second cell's output
    buried, and its clients met a refused connection. Refuse, naming it, before any worker loads."""
    for other in list(_RUNNING):
        if other.config.port == port and overlap(other.config.host, host) and other.state == "running":
            raise StartupError(f"{host}:{port} is held by {other!r}, which another cell started (or a thread, or "
                               "this same run of the cell): give this server another Port (Port=0 picks a free "
                               "one), or stop that one first (its stop())")


def _stop_earlier_server_on(host: str, port: int) -> None:
    """A notebook cell run again (``server = Server.from_yaml(...).start()``) asks for the port that the
    server its last run started still holds: stop that one rather than fail. Only a server that was
    itself given this fixed port counts (one that got it from ``Port: 0`` is someone else's). Hosts
    that bind the same addresses count as one (``localhost`` and ``127.0.0.1``; see :func:`overlap`)."""
    for other in list(_RUNNING):
        if other.config.port == port and overlap(other.config.host, host) and other.state == "running":
            log.warning("%s:%d is held by a server this process started: stopping %r to start the new one%s",
                        host, port, other, _drain_said(other))
            _stop_for_the_new_one(other)


def _drain_said(server: Any) -> str:
    """What the stop of ``server`` will wait for, said before it does: the cell sat silent while it drained,
    up to TimeoutS and 5 s (35 s by default)."""
    from .server import DRAIN_MARGIN_S  # (server imports this module)

    pool = server._pool
    held = pool.unanswered() if pool is not None else 0
    if not held:
        return ""
    return (f"; it first answers the {held} request{'s' if held > 1 else ''} it holds, for up to "
            f"{server.config.timeout_s + DRAIN_MARGIN_S:g} s (interrupt the kernel to stop it at once)")


def overlap(one: str, other: str) -> bool:
    """Whether servers bound to hosts ``one`` and ``other`` on one port would clash: the same address,
    ``0.0.0.0`` and an IPv4 one, ``::`` and any (dual-stack, Linux's default); ``localhost`` is both
    loopbacks, as binding it binds both."""
    def addresses(host: str) -> set[str]:
        host = host.strip("[]")
        return {"127.0.0.1", "::1"} if host == "localhost" else {host or "0.0.0.0"}

    def clash(a: str, b: str) -> bool:
        return a == b or "::" in (a, b) or ("0.0.0.0" in (a, b) and ":" not in a + b)

    return any(clash(a, b) for a in addresses(one) for b in addresses(other))


def _warn_of_twins(server: Server) -> None:
    """A cell that starts a server on ``Port: 0``, run again, starts one more beside the last (each
    holds its own copy of the model); say so, and how to reach the earlier ones. Only servers that
    were themselves given ``Port: 0`` count: one on a fixed port is not an earlier run of this cell.
    Whether a cell was run again cannot be told from here (a cell may start two on purpose), so the
    warning says what runs and what it costs, and names the re-run as the likely cause."""
    def rest(config: Any) -> dict[str, Any]:
        return {key: value for key, value in config.to_dict().items() if key != "Handle"}

    twins = [other for other in list(_RUNNING) if other.state == "running"
             and other._handle_name() == server._handle_name() and rest(other.config) == rest(server.config)]
    if twins:
        log.warning("this process already runs %d other Port 0 server(s) of this handle and config (%s), each with "
                    "its own copy of the model: a cell that starts one, run again, starts one more on a new port. "
                    "Stop those you no longer need with their stop(), or all with "
                    "`for s in Server.running(): s.stop()`", len(twins),
                    ", ".join(str(other.url) for other in twins))


def _stop_before_kernel_shutdown() -> None:
    """In a Jupyter kernel, stop this process's servers when the kernel is told to shut down or restart,
    before it ends its child processes.

    ipykernel answers a shutdown request by sending SIGTERM (then SIGKILL) to every process of its
    group, and only then exits and runs ``atexit``. Workers ignore SIGTERM, which reaches them also
    from a terminal's or systemd's signal to the group while the server drains; so the kernel waited,
    its manager killed it 2.5 s later, and the requests in flight were cut off with no answer.
    Stopping first answers them 503 at once and ends the workers the server's own way."""
    kernel = running_kernel()
    for table in (getattr(kernel, "control_handlers", None), getattr(kernel, "shell_handlers", None)):
        original = table.get("shutdown_request") if isinstance(table, dict) else None
        if original is not None and not getattr(original, "stops_servers", False):
            table["shutdown_request"] = _stopping_servers_first(original)


def running_kernel() -> Any:
    """The Jupyter kernel this process is, if it is one (IPython with a kernel: not a terminal's IPython)."""
    ipython = sys.modules.get("IPython")  # never imported here: only a process that runs IPython has one
    shell = ipython.get_ipython() if ipython is not None else None
    return getattr(shell, "kernel", None)


def _stopping_servers_first(original: Callable[..., Any]) -> Callable[..., Any]:
    async def shutdown_request(*args: Any, **kwargs: Any) -> Any:
        for server in list(_RUNNING):
            try:
                server.stop(drain_timeout=0)
            except Exception:  # the kernel's shutdown goes on whatever happens here
                log.exception("could not stop %r before the kernel's shutdown", server)
        result = original(*args, **kwargs)
        return await result if inspect.isawaitable(result) else result

    shutdown_request.stops_servers = True  # type: ignore[attr-defined]
    return shutdown_request
