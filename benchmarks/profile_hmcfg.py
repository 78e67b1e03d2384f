"""Where HM-CFG's 'comfy_hooks' implementation spends its time, next to 'batched' and the plain KSampler: a cProfile of
a few sampling steps of each inside a real ComfyUI (0.3.75), the same models as benchmarks/comfy_sampling.py.

    python benchmarks/profile_hmcfg.py                          # smallest SD1.5-shaped checkpoint, 128 px
    python benchmarks/profile_hmcfg.py --full-sd15 --resolution 256

Prints, per case, the wall time per step and the functions with the largest cumulative time that belong to ComfyUI's
hook and weight-patching machinery or to the UNet itself, so the extra cost of one implementation over the other can
be attributed (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts"), str(REPO / "benchmarks")]

from comfy_sampling import LOAD_MODELS, prepare_models  # noqa: E402
from testkit.comfyui.harness import run_in_comfyui  # noqa: E402
from get_comfyui import ensure_comfyui  # noqa: E402

CODE = LOAD_MODELS + r"""
import cProfile, pstats, time
image = torch.rand(1, 224, 224, 3, generator=torch.Generator().manual_seed(0))
model_s, clip_s, lora = predict.predict(hypernet, clip_vision, image, model, 1.0, clip, 1.0)
pos, neg, subj = encode(clip, "a photo of a sks toy"), encode(clip, "blurry"), encode(clip_s, "a photo of a sks toy")
latent = core.EmptyLatentImage().generate(cfg["resolution"], cfg["resolution"], 1)[0]
steps = cfg["steps"]
hm = core.NODE_CLASS_MAPPINGS["SubjectHyperNet_HMCFGKSampler"]()
def hmcfg(seed, implementation):
    return hm.sample(seed, steps, "euler", "normal", latent, 1.0, model=model, subject_lora=lora, positive=pos, negative=neg,
                     cfg_text=7.0, cfg_subject=2.0, subject_start=0.0, subject_end=1.0, subject_positive=subj, implementation=implementation)
cases = {"plain KSampler": lambda s: core.KSampler().sample(model, s, steps, 7.0, "euler", "normal", pos, neg, latent, 1.0),
         "HM-CFG comfy_hooks": lambda s: hmcfg(s, "comfy_hooks"), "HM-CFG batched": lambda s: hmcfg(s, "batched")}
PATCHING = ("comfy/hooks.py", "comfy/model_patcher.py", "comfy/lora.py", "comfy/weight_adapter", "hypernet/runtime.py")
MODEL = ("comfy/ldm/modules/attention.py", "comfy/ldm/modules/diffusionmodules/openaimodel.py", "comfy/ops.py")
result = {}
for name, fn in cases.items():
    fn(0)  # warm-up: loads, caches
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable(); fn(1); profile.disable()
    wall = time.perf_counter() - start
    stats = pstats.Stats(profile)
    rows = {"patching": [], "model": []}
    unet_calls = 0
    for (file, line, func), (calls, _, own, cumulative, _) in stats.stats.items():
        short = f"{file.split('site-packages/')[-1].split('comfyui-0.3.75/')[-1]}:{line} {func}"
        for kind, where in (("patching", PATCHING), ("model", MODEL)):
            if any(w in file for w in where):
                rows[kind].append((cumulative, own, calls, short))
        if file.endswith("openaimodel.py") and func == "forward" and "UNetModel" in short or (file.endswith("openaimodel.py") and func == "_forward" and line > 800):
            unet_calls = max(unet_calls, calls)
    result[name] = {"per_step_s": wall / steps, "unet_calls_per_step": unet_calls / steps, "total_s": wall,
                    **{kind: sorted(found, reverse=True)[: cfg["top"]] for kind, found in rows.items()}}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-sd15", action="store_true", help="full-size SD1.5 UNet (random weights) instead of the smallest SD1.5-shaped one")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--top", type=int, default=8, help="functions listed per case")
    args = parser.parse_args()
    comfy_root = ensure_comfyui()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        models, names, _ = prepare_models(work, args.full_sd15)
        code = "spec['bench'] = " + repr({**names, "resolution": args.resolution, "steps": args.steps, "top": args.top}) + "\n" + CODE
        report = run_in_comfyui(comfy_root, work / "run", models=models, prompts=[], code=code, timeout=7200)
    if "code_error" in report:
        raise SystemExit(report["code_error"])
    result = report["code_result"]
    plain = result["plain KSampler"]["per_step_s"]
    print(f"ComfyUI 0.3.75, {'full-size SD1.5' if args.full_sd15 else 'smallest SD1.5-shaped'} UNet, {args.resolution}px, {args.steps} profiled steps per case")
    for name, entry in result.items():
        print(f"\n{name}: {entry['per_step_s']:.4f} s/step under the profiler ({entry['per_step_s'] / plain:.3f}x the plain KSampler), "
              f"{entry['unet_calls_per_step']:.0f} UNet calls per step, {entry['total_s']:.2f} s in all")
        for kind in ("model", "patching"):
            print(f"  {kind}: {'cumulative s':>12s} {'own s':>8s} {'calls':>8s}  function")
            for cumulative, own, calls, function in entry[kind]:
                print(f"  {'':{len(kind)}s}  {cumulative:12.3f} {own:8.3f} {calls:8d}  {function}")


if __name__ == "__main__":
    main()
