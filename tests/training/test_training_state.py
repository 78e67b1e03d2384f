"""A training run's state is never lost or mislabelled: re-runs, resumes with changed settings, signals during
sample grids, metrics and checkpoint writes, damaged leftovers. Runs are in-process (tiny preset, a few steps)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import training.train as train_module
from training.checkpoint import save_checkpoint as real_save_checkpoint
from training.config import load_config
from training.inputs import open_dataset

REPO = Path(__file__).resolve().parents[2]
FAST = ["--preset", "tiny", "--synthetic-subjects", "6", "--synthetic-images-per-subject", "2", "--sample-steps", "2",
        "--log-every", "1", "--batch-size", "2"]


def train(out: Path, *flags: str):
    train_module.main([*FAST, "--output-dir", str(out), *flags])  # as the command line: refusals and stops exit with their status


def refused(capsys, out: Path, *flags: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train(out, *flags)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def checkpoint(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", weights_only=True)


# ------------------------------------------------------------------------------ re-runs

def test_rerun_into_a_run_folder_is_refused_and_overwrite_starts_over(tmp_path, capsys):
    train(tmp_path, "--max-steps", "2", "--sample-subjects", "0")
    before = (tmp_path / "checkpoint.pt").read_bytes(), (tmp_path / "metrics.jsonl").read_text()
    message = refused(capsys, tmp_path, "--max-steps", "3", "--sample-subjects", "0")
    assert f"--output-dir {tmp_path} already holds a training run" in message and "--resume" in message and "--overwrite" in message
    assert ((tmp_path / "checkpoint.pt").read_bytes(), (tmp_path / "metrics.jsonl").read_text()) == before  # nothing touched
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "step_000100.png").write_bytes(b"old grid")
    (tmp_path / "notes.txt").write_text("mine")
    train(tmp_path, "--max-steps", "3", "--sample-subjects", "0", "--overwrite")
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3] and checkpoint(tmp_path)["step"] == 3
    assert not (tmp_path / "samples").exists() and (tmp_path / "notes.txt").read_text() == "mine"  # only the run's own files go
    assert "--resume and --overwrite contradict" in refused(capsys, tmp_path, "--resume", "--overwrite")


def test_run_raises_typed_errors_and_only_main_turns_them_into_an_exit_status(tmp_path, capsys):
    from training.errors import InputError, RunRefused, TrainingError

    with pytest.raises(RunRefused, match="--resume and --overwrite contradict") as refusal:
        train_module.run(load_config([*FAST, "--output-dir", str(tmp_path), "--resume", "--overwrite"]))
    assert isinstance(refusal.value, TrainingError) and refusal.value.exit_code == 2
    with pytest.raises(InputError, match="^data: data folder not found"):
        train_module.run(load_config([*FAST, "--output-dir", str(tmp_path), "--data", str(tmp_path / "missing")]))
    assert capsys.readouterr().err == ""  # nothing printed by the library
    with pytest.raises(SystemExit) as exit_info:
        train_module.main([*FAST, "--output-dir", str(tmp_path), "--data", str(tmp_path / "missing")])
    assert exit_info.value.code == 1 and capsys.readouterr().err.startswith("data: data folder not found")


def test_synthetic_data_made_with_other_settings_is_written_again(tmp_path, caplog):
    first = open_dataset(load_config([*FAST, "--output-dir", str(tmp_path)]), tmp_path)
    assert len(first.subjects) == 6
    again = open_dataset(load_config([*FAST, "--output-dir", str(tmp_path)]), tmp_path)
    assert [s.images for s in again.subjects] == [s.images for s in first.subjects]  # same settings: reused as is
    with caplog.at_level(logging.WARNING):
        other = open_dataset(load_config([*FAST, "--synthetic-subjects", "4", "--output-dir", str(tmp_path)]), tmp_path)
    assert len(other.subjects) == 4 and "was made with other settings" in caplog.text


# ------------------------------------------------------------------------------ resume with changed settings

def test_resume_applies_a_new_learning_rate_and_weight_decay(tmp_path, capsys):
    train(tmp_path, "--max-steps", "3", "--sample-subjects", "0", "--learning-rate", "1e-3")
    train(tmp_path, "--max-steps", "5", "--sample-subjects", "0", "--resume", "--learning-rate", "2.5e-4", "--weight-decay", "0.2")
    assert "--learning-rate 0.001 -> 0.00025" in capsys.readouterr().out
    assert [(r["step"], r["lr"]) for r in metrics(tmp_path)] == [(1, 1e-3), (2, 1e-3), (3, 1e-3), (4, 2.5e-4), (5, 2.5e-4)]
    groups = checkpoint(tmp_path)["optimizer"]["param_groups"]
    assert all(g["lr"] == 2.5e-4 and g["weight_decay"] == 0.2 for g in groups)
    assert json.loads((tmp_path / "config.json").read_text())["learning_rate"] == 2.5e-4


def test_cosine_schedule_warms_up_then_decays_to_zero_and_a_resume_continues_it(tmp_path):
    flags = ["--sample-subjects", "0", "--learning-rate", "1e-3", "--warmup-steps", "2", "--lr-schedule", "cosine", "--max-steps", "6"]
    train(tmp_path / "whole", *flags)
    expected = [1e-3 * f for f in (1.0, 1.0, 0.853553, 0.5, 0.146447, 0.0)]  # after each step: warm-up, then 0.5 (1 + cos(pi k / 4))
    assert [r["step"] for r in metrics(tmp_path / "whole")] == [1, 2, 3, 4, 5, 6]
    assert [r["lr"] for r in metrics(tmp_path / "whole")] == pytest.approx(expected, abs=1e-8)
    train(tmp_path / "resumed", *flags[:-1], "3")
    train(tmp_path / "resumed", *flags, "--resume")
    assert [r["lr"] for r in metrics(tmp_path / "resumed")][3:] == pytest.approx(expected[3:], abs=1e-8)  # where a 6-step run is


@pytest.mark.parametrize("flags, named", [
    (["--lidb-seed", "5"], "--lidb-seed 0 (asked: 5)"),
    (["--lidb-a", "8"], "--lidb-a 16 (asked: 8)"),
    (["--width", "32"], "--width 64 (asked: 32)"),
    (["--output", "lora"], "--output 'lidb' (asked: 'lora')"),
    (["--hidden-state", "image_embeds"], "--hidden-state 'penultimate_hidden_states' (asked: 'image_embeds')"),
    (["--seed", "3"], "--seed 0 (asked: 3)"),
])
def test_resume_refuses_settings_that_define_the_hypernetwork_by_name(tmp_path_factory, capsys, flags, named):
    out = tmp_path_factory.mktemp("resume_fixed")
    train(out, "--max-steps", "2", "--sample-subjects", "0")
    before = (out / "checkpoint.pt").read_bytes()
    message = refused(capsys, out, "--max-steps", "4", "--sample-subjects", "0", "--resume", *flags)
    assert f"--resume: the checkpoint was trained with {named}" in message and "cannot change on resume" in message
    assert (out / "checkpoint.pt").read_bytes() == before


def test_resume_below_the_checkpoint_step_is_refused_and_keeps_it(tmp_path, capsys):
    train(tmp_path, "--max-steps", "4", "--sample-subjects", "0")
    before = (tmp_path / "checkpoint.pt").read_bytes()
    assert "the checkpoint is at step 4, past --max-steps 2" in refused(capsys, tmp_path, "--max-steps", "2", "--sample-subjects", "0", "--resume")
    assert (tmp_path / "checkpoint.pt").read_bytes() == before and checkpoint(tmp_path)["step"] == 4


def test_resume_without_a_checkpoint_or_with_a_damaged_one_gives_a_message(tmp_path, capsys):
    assert f"--resume: no checkpoint in {tmp_path}" in refused(capsys, tmp_path, "--resume")
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert "checkpoint.pt cannot be read" in refused(capsys, tmp_path, "--resume")


def test_a_partial_metrics_line_and_orphan_temporary_files_are_cleaned_on_resume(tmp_path, capsys):
    train(tmp_path, "--max-steps", "3", "--sample-subjects", "0")
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 4, "denoise": 0.9')  # a kill in the middle of a line
    (tmp_path / ".checkpoint.pt.1a2b3c4d.tmp").write_bytes(b"half a checkpoint")
    train(tmp_path, "--max-steps", "5", "--sample-subjects", "0", "--resume")
    assert "dropped line 4, which is incomplete or damaged" in capsys.readouterr().out
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4, 5]
    assert not list(tmp_path.glob(".*.tmp"))


# ------------------------------------------------------------------------------ signals keep resume exact

INTERRUPTED = ["--max-steps", "6", "--checkpoint-every", "2", "--sample-every", "3", "--sample-subjects", "1"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    train(out, *INTERRUPTED)
    return out


@pytest.mark.parametrize("where", ["sample grid", "metrics write", "checkpoint write", "training step"])
def test_a_signal_anywhere_leaves_an_exactly_labelled_checkpoint(reference, tmp_path, monkeypatch, where):
    state = {"fired": False}
    original_metrics, original_grid = train_module.write_metrics, train_module.write_sample_grid

    def once(condition: bool) -> None:
        if condition and not state["fired"]:
            state["fired"] = True
            os.kill(os.getpid(), signal.SIGINT)
            if where in ("sample grid", "checkpoint write"):
                time.sleep(10)  # raised in here: in the middle of the grid / the checkpoint write

    if where == "sample grid":
        monkeypatch.setattr(train_module, "write_sample_grid", lambda path, *a: (once("step_000003" in str(path)), original_grid(path, *a))[1])
    elif where == "metrics write":  # arrives while the line for step 3 is written
        monkeypatch.setattr(train_module, "write_metrics", lambda path, record: (once(record["step"] == 3), original_metrics(path, record))[1])
    elif where == "checkpoint write":
        monkeypatch.setattr(train_module, "save_checkpoint", lambda out, s: (once(s["step"] == 4), real_save_checkpoint(out, s))[1])
    else:  # in the middle of step 3's computation: held until the step and its metrics line are done
        original = train_module.step_generator
        monkeypatch.setattr(train_module, "step_generator", lambda seed, index, process: (once(index == 2), original(seed, index, process))[1])
    with pytest.raises(SystemExit) as exit_info:
        train(tmp_path, *INTERRUPTED)
    assert state["fired"] and exit_info.value.code == 130
    label = checkpoint(tmp_path)["step"]
    assert label == (4 if where == "checkpoint write" else 3)
    assert metrics(tmp_path)[-1]["step"] == label  # the metrics line of every step in the checkpoint is there
    monkeypatch.undo()
    train(tmp_path, *INTERRUPTED, "--resume")
    expected, resumed = metrics(reference), metrics(tmp_path)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert [(r["loss"], r["reg"]) for r in resumed] == [(r["loss"], r["reg"]) for r in expected]
    final, theirs = load_file(tmp_path / "hypernet.safetensors"), load_file(reference / "hypernet.safetensors")
    assert all(torch.equal(final[k], theirs[k]) for k in theirs)


def test_sigterm_to_a_training_process_saves_a_checkpoint_and_exits_143(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "training.train", *FAST, "--sample-subjects", "0", "--max-steps", "100000",
                                "--checkpoint-every", "0", "--output-dir", str(tmp_path)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (tmp_path / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 143, output[-2000:]
    assert "interrupted (SIGTERM)" in output and "continue with --resume" in output
    label = checkpoint(tmp_path)["step"]
    assert label > 0 and metrics(tmp_path)[-1]["step"] == label


def test_an_image_damaged_mid_run_saves_a_checkpoint_and_names_the_file(tmp_path, monkeypatch, capsys):
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for index, colour in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        Image.new("RGB", (64, 64), colour).save(data / f"subject{index}.png")
    original = train_module.write_metrics

    def damage_after_step_1(path, record):
        original(path, record)
        if record["step"] == 1:
            for image in data.glob("*.png"):
                image.write_bytes(b"\x89PNG damaged")

    monkeypatch.setattr(train_module, "write_metrics", damage_after_step_1)
    with pytest.raises(SystemExit) as exit_info:
        train(tmp_path / "run", "--data", str(data), "--max-steps", "4", "--sample-subjects", "0")
    assert exit_info.value.code == 1
    output = capsys.readouterr().out
    assert "could not be read" in output and "changed after the data folder was scanned" in output and "checkpoint at step 1" in output
    assert checkpoint(tmp_path / "run")["step"] == 1
