"""The hand-written techniques of common.py, each checked against a library implementation (torch.optim.lr_scheduler,
torchvision.transforms.v2.MixUp / CutMix, F.cross_entropy(label_smoothing=...), torch.optim.swa_utils) or against an
answer worked out by hand in a comment. Tiny tensors and models only: the file runs in a few seconds on two cores."""
import argparse
import copy
import functools
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn
from torchvision.transforms import v2

from conftest import assert_one_line_error, run_cli

import common
import evaluate
import level1
import level2
from support import run

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed=0):
    """conv + BatchNorm2d + ReLU + pool + linear: every kind of parameter and buffer ResNet-50 has, in 200 numbers."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 10))


def sgd_steps(model, steps, seed=0):
    """`steps` SGD steps on random data in train mode (so that parameters and BatchNorm statistics move)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(steps):
        x, y = torch.randn(8, 3, 8, 8, generator=generator), torch.randint(10, (8,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        yield


def random_dataset(n, seed=0):
    """A common.CifarDataset of `n` random uint8 32 x 32 images."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return common.CifarDataset(images, torch.randint(10, (n,), generator=generator))


def assert_params_close(a, b, atol=1e-6):
    params_a, params_b = list(a.parameters()), list(b.parameters())
    assert len(params_a) == len(params_b) > 0
    for x, y in zip(params_a, params_b):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


# ---- 1. warmup_cosine_lr vs SequentialLR(LinearLR, CosineAnnealingLR) ---------------------------------------------

def torch_schedule(total, warmup, base_lr, min_lr, start_factor):
    """The LR torch's schedulers give at optimiser steps 0 .. total - 1."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base_lr)
    scheduler = SequentialLR(optimizer, [LinearLR(optimizer, start_factor, 1.0, warmup),
                                         CosineAnnealingLR(optimizer, total - warmup, min_lr)], milestones=[warmup])
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(total):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
    return lrs


@pytest.mark.parametrize("total, warmup, base_lr, min_lr, start_factor", [
    (100, 10, 0.1, 0.0, 0.01), (57, 5, 3e-4, 1e-6, 0.1), (30, 29, 1.0, 0.05, 0.25), (40, 0, 0.5, 0.01, 0.01)])
def test_warmup_cosine_matches_torch_sequential_lr(total, warmup, base_lr, min_lr, start_factor):
    """Step by step equal to SequentialLR(LinearLR, CosineAnnealingLR), warmup 0 included."""
    expected = torch_schedule(total, warmup, base_lr, min_lr, start_factor)
    got = [common.warmup_cosine_lr(step, total, warmup, base_lr, min_lr, start_factor) for step in range(total)]
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)


def test_warmup_cosine_endpoints():
    """Start at start_factor * base, base at the end of warmup, min_lr at the end, by hand."""
    total, warmup, base_lr, min_lr = 100, 10, 0.1, 1e-4
    assert common.warmup_cosine_lr(0, total, warmup, base_lr, min_lr, 0.01) == pytest.approx(0.001, rel=1e-12)
    assert common.warmup_cosine_lr(5, total, warmup, base_lr, min_lr, 0.01) == pytest.approx(0.0505, rel=1e-12)
    assert common.warmup_cosine_lr(warmup, total, warmup, base_lr, min_lr) == pytest.approx(base_lr, rel=1e-12)
    # Halfway through the 90 cosine steps: min + (base - min) / 2.
    assert common.warmup_cosine_lr(55, total, warmup, base_lr, min_lr) == pytest.approx((base_lr + min_lr) / 2)
    # One step before the end: min_lr + (base - min) * (1 + cos(pi * 89 / 90)) / 2 = min + (base - min) sin^2(pi/180).
    last = common.warmup_cosine_lr(total - 1, total, warmup, base_lr, min_lr)
    assert last == pytest.approx(min_lr + (base_lr - min_lr) * math.sin(math.pi / 180) ** 2, rel=1e-9)
    for step in (total, total + 5):
        assert common.warmup_cosine_lr(step, total, warmup, base_lr, min_lr) == pytest.approx(min_lr, rel=1e-12)
    assert common.warmup_cosine_lr(0, total, 0, base_lr, min_lr) == pytest.approx(base_lr, rel=1e-12)


# ---- 2. mixup / cutmix vs torchvision.transforms.v2.MixUp / CutMix ------------------------------------------------

LABELS = torch.tensor([3, 1, 4, 1, 5, 9])  # neighbours under roll(1, 0) differ, so each own-class weight is lam


class FixedLam:
    """Stands in for v2's Beta distribution: `sample` gives the chosen lam, as v2's (1,)-shaped draw."""

    def __init__(self, lam):
        self.lam = lam

    def sample(self, shape=()):
        return torch.tensor([self.lam])


def fixed_centre(monkeypatch, height, width, cy, cx):
    """torch.randint(high, ...) -> cy for high == height, cx for high == width (height != width): the same box
    centre for v2 (which draws x, then y) and common.cutmix (y, then x), whatever the order."""
    assert height != width

    def randint(high, *args, **kwargs):
        value = {height: cy, width: cx}[int(high)]
        size = kwargs.get("size", args[0] if args else ())
        return torch.full(tuple(size), value, dtype=torch.long)
    monkeypatch.setattr(torch, "randint", randint)


@pytest.mark.parametrize("lam", [0.0, 0.13, 0.5, 0.87, 1.0])
def test_mixup_matches_torchvision(lam):
    """Same lam: the same blended images and soft targets as v2.MixUp."""
    torch.manual_seed(0)
    images = torch.rand(len(LABELS), 3, 8, 12)
    reference = v2.MixUp(alpha=1.0, num_classes=10)
    reference._dist = FixedLam(lam)
    tv_images, tv_targets = reference(images, LABELS)
    ours_images, ours_targets = common.mixup(images, F.one_hot(LABELS, 10).float(), lam)
    torch.testing.assert_close(ours_images, tv_images, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours_targets, tv_targets, atol=1e-6, rtol=0)


CUTMIX_CASES = [(0.5, 12, 16), (0.3, 5, 7), (0.75, 0, 0), (0.2, 23, 31), (0.6, 0, 20), (0.05, 11, 2), (0.0, 12, 16),
                (0.999, 12, 16)] + [(float(lam), int(cy), int(cx)) for lam, cy, cx in zip(
                    np.random.default_rng(0).uniform(0, 1, 12), np.random.default_rng(1).integers(0, 24, 12),
                    np.random.default_rng(2).integers(0, 32, 12))]


@pytest.mark.parametrize("lam, cy, cx", CUTMIX_CASES)
def test_cutmix_matches_torchvision_for_the_same_lam_and_box(monkeypatch, lam, cy, cx):
    """Same lam and box centre: the same pasted box and soft targets as v2.CutMix, clipped boxes included."""
    height, width = 24, 32  # not square: a swapped height / width would show
    torch.manual_seed(0)
    images = torch.rand(len(LABELS), 3, height, width)  # distinct values: every pasted pixel changes
    reference = v2.CutMix(alpha=1.0, num_classes=10)
    reference._dist = FixedLam(lam)
    fixed_centre(monkeypatch, height, width, cy, cx)
    tv_images, tv_targets = reference(images, LABELS)
    ours_images, ours_targets = common.cutmix(images, F.one_hot(LABELS, 10).float(), lam)
    torch.testing.assert_close(ours_images, tv_images, atol=0, rtol=0)
    torch.testing.assert_close(ours_targets, tv_targets, atol=1e-6, rtol=0)
    # The own-class weight is 1 - the area actually pasted (counted pixel by pixel), whether or not the box was clipped.
    pasted = (ours_images != images).any(1)  # N x H x W
    assert (pasted == pasted[0]).all()  # the same box for every image
    own = ours_targets[torch.arange(len(LABELS)), LABELS]
    torch.testing.assert_close(own, torch.full_like(own, 1 - int(pasted[0].sum()) / (height * width)),
                               atol=1e-6, rtol=0)
    assert torch.equal(images, images.clone())


def test_cutmix_clipped_box_hand_computed(monkeypatch):
    """lam 0.5, centre at the top-left corner of 24 x 32: sides int(24 * 0.7071) = 16, int(32 * 0.7071) = 22, the box
    is clipped to rows 0..7 and columns 0..10 (8 x 11 = 88 px), so the own-class weight is 1 - 88 / 768, not 0.5."""
    torch.manual_seed(0)
    images = torch.rand(4, 3, 24, 32)
    fixed_centre(monkeypatch, 24, 32, 0, 0)
    mixed, targets = common.cutmix(images, F.one_hot(torch.tensor([0, 1, 2, 3]), 10).float(), 0.5)
    changed = (mixed != images).any(1)
    expected = torch.zeros(24, 32, dtype=torch.bool)
    expected[:8, :11] = True
    assert torch.equal(changed, expected.expand(4, 24, 32))
    assert torch.equal(mixed[1:, :, :8, :11], images[:-1, :, :8, :11])  # pasted from the neighbour (roll by one)
    torch.testing.assert_close(targets[0, :2], torch.tensor([1 - 88 / 768, 0.0]))
    torch.testing.assert_close(targets[0, 3], torch.tensor(88 / 768))


# ---- 3. mix_batch ---------------------------------------------------------------------------------------------------

def two_class_batch(n=4):
    torch.manual_seed(123)
    return torch.rand(n, 3, 8, 8), F.one_hot(torch.arange(n) % 10, 10).float()


@functools.lru_cache(maxsize=None)
def mixup_lams(alpha, draws=2000, seed=0):
    """lam of `draws` MixUp batches, read back from the targets: image 0's weight on its own class 0 (cached)."""
    images, targets = two_class_batch(2)
    torch.manual_seed(seed)
    return np.array([float(common.mix_batch(images, targets, 1.0, 0.0, alpha, 0.0)[1][0, 0]) for _ in range(draws)])


def ks_distance(samples, cdf):
    """Kolmogorov-Smirnov statistic of `samples` against the distribution function `cdf`."""
    samples = np.sort(samples)
    n, values = len(samples), cdf(samples)
    return max(np.max(np.arange(1, n + 1) / n - values), np.max(values - np.arange(n) / n))


# Beta(a, a) distribution functions in closed form: a = 0.5 the arcsine law, a = 1 uniform, a = 2 3x^2 - 2x^3.
BETA_CDF = {0.5: lambda x: 2 / np.pi * np.arcsin(np.sqrt(x)), 1.0: lambda x: x, 2.0: lambda x: 3 * x**2 - 2 * x**3}


def test_mix_batch_prob_zero_is_identity():
    """mix_prob 0 (or both alphas 0): the very same images and targets."""
    images, targets = two_class_batch()
    for args in ((0.0, 0.5, 1.0, 1.0), (1.0, 0.5, 0.0, 0.0)):
        mixed, mixed_targets = common.mix_batch(images, targets, *args)
        assert mixed is images and mixed_targets is targets


@pytest.mark.parametrize("switch_prob", [0.0, 0.5, 1.0])
def test_mix_batch_targets_stay_distributions(switch_prob):
    """mix_prob 1: every batch is mixed, the targets stay non-negative with rows summing to 1."""
    images, targets = two_class_batch()
    torch.manual_seed(0)
    for _ in range(30):
        mixed, mixed_targets = common.mix_batch(images, targets, 1.0, switch_prob, 0.8, 1.0)
        assert mixed.shape == images.shape
        torch.testing.assert_close(mixed_targets.sum(1), torch.ones(len(targets)), atol=1e-6, rtol=0)
        assert (mixed_targets >= 0).all()


def test_mix_batch_mix_prob_is_the_fraction_of_mixed_batches():
    """mix_prob 0.3: about 30 % of 1000 batches are mixed (binomial standard error 1.4 %)."""
    images, targets = two_class_batch()
    torch.manual_seed(0)
    mixed = [not torch.equal(common.mix_batch(images, targets, 0.3, 0.0, 1.0, 1.0)[1], targets) for _ in range(1000)]
    assert np.mean(mixed) == pytest.approx(0.3, abs=0.06)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_mix_batch_lam_is_beta_alpha_alpha(alpha):
    """lam ~ Beta(alpha, alpha): KS distance to its closed-form CDF small (1 % critical value at n = 2000 is 0.036),
    mean 1/2, variance 1 / (4 (2 alpha + 1))."""
    lams = mixup_lams(alpha)
    assert ks_distance(lams, BETA_CDF[alpha]) < 0.036
    assert lams.mean() == pytest.approx(0.5, abs=0.03)
    assert lams.var() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.15)


def test_mix_batch_alpha_changes_the_lam_distribution():
    """Another alpha is another distribution: Beta(0.5, 0.5) samples are far from the Beta(2, 2) CDF and back."""
    assert ks_distance(mixup_lams(0.5), BETA_CDF[2.0]) > 0.1
    assert ks_distance(mixup_lams(2.0), BETA_CDF[0.5]) > 0.1


def test_mix_batch_switch_prob_picks_cutmix_or_mixup():
    """switch_prob 1: CutMix (a rectangle of pixels replaced, the rest untouched, lam = its area); switch_prob 0:
    MixUp (every pixel the same blend)."""
    images, targets = two_class_batch()
    torch.manual_seed(0)
    for _ in range(10):
        mixed, mixed_targets = common.mix_batch(images, targets, 1.0, 1.0, 1.0, 1.0)
        changed = (mixed != images).any(0).any(0)
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        area = int(changed.sum())
        if area:
            assert area == (int(rows.max()) - int(rows.min()) + 1) * (int(cols.max()) - int(cols.min()) + 1)
        assert torch.equal(mixed[:, :, ~changed], images[:, :, ~changed])
        torch.testing.assert_close(mixed_targets[0, 0], torch.tensor(1 - area / 64))
        mixed, mixed_targets = common.mix_batch(images, targets, 1.0, 0.0, 1.0, 1.0)
        lam = float(mixed_targets[0, 0])
        torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.roll(1, 0))


# ---- 4. Label smoothing ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_smooth_one_hot_soft_cross_entropy_matches_torch_label_smoothing(eps):
    """soft_cross_entropy(logits, smooth_one_hot(labels, eps)) == F.cross_entropy(label_smoothing=eps)."""
    torch.manual_seed(0)
    logits, labels = torch.randn(64, 10) * 3, torch.randint(10, (64,))
    targets = common.smooth_one_hot(labels, eps)
    torch.testing.assert_close(targets.sum(1), torch.ones(64))
    assert float(targets.max()) == pytest.approx(1 - eps + eps / 10) and float(targets.min()) == pytest.approx(eps / 10)
    torch.testing.assert_close(common.soft_cross_entropy(logits, targets),
                               F.cross_entropy(logits, labels, label_smoothing=eps), atol=1e-5, rtol=1e-6)


# ---- 5. Random erasing ---------------------------------------------------------------------------------------------

def erased_box(before, after):
    """(height, width) of the one rectangle where C x H x W `after` differs from `before` in every channel."""
    changed = (before != after).any(0)
    if not changed.any():
        return 0, 0
    rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
    top, bottom, left, right = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    assert int(changed.sum()) == (bottom - top) * (right - left), "the erased pixels are not one rectangle"
    assert (before != after)[:, top:bottom, left:right].all(), "a channel inside the rectangle was not erased"
    return bottom - top, right - left


def test_random_erasing_prob_zero_is_identity():
    """prob 0: the images unchanged."""
    images = torch.randn(8, 3, 32, 32)
    assert torch.equal(common.random_erasing(images, 0.0), images)


def test_random_erasing_prob_one_erases_one_rectangle_per_image():
    """prob 1: each image gets exactly one rectangle of N(0, 1) noise, its area within the drawn range up to rounding
    each side to whole pixels (and clipping at the border, which only shrinks it); the input is not modified."""
    torch.manual_seed(0)
    images = torch.full((300, 3, 32, 32), 7.0)  # far from N(0, 1) values: every noise pixel differs
    out = common.random_erasing(images, 1.0, area=(0.02, 0.33))
    assert torch.equal(images, torch.full_like(images, 7.0))
    boxes = [erased_box(images[i], out[i]) for i in range(len(images))]
    area = 32 * 32
    for h, w in boxes:
        assert h > 0 and w > 0, "prob 1 left an image untouched"
        assert (h - 0.5) * (w - 0.5) <= 0.33 * area  # each side at most half a pixel above the drawn one
        if h < 32 and w < 32:  # not clipped: each side at most half a pixel below the drawn one
            assert (h + 0.5) * (w + 0.5) >= 0.02 * area
    fractions = np.array([h * w for h, w in boxes]) / area
    assert 0.14 < fractions.mean() < 0.2  # uniform on [0.02, 0.33]: 0.175, a little less with clipping
    noise = out[out != 7.0]
    assert abs(float(noise.mean())) < 0.02 and float(noise.std()) == pytest.approx(1.0, abs=0.02)


def test_random_erasing_prob_is_per_image():
    """prob 0.3: about 30 % of 2000 images erased (binomial standard error 1 %), not all or none of a batch."""
    torch.manual_seed(0)
    images = torch.full((2000, 1, 16, 16), 7.0)
    erased = (common.random_erasing(images, 0.3) != images).flatten(1).any(1).double().mean()
    assert float(erased) == pytest.approx(0.3, abs=0.04)


# ---- 6. ModelEma vs AveragedModel(get_ema_multi_avg_fn) -----------------------------------------------------------

def test_model_ema_matches_averaged_model():
    """warmup=False: after 20 updates the same parameters as AveragedModel(multi_avg_fn=get_ema_multi_avg_fn)."""
    decay = 0.9
    model = tiny_model()
    ema = common.ModelEma(model, decay=decay, warmup=False)
    reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
    reference.update_parameters(model)  # its first update copies: both start from the initial weights
    for _ in sgd_steps(model, 20):
        ema.update(model)
        reference.update_parameters(model)
    assert ema.num_updates == 20
    assert_params_close(ema.module, reference.module)
    assert max(float((a - p).detach().abs().max()) for a, p in zip(ema.module.parameters(), model.parameters())) > 1e-3
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())


def test_model_ema_warmup_decay_schedule():
    """warmup=True: d_n = min(decay, (1 + n) / (10 + n)) after n updates (0.1, 2/11, ...), the average by hand."""
    decay = 0.8  # (1 + n) / (10 + n) reaches 0.8 at n = 35: 50 updates cover both regimes
    model = tiny_model()
    ema = common.ModelEma(model, decay=decay, warmup=True)
    expected = [p.detach().clone() for p in model.parameters()]
    for n, _ in enumerate(sgd_steps(model, 50)):
        d = min(decay, (1 + n) / (10 + n))
        assert ema.current_decay() == pytest.approx(d, abs=1e-12)
        ema.update(model)
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, model.parameters())]
    assert ema.current_decay() == pytest.approx(decay)
    for e, p in zip(expected, ema.module.parameters()):
        torch.testing.assert_close(p, e, atol=1e-6, rtol=0)


# ---- 7. SwaAverage vs AveragedModel ---------------------------------------------------------------------------------

def test_swa_average_matches_averaged_model():
    """The equal-weight mean of 5 snapshots, as AveragedModel's default average."""
    model = tiny_model()
    swa, reference = common.SwaAverage(model), AveragedModel(model)
    snapshots = []
    for step, _ in enumerate(sgd_steps(model, 10)):
        if step % 2:
            swa.update(model)
            reference.update_parameters(model)
            snapshots.append([p.detach().clone() for p in model.parameters()])
    assert swa.num_updates == int(reference.n_averaged) == 5
    assert_params_close(swa.module, reference.module)
    for p, *snaps in zip(swa.module.parameters(), *snapshots):  # and by hand
        torch.testing.assert_close(p, torch.stack(snaps).mean(0), atol=1e-6, rtol=0)
    assert max(float((a - p).detach().abs().max()) for a, p in zip(swa.module.parameters(), model.parameters())) > 1e-3


# ---- 8. recompute_bn vs update_bn (issue 13 point 5) ---------------------------------------------------------------

def test_recompute_bn_matches_update_bn():
    """After recompute_bn, running mean / var equal update_bn's over the same images prepared by prepare_batch."""
    model = tiny_model()
    for _ in sgd_steps(model, 3):  # statistics away from their defaults
        pass
    model.eval()
    dataset, img_size, batch_size = random_dataset(48), 40, 16  # 16 divides 48: no batch dropped
    ours, reference = copy.deepcopy(model), copy.deepcopy(model)
    common.recompute_bn(ours, dataset, CPU, img_size, batch_size)
    loader = [common.prepare_batch(dataset.images[i:i + batch_size], CPU, img_size)
              for i in range(0, len(dataset), batch_size)]
    update_bn(loader, reference, device=CPU)
    bn_ours, bn_reference, bn_before = (next(m for m in net.modules() if isinstance(m, nn.BatchNorm2d))
                                        for net in (ours, reference, model))
    torch.testing.assert_close(bn_ours.running_mean, bn_reference.running_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn_ours.running_var, bn_reference.running_var, atol=1e-5, rtol=1e-5)
    assert int(bn_ours.num_batches_tracked) == int(bn_reference.num_batches_tracked) == 3
    assert not torch.allclose(bn_ours.running_mean, bn_before.running_mean, atol=1e-3)  # the statistics did change
    assert bn_ours.momentum == bn_before.momentum and not ours.training
    assert_params_close(ours, model, atol=0)  # only statistics change


class PreparedModel(nn.Module):
    """uint8 batches in, as a DataLoader over a CifarDataset yields them: prepare_batch, then the model."""

    def __init__(self, model, img_size):
        super().__init__()
        self.model, self.img_size = model, img_size

    def forward(self, images):
        return self.model(common.prepare_batch(images, CPU, self.img_size))


def test_bn_images_through_the_training_transform_match_update_bn_over_the_training_loader():
    """Issue 17 point 1: recompute_bn over bn_images(transform, seed) gives the statistics that
    torch.optim.swa_utils.update_bn gives over a DataLoader of the same images with the same transform and seed (the
    training loader, augmentation included), and leaves the global RNG as it was; clean images give others."""
    model = tiny_model()
    for _ in sgd_steps(model, 3):
        pass
    dataset, img_size, batch_size, seed = random_dataset(48), 40, 16, 7
    transform = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(), v2.RandAugment(2, 9)])
    rng_state = torch.get_rng_state()
    bn_set = common.bn_images(dataset, 48, transform, seed)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the run's own random stream is not disturbed
    assert bn_set.images.dtype == torch.uint8 and bn_set.images.shape == (48, 3, 32, 32)
    ours = copy.deepcopy(model)
    common.recompute_bn(ours, bn_set, CPU, img_size, batch_size)
    reference = PreparedModel(copy.deepcopy(model), img_size)
    loader = torch.utils.data.DataLoader(common.CifarDataset(dataset.images, dataset.labels, transform), batch_size,
                                         generator=torch.Generator())  # its own generator: the global RNG is the seed's
    torch.manual_seed(seed)
    update_bn(loader, reference)
    bn_ours, bn_reference = (next(m for m in net.modules() if isinstance(m, nn.BatchNorm2d))
                             for net in (ours, reference))
    torch.testing.assert_close(bn_ours.running_mean, bn_reference.running_mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(bn_ours.running_var, bn_reference.running_var, atol=1e-6, rtol=1e-5)
    clean = copy.deepcopy(model)
    common.recompute_bn(clean, common.bn_images(dataset, 48), CPU, img_size, batch_size)
    bn_clean = next(m for m in clean.modules() if isinstance(m, nn.BatchNorm2d))
    assert not torch.allclose(bn_clean.running_var, bn_ours.running_var, rtol=1e-3)
    again = common.bn_images(dataset, 48, transform, seed)
    assert torch.equal(again.images, bn_set.images)  # the same images at every validation


# ---- 9. fit_temperature (issue 13 point 1) -----------------------------------------------------------------------

def calibrated_logits(n=8000, scale=3.0, seed=0):
    """Logits and labels drawn from their own softmax: T = 1 is the NLL-optimal temperature."""
    torch.manual_seed(seed)
    logits = torch.randn(n, 10, dtype=torch.float64) * scale
    return logits, torch.multinomial(logits.softmax(-1), 1).flatten()


def test_fit_temperature_keeps_already_calibrated_logits_near_one():
    """Calibrated logits: T close to 1, not at a bound."""
    temperature, at_bound = common.fit_temperature(*calibrated_logits())
    assert temperature == pytest.approx(1.0, rel=0.02) and not at_bound


def test_fit_temperature_recovers_large_and_small_temperatures():
    """logits * 30 and logits / 30 of calibrated logits: T = 30 and 1/30 within 2 %, at_bound False; the fit scales
    exactly with the logits, and dividing by it never changes the arg-max."""
    logits, labels = calibrated_logits()
    base, _ = common.fit_temperature(logits, labels)
    for factor in (30.0, 1 / 30):
        temperature, at_bound = common.fit_temperature(logits * factor, labels)
        assert temperature == pytest.approx(factor, rel=0.02) and not at_bound
        assert temperature == pytest.approx(factor * base, rel=1e-6)
        scaled = logits * factor
        assert F.cross_entropy(scaled / temperature, labels) < F.cross_entropy(scaled, labels)
        assert torch.equal((scaled / temperature).argmax(-1), scaled.argmax(-1))


@pytest.mark.parametrize("average", ["softmax", "logit"])
def test_nll_per_image_is_the_nll_of_the_averaged_views(average):
    """nll_per_image from the logits equals -log of average_views' probability of the label, in float64; and stays exact
    where float32 probabilities underflow to 0 (a sure mistake, logit gap 200)."""
    torch.manual_seed(0)
    view_logits, labels = torch.randn(4, 50, 10, dtype=torch.float64) * 3, torch.randint(10, (50,))
    probs = common.average_views(view_logits, 1.7, average)
    expected = float(-probs.gather(1, labels[:, None]).log().mean())
    assert float(common.nll_per_image(view_logits, labels, 1.7, average).mean()) == pytest.approx(expected, rel=1e-12)
    sure_mistake = torch.zeros(2, 1, 10)
    sure_mistake[:, 0, 1] = 200.0  # label 0 has probability e^-200: 0 in float32
    assert common.average_views(sure_mistake, 1.0, average)[0, 0] == 0
    assert float(common.nll_per_image(sure_mistake, torch.tensor([0]), 1.0, average).mean()) == pytest.approx(200.0, rel=1e-9)


def test_fit_temperature_of_a_view_set_minimises_that_sets_nll():
    """Issue 17 point 3: the T fitted on the V x N x K logits of a view set minimises the NLL of that set's average
    (nll_per_image), which the T of its first view alone does not."""
    logits, labels = calibrated_logits(n=4000)
    torch.manual_seed(1)
    view_logits = logits * 2 + torch.randn(6, *logits.shape, dtype=torch.float64) * 2  # six noisy, overconfident views
    for average in ("softmax", "logit"):
        fitted, at_bound = common.fit_temperature(view_logits, labels, average)
        one_view, _ = common.fit_temperature(view_logits[0], labels)
        def nll(temperature):
            return float(common.nll_per_image(view_logits, labels, temperature, average).mean())
        assert not at_bound and abs(fitted - one_view) > 0.05
        assert nll(fitted) < nll(one_view) and nll(fitted) <= min(nll(fitted * 1.01), nll(fitted / 1.01))


def two_minima_logits():
    """2 views x 100 images x 2 classes whose softmax-averaged NLL has two interior minima (near T = 0.78 and 9.5):
    68 images the views agree on, margin 1.2 (62 right, 6 wrong), 28 they disagree on (view 1 gives the label by 1,
    view 2 the other class by 5: the average is unsure at every T but an end), 4 sure ones, margin 13 (3 right)."""
    def agreeing(margin, right, wrong):
        logits = torch.tensor([margin, 0.0], dtype=torch.float64).repeat(right + wrong, 1)
        return torch.stack([logits, logits]), torch.cat([torch.zeros(right), torch.ones(wrong)]).long()
    disagree = torch.stack([torch.tensor([1.0, 0.0], dtype=torch.float64).repeat(28, 1),
                            torch.tensor([0.0, 5.0], dtype=torch.float64).repeat(28, 1)])
    groups = [agreeing(1.2, 62, 6), (disagree, torch.zeros(28).long()), agreeing(13.0, 3, 1)]
    return torch.cat([views for views, _ in groups], 1), torch.cat([labels for _, labels in groups])


def test_fit_temperature_finds_the_lower_of_two_minima():
    """Issue 26 point 5: softmax-averaged views whose NLL has two interior minima, the lower at small T: the fit lands
    on it (a golden section alone, started over the whole range, stops at the higher one near T = 9.5). With logit
    averaging the NLL is convex in 1/T: one minimum, found too."""
    view_logits, labels = two_minima_logits()
    log_t = torch.linspace(math.log(1e-2), math.log(1e2), 4001, dtype=torch.float64)
    for average, minima in (("softmax", 2), ("logit", 1)):
        curve = torch.stack([common.nll_per_image(view_logits, labels, float(t.exp()), average).mean() for t in log_t])
        interior = (curve[1:-1] < curve[:-2]) & (curve[1:-1] < curve[2:])
        assert int(interior.sum()) == minima, average
        lowest = float(log_t[curve.argmin()].exp())
        temperature, at_bound = common.fit_temperature(view_logits, labels, average)
        assert temperature == pytest.approx(lowest, rel=0.01) and not at_bound, average
    assert common.fit_temperature(view_logits, labels)[0] == pytest.approx(0.78, abs=0.01)


def test_fit_temperature_flags_chance_level_logits_at_its_bound():
    """Random logits with independent labels want T = infinity: the search ends at its upper bound, at_bound True."""
    torch.manual_seed(0)
    logits, labels = torch.randn(5000, 10), torch.randint(10, (5000,))
    temperature, at_bound = common.fit_temperature(logits, labels)
    assert at_bound and temperature == pytest.approx(100.0, rel=1e-2)


# ---- 10. TTA views -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (3, 3, 24, 24)])
def test_tta_views_keep_shape_and_are_deterministic(shape):
    """Every view: same shape, the same output twice, the input untouched; every view but identity changes it."""
    torch.manual_seed(0)
    images = torch.rand(*shape)
    original = images.clone()
    for name, view in common.TTA_VIEWS.items():
        out = view(images)
        assert out.shape == images.shape, name
        assert torch.equal(out, view(images)), name
        assert torch.equal(images, original), name
        assert torch.equal(out, images) == (name == "identity"), name


def test_tta_shift_views_move_content_two_pixels_and_fill_zeros():
    """shift_right/left/down/up move the content 2 px and fill zeros; flip mirrors; zoom by hand on a ramp."""
    images = torch.rand(2, 3, 8, 10) + 1  # strictly positive: the zero fill shows
    views = common.TTA_VIEWS
    right, left, down, up = (views[name](images) for name in ("shift_right", "shift_left", "shift_down", "shift_up"))
    assert torch.equal(right[..., 2:], images[..., :-2]) and (right[..., :2] == 0).all()
    assert torch.equal(left[..., :-2], images[..., 2:]) and (left[..., -2:] == 0).all()
    assert torch.equal(down[..., 2:, :], images[..., :-2, :]) and (down[..., :2, :] == 0).all()
    assert torch.equal(up[..., :-2, :], images[..., 2:, :]) and (up[..., -2:, :] == 0).all()
    assert torch.equal(views["flip"](images), images.flip(-1))
    # Zoom by 1.125 about the centre 15.5 (bilinear 32 -> 36, crop 2..37): output column j samples the input at
    # (j - 15.5) / 1.125 + 15.5, which on a ramp (value = column index) is that number, no border clamping.
    ramp = torch.arange(32.0).expand(1, 3, 32, 32)
    expected = ((torch.arange(32.0) - 15.5) / 1.125 + 15.5).expand(1, 3, 32, 32)
    torch.testing.assert_close(views["zoom"](ramp), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(views["flip_zoom"](ramp), expected.flip(-1), atol=1e-5, rtol=0)


def test_tta_sets_are_nested_as_documented():
    """none < flip < flip+translate (+ the 4 shifts) < flip+translate+scale (+ zoom, flip_zoom), each a prefix."""
    sets = common.TTA_SETS
    assert sets["none"] == ["identity"] and sets["flip"] == ["identity", "flip"]
    assert sets["flip+translate"] == sets["flip"] + ["shift_right", "shift_left", "shift_down", "shift_up"]
    assert sets["flip+translate+scale"] == sets["flip+translate"] + ["zoom", "flip_zoom"]
    assert {v for views in sets.values() for v in views} == set(common.TTA_VIEWS)


# ---- 11. predict + average_views ------------------------------------------------------------------------------------

class FlipInvariant(nn.Module):
    """f(x) = g(x) + g(flip(x)): the same output for an image and its mirror, by construction."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) + self.inner(x.flip(-1))


@pytest.mark.parametrize("img_size", [32, 48])
def test_predict_identity_view_is_the_softmax_of_the_models_logits(img_size):
    """identity: V = 1 logits equal to the model's on prepare_batch (in eval mode), in dataset order across batches."""
    model = tiny_model()
    for _ in sgd_steps(model, 2):  # non-default BatchNorm statistics: eval mode matters
        pass
    dataset = random_dataset(20)
    logits, labels = common.predict(model, dataset, CPU, img_size, views=("identity",), batch_size=8)
    assert not model.training and logits.shape == (1, 20, 10) and logits.dtype == torch.float32
    with torch.no_grad():
        expected = model(common.prepare_batch(dataset.images, CPU, img_size))
    torch.testing.assert_close(logits[0], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(common.average_views(logits), expected.softmax(-1), atol=1e-6, rtol=0)
    assert torch.equal(labels, dataset.labels)


def test_predict_flip_set_on_a_flip_invariant_model_equals_no_tta():
    """A flip-invariant model: the "flip" set gives the probabilities of "none"; a plain model does not."""
    dataset = random_dataset(12)

    def probs(model, tta_set):
        return common.average_views(common.predict(model, dataset, CPU, 32, common.TTA_SETS[tta_set])[0])
    invariant = FlipInvariant(tiny_model())
    torch.testing.assert_close(probs(invariant, "flip"), probs(invariant, "none"), atol=1e-6, rtol=0)
    plain = tiny_model()
    assert float((probs(plain, "flip") - probs(plain, "none")).abs().max()) > 1e-4


def test_average_views_softmax_and_logit_averaging_by_hand():
    """Views [2, 0] and [0, 0]: softmax averaging = mean of the softmaxes, logit averaging = softmax of [1, 0],
    each at T = 1 and T = 2."""
    logits = torch.tensor([[[2.0, 0.0]], [[0.0, 0.0]]], dtype=torch.float64)  # V=2 x N=1 x K=2
    for t in (1.0, 2.0):
        p0 = math.exp(2 / t) / (math.exp(2 / t) + 1)
        expected_softmax = [(p0 + 0.5) / 2, (1 - p0 + 0.5) / 2]
        q0 = math.exp(1 / t) / (math.exp(1 / t) + 1)
        torch.testing.assert_close(common.average_views(logits, t)[0].tolist(), expected_softmax)
        torch.testing.assert_close(common.average_views(logits, t, "logit")[0].tolist(), [q0, 1 - q0])


def test_tta_prediction_does_not_depend_on_temperature():
    """Issue 13 point 2: views [10, 0], [0, 1], [0, 1]. Softmax-averaged at T = 1 they predict class 0 (mean p0 =
    (1 + 2 * 0.269) / 3 = 0.51), at T = 0.5 class 1 (p0 = (1 + 2 * 0.119) / 3 = 0.41). from_logits must predict
    with T = 1 whatever the temperature, so top-1 and the confusion matrix agree, while the NLL differs."""
    filler = -1e4  # classes 2..9 get no probability
    view_logits = torch.full((3, 1, 10), filler)
    view_logits[0, 0, :2] = torch.tensor([10.0, 0.0])
    view_logits[1:, 0, :2] = torch.tensor([0.0, 1.0])
    labels = torch.tensor([0])
    assert int(common.average_views(view_logits, 1.0).argmax(-1)) == 0
    assert int(common.average_views(view_logits, 0.5).argmax(-1)) == 1  # what a prediction at T = 0.5 would be
    at_one, _ = evaluate.from_logits(view_logits, labels, 1.0)
    at_half, probs_half = evaluate.from_logits(view_logits, labels, 0.5)
    assert at_one["acc1"] == at_half["acc1"] == 1.0
    assert at_one["confusion_matrix"] == at_half["confusion_matrix"] and at_half["confusion_matrix"][0][0] == 1
    assert at_half["temperature"] == 0.5
    # The probabilities do follow T: NLL = -log p0 at each temperature.
    p0_one = (1 / (1 + math.exp(-10)) + 2 / (1 + math.e)) / 3
    p0_half = (1 / (1 + math.exp(-20)) + 2 / (1 + math.e ** 2)) / 3
    assert at_one["nll"] == pytest.approx(-math.log(p0_one), rel=1e-5)
    assert at_half["nll"] == pytest.approx(-math.log(p0_half), rel=1e-5)
    assert float(probs_half[0, 0]) == pytest.approx(p0_half, rel=1e-5)


# ---- 12. amp_dtype ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("capability, expected", [((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16),
                                                  ((8, 6), torch.bfloat16), ((7, 5), torch.float16),
                                                  ((7, 0), torch.float16), ((6, 0), torch.float16)])
def test_amp_dtype_bf16_from_capability_8_fp16_before(monkeypatch, capability, expected):
    """A (faked) CUDA device: bf16 from compute capability 8.0 (A100, H100), fp16 on 7.x (V100, T4) and older."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    common.amp_dtype.cache_clear()
    try:
        assert common.amp_dtype(torch.device("cuda")) == expected
    finally:
        common.amp_dtype.cache_clear()


def test_amp_dtype_is_none_on_cpu():
    """The CPU runs in fp32: no dtype, and autocast leaves a matmul in float32."""
    common.amp_dtype.cache_clear()
    assert common.amp_dtype(CPU) is None
    with common.autocast(CPU):
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32


# ---- 13. Flag ranges: run.number, the argparse type beside each flag ------------------------------------------

@pytest.mark.parametrize("text", ["nan", "inf", "-inf"])
def test_number_refuses_non_finite_values(text):
    """nan / inf are refused whatever the bounds (nan passes `lr <= 0`); through a level's parser, one line naming
    the flag."""
    for parse in (run.positive_float, run.fraction, run.number(float)):
        with pytest.raises(argparse.ArgumentTypeError, match=r"must be a finite number"):
            parse(text)
    result = run_cli(level2, f"--label-smoothing={text}")
    assert_one_line_error(result, "--label-smoothing must be a finite number")


@pytest.mark.parametrize("parse, rule, bad, good", [
    (run.positive_int, "> 0", "0", 1), (run.positive_float, "> 0", "-0.001", 1e-3),
    (run.non_negative_float, ">= 0", "-0.1", 0.0), (run.non_negative_int, ">= 0", "-1", 0),
    (run.fraction, ">= 0 and <= 1", "1.5", 1.0), (run.fraction, ">= 0 and <= 1", "-0.1", 0.0),
    (run.number(float, at_least=0, below=1), ">= 0 and < 1", "1", 0.0)])
def test_number_ranges_say_the_rule_and_the_value(parse, rule, bad, good):
    """Out of range: the rule and the value; in range (its edge): the parsed number, of the kind asked for."""
    with pytest.raises(argparse.ArgumentTypeError) as error:
        parse(bad)
    assert str(error.value) == f"must be {rule} (got {type(good)(bad)})"
    assert parse(str(good)) == good and type(parse(str(good))) is type(good)


def test_a_range_error_names_the_flag_by_its_long_name_in_one_line(tmp_path):
    result = run_cli(level1, "--wd", "-1", "--checkpoint-dir", tmp_path)
    assert assert_one_line_error(result, "--weight-decay must be >= 0 (got -1.0)").endswith("(see --help)")
    assert not list(tmp_path.iterdir())  # refused before any folder is made


# ---- Review fixes ------------------------------------------------------------------------------------------------

def test_fit_temperature_flags_a_flat_nll_at_its_bound():
    """One confidently right validation image: the NLL only falls towards T -> 0, so no T is a fit (at_bound)."""
    temperature, at_bound = common.fit_temperature(torch.tensor([[3.0, 0.0]]), torch.tensor([0]))
    assert at_bound


def test_recompute_bn_with_fewer_images_than_a_batch_uses_them_all():
    """A dataset smaller than the batch: one batch of all its images, not none (which would leave reset statistics)."""
    model = tiny_model()
    dataset = random_dataset(8)
    ours, reference = copy.deepcopy(model), copy.deepcopy(model)
    common.recompute_bn(ours, dataset, CPU, 40, 256)
    update_bn([common.prepare_batch(dataset.images, CPU, 40)], reference, device=CPU)
    bn_ours, bn_reference = (next(m for m in net.modules() if isinstance(m, nn.BatchNorm2d)) for net in (ours, reference))
    assert int(bn_ours.num_batches_tracked) == 1
    torch.testing.assert_close(bn_ours.running_mean, bn_reference.running_mean, atol=1e-5, rtol=1e-5)
