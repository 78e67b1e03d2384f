"""Training objectives: denoising, the hypernetwork-output L2 penalty, weight-space and NN-contrastive losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .lora import LoraWeights


def denoising_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error ``(B,)`` (float32 even under autocast)."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def delta_w_l2(lora: LoraWeights) -> torch.Tensor:
    """Per-sample ``sum_layers ||up @ down||_F^2`` without forming the full matrices.

    ``||U D||_F^2 = trace((U^T U)(D D^T))``: two ``r x r`` Gram matrices per layer.
    """
    total = 0
    for name in lora.names:
        up, down = lora.up[name].float(), lora.down[name].float()
        gram_up = up.transpose(-1, -2) @ up
        gram_down = down @ down.transpose(-1, -2)
        total = total + (gram_up * gram_down.transpose(-1, -2)).sum(dim=(-1, -2))
    return total


def trainables_l2(trainables: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-sample squared norm of the raw predicted numbers (``sum_layers ||theta_l||^2``)."""
    return sum(p.float().pow(2).sum(dim=-1) for p in trainables.values())


def weight_space_loss(trainables: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-sample ``||theta_hat - theta_preopt||^2`` toward pre-optimised per-subject weights (HyperDreamBooth)."""
    return sum((trainables[name].float() - targets[name].float()).pow(2).sum(dim=-1) for name in targets)


def nearest_neighbor_contrastive_loss(
    embeddings: torch.Tensor, vocabulary: torch.Tensor, temperature: float = 0.07, groups: list | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pull each predicted word embedding toward its nearest real vocabulary embedding, away from other subjects'.

    InfoNCE with the nearest neighbour ``n_i`` (by cosine, chosen without gradient) as the positive and the
    other subjects' predictions ``v_j`` in the batch as negatives:
    ``-log exp(cos(v_i, n_i)/t) / (exp(cos(v_i, n_i)/t) + sum_{j: other subject} exp(cos(v_i, v_j)/t))``.
    ``vocabulary`` holds only real words (the caller leaves out special tokens and the placeholder itself);
    ``groups`` names each row's subject, so another view of the same subject is never a negative.
    Returns the mean loss and the index (into ``vocabulary``) of each nearest entry.
    """
    v = F.normalize(embeddings.float(), dim=-1)
    vocab = F.normalize(vocabulary.float(), dim=-1)
    with torch.no_grad():
        nearest = (v @ vocab.T).argmax(dim=-1)
    positive = (v * vocab[nearest]).sum(dim=-1, keepdim=True) / temperature
    others = (v @ v.T) / temperature
    if groups is None:
        same = torch.eye(len(v), dtype=torch.bool, device=v.device)
    else:
        codes = {g: i for i, g in enumerate(dict.fromkeys(groups))}
        labels = torch.tensor([codes[g] for g in groups], device=v.device)
        same = labels[:, None] == labels[None, :]
    logits = torch.cat([positive, others.masked_fill(same, float("-inf"))], dim=1)
    loss = -torch.log_softmax(logits, dim=1)[:, 0]
    return loss.mean(), nearest
