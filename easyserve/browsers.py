"""What a page in a browser may ask of a server: only the ``Host`` names it should answer (against DNS
rebinding), and only from the origins ``CorsOrigins`` allows."""

from __future__ import annotations

import ipaddress
import re
import socket

from aiohttp import web

from .errors import Forbidden, brief

__all__ = ["BrowserGuard", "binds_loopback", "cors_headers", "is_loopback", "PREFLIGHT_HEADERS"]


# What a preflight answer lets a page of an allowed origin send, and for how long (seconds) a browser
# may reuse that answer.
PREFLIGHT_HEADERS = {
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    # Inference-Header-Content-Length: where the JSON of an Open Inference request or answer ends;
    # X-Tensor-*: a raw tensor body's element type and shape; X-Request-Id: what the request is called
    "Access-Control-Allow-Headers": "Authorization, Content-Type, Content-Encoding, Inference-Header-Content-Length, "
                                    "X-Tensor-Dtype, X-Tensor-Shape, X-Request-Id",
    "Access-Control-Max-Age": "600",
}
# Host headers whose verdict a server remembers (parsing the address took about 6% of the server
# process's Python time on a request); past this many, it forgets them all and starts again
HOSTS_REMEMBERED = 64


class BrowserGuard:
    """Which requests a page in a browser may make.

    A server bound to loopback answers only requests addressed to a loopback name (``localhost``,
    ``127.x``, ``[::1]``), plus ``allowed_hosts``: a page on another site that re-points its own
    name at 127.0.0.1 (DNS rebinding) then gets 403. Bound elsewhere, it answers any ``Host`` unless
    ``allowed_hosts`` names some. A request from a page of another origin gets 403 unless
    ``cors_origins`` allows that origin.
    """

    def __init__(self, bind: str, allowed_hosts: tuple[str, ...] | None, cors_origins: tuple[str, ...]) -> None:
        if allowed_hosts is None:  # the name bound to as well: a client of http://my-laptop:9876 sends it
            allowed_hosts = (bind.lower().rstrip("."),) if binds_loopback(bind) else ("*",)
        self.any_host = "*" in allowed_hosts
        self.allowed_hosts = frozenset(allowed_hosts)
        self.any_origin = "*" in cors_origins
        self.cors_origins = frozenset(cors_origins)
        self._hosts: dict[str, bool] = {}  # Host header -> allowed: clients send the same few

    def check(self, request: web.BaseRequest) -> None:
        """Raise :class:`~easyserve.errors.Forbidden` for a request this server must not answer."""
        host = request.headers.get("Host")
        if not request.raw_path.startswith("/") and request.url.raw_authority:
            # an absolute-form target (POST http://name/predict HTTP/1.1): its authority is the host asked
            # for, whatever Host says (RFC 9112, 3.2.2); judged by Host alone, any name passed
            host = request.url.raw_authority
        if host is not None and not self.host_allowed(host):
            raise Forbidden(
                f"Host {brief(host)} is not one this server answers (a guard against DNS rebinding): add it to "
                "AllowedHosts (behind a proxy on this machine, the public host name it forwards)")
        origin = request.headers.get("Origin")
        fetch_site = request.headers.get("Sec-Fetch-Site", "").lower()
        if origin is None:
            if fetch_site == "cross-site" and not self.any_origin:
                raise Forbidden("cross-site requests from browsers are refused: list the page's origin in "
                                "CorsOrigins to allow it")
            return
        origin = origin.strip().lower().rstrip("/")
        if (fetch_site != "cross-site" and host is not None and _same_origin(origin, host)) or self._allowed(origin):
            return
        raise Forbidden(f"requests from pages at {brief(origin)} are refused: list that origin in CorsOrigins to "
                        "allow it")

    def cross_origin(self, request: web.BaseRequest) -> str | None:
        """The origin of a page on another site that ``CorsOrigins`` lets read this answer, if any."""
        origin = request.headers.get("Origin")
        if origin is None:
            return None
        origin = origin.strip().lower().rstrip("/")
        host = request.headers.get("Host")
        if (host is not None and _same_origin(origin, host)) or not self._allowed(origin):
            return None
        return origin

    def _allowed(self, origin: str) -> bool:
        return self.any_origin or origin in self.cors_origins

    def host_allowed(self, host: str) -> bool:
        allowed = self._hosts.get(host)
        if allowed is None:
            cleaned = host.strip().lower()
            name = _host_name(cleaned)
            allowed = (self.any_host or is_loopback(name) or cleaned in self.allowed_hosts
                       or name in self.allowed_hosts or f"[{name}]" in self.allowed_hosts)
            if len(self._hosts) >= HOSTS_REMEMBERED:  # a client making up names gets no more memory
                self._hosts.clear()
            self._hosts[host] = allowed
        return allowed


def cors_headers(origin: str) -> dict[str, str]:
    """The headers that let a page at ``origin`` (allowed by ``CorsOrigins``) read an answer."""
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
            "Access-Control-Expose-Headers":
                "Retry-After, WWW-Authenticate, Inference-Header-Content-Length, X-Request-Id"}


def _host_name(host: str) -> str:
    """``example.com:80`` -> ``example.com``; ``[::1]:80`` -> ``::1``. A bracket followed by anything but a
    port (``[::1]evil.com``, read as ``::1``, a loopback name) is no name: ``""``; nor is a name whose
    colon is followed by anything but a port's digits (``127.0.0.1:1@evil.com``, read as ``127.0.0.1``)."""
    if host.startswith("["):
        name, closed, rest = host[1:].partition("]")  # unclosed ("[::1"): no name either
        return name if closed and re.fullmatch(r"(:[0-9]{0,5})?", rest) else ""  # "[::1]:", as "localhost:"
    if host.count(":") == 1:
        name, _, port = host.partition(":")
        return name.rstrip(".") if re.fullmatch(r"[0-9]{0,5}", port) else ""  # "host:" is an empty port, RFC 3986
    return host.rstrip(".")


def is_loopback(name: str) -> bool:
    if name.rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def binds_loopback(name: str) -> bool:
    """Whether a server bound to ``name`` listens on loopback addresses alone: a name this machine resolves
    to them (its own hostname, which Debian maps to 127.0.1.1; ``127.1``) as well as one written out. Such a
    server was taken for one reachable from other machines, and answered any ``Host``: a page on another
    site that pointed its own name at 127.0.0.1 could use it."""
    if is_loopback(name):
        return True
    try:
        found = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):  # not bound to, then: the server cannot start
        return False
    return bool(found) and all(ipaddress.ip_address(address[4][0].partition("%")[0]).is_loopback
                               for address in found)


def _same_origin(origin: str, host: str) -> bool:
    scheme, _, netloc = origin.partition("://")
    default_port = {"http": ":80", "https": ":443"}.get(scheme)
    host = host.strip().lower()
    # Behind a TLS proxy the scheme differs (https page, http here); the name and port decide.
    return netloc == host or (default_port is not None and netloc + default_port == host) or (
        default_port is not None and netloc == host.removesuffix(default_port))
