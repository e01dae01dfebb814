// Shared by the dashboard pages: the signed-in key, calls to /v1, DOM building, formats.
// Every piece of data reaches the page through text nodes or attributes, never as HTML.

const KEY_STORAGE = "privacy-ledger.api-key";
const SVG_NS = "http://www.w3.org/2000/svg";

export function storedKey() {
  try {
    return sessionStorage.getItem(KEY_STORAGE);
  } catch {
    return null;
  }
}

function storeKey(key) {
  sessionStorage.setItem(KEY_STORAGE, key);
}

function forgetKey() {
  try {
    sessionStorage.removeItem(KEY_STORAGE);
  } catch {
    // Storage unavailable: there is nothing to forget.
  }
}

/** A refusal from the API (problem+json), or the service out of reach (status 0). */
export class ApiError extends Error {
  constructor(status, code, detail) {
    super(detail || code);
    this.status = status;
    this.code = code;
  }
}

/** GET a /v1 path with the signed-in key; throws ApiError unless 2xx. */
export async function apiGet(path, accept = "application/json") {
  const headers = { Accept: accept };
  const key = storedKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  let response;
  try {
    response = await fetch(path, { headers, cache: "no-store", credentials: "omit" });
  } catch {
    throw new ApiError(0, "network", "The service could not be reached.");
  }
  if (!response.ok) {
    let body = null;
    try {
      body = await response.json();
    } catch {
      // Not problem+json (a proxy page, say): fall back to the status line.
    }
    const code = body && typeof body.code === "string" ? body.code : `http_${response.status}`;
    const detail = body && typeof body.detail === "string" ? body.detail : response.statusText;
    throw new ApiError(response.status, code, detail);
  }
  return response;
}

export async function getJson(path) {
  return (await apiGet(path)).json();
}

/** Every item of a paged /v1 listing, following the `after` cursor. */
export async function allPages(path, cursorOf, params = {}) {
  const items = [];
  let after = null;
  for (;;) {
    const query = new URLSearchParams({ ...params, limit: "1000" });
    if (after !== null) query.set("after", String(after));
    const page = await getJson(`${path}?${query}`);
    items.push(...page.data);
    if (!page.has_more || page.data.length === 0) return items;
    after = cursorOf(page.data[page.data.length - 1]);
  }
}

function build(node, attrs, children) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "text") node.textContent = String(value);
    else if (name === "class") node.setAttribute("class", value);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** An HTML element; strings among the children become text nodes. */
export function el(tag, attrs, ...children) {
  return build(document.createElement(tag), attrs, children);
}

/** An SVG element. */
export function svgEl(tag, attrs, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

/** ε for people: three decimals, or three significant digits when tiny. */
export function formatEpsilon(value) {
  if (value === null || value === undefined) return "—";
  if (value === 0) return "0";
  if (Math.abs(value) >= 0.001) return value.toFixed(3);
  return value.toPrecision(3);
}

/** An API timestamp (ISO 8601 UTC, microseconds) shown to the millisecond. */
export function formatTime(iso) {
  const match = /^(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2}:\d{2})(\.\d{1,3})?/.exec(iso || "");
  return match ? `${match[1]} ${match[2]}${match[3] || ""}` : String(iso);
}

export function datasetUrl(id) {
  return `/ui/datasets/${encodeURIComponent(id)}`;
}

/**
 * The budget bar: spent, then the holds up to reserved (reserved = spent + holds), and a
 * mark at the cap. The track spans the cap, or what is reserved when a lowered cap sits
 * below it.
 */
export function budgetBar(dataset) {
  const spent = Math.max(0, dataset.epsilon_spent);
  const reserved = Math.max(spent, dataset.epsilon_reserved);
  const cap = Math.max(0, dataset.epsilon_cap);
  const scale = Math.max(cap, reserved) || 1;
  const percent = (value) => `${Math.min(100, (100 * value) / scale).toFixed(3)}%`;
  const label =
    `ε spent ${formatEpsilon(dataset.epsilon_spent)}, ` +
    `reserved ${formatEpsilon(dataset.epsilon_reserved)}, ` +
    `cap ${formatEpsilon(dataset.epsilon_cap)}`;
  const spentPart = el("span", { class: "bar-spent" });
  const reservedPart = el("span", { class: "bar-reserved" });
  const capMark = el("span", { class: "bar-cap" });
  // Sizes go through the CSSOM, which the Content-Security-Policy allows (style="" would not).
  spentPart.style.width = percent(spent);
  reservedPart.style.width = percent(reserved - spent);
  capMark.style.left = percent(cap);
  const over = reserved > cap;
  return el(
    "div",
    { class: over ? "bar bar-over" : "bar", role: "img", "aria-label": label, title: label },
    spentPart,
    reservedPart,
    capMark,
  );
}

/** The dataset's figures as a definition list. */
export function budgetNumbers(dataset) {
  const item = (term, value, cls) =>
    el(
      "div",
      { class: cls ? `figure ${cls}` : "figure" },
      el("dt", { text: term }),
      el("dd", { text: value }),
    );
  return el(
    "dl",
    { class: "figures" },
    item("ε spent", formatEpsilon(dataset.epsilon_spent), "figure-spent"),
    item("ε reserved", formatEpsilon(dataset.epsilon_reserved), "figure-reserved"),
    item("ε cap", formatEpsilon(dataset.epsilon_cap), "figure-cap"),
    item("ε remaining", formatEpsilon(dataset.epsilon_remaining)),
    item("δ", String(dataset.delta)),
    item("active runs", String(dataset.active_runs)),
    item("ledger entries", String(dataset.ledger_seq)),
  );
}

export function setStatus(text, isError = false) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

/** A failure as one sentence for the status line. */
export function describeError(error) {
  if (!(error instanceof ApiError)) return `Something went wrong: ${error.message || error}`;
  if (error.status === 0) return error.message;
  if (error.status === 403)
    return "This key may not read this (an auditor or admin key is needed).";
  if (error.status === 404) return "Not found, or outside this key's datasets.";
  return `The service refused: ${error.message} (${error.code}).`;
}

/**
 * Run a page: show the sign-in form until a key is accepted, then call `load`.
 * A 401 at any point (key revoked, say) forgets the key and asks again.
 */
export function startPage(load) {
  const signInSection = document.getElementById("sign-in-section");
  const content = document.getElementById("content");
  const form = document.getElementById("sign-in");
  const input = document.getElementById("api-key");
  const error = document.getElementById("sign-in-error");
  const signOut = document.getElementById("sign-out");

  function showSignIn(message) {
    content.hidden = true;
    signOut.hidden = true;
    signInSection.hidden = false;
    error.hidden = !message;
    error.textContent = message || "";
    input.value = "";
  }

  async function run() {
    signInSection.hidden = true;
    content.hidden = false;
    signOut.hidden = false;
    try {
      await load();
    } catch (failure) {
      if (failure instanceof ApiError && failure.status === 401) {
        forgetKey();
        showSignIn("The key was not accepted (unknown or revoked). Sign in again.");
        input.focus();
        return;
      }
      setStatus(describeError(failure), true);
    }
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) {
      error.textContent = "Enter an API key.";
      error.hidden = false;
      input.focus();
      return;
    }
    storeKey(key);
    await run();
  });
  signOut.addEventListener("click", () => {
    forgetKey();
    showSignIn("");
    input.focus();
  });

  if (storedKey()) run();
  else showSignIn("");
}
