// Predict playground: pick a succeeded run, give inputs (paste rows; for digits draw on an
// 8×8 grid or pick a sample), choose T and a seed, and see the MC dropout predictive
// distribution: class probabilities with error bars, predictive entropy, expected entropy,
// mutual information; for regression the mean with its 95 % interval.

import { api } from "../api.js";
import { barChart, PALETTE } from "../charts.js";
import { DIGIT_SAMPLES } from "../digits.js";
import { fill, fmt, h, numberCell, parseNumberList, shortId, toast } from "../dom.js";

const CELL = 26; // px per digit pixel on the drawing grid
const INK = 16; // the digits' largest intensity

function isDigits(dataset) {
  return dataset?.n_features === 64 && (dataset.source === "builtin:digits" || /digit/i.test(dataset.name));
}

function runLabel(run, datasets) {
  const model = run.spec.model || {};
  const dropout = Array.isArray(model.dropout) ? model.dropout.join("/") : model.dropout;
  const metrics = run.latest_metrics || {};
  const score = metrics.val_accuracy !== null && metrics.val_accuracy !== undefined
    ? `val. acc. ${fmt(metrics.val_accuracy, 3)}` : metrics.val_rmse !== undefined ? `val. RMSE ${fmt(metrics.val_rmse, 3)}` : "";
  return `${shortId(run.id)} · ${datasets.get(run.dataset_id)?.name ?? shortId(run.dataset_id)} · ${(model.hidden_layers || []).join("-")} p=${dropout} · ${score}`;
}

/** Draw 64 intensities (0..16) on a canvas, `scale` px per pixel. */
function paintDigit(canvas, pixels, scale) {
  const ctx = canvas.getContext("2d");
  for (let i = 0; i < 64; i++) {
    const shade = Math.round(255 * (1 - Math.min(INK, Math.max(0, pixels[i])) / INK));
    ctx.fillStyle = `rgb(${shade},${shade},${shade})`;
    ctx.fillRect((i % 8) * scale, Math.floor(i / 8) * scale, scale, scale);
  }
  if (scale >= 10) {
    ctx.strokeStyle = "#dde";
    ctx.lineWidth = 1;
    for (let k = 1; k < 8; k++) {
      ctx.beginPath();
      ctx.moveTo(k * scale + 0.5, 0);
      ctx.lineTo(k * scale + 0.5, 8 * scale);
      ctx.moveTo(0, k * scale + 0.5);
      ctx.lineTo(8 * scale, k * scale + 0.5);
      ctx.stroke();
    }
  }
}

export async function render(container, params, { signal }) {
  const [runsPage, datasetsPage] = await Promise.all([
    api("/v1/runs?status=succeeded&limit=200", { signal }),
    api("/v1/datasets?limit=1000", { signal }),
  ]);
  const datasets = new Map(datasetsPage.items.map((d) => [d.id, d]));
  const runs = runsPage.items;
  if (!runs.length) {
    fill(container, h("section", { class: "card" }, h("h2", {}, "Predict"),
      h("p", { class: "muted" }, "No succeeded run yet. Train one on the "), h("a", { href: "#/runs" }, "Runs page"), "."));
    return () => {};
  }

  const charts = [];
  let requestNumber = 0;
  let pixels = new Array(64).fill(0);
  let lastResponse = null;
  let selectedRow = 0;

  const runSelect = h("select", { id: "predict-run" }, runs.map((run) => h("option", { value: run.id }, runLabel(run, datasets))));
  if (params.runId && runs.some((run) => run.id === params.runId)) runSelect.value = params.runId;
  const samplesInput = h("input", { id: "predict-samples", type: "number", min: 1, max: 10000, step: 1, value: 100 });
  const seedInput = h("input", { id: "predict-seed", type: "number", min: 0, step: 1, placeholder: "fresh masks each call" });
  const predictButton = h("button", { id: "predict-button", type: "button" }, "Predict");
  const inputsArea = h("textarea", { id: "predict-inputs", rows: 4, spellcheck: "false" });
  const inputsHint = h("p", { class: "muted", id: "predict-hint" });
  const upload = h("input", { id: "predict-file", type: "file", accept: ".csv,.txt,.tsv,text/csv,text/plain" });
  const errorBox = h("p", { class: "error-text", id: "predict-error", role: "alert" });
  const digitPad = h("div", { class: "digit-pad hidden", id: "digit-pad" });
  const results = h("section", { class: "card", id: "predict-results" }, h("p", { class: "muted" }, "Results appear here."));

  fill(container,
    h("section", { class: "card" },
      h("h2", {}, "Predict with MC dropout"),
      h("div", { class: "toolbar" },
        h("label", { style: { flex: "1 1 420px" } }, "Run", runSelect),
        h("label", {}, "T (stochastic passes)", samplesInput),
        h("label", {}, "Seed", seedInput),
        predictButton),
      digitPad,
      h("label", { style: { display: "flex" } }, "Inputs: one per line, values separated by commas", inputsArea),
      h("div", { class: "toolbar" }, h("label", {}, "…or load them from a CSV file (a header row is skipped; no target column)", upload)),
      inputsHint, errorBox),
    results);

  // ---- digits: an 8×8 drawing grid and sample images ----
  const canvas = h("canvas", { id: "digit-canvas", class: "digit-canvas", width: 8 * CELL, height: 8 * CELL, title: "draw: left button; erase: right button or Shift" });
  const brush = h("select", { id: "digit-brush" }, h("option", { value: "16" }, "ink 16"), h("option", { value: "8" }, "ink 8"), h("option", { value: "0" }, "eraser"));
  const liveBox = h("input", { type: "checkbox", id: "predict-live", checked: true });
  const sampleButtons = DIGIT_SAMPLES.map((sample) => {
    const thumb = h("canvas", { width: 32, height: 32 });
    paintDigit(thumb, sample.pixels, 4);
    return h("button", { type: "button", title: `digit ${sample.label} (load_digits index ${sample.index})`, dataset: { sample: sample.label }, onclick: () => setPixels(sample.pixels, true) }, thumb);
  });
  fill(digitPad,
    canvas,
    h("div", {},
      h("p", { class: "muted", style: { marginTop: 0 } }, "Draw a digit (8×8, intensities 0–16), or pick one of the data set's images:"),
      h("div", { class: "samples" }, sampleButtons),
      h("div", { class: "toolbar", style: { marginTop: "10px" } },
        h("label", {}, "Brush", brush),
        h("button", { type: "button", class: "secondary", id: "digit-clear", onclick: () => setPixels(new Array(64).fill(0), false) }, "Clear"),
        h("label", { style: { flexDirection: "row", alignItems: "center", gap: "4px" } }, liveBox, "predict as I draw"))));

  function setPixels(values, predictNow) {
    pixels = values.slice();
    paintDigit(canvas, pixels, CELL);
    inputsArea.value = pixels.join(",");
    if (predictNow && liveBox.checked) predict();
  }

  let drawing = false;
  const paintAt = (event) => {
    const box = canvas.getBoundingClientRect();
    const column = Math.floor(((event.clientX - box.left) / box.width) * 8);
    const line = Math.floor(((event.clientY - box.top) / box.height) * 8);
    if (column < 0 || column > 7 || line < 0 || line > 7) return;
    const erase = event.buttons === 2 || event.shiftKey;
    const value = erase ? 0 : Number(brush.value);
    if (pixels[line * 8 + column] === value) return;
    pixels[line * 8 + column] = value;
    setPixels(pixels, false);
  };
  canvas.addEventListener("contextmenu", (event) => event.preventDefault());
  canvas.addEventListener("pointerdown", (event) => {
    drawing = true;
    canvas.setPointerCapture(event.pointerId);
    paintAt(event);
  });
  canvas.addEventListener("pointermove", (event) => drawing && paintAt(event));
  const stop = () => {
    if (!drawing) return;
    drawing = false;
    if (liveBox.checked) predict();
  };
  canvas.addEventListener("pointerup", stop);
  canvas.addEventListener("pointercancel", stop);
  inputsArea.addEventListener("change", () => {
    // Typed or pasted values: show one row of 64 on the grid too.
    const lines = inputsArea.value.trim().split(/\n+/);
    if (!digitPad.classList.contains("hidden") && lines.length === 1) {
      try {
        const values = parseNumberList(lines[0], "Input");
        if (values.length === 64) {
          pixels = values;
          paintDigit(canvas, pixels, CELL);
        }
      } catch {
        /* shown when predicting */
      }
    }
  });

  function currentRun() {
    return runs.find((run) => run.id === runSelect.value);
  }

  function onRunChange() {
    const run = currentRun();
    const dataset = datasets.get(run.dataset_id);
    history.replaceState(null, "", `#/predict?run=${run.id}`);
    const digits = isDigits(dataset);
    digitPad.classList.toggle("hidden", !digits);
    if (digits) {
      setPixels(DIGIT_SAMPLES[0].pixels, false);
    } else {
      inputsArea.value = "";
    }
    const names = dataset?.feature_names || [];
    inputsHint.textContent = dataset
      ? `${dataset.n_features} features${digits ? " (pixels row by row)" : `: ${names.slice(0, 30).join(", ")}${names.length > 30 ? ", …" : ""}`}, in the data set's own units. Target: ${dataset.target_name}${dataset.class_names ? ` (classes ${dataset.class_names.join(", ")})` : ""}.`
      : "";
    fill(results, h("p", { class: "muted" }, "Results appear here."));
    lastResponse = null;
  }

  function readInputs() {
    const lines = inputsArea.value.split(/\n+/).map((line) => line.trim()).filter(Boolean);
    if (!lines.length) throw new Error("Inputs: give at least one row of numbers");
    return lines.map((line, i) => parseNumberList(line.replace(/^\[|\]$/g, ""), `Input ${i + 1}`));
  }

  async function predict() {
    errorBox.textContent = "";
    let body;
    try {
      const samples = Number(samplesInput.value);
      if (!Number.isInteger(samples) || samples < 1) throw new Error("T: a whole number of passes, at least 1");
      body = { inputs: readInputs(), samples };
      if (seedInput.value !== "") {
        const seed = Number(seedInput.value);
        if (!Number.isInteger(seed) || seed < 0) throw new Error("Seed: a whole number ≥ 0, or empty");
        body.seed = seed;
      }
    } catch (error) {
      errorBox.textContent = error.message;
      return;
    }
    const mine = ++requestNumber;
    predictButton.disabled = true;
    try {
      const response = await api(`/v1/runs/${runSelect.value}/predict`, { method: "POST", body, signal });
      if (mine !== requestNumber) return; // a newer request was sent meanwhile
      lastResponse = response;
      selectedRow = 0;
      showResults();
    } catch (error) {
      if (mine === requestNumber && !signal.aborted) errorBox.textContent = error.describe ? error.describe() : String(error.message || error);
    } finally {
      if (mine === requestNumber) predictButton.disabled = false;
    }
  }

  function destroyCharts() {
    while (charts.length) charts.pop().destroy();
  }

  function showResults() {
    destroyCharts();
    const response = lastResponse;
    const classification = response.task === "classification";
    const summary = response.predictions.length > 1 ? summaryTable(response, classification) : null;
    const detail = h("div", { id: "prediction-detail" });
    fill(results,
      h("h2", {}, `Prediction: T = ${response.samples} passes, seed ${response.seed ?? "none (fresh masks)"}`),
      summary, detail);
    results.dataset.samples = response.samples;
    results.dataset.seed = response.seed ?? "";
    results.dataset.ready = "true";
    showDetail(detail, response, classification);
  }

  function summaryTable(response, classification) {
    const head = classification
      ? ["#", "Label", "p(label)", "Predictive entropy", "Expected entropy", "Mutual information"]
      : ["#", "Mean", "Std", "95 % interval"];
    return h("table", { id: "prediction-summary" },
      h("thead", {}, h("tr", {}, head.map((name, i) => h("th", { class: i ? "num" : "" }, name)))),
      h("tbody", {}, response.predictions.map((p, i) => {
        const cells = classification
          ? [h("td", { class: "num" }, p.label), numberCell(p.probabilities[p.class_index], 3), numberCell(p.predictive_entropy, 3), numberCell(p.expected_entropy, 3), numberCell(p.mutual_information, 3)]
          : [numberCell(p.mean, 3), numberCell(p.std, 3), h("td", { class: "num" }, `[${fmt(p.interval_95.lower, 3)}, ${fmt(p.interval_95.upper, 3)}]`)];
        return h("tr", {
          class: i === selectedRow ? "selected" : "", style: { cursor: "pointer" },
          onclick: () => {
            selectedRow = i;
            showResults();
          },
        }, h("td", {}, i + 1), cells);
      })));
  }

  function metric(name, key, value, hint) {
    return h("div", { class: "metric" }, h("div", { class: "name" }, name),
      h("div", { class: "value", dataset: { metric: key, value } }, fmt(value, 4)), hint ? h("div", { class: "hint" }, hint) : null);
  }

  function showDetail(detail, response, classification) {
    const p = response.predictions[selectedRow];
    if (classification) {
      const names = response.class_names || p.probabilities.map((_, i) => String(i));
      const chart = h("div", { class: "chart", id: "probability-chart" });
      fill(detail,
        h("p", {}, response.predictions.length > 1 ? `Input ${selectedRow + 1}: ` : "", "MC dropout label ",
          h("strong", { id: "predicted-label" }, p.label), ` with p = ${fmt(p.probabilities[p.class_index], 3)}; deterministic (dropout off) `,
          h("strong", { id: "deterministic-label" }, p.deterministic.label), ` with p = ${fmt(p.deterministic.probabilities[p.deterministic.class_index], 3)}.`),
        h("div", { class: "metrics" },
          metric("Predictive entropy", "predictive_entropy", p.predictive_entropy, `total uncertainty, nats (max ln ${names.length} = ${fmt(Math.log(names.length), 3)})`),
          metric("Expected entropy", "expected_entropy", p.expected_entropy, "aleatoric: mean entropy of one pass"),
          metric("Mutual information", "mutual_information", p.mutual_information, "epistemic: how much the passes disagree (BALD)")),
        chart,
        h("table", { id: "probabilities-table" },
          h("thead", {}, h("tr", {}, h("th", {}, "Class"), h("th", { class: "num" }, "MC probability"), h("th", { class: "num" }, "± std over passes"), h("th", { class: "num" }, "Deterministic"))),
          h("tbody", {}, names.map((name, i) => h("tr", { dataset: { class: name } }, h("td", {}, name),
            numberCell(p.probabilities[i], 4, { dataset: { field: "probability" } }),
            numberCell(p.probabilities_std[i], 4, { dataset: { field: "std" } }),
            numberCell(p.deterministic.probabilities[i], 4, { dataset: { field: "deterministic" } }))))));
      requestAnimationFrame(() => charts.push(barChart(chart, {
        title: "Class probabilities (MC mean ± one std over the passes)", xLabel: "class", yLabel: "probability", yRange: [0, 1],
        categories: names,
        series: [
          { label: "MC dropout", color: PALETTE[0], values: p.probabilities, errors: p.probabilities_std },
          { label: "deterministic", color: PALETTE[3], values: p.deterministic.probabilities },
        ],
      })));
    } else {
      const chart = h("div", { class: "chart", id: "regression-chart" });
      fill(detail,
        response.predictions.length > 1 ? h("h3", {}, `Input ${selectedRow + 1}`) : null,
        h("div", { class: "metrics" },
          metric("Predictive mean", "mean", p.mean, "target units"),
          metric("Predictive std", "std", p.std, "√(epistemic variance + aleatoric variance)"),
          metric("Epistemic std", "epistemic_std", p.epistemic_std, "spread of the T passes"),
          metric("Aleatoric std", "aleatoric_std", p.aleatoric_std, "noise: 1/√τ or learned"),
          metric("95 % interval: lower", "interval_lower", p.interval_95.lower, ""),
          metric("95 % interval: upper", "interval_upper", p.interval_95.upper, ""),
          metric("Deterministic mean", "deterministic_mean", p.deterministic.mean, "dropout off")),
        chart);
      requestAnimationFrame(() => charts.push(barChart(chart, {
        title: "Predictive mean with its 95 % interval, per input", xLabel: "input", yLabel: "prediction",
        categories: response.predictions.map((_, i) => String(i + 1)),
        series: [
          { label: "MC mean", color: PALETTE[0], values: response.predictions.map((q) => q.mean), errors: response.predictions.map((q) => (q.interval_95.upper - q.interval_95.lower) / 2) },
          { label: "deterministic", color: PALETTE[3], values: response.predictions.map((q) => q.deterministic.mean) },
        ],
      })));
    }
  }

  upload.addEventListener("change", async () => {
    const file = upload.files?.[0];
    if (!file) return;
    errorBox.textContent = "";
    if (file.size > 5_000_000) {
      errorBox.textContent = "That file is over 5 MB: predict a smaller batch at a time.";
      return;
    }
    const rows = (await file.text()).split(/\r?\n/).map((line) => line.trim()).filter(Boolean);
    const numeric = (line) => line.split(/[,;\t]/).every((cell) => cell.trim() !== "" && Number.isFinite(Number(cell)));
    if (rows.length && !numeric(rows[0])) rows.shift(); // a header
    inputsArea.value = rows.map((line) => line.split(/[,;\t]/).map((cell) => cell.trim()).join(",")).join("\n");
    inputsArea.dispatchEvent(new Event("change"));
    upload.value = "";
  });
  runSelect.addEventListener("change", onRunChange);
  predictButton.addEventListener("click", predict);
  onRunChange();
  return destroyCharts;
}
