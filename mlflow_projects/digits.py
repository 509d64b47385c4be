"""scikit-learn's digits for the projects here (demo_target, weak_testbed): class-balanced seeded splits and
the 16x16 images the models see. Each project's train.py puts this folder on sys.path."""

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

SIZE = 16


def split_digits(sizes, seed):
    """`sizes`: {split name: number of images}, dealt in that order. Each class is shuffled with a fixed seed
    and images are dealt round-robin over the ten classes, so every split is as class-balanced as its size
    allows. Returns the dataset, {name: sorted indices} and the indices left over (sorted)."""
    digits = load_digits()
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(digits.target == c)).tolist() for c in range(10)]

    def take(n):
        out = []
        while len(out) < n:
            c = len(out) % 10
            if not per_class[c]:
                raise ValueError("not enough digits of class %d for the requested split" % c)
            out.append(int(per_class[c].pop()))
        return sorted(out)

    splits = {name: take(n) for name, n in sizes.items()}
    return digits, splits, sorted(int(i) for rest in per_class for i in rest)


def to_image(pixels8x8):
    """8x8 array of 0..16 -> 16x16 grayscale PIL image (bicubic)."""
    arr = np.clip(np.round(pixels8x8 * 255.0 / 16.0), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, mode="L").resize((SIZE, SIZE), Image.BICUBIC)
