// Small DOM helpers. Every text from the API goes through textContent, never innerHTML.

/** h("td", {class: "num", dataset: {value: 1}}, "text", child) -> an element. */
export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") element.className = value;
    else if (name === "dataset") Object.assign(element.dataset, value);
    else if (name === "style" && typeof value === "object") Object.assign(element.style, value);
    else if (name.startsWith("on") && typeof value === "function") element.addEventListener(name.slice(2), value);
    else if (value === true) element.setAttribute(name, "");
    else element.setAttribute(name, String(value));
  }
  append(element, children);
  return element;
}

function append(element, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace an element's children. */
export function fill(element, ...children) {
  element.replaceChildren();
  append(element, children);
  return element;
}

/** A number for people: fixed decimals, or a dash when there is none. */
export function fmt(value, digits = 3) {
  if (value === null || value === undefined || Number.isNaN(value)) return "—";
  if (typeof value !== "number") return String(value);
  if (value !== 0 && (Math.abs(value) >= 1e5 || Math.abs(value) < 10 ** -digits)) return value.toExponential(2);
  return value.toFixed(digits);
}

/** A table cell showing a number, with the exact value kept in data-value. */
export function numberCell(value, digits = 3, attributes = {}) {
  return h("td", { class: "num", ...attributes, dataset: { value: value ?? "", ...(attributes.dataset || {}) } }, fmt(value, digits));
}

/** "mean ± se" */
export function meanSe(pair, digits = 3) {
  if (!pair || pair.mean === null || pair.mean === undefined) return "—";
  return pair.se === null || pair.se === undefined ? fmt(pair.mean, digits) : `${fmt(pair.mean, digits)} ± ${fmt(pair.se, digits)}`;
}

export function shortId(id) {
  return String(id).slice(0, 8);
}

export function when(iso) {
  if (!iso) return "—";
  const date = new Date(iso);
  const seconds = (Date.now() - date.getTime()) / 1000;
  if (seconds < 60) return `${Math.max(0, Math.round(seconds))} s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.round(seconds / 3600)} h ago`;
  return date.toLocaleString();
}

export function statusBadge(status) {
  return h("span", { class: `badge status-${status}`, dataset: { field: "status" } }, status);
}

/** Parse "64, 64" or "0.5 0.3" into numbers; throws with a message naming the field. */
export function parseNumberList(text, field, { integer = false } = {}) {
  const parts = String(text).split(/[\s,;]+/).filter(Boolean);
  if (!parts.length) throw new Error(`${field}: give at least one number`);
  return parts.map((part) => {
    const value = Number(part);
    if (!Number.isFinite(value) || (integer && !Number.isInteger(value))) {
      throw new Error(`${field}: "${part}" is not ${integer ? "a whole number" : "a number"}`);
    }
    return value;
  });
}

/** Show a short message at the bottom of the page. */
export function toast(message, kind = "info") {
  const area = document.getElementById("toasts");
  const note = h("div", { class: `toast toast-${kind}`, role: kind === "error" ? "alert" : "status" }, message);
  area.append(note);
  setTimeout(() => note.remove(), kind === "error" ? 8000 : 4000);
}

/** The header's live indicator: pages report the state of their event stream here. */
export function setLive(state) {
  const live = document.getElementById("live");
  live.classList.toggle("on", state === "open" || state === "closed");
  live.dataset.state = state;
  live.textContent = { open: "● live", reconnecting: "○ reconnecting…", error: "○ offline", closed: "● up to date" }[state] || "";
}
