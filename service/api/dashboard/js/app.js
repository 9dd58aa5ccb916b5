// The single-page app: hash routes, each page rendered into <main id="view">.
//   #/runs                 runs table (live), filters, submit form
//   #/runs/<id>[?compare=<id>,<id>]   one run: curves (live), overlays, evaluation
//   #/predict[?run=<id>]   predict playground
//   #/sweeps[/<id>]        sweeps: heatmap of the validation metric, results table

import { apiKey, askForKey, setApiKey } from "./api.js";
import { fill, h } from "./dom.js";
import * as predictPage from "./pages/predict.js";
import * as runPage from "./pages/run.js";
import * as runsPage from "./pages/runs.js";
import * as sweepsPage from "./pages/sweeps.js";

const view = document.getElementById("view");
let current = null; // {controller: AbortController, dispose: () => void}

function parseHash() {
  const hash = location.hash.replace(/^#\/?/, "");
  const [path, query = ""] = hash.split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  return { parts, query: new URLSearchParams(query) };
}

function route() {
  const { parts, query } = parseHash();
  const [section = "runs", id] = parts;
  if (section === "runs" && id) return { nav: "run", page: runPage, params: { runId: id, query } };
  if (section === "run") return { nav: "run", page: runPage, params: { runId: id || null, query } };
  if (section === "predict") return { nav: "predict", page: predictPage, params: { runId: query.get("run"), query } };
  if (section === "sweeps") return { nav: "sweeps", page: sweepsPage, params: { sweepId: id || null, query } };
  return { nav: "runs", page: runsPage, params: { query } };
}

async function show() {
  if (current) {
    current.controller.abort();
    try {
      current.dispose?.();
    } catch (error) {
      console.error(error);
    }
  }
  const { nav, page, params } = route();
  for (const link of document.querySelectorAll("[data-nav]")) link.classList.toggle("active", link.dataset.nav === nav);
  const controller = new AbortController();
  current = { controller, dispose: null };
  const container = h("div", { class: "page", dataset: { page: nav } });
  fill(view, container);
  try {
    current.dispose = await page.render(container, params, { signal: controller.signal });
  } catch (error) {
    if (controller.signal.aborted) return;
    console.error(error);
    fill(container, h("div", { class: "card error-text", role: "alert" }, error.describe ? error.describe() : String(error.message || error)));
  }
}

function updateKeyButton() {
  document.getElementById("key-button").textContent = apiKey() ? "API key ✓" : "API key";
}

document.getElementById("key-button").addEventListener("click", () => {
  askForKey("").then(show, () => {});
});
document.getElementById("key-forget").addEventListener("click", () => {
  setApiKey("");
  document.getElementById("key-reason").textContent = "The key was forgotten.";
});
document.addEventListener("mcdrop:key-changed", updateKeyButton);
window.addEventListener("hashchange", show);
updateKeyButton();
show();
