"""The toy-world study's pipeline end to end in --quick mode (checks the pipeline, not the numbers)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quick_study_runs_every_stage_and_writes_its_report(tmp_path):
    docs = tmp_path / "docs"
    result = subprocess.run([sys.executable, "-m", "experiments.study", "--out", str(tmp_path / "study"), "--quick", "--docs", str(docs)],
                            cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = (docs / "study_quick.md").read_text()
    for method in ("base model", "hypernet (L2 reg)", "hypernet (no reg)", "hypernet + HM-CFG s=2", "hypernet + finetune 4", "LoRA from scratch 8"):
        assert f"| {method}" in report, method
    results = json.loads((tmp_path / "study" / "results.json").read_text())
    summary = results["results"]["summary"]
    assert all(0.0 <= v["subject"][0] <= 1.0 and 0.0 <= v["prompt"][0] <= 1.0 for v in summary.values())
    assert set(results["reader_accuracy"]) == {"shape", "primary", "secondary", "pattern", "marking", "background", "position", "scale"}
    # the pretrained toy base model and image encoder load with the training package's own loaders
    assert (tmp_path / "study" / "base" / "model_index.json").exists() and (tmp_path / "study" / "image_encoder" / "config.json").exists()
    assert (tmp_path / "study" / "examples.png").stat().st_size > 0 and (tmp_path / "study" / "fidelity.png").stat().st_size > 0
