"""Write the small dataset subsets shipped in dynbatch_core/embedded/ from the full offline npz files.

    python tools/make_embedded_data.py --source DIR    # DIR: the folder with mnist.npz / cifar10.npz

mnist.npz   = first 6000 train / first 1000 test images of <source>/mnist.npz (original MNIST order);
cifar10.npz = first 2000 train / first 500 test images of <source>/cifar10.npz (classes interleaved round-robin, so
              exactly 200 / 50 per class), plus its `classes` array.
Same Keras layout and dtypes as the source (x_train, y_train, x_test, y_test; uint8). The output is what
np.savez_compressed writes, except that every zip entry gets a fixed timestamp, so the bytes depend only on the
inputs (and the zlib version): rerunning it leaves git with nothing to commit.
"""
from __future__ import annotations

import argparse
import hashlib
import zipfile
from pathlib import Path

import numpy as np

SUBSETS = {  # dataset: (train images, test images) kept from the front of each split
    "mnist": (6000, 1000),
    "cifar10": (2000, 500),
}
IMAGE_SHAPES = {"mnist": (28, 28), "cifar10": (32, 32, 3)}
FIXED_TIMESTAMP = (1980, 1, 1, 0, 0, 0)  # earliest date a zip entry can hold


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez_compressed with a fixed timestamp on every entry (byte-for-byte reproducible)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key, array in arrays.items():
            entry = zipfile.ZipInfo(f"{key}.npy", date_time=FIXED_TIMESTAMP)
            entry.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(entry, "w", force_zip64=True) as stream:
                np.lib.format.write_array(stream, np.ascontiguousarray(array), allow_pickle=False)


def subset(source: Path, name: str) -> dict[str, np.ndarray]:
    """The first train / test images of <source>/<name>.npz, checked against the expected layout."""
    train_count, test_count = SUBSETS[name]
    with np.load(source / f"{name}.npz", allow_pickle=False) as full:
        arrays = {"x_train": full["x_train"][:train_count], "y_train": full["y_train"][:train_count],
                  "x_test": full["x_test"][:test_count], "y_test": full["y_test"][:test_count]}
        if "classes" in full.files:
            arrays["classes"] = full["classes"]
    for split, count in (("train", train_count), ("test", test_count)):
        images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if images.shape != (count, *IMAGE_SHAPES[name]) or images.dtype != np.uint8 or labels.shape != (count,):
            raise SystemExit(f"{source / f'{name}.npz'}: x_{split} {images.dtype} {images.shape} / y_{split} "
                             f"{labels.shape} do not hold {count} {name} images in the Keras uint8 layout")
    return arrays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="folder holding the full mnist.npz and cifar10.npz")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "dynbatch_core" / "embedded",
                        help="output folder (default: dynbatch_core/embedded in this repository)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in SUBSETS:
        arrays = subset(args.source, name)
        path = args.out / f"{name}.npz"
        save_npz(path, arrays)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        counts = np.bincount(arrays["y_train"], minlength=10).tolist()
        print(f"{path}: {path.stat().st_size:,} bytes, sha256 {digest[:16]}…, "
              f"{len(arrays['y_train'])} train / {len(arrays['y_test'])} test, train class counts {counts}")


if __name__ == "__main__":
    main()
