"""Check a UI-format ComfyUI workflow (the JSON the editor saves) against node schemas.

``schemas`` is ``/object_info`` (or a subset of it): for every node, its inputs (``input`` and
``input_order``) and outputs. The rules below are those of the ComfyUI frontend (1.27) that turn a
schema into a node's widgets, so ``widgets_values`` can be read by position:

- the widgets follow ``input_order["required"]`` then ``input_order["optional"]``;
- INT, FLOAT, STRING, BOOLEAN and COMBO (a list of options, or ``"COMBO"`` with ``options``) are
  widgets unless ``forceInput``; anything else (MODEL, IMAGE, EMBEDDING, ...) is a socket only;
- an INT named ``seed``/``noise_seed``, or any input with ``control_after_generate``, is followed by
  a "control after generate" value; a COMBO with ``image_upload`` by its upload button's value.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable

# Nodes that exist only in the frontend (not in /object_info).
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft")


def _spec(schema: dict, name: str) -> tuple[str, list, dict, bool]:
    """(type, combo options, options dict, optional) of input ``name``."""
    for group, optional in (("required", False), ("optional", True)):
        spec = (schema.get("input") or {}).get(group, {}).get(name)
        if spec is None:
            continue
        kind = spec[0]
        opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        if isinstance(kind, list):
            return "COMBO", list(kind), opts, optional
        if kind == "COMBO":
            return "COMBO", list(opts.get("options") or []), opts, optional
        return str(kind), [], opts, optional
    raise KeyError(name)


def input_names(schema: dict) -> list[str]:
    order = schema.get("input_order") or {g: list(v) for g, v in (schema.get("input") or {}).items()}
    return list(order.get("required", [])) + list(order.get("optional", []))


def widget_layout(schema: dict) -> list[tuple[str, str]]:
    """The node's widgets in ``widgets_values`` order: (input name or pseudo-widget, kind)."""
    out: list[tuple[str, str]] = []
    for name in input_names(schema):
        kind, _, opts, _ = _spec(schema, name)
        if kind not in WIDGET_TYPES or opts.get("forceInput"):
            continue
        out.append((name, kind))
        if (kind == "INT" and name in ("seed", "noise_seed")) or opts.get("control_after_generate"):
            out.append((f"{name}:control_after_generate", "CONTROL"))
        if kind == "COMBO" and (opts.get("image_upload") or opts.get("animated_image_upload")
                                or opts.get("video_upload")):
            out.append((f"{name}:upload", "UPLOAD"))
    return out


def socket_type(schema: dict, name: str) -> str:
    kind, _, _, _ = _spec(schema, name)
    return kind


def types_match(a: str, b: str) -> bool:
    """Link compatibility as the frontend sees it: equal, '*' or one of a comma-separated list."""
    if a == "*" or b == "*":
        return True
    sa, sb = {x.strip() for x in str(a).split(",")}, {x.strip() for x in str(b).split(",")}
    return bool(sa & sb)


def check_value(name: str, kind: str, value: Any, options: list, opts: dict) -> list[str]:
    """Problems with one widget value (empty when it fits)."""
    where = f"widget {name!r}"
    if kind == "INT":
        if isinstance(value, bool) or not isinstance(value, int):
            return [f"{where}: {value!r} is not an integer"]
    elif kind == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return [f"{where}: {value!r} is not a number"]
    elif kind == "BOOLEAN":
        if not isinstance(value, bool):
            return [f"{where}: {value!r} is not a boolean"]
    elif kind == "STRING":
        if not isinstance(value, str):
            return [f"{where}: {value!r} is not a string"]
    elif kind == "COMBO":
        if options and value not in options:
            return [f"{where}: {value!r} is not one of {options}"]
        if not options and not (isinstance(value, str) and value):
            # a file list that is empty on this server: any file name goes
            return [f"{where}: {value!r} is not a file name"]
    elif kind == "CONTROL":
        if value not in CONTROL_VALUES:
            return [f"{where}: {value!r} is not one of {sorted(CONTROL_VALUES)}"]
    if kind in ("INT", "FLOAT"):
        lo, hi = opts.get("min"), opts.get("max")
        if lo is not None and value < lo or hi is not None and value > hi:
            return [f"{where}: {value!r} is outside [{lo}, {hi}]"]
    return []


def check_workflow(wf: dict, schemas: dict[str, dict], *, extra_types: Iterable[str] = ()) -> list[str]:
    """Every problem found in workflow ``wf`` (an empty list when it is valid)."""
    problems: list[str] = []
    known = set(schemas) | FRONTEND_ONLY | set(extra_types)
    nodes = {n["id"]: n for n in wf.get("nodes", [])}
    if len(nodes) != len(wf.get("nodes", [])):
        problems.append("duplicate node ids")
    for n in nodes.values():
        t = n.get("type")
        tag = f"node {n['id']} ({t})"
        if t not in known:
            problems.append(f"{tag}: unknown node type")
            continue
        if t in FRONTEND_ONLY or t not in schemas:
            continue
        schema = schemas[t]
        layout = widget_layout(schema)
        values = n.get("widgets_values") or []
        if isinstance(values, dict):
            problems.append(f"{tag}: widgets_values is a dict; the UI saves a list")
            continue
        if len(values) != len(layout):
            problems.append(f"{tag}: {len(values)} widget values for {len(layout)} widgets "
                            f"{[w for w, _ in layout]}")
            continue
        for (name, kind), value in zip(layout, values):
            if kind in ("CONTROL", "UPLOAD"):
                if kind == "CONTROL":
                    problems += [f"{tag}: {p}" for p in check_value(name, kind, value, [], {})]
                continue
            _, options, opts, _ = _spec(schema, name)
            problems += [f"{tag}: {p}" for p in check_value(name, kind, value, options, opts)]
        for slot in n.get("inputs", []) or []:
            if slot.get("name") not in input_names(schema):
                problems.append(f"{tag}: input slot {slot.get('name')!r} is not an input of {t}")
        outs = schema.get("output", [])
        for i, slot in enumerate(n.get("outputs", []) or []):
            if i >= len(outs):
                problems.append(f"{tag}: output slot {i} does not exist ({len(outs)} outputs)")
            elif not types_match(slot.get("type"), outs[i] if not isinstance(outs[i], list) else "COMBO"):
                problems.append(f"{tag}: output {i} is typed {slot.get('type')!r}, the node says {outs[i]!r}")
        required = [k for k in (schema.get("input_order") or {}).get("required", [])]
        linked = {s.get("name") for s in n.get("inputs", []) or [] if s.get("link") is not None}
        for name in required:
            kind, _, opts, _ = _spec(schema, name)
            if (kind not in WIDGET_TYPES or opts.get("forceInput")) and name not in linked and n.get("mode", 0) == 0:
                problems.append(f"{tag}: required input {name!r} is not connected")
    links = wf.get("links", [])
    seen_links = set()
    for link in links:
        if not isinstance(link, list) or len(link) != 6:
            problems.append(f"link {link!r}: expected [id, origin, origin_slot, target, target_slot, type]")
            continue
        lid, a, a_slot, b, b_slot, ltype = link
        seen_links.add(lid)
        tag = f"link {lid}"
        if a not in nodes or b not in nodes:
            problems.append(f"{tag}: connects a missing node ({a} -> {b})")
            continue
        na, nb = nodes[a], nodes[b]
        outs = na.get("outputs") or []
        ins = nb.get("inputs") or []
        if a_slot >= len(outs) or b_slot >= len(ins):
            problems.append(f"{tag}: slot out of range ({a}:{a_slot} -> {b}:{b_slot})")
            continue
        if lid not in (outs[a_slot].get("links") or []):
            problems.append(f"{tag}: not listed in node {a}'s output {a_slot} links")
        if ins[b_slot].get("link") != lid:
            problems.append(f"{tag}: node {b}'s input {b_slot} points to link {ins[b_slot].get('link')}")
        out_type = outs[a_slot].get("type")
        if na["type"] in schemas:
            st = schemas[na["type"]]["output"][a_slot]
            out_type = "COMBO" if isinstance(st, list) else st
        in_name = ins[b_slot].get("name")
        in_type = ins[b_slot].get("type")
        if nb["type"] in schemas:
            try:
                in_type = socket_type(schemas[nb["type"]], in_name)
            except KeyError:
                problems.append(f"{tag}: node {b} ({nb['type']}) has no input {in_name!r}")
                continue
        if not types_match(out_type, in_type):
            problems.append(f"{tag}: {na['type']} output {out_type!r} -> {nb['type']}.{in_name} expects {in_type!r}")
        if not types_match(ltype, out_type):
            problems.append(f"{tag}: link typed {ltype!r} but the output is {out_type!r}")
    for n in nodes.values():
        for slot in n.get("inputs", []) or []:
            if slot.get("link") is not None and slot["link"] not in seen_links:
                problems.append(f"node {n['id']}: input {slot.get('name')!r} points to missing link {slot['link']}")
        for slot in n.get("outputs", []) or []:
            for lid in slot.get("links") or []:
                if lid not in seen_links:
                    problems.append(f"node {n['id']}: output {slot.get('name')!r} lists missing link {lid}")
    return problems


def pack_node_ids(root: str) -> set[str]:
    """The pack's node ids, read from the sources (no ComfyUI import needed)."""
    import re

    ids: set[str] = set()
    nodes_dir = os.path.join(root, "nodes")
    for fn in sorted(os.listdir(nodes_dir)):
        if fn.endswith(".py"):
            with open(os.path.join(nodes_dir, fn), encoding="utf-8") as f:
                ids.update(re.findall(r"node_id\s*=\s*[\"']([A-Za-z0-9_]+)[\"']", f.read()))
    return ids
