// Live training charts for ComfyUI-Inversion: the extension.
//
// TrainTextualInversion and GradNormProfiler get a chart widget: a plain <canvas> inside a DOM
// widget, redrawn from the `inversion.progress` events the nodes send while they run
// (PromptServer.send_sync), and from the node's final `inversion_chart` UI output once it is done
// (so the chart comes back after a page reload, from the server's history, and when a workflow
// tab is reopened). The parts, one job each, under ./inversion/:
//   chart_math.js    the data (events and outputs to series) and the maths (EMA, best window, ticks)
//   chart_draw.js    drawing on the canvas, colours
//   chart_widget.js  the DOM widget, its mounting in the Vue node renderer, cleanup, restoring
// This module only registers the extension. Only window.comfyAPI is used (no imports of the
// deprecated /scripts/*.js shims).

import {
  CHART_NODES, addChartWidget, removeChart, restoreFromHistory, restoreFromOutputs, showOutput, showProgress,
} from "./inversion/chart_widget.js";

const { app } = window.comfyAPI.app;
const { api } = window.comfyAPI.api;

const EXTENSION = "comfyui-inversion.charts";
const EVENT = "inversion.progress";

app.registerExtension({
  name: EXTENSION,

  async setup() {
    api.addEventListener(EVENT, (event) => showProgress(event.detail));
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
      showOutput(this, message);
      return r;
    };
    const onRemoved = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      removeChart(this);
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
