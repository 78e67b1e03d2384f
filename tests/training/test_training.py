"""`python -m training.train`: CLI, demo run and exports, exact resume after a kill, bad inputs, 2-process run."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hypernet import expand_compact_subject_lora, load_hypernet, load_subject_lora
from training.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
FAST = ["--preset", "tiny", "--synthetic-subjects", "6", "--synthetic-images-per-subject", "2", "--sample-steps", "2", "--sample-subjects", "1"]


def train(*args, cwd=REPO, timeout=600, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "training.train", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_help_documents_every_option_with_its_default():
    text = train("--help").stdout
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        assert flag in text, flag
    assert "(default: 0.001)" in text and "--preset {demo,sd15,sdxl,tiny,tiny-sdxl}" in text


def test_demo_run_exports_what_the_nodes_load(tmp_path):
    result = train(*FAST, "--max-steps", "12", "--log-every", "4", "--output-dir", str(tmp_path))
    assert "tiny and randomly initialised" in result.stdout or "small and randomly initialised" in result.stdout
    hypernet, info = load_hypernet(tmp_path / "hypernet.safetensors")
    assert info.provenance["steps"] == 12 and info.config.features.dim == 32
    standard, _ = load_subject_lora(tmp_path / "subject_lora.safetensors")
    compact, layers, _ = expand_compact_subject_lora(tmp_path / "subject_lora.compact.safetensors")
    assert layers == hypernet.layers
    assert all(torch.allclose(standard.delta(n), compact.delta(n), atol=1e-7) for n in compact.names)
    assert (tmp_path / "samples" / "final.png").stat().st_size > 0
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [4, 8, 12] and all(r["loss"] == r["loss"] for r in rows)  # no NaN
    assert rows[-1]["reg"] > 0  # the hypernetwork moved away from its zero start
    for path in (tmp_path / "hypernet.safetensors", tmp_path / "samples" / "final.png"):
        assert str(path) in result.stdout
    # a tiny-backbone hypernetwork is not for ComfyUI's SD1.5 example workflows, and the trainer says so
    assert result.stdout.strip().splitlines()[-1].startswith(f"for ComfyUI: {tmp_path / 'hypernet.safetensors'} is for base 'sd15-tiny'")


def test_demo_preset_trains_on_the_shipped_pretrained_toy_model(tmp_path):
    result = train("--preset", "demo", "--max-steps", "3", "--log-every", "1", "--synthetic-subjects", "3", "--synthetic-images-per-subject", "2",
                   "--sample-subjects", "1", "--sample-steps", "2", "--output-dir", str(tmp_path))
    assert "toy-world model" in result.stdout
    _, info = load_hypernet(tmp_path / "hypernet.safetensors")
    assert info.config.features.encoder.startswith("toy-world CLIP vision") and info.config.width == 128
    assert info.provenance["backbone"] == "toy" and (tmp_path / "samples" / "final.png").stat().st_size > 0
    # the grid shows subjects the hypernetwork never trained on
    assert "held-out subjects" in result.stdout
    trained = {p.name for p in (tmp_path / "synthetic_data").iterdir() if p.is_dir()}
    shown = {p.name for p in (tmp_path / "synthetic_heldout").iterdir() if p.is_dir()}
    assert len(shown) == 1 and len(trained) == 3 and not shown & trained


def test_killed_run_resumes_with_the_same_loss_trajectory(tmp_path):
    args = [*FAST, "--max-steps", "40", "--checkpoint-every", "5", "--log-every", "1", "--sample-subjects", "0"]
    reference = tmp_path / "reference"
    train(*args, "--output-dir", str(reference))
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "training.train", *args, "--output-dir", str(killed)], cwd=REPO, env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill hard once a checkpoint exists and the run is past it
        if (killed / "checkpoint.pt").exists() and (killed / "metrics.jsonl").exists() and len(metrics(killed)) >= 12:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    steps_before = len(metrics(killed))
    assert 12 <= steps_before < 40, "the run must be killed mid-way"
    train(*args, "--output-dir", str(killed), "--resume")
    expected, resumed = metrics(reference), metrics(killed)
    assert [r["step"] for r in resumed] == list(range(1, 41))
    for a, b in zip(expected, resumed):
        assert (a["step"], a["loss"], a["reg"]) == (b["step"], b["loss"], b["reg"])


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "training.train", *FAST, "--max-steps", "100000", "--checkpoint-every", "0", "--output-dir", str(tmp_path)],
                               cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (tmp_path / "metrics.jsonl").exists() and time.time() < deadline:  # inside the training loop
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output[-2000:]
    assert "continue with --resume" in output
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] > 0


@pytest.mark.parametrize("args, message", [
    (["--backbone", "/nonexistent/model.safetensors"], "backbone: checkpoint: file not found"),
    (["--data", "/nonexistent/folder"], "data: data folder not found"),
    (["--image-encoder", "/nonexistent/clip.safetensors"], "image encoder: image encoder not found: /nonexistent/clip.safetensors"),
])
def test_bad_inputs_fail_fast_with_a_clear_message(tmp_path, args, message):
    started = time.time()
    result = train(*FAST, "--output-dir", str(tmp_path), *args, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "checkpoint.pt").exists()
    assert time.time() - started < 120


def test_swapped_and_corrupt_files_are_refused(tmp_path):
    run = tmp_path / "run"
    train(*FAST, "--max-steps", "1", "--sample-subjects", "0", "--output-dir", str(run))
    lora = run / "subject_lora.safetensors"
    result = train(*FAST, "--backbone", str(lora), "--output-dir", str(tmp_path / "a"), check=False)
    assert "is a LoRA: expected a single-file SD1.5 or SDXL checkpoint" in result.stderr
    result = train(*FAST, "--image-encoder", str(lora), "--output-dir", str(tmp_path / "b"), check=False)
    assert "expected a CLIP vision .safetensors" in result.stderr
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes((run / "hypernet.safetensors").read_bytes()[:100])
    result = train(*FAST, "--backbone", str(broken), "--output-dir", str(tmp_path / "c"), check=False)
    assert "corrupt or truncated" in result.stderr or "not a valid safetensors" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    result = train(*FAST, "--data", str(empty), "--output-dir", str(tmp_path / "d"), check=False)
    assert "no readable images in" in result.stderr
    # resuming with another image encoder is refused before training
    result = train(*FAST, "--max-steps", "2", "--hidden-state", "image_embeds", "--resume", "--output-dir", str(run), check=False)
    assert "--resume: the checkpoint was trained with --hidden-state 'penultimate_hidden_states' (asked: 'image_embeds')" in result.stderr


def test_two_process_cpu_run_with_accelerate(tmp_path):
    # accelerate's multi-process launcher (torchrun); on a machine without GPUs the trainer selects gloo on the CPU
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "training.train", *FAST, "--max-steps", "4",
               "--log-every", "1", "--sample-subjects", "0", "--output-dir", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training on 2 process(es)" in result.stdout
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    load_hypernet(tmp_path / "hypernet.safetensors")


@pytest.mark.parametrize("options", [
    # the tuning-encoder option, learned aux bases, accumulation and checkpointing together
    ["--token-embedding", "--nn-weight", "0.1", "--learned-aux", "--grad-accum", "2", "--gradient-checkpointing", "--iterations", "1"],
    # plain rank-r factors, UNet-only targets, bf16 compute on the CPU, penalty on the raw numbers
    ["--output", "lora", "--lora-rank", "2", "--text-encoder-targets", "false", "--mixed-precision", "bf16", "--reg-target", "params"],
])
def test_objective_and_engineering_options_train(tmp_path, options):
    train(*FAST, "--max-steps", "3", "--log-every", "1", "--sample-subjects", "0", "--output-dir", str(tmp_path), *options)
    rows = metrics(tmp_path)
    assert len(rows) == 3 and all(r["loss"] == r["loss"] for r in rows)
    hypernet, info = load_hypernet(tmp_path / "hypernet.safetensors")
    if "--token-embedding" in options:
        assert "nn" in rows[-1] and info.config.token_embedding_dim == 32 and info.config.lidb.learned_aux
        assert not (tmp_path / "subject_lora.compact.safetensors").exists()  # learned aux: standard form only
        from hypernet.files import load_subject_embedding

        # the export's subject LoRA carries the predicted word embedding, and a textual-inversion file holds it alone
        in_lora, alone = load_subject_embedding(tmp_path / "subject_lora.safetensors"), load_subject_embedding(tmp_path / "subject_embedding.safetensors")
        assert in_lora.word == alone.word == "sks" and in_lora.vectors.shape == (1, 32) and torch.equal(in_lora.vectors, alone.vectors)
        assert info.provenance["placeholder"] == "sks"
    else:
        assert info.config.output == "lora" and not any("_text_model_" in l.name for l in info.layers)
