"""scripts/digit_images.py: the synthetic ImageFolders the benchmarks train on, drawn once, reused, never over
someone else's folder."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scripts.digit_images import DIGITS32, MARKER, PAIRS32, PAIRS_MARKER, write_digits32, write_pairs32

ROOT = Path(__file__).resolve().parents[2]


def test_make_data_draws_the_digits_as_a_32x32_colour_imagefolder_once(tmp_path):
    root = tmp_path / "digits-32"
    assert write_digits32(root) == "written"
    counts = {part: {c.name: len(list(c.glob("*.png"))) for c in (root / part).iterdir()} for part in ("train", "test")}
    assert sorted(counts["train"]) == sorted(counts["test"]) == [str(d) for d in range(10)]
    assert sum(counts["train"].values()) + sum(counts["test"].values()) == 1797  # each digit drawn once
    assert sum(counts["test"].values()) == 360  # 20 %, rounded up as scikit-learn rounds
    first = sorted((root / "test" / "3").glob("*.png"))[0]
    image = np.asarray(Image.open(first))
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    # coloured, not grey: the channels differ
    assert np.abs(image[..., 0].astype(int) - image[..., 1]).mean() > 1
    # a second call keeps the folder; a marker with other settings is redrawn, to the same bytes
    before = first.read_bytes()
    assert write_digits32(root) == "reused"
    (root / MARKER).write_text(json.dumps({**DIGITS32, "noise_std": 0}))
    assert write_digits32(root) == "written" and first.read_bytes() == before


def test_make_data_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "photo.png").write_bytes(b"")
    with pytest.raises(SystemExit, match="not a folder this script wrote"):
        write_digits32(tmp_path / "mine")
    assert (tmp_path / "mine" / "photo.png").exists()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> tuple[Path, str]:
    """pairs32 drawn once for this module (6,000 PNGs): (root, what write_pairs32 said)."""
    root = tmp_path_factory.mktemp("pairs") / "pairs"
    return root, write_pairs32(root)


def test_pairs_are_100_classes_of_two_digits_side_by_side(pairs):
    root, said = pairs
    assert said == "written"
    for part in ("train", "test"):
        classes = sorted(c.name for c in (root / part).iterdir())
        assert classes == [f"{c:02d}" for c in range(100)]
        assert {len(list((root / part / c).glob("*.png"))) for c in classes} == {PAIRS32["per_class"][part]}
    image = np.asarray(Image.open(root / "test" / "47" / "000.png"))
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    # the two halves hold different digits: the 8x8 glyphs differ, so the halves are not the same picture
    assert np.abs(image[:, :16].astype(int) - image[:, 16:]).mean() > 1
    assert json.loads((root / PAIRS_MARKER).read_text()) == PAIRS32
    assert write_pairs32(root) == "reused"


def test_the_command_line_writes_a_kind_and_refuses_an_unknown_one(tmp_path):
    ok = subprocess.run([sys.executable, "scripts/digit_images.py", "digits32", str(tmp_path / "d")], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and ok.stdout.startswith("written") and (tmp_path / "d" / MARKER).is_file()
    bad = subprocess.run([sys.executable, "scripts/digit_images.py", "cifar", str(tmp_path / "c")], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "usage" in bad.stderr and not (tmp_path / "c").exists()


def test_the_digit_pairs_recipe_points_at_pairs32_and_checks_out(pairs, tmp_path):
    """recipes/digit-pairs-32.yaml reads where the README's command writes, and its models give 100 scores."""
    import yaml
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.config import RECIPES_DIR
    recipe = yaml.safe_load((RECIPES_DIR / "digit-pairs-32.yaml").read_text())
    assert recipe["data"]["root"] == "../runs/digit-pairs-32"
    recipe["data"]["root"] = str(pairs[0])
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    res = CliRunner().invoke(app, ["check", "--recipe", str(tmp_path / "recipe.yaml")], env={"PIPELINE_DEVICE": ""})
    assert res.exit_code == 0, res.stdout
    assert "100 classes, 6,000 images" in res.stdout and "gives 100 class scores" in res.stdout
