"""Core of comfyui-subject-hypernet: pure torch, no ComfyUI or diffusers-pipeline imports.

Modules, one concept each: ``targets`` (which layers), ``lidb`` (lightweight LoRA bases), ``lora``
(factor containers, exact combination), ``runtime`` (hooks / merges), ``hypernetwork`` (the model),
``files`` (safetensors formats), ``subject`` (a subject LoRA and its prediction), ``guidance`` (HM-CFG),
``schedule`` (DDPM noise), ``losses``, ``finetune`` (rank-relaxed finetune loop), ``tuning`` (the tuning
encoder's few-step tuning), ``dual_path`` (dual-path blending), ``words`` (the placeholder's nearest real word).
"""

from .errors import FeatureError, FileFormatError, HyperNetError, TargetMismatchError
from .files import (
    HyperNetInfo,
    expand_compact_subject_lora,
    load_compact_subject_lora,
    load_hypernet,
    load_subject_lora,
    read_hypernet_info,
    save_hypernet,
)
from .finetune import FinetuneConfig, FinetuneResult, rank_relaxed_finetune
from .guidance import hm_cfg, hm_cfg_two, in_subject_window
from .hypernetwork import FeatureSpec, HyperNetConfig, HyperNetOutput, HyperNetwork
from .lidb import LidbBasis, LidbConfig
from .lora import LoraWeights, combine_exact
from .runtime import attach_lora, merge_lora
from .schedule import NoiseSchedule
from .subject import SubjectLora, predict_subject_lora
from .targets import BoundTargets, TargetLayer, locate_targets, targets_hash
from .tuning import TuningConfig, TuningResult, tune_subject

__all__ = [
    "FeatureError",
    "FileFormatError",
    "HyperNetError",
    "TargetMismatchError",
    "HyperNetInfo",
    "expand_compact_subject_lora",
    "load_compact_subject_lora",
    "load_hypernet",
    "load_subject_lora",
    "read_hypernet_info",
    "save_hypernet",
    "FinetuneConfig",
    "FinetuneResult",
    "rank_relaxed_finetune",
    "hm_cfg",
    "hm_cfg_two",
    "in_subject_window",
    "FeatureSpec",
    "HyperNetConfig",
    "HyperNetOutput",
    "HyperNetwork",
    "LidbBasis",
    "LidbConfig",
    "LoraWeights",
    "combine_exact",
    "attach_lora",
    "merge_lora",
    "NoiseSchedule",
    "SubjectLora",
    "predict_subject_lora",
    "BoundTargets",
    "TargetLayer",
    "locate_targets",
    "targets_hash",
    "TuningConfig",
    "TuningResult",
    "tune_subject",
]
