// Mesher's live page: one project's unresolved count, issues and events, as they happen.
// Everything that comes from events is untrusted and is only ever set as text.
"use strict";

const EVENTS_KEPT = 500;
const ISSUES_LOADED = 100;
const RATE_WINDOW_S = 60;
const BACKOFF_FIRST_MS = 500;
const BACKOFF_LAST_MS = 10000;
const STORAGE = { project: "mesher.project", key: "mesher.key" };

const $ = (id) => document.getElementById(id);
const view = {
  login: $("login"), dashboard: $("dashboard"), forget: $("forget"), name: $("project-name"),
  connection: $("connection"), notice: $("notice"), count: $("count"), issues: $("issues"),
  events: $("events"), level: $("filter-level"), environment: $("filter-environment"),
  filtersState: $("filters-state"), rate: $("rate"), rateNow: $("rate-now"),
};

// What the page knows: kept across reconnects so that a resume can pick up where it left.
const state = {
  project: null, key: null, socket: null, epoch: null, offset: 0, backoffMs: BACKOFF_FIRST_MS,
  resuming: false, reconnected: false, connectedBefore: false, issuesDue: false,
  issues: new Map(), reconnectTimer: null, filtersSentAt: null,
  perSecond: new Array(RATE_WINDOW_S).fill(0), second: Math.floor(Date.now() / 1000),
};
// Read by tests and by anyone curious: how long the last filter change took to apply.
window.mesherStats = { filterLatencyMs: null, eventsShown: 0, resumes: [] };

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function credentials() {
  const fragment = new URLSearchParams(location.hash.slice(1));
  const project = fragment.get("project");
  const key = fragment.get("key");
  if (project && key) {
    localStorage.setItem(STORAGE.project, project);
    localStorage.setItem(STORAGE.key, key);
    // The key stays out of the address bar (and of screenshots and history) once stored.
    history.replaceState(null, "", location.pathname + location.search);
    return { project, key };
  }
  const stored = { project: localStorage.getItem(STORAGE.project), key: localStorage.getItem(STORAGE.key) };
  return stored.project && stored.key ? stored : null;
}

function api(method, path) {
  return fetch(path, { method, headers: { Authorization: "Bearer " + state.key } }).then((response) => {
    if (!response.ok) throw new Error(method + " " + path + ": " + response.status);
    return response.json();
  });
}

function setConnection(name, text) {
  view.connection.dataset.state = name;
  view.connection.textContent = text;
}

function notice(text) {
  view.notice.hidden = !text;
  view.notice.textContent = text || "";
}

// ---- issues ----

function loadIssues() {
  const path = "/api/v1/projects/" + encodeURIComponent(state.project) + "/issues?limit=" + ISSUES_LOADED;
  return api("GET", path).then((page) => {
    state.issues.clear();
    for (const issue of page.data) state.issues.set(issue.id, issue);
    renderIssues();
  }).catch((error) => notice("Could not load the issues: " + error.message));
}

function setStatus(issueId, action) {
  api("POST", "/api/v1/issues/" + encodeURIComponent(issueId) + "/" + action)
    .catch((error) => notice("Could not " + action + " the issue: " + error.message));
}

// Many messages may arrive between two frames: the list is rebuilt at most once per frame.
function scheduleIssues() {
  if (state.issuesDue) return;
  state.issuesDue = true;
  requestAnimationFrame(() => { state.issuesDue = false; renderIssues(); });
}

function renderIssues() {
  const issues = [...state.issues.values()].sort((a, b) => (a.last_seen < b.last_seen ? 1 : -1));
  // The most recent ones are shown; older issues are left to the API (a burst of new issues
  // must not make every frame rebuild thousands of rows).
  for (const stale of issues.splice(ISSUES_LOADED)) state.issues.delete(stale.id);
  const rows = issues.map((issue) => {
    const row = el("li", "status-" + issue.status);
    row.dataset.issueId = issue.id;
    row.append(el("div", "title", issue.title));
    const meta = el("div", "meta");
    meta.append(el("span", "level level-" + issue.level, issue.level), el("span", "status", issue.status),
      el("span", "event-count", issue.event_count + (issue.event_count === 1 ? " event" : " events")),
      el("span", "last-seen", "last seen " + new Date(issue.last_seen).toLocaleTimeString()));
    row.append(meta);
    const actions = el("div", "actions");
    const choices = issue.status === "unresolved" ? ["resolve", "archive", "discard"] : ["unresolve", "discard"];
    for (const action of choices) {
      if (action === "discard" && issue.status === "discarded") continue;
      const button = el("button", "action-" + action, action);
      button.type = "button";
      button.addEventListener("click", () => setStatus(issue.id, action));
      actions.append(button);
    }
    row.append(actions);
    return row;
  });
  view.issues.replaceChildren(...rows);
}

// ---- events ----

function eventMessage(data) {
  const entry = data.logentry;
  if (entry && (entry.formatted || entry.message)) return entry.formatted || entry.message;
  if (typeof data.message === "string" && data.message) return data.message;
  if (data.message && typeof data.message === "object") return data.message.formatted || data.message.message || "";
  const exception = mainException(data);
  if (exception) return [exception.type_name || exception.type, exception.value].filter(Boolean).join(": ");
  return "(no message)";
}

function mainException(data) {
  const exception = data.exception;
  if (!exception) return null;
  const values = Array.isArray(exception) ? exception : exception.values;
  return Array.isArray(values) ? values[values.length - 1] : exception;
}

function stackTrace(data) {
  const exception = mainException(data);
  const frames = (exception && exception.stacktrace && exception.stacktrace.frames)
    || (Array.isArray(data.stacktrace) ? data.stacktrace : data.stacktrace && data.stacktrace.frames);
  if (!Array.isArray(frames) || frames.length === 0) return null;
  return frames.map((frame) => "  at " + (frame.function_name || frame.function || "?") + " ("
    + (frame.filename || frame.abs_path || frame.module || "?") + (frame.lineno ? ":" + frame.lineno : "") + ")").join("\n");
}

function environmentOf(data) {
  return data.environment || (data.tags && !Array.isArray(data.tags) ? data.tags.environment : "") || "";
}

function addEvent(message) {
  const data = message.data || {};
  const row = el("li", "event");
  row.dataset.offset = message.offset;
  const meta = el("div", "meta");
  const when = data.timestamp ? new Date(typeof data.timestamp === "number" ? data.timestamp * 1000 : data.timestamp) : new Date();
  const level = data.level || "error";
  meta.append(el("span", "time", isNaN(when) ? "" : when.toLocaleTimeString()),
    el("span", "level level-" + level, level), el("span", "environment", environmentOf(data)));
  row.append(meta, el("div", "message", eventMessage(data)));
  row.addEventListener("click", () => {
    const open = row.querySelector("pre");
    if (open) { row.querySelectorAll("pre").forEach((node) => node.remove()); return; }
    const trace = stackTrace(data);
    if (trace) row.append(el("pre", "stack", trace));
    row.append(el("pre", "json", JSON.stringify(data, null, 2)));
  });
  prepend(row);
  window.mesherStats.eventsShown += 1;
  countEvent();
}

function addDropped(message) {
  const range = message.from_offset ? " (offsets " + message.from_offset + "–" + message.to_offset + ")" : "";
  prepend(el("li", "dropped", message.count + " events dropped: this page fell behind" + range));
}

// Rows wait for the next frame and go in together: one layout per frame however many events
// arrive, so the page stays quick to answer a click under a steady stream.
const waitingRows = [];

function prepend(row) {
  waitingRows.push(row);
  if (waitingRows.length === 1) requestAnimationFrame(flushRows);
}

function flushRows() {
  const rows = waitingRows.splice(0, waitingRows.length).slice(-EVENTS_KEPT).reverse();
  view.events.prepend(...rows);
  while (view.events.childElementCount > EVENTS_KEPT) view.events.lastElementChild.remove();
  drawRate();
}

// ---- events per second ----

function tickRate(nowS) {
  while (state.second < nowS) {
    state.second += 1;
    state.perSecond.push(0);
    state.perSecond.shift();
  }
}

function countEvent() {
  tickRate(Math.floor(Date.now() / 1000));
  state.perSecond[state.perSecond.length - 1] += 1;
}

function drawRate() {
  tickRate(Math.floor(Date.now() / 1000));
  const canvas = view.rate;
  const context = canvas.getContext("2d");
  const peak = Math.max(1, ...state.perSecond);
  const width = canvas.width / RATE_WINDOW_S;
  context.clearRect(0, 0, canvas.width, canvas.height);
  context.fillStyle = "#3a5ccc";
  state.perSecond.forEach((count, index) => {
    const height = (count / peak) * (canvas.height - 2);
    context.fillRect(index * width, canvas.height - height, Math.max(1, width - 1), height);
  });
  view.rateNow.textContent = String(state.perSecond[state.perSecond.length - 2] || 0);
}

// ---- the stream ----

function streamUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  let url = scheme + "//" + location.host + "/stream/projects/" + encodeURIComponent(state.project)
    + "?key=" + encodeURIComponent(state.key);
  if (state.epoch !== null) url += "&since=" + encodeURIComponent(state.epoch + ":" + state.offset);
  return url;
}

function connect() {
  clearTimeout(state.reconnectTimer);
  setConnection("connecting", state.epoch === null ? "connecting" : "resuming");
  const socket = new WebSocket(streamUrl());
  state.socket = socket;
  state.resuming = state.epoch !== null;
  state.reconnected = state.connectedBefore === true;
  socket.addEventListener("open", () => sendFilters(false));
  socket.addEventListener("message", (frame) => {
    if (socket !== state.socket) return;
    let message;
    try { message = JSON.parse(frame.data); } catch { return; }
    onMessage(message);
  });
  socket.addEventListener("close", (closed) => {
    if (socket !== state.socket) return;
    state.socket = null;
    if (closed.code === 1008 || closed.code === 4401) {
      setConnection("closed", "key refused");
      return;
    }
    const waitMs = state.backoffMs;
    state.backoffMs = Math.min(state.backoffMs * 2, BACKOFF_LAST_MS);
    setConnection("reconnecting", "reconnecting in " + Math.ceil(waitMs / 1000) + " s");
    state.reconnectTimer = setTimeout(connect, waitMs);
  });
}

function onMessage(message) {
  if (typeof message.offset === "number" && message.type !== "resumed") state.offset = Math.max(state.offset, message.offset);
  switch (message.type) {
    case "issue_count":
      view.count.textContent = String(message.count);
      if (message.epoch !== undefined && !state.resuming) {
        // A fresh stream: from here on, a reconnect resumes after the newest offset seen.
        state.epoch = message.epoch;
        state.offset = message.offset || 0;
      }
      if (!state.resuming && view.connection.dataset.state !== "live") {
        // Without a resume, anything missed while away is only in the REST API.
        if (state.reconnected) loadIssues();
        goLive();
      }
      break;
    case "resumed":
      window.mesherStats.resumes.push(message.recovered);
      if (message.recovered) {
        notice("");
      } else {
        state.epoch = message.epoch;
        state.offset = message.offset || 0;
        notice("Reconnected, but what happened meanwhile could not be recovered: the issue list was reloaded.");
        loadIssues();
      }
      state.offset = Math.max(state.offset, message.offset || 0);
      state.resuming = false;
      goLive();
      break;
    case "event": {
      addEvent(message);
      const issue = state.issues.get(message.issue_id);
      if (issue && issue.countsNextEvent) {
        issue.countsNextEvent = false;
      } else if (issue) {
        issue.event_count += 1;
        issue.last_seen = new Date().toISOString();
        scheduleIssues();
      }
      break;
    }
    case "issue":
      if (message.issue) {
        // An issue the next event opened or reopened already counts that event.
        message.issue.countsNextEvent = message.action === "created" || message.action === "regressed";
        state.issues.set(message.issue_id, message.issue);
      } else if (state.issues.has(message.issue_id)) {
        state.issues.get(message.issue_id).status = STATUS_OF_ACTION[message.action] || "unresolved";
      }
      scheduleIssues();
      break;
    case "dropped":
      addDropped(message);
      break;
    case "filters_updated":
      if (state.filtersSentAt !== null) {
        window.mesherStats.filterLatencyMs = performance.now() - state.filtersSentAt;
        state.filtersSentAt = null;
      }
      view.filtersState.textContent = "filters applied";
      break;
    case "error":
      notice("The server said: " + message.message);
      break;
  }
}

const STATUS_OF_ACTION = { resolved: "resolved", archived: "archived", discarded: "discarded",
  unresolved: "unresolved", created: "unresolved", regressed: "unresolved" };

function goLive() {
  state.connectedBefore = true;
  state.backoffMs = BACKOFF_FIRST_MS;
  setConnection("live", "live");
}

function sendFilters(byUser) {
  if (!state.socket || state.socket.readyState !== WebSocket.OPEN) return;
  const filters = {};
  if (view.level.value) filters.level = view.level.value;
  if (view.environment.value.trim()) filters.environment = view.environment.value.trim();
  if (byUser) state.filtersSentAt = performance.now();
  view.filtersState.textContent = "applying…";
  state.socket.send(JSON.stringify({ type: "subscribe", filters }));
}

// ---- start ----

function open(credentials) {
  state.project = credentials.project;
  state.key = credentials.key;
  view.login.hidden = true;
  view.dashboard.hidden = false;
  view.forget.hidden = false;
  view.name.textContent = state.project;
  loadIssues().then(connect);
}

view.login.addEventListener("submit", (submitted) => {
  submitted.preventDefault();
  const form = new FormData(view.login);
  const given = { project: String(form.get("project")).trim(), key: String(form.get("key")).trim() };
  localStorage.setItem(STORAGE.project, given.project);
  localStorage.setItem(STORAGE.key, given.key);
  open(given);
});

view.forget.addEventListener("click", () => {
  localStorage.removeItem(STORAGE.project);
  localStorage.removeItem(STORAGE.key);
  if (state.socket) { const socket = state.socket; state.socket = null; socket.close(); }
  clearTimeout(state.reconnectTimer);
  location.reload();
});

view.level.addEventListener("change", () => sendFilters(true));
view.environment.addEventListener("change", () => sendFilters(true));
setInterval(drawRate, 1000);

const given = credentials();
if (given) open(given); else view.login.hidden = false;
