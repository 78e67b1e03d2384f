"""The shipped example workflows as files a newcomer opens: stages as groups headed by notes, links left to right,
one prompt typed once, the hypernetwork's info shown, file names that agree with the README and the trainer, and
a thumbnail for the template browser. Running them in ComfyUI: test_comfyui_workflows.py; opening them in the
real front end (overlaps, zoom, screenshots): test_comfyui_server.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from testkit.comfyui.workflow_format import UI_ONLY_TYPES
from tests.conftest import SDXL_WORKFLOW_FILES, WORKFLOW_FILES
from hypernet.files import COMFYUI_HYPERNET_NAME, COMFYUI_HYPERNET_NAMES, comfyui_install_hint

REPO = Path(__file__).resolve().parents[2]
WORKFLOW_DIR = REPO / "workflows"
NAMES = sorted(p.stem for p in (WORKFLOW_DIR / "api").glob("*.json"))
TITLE_HEIGHT = 30  # LiteGraph draws a node's title bar above its pos
LOADER_FOLDERS = {"CheckpointLoaderSimple": ("ckpt_name", "checkpoints/"), "CLIPVisionLoader": ("clip_name", "clip_vision/"),
                  "SubjectHyperNet_LoadHyperNet": ("hypernet_name", "hypernets/")}


def ui(name: str) -> dict:
    return json.loads((WORKFLOW_DIR / f"{name}.json").read_text())


def api(name: str) -> dict:
    return json.loads((WORKFLOW_DIR / "api" / f"{name}.json").read_text())


def rect(node: dict) -> tuple[float, float, float, float]:
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE_HEIGHT, w, h + TITLE_HEIGHT


def members(workflow: dict, group: dict) -> list[dict]:
    gx, gy, gw, gh = group["bounding"]
    return [n for n in workflow["nodes"] if gx <= rect(n)[0] and rect(n)[0] + rect(n)[2] <= gx + gw
            and gy <= rect(n)[1] and rect(n)[1] + rect(n)[3] <= gy + gh]


def test_every_workflow_has_an_api_twin_and_a_small_square_jpeg_thumbnail():
    assert NAMES and sorted(p.stem for p in WORKFLOW_DIR.glob("*.json")) == NAMES
    assert sorted(p.stem for p in WORKFLOW_DIR.glob("*.jpg")) == NAMES
    for name in NAMES:
        path = WORKFLOW_DIR / f"{name}.jpg"
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.width == image.height >= 256, (name, image.format, image.size)
            assert ImageStat.Stat(image.convert("L")).stddev[0] > 10, name  # a picture, not a blank
        assert path.stat().st_size < 100_000, name


@pytest.mark.parametrize("name", NAMES)
def test_stages_are_groups_left_to_right_each_headed_by_a_note(name):
    workflow = ui(name)
    groups = sorted(workflow["groups"], key=lambda g: g["bounding"][0])
    titles = [g["title"] for g in groups]
    assert titles[:2] == ["1 · Reference", "2 · Subject LoRA"] and titles[-1] == f"{len(groups)} · Output", titles
    assert all(a["bounding"][0] + a["bounding"][2] < b["bounding"][0] for a, b in zip(groups, groups[1:])), titles  # side by side
    grouped = []
    for group in groups:
        inside = members(workflow, group)
        notes = [n for n in inside if n["type"] in UI_ONLY_TYPES]
        others = [n for n in inside if n["type"] not in UI_ONLY_TYPES]
        assert len(notes) == 1 and others, (group["title"], [n.get("title", n["type"]) for n in inside])
        assert all(rect(notes[0])[1] + rect(notes[0])[3] <= rect(n)[1] for n in others), group["title"]  # the note on top
        grouped += inside
    assert sorted(n["id"] for n in grouped) == sorted(n["id"] for n in workflow["nodes"])  # every node in one stage


@pytest.mark.parametrize("name", NAMES)
def test_links_run_left_to_right(name):
    workflow = ui(name)
    nodes = {n["id"]: n for n in workflow["nodes"]}
    backwards = [(nodes[s].get("title"), nodes[t].get("title")) for _, s, _, t, _, _ in workflow["links"]
                 if rect(nodes[s])[0] + rect(nodes[s])[2] >= rect(nodes[t])[0]]
    assert backwards == []


@pytest.mark.parametrize("name", NAMES)
def test_notes_say_which_file_goes_in_which_models_folder_and_how_to_make_a_hypernetwork(name):
    workflow, prompt = ui(name), api(name)
    reference = next(g for g in workflow["groups"] if g["title"] == "1 · Reference")
    note, = [n["widgets_values"][0] for n in members(workflow, reference) if n["type"] in UI_ONLY_TYPES]
    for node in prompt.values():
        if node["class_type"] in LOADER_FOLDERS:
            widget, folder = LOADER_FOLDERS[node["class_type"]]
            line = next((line for line in note.splitlines() if f"`{folder}`" in line), "")
            assert f"`{node['inputs'][widget]}`" in line, (folder, node["inputs"][widget], note)
    assert "python -m training.train" in note and "hypernet.safetensors" in note


@pytest.mark.parametrize("name", NAMES)
def test_notes_name_only_widgets_and_nodes_the_graph_has(name):
    workflow, prompt = ui(name), api(name)
    widgets = {key for node in prompt.values() for key, value in node["inputs"].items() if not isinstance(value, list)}
    titles = [n["title"] for n in workflow["nodes"] if "title" in n]
    for note in (n["widgets_values"][0] for n in workflow["nodes"] if n["type"] in UI_ONLY_TYPES):
        change = next(line for line in note.splitlines() if line.startswith("**Change:**"))
        named_widgets = [w for w in re.findall(r"`([^`]+)`", change) if re.fullmatch(r"[a-z_]+", w)]
        named_nodes = re.findall(r"(?<!\*)\*([^*]+)\*(?!\*)", change)
        assert named_widgets or named_nodes, change
        assert set(named_widgets) <= widgets, (change, set(named_widgets) - widgets)
        assert all(any(t.startswith(n) for t in titles) for n in named_nodes), (change, titles)


@pytest.mark.parametrize("name", NAMES)
def test_a_prompt_is_typed_once_and_the_hypernetwork_info_is_shown(name):
    prompt = api(name)
    texts = [n["inputs"]["text"] for n in prompt.values() if n["class_type"] == "CLIPTextEncode" and isinstance(n["inputs"]["text"], str)]
    assert len(texts) == len(set(texts)), texts
    loader = next(k for k, n in prompt.items() if n["class_type"] == "SubjectHyperNet_LoadHyperNet")
    assert any(n["class_type"] == "PreviewAny" and n["inputs"]["source"] == [loader, 1] for n in prompt.values())


def test_the_hypernetwork_file_name_agrees_in_workflows_readme_trainer_and_tests():
    for family, prefix in (("sd15", ""), ("sdxl", "SDXL - ")):
        names = [name for name in NAMES if name.startswith("SDXL - ") == bool(prefix)]
        loaders = [n for name in names for n in api(name).values() if n["class_type"] == "SubjectHyperNet_LoadHyperNet"]
        expected = COMFYUI_HYPERNET_NAMES[family]
        assert len(loaders) == len(names) >= 5 and {n["inputs"]["hypernet_name"] for n in loaders} == {expected}
        hint = comfyui_install_hint(Path("runs/me/hypernet.safetensors"), family)
        assert f"copy runs/me/hypernet.safetensors to ComfyUI/models/hypernets/{expected}" in hint
    assert COMFYUI_HYPERNET_NAME == WORKFLOW_FILES["hypernets"] and COMFYUI_HYPERNET_NAMES["sdxl"] == SDXL_WORKFLOW_FILES["hypernets"]
    readme = (REPO / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `models/hypernets/`"))
    assert all(name in row for name in COMFYUI_HYPERNET_NAMES.values()) and "hypernet.safetensors" in row, row
    other = comfyui_install_hint(Path("runs/toy/hypernet.safetensors"), "sd15-toy")
    assert "need an SD1.5 or SDXL hypernetwork" in other and "copy" not in other
