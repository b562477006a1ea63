"""Benchmark DKIM signing (issue 15): its cost per message, and end to end.

    .venv/bin/python -m scripts.bench_dkim [--rounds 2] [--messages 20000] [--rsa-thread]
                                           [--no-e2e]

1. Per message, in this process, on a typical message (~2.4 KB, text, composed by the
   engine): the signing call with no key for the From domain, with RSA 2048 and with
   Ed25519 (ours: canonical form in Python, the signature by OpenSSL); dkimpy's own
   ``dkim.sign`` for comparison; and for RSA in a worker thread, the event loop's own
   CPU per signature (``time.thread_time``: what the loop gives up) next to inline.
2. End to end (unless --no-e2e): alternating rounds, fresh Redis, sink and engine each
   (role all, 16 senders), N messages From a domain with no key / an RSA 2048 key / an
   Ed25519 key (and RSA signed in a worker thread with --rsa-thread), in batches; the
   clock stops when the sink has them all. Throughput ratio to no key; target: RSA
   2048 costs ≤ 15 %. One delivered message of each round is checked with dkimpy.
   Everything shares this machine's cores.
"""

from __future__ import annotations

import argparse
import contextlib
import email
import functools
import json
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from engine.domainkeys import generate_private_key
from engine.embedded import RedisServer, SinkProcess
from engine.models import Message
from engine.sender import Signer
from engine.transport import DkimKey, compose, dkim_sign, sign_with
from fixtures.auth import AUTH
from fixtures.engine import EngineProcess
from scripts.benchlib import cpu_seconds, publish, say, stop_engine, wait_until, workdir

TEXT = "Hello Bob, thanks for your order 12345. Your receipt is attached below. " * 30
DOMAIN = "example.org"
ARMS = ("none", "rsa", "ed25519")


def typical_mail(job: str = "01J0000000000000000000ABCD") -> Any:
    msg = Message(
        sender=f"Shop <orders@{DOMAIN}>", to=["bob@example.com"], cc=[], bcc=[],
        subject="Your receipt for order 12345", text=TEXT, html=None,
        headers=[("List-Unsubscribe", f"<https://{DOMAIN}/u/1>")], reply_to=[], tags=[],
    )  # fmt: skip
    return compose(job, msg, message_id_domain=DOMAIN, now=time.time())


def per_call_us(fn: Any, n: int) -> float:
    """Median of 5 runs of ``n`` calls, µs per call."""
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(runs)


def micro(n: int) -> dict[str, float]:
    mail = typical_mail()
    keys = {
        "rsa": DkimKey(DOMAIN, "s1", "rsa-sha256", generate_private_key("rsa-sha256")),
        "ed25519": DkimKey(DOMAIN, "s1", "ed25519-sha256", generate_private_key("ed25519-sha256")),
    }
    out = {"message_bytes": float(len(mail.data))}
    out["none_us"] = per_call_us(lambda: dkim_sign(mail, {"other.example": keys["rsa"]}), n)
    for name, key in keys.items():
        out[f"{name}_us"] = per_call_us(lambda k=key: dkim_sign(mail, {DOMAIN: k}), n)
    with contextlib.suppress(ImportError):  # dkimpy: a dev dependency
        import dkim

        pems = {name: key.private_key for name, key in keys.items()}
        from cryptography.hazmat.primitives import serialization

        raw = serialization.load_pem_private_key(pems["ed25519"], None).private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )  # fmt: skip
        import base64

        seed = base64.b64encode(raw)
        # dkimpy reads PKCS#1 ("BEGIN RSA PRIVATE KEY") or PKCS#8.
        out["dkimpy_rsa_us"] = per_call_us(
            lambda: dkim.sign(mail.data, b"s1", DOMAIN.encode(), pems["rsa"],
                              canonicalize=(b"relaxed", b"relaxed")), max(5, n // 50),
        )  # fmt: skip
        out["dkimpy_ed25519_us"] = per_call_us(
            lambda: dkim.sign(mail.data, b"s1", DOMAIN.encode(), seed,
                              signature_algorithm=b"ed25519-sha256",
                              canonicalize=(b"relaxed", b"relaxed")), n,
        )  # fmt: skip
    out |= trio.run(_loop_cost, mail, keys["rsa"], n)
    return out


async def _loop_cost(mail: Any, key: DkimKey, n: int) -> dict[str, float]:
    """The loop thread's CPU per RSA signature: inline, and handed to a worker thread."""
    limiter = trio.CapacityLimiter(2)
    sign = functools.partial(sign_with, mail, key)
    t = time.thread_time()
    for _ in range(n):
        sign()
    inline = (time.thread_time() - t) / n * 1e6
    t, wall = time.thread_time(), time.perf_counter()
    for _ in range(n):
        await trio.to_thread.run_sync(sign, limiter=limiter)
    one = (time.thread_time() - t) / n * 1e6, (time.perf_counter() - wall) / n * 1e6
    # What the senders do: a claimed batch (32) signed with one hop (Signer.sign_many).
    signer = Signer({key.domain: key}, None, rsa_in_thread=True)
    batch = [mail] * 32
    t = time.thread_time()
    for _ in range(max(1, n // 32)):
        await signer.sign_many(batch)
    return {
        "rsa_loop_cpu_inline_us": inline,
        "rsa_loop_cpu_thread_us": one[0],
        "rsa_thread_wall_us": one[1],
        "rsa_loop_cpu_batch_us": (time.thread_time() - t) / (max(1, n // 32) * 32) * 1e6,
    }


def run_round(args: argparse.Namespace, tmp: Path, arm: str, n_round: int) -> dict[str, Any]:
    tag = f"r{n_round}-{arm}"
    message = {"from": f"Shop <orders@{DOMAIN}>", "to": "b@example.com",
               "subject": "Your receipt", "text": TEXT[:1500],
               "headers": {"List-Unsubscribe": f"<https://{DOMAIN}/u/1>"}}  # fmt: skip
    body = json.dumps({"messages": [message] * args.batch}).encode()
    env: dict[str, str] = {}
    key = None
    if arm != "none":
        algorithm = "ed25519-sha256" if arm == "ed25519" else "rsa-sha256"
        pem = generate_private_key(algorithm)  # type: ignore[arg-type]
        key = DkimKey(DOMAIN, "bench", algorithm, pem)  # type: ignore[arg-type]
        key_file = tmp / f"{tag}.pem"
        key_file.write_bytes(pem)
        entry = {"domain": DOMAIN, "selector": "bench", "algorithm": algorithm,
                 "private_key_file": str(key_file)}  # fmt: skip
        env["ENGINE_DKIM__KEYS"] = json.dumps([entry])
        if arm == "rsa-thread":
            env["ENGINE_DKIM__RSA_IN_THREAD"] = "true"
    maildir = tmp / f"{tag}-maildir"
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(RedisServer(tmp / f"{tag}-redis"))
        sink = stack.enter_context(
            SinkProcess(workdir=tmp / f"{tag}-sink", log=False, maildir=maildir)
        )
        engine = EngineProcess(
            redis.url, sink.url, tmp / f"{tag}-engine", "--role", "all", "--senders", "16",
            "--log-level", "warning", env=env,
        )  # fmt: skip
        stack.callback(stop_engine, engine)
        c = stack.enter_context(httpx.Client(base_url=engine.base, timeout=60, headers=AUTH))
        n = args.messages
        cpu0 = cpu_seconds(engine.proc.pid)
        t0 = time.time()
        posted = 0
        while posted < n:
            r = c.post("/v1/messages/batch", content=body,
                       headers={"content-type": "application/json"})  # fmt: skip
            r.raise_for_status()
            posted += len(r.json()["ids"])
        wait_until(f"{tag}: delivery", lambda: int(sink.stats().get("received", 0)) >= posted,
                   timeout=max(120.0, n / 100))  # fmt: skip
        elapsed = time.time() - t0
        cpu = cpu_seconds(engine.proc.pid) - cpu0
        out: dict[str, Any] = {
            "arm": arm, "posted": posted, "elapsed_s": elapsed, "msgs_per_s": posted / elapsed,
            "engine_cpu_us_per_msg": 1e6 * cpu / posted, "verified": _check_one(maildir, key),
        }  # fmt: skip
        say(f"    {tag}: {out['msgs_per_s']:,.0f} msgs/s, engine CPU "
            f"{out['engine_cpu_us_per_msg']:.0f} µs/msg, signature: {out['verified']}")  # fmt: skip
        return out


def _check_one(maildir: Path, key: DkimKey | None) -> str:
    """One delivered message: signed and verified by dkimpy, or unsigned as expected."""
    files = [p for p in maildir.rglob("*") if p.is_file()]
    if not files:
        return "no mail kept"
    data = files[0].read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    signed = b"DKIM-Signature:" in data.split(b"\r\n\r\n", 1)[0]
    if key is None:
        return "unsigned (expected)" if not signed else "**signed without a key**"
    if not signed:
        return "**UNSIGNED** (is the pool wired to the signer?)"
    try:
        import dkim
    except ImportError:
        return "signed (dkimpy not installed: not verified)"
    record = key.dns_record().value.encode()
    ok = dkim.verify(data, dnsfunc=lambda name, timeout=5: record)
    sender = email.message_from_bytes(data).get("From", "")
    return f"verified ({sender})" if ok else "**FAILED verification**"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each arm (2)")
    parser.add_argument("--messages", type=int, default=20_000, help="per round (20000)")
    parser.add_argument("--batch", type=int, default=500, help="messages per POST (500)")
    parser.add_argument("--calls", type=int, default=400, help="calls per micro run (400)")
    parser.add_argument("--no-e2e", action="store_true", help="the per-message costs only")
    parser.add_argument("--rsa-thread", action="store_true",
                        help="also an arm with RSA signed in a worker thread")  # fmt: skip
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    parser.add_argument("--keep", metavar="DIR", help="keep the work dirs in DIR")
    args = parser.parse_args()
    started = time.monotonic()
    say("per-message signing cost")
    m = micro(args.calls)
    table = [
        f"Typical message: {m['message_bytes']:.0f} bytes. Per message, µs (median of 5 runs):",
        "",
        "| signing | µs / message | note |",
        "|---|---:|---|",
        f"| no key for the From domain | {m['none_us']:.1f} | finding the From domain |",
        f"| RSA 2048 (ours: OpenSSL) | {m['rsa_us']:.0f} | |",
        f"| Ed25519 (ours: OpenSSL) | {m['ed25519_us']:.0f} | |",
    ]
    if "dkimpy_rsa_us" in m:
        table += [
            f"| dkimpy `dkim.sign`, RSA 2048 | {m['dkimpy_rsa_us']:.0f} | pure-Python RSA |",
            f"| dkimpy `dkim.sign`, Ed25519 | {m['dkimpy_ed25519_us']:.0f} | PyNaCl |",
        ]
    table += [
        f"| RSA 2048, the loop thread's own CPU: inline / a hop per mail / a hop per 32 | "
        f"{m['rsa_loop_cpu_inline_us']:.0f} / {m['rsa_loop_cpu_thread_us']:.0f} / "
        f"{m['rsa_loop_cpu_batch_us']:.0f} | a hop's wall time "
        f"{m['rsa_thread_wall_us']:.0f} µs |",
    ]
    runs: dict[str, list[dict[str, Any]]] = {}
    if not args.no_e2e:
        arms = [*ARMS, *(["rsa-thread"] if args.rsa_thread else [])]
        runs = {arm: [] for arm in arms}
        with workdir(args.keep, "bench-dkim-") as tmp:
            for i in range(args.rounds):
                for arm in arms:
                    say(f"round {i + 1}/{args.rounds}: {arm}")
                    runs[arm].append(run_round(args, tmp, arm, i + 1))
        base = statistics.median(r["msgs_per_s"] for r in runs["none"])
        table += ["", "| end to end | msgs/s (median) | engine CPU µs/msg | ratio to no key |"
                  " target | signatures |", "|---|---:|---:|---:|---|---|"]  # fmt: skip
        for arm in arms:
            rate = statistics.median(r["msgs_per_s"] for r in runs[arm])
            cpu = statistics.median(r["engine_cpu_us_per_msg"] for r in runs[arm])
            target = "≥ 0.85 (≤ 15 % cost)" if arm == "rsa" else ""
            met = "" if not target else (" — met" if rate / base >= 0.85 else " — **NOT met**")
            table.append(
                f"| {arm} | {rate:,.0f} | {cpu:.0f} | {rate / base:.2f} × | {target}{met} | "
                + "; ".join(sorted({r["verified"] for r in runs[arm]}))
                + " |"
            )
    publish(table, {"micro": m, "runs": runs}, args.json, args, started)


if __name__ == "__main__":
    main()
