"""Amazon SES v2: ``POST /v2/email/outbound-emails`` with the engine's own MIME as
``Content.Raw`` (base64), signed with botocore's SigV4 signer (service ``ses``). The
job id is an ``EmailTags`` entry (event publishing carries it back). SES speaks neither
SMTPUTF8 nor, reliably, 8BITMIME: the mail goes in its 7-bit form, domains as A-labels.

Docs: https://docs.aws.amazon.com/ses/latest/APIReference-V2/API_SendEmail.html
"""

from __future__ import annotations

from typing import Any

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from engine.errors import PermanentFailure
from engine.models import bare_address
from engine.transport.base import OutgoingMail
from engine.transport.http1 import Origin, Response, header_lines
from engine.transport.providers.base import (
    ProviderRequest,
    b64_json,
    clip,
    encode_json,
    json_of,
    recipients_of,
    tag_pairs,
)
from engine.transport.providers.url import ProviderUrl

SERVICE = "ses"  # the signing name (the endpoint's host says "email")
_PATH = "/v2/email/outbound-emails"
_NO_EXTENSIONS: frozenset[str] = frozenset()


class Ses:
    name = "ses"
    idempotent = False

    def __init__(self, url: ProviderUrl, origin: Origin) -> None:
        self.secrets = (url.secret,)
        self._signer = SigV4Auth(Credentials(url.key, url.secret), SERVICE, url.where)
        self._host = origin.host_header
        self._url = f"{origin.scheme}://{self._host}{origin.prefix}{_PATH}"

    def request(self, mail: OutgoingMail) -> ProviderRequest | PermanentFailure:
        form = mail.for_server(_NO_EXTENSIONS)
        if isinstance(form, PermanentFailure):
            return PermanentFailure(f"ses: {form} (SES does not take SMTPUTF8)")
        ascii_of = mail.fallback.addresses if mail.fallback is not None else {}
        if mail.message is not None:
            groups = recipients_of(mail, mail.message)
            to, cc, bcc = (
                [ascii_of.get(bare, bare) for bare in map(bare_address, group)] for group in groups
            )
        else:
            to, cc, bcc = form.recipients, [], []
        destination: dict[str, list[str]] = {"ToAddresses": to}
        if cc:
            destination["CcAddresses"] = cc
        if bcc:
            destination["BccAddresses"] = bcc
        tags = mail.message.tags if mail.message is not None else []
        doc: dict[str, Any] = {
            "FromEmailAddress": form.sender,
            "Destination": destination,
            "Content": {"Raw": {"Data": b64_json(form.data)}},
            "EmailTags": tag_pairs(mail.job_id, tags, name="Name", value="Value"),
        }
        body = encode_json(doc)
        signed = AWSRequest(
            method="POST",
            url=self._url,
            data=body,
            headers={"Host": self._host, "Content-Type": "application/json"},
        )
        self._signer.add_auth(signed)  # X-Amz-Date and Authorization, signing Host too
        fields = [(k, str(v)) for k, v in signed.headers.items() if k.lower() != "host"]
        headers = header_lines([*fields, ("User-Agent", "engine")])
        return ProviderRequest(b"POST", _PATH.encode("ascii"), headers, body)

    def message_id(self, response: Response) -> str:
        return str(json_of(response)["MessageId"])

    def error_text(self, response: Response) -> str:
        kind = (response.header(b"x-amzn-errortype") or b"").decode("latin-1")
        doc = json_of(response)
        message = doc.get("message") or doc.get("Message") or ""
        return clip(f"{kind.partition(':')[0]}: {message}".strip(": "))
