"""The hand-written techniques of the four levels, in the order the levels introduce them, each under a banner naming
its level and tested against a library or a hand-computed answer (random erasing and the zoom view by their
properties); then CIFAR-10 and the ResNet-50 with their input checks. The machinery is in support/."""
import copy
import functools
import math
import os
import pickle
import socket
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from support import files
from support.errors import UserError

# ---- Level 2: label smoothing and soft targets (Szegedy et al. 2016, "Rethinking the Inception", sec. 7) -------
def smooth_one_hot(labels, smoothing=0.0, num_classes=10):
    """N labels -> N x K soft targets: 1 - smoothing on the true class, plus smoothing / K on every class."""
    return F.one_hot(labels, num_classes).float() * (1 - smoothing) + smoothing / num_classes

def soft_cross_entropy(logits, targets):
    """Cross-entropy against soft targets (rows summing to 1): the batch mean of -sum_k t_k log p_k."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()

# ---- Level 2: MixUp (Zhang et al. 2018) and CutMix (Yun et al. 2019), on whole batches on the device -------------
def mixup(images, targets, lam):
    """MixUp, eq. 1: images (N x C x H x W) and soft targets (N x K) blended with their neighbours (roll by one)."""
    return lam * images + (1 - lam) * images.roll(1, 0), lam * targets + (1 - lam) * targets.roll(1, 0)

def cutmix(images, targets, lam):
    """CutMix, sec. 3.1: a box of area fraction 1 - lam with a uniform centre, clipped at the border, pasted from the
    neighbour; the targets are weighted by the area actually pasted."""
    height, width = images.shape[-2:]
    cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
    cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    mixed = images.clone()
    mixed[..., top:bottom, left:right] = images.roll(1, 0)[..., top:bottom, left:right]
    lam = 1 - (bottom - top) * (right - left) / (height * width)
    return mixed, lam * targets + (1 - lam) * targets.roll(1, 0)

def mix_batch(images, targets, mix_prob, switch_prob, mixup_alpha, cutmix_alpha):
    """With probability `mix_prob`, CutMix (`switch_prob`) or MixUp of the batch, lam ~ Beta(alpha, alpha), drawn on
    the CPU so that nothing waits for the device."""
    if mix_prob <= 0 or max(mixup_alpha, cutmix_alpha) <= 0:
        return images, targets  # mixing is off: nothing is drawn
    if float(torch.rand(())) >= mix_prob:
        return images, targets  # this batch is not mixed
    if cutmix_alpha <= 0:
        use_cutmix = False  # only MixUp is on: no second draw
    elif mixup_alpha <= 0:
        use_cutmix = True  # only CutMix is on
    else:
        use_cutmix = float(torch.rand(())) < switch_prob
    if use_cutmix:
        lam = float(torch.distributions.Beta(cutmix_alpha, cutmix_alpha).sample())
        return cutmix(images, targets, lam)
    lam = float(torch.distributions.Beta(mixup_alpha, mixup_alpha).sample())
    return mixup(images, targets, lam)

# ---- Level 2: random erasing (Zhong et al. 2020), vectorised on the device -----------------------------------------
def random_erasing(images, prob, area=(0.02, 0.33), log_ratio=(math.log(0.3), math.log(3.3))):
    """Each normalised image, with probability `prob`, gets one rectangle of `area` fraction and aspect ratio in
    exp(`log_ratio`) replaced by N(0, 1) noise. Zhong et al.'s alg. 1 with torchvision's RandomErasing defaults (area
    up to 0.33, a log-uniform ratio; the paper has 0.4 and a uniform ratio); a rectangle that would not fit is
    clipped, where alg. 1 draws again."""
    if prob <= 0:
        return images
    n, _, height, width = images.shape
    erase, area_draw, ratio_draw, top_draw, left_draw = torch.rand(5, n, 1, 1, device=images.device)  # per image
    target_area = (area[0] + (area[1] - area[0]) * area_draw) * height * width
    ratio = torch.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * ratio_draw)
    h = (target_area * ratio).sqrt().round().clamp(1, height)
    w = (target_area / ratio).sqrt().round().clamp(1, width)
    top = (top_draw * (height - h + 1)).floor()
    left = (left_draw * (width - w + 1)).floor()
    rows = torch.arange(height, device=images.device).view(1, height, 1)
    cols = torch.arange(width, device=images.device).view(1, 1, width)
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w) & (erase < prob)
    return torch.where(inside.unsqueeze(1), torch.randn_like(images), images)

# ---- Level 2: linear warmup (Goyal et al. 2017), then cosine decay (Loshchilov & Hutter 2017, "SGDR") ------------
def warmup_cosine_lr(step, total_steps, warmup_steps, base_lr, min_lr=0.0, warmup_start_factor=0.01):
    """The LR at optimiser `step` (0-based), a pure function of it: equal to torch's SequentialLR of
    LinearLR(warmup_start_factor, 1, warmup_steps) and CosineAnnealingLR(total_steps - warmup_steps, min_lr)."""
    if step < warmup_steps:
        return base_lr * (warmup_start_factor + (1 - warmup_start_factor) * step / warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))

# ---- Level 2: test-time augmentation, deterministic views of the 32-px [0, 1] batch -------------------------------
def shift(images, dy, dx):
    """Translate by (dy, dx) pixels, filling with zeros as the training crop's padding does."""
    pad = max(abs(dy), abs(dx))
    height, width = images.shape[-2:]
    return F.pad(images, (pad,) * 4)[..., pad - dy:pad - dy + height, pad - dx:pad - dx + width]

def zoom(images, scale=1.125):
    """Zoom in about the centre of square images: upsample by `scale`, crop back to the side."""
    side = images.shape[-1]
    big = F.interpolate(images, size=(round(side * scale),) * 2, mode="bilinear", align_corners=False)
    offset = (big.shape[-1] - side) // 2
    return big[..., offset:offset + side, offset:offset + side]

TTA_VIEWS = {"identity": lambda x: x, "flip": lambda x: x.flip(-1),
             "shift_right": lambda x: shift(x, 0, 2), "shift_left": lambda x: shift(x, 0, -2),
             "shift_down": lambda x: shift(x, 2, 0), "shift_up": lambda x: shift(x, -2, 0),
             "zoom": zoom, "flip_zoom": lambda x: zoom(x.flip(-1))}
TTA_SETS = {"none": ["identity"], "flip": ["identity", "flip"],
            "flip+translate": ["identity", "flip", "shift_right", "shift_left", "shift_down", "shift_up"]}
TTA_SETS["flip+translate+scale"] = TTA_SETS["flip+translate"] + ["zoom", "flip_zoom"]

@torch.no_grad()
def predict(model, dataset, device, img_size, views=("identity",), batch_size=256):
    """(V x N x K logits of every view, float32 on the CPU; N labels), kept on the device to the end: one sync."""
    model.eval()
    outputs = []
    for images, _ in batches(dataset, batch_size, device):
        with autocast(device):
            outputs.append(torch.stack([model(prepare_batch(images, device, img_size, TTA_VIEWS[view])).float()
                                        for view in views]))
    return torch.cat(outputs, dim=1).cpu(), dataset.labels

def average_views(view_logits, temperature=1.0, average="softmax"):
    """V x N x K logits -> N x K probabilities: the mean over views of softmax(logits / T), or ("logit") the softmax
    of the mean logits / T. Predict with T = 1: with several views, another T can change the top class."""
    if average == "logit":
        return (view_logits.mean(0) / temperature).softmax(-1)
    return (view_logits / temperature).softmax(-1).mean(0)

# ---- Level 3: an exponential moving average of the weights (Polyak & Juditsky 1992) ------------------------------
class ModelEma:
    """Exponential moving average of the weights after each step: ema = d ema + (1 - d) w, with d = min(decay,
    (1 + n) / (10 + n)) after n updates when `warmup` (TensorFlow's num_updates). BatchNorm: see recompute_bn."""

    def __init__(self, model, decay=0.999, warmup=True):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.num_updates = decay, warmup, 0

    def current_decay(self):
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model):
        step = 1 - self.current_decay()  # once per update, not once per parameter
        for average, weight in zip(self.module.parameters(), model.parameters()):
            average.lerp_(weight, step)  # average += (1 - d) * (weight - average)
        self.num_updates += 1

# ---- Level 3: BatchNorm statistics of an average, from the training distribution ---------------------------------
BN_IMAGES = 2560  # training images the averages' statistics come from: 0.34 s at 224 px on an H100

def bn_images(dataset, count=BN_IMAGES, transform=None, seed=0):
    """The first `count` images of `dataset` (uint8 N x 3 x 32 x 32), each through `transform` (a level's training
    augmentation), drawn in fork_rng seeded by `seed`: the same images each time, the run's RNG untouched."""
    images, labels = dataset.images[:count], dataset.labels[:count]
    if transform is not None:
        with torch.random.fork_rng(devices=[]):  # the training run's own random stream is not disturbed
            torch.manual_seed(seed)
            images = torch.stack([transform(image) for image in images])  # in order, as a DataLoader with -j 0
    return CifarDataset(images, labels)

@torch.no_grad()
def recompute_bn(model, dataset, device, img_size, batch_size, norms=None):
    """BatchNorm statistics of `model` from one pass over `dataset` (uint8 images, see bn_images), in batches of
    `batch_size` (the levels pass the global training batch): torch.optim.swa_utils.update_bn's procedure (reset,
    cumulative average, train mode). An average of weights needs statistics of its own (Izmailov et al. 2018, sec.
    3.2), and they must come from the distribution the layers trained on: update_bn and the SWA paper's
    `bn_update(loaders['train'], ...)` run over the *training* loader, augmentation included (MixUp/CutMix and
    erasing act on the batch after the loader, so not). `norms`: the BatchNorm layers to recompute (default: all);
    the others keep their statistics and stay in eval mode, as frozen stages do in training."""
    if norms is None:
        norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    model.eval()  # every layer in eval mode (the dropout too), then only the recomputed BatchNorm layers in train mode
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # None = cumulative average
        m.train()
    for images, _ in batches(dataset, min(batch_size, len(dataset)), device, drop_last=True):  # no batch of one
        with autocast(device):
            model(prepare_batch(images, device, img_size))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()

# ---- Level 4: Stochastic Weight Averaging (Izmailov et al. 2018) -------------------------------------------------
class SwaAverage(ModelEma):
    """Stochastic Weight Averaging: the equal-weight mean of the weights passed to `update`, an EMA with d = n / (n + 1)
    after n updates (the first update copies the weights)."""

    def current_decay(self):
        return self.num_updates / (self.num_updates + 1)

# ---- Level 4: NLL and temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks", 4.2) ------
def nll_per_image(view_logits, labels, temperature=1.0, average="softmax"):
    """Each image's exact NLL under average_views(view_logits, temperature, average), from V x N x K (or N x K) logits
    in float64, no clamp: minus the log-softmax of the mean logits ("logit"); for the softmax average,
    log(mean_v p_v) = logsumexp_v(log p_v) - log V. It is what fit_temperature minimises and evaluate.py reports."""
    logits = view_logits.double() / temperature
    if logits.dim() == 2:
        logits = logits.unsqueeze(0)  # one view
    if average == "logit":
        log_probs = logits.mean(0).log_softmax(-1)
    else:
        log_probs = logits.log_softmax(-1).logsumexp(0) - math.log(len(logits))
    return -log_probs.gather(1, labels.long()[:, None]).squeeze(1)

def fit_temperature(view_logits, labels, average="softmax", low=1e-2, high=1e2, points=50, iterations=60):
    """The T minimising the NLL of the labels under the views' average at T (nll_per_image: V x N x K validation
    logits, or N x K for one view). The NLL is convex in 1/T for one view or logit averaging, not for softmax-averaged
    views (views that disagree can give two minima): log T is scanned at `points` points over [log low, log high],
    then golden section runs between the best point's neighbours. Returns (T, at_bound): at_bound, no better than an
    end of the range, so no fit (chance-level logits want T = infinity)."""
    def nll(log_t):  # the mean NLL at T = exp(log_t)
        return float(nll_per_image(view_logits, labels, math.exp(log_t), average).mean())

    grid = np.linspace(math.log(low), math.log(high), points).tolist()
    best = min(range(points), key=lambda i: nll(grid[i]))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, points - 1)]  # the best point's neighbours
    golden = (math.sqrt(5) - 1) / 2  # each step keeps this share (0.618) of the bracket
    for _ in range(iterations):
        a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
        if nll(a) < nll(b):
            hi = b
        else:
            lo = a
    log_t = (lo + hi) / 2
    at_bound = min(nll(math.log(low)), nll(math.log(high))) <= nll(log_t) + 1e-9  # no better than an end: not a fit
    if nll(log_t) >= nll(math.log(1.0)):  # keep T = 1 unless the fit is better
        return 1.0, at_bound
    return math.exp(log_t), at_bound

def applied_temperature(fit):
    """The T a report applies from a fit {"temperature", "at_bound"}: a fit that ended at its search bound is no fit
    (chance-level logits), so T = 1 then. Level 4, evaluate.py and the ablation all apply this rule."""
    if fit["at_bound"]:
        return 1.0
    return fit["temperature"]

# ---- CIFAR-10 (Krizhevsky 2009), from its python pickles; batches prepared on the device ------------------------
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# The pretrained backbone saw ImageNet images normalised with these statistics, so ours must match them.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

class _ArraysOnly(pickle.Unpickler):
    """Unpickles what a CIFAR-10 batch holds (dicts, lists, str, numpy arrays), nothing that could run code."""

    def find_class(self, module, name):
        if module.split(".")[0] in ("numpy", "_codecs") and name in ("ndarray", "dtype", "_reconstruct", "encode"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")

def read_batch(path):
    """One batch file -> (N x 3 x 32 x 32 uint8 images, N int64 labels), every field checked."""
    if Path(path).is_fifo() or Path(path).is_char_device():  # open() would wait for a writer for ever
        raise UserError(f"{path} is not a regular file (a named pipe or a device): re-extract it")
    try:
        with open(path, "rb") as f:
            batch = _ArraysOnly(f, encoding="latin1").load()
    except OSError as error:
        raise UserError(f"{path} cannot be read ({error.strerror or error}): fix or re-extract it") from None
    except Exception as error:  # truncated, random bytes, objects: not a CIFAR-10 batch either way
        raise UserError(f"{path} is not a CIFAR-10 batch ({type(error).__name__}): re-extract it") from None
    data, labels = None, np.asarray(None)
    if isinstance(batch, dict):
        data, labels = batch.get("data"), np.asarray(batch.get("labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise UserError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), not "
                        f"{getattr(data, 'dtype', type(data))} {getattr(data, 'shape', '')}: re-extract it")
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu" or not ((labels >= 0) & (labels <= 9)).all():
        raise UserError(f"{path}: 'labels' must be {len(data)} integers in 0..9: re-extract it")
    # Each row is channel-planar (1,024 red, then green, then blue values, row-major): a plain reshape gives CHW.
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)

def split_indices(labels, seed, val_per_class=500):
    """Stratified: `val_per_class` images per class held out; the rest shuffled, so the first N are a fair sample."""
    rng = np.random.default_rng(seed)
    val = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:val_per_class] for c in range(10)]))
    return rng.permutation(np.setdiff1d(np.arange(len(labels)), val)), val

class CifarDataset(torch.utils.data.Dataset):
    """uint8 N x 3 x 32 x 32 images and labels; `transform` runs in the DataLoader workers, at 32 px: cheap there."""

    def __init__(self, images, labels, transform=None):
        self.images, self.labels, self.transform = torch.as_tensor(images), torch.as_tensor(labels), transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]

def cifar10_datasets(data_dir, seed, subset=None, eval_subset=None, train_on_all=False, transform=None):
    """(train, val, test): the training set split 45,000 / 5,000 by `seed` (50,000 / 0 with `train_on_all`), the first
    `subset` / `eval_subset` images; a missing folder downloaded by torchvision (offline: a one-line error)."""
    folder = Path(data_dir) / "cifar-10-batches-py"
    if (Path(data_dir) / "data_batch_1").is_file():  # --data-dir given as the cifar-10-batches-py folder itself
        folder = Path(data_dir)
    elif not folder.is_dir():
        print(f"{folder} not found: downloading CIFAR-10 (170 MB) with torchvision ...", flush=True)
        socket.setdefaulttimeout(30)  # offline, give up after 30 s instead of hanging
        try:
            torchvision.datasets.CIFAR10(str(data_dir), train=True, download=True)
        except Exception as error:
            raise UserError(f"CIFAR-10 is not at {folder} and could not be downloaded ({type(error).__name__}): "
                            f"extract cifar-10-python.tar.gz so that {folder}/data_batch_1 exists") from None
    parts = [files.read_once(read_batch, folder / f"data_batch_{i}") for i in range(1, 6)]  # once per process
    images, labels = np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])
    test_images, test_labels = files.read_once(read_batch, folder / "test_batch")
    train, val = split_indices(labels, seed, val_per_class=0 if train_on_all else 500)
    train, val = train[:subset], val[:eval_subset]
    return (CifarDataset(images[train], labels[train], transform), CifarDataset(images[val], labels[val]),
            CifarDataset(test_images[:eval_subset].copy(), test_labels[:eval_subset].copy()))  # not the shared arrays

def batches(dataset, batch_size, device, drop_last=False):
    """Evaluation batches: slices of the uint8 tensors, pinned on CUDA; no DataLoader workers to start or wait for."""
    images = dataset.images.pin_memory() if device.type == "cuda" else dataset.images
    end = len(images) - len(images) % batch_size if drop_last else len(images)
    for start in range(0, end, batch_size):
        yield images[start:start + batch_size], dataset.labels[start:start + batch_size]

@functools.lru_cache(maxsize=None)
def _imagenet_stats(device):  # once per device: built from Python numbers, they would be copied to it every step
    return [torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD)]

def prepare_batch(images, device, img_size, view=None):
    """uint8 N x 3 x 32 x 32 batch -> on the device: [0, 1], a TTA `view` (at 32 px), upsampled to `img_size`,
    ImageNet-normalised, channels_last (the fast memory layout for convolutions in mixed precision)."""
    images = images.to(device, non_blocking=True).float().div_(255)
    if view is not None:
        images = view(images)
    if images.shape[-1] != img_size:
        images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)
    mean, std = _imagenet_stats(device)
    return ((images - mean) / std).contiguous(memory_format=torch.channels_last)

# ---- The ResNet-50 (He et al. 2016), with a new 10-class head; its precision ------------------------------------
IMAGENET_WEIGHTS = torchvision.models.ResNet50_Weights.IMAGENET1K_V2

def build_model(weights="imagenet", dropout=0.0):
    """ResNet-50 with a new 10-class head; `weights`: imagenet (IMAGENET1K_V2), none (random init) or a state_dict or
    checkpoint path. Dropout (Srivastava et al. 2014) after the pooling keeps torchvision's key names."""
    model = torchvision.models.resnet50()
    model.fc = nn.Linear(model.fc.in_features, len(CLASSES))
    if dropout > 0:
        model.avgpool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Dropout(dropout))
    if weights == "imagenet":
        socket.setdefaulttimeout(30)
        try:
            state_dict = IMAGENET_WEIGHTS.get_state_dict(progress=False)
        except Exception as error:
            raise UserError(f"ImageNet weights {os.path.basename(IMAGENET_WEIGHTS.url)} are not in "
                            f"{torch.hub.get_dir()}/checkpoints and could not be downloaded ({type(error).__name__}): "
                            f"copy the file there, or use --weights none (random init) or --weights PATH") from None
        load_weights(model, state_dict, "ImageNet weights")
    elif weights != "none":
        load_weights(model, files.load_checkpoint(weights), weights)
    return model

def load_weights(model, state_dict, source):
    """A state_dict or a checkpoint's `model` into `model`: a 10-class one whole, an ImageNet one but its head; keys
    lose DDP's `module.` and torch.compile's `_orig_mod.` prefixes. Mismatches and nan are one-line errors."""
    if isinstance(state_dict, dict):
        state_dict = state_dict.get("model", state_dict.get("state_dict", state_dict))
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise UserError(f"{source} holds no model state_dict: give a ResNet-50 state_dict or checkpoint")
    state_dict = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state_dict.items()}
    if getattr(state_dict.get("fc.weight"), "shape", (0,))[0] == 1000:  # ImageNet's head: keep the new one
        state_dict.update({"fc.weight": model.fc.weight, "fc.bias": model.fc.bias})
    if not all(v.isfinite().all() for v in state_dict.values() if v.is_floating_point()):
        raise UserError(f"{source} holds non-finite weights (nan or inf): it comes from a diverged run")
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        raise UserError(f"{source} is not a 10-class ResNet-50 ({' '.join(str(error).split()[6:])[:150]})") from None

@functools.lru_cache(maxsize=None)
def amp_dtype(device):
    """Mixed precision (Micikevicius et al. 2018): bf16 where GPUs compute it natively (NVIDIA from compute capability
    8.0, AMD); fp16, which needs a GradScaler, on older NVIDIA GPUs (T4, V100, P100); None (fp32) elsewhere."""
    if device.type != "cuda":
        return None
    native_bf16 = torch.version.hip or torch.cuda.get_device_capability(device)[0] >= 8
    return torch.bfloat16 if native_bf16 else torch.float16

def autocast(device):
    """bf16 (fp16 before Ampere) autocast on CUDA; off (fp32) elsewhere."""
    return torch.autocast(device.type, dtype=amp_dtype(device), enabled=amp_dtype(device) is not None)
