"""The recipes a user copies run as written, on data and checkpoints the test makes (nothing is downloaded)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline.config import RECIPES_DIR, ModelSpec

TINY_TEACHER = {"arch": "resnet", "kwargs": {"widths": [4, 8, 8, 8], "blocks": [1, 1, 1, 1]}}


def _jpegs(root: Path, per_class: dict[str, int], size: int = 224) -> None:
    """Three classes told apart by their dominant colour, with noise: learnable in an epoch."""
    rng = np.random.default_rng(0)
    base = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}
    for part, n in per_class.items():
        for name, rgb in base.items():
            (root / part / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = np.clip(rng.normal(rgb, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(a).save(root / part / name / f"{i}.jpg", quality=85)


def _tiny_teacher(root: Path, path: Path) -> None:
    """A small ResNet trained for one epoch on the generated images, saved as a plain state_dict."""
    import torch.nn.functional as F

    from pipeline.config import DataConfig
    from pipeline.train import models
    from pipeline.train.data import load_splits
    from pipeline.train.loop import TrainConfig, fit
    data = load_splits(DataConfig(kind="imagefolder", root=root, image_size=224, channels=3,
                                  mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], workers=2), seed=0)
    torch.manual_seed(0)
    model = models.build(ModelSpec.model_validate(TINY_TEACHER), 3, 3, 224)
    fit(model, lambda m, x, y, _: F.cross_entropy(m(x), y), data.train, data.val,
        TrainConfig(epochs=2, lr=0.01, batch_size=32, warmup_epochs=0), seed=0, desc="tiny teacher")
    torch.save(model.state_dict(), path)


@pytest.mark.slow
def test_imagefolder_224_recipe_runs_every_stage_on_generated_images(tmp_path):
    _jpegs(tmp_path / "images", {"train": 70, "test": 15})
    _tiny_teacher(tmp_path / "images", tmp_path / "teacher.pt")
    recipe = yaml.safe_load((RECIPES_DIR / "imagefolder-224.yaml").read_text())
    recipe["data"].update(root=str(tmp_path / "images"), workers=2)
    recipe["models"]["teacher"] = {**TINY_TEACHER, "checkpoint": str(tmp_path / "teacher.pt")}
    # the recipe's MobileNetV3-Small keeps BatchNorm momentum 0.01: its eval-mode accuracy means something only
    # after hundreds of steps, not a test's dozen; it is built and pruned by the test below instead
    recipe["models"]["student"] = {"arch": "resnet", "kwargs": {"widths": [8, 16, 16, 16]}}
    recipe["distill"].update(epochs=2, batch_size=32, optimizer="adamw", lr=0.003, warmup_epochs=0)
    recipe["prune"].update(epochs=1, batch_size=32)
    recipe["quantize"].update(calibration_samples=64)
    recipe["benchmark"] = {"warmup": 2, "min_runs": 10, "min_duration_s": 0.02, "throughput_duration_s": 0.02,
                           "energy_window_s": 0.05}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = subprocess.run([sys.executable, "-m", "pipeline", "run", "--recipe", str(path), "--runs-dir",
                          str(tmp_path / "runs")], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = (tmp_path / "runs" / "latest").resolve()
    record = json.loads((run / "run.json").read_text())
    assert {k: v["status"] for k, v in record["stages"].items()} == dict.fromkeys(record["stages"], "ok")
    report = json.loads((run / "report.json").read_text())
    rows = {r["artifact"]: r for r in report["rows"] if r["status"] == "measured"}
    assert {"teacher.onnx", "student.onnx", "student-pruned.onnx", "student-pruned.int8.onnx"} <= set(rows)
    assert rows["student.onnx"]["accuracy_n"] == 45  # the whole test split, streamed through onnxruntime
    splits = json.loads((run / "splits.json").read_text())
    assert splits["preprocessing"]["image_size"] == 224 and len(splits["test"]) == 45


def test_imagefolder_224_recipes_own_models_build_and_the_student_prunes():
    """The recipe's torchvision student at 224x224: built for 3 classes, and Torch-Pruning removes channels."""
    from pipeline.train import models
    from stages.prune import Config, prune_model
    recipe = yaml.safe_load((RECIPES_DIR / "imagefolder-224.yaml").read_text())
    student = models.build(ModelSpec.model_validate(recipe["models"]["student"]), 3, 3, 224)
    before, _ = models.count(student, (3, 224, 224))
    prune_model(student, Config(enabled=True, ratio=recipe["prune"]["ratio"], round_to=8), (3, 224, 224))
    after, _ = models.count(student, (3, 224, 224))
    assert after < 0.8 * before and student(torch.zeros(1, 3, 224, 224)).shape == (1, 3)
    assert recipe["models"]["teacher"]["arch"] == "resnet50"  # the teacher a user brings as a checkpoint
