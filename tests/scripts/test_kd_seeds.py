"""scripts/kd_seeds.py, the source of the README's gap-closed figures: one row per seed and variant, then means;
the imagefolder-32 recipe on --make-data's 32x32 ImageFolder."""
from __future__ import annotations

import re
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.config import RECIPES_DIR, load_recipe
from scripts.digit_images import write_digits32

ROOT = Path(__file__).resolve().parents[2]


def test_rows_per_seed_and_variant_then_means_over_seeds():
    out = subprocess.run(
        [sys.executable, "scripts/kd_seeds.py", "--seeds", "0,1", "--set", "teacher.epochs=3",
         "--set", "distill.epochs=2", "--variant", "", "--variant", "distill.method=hinton;distill.temperature=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True).stdout
    num = r"(\d\.\d{4})"
    rows = re.findall(rf"^ +(\d) +{num} +{num} +{num} +(\S+) +\d+  (.*)$", out, re.M)
    assert [(r[0], r[5]) for r in rows] == [("0", ""), ("0", "distill.method=hinton;distill.temperature=2"),
                                            ("1", ""), ("1", "distill.method=hinton;distill.temperature=2")]
    for _seed, teacher, kd, scratch, gap, _ in rows:
        t, k, s = float(teacher), float(kd), float(scratch)
        # printed accuracies are rounded to 4 places and the gap is a few test images: a loose tolerance
        assert gap == "n/a" if t <= s else abs(float(gap) - (k - s) / (t - s)) < 0.05
    assert rows[0][1] == rows[1][1] and rows[2][1] == rows[3][1]  # variants share the seed's teacher
    means = re.findall(rf"^mean +{num} +{num} +{num} .*\)$", out, re.M)
    assert len(means) == 2
    for mean, variant_rows in zip(means, (rows[0::2], rows[1::2])):
        for i in range(3):
            assert abs(float(mean[i]) - sum(float(r[i + 1]) for r in variant_rows) / 2) < 1e-4
    sds = re.findall(rf"^  sd +{num} +{num} +{num} .*KD - scratch per seed: ([-+]\d\.\d{{4}}) \+- (\d\.\d{{4}})\)$",
                     out, re.M)
    assert len(sds) == 2
    for sd, variant_rows in zip(sds, (rows[0::2], rows[1::2])):
        for i in range(3):
            assert abs(float(sd[i]) - statistics.stdev(float(r[i + 1]) for r in variant_rows)) < 2e-4
        diff = [float(r[2]) - float(r[3]) for r in variant_rows]
        assert abs(float(sd[3]) - statistics.mean(diff)) < 2e-4 and abs(float(sd[4]) - statistics.stdev(diff)) < 2e-4


def test_imagefolder_32_recipe_loads_on_the_drawn_digits(tmp_path):
    """The recipe's data, teacher and student check out against what --make-data writes (10 classes, 32x32 RGB)."""
    write_digits32(tmp_path / "digits-32")
    recipe = yaml.safe_load((RECIPES_DIR / "imagefolder-32.yaml").read_text())
    assert recipe["data"]["root"] == "../runs/digits-32"  # where --make-data writes it, beside the recipes
    recipe["data"]["root"] = str(tmp_path / "digits-32")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    r = load_recipe(path)
    assert r.data.image_size == 32 and r.data.channels == 3 and r.models.teacher.arch == "resnet"
