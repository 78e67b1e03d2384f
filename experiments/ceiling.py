"""Where identity is lost in the toy world: per-attribute subject fidelity of the base model told the identity in words
(the described ceiling) at several guidance scales, beside the base model with the rare token, a study hypernetwork's
LoRA (at several strengths) and the ground-truth renders' VAE round trips, on the study's held-out subjects and
prompts; and a linear probe of the image encoder's features (experiments.feature_probe): what the hypernetwork sees.

    python -m experiments.ceiling --hypernet runs/study/hypernets/hypernet/hypernet.safetensors --out docs/study_ceiling.json
    python -m experiments.ceiling --world runs/toy_world --out runs/toy_world/ceiling.json     # a new world, before shipping it
    python -m experiments.ceiling --hypernet H --strengths 1 2 3     # the predicted LoRA scaled: too weak, or pointed elsewhere?

Per attribute, the share of images whose reading equals the subject's value (chance: 1/8 shape, 1/8 colours,
1/4 pattern, 1/4 marking): which parts of an identity the model cannot draw even when told, and which the LoRA adds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from hypernet import LoraWeights, load_hypernet
from training.synthetic import SyntheticWorld
from training.toy_reader import IDENTITY

from .feature_probe import feature_probe
from .study import Plan, heldout_cases
from .study_eval import Evaluator, World


def per_attribute(evaluator: Evaluator, cases, images: torch.Tensor) -> dict[str, float]:
    readings = evaluator.world.reader.read(images * 2 - 1)
    repeats = len(cases[0].contexts)
    out = {}
    for attribute in IDENTITY:
        hits = [readings[i * repeats + j][attribute] == case.subject.labels()[attribute] for i, case in enumerate(cases) for j in range(repeats)]
        out[attribute] = round(statistics.mean(hits), 3)
    out["identity"] = round(statistics.mean(out[a] for a in IDENTITY), 3)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hypernet", help="a hypernetwork trained by the study (its main recipe); without it, the base model only")
    parser.add_argument("--world", default="toy")
    parser.add_argument("--cfg", type=float, nargs="*", default=[2.0, 5.0, 8.0, 12.0], help="guidance scales for the described prompts")
    parser.add_argument("--out", default="docs/study_ceiling.json")
    parser.add_argument("--strengths", type=float, nargs="*", default=[1.0], help="the predicted LoRA's deltas scaled by these factors")
    parser.add_argument("--hidden-state", default="penultimate_hidden_states", help="image-encoder output probed without --hypernet")
    parser.add_argument("--quick", action="store_true", help="the study's --quick plan and a small probe: checks the pipeline")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = Plan.quick() if args.quick else Plan()
    world, synthetic = World.load(args.world), SyntheticWorld(0)
    cases = heldout_cases(plan, synthetic)
    rows: dict[str, dict[str, float]] = {}
    for cfg in args.cfg:
        evaluator = Evaluator(world, plan.sample_steps, cfg, 64)
        rows[f"described, cfg {cfg:g}"] = per_attribute(evaluator, cases, evaluator.generate(cases, None, "base", 0, "described"))
        print(f"[ceiling] described, cfg {cfg:g}: {rows[f'described, cfg {cfg:g}']}", flush=True)
    evaluator = Evaluator(world, plan.sample_steps, plan.cfg_text, 64)
    rows[f"base model (sks), cfg {plan.cfg_text:g}"] = per_attribute(evaluator, cases, evaluator.generate(cases, None, "base", 0))
    hidden_state = args.hidden_state
    if args.hypernet:
        hypernet, info = load_hypernet(args.hypernet)
        hidden_state = info.config.features.hidden_state
        loras, _ = evaluator.predict(hypernet, cases, hidden_state)
        for strength in args.strengths:
            scaled = [LoraWeights(dict(lora.down), {n: up * strength for n, up in lora.up.items()}) for lora in loras]
            name = f"hypernet, cfg {plan.cfg_text:g}" + (f", strength {strength:g}" if strength != 1 else "")
            rows[name] = per_attribute(evaluator, cases, evaluator.generate(cases, scaled, "lora", 0))
    references = torch.cat([c.reference for c in cases]).permute(0, 3, 1, 2) * 2 - 1
    with torch.no_grad():
        round_trips = world.backbone.decode_latents(world.backbone.encode_images(references)).float().clamp(-1, 1)
    one_view = [type(c)(c.subject, c.reference, c.contexts[:1]) for c in cases]
    rows["references, VAE round trip"] = per_attribute(evaluator, one_view, (round_trips + 1) / 2)
    sizes = dict(train_subjects=24, test_subjects=8, steps=30) if args.quick else {}
    for reading, row in feature_probe(world.encoder, hidden_state, **sizes).items():
        rows[f"image features ({hidden_state}), linear probe, {reading}"] = row
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[a]:.2f}" for a in [*IDENTITY, "identity"]) + " |")
    Path(args.out).write_text(json.dumps({"subjects": len(cases), "prompts_per_subject": plan.eval_contexts, "seed": 0,
                                          "sample_steps": plan.sample_steps, "rows": rows}, indent=1) + "\n")
    print(f"[ceiling] wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
