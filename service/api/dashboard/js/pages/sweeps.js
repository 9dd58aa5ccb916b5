// Sweeps: the list (live through GET /v1/events?kind=sweep), a form for a new one, and one
// sweep's results: a heatmap of any metric the results hold over two grid axes (the best over
// any other axis), the ranking, and the protocol's test results when the best were retrained.
// Regression sweeps report RMSE and log-likelihood; classification sweeps MC dropout's accuracy,
// NLL, Brier score, ECE and AUROCs beside the deterministic net's, on the validation rows, the
// training rows (and the gap between them) and, when asked, the test rows. The page shows
// whatever metrics the results hold and never assumes one is there.

import { api, follow } from "../api.js";
import { fill, fmt, h, meanSe, numberCell, parseNumberList, setLive, shortId, statusBadge, toast, when } from "../dom.js";
import { loadDatasets } from "./runs.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const AXES = ["dropout", "input_dropout", "tau", "prior_lengthscale", "weight_decay", "hidden_layers", "learning_rate"];
const AXIS_NAMES = {
  dropout: "dropout rate", input_dropout: "input dropout", tau: "τ", prior_lengthscale: "prior length-scale",
  weight_decay: "weight decay", hidden_layers: "hidden layers", learning_rate: "learning rate",
};

// Every metric a sweep reports, in the order the page shows them; "deterministic_<name>" is the
// weight-scaled net's <name>. A metric not listed here is still shown, by its key, after these.
const METRICS = {
  log_likelihood: { name: "log-likelihood", higher: true },
  rmse: { name: "RMSE", higher: false },
  accuracy: { name: "accuracy", higher: true },
  nll: { name: "NLL", higher: false },
  brier: { name: "Brier score", higher: false },
  ece: { name: "ECE", higher: false },
  auroc_predictive_entropy: { name: "AUROC (errors by predictive entropy)", short: "AUROC entropy", higher: true },
  auroc_mutual_information: { name: "AUROC (errors by mutual information)", short: "AUROC MI", higher: true },
};
const DETERMINISTIC = "deterministic_";
// What a sweep of each task can rank by (the first is the API's default), as the API checks it.
const RANKING_METRICS = { regression: ["log_likelihood", "rmse"], classification: ["nll", "accuracy", "brier"] };
// The metrics the test panel leads with.
const HEADLINE = { regression: ["rmse", "log_likelihood"], classification: ["accuracy", "nll", "brier", "ece"] };
// The row sets a configuration is scored on; "gap" is validation − training, split by split.
const SETS = { validation: "validation", train: "training rows", gap: "gap (validation − training)", test: "test rows" };
const FORM_DEFAULTS = {
  regression: { dropout: "0.005, 0.01, 0.05, 0.1", tie: true },
  classification: { dropout: "0.1, 0.3, 0.5", tie: false },
};

/** What the page knows about a metric key: its name, and whether higher is better. */
export function metricInfo(key) {
  const deterministic = key.startsWith(DETERMINISTIC);
  const base = deterministic ? key.slice(DETERMINISTIC.length) : key;
  const known = METRICS[base];
  const name = known?.name ?? base.replaceAll("_", " ");
  const short = known?.short ?? name;
  return {
    key, base, deterministic,
    name: deterministic ? `${name} (deterministic)` : name,
    short: deterministic ? `det. ${short}` : short,
    higher: known ? known.higher : /likelihood|accuracy|auroc/.test(base),
  };
}

function metricOrder(key) {
  const { base, deterministic } = metricInfo(key);
  const rank = Object.keys(METRICS).indexOf(base);
  return [rank < 0 ? Infinity : rank, deterministic ? 1 : 0, key];
}

function sortMetrics(keys) {
  return [...keys].sort((a, b) => {
    const [x, y] = [metricOrder(a), metricOrder(b)];
    return x[0] - y[0] || x[1] - y[1] || (x[2] < y[2] ? -1 : x[2] > y[2] ? 1 : 0);
  });
}

const isSummary = (value) => value !== null && typeof value === "object" && "mean" in value;

/** {mean, se} of a metric of a ranking entry on a row set, or null. */
function summary(entry, set, metric) {
  const value = entry?.[set]?.[metric];
  return isSummary(value) ? value : null;
}

const meanOf = (entry, set, metric) => {
  const mean = summary(entry, set, metric)?.mean;
  return typeof mean === "number" && Number.isFinite(mean) ? mean : null;
};

/** The metrics with at least one value on a row set across the ranking, in the page's order. */
function presentMetrics(ranking, set) {
  const keys = new Set();
  for (const entry of ranking) {
    for (const [key, value] of Object.entries(entry?.[set] || {})) if (isSummary(value) && value.mean !== null && value.mean !== undefined) keys.add(key);
  }
  return sortMetrics(keys);
}

function presentSets(ranking) {
  return Object.keys(SETS).filter((set) => presentMetrics(ranking, set).length);
}

/** Bigger is better: the metric's direction, or for a gap the distance from zero. */
function score(set, metric, mean) {
  if (mean === null || mean === undefined) return null;
  if (set === "gap") return -Math.abs(mean);
  return metricInfo(metric).higher ? mean : -mean;
}

function direction(set, metric) {
  return set === "gap" ? "closer to 0 is better" : metricInfo(metric).higher ? "higher is better" : "lower is better";
}

/** The task of a sweep: its dataset's, or (the dataset gone) the one its ranking metric belongs to. */
function taskOf(sweep, dataset) {
  if (dataset?.task) return dataset.task;
  const metric = sweep.results?.metric ?? sweep.spec?.metric;
  return RANKING_METRICS.classification.includes(metric) ? "classification" : "regression";
}

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
  const state = { sweeps: new Map(), datasets: new Map(), task: null };
  const tbody = h("tbody");
  const datasetSelect = h("select", { id: "sweep-dataset" });
  const inputs = {
    hidden: h("input", { id: "sweep-hidden", value: "50" }),
    epochs: h("input", { id: "sweep-epochs", type: "number", min: 1, step: 1, value: 40 }),
    batch: h("input", { id: "sweep-batch", type: "number", min: 1, step: 1, value: 128 }),
    learningRate: h("input", { id: "sweep-learning-rate", type: "number", min: 0, step: "any", value: 0.001 }),
    dropout: h("input", { id: "sweep-grid-dropout", value: FORM_DEFAULTS.regression.dropout }),
    tau: h("input", { id: "sweep-grid-tau", value: "0.1, 0.15, 0.2" }),
    lengthscale: h("input", { id: "sweep-lengthscale", type: "number", step: "any", min: 0, value: 0.01 }),
    weightDecay: h("input", { id: "sweep-grid-weight-decay", value: "", placeholder: "e.g. 0, 1e-4 (blank: none)" }),
    tie: h("input", { id: "sweep-tie", type: "checkbox", checked: FORM_DEFAULTS.regression.tie }),
    folds: h("input", { id: "sweep-folds", type: "number", min: 2, max: 50, step: 1, value: 5 }),
    metric: h("select", { id: "sweep-metric" }),
    retrain: h("input", { id: "sweep-retrain", type: "checkbox", checked: true }),
    testEvery: h("input", { id: "sweep-test-every", type: "checkbox" }),
    searchSamples: h("input", { id: "sweep-search-samples", type: "number", min: 1, max: 10000, step: 1, value: 100 }),
    testSamples: h("input", { id: "sweep-test-samples", type: "number", min: 1, max: 10000, step: 1, value: 1000 }),
  };
  // Fields that apply to one task only, shown for a dataset of that task.
  const only = {
    regression: [
      h("label", { class: "wide", dataset: { task: "regression" } }, "Grid: τ values", inputs.tau),
      h("label", { dataset: { task: "regression" } }, "Prior length-scale", inputs.lengthscale),
    ],
    classification: [h("label", { class: "wide", dataset: { task: "classification" } }, "Grid: weight decay", inputs.weightDecay)],
  };
  const taskNote = h("p", { class: "muted", id: "sweep-task-note" });
  const formError = h("p", { class: "error-text", id: "sweep-form-error", role: "alert" });
  const form = h("form", { id: "sweep-form", class: "form-grid", novalidate: true },
    h("label", { class: "wide" }, "Dataset", datasetSelect),
    h("label", {}, "Hidden layers", inputs.hidden),
    h("label", {}, "Epochs", inputs.epochs),
    h("label", {}, "Batch size", inputs.batch),
    h("label", {}, "Learning rate", inputs.learningRate),
    h("label", { class: "wide" }, "Grid: dropout rates", inputs.dropout),
    only.regression, only.classification,
    h("label", {}, "Input dropout = dropout", inputs.tie),
    h("label", {}, "Folds", inputs.folds),
    h("label", {}, "Rank by (validation)", inputs.metric),
    h("label", {}, "Retrain best & test", inputs.retrain),
    h("label", {}, "Test every configuration", inputs.testEvery),
    h("label", {}, "T (search)", inputs.searchSamples),
    h("label", {}, "T (test)", inputs.testSamples),
    h("div", {}, h("button", { type: "submit", id: "sweep-submit" }, "Queue sweep")));

  fill(container,
    h("section", { class: "card" }, h("h2", {}, "Sweeps"),
      h("table", { id: "sweeps-table" }, h("thead", {}, h("tr", {},
        ["Sweep", "Dataset", "Status", "Progress", "Grid × splits", "Ranked by", "Best configuration", "Created"].map((name) => h("th", {}, name)))), tbody)),
    h("details", { class: "card" }, h("summary", {}, h("strong", {}, "New sweep"), h("span", { class: "muted" }, " — the MC dropout paper's protocol: grid × folds, rank on validation, retrain the best per split, test")),
      form, taskNote, formError));

  /** Show the fields, ranking metrics and defaults of the chosen dataset's task. */
  function applyTask() {
    const task = state.datasets.get(datasetSelect.value)?.task ?? null;
    for (const [which, labels] of Object.entries(only)) for (const label of labels) label.classList.toggle("hidden", which !== task);
    const metrics = RANKING_METRICS[task] || [];
    const chosen = inputs.metric.value;
    fill(inputs.metric, metrics.map((key, i) => h("option", { value: key }, `${metricInfo(key).name}${i === 0 ? " (default)" : ""}`)));
    if (metrics.includes(chosen)) inputs.metric.value = chosen;
    const before = FORM_DEFAULTS[state.task];
    const after = FORM_DEFAULTS[task];
    if (before && after && task !== state.task) {
      // Swap in the other task's defaults, but never over what somebody typed.
      if (inputs.dropout.value === before.dropout) inputs.dropout.value = after.dropout;
      inputs.tie.checked = after.tie;
    }
    if (task) state.task = task;
    taskNote.textContent = task === "classification"
      ? "Classification: configurations are ranked on MC dropout's validation metric; each is also scored on its training rows (the gap shows over-fitting), beside the deterministic net. Regularise with weight decay; τ and the prior length-scale apply to regression only."
      : task === "regression" ? "Regression: ranked by the MC log-likelihood (needs τ) or RMSE; the weight decay follows from the prior length-scale and τ." : "";
  }
  datasetSelect.addEventListener("change", applyTask);

  function draw() {
    const items = [...state.sweeps.values()].sort((a, b) => (a.created_at < b.created_at ? 1 : -1));
    fill(tbody, items.length ? items.map((sweep) => {
      const best = sweep.results?.best;
      const grid = sweep.spec?.grid || {};
      const bestText = best ? AXES.filter((axis) => grid[axis]).map((axis) => `${AXIS_NAMES[axis]} ${axisValue(best, axis)}`).join(", ") || "the only one" : "—";
      const metric = sweep.results?.metric ?? sweep.spec?.metric;
      return h("tr", { dataset: { sweepId: sweep.id } },
        h("td", {}, h("a", { href: `#/sweeps/${sweep.id}`, title: sweep.id }, shortId(sweep.id))),
        h("td", {}, state.datasets.get(sweep.dataset_id)?.name ?? shortId(sweep.dataset_id)),
        h("td", {}, statusBadge(sweep.status)),
        h("td", {}, progress(sweep)),
        h("td", {}, `${sweep.n_configurations} × ${sweep.n_splits}`),
        h("td", {}, metric ? metricInfo(metric).name : "—"),
        h("td", {}, bestText),
        h("td", {}, when(sweep.created_at)));
    }) : h("tr", {}, h("td", { colspan: 8, class: "muted" }, "No sweeps yet.")));
  }

  async function relist() {
    const [datasets, page] = await Promise.all([loadDatasets(signal), api("/v1/sweeps?limit=100", { signal })]);
    state.datasets = datasets;
    state.sweeps = new Map(page.items.map((sweep) => [sweep.id, sweep]));
    const chosen = datasetSelect.value;
    const groups = Object.keys(RANKING_METRICS).map((task) => [task, [...datasets.values()].filter((d) => d.task === task)]).filter(([, list]) => list.length);
    fill(datasetSelect, groups.length
      ? groups.map(([task, list]) => h("optgroup", { label: task }, list.map((d) => h("option", { value: d.id }, `${d.name} (${task}, ${d.n_rows} rows)`))))
      : h("option", { value: "" }, "— add a dataset on the Runs page (e.g. diabetes or digits) —"));
    if (chosen && datasets.has(chosen)) datasetSelect.value = chosen;
    applyTask();
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
      const task = state.datasets.get(datasetSelect.value)?.task;
      if (!datasetSelect.value || !RANKING_METRICS[task]) throw new Error("Dataset: add a regression or classification dataset first");
      const integer = (input, name) => {
        const value = Number(input.value);
        if (!Number.isInteger(value)) throw new Error(`${name}: a whole number`);
        return value;
      };
      const learningRate = Number(inputs.learningRate.value);
      if (!(learningRate > 0)) throw new Error("Learning rate: a positive number");
      const model = { hidden_layers: parseNumberList(inputs.hidden.value, "Hidden layers", { integer: true }) };
      const grid = { dropout: parseNumberList(inputs.dropout.value, "Grid: dropout rates") };
      if (task === "regression") {
        const lengthscale = Number(inputs.lengthscale.value);
        const taus = parseNumberList(inputs.tau.value, "Grid: τ values");
        Object.assign(model, { tau: taus[0], ...(lengthscale > 0 ? { prior_lengthscale: lengthscale } : {}) });
        grid.tau = taus;
      } else if (inputs.weightDecay.value.trim()) {
        grid.weight_decay = parseNumberList(inputs.weightDecay.value, "Grid: weight decay");
      }
      const body = {
        dataset_id: datasetSelect.value,
        model,
        training: { epochs: integer(inputs.epochs, "Epochs"), batch_size: integer(inputs.batch, "Batch size"), learning_rate: learningRate },
        grid,
        tie_input_dropout: inputs.tie.checked,
        splits: { folds: integer(inputs.folds, "Folds") },
        metric: inputs.metric.value,
        retrain_best: inputs.retrain.checked,
        test_every_configuration: inputs.testEvery.checked,
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
        sweep.epochs_done = Math.max(sweep.epochs_done, data.data?.epoch ?? 0);
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
    const task = taskOf(sweep, dataset);
    const metric = sweep.results?.metric ?? sweep.spec?.metric;
    fill(header,
      h("div", { class: "toolbar" }, h("h1", { style: { margin: 0 } }, `Sweep ${shortId(sweep.id)}`), h("span", { id: "sweep-status" }, statusBadge(sweep.status)), progress(sweep),
        TERMINAL.has(sweep.status) ? null : h("button", { type: "button", class: "danger", onclick: cancel }, "Cancel")),
      h("p", { class: "muted", id: "sweep-summary", dataset: { task } },
        `${dataset?.name ?? shortId(sweep.dataset_id)} (${task}) · ${sweep.n_configurations} configurations × ${sweep.n_splits} splits · ranked by validation ${metric ? metricInfo(metric).name : "—"} · ${sweep.spec?.training?.epochs ?? "?"} epochs`),
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
    fill(body, ...resultSections(sweep, taskOf(sweep, dataset)));
  }

  showHeader();
  showResults();
  follow(`/v1/runs/${sweep.id}/events`, ({ event, data }) => {
    if (!data) return;
    if (event === "epoch") {
      sweep.epochs_done = Math.max(sweep.epochs_done, data.data?.epoch ?? 0);
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

function options(select, values, label, keep) {
  fill(select, values.map((value) => h("option", { value }, label(value))));
  if (values.includes(keep)) select.value = keep;
  return select;
}

/** The results' sections: heatmap, test results (when the best were retrained), ranking. */
export function resultSections(sweep, task) {
  const results = sweep.results || {};
  const ranking = (Array.isArray(results.ranking) ? results.ranking : []).filter((entry) => entry && typeof entry === "object");
  for (const entry of ranking) entry.configuration = entry.configuration || {};
  const grid = sweep.spec?.grid || {};
  const axes = AXES.filter((axis) => grid[axis] && grid[axis].length);
  const rankedBy = results.metric ?? sweep.spec?.metric ?? null;
  const sets = presentSets(ranking);
  const sections = [];

  // ---- heatmap ----
  const xSelect = h("select", { id: "heatmap-x" }, axes.map((axis) => h("option", { value: axis }, AXIS_NAMES[axis])));
  const ySelect = h("select", { id: "heatmap-y" }, h("option", { value: "" }, "—"), axes.map((axis) => h("option", { value: axis }, AXIS_NAMES[axis])));
  const setSelect = options(h("select", { id: "heatmap-set" }), sets, (set) => SETS[set], "validation");
  const metricSelect = h("select", { id: "heatmap-metric" });
  const fillMetrics = () => {
    const present = presentMetrics(ranking, setSelect.value);
    const keep = present.includes(metricSelect.value) ? metricSelect.value : present.includes(rankedBy) ? rankedBy : present[0];
    options(metricSelect, present, (key) => `${metricInfo(key).name} (${direction(setSelect.value, key)})`, keep);
  };
  fillMetrics();
  xSelect.value = axes.includes("dropout") ? "dropout" : axes[0] || "";
  ySelect.value = axes.includes("tau") && xSelect.value !== "tau" ? "tau" : axes.find((axis) => axis !== xSelect.value) || "";
  const heatmapTitle = h("h2", { id: "heatmap-title" });
  const heatmap = h("div", { id: "heatmap" });
  const drawHeatmap = () => {
    const set = setSelect.value;
    const metric = metricSelect.value;
    heatmapTitle.textContent = metric ? `${SETS[set][0].toUpperCase()}${SETS[set].slice(1)}: ${metricInfo(metric).name} over the grid` : "Metric over the grid";
    fill(heatmap, heatmapTable(ranking, xSelect.value, ySelect.value, set, metric, axes));
  };
  setSelect.addEventListener("change", () => {
    fillMetrics();
    drawHeatmap();
  });
  for (const control of [xSelect, ySelect, metricSelect]) control.addEventListener("change", drawHeatmap);
  drawHeatmap();
  sections.push(h("section", { class: "card" },
    heatmapTitle,
    h("p", { class: "muted" }, "Mean ± standard error over the splits; where the grid has more axes than shown, each cell is the best configuration over the others. The outlined cell is the best."),
    h("div", { class: "toolbar" },
      axes.length ? [h("label", {}, "Columns", xSelect), h("label", {}, "Rows", ySelect)] : null,
      h("label", {}, "Scored on", setSelect), h("label", {}, "Metric", metricSelect)),
    heatmap));

  // ---- the protocol's test results ----
  if (results.test && typeof results.test === "object") sections.push(testSection(results.test, ranking, axes, task));

  // ---- ranking ----
  sections.push(rankingSection(ranking, axes, sets, rankedBy));
  return sections;
}

function testSection(test, ranking, axes, task) {
  const metrics = sortMetrics(Object.keys(test).filter((key) => isSummary(test[key])));
  const mc = metrics.filter((key) => !metricInfo(key).deterministic);
  const hasDeterministic = metrics.some((key) => metricInfo(key).deterministic);
  const headline = (HEADLINE[task] || []).filter((key) => mc.includes(key));
  const lead = headline.length ? headline : mc;
  const perSplit = (Array.isArray(test.per_split) ? test.per_split : []).filter((entry) => entry && typeof entry === "object");
  // Per split: the headline metrics, and the deterministic net's accuracy / NLL beside MC's.
  const splitColumns = [...lead, ...lead.slice(0, 2).map((key) => DETERMINISTIC + key).filter((key) => metrics.includes(key))];
  const card = (key) => h("div", { class: "metric", dataset: { metric: key } },
    h("div", { class: "name" }, `Test ${metricInfo(key).name}`),
    h("div", { class: "value", dataset: { value: test[key].mean ?? "" } }, meanSe(test[key], 3)),
    h("div", { class: "hint" }, direction("test", key)));
  return h("section", { class: "card", id: "sweep-test" },
    h("h2", {}, `Test results: each split's best configuration retrained and tested${test.samples ? ` (T = ${test.samples})` : ""}`),
    h("div", { class: "metrics" }, lead.map(card)),
    hasDeterministic ? [
      h("h3", {}, "MC dropout beside the deterministic net (weight scaling), mean ± SE over the splits"),
      h("table", { id: "sweep-test-compare", style: { maxWidth: "900px" } },
        h("thead", {}, h("tr", {}, h("th", {}, "Metric"), h("th", { class: "num" }, `MC dropout${test.samples ? ` (T = ${test.samples})` : ""}`), h("th", { class: "num" }, "Deterministic"), h("th", {}, ""))),
        h("tbody", {}, mc.map((key) => {
          const det = isSummary(test[DETERMINISTIC + key]) ? test[DETERMINISTIC + key] : null;
          const [a, b] = [score("test", key, test[key].mean), score("test", key, det?.mean)];
          const both = a !== null && b !== null;
          return h("tr", { dataset: { metric: key } }, h("td", {}, metricInfo(key).name),
            h("td", { class: "num", style: both && a > b ? { fontWeight: 700 } : {}, dataset: { side: "mc", value: test[key].mean ?? "" } }, meanSe(test[key], 4)),
            h("td", { class: "num", style: both && b > a ? { fontWeight: 700 } : {}, dataset: { side: "deterministic", value: det?.mean ?? "" } }, det ? meanSe(det, 4) : "—"),
            h("td", { class: "muted" }, det ? direction("test", key) : `${direction("test", key)}; MC dropout only`));
        })))] : null,
    h("h3", {}, "Per split"),
    h("table", { id: "sweep-test-table" },
      h("thead", {}, h("tr", {}, h("th", {}, "Split"), axes.map((axis) => h("th", {}, AXIS_NAMES[axis])),
        splitColumns.map((key) => h("th", { class: "num" }, `Test ${metricInfo(key).short}`)))),
      h("tbody", {}, perSplit.map((entry) => {
        const configuration = ranking.find((r) => r.configuration.index === entry.configuration)?.configuration || {};
        return h("tr", { dataset: { split: entry.split ?? "" } }, h("td", {}, typeof entry.split === "number" ? entry.split + 1 : "—"),
          axes.map((axis) => h("td", {}, axisValue(configuration, axis))),
          splitColumns.map((key) => numberCell(typeof entry[key] === "number" ? entry[key] : null, 3, { dataset: { metric: key } })));
      }))));
}

function rankingSection(ranking, axes, sets, rankedBy) {
  const hasDeterministic = sets.some((set) => presentMetrics(ranking, set).some((key) => metricInfo(key).deterministic));
  const setSelect = options(h("select", { id: "ranking-set" }), sets, (set) => SETS[set], "validation");
  const netSelect = options(h("select", { id: "ranking-net" }), ["mc", "deterministic"],
    (net) => (net === "mc" ? "MC dropout" : "deterministic (weight scaling)"), "mc");
  const gapOf = sets.includes("gap") && rankedBy ? rankedBy : null;
  const table = h("table", { id: "ranking-table" });
  const draw = () => {
    const set = setSelect.value;
    const deterministic = netSelect.value === "deterministic";
    let columns = presentMetrics(ranking, set).filter((key) => metricInfo(key).deterministic === deterministic);
    if (!columns.length) columns = presentMetrics(ranking, set);
    const extra = gapOf && set !== "gap" && summary(ranking[0], "gap", gapOf) ? gapOf : null;
    table.dataset.set = set;
    table.dataset.net = netSelect.value;
    fill(table,
      h("thead", {}, h("tr", {}, h("th", { class: "num" }, "Rank"), axes.map((axis) => h("th", {}, AXIS_NAMES[axis])),
        columns.map((key) => h("th", { class: "num", title: `${metricInfo(key).name}: ${direction(set, key)}`, dataset: { metric: key } },
          `${metricInfo(key).short} ${set === "gap" ? "(→0)" : metricInfo(key).higher ? "↑" : "↓"}`)),
        extra ? h("th", { class: "num", title: `validation − training ${metricInfo(extra).name}, split by split`, dataset: { metric: `gap:${extra}` } }, `val − train ${metricInfo(extra).short}`) : null)),
      h("tbody", {}, ranking.map((entry, i) => h("tr", { class: i === 0 ? "selected" : "", dataset: { configuration: entry.configuration.index ?? "" } },
        h("td", { class: "num" }, i + 1), axes.map((axis) => h("td", {}, axisValue(entry.configuration, axis))),
        columns.map((key) => {
          const value = summary(entry, set, key);
          return h("td", { class: "num", style: key === rankedBy && set === "validation" ? { fontWeight: 600 } : {}, dataset: { metric: key, value: value?.mean ?? "" } }, meanSe(value, 3));
        }),
        extra ? h("td", { class: "num", dataset: { metric: `gap:${extra}`, value: summary(entry, "gap", extra)?.mean ?? "" } }, meanSe(summary(entry, "gap", extra), 3)) : null))));
  };
  setSelect.addEventListener("change", draw);
  netSelect.addEventListener("change", draw);
  draw();
  const title = rankedBy ? `Ranking by validation ${metricInfo(rankedBy).name} (${direction("validation", rankedBy)})` : "Ranking";
  return h("section", { class: "card" },
    h("h2", {}, title),
    sets.length > 1 || hasDeterministic ? h("div", { class: "toolbar" },
      sets.length > 1 ? h("label", {}, "Scored on", setSelect) : null,
      hasDeterministic ? h("label", {}, "Predictions", netSelect) : null) : null,
    sets.includes("gap") ? h("p", { class: "muted" }, "The gap is validation − training, split by split: a large one means the net fits its training rows much better than new ones.") : null,
    table);
}

function heatmapTable(ranking, xAxis, yAxis, set, metric, axes) {
  if (!ranking.length) return h("p", { class: "muted" }, "No configurations.");
  if (!metric) return h("p", { class: "muted" }, "The results hold no metric to show.");
  const value = (entry) => meanOf(entry, set, metric);
  const rank = (entry) => (entry ? score(set, metric, value(entry)) : null);
  const valuesOf = (axis) => {
    if (!axis) return [null];
    const seen = [];
    for (const entry of ranking) {
      const raw = entry.configuration[axis];
      if (!seen.some((v) => JSON.stringify(v) === JSON.stringify(raw))) seen.push(raw);
    }
    return seen.sort((a, b) => (Array.isArray(a) || typeof a !== "number" || typeof b !== "number" ? String(a).localeCompare(String(b)) : a - b));
  };
  const xs = xAxis ? valuesOf(xAxis) : [null];
  const rowAxis = yAxis && yAxis !== xAxis ? yAxis : "";
  const ys = rowAxis ? valuesOf(rowAxis) : [null];
  const same = (configuration, axis, v) => !axis || JSON.stringify(configuration[axis]) === JSON.stringify(v);
  const cells = ys.map((y) => xs.map((x) => {
    let best = null;
    for (const entry of ranking) {
      if (!same(entry.configuration, xAxis, x) || (ys.length > 1 && !same(entry.configuration, yAxis, y))) continue;
      const [a, b] = [rank(entry), rank(best)];
      if (!best || (a !== null && (b === null || a > b))) best = entry;
    }
    return best;
  }));
  const scores = cells.flat().map(rank).filter((v) => v !== null);
  const low = Math.min(...scores);
  const high = Math.max(...scores);
  const label = (axis, v) => (!axis ? "" : v === null || v === undefined ? "—" : Array.isArray(v) ? v.join("-") : String(v));
  const hidden = axes.filter((axis) => axis !== xAxis && axis !== yAxis);
  return h("div", {},
    h("table", { class: "heatmap", id: "heatmap-table", dataset: { set, metric } },
      h("thead", {}, h("tr", {}, h("th", {}, ys.length > 1 ? `${AXIS_NAMES[yAxis]} ↓ / ${AXIS_NAMES[xAxis] || ""} →` : AXIS_NAMES[xAxis] || ""),
        xs.map((x) => h("th", {}, label(xAxis, x))))),
      h("tbody", {}, ys.map((y, row) => h("tr", {}, h("th", {}, label(rowAxis, y)), xs.map((x, column) => {
        const entry = cells[row][column];
        const mean = entry ? value(entry) : null;
        if (mean === null) return h("td", { class: "cell", style: { background: "#999" } }, "—");
        const s = rank(entry);
        const se = summary(entry, set, metric)?.se;
        const t = high > low ? (s - low) / (high - low) : 1;
        return h("td", {
          class: `cell${s === high ? " best" : ""}`,
          style: { background: viridis(t), color: t > 0.6 ? "#111" : "#fff" },
          title: hidden.map((axis) => `${AXIS_NAMES[axis]} ${axisValue(entry.configuration, axis)}`).join(", "),
          dataset: { x: label(xAxis, x), y: label(rowAxis, y), value: mean, configuration: entry.configuration.index ?? "" },
        }, fmt(mean, 3), typeof se === "number" ? h("div", { style: { fontSize: "11px", opacity: 0.85 } }, `± ${fmt(se, 3)}`) : null);
      }))))),
    h("p", { class: "muted" }, `${metricInfo(metric).name}: ${direction(set, metric)}; brighter is better.${hidden.length ? ` Best over: ${hidden.map((axis) => AXIS_NAMES[axis]).join(", ")}.` : ""}`));
}
