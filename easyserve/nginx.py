"""nginx in front of several easyserve servers: the config ``easyserve gen-nginx`` writes, and a local
nginx process to run it with (tests, tutorials, a laptop).

The hosts file names the servers, one a line::

    # host:port [weight]
    10.0.0.11:9876
    10.0.0.12:9876  2          # twice the share of the first (a bigger GPU)
    [fd00::13]:9876 weight=1

>>> backends = parse_hosts("10.0.0.11:9876\\n10.0.0.12:9876 2\\n")
>>> print(render(backends, NginxSettings()).splitlines()[0])
# nginx config for easyserve, made by `easyserve gen-nginx`.

The config goes in nginx's ``http`` block (``/etc/nginx/conf.d/``): one ``upstream`` and one
``server``. Failover is nginx's: a server that refuses the connection, drops it, or answers 502 or 503
has the request sent to the next one, POSTs included, since a prediction changes nothing and can be
repeated; a 504 is not (the request has spent its TimeoutS). easyserve helps by answering 503 at once
while it drains, its workers are still loading, or they die on every batch.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import ipaddress
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unicodedata
import weakref
from pathlib import Path
from typing import Sequence

from .config import Config
from .errors import ConfigError

__all__ = ["Backend", "HostsError", "LocalNginx", "NginxSettings", "find_nginx", "parse_hosts", "render"]

log = logging.getLogger("easyserve")

BALANCING = ("least_conn", "round_robin", "ip_hash", "random")
BACKUP_BALANCING = ("least_conn", "round_robin")  # nginx allows backup servers with these only
# nginx counts every failure it retries (refused, 502, 503) against the server. A storm of them (every
# server restarting at once) could leave every server out together, and nginx would refuse everything (503)
# for fail_timeout, even once the servers are fine again. Listed again as backups that are never left
# out, the servers are still asked meanwhile, and serve again as soon as they can.
_BACKUPS = """\
    # The same servers again, used only while every one above is left out (say, all restarting at
    # once): rather than failing every request for fail_timeout, nginx still tries them.
"""
# ip_hash and random take no backup servers: said in the config, and by gen-nginx
NO_BACKUPS = ("nginx allows no backups with {balancing}: should every server fail at once (all "
              "restarting together), nginx answers 503 until fail_timeout has passed, though the servers are back "
              "(least_conn or round_robin list them again as backups, and serve again at once)")
DEFAULT_PORT = Config.port


class HostsError(ConfigError):
    """A hosts file that cannot be used; the message names every bad line by its number."""


@dataclasses.dataclass(frozen=True)
class Backend:
    """One easyserve server behind nginx."""

    host: str
    port: int
    weight: int = 1

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def upstream(self) -> str:
        """The address as the config writes it: ``localhost`` as ``127.0.0.1``. nginx takes every address a
        name has, and most machines give localhost ``::1`` too, where a server bound to 127.0.0.1 (its
        default) or 0.0.0.0 is refused: a server listed as localhost alone had every other request 503."""
        return dataclasses.replace(self, host=_config_host(self.host)).address


def _config_host(host: str) -> str:
    return "127.0.0.1" if host.lower() == "localhost" else host


@dataclasses.dataclass(frozen=True)
class NginxSettings:
    """What the generated config depends on besides the servers. The timeouts and the body limit
    follow the easyserve config the servers run (:meth:`from_config`)."""

    listen: str = "8080"
    server_name: str = "_"
    upstream: str = "easyserve"
    balancing: str = "least_conn"
    max_fails: int = 3
    fail_timeout_s: int = 10
    # where nginx writes each request's line (in the format above); LocalNginx keeps it in its folder
    access_log: str = "/var/log/nginx/access.log"
    max_body_mb: float = Config.max_body_mb
    timeout_s: float = Config.timeout_s
    keep_alive_timeout_s: float = Config.keep_alive_timeout_s
    header_timeout_s: float = Config.header_timeout_s
    body_timeout_s: float = Config.body_timeout_s
    source: str = ""  # how the file was made, for its first lines

    @classmethod
    def from_config(cls, config: Config, **settings) -> NginxSettings:
        return cls(max_body_mb=config.max_body_mb, timeout_s=config.timeout_s,
                   keep_alive_timeout_s=config.keep_alive_timeout_s, header_timeout_s=config.header_timeout_s,
                   body_timeout_s=config.body_timeout_s, **settings)

    def __post_init__(self) -> None:
        if self.balancing not in BALANCING:
            raise ConfigError(f"balancing: got {self.balancing!r}; expected one of {', '.join(BALANCING)}")
        if not re.fullmatch(r"[A-Za-z0-9_]+", self.upstream):
            raise ConfigError(f"upstream name: got {self.upstream!r}; expected letters, digits and _")
        names = self.server_name.split(" ")
        if not re.fullmatch(r"[A-Za-z0-9_.*~^\[\]:-]+( [A-Za-z0-9_.*~^\[\]:-]+)*", self.server_name) or not all(
            map(_server_name_nginx_takes, names)
        ):
            raise ConfigError(f"server name: got {self.server_name!r}; expected host names separated by spaces")
        if _listen_port(self.listen) is None:
            raise ConfigError(f"listen: got {self.listen!r}; expected a port (8080) or address:port "
                              "(0.0.0.0:8080, [::]:8080)")
        # nothing that could end the directive: a path, off, or nginx's syslog:server=... form
        if not re.fullmatch(r"/[A-Za-z0-9_./-]+|off|syslog:[A-Za-z0-9_.:=,/\[\]-]+", self.access_log):
            raise ConfigError(f"access log: got {self.access_log!r}; expected an absolute path of letters, digits "
                              "and _ . / -, off, or syslog:server=...")
        if self.max_fails < 0 or self.fail_timeout_s < 1:
            raise ConfigError("max_fails (--max-fails) must be 0 or more and fail_timeout (--fail-timeout) at least "
                              "1 s")


def _server_name_nginx_takes(name: str) -> bool:
    if name.startswith("~"):  # a regular expression (nginx reads a lone ~ as an empty one)
        return len(name) > 1
    # a wildcard only as a whole first or last part: *.example.com, www.example.*
    return "*" not in name or (name.count("*") == 1 and len(name) > 2 and (name[:2] == "*." or name[-2:] == ".*"))


# -- the hosts file ----------------------------------------------------------------------------------

_LINE = re.compile(r"(?P<address>\S+)(?:\s+(?:weight=)?(?P<weight>\S+))?")


def _hidden(line: str) -> str:
    """The first character of ``line`` that hides or moves text as a reader sees it (a line or paragraph
    separator, another control character than a tab, a format character: a right-to-left override,
    a zero-width space), named; "" if none."""
    for char in line:
        if char != "\t" and (unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp")):
            return f"U+{ord(char):04X} ({unicodedata.name(char, 'a control character')})"
    return ""


def parse_hosts(text: str | bytes, default_port: int = DEFAULT_PORT) -> list[Backend]:
    """The servers a hosts file lists: ``host:port`` (or ``host``, for ``default_port``), then an
    optional weight (``2`` or ``weight=2``); ``#`` starts a comment. Raises :class:`HostsError`
    naming every bad line, or when no server is listed or one is listed twice (``LOCALHOST`` is
    ``localhost``, ``[::ffff:10.0.0.1]`` is ``10.0.0.1``: twice, it would take two shares).

    Given the file's bytes, it decodes them: UTF-8, or UTF-16 with a BOM (as Windows Notepad saves)."""
    if isinstance(text, bytes):
        text = _decode(text)
    if "\0" in text:
        raise HostsError("NUL characters: it looks like UTF-16 decoded as another encoding; save it as UTF-8")
    backends: list[Backend] = []
    problems: list[str] = []
    seen: dict[tuple[str, int], tuple[int, str]] = {}  # the server: its line and how it was written there
    # lines end at \n (\r\n) alone: splitlines() also broke at U+2028 and other breaks that editors, cat
    # and wc show inside a line, so a server written in a comment's tail was served (see _hidden)
    for number, raw in enumerate(text.removeprefix("\ufeff").split("\n"), 1):  # a BOM, as some editors write
        raw = raw.removesuffix("\r")
        hidden = _hidden(raw)
        if hidden:
            problems.append(f"line {number}: it holds {hidden}, which shows text other than what is read: "
                            f"write it again in plain text: {raw.strip()!r}")
            continue
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            backend = _parse_line(line, default_port)
        except ValueError as exc:
            problems.append(f"line {number}: {exc}: {raw.strip()!r}")
            continue
        server = _server(backend)
        if server in seen:
            first, written = seen[server]
            written = f" (as {written})" if written != backend.address else ""
            problems.append(f"line {number}: {backend.address} is already listed on line {first}{written}")
            continue
        seen[server] = number, backend.address
        backends.append(backend)
    if problems:
        raise HostsError("\n".join(problems))
    if not backends:
        raise HostsError("no server listed: write one host:port a line")
    return backends


def _decode(data: bytes) -> str:
    try:
        if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            return data.decode("utf-16")
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise HostsError(f"not UTF-8 or UTF-16 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                         "save it as UTF-8") from None


def _server(backend: Backend) -> tuple[str, int]:
    """The server a line names, whichever way it is written: host names compare without case, and
    addresses as numbers (an IPv4 address mapped into IPv6 as the IPv4 address, localhost as 127.0.0.1)."""
    host = _config_host(backend.host)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host.lower(), backend.port
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return str(ip), backend.port


def _parse_line(line: str, default_port: int) -> Backend:
    if "://" in line:  # a server's URL, pasted: it was told "an IPv6 address goes in brackets"
        raise ValueError("a URL: write the server as host:port, without http:// or a path")
    match = _LINE.fullmatch(line)
    if match is None:
        raise ValueError("expected host:port and an optional weight")
    weight = 1
    if match["weight"] is not None:
        if not re.fullmatch("[0-9]+", match["weight"]) or not 1 <= int(match["weight"]) <= 1000:
            raise ValueError(f"weight {match['weight']!r} is not a whole number from 1 to 1000")
        weight = int(match["weight"])
    host, port = _split_address(match["address"], default_port)
    return Backend(host, port, weight)


def _unspecified(host: str) -> bool:
    """Whether ``host`` is the address of no machine (0.0.0.0, ::), which a server binds and no client reaches."""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _split_address(address: str, default_port: int) -> tuple[str, int]:
    if address.startswith("["):  # [IPv6]:port or [IPv6]
        host, sep, rest = address[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError("an IPv6 address goes in brackets: [fd00::1]:9876")
        port_text = rest[1:] if rest else None
        try:
            zone = ipaddress.IPv6Address(host).scope_id  # any text after a %
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
        if zone is not None:
            raise ValueError(f"{host!r} has a zone (%{zone}), which nginx does not take")
    elif address.count(":") > 1:
        raise ValueError("an IPv6 address goes in brackets: [fd00::1]:9876")
    else:
        host, sep, port_text = address.partition(":")
        port_text = port_text if sep else None
        # _ as docker-compose names its containers (easyserve_1): nginx takes it
        if not re.fullmatch(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?", host):
            raise ValueError(f"{host!r} is not a host name or address")
        if re.fullmatch(r"[0-9.]+", host):  # digits and dots alone are no name: an IPv4 address
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ValueError(f"{host!r} is not an IPv4 address") from None
    if _unspecified(host):  # "listening on http://0.0.0.0:9876", pasted
        raise ValueError(f"{host!r} is where a server listens (any address of its machine): from nginx it reaches "
                         "nginx's own machine alone; give the server's address or name (127.0.0.1 for this one)")
    if port_text is None:
        if not default_port:  # nginx refuses port 0: the config's Port 0 picks a free port at each start
            raise ValueError("no port, and the config's Port is 0 (a free port at each start): give each "
                             "server's port, host:port")
        return host, default_port
    if not re.fullmatch("[0-9]+", port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port {port_text!r} is not a number from 1 to 65535")
    return host, int(port_text)


def _listen_port(listen: str) -> int | None:
    """The port of an nginx ``listen`` value (``8080``, ``0.0.0.0:8080``, ``[::]:8080``), or ``None``."""
    match = re.fullmatch(r"(?:(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+|\*):)?([0-9]{1,5})", listen)
    return int(match[1]) if match and 1 <= int(match[1]) <= 65535 else None


# -- the config --------------------------------------------------------------------------------------


def _seconds(value: float) -> str:
    """A time as nginx takes it: whole seconds, or milliseconds under one."""
    ms = max(1, math.ceil(value * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def _retries_busy(s: NginxSettings) -> bool:
    """Whether a full server's 429 goes on to the next server: where that cannot leave the fleet with
    none to take requests, as its backups (or no server ever left out, max_fails=0) keep some."""
    return s.balancing in BACKUP_BALANCING or s.max_fails == 0


def _busy_comment(s: NginxSettings) -> str:
    """What the config says of a busy server's 429, which it retries or not (see :func:`_retries_busy`)."""
    if _retries_busy(s):
        left_out = ("nginx then leaves it out for fail_timeout, and while every server is left out the backups "
                    "below still take requests" if s.max_fails > 0 else "no server is ever left out (max_fails=0)")
        text = ("A busy server answers 429 (its queue is full) before the request runs, so it goes to the next "
                "server too: a server with less room than its share (a smaller MaxQueueSize, fewer GPUs) looks the "
                "least busy to least_conn, as its 429s are quick, and drew most requests only to refuse them while "
                f"the others had room: {left_out}; should all be full, the client gets the "
                "last 429, with Retry-After.")
    else:
        text = ("A busy server answers 429 (its queue is full), which reaches the client with Retry-After: nginx "
                "would count it as a failure, and with no backups (ip_hash, random) a burst past every "
                "queue would leave every server out for fail_timeout.")
    return "\n        # ".join(textwrap.wrap(text, 92))


def render(backends: Sequence[Backend], settings: NginxSettings) -> str:
    """The nginx config for ``backends``: an upstream and the server that proxies to it."""
    s = settings
    # nginx must give up on a server later than easyserve gives up on a request (504 after TimeoutS),
    # or it would retry requests that are merely slow; and it must close an idle connection before the
    # server does, or it could send a request on a connection the server is closing.
    read_timeout = math.ceil(s.timeout_s) + 10
    idle_ms = max(1, min(60_000, math.floor(s.keep_alive_timeout_s * 2 / 3 * 1000)))
    idle_timeout = f"{idle_ms // 1000}s" if idle_ms >= 1000 else f"{idle_ms}ms"
    body_kb = math.ceil(s.max_body_mb * 1024)
    balancing = "" if s.balancing == "round_robin" else f"    {s.balancing};\n"
    servers = "".join(
        f"    server {b.upstream}{f' weight={b.weight}' if b.weight != 1 else ''} "
        f"max_fails={s.max_fails} fail_timeout={s.fail_timeout_s}s;\n"
        for b in backends
    )
    busy = " http_429" if _retries_busy(s) else ""
    backups = s.balancing in BACKUP_BALANCING and s.max_fails > 0
    # a try for each entry it may reach, 3 at most; 1 for a lone server (see the comment where it is used)
    tries = 1 if len(backends) == 1 else min(3, len(backends) * (2 if backups else 1))
    if backups:
        servers += _BACKUPS + "".join(f"    server {b.upstream} backup max_fails=0;\n" for b in backends)
    elif s.max_fails > 0:
        servers += "".join(f"    # {line}\n" for line in textwrap.wrap(NO_BACKUPS.format(balancing=s.balancing), 96))
    made = " ".join((s.source or "easyserve gen-nginx").split())  # one comment line, whatever the arguments held
    return f"""\
# nginx config for easyserve, made by `easyserve gen-nginx`.
# {made}
# {len(backends)} server(s), MaxBodyMB {s.max_body_mb:g}, TimeoutS {s.timeout_s:g}, \
KeepAliveTimeoutS {s.keep_alive_timeout_s:g}, HeaderTimeoutS {s.header_timeout_s:g}, BodyTimeoutS {s.body_timeout_s:g}
#
# It belongs in nginx's http block: put it in /etc/nginx/conf.d/{s.upstream}.conf, then run
#     sudo nginx -t && sudo nginx -s reload

upstream {s.upstream} {{
{balancing}\
    # Shared by nginx's worker processes: one count of requests in flight and of failures, not one each.
    zone {s.upstream} 64k;
    # A server that fails max_fails times within fail_timeout (refused, dropped, 502/503) is left
    # out for fail_timeout, then tried again with one request.
{servers}\
    # Connections kept open to the servers (per nginx worker process): no TCP handshake per request.
    keepalive 32;
    # Below the servers' KeepAliveTimeoutS ({s.keep_alive_timeout_s:g} s): nginx closes an idle connection first.
    keepalive_timeout {idle_timeout};
}}

# The Host header a server is sent: the client's own (with its port, for same-origin checks), or
# localhost where the client sent none (HTTP/1.0; browsers always send one). Not $host: for such a
# request it is this block's server_name, "_", which a server bound to loopback refuses as a guard
# against DNS rebinding; and a server refuses an HTTP/1.1 request with no Host at all.
map $http_host $easyserve_host_{s.upstream} {{
    ""      localhost;
    default $http_host;
}}

# What a request is called: the client's own X-Request-Id where it sent one a log can quote as it
# is (as easyserve takes it), else nginx's. The servers are sent it, answer with it in X-Request-Id
# and name the request by it in their logs.
map $http_x_request_id $easyserve_request_id_{s.upstream} {{
    "~^[!-~]{{1,200}}$" $http_x_request_id;
    default          $request_id;
}}

# Each request's line says which server answered, after which others (a retry: "502, 200"), how
# long each took, and its id: a request sent again after its server died or drained shows here,
# and nowhere else; the id finds it in that server's log.
log_format {s.upstream}_upstream '$remote_addr [$time_local] "$request" $status $body_bytes_sent '
                            '$request_time upstream=$upstream_addr upstream_status=$upstream_status '
                            'upstream_time=$upstream_response_time id=$easyserve_request_id_{s.upstream}';

# Whether a server that a request was sent to said it is busy (429), for nginx's 502 when it has no
# server left to try: after its last try failed, or finding none (no live upstreams: nginx counts a
# request's tries before it knows which servers are left out, and with two servers both left out, a
# request has their second entries alone for its three tries). The fleet is full, then, not down: the
# client is told so (429), where nginx said 502.
map $upstream_status $easyserve_servers_said_{s.upstream} {{
    "~(^| )429(,| |$)" busy;
    default            "";
}}

# What nginx's own refusals of a request it cannot take say, in the servers' JSON (see error_page).
map $status $easyserve_refusal_{s.upstream} {{
    400     "nginx cannot read the request: its request line, its Host, or its body's length is malformed";
    405     "this method is not allowed";
    411     "a body must say its length (Content-Length) or come in chunks";
    501     "a Transfer-Encoding other than chunked is not taken";
    505     "this HTTP version is not supported: send HTTP/1.1";
    default "nginx refused the request";
}}

server {{
    listen {s.listen};
    server_name {s.server_name};
    server_tokens off;
    access_log {s.access_log}{"" if s.access_log == "off" else f" {s.upstream}_upstream"};

    # MaxBodyMB: a larger body is refused here (413) and never reaches a server.
    client_max_body_size {body_kb}k;
    client_body_buffer_size 1m;
    # HeaderTimeoutS and BodyTimeoutS, as the servers hold a slow client: nginx reads the request before a
    # server sees it, so a stalled one is its to end (it closes the connection, where a server answers 408).
    client_header_timeout {_seconds(s.header_timeout_s)};
    client_body_timeout {_seconds(s.body_timeout_s)};
    # How long an idle client connection is kept (nginx's 75 s), said in each answer as the servers say
    # theirs (Keep-Alive: timeout=75), so that easyserve's Client sends no request on one about to close.
    keepalive_timeout 75s 75s;

    location / {{
        proxy_pass http://{s.upstream};
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $easyserve_host_{s.upstream};
        # easyserve's own name on its answers, which nginx would replace with its own: the client
        # takes a text/html answer for a handle's only from easyserve, not from some web server's page
        proxy_pass_header Server;
        proxy_set_header X-Real-IP $remote_addr;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_set_header X-Request-Id $easyserve_request_id_{s.upstream};

        # Failover. A prediction changes nothing on the server, so it is safe to send it again:
        # non_idempotent lets nginx retry POSTs too. easyserve answers 503 at once while it drains or
        # its workers are still loading, so that goes to the next server, as does a server that is
        # down (error) or frozen (timeout).
        # {_busy_comment(s)}
        # Nor is easyserve's 504 retried: the request has spent its TimeoutS, and sent on, it would run
        # out again on every server (a stuck worker killed on each), and count against each until none
        # was left.
        # 3 tries at most, never more than the entries above (each server, listed twice), and 1
        # for one server: the last one's answer then reaches the client (a try past the entries left
        # found none, and its client got 502, no live upstreams, not that answer). With two servers, one
        # left out for fail_timeout after its drain and the other draining, the second try went to the
        # draining one's backup, and its client got 502 while the first stood ready; a third reaches the
        # first's. Where fewer entries are left than tries all the same (two servers both left out),
        # @no_server answers 429 or 503, as the servers did. Not more tries with more servers: every
        # request to a full fleet would go to each server in turn, its load multiplied by the tries (the
        # cost, with three servers or more: one back from being left out while the others die at once
        # is missed by the requests that leave those out, 3 each).
        # The whole body is read before it is sent (proxy_request_buffering, on by default), so it
        # can be sent again.
        proxy_next_upstream error timeout http_502 http_503{busy} non_idempotent;
        proxy_next_upstream_tries {tries};
        proxy_next_upstream_timeout {read_timeout * 2}s;
        proxy_connect_timeout 2s;
        # Above TimeoutS ({s.timeout_s:g} s), after which easyserve answers 504 itself.
        proxy_send_timeout {read_timeout}s;
        proxy_read_timeout {read_timeout}s;
    }}

    # nginx's own refusals in the servers' JSON, which clients read: a body over MaxBodyMB, a request
    # line or a header longer than nginx's buffers take (large_client_header_buffers, 8 kB each: the
    # servers' own limit for a request line; a header's 494 is a 431, as a server answers), no server
    # left to try, a server that did not answer in time. (The servers' own errors pass as they are.)
    # Each names its request, as a server's answer does: the id in nginx's access log, which a client
    # holding a 503 or 504 had nothing to match against.
    error_page 413 @too_large;
    error_page 414 /.easyserve/line-too-long;  # a URI nginx has not parsed: no named location takes it
    error_page 494 =431 @header_too_long;
    error_page 502 = @no_server;  # with "=", the status is the one it returns: 429 or 503
    error_page 504 @no_answer;
    # and the rest of nginx's own, with the status it gave them (a request it could not parse goes to no
    # named location: a URI's, as the 414's)
    error_page 400 405 411 500 501 505 /.easyserve/refused;
    location = /.easyserve/refused {{
        internal;
        default_type application/json;
        add_header X-Request-Id $easyserve_request_id_{s.upstream} always;
        return 200 '{{"error": "$easyserve_refusal_{s.upstream}"}}';
    }}
    location @too_large {{
        default_type application/json;
        add_header X-Request-Id $easyserve_request_id_{s.upstream} always;
        return 413 '{{"error": "body too large: the limit is MaxBodyMB={s.max_body_mb:g}"}}';
    }}
    location = /.easyserve/line-too-long {{
        internal;
        default_type application/json;
        add_header X-Request-Id $easyserve_request_id_{s.upstream} always;
        return 414 '{{"error": "the request line is longer than 8 kB: send options in the body, not the query"}}';
    }}
    location @header_too_long {{
        default_type application/json;
        add_header X-Request-Id $easyserve_request_id_{s.upstream} always;
        return 431 '{{"error": "a request header is longer than 8 kB, or the headers than 32 kB in all"}}';
    }}
    location @no_server {{
        default_type application/json;
        add_header X-Request-Id $easyserve_request_id_{s.upstream} always;
        add_header Retry-After 1 always;
        if ($easyserve_servers_said_{s.upstream} = busy) {{
            return 429 '{{"error": "every server is at capacity: try again shortly"}}';
        }}
        # Not 502: a server that refuses the connection may be down, or draining (a deploy that stopped
        # every server at once); nginx cannot tell which, and either way the fleet cannot take it now.
        return 503 '{{"error": "no server can take the request now: each is down, starting or shutting down"}}';
    }}
    location @no_answer {{
        default_type application/json;
        add_header X-Request-Id $easyserve_request_id_{s.upstream} always;
        return 504 '{{"error": "no server answered in time: {read_timeout} s for an answer, 2 s to connect"}}';
    }}

    # Each server's /stats and /metrics describe that server alone; through the balancer they would
    # come from whichever server nginx picked. Scrape each server directly.
    location ~ ^/(stats|metrics)$ {{
        default_type application/json;
        return 404 '{{"error": "/stats and /metrics describe one server: read them from each, not through nginx"}}';
    }}
    # and so do the Open Inference Protocol's statistics (/v2/models/stats, /v2/models/<name>/stats), which a
    # client such as perf_analyzer reads
    location ~ ^/v2/models(/[^/]+(/versions/[^/]+)?)?/stats$ {{
        default_type application/json;
        return 404 '{{"error": "the v2 statistics describe one server: read them from each, not through nginx"}}';
    }}
}}
"""


# -- running nginx -----------------------------------------------------------------------------------


def find_nginx() -> str | None:
    """The nginx binary, also where Debian puts it outside an ordinary user's PATH."""
    places = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
    return shutil.which("nginx") or next((p for p in places if os.access(p, os.X_OK)), None)


# Run between fork and exec: nginx is sent SIGTERM (its fast shutdown) when the thread that started it
# ends, the kernel of a notebook killed with SIGKILL included, where it outlived the kernel on its port.
# PR_SET_PDEATHSIG outlives exec; a parent already gone by then leaves nothing to start.
_DIE_WITH_PARENT = """\
import os, signal, sys
try:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
except (ImportError, OSError, AttributeError):
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(0)
os.execv(sys.argv[2], sys.argv[2:])
"""


class LocalNginx:
    """nginx as an ordinary process with its own folder, running a config from :func:`render`:
    no root, no system files touched. For tests, tutorials and a single machine::

        with LocalNginx(render(backends, NginxSettings(listen="127.0.0.1:8080"))) as nginx:
            requests.post(nginx.url + "/predict", json=...)

    Starting one on the port of another that this process started stops that one first, with a
    warning, as a notebook cell run again would want. On Linux, nginx started from the main thread
    stops when this process ends, however it ends (a notebook's kernel killed included).
    """

    _running: dict[int, LocalNginx] = {}  # port: the one this process runs there (held: a cell's variable may go)

    def __init__(self, site_config: str, prefix: str | os.PathLike | None = None, binary: str | None = None) -> None:
        self.binary = binary or find_nginx()
        if self.binary is None:
            raise FileNotFoundError("nginx is not installed (Debian, Ubuntu: apt-get install nginx)")
        self.site_config = site_config
        listen = re.search(r"^\s*listen\s+(\S+?);", site_config, re.M)
        self.port = _listen_port(listen[1]) if listen else None
        if self.port is None:
            raise ValueError("the config has no `listen PORT;` (or ADDRESS:PORT) line of its own: nginx would "
                             "not be reachable")
        self._own_prefix = prefix is None  # removed on stop(), and when this object goes (at exit too)
        self.prefix = Path(prefix or tempfile.mkdtemp(prefix="easyserve-nginx-"))
        # one made and never started, or whose start failed, or left running at exit, left its folder in
        # /tmp: a notebook's cells run again piled them up
        self._removal = weakref.finalize(self, shutil.rmtree, self.prefix, True) if self._own_prefix else None
        self.proc: subprocess.Popen | None = None

    def __repr__(self) -> str:
        return f"LocalNginx({self.url}, {'running' if self.running else 'stopped'}, prefix={str(self.prefix)!r})"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def conf(self) -> Path:
        return self.prefix / "nginx.conf"

    def write(self) -> Path:
        """Write nginx.conf (the main config around the site's) into the prefix folder."""
        for sub in ("logs", "tmp"):
            (self.prefix / sub).mkdir(parents=True, exist_ok=True)
        p = self.prefix
        # the site's own access log, kept in this folder with the rest: /var/log is not an ordinary user's
        site = re.sub(r"(?m)^(\s*access_log )/\S+", lambda found: f"{found[1]}{p}/logs/access.log", self.site_config)
        (self.prefix / "site.conf").write_text(site)
        # run as root, nginx hands its workers to another user, which must reach the temp files
        user = "user root root;\n" if os.geteuid() == 0 else ""
        self.conf.write_text(f"""\
{user}daemon off;
worker_processes 2;
pid {p}/nginx.pid;
error_log {p}/logs/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {p}/logs/access.log;
    client_body_temp_path {p}/tmp/body;
    proxy_temp_path {p}/tmp/proxy;
    fastcgi_temp_path {p}/tmp/fastcgi;
    uwsgi_temp_path {p}/tmp/uwsgi;
    scgi_temp_path {p}/tmp/scgi;
    include {p}/site.conf;
}}
""")
        return self.conf

    def test(self) -> subprocess.CompletedProcess:
        """``nginx -t`` on the config: the completed process (its stderr says what is wrong)."""
        self.write()
        return subprocess.run([self.binary, "-t", "-p", str(self.prefix), "-c", str(self.conf)],
                              capture_output=True, text=True)

    def start(self, timeout: float = 10.0) -> LocalNginx:
        """Start nginx and return once it listens; one already running is left as it is (:meth:`reload`
        gives it a new config). ``RuntimeError`` saying why when it cannot: a bad config, or a port
        another process holds."""
        if self.running:
            return self
        checked = self.test()
        if checked.returncode != 0:
            raise RuntimeError(f"nginx -t failed:\n{checked.stderr}")
        earlier = LocalNginx._running.get(self.port)
        if earlier is not None and earlier.running:
            log.warning("port %d is held by an nginx this process started: stopping %r to start the new one",
                        self.port, earlier)
            earlier.stop()
        if _listened_on(self.port):  # nginx would try for 2.5 s, then fail saying the same
            raise self._port_taken()
        command = [self.binary, "-p", str(self.prefix), "-c", str(self.conf)]
        # the signal comes when the starting thread ends: from another thread (a pool's), nginx would
        # stop with it, long before this process
        dies_with_us = (sys.platform.startswith("linux") and bool(sys.executable)
                        and threading.current_thread() is threading.main_thread())
        if dies_with_us:
            command = [sys.executable, "-I", "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()), *command]
        elif self._removal is not None:  # an nginx that outlives this process keeps the folder it runs from
            self._removal.detach()
        # and then in a session of its own: a notebook's interrupt of any cell (SIGINT to the kernel's
        # group) was nginx's fast shutdown, and every later request through it was refused. Without
        # the signal, it stays in this process's group, whose end (a killed kernel's) ends it too.
        self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=dies_with_us)
        LocalNginx._running[self.port] = self
        deadline = time.monotonic() + timeout
        while not self._listening():
            if self.proc.poll() is not None:
                said = self.proc.stderr.read().decode(errors="replace")
                self.stop()
                if "Address already in use" in said:
                    raise self._port_taken(said)
                raise RuntimeError(f"nginx exited with {self.proc.returncode}:\n{said}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nginx did not listen on port {self.port} within {timeout:g}s")
            time.sleep(0.05)
        return self

    def _port_taken(self, said: str = "") -> RuntimeError:
        """The error for a port another process holds, with what nginx said of it, if anything."""
        message = f"port {self.port} is in use by another process: choose another `listen` port in the config, " \
                  "or stop what holds it"
        return RuntimeError(f"{message}\n{said}" if said else message)

    def _listening(self) -> bool:
        """Whether this nginx has opened its ports: it writes its pid file only once it has (so a port
        that answers may be another's, and is not proof)."""
        try:
            written = (self.prefix / "nginx.pid").read_text().strip()
        except OSError:
            return False
        return written == str(self.proc.pid)

    def reload(self, site_config: str | None = None) -> None:
        """Re-read the config (a new one if given), as ``nginx -s reload`` does: no connection dropped.
        A config nginx refuses (``nginx -t``) raises ``RuntimeError`` with what it said, and the one it
        runs stays, on disk too: nginx kept it, its files said otherwise, and nothing said so."""
        if not self.running:
            raise RuntimeError("this nginx is not running: start() it (with the new config given to LocalNginx)")
        kept = self.site_config
        if site_config is not None:
            self.site_config = site_config
        checked = self.test()
        if checked.returncode != 0:
            self.site_config = kept
            self.write()
            raise RuntimeError(f"nginx -t failed; still running the config it had:\n{checked.stderr}")
        self.proc.send_signal(signal.SIGHUP)

    def error_log(self) -> str:
        path = self.prefix / "logs" / "error.log"
        return path.read_text() if path.exists() else ""

    def access_log(self) -> str:
        path = self.prefix / "logs" / "access.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        """Stop nginx (fast shutdown) and wait for it."""
        if LocalNginx._running.get(self.port) is self:
            del LocalNginx._running[self.port]
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):  # not reaped yet: its pid is still its own
                    if os.getpgid(self.proc.pid) == self.proc.pid:  # a group of its own: its workers too
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    else:
                        self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        if self._own_prefix:
            shutil.rmtree(self.prefix, ignore_errors=True)

    def __enter__(self) -> LocalNginx:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _listened_on(port: int) -> bool:
    """Whether something accepts connections on this machine's loopback at ``port``."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False
