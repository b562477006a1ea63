"""Bounce classification (engine/bounce.py): real replies of mailbox providers, one row
each, and the decision each class drives."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from engine.bounce import (
    CLASSES,
    MAX_TEXT_CHARS,
    Bounce,
    bounce_of,
    classify,
    classify_http,
    enhanced_status,
    without_reply,
)
from engine.errors import (
    DeliveryUncertain,
    PermanentFailure,
    TemporaryFailure,
)

GMAIL = "https://support.google.com/mail/?p="
YAHOO = "see https://postmaster.yahooinc.com/error-codes"

# (who, code, reply text as the server sent it after the code, class, decision)
REPLIES = [
    # -- Gmail ---------------------------------------------------------------------------
    ("gmail", 550, "5.1.1 The email account that you tried to reach does not exist. Please "
     "try double-checking the recipient's email address for typos or unnecessary spaces. "
     f"{GMAIL}NoSuchUser a1si123.250 - gsmtp", "invalid-recipient", "suppress"),
    ("gmail", 550, "5.2.1 The email account that you tried to reach is disabled. "
     f"{GMAIL}DisabledUser", "invalid-recipient", "suppress"),
    ("gmail", 552, "5.2.2 The email account that you tried to reach is over quota. Please "
     f"direct the recipient to {GMAIL}OverQuotaPerm", "mailbox-full", "dead-letter"),
    ("gmail", 452, "4.2.2 The email account that you tried to reach is over quota. Please "
     f"direct the recipient to {GMAIL}OverQuotaTemp", "mailbox-full", "retry"),
    ("gmail", 450, "4.2.1 The user you are trying to contact is receiving mail at a rate that "
     "prevents additional messages from being delivered. Please resend your message at a "
     "later point.", "rate-limited", "slow-down"),
    ("gmail", 421, "4.7.0 Try again later, closing connection.", "rate-limited", "slow-down"),
    ("gmail", 421, "4.7.28 Our system has detected an unusual rate of unsolicited mail "
     "originating from your IP address. To protect our users from spam, mail sent from your "
     "IP address has been temporarily rate limited.", "rate-limited", "slow-down"),
    ("gmail", 550, "5.4.5 Daily user sending limit exceeded.", "rate-limited", "slow-down"),
    ("gmail", 550, "5.7.26 This mail is unauthenticated, which poses a security risk to the "
     "sender and Gmail users, and has been blocked. The sender must authenticate with at "
     "least one of SPF or DKIM.", "policy-block", "dead-letter"),
    ("gmail", 550, "5.7.25 The IP address sending this message does not have a PTR record "
     "setup, or the corresponding forward DNS entry does not point to the sending IP.",
     "policy-block", "dead-letter"),
    ("gmail", 550, "5.7.1 Our system has detected that this message is likely unsolicited "
     "mail. To reduce the amount of spam sent to Gmail, this message has been blocked.",
     "content-rejected", "dead-letter"),
    ("gmail", 552, "5.7.0 This message was blocked because its content presents a potential "
     "security issue.", "content-rejected", "dead-letter"),
    ("gmail", 552, "5.3.4 Your message exceeded Google's message size limits.",
     "message-too-large", "dead-letter"),
    ("gmail", 554, "5.6.0 Mail message is malformed. Not accepted.", "content-rejected",
     "dead-letter"),
    ("gmail", 421, "4.3.0 Temporary System Problem. Try again later.", "temporary", "retry"),
    ("gmail", 530, "5.7.0 Authentication Required.", "tls-auth", "dead-letter"),
    # -- Outlook / Office 365 / Hotmail ------------------------------------------------------
    ("outlook", 550, "5.5.0 Requested action not taken: mailbox unavailable (S2017062302). "
     "[DM6NAM10FT042.eop-nam10.prod.protection.outlook.com]", "invalid-recipient", "suppress"),
    ("outlook", 550, "5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP "
     "address lookup", "invalid-recipient", "suppress"),
    ("outlook", 550, "5.4.1 Recipient address rejected: Access denied. AS(201806281) "
     "[BN8NAM12FT058.eop-nam12.prod.protection.outlook.com]", "invalid-recipient", "suppress"),
    ("outlook", 554, "5.2.2 mailbox full; STOREDRV.Deliver.Exception:QuotaExceededException."
     "MapiExceptionShutoffQuotaExceeded", "mailbox-full", "dead-letter"),
    ("outlook", 550, "5.7.1 Unfortunately, messages from [192.0.2.15] weren't sent. Please "
     "contact your Internet service provider since part of their network is on our block "
     "list (S3150).", "policy-block", "dead-letter"),
    ("outlook", 550, "5.7.606 Access denied, banned sending IP [192.0.2.15]. To request "
     "removal from this list please visit https://sender.office.com/", "policy-block",
     "dead-letter"),
    ("outlook", 550, "5.7.509 Access denied, sending domain example.com does not pass DMARC "
     "verification and has a DMARC policy of reject.", "policy-block", "dead-letter"),
    ("outlook", 550, "5.7.708 Service unavailable. Access denied, traffic not accepted from "
     "this IP.", "policy-block", "dead-letter"),
    ("outlook", 421, "4.3.2 The maximum number of concurrent server connections has exceeded "
     "a limit, closing transmission channel", "rate-limited", "slow-down"),
    ("outlook", 452, "4.5.3 Too many recipients (AS780090)", "rate-limited", "slow-down"),
    ("outlook", 451, "4.7.500 Server busy. Please try again later from [192.0.2.15]. "
     "(S77714)", "temporary", "retry"),
    ("outlook", 552, "5.3.4 Message size exceeds fixed maximum message size",
     "message-too-large", "dead-letter"),
    ("outlook", 550, "5.7.1 Client does not have permissions to send as this sender",
     "policy-block", "dead-letter"),
    # -- Yahoo / AOL -----------------------------------------------------------------------
    ("yahoo", 554, "delivery error: dd This user doesn't have a yahoo.com account "
     "(someone@yahoo.com) [0] - mta1011.mail.gq1.yahoo.com", "invalid-recipient", "suppress"),
    ("yahoo", 421, "4.7.0 [TSS04] Messages from 192.0.2.15 temporarily deferred due to "
     f"unexpected volume or user complaints - 4.16.55.1; {YAHOO}", "rate-limited",
     "slow-down"),
    ("yahoo", 553, "5.7.1 [BL21] Connections will not be accepted from 192.0.2.15, because "
     f"the ip is in Spamhaus's list; {YAHOO}", "policy-block", "dead-letter"),
    ("yahoo", 554, f"5.7.9 Message not accepted for policy reasons.  {YAHOO}", "policy-block",
     "dead-letter"),
    ("yahoo", 554, "30 Sorry, your message size exceeds 41943040 bytes.", "message-too-large",
     "dead-letter"),
    # -- iCloud ----------------------------------------------------------------------------
    ("icloud", 550, "5.1.1 <someone@icloud.com>: user does not exist", "invalid-recipient",
     "suppress"),
    ("icloud", 552, "5.2.2 <someone@icloud.com>: user is over quota", "mailbox-full",
     "dead-letter"),
    ("icloud", 554, "5.7.1 [CS01] Message rejected due to local policy. Please visit "
     "https://support.apple.com/en-us/HT204137", "policy-block", "dead-letter"),
    # -- other providers and filters ----------------------------------------------------------
    ("yandex", 550, "5.7.1 No such user!", "invalid-recipient", "suppress"),
    ("mail.ru", 550, "Message was not accepted -- invalid mailbox. Local mailbox "
     "someone@mail.ru is unavailable: user not found", "invalid-recipient", "suppress"),
    ("gmx", 550, "Requested action not taken: mailbox unavailable", "invalid-recipient",
     "suppress"),
    ("gmx", 554, "Transaction failed Reject due to policy restrictions.", "policy-block",
     "dead-letter"),
    ("comcast", 554, "resimta-ch2-18v.sys.comcast.net 192.0.2.15 found on one or more DNSBLs, "
     "see http://postmaster.comcast.net/smtp-error-codes.php#BL000001", "policy-block",
     "dead-letter"),
    ("orange", 421, "mwinf5c10 ME Trop de connexions, veuillez verifier votre configuration. "
     "Too many connections, slow down. OFR005_104 [104]", "rate-limited", "slow-down"),
    ("mimecast", 550, "Invalid Recipient - https://community.mimecast.com/docs/DOC-1369#550",
     "invalid-recipient", "suppress"),
    ("mimecast", 554, "Email rejected due to security policies - "
     "https://community.mimecast.com/docs/DOC-1369#554", "policy-block", "dead-letter"),
    ("barracuda", 554, "Service unavailable; Client host [192.0.2.15] blocked using "
     "Barracuda Reputation; http://www.barracudanetworks.com/reputation/?r=1&ip=192.0.2.15",
     "policy-block", "dead-letter"),
    # -- Postfix, Exim and friends --------------------------------------------------------------
    ("postfix", 550, "5.1.1 <someone@example.org>: Recipient address rejected: User unknown "
     "in virtual mailbox table", "invalid-recipient", "suppress"),
    ("postgrey", 450, "4.2.0 <someone@example.org>: Recipient address rejected: Greylisted, "
     "see http://postgrey.schweikert.ch/help/example.org.html", "temporary", "retry"),
    ("postfix", 451, "4.7.1 Greylisting in action, please come back later", "temporary",
     "retry"),
    ("postfix", 554, "5.7.1 Service unavailable; Client host [192.0.2.15] blocked using "
     "zen.spamhaus.org; https://www.spamhaus.org/query/ip/192.0.2.15", "policy-block",
     "dead-letter"),
    ("postfix", 554, "5.7.1 <someone@example.org>: Relay access denied", "dns-routing",
     "dead-letter"),
    ("postfix", 450, "4.1.2 <someone@nowhere.example>: Recipient address rejected: Domain "
     "not found", "dns-routing", "retry"),
    ("postfix", 554, "5.4.4 Host or domain name not found. Name service error for "
     "name=nowhere.example type=A: Host not found", "dns-routing", "dead-letter"),
    ("postfix", 421, "4.4.2 mx.example.org Error: timeout exceeded", "temporary", "retry"),
    ("postfix", 452, "4.3.1 Insufficient system storage", "temporary", "retry"),
    ("postfix", 530, "5.7.0 Must issue a STARTTLS command first", "tls-auth", "dead-letter"),
    ("gmail-relay", 535, "5.7.8 Username and Password not accepted. Learn more at "
     f"{GMAIL}BadCredentials", "tls-auth", "dead-letter"),
    ("exim", 550, "Unrouteable address", "dns-routing", "dead-letter"),
    ("amavis", 554, "5.7.0 Reject, id=12345-01 - VIRUS: Eicar-Signature", "content-rejected",
     "dead-letter"),
    ("spamassassin", 550, "5.7.1 Message rejected as spam by Content Filtering.",
     "content-rejected", "dead-letter"),
    # -- the engine's own sink (engine/sink/faults.py) ------------------------------------------
    ("sink", 550, "5.1.1 user unknown", "invalid-recipient", "suppress"),
    ("sink", 451, "4.3.0 try again", "temporary", "retry"),
    ("sink", 552, "5.3.4 message too big", "message-too-large", "dead-letter"),
    ("sink", 452, "4.3.1 insufficient storage", "temporary", "retry"),
    ("sink", 421, "4.3.2 service shutting down", "temporary", "retry"),
    ("sink", 554, "5.3.0 injected failure", "unknown", "dead-letter"),
    ("sink", 451, "4.3.0 injected failure", "temporary", "retry"),
    # -- nothing to go on ------------------------------------------------------------------------
    ("bare", 550, "Requested action not taken", "unknown", "dead-letter"),
    ("bare", 451, "Requested action aborted", "temporary", "retry"),
]  # fmt: skip


@pytest.mark.parametrize(("who", "code", "text", "cls", "decision"), REPLIES)
def test_provider_replies(who: str, code: int, text: str, cls: str, decision: str) -> None:
    assert classify(code, None, text) == Bounce(cls, decision)  # type: ignore[arg-type]


@pytest.mark.parametrize(("who", "code", "text", "cls", "decision"), REPLIES)
def test_the_reply_quoted_in_an_error_message_classifies_the_same(
    who: str, code: int, text: str, cls: str, decision: str
) -> None:
    """The sender classifies str(exc): the transport's prefix changes nothing."""
    quoted = f"all 1 recipients refused, first spam-trap@example.com: {code} {text}"
    assert classify(code, None, quoted).cls == cls
    assert classify(code, None, f"end of DATA: {code} {text}").cls == cls


def test_the_table_covers_every_class_but_uncertain() -> None:
    # uncertain and attachment-missing are not replies.
    assert {row[3] for row in REPLIES} == set(CLASSES) - {"uncertain", "attachment-missing"}
    assert len(REPLIES) >= 30


def test_the_enhanced_code_given_wins_over_the_text() -> None:
    # A strong enhanced code decides; the words "mailbox full" do not.
    assert classify(550, "5.1.1", "mailbox full").cls == "invalid-recipient"
    # A loose one lets the text decide, and stands when the text says nothing.
    assert classify(550, "5.7.1", "no such user").cls == "invalid-recipient"
    assert classify(550, "5.7.1", "go away").cls == "policy-block"
    assert classify(554, "5.7.9", "").cls == "tls-auth"
    assert classify(550, "5.1.1", "").decision == "suppress"
    assert classify(450, "4.1.1", "").decision == "retry"  # a 4xx never suppresses


def test_a_4xx_of_a_final_class_retries_and_a_5xx_temporary_is_unknown() -> None:
    assert classify(452, "4.2.2", "").decision == "retry"
    assert classify(552, "5.2.2", "").decision == "dead-letter"
    assert classify(452, "4.3.4", "").decision == "dead-letter"  # too big stays too big
    assert classify(554, "5.3.1", "") == Bounce("unknown", "dead-letter")
    assert classify(451, None, "") == Bounce("temporary", "retry")
    assert classify(553, None, "") == Bounce("invalid-recipient", "suppress")


def test_enhanced_codes_are_told_from_addresses_and_versions() -> None:
    assert enhanced_status("550 5.1.1 user unknown") == (5, 1, 1)
    assert enhanced_status("421 4.7.0 [TSS04] ... - 4.16.55.1; see") == (4, 7, 0)
    assert enhanced_status("blocked [192.0.2.15] and 5.6.7.8") is None
    assert enhanced_status("load 2.5.10 ok") == (2, 5, 10)
    assert enhanced_status("451 4.7.500 Server busy") == (4, 7, 500)
    assert enhanced_status("5.1.1234") is None


def test_words_in_addresses_are_not_the_servers_words() -> None:
    assert classify(550, None, "<spam@example.com>: unknown user").cls == "invalid-recipient"
    assert classify(550, None, "rejected spam@example.com").cls == "unknown"


def test_only_the_start_of_a_long_text_is_read() -> None:
    filler = "x" * MAX_TEXT_CHARS
    assert classify(550, None, "user unknown " + filler).cls == "invalid-recipient"
    assert classify(550, None, filler + " user unknown").cls == "unknown"
    assert enhanced_status(filler + " 5.1.1") is None
    # A megabyte of a pathological reply is read up to the cap (no regex blow-up).
    assert classify(550, None, "5." * 500_000).cls == "unknown"


def test_failures_without_a_reply() -> None:
    size = PermanentFailure("message is 99999 bytes; the server takes 1000")
    assert bounce_of(size, on_uncertain="retry") == Bounce("message-too-large", "dead-letter")
    lost = TemporaryFailure("send: connection to 127.0.0.1:25 lost: reset by peer")
    assert bounce_of(lost, on_uncertain="retry") == Bounce("temporary", "retry")
    undecodable = PermanentFailure("undecodable job: bad msgpack")
    assert bounce_of(undecodable, on_uncertain="retry") == Bounce("unknown", "dead-letter")
    assert without_reply("no reply within 5.0s", permanent=False).cls == "temporary"


def test_uncertain_follows_the_setting() -> None:
    exc = DeliveryUncertain("send: connection lost (delivery uncertain)")
    assert bounce_of(exc, on_uncertain="retry") == Bounce("uncertain", "retry")
    assert bounce_of(exc, on_uncertain="dead-letter") == Bounce("uncertain", "dead-letter")
    assert bounce_of(exc, on_uncertain="dead-letter").final


def test_with_a_code_the_reply_decides() -> None:
    exc = PermanentFailure("RCPT TO: 550 5.1.1 user unknown", code=550)
    b = bounce_of(exc, on_uncertain="retry")
    assert b == Bounce("invalid-recipient", "suppress") and b.suppress and b.final
    quota = PermanentFailure("end of DATA: 550 5.4.5 Daily user sending limit exceeded", code=550)
    assert not bounce_of(quota, on_uncertain="retry").final


def test_the_readme_documents_every_class() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.partition("### Bounce classes")[2].partition("\n## ")[0]
    listed = set(re.findall(r"^\| `([a-z-]+)` \|", section, re.MULTILINE))
    assert listed == set(CLASSES)
    assert "queue.on_uncertain" in section


@pytest.mark.parametrize(
    ("status", "text", "permanent", "cls", "decision"),
    [
        (429, "rate_limit_exceeded: Too many requests", False, "rate-limited", "slow-down"),
        (503, "Service Unavailable", False, "temporary", "retry"),
        (500, "internal_server_error", False, "temporary", "retry"),
        (401, "missing_api_key", True, "tls-auth", "dead-letter"),
        (403, "The API key is invalid", True, "tls-auth", "dead-letter"),
        (413, "Payload Too Large", True, "message-too-large", "dead-letter"),
        (422, "validation_error: Invalid `to` field", True, "unknown", "dead-letter"),
        # Postmark's 406: the recipient is inactive (hard bounced or unsubscribed before).
        (422, "You tried to send to recipient(s) that have been marked as inactive. "
              "Found inactive addresses: x@y.com. Inactive recipients are ones that have "
              "generated a hard bounce or a spam complaint.", True, "invalid-recipient",
         "suppress"),
    ],
)  # fmt: skip
def test_provider_answers_are_classified_by_their_http_status(
    status: int, text: str, permanent: bool, cls: str, decision: str
) -> None:
    got = classify_http(status, text, permanent=permanent)
    assert (got.cls, got.decision) == (cls, decision)


def test_an_http_status_is_never_read_as_an_smtp_code() -> None:
    # An SMTP 503 is a bad command sequence (permanent); an HTTP 503 is a busy provider.
    exc = TemporaryFailure("HTTP 503: unavailable")
    exc.http_status = 503
    assert bounce_of(exc, on_uncertain="retry").decision == "retry"
