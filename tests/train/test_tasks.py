"""Multi-task labels and heads (pipeline/train/tasks.py): CSV labels, label columns, per-head losses, export split."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import DataConfig, Task
from pipeline.errors import ConfigError
from pipeline.train import kd
from pipeline.train.data import load_splits
from pipeline.train.tasks import (
    Head,
    HeadOutputs,
    assemble,
    ce,
    correct,
    head_labels,
    make_heads,
    per_head,
    read_csv,
    select,
    task_classes,
)

DIGIT = Head("digit", tuple(str(i) for i in range(10)), 1.0, "class")
PARITY = Head("parity", ("even", "odd"), 0.5, "parity")
GE5 = Head("ge5", ("lt5", "ge5"), 2.0, "ge5")


def _csv(tmp_path, text: str, name: str = "labels.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


# ---------------------------------------------------------------- read_csv
def test_read_csv_skips_a_header_and_normalises_paths(tmp_path):
    p = _csv(tmp_path, "relative_path,label\na/x.png, big\n\n./b/y.png,small\n")
    assert read_csv(p) == {"a/x.png": "big", "b/y.png": "small"}
    # a first row that is not a header is data
    assert read_csv(_csv(tmp_path, "a/x.png,big\n", "h.csv")) == {"a/x.png": "big"}
    assert read_csv(_csv(tmp_path, "Path,Label\na/x.png,big\n", "p.csv")) == {"a/x.png": "big"}


@pytest.mark.parametrize("text, line, words", [
    ("relative_path,label\na/x.png,big\na/y.png\n", 3, "expected 'relative_path,label'"),
    ("a/x.png,big,extra\n", 1, "expected 'relative_path,label'"),
    ("a/x.png,big\n,small\n", 2, "expected 'relative_path,label'"),
    ("a/x.png,big\nb.png,s\na/x.png,small\n", 3, "labelled twice ('big' and 'small')"),
])
def test_read_csv_errors_name_the_file_and_line(tmp_path, text, line, words):
    p = _csv(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        read_csv(p)
    msg = str(e.value)
    assert str(p) in msg and f"line {line}:" in msg and words in msg and "\n" not in msg


def test_read_csv_same_label_twice_is_fine_and_empty_or_missing_is_an_error(tmp_path):
    assert read_csv(_csv(tmp_path, "a.png,x\na.png,x\n")) == {"a.png": "x"}
    with pytest.raises(ConfigError, match="no rows"):
        read_csv(_csv(tmp_path, "relative_path,label\n", "empty.csv"))
    with pytest.raises(ConfigError, match="cannot read"):
        read_csv(tmp_path / "nope.csv")
    bad = tmp_path / "latin1.csv"
    bad.write_bytes("a.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="UTF-8"):
        read_csv(bad)


# ---------------------------------------------------------------- head_labels
def test_head_labels_digits_parity_and_ge5():
    y = np.arange(10, dtype=np.int64)
    out = head_labels([DIGIT, PARITY, GE5], y, [f"digits:{i}" for i in range(10)], {})
    assert out.shape == (10, 3) and out.dtype == np.int64
    assert out[:, 0].tolist() == list(range(10))
    assert out[:, 1].tolist() == [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]
    assert out[:, 2].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]


def test_head_labels_from_a_csv_index_the_sorted_classes(tmp_path):
    p = _csv(tmp_path, "cat/1.png,wild\ncat/2.png,pet\ndog/1.png,pet\n")
    tasks = [Task(name="animal"), Task(name="kind", labels=str(p))]
    heads = make_heads(tasks, ["cat", "dog"])
    assert heads[1].classes == ("pet", "wild")  # sorted: the index is the label
    ids = ["dog/1.png", "cat/1.png", "cat/2.png"]
    out = head_labels(heads, np.array([1, 0, 0]), ids, {str(p): read_csv(p)})
    assert out.tolist() == [[1, 0], [0, 1], [0, 0]]


def test_head_labels_names_a_missing_image_and_counts_the_rest(tmp_path):
    p = _csv(tmp_path, "cat/1.png,wild\ncat/2.png,pet\n")
    heads = make_heads([Task(name="animal"), Task(name="kind", labels=str(p))], ["cat", "dog"])
    with pytest.raises(ConfigError) as e:
        head_labels(heads, np.array([0, 1, 1]), ["cat/1.png", "dog/1.png", "dog/2.png"], {str(p): read_csv(p)})
    msg = str(e.value)
    assert str(p) in msg and "no label for dog/1.png" in msg and "'kind'" in msg and "1 more images" in msg


def test_a_csv_task_needs_two_labels(tmp_path):
    p = _csv(tmp_path, "a.png,x\nb.png,x\n")
    with pytest.raises(ConfigError, match="every row has the label 'x'") as e:
        task_classes(str(p), ["cat", "dog"])
    assert str(p) in str(e.value)
    assert task_classes("parity", []) == ("even", "odd") and task_classes("class", ["a", "b"]) == ("a", "b")


def test_select_keeps_task_order_and_columns():
    heads = [DIGIT, PARITY, GE5]
    assert select(heads, None) == (heads, [0, 1, 2])
    assert select(heads, ["ge5", "digit"]) == ([DIGIT, GE5], [0, 2])


# ---------------------------------------------------------------- losses
def _batch(heads, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = sum(len(h.classes) for h in heads)
    s, t = torch.randn(n, width, generator=g), torch.randn(n, width, generator=g)
    y = torch.stack([torch.randint(len(h.classes), (n,), generator=g) for h in heads], 1)
    return s, t, y


def test_per_head_is_the_weighted_sum_of_each_heads_loss():
    heads = [DIGIT, PARITY, GE5]
    s, t, y = _batch(heads)
    fn = lambda o, tt, yy: kd.hinton(o, tt, yy, 4.0, 0.9)
    by_hand = (1.0 * kd.hinton(s[:, :10], t[:, :10], y[:, 0], 4.0, 0.9)
               + 0.5 * kd.hinton(s[:, 10:12], t[:, 10:12], y[:, 1], 4.0, 0.9)
               + 2.0 * kd.hinton(s[:, 12:14], t[:, 12:14], y[:, 2], 4.0, 0.9))
    assert torch.allclose(per_head(fn, heads)(s, t, y), by_hand)
    # a head's slice matters: swapping the parity columns changes the loss
    swapped = torch.cat([s[:, :10], s[:, 10:12].flip(1), s[:, 12:]], 1)
    assert not torch.allclose(per_head(fn, heads)(swapped, t, y), by_hand)


def test_per_head_without_heads_is_the_loss_itself():
    fn = lambda o, tt, yy: F.cross_entropy(o, yy)
    assert per_head(fn, []) is fn


def test_ce_is_the_weighted_sum_of_cross_entropies():
    heads = [DIGIT, PARITY]
    s, _, y = _batch(heads)
    by_hand = F.cross_entropy(s[:, :10], y[:, 0]) + 0.5 * F.cross_entropy(s[:, 10:], y[:, 1])
    assert torch.allclose(ce(heads)(s, y), by_hand)
    assert ce([]) is F.cross_entropy
    # gradients reach both heads
    s.requires_grad_(True)
    ce(heads)(s, y).backward()
    assert s.grad[:, :10].abs().sum() > 0 and s.grad[:, 10:].abs().sum() > 0


def test_correct_counts_per_head():
    heads = [DIGIT, PARITY]
    out = torch.zeros(3, 12)
    out[0, 3], out[1, 7], out[2, 1] = 1, 1, 1  # digit predictions 3, 7, 1
    out[:, 11] = 1  # parity: always odd
    y = torch.tensor([[3, 1], [7, 0], [2, 1]])
    assert correct(out, y, heads) == [2, 2]
    assert correct(out[:, :10], y[:, 0], []) == [2]


# ---------------------------------------------------------------- teachers and export
def test_assemble_takes_each_head_from_the_model_that_has_it():
    a = torch.arange(10.).repeat(2, 1)          # teacher of digit only
    b = torch.tensor([[100., 101.]] * 2)         # teacher of parity only
    both = torch.full((2, 12), -1.)              # a later teacher of both: neither head is taken from it
    out = assemble([(b, [PARITY]), (a, [DIGIT]), (both, [DIGIT, PARITY])], [DIGIT, PARITY])
    assert out.shape == (2, 12)
    assert torch.equal(out[:, :10], a) and torch.equal(out[:, 10:], b)
    # one multi-head teacher: its logits as they are
    assert torch.equal(assemble([(both, [DIGIT, PARITY])], [DIGIT, PARITY]), both)


def test_head_outputs_split_the_logits_in_task_order():
    torch.manual_seed(0)
    model = nn.Linear(4, 14)
    x = torch.randn(5, 4)
    outs = HeadOutputs(model, [DIGIT, PARITY, GE5])(x)
    assert [o.shape[1] for o in outs] == [10, 2, 2]
    assert torch.equal(torch.cat(outs, 1), model(x))


# ---------------------------------------------------------------- load_splits
def test_load_splits_with_tasks_adds_columns_and_keeps_the_split(tmp_path):
    cfg = DataConfig(kind="digits")
    one = load_splits(cfg, seed=3)
    many = load_splits(cfg, seed=3, run_dir=tmp_path,
                       tasks=[Task(name="digit"), Task(name="parity", labels="parity", weight=0.5)])
    assert [h.name for h in many.heads] == ["digit", "parity"] and many.num_classes == 12
    for a, b in ((one.train, many.train), (one.val, many.val), (one.test, many.test)):
        assert b.ids == a.ids, "tasks must not change the split"
        assert b.labels.shape == (len(a), 2)
        assert np.array_equal(b.labels[:, 0], a.labels)
        assert np.array_equal(b.labels[:, 1], a.labels % 2)
        _, y = b.arrays()
        assert y.shape == (len(a), 2) and np.array_equal(y[:, 0], a.labels)
    assert one.num_classes == 10 and one.heads == []
    import json
    record = json.loads((tmp_path / "splits.json").read_text())
    assert [t["name"] for t in record["tasks"]] == ["digit", "parity"] and record["tasks"][1]["weight"] == 0.5
