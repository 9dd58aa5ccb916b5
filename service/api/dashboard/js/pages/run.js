// One run: its spec and status, training curves that grow live (GET /v1/runs/{id}/events,
// history first), other runs overlaid, and the evaluation panel (GET /v1/runs/{id}/evaluation).

import { api, ApiError, follow } from "../api.js";
import { barChart, lineChart, PALETTE } from "../charts.js";
import { fill, fmt, h, numberCell, setLive, shortId, statusBadge, toast, when } from "../dom.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const ACTIVE = new Set(["queued", "running"]);

async function pickRun(container, signal) {
  const page = await api("/v1/runs?limit=50", { signal });
  fill(container, h("section", { class: "card" }, h("h2", {}, "Pick a run"),
    page.items.length
      ? h("ul", {}, page.items.map((run) => h("li", {},
        h("a", { href: `#/runs/${run.id}` }, shortId(run.id)), " ", statusBadge(run.status), " ", when(run.created_at))))
      : h("p", { class: "muted" }, "No runs yet.")));
}

function specRows(run, dataset) {
  const model = run.spec.model || {};
  const training = run.spec.training || {};
  const rows = [
    ["Dataset", dataset ? `${dataset.name} (${dataset.task}, ${dataset.n_rows} rows × ${dataset.n_features} features)` : shortId(run.dataset_id)],
    ["Hidden layers", (model.hidden_layers || []).join(" → ")],
    ["Dropout", Array.isArray(model.dropout) ? model.dropout.join(", ") : model.dropout],
    ["Input dropout", model.input_dropout],
    ["Activation", model.activation],
    ["Epochs · batch", `${training.epochs} · ${training.batch_size}`],
    ["Optimizer", `${training.optimizer}, lr ${training.learning_rate}`],
    ["Weight decay · L1", `${training.weight_decay} · ${training.l1}`],
    ["Seed", training.seed],
    ["Device", run.device || run.spec.device || "—"],
    ["Attempts", run.attempts],
    ["Created", `${when(run.created_at)}`],
    ["Finished", run.finished_at ? when(run.finished_at) : "—"],
  ];
  if (model.tau) rows.push(["τ", model.tau]);
  return rows;
}

export async function render(container, params, { signal }) {
  if (!params.runId) return pickRun(container, signal);
  const runId = params.runId;
  let run = await api(`/v1/runs/${runId}`, { signal });
  const dataset = await api(`/v1/datasets/${run.dataset_id}`, { signal }).catch(() => null);
  const regression = run.task === "regression";
  const metrics = new Map(); // epoch -> metrics of this run
  const overlays = new Map(); // run id -> {run, metrics: Map}
  const charts = []; // the two curve charts
  const evaluationCharts = [];
  let terminal = TERMINAL.has(run.status);
  let drawQueued = false;

  const statusCell = h("span", { id: "run-status" });
  const progressText = h("span", { id: "run-progress", class: "muted" });
  const actions = h("span", { class: "toolbar", style: { margin: 0 } });
  const specTable = h("table", { class: "spec" });
  const errorBox = h("p", { id: "run-error", class: "error-text" });
  const lossChart = h("div", { class: "chart", id: "loss-chart" });
  const scoreChart = h("div", { class: "chart", id: "score-chart" });
  const overlayList = h("div", { class: "toolbar", id: "overlay-list" });
  const epochRows = h("tbody", { id: "epoch-rows" });
  const evaluation = h("section", { class: "card", id: "evaluation" }, h("h2", {}, "Evaluation on held-out rows"),
    h("p", { class: "muted" }, "Computed after training succeeds."));

  fill(container,
    h("section", { class: "card" },
      h("div", { class: "toolbar" }, h("h1", { style: { margin: 0 } }, `Run ${shortId(run.id)}`), statusCell, progressText, actions),
      h("p", { class: "muted" }, run.id),
      errorBox,
      h("details", {}, h("summary", {}, "Specification"), specTable)),
    h("section", { class: "card" },
      h("h2", {}, "Training curves"),
      h("p", { class: "muted" }, "Dashed: training (measured with dropout on), solid: validation. Overlay other runs of this dataset, e.g. dropout 0 against 0.5, to see what dropout is for."),
      overlayList,
      h("div", { class: "row" }, h("div", { class: "grow" }, lossChart), h("div", { class: "grow" }, scoreChart)),
      h("details", {}, h("summary", {}, "Per-epoch metrics"),
        h("table", {}, h("thead", {}, h("tr", {},
          h("th", { class: "num" }, "Epoch"), h("th", { class: "num" }, "Train loss"), h("th", { class: "num" }, "Val. loss"),
          h("th", { class: "num" }, regression ? "Train RMSE" : "Train acc."), h("th", { class: "num" }, regression ? "Val. RMSE" : "Val. acc."),
          h("th", { class: "num" }, "Seconds"))), epochRows))),
    evaluation);

  function showHeader() {
    fill(statusCell, statusBadge(run.status));
    progressText.textContent = `epoch ${run.epochs_done}/${run.epochs_total}`;
    errorBox.textContent = run.error || "";
    const buttons = [];
    if (ACTIVE.has(run.status)) {
      buttons.push(h("button", { type: "button", class: "danger", onclick: cancel }, "Cancel"));
    }
    if (run.status === "succeeded") buttons.push(h("a", { class: "button", href: `#/predict?run=${run.id}` }, "Predict with this run"));
    fill(actions, buttons);
    fill(specTable, specRows(run, dataset).map(([name, value]) => h("tr", {}, h("th", {}, name), h("td", {}, value ?? "—"))));
  }

  async function cancel() {
    try {
      run = await api(`/v1/runs/${run.id}/cancel`, { method: "POST", signal });
      showHeader();
    } catch (error) {
      toast(error.describe ? error.describe() : String(error), "error");
    }
  }

  // ---- curves ----
  const scoreKey = regression ? "rmse" : "accuracy";
  function seriesLabel(of) {
    const model = of.spec.model || {};
    const dropout = Array.isArray(model.dropout) ? model.dropout.join("/") : model.dropout;
    return `${shortId(of.id)} p=${dropout}`;
  }

  function seriesFor() {
    const entries = [{ id: run.id, metrics, color: PALETTE[0], label: seriesLabel(run) }];
    let i = 1;
    for (const [id, overlay] of overlays) {
      entries.push({ id, metrics: overlay.metrics, color: PALETTE[i++ % PALETTE.length], label: seriesLabel(overlay.run) });
    }
    return entries;
  }

  function chartData(entries, key) {
    const last = Math.max(0, ...entries.map((e) => Math.max(0, ...e.metrics.keys())));
    const xs = Array.from({ length: last }, (_, i) => i + 1);
    const data = [xs];
    for (const entry of entries) {
      data.push(xs.map((x) => entry.metrics.get(x)?.[`train_${key}`] ?? null));
      data.push(xs.map((x) => entry.metrics.get(x)?.[`val_${key}`] ?? null));
    }
    return data;
  }

  function chartSeries(entries, name) {
    return entries.flatMap((entry) => [
      { label: `${entry.label} train ${name}`, color: entry.color, dash: [6, 4], width: 1.5 },
      { label: `${entry.label} val. ${name}`, color: entry.color, width: 2 },
    ]);
  }

  function rebuildCharts() {
    while (charts.length) charts.pop().destroy();
    fill(lossChart);
    fill(scoreChart);
    const entries = seriesFor();
    charts.push(lineChart(lossChart, {
      title: regression ? "Loss (MSE on standardised targets; Gaussian NLL if heteroscedastic)" : "Loss (cross-entropy)", xLabel: "epoch", yLabel: "loss",
      series: chartSeries(entries, "loss"), data: chartData(entries, "loss"),
    }));
    charts.push(lineChart(scoreChart, {
      title: regression ? "RMSE (target units)" : "Accuracy", xLabel: "epoch", yLabel: regression ? "RMSE" : "accuracy",
      series: chartSeries(entries, scoreKey), data: chartData(entries, scoreKey), yRange: regression ? undefined : [0, 1],
    }));
  }

  function drawCurves() {
    drawQueued = false;
    const entries = seriesFor();
    charts[0].setData(chartData(entries, "loss"));
    charts[1].setData(chartData(entries, scoreKey));
    fill(epochRows, [...metrics.values()].sort((a, b) => a.epoch - b.epoch).map((m) => h("tr", {},
      h("td", { class: "num" }, m.epoch), numberCell(m.train_loss, 4), numberCell(m.val_loss, 4),
      numberCell(m[`train_${scoreKey}`], 4), numberCell(m[`val_${scoreKey}`], 4), numberCell(m.duration_s, 2))));
  }

  function queueDraw() {
    if (!drawQueued) {
      drawQueued = true;
      requestAnimationFrame(drawCurves);
    }
  }

  // ---- overlays: other runs of the same dataset ----
  async function setOverlay(id, on) {
    if (!on) {
      overlays.delete(id);
      rebuildCharts();
      queueDraw();
      return;
    }
    const [other, history] = await Promise.all([api(`/v1/runs/${id}`, { signal }), api(`/v1/runs/${id}/metrics`, { signal })]);
    overlays.set(id, { run: other, metrics: new Map(history.items.map((m) => [m.epoch, m])) });
    rebuildCharts();
    queueDraw();
  }

  async function listOverlayCandidates(preselected) {
    const page = await api(`/v1/runs?limit=50&dataset_id=${run.dataset_id}`, { signal });
    const others = page.items.filter((other) => other.id !== run.id && other.dataset_id === run.dataset_id);
    if (!others.length) {
      fill(overlayList, h("span", { class: "muted" }, "No other runs of this dataset to overlay."));
      return;
    }
    fill(overlayList, h("span", { class: "muted" }, "Overlay:"), others.slice(0, 12).map((other) => {
      const model = other.spec.model || {};
      const dropout = Array.isArray(model.dropout) ? model.dropout.join("/") : model.dropout;
      const box = h("input", { type: "checkbox", dataset: { overlay: other.id }, checked: preselected.includes(other.id) });
      box.addEventListener("change", () => setOverlay(other.id, box.checked).catch((error) => toast(String(error.message || error), "error")));
      return h("label", { style: { flexDirection: "row", alignItems: "center", gap: "4px" } }, box,
        `${shortId(other.id)} (${(model.hidden_layers || []).join("-")}, p=${dropout}, ${other.status})`);
    }));
  }

  // Overlaid runs that are still training: re-read their metrics every few seconds.
  const overlayTimer = setInterval(async () => {
    for (const [id, overlay] of overlays) {
      if (TERMINAL.has(overlay.run.status)) continue;
      try {
        const [other, history] = await Promise.all([api(`/v1/runs/${id}`, { signal }), api(`/v1/runs/${id}/metrics`, { signal })]);
        overlays.set(id, { run: other, metrics: new Map(history.items.map((m) => [m.epoch, m])) });
        queueDraw();
      } catch (error) {
        if (!signal.aborted) console.error(error);
      }
    }
  }, 3000);

  // ---- evaluation ----
  async function loadEvaluation() {
    while (evaluationCharts.length) evaluationCharts.pop().destroy();
    try {
      const report = await api(`/v1/runs/${run.id}/evaluation`, { signal });
      fill(evaluation, h("h2", {}, `Evaluation on ${report.n} held-out rows (MC dropout with T = ${report.samples} beside the deterministic net)`),
        ...(regression ? regressionReport(report) : classificationReport(report, evaluationCharts)));
    } catch (error) {
      if (signal.aborted) return;
      const text = error instanceof ApiError && error.status === 404 ? "This run has no held-out rows to evaluate." : (error.describe ? error.describe() : String(error));
      fill(evaluation, h("h2", {}, "Evaluation"), h("p", { class: "muted" }, text));
    }
  }

  function onEvent({ event, data }) {
    if (!data) return;
    if (event === "epoch") {
      metrics.set(data.data.epoch, data.data);
      run.epochs_done = Math.max(run.epochs_done, data.data.epoch);
      run.status = data.status;
      progressText.textContent = `epoch ${run.epochs_done}/${run.epochs_total}`;
      fill(statusCell, statusBadge(run.status));
      queueDraw();
    } else if (event === "status") {
      run.status = data.status;
      showHeader();
      if (TERMINAL.has(data.status)) {
        terminal = true;
        api(`/v1/runs/${run.id}`, { signal }).then((fresh) => {
          run = fresh;
          showHeader();
          if (run.status === "succeeded") loadEvaluation();
        }).catch((error) => signal.aborted || console.error(error));
      }
    }
  }

  showHeader();
  rebuildCharts();
  const compare = (params.query.get("compare") || "").split(",").filter(Boolean);
  listOverlayCandidates(compare).catch((error) => signal.aborted || console.error(error));
  for (const id of compare) setOverlay(id, true).catch((error) => signal.aborted || toast(String(error.message || error), "error"));
  if (run.status === "succeeded") loadEvaluation();
  follow(`/v1/runs/${run.id}/events`, onEvent, { signal, finished: () => terminal, onState: setLive }).catch((error) => {
    if (!signal.aborted) toast(error.describe ? error.describe() : String(error), "error");
  });

  return () => {
    clearInterval(overlayTimer);
    for (const list of [charts, evaluationCharts]) while (list.length) list.pop().destroy();
    setLive("off");
  };
}

function comparisonTable(rows, report) {
  return h("table", { id: "evaluation-table" },
    h("thead", {}, h("tr", {}, h("th", {}, "Metric"), h("th", { class: "num" }, `MC dropout (T = ${report.samples})`), h("th", { class: "num" }, "Deterministic"), h("th", {}, ""))),
    h("tbody", {}, rows.map(([name, key, better, digits = 4]) => {
      const mc = report.mc[key];
      const deterministic = report.deterministic[key];
      // A score where higher is better: the better of the two is shown in bold.
      const score = (v) => (better === "lower" ? -v : better === "higher" ? v : -Math.abs(v - 0.95));
      const both = mc !== null && mc !== undefined && deterministic !== null && deterministic !== undefined;
      const mcWins = both && score(mc) > score(deterministic);
      const detWins = both && score(deterministic) > score(mc);
      return h("tr", { dataset: { metric: key } }, h("td", {}, name),
        numberCell(mc, digits, { style: mcWins ? { fontWeight: 700 } : {}, dataset: { side: "mc" } }),
        numberCell(deterministic, digits, { style: detWins ? { fontWeight: 700 } : {}, dataset: { side: "deterministic" } }),
        h("td", { class: "muted" }, better === "closer" ? "closer to 0.95 is better" : `${better} is better`));
    })));
}

function metricCard(name, value, hint, digits = 3) {
  return h("div", { class: "metric" }, h("div", { class: "name" }, name), h("div", { class: "value", dataset: { value: value ?? "" } }, fmt(value, digits)),
    hint ? h("div", { class: "hint" }, hint) : null);
}

function histogramChart(element, histogram, title, charts) {
  const centres = histogram.edges.slice(0, -1).map((edge, i) => (edge + histogram.edges[i + 1]) / 2);
  const total = (counts) => counts.reduce((a, b) => a + b, 0) || 1;
  const correctTotal = histogram.correct.reduce((a, b) => a + b, 0);
  const wrongTotal = histogram.wrong.reduce((a, b) => a + b, 0);
  charts.push(barChart(element, {
    title, xLabel: "nats", yLabel: "share of rows", categories: centres.map((c) => c.toFixed(2)), labelEvery: 4,
    series: [
      { label: `correct (${correctTotal})`, color: "#2e7d32", values: histogram.correct.map((c) => c / total(histogram.correct)) },
      { label: `wrong (${wrongTotal})`, color: "#c62828", values: histogram.wrong.map((c) => c / total(histogram.wrong)) },
    ],
  }));
}

function classificationReport(report, charts) {
  const { mc, deterministic } = report;
  const reliability = h("div", { class: "chart", id: "reliability-chart" });
  const entropy = h("div", { class: "chart", id: "entropy-histogram" });
  const information = h("div", { class: "chart", id: "mi-histogram" });
  const parts = [
    h("div", { class: "row" },
      h("div", { class: "grow" }, comparisonTable([
        ["Accuracy", "accuracy", "higher"], ["Negative log-likelihood", "nll", "lower"],
        ["Brier score", "brier", "lower"], ["Expected calibration error (15 bins)", "ece", "lower"],
      ], report)),
      h("div", { class: "grow metrics" },
        metricCard("AUROC: errors by predictive entropy", mc.auroc_predictive_entropy, "how well high entropy flags misclassified rows"),
        metricCard("AUROC: errors by mutual information", mc.auroc_mutual_information, "epistemic uncertainty (BALD) as the flag"),
        metricCard("Mean predictive entropy", mc.mean_predictive_entropy, "nats"),
        metricCard("Mean mutual information", mc.mean_mutual_information, "nats"))),
    h("div", { class: "charts" }, reliability, entropy, information),
  ];
  // Charts are drawn once the elements are in the page (they size themselves to it).
  requestAnimationFrame(() => {
    const bins = mc.reliability;
    charts.push(barChart(reliability, {
      title: "Reliability diagram", xLabel: "confidence (max probability)", yLabel: "accuracy", yRange: [0, 1], labelEvery: 2,
      categories: bins.map((b) => ((b.lower + b.upper) / 2).toFixed(2)),
      series: [
        { label: `MC dropout (ECE ${fmt(mc.ece, 3)})`, color: "#1f77b4", values: bins.map((b) => b.accuracy) },
        { label: `deterministic (ECE ${fmt(deterministic.ece, 3)})`, color: "#ff7f0e", values: deterministic.reliability.map((b) => b.accuracy) },
        { label: "perfectly calibrated", color: "#444", line: true, dash: [4, 4], values: bins.map((b) => (b.lower + b.upper) / 2) },
      ],
    }));
    histogramChart(entropy, mc.entropy_histogram, "Predictive entropy: correct vs wrong", charts);
    histogramChart(information, mc.mutual_information_histogram, "Mutual information: correct vs wrong", charts);
  });
  return parts;
}

function regressionReport(report) {
  const { mc } = report;
  return [
    h("div", { class: "row" },
      h("div", { class: "grow" }, comparisonTable([
        ["RMSE", "rmse", "lower"], ["Test log-likelihood (per point)", "log_likelihood", "higher"], ["95 % interval coverage", "coverage_95", "closer"],
      ], report)),
      h("div", { class: "grow metrics" },
        metricCard("Mean predictive std", mc.mean_std, "√(epistemic variance + 1/τ)"),
        metricCard("Mean epistemic std", mc.mean_epistemic_std, "spread of the T passes"),
        metricCard("Mean aleatoric std", mc.mean_aleatoric_std, report.heteroscedastic ? "learned per input" : "1/√τ"))),
  ];
}
