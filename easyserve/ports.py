"""Who holds a TCP port, for the message of a server that cannot listen on it.

"address already in use" alone left the user to find the holder with ``ss -ltnp``: most often an
earlier ``easyserve run`` in another terminal, or a notebook's server not stopped. On Linux the
kernel's socket tables (``/proc/net/tcp`` and ``tcp6``) say which sockets have the port as their own
end, and each process's ``/proc/PID/fd`` which process holds each socket (only processes this user
may look into: another user's show as sockets without a process)::

    >>> holders(9876)
    'listening on it: pid 4242 (python3 -m easyserve run serve.yaml ...)'

Elsewhere, or where nothing is found (the holder left meanwhile), :func:`holders` answers ``""``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator

from . import children
from .logs import VISIBLE

LISTEN, TIME_WAIT, SYN_RECV = "0A", "06", "03"  # the states of /proc/net/tcp, in hex
MOST_NAMED = 3  # processes named in a message; the rest are counted
COMMAND_CHARS = 160  # of a process's command line, in a message


def holders(port: int) -> str:
    """What holds ``port`` here, as a clause for a message ("listening on it: pid 4242 (python3 ...)"),
    or ``""`` where the tables cannot be read or show none."""
    listening, other, waiting = _sockets(port)
    if not (listening or other or waiting):
        return ""
    owners = _owners(listening | other)
    parts = []
    for inodes, what in ((listening, "listening on it"), (other, "with a connection whose own end it is")):
        pids = sorted({pid for inode in inodes for pid in owners.get(inode, ())})
        if pids:
            parts.append(f"{what}: {_named(pids)}")
        elif inodes:  # another user's, or one that closed meanwhile
            parts.append(f"{what}: a process this user cannot look into")
    if waiting and not listening:
        parts.append(f"{waiting} closed connection(s) still wait out TIME_WAIT on it")
    return "; ".join(parts)


def tcp_sockets() -> Iterator[tuple[int, str, str]]:
    """This machine's TCP sockets, IPv4 and IPv6, as the kernel's tables list them: each one's own port, its
    state (hex: ``LISTEN``...) and its inode; none where there is no ``/proc``."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)  # the header
                for line in f:
                    fields = line.split()
                    if len(fields) >= 10:
                        yield int(fields[1].rsplit(":", 1)[1], 16), fields[3], fields[9]
        except (OSError, ValueError):
            continue


def _sockets(port: int) -> tuple[set[str], set[str], int]:
    """The inodes of the sockets whose own end is ``port``: listening ones, others (connections), and the
    count of those in TIME_WAIT (which no process holds)."""
    listening: set[str] = set()
    other: set[str] = set()
    waiting = 0
    for own, state, inode in tcp_sockets():
        if own != port:
            continue
        if state == TIME_WAIT:
            waiting += 1
        elif inode != "0":
            (listening if state == LISTEN else other).add(inode)
    return listening, other, waiting


def _owners(inodes: set[str]) -> dict[str, list[int]]:
    """The pids holding each socket of ``inodes``, of the processes this user may look into."""
    found: dict[str, list[int]] = {}
    if not inodes:
        return found
    names = {f"socket:[{inode}]": inode for inode in inodes}
    for pid in children.pids():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # another user's, or gone
            continue
        for fd in fds:
            try:
                inode = names.get(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:  # closed meanwhile
                continue
            if inode is not None and pid not in found.setdefault(inode, []):
                found[inode].append(pid)
    return found


def _named(pids: list[int]) -> str:
    """``pids`` for a message, each with its command line (this process as "this process"): the children of
    one of them folded into it (a server that forks its workers after listening), and easyserve's HTTP
    fronts (``HttpWorkers``) named by the server that runs them, the one to stop (a front killed is
    started again)."""
    parents = {pid: _parent(pid) for pid in pids}
    tops: dict[int, list[int]] = {}  # each holder under the first of the holders that started it
    for pid in pids:
        top = pid
        while parents.get(top) in parents and parents[top] != pid:
            top = parents[top]
        tops.setdefault(top, []).append(pid)
    # holders started by one process that holds nothing (a prefork pool's master that closed its socket, an
    # easyserve server's HTTP fronts) are named by that process, the one to stop
    siblings: dict[int, int] = {}
    for top in tops:
        if parents[top] not in (None, 0, 1):
            siblings[parents[top]] = siblings.get(parents[top], 0) + 1
    holders: dict[int, list[int]] = {}  # the process to name: the holders it stands for
    for top, held in tops.items():
        parent = parents[top]
        if parent not in (None, 0, 1) and (siblings[parent] > 1 or _is_front(top)):
            holders.setdefault(parent, []).extend(held)
        else:
            holders.setdefault(top, []).extend(held)
    shown = []
    for pid, held in list(holders.items())[:MOST_NAMED]:
        if pid == os.getpid():
            name = f"this process (pid {pid}: a server it started and did not stop, or another socket of its own)"
        else:
            command = _command(pid)
            name = f"pid {pid}" + (f" ({command})" if command else "")
        others = [other for other in held if other != pid]
        if others and pid not in pids:
            fronts = all(_is_front(other) for other in others)
            name += f", through {len(others)} {'HTTP front process(es)' if fronts else 'process(es)'} it started"
        elif others:
            name += f", and {len(others)} process(es) it started"
        shown.append(name)
    more = len(holders) - MOST_NAMED
    return "; ".join(shown) + (f"; and {more} more" if more > 0 else "")


def _is_front(pid: int) -> bool:
    """Whether process ``pid`` is an easyserve HTTP front (``HttpWorkers``)."""
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"easyserve.front" in words[1:4]


def _parent(pid: int) -> int | None:
    fields = children.stat_fields(pid)
    return int(fields[1]) if fields is not None and len(fields) > 1 else None


def _command(pid: int) -> str:
    """Process ``pid``'s command line as a message shows it (see :func:`shown_command`), or ``""``."""
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return ""
    command = " ".join(" ".join(shown_command([word for word in words if word])).split())  # on one line
    command = command.translate(VISIBLE)  # its control characters written out: no escape reaches a terminal
    return command if len(command) <= COMMAND_CHARS else command[:COMMAND_CHARS - 3] + "..."


PYTHON_VALUED = "WXQ"  # the interpreter's one-letter options that take a value, besides -m and -c
# a value given as key=value, key:value or "key": "value" (JSON), its name one a secret goes by
SECRET = re.compile(r"((?:key|token|pass\w*|pw|pwd|secret|auth\w*|cred\w*|sig\w*|sess\w*|sid|x-amz-signature)"
                    r"[\"']?\s*[=:]\s*[\"']?(?:bearer\s+|basic\s+)?|\b(?:bearer|basic)\s+)[^&;\s\"',}]+", re.IGNORECASE)
SECRET_WORD = re.compile(r".*(?:key|token|pass\w*|pw|pwd|secret|auth\w*|cred\w*|bearer)[\"']?:?", re.IGNORECASE)
URL_USER = re.compile(r"(://)\S*@")  # a URL's user and password (a token may be the user alone), to its last "@"


def shown_command(words: list[str]) -> list[str]:
    """A command line as a message may show it (it may end in a log others read): the program (Python's own
    options and its script or ``-m`` module kept, a ``-c`` program left out) and the words that are not
    options, with "..." for each run of options and of the word after each (``--api-key K``, ``-pSECRET``,
    ``-u user:pw``: where keys and passwords are given), and in what is shown, a URL's password, any
    ``token=``, ``password=``, ``sig=``... value, and the word after one named like a secret, hidden."""
    rest = list(words)
    shown = rest[:1]
    del rest[:1]
    if shown and Path(shown[0]).name.startswith(("python", "pypy")):
        while rest and rest[0].startswith("-") and rest[0] != "-" and not rest[0].startswith("--"):
            flag = rest.pop(0)
            shown.append(flag)
            letters = flag[1:]
            at = next((i for i, letter in enumerate(letters) if letter in "mc" + PYTHON_VALUED), None)
            if at is None:
                continue
            inline = letters[at + 1:]  # -mmodule, -cPROGRAM, -uc PROGRAM
            value = inline or (rest.pop(0) if rest else "")
            if letters[at] == "c":
                shown[-1] = f"-{letters[:at + 1]}"
                shown.append("<program>")
                break
            if inline:
                shown[-1] = f"-{letters[:at + 1]}"
            shown.append(value)
            if letters[at] == "m":
                break
    hidden = False  # the word before was an option, or named like a secret: this one may be its value
    for word in rest:
        if word.startswith("-") or hidden:
            if shown[-1] != "...":
                shown.append("...")
            # the word after an option, or after a secret's name ("Authorization: Bearer KEY")
            hidden = (word.startswith("-") and "=" not in word) or bool(SECRET_WORD.fullmatch(word))
            continue
        shown.append(URL_USER.sub(r"\1***@", SECRET.sub(r"\1***", word)))
        hidden = bool(SECRET_WORD.fullmatch(word))
    return shown
