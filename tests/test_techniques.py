"""The hand-written technique helpers of common.py, checked against library references or hand-computed answers.

Every reference is either a public torch / torchvision API (SequentialLR, v2.MixUp / v2.CutMix,
F.cross_entropy(label_smoothing=...), AveragedModel, update_bn) or a number worked out by hand in a comment.
Tiny models only: the whole file runs in seconds on two CPU cores.
"""
import copy
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402



@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors run faster single-threaded; restored afterwards so other test files are unaffected."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed=0, num_classes=10):
    """conv + BN + ReLU + pool + linear (+ BatchNorm1d): small, but has every kind of parameter and buffer."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(),
        nn.Linear(8, num_classes))


def assert_params_close(module_a, module_b, atol=1e-6):
    params_a, params_b = list(module_a.parameters()), list(module_b.parameters())
    assert len(params_a) == len(params_b)
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# 1. warmup_cosine_lr vs SequentialLR(LinearLR, CosineAnnealingLR)


def torch_schedule(total, warmup, base_lr, min_lr, start_factor):
    """The LR torch's schedulers give at steps 0 .. total-1 (read before each optimiser step)."""
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=base_lr)
    if warmup == 0:  # SequentialLR cannot express an empty warmup (LinearLR with total_iters=0)
        scheduler = CosineAnnealingLR(opt, T_max=total, eta_min=min_lr)
    else:
        scheduler = SequentialLR(opt, [
            LinearLR(opt, start_factor=start_factor, end_factor=1.0, total_iters=warmup),
            CosineAnnealingLR(opt, T_max=total - warmup, eta_min=min_lr)], milestones=[warmup])
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SequentialLR's internal step(0) is deprecated upstream
        for _ in range(total):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            scheduler.step()
    return lrs


@pytest.mark.parametrize("total, warmup, base_lr, min_lr, start_factor", [
    (100, 10, 0.1, 0.0, 0.01),
    (57, 5, 3e-4, 1e-6, 0.1),
    (30, 29, 1.0, 0.05, 0.25),  # warmup almost everything: a one-step cosine
    (40, 0, 0.5, 0.01, 0.01),  # no warmup: against CosineAnnealingLR alone
])
def test_warmup_cosine_matches_torch_schedulers(total, warmup, base_lr, min_lr, start_factor):
    expected = torch_schedule(total, warmup, base_lr, min_lr, start_factor)
    got = [common.warmup_cosine_lr(step, total, warmup, base_lr, min_lr, start_factor) for step in range(total)]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9 * base_lr)


def test_warmup_cosine_endpoints():
    total, warmup, base_lr, min_lr = 100, 10, 0.1, 1e-4
    first = common.warmup_cosine_lr(0, total, warmup, base_lr, min_lr, warmup_start_factor=0.01)
    assert first > 0
    assert first == pytest.approx(base_lr * 0.01)
    assert common.warmup_cosine_lr(warmup, total, warmup, base_lr, min_lr) == pytest.approx(base_lr)
    last = common.warmup_cosine_lr(total - 1, total, warmup, base_lr, min_lr)
    # One step before the end of a 90-step cosine: min_lr + (base - min) * sin^2(pi / 180) ~ min_lr + 3e-5.
    assert last == pytest.approx(min_lr + (base_lr - min_lr) * math.sin(math.pi / 180) ** 2, rel=1e-9)
    assert abs(last - min_lr) < 1e-3 * base_lr
    assert common.warmup_cosine_lr(total, total, warmup, base_lr, min_lr) == pytest.approx(min_lr)
    # No warmup: step 0 is the full base LR (still > 0).
    assert common.warmup_cosine_lr(0, total, 0, base_lr, min_lr) == pytest.approx(base_lr)


# ----------------------------------------------------------------------------------------------------------
# 2. mixup / cutmix vs torchvision.transforms.v2.MixUp / CutMix

# Neighbours under roll(1, 0) always have different labels, so each row's weight on its own class is lam.
LABELS = torch.tensor([3, 1, 4, 1, 5, 9])


def lam_from_targets(targets, labels):
    """torchvision's soft targets are lam * onehot + (1 - lam) * onehot.roll(1, 0): read lam back."""
    own = targets[torch.arange(len(labels)), labels]
    assert torch.allclose(own, own[0].expand_as(own), atol=1e-6)  # one lam for the whole batch
    return float(own.double().mean())


@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_mixup_matches_torchvision(alpha):
    one_hot = F.one_hot(LABELS, 10).float()
    for seed in range(10):
        torch.manual_seed(seed)
        images = torch.rand(len(LABELS), 3, 8, 12)
        tv_images, tv_targets = v2.MixUp(alpha=alpha, num_classes=10)(images, LABELS)
        lam = lam_from_targets(tv_targets, LABELS)
        images_ours, targets_ours = common.mixup(images, one_hot, lam)
        torch.testing.assert_close(images_ours, tv_images, atol=1e-6, rtol=0)
        torch.testing.assert_close(targets_ours, tv_targets, atol=1e-6, rtol=0)


def box_from_changed_pixels(original, mixed):
    """(top, left, bottom, right) of the pixels CutMix replaced; (0, 0, 0, 0) when none were."""
    changed = (original != mixed).any(0).any(0)  # H x W: the same box for every image of the batch
    if not changed.any():
        return 0, 0, 0, 0
    rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
    top, bottom, left, right = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    assert changed[top:bottom, left:right].all() and changed.sum() == (bottom - top) * (right - left)
    return top, left, bottom, right


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_cutmix_matches_torchvision(alpha):
    one_hot = F.one_hot(LABELS, 10).float()
    height, width = 24, 32  # not square: a swapped height / width would show
    areas = set()
    for seed in range(20):
        torch.manual_seed(seed)
        images = torch.rand(len(LABELS), 3, height, width)  # distinct values: every pasted pixel differs
        tv_images, tv_targets = v2.CutMix(alpha=alpha, num_classes=10)(images, LABELS)
        tv_lam = lam_from_targets(tv_targets, LABELS)
        box = box_from_changed_pixels(images, tv_images)
        top, left, bottom, right = box
        areas.add((bottom - top) * (right - left))
        images_ours, targets_ours, lam = common.cutmix(images, one_hot, box)
        torch.testing.assert_close(images_ours, tv_images, atol=1e-6, rtol=0)
        torch.testing.assert_close(targets_ours, tv_targets, atol=1e-6, rtol=0)
        assert lam == pytest.approx(1 - (bottom - top) * (right - left) / (height * width), abs=1e-12)
        assert lam == pytest.approx(tv_lam, abs=1e-6)
        assert torch.equal(images, images.clone())  # the input batch is not modified in place
    assert len(areas) > 5  # the seeds really exercised different boxes


def test_cutmix_box_size_matches_torchvision_formula():
    """Unclipped, the box is 2 * int(0.5 * sqrt(1 - lam) * side) on each side (torchvision's r_h_half)."""
    generator = torch.Generator().manual_seed(0)
    height, width = 24, 32
    unclipped = 0
    for lam in np.linspace(0.01, 0.99, 60):
        top, left, bottom, right = common.cutmix_box(float(lam), height, width, generator=generator)
        assert 0 <= top <= bottom <= height and 0 <= left <= right <= width
        half_h, half_w = int(0.5 * math.sqrt(1 - lam) * height), int(0.5 * math.sqrt(1 - lam) * width)
        assert bottom - top <= 2 * half_h and right - left <= 2 * half_w
        if top > 0 and bottom < height and left > 0 and right < width:
            unclipped += 1
            assert (bottom - top, right - left) == (2 * half_h, 2 * half_w)
    assert unclipped > 5


# ----------------------------------------------------------------------------------------------------------
# 3. mix_batch


def small_batch(n=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 8, 8, generator=generator)
    labels = torch.arange(n) % 10
    return images, common.one_hot_smoothed(labels, 10, 0.1)


def test_mix_batch_targets_are_distributions():
    images, targets = small_batch()
    torch.manual_seed(0)
    seen = set()
    for _ in range(50):
        mixed, mixed_targets, lam = common.mix_batch(images, targets, mix_prob=0.8, switch_prob=0.5,
                                                     mixup_alpha=0.4, cutmix_alpha=1.0)
        assert mixed.shape == images.shape and mixed_targets.shape == targets.shape
        torch.testing.assert_close(mixed_targets.sum(1), torch.ones(len(targets)), atol=1e-6, rtol=0)
        assert (mixed_targets >= 0).all()
        seen.add(lam is None)
        if lam is not None:
            assert 0 <= lam <= 1
    assert seen == {True, False}  # mix_prob=0.8: some batches mixed, some left alone


def test_mix_batch_prob_zero_is_identity():
    images, targets = small_batch()
    for _ in range(20):
        mixed, mixed_targets, lam = common.mix_batch(images, targets, mix_prob=0.0, switch_prob=0.5,
                                                     mixup_alpha=1.0, cutmix_alpha=1.0)
        assert lam is None
        assert torch.equal(mixed, images) and torch.equal(mixed_targets, targets)


def mixup_lams(alpha, draws=4000, seed=0):
    images, targets = small_batch(n=2)
    torch.manual_seed(seed)
    lams = []
    for _ in range(draws):
        _, _, lam = common.mix_batch(images, targets, mix_prob=1.0, switch_prob=0.0, mixup_alpha=alpha,
                                     cutmix_alpha=0.0)
        lams.append(lam)
    return np.array(lams)


@pytest.mark.parametrize("alpha", [0.4, 1.0])
def test_mix_batch_lam_is_beta(alpha):
    lams = mixup_lams(alpha)
    beta_var = alpha**2 / ((2 * alpha) ** 2 * (2 * alpha + 1))  # Var Beta(a, a) = 1 / (4 (2a + 1))
    # Standard errors at 4000 draws: mean ~0.006; variance ~0.002 (a=0.4) / ~0.001 (a=1).
    assert lams.mean() == pytest.approx(0.5, abs=0.025)
    assert lams.var() == pytest.approx(beta_var, rel=0.08)
    assert ((lams >= 0) & (lams <= 1)).all()


def test_mix_batch_alpha_changes_lam_distribution():
    narrow, wide = mixup_lams(4.0, draws=2000), mixup_lams(0.2, draws=2000)
    # Var Beta(4, 4) = 1/36 ~ 0.028; Var Beta(0.2, 0.2) = 1/5.6 ~ 0.18.
    assert wide.var() > 3 * narrow.var()
    assert np.mean(np.abs(wide - 0.5) > 0.4) > 5 * max(np.mean(np.abs(narrow - 0.5) > 0.4), 0.01)


def test_mix_batch_switch_prob_picks_cutmix_or_mixup():
    images, targets = small_batch(n=4)
    torch.manual_seed(0)
    for _ in range(10):
        # switch_prob=1: always CutMix - the changed pixels are one rectangle and lam is its exact area.
        mixed, mixed_targets, lam = common.mix_batch(images, targets, mix_prob=1.0, switch_prob=1.0,
                                                     mixup_alpha=1.0, cutmix_alpha=1.0)
        top, left, bottom, right = box_from_changed_pixels(images, mixed)
        assert lam == pytest.approx(1 - (bottom - top) * (right - left) / 64)
        torch.testing.assert_close(mixed_targets, lam * targets + (1 - lam) * targets.roll(1, 0))
        # switch_prob=0: always MixUp - every pixel is the same blend.
        mixed, mixed_targets, lam = common.mix_batch(images, targets, mix_prob=1.0, switch_prob=0.0,
                                                     mixup_alpha=1.0, cutmix_alpha=1.0)
        torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.roll(1, 0))
        torch.testing.assert_close(mixed_targets, lam * targets + (1 - lam) * targets.roll(1, 0))


def test_mix_batch_generator_makes_it_reproducible():
    """With an explicit generator, the result must not depend on the global RNG (every draw uses it)."""
    images, targets = small_batch()
    results = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        generator = torch.Generator().manual_seed(123)
        results.append(common.mix_batch(images, targets, mix_prob=1.0, switch_prob=0.0, mixup_alpha=1.0,
                                        cutmix_alpha=0.0, generator=generator))
    (images_1, targets_1, lam_1), (images_2, targets_2, lam_2) = results
    assert lam_1 == lam_2
    assert torch.equal(images_1, images_2) and torch.equal(targets_1, targets_2)


# ----------------------------------------------------------------------------------------------------------
# 4. Label smoothing


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_smoothed_soft_ce_matches_torch_label_smoothing(eps):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 10, generator=generator) * 3
    labels = torch.randint(10, (64,), generator=generator)
    targets = common.one_hot_smoothed(labels, 10, eps)
    torch.testing.assert_close(targets.sum(1), torch.ones(64))
    assert targets.max() == pytest.approx(1 - eps + eps / 10) and targets.min() == pytest.approx(eps / 10)
    ours = common.soft_target_cross_entropy(logits, targets)
    reference = F.cross_entropy(logits, labels, label_smoothing=eps)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# 5. Random erasing


def changed_box(before, after):
    """The changed pixels of one C x H x W image: assert they form one full rectangle; return its area."""
    changed = (before != after).any(0)
    rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
    if len(rows) == 0:
        return 0
    top, bottom, left, right = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    area = (bottom - top) * (right - left)
    assert int(changed.sum()) == area, "the erased pixels do not form a rectangle"
    assert (before != after)[:, top:bottom, left:right].all(), "a channel inside the rectangle was not erased"
    return area


def test_random_erasing_prob_zero_is_identity():
    images = torch.randn(8, 3, 32, 32)
    out = common.random_erasing(images, 0.0)
    assert torch.equal(out, images)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_erasing_prob_one_erases_one_rectangle_per_image(dtype):
    torch.manual_seed(0)
    images = torch.randn(200, 3, 32, 32, dtype=dtype)
    original = images.clone()
    out = common.random_erasing(images, 1.0)
    assert out.shape == images.shape and out.dtype == dtype
    assert torch.equal(images, original)  # not in place
    fractions = torch.tensor([changed_box(original[i], out[i]) / (32 * 32) for i in range(len(images))])
    assert (fractions > 0).all(), "prob=1 left an image untouched"
    # Area drawn in [0.02, 0.33]; rounding each side to whole pixels moves it a little either way, and a
    # rectangle clipped at the border only shrinks: 16/1024 (e.g. 2 x 8 for a target of 20.5 px) is possible.
    assert fractions.min() >= 0.02 * 0.7 and fractions.max() <= 0.33 * 1.2
    assert 0.12 < float(fractions.mean()) < 0.2  # uniform on [0.02, 0.33] has mean 0.175


def test_random_erasing_prob_is_per_image():
    torch.manual_seed(0)
    images = torch.randn(2000, 1, 16, 16)
    out = common.random_erasing(images, 0.3)
    erased = (out != images).flatten(1).any(1).double().mean()
    assert float(erased) == pytest.approx(0.3, abs=0.04)  # binomial standard error ~0.01


# ----------------------------------------------------------------------------------------------------------
# 6. ModelEma vs AveragedModel(get_ema_multi_avg_fn)


def sgd_steps(model, steps, seed=0):
    """A generator of `steps` SGD steps on random data (train mode: BatchNorm running stats move too)."""
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(steps):
        x = torch.randn(8, 3, 8, 8, generator=generator)
        y = torch.randint(10, (8,), generator=generator)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        yield


def test_model_ema_matches_averaged_model():
    decay = 0.9
    model = tiny_model()
    ema = common.ModelEma(model, decay=decay, warmup=False)
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
    averaged.update_parameters(model)  # first call copies: both start from the initial weights
    assert_params_close(ema.module, averaged.module)
    for _ in sgd_steps(model, 20):
        ema.update(model)
        averaged.update_parameters(model)
    assert ema.num_updates == 20
    assert_params_close(ema.module, averaged.module, atol=1e-6)
    # ... and the average really lags behind the model (the test could fail).
    assert any((a - p).abs().max() > 1e-3 for a, p in zip(ema.module.parameters(), model.parameters()))
    for ema_buffer, buffer in zip(ema.module.buffers(), model.buffers()):
        assert torch.equal(ema_buffer, buffer)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())


def test_model_ema_warmup_decay_schedule():
    decay = 0.8  # (1 + n) / (10 + n) reaches 0.8 at n = 35: the 60 updates cover both regimes
    model = tiny_model()
    ema = common.ModelEma(model, decay=decay, warmup=True)
    expected = [p.detach().clone() for p in model.parameters()]
    for n, _ in enumerate(sgd_steps(model, 60)):
        d = min(decay, (1 + n) / (10 + n))  # hand-computed: 0.1, 2/11, 3/12, ..., 35/44, then 0.8
        assert ema.current_decay() == pytest.approx(d, abs=1e-12)
        ema.update(model)
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, model.parameters())]
    assert ema.num_updates == 60 and ema.current_decay() == pytest.approx(decay)
    for e, p in zip(expected, ema.module.parameters()):
        torch.testing.assert_close(p, e, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# 7. SwaAverage vs AveragedModel; recompute_bn vs update_bn


def test_swa_average_matches_averaged_model():
    model = tiny_model()
    swa = common.SwaAverage(model)
    averaged = AveragedModel(model)
    snapshots = 0
    for step, _ in enumerate(sgd_steps(model, 10)):
        if step % 2 == 1:  # 5 snapshots
            swa.update(model)
            averaged.update_parameters(model)
            snapshots += 1
    assert snapshots == 5 and swa.num_averaged == 5 and int(averaged.n_averaged) == 5
    assert_params_close(swa.module, averaged.module, atol=1e-6)
    assert any((a - p).abs().max() > 1e-3 for a, p in zip(swa.module.parameters(), model.parameters()))


def test_recompute_bn_matches_update_bn():
    model = tiny_model()
    for _ in sgd_steps(model, 3):  # running statistics away from their defaults
        pass
    model.eval()
    ours, reference = copy.deepcopy(model), copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(44, 3, 8, 8, generator=generator) * 2 + 0.5  # 44: the last batch is short
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(inputs, torch.zeros(44, dtype=torch.long)), batch_size=8)
    common.recompute_bn(ours, loader)
    update_bn(loader, reference)
    def norms(module):
        return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    assert len(norms(model)) == 2
    for ours_bn, reference_bn, before in zip(norms(ours), norms(reference), norms(model)):
        torch.testing.assert_close(ours_bn.running_mean, reference_bn.running_mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours_bn.running_var, reference_bn.running_var, atol=1e-5, rtol=0)
        assert int(ours_bn.num_batches_tracked) == int(reference_bn.num_batches_tracked) == 6
        assert ours_bn.momentum == before.momentum  # momentum restored
        assert not torch.allclose(ours_bn.running_mean, before.running_mean, atol=1e-3)  # the stats did change
    assert not ours.training  # the train / eval flag is restored
    assert_params_close(ours, model, atol=0)  # only statistics change


# ----------------------------------------------------------------------------------------------------------
# 8. Temperature scaling


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_fit_temperature_recovers_known_temperature(temperature):
    generator = torch.Generator().manual_seed(0)
    true_logits = torch.randn(20000, 10, generator=generator, dtype=torch.float64) * 2
    labels = torch.multinomial(true_logits.softmax(-1), 1, generator=generator).flatten()
    # softmax(logits / T) = softmax(true_logits), the distribution the labels come from: T is NLL-optimal.
    # (T > 1: the logits are overconfident and must be softened; T < 1: underconfident.)
    logits = (true_logits * temperature).float()
    fitted = common.fit_temperature(logits, labels)
    assert fitted == pytest.approx(temperature, rel=0.05)
    nll_fitted = F.cross_entropy(logits.double() / fitted, labels)
    nll_one = F.cross_entropy(logits.double(), labels)
    assert nll_fitted <= nll_one
    assert torch.equal((logits / fitted).argmax(-1), logits.argmax(-1))


def test_fit_temperature_keeps_one_when_already_calibrated():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(20000, 10, generator=generator, dtype=torch.float64) * 2
    labels = torch.multinomial(logits.softmax(-1), 1, generator=generator).flatten()
    assert common.fit_temperature(logits, labels) == pytest.approx(1.0, rel=0.05)


# ----------------------------------------------------------------------------------------------------------
# 9. Metrics vs hand-computed answers

# Six images, three classes. Confidence = top probability; 15 bins (lo, hi] of width 1/15 = 0.0667.
#   probs                label pred correct conf  bin (index: interval)
#   [0.95, 0.03, 0.02]   0     0    yes     0.95  14: (0.933, 1.000]
#   [0.01, 0.97, 0.02]   2     1    no      0.97  14: (0.933, 1.000]
#   [0.25, 0.20, 0.55]   2     2    yes     0.55   8: (0.533, 0.600]
#   [0.58, 0.22, 0.20]   0     0    yes     0.58   8: (0.533, 0.600]
#   [0.28, 0.42, 0.30]   0     1    no      0.42   6: (0.400, 0.467]
#   [0.10, 0.75, 0.15]   1     1    yes     0.75  11: (0.733, 0.800]
# ECE = 2/6 |1/2 - 0.96| + 2/6 |1 - 0.565| + 1/6 |0 - 0.42| + 1/6 |1 - 0.75|
#     = 0.153333 + 0.145 + 0.07 + 0.041667 = 0.41
# NLL = -(ln 0.95 + ln 0.02 + ln 0.55 + ln 0.58 + ln 0.28 + ln 0.75) / 6
#     = (0.051293 + 3.912023 + 0.597837 + 0.544727 + 1.272966 + 0.287682) / 6 = 6.666528 / 6 = 1.111088
# Brier per image = sum_k (p_k - y_k)^2:
#     0.0025+0.0009+0.0004 = 0.0038;  0.0001+0.9409+0.9604 = 1.9014;  0.0625+0.04+0.2025 = 0.305;
#     0.1764+0.0484+0.04 = 0.2648;    0.5184+0.1764+0.09 = 0.7848;    0.01+0.0625+0.0225 = 0.095
#     mean = 3.3548 / 6 = 0.559133
# Confusion matrix (row = true, column = predicted): true 0 -> pred 0, 0, 1; true 1 -> 1; true 2 -> 1, 2
#     [[2, 1, 0], [0, 1, 0], [0, 1, 1]]
# per-class accuracy (recall) = [2/3, 1, 1/2]; precision (diag / column sums [2, 3, 1]) = [1, 1/3, 1]
# F1 = 2PR / (P + R) = [0.8, 0.5, 2/3]
PROBS = torch.tensor([[0.95, 0.03, 0.02], [0.01, 0.97, 0.02], [0.25, 0.20, 0.55],
                      [0.58, 0.22, 0.20], [0.28, 0.42, 0.30], [0.10, 0.75, 0.15]])
TRUE = torch.tensor([0, 2, 2, 0, 0, 1])


def test_confusion_matrix_and_per_class_metrics():
    preds = PROBS.argmax(-1)
    assert preds.tolist() == [0, 1, 2, 0, 1, 1]
    cm = common.confusion_matrix(preds, TRUE, 3)
    assert cm.tolist() == [[2, 1, 0], [0, 1, 0], [0, 1, 1]]
    np.testing.assert_allclose(common.per_class_accuracy(cm).numpy(), [2 / 3, 1, 1 / 2], rtol=1e-12)
    precision, recall, f1 = common.precision_recall_f1(cm)
    np.testing.assert_allclose(precision.numpy(), [1, 1 / 3, 1], rtol=1e-12)
    np.testing.assert_allclose(recall.numpy(), [2 / 3, 1, 1 / 2], rtol=1e-12)
    np.testing.assert_allclose(f1.numpy(), [0.8, 0.5, 2 / 3], rtol=1e-12)


def test_metrics_with_an_absent_class():
    # Class 3 never occurs and is never predicted: accuracy nan (undefined), precision/recall/F1 0.
    cm = common.confusion_matrix(torch.tensor([0, 1, 2, 0, 1, 1]), TRUE, 4)
    assert cm.shape == (4, 4) and cm[3].sum() == 0 and cm[:, 3].sum() == 0 and cm.sum() == 6
    accuracy = common.per_class_accuracy(cm)
    assert torch.isnan(accuracy[3]) and not torch.isnan(accuracy[:3]).any()
    precision, recall, f1 = common.precision_recall_f1(cm)
    assert precision[3] == 0 and recall[3] == 0 and f1[3] == 0
    # A class predicted but never true: precision 0 (its column is all wrong), recall 0 (by convention).
    cm = common.confusion_matrix(torch.tensor([3, 1, 2, 0, 1, 1]), TRUE, 4)
    precision, recall, f1 = common.precision_recall_f1(cm)
    assert precision[3] == 0 and recall[3] == 0 and f1[3] == 0
    assert recall[0] == pytest.approx(1 / 3) and precision[0] == pytest.approx(1.0)


def test_expected_calibration_error_hand_computed():
    assert common.expected_calibration_error(PROBS, TRUE, n_bins=15) == pytest.approx(0.41, abs=1e-6)
    # The bins themselves (the table above): only 6, 8, 11 and 14 are occupied.
    rows = common.reliability_bins(PROBS, TRUE, n_bins=15)
    assert len(rows) == 15
    assert {b: count for b, (_, _, count) in enumerate(rows) if count} == {6: 1, 8: 2, 11: 1, 14: 2}
    assert rows[14][0] == pytest.approx(0.96) and rows[14][1] == pytest.approx(0.5)
    assert rows[8][0] == pytest.approx(0.565) and rows[8][1] == pytest.approx(1.0)
    # The lowest bins (20 classes allow a top probability under 2/15): 0.06 -> bin 0 (0, 0.067], right;
    # 0.10 -> bin 1 (0.067, 0.133], wrong. ECE = 1/2 |1 - 0.06| + 1/2 |0 - 0.10| = 0.47 + 0.05 = 0.52.
    low = torch.stack([torch.full((20,), 0.94 / 19), torch.full((20,), 0.90 / 19)])
    low[0, 0], low[1, 1] = 0.06, 0.10
    assert common.expected_calibration_error(low, torch.tensor([0, 5]), n_bins=15) == pytest.approx(0.52, abs=1e-6)
    # Bins are (lo, hi]: with 10 bins a confidence of exactly 0.5 shares bin (0.4, 0.5] with 0.45.
    # Right at 0.5, wrong at 0.45: ECE = |1/2 - 0.475| = 0.025 (with [lo, hi) bins it would be 0.475).
    edge = torch.tensor([[0.5, 0.25, 0.25], [0.45, 0.30, 0.25]])
    assert common.expected_calibration_error(edge, torch.tensor([0, 1]), n_bins=10) == pytest.approx(0.025, abs=1e-6)
    # Perfectly confident and always right: ECE 0. Always wrong at confidence 1: ECE 1.
    sure = F.one_hot(TRUE, 3).float()
    assert common.expected_calibration_error(sure, TRUE) == pytest.approx(0.0, abs=1e-12)
    assert common.expected_calibration_error(sure, (TRUE + 1) % 3) == pytest.approx(1.0, abs=1e-12)


def test_expected_calibration_error_matches_a_loop():
    """A second, plain-Python ECE on random predictions (bins (lo, hi], the first bin also holds 0)."""
    generator = torch.Generator().manual_seed(0)
    probs = (torch.randn(500, 10, generator=generator) * 3).softmax(-1)
    labels = torch.randint(10, (500,), generator=generator)
    n_bins = 15
    rows = [(float(p.max()), int(p.argmax()) == int(y)) for p, y in zip(probs, labels)]
    expected = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        members = [(c, ok) for c, ok in rows if (lo < c <= hi) or (b == 0 and c == 0)]
        if members:
            accuracy = sum(ok for _, ok in members) / len(members)
            confidence = sum(c for c, _ in members) / len(members)
            expected += len(members) / len(rows) * abs(accuracy - confidence)
    assert common.expected_calibration_error(probs, labels, n_bins) == pytest.approx(expected, abs=1e-6)


def test_negative_log_likelihood_and_brier_hand_computed():
    nll = -(math.log(0.95) + math.log(0.02) + math.log(0.55) + math.log(0.58) + math.log(0.28)
            + math.log(0.75)) / 6
    assert nll == pytest.approx(1.111088, abs=1e-6)  # the comment above, to its 6 decimals
    assert common.negative_log_likelihood(PROBS, TRUE) == pytest.approx(nll, abs=1e-6)
    assert common.brier_score(PROBS, TRUE) == pytest.approx(3.3548 / 6, abs=1e-6)
    # A zero probability on the true class stays finite (clamped at 1e-12): -ln(1e-12) = 27.631.
    zero = torch.tensor([[1.0, 0.0, 0.0]])
    assert common.negative_log_likelihood(zero, torch.tensor([1])) == pytest.approx(-math.log(1e-12), rel=1e-6)
    assert common.brier_score(zero, torch.tensor([1])) == pytest.approx(2.0)


def test_classification_report_agrees_with_the_parts():
    report = common.classification_report(PROBS, TRUE, ["a", "b", "c"])
    assert report["acc1"] == pytest.approx(4 / 6)
    assert report["ece"] == pytest.approx(0.41, abs=1e-6)
    assert report["confusion_matrix"] == [[2, 1, 0], [0, 1, 0], [0, 1, 1]]
    assert report["f1"] == pytest.approx({"a": 0.8, "b": 0.5, "c": 2 / 3})
    assert report["num_images"] == 6


# ----------------------------------------------------------------------------------------------------------
# 10. Test-time augmentation


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (3, 3, 24, 40)])
def test_tta_views_keep_shape_and_are_deterministic(shape):
    images = torch.rand(*shape)
    names = {name for views in common.TTA_SETS.values() for name in views}
    assert names <= set(common.TTA_VIEWS)
    for name in names:
        out = common.TTA_VIEWS[name](images)
        assert out.shape == images.shape, name
        assert torch.equal(out, common.TTA_VIEWS[name](images)), name
        assert torch.equal(images, images.clone())
        if name != "identity":
            assert not torch.equal(out, images), name  # every other view really changes the batch


def test_tta_translations_move_content_and_fill_zeros():
    images = torch.rand(2, 3, 8, 10) + 1  # strictly positive, so the zero fill is visible
    right = common.TTA_VIEWS["shift_right"](images)
    assert torch.equal(right[..., 2:], images[..., :-2]) and (right[..., :2] == 0).all()
    left = common.TTA_VIEWS["shift_left"](images)
    assert torch.equal(left[..., :-2], images[..., 2:]) and (left[..., -2:] == 0).all()
    down = common.TTA_VIEWS["shift_down"](images)
    assert torch.equal(down[..., 2:, :], images[..., :-2, :]) and (down[..., :2, :] == 0).all()
    up = common.TTA_VIEWS["shift_up"](images)
    assert torch.equal(up[..., :-2, :], images[..., 2:, :]) and (up[..., -2:, :] == 0).all()
    assert torch.equal(common.TTA_VIEWS["flip"](images), images.flip(-1))
    constant = torch.full((1, 3, 32, 32), 0.7)
    torch.testing.assert_close(common.TTA_VIEWS["zoom"](constant), constant)
    # Zoom by s = 1.125 about the centre c = 15.5 (upsample 32 -> 36 with bilinear, align_corners=False, crop
    # rows/columns 2..37): output pixel j samples the input at (j + 2 + 0.5) / s - 0.5 = (j - c) / s + c. On a
    # horizontal ramp (value = column index) that whole row is linear, with no border clamping (0.44 .. 30.56).
    ramp = torch.arange(32.0).expand(1, 3, 32, 32)
    expected = (torch.arange(32.0) - 15.5) / 1.125 + 15.5
    torch.testing.assert_close(common.TTA_VIEWS["zoom"](ramp), expected.expand(1, 3, 32, 32), atol=1e-5, rtol=0)
    cifar = torch.rand(2, 3, 32, 32)  # 32 -> 36: 2 px cropped each side, a centred zoom commutes with the mirror
    torch.testing.assert_close(common.TTA_VIEWS["flip_zoom"](cifar), common.TTA_VIEWS["zoom"](cifar).flip(-1),
                               atol=1e-6, rtol=0)


class FlipInvariant(nn.Module):
    """f(x) = g(x) + g(flip(x)): the same output for an image and its mirror, by construction."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) + self.inner(x.flip(-1))


def random_loader(n=20, batch_size=8, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n)
    return torch.utils.data.DataLoader(common.CifarDataset(images, labels), batch_size=batch_size)


@pytest.mark.parametrize("img_size", [32, 48])
def test_predict_identity_is_plain_softmax(img_size):
    model = tiny_model()
    for _ in sgd_steps(model, 2):  # non-default BatchNorm statistics, so eval mode matters
        pass
    loader = random_loader()
    probs, labels = common.predict(model, loader, torch.device("cpu"), img_size, views=["identity"])
    assert not model.training
    expected, expected_labels = [], []
    with torch.no_grad():
        for images, batch_labels in loader:
            expected.append(model(common.prepare_batch(images, torch.device("cpu"), img_size)).softmax(-1))
            expected_labels.append(batch_labels)
    assert probs.shape == (20, 10) and probs.dtype == torch.float32
    torch.testing.assert_close(probs, torch.cat(expected), atol=1e-6, rtol=0)
    assert torch.equal(labels, torch.cat(expected_labels))
    torch.testing.assert_close(probs.sum(1), torch.ones(20))


def test_predict_flip_set_on_flip_invariant_model_equals_none():
    loader, device = random_loader(), torch.device("cpu")
    invariant = FlipInvariant(tiny_model()).eval()
    none, _ = common.predict(invariant, loader, device, 32, views=common.TTA_SETS["none"])
    flip, _ = common.predict(invariant, loader, device, 32, views=common.TTA_SETS["flip"])
    torch.testing.assert_close(flip, none, atol=1e-6, rtol=0)
    flip_logit, _ = common.predict(invariant, loader, device, 32, views=common.TTA_SETS["flip"], average="logit")
    torch.testing.assert_close(flip_logit, none, atol=1e-6, rtol=0)
    # The same check on a model that is not flip-invariant does see a difference (so the test can fail).
    plain = tiny_model().eval()
    none, _ = common.predict(plain, loader, device, 32, views=common.TTA_SETS["none"])
    flip, _ = common.predict(plain, loader, device, 32, views=common.TTA_SETS["flip"])
    assert (flip - none).abs().max() > 1e-4


def test_predict_averages_views_and_temperature():
    """softmax averaging = mean of the per-view softmaxes; temperature divides the logits first."""
    loader, device = random_loader(n=8), torch.device("cpu")
    model = tiny_model().eval()
    views = common.TTA_SETS["flip+translate+scale"]
    single = {name: common.predict(model, loader, device, 32, views=[name], temperature=2.0)[0] for name in views}
    averaged, _ = common.predict(model, loader, device, 32, views=views, temperature=2.0)
    torch.testing.assert_close(averaged, torch.stack([single[name] for name in views]).mean(0), atol=1e-6, rtol=0)
    logits = torch.cat([model(common.prepare_batch(x, device, 32)) for x, _ in loader]).detach()
    torch.testing.assert_close(single["identity"], (logits / 2.0).softmax(-1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("capability,expected", [((9, 0), torch.bfloat16), ((8, 6), torch.bfloat16),
                                                 ((8, 0), torch.bfloat16), ((7, 5), torch.float16),
                                                 ((7, 0), torch.float16), ((6, 0), torch.float16)])
def test_mixed_precision_is_bf16_from_ampere_and_fp16_before(monkeypatch, capability, expected):
    """H100/A100/RTX 30xx: bf16. T4 (7.5), V100 (7.0), P100 (6.0): fp16 - a P100 refuses bf16 autocast."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    common.amp_dtype.cache_clear()
    try:
        assert common.amp_dtype(torch.device("cuda")) == expected
    finally:
        common.amp_dtype.cache_clear()


def test_cpu_runs_in_fp32_and_loss_scaling_only_with_fp16(monkeypatch):
    cpu = torch.device("cpu")
    assert common.amp_dtype(cpu) is None
    assert not common.grad_scaler(cpu).is_enabled()
    with common.autocast(cpu):
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32
    monkeypatch.setattr(common, "amp_dtype", lambda device: torch.float16)
    assert common.grad_scaler(cpu).is_enabled()
    with common.autocast(cpu):
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float16
