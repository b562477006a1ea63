"""SendGrid: v3 ``POST /v3/mail/send`` (JSON, Bearer key); 202 with the message id in
``X-Message-Id``. The job id goes in ``custom_args``, which every event carries back;
the engine's tags are its ``categories`` (the first 10).

Docs: https://www.twilio.com/docs/sendgrid/api-reference/mail-send/mail-send
"""

from __future__ import annotations

from typing import Any, Final

from engine.errors import PermanentFailure
from engine.transport.base import OutgoingMail
from engine.transport.http1 import Response, header_lines
from engine.transport.providers.base import (
    ProviderRequest,
    attachment_content,
    clip,
    encode_json,
    json_of,
    message_of,
    named,
    recipients_of,
)
from engine.transport.providers.url import ProviderUrl

MAX_CATEGORIES: Final = 10


def _person(address: str) -> dict[str, str]:
    name, bare = named(address)
    return {"email": bare, "name": name} if name else {"email": bare}


class SendGrid:
    name = "sendgrid"
    idempotent = False

    def __init__(self, url: ProviderUrl) -> None:
        self.secrets = (url.key,)
        self._headers = header_lines(
            [
                ("Authorization", f"Bearer {url.key}"),
                ("Content-Type", "application/json"),
                ("User-Agent", "engine"),
            ]
        )

    def request(self, mail: OutgoingMail) -> ProviderRequest | PermanentFailure:
        msg = message_of(mail, self.name)
        if isinstance(msg, PermanentFailure):
            return msg
        to, cc, bcc = recipients_of(mail, msg)
        personalization: dict[str, Any] = {"to": [_person(a) for a in to]}
        if cc:
            personalization["cc"] = [_person(a) for a in cc]
        if bcc:
            personalization["bcc"] = [_person(a) for a in bcc]
        # text/plain must come first; an empty block is refused, and so is none at all.
        content = [
            {"type": kind, "value": value}
            for kind, value in (("text/plain", msg.text), ("text/html", msg.html))
            if value
        ] or [{"type": "text/plain", "value": " "}]
        doc: dict[str, Any] = {
            "personalizations": [personalization],
            "from": _person(msg.sender),
            "subject": msg.subject,
            "content": content,
            "custom_args": {"job_id": mail.job_id},
        }
        if len(msg.reply_to) == 1:
            doc["reply_to"] = _person(msg.reply_to[0])
        elif msg.reply_to:
            doc["reply_to_list"] = [_person(a) for a in msg.reply_to]
        if msg.headers:
            doc["headers"] = dict(msg.headers)
        if msg.tags:
            doc["categories"] = msg.tags[:MAX_CATEGORIES]
        if msg.attachments:
            files = []
            for ref in msg.attachments:
                data = attachment_content(ref, mail.parts, self.name)
                if isinstance(data, PermanentFailure):
                    return data
                item: dict[str, Any] = {
                    "content": data,
                    "filename": ref.filename,
                    "type": ref.content_type,
                    "disposition": "attachment",
                }
                if ref.content_id:  # SendGrid takes inline parts only with a Content-ID
                    item["content_id"] = ref.content_id
                    if ref.inline:
                        item["disposition"] = "inline"
                files.append(item)
            doc["attachments"] = files
        return ProviderRequest(b"POST", b"/v3/mail/send", self._headers, encode_json(doc))

    def message_id(self, response: Response) -> str:
        value = response.header(b"x-message-id")
        return "" if value is None else value.decode("latin-1")

    def error_text(self, response: Response) -> str:
        errors = json_of(response)["errors"]
        return clip(
            "; ".join(
                f"{e['field']}: {e['message']}" if e.get("field") else str(e["message"])
                for e in errors
            )
        )
