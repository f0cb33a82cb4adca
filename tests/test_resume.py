"""A run killed inside a training stage resumes from its last finished epoch and ends where an uninterrupted run
ends: the same final weights, bit for bit on the CPU, and the same report accuracies."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import DEFAULT_RECIPE

KD_FIT = "student (dynamic KD)"  # the default recipe's distill method names its fit


def _recipe(tmp_path: Path) -> Path:
    data = yaml.safe_load(DEFAULT_RECIPE.read_text())
    data["teacher"]["epochs"] = 6
    data["distill"]["epochs"] = 5
    data["prune"]["epochs"] = 2
    data["benchmark"] = {"warmup": 2, "min_runs": 10, "min_duration_s": 0.02, "throughput_duration_s": 0.02,
                         "energy_window_s": 0.05}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _run(recipe: Path, runs: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "run", "--recipe", str(recipe), "--runs-dir",
                           str(runs), *extra], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def _weights(run_dir: Path, name: str) -> dict[str, torch.Tensor]:
    obj = torch.load(run_dir / name, weights_only=False)  # this run's own files (pruned: a whole module)
    return obj["state_dict"] if isinstance(obj, dict) else obj.state_dict()


def _accuracies(run_dir: Path) -> dict[str, float]:
    report = json.loads((run_dir / "report.json").read_text())
    return {r["artifact"]: r["accuracy"] for r in report["rows"] if r.get("accuracy") is not None}


@pytest.mark.slow
def test_sigkill_inside_distill_then_resume_equals_an_uninterrupted_run(tmp_path):
    recipe = _recipe(tmp_path)
    # 1) killed right after epoch 2 of 5 of the KD student was checkpointed
    killed = _run(recipe, tmp_path / "a", env={"PIPELINE_TEST_KILL_AFTER": f"{KD_FIT}:2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run_a = (tmp_path / "a" / "latest").resolve()
    record = json.loads((run_a / "run.json").read_text())
    assert record["stages"]["teacher"]["status"] == "ok" and record["stages"]["distill"]["status"] == "running"
    ckpts = list((run_a / ".checkpoints" / "distill").glob("*.pt"))
    assert len(ckpts) == 1 and torch.load(ckpts[0], weights_only=False)["epoch"] == 2
    assert not (run_a / "student.pt").exists()
    # 2) resumed: the teacher is reused, distill continues at epoch 3
    resumed = _run(recipe, tmp_path / "a", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "teacher[/]: unchanged, reused" in resumed.stdout or "✓ teacher: unchanged, reused" in resumed.stdout
    record = json.loads((run_a / "run.json").read_text())
    history = record["stages"]["distill"]["results"]["history_kd"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
    assert not (run_a / ".checkpoints").exists()  # removed once the stage succeeded
    # 3) the same recipe, never interrupted
    straight = _run(recipe, tmp_path / "b")
    assert straight.returncode == 0, straight.stderr[-2000:]
    run_b = (tmp_path / "b" / "latest").resolve()
    for name in ("student.pt", "student-scratch.pt", "student-pruned.pt"):
        a, b = _weights(run_a, name), _weights(run_b, name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert _accuracies(run_a) == _accuracies(run_b)


def test_a_checkpoint_from_other_settings_is_never_used(tmp_path):
    from pipeline.train.data import load_splits
    from pipeline.train.loop import Resume, TrainConfig, fit
    from pipeline.train import models
    from pipeline.config import ModelSpec, DataConfig
    import torch.nn.functional as F

    data = load_splits(DataConfig(), seed=0)
    spec = ModelSpec(arch="mlp", kwargs={"hidden": [16]})
    loss = lambda m, x, y, _: F.cross_entropy(m(x), y)  # noqa: E731
    cfg = TrainConfig(epochs=2, lr=0.01)
    path = tmp_path / "fit.pt"
    torch.manual_seed(0)
    fit(models.build(spec, 1, 10, 8), loss, data.train, data.val, cfg, seed=0, desc="a", resume=Resume(path, "k1"))
    assert torch.load(path, weights_only=False)["result"] is not None
    # same file, another key: trained from the start (a history of its own), the old file replaced
    torch.manual_seed(0)
    h = fit(models.build(spec, 1, 10, 8), loss, data.train, data.val, TrainConfig(epochs=3, lr=0.01), seed=0,
            desc="a", resume=Resume(path, "k2"))
    assert h["epochs_run"] == 3 and torch.load(path, weights_only=False)["key"] == "k2"
    # same key: the finished fit is returned as it was, without training again
    m = models.build(spec, 1, 10, 8)
    again = fit(m, loss, data.train, data.val, TrainConfig(epochs=3, lr=0.01), seed=0, desc="a",
                resume=Resume(path, "k2"))
    assert again["history"] == h["history"]
    # a torn file is not trusted either
    path.write_bytes(b"\x00" * 100)
    assert fit(models.build(spec, 1, 10, 8), loss, data.train, data.val, cfg, seed=0, desc="a",
               resume=Resume(path, "k2"))["epochs_run"] == 2


def test_a_resumed_fit_continues_the_loss_step_count_that_dkd_warm_up_reads(tmp_path):
    from pipeline.config import DataConfig
    from pipeline.train.data import load_splits
    from pipeline.train.loop import Resume, StepCount, TrainConfig, fit
    import torch.nn.functional as F

    data = load_splits(DataConfig(), seed=0)
    cfg = TrainConfig(epochs=3, lr=0.01, batch_size=256)

    def run(stop_at: int | None, steps: StepCount, seen: list[int]) -> None:
        def loss(m, x, y, _):
            steps.n += 1  # as distill.make_loss's loss counts
            if steps.n == stop_at:
                raise KeyboardInterrupt  # the process dies mid-epoch 2; epoch 1's checkpoint is on disk
            seen.append(steps.n)
            return F.cross_entropy(m(x), y)
        torch.manual_seed(0)
        fit(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), loss, data.train, data.val, cfg,
            seed=0, desc="dkd", resume=Resume(tmp_path / "fit.pt", "k"), steps=steps)

    seen: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        run(stop_at=8, steps=StepCount(), seen=seen)
    run(stop_at=None, steps=StepCount(), seen=seen)  # a new process: a fresh count, restored from the checkpoint
    # 5 steps an epoch (1,221 training images, batches of 256): the rerun continues at step 6, not at 1
    assert seen == [1, 2, 3, 4, 5, 6, 7] + list(range(6, 16))
