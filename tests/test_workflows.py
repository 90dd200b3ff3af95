"""The example workflows, the help pages and the web folder.

Every workflow in ``example_workflows/`` is checked node by node and link by link against node
schemas: a real ComfyUI's ``/object_info`` (this pack installed) when ``COMFYUI_PATH`` is set, else
the snapshot ``tests/workflow_nodes.json`` that ``tools/build_examples.py`` writes from one.
"""

from __future__ import annotations

import copy
import glob
import json
import os
import re

import pytest
from PIL import Image

from devtools.workflow_check import FRONTEND_ONLY, MODEL_SUFFIXES, check_workflow, pack_node_ids, widget_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "example_workflows", "*.json")))
SNAPSHOT = os.path.join(ROOT, "tests", "workflow_nodes.json")
PACK_IDS = pack_node_ids(ROOT)
# One workflow per task of the issue (stem -> node types it must use).
TASKS = {
    "01_vanilla_textual_inversion": {"InversionTrainTextualInversion"},
    "02_profile_then_high_grad": {"InversionGradNormProfiler", "InversionTrainTextualInversion"},
    "03_adaptive_timesteps": {"InversionTrainTextualInversion"},
    "04_directional_ti_class_prior": {"InversionTrainTextualInversion", "InversionCaptionInit"},
    "05_caption_initialisation": {"InversionCaptionInit", "InversionTrainTextualInversion"},
    "06_use_learned_embedding": {"InversionLoadEmbedding", "InversionApplyLearnedEmbedding", "CLIPTextEncode"},
    "07_slerp_between_concepts": {"InversionEmbeddingSlerp"},
    "08_ovi_prior_sd21_unclip": {"InversionOVIPrior", "unCLIPCheckpointLoader", "unCLIPConditioning"},
    "09_sdxl_training": {"InversionTrainTextualInversion"},
    "10_previews_score_best_step": {"InversionPreviewOptions", "InversionTrainingOptions",
                                    "InversionTrainTextualInversion"},
    "11_several_concepts": {"InversionAddConcept", "InversionTrainTextualInversion"},
    "12_pivotal_tuning_lora": {"InversionLoraOptions", "InversionTrainTextualInversion", "InversionSaveLoraEmbedding",
                               "InversionLoadLoraEmbedding"},
}
METHOD = {"01": "vanilla", "02": "high_grad", "03": "adaptive", "04": "directional"}
# Stock model loaders: node type -> (the widget naming the file, the models sub-folder it reads).
LOADERS = {
    "CheckpointLoaderSimple": ("ckpt_name", "checkpoints"),
    "unCLIPCheckpointLoader": ("ckpt_name", "checkpoints"),
    "ImageOnlyCheckpointLoader": ("ckpt_name", "checkpoints"),
    "CLIPVisionLoader": ("clip_name", "clip_vision"),
    "VAELoader": ("vae_name", "vae"),
    "LoraLoader": ("lora_name", "loras"),
    "CLIPLoader": ("clip_name", "text_encoders"),
    "UNETLoader": ("unet_name", "diffusion_models"),
    "ControlNetLoader": ("control_net_name", "controlnet"),
}
# The frontend's missing-models dialog (MissingModelsWarning, frontend 1.27) downloads only these
# suffixes from these hosts; other files are listed with their URL to fetch by hand.
DIALOG_SUFFIXES = (".safetensors", ".sft")
DIALOG_HOSTS = ("https://huggingface.co/", "https://civitai.com/")
NOT_IN_DIALOG = {"sd21-unclip-h.ckpt"}  # SD2.1 unCLIP-H is published as a .ckpt only


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _load(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def live_schemas(tmp_path_factory):
    """/object_info of a real ComfyUI with the pack installed, or None without COMFYUI_PATH."""
    from devtools import server_process as sp
    if sp.comfyui_path() is None:
        return None
    return sp.object_info(str(tmp_path_factory.mktemp("object-info")))


@pytest.fixture(scope="module")
def schemas(live_schemas):
    return live_schemas if live_schemas is not None else _load(SNAPSHOT)


def test_one_workflow_per_task_with_a_note_and_a_thumbnail():
    assert sorted(_stem(p) for p in WORKFLOWS) == sorted(TASKS)
    for path in WORKFLOWS:
        wf = _load(path)
        types = {n["type"] for n in wf["nodes"]}
        assert TASKS[_stem(path)] <= types, _stem(path)
        notes = [n for n in wf["nodes"] if n["type"] in ("Note", "MarkdownNote")]
        assert len(notes) == 1 and len(notes[0]["widgets_values"][0]) > 200, _stem(path)
        thumb = os.path.splitext(path)[0] + ".jpg"
        with Image.open(thumb) as im:
            assert im.format == "JPEG" and im.size == (640, 480)
            lo, hi = im.convert("L").getextrema()
            assert hi - lo > 60  # a picture of the graph, not a blank frame


@pytest.mark.parametrize("path", WORKFLOWS, ids=_stem)
def test_workflow_is_valid(path, schemas):
    wf = _load(path)
    assert check_workflow(wf, schemas) == []
    for n in wf["nodes"]:
        t = n["type"]
        if t in FRONTEND_ONLY:
            continue
        module = schemas[t]["python_module"]
        # only stock ComfyUI nodes and this pack's
        assert module in ("nodes",) or module.startswith(("comfy_extras.", "comfy_api_nodes.")) \
            or (module.startswith("custom_nodes.") and t in PACK_IDS), (t, module)


@pytest.mark.parametrize("prefix,method", sorted(METHOD.items()))
def test_training_workflows_use_their_method(prefix, method):
    wf = _load(next(p for p in WORKFLOWS if _stem(p).startswith(prefix)))
    schemas = _load(SNAPSHOT)
    train = next(n for n in wf["nodes"] if n["type"] == "InversionTrainTextualInversion")
    names = [name for name, _ in widget_layout(schemas["InversionTrainTextualInversion"])]
    values = dict(zip(names, train["widgets_values"]))
    assert values["method"] == method
    assert values["seed:control_after_generate"] == "fixed"  # re-queueing must not retrain with a new seed


@pytest.mark.parametrize("path", WORKFLOWS, ids=_stem)
def test_every_model_loader_declares_its_model(path):
    """properties.models on each loader: ComfyUI's missing-models dialog then offers the download."""
    schemas = _load(SNAPSHOT)
    loaders = 0
    for n in _load(path)["nodes"]:
        t = n["type"]
        if t in FRONTEND_ONLY or t in PACK_IDS:  # the pack's loaders read the user's own files
            continue
        values = dict(zip([name for name, _ in widget_layout(schemas[t])], n.get("widgets_values") or []))
        if t not in LOADERS:
            assert "Loader" not in t, f"{t}: add it to LOADERS (its widget and models folder)"
            assert not [v for v in values.values() if isinstance(v, str) and v.endswith(MODEL_SUFFIXES)], t
            continue
        loaders += 1
        widget, directory = LOADERS[t]
        name = values[widget]
        models = (n.get("properties") or {}).get("models")
        assert models, f"{_stem(path)}: {t} declares no properties.models for {name}"
        assert [m["name"] for m in models] == [name], (t, models)
        model = models[0]
        assert model["directory"] == directory, (t, model)
        assert model["url"].startswith(DIALOG_HOSTS) and model["url"].endswith("/" + name), (t, model)
        assert name.endswith(DIALOG_SUFFIXES) or name in NOT_IN_DIALOG, \
            f"{name}: the missing-models dialog downloads only {DIALOG_SUFFIXES} files"
    assert loaders >= 1  # every example loads a checkpoint


def test_snapshot_matches_the_live_schemas(live_schemas):
    """tests/workflow_nodes.json is what tools/build_examples.py saw; rerun it when a node changes."""
    if live_schemas is None:
        pytest.skip("COMFYUI_PATH is not set: no live /object_info to compare with")
    snapshot = _load(SNAPSHOT)
    core = _core_lists(live_schemas, snapshot)
    stale = sorted(t for t in snapshot if t in PACK_IDS and snapshot[t] != _as_snapshot(live_schemas.get(t),
                                                                                         snapshot[t], core))
    assert stale == [], f"node schemas changed: {stale}; run tools/build_examples.py and commit its output"


def _core_lists(live: dict, snapshot: dict) -> list[tuple[list, list]]:
    """(live, snapshot) option lists that ComfyUI supplies, not the pack: KSampler's samplers and
    schedulers, which Preview Options offers too and which grow with each ComfyUI release."""
    def lists(schemas):
        req = schemas["KSampler"]["input"]["required"]
        return [req["sampler_name"][0], req["scheduler"][0]]

    return list(zip(lists(live), lists(snapshot)))


def _as_snapshot(live: dict | None, snapshot: dict, core: list[tuple[list, list]] = ()) -> dict | None:
    """A live schema in the snapshot's terms. Newer ComfyUIs report more fields for every node
    (v0.33: search_aliases, essentials_category, price_badge, ...); the pack sets none of them, so
    such a field must be empty (None, False, [] or {}), and is then left out of the comparison. A
    combo whose options are one of ComfyUI's own lists (``core``) compares as the snapshot's list."""
    if live is None:
        return None
    extra = {k: v for k, v in live.items() if k not in snapshot}
    set_by_pack = {k: v for k, v in extra.items() if v not in (None, False, [], {})}
    out = copy.deepcopy({k: v for k, v in live.items() if k in snapshot or k in set_by_pack})
    for group in (out.get("input") or {}).values():
        for spec in group.values():
            options = spec[1].get("options") if len(spec) > 1 and isinstance(spec[1], dict) else None
            for now, then in core:
                if options is not None and options == now:
                    spec[1]["options"] = then
    return out


def test_snapshot_comparison_ignores_only_empty_new_fields():
    """The comparison above: a newer ComfyUI's empty extra field passes, a set one or a changed input fails."""
    snap = {"input": {"required": {"a": ["INT", {}]}}, "name": "X"}
    assert _as_snapshot(dict(snap, search_aliases=None, dev_only=False), snap) == snap
    assert _as_snapshot(dict(snap, search_aliases=["y"]), snap) != snap
    assert _as_snapshot(dict(snap, input={"required": {}}), snap) != snap
    combo = {"input": {"required": {"s": ["COMBO", {"options": ["euler", "new"]}]}}}
    old = {"input": {"required": {"s": ["COMBO", {"options": ["euler"]}]}}}
    assert _as_snapshot(combo, old, [(["euler", "new"], ["euler"])]) == old
    assert _as_snapshot(combo, old, [(["euler", "other"], ["euler"])]) != old


def test_checker_finds_broken_workflows():
    schemas = _load(SNAPSHOT)
    wf = _load(next(p for p in WORKFLOWS if "vanilla" in p))
    assert check_workflow(wf, schemas) == []

    def broken(edit):
        w = copy.deepcopy(wf)
        edit(w)
        return check_workflow(w, schemas)

    def node(w, t):
        return next(n for n in w["nodes"] if n["type"] == t)

    train = "InversionTrainTextualInversion"
    assert any("widget values" in p for p in broken(lambda w: node(w, train)["widgets_values"].pop()))
    assert any("'method'" in p and "not one of" in p
               for p in broken(lambda w: node(w, train)["widgets_values"].__setitem__(1, "fastest")))
    assert any("outside" in p for p in broken(lambda w: node(w, train)["widgets_values"].__setitem__(2, 0)))
    assert any("unknown node type" in p for p in broken(lambda w: node(w, "VAEDecode").__setitem__("type", "Nope")))

    def retype(w):  # wire the chart IMAGE into the trainer's init socket
        link = next(lk for lk in w["links"] if lk[5] == "INVERSION_INIT")
        link[5] = "IMAGE"
    assert any("link typed" in p for p in broken(retype))

    def cross(w):  # the sampler's positive fed by the VAE output
        link = next(lk for lk in w["links"] if lk[5] == "CONDITIONING")
        ck = node(w, "CheckpointLoaderSimple")
        link[1], link[2] = ck["id"], 2
        ck["outputs"][2]["links"].append(link[0])
    assert any("expects 'CONDITIONING'" in p for p in broken(cross))

    def unlink(w):
        ins = node(w, train)["inputs"]
        slot = next(s for s in ins if s["name"] == "vae")
        lid = slot["link"]
        slot["link"] = None
        w["links"] = [lk for lk in w["links"] if lk[0] != lid]
        for n in w["nodes"]:
            for o in n.get("outputs") or []:
                o["links"] = [x for x in o.get("links") or [] if x != lid]
    assert any("required input 'vae' is not connected" in p for p in broken(unlink))


def test_every_node_has_a_help_page(live_schemas):
    for node_id in sorted(PACK_IDS):
        path = os.path.join(ROOT, "web", "docs", f"{node_id}.md")
        assert os.path.isfile(path), f"missing help page web/docs/{node_id}.md"
        with open(path, encoding="utf-8") as f:
            text = f.read()
        assert text.startswith("# ") and "## Inputs" in text and "## Outputs" in text, node_id
        if live_schemas is not None:
            info = live_schemas[node_id]
            assert text.startswith(f"# {info['display_name']}\n")
            for group in ("required", "optional"):
                for name in info["input"].get(group, {}):
                    assert f"**{name}**" in text, f"{node_id}: input {name!r} is not documented"


WEB_JS = os.path.join(ROOT, "web", "js")
# the import forms of an ES module: `import ... from "x"`, `export ... from "x"`, `import "x"`, `import("x")`
_JS_IMPORTS = (r"\b(?:import|export)\b[\w\s{},*$]*?\bfrom\s*[\"']([^\"']*)[\"']", r"\bimport\s*[\"']([^\"']*)[\"']",
               r"\bimport\s*\(\s*[\"']([^\"']*)[\"']\s*\)")
# top-level statements a helper module may start (a call or an assignment there runs on import)
_JS_DECLARATIONS = re.compile(r"(?:import|export|const|let|function|async function|class)\b|[}\])]")
_JS_SIDE_EFFECTS = re.compile(r"\b(?:app|api|document)\.\w+\s*\(|\b(?:setInterval|setTimeout|addEventListener)\s*\(")


def _js_code(src: str) -> str:
    """The source without its comments (block comments, whole-line and ` // ...` trailing ones)."""
    src = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group().count("\n"), src, flags=re.S)
    return re.sub(r"(?m)(?:^[ \t]*|[ \t]+)//.*$", "", src)


def _web_module_problems(path: str, src: str) -> list[str]:
    """What breaks the web-folder rules in the module ``src`` at ``path`` (under web/js).

    The frontend imports every .js under web/ as an extension, so: ASCII; imports only of the pack's
    own modules, by relative path (never the frontend's deprecated ``/scripts/*.js`` shims: its API
    is ``window.comfyAPI``); an entry module (one calling ``registerExtension``) reads
    ``window.comfyAPI`` and names its extension ``comfyui-inversion.*``; a helper module (any
    other) only declares and exports: no top-level statement that runs something.
    """
    problems = [] if src.isascii() else ["not ASCII"]
    code = _js_code(src)
    found = [m for pattern in _JS_IMPORTS for m in re.finditer(pattern, code)]
    if len(re.findall(r"\bimport\b", code)) != sum(m.group().startswith("import") for m in found):
        problems.append("an import this check does not recognise")
    for m in found:
        spec = m.group(1)
        target = os.path.normpath(os.path.join(os.path.dirname(path), spec))
        if not spec.startswith(("./", "../")):
            problems.append(f"import {spec!r}: only relative imports of the pack's modules (window.comfyAPI, not /scripts/*.js)")
        elif os.path.commonpath([target, WEB_JS]) != WEB_JS or not spec.endswith(".js"):
            problems.append(f"import {spec!r}: not a module under web/js")
        elif not os.path.isfile(target):
            problems.append(f"import {spec!r}: no such module")
    if "registerExtension" in code:
        if "window.comfyAPI" not in code:
            problems.append("an entry module must get app/api from window.comfyAPI")
        m = re.search(r"registerExtension\(\s*\{.*?\bname\s*:\s*(?:[\"']([^\"']*)[\"']|([A-Za-z_$][\w$]*))", code, re.S)
        name = m and (m.group(1) if m.group(1) is not None else
                      next(iter(re.findall(rf"\bconst\s+{re.escape(m.group(2))}\s*=\s*[\"']([^\"']*)[\"']", code)), None))
        if not (name and name.startswith("comfyui-inversion.")):
            problems.append(f"extension name {name!r}: use 'comfyui-inversion.<feature>'")
    else:
        for line in code.splitlines():
            if line.strip() and not line[0].isspace() and (not _JS_DECLARATIONS.match(line) or _JS_SIDE_EFFECTS.search(line)):
                problems.append(f"a helper module runs code on import: {line.strip()!r}")
    return problems


def test_web_folder_holds_only_extension_modules_and_docs():
    """The frontend loads every .js under web/ (recursively); help pages are web/docs/<NodeId>.md."""
    # the check itself catches what it is for
    here = os.path.join(WEB_JS, "example.js")
    entry = 'const { app } = window.comfyAPI.app;\napp.registerExtension({ name: "comfyui-inversion.example" });\n'
    assert _web_module_problems(here, entry) == []
    assert _web_module_problems(here, 'import { ema } from "./inversion/chart_math.js";\n' + entry) == []
    assert _web_module_problems(here, 'export { ema } from "./inversion/chart_math.js";\nexport function f() {\n  return 1;\n}\n') == []
    for bad, why in [
        ('import { app } from "/scripts/app.js";\napp.registerExtension({ name: "comfyui-inversion.x" });\n', "relative"),
        ('import { app } from "../../scripts/app.js";\n' + entry, "not a module under web/js"),
        ('import { f } from "./inversion/no_such_module.js";\n' + entry, "no such module"),
        ('const m = await import(\n  "/scripts/app.js");\n' + entry, "import"),
        (entry.replace("comfyui-inversion.example", "example"), "extension name"),
        (entry.replace("window.comfyAPI.app", "globalThis.app"), "window.comfyAPI"),
        (entry + "// caf\u00e9\n", "ASCII"),
        ('const { api } = window.comfyAPI.api;\napi.addEventListener("x", () => {});\n', "runs code on import"),
        ('export const TIMER = setInterval(() => {}, 500);\n', "runs code on import"),
        ('export { app } from "/scripts/app.js";\n', "relative"),
    ]:
        assert any(why in p for p in _web_module_problems(here, bad)), bad
    modules = 0
    for dirpath, _, files in os.walk(os.path.join(ROOT, "web")):
        rel = os.path.relpath(dirpath, ROOT).replace(os.sep, "/")
        for fn in files:
            if rel == "web/docs":
                assert fn.endswith(".md") and fn[:-3] in PACK_IDS, f"{rel}/{fn}"
                continue
            assert (rel == "web/js" or rel.startswith("web/js/")) and fn.endswith(".js"), f"{rel}/{fn}"
            with open(os.path.join(dirpath, fn), encoding="utf-8") as f:
                assert _web_module_problems(os.path.join(dirpath, fn), f.read()) == [], f"{rel}/{fn}"
            modules += 1
    assert modules >= 2


def test_every_tooltip_that_names_a_default_names_the_inputs_default(schemas):
    """A tooltip's "X (default ..." must be the input's own default (the method tooltip once said
    interval while the node defaulted to adaptive)."""
    wrong, named = [], 0
    for t in (t for t in PACK_IDS if t in schemas):  # the snapshot holds the workflows' nodes; live, every node
        for group in ("required", "optional"):
            for name, spec in (schemas[t]["input"].get(group) or {}).items():
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                for word in re.findall(r"([\w.\-\[\]]+) \(default", opts.get("tooltip", "")):
                    named += 1
                    if word.strip("`'\"") != str(opts.get("default")):
                        wrong.append(f"{t}.{name}: tooltip names {word!r}, default is {opts.get('default')!r}")
    assert named >= 1
    assert wrong == [], wrong
