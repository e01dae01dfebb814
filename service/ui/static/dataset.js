// /ui/datasets/{id}: ε over time, the ledger table with filters, the integrity check, exports.

import {
  ApiError,
  allPages,
  apiGet,
  budgetBar,
  budgetNumbers,
  describeError,
  el,
  formatEpsilon,
  formatTime,
  getJson,
  setStatus,
  startPage,
  svgEl,
} from "./common.js";

const datasetId = decodeURIComponent(location.pathname.replace(/^\/ui\/datasets\//, ""));
const ledgerPath = `/v1/datasets/${encodeURIComponent(datasetId)}/ledger`;

const state = {
  dataset: null,
  entries: [],
  caps: [], // the cap in force after each entry
  kind: "",
  run: "",
  axis: "time",
  bySeq: new Map(),
  selected: null, // seq of the selected entry
};

// ---------------------------------------------------------------- formats

const PARAMETER_NAMES = {
  sample_rate: "q",
  noise_multiplier: "σ",
  scale: "b",
  epsilon: "ε",
  delta: "δ",
  sensitivity: "Δ",
  noise_scale: "noise scale",
};

function formatValue(value) {
  if (typeof value === "number" && !Number.isInteger(value))
    return String(Number(value.toPrecision(6)));
  if (Array.isArray(value)) return `[${value.length} values]`;
  if (value !== null && typeof value === "object") return JSON.stringify(value);
  return String(value);
}

function formatParameters(object, skip = []) {
  return Object.entries(object || {})
    .filter(([name, value]) => !skip.includes(name) && value !== null && value !== "")
    .map(([name, value]) => `${PARAMETER_NAMES[name] || name}=${formatValue(value)}`)
    .join(" ");
}

function formatMechanism(mechanism) {
  if (!mechanism) return "—";
  const parameters = formatParameters(mechanism, ["kind"]);
  return parameters ? `${mechanism.kind}: ${parameters}` : String(mechanism.kind);
}

function subject(entry) {
  if (entry.run_id) return entry.run_id;
  if (entry.release_id) return entry.release_id;
  if (entry.voids_seq) return `voids #${entry.voids_seq}`;
  return "—";
}

// ---------------------------------------------------------------- budget & integrity

function renderBudget() {
  const dataset = state.dataset;
  document.getElementById("dataset-title").textContent = dataset.id;
  document.title = `${dataset.id} · privacy-ledger`;
  const description = document.getElementById("dataset-description");
  description.textContent = dataset.description || "";
  description.hidden = !dataset.description;
  const badges = [];
  if (dataset.frozen) badges.push(el("span", { class: "badge", text: "frozen" }));
  const notes = [];
  if (dataset.outside_guarantee) {
    // Said first and in words: from this entry on the cap is no longer a proof of privacy.
    notes.push(
      el(
        "p",
        { class: "outside-guarantee", role: "note" },
        el("strong", { text: "Outside the filter's guarantee" }),
        ` since entry #${dataset.outside_guarantee.since_seq}: ` +
          `${dataset.outside_guarantee.reason}. The figures are still computed the same ` +
          "way, but they no longer prove that the dataset is (cap, δ)-DP.",
      ),
    );
  }
  const decided = dataset.epsilon_decided_by;
  notes.push(
    el("p", {
      class: "decided-by",
      text: decided
        ? `Why ε spent is ${formatEpsilon(dataset.epsilon_spent)}: ${decided.text}`
        : "Nothing is spent yet.",
    }),
    el("p", { class: "shares muted", text: sharesSummary(dataset.shares) }),
  );
  document
    .getElementById("budget")
    .replaceChildren(budgetBar(dataset), budgetNumbers(dataset), ...badges, ...notes);
}

function sharesSummary(shares) {
  const members = shares.pure_sum ? " and the sum of pure ε (share 0)" : "";
  if (shares.weights.length === 0) {
    return (
      `Filter: ${shares.profile} shares of δ, not fixed yet: the first admitted request fixes ` +
      "them, most of δ at the Rényi order where a history of its shape that reaches the cap " +
      `converts best${members}.`
    );
  }
  // The heaviest share names the order the profile bet on; the rest is spread thin.
  let heaviest = 0;
  shares.weights.forEach((weight, index) => {
    if (fraction(weight) > fraction(shares.weights[heaviest])) heaviest = index;
  });
  const fixed =
    shares.fixed_at_seq === null || shares.fixed_at_seq === undefined
      ? "fixed when the dataset was created."
      : `fixed by the first admission (ledger entry #${shares.fixed_at_seq}).`;
  return (
    `Filter: ${shares.profile} shares of δ over ${shares.orders.length} Rényi orders, ` +
    `the largest (${shares.weights[heaviest]}) at α = ${shares.orders[heaviest]}${members}; ` +
    fixed
  );
}

function fraction(text) {
  const [numerator, denominator = "1"] = String(text).split("/");
  return Number(numerator) / Number(denominator);
}

function movement(before, after) {
  // Entries written since the member filter say where the dataset's ε stood before them.
  if (before === null || before === undefined) return `after this entry: ${formatEpsilon(after)}`;
  return `this entry moved it ${formatEpsilon(before)} → ${formatEpsilon(after)}`;
}

function renderIntegrity(result) {
  const box = document.getElementById("integrity");
  box.dataset.state = result.ok ? "ok" : "failed";
  const verdict = result.ok
    ? el(
        "p",
        { class: "verdict verdict-ok" },
        el("strong", { text: "OK" }),
        " — the ledger is intact.",
      )
    : el(
        "p",
        { class: "verdict verdict-failed" },
        el("strong", { text: "FAILED" }),
        " — the ledger does not verify.",
      );
  const facts = el(
    "ul",
    { class: "facts" },
    el("li", { text: `${result.entries} entries, last seq ${result.last_seq}` }),
    el("li", { text: `hash chain: ${result.chain_ok ? "intact" : "broken"}` }),
    el("li", {
      text: `replay of the curves: ${result.replay_ok ? "matches the budget" : "differs"}`,
    }),
    el("li", {
      text: result.outside_guarantee
        ? `filter's guarantee: left at entry #${result.outside_guarantee.since_seq} ` +
          `(${result.outside_guarantee.reason})`
        : "filter's guarantee: holds (no refund, no cap raised after a charge)",
    }),
    el("li", {
      class: "hash",
      title: result.last_hash,
      text: `last hash ${result.last_hash.slice(0, 16)}…`,
    }),
  );
  const children = [verdict, facts];
  if (result.problems.length) {
    children.push(
      el("h3", { text: "Problems" }),
      el(
        "ul",
        { class: "problems" },
        result.problems.map((text) => el("li", { text })),
      ),
    );
  }
  box.replaceChildren(...children);
}

async function loadIntegrity() {
  const box = document.getElementById("integrity");
  box.dataset.state = "checking";
  box.replaceChildren(el("p", { class: "muted", text: "Checking…" }));
  try {
    renderIntegrity(await getJson(`${ledgerPath}/verify`));
  } catch (error) {
    box.dataset.state = "error";
    box.replaceChildren(
      el("p", { class: "error", text: `Could not run the check: ${describeError(error)}` }),
    );
  }
}

// ---------------------------------------------------------------- filters

function matches(entry) {
  return (!state.kind || entry.kind === state.kind) && (!state.run || entry.run_id === state.run);
}

function countBy(values) {
  const counts = new Map();
  for (const value of values) counts.set(value, (counts.get(value) || 0) + 1);
  return counts;
}

function fillSelect(select, allLabel, counts, chosen) {
  const options = [el("option", { value: "", text: allLabel })];
  for (const [value, count] of counts) {
    options.push(el("option", { value, text: `${value} (${count})` }));
  }
  if (chosen && !counts.has(chosen))
    options.push(el("option", { value: chosen, text: `${chosen} (0)` }));
  select.replaceChildren(...options);
  select.value = chosen;
}

function renderFilterOptions() {
  const kinds = countBy(state.entries.map((entry) => entry.kind));
  const runs = countBy(state.entries.filter((entry) => entry.run_id).map((entry) => entry.run_id));
  fillSelect(document.getElementById("filter-kind"), "all kinds", kinds, state.kind);
  fillSelect(document.getElementById("filter-run"), "all runs", runs, state.run);
}

function readFiltersFromUrl() {
  const query = new URLSearchParams(location.search);
  state.kind = query.get("kind") || "";
  state.run = query.get("run_id") || "";
}

function writeFiltersToUrl() {
  const query = new URLSearchParams();
  if (state.kind) query.set("kind", state.kind);
  if (state.run) query.set("run_id", state.run);
  const search = query.toString();
  history.replaceState(null, "", search ? `?${search}` : location.pathname);
}

function applyFilters() {
  let shown = 0;
  for (const row of document.querySelectorAll("#ledger tbody tr")) {
    const visible = matches(state.bySeq.get(Number(row.dataset.seq)));
    row.hidden = !visible;
    if (visible) shown += 1;
  }
  for (const point of document.querySelectorAll("#chart [data-seq]")) {
    point.classList.toggle("filtered-out", !matches(state.bySeq.get(Number(point.dataset.seq))));
  }
  const total = state.entries.length;
  document.getElementById("ledger-count").textContent =
    shown === total ? `${total} entries.` : `Showing ${shown} of ${total} entries.`;
  updateTabStop();
}

// ---------------------------------------------------------------- table

// Who wrote an entry: the key's name and role as recorded with it. Entries written before
// names were recorded (and those of unnamed keys) have no name: the key id stands in.
function actorName(entry) {
  return entry.actor_name ?? entry.actor;
}

function actorText(entry) {
  const role = entry.actor_role ? ` (${entry.actor_role})` : "";
  const key = entry.actor_name == null ? "" : `, key ${entry.actor}`;
  return `${actorName(entry)}${role}${key}`;
}

function actorCell(entry) {
  const named = entry.actor_name != null;
  return el(
    "td",
    { class: "actor", title: `key ${entry.actor}` },
    el("div", { class: named ? "actor-name" : "actor-name mono", text: actorName(entry) }),
    entry.actor_role ? el("div", { class: "actor-role", text: entry.actor_role }) : null,
  );
}

function renderTable() {
  const rows = state.entries.map((entry) =>
    el(
      "tr",
      {
        "data-seq": entry.seq,
        "data-kind": entry.kind,
        onclick: () => select(entry.seq, { scroll: false }),
      },
      el("td", { class: "num", text: entry.seq }),
      el(
        "td",
        { class: "nowrap" },
        el("time", { datetime: entry.created_at, text: formatTime(entry.created_at) }),
      ),
      actorCell(entry),
      el("td", {}, el("span", { class: `kind kind-${entry.kind}`, text: entry.kind })),
      el("td", { class: "mono", text: subject(entry) }),
      el(
        "td",
        { class: "mechanism" },
        el("div", { text: formatMechanism(entry.mechanism) }),
        el("div", { class: "details", text: formatParameters(entry.details) }),
      ),
      el("td", { class: "num", text: formatEpsilon(entry.epsilon) }),
      el("td", {
        class: "num",
        title: movement(entry.epsilon_spent_before, entry.epsilon_spent_after),
        text: formatEpsilon(entry.epsilon_spent_after),
      }),
      el("td", {
        class: "num",
        title: movement(entry.epsilon_reserved_before, entry.epsilon_reserved_after),
        text: formatEpsilon(entry.epsilon_reserved_after),
      }),
    ),
  );
  document.querySelector("#ledger tbody").replaceChildren(...rows);
}

// ---------------------------------------------------------------- chart

const CHART_MARGIN = { top: 14, right: 18, bottom: 36, left: 52 };
const TIME_STEPS = [
  1,
  2,
  5,
  10,
  20,
  50,
  100,
  200,
  500,
  1e3,
  2e3,
  5e3,
  10e3,
  15e3,
  30e3,
  60e3,
  120e3,
  300e3,
  600e3,
  900e3,
  1800e3,
  3600e3,
  7200e3,
  10800e3,
  21600e3,
  43200e3,
  86400e3,
  2 * 86400e3,
  7 * 86400e3,
  14 * 86400e3,
  30 * 86400e3,
  91 * 86400e3,
  182 * 86400e3,
  365 * 86400e3,
];

function niceStep(span, count) {
  const raw = span / Math.max(1, count);
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const residual = raw / magnitude;
  const factor = residual <= 1 ? 1 : residual <= 2 ? 2 : residual <= 5 ? 5 : 10;
  return factor * magnitude;
}

// Loops, not Math.max(...values): a long ledger would overflow the argument list.
function lowest(values) {
  return values.reduce((low, value) => (value < low ? value : low), Infinity);
}

function highest(values) {
  return values.reduce((high, value) => (value > high ? value : high), -Infinity);
}

/** Milliseconds of an API timestamp; the microseconds are cut, not every engine parses them. */
function parseTime(iso) {
  return Date.parse(iso.replace(/(\.\d{3})\d+/, "$1"));
}

function capsOf(entries, currentCap) {
  // The cap is not a column of the ledger; it is set at creation and by each cap_change.
  let cap = null;
  const caps = entries.map((entry) => {
    if (entry.kind === "dataset_created" && typeof entry.details.epsilon_cap === "number") {
      cap = entry.details.epsilon_cap;
    } else if (entry.kind === "cap_change" && typeof entry.details.new === "number") {
      cap = entry.details.new;
    }
    return cap;
  });
  return caps.map((value) => (value === null ? currentCap : value));
}

/** Where a point sits: on the line its entry moved. */
function pointValue(entry, index) {
  if (entry.kind === "hold" || entry.kind === "release_hold") return entry.epsilon_reserved_after;
  if (entry.kind === "cap_change" || entry.kind === "dataset_created") return state.caps[index];
  return entry.epsilon_spent_after;
}

function pointGroup(kind) {
  if (kind === "charge") return "charge";
  if (kind === "void") return "void";
  if (kind === "hold" || kind === "release_hold") return "hold";
  if (kind === "cap_change" || kind === "dataset_created") return "cap";
  return "other";
}

function timeLabel(ms, step, span) {
  const iso = new Date(ms).toISOString();
  if (step >= 86400e3) return iso.slice(0, 10);
  const day = span >= 86400e3 ? `${iso.slice(5, 10)} ` : "";
  if (step >= 60e3) return day + iso.slice(11, 16);
  if (step >= 1e3) return day + iso.slice(11, 19);
  return day + iso.slice(11, 23);
}

function xTicks(x0, x1, width) {
  const wanted = width < 560 ? 3 : 6;
  if (state.axis === "seq") {
    const step = Math.max(1, Math.round(niceStep(x1 - x0, wanted)));
    const ticks = [];
    for (let value = Math.ceil(x0 / step) * step; value <= x1; value += step) {
      ticks.push({ value, label: `#${value}` });
    }
    return ticks;
  }
  const span = x1 - x0;
  const step = TIME_STEPS.find((candidate) => span / candidate <= wanted) || TIME_STEPS.at(-1);
  const ticks = [];
  for (let value = Math.ceil(x0 / step) * step; value <= x1; value += step) {
    ticks.push({ value, label: timeLabel(value, step, span) });
  }
  return ticks;
}

function tooltipLines(entry) {
  return [
    el("strong", { text: `#${entry.seq} ${entry.kind}` }),
    el("span", { text: `${formatTime(entry.created_at)} UTC` }),
    el("span", { text: `actor ${actorText(entry)}` }),
    entry.run_id ? el("span", { text: `run ${entry.run_id}` }) : null,
    el("span", { text: `entry ε ${formatEpsilon(entry.epsilon)}` }),
    el("span", {
      text:
        `ε after: spent ${formatEpsilon(entry.epsilon_spent_after)}, ` +
        `reserved ${formatEpsilon(entry.epsilon_reserved_after)}`,
    }),
    entry.epsilon_spent_before === null || entry.epsilon_spent_before === undefined
      ? null
      : el("span", {
          text:
            `moved ε spent ${formatEpsilon(entry.epsilon_spent_before)} → ` +
            formatEpsilon(entry.epsilon_spent_after),
        }),
  ];
}

function showTooltip(point) {
  const entry = state.bySeq.get(Number(point.dataset.seq));
  const tooltip = document.getElementById("chart-tooltip");
  const chart = document.getElementById("chart");
  tooltip.replaceChildren(...tooltipLines(entry).filter(Boolean));
  tooltip.hidden = false;
  const x = Number(point.getAttribute("cx"));
  const y = Number(point.getAttribute("cy"));
  const width = tooltip.offsetWidth;
  const height = tooltip.offsetHeight;
  let left = x + 12;
  if (left + width > chart.clientWidth) left = Math.max(0, x - 12 - width);
  let top = y - height - 10;
  if (top < 0) top = y + 12;
  tooltip.style.left = `${left}px`;
  tooltip.style.top = `${top}px`;
}

function hideTooltip() {
  document.getElementById("chart-tooltip").hidden = true;
}

function renderChart() {
  const chart = document.getElementById("chart");
  chart.querySelector("svg")?.remove();
  hideTooltip();
  const entries = state.entries;
  if (!entries.length) return;
  const width = Math.max(280, chart.clientWidth);
  const height = width < 560 ? 240 : 320;
  const m = CHART_MARGIN;
  const plotWidth = width - m.left - m.right;
  const plotHeight = height - m.top - m.bottom;

  const xValues = entries.map((entry) =>
    state.axis === "time" ? parseTime(entry.created_at) : entry.seq,
  );
  let x0 = lowest(xValues);
  let x1 = highest(xValues);
  if (x1 - x0 <= 0) {
    const pad = state.axis === "time" ? 1000 : 1;
    x0 -= pad;
    x1 += pad;
  }
  const yMax = Math.max(
    highest(state.caps),
    highest(entries.map((entry) => entry.epsilon_reserved_after)),
    highest(entries.map((entry) => entry.epsilon_spent_after)),
  );
  const yStep = niceStep(yMax > 0 ? yMax : 1, 4);
  const yTop = Math.max(yStep, Math.ceil((yMax * 1.04) / yStep) * yStep);
  const px = (value) => m.left + ((value - x0) / (x1 - x0)) * plotWidth;
  const py = (value) => m.top + plotHeight - (Math.max(0, value) / yTop) * plotHeight;
  const at = (index) => px(xValues[index]).toFixed(1);

  function stepPath(values) {
    let d = `M${at(0)},${py(values[0]).toFixed(1)}`;
    for (let i = 1; i < values.length; i += 1) d += `H${at(i)}V${py(values[i]).toFixed(1)}`;
    return d;
  }
  const areaPath = (values) => `${stepPath(values)}V${py(0).toFixed(1)}H${at(0)}Z`;

  const spent = entries.map((entry) => entry.epsilon_spent_after);
  const reserved = entries.map((entry) => entry.epsilon_reserved_after);

  const grid = [];
  for (let value = 0; value <= yTop + yStep / 1e6; value += yStep) {
    const y = py(value).toFixed(1);
    grid.push(
      svgEl("line", { class: "grid", x1: m.left, x2: m.left + plotWidth, y1: y, y2: y }),
      svgEl("text", {
        class: "tick",
        x: m.left - 6,
        y,
        dy: "0.32em",
        "text-anchor": "end",
        text: Number(value.toPrecision(6)),
      }),
    );
  }
  const xAxis = [
    svgEl("line", { class: "axis", x1: m.left, x2: m.left + plotWidth, y1: py(0), y2: py(0) }),
  ];
  for (const tick of xTicks(x0, x1, width)) {
    const x = px(tick.value).toFixed(1);
    xAxis.push(
      svgEl("line", { class: "axis", x1: x, x2: x, y1: py(0), y2: py(0) + 5 }),
      svgEl("text", { class: "tick", x, y: py(0) + 18, "text-anchor": "middle", text: tick.label }),
    );
  }

  const points = entries.map((entry, index) => {
    const label =
      `Entry ${entry.seq}, ${entry.kind}, ${formatTime(entry.created_at)} UTC, actor ${actorText(entry)}, ` +
      `entry ε ${formatEpsilon(entry.epsilon)}, ε spent after ${formatEpsilon(entry.epsilon_spent_after)}, ` +
      `ε reserved after ${formatEpsilon(entry.epsilon_reserved_after)}`;
    return svgEl("circle", {
      class: `point point-${pointGroup(entry.kind)}`,
      "data-seq": entry.seq,
      cx: at(index),
      cy: py(pointValue(entry, index)).toFixed(1),
      r: 5,
      tabindex: -1,
      role: "button",
      "aria-label": label,
    });
  });

  const svg = svgEl(
    "svg",
    {
      width,
      height,
      viewBox: `0 0 ${width} ${height}`,
      role: "group",
      "aria-label": `ε spent, reserved and the cap over the ledger's ${entries.length} entries`,
      "aria-describedby": "chart-help",
    },
    svgEl("path", { class: "area-reserved", d: areaPath(reserved) }),
    svgEl("path", { class: "area-spent", d: areaPath(spent) }),
    svgEl("g", { class: "grid-lines" }, grid),
    svgEl("path", { class: "line-cap", d: stepPath(state.caps) }),
    svgEl("path", { class: "line-reserved", d: stepPath(reserved) }),
    svgEl("path", { class: "line-spent", d: stepPath(spent) }),
    svgEl("g", { class: "x-axis" }, xAxis),
    svgEl("text", {
      class: "axis-title",
      x: 12,
      y: m.top + plotHeight / 2,
      transform: `rotate(-90 12 ${m.top + plotHeight / 2})`,
      "text-anchor": "middle",
      text: "ε",
    }),
    svgEl("g", { class: "points" }, points),
  );
  chart.prepend(svg);
  wirePoints(svg);
  applyFilters();
  markSelection();
}

function visiblePoints() {
  return [...document.querySelectorAll("#chart [data-seq]:not(.filtered-out)")];
}

/** One tab stop for the whole chart (roving tabindex): the selected point, or the first shown. */
function updateTabStop() {
  const points = visiblePoints();
  const current =
    points.find((point) => Number(point.dataset.seq) === state.selected) || points[0] || null;
  for (const point of document.querySelectorAll("#chart [data-seq]")) {
    point.setAttribute("tabindex", point === current ? "0" : "-1");
  }
}

function wirePoints(svg) {
  svg.addEventListener("mouseover", (event) => {
    if (event.target.dataset?.seq) showTooltip(event.target);
  });
  svg.addEventListener("mouseout", (event) => {
    if (event.target.dataset?.seq && document.activeElement !== event.target) hideTooltip();
  });
  svg.addEventListener("focusin", (event) => {
    if (event.target.dataset?.seq) showTooltip(event.target);
  });
  svg.addEventListener("focusout", hideTooltip);
  svg.addEventListener("click", (event) => {
    if (!event.target.dataset?.seq) return;
    select(Number(event.target.dataset.seq));
    showTooltip(event.target);
  });
  svg.addEventListener("keydown", (event) => {
    const point = event.target;
    if (!point.dataset?.seq) return;
    const points = visiblePoints();
    const index = points.indexOf(point);
    let next = null;
    if (event.key === "ArrowRight" || event.key === "ArrowUp") next = points[index + 1];
    else if (event.key === "ArrowLeft" || event.key === "ArrowDown") next = points[index - 1];
    else if (event.key === "Home") next = points[0];
    else if (event.key === "End") next = points.at(-1);
    else if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      select(Number(point.dataset.seq));
      point.focus();
      return;
    } else return;
    event.preventDefault();
    if (next) {
      point.setAttribute("tabindex", "-1");
      next.setAttribute("tabindex", "0");
      next.focus();
    }
  });
}

function markSelection() {
  for (const node of document.querySelectorAll("#chart [data-seq], #ledger tbody tr")) {
    const selected = Number(node.dataset.seq) === state.selected;
    node.classList.toggle("selected", selected);
    if (node.tagName.toLowerCase() === "circle")
      node.setAttribute("aria-pressed", String(selected));
  }
  updateTabStop();
}

function select(seq, { scroll = true } = {}) {
  state.selected = state.selected === seq && !scroll ? null : seq;
  markSelection();
  if (scroll) {
    document
      .querySelector(`#ledger tbody tr[data-seq="${seq}"]`)
      ?.scrollIntoView({ block: "nearest" });
  }
}

// ---------------------------------------------------------------- exports

async function download(format) {
  const status = document.getElementById("export-status");
  const buttons = [document.getElementById("export-csv"), document.getElementById("export-json")];
  const query = new URLSearchParams({ format: format === "csv" ? "csv" : "export" });
  if (state.kind) query.set("kind", state.kind);
  if (state.run) query.set("run_id", state.run);
  const suffix = [state.kind, state.run].filter(Boolean).join("-");
  const name = `${datasetId}-ledger${suffix ? `-${suffix}` : ""}.${format}`;
  buttons.forEach((button) => (button.disabled = true));
  status.classList.remove("error");
  status.textContent = `Preparing ${format.toUpperCase()}…`;
  try {
    const response = await apiGet(
      `${ledgerPath}?${query}`,
      format === "csv" ? "text/csv" : "application/json",
    );
    // The export needs the Bearer header, so it cannot be a plain link: fetch, then hand
    // the browser a Blob to save.
    const url = URL.createObjectURL(await response.blob());
    const link = el("a", { href: url, download: name, hidden: true });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
    status.textContent = `Downloaded ${name}.`;
  } catch (error) {
    status.textContent =
      error instanceof ApiError && error.status === 401
        ? "Export failed: the key is no longer accepted; sign out and in again."
        : `Export failed: ${describeError(error)}`;
    status.classList.add("error");
  } finally {
    buttons.forEach((button) => (button.disabled = false));
  }
}

// ---------------------------------------------------------------- page

async function load() {
  setStatus("Loading…");
  readFiltersFromUrl();
  const integrity = loadIntegrity();
  const [dataset, entries] = await Promise.all([
    getJson(`/v1/datasets/${encodeURIComponent(datasetId)}`),
    allPages(ledgerPath, (entry) => entry.seq),
  ]);
  state.dataset = dataset;
  state.entries = entries;
  state.bySeq = new Map(entries.map((entry) => [entry.seq, entry]));
  state.caps = capsOf(entries, dataset.epsilon_cap);
  renderBudget();
  renderFilterOptions();
  renderTable();
  renderChart();
  applyFilters();
  setStatus("");
  await integrity;
}

function onFilterChange() {
  state.kind = document.getElementById("filter-kind").value;
  state.run = document.getElementById("filter-run").value;
  writeFiltersToUrl();
  applyFilters();
}

document.getElementById("filter-kind").addEventListener("change", onFilterChange);
document.getElementById("filter-run").addEventListener("change", onFilterChange);
document.getElementById("filter-reset").addEventListener("click", () => {
  document.getElementById("filter-kind").value = "";
  document.getElementById("filter-run").value = "";
  onFilterChange();
});
document.getElementById("export-csv").addEventListener("click", () => download("csv"));
document.getElementById("export-json").addEventListener("click", () => download("json"));
for (const radio of document.querySelectorAll('input[name="axis"]')) {
  radio.addEventListener("change", () => {
    state.axis = radio.value;
    renderChart();
  });
}
let resizeFrame = 0;
window.addEventListener("resize", () => {
  cancelAnimationFrame(resizeFrame);
  resizeFrame = requestAnimationFrame(() => {
    if (state.entries.length) renderChart();
  });
});

startPage(load);
