"""One accepted TCP socket, read and written without Trio's stream wrappers: a read or a
write that the kernel can do at once costs one syscall and no scheduler round trip; only
waits (readable, writable) go through Trio, each under its deadline."""

from __future__ import annotations

import contextlib
import errno
import math
import socket

import trio
from trio.lowlevel import checkpoint, notify_closing, wait_readable, wait_writable

READ_BYTES = 64 * 1024  # one read; also how far a pipelining client can get ahead of us
_LINGER_S = 2.0  # lingering close: how long we read and discard after our last answer
_LINGER_BYTES = 1024 * 1024  # ... and how much

_BROKEN = (ConnectionError, TimeoutError)  # reset, aborted, broken pipe, TCP_USER_TIMEOUT


class ClientDisconnected(OSError):
    """The client is gone (reset, closed, or stopped reading past the write deadline).
    ASGI asks a server to raise an OSError subclass from ``send`` on a closed connection."""


class Stream:
    __slots__ = ("broken", "eof", "sock", "write_timeout_s")

    def __init__(self, sock: socket.socket, write_timeout_s: float) -> None:
        self.sock = sock
        self.write_timeout_s = write_timeout_s if write_timeout_s > 0 else math.inf
        self.eof = False  # the client sent FIN (or reset): nothing more will come
        self.broken = False  # a write failed: nothing more can be sent

    def recv_nowait(self) -> bytes | None:
        """What the kernel holds (b"" at EOF), or None when it holds nothing yet."""
        try:
            data = self.sock.recv(READ_BYTES)
        except BlockingIOError:
            return None
        except _BROKEN:
            data = b""
        if not data:
            self.eof = True
        return data

    async def recv(self, deadline: float) -> bytes | None:
        """The next bytes (b"" at EOF), or None when ``deadline`` passed."""
        data = self.recv_nowait()
        if data is not None:
            # A client that keeps us busy (pipelining) must not starve the other tasks.
            await checkpoint()
            return data
        return await self.recv_within(trio.CancelScope(deadline=deadline))

    async def recv_within(self, scope: trio.CancelScope) -> bytes | None:
        """The next bytes (b"" at EOF), waiting inside ``scope`` (its deadline, or the
        caller's handle to end the wait early); None when the scope ended the wait."""
        data = None
        with scope:
            data = await self.recv_wait()
        return data

    async def recv_wait(self) -> bytes:
        """Wait for the next bytes (b"" at EOF); the caller bounds the wait."""
        while True:
            await wait_readable(self.sock)
            data = self.recv_nowait()
            if data is not None:
                return data

    async def write(self, data: bytes) -> None:
        """Send all of ``data``; ClientDisconnected when the client is gone or leaves it
        unread past the write deadline. Does not yield when the kernel takes it at once."""
        if self.broken:
            raise ClientDisconnected("connection closed")
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except _BROKEN as exc:
            self.broken = True
            raise ClientDisconnected(str(exc)) from None
        if sent < len(data):
            await self._write_rest(memoryview(data)[sent:])

    async def write_parts(self, head: bytes, body: bytes) -> None:
        """Send ``head`` then ``body`` in one vectored write, without joining them."""
        if self.broken:
            raise ClientDisconnected("connection closed")
        try:
            sent = self.sock.sendmsg((head, body))
        except BlockingIOError:
            sent = 0
        except _BROKEN as exc:
            self.broken = True
            raise ClientDisconnected(str(exc)) from None
        if sent < len(head):
            await self._write_rest(memoryview(head)[sent:])
            sent = len(head)
        if sent - len(head) < len(body):
            await self._write_rest(memoryview(body)[sent - len(head) :])

    async def _write_rest(self, view: memoryview) -> None:
        deadline = trio.current_time() + self.write_timeout_s
        try:
            with trio.move_on_at(deadline):
                while view:
                    await wait_writable(self.sock)
                    with contextlib.suppress(BlockingIOError):
                        view = view[self.sock.send(view) :]
                return
        except _BROKEN as exc:
            self.broken = True
            raise ClientDisconnected(str(exc)) from None
        except BaseException:
            # Cancelled halfway through a write: what was sent cannot be taken back.
            self.broken = True
            raise
        self.broken = True
        raise ClientDisconnected("client stopped reading (write deadline passed)")

    async def linger(self) -> None:
        """Half-close, then read and discard what the client still sends for a moment, so
        a final answer sent before its request was read (413, 400) reaches the client
        instead of being destroyed by a reset."""
        if self.eof or self.broken:
            return
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        left = _LINGER_BYTES
        deadline = trio.current_time() + _LINGER_S
        while left > 0:
            data = await self.recv(deadline)
            if not data:  # EOF or deadline
                return
            left -= len(data)

    def close(self) -> None:
        notify_closing(self.sock)
        self.sock.close()


def accept_errno_is_transient(exc: OSError) -> bool:
    """Out of file descriptors or memory: back off and retry rather than fail."""
    return exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS)


def accept_errno_is_aborted(exc: OSError) -> bool:
    """The client gave up before we accepted it: try the next one."""
    return exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ECONNRESET)
