"""Attachments: their request and stored shapes, and the pure rules between them (file
names, content types checked against the bytes, Content-IDs, sizes, content hashes).

Bodies are stored once by SHA-256 (``engine.queue`` keeps them); a message keeps only
references (``AttachmentRef``). Imports only errors: models, the API, the queue and the
composer all use it.
"""

from __future__ import annotations

import hashlib
import mimetypes
import string
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Final, Literal, NamedTuple

import msgspec

from engine.errors import ValidationError

# Attachments one message may carry (the decoder refuses more; so does ``normalize``).
MAX_ATTACHMENTS: Final = 20
MAX_FILENAME_CHARS: Final = 255
# RFC 6838 4.2: type and subtype names are at most 127 characters each.
MAX_CONTENT_TYPE_CHARS: Final = 255
MAX_CONTENT_ID_CHARS: Final = 250
BLOB_ID_CHARS: Final = 64  # a SHA-256 in hex
# Bytes of a blob's start looked at for its format (a PDF's "%PDF-" may come a little
# after the start: readers look within the first 1024 bytes).
HEAD_BYTES: Final = 1024
DEFAULT_MAX_BYTES: Final = 10 * 1024 * 1024
GENERIC_TYPE: Final = "application/octet-stream"

Disposition = Literal["attachment", "inline"]


class AttachmentIn(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """One item of a message's ``attachments``: its bytes (base64 in JSON), or the id of
    one uploaded with POST /v1/attachments."""

    filename: Annotated[str, msgspec.Meta(max_length=MAX_FILENAME_CHARS)]
    # The bytes, base64 (RFC 4648 with padding); msgspec decodes them in C.
    content: bytes | None = None
    # Instead of content: the id (SHA-256, hex) POST /v1/attachments answered.
    attachment_id: Annotated[str, msgspec.Meta(max_length=BLOB_ID_CHARS)] | None = None
    # Default: what the bytes are (PDF, PNG, JPEG, GIF, ZIP), else from the file name.
    content_type: Annotated[str, msgspec.Meta(max_length=MAX_CONTENT_TYPE_CHARS)] | None = None
    # For html's <img src="cid:...">: such a part goes inline, next to the html.
    content_id: Annotated[str, msgspec.Meta(max_length=MAX_CONTENT_ID_CHARS)] | None = None
    # Default: "inline" with a content_id, else "attachment".
    disposition: Disposition | None = None


class AttachmentRef(msgspec.Struct, array_like=True, gc=False):
    """An attachment as a stored message keeps it: a reference to its blob."""

    sha256: bytes  # 32 bytes; the blob's key names it in hex
    size: int  # bytes, decoded
    filename: str
    content_type: str
    content_id: str | None = None
    inline: bool = False  # Content-Disposition: inline (else attachment)


class BlobInfo(NamedTuple):
    """What ingest knows of an uploaded blob: its size and its first HEAD_BYTES bytes."""

    size: int
    head: bytes


@dataclass(frozen=True, slots=True)
class AttachmentLimits:
    max_bytes: int = DEFAULT_MAX_BYTES  # one attachment, decoded
    max_message_bytes: int = DEFAULT_MAX_BYTES  # all of a message's, decoded


@dataclass(slots=True)
class BlobIndex:
    """The blobs the messages of one request name, as ``normalize`` checks them: the
    uploaded ones it may use (looked up in Redis first), the contents it hashed (to be
    stored), and every id it referenced."""

    uploaded: Mapping[str, BlobInfo] = field(default_factory=dict)
    limits: AttachmentLimits = AttachmentLimits()
    inline: dict[str, bytes] = field(default_factory=dict)  # id -> bytes to store
    used: dict[str, None] = field(default_factory=dict)  # every id, in order
    # An uploaded attachment named the same way by many messages of a batch (the bulk
    # case) is checked once: (filename, id, type, content id, disposition) -> reference.
    named: dict[tuple[str, str, str | None, str | None, str | None], AttachmentRef] = field(
        default_factory=dict
    )

    def add(self, content: bytes) -> str:
        """The id of ``content``, kept to be stored."""
        blob_id = hashlib.sha256(content).hexdigest()
        self.inline.setdefault(blob_id, content)
        self.used[blob_id] = None
        return blob_id


def blob_id_of(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def is_blob_id(text: str) -> bool:
    """64 lower-case hex digits."""
    return len(text) == BLOB_ID_CHARS and not text.strip("0123456789abcdef")


# -- file names -------------------------------------------------------------------------

# Not in a file name: controls, format characters (a right-to-left override, U+202E,
# makes "invoice<U+202E>fdp.exe" read as "invoiceexe.pdf"), line and paragraph separators.
_BAD_NAME_CATEGORIES: Final = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def clean_filename(where: str, name: str) -> str:
    """``name`` without its directories (``C:\\bills\\a.pdf`` -> ``a.pdf``), trimmed and
    in NFC; ValidationError(``where``) for control characters or nothing left."""
    if len(name) > MAX_FILENAME_CHARS:
        raise ValidationError(where, f"at most {MAX_FILENAME_CHARS} characters")
    for i, ch in enumerate(name):
        if (ch < " " or ch >= "\x7f") and unicodedata.category(ch) in _BAD_NAME_CATEGORIES:
            raise ValidationError(
                where, f"must not contain control or format characters (U+{ord(ch):04X} at {i})"
            )
    base = name.replace("\\", "/").rpartition("/")[2].strip()
    if not base.strip("."):
        raise ValidationError(where, "needs a file name (directories are dropped)")
    return base if base.isascii() else unicodedata.normalize("NFC", base)


# -- content types ----------------------------------------------------------------------

# RFC 2045 5.1: token characters (no space, controls or tspecials).
_TOKEN: Final = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-.^_`{|}~")
# Formats told by their first bytes, cheaply: (magic, where it may start at most, kind).
_MAGIC: Final = (
    (b"%PDF-", HEAD_BYTES - 5, "pdf"),
    (b"\x89PNG\r\n\x1a\n", 0, "png"),
    (b"\xff\xd8\xff", 0, "jpeg"),
    (b"GIF87a", 0, "gif"),
    (b"GIF89a", 0, "gif"),
    (b"PK\x03\x04", 0, "zip"),
    (b"PK\x05\x06", 0, "zip"),  # an empty archive
    (b"PK\x07\x08", 0, "zip"),  # a spanned one
)
_TYPE_OF_KIND: Final = {
    "pdf": "application/pdf",
    "png": "image/png",
    "jpeg": "image/jpeg",
    "gif": "image/gif",
    "zip": "application/zip",
}
# Declared types that name one of those formats (with their common aliases).
_KIND_OF_TYPE: Final = {
    "application/pdf": "pdf",
    "application/x-pdf": "pdf",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "image/pjpeg": "jpeg",
    "image/gif": "gif",
    "application/zip": "zip",
    "application/x-zip": "zip",
    "application/x-zip-compressed": "zip",
    "application/java-archive": "zip",
}
# ... and the ZIP containers: Office Open XML (docx, xlsx, pptx), "+zip" types (epub).
_ZIP_PREFIXES: Final = ("application/vnd.openxmlformats-officedocument.",)


def sniff(head: bytes) -> str | None:
    """The format ``head`` (a blob's first bytes) starts with: pdf, png, jpeg, gif, zip."""
    for magic, most, kind in _MAGIC:
        if head.startswith(magic) or (most and magic in head[: most + len(magic)]):
            return kind
    return None


def kind_of_type(content_type: str) -> str | None:
    """The format a declared type names, when it is one ``sniff`` tells."""
    kind = _KIND_OF_TYPE.get(content_type)
    if kind is None and (content_type.endswith("+zip") or content_type.startswith(_ZIP_PREFIXES)):
        return "zip"
    return kind


def check_content_type(where: str, declared: str) -> str:
    """A declared ``type/subtype`` (RFC 2045 tokens, no parameters), lower-cased."""
    if len(declared) > MAX_CONTENT_TYPE_CHARS:
        raise ValidationError(where, f"at most {MAX_CONTENT_TYPE_CHARS} characters")
    kind, slash, sub = declared.strip().lower().partition("/")
    if not slash or not kind or not sub or not _TOKEN.issuperset(kind + sub):
        raise ValidationError(
            where, "must be a MIME type like application/pdf (type/subtype, no parameters)"
        )
    if kind in ("multipart", "message"):
        # Those are containers: base64 is not allowed for them (RFC 2046 5.1, 5.2.1).
        raise ValidationError(where, f"{kind}/* cannot be attached; use application/octet-stream")
    return f"{kind}/{sub}"


def content_type_for(where: str, declared: str | None, head: bytes, filename: str) -> str:
    """The Content-Type of an attachment: the declared one (ValidationError(``where``) when
    the bytes say it is another format), else what the bytes are, else what the file
    name says, else application/octet-stream."""
    found = sniff(head)
    if declared is not None:
        content_type = check_content_type(where, declared)
        claimed = kind_of_type(content_type)
        if claimed is not None and claimed != found:
            what = f"a {found.upper()} file" if found else "not one"
            raise ValidationError(
                where, f"{content_type} does not match the content's bytes ({what})"
            )
        return content_type
    if found is not None:
        return _TYPE_OF_KIND[found]
    guessed = mimetypes.guess_type(filename, strict=True)[0]
    if guessed is None:
        return GENERIC_TYPE
    try:
        guessed = check_content_type(where, guessed)  # the system's tables vary
    except ValidationError:
        return GENERIC_TYPE  # message/rfc822 (.eml): not as a base64 part
    if kind_of_type(guessed) is not None:
        return GENERIC_TYPE  # the name says PDF (say) and the bytes do not: don't claim it
    return guessed


# -- Content-IDs ------------------------------------------------------------------------

_ATEXT: Final = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-"


def _dot_atom(text: str) -> bool:
    return (
        bool(text)
        and not text.strip(_ATEXT + ".")
        and text[0] != "."
        and text[-1] != "."
        and ".." not in text
    )


def check_content_id(where: str, content_id: str) -> str:
    """A Content-ID without its angle brackets: ``logo`` or ``logo@example.com`` (RFC 2392:
    an html part names it ``cid:logo@example.com``)."""
    if len(content_id) > MAX_CONTENT_ID_CHARS:
        raise ValidationError(where, f"at most {MAX_CONTENT_ID_CHARS} characters")
    cid = content_id[1:-1] if content_id[:1] == "<" and content_id[-1:] == ">" else content_id
    left, at, right = cid.partition("@")
    if not _dot_atom(left) or (at and not _dot_atom(right)):
        raise ValidationError(
            where, "must look like logo or logo@example.com (RFC 5322 dot-atoms, ASCII)"
        )
    return cid


# -- a message's attachments --------------------------------------------------------------


def check_attachments(items: list[AttachmentIn], index: BlobIndex | None) -> list[AttachmentRef]:
    """Validate a message's attachments and return their references; the contents given
    inline are hashed into ``index`` (to be stored). ValidationError names the field
    (``attachments[2].content_type``). ``index`` None: attachments are refused."""
    if not items:
        return []
    if index is None:
        raise ValidationError(
            "attachments", "attachments go with POST /v1/messages and /v1/messages/batch only"
        )
    if len(items) > MAX_ATTACHMENTS:
        raise ValidationError("attachments", f"at most {MAX_ATTACHMENTS} attachments")
    limits = index.limits
    refs: list[AttachmentRef] = []
    cids: set[str] = set()
    total = 0
    for i, item in enumerate(items):
        at = f"attachments[{i}]"
        named = (item.filename, item.attachment_id or "", item.content_type, item.content_id,
                 item.disposition)  # fmt: skip
        ref = index.named.get(named) if item.content is None else None
        if ref is None:
            ref = _checked(item, at, index)
            if item.content is None:
                index.named[named] = ref
        total += ref.size
        if total > limits.max_message_bytes:
            raise ValidationError(
                f"{at}.content" if item.content is not None else f"{at}.attachment_id",
                f"the message's attachments take {total} bytes with this one; at most "
                f"{limits.max_message_bytes} (attachments.max_message_bytes)",
            )
        if ref.content_id is not None:
            if ref.content_id in cids:
                raise ValidationError(f"{at}.content_id", "another attachment has this content_id")
            cids.add(ref.content_id)
        refs.append(ref)
    return refs


def _checked(item: AttachmentIn, at: str, index: BlobIndex) -> AttachmentRef:
    """One attachment checked on its own (``at``: ``attachments[2]``), its reference."""
    limits = index.limits
    filename = clean_filename(f"{at}.filename", item.filename)
    if (item.content is None) == (item.attachment_id is None):
        raise ValidationError(
            f"{at}.content",
            "give the bytes (content, base64) or an uploaded attachment's id "
            "(attachment_id, from POST /v1/attachments): one of them",
        )
    if item.content is not None:
        where = f"{at}.content"
        size = len(item.content)
        if not size:
            raise ValidationError(where, "an attachment needs at least one byte")
        if size > limits.max_bytes:
            raise ValidationError(
                where,
                f"{size} bytes (decoded); an attachment has at most {limits.max_bytes} "
                "(attachments.max_bytes)",
            )
        blob_id = index.add(item.content)
        head = item.content[:HEAD_BYTES]
    else:
        where = f"{at}.attachment_id"
        blob_id = (item.attachment_id or "").lower()
        if not is_blob_id(blob_id):
            raise ValidationError(where, "must be an id POST /v1/attachments gave (64 hex)")
        info = index.uploaded.get(blob_id)
        if info is None:
            raise ValidationError(
                where,
                "no such attachment: upload it with POST /v1/attachments (an upload no "
                "message names is kept attachments.unreferenced_ttl_s, a day)",
            )
        size, head = info
        if size > limits.max_bytes:
            raise ValidationError(
                where, f"{size} bytes; an attachment has at most {limits.max_bytes}"
            )
        index.used[blob_id] = None
    content_type = content_type_for(f"{at}.content_type", item.content_type, head, filename)
    cid = None
    if item.content_id is not None:
        cid = check_content_id(f"{at}.content_id", item.content_id)
    if item.disposition not in (None, "attachment", "inline"):
        raise ValidationError(f"{at}.disposition", "must be attachment or inline")
    inline = item.disposition == "inline" if item.disposition else cid is not None
    return AttachmentRef(bytes.fromhex(blob_id), size, filename, content_type, cid, inline)
