"""Start-up cost of scanning a subject folder: every image is decoded once (so a truncated file is skipped up
front instead of crashing training when drawn). Compares that with the header-only ``Image.verify`` check.

    python benchmarks/data_scan.py [--images 200] [--size 512]

Writes ``--images`` random-content JPEGs of ``--size`` px (one subject each) and the demo's synthetic set
(200 subjects x 4 PNGs, 64 px) to a temporary folder, and times ``SubjectFolderDataset`` on both, next to a
verify-only scan of the same files. Also times one training draw (``dataset.get``) for scale.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training.data import IMAGE_SUFFIXES, SubjectFolderDataset  # noqa: E402
from training.synthetic import write_synthetic_dataset  # noqa: E402


def verify_only(root: Path) -> int:
    count = 0
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            with Image.open(path) as image:
                image.verify()
            count += 1
    return count


def best_of(function, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        photos = Path(scratch) / "photos"
        photos.mkdir()
        rng = np.random.default_rng(0)
        for index in range(args.images):
            base = rng.integers(0, 256, (args.size // 16, args.size // 16, 3), dtype=np.uint8)  # smooth-ish content, photo-like JPEG size
            Image.fromarray(base).resize((args.size, args.size), Image.BICUBIC).save(photos / f"{index:04d}.jpg", quality=90)
        synthetic = write_synthetic_dataset(Path(scratch) / "synthetic", 200, 4, size=64, seed=0)
        print("| folder | images | decode-at-scan (s) | verify-only (s) | per image, decode (ms) | one draw (ms) |")
        print("|---|---|---|---|---|---|")
        for name, root in ((f"{args.images} JPEGs {args.size} px", photos), ("demo synthetic, 800 PNGs 64 px", synthetic)):
            dataset = SubjectFolderDataset(root, 64)
            count = len(dataset)
            scan = best_of(lambda: SubjectFolderDataset(root, 64))
            verify = best_of(lambda: verify_only(root))
            draw = statistics.median(best_of(lambda: dataset.get(i, torch.Generator().manual_seed(0)), 1) for i in range(min(count, 50)))
            print(f"| {name} | {count} | {scan:.3f} | {verify:.3f} | {1000 * scan / count:.2f} | {1000 * draw:.2f} |")


if __name__ == "__main__":
    main()
