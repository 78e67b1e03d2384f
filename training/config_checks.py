"""Every training option checked before any work: one line naming the option and what it accepts.

Values from the command line are typed by argparse; values from a YAML file are not, so types are checked
here for both (``resume: 'false'`` is a string, not false). ``load_config`` turns a :class:`ConfigError`
into one line on stderr and exit status 2, before any data, model or output folder is touched.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from hypernet.hypernetwork import MAX_ITERATIONS


class ConfigError(ValueError):
    """A bad option value; the message names the option and the values it accepts."""


# the smallest value each integer option accepts
AT_LEAST = {
    "batch_size": 1, "grad_accum": 1, "log_every": 1, "max_steps": 1, "sample_steps": 1, "width": 1, "depth": 1, "heads": 1,
    "iterations": 1, "lidb_rank": 1, "lidb_a": 1, "lidb_b": 1, "lora_rank": 1, "synthetic_subjects": 1,
    "synthetic_images_per_subject": 1, "resolution": 8, "warmup_steps": 0, "checkpoint_every": 0, "sample_every": 0,
    "sample_subjects": 0, "seed": 0, "lidb_seed": 0, "eval_every": 0, "eval_subjects": 2,
}
POSITIVE = {"learning_rate", "nn_temperature", "timestep_bias"}  # floats > 0
NON_NEGATIVE = {"weight_decay", "reg_weight", "weight_space_weight", "nn_weight", "max_grad_norm"}  # floats >= 0
PROBABILITIES = {"flip_prob", "prompt_dropout"}  # floats in [0, 1]
NON_EMPTY = {"backbone", "image_encoder", "data", "class_word", "placeholder", "prompt_template", "output_dir"}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _describe(value) -> str:
    return f"the string {value!r}" if isinstance(value, str) else repr(value)


def yaml_numbers(loaded: dict, config_class) -> dict:
    """PyYAML (YAML 1.1) reads ``3e-4`` as a string; a number option given such a string gets the number."""
    floats = {item.name for item in dataclasses.fields(config_class) if type(item.default) is float}
    out = dict(loaded)
    for name, value in loaded.items():
        if name in floats and isinstance(value, str):
            try:
                out[name] = float(value)
            except ValueError:
                pass  # refused by check_types, naming the option
    return out


def check_types(config, from_file: dict | None = None, file_name: str = "") -> None:
    """Each value has its option's type (YAML values are not converted by argparse) and one of its choices."""
    from_file = from_file or {}
    for item in dataclasses.fields(config):
        value, kind = getattr(config, item.name), type(item.default)
        where = f" (from {file_name})" if item.name in from_file else ""
        if kind is bool:
            ok, wanted = isinstance(value, bool), "true or false (unquoted in YAML)"
        elif kind is int:
            ok, wanted = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif kind is float:
            ok, wanted = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        else:
            ok, wanted = isinstance(value, kind), f"a {kind.__name__}"
        if not ok:
            raise ConfigError(f"{flag(item.name)}{where} must be {wanted}, not {_describe(value)}")
        choices = item.metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{flag(item.name)}{where} must be one of {', '.join(choices)}, not {_describe(value)}")


def check_values(config) -> None:
    """Ranges and option combinations; run after :func:`check_types`."""
    for name, minimum in AT_LEAST.items():
        if getattr(config, name) < minimum:
            raise ConfigError(f"{flag(name)} must be an integer >= {minimum}, not {getattr(config, name)}")
    for name in POSITIVE | NON_NEGATIVE | PROBABILITIES:
        value = float(getattr(config, name))
        if not math.isfinite(value):
            raise ConfigError(f"{flag(name)} must be a finite number, not {value}")
        if name in POSITIVE and value <= 0:
            raise ConfigError(f"{flag(name)} must be > 0, not {value}")
        if name in NON_NEGATIVE and value < 0:
            raise ConfigError(f"{flag(name)} must be >= 0, not {value}")
        if name in PROBABILITIES and not 0 <= value <= 1:
            raise ConfigError(f"{flag(name)} is a probability: it must be in [0, 1], not {value}")
    for name in NON_EMPTY:
        if not getattr(config, name).strip():
            raise ConfigError(f"{flag(name)} must not be empty")
    if len(config.placeholder.split()) != 1:
        raise ConfigError(f"--placeholder must be one word (the rare identifier [V], e.g. sks), not {config.placeholder!r}")
    if "{token}" not in config.prompt_template:
        raise ConfigError(f"--prompt-template must contain {{token}} (where the placeholder goes), not {config.prompt_template!r}")
    if config.resolution % 8:
        raise ConfigError(f"--resolution must be a multiple of 8 (the VAE's downscale), not {config.resolution}")
    if config.iterations > MAX_ITERATIONS:
        raise ConfigError(f"--iterations must be <= {MAX_ITERATIONS}, not {config.iterations}")
    if config.width % config.heads:
        raise ConfigError(f"--heads must divide --width ({config.width}), not {config.heads}")
    if config.weight_space_weight > 0 and not config.preopt_dir:
        raise ConfigError("--weight-space-weight needs --preopt-dir (pre-optimised subject LoRAs from python -m training.preoptimize)")
    if config.nn_weight > 0 and not config.token_embedding:
        raise ConfigError("--nn-weight needs --token-embedding true (the loss acts on the predicted word embedding)")
    if config.learned_aux and config.output != "lidb":
        raise ConfigError("--learned-aux needs --output lidb (plain LoRA output has no aux bases)")
    if config.mixed_precision == "fp16" and not _accelerator_available():
        raise ConfigError("--mixed-precision fp16 needs a GPU (CPUs compute fp16 slowly or not at all); use bf16 or no")
    output = Path(config.output_dir).expanduser()
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output-dir {config.output_dir} is a file; give a folder")


def _accelerator_available() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
