// The Lingua fleet dashboard. It reads the admin API only: the fleet
// arrives as server-sent events from /v1/fleet/events (read with fetch, so
// the token travels in the Authorization header, never in a URL), drains go
// to POST /v1/nodes/{id}/drain, lookups to GET /v1/jobs/{id}. The token is
// kept in sessionStorage: this tab only.
"use strict";

const TOKEN_KEY = "lingua-admin-token";
const RECONNECT_MS = 2000;
const CONFIRM_MS = 5000;
const NOTICE_MS = 10000;
let lastEvent = 0;
let pendingDrain = null;
let pendingSince = 0;
let noticeTimer = null;

const $ = (id) => document.getElementById(id);

// An element with attributes and children (strings become text: nothing
// the API returns is ever parsed as HTML).
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "style") node.style.cssText = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

function headers() {
  const t = token();
  return t ? { Authorization: "Bearer " + t } : {};
}

function setStatus(state, text) {
  const status = $("status");
  status.dataset.state = state;
  status.textContent = text;
}

// A message that stays (drain results) until replaced or timed out.
function notify(text, bad) {
  const notice = $("notice");
  notice.textContent = text;
  notice.className = bad ? "notice bad" : "notice";
  notice.hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => { notice.hidden = true; }, NOTICE_MS);
}

function showLogin(message) {
  $("fleet").hidden = true;
  $("login").hidden = false;
  $("logout").hidden = true;
  $("login-error").textContent = message || "";
  setStatus("signed-out", "signed out");
  $("token").focus();
}

async function apiError(response) {
  try {
    const body = await response.json();
    return body.error && body.error.message ? body.error.message : response.statusText;
  } catch (_) {
    return response.status + " " + response.statusText;
  }
}

// Reads the event stream until it ends; resolves with why it ended.
async function follow() {
  let response;
  try {
    response = await fetch("/v1/fleet/events", { headers: headers(), cache: "no-store" });
  } catch (err) {
    return "the coordinator cannot be reached";
  }
  if (response.status === 401 || response.status === 403) {
    const tried = token() !== null;
    sessionStorage.removeItem(TOKEN_KEY);
    return { login: tried ? "That token was refused: " + (await apiError(response)) : "" };
  }
  if (!response.ok) return await apiError(response);
  $("login").hidden = true;
  $("fleet").hidden = false;
  $("logout").hidden = !token();
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (err) {
      return "the connection was lost";
    }
    if (chunk.done) return "the coordinator closed the stream";
    buffer += decoder.decode(chunk.value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (!data) continue;
      try {
        onEvent(JSON.parse(data));
      } catch (err) {
        console.error("cannot show an event", err);
        setStatus("degraded", "cannot show an update: " + err.message);
      }
    }
  }
}

async function connect() {
  for (;;) {
    setStatus("connecting", "connecting");
    let ended;
    try {
      ended = await follow();
    } catch (err) {
      ended = "the stream failed (" + err.message + ")";
    }
    if (ended.login !== undefined) {
      showLogin(ended.login);
      return;
    }
    setStatus("offline", ended + "; retrying");
    await new Promise((resolve) => setTimeout(resolve, RECONNECT_MS));
  }
}

function onEvent(event) {
  lastEvent = Date.now();
  if (event.error) {
    setStatus("degraded", "the coordinator says: " + event.error.message);
    return;
  }
  setStatus("live", "live");
  render(event);
}

function ago(ms) {
  const seconds = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (seconds < 60) return seconds + " s ago";
  if (seconds < 3600) return Math.round(seconds / 60) + " min ago";
  return Math.round(seconds / 3600) + " h ago";
}

function gib(mb) {
  return (mb / 1024).toFixed(mb >= 10240 ? 0 : 1) + " GiB";
}

function bar(used, total, label) {
  const share = total > 0 ? Math.min(1, used / total) : 0;
  const level = share > 0.9 ? "high" : share > 0.7 ? "mid" : "low";
  return el(
    "div",
    { class: "bar", title: label, role: "meter", "aria-valuenow": Math.round(share * 100),
      "aria-valuemin": 0, "aria-valuemax": 100, "aria-label": label },
    el("span", { class: "fill " + level, style: "width:" + (share * 100).toFixed(1) + "%" }),
    el("span", { class: "text" }, label),
  );
}

// "key n, key n"; without `all`, only the non-zero ones.
function counts(map, all) {
  const entries = Object.entries(map || {}).filter(([, n]) => all || n > 0);
  if (entries.length === 0) return "none";
  return entries.map(([key, n]) => key + " " + n).join(", ");
}

// A summary card; `level` is "", "warn" or "alarm".
function card(title, value, detail, level) {
  return el("div", { class: "card " + (level || "") },
    el("h3", {}, title), el("div", { class: "value" }, value), el("div", { class: "detail" }, detail));
}

function render(fleet) {
  const jobs = fleet.jobs;
  const n = fleet.nodes_by_state;
  const g = fleet.gpus;
  const failed = Object.values(jobs.failed).reduce((a, b) => a + b, 0);
  const shed = Object.values(jobs.shed).reduce((a, b) => a + b, 0);
  const refused = Object.values(jobs.refused).reduce((a, b) => a + b, 0);
  const starved = fleet.pairs.filter((p) => p.no_capacity).length;
  const latency = jobs.p50_ms === null ? "no jobs" :
    "p50 ≤ " + jobs.p50_ms + " ms · p99 ≤ " + jobs.p99_ms + " ms";
  $("summary").replaceChildren(
    card("Nodes", n.ready + " ready", n.draining + " draining · " + n.offline + " offline",
      n.ready === 0 ? "alarm" : n.offline > 0 ? "warn" : ""),
    card("GPUs", String(g.total), g.unhealthy + " unhealthy" +
      (g.problem_nodes > 0 ? " · " + g.problem_nodes + " nodes with a GPU problem" : ""),
      g.unhealthy > 0 || g.problem_nodes > 0 ? "alarm" : ""),
    el("div", { class: "card" }, el("h3", {}, "VRAM"),
      bar(g.memory_used_mb, g.memory_total_mb, gib(g.memory_used_mb) + " / " + gib(g.memory_total_mb))),
    card("Jobs/s", jobs.jobs_per_second.toFixed(1), latency),
    card("Pairs without room", String(starved), fleet.pairs.length + " pairs", starved > 0 ? "alarm" : ""),
    card("Queued", String(jobs.queued), "shed in " + jobs.window_seconds + " s: " + shed + " (" + counts(jobs.shed) + ")",
      shed > 0 ? "warn" : ""),
    card("Failed in " + jobs.window_seconds + " s", String(failed), counts(jobs.failed), failed > 0 ? "alarm" : ""),
    card("Refusals in " + jobs.window_seconds + " s", String(refused), counts(jobs.refused)),
    card("Coordinators", String(fleet.coordinators), "updated " + new Date(fleet.at_ms).toLocaleTimeString()),
  );
  renderPairs(fleet.pairs);
  renderNodes(fleet.nodes);
  renderFailures(jobs.recent_failures);
}

function renderPairs(pairs) {
  const rows = pairs.map((p) =>
    el("tr", { "data-pair": p.pair, class: p.no_capacity ? "alarm" : "" },
      el("td", {}, p.pair),
      el("td", {}, p.pools.map((pool) => "pool " + pool.pool + ": " + (pool.nodes.join(", ") || "empty")).join("; ")),
      el("td", {}, String(p.ready_nodes)),
      el("td", {}, p.no_capacity ? "no capacity" : counts(p.free_slots, true))));
  if (rows.length === 0) rows.push(el("tr", {}, el("td", { colspan: 4 }, "No pools yet: no node has registered.")));
  $("pairs").tBodies[0].replaceChildren(...rows);
}

function gpuCell(node) {
  const readings = (node.capacity && node.capacity.gpus) || [];
  const names = Object.fromEntries((node.gpus || []).map((g) => [g.uuid, g.name]));
  if (node.state === "offline") return "";
  if (readings.length === 0) {
    return node.capacity && node.capacity.gpu_problem ? el("span", { class: "bad" }, node.capacity.gpu_problem) : "none";
  }
  return el("div", { class: "gpus" }, readings.map((r) => {
    const facts = [];
    if (r.utilization_pct !== undefined) facts.push(r.utilization_pct + "% util");
    if (r.temperature_c !== undefined) facts.push(r.temperature_c + " °C");
    facts.push(r.healthy ? "healthy" : "unhealthy" + (r.reason ? ": " + r.reason : ""));
    return el("div", { class: "gpu" + (r.healthy ? "" : " bad"), "data-gpu": r.uuid, title: names[r.uuid] || r.uuid },
      bar(r.memory_used_mb, r.memory_total_mb, gib(r.memory_used_mb) + " / " + gib(r.memory_total_mb)),
      el("span", { class: "facts" }, facts.join(" · ")));
  }));
}

function drainButton(node) {
  if (node.state !== "ready") return "";
  const confirming = pendingDrain === node.id && Date.now() - pendingSince < CONFIRM_MS;
  return el("button", { type: "button", class: confirming ? "danger" : "", "data-drain": node.id },
    confirming ? "Confirm drain" : "Drain");
}

function renderNodes(nodes) {
  const rows = nodes.map((node) => {
    const live = node.state !== "offline" && node.capacity;
    const free = live && node.state === "ready" ? counts(node.capacity.free_slots, true) : "";
    const running = live && node.capacity.running !== undefined ? String(node.capacity.running) : "";
    return el("tr", { "data-node": node.id, "data-state": node.state },
      el("td", {}, node.id),
      el("td", {}, el("span", { class: "badge " + node.state }, node.state)),
      el("td", {}, Object.keys(node.pools).join(", ") || (node.src_langs.join(",") + " → " + node.tgt_langs.join(","))),
      el("td", {}, free),
      el("td", { class: "number" }, running),
      el("td", {}, gpuCell(node)),
      el("td", {}, node.agent_version),
      el("td", { title: new Date(node.last_seen_ms).toISOString() }, ago(node.last_seen_ms)),
      el("td", {}, drainButton(node)));
  });
  if (rows.length === 0) rows.push(el("tr", {}, el("td", { colspan: 9 }, "No node has registered.")));
  $("nodes").tBodies[0].replaceChildren(...rows);
}

function renderFailures(failures) {
  const rows = failures.map((f) =>
    el("tr", { "data-job": f.id },
      el("td", { title: new Date(f.at_ms).toISOString() }, ago(f.at_ms)),
      el("td", {}, f.id), el("td", {}, f.pair), el("td", {}, f.kind),
      el("td", {}, el("code", {}, f.code), " ", f.message),
      el("td", {}, f.node_id || "")));
  if (rows.length === 0) rows.push(el("tr", {}, el("td", { colspan: 6 }, "None recently.")));
  $("failures").tBodies[0].replaceChildren(...rows);
}

async function drain(id) {
  try {
    const response = await fetch("/v1/nodes/" + encodeURIComponent(id) + "/drain", { method: "POST", headers: headers() });
    if (response.ok) notify(id + " is draining: it gets no new jobs; stop its agent once it runs none.", false);
    else notify("Drain of " + id + " failed: " + (await apiError(response)), true);
  } catch (err) {
    notify("Drain of " + id + " failed: the coordinator cannot be reached.", true);
  }
}

// A failed job answers with its error's status and its view: show it.
async function lookUp(id) {
  let response;
  try {
    response = await fetch("/v1/jobs/" + encodeURIComponent(id), { headers: headers() });
  } catch (err) {
    $("job").textContent = "The coordinator cannot be reached.";
    return;
  }
  let body = null;
  try {
    body = await response.json();
  } catch (_) {}
  let text;
  if (body && body.status) text = JSON.stringify(body, null, 2);
  else if (response.status === 404) text = "No job " + id + " (results are kept for result_ttl).";
  else text = body && body.error ? body.error.message : response.status + " " + response.statusText;
  $("job").textContent = text;
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    connect();
  });
  $("logout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    location.reload();
  });
  $("nodes").addEventListener("click", (event) => {
    const button = event.target.closest("button[data-drain]");
    if (!button) return;
    const id = button.dataset.drain;
    if (pendingDrain === id && Date.now() - pendingSince < CONFIRM_MS) {
      pendingDrain = null;
      button.disabled = true;
      drain(id);
    } else {
      pendingDrain = id;
      pendingSince = Date.now();
      button.textContent = "Confirm drain";
      button.className = "danger";
    }
  });
  $("job-form").addEventListener("submit", (event) => {
    event.preventDefault();
    lookUp($("job-id").value.trim());
  });
  setInterval(() => {
    if (lastEvent && Date.now() - lastEvent > 5000) setStatus("offline", "no update for " + ago(lastEvent).replace(" ago", ""));
  }, 1000);
  connect();
});
