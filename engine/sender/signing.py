"""DKIM for the senders: this replica's signing keys -- the settings' and those added
through ``/v1/domains``, reloaded when the shared version counter moves (polled every
``dkim.refresh_s``) -- and ``Signer.sign``, which a sender calls right after composing.

Signing never fails a send: a mail whose signature cannot be made (a bug, a key
OpenSSL refuses) goes out unsigned, logged and counted.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, NoReturn

import msgspec
import trio

from engine.config import DkimSettings
from engine.domainkeys import DomainRecord, algorithm_of
from engine.errors import QueueError
from engine.queue import DomainStore
from engine.transport import DkimKey, OutgoingMail, sign_with, signing_key

log = logging.getLogger(__name__)

# Above this many bytes even an Ed25519 signature is made in a worker thread: the
# body's canonical form and hash take ~10 ms a MiB of Python and C, all on the loop.
SIGN_THREAD_ABOVE_BYTES: Final = 256 * 1024

_decode_record = msgspec.json.Decoder(DomainRecord).decode


@dataclass(frozen=True, slots=True)
class SignerStatistics:
    domains: int  # signing domains known (settings and API)
    version: int  # of the API's domains last loaded; -1: not yet
    signed: int
    failed: int  # sent unsigned because the signature could not be made


class Signer:
    def __init__(
        self,
        configured: Mapping[str, DkimKey] | None = None,
        store: DomainStore | None = None,
        *,
        refresh_s: float = 2.0,
        rsa_in_thread: bool = False,
    ) -> None:
        self.store = store
        self.refresh_s = refresh_s
        self.rsa_in_thread = rsa_in_thread
        self.version = -1
        self._configured = dict(configured or {})
        self._stored: dict[str, tuple[bytes, DkimKey]] = {}  # domain -> (record, key)
        self._keys: Mapping[str, DkimKey] = self._configured
        # One signature per core at a time: more threads would only queue for the CPU.
        self._limiter = trio.CapacityLimiter(os.cpu_count() or 1)
        self._signed = self._failed = 0

    @classmethod
    def from_settings(cls, settings: DkimSettings, store: DomainStore | None) -> Signer:
        """The settings' keys read from their files (checked when settings were loaded)."""
        configured = {}
        for entry in settings.keys:
            with open(entry.private_key_file, "rb") as f:
                pem = f.read()
            key = DkimKey(
                entry.domain, entry.selector, algorithm_of(entry.algorithm), pem, checked=False
            )
            configured[key.domain] = key
        return cls(
            configured, store, refresh_s=settings.refresh_s, rsa_in_thread=settings.rsa_in_thread
        )

    def keys(self) -> Mapping[str, DkimKey]:
        """Domain (A-labels) -> its key, now. Not to be changed."""
        return self._keys

    def statistics(self) -> SignerStatistics:
        return SignerStatistics(len(self._keys), self.version, self._signed, self._failed)

    async def load(self) -> None:
        """Read the API's domains (at start, and when the version moved)."""
        if self.store is None:
            return
        version, records = await self.store.snapshot()
        stored: dict[str, tuple[bytes, DkimKey]] = {}
        for domain, raw in records.items():
            known = self._stored.get(domain)
            if known is not None and known[0] == raw:
                stored[domain] = known  # unchanged: no parsing again
                continue
            try:
                record = _decode_record(raw)
                key = DkimKey(
                    record.domain, record.selector, record.algorithm,
                    record.private_key.encode(), checked=False,
                )  # fmt: skip
            except (msgspec.DecodeError, ValueError) as exc:  # one bad record spoils no other
                log.error("sender.dkim.unreadable domain=%s error=%s", domain, exc)
                continue
            stored[domain] = (raw, key)
        self._stored = stored
        self._keys = {**{d: k for d, (_, k) in stored.items()}, **self._configured}
        self.version = version
        log.info("sender.dkim.loaded domains=%d version=%d", len(self._keys), version)

    async def serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Reload whenever the shared version moves; a Redis outage keeps the last copy
        (at start: the settings' keys only, until Redis answers)."""
        await self._refresh()
        task_status.started()
        while True:
            await trio.sleep(self.refresh_s)
            await self._refresh()

    async def _refresh(self) -> None:
        if self.store is None:
            return
        try:
            if self.version < 0 or await self.store.version() != self.version:
                await self.load()
        except QueueError as exc:
            log.warning("sender.dkim.refresh.failed error=%s", exc)

    async def sign(self, mail: OutgoingMail) -> OutgoingMail:
        """``mail`` signed when its From domain has a key; else (or when the signature
        cannot be made) ``mail`` itself. Raises only Cancelled. ``sign_many`` for a
        batch: one thread hop for all its RSA signatures."""
        return (await self.sign_many([mail]))[0]

    async def sign_many(self, mails: list[OutgoingMail]) -> list[OutgoingMail]:
        """Each of ``mails`` signed when its From domain has a key, in order (a mail
        whose signature cannot be made goes unsigned). Raises only Cancelled.

        Large mails, and RSA signatures with ``rsa_in_thread``, go to one worker thread
        for the whole batch: OpenSSL releases the GIL while it computes (~0.4 ms an RSA
        2048 signature) and the loop goes on sending; a hop costs the loop ~100 us of
        CPU, so one per batch (~16 us a mail for 32), not per mail. The thread is
        waited for on cancellation (a batch of 32 RSA signatures: ~15 ms).
        """
        keys = self._keys
        if not keys:
            return mails
        out = list(mails)
        away: list[tuple[int, DkimKey]] = []
        for i, mail in enumerate(mails):
            key = signing_key(mail, keys)
            if key is None:
                continue
            if len(mail.data) > SIGN_THREAD_ABOVE_BYTES or (
                self.rsa_in_thread and key.algorithm == "rsa-sha256"
            ):
                away.append((i, key))
            else:
                out[i] = self._counted(mail, key, _signed_or_error(mail, key))
        if away:
            done = await trio.to_thread.run_sync(
                _sign_all, [(mails[i], key) for i, key in away], limiter=self._limiter
            )
            for (i, key), result in zip(away, done, strict=True):
                out[i] = self._counted(mails[i], key, result)
        return out

    def _counted(
        self, mail: OutgoingMail, key: DkimKey, result: OutgoingMail | Exception
    ) -> OutgoingMail:
        if isinstance(result, Exception):
            self._failed += 1
            log.error(
                "sender.dkim.failed job=%s domain=%s error=%r", mail.job_id, key.domain, result
            )
            return mail
        self._signed += 1
        return result


def _signed_or_error(mail: OutgoingMail, key: DkimKey) -> OutgoingMail | Exception:
    try:
        return sign_with(mail, key)
    except Exception as exc:  # a bug or a key OpenSSL refuses: the mail goes unsigned
        return exc


def _sign_all(batch: list[tuple[OutgoingMail, DkimKey]]) -> list[OutgoingMail | Exception]:
    return [_signed_or_error(mail, key) for mail, key in batch]
