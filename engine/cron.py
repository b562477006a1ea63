"""Cron expressions of recurring schedules: validation and the next tick, DST-correct.

Pure (no I/O, no clock): standard 5-field cron in an IANA time zone, via cronsim and
zoneinfo. Imports only ``engine.errors``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from engine.errors import ValidationError

# The shorthands of Vixie cron; @reboot has no meaning for a schedule.
_ALIASES: Final = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
MAX_CRON_CHARS: Final = 200
# Fixed probe start for "does this expression ever fire" (any instant would do).
_PROBE: Final = datetime(2000, 1, 1, tzinfo=UTC)


def check_cron(expr: str) -> str:
    """Validate a 5-field cron expression (or an @alias); returns it normalized
    (single spaces, aliases expanded). Raises ValidationError on field ``cron``.

    A sixth (seconds) field is refused: a schedule fires at most once a minute.
    """
    if not isinstance(expr, str) or len(expr) > MAX_CRON_CHARS:
        raise ValidationError("cron", f"a cron expression of at most {MAX_CRON_CHARS} characters")
    text = " ".join(expr.split())
    text = _ALIASES.get(text.lower(), text)
    fields = text.split(" ")
    if len(fields) != 5:
        raise ValidationError("cron", "needs 5 fields: minute hour day-of-month month day-of-week")
    try:
        it = CronSim(text, _PROBE)
    except CronSimError as exc:
        raise ValidationError("cron", f"{text!r}: {exc}") from None
    try:
        next(it)
    except StopIteration:
        raise ValidationError("cron", f"{text!r} never fires") from None
    return text


@lru_cache(maxsize=256)
def zone(name: str) -> ZoneInfo:
    """The IANA zone ``name`` (e.g. ``Europe/Berlin``); raises ValidationError on
    field ``timezone``."""
    if not name or len(name) > 64 or name.startswith(("/", ".")) or ".." in name:
        raise ValidationError("timezone", f"{name!r} is not an IANA time zone")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValidationError("timezone", f"{name!r} is not an IANA time zone") from None


def check_timezone(name: str) -> str:
    """Validate an IANA time-zone name; returns it unchanged."""
    zone(name)
    return name


def next_tick_ms(expr: str, tz: str, after_ms: int) -> int:
    """First tick of ``expr`` in zone ``tz`` strictly after ``after_ms`` (epoch ms).

    Wall-clock times skipped by a DST change fire at the first valid minute after the
    gap; times repeated by one fire once, on their first occurrence (Debian cron).
    Raises ValidationError when the expression or zone is invalid or never fires again.
    """
    start = datetime.fromtimestamp(after_ms / 1000, tz=zone(tz))
    try:
        it = CronSim(expr, start)
        while True:
            tick = int(next(it).timestamp() * 1000)
            # cronsim iterates specific times in naive local time; started inside a
            # repeated hour (second pass) it can answer that hour's first pass.
            if tick > after_ms:
                return tick
    except CronSimError as exc:
        raise ValidationError("cron", f"{expr!r}: {exc}") from None
    except StopIteration:
        raise ValidationError("cron", f"{expr!r} never fires again") from None
