"""Cost of applying subject LoRAs through forward hooks, as a ratio to the plain forward pass.

Measured side by side in one run on the same UNet and inputs (interleaved repeats, median):
plain forward; one shared LoRA via hooks; a different LoRA per batch element; merged weights.
    python benchmarks/hook_overhead.py [--unet tiny|sd15] [--batch 4] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypernet import LoraWeights, attach_lora, locate_targets, merge_lora  # noqa: E402


def build_unet(kind: str):
    from diffusers import UNet2DConditionModel

    from testkit.tiny_models import SD15_UNET_CONFIG, tiny_unet

    if kind == "tiny":
        return tiny_unet(), 8, 32
    torch.manual_seed(0)
    return UNet2DConditionModel(**SD15_UNET_CONFIG).eval().requires_grad_(False), 32, 768


def lora_for(layers, rank: int, batch: int | None):
    lead = () if batch is None else (batch,)
    return LoraWeights(
        {l.name: torch.randn(*lead, rank, l.in_features) * 0.01 for l in layers},
        {l.name: torch.randn(*lead, l.out_features, rank) * 0.01 for l in layers},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    unet, size, context_dim = build_unet(args.unet)
    bound = locate_targets(unet)
    sample = torch.randn(args.batch, 4, size, size)
    timesteps = torch.full((args.batch,), 500)
    context = torch.randn(args.batch, 77, context_dim)
    shared, per_sample = lora_for(bound.layers, args.rank, None), lora_for(bound.layers, args.rank, args.batch)

    def plain():
        unet(sample, timesteps, context)

    def hooked_shared():
        with attach_lora(bound.modules, shared):
            unet(sample, timesteps, context)

    def hooked_per_sample():
        with attach_lora(bound.modules, per_sample):
            unet(sample, timesteps, context)

    def merged():
        with merge_lora(bound.modules, shared):
            unet(sample, timesteps, context)

    cases = {"plain forward": plain, "hooks, shared LoRA": hooked_shared, "hooks, per-sample LoRAs": hooked_per_sample, "merge + forward + unmerge": merged}
    times = {name: [] for name in cases}
    with torch.no_grad():
        for fn in cases.values():
            fn()  # warm-up
        for _ in range(args.repeats):
            for name, fn in cases.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["plain forward"])
    print(f"UNet {args.unet}, {len(bound.layers)} adapted linears, batch {args.batch}, rank {args.rank}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'case':28s} {'median ms':>10s} {'ratio':>7s}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:28s} {median * 1000:10.2f} {median / base:7.3f}")


if __name__ == "__main__":
    main()
