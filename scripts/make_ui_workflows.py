"""Regenerate the UI-format workflows (workflows/*.json) from their API-format twins (workflows/api/*.json).

Node definitions come from a real ComfyUI with this pack installed, so widget order matches the front end.
The layout is made here, so regenerating keeps it: each workflow lists its nodes by stage (reference ->
subject LoRA -> sampling -> output) and by column within the stage; every stage becomes a group headed by a
note that says what the stage does and which widgets to change; the stored view (``extra.ds``) opens at a
zoom where the front end draws titles and widgets.
    python scripts/make_ui_workflows.py                        # all of them
    python scripts/make_ui_workflows.py 'Save a subject LoRA'  # only the named ones
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "scripts"), str(REPO)]

from testkit.comfyui.harness import run_in_comfyui  # noqa: E402
from testkit.comfyui.workflow_format import NODE_SPECS_CODE, WIDGET_TYPES, api_to_ui  # noqa: E402
from get_comfyui import ensure_comfyui  # noqa: E402

# -- geometry of the front end (LiteGraph): a node's pos is the top-left of its body; the title bar sits above.
TITLE_HEIGHT = 30
SLOT_HEIGHT = 20
WIDGET_HEIGHT = 24
TEXT_BOX_HEIGHT = 68  # a multiline text widget's smallest height
GAP_X, GAP_Y = 40, 30  # between columns / between stacked nodes
GROUP_PAD, GROUP_TITLE, STAGE_GAP = 20, 40, 60
# What the view is fitted to: ComfyUI's canvas in a 1600x1000 browser window, less its side bar and top bars.
VIEW_ORIGIN, VIEW_SIZE = (80, 140), (1500, 700)
MIN_SCALE, MAX_SCALE = 0.85, 1.0  # below ~0.57 the front end draws nodes as boxes without text (LiteGraph LOD)

# Body sizes a newcomer can read: wide enough for file names, tall enough for text boxes and for image previews
# (the front end grows a node by a 220 px preview once its image loads: LoadImage 344 px, SaveImage 278 px).
PREFERRED_SIZE = {
    "CheckpointLoaderSimple": (300, 0), "CLIPVisionLoader": (300, 0), "SubjectHyperNet_LoadHyperNet": (300, 0),
    "LoadImage": (260, 350), "PreviewAny": (260, 110), "CLIPTextEncode": (260, 110), "PrimitiveStringMultiline": (260, 120),
    "SaveImage": (260, 290), "VAEDecode": (160, 0), "SamplerCustomAdvanced": (250, 0),
}
DEFAULT_WIDTH = 250

STAGES = {
    "reference": ("Reference", "#3f789e"),
    "subject": ("Subject LoRA", "#a1309b"),
    "sampling": ("Sampling", "#b58b2a"),
    "output": ("Output", "#8A8"),
}

# Per workflow (its file name is the title the template browser shows): per stage the columns of node ids, left
# to right, top to bottom. Sources sit in the order of the inputs they feed (Load HyperNet, CLIP vision, checkpoint
# = Predict's hypernet, clip_vision, model, clip), so the links between stages run side by side, not crossing;
# HyperNet info (what the hypernetwork was trained for) sits under Predict Subject LoRA, which checks it.
KSAMPLER, HMCFG, GUIDER, FINETUNE, SAVE_LORA = ("Personalise with KSampler", "Personalise with HM-CFG", "Personalise with the HM-CFG guider",
                                                "Personalise, finetune, then HM-CFG", "Save a subject LoRA")
TUNE = "Personalise, tune, then HM-CFG"  # SD1.5 only: needs a hypernetwork trained with --token-embedding
REFERENCE = [[3, 2, 1], [4]]
LAYOUTS = {
    KSAMPLER: {"reference": REFERENCE, "subject": [[5, 20]], "sampling": [[6, 7, 8], [9]], "output": [[10], [11]]},
    HMCFG: {"reference": REFERENCE, "subject": [[5, 20]], "sampling": [[21, 7, 9], [6, 8], [10]], "output": [[11], [12]]},
    GUIDER: {"reference": REFERENCE, "subject": [[5, 20]], "sampling": [[21, 7, 9], [6, 8], [10, 13, 14, 15], [16]], "output": [[11], [12]]},
    FINETUNE: {"reference": REFERENCE, "subject": [[5, 20], [13], [14]], "sampling": [[21, 7, 9], [6, 8], [10]], "output": [[11, 15], [12]]},
    SAVE_LORA: {"reference": REFERENCE, "subject": [[5, 20]], "output": [[6], [22]]},
    TUNE: {"reference": REFERENCE, "subject": [[5, 20], [14]], "sampling": [[21, 7, 9], [8], [10]], "output": [[11, 15], [12]]},
}
SDXL_PREFIX = "SDXL - "  # the same graphs but TUNE for SDXL: 1024 px, SDXL checkpoint and hypernetwork
SUMMARIES = {
    KSAMPLER: "The hypernetwork turns one photo into a LoRA for the checkpoint; a core KSampler draws with it.",
    HMCFG: "The hypernetwork turns one photo into a LoRA; HM-CFG keeps the base model's composition and adds the subject.",
    GUIDER: f"As *{HMCFG}*, with HM-CFG as a GUIDER for the core SamplerCustomAdvanced.",
    FINETUNE: "The predicted LoRA is finetuned on the photo (Rank-Relaxed Finetune), then HM-CFG draws with it.",
    SAVE_LORA: "The hypernetwork turns one photo into a LoRA, saved as files the core Load LoRA node reads.",
    TUNE: ("The hypernetwork predicts a LoRA and a word embedding for `sks`; both are tuned on the photo for 12 steps "
           "(Subject Tuning), then HM-CFG draws with them. Needs a hypernetwork trained with `--token-embedding true`."),
}

REFERENCE_NOTE = """## {title}
{summary}

Put the files into `ComfyUI/models/`, then press **R** to refresh the lists:
- `hypernets/` the hypernetwork, `{hypernet}`. Make one with `python -m training.train` (README: *Training a hypernetwork*{sdxl_training}) and copy its `hypernet.safetensors` here under that name.
- `clip_vision/` the CLIP vision model the hypernetwork was trained with (here `{clip_vision}`; *HyperNet info* names it after a run)
- `checkpoints/` the {family} checkpoint it was trained for (here `{checkpoint}`)

**Change:** *Subject image*: upload a photo of your subject. Several views of one subject work too, batched with the core Batch Images node."""


def widget_of(api: dict, class_type: str, widget: str) -> str:
    return next(n["inputs"][widget] for n in api.values() if n["class_type"] == class_type)


SUBJECT_NOTE = """*Predict Subject LoRA* turns the photo into LoRA weights in one pass of the hypernetwork (no training). *HyperNet info* shows, after a run, what the hypernetwork was trained for.

**Change:** `strength_model`, `strength_clip` (1 = as predicted, 0 = the base model)."""

FINETUNE_NOTE = """*Predict Subject LoRA* turns the photo into LoRA weights (no training); *Rank-Relaxed Finetune* then trains a fresh rank-4 LoRA on top for `steps` on the photo and merges both. *HyperNet info* shows, after a run, what the hypernetwork was trained for.

**Change:** *Training prompt* (`a photo of a sks <class>`), `steps`, `seed`."""

TUNING_NOTE = """*Predict Subject LoRA* turns the photo into LoRA weights and a word embedding for `sks` (no training); *Subject Tuning* then tunes both together for `steps` on the photo, the embedding kept near a real word. *HyperNet info* shows, after a run, what the hypernetwork was trained for (it must say it also predicts a word embedding).

**Change:** `text` of *Subject Tuning* (`a photo of sks <class>`), `steps`, `learning_rate`, `seed`."""

PROMPT_TIP = "Call the subject `sks <class>`, e.g. *a photo of a sks dog*: `sks` is the word the hypernetwork was trained with (`--placeholder`)."

# The first of these a workflow has sets its sampling note (Subject Prompt Encode feeds an HM-CFG KSampler).
SAMPLING_NOTES = {
    "SubjectHyperNet_SubjectPromptEncode": f"""Type the prompt once in *Prompt*. {PROMPT_TIP}
*Subject Prompt Encode* reads `sks` as the tuned word embedding (subject conditioning, through the subject CLIP) and as its nearest real word (base conditioning); *HM-CFG KSampler* adds the subject term from the tuned LoRA.

**Change:** *Prompt*, *Negative prompt*, `cfg_text` (like cfg), `cfg_subject` (0 = base model only), `seed`, `steps`, image size.""",
    "KSampler": f"""A core KSampler on the personalised model. {PROMPT_TIP}

**Change:** *Prompt (subject CLIP)*, *Negative prompt*, `seed`, `steps`, `cfg`, image size.""",
    "SubjectHyperNet_HMCFGKSampler": f"""Type the prompt once in *Prompt*: it feeds the base CLIP and the subject CLIP. {PROMPT_TIP}
*HM-CFG KSampler*: prompt guidance on the base model plus a subject term from the LoRA model.

**Change:** *Prompt*, *Negative prompt*, `cfg_text` (like cfg), `cfg_subject` (0 = base model only), `seed`, `steps`, image size.""",
    "SubjectHyperNet_HMCFGGuider": f"""Type the prompt once in *Prompt*: it feeds the base CLIP and the subject CLIP. {PROMPT_TIP}
*HM-CFG Guider* plugs into the core *SamplerCustomAdvanced*; seed, sampler and steps sit in the nodes beside it.

**Change:** *Prompt*, *Negative prompt*, `cfg_text`, `cfg_subject` (0 = base model only), `noise_seed`, `steps`, image size.""",
}

OUTPUT_NOTES = {
    "image": """The image is saved to `ComfyUI/output/subject_hypernet/`.

**Change:** `filename_prefix`.""",
    "lora": """*Save Subject LoRA* writes `models/loras/<prefix>_00001.safetensors` (a standard LoRA: core *Load LoRA*, A1111 and diffusers read it) and the ~100 KB compact form to `models/subject_loras/`; nothing is overwritten.

**Change:** `filename_prefix`.""",
    "both": """The image is saved to `ComfyUI/output/subject_hypernet/`; *Save Subject LoRA* writes the finetuned LoRA to `models/loras/` (core *Load LoRA* reads it).

**Change:** `filename_prefix`.""",
    "both_tuned": """The image is saved to `ComfyUI/output/subject_hypernet/`; *Save Subject LoRA* writes the tuned LoRA to `models/loras/` (core *Load LoRA* reads it) and its word embedding to `models/embeddings/` (`embedding:<name>` in core text nodes).

**Change:** `filename_prefix`.""",
}


def notes_for(name: str, api: dict) -> dict[str, str]:
    types = {n["class_type"] for n in api.values()}
    sdxl = name.startswith(SDXL_PREFIX)
    reference = REFERENCE_NOTE.format(
        title=name, summary=SUMMARIES[name.removeprefix(SDXL_PREFIX)], family="SDXL" if sdxl else "SD1.5",
        sdxl_training="; `--preset sdxl --backbone` your SDXL checkpoint" if sdxl else "", hypernet=widget_of(api, "SubjectHyperNet_LoadHyperNet", "hypernet_name"),
        clip_vision=widget_of(api, "CLIPVisionLoader", "clip_name"), checkpoint=widget_of(api, "CheckpointLoaderSimple", "ckpt_name"))
    tuned = "SubjectHyperNet_SubjectTuning" in types
    notes = {"reference": reference,
             "subject": FINETUNE_NOTE if "SubjectHyperNet_RankRelaxedFinetune" in types else TUNING_NOTE if tuned else SUBJECT_NOTE}
    sampler = next((t for t in SAMPLING_NOTES if t in types), None)
    if sampler:
        notes["sampling"] = SAMPLING_NOTES[sampler]
    saves_image, saves_lora = "SaveImage" in types, "SubjectHyperNet_SaveSubjectLora" in types
    notes["output"] = OUTPUT_NOTES[("both_tuned" if tuned else "both") if saves_image and saves_lora else "image" if saves_image else "lora"]
    return notes


def body_size(node: dict, spec: dict) -> list[int]:
    """A body at least as large as the front end's own minimum (slots, then one row per widget).

    Text boxes get room for a few lines, unless a link feeds them (the front end then only greys them out).
    """
    linked = {i["name"] for i in node["inputs"] if "widget" in i}
    widgets = [i for i in spec["inputs"] if i["type"] in WIDGET_TYPES and not i["force_input"]]
    rows = max(len([i for i in node["inputs"] if "widget" not in i]), len(node["outputs"]))
    height = rows * SLOT_HEIGHT + sum(TEXT_BOX_HEIGHT if i["multiline"] else WIDGET_HEIGHT * (1 + i["control"] + i["upload"]) for i in widgets)
    height += 0 if any(i["multiline"] for i in widgets) else 14 if widgets else 6
    width, preferred_height = PREFERRED_SIZE.get(node["type"], (DEFAULT_WIDTH, 0))
    if any(i["multiline"] and i["name"] in linked for i in widgets):
        preferred_height = 0
    return [width, max(height, preferred_height)]


def note_height(text: str, width: int) -> int:
    """Height a Markdown note needs for its text (10 px type, ~5.5 px a character), with a margin."""
    per_line = max(1, int((width - 30) / 5.5))
    height = 56
    for line in text.splitlines():
        height += 6 if not line.strip() else 26 if line.startswith("#") else 13 * math.ceil(len(line) / per_line)
    return height


def layout(name: str, api: dict, ui: dict, specs: dict) -> dict:
    """Place the nodes by stage and column, add a note and a group per stage, and store the opening view."""
    stages = LAYOUTS[name.removeprefix(SDXL_PREFIX)]
    placed = [n for stage in stages.values() for column in stage for n in column]
    if sorted(placed) != sorted(int(k) for k in api):
        raise SystemExit(f"{name}: LAYOUTS places {sorted(placed)}, the API twin has {sorted(int(k) for k in api)}")
    by_id = {node["id"]: node for node in ui["nodes"]}
    for node in ui["nodes"]:
        node["size"] = body_size(node, specs[node["type"]])
    notes = notes_for(name, api)
    x, top = 0, 0
    groups, note_nodes = [], []
    for index, (stage, columns) in enumerate(stages.items()):
        widths = [max(by_id[n]["size"][0] for n in column) for column in columns]
        inner_width = sum(widths) + GAP_X * (len(columns) - 1)
        note = {"id": 100 + index, "type": "MarkdownNote", "title": "Read me", "pos": [x + GROUP_PAD, top + GROUP_TITLE + TITLE_HEIGHT],
                "size": [inner_width, note_height(notes[stage], inner_width)], "flags": {}, "order": len(ui["nodes"]) + index,
                "mode": 0, "inputs": [], "outputs": [], "properties": {}, "widgets_values": [notes[stage]],
                "color": "#432", "bgcolor": "#653"}
        note_nodes.append(note)
        column_top = note["pos"][1] + note["size"][1] + GAP_Y + TITLE_HEIGHT
        column_x, bottom = x + GROUP_PAD, column_top
        for column, width in zip(columns, widths):
            y = column_top
            for node_id in column:
                by_id[node_id]["pos"] = [column_x, y]
                y += by_id[node_id]["size"][1] + GAP_Y + TITLE_HEIGHT
            bottom = max(bottom, y - GAP_Y - TITLE_HEIGHT)
            column_x += width + GAP_X
        label, color = STAGES[stage]
        groups.append({"id": index + 1, "title": f"{index + 1} · {label}", "bounding": [x, top, inner_width + 2 * GROUP_PAD, bottom - top + GROUP_PAD],
                       "color": color, "font_size": 24, "flags": {}})
        x += inner_width + 2 * GROUP_PAD + STAGE_GAP
    # stages of different heights: every group as tall as the tallest
    height = max(g["bounding"][3] for g in groups)
    for group in groups:
        group["bounding"][3] = height
    ui["nodes"] += note_nodes
    ui["last_node_id"] = max(n["id"] for n in ui["nodes"])
    ui["groups"] = groups
    ui["extra"] = {"ds": opening_view(x - STAGE_GAP, height)}
    return ui


def opening_view(width: float, height: float) -> dict:
    """The whole graph if it fits at a zoom that draws text, else its left part (reference first) at MIN_SCALE."""
    scale = min(MAX_SCALE, VIEW_SIZE[0] / width, VIEW_SIZE[1] / height)
    scale = round(max(scale, MIN_SCALE), 3)
    return {"scale": scale, "offset": [round(VIEW_ORIGIN[0] / scale, 1), round(VIEW_ORIGIN[1] / scale, 1)]}


def main(names: list[str]) -> None:
    apis = {p.stem: json.loads(p.read_text()) for p in sorted((REPO / "workflows" / "api").glob("*.json")) if not names or p.stem in names}
    unknown = sorted(set(names) - set(apis))
    if unknown:
        raise SystemExit(f"no workflows/api/<name>.json for: {', '.join(unknown)}")
    types = sorted({n["class_type"] for api in apis.values() for n in api.values()})
    with tempfile.TemporaryDirectory() as work:
        report = run_in_comfyui(ensure_comfyui(), Path(work), models={}, prompts=[], code=NODE_SPECS_CODE + "\nresult = node_specs", node_types=types)
    specs = report["code_result"]
    for name, api in apis.items():
        ui = layout(name, api, api_to_ui(api, specs), specs)
        (REPO / "workflows" / f"{name}.json").write_text(json.dumps(ui, indent=2) + "\n")
        print("wrote", f"workflows/{name}.json", "view", ui["extra"]["ds"])


if __name__ == "__main__":
    main(sys.argv[1:])
