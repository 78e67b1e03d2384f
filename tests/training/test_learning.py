"""Learning, not just running: end-to-end training lowers the subjects' denoising loss and predicts LoRAs that
differ between subjects, and every term of the composite objective is present with its weight, vanishes at
weight 0 and sends its gradient where it should (and nowhere else)."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch

from hypernet import HyperNetwork, load_hypernet, locate_targets
from training.config import PRESETS, TrainConfig
from training.inputs import SubjectBatches, open_backbone, open_dataset, open_image_encoder
from training.objective import Batch, HyperNetObjective, sample_timesteps


def tiny_config(tmp_path: Path, **overrides) -> TrainConfig:
    values = {**PRESETS["tiny"], "synthetic_subjects": 4, "synthetic_images_per_subject": 2, "batch_size": 4, "sample_subjects": 0,
              "checkpoint_every": 0, "prompt_dropout": 0.0, "flip_prob": 0.0, "learning_rate": 3e-3, "output_dir": str(tmp_path), **overrides}
    return TrainConfig(**values)


def world_of(config: TrainConfig, out: Path):
    backbone = open_backbone(config, "cpu", torch.float32)
    unet_targets = locate_targets(backbone.unet)
    text_targets = locate_targets(None, [backbone.text_encoder])
    schedule = backbone.noise_schedule()
    return backbone, unet_targets, text_targets, schedule


def fixed_losses(objective: HyperNetObjective, model, batch: Batch, draws: int = 12) -> list[float]:
    """Per-draw mean denoising loss, each draw with its own fixed noise and timesteps (the same for every model)."""
    losses = []
    with torch.no_grad():
        for k in range(draws):
            with objective.step(model, batch, torch.Generator().manual_seed(100 + k)) as terms:
                losses.append(float(terms["denoise"]))
    return losses


def spread(output) -> float:
    """Mean pairwise distance between the subjects' predicted dW (all layers) over their mean norm."""
    lora = output.lora
    vectors = torch.stack([torch.cat([lora.select(i).delta(n).flatten() for n in lora.names]) for i in range(lora.batch_size)])
    return float(torch.pdist(vectors).mean() / vectors.norm(dim=1).mean())


def test_a_few_dozen_steps_lower_the_subjects_loss_and_give_each_subject_its_own_lora(tmp_path):
    from training.train import run

    config = tiny_config(tmp_path, max_steps=30)
    run(config)
    trained, _ = load_hypernet(tmp_path / "hypernet.safetensors")
    trained.eval()
    torch.manual_seed(0)
    untrained = HyperNetwork(trained.config, trained.layers).eval()  # predicts dW = 0 exactly

    dataset = open_dataset(config, tmp_path)
    encoder = open_image_encoder(config, "cpu")
    backbone, unet_targets, text_targets, schedule = world_of(config, tmp_path)
    objective = HyperNetObjective(backbone, unet_targets, text_targets, config, schedule)
    samples = [dataset.get(2 * i, torch.Generator().manual_seed(i)) for i in range(len(dataset.subjects))]  # one image of each subject
    assert len({s.subject_id for s in samples}) == 4
    batch = SubjectBatches.assemble(samples, encoder, config, "cpu")

    after, before = fixed_losses(objective, trained, batch), fixed_losses(objective, untrained, batch)
    assert statistics.mean(after) < 0.95 * statistics.mean(before), (statistics.mean(after), statistics.mean(before))
    assert sum(a < b for a, b in zip(after, before)) >= len(after) - 1  # on (almost) every fixed draw, not only on average

    with torch.no_grad():
        zero = untrained(batch.features).lora
        assert all(float(zero.delta(n).abs().max()) == 0.0 for n in zero.names)  # the starting point: dW = 0 for everyone
        assert spread(trained(batch.features)) > 0.02
        # the spread comes from the images: identical references give identical LoRAs
        same = batch.features[:1].expand_as(batch.features)
        assert spread(trained(same)) < 1e-6


@pytest.fixture(scope="module")
def objective_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("objective")
    config = tiny_config(out, token_embedding=True)
    dataset = open_dataset(config, out)
    encoder = open_image_encoder(config, "cpu")
    backbone, unet_targets, text_targets, schedule = world_of(config, out)
    samples = [dataset.get(i, torch.Generator().manual_seed(i)) for i in range(4)]
    batch = SubjectBatches.assemble(samples, encoder, config, "cpu")
    from hypernet import FeatureSpec, HyperNetConfig

    spec = encoder.feature_spec(config.hidden_state)
    hyper_config = HyperNetConfig(features=FeatureSpec(spec.dim, spec.tokens, spec.hidden_state), width=32, depth=1, heads=4, iterations=2,
                                  token_embedding_dim=backbone.text_encoder.get_input_embeddings().embedding_dim)
    torch.manual_seed(0)
    hypernet = HyperNetwork(hyper_config, unet_targets.layers + text_targets.layers)
    with torch.no_grad():  # away from the zero start, so every term has a gradient
        for head in hypernet.heads.weights:
            head.normal_(0, 0.02)
    return config, backbone, unet_targets, text_targets, schedule, batch, hypernet


def terms_and_grads(world, **overrides) -> tuple[dict, dict[str, torch.Tensor | None]]:
    config, backbone, unet_targets, text_targets, schedule, batch, hypernet = world
    config = TrainConfig(**{**config.to_dict(), **overrides})
    preopt = {}
    if config.weight_space_weight > 0:
        preopt = {sid: {l.name: torch.full((size,), 0.1) for l, size in zip(hypernet.layers, hypernet.trainable_sizes)} for sid in batch.subject_ids}
    objective = HyperNetObjective(backbone, unet_targets, text_targets, config, schedule, preopt=preopt)
    hypernet.zero_grad(set_to_none=True)
    with objective.step(hypernet, batch, torch.Generator().manual_seed(0)) as terms:
        terms["loss"].backward()
    grads = {name: (p.grad.clone() if p.grad is not None else None) for name, p in hypernet.named_parameters()}
    assert all(p.grad is None for p in backbone.unet.parameters()) and all(p.grad is None for p in backbone.text_encoder.parameters())
    return {k: float(v.detach()) for k, v in terms.items()}, grads


def gradient_difference(a: dict, b: dict, prefix: str) -> float:
    """Largest change of the gradient, between two objectives, of the parameters whose name starts with ``prefix``."""
    worst = 0.0
    for name in a:
        if name.startswith(prefix):
            ga, gb = a[name], b[name]
            ga = torch.zeros(1) if ga is None else ga
            gb = torch.zeros(1) if gb is None else gb
            worst = max(worst, float((ga - gb).abs().max()))
    return worst


LORA_PARAMETERS = ("heads.", "offset")
EMBEDDING_PARAMETERS = ("token_head.",)


def test_each_objective_term_has_its_weight_vanishes_at_zero_and_reaches_only_its_parameters(objective_world):
    zero = dict(reg_weight=0.0, weight_space_weight=0.0, nn_weight=0.0)
    base_terms, base_grads = terms_and_grads(objective_world, **zero)
    assert set(base_terms) == {"denoise", "reg", "loss"} and base_terms["loss"] == pytest.approx(base_terms["denoise"], rel=1e-6)

    # L2 on the output: loss = denoise + lambda * reg; its gradient moves the LoRA heads, not the word-embedding head
    terms, grads = terms_and_grads(objective_world, **{**zero, "reg_weight": 0.5})
    assert terms["loss"] == pytest.approx(terms["denoise"] + 0.5 * terms["reg"], rel=1e-5) and terms["reg"] > 0
    assert gradient_difference(grads, base_grads, "heads.") > 0 and gradient_difference(grads, base_grads, "offset") > 0
    assert gradient_difference(grads, base_grads, "token_head.") == 0

    # weight-space loss toward pre-optimised LoRAs: present with its weight, on the LoRA outputs only
    terms, grads = terms_and_grads(objective_world, **{**zero, "weight_space_weight": 0.25, "preopt_dir": "unused"})
    assert terms["weight_space"] > 0 and terms["loss"] == pytest.approx(terms["denoise"] + 0.25 * terms["weight_space"], rel=1e-5)
    assert gradient_difference(grads, base_grads, "heads.") > 0 and gradient_difference(grads, base_grads, "token_head.") == 0

    # nearest-neighbour loss on the predicted word embedding: on the embedding head, never on the LoRA offset. (With
    # refinement rounds the embedding token reads the refined LoRA tokens, so the shared decoder and heads feel it.)
    terms, grads = terms_and_grads(objective_world, **{**zero, "nn_weight": 2.0})
    assert terms["nn"] > 0 and terms["loss"] == pytest.approx(terms["denoise"] + 2.0 * terms["nn"], rel=1e-5)
    assert gradient_difference(grads, base_grads, "token_head.") > 0
    assert gradient_difference(grads, base_grads, "offset") == 0

    # a timestep bias changes which noise levels the denoising loss sees, not which terms there are
    terms, _ = terms_and_grads(objective_world, **{**zero, "timestep_bias": 4.0})
    assert set(terms) == {"denoise", "reg", "loss"} and terms["denoise"] != pytest.approx(base_terms["denoise"], rel=1e-6)

    # the denoising loss itself reaches the LoRA heads and, through the placeholder's embedding, the embedding head
    assert all(base_grads[n] is not None and base_grads[n].abs().sum() > 0 for n in base_grads if n.startswith(LORA_PARAMETERS + EMBEDDING_PARAMETERS))


def test_nearest_neighbour_loss_pulls_toward_real_words_and_apart_from_other_subjects():
    """The tuning encoder's regulariser, by its numbers: descending it raises each embedding's cosine to its nearest
    vocabulary word and lowers the cosine between different subjects; another view of the same subject is no negative."""
    from hypernet.losses import nearest_neighbor_contrastive_loss

    generator = torch.Generator().manual_seed(0)
    vocabulary = torch.randn(50, 16, generator=generator)
    groups = ["a", "a", "b", "c"]
    start = torch.randn(4, 16, generator=generator)
    embeddings = start.clone().requires_grad_()

    def cosines(v):
        v = torch.nn.functional.normalize(v.detach(), dim=-1)
        to_word = (v @ torch.nn.functional.normalize(vocabulary, dim=-1).T).max(dim=1).values.mean()
        between = torch.stack([v[i] @ v[j] for i in range(4) for j in range(4) if groups[i] != groups[j]]).mean()
        return float(to_word), float(between)

    before = cosines(start)
    optimizer = torch.optim.SGD([embeddings], lr=0.5)
    for _ in range(100):
        loss, nearest = nearest_neighbor_contrastive_loss(embeddings, vocabulary, 0.07, groups)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = cosines(embeddings)
    print("cosine to nearest word, between subjects: before", before, "after", after)
    assert after[0] > before[0] + 0.05  # (InfoNCE at t = 0.07 stops pulling once the negatives are far: 0.48 -> 0.54)
    assert after[1] < before[1] - 0.1 and abs(after[1]) < 0.02

    # the loss is the formula, term by term: the negatives of row i are the rows of OTHER subjects only
    def by_hand(v, groups_):
        v, vocab = torch.nn.functional.normalize(v, dim=-1), torch.nn.functional.normalize(vocabulary, dim=-1)
        total = 0.0
        for i in range(len(v)):
            positive = torch.exp((v[i] @ vocab.T).max() / 0.07)
            negatives = sum(torch.exp(v[i] @ v[j] / 0.07) for j in range(len(v)) if groups_[j] != groups_[i])
            total += -torch.log(positive / (positive + negatives))
        return total / len(v)

    views = torch.cat([start[:1], start[:1] + 0.01, start[2:]])  # two near-identical views of subject a
    for groups_ in (groups, ["a", "b", "c", "d"]):
        torch.testing.assert_close(nearest_neighbor_contrastive_loss(views, vocabulary, 0.07, groups_)[0], by_hand(views, groups_))
    # were the second view a negative, the near-duplicate would dominate the loss
    assert nearest_neighbor_contrastive_loss(views, vocabulary, 0.07, groups)[0] < 0.5 * nearest_neighbor_contrastive_loss(views, vocabulary, 0.07, None)[0]


def test_vocabulary_for_the_nearest_neighbour_loss_is_real_words_only():
    from types import SimpleNamespace

    from training.objective import real_word_ids

    table = torch.nn.Embedding(8, 4)
    with torch.no_grad():
        table.weight[5] = 0  # a row a pruned vocabulary left empty
    backbone = SimpleNamespace(tokenizer=SimpleNamespace(all_special_ids=[0, 7]), text_encoder=SimpleNamespace(get_input_embeddings=lambda: table))
    assert real_word_ids(backbone, placeholder_id=3).tolist() == [1, 2, 4, 6]


def test_timestep_bias_draws_the_noisier_half_that_many_times_as_often():
    uniform = sample_timesteps(1000, 20000, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(uniform, torch.randint(0, 1000, (20000,), generator=torch.Generator().manual_seed(0)))  # old runs reproduce
    biased = sample_timesteps(1000, 20000, 3.0, torch.Generator().manual_seed(0))
    assert biased.min() >= 0 and biased.max() <= 999
    assert float((biased >= 500).float().mean()) == pytest.approx(0.75, abs=0.015)
    assert float((uniform >= 500).float().mean()) == pytest.approx(0.5, abs=0.015)
    assert len(torch.unique(biased[biased < 500])) > 400  # the quieter half is still drawn, every step of it about equally
