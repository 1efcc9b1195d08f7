// fedlearn live page: the run's snapshot, then its server-sent events. Plain JS and SVG,
// nothing loaded from anywhere else.
"use strict";

const S = {
  live: false, seq: 0, skew: 0, run: {}, round: 0, stages: [],
  rounds: new Map(), failures: new Map(), versions: new Map(), clients: new Map(),
  epsilon: null, delta: null, metric: null, selected: "", stream: "", traffic: [],
};
const $ = (id) => document.getElementById(id);
const SVGNS = "http://www.w3.org/2000/svg";

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined && v !== false) el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) el.append(c instanceof Node ? c : String(c));
  return el;
}
function s(tag, attrs, text) {
  const el = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}
const now = () => Date.now() / 1000 + S.skew;
function fmt(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(2) : String(+v.toPrecision(4));
}
function dur(sec) {
  if (sec === null || sec === undefined || !isFinite(sec) || sec < 0) return "–";
  sec = Math.round(sec);
  const hh = Math.floor(sec / 3600), mm = Math.floor((sec % 3600) / 60), ss = sec % 60;
  return hh ? `${hh}h ${mm}m` : mm ? `${mm}m ${ss}s` : `${ss}s`;
}
const fkey = (f) => `${f.round}/${f.stage}/${f.client}`;
function client(id) {
  if (!S.clients.has(id)) S.clients.set(id, { client: id });
  return S.clients.get(id);
}

// ------------------------------------------------------------------ state in

function load(snap) {
  S.live = snap.live; S.seq = snap.seq; S.skew = snap.now - Date.now() / 1000;
  S.run = snap.run || {}; S.round = snap.round || 0; S.stages = snap.stages || [];
  for (const r of snap.rounds) S.rounds.set(r.round, r);
  for (const f of snap.failures) S.failures.set(fkey(f), f);
  for (const v of snap.publications) S.versions.set(`${v.model}:${v.version}`, v);
  for (const c of snap.clients) Object.assign(client(c.client), c);
  S.epsilon = snap.epsilon; S.delta = snap.delta; S.traffic = snap.traffic || [];
}

function apply(ev) {
  const d = ev.data;
  S.seq = Math.max(S.seq, ev.seq);
  switch (ev.kind) {
    case "run": Object.assign(S.run, d, { status: "running", started_at: ev.at }); break;
    case "status": S.run.status = d.status; S.run.ended = ev.at; break;
    case "round_started": S.round = d.round; S.stages = []; break;
    case "stage": S.stages.push({ stage: d.stage, tasks: d.tasks, ok: 0, failed: 0 }); break;
    case "client": {
      // a reply seen from the client; a failure may be the coordinator's own verdict
      Object.assign(client(d.client), { stage: d.stage, round: d.round, ok: d.ok }, d.ok ? { last_seen: ev.at } : {});
      // a secure round trains in its setup stage (recorded as training); its later stages
      // record only their dropouts
      const st = [...S.stages].reverse().find((x) => x.stage === d.stage)
        || (d.stage === "train" ? S.stages.find((x) => x.stage === "secagg-setup") : undefined);
      if (st) st[d.ok ? "ok" : "failed"] += 1;
      if (!d.ok) S.failures.set(fkey(d), { round: d.round, stage: d.stage, client: d.client, error: d.error || "unknown error" });
      break;
    }
    case "site":
      Object.assign(client(d.client), { site: d.site, connected: d.connected, reason: d.reason, since: ev.at }, d.connected ? { last_seen: ev.at } : {});
      break;
    case "privacy": S.epsilon = d.epsilon; S.delta = d.delta; break;
    case "round_ended": S.rounds.set(d.round, d); break;
    case "published": S.versions.set(`${d.model}:${d.version}`, d); break;
    case "traffic": S.traffic = d.models; break;
  }
}

// What each kind of event changes: a client's reply redraws its row and the stage bars,
// not the charts (a round's end does).
const PARTS = {
  client: ["overview", "clients", "secagg", "failures"],
  site: ["clients"],
  stage: ["overview", "secagg"],
  round_started: ["overview", "secagg"],
  privacy: ["overview"],
  published: ["versions"],
  traffic: ["traffic"],
};
// Replies are drawn at most every 250 ms (a round of many clients sends many); anything
// else (a round's end) within 30 ms.
const dirty = new Set();
let timer = null, due = Infinity;
function schedule(kind) {
  for (const part of PARTS[kind] || ["all"]) dirty.add(part);
  const at = performance.now() + (PARTS[kind] && kind !== "published" ? 250 : 30);
  if (timer !== null && due <= at) return;
  clearTimeout(timer);
  due = at;
  timer = setTimeout(() => {
    timer = null;
    due = Infinity;
    const parts = new Set(dirty);
    dirty.clear();
    render(parts.has("all") ? null : parts);
  }, Math.max(at - performance.now(), 0));
}

// ------------------------------------------------------------------ rendering

function render(parts) {
  const want = (part) => !parts || parts.has(part);
  if (want("overview")) renderOverview();
  if (want("charts")) {
    renderMetricChoice();
    renderRoundsChart();
    renderRoundChoice();
    renderClientsChart();
  }
  if (want("clients")) renderClients();
  if (want("secagg")) renderSecagg();
  if (want("versions")) renderVersions();
  if (want("traffic")) renderTraffic();
  if (want("failures")) renderFailures();
  // what the page shows so far, for scripts that watch it (the browser tests)
  document.body.dataset.rounds = String(committed());
  document.body.dataset.status = S.run.status || "unknown";
}

function committed() {
  return S.rounds.size ? Math.max(...S.rounds.keys()) : 0;
}

function renderOverview() {
  const status = S.run.status || "unknown";
  const badge = $("status");
  badge.textContent = S.live ? status : `${status} (from the run store)`;
  badge.className = `badge ${status}`;
  $("run-id").textContent = S.run.run_id || "run";
  document.title = `${S.run.run_id || "run"}: ${status} · fedlearn`;
  const total = S.run.rounds;
  const running = status === "running";
  const current = running ? Math.max(S.round, committed()) : committed();
  $("round").textContent = total ? `${current} of ${total}` : String(current);
  renderClock();
  const last = S.rounds.get(committed());
  $("last-round").textContent = last ? `${last.ok ? "ok" : "failed"}, ${fmt(last.duration_s)} s` : "–";
  $("privacy").hidden = S.epsilon === null || S.epsilon === undefined;
  $("epsilon").textContent = `${fmt(S.epsilon)}${S.delta ? ` at δ=${fmt(S.delta)}` : ""}`;
  const box = $("stages");
  box.replaceChildren(...(running ? S.stages.map(stageBar) : []));
  $("stream").textContent = S.stream;
}

function renderClock() {
  const start = S.run.started_at ?? S.run.created;
  const ended = S.run.status === "running" ? null : S.run.ended;
  $("elapsed").textContent = start ? dur((ended ?? (S.live ? now() : null) ?? start) - start) : "–";
  const total = S.run.rounds;
  const done = committed();
  const mine = [...S.rounds.values()].filter((r) => r.round >= (S.run.start_round || 1));
  const durations = (mine.length ? mine : [...S.rounds.values()]).map((r) => r.duration_s);
  if (S.run.status !== "running" || !total || !durations.length) {
    $("eta").textContent = S.run.status === "running" ? "–" : "done";
    return;
  }
  const mean = durations.reduce((a, b) => a + b, 0) / durations.length;
  $("eta").textContent = dur(mean * Math.max(total - done, 0));
}

function stageBar(st) {
  // widths through the CSSOM: the page's policy allows no inline style attributes
  const part = (cls, n) => {
    const el = h("span", { class: cls });
    el.style.width = `${st.tasks ? (100 * n) / st.tasks : 0}%`;
    return el;
  };
  const quiet = /^secagg-(keys|shares|unmask)$/.test(st.stage);  // dropouts only
  const text = quiet ? `${st.stage}: ${st.tasks} tasks, ${st.failed} dropped`
    : `${st.stage}: ${st.ok + st.failed} of ${st.tasks}${st.failed ? ` (${st.failed} failed)` : ""}`;
  return h("div", { class: "stage" },
    h("div", {}, text),
    h("div", { class: "bar", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": st.tasks,
      "aria-valuenow": st.ok + st.failed, "aria-label": st.stage },
      part("ok", st.ok), part("failed", st.failed)));
}

function metricNames() {
  const names = new Set();
  for (const r of S.rounds.values()) for (const n of Object.keys(r.metrics || {})) names.add(n);
  return [...names];
}

function renderMetricChoice() {
  const names = metricNames();
  const sel = $("metric");
  if (!S.metric || !names.includes(S.metric)) S.metric = names.includes("accuracy") ? "accuracy" : names[0] || null;
  if ([...sel.options].map((o) => o.value).join() !== names.join()) {
    sel.replaceChildren(...names.map((n) => h("option", { value: n }, n)));
  }
  if (S.metric) sel.value = S.metric;
}

function renderRoundChoice() {
  const sel = $("round-select");
  const rounds = [...S.rounds.keys()].filter((r) => (S.rounds.get(r).dots || []).length).sort((a, b) => a - b);
  const values = ["", ...rounds.map(String)];
  if ([...sel.options].map((o) => o.value).join() !== values.join()) {
    sel.replaceChildren(h("option", { value: "" }, "latest"), ...rounds.map((r) => h("option", { value: r }, `round ${r}`)));
  }
  sel.value = values.includes(S.selected) ? S.selected : "";
}

function frame(svg) {
  const w = Math.max(svg.clientWidth || 600, 200), hgt = Math.max(svg.clientHeight || 240, 120);
  svg.setAttribute("viewBox", `0 0 ${w} ${hgt}`);
  svg.replaceChildren();
  return { w, h: hgt, l: 48, r: 12, t: 12, b: 28 };
}

function scale(lo, hi, a, b) {
  if (hi === lo) { lo -= 0.5; hi += 0.5; }
  return (v) => a + ((v - lo) / (hi - lo)) * (b - a);
}

function ticks(lo, hi, n) {
  if (hi === lo) return [lo];
  const step = Math.pow(10, Math.floor(Math.log10((hi - lo) / n)));
  const nice = [1, 2, 5, 10].map((m) => m * step).find((st) => (hi - lo) / st <= n) || step * 10;
  const out = [];
  for (let v = Math.ceil(lo / nice) * nice; v <= hi + 1e-12; v += nice) out.push(+v.toPrecision(6));
  return out;
}

function axes(svg, f, x, y, xs, ys) {
  for (const v of ys) {
    svg.append(s("line", { class: "grid", x1: f.l, x2: f.w - f.r, y1: y(v), y2: y(v) }));
    svg.append(s("text", { x: f.l - 6, y: y(v) + 4, "text-anchor": "end" }, fmt(v)));
  }
  for (const v of xs) svg.append(s("text", { x: x(v), y: f.h - 8, "text-anchor": "middle" }, String(v)));
  svg.append(s("line", { class: "axis", x1: f.l, x2: f.w - f.r, y1: f.h - f.b, y2: f.h - f.b }));
  svg.append(s("line", { class: "axis", x1: f.l, x2: f.l, y1: f.t, y2: f.h - f.b }));
}

function renderRoundsChart() {
  const svg = $("rounds-chart");
  const f = frame(svg);
  const m = S.metric;
  const rows = [...S.rounds.values()].filter((r) => m && r.metrics && r.metrics[m]).sort((a, b) => a.round - b.round);
  if (!rows.length) { $("rounds-desc").textContent = "No round has been evaluated yet."; return; }
  const vals = rows.flatMap((r) => [r.metrics[m].p10, r.metrics[m].p90, r.metrics[m].mean, r.metrics[m].worst]);
  const lo = Math.min(...vals), hi = Math.max(...vals), pad = (hi - lo) * 0.05 || 0.01;
  const first = rows[0].round, last = rows[rows.length - 1].round;
  const x = scale(first - (first === last ? 1 : 0), last + (first === last ? 1 : 0), f.l + 8, f.w - f.r - 8);
  const y = scale(lo - pad, hi + pad, f.h - f.b, f.t);
  axes(svg, f, x, y, ticks(first, last, 10).filter(Number.isInteger), ticks(lo - pad, hi + pad, 5));
  const band = rows.map((r) => `${x(r.round)},${y(r.metrics[m].p90)}`)
    .concat([...rows].reverse().map((r) => `${x(r.round)},${y(r.metrics[m].p10)}`));
  svg.append(s("polygon", { class: "band", points: band.join(" ") }));
  const line = (key, cls) => svg.append(s("polyline", { class: cls, points: rows.map((r) => `${x(r.round)},${y(r.metrics[m][key])}`).join(" ") }));
  line("worst", "worst");
  line("mean", "mean");
  for (const r of rows) {
    const mm = r.metrics[m];
    const c = s("circle", { class: "pt", cx: x(r.round), cy: y(mm.mean), r: 3.5 });
    c.append(s("title", {}, `round ${r.round}: mean ${fmt(mm.mean)}, worst ${fmt(mm.worst)} (client ${mm.worst_client}), p10–p90 ${fmt(mm.p10)}–${fmt(mm.p90)}`));
    svg.append(c);
  }
  const l = rows[rows.length - 1].metrics[m];
  $("rounds-desc").textContent = `${m} over ${rows.length} rounds; round ${last}: weighted mean ${fmt(l.mean)}, worst ${fmt(l.worst)} (client ${l.worst_client}), p10–p90 ${fmt(l.p10)}–${fmt(l.p90)}.`;
}

function renderClientsChart() {
  const svg = $("clients-chart");
  const f = frame(svg);
  const m = S.metric;
  const withDots = [...S.rounds.values()].filter((r) => (r.dots || []).length);
  const rnd = S.selected ? S.rounds.get(+S.selected) : withDots.sort((a, b) => b.round - a.round)[0];
  if (!rnd || !m || !rnd.metrics || !rnd.metrics[m]) { $("dots-desc").textContent = "No evaluation yet."; return; }
  const dots = rnd.dots.filter((d) => d.values[m] !== null && d.values[m] !== undefined).sort((a, b) => a.client - b.client);
  const summary = rnd.metrics[m];
  const vals = dots.map((d) => d.values[m]);
  const lo = Math.min(...vals), hi = Math.max(...vals), pad = (hi - lo) * 0.08 || 0.01;
  const ids = dots.map((d) => d.client);
  const x = scale(Math.min(...ids) - 0.5, Math.max(...ids) + 0.5, f.l + 4, f.w - f.r - 4);
  const y = scale(lo - pad, hi + pad, f.h - f.b, f.t);
  const every = Math.max(1, Math.ceil(ids.length / 16));
  axes(svg, f, x, y, ids.filter((_, i) => i % every === 0), ticks(lo - pad, hi + pad, 5));
  svg.append(s("line", { class: "mean", x1: f.l, x2: f.w - f.r, y1: y(summary.mean), y2: y(summary.mean) }));
  for (const d of dots) {
    const worst = d.client === summary.worst_client;
    const c = s("circle", { class: worst ? "worst-pt" : "pt", cx: x(d.client), cy: y(d.values[m]), r: worst ? 7 : 4.5, "data-client": d.client });
    c.append(s("title", {}, `client ${d.client}: ${m} ${fmt(d.values[m])} (${d.num_examples} examples)${worst ? ", the worst" : ""}`));
    svg.append(c);
    if (worst) {
      const right = x(d.client) > f.w / 2;
      svg.append(s("text", { class: "label", x: x(d.client) + (right ? -10 : 10), y: y(d.values[m]) - 8, "text-anchor": right ? "end" : "start" }, `worst: client ${d.client}`));
    }
  }
  $("dots-desc").textContent = `round ${rnd.round}, ${m} of ${dots.length} clients: worst client ${summary.worst_client} (${fmt(summary.worst)}), weighted mean ${fmt(summary.mean)} (the line).`;
}

function failuresByClient() {
  const out = new Map();
  for (const f of S.failures.values()) {
    const list = out.get(f.client) || [];
    list.push(f);
    out.set(f.client, list);
  }
  return out;
}

function renderClients() {
  const fails = failuresByClient();
  const rows = [...S.clients.values()].sort((a, b) => a.client - b.client).map((c) => {
    const list = (fails.get(c.client) || []).sort((a, b) => a.round - b.round);
    const lastFail = list[list.length - 1];
    const conn = c.connected === true ? h("span", { class: "conn-yes" }, "connected")
      : c.connected === false ? h("span", { class: "conn-no" }, `disconnected${c.reason ? ` (${c.reason})` : ""}`)
        : h("span", { class: "muted" }, S.live ? "in process" : "–");
    const seen = c.last_seen ? `${dur(now() - c.last_seen)} ago` : "–";
    const stage = c.stage ? `${c.stage} r${c.round}${c.ok === false ? " (failed)" : ""}` : "–";
    return h("tr", { "data-client": c.client },
      h("th", { scope: "row" }, String(c.client)), h("td", {}, c.site || "–"), h("td", {}, conn),
      h("td", { class: "seen", "data-at": c.last_seen || "" }, seen), h("td", {}, stage),
      h("td", {}, String(list.length)),
      h("td", { class: "reason" }, lastFail ? `round ${lastFail.round} ${lastFail.stage}: ${lastFail.error}` : ""));
  });
  $("clients-table").tBodies[0].replaceChildren(...rows);
}

function renderSecagg() {
  const secure = S.stages.filter((st) => st.stage.startsWith("secagg-"));
  const drops = [...S.failures.values()].filter((f) => f.stage.startsWith("secagg-"));
  $("secagg").hidden = !secure.length && !drops.length;
  $("secagg-stages").replaceChildren(...secure.map(stageBar));
  const byRound = new Map();
  for (const f of drops) byRound.set(f.round, [...(byRound.get(f.round) || []), `${f.client} (${f.stage})`]);
  const text = [...byRound.entries()].sort((a, b) => b[0] - a[0]).slice(0, 5)
    .map(([r, cs]) => `round ${r}: ${cs.join(", ")}`).join("; ");
  $("dropouts").textContent = drops.length ? `Dropouts: ${text}` : "No dropouts.";
}

function renderVersions() {
  const rows = [...S.versions.values()].sort((a, b) => b.round - a.round || b.version - a.version).map((v) =>
    h("tr", { "data-version": `${v.model}:${v.version}` },
      h("td", {}, v.model), h("th", { scope: "row" }, `v${v.version}`), h("td", {}, String(v.round)),
      h("td", {}, h("span", { class: v.promoted ? "promoted" : "held" }, v.promoted ? "promoted" : "not promoted")),
      h("td", {}, v.reason)));
  $("versions-table").tBodies[0].replaceChildren(...rows);
  $("no-versions").hidden = rows.length > 0;
}

const pct = (x) => `${+(100 * x).toFixed(1)}%`;
function policyView(p) {
  if (!p) return h("p", { class: "policy" }, "No traffic policy: production answers every request.");
  let parts = [];
  if (p.kind === "split") parts = Object.entries(p.shares).map(([v, sh]) => [`v${v}`, sh]);
  else if (p.kind === "canary") parts = [[`v${p.baseline}`, 1 - p.share], [`v${p.candidate} (canary)`, p.share]];
  const bar = parts.length ? h("div", { class: "split", role: "img", "aria-label": p.describe },
    ...parts.map(([label, sh], i) => {
      const el = h("span", { class: `share s${i % 4}`, title: `${label} ${pct(sh)}` }, `${label} ${pct(sh)}`);
      el.style.flex = `${Math.max(sh, 0.0001)} 1 0`;  // CSSOM: the page's CSP forbids style attributes
      return el;
    })) : "";
  return h("div", { class: "policy", "data-kind": p.kind }, h("p", {}, `Policy: ${p.describe}`), bar);
}
function servedView(m) {
  if (!("served" in m)) return "";  // no endpoint given
  const c = m.served;
  if (!c) return h("p", { class: "served muted" }, "Endpoint: not answering (or no request for this model yet).");
  const by = Object.entries(c.versions).sort((a, b) => +a[0] - +b[0]).map(([v, n]) => `v${v} ${n}`).join(", ");
  return h("p", { class: "served" },
    `Endpoint: ${c.ok} answered, ${c.error} failed` + (by ? `; under the policy, by answering version: ${by}` : ""));
}
function renderTraffic() {
  const cards = S.traffic.map((m) => {
    const aliases = Object.entries(m.aliases).map(([a, v]) => `${a} → v${v}`).join(", ");
    const rows = m.decisions.map((d) => h("tr", {},
      h("td", {}, new Date(d.time * 1000).toLocaleTimeString()), h("td", {}, d.action),
      h("th", { scope: "row" }, `v${d.version}`), h("td", {}, d.reason)));
    const table = h("div", { class: "scroll", tabindex: "0", role: "region", "aria-label": `decisions of ${m.model}` },
      h("table", { class: "decisions" },
        h("thead", {}, h("tr", {}, ...["When", "Decision", "Version", "Why"].map((t) => h("th", { scope: "col" }, t)))),
        h("tbody", {}, ...rows)));
    return h("article", { class: "model", "data-model": m.model },
      h("h3", {}, m.model, " ", h("span", { class: "production" }, m.production ? `production v${m.production}` : "no production")),
      h("p", { class: "muted" }, `Aliases: ${aliases || "none"}`), policyView(m.policy), servedView(m), table);
  });
  $("traffic-models").replaceChildren(...cards);
  $("no-traffic").hidden = cards.length > 0;
}

function renderFailures() {
  const list = [...S.failures.values()].sort((a, b) => b.round - a.round || a.client - b.client).slice(0, 200);
  $("failures-list").replaceChildren(...list.map((f) => h("li", {}, `round ${f.round}, client ${f.client}, ${f.stage}: ${f.error}`)));
  $("no-failures").hidden = list.length > 0;
}

// ------------------------------------------------------------------ wiring

function listen() {
  const es = new EventSource(`/api/events?after=${S.seq}`);
  es.onmessage = (msg) => { const ev = JSON.parse(msg.data); apply(ev); S.stream = "live"; schedule(ev.kind); };
  es.addEventListener("end", () => { es.close(); S.stream = "the run's process has stopped sending events"; schedule("all"); });
  es.onerror = () => { S.stream = "connection lost; reconnecting…"; schedule("all"); };
  es.onopen = () => { S.stream = "live"; schedule("overview"); };
}

async function start() {
  $("metric").addEventListener("change", (e) => { S.metric = e.target.value; render(); });
  $("round-select").addEventListener("change", (e) => { S.selected = e.target.value; render(); });
  window.addEventListener("resize", () => schedule("all"));
  try {
    const res = await fetch("/api/snapshot", { cache: "no-store" });
    load(await res.json());
  } catch (err) {
    $("status").textContent = `cannot load the run: ${err}`;
    return;
  }
  render();
  if (S.live) listen();
  else setInterval(async () => {  // a finished run's page: its registry may still change
    try {
      const res = await fetch("/api/traffic", { cache: "no-store" });
      S.traffic = (await res.json()).models; schedule("traffic");
    } catch (err) { /* the page's server has stopped */ }
  }, 2000);
  setInterval(() => {
    renderClock();
    for (const td of document.querySelectorAll("td.seen[data-at]")) {
      const at = +td.dataset.at;
      if (at) td.textContent = `${dur(now() - at)} ago`;
    }
  }, 1000);
}

start();
