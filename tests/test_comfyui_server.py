"""The real ComfyUI server (main.py --cpu) with the pack installed: HTTP API, errors, and the web front end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from comfyui_support.browser import Browser, chromium_path
from comfyui_support.harness import ComfyServer
from comfyui_support.workflow_format import strip_meta
from conftest import prepare_work_dir
from test_comfyui_workflows import ALL_WORKFLOWS, bad_variant, load, shrink

pytestmark = pytest.mark.comfyui
WORKFLOW_DIR = Path(__file__).resolve().parents[1] / "workflows"


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
    good = shrink(load("personalize_ksampler"), "server")
    entry = server.run_prompt(good)
    assert entry["status"]["status_str"] == "success", entry["status"]
    image = entry["outputs"]["11"]["images"][0]  # the SaveImage node
    assert (server.work_dir / "output" / image["subfolder"] / image["filename"]).stat().st_size > 0

    # a hypernetwork for another base model: the execution error names our node and says why
    entry = server.run_prompt(bad_variant(load("personalize_ksampler"), "server", "for_another_model.safetensors"))
    assert entry["status"]["status_str"] == "error"
    error = next(data for event, data in entry["status"]["messages"] if event == "execution_error")
    assert error["node_type"] == "SubjectHyperNet_PredictSubjectLora" and "trained for another base model" in error["exception_message"]

    # a file that does not exist is refused by validation (HTTP 400, per-node errors)
    missing = shrink(load("personalize_ksampler"), "server")
    missing["3"]["inputs"]["hypernet_name"] = "no_such_file.safetensors"
    reply = server.run_prompt(missing)
    assert reply["http_status"] == 400 and "3" in reply["node_errors"]

    # and the server still serves
    again = shrink(load("personalize_ksampler"), "server_again")
    again["9"]["inputs"]["seed"] = 7
    assert server.run_prompt(again)["status"]["status_str"] == "success"
    info = server.get("/object_info/SubjectHyperNet_PredictSubjectLora")
    assert info["SubjectHyperNet_PredictSubjectLora"]["display_name"] == "Predict Subject LoRA"


def test_template_browser_lists_and_serves_the_shipped_workflows(server):
    # ComfyUI's convention: <pack>/workflows/*.json (or example_workflows/) are listed in the template browser
    listed = server.get("/workflow_templates")
    assert sorted(listed["comfyui-subject-hypernet"]) == sorted(ALL_WORKFLOWS)
    for name in ALL_WORKFLOWS:
        served = server.get(f"/api/workflow_templates/comfyui-subject-hypernet/{name}.json")
        assert served == json.loads((WORKFLOW_DIR / f"{name}.json").read_text())


@pytest.mark.skipif(chromium_path() is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_ui_workflows_open_in_the_real_front_end_without_missing_nodes(server, tmp_path):
    server.post("/settings/Comfy.TutorialCompleted", True)  # no first-run template browser over the graph
    with Browser(chromium_path()) as browser:
        browser.goto(server.url)
        browser.wait_for("!!(window.app && window.app.graph && window.LiteGraph && window.LiteGraph.registered_node_types['SubjectHyperNet_PredictSubjectLora'])", timeout=180)
        for name in ALL_WORKFLOWS:
            workflow = json.loads((WORKFLOW_DIR / f"{name}.json").read_text())
            result = browser.evaluate(f"""(async () => {{
                await window.app.loadGraphData({json.dumps(workflow)});
                const types = window.app.graph._nodes.map(n => n.type);
                const missing = types.filter(t => !window.LiteGraph.registered_node_types[t]);
                const prompt = await window.app.graphToPrompt();
                return {{count: types.length, missing, output: prompt.output}};
            }})()""")
            assert result["missing"] == [], (name, result["missing"])
            assert result["count"] == len(workflow["nodes"])
            # the front end's own conversion of the UI file equals the API twin the tests execute
            assert strip_meta(result["output"]) == strip_meta(load(name)), name
            browser.evaluate("window.app.canvas.ds.scale = 0.65; window.app.canvas.ds.offset = [90, 110]; window.app.graph.setDirtyCanvas(true, true); true")
            browser.screenshot(tmp_path / f"{name}.png")
        page_text = browser.evaluate("document.body.innerText")
        assert "missing" not in page_text.lower(), page_text[:500]
    assert all((tmp_path / f"{n}.png").stat().st_size > 10_000 for n in ALL_WORKFLOWS)
