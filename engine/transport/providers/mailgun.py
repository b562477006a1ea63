"""Mailgun: ``POST /v3/<domain>/messages.mime`` (multipart form, Basic ``api:<key>``): the
engine's own MIME goes as it is -- headers, attachments, DKIM signature intact -- with
the envelope recipients as ``to``, the job id as the variable ``v:job_id`` (every event
carries it back) and the engine's first three tags as ``o:tag``.

Docs: https://documentation.mailgun.com/docs/mailgun/api-reference/send/mailgun/messages
"""

from __future__ import annotations

import base64
import os
from typing import Final
from urllib.parse import quote

from engine.transport.base import OutgoingMail
from engine.transport.http1 import Response, header_lines
from engine.transport.providers.base import ProviderRequest, clip, json_of
from engine.transport.providers.url import ProviderUrl

MAX_TAGS: Final = 3  # o:tag, per message


def _field(boundary: bytes, name: str, value: str) -> bytes:
    return b'--%s\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n' % (
        boundary, name.encode("ascii"), value.encode("utf-8"),
    )  # fmt: skip


class Mailgun:
    name = "mailgun"
    idempotent = False

    def __init__(self, url: ProviderUrl) -> None:
        self.secrets = (url.key, base64.b64encode(f"api:{url.key}".encode()).decode())
        self._path = f"/v3/{quote(url.where, safe='')}/messages.mime".encode("ascii")
        self._headers = header_lines(
            [
                ("Authorization", "Basic " + self.secrets[1]),
                ("User-Agent", "engine"),
            ]
        )

    def request(self, mail: OutgoingMail) -> ProviderRequest:
        data = mail.data
        boundary = os.urandom(12).hex().encode("ascii")
        while b"--" + boundary in data:  # as good as never: 96 random bits
            boundary = os.urandom(12).hex().encode("ascii")
        tags = mail.message.tags[:MAX_TAGS] if mail.message is not None else []
        body = b"".join(
            (
                *(_field(boundary, "to", address) for address in mail.recipients),
                _field(boundary, "v:job_id", mail.job_id),
                *(_field(boundary, "o:tag", tag) for tag in tags),
                b'--%s\r\nContent-Disposition: form-data; name="message"; '
                b'filename="message.mime"\r\nContent-Type: message/rfc822\r\n\r\n' % boundary,
                data,
                b"\r\n--%s--\r\n" % boundary,
            )
        )
        headers = self._headers + b"Content-Type: multipart/form-data; boundary=%s\r\n" % boundary
        return ProviderRequest(b"POST", self._path, headers, body)

    def message_id(self, response: Response) -> str:
        return str(json_of(response)["id"]).strip("<>")

    def error_text(self, response: Response) -> str:
        return clip(str(json_of(response)["message"]))  # 401 is plain "Forbidden": the body
