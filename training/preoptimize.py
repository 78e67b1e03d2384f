"""Pre-optimise one LiDB subject LoRA per subject (HyperDreamBooth's weight-space supervision targets).

    python -m training.preoptimize --config my.yaml --preopt-steps 300 --preopt-dir runs/preopt
    python -m training.train --config my.yaml --preopt-dir runs/preopt --weight-space-weight 0.1

Each subject's LiDB trainables are optimised directly with the same denoising objective the hypernetwork
is trained with (same backbone, targets, aux bases and prompts), then written as a compact subject LoRA
named after the subject id, which is what ``training.train --preopt-dir`` reads.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
from torch import nn

from hypernet import LidbBasis
from hypernet.files import save_compact_subject_lora
from hypernet.hypernetwork import HyperNetOutput

from .checkpoint import step_generator
from .config import load_config
from .errors import InputError, TrainingError, exit_for
from .inputs import SubjectBatches, open_backbone, open_dataset
from .objective import HyperNetObjective


class FixedSubject(nn.Module):
    """Stands in for the hypernetwork: the same trainables for every batch element."""

    def __init__(self, basis: LidbBasis):
        super().__init__()
        self.basis = basis
        self.values = nn.ParameterDict({str(i): nn.Parameter(self._init(layer)) for i, layer in enumerate(basis.layers)})

    def _init(self, layer) -> torch.Tensor:
        # LoRA's init in LiDB coordinates: zero A_train (up), small random B_train (down)
        a, b = self.basis.config.layer_dims(layer)
        r = self.basis.config.rank
        return torch.cat([torch.zeros(a * r), torch.randn(r * b) / b**0.5])

    def trainables(self) -> dict[str, torch.Tensor]:
        return {layer.name: self.values[str(i)] for i, layer in enumerate(self.basis.layers)}

    def forward(self, features: torch.Tensor) -> HyperNetOutput:
        size = features.shape[0]
        trainables = {n: p.unsqueeze(0).expand(size, -1) for n, p in self.trainables().items()}
        return HyperNetOutput(trainables, self.basis.expand(trainables))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preopt-steps", type=int, default=300, help="Optimisation steps per subject (default: 300).")
    parser.add_argument("--preopt-learning-rate", type=float, default=1e-2, help="Adam learning rate on the LiDB numbers (default: 1e-2).")
    args, rest = parser.parse_known_args(argv)
    try:
        preoptimize(load_config(rest), args.preopt_steps, args.preopt_learning_rate)
    except TrainingError as error:
        raise exit_for(error, "python -m training.preoptimize") from None


def preoptimize(config, steps: int, learning_rate: float) -> None:
    """One compact LiDB subject LoRA per subject of ``config.data``, optimised ``steps`` times, into ``config.preopt_dir``."""
    if not config.preopt_dir:
        raise InputError("--preopt-dir is required: where to write the per-subject compact LoRAs")
    out = Path(config.preopt_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset = open_dataset(config, Path(config.output_dir))
    backbone = open_backbone(config, "cpu" if not torch.cuda.is_available() else "cuda", torch.float32)
    device = next(backbone.unet.parameters()).device
    unet_targets, text_targets = backbone.targets(config.text_encoder_targets)
    layers = unet_targets.layers + (text_targets.layers if text_targets is not None else [])
    basis = LidbBasis(layers, dataclasses.replace(config.lidb_config(), learned_aux=False)).to(device)  # the targets' bases are fixed
    objective = HyperNetObjective(backbone, unet_targets, text_targets, config, backbone.noise_schedule())
    for subject_index, subject in enumerate(dataset.subjects):
        torch.manual_seed(config.seed + subject_index)
        model = FixedSubject(basis).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
        items = [i for i, (s, _) in enumerate(dataset.items) if s == subject_index]
        for step in range(steps):
            generator = step_generator(config.seed, step, subject_index)
            samples = [dataset.get(items[int(torch.randint(len(items), (), generator=generator))], generator) for _ in range(config.batch_size)]
            batch = SubjectBatches.assemble(samples, None, config, device)  # FixedSubject ignores features
            optimizer.zero_grad()
            with objective.step(model, batch, generator) as terms:
                terms["loss"].backward()
            optimizer.step()
        path = save_compact_subject_lora(out / f"{subject.subject_id}.compact.safetensors", {n: p.detach().cpu() for n, p in model.trainables().items()},
                                         basis, base_arch=backbone.arch, provenance={"preoptimized_steps": steps})
        print(f"[{subject_index + 1}/{len(dataset.subjects)}] {subject.subject_id}: final loss {terms['denoise'].item():.4f} -> {path}", flush=True)


if __name__ == "__main__":
    main()
