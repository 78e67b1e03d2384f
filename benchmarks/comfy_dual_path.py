"""Subject Dual-Path's per-step cost vs the plain patched model, measured inside a real ComfyUI (0.3.75, CPU unless a
GPU is present), side by side in one process, the core KSampler (CFG, 2 predictions) in all three cases.

    python benchmarks/comfy_dual_path.py                                  # smallest SD1.5-shaped checkpoint, 128 px
    python benchmarks/comfy_dual_path.py --full-sd15 --resolution 256     # full-size SD1.5 UNet, random weights

'plain patched model': Predict Subject LoRA's MODEL (the LoRA merged into the weights by ComfyUI). 'alpha 1': the Subject
Dual-Path MODEL at alpha 1, where no branch runs twice: what the activation-space LoRA alone costs. 'alpha 0.5': every
attention branch run twice. Interleaved repeats; per step, the time between the sampler's step callbacks (the first step of each call,
which includes loading and weight patching, is not counted), median. Needs --steps >= 2.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts"), str(REPO / "benchmarks")]

import _clock as clock  # noqa: E402
from comfy_sampling import LOAD_MODELS, prepare_models  # noqa: E402

from testkit.comfyui.harness import run_in_comfyui  # noqa: E402
from get_comfyui import ensure_comfyui  # noqa: E402

CODE = LOAD_MODELS + r"""
import statistics, time
import comfy.model_management, comfy.sample
clock = time.process_time if cfg["cpu_clock"] else time.perf_counter  # see benchmarks/_clock.py
image = torch.rand(1, 224, 224, 3, generator=torch.Generator().manual_seed(0))
model_s, clip_s, lora = predict.predict(hypernet, clip_vision, image, model, 1.0, clip, 1.0)
subject, vanilla, neg = encode(clip_s, "a photo of a sks toy on the beach"), encode(clip, "a photo of a dog toy on the beach"), encode(clip_s, "blurry")
dual = core.NODE_CLASS_MAPPINGS["SubjectHyperNet_SubjectDualPath"]()
latent = torch.zeros(1, 4, cfg["resolution"] // 8, cfg["resolution"] // 8)
noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
cases = {"plain patched model": model_s, "Subject Dual-Path, alpha 1": dual.patch(model, lora, vanilla, 1.0)[0],
         "Subject Dual-Path, alpha 0.5": dual.patch(model, lora, vanilla, 0.5)[0]}
times = {k: [] for k in cases}
for r in range(cfg["repeats"]):
    for name, m in cases.items():
        # the time between the sampler's step callbacks: sampling steps only, without the load and weight patching that
        # ComfyUI redoes whenever a call switches between Predict's MODEL and the unpatched base model the others share
        stamps = []
        comfy.sample.sample(m, noise, cfg["steps"], 7.0, "euler", "normal", subject, neg, latent, callback=lambda *a: stamps.append(clock()), disable_pbar=True)
        times[name] += [b - a for a, b in zip(stamps, stamps[1:])]
attention = len(cases["Subject Dual-Path, alpha 0.5"].get_wrappers("diffusion_model", "subject_hypernet_dual_path")[0].attention)
result = {"per_step_s": {k: statistics.median(v) for k, v in times.items()}, "device": str(comfy.model_management.get_torch_device()), "attention": attention}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-sd15", action="store_true", help="full-size SD1.5 UNet (random weights) instead of the smallest SD1.5-shaped one")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch

    comfy_root = ensure_comfyui()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        models, names, _ = prepare_models(work, args.full_sd15)
        bench = {**names, "resolution": args.resolution, "steps": args.steps, "repeats": args.repeats, "cpu_clock": clock.CPU_TIME}
        report = run_in_comfyui(comfy_root, work / "run", models=models, prompts=[], code="spec['bench'] = " + repr(bench) + "\n" + CODE, timeout=7200)
    if "code_error" in report:
        raise SystemExit(report["code_error"])
    result = report["code_result"]
    plain = result["per_step_s"]["plain patched model"]
    print(f"ComfyUI 0.3.75, {'full-size SD1.5 UNet' if args.full_sd15 else 'smallest SD1.5-shaped UNet'} (random), {args.resolution} px, "
          f"{result['attention']} attention branches, {args.steps} steps x {args.repeats} repeats, device {result['device']}, "
          f"{torch.get_num_threads()} threads; {clock.UNIT} per sampling step (CFG), median")
    print("| model | s/step | ratio |")
    print("|---|---|---|")
    for name, value in result["per_step_s"].items():
        print(f"| {name} | {value:.4f} | {value / plain:.3f}x |")


if __name__ == "__main__":
    main()
