"""Image datasets held in memory as uint8 tensors: MNIST, CIFAR-10 and a tiny synthetic set.

    from torch.utils.data import DataLoader
    from dynbatch_core.data import collate_batch, describe_data_source, load_datasets

    print(describe_data_source("mnist", train_samples=4096))  # cheap; call it before spawning ranks
    train, test, source = load_datasets("mnist", train_samples=4096, seed=0)
    loader = DataLoader(train, batch_sampler=my_batch_sampler, collate_fn=collate_batch)
    for epoch in range(epochs):
        train.set_epoch(epoch)                   # re-draws the CIFAR-10 crops and flips
        for images, labels in loader: ...        # float B×C×H×W normalised, int64 B

Where the data come from (the first rule that applies; describe_data_source says which):
  synthetic                      generated from `seed`; no files.
  data_dir, else $DYNBATCH_DATA  <dir>/<name>.npz in the Keras layout of the shared offline data (x_train, y_train,
                                 x_test, y_test; x uint8, MNIST N×28×28, CIFAR-10 N×32×32×3 RGB; integer labels
                                 0..9), else torchvision's own files under <dir> (downloaded there if download=True).
  download=True                  torchvision download into ~/.cache/dynbatch/data.
  otherwise                      the subset shipped in dynbatch_core/embedded/ (MNIST 6000/1000, CIFAR-10 2000/500),
                                 if the requested sample counts fit; else a ValueError (never a silent substitute).
train_samples / test_samples keep the FIRST n images of each split. In the npz files MNIST keeps its original order
and CIFAR-10 interleaves classes round-robin, so prefixes are (nearly) class-balanced.

Augmentation (CIFAR-10 training set, augment=True): pad 4 black pixels (pixel value 0, before normalisation, as
torchvision's RandomCrop(32, padding=4) does), take a random 32×32 crop and mirror it with probability 1/2. The crop
and flip of sample i depend only on (seed, epoch, i), never on the batch or rank that fetches it, so every split of a
global batch across processes sees identical inputs (all ranks must pass the same seed). DataLoader workers copy the
dataset when an iterator starts: call set_epoch before iterating, and avoid persistent_workers.
"""
from __future__ import annotations

import importlib.util
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DATASET_NAMES = ("mnist", "cifar10", "synthetic")
DATA_ENV_VAR = "DYNBATCH_DATA"
DOWNLOAD_DIR = "~/.cache/dynbatch/data"  # torchvision root when download=True and no data folder is given
EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"
CROP_PADDING = 4           # pixels of black padding around CIFAR-10 training images before the random crop
SYNTHETIC_TEST_SIZE = 512  # default synthetic test size (the train default is dataset_spec("synthetic").train_size)


@dataclass(frozen=True)
class DatasetSpec:
    name: str          # one of DATASET_NAMES
    in_channels: int   # image channels: 1 mnist, 3 cifar10, 1 synthetic
    num_classes: int   # label count (10 for all)
    image_size: int    # height = width in pixels: 28 mnist, 32 cifar10, 16 synthetic
    train_size: int    # full training-set size of the source (synthetic: its default)


_SPECS = {
    "mnist": DatasetSpec("mnist", 1, 10, 28, 60000),
    "cifar10": DatasetSpec("cifar10", 3, 10, 32, 50000),
    "synthetic": DatasetSpec("synthetic", 1, 10, 16, 2048),
}
_NPZ_IMAGE_SHAPES = {"mnist": (28, 28), "cifar10": (32, 32, 3)}  # per image, as stored (HW / HWC)
_MEAN_STD = {  # per-channel mean / std of pixel / 255
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "synthetic": ((0.48,), (0.37,)),  # measured on the 2048 training images of seed 0
}
_MNIST_FILES = [f"{split}-{kind}-ubyte" for split in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")]
_TORCHVISION = {  # dataset class, (train, test) sizes, files whose presence means "already downloaded"
    "mnist": ("MNIST", (60000, 10000), [f"MNIST/raw/{file}" for file in _MNIST_FILES]),
    "cifar10": ("CIFAR10", (50000, 10000),
                [f"cifar-10-batches-py/{file}" for file in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]]),
}


def dataset_spec(name: str) -> DatasetSpec:
    if name not in _SPECS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASET_NAMES)}")
    return _SPECS[name]


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """data_dir if given, else $DYNBATCH_DATA if set and non-empty, else None; ~ expanded, made absolute."""
    chosen = data_dir if data_dir not in (None, "") else os.environ.get(DATA_ENV_VAR) or None
    return None if chosen is None else Path(chosen).expanduser().resolve()


# ----------------------------------------------------------------------------------------------- source resolution
@dataclass(frozen=True)
class _Source:
    kind: str          # "synthetic", "npz", "embedded" or "torchvision"
    path: Path | None  # the npz file or the torchvision root
    download: bool     # torchvision only: let torchvision download missing files
    description: str   # one line for logs


def _both_ways(name: str) -> str:
    return (f"point --data-dir DIR (or the {DATA_ENV_VAR} environment variable) at a folder holding {name}.npz in "
            f"the layout of the shared offline data (x_train, y_train, x_test, y_test; uint8), "
            f"or pass --download to fetch it with torchvision")


def _check_count(name: str, split: str, requested: int | None, available: int, holder: str) -> None:
    if requested is not None and requested > available:
        raise ValueError(f"{name}: {requested} {split} samples requested but {holder} holds {available}")


def _npz_header(archive: zipfile.ZipFile, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array in an open npz archive, from its .npy header alone."""
    if f"{key}.npy" not in archive.namelist():
        raise ValueError(f"has no array {key} (needs x_train, y_train, x_test, y_test)")
    with archive.open(f"{key}.npy") as stream:
        version = np.lib.format.read_magic(stream)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(stream)
    return tuple(shape), dtype


def _npz_sizes(path: Path, name: str) -> tuple[int, int]:
    """Check an npz file's layout, reading only array headers and the small label arrays; (train, test) sizes."""
    image_shape = _NPZ_IMAGE_SHAPES[name]
    sizes = []
    try:
        with zipfile.ZipFile(path) as archive:
            for split in ("train", "test"):
                (x_shape, x_dtype), (y_shape, y_dtype) = (_npz_header(archive, f"{a}_{split}") for a in "xy")
                if x_dtype != np.uint8 or x_shape[1:] != image_shape:
                    expected = ", ".join(map(str, ("N",) + image_shape))
                    raise ValueError(f"x_{split} is {x_dtype} {x_shape}, expected uint8 ({expected})")
                if y_dtype.kind not in "iu" or y_shape != x_shape[:1]:
                    raise ValueError(f"y_{split} is {y_dtype} {y_shape}, expected integer labels ({x_shape[0]},)")
                with archive.open(f"y_{split}.npy") as stream:
                    labels = np.lib.format.read_array(stream, allow_pickle=False)
                if labels.size and (labels.min() < 0 or labels.max() > 9):
                    raise ValueError(f"y_{split} holds labels {labels.min()}..{labels.max()}, expected 0..9")
                sizes.append(x_shape[0])
    except (OSError, zipfile.BadZipFile, ValueError) as error:
        raise ValueError(f"{name}: {path} is not a usable {name} npz file: {error}") from None
    return sizes[0], sizes[1]


def _resolve_source(name: str, data_dir: str | os.PathLike | None, train_samples: int | None,
                    test_samples: int | None, download: bool) -> _Source:
    """The one place that decides where the data come from (describe_data_source and load_datasets share it)."""
    spec = dataset_spec(name)
    for argument, count in (("train_samples", train_samples), ("test_samples", test_samples)):
        if count is not None and count < 1:
            raise ValueError(f"{name}: {argument} must be at least 1 (or None for all), got {count}")
    if name == "synthetic":
        sizes = (train_samples or spec.train_size, test_samples or SYNTHETIC_TEST_SIZE)
        return _Source("synthetic", None, False,
                       f"synthetic: generated {sizes[0]} train / {sizes[1]} test (1x16x16, 10 classes)")
    directory = resolve_data_dir(data_dir)
    npz = None if directory is None else directory / f"{name}.npz"
    if npz is not None and npz.is_file():
        sizes = _npz_sizes(npz, name)
        _check_count(name, "training", train_samples, sizes[0], str(npz))
        _check_count(name, "test", test_samples, sizes[1], str(npz))
        return _Source("npz", npz, False, f"{name}: offline npz {npz} ({sizes[0]} train / {sizes[1]} test)")
    if directory is None and not download:
        embedded = EMBEDDED_DIR / f"{name}.npz"
        if not embedded.is_file():
            raise ValueError(f"{name}: the embedded subset {embedded} is missing; {_both_ways(name)}")
        sizes = _npz_sizes(embedded, name)
        for split, requested, available in (("training", train_samples, sizes[0]), ("test", test_samples, sizes[1])):
            if requested is not None and requested > available:
                raise ValueError(f"{name}: {requested} {split} samples requested but the embedded subset holds "
                                 f"{available}; {_both_ways(name)}")
        return _Source("embedded", embedded, False,
                       f"{name}: embedded subset shipped with dynbatch_core ({sizes[0]} train / {sizes[1]} test; "
                       f"pass --data-dir or set {DATA_ENV_VAR} for the full set)")
    root = directory if directory is not None else Path(DOWNLOAD_DIR).expanduser().resolve()
    class_name, sizes, files = _TORCHVISION[name]
    present = all((root / file).is_file() for file in files)
    if not present and not download:
        problem = "does not exist" if not root.is_dir() else f"holds neither {name}.npz nor torchvision's {class_name}"
        raise ValueError(f"{name}: data folder {root} {problem}; {_both_ways(name)}")
    if importlib.util.find_spec("torchvision") is None:
        raise ValueError(f"{name}: reading {root} needs torchvision, which is not installed; {_both_ways(name)}")
    _check_count(name, "training", train_samples, sizes[0], f"torchvision's {class_name}")
    _check_count(name, "test", test_samples, sizes[1], f"torchvision's {class_name}")
    how = f"torchvision files in {root}" if present else f"torchvision download into {root}"
    return _Source("torchvision", root, download, f"{name}: {how} ({sizes[0]} train / {sizes[1]} test)")


def describe_data_source(name: str, *, data_dir: str | os.PathLike | None = None, train_samples: int | None = None,
                         test_samples: int | None = None, download: bool = False) -> str:
    """One line saying where `name` will be read from; raises ValueError (one line) if it cannot be. Loads nothing."""
    return _resolve_source(name, data_dir, train_samples, test_samples, download).description


# ---------------------------------------------------------------------------------------------------------- loading
def _crop(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """size×size windows of B×C×H×W images at per-image (row, col) offsets, mirrored where flips is True."""
    steps = torch.arange(size)
    rows = offsets[:, 0, None] + steps
    cols = offsets[:, 1, None] + torch.where(flips[:, None], size - 1 - steps, steps)
    batch = torch.arange(len(images))[:, None, None, None]
    channel = torch.arange(images.shape[1])[None, :, None, None]
    return images[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def _seed_from(*values: int) -> int:
    """A 32-bit seed mixed from non-negative integers (e.g. run seed and epoch)."""
    return int(np.random.SeedSequence(list(values)).generate_state(1)[0])


class ImageTensorDataset(torch.utils.data.Dataset):
    """All images in memory (uint8 N×C×H×W, int64 labels); items come out as normalised float tensors.

    `__getitems__` is the batched path the DataLoader takes (use collate_fn=collate_batch); `__getitem__` is one item.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, spec: DatasetSpec, *, augment: bool = False,
                 seed: int = 0) -> None:
        assert images.dtype == torch.uint8 and images.ndim == 4 and len(images) == len(labels)
        self.images, self.labels, self.spec = images, labels.to(torch.int64), spec
        self.mean, self.std = _MEAN_STD[spec.name]  # per channel, of pixel / 255
        self._mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        self._std = torch.tensor(self.std).view(1, -1, 1, 1)
        self.augment, self.seed = augment, seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw every sample's crop offsets and flip for this epoch from (seed, epoch); no-op without augmentation."""
        self.epoch = epoch
        if self.augment:
            generator = torch.Generator().manual_seed(_seed_from(self.seed, epoch))
            self._offsets = torch.randint(0, 2 * CROP_PADDING + 1, (len(self), 2), generator=generator)
            self._flips = torch.rand(len(self), generator=generator) < 0.5

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        images = self.images[index]
        if self.augment:
            padded = F.pad(images, (CROP_PADDING,) * 4)  # pixel value 0 (black), before normalisation
            images = _crop(padded, self._offsets[index], self._flips[index], self.spec.image_size)
        return (images.float() / 255 - self._mean) / self._std, self.labels[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.__getitems__([index])
        return images[0], labels[0]


def collate_batch(batch):
    """Identity collate: `__getitems__` already returns the batch as (images, labels)."""
    return batch


def _to_tensors(images, labels, count: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """First `count` images (N×H×W or N×H×W×C, uint8) as an N×C×H×W uint8 tensor, labels as int64."""
    images, labels = np.asarray(images)[:count], np.asarray(labels)[:count]
    images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.array(images, order="C")), torch.from_numpy(labels.astype(np.int64))


def _synthetic_split(count: int, seed: int, split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """count 1×16×16 images: a smooth class template shifted by up to 2 pixels, plus noise; labels 0..9 round-robin.

    Made in chunks of 256 with their own generators, so a smaller count gives a prefix of a larger one.
    """
    templates = torch.rand(10, 1, 5, 5, generator=torch.Generator().manual_seed(12345))  # the same in every run
    templates = F.interpolate(templates, size=(20, 20), mode="bilinear", align_corners=False)
    images, labels = [], []
    for start in range(0, count, 256):
        generator = torch.Generator().manual_seed(_seed_from(seed, split, start))
        chunk_labels = torch.arange(start, start + 256) % 10
        offsets = torch.randint(0, 5, (256, 2), generator=generator)
        chunk = _crop(templates[chunk_labels], offsets, torch.zeros(256, dtype=torch.bool), 16)
        chunk = chunk + 0.5 * torch.randn(chunk.shape, generator=generator)
        images.append((chunk.clamp(0, 1) * 255).round().to(torch.uint8))
        labels.append(chunk_labels)
    return torch.cat(images)[:count].clone(), torch.cat(labels)[:count].clone()


def load_datasets(name: str, *, data_dir: str | os.PathLike | None = None, train_samples: int | None = None,
                  test_samples: int | None = None, augment: bool = True, download: bool = False,
                  seed: int = 0) -> tuple[ImageTensorDataset, ImageTensorDataset, str]:
    """(train, test, source description). train_samples / test_samples keep the first n (None = all); seed drives
    the synthetic images and the CIFAR-10 augmentation (which applies to the training set only)."""
    source = _resolve_source(name, data_dir, train_samples, test_samples, download)
    spec = dataset_spec(name)
    if source.kind == "synthetic":
        train = _synthetic_split(train_samples or spec.train_size, seed, 0)
        test = _synthetic_split(test_samples or SYNTHETIC_TEST_SIZE, seed, 1)
    elif source.kind in ("npz", "embedded"):
        with np.load(source.path, allow_pickle=False) as arrays:
            train = _to_tensors(arrays["x_train"], arrays["y_train"], train_samples)
            test = _to_tensors(arrays["x_test"], arrays["y_test"], test_samples)
    else:
        import torchvision

        class_name = _TORCHVISION[name][0]
        dataset_class = getattr(torchvision.datasets, class_name)
        try:
            train_set, test_set = [dataset_class(str(source.path), train=is_train, download=source.download)
                                   for is_train in (True, False)]
        except RuntimeError as error:
            raise ValueError(f"{name}: torchvision could not load {class_name} from {source.path}: {error}") from None
        train = _to_tensors(train_set.data, train_set.targets, train_samples)
        test = _to_tensors(test_set.data, test_set.targets, test_samples)
    _check_count(name, "training", train_samples, len(train[1]), str(source.path))  # torchvision's real sizes
    _check_count(name, "test", test_samples, len(test[1]), str(source.path))
    return (ImageTensorDataset(*train, spec, augment=augment and name == "cifar10", seed=seed),
            ImageTensorDataset(*test, spec, augment=False, seed=seed), source.description)
