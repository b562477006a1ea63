"""A lean RESP connection for the hot stream reads (the webhook dispatcher's XREADGROUP
and XAUTOCLAIM): hiredis parses the reply in C, Trio moves the bytes, nothing else runs.

Why not coredis for these: reading a stream entry through coredis costs ~13 µs of CPU (its
reply pipeline and response callbacks); through this, ~1.2 µs (measured: 20,000 entries,
500 a read; README "Webhooks"). The dispatcher reads three entries' worth per message, so
that is most of what webhooks add to the engine's CPU. Everything else stays on coredis.

One connection, one command at a time. A command that fails in any way (timeout,
cancellation, a broken socket) closes the connection -- its state is unknown -- and the next
command opens a new one. Error replies raise ``QueueError``; the rest ``QueueUnavailable``.
"""

from __future__ import annotations

import ssl
from typing import Any, Final, cast
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis
import trio

from engine.config import redact_url
from engine.errors import ConfigError, QueueError, QueueUnavailable

_READ_BYTES: Final = 256 * 1024


def _pack(args: tuple[str | bytes | int, ...]) -> bytes:
    # hiredis's stub types the tuple as one element long; any length is packed.
    packed: bytes = hiredis.pack_command(cast(Any, args))
    return packed


class RespConnection:
    """``await conn.call("XREADGROUP", ...)``: the decoded reply (bytes, ints, lists, None)."""

    def __init__(
        self, url: str, *, connect_timeout_s: float = 5.0, command_timeout_s: float = 5.0
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ConfigError(f"redis.url {redact_url(url)!r}: unsupported scheme")
        query = parse_qs(parts.query)
        self._unix = parts.path if parts.scheme == "unix" else ""
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 6379
        self._tls: ssl.SSLContext | None = None
        if parts.scheme == "rediss":  # the query options coredis takes for rediss://
            ca = query.get("ssl_ca_certs", [None])[0]
            self._tls = ssl.create_default_context(cafile=ca)
            if query.get("ssl_cert_reqs", [""])[0].lower() == "none":
                self._tls.check_hostname, self._tls.verify_mode = False, ssl.CERT_NONE
        self._username = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        db = query.get("db", [""])[0] or (parts.path.strip("/") if not self._unix else "")
        self._db = int(db) if db.isdigit() else 0
        self._url = url
        self._connect_timeout_s = connect_timeout_s
        self._command_timeout_s = command_timeout_s
        self._stream: trio.abc.Stream | None = None
        self._reader = hiredis.Reader()
        self._lock = trio.Lock()

    async def call(self, *args: str | bytes | int, block_s: float = 0.0) -> Any:
        """Run one command; ``block_s``: how long the server may hold it (BLOCK)."""
        async with self._lock:
            try:
                with trio.fail_after(self._command_timeout_s + block_s):
                    stream = self._stream or await self._connect()
                    reply = await self._exchange(stream, _pack(args))
            except BaseException as exc:
                await self._drop()
                if isinstance(exc, trio.TooSlowError):
                    raise QueueUnavailable("redis unavailable: no answer in time") from None
                if isinstance(exc, (OSError, trio.BrokenResourceError, hiredis.ProtocolError)):
                    raise QueueUnavailable(
                        f"redis unavailable: {exc or type(exc).__name__}"
                    ) from exc
                raise
        if isinstance(reply, hiredis.ReplyError):
            raise QueueError(f"redis error: {reply}")
        return reply

    def twin(self) -> RespConnection:
        """Another connection to the same server, with the same settings."""
        return RespConnection(
            self._url, connect_timeout_s=self._connect_timeout_s,
            command_timeout_s=self._command_timeout_s,
        )  # fmt: skip

    async def aclose(self) -> None:
        await self._drop()

    async def _exchange(self, stream: trio.abc.Stream, command: bytes) -> Any:
        await stream.send_all(command)
        while (reply := self._reader.gets()) is False:
            data = await stream.receive_some(_READ_BYTES)
            if not data:
                raise trio.BrokenResourceError("redis closed the connection")
            self._reader.feed(bytes(data))
        return reply

    async def _connect(self) -> trio.abc.Stream:
        with trio.fail_after(self._connect_timeout_s):
            stream: trio.abc.Stream
            if self._unix:
                stream = await trio.open_unix_socket(self._unix)
            else:
                stream = await trio.open_tcp_stream(self._host, self._port)
            if self._tls is not None:
                tls = trio.SSLStream(stream, self._tls, server_hostname=self._host)
                await tls.do_handshake()
                stream = tls
            self._stream, self._reader = stream, hiredis.Reader()
            if self._password is not None:
                auth = (self._username, self._password) if self._username else (self._password,)
                await self._setup(stream, "AUTH", *auth)
            if self._db:
                await self._setup(stream, "SELECT", self._db)
        return stream

    async def _setup(self, stream: trio.abc.Stream, *args: str | int) -> None:
        reply = await self._exchange(stream, _pack(args))
        if isinstance(reply, hiredis.ReplyError):
            raise QueueError(f"redis error: {args[0]}: {reply}")

    async def _drop(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            await trio.aclose_forcefully(stream)
