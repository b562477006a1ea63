"""Pure fault-injection decisions: what the sink answers at RCPT and at the end of DATA.

Inputs are an address, the fault flags and random draws passed in; outputs are verdicts.
No I/O, no asyncio, no ``random``: the server draws, acts on the verdict and records.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Final


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply the sink gives instead of the normal 250."""

    code: int
    text: str

    @property
    def closes(self) -> bool:
        """421: the server closes the connection after this reply (RFC 5321 3.8)."""
        return self.code == 421

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


USER_UNKNOWN: Final = Reply(550, "5.1.1 user unknown")
TRY_AGAIN: Final = Reply(451, "4.3.0 try again")
SHUTTING_DOWN: Final = Reply(421, "4.3.2 service shutting down")
TOO_BIG: Final = Reply(552, "5.3.4 message too big")
NO_STORAGE: Final = Reply(452, "4.3.1 insufficient storage")

# Local-part tag (after "+", case-insensitive) -> reply at RCPT, for that recipient only.
RCPT_TAGS: Final = {"550": USER_UNKNOWN, "451": TRY_AGAIN, "421": SHUTTING_DOWN}
# Local-part tag -> final reply to DATA, when an accepted recipient carries it.
DATA_TAGS: Final = {"552": TOO_BIG, "452": NO_STORAGE}
DROP_TAG: Final = "drop"
_SLOW_TAG: Final = re.compile(r"slow(\d+(?:\.\d+)?)(ms|s)")


@dataclass(frozen=True, slots=True)
class DataVerdict:
    """What to do once a transaction's content has arrived: wait ``delay_s``, then
    cut the connection without a reply (``drop``), or answer ``reply``, or accept (250)."""

    delay_s: float = 0.0
    drop: bool = False
    # Final reply instead of 250; the message is then not recorded.
    reply: Reply | None = None

    def merge(self, other: DataVerdict) -> DataVerdict:
        """Both verdicts at once: the longer delay, either drop, the first reply."""
        return DataVerdict(
            delay_s=max(self.delay_s, other.delay_s),
            drop=self.drop or other.drop,
            reply=self.reply if self.reply is not None else other.reply,
        )


ACCEPT: Final = DataVerdict()


@dataclass(frozen=True, slots=True)
class FaultOptions:
    """Transaction-wide faults from ``engine sink`` flags (tags need no flag)."""

    # Probability (0..1) that a transaction's final DATA reply is ``fail_code`` instead of 250.
    fail_ratio: float = 0.0
    # Code used by fail_ratio: 4xx is temporary (default 451), 5xx permanent; 421 also closes.
    fail_code: int = 451
    # Probability (0..1) that the connection is cut after the content, with no final reply.
    drop_ratio: float = 0.0
    # Delay before every final DATA reply, in milliseconds (0: none).
    delay_ms: int = 0
    # Seed of the draws behind the ratios; None seeds from the OS (not reproducible).
    seed: int | None = None

    @property
    def draws(self) -> bool:
        """Whether each transaction needs random draws (a ratio is set)."""
        return self.fail_ratio > 0 or self.drop_ratio > 0

    @property
    def active(self) -> bool:
        """Whether every transaction goes through ``decide_data`` (not only tagged ones)."""
        return self.draws or self.delay_ms > 0

    @property
    def fail_reply(self) -> Reply:
        return failure_reply(self.fail_code)


NO_FAULTS: Final = FaultOptions()


def failure_reply(code: int) -> Reply:
    """The reply for ``--fail-code``: an enhanced status of the same class (4.3.0 / 5.3.0)."""
    return Reply(code, f"{code // 100}.3.0 injected failure")


def decide_rcpt(address: str) -> Reply | DataVerdict | None:
    """What the tags of ``address`` ask for.

    A Reply: refuse this recipient at RCPT with it (the first RCPT tag wins; its DATA tags
    then do not apply). A DataVerdict: accept it, and apply the verdict at the end of DATA.
    None: accept it, nothing to do (always so without a "+").
    """
    if "+" not in address:  # the common case costs one scan
        return None
    local, at, _domain = address.rpartition("@")
    if not at:
        local = address
    verdict = ACCEPT
    for raw_tag in local.split("+")[1:]:
        tag = raw_tag.lower()
        reply = RCPT_TAGS.get(tag)
        if reply is not None:
            return reply
        reply = DATA_TAGS.get(tag)
        if reply is not None:
            verdict = verdict.merge(DataVerdict(reply=reply))
        elif tag == DROP_TAG:
            verdict = verdict.merge(DataVerdict(drop=True))
        elif (slow := _SLOW_TAG.fullmatch(tag)) is not None:
            amount = float(slow.group(1))
            delay_s = amount / 1000 if slow.group(2) == "ms" else amount
            verdict = verdict.merge(DataVerdict(delay_s=delay_s))
    return None if verdict == ACCEPT else verdict


def decide_data(
    tagged: DataVerdict | None,
    options: FaultOptions,
    *,
    drop_draw: float = 1.0,
    fail_draw: float = 1.0,
) -> DataVerdict:
    """The verdict at the end of DATA.

    ``tagged`` merges the DataVerdicts of the transaction's accepted recipients. The draws
    are uniform in [0, 1), drawn for every transaction when a ratio is set (so a seed
    fixes the outcome of the n-th transaction). Tags win over ratios, a drop over a reply;
    the delay is the longer of the tags' and ``--delay-ms``.
    """
    verdict = tagged if tagged is not None else ACCEPT
    if options.delay_ms > 0:
        verdict = replace(verdict, delay_s=max(verdict.delay_s, options.delay_ms / 1000))
    if verdict.drop or verdict.reply is not None:
        return verdict
    if drop_draw < options.drop_ratio:
        return replace(verdict, drop=True)
    if fail_draw < options.fail_ratio:
        return replace(verdict, reply=options.fail_reply)
    return verdict


# Keys a control file (``engine sink --control FILE``) may set; each overrides its flag.
CONTROL_KEYS: Final = ("fail_ratio", "fail_code", "drop_ratio", "delay_ms")


def control_faults(flags: FaultOptions, control: object) -> FaultOptions:
    """The faults in force while a control file holds ``control`` (its parsed JSON).

    ``None`` (no file) gives ``flags`` back. Otherwise ``control`` must be a JSON object
    with some of ``CONTROL_KEYS``; each present key overrides its flag, the others keep
    the flag's value (and the seed stays the flag's). Raises ValueError naming the key.
    """
    if control is None:
        return flags
    if not isinstance(control, dict):
        raise ValueError("the control file must hold a JSON object")
    unknown = sorted(set(control) - set(CONTROL_KEYS))
    if unknown:
        raise ValueError(f"unknown control keys {unknown}; known: {list(CONTROL_KEYS)}")
    values = {key: control[key] for key in CONTROL_KEYS if key in control}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{key} must be a finite number, got {value!r}")
    for key in ("fail_ratio", "drop_ratio"):
        if key in values and not 0 <= values[key] <= 1:
            raise ValueError(f"{key} must be between 0 and 1, got {values[key]}")
    for key in ("fail_code", "delay_ms"):
        if key in values and values[key] != int(values[key]):
            raise ValueError(f"{key} must be a whole number, got {values[key]}")
    if "fail_code" in values and not 400 <= values["fail_code"] <= 599:
        raise ValueError(f"fail_code must be a 4xx or 5xx code, got {values['fail_code']}")
    if "delay_ms" in values and values["delay_ms"] < 0:
        raise ValueError(f"delay_ms must not be negative, got {values['delay_ms']}")
    return replace(
        flags,
        fail_ratio=float(values.get("fail_ratio", flags.fail_ratio)),
        fail_code=int(values.get("fail_code", flags.fail_code)),
        drop_ratio=float(values.get("drop_ratio", flags.drop_ratio)),
        delay_ms=int(values.get("delay_ms", flags.delay_ms)),
    )
