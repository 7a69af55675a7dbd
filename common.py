"""The small shared part of the suite: data, model, checkpoints, metrics and the hand-written techniques.

The level scripts (level1.py .. level4.py) each own their training loop and read top to bottom; whatever
two levels would otherwise repeat lives here, written once. The technique helpers (MixUp/CutMix, random
erasing, the warmup-cosine schedule, EMA, SWA, TTA, temperature scaling) are hand-written on purpose:
they are the lesson. Each is tested against a library implementation or a hand-computed answer.

Sections: errors and CLI - data - device-side preprocessing - model - training-mode helpers - schedules -
MixUp/CutMix, label smoothing, random erasing - EMA and SWA - evaluation and TTA - metrics - calibration -
checkpoints and results - distributed (torchrun).
"""
import argparse
import contextlib
import copy
import functools
import math
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2

NUM_CLASSES = 10
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR_FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
# The pretrained backbone saw ImageNet images normalised with these statistics, so ours must match them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_WEIGHTS = torchvision.models.ResNet50_Weights.IMAGENET1K_V2


# ----------------------------------------------------------------------------------------------------------
# Errors and command line


class UserError(Exception):
    """A problem with the user's input or files: reported as one line, exit code 2, no traceback."""


def run_main(main, parser, validate=None):
    """Parse the command line, validate it and run `main(args)`; a UserError (or running out of device
    memory) becomes a one-line error and exit code 2, without a traceback."""
    args = parser.parse_args()
    try:
        if validate is not None:
            validate(args)
        return main(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if not isinstance(error, torch.OutOfMemoryError) and "out of memory" not in str(error):
            raise
        print(f"error: out of device memory at --batch-size {getattr(args, 'batch_size', '?')} and --img-size "
              f"{getattr(args, 'img_size', '?')}: lower --batch-size (e.g. to half) or --img-size", file=sys.stderr)
        sys.exit(2)


# Smoke-run settings (--quick): small enough for a 2-core CPU in a minute or two, every stage still runs.
QUICK_SETTINGS = {"subset": 128, "eval_subset": 128, "img_size": 32, "batch_size": 32, "head_epochs": 1, "epochs": 1,
                  "final_epochs": 1, "swa_epochs": 1, "workers": 2}


def apply_quick(args):
    """--quick: shrink the run to a smoke test (QUICK_SETTINGS) and write under quick/ sub-folders, so a
    real run's checkpoints and results are never touched. Says what it changed."""
    changed = []
    for name, value in QUICK_SETTINGS.items():
        if hasattr(args, name) and getattr(args, name) != value:
            value = min(value, getattr(args, name)) if name == "workers" else value
            setattr(args, name, value)
            changed.append(f"--{name.replace('_', '-')} {value}")
    args.checkpoint_dir = str(Path(args.checkpoint_dir) / "quick")
    args.results_dir = str(Path(args.results_dir) / "quick")
    print(f"smoke run (--quick): {', '.join(changed)}; writing to {args.checkpoint_dir}/ and {args.results_dir}/ "
          f"(the numbers mean nothing: it only shows that everything runs)", flush=True)


def planned_epochs(args):
    """All epochs a run's arguments (a dict, as stored in checkpoints) ask for, over every stage."""
    return sum(int(args.get(name) or 0) for name in ("head_epochs", "epochs", "final_epochs", "swa_epochs"))


def check_overwrite(checkpoint_dir, level, args):
    """Keep a longer run's best checkpoint from being replaced by accident: refuse unless --overwrite.
    Otherwise say that the old files stay until this run writes its first checkpoint (atomic rename)."""
    path = Path(checkpoint_dir) / f"{level}_best.pth"
    if not path.is_file():
        return
    try:
        old = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        old_args, old_acc = old.get("args", {}), old.get("best_val_acc", float("nan"))
    except Exception:  # unreadable: nothing worth protecting, it will be replaced
        old_args, old_acc = {}, float("nan")
    old_epochs, new_epochs = planned_epochs(old_args), planned_epochs(vars(args))
    if old_epochs > new_epochs and not args.overwrite:
        raise UserError(f"{path} is from a longer run ({old_epochs} epochs, validation accuracy {old_acc:.4f}) than "
                        f"this one ({new_epochs}): pass --overwrite to replace it, or --checkpoint-dir to write "
                        f"elsewhere")
    print(f"note: {path} exists (validation accuracy {old_acc:.4f}); it stays until this run writes its first "
          f"checkpoint, which replaces it")


def check_positive(args, *names):
    """Raise a UserError naming the first flag among `names` whose value is not > 0."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} must be > 0 (got {value})")


def check_non_negative(args, *names):
    """Raise a UserError naming the first flag among `names` (those the parser has) whose value is < 0."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0 (got {value})")


def check_img_size(args):
    if args.img_size < 32:
        raise UserError(f"--img-size must be at least 32, CIFAR-10's own size (got {args.img_size})")


def check_common_args(args):
    """The checks every level shares: sizes and rates must be positive, images at least 32 px, a subset
    at least one batch."""
    check_positive(args, "epochs", "batch_size", "lr", "head_lr", "subset", "eval_subset")
    check_non_negative(args, "weight_decay", "min_lr", "warmup_epochs", "unfreeze_warmup_epochs", "workers",
                       "print_freq", "head_epochs")
    check_img_size(args)
    if args.subset is not None and args.subset < args.batch_size:
        raise UserError(f"--subset ({args.subset}) must be at least --batch-size ({args.batch_size})")


# ----------------------------------------------------------------------------------------------------------
# Data: CIFAR-10 read straight from its python pickles


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR-10 batch holds (dicts, lists, str, numpy arrays): never arbitrary code."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}  # protocol 2 spells bytes so

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_pickle(path):
    try:
        with open(path, "rb") as f:
            return _ArrayOnlyUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise UserError(f"{path} is missing: re-extract cifar-10-python.tar.gz so the folder is complete") from None
    except Exception as error:  # truncated, random bytes, wrong format: all mean the same to the user
        raise UserError(f"{path} is corrupt ({type(error).__name__}): re-extract cifar-10-python.tar.gz") from None


def _read_batch(path):
    """One batch file -> (N x 32 x 32 x 3 uint8 images, N int64 labels)."""
    batch = _read_pickle(path)
    try:
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch["labels"], dtype=np.int64)
        # Rows are channel-planar (1024 red, 1024 green, 1024 blue values): to N x 3 x 32 x 32, then NHWC.
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"{path} is corrupt ({type(error).__name__}): re-extract cifar-10-python.tar.gz") from None
    if len(images) != len(labels) or labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise UserError(f"{path} is corrupt (labels do not match images): re-extract cifar-10-python.tar.gz")
    return np.ascontiguousarray(images), labels


@dataclass
class Cifar10:
    train_images: np.ndarray  # 50000 x 32 x 32 x 3 uint8
    train_labels: np.ndarray  # 50000 int64
    test_images: np.ndarray  # 10000 x 32 x 32 x 3 uint8
    test_labels: np.ndarray  # 10000 int64
    classes: list


@contextlib.contextmanager
def network_timeout(seconds=30):
    """Downloads give up after `seconds` without an answer, instead of hanging offline."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def download_cifar10(data_dir):
    """Fetch CIFAR-10 with torchvision's downloader; offline, a one-line error says where to put it."""
    folder = Path(data_dir) / CIFAR_FOLDER
    print(f"{folder} not found: downloading CIFAR-10 (170 MB) with torchvision ...", flush=True)
    try:
        with network_timeout():
            torchvision.datasets.CIFAR10(str(data_dir), train=True, download=True)
    except Exception as error:
        raise UserError(f"CIFAR-10 is not at {folder} and could not be downloaded ({type(error).__name__}): "
                        f"extract cifar-10-python.tar.gz so that {folder}/data_batch_1 exists, "
                        f"or point --data-dir at the folder holding {CIFAR_FOLDER}") from None


def load_cifar10(data_dir):
    """Read the standard `cifar-10-batches-py` folder under `data_dir` (downloading it when absent)."""
    folder = Path(data_dir) / CIFAR_FOLDER
    distributed = torch.distributed.is_initialized()
    if not folder.is_dir() and (not distributed or torch.distributed.get_rank() == 0):
        download_cifar10(data_dir)
    if distributed:  # the other ranks wait for rank 0's download
        torch.distributed.barrier()
    if not folder.is_dir():
        raise UserError(f"CIFAR-10 is not at {folder}: rank 0 could not download it")
    # Kept in memory per folder and file state: ablation rows and tests in one process read it once.
    stamp = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.iterdir()) if p.is_file())
    return _load_cifar10_cached(folder.resolve(), stamp)


@functools.lru_cache(maxsize=2)
def _load_cifar10_cached(folder, stamp):
    train = [_read_batch(folder / name) for name in TRAIN_BATCHES]
    test_images, test_labels = _read_batch(folder / "test_batch")
    meta = _read_pickle(folder / "batches.meta")
    classes = list(meta.get("label_names", [])) if isinstance(meta, dict) else []
    if len(classes) != NUM_CLASSES:
        raise UserError(f"{folder / 'batches.meta'} is corrupt (no 10 label_names): re-extract the archive")
    return Cifar10(np.concatenate([images for images, _ in train]), np.concatenate([labels for _, labels in train]),
                   test_images, test_labels, classes)


def split_train_val(labels, val_per_class=500, seed=0):
    """Stratified split of the official training set: `val_per_class` images of each class go to validation.

    Returns (train_indices, val_indices). The training indices come in a seeded random order, so that
    "the first N" (--subset) is a class-balanced random sample; validation indices are sorted.
    """
    rng = np.random.default_rng(seed)
    val = []
    for cls in range(NUM_CLASSES):
        members = np.flatnonzero(labels == cls)
        if len(members) <= val_per_class:
            raise UserError(f"class {cls} has only {len(members)} images: cannot hold out {val_per_class}")
        val.append(rng.permutation(members)[:val_per_class])
    val = np.sort(np.concatenate(val))
    train = rng.permutation(np.setdiff1d(np.arange(len(labels)), val))
    return train, val


class CifarDataset(torch.utils.data.Dataset):
    """32x32 uint8 images -> (3x32x32 uint8 tensor, label), with `transform` run in the DataLoader worker.

    The sampler may hand over `(index, seed)` pairs instead of plain indices: the transform then runs
    under that seed, so every image's augmentation depends only on (run seed, epoch, index) - not on the
    number of workers, the rank under torchrun, or whether the run was resumed.
    """

    def __init__(self, images, labels, transform=None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        image = torch.from_numpy(self.images[index]).permute(2, 0, 1)  # HWC -> CHW, still uint8
        if self.transform is not None and seed is None:
            image = self.transform(image)
        elif self.transform is not None:
            with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG untouched (workers=0)
                # The CPU generator only (what the v2 transforms draw from): torch.manual_seed would also
                # seed CUDA - 20x slower per image, and with -j 0 it would reseed the device's RNG.
                torch.default_generator.manual_seed(seed)
                image = self.transform(image)
        return image, int(self.labels[index])


class EpochSampler(torch.utils.data.Sampler):
    """Shuffles per epoch as a pure function of (seed, epoch), and shards across torchrun ranks.

    Yields `(index, per-image seed)` pairs (see CifarDataset). `set_epoch(epoch, skip)` picks the epoch and
    skips its first `skip` global samples, which is how a run interrupted mid-epoch resumes exactly.
    Every rank gets the same number of samples: the permutation is padded by wrapping around.
    """

    def __init__(self, size, seed, rank=0, world_size=1):
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def _order(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator)
        padded = math.ceil(self.size / self.world_size) * self.world_size
        return torch.cat([order, order[: padded - self.size]])

    def __len__(self):
        return (math.ceil(self.size / self.world_size) * self.world_size - self.skip) // self.world_size

    def __iter__(self):
        order = self._order().tolist()
        base = (self.seed * 100_003 + self.epoch) * 1_000_003
        for position in range(self.skip + self.rank, len(order), self.world_size):
            index = order[position]
            yield index, (base + index) % (2**63)


def train_transform(randaug_n=0, randaug_m=9):
    """Augmentation on 32-px uint8 images in the workers: crop with 4-px padding + flip (+ RandAugment)."""
    steps = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()]
    if randaug_n > 0:
        # Cubuk et al. 2020, "RandAugment": n random ops at magnitude m (of 31 bins in torchvision).
        steps.append(v2.RandAugment(num_ops=randaug_n, magnitude=randaug_m))
    return v2.Compose(steps)


def default_workers():
    """DataLoader workers: one per core, leaving one for the main process, at most 8 (32-px work is light)."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def _ignore_sigint(worker_id):
    """Workers ignore Ctrl-C: the main process finishes its step and saves; a worker killed by the same
    terminal signal would instead make the next batch fail with 'DataLoader worker exited unexpectedly'."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(dataset, batch_size, sampler=None, workers=0, device=None, drop_last=False):
    """A DataLoader that keeps the device fed: pinned memory on CUDA, persistent workers."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers,
        pin_memory=device is not None and device.type == "cuda", persistent_workers=workers > 0,
        drop_last=drop_last, worker_init_fn=_ignore_sigint if workers > 0 else None,
        # Each iterator draws a base seed for its workers; from its own generator, not the global RNG that
        # MixUp, erasing and dropout use - so neither -j nor a resume shifts their draws. (Augmentation
        # does not use the worker seed: see CifarDataset.)
        generator=torch.Generator().manual_seed(0))


@dataclass
class DataSplits:
    train: CifarDataset
    val: CifarDataset
    test: CifarDataset
    classes: list


def build_datasets(args, transform):
    """Training (augmented by `transform`), validation and test datasets from --data-dir, --seed, --subset."""
    cifar = load_cifar10(args.data_dir)
    train_idx, val_idx = split_train_val(cifar.train_labels, seed=args.seed)
    if args.subset:
        train_idx = train_idx[: args.subset]
    test_images, test_labels = cifar.test_images, cifar.test_labels
    if args.eval_subset:  # quick trials only: results on a partial test set are labelled as such
        val_idx = val_idx[: args.eval_subset]
        test_images, test_labels = test_images[: args.eval_subset], test_labels[: args.eval_subset]
    return DataSplits(
        train=CifarDataset(cifar.train_images[train_idx], cifar.train_labels[train_idx], transform),
        val=CifarDataset(cifar.train_images[val_idx], cifar.train_labels[val_idx]),
        test=CifarDataset(test_images, test_labels),
        classes=cifar.classes)


def seed_everything(seed):
    """Seed Python, NumPy and torch (CPU and CUDA): with the same seed a CPU run is bit-reproducible."""
    import random
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------
# Device-side preprocessing: upsample and normalise on the accelerator, not with PIL on the CPU


def resolve_device(name):
    """'auto' picks CUDA, then Apple's MPS, then the CPU; any other name is taken as given."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    try:
        device = torch.device(name)
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as error:
        raise UserError(f"device {name!r} is not usable here ({error}): use --device cpu or --device auto") from None
    return device


@functools.lru_cache(maxsize=8)
def amp_dtype(device):
    """The mixed-precision dtype for `device` (Micikevicius et al. 2018, "Mixed Precision Training").

    bf16 on GPUs that compute it natively (NVIDIA compute capability 8.0+: A100, H100, RTX 30xx/40xx; AMD):
    fp32's range, so no loss scaling. fp16 on older NVIDIA GPUs (T4, V100, P100: Colab and Kaggle), whose
    tensor cores do fp16 only - a P100 refuses bf16 autocast, a T4 only emulates it, slowly - so fp16 needs
    the GradScaler of `grad_scaler`. None (full fp32) on the CPU and Apple's MPS."""
    if device.type != "cuda":
        return None
    if torch.version.hip or torch.cuda.get_device_capability(device)[0] >= 8:
        return torch.bfloat16
    return torch.float16


def precision_name(device):
    """'bf16', 'fp16' or 'fp32': what the forward passes on `device` compute in (for logs and tables)."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[amp_dtype(device)]


def autocast(device):
    """Forward passes in `amp_dtype(device)` (bf16 or fp16) on CUDA; full fp32 elsewhere."""
    dtype = amp_dtype(device)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def grad_scaler(device):
    """Loss scaling for fp16 (Micikevicius et al. 2018, sec. 3.2): gradients too small for fp16 would
    underflow to 0, so the loss is multiplied by a large scale before backward and the gradients divided
    by it before the step; a step whose gradients overflowed (inf/NaN) is skipped and the scale halved.
    A no-op (enabled=False) with bf16 or fp32: `scale(loss)` returns the loss, `step` just steps.
    With the fused CUDA AdamW the overflow check stays on the device: no host sync per step."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype(device) == torch.float16)


def to_float_images(images, device):
    """uint8 N x 3 x 32 x 32 batch -> float [0, 1] on the device (copy overlaps compute when pinned)."""
    return images.to(device, non_blocking=True).float().div_(255)


def normalize_and_resize(images, img_size):
    """[0, 1] images -> upsampled to img_size, ImageNet-normalised, channels_last (fast for convolutions)."""
    if images.shape[-1] != img_size:
        images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)
    mean, std = _imagenet_stats(images.device, images.dtype)
    return ((images - mean) / std).contiguous(memory_format=torch.channels_last)


@functools.lru_cache(maxsize=8)
def _imagenet_stats(device, dtype):
    """ImageNet mean and std as 1x3x1x1 device tensors, made once: building them every step would copy from
    host memory every step, a copy that can make the host wait for the device."""
    def as_tensor(values):
        return torch.tensor(values, dtype=dtype).view(1, 3, 1, 1).to(device)
    return as_tensor(IMAGENET_MEAN), as_tensor(IMAGENET_STD)


def prepare_batch(images, device, img_size):
    """The whole device-side pipeline for one uint8 batch: to the device, [0, 1], resize, normalise."""
    return normalize_and_resize(to_float_images(images, device), img_size)


# ----------------------------------------------------------------------------------------------------------
# Model


def imagenet_weights_path():
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(IMAGENET_WEIGHTS.url)


def _imagenet_state_dict():
    """torchvision's ResNet50_Weights.IMAGENET1K_V2, from its cache or downloaded into it."""
    path = imagenet_weights_path()
    if not path.is_file():
        print(f"downloading ImageNet weights to {path} ...", flush=True)
    try:
        with network_timeout():
            return IMAGENET_WEIGHTS.get_state_dict(progress=False)
    except Exception as error:
        raise UserError(f"ImageNet weights {path.name} are not in {path.parent} and could not be downloaded "
                        f"({type(error).__name__}): copy the file there, or use --weights none (random init) "
                        f"or --weights PATH (a ResNet-50 state_dict or checkpoint)") from None


def _strip_prefixes(state_dict):
    """Drop the `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes a wrapped model's state_dict has."""
    clean = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            key = key[len(prefix):] if key.startswith(prefix) else key
        clean[key] = value
    return clean


def extract_state_dict(obj, source):
    """A bare state_dict, or the one a checkpoint dict holds under `model` (ours) or `state_dict`."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise UserError(f"{source} holds no model state_dict: expected a ResNet-50 state_dict or a checkpoint")
    return _strip_prefixes(obj)


def load_backbone_weights(model, state_dict, source):
    """Load a 10-class state_dict whole, or an ImageNet (1000-class) one into all but the new head."""
    fc = state_dict.get("fc.weight")
    if fc is not None and fc.shape[0] != NUM_CLASSES:
        if fc.shape[0] != 1000:
            raise UserError(f"{source} has a {fc.shape[0]}-class head: expected 10 (this project) or 1000 (ImageNet)")
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[-1].strip()
        raise UserError(f"{source} is not a ResNet-50 state_dict ({first[:120]})") from None
    missing = [k for k in missing if not k.startswith("fc.") or "fc.weight" in state_dict]
    if missing or unexpected:
        raise UserError(f"{source} is not a ResNet-50 state_dict ({len(missing)} missing, {len(unexpected)} "
                        f"unexpected keys, e.g. {(missing + unexpected)[0]})")


def build_model(weights="imagenet", dropout=0.0):
    """torchvision ResNet-50 with a fresh 10-class head; `weights` is imagenet, none, or a file path.

    Dropout before the head (Srivastava et al. 2014) sits after the global average pool, so the
    state_dict keeps torchvision's key names (`fc.weight`, `fc.bias`) and loads anywhere.
    """
    model = torchvision.models.resnet50(weights=None)
    model.fc = nn.Linear(model.fc.in_features, NUM_CLASSES)
    if dropout > 0:
        model.avgpool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Dropout(dropout))
    if weights == "imagenet":
        load_backbone_weights(model, _imagenet_state_dict(), "ImageNet weights")
    elif weights != "none":
        load_backbone_weights(model, extract_state_dict(load_file(weights), weights), weights)
    return model


# ----------------------------------------------------------------------------------------------------------
# Training-mode helpers: which parts of the network learn


# Stages of ResNet-50 from the input to the output; progressive unfreezing walks this list backwards.
LAYER_GROUPS = ("stem", "layer1", "layer2", "layer3", "layer4", "fc")


def layer_group_modules(model):
    """Map each name of LAYER_GROUPS to its modules (the stem is conv1 + bn1)."""
    return {"stem": [model.conv1, model.bn1], "layer1": [model.layer1], "layer2": [model.layer2],
            "layer3": [model.layer3], "layer4": [model.layer4], "fc": [model.fc]}


def group_parameters(model, group):
    return [p for module in layer_group_modules(model)[group] for p in module.parameters()]


def set_trainable(model, trainable_groups):
    """requires_grad on for the parameters of `trainable_groups`, off for every other group."""
    for group in LAYER_GROUPS:
        for p in group_parameters(model, group):
            p.requires_grad_(group in trainable_groups)


def train_mode(model, trainable_groups):
    """model.train(), except that frozen groups keep BatchNorm in eval mode: their running statistics stay
    those of the pretrained network instead of drifting towards CIFAR-10 while the weights cannot adapt."""
    model.train()
    model = unwrap(model)
    for group in LAYER_GROUPS:
        if group not in trainable_groups:
            for module in layer_group_modules(model)[group]:
                module.eval()


def param_groups_no_bn_decay(parameters, weight_decay, lr, only_trainable=True):
    """Two optimizer groups: weight decay on conv/linear weights, none on BatchNorm weights and biases
    (decaying a BN scale or a bias only shrinks the network's output range; Goyal et al. 2017, sec. 3).
    Told apart by shape: BatchNorm weights and biases are 1-D, conv/linear weights are not."""
    decay, no_decay = [], []
    for p in parameters:
        if p.requires_grad or not only_trainable:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "lr": lr},
            {"params": no_decay, "weight_decay": 0.0, "lr": lr}]


def adamw(param_groups, lr, weight_decay, device):
    """AdamW (Loshchilov & Hutter 2019); the fused CUDA kernel updates all parameters in one launch."""
    fused = device.type == "cuda"
    return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay, fused=fused, foreach=None if fused
                             else True)


# ----------------------------------------------------------------------------------------------------------
# Learning-rate schedules: pure functions of the optimiser step, so resume and tests are trivial


def warmup_cosine_lr(step, total_steps, warmup_steps, base_lr, min_lr=0.0, warmup_start_factor=0.01):
    """LR at optimiser `step` (0-based): linear warmup over `warmup_steps`, then cosine decay to `min_lr`.

    Warmup: Goyal et al. 2017, "Accurate, Large Minibatch SGD". Cosine: Loshchilov & Hutter 2017, "SGDR".
    Equals torch's SequentialLR(LinearLR(warmup_start_factor, 1, warmup_steps), CosineAnnealingLR(
    total_steps - warmup_steps, min_lr)). The LR at step 0 is base_lr * warmup_start_factor, never 0.
    """
    if step < warmup_steps:
        return base_lr * (warmup_start_factor + (1 - warmup_start_factor) * step / warmup_steps)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer, lr):
    """Set every parameter group's LR to `lr`."""
    for group in optimizer.param_groups:
        group["lr"] = lr


# ----------------------------------------------------------------------------------------------------------
# MixUp / CutMix, label smoothing, random erasing (all on the device, on whole batches)


def one_hot_smoothed(labels, num_classes=NUM_CLASSES, smoothing=0.0):
    """Hard labels -> soft targets: (1 - smoothing) on the true class plus smoothing / K everywhere
    (Szegedy et al. 2016, "Rethinking the Inception Architecture", sec. 7)."""
    targets = F.one_hot(labels, num_classes).float()
    return targets * (1 - smoothing) + smoothing / num_classes


def soft_target_cross_entropy(logits, targets):
    """Cross-entropy against soft targets (rows summing to 1): mean over the batch of -sum(t * log p)."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def mixup(images, targets, lam):
    """MixUp (Zhang et al. 2018, "mixup: Beyond Empirical Risk Minimization", eq. 1): a convex blend of each
    image (N x C x H x W) and soft target (N x K) with its neighbour in the batch (roll by one, as torchvision
    does; the batch is already shuffled)."""
    return lam * images + (1 - lam) * images.roll(1, 0), lam * targets + (1 - lam) * targets.roll(1, 0)


def cutmix_box(lam, height, width, generator=None):
    """CutMix's box (Yun et al. 2019, "CutMix", sec. 3.1): area fraction 1 - lam, centre uniform, clipped.
    Returns (top, left, bottom, right) in pixels."""
    cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
    cy = int(torch.randint(height, (1,), generator=generator))
    cx = int(torch.randint(width, (1,), generator=generator))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return top, left, bottom, right


def cutmix(images, targets, box):
    """CutMix: paste the box of each image's neighbour (roll by one) into it; the target weight is the exact
    pasted area, so lam = 1 - box area / image area even where the box was clipped at the border.
    Returns (images, targets, lam)."""
    top, left, bottom, right = box
    height, width = images.shape[-2:]
    mixed = images.clone()
    mixed[..., top:bottom, left:right] = images.roll(1, 0)[..., top:bottom, left:right]
    lam = 1 - (bottom - top) * (right - left) / (height * width)
    return mixed, lam * targets + (1 - lam) * targets.roll(1, 0), lam


def mix_batch(images, targets, mix_prob, switch_prob, mixup_alpha, cutmix_alpha, generator=None):
    """With probability `mix_prob` apply CutMix (probability `switch_prob`) or MixUp to the whole batch,
    with lam ~ Beta(alpha, alpha). Random draws happen on the CPU (no device sync); the mixing on the device.
    Returns (images, soft targets, lam or None when the batch was left as it was)."""
    if mix_prob <= 0 or float(torch.rand((), generator=generator)) >= mix_prob:
        return images, targets, None
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or float(torch.rand((), generator=generator)) < switch_prob)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    if alpha <= 0:
        return images, targets, None
    if generator is None:
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
    else:  # torch.distributions takes no generator: sample under a seed drawn from it
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int(torch.randint(2**62, (), generator=generator)))
            lam = float(torch.distributions.Beta(alpha, alpha).sample())
    if use_cutmix:
        return cutmix(images, targets, cutmix_box(lam, *images.shape[-2:], generator=generator))
    mixed_images, mixed_targets = mixup(images, targets, lam)
    return mixed_images, mixed_targets, lam


def random_erasing(images, prob, area=(0.02, 0.33), log_ratio=(math.log(0.3), math.log(3.3))):
    """Random erasing (Zhong et al. 2020, "Random Erasing Data Augmentation", Alg. 1) of normalised images:
    each image, with probability `prob`, gets one rectangle of `area` fraction and aspect ratio in
    exp(`log_ratio`) replaced by N(0, 1) noise (normalised pixel scale). Vectorised over the batch on the
    device; a rectangle that would not fit is clipped to the image instead of re-drawn."""
    if prob <= 0:
        return images
    n, _, height, width = images.shape
    device = images.device
    erase = torch.rand(n, device=device) < prob
    target_area = torch.empty(n, device=device).uniform_(*area) * height * width
    ratio = torch.exp(torch.empty(n, device=device).uniform_(*log_ratio))
    h = (target_area * ratio).sqrt().round().clamp(1, height)
    w = (target_area / ratio).sqrt().round().clamp(1, width)
    top = (torch.rand(n, device=device) * (height - h + 1)).floor()
    left = (torch.rand(n, device=device) * (width - w + 1)).floor()
    rows = torch.arange(height, device=device).view(1, height, 1)
    cols = torch.arange(width, device=device).view(1, 1, width)
    inside = ((rows >= top.view(n, 1, 1)) & (rows < (top + h).view(n, 1, 1))
              & (cols >= left.view(n, 1, 1)) & (cols < (left + w).view(n, 1, 1)) & erase.view(n, 1, 1))
    return torch.where(inside.unsqueeze(1), torch.randn_like(images), images)


# ----------------------------------------------------------------------------------------------------------
# Weight averaging: EMA and SWA


class ModelEma:
    """Exponential moving average of the weights (Polyak & Juditsky 1992; for deep nets e.g. Tan & Le 2019).

    After each optimiser step: ema = d * ema + (1 - d) * weights. With `warmup`, the decay starts low,
    d_n = min(decay, (1 + n) / (10 + n)) after n updates (TensorFlow's ExponentialMovingAverage with
    num_updates), so early averages are not dominated by the random head. BatchNorm buffers are copied.
    """

    def __init__(self, model, decay=0.999, warmup=True):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.num_updates = decay, warmup, 0

    def current_decay(self):
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model):
        model = unwrap(model)
        decay = self.current_decay()
        ema_params = [p for p in self.module.parameters() if p.dtype.is_floating_point]
        params = [p.detach() for p in model.parameters() if p.dtype.is_floating_point]
        torch._foreach_lerp_(ema_params, params, 1 - decay)  # ema += (1 - d) * (p - ema), one fused launch
        # BatchNorm statistics: copied, not averaged; one fused copy instead of ~320 small kernel launches.
        torch._foreach_copy_(list(self.module.buffers()), list(model.buffers()))
        self.num_updates += 1

    def state_dict(self):
        return {"module": self.module.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state):
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state["num_updates"])


class SwaAverage:
    """Stochastic Weight Averaging (Izmailov et al. 2018, "Averaging Weights Leads to Wider Optima"):
    the equal-weight running mean of the weight snapshots passed to `update`. BatchNorm statistics of the
    average are not an average of statistics: recompute them with `recompute_bn` at the end."""

    def __init__(self, model):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.num_averaged = 0

    @torch.no_grad()
    def update(self, model):
        model = unwrap(model)
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in model.parameters()]
        if self.num_averaged == 0:
            torch._foreach_copy_(ema_params, params)
        else:  # running mean: avg += (p - avg) / (n + 1)
            torch._foreach_lerp_(ema_params, params, 1.0 / (self.num_averaged + 1))
        self.num_averaged += 1

    def state_dict(self):
        return {"module": self.module.state_dict(), "num_averaged": self.num_averaged}

    def load_state_dict(self, state):
        self.module.load_state_dict(state["module"])
        self.num_averaged = int(state["num_averaged"])


@torch.no_grad()
def recompute_bn(model, loader, prepare=lambda images: images):
    """Recompute BatchNorm running statistics with one pass over `loader` (cumulative average, momentum
    None), as torch.optim.swa_utils.update_bn does. `prepare` maps a loader batch to the model's input."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = {m: m.momentum for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    for batch in loader:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        model(prepare(images))
    for m in norms:
        m.momentum = momenta[m]
    model.train(was_training)


# ----------------------------------------------------------------------------------------------------------
# Evaluation and test-time augmentation (views act on the 32-px [0, 1] batch, before upsampling)


def _translate(images, dy, dx):
    """Shift the batch by (dy, dx) pixels, filling with zeros (as the training crop's padding does)."""
    pad = max(abs(dy), abs(dx))
    height, width = images.shape[-2:]
    padded = F.pad(images, (pad, pad, pad, pad))
    return padded[..., pad - dy: pad - dy + height, pad - dx: pad - dx + width]


def _zoom(images, scale):
    """Zoom in by `scale` about the centre (upsample, then centre-crop back to the same size)."""
    height, width = images.shape[-2:]
    big_h, big_w = round(height * scale), round(width * scale)
    big = F.interpolate(images, size=(big_h, big_w), mode="bilinear", align_corners=False)
    top, left = (big_h - height) // 2, (big_w - width) // 2
    return big[..., top: top + height, left: left + width]


TTA_VIEWS = {
    "identity": lambda x: x,
    "flip": lambda x: x.flip(-1),
    "shift_right": lambda x: _translate(x, 0, 2),
    "shift_left": lambda x: _translate(x, 0, -2),
    "shift_down": lambda x: _translate(x, 2, 0),
    "shift_up": lambda x: _translate(x, -2, 0),
    "zoom": lambda x: _zoom(x, 1.125),
    "flip_zoom": lambda x: _zoom(x.flip(-1), 1.125),
}
# Named view sets of growing cost. Every view is deterministic: the same input gives the same output.
TTA_SETS = {
    "none": ["identity"],
    "flip": ["identity", "flip"],
    "flip+translate": ["identity", "flip", "shift_right", "shift_left", "shift_down", "shift_up"],
    "flip+translate+scale": ["identity", "flip", "shift_right", "shift_left", "shift_down", "shift_up",
                             "zoom", "flip_zoom"],
}


@torch.no_grad()
def predict(model, loader, device, img_size, views=("identity",), average="softmax", temperature=1.0):
    """Class probabilities for every image of `loader`, averaged over the TTA `views`.

    average="softmax" averages probabilities; "logit" averages logits, then takes one softmax.
    `temperature` divides the logits first (calibration).
    Returns (probs N x K float32 on the CPU, labels N int64). Accumulates on the device: one sync at the end.
    """
    model.eval()
    weight = 1.0 / len(views)
    all_probs, all_labels = [], []
    for images, labels in loader:
        images = to_float_images(images, device)
        combined = 0
        for name in views:
            with autocast(device):
                logits = model(normalize_and_resize(TTA_VIEWS[name](images), img_size)).float() / temperature
            combined = combined + weight * (logits.softmax(-1) if average == "softmax" else logits)
        all_probs.append(combined if average == "softmax" else combined.softmax(-1))
        all_labels.append(labels)
    return torch.cat(all_probs).cpu(), torch.cat(all_labels)


@torch.no_grad()
def predict_logits(model, loader, device, img_size):
    """Plain (single-view) logits, float32 on the CPU, and labels: what temperature scaling is fitted on."""
    model.eval()
    all_logits, all_labels = [], []
    for images, labels in loader:
        with autocast(device):
            all_logits.append(model(prepare_batch(images, device, img_size)).float())
        all_labels.append(labels)
    return torch.cat(all_logits).cpu(), torch.cat(all_labels)


@torch.no_grad()
def evaluate_loss_acc(model, loader, device, img_size, dist=None):
    """Validation loss and top-1 (fractions), summed on the device and read once at the end. Under torchrun
    each rank sees its shard (see `shard`) and the sums are all-reduced: exact over the whole split."""
    model.eval()
    if dist is not None and dist.enabled:  # BatchNorm statistics drift apart per rank: evaluate rank 0's
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    count = 0
    for images, labels in loader:
        labels = labels.to(device, non_blocking=True)
        with autocast(device):
            logits = model(prepare_batch(images, device, img_size)).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        correct += (logits.argmax(-1) == labels).sum()
        count += len(labels)
    totals = torch.stack([loss_sum.double(), correct.double(), torch.tensor(float(count), device=device).double()])
    if dist is not None:
        all_reduce_sum(totals, dist)
    loss_sum, correct, count = totals.tolist()
    return loss_sum / max(count, 1), correct / max(count, 1)


# ----------------------------------------------------------------------------------------------------------
# Metrics (on CPU tensors; each checked against a hand-computed answer in tests/test_metrics.py)


def confusion_matrix(preds, labels, num_classes=NUM_CLASSES):
    """K x K counts: row = true class, column = predicted class."""
    return torch.bincount(labels * num_classes + preds, minlength=num_classes**2).view(num_classes, num_classes)


def per_class_accuracy(cm):
    """Recall of each class: the diagonal over the row sums (nan for a class with no images)."""
    return cm.diag().double() / cm.sum(1).double()


def precision_recall_f1(cm):
    """Per-class precision (diag / column sums), recall (diag / row sums) and F1; 0 where undefined."""
    tp = cm.diag().double()
    precision = torch.nan_to_num(tp / cm.sum(0).double())
    recall = torch.nan_to_num(tp / cm.sum(1).double())
    f1 = torch.nan_to_num(2 * precision * recall / (precision + recall))
    return precision, recall, f1


def _confidence_bins(probs, n_bins):
    """Top probability, predicted class, and the index of the equal-width bin (lo, hi] the top probability
    falls in, for each row of `probs`."""
    confidence, preds = probs.max(-1)
    bins = torch.clamp(torch.ceil(confidence.double() * n_bins).long() - 1, 0, n_bins - 1)
    return confidence, preds, bins


def expected_calibration_error(probs, labels, n_bins=15):
    """ECE (Naeini et al. 2015; Guo et al. 2017, eq. 3): sum over equal-width confidence bins (lo, hi] of
    |bin| / N * |accuracy(bin) - mean confidence(bin)|, with confidence = the top probability."""
    confidence, preds, bins = _confidence_bins(probs, n_bins)
    correct = (preds == labels).double()
    ece = torch.zeros((), dtype=torch.float64)
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            ece += in_bin.double().mean() * (correct[in_bin].mean() - confidence[in_bin].double().mean()).abs()
    return float(ece)


def reliability_bins(probs, labels, n_bins=15):
    """Per-bin (mean confidence, accuracy, count) for a reliability diagram."""
    confidence, preds, bins = _confidence_bins(probs, n_bins)
    rows = []
    for b in range(n_bins):
        in_bin = bins == b
        count = int(in_bin.sum())
        rows.append((float(confidence[in_bin].mean()) if count else float("nan"),
                     float((preds[in_bin] == labels[in_bin]).double().mean()) if count else float("nan"), count))
    return rows


def negative_log_likelihood(probs, labels):
    """Mean of -log p(true class); probabilities clamped at 1e-12 so a confident mistake stays finite."""
    return float(-probs.gather(1, labels.view(-1, 1)).clamp_min(1e-12).log().mean())


def brier_score(probs, labels):
    """Multi-class Brier score (Brier 1950): mean over images of sum over classes of (p_k - y_k)^2."""
    return float(((probs - F.one_hot(labels, probs.shape[1]).to(probs.dtype)) ** 2).sum(1).mean())


def classification_report(probs, labels, classes):
    """Every metric the suite reports for one set of predictions, as a JSON-ready dict."""
    preds = probs.argmax(-1)
    cm = confusion_matrix(preds, labels, len(classes))
    precision, recall, f1 = precision_recall_f1(cm)
    return {
        "acc1": float((preds == labels).double().mean()),
        "ece": expected_calibration_error(probs, labels),
        "nll": negative_log_likelihood(probs, labels),
        "brier": brier_score(probs, labels),
        "per_class_acc": dict(zip(classes, per_class_accuracy(cm).tolist())),
        "precision": dict(zip(classes, precision.tolist())),
        "recall": dict(zip(classes, recall.tolist())),
        "f1": dict(zip(classes, f1.tolist())),
        "confusion_matrix": cm.tolist(),
        "num_images": len(labels),
    }


def most_confused_pairs(cm, classes, k=5):
    """The k largest off-diagonal cells of a confusion matrix: (true class, predicted class, count)."""
    off_diagonal = torch.as_tensor(cm).clone()
    off_diagonal.fill_diagonal_(0)
    counts, flat = off_diagonal.flatten().sort(descending=True)
    n = off_diagonal.shape[0]
    return [(classes[i // n], classes[i % n], int(c)) for c, i in zip(counts[:k].tolist(), flat[:k].tolist()) if c > 0]


def confident_mistakes(probs, labels, k=16):
    """Indices of the k wrong predictions made with the highest confidence, most confident first."""
    confidence, preds = probs.max(-1)
    wrong = torch.nonzero(preds != labels).flatten()
    order = confidence[wrong].argsort(descending=True, stable=True)
    return wrong[order][:k].tolist()


def timed_report(model, loader, device, img_size, classes, views=("identity",), average="softmax",
                 temperature=1.0):
    """classification_report of predict(...), and the images per second predict ran at (it ends in a device
    sync, so the clock is honest)."""
    started = time.time()
    probs, labels = predict(model, loader, device, img_size, views, average, temperature)
    images_per_s = len(labels) / (time.time() - started)
    return classification_report(probs, labels, classes), images_per_s


# ----------------------------------------------------------------------------------------------------------
# Calibration: temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks", sec. 4.2)


def fit_temperature(logits, labels, low=0.05, high=20.0, iterations=100):
    """The temperature T > 0 minimising the NLL of softmax(logits / T) on (validation) logits.

    The NLL is convex in 1/T, so a golden-section search over 1/T in [1/high, 1/low] finds the optimum;
    if it is not better than T = 1 (e.g. at the search's tolerance), T = 1 is kept. Accuracy never changes:
    dividing by T > 0 keeps the arg-max.
    """
    logits, labels = logits.double(), labels.long()

    def nll(inv_t):
        return float(F.cross_entropy(logits * inv_t, labels))

    lo, hi = 1 / high, 1 / low
    golden = (math.sqrt(5) - 1) / 2
    a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(iterations):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - golden * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + golden * (hi - lo)
            fb = nll(b)
    inv_t = (lo + hi) / 2
    return 1 / inv_t if nll(inv_t) < nll(1.0) else 1.0


# ----------------------------------------------------------------------------------------------------------
# Checkpoints and results: written to a temp file and renamed, loaded with weights_only=True


def atomic_write(path, write):
    """Call write(file_object) on a temp file beside `path`, fsync it, then rename it over `path`: a crash
    at any point leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path, checkpoint):
    """torch.save through atomic_write. Under torchrun only rank 0 writes (every rank holds the same state)."""
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def load_file(path):
    """torch.load(path, weights_only=True) with every failure turned into a one-line UserError."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory: give the path of a .pth file")
    if not path.is_file():
        raise UserError(f"{path} does not exist: check the path (checkpoints are written under checkpoints/)")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty: the file was not written completely; use another checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower() or "weights_only" in str(error).lower():
            raise UserError(f"{path} was refused: it holds pickled objects that could run code, which "
                            f"weights_only loading does not allow; load only checkpoints you trust") from None
        raise UserError(f"{path} is not a PyTorch checkpoint (truncated or corrupt)") from None
    except Exception:
        raise UserError(f"{path} is not a PyTorch checkpoint (truncated or corrupt)") from None


def load_checkpoint(path, level=None):
    """A checkpoint of this project; with `level`, one written by that level (for --resume)."""
    checkpoint = load_file(path)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "epoch" not in checkpoint:
        raise UserError(f"{path} is not a checkpoint of this project (no model/epoch): resume needs a levelN_last.pth")
    if level is not None and checkpoint.get("level") != level:
        raise UserError(f"{path} was written by {checkpoint.get('level', 'another program')}, not {level}: "
                        f"resume with checkpoints/{level}_last.pth")
    return checkpoint


def rng_state():
    """The torch RNG states (CPU and CUDA) that MixUp, erasing and dropout draw from, for exact resume."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopOnInterrupt:
    """The first Ctrl-C (SIGINT) only sets `requested`: the loop finishes its current step, saves
    levelN_last.pth and exits, so no step is half-done in the checkpoint (in an epoch's last step or in
    validation, the epoch is finished and saved as usual first). A second Ctrl-C stops at once.
    Not under torchrun (enabled=False): ranks could stop at different steps and wait for each other forever,
    so there Ctrl-C ends the run and --resume starts from the last end-of-epoch checkpoint."""

    def __init__(self, enabled=True):
        self.requested = False
        if enabled:
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            signal.signal(signal.SIGINT, self._previous)
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: finishing this step and saving the last checkpoint (Ctrl-C again to abort)",
              file=sys.stderr, flush=True)


def exit_interrupted(last_checkpoint, training_done=False):
    """After a Ctrl-C (StopOnInterrupt) and the save: say how to continue; exit code 130 (128 + SIGINT)."""
    then = " (training is complete: it only runs the final evaluation)" if training_done else ""
    print(f"interrupted: saved {last_checkpoint}; continue with --resume {last_checkpoint}{then}", flush=True)
    sys.exit(130)


def restore_scaler(scaler, checkpoint):
    """The fp16 loss scale of a resumed run. Nothing to restore from a bf16/fp32 run (its disabled scaler
    saved {}) or from a checkpoint older than the scaler: the scaler then starts afresh, as a new run does."""
    if checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])


# Flags that may differ on --resume without changing what the run computes (--weights: the checkpoint's
# weights replace them), and flags that must not: the split (--seed, --subset), the position in the epoch
# (--batch-size: steps x batch images are skipped) and where --quick writes.
RESUME_FREE_FLAGS = {"resume", "overwrite", "workers", "print_freq", "device", "data_dir", "checkpoint_dir",
                     "results_dir", "stop_after_epochs", "compile", "weights"}
RESUME_FIXED_FLAGS = {"seed", "subset", "batch_size", "quick"}


def changed_flags(saved_args, args, ignore=RESUME_FREE_FLAGS):
    """The flags of `args` that differ from the run that saved the checkpoint (`saved_args`, a dict), as
    "--flag: new (was old)", leaving out those in `ignore`."""
    return [f"--{name.replace('_', '-')}: {getattr(args, name)} (was {saved_args[name]})" for name in sorted(saved_args)
            if name not in ignore and hasattr(args, name) and getattr(args, name) != saved_args[name]]


def resume_from(path, level, model, args):
    """Load `level`'s checkpoint at `path` into `model` and restore the RNG state it saved; returns the
    checkpoint, whose epoch / step_in_epoch / best_val_acc / history say where the run continues.
    Flags that differ from the saved run's are named: they apply from here on (e.g. more --epochs), which
    also means the run is no longer the one a straight run with either set of flags would have made."""
    checkpoint = load_checkpoint(path, level)
    if not checkpoint.get("resumable", True):
        raise UserError(f"{path} is a best checkpoint, kept for evaluation only: resume with "
                        f"{Path(path).with_name(level + '_last.pth')}")
    saved_args = checkpoint.get("args", {})
    fixed = [f"--{name.replace('_', '-')} {saved_args[name]} (this run: {getattr(args, name)})"
             for name in sorted(RESUME_FIXED_FLAGS & saved_args.keys())
             if hasattr(args, name) and getattr(args, name) != saved_args[name]]
    if fixed:
        raise UserError(f"{path} was saved by a run with {', '.join(fixed)}: resume with the same --seed, --subset, "
                        f"--batch-size and --quick (they fix the data split and the position in the epoch)")
    load_backbone_weights(model, checkpoint["model"], path)
    set_rng_state(checkpoint["rng"])
    print(f"resumed from {path}: {checkpoint['epoch']} epochs done (+{checkpoint['step_in_epoch']} steps)")
    changed = changed_flags(saved_args, args, ignore=RESUME_FREE_FLAGS | RESUME_FIXED_FLAGS)
    if changed:
        print(f"warning: flags differ from the run that saved it, the new values apply from here on: "
              f"{', '.join(changed)}", flush=True)
    return checkpoint


def library_versions():
    return {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__), "numpy": str(np.__version__),
            "python": sys.version.split()[0]}


def git_commit():
    """The commit the code ran from (with -dirty when it had uncommitted changes), or 'unknown'."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + ("-dirty" if dirty else "")) if commit else "unknown"


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({os.cpu_count()} cores)" if device.type == "cpu" else device.type


def write_json(path, obj):
    import json
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def _save_figure(fig, path, title=None):
    """Title, tight layout, write the PNG (making its folder) and free the figure."""
    if title is not None:
        fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)


def plot_curves(history, path, title, extra_val_keys=()):
    """Loss and accuracy per epoch, train vs validation (plus e.g. the EMA model's validation accuracy)."""
    plt = _pyplot()
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [row["train_loss"] for row in history], label="train")
    ax_loss.plot(epochs, [row["val_loss"] for row in history], label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    if any(row.get("train_acc") is not None for row in history):
        ax_acc.plot(epochs, [row.get("train_acc") for row in history], label="train (augmented)")
    ax_acc.plot(epochs, [row["val_acc"] for row in history], label="validation")
    for key in extra_val_keys:
        ax_acc.plot(epochs, [row.get(key) for row in history], label=key.replace("_", " "))
    ax_acc.set(xlabel="epoch", ylabel="top-1 accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    _save_figure(fig, path, title)


def plot_confusion_matrix(cm, classes, path, title):
    """Two panels: raw counts and row-normalised (each row = one true class, sums to 1)."""
    plt = _pyplot()
    cm = torch.as_tensor(cm)
    normalised = (cm.double() / cm.sum(1, keepdim=True).clamp_min(1)).numpy()
    fig, axes = plt.subplots(1, 2, figsize=(14, 6))
    for ax, matrix, fmt, name in ((axes[0], cm.numpy(), "d", "counts"), (axes[1], normalised, ".2f", "row-normalised")):
        ax.imshow(matrix, cmap="Blues")
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, format(matrix[i, j], fmt), ha="center", va="center", fontsize=7,
                        color="white" if matrix[i, j] > matrix.max() / 2 else "black")
        ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true",
               title=name)
        ax.set_xticklabels(classes, rotation=45, ha="right")
        ax.set_yticklabels(classes)
    _save_figure(fig, path, title)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_reliability(bins_before, bins_after, path, title):
    """Reliability diagrams (Guo et al. 2017, fig. 1): accuracy per confidence bin vs the diagonal."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, (name, bins) in zip(axes, (("before temperature scaling", bins_before),
                                       ("after temperature scaling", bins_after))):
        n_bins = len(bins)
        centres = [(i + 0.5) / n_bins for i in range(n_bins)]
        accuracies = [acc if count else 0 for _, acc, count in bins]
        ax.bar(centres, accuracies, width=1 / n_bins, edgecolor="black", label="accuracy")
        ax.plot([0, 1], [0, 1], "r--", label="perfect calibration")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=name)
        ax.legend(loc="upper left")
    _save_figure(fig, path, title)


def plot_image_grid(images, captions, path, title, columns=8):
    """32x32 images (N x 32 x 32 x 3 uint8) in a grid, each with a caption (e.g. true / predicted / p)."""
    plt = _pyplot()
    rows = max(1, math.ceil(len(images) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.6, rows * 1.9), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(caption, fontsize=7)
    _save_figure(fig, path, title)


def plot_bars(names, values, path, title, ylabel, reference=None):
    """A horizontal bar chart (ablations, level summary); `reference` draws a vertical line (the baseline)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.5))
    ax.barh(range(len(names)), values, color="tab:blue")
    for i, value in enumerate(values):
        ax.text(value, i, f" {value:.4f}", va="center", fontsize=8)
    if reference is not None:
        ax.axvline(reference, color="red", linestyle="--", label="baseline")
        ax.legend(loc="lower right")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names)
    ax.invert_yaxis()
    low = min(values) if values else 0
    ax.set_xlim(max(0.0, low - 0.05), min(1.0, max(values, default=1) + 0.05))
    ax.set(xlabel=ylabel, title=title)
    _save_figure(fig, path)


def args_to_argv(parser, args, skip=()):
    """The command-line flags that reproduce `args` (those that differ from the parser's defaults)."""
    argv = []
    for action in parser._actions:
        if not action.option_strings or action.dest in skip or action.dest == "help":
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = max(action.option_strings, key=len)
        if isinstance(action, argparse._StoreTrueAction):
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


class Progress:
    """Per-epoch timing: images/s, elapsed time and ETA; an in-place progress line when stdout is a terminal."""

    def __init__(self, total_epochs, start_epoch=0):
        self.total_epochs, self.start_epoch, self.start = total_epochs, start_epoch, time.time()
        self.interactive = sys.stdout.isatty()

    def step_line(self, epoch, step, steps, loss):
        """The step line (every --print-freq steps; 0 = never): reading `loss` is the only host-device sync
        inside an epoch, and only on these steps."""
        text = f"epoch {epoch + 1} step {step}/{steps} loss {float(loss):.4f}"
        if self.interactive:
            print("\r" + text, end="", flush=True)
        else:
            print(text, flush=True)

    def eta(self, epoch):
        done = epoch + 1 - self.start_epoch
        elapsed = time.time() - self.start
        return elapsed, elapsed / max(done, 1) * (self.total_epochs - epoch - 1)

    def end_line(self):
        if self.interactive:
            print("\r", end="")


# ----------------------------------------------------------------------------------------------------------
# Distributed training under torchrun (DistributedDataParallel)


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def enabled(self):
        return self.world_size > 1


def init_distributed(device_arg):
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; start NCCL on CUDA, gloo on the CPU. Without
    torchrun, a one-process Dist is returned and nothing is initialised. Returns (dist, device)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        device = resolve_device(device_arg)
        torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed input sizes: cuDNN picks its fastest kernels
        return Dist(), device
    dist = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if device_arg in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(dist.local_rank)  # first: else every process opens a context on GPU 0
        device_arg = f"cuda:{dist.local_rank}"  # one GPU per process
    device = resolve_device(device_arg)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels once
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_main:  # only rank 0 talks; the other ranks' errors still reach stderr
        sys.stdout = open(os.devnull, "w")
    return dist, device


def unwrap(model):
    """The plain model inside a DistributedDataParallel and/or torch.compile wrapper."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def wrap_for_training(model, dist, device, compile_model=False):
    """The model as the training step calls it: DistributedDataParallel over the parameters that train now
    (under torchrun), then torch.compile (--compile). DDP registers the trainable parameters when it is built,
    so after (un)freezing a group the wrapper is built again - and a compiled model compiles again. The
    plain `model` stays what EMA, SWA, evaluation and checkpoints use (common.unwrap reaches it)."""
    if dist.enabled:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile_model:
        model = torch.compile(model)
    return model


class AllReduceBatchNorm2d(nn.BatchNorm2d):
    """SyncBatchNorm for CPU processes (torch's needs a GPU): in training, the batch statistics are those of
    the global batch - per-channel sums of x and x^2 all-reduced over the ranks with a differentiable
    all-reduce, so the backward pass is synchronised too (as in Ioffe & Szegedy 2015, over the whole batch)."""

    def forward(self, x):
        if not (self.training and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce
        local_count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        sums = torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), local_count])
        sums = all_reduce(sums)
        count = sums[-1]
        mean = sums[: self.num_features] / count
        var = sums[self.num_features: 2 * self.num_features] / count - mean * mean
        with torch.no_grad():
            self.num_batches_tracked += 1
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.lerp_(mean.detach(), momentum)
            self.running_var.lerp_(var.detach() * count / (count - 1), momentum)  # unbiased, as BatchNorm
        scale = self.weight / torch.sqrt(var + self.eps)
        return x * scale.view(1, -1, 1, 1) + (self.bias - mean * scale).view(1, -1, 1, 1)


def convert_sync_bn(model, device):
    """--sync-bn: BatchNorm statistics over the global batch. nn.SyncBatchNorm on GPUs; AllReduceBatchNorm2d
    on CPU processes (gloo). Parameters and buffers are kept (same objects): optimiser and EMA still see them."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            replacement = AllReduceBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                               child.track_running_stats)
            replacement.weight, replacement.bias = child.weight, child.bias
            replacement.running_mean, replacement.running_var = child.running_mean, child.running_var
            replacement.num_batches_tracked = child.num_batches_tracked
            replacement.train(child.training)
            setattr(model, name, replacement)
        else:
            convert_sync_bn(child, device)
    return model


def shard(dataset, dist):
    """This rank's share of an evaluation split: every world_size-th image, no padding, no duplicates."""
    if not dist.enabled:
        return dataset
    return torch.utils.data.Subset(dataset, list(range(dist.rank, len(dataset), dist.world_size)))


def sum_over_ranks(*values):
    """Python floats: each value (a device tensor or a number) summed over all torchrun ranks - how an
    epoch's training loss covers the whole epoch. This is the epoch's one host-device sync."""
    device = next((v.device for v in values if torch.is_tensor(v)), torch.device("cpu"))
    totals = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    return totals.tolist()


def all_reduce_sum(tensor, dist):
    """Sum a tensor over all ranks (in place); a no-op in a single process."""
    if dist.enabled:
        torch.distributed.all_reduce(tensor)
    return tensor


def cleanup_distributed(dist):
    if dist.enabled:
        torch.distributed.destroy_process_group()
