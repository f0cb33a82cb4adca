"""Data a recipe can name: an ImageFolder written from the digits as PNGs; splits; augmentation."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import Augment, DataConfig
from pipeline.errors import ConfigError
from pipeline.train.augment import augmenter
from pipeline.train.data import load_splits
from pipeline.train.loop import TrainConfig, fit

PER_CLASS = 14  # 140 images: enough for stratified 20 % / 15 % hold-outs of every class


def _digits_pngs(root, parts: dict[str, int], rgb: bool = False) -> None:
    """Write the first digits of each class as PNGs under root/<part>/<class>/ (or root/<class>/ for part '')."""
    from sklearn.datasets import load_digits
    d = load_digits()
    for c in range(10):
        imgs = d.images[d.target == c]
        start = 0
        for part, n in parts.items():
            (root / part / str(c)).mkdir(parents=True, exist_ok=True)
            for i, img in enumerate(imgs[start:start + n]):
                a = (img * 255 / 16).astype(np.uint8)
                im = Image.fromarray(np.stack([a, a // 2, 255 - a], -1) if rgb else a)
                im.save(root / part / str(c) / f"{c}-{i}.png")
            start += n


def _assert_stratified(y: np.ndarray, classes: int) -> None:
    """Every class held out in the same proportion, up to rounding (one image)."""
    counts = Counter(y.tolist())
    assert len(counts) == classes and max(counts.values()) - min(counts.values()) <= 1


def test_imagefolder_with_train_and_test_folders_grayscale(tmp_path):
    _digits_pngs(tmp_path / "data", {"train": PER_CLASS, "test": 4})
    cfg = DataConfig(kind="imagefolder", root=tmp_path / "data", image_size=8, channels=1)
    s = load_splits(cfg, seed=0, run_dir=tmp_path)
    assert s.classes == [str(c) for c in range(10)] and s.input_shape == (1, 8, 8)
    assert len(s.test) == 40 and len(s.train) + len(s.val) == 10 * PER_CLASS
    _assert_stratified(s.val.labels, 10)  # val taken from train/
    # mean and std were fitted on train and recorded
    x_train = s.train.arrays()[0]
    assert abs(x_train.mean()) < 1e-4 and x_train.std() == pytest.approx(1, abs=1e-3)
    assert s.preprocessing["mean_std_from"] == "train split"
    # the split file lists, relative to data.root, disjoint, test from test/
    splits = json.loads((tmp_path / "splits.json").read_text())
    assert len(splits["train"]) == len(s.train) and all(p.startswith("test/") for p in splits["test"])
    assert not set(splits["train"]) & set(splits["val"])


def test_single_folder_rgb_resized_split_by_recipe_stratified_and_seeded(tmp_path):
    _digits_pngs(tmp_path / "data", {"": PER_CLASS}, rgb=True)
    cfg = DataConfig(kind="imagefolder", root=tmp_path / "data", image_size=16, channels=3,
                     mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir(), (tmp_path / "c").mkdir()
    s = load_splits(cfg, seed=0, run_dir=tmp_path / "a")
    assert s.input_shape == (3, 16, 16) and s.preprocessing["mean"] == [0.5] * 3
    _assert_stratified(s.test.labels, 10)
    x_raw = s.test.arrays()[0] * 0.25 + 0.5
    assert (x_raw[:, 0] >= x_raw[:, 1] - 1e-3).all()  # the channels kept their order (R = a, G = a/2)
    load_splits(cfg, seed=0, run_dir=tmp_path / "b")
    load_splits(cfg, seed=1, run_dir=tmp_path / "c")
    lists = [json.loads((tmp_path / d / "splits.json").read_text()) for d in "abc"]
    assert lists[0]["test"] == lists[1]["test"] != lists[2]["test"]


def test_a_class_too_small_to_split_says_what_to_do(tmp_path):
    _digits_pngs(tmp_path / "data", {"": 1})
    with pytest.raises(ConfigError, match="Add images to the small classes"):
        load_splits(DataConfig(kind="imagefolder", root=tmp_path / "data"), seed=0)


@pytest.mark.parametrize("aug", [{"rotation_deg": 20}, {"scale": (0.7, 0.8)}, {"hflip": 1.0}, {"vflip": 1.0},
                                 {"random_crop_padding": 2}, {"color_jitter": 0.5}, {"gaussian_noise": 0.3}])
def test_each_augmentation_changes_inputs_and_keeps_the_shape(aug):
    torch.manual_seed(0)
    x = torch.randn(16, 1, 8, 8)
    out = augmenter(Augment(**aug))(x)
    assert out.shape == x.shape
    changed = (out - x).flatten(1).abs().amax(1) > 1e-4
    assert changed.float().mean() > 0.5


def test_no_augmentation_configured_is_none_and_fit_augments_training_batches_only():
    assert augmenter(Augment()) is None
    seen: list[int] = []

    def spy(xb: torch.Tensor) -> torch.Tensor:
        seen.append(len(xb))
        return xb + 0.01

    s = load_splits(DataConfig(), seed=0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    fit(model, lambda m, x, y, _: torch.nn.functional.cross_entropy(m(x), y), s.train, s.val, TrainConfig(epochs=2, batch_size=256, lr=0.05), seed=0, desc="spy", augment=spy)
    assert seen and sum(seen) == 2 * len(s.train)  # every training sample, each epoch; never val or test


def test_pixels_shifted_in_are_the_fill_value_not_the_normalised_mean():
    # a pure shift by 2 pixels: the 2 columns or rows brought in from outside carry `fill` (black after
    # normalisation), the rest are the image's own pixels
    torch.manual_seed(0)
    x = torch.full((64, 1, 8, 8), 5.0)
    out = augmenter(Augment(random_crop_padding=2), fill=[-1.5])(x)
    values = set(out.unique().tolist())
    assert values <= {5.0, -1.5} and -1.5 in values
    assert ((out == -1.5).flatten(1).sum(1) > 0).float().mean() > 0.5


# ---------------------------------------------------------------- streaming, cache, workers, bad input
def _folder(root, per_class: int = 6, size: int = 12, classes: int = 3):
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(a).save(root / f"c{c}" / f"{i}.png")
    return root


def _cfg(root, **kw) -> DataConfig:
    return DataConfig(kind="imagefolder", root=root, image_size=8, channels=3, val_fraction=0.2,
                      test_fraction=0.2, **kw)


def test_a_split_holds_labels_not_images_and_streams_the_same_batches_with_workers_or_without(tmp_path):
    root = _folder(tmp_path / "d")
    inline = load_splits(_cfg(root, workers=0), seed=0)
    forked = load_splits(_cfg(root, workers=2), seed=0)
    from pipeline.train.data import FileImages
    assert isinstance(inline.train.images, FileImages) and not hasattr(inline.train, "x")  # nothing decoded yet
    order = [torch.tensor([3, 0, 5]), torch.tensor([1, 2])]
    got = [(x, y, i) for x, y, i in forked.train.batches(order=order)]
    want = [(x, y, i) for x, y, i in inline.train.batches(order=order)]
    assert [i.tolist() for *_, i in got] == [[3, 0, 5], [1, 2]]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, want))
    assert got[0][0].dtype == torch.float32 and got[0][0].shape == (3, 3, 8, 8)


def test_data_cache_decodes_once_into_a_keyed_uint8_file_and_gives_the_same_images(tmp_path):
    root = _folder(tmp_path / "d")
    plain = load_splits(_cfg(root, workers=0), seed=0)
    cached = load_splits(_cfg(root, workers=0, cache=True, cache_dir=tmp_path / "cache"), seed=0)
    files = sorted((tmp_path / "cache").glob("*.npy"))
    assert len(files) == 3 and all(np.load(f, mmap_mode="r").dtype == np.uint8 for f in files)  # one per split
    assert np.array_equal(plain.test.arrays()[0], cached.test.arrays()[0])
    mtimes = [f.stat().st_mtime_ns for f in files]
    load_splits(_cfg(root, workers=0, cache=True, cache_dir=tmp_path / "cache"), seed=0)
    assert [f.stat().st_mtime_ns for f in sorted((tmp_path / "cache").glob("*.npy"))] == mtimes  # reused
    load_splits(_cfg(root, workers=0, cache=True, cache_dir=tmp_path / "cache").model_copy(
        update={"image_size": 6}), seed=0)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 6  # other preprocessing, other key


def test_a_corrupt_image_names_the_file_or_is_skipped_and_counted(tmp_path):
    root = _folder(tmp_path / "d")
    bad = root / "c1" / "3.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated PNG
    (root / "c2" / "text.png").write_text("not an image")
    with pytest.raises(ConfigError, match=r"c[12]/(3|text)\.png \(data.root\): cannot read this image .*"
                                          r"data.skip_bad: true"):
        s = load_splits(_cfg(root, workers=0), seed=0)  # fitting mean and std reads the training images
        for split in (s.train, s.val, s.test):
            list(split.batches())
    skipping = load_splits(_cfg(root, workers=2, skip_bad=True), seed=0)
    seen = sum(len(y) for split in (skipping.train, skipping.val, skipping.test) for _, y, _ in split.batches())
    assert seen == 3 * 6 + 1 - 2
    assert sorted(sum(skipping.skipped().values(), [])) == ["c1/3.png", "c2/text.png"]


def test_fifos_are_never_opened_and_an_empty_class_folder_is_named(tmp_path):
    import os
    root = _folder(tmp_path / "d")
    os.mkfifo(root / "c0" / "pipe.png")  # opening it for reading would block forever
    s = load_splits(_cfg(root, workers=0), seed=0)
    assert sum(len(p) for p in (s.train, s.val, s.test)) == 18
    (root / "c3").mkdir()
    with pytest.raises(ConfigError, match=r"class folder .*c3 has no images"):
        load_splits(_cfg(root, workers=0), seed=0)


def test_a_decompression_bomb_is_refused_not_decoded(tmp_path, monkeypatch):
    from pipeline.train import data as data_mod
    root = _folder(tmp_path / "d", size=12)
    Image.new("RGB", (200, 200)).save(root / "c0" / "bomb.png")  # 40,000 pixels: a bomb under a 1,000 limit
    monkeypatch.setattr(data_mod, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ConfigError, match="bomb.png .*DecompressionBomb"):
        s = load_splits(_cfg(root, workers=0), seed=0)
        for split in (s.train, s.val, s.test):
            list(split.batches())


def test_pad_and_crop_alone_shifts_by_whole_pixels_exactly_as_the_affine_path_would():
    """The fast path (slices) and grid_sample agree on integer shifts; shifted-in pixels carry `fill`."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    x = torch.randn(16, 3, 12, 12)
    fill = torch.tensor([-1.0, -2.0, -3.0]).view(1, -1, 1, 1)
    torch.manual_seed(1)
    fast = augmenter(Augment(random_crop_padding=3), fill=fill.flatten().tolist())(x)
    torch.manual_seed(1)
    torch.rand(16), torch.rand(16)  # the angle and scale draws the augmenter makes first
    pixels = torch.randint(-3, 4, (16, 2))
    shift = pixels.float() * 2 / 12
    eye = torch.zeros(16, 2, 3)
    eye[:, 0, 0], eye[:, 1, 1], eye[:, :, 2] = 1, 1, shift
    ref = F.grid_sample(x - fill, F.affine_grid(eye, list(x.shape), align_corners=False), align_corners=False) + fill
    assert torch.allclose(fast, ref, atol=1e-5)
    assert (pixels != 0).any()
