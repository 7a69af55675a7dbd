"""The CIFAR-10 loader, the stratified split, the sampler and the worker-side augmentation."""
import pickle
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision
from conftest import real_cifar_dir, write_synthetic_cifar

import common


@pytest.mark.skipif(real_cifar_dir() is None, reason="real CIFAR-10 not available")
def test_real_cifar10_counts_order_and_classes():
    cifar = common.load_cifar10(real_cifar_dir().parent)
    assert cifar.train_images.shape == (50000, 32, 32, 3) and cifar.train_images.dtype == np.uint8
    assert cifar.test_images.shape == (10000, 32, 32, 3)
    assert cifar.train_labels.dtype == np.int64
    assert np.bincount(cifar.train_labels).tolist() == [5000] * 10
    assert np.bincount(cifar.test_labels).tolist() == [1000] * 10
    assert cifar.test_labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert cifar.train_labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert cifar.classes[:3] == ["airplane", "automobile", "bird"]
    # Mean of the training images, as the data README states (catches a wrong channel layout).
    mean = cifar.train_images.reshape(-1, 3).mean(0) / 255
    assert np.allclose(mean, [0.4914, 0.4822, 0.4465], atol=1e-3)


def test_synthetic_folder_round_trips_pixels_exactly(tmp_path):
    written = write_synthetic_cifar(tmp_path / "cifar-10-batches-py")
    cifar = common.load_cifar10(tmp_path)
    expected_train = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    assert np.array_equal(cifar.train_images, expected_train)
    assert np.array_equal(cifar.test_images, written["test_batch"][0])
    assert np.array_equal(cifar.test_labels, written["test_batch"][1])
    assert len(cifar.classes) == 10


def test_missing_batch_is_a_clear_error(tmp_path):
    write_synthetic_cifar(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(common.UserError, match="data_batch_3 is missing"):
        common.load_cifar10(tmp_path)


@pytest.mark.parametrize("content", [b"", b"\x80\x02garbage" * 10, b"not a pickle at all"])
def test_corrupt_batch_is_a_clear_error(tmp_path, content):
    write_synthetic_cifar(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(content)
    with pytest.raises(common.UserError, match="test_batch is corrupt"):
        common.load_cifar10(tmp_path)


class _RunsCode:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned > /dev/null",))


def test_batch_pickle_that_would_run_code_is_refused(tmp_path):
    write_synthetic_cifar(tmp_path / "cifar-10-batches-py")
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
        pickle.dump({"data": _RunsCode(), "labels": []}, f, protocol=2)
    with pytest.raises(common.UserError, match="data_batch_1 is corrupt"):
        common.load_cifar10(tmp_path)


def test_missing_folder_offline_says_where_to_put_it(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(common.UserError) as error:
        common.load_cifar10(tmp_path / "nowhere")
    message = str(error.value)
    assert "could not be downloaded" in message and str(tmp_path / "nowhere" / "cifar-10-batches-py") in message
    assert "\n" not in message


def test_split_sizes_stratified_disjoint_and_seeded():
    labels = np.repeat(np.arange(10), 5000)
    np.random.default_rng(1).shuffle(labels)
    train, val = common.split_train_val(labels, seed=42)
    assert len(train) == 45000 and len(val) == 5000
    assert np.bincount(labels[val]).tolist() == [500] * 10
    assert np.bincount(labels[train]).tolist() == [4500] * 10
    assert len(np.intersect1d(train, val)) == 0
    assert len(np.union1d(train, val)) == 50000
    train_again, val_again = common.split_train_val(labels, seed=42)
    assert np.array_equal(train, train_again) and np.array_equal(val, val_again)
    _, val_other = common.split_train_val(labels, seed=43)
    assert not np.array_equal(val, val_other)
    # The first N of the training order is a mixed sample (what --subset takes), not one class.
    assert len(np.unique(labels[train[:100]])) == 10


def test_epoch_sampler_is_seeded_per_epoch_shards_and_skips():
    sampler = common.EpochSampler(10, seed=3)
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert sorted(i for i, _ in first) == list(range(10))
    sampler.set_epoch(1)
    assert [i for i, _ in sampler] != [i for i, _ in first]
    # Two ranks: equal lengths, together every index (one padded repeat for the odd size 7).
    shards = []
    for rank in range(2):
        shard = common.EpochSampler(7, seed=3, rank=rank, world_size=2)
        shard.set_epoch(5)
        shards.append([i for i, _ in shard])
    assert len(shards[0]) == len(shards[1]) == 4
    assert set(shards[0]) | set(shards[1]) == set(range(7))
    # Skipping the first k samples resumes the same order.
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, skip=4)
    assert list(sampler) == full[4:] and len(sampler) == 6


def test_augmentation_depends_on_sample_not_on_worker_count():
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    dataset = common.CifarDataset(images, np.zeros(16, dtype=np.int64), common.train_transform(randaug_n=2))
    batches = []
    for workers in (0, 2):
        sampler = common.EpochSampler(16, seed=1)
        sampler.set_epoch(0)
        loader = common.make_loader(dataset, 8, sampler, workers)
        batches.append(torch.cat([x for x, _ in loader]))
    assert batches[0].dtype == torch.uint8 and batches[0].shape == (16, 3, 32, 32)
    assert torch.equal(batches[0], batches[1])
    # ... and the augmentation is really applied (not the identity).
    sampler = common.EpochSampler(16, seed=1)
    sampler.set_epoch(0)
    order = [i for i, _ in sampler]
    original = torch.from_numpy(images[order]).permute(0, 3, 1, 2)
    assert not torch.equal(batches[0], original)


def test_device_preprocessing_shapes_and_normalisation():
    images = torch.full((2, 3, 32, 32), 255, dtype=torch.uint8)
    out = common.prepare_batch(images, torch.device("cpu"), 64)
    assert out.shape == (2, 3, 64, 64) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    expected = (1 - torch.tensor(common.IMAGENET_MEAN)) / torch.tensor(common.IMAGENET_STD)
    assert torch.allclose(out[0, :, 10, 10], expected, atol=1e-5)
