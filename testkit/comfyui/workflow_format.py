"""Converting between ComfyUI's two workflow formats, from the node definitions ComfyUI reports.

API format (what the server executes): ``{id: {"class_type", "inputs": {name: value | [node_id, slot]}}}``.
UI format (what users drag in): litegraph ``nodes`` with ``inputs`` (sockets), ``outputs`` and
``widgets_values`` in widget order, plus a ``links`` table. The rules follow the front end: INT/FLOAT/
STRING/BOOLEAN and combos are widgets unless ``forceInput``; a seed gets a "control after generate"
value after it; an ``image_upload`` combo gets the upload widget's value after it. A widget fed by a link
(e.g. one prompt string feeding two text encoders) keeps its value in ``widgets_values`` and gets an input
socket ``{"widget": {"name": ...}}`` after the ordinary sockets, as the front end saves it. Note nodes are
front-end only: they are in the UI file and never in the API prompt.
"""

from __future__ import annotations

from collections import defaultdict

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
UI_ONLY_TYPES = {"Note", "MarkdownNote"}  # the front end's own nodes: never part of the prompt it sends

# Runs inside ComfyUI (harness code hook): node definitions of the given class types.
NODE_SPECS_CODE = r"""
import nodes as _core
def _spec(cls):
    info = cls.INPUT_TYPES()
    inputs = []
    for section in ("required", "optional"):
        for name, definition in info.get(section, {}).items():
            kind = definition[0]
            options = definition[1] if len(definition) > 1 and isinstance(definition[1], dict) else {}
            kind = "COMBO" if isinstance(kind, (list, tuple)) else str(kind)
            inputs.append({"name": name, "type": kind, "optional": section == "optional",
                           "force_input": bool(options.get("forceInput")),
                           "control": bool(options.get("control_after_generate")) or (kind == "INT" and name in ("seed", "noise_seed")),
                           "upload": bool(options.get("image_upload")), "multiline": bool(options.get("multiline"))})
    names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
    return {"inputs": inputs, "outputs": [[str(n), str(t)] for n, t in zip(names, cls.RETURN_TYPES)]}
node_specs = {name: _spec(_core.NODE_CLASS_MAPPINGS[name]) for name in spec["node_types"]}
"""


def _is_widget(input_spec: dict) -> bool:
    return input_spec["type"] in WIDGET_TYPES and not input_spec["force_input"]


def api_to_ui(api: dict, specs: dict) -> dict:
    """UI-format workflow of an API prompt; every node at (0, 0) with size [0, 0] until a layout places it."""
    links, nodes = [], []
    out_links: dict[tuple[str, int], list[int]] = defaultdict(list)
    sockets_of: dict[str, list[dict]] = {}
    for target, node in api.items():
        spec = specs[node["class_type"]]
        linked_widgets = [i for i in spec["inputs"] if _is_widget(i) and isinstance(node["inputs"].get(i["name"]), list)]
        sockets_of[target] = [i for i in spec["inputs"] if not _is_widget(i)] + linked_widgets
        for slot, input_spec in enumerate(sockets_of[target]):
            value = node["inputs"].get(input_spec["name"])
            if isinstance(value, list):
                link_id = len(links) + 1
                source, source_slot = value
                out_type = specs[api[source]["class_type"]]["outputs"][source_slot][1]
                links.append([link_id, int(source), source_slot, int(target), slot, out_type])
                out_links[(source, source_slot)].append(link_id)
    link_by_target = {(l[3], l[4]): l[0] for l in links}
    for order, (node_id, node) in enumerate(api.items()):
        spec = specs[node["class_type"]]
        inputs = []
        for slot, i in enumerate(sockets_of[node_id]):
            socket = {"name": i["name"], "type": i["type"], "link": link_by_target.get((int(node_id), slot))}
            if _is_widget(i):
                socket["widget"] = {"name": i["name"]}
            inputs.append(socket)
        widgets = []
        for i in spec["inputs"]:
            if _is_widget(i) and i["name"] in node["inputs"]:
                value = node["inputs"][i["name"]]
                widgets.append(_widget_default(i) if isinstance(value, list) else value)
                if i["control"]:
                    widgets.append("fixed")
                if i["upload"]:
                    widgets.append("image")
        outputs = [{"name": name, "type": kind, "links": out_links.get((node_id, slot), []), "slot_index": slot} for slot, (name, kind) in enumerate(spec["outputs"])]
        nodes.append({
            "id": int(node_id), "type": node["class_type"], "pos": [0, 0], "size": [0, 0],
            "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
            "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets,
            **({"title": node["_meta"]["title"]} if node.get("_meta", {}).get("title") else {}),
        })
    return {"last_node_id": max(int(n) for n in api), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def _widget_default(input_spec: dict):
    """The value a linked widget keeps in the UI file (the front end ignores it while the link is there)."""
    return {"STRING": "", "INT": 0, "FLOAT": 0.0, "BOOLEAN": False}.get(input_spec["type"], "")


def ui_to_api(ui: dict, specs: dict) -> dict:
    """API-format prompt a UI workflow describes (what the front end's 'Queue' sends)."""
    links = {l[0]: l for l in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        if node["type"] in UI_ONLY_TYPES:
            continue
        spec = specs[node["type"]]
        inputs: dict = {}
        values = list(node.get("widgets_values", []))
        for i in spec["inputs"]:
            if _is_widget(i):
                if not values:
                    continue
                inputs[i["name"]] = values.pop(0)
                if i["control"]:
                    values.pop(0)
                if i["upload"]:
                    values.pop(0)
        for socket in node.get("inputs", []):
            if socket.get("link") is not None:
                link = links[socket["link"]]
                inputs[socket["name"]] = [str(link[1]), link[2]]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def strip_meta(api: dict) -> dict:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
