"""The KD losses in pipeline/train/kd.py against hand-computed values and invariants; dkd and dist through the CLI."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import DEFAULT_RECIPE
from pipeline.train import kd
from stages import distill
from tests.conftest import FAST


def test_hinton_matches_hand_computed_value_with_t_squared():
    # s = [2, 0], t = [0, 2], T = 2: softmax(s/T) = [e, 1]/(1+e), softmax(t/T) = [1, e]/(1+e)
    e = math.e
    p_s, p_t = [e / (1 + e), 1 / (1 + e)], [1 / (1 + e), e / (1 + e)]
    kl = sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))  # = (e-1)/(e+1) * ln e
    ce = math.log(1 + math.exp(-2))                                  # -log softmax([2, 0])[0]
    expected = 0.5 * 2 ** 2 * kl + 0.5 * ce                          # alpha T^2 KL + (1 - alpha) CE
    got = kd.hinton(torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]]), torch.tensor([0]), T=2.0, alpha=0.5)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.98770, abs=1e-5)


def test_hinton_alpha_zero_is_cross_entropy_and_kd_term_vanishes_when_student_equals_teacher():
    s, y = torch.randn(5, 10), torch.randint(0, 10, (5,))
    assert torch.allclose(kd.hinton(s, torch.randn(5, 10), y, 4.0, 0.0), F.cross_entropy(s, y, reduction="none"))
    assert torch.allclose(kd.kl_soft(s, s.clone(), 4.0), torch.zeros(5), atol=1e-6)


def test_dynamic_alpha_uniform_certainty_equals_hinton_and_follows_the_sure_teacher():
    base = torch.tensor([3.0, 1.0, 0.0, -1.0])
    t = torch.stack([base[torch.randperm(4)] for _ in range(6)])  # same entropy in every row
    s, y = torch.randn(6, 4), torch.randint(0, 4, (6,))
    a = kd.dynamic_alpha(t, T=2.0, alpha=0.6)
    assert torch.allclose(a, torch.full((6,), 0.6), atol=1e-6)
    assert torch.allclose(kd.hinton(s, t, y, 2.0, a), kd.hinton(s, t, y, 2.0, 0.6), atol=1e-6)
    a = kd.dynamic_alpha(torch.tensor([[8.0, 0, 0, 0], [0.1, 0, 0, 0]]), T=1.0, alpha=0.5)
    assert a[0] > 0.5 > a[1] and a.mean().item() == pytest.approx(0.5, abs=1e-6)


def test_ensemble_of_one_or_of_copies_equals_that_teacher_and_averages_probabilities():
    t, s, y, T = torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,)), 3.0
    ref = kd.hinton(s, t, y, T, 0.7)
    assert torch.allclose(kd.hinton(s, kd.ensemble_logits([t], T), y, T, 0.7), ref, atol=1e-5)
    assert torch.allclose(kd.hinton(s, kd.ensemble_logits([t, t.clone()], T), y, T, 0.7), ref, atol=1e-5)
    u = torch.randn(4, 10)
    mixed = F.softmax(kd.ensemble_logits([t, u], T) / T, dim=1)
    assert torch.allclose(mixed, (F.softmax(t / T, 1) + F.softmax(u / T, 1)) / 2, atol=1e-6)


def test_feature_hint_is_zero_when_the_adapter_maps_student_to_teacher_exactly():
    adapter = torch.nn.Conv2d(3, 5, 1, bias=False)
    s = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        t = torch.einsum("oc,nchw->nohw", adapter.weight[:, :, 0, 0], s)
        assert torch.allclose(kd.feature_hint(s, t, adapter), torch.zeros(2), atol=1e-10)
        adapter.weight.add_(0.1)  # off by 0.1 * sum over the 3 channels, per position
        expected = ((0.1 * s.sum(1, keepdim=True)) ** 2).expand(2, 5, 4, 4).flatten(1).mean(1)
        assert torch.allclose(kd.feature_hint(s, t, adapter), expected, atol=1e-5)
        # a teacher map of another size is compared after resizing the adapted student map
        assert kd.feature_hint(s, torch.randn(2, 5, 2, 2), adapter).shape == (2,)


def test_attacks_stay_in_the_ball_raise_the_objective_and_vanish_at_eps_zero():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x, y = torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,))
    obj = kd.ce_objective(y)
    for adv in (kd.fgsm(model, x, obj, 0.0), kd.pgd(model, x, obj, 0.0, steps=3)):
        assert torch.equal(adv, x)
    for adv in (kd.fgsm(model, x, obj, 0.3), kd.pgd(model, x, obj, 0.3, steps=5)):
        assert (adv - x).abs().max() <= 0.3 + 1e-6
        assert obj(model(adv)) > obj(model(x))
    t = torch.randn(8, 3)
    assert kd.kd_objective(t, 2.0)(model(kd.fgsm(model, x, kd.kd_objective(t, 2.0), 0.3))) > \
        kd.kd_objective(t, 2.0)(model(x))
    assert all(p.grad is None for p in model.parameters())  # crafting an attack leaves parameter grads alone


def test_mixup_mixes_images_and_labels_with_the_same_weights():
    # each image is its own label's one-hot vector, so a mixed image must equal its mixed label exactly
    torch.manual_seed(0)
    y = torch.randint(0, 10, (64,))
    x = F.one_hot(y, 10).float().view(64, 1, 10, 1)
    xm, ym = kd.mixup(x, y, 0.4, 10)
    assert xm.shape == x.shape and ym.shape == (64, 10)
    assert torch.allclose(xm.view(64, 10), ym, atol=1e-6)
    assert torch.allclose(ym.sum(1), torch.ones(64), atol=1e-6)
    assert ((ym > 0).sum(1) == 2).any() and ym.max(1).values.min() < 0.9  # some samples really are mixed
    # soft labels go straight into cross-entropy: a one-hot row gives the usual CE
    s = torch.randn(64, 10)
    assert torch.allclose(F.cross_entropy(s, F.one_hot(y, 10).float(), reduction="none"),
                          F.cross_entropy(s, y, reduction="none"), atol=1e-6)


# ------------------------------------------------------------------ DKD (Zhao et al. 2022) and DIST (Huang et al. 2022)
def _softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_dkd_matches_the_papers_formula_computed_by_hand():
    # two samples, three classes, targets 0 and 2; T = 2, alpha = 1, beta = 8
    s, t, y, T, alpha, beta = [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]], [[0.0, 2.0, 1.0], [1.0, 0.0, 3.0]], [0, 2], 2.0, 1.0, 8.0
    expected = []
    for si, ti, yi in zip(s, t, y):
        ps, pt = _softmax([v / T for v in si]), _softmax([v / T for v in ti])
        tckd = _kl([pt[yi], 1 - pt[yi]], [ps[yi], 1 - ps[yi]])                 # binary: target vs the rest
        qs = [p / (1 - ps[yi]) for k, p in enumerate(ps) if k != yi]           # renormalised non-target classes
        qt = [p / (1 - pt[yi]) for k, p in enumerate(pt) if k != yi]
        nckd = _kl(qt, qs)
        expected.append(T * T * (alpha * tckd + beta * nckd))
    got = kd.dkd(torch.tensor(s), torch.tensor(t), torch.tensor(y), T, alpha, beta)
    assert got.tolist() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx([0.88206, 7.84773], abs=1e-5)


def test_dkd_decomposes_kd_and_vanishes_when_student_equals_teacher():
    torch.manual_seed(0)
    s, t, y, T = torch.randn(6, 10, dtype=torch.float64), torch.randn(6, 10, dtype=torch.float64), \
        torch.randint(0, 10, (6,)), 4.0
    tckd, nckd = kd.decoupled_kl(s, t, y, T)
    p_target = F.softmax(t / T, dim=1)[torch.arange(6), y]
    assert torch.allclose(kd.kl_soft(s, t, T), tckd + (1 - p_target) * nckd, atol=1e-10)  # the paper's Eq. (7)
    assert torch.allclose(kd.dkd(s, s.clone(), y, T, 1.0, 8.0), torch.zeros(6, dtype=torch.float64), atol=1e-10)
    # a confident wrong student (target probability ~1e-20) stays finite: no log(1 - p) of a rounded 1
    far = torch.tensor([[-50.0, 50.0, 0.0]])
    assert torch.isfinite(kd.dkd(far, torch.zeros(1, 3), torch.tensor([0]), 1.0, 1.0, 8.0)).all()


def test_dist_matches_the_papers_formula_computed_by_hand():
    # three samples, four classes, T = 2, beta = 1, gamma = 2: Pearson correlations by numpy, not by kd
    s = np.array([[1.0, 0.0, -1.0, 0.5], [0.2, 2.0, 0.0, -0.3], [0.0, 0.0, 1.5, 1.0]])
    t = np.array([[2.0, 0.5, -1.0, 0.0], [0.0, 1.0, 0.5, -1.0], [1.0, -0.5, 2.0, 0.0]])
    T, beta, gamma = 2.0, 1.0, 2.0
    ps = np.exp(s / T) / np.exp(s / T).sum(1, keepdims=True)
    pt = np.exp(t / T) / np.exp(t / T).sum(1, keepdims=True)
    inter = 1 - np.mean([np.corrcoef(ps[i], pt[i])[0, 1] for i in range(3)])      # per sample, across classes
    intra = 1 - np.mean([np.corrcoef(ps[:, c], pt[:, c])[0, 1] for c in range(4)])  # per class, across the batch
    expected = T * T * (beta * inter + gamma * intra)
    got = kd.dist(torch.tensor(s), torch.tensor(t), T, beta, gamma)
    # rel 2e-5: the official code's eps = 1e-8 beside the norms in Pearson's denominator moves this one by 6e-6
    assert got.item() == pytest.approx(expected, rel=2e-5)
    assert expected == pytest.approx(1.28678, abs=1e-5)


def test_dist_vanishes_when_student_equals_teacher_and_needs_no_second_sample():
    torch.manual_seed(0)
    s = torch.randn(5, 10)
    assert kd.dist(s, s.clone(), 1.0, 1.0, 1.0).item() == pytest.approx(0.0, abs=1e-5)  # float32 rounding
    # two samples: a class's two probabilities correlate +-1; the teacher's rows swapped make every class -1
    two = kd.dist(s[:2], s[[1, 0]], 1.0, 0.0, 1.0).item()
    assert two == pytest.approx(2.0, abs=1e-3)  # less the eps in Pearson's denominator, against small norms
    # one sample (an odd last batch split across torchrun ranks): the inter term alone, finite
    one = kd.dist(s[:1], -s[:1], 1.0, 1.0, 1.0)
    assert one.item() == pytest.approx(kd.dist(s[:1], -s[:1], 1.0, 1.0, 0.0).item()) and torch.isfinite(one)


@pytest.mark.parametrize("loss", [lambda s, t, y: kd.dkd(s, t, y, 4.0, 1.0, 8.0).mean(),
                                  lambda s, t, y: kd.dist(s, t, 1.0, 1.0, 1.0)], ids=["dkd", "dist"])
def test_new_losses_send_gradients_to_the_student_only(loss):
    s, t = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10, requires_grad=True)
    loss(s, t, torch.randint(0, 10, (4,))).backward()
    assert t.grad is None and s.grad is not None and s.grad.abs().sum() > 0


def test_stage_losses_weigh_cross_entropy_ramp_dkd_over_its_warmup_and_take_mixup_labels():
    torch.manual_seed(0)
    student, x, y = torch.nn.Linear(6, 4), torch.randn(8, 6), torch.randint(0, 4, (8,))
    t = torch.randn(8, 4)
    out = student(x)
    ce = F.cross_entropy(out, y).item()
    cfg = distill.Config(method="dkd", temperature=2.0, ce_weight=0.5, dkd_warmup_steps=4)
    _, loss = distill.make_loss(cfg, student, lambda _x: t)
    dkd = kd.dkd(out, t, y, 2.0, 1.0, 8.0).mean().item()
    got = [loss(student, x, y, None).item() for _ in range(5)]
    assert got == pytest.approx([0.5 * ce + min(k / 4, 1) * dkd for k in range(1, 6)], rel=1e-6)
    # mixup hands over class probabilities: the larger share is the target, the probabilities go to CE
    assert loss(student, x, F.one_hot(y, 4).float(), None).item() == pytest.approx(got[-1], rel=1e-6)
    _, loss = distill.make_loss(distill.Config(method="dist", temperature=1.0, dist_gamma=2.0), student,
                                lambda _x: t)
    assert loss(student, x, y, None).item() == pytest.approx(ce + kd.dist(out, t, 1.0, 1.0, 2.0).item(), rel=1e-6)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("method", ["dkd", "dist"])
def test_pipeline_run_with_the_new_methods_exits_0(tmp_path, method):
    data = yaml.safe_load(DEFAULT_RECIPE.read_text())
    for stage, values in {**FAST, "prune": {"epochs": 2}}.items():
        data[stage] = {**data.get(stage, {}), **values}
    data["distill"]["method"] = method
    recipe = tmp_path / f"digits-{method}.yaml"
    recipe.write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(app, ["run", "--recipe", str(recipe), "--runs-dir", str(tmp_path / "runs")])
    assert res.exit_code == 0, res.stdout + res.stderr
    run = json.loads((tmp_path / "runs" / "latest" / "run.json").read_text())
    d = run["stages"]["distill"]
    assert d["status"] == "ok" and d["results"]["method"] == method and d["results"]["acc_kd"] > 0.5


def _dist_rank(rank: int, store: str, out: str) -> None:
    """One gloo rank: the dist stage loss on its shard of a batch of 5, through DDP; saves the averaged grad."""
    import torch.distributed as dist_
    dist_.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(0)
    student, x, y, t = torch.nn.Linear(6, 4), torch.randn(5, 6), torch.randint(0, 4, (5,)), torch.randn(5, 4)
    net = torch.nn.parallel.DistributedDataParallel(student)
    _, loss = distill.make_loss(distill.Config(method="dist", temperature=1.0), student, lambda _x: t[rank::2])
    loss(net, x[rank::2], y[rank::2], None).backward()  # rank 0: 3 samples, rank 1: 2 (an odd last batch)
    torch.save(student.weight.grad, f"{out}.{rank}")
    dist_.destroy_process_group()


@pytest.mark.timeout(120)
def test_dist_under_two_gloo_ranks_averages_the_losses_of_each_ranks_shard(tmp_path):
    torch.multiprocessing.spawn(_dist_rank, args=(str(tmp_path / "store"), str(tmp_path / "grad")), nprocs=2)
    torch.manual_seed(0)
    student, x, y, t = torch.nn.Linear(6, 4), torch.randn(5, 6), torch.randint(0, 4, (5,)), torch.randn(5, 4)
    grads = []
    for r in (0, 1):
        student.zero_grad()
        (F.cross_entropy(student(x[r::2]), y[r::2]) + kd.dist(student(x[r::2]), t[r::2], 1.0, 1.0, 1.0)).backward()
        grads.append(student.weight.grad.clone())
    expected = (grads[0] + grads[1]) / 2
    for r in (0, 1):
        assert torch.allclose(torch.load(tmp_path / f"grad.{r}"), expected, atol=1e-6)
    assert not torch.allclose(grads[0], grads[1])  # the shards really differ: the average is not one of them
