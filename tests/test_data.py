"""Tests for dynbatch_core.data: where data come from, what comes out, and per-sample augmentation."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from dynbatch_core.data import (DATA_ENV_VAR, DATASET_NAMES, ImageTensorDataset, collate_batch, dataset_spec,
                                describe_data_source, load_datasets, resolve_data_dir)

SHARED_DATA = Path(os.environ.get("DYNBATCH_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_shared = pytest.mark.skipif(not all((SHARED_DATA / f"{name}.npz").is_file() for name in ("mnist", "cifar10")),
                                  reason=f"shared offline data not found in {SHARED_DATA} (set DYNBATCH_TEST_DATA)")


@pytest.fixture(autouse=True)
def no_data_env(monkeypatch):
    """Every test starts with DYNBATCH_DATA unset, so the embedded subset is the default."""
    monkeypatch.delenv(DATA_ENV_VAR, raising=False)


def test_specs_match_the_sources():
    assert DATASET_NAMES == ("mnist", "cifar10", "synthetic")
    assert [(s.in_channels, s.num_classes, s.image_size, s.train_size) for s in map(dataset_spec, DATASET_NAMES)] == [
        (1, 10, 28, 60000), (3, 10, 32, 50000), (1, 10, 16, 2048)]
    with pytest.raises(ValueError, match="allowed: mnist, cifar10, synthetic"):
        dataset_spec("imagenet")


def test_resolve_data_dir_prefers_argument_then_env_var(monkeypatch, tmp_path):
    assert resolve_data_dir(None) is None
    monkeypatch.setenv(DATA_ENV_VAR, "")
    assert resolve_data_dir(None) is None
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path))
    assert resolve_data_dir(None) == tmp_path.resolve()
    assert resolve_data_dir("~/x") == Path.home().resolve() / "x"


@needs_shared
def test_npz_from_shared_folder_keeps_shapes_labels_and_exact_prefix():
    train, test, source = load_datasets("mnist", data_dir=SHARED_DATA, train_samples=1000, augment=False)
    assert source == f"mnist: offline npz {SHARED_DATA.resolve() / 'mnist.npz'} (60000 train / 10000 test)"
    with np.load(SHARED_DATA / "mnist.npz") as full:
        assert torch.equal(train.images[:, 0], torch.from_numpy(full["x_train"][:1000]))
        assert torch.equal(test.labels, torch.from_numpy(full["y_test"]).long())
    assert train.images.shape == (1000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 1, 28, 28) and train.labels.dtype == torch.int64
    assert train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    x, y = train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y.item() == 5


@needs_shared
def test_cifar10_npz_is_converted_to_channels_first():
    train, test, _ = load_datasets("cifar10", data_dir=SHARED_DATA, train_samples=20, test_samples=30)
    with np.load(SHARED_DATA / "cifar10.npz") as full:
        assert torch.equal(train.images, torch.from_numpy(full["x_train"][:20]).permute(0, 3, 1, 2))
    assert train.labels.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] * 2
    assert (len(train), len(test), train.spec.name) == (20, 30, "cifar10")


@needs_shared
@pytest.mark.parametrize("name, sizes", [("mnist", (6000, 1000)), ("cifar10", (2000, 500))])
def test_embedded_subset_is_the_pixel_identical_prefix_of_the_shared_npz(name, sizes):
    train, test, source = load_datasets(name, augment=False)
    assert "embedded" in source and (len(train), len(test)) == sizes
    with np.load(SHARED_DATA / f"{name}.npz") as full:
        for dataset, split in ((train, "train"), (test, "test")):
            images = torch.from_numpy(full[f"x_{split}"][:len(dataset)])
            assert torch.equal(dataset.images, images.permute(0, 3, 1, 2) if name == "cifar10" else images[:, None])
            assert torch.equal(dataset.labels, torch.from_numpy(full[f"y_{split}"][:len(dataset)]).long())


@needs_shared
def test_env_var_points_at_the_full_set(monkeypatch):
    monkeypatch.setenv(DATA_ENV_VAR, str(SHARED_DATA))
    assert describe_data_source("mnist", train_samples=8192).startswith("mnist: offline npz")
    train, _, source = load_datasets("mnist", train_samples=8192, test_samples=10)
    assert (len(train), source) == (8192, describe_data_source("mnist"))


def test_default_description_mentions_embedded():
    assert describe_data_source("mnist") == (
        "mnist: embedded subset shipped with dynbatch_core (6000 train / 1000 test; "
        "pass --data-dir or set DYNBATCH_DATA for the full set)")
    assert "embedded" in describe_data_source("cifar10", train_samples=2000, test_samples=500)


def test_requesting_more_than_the_embedded_subset_names_both_ways():
    with pytest.raises(ValueError) as error:
        describe_data_source("mnist", train_samples=8192)
    message = str(error.value)
    assert message.startswith("mnist: 8192 training samples requested but the embedded subset holds 6000;")
    assert all(word in message for word in ("--data-dir", "DYNBATCH_DATA", "--download", "mnist.npz"))
    with pytest.raises(ValueError, match="501 test samples requested but the embedded subset holds 500"):
        load_datasets("cifar10", test_samples=501)


def test_empty_folder_without_download_names_both_ways(tmp_path):
    with pytest.raises(ValueError) as error:
        load_datasets("cifar10", data_dir=tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message and "cifar10.npz" in message and "\n" not in message
    assert all(word in message for word in ("--data-dir", "DYNBATCH_DATA", "--download", "torchvision"))
    with pytest.raises(ValueError, match="does not exist"):
        describe_data_source("mnist", data_dir=tmp_path / "missing")


def test_download_path_is_described_without_downloading(tmp_path):
    assert describe_data_source("mnist", data_dir=tmp_path, download=True) == (
        f"mnist: torchvision download into {tmp_path.resolve()} (60000 train / 10000 test)")
    with pytest.raises(ValueError, match="70000 training samples requested but torchvision's MNIST holds 60000"):
        describe_data_source("mnist", data_dir=tmp_path, download=True, train_samples=70000)


def test_torchvision_files_in_data_dir_are_read_as_uint8(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, count in (("train", 12), ("t10k", 5)):
        images = np.arange(count * 28 * 28, dtype=np.uint8)  # idx format: big-endian magic and sizes, then bytes
        labels = np.arange(count, dtype=np.uint8) % 10
        header = np.array([2051, count, 28, 28], ">i4").tobytes()
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(np.array([2049, count], ">i4").tobytes() + labels.tobytes())
    train, test, source = load_datasets("mnist", data_dir=tmp_path, train_samples=10)
    assert source.startswith(f"mnist: torchvision files in {tmp_path.resolve()}")
    assert train.images.shape == (10, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.images[1, 0, 0, :3].tolist() == [16, 17, 18]  # 784 % 256 = 16
    assert train.labels.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] and len(test) == 5


@pytest.mark.parametrize("arrays, problem", [
    ({"x_train": np.zeros((4, 28, 28), np.float32)}, "x_train is float32"),
    ({"x_train": np.zeros((4, 32, 32), np.uint8)}, "expected uint8 (N, 28, 28)"),
    ({"y_train": np.zeros(3, np.uint8)}, "y_train is uint8 (3,)"),
    ({"y_test": np.full(2, 10, np.uint8)}, "labels 10..10, expected 0..9"),
    ({"x_test": None}, "has no array x_test"),
])
def test_malformed_npz_is_rejected_naming_the_file(tmp_path, arrays, problem):
    good = {"x_train": np.zeros((4, 28, 28), np.uint8), "y_train": np.zeros(4, np.uint8),
            "x_test": np.zeros((2, 28, 28), np.uint8), "y_test": np.zeros(2, np.uint8)}
    good.update(arrays)
    np.savez(tmp_path / "mnist.npz", **{key: value for key, value in good.items() if value is not None})
    with pytest.raises(ValueError, match=f"{tmp_path / 'mnist.npz'} is not a usable mnist npz file") as error:
        describe_data_source("mnist", data_dir=tmp_path)
    assert problem in str(error.value)
    (tmp_path / "mnist.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="is not a usable mnist npz file: File is not a zip file"):
        load_datasets("mnist", data_dir=tmp_path)


def test_sample_counts_must_be_positive_and_available():
    with pytest.raises(ValueError, match="train_samples must be at least 1"):
        load_datasets("synthetic", train_samples=0)
    with pytest.raises(ValueError, match="test_samples must be at least 1"):
        describe_data_source("mnist", test_samples=-3)


def test_normalised_mnist_has_the_known_mean_and_std():
    _, test, _ = load_datasets("mnist")
    images, _ = test.__getitems__(list(range(len(test))))
    # the embedded 1000 test images have pixel mean 0.1325, std 0.3104 (whole MNIST: 0.1307 / 0.3081)
    assert abs(images.mean().item()) < 0.1 and abs(images.std().item() - 1) < 0.1
    raw_mean = test.images.float().mean().item() / 255
    assert images.mean().item() == pytest.approx((raw_mean - 0.1307) / 0.3081, abs=1e-4)


def test_cifar10_augmentation_of_a_sample_does_not_depend_on_its_batch():
    train, _, _ = load_datasets("cifar10", train_samples=100, seed=3)
    alone = train.__getitems__([7])[0][0]
    assert torch.equal(train.__getitems__([42, 7, 99])[0][1], alone)
    assert torch.equal(train[7][0], alone)
    train.set_epoch(1)
    assert not torch.equal(train.__getitems__([7])[0][0], alone)
    train.set_epoch(0)
    assert torch.equal(train.__getitems__([7])[0][0], alone)
    same_seed, _, _ = load_datasets("cifar10", train_samples=100, seed=3)
    assert torch.equal(same_seed[7][0], alone)


def test_cifar10_augmentation_is_a_padded_crop_and_flip_of_the_pixels():
    train, test, _ = load_datasets("cifar10", train_samples=200, test_samples=10)
    plain, _, _ = load_datasets("cifar10", train_samples=200, augment=False)
    mean, std = torch.tensor(train.mean).view(3, 1, 1), torch.tensor(train.std).view(3, 1, 1)
    assert torch.allclose(plain[5][0], (plain.images[5].float() / 255 - mean) / std)  # augment=False: pixels as stored
    assert torch.equal(test[5][0], (test.images[5].float() / 255 - mean) / std)       # test never augmented
    padded = F.pad(train.images.float(), (4, 4, 4, 4))
    flips = 0
    for i in range(200):
        pixels = train[i][0] * std + mean
        row, col = train._offsets[i].tolist()
        expected = padded[i, :, row:row + 32, col:col + 32] / 255
        flips += int(train._flips[i])
        assert torch.allclose(pixels, expected.flip(-1) if train._flips[i] else expected, atol=1e-5)
    assert 70 < flips < 130  # about half are mirrored
    assert torch.equal(train._offsets.unique(), torch.arange(9))  # offsets 0..8 = shifts of -4..4 pixels


def test_empty_batch_has_batch_dimension_zero():
    train, _, _ = load_datasets("cifar10", train_samples=10)
    images, labels = train.__getitems__([])
    assert images.shape == (0, 3, 32, 32) and labels.shape == (0,) and labels.dtype == torch.int64


def test_dataloader_uses_the_batched_path_with_identity_collate():
    train, _, _ = load_datasets("synthetic", train_samples=10)
    loader = DataLoader(train, batch_sampler=BatchSampler(SequentialSampler(train), 4, False), collate_fn=collate_batch)
    batches = list(loader)
    assert [tuple(images.shape) for images, _ in batches] == [(4, 1, 16, 16), (4, 1, 16, 16), (2, 1, 16, 16)]
    assert torch.equal(batches[1][1], torch.tensor([4, 5, 6, 7]))
    assert isinstance(train, ImageTensorDataset) and collate_batch(batches[0]) is batches[0]


def test_synthetic_depends_only_on_seed_and_prefixes_agree():
    first, test, source = load_datasets("synthetic", seed=1)
    again, _, _ = load_datasets("synthetic", seed=1)
    short, _, _ = load_datasets("synthetic", seed=1, train_samples=300)
    other, _, _ = load_datasets("synthetic", seed=2)
    assert source == "synthetic: generated 2048 train / 512 test (1x16x16, 10 classes)"
    assert (len(first), len(test), first.images.shape[1:]) == (2048, 512, (1, 16, 16))
    assert torch.equal(first.images, again.images) and torch.equal(short.images, first.images[:300])
    assert not torch.equal(first.images, other.images)
    assert torch.equal(first.labels[:12], torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]))
    assert len(load_datasets("synthetic", train_samples=5000, test_samples=7)[0]) == 5000


def test_small_mlp_learns_synthetic_well_above_chance():
    torch.manual_seed(0)
    train, test, _ = load_datasets("synthetic", seed=0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    order = torch.Generator().manual_seed(0)
    for _ in range(300):
        images, labels = train.__getitems__(torch.randint(0, len(train), (64,), generator=order).tolist())
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    images, labels = test.__getitems__(list(range(len(test))))
    accuracy = (model(images).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.5  # chance is 0.1; measured about 0.93
