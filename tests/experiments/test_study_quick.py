"""The toy world's commands end to end in --quick mode: the pretraining, and the study on the world it wrote (pipelines, not numbers)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
SUMMARY_KEYS = {"reader_identity_accuracy", "described_ceiling", "base_subject", "base_prompt", "hypernet_subject", "hypernet_prompt",
                "hypernet_vs_base_diff", "hypernet_vs_base_se", "hypernet_train_subjects_subject", "hypernet_finetune40_subject",
                "scratch400_subject", "heldout_subjects", "seeds", "minutes"}


def python(*args, timeout=900):
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def quick_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quick") / "world"
    python("-m", "experiments.pretrain", "--out", str(out), "--quick")
    return out


def test_quick_pretraining_writes_a_world_the_trainer_and_the_study_load(quick_world):
    out = quick_world
    for path in ("base/model_index.json", "base/unet/config.json", "base/vae/config.json", "base/text_encoder/config.json",
                 "image_encoder/config.json", "reader.safetensors", "pretrain.json"):
        assert (out / path).exists(), path
    record = json.loads((out / "pretrain.json").read_text())
    assert set(record["timings_s"]) == {"render_s", "vae_s", "vae_refine_s", "encode_s", "reader_s", "clip_s", "unet_s"}
    from experiments.study_eval import World

    world = World.load(str(out))
    assert world.backbone.unet.config.cross_attention_dim == world.backbone.text_encoder.config.hidden_size


@pytest.fixture(scope="module")
def quick_study(quick_world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quick_study")
    python("-m", "experiments.study", "--out", str(out / "study"), "--quick", "--world", str(quick_world), "--docs", str(out / "docs"))
    return out


def test_quick_study_runs_every_stage_and_writes_its_report(quick_study):
    docs = quick_study / "docs"
    report = (docs / "study_quick.md").read_text()
    for method in ("base model", "described (base model, identity in words)", "hypernet", "hypernet (no L2)", "hypernet (weight-space loss)",
                   "hypernet (word embedding)", "hypernet (word embedding + NN loss)", "hypernet (word embedding + NN loss) + dual path a=0.5",
                   "hypernet (word embedding) + tuning 2", "hypernet + HM-CFG s=2", "hypernet + finetune 2",
                   "LoRA from scratch 4", "hypernet + finetune 2, lr 0.001", "LoRA from scratch 4, lr 0.001",
                   "hypernet, another subject's LoRA", "hypernet on training subjects"):
        assert f"| {method} |" in report, method
    assert "## Goals" in report and "## Diagnosis" in report
    results = json.loads((docs / "study_quick_results.json").read_text())
    summary = results["summary"]
    assert SUMMARY_KEYS <= set(summary)
    for key in SUMMARY_KEYS - {"hypernet_vs_base_diff", "hypernet_vs_base_se", "heldout_subjects", "seeds", "minutes"}:
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["heldout_subjects"] == 3 and summary["seeds"] == 1 and summary["minutes"] > 0
    assert all(len(row["subject"]) == len(results["subjects"]) for name, row in results["scores"].items() if "training subjects" not in name)
    for image in ("study_quick_fidelity.png", "study_quick_examples.png", "study_quick_validation.png"):
        assert (docs / image).stat().st_size > 0, image
    # --report-only rebuilds the page from the results file alone
    (docs / "study_quick.md").unlink()
    python("-m", "experiments.study", "--report-only", "--quick", "--docs", str(docs))
    assert (docs / "study_quick.md").read_text() == report


def test_ceiling_reads_each_attribute_of_the_hypernet_at_each_strength_and_probes_the_image_features(quick_world, quick_study, tmp_path):
    out = tmp_path / "ceiling.json"
    hypernet = quick_study / "study" / "hypernets" / "hypernet" / "hypernet.safetensors"
    python("-m", "experiments.ceiling", "--quick", "--world", str(quick_world), "--hypernet", str(hypernet), "--cfg", "5", "--strengths", "1", "2",
           "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    probes = [name for name in rows if "linear probe" in name]
    assert {"described, cfg 5", "base model (sks), cfg 5", "hypernet, cfg 5", "hypernet, cfg 5, strength 2", "references, VAE round trip"} <= set(rows)
    # the probe reads what the hypernetwork reads (the study's recipe: the pooled projected embedding)
    assert probes == ["image features (image_embeds), linear probe, pooled", "image features (image_embeds), linear probe, tokens"]
    for name, row in rows.items():
        assert set(row) == {"shape", "primary", "secondary", "pattern", "marking", "identity"}, name
        assert all(0.0 <= value <= 1.0 for value in row.values()), name
        assert abs(row["identity"] - sum(row[a] for a in ("shape", "primary", "secondary", "pattern", "marking")) / 5) < 1e-3, name


def test_objective_ceiling_fits_a_lora_per_subject_on_its_training_views_and_scores_every_method(quick_world, quick_study, tmp_path):
    out = tmp_path / "objective.json"
    hypernet = quick_study / "study" / "hypernets" / "hypernet" / "hypernet.safetensors"
    python("-m", "experiments.objective_ceiling", "--quick", "--world", str(quick_world), "--hypernet", str(hypernet), "--subjects", "2",
           "--steps", "3", "--out", str(out))
    record = json.loads(out.read_text())
    assert list(record["rows"]) == ["base model", "hypernet", "LoRA on the subject's 2 training views", "LoRA on the one reference image"]
    for name, row in record["rows"].items():
        assert len(row["subject"]) == len(row["prompt"]) == 2 and all(0.0 <= v <= 1.0 for v in row["subject"] + row["prompt"]), name
        assert set(row["attributes"]) == {"shape", "primary", "secondary", "pattern", "marking", "identity"}, name
        assert abs(row["attributes"]["identity"] - sum(row["subject"]) / 2) < 2e-3, name  # the same readings, two ways
    assert len(record["view_lora_losses"]) == 1 and all(0 < loss < 10 for loss in record["view_lora_losses"])


def test_finetune_curve_scores_each_step_count_and_each_half_of_the_prediction(quick_world, quick_study, tmp_path):
    out = tmp_path / "curve.json"
    hypernet = quick_study / "study" / "hypernets" / "hypernet" / "hypernet.safetensors"
    python("-m", "experiments.finetune_curve", "--quick", "--world", str(quick_world), "--hypernet", str(hypernet), "--steps", "1", "3",
           "--out", str(out))
    record = json.loads(out.read_text())
    assert list(record["scores"]) == ["base model", "hypernet", "hypernet, text-encoder layers only", "hypernet, UNet layers only",
                                      "hypernet + finetune 1", "LoRA from scratch 1", "hypernet + finetune 3", "LoRA from scratch 3"]
    assert record["learning_rate"] == 1e-4 and record["subjects"] == 3
    for name, row in record["scores"].items():
        assert len(row["subject"]) == 3 and all(0.0 <= v <= 1.0 for v in row["subject"]), name
        assert abs(record["means"][name] - sum(row["subject"]) / 3) < 1e-4, name
    # every paired difference is the mean of the per-subject differences of the rows it names
    name = "hypernet + finetune 1 - LoRA from scratch 3"
    expected = sum(a - b for a, b in zip(record["scores"]["hypernet + finetune 1"]["subject"], record["scores"]["LoRA from scratch 3"]["subject"])) / 3
    assert abs(record["paired"][name]["diff"] - expected) < 1e-4


def test_layers_only_switches_off_every_other_layer_and_keeps_the_rest_exactly():
    from experiments.finetune_curve import layers_only
    from hypernet import LoraWeights

    lora = LoraWeights({"te.q": torch.randn(1, 4), "unet.q": torch.randn(1, 6)}, {"te.q": torch.randn(4, 1), "unet.q": torch.randn(6, 1)})
    (text,) = layers_only([lora], {"te.q"})
    assert torch.equal(text.delta("te.q"), lora.delta("te.q")) and not text.delta("unet.q").any()
    assert text.delta("unet.q").shape == lora.delta("unet.q").shape


def test_objective_ceiling_trains_on_the_very_views_the_study_wrote(tmp_path):
    from dataclasses import replace

    from experiments.objective_ceiling import training_views
    from experiments.study import Plan
    from training.synthetic import SyntheticWorld, write_synthetic_dataset

    plan = replace(Plan(), train_subjects=5, images_per_subject=3)
    write_synthetic_dataset(tmp_path, plan.train_subjects, plan.images_per_subject, size=64, seed=0, split="train")
    world = SyntheticWorld(0)
    views = training_views(world, plan, 4)
    for subject, subject_views in zip(world.subjects(plan.train_subjects, "train")[:4], views):
        written = json.loads((tmp_path / subject.id / "labels.json").read_text())["contexts"]
        assert [context.labels() for context in subject_views] == written


def test_linear_probe_finds_a_planted_attribute_and_not_noise():
    from experiments.feature_probe import linear_probe_accuracy

    generator = torch.Generator().manual_seed(0)
    labels = [i % 4 for i in range(400)]
    signal = torch.nn.functional.one_hot(torch.tensor(labels), 4).float() * 5 + torch.randn(400, 4, generator=generator)
    features = torch.cat([signal, torch.randn(400, 28, generator=generator)], 1)
    assert linear_probe_accuracy(features[:300], labels[:300], features[300:], labels[300:]) > 0.9
    noise = torch.randn(400, 32, generator=generator)
    assert linear_probe_accuracy(noise[:300], labels[:300], noise[300:], labels[300:]) < 0.45
    assert linear_probe_accuracy(signal[:300], labels[:300], signal[300:], [9] * 100) == 0.0  # a class never trained on is a miss


def test_set_overrides_fields_of_the_study_plan_and_the_pretraining_sizes():
    import argparse
    import dataclasses

    from experiments.overrides import apply_overrides
    from experiments.study import Plan
    from experiments.toy_models import Sizes

    parser = argparse.ArgumentParser()
    plan = apply_overrides(Plan(), ["seeds=[0,1,2]", "finetune_lr=1", "hypernet={\"learning_rate\": 0.002}", "world=runs/w"], parser)
    assert plan.seeds == (0, 1, 2) and plan.finetune_lr == 1.0 and isinstance(plan.finetune_lr, float)
    assert plan.hypernet == {"learning_rate": 0.002} and plan.world == "runs/w"
    first = next(f.name for f in dataclasses.fields(Sizes) if type(getattr(Sizes(), f.name)) is int)
    assert getattr(apply_overrides(Sizes(), [f"{first}=7"], parser), first) == 7
    for bad in ("nonsense=1", "seeds", "eval_subjects=many"):
        with pytest.raises(SystemExit):
            apply_overrides(Plan(), [bad], parser)

