// Charts on uPlot (vendor/uplot, loaded as a classic script: window.uPlot).

const uPlot = window.uPlot;

export const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"];

function widthOf(element) {
  return Math.max(280, Math.floor(element.clientWidth || element.parentElement?.clientWidth || 600));
}

/** Keep a chart as wide as its container. */
function autoSize(chart, element, height) {
  const observer = new ResizeObserver(() => {
    const width = widthOf(element);
    if (Math.abs(width - chart.width) > 2) chart.setSize({ width, height });
  });
  observer.observe(element);
  return () => observer.disconnect();
}

function finish(chart, element, height) {
  const stop = autoSize(chart, element, height);
  return {
    chart,
    setData(data) {
      chart.setData(data);
    },
    destroy() {
      stop();
      chart.destroy();
    },
  };
}

/**
 * Lines over a numeric x (epochs): series [{label, color, dash, width}], data [xs, ys...]
 * (null for a missing point).
 */
export function lineChart(element, { title, xLabel, yLabel, series, data, height = 260, yRange }) {
  const options = {
    title,
    width: widthOf(element),
    height,
    legend: { live: false },
    scales: { x: { time: false }, y: yRange ? { range: yRange } : {} },
    axes: [{ label: xLabel }, { label: yLabel, size: 60 }],
    series: [
      { label: xLabel },
      ...series.map((s) => ({
        label: s.label,
        stroke: s.color,
        width: s.width || 2,
        dash: s.dash,
        spanGaps: true,
        points: { show: (data[0] || []).length < 40, size: 4 },
        value: (u, v) => (v === null || v === undefined ? "—" : v.toFixed(4)),
      })),
    ],
  };
  const chart = new uPlot(options, data, element);
  return finish(chart, element, height);
}

/**
 * Bars over categories. `categories` label the x positions 0..n-1; `series` are
 * [{label, color, values, errors?, line?}]: `errors` (one half-width per bar) draws whiskers,
 * `line: true` draws the series as a line (e.g. the diagonal of a reliability diagram). Bar
 * series sit side by side.
 */
export function barChart(element, { title, xLabel, yLabel, categories, series, height = 240, yRange, labelEvery = 1 }) {
  const n = categories.length;
  const xs = categories.map((_, i) => i);
  const bars = series.filter((s) => !s.line);
  const groupWidth = 0.8;
  const barWidth = groupWidth / Math.max(1, bars.length);
  const offsetOf = (s) => (bars.indexOf(s) - (bars.length - 1) / 2) * barWidth;

  const drawErrors = (u) => {
    const ctx = u.ctx;
    ctx.save();
    ctx.beginPath();
    ctx.rect(u.bbox.left, u.bbox.top, u.bbox.width, u.bbox.height);
    ctx.clip();
    ctx.lineWidth = Math.max(1, devicePixelRatio);
    for (const s of bars) {
      if (!s.errors) continue;
      ctx.strokeStyle = "#222";
      const capHalf = Math.max(2, (u.valToPos(barWidth, "x", true) - u.valToPos(0, "x", true)) * 0.25);
      for (let i = 0; i < n; i++) {
        const value = s.values[i];
        const error = s.errors[i];
        if (value === null || value === undefined || !error) continue;
        const x = u.valToPos(i + offsetOf(s), "x", true);
        const low = u.valToPos(value - error, "y", true);
        const high = u.valToPos(value + error, "y", true);
        ctx.beginPath();
        ctx.moveTo(x, low);
        ctx.lineTo(x, high);
        ctx.moveTo(x - capHalf, low);
        ctx.lineTo(x + capHalf, low);
        ctx.moveTo(x - capHalf, high);
        ctx.lineTo(x + capHalf, high);
        ctx.stroke();
      }
    }
    ctx.restore();
  };

  if (!yRange) {
    // Bars start at 0 and whiskers must fit: the range covers both.
    let low = 0;
    let high = 0;
    for (const s of series) {
      s.values.forEach((v, i) => {
        if (v === null || v === undefined) return;
        const e = s.errors?.[i] || 0;
        low = Math.min(low, v - e);
        high = Math.max(high, v + e);
      });
    }
    const pad = (high - low) * 0.05 || 1;
    yRange = [low < 0 ? low - pad : 0, high + pad];
  }
  const options = {
    title,
    width: widthOf(element),
    height,
    legend: { live: false },
    scales: { x: { time: false, range: [-0.6, n - 0.4] }, y: { range: yRange } },
    axes: [
      {
        label: xLabel,
        splits: () => xs,
        values: (u, splits) => splits.map((v) => (Number.isInteger(v) && v % labelEvery === 0 ? categories[v] ?? "" : "")),
        grid: { show: false },
      },
      { label: yLabel, size: 55 },
    ],
    series: [
      { label: xLabel, value: (u, v) => (v === null || v === undefined ? "—" : categories[Math.round(v)] ?? "") },
      ...series.map((s) => {
        if (s.line) {
          return { label: s.label, stroke: s.color, width: 1.5, dash: s.dash, points: { show: false }, spanGaps: true };
        }
        const offset = offsetOf(s);
        return {
          label: s.label,
          stroke: s.color,
          fill: `${s.color}cc`,
          width: 1,
          points: { show: false },
          value: (u, v) => (v === null || v === undefined ? "—" : v.toFixed(4)),
          paths: (u, seriesIndex, i0, i1) => {
            // Each bar a rectangle of width `barWidth` (in x units) centred at i + offset.
            const path = new Path2D();
            const y0 = u.valToPos(Math.max(0, u.scales.y.min ?? 0), "y", true);
            for (let i = i0; i <= i1; i++) {
              const value = u.data[seriesIndex][i];
              if (value === null || value === undefined) continue;
              const left = u.valToPos(i + offset - barWidth / 2, "x", true);
              const right = u.valToPos(i + offset + barWidth / 2, "x", true);
              const top = u.valToPos(value, "y", true);
              path.rect(left, Math.min(top, y0), Math.max(1, right - left - 1), Math.abs(y0 - top));
            }
            return { stroke: path, fill: path };
          },
        };
      }),
    ],
    hooks: { draw: [drawErrors] },
  };
  const data = [xs, ...series.map((s) => s.values.map((v) => (v === undefined ? null : v)))];
  const chart = new uPlot(options, data, element);
  return finish(chart, element, height);
}
