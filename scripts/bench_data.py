"""`make bench-data`: memory and speed of the data path, printed as a table and written as JSON.

    .venv/bin/python scripts/bench_data.py [--sizes 2000,20000] [--quick]

1. Peak memory (summed PSS of the process tree, DataLoader workers included) of a whole `pipeline run` on
   generated 224x224 JPEG ImageFolders of each size. Targets: the largest within 500 MB of the smallest, all
   under 4 GB.
2. Distill throughput (images/s through one KD epoch, the teacher's forward included) against a plain
   torchvision ImageFolder + DataLoader loop with the same models, batch, workers and augmentation.
   Target: >= 0.9x.
3. data.cache on 32x32 images (CIFAR-sized, 9,500 training images): a distill epoch against a plain in-memory
   loop (uint8 tensors, augmentation on tensors, channels_last, the teacher under inference_mode), and against
   the pre-streaming path (the whole split preprocessed to float32 in memory). Target: >= 0.9x.
Every figure is measured on this host; the JSON records the machine, the sizes and the settings.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench-results"
CLASSES = 10
# small models, so that the figures measure the data path, not 2 cores' convolutions
TEACHER = {"arch": "resnet", "kwargs": {"widths": [8, 16, 32, 64], "blocks": [1, 1, 1, 1]}}
STUDENT = {"arch": "resnet", "kwargs": {"widths": [4, 8, 16, 32], "blocks": [1, 1, 1, 1]}}
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


# ---------------------------------------------------------------- data
def make_folder(root: Path, n: int, size: int, fmt: str = "jpg") -> Path:
    """n images in CLASSES class folders (train/ 80 %, test/ 20 %), each class a colour with noise; reused."""
    done = root / ".complete"
    if done.exists():
        return root
    rng = np.random.default_rng(0)
    colours = rng.integers(30, 225, (CLASSES, 3))
    for i in range(n):
        c = i % CLASSES
        part = "test" if (i // CLASSES) % 5 == 0 else "train"
        d = root / part / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        small = np.clip(rng.normal(colours[c], 20, (size // 8, size // 8, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(small).resize((size, size), Image.BILINEAR).save(d / f"{i}.{fmt}")
    done.touch()
    return root


# ---------------------------------------------------------------- 1) peak memory of a whole run
def pss_tree_mb(pid: int) -> float:
    """Summed proportional set size of a process and all its descendants (shared pages counted once)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{p}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total / 1024


def whole_run(data: Path, work: Path, workers: int, n: int) -> dict:
    epochs = 1 if n >= 2000 else 4  # enough steps to pass the collapse check (10 colour classes)
    recipe = {"name": f"bench-{data.name}", "seed": 0,
              "data": {"kind": "imagefolder", "root": str(data), "image_size": 224, "channels": 3, "mean": MEAN,
                       "std": STD, "workers": workers},
              # MLPs: memory does not depend on the models, and 2 cores would spend hours in 224x224 convolutions
              "models": {"teacher": {"arch": "mlp", "kwargs": {"hidden": [32]}},
                         "student": {"arch": "mlp", "kwargs": {"hidden": [16]}}},
              "teacher": {"epochs": epochs, "batch_size": 64, "lr": 0.01, "warmup_epochs": 0},
              "distill": {"method": "hinton", "epochs": epochs, "batch_size": 64, "lr": 0.01, "warmup_epochs": 0},
              "prune": {"enabled": True, "ratio": 0.5, "epochs": epochs, "batch_size": 64, "warmup_epochs": 0,
                        "lr": 0.01},
              "quantize": {"enabled": True, "calibration_samples": 128},
              "benchmark": {"warmup": 3, "min_runs": 20, "min_duration_s": 0.1, "throughput_duration_s": 0.1,
                            "energy_window_s": 0.1}}
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"{data.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--recipe", str(path), "--runs-dir",
                             str(work / "runs")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, samples = 0.0, 0
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        peak, samples = max(peak, pss_tree_mb(proc.pid)), samples + 1
        time.sleep(0.25)
    reader.join()
    if proc.returncode:
        raise SystemExit(f"pipeline run on {data} failed:\n{''.join(out[-40:])}")
    images = sum(1 for _ in data.rglob("*.jpg"))
    return {"images": images, "peak_pss_mb": round(peak, 1), "samples": samples,
            "wall_s": round(time.perf_counter() - t0, 1)}


# ---------------------------------------------------------------- 2) and 3) distill epochs
def _models(size: int):
    from pipeline.config import ModelSpec
    from pipeline.train import models
    torch.manual_seed(0)
    teacher = models.build(ModelSpec.model_validate(TEACHER), 3, CLASSES, size).eval()
    student = models.build(ModelSpec.model_validate(STUDENT), 3, CLASSES, size)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, student


def _kd(s_logits, t_logits, y, T=4.0, alpha=0.7):
    from pipeline.train import kd
    return kd.hinton(s_logits, t_logits, y, T, alpha).mean()


def pipeline_epoch(data: Path, size: int, batch: int, workers: int, cache: Path | None = None,
                   preload: bool = False) -> float:
    """Images/s of one KD epoch through pipeline.train (fit with its validation pass), after a warm-up epoch."""
    from pipeline.config import Augment, DataConfig
    from pipeline.errors import StageError
    from pipeline.train.augment import augmenter
    from pipeline.train.data import MemoryImages, load_splits
    from pipeline.train.loop import TrainConfig, fit
    cfg = DataConfig(kind="imagefolder", root=data, image_size=size, channels=3, mean=MEAN, std=STD,
                     workers=workers, cache=cache is not None, cache_dir=cache)
    splits = load_splits(cfg, seed=0)
    if preload:  # the path before streaming: every image decoded and scaled to float32 up front
        for s in (splits.train, splits.val):
            x = torch.cat([raw for _i, raw, _bad in s._raw(list(torch.split(torch.arange(len(s)), 256)), False)])
            s.images, s.workers = MemoryImages(x.float() / 255 if x.dtype == torch.uint8 else x), 0
    teacher, student = _models(size)
    aug = augmenter(Augment(hflip=0.5, random_crop_padding=4 if size <= 64 else 16))

    def loss(m, x, y, _idx):
        with torch.inference_mode():
            t = teacher(x)
        return _kd(m(x), t.clone(), y)
    tc = TrainConfig(epochs=1, batch_size=batch, lr=0.01, warmup_epochs=0, keep="last")
    def epoch(desc: str) -> None:
        try:
            fit(student, loss, splits.train, splits.val, tc, seed=0, desc=desc, augment=aug)
        except StageError:  # one epoch of random-init models may sit at chance: speed is what is measured
            pass
    epoch("warm-up")
    t0 = time.perf_counter()
    epoch("timed")
    return len(splits.train) / (time.perf_counter() - t0)


def plain_epoch(data: Path, size: int, batch: int, workers: int, in_memory: bool) -> float:
    """Images/s of one KD epoch written the plain PyTorch way (plus a validation pass, as fit() does)."""
    import torchvision.transforms.v2 as T
    from torchvision.datasets import ImageFolder
    torch.set_num_threads(os.cpu_count() or 1)
    teacher, student = _models(size)
    # channels_last only on a GPU: torch 2.14.1's CPU convolution backward crashes with it (pipeline.train.loop)
    fmt = torch.channels_last if torch.cuda.is_available() else torch.contiguous_format
    teacher, student = teacher.to(memory_format=fmt), student.to(memory_format=fmt)
    opt = torch.optim.AdamW(student.parameters(), lr=0.01)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    pad = 4 if size <= 64 else 16
    if in_memory:  # uint8 tensors decoded once; augmentation on tensors, per batch
        def load(part):
            ds = ImageFolder(str(data / part), transform=T.Compose([T.PILToTensor(), T.Resize((size, size))]))
            xs, ys = zip(*[ds[i] for i in range(len(ds))])
            return torch.stack(xs), torch.tensor(ys)
        (xtr, ytr), (xva, yva) = load("train"), load("test")

        def batches(x, y, shuffle):
            idx = torch.randperm(len(x)) if shuffle else torch.arange(len(x))
            for i in range(0, len(x), batch):
                j = idx[i:i + batch]
                yield x[j], y[j]
        train_iter, val_iter, n = (lambda: batches(xtr, ytr, True)), (lambda: batches(xva, yva, False)), len(xtr)
    else:
        tf = T.Compose([T.PILToTensor(), T.Resize((size, size))])
        tr, va = ImageFolder(str(data / "train"), transform=tf), ImageFolder(str(data / "test"), transform=tf)
        dl = dict(batch_size=batch, num_workers=workers, persistent_workers=workers > 0)
        train_dl = torch.utils.data.DataLoader(tr, shuffle=True, **dl)
        val_dl = torch.utils.data.DataLoader(va, **dl)
        train_iter, val_iter, n = (lambda: iter(train_dl)), (lambda: iter(val_dl)), len(tr)
    flip, crop = T.RandomHorizontalFlip(0.5), T.RandomCrop(size, padding=pad)

    def epoch():
        student.train()
        for x, y in train_iter():
            x = ((x.float() / 255 - mean) / std).contiguous(memory_format=fmt)
            x = crop(flip(x))
            with torch.inference_mode():
                t = teacher(x)
            loss = _kd(student(x), t.clone(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        student.eval()
        with torch.inference_mode():
            for x, y in val_iter():
                student(((x.float() / 255 - mean) / std).contiguous(memory_format=fmt))
    epoch()  # warm-up
    t0 = time.perf_counter()
    epoch()
    return n / (time.perf_counter() - t0)


# ---------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2000,20000", help="ImageFolder sizes for the whole-run memory figure")
    ap.add_argument("--quick", action="store_true", help="small sizes, to check the script itself")
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    sizes = [int(s) for s in ("200,400" if args.quick else args.sizes).split(",")]
    workers = min(2, os.cpu_count() or 1)
    work = OUT / "data"
    result: dict = {"host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
                             "torch": torch.__version__}, "workers": workers, "teacher": TEACHER, "student": STUDENT}
    # 1) memory
    if not args.skip_memory:
        mem = [whole_run(make_folder(work / f"jpeg224-{n}", n, 224), work, workers, n) for n in sizes]
        result["memory"] = {"runs": mem, "growth_mb": round(mem[-1]["peak_pss_mb"] - mem[0]["peak_pss_mb"], 1),
                            "targets": {"growth_mb_max": 500, "peak_mb_max": 4096}}
    # 2) 224x224 distill throughput against a plain torchvision loop
    n224 = 400 if args.quick else 1200
    f224 = make_folder(work / f"jpeg224-{n224}", n224, 224)
    ours = pipeline_epoch(f224, 224, 64, workers)
    plain = plain_epoch(f224, 224, 64, workers, in_memory=False)
    result["throughput_224"] = {"images": n224, "batch": 64, "pipeline_img_s": round(ours, 1),
                                "plain_img_s": round(plain, 1), "ratio": round(ours / plain, 3), "target": 0.9}
    # 3) 32x32, cached, against a plain in-memory loop and against the pre-streaming float32 path
    n32 = 1200 if args.quick else 11_875  # 80 %: 9,500 training images, as the CIFAR run
    f32 = make_folder(work / f"png32-{n32}", n32, 32, fmt="png")
    cache = work / "cache"
    cached = pipeline_epoch(f32, 32, 128, workers, cache=cache)
    preloaded = pipeline_epoch(f32, 32, 128, workers, preload=True)
    plain_mem = plain_epoch(f32, 32, 128, workers, in_memory=True)
    result["cifar_32"] = {"train_images": int(n32 * 0.8), "batch": 128, "cached_img_s": round(cached, 1),
                          "float32_in_memory_img_s": round(preloaded, 1), "plain_in_memory_img_s": round(plain_mem, 1),
                          "ratio_vs_plain": round(cached / plain_mem, 3),
                          "ratio_vs_float32_in_memory": round(cached / preloaded, 3), "target": 0.9}
    _print(result)
    OUT.mkdir(exist_ok=True)
    path = OUT / "bench-data.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"written: {path}")


def _print(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title="data path (measured on this host)")
    for c in ("figure", "value", "target"):
        t.add_column(c)
    for m in r.get("memory", {}).get("runs", []):
        t.add_row(f"peak PSS, whole run, {m['images']} images 224²", f"{m['peak_pss_mb']} MB ({m['wall_s']} s)",
                  "< 4096 MB")
    if "memory" in r:
        t.add_row("growth, largest - smallest", f"{r['memory']['growth_mb']} MB", "< 500 MB")
    a = r["throughput_224"]
    t.add_row("KD epoch 224², pipeline / plain DataLoader", f"{a['pipeline_img_s']} / {a['plain_img_s']} img/s = "
              f"{a['ratio']}x", ">= 0.9x")
    c = r["cifar_32"]
    t.add_row("KD epoch 32², cached / plain in-memory", f"{c['cached_img_s']} / {c['plain_in_memory_img_s']} img/s "
              f"= {c['ratio_vs_plain']}x", ">= 0.9x")
    t.add_row("KD epoch 32², cached / float32 in memory (before)", f"{c['cached_img_s']} / "
              f"{c['float32_in_memory_img_s']} img/s = {c['ratio_vs_float32_in_memory']}x", ">= 0.9x (no slower)")
    Console(width=150).print(t)


if __name__ == "__main__":
    main()
