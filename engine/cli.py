"""The ``engine`` command: ``serve``, ``sink``, ``send`` and ``watch``.

The sink (asyncio/aiosmtpd) is imported only when its subcommand runs.
"""

from __future__ import annotations

import argparse
import errno
import gc
import json
import logging
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from engine import __version__
from engine.config import Settings, load_settings, redact_url
from engine.errors import ConfigError

EPILOG = """\
Every serve flag has an environment twin (ENGINE_REDIS_URL, ENGINE_SMTP_URL, ENGINE_BIND,
ENGINE_SENDERS, ENGINE_RATE; any setting as ENGINE_<SECTION>__<FIELD>, e.g.
ENGINE_QUEUE__LEASE_S=15) and a TOML key (--config FILE, sections redis, http, smtp,
sender, queue, sink). Precedence: flags > environment > file > defaults.
"""


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run the engine (HTTP API + senders + reaper)",
        description="Run one engine process. With no --redis-url it starts its own Redis "
        "(data under ./var/redis); with no --smtp-url it starts a local SMTP sink.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--redis-url", help="redis://host:port/db (default: embedded Redis)")
    p.add_argument(
        "--smtp-url", help="smtp://[user:pass@]host:port or smtps://... (default: embedded sink)"
    )
    p.add_argument("--bind", help="HOST:PORT for the HTTP API (default 127.0.0.1:8080)")
    p.add_argument("--senders", type=int, help="concurrent sender tasks (default 16)")
    p.add_argument(
        "--rate",
        type=float,
        metavar="MSGS_PER_S",
        help="global send rate limit, messages/second (default 0 = unlimited)",
    )
    p.add_argument(
        "--role",
        choices=["all", "api", "sender"],
        help="all (default): API + senders; api: ingest only; sender: senders only",
    )
    p.add_argument("--config", metavar="FILE", help="TOML settings file")
    p.add_argument(
        "--log-level",
        default=os.environ.get("ENGINE_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
    )


def _send_parser(sub: Any) -> None:
    p = sub.add_parser(
        "send",
        help="enqueue one message through the HTTP API",
        description="POST one message to a running engine and print its id.",
    )
    p.add_argument("--to", action="append", required=True, help="recipient (repeatable)")
    p.add_argument("--from", dest="sender", help="sender address")
    p.add_argument("--cc", action="append", default=[])
    p.add_argument("--bcc", action="append", default=[])
    p.add_argument("--subject", default="")
    p.add_argument("--text", help="plain-text body")
    p.add_argument("--html", help="HTML body")
    p.add_argument("--tag", action="append", default=[], dest="tags")
    p.add_argument("--priority", help="high, normal, low, or 1-10 (10 most urgent)")
    p.add_argument("--tenant", help="whose mail this is (per-tenant limits, fair turns)")
    p.add_argument(
        "--template", metavar="NAME",
        help="a template of the tenant's (/v1/templates) instead of --subject/--text/--html",
    )  # fmt: skip
    p.add_argument("--template-version", type=int, metavar="N", help="pin a kept version")
    p.add_argument(
        "--var", action="append", default=[], metavar="NAME=VALUE",
        help="a template variable (repeatable); VALUE is read as JSON when it parses "
        "(42, true, [1,2]), else as text",
    )  # fmt: skip
    p.add_argument(
        "--attach", action="append", default=[], metavar="FILE",
        help="attach a file (repeatable): uploaded first (POST /v1/attachments), then "
        "named by its id",
    )  # fmt: skip
    p.add_argument(
        "--sandbox", action="store_true",
        help="test mode: queued and kept (GET /v1/messages/{id}/raw), not sent to a server",
    )  # fmt: skip
    p.add_argument(
        "--unsubscribe", nargs="?", const=True, metavar="LIST",
        help="add one-click unsubscribe headers (RFC 8058); with LIST, name the list",
    )  # fmt: skip
    when = p.add_mutually_exclusive_group()
    when.add_argument("--send-at", metavar="TIME", help="RFC 3339, e.g. 2026-11-22T18:00:00Z")
    when.add_argument("--delay", type=float, metavar="SECONDS", help="send this much later")
    _client_arguments(p)


def _client_arguments(p: Any) -> None:
    """--url and --key of the commands that call a running engine's API."""
    p.add_argument(
        "--url",
        default=os.environ.get("ENGINE_URL", "http://127.0.0.1:8080"),
        help="engine base URL (default http://127.0.0.1:8080, env ENGINE_URL)",
    )
    p.add_argument(
        "--key",
        default=None,
        help="API key (default: env ENGINE_API_KEY, else the file auth.admin_key_file, "
        "var/admin.key, that the first `engine serve` writes)",
    )


def api_key(args: argparse.Namespace) -> str | None:
    """The key a client command presents: --key, ENGINE_API_KEY, or the admin key file."""
    if getattr(args, "key", None):
        return str(args.key)
    if os.environ.get("ENGINE_API_KEY"):
        return os.environ["ENGINE_API_KEY"]
    path = Path(os.environ.get("ENGINE_AUTH__ADMIN_KEY_FILE") or "var/admin.key")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _access_parsers(sub: Any) -> None:
    keys = sub.add_parser(
        "keys",
        help="make, list and revoke API keys (through the API, with an admin key)",
        description="API keys: `create` prints the new key once (only its hash is kept); "
        "`list` shows kid, name, scopes and tenants; `revoke KID` stops it on every replica "
        "within auth.refresh_s. Scopes: send, read, events, dead-letters, schedules, admin.",
    )
    ksub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    create = ksub.add_parser("create", help="make a key and print it (shown once)")
    create.add_argument("--name", default="", help="what it is for (shown in lists)")
    create.add_argument(
        "--scope", action="append", dest="scopes", metavar="SCOPE",
        help="send, read, events, dead-letters, schedules, webhooks, suppressions, templates "
        "or admin (repeatable; default send)",
    )  # fmt: skip
    create.add_argument("--tenant", default="default", help="its tenant (default: default)")
    create.add_argument(
        "--sandbox", action="store_true",
        help="a test key: its messages are queued and kept (GET /v1/messages/{id}/raw), "
        "never sent to a server",
    )  # fmt: skip
    create.add_argument(
        "--also", action="append", default=[], dest="tenants", metavar="TENANT",
        help="a further tenant it may send for (repeatable; * for every tenant)",
    )  # fmt: skip
    ksub.add_parser("list", help="list the keys (never the keys themselves)")
    ksub.add_parser(
        "generate",
        help="print a new key without an engine (for auth.admin_key / ENGINE_ADMIN_KEY)",
    )
    revoke = ksub.add_parser("revoke", help="revoke a key by its kid")
    revoke.add_argument("kid")
    tenants = sub.add_parser(
        "tenants",
        help="set and list tenants' sender identities (From domains or addresses)",
        description="A tenant's keys may send From its identities only: domains "
        "(example.com: any address there), addresses, or * (any).",
    )
    tsub = tenants.add_subparsers(dest="tenants_command", metavar="ACTION", required=True)
    put = tsub.add_parser("set", help="set a tenant's identities (replaces them)")
    put.add_argument("name")
    put.add_argument(
        "--from", action="append", default=[], dest="identities", metavar="IDENTITY",
        help="a domain, an address or * (repeatable)",
    )  # fmt: skip
    tsub.add_parser("list", help="list tenants and their identities")
    for p in (create, ksub.choices["list"], revoke, put, tsub.choices["list"]):  # API calls
        _client_arguments(p)


def _call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One API call: (status, decoded JSON or None); (0, reason) when unreachable."""
    headers = {"Accept": "application/json"}
    key = api_key(args)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(
        args.url.rstrip("/") + path, data=data, headers=headers, method=method
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, raw.decode(errors="replace")
    except urllib.error.URLError as exc:
        return 0, str(exc.reason)


def _failed(args: argparse.Namespace, status: int, answer: Any) -> int:
    if status == 0:
        print(
            f"error: cannot reach the engine at {args.url}: {answer} "
            "(is `engine serve` running? set --url or ENGINE_URL)",
            file=sys.stderr,
        )
    elif status == 401:
        print(
            "error: the engine wants an API key: --key, ENGINE_API_KEY, or run from the "
            "directory whose var/admin.key the first `engine serve` wrote",
            file=sys.stderr,
        )
    else:
        detail = answer.get("detail", answer) if isinstance(answer, dict) else answer
        print(f"error: the engine answered {status}: {detail}", file=sys.stderr)
    return 1


def keys_command(args: argparse.Namespace) -> int:
    if args.keys_command == "generate":
        from engine.auth import make_key

        print(make_key()[1])
        return 0
    if args.keys_command == "create":
        body = {"name": args.name, "scopes": args.scopes or ["send"], "tenant": args.tenant,
                "tenants": args.tenants, "sandbox": args.sandbox}  # fmt: skip
        status, answer = _call(args, "POST", "/v1/keys", body)
        if status != 201:
            return _failed(args, status, answer)
        print(answer["key"])
        print(
            f"kid {answer['kid']}  scopes {','.join(answer['scopes'])}  tenant "
            f"{answer['tenant']}  (the key is shown this once)",
            file=sys.stderr,
        )
        return 0
    if args.keys_command == "list":
        status, answer = _call(args, "GET", "/v1/keys")
        if status != 200:
            return _failed(args, status, answer)
        for k in answer["items"]:
            also = f" +{','.join(k['tenants'])}" if k["tenants"] else ""
            print(f"{k['kid']}  {','.join(k['scopes']):<28} {k['tenant']}{also:<12} "
                  f"{k['created_at']}  {k['name']}")  # fmt: skip
        return 0
    status, answer = _call(args, "DELETE", f"/v1/keys/{args.kid}")
    if status != 204:
        return _failed(args, status, answer)
    print(f"revoked {args.kid}", file=sys.stderr)
    return 0


def tenants_command(args: argparse.Namespace) -> int:
    if args.tenants_command == "set":
        body = {"identities": args.identities}
        status, answer = _call(args, "PUT", f"/v1/tenants/{args.name}", body)
        if status not in (200, 201):
            return _failed(args, status, answer)
        print(f"{answer['name']}: {', '.join(answer['identities']) or '(none)'}")
        return 0
    status, answer = _call(args, "GET", "/v1/tenants")
    if status != 200:
        return _failed(args, status, answer)
    for t in answer["items"]:
        print(f"{t['name']}: {', '.join(t['identities']) or '(none)'}")
    return 0


def _watch_parser(sub: Any) -> None:
    p = sub.add_parser(
        "watch",
        help="follow message events live (websocket)",
        description="Print message events as they happen (one line each, or JSON lines); "
        "reconnects after a drop and resumes where it stopped. Filters of one kind are "
        "OR-ed, different kinds AND-ed. Ctrl-C stops.",
    )
    _client_arguments(p)
    p.add_argument(
        "--id", action="append", default=[], dest="ids", metavar="ID", help="a message (repeatable)"
    )
    p.add_argument(
        "--type",
        action="append",
        default=[],
        dest="types",
        metavar="TYPE",
        help="queued, scheduled, processing, sent, retrying, failed, cancelled, deleted, "
        "expired, suppressed, or a provider's delivered, bounced, complained, delayed "
        "(repeatable)",
    )
    p.add_argument(
        "--tenant", action="append", default=[], dest="tenants", metavar="TENANT",
        help="a tenant's messages (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--tag", action="append", default=[], dest="tags", metavar="TAG",
        help="messages with this tag (repeatable)",
    )  # fmt: skip
    p.add_argument("--since", default="", metavar="EVENT_ID", help="replay the events after it")
    p.add_argument("--json", action="store_true", help="print JSON lines: one event a line")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="engine",
        description="Email-delivery engine: HTTP ingest -> Redis reliable queue -> SMTP.",
    )
    parser.add_argument("--version", action="version", version=f"engine {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _serve_parser(sub)
    sink = sub.add_parser(
        "sink",
        help="run the SMTP sink (capture + fault injection)",
        description="An aiosmtpd SMTP server that counts and keeps what "
        "it receives; prints a one-line summary on exit.",
    )
    from engine.sink import add_arguments

    add_arguments(sink)
    _send_parser(sub)
    _watch_parser(sub)
    _access_parsers(sub)
    _db_parser(sub)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    pairs = [
        ("redis", "url", args.redis_url),
        ("smtp", "url", args.smtp_url),
        ("http", "bind", args.bind),
        ("sender", "senders", args.senders),
        ("sender", "rate_per_s", args.rate),
        ("", "role", args.role),
    ]
    for section, field, value in pairs:
        if value is not None and section:
            out.setdefault(section, {})[field] = value
        elif value is not None:
            out[field] = value
    return out


def _db_parser(sub: Any) -> None:
    p = sub.add_parser(
        "db",
        help="the message history's PostgreSQL schema: migrate, status",
        description="Apply the history's schema migrations (safe to run on every start and "
        "from several replicas at once: an advisory lock), or list those applied. The "
        "database is history.dsn (--dsn, ENGINE_HISTORY_DSN, or the settings file).",
    )
    p.add_argument("action", choices=["migrate", "status"])
    p.add_argument("--dsn", help="postgresql://user:password@host:port/db (default: history.dsn)")
    p.add_argument("--config", metavar="FILE", help="TOML settings file")


def db_command(args: argparse.Namespace) -> int:
    """`engine db migrate|status` (synchronous: one connection)."""
    settings = load_settings(config_file=args.config)
    dsn = args.dsn or settings.history.dsn
    if not dsn:
        raise ConfigError("no database: give --dsn or set history.dsn (ENGINE_HISTORY_DSN)")
    import psycopg

    from engine.history import applied_versions, migrate, migrations

    local = None
    if dsn == "local":
        from engine.pgserver import PostgresServer

        local = PostgresServer(settings.history.data_dir).start()
        dsn = local.dsn
    try:
        with psycopg.connect(dsn, connect_timeout=10) as conn:
            if args.action == "migrate":
                done = migrate(conn)
                for m in done:
                    print(f"applied {m.version:04d} {m.name}")
                print(f"schema at version {max((m.version for m in migrations()), default=0):04d}"
                      f" ({len(done)} applied now)")  # fmt: skip
            else:
                have = set(applied_versions(conn))
                for m in migrations():
                    print(
                        f"{m.version:04d} {m.name}: {'applied' if m.version in have else 'PENDING'}"
                    )
    except psycopg.Error as exc:
        raise ConfigError(f"history database {redact_url(dsn)}: {exc}") from None
    finally:
        if local is not None:
            local.stop()
    return 0


def _banner(
    settings: Settings, redis_url: str, smtp_url: str, embedded: list[str], admin: Any = None
) -> str:
    host, _, port = settings.http.bind.rpartition(":")
    base = f"http://{host}:{port}"
    key_file = settings.auth.admin_key_file or "<your key file>"
    auth = f'-H "Authorization: Bearer $(cat {key_file})" ' if settings.auth.enabled else ""
    curl = (
        f"curl -sS -X POST {base}/v1/messages {auth}-H 'Content-Type: application/json' \\\n"
        '     -d \'{"to":"you@example.com","subject":"Hello","text":"It works."}\''
    )
    lines = [
        f"engine {__version__} ready",
        f"  API        {base}   (health {base}/healthz, ready {base}/readyz)",
        f"  Dashboard  {base}/",
        f"  Redis      {redact_url(redis_url)}{'  (embedded)' if 'redis' in embedded else ''}",
        f"  SMTP       {redact_url(smtp_url)}{'  (embedded sink)' if 'sink' in embedded else ''}",
    ]
    if settings.history.dsn:
        local = "  (local)" if "postgres" in embedded else ""
        lines.append(f"  History    {redact_url(settings.history.dsn)}{local}")
    else:
        lines.append("  History    off: Redis only (set history.dsn to keep it in PostgreSQL)")
    if "sink" in embedded and settings.sink.maildir:
        lines.append(f"  Mail       {Path(settings.sink.maildir).resolve()}/new")
    if not settings.auth.enabled:
        lines.append("  Auth       OFF (auth.enabled = false): whoever reaches the port is admin")
    elif admin is not None and admin.made:
        kept = f"; kept in {admin.file} (0600)" if admin.file else ""
        lines += ["", f"Admin API key (made now, shown once{kept}):", f"  {admin.made}"]
    elif admin is not None and admin.file:
        lines.append(f"  API key    admin key in {admin.file}  (engine keys create makes more)")
    else:
        lines.append("  API key    send one: Authorization: Bearer <key>  (engine keys --help)")
    lines += ["", "Send a message:", curl,
              f"Then: curl -sS {auth}{base}/v1/messages/<id>", ""]  # fmt: skip
    return "\n".join(lines)


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    # coredis logs every NOSCRIPT retry and reconnect at INFO.
    logging.getLogger("coredis").setLevel(max(logging.WARNING, logging.getLogger().level))
    settings = load_settings(config_file=args.config, overrides=_overrides(args))
    import msgspec
    import trio

    from engine.embedded import RedisServer, SinkProcess
    from engine.pgserver import PostgresServer
    from engine.service import run_engine

    embedded: list[str] = []
    redis_server: RedisServer | None = None
    sink: SinkProcess | None = None
    pg: PostgresServer | None = None
    try:
        if settings.history.dsn == "local":  # like an unset redis.url: one of our own
            pg = PostgresServer(settings.history.data_dir).start()
            history = msgspec.structs.replace(settings.history, dsn=pg.dsn)
            settings = msgspec.structs.replace(settings, history=history)
            embedded.append("postgres")
        redis_url = settings.redis.url
        if redis_url is None:
            redis_server = RedisServer(
                settings.redis.data_dir, maxmemory_bytes=settings.redis.maxmemory_bytes
            ).start()
            redis_url = redis_server.url
            embedded.append("redis")
        smtp_url = settings.smtp.url
        if smtp_url is None:
            # Its "listening" line and exit summary go to our stdout (output=False).
            sink = SinkProcess(
                bind=settings.sink.bind, maildir=settings.sink.maildir, log=False, output=False
            ).start()
            smtp_url = sink.url
            embedded.append("sink")

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                running = await nursery.start(
                    lambda task_status: run_engine(
                        settings,
                        redis_url=redis_url,
                        smtp_url=smtp_url,
                        sink_maildir=settings.sink.maildir if sink is not None else None,
                        task_status=task_status,
                    )
                )
                print(_banner(settings, redis_url, smtp_url, embedded, running.admin), flush=True)
                _tune_gc()

        try:
            trio.run(main)
        except BaseExceptionGroup as group:
            # A setting found wrong as the parts are built (the SMTP URL, CA file, EHLO
            # name): one line saying what to fix, like the ones load_settings finds.
            wrong: BaseException | None = group.subgroup(ConfigError)
            while isinstance(wrong, BaseExceptionGroup):
                wrong = wrong.exceptions[0]
            if wrong is not None:
                raise wrong from None
            in_use = _find_oserror(group, errno.EADDRINUSE)
            if in_use is None:
                raise
            raise ConfigError(
                f"cannot listen on {settings.http.bind}: address already in use "
                "(is another engine running? choose another with --bind)"
            ) from None
    finally:
        if sink is not None:
            sink.close()
        if redis_server is not None:
            redis_server.stop()
        if pg is not None:
            pg.stop()
    return 0


def _tune_gc() -> None:
    """Once started: move what exists (modules, settings, connections) out of the
    collector's sight and collect the young generation less often. The hot paths make
    short-lived containers by the thousand a second; with Python's defaults the cyclic
    collector took ~8 % of the process under load (perf), mostly re-walking objects that
    live as long as the process."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def _find_oserror(exc: BaseException, code: int) -> OSError | None:
    if isinstance(exc, OSError) and exc.errno == code:
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find_oserror(inner, code)
            if found is not None:
                return found
    return None


def template_variables(pairs: list[str]) -> dict[str, Any]:
    """``--var name=value`` pairs as the send's ``variables`` (JSON values when they
    parse, text otherwise)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"error: --var {pair!r}: write NAME=VALUE")
        try:
            out[name] = json.loads(value)
        except ValueError:
            out[name] = value
    return out


def upload_file(args: argparse.Namespace, path: Path, key: str | None) -> dict[str, str]:
    """Upload ``path`` (POST /v1/attachments, streamed from the file) and return the
    message's attachment that names it."""
    size = path.stat().st_size
    query = urllib.parse.urlencode({"filename": path.name})
    headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    with path.open("rb") as data:
        req = urllib.request.Request(
            f"{args.url.rstrip('/')}/v1/attachments?{query}", data=data, headers=headers,
            method="POST",
        )  # fmt: skip
        with urllib.request.urlopen(req, timeout=60) as resp:
            made = json.loads(resp.read())
    return {"filename": path.name, "attachment_id": made["id"]}


def send(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {
        "to": args.to if len(args.to) > 1 else args.to[0],
        "subject": args.subject,
    }
    for key, value in (("from", args.sender), ("text", args.text), ("html", args.html)):
        if value is not None:
            body[key] = value
    if args.cc:
        body["cc"] = args.cc
    if args.bcc:
        body["bcc"] = args.bcc
    if args.tags:
        body["tags"] = args.tags
    if args.priority is not None:
        body["priority"] = int(args.priority) if args.priority.isdigit() else args.priority
    for key, value in (("tenant", args.tenant), ("send_at", args.send_at), ("delay_s", args.delay)):
        if value is not None:
            body[key] = value
    if args.template is not None:
        body["template"] = args.template
        del body["subject"]
        if args.template_version is not None:
            body["template_version"] = args.template_version
        body["variables"] = template_variables(args.var)
    elif args.var:
        print("error: --var goes with --template", file=sys.stderr)
        return 2
    if args.unsubscribe is not None:
        body["unsubscribe"] = args.unsubscribe
    if args.sandbox:
        body["sandbox"] = True
    if args.text is None and args.html is None and args.template is None:
        body["text"] = ""
    headers = {"Content-Type": "application/json"}
    presented = api_key(args)
    if presented:
        headers["Authorization"] = f"Bearer {presented}"
    try:
        if args.attach:
            body["attachments"] = [upload_file(args, Path(f), presented) for f in args.attach]
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        print(f"error: the engine answered {exc.code}: {detail}", file=sys.stderr)
        return 1
    except (OSError, urllib.error.URLError) as exc:
        print(f"error: cannot upload an attachment: {exc}", file=sys.stderr)
        return 1
    req = urllib.request.Request(
        args.url.rstrip("/") + "/v1/messages",
        data=json.dumps(body).encode(),
        headers=headers,
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            print(json.loads(resp.read())["id"])
            return 0
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        print(f"error: the engine answered {exc.code}: {detail}", file=sys.stderr)
        return 1
    except urllib.error.URLError as exc:
        print(
            f"error: cannot reach the engine at {args.url}: {exc.reason} "
            "(is `engine serve` running? set --url or ENGINE_URL)",
            file=sys.stderr,
        )
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
        if args.command == "send":
            return send(args)
        if args.command == "watch":
            from engine.watch import run as watch

            return watch(args, api_key(args))
        if args.command == "keys":
            return keys_command(args)
        if args.command == "tenants":
            return tenants_command(args)
        if args.command == "db":
            return db_command(args)
        from engine.sink import run

        return run(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
