"""Write scikit-learn's digits (1,797 real 8x8 handwritten digits) as an ImageFolder on disk.

    python benchmarks/make_digits_folder.py OUT [--size 32]

OUT/0 ... OUT/9 each hold that digit's images as 3-channel PNGs (grey replicated), upsampled to
SIZE x SIZE (bilinear). Made offline from the data bundled in the scikit-learn wheel; needs Pillow
(torchvision brings it: pip install -e .[vision]). For ``data=image_folder data.root=OUT``.
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="output directory (created; existing PNGs of the same names are overwritten)")
    ap.add_argument("--size", type=int, default=32, help="side of the square PNGs in pixels (default 32)")
    ap.add_argument("--limit", type=int, default=0, help="at most this many images per class (0: all, ~180)")
    a = ap.parse_args(argv)
    if a.size < 8:
        print(f"--size {a.size}: must be at least 8 (the digits are 8x8)", file=sys.stderr)
        return 2
    try:
        import numpy as np
        from PIL import Image
        from sklearn.datasets import load_digits
    except ImportError as e:
        print(f"make_digits_folder: {e} (Pillow comes with pip install -e .[vision])", file=sys.stderr)
        return 2

    d = load_digits()
    counts = [0] * 10
    for c in range(10):
        os.makedirs(os.path.join(a.out, str(c)), exist_ok=True)
    for i, (img, y) in enumerate(zip(d.images, d.target)):
        y = int(y)
        if a.limit and counts[y] >= a.limit:
            continue
        g = Image.fromarray((img * (255.0 / 16.0)).clip(0, 255).astype(np.uint8), mode="L")
        g = g.resize((a.size, a.size), Image.BILINEAR)
        g.convert("RGB").save(os.path.join(a.out, str(y), f"{i:04d}.png"))
        counts[y] += 1
    print(f"{sum(counts)} images, {a.size}x{a.size} RGB, in {a.out}/0..9 ({min(counts)}-{max(counts)} per class)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
