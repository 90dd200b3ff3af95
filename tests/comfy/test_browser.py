"""The pack in a real browser: Debian chromium (headless, DevTools protocol) on a real ComfyUI server.

Skips without ``COMFYUI_PATH`` or without a ``chromium`` executable (``apt-get install -y chromium``).
Screenshots go to ``test-artifacts/``. Example workflows run end to end on random full-architecture
checkpoints (``devtools/harness.py``, cached): 01 on SD1.5, 08 (OVI) on SD2.1 unCLIP-H with its ViT-H
vision tower.
"""

from __future__ import annotations

import glob
import json
import os
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from devtools import cdp
from devtools import server_process as sp
from devtools import workflow_check as check

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

pytestmark = [
    pytest.mark.skipif(sp.comfyui_path() is None, reason="COMFYUI_PATH is not set to a ComfyUI checkout"),
    pytest.mark.skipif(cdp.find_chromium() is None,
                       reason="no chromium executable (Debian: apt-get install -y chromium)"),
]

ARTIFACTS = os.path.join(ROOT, "test-artifacts")
WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "example_workflows", "*.json")))
PACK = sp.PACK_FOLDER
TRAIN = "InversionTrainTextualInversion"
# ComfyUI's toast: PrimeVue's up to frontend 1.57, Reka UI's list items from 1.58
TOAST = ".p-toast-message, li[data-testid='toast']"
SMOOTH_RGB = (91, 155, 255)  # the EMA loss curve's colour in web/js/inversion_charts.js


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    base = tmp_path_factory.mktemp("browser-comfy")
    srv = sp.ComfyServer(str(base))
    srv.install_pack()
    # the random SD1.5 checkpoint of devtools/harness.py, built (once, cached) if needed
    from devtools import harness
    path = os.path.join(harness.cache_dir(), harness.SD15_NAME)
    if not os.path.isfile(path):
        request.getfixturevalue("comfyui")  # boots ComfyUI in this process, which the builder needs
        path = harness.sd15_checkpoint()
    srv.ckpt_name = srv.link_model(path)
    concept = os.path.join(srv.base_dir, "input", "browser_concept")
    os.makedirs(concept, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        pixels = (rng.random((64, 64, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(os.path.join(concept, f"img{i}.png"))
    srv.concept_folder = "browser_concept"
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def page(server):
    with cdp.Browser(width=1600, height=1000) as browser:
        p = browser.page()
        p.goto(server.url)
        p.wait_for("window.app && window.app.graph && Object.keys(LiteGraph.registered_node_types).length > 100", 120)
        p.pump(1.0)
        yield p


def _artifact(page, name: str) -> str:
    """``test-artifacts/comfyui-<version>_frontend-<version>/<name>``: each CI leg keeps its own screenshots."""
    if not hasattr(page, "artifacts"):
        frontend = page.evaluate("window.__COMFYUI_FRONTEND_VERSION__ ?? 'unknown'")
        page.artifacts = os.path.join(ARTIFACTS, f"comfyui-{sp.comfyui_version()}_frontend-{frontend}")
        os.makedirs(page.artifacts, exist_ok=True)
    return os.path.join(page.artifacts, name)


def _pack_errors(page) -> list[dict]:
    return [c for c in page.console if c["type"] in ("error", "exception", "assert")
            and (f"/extensions/{PACK}/" in c["url"] or "inversion" in c["text"].lower())]


def _load_workflow(page, wf: dict, name: str) -> None:
    page.evaluate(f"""(async () => {{
        const app = window.comfyAPI.app.app;
        await app.loadGraphData({json.dumps(wf)}, true, true, {json.dumps(name)},
                                {{showMissingNodesDialog: false, showMissingModelsDialog: false}});
        return true;
    }})()""")


def test_page_loads_the_extension_without_errors(page, server):
    # the server lists our modules among the extensions the page imports (every .js under web/, the
    # chart's helper modules too: they only export); nothing else of ours is a script
    ours = [u for u in server.get("/extensions") if u.startswith(f"/extensions/{PACK}/")]
    assert sorted(ours) == [f"/extensions/{PACK}/js/{m}.js" for m in (
        "inversion/chart_draw", "inversion/chart_math", "inversion/chart_widget", "inversion_charts", "inversion_warnings")]
    types = page.evaluate("Object.keys(LiteGraph.registered_node_types).filter((t) => t.startsWith('Inversion'))")
    assert sorted(types) == sorted(check.pack_node_ids(ROOT))
    # the extension ran: the chart nodes get their chart widget, the others none
    charts = page.evaluate("""(() => {
        const out = {};
        for (const t of Object.keys(LiteGraph.registered_node_types).filter((t) => t.startsWith('Inversion'))) {
            const n = LiteGraph.createNode(t);
            out[t] = (n.widgets ?? []).filter((w) => w.name === 'inversion_chart').length;
            n.onRemoved?.();
        }
        return out;
    })()""")
    assert {t for t, k in charts.items() if k} == {TRAIN, "InversionGradNormProfiler"}
    assert all(k <= 1 for k in charts.values())
    assert not _pack_errors(page), _pack_errors(page)


def test_templates_and_help_pages_are_served(server):
    listed = server.get("/api/workflow_templates")
    assert sorted(listed.get(PACK, [])) == sorted(_stem(p) for p in WORKFLOWS)
    for path in WORKFLOWS:
        with urllib.request.urlopen(f"{server.url}/api/workflow_templates/{PACK}/{_stem(path)}.jpg") as r:
            assert r.headers.get_content_type() == "image/jpeg" and len(r.read()) > 1000
    info = server.get("/object_info")
    for node_id in sorted(check.pack_node_ids(ROOT)):
        assert info[node_id]["python_module"] == f"custom_nodes.{PACK}"
        with urllib.request.urlopen(f"{server.url}/extensions/{PACK}/docs/{node_id}.md") as r:
            text = r.read().decode()
        assert text.startswith("# "), node_id


@pytest.mark.parametrize("path", WORKFLOWS, ids=_stem)
def test_example_workflow_loads_with_no_missing_nodes(page, path):
    with open(path) as f:
        wf = json.load(f)
    missing = page.evaluate(f"""{json.dumps([n["type"] for n in wf["nodes"]])}
                                .filter((t) => !(t in LiteGraph.registered_node_types))""")
    assert missing == []
    before = len(page.console)
    _load_workflow(page, wf, _stem(path))
    state = page.evaluate("""(() => {
        const g = window.comfyAPI.app.app.graph;
        return {n: g.nodes.length, links: g.links.size ?? Object.keys(g.links).length,
                values: Object.fromEntries(g.nodes.map((n) => [n.id, n.serialize().widgets_values ?? null])),
                charts: g.nodes.filter((n) => n.widgets?.some((w) => w.name === 'inversion_chart')).map((n) => n.type)};
    })()""")
    assert state["n"] == len(wf["nodes"])
    assert state["links"] == len(wf["links"])
    # the frontend reads every widget value back at the same position (widget order unchanged)
    for n in wf["nodes"]:
        assert (state["values"][str(n["id"])] or []) == (n.get("widgets_values") or []), (n["type"], n["id"])
    expected = [n["type"] for n in wf["nodes"] if n["type"] in (TRAIN, "InversionGradNormProfiler")]
    assert sorted(state["charts"]) == sorted(expected)
    errors = _pack_errors(page)
    assert not [c for c in page.console[before:] if c in errors], errors


def _loss_pixels(page, canvas_expr: str) -> int:
    """Pixels of the EMA loss colour on the canvas that the JS expression ``canvas_expr`` names
    (-1 if there is no drawn canvas)."""
    r, g, b = SMOOTH_RGB
    return page.evaluate(f"""(() => {{
        const c = {canvas_expr};
        if (!c || !c.width || !c.height) return -1;
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let k = 0;
        for (let i = 0; i < d.length; i += 4)
            if (Math.abs(d[i] - {r}) < 24 && Math.abs(d[i + 1] - {g}) < 24 && Math.abs(d[i + 2] - {b}) < 24) k++;
        return k;
    }})()""")


def _chart_pixels(page, node_expr: str) -> int:
    """Pixels of the EMA loss colour on the node's chart canvas."""
    return _loss_pixels(page, f"({node_expr})?.widgets?.find((w) => w.name === 'inversion_chart')"
                              "?.element?.querySelector('canvas')")


def test_live_events_reach_a_node_inside_nested_subgraphs(page):
    """`inversion.progress` carries the execution id ("outer:inner:node"); the chart of that node fills."""
    ids = page.evaluate(f"""(async () => {{
        const app = window.comfyAPI.app.app;
        app.graph.clear();
        const node = LiteGraph.createNode('{TRAIN}');
        app.graph.add(node);
        const r1 = app.graph.convertToSubgraph(new Set([node]));
        const r2 = app.graph.convertToSubgraph(new Set([r1.node]));
        return [r2.node.id, r1.node.id, node.id];
    }})()""")
    exec_id = ":".join(str(i) for i in ids)
    events = [{"node": exec_id, "kind": "train", "step": s, "total": 5, "loss": 1.0 / s, "timesteps": [100 * s],
               "lr": 0.005, "grad_norm": 1.0, "vector_norm": 0.4, "target_norm": None, "g_estimate": None,
               "bin_edges": None, "num_timesteps": 1000, "method": "vanilla"} for s in range(1, 6)]
    labels = page.evaluate(f"""(async () => {{
        const {{ app }} = window.comfyAPI.app;
        const {{ api }} = window.comfyAPI.api;
        for (const e of {json.dumps(events)}) api.dispatchCustomEvent('inversion.progress', e);
        const outer = app.graph.getNodeById({ids[0]});
        const mid = outer.subgraph.getNodeById({ids[1]});
        const inner = mid.subgraph.getNodeById({ids[2]});
        const chart = inner.widgets.find((w) => w.name === 'inversion_chart');
        return chart.value.steps;
    }})()""")
    assert labels == [1, 2, 3, 4, 5]
    # a root-level id with the same last part must not receive them
    page.evaluate("window.comfyAPI.app.app.graph.clear()")


def test_js_chart_maths_matches_the_library(page):
    """The live chart's EMA and high-grad window are the library's (inversion.charts / profiler)."""
    import torch

    from inversion.charts import ema
    from inversion.methods.profiler import GradProfile

    gen = np.random.default_rng(1)
    cases = []
    for bins in (5, 20, 37):
        edges = np.linspace(0, 1000, bins + 1).round().astype(int).tolist()
        mean = gen.random(bins).round(4).tolist()
        cases.append((edges, mean, int(gen.integers(1, 400))))
    loss = [float(x) for x in gen.random(50)] + [float("nan")] + [0.5] * 5
    js = page.evaluate(f"""(async () => {{
        const m = await import('/extensions/{PACK}/js/inversion/chart_math.js');
        const cases = {json.dumps(cases)};
        const loss = {json.dumps(loss)};  // NaN is a JS literal too
        return {{windows: cases.map(([e, g, w]) => m.bestWindow(e, g, 1000, w)),
                 ema: m.ema(loss, 0.9).map((v) => Number.isFinite(v) ? v : null)}};
    }})()""")
    for (edges, mean, width), got in zip(cases, js["windows"]):
        prof = GradProfile(torch.tensor(edges), torch.tensor(mean, dtype=torch.float64),
                           torch.zeros(len(mean), dtype=torch.float64), torch.ones(len(mean), dtype=torch.long), 1000)
        assert tuple(got) == prof.best_window(width)
    assert js["ema"] == pytest.approx(ema(loss, 0.9), nan_ok=True)


def test_removing_the_node_cleans_up_its_chart(page):
    """Removing the node detaches its chart and drops its data; the timer that mounts charts in the
    Vue node renderer runs only while a chart exists: one for all of them, cleared with the last."""
    result = page.evaluate(f"""(async () => {{
        const {{ app }} = window.comfyAPI.app;
        const {{ api }} = window.comfyAPI.api;
        const settle = (ms) => new Promise((r) => requestAnimationFrame(() => setTimeout(r, ms)));
        app.graph.clear();
        await settle(800);  // charts of nodes gone without onRemoved (in cleared subgraphs) are dropped by now
        const {{ setInterval: realSet, clearInterval: realClear }} = window;
        const started = [];
        const cleared = [];
        window.setInterval = (...args) => {{ const id = realSet(...args); started.push(id); return id; }};
        window.clearInterval = (id) => {{ cleared.push(id); return realClear(id); }};
        try {{
            const other = LiteGraph.createNode('{TRAIN}');
            app.graph.add(other);
            const node = LiteGraph.createNode('{TRAIN}');
            app.graph.add(node);
            window.setInterval = realSet;  // only the timers the two new charts started
            await settle(100);
            const widget = node.widgets.find((w) => w.name === 'inversion_chart');
            const el = widget.element;
            const before = el.isConnected;
            const id = node.id;
            app.graph.remove(other);
            const afterOne = started.some((t) => cleared.includes(t));
            app.graph.remove(node);
            await settle(100);
            const afterLast = started.length > 0 && started.every((t) => cleared.includes(t));
            // events for the removed node are ignored, without errors
            api.dispatchCustomEvent('inversion.progress', {{node: String(id), kind: 'train', step: 1, total: 1, loss: 1,
                                                             timesteps: [1], num_timesteps: 1000}});
            return [before, el.isConnected, widget.value, started.length, afterOne, afterLast];
        }} finally {{
            window.setInterval = realSet;
            window.clearInterval = realClear;
        }}
    }})()""")
    assert result[:3] == [True, False, ""]  # detached, and its data dropped
    assert result[3:] == [1, False, True]  # one timer for both charts, running until the last is removed
    assert not _pack_errors(page)


def test_chart_canvas_follows_the_device_pixel_ratio_and_zoom(page):
    """The backing store is CSS size x devicePixelRatio x canvas zoom (>= 1), so lines stay sharp."""
    page.call("Emulation.setDeviceMetricsOverride", {"width": 1600, "height": 1000, "deviceScaleFactor": 2,
                                                     "mobile": False})
    try:
        page.pump(0.5)
        ratios = page.evaluate(f"""(async () => {{
            const {{ app }} = window.comfyAPI.app;
            app.graph.clear();
            const node = LiteGraph.createNode('{TRAIN}');
            app.graph.add(node);
            node.pos = [100, 100];
            const frames = () => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(() => setTimeout(r, 200))));
            const out = [];
            for (const zoom of [1, 1.5]) {{
                app.canvas.ds.scale = zoom;
                app.canvas.ds.offset = [0, 0];
                app.canvas.setDirty(true, true);
                await frames();
                await frames();
                const c = node.widgets.find((w) => w.name === 'inversion_chart').element.querySelector('canvas');
                out.push([window.devicePixelRatio, c.width / c.clientWidth]);
            }}
            app.graph.clear();
            return out;
        }})()""")
    finally:
        page.set_viewport(1600, 1000)
    assert ratios[0][0] == 2
    assert ratios[0][1] == pytest.approx(2.0, abs=0.02)
    assert ratios[1][1] == pytest.approx(3.0, abs=0.02)


def test_chart_in_the_vue_node_renderer(page):
    """With Vue nodes on, the same chart canvas is mounted into the trainer's Vue node and drawn."""
    wf = {"last_node_id": 1, "last_link_id": 0, "nodes": [{"id": 1, "type": TRAIN, "pos": [0, 0], "size": [420, 900],
          "flags": {}, "order": 0, "mode": 0, "properties": {}}], "links": [], "groups": [], "config": {},
          "extra": {}, "version": 0.4}
    node_id = 1
    # 1.27 builds its Vue nodes when the setting is switched on (a graph loaded afterwards keeps the
    # previous graph's Vue nodes), so: load, then switch on
    _load_workflow(page, wf, "vue")
    page.evaluate("window.comfyAPI.app.app.extensionManager.setting.set('Comfy.VueNodes.Enabled', true)")
    try:
        page.evaluate(f"""(() => {{
            const {{ app }} = window.comfyAPI.app;
            const {{ api }} = window.comfyAPI.api;
            const node = app.graph.getNodeById({node_id});
            app.canvas.ds.scale = 1;
            app.canvas.ds.offset = [60 - node.pos[0], 60 - node.pos[1]];
            app.canvas.setDirty(true, true);
            for (let s = 1; s <= 8; s++) api.dispatchCustomEvent('inversion.progress', {{node: '{node_id}', kind: 'train',
                step: s, total: 8, loss: 1 / s, timesteps: [s * 90], lr: 0.005, grad_norm: 1, vector_norm: 0.4,
                num_timesteps: 1000, method: 'vanilla'}});
            return true;
        }})()""")
        selector = f'[data-node-id="{node_id}"] .comfyui-inversion-chart canvas'
        page.wait_for(f"!!document.querySelector('{selector}')", timeout=30)
        page.pump(0.5)
        drawn = _loss_pixels(page, f"document.querySelector('{selector}')")
        assert drawn > 50
        layout = _vue_chart_layout(page, node_id)
        assert layout["charts"] == 1, layout
        assert layout["empty_rows"] == [], layout  # no row left empty above the chart (frontend 1.49+)
        assert 0 <= layout["gap"] < 30, layout  # the chart follows the last widget
        page.evaluate(f"""(() => {{  // bring the bottom of the (tall) node into view
            const c = window.comfyAPI.app.app.canvas;
            const b = document.querySelector('{selector}').getBoundingClientRect();
            c.ds.offset = [c.ds.offset[0], c.ds.offset[1] - (b.bottom - window.innerHeight + 20) / c.ds.scale];
            c.setDirty(true, true);
            return true;
        }})()""")
        page.pump(1.0)
        rect = page.evaluate(f"""(() => {{
            const n = document.querySelector('[data-node-id="{node_id}"]').getBoundingClientRect();
            const b = document.querySelector('{selector}').getBoundingClientRect();
            const top = Math.max(0, b.top - 300);
            return {{x: n.x, y: top, width: n.width, height: b.bottom - top + 10}};
        }})()""")
        page.screenshot(_artifact(page, "browser_vue_node_chart.png"), clip=rect)
    finally:
        page.evaluate("window.comfyAPI.app.app.extensionManager.setting.set('Comfy.VueNodes.Enabled', false)")
        page.pump(1.0)
    # back in the classic canvas the chart is a DOM widget again, with its data
    steps = page.evaluate(f"""window.comfyAPI.app.app.graph.getNodeById({node_id})
        .widgets.find((w) => w.name === 'inversion_chart').value.steps""")
    assert steps == list(range(1, 9))


def _vue_chart_layout(page, node_id: int) -> dict:
    """The trainer's Vue node: its chart containers, the widget rows that show nothing (no control, no
    canvas, no text; a slot the chart was taken out of), and the gap in px between the last widget row
    and the chart."""
    return page.evaluate(f"""(() => {{
        const n = document.querySelector('[data-node-id="{node_id}"]');
        const chart = n.querySelector('.comfyui-inversion-chart');
        const rows = [...n.querySelector('.lg-node-widgets').children];
        const shows = (r) => r.textContent.trim() !== '' || !!r.querySelector('canvas, input, button, select, textarea');
        const empty = rows.filter((r) => !shows(r) && r.getBoundingClientRect().height > 4)
                          .map((r) => r.getBoundingClientRect().height);
        const above = rows.filter((r) => shows(r) && !r.contains(chart)).pop();
        return {{charts: n.querySelectorAll('.comfyui-inversion-chart').length, empty_rows: empty,
                 gap: chart.getBoundingClientRect().top - above.getBoundingClientRect().bottom}};
    }})()""")


def _training_workflow(server) -> dict:
    with open(next(p for p in WORKFLOWS if "vanilla" in p)) as f:
        wf = json.load(f)
    return wf


def test_short_training_run_draws_the_chart_and_survives_a_reload(page, server):
    wf = _training_workflow(server)
    _load_workflow(page, wf, "browser-training")
    node_id = next(n["id"] for n in wf["nodes"] if n["type"] == TRAIN)
    settings = {  # a tiny, fast run on the random checkpoint and three 64 px images; the sampler too
        "ckpt_name": server.ckpt_name, "folder": server.concept_folder, "size": 64, "width": 64, "height": 64,
        "steps": 3, "batch_size": 1, "name": f"browser-test-{int(time.time())}",
    }
    applied = page.evaluate(f"""(() => {{
        const g = window.comfyAPI.app.app.graph;
        const done = [];
        for (const node of g.nodes)
            for (const w of node.widgets ?? [])
                if (w.name in {json.dumps(settings)}) {{ w.value = {json.dumps(settings)}[w.name]; done.push(w.name); }}
        return done;
    }})()""")
    assert {"ckpt_name", "folder", "size", "steps", "name"} <= set(applied), applied
    page.evaluate("""(() => {
        window.__inversionEvents = [];
        window.comfyAPI.api.api.addEventListener('inversion.progress', (e) => window.__inversionEvents.push(e.detail));
        window.__inversionDone = null;
        window.comfyAPI.api.api.addEventListener('execution_success', () => { window.__inversionDone = 'success'; });
        window.comfyAPI.api.api.addEventListener('execution_error', (e) => { window.__inversionDone = e.detail; });
        return true;
    })()""")
    page.evaluate("window.comfyAPI.app.app.queuePrompt(0, 1)")
    node = f"window.comfyAPI.app.app.graph.getNodeById({node_id})"
    page.wait_for("window.__inversionEvents.length > 0 || window.__inversionDone", timeout=400)
    done = page.wait_for("window.__inversionDone", timeout=600)
    assert done == "success", f"{done}\n{server.log_tail()}"
    events = page.evaluate("window.__inversionEvents")
    assert events and all(e["node"] == str(node_id) and e["kind"] == "train" for e in events)
    assert [e["step"] for e in events] == list(range(1, len(events) + 1))
    page.pump(1.0)
    assert _chart_pixels(page, node) > 50
    page.evaluate(f"""(() => {{  // zoom to 100 % on the trainer, its chart (at the bottom) in view
        const c = window.comfyAPI.app.app.canvas, n = {node};
        c.ds.scale = 1;
        c.ds.offset = [80 - n.pos[0], c.canvas.getBoundingClientRect().height - 30 - n.pos[1] - n.size[1]];
        c.setDirty(true, true);
        return true;
    }})()""")
    page.pump(1.0)
    rect = page.evaluate(f"""(() => {{
        const c = {node}.widgets.find((w) => w.name === 'inversion_chart').element.getBoundingClientRect();
        return {{x: c.x, y: c.y, width: c.width, height: c.height}};
    }})()""")
    page.screenshot(_artifact(page, "browser_training_chart.png"))
    if rect["width"] > 0 and rect["height"] > 0:
        page.screenshot(_artifact(page, "browser_training_chart_widget.png"), clip=rect)

    # a page reload restores the workflow; the chart comes back from the node's output in /history
    page.goto(server.url)
    page.wait_for("window.app && window.app.graph && window.app.graph.nodes.length > 0", 120)
    page.wait_for(f"(() => {{ const n = {node}; return !!n && n.widgets.find((w) => w.name === "
                  f"'inversion_chart').value?.steps?.length > 0; }})()", timeout=60)
    page.pump(1.0)
    assert _chart_pixels(page, node) > 50
    page.screenshot(_artifact(page, "browser_training_chart_after_reload.png"))
    assert not _pack_errors(page), _pack_errors(page)


def test_training_with_previews_shows_them_on_the_node(page, server):
    """Example 10 on the random checkpoint: each preview row reaches the page as the trainer's node
    preview (ComfyUI's preview image with metadata), and the run ends with the grid output."""
    with open(next(p for p in WORKFLOWS if "previews" in p)) as f:
        wf = json.load(f)
    _load_workflow(page, wf, "browser-previews")
    node_id = next(n["id"] for n in wf["nodes"] if n["type"] == TRAIN)
    settings = {  # 3 training steps, previews after steps 2 and 3 (1 sampling step, 64 px), the sampler too
        "ckpt_name": server.ckpt_name, "folder": server.concept_folder, "size": 64, "width": 64, "height": 64,
        "steps": 3, "every": 2, "name": f"browser-previews-{int(time.time())}",
    }
    page.evaluate(f"""(() => {{
        const g = window.comfyAPI.app.app.graph;
        for (const node of g.nodes)
            for (const w of node.widgets ?? [])
                if (w.name in {json.dumps(settings)}) w.value = {json.dumps(settings)}[w.name];
        for (const node of g.nodes.filter((n) => n.type === 'InversionPreviewOptions'))
            node.widgets.find((w) => w.name === 'steps').value = 1;
        window.__previews = [];
        window.comfyAPI.api.api.addEventListener('b_preview_with_metadata', async (e) => {{
            const bitmap = await createImageBitmap(e.detail.blob);
            window.__previews.push({{node: String(e.detail.displayNodeId), type: e.detail.blob.type,
                                     width: bitmap.width, height: bitmap.height}});
        }});
        window.__previewsDone = null;
        window.comfyAPI.api.api.addEventListener('execution_success', () => {{ window.__previewsDone = 'success'; }});
        window.comfyAPI.api.api.addEventListener('execution_error', (e) => {{ window.__previewsDone = e.detail; }});
        return true;
    }})()""")
    page.evaluate("window.comfyAPI.app.app.queuePrompt(0, 1)")
    done = page.wait_for("window.__previewsDone", timeout=600)
    assert done == "success", f"{done}\n{server.log_tail()}"
    page.pump(1.0)
    previews = [p for p in page.evaluate("window.__previews") if p["node"] == str(node_id)]
    assert len(previews) == 2, page.evaluate("window.__previews")  # after steps 2 and 3
    # a row of two square images; the server scales previews to fit ComfyUI's preview size (ImageOps.contain)
    assert all(p["type"] == "image/jpeg" and p["width"] == 2 * p["height"] > 0 for p in previews), previews
    page.screenshot(_artifact(page, "browser_training_previews.png"))
    assert not _pack_errors(page), _pack_errors(page)


def test_a_warning_reaches_the_user_as_a_toast(page, server):
    """An unreadable image is skipped, and the user is told in the page (not only in the server log)."""
    folder = os.path.join(server.base_dir, "input", "warn_concept")
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(np.full((64, 64, 3), 128, "uint8")).save(os.path.join(folder, "good.png"))
    with open(os.path.join(folder, "broken.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not an image")
    page.evaluate("""(() => {
        window.__inversionWarnings = [];
        window.comfyAPI.api.api.addEventListener('inversion.warning', (e) => window.__inversionWarnings.push(e.detail));
        return true;
    })()""")
    prompt = {
        "1": {"class_type": "InversionLoadConceptImages",
              "inputs": {"folder": "warn_concept", "size": 64, "fit": "crop", "alpha_as_mask": True}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    server.post("/prompt", {"prompt": prompt, "client_id": page.evaluate("window.comfyAPI.api.api.clientId")})
    page.wait_for("window.__inversionWarnings.length > 0", timeout=120)
    detail = page.evaluate("window.__inversionWarnings[0]")
    assert detail["node"] == "1" and "broken.png" in detail["message"], detail
    page.wait_for(f"[...document.querySelectorAll({json.dumps(TOAST)})]"
                  ".some((t) => t.textContent.includes('broken.png'))", timeout=30)
    page.screenshot(_artifact(page, "browser_warning_toast.png"))
    assert not _pack_errors(page), _pack_errors(page)


def _saved_images(page, prefix: str) -> list[dict]:
    executed = page.evaluate("window.__inversionExecuted")
    return [img for e in executed if e.get("output") for img in e["output"].get("images", [])
            if img.get("type") == "output" and img["filename"].startswith(prefix)]


def test_example_12_trains_the_pair_then_samples_from_the_saved_bundle(page, server):
    """Example 12 on the random SD1.5: the trainer trains the embedding with a LoRA, Save LoRA + Embedding
    writes the A1111 bundle and the middle row samples with the trainer's model; then the muted bottom row,
    unmuted as its note says, samples from the saved file through Load LoRA + Embedding."""
    with open(next(p for p in WORKFLOWS if "12_pivotal" in p)) as f:
        wf = json.load(f)
    _load_workflow(page, wf, "browser-pivotal")
    name = f"browser-pivotal-{int(time.time())}"
    applied = _set_widgets(page, {"ckpt_name": server.ckpt_name, "folder": server.concept_folder, "size": 64,
                                  "width": 64, "height": 64, "steps": 2, "batch_size": 1, "name": name,
                                  "filename_prefix": name}, only={"name": [TRAIN]})
    assert applied.count("steps") == 3 and applied.count("name") == 1, applied
    muted = page.evaluate("window.comfyAPI.app.app.graph.nodes.filter((n) => n.mode === 2).map((n) => n.type)")
    assert "InversionLoadLoraEmbedding" in muted and "KSampler" in muted
    done = _queue_and_wait(page, timeout=900)
    assert done == "success", f"{done}\n{server.log_tail()}"
    bundle = os.path.join(server.base_dir, "models", "loras", f"{name}_bundle.safetensors")
    assert os.path.isfile(bundle) and os.path.isfile(os.path.join(server.base_dir, "models", "loras",
                                                                  f"{name}.safetensors"))
    assert _saved_images(page, name)  # the middle row; the bottom row is muted
    page.evaluate(f"""(() => {{
        const g = window.comfyAPI.app.app.graph;
        for (const n of g.nodes.filter((n) => n.mode === 2)) n.mode = 0;
        g.nodes.find((n) => n.type === 'InversionLoadLoraEmbedding').widgets
            .find((w) => w.name === 'lora_name').value = {json.dumps(f"{name}_bundle.safetensors")};
        const last = g.nodes.filter((n) => n.type === 'SaveImage').sort((a, b) => b.pos[1] - a.pos[1])[0];
        last.widgets.find((w) => w.name === 'filename_prefix').value = {json.dumps(f"{name}-files")};
        return true;
    }})()""")
    done = _queue_and_wait(page, timeout=900)
    assert done == "success", f"{done}\n{server.log_tail()}"
    assert _saved_images(page, f"{name}-files")  # the bottom row, from the saved bundle
    assert "lora key not loaded" not in server.log_tail()
    page.screenshot(_artifact(page, "browser_pivotal_tuning.png"))
    assert not _pack_errors(page), _pack_errors(page)


@pytest.fixture(scope="module")
def unclip_ckpt(server, request) -> str:
    """The random full-size SD2.1 unCLIP-H checkpoint (built once, ~4 GB, cached), linked into the server."""
    from devtools import harness
    path = os.path.join(harness.cache_dir(), harness.UNCLIP_H_NAME)
    if not os.path.isfile(path):
        request.getfixturevalue("comfyui")  # boots ComfyUI in this process, which the builder needs
        path = harness.sd21_unclip_h_checkpoint()
    return server.link_model(path)


def _set_widgets(page, settings: dict, only: dict | None = None) -> list[str]:
    """Set every widget named in ``settings`` on every node (``only``: {node type: names} limits a name to
    those node types); returns the names set."""
    return page.evaluate(f"""(() => {{
        const g = window.comfyAPI.app.app.graph, s = {json.dumps(settings)}, only = {json.dumps(only or {})};
        const done = [];
        for (const node of g.nodes)
            for (const w of node.widgets ?? [])
                if (w.name in s && (!(w.name in only) || only[w.name].includes(node.type))) {{
                    w.value = s[w.name]; done.push(w.name);
                }}
        return done;
    }})()""")


def _queue_and_wait(page, timeout: float) -> object:
    page.evaluate("""(() => {
        window.__inversionDone = null;
        window.__inversionExecuted = [];
        const api = window.comfyAPI.api.api;
        api.addEventListener('execution_success', () => { window.__inversionDone = 'success'; });
        api.addEventListener('execution_error', (e) => { window.__inversionDone = e.detail; });
        api.addEventListener('execution_interrupted', (e) => { window.__inversionDone = 'interrupted'; });
        api.addEventListener('executed', (e) => window.__inversionExecuted.push(e.detail));
        return true;
    })()""")
    page.evaluate("window.comfyAPI.app.app.queuePrompt(0, 1)")
    return page.wait_for("window.__inversionDone", timeout=timeout)


def test_example_08_ovi_runs_on_a_full_size_unclip_checkpoint(page, server, unclip_ckpt):
    """Example 08 from the real frontend on a random SD2.1 unCLIP-H (ViT-H/14 vision tower, the layout
    unCLIPCheckpointLoader expects): OVI Prior, both unCLIPConditionings (prompt and negative, seeds/004
    Fig. 1), KSampler, VAE Decode and Save Image all run, and an image is saved."""
    with open(next(p for p in WORKFLOWS if "08_ovi" in p)) as f:
        wf = json.load(f)
    _load_workflow(page, wf, "browser-ovi")
    # the sampler's negative is an unCLIPConditioning fed by OVI Prior's negative output
    wiring = page.evaluate("""(() => {
        const g = window.comfyAPI.app.app.graph;
        const up = (node, name) => { const i = node.inputs.find((x) => x.name === name);
                                     const l = g.links.get ? g.links.get(i.link) : g.links[i.link];
                                     return [g.getNodeById(l.origin_id), l.origin_slot]; };
        const sampler = g.nodes.find((n) => n.type === 'KSampler');
        const [neg] = up(sampler, 'negative');
        const [src, slot] = up(neg, 'clip_vision_output');
        return [neg.type, src.type, src.outputs[slot].name];
    })()""")
    assert wiring == ["unCLIPConditioning", "InversionOVIPrior", "negative_clip_vision_output"]
    applied = _set_widgets(page, {"ckpt_name": unclip_ckpt, "steps": 2, "width": 64, "height": 64,
                                  "batch_size": 1, "filename_prefix": "browser-ovi"})
    assert sorted(applied) == sorted(["ckpt_name", "steps", "steps", "width", "height", "batch_size",
                                      "filename_prefix"]), applied
    started = time.time()
    done = _queue_and_wait(page, timeout=900)
    assert done == "success", f"{done}\n{server.log_tail()}"
    executed = page.evaluate("window.__inversionExecuted")
    saved = [img for e in executed if e.get("output") for img in e["output"].get("images", [])
             if img.get("type") == "output"]
    assert saved and saved[0]["filename"].startswith("browser-ovi"), executed
    print(f"example 08 on the random SD2.1 unCLIP-H checkpoint: {time.time() - started:.0f} s")
    assert not _pack_errors(page), _pack_errors(page)
