"""Messages between the server and its workers: pickles over a socket pair, large buffers out of band.

A frame is a header (the pickle's length and the number of buffers), each buffer's length, the
pickle, then the buffers. Pickle protocol 5 hands large binary values (numpy arrays, and request
bodies of 64 kB or more marked by :func:`mark_large`, such as an uploaded image) to the frame as
buffers instead of copying them into the pickle: the server writes them to the socket as they are,
so a large request costs the event loop no serialisation.

The worker side blocks (it has nothing else to do); the server side is an asyncio protocol, so the
event loop learns of results, and of a worker's death (end of stream), the moment they happen.
"""

from __future__ import annotations

import io
import pickle
import socket
import struct
from typing import Any, Iterator

HEADER = struct.Struct("!QI")  # pickle length, buffer count
LENGTH = struct.Struct("!Q")
OUT_OF_BAND = 64 * 1024  # bytes objects at least this large travel as buffers, not inside the pickle
EXIT_MEMORY_ERROR = 75  # a worker's exit code after its handle raised MemoryError


class Blob:
    """``bytes`` that travel out of band (pickle skips custom reducers for plain ``bytes``), held as they
    are, not copied (as a ``bytes`` subclass would be); the receiving side gets plain ``bytes``. See
    :func:`mark_large`."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: int) -> Any:
        if protocol >= 5:
            return _to_bytes, (pickle.PickleBuffer(self.data),)
        return _to_bytes, (self.data,)


def _to_bytes(buffer: Any) -> bytes:
    return buffer if type(buffer) is bytes else bytes(buffer)


def mark_large(value: Any) -> Any:
    """``value`` with its large ``bytes`` (at the top level, in a dict's values or in a list there, as
    request bodies and form files come) made :class:`Blob`, so that sending them copies nothing."""
    if type(value) is bytes:
        return Blob(value) if len(value) >= OUT_OF_BAND else value
    if isinstance(value, dict):
        return {k: mark_large(v) if type(v) in (bytes, list) else v for k, v in value.items()}
    if isinstance(value, list):
        return [Blob(v) if type(v) is bytes and len(v) >= OUT_OF_BAND else v for v in value]
    return value


def pack(message: Any) -> list:
    """The frame for ``message``, as a list of bytes-like pieces to write in order."""
    buffers: list[pickle.PickleBuffer] = []
    out = io.BytesIO()
    pickle.Pickler(out, protocol=5, buffer_callback=buffers.append).dump(message)
    body = out.getbuffer()
    raws = [b.raw() for b in buffers]
    head = HEADER.pack(len(body), len(raws)) + b"".join(LENGTH.pack(r.nbytes) for r in raws)
    return [head, body, *raws]


def send(sock: socket.socket, message: Any) -> None:
    head, body, *raws = pack(message)
    sock.sendall(bytes(head) + bytes(body) if len(body) < 65536 else head)
    if len(body) >= 65536:
        sock.sendall(body)
    for raw in raws:
        sock.sendall(raw)


def recv(sock: socket.socket) -> Any:
    """The next message; ``EOFError`` when the other side has gone."""
    size, count = HEADER.unpack(_exactly(sock, HEADER.size))
    lengths = [LENGTH.unpack(_exactly(sock, LENGTH.size))[0] for _ in range(count)]
    body = _exactly(sock, size)
    # each buffer in its own bytearray: arrays rebuilt on it need no further copy
    return pickle.loads(body, buffers=[_exactly(sock, n) for n in lengths])


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
            size, count = HEADER.unpack_from(buf, start)
            lengths_at = start + HEADER.size
            body_at = lengths_at + count * LENGTH.size
            if len(buf) < body_at:
                break
            lengths = [LENGTH.unpack_from(buf, lengths_at + i * LENGTH.size)[0] for i in range(count)]
            end = body_at + size + sum(lengths)
            if len(buf) < end:
                break
            # slices of a bytearray are copies: nothing keeps a view on the buffer that is cut below
            buffers, at = [], body_at + size
            for n in lengths:
                buffers.append(buf[at : at + n])
                at += n
            yield pickle.loads(buf[body_at : body_at + size], buffers=buffers)
            start = end
        if start:
            del buf[:start]
