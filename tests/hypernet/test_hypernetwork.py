import pytest
import torch

from hypernet import FeatureSpec, HyperNetConfig, HyperNetwork, LidbConfig, attach_lora, locate_targets
from hypernet.errors import FeatureError, HyperNetError
from hypernet.losses import delta_w_l2
from testkit.tiny_models import tiny_text_encoder, tiny_unet, unet_inputs

SPEC = FeatureSpec(dim=24, tokens=5, hidden_state="penultimate_hidden_states", encoder="test")


def make(output="lidb", **kwargs):
    unet, encoder = tiny_unet(), tiny_text_encoder()
    bound = locate_targets(unet, [encoder])
    config = HyperNetConfig(features=SPEC, width=32, depth=2, heads=4, iterations=3, output=output, lidb=LidbConfig(rank=2, a=8, b=6), lora_rank=2, **kwargs)
    torch.manual_seed(0)
    return HyperNetwork(config, bound.layers), unet, bound


def features(batch=2, seed=0):
    return torch.randn(batch, SPEC.tokens, SPEC.dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("output", ["lidb", "lora"])
def test_fresh_hypernetwork_predicts_zero_delta_but_learns(output):
    hypernet, unet, bound = make(output)
    out = hypernet(features())
    assert delta_w_l2(out.lora).abs().max() == 0  # a fresh hypernetwork starts at the base model
    name = bound.names[0]
    expected = 2 * (8 + 6) if output == "lidb" else 2 * (bound.layers[0].in_features + bound.layers[0].out_features)
    assert out.trainables[name].shape == (2, expected)
    assert out.lora.up[name].shape == (2, bound.layers[0].out_features, 2)
    # gradients reach the heads through the frozen UNet despite the zero start (no saddle point)
    with attach_lora(bound.modules, out.lora):
        unet(*unet_inputs(unet, batch=2)).sample.square().mean().backward()
    assert hypernet.heads.weights[0].grad.abs().sum() > 0


def test_hypernetwork_learns_to_map_images_to_distinct_weights():
    hypernet, _, bound = make()
    inputs = features(2, seed=1)
    generator = torch.Generator().manual_seed(5)
    targets = {n: torch.randn(2, p, generator=generator) * 0.3 for n, p in zip(bound.names, hypernet.trainable_sizes)}
    optimizer = torch.optim.Adam(hypernet.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        out = hypernet(inputs)
        loss = sum((out.trainables[n] - targets[n]).square().mean() for n in bound.names)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
    out = hypernet(inputs)
    assert (out.trainables[bound.names[0]][0] - out.trainables[bound.names[0]][1]).abs().max() > 0.1  # image-dependent


def test_several_reference_images_are_averaged():
    hypernet, _, bound = make()
    with torch.no_grad():
        for p in hypernet.heads.weights:
            p.normal_(0, 0.05)
    refs = features(3, seed=2)
    predicted = hypernet.predict(refs)
    direct = hypernet(refs.mean(0, keepdim=True))
    assert torch.equal(predicted.trainables[bound.names[5]], direct.trainables[bound.names[5]])
    assert predicted.trainables[bound.names[5]].shape[0] == 1


def test_iterations_refine_and_token_embedding_option():
    hypernet, _, _ = make(token_embedding_dim=16)
    with torch.no_grad():
        for p in hypernet.heads.weights:
            p.normal_(0, 0.05)
    out = hypernet(features())
    assert out.token_embedding.shape == (2, 16)
    one_round = HyperNetwork(HyperNetConfig(**{**hypernet.config.__dict__, "iterations": 1}), hypernet.layers)
    one_round.load_state_dict(hypernet.state_dict())
    first = one_round(features()).trainables
    assert any((first[n] - out.trainables[n]).abs().max() > 1e-6 for n in first)


def test_bad_features_are_refused_with_clear_messages():
    hypernet, _, _ = make()
    with pytest.raises(FeatureError, match=r"expects image features of shape \(batch, 5, 24\)"):
        hypernet(torch.randn(1, 5, 32))
    bad = features(1)
    bad[0, 0, 0] = float("nan")
    with pytest.raises(FeatureError, match="NaN"):
        hypernet(bad)
    with pytest.raises(HyperNetError, match="output must be"):
        HyperNetConfig(features=SPEC, output="dense")
