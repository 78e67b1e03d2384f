"""Computed GPU memory of one SDXL hypernetwork training step at 1024 px (no GPU needed, nothing allocated).

    python benchmarks/sdxl_memory.py [--resolution 1024] [--batch-sizes 1 2] [--json out.json]

The full SDXL base architecture (shipped configs) runs forward on PyTorch's meta device, in bf16, with the
hypernetwork (width 512, depth 2, 4 rounds, LiDB defaults, float32, fed 257 x 1024 ViT-L features) predicting a
per-sample LoRA that is hooked onto all 736 target layers (UNet and both text encoders), as a training step does. A saved-tensor hook adds up what autograd keeps for backward
(each storage once, parameters
excluded). Attention is modelled as a fused (flash / memory-efficient) kernel, which keeps q, k, v, the output and
a float32 log-sum-exp per row -- what PyTorch's SDPA keeps on a GPU -- not the N x N matrix. With gradient
checkpointing (diffusers' own, one checkpoint per res/transformer block) only the block inputs stay; backward then
recomputes one block at a time, so the peak adds the largest block's own saved tensors and, as the gradient
buffers in flight, twice the largest activation tensor. Weights, the hypernetwork and its AdamW state are counted
from parameter counts. It is arithmetic on real shapes, not a measurement: allocator fragmentation, CUDA context
(~0.5 GB) and workspace are not in it.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GIB = 2**30


class FusedAttention(torch.autograd.Function):
    """Shapes and saved tensors of a fused SDPA kernel (q, k, v, output, float32 log-sum-exp)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - never run (meta device, no backward)
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    return FusedAttention.apply(query, key, value)


class SavedBytes:
    """Counts each storage autograd saves once; parameters (already resident as weights) are left out."""

    def __init__(self, parameters):
        self.parameters = {id(p) for p in parameters}
        self.seen: dict[int, int] = {}
        self.largest = 0

    def pack(self, tensor):
        base = tensor._base if tensor._base is not None else tensor
        if id(base) not in self.parameters and id(tensor) not in self.parameters:
            size = base.numel() * base.element_size()
            self.seen[id(base)] = size
            self.largest = max(self.largest, size)
            self._keep.append(base)  # ids stay unique while the tensors live
        return tensor

    @contextmanager
    def counting(self):
        self._keep = []
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            yield self

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def build(dtype):
    from training.backbone import sdxl_meta_modules

    modules = sdxl_meta_modules()
    for model in modules:
        model.to(dtype).requires_grad_(False)
    return modules


def build_hypernet(layers):
    """The sdxl preset's hypernetwork, built on the CPU (its LiDB bases are integer-exact numpy) and moved to meta."""
    from hypernet import FeatureSpec, HyperNetConfig, HyperNetwork, LidbConfig

    config = HyperNetConfig(features=FeatureSpec(dim=1024, tokens=257), width=512, depth=2, heads=8, iterations=4, lidb=LidbConfig())
    hypernet = HyperNetwork(config, layers).to("meta")
    hypernet.check_features = lambda features: features  # its NaN check reads values, which meta tensors do not have
    return hypernet


def step_memory(unet, te1, te2, hypernet, batch: int, resolution: int, checkpointing: bool, dtype) -> dict:
    """Saved-for-backward bytes of one training forward (hypernetwork, text encoders, UNet, LoRA on every target layer)."""
    from hypernet import attach_lora, locate_targets

    unet_targets = locate_targets(unet)
    text_targets = locate_targets(None, [te1, te2])
    # parameters and buffers (the LiDB aux bases) are resident anyway: not activations
    counter = SavedBytes([t for m in (unet, te1, te2, hypernet) for t in (*m.parameters(), *m.buffers())])
    blocks = {"largest": 0}

    def checkpoint(function, *args, **kwargs):
        # what this block alone keeps when run without checkpointing (the peak of its recomputation in backward)
        inner = SavedBytes(counter.parameters)
        with inner.counting():
            function(*args, **kwargs)
        blocks["largest"] = max(blocks["largest"], inner.total)
        for arg in args:  # a checkpointed block keeps its inputs
            if isinstance(arg, torch.Tensor):
                counter.pack(arg)
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)

    if checkpointing:
        unet.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)
    else:
        unet.disable_gradient_checkpointing()
    ids = torch.zeros(batch, 77, dtype=torch.long, device="meta")
    latent = resolution // 8
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = fused_sdpa
    try:
        with counter.counting():
            lora = hypernet(torch.empty(batch, 257, 1024, device="meta")).lora
            part = lambda modules: lora.restricted_to(modules).to(dtype)  # noqa: E731
            hypernet_saved = counter.total
        with counter.counting(), attach_lora(text_targets.modules, part(text_targets.modules)), attach_lora(unet_targets.modules, part(unet_targets.modules)):
            first = te1(ids, output_hidden_states=True).hidden_states[-2]
            second = te2(ids, output_hidden_states=True)
            context = torch.cat([first, second.hidden_states[-2]], dim=-1)
            x = torch.empty(batch, 4, latent, latent, device="meta", dtype=dtype)
            added = {"text_embeds": second.text_embeds, "time_ids": torch.empty(batch, 6, device="meta")}
            out = unet(x, torch.zeros(batch, dtype=torch.long, device="meta"), context, added_cond_kwargs=added).sample
    finally:
        F.scaled_dot_product_attention = original
    return {"saved": counter.total, "hypernet_saved": hypernet_saved, "largest_tensor": max(counter.largest, out.numel() * out.element_size()), "largest_block": blocks["largest"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json")
    args = parser.parse_args()
    from hypernet import locate_targets

    dtype = torch.bfloat16
    unet, te1, te2 = build(dtype)
    layers = locate_targets(unet, [te1, te2]).layers
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in (("unet", unet), ("clip_l", te1), ("clip_g", te2))}
    weights = 2 * sum(counts.values())  # bf16
    hypernet = build_hypernet(layers)
    hyper = sum(p.numel() for p in hypernet.parameters())
    aux = sum(b.numel() * b.element_size() for b in hypernet.buffers())  # the frozen LiDB aux bases (fp32)
    hyper_state = 16 * hyper + aux  # fp32 weights + grads + AdamW's two moments, and the aux bases
    rows = {}
    for checkpointing in (False, True):
        for batch in args.batch_sizes:
            m = step_memory(unet, te1, te2, hypernet, batch, args.resolution, checkpointing, dtype)
            peak = m["saved"] + (m["largest_block"] + 2 * m["largest_tensor"] if checkpointing else 2 * m["largest_tensor"])
            rows[f"{'checkpointing' if checkpointing else 'no checkpointing'}, batch {batch}"] = {**m, "activation_peak": peak,
                                                                                                   "total": weights + hyper_state + peak}
    print(f"SDXL base, {args.resolution} px, bf16 weights, hypernetwork LoRA on {len(layers)} layers; computed on the meta device (no GPU)")
    print(f"weights: UNet {counts['unet'] / 1e9:.3f}B + CLIP-L {counts['clip_l'] / 1e6:.0f}M + bigG {counts['clip_g'] / 1e6:.0f}M params = {weights / GIB:.2f} GiB (bf16)")
    print(f"hypernetwork (width 512, depth 2): {hyper / 1e6:.1f}M params, with grads, AdamW state and its {aux / GIB:.2f} GiB of "
          f"LiDB aux bases {hyper_state / GIB:.2f} GiB (fp32)")
    print("VAE and image encoder: off the GPU with --cache-latents --cache-features")
    print(f"{'case':32s} {'saved':>9s} {'of it hypernet':>15s} {'largest block':>14s} {'activation peak':>16s} {'step total':>11s}")
    for name, row in rows.items():
        print(f"{name:32s} {row['saved'] / GIB:8.2f}G {row['hypernet_saved'] / GIB:14.2f}G {row['largest_block'] / GIB:13.2f}G "
              f"{row['activation_peak'] / GIB:15.2f}G {row['total'] / GIB:10.2f}G")
    for checkpointing in ("no checkpointing", "checkpointing"):
        keys = [k for k in rows if k.startswith(checkpointing + ",")]
        if len(keys) >= 2:
            b0, b1 = args.batch_sizes[0], args.batch_sizes[1]
            per = (rows[keys[1]]["activation_peak"] - rows[keys[0]]["activation_peak"]) / (b1 - b0)
            print(f"per batch element, {checkpointing}: {per / GIB:.2f} GiB")
    if args.json:
        Path(args.json).write_text(json.dumps({"resolution": args.resolution, "weights": weights, "hypernet_params": hyper, "lidb_aux_bytes": aux, "hypernet_state": hyper_state,
                                               "params": counts, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
