"""Dead-letter queue routes: list, retry one / many / all, delete."""

from __future__ import annotations

import msgspec

from engine.api.exchange import (
    Fail,
    Reply,
    Request,
    decode_json,
    empty_reply,
    json_reply,
    not_found,
)
from engine.auth import Principal
from engine.ids import is_id
from engine.models import Accepted, JobView, ms_to_iso
from engine.queue import Queue, job_view

MAX_PAGE = 500
# Dead letters a tenant-restricted key's listing reads at most (oldest first).
MAX_TENANT_SCAN = 10_000
# The retry filter is small: ids of one page at most, and a needle.
MAX_FILTER_BYTES = 1024 * 1024


class RetryFilter(msgspec.Struct, forbid_unknown_fields=True):
    """Body of POST /v1/dead/retry; empty body or {} retries everything."""

    ids: list[str] | None = None
    error_contains: str | None = None


class DeadPage(msgspec.Struct):
    total: int
    offset: int
    limit: int
    next_offset: int | None
    items: list[JobView]


class DeadRetried(msgspec.Struct, omit_defaults=True):
    retried: int
    ids: list[str]
    # Not re-queued: past their deliver-by deadline (they stay dead letters).
    expired: list[str] = []
    # Not re-queued: every recipient they still owed is suppressed now (they end in
    # the state "suppressed", no longer dead letters).
    suppressed: list[str] = []


_decode_filter = msgspec.json.Decoder(RetryFilter).decode


def _not_dead(job_id: str) -> Exception:
    return not_found("Not in the dead-letter queue", f"id {job_id!r}")


class DeadRoutes:
    """Handlers of the /v1/dead routes."""

    def __init__(self, queue: Queue) -> None:
        self._queue = queue

    async def list_dead(self, req: Request) -> Reply:
        offset = req.int_query("offset", 0, 0, 10**9)
        limit = req.int_query("limit", 50, 1, MAX_PAGE)
        if req.principal.tenants is not None:  # a tenant's key pages through its own
            return json_reply(200, await self._tenant_page(req.principal, offset, limit))
        total, records = await self._queue.dead_page(offset, limit)
        following = offset + limit if offset + limit < total else None
        page = DeadPage(total, offset, limit, following, [job_view(r) for r in records])
        return json_reply(200, page)

    async def _tenant_page(self, p: Principal, offset: int, limit: int) -> DeadPage:
        """The dead letters of ``p``'s tenants: the list is filtered by reading records
        (at most MAX_TENANT_SCAN of the oldest; a tenant key is not an operator's view)."""
        ids = (await self._queue.dead_ids())[:MAX_TENANT_SCAN]
        mine = [r for r in await self._queue.get_many(ids) if r is not None and p.sees(r.tenant)]
        page = mine[offset : offset + limit]
        following = offset + limit if offset + limit < len(mine) else None
        return DeadPage(len(mine), offset, limit, following, [job_view(r) for r in page])

    async def _visible(self, p: Principal, ids: list[str]) -> list[str]:
        """``ids`` narrowed to the jobs of ``p``'s tenants."""
        if p.tenants is None:
            return ids
        records = await self._queue.get_many(ids)
        return [r.id for r in records if r is not None and p.sees(r.tenant)]

    async def retry_dead(self, req: Request) -> Reply:
        job_id = req.params["id"]
        if not (is_id(job_id) and await self._visible(req.principal, [job_id])):
            raise _not_dead(job_id)
        done = await self._queue.dead_requeue([job_id])
        if job_id in done.expired:
            raise Fail(
                409, "deadline-passed", "Past its deadline",
                f"the message had to be sent by {ms_to_iso(done.expired[job_id])} "
                "(expires_at): sent now it would be late, so it stays a dead letter",
            )  # fmt: skip
        if job_id in done.suppressed:
            return json_reply(200, Accepted(job_id, "suppressed"))
        if not done.retried:
            raise _not_dead(job_id)
        return json_reply(202, Accepted(job_id, "queued"))

    async def retry_dead_many(self, req: Request) -> Reply:
        raw = await req.body(MAX_FILTER_BYTES, "the retry filter's limit")
        flt = decode_json(_decode_filter, raw) if raw.strip() else RetryFilter()
        queue = self._queue
        ids = [i for i in (flt.ids if flt.ids is not None else await queue.dead_ids()) if is_id(i)]
        ids = await self._visible(req.principal, ids)
        if flt.error_contains:
            needle = flt.error_contains.lower()
            records = await queue.get_many(ids)
            ids = [r.id for r in records if r and r.last_error and needle in r.last_error.lower()]
        done = await queue.dead_requeue(ids)
        return json_reply(
            202, DeadRetried(len(done.retried), done.retried, list(done.expired), done.suppressed)
        )

    async def delete_dead(self, req: Request) -> Reply:
        job_id = req.params["id"]
        if not (
            is_id(job_id)
            and await self._visible(req.principal, [job_id])
            and await self._queue.dead_delete([job_id])
        ):
            raise _not_dead(job_id)
        return empty_reply(204)
