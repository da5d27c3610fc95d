// powershare-gw web app: plain JavaScript, no build step, nothing loaded from anywhere but the gateway.
// Every text that came from outside (event ids, reasons) is set with textContent, never as HTML.
"use strict";

const state = { csrf: null, role: null, status: null, lags: [], lastAt: -Infinity,
                settings: null, settingsTimer: null, previews: 0, view: "now",
                edited: new Set(), reading: null, unconfirmed: null, ended: false, poll: null };
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);

const MODES = {
  STARTUP: "Starting: waiting for the truck and the inverter",
  STANDBY: "Ready, not moving energy",
  DISCHARGE: "Powering the grid event from the truck",
  CHARGE: "Charging the truck",
  BACKUP: "Backing up the home in a power cut",
  FAULT: "Stopped by a fault (0 W)",
  LOCKOUT: "Locked out: an installer must check it",
};
const REASONS = [
  [/^clamped: reserve/, "held down so the truck stays above its floor"],
  [/^clamped: bms limit/, "held to what the truck's battery allows now"],
  [/^clamped: site limit/, "held to the site's limit"],
  [/^clamped: rating/, "held to the inverter's rating"],
  [/^clamped: full/, "the battery is full"],
  [/^stale: bms/, "no fresh data from the truck"],
  [/^stale: inverter/, "no fresh data from the inverter"],
  [/^inhibit/, "the truck's contactors are open: no energy can flow"],
  [/^resync/, "catching up after a pause of the gateway"],
  [/^fault: /, "a fault holds it at 0 W: "],
  [/^storm watch: charging toward (.*)/, "storm watch: charging toward $1"],
  [/^floor reached \((.*)\)/, "the floor is reached ($1)"],
];
const LINKS = { bms: "Truck (BMS)", inverter: "Inverter", openadr: "Aggregator (OpenADR)",
                sunspec_server: "Aggregator (SunSpec)" };

// ------------------------------------------------------------------ talking to the gateway

// A gateway that hangs still accepts connections, and a request without a limit waits for ever: the
// page kept showing its last figures as live. Every request has a limit; the status poll a short one.
const REQUEST_TIMEOUT_S = 15;
const STATUS_TIMEOUT_S = 5;

// What the gateway answered with an error (a refusal the owner reads), as opposed to no answer at all.
class Refusal extends Error {}

async function api(method, path, body, timeoutS = REQUEST_TIMEOUT_S) {
  const headers = { "Accept": "application/json" };
  if (method !== "GET") headers["X-CSRF-Token"] = state.csrf || "";
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response, answer;
  try {
    response = await fetch(path, { method, headers, credentials: "same-origin",
                                   signal: AbortSignal.timeout(timeoutS * 1000),
                                   body: body === undefined ? undefined : JSON.stringify(body) });
    answer = await response.json().catch((err) => { if (err.name === "TimeoutError") throw err; return {}; });
  } catch (err) {
    throw new Error(err.name === "TimeoutError" ? `no answer within ${timeoutS} s` : err.message);
  }
  if (response.status === 401) { sessionEnded(); throw new Error("logged out"); }
  if (!response.ok) throw new Refusal(answer.error || `HTTP ${response.status}`);
  return answer;
}

// `about` names what the message is about, so the page can take back its own: "connection" for the
// gateway not answering, which the next fresh status clears (a refusal stays for the owner to read).
function say(text, error, about = "") {
  const box = $("message");
  box.textContent = text;
  box.className = error ? "error" : "";
  box.dataset.about = about;
  box.hidden = !text;
}

// A session ended (a restart of the gateway ends them all, they live in its memory only): the page stays, says
// so, and keeps what the owner typed and had not saved (in this tab's sessionStorage, never a token), so
// logging in again brings back the same view with it. Jumping to the login page at once lost both, unsaid.
const KEPT = "powershare-gw:unsaved";

function keepUnsaved() {
  if (state.csrf === null) return;  // not started: nothing typed (and a kept one is not written over)
  const values = {};
  for (const id of state.edited) values[id] = $(id).value;
  try { sessionStorage.setItem(KEPT, JSON.stringify({ view: state.view, values })); } catch (err) { /* private mode */ }
}

function sessionEnded(what = "") {
  if (!state.ended) {
    state.ended = true;
    clearInterval(state.poll);
    clearTimeout(state.settingsTimer);
  }
  keepUnsaved();
  say(`Your session ended (did the gateway restart?)${what ? ": " + what : ""}: log in again; ` +
      "nothing you had not saved was changed.", true, "session");
  const again = Object.assign(document.createElement("a"), { href: "/", id: "log-in-again", textContent: "Log in again" });
  again.addEventListener("click", keepUnsaved);  // what was typed since
  $("message").append(" ", again);
}

function restoreUnsaved() {
  let kept = null;
  try { kept = JSON.parse(sessionStorage.getItem(KEPT) || "null"); sessionStorage.removeItem(KEPT); } catch (err) { kept = null; }
  return kept;
}

// ------------------------------------------------------------------ formatting

const pct = (x) => (x === null || x === undefined ? "unknown" : `${Number(x).toFixed(1)} %`);
const watts = (w) => (Math.abs(w) >= 1000 ? `${(w / 1000).toFixed(2)} kW` : `${Math.round(w)} W`);
const clock = (iso) => new Date(iso).toLocaleTimeString();
const when = (iso) => (iso ? new Date(iso).toLocaleString([], { dateStyle: "medium", timeStyle: "short" }) : "");
const epochText = (s) => (s === null || s === undefined || typeof s !== "number"
  ? "open" : new Date(s * 1000).toLocaleString([], { dateStyle: "short", timeStyle: "short" }));

const money = (x, currency) => `${Number(x).toFixed(2)} ${currency}`;
const kwh = (wh) => `${(wh / 1000).toLocaleString([], { maximumFractionDigits: 2 })} kWh`;

function earningsText(m) {
  if (!m) return "Not computed yet: the month's figures follow once the gateway has read its journal.";
  const events = `${m.events_served} event${m.events_served === 1 ? "" : "s"}`;
  return `${m.month}: credit ${money(m.credit, m.currency)} for ${kwh(m.credited_wh)} credited in ${events}; ` +
    `battery wear ${money(m.wear_cost, m.currency)}, net ${money(m.net, m.currency)}.`;
}

function figuresText(f, currency) {
  if (!f) return "not computed yet";
  return `${money(f.credit, currency)} (net ${money(f.net, currency)})`;
}

function duration(hours) {
  if (!isFinite(hours)) return "—";
  const minutes = Math.round(hours * 60);  // rounded whole, so 7.996 h is 8 h 0 min, never 7 h 60 min
  const h = Math.floor(minutes / 60), m = minutes % 60;
  return h > 0 ? `${h} h ${m} min` : `${m} min`;
}

function plainReason(reason) {
  for (const [pattern, words] of REASONS) {
    if (pattern.test(reason)) return reason.replace(pattern, words);
  }
  return reason;
}

function answerText(event) {
  if (event.answer === "accepted") return "accepted";
  if (event.answer === "accepted_capped") return `accepted, capped at ${watts(event.cap_w)}`;
  return `refused ${event.reason || ""}${event.detail ? ": " + event.detail : ""}`;
}

const p2 = (n) => String(Math.floor(Math.abs(n))).padStart(2, "0");

function localInput(date) {  // a Date as a datetime-local input value
  const day = `${date.getFullYear()}-${p2(date.getMonth() + 1)}-${p2(date.getDate())}`;
  return `${day}T${p2(date.getHours())}:${p2(date.getMinutes())}`;
}

// A time as sent to the gateway: the owner's own wall time with its offset ("2026-12-04T10:00-05:00"), not
// UTC, so a refusal that quotes it reads as the owner wrote it.
function localIso(date) {
  const offset = -date.getTimezoneOffset();
  return `${localInput(date)}${offset < 0 ? "-" : "+"}${p2(offset / 60)}:${p2(offset % 60)}`;
}

// ------------------------------------------------------------------ Now

function svg(name, attrs, parent) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

function drawGauge(s) {
  const g = $("gauge");
  g.replaceChildren();
  const x = (p) => 6 + 288 * Math.max(0, Math.min(100, p)) / 100;
  svg("rect", { x: 6, y: 18, width: 288, height: 24, rx: 5, fill: "#e7ebf0" }, g);
  if (s.soc_pct !== null) svg("rect", { x: 6, y: 18, width: x(s.soc_pct) - 6, height: 24, rx: 5, fill: "var(--soc)" }, g);
  const marks = [{ p: s.floor_pct, colour: "var(--floor)", dash: "", label: `floor ${Math.round(s.floor_pct)}` },
                 { p: s.reserve_pct, colour: "var(--reserve)", dash: "4 3", label: `reserve ${Math.round(s.reserve_pct)}` }];
  if (s.storm_watch) {
    marks.push({ p: s.storm_watch.floor_pct, colour: "var(--storm)", dash: "2 2", label: `storm ${s.storm_watch.floor_pct}` });
  }
  // Each label on a line of its own where it would cover another (storm 30 and reserve 40 were drawn over one
  // another), and kept inside the drawing: one centred on 0 % or 100 % was cut in half at its edge.
  const ROWS = [11, 58, 70], EDGE = 2, placed = ROWS.map(() => []);
  for (const m of marks) {
    svg("line", { x1: x(m.p), x2: x(m.p), y1: 14, y2: 46, stroke: m.colour, "stroke-width": 3, "stroke-dasharray": m.dash }, g);
    const w = m.label.length * 6 + 4;  // 10 px text: under 6 px a character
    let left = x(m.p) - w / 2, anchor = "middle", at = x(m.p);
    if (left < EDGE) { left = EDGE; anchor = "start"; at = EDGE; }
    if (left + w > 300 - EDGE) { left = 300 - EDGE - w; anchor = "end"; at = 300 - EDGE; }
    let row = ROWS.findIndex((_, i) => placed[i].every(([l, r]) => left + w <= l || r <= left));
    if (row < 0) row = ROWS.length - 1;
    placed[row].push([left, left + w]);
    svg("text", { x: at, y: ROWS[row], "text-anchor": anchor, fill: m.colour }, g).textContent = m.label;
  }
}

// A figure whose source is silent is its last reading, not one of now: the core says which (`fresh`).
// With no reading at all there is no last one: the figure is unknown, and says why.
const SOURCES = { bms: "truck", inverter: "inverter" };
const lastReading = (s, source, value) => {
  if (!s.fresh || s.fresh[source] !== false) return "";
  return value === null || value === undefined ? ` (no data from the ${SOURCES[source]} yet)` : " (last reading)";
};

function renderStatus(s) {
  $("soc").textContent = pct(s.soc_pct) + lastReading(s, "bms", s.soc_pct);
  $("floor").textContent = pct(s.floor_pct);
  $("reserve").textContent = pct(s.reserve_pct);
  drawGauge(s);
  $("mode").textContent = MODES[s.mode] || s.mode;
  $("mode").dataset.mode = s.mode;
  $("reason").textContent = plainReason(s.reason || "");
  $("power").textContent = watts(s.power_w) + lastReading(s, "inverter", s.power_w);
  $("setpoint").textContent = watts(s.setpoint_w);
  $("time-to-floor").textContent = s.power_w > 50 && s.available_wh > 0
    ? `${duration(s.available_wh / s.power_w)} at ${watts(s.power_w)}` : "not discharging";
  const e = s.event;
  $("event").textContent = e
    ? `${e.id}: ${answerText(e)}, ${e.delivered_wh === null ? 0 : Math.round(e.delivered_wh).toLocaleString()} Wh so far`
    : "No grid event being served.";
  const links = $("links");
  links.replaceChildren();
  for (const [name, link] of Object.entries(s.links || {})) {
    const li = document.createElement("li");
    li.className = link.ok ? "ok" : "down";
    const age = link.age_s === null ? "no data yet" : `last good ${link.age_s.toFixed(1)} s ago`;
    li.textContent = `${LINKS[name] || name}: ${link.ok ? "ok" : "DOWN"} (${age})${link.cause ? ": " + link.cause : ""}`;
    links.appendChild(li);
  }
  $("faults").textContent = s.faults.length ? s.faults.join(", ") : "none";
  $("earnings").textContent = earningsText(s.earnings);
  $("legend-storm").hidden = !s.storm_watch;
  $("storm-watch-pct").textContent = s.storm_watch ? pct(s.storm_watch.floor_pct) : "";
  $("storm-status").textContent = s.storm_watch
    ? `Storm watch: keeping ${s.storm_watch.floor_pct} % until ${when(s.storm_watch.until)}` : "";
}

// How old a status is, against the freshest answers: the browser's monotonic clock minus the gateway's
// `at` stays the same while answers are live, whatever the offset between the two clocks. Kept over the
// last few answers only, so a step of the gateway's clock is forgotten within them; a step back (an `at`
// earlier than the last answer's) is forgotten at once: only a gateway's clock goes back, never a cache.
const STALE_S = 6;
const LAGS_KEPT = 10;

function statusAge(s) {
  const lag = performance.now() / 1000 - Date.parse(s.at) / 1000;
  state.lags = [...state.lags.slice(1 - LAGS_KEPT), lag];
  return lag - Math.min(...state.lags);
}

// Whether the figures are live, said on Now and on Installer (each view's figures come from the gateway).
function asOf(text) {
  for (const id of ["updated", "installer-updated"]) $(id).textContent = text;
}

// #message is a live region: a screen reader reads out every change, so the warning is written again only
// when what it says changes (not on every poll), and it carries no number that ticks.
function lost(why) {
  document.body.dataset.gateway = "lost";
  asOf(state.status ? `Not live: figures as of ${clock(state.status.at)}.` : "Not live.");
  // A change whose answer was lost stays said: "Not live" above tells the rest, and the settings, once read
  // again, confirm it or say they do not show it (`renderSettings`).
  if ($("message").dataset.about === "unconfirmed") return;
  const text = `Cannot reach the gateway: ${why}.`;
  if ($("message").hidden || $("message").textContent !== text) say(text, true, "connection");
}

// Answers may overtake one another (a poll's and a change's): each kind of question is counted by the page,
// and an answer to an earlier question than one already answered is dropped. Never ordered by the gateway's
// wall time, which may step back (every answer was dropped as "overtaken" until it caught up).
function questions() {
  let asked = 0, answered = 0;
  return {
    ask: () => ++asked,
    latest: (n) => { if (n < answered) return false; answered = n; return true; },
  };
}
const statusQuestions = questions(), settingsQuestions = questions();

async function refreshStatus() {
  const asked = statusQuestions.ask();
  let s, failure;
  try {
    s = await api("GET", "/api/status", undefined, STATUS_TIMEOUT_S);
  } catch (err) {
    failure = err;
  }
  if (!statusQuestions.latest(asked)) return;  // a later question was answered already
  if (failure) {
    if (failure.message !== "logged out") lost(failure.message);
    return;
  }
  if (Date.parse(s.at) < state.lastAt) state.lags = [];  // the gateway's clock stepped back
  state.lastAt = Date.parse(s.at);
  if (statusAge(s) > STALE_S) { lost("its answers are old"); return; }
  state.status = s;
  renderStatus(s);
  document.body.dataset.gateway = "live";
  asOf(`Live, as of ${clock(s.at)}.`);
  if ($("message").dataset.about === "connection") say("", false);
  readAgain();
}

// What the open view shows changes while it is open, not only when it opens: settings changed elsewhere
// (MQTT, the owner command, the API) on Controls; links, latches and the lockout on Installer. Read again
// with each live poll, one read at a time.
function readAgain() {
  const read = { controls: refreshSettings, installer: refreshInstaller }[state.view];
  if (!read || state.reading) return;
  state.reading = true;
  read().catch(() => {}).finally(() => { state.reading = false; });
}

// ------------------------------------------------------------------ Controls

// The gateway leaves out of the settings what has ended (an opt-out, departure or storm watch past its
// time): the page shows them as they come, and asks again when the first of them ends.
function renderSettings(doc) {
  const s = doc.settings;
  state.settings = doc;
  askAgainAtTheNextEnd(doc);
  offer("reserve-pct", s.reserve_pct);
  const outs = [];
  if (s.opt_out_until === "until_revoked") outs.push("opted out until you opt back in");
  else if (s.opt_out_until) outs.push(`opted out until ${epochText(s.opt_out_until)}`);
  if (s.opt_out_events.length) outs.push(`opted out of ${s.opt_out_events.join(", ")}`);
  $("opt-out-state").textContent = outs.length ? outs.join("; ") : "Taking part in grid events.";
  $("departure-state").textContent = s.departure_at
    ? `Leaving ${epochText(s.departure_at)} with ${s.departure_soc_pct} %.` : "No departure set.";
  // While the owner types a departure its preview (previewDeparture) stays: settings are read every poll now.
  const typing = ["departure-time", "departure-soc"].some((id) => state.edited.has(id) || document.activeElement === $(id));
  if (!typing) $("departure-floor").textContent = doc.departure_floor ? floorText(doc.departure_floor) : "";
  $("storm-state").textContent = s.storm_watch_until
    ? `On: keeping ${s.storm_watch_floor_pct} % until ${epochText(s.storm_watch_until)}.` : "Off.";
  if (!doc.can_charge) $("storm-state").textContent += " (This site does not charge the truck.)";
  const on = s.price_threshold_per_kwh !== null && s.price_max_wh_per_day > 0;
  $("price-state").textContent = on
    ? `On: discharging while the ${s.price_kind === "PRICE" ? "import" : "export"} price is at least ` +
      `${s.price_threshold_per_kwh} per kWh, up to ${s.price_max_wh_per_day / 1000} kWh a day.` : "Off.";
  if (on) offer("price-threshold", s.price_threshold_per_kwh);
  if (s.price_max_wh_per_day > 0) offer("price-max", s.price_max_wh_per_day / 1000);
  offer("price-kind", s.price_kind);
  const pending = state.unconfirmed;
  if (pending && $("message").dataset.about !== "unconfirmed") state.unconfirmed = null;  // a later message's turn
  else if (pending && pending.made(s)) {
    state.unconfirmed = null;
    say(`${pending.done} (the gateway's settings show it made.)`, false);
  } else if (pending && !pending.told) {
    // Not made, or not yet (an answer held up may still land): said, and still confirmed should it show.
    pending.told = true;
    say("Not confirmed: the gateway's settings do not show the change; try again if it does not appear.",
        true, "unconfirmed");
  }
}

// A setting shown in a field: refreshed unless the owner is at it (the field has focus or was changed since it
// was shown). Then the owner's text stays and a note under it says what the gateway has now.
function offer(id, value) {
  const field = $(id), text = String(value);
  let note = $(`${id}-elsewhere`);
  const was = field.dataset.shown;
  field.dataset.shown = text;
  if (document.activeElement !== field && !state.edited.has(id)) {
    field.value = text;
    if (note) note.remove();
    return;
  }
  if (field.value === text) { if (note) note.remove(); return; }
  if (was === undefined || was === text) return;  // not changed since shown: nothing to mark
  if (!note) {
    note = Object.assign(document.createElement("p"), { id: `${id}-elsewhere`, className: "elsewhere" });
    note.setAttribute("aria-live", "polite");
    field.after(note);
    field.setAttribute("aria-describedby", note.id);
  }
  const shown = field.tagName === "SELECT" ? field.querySelector(`option[value="${text}"]`)?.textContent || text : text;
  note.textContent = `Changed elsewhere: now ${shown}.`;
}

// The owner's change saved: its fields follow the gateway again.
function saved(form) {
  for (const field of $(form).querySelectorAll("input, select")) {
    state.edited.delete(field.id);
    $(`${field.id}-elsewhere`)?.remove();
  }
}

async function refreshSettings() {
  const asked = settingsQuestions.ask();
  const doc = await api("GET", "/api/settings");
  if (settingsQuestions.latest(asked)) renderSettings(doc);
}

const MAX_TIMER_S = 86400;  // a setTimeout beyond 24.8 days fires at once: re-arm daily instead

function askAgainAtTheNextEnd(doc) {
  const s = doc.settings;
  const ends = [s.opt_out_until, s.departure_at, s.storm_watch_until].filter((t) => typeof t === "number");
  clearTimeout(state.settingsTimer);
  if (!ends.length) return;
  // Counted on the gateway's clock (`now` is its wall time), so an offset between the two clocks does not matter.
  const waitS = Math.min(MAX_TIMER_S, Math.max(0, Math.min(...ends) - doc.now));
  state.settingsTimer = setTimeout(() => refreshSettings().catch(() => {}), waitS * 1000 + 250);
}

// `made` tells from the settings whether the change is in them: a change whose answer was lost ("Not
// confirmed") is confirmed, and the message taken back, once fresh settings show it (it stayed for good).
async function change(method, path, body, done, form, made) {
  try {
    await api(method, path, body);
  } catch (err) {
    const what = path.replace("/api/", "").replace("-", " ");
    if (err instanceof Refusal) say(`Refused: ${err.message}`, true);
    else if (err.message === "logged out") sessionEnded(`the ${what} change was not made`);
    else {
      say(`Not confirmed: ${err.message}; the change may not have been made.`, true, "unconfirmed");
      state.unconfirmed = { done, made };
      await refreshSettings().catch(() => {});
    }
    return;
  }
  if (form) saved(form);
  say(done, false);
  await Promise.all([refreshSettings().catch(() => {}), refreshStatus()]);  // a lost gateway: the poll says so
}

// The next HH:MM on the owner's own clock (the browser's), never the gateway's, which may run in UTC. Each
// day's from its own date: today's HH:MM moved a day on kept today's daylight-saving shift (02:30 on the
// night clocks spring forward is 03:30, and tomorrow's 02:30 was sent as 03:30).
function nextDeparture(time) {
  const [h, m] = time.split(":").map(Number), now = new Date();
  const on = (day) => new Date(now.getFullYear(), now.getMonth(), now.getDate() + day, h, m);
  return on(0) > now ? on(0) : on(1);
}

const floorText = (f) => `That makes the floor ${pct(f.now_pct)} now and ${pct(f.at_departure_pct)} at departure.`;

// The gateway works the preview out (`GET /api/departure-floor`): the whole floor rule (reserve, hard
// minimum, storm watch, margin) lives there only, so what the page promises is what the gateway applies.
async function previewDeparture() {
  const time = $("departure-time").value, soc = $("departure-soc").value;
  if (!time || soc === "") return;
  const asked = ++state.previews;  // answers may overtake one another: only the latest question's is shown
  let text = "";
  try {
    // As Save sends it: the number the field holds, not its text ("080" and ".8e2" are 80 to both).
    const query = new URLSearchParams({ at: localIso(nextDeparture(time)), soc_pct: String(Number(soc)) });
    text = floorText(await api("GET", `/api/departure-floor?${query}`));
  } catch (err) {
    if (err instanceof Refusal) text = err.message;
  }
  if (asked === state.previews) $("departure-floor").textContent = text;
}

function wireControls() {
  $("reserve-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const pct = Number($("reserve-pct").value);
    change("PUT", "/api/reserve", { pct }, "Reserve set.", "reserve-form", (s) => s.reserve_pct === pct);
  });
  const mode = $("opt-out-mode"), form = $("opt-out-form");
  const showMode = () => { form.className = `card mode-${mode.value}`; };
  mode.addEventListener("change", showMode);
  showMode();
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    let body = { now: true }, made = (s) => s.opt_out_until === "until_revoked";
    if (mode.value === "event") {
      body = { event: $("opt-out-event").value.trim() };
      made = (s) => s.opt_out_events.includes(body.event);
    }
    if (mode.value === "until") {
      const until = $("opt-out-until").value;
      body = { until: until ? localIso(new Date(until)) : "" };
      made = (s) => typeof s.opt_out_until === "number";
    }
    change("PUT", "/api/opt-out", body, "Opted out.", "opt-out-form", made);
  });
  $("opt-in").addEventListener("click", () => change("DELETE", "/api/opt-out", undefined, "Opted back in.", null,
    (s) => !s.opt_out_until && !s.opt_out_events.length));
  $("departure-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const soc = Number($("departure-soc").value);
    change("PUT", "/api/departure", { at: localIso(nextDeparture($("departure-time").value)), soc_pct: soc },
           "Departure set.", "departure-form", (s) => s.departure_soc_pct === soc && typeof s.departure_at === "number");
  });
  for (const id of ["departure-time", "departure-soc"]) $(id).addEventListener("input", previewDeparture);
  $("departure-clear").addEventListener("click", () => change("DELETE", "/api/departure", undefined, "Departure cleared.",
                                                                   null, (s) => !s.departure_at));
  $("storm-until").value = localInput(new Date(Date.now() + 24 * 3.6e6));
  $("storm-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const until = $("storm-until").value;
    const floor = Number($("storm-floor").value);
    change("PUT", "/api/storm-watch", { floor_pct: floor, until: until ? localIso(new Date(until)) : "" },
           "Storm watch on.", "storm-form", (s) => s.storm_watch_floor_pct === floor && Boolean(s.storm_watch_until));
  });
  $("storm-clear").addEventListener("click", () => change("DELETE", "/api/storm-watch", undefined, "Storm watch off.",
                                                          null, (s) => !s.storm_watch_until));
  $("price-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    // The form sends every field: read the settings first, so a field the owner did not touch carries what the
    // gateway has now (a daily limit lowered elsewhere was set back by a form shown before it).
    await refreshSettings().catch(() => {});
    const now = state.settings ? state.settings.settings : null, on = now && now.price_threshold_per_kwh !== null;
    const mine = (id) => state.edited.has(id) || !on;
    const body = { threshold_per_kwh: Number(mine("price-threshold") ? $("price-threshold").value : now.price_threshold_per_kwh),
                   max_wh_per_day: mine("price-max") || !(now.price_max_wh_per_day > 0)
                     ? Math.round(Number($("price-max").value) * 1000) : now.price_max_wh_per_day,
                   kind: mine("price-kind") ? $("price-kind").value : now.price_kind };
    // The power limit has no field here: left out, the gateway keeps what was set elsewhere (command line, MQTT).
    change("PUT", "/api/price", body, "Price mode on.", "price-form", (s) => s.price_threshold_per_kwh === body.threshold_per_kwh &&
           s.price_max_wh_per_day === body.max_wh_per_day && s.price_kind === body.kind);
  });
  $("price-clear").addEventListener("click", () => change("DELETE", "/api/price", undefined, "Price mode off.", null,
    (s) => s.price_threshold_per_kwh === null || !(s.price_max_wh_per_day > 0)));
  // What the owner types is theirs until saved: a settings read never writes over it (renderSettings).
  for (const field of $("view-controls").querySelectorAll("input, select")) {
    for (const kind of ["input", "change"]) field.addEventListener(kind, () => state.edited.add(field.id));
  }
}

// ------------------------------------------------------------------ History

function drawChart(id, samples, series, from, to, unit, fixed) {
  const g = $(id);
  g.replaceChildren();
  // Drawn at the width it is shown, so its labels are the size app.css says: a 600-wide drawing shrunk to a
  // phone made them 6 px tall. Fewer time labels where they would not fit.
  const W = Math.round(g.getBoundingClientRect().width) || 600, H = Math.max(200, Math.round(W / 3));
  const L = 44, R = 10, T = 10, B = 24, ticks = W < 480 ? 2 : 4;
  g.setAttribute("viewBox", `0 0 ${W} ${H}`);
  let lo = fixed ? fixed[0] : Infinity, hi = fixed ? fixed[1] : -Infinity;
  if (!fixed) {
    for (const row of samples) for (const s of series) if (row[s.col] !== null) {
      lo = Math.min(lo, s.scale * row[s.col]); hi = Math.max(hi, s.scale * row[s.col]);
    }
    if (!isFinite(lo)) { lo = -1; hi = 1; }
    lo = Math.min(lo, 0); hi = Math.max(hi, 0);
    if (hi - lo < 1) hi = lo + 1;
  }
  const x = (t) => L + (W - L - R) * (t - from) / (to - from);
  const y = (v) => T + (H - T - B) * (1 - (v - lo) / (hi - lo));
  for (let i = 0; i <= 4; i++) {
    const v = lo + (hi - lo) * i / 4;
    svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), stroke: "#e1e4e8" }, g);
    svg("text", { x: L - 4, y: y(v) + 4, "text-anchor": "end" }, g).textContent = `${Math.round(v * 10) / 10}${unit}`;
  }
  const short = to - from < 3600;
  for (let i = 0; i <= ticks; i++) {
    const t = from + (to - from) * i / ticks;
    svg("text", { x: x(t), y: H - 6, "text-anchor": i === 0 ? "start" : i === ticks ? "end" : "middle" }, g).textContent =
      new Date(t * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: short ? "2-digit" : undefined });
  }
  // A null (the server's mark of a hole: the gateway stopped, or samples not kept) ends a line; nothing is
  // drawn across what nobody measured. A lone sample between two holes is a dot.
  for (const s of series) {
    let run = [];
    const draw = () => {
      if (run.length > 1) svg("polyline", { points: run.map(([px, py]) => `${px},${py}`).join(" "), fill: "none",
                                            stroke: s.colour, "stroke-width": 2, "data-series": s.name }, g);
      else if (run.length) svg("circle", { cx: run[0][0], cy: run[0][1], r: 2, fill: s.colour, "data-series": s.name }, g);
      run = [];
    };
    for (const row of samples) {
      if (row[s.col] === null) draw();
      else run.push([x(row[0]).toFixed(1), y(s.scale * row[s.col]).toFixed(1)]);
    }
    draw();
  }
}

async function refreshHistory() {
  const doc = await api("GET", "/api/history");
  // A gateway younger than a day: draw from its first sample (at least a minute), not an empty day.
  const first = doc.samples.length ? doc.samples[0][0] : doc.to;
  const from = Math.max(doc.from, Math.min(first, doc.to - 60));
  const kw = (col) => ({ col, scale: 0.001 });
  drawChart("chart-soc", doc.samples, [{ col: 1, scale: 1, colour: "var(--soc)", name: "soc" },
                                       { col: 2, scale: 1, colour: "var(--floor)", name: "floor" }],
            from, doc.to, "%", [0, 100]);
  const power = [{ ...kw(3), colour: "var(--setpoint)", name: "setpoint" }, { ...kw(4), colour: "var(--accent)", name: "power" }];
  drawChart("chart-power", doc.samples, power, from, doc.to, "", null);
  const holes = doc.samples.filter((row) => row.slice(1).every((v) => v === null)).length;
  $("history-note").textContent = `${doc.samples.length - holes} samples from the journal` +
    (holes ? ` (${holes === 1 ? "one gap" : `${holes} gaps`} where the gateway kept none)` : "") +
    (from > doc.from ? `, since ${new Date(from * 1000).toLocaleString([], { timeStyle: "short" })}.` : ".");
  const body = $("events").tBodies[0];
  const labels = [...$("events").tHead.rows[0].cells].map((th) => th.textContent);
  body.replaceChildren();
  for (const e of doc.events) {
    const row = body.insertRow();
    const cells = [e.id, e.source || "", answerText(e),
                   `${Math.round(e.delivered_wh).toLocaleString()} Wh${e.final ? "" : " so far"}`,
                   figuresText(e.figures, doc.currency),
                   `${epochText(e.start)} – ${epochText(e.end)}`];
    cells.forEach((text, i) => {
      const cell = row.insertCell();
      cell.textContent = text;
      cell.dataset.label = labels[i];  // on a phone the cells stack, each under its column's name (app.css)
    });
  }
  if (!doc.events.length) body.insertRow().insertCell().textContent = "No events in the last 24 hours.";
}

// ------------------------------------------------------------------ Installer

async function refreshInstaller() {
  const doc = await api("GET", "/api/installer");
  const latches = $("latches");
  latches.replaceChildren();
  for (const l of doc.latches) {
    const li = document.createElement("li");
    li.textContent = `${l.kind} since ${when(l.since)}: ${l.detail}; ` + (l.clears_in_s === null
      ? `still present (clears ${doc.holdoff_s} s after it is gone)` : `clears in ${l.clears_in_s} s`);
    latches.appendChild(li);
  }
  if (!doc.latches.length) latches.appendChild(Object.assign(document.createElement("li"), { textContent: "none" }));
  const lock = doc.lockout;
  $("lockout").textContent = lock.locked_out ? "LOCKED OUT: check the truck and the inverter, then reset."
    : `Not locked out (${lock.faults_in_window} of ${lock.limit} faults within ${lock.window_s} s).`;
  const links = $("installer-links");
  links.replaceChildren();
  for (const [name, link] of Object.entries(doc.links)) {
    const li = document.createElement("li");
    li.className = link.ok ? "ok" : "down";
    li.textContent = `${name}: ${link.ok ? "ok" : "DOWN"}, ${link.where}` +
      (link.age_s === null ? "" : `, last good ${link.age_s.toFixed(1)} s ago`) + (link.cause ? `: ${link.cause}` : "");
    links.appendChild(li);
  }
  // Read again every 2 s while shown: rewritten only when changed, so text selected in it stays selected.
  for (const [id, text] of [["config-file", doc.config_file], ["config", JSON.stringify(doc.config, null, 2)]]) {
    if ($(id).textContent !== text) $(id).textContent = text;
  }
}

// ------------------------------------------------------------------ views

async function show(view) {
  if (view === "installer" && state.role !== "installer") view = "now";
  state.view = view;
  for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== `view-${view}`;
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("active", link.dataset.view === view);
  try {
    if (view === "controls") await refreshSettings();
    if (view === "history") await refreshHistory();
    if (view === "installer") await refreshInstaller();
    document.body.dataset.view = view;
  } catch (err) {
    if (err instanceof Refusal) say(err.message, true);
    else if (err.message !== "logged out") say(`Cannot reach the gateway: ${err.message}.`, true, "connection");
  }
}

const RETRY_MAX_S = 30;

async function start() {
  // A gateway slow or away while the page loads: say so and ask again, a little later each time (the page
  // gave up for good, its figures '…' and its forms dead, after one request past its limit).
  let session;
  for (let waitS = 1; !session; waitS = Math.min(2 * waitS, RETRY_MAX_S)) {
    try {
      session = await api("GET", "/api/session");
    } catch (err) {
      if (err.message === "logged out") return;
      lost(err.message);
      await new Promise((resolve) => setTimeout(resolve, waitS * 1000));
    }
  }
  state.csrf = session.csrf_token;
  state.role = session.role;
  $("nav-installer").hidden = state.role !== "installer";
  document.body.dataset.role = state.role;
  wireControls();
  $("lockout-reset").addEventListener("click", async () => {
    try {
      const answer = await api("POST", "/api/lockout-reset");
      say(answer.cleared ? "Lockout reset: the gateway starts again." : "There was no lockout to reset.", false);
      await refreshInstaller();
    } catch (err) { say(`Refused: ${err.message}`, true); }
  });
  $("logout").addEventListener("click", async () => {
    try { await api("POST", "/logout"); } finally { window.location.assign("/"); }
  });
  window.addEventListener("hashchange", () => show(location.hash.slice(1) || "now"));
  const kept = restoreUnsaved();  // logged in again after a session ended: the same view, the typing back
  await refreshStatus();
  await show(location.hash.slice(1) || (kept && kept.view) || "now");
  if (kept && Object.keys(kept.values).length) {
    for (const [id, value] of Object.entries(kept.values)) {
      if (!$(id)) continue;
      $(id).value = value;
      state.edited.add(id);
    }
    if (state.view === "controls") await refreshSettings().catch(() => {});  // marks what changed meanwhile
    say("Logged in again: what you had typed is back, not saved yet.", false);
  }
  state.poll = setInterval(refreshStatus, 2000);
}

document.addEventListener("DOMContentLoaded", () => { start().catch((err) => say(err.message, true)); });
