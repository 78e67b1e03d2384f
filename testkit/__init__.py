"""Test helpers shared by tests/, benchmarks/ and scripts/ (not shipped in the wheel).

Importable with only the repo root on sys.path (pytest's ``pythonpath = ["."]``, or ``sys.path.insert(0, REPO)``):

- ``testkit.tiny_models``: tiny random SD1.5- / SDXL-shaped UNets and text encoders.
- ``testkit.safetensors_layout``: byte-layout cases for the safetensors readers.
- ``testkit.comfyui``: running this pack inside a real ComfyUI tree (harness, runner script, fixture files,
  workflow format, browser, the test-only node pack, pytest fixtures).
"""
