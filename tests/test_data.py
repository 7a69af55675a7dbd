"""CIFAR-10 from its pickles (common.py): counts, labels and pixels, the stratified split, the dataset and the device
preprocessing, and every bad data folder as one line on stderr with exit code 2."""
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import TINY, assert_one_line_error, real_cifar_dir, run_cli, write_synthetic_cifar

import common
import level1

BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
needs_real = pytest.mark.skipif(real_cifar_dir() is None, reason="real CIFAR-10 not available")


def linked_copy(synthetic_root, tmp_path):
    """A private --data-dir: the synthetic batches hard-linked (free); replace a file only through `replace`."""
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for path in (synthetic_root / "cifar-10-batches-py").iterdir():
        os.link(path, folder / path.name)
    return folder


def replace(folder, name, content):
    """Unlink (never write through a hard link), then write bytes or pickle an object."""
    (folder / name).unlink()
    (folder / name).write_bytes(content if isinstance(content, bytes) else pickle.dumps(content, protocol=2))
    return folder / name


def run_on(folder, tmp_path):
    """A tiny level1 run on the data folder `folder` (a cifar-10-batches-py), writing under tmp_path."""
    return run_cli(level1, *TINY, "--data-dir", folder.parent, "--checkpoint-dir", tmp_path / "ck",
                   "--results-dir", tmp_path / "res")


# ---- The real CIFAR-10 ---------------------------------------------------------------------------------------------

@needs_real
def test_real_batches_counts_first_labels_and_channel_layout():
    """50,000 + 10,000 images, the archive's first labels, 5,000 per class, CHW channel means as published."""
    parts = [common.read_batch(real_cifar_dir() / name) for name in BATCHES]
    train_images = np.concatenate([x for x, _ in parts[:5]])
    train_labels = np.concatenate([y for _, y in parts[:5]])
    test_images, test_labels = parts[5]
    assert train_images.shape == (50000, 3, 32, 32) and train_images.dtype == np.uint8
    assert test_images.shape == (10000, 3, 32, 32) and test_labels.dtype == np.int64
    assert train_labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert test_labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert np.bincount(train_labels).tolist() == [5000] * 10
    assert np.bincount(test_labels).tolist() == [1000] * 10
    # The per-channel means of the training set (0.4914, 0.4822, 0.4465): a wrong layout mixes the channels.
    assert np.allclose(train_images[:10000].mean(axis=(0, 2, 3)) / 255, [0.4914, 0.4822, 0.4465], atol=0.01)


@needs_real
def test_real_split_is_45000_and_5000_with_500_per_class_in_val():
    """The default split: 45,000 / 5,000, stratified (500 per class in validation), 10,000 test images."""
    train, val, test = common.cifar10_datasets(real_cifar_dir().parent, seed=0)
    assert (len(train), len(val), len(test)) == (45000, 5000, 10000)
    assert np.bincount(val.labels.numpy(), minlength=10).tolist() == [500] * 10
    assert np.bincount(train.labels.numpy(), minlength=10).tolist() == [4500] * 10


@needs_real
def test_train_on_all_split_is_50000_and_0():
    """Issue 13 point 6: --train-on-all trains on all 50,000 training images and holds none out."""
    train, val, test = common.cifar10_datasets(real_cifar_dir().parent, seed=0, train_on_all=True)
    assert (len(train), len(val), len(test)) == (50000, 0, 10000)
    assert np.bincount(train.labels.numpy(), minlength=10).tolist() == [5000] * 10


# ---- A synthetic folder in the same format -------------------------------------------------------------------------

def test_synthetic_folder_round_trips_pixels_exactly(tmp_path):
    """Every pixel and label written (CHW rows) comes back unchanged, in file order."""
    written = write_synthetic_cifar(tmp_path / "cifar-10-batches-py", per_class_per_batch=60, test_per_class=7)
    for name in BATCHES:
        images, labels = common.read_batch(tmp_path / "cifar-10-batches-py" / name)
        assert images.shape == written[name][0].shape and images.dtype == np.uint8
        assert np.array_equal(images, written[name][0]) and np.array_equal(labels, written[name][1])
    # Through cifar10_datasets: the test set is test_batch in order; train + val are all training images.
    train, val, test = common.cifar10_datasets(tmp_path, seed=0, train_on_all=True)
    assert torch.equal(test.images, torch.as_tensor(written["test_batch"][0]))
    all_train = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    assert sorted(map(bytes, train.images.numpy())) == sorted(map(bytes, all_train))


def test_subset_and_eval_subset_take_the_first_images(synthetic_root):
    """--subset / --eval-subset: the first N of the (shuffled) training order, of validation and of test."""
    full_train, full_val, full_test = common.cifar10_datasets(synthetic_root, seed=3)
    train, val, test = common.cifar10_datasets(synthetic_root, seed=3, subset=40, eval_subset=25)
    assert (len(train), len(val), len(test)) == (40, 25, 25)
    assert torch.equal(train.images, full_train.images[:40]) and torch.equal(val.images, full_val.images[:25])
    assert torch.equal(test.labels, full_test.labels[:25])


# ---- The split -----------------------------------------------------------------------------------------------------

def test_split_indices_stratified_disjoint_complete_and_seeded():
    """500 per class held out, the rest trains; disjoint, together every index; same seed same split."""
    labels = np.random.default_rng(1).permutation(np.repeat(np.arange(10), 600))
    train, val = common.split_indices(labels, seed=7)
    assert len(val) == 5000 and len(train) == 1000
    assert np.bincount(labels[val], minlength=10).tolist() == [500] * 10
    assert np.bincount(labels[train], minlength=10).tolist() == [100] * 10
    assert len(np.intersect1d(train, val)) == 0
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
    again_train, again_val = common.split_indices(labels, seed=7)
    assert np.array_equal(train, again_train) and np.array_equal(val, again_val)
    other_train, other_val = common.split_indices(labels, seed=8)
    assert not np.array_equal(val, other_val) and not np.array_equal(train, other_train)


def test_split_indices_training_order_is_shuffled():
    """The training indices are not in file order, so the first N (--subset) are a fair sample of all classes."""
    labels = np.repeat(np.arange(10), 600)  # sorted by class: the first 600 are all class 0
    train, _ = common.split_indices(labels, seed=0)
    assert not np.all(np.diff(train) > 0)
    assert len(np.unique(labels[train[:100]])) == 10
    train_all, val_none = common.split_indices(labels, seed=0, val_per_class=0)
    assert len(val_none) == 0 and np.array_equal(np.sort(train_all), np.arange(len(labels)))


# ---- Dataset and device preprocessing ------------------------------------------------------------------------------

def test_cifar_dataset_applies_its_transform():
    """The transform runs on each uint8 CHW image; without one the image comes back as stored."""
    images = np.random.default_rng(0).integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5])
    plain = common.CifarDataset(images, labels)
    flipped = common.CifarDataset(images, labels, transform=lambda image: image.flip(-1))
    assert len(flipped) == 5
    for i in range(5):
        assert torch.equal(plain[i][0], torch.as_tensor(images[i])) and int(plain[i][1]) == labels[i]
        assert torch.equal(flipped[i][0], torch.as_tensor(images[i]).flip(-1)) and int(flipped[i][1]) == labels[i]
    assert not torch.equal(flipped[0][0], plain[0][0])


def test_prepare_batch_normalises_with_imagenet_statistics_in_channels_last():
    """At 32 px: (x / 255 - mean) / std per channel, computed here by hand, float32, channels_last."""
    images = torch.as_tensor(np.random.default_rng(0).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8))
    out = common.prepare_batch(images, torch.device("cpu"), 32)
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    for c, (mean, std) in enumerate(zip(common.IMAGENET_MEAN, common.IMAGENET_STD)):
        expected = (images[:, c].double() / 255 - mean) / std
        assert torch.allclose(out[:, c].double(), expected, atol=1e-5), c


def test_prepare_batch_upsamples_to_img_size():
    """To --img-size with bilinear interpolation: a flat colour stays flat, a random image as F.interpolate."""
    flat = torch.full((2, 3, 32, 32), 200, dtype=torch.uint8)
    out = common.prepare_batch(flat, torch.device("cpu"), 96)
    assert out.shape == (2, 3, 96, 96) and out.is_contiguous(memory_format=torch.channels_last)
    for c, (mean, std) in enumerate(zip(common.IMAGENET_MEAN, common.IMAGENET_STD)):
        assert torch.allclose(out[:, c], torch.full((2, 96, 96), (200 / 255 - mean) / std), atol=1e-5)
    images = torch.as_tensor(np.random.default_rng(1).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8))
    mean = torch.tensor(common.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(common.IMAGENET_STD).view(1, 3, 1, 1)
    by_hand = (F.interpolate(images.float() / 255, size=(64, 64), mode="bilinear", align_corners=False) - mean) / std
    assert torch.allclose(common.prepare_batch(images, torch.device("cpu"), 64), by_hand, atol=1e-5)


# ---- Bad data folders: one line on stderr, exit code 2 -------------------------------------------------------------

def test_missing_batch_file_is_one_line_error(synthetic_root, tmp_path):
    folder = linked_copy(synthetic_root, tmp_path)
    (folder / "data_batch_3").unlink()
    assert_one_line_error(run_on(folder, tmp_path), str(folder / "data_batch_3"))


@pytest.mark.parametrize("kind", ["truncated", "random_bytes", "empty"])
def test_corrupt_batch_file_is_not_a_cifar10_batch(synthetic_root, tmp_path, kind):
    folder = linked_copy(synthetic_root, tmp_path)
    content = {"truncated": (folder / "test_batch").read_bytes()[:5000], "empty": b"",
               "random_bytes": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()}[kind]
    path = replace(folder, "test_batch", content)
    assert_one_line_error(run_on(folder, tmp_path), str(path), "not a CIFAR-10 batch")


class _RunsCode:
    """Unpickling it would run a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_batch_pickle_that_would_run_code_is_refused(synthetic_root, tmp_path):
    folder = linked_copy(synthetic_root, tmp_path)
    marker = tmp_path / "code_ran"
    path = replace(folder, "data_batch_2", {"data": _RunsCode(marker), "labels": [0]})
    assert_one_line_error(run_on(folder, tmp_path), str(path))
    assert not marker.exists()


def test_unreadable_batch_file_says_cannot_be_read_with_the_os_reason(synthetic_root, tmp_path):
    """Issue 14 point 8: a file that cannot be opened (here a directory in its place: tests run as root, so chmod
    000 would not stop reading) is "cannot be read (Is a directory)", not "corrupt"."""
    folder = linked_copy(synthetic_root, tmp_path)
    (folder / "data_batch_1").unlink()
    (folder / "data_batch_1").mkdir()
    line = assert_one_line_error(run_on(folder, tmp_path), str(folder / "data_batch_1"), "cannot be read",
                                 "Is a directory")
    assert "corrupt" not in line and "not a CIFAR-10 batch" not in line


def _batch(n=3, data=None, labels=None):
    rng = np.random.default_rng(0)
    return {"batch_label": "x", "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8) if data is None else data,
            "labels": (np.arange(n) % 10).tolist() if labels is None else labels,
            "filenames": [f"{i}.png" for i in range(n)]}


@pytest.mark.parametrize("kind", ["float32_data", "nhwc_data", "label_10", "label_negative", "too_few_labels"])
def test_wrong_arrays_are_one_line_errors_naming_the_file(synthetic_root, tmp_path, kind):
    """Issue 14 point 9: the same images stored as float32 or as an N x 32 x 32 x 3 array, a label out of 0..9, one
    label too few: refused with the file's name (a float or NHWC array used to be reshaped into wrong images)."""
    folder = linked_copy(synthetic_root, tmp_path)
    with open(folder / "data_batch_4", "rb") as f:
        batch = pickle.load(f, encoding="latin1")  # our own synthetic file
    data, labels = batch["data"], list(batch["labels"])
    batch.update({"float32_data": {"data": data.astype(np.float32)},
                  "nhwc_data": {"data": data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()},
                  "label_10": {"labels": [10] + labels[1:]}, "label_negative": {"labels": labels[:-1] + [-1]},
                  "too_few_labels": {"labels": labels[:-1]}}[kind])
    path = replace(folder, "data_batch_4", batch)
    line = assert_one_line_error(run_on(folder, tmp_path), str(path))
    assert ("'data'" if kind.endswith("_data") else "'labels'") in line


def test_read_batch_accepts_labels_as_any_integer_array(tmp_path):
    """The check is not stricter than the format: labels as a list or an int64/uint8 array both load."""
    for labels in ([1, 2, 3], np.array([1, 2, 3], dtype=np.uint8), np.array([1, 2, 3])):
        (tmp_path / "b").write_bytes(pickle.dumps(_batch(n=3, labels=labels), protocol=2))
        images, read = common.read_batch(tmp_path / "b")
        assert images.shape == (3, 3, 32, 32) and read.tolist() == [1, 2, 3] and read.dtype == np.int64


def test_missing_folder_offline_says_where_to_put_the_data(tmp_path, monkeypatch):
    """No cifar-10-batches-py and no network: one line naming the folder and the file it must hold."""
    def offline(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    folder = tmp_path / "nodata" / "cifar-10-batches-py"
    result = run_on(folder, tmp_path)
    assert_one_line_error(result, f"{folder}/data_batch_1", "extract", "cifar-10-python.tar.gz")
    assert not folder.exists()
