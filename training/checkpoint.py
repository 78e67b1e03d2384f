"""Training checkpoints: written atomically, resumed exactly.

A checkpoint holds the hypernetwork, optimizer and LR-scheduler state, the step, and the identity of
what it was trained on (config, target list, encoder spec) so a resume with other inputs is refused.
All randomness is derived from (seed, step, process), so nothing else is needed to continue exactly.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from hypernet.files import atomic_write

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(output_dir: str | os.PathLike, state: dict) -> Path:
    return atomic_write(Path(output_dir) / CHECKPOINT_NAME, lambda temporary: torch.save(state, temporary))


def load_checkpoint(output_dir: str | os.PathLike) -> dict:
    path = Path(output_dir) / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    # Our own file, but still load without unpickling arbitrary objects.
    return torch.load(path, map_location="cpu", weights_only=True)


def step_generator(seed: int, step: int, process: int) -> torch.Generator:
    """The CPU generator for one step of one process: the same on resume as in an uninterrupted run."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + process)
