"""One command for the SDXL benchmarks (full-size SDXL base architecture, random weights), then one summary table.

    python benchmarks/sdxl.py [--resolution 128] [--quick] [--reuse]

The same comparisons as benchmarks/sd15.py, each measured side by side in one script run:
- personalise one subject: hypernetwork prediction (ViT-L features + hypernetwork over 736 layers) vs rank-relaxed
  finetune (40 steps) vs LoRA finetune from scratch (400 steps)  -- benchmarks/personalise.py --arch sdxl
- sampling in ComfyUI: HM-CFG step vs plain CFG step on a full-size SDXL checkpoint  -- benchmarks/comfy_sampling.py --full-sdxl
- training: hypernetwork step vs plain single-LoRA step, peak memory  -- benchmarks/train_step.py --backbone sdxl-random
- computed memory of a 1024 px training step on a GPU (meta device, no GPU needed)  -- benchmarks/sdxl_memory.py
SDXL in float32 is 14 GB of weights, so on a CPU the measured comparisons run at a low resolution (128 px: a 16 x 16
latent); bf16 is no way out there (this machine's CPU runs bf16 convolutions hundreds of times slower than fp32).
Times are CPU seconds of each process (BENCH_CLOCK=cpu): the benchmarks run niced beside other work, and wall time
would count the waits. The finetune and training comparisons feed the UNet an encoded prompt and leave the two text
encoders out (--unet-only: as the ComfyUI finetune node does, and as diffusers' SDXL LoRA training does by default),
because SDXL's 14 GB of float32 weights do not fit beside the machine's other work; prediction covers all 736 layers.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from sd15 import print_summary, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a rough table in less time)")
    parser.add_argument("--out", default="runs/benchmarks_sdxl", help="folder for the JSON results")
    parser.add_argument("--reuse", action="store_true", help="keep results already in --out instead of measuring them again")
    args = parser.parse_args()
    os.environ["BENCH_CLOCK"] = "cpu"  # niced on a shared machine: CPU time, not the waits (benchmarks/_clock.py)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = str(args.resolution)
    repeats = "1" if args.quick else "2"  # CPU time is steadier than wall time here; an SDXL step is ~30 CPU-s at 128 px
    memory = run("sdxl_memory.py", ["--resolution", "1024", "--batch-sizes", "1", "2"], out / "sdxl_memory.json", args.reuse)
    personalise = run("personalise.py", ["--arch", "sdxl", "--unet-only", "--resolution", res, "--measure-steps", "2"], out / "personalise.json", args.reuse)
    training = run("train_step.py", ["--backbone", "sdxl-random", "--unet-only", "--resolution", res, "--batch-size", "1", "--repeats", repeats, "--warmup", "1"],
                   out / "train_step.json", args.reuse)
    sampling = run("comfy_sampling.py", ["--full-sdxl", "--resolution", res, "--steps", "2", "--repeats", repeats,
                                         "--memory-runs", "2"], out / "comfy_sampling.json", args.reuse)
    print_summary(f"SDXL architecture, random weights, {args.resolution} px", personalise, sampling, training)
    gib = 2**30
    for name, row in memory["rows"].items():
        print(f"{'computed GPU memory, 1024 px bf16, ' + name:58s} {row['total'] / gib:8.2f} GiB")


if __name__ == "__main__":
    main()
