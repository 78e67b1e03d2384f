"""How much identity the hypernetwork's own training objective can put into a LoRA, subject by subject.

The hypernetwork is trained with the denoising loss on each training subject's views (4 images in different contexts,
their captions naming the context). Here a LoRA is optimised directly for each of the study's training subjects on
exactly those views and captions (no hypernetwork: the best a per-subject LoRA under that objective reaches in
``--steps``), then drawn with the study's new prompts and read like the study's methods. Beside it, on the same
subjects: the base model, the study's hypernetwork, and a LoRA on the one reference image (the study's "LoRA from
scratch" protocol), which can memorise that image.

    python -m experiments.objective_ceiling --hypernet runs/study/hypernets/hypernet/hypernet.safetensors --out docs/study_objective.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch

from hypernet import LoraWeights, attach_lora, load_hypernet
from hypernet.finetune import fresh_lora
from hypernet.losses import denoising_loss
from training.synthetic import SyntheticWorld, dataset_views

from .ceiling import per_attribute
from .study import Plan, training_subject_cases
from .study_eval import Case, Evaluator, World


def training_views(world: SyntheticWorld, plan: Plan, count: int) -> list[list]:
    """The first ``count`` training subjects' views as the study wrote them (seed 0): the images and captions the
    hypernetwork trained on."""
    return [views for _, views in dataset_views(world, plan.train_subjects, plan.images_per_subject)[:count]]


def fit_view_loras(evaluator: Evaluator, world: SyntheticWorld, cases: list[Case], views: list[list], steps: int, rank: int,
                   learning_rate: float, per_subject: int = 2, seed: int = 0) -> tuple[list[LoraWeights], list[float]]:
    """One fresh rank-``rank`` LoRA per subject (UNet and text encoder), all subjects in one batch, trained with the
    denoising loss on the subject's views and their captions (the hypernetwork's objective, one subject at a time)."""
    backbone = evaluator.world.backbone
    pixels = torch.stack([torch.stack([torch.from_numpy(np.asarray(world.render(case.subject, context, 64))) for context in subject_views])
                          for case, subject_views in zip(cases, views)]).float().div(255)  # (S, V, H, W, 3)
    with torch.no_grad():
        latents = backbone.encode_images(pixels.flatten(0, 1).permute(0, 3, 1, 2) * 2 - 1)
    latents = latents.view(len(cases), len(views[0]), *latents.shape[1:])
    ids = backbone.tokenize([SyntheticWorld.caption(context, evaluator.placeholder) for subject_views in views for context in subject_views])
    ids = ids.view(len(cases), len(views[0]), -1)
    generator = torch.Generator().manual_seed(seed)
    names = list(evaluator.modules)
    learned = fresh_lora(evaluator.modules, names, rank, generator, latents.device, len(cases))
    optimizer = torch.optim.AdamW(list(learned.down.values()) + list(learned.up.values()), lr=learning_rate, weight_decay=0.0)
    subjects = torch.arange(len(cases)).unsqueeze(1)
    losses = []
    for step in range(steps):
        index = torch.randint(latents.shape[1], (len(cases), per_subject), generator=generator)
        x0, batch_ids = latents[subjects, index].flatten(0, 1), ids[subjects, index].flatten(0, 1)
        noise = torch.randn(x0.shape, generator=generator)
        timesteps = torch.randint(0, evaluator.schedule.num_timesteps, (x0.shape[0],), generator=generator)
        with attach_lora(evaluator.modules, learned.repeated(per_subject, interleave=True)):
            context = backbone.text_encoder(batch_ids)[0]
            prediction = backbone.unet(evaluator.schedule.add_noise(x0, noise, timesteps), timesteps, context).sample
        loss = denoising_loss(prediction, noise).view(len(cases), per_subject).mean(1).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item() / len(cases))
        if (step + 1) % 50 == 0:
            print(f"[objective] view LoRAs step {step + 1}/{steps}: loss {statistics.mean(losses[-50:]):.4f}", flush=True)
    learned = learned.detach()
    return [learned.select(i) for i in range(len(cases))], losses


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hypernet", required=True, help="the study's main hypernetwork")
    parser.add_argument("--world", default="toy")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--subjects", type=int, default=0, help="training subjects scored (default: the study's count)")
    parser.add_argument("--out", default="docs/study_objective.json")
    parser.add_argument("--quick", action="store_true", help="the study's --quick plan: checks the pipeline")
    args = parser.parse_args(argv)
    plan = Plan.quick() if args.quick else Plan()
    count = args.subjects or plan.eval_subjects
    world, synthetic = World.load(args.world), SyntheticWorld(0)
    cases = training_subject_cases(plan, synthetic, count)
    evaluator = Evaluator(world, plan.sample_steps, plan.cfg_text, 64)
    hypernet, info = load_hypernet(args.hypernet)
    predicted, _ = evaluator.predict(hypernet, cases, info.config.features.hidden_state)
    view_loras, losses = fit_view_loras(evaluator, synthetic, cases, training_views(synthetic, plan, count), args.steps, args.rank, args.learning_rate)
    reference_loras = evaluator.finetune(cases, [evaluator.zero_lora()] * len(cases), args.steps, args.rank, args.learning_rate, seed=0)
    methods = {"base model": None, "hypernet": predicted, f"LoRA on the subject's {plan.images_per_subject} training views": view_loras,
               "LoRA on the one reference image": reference_loras}
    rows = {}
    for name, loras in methods.items():
        subject, prompt, attributes = [0.0] * len(cases), [0.0] * len(cases), []
        for seed in plan.seeds:
            images = evaluator.generate(cases, loras, "base" if loras is None else "lora", seed)
            s, p = evaluator.score(cases, images)
            subject = [a + b / len(plan.seeds) for a, b in zip(subject, s)]
            prompt = [a + b / len(plan.seeds) for a, b in zip(prompt, p)]
            attributes.append(per_attribute(evaluator, cases, images))
        per_attribute_mean = {key: round(statistics.mean(a[key] for a in attributes), 3) for key in attributes[0]}
        rows[name] = {"subject": subject, "prompt": prompt, "attributes": per_attribute_mean}
        print(f"| {name} | {statistics.mean(subject):.3f} | {statistics.mean(prompt):.3f} | {per_attribute_mean} |", flush=True)
    Path(args.out).write_text(json.dumps({"subjects": [c.subject.id for c in cases], "seeds": list(plan.seeds), "steps": args.steps,
                                          "learning_rate": args.learning_rate, "rank": args.rank, "view_lora_losses": losses[::10],
                                          "rows": rows}, indent=1) + "\n")
    print(f"[objective] wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
