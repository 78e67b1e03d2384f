"""The real ComfyUI server (main.py --cpu) with the pack installed: HTTP API, errors, and the web front end."""

from __future__ import annotations

import io
import itertools
import json
import time
import urllib.parse
from pathlib import Path

import pytest
from PIL import Image

from testkit.comfyui.browser import Browser, chromium_path, load_workflow, open_comfyui, show_whole_graph
from testkit.comfyui.harness import ComfyServer
from testkit.comfyui.pytest_fixtures import comfyui_required
from testkit.comfyui.workflow_format import UI_ONLY_TYPES, strip_meta
from tests.conftest import prepare_work_dir
from hypernet.files import COMFYUI_HYPERNET_NAME
from tests.nodes.test_comfyui_workflows import ALL_WORKFLOWS, HMCFG, KSAMPLER, WORKFLOWS, bad_variant, load, shrink

pytestmark = pytest.mark.comfyui
REPO = Path(__file__).resolve().parents[2]
WORKFLOW_DIR = REPO / "workflows"
# Screenshots of every shipped workflow as the front end opens it, for a person to look at.
ARTIFACTS = REPO / ".cache" / "artifacts" / "workflows"


def frontend_static() -> Path:
    import comfyui_frontend_package

    return Path(comfyui_frontend_package.__file__).parent / "static"


@pytest.fixture(scope="module")
def server(comfyui_root, comfy_models, bad_hypernets, tmp_path_factory):
    work = tmp_path_factory.mktemp("comfy_server")
    models = prepare_work_dir(work, comfy_models)
    with ComfyServer(comfyui_root, work, models, front_end_root=frontend_static()) as running:
        yield running


def test_server_runs_a_workflow_reports_errors_and_keeps_serving(server):
    good = shrink(load(KSAMPLER), "server")
    entry = server.run_prompt(good)
    assert entry["status"]["status_str"] == "success", entry["status"]
    image = entry["outputs"]["11"]["images"][0]  # the SaveImage node
    assert (server.work_dir / "output" / image["subfolder"] / image["filename"]).stat().st_size > 0

    # a hypernetwork for another base model: the execution error names our node and says why
    entry = server.run_prompt(bad_variant(load(KSAMPLER), "server", "for_another_model.safetensors"))
    assert entry["status"]["status_str"] == "error"
    error = next(data for event, data in entry["status"]["messages"] if event == "execution_error")
    assert error["node_type"] == "SubjectHyperNet_PredictSubjectLora" and "trained for another base model" in error["exception_message"]

    # a hypernetwork that is not installed is refused by validation (HTTP 400, per-node errors), saying where
    # the file goes and how to make one
    missing = shrink(load(KSAMPLER), "server")
    missing["3"]["inputs"]["hypernet_name"] = "no_such_file.safetensors"
    reply = server.run_prompt(missing)
    assert reply["http_status"] == 400 and list(reply["node_errors"]) == ["3"]
    message = " ".join(error["details"] for error in reply["node_errors"]["3"]["errors"])
    hypernets = str(server.models["hypernets"][0].resolve())
    for needed in (f"no hypernetwork 'no_such_file.safetensors' in {hypernets}", "python -m training.train", COMFYUI_HYPERNET_NAME, "press R"):
        assert needed in message, message

    # and the server still serves
    again = shrink(load(KSAMPLER), "server_again")
    again["9"]["inputs"]["seed"] = 7
    assert server.run_prompt(again)["status"]["status_str"] == "success"
    info = server.get("/object_info/SubjectHyperNet_PredictSubjectLora")
    assert info["SubjectHyperNet_PredictSubjectLora"]["display_name"] == "Predict Subject LoRA"


def test_template_browser_lists_the_workflows_under_human_titles_with_thumbnails(server):
    # ComfyUI lists <pack>/workflows/*.json. Front end 1.32.9 (useTemplateWorkflows) titles a custom-node template
    # by its file name (getTemplateTitle: title ?? name; no title is read from anywhere else) and shows
    # /api/workflow_templates/<pack>/<name>.jpg as its thumbnail (getTemplateThumbnailUrl)
    listed = server.get("/workflow_templates")["comfyui-subject-hypernet"]
    assert sorted(listed) == sorted(ALL_WORKFLOWS)
    assert all(" " in name and name[0].isupper() for name in listed), listed  # titles, not identifiers
    for name in ALL_WORKFLOWS:
        base = f"/api/workflow_templates/comfyui-subject-hypernet/{urllib.parse.quote(name)}"
        assert server.get(base + ".json") == json.loads((WORKFLOW_DIR / f"{name}.json").read_text())
        kind, data = server.get_bytes(base + ".jpg")
        thumbnail = Image.open(io.BytesIO(data))
        assert kind == "image/jpeg" and thumbnail.format == "JPEG", (name, kind)
        assert thumbnail.width == thumbnail.height >= 256 and len(data) < 100_000, (name, thumbnail.size, len(data))


def declared_inputs(prompt: dict, object_info: dict) -> dict:
    """The prompt as the server reads it: without _meta, and without inputs a node's definition does not declare."""
    def declared(kind):
        return {name for section in ("required", "optional") for name in object_info[kind]["input"].get(section, {})}
    return {k: {"class_type": v["class_type"], "inputs": {n: x for n, x in v["inputs"].items() if n in declared(v["class_type"])}}
            for k, v in prompt.items()}


def overlapping(nodes: list[dict]) -> list[tuple[str, str]]:
    """Pairs of nodes whose rectangles (title bar included) share area."""
    def overlap(a, b):
        return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]
    return [(a["title"], b["title"]) for a, b in itertools.combinations(nodes, 2) if overlap(a["rect"], b["rect"])]


@pytest.fixture
def chromium():
    """The browser tests need Debian's Chromium; under CI (or COMFYUI_TESTS_REQUIRED) its absence fails, never skips."""
    if chromium_path() is None:
        reason = "needs Debian's chromium and chromedriver (.ci/run installs them)"
        if comfyui_required():
            pytest.fail(reason + ": under CI a missing browser is a failure, not a skip")
        pytest.skip(reason)


def test_ui_workflows_open_readable_in_the_real_front_end(server, chromium):
    """Each shipped UI workflow in ComfyUI's front end: no missing nodes, the same graph as its API twin, the stored
    view at a zoom where text is drawn, no node on top of another, every note's text in its box. Screenshots
    (as opened, and the whole graph) go to .cache/artifacts/workflows/."""
    server.post("/settings/Comfy.TutorialCompleted", True)  # no first-run template browser over the graph
    object_info = server.get("/object_info")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with Browser(chromium_path()) as browser:
        open_comfyui(browser, server.url)
        for name in WORKFLOWS:
            workflow = json.loads((WORKFLOW_DIR / f"{name}.json").read_text())
            result = load_workflow(browser, workflow, name)
            assert result["missing"] == [], (name, result["missing"])
            assert len(result["types"]) == len(workflow["nodes"])
            # the front end's own conversion of the UI file equals the API twin the tests execute (notes are UI only;
            # inputs the server does not declare, like Preview as Text's own display widget, it ignores)
            assert declared_inputs(result["output"], object_info) == strip_meta(load(name)), name
            assert any(t in UI_ONLY_TYPES for t in result["types"]), name

            # readable on open: the stored view, zoomed in past the front end's low-quality threshold (below it,
            # nodes are drawn as boxes without titles or widgets), with the first stage in sight
            assert [result["scale"], result["offset"]] == [workflow["extra"]["ds"]["scale"], workflow["extra"]["ds"]["offset"]]
            assert 0 < result["lod_threshold"] <= result["scale"] and not result["low_quality"], (name, result["scale"], result["lod_threshold"])
            first = min(result["groups"], key=lambda g: g["rect"][0])
            corner = [(first["rect"][i] + result["offset"][i]) * result["scale"] for i in (0, 1)]
            assert 0 <= corner[0] < result["canvas"][0] / 2 and 0 <= corner[1] < result["canvas"][1] / 2, (name, first["title"], corner)

            # nothing hidden: no node overlaps another, by the front end's geometry after it grew nodes to fit their widgets
            assert overlapping(result["nodes"]) == [], name
            time.sleep(1.0)  # text boxes and notes are HTML over the canvas
            browser.screenshot(ARTIFACTS / f"{name}.png")

            show_whole_graph(browser, (70, 130, 1500, 700))
            time.sleep(1.0)
            browser.screenshot(ARTIFACTS / f"{name} (whole graph).png")
            clipped = browser.evaluate("""Array.from(document.querySelectorAll('.comfy-markdown .ProseMirror'))
                .filter(e => e.offsetParent !== null && e.lastElementChild)
                .map(e => [e.innerText.slice(0, 40), e.lastElementChild.getBoundingClientRect().bottom - e.getBoundingClientRect().bottom])
                .filter(([text, below]) => below > 1)""")
            assert clipped == [], (name, clipped)  # text running past the bottom of its note
        page_text = browser.evaluate("document.body.innerText")
        assert "missing" not in page_text.lower(), page_text[:500]
    print(f"screenshots of the opened workflows: {ARTIFACTS}")
    for name in WORKFLOWS:
        assert (ARTIFACTS / f"{name}.png").stat().st_size > 10_000


def test_a_run_from_the_front_end_shows_the_image_and_the_hypernetwork_info_without_overlaps(server, chromium):
    """Queue a shipped workflow as a user does (widgets shrunk for the CPU): the saved image appears in Save Image,
    Load HyperNet's info in HyperNet info, and the grown nodes still overlap nothing."""
    name = HMCFG
    workflow = json.loads((WORKFLOW_DIR / f"{name}.json").read_text())
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with Browser(chromium_path()) as browser:
        open_comfyui(browser, server.url)
        load_workflow(browser, workflow, name)
        browser.evaluate("""(async () => {
            for (const node of window.app.graph._nodes)
                for (const widget of node.widgets ?? []) {
                    if (["width", "height"].includes(widget.name)) widget.value = 64;
                    if (widget.name === "steps") widget.value = 2;
                }
            await window.app.queuePrompt(0, 1);
            return true;
        })()""")
        info_node = next(n["id"] for n in workflow["nodes"] if n.get("title") == "HyperNet info")
        save_node = next(n["id"] for n in workflow["nodes"] if n["type"] == "SaveImage")
        shown = f"""(() => {{
            const info = window.app.graph.getNodeById({info_node}).widgets.find(w => w.name === "preview").value;
            const save = window.app.graph.getNodeById({save_node});
            return {{info, image: !!(save.imgs?.length && save.imgs.every(i => i.complete && i.naturalWidth > 0))}};
        }})()"""
        show_whole_graph(browser, (70, 130, 1500, 700))  # the front end loads an output image when its node is drawn
        browser.wait_for(f"(() => {{ const s = {shown}; return s.info && s.image; }})()", timeout=300)
        assert browser.evaluate(shown)["info"].startswith(f"{COMFYUI_HYPERNET_NAME}: base sd15,")
        time.sleep(1.0)
        geometry = browser.evaluate("window.app.graph._nodes.map(n => ({title: n.title, rect: Array.from(n.boundingRect)}))")
        assert overlapping(geometry) == []
        browser.screenshot(ARTIFACTS / f"{name} (after a run).png")
    print(f"screenshot after a run: {ARTIFACTS / f'{name} (after a run).png'}")


def test_template_browser_shows_each_workflow_by_title_with_its_thumbnail(server, chromium):
    """The front end's own template browser, opened on this pack: one card per workflow, titled by its file name,
    its thumbnail loaded."""
    with Browser(chromium_path()) as browser:
        open_comfyui(browser, server.url)
        browser.evaluate("window.app.extensionManager.command.execute('Comfy.BrowseTemplates').then(() => true)")
        pack = "Array.from(document.querySelectorAll('.p-dialog *')).filter(e => e.children.length === 0 && e.textContent.trim() === 'comfyui-subject-hypernet')"
        browser.wait_for(f"{pack}.length > 0", timeout=60)
        browser.evaluate(f"{pack}[0].click(), true")
        cards = """Array.from(document.querySelectorAll('.p-dialog h3')).map(h => {
            let card = h; while (card && !card.querySelector('img')) card = card.parentElement;
            const image = card && card.querySelector('img');
            return {title: h.textContent.trim(), thumbnail: !!image && image.complete ? image.naturalWidth : 0};
        })"""
        browser.wait_for(f"{cards}.filter(c => c.thumbnail > 0).length >= {len(WORKFLOWS)}", timeout=60)
        shown = {card["title"]: card["thumbnail"] for card in browser.evaluate(cards)}
        browser.screenshot(ARTIFACTS / "template browser.png")
    assert {name: shown.get(name) for name in WORKFLOWS} == {name: 512 for name in WORKFLOWS}, shown
