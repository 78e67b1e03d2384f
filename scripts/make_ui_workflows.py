"""Regenerate the UI-format workflows (workflows/*.json) from their API-format twins (workflows/api/*.json).

Node definitions come from a real ComfyUI with this pack installed, so widget order matches the front end.
    python scripts/make_ui_workflows.py                        # all of them
    python scripts/make_ui_workflows.py sdxl_save_subject_lora   # only the named ones
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "scripts")]

from comfyui_support.harness import run_in_comfyui  # noqa: E402
from comfyui_support.workflow_format import NODE_SPECS_CODE, api_to_ui  # noqa: E402
from get_comfyui import ensure_comfyui  # noqa: E402


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
        (REPO / "workflows" / f"{name}.json").write_text(json.dumps(api_to_ui(api, specs), indent=2) + "\n")
        print("wrote", f"workflows/{name}.json")


if __name__ == "__main__":
    main(sys.argv[1:])
