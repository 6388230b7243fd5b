// Ciliate observe UI: plain JS, no build step. Every API call carries the bearer token, which
// comes from the page's #token= fragment (then dropped from the address bar) or the login field.
"use strict";

const MAX_ROWS = 500;
const state = { token: "", flowsAbort: null, procAbort: null, mapTimer: null, flows: 0, drops: 0 };

function $(sel) { return document.querySelector(sel); }

function takeTokenFromFragment() {
  const m = /(?:^|[#&])token=([^&]+)/.exec(window.location.hash);
  if (m) {
    sessionStorage.setItem("ciliate-token", decodeURIComponent(m[1]));
    history.replaceState(null, "", window.location.pathname + window.location.search);
  }
  return sessionStorage.getItem("ciliate-token") || "";
}

function headers(extra) {
  return Object.assign({ Authorization: "Bearer " + state.token }, extra || {});
}

function setConnected(ok, text) {
  const el = $("#conn");
  el.textContent = text || (ok ? "connected" : "disconnected");
  el.className = ok ? "conn-on" : "conn-off";
}

// Hubble FlowFilter JSON from the filter bar; pod/namespace match either side, as --pod does.
function whitelist() {
  const base = {};
  const verdict = $("#f-verdict").value;
  const port = $("#f-port").value.trim();
  const ns = $("#f-namespace").value.trim();
  let pod = $("#f-pod").value.trim();
  if (verdict) base.verdict = [verdict];
  if (port) base.destination_port = [port];
  if (!pod && ns) pod = ns + "/";
  else if (pod && ns && pod.indexOf("/") < 0) pod = ns + "/" + pod;
  if (pod) {
    return [Object.assign({ source_pod: [pod] }, base),
            Object.assign({ destination_pod: [pod] }, base)];
  }
  return Object.keys(base).length ? [base] : [];
}

function query(params) {
  const q = new URLSearchParams(params);
  const white = whitelist();
  if (white.length) q.set("whitelist", JSON.stringify(white));
  return q.toString();
}

// Server-sent events read through fetch, so the Authorization header can be sent.
async function stream(path, onItem, signal) {
  const resp = await fetch(path, { headers: headers({ Accept: "text/event-stream" }), signal });
  if (!resp.ok) throw new Error(path + ": HTTP " + resp.status);
  setConnected(true);
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (line.startsWith("data: ")) onItem(JSON.parse(line.slice(6)));
      }
    }
  }
}

function endpointText(ep, ip, port) {
  let host = ip || "";
  if (ep && ep.pod_name) host = (ep.namespace ? ep.namespace + "/" : "") + ep.pod_name;
  return port ? host + ":" + port : host;
}

function ports(flow) {
  const l4 = flow.l4 || {};
  const body = l4.TCP || l4.UDP || l4.SCTP || {};
  return [body.source_port, body.destination_port];
}

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text == null ? "" : String(text);
  if (cls) td.className = cls;
  tr.appendChild(td);
}

function addFlowRow(resp) {
  const tbody = $("#flows-table tbody");
  const tr = document.createElement("tr");
  if (resp.lost_events) {
    tr.className = "lost";
    cell(tr, resp.time || "");
    cell(tr, resp.node_name || "");
    cell(tr, "EVENTS LOST: " + resp.lost_events.source);
    cell(tr, resp.lost_events.num_events_lost || "0");
  } else {
    const f = resp.flow || {};
    const [sp, dp] = ports(f);
    const ip = f.IP || {};
    const verdict = f.verdict || "VERDICT_UNKNOWN";
    tr.className = "verdict-" + verdict;
    tr.dataset.verdict = verdict;
    tr.dataset.uuid = f.uuid || "";
    cell(tr, f.time || "");
    cell(tr, f.node_name || "");
    cell(tr, endpointText(f.source, ip.source, sp), "src");
    cell(tr, endpointText(f.destination, ip.destination, dp), "dst");
    cell(tr, f.drop_reason_desc || (f.event_type ? "type " + f.event_type.type : ""));
    cell(tr, verdict, "verdict");
    cell(tr, f.Summary || "");
    state.flows += 1;
    if (verdict === "DROPPED") state.drops += 1;
  }
  tbody.insertBefore(tr, tbody.firstChild);
  while (tbody.rows.length > MAX_ROWS) tbody.deleteRow(tbody.rows.length - 1);
  $("#counts").textContent = state.flows + " flows, " + state.drops + " dropped";
  scheduleMap(300);
}

function addProcessRow(ev) {
  const tbody = $("#process-table tbody");
  const tr = document.createElement("tr");
  const kind = Object.keys(ev).find((k) => k.startsWith("process_")) || "";
  const body = ev[kind] || {};
  const proc = body.process || {};
  const pod = proc.pod ? proc.pod.namespace + "/" + proc.pod.name : "";
  tr.dataset.kind = kind || "lost";
  cell(tr, ev.time || "");
  cell(tr, ev.node_name || "");
  cell(tr, kind || (ev.rate_limit_info ? "lost " +
       ev.rate_limit_info.number_of_dropped_process_events : ""));
  cell(tr, pod);
  cell(tr, proc.binary || "");
  cell(tr, proc.arguments || "");
  tbody.insertBefore(tr, tbody.firstChild);
  while (tbody.rows.length > MAX_ROWS) tbody.deleteRow(tbody.rows.length - 1);
}

const SVG = "http://www.w3.org/2000/svg";

function svgEl(name, attrs, parent) {
  const el = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (parent) parent.appendChild(el);
  return el;
}

// Namespaces as columns, workloads stacked in them; edges coloured by verdict.
function drawMap(map) {
  const svg = $("#map-svg");
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const defs = svgEl("defs", {}, svg);
  for (const [id, colour] of [["arrow-DROPPED", "#d62728"], ["arrow-FORWARDED", "#2ca02c"],
                              ["arrow-other", "#888"]]) {
    const marker = svgEl("marker", { id, viewBox: "0 0 10 10", refX: "22", refY: "5",
      markerWidth: "8", markerHeight: "8", orient: "auto-start-reverse" }, defs);
    svgEl("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: colour }, marker);
  }
  const columns = new Map();
  for (const n of map.nodes) {
    const col = n.kind === "workload" ? n.namespace : "(outside)";
    if (!columns.has(col)) columns.set(col, []);
    columns.get(col).push(n);
  }
  const names = Array.from(columns.keys()).sort();
  const pos = new Map();
  let height = 120;
  names.forEach((col, i) => {
    const x = 40 + i * 230;
    const members = columns.get(col);
    const h = 50 + members.length * 70;
    height = Math.max(height, h + 40);
    svgEl("rect", { x: x, y: 20, width: 180, height: h, rx: 8, class: "ns-box" }, svg);
    const label = svgEl("text", { x: x + 10, y: 38, class: "ns-label" }, svg);
    label.textContent = col;
    members.forEach((n, j) => pos.set(n.id, { x: x + 40, y: 75 + j * 70 }));
  });
  const edgeLayer = svgEl("g", { class: "edges" }, svg);
  for (const e of map.edges) {
    const a = pos.get(e.source), b = pos.get(e.destination);
    if (!a || !b) continue;
    const kind = e.verdict === "DROPPED" || e.verdict === "FORWARDED" ? e.verdict : "other";
    const line = svgEl("line", { x1: a.x, y1: a.y, x2: b.x, y2: b.y,
      class: "edge verdict-" + kind, "marker-end": "url(#arrow-" + kind + ")" }, edgeLayer);
    line.dataset.source = e.source;
    line.dataset.destination = e.destination;
    line.dataset.verdict = e.verdict;
    const title = svgEl("title", {}, line);
    title.textContent = e.source + " → " + e.destination + " " + JSON.stringify(e.verdicts) +
      " " + e.ports.join(", ");
  }
  for (const n of map.nodes) {
    const p = pos.get(n.id);
    const g = svgEl("g", { class: "node " + n.kind }, svg);
    g.dataset.id = n.id;
    svgEl("circle", { cx: p.x, cy: p.y, r: 14 }, g);
    const t = svgEl("text", { x: p.x + 20, y: p.y + 4 }, g);
    t.textContent = n.name;
  }
  svg.setAttribute("width", Math.max(600, 60 + names.length * 230));
  svg.setAttribute("height", height);
}

async function refreshMap() {
  state.mapTimer = null;
  if (!state.token) return;
  try {
    const resp = await fetch("/v1/servicemap?" + query({ last: "5000" }), { headers: headers() });
    if (!resp.ok) throw new Error("servicemap: HTTP " + resp.status);
    drawMap(await resp.json());
  } catch (err) {
    setConnected(false, String(err.message || err));
  }
}

function scheduleMap(delay) {
  if (state.mapTimer === null) state.mapTimer = setTimeout(refreshMap, delay);
}

function startFlows() {
  if (state.flowsAbort) state.flowsAbort.abort();
  state.flowsAbort = new AbortController();
  $("#flows-table tbody").textContent = "";
  state.flows = 0;
  state.drops = 0;
  stream("/v1/flows?" + query({ follow: "true", last: "100" }), addFlowRow,
         state.flowsAbort.signal)
    .catch((err) => { if (err.name !== "AbortError") setConnected(false, String(err.message)); });
  scheduleMap(0);
}

function startProcess() {
  if (state.procAbort) state.procAbort.abort();
  state.procAbort = new AbortController();
  $("#process-table tbody").textContent = "";
  stream("/v1/events?follow=true&last=100", addProcessRow, state.procAbort.signal)
    .catch((err) => { if (err.name !== "AbortError") setConnected(false, String(err.message)); });
}

function connect() {
  if (!state.token) { setConnected(false, "token needed"); return; }
  startFlows();
  startProcess();
}

document.addEventListener("DOMContentLoaded", () => {
  state.token = takeTokenFromFragment();
  $("#token").value = state.token;
  $("#login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.token = $("#token").value.trim();
    sessionStorage.setItem("ciliate-token", state.token);
    connect();
  });
  $("#apply").addEventListener("click", startFlows);
  for (const btn of document.querySelectorAll("#tabs button")) {
    btn.addEventListener("click", () => {
      for (const b of document.querySelectorAll("#tabs button")) b.classList.remove("active");
      for (const t of document.querySelectorAll(".tab")) t.classList.remove("active");
      btn.classList.add("active");
      $("#tab-" + btn.dataset.tab).classList.add("active");
    });
  }
  setInterval(() => scheduleMap(0), 5000);
  connect();
});
