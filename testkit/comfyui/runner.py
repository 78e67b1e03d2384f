"""Runs inside a subprocess whose sys.path starts with a ComfyUI root: loads ComfyUI headless on the CPU,
with this pack installed under a custom_nodes folder, validates and executes API-format prompts with
ComfyUI's own validator and executor, optionally runs test code, and writes a JSON report.

    python runner.py <spec.json>      (spec: see harness.run_prompts)
"""

import asyncio
import json
import os
import resource
import sys
import time
import traceback
import uuid


def main(spec_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    # ComfyUI's root first: its `nodes`, `utils`, `execution` must win over anything of the same name.
    # (this file's folder is dropped too: a helper module there must never shadow one of ComfyUI's)
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [spec["comfy_root"]] + [p for p in sys.path if p not in ("", ".", here, spec["comfy_root"], spec["repo"])]
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before anything imports comfy.model_management
    comfy.cli_args.args.disable_api_nodes = True
    import folder_paths

    folder_paths.set_output_directory(spec["output_dir"])
    folder_paths.set_input_directory(spec["input_dir"])
    folder_paths.set_temp_directory(spec.get("temp_dir") or os.path.join(spec["output_dir"], "temp"))
    for name, paths in spec["models"].items():
        for path in reversed(paths):  # is_default inserts at the front: keep the given order
            folder_paths.add_model_folder_path(name, path, is_default=True)
    folder_paths.add_model_folder_path("custom_nodes", spec["custom_nodes"], is_default=True)
    import utils.extra_config  # noqa: F401  (must precede `import nodes`)
    import execution
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))

    class ServerStub:
        """What PromptExecutor needs of PromptServer."""

        client_id = None
        last_node_id = None
        last_prompt_id = None
        sockets_metadata = {}

        def __init__(self):
            self.messages = []

        def send_sync(self, event, data, sid=None):
            if event in ("execution_error", "progress"):
                self.messages.append([event, {k: v for k, v in data.items() if k in ("node_id", "node_type", "exception_message", "value", "max", "node")}])

    server = ServerStub()
    import comfy.utils

    progress: list = []  # (value, total) of every ProgressBar update, as the web UI would receive them
    comfy.utils.set_progress_bar_global_hook(lambda value, total, *args, **kwargs: progress.append([int(value), int(total)]))
    executor = execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0})
    folders = {"output": folder_paths.get_output_directory(), "input": folder_paths.get_input_directory(),
               "temp": folder_paths.get_temp_directory()}
    report = {
        "comfyui_version": __import__("comfyui_version").__version__,
        "loaded_nodes": sorted(k for k in nodes.NODE_CLASS_MAPPINGS if k.startswith("SubjectHyperNet_")),
        # packs in our custom_nodes folder that raised on import (ComfyUI only logs those and goes on)
        "import_failures": sorted(name for name in os.listdir(spec["custom_nodes"]) if os.path.isdir(os.path.join(spec["custom_nodes"], name))
                                  and name != "__pycache__" and name not in nodes.LOADED_MODULE_DIRS),
        "prompts": [],
    }
    for item in spec["prompts"]:
        # an item is a prompt, or {"prompt": ..., "reset": bool} to choose per prompt whether caches are cleared
        prompt, reset = (item["prompt"], item.get("reset", spec.get("reset_between"))) if "prompt" in item else (item, spec.get("reset_between"))
        prompt_id = str(uuid.uuid4())
        start = time.perf_counter()
        valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        entry = {"valid": bool(valid[0]), "error": valid[1], "node_errors": valid[3]}
        if valid[0]:
            if reset:
                executor.reset()
            server.messages = []
            progress.clear()
            executor.execute(prompt, prompt_id, {}, valid[2])
            errors = [data for event, data in executor.status_messages if event == "execution_error"]
            outputs = executor.history_result.get("outputs", {})
            entry.update({
                "success": executor.success,
                "execution_error": {k: errors[0].get(k) for k in ("node_id", "node_type", "exception_type", "exception_message", "traceback")} if errors else None,
                "outputs": outputs,
                "images": [os.path.join(folders[image.get("type", "output")], image.get("subfolder", ""), image["filename"])
                           for node in outputs.values() for image in node.get("images", []) if isinstance(image, dict) and "filename" in image],
                "progress": list(progress),
            })
        entry["seconds"] = time.perf_counter() - start
        entry["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        entry["rss_mb"] = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20
        report["prompts"].append(entry)
    if spec.get("code"):
        context = {"report": report, "spec": spec, "executor": executor}
        try:
            exec(compile(spec["code"], "<test code>", "exec"), context)
            report["code_result"] = context.get("result")
        except Exception:
            report["code_error"] = traceback.format_exc()
    with open(spec["report_path"], "w") as handle:
        json.dump(report, handle, default=str)


if __name__ == "__main__":
    main(sys.argv[1])
