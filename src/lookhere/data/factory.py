"""Datasets by name: ``synthetic``, ``synthetic-where``, ``fashion-mnist``, ``folder:PATH``, ``hf:NAME``.

Photographs (folders, Hugging Face) go through timm's dataset and transform factories: DeiT-III's
recipe for training (random resized crop, flip, one of grayscale / solarize / blur: timm's ``3a``
policy, colour jitter) and resize + centre crop for evaluation. Synthetic scenes are rendered at
the requested size; Fashion-MNIST is resized.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset, default_collate

from .fashion_mnist import DEFAULT_ROOT, FashionMNIST
from .synthetic import SyntheticScenes

DATASETS = ("synthetic", "synthetic-where", "fashion-mnist", "folder:PATH", "hf:NAME")


@dataclass
class DataSpec:
    name: str
    img_size: int | tuple[int, int]
    length: int | None = None  # synthetic: training scenes (default 4000); val and test get a fifth
    seed: int = 0
    root: str | None = None
    hf_val_split: str = "validation"


class SkipBad(Dataset):
    """Returns ``None`` for a sample that cannot be read (warning once per sample); see ``collate``."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        for attr in ("mean", "std", "num_classes", "object_size"):
            if hasattr(dataset, attr):
                setattr(self, attr, getattr(dataset, attr))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except (OSError, RuntimeError, ValueError, SyntaxError) as e:
            warnings.warn(f"skipped unreadable sample {index}: {e}", RuntimeWarning, stacklevel=2)
            return None


def collate(batch: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stack the good samples; the third element counts the skipped ones."""
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images, labels = default_collate(good)[:2]
    return images, labels, skipped


def _timm_photos(kind: str, target: str, split: str, spec: DataSpec, train: bool):
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_dataset, create_transform

    size = spec.img_size if isinstance(spec.img_size, int) else tuple(spec.img_size)
    transform = create_transform(
        size, is_training=train, auto_augment="3a" if train else None, color_jitter=0.3,
        interpolation="bicubic", crop_pct=0.875, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
    )
    if kind == "folder":
        root = Path(target)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist (expected ROOT/{split}/CLASS/IMAGE)")
        ds = create_dataset("", root=str(root), split=split, search_split=True, transform=transform)
    else:
        hf_split = {"val": spec.hf_val_split}.get(split, split)
        try:
            ds = create_dataset(f"hfds/{target}", root=spec.root, split=hf_split, transform=transform)
        except ImportError as e:
            raise ImportError("hf: datasets need the 'datasets' package: pip install 'lookhere[hf]'") from e
    ds._max_retries = 1  # let SkipBad see (and count) an unreadable image instead of silently replacing it
    if len(ds) == 0:
        raise FileNotFoundError(f"{kind}:{target} has no images for split {split!r}")
    ds.mean, ds.std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    labels = getattr(getattr(ds, "reader", None), "class_to_idx", None)
    ds.num_classes = len(labels) if labels else None
    return ds


def build_dataset(spec: DataSpec, split: str, *, train: bool | None = None, length: int | None = None) -> Dataset:
    """The ``split`` (train, val, test) of a dataset, wrapped so a bad sample is skipped and counted.

    ``length`` keeps only the first ``length`` samples (synthetic: exactly that many scenes).
    """
    train = split == "train" if train is None else train
    name = spec.name
    if name in ("synthetic", "synthetic-where"):
        n = spec.length or 4000
        length = length or (n if split == "train" else max(1, n // 5))
        ds = SyntheticScenes(split, spec.img_size, length, seed=spec.seed,
                             task="where" if name == "synthetic-where" else "what")
    elif name == "fashion-mnist":
        ds = FashionMNIST(split, spec.img_size, root=spec.root or DEFAULT_ROOT, length=spec.length)
    elif name.startswith("folder:") or name.startswith("hf:"):
        kind, _, target = name.partition(":")
        if not target:
            raise ValueError(f"--data {name!r} needs a path or name after '{kind}:'")
        ds = _timm_photos(kind, target, split, spec, train)
    else:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    if length is not None and length < len(ds):
        kept = Subset(ds, range(length))
        for attr in ("mean", "std", "num_classes", "object_size"):
            if hasattr(ds, attr):
                setattr(kept, attr, getattr(ds, attr))
        ds = kept
    return SkipBad(ds)


def num_classes_of(ds: Any) -> int:
    n = getattr(ds, "num_classes", None)
    if not n:
        raise ValueError("cannot tell the number of classes of this dataset; pass --num-classes")
    return int(n)
