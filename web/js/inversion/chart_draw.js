// Drawing the training charts on a 2D canvas context, for web/js/inversion_charts.js.
//
// `drawChart(ctx, w, h, data, nodeType)` paints one chart in CSS pixels (the caller sets the
// pixel-ratio transform): the loss curve (raw and EMA), the timesteps sampled, the adaptive
// sampler's g(t) estimate, the vector norm and the previews' CLIP similarities for a training run;
// g(t) with its +-std band and the high-grad window for a profile. The data is chart_math.js's.
//
// The frontend imports every .js under web/, this module too: it only exports.

import { bestWindow, conceptSeries, ema, finite, histogram, limits, linspace, minmax, niceTicks, smoothingFor } from "./chart_math.js";

export const COLORS = {
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
  score: "#3fc6a8",
  clipImage: "#4cc26a",
  clipText: "#e060b0",
};

// One per concept of a multi-concept run, in order (cycled): inversion/charts.py CONCEPT_COLORS.
export const CONCEPT_COLORS = ["#e05a5b", "#5cc05c", "#a58bd6", "#ff9f40", "#3fc8d8", "#c49a8c"];

/** A tick label for v on an axis spanning `span`. */
function fmt(v, span) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e5 || a < 1e-3) return v.toExponential(1);
  if (span >= 5 && Number.isInteger(v)) return String(v);
  const digits = Math.max(0, Math.min(4, 1 - Math.floor(Math.log10(Math.max(span, 1e-12)))));
  return v.toFixed(digits);
}

/** One plot box: data coordinates to CSS px, its frame with ticks, lines, bars and a key. */
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

/** A dashed vertical line at `step` with a label; a ring on the curve at (step, y) when y is given. */
function markStep(ax, step, color, label, y = null) {
  const { ctx } = ax;
  const [, t, , b] = ax.box;
  const x = ax.px(step);
  ctx.strokeStyle = color;
  ctx.lineWidth = 1.5;
  ctx.setLineDash([5, 4]);
  ctx.beginPath();
  ctx.moveTo(x, t);
  ctx.lineTo(x, b);
  ctx.stroke();
  ctx.setLineDash([]);
  ctx.fillStyle = color;
  ctx.font = "10px sans-serif";
  ctx.textAlign = "right";
  ctx.textBaseline = "top";
  ctx.fillText(label, x - 3, y === null ? t + 3 : Math.min(b - 12, ax.py(y) + 6));
  if (y !== null) {
    ctx.lineWidth = 2;
    ctx.beginPath();
    ctx.arc(x, ax.py(Math.min(Math.max(y, ax.ylim[0]), ax.ylim[1])), 4, 0, 2 * Math.PI);
    ctx.stroke();
  }
}

export function drawTrain(ctx, w, h, d) {
  const last = d.loss.length ? d.loss[d.loss.length - 1] : NaN;
  const laststep = d.step.length ? d.step[d.step.length - 1] : 0;
  header(ctx, `${d.method || "training"}  step ${laststep}${d.total ? "/" + d.total : ""}` +
    (finite(last) ? `  loss ${last.toPrecision(4)}` : "") +
    (finite(d.best_step) && finite(d.best_score) ? `  best step ${d.best_step} (${d.best_score.toPrecision(4)})` : ""));
  const ml = 44;
  const mr = 16;
  const gap = 40;
  const split = Math.round(h * 0.56);
  const top = [ml, 40, w - mr, split];
  if (!d.loss.some(finite)) message(ctx, top, "waiting for the first step");
  else {
    const a = smoothingFor(d.loss.length);
    const [s0, s1] = minmax(d.step);
    const score = d.score ?? [];
    const ax = new Axes(ctx, top, [s0, s1], limits(d.loss.concat(score)));
    ax.frame("loss", { xint: true });
    ax.line(d.step, d.loss, COLORS.raw, 1);
    ax.line(d.step, ema(d.loss, a), COLORS.smooth, 2);
    const keys = [["raw", COLORS.raw], [`EMA ${a.toFixed(2)}`, COLORS.smooth]];
    conceptSeries(d, "concept_loss").forEach(([name, values], i) => {
      const color = CONCEPT_COLORS[i % CONCEPT_COLORS.length];
      ax.line(d.step.slice(0, values.length), ema(values, a), color, 1);
      keys.push([name, color]);
    });
    if (score.some(finite)) {
      ax.line(d.score_step, score, COLORS.score, 2);
      keys.push(["score", COLORS.score]);
    }
    if (finite(d.stop_step)) markStep(ax, d.stop_step, COLORS.target, `early stop ${d.stop_step}`);
    if (finite(d.best_step) && finite(d.best_score)) {
      markStep(ax, d.best_step, COLORS.score, `best ${d.best_step}`, d.best_score);
    }
    ax.legend(keys);
  }
  const T = d.num_timesteps || 1000;
  const hasG = Array.isArray(d.g_estimate) && d.g_estimate.some(finite);
  const hasNorm = d.vector_norm.some(finite);
  const clipImage = d.clip_image ?? [];
  const clipText = d.clip_text ?? [];
  const hasClip = clipImage.some(finite) || clipText.some(finite);
  const panels = ["hist", ...(hasG ? ["g"] : []), ...(hasNorm ? ["norm"] : []), ...(hasClip ? ["clip"] : [])];
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
    } else if (kind === "clip") {
      const [c0, c1] = minmax(d.clip_step);
      const ax = new Axes(ctx, box, c0 === c1 ? [c0 - 1, c1 + 1] : [c0, c1], limits(clipImage.concat(clipText)));
      ax.frame("CLIP similarity of previews", { xint: true });
      const keys = [];
      [[clipImage, COLORS.clipImage, "image"], [clipText, COLORS.clipText, "text"]].forEach(([values, color, name]) => {
        if (!values.some(finite)) return;
        ax.line(d.clip_step.slice(0, values.length), values, color, 2);
        keys.push([name, color]);
      });
      ax.legend(keys);
    } else {
      const perConcept = conceptSeries(d, "concept_vector_norm");
      const vals = d.vector_norm.concat(finite(d.target_norm) ? [d.target_norm] : [], ...perConcept.map(([, v]) => v));
      const [s0, s1] = minmax(d.step);
      const ax = new Axes(ctx, box, [s0, s1], limits(vals));
      ax.frame(perConcept.length ? "vector norm per concept" : "vector norm", { xint: true });
      if (!perConcept.length) ax.line(d.step.slice(0, d.vector_norm.length), d.vector_norm, COLORS.norm, 2);
      perConcept.forEach(([, values], i) => {
        ax.line(d.step.slice(0, values.length), values, CONCEPT_COLORS[i % CONCEPT_COLORS.length], 2);
      });
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

export function drawEmpty(ctx, w, h, nodeType) {
  header(ctx, nodeType === "InversionGradNormProfiler" ? "g(t) profile" : "training chart");
  message(ctx, [10, 30, w - 10, h - 10], "runs will be charted here");
}

/** The whole chart: the background, then the training run, the profile or the empty placeholder. */
export function drawChart(ctx, w, h, data, nodeType) {
  ctx.fillStyle = COLORS.bg;
  ctx.fillRect(0, 0, w, h);
  if (!data) drawEmpty(ctx, w, h, nodeType);
  else if (data.kind === "profile") drawProfile(ctx, w, h, data);
  else drawTrain(ctx, w, h, data);
}
