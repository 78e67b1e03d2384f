"""The toy world's attribute reader: a small CNN that reads identity and context attributes off a 64 px image.

It is the toy world's measuring instrument (the role DINO / CLIP-I / CLIP-T play for photographs): the study
and training-time validation read generated images with it. ``experiments/toy_metrics.py`` trains it on
ground-truth renders; the trained reader ships in ``training/toy_model/reader.safetensors``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .synthetic import BACKGROUNDS, COLOURS, MARKINGS, PATTERNS, POSITIONS, SCALES, SHAPES

IDENTITY = {"shape": list(SHAPES), "primary": list(COLOURS), "secondary": list(COLOURS), "pattern": list(PATTERNS), "marking": list(MARKINGS)}
CONTEXT = {"background": list(BACKGROUNDS), "position": list(POSITIONS), "scale": list(SCALES)}
HEADS = {**IDENTITY, **CONTEXT}


def _conv(i: int, o: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(i, o, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU())


class AttributeReader(nn.Module):
    """64 px image -> one classifier head per attribute. The 4x4 feature map is flattened, not pooled, so the
    heads see where things are (position, scale, where the band or marking sits)."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv(3, w), _conv(w, 2 * w, 2),  # 32 px
            _conv(2 * w, 2 * w), _conv(2 * w, 4 * w, 2),  # 16 px
            _conv(4 * w, 4 * w), _conv(4 * w, 4 * w, 2),  # 8 px
            _conv(4 * w, 4 * w, 2), nn.Flatten(),  # 4 px
        )
        self.heads = nn.ModuleDict({name: nn.Linear(4 * w * 16, len(values)) for name, values in HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:  # images in [-1, 1]
        if images.shape[-1] != 64 or images.shape[-2] != 64:
            images = F.interpolate(images, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
        features = self.features(images)
        return {name: head(features) for name, head in self.heads.items()}

    @torch.no_grad()
    def read(self, images: torch.Tensor, batch: int = 256) -> list[dict[str, str]]:
        """``(B, 3, H, W)`` images in [-1, 1] -> one ``{attribute: value}`` per image."""
        self.eval()
        readings = []
        for start in range(0, images.shape[0], batch):
            logits = self(images[start : start + batch].float())
            readings += [{name: HEADS[name][int(logits[name][i].argmax())] for name in HEADS} for i in range(logits["shape"].shape[0])]
        return readings


def save_reader(reader: AttributeReader, path) -> Path:
    from hypernet.files import write_safetensors_atomic

    return write_safetensors_atomic({k: v.contiguous() for k, v in reader.state_dict().items()}, {"format": "toy attribute reader"}, path)


def load_reader(path) -> AttributeReader:
    from hypernet.files import read_safetensors

    state, _ = read_safetensors(Path(path), "toy attribute reader")
    reader = AttributeReader()
    reader.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return reader.eval()
