"""The CUDA path of pipeline.train, checked where a GPU is at hand: one prepared run for a lent GPU machine.

    .venv/bin/python scripts/gpu_check.py [--images 512] [--steps 200]

A generated 224x224 JPEG ImageFolder, a torchvision resnet50 teacher and a mobilenet_v3_small student, the
real fit() with the KD loss: images/s with amp off, bf16 and fp16 (GradScaler), channels_last, pinned memory.
Prints a table and writes bench-results/gpu-check.json. Without CUDA it says so and exits 0: nothing is
measured, and the CUDA path stands untested (README: Real datasets and long runs).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--steps", type=int, default=200, help="optimiser steps per setting (batch 64)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("skipped: no CUDA device here; the CUDA path (AMP, GradScaler, channels_last, NCCL) is untested")
        return
    from bench_data import MEAN, STD, make_folder

    from pipeline.config import Augment, DataConfig, ModelSpec
    from pipeline.train import kd, models
    from pipeline.train.augment import augmenter
    from pipeline.train.data import load_splits
    from pipeline.train.loop import TrainConfig, fit
    data = make_folder(ROOT / "bench-results" / "data" / f"jpeg224-{args.images}", args.images, 224)
    splits = load_splits(DataConfig(kind="imagefolder", root=data, image_size=224, channels=3, mean=MEAN, std=STD),
                         seed=0)
    dev = torch.device("cuda")
    teacher = models.build(ModelSpec(arch="resnet50"), 3, 10, 224).to(dev).eval()
    epochs = max(1, args.steps * 64 // len(splits.train))
    rows = []
    for amp in ("off", "bf16", "fp16"):
        torch.manual_seed(0)
        student = models.build(ModelSpec(arch="mobilenet_v3_small"), 3, 10, 224)

        def loss(m, x, y, _idx):
            with torch.inference_mode():
                t = teacher(x)
            return kd.hinton(m(x), t.clone().float(), y, 4.0, 0.9).mean()
        cfg = TrainConfig(epochs=epochs, batch_size=64, lr=0.01, optimizer="sgd", warmup_epochs=0, amp=amp,
                          keep="last")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            h = fit(student, loss, splits.train, splits.val, cfg, seed=0, desc=f"amp {amp}",
                    augment=augmenter(Augment(hflip=0.5, random_crop_padding=16)))
            acc = h["val_acc"]
        except Exception as e:  # a collapse on random data still timed the steps
            acc = f"{type(e).__name__}"
        torch.cuda.synchronize()
        rows.append({"amp": amp, "images_per_s": round(epochs * len(splits.train) / (time.perf_counter() - t0), 1),
                     "val_acc": acc, "epochs": epochs, "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20)})
        torch.cuda.reset_peak_memory_stats()
        print(rows[-1], flush=True)
    out = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows}
    path = ROOT / "bench-results" / "gpu-check.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
