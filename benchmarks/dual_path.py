"""Dual-path blending's cost: a sampling step with every attention branch run twice vs a plain LoRA CFG step.

    python benchmarks/dual_path.py                                   # the toy world's model, 64 px
    python benchmarks/dual_path.py --backbone sd15-random --resolution 512 --repeats 3

Same prompts, LoRA (UNet + text encoder, rank 1) and predicted word embedding for both; 'lora' is CFG on the
adapted model (2 UNet batch elements), 'dual' the same with each attention output blended with its vanilla-path
output (LoRA off, hard prompt). Interleaved repeats of a fixed number of steps, medians; text encoding included.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import _clock as clock  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="toy", help="'toy' or 'sd15-random' (full SD1.5 architecture, random weights)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4, help="sampling steps per timed run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=0.5)
    args = parser.parse_args()

    from hypernet import LoraWeights, locate_targets
    from training.backbone import load_backbone, sd15_random_backbone
    from training.sampling import attention_modules, sample

    backbone = sd15_random_backbone() if args.backbone == "sd15-random" else load_backbone(args.backbone)
    unet_targets, text_targets = locate_targets(backbone.unet), locate_targets(None, [backbone.text_encoder])
    generator = torch.Generator().manual_seed(0)
    layers = unet_targets.layers + text_targets.layers
    lora = LoraWeights({l.name: torch.randn(1, l.in_features, generator=generator) * 0.05 for l in layers},
                       {l.name: torch.randn(l.out_features, 1, generator=generator) * 0.05 for l in layers})
    embedding = backbone.text_encoder.get_input_embeddings().weight[backbone.tokenizer("dog", add_special_tokens=False).input_ids[0]].detach() + 0.01
    common = dict(lora=lora, unet_modules=unet_targets.modules, text_modules=text_targets.modules, steps=args.steps, resolution=args.resolution,
                  token_embedding=embedding, placeholder="sks")
    prompts = ["a photo of a sks dog on the beach"]
    times: dict[str, list[float]] = {"lora": [], "dual": []}
    for repeat in range(args.repeats + 1):
        for mode in times:
            start = clock.now()
            sample(backbone, prompts, mode=mode, dual_alpha=args.alpha, seed=repeat, **common)
            if repeat:  # the first round warms up
                times[mode].append((clock.now() - start) / args.steps)
    plain, dual = statistics.median(times["lora"]), statistics.median(times["dual"])
    print(f"backbone {args.backbone}, {args.resolution} px, {len(attention_modules(backbone.unet))} attention branches, {torch.get_num_threads()} threads; "
          f"{clock.UNIT} per sampling step (median of {args.repeats})")
    print(f"| LoRA CFG step | {plain:.3f} | 1.000x |")
    print(f"| dual-path CFG step (alpha {args.alpha:g}) | {dual:.3f} | {dual / plain:.3f}x |")


if __name__ == "__main__":
    main()
