"""Messages between the server and its workers: length-prefixed pickles over a socket pair.

The worker side blocks (it has nothing else to do); the server side is an asyncio protocol, so the
event loop learns of results, and of a worker's death (end of stream), the moment they happen.
"""

from __future__ import annotations

import pickle
import socket
import struct
from typing import Any, Iterator

HEADER = struct.Struct("!Q")
EXIT_MEMORY_ERROR = 75  # a worker's exit code after its handle raised MemoryError


def pack(message: Any) -> list[bytes]:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return [HEADER.pack(len(body)), body]


def send(sock: socket.socket, message: Any) -> None:
    header, body = pack(message)
    sock.sendall(header + body if len(body) < 65536 else header)
    if len(body) >= 65536:
        sock.sendall(body)


def recv(sock: socket.socket) -> Any:
    """The next message; ``EOFError`` when the other side has gone."""
    (size,) = HEADER.unpack(_exactly(sock, HEADER.size))
    return pickle.loads(_exactly(sock, size))


def _exactly(sock: socket.socket, size: int) -> bytearray:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError("peer closed the connection")
        got += n
    return buf


class FrameReader:
    """Feeds on stream chunks; yields each complete message."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterator[Any]:
        self._buf += data
        buf = self._buf
        start = 0
        while len(buf) - start >= HEADER.size:
            (size,) = HEADER.unpack_from(buf, start)
            end = start + HEADER.size + size
            if len(buf) < end:
                break
            yield pickle.loads(memoryview(buf)[start + HEADER.size : end])
            start = end
        if start:
            del buf[:start]
