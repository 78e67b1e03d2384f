"""The study's measuring instruments: a small CNN that reads identity and context attributes off an image.

Trained with ground-truth labels on renders and on their VAE round trips (so it reads decoded images too),
with mild blur and noise (generated images are softer than renders).
- subject fidelity (plays DINO / CLIP-I): share of the reference subject's 5 identity attributes
  (shape, primary, secondary, pattern, marking) the reader reads off the generated image;
- prompt fidelity (plays CLIP-T): share of the prompt's 3 context attributes (background, position, scale)
  it reads off the image.
Its own accuracy on held-out subjects (renders, VAE round trips and the base model's re-renders) is reported
next to the results.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from training.toy_reader import CONTEXT, HEADS, IDENTITY, AttributeReader, load_reader, save_reader  # noqa: F401 (re-exported)


def _soften(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random mild blur and noise, per batch."""
    if torch.rand((), generator=generator) < 0.5:
        pixels = F.avg_pool2d(F.pad(pixels, (1, 1, 1, 1), mode="replicate"), 3, 1) * 0.5 + pixels * 0.5
    return pixels + 0.03 * torch.randn(pixels.shape, generator=generator)


def train_reader(pool, decoded: torch.Tensor | None, steps: int, batch: int, log, seed: int = 3) -> AttributeReader:
    """``pool``: a RenderPool (renders + labels); ``decoded``: the same renders after a VAE round trip (uint8), or None."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    reader = AttributeReader()
    optimizer = torch.optim.AdamW(reader.parameters(), lr=2e-3, weight_decay=1e-4)
    from .toy_models import warmup_cosine

    schedule = warmup_cosine(optimizer, steps, 0.1)
    start = time.time()
    for step in range(steps):
        index = torch.randint(0, len(pool), (batch,), generator=generator)
        pixels = pool.floats(index)
        if decoded is not None and step % 2 == 1:  # half the batches through the VAE, like generated images
            pixels = decoded[index].float().div(127.5).sub(1)
        labels = pool.labels(index)
        logits = reader.train()(_soften(pixels, generator))
        loss = sum(F.cross_entropy(logits[name], labels[name]) for name in HEADS)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"attribute reader step {step + 1}/{steps} loss {loss.item():.3f} ({time.time() - start:.0f}s)")
    return reader.eval()


def reader_accuracy(reader: AttributeReader, pixels: torch.Tensor, subjects, contexts) -> dict[str, float]:
    """Per-attribute accuracy on images (in [-1, 1]) whose true attributes are known."""
    readings = reader.read(pixels)
    truth = [{**s.labels(), **c.labels()} for s, c in zip(subjects, contexts)]
    return {name: sum(r[name] == t[name] for r, t in zip(readings, truth)) / len(truth) for name in HEADS}


def identity_accuracy(accuracy: dict[str, float]) -> float:
    return sum(accuracy[name] for name in IDENTITY) / len(IDENTITY)


def fidelity(reading: dict[str, str], subject, context) -> tuple[float, float]:
    """(subject fidelity, prompt fidelity) of one generated image."""
    subject_score = sum(reading[k] == v for k, v in subject.labels().items()) / len(IDENTITY)
    prompt_score = sum(reading[k] == v for k, v in context.labels().items()) / len(CONTEXT)
    return subject_score, prompt_score
