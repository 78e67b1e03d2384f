"""One command for the full-size SD1.5 benchmarks (random weights): runs each comparison, then one summary table.

    python benchmarks/sd15.py [--resolution 256] [--quick]

Each row's comparison is measured side by side inside one script run (same process state, interleaved
repeats or per-step medians) and reported as a ratio:
- personalise one subject: hypernetwork prediction vs rank-relaxed finetune (40 steps) vs LoRA finetune from
  scratch (400 steps)  -- benchmarks/personalise.py
- sampling: HM-CFG step vs plain CFG step through ComfyUI  -- benchmarks/comfy_sampling.py --full-sd15
- training: hypernetwork step vs plain single-LoRA step  -- benchmarks/train_step.py --backbone sd15-random
- sizes: hypernetwork file, compact and standard subject LoRA; memory of each operation.
Every script's own table is printed as it finishes; the numbers also go to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(script: str, args: list[str], out: Path, reuse: bool = False) -> dict:
    if reuse and out.exists():  # a comparison that already finished (after a later one failed)
        print(f"\n(reusing {out})", flush=True)
        return json.loads(out.read_text())
    command = [sys.executable, str(REPO / "benchmarks" / script), *args, "--json", str(out)]
    print(f"\n$ {' '.join(command[1:])}", flush=True)
    start = time.time()
    subprocess.run(command, cwd=REPO, check=True)
    print(f"({time.time() - start:.0f} s)", flush=True)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a rough table in less time)")
    parser.add_argument("--out", default="runs/benchmarks", help="folder for the JSON results")
    parser.add_argument("--reuse", action="store_true", help="keep results already in --out instead of measuring them again")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = str(args.resolution)
    repeats = "1" if args.quick else "3"
    personalise = run("personalise.py", ["--resolution", res, "--measure-steps", "2" if args.quick else "3"], out / "personalise.json", args.reuse)
    sampling = run("comfy_sampling.py", ["--full-sd15", "--resolution", res, "--steps", "3" if args.quick else "4", "--repeats", repeats,
                                            "--memory-runs", "5" if args.quick else "20"], out / "comfy_sampling.json", args.reuse)
    training = run("train_step.py", ["--backbone", "sd15-random", "--resolution", res, "--batch-size", "1", "--repeats", repeats, "--warmup", "1"],
                   out / "train_step.json", args.reuse)

    print_summary(f"SD1.5 architecture, random weights, {args.resolution} px", personalise, sampling, training)


def print_summary(title: str, personalise: dict, sampling: dict, training: dict) -> None:
    """One table from the three scripts' JSON results (benchmarks/sdxl.py prints the same)."""
    import torch

    print(f"\n{title}; {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {sampling.get('device', 'cpu')}; times in {sampling.get('clock', 'wall-clock seconds')}")
    print(f"{'comparison':58s} {'value':>12s} {'ratio':>8s}")
    seconds = personalise["seconds"]
    first = next(iter(seconds.values()))
    for name, value in seconds.items():
        print(f"{'personalise: ' + name:58s} {value:10.1f} s {value / first:7.1f}x")
    steps = sampling["per_step_s"]
    plain = next(v for k, v in steps.items() if k.startswith("plain"))
    for name, value in steps.items():
        print(f"{'sampling step: ' + name:58s} {value:10.3f} s {value / plain:7.3f}x")
    print(f"{'Predict Subject LoRA in ComfyUI (CLIP vision + hypernet)':58s} {sampling['predict_s']:10.2f} s")
    for name, key in (("training step: plain single LoRA (peft)", "plain_lora"), ("training step: hypernet, per-sample LoRA", "hypernet")):
        value = training[key]["median_s"]
        print(f"{name:58s} {value:10.2f} s {value / training['plain_lora']['median_s']:7.3f}x")
    for name, key in (("training peak memory: plain single LoRA", "plain_lora"), ("training peak memory: hypernet", "hypernet")):
        value = training[key]["peak_mb"]
        print(f"{name:58s} {value:9.0f} MB {value / training['plain_lora']['peak_mb']:7.3f}x")
    print(f"{'memory: hypernetwork prediction (extra resident)':58s} {personalise['prediction_mb']:9.0f} MB")
    print(f"{'memory: finetune (peak over the loaded models)':58s} {personalise['finetune_peak_mb']:9.0f} MB")
    print(f"{'memory: ComfyUI RSS before / after repeated HM-CFG runs':58s} {sampling['rss_before_mb']:6.0f}/{sampling['rss_after_mb']:.0f} MB")
    for name, size in personalise["sizes"].items():
        print(f"{'size: ' + name:58s} {size / 1024:9.1f} KB")


if __name__ == "__main__":
    main()
