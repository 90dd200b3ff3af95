// The chart's data and maths, for web/js/inversion_charts.js: pure functions, no DOM, no app.
//
// The data comes in two shapes: the live `inversion.progress` events the nodes send while they run
// (nodes/comfy_run.py), folded step by step into one running series, and the node's final
// `inversion_chart` UI output (the whole history at once). The maths is the library's:
// `ema` is inversion/charts.py:ema and `bestWindow` is inversion/profiler.py:GradProfile.best_window
// (tests/comfy/test_browser.py checks both against Python).
//
// The frontend imports every .js under web/, this module too: it only exports.

export const UI_KEY = "inversion_chart"; // the key of the chart in a node's UI output

export function finite(v) {
  return typeof v === "number" && Number.isFinite(v);
}

export function num(v) {
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
    score_step: [], score: [], best_step: null, best_score: null, stop_step: null,
    concepts: [], concept_loss: [], concept_vector_norm: [],
    clip_step: [], clip_image: [], clip_text: [],
  };
}

function rowsOf(v) {
  return Array.isArray(v) ? v.map((r) => (Array.isArray(r) ? r.map(num) : [])) : [];
}

/** A multi-concept run's series (nodes/comfy_run.py): [name, values per step] for each concept of
 * `key` ("concept_loss" or "concept_vector_norm"); [] for a run of one concept
 * (inversion/charts.py concept_series). */
export function conceptSeries(d, key) {
  const names = Array.isArray(d?.concepts) ? d.concepts.map(String) : [];
  const rows = Array.isArray(d?.[key]) ? d[key] : [];
  if (names.length < 2 || !rows.length) return [];
  return names.map((n, i) => [n, rows.map((r) => (Array.isArray(r) ? num(r[i]) : NaN))]);
}

/** Normalise a final `inversion_chart` dict (whole history) into the chart's data. */
export function fromOutput(d) {
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
  out.score = (d.score ?? []).map(num);
  out.score_step = (d.score_step ?? []).map(num).slice(0, out.score.length);
  out.score.length = out.score_step.length;
  [out.best_step, out.best_score] = finite(d.best_step) && finite(d.best_score)
    ? [d.best_step, d.best_score] : bestScore(out.score_step, out.score);
  out.stop_step = finite(d.stop_step) ? d.stop_step : null;
  out.concepts = Array.isArray(d.concepts) ? d.concepts.map(String) : [];
  out.concept_loss = rowsOf(d.concept_loss);
  out.concept_vector_norm = rowsOf(d.concept_vector_norm);
  out.clip_step = (d.clip_step ?? []).map(num);
  out.clip_image = (d.clip_image ?? []).map(num).slice(0, out.clip_step.length);
  out.clip_text = (d.clip_text ?? []).map(num).slice(0, out.clip_step.length);
  out.final = true;
  return out;
}

/** A `kind: "profile"` event or output (the profile so far, unmeasured bins null) as chart data. */
export function fromProfile(d) {
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
export function appendTrain(data, e) {
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
  if (finite(e.score)) {
    data.score_step.push(step);
    data.score.push(e.score);
    [data.best_step, data.best_score] = bestScore(data.score_step, data.score);
  }
  if (finite(e.stop_step)) data.stop_step = e.stop_step;
  if (Array.isArray(e.concepts) && Array.isArray(e.concept_vector_norm)) {
    data.concepts = e.concepts.map(String);
    data.concept_vector_norm.push(e.concept_vector_norm.map(num));
    data.concept_loss.push(Array.isArray(e.concept_loss) ? e.concept_loss.map(num) : []);
  }
  return data;
}

/** Fold one live `kind: "preview_score"` event (a preview row's CLIP similarities, nodes/comfy_preview.py)
 * into the running data of the same run; an event without a run to join is dropped. */
export function appendPreviewScore(data, e) {
  if (!data || data.kind !== "train" || data.final) return data;
  data.clip_step.push(num(e.step));
  data.clip_image.push(num(e.clip_image));
  data.clip_text.push(num(e.clip_text));
  return data;
}

/** [step, score] of the lowest finite score, the earliest on a tie (inversion/score.py best_step); [null, null] if none. */
export function bestScore(steps, scores) {
  let best = [null, null];
  for (let i = 0; i < scores.length; i++) {
    if (finite(steps[i]) && finite(scores[i]) && (best[1] === null || scores[i] < best[1])) best = [steps[i], scores[i]];
  }
  return best;
}

/** The chart data in a node's UI output (the last `inversion_chart` entry), or null. */
export function chartOf(output) {
  const list = output?.[UI_KEY];
  const d = Array.isArray(list) ? list[list.length - 1] : list;
  return d ? fromOutput(d) : null;
}

/** What a chart shows, in brief: the chart widget's value, for scripts and tests. */
export function summary(data) {
  if (!data) return null;
  return data.kind === "profile"
    ? { kind: "profile", bins: data.mean.length, measured: data.mean.filter(finite).length }
    : { kind: "train", steps: data.step.slice(), last_loss: data.loss[data.loss.length - 1] ?? null,
      concepts: (data.concepts ?? []).slice(), concept_norm_steps: (data.concept_vector_norm ?? []).length,
      clip_steps: (data.clip_step ?? []).slice() };
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

/** The EMA factor for n points: smoother for longer runs, within [0.6, 0.98]. */
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

/** About n round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) covering [lo, hi]. */
export function niceTicks(lo, hi, n) {
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

/** Axis limits of the finite values, padded by 6 % (not below `floor` when it is the minimum). */
export function limits(values, floor = null) {
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

/** [min, max] of the finite values ([Infinity, -Infinity] when there are none). */
export function minmax(values) {
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

/** Counts of `values` in the bins [edges[i], edges[i + 1]) (the last bin closed); outside ones dropped. */
export function histogram(values, edges) {
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

/** n + 1 evenly spaced integers from a to b (bin edges). */
export function linspace(a, b, n) {
  return Array.from({ length: n + 1 }, (_, i) => Math.round(a + ((b - a) * i) / n));
}
