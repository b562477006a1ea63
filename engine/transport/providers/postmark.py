"""Postmark: ``POST /email`` (JSON, ``X-Postmark-Server-Token``). The job id goes in
``Metadata``, which Postmark's webhooks carry back; Postmark has one ``Tag`` a message:
the engine's first tag.

Docs: https://postmarkapp.com/developer/api/email-api
"""

from __future__ import annotations

from typing import Any

from engine.errors import PermanentFailure
from engine.transport.base import OutgoingMail
from engine.transport.http1 import Response, header_lines
from engine.transport.providers.base import (
    ProviderRequest,
    attachment_content,
    clip,
    encode_json,
    json_of,
    mailbox,
    message_of,
    recipients_of,
)
from engine.transport.providers.url import ProviderUrl


def _listed(addresses: list[str]) -> str:
    return ", ".join(mailbox(a) for a in addresses)


class Postmark:
    name = "postmark"
    idempotent = False

    def __init__(self, url: ProviderUrl) -> None:
        self.secrets = (url.key,)
        self._headers = header_lines(
            [
                ("X-Postmark-Server-Token", url.key),
                ("Accept", "application/json"),
                ("Content-Type", "application/json"),
                ("User-Agent", "engine"),
            ]
        )

    def request(self, mail: OutgoingMail) -> ProviderRequest | PermanentFailure:
        msg = message_of(mail, self.name)
        if isinstance(msg, PermanentFailure):
            return msg
        to, cc, bcc = recipients_of(mail, msg)
        doc: dict[str, Any] = {
            "From": mailbox(msg.sender),
            "To": _listed(to),
            "Subject": msg.subject,
            "Metadata": {"job_id": mail.job_id},
        }
        if cc:
            doc["Cc"] = _listed(cc)
        if bcc:
            doc["Bcc"] = _listed(bcc)
        if msg.reply_to:
            doc["ReplyTo"] = _listed(msg.reply_to)
        if msg.text is not None:
            doc["TextBody"] = msg.text
        if msg.html is not None:
            doc["HtmlBody"] = msg.html
        if msg.headers:
            doc["Headers"] = [{"Name": name, "Value": value} for name, value in msg.headers]
        if msg.tags:
            doc["Tag"] = msg.tags[0]
        if msg.attachments:
            files = []
            for ref in msg.attachments:
                content = attachment_content(ref, mail.parts, self.name)
                if isinstance(content, PermanentFailure):
                    return content
                item: dict[str, Any] = {
                    "Name": ref.filename,
                    "Content": content,
                    "ContentType": ref.content_type,
                }
                if ref.content_id:
                    item["ContentID"] = f"cid:{ref.content_id}"
                files.append(item)
            doc["Attachments"] = files
        return ProviderRequest(b"POST", b"/email", self._headers, encode_json(doc))

    def message_id(self, response: Response) -> str:
        return str(json_of(response)["MessageID"])

    def error_text(self, response: Response) -> str:
        doc = json_of(response)
        return clip(f"ErrorCode {doc.get('ErrorCode')}: {doc.get('Message', '')}")
