import pytest
import torch

from hypernet import LoraWeights, attach_lora, locate_targets, merge_lora
from hypernet.errors import TargetMismatchError
from testkit.tiny_models import tiny_text_encoder, tiny_unet, unet_inputs


def random_lora(layers, rank=2, batch=None, seed=0, scale=0.2):
    generator = torch.Generator().manual_seed(seed)
    lead = () if batch is None else (batch,)
    down = {l.name: torch.randn(*lead, rank, l.in_features, generator=generator) * scale for l in layers}
    up = {l.name: torch.randn(*lead, l.out_features, rank, generator=generator) * scale for l in layers}
    return LoraWeights(down, up)


@pytest.fixture(scope="module")
def model():
    unet = tiny_unet()
    return unet, locate_targets(unet), unet_inputs(unet, batch=3)


def run(unet, inputs):
    with torch.no_grad():
        return unet(*inputs).sample


def test_hooks_equal_merged_weights_and_unmerge_restores_exactly(model):
    unet, bound, inputs = model
    lora = random_lora(bound.layers)
    before = {n: m.weight.clone() for n, m in bound.modules.items()}
    base = run(unet, inputs)
    with attach_lora(bound.modules, lora, strength=0.7):
        hooked = run(unet, inputs)
    with merge_lora(bound.modules, lora, strength=0.7):
        merged = run(unet, inputs)
    assert (hooked - base).abs().max() > 1e-3  # the LoRA does something
    torch.testing.assert_close(hooked, merged, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(m.weight, before[n]) for n, m in bound.modules.items())
    assert torch.equal(run(unet, inputs), base)  # hooks removed


def test_per_sample_loras_in_one_batch_equal_one_by_one(model):
    unet, bound, (sample, timesteps, context) = model
    loras = random_lora(bound.layers, batch=3, seed=1)
    with attach_lora(bound.modules, loras):
        batched = run(unet, (sample, timesteps, context))
    for i in range(3):
        with attach_lora(bound.modules, loras.select(i)):
            single = run(unet, (sample[i : i + 1], timesteps[i : i + 1], context[i : i + 1]))
        torch.testing.assert_close(batched[i : i + 1], single, rtol=1e-4, atol=1e-5)


def test_strength_zero_is_the_base_model_exactly_and_gates_select_samples(model):
    unet, bound, inputs = model
    lora = random_lora(bound.layers, seed=2)
    base = run(unet, inputs)
    with attach_lora(bound.modules, lora, strength=0.0):
        assert torch.equal(run(unet, inputs), base)
    with attach_lora(bound.modules, lora, strength=1.0):
        adapted = run(unet, inputs)
    with attach_lora(bound.modules, lora, strength=torch.tensor([1.0, 0.0, 1.0])):
        gated = run(unet, inputs)
    assert torch.equal(gated[1], base[1])
    torch.testing.assert_close(gated[[0, 2]], adapted[[0, 2]], rtol=1e-5, atol=1e-6)


def test_gradients_flow_into_the_predicted_factors(model):
    unet, bound, inputs = model
    lora = random_lora(bound.layers, batch=3, seed=3)
    for tensor in list(lora.down.values()) + list(lora.up.values()):
        tensor.requires_grad_(True)
    with attach_lora(bound.modules, lora):
        unet(*inputs).sample.square().mean().backward()
    name = bound.names[0]
    assert lora.up[name].grad is not None and lora.up[name].grad.abs().sum() > 0
    assert lora.down[name].grad[1].abs().sum() > 0
    assert all(p.grad is None for p in unet.parameters())  # backbone stays frozen


def test_text_encoder_hooks_and_bad_batches():
    encoder = tiny_text_encoder()
    bound = locate_targets(None, [encoder])
    ids = torch.randint(3, 1000, (2, 7))
    lora = random_lora(bound.layers, seed=4)
    with torch.no_grad():
        base = encoder(ids).last_hidden_state
        with attach_lora(bound.modules, lora):
            adapted = encoder(ids).last_hidden_state
        with merge_lora(bound.modules, lora):
            merged = encoder(ids).last_hidden_state
    torch.testing.assert_close(adapted, merged, rtol=1e-4, atol=1e-5)
    assert (adapted - base).abs().max() > 1e-3
    with pytest.raises(TargetMismatchError, match="3 per-sample LoRAs for a batch of 2"):
        with attach_lora(bound.modules, random_lora(bound.layers, batch=3)), torch.no_grad():
            encoder(ids)
    with pytest.raises(TargetMismatchError, match="cannot be merged"):
        merge_lora(bound.modules, random_lora(bound.layers, batch=2))
    with pytest.raises(TargetMismatchError, match="not found in the model"):
        attach_lora({}, lora)
