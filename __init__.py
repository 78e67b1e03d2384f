"""ComfyUI entry point of comfyui-subject-hypernet (ComfyUI imports this folder as a package)."""

import importlib.util
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parent / "hypernet"


def _import_core_as_hypernet() -> None:
    """The core is imported as ``hypernet`` in every process: by the nodes here as by ``training`` and the tests, so one
    process never holds two copies (two ``SubjectLora`` classes). Loaded from this folder without putting the whole
    repository on ``sys.path`` (its ``nodes`` folder must not shadow ComfyUI's ``nodes`` module)."""
    loaded = sys.modules.get("hypernet")
    if loaded is not None:
        origin = Path(getattr(loaded, "__file__", "") or "").resolve().parent
        if origin != CORE:
            raise ImportError(f"comfyui-subject-hypernet needs its core as the module 'hypernet', but another module of that name is "
                              f"already loaded from {origin}; remove or rename that one (another custom node or package)")
        return
    spec = importlib.util.spec_from_file_location("hypernet", CORE / "__init__.py", submodule_search_locations=[str(CORE)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["hypernet"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["hypernet"]
        raise


if importlib.util.find_spec("comfy") is not None:
    _import_core_as_hypernet()
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # imported outside ComfyUI, e.g. by pytest collecting the repository as a package
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
