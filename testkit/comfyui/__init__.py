"""Running this pack inside a real ComfyUI tree: ``harness`` (in-process runner and real server), ``runner.py``
(the script the harness starts), ``fixtures`` (random model files in the real formats), ``workflow_format``,
``browser`` (the front end in headless Chromium), ``test_only_nodes`` (a second node pack installed beside
this one) and ``pytest_fixtures`` (registered by tests/conftest.py)."""
