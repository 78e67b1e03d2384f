"""The study's measuring instruments: a small CNN that reads identity and context attributes off an image.

Trained with ground-truth labels on renders (and on VAE round-trips, so it reads decoded images too).
- subject fidelity (plays DINO / CLIP-I): share of the reference subject's 5 identity attributes
  (shape, primary, secondary, pattern, marking) the classifier reads off the generated image;
- prompt fidelity (plays CLIP-T): share of the prompt's 3 context attributes (background, position, scale)
  it reads off the image.
Its own accuracy on held-out subjects is reported next to the results.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from training.synthetic import BACKGROUNDS, COLOURS, MARKINGS, PATTERNS, POSITIONS, SCALES, SHAPES

IDENTITY = {"shape": list(SHAPES), "primary": list(COLOURS), "secondary": list(COLOURS), "pattern": list(PATTERNS), "marking": list(MARKINGS)}
CONTEXT = {"background": list(BACKGROUNDS), "position": list(POSITIONS), "scale": list(SCALES)}
HEADS = {**IDENTITY, **CONTEXT}


class AttributeReader(nn.Module):
    def __init__(self, width: int = 48):
        super().__init__()
        block = lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))  # noqa: E731
        self.features = nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 2 * width), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.heads = nn.ModuleDict({name: nn.Linear(8 * width, len(values)) for name, values in HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:  # images in [-1, 1]
        features = self.features(images)
        return {name: head(features) for name, head in self.heads.items()}

    @torch.no_grad()
    def read(self, images: torch.Tensor) -> list[dict[str, str]]:
        self.eval()
        logits = self(images)
        return [{name: HEADS[name][int(logits[name][i].argmax())] for name in HEADS} for i in range(images.shape[0])]


def labels_of(subjects, contexts) -> dict[str, torch.Tensor]:
    rows = [{**s.labels(), **c.labels()} for s, c in zip(subjects, contexts)]
    return {name: torch.tensor([values.index(r[name]) for r in rows]) for name, values in HEADS.items()}


def train_reader(stream, vae, steps: int, batch: int, log) -> AttributeReader:
    torch.manual_seed(3)
    reader = AttributeReader()
    optimizer = torch.optim.AdamW(reader.parameters(), lr=2e-3, weight_decay=1e-4)
    start = time.time()
    for step in range(steps):
        pixels, subjects, contexts = stream.batch(batch)
        if vae is not None and step % 2 == 1:  # half the batches through the VAE, like generated images
            with torch.no_grad():
                pixels = vae.decode(vae.encode(pixels).latent_dist.mode()).sample.clamp(-1, 1)
        labels = labels_of(subjects, contexts)
        logits = reader.train()(pixels)
        loss = sum(F.cross_entropy(logits[name], labels[name]) for name in HEADS)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 500 == 0 or step == steps - 1:
            log(f"attribute reader step {step + 1}/{steps} loss {loss.item():.3f} ({time.time() - start:.0f}s)")
    return reader.eval()


def reader_accuracy(reader: AttributeReader, stream, vae, batches: int = 8, batch: int = 64) -> dict[str, float]:
    """Per-attribute accuracy on renders of the stream's subjects (held-out ones for an honest number)."""
    correct = {name: 0 for name in HEADS}
    total = 0
    for index in range(batches):
        pixels, subjects, contexts = stream.batch(batch)
        if vae is not None and index % 2 == 1:
            with torch.no_grad():
                pixels = vae.decode(vae.encode(pixels).latent_dist.mode()).sample.clamp(-1, 1)
        predicted = reader.read(pixels)
        truth = [{**s.labels(), **c.labels()} for s, c in zip(subjects, contexts)]
        for p, t in zip(predicted, truth):
            for name in HEADS:
                correct[name] += p[name] == t[name]
        total += len(truth)
    return {name: correct[name] / total for name in HEADS}


def fidelity(reading: dict[str, str], subject, context) -> tuple[float, float]:
    """(subject fidelity, prompt fidelity) of one generated image."""
    subject_score = sum(reading[k] == v for k, v in subject.labels().items()) / len(IDENTITY)
    prompt_score = sum(reading[k] == v for k, v in context.labels().items()) / len(CONTEXT)
    return subject_score, prompt_score
