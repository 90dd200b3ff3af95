"""Build ``example_workflows/`` (UI JSON + .jpg thumbnails) and ``web/docs/`` with the real frontend.

    COMFYUI_PATH=/path/to/ComfyUI python tools/build_examples.py [--only STEM ...] [--no-thumbs] [--no-docs]

A ComfyUI server with this pack in ``custom_nodes`` is started (``devtools/server_process.py``)
and opened in headless chromium (``devtools/cdp.py``). Each workflow below is built in the page
with the frontend's own node classes (``LiteGraph.createNode``, widgets set by name, sockets
connected by name), laid out in columns, and saved with ``app.graph.serialize()``: exactly the JSON
the editor saves, widget values in the order the frontend expects. A loader's ``models`` (its model
files with download URLs) go into the node's ``properties.models``, as in ComfyUI's templates. A screenshot of the graph,
scaled down, is the thumbnail ComfyUI's template browser shows (``<stem>.jpg``).

The node schemas the workflows use are written to ``tests/workflow_nodes.json`` so that
``tests/test_workflows.py`` can check the workflows without a ComfyUI checkout, and each node's help
page (``web/docs/<NodeId>.md``, what the frontend's help panel shows) is written from its schema
plus the prose in ``tools/node_docs.py``.

Needs chromium (Debian: ``apt-get install -y chromium``). Run it again whenever a node's inputs
change; commit the JSON, the thumbnails, the schema file and the help pages.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script, sys.path[0] is tools/; devtools is at the repository root
OUT = os.path.join(ROOT, "example_workflows")
SCHEMAS = os.path.join(ROOT, "tests", "workflow_nodes.json")
THUMB_SIZE = (640, 480)


NOTE_COLOR = ("#432", "#653")  # the frontend's "yellow" note colours


BUILD_JS = r"""
async (spec) => {
  const app = window.comfyAPI.app.app;
  app.graph.clear();
  const byKey = {};
  for (const n of spec.nodes) {
    const node = LiteGraph.createNode(n.type);
    if (!node) throw new Error("unknown node type " + n.type);
    app.graph.add(node);
    if (n.title) node.title = n.title;
    for (const [name, value] of Object.entries(n.widgets)) {
      const w = node.widgets?.find((w) => w.name === name);
      if (!w) throw new Error(`${n.type} has no widget ${name}; it has ${(node.widgets || []).map((w) => w.name)}`);
      w.value = value;
    }
    // the model files a loader needs: ComfyUI's missing-models dialog offers their download
    if (n.models) node.properties = {...(node.properties || {}), models: n.models};
    if (n.type === "Note" || n.type === "MarkdownNote") {
      node.color = spec.note_color[0];
      node.bgcolor = spec.note_color[1];
    }
    if (n.size) node.setSize(n.size);
    if (n.mode) node.mode = n.mode;
    byKey[n.key] = node;
  }
  for (const [a, out, b, inp] of spec.links) {
    const src = byKey[a], dst = byKey[b];
    if (!src || !dst) throw new Error(`link ${a}.${out} -> ${b}.${inp}: unknown node key`);
    let os = src.outputs.findIndex((o) => o.name === out);
    if (os < 0) os = src.outputs.findIndex((o) => o.type === out);
    const is = dst.inputs.findIndex((i) => i.name === inp);
    if (os < 0) throw new Error(`${src.type} has no output ${out}; it has ${src.outputs.map((o) => o.name)}`);
    if (is < 0) throw new Error(`${dst.type} has no input ${inp}; it has ${dst.inputs.map((i) => i.name)}`);
    if (!src.connect(os, dst, is)) throw new Error(`could not connect ${a}.${out} -> ${b}.${inp}`);
  }
  // rows (bands) top to bottom; in a row, columns = the given one, else the depth along the links
  // between the row's own nodes
  const TITLE = LiteGraph.NODE_TITLE_HEIGHT;
  const rows = [...new Set(spec.nodes.map((n) => n.row))].sort((p, q) => p - q);
  let top = 0;
  for (const row of rows) {
    const members = spec.nodes.filter((n) => n.row === row);
    const keys = new Set(members.map((n) => n.key));
    const incoming = {};
    for (const [a, , b] of spec.links) if (keys.has(a) && keys.has(b)) (incoming[b] ??= []).push(a);
    const depth = {};
    const colOf = (k, seen = new Set()) => {
      const n = members.find((n) => n.key === k);
      if (n.col !== null && n.col !== undefined) return n.col;
      if (k in depth) return depth[k];
      if (seen.has(k)) return 0;
      seen.add(k);
      return (depth[k] = Math.max(-1, ...(incoming[k] || []).map((a) => colOf(a, seen))) + 1);
    };
    const cols = {};
    for (const n of members) (cols[colOf(n.key)] ??= []).push(byKey[n.key]);
    let x = 0;
    let bottom = top;
    for (const c of Object.keys(cols).map(Number).sort((p, q) => p - q)) {
      let y = top;
      let width = 0;
      for (const node of cols[c]) {
        node.pos = [x, y + TITLE];
        y += node.size[1] + TITLE + 40;
        width = Math.max(width, node.size[0]);
      }
      bottom = Math.max(bottom, y);
      x += width + 70;
    }
    top = bottom + 40;
  }
  app.graph.setDirtyCanvas(true, true);
  return app.graph.serialize();
}
"""

FIT_JS = r"""
async () => {
  const app = window.comfyAPI.app.app;
  const c = app.canvas;
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const n of app.graph.nodes) {
    const t = LiteGraph.NODE_TITLE_HEIGHT;
    x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - t);
    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
  }
  const rect = c.canvas.getBoundingClientRect();
  const pad = 30;
  const scale = Math.min(1.25, (rect.width - 2 * pad) / (x1 - x0), (rect.height - 2 * pad) / (y1 - y0));
  c.ds.scale = scale;
  c.ds.offset = [(rect.width / scale - (x1 - x0)) / 2 - x0, (rect.height / scale - (y1 - y0)) / 2 - y0];
  c.setDirty(true, true);
  await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
  await new Promise((r) => setTimeout(r, 300));
  const w = Math.round((x1 - x0) * scale + 2 * pad), h = Math.round((y1 - y0) * scale + 2 * pad);
  const cx = rect.x + rect.width / 2, cy = rect.y + rect.height / 2;
  return {x: Math.max(rect.x, cx - w / 2), y: Math.max(rect.y, cy - h / 2), width: Math.min(w, rect.width), height: Math.min(h, rect.height)};
}
"""


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from example_specs import WORKFLOWS  # noqa: E402
from node_docs import DOCS, PAPERS  # noqa: E402

DOCS_DIR = os.path.join(ROOT, "web", "docs")


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


def _default(spec: list) -> str:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in opts:
        d = opts["default"]
        return "(empty)" if d == "" else f"`{json.dumps(d)}`" if not isinstance(d, str) else f"`{d}`"
    if isinstance(spec[0], list) and spec[0]:
        return f"`{spec[0][0]}`"
    return ""


def _type(spec: list) -> str:
    kind = spec[0]
    if isinstance(kind, list) or kind == "COMBO":
        opts = kind if isinstance(kind, list) else (spec[1] or {}).get("options", [])
        shown = ", ".join(f"`{o}`" for o in opts[:12]) + (", ..." if len(opts) > 12 else "")
        return f"choice: {shown}" if opts else "choice (files)"
    return f"`{kind}`"


def doc_page(node_id: str, info: dict) -> str:
    """The help page of one node: schema description, hand-written prose, input/output tables."""
    extra = DOCS.get(node_id, {})
    lines = [f"# {info['display_name']}", "", info.get("description", "").strip(), ""]
    if extra.get("body"):
        lines += [extra["body"].rstrip(), ""]
    lines += ["## Inputs", "", "| input | type | default | what it does |", "|---|---|---|---|"]
    groups = info.get("input_order") or {}
    for group in ("required", "optional"):
        for name in groups.get(group, []):
            spec = info["input"][group][name]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            label = f"**{name}**" + (" (optional)" if group == "optional" else "")
            lines.append(f"| {label} | {_cell(_type(spec))} | {_cell(_default(spec))} | "
                         f"{_cell(opts.get('tooltip', ''))} |")
    lines += ["", "## Outputs", "", "| output | type | what it is |", "|---|---|---|"]
    tips = info.get("output_tooltips") or [None] * len(info["output"])
    for name, kind, tip in zip(info["output_name"], info["output"], tips):
        lines.append(f"| **{name}** | `{kind}` | {_cell(tip or '')} |")
    papers = [PAPERS[k] for k in extra.get("paper", "").split()]
    if papers:
        lines += ["", "## Paper" + ("s" if len(papers) > 1 else ""), ""] + [f"- {p}" for p in papers]
    return "\n".join(lines).rstrip() + "\n"


def write_docs(info: dict) -> None:
    os.makedirs(DOCS_DIR, exist_ok=True)
    ours = sorted(k for k, v in info.items() if v.get("python_module", "").startswith("custom_nodes."))
    missing = [k for k in ours if k not in DOCS]
    if missing:
        raise SystemExit(f"no help text for {missing} in tools/node_docs.py")
    for node_id in ours:
        with open(os.path.join(DOCS_DIR, f"{node_id}.md"), "w") as f:
            f.write(doc_page(node_id, info[node_id]))
        print("wrote", f"web/docs/{node_id}.md")


def build(only: list[str] | None, thumbs: bool, docs: bool) -> None:
    from devtools import cdp
    from devtools import server_process as sp
    from PIL import Image

    todo = [w for w in WORKFLOWS if not only or w.stem in only]
    os.makedirs(OUT, exist_ok=True)
    with tempfile.TemporaryDirectory() as base, sp.ComfyServer(base) as server, \
            cdp.Browser(width=2400, height=1500) as browser:
        info = server.get("/object_info", timeout=120)
        used = sorted({n.type for w in WORKFLOWS for n in w.nodes} - {"Note", "MarkdownNote"})
        missing = [t for t in used if t not in info]
        if missing:
            raise SystemExit(f"node types not on the server: {missing}\n{server.log_tail()}")
        with open(SCHEMAS, "w") as f:
            json.dump({t: info[t] for t in used}, f, indent=1)
            f.write("\n")
        if docs:
            write_docs(info)
        page = browser.page()
        page.goto(server.url)
        page.wait_for("window.app && window.app.graph && Object.keys(LiteGraph.registered_node_types).length > 100", 120)
        for w in todo:
            spec = {"nodes": [n.__dict__ for n in w.nodes], "links": w.links, "note_color": NOTE_COLOR}
            wf = page.evaluate(f"({BUILD_JS})({json.dumps(spec)})")
            wf.pop("id", None)  # a fresh id each time the template is opened
            wf.get("extra", {}).pop("ds", None)
            path = os.path.join(OUT, f"{w.stem}.json")
            with open(path, "w") as f:
                json.dump(wf, f, indent=2)
                f.write("\n")
            print("wrote", os.path.relpath(path, ROOT))
            if thumbs:
                clip = page.evaluate(f"({FIT_JS})()")
                png = os.path.join(base, "shot.png")
                page.screenshot(png, clip=clip)
                shot = Image.open(png).convert("RGB")
                # letterboxed into a fixed 4:3 frame: the template browser crops to its card's shape
                k = min(THUMB_SIZE[0] / shot.width, THUMB_SIZE[1] / shot.height)
                shot = shot.resize((max(1, round(shot.width * k)), max(1, round(shot.height * k))), Image.LANCZOS)
                img = Image.new("RGB", THUMB_SIZE, shot.getpixel((2, 2)))
                img.paste(shot, ((THUMB_SIZE[0] - shot.width) // 2, (THUMB_SIZE[1] - shot.height) // 2))
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=85, optimize=True)
                with open(os.path.join(OUT, f"{w.stem}.jpg"), "wb") as f:
                    f.write(buf.getvalue())
        errors = [c for c in page.console if c["type"] in ("error", "exception") and "inversion" in
                  (c["url"] + c["text"]).lower()]
        if errors:
            raise SystemExit(f"console errors from the pack: {errors}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="workflow stems to rebuild (default: all)")
    ap.add_argument("--no-thumbs", action="store_true", help="skip the thumbnails")
    ap.add_argument("--no-docs", action="store_true", help="skip the help pages (web/docs)")
    args = ap.parse_args()
    build(args.only, not args.no_thumbs, not args.no_docs)


if __name__ == "__main__":
    main()
