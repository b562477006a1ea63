"""One-click unsubscribe links (RFC 8058): ``GET /u/{token}`` shows a page with a
button and changes nothing (mail scanners follow links); ``POST /u/{token}`` -- what a
mailbox provider sends for the one-click button, or the page's form -- puts the token's
address on its tenant's suppression list. No login: the signed token is the proof.
Also the headers ingest adds to a message sent with ``unsubscribe``.
"""

from __future__ import annotations

import html
from typing import Final

from engine.api.exchange import Reply, Request
from engine.auth import new_secret
from engine.config import UnsubscribeSettings
from engine.errors import ValidationError
from engine.queue import AccessStore, SuppressionStore
from engine.unsubscribe import ALL, headers, list_scope, make_token, read_token, signing_key

MAX_BODY: Final = 4096  # "List-Unsubscribe=One-Click", or the page's form
_HTML: Final = b"text/html; charset=utf-8"
# The pages load nothing and run nothing; their one form posts back to the same link.
_PAGE_HEADERS: Final = [
    (b"content-security-policy",
     b"default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
     b"frame-ancestors 'none'"),
    (b"cache-control", b"no-store"),
    (b"referrer-policy", b"no-referrer"),
]  # fmt: skip


class Unsubscribe:
    def __init__(
        self,
        access: AccessStore,
        suppressions: SuppressionStore,
        settings: UnsubscribeSettings,
        *,
        bind: str,
    ) -> None:
        self._access = access
        self._suppressions = suppressions
        self._base = settings.base_url or f"http://{bind}"
        self._mailto = settings.mailto
        self._key = b""

    async def _signing_key(self) -> bytes:
        if not self._key:
            self._key = signing_key(await self._access.secret(new_secret()))
        return self._key

    async def message_headers(
        self, tenant: str, list_: str, recipients: list[str]
    ) -> dict[str, str]:
        """The List-Unsubscribe headers of a message to ``recipients`` (exactly one:
        the link names who unsubscribes)."""
        if len(recipients) != 1:
            raise ValidationError(
                "unsubscribe",
                "one-click unsubscribe needs exactly one recipient per message (the link "
                f"names who unsubscribes); this one has {len(recipients)}: send one each",
            )
        token = make_token(await self._signing_key(), tenant, list_, recipients[0])
        return headers(self._base, token, self._mailto)

    async def unsubscribe_page(self, req: Request) -> Reply:
        found = read_token(await self._signing_key(), req.params["token"])
        if found is None:
            return _page(404, "Link not valid", "This unsubscribe link is not one of ours, "
                         "or it was changed on the way.")  # fmt: skip
        _, list_, address = found
        what = "all mail" if list_ == ALL else f"the list “{list_}”"
        return _page(
            200, "Unsubscribe",
            f"Stop sending {what} to <b>{html.escape(address)}</b>?",
            form=True,
        )  # fmt: skip

    async def unsubscribe(self, req: Request) -> Reply:
        await req.body(MAX_BODY, "the unsubscribe form's limit")  # RFC 8058: its content is fixed
        found = read_token(await self._signing_key(), req.params["token"])
        if found is None:
            return _page(404, "Link not valid", "This unsubscribe link is not one of ours, "
                         "or it was changed on the way.")  # fmt: skip
        tenant, list_, address = found
        reason = "one-click unsubscribe" + ("" if list_ == ALL else f" from list {list_}")
        await self._suppressions.add(list_scope(tenant, list_), {address: reason})
        return _page(
            200, "Unsubscribed", f"<b>{html.escape(address)}</b> will get no more of this mail."
        )


def _page(status: int, title: str, text: str, *, form: bool = False) -> Reply:
    button = (
        '<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">'
        '<button type="submit">Unsubscribe</button></form>'
        if form else ""
    )  # fmt: skip
    body = (
        "<!doctype html><html lang=en><meta charset=utf-8>"
        '<meta name="viewport" content="width=device-width">'
        f"<title>{html.escape(title)}</title>"
        "<style>body{font:16px system-ui,sans-serif;max-width:32em;margin:4em auto;"
        "padding:0 1em}button{font-size:1em;padding:.5em 1.5em}</style>"
        f"<h1>{html.escape(title)}</h1><p>{text}</p>{button}</html>"
    )
    return Reply(status, body.encode(), _HTML, list(_PAGE_HEADERS))
