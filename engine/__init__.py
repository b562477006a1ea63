"""Email-delivery engine: HTTP ingest -> reliable Redis queue -> pooled SMTP senders, on Trio.

Layers (imports point down only; enforced by import-linter in pyproject.toml):

    cli -> service (composition root: the only place the whole task tree is visible)
             -> api (HTTP ingest, status; never imports sender/transport)
             -> http (HTTP/1.1 + WebSocket server for ASGI; knows nothing of email)
             -> sender, reaper, embedded
                  -> queue (the only code that talks to Redis; Lua in queue/lua)
                  -> transport (SMTP client pool, in-memory transport)
                       -> policy (pure decisions: token bucket, backoff, classification)
                            -> models, errors, config, keys, ids (leaves)
                                 -> domainkeys (DKIM key material: settings check it)
    cli -> sink (asyncio/aiosmtpd in its own process, imported lazily)
    cli -> watch (websocket client of WS /v1/events; imports the leaves only)
"""

__version__ = "0.1.0"
