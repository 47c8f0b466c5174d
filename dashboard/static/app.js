// The jobgate dashboard: a single page over the gateway's dashboard API (/api/...), which answers
// with the gRPC API's messages in their proto3 JSON form. Live updates come as server-sent events
// (/api/events), read with fetch so that they carry the token. Untrusted text is only ever set
// with textContent.

const STATES = ["QUEUED", "SCHEDULED", "BLOCKED", "DISPATCHED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"];
const TERMINAL = new Set(["SUCCEEDED", "FAILED", "CANCELLED"]);
const TABS = [
  ["all", "All", []],
  ["waiting", "Waiting", ["QUEUED"]],
  ["scheduled", "Scheduled", ["SCHEDULED"]],
  ["blocked", "Blocked", ["BLOCKED"]],
  ["running", "Running", ["DISPATCHED", "RUNNING"]],
  ["succeeded", "Succeeded", ["SUCCEEDED"]],
  ["failed", "Failed", ["FAILED"]],
  ["cancelled", "Cancelled", ["CANCELLED"]],
];
const HISTORY = 150; // live samples kept per queue (5 minutes at one per 2 s)
const FEED = 15; // completions kept in the live feed

const app = {
  token: sessionStorage.getItem("jobgate-token") || "",
  info: { auth: false, readOnly: false },
  overview: null,
  history: new Map(), // queue -> [{t, waiting, running, ended}]
  feed: [],
  events: null, // the AbortController of the live stream
  detail: null, // {id, controller} of the job page's own stream
  view: "",
};

// --- small helpers -----------------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// Replaces a node's children with these (arrays flattened; null, undefined and false left out).
function fill(node, ...children) {
  node.replaceChildren(...children.flat(Infinity).filter((c) => c !== undefined && c !== null && c !== false));
}

const num = (v) => Number(v || 0);
const plural = (n, word) => `${n || 0} ${word}${n === 1 ? "" : "s"}`;
const state = (s) => (s || "").replace("JOB_STATE_", "");
const queueOf = (job) => (job.spec && job.spec.queue) || "default";
const seconds = (d) => (d ? parseFloat(d) : 0);

function ago(iso) {
  if (!iso) return "";
  const s = Math.round((Date.now() - Date.parse(iso)) / 1000);
  if (s < -1) return `in ${duration(-s)}`;
  return s < 1 ? "now" : `${duration(s)} ago`;
}

function duration(s) {
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.round((s % 86400) / 3600)} h`;
}

function when(iso) {
  return iso ? el("time", { datetime: iso, title: new Date(iso).toLocaleString(), text: ago(iso) }) : "";
}

function badge(s) {
  return el("span", { class: `badge state-${s.toLowerCase()}`, text: s });
}

function toast(text, bad = false) {
  const node = document.getElementById("toast");
  node.textContent = text;
  node.className = bad ? "bad" : "";
  node.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (node.hidden = true), 4000);
}

function params() {
  const [path, query] = location.hash.slice(1).split("?");
  return { path: path || "/", query: new URLSearchParams(query || "") };
}

function go(path, query) {
  const q = query ? new URLSearchParams(Object.entries(query).filter(([, v]) => v)).toString() : "";
  location.hash = `#${path}${q ? "?" + q : ""}`;
}

// --- the API ---------------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, body) {
    super(body.error || `HTTP ${status}`);
    this.status = status;
    this.code = body.code || "";
  }
}

function headers(extra = {}) {
  return app.token ? { ...extra, Authorization: `Bearer ${app.token}` } : extra;
}

async function api(path, { method = "GET", body } = {}) {
  const token = app.token; // the token this request carries
  const init = { method, headers: headers(method === "POST" ? { "Content-Type": "application/json" } : {}) };
  if (method === "POST") init.body = JSON.stringify(body || {});
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({}));
  if (response.status === 401) {
    // a refusal of a token since replaced (signed in again meanwhile) signs nobody out
    if (token === app.token) signIn(data.error || "This gateway needs a token.");
    throw new ApiError(401, data);
  }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

async function act(path, done, body) {
  try {
    const reply = await api(path, { method: "POST", body });
    done(reply);
  } catch (err) {
    if (err.status !== 401) toast(`${err.code ? err.code + ": " : ""}${err.message}`, true);
  }
}

// --- live updates ------------------------------------------------------------------------------
// Reads a text/event-stream body: calls onEvent(name, data) per event; resolves when it ends.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data.push(line.slice(6));
      }
      if (data.length) onEvent(name, JSON.parse(data.join("\n")));
    }
  }
}

function setLive(on) {
  const node = document.getElementById("live");
  node.className = on ? "live on" : "live off";
  node.title = on ? "Live updates: on" : "Live updates: reconnecting";
}

async function follow() {
  if (app.events) app.events.abort();
  const controller = new AbortController();
  app.events = controller;
  let wait = 1000;
  while (!controller.signal.aborted) {
    try {
      const response = await fetch("/api/events", { headers: headers(), signal: controller.signal });
      if (response.status === 401) {
        signIn("This gateway needs a token.");
        return;
      }
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      setLive(true);
      wait = 1000;
      await readEvents(response, (name, data) => {
        if (name === "overview") onOverview(data);
        else if (name === "job") onJob(data);
      });
    } catch (err) {
      if (controller.signal.aborted) return;
    }
    setLive(false);
    await new Promise((resolve) => setTimeout(resolve, wait));
    wait = Math.min(wait * 2, 10000);
  }
}

function onOverview(data) {
  app.overview = data;
  const t = Date.parse(data.time);
  for (const q of data.queues) {
    const points = app.history.get(q.queue) || [];
    const ended = num(q.succeeded) + num(q.failed) + num(q.cancelled);
    const last = points[points.length - 1];
    const rate = last && t > last.t ? Math.max(0, ((ended - last.ended) * 60000) / (t - last.t)) : 0;
    points.push({ t, waiting: num(q.waiting), running: num(q.running), ended, rate });
    if (points.length > HISTORY) points.shift();
    app.history.set(q.queue, points);
  }
  if (app.view === "queues") renderQueues();
  else if (app.view === "workers") renderWorkers();
}

function onJob(event) {
  app.feed.unshift(event);
  app.feed.length = Math.min(app.feed.length, FEED);
  if (app.view === "queues") renderFeed();
  const row = document.querySelector(`tr[data-job="${CSS.escape(event.jobId)}"] .state`);
  if (row) row.replaceChildren(badge(state(event.state)));
}

// --- sign in -------------------------------------------------------------------------------------
function signIn(message) {
  if (app.events) app.events.abort();
  app.view = "signin";
  const input = el("input", { type: "password", id: "token", name: "token", autocomplete: "current-password", required: true });
  const form = el(
    "form",
    {
      class: "card signin",
      onsubmit: (e) => {
        e.preventDefault();
        app.token = input.value.trim();
        sessionStorage.setItem("jobgate-token", app.token);
        start();
      },
    },
    el("h1", { text: "Sign in" }),
    el("p", { class: "muted", text: message }),
    el("label", { for: "token", text: "Token" }),
    input,
    el("button", { type: "submit", text: "Sign in" }),
  );
  fill(document.getElementById("main"), form);
  input.focus();
}

// --- queues --------------------------------------------------------------------------------------
function renderQueues() {
  const main = document.getElementById("main");
  if (!app.overview) {
    fill(main, el("p", { class: "muted", text: "Loading…" }));
    return;
  }
  const cards = app.overview.queues.map(queueCard);
  const feed = el("section", { id: "feed" });
  fill(main, 
    el("h1", { text: "Queues" }),
    cards.length ? el("div", { class: "queues" }, cards) : el("p", { class: "muted", text: "No queue has held a job yet." }),
    feed,
  );
  renderFeed();
}

function stat(q, label, value, tab) {
  const text = String(num(value));
  return el(
    "a",
    { class: `stat stat-${tab}`, href: `#/jobs?queue=${encodeURIComponent(q)}&tab=${tab}`, title: `${label} jobs` },
    el("span", { class: "value", text }),
    el("span", { class: "label", text: label }),
  );
}

function limitsText(l) {
  if (!l) return "";
  const parts = [];
  if (l.maxRunning) parts.push(`max ${l.maxRunning} running`);
  if (l.rate) parts.push(`${l.rate.count} per ${seconds(l.rate.period)} s`);
  if (l.maxRunningPerKey) parts.push(`${l.maxRunningPerKey} per key`);
  if (l.ratePerKey) parts.push(`${l.ratePerKey.count} per ${seconds(l.ratePerKey.period)} s per key`);
  return parts.join(", ");
}

function queueCard(q) {
  const name = q.queue;
  const actions = app.info.readOnly
    ? []
    : [
        q.paused
          ? el("button", { class: "resume", onclick: () => act(`/api/queues/${encodeURIComponent(name)}/resume`, () => { toast(`Queue ${name} resumed`); refreshOverview(); }), text: "Resume" })
          : el("button", { class: "pause", onclick: () => act(`/api/queues/${encodeURIComponent(name)}/pause`, () => { toast(`Queue ${name} paused`); refreshOverview(); }), text: "Pause" }),
      ];
  const chart = el("canvas", { class: "chart", width: 560, height: 120, "aria-label": `Waiting, running and ended per minute of ${name} over the last minutes` });
  const bars = el("canvas", { class: "chart", width: 360, height: 120, "aria-label": `Jobs of ${name} ended per minute, last hour` });
  const card = el(
    "article",
    { class: "card queue", "data-queue": name },
    el(
      "div",
      { class: "card-head" },
      el("h2", {}, el("a", { href: `#/jobs?queue=${encodeURIComponent(name)}`, text: name })),
      q.paused ? el("span", { class: "badge paused", text: "paused" }) : null,
      el("span", { class: "spacer" }),
      actions,
    ),
    el(
      "div",
      { class: "stats" },
      stat(name, "waiting", q.waiting, "waiting"),
      stat(name, "scheduled", q.scheduled, "scheduled"),
      stat(name, "blocked", q.blocked, "blocked"),
      stat(name, "running", q.running, "running"),
      stat(name, "succeeded", q.succeeded, "succeeded"),
      stat(name, "failed", q.failed, "failed"),
      stat(name, "cancelled", q.cancelled, "cancelled"),
    ),
    el(
      "p",
      { class: "facts" },
      el("span", { text: `${(q.endedPerMinute1m || 0).toFixed(1)} ended/min (1 min), ${(q.endedPerMinute5m || 0).toFixed(1)} (5 min), ${(q.endedPerMinute15m || 0).toFixed(1)} (15 min)` }),
      el("span", { text: `oldest waiting: ${q.oldestWaitingAge ? duration(seconds(q.oldestWaitingAge)) : "none"}` }),
      el("span", { text: `${plural(q.workers, "worker")}, ${plural(q.slots, "slot")}` }),
      num(q.deadLetters) ? el("span", { text: plural(num(q.deadLetters), "dead letter") }) : null,
      limitsText(q.limits) ? el("span", { text: `limits: ${limitsText(q.limits)}` }) : null,
    ),
    el("div", { class: "charts" }, el("figure", {}, chart, el("figcaption", { text: "live, last 5 minutes: waiting (blue), running (green), ended per minute (purple)" })), el("figure", {}, bars, el("figcaption", { text: "ended per minute, last hour" }))),
  );
  requestAnimationFrame(() => {
    drawLines(chart, app.history.get(name) || []);
    drawBars(bars, (q.endedByMinute || []).map(num));
  });
  return card;
}

function colors() {
  const css = getComputedStyle(document.body);
  return { grid: css.getPropertyValue("--grid"), a: css.getPropertyValue("--blue"), b: css.getPropertyValue("--green"), c: css.getPropertyValue("--purple"), text: css.getPropertyValue("--muted") };
}

function drawLines(canvas, points) {
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  const c = colors();
  ctx.clearRect(0, 0, width, height);
  // jobs (waiting, running) on the left scale, ended per minute on the right one
  const jobs = Math.max(1, ...points.map((p) => Math.max(p.waiting, p.running)));
  const rate = Math.max(1, ...points.map((p) => p.rate));
  ctx.strokeStyle = c.grid;
  ctx.beginPath();
  ctx.moveTo(0, height - 0.5);
  ctx.lineTo(width, height - 0.5);
  ctx.stroke();
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = c.text;
  ctx.fillText(`${jobs} jobs`, 4, 12);
  ctx.fillStyle = c.c;
  const label = `${Math.round(rate)}/min`;
  ctx.fillText(label, width - 4 - ctx.measureText(label).width, 12);
  // the x axis spans the samples kept (5 minutes once there are that many), at least one minute
  const end = points.length ? points[points.length - 1].t : 0;
  const span = Math.max(60000, end - (points.length ? points[0].t : 0));
  for (const [key, color, top] of [["waiting", c.a, jobs], ["running", c.b, jobs], ["rate", c.c, rate]]) {
    ctx.strokeStyle = color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    points.forEach((p, i) => {
      const x = width - 2 - ((width - 4) * (end - p.t)) / span;
      const y = height - 4 - ((height - 20) * p[key]) / top;
      if (i) ctx.lineTo(x, y);
      else ctx.moveTo(x, y);
    });
    ctx.stroke();
  }
}

function drawBars(canvas, values) {
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  const c = colors();
  ctx.clearRect(0, 0, width, height);
  const top = Math.max(1, ...values);
  const w = width / Math.max(values.length, 60);
  ctx.fillStyle = c.a;
  values.forEach((v, i) => {
    const h = ((height - 20) * v) / top;
    ctx.fillRect(i * w + 1, height - h, Math.max(1, w - 2), h);
  });
  ctx.fillStyle = c.text;
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillText(String(top), 4, 12);
}

function renderFeed() {
  const feed = document.getElementById("feed");
  if (!feed) return;
  const rows = app.feed.map((e) =>
    el(
      "tr",
      { "data-job": e.jobId },
      el("td", {}, when(e.time)),
      el("td", {}, el("a", { class: "mono", href: `#/job/${e.jobId}`, text: e.jobId })),
      el("td", { text: e.queue || "default" }),
      el("td", { text: e.kind }),
      el("td", { class: "state" }, badge(state(e.state))),
      el("td", { class: "why", text: e.error ? `${e.error.code}: ${e.error.message}` : e.workerId || "" }),
    ),
  );
  fill(feed, 
    el("h2", { text: "Latest outcomes" }),
    rows.length
      ? el("table", {}, el("thead", {}, el("tr", {}, ["when", "job", "queue", "kind", "state", "worker / error"].map((h) => el("th", { text: h })))), el("tbody", {}, rows))
      : el("p", { class: "muted", text: "Outcomes appear here as jobs end." }),
  );
}

async function refreshOverview() {
  try {
    onOverview(await api("/api/overview"));
  } catch (err) {
    if (err.status !== 401) toast(err.message, true);
  }
}

// --- workers -------------------------------------------------------------------------------------
function renderWorkers() {
  const main = document.getElementById("main");
  if (!app.overview) {
    fill(main, el("p", { class: "muted", text: "Loading…" }));
    return;
  }
  const workers = app.overview.workers;
  const rows = workers.map((w) =>
    el(
      "tr",
      { "data-worker": w.id },
      el("td", { class: "mono", text: w.id }),
      el("td", { text: `${w.host || ""}${w.pid ? ":" + w.pid : ""}` }),
      el("td", { text: (w.queues || []).join(", ") }),
      el("td", { class: "kinds", text: (w.kinds || []).join(", ") }),
      el("td", { text: Object.entries(w.labels || {}).map(([k, v]) => `${k}=${v}`).join(", ") }),
      el("td", {}, el("meter", { min: 0, max: w.slots || 1, value: w.busy || 0 }), ` ${w.busy || 0} / ${w.slots || 0}`),
      el("td", {}, when(w.lastSeen)),
    ),
  );
  const slots = workers.reduce((n, w) => n + (w.slots || 0), 0);
  const busy = workers.reduce((n, w) => n + (w.busy || 0), 0);
  fill(main, 
    el("h1", { text: "Workers" }),
    el("p", { class: "muted", text: `${workers.length} live workers, ${busy} of ${slots} slots busy` }),
    rows.length
      ? el("table", { id: "workers" }, el("thead", {}, el("tr", {}, ["worker", "host:pid", "queues", "kinds", "labels", "busy / slots", "last heartbeat"].map((h) => el("th", { text: h })))), el("tbody", {}, rows))
      : el("p", { class: "muted", text: "No worker is live." }),
  );
}

// --- jobs ----------------------------------------------------------------------------------------
async function renderJobs() {
  const shown = location.hash;
  const { query } = params();
  const queues = app.overview ? app.overview.queues.map((q) => q.queue) : [];
  const queue = query.get("queue") || queues[0] || "default";
  const tab = TABS.find((t) => t[0] === query.get("tab")) || TABS[0];
  const kind = query.get("kind") || "";
  const token = query.get("page") || "";
  // the tokens of the pages before this one, "-" for the first: what "Newer" goes back to
  const backs = (query.get("back") || "").split("|").filter(Boolean);
  const previous = backs[backs.length - 1] || "-";
  const stats = app.overview ? app.overview.queues.find((q) => q.queue === queue) : null;
  const main = document.getElementById("main");
  const count = (t) => (stats && t[0] !== "all" ? ` ${num(stats[t[0]])}` : "");
  const select = el(
    "select",
    { id: "queue", "aria-label": "Queue", onchange: (e) => go("/jobs", { queue: e.target.value, tab: tab[0], kind }) },
    [...new Set([queue, ...queues])].map((q) => el("option", { value: q, selected: q === queue, text: q })),
  );
  const kindInput = el("input", { id: "kind", placeholder: "kind", value: kind, "aria-label": "Kind" });
  const tabs = el(
    "nav",
    { class: "tabs", "aria-label": "States" },
    TABS.map((t) => el("a", { href: `#/jobs?queue=${encodeURIComponent(queue)}&tab=${t[0]}${kind ? "&kind=" + encodeURIComponent(kind) : ""}`, class: t === tab ? "active" : "", "data-tab": t[0], text: `${t[1]}${count(t)}` })),
  );
  const table = el("div", { id: "jobs" }, el("p", { class: "muted", text: "Loading…" }));
  fill(main, 
    el("h1", { text: "Jobs" }),
    el(
      "form",
      { class: "filters", onsubmit: (e) => { e.preventDefault(); go("/jobs", { queue, tab: tab[0], kind: kindInput.value.trim() }); } },
      el("label", {}, "Queue ", select),
      el("label", {}, "Kind ", kindInput),
      el("button", { type: "submit", text: "Filter" }),
    ),
    tabs,
    table,
  );
  const q = new URLSearchParams({ queue, pageSize: "25" });
  tab[2].forEach((s) => q.append("state", s));
  if (kind) q.set("kind", kind);
  if (token) q.set("pageToken", token);
  try {
    const page = await api(`/api/jobs?${q}`);
    if (app.view !== "jobs" || location.hash !== shown) return; // the person went elsewhere meanwhile
    const jobs = page.jobs || [];
    const rows = jobs.map((job) => jobRow(job));
    const pager = el(
      "div",
      { class: "pager" },
      token ? el("a", { id: "newer", href: `#/jobs?${new URLSearchParams({ queue, tab: tab[0], kind, page: previous === "-" ? "" : previous, back: backs.slice(0, -1).join("|") })}`, text: "← Newer" }) : null,
      page.nextPageToken ? el("a", { id: "older", href: `#/jobs?${new URLSearchParams({ queue, tab: tab[0], kind, page: page.nextPageToken, back: [...backs, token || "-"].join("|") })}`, text: "Older →" }) : null,
    );
    fill(table, 
      rows.length
        ? el("table", {}, el("thead", {}, el("tr", {}, ["job", "kind", "state", "attempt", "created", "worker", "result / error / why it waits", ""].map((h) => el("th", { text: h })))), el("tbody", {}, rows))
        : el("p", { class: "muted", text: "No job here." + (page.nextPageToken ? " Older pages may hold some." : "") }),
      pager,
    );
  } catch (err) {
    if (err.status !== 401) fill(table, el("p", { class: "error", text: err.message }));
  }
}

function summary(job) {
  if (job.error) return `${job.error.code}: ${job.error.message}`;
  if (job.result !== undefined) return JSON.stringify(job.result);
  return job.waitingReason || "";
}

function jobActions(job, after) {
  if (app.info.readOnly) return [];
  const s = state(job.state);
  const out = [];
  if (!TERMINAL.has(s)) out.push(el("button", { class: "cancel", onclick: (e) => { e.stopPropagation(); act(`/api/jobs/${job.id}/cancel`, (r) => { toast(`Job ${job.id} ${state(r.job.state) === "CANCELLED" ? "cancelled" : "told to stop"}`); after(); }); }, text: "Cancel" }));
  if (s === "FAILED" || s === "CANCELLED") out.push(el("button", { class: "retry", onclick: (e) => { e.stopPropagation(); act(`/api/jobs/${job.id}/retry`, () => { toast(`Job ${job.id} queued again`); after(); }); }, text: "Retry" }));
  return out;
}

function jobRow(job) {
  return el(
    "tr",
    { "data-job": job.id, class: "clickable", onclick: () => go(`/job/${job.id}`) },
    el("td", {}, el("a", { class: "mono", href: `#/job/${job.id}`, text: job.id })),
    el("td", { text: job.spec.kind }),
    el("td", { class: "state" }, badge(state(job.state))),
    el("td", { text: `${job.attempt || 0} / ${job.spec.maxAttempts || "∞"}` }),
    el("td", {}, when(job.createdAt)),
    el("td", { class: "mono", text: job.workerId || "" }),
    el("td", { class: "why", text: summary(job) }),
    el("td", { class: "actions" }, jobActions(job, renderJobs)),
  );
}

// --- one job -------------------------------------------------------------------------------------
function field(name, value) {
  if (value === undefined || value === null || value === "" || (Array.isArray(value) && !value.length)) return null;
  return [el("dt", { text: name }), el("dd", {}, value)];
}

async function renderJob(id, followIt = true) {
  const main = document.getElementById("main");
  let job;
  try {
    job = (await api(`/api/jobs/${encodeURIComponent(id)}`)).job;
  } catch (err) {
    if (err.status !== 401) fill(main, el("h1", { text: "Job" }), el("p", { class: "error", id: "not-found", text: err.message }));
    return;
  }
  if (app.view !== "job") return;
  const s = state(job.state);
  const spec = job.spec;
  const progress = job.progress
    ? el("div", { class: "progress" }, el("progress", { max: 1, value: job.progress.fraction || 0 }), ` ${Math.round((job.progress.fraction || 0) * 100)}% ${job.progress.message || ""}`)
    : null;
  const attempts = (job.attempts || []).map((a) =>
    el(
      "tr",
      {},
      el("td", { text: a.attempt }),
      el("td", { class: "mono", text: a.workerId || "" }),
      el("td", {}, when(a.startedAt)),
      el("td", {}, when(a.finishedAt)),
      el("td", {}, a.state ? badge(state(a.state)) : ""),
      el("td", { class: "why", text: a.error ? `${a.error.code}: ${a.error.message}` : "" }),
    ),
  );
  fill(main, 
    el("h1", {}, "Job ", el("span", { class: "mono", id: "job-id", text: job.id }), " ", el("span", { id: "job-state" }, badge(s))),
    el("div", { class: "actions" }, jobActions(job, () => renderJob(id))),
    progress,
    el(
      "dl",
      { class: "fields" },
      field("queue", el("a", { href: `#/jobs?queue=${encodeURIComponent(queueOf(job))}`, text: queueOf(job) })),
      field("kind", spec.kind),
      field("attempt", `${job.attempt || 0} of ${spec.maxAttempts || "unlimited"}`),
      field("priority", String(spec.priority || 0)),
      field("worker", job.workerId),
      field("created", when(job.createdAt)),
      field("started", when(job.startedAt)),
      field("finished", when(job.finishedAt)),
      field("due", when(job.dueAt)),
      field("why it waits", job.waitingReason),
      field("batch", job.batchId),
      field("depends on", (spec.dependsOn || []).map((d) => el("a", { class: "mono", href: `#/job/${d}`, text: d + " " }))),
      field("concurrency key", spec.concurrencyKey),
      field("unique key", spec.uniqueKey),
      field("idempotency key", spec.idempotencyKey),
      field("labels", Object.entries(spec.labels || {}).map(([k, v]) => `${k}=${v}`).join(", ")),
    ),
    el("h2", { text: "Arguments" }),
    el("pre", { id: "args", text: spec.args === undefined ? "none" : JSON.stringify(spec.args, null, 2) }),
    job.error ? [el("h2", { text: "Error" }), el("pre", { id: "error", class: "error", text: `${job.error.code}: ${job.error.message}` })] : null,
    job.result !== undefined ? [el("h2", { text: "Result" }), el("pre", { id: "result", text: JSON.stringify(job.result, null, 2) })] : null,
    el("h2", { text: "Attempts" }),
    attempts.length
      ? el("table", { id: "attempts" }, el("thead", {}, el("tr", {}, ["#", "worker", "started", "finished", "state", "error"].map((h) => el("th", { text: h })))), el("tbody", {}, attempts))
      : el("p", { class: "muted", text: "Not started yet." }),
  );
  if (followIt && !TERMINAL.has(s)) followJob(id);
}

async function followJob(id) {
  if (app.detail && app.detail.id === id) return;
  stopJob();
  const controller = new AbortController();
  app.detail = { id, controller };
  try {
    const response = await fetch(`/api/events?job=${encodeURIComponent(id)}`, { headers: headers(), signal: controller.signal });
    if (!response.ok) return;
    await readEvents(response, () => {
      if (app.view === "job" && app.detail && app.detail.id === id) renderJob(id, false);
    });
  } catch (err) {
    // aborted, or the stream broke: the page shows what it last read
  } finally {
    if (app.detail && app.detail.controller === controller) app.detail = null;
  }
}

function stopJob() {
  if (app.detail) app.detail.controller.abort();
  app.detail = null;
}

// --- schedules -----------------------------------------------------------------------------------
async function renderSchedules() {
  const main = document.getElementById("main");
  let data;
  try {
    data = await api("/api/schedules");
  } catch (err) {
    if (err.status !== 401) fill(main, el("p", { class: "error", text: err.message }));
    return;
  }
  if (app.view !== "schedules") return;
  const rows = data.schedules.map((sc) => {
    const spec = sc.spec;
    const name = spec.name;
    const timing = spec.cron ? `${spec.cron} (${spec.timeZone || "UTC"})` : `every ${duration(seconds(spec.interval))}`;
    const runs = (sc.recentRuns || []).slice(0, 3).map((r) =>
      el(
        "div",
        { class: "run" },
        when(r.time),
        " ",
        r.jobId ? el("a", { class: "mono", href: `#/job/${r.jobId}`, text: r.jobId.slice(0, 12) + "…" }) : el("span", { class: "muted", text: `skipped: ${r.skipped}` }),
        r.manual ? el("span", { class: "badge muted", text: "manual" }) : null,
      ),
    );
    const path = `/api/schedules/${encodeURIComponent(name)}`;
    const actions = app.info.readOnly
      ? []
      : [
          el("button", { class: "trigger", onclick: () => act(`${path}/trigger`, (r) => { toast(`Schedule ${name}: job ${r.job.id} submitted`); renderSchedules(); }), text: "Run now" }),
          sc.paused
            ? el("button", { class: "resume", onclick: () => act(`${path}/resume`, () => { toast(`Schedule ${name} resumed`); renderSchedules(); }), text: "Resume" })
            : el("button", { class: "pause", onclick: () => act(`${path}/pause`, () => { toast(`Schedule ${name} paused`); renderSchedules(); }), text: "Pause" }),
        ];
    return el(
      "tr",
      { "data-schedule": name },
      el("td", { text: name }),
      el("td", { text: timing }),
      el("td", { text: `${spec.job.kind} on ${spec.job.queue || "default"}` }),
      el("td", { class: "status" }, sc.paused ? el("span", { class: "badge paused", text: "paused" }) : el("span", { class: "badge state-running", text: "active" })),
      el("td", {}, (sc.nextFireTimes || []).slice(0, 1).map((t) => [new Date(t).toLocaleString(), " (", when(t), ")"])),
      el("td", { class: "runs" }, runs),
      el("td", { class: "actions" }, actions),
    );
  });
  fill(main, 
    el("h1", { text: "Schedules" }),
    rows.length
      ? el("table", { id: "schedules" }, el("thead", {}, el("tr", {}, ["name", "when", "job", "status", "next run", "last runs", ""].map((h) => el("th", { text: h })))), el("tbody", {}, rows))
      : el("p", { class: "muted", text: "No schedule yet (CreateSchedule makes one)." }),
    data.more ? el("p", { class: "muted", text: "Only the first 1,000 schedules are shown." }) : null,
  );
}

// --- routing -------------------------------------------------------------------------------------
function render() {
  if (app.view === "signin") return;
  const { path } = params();
  const [, first, rest] = path.split("/");
  const view = { "": "queues", workers: "workers", jobs: "jobs", job: "job", schedules: "schedules" }[first] || "queues";
  app.view = view;
  for (const a of document.querySelectorAll("header nav a")) a.classList.toggle("active", a.dataset.nav === (view === "job" ? "jobs" : view));
  if (view !== "job") stopJob();
  if (view === "queues") renderQueues();
  else if (view === "workers") renderWorkers();
  else if (view === "jobs") renderJobs();
  else if (view === "job") renderJob(decodeURIComponent(rest || ""));
  else renderSchedules();
}

async function start() {
  app.view = "";
  try {
    app.info = await (await fetch("/api/info")).json();
  } catch (err) {
    fill(document.getElementById("main"), el("p", { class: "error", text: "The gateway does not answer." }));
    return;
  }
  document.getElementById("mode").hidden = !app.info.readOnly;
  document.getElementById("logout").hidden = !app.info.auth;
  if (app.info.auth && !app.token) {
    signIn("This gateway needs a token: one of its auth tokens.");
    return;
  }
  try {
    onOverview(await api("/api/overview"));
  } catch (err) {
    if (err.status === 401) return;
    toast(err.message, true);
  }
  render();
  follow();
}

window.addEventListener("hashchange", render);
document.getElementById("search").addEventListener("submit", (e) => {
  e.preventDefault();
  const input = document.getElementById("search-id");
  const id = input.value.trim();
  if (id) go(`/job/${id}`);
  input.value = "";
});
document.getElementById("logout").addEventListener("click", () => {
  sessionStorage.removeItem("jobgate-token");
  app.token = "";
  signIn("Signed out.");
});
setInterval(() => {
  for (const t of document.querySelectorAll("time[datetime]")) t.textContent = ago(t.getAttribute("datetime"));
}, 1000);
start();
