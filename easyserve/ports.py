"""Who holds a TCP port, for the message of a server that cannot listen on it.

"address already in use" alone left the user to find the holder with ``ss -ltnp``: most often an
earlier ``easyserve run`` in another terminal, or a notebook's server not stopped. On Linux the
kernel's socket tables (``/proc/net/tcp`` and ``tcp6``) say which sockets have the port as their own
end, and each process's ``/proc/PID/fd`` which process holds each socket (only processes this user
may look into: another user's show as sockets without a process)::

    >>> holders(9876)
    'pid 4242 (python3 -m easyserve run serve.yaml) listens on it'

Elsewhere, or where nothing is found (the holder left meanwhile), :func:`holders` answers ``""``.
"""

from __future__ import annotations

import os
from pathlib import Path

LISTEN, TIME_WAIT = "0A", "06"  # the states of /proc/net/tcp, in hex
MOST_NAMED = 3  # processes named in a message; the rest are counted
COMMAND_CHARS = 160  # of a process's command line, in a message


def holders(port: int) -> str:
    """What holds ``port`` here, as a clause for a message ("pid 4242 (python3 ...) listens on it"),
    or ``""`` where the tables cannot be read or show none."""
    listening, other, waiting = _sockets(port)
    if not (listening or other or waiting):
        return ""
    owners = _owners(listening | other)
    parts = []
    for inodes, verb in ((listening, "listens on it"), (other, "has a connection with it as its own end")):
        pids = sorted({pid for inode in inodes for pid in owners.get(inode, ())})
        if pids:
            parts.append(f"{_named(pids)} {verb}")
        elif inodes:  # another user's, or one that closed meanwhile
            parts.append(f"a process this user cannot look into {verb}")
    if waiting and not listening:
        parts.append(f"{waiting} closed connection(s) still wait out TIME_WAIT on it")
    return "; ".join(parts)


def _sockets(port: int) -> tuple[set[str], set[str], int]:
    """The inodes of the sockets whose own end is ``port``: listening ones, others (connections), and the
    count of those in TIME_WAIT (which no process holds)."""
    wanted = f":{port:04X}"
    listening: set[str] = set()
    other: set[str] = set()
    waiting = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)  # the header
                for line in f:
                    fields = line.split()
                    if len(fields) < 10 or not fields[1].endswith(wanted):
                        continue
                    state, inode = fields[3], fields[9]
                    if state == TIME_WAIT:
                        waiting += 1
                    elif inode != "0":
                        (listening if state == LISTEN else other).add(inode)
        except OSError:
            continue
    return listening, other, waiting


def _owners(inodes: set[str]) -> dict[str, list[int]]:
    """The pids holding each socket of ``inodes``, of the processes this user may look into."""
    found: dict[str, list[int]] = {}
    if not inodes:
        return found
    names = {f"socket:[{inode}]": inode for inode in inodes}
    try:
        processes = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return found
    for pid in processes:
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
    """``pids`` for a message, each with its command line; this process as "this process"."""
    shown = []
    for pid in pids[:MOST_NAMED]:
        if pid == os.getpid():
            shown.append(f"this process (pid {pid}: a server it started and did not stop, or another socket of "
                         "its own)")
            continue
        try:
            words = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            words = []
        command = " ".join(" ".join(_hidden(words)).split())  # on one line: a program given with -c has several
        if len(command) > COMMAND_CHARS:
            command = command[:COMMAND_CHARS - 3] + "..."
        shown.append(f"pid {pid}" + (f" ({command})" if command else ""))
    more = len(pids) - MOST_NAMED
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


SECRET_WORDS = ("key", "token", "password", "secret")  # options whose values a message does not show


def _hidden(words: list[str]) -> list[str]:
    """A command line with the values of options that look secret (``--api-key K``, ``token=T``) hidden:
    the message may end in a log that others read."""
    shown = []
    hide_next = False
    for word in words:
        name, equals, _ = word.partition("=")
        secret = any(part in name.lower() for part in SECRET_WORDS)
        if hide_next:
            shown.append("***")
        elif secret and equals:
            shown.append(f"{name}=***")
        else:
            shown.append(word)
        hide_next = secret and not equals and word.startswith("-")
    return shown
