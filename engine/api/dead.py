"""Dead-letter queue routes (Quart): list, retry one / many / all, delete.

Not on the hot path, so they use Quart's routing and request objects.
"""

from __future__ import annotations

from typing import Any

import msgspec
from quart import Response, request
from quart_trio import QuartTrio

from engine.api.responses import json_response, problem_response
from engine.ids import is_id
from engine.queue import Queue, job_view

MAX_PAGE = 500


class RetryFilter(msgspec.Struct, forbid_unknown_fields=True):
    """Body of POST /v1/dead/retry; empty body or {} retries everything."""

    ids: list[str] | None = None
    error_contains: str | None = None


def _not_dead(job_id: str) -> Response:
    return problem_response(404, "not-found", "Not in the dead-letter queue", f"id {job_id!r}")


def _int_arg(name: str, default: int, low: int, high: int) -> int | Response:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        return problem_response(422, "invalid-field", "Invalid query parameter",
                        f"{name} must be an integer from {low} to {high}", name)  # fmt: skip
    return int(raw)


def register_dead_routes(app: QuartTrio, queue: Queue) -> None:
    @app.get("/v1/dead")
    async def list_dead() -> Response:
        offset = _int_arg("offset", 0, 0, 10**9)
        limit = _int_arg("limit", 50, 1, MAX_PAGE)
        if isinstance(offset, Response):
            return offset
        if isinstance(limit, Response):
            return limit
        total, records = await queue.dead_page(offset, limit)
        following = offset + limit if offset + limit < total else None
        body: dict[str, Any] = {
            "total": total, "offset": offset, "limit": limit, "next_offset": following,
            "items": [job_view(r) for r in records],
        }  # fmt: skip
        return json_response(200, body)

    @app.post("/v1/dead/<job_id>/retry")
    async def retry_one(job_id: str) -> Response:
        done = await queue.dead_retry([job_id]) if is_id(job_id) else []
        if not done:
            return _not_dead(job_id)
        return json_response(202, {"id": job_id, "state": "queued"})

    @app.post("/v1/dead/retry")
    async def retry_many() -> Response:
        raw = await request.get_data()
        try:
            flt = msgspec.json.decode(raw, type=RetryFilter) if raw.strip() else RetryFilter()
        except msgspec.ValidationError as exc:
            return problem_response(422, "invalid-field", "Invalid field", str(exc))
        except msgspec.DecodeError as exc:
            return problem_response(400, "malformed-json", "Malformed JSON", str(exc))
        ids = [i for i in (flt.ids if flt.ids is not None else await queue.dead_ids()) if is_id(i)]
        if flt.error_contains:
            needle = flt.error_contains.lower()
            records = await queue.get_many(ids)
            ids = [r.id for r in records if r and r.last_error and needle in r.last_error.lower()]
        done = await queue.dead_retry(ids)
        return json_response(202, {"retried": len(done), "ids": done})

    @app.delete("/v1/dead/<job_id>")
    async def delete_one(job_id: str) -> Response:
        done = await queue.dead_delete([job_id]) if is_id(job_id) else []
        if not done:
            return _not_dead(job_id)
        return Response(b"", status=204)
