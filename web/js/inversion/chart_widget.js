// The chart widget of a node, for web/js/inversion_charts.js: a plain <canvas> inside a DOM widget
// (pixel-ratio aware, redrawn on resize), its data from live events and from outputs, and its
// cleanup when the node goes.
//
// The Vue node renderer of frontend 1.27 draws only its own widget types (and its built-in "chart"
// widget cannot load Chart.js there), so in that mode the same canvas is mounted into the node's
// element. Nothing tells an extension when a Vue node element appears, so a timer looks every
// VUE_CHECK_MS; it runs only while a chart exists, and stops with the last one. From frontend 1.49
// the Vue renderer mounts every DOM widget in a row of its own: where the chart already sits inside
// the node's element it is left there (moving it would leave that row empty above the chart).
//
// The frontend imports every .js under web/, this module too: it only exports (window.comfyAPI is
// read here, nothing is called or registered).

import { appendPreviewScore, appendTrain, chartOf, fromProfile, summary } from "./chart_math.js";
import { drawChart } from "./chart_draw.js";

const { app } = window.comfyAPI.app;
const { api } = window.comfyAPI.api;

export const CHART_NODES = new Set(["InversionTrainTextualInversion", "InversionGradNormProfiler"]);
const WIDGET = "inversion_chart";
const WIDGET_TYPE = "inversion-chart"; // not a Vue widget type: the Vue renderer skips it
const LOG = "[comfyui-inversion.charts]";
const STATE = Symbol("inversionChart");
const MIN_HEIGHT = 240;
const VUE_CHECK_MS = 500;
const LIVE = new Set(); // the chart states of the nodes that exist
let vueCheck = 0; // the Vue-mount timer while LIVE is not empty, else 0

// ------------------------------------------------------------------ drawing

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
  try {
    drawChart(ctx, w, h, state.data, state.nodeType);
  } catch (err) {
    console.warn(`${LOG} could not draw the chart`, err);
  }
}

function schedule(state) {
  if (!state.frame) state.frame = requestAnimationFrame(() => render(state));
}

function setData(node, data) {
  const state = node[STATE];
  if (!state) return;
  state.data = data;
  schedule(state);
}

// ------------------------------------------------------------------ the Vue node renderer

/** Vue node renderer: put the chart under the node's widgets (the classic DOM-widget overlay is
 * not drawn in that mode, so the container is free to move; switching back re-mounts it there). */
function mountInVueNode(state) {
  const node = state.node;
  if (!window.LiteGraph?.vueNodesMode || node.graph !== app.canvas?.graph) return;
  const el = document.querySelector(`[data-node-id="${CSS.escape(String(node.id))}"]`);
  if (!el || el.contains(state.container)) return; // mounted already: by the frontend (1.49+) or by us
  const widgets = el.querySelector(".lg-node-widgets");
  if (!widgets) return;
  Object.assign(state.container.style, { height: `${MIN_HEIGHT}px`, padding: "0 8px 8px 8px", boxSizing: "border-box" });
  widgets.after(state.container);
  schedule(state);
}

/** Whether the node is in the open workflow: in the root graph or in one of its subgraphs. A node
 * can drop out without onRemoved (the root graph's clear() skips the nodes inside subgraphs; a
 * copied node's clone is never added), and its chart must not keep the timer alive. */
function inWorkflow(node) {
  const root = app.graph;
  const g = node.graph;
  return !!g && !!root && (g === root || root.subgraphs?.get?.(g.id) === g);
}

function checkVueNodes() {
  for (const state of [...LIVE]) {
    if (!inWorkflow(state.node)) removeChart(state.node);
    else if (window.LiteGraph?.vueNodesMode) mountInVueNode(state);
  }
}

function startVueCheck() {
  if (!vueCheck) vueCheck = setInterval(checkVueNodes, VUE_CHECK_MS);
}

function stopVueCheckWhenIdle() {
  if (vueCheck && !LIVE.size) {
    clearInterval(vueCheck);
    vueCheck = 0;
  }
}

// ------------------------------------------------------------------ the widget

/** Give the node its chart widget (once), drawn empty until data comes. */
export function addChartWidget(node, nodeType) {
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
    removeChart(node);
    return onRemove?.apply(this, arguments);
  };
  node[STATE] = state;
  LIVE.add(state);
  startVueCheck();
  const [w, h] = node.size;
  node.setSize([Math.max(w, 420), Math.max(h, node.computeSize()[1])]);
  schedule(state);
  return state;
}

/** Drop the node's chart: observer, pending frame, element and data; the timer with the last one. */
export function removeChart(node) {
  const state = node[STATE];
  if (!state) return;
  state.observer?.disconnect();
  if (state.frame) cancelAnimationFrame(state.frame);
  LIVE.delete(state);
  state.container.remove();
  state.widget = null;
  state.data = null;
  delete node[STATE];
  stopVueCheckWhenIdle();
}

/** The node's UI output (`onExecuted`): the finished run's whole chart, if it has one. */
export function showOutput(node, output) {
  const data = chartOf(output);
  if (data) setData(node, data);
}

/** One live `inversion.progress` event: a profile replaces the chart, a training step or a preview's
 * CLIP scores extend it. */
export function showProgress(e) {
  if (!e || e.node == null) return;
  const node = nodeByExecutionId(app.graph, e.node);
  const state = node?.[STATE];
  if (!state) return;
  if (e.kind === "profile") setData(node, fromProfile(e));
  else if (e.kind === "train") setData(node, appendTrain(state.data, e));
  else if (e.kind === "preview_score") setData(node, appendPreviewScore(state.data, e));
}

// ------------------------------------------------------------------ finding nodes, restoring charts

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

function locatorId(node) {
  const g = node.graph;
  return g && g !== app.graph && g.id ? `${g.id}:${node.id}` : String(node.id);
}

/** Charts for nodes that have none yet, from stored outputs (workflow tab switches). */
export function restoreFromOutputs(outputs) {
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
export async function restoreFromHistory() {
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
