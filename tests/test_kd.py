"""The KD losses in pipeline/kd.py against hand-computed values and invariants."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.train import kd


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
