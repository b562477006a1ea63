"""Resend: ``POST /emails`` (JSON, Bearer key). The job id is the ``Idempotency-Key`` of
every attempt, so a request that got no answer is retried without sending twice (Resend
keeps keys 24 hours), and a tag ``job_id`` traces its events back to the job.

Docs: https://resend.com/docs/api-reference/emails/send-email,
https://resend.com/docs/dashboard/emails/idempotency-keys
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
    tag_pairs,
)
from engine.transport.providers.url import ProviderUrl


class Resend:
    name = "resend"
    idempotent = True

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
        doc: dict[str, Any] = {
            "from": mailbox(msg.sender),
            "to": [mailbox(a) for a in to],
            "subject": msg.subject,
        }
        if cc:
            doc["cc"] = [mailbox(a) for a in cc]
        if bcc:
            doc["bcc"] = [mailbox(a) for a in bcc]
        if msg.reply_to:
            doc["reply_to"] = [mailbox(a) for a in msg.reply_to]
        if msg.text is not None:
            doc["text"] = msg.text
        if msg.html is not None:
            doc["html"] = msg.html
        if msg.headers:
            doc["headers"] = dict(msg.headers)
        doc["tags"] = tag_pairs(mail.job_id, msg.tags, name="name", value="value")
        if msg.attachments:
            files = []
            for ref in msg.attachments:
                content = attachment_content(ref, mail.parts, self.name)
                if isinstance(content, PermanentFailure):
                    return content
                item: dict[str, Any] = {
                    "filename": ref.filename,
                    "content": content,
                    "content_type": ref.content_type,
                }
                if ref.content_id:
                    item["content_id"] = ref.content_id
                files.append(item)
            doc["attachments"] = files
        key = header_lines([("Idempotency-Key", mail.job_id)])
        return ProviderRequest(b"POST", b"/emails", self._headers + key, encode_json(doc))

    def message_id(self, response: Response) -> str:
        return str(json_of(response)["id"])

    def error_text(self, response: Response) -> str:
        doc = json_of(response)
        return clip(f"{doc.get('name', '')}: {doc.get('message', '')}".strip(": "))
