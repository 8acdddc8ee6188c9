"""Messages between the server and its workers: pickles over a socket pair, large buffers out of band.

A frame is a header (the pickle's length and the number of buffers), each buffer's length, the
pickle, then the buffers. Pickle protocol 5 hands large binary values (numpy arrays, and request
bodies of 64 kB or more marked by :func:`mark_large`, such as an uploaded image) to the frame as
buffers instead of copying them into the pickle: the server writes them to the socket as they are,
so a large request costs the event loop no serialisation. Answers take the same care the other way:
a worker sends a large answer's bytes as a buffer (:func:`mark_bulk`), the server reads each buffer
straight into memory of its own (:class:`FrameReader`) and hands it on as it is, so a 400 MB answer
no longer holds the loop for seconds while it is appended, sliced and unpickled.

The worker side blocks (it has nothing else to do); the server side is an asyncio protocol, so the
event loop learns of results, and of a worker's death (end of stream), the moment they happen.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import mmap
import pickle
import socket
import struct
from pathlib import Path
from typing import Any, Iterator

HEADER = struct.Struct("!QI")  # pickle length, buffer count
LENGTH = struct.Struct("!Q")
OUT_OF_BAND = 64 * 1024  # bytes objects at least this large travel as buffers, not inside the pickle
EXIT_MEMORY_ERROR = 75  # a worker's exit code after its handle raised MemoryError
# where a worker's time on a batch goes, in the order the stages run: reading what the server left to the
# worker (large bodies, inference requests), the handle's preprocess, forward and postprocess (or its own
# run_batch, in their place), and encoding the answers
STAGES = ("read", "preprocess", "forward", "postprocess", "run_batch", "encode")
# what a worker sends of a batch's stages ("done"): their seconds in this order (None: a stage that did not
# run), then the prepared batch's wait for the one before it (Pipeline); a tuple, which costs the server's
# loop a third of what a dict of them did to read
WIRE_STAGES = (*STAGES, "wait")
# a task's status in a worker's answer for one it did not run, to be queued again; its value is how many
# items it holds (an inference request's batch, which the server did not know: see worker._Batch)
PUT_BACK = 0


@functools.lru_cache(maxsize=None)
def code_fingerprint() -> str:
    """What easyserve's code is in this process: a hash of its source files, read the first time this
    is asked (at a worker's start; in the server, as its first pool is made, just after it imported
    them). A worker whose code differs from its server's refuses to start (see worker.main): after an
    upgrade, a ``git pull`` or an edit under a live server, each worker it started again ran the new
    code against the old server's messages, failed its first batch and was started again at once: 71
    restarts in 55 s, a third of the answers 500s."""
    digest = hashlib.sha1()
    package = Path(__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        if path.name.startswith(".") or path.is_symlink():  # an editor's lock (.#handle.py), not code
            continue
        digest.update(str(path.relative_to(package)).encode())
        try:
            digest.update(path.read_bytes())
        except OSError:  # gone meanwhile: that changes it too
            digest.update(b"\0")
    return digest.hexdigest()[:16]


def _to_bytes(buffer: Any) -> bytes:
    return buffer if type(buffer) is bytes else bytes(buffer)


class Blob:
    """``bytes`` that travel out of band (pickle skips custom reducers for plain ``bytes``), held as they
    are, not copied (as a ``bytes`` subclass would be); the receiving side gets plain ``bytes``. See
    :func:`mark_large`. A large request body gathered in a buffer of its own travels as one too, and is
    ``bytes`` on the other side (see :func:`easyserve.reading.read_body`)."""

    __slots__ = ("data",)
    rebuild = staticmethod(_to_bytes)  # what the receiving side makes of the buffer

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: int) -> Any:
        if protocol >= 5:
            return self.rebuild, (pickle.PickleBuffer(self.data),)
        return self.rebuild, (self.data,)


def mark_large(value: Any) -> Any:
    """``value`` with its large ``bytes`` (at the top level, in a dict's values or in a list there, as
    request bodies and form files come, or in a tuple, as answers do) made :class:`Blob`, so that
    sending them copies nothing; a large answer received as a ``bytearray`` or ``memoryview`` (see
    :class:`Bulk`) made :class:`Bulk` again, so that the front it goes on to writes it as it arrived
    (as a :class:`Blob` the front unpickled it into new ``bytes``: 0.13-0.2 s of its loop per 200 MB)."""
    if type(value) in (bytes, bytearray, memoryview):
        if len(value) < OUT_OF_BAND:
            return bytes(value) if type(value) is memoryview else value
        return Blob(value) if type(value) is bytes else Bulk(value)  # the latter: a worker's, on to a front
    if isinstance(value, dict):
        return {k: mark_large(v) if type(v) in (bytes, list) else v for k, v in value.items()}
    if isinstance(value, list):
        return [Blob(v) if type(v) is bytes and len(v) >= OUT_OF_BAND else v for v in value]
    if type(value) is tuple:  # an inference answer's (header length, body), on to a front
        return tuple(mark_large(v) if type(v) in (bytes, bytearray, memoryview) else v for v in value)
    return value


def pack(message: Any) -> list:
    """The frame for ``message``, as a list of bytes-like pieces to write in order."""
    buffers: list[pickle.PickleBuffer] = []
    # pickle.dumps, not a Pickler on a BytesIO: 0.5 us a small message where that took 1.8
    body = pickle.dumps(message, 5, buffer_callback=buffers.append)
    if not buffers:
        return [HEADER.pack(len(body), 0), body]
    raws = [b.raw() for b in buffers]
    head = HEADER.pack(len(body), len(raws)) + b"".join(LENGTH.pack(r.nbytes) for r in raws)
    return [head, body, *raws]


class Outbox:
    """Frames for one transport, gathered over a turn of the event loop and written in one call: with
    many requests in flight between an HTTP front and the server process, one system call (and one
    wake-up of the other side) for all of them, where each took its own."""

    __slots__ = ("_transport", "_loop", "_pieces")

    def __init__(self, transport: Any, loop: Any) -> None:
        self._transport = transport
        self._loop = loop
        self._pieces: list = []

    def put(self, frame: list) -> None:
        """Write ``frame`` (see :func:`pack`) once this turn of the loop is over."""
        if not self._pieces:
            self._loop.call_soon(self.flush)
        self._pieces += frame

    def send(self, frame: list) -> None:
        """Write ``frame`` now, after those put before it."""
        self._pieces += frame
        self.flush()

    def flush(self) -> None:
        if self._pieces:
            pieces, self._pieces = self._pieces, []
            if not self._transport.is_closing():  # closed: the process on the other side is gone
                self._transport.writelines(pieces)


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


def messages(sock: socket.socket, reader: FrameReader | None = None) -> Iterator[Any]:
    """Each message the blocking ``sock`` brings, until its other side closes it. Every read takes what
    has arrived (a small frame's header and pickle in one system call, where :func:`recv` makes two,
    and a large buffer straight into its place: see :class:`FrameReader`), so once this has begun it
    must be the only reader of ``sock``. ``reader``: the one to read with, for its :attr:`~FrameReader.midway`."""
    reader = reader or FrameReader()
    arrived: collections.deque = collections.deque()
    while True:
        while arrived:
            yield arrived.popleft()  # not held here while it is used, nor after
        n = sock.recv_into(reader.get_buffer())
        if n == 0:
            return
        arrived.extend(reader.buffer_updated(n))


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


def _to_buffer(buffer: Any) -> bytes | bytearray | memoryview:
    if isinstance(buffer, memoryview) and isinstance(buffer.obj, (bytearray, mmap.mmap)) \
            and buffer.nbytes == len(buffer.obj):
        # the bytearray FrameReader received it into, whole; a large one's pages (see FrameReader._part)
        return buffer.obj if isinstance(buffer.obj, bytearray) else buffer
    return buffer if type(buffer) in (bytes, bytearray) else bytes(buffer)


class Bulk(Blob):
    """A :class:`Blob` that arrives as the ``bytearray`` it was received into, not copied again: a
    worker's large answer (``.npy``, JSON), which the server only writes to a socket. See
    :func:`mark_bulk`."""

    __slots__ = ()
    rebuild = staticmethod(_to_buffer)


def mark_bulk(value: Any) -> Any:
    """``value`` with its large ``bytes`` (at the top level or in a tuple, as answers come) made
    :class:`Bulk`: received as a ``bytearray`` (a ``memoryview``, from :attr:`FrameReader.PAGES` bytes
    up), with no copy on either side of the socket."""
    if type(value) is bytes:
        return Bulk(value) if len(value) >= OUT_OF_BAND else value
    if type(value) is tuple:
        return tuple(Bulk(v) if type(v) is bytes and len(v) >= OUT_OF_BAND else v for v in value)
    return value


class FrameReader:
    """Feeds on stream chunks (:meth:`feed`), or lends the stream its own buffers to read into
    (:meth:`get_buffer` and :meth:`buffer_updated`, for an :class:`asyncio.BufferedProtocol`); either
    way yields each complete message.

    A frame with buffers gets a ``bytearray`` of its own for its pickle and for each buffer, allocated
    once its length is known and never reused, so messages are rebuilt on them without a copy, and a
    large buffer is read from the socket straight into its place (no growing buffer to append to and
    cut). A small frame without buffers that arrived whole is unpickled where it lies."""

    SCRATCH = 256 * 1024  # small frames are read many at a time into this, then copied to their place
    PAGES = 1 << 20  # parts this large or larger go into fresh pages (mmap), which bytearray() would zero-fill

    def __init__(self) -> None:
        self._head = bytearray()  # the header and buffer lengths of the frame now arriving
        self._parts: list[bytearray] | None = None  # its pickle and buffers, once their lengths are known
        self._index = 0  # the part now filling
        self._filled = 0  # of it, the bytes there already
        self._scratch = bytearray(self.SCRATCH)
        self._direct = False  # whether the last get_buffer lent the part now filling itself

    @property
    def midway(self) -> bool:
        """Whether a frame has begun to arrive and is not whole yet (its parts, in memory, filling)."""
        return bool(self._head) or self._parts is not None

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[Any]:
        view = memoryview(data).cast("B")
        while view:
            if self._parts is None:
                if not self._head and len(view) >= HEADER.size:
                    # a whole small frame with no buffers, as most are: unpickled where it lies (2.9 us
                    # a message through the parts below, 1 here)
                    size, count = HEADER.unpack_from(view)
                    end = HEADER.size + size
                    if count == 0 and len(view) >= end:
                        message = pickle.loads(view[HEADER.size:end])
                        view = view[end:]
                        yield message
                        continue
                view = self._read_head(view)
                continue
            part = self._parts[self._index]
            n = min(len(part) - self._filled, len(view))
            part[self._filled : self._filled + n] = view[:n]
            self._filled += n
            view = view[n:]
            message = self._advance()
            if message is not None:
                yield message[0]

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the stream should put its next bytes: the part now filling, if it still needs at least
        :attr:`SCRATCH` bytes, else the scratch buffer."""
        if self._parts is not None and len(self._parts[self._index]) - self._filled >= self.SCRATCH:
            self._direct = True
            return memoryview(self._parts[self._index])[self._filled :]
        self._direct = False
        return memoryview(self._scratch)

    def buffer_updated(self, nbytes: int) -> list:
        """The messages the ``nbytes`` just put in the buffer :meth:`get_buffer` lent complete."""
        if not self._direct:
            return list(self.feed(memoryview(self._scratch)[:nbytes]))
        self._filled += nbytes
        message = self._advance()
        return [] if message is None else [message[0]]

    def _read_head(self, view: memoryview) -> memoryview:
        need = HEADER.size
        if len(self._head) >= HEADER.size:
            need += HEADER.unpack_from(self._head)[1] * LENGTH.size
        take = min(need - len(self._head), len(view))
        self._head += view[:take]
        if len(self._head) == need and need > HEADER.size or (
            need == HEADER.size and len(self._head) == need and HEADER.unpack_from(self._head)[1] == 0
        ):
            size, count = HEADER.unpack_from(self._head)
            lengths = [LENGTH.unpack_from(self._head, HEADER.size + i * LENGTH.size)[0] for i in range(count)]
            self._parts = [self._part(size), *(self._part(n) for n in lengths)]
            self._index = self._filled = 0
            self._head = bytearray()
        return view[take:]

    def _part(self, size: int) -> bytearray | memoryview:
        # bytearray(size) writes size zeros first: 0.1 s of the event loop for 200 MB. Fresh anonymous
        # pages cost nothing until the socket's bytes land on them, a few megabytes at a time.
        return bytearray(size) if size < self.PAGES else memoryview(mmap.mmap(-1, size))

    def _advance(self) -> tuple[Any] | None:
        """Past every full part; the message, in a 1-tuple, once the frame is whole."""
        parts = self._parts
        while self._index < len(parts) and self._filled == len(parts[self._index]):
            self._index += 1
            self._filled = 0
        if self._index < len(parts):
            return None
        self._parts = None
        return (pickle.loads(parts[0], buffers=parts[1:]),)
