"""Pretrain the toy world (base model, image encoder, attribute reader) and ship it in training/toy_model.

    python -m experiments.pretrain --out runs/toy_world           # hours on 2 CPU cores; stages resume when re-run
    python -m experiments.pretrain --out runs/toy_world --pack    # then copy it into training/toy_model (fp16, pruned)
    python -m experiments.pretrain --out runs/quick --quick       # pipeline check in a few minutes

A longer UNet pretraining in parts: link every other stage's output of a finished world into a new folder and run
``--set unet_init=<world>/base/unet unet_steps=N`` there; or continue the shipped world itself with ``--from-shipped``
(its VAE, text tower and reader are reused; its UNet trained further for ``unet_steps``, kept as it is with
``unet_steps=0``; its image encoder's vision tower trained further against the frozen text tower with ``vision_steps=N``). training/toy_model/pretrain.json
records the shipped run.

The study (``python -m experiments.study``) and the README demo (``--preset demo``) use the shipped copy, so
this command runs once per change of the world; its cost is recorded in ``training/toy_model/pretrain.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
from pathlib import Path

import torch

from training.toy_model import TOY_DIR

from .overrides import apply_overrides
from .toy_models import Sizes, pretrain_toy_world, seed_from_shipped_world, seeded_record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/toy_world", help="work folder; finished stages in it are reused")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and step counts (pipeline check)")
    parser.add_argument("--pack", action="store_true", help="copy the result into training/toy_model (fp16, pruned vocabulary)")
    parser.add_argument("--scale", type=float, default=1.0, help="step counts times this (0.25: a quarter of the full pretraining)")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="override single sizes, e.g. unet_steps=6000")
    parser.add_argument("--from-shipped", action="store_true", help="continue the shipped world (training/toy_model): its UNet (unet_steps, 0 keeps it) and, with vision_steps, "
                        "its image encoder; every other part is reused")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = Sizes.quick() if args.quick else Sizes.scaled(args.scale) if args.scale != 1.0 else Sizes()
    sizes = apply_overrides(sizes, args.set, parser)
    out = Path(args.out)
    if args.from_shipped:
        sizes = dataclasses.replace(sizes, unet_init=str(seed_from_shipped_world(out)))
        previous = seeded_record(out)
    timings = pretrain_toy_world(out, sizes)
    record = {"sizes": dataclasses.asdict(sizes), "timings_s": timings, "total_minutes": round(sum(timings.values()) / 60, 1),
              "torch_threads": torch.get_num_threads(), "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
              "torch": torch.__version__}
    if args.from_shipped:  # this run continues the shipped one: keep its record, and the cost of both
        record["continues"] = previous
        record["total_minutes_with_previous"] = round(record["total_minutes"] + previous.get("total_minutes_with_previous", previous["total_minutes"]), 1)
    (out / "pretrain.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"[pretrain] done in {record['total_minutes']} min: {out}", flush=True)
    if args.pack:
        from training.toy_model import pack_toy_model

        pack_toy_model(out, TOY_DIR, record)
        size = sum(f.stat().st_size for f in TOY_DIR.rglob("*") if f.is_file())
        print(f"[pretrain] packed into {TOY_DIR} ({size / 1e6:.1f} MB)", flush=True)


if __name__ == "__main__":
    main()
