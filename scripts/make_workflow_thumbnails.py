"""Make the template browser's thumbnails: workflows/<name>.jpg, a screenshot of each graph.

ComfyUI's front end asks for ``/api/workflow_templates/<pack>/<name>.jpg`` beside each listed workflow and shows
it in a square. This opens every UI workflow in the real front end (ComfyUI server + comfyui-frontend-package +
headless Chromium, as the browser test does), fits the whole graph to the window, and keeps a square around the
node that sets the workflow apart (finetune, guider, sampler, or LoRA saver), as a small JPEG.
    python scripts/make_workflow_thumbnails.py                        # after scripts/make_ui_workflows.py
    python scripts/make_workflow_thumbnails.py 'Save a subject LoRA'  # only the named ones
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

from testkit.comfyui.browser import Browser, chromium_path, load_workflow, open_comfyui, show_whole_graph  # noqa: E402
from testkit.comfyui.harness import ComfyServer  # noqa: E402
from get_comfyui import ensure_comfyui  # noqa: E402

SIDE = 512  # pixels; the template browser shows thumbnails about 240 pixels square
# The node a thumbnail centres on: the first of these a workflow has.
MAIN_NODES = ["SubjectHyperNet_RankRelaxedFinetune", "SubjectHyperNet_SubjectTuning", "SubjectHyperNet_HMCFGGuider", "SubjectHyperNet_HMCFGKSampler", "KSampler",
              "SubjectHyperNet_SaveSubjectLora"]
QUALITY = 80
GRAPH_AREA = (70, 130, 1500, 640)  # where the graph is drawn in the 1600x1000 window: clear of the side and top bars


def main(only: list[str]) -> None:
    import comfyui_frontend_package

    if chromium_path() is None:
        raise SystemExit("needs Chromium (apt-get install chromium)")
    static = Path(comfyui_frontend_package.__file__).parent / "static"
    names = sorted(p.stem for p in (REPO / "workflows").glob("*.json") if not only or p.stem in only)
    if only and len(names) != len(set(only)):
        raise SystemExit(f"no workflows/<name>.json for: {sorted(set(only) - set(names))}")
    with tempfile.TemporaryDirectory() as work, ComfyServer(ensure_comfyui(), Path(work), front_end_root=static) as server:
        server.post("/settings/Comfy.TutorialCompleted", True)
        with Browser(chromium_path()) as browser:
            open_comfyui(browser, server.url)
            for name in names:
                loaded = load_workflow(browser, json.loads((REPO / "workflows" / f"{name}.json").read_text()), name)
                view = show_whole_graph(browser, GRAPH_AREA)
                time.sleep(1.0)  # text boxes and notes are HTML laid over the canvas: let them settle
                shot = Path(work) / "shot.png"
                browser.screenshot(shot, clip=view["clip"])
                image = Image.open(shot).convert("RGB")
                main = next(n for kind in MAIN_NODES for n in loaded["nodes"] if n["type"] == kind)
                centre = (main["rect"][0] + main["rect"][2] / 2 + view["offset"][0]) * view["scale"] - view["clip"][0]
                side = image.height
                left = int(min(max(centre - side / 2, 0), image.width - side))
                image = image.crop((left, 0, left + side, side)).resize((SIDE, SIDE), Image.LANCZOS)
                buffer = io.BytesIO()
                image.save(buffer, "JPEG", quality=QUALITY, optimize=True)
                (REPO / "workflows" / f"{name}.jpg").write_bytes(buffer.getvalue())
                print(f"wrote workflows/{name}.jpg ({SIDE}x{SIDE}, {len(buffer.getvalue()) // 1024} KB)")


if __name__ == "__main__":
    main(sys.argv[1:])
