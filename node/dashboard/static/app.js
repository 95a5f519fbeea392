// Coop dashboard: plain JS, no dependencies. Every data call carries the API token (kept in sessionStorage).
// Everything shown comes from peers or users: it goes into the page as text (textContent), never as HTML.
"use strict";

const TOKEN_KEY = "coop-token";
const REFRESH_MS = 2000;
const COLORS = ["#2f6fdd", "#e0a100", "#2b8a3e", "#c8372d", "#7b4bd6", "#0f9aa8", "#8a5a2b"];
const state = { selectedJob: null, logAbort: null, selectedPeer: null, timer: null };  // timer: refreshing

function $(id) { return document.getElementById(id); }

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "onclick") node.addEventListener("click", v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c ?? "")));
  return node;
}

function svgEl(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

function short(peer) { return peer ? peer.slice(0, 6) + "…" + peer.slice(-6) : "-"; }
function bytes(n) {
  for (const [u, s] of [["TiB", 2 ** 40], ["GiB", 2 ** 30], ["MiB", 2 ** 20], ["KiB", 1024]]) {
    if (n >= s) return (n / s).toFixed(1) + " " + u;
  }
  return n + " B";
}
function when(ms) { return ms ? new Date(ms).toLocaleTimeString() : "-"; }

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = Object.assign({ Authorization: "Bearer " + token }, options.headers || {});
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) throw new Unauthorized("the token was refused");
  if (!response.ok) throw new Error(path + ": HTTP " + response.status);
  return response;
}
async function apiJson(path) { return (await api(path)).json(); }

// ------------------------------------------------------------------------------------------------ login

async function redeemCode() {
  const params = new URLSearchParams(location.hash.slice(1));
  const code = params.get("code");
  if (!code) return;
  history.replaceState(null, "", location.pathname);  // the code is spent either way: off the address bar
  const response = await fetch("/v1/dashboard/session", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ code }),
  });
  const body = await response.json();
  if (response.ok) sessionStorage.setItem(TOKEN_KEY, body.token);
  else $("login-error").textContent = body.message || "the link was refused";
}

function showLogin(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  state.timer = null;  // stops loop()
  $("app").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  if (message) $("login-error").textContent = message;
}

async function login(token) {
  sessionStorage.setItem(TOKEN_KEY, token);
  try {
    await apiJson("/v1/id");
  } catch (e) {
    showLogin(e instanceof Unauthorized ? "that token was refused" : String(e));
    return;
  }
  $("login").hidden = true;
  $("app").hidden = false;
  $("logout").hidden = false;
  document.body.dataset.loggedIn = "1";
  if (!state.timer) {
    state.timer = true;
    loop();
  }
}

// The next refresh starts REFRESH_MS after the last one ended: a slow node gets fewer requests, never a pile-up.
async function loop() {
  while (state.timer) {
    await refresh();
    await new Promise((resolve) => setTimeout(resolve, REFRESH_MS));
  }
}

// ------------------------------------------------------------------------------------------------ views

function renderNetwork(net) {
  const st = net.status;
  $("me").textContent = net.me;
  $("summary").textContent = `${st.connected_peers} peers connected · ${net.providers.length} providers · up ${Math.round(st.uptime_s)} s`;
  const ads = new Map(net.providers.map((p) => [p.peer_id, p]));
  const connected = new Map(net.peers.map((p) => [p.peer_id, p.connected]));
  const ids = [...new Set([...net.peers.map((p) => p.peer_id), ...ads.keys()])].sort();
  const rows = ids.map((id) => {
    const ad = ads.get(id);
    const mine = id === net.me;
    return el("tr", { "data-peer": id },
      el("td", { class: "mono", title: id }, mine ? id + " (this node)" : id),
      el("td", {}, mine ? "-" : connected.get(id) ? "yes" : "no"),
      el("td", {}, ad ? ad.cpus : "-"),
      el("td", {}, ad ? bytes(ad.memory_bytes) : "-"),
      el("td", {}, ad ? (ad.gpus.map((g) => g.model).join(", ") || "-") : "-"),
      el("td", {}, ad ? ad.sandbox_tier : "not providing"),
      el("td", {}, ad ? (ad.load_permille / 10).toFixed(0) + "%" : "-"),
      el("td", {}, ad ? ad.price_sheet.per_cpu_second : "-"));
  });
  $("peers").tBodies[0].replaceChildren(...rows);

  const alloc = net.providers.map((p) => {
    const use = p.in_use;
    const cpuShare = p.cpus ? Math.min(1, use.cpus / p.cpus) : 0;
    return el("div", { class: "alloc", "data-provider": p.peer_id },
      el("span", { class: "mono", title: p.peer_id }, short(p.peer_id) + (p.peer_id === net.me ? " (me)" : "")),
      el("span", {}, `${p.cpus} CPUs, ${bytes(p.memory_bytes)}, ${p.gpus.length} GPU(s); our jobs there: ${use.jobs} using ${use.cpus} CPU(s), ${bytes(use.memory_bytes)}`),
      el("span", { class: "hint" }, "our jobs' CPUs"),
      bar(cpuShare, ""),
      el("span", { class: "hint" }, "machine load"),
      bar(p.load_permille / 1000, "load"));
  });
  $("allocation").replaceChildren(...(alloc.length ? alloc : [el("p", { class: "hint" }, "no provider ads found yet")]));
}

function bar(fraction, kind) {
  const inner = el("span");
  inner.style.width = (Math.max(0, Math.min(1, fraction)) * 100).toFixed(1) + "%";
  return el("div", { class: "bar " + kind, title: (fraction * 100).toFixed(0) + "%" }, inner);
}

function renderPrices(quotes) {
  const canvas = $("prices");
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, pad = 40;
  ctx.clearRect(0, 0, W, H);
  ctx.font = "11px system-ui";
  ctx.fillStyle = "#6b7385";
  if (!quotes.length) { ctx.fillText("no quotes yet: submit a job", pad, H / 2); $("price-legend").replaceChildren(); return; }
  const t0 = Math.min(...quotes.map((q) => q.t)), t1 = Math.max(...quotes.map((q) => q.t), t0 + 1);
  const cMax = Math.max(...quotes.map((q) => q.cost), 1);
  const x = (t) => pad + ((t - t0) / (t1 - t0)) * (W - 2 * pad);
  const y = (c) => H - pad + 10 - (c / cMax) * (H - 2 * pad);
  ctx.strokeStyle = "#dfe3ea";
  ctx.beginPath(); ctx.moveTo(pad, y(0)); ctx.lineTo(W - pad, y(0)); ctx.moveTo(pad, y(0)); ctx.lineTo(pad, y(cMax)); ctx.stroke();
  ctx.fillText(String(cMax), 2, y(cMax) + 4);
  ctx.fillText("0", 2, y(0) + 4);
  ctx.fillText(when(t0), pad, H - 4);
  ctx.fillText(when(t1), W - pad - 50, H - 4);
  const classes = [...new Set(quotes.map((q) => q.class))].sort();
  const legend = [];
  classes.forEach((cls, i) => {
    const color = COLORS[i % COLORS.length];
    const points = quotes.filter((q) => q.class === cls);
    ctx.strokeStyle = color; ctx.fillStyle = color;
    ctx.beginPath();
    points.forEach((q, j) => (j ? ctx.lineTo(x(q.t), y(q.cost)) : ctx.moveTo(x(q.t), y(q.cost))));
    ctx.globalAlpha = 0.35; ctx.stroke(); ctx.globalAlpha = 1;
    for (const q of points) {
      ctx.beginPath();
      ctx.arc(x(q.t), y(q.cost), q.outcome === "accepted" ? 4 : 2.5, 0, 2 * Math.PI);
      q.outcome === "accepted" ? ctx.fill() : ctx.stroke();
    }
    const sw = el("span", { class: "swatch" }); sw.style.background = color;
    legend.push(el("span", { class: "legend-item" }, sw, `${cls}: ${points.length} quotes`));
  });
  legend.push(el("span", { class: "legend-item hint" }, "filled dot = accepted"));
  $("price-legend").replaceChildren(...legend);
}

function renderJobs(jobs) {
  const rows = jobs.map((j) => el("tr", {
    "data-job": j.job_id, class: j.job_id === state.selectedJob ? "selected" : "",
    onclick: () => selectJob(j.job_id),
  },
  el("td", { class: "mono" }, j.job_id),
  el("td", {}, j.role),
  el("td", { class: "state-" + j.state }, j.state),
  el("td", { class: "mono", title: j.provider || "" }, short(j.provider)),
  el("td", {}, j.cost ?? "-"),
  el("td", { class: "cmd mono", title: (j.command || []).join(" ") }, (j.command || []).join(" "))));
  $("jobs").tBodies[0].replaceChildren(...rows);
}

async function follow(jobId, stream, signal) {
  const pre = $("log-" + stream);
  pre.textContent = "";
  const response = await api(`/v1/jobs/${encodeURIComponent(jobId)}/logs?stream=${stream}&follow=1`, { signal });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    pre.textContent += decoder.decode(value, { stream: true });
    pre.scrollTop = pre.scrollHeight;
  }
  pre.dataset.done = "1";
}

function selectJob(jobId) {
  if (state.logAbort) state.logAbort.abort();
  state.selectedJob = jobId;
  state.logAbort = new AbortController();
  $("log-job").textContent = jobId;
  for (const row of $("jobs").tBodies[0].rows) row.classList.toggle("selected", row.dataset.job === jobId);
  for (const stream of ["stdout", "stderr"]) {
    delete $("log-" + stream).dataset.done;
    follow(jobId, stream, state.logAbort.signal).catch((e) => {
      if (e.name !== "AbortError") $("log-" + stream).textContent += `\n[${e.message}]`;
    });
  }
}

function renderLedger(led) {
  $("balance").textContent = `earned ${led.earned} · spent ${led.spent} · balance ${led.balance} milli-credits`;
  $("ledger").tBodies[0].replaceChildren(...led.entries.map((e) => el("tr", {},
    el("td", { class: "mono" }, e.job_id), el("td", { class: "mono", title: e.counterparty }, short(e.counterparty)),
    el("td", {}, e.direction), el("td", {}, e.cost), el("td", {}, when(e.issued_ms)))));
}

function renderTrust(graph) {
  const svg = $("trust");
  const W = 460, H = 360, cx = W / 2, cy = H / 2, r = Math.min(W, H) / 2 - 50;
  const pos = new Map();
  graph.nodes.forEach((n, i) => {
    const a = (2 * Math.PI * i) / Math.max(1, graph.nodes.length) - Math.PI / 2;
    pos.set(n.peer_id, [cx + r * Math.cos(a), cy + r * Math.sin(a)]);
  });
  const defs = svgEl("defs");
  const marker = svgEl("marker", { id: "arrow", viewBox: "0 0 10 10", refX: "20", refY: "5", markerWidth: "6", markerHeight: "6", orient: "auto" });
  marker.append(svgEl("path", { d: "M0,0 L10,5 L0,10 z", fill: "#8a93a6" }));
  defs.append(marker);
  const parts = [defs];
  for (const e of graph.edges) {
    const [a, b] = [pos.get(e.rater), pos.get(e.ratee)];
    if (!a || !b) continue;
    const line = svgEl("line", { x1: a[0], y1: a[1], x2: b[0], y2: b[1], stroke: e.bad ? "#c8372d" : "#8a93a6",
      "stroke-width": Math.min(4, 1 + Math.log2(e.records)), "marker-end": "url(#arrow)" });
    const title = svgEl("title");
    title.textContent = `${short(e.rater)} rated ${short(e.ratee)}: ${e.records} record(s), mean ${e.mean_score}/100, ${e.bad} bad`;
    line.append(title);
    parts.push(line);
  }
  for (const n of graph.nodes) {
    const [x, y] = pos.get(n.peer_id);
    const score = n.score ?? 0.5;
    const hue = Math.round(score * 120);
    const circle = svgEl("circle", { cx: x, cy: y, r: n.me ? 13 : 10, fill: `hsl(${hue},60%,55%)`,
      stroke: n.me ? "#1d2330" : "#fff", "stroke-width": 2, "data-peer": n.peer_id });
    circle.addEventListener("click", () => showPeer(n.peer_id));
    const label = svgEl("text", { x: x - 30, y: y + 26 });
    label.textContent = `${short(n.peer_id)} ${n.me ? "(me)" : n.score === null ? "" : n.score.toFixed(2)}`;
    parts.push(circle, label);
  }
  svg.replaceChildren(...parts);
}

async function showPeer(peer) {
  state.selectedPeer = peer;
  const info = await apiJson("/v1/reputation/" + encodeURIComponent(peer));
  const records = info.records.map((r) => el("tr", {},
    el("td", { class: "mono" }, short(r.rater)), el("td", {}, r.outcome), el("td", {}, r.score),
    el("td", {}, r.cost), el("td", {}, when(r.time)), el("td", {}, r.comment)));
  $("trust-detail").replaceChildren(
    el("p", {}, el("b", {}, short(peer)), ` trust ${info.score} (${info.direct ? "direct" : "transitive"}, ${info.evidence_count} records): ${info.explanation}`),
    el("table", {}, el("thead", {}, el("tr", {}, ...["rater", "outcome", "score", "cost", "when", "comment"].map((h) => el("th", {}, h)))),
      el("tbody", {}, ...records)));
}

async function refresh() {
  try {
    const [net, quotes, jobs, led, graph] = await Promise.all([
      apiJson("/v1/dashboard/network"), apiJson("/v1/dashboard/quotes"), apiJson("/v1/jobs?limit=50"),
      apiJson("/v1/ledger"), apiJson("/v1/dashboard/trust"),
    ]);
    renderNetwork(net);
    renderPrices(quotes.quotes);
    renderJobs(jobs.jobs);
    renderLedger(led);
    renderTrust(graph);
    document.body.dataset.refreshed = String(Date.now());
  } catch (e) {
    if (e instanceof Unauthorized) showLogin("the node refused the token (restarted? it makes a new one)");
    else $("summary").textContent = "refresh failed: " + e.message;
  }
}

async function main() {
  $("login-form").addEventListener("submit", (ev) => { ev.preventDefault(); login($("token-input").value.trim()); });
  $("logout").addEventListener("click", () => showLogin(""));
  await redeemCode();
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) await login(token);
  else showLogin();
}

main();
