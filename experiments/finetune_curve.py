"""What a study hypernetwork's prediction is worth in finetune steps, and where it acts: on the study's held-out cases
and seeds, the hypernet + N-step rank-relaxed finetune beside a LoRA trained N steps from scratch (the study's rank and
learning rate, the product's finetune loop), for each N in --steps; and the predicted LoRA applied to its text-encoder
layers alone and to its UNet layers alone. Goal 3 of the study asks the 40-step finetune to reach the 400-step LoRA;
this says how many steps it takes instead, and which half of the prediction carries the head start.

    python -m experiments.finetune_curve --hypernet runs/study/hypernets/hypernet/hypernet.safetensors --out docs/study_finetune_curve.json

Writes per-case subject fidelity for every row and paired differences (mean ± s.e. over subjects) for the comparisons.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from hypernet import LoraWeights, load_hypernet
from training.synthetic import SyntheticWorld

from .study import Plan, heldout_cases
from .study_eval import Evaluator, World
from .study_report import paired


def layers_only(loras: list[LoraWeights], names: set[str]) -> list[LoraWeights]:
    """The LoRAs with every layer outside ``names`` switched off (its ``up`` factor zeroed)."""
    return [LoraWeights(dict(lora.down), {n: up if n in names else torch.zeros_like(up) for n, up in lora.up.items()}) for lora in loras]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hypernet", required=True, help="a hypernetwork trained by the study (its main recipe)")
    parser.add_argument("--world", default="toy")
    parser.add_argument("--steps", type=int, nargs="+", default=[40, 100, 200, 400], help="finetune / from-scratch step counts")
    parser.add_argument("--learning-rate", type=float, help="default: the study's finetune learning rate (the product's)")
    parser.add_argument("--out", default="docs/study_finetune_curve.json")
    parser.add_argument("--quick", action="store_true", help="the study's --quick plan: checks the pipeline")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = Plan.quick() if args.quick else Plan()
    learning_rate = args.learning_rate or plan.finetune_lr
    world, synthetic = World.load(args.world), SyntheticWorld(0)
    evaluator = Evaluator(world, plan.sample_steps, plan.cfg_text, 64)
    cases = heldout_cases(plan, synthetic)
    hypernet, info = load_hypernet(args.hypernet)
    predicted, _ = evaluator.predict(hypernet, cases, info.config.features.hidden_state)
    scores: dict[str, dict[str, list[float]]] = {}

    def record(name: str, loras: list[LoraWeights] | None, mode: str = "lora") -> None:
        per_seed = [evaluator.score(cases, evaluator.generate(cases, loras, mode, seed))[0] for seed in plan.seeds]
        scores[name] = {"subject": [statistics.mean(values) for values in zip(*per_seed)]}
        print(f"[finetune_curve] {name}: {statistics.mean(scores[name]['subject']):.3f}", flush=True)

    record("base model", None, "base")
    record("hypernet", predicted)
    text_layers = {layer.name for layer in evaluator.text_targets.layers}
    record("hypernet, text-encoder layers only", layers_only(predicted, text_layers))
    record("hypernet, UNet layers only", layers_only(predicted, {layer.name for layer in evaluator.unet_targets.layers}))
    for steps in args.steps:
        record(f"hypernet + finetune {steps}", evaluator.finetune(cases, predicted, steps, plan.finetune_rank, learning_rate, seed=0))
        record(f"LoRA from scratch {steps}", evaluator.finetune(cases, [evaluator.zero_lora()] * len(cases), steps, plan.finetune_rank,
                                                                learning_rate, seed=0))
    longest = max(args.steps)
    comparisons = [("hypernet, text-encoder layers only", "base model"), ("hypernet, UNet layers only", "base model"),
                   ("hypernet, text-encoder layers only", "hypernet")]
    for steps in args.steps:
        comparisons += [(f"hypernet + finetune {steps}", f"LoRA from scratch {steps}"), (f"hypernet + finetune {steps}", f"LoRA from scratch {longest}"),
                        (f"hypernet + finetune {steps}", "hypernet")]
    diffs = {f"{a} - {b}": dict(zip(("diff", "se"), (round(v, 4) for v in paired(scores, a, b)))) for a, b in comparisons}
    for name, diff in diffs.items():
        print(f"[finetune_curve] {name}: {diff['diff']:+.3f} ± {diff['se']:.3f}", flush=True)
    Path(args.out).write_text(json.dumps({"hypernet": str(args.hypernet), "learning_rate": learning_rate, "rank": plan.finetune_rank,
                                          "subjects": len(cases), "prompts_per_subject": plan.eval_contexts, "seeds": list(plan.seeds),
                                          "means": {name: round(statistics.mean(row["subject"]), 4) for name, row in scores.items()},
                                          "paired": diffs, "scores": scores}, indent=1) + "\n")
    print(f"[finetune_curve] wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
