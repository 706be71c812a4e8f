"""Datasets by name: ``synthetic``, ``synthetic-where``, ``synthetic-far``, ``fashion-mnist``, ``folder:PATH``,
``hf:NAME``.

Photographs (folders, tar files, webdataset shards, Hugging Face) go through timm's dataset and transform
factories: DeiT-III's recipe for training (random resized crop, flip, one of grayscale / solarize /
blur: timm's ``3a`` policy, colour jitter) and the paper's evaluation transform (:func:`eval_transform`). A Hugging Face
dataset whose label column holds lists of valid classes (``labels``, as ImageNet-HR) yields each
image's list as a tensor padded with ``-1``. Synthetic scenes are rendered at the requested size;
Fashion-MNIST is resized.
"""

from __future__ import annotations

import functools
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset, default_collate

from .fashion_mnist import DEFAULT_ROOT, FashionMNIST
from .synthetic import SPLITS, SyntheticScenes

# The synthetic scenes' tasks by dataset name (see ``synthetic.py``).
SYNTHETIC_TASKS = {"synthetic": "what", "synthetic-where": "where", "synthetic-far": "far"}
DATASETS = (*SYNTHETIC_TASKS, "fashion-mnist", "folder:PATH", "hf:NAME")
VAL_NAMES = ("val", "validation")  # the names the ``val`` split is read from: a folder's (or its .tar), the Hub's
LABEL_COLUMNS = ("label", "labels")  # a Hugging Face dataset's class column: one class, or a list of valid ones


@dataclass
class DataSpec:
    name: str
    img_size: int | tuple[int, int]
    length: int | None = None  # training samples, the first N (synthetic: scenes rendered, default 4000,
    # val and test get a fifth; fashion-mnist: the first N of every split)
    seed: int = 0
    root: str | None = None
    hf_val_split: str = "validation"
    # Evaluation of photographs: the model's timm data config (mean, std, interpolation, crop_pct,
    # crop_mode; input_size is its training size). None: img_size is the training size, timm's defaults.
    data_config: dict | None = None
    # A folder's labels are its class folders' sorted names; another split that lacks a class would
    # number the rest otherwise. Its other splits take the training split's (class name -> index).
    classes: dict | None = None
    # hf: only: read the split as a stream (timm's hfids reader) instead of downloading it whole. A
    # streamed training split yields whole batches of ``batch_size`` (per process) to each loader worker.
    streaming: bool = False
    batch_size: int = 1


# What a dataset tells about itself, kept through the wrappers (Subset, SkipBad).
FACTS = ("mean", "std", "num_classes", "object_size", "class_to_idx")


class SkipBad(Dataset):
    """Returns ``None`` for a sample that cannot be read (warning once per sample); see ``collate``."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        for attr in FACTS:
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


def reads_val(split: str) -> bool:
    """Whether ``split`` reads images of the ``val`` split: one of its names, a folder's tar of them
    (``val.tar``), sliced (``validation[:10%]``) or joined with another (``test+validation``)."""
    parts = re.sub(r"\[[^\[\]]*\]", "", split).split("+")
    return any(part.removesuffix(".tar") in VAL_NAMES for part in parts)


def collate(batch: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stack the good samples; the third element counts the skipped ones."""
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images, labels = default_collate(good)[:2]
    return images, labels, skipped


def model_data_config(model: torch.nn.Module, train_size: int) -> dict[str, Any]:
    """timm's data config of the model (mean, std, interpolation, crop_pct, crop_mode: its
    ``pretrained_cfg`` or timm's defaults), with ``input_size`` set to its training size: what a
    run validates photographs with and ``lookhere eval`` tests them with."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    cfg["input_size"] = (cfg["input_size"][0], train_size, train_size)
    return cfg


def eval_transform(img_size: int | tuple[int, int], data_config: dict | None = None):
    """The paper's evaluation transform of a photograph, by timm's ``create_transform``.

    At the model's training size (``data_config["input_size"]``) the shorter side is resized to
    ``size / crop_pct`` and the centre cropped (224 px at crop 0.875: 256, then 224); at any other
    size the shorter side is resized to that size and the centre cropped, so a square image is
    resized once. PIL resizing is antialiased.
    """
    from timm.data import create_transform, resolve_data_config

    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    cfg = resolve_data_config(dict(data_config) if data_config else {"input_size": (3, *size)})
    at_training_size = tuple(cfg["input_size"][-2:]) == size
    return create_transform(size[0] if size[0] == size[1] else size, is_training=False,
                            interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"],
                            crop_pct=cfg["crop_pct"] if at_training_size else 1.0, crop_mode=cfg["crop_mode"])


def _label_list(labels: list[int], length: int) -> torch.Tensor:
    """An image's valid classes, padded with -1 to the dataset's longest list."""
    return torch.tensor(list(labels) + [-1] * (length - len(labels)), dtype=torch.long)


def _hf_photos(target: str, split: str, spec: DataSpec, train: bool, transform):
    """A Hugging Face dataset through timm's reader; its class column is ``label`` or, failing that,
    ``labels`` (lists of valid classes are allowed for evaluation)."""
    try:
        import datasets  # noqa: F401
        from timm.data import create_dataset
    except ImportError as e:
        raise ImportError("hf: datasets need the 'datasets' package: pip install 'lookhere[hf]'") from e
    hf_split = {"val": spec.hf_val_split}.get(split, split)

    def load(column: str):
        try:
            return create_dataset(f"hfds/{target}", root=spec.root, split=hf_split, transform=transform,
                                  target_key=column)
        except ValueError as e:
            if "split" not in str(e).lower() and "instruction" not in str(e).lower():
                raise
            raise ValueError(f"split {split!r} of hf:{target}: {e} (a split name, optionally sliced: "
                             f"'train[99%:]', 'test[:500]')") from None

    ds = load(LABEL_COLUMNS[0])
    features = ds.reader.dataset.features
    column = next((c for c in LABEL_COLUMNS if c in features), None)
    if column is None:
        raise ValueError(f"--data hf:{target}: no class column (expected one of {', '.join(LABEL_COLUMNS)}; "
                         f"found {', '.join(features)})")
    if column != LABEL_COLUMNS[0]:
        ds = load(column)
    table = ds.reader.dataset
    if hasattr(features[column], "feature"):  # a list of valid classes per image
        if train:
            raise ValueError(f"--data hf:{target}: its '{column}' column holds lists of valid classes, "
                             f"an evaluation set; training needs one class per image")
        lengths = [len(x) for x in table[column]]
        empty = [i for i, n in enumerate(lengths) if n == 0]
        if empty:
            raise ValueError(f"--data hf:{target} split {hf_split!r}: {len(empty)} image(s) have an empty "
                             f"'{column}' list (first: row {empty[0]}); each image needs at least one class")
        ds.target_transform = functools.partial(_label_list, length=max(lengths, default=1))
    return ds


def _hf_stream(target: str, split: str, spec: DataSpec, train: bool, transform):
    """A Hugging Face split streamed by timm's ``hfids`` reader: shards are read as training goes,
    shuffled through a buffer seeded by the run's seed and the epoch, and divided among processes
    and loader workers. A training epoch is ``spec.length`` samples (or the split's recorded size);
    an evaluation pass reads the split once to its end."""
    try:
        import datasets  # noqa: F401
        from timm.data import create_dataset
    except ImportError as e:
        raise ImportError("hf: datasets need the 'datasets' package: pip install 'lookhere[hf]'") from e
    hf_split = {"val": spec.hf_val_split}.get(split, split)
    if "[" in hf_split:
        raise ValueError(f"--data-streaming: split {hf_split!r} of hf:{target} is sliced; a stream is read whole "
                         f"(name a split of its own, e.g. validation)")
    try:
        # timm's reader asks for a count: an epoch's samples in training; an evaluation pass ignores it
        ds = create_dataset(f"hfids/{target}", root=spec.root, split=hf_split, is_training=train,
                            batch_size=spec.batch_size, seed=spec.seed, transform=transform, target_key="label",
                            num_samples=spec.length if train else sys.maxsize)
    except ValueError as e:
        if "num_samples" not in str(e):
            raise
        raise ValueError(f"--data-streaming: hf:{target} records no size for split {hf_split!r}; give --data-length "
                         f"N, the samples of a training epoch") from None
    try:
        features = ds.reader.builder.as_streaming_dataset(split=hf_split).features
    except (ValueError, KeyError) as e:
        raise ValueError(f"split {split!r} of hf:{target}: {e}") from None
    label = (features or {}).get("label")
    if label is None or hasattr(label, "feature"):
        raise ValueError(f"--data hf:{target} --data-streaming: split {hf_split!r} needs a 'label' column of one class "
                         f"per image (found {', '.join(features or {}) or 'no columns'})")
    ds.num_classes = getattr(label, "num_classes", None)
    return ds


def _folder_split(root: Path, split: str, transform, classes: dict | None = None):
    """``ROOT/SPLIT/`` of class folders (ImageNet's layout), or the same in tar files, read in place
    by timm's tar reader with random access: ``ROOT/SPLIT.tar`` (class folders inside, or one tar per
    class, as ImageNet's training tar), or ``ROOT/SPLIT/`` holding only ``.tar`` shards. Tars whose
    samples carry their class in ``KEY.cls`` are webdataset shards (:mod:`.wds_shards`). ``classes``:
    the class indices to label with (the training split's), instead of this split's own folders."""
    from timm.data import ImageDataset, create_dataset

    from .wds_shards import WebDatasetShards, holds_labelled_samples

    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist (expected ROOT/{split}/CLASS/IMAGE)")
    names = VAL_NAMES if split == "val" else (split,)
    found = next((p for s in names for p in (root / s, root / f"{s}.tar") if p.exists()), None)
    if found is None:
        present = sorted(p.name for p in root.iterdir() if p.is_dir() or p.suffix == ".tar")
        raise FileNotFoundError(f"--data folder:{root} has no {split}/ folder or {split}.tar "
                                f"(found: {', '.join(present) or 'none'}); pass one of them as the split "
                                f"(--split; --train-split or --val-split for training)")
    shards = found.is_dir() and any(found.glob("*.tar")) and not any(p.is_dir() for p in found.iterdir())
    if found.is_dir() and not shards:

        def read(class_map=None):
            return create_dataset("", root=str(found), split=split, search_split=False, transform=transform,
                                  class_map=class_map)
        return _labelled_as(read(), read, classes, root, split)
    import tarfile

    from timm.data.readers.reader_image_in_tar import ReaderImageInTar

    tars = sorted(found.glob("*.tar")) if found.is_dir() else [found]

    def read_tars(class_map=None):
        return ImageDataset(str(found), reader=ReaderImageInTar(str(found), class_map=class_map or ""),
                            transform=transform)

    try:
        webdataset = holds_labelled_samples(tars[0])
        first = None if webdataset else read_tars()
    except (AssertionError, ValueError, tarfile.TarError) as e:  # tars without images, or files that are no tar
        raise FileNotFoundError(f"--data folder:{root}: {found} holds no images in tar files ({e})") from e
    if webdataset:  # classes are the integers of the shards' .cls files, alike in every split
        return ImageDataset(str(found), reader=WebDatasetShards(tars), transform=transform)
    return _labelled_as(first, read_tars, classes, root, split)


def _labelled_as(ds, read, classes: dict | None, root: Path, split: str):
    """The split ``ds``, or ``read(classes)`` where its own class folders number otherwise than
    ``classes``; a class the training split lacks is refused (its images would have no label)."""
    own = getattr(ds.reader, "class_to_idx", None) or ds.reader.class_name_to_idx
    if classes is None or own == classes:
        return ds
    extra = sorted(set(own) - set(classes))
    if extra:
        raise ValueError(f"--data folder:{root}: split {split!r} has classes the training split lacks: "
                         f"{', '.join(map(str, extra[:10]))}{' ...' if len(extra) > 10 else ''}")
    return read(dict(classes))


def _timm_photos(kind: str, target: str, split: str, spec: DataSpec, train: bool):
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_dataset, create_transform

    size = spec.img_size if isinstance(spec.img_size, int) else tuple(spec.img_size)
    if train:
        transform = create_transform(size, is_training=True, auto_augment="3a", color_jitter=0.3,
                                     interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
        mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    else:
        transform = eval_transform(size, spec.data_config)
        cfg = spec.data_config or {}
        mean, std = tuple(cfg.get("mean", IMAGENET_DEFAULT_MEAN)), tuple(cfg.get("std", IMAGENET_DEFAULT_STD))
    if kind == "folder":
        ds = _folder_split(Path(target), split, transform, spec.classes)
    elif spec.streaming:
        ds = _hf_stream(target, split, spec, train, transform)
        ds.mean, ds.std = mean, std
        return ds
    else:
        ds = _hf_photos(target, split, spec, train, transform)
    ds._max_retries = 1  # let SkipBad see (and count) an unreadable image instead of silently replacing it
    if len(ds) == 0:
        raise FileNotFoundError(f"{kind}:{target} has no images for split {split!r}")
    ds.mean, ds.std = mean, std
    reader = getattr(ds, "reader", None)
    labels = getattr(reader, "class_to_idx", None) or getattr(reader, "class_name_to_idx", None)
    ds.num_classes = len(labels) if labels else getattr(reader, "num_classes", None)
    if kind == "folder" and labels:
        ds.class_to_idx = dict(labels)
    return ds


def build_dataset(spec: DataSpec, split: str, *, train: bool | None = None, length: int | None = None) -> Dataset:
    """The ``split`` of a dataset (train, val, test; a folder's subfolder; a Hugging Face split, sliced
    as ``train[99%:]``), wrapped so a bad sample is skipped and counted.

    ``length`` keeps only the first ``length`` samples (synthetic: exactly that many scenes);
    ``spec.length`` is the training length (see ``--data-length``).
    """
    train = split == "train" if train is None else train
    name = spec.name
    if spec.streaming and not name.startswith("hf:"):
        raise ValueError(f"--data-streaming streams hf: datasets; {name} is not one")
    if spec.root and (name in SYNTHETIC_TASKS or name.startswith("folder:")):
        raise ValueError(f"--data-root {spec.root}: {name} is not read from it (it is for fashion-mnist and hf: "
                         f"datasets); leave it out")
    if (name in SYNTHETIC_TASKS or name == "fashion-mnist") and split not in SPLITS:
        raise ValueError(f"--split {split!r}: {name} has the splits {', '.join(SPLITS)}")
    if name in SYNTHETIC_TASKS:
        n = spec.length or 4000
        length = length or (n if split == "train" else max(1, n // 5))
        ds = SyntheticScenes(split, spec.img_size, length, seed=spec.seed, task=SYNTHETIC_TASKS[name])
    elif name == "fashion-mnist":
        ds = FashionMNIST(split, spec.img_size, root=spec.root or DEFAULT_ROOT, length=spec.length)
    elif name.startswith("folder:") or name.startswith("hf:"):
        kind, _, target = name.partition(":")
        if not target:
            raise ValueError(f"--data {name!r} needs a path or name after '{kind}:'")
        ds = _timm_photos(kind, target, split, spec, train)
        if spec.streaming:  # an iterable: its length is an epoch's samples, set by the reader
            return ds
        if train and length is None:
            length = spec.length
    else:
        raise ValueError(f"--data {name!r}: unknown dataset; allowed: {', '.join(DATASETS)}")
    if length is not None and length < len(ds):
        kept = Subset(ds, range(length))
        for attr in FACTS:
            if hasattr(ds, attr):
                setattr(kept, attr, getattr(ds, attr))
        ds = kept
    return SkipBad(ds)


def num_classes_of(ds: Any) -> int:
    n = getattr(ds, "num_classes", None)
    if not n:
        raise ValueError("cannot tell the number of classes of this dataset; pass --num-classes")
    return int(n)
