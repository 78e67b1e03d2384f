"""The study's report: paired statistics per claim, the goals met or not, plots, docs/study.md and
docs/study_results.json (whose ``"summary"`` is the flat record other tools read)."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

from training.toy_reader import IDENTITY

BASE, DESCRIBED, HYPER = "base model", "described (base model, identity in words)", "hypernet"
SWAPPED, SWAPPED_AS_DONOR = "hypernet, another subject's LoRA", "hypernet, another subject's LoRA (scored as that subject)"
TRAIN_HYPER, TRAIN_BASE = "hypernet on training subjects", "base model on training subjects"


def mean(values) -> float:
    return statistics.mean(values)


def paired(scores: dict, a: str, b: str, metric: str = "subject") -> tuple[float, float]:
    """Mean of the per-subject differences a - b and its standard error (same subjects, prompts and seeds)."""
    diffs = [x - y for x, y in zip(scores[a][metric], scores[b][metric])]
    if len(diffs) < 2:
        return mean(diffs), float("nan")
    return mean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5


def significance(diff: float, se: float) -> str:
    if se != se:  # nan
        return "n/a"
    return "significant" if abs(diff) > 2 * se else "within noise"


def describe_diff(scores: dict, a: str, b: str, metric: str = "subject") -> str:
    diff, se = paired(scores, a, b, metric)
    return f"{diff:+.3f} ± {se:.3f} s.e., {significance(diff, se)}"


def summary_of(results: dict) -> dict:
    scores, plan = results["scores"], results["plan"]
    s = lambda name, metric="subject": round(mean(scores[name][metric]), 4)  # noqa: E731
    diff, se = paired(scores, HYPER, BASE)
    identity = lambda acc: round(mean(acc[k] for k in IDENTITY), 4)  # noqa: E731
    return {
        "reader_identity_accuracy": identity(results["reader_accuracy"]["renders"]),
        "reader_identity_accuracy_vae_round_trips": identity(results["reader_accuracy"]["vae_round_trips"]),
        "reader_identity_accuracy_base_model_rerenders": identity(results["reader_accuracy"]["base_model_rerenders"]),
        "described_ceiling": s(DESCRIBED),
        "base_subject": s(BASE), "base_prompt": s(BASE, "prompt"),
        "hypernet_subject": s(HYPER), "hypernet_prompt": s(HYPER, "prompt"),
        "hypernet_vs_base_diff": round(diff, 4), "hypernet_vs_base_se": round(se, 4),
        "hypernet_train_subjects_subject": s(TRAIN_HYPER),
        "hypernet_swapped_lora_subject": s(SWAPPED),
        f"hypernet_finetune{plan['hyper_finetune_steps']}_subject": s(f"hypernet + finetune {plan['hyper_finetune_steps']}"),
        "hypernet_finetune40_subject": s(f"hypernet + finetune {plan['hyper_finetune_steps']}"),
        f"scratch{max(plan['scratch_steps'])}_subject": s(f"LoRA from scratch {max(plan['scratch_steps'])}"),
        "scratch400_subject": s(f"LoRA from scratch {max(plan['scratch_steps'])}"),
        "lora_spread_pairwise": round(results["spread"]["hypernet"]["pairwise"], 4),
        "heldout_subjects": len(results["subjects"]), "seeds": len(plan["seeds"]),
        "minutes": round(sum(results["timings_s"].values()) / 60, 1),
    }


def goals(results: dict) -> list[tuple[str, str, bool]]:
    """(goal, measurement, met) for the four goals the study is held to."""
    scores, plan = results["scores"], results["plan"]
    ft, scratch = f"hypernet + finetune {plan['hyper_finetune_steps']}", f"LoRA from scratch {max(plan['scratch_steps'])}"
    out = []
    diff, se = paired(scores, HYPER, BASE)
    out.append(("hypernet - base >= +0.15 subject fidelity on held-out subjects, significant",
                f"{diff:+.3f} ± {se:.3f} s.e.", diff >= 0.15 and diff > 2 * se))
    gap = mean(scores[scratch]["subject"]) - mean(scores[BASE]["subject"])
    closed = diff / gap if gap > 0 else float("nan")
    out.append((f"the hypernet closes >= 50 % of the gap from base to the {max(plan['scratch_steps'])}-step finetune from scratch",
                f"{closed:.0%} of a {gap:+.3f} gap" if gap > 0 else f"no gap to close ({gap:+.3f})", gap > 0 and closed >= 0.5))
    d, e = paired(scores, ft, scratch)
    out.append((f"hypernet + {plan['hyper_finetune_steps']}-step rank-relaxed finetune >= {max(plan['scratch_steps'])}-step finetune from scratch (within noise or better)",
                f"{d:+.3f} ± {e:.3f} s.e.", d >= -2 * e))
    d, e = paired(scores, HYPER, BASE, "prompt")
    out.append(("hypernet (with L2) keeps prompt fidelity within 0.05 of the base model", f"{d:+.3f} ± {e:.3f} s.e.", d >= -0.05))
    return out


def claims(results: dict) -> list[str]:
    scores, plan = results["scores"], results["plan"]
    lines = []
    s = lambda name, metric="subject": mean(scores[name][metric])  # noqa: E731
    hm = f"hypernet + HM-CFG s={plan['cfg_subject']:g}"
    lines.append(f"**HM-CFG at s={plan['cfg_subject']:g}** (declared before the run: the node's default; the sweep is shown, not chosen from): "
                 f"prompt fidelity {s(hm, 'prompt'):.3f} vs {s(HYPER, 'prompt'):.3f} for the hypernet alone ({describe_diff(scores, hm, HYPER, 'prompt')}); "
                 f"subject fidelity {s(hm):.3f} vs {s(HYPER):.3f} ({describe_diff(scores, hm, HYPER)}).")
    if "hypernet (no L2)" in scores:
        lines.append(f"**L2 output penalty**: prompt fidelity {s(HYPER, 'prompt'):.3f} with vs {s('hypernet (no L2)', 'prompt'):.3f} without "
                     f"({describe_diff(scores, HYPER, 'hypernet (no L2)', 'prompt')}); subject fidelity {s(HYPER):.3f} vs {s('hypernet (no L2)'):.3f} "
                     f"({describe_diff(scores, HYPER, 'hypernet (no L2)')}).")
    for name in ("hypernet (weight-space loss)", "hypernet (word embedding)", "hypernet (word embedding + NN loss)"):
        if name in scores:
            lines.append(f"**{name}**: subject fidelity {s(name):.3f} vs {s(HYPER):.3f} for the main recipe ({describe_diff(scores, name, HYPER)}); "
                         f"prompt fidelity {s(name, 'prompt'):.3f} ({describe_diff(scores, name, HYPER, 'prompt')}).")
        dual = f"{name} + dual path a={plan.get('dual_alpha', 0.5):g}"
        if dual in scores:
            lines.append(f"**{dual}** (every attention output {plan.get('dual_alpha', 0.5):g} adapted + the rest vanilla, the word as its nearest "
                         f"real word): subject fidelity {s(dual):.3f} vs {s(name):.3f} without ({describe_diff(scores, dual, name)}); prompt fidelity "
                         f"{s(dual, 'prompt'):.3f} vs {s(name, 'prompt'):.3f} ({describe_diff(scores, dual, name, 'prompt')}).")
        tuned = f"{name} + tuning {plan.get('tuning_steps', 12)}"
        if tuned in scores:
            lines.append(f"**{tuned}** (embedding and LoRA tuned together on the reference, lr {plan.get('tuning_lr', 1e-3):g}, "
                         f"nearest-word pull {plan['nn_weight']:g}): subject fidelity {s(tuned):.3f} vs {s(name):.3f} untuned "
                         f"({describe_diff(scores, tuned, name)}); prompt fidelity {s(tuned, 'prompt'):.3f} ({describe_diff(scores, tuned, name, 'prompt')}).")
    for steps in plan["scratch_steps"]:
        name = f"LoRA from scratch {steps}"
        lines.append(f"**{name}** (rank {plan['finetune_rank']}, lr {plan['finetune_lr']:g}): subject fidelity {s(name):.3f} vs base {s(BASE):.3f} "
                     f"({describe_diff(scores, name, BASE)}).")
    for lr in plan.get("finetune_lr_sweep", ()):
        tuned = f"hypernet + finetune {plan['hyper_finetune_steps']}, lr {lr:g}"
        for steps in plan["scratch_steps"]:
            scratch = f"LoRA from scratch {steps}, lr {lr:g}"
            lines.append(f"**At lr {lr:g}**: {tuned} {s(tuned):.3f} vs {scratch} {s(scratch):.3f} ({describe_diff(scores, tuned, scratch)}); "
                         f"prompt fidelity {s(tuned, 'prompt'):.3f} vs {s(scratch, 'prompt'):.3f}.")
    return lines


def diagnosis(results: dict) -> list[str]:
    scores = results["scores"]
    s = lambda name, metric="subject": mean(scores[name][metric])  # noqa: E731
    spread = results["spread"]["hypernet"]
    lines = [
        f"**Memorisation vs generalisation**: on its training subjects the hypernetwork scores {s(TRAIN_HYPER):.3f} "
        f"(base model on the same subjects {s(TRAIN_BASE):.3f}, {describe_diff(scores, TRAIN_HYPER, TRAIN_BASE)}); "
        f"on held-out subjects {s(HYPER):.3f} (base {s(BASE):.3f}, {describe_diff(scores, HYPER, BASE)}).",
        f"**Described ceiling**: told the identity in words, the base model reaches {s(DESCRIBED):.3f} subject fidelity on held-out "
        f"subjects (the rare token alone: {s(BASE):.3f}): how much of an identity the model can draw from words alone. It bounds what a "
        f"hypernetwork recovers by steering the model's word-level knowledge, not what a LoRA can do: a LoRA also changes how the model draws.",
        f"**Collapse check**: predicted LoRAs differ between subjects by {spread['pairwise']:.2f}x their mean norm (mean pairwise distance / mean "
        f"norm; {spread['specific']:.2f} for the distance to the mean LoRA). Drawing each subject with another subject's LoRA gives "
        f"{s(SWAPPED):.3f} fidelity to the subject ({describe_diff(scores, HYPER, SWAPPED)} for its own LoRA) and {s(SWAPPED_AS_DONOR):.3f} to the "
        f"LoRA's own subject ({describe_diff(scores, SWAPPED_AS_DONOR, SWAPPED)} for the donor over the drawn subject): {travels(scores)}.",
    ]
    return lines


def travels(scores: dict) -> str:
    """What the swap says, decided by the numbers: does the identity go where the LoRA goes?"""
    own, own_se = paired(scores, HYPER, SWAPPED)
    donor, donor_se = paired(scores, SWAPPED_AS_DONOR, SWAPPED)
    if own > 2 * own_se and donor > 2 * donor_se:
        return "the identity travels with the LoRA (the predictions are subject-specific)"
    if abs(own) <= 2 * own_se and abs(donor) <= 2 * donor_se:
        return "whose LoRA is used makes no measurable difference: the predictions carry no identity the reader sees (one LoRA for everyone)"
    return "the swap changes what is drawn, but not consistently toward the LoRA's own subject"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = results["scores"]
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    for name, row in scores.items():
        if "training subjects" in name or "scored as" in name:
            continue
        n = len(row["subject"])
        se = lambda v: statistics.stdev(v) / n ** 0.5 if n > 1 else 0.0  # noqa: E731
        marker = "s" if name.startswith(("base", "described")) else ("^" if "HM-CFG" in name else "o")
        ax.errorbar(mean(row["prompt"]), mean(row["subject"]), xerr=se(row["prompt"]), yerr=se(row["subject"]), fmt=marker, capsize=3, label=name)
    ax.set_xlabel("prompt fidelity (context attributes read off the image)")
    ax.set_ylabel("subject fidelity (identity attributes read off the image)")
    ax.set_title("Toy world, held-out subjects (mean ± s.e. over subjects)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pretraining_note(record: dict) -> str:
    """The shipped world's pretraining, run by run: a ``--from-shipped`` run keeps the record of the run it continued."""
    runs = [record]
    while runs[-1].get("continues"):
        runs.append(runs[-1]["continues"])
    runs.reverse()
    total = sum(run["total_minutes"] for run in runs)
    parts = [f"{run['total_minutes']} min ({', '.join(f'{k[:-2]} {v / 60:.0f} min' for k, v in run['timings_s'].items())})"
             + (f". {run['note']}" if run.get("note") else ".") for run in runs]
    if len(runs) == 1:
        return f"Pretraining the world (`python -m experiments.pretrain`, run once, shipped): {parts[0]} on {record['machine']}."
    return (f"Pretraining the world (`python -m experiments.pretrain`, shipped): {total:.1f} min in {len(runs)} runs on {record['machine']}. "
            + " ".join(f"Run {i + 1}{f' (`--from-shipped`: {continued_parts(run)} trained further, every other part reused)' if i else ''}: {part}"
                       for i, (run, part) in enumerate(zip(runs, parts))))


def continued_parts(run: dict) -> str:
    """What a ``--from-shipped`` run trained (its stages' timings say which ran)."""
    trained = [name for stage, name in (("unet_continued_s", "the UNet"), ("vision_continued_s", "the image encoder's vision tower"))
               if stage in run["timings_s"]]
    return " and ".join(trained) or "nothing"


def write_report(results: dict, out: Path, docs: Path, quick: bool, images_from_docs: bool = False) -> None:
    docs.mkdir(parents=True, exist_ok=True)
    prefix = "study_quick" if quick else "study"
    summary = summary_of(results)
    results = {"summary": summary, **{k: v for k, v in results.items() if k != "summary"}}
    (docs / f"{prefix}_results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, docs / f"{prefix}_fidelity.png")
    if not images_from_docs:
        if (out / "examples.png").exists():
            shutil.copy(out / "examples.png", docs / f"{prefix}_examples.png")
        validation_png = out / "hypernets" / "hypernet" / "validation.png"
        if validation_png.exists():
            shutil.copy(validation_png, docs / f"{prefix}_validation.png")
    plan, scores = results["plan"], results["scores"]
    rows = "\n".join(
        f"| {name} | {mean(v['subject']):.3f} ± {statistics.stdev(v['subject']) / len(v['subject']) ** 0.5 if len(v['subject']) > 1 else 0:.3f} "
        f"| {mean(v['prompt']):.3f} ± {statistics.stdev(v['prompt']) / len(v['prompt']) ** 0.5 if len(v['prompt']) > 1 else 0:.3f} |"
        for name, v in scores.items())
    reader = results["reader_accuracy"]
    reader_rows = "\n".join(f"| {where.replace('_', ' ')} | " + " | ".join(f"{acc[k]:.2f}" for k in acc) + f" | {mean(acc[k] for k in IDENTITY):.3f} |"
                            for where, acc in reader.items())
    reader_head = "| images | " + " | ".join(next(iter(reader.values()))) + " | identity |\n|---|" + "---|" * (len(next(iter(reader.values()))) + 1)
    goal_rows = "\n".join(f"| {goal} | {measured} | {'met' if met else 'NOT met'} |" for goal, measured, met in goals(results))
    timings = ", ".join(f"{k} {v / 60:.1f} min" for k, v in results["timings_s"].items())
    pretrain = Path(__file__).resolve().parents[1] / "training" / "toy_model" / "pretrain.json"
    pretrain_note = ""
    if pretrain.exists():
        pretrain_note = pretraining_note(json.loads(pretrain.read_text()))
    text = f"""# Toy-world study{' (QUICK MODE: pipeline check, numbers are meaningless)' if quick else ''}

Does a predicted LoRA make the model draw *this* subject? Measured on a toy world small enough for a CPU.
Regenerate: `python -m experiments.study --out runs/study` ({summary['minutes']} min here on {results['threads']} CPU threads;
{timings}); `--report-only` rewrites this page and the plot from `docs/{prefix}_results.json`. {pretrain_note}

## The world
Subjects are procedural toys whose identity is (shape, primary colour, secondary colour, pattern, marking): 7,168
identities, split 80/20 into training and held-out subjects, shown in contexts (background, position, scale). Every identity
attribute stays visible at 64 px: the primary colour covers most of the object and every pattern shows the secondary
colour as a minority. The base model (SD1.5 family, tiny: a VAE to 16x16x4 latents whose first three channels are held to
the 4x4-pooled colour, as SD's latents roughly carry colour; a UNet; the toy CLIP's text tower) was pretrained on
training-split subjects with captions that describe the identity in words half of the time (60 % in its later runs; each
run's shares are in `training/toy_model/pretrain.json`: "a photo of a red and blue striped star toy with a dot marking on
a sand background, on the left, small"), some of the identity a fifth to a quarter of the time, and only the class
otherwise ("a photo of a toy on ..."): like Stable Diffusion, it can draw what words describe, and personalisation
has to bind the rare token "sks" to one identity inside that ability. The hypernetwork's frozen image encoder
is the toy CLIP's vision tower (contrastively pretrained on full descriptions).

**Instruments.** An attribute-reading CNN plays DINO / CLIP-I and CLIP-T: *subject fidelity* = share of the reference
subject's 5 identity attributes read off a generated image (chance ~{mean(1 / len(v) for v in IDENTITY.values()):.2f}); *prompt fidelity* = share of
the prompt's 3 context attributes. Its accuracy on held-out subjects:

{reader_head}
{reader_rows}

(Re-renders: held-out renders noised to half the schedule and denoised by the base model with the described prompt; an
error there is the model's or the reader's, so it bounds the reader's accuracy on the model's own images from below.)

**Protocol.** {len(results['subjects'])} held-out subjects, one reference image each (white background, centre, large),
{plan['eval_contexts']} new prompts each ("a photo of a sks toy on a night background, on the left, small"), seeds {list(plan['seeds'])},
DDIM {plan['sample_steps']} steps, cfg_text {plan['cfg_text']}. Hypernetworks: `training.train` on {plan['train_subjects']} training subjects x
{plan['images_per_subject']} images, {plan['hypernet_steps']} steps (the demo recipe{' with ' + json.dumps(plan['hypernet']) if plan['hypernet'] else ''}). Finetunes: the
product's loop (`hypernet.finetune`), rank {plan['finetune_rank']}, AdamW lr {plan['finetune_lr']:g} (the product's default) on the reference
image and "a photo of a sks toy on a white background, in the center, large". Every number below is a mean over subjects
± its standard error; every comparison is a paired difference over the same subjects, prompts and seeds ("significant" =
more than 2 s.e. from 0).

## Results (held-out subjects)

| method | subject fidelity | prompt fidelity |
|---|---|---|
{rows}

![subject vs prompt fidelity]({prefix}_fidelity.png)

Examples (two held-out subjects, their prompts; rows: reference, then the methods in table order):

![examples]({prefix}_examples.png)

## Goals

| goal | measured | |
|---|---|---|
{goal_rows}

## Diagnosis
""" + "\n".join(f"- {line}" for line in diagnosis(results)) + """

## The other claims
""" + "\n".join(f"- {line}" for line in claims(results)) + f"""

## Validation while training
The main hypernetwork was trained with `--eval-data synthetic --eval-every {plan['eval_every']}` (8 held-out subjects), as a user training on
their own photos would: identity = image-encoder cosine between the generated image and the reference; the swapped curve
uses another subject's LoRA; the reader's scores are the toy world's extra.

![validation]({prefix}_validation.png)
""" + (results.get("notes", "") and "\n## Notes\n" + results["notes"] + "\n") + """
These are measurements on a toy world, reported as measured: they say whether the mechanisms work as claimed at small
scale, not what the numbers would be on SD1.5 with photographs.
"""
    (docs / f"{prefix}.md").write_text(text)
    print(f"[study] wrote {docs / (prefix + '.md')}", flush=True)
