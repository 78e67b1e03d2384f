"""Sample grids: reference | base model | personalised (LoRA) | personalised (HM-CFG), one row per subject.

The reference is a subject's first image; the prompt is the caption of its last one, so a subject with
several images is shown in a context other than the reference's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hypernet import BoundTargets

from .sampling import image_grid, sample, to_pil


@torch.no_grad()
def write_sample_grid(path: Path, hypernet, backbone, encoder, dataset, unet_targets: BoundTargets, text_targets: BoundTargets | None, config) -> Path:
    was_training = hypernet.training
    hypernet.eval()
    rows = []
    cell = max(64, config.resolution)
    text_modules = text_targets.modules if text_targets is not None else {}
    for subject_index in range(min(config.sample_subjects, len(dataset.subjects))):
        reference = dataset.reference_images(subject_index)
        features = encoder.features(reference, config.hidden_state).to(next(hypernet.parameters()).device)
        predicted = hypernet.predict(features)
        lora = predicted.lora
        subject = dataset.subjects[subject_index]
        prompt = dataset.caption_for(subject, subject.images[-1])
        common = dict(steps=config.sample_steps, resolution=config.resolution, seed=config.seed + subject_index)
        base = sample(backbone, [prompt], mode="base", **common)
        subject = dict(lora=lora, unet_modules=unet_targets.modules, text_modules=text_modules, token_embedding=predicted.token_embedding, placeholder=config.placeholder)
        personal = sample(backbone, [prompt], mode="lora", **subject, **common)
        hybrid = sample(backbone, [prompt], mode="hmcfg", **subject, **common)
        rows.append([to_pil(reference[0]), to_pil(base[0]), to_pil(personal[0]), to_pil(hybrid[0])])
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows, cell).save(path)
    hypernet.train(was_training)
    return path
