// The Mesh dashboard: reads the node's Server-Sent Events feed (/dashboard/feed) and draws
// the mesh. Plain DOM and SVG, no library (see node/dashboard/__init__.py for why).
"use strict";

const WINDOW_S = 60;      // seconds of task stream shown
const MAX_TASKS = 20000;  // tasks remembered (oldest forgotten)
const MAX_BARS = 3000;    // bars drawn at once
const MAX_GROUPS = 12;    // progress rows shown
const MAX_LOG = 300;      // event lines kept
const LANE_H = 18;
const LABEL_W = 110;

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";

let model = null;
let offset = 0;           // node clock minus this browser's clock, seconds
let paused = false;
let selected = null;

function fresh() {
  return {
    node: "",
    peers: [],
    tasks: new Map(),     // task_id -> {id, task, node, initiator, start, end, run_s, ok, error, group}
    groups: new Map(),    // initiator/group/task -> {label, ids:Set, done, failed}
    lanes: new Map(),     // node -> [busy until, ...]
    bars: new Map(),      // task_id -> rect
  };
}

function now() { return Date.now() / 1000 + offset; }

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function bytes(n) {
  if (!n) return "0 B";
  const u = ["B", "kB", "MB", "GB", "TB"];
  const i = Math.min(u.length - 1, Math.floor(Math.log(n) / Math.log(1000)));
  return (n / 1000 ** i).toFixed(i ? 1 : 0) + " " + u[i];
}

function ago(t) {
  if (!t) return "";
  const s = Math.max(0, now() - t);
  return s < 90 ? `${s.toFixed(0)} s` : s < 5400 ? `${(s / 60).toFixed(0)} min` : `${(s / 3600).toFixed(1)} h`;
}

function colour(name) {
  let h = 0;
  for (const c of name) h = (h * 31 + c.charCodeAt(0)) >>> 0;
  return `hsl(${h % 360}, 60%, 55%)`;
}

// -- the feed --------------------------------------------------------------------------------

function connect() {
  const feed = new EventSource("/dashboard/feed");
  feed.addEventListener("hello", (m) => {
    const hello = JSON.parse(m.data);
    model = fresh();
    model.node = hello.node;
    offset = hello.now - Date.now() / 1000;
    $("where").textContent = `seen from ${hello.node}`;
    $("conn").textContent = "live";
    $("conn").dataset.state = "live";
    $("stream").replaceChildren();
    $("events").replaceChildren();
  });
  feed.addEventListener("peers", (m) => {
    if (!model) return;
    model.peers = JSON.parse(m.data);
    drawPeers();
    drawTransfers();
  });
  feed.addEventListener("events", (m) => {
    if (!model) return;
    for (const ev of JSON.parse(m.data)) take(ev);
    drawGroups();
  });
  feed.onerror = () => {
    const closed = feed.readyState === EventSource.CLOSED;
    $("conn").textContent = closed ? "closed: open a new URL from mesh-node dashboard" : "reconnecting";
    $("conn").dataset.state = closed ? "closed" : "connecting";
  };
}

function task(id) {
  let t = model.tasks.get(id);
  if (!t) {
    t = { id, task: "", node: "", initiator: "", start: 0, end: 0, run_s: 0, ok: null, error: null, group: "" };
    model.tasks.set(id, t);
    if (model.tasks.size > MAX_TASKS) {
      const oldest = model.tasks.keys().next().value;
      model.tasks.delete(oldest);
      const bar = model.bars.get(oldest);
      if (bar) bar.remove();
      model.bars.delete(oldest);
    }
  }
  return t;
}

function group(initiator, name, taskName) {
  const key = `${initiator}/${name}/${taskName}`;
  let g = model.groups.get(key);
  if (!g) {
    g = { key, label: `${taskName} (batch ${name} on ${initiator})`, ids: new Set(), done: 0, failed: 0, last: 0 };
    model.groups.set(key, g);
  }
  return g;
}

function take(ev) {
  switch (ev.kind) {
    case "member":
      log(ev.t, ev.state === "alive" ? "joined" : ev.state, `${ev.peer} ${ev.state === "alive" ? "is alive" : "is " + ev.state} (seen by ${ev.node})`);
      break;
    case "submit": {
      const t = task(ev.task_id);
      Object.assign(t, { task: ev.task, initiator: ev.node, group: ev.group });
      const g = group(ev.node, ev.group, ev.task);
      g.ids.add(ev.task_id);
      g.last = ev.t;
      break;
    }
    case "start": {
      const t = task(ev.task_id);
      Object.assign(t, { task: ev.task || t.task, node: ev.node, initiator: ev.initiator, start: ev.t, end: 0 });
      t.lane = lane(ev.node, ev.t);
      break;
    }
    case "end": {
      const t = task(ev.task_id);
      Object.assign(t, { task: ev.task || t.task, node: ev.node, initiator: ev.initiator, end: ev.t, run_s: ev.run_s, ok: ev.ok });
      if (!t.start) t.start = ev.t - ev.run_s;
      if (t.lane === undefined) t.lane = lane(ev.node, t.start);
      if (ev.error) t.error = ev.error;
      const lanes = model.lanes.get(ev.node);
      if (lanes && lanes[t.lane] === Infinity) lanes[t.lane] = ev.t;
      break;
    }
    case "done": {
      const t = task(ev.task_id);
      t.finished = true;
      if (!ev.ok && !t.error) t.error = { message: ev.error || "failed" };
      if (t.ok === null) t.ok = ev.ok;
      const g = group(ev.node, ev.group, ev.task);
      g.ids.add(ev.task_id);
      if (ev.ok) g.done++; else g.failed++;
      if (ev.attempts > 0) log(ev.t, "auction", `task ${ev.task_id} (${ev.task}) was announced again (${ev.attempts}x)`);
      if (!ev.ok) log(ev.t, "failed", `task ${ev.task_id} (${ev.task}) failed${ev.ran_on ? " on " + ev.ran_on : ""}: ${ev.error || ""}`);
      break;
    }
  }
}

function lane(node, start) {
  let lanes = model.lanes.get(node);
  if (!lanes) model.lanes.set(node, (lanes = []));
  let i = lanes.findIndex((busy) => busy <= start);
  if (i < 0) { i = lanes.length; lanes.push(0); }
  lanes[i] = Infinity;
  return i;
}

function log(t, kind, text) {
  const list = $("events");
  const when = new Date((t - offset) * 1000).toLocaleTimeString();
  list.prepend(el("li", { "data-kind": kind }, `${when}  ${text}`));
  while (list.childElementCount > MAX_LOG) list.lastElementChild.remove();
}

// -- drawing ---------------------------------------------------------------------------------

function drawPeers() {
  const body = $("peers").tBodies[0];
  const rows = model.peers.map((p) => {
    const caps = p.capabilities || {}, res = caps.resources || {}, stats = p.stats || {};
    const slots = stats.slots || res.cpu || 1;
    const running = (p.load || {}).running || 0;
    const tr = el("tr", { "data-node": p.id, "data-state": p.state });
    tr.append(el("td", {}, p.id + (p.self ? " (this node)" : "")));
    tr.append(el("td", { class: "state", "data-state": p.state }, p.state + (p.since ? ` for ${ago(p.since)}` : "")));
    const use = el("td");
    const meter = el("span", { class: "meter" });
    const fill = el("span");
    fill.style.width = `${Math.min(100, (100 * running) / slots)}%`;
    meter.append(fill);
    use.append(meter, `${running}/${slots}`);
    tr.append(use);
    tr.append(el("td", {}, String((p.load || {}).queued || 0)));
    tr.append(el("td", {}, String(res.cpu ?? "")));
    tr.append(el("td", {}, res.memory ? bytes(res.memory) : ""));
    tr.append(el("td", {}, String(res.gpu || 0)));
    const libs = Object.entries(caps.libraries || {});
    tr.append(el("td", { title: libs.map(([k, v]) => `${k} ${v}`).join("\n") }, libs.map(([k]) => k).join(", ")));
    tr.append(el("td", {}, Object.entries(caps.labels || {}).map(([k, v]) => `${k}=${v}`).join(", ")));
    tr.append(el("td", {}, stats.version || ""));
    tr.append(el("td", {}, stats.objects !== undefined ? `${stats.objects} (${bytes(stats.object_bytes)})` : ""));
    return tr;
  });
  body.replaceChildren(...rows);
}

function drawTransfers() {
  const body = $("transfers").tBodies[0];
  const rows = [];
  for (const p of model.peers) {
    for (const [holder, n] of Object.entries((p.stats || {}).fetched_from || {})) {
      const tr = el("tr");
      tr.append(el("td", {}, holder), el("td", {}, p.id), el("td", {}, bytes(n)));
      rows.push(tr);
    }
  }
  if (!rows.length) {
    const tr = el("tr");
    tr.append(el("td", { class: "empty", colspan: "3" }, "no bytes moved between nodes yet"));
    rows.push(tr);
  }
  body.replaceChildren(...rows);
}

function drawGroups() {
  const groups = [...model.groups.values()].sort((a, b) => b.last - a.last).slice(0, MAX_GROUPS);
  if (!groups.length) return;
  const out = groups.map((g) => {
    const total = g.ids.size;
    let running = 0;
    for (const id of g.ids) {
      const t = model.tasks.get(id);
      if (t && t.start && !t.end && !t.finished) running++;
    }
    const waiting = Math.max(0, total - g.done - g.failed - running);
    const div = el("div", { class: "group", "data-group": g.key });
    const head = el("div");
    head.append(el("span", { class: "count" }, `${g.done}/${total}`), ` ${g.label}: running ${running}, waiting ${waiting}, failed ${g.failed}`);
    const bar = el("div", { class: "bar" });
    for (const [cls, n] of [["done", g.done], ["failed", g.failed], ["running", running]]) {
      const s = el("span", { class: cls });
      s.style.width = `${(100 * n) / Math.max(1, total)}%`;
      bar.append(s);
    }
    div.append(head, bar);
    return div;
  });
  $("groups").replaceChildren(...out);
}

function nodesInOrder() {
  const ids = model.peers.map((p) => p.id);
  for (const n of model.lanes.keys()) if (!ids.includes(n)) ids.push(n);
  return ids;
}

function drawStream() {
  if (!model || paused) return;
  const svg = $("stream");
  const width = svg.clientWidth || 800;
  // The window spans the tasks of the last minute, and at least 10 s.
  const t1 = now();
  let first = t1 - 10;
  for (const t of model.tasks.values()) {
    if (t.start && t.start < first && (!t.end || t.end > t1 - WINDOW_S)) first = t.start;
  }
  const span = Math.min(WINDOW_S, t1 - first + 0.5), t0 = t1 - span;
  const x = (t) => LABEL_W + ((t - t0) / span) * (width - LABEL_W);
  // Lanes: each node's slots (more if it ran more at once), one row each.
  const rowOf = new Map();
  let rows = 0;
  const labels = [];
  for (const node of nodesInOrder()) {
    const p = model.peers.find((q) => q.id === node);
    const slots = Math.max(((p || {}).stats || {}).slots || ((p || {}).capabilities || {}).resources?.cpu || 1, (model.lanes.get(node) || []).length);
    rowOf.set(node, rows);
    labels.push([node, rows, slots]);
    rows += slots;
  }
  svg.setAttribute("height", String(Math.max(1, rows) * LANE_H + 2));
  let frame = svg.querySelector("g.frame");
  if (!frame) {
    frame = document.createElementNS(SVG, "g");
    frame.setAttribute("class", "frame");
    svg.prepend(frame);
  }
  frame.replaceChildren();
  for (const [node, row, slots] of labels) {
    const text = document.createElementNS(SVG, "text");
    text.setAttribute("class", "lane-label");
    text.setAttribute("x", "4");
    text.setAttribute("y", String(row * LANE_H + 11));
    text.textContent = node;
    const line = document.createElementNS(SVG, "line");
    line.setAttribute("class", "lane-sep");
    line.setAttribute("x1", "0");
    line.setAttribute("x2", String(width));
    line.setAttribute("y1", String((row + slots) * LANE_H + 1));
    line.setAttribute("y2", String((row + slots) * LANE_H + 1));
    frame.append(text, line);
  }
  const names = new Set();
  let drawn = 0;
  const seen = new Set();
  for (const t of [...model.tasks.values()].reverse()) {
    if (drawn >= MAX_BARS) break;
    if (!t.node || t.lane === undefined) continue;
    const start = t.end ? Math.max(t.start, t.end - t.run_s) : t.start;
    const end = t.end || t1;
    if (end < t0) continue;
    drawn++;
    seen.add(t.id);
    names.add(t.task);
    let bar = model.bars.get(t.id);
    if (!bar) {
      bar = document.createElementNS(SVG, "rect");
      bar.setAttribute("class", "task");
      bar.dataset.task = t.id;
      bar.addEventListener("click", () => show(t.id));
      const tip = document.createElementNS(SVG, "title");
      bar.append(tip);
      svg.append(bar);
      model.bars.set(t.id, bar);
    }
    const state = !t.end ? "running" : t.ok ? "ok" : "failed";
    bar.dataset.state = state;
    bar.dataset.name = t.task;
    bar.dataset.node = t.node;
    bar.setAttribute("fill", colour(t.task));
    const left = Math.max(LABEL_W, x(start));
    bar.setAttribute("x", left.toFixed(1));
    bar.setAttribute("width", Math.max(2, x(end) - left).toFixed(1));
    bar.setAttribute("y", String((rowOf.get(t.node) + t.lane) * LANE_H + 2));
    bar.setAttribute("height", String(LANE_H - 3));
    bar.firstChild.textContent = `${t.task} ${t.id} on ${t.node}: ${state}`;
  }
  for (const [id, bar] of model.bars) {
    if (!seen.has(id)) { bar.remove(); model.bars.delete(id); }
  }
  const legend = [...names].sort().map((n) => {
    const s = el("span");
    const i = el("i");
    i.style.background = colour(n);
    s.append(i, n);
    return s;
  });
  $("legend").replaceChildren(...legend);
}

// -- one task --------------------------------------------------------------------------------

function fact(dl, name, value) {
  if (value === undefined || value === null || value === "") return;
  dl.append(el("dt", {}, name), el("dd", {}, String(value)));
}

async function show(id) {
  const t = model.tasks.get(id);
  if (!t) return;
  selected = id;
  $("detail").hidden = false;
  $("detail-id").textContent = `${t.id} (${t.task})`;
  const dl = $("detail-facts");
  dl.replaceChildren();
  const state = !t.end ? "running" : t.ok ? "done" : "failed";
  fact(dl, "state", state);
  fact(dl, "ran on", t.node);
  fact(dl, "submitted by", t.initiator);
  fact(dl, "batch", t.group);
  if (t.start) fact(dl, "started", new Date((t.start - offset) * 1000).toLocaleTimeString());
  if (t.end) fact(dl, "ran for", `${t.run_s.toFixed(4)} s in a worker, ${(t.end - t.start).toFixed(4)} s on its node`);
  const err = $("detail-error");
  err.hidden = !t.error;
  if (t.error) {
    err.textContent = [`${t.error.exc_type || t.error.kind || "error"}: ${t.error.message}`, t.error.traceback || ""].join("\n\n");
  }
  const why = $("detail-why");
  why.textContent = "loading";
  try {
    const q = new URLSearchParams({ node: t.initiator, task: t.id });
    const resp = await fetch(`/dashboard/why?${q}`, { credentials: "same-origin" });
    const record = await resp.json();
    if (selected !== id) return;
    why.replaceChildren(...(resp.ok ? auction(record) : [el("p", { class: "empty" }, record.error || resp.statusText)]));
  } catch (e) {
    if (selected === id) why.textContent = `no record: ${e}`;
  }
}

function auction(r) {
  const out = [];
  const again = r.attempts ? `, announced again ${r.attempts}x` : "";
  const cost = typeof r.cost_s === "number" ? ` at ${r.cost_s.toFixed(4)} s expected` : "";
  const head = el("p", { class: "why" }, `winner ${r.winner || "none"}${cost}${again}: ${r.why || r.state}`);
  out.push(head);
  for (const round of r.rounds || []) {
    const table = el("table", { class: "round" });
    table.append(el("caption", {}, `call for proposals ${round.cfp}: asked ${round.asked.join(", ") || "nobody"}`));
    for (const [node, cost] of Object.entries(round.bids).sort((a, b) => a[1] - b[1])) {
      const tr = el("tr");
      tr.append(el("td", {}, "bid"), el("td", {}, node), el("td", {}, `${cost.toFixed(4)} s`));
      table.append(tr);
    }
    for (const [node, reason] of Object.entries(round.refusals || {})) {
      const tr = el("tr");
      tr.append(el("td", {}, "refused"), el("td", {}, node), el("td", {}, JSON.stringify(reason)));
      table.append(tr);
    }
    for (const node of round.silent || []) {
      const tr = el("tr");
      tr.append(el("td", {}, "silent"), el("td", {}, node), el("td"));
      table.append(tr);
    }
    out.push(table);
  }
  return out;
}

// -- start -----------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  const stream = $("stream");
  stream.addEventListener("mouseenter", () => { paused = true; $("stream-note").textContent = "paused"; });
  stream.addEventListener("mouseleave", () => { paused = false; $("stream-note").textContent = "last 60 s; hover to pause, click a task for its record"; });
  $("detail-close").addEventListener("click", () => { $("detail").hidden = true; selected = null; });
  connect();
  setInterval(drawStream, 500);
  setInterval(() => { if (model) drawPeers(); }, 5000);  // the "for N s" of each state
});
