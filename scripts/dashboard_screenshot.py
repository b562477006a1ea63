"""Screenshot of the dashboard under traffic, for the README: docs/dashboard.png.

Starts its own Redis and `engine serve` (with the embedded sink, so captured mail shows),
posts a varying stream of mail for a while (some refused for good, some temporarily),
opens the page in Debian's headless chromium, looks one retried message up, and saves
the viewport. Run: .venv/bin/python -m scripts.dashboard_screenshot [--out FILE]
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import expect, sync_playwright

from engine.embedded import RedisServer
from fixtures.auth import AUTH, TEST_ADMIN_KEY
from fixtures.dashboard import chromium_path, engine_with_sink, post_batch

ROOT = Path(__file__).resolve().parent.parent

TENANTS = ["acme", "globex", "initech"]


def _message(rng: random.Random, n: int) -> dict[str, Any]:
    roll = rng.random()
    if roll < 0.02:
        to = f"gone{n}+550@example.com"  # refused for good: dead-lettered at once
    elif roll < 0.05:
        to = f"busy{n}+451@example.net"  # refused for now: retried, then dead-lettered
    else:
        to = f"user{n}@example.{rng.choice(['com', 'org', 'net'])}"
    return {
        "to": to,
        "from": "Shop <shop@example.com>",
        "subject": f"Order {n} confirmed",
        "text": "Thank you for your order.",
        "tenant": rng.choice(TENANTS),
        "priority": rng.choice(["high", "normal", "normal", "low"]),
        "tags": ["order"],
        "max_attempts": 2,
    }


def _traffic(client: httpx.Client, rng: random.Random, seconds: float, n: int) -> int:
    """Post for ``seconds`` at a rate swinging between ~30 and ~170 messages/s."""
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < seconds:
        rate = 100 + 70 * math.sin(elapsed / 6)
        batch = [_message(rng, n + i) for i in range(max(1, int(rate / 4)))]
        n += len(batch)
        post_batch(client, batch)
        time.sleep(0.25)
    return n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    parser.add_argument("--seconds", type=float, default=40, help="traffic before the shot")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args()
    chromium = chromium_path()
    if chromium is None:
        sys.exit("error: needs chromium on PATH (apt-get install chromium)")
    rng = random.Random(5)
    with (
        tempfile.TemporaryDirectory(prefix="dashboard-shot-") as tmp,
        RedisServer(Path(tmp) / "redis") as redis,
    ):
        engine = engine_with_sink(redis.url, Path(tmp), "--senders", "8")
        try:
            with (
                httpx.Client(base_url=engine.base, headers=AUTH, timeout=10) as client,
                sync_playwright() as p,
            ):
                for tenant in TENANTS:  # each may send From example.com
                    r = client.put(f"/v1/tenants/{tenant}", json={"identities": ["example.com"]})
                    r.raise_for_status()
                browser = p.chromium.launch(executable_path=chromium)
                page = browser.new_page(viewport={"width": args.width, "height": args.height})
                page.goto(engine.base + "/")
                page.fill("#login-key", TEST_ADMIN_KEY)  # the page asks for a key first
                page.click("#login-form button[type=submit]")
                expect(page.locator("main")).to_be_visible()
                # A few scheduled for later, so every counter has something to show.
                post_batch(client, [{**_message(rng, i), "delay_s": 600} for i in range(12)])
                n = _traffic(client, rng, args.seconds, 100)
                retried = client.get("/v1/dead?limit=500").json()["items"]
                twice = [m for m in retried if m["attempts"] == 2]
                if twice:
                    page.fill("#lookup-id", twice[-1]["id"])
                    page.click("#lookup-form button")
                    expect(page.locator("#lookup-result .facts")).to_be_visible()
                    expect(page.locator("#lookup-result .timeline li").first).to_be_visible()
                _traffic(client, rng, 2, n)
                page.screenshot(path=str(args.out), full_page=True)
                browser.close()
        finally:
            engine.stop()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
