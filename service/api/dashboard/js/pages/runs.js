// Runs: submit form, filters and the runs table, kept live by the tenant's event feed
// (GET /v1/events?kind=train): the list is (re)read after each `ready`, then every status
// change and finished epoch updates its row in place.

import { api, ApiError, follow } from "../api.js";
import { fill, fmt, h, parseNumberList, setLive, shortId, statusBadge, toast, when } from "../dom.js";

const STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"];
const ACTIVE = new Set(["queued", "running"]);
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const BUILTINS = ["digits", "iris", "wine", "breast_cancer", "diabetes"];
const PAGE = 100;

export async function loadDatasets(signal) {
  const body = await api("/v1/datasets?limit=1000", { signal });
  return new Map(body.items.map((dataset) => [dataset.id, dataset]));
}

function field(label, control, attributes = {}) {
  return h("label", attributes, label, control);
}

function numberInput(id, value, attributes = {}) {
  return h("input", { id, type: "number", step: "any", value, ...attributes });
}

function select(id, options, value) {
  const element = h("select", { id }, options.map(([optionValue, text]) => h("option", { value: optionValue }, text)));
  if (value !== undefined) element.value = value;
  return element;
}

export async function render(container, params, { signal }) {
  const state = {
    runs: new Map(),
    datasets: new Map(),
    selected: new Set(),
    nextCursor: null,
    pending: new Set(),
    renderQueued: false,
    held: null, // events that arrive while the list is being read: applied after it
  };

  // ---- the submit form ----
  const datasetSelect = h("select", { id: "run-dataset", required: true });
  const builtinSelect = select("builtin-name", BUILTINS.map((name) => [name, name]), "digits");
  const builtinButton = h("button", { id: "builtin-add", type: "button", class: "secondary" }, "Add built-in dataset");
  const inputs = {
    hidden: h("input", { id: "run-hidden", value: "64, 64", title: "units per hidden layer, comma-separated" }),
    dropout: h("input", { id: "run-dropout", value: "0.5", title: "one rate for every hidden layer, or one per layer" }),
    inputDropout: numberInput("run-input-dropout", 0, { min: 0, max: 0.99 }),
    activation: select("run-activation", [["relu", "ReLU"], ["tanh", "tanh"], ["gelu", "GELU"]], "relu"),
    epochs: numberInput("run-epochs", 10, { min: 1, step: 1 }),
    batch: numberInput("run-batch", 32, { min: 1, step: 1 }),
    optimizer: select("run-optimizer", [["adam", "Adam"], ["sgd", "SGD (momentum 0.9)"]], "adam"),
    learningRate: numberInput("run-lr", 0.001, { min: 0 }),
    weightDecay: numberInput("run-weight-decay", 0, { min: 0 }),
    validation: numberInput("run-validation", 0.2, { min: 0, max: 0.9 }),
    seed: numberInput("run-seed", "", { min: 0, step: 1, placeholder: "service picks" }),
    tau: numberInput("run-tau", "", { min: 0, placeholder: "estimated", title: "regression only: model precision τ" }),
    evaluationSamples: numberInput("run-eval-samples", 100, { min: 1, max: 10000, step: 1 }),
    priority: numberInput("run-priority", 0, { min: 0, max: 9, step: 1 }),
    device: select("run-device", [["auto", "auto"], ["cpu", "cpu"], ["cuda", "cuda"]], "auto"),
  };
  const formError = h("p", { id: "run-form-error", class: "error-text", role: "alert" });
  const submitButton = h("button", { id: "run-submit", type: "submit" }, "Queue run");
  const form = h("form", { id: "run-form", class: "form-grid", novalidate: true },
    field("Dataset", datasetSelect, { class: "wide" }),
    field("Hidden layers", inputs.hidden),
    field("Dropout rate(s)", inputs.dropout),
    field("Input dropout", inputs.inputDropout),
    field("Activation", inputs.activation),
    field("Epochs", inputs.epochs),
    field("Batch size", inputs.batch),
    field("Optimizer", inputs.optimizer),
    field("Learning rate", inputs.learningRate),
    field("Weight decay (L2)", inputs.weightDecay),
    field("Validation fraction", inputs.validation),
    field("Seed", inputs.seed),
    field("τ (regression)", inputs.tau),
    field("Evaluation T", inputs.evaluationSamples),
    field("Priority 0–9", inputs.priority),
    field("Device", inputs.device),
    h("div", {}, submitButton),
  );

  // ---- filters and table ----
  const statusFilter = select("filter-status", [["", "any status"], ...STATUSES.map((s) => [s, s])], params.query.get("status") || "");
  const datasetFilter = h("select", { id: "filter-dataset" });
  const textFilter = h("input", { id: "filter-text", type: "search", placeholder: "run id starts with…" });
  const compareButton = h("button", { id: "compare", type: "button", class: "secondary", disabled: true }, "Compare selected");
  const moreButton = h("button", { id: "load-more", type: "button", class: "secondary hidden" }, "Load older runs");
  const tbody = h("tbody");
  const empty = h("p", { class: "muted" }, "No runs yet: queue one above.");
  const count = h("span", { class: "muted", id: "runs-count" });

  fill(container,
    h("section", { class: "card" }, h("h2", {}, "New run"),
      h("div", { class: "toolbar" }, field("Built-in dataset", builtinSelect), builtinButton),
      form, formError),
    h("section", { class: "card" },
      h("div", { class: "toolbar" }, h("h2", { style: { margin: 0 } }, "Runs"), count,
        field("Status", statusFilter), field("Dataset", datasetFilter), field("Search", textFilter), compareButton),
      h("table", { id: "runs-table" },
        h("thead", {}, h("tr", {},
          h("th", {}, ""), h("th", {}, "Run"), h("th", {}, "Dataset"), h("th", {}, "Status"), h("th", {}, "Progress"),
          h("th", { class: "num" }, "Val. accuracy / RMSE"), h("th", { class: "num" }, "Val. loss"),
          h("th", {}, "Network"), h("th", {}, "Created"), h("th", {}, ""))),
        tbody),
      empty, moreButton),
  );

  function datasetName(id) {
    return state.datasets.get(id)?.name ?? shortId(id);
  }

  function fillDatasetControls() {
    const chosen = datasetSelect.value;
    const filterChosen = datasetFilter.value || params.query.get("dataset") || "";
    const options = [...state.datasets.values()].map((d) => h("option", { value: d.id }, `${d.name} (${d.task}, ${d.n_rows}×${d.n_features})`));
    fill(datasetSelect, options.length ? options : h("option", { value: "" }, "— add a dataset first —"));
    if (chosen && state.datasets.has(chosen)) datasetSelect.value = chosen;
    fill(datasetFilter, h("option", { value: "" }, "any dataset"), [...state.datasets.values()].map((d) => h("option", { value: d.id }, d.name)));
    datasetFilter.value = state.datasets.has(filterChosen) ? filterChosen : "";
    inputs.tau.disabled = state.datasets.get(datasetSelect.value)?.task !== "regression";
  }

  function visibleRuns() {
    const text = textFilter.value.trim().toLowerCase();
    return [...state.runs.values()]
      .filter((run) => !statusFilter.value || run.status === statusFilter.value)
      .filter((run) => !datasetFilter.value || run.dataset_id === datasetFilter.value)
      .filter((run) => !text || run.id.startsWith(text))
      .sort((a, b) => (a.created_at < b.created_at ? 1 : a.created_at > b.created_at ? -1 : 0));
  }

  function progress(run) {
    const total = run.epochs_total || 0;
    const done = run.epochs_done || 0;
    const percent = total ? Math.min(100, (100 * done) / total) : 0;
    return h("div", { class: "progress", dataset: { field: "progress" } },
      h("div", { class: "bar" }, h("span", { style: { width: `${percent}%` } })),
      h("span", { class: "text" }, `${done}/${total}`));
  }

  function network(run) {
    const model = run.spec?.model || {};
    const layers = (model.hidden_layers || []).join("-");
    const dropout = Array.isArray(model.dropout) ? model.dropout.join("/") : model.dropout;
    return `${layers} · p=${dropout}${model.input_dropout ? ` · in ${model.input_dropout}` : ""}`;
  }

  function row(run) {
    const metrics = run.latest_metrics || {};
    const score = metrics.val_accuracy ?? metrics.val_rmse;
    const checkbox = h("input", { type: "checkbox", "aria-label": `select run ${shortId(run.id)}`, checked: state.selected.has(run.id) });
    checkbox.addEventListener("change", () => {
      if (checkbox.checked) state.selected.add(run.id); else state.selected.delete(run.id);
      compareButton.disabled = state.selected.size === 0;
    });
    const actions = [];
    if (ACTIVE.has(run.status)) {
      actions.push(h("button", { type: "button", class: "danger", dataset: { action: "cancel" }, onclick: () => cancel(run) }, "Cancel"));
    }
    if (run.status === "succeeded") actions.push(h("a", { href: `#/predict?run=${run.id}` }, "Predict"));
    const status = statusBadge(run.status);
    if (run.error) status.title = run.error;
    return h("tr", { dataset: { runId: run.id }, class: state.selected.has(run.id) ? "selected" : "" },
      h("td", {}, checkbox),
      h("td", {}, h("a", { href: `#/runs/${run.id}`, title: run.id }, shortId(run.id))),
      h("td", {}, datasetName(run.dataset_id)),
      h("td", {}, status, run.error ? h("div", { class: "error-text", style: { fontSize: "11px" } }, run.error.slice(0, 120)) : null),
      h("td", {}, progress(run)),
      h("td", { class: "num", dataset: { field: "score" } }, fmt(score, 3)),
      h("td", { class: "num" }, fmt(metrics.val_loss, 3)),
      h("td", {}, network(run)),
      h("td", { title: run.created_at }, when(run.created_at)),
      h("td", {}, actions));
  }

  function draw() {
    state.renderQueued = false;
    const runs = visibleRuns();
    fill(tbody, runs.map(row));
    empty.classList.toggle("hidden", state.runs.size > 0);
    count.textContent = `${runs.length} of ${state.runs.size} loaded`;
    moreButton.classList.toggle("hidden", !state.nextCursor);
    compareButton.disabled = state.selected.size === 0;
  }

  function redraw() {
    if (!state.renderQueued) {
      state.renderQueued = true;
      requestAnimationFrame(draw);
    }
  }

  async function relist() {
    state.held = [];
    try {
      const [datasets, page] = await Promise.all([loadDatasets(signal), api(`/v1/runs?limit=${PAGE}`, { signal })]);
      state.datasets = datasets;
      state.runs = new Map(page.items.map((run) => [run.id, run]));
      state.nextCursor = page.next_cursor || null;
      fillDatasetControls();
    } finally {
      const held = state.held;
      state.held = null;
      for (const message of held) onEvent(message); // newer than (or as new as) the list
      redraw();
    }
  }

  async function refresh(runId) {
    if (state.pending.has(runId)) return;
    state.pending.add(runId);
    try {
      const run = await api(`/v1/runs/${runId}`, { signal });
      if (!state.datasets.has(run.dataset_id)) {
        state.datasets = await loadDatasets(signal);
        fillDatasetControls();
      }
      state.runs.set(run.id, run);
      redraw();
    } catch (error) {
      if (!signal.aborted && !(error instanceof ApiError && error.status === 404)) console.error(error);
    } finally {
      state.pending.delete(runId);
    }
  }

  function onEvent({ event, data }) {
    if (event === "ready") {
      relist().catch((error) => signal.aborted || toast(error.describe ? error.describe() : String(error), "error"));
      return;
    }
    if ((event !== "status" && event !== "epoch") || !data?.run_id) return;
    if (state.held) {
      state.held.push({ event, data });
      return;
    }
    const run = state.runs.get(data.run_id);
    if (!run) {
      refresh(data.run_id); // submitted elsewhere (another tab, the CLI)
      return;
    }
    if (TERMINAL.has(run.status)) return; // final: an event older than the list changes nothing
    run.status = data.status;
    if (event === "epoch" && (data.data.epoch ?? 0) >= (run.epochs_done || 0)) {
      run.epochs_done = data.data.epoch ?? run.epochs_done;
      run.epochs_total = data.data.epochs_total ?? run.epochs_total;
      if (data.data.train_loss !== undefined) run.latest_metrics = { ...data.data };
    }
    if (TERMINAL.has(data.status)) refresh(run.id); // error, finished_at, final metrics
    redraw();
  }

  async function cancel(run) {
    try {
      const body = await api(`/v1/runs/${run.id}/cancel`, { method: "POST", signal });
      state.runs.set(body.id, body);
      toast(body.status === "cancelled" ? `Run ${shortId(run.id)} cancelled` : `Run ${shortId(run.id)} stops at its next batch`);
      redraw();
    } catch (error) {
      toast(error.describe ? error.describe() : String(error), "error");
    }
  }

  function runBody() {
    const number = (input, name, { integer = false, optional = false } = {}) => {
      if (input.value === "" && optional) return undefined;
      const value = Number(input.value);
      if (input.value === "" || !Number.isFinite(value) || (integer && !Number.isInteger(value))) {
        throw new Error(`${name}: "${input.value}" is not ${integer ? "a whole number" : "a number"}`);
      }
      return value;
    };
    if (!datasetSelect.value) throw new Error("Dataset: add a dataset first (built-in ones above)");
    const rates = parseNumberList(inputs.dropout.value, "Dropout rate(s)");
    const dataset = state.datasets.get(datasetSelect.value);
    const model = {
      hidden_layers: parseNumberList(inputs.hidden.value, "Hidden layers", { integer: true }),
      dropout: rates.length === 1 ? rates[0] : rates,
      input_dropout: number(inputs.inputDropout, "Input dropout"),
      activation: inputs.activation.value,
    };
    const tau = dataset?.task === "regression" ? number(inputs.tau, "τ", { optional: true }) : undefined;
    if (tau !== undefined) model.tau = tau;
    const training = {
      epochs: number(inputs.epochs, "Epochs", { integer: true }),
      batch_size: number(inputs.batch, "Batch size", { integer: true }),
      optimizer: inputs.optimizer.value,
      learning_rate: number(inputs.learningRate, "Learning rate"),
      weight_decay: number(inputs.weightDecay, "Weight decay"),
      validation_fraction: number(inputs.validation, "Validation fraction"),
    };
    const seed = number(inputs.seed, "Seed", { integer: true, optional: true });
    if (seed !== undefined) training.seed = seed;
    return {
      dataset_id: datasetSelect.value,
      model,
      training,
      evaluation: { samples: number(inputs.evaluationSamples, "Evaluation T", { integer: true }) },
      priority: number(inputs.priority, "Priority", { integer: true }),
      device: inputs.device.value,
    };
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    formError.textContent = "";
    let body;
    try {
      body = runBody();
    } catch (error) {
      formError.textContent = error.message;
      return;
    }
    submitButton.disabled = true;
    try {
      const run = await api("/v1/runs", { method: "POST", body, signal });
      state.runs.set(run.id, run);
      toast(`Run ${shortId(run.id)} queued`);
      redraw();
    } catch (error) {
      formError.textContent = error.describe ? error.describe() : String(error.message || error);
    } finally {
      submitButton.disabled = false;
    }
  });

  builtinButton.addEventListener("click", async () => {
    builtinButton.disabled = true;
    formError.textContent = "";
    try {
      const dataset = await api("/v1/datasets", { method: "POST", body: { name: builtinSelect.value, builtin: builtinSelect.value }, signal });
      state.datasets.set(dataset.id, dataset);
      fillDatasetControls();
      datasetSelect.value = dataset.id;
      inputs.tau.disabled = dataset.task !== "regression";
      toast(`Dataset ${dataset.name} added (${dataset.n_rows} rows)`);
    } catch (error) {
      formError.textContent = error.describe ? error.describe() : String(error.message || error);
    } finally {
      builtinButton.disabled = false;
    }
  });

  datasetSelect.addEventListener("change", () => {
    inputs.tau.disabled = state.datasets.get(datasetSelect.value)?.task !== "regression";
  });
  for (const control of [statusFilter, datasetFilter]) control.addEventListener("change", redraw);
  textFilter.addEventListener("input", redraw);
  compareButton.addEventListener("click", () => {
    const [first, ...rest] = [...state.selected];
    location.hash = `#/runs/${first}${rest.length ? `?compare=${rest.join(",")}` : ""}`;
  });
  moreButton.addEventListener("click", async () => {
    if (!state.nextCursor) return;
    moreButton.disabled = true;
    try {
      const page = await api(`/v1/runs?limit=${PAGE}&cursor=${encodeURIComponent(state.nextCursor)}`, { signal });
      for (const run of page.items) if (!state.runs.has(run.id)) state.runs.set(run.id, run);
      state.nextCursor = page.next_cursor || null;
      redraw();
    } catch (error) {
      toast(error.describe ? error.describe() : String(error), "error");
    } finally {
      moreButton.disabled = false;
    }
  });

  const timer = setInterval(redraw, 30000); // keeps "created … ago" current
  follow("/v1/events?kind=train", onEvent, { signal, onState: setLive }).catch((error) => {
    if (!signal.aborted) toast(error.describe ? error.describe() : String(error), "error");
  });
  return () => {
    clearInterval(timer);
    setLive("off");
  };
}
