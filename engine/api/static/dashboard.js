// The engine's dashboard: polls /v1/stats, /v1/dead, /v1/templates and /v1/sink/messages,
// tails WS /v1/events, looks messages up, renders templates. No build step, no
// dependencies but uPlot.
// Everything that comes from the API is shown through textContent, never as HTML.
(() => {
  "use strict";

  const STATS_EVERY_MS = 1000;
  const DEAD_EVERY_MS = 2000;
  const MAIL_EVERY_MS = 3000;
  const FEED_MAX_ROWS = 300;
  const CHART_WINDOW_S = 300; // the rate chart keeps the last five minutes
  const CHART_HEIGHT_PX = 215;
  const RECONNECT_MAX_MS = 15000;
  const CLOSE_TOO_SLOW = 4008; // the hub dropped this page: it fell behind the feed
  const EVENT_TYPES = new Set([
    "queued", "scheduled", "processing", "sent", "retrying", "failed", "cancelled", "deleted",
    "suppressed", "expired", "delivered", "bounced", "complained", "delayed",
  ]);
  const ID_RE = /^[0-9a-f]{32}$/;

  const $ = (id) => document.getElementById(id);

  // ---- DOM helpers ------------------------------------------------------------------

  /** el("td", {className: "x", title: "y"}, "text", otherNode) — strings become text. */
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === undefined || value === null) continue;
      if (key === "dataset") Object.assign(node.dataset, value);
      else if (key === "onclick") node.addEventListener("click", value);
      else node[key] = value;
    }
    for (const child of children) {
      if (child === undefined || child === null) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function badge(type) {
    const known = EVENT_TYPES.has(type);
    return el("span", { className: known ? `badge t-${type}` : "badge" }, type || "?");
  }

  function idButton(id) {
    if (typeof id !== "string" || !id) return el("span", { className: "muted" }, "—");
    return el(
      "button",
      { type: "button", className: "id", title: `look up ${id}`, onclick: () => lookup(id) },
      `${id.slice(0, 4)}…${id.slice(-8)}`, // a batch's ids share their first 12 digits
    );
  }

  const fmt = (n) => (typeof n === "number" ? n.toLocaleString("en-US") : "–");

  function fmtRate(r) {
    if (r === null || r === undefined) return "–";
    return r >= 100 ? Math.round(r).toLocaleString("en-US") : r.toFixed(1);
  }

  function fmtBytes(n) {
    if (typeof n !== "number") return "";
    if (n < 1024) return `${n} B`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
    return `${(n / 1024 / 1024).toFixed(1)} MiB`;
  }

  /** An event's or record's time: ms since the epoch, seconds, or RFC 3339. */
  function toDate(at) {
    if (typeof at === "number") return new Date(at < 1e11 ? at * 1000 : at);
    if (typeof at === "string" && at) {
      const n = Number(at);
      return Number.isFinite(n) ? toDate(n) : new Date(at);
    }
    return null;
  }

  function fmtTime(at) {
    const d = toDate(at);
    if (!d || Number.isNaN(d.getTime())) return "";
    const p = (n, w = 2) => String(n).padStart(w, "0");
    return `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}.${p(d.getMilliseconds(), 3)}`;
  }

  /** The time of day when it is today, else the date too. */
  function fmtDateTime(at) {
    const d = toDate(at);
    if (!d || Number.isNaN(d.getTime())) return "";
    const day = d.toLocaleDateString("en-CA");
    const today = new Date().toLocaleDateString("en-CA");
    return day === today ? fmtTime(d.getTime()) : `${day} ${fmtTime(d.getTime())}`;
  }

  // ---- API and its errors -----------------------------------------------------------

  class ApiError extends Error {
    constructor(status, problem) {
      const title = (problem && problem.title) || "Request failed";
      super(title);
      this.status = status;
      this.problem = problem || {};
    }

    describe() {
      const p = this.problem;
      const status = this.status ? ` (${this.status})` : "";
      const detail = p.detail ? `: ${p.detail}` : "";
      const field = p.field ? ` [${p.field}]` : "";
      return `${this.message}${status}${detail}${field}`;
    }
  }

  async function api(method, path, body) {
    const init = { method, headers: { Accept: "application/json" } };
    if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers["Content-Type"] = "application/json";
    }
    let res;
    try {
      res = await fetch(path, init);
    } catch (err) {
      throw new ApiError(0, { title: "API unreachable", detail: String(err && err.message) });
    }
    if (res.status === 204) return null;
    const type = res.headers.get("Content-Type") || "";
    const data = type.includes("json") ? await res.json().catch(() => null) : null;
    if (!res.ok) {
      const problem = data && typeof data === "object" ? data : { title: res.statusText };
      throw new ApiError(res.status, problem);
    }
    return data;
  }

  const problems = new Map(); // source -> element

  function showProblem(source, err) {
    const text = err instanceof ApiError ? err.describe() : String(err);
    let node = problems.get(source);
    if (!node) {
      node = el("div", { className: "problem", dataset: { source } });
      problems.set(source, node);
      $("problems").append(node);
    }
    const dismiss = el(
      "button",
      { type: "button", className: "quiet", title: "dismiss", onclick: () => clearProblem(source) },
      "×",
    );
    node.replaceChildren(el("b", {}, source), " ", text, " ", dismiss);
  }

  function clearProblem(source) {
    const node = problems.get(source);
    if (node) node.remove();
    problems.delete(source);
  }

  function notice(text) {
    const node = el("div", { className: "notice" }, text);
    $("notices").prepend(node);
    setTimeout(() => node.remove(), 6000);
  }

  function setPill(id, text, ok) {
    const pill = $(id);
    pill.textContent = text;
    pill.classList.toggle("ok", ok === true);
    pill.classList.toggle("bad", ok === false);
  }

  /** Run fn now and then every ms after it finishes (never overlapping). */
  function every(ms, fn) {
    let stopped = false;
    const tick = async () => {
      if (stopped) return;
      try {
        await fn();
      } finally {
        if (!stopped) setTimeout(tick, ms);
      }
    };
    tick();
    return () => { stopped = true; };
  }

  // ---- counts and the rate chart ----------------------------------------------------

  // Per sample: its time (s), the rates over the gap before it, and the counts in that gap.
  const rates = { xs: [], sent: [], failed: [], sentN: [], failedN: [], last: null, chart: null };

  function renderStats(s) {
    const t = s.totals || {};
    const lanes = s.ready_by_lane || {};
    const values = {
      "stat-ready": s.ready, "stat-processing": s.processing, "stat-delayed": s.delayed,
      "stat-dead": s.dead, "stat-sent": t.sent, "stat-failed": t.failed,
      "stat-enqueued": t.enqueued, "stat-cancelled": t.cancelled,
      "stat-throttled": t.throttled, "stat-reaped": t.reaped,
      "stat-instances": s.instances, "stat-senders": s.senders,
      "stat-lane-high": lanes.high, "stat-lane-normal": lanes.normal, "stat-lane-low": lanes.low,
    };
    for (const [id, v] of Object.entries(values)) $(id).textContent = fmt(v);
    $("updated").textContent = `updated ${fmtTime(s.at)}`;
    renderTransports(s.transports || []);
  }

  // A transport is down: its mail fails over to the next transport of each message's
  // order, or waits in the queue when there is none; the senders of every replica probe it.
  function renderTransports(list) {
    const down = list.filter((t) => t.state === "down");
    const up = list.filter((t) => t.state !== "down").map((t) => t.name);
    const banner = $("transport-banner");
    banner.hidden = down.length === 0;
    const where = up.length
      ? `Its mail goes to the next transport of its order (up: ${up.join(", ")}), ` +
        `or waits in the queue when its order has none (no attempts are spent)`
      : "Mail waits in the queue (no attempts are spent)";
    banner.textContent = down.map((t) =>
      `Transport ${t.name} is down since ${fmtTime(Date.parse(t.down_since))} ` +
      `(${t.failures} failure${t.failures === 1 ? "" : "s"} in a row): ${t.reason}. ` +
      `${where}; next probe ${fmtTime(Date.parse(t.next_probe_at))}.`).join(" ");
  }

  function addRateSample(s) {
    const now = { at: s.at, sent: s.totals.sent, failed: s.totals.failed };
    const last = rates.last;
    rates.last = now;
    // No baseline yet, the clock went back, or the counters were reset (Redis flushed).
    if (!last || now.at <= last.at || now.sent < last.sent || now.failed < last.failed) return;
    const dt = (now.at - last.at) / 1000;
    rates.xs.push(now.at / 1000);
    rates.sentN.push(now.sent - last.sent);
    rates.failedN.push(now.failed - last.failed);
    rates.sent.push(rates.sentN.at(-1) / dt);
    rates.failed.push(rates.failedN.at(-1) / dt);
    const oldest = now.at / 1000 - CHART_WINDOW_S;
    while (rates.xs.length && rates.xs[0] < oldest) {
      for (const series of [rates.xs, rates.sent, rates.failed, rates.sentN, rates.failedN]) {
        series.shift();
      }
    }
    $("rate-sent").textContent = fmtRate(rates.sent.at(-1));
    $("rate-failed").textContent = fmtRate(rates.failed.at(-1));
    $("minute-sent").textContent = fmt(sumSince(rates.sentN, now.at / 1000 - 60));
    $("minute-failed").textContent = fmt(sumSince(rates.failedN, now.at / 1000 - 60));
    if (rates.chart) rates.chart.setData([rates.xs, rates.sent, rates.failed]);
  }

  /** The counts of the samples taken after t0 (s). */
  function sumSince(counts, t0) {
    let total = 0;
    for (let i = rates.xs.length - 1; i >= 0 && rates.xs[i] > t0; i--) total += counts[i];
    return total;
  }

  function makeChart() {
    const box = $("chart");
    if (typeof window.uPlot !== "function") {
      box.replaceChildren(el("p", { className: "muted" }, "chart library failed to load"));
      return;
    }
    const css = getComputedStyle(document.documentElement);
    const color = (name) => css.getPropertyValue(name).trim();
    const opts = {
      width: Math.max(box.clientWidth, 300),
      height: CHART_HEIGHT_PX,
      scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(5, max * 1.15)] } },
      series: [
        {},
        { label: "sent/s", stroke: color("--sent"), fill: color("--sent-fill"), width: 2,
          value: (u, v) => (v === null ? "–" : fmtRate(v)) },
        { label: "failed/s", stroke: color("--failed"), width: 2,
          value: (u, v) => (v === null ? "–" : fmtRate(v)) },
      ],
      axes: [{ stroke: color("--muted") }, { stroke: color("--muted"), size: 50 }],
      cursor: { drag: { x: false, y: false } },
      legend: { show: false }, // the line above the chart says which colour is which
    };
    rates.chart = new window.uPlot(opts, [[], [], []], box);
    new ResizeObserver(() => {
      rates.chart.setSize({ width: Math.max(box.clientWidth, 300), height: CHART_HEIGHT_PX });
    }).observe(box);
  }

  async function pollStats() {
    try {
      const s = await api("GET", "/v1/stats");
      clearProblem("stats");
      setPill("api-status", "API: ok", true);
      renderStats(s);
      addRateSample(s);
    } catch (err) {
      setPill("api-status", "API: unreachable", false);
      showProblem("stats", err);
    }
  }

  // ---- live event feed --------------------------------------------------------------

  const feed = {
    ws: null, lastEventId: null, retryMs: 1000, pending: [], flushTimer: null,
    received: 0, receivedAt: performance.now(),
  };

  function feedUrl() {
    const q = new URLSearchParams();
    const type = $("feed-type").value;
    if (type) q.set("type", type);
    if (feed.lastEventId) q.set("since", feed.lastEventId);
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const query = q.toString();
    return `${scheme}://${location.host}/v1/events${query ? `?${query}` : ""}`;
  }

  function connectFeed() {
    let ws;
    try {
      ws = new WebSocket(feedUrl());
    } catch (err) {
      reconnectFeed(String(err && err.message));
      return;
    }
    feed.ws = ws;
    ws.onopen = () => {
      feed.retryMs = 1000;
      setPill("feed-status", "events: live", true);
    };
    ws.onmessage = (msg) => {
      // Each text message holds one event or an array of them, oldest first.
      let data;
      try {
        data = JSON.parse(msg.data);
      } catch {
        return;
      }
      for (const ev of Array.isArray(data) ? data : [data]) {
        if (!ev || typeof ev !== "object") continue;
        if (typeof ev.event_id === "string") feed.lastEventId = ev.event_id;
        onEvent(ev);
      }
    };
    ws.onclose = (close) => {
      if (feed.ws !== ws) return; // replaced on purpose (filter changed)
      feed.ws = null;
      let why = close.reason ? ` (${close.code} ${close.reason})` : "";
      if (close.code === CLOSE_TOO_SLOW) {
        // Replaying what this page could not keep up with would only lose again: skip
        // ahead to live events (the counters and the chart are unaffected).
        feed.lastEventId = null;
        why = " (too slow for the event rate: skipping ahead)";
      }
      reconnectFeed(why);
    };
  }

  function reconnectFeed(why) {
    const wait = feed.retryMs;
    feed.retryMs = Math.min(feed.retryMs * 2, RECONNECT_MAX_MS);
    setPill("feed-status", `events: disconnected${why}, retrying in ${Math.round(wait / 1000)} s`, false);
    setTimeout(connectFeed, wait);
  }

  function restartFeed() {
    const old = feed.ws;
    feed.ws = null;
    feed.lastEventId = null;
    if (old) old.close(1000, "filter changed");
    clearFeed();
    connectFeed();
  }

  function clearFeed() {
    feed.pending = [];
    $("feed").tBodies[0].replaceChildren();
  }

  function onEvent(ev) {
    feed.received += 1;
    feed.pending.push(ev);
    if (feed.pending.length > FEED_MAX_ROWS) feed.pending.splice(0, feed.pending.length - FEED_MAX_ROWS);
    if (ev.id && ev.id === current.id) addTimelineEvent(ev, true);
    if (!feed.flushTimer) feed.flushTimer = setTimeout(flushFeed, 100);
  }

  function flushFeed() {
    feed.flushTimer = null;
    if ($("feed-pause").checked) return;
    const body = $("feed").tBodies[0];
    const rows = document.createDocumentFragment();
    for (let i = feed.pending.length - 1; i >= 0; i--) rows.append(feedRow(feed.pending[i]));
    feed.pending = [];
    body.prepend(rows);
    while (body.rows.length > FEED_MAX_ROWS) body.lastElementChild.remove();
  }

  function feedRow(ev) {
    const detail = [];
    if (ev.error) detail.push(String(ev.error));
    if (Array.isArray(ev.tags) && ev.tags.length) detail.push(`tags: ${ev.tags.join(", ")}`);
    if (Array.isArray(ev.recipients) && ev.recipients.length) {
      // A suppressed event's dropped recipients; a provider's event's recipient.
      const label = ev.type === "suppressed" ? "suppressed" : "recipient";
      detail.push(`${label}: ${ev.recipients.join(", ")}`);
    }
    return el(
      "tr",
      { dataset: { id: String(ev.id || ""), type: String(ev.type || "") } },
      el("td", { className: "time" }, fmtTime(ev.at)),
      el("td", {}, badge(ev.type)),
      el("td", {}, idButton(ev.id)),
      el("td", { className: "num" }, ev.attempt ?? ""),
      el("td", {}, ev.tenant ?? "default"),
      el("td", { className: "detail", title: detail.join(" · ") }, detail.join(" · ")),
    );
  }

  function showFeedRate() {
    const now = performance.now();
    const perS = (feed.received * 1000) / Math.max(1, now - feed.receivedAt);
    feed.received = 0;
    feed.receivedAt = now;
    $("feed-rate").textContent = feed.ws ? `${fmtRate(perS)} events/s` : "";
  }

  // ---- message lookup ---------------------------------------------------------------

  const current = { id: null, seen: new Set(), timeline: null, state: null };

  async function lookup(rawId) {
    const id = String(rawId).trim().toLowerCase();
    $("lookup-id").value = id;
    const out = $("lookup-result");
    current.id = id;
    current.seen = new Set();
    current.timeline = null;
    current.state = null;
    if (!ID_RE.test(id)) {
      out.replaceChildren(el("p", { className: "problem" }, "A message id is 32 hex digits."));
      return;
    }
    out.replaceChildren(el("p", { className: "muted" }, "loading…"));
    const path = `/v1/messages/${encodeURIComponent(id)}`;
    const [msg, hist] = await Promise.allSettled([
      api("GET", `${path}?include=attachments`), api("GET", `${path}/events`),
    ]);
    if (current.id !== id) return; // another lookup started meanwhile
    out.replaceChildren();
    if (msg.status === "rejected") {
      out.append(el("p", { className: "problem" }, describe(msg.reason)));
    } else {
      out.append(messageCard(msg.value));
    }
    out.append(el("h3", {}, "Timeline"));
    current.timeline = el("ol", { className: "timeline" });
    if (hist.status === "rejected") {
      out.append(el("p", { className: "problem" }, `history unavailable: ${describe(hist.reason)}`));
    } else {
      const events = Array.isArray(hist.value) ? hist.value : hist.value?.items || hist.value?.events || [];
      for (const ev of events) addTimelineEvent(ev, false);
      if (!events.length) current.timeline.append(el("li", { className: "muted" }, "no events kept"));
    }
    out.append(current.timeline);
  }

  function describe(err) {
    return err instanceof ApiError ? err.describe() : String(err);
  }

  function messageCard(m) {
    current.state = el("span", {}, badge(m.state));
    const rows = [
      ["state", current.state],
      ["attempts", m.attempts],
      ["priority", m.priority],
      ["tenant", m.tenant],
      ["created", fmtDateTime(m.created_at)],
      ["updated", fmtDateTime(m.updated_at)],
    ];
    if (m.next_attempt_at) rows.push(["next try", fmtDateTime(m.next_attempt_at)]);
    const dl = el("dl", { className: "facts", dataset: { id: m.id } });
    for (const [k, v] of rows) dl.append(el("dt", {}, k), el("dd", {}, v ?? ""));
    if (m.last_error) {
      dl.append(el("dt", {}, "last error"), el("dd", { className: "error wide" }, m.last_error));
    }
    if (Array.isArray(m.attachments) && m.attachments.length) {
      dl.append(el("dt", {}, "attached"),
        el("dd", { className: "wide" }, attachmentList(m.attachments)));
    }
    const actions = el("div", { className: "actions" });
    if (m.state === "failed") {
      actions.append(el("button", { type: "button", onclick: () => retryDead(m.id) }, "Retry"));
    }
    if (["queued", "scheduled", "retrying"].includes(m.state)) {
      actions.append(el("button", { type: "button", onclick: () => cancelMessage(m.id) }, "Cancel"));
    }
    if (m.state === "sent" && (m.last_error || "").startsWith("sandbox:")) {
      actions.append(el("button", { type: "button", className: "preview",
        onclick: () => showPreview(`/v1/messages/${encodeURIComponent(m.id)}/preview`,
          `sandboxed ${m.id}`) }, "Preview"));
    }
    return el("div", { className: "card" }, dl, actions);
  }

  /** A message's files (GET /v1/messages/{id}: names, types and sizes, not bytes). */
  function attachmentList(files) {
    return el("ul", { className: "attachments" }, ...files.map((a) => {
      const about = [a.content_type, fmtBytes(a.size)];
      if (a.inline) about.push("inline");
      if (a.content_id) about.push(`cid:${a.content_id}`);
      return el("li", { dataset: { filename: String(a.filename) } },
        el("span", { className: "filename" }, a.filename || "(no name)"), " ",
        el("span", { className: "muted" }, `(${about.join(", ")})`));
    }));
  }

  function addTimelineEvent(ev, live) {
    if (!current.timeline) return;
    const key = ev.event_id || `${ev.type}@${ev.at}`;
    if (current.seen.has(key)) return;
    current.seen.add(key);
    const empty = current.timeline.querySelector("li.muted");
    if (empty) empty.remove();
    const parts = [el("span", { className: "time" }, fmtDateTime(ev.at)), " ", badge(ev.type)];
    if (ev.attempt) parts.push(el("span", { className: "muted" }, ` try ${ev.attempt}`));
    if (ev.error) parts.push(" ", el("span", { className: "error" }, String(ev.error)));
    current.timeline.append(el("li", { dataset: { type: String(ev.type || "") } }, ...parts));
    if (live && current.state && ev.state) current.state.replaceChildren(badge(ev.state));
  }

  async function cancelMessage(id) {
    try {
      await api("DELETE", `/v1/messages/${encodeURIComponent(id)}`);
      notice(`cancelled ${id}`);
      clearProblem("cancel");
    } catch (err) {
      showProblem("cancel", err);
    }
    lookup(id);
  }

  // ---- dead-letter queue ------------------------------------------------------------

  let deadSignature = "";

  async function pollDead() {
    try {
      const page = await api("GET", "/v1/dead?limit=50");
      clearProblem("dead letters");
      renderDead(page);
    } catch (err) {
      showProblem("dead letters", err);
    }
  }

  function renderDead(page) {
    const signature = JSON.stringify(page);
    if (signature === deadSignature) return;
    deadSignature = signature;
    const shown = page.items.length;
    $("dead-total").textContent =
      page.total > shown ? `${fmt(page.total)} (oldest ${shown} shown)` : fmt(page.total);
    $("retry-all").disabled = page.total === 0;
    const body = $("dead").tBodies[0];
    if (!shown) {
      body.replaceChildren(el("tr", {}, el("td", { colSpan: 5, className: "muted" }, "empty")));
      return;
    }
    body.replaceChildren(...page.items.map((m) => el(
      "tr",
      { dataset: { id: m.id } },
      el("td", {}, idButton(m.id)),
      el("td", { className: "num" }, m.attempts),
      el("td", { className: "time" }, fmtDateTime(m.updated_at)),
      el("td", { className: "detail error", title: m.last_error || "" },
        m.bounce ? el("span", { className: "badge bounce" }, m.bounce) : null, m.last_error || ""),
      el("td", { className: "actions" },
        el("button", { type: "button", className: "retry", onclick: () => retryDead(m.id) }, "Retry"),
        el("button", { type: "button", className: "delete danger", onclick: () => deleteDead(m.id) }, "Delete")),
    )));
  }

  // ---- webhooks -------------------------------------------------------------------

  const WEBHOOKS_EVERY_MS = 5000;
  let hooksSignature = "";

  async function pollWebhooks() {
    try {
      const list = await api("GET", "/v1/webhooks");
      clearProblem("webhooks");
      renderWebhooks(list.items);
    } catch (err) {
      if (err instanceof ApiError && (err.status === 403 || err.status === 404)) {
        $("webhooks-note").textContent = err.status === 403
          ? "this key lacks the webhooks scope" : "webhooks are off on this engine";
        $("webhooks-note").hidden = false;
        return "stop";
      }
      showProblem("webhooks", err);
    }
    return null;
  }

  function renderWebhooks(items) {
    const signature = JSON.stringify(items);
    if (signature === hooksSignature) return;
    hooksSignature = signature;
    $("webhooks-total").textContent = fmt(items.length);
    const body = $("webhooks").tBodies[0];
    if (!items.length) {
      body.replaceChildren(el("tr", {}, el("td", { colSpan: 5, className: "muted" }, "none")));
      return;
    }
    body.replaceChildren(...items.map((h) => {
      const last = h.last_attempt;
      const health = !h.enabled ? "disabled" : !last ? "no attempts yet" : last.outcome;
      return el(
        "tr",
        { dataset: { id: h.id } },
        el("td", { className: "detail", title: h.id }, h.url),
        el("td", {}, h.events.length ? h.events.join(", ") : "all"),
        el("td", { className: `health ${h.enabled ? last?.outcome || "" : "disabled"}`,
                   title: h.disabled_reason || "" }, health),
        el("td", { className: "num" }, last ? `${last.status || "—"} · ${last.ms} ms` : "—"),
        el("td", { className: "time" }, last ? fmtDateTime(last.at) : "—"),
      );
    }));
  }

  // ---- history (PostgreSQL; only on an engine with history.dsn) ------------------------
  // Every value is set through textContent (el()), never parsed as HTML.

  let historyCursor = null;

  function historyQuery(cursor) {
    const q = new URLSearchParams();
    for (const name of ["to", "from", "tag", "state"]) {
      const value = $(`history-${name}`).value.trim();
      if (value) q.set(name, value);
    }
    const since = $("history-since").value; // YYYY-MM-DD, a UTC day
    if (since) q.set("since", `${since}T00:00:00Z`);
    if (cursor) q.set("cursor", cursor);
    return q;
  }

  async function searchHistory(more) {
    const q = historyQuery(more ? historyCursor : null);
    const csv = historyQuery(null);
    csv.set("format", "csv");
    $("history-csv").href = `/v1/history?${csv}`;
    const body = $("history").tBodies[0];
    try {
      const page = await api("GET", `/v1/history?${q}`);
      clearProblem("history");
      const rows = page.items.map((m) => el(
        "tr",
        { dataset: { id: m.id } },
        el("td", { className: "time" }, fmtDateTime(m.created_at)),
        el("td", {}, idButton(m.id)),
        el("td", {}, badge(m.state), m.provider_state ? " " : null,
           m.provider_state ? badge(m.provider_state) : null),
        el("td", { className: "detail", title: (m.recipients || []).join(", ") },
           (m.recipients || []).join(", ") || "—"),
        el("td", { className: "detail" }, m.subject === null ? "—" : m.subject),
        el("td", {}, m.tenant),
      ));
      if (more) body.append(...rows);
      else if (rows.length) body.replaceChildren(...rows);
      else body.replaceChildren(el("tr", {}, el("td", { colSpan: 6, className: "muted" },
        "no message matches")));
      historyCursor = page.next_cursor;
      $("history-more").hidden = !historyCursor;
    } catch (err) {
      if (err instanceof ApiError && (err.status === 403 || err.status === 404)) {
        $("history-note").textContent = err.status === 403
          ? "this key lacks the read scope"
          : "no history on this engine (history.dsn is not set: messages are kept in Redis only)";
        $("history-note").hidden = false;
        $("history-form").hidden = true;
        return "stop";
      }
      showProblem("history", err);
    }
    return null;
  }

  async function pollHistoryLag() {
    try {
      const res = await fetch("/readyz", { headers: { Accept: "application/json" } });
      const ready = await res.json();
      const h = ready && ready.history;
      if (!h) { $("history-lag").textContent = ""; return; }
      const lag = `writer lag ${fmt(h.lag_entries)} entries · ${h.lag_s.toFixed(1)} s`;
      $("history-lag").textContent = h.up ? lag : `PostgreSQL down · ${lag}`;
      $("history-lag").className = h.up && !h.refusing ? "muted" : "problem";
    } catch (err) {
      $("history-lag").textContent = "";
    }
  }

  // ---- DKIM domains (admin keys only) --------------------------------------------------

  let domainsSignature = "";

  async function pollDomains() {
    try {
      const list = await api("GET", "/v1/domains");
      clearProblem("domains");
      renderDomains(list.items);
    } catch (err) {
      if (err instanceof ApiError && (err.status === 403 || err.status === 404)) {
        $("domains-note").textContent = err.status === 403
          ? "this key lacks the admin scope" : "no DKIM routes on this engine";
        $("domains-note").hidden = false;
        return "stop";
      }
      showProblem("domains", err);
    }
    return null;
  }

  function renderDomains(items) {
    const signature = JSON.stringify(items);
    if (signature === domainsSignature) return;
    domainsSignature = signature;
    $("domains-total").textContent = fmt(items.length);
    const body = $("domains").tBodies[0];
    if (!items.length) {
      body.replaceChildren(el("tr", {}, el("td", { colSpan: 3, className: "muted" },
        "none: mail goes out unsigned (POST /v1/domains or [[dkim.keys]])")));
      return;
    }
    body.replaceChildren(...items.map((d) => el(
      "tr",
      { dataset: { domain: d.domain } },
      el("td", { title: `from ${d.source}` }, d.domain),
      el("td", {}, `${d.algorithm} · ${d.selector}`),
      el("td", { className: "detail" }, el("code", {}, d.dns.name), " ",
         el("code", { className: "dns-value", title: d.dns.value }, d.dns.value)),
    )));
  }

  // ---- suppression list --------------------------------------------------------------

  let suppressedSignature = "";

  async function pollSuppressed() {
    try {
      const page = await api("GET", "/v1/suppressions?limit=50");
      clearProblem("suppressions");
      const signature = JSON.stringify(page);
      if (signature === suppressedSignature) return null;
      suppressedSignature = signature;
      $("suppressed-total").textContent = `${fmt(page.total)} · tenant ${page.tenant}`;
      const body = $("suppressed").tBodies[0];
      if (!page.items.length) {
        body.replaceChildren(el("tr", {}, el("td", { colSpan: 4, className: "muted" }, "none")));
        return null;
      }
      body.replaceChildren(...page.items.map((s) => el(
        "tr",
        { dataset: { address: s.address } },
        el("td", { className: "detail" }, s.address),
        el("td", {}, s.bounce ? el("span", { className: "badge bounce" }, s.bounce) : "—"),
        el("td", { className: "detail", title: s.reason }, s.reason),
        el("td", { className: "time" }, fmtDateTime(s.added_at)),
      )));
    } catch (err) {
      if (err instanceof ApiError && (err.status === 403 || err.status === 404)) {
        $("suppressed-note").textContent = "this key lacks the suppressions scope";
        $("suppressed-note").hidden = false;
        return "stop";
      }
      showProblem("suppressions", err);
    }
    return null;
  }

  async function deadAction(source, fn, done) {
    try {
      const out = await fn();
      clearProblem(source);
      notice(done(out));
    } catch (err) {
      showProblem(source, err);
    }
    deadSignature = "";
    await Promise.all([pollDead(), pollStats()]);
  }

  function retryDead(id) {
    return deadAction("retry", () => api("POST", `/v1/dead/${encodeURIComponent(id)}/retry`),
      (out) => (out && out.state === "suppressed"
        ? `not re-queued: every recipient of ${id} is suppressed now`
        : `re-queued ${id}`)).then(() => { if (current.id === id) lookup(id); });
  }

  function deleteDead(id) {
    if (!window.confirm(`Delete dead-lettered message ${id} for good?`)) return Promise.resolve();
    return deadAction("delete", () => api("DELETE", `/v1/dead/${encodeURIComponent(id)}`),
      () => `deleted ${id}`);
  }

  function retryAllDead() {
    if (!window.confirm("Re-queue every dead-lettered message?")) return Promise.resolve();
    return deadAction("retry all", () => api("POST", "/v1/dead/retry"),
      (out) => `re-queued ${fmt(out.retried)} messages` +
        ((out.suppressed || []).length
          ? `; ${fmt(out.suppressed.length)} not: every recipient suppressed now` : ""));
  }

  // ---- captured mail (embedded sink) ------------------------------------------------

  let mailSignature = "";

  async function pollMail() {
    try {
      const page = await api("GET", "/v1/sink/messages?limit=50");
      clearProblem("captured mail");
      renderMail(page);
    } catch (err) {
      if (err instanceof ApiError && err.status === 404 && /no-sink$/.test(err.problem.type || "")) {
        const note = $("mail-note");
        note.textContent = err.problem.detail || err.message;
        note.hidden = false;
        $("mail").hidden = true;
        return "stop"; // this engine has no embedded sink; that will not change
      }
      showProblem("captured mail", err);
    }
    return "go on";
  }

  function renderMail(page) {
    const signature = JSON.stringify(page);
    if (signature === mailSignature) return;
    mailSignature = signature;
    $("mail-total").textContent = `${fmt(page.total)} in ${page.maildir}`;
    const body = $("mail").tBodies[0];
    if (!page.items.length) {
      body.replaceChildren(el("tr", {}, el("td", { colSpan: 7, className: "muted" }, "none yet")));
      return;
    }
    body.replaceChildren(...page.items.map((m) => el(
      "tr",
      { dataset: { key: m.key, id: m.job_id || "" } },
      el("td", { className: "time", title: m.date || "" }, fmtDateTime(m.received_at)),
      el("td", { className: "detail", title: m.from || "" }, m.from || ""),
      el("td", { className: "detail", title: m.to || "" }, m.to || ""),
      el("td", { className: "detail subject", title: m.subject || "" }, m.subject || ""),
      el("td", { className: "num" }, fmtBytes(m.size)),
      el("td", { title: m.message_id || "" }, idButton(m.job_id)),
      el("td", {}, el("button", { type: "button", className: "preview",
        onclick: () => showPreview(`/v1/sink/messages/${encodeURIComponent(m.key)}/preview`,
          `captured ${m.key}`) }, "Preview")),
    )));
  }

  // ---- templates: the tenant's, read and rendered (a preview: nothing is sent) --------

  const TEMPLATES_EVERY_MS = 5000;
  let templatesSignature = "";
  // The template on show; answers for an earlier choice are dropped when they come late.
  const chosen = { name: null, version: null, seq: 0 };

  const templatePath = (name) => `/v1/templates/${encodeURIComponent(name)}`;

  async function pollTemplates() {
    try {
      const list = await api("GET", "/v1/templates");
      clearProblem("templates");
      renderTemplates(list.items);
    } catch (err) {
      if (err instanceof ApiError && (err.status === 403 || err.status === 404)) {
        $("templates-note").textContent = err.status === 403
          ? "this key lacks the templates scope" : "no template routes on this engine";
        $("templates-note").hidden = false;
        return "stop";
      }
      showProblem("templates", err);
    }
    return null;
  }

  function renderTemplates(items) {
    const signature = JSON.stringify(items);
    if (signature === templatesSignature) return;
    templatesSignature = signature;
    $("templates-total").textContent =
      items.length ? `${fmt(items.length)} · tenant ${items[0].tenant}` : "";
    const body = $("templates").tBodies[0];
    if (!items.length) {
      body.replaceChildren(el("tr", {}, el("td", { colSpan: 4, className: "muted" },
        "none (POST /v1/templates)")));
      return;
    }
    body.replaceChildren(...items.map((t) => el(
      "tr",
      { dataset: { name: t.name }, className: t.name === chosen.name ? "chosen" : "" },
      el("td", { className: "detail", title: t.description || "" },
        el("button", { type: "button", className: "id template",
          onclick: () => showTemplate(t.name, null) }, t.name)),
      el("td", { className: "num" }, `v${t.version}`),
      el("td", { className: "detail", title: t.variables.join(", ") }, t.variables.join(", ") || "—"),
      el("td", { className: "time" }, fmtDateTime(t.updated_at)),
    )));
  }

  /** A template at one version (null: its current one), its parts shown as source text. */
  async function showTemplate(name, version) {
    const seq = ++chosen.seq;
    const other = name !== chosen.name;
    try {
      const q = version === null ? "" : `?version=${encodeURIComponent(version)}`;
      const t = await api("GET", templatePath(name) + q);
      if (seq !== chosen.seq) return;
      clearProblem("template");
      chosen.name = t.name;
      chosen.version = t.version;
      for (const row of $("templates").tBodies[0].rows) {
        row.classList.toggle("chosen", row.dataset.name === t.name);
      }
      $("template-name").textContent = t.name;
      const select = $("template-version");
      const latest = t.versions.at(-1);
      select.replaceChildren(...t.versions.slice().reverse().map((v) => el(
        "option", { value: String(v), selected: v === t.version },
        v === latest ? `v${v} (current)` : `v${v}`)));
      $("template-about").textContent =
        `${t.description ? `${t.description} · ` : ""}made ${fmtDateTime(t.created_at)}`;
      showSource($("template-subject"), t.subject);
      showSource($("template-text"), t.text);
      showSource($("template-html"), t.html);
      if (other) {
        // A variables object to fill in: every variable the template uses.
        const blank = Object.fromEntries(t.variables.map((v) => [v, ""]));
        $("render-variables").value = JSON.stringify(blank, null, 2);
        $("render-result").hidden = true;
        $("render-error").hidden = true;
      }
      $("template-view").hidden = false;
    } catch (err) {
      if (seq === chosen.seq) showProblem("template", err);
    }
  }

  /** Template source or rendered output, as text (a missing part says so, greyed). */
  function showSource(node, value) {
    const missing = value === null || value === undefined;
    node.classList.toggle("muted", missing);
    node.textContent = missing ? "(no such part)" : value;
  }

  async function renderTemplate() {
    const name = chosen.name;
    const version = chosen.version;
    if (!name) return;
    const error = $("render-error");
    const result = $("render-result");
    let variables = null;
    let why = "";
    try {
      variables = JSON.parse($("render-variables").value.trim() || "{}");
    } catch (err) {
      why = `: ${err.message}`;
    }
    if (variables === null || typeof variables !== "object" || Array.isArray(variables)) {
      error.textContent = `Not rendered: the variables must be a JSON object${why}`;
      error.hidden = false;
      result.hidden = true;
      return;
    }
    const seq = chosen.seq;
    try {
      const out = await api("POST", `${templatePath(name)}/render`, { variables, version });
      if (seq !== chosen.seq) return;
      error.hidden = true;
      $("rendered-version").textContent = `v${out.version}`;
      showSource($("rendered-subject"), out.subject);
      showSource($("rendered-text"), out.text);
      showSource($("rendered-html"), out.html);
      result.hidden = false;
    } catch (err) {
      if (seq !== chosen.seq) return;
      // A 422 names what failed: variables.<name> (missing) or template.<part>.
      error.textContent = `Not rendered: ${describe(err)}`;
      error.hidden = false;
      result.hidden = true;
    }
  }

  // ---- preview: a captured or sandboxed message, read back by the API ----------------

  async function showPreview(path, what) {
    try {
      const p = await api("GET", path);
      clearProblem("preview");
      $("preview-what").textContent = what + (p.truncated ? " (cut at 512 KiB a part)" : "");
      const head = $("preview-head");
      head.replaceChildren();
      for (const [k, v] of [["from", p.from], ["to", p.to], ["cc", p.cc], ["subject", p.subject],
                            ["date", p.date]]) {
        if (v) head.append(el("dt", {}, k), el("dd", {}, v));
      }
      if (p.attachments.length) {
        head.append(el("dt", {}, "attached"), el("dd", {}, p.attachments.map(
          (a) => `${a.filename || "(no name)"} (${a.content_type}, ${fmtBytes(a.size)})`).join(", ")));
      }
      const frame = $("preview-html");
      const text = $("preview-text");
      frame.hidden = p.html === null;
      // The html comes from the API with its own CSP (nothing loads, nothing runs),
      // into a frame with no allow-* token.
      frame.src = p.html === null ? "about:blank" : path.replace(/\/preview$/, "/html");
      text.hidden = p.html !== null || p.text === null;
      text.textContent = p.text || "";
      $("preview").hidden = false;
    } catch (err) {
      showProblem("preview", err);
    }
  }

  // ---- start ------------------------------------------------------------------------

  // ---- login ------------------------------------------------------------------------

  /** The session's principal, or null when the page must ask for a key first. */
  async function whoami() {
    try {
      return await api("GET", "/v1/session");
    } catch (err) {
      if (err instanceof ApiError && (err.status === 401 || err.status === 403)) return null;
      // No session route: this engine runs with auth.enabled = false.
      if (err instanceof ApiError && err.status === 404) return { name: "auth off", tenant: "all" };
      throw err;
    }
  }

  function askForKey() {
    $("login").hidden = false;
    $("api-status").textContent = "API: log in";
    $("login-form").addEventListener("submit", async (e) => {
      e.preventDefault();
      const key = $("login-key").value.trim();
      try {
        await api("POST", "/v1/session", { key });
        location.reload();
      } catch (err) {
        $("login-error").textContent = err instanceof ApiError ? err.describe() : String(err);
        $("login-error").hidden = false;
      }
    });
    $("login-key").focus();
  }

  async function boot() {
    let who;
    try {
      who = await whoami();
    } catch (err) {
      setPill("api-status", "API: unreachable", false);
      showProblem("stats", err);
      setTimeout(boot, 2000);
      return;
    }
    if (who === null) {
      askForKey();
      return;
    }
    $("who").textContent = `${who.name || who.kid} · ${who.tenant}`;
    $("who").hidden = false;
    $("logout").hidden = false;
    $("logout").addEventListener("click", async () => {
      await api("DELETE", "/v1/session").catch(() => null);
      location.reload();
    });
    document.querySelector("main").hidden = false;
    start();
  }

  function start() {
    makeChart();
    $("lookup-form").addEventListener("submit", (e) => {
      e.preventDefault();
      lookup($("lookup-id").value);
    });
    $("retry-all").addEventListener("click", retryAllDead);
    $("template-version").addEventListener("change", () => {
      if (chosen.name) showTemplate(chosen.name, Number($("template-version").value));
    });
    $("render-form").addEventListener("submit", (e) => {
      e.preventDefault();
      renderTemplate();
    });
    $("preview-close").addEventListener("click", () => { $("preview").hidden = true; });
    $("feed-type").addEventListener("change", restartFeed);
    $("feed-clear").addEventListener("click", clearFeed);
    $("feed-pause").addEventListener("change", () => {
      if (!$("feed-pause").checked) flushFeed();
    });
    $("history-form").addEventListener("submit", (e) => {
      e.preventDefault();
      searchHistory(false);
    });
    $("history-more").addEventListener("click", () => searchHistory(true));
    searchHistory(false).then((stop) => {
      if (stop !== "stop") every(STATS_EVERY_MS, pollHistoryLag);
    });
    every(STATS_EVERY_MS, pollStats);
    every(DEAD_EVERY_MS, pollDead);
    const stopSuppressed = every(WEBHOOKS_EVERY_MS, async () => {
      if ((await pollSuppressed()) === "stop") stopSuppressed();
    });
    const stopHooks = every(WEBHOOKS_EVERY_MS, async () => {
      if ((await pollWebhooks()) === "stop") stopHooks();
    });
    const stopDomains = every(WEBHOOKS_EVERY_MS, async () => {
      if ((await pollDomains()) === "stop") stopDomains();
    });
    const stopTemplates = every(TEMPLATES_EVERY_MS, async () => {
      if ((await pollTemplates()) === "stop") stopTemplates();
    });
    const stopMail = every(MAIL_EVERY_MS, async () => {
      if ((await pollMail()) === "stop") stopMail();
    });
    setInterval(showFeedRate, 2000);
    connectFeed();
    const fromHash = new URLSearchParams(location.hash.slice(1)).get("id");
    if (fromHash) lookup(fromHash);
  }

  boot();
})();
