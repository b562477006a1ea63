"""Redis memory of suppression lists: fill one tenant's list with N addresses through
``SuppressionStore`` (as an import does) and read ``INFO memory``; then the same number
of entries shaped like a hard bounce's (reason = the server's reply, source = a message
id, bounce class), as fail.lua writes them. Prints bytes per entry and MB per million.

    .venv/bin/python -m scripts.suppression_memory [N]      (default 1000000)
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Awaitable, Callable

import msgspec
import trio

from engine.embedded import RedisServer
from engine.ids import new_id
from engine.keys import Keys
from engine.queue import Redis, SuppressionStore, open_redis

DOMAINS = [f"mail{i}.example-{i * 7 % 13}.com" for i in range(50)]
BOUNCE = (
    "all 1 recipients refused, first {a}: 550 5.1.1 The email account that you tried to "
    "reach does not exist"
)


CHUNK = 10_000
Filler = Callable[[Redis, Keys, int], Awaitable[None]]


def address(i: int) -> str:
    """~30 characters, like first.last1234@provider.com."""
    return f"user.{i:07d}@{DOMAINS[i % len(DOMAINS)]}"


async def fill_imported(client: Redis, keys: Keys, n: int) -> None:
    store = SuppressionStore(client, keys)
    for start in range(0, n, CHUNK):
        await store.add("acme", {address(i): "import" for i in range(start, start + CHUNK)})


async def fill_bounced(client: Redis, keys: Keys, n: int) -> None:
    encode = msgspec.json.Encoder().encode
    for start in range(0, n, CHUNK):
        batch = [address(i) for i in range(start, start + CHUNK)]
        async with client.pipeline(transaction=False) as p:
            p.sadd(keys.suppressed("acme"), batch)
            p.hset(keys.suppression_info("acme"), {
                a: encode({"reason": BOUNCE.format(a=a), "source": new_id(),
                           "bounce": "invalid-recipient", "at": 1_718_000_000_000})
                for a in batch
            })  # fmt: skip


async def measure(url: str, n: int, what: str, fill: Filler) -> None:
    keys = Keys()
    async with open_redis(url) as client:
        base = int((await client.info("memory"))["used_memory"])
        await fill(client, keys, n)
        total = int((await client.info("memory"))["used_memory"]) - base
        set_bytes = await client.memory_usage(keys.suppressed("acme"), samples=0) or 0
        hash_bytes = await client.memory_usage(keys.suppression_info("acme"), samples=0) or 0
    per = total / n
    print(
        f"{what}: {n} entries, used_memory +{total / 2**20:.1f} MiB = {per:.0f} B/entry "
        f"= {per * 1e6 / 2**20:.0f} MiB per million (MEMORY USAGE: set {set_bytes / n:.0f} B, "
        f"hash {hash_bytes / n:.0f} B per entry)"
    )


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    shapes = [("imported (reason 'import')", fill_imported),
              ("hard bounces (fail.lua's shape)", fill_bounced)]  # fmt: skip
    for what, fill in shapes:  # a fresh server each: nothing freed lazily in between
        with (
            tempfile.TemporaryDirectory(prefix="supp-mem-") as tmp,
            RedisServer(tmp, appendonly=False, maxmemory_bytes=8 * 2**30) as server,
        ):
            trio.run(measure, server.url, n, what, fill)


if __name__ == "__main__":
    main()
