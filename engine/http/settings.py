"""The server's settings: one frozen struct, units in the names, every default explained.

Until ``engine.config.HttpSettings`` carries these fields, ``ServerSettings.from_http``
takes the ones it has (bind, max_body_bytes, stalled_client_timeout_s) and defaults the rest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from engine.config import HttpSettings


@dataclass(frozen=True, slots=True)
class ServerSettings:
    # HOST:PORT to listen on ("[::1]:8080" for IPv6; port 0 picks a free one).
    bind: str = "127.0.0.1:8080"
    # A request body above this many bytes gets 413: at once when Content-Length says so
    # (no 100 Continue is sent), as soon as it passes the limit when chunked. The same
    # default as http.max_body_bytes (engine.config.HttpSettings explains it).
    max_body_bytes: int = 2 * 1024 * 1024
    # Request paths whose bodies have their own limit instead, as (path, bytes) pairs,
    # e.g. an upload route: matched exactly, the query aside. The application still
    # checks its own limits; this one is the parser's.
    body_limits: tuple[tuple[str, int], ...] = ()
    # Seconds a client may leave what we send it unread before its connection is dropped:
    # each socket write's deadline, and TCP_USER_TIMEOUT (Linux) for what the kernel
    # holds. 0 = no write deadline and the system's default.
    stalled_client_timeout_s: float = 30.0
    # Open connections at most; at the cap the server stops accepting (the kernel's
    # backlog holds new ones) until one closes. Websockets count.
    max_connections: int = 1000
    # Seconds an idle keep-alive connection stays open between requests. Above the 60 s
    # idle timeout of common load balancers, so they, not we, close first.
    keep_alive_timeout_s: float = 75.0
    # Seconds from the first byte of a request to the end of its head (slowloris), and
    # for a new connection to send its first request: 408 then close.
    head_timeout_s: float = 10.0
    # Seconds without a body byte while the application waits for the body: 408 (or a
    # close when the response has started).
    body_timeout_s: float = 30.0
    # Bytes of the request target (path and query) at most: 414.
    max_url_bytes: int = 8 * 1024
    # Request header fields at most (trailers count too): 431.
    max_headers: int = 100
    # Bytes of all request header names and values together at most: 431.
    max_header_bytes: int = 16 * 1024
    # Bytes (or characters, for text) of one incoming websocket message at most: close
    # 1009. The event hub's clients send nothing; 1 MiB is what clients usually accept.
    ws_max_message_bytes: int = 1024 * 1024
    # Seconds to wait for the client's close frame after ours before dropping the socket.
    ws_close_timeout_s: float = 5.0
    # Seconds graceful shutdown gives in-flight requests (and the websocket close
    # handshakes) before cancelling what is left.
    shutdown_timeout_s: float = 5.0

    @classmethod
    def from_http(
        cls, http: HttpSettings, *, body_limits: tuple[tuple[str, int], ...] = ()
    ) -> ServerSettings:
        """The server's settings from the engine's ``[http]`` table: the fields both have
        (and ``body_limits``, which the routes know)."""
        names = {f.name for f in dataclasses.fields(cls)}
        given = {name: getattr(http, name) for name in http.__struct_fields__ if name in names}
        return cls(**given, body_limits=body_limits)
