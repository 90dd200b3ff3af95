// Live training charts for ComfyUI-Inversion.
//
// TrainTextualInversion and GradNormProfiler get a chart widget: a plain <canvas> inside a DOM
// widget, redrawn from the `inversion.progress` events the nodes send while they run
// (PromptServer.send_sync), and from the node's final `inversion_chart` UI output once it is done
// (so the chart comes back after a page reload, from the server's history, and when a workflow
// tab is reopened). The Vue node renderer of frontend 1.27 draws only its own widget types (and
// its built-in "chart" widget cannot load Chart.js there), so in that mode the same canvas is
// mounted into the node's element by this module.
//
// Only window.comfyAPI is used (no imports of the deprecated /scripts/*.js shims).

const { app } = window.comfyAPI.app;
const { api } = window.comfyAPI.api;

const EXTENSION = "comfyui-inversion.charts";
const EVENT = "inversion.progress";
const UI_KEY = "inversion_chart";
const WIDGET = "inversion_chart";
const CHART_NODES = new Set(["InversionTrainTextualInversion", "InversionGradNormProfiler"]);
const STATE = Symbol("inversionChart");
const WIDGET_TYPE = "inversion-chart"; // not a Vue widget type: the Vue renderer skips it
const MIN_HEIGHT = 240;
const VUE_CHECK_MS = 500;
const LIVE = new Set(); // the chart states of the nodes that exist

const COLORS = {
  bg: "#1b1c20",
  panel: "#222329",
  grid: "#33353d",
  frame: "#5d6070",
  text: "#d6d7dc",
  muted: "#9598a6",
  raw: "rgba(120, 160, 230, 0.55)",
  smooth: "#5b9bff",
  hist: "#79a86a",
  gest: "#e8913a",
  band: "rgba(232, 145, 58, 0.25)",
  window: "rgba(255, 214, 90, 0.18)",
  norm: "#b07ad8",
  target: "#e25555",
};

// ------------------------------------------------------------------ data

function finite(v) {
  return typeof v === "number" && Number.isFinite(v);
}

function num(v) {
  const x = typeof v === "number" ? v : v == null ? NaN : Number(v);
  return Number.isFinite(x) ? x : NaN;
}

function flatInts(v, out = []) {
  if (!Array.isArray(v)) return out;
  for (const x of v) {
    if (Array.isArray(x)) flatInts(x, out);
    else if (finite(x)) out.push(x);
  }
  return out;
}

function emptyTrain() {
  return {
    kind: "train", step: [], loss: [], timesteps: [], vector_norm: [], lr: [], grad_norm: [],
    g_estimate: null, bin_edges: null, target_norm: null, num_timesteps: 1000, method: "", total: 0,
  };
}

/** Normalise a final `inversion_chart` dict (whole history) into the chart's data. */
function fromOutput(d) {
  if (!d || typeof d !== "object") return null;
  if (d.kind === "profile") return fromProfile(d);
  const out = emptyTrain();
  out.loss = (d.loss ?? []).map(num);
  out.step = (d.step ?? []).map(num);
  if (out.step.length !== out.loss.length) out.step = out.loss.map((_, i) => i + 1);
  out.timesteps = flatInts(d.timesteps);
  out.vector_norm = (d.vector_norm ?? []).map(num);
  out.g_estimate = Array.isArray(d.g_estimate) ? d.g_estimate.map(num) : null;
  out.bin_edges = Array.isArray(d.bin_edges) ? d.bin_edges.map(num) : null;
  out.target_norm = finite(d.target_norm) ? d.target_norm : null;
  out.num_timesteps = finite(d.num_timesteps) && d.num_timesteps > 0 ? d.num_timesteps : 1000;
  out.method = String(d.method ?? "");
  out.total = finite(d.total) ? d.total : out.step.length ? out.step[out.step.length - 1] : 0;
  out.final = true;
  return out;
}

function fromProfile(d) {
  return {
    kind: "profile",
    step: finite(d.step) ? d.step : 0,
    total: finite(d.total) ? d.total : 0,
    bin_edges: (d.bin_edges ?? d.edges ?? []).map(num),
    mean: (d.mean ?? []).map(num),
    std: (d.std ?? []).map(num),
    num_timesteps: finite(d.num_timesteps) ? d.num_timesteps : null,
    window: Array.isArray(d.window) && d.window.length === 2 ? d.window.map(num) : null,
    window_width: finite(d.window_width) ? d.window_width : 100,
  };
}

/** Fold one live `kind: "train"` event into the running data; a new run restarts it. */
function appendTrain(data, e) {
  const step = num(e.step);
  if (!data || data.kind !== "train" || data.final || !data.step.length || step <= data.step[data.step.length - 1]) {
    data = emptyTrain();
  }
  data.step.push(step);
  data.loss.push(num(e.loss));
  data.lr.push(num(e.lr));
  data.grad_norm.push(num(e.grad_norm));
  data.vector_norm.push(num(e.vector_norm));
  flatInts(e.timesteps, data.timesteps);
  data.g_estimate = Array.isArray(e.g_estimate) ? e.g_estimate.map(num) : null;
  data.bin_edges = Array.isArray(e.bin_edges) ? e.bin_edges.map(num) : data.bin_edges;
  data.target_norm = finite(e.target_norm) ? e.target_norm : null;
  if (finite(e.num_timesteps) && e.num_timesteps > 0) data.num_timesteps = e.num_timesteps;
  if (e.method) data.method = String(e.method);
  if (finite(e.total)) data.total = e.total;
  return data;
}

/** Debiased EMA (the same as inversion/charts.py:ema): non-finite values are skipped. */
export function ema(values, a) {
  const out = [];
  let s = 0;
  let w = 0;
  for (const x of values) {
    if (finite(x)) {
      s = a * s + (1 - a) * x;
      w = a * w + (1 - a);
    }
    out.push(w > 0 ? s / w : NaN);
  }
  return out;
}

export function smoothingFor(n) {
  return Math.min(0.98, Math.max(0.6, 1 - 8 / Math.max(1, n)));
}

/** The high-grad window: the `width` integer timesteps with the largest total g(t), g linearly
 * interpolated between bin centres (inversion/profiler.py:GradProfile.best_window). */
export function bestWindow(edges, mean, T, width) {
  if (!mean.length || mean.some((m) => !finite(m)) || width < 1 || width > T) return null;
  const c = mean.map((_, i) => (edges[i] + edges[i + 1]) / 2);
  const g = new Float64Array(T);
  for (let t = 0; t < T; t++) {
    if (t <= c[0]) g[t] = mean[0];
    else if (t >= c[c.length - 1]) g[t] = mean[mean.length - 1];
    else {
      let i = 1;
      while (c[i] < t) i++;
      const w = (t - c[i - 1]) / (c[i] - c[i - 1]);
      g[t] = mean[i - 1] * (1 - w) + mean[i] * w;
    }
  }
  let sum = 0;
  for (let t = 0; t < width; t++) sum += g[t];
  let best = sum;
  let a = 0;
  for (let t = width; t < T; t++) {
    sum += g[t] - g[t - width];
    if (sum > best + 1e-12) {
      best = sum;
      a = t - width + 1;
    }
  }
  return [a, a + width - 1];
}

// ------------------------------------------------------------------ drawing

function niceTicks(lo, hi, n) {
  if (!finite(lo) || !finite(hi)) return [];
  if (hi < lo) [lo, hi] = [hi, lo];
  if (hi === lo) return [lo];
  const raw = (hi - lo) / Math.max(1, n);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const out = [];
  for (let v = Math.ceil(lo / step - 1e-9) * step; v <= hi + step * 1e-9; v += step) {
    out.push(Math.round(v / step) * step);
  }
  return out;
}

function fmt(v, span) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e5 || a < 1e-3) return v.toExponential(1);
  if (span >= 5 && Number.isInteger(v)) return String(v);
  const digits = Math.max(0, Math.min(4, 1 - Math.floor(Math.log10(Math.max(span, 1e-12)))));
  return v.toFixed(digits);
}

function limits(values, floor = null) {
  const v = values.filter(finite);
  if (!v.length) return [0, 1];
  let lo = Math.min(...v);
  const hi = Math.max(...v);
  if (floor !== null) lo = Math.min(lo, floor);
  if (hi - lo < 1e-12) {
    const d = Math.abs(hi) * 0.1 || 1;
    return [lo - d, hi + d];
  }
  const pad = 0.06 * (hi - lo);
  return [floor !== null && lo === floor ? lo : lo - pad, hi + pad];
}

function minmax(values) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const v of values) {
    if (finite(v)) {
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
  }
  return [lo, hi];
}

class Axes {
  constructor(ctx, box, xlim, ylim) {
    this.ctx = ctx;
    this.box = box; // [left, top, right, bottom] in CSS px
    this.xlim = xlim[1] > xlim[0] ? xlim : [xlim[0] - 1, xlim[0] + 1];
    this.ylim = ylim;
  }

  px(x) {
    const [l, , r] = this.box;
    return l + ((x - this.xlim[0]) / (this.xlim[1] - this.xlim[0] || 1)) * (r - l);
  }

  py(y) {
    const [, t, , b] = this.box;
    const c = Math.min(Math.max(y, this.ylim[0]), this.ylim[1]);
    return b - ((c - this.ylim[0]) / (this.ylim[1] - this.ylim[0] || 1)) * (b - t);
  }

  frame(title, { xint = false, yint = false } = {}) {
    const { ctx } = this;
    const [l, t, r, b] = this.box;
    ctx.fillStyle = COLORS.panel;
    ctx.fillRect(l, t, r - l, b - t);
    ctx.font = "10px sans-serif";
    ctx.lineWidth = 1;
    let xs = niceTicks(this.xlim[0], this.xlim[1], Math.max(3, Math.floor((r - l) / 70)));
    xs = xs.filter((v) => v >= this.xlim[0] && v <= this.xlim[1] && (!xint || Number.isInteger(v)));
    let ys = niceTicks(this.ylim[0], this.ylim[1], Math.max(2, Math.floor((b - t) / 35)));
    ys = ys.filter((v) => v >= this.ylim[0] && v <= this.ylim[1] && (!yint || Number.isInteger(v)));
    const xspan = this.xlim[1] - this.xlim[0];
    const yspan = this.ylim[1] - this.ylim[0];
    ctx.strokeStyle = COLORS.grid;
    ctx.fillStyle = COLORS.muted;
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (const v of xs) {
      const x = Math.round(this.px(v)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(x, t);
      ctx.lineTo(x, b);
      ctx.stroke();
      ctx.fillText(xint ? String(v) : fmt(v, xspan), x, b + 3);
    }
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (const v of ys) {
      const y = Math.round(this.py(v)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(l, y);
      ctx.lineTo(r, y);
      ctx.stroke();
      ctx.fillText(yint ? String(v) : fmt(v, yspan), l - 4, y);
    }
    ctx.strokeStyle = COLORS.frame;
    ctx.strokeRect(l + 0.5, t + 0.5, r - l - 1, b - t - 1);
    ctx.fillStyle = COLORS.text;
    ctx.font = "11px sans-serif";
    ctx.textAlign = "left";
    ctx.textBaseline = "bottom";
    ctx.fillText(title, l, t - 3);
  }

  line(xs, ys, color, width) {
    const { ctx } = this;
    ctx.strokeStyle = color;
    ctx.fillStyle = color;
    ctx.lineWidth = width;
    ctx.lineJoin = "round";
    let open = false;
    let lone = null;
    ctx.beginPath();
    for (let i = 0; i < ys.length; i++) {
      if (!finite(xs[i]) || !finite(ys[i])) {
        open = false;
        continue;
      }
      const x = this.px(xs[i]);
      const y = this.py(ys[i]);
      if (open) ctx.lineTo(x, y);
      else {
        ctx.moveTo(x, y);
        lone = [x, y];
      }
      open = true;
    }
    ctx.stroke();
    if (ys.filter(finite).length === 1 && lone) {
      ctx.beginPath();
      ctx.arc(lone[0], lone[1], width + 1, 0, 2 * Math.PI);
      ctx.fill();
    }
  }

  bars(edges, heights, color) {
    const { ctx } = this;
    ctx.fillStyle = color;
    for (let i = 0; i < heights.length; i++) {
      const h = heights[i];
      if (!finite(h) || h <= this.ylim[0]) continue;
      const x0 = this.px(edges[i]) + 1;
      const x1 = Math.max(x0 + 1, this.px(edges[i + 1]) - 1);
      const y = this.py(h);
      ctx.fillRect(x0, y, x1 - x0, this.py(this.ylim[0]) - y);
    }
  }

  legend(items) {
    const { ctx } = this;
    const [, t, r] = this.box;
    ctx.font = "10px sans-serif";
    ctx.textAlign = "left";
    ctx.textBaseline = "middle";
    let x = r;
    const y = t - 9;
    for (const [label, color] of [...items].reverse()) {
      x -= ctx.measureText(label).width;
      ctx.fillStyle = COLORS.text;
      ctx.fillText(label, x, y);
      ctx.strokeStyle = color;
      ctx.lineWidth = 3;
      ctx.beginPath();
      ctx.moveTo(x - 16, y);
      ctx.lineTo(x - 4, y);
      ctx.stroke();
      x -= 26;
    }
  }
}

function message(ctx, box, text) {
  const [l, t, r, b] = box;
  ctx.fillStyle = COLORS.panel;
  ctx.fillRect(l, t, r - l, b - t);
  ctx.fillStyle = COLORS.muted;
  ctx.font = "11px sans-serif";
  ctx.textAlign = "center";
  ctx.textBaseline = "middle";
  ctx.fillText(text, (l + r) / 2, (t + b) / 2);
}

function header(ctx, text) {
  ctx.fillStyle = COLORS.text;
  ctx.font = "bold 12px sans-serif";
  ctx.textAlign = "left";
  ctx.textBaseline = "top";
  ctx.fillText(text, 8, 6);
}

function histogram(values, edges) {
  const counts = new Array(edges.length - 1).fill(0);
  for (const t of values) {
    let lo = 0;
    let hi = edges.length - 2;
    if (t < edges[0] || t > edges[edges.length - 1]) continue;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (edges[mid] <= t) lo = mid;
      else hi = mid - 1;
    }
    counts[lo] += 1;
  }
  return counts;
}

function linspace(a, b, n) {
  return Array.from({ length: n + 1 }, (_, i) => Math.round(a + ((b - a) * i) / n));
}

export function drawTrain(ctx, w, h, d) {
  const last = d.loss.length ? d.loss[d.loss.length - 1] : NaN;
  const laststep = d.step.length ? d.step[d.step.length - 1] : 0;
  header(ctx, `${d.method || "training"}  step ${laststep}${d.total ? "/" + d.total : ""}` +
    (finite(last) ? `  loss ${last.toPrecision(4)}` : ""));
  const ml = 44;
  const mr = 16;
  const gap = 40;
  const split = Math.round(h * 0.56);
  const top = [ml, 40, w - mr, split];
  if (!d.loss.some(finite)) message(ctx, top, "waiting for the first step");
  else {
    const a = smoothingFor(d.loss.length);
    const [s0, s1] = minmax(d.step);
    const ax = new Axes(ctx, top, [s0, s1], limits(d.loss));
    ax.frame("loss", { xint: true });
    ax.line(d.step, d.loss, COLORS.raw, 1);
    ax.line(d.step, ema(d.loss, a), COLORS.smooth, 2);
    ax.legend([["raw", COLORS.raw], [`EMA ${a.toFixed(2)}`, COLORS.smooth]]);
  }
  const T = d.num_timesteps || 1000;
  const hasG = Array.isArray(d.g_estimate) && d.g_estimate.some(finite);
  const hasNorm = d.vector_norm.some(finite);
  const panels = ["hist", ...(hasG ? ["g"] : []), ...(hasNorm ? ["norm"] : [])];
  const pt = split + 40;
  const pb = h - 18;
  if (pb - pt < 30) return;
  const pw = (w - ml - mr - gap * (panels.length - 1)) / panels.length;
  panels.forEach((kind, i) => {
    const l = ml + i * (pw + gap);
    const box = [l, pt, l + pw, pb];
    if (kind === "hist") {
      if (!d.timesteps.length) return message(ctx, box, "no timesteps yet");
      const edges = d.bin_edges && d.bin_edges.length > 1 ? d.bin_edges : linspace(0, T, 20);
      const counts = histogram(d.timesteps, edges);
      const ax = new Axes(ctx, box, [0, T], [0, Math.max(1, ...counts) * 1.08]);
      ax.frame(`timesteps (n=${d.timesteps.length})`, { xint: true, yint: true });
      ax.bars(edges, counts, COLORS.hist);
    } else if (kind === "g") {
      const g = d.g_estimate;
      const edges = d.bin_edges && d.bin_edges.length === g.length + 1 ? d.bin_edges : linspace(0, T, g.length);
      const ax = new Axes(ctx, box, [0, T], limits(g, 0));
      ax.frame("adaptive g(t)", { xint: true });
      ax.bars(edges, g, COLORS.gest);
    } else {
      const vals = d.vector_norm.concat(finite(d.target_norm) ? [d.target_norm] : []);
      const [s0, s1] = minmax(d.step);
      const ax = new Axes(ctx, box, [s0, s1], limits(vals));
      ax.frame("vector norm", { xint: true });
      ax.line(d.step.slice(0, d.vector_norm.length), d.vector_norm, COLORS.norm, 2);
      if (finite(d.target_norm)) {
        const y = ax.py(d.target_norm);
        ctx.strokeStyle = COLORS.target;
        ctx.lineWidth = 1.5;
        ctx.setLineDash([5, 4]);
        ctx.beginPath();
        ctx.moveTo(box[0], y);
        ctx.lineTo(box[2], y);
        ctx.stroke();
        ctx.setLineDash([]);
        ctx.fillStyle = COLORS.target;
        ctx.font = "10px sans-serif";
        ctx.textAlign = "right";
        ctx.textBaseline = "bottom";
        ctx.fillText(`m* ${d.target_norm.toPrecision(3)}`, box[2] - 3, y - 2);
      }
    }
  });
}

export function drawProfile(ctx, w, h, d) {
  const done = d.mean.filter(finite).length;
  const edges = d.bin_edges;
  const T = d.num_timesteps || (edges.length ? edges[edges.length - 1] : 1000);
  const win = d.window ?? (edges.length === d.mean.length + 1 ? bestWindow(edges, d.mean, T, d.window_width) : null);
  header(ctx, `g(t) profile  ${done}/${d.mean.length} bins` + (win ? `  high-grad [${win[0]}, ${win[1]}]` : ""));
  const box = [48, 40, w - 10, h - 20];
  if (!done || edges.length !== d.mean.length + 1) return message(ctx, box, "measuring the first bin");
  const centers = d.mean.map((_, i) => (edges[i] + edges[i + 1]) / 2);
  const lo = d.mean.map((m, i) => (finite(d.std[i]) ? m - d.std[i] : m));
  const hi = d.mean.map((m, i) => (finite(d.std[i]) ? m + d.std[i] : m));
  const ax = new Axes(ctx, box, [0, T], limits(lo.concat(hi), Math.min(...lo.filter(finite)) >= 0 ? 0 : null));
  ax.frame("g(t) = E|grad_c|eps_hat - eps||", { xint: true });
  if (win) {
    ctx.fillStyle = COLORS.window;
    const x0 = ax.px(win[0]);
    ctx.fillRect(x0, box[1] + 1, Math.max(1, ax.px(win[1] + 1) - x0), box[3] - box[1] - 2);
  }
  ctx.fillStyle = COLORS.band;
  let run = [];
  const flush = () => {
    if (run.length >= 2) {
      ctx.beginPath();
      run.forEach((j, k) => (k ? ctx.lineTo(ax.px(centers[j]), ax.py(hi[j])) : ctx.moveTo(ax.px(centers[j]), ax.py(hi[j]))));
      [...run].reverse().forEach((j) => ctx.lineTo(ax.px(centers[j]), ax.py(lo[j])));
      ctx.closePath();
      ctx.fill();
    }
    run = [];
  };
  d.mean.forEach((m, i) => (finite(m) ? run.push(i) : flush()));
  flush();
  ax.line(centers, d.mean, COLORS.gest, 2);
  ctx.fillStyle = COLORS.gest;
  d.mean.forEach((m, i) => {
    if (!finite(m)) return;
    ctx.beginPath();
    ctx.arc(ax.px(centers[i]), ax.py(m), 2.5, 0, 2 * Math.PI);
    ctx.fill();
  });
  ax.legend([["mean", COLORS.gest], ["+-std", COLORS.band]]);
}

function drawEmpty(ctx, w, h, nodeType) {
  header(ctx, nodeType === "InversionGradNormProfiler" ? "g(t) profile" : "training chart");
  message(ctx, [10, 30, w - 10, h - 10], "runs will be charted here");
}

// ------------------------------------------------------------------ the widget

function canvasScale() {
  const zoom = app.canvas?.ds?.scale ?? 1;
  return (window.devicePixelRatio || 1) * Math.min(Math.max(zoom, 1), 4);
}

function render(state) {
  state.frame = 0;
  const { canvas, container } = state;
  if (!canvas.isConnected) return;
  const w = Math.max(1, container.clientWidth);
  const h = Math.max(1, container.clientHeight);
  const scale = canvasScale();
  const bw = Math.round(w * scale);
  const bh = Math.round(h * scale);
  if (canvas.width !== bw || canvas.height !== bh) {
    canvas.width = bw;
    canvas.height = bh;
  }
  state.scale = scale;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(scale, 0, 0, scale, 0, 0);
  ctx.fillStyle = COLORS.bg;
  ctx.fillRect(0, 0, w, h);
  try {
    if (!state.data) drawEmpty(ctx, w, h, state.nodeType);
    else if (state.data.kind === "profile") drawProfile(ctx, w, h, state.data);
    else drawTrain(ctx, w, h, state.data);
  } catch (err) {
    console.warn(`[${EXTENSION}] could not draw the chart`, err);
  }
}

function schedule(state) {
  if (!state.frame) state.frame = requestAnimationFrame(() => render(state));
}

/** Vue node renderer: put the chart under the node's widgets (the classic DOM-widget overlay is
 * not drawn in that mode, so the container is free to move; switching back re-mounts it there). */
function mountInVueNode(state) {
  const node = state.node;
  if (!window.LiteGraph?.vueNodesMode || node.graph !== app.canvas?.graph) return;
  const el = document.querySelector(`[data-node-id="${CSS.escape(String(node.id))}"]`);
  const widgets = el?.querySelector(".lg-node-widgets");
  if (!widgets || state.container.parentElement === widgets.parentElement) return;
  Object.assign(state.container.style, { height: `${MIN_HEIGHT}px`, padding: "0 8px 8px 8px", boxSizing: "border-box" });
  widgets.after(state.container);
  schedule(state);
}

function summary(data) {
  if (!data) return null;
  return data.kind === "profile"
    ? { kind: "profile", bins: data.mean.length, measured: data.mean.filter(finite).length }
    : { kind: "train", steps: data.step.slice(), last_loss: data.loss[data.loss.length - 1] ?? null };
}

function setData(node, data) {
  const state = node[STATE];
  if (!state) return;
  state.data = data;
  schedule(state);
}

function addChartWidget(node, nodeType) {
  if (node[STATE]) return node[STATE];
  const container = document.createElement("div");
  container.className = "comfyui-inversion-chart";
  Object.assign(container.style, { width: "100%", height: "100%", minHeight: `${MIN_HEIGHT - 20}px`, overflow: "hidden" });
  const canvas = document.createElement("canvas");
  Object.assign(canvas.style, { width: "100%", height: "100%", display: "block", borderRadius: "4px" });
  container.appendChild(canvas);
  const state = { node, nodeType, container, canvas, data: null, frame: 0, scale: 0, widget: null, observer: null };
  const widget = node.addDOMWidget(WIDGET, WIDGET_TYPE, container, {
    serialize: false, // the chart is output, not an input: keep it out of the prompt and of widgets_values
    hideOnZoom: false,
    getMinHeight: () => MIN_HEIGHT,
    getValue: () => summary(state.data), // what the chart shows, for scripts and tests
    setValue: () => {},
    onDraw: () => {
      if (state.scale && Math.abs(canvasScale() - state.scale) > 0.01) schedule(state);
    },
  });
  widget.serialize = false;
  state.widget = widget;
  state.observer = new ResizeObserver(() => schedule(state));
  state.observer.observe(container);
  const onRemove = widget.onRemove;
  widget.onRemove = function () {
    cleanup(node);
    return onRemove?.apply(this, arguments);
  };
  node[STATE] = state;
  LIVE.add(state);
  const [w, h] = node.size;
  node.setSize([Math.max(w, 420), Math.max(h, node.computeSize()[1])]);
  schedule(state);
  return state;
}

function cleanup(node) {
  const state = node[STATE];
  if (!state) return;
  state.observer?.disconnect();
  if (state.frame) cancelAnimationFrame(state.frame);
  LIVE.delete(state);
  state.container.remove();
  state.widget = null;
  state.data = null;
  delete node[STATE];
}

// ------------------------------------------------------------------ finding nodes

/** The node an execution id names: "5" in the root graph, "12:7:5" through subgraph nodes 12 and 7. */
export function nodeByExecutionId(rootGraph, id) {
  const parts = String(id).split(":").filter((p) => p.length);
  if (!rootGraph || !parts.length) return null;
  let graph = rootGraph;
  for (const part of parts.slice(0, -1)) {
    const sub = graph.getNodeById(part) ?? graph.getNodeById(Number(part));
    if (!sub?.isSubgraphNode?.() || !sub.subgraph) return null;
    graph = sub.subgraph;
  }
  const last = parts[parts.length - 1];
  return graph.getNodeById(last) ?? graph.getNodeById(Number(last)) ?? null;
}

function* allNodes(graph, seen = new Set()) {
  if (!graph || seen.has(graph)) return;
  seen.add(graph);
  for (const node of graph.nodes ?? graph._nodes ?? []) {
    yield node;
    if (node.isSubgraphNode?.() && node.subgraph) yield* allNodes(node.subgraph, seen);
  }
}

function chartOf(output) {
  const list = output?.[UI_KEY];
  const d = Array.isArray(list) ? list[list.length - 1] : list;
  return d ? fromOutput(d) : null;
}

function locatorId(node) {
  const g = node.graph;
  return g && g !== app.graph && g.id ? `${g.id}:${node.id}` : String(node.id);
}

/** Charts for nodes that have none yet, from stored outputs (workflow tab switches). */
function restoreFromOutputs(outputs) {
  if (!outputs) return;
  for (const node of allNodes(app.graph)) {
    const state = node[STATE];
    if (!state || state.data) continue;
    const data = chartOf(outputs[locatorId(node)]) ?? chartOf(outputs[String(node.id)]);
    if (data) setData(node, data);
  }
}

/** After a page reload: the newest finished chart of each node, from the server's history, for
 * prompts queued from this same workflow. */
async function restoreFromHistory() {
  const graph = app.graph;
  const ours = [...allNodes(graph)].filter((n) => n[STATE] && !n[STATE].data);
  if (!ours.length) return;
  let history;
  try {
    const res = await api.fetchApi("/history?max_items=64");
    if (!res.ok) return;
    history = await res.json();
  } catch {
    return; // no history endpoint (or offline): nothing to restore
  }
  const items = Object.values(history ?? {}).reverse(); // newest first
  for (const item of items) {
    const workflowId = item?.prompt?.[3]?.extra_pnginfo?.workflow?.id;
    if (!workflowId || workflowId !== graph.id) continue;
    for (const [execId, output] of Object.entries(item.outputs ?? {})) {
      const data = chartOf(output);
      if (!data) continue;
      const node = nodeByExecutionId(graph, execId);
      if (node?.[STATE] && !node[STATE].data) setData(node, data);
    }
  }
}

// ------------------------------------------------------------------ the extension

function onProgress(event) {
  const e = event.detail;
  if (!e || e.node == null) return;
  const node = nodeByExecutionId(app.graph, e.node);
  const state = node?.[STATE];
  if (!state) return;
  if (e.kind === "profile") setData(node, fromProfile(e));
  else if (e.kind === "train") setData(node, appendTrain(state.data, e));
}

app.registerExtension({
  name: EXTENSION,

  async setup() {
    api.addEventListener(EVENT, onProgress);
    setInterval(() => {
      if (window.LiteGraph?.vueNodesMode) for (const state of LIVE) mountInVueNode(state);
    }, VUE_CHECK_MS);
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!CHART_NODES.has(nodeData.name)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      addChartWidget(this, nodeData.name);
      return r;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const r = onExecuted?.apply(this, arguments);
      const data = chartOf(message);
      if (data) setData(this, data);
      return r;
    };
    const onRemoved = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      cleanup(this);
      return onRemoved?.apply(this, arguments);
    };
  },

  async afterConfigureGraph() {
    restoreFromOutputs(app.nodeOutputs);
    await restoreFromHistory();
  },

  onNodeOutputsUpdated(outputs) {
    restoreFromOutputs(outputs);
  },
});
