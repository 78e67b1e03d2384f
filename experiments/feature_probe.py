"""Which parts of an identity the hypernetwork can see at all: a linear probe per identity attribute on the frozen
image encoder's features (what the hypernetwork reads), trained on renders of training subjects and scored on renders
of held-out subjects in random contexts.

Two readings of the features: ``pooled`` (the class token beside the mean of the patch tokens) and ``tokens`` (every
token, flattened: keeps where things are, as the hypernetwork's cross-attention can, but overfits more easily).
"""

from __future__ import annotations

import random
import statistics

import numpy as np
import torch

from training.synthetic import SyntheticWorld
from training.toy_reader import IDENTITY


def rendered_features(encoder, synthetic: SyntheticWorld, split: str, subjects: int, views: int, hidden_state: str, seed: int):
    """Features of ``views`` renders of each of the first ``subjects`` subjects of ``split``, and their identity labels."""
    rng = random.Random(seed)
    images, labels = [], []
    for subject in synthetic.subjects(subjects, split):
        for _ in range(views):
            images.append(np.asarray(synthetic.render(subject, synthetic.sample_context(rng), 64)))
            labels.append(subject.labels())
    with torch.no_grad():  # uint8 (B, H, W, C): the encoder scales it to [0, 1] itself
        features = encoder.features(np.stack(images), hidden_state)
    return features, labels


def readings(features: torch.Tensor) -> dict[str, torch.Tensor]:
    if features.dim() == 2:  # pooled embeddings already (image_embeds)
        return {"pooled": features}
    return {"pooled": torch.cat([features[:, 0], features[:, 1:].mean(1)], -1), "tokens": features.flatten(1)}


def linear_probe_accuracy(train_x: torch.Tensor, train_y: list, test_x: torch.Tensor, test_y: list, steps: int = 300, seed: int = 0) -> float:
    """Held-out accuracy of a softmax classifier on standardised features (full-batch Adam, light weight decay).
    A test label never seen in training counts as a miss."""
    generator = torch.Generator().manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-5
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    classes = {c: i for i, c in enumerate(sorted(set(train_y)))}
    targets = torch.tensor([classes[y] for y in train_y])
    layer = torch.nn.Linear(train_x.shape[1], len(classes))
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.01)
        layer.bias.zero_()
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(layer(train_x), targets).backward()
        optimizer.step()
    with torch.no_grad():
        predicted = layer(test_x).argmax(1).tolist()
    return statistics.mean(classes.get(y, -1) == p for y, p in zip(test_y, predicted))


def feature_probe(encoder, hidden_state: str, train_subjects: int = 1000, test_subjects: int = 200, views: int = 2, steps: int = 300,
                  seed: int = 0) -> dict[str, dict[str, float]]:
    """Per reading (``pooled``, ``tokens``): held-out accuracy per identity attribute, and their mean as ``identity``."""
    synthetic = SyntheticWorld(0)
    train_x, train_labels = rendered_features(encoder, synthetic, "train", train_subjects, views, hidden_state, seed)
    test_x, test_labels = rendered_features(encoder, synthetic, "heldout", test_subjects, views, hidden_state, seed + 1)
    out = {}
    train_readings, test_readings = readings(train_x), readings(test_x)
    for name in train_readings:
        row = {a: round(linear_probe_accuracy(train_readings[name], [lab[a] for lab in train_labels], test_readings[name],
                                              [lab[a] for lab in test_labels], steps, seed), 3) for a in IDENTITY}
        row["identity"] = round(statistics.mean(row[a] for a in IDENTITY), 3)
        out[name] = row
    return out
