// Sweeps: the list (live through GET /v1/events?kind=sweep), a form for a new one, and one
// sweep's results: a heatmap of the validation metric over two grid axes (the best over any
// other axis), the ranking, and the protocol's test results when the best were retrained.

import { api, follow } from "../api.js";
import { fill, fmt, h, meanSe, numberCell, parseNumberList, setLive, shortId, statusBadge, toast, when } from "../dom.js";
import { loadDatasets } from "./runs.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const AXES = ["dropout", "input_dropout", "tau", "prior_lengthscale", "weight_decay", "hidden_layers", "learning_rate"];
const AXIS_NAMES = {
  dropout: "dropout rate", input_dropout: "input dropout", tau: "τ", prior_lengthscale: "prior length-scale",
  weight_decay: "weight decay", hidden_layers: "hidden layers", learning_rate: "learning rate",
};
const METRICS = { log_likelihood: { name: "validation log-likelihood", higher: true }, rmse: { name: "validation RMSE", higher: false } };

function axisValue(configuration, axis) {
  const value = configuration[axis];
  return Array.isArray(value) ? value.join("-") : value === null || value === undefined ? "—" : String(value);
}

/** Viridis, roughly: t in [0, 1] -> a CSS colour (0 dark purple, 1 yellow). */
function viridis(t) {
  const stops = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const x = Math.min(1, Math.max(0, t)) * (stops.length - 1);
  const i = Math.min(stops.length - 2, Math.floor(x));
  const f = x - i;
  const c = stops[i].map((v, k) => Math.round(v + f * (stops[i + 1][k] - v)));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

function progress(item) {
  const percent = item.epochs_total ? Math.min(100, (100 * item.epochs_done) / item.epochs_total) : 0;
  return h("div", { class: "progress", dataset: { field: "progress" } },
    h("div", { class: "bar" }, h("span", { style: { width: `${percent}%` } })),
    h("span", { class: "text" }, `${Math.round(percent)} %`));
}

export async function render(container, params, { signal }) {
  return params.sweepId ? renderSweep(container, params.sweepId, signal) : renderList(container, signal);
}

async function renderList(container, signal) {
  const state = { sweeps: new Map(), datasets: new Map() };
  const tbody = h("tbody");
  const datasetSelect = h("select", { id: "sweep-dataset" });
  const inputs = {
    hidden: h("input", { id: "sweep-hidden", value: "50" }),
    epochs: h("input", { id: "sweep-epochs", type: "number", min: 1, step: 1, value: 40 }),
    batch: h("input", { id: "sweep-batch", type: "number", min: 1, step: 1, value: 128 }),
    dropout: h("input", { id: "sweep-grid-dropout", value: "0.005, 0.01, 0.05, 0.1" }),
    tau: h("input", { id: "sweep-grid-tau", value: "0.1, 0.15, 0.2" }),
    lengthscale: h("input", { id: "sweep-lengthscale", type: "number", step: "any", min: 0, value: 0.01 }),
    tie: h("input", { id: "sweep-tie", type: "checkbox", checked: true }),
    folds: h("input", { id: "sweep-folds", type: "number", min: 2, max: 50, step: 1, value: 5 }),
    metric: h("select", { id: "sweep-metric" }, h("option", { value: "log_likelihood" }, "log-likelihood"), h("option", { value: "rmse" }, "RMSE")),
    retrain: h("input", { id: "sweep-retrain", type: "checkbox", checked: true }),
    searchSamples: h("input", { id: "sweep-search-samples", type: "number", min: 1, max: 10000, step: 1, value: 100 }),
    testSamples: h("input", { id: "sweep-test-samples", type: "number", min: 1, max: 10000, step: 1, value: 1000 }),
  };
  const formError = h("p", { class: "error-text", id: "sweep-form-error", role: "alert" });
  const form = h("form", { id: "sweep-form", class: "form-grid", novalidate: true },
    h("label", { class: "wide" }, "Dataset (regression)", datasetSelect),
    h("label", {}, "Hidden layers", inputs.hidden),
    h("label", {}, "Epochs", inputs.epochs),
    h("label", {}, "Batch size", inputs.batch),
    h("label", { class: "wide" }, "Grid: dropout rates", inputs.dropout),
    h("label", { class: "wide" }, "Grid: τ values", inputs.tau),
    h("label", {}, "Prior length-scale", inputs.lengthscale),
    h("label", {}, "Input dropout = dropout", inputs.tie),
    h("label", {}, "Folds", inputs.folds),
    h("label", {}, "Rank by", inputs.metric),
    h("label", {}, "Retrain best & test", inputs.retrain),
    h("label", {}, "T (search)", inputs.searchSamples),
    h("label", {}, "T (test)", inputs.testSamples),
    h("div", {}, h("button", { type: "submit", id: "sweep-submit" }, "Queue sweep")));

  fill(container,
    h("section", { class: "card" }, h("h2", {}, "Sweeps"),
      h("table", { id: "sweeps-table" }, h("thead", {}, h("tr", {},
        ["Sweep", "Dataset", "Status", "Progress", "Grid × splits", "Ranked by", "Best configuration", "Created"].map((name) => h("th", {}, name)))), tbody)),
    h("details", { class: "card" }, h("summary", {}, h("strong", {}, "New sweep"), h("span", { class: "muted" }, " — the MC dropout paper's protocol: grid × folds, rank on validation, retrain the best per split, test")),
      form, formError));

  function draw() {
    const items = [...state.sweeps.values()].sort((a, b) => (a.created_at < b.created_at ? 1 : -1));
    fill(tbody, items.length ? items.map((sweep) => {
      const best = sweep.results?.best;
      const grid = sweep.spec.grid || {};
      const bestText = best ? AXES.filter((axis) => grid[axis]).map((axis) => `${AXIS_NAMES[axis]} ${axisValue(best, axis)}`).join(", ") || "the only one" : "—";
      return h("tr", { dataset: { sweepId: sweep.id } },
        h("td", {}, h("a", { href: `#/sweeps/${sweep.id}`, title: sweep.id }, shortId(sweep.id))),
        h("td", {}, state.datasets.get(sweep.dataset_id)?.name ?? shortId(sweep.dataset_id)),
        h("td", {}, statusBadge(sweep.status)),
        h("td", {}, progress(sweep)),
        h("td", {}, `${sweep.n_configurations} × ${sweep.n_splits}`),
        h("td", {}, sweep.spec.metric),
        h("td", {}, bestText),
        h("td", {}, when(sweep.created_at)));
    }) : h("tr", {}, h("td", { colspan: 8, class: "muted" }, "No sweeps yet.")));
  }

  async function relist() {
    const [datasets, page] = await Promise.all([loadDatasets(signal), api("/v1/sweeps?limit=100", { signal })]);
    state.datasets = datasets;
    state.sweeps = new Map(page.items.map((sweep) => [sweep.id, sweep]));
    const regression = [...datasets.values()].filter((d) => d.task === "regression");
    const chosen = datasetSelect.value;
    fill(datasetSelect, regression.length ? regression.map((d) => h("option", { value: d.id }, `${d.name} (${d.n_rows} rows)`))
      : h("option", { value: "" }, "— add a regression dataset on the Runs page (e.g. diabetes) —"));
    if (chosen) datasetSelect.value = chosen;
    draw();
  }

  async function refresh(id) {
    try {
      state.sweeps.set(id, await api(`/v1/sweeps/${id}`, { signal }));
      draw();
    } catch (error) {
      if (!signal.aborted) console.error(error);
    }
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    formError.textContent = "";
    try {
      if (!datasetSelect.value) throw new Error("Dataset: add a regression dataset first");
      const integer = (input, name) => {
        const value = Number(input.value);
        if (!Number.isInteger(value)) throw new Error(`${name}: a whole number`);
        return value;
      };
      const lengthscale = Number(inputs.lengthscale.value);
      const taus = parseNumberList(inputs.tau.value, "Grid: τ values");
      const body = {
        dataset_id: datasetSelect.value,
        model: { hidden_layers: parseNumberList(inputs.hidden.value, "Hidden layers", { integer: true }), tau: taus[0], ...(lengthscale > 0 ? { prior_lengthscale: lengthscale } : {}) },
        training: { epochs: integer(inputs.epochs, "Epochs"), batch_size: integer(inputs.batch, "Batch size") },
        grid: { dropout: parseNumberList(inputs.dropout.value, "Grid: dropout rates"), tau: taus },
        tie_input_dropout: inputs.tie.checked,
        splits: { folds: integer(inputs.folds, "Folds") },
        metric: inputs.metric.value,
        retrain_best: inputs.retrain.checked,
        search_samples: integer(inputs.searchSamples, "T (search)"),
        test_samples: integer(inputs.testSamples, "T (test)"),
      };
      const sweep = await api("/v1/sweeps", { method: "POST", body, signal });
      toast(`Sweep ${shortId(sweep.id)} queued`);
      location.hash = `#/sweeps/${sweep.id}`;
    } catch (error) {
      formError.textContent = error.describe ? error.describe() : String(error.message || error);
    }
  });

  follow("/v1/events?kind=sweep", ({ event, data }) => {
    if (event === "ready") {
      relist().catch((error) => signal.aborted || toast(error.describe ? error.describe() : String(error), "error"));
    } else if (data?.run_id) {
      const sweep = state.sweeps.get(data.run_id);
      if (sweep && event === "epoch" && !TERMINAL.has(sweep.status)) {
        sweep.status = data.status;
        sweep.epochs_done = Math.max(sweep.epochs_done, data.data.epoch ?? 0);
        draw();
      } else {
        refresh(data.run_id);
      }
    }
  }, { signal, onState: setLive }).catch((error) => signal.aborted || toast(error.describe ? error.describe() : String(error), "error"));
  return () => setLive("off");
}

async function renderSweep(container, sweepId, signal) {
  let sweep = await api(`/v1/sweeps/${sweepId}`, { signal });
  const dataset = await api(`/v1/datasets/${sweep.dataset_id}`, { signal }).catch(() => null);
  let terminal = TERMINAL.has(sweep.status);
  const header = h("div");
  const body = h("div", { id: "sweep-results" });
  fill(container, h("section", { class: "card" }, header), body);

  function showHeader() {
    fill(header,
      h("div", { class: "toolbar" }, h("h1", { style: { margin: 0 } }, `Sweep ${shortId(sweep.id)}`), h("span", { id: "sweep-status" }, statusBadge(sweep.status)), progress(sweep),
        TERMINAL.has(sweep.status) ? null : h("button", { type: "button", class: "danger", onclick: cancel }, "Cancel")),
      h("p", { class: "muted" }, `${dataset?.name ?? shortId(sweep.dataset_id)} · ${sweep.n_configurations} configurations × ${sweep.n_splits} splits · ranked by validation ${sweep.spec.metric} · ${sweep.spec.training.epochs} epochs`),
      sweep.error ? h("p", { class: "error-text" }, sweep.error) : null);
  }

  async function cancel() {
    try {
      sweep = await api(`/v1/sweeps/${sweep.id}/cancel`, { method: "POST", signal });
      showHeader();
    } catch (error) {
      toast(error.describe ? error.describe() : String(error), "error");
    }
  }

  function showResults() {
    if (!sweep.results) {
      fill(body, h("section", { class: "card" }, h("p", { class: "muted" }, TERMINAL.has(sweep.status) ? "This sweep has no results." : "Results appear when the search phase is done.")));
      return;
    }
    fill(body, ...results(sweep));
  }

  showHeader();
  showResults();
  follow(`/v1/runs/${sweep.id}/events`, ({ event, data }) => {
    if (!data) return;
    if (event === "epoch") {
      sweep.epochs_done = Math.max(sweep.epochs_done, data.data.epoch ?? 0);
      sweep.status = data.status;
      showHeader();
    } else if (event === "status") {
      sweep.status = data.status;
      terminal = TERMINAL.has(data.status);
      showHeader();
      if (terminal) {
        api(`/v1/sweeps/${sweep.id}`, { signal }).then((fresh) => {
          sweep = fresh;
          showHeader();
          showResults();
        }).catch((error) => signal.aborted || console.error(error));
      }
    }
  }, { signal, finished: () => terminal, onState: setLive }).catch((error) => signal.aborted || toast(error.describe ? error.describe() : String(error), "error"));
  return () => setLive("off");
}

function results(sweep) {
  const ranking = sweep.results.ranking || [];
  const grid = sweep.spec.grid || {};
  const axes = AXES.filter((axis) => grid[axis] && grid[axis].length);
  const sections = [];

  // ---- heatmap ----
  const xSelect = h("select", { id: "heatmap-x" }, axes.map((axis) => h("option", { value: axis }, AXIS_NAMES[axis])));
  const ySelect = h("select", { id: "heatmap-y" }, h("option", { value: "" }, "—"), axes.map((axis) => h("option", { value: axis }, AXIS_NAMES[axis])));
  const metricSelect = h("select", { id: "heatmap-metric" }, Object.entries(METRICS).map(([key, m]) => h("option", { value: key }, m.name)));
  metricSelect.value = sweep.spec.metric in METRICS ? sweep.spec.metric : "log_likelihood";
  xSelect.value = axes.includes("dropout") ? "dropout" : axes[0] || "";
  ySelect.value = axes.includes("tau") && xSelect.value !== "tau" ? "tau" : axes.find((axis) => axis !== xSelect.value) || "";
  const heatmap = h("div", { id: "heatmap" });
  const drawHeatmap = () => fill(heatmap, heatmapTable(ranking, xSelect.value, ySelect.value, metricSelect.value, axes));
  for (const control of [xSelect, ySelect, metricSelect]) control.addEventListener("change", drawHeatmap);
  drawHeatmap();
  sections.push(h("section", { class: "card" },
    h("h2", {}, "Validation metric over the grid"),
    h("p", { class: "muted" }, "Mean ± standard error over the splits; where the grid has more axes than shown, each cell is the best configuration over the others. The outlined cell is the best."),
    axes.length ? h("div", { class: "toolbar" }, h("label", {}, "Columns", xSelect), h("label", {}, "Rows", ySelect), h("label", {}, "Metric", metricSelect)) : null,
    heatmap));

  // ---- the protocol's test results ----
  const test = sweep.results.test;
  if (test) {
    sections.push(h("section", { class: "card", id: "sweep-test" },
      h("h2", {}, `Test results: each split's best configuration retrained and tested (T = ${test.samples})`),
      h("div", { class: "metrics" },
        h("div", { class: "metric" }, h("div", { class: "name" }, "Test RMSE"), h("div", { class: "value", dataset: { value: test.rmse.mean ?? "" } }, meanSe(test.rmse, 3))),
        h("div", { class: "metric" }, h("div", { class: "name" }, "Test log-likelihood"), h("div", { class: "value", dataset: { value: test.log_likelihood.mean ?? "" } }, meanSe(test.log_likelihood, 3)))),
      h("table", { id: "sweep-test-table" },
        h("thead", {}, h("tr", {}, h("th", {}, "Split"), axes.map((axis) => h("th", {}, AXIS_NAMES[axis])), h("th", { class: "num" }, "Test RMSE"), h("th", { class: "num" }, "Test log-likelihood"))),
        h("tbody", {}, test.per_split.map((entry) => {
          const configuration = ranking.find((r) => r.configuration.index === entry.configuration)?.configuration || {};
          return h("tr", {}, h("td", {}, entry.split + 1), axes.map((axis) => h("td", {}, axisValue(configuration, axis))),
            numberCell(entry.rmse, 3), numberCell(entry.log_likelihood, 3));
        })))));
  }

  // ---- ranking ----
  sections.push(h("section", { class: "card" },
    h("h2", {}, `Ranking by validation ${sweep.results.metric}`),
    h("table", { id: "ranking-table" },
      h("thead", {}, h("tr", {}, h("th", { class: "num" }, "Rank"), axes.map((axis) => h("th", {}, AXIS_NAMES[axis])),
        h("th", { class: "num" }, "Validation log-likelihood"), h("th", { class: "num" }, "Validation RMSE"))),
      h("tbody", {}, ranking.map((entry, i) => h("tr", { class: i === 0 ? "selected" : "" },
        h("td", { class: "num" }, i + 1), axes.map((axis) => h("td", {}, axisValue(entry.configuration, axis))),
        h("td", { class: "num" }, meanSe(entry.validation.log_likelihood, 3)), h("td", { class: "num" }, meanSe(entry.validation.rmse, 3))))))));
  return sections;
}

function heatmapTable(ranking, xAxis, yAxis, metric, axes) {
  if (!ranking.length) return h("p", { class: "muted" }, "No configurations.");
  const higher = METRICS[metric].higher;
  const better = (a, b) => (b === null || b === undefined ? true : a === null || a === undefined ? false : higher ? a > b : a < b);
  const valuesOf = (axis) => {
    if (!axis) return [null];
    const seen = [];
    for (const entry of ranking) {
      const raw = entry.configuration[axis];
      if (!seen.some((v) => JSON.stringify(v) === JSON.stringify(raw))) seen.push(raw);
    }
    return seen.sort((a, b) => (Array.isArray(a) ? String(a).localeCompare(String(b)) : a - b));
  };
  const xs = xAxis ? valuesOf(xAxis) : [null];
  const ys = yAxis && yAxis !== xAxis ? valuesOf(yAxis) : [null];
  const same = (configuration, axis, value) => !axis || JSON.stringify(configuration[axis]) === JSON.stringify(value);
  const cells = ys.map((y) => xs.map((x) => {
    let best = null;
    for (const entry of ranking) {
      if (!same(entry.configuration, xAxis, x) || (ys.length > 1 && !same(entry.configuration, yAxis, y))) continue;
      if (!best || better(entry.validation[metric].mean, best.validation[metric].mean)) best = entry;
    }
    return best;
  }));
  const means = cells.flat().map((entry) => entry?.validation[metric].mean).filter((v) => v !== null && v !== undefined);
  const low = Math.min(...means);
  const high = Math.max(...means);
  const bestMean = higher ? high : low;
  const label = (axis, value) => (value === null ? "" : Array.isArray(value) ? value.join("-") : String(value));
  const hidden = axes.filter((axis) => axis !== xAxis && axis !== yAxis);
  return h("div", {},
    h("table", { class: "heatmap", id: "heatmap-table" },
      h("thead", {}, h("tr", {}, h("th", {}, ys.length > 1 ? `${AXIS_NAMES[yAxis]} ↓ / ${AXIS_NAMES[xAxis] || ""} →` : AXIS_NAMES[xAxis] || ""),
        xs.map((x) => h("th", {}, label(xAxis, x))))),
      h("tbody", {}, ys.map((y, row) => h("tr", {}, h("th", {}, label(yAxis, y)), xs.map((x, column) => {
        const entry = cells[row][column];
        const mean = entry?.validation[metric].mean;
        if (mean === null || mean === undefined) return h("td", { class: "cell", style: { background: "#999" } }, "—");
        const t = high > low ? (mean - low) / (high - low) : 1;
        return h("td", {
          class: `cell${mean === bestMean ? " best" : ""}`,
          style: { background: viridis(higher ? t : 1 - t), color: (higher ? t : 1 - t) > 0.6 ? "#111" : "#fff" },
          title: hidden.map((axis) => `${AXIS_NAMES[axis]} ${axisValue(entry.configuration, axis)}`).join(", "),
          dataset: { x: label(xAxis, x), y: label(yAxis, y), value: mean, configuration: entry.configuration.index },
        }, fmt(mean, 3), h("div", { style: { fontSize: "11px", opacity: 0.85 } }, `± ${fmt(entry.validation[metric].se, 3)}`));
      }))))),
    hidden.length ? h("p", { class: "muted" }, `Best over: ${hidden.map((axis) => AXIS_NAMES[axis]).join(", ")}.`) : null);
}
