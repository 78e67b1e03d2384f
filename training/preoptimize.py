"""Pre-optimise one LiDB subject LoRA per subject (HyperDreamBooth's weight-space supervision targets).

    python -m training.preoptimize --config my.yaml --preopt-steps 300 --preopt-dir runs/preopt
    python -m training.train --config my.yaml --preopt-dir runs/preopt --weight-space-weight 0.1

Each subject's LiDB trainables are optimised directly with the same denoising objective the hypernetwork
is trained with (same backbone, targets, aux bases and prompts), then written as a compact subject LoRA
named after the subject id, which is what ``training.train --preopt-dir`` reads. ``--preopt-group N`` optimises N
subjects in one batch (each on its own images; the mean loss scales each subject's gradient by 1/N, which Adam
does not see), much faster for small models.
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


class FixedSubjects(nn.Module):
    """Stands in for the hypernetwork: one set of LiDB trainables per subject of a group, each batch element using
    its own subject's (``rows``, the subject of every element, is set before each step)."""

    def __init__(self, basis: LidbBasis, count: int):
        super().__init__()
        self.basis = basis
        self.values = nn.ParameterDict({str(i): nn.Parameter(torch.stack([self._init(layer) for _ in range(count)])) for i, layer in enumerate(basis.layers)})
        self.rows = torch.zeros(count, dtype=torch.long)

    def _init(self, layer) -> torch.Tensor:
        # LoRA's init in LiDB coordinates: zero A_train (up), small random B_train (down)
        a, b = self.basis.config.layer_dims(layer)
        r = self.basis.config.rank
        return torch.cat([torch.zeros(a * r), torch.randn(r * b) / b**0.5])

    def trainables(self, subject: int) -> dict[str, torch.Tensor]:
        return {layer.name: self.values[str(i)][subject] for i, layer in enumerate(self.basis.layers)}

    def forward(self, features: torch.Tensor | None) -> HyperNetOutput:
        trainables = {layer.name: self.values[str(i)][self.rows] for i, layer in enumerate(self.basis.layers)}
        return HyperNetOutput(trainables, self.basis.expand(trainables))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preopt-steps", type=int, default=300, help="Optimisation steps per subject (default: 300).")
    parser.add_argument("--preopt-learning-rate", type=float, default=1e-2, help="Adam learning rate on the LiDB numbers (default: 1e-2).")
    parser.add_argument("--preopt-group", type=int, default=1,
                        help="Subjects optimised together, each on its own --batch-size images per step (default: 1; a step then holds "
                             "group x batch-size images: faster on small models, more memory)")
    args, rest = parser.parse_known_args(argv)
    if args.preopt_steps < 1 or args.preopt_group < 1 or not args.preopt_learning_rate > 0:
        parser.error("--preopt-steps and --preopt-group must be at least 1 and --preopt-learning-rate positive")
    try:
        preoptimize(load_config(rest), args.preopt_steps, args.preopt_learning_rate, args.preopt_group)
    except TrainingError as error:
        raise exit_for(error, "python -m training.preoptimize") from None


def preoptimize(config, steps: int, learning_rate: float, group: int = 1) -> None:
    """One compact LiDB subject LoRA per subject of ``config.data``, optimised ``steps`` times, into ``config.preopt_dir``;
    ``group`` subjects at a time in one batch, each subject's trainables seeing only its own images."""
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
    subjects = list(enumerate(dataset.subjects))
    for group_index, first in enumerate(range(0, len(subjects), group)):
        members = subjects[first : first + group]
        torch.manual_seed(config.seed + first)
        model = FixedSubjects(basis, len(members)).to(device)
        model.rows = torch.arange(len(members), device=device).repeat_interleave(config.batch_size)
        optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
        items = [[i for i, (s, _) in enumerate(dataset.items) if s == subject_index] for subject_index, _ in members]
        for step in range(steps):
            generator = step_generator(config.seed, step, group_index)
            samples = [dataset.get(own[int(torch.randint(len(own), (), generator=generator))], generator) for own in items for _ in range(config.batch_size)]
            batch = SubjectBatches.assemble(samples, None, config, device)  # FixedSubjects ignores features
            optimizer.zero_grad()
            with objective.step(model, batch, generator) as terms:
                terms["loss"].backward()
            optimizer.step()
        for row, (subject_index, subject) in enumerate(members):
            path = save_compact_subject_lora(out / f"{subject.subject_id}.compact.safetensors", {n: p.detach().cpu() for n, p in model.trainables(row).items()},
                                             basis, base_arch=backbone.arch, provenance={"preoptimized_steps": steps})
            print(f"[{subject_index + 1}/{len(subjects)}] {subject.subject_id} -> {path}", flush=True)
        print(f"  final denoising loss of subjects {first + 1}-{first + len(members)}: {terms['denoise'].item():.4f}", flush=True)

if __name__ == "__main__":
    main()
