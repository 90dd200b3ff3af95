// Warnings from ComfyUI-Inversion's nodes, shown where the user looks: ComfyUI's toast.
//
// The nodes send an `inversion.warning` event (nodes/comfy_run.py:warn_user) when something went
// wrong but the run goes on (an image skipped, vectors far beyond the vocabulary's norms, ...);
// the server log has the same line. Only window.comfyAPI is used.

const { app } = window.comfyAPI.app;
const { api } = window.comfyAPI.api;

const EXTENSION = "comfyui-inversion.warnings";
const EVENT = "inversion.warning";
const LIFE_MS = 20000;

function nodeTitle(id) {
  if (id == null) return null;
  const node = app.graph?.getNodeById?.(Number(String(id).split(":").pop()));
  return node ? `${node.title} (#${id})` : `node #${id}`;
}

export function showWarning(detail) {
  if (!detail || !detail.message) return;
  const where = nodeTitle(detail.node);
  const text = where ? `${where}: ${detail.message}` : detail.message;
  const toast = app.extensionManager?.toast;
  if (toast?.add) toast.add({ severity: "warn", summary: "ComfyUI-Inversion", detail: text, life: LIFE_MS });
  console.warn(`[ComfyUI-Inversion] ${text}`);
}

app.registerExtension({
  name: EXTENSION,
  async setup() {
    api.addEventListener(EVENT, (event) => showWarning(event.detail));
  },
});
