"""Training configuration: one dataclass, overridable from a YAML file and then the command line.

Every field becomes a ``--flag`` whose help text shows its default; ``--preset NAME`` starts from a
named preset, ``--config FILE`` from a YAML file (applied after the preset), flags win over both.
The hypernetwork's hyper-parameters are the core's: an option made with ``_hyper`` names a field of
:class:`HyperNetConfig` (or, as ``lidb.NAME``, of its :class:`LidbConfig`), takes its default from there, and
:meth:`TrainConfig.hypernet_config` hands it on. Exposing a new hyper-parameter is one ``_hyper`` line.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from hypernet import FeatureSpec, HyperNetConfig, LidbConfig

from .errors import InputError


def _opt(default: Any, help: str, choices: Sequence[str] | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


_CORE_DEFAULTS = {**{item.name: item.default for item in dataclasses.fields(HyperNetConfig) if item.default is not dataclasses.MISSING},
                  **{f"lidb.{item.name}": item.default for item in dataclasses.fields(LidbConfig)}}


def _hyper(core_name: str, help: str, choices: Sequence[str] | None = None):
    """An option that is the hypernetwork's ``core_name`` (``'width'``, ``'lidb.rank'``), with the core's default."""
    return field(default=_CORE_DEFAULTS[core_name], metadata={"help": help, "choices": choices, "hypernet": core_name})


@dataclass
class TrainConfig:
    # -- inputs
    backbone: str = _opt("tiny", "Frozen backbone: a diffusers folder or single-file .safetensors checkpoint of the SD1.5 or SDXL family, "
                                 "or a preset ('tiny', 'tiny-sdxl', 'toy').")
    image_encoder: str = _opt("tiny", "Frozen image encoder: a transformers CLIP vision folder, a ComfyUI models/clip_vision .safetensors, or 'tiny'.")
    data: str = _opt("synthetic", "Folder of subject images (one subject per image or per sub-folder), or 'synthetic'.")
    synthetic_subjects: int = _opt(64, "Number of synthetic subjects when data is 'synthetic'.")
    synthetic_images_per_subject: int = _opt(4, "Images per synthetic subject.")
    class_word: str = _opt("toy", "Class word used when a subject has no class.txt.")
    placeholder: str = _opt("sks", "The rare identifier [V] that stands for the subject in prompts.")
    prompt_template: str = _opt("a photo of a {token} {class_word}", "Training prompt when a subject has no caption; {token} and {class_word} are filled in.")
    resolution: int = _opt(0, "Training resolution in pixels; 0 = the backbone's native one (SD1.5 512, SDXL 1024, the tiny/toy presets 64).")
    flip_prob: float = _opt(0.5, "Probability of a horizontal flip of the target image.")
    output_dir: str = _opt("runs/hypernet", "Where checkpoints, logs, samples and exports go.")
    # -- hypernetwork
    hidden_state: str = _opt("penultimate_hidden_states", "Image-encoder output the hypernetwork reads.", ("last_hidden_state", "penultimate_hidden_states", "image_embeds"))
    width: int = _hyper("width", "Decoder width.")
    depth: int = _hyper("depth", "Decoder layers (HyperDreamBooth: 2).")
    heads: int = _hyper("heads", "Attention heads in the decoder.")
    iterations: int = _hyper("iterations", "Refinement rounds s: theta_k = T(f, theta_{k-1}).")
    output: str = _hyper("output", "Predict LiDB trainables or plain rank-r LoRA factors.", ("lidb", "lora"))
    lidb_rank: int = _hyper("lidb.rank", "LiDB rank r.")
    lidb_a: int = _hyper("lidb.a", "LiDB aux width a (up side).")
    lidb_b: int = _hyper("lidb.b", "LiDB aux width b (down side).")
    lidb_seed: int = _hyper("lidb.seed", "Seed of the frozen LiDB aux bases.")
    learned_aux: bool = _hyper("lidb.learned_aux", "Learn the aux bases with the hypernetwork (stored in its file).")
    lora_rank: int = _hyper("lora_rank", "Rank when output is 'lora'.")
    text_encoder_targets: bool = _opt(True, "Also adapt the text encoder's attention (q, k, v, out).")
    # -- objective
    reg_weight: float = _opt(1e-3, "lambda of the L2 penalty on the hypernetwork output.")
    reg_target: str = _opt("delta_w", "What the L2 penalty measures: the weight deltas or the raw predicted numbers.", ("delta_w", "params"))
    prompt_dropout: float = _opt(0.1, "Probability of training a sample with the empty prompt.")
    timestep_bias: float = _opt(1.0, "Sampling weight of the noisier half of the timesteps relative to the other half (1 = uniform; "
                                     "3 = three quarters of the samples from the noisier half, where a subject's shape and colours are decided).")
    preopt_dir: str = _opt("", "Folder of pre-optimised per-subject compact LoRAs (python -m training.preoptimize) for the weight-space loss.")
    weight_space_weight: float = _opt(0.0, "beta of the weight-space loss toward pre-optimised LoRAs (needs preopt_dir).")
    token_embedding: bool = _opt(False, "Also predict a word embedding for the placeholder token (tuning-encoder option).")
    nn_weight: float = _opt(0.0, "Weight of the nearest-neighbour contrastive loss on the predicted embedding.")
    nn_temperature: float = _opt(0.07, "Temperature of that loss.")
    # -- optimisation
    batch_size: int = _opt(4, "Subjects per step per process.")
    grad_accum: int = _opt(1, "Gradient accumulation steps.")
    learning_rate: float = _opt(1e-4, "AdamW learning rate.")
    weight_decay: float = _opt(0.01, "AdamW weight decay.")
    warmup_steps: int = _opt(0, "Linear learning-rate warm-up steps.")
    lr_schedule: str = _opt("constant", "Learning rate after the warm-up: constant, or a half cosine down to 0 at max_steps.", ("constant", "cosine"))
    max_steps: int = _opt(1000, "Optimizer steps to train.")
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm (0 = off).")
    mixed_precision: str = _opt("no", "Backbone compute precision.", ("no", "fp16", "bf16"))
    gradient_checkpointing: bool = _opt(False, "Recompute backbone activations in backward to save memory.")
    cache_latents: bool = _opt(False, "Encode every training image once before training and keep the VAE off the training device.")
    cache_features: bool = _opt(False, "Compute every reference's image features once and keep the image encoder off the training device.")
    seed: int = _opt(0, "Seed for data order, noise, timesteps and initialisation.")
    # -- logging, checkpoints, samples
    log_every: int = _opt(10, "Steps between metric lines in metrics.jsonl.")
    checkpoint_every: int = _opt(200, "Steps between checkpoints (0 = only at the end).")
    sample_every: int = _opt(0, "Steps between sample grids (0 = only at the end).")
    sample_steps: int = _opt(20, "Sampling steps for sample grids.")
    sample_subjects: int = _opt(3, "Subjects (rows) in a sample grid (0 = no grids).")
    tensorboard: bool = _opt(False, "Also log to TensorBoard (needs the tensorboard package).")
    eval_data: str = _opt("", "Held-out subject folder for validation while training ('synthetic': held-out subjects of the synthetic world; '' = none).")
    eval_every: int = _opt(0, "Steps between validations (identity / prompt scores to metrics.jsonl, TensorBoard and validation.png; 0 = only at the end when eval_data is set).")
    eval_subjects: int = _opt(8, "Held-out subjects scored at each validation.")
    resume: bool = _opt(False, "Continue from output_dir/checkpoint.pt.")
    overwrite: bool = _opt(False, "Start over in an output_dir that holds a run: deletes its checkpoint, metrics, exports, samples and synthetic data.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hypernet_config(self, features: FeatureSpec, token_embedding_dim: int = 0) -> HyperNetConfig:
        """The run's hypernetwork: every option made with ``_hyper``, the core's defaults for the fields no option names,
        and what the models in hand decide (the image features; the word-embedding width when one is predicted)."""
        return HyperNetConfig(features=features, lidb=self.lidb_config(), token_embedding_dim=token_embedding_dim, **self._core_values(""))

    def lidb_config(self) -> LidbConfig:
        """The run's LiDB settings (every ``lidb.*`` option; the rest at the core's defaults)."""
        return LidbConfig(**self._core_values("lidb."))

    def _core_values(self, prefix: str) -> dict[str, Any]:
        """``{core field: value}`` of the options naming a field directly under ``prefix`` ('' or 'lidb.')."""
        values = {}
        for item in dataclasses.fields(self):
            core = item.metadata.get("hypernet")
            if core is not None and core.startswith(prefix) and "." not in core[len(prefix):]:
                values[core[len(prefix):]] = getattr(self, item.name)
        return values


# The options that are hypernetwork hyper-parameters, in TrainConfig's order.
HYPERNET_OPTIONS = tuple(item.name for item in dataclasses.fields(TrainConfig) if "hypernet" in item.metadata)


DEMO_STEPS = 700
PRESETS: dict[str, dict[str, Any]] = {
    # ~4 minutes on a 2-core CPU: the toy-world base model and image encoder pretrained by experiments.pretrain
    # (shipped in training/toy_model/), synthetic subjects of the same world, the study's hypernetwork size and recipe
    # (the encoder's pooled embedding, LiDB rank 4, a lighter L2: docs/study.md), fewer subjects and steps.
    "demo": dict(
        backbone="toy", image_encoder="toy", data="synthetic", synthetic_subjects=200, synthetic_images_per_subject=4,
        resolution=64, width=128, depth=2, heads=4, iterations=2, lidb_a=32, lidb_b=16, batch_size=8, learning_rate=1e-3,
        hidden_state="image_embeds", lidb_rank=4, reg_weight=3e-4,
        prompt_dropout=0.1, flip_prob=0.0, max_steps=DEMO_STEPS, log_every=25, checkpoint_every=200, sample_steps=20, output_dir="runs/demo",
    ),
    # Pipeline check in about a minute: tiny random backbone and encoder (the tests use it).
    "tiny": dict(
        backbone="tiny", image_encoder="tiny", data="synthetic", synthetic_subjects=24, synthetic_images_per_subject=3,
        resolution=64, width=64, depth=2, heads=4, iterations=2, lidb_a=16, lidb_b=16, batch_size=4, learning_rate=1e-3,
        max_steps=150, log_every=10, checkpoint_every=50, sample_steps=10, output_dir="runs/tiny",
    ),
    # The tiny preset on a tiny random SDXL-shaped backbone (two text encoders, size/crop conditioning): tests and pipeline checks.
    "tiny-sdxl": dict(
        backbone="tiny-sdxl", image_encoder="tiny", data="synthetic", synthetic_subjects=24, synthetic_images_per_subject=3,
        resolution=64, width=64, depth=2, heads=4, iterations=2, lidb_a=16, lidb_b=16, batch_size=4, learning_rate=1e-3,
        max_steps=150, log_every=10, checkpoint_every=50, sample_steps=10, output_dir="runs/tiny-sdxl",
    ),
    # SDXL at 1024 px on one 24 GB GPU: bf16 weights, gradient checkpointing, latents and image features cached
    # (VAE and image encoder off the GPU); computed ~13 GiB at batch 4 (benchmarks/sdxl_memory.py, docs/methods.md).
    "sdxl": dict(resolution=1024, width=512, depth=2, heads=8, iterations=4, batch_size=4, learning_rate=1e-4, max_steps=20000,
                 mixed_precision="bf16", gradient_checkpointing=True, cache_latents=True, cache_features=True, checkpoint_every=500,
                 sample_every=1000, sample_steps=30, output_dir="runs/sdxl"),
    # SD1.5 at 512 px with the paper's LiDB sizes; point backbone/image_encoder at your local files.
    "sd15": dict(resolution=512, width=512, depth=2, heads=8, iterations=4, batch_size=4, learning_rate=1e-4, max_steps=20000,
                 mixed_precision="bf16", gradient_checkpointing=True, checkpoint_every=500, sample_every=1000, sample_steps=30,
                 output_dir="runs/sd15"),
}


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


class _OneLineParser(argparse.ArgumentParser):
    """Errors as one line naming the option (exit status 2), not the whole usage text."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="python -m training.train",
        description="Train a subject hypernetwork end to end and export what the ComfyUI nodes load.",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), help="Start from a named preset.")
    parser.add_argument("--config", help="YAML file of options (applied after the preset).")
    for item in dataclasses.fields(TrainConfig):
        kind = type(item.default)
        flag = "--" + item.name.replace("_", "-")
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": f"{item.metadata['help']} (default: {item.default!r})"}
        if item.metadata.get("choices"):
            kwargs["choices"] = item.metadata["choices"]
        if kind is bool:
            kwargs.update(type=_parse_bool, nargs="?", const=True, metavar="BOOL")
        else:
            kwargs["type"] = kind
        parser.add_argument(flag, dest=item.name, **kwargs)
    return parser


def _read_yaml(path: str, parser: argparse.ArgumentParser) -> dict:
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as error:
        parser.error(f"--config {path}: {error.strerror or error}")
    except UnicodeDecodeError:
        parser.error(f"--config {path}: not UTF-8 text")
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        parser.error(f"--config {path}: not valid YAML{f' (line {mark.line + 1})' if mark else ''}: {getattr(error, 'problem', None) or error}")
    if not isinstance(loaded, dict):
        parser.error(f"--config {path}: expected a mapping of option: value, got {type(loaded).__name__}")
    unknown = sorted(set(map(str, loaded)) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        parser.error(f"--config {path}: unknown option(s) {', '.join(unknown)}")
    return loaded


def load_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """Preset, then YAML file, then flags; every value checked (exit status 2 with one line) before any work."""
    from .config_checks import ConfigError, check_types, check_values, yaml_numbers

    parser = build_parser()
    args = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    values: dict[str, Any] = {}
    preset = args.pop("preset", None)
    if preset:
        values.update(PRESETS[preset])
    config_path = args.pop("config", None)
    loaded = yaml_numbers(_read_yaml(config_path, parser), TrainConfig) if config_path else {}
    values.update(loaded)
    values.update(args)
    config = with_native_resolution(TrainConfig(**values))
    try:
        check_types(config, {k: v for k, v in loaded.items() if k not in args}, config_path or "")
        check_values(config)
    except ConfigError as error:
        parser.error(str(error))
    return config


def with_native_resolution(config: TrainConfig) -> TrainConfig:
    """``resolution`` 0 replaced by the backbone's native resolution (read from its config or file header)."""
    if config.resolution:
        return config
    from .backbone import native_resolution

    try:
        return dataclasses.replace(config, resolution=native_resolution(config.backbone))
    except ValueError as error:  # the backbone file cannot be read or is of an unsupported kind
        raise InputError(f"backbone: {error}") from None

