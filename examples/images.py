"""Image features: a few thousand generated images in, one numpy feature vector per image out.

    python -m examples.images prepare --root DIR [--n 3000]
    python -m tasks run examples.images:features --root DIR
    python -m tasks collect examples.images:features --root DIR --to features.parquet

Images are 64x64 RGB uint8 arrays saved as .npy (numpy only, no image library): a
colored background gradient, a few rectangles and disks, and noise. Features per image
(39 floats): an 8-bin histogram per color channel, each channel's mean and standard
deviation, an 8-bin histogram of the gradient magnitude, and the share of edge pixels.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tasks import filetask

SIZE = 64  # pixels per side
DEFAULT_N = 3000  # images made by `prepare`
HIST_BINS = 8
EDGE_THRESHOLD = 40.0  # gradient magnitude above which a pixel counts as an edge
SHAPES = (1, 6)  # shapes per image: at least, below


def make_image(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """One synthetic RGB image, uint8 (size, size, 3)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    a, b = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    img = a * (1 - xx[..., None]) + b * yy[..., None] * 0.5
    for _ in range(rng.integers(*SHAPES)):
        color = rng.uniform(0, 255, 3).astype(np.float32)
        cx, cy, r = rng.uniform(0, 1, 3) * (1, 1, 0.3) + (0, 0, 0.05)
        if rng.random() < 0.5:
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        else:
            mask = (abs(xx - cx) < r) & (abs(yy - cy) < r * rng.uniform(0.3, 1.5))
        img[mask] = color
    img += rng.normal(0, 8, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def image_features(img: np.ndarray) -> np.ndarray:
    """The feature vector of one image, float32 (39,)."""
    pixels = img.reshape(-1, 3).astype(np.float32)
    hists = [np.histogram(pixels[:, c], bins=HIST_BINS, range=(0, 256))[0] / len(pixels)
             for c in range(3)]
    gray = pixels.mean(axis=1).reshape(img.shape[:2])
    gy, gx = np.gradient(gray)
    magnitude = np.hypot(gx, gy)
    grad_hist = np.histogram(magnitude, bins=HIST_BINS, range=(0, 128))[0] / magnitude.size
    return np.concatenate([*hists, pixels.mean(axis=0) / 255, pixels.std(axis=0) / 255,
                           grad_hist, [(magnitude > EDGE_THRESHOLD).mean()]]).astype(np.float32)


@filetask(src="images/*.npy", out="features/{stem}.npy")
def features(src: Path, out: Path) -> None:
    np.save(out, image_features(np.load(src)))


def prepare(root: str | Path, *, n: int = DEFAULT_N, seed: int = 0) -> int:
    """Write `n` images under ROOT/images/ (those already there are kept). Returns how
    many were written."""
    folder = Path(root) / "images"
    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for i in range(n):
        path = folder / f"img_{i:05d}.npy"
        if path.exists():
            continue
        rng = np.random.default_rng([seed, i])  # image i is the same whatever n is
        tmp = path.with_name(f".{path.name}")
        np.save(tmp, make_image(rng))
        tmp.rename(path)
        written += 1
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.images", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["prepare"])
    parser.add_argument("--root", required=True, help="run root to write images/ into")
    parser.add_argument("--n", type=int, default=DEFAULT_N, help=f"images (default {DEFAULT_N})")
    args = parser.parse_args(argv)
    written = prepare(args.root, n=args.n)
    held = sum(1 for _ in (Path(args.root) / "images").glob("*.npy"))  # earlier ones are kept
    print(f"wrote {written} images under {args.root}/images, which holds {held}; next:\n"
          f"  python -m tasks run examples.images:features --root {args.root}\n"
          f"  python -m tasks collect examples.images:features --root {args.root} "
          "--to features.parquet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
