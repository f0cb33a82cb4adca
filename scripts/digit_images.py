"""Synthetic ImageFolders drawn from scikit-learn's digits (no download), for the benchmarks' harder tasks.

    .venv/bin/python scripts/digit_images.py digits32 runs/digits-32     # 10 classes (kd_seeds.py --make-data)
    .venv/bin/python scripts/digit_images.py pairs32 runs/digit-pairs-32  # 100 classes (make bench-quant's student)

digits32: each of the 1,797 8x8 digits drawn once into a 32x32 RGB image, at a seeded random size, angle and place,
in two random colours with Gaussian pixel noise: a task a small net does not solve in a few steps, so a teacher
has something to pass on (README: Distillation). Stronger noise (16) and rotation (15 deg) kept the nets at chance
for longer than this host affords.

pairs32: the two-digit numbers 00..99, a left and a right digit side by side in one 32x32 image, drawn the same way
(12 test and 48 train images a class; the train images' digits come from scikit-learn's train split only, the
test images' from its test split). 100 classes a few pixels apart are where INT8's rounding moves predictions:
the 10-class digits lost nothing to MinMax calibration on any student tried (README: make bench-quant).

Both write root/{train,test}/<class>/<n>.png, then a marker file holding the settings, last: a folder with the
marker and the same settings is reused, one with other settings is redrawn, and a non-empty folder without the
marker is refused (it is not one of ours). The drawing has its own seed; the same settings give the same bytes.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

DIGITS32 = {"version": 1, "image_size": 32, "seed": 0, "test_fraction": 0.2, "glyph_px": [18, 26],
            "rotation_deg": 10.0, "min_luma_contrast": 80.0, "noise_std": 10.0}
MARKER = "digits32.json"  # written last: a folder without it (or with other settings) is not one of ours, or partial
PAIRS32 = {"version": 1, "image_size": 32, "seed": 0, "test_fraction": 0.2, "per_class": {"train": 48, "test": 12},
           "glyph_px": [13, 16], "rotation_deg": 10.0, "min_luma_contrast": 60.0, "noise_std": 16.0}
PAIRS_MARKER = "pairs32.json"
KINDS = {"digits32": (DIGITS32, MARKER), "pairs32": (PAIRS32, PAIRS_MARKER)}


def write_digits32(root: Path) -> str:
    """scikit-learn's digits as root/{train,test}/<digit>/<index>.png: 'written' or 'reused'."""
    return write(root, "digits32")


def write_pairs32(root: Path) -> str:
    """Two-digit numbers as root/{train,test}/<00..99>/<n>.png: 'written' or 'reused'."""
    return write(root, "pairs32")


def write(root: Path, kind: str) -> str:
    """The ImageFolder KINDS[kind] describes at root: 'written' or 'reused' (the marker holds the same settings).
    Raises SystemExit for a non-empty folder this script did not write."""
    p, name = KINDS[kind]
    marker = root / name
    if marker.is_file():
        if json.loads(marker.read_text()) == p:
            return "reused"
        shutil.rmtree(root)  # ours, drawn with other settings: redraw
    elif root.is_dir() and any(root.iterdir()):
        raise SystemExit(f"{root} is not empty and has no {name}: it is not a folder this script wrote. Point "
                         f"data.root elsewhere (--set data.root=DIR), or empty it.")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    images, target = digits.images / 16.0, digits.target
    rng = np.random.default_rng(p["seed"])
    train, test = train_test_split(np.arange(len(target)), test_size=p["test_fraction"], stratify=target,
                                   random_state=p["seed"])
    for part, ids in (("train", train), ("test", test)):
        if kind == "digits32":
            for i in sorted(ids):
                _save(_paint([(images[i], None)], rng, p), root / part / str(target[i]) / f"{i:04d}.png")
            continue
        by_digit = {d: [i for i in ids if target[i] == d] for d in range(10)}
        for c in range(100):
            left, right = divmod(c, 10)
            for n in range(p["per_class"][part]):
                a, b = rng.choice(by_digit[left]), rng.choice(by_digit[right])
                _save(_paint([(images[a], 0), (images[b], 1)], rng, p), root / part / f"{c:02d}" / f"{n:03d}.png")
    marker.write_text(json.dumps(p))
    return "written"


def _save(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def _paint(glyphs: list[tuple[np.ndarray, int | None]], rng: np.random.Generator, p: dict) -> np.ndarray:
    """8x8 digits (0..1) as one size x size uint8 RGB image. Each glyph's half: None = anywhere in the image,
    0 / 1 = somewhere in the left / right half."""
    size = p["image_size"]
    ink = np.zeros((size, size), np.float32)
    for digit, half in glyphs:
        side = int(rng.integers(p["glyph_px"][0], p["glyph_px"][1] + 1))
        glyph = Image.fromarray((digit * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR)
        glyph = glyph.rotate(float(rng.uniform(-p["rotation_deg"], p["rotation_deg"])), Image.BILINEAR)
        width = size if half is None else size // 2
        x = (0 if half is None else half * width) + int(rng.integers(0, width - side + 1))
        y = int(rng.integers(0, size - side + 1))
        layer = Image.new("L", (size, size))
        layer.paste(glyph, (x, y))
        ink = np.maximum(ink, np.asarray(layer, np.float32) / 255)
    luma = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601: the digits must stand out in brightness, either way
    while True:
        back, fore = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        if abs((fore - back) @ luma) >= p["min_luma_contrast"]:
            break
    image = back * (1 - ink[..., None]) + fore * ink[..., None] + rng.normal(0, p["noise_std"], (size, size, 3))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] not in KINDS:
        raise SystemExit(f"usage: digit_images.py {{{','.join(KINDS)}}} ROOT")
    print(f"{write(Path(argv[1]), argv[0])} {argv[1]}")


if __name__ == "__main__":
    main(sys.argv[1:])
