"""training.config: every bad option value is refused before any work, in one line naming the option, exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from training.config import PRESETS, TrainConfig, load_config

REPO = Path(__file__).resolve().parents[2]


def refusal(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        load_config(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("argv, expected", [
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, not 0"),
    (["--batch-size", "-3"], "--batch-size must be an integer >= 1, not -3"),
    (["--grad-accum", "0"], "--grad-accum must be an integer >= 1"),
    (["--log-every", "0"], "--log-every must be an integer >= 1"),
    (["--heads", "0"], "--heads must be an integer >= 1"),
    (["--heads", "3", "--width", "64"], "--heads must divide --width (64), not 3"),
    (["--lidb-a", "0"], "--lidb-a must be an integer >= 1"),
    (["--lidb-b", "-1"], "--lidb-b must be an integer >= 1"),
    (["--max-steps", "0"], "--max-steps must be an integer >= 1"),
    (["--learning-rate", "nan"], "--learning-rate must be a finite number, not nan"),
    (["--learning-rate=-1e-4"], "--learning-rate must be > 0"),
    (["--learning-rate", "0"], "--learning-rate must be > 0"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
    (["--timestep-bias", "0"], "--timestep-bias must be > 0"),
    (["--placeholder", ""], "--placeholder must not be empty"),
    (["--placeholder", "two words"], "--placeholder must be one word"),
    (["--prompt-template", "a photo of a dog"], "--prompt-template must contain {token}"),
    (["--flip-prob", "1.5"], "--flip-prob is a probability: it must be in [0, 1], not 1.5"),
    (["--prompt-dropout", "-0.1"], "--prompt-dropout is a probability: it must be in [0, 1]"),
    (["--resolution", "60"], "--resolution must be a multiple of 8"),
    (["--weight-space-weight", "0.1"], "--weight-space-weight needs --preopt-dir"),
    (["--nn-weight", "0.1"], "--nn-weight needs --token-embedding true"),
    (["--learned-aux", "--output", "lora"], "--learned-aux needs --output lidb"),
    (["--mixed-precision", "fp8"], "argument --mixed-precision: invalid choice: 'fp8'"),
    (["--batch-size", "four"], "argument --batch-size: invalid int value: 'four'"),
    (["--resume", "maybe"], "argument --resume: expected true/false, got 'maybe'"),
])
def test_bad_command_line_values_are_refused_in_one_line(capsys, argv, expected):
    assert expected in refusal(capsys, ["--preset", "tiny", *argv])


def test_fp16_needs_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert "--mixed-precision fp16 needs a GPU" in refusal(capsys, ["--mixed-precision", "fp16"])


def test_an_output_path_that_is_a_file_is_refused(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    assert f"--output-dir {tmp_path / 'file'} is a file" in refusal(capsys, ["--output-dir", str(tmp_path / "file")])


@pytest.mark.parametrize("text, expected", [
    ("resume: 'false'\n", "--resume (from {path}) must be true or false (unquoted in YAML), not the string 'false'"),
    ("mixed_precision: fp8\n", "--mixed-precision (from {path}) must be one of no, fp16, bf16, not the string 'fp8'"),
    ("batch_size: '4'\n", "--batch-size (from {path}) must be an integer, not the string '4'"),
    ("learning_rate: true\n", "--learning-rate (from {path}) must be a number, not True"),
    ("max_steps: 2.5\n", "--max-steps (from {path}) must be an integer, not 2.5"),
    ("hidden_state: pooled\n", "--hidden-state (from {path}) must be one of last_hidden_state"),
    ("batch_size: 0\n", "--batch-size must be an integer >= 1, not 0"),
    ("bacth_size: 4\n", "--config {path}: unknown option(s) bacth_size"),
    ("- batch_size\n", "--config {path}: expected a mapping of option: value, got list"),
    ("batch_size: [1\n", "--config {path}: not valid YAML (line 2)"),
])
def test_yaml_values_of_the_wrong_type_are_refused(capsys, tmp_path, text, expected):
    path = tmp_path / "options.yaml"
    path.write_text(text)
    assert expected.format(path=path) in refusal(capsys, ["--config", str(path)])


def test_a_missing_config_file_is_named(capsys, tmp_path):
    assert f"--config {tmp_path / 'nope.yaml'}: No such file or directory" in refusal(capsys, ["--config", str(tmp_path / "nope.yaml")])


def test_yaml_booleans_and_numbers_are_accepted_and_flags_win(tmp_path):
    path = tmp_path / "options.yaml"
    path.write_text("resume: false\nlearning_rate: 3e-4\nweight_decay: 0\nbatch_size: 2\nmixed_precision: bf16\n")
    config = load_config(["--config", str(path), "--batch-size", "3"])
    assert (config.resume, config.learning_rate, config.weight_decay, config.batch_size, config.mixed_precision) == (False, 3e-4, 0, 3, "bf16")


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_and_the_defaults_pass_the_checks(preset):
    assert isinstance(load_config(["--preset", preset] + (["--mixed-precision", "no"] if PRESETS[preset].get("mixed_precision") == "fp16" else [])), TrainConfig)
    assert isinstance(load_config([]), TrainConfig)


def test_refused_before_any_model_is_built_or_folder_written(tmp_path):
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "training.train", "--preset", "tiny", "--batch-size", "0", "--output-dir", str(tmp_path / "run")],
                            cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == ["python -m training.train: error: --batch-size must be an integer >= 1, not 0 (see --help)"]
    assert not (tmp_path / "run").exists() and time.time() - started < 60


def test_hypernetwork_options_are_the_cores_fields_with_the_cores_defaults():
    import dataclasses

    from hypernet import FeatureSpec, HyperNetConfig, LidbConfig
    from training.config import HYPERNET_OPTIONS

    features = FeatureSpec(dim=8, tokens=4)
    default = TrainConfig().hypernet_config(features)
    assert default == HyperNetConfig(features=features)  # every option's default is the core's
    assert HYPERNET_OPTIONS == ("width", "depth", "heads", "iterations", "output", "lidb_rank", "lidb_a", "lidb_b", "lidb_seed",
                                "learned_aux", "lora_rank")
    config = load_config(["--width", "96", "--heads", "3", "--iterations", "5", "--output", "lora", "--lora-rank", "2", "--lidb-rank", "2",
                          "--lidb-a", "7", "--lidb-b", "6", "--lidb-seed", "9", "--depth", "1"])
    assert config.hypernet_config(features, 5) == dataclasses.replace(
        default, width=96, heads=3, iterations=5, output="lora", lora_rank=2, depth=1, token_embedding_dim=5,
        lidb=LidbConfig(rank=2, a=7, b=6, seed=9))
    assert load_config(["--learned-aux"]).lidb_config() == LidbConfig(learned_aux=True)
