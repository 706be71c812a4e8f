"""Fashion-MNIST from its IDX files (Debian's ``dataset-fashion-mnist`` puts them in
``/usr/share/datasets/fashion-mnist``), resized to the requested size and repeated to 3 channels."""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
MEAN, STD = (0.286, 0.286, 0.286), (0.353, 0.353, 0.353)


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}; install Debian's dataset-fashion-mnist "
        f"(apt-get install dataset-fashion-mnist) or pass the folder holding the IDX files"
    )


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (optionally gzipped) as a numpy array, with its header and size checked: a damaged
    file (an interrupted download, most often) is a ValueError naming it, not a failure further on."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # a .gz cut short or damaged
        raise ValueError(f"{path}: unreadable IDX file ({e}); download it again") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim, start = data[3], 4 + 4 * data[3]
    if len(data) < start:
        raise ValueError(f"{path}: IDX header cut short ({len(data)} bytes; {start} for its {ndim} dimensions); "
                         f"download it again")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body, expected = len(data) - start, math.prod(dims)
    if body != expected:
        what = "truncated" if body < expected else f"{body - expected} extra bytes"
        raise ValueError(f"{path}: size does not match its IDX header ({what}: {body} bytes of data for shape "
                         f"{dims}, {expected} expected); download it again")
    return np.frombuffer(data, dtype=np.uint8, offset=start).reshape(dims)


class FashionMNIST(Dataset):
    """``train`` is the first 55,000 of the official training images, ``val`` the last 5,000,
    ``test`` the official test set; images are resized (bilinear, antialiased) to ``img_size``."""

    mean, std = MEAN, STD
    num_classes = 10

    def __init__(self, split: str = "train", img_size: int | tuple[int, int] = 28, root: str = DEFAULT_ROOT,
                 val_size: int = 5000, length: int | None = None):
        if split not in ("train", "val", "test"):
            raise ValueError(f"split={split!r}; allowed: train, val, test")
        root_path = Path(root)
        if not root_path.is_dir():
            raise FileNotFoundError(f"Fashion-MNIST folder {root} does not exist; install Debian's "
                                    f"dataset-fashion-mnist or pass --data-root")
        img_file, lbl_file = FILES["test" if split == "test" else "train"]
        img_path, lbl_path = _find(root_path, img_file), _find(root_path, lbl_file)
        images, labels = read_idx(img_path), read_idx(lbl_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{root}: image and label files do not match ({images.shape}, {labels.shape})")
        bad = labels[labels >= self.num_classes]  # else the loss fails later, far from the file
        if bad.size:
            raise ValueError(f"{lbl_path}: {bad.size} label(s) outside 0..{self.num_classes - 1} (first: {bad[0]}); "
                             f"not a Fashion-MNIST label file, download it again")
        if split != "test":
            cut = max(0, len(images) - val_size)
            sl = slice(0, cut) if split == "train" else slice(cut, None)
            images, labels = images[sl], labels[sl]
        if length is not None:
            images, labels = images[:length], labels[:length]
        self.images, self.labels = torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self._mean = torch.tensor(MEAN)[:, None, None]
        self._std = torch.tensor(STD)[:, None, None]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = self.images[index].float().div(255)[None, None]
        if tuple(img.shape[-2:]) != self.img_size:
            img = F.interpolate(img, size=self.img_size, mode="bilinear", antialias=True, align_corners=False)
        img = img[0].expand(3, -1, -1)
        return (img - self._mean) / self._std, int(self.labels[index])
