"""Training that never loses work: exact resume, atomic checkpoints, torchrun/DDP.

A run directory holds ``config.yaml`` (the :class:`TrainConfig`), ``metrics.jsonl`` (one JSON
record per logged step and per epoch), TensorBoard events, and checkpoints ``last/`` and ``best/``.
A checkpoint is a folder: ``model.safetensors`` + ``config.json`` (loadable by
``lookhere.load_model``), ``ema.safetensors`` when EMA is on, and ``state.pt`` (optimizer, RNG
states, the step, which is the position in the data, and the seconds trained so far), written beside
and swapped in by renames. A run on a folder of class folders also keeps ``classes.json`` (class
name -> the index the model predicts it as), so that a split lacking a class is labelled alike.
The learning rate is a function of the step and ``config.yaml``, which a resume rewrites with the
settings it goes on with (``--epochs`` may grow).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
import shutil
import sys
import time
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import yaml
from safetensors.torch import load_file, save_file
from torch.utils.data import ConcatDataset, DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from .data import DATASETS, DataSpec, build_dataset, collate
from .data.factory import model_data_config, num_classes_of
from .environment import environment
from .flags import flag
from .io import read_yaml, save_model, sync_to_disk, write_atomic
from .position import POSITION_ENCODINGS
from .vit import MODEL_NAMES, SIZES, WEIGHT_INITS, VisionTransformer, architecture, create_vit

MODEL_SIZES = {"micro": dict(embed_dim=96, depth=6, num_heads=12), **SIZES}


# The architecture settings a from-scratch run takes where they are unset; with a source, the source's.
FROM_SCRATCH = {"pos_encoding": "lh-90", "model": "tiny", "patch_size": 4, "weight_init": "torch"}
# What a run started with --init-from takes for the settings it leaves unset.
FINETUNE_DEFAULTS = {"lr": 1e-4, "min_lr": 1e-6, "layer_decay": 0.75}

# settings that may change on resume; everything else must match the run being resumed
RESUMABLE_CHANGES = ("resume", "output", "epochs", "max_steps", "workers", "device", "log_every", "checkpoint_every",
                     "progress", "data_root")


def _sourced(name: str) -> str:
    return f"{FROM_SCRATCH[name]}; with --init-from or a registered --model, theirs"


def _setting(default: Any, help: str, unset: Optional[str] = None) -> Any:
    """A TrainConfig field with its flag's help; ``unset`` says what a ``None`` default means."""
    return field(default=default, metadata={"help": help, "unset": unset})


@dataclass
class TrainConfig:
    """Every setting of a run; round-trips through YAML/JSON and maps one-to-one onto CLI flags
    (``pos_encoding`` is ``--pos-encoding``), whose help text is each field's metadata."""

    data: str = _setting("synthetic", f"dataset: {', '.join(DATASETS)}")
    data_root: Optional[str] = _setting(None, "folder of the dataset's files", "the dataset's standard place")
    data_length: Optional[int] = _setting(None, "training samples, the first N (synthetic: N scenes rendered, N/5 for "
                                          "validation; fashion-mnist: the first N of validation too)",
                                          "synthetic 4000, others all")
    data_streaming: bool = _setting(False, "stream an hf: dataset as it trains (timm's hfids reader) instead of "
                                    "downloading it; an epoch is --data-length samples (or the split's recorded "
                                    "size); one --img-size; resumes exactly with the same --workers")
    train_split: str = _setting("train", "the training split of a folder: (its subfolder) or hf: dataset (a Hugging Face "
                                "split, sliced as train[:99%])")
    val_split: str = _setting("val", "the validation split, as --train-split (the paper's minival: train[99%:]); val is "
                              "a folder's val/ or validation/, a Hugging Face dataset's validation")
    num_classes: Optional[int] = _setting(None, "outputs of the classifier", "the dataset's classes")
    pos_encoding: Optional[str] = _setting(None, f"position encoding: {', '.join(POSITION_ENCODINGS)}",
                                           _sourced("pos_encoding"))
    lookhere_config: Optional[dict] = _setting(None, "LookHere config as a JSON object (lookhere.LookHereConfig "
                                               "fields)", "the preset of --pos-encoding")
    pos_options: Optional[dict] = _setting(None, 'options of the position encoding as a JSON object, e.g. '
                                           '\'{"interpolate": true}\'', "none")
    model: Optional[str] = _setting(None, f"model size: {', '.join(MODEL_SIZES)}; or a registered name, whose "
                                    "architecture is built from scratch (vit_base_patch16_lookhere_90: the released "
                                    "one; its flags are refused)", "tiny; with --init-from, the source's")
    embed_dim: Optional[int] = _setting(None, "token width", "--model's")
    depth: Optional[int] = _setting(None, "number of blocks", "--model's")
    num_heads: Optional[int] = _setting(None, "attention heads per block", "--model's")
    img_size: Union[int, list[int]] = _setting(32, "training image side in pixels; several sizes (--img-size 32 48 64) "
                                                   "train each step at one of them in turn, the batch scaled by "
                                                   "(first size / size)^2 so that patches per step stay about the "
                                                   "same; the model is built for the first")
    patch_size: Optional[int] = _setting(None, "patch side in pixels", _sourced("patch_size"))
    epochs: int = _setting(10, "passes over the training split; raised on --resume, the learning-rate schedule is "
                               "rebuilt for the new length")
    batch_size: int = _setting(64, "images per step, over all processes")
    lr: float = _setting(1e-3, "peak learning rate (AdamW, cosine schedule)")
    min_lr: float = _setting(1e-5, "learning rate at the end of the schedule")
    weight_decay: float = _setting(0.05, "AdamW weight decay (not on norms, biases and tokens)")
    warmup_epochs: Optional[float] = _setting(None, "epochs of linear warmup from --lr / 1000",
                                              "a tenth of --epochs (docs/backbone-ablation.md)")
    label_smoothing: float = _setting(0.1, "label smoothing")
    clip_grad: Optional[float] = _setting(1.0, "clip the gradient norm to this (0: no clipping)", "no clipping")
    mixup: float = _setting(0.0, "mixup alpha (0: off); a batch shortened to an odd size by unreadable samples "
                                 "loses one more, as mixup pairs samples")
    cutmix: float = _setting(0.0, "cutmix alpha (0: off); batches as for --mixup")
    ema_decay: Optional[float] = _setting(None, "keep an EMA of the weights with this decay, e.g. 0.9999", "no EMA")
    drop_path: Optional[float] = _setting(None, "stochastic depth rate", "0; with --init-from or a registered --model, "
                                          "theirs")
    init_values: Optional[float] = _setting(None, "LayerScale initial value (0: no LayerScale)", "no LayerScale")
    weight_init: Optional[str] = _setting(None, "initialisation of the layers: torch (PyTorch's own, a zero CLS "
                                          "token) or timm (N(0, 0.02), as timm's ViT and the released models)",
                                          _sourced("weight_init"))
    init_from: Optional[str] = _setting(None, "fine-tune: start from this model, its architecture and weights (a "
                                        "timm name with weights, a released .pth, a save_model folder or a run "
                                        "directory); the classifier is made new for the data's classes; unset "
                                        "settings take fine-tuning defaults (" + ", ".join(
                                            f"{flag(k)} {v}" for k, v in FINETUNE_DEFAULTS.items()) + ")",
                                        "train from scratch")
    pretrained_file: Optional[str] = _setting(None, "with --init-from NAME: the weights file of that timm model "
                                              "(instead of downloading it)", "timm's download")
    layer_decay: Optional[float] = _setting(None, "layer-wise learning-rate decay: block i of L learns at lr x "
                                            "decay^(L - i), the stem least (timm's parameter groups)", "none")
    freeze_backbone: bool = _setting(False, "train the classifier head alone (with --init-from: a linear probe of "
                                            "the source's features)")
    compile: bool = _setting(False, "torch.compile the model for training (GPU runs; checkpoints and evaluation "
                                    "use the uncompiled module)")
    seed: int = _setting(0, "seed of the weights, the data order and each sample's augmentation")
    output: str = _setting("runs/run", "run directory: config.yaml, metrics.jsonl, tb/, checkpoints last/ and best/")
    resume: Optional[str] = _setting(None, "continue the run in this directory from its last checkpoint, with its "
                                     "settings; flags may change only " + ", ".join(
                                         flag(k) for k in RESUMABLE_CHANGES if k not in ("resume", "output")),
                                     "start a new run in --output")
    workers: int = _setting(0, "data-loading processes; each sample's augmentation is seeded by (--seed, epoch, "
                               "index), so results and exact resume do not depend on it (with --data-streaming "
                               "they do: the stream is divided among them)")
    device: str = _setting("auto", "cpu, cuda, cuda:N, or auto (cuda when there is one)")
    log_every: int = _setting(10, "steps between records in metrics.jsonl")
    checkpoint_every: int = _setting(100, "steps between checkpoints (last/); one is also written after each epoch")
    max_steps: Optional[int] = _setting(None, "stop after this many steps, with a checkpoint", "all of --epochs")
    progress: bool = _setting(True, "show a progress bar")

    def __post_init__(self) -> None:
        # Architecture left unset is the source's (--init-from, or a registered --model name): only a flag
        # actually given is checked against it. From scratch it is FROM_SCRATCH's.
        if not self.init_from:
            self.model = self.model or FROM_SCRATCH["model"]
            if self.model not in MODEL_NAMES.values():
                for k, v in FROM_SCRATCH.items():
                    if getattr(self, k) is None:
                        setattr(self, k, v)
        if isinstance(self.img_size, (list, tuple)) and len(self.img_size) == 1:
            self.img_size = self.img_size[0]  # one size is a size
        elif isinstance(self.img_size, tuple):
            self.img_size = list(self.img_size)

    @property
    def sizes(self) -> list[int]:
        """The training image sizes, the model's first."""
        return list(self.img_size) if isinstance(self.img_size, list) else [self.img_size]

    @property
    def size(self) -> int:
        """The size the model is built for (and the training size evaluation measures from)."""
        return self.sizes[0]

    def batch_sizes(self) -> list[int]:
        """The batch of each training size: ``--batch-size`` at the first, scaled by (first / size)^2
        (over several processes, each takes the nearest whole share: see ``set_up``)."""
        return [max(1, round(self.batch_size * (self.size / s) ** 2)) for s in self.sizes]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """The settings of ``d``; the others their defaults, fine-tuning's where ``d`` has ``init_from``."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"unknown training setting(s) {', '.join(unknown)}; allowed (as --flags, or as keys "
                             f"with - or _): {', '.join(flag(n) for n in names)}")
        hints = typing.get_type_hints(cls)
        if d.get("init_from"):
            d = {**FINETUNE_DEFAULTS, **d}
        return cls(**{k: _checked(k, v, hints[k]) for k, v in d.items()})

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "TrainConfig":
        return cls.from_dict(cls.settings_in(path))

    @classmethod
    def settings_in(cls, path: str | os.PathLike) -> dict[str, Any]:
        """The settings a YAML file gives (keys with - or _), checked; those it leaves out are not in it."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} does not exist")
        try:
            d = read_yaml(p) or {}
        except ValueError as e:
            raise ValueError(f"{e}; expected settings as 'name: value' lines") from None
        if not isinstance(d, dict):
            raise ValueError(f"{p}: expected a mapping of settings, got {type(d).__name__}")
        d = {k.replace("-", "_"): v for k, v in d.items()}
        try:
            cfg = cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from None
        return {k: getattr(cfg, k) for k in d}

    def model_kwargs(self, num_classes: int) -> dict[str, Any]:
        """``create_vit``'s arguments of the run's model."""
        if self.model in MODEL_NAMES.values():
            from .finetune import ARCHITECTURE, refuse_other_architecture

            arch = architecture(self.model, img_size=self.size, num_classes=num_classes)
            # --model names the architecture itself; every other architecture flag must agree with it
            refuse_other_architecture(self, arch, f"--model {self.model}", tuple(n for n in ARCHITECTURE if n != "model"))
            return arch if self.drop_path is None else {**arch, "drop_path_rate": self.drop_path}
        if self.model not in MODEL_SIZES:
            raise ValueError(f"--model {self.model!r}; allowed: {', '.join(MODEL_SIZES)}, or a registered name "
                             f"such as {MODEL_NAMES[('base', 'lh-90')]}")
        size = dict(MODEL_SIZES[self.model])
        for k in ("embed_dim", "depth", "num_heads"):
            if getattr(self, k) is not None:
                size[k] = getattr(self, k)
        return dict(pos_encoding=self.pos_encoding, lookhere_config=self.lookhere_config,
                    pos_options=self.pos_options, img_size=self.size, patch_size=self.patch_size,
                    num_classes=num_classes, drop_path_rate=self.drop_path or 0.0, init_values=self.init_values,
                    weight_init=self.weight_init, **size)

    def known_patch_size(self) -> Optional[int]:
        """The patch side of the run's model; None with --init-from and no --patch-size (the source's,
        known once it is loaded)."""
        return self.patch_size if self.init_from else self.model_kwargs(1)["patch_size"]

    def warmup(self) -> float:
        """Epochs of warmup: ``--warmup-epochs``, else a tenth of the run (a longer run warms up longer,
        and ``--resume`` with a larger ``--epochs`` rebuilds the schedule as a run of that length)."""
        return self.warmup_epochs if self.warmup_epochs is not None else self.epochs / 10

    def validate(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{flag(f.name)} must be a finite number, got {value}")
        for k in ("epochs", "batch_size", "patch_size", "log_every", "checkpoint_every", "max_steps",
                  "embed_dim", "depth", "num_heads", "num_classes", "data_length"):
            if getattr(self, k) is not None and getattr(self, k) < 1:
                raise ValueError(f"{flag(k)} must be >= 1, got {getattr(self, k)}")
        for k in ("min_lr", "weight_decay", "warmup_epochs", "mixup", "cutmix", "clip_grad", "init_values", "seed",
                  "workers"):
            if getattr(self, k) is not None and getattr(self, k) < 0:
                raise ValueError(f"{flag(k)} must be >= 0, got {getattr(self, k)}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        sizes = " ".join(map(str, self.sizes))
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError(f"--img-size must be one or more sizes >= 1, got {sizes or 'none'}")
        if len(set(self.sizes)) != len(self.sizes):
            raise ValueError(f"--img-size {sizes} repeats a size")
        # an unknown --model, or flags against a registered name's architecture, are refused here
        patch = self.known_patch_size()
        named = "--patch-size" if patch == self.patch_size else f"the patch size of {self.model},"
        for size in self.sizes if patch else ():  # a source's: checked once it is loaded (set_up)
            if size % patch:
                raise ValueError(f"--img-size {size} is not a multiple of {named} {patch}")
        for k in ("label_smoothing", "drop_path"):
            if getattr(self, k) is not None and not 0 <= getattr(self, k) < 1:
                raise ValueError(f"{flag(k)} must be in [0, 1), got {getattr(self, k)}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"--ema-decay must be in (0, 1), got {self.ema_decay}; leave it out for no EMA")
        if self.weight_init is not None and self.weight_init not in WEIGHT_INITS:
            raise ValueError(f"--weight-init {self.weight_init!r}; allowed: {', '.join(WEIGHT_INITS)}")
        if self.min_lr > self.lr:
            raise ValueError(f"--min-lr {self.min_lr} is above --lr {self.lr}: the schedule would rise")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f"--layer-decay must be in (0, 1], got {self.layer_decay}")
        photos = self.data.startswith(("folder:", "hf:"))
        for k, default in (("train_split", "train"), ("val_split", "val")):
            if getattr(self, k) != default and not photos:
                raise ValueError(f"{flag(k)} {getattr(self, k)!r}: {self.data} has fixed splits; the flag is for "
                                 f"folder: and hf: datasets")
        if photos and self.train_split == self.val_split:
            raise ValueError(f"--train-split and --val-split are both {self.train_split!r}: validation would score "
                             f"the training images")
        if self.data_streaming and not self.data.startswith("hf:"):
            raise ValueError(f"--data-streaming streams hf: datasets; --data {self.data} is not one")
        if self.data_streaming and len(self.sizes) > 1:
            raise ValueError(f"--data-streaming trains at one --img-size, got {sizes}: the steps of several sizes "
                             f"take their samples by index, which a stream has not")
        if self.pretrained_file and not self.init_from:
            raise ValueError("--pretrained-file names the weights of an --init-from model; give --init-from too")


_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping"}


def _checked(name: str, value: Any, hint: Any) -> Any:
    """``value`` as the field's type (an int is a float), or a ValueError naming the flag."""
    kinds = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if value is None and type(None) in typing.get_args(hint):
        return None
    kind = kinds[0]
    if isinstance(value, (list, tuple)) and any(typing.get_origin(k) is list for k in kinds):
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return list(value)
        raise ValueError(f"{flag(name)}: expected integers, got {value!r}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ValueError(f"{flag(name)}: expected {_KINDS[kind]}, got {value!r}")


# --- distributed -----------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    """torchrun sets WORLD_SIZE/RANK; NCCL on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


class StepBatches(Sampler):
    """This rank's batch of each step of an epoch, from step ``start`` (exact resume).

    The order is DistributedSampler's (a permutation seeded by seed + epoch, cut to a whole number of
    samples per rank, rank r taking every world-th): with one size, the batches are the ones its
    sampler and a DataLoader of that batch size give. With several sizes, step k of an epoch is at
    size k mod S, with that size's batch, and its samples come from that size's copy of the data
    (index ``size * n + i`` of the concatenated datasets).
    """

    def __init__(self, n: int, batches: list[int], rank: int, world: int, seed: int):
        self.n, self.batches, self.rank, self.world, self.seed = n, batches, rank, world, seed
        self.num_samples = math.ceil((n - world) / world) if n % world else n // world  # drop_last's
        self.epoch, self.start = 0, 0
        self.steps: list[tuple[int, int]] = []  # (size index, first sample of the step, per rank)
        j = 0
        while j + batches[len(self.steps) % len(batches)] <= self.num_samples:
            k = len(self.steps) % len(batches)
            self.steps.append((k, j))
            j += batches[k]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        for k, j in self.steps[self.start:]:
            yield [k * self.n + perm[self.rank + self.world * (j + t)] for t in range(self.batches[k])]

    def __len__(self) -> int:
        return len(self.steps) - self.start


def shard(n: int, rank: int, world: int) -> list[int]:
    """This rank's share of ``n`` samples, without the repeats DistributedSampler pads with: summed
    over ranks, every sample counts once, as in a run on one process."""
    return list(range(rank, n, world))


class SeededSamples(Dataset):
    """Training samples whose random augmentation is drawn from RNGs seeded by (seed, epoch, index).

    A sample then looks the same whichever process loads it and whenever, so a run resumes bit for
    bit with any ``--workers`` (worker RNGs otherwise depend on which worker got which batch). The
    caller's random states are left as they were (saved once per batch: the DataLoader fetches a
    batch with ``__getitems__``). Set ``epoch`` before each epoch's loader is made.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list:
        py, npy = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            try:
                return [self._seeded(i) for i in indices]
            finally:
                random.setstate(py)
                np.random.set_state(npy)

    def _seeded(self, index: int):
        _seed_every_rng(b"%d,%d,%d" % (self.seed, self.epoch, index))
        return self.dataset[index]


def _seed_every_rng(key: bytes) -> None:
    s = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")  # stable: alike in every process
    torch.random.default_generator.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)


class SeededStream(IterableDataset):
    """A streamed training split (``--data-streaming``) whose samples are augmented under RNGs seeded
    by (seed, epoch, rank, loader worker, position in that worker's share), as :class:`SeededSamples`
    seeds by index: the stream's order is fixed by the seed, the epoch and the number of processes and
    workers, so a run resumed with the same ``--workers`` reads and augments every sample alike. The
    caller's random states are left as they were. ``batch_size``: this process's."""

    def __init__(self, stream: IterableDataset, seed: int, rank: int, batch_size: int):
        self.stream, self.seed, self.rank, self.batch_size, self.epoch = stream, seed, rank, batch_size, 0

    def __len__(self) -> int:
        return len(self.stream)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.stream.set_epoch(epoch)

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        samples = iter(self.stream)
        for position in itertools.count():
            py, npy = random.getstate(), np.random.get_state()
            with torch.random.fork_rng(devices=[]):
                try:
                    _seed_every_rng(b"%d,%d,%d,%d,%d" % (self.seed, self.epoch, self.rank, worker, position))
                    sample = next(samples, None)  # read and transformed here, under these seeds
                finally:
                    random.setstate(py)
                    np.random.set_state(npy)
            if sample is None:
                return
            yield sample


def _write_atomically(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


# --- checkpoints -----------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        # only once CUDA is in use: asking earlier would start it in every CPU run on a GPU machine
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        for index, cuda_state in enumerate(s["cuda"][:torch.cuda.device_count()]):  # the devices this machine has
            torch.cuda.set_rng_state(cuda_state, index)
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    p = s["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def _unwrap(model: nn.Module) -> VisionTransformer:
    return model.module if hasattr(model, "module") else model


def write_checkpoint(directory: Path, model: nn.Module, ema, state: dict[str, Any]) -> None:
    """Write a checkpoint folder beside ``directory`` and swap it in with renames."""
    tmp = directory.with_name(directory.name + ".tmp")
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(_unwrap(model), tmp)
    if ema is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in ema.module.state_dict().items()},
                  str(tmp / "ema.safetensors"))
    torch.save(state, tmp / "state.pt")
    for path in (*tmp.iterdir(), tmp):  # on the disk before it takes the last one's place
        sync_to_disk(path)
    if directory.exists():  # else ``old`` may be the only checkpoint (a crash between renames): keep it
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(tmp, directory)
    sync_to_disk(directory.parent)
    shutil.rmtree(old, ignore_errors=True)


def forget_after(metrics: Path, step: int) -> None:
    """Drop the step and epoch records a killed stretch logged past ``step``, its last checkpoint, and
    a line cut short by the kill: the resumed run logs those steps again, once."""
    if not metrics.exists():
        return
    kept = []
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("kind") == "environment" or record.get("step", 0) <= step:
            kept.append(line + "\n")
    _write_atomically(metrics, "".join(kept))


def find_checkpoint(run_dir: Path) -> Optional[Path]:
    """``last/``, or ``last.old/`` when a crash fell between the two renames of a swap."""
    for name in ("last", "last.old"):
        p = run_dir / name
        if (p / "state.pt").is_file() and (p / "model.safetensors").is_file():
            return p
    return None


# --- checks ----------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """``--device``: ``auto`` is CUDA where there is one; a device this machine lacks is one message."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device here; use --device cpu or auto")
    return device


def resume_conflicts(cfg: TrainConfig, saved_path: Path) -> dict[str, tuple[Any, Any]]:
    """The settings of ``cfg`` that the run whose config is ``saved_path`` cannot be resumed with: name ->
    (the run's value, ``cfg``'s)."""
    saved = TrainConfig.from_yaml(saved_path).to_dict()
    mine = cfg.to_dict()
    # a stream is divided among the loader workers: another count reads it in another order
    resumable = [k for k in RESUMABLE_CHANGES if not (k == "workers" and cfg.data_streaming)]
    return {k: (saved.get(k), mine[k]) for k in mine if k not in resumable and saved.get(k) != mine[k]}


def _check_resume(cfg: TrainConfig, run_dir: Path) -> None:
    if Path(cfg.output).resolve() != run_dir.resolve():
        raise ValueError(f"--resume {run_dir} continues that run in its own directory, but --output {cfg.output} "
                         f"names another; leave --output out (or give the same directory), or start a new run "
                         f"without --resume")
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        if find_checkpoint(run_dir) is None:  # killed before it wrote anything: it starts from the beginning
            return
        raise FileNotFoundError(f"--resume {run_dir}: no config.yaml there; is it a lookhere run directory?")
    diffs = [f"{flag(k)}: run has {had!r}, now {now!r}" for k, (had, now) in resume_conflicts(cfg, saved_path).items()]
    if diffs:
        raise ValueError(f"--resume {run_dir}: incompatible with this config ({'; '.join(diffs)}); "
                         f"resume with the run's own settings or start a new --output")


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, d: Dist) -> dict[str, float]:
    """Top-1 and loss, summed over all ranks."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    with torch.no_grad():
        for images, labels, _ in loader:
            if not len(labels):
                continue
            images, labels = images.to(device), labels.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(images)
            loss = nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
            totals += torch.stack([loss.double(), (logits.argmax(-1) == labels).sum().double(),
                                   torch.tensor(len(labels), dtype=torch.float64, device=device)])
    if d.world > 1:
        dist.all_reduce(totals)
    n = max(totals[2].item(), 1.0)
    return {"loss": totals[0].item() / n, "acc": totals[1].item() / n, "n": int(totals[2].item())}


def initial_model(cfg: TrainConfig, num_classes: int) -> tuple[VisionTransformer, Optional[dict[str, Any]]]:
    """The weights a run starts from, drawn after seeding every RNG with ``cfg.seed`` (a study
    fingerprints them to notice an initialisation change), and with ``--init-from`` the record of the
    source (:func:`lookhere.finetune.start_from`)."""
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    if cfg.init_from:
        from .finetune import start_from

        return start_from(cfg, num_classes)
    return create_vit(**cfg.model_kwargs(num_classes)), None


# --- a run's parts and state -----------------------------------------------------------------
@dataclass
class Progress:
    """How far a run has got: what a checkpoint saves besides weights and optimizer, and what a
    resume restores (:func:`save_checkpoint` and :func:`restore_checkpoint` keep the same keys)."""

    step: int = 0
    best: float = -1.0  # the best validation top-1 so far (the ``best/`` checkpoint's)
    # unreadable samples skipped; samples left out to keep a mixup batch even; batches with no sample left
    counts: dict[str, int] = field(default_factory=lambda: {"skipped": 0, "mixup_dropped": 0, "empty_batches": 0})
    earlier_s: float = 0.0  # seconds trained by the stretches before this one, up to their last checkpoint
    started: float = field(default_factory=time.perf_counter)

    def train_seconds(self) -> float:
        """Wall seconds of training so far, over every stretch (a resume adds to its checkpoint's)."""
        return self.earlier_s + time.perf_counter() - self.started


class RunLog:
    """``metrics.jsonl`` and TensorBoard on rank 0; nothing on the other ranks."""

    def __init__(self, run_dir: Path, step: int, resumed: bool, main: bool, world_size: int = 1):
        self.file = self.writer = None
        if not main:
            return
        from torch.utils.tensorboard import SummaryWriter

        # Points past the checkpoint are logged again; the checkpoint step's own points stay.
        self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=step + 1 if resumed else None)
        if resumed:
            forget_after(run_dir / "metrics.jsonl", step)
        self.file = open(run_dir / "metrics.jsonl", "a")
        # at every start and resume: what decides this stretch's last digits
        self.file.write(json.dumps({"kind": "environment", "step": step, "world_size": world_size, **environment()})
                        + "\n")
        self.file.flush()  # a stretch killed before its first step record keeps its start

    def write(self, record: dict[str, Any]) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        prefix = "train" if record["kind"] == "step" else "epoch"
        for k, v in record.items():
            if isinstance(v, (int, float)) and k not in ("step", "epoch", "kind"):
                self.writer.add_scalar(f"{prefix}/{k}", v, record["step"])

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.writer.close()


@dataclass
class Run:
    """Everything a training run is made of, built once by :func:`set_up`."""

    cfg: TrainConfig
    dir: Path
    device: torch.device
    d: Dist
    model: nn.Module  # DDP-wrapped when there are several processes
    raw: VisionTransformer
    ema: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    mix: Any
    criterion: nn.Module
    train_ds: SeededSamples | SeededStream
    sampler: Optional[StepBatches]  # None for a stream: its order is its own
    val_loaders: dict[int, DataLoader]  # one per training size
    steps_per_epoch: int
    limit: int  # the step the run stops at
    progress: Progress = field(default_factory=Progress)
    log: Optional[RunLog] = None
    last_val: dict[str, float] = field(default_factory=dict)  # the last validation's top-1 and loss
    source: Optional[dict[str, Any]] = None  # with --init-from: where the run started (init.json)
    classes: Optional[dict[str, int]] = None  # a folder's class indices (classes.json)

    def summed(self, values: list[float]) -> list[float]:
        """Summed over the ranks (every rank calls it at the same step)."""
        if self.d.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def all_counts(self) -> dict[str, int]:
        counts = self.progress.counts
        return dict(zip(counts, map(int, self.summed([float(v) for v in counts.values()]))))


# --- set-up ----------------------------------------------------------------------------------
def set_up(cfg: TrainConfig) -> Run:
    """Devices and processes, data, model, optimizer, schedule and loss, from the config alone."""
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay
    from timm.scheduler import CosineLRScheduler
    from timm.utils import ModelEmaV3

    progress = Progress()  # the clock starts before the set-up, as the run's seconds always have
    cfg.validate()
    device = resolve_device(cfg.device)
    d = init_distributed(device)
    if d.world > 1 and device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    if cfg.batch_size % d.world:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by the {d.world} processes")
    run_dir = Path(cfg.resume or cfg.output)
    if cfg.resume:
        _check_resume(cfg, run_dir)

    per_rank = [max(1, round(b / d.world)) for b in cfg.batch_sizes()]
    specs = [DataSpec(cfg.data, size, cfg.data_length, cfg.seed, cfg.data_root, streaming=cfg.data_streaming,
                      batch_size=b) for size, b in zip(cfg.sizes, per_rank)]
    train_sets = [build_dataset(spec, cfg.train_split, train=True) for spec in specs]  # the same samples at each size
    num_classes = cfg.num_classes or num_classes_of(train_sets[0])
    known = getattr(train_sets[0], "num_classes", None)
    if cfg.num_classes and known and cfg.num_classes < known:
        raise ValueError(f"--num-classes {cfg.num_classes}: {cfg.data} has {known} classes")
    if cfg.data_streaming:  # the reader deals each worker whole batches: an epoch is its length in batches
        train_sets[0].set_loader_cfg(num_workers=cfg.workers)
        train_ds: SeededSamples | SeededStream = SeededStream(train_sets[0], cfg.seed, d.rank, per_rank[0])
        sampler, steps_per_epoch = None, len(train_ds) // per_rank[0]
    else:
        train_ds = SeededSamples(ConcatDataset(train_sets), cfg.seed)
        sampler = StepBatches(len(train_sets[0]), per_rank, d.rank, d.world, cfg.seed)
        steps_per_epoch = len(sampler.steps)

    raw, source = initial_model(cfg, num_classes)
    if d.rank:  # the weights are drawn alike; each process then draws its own drop-path, dropout and mixup
        torch.manual_seed(cfg.seed + d.rank)  # (as timm's train.py; process 0 goes on with the seed's own stream)
        np.random.seed(cfg.seed + d.rank)
        random.seed(cfg.seed + d.rank)
    for size in cfg.sizes if cfg.init_from else ():  # before the run directory is written
        if size % raw.patch_size:
            raise ValueError(f"--img-size {size} is not a multiple of the patch size of --init-from {cfg.init_from}, "
                             f"{raw.patch_size}")
    # Photographs are validated as `lookhere eval` will test the run: the model's data config, its
    # training size the one cropped by crop_pct (a folder's class indices: the training split's).
    data_config = model_data_config(raw, cfg.size)
    classes = getattr(train_sets[0], "class_to_idx", None)
    val_sets = {size: build_dataset(replace(spec, classes=classes, data_config=data_config), cfg.val_split, train=False)
                for size, spec in zip(cfg.sizes, specs)}
    raw = raw.to(device)
    if cfg.freeze_backbone:
        for name, param in raw.named_parameters():
            param.requires_grad_(name.startswith("head."))
    model: nn.Module = torch.compile(raw) if cfg.compile else raw
    if d.world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    ema = ModelEmaV3(raw, decay=cfg.ema_decay) if cfg.ema_decay else None

    if steps_per_epoch < 1:
        raise ValueError(f"the training split has {len(train_sets[0])} samples, fewer than one batch of "
                         f"{cfg.batch_size}")
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.layer_decay is not None:  # each group's lr_scale, applied by timm's scheduler
        groups = param_groups_layer_decay(raw, cfg.weight_decay, no_weight_decay_list=raw.no_weight_decay(),
                                          layer_decay=cfg.layer_decay)
    else:
        groups = param_groups_weight_decay(raw, cfg.weight_decay, no_weight_decay_list=raw.no_weight_decay())
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    scheduler = CosineLRScheduler(optimizer, t_initial=total_steps, lr_min=cfg.min_lr,
                                  warmup_t=int(cfg.warmup() * steps_per_epoch), warmup_lr_init=cfg.lr * 1e-3,
                                  t_in_epochs=False)
    mix = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mix = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                    num_classes=num_classes)
        criterion: nn.Module = SoftTargetCrossEntropy()
    else:
        criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    # Loaders get generators of their own: creating one must not draw from the global RNG, or a run
    # resumed mid-epoch would see different dropout and mixup draws than an uninterrupted one.
    # (a stream is divided among the processes by its reader)
    val_loaders = {size: DataLoader(ds, batch_size=b, sampler=shard(len(ds), d.rank, d.world)
                                    if d.world > 1 and not cfg.data_streaming else None,
                                    num_workers=cfg.workers, collate_fn=collate,
                                    generator=torch.Generator().manual_seed(cfg.seed))
                   for (size, ds), b in zip(val_sets.items(), per_rank)}
    limit = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    return Run(cfg, run_dir, device, d, model, raw, ema, optimizer, scheduler, mix, criterion, train_ds, sampler,
               val_loaders, steps_per_epoch, limit, progress, source=source, classes=classes)


# --- checkpoints: save and restore, side by side -----------------------------------------------
def save_checkpoint(run: Run, name: str) -> None:
    """``name/`` in the run directory: weights (and EMA), optimizer, progress and every rank's RNGs."""
    p = run.progress
    per_rank = [(_rng_state(), dict(p.counts))]
    if run.d.world > 1:
        gathered: list[Any] = [None] * run.d.world
        dist.all_gather_object(gathered, per_rank[0])
        per_rank = gathered
    if run.d.main:
        state = {"optimizer": run.optimizer.state_dict(), "step": p.step, "best": p.best,
                 "rng": [r for r, _ in per_rank], "counts_by_rank": [c for _, c in per_rank],
                 "train_s": p.train_seconds()}
        write_checkpoint(run.dir / name, run.raw, run.ema, state)
        run.log.flush()  # what a resume does not log again must be on disk


def restore_checkpoint(run: Run, ckpt: Path) -> None:
    """What :func:`save_checkpoint` wrote, back into the run (this rank's RNGs and counts)."""
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    trained_by, cfg = len(state["rng"]), run.cfg
    if trained_by != run.d.world and (cfg.data_streaming or len(cfg.sizes) > 1):
        how = f"torchrun --nproc_per_node {trained_by}" if trained_by > 1 else "one process, without torchrun"
        raise ValueError(f"--resume {run.dir}: the run was trained by {trained_by} process(es), this resume has "
                         f"{run.d.world}; with {'a streamed split' if cfg.data_streaming else 'several --img-size'} "
                         f"each process's share of a step depends on that count, so the run would go on from "
                         f"another place in its data: resume it with {how}")
    run.raw.load_state_dict(load_file(str(ckpt / "model.safetensors"), device=str(run.device)))
    if run.ema is not None and (ckpt / "ema.safetensors").is_file():
        run.ema.module.load_state_dict(load_file(str(ckpt / "ema.safetensors"), device=str(run.device)))
    run.optimizer.load_state_dict(state["optimizer"])
    p = run.progress
    p.step, p.best, p.earlier_s = state["step"], state["best"], state.get("train_s", 0.0)
    mine = min(run.d.rank, len(state["rng"]) - 1)
    # checkpoints written before the counts were kept per rank hold rank 0's at the top level
    p.counts.update(state["counts_by_rank"][mine] if "counts_by_rank" in state else
                    {k: state.get(k, 0) for k in p.counts})
    _set_rng_state(state["rng"][mine])


def start(run: Run) -> None:
    """Restore the last checkpoint of a resumed run (or refuse a folder that holds another run), put
    the schedule at the step, write the settings the run goes on with and open its log."""
    cfg, d = run.cfg, run.d
    ckpt = find_checkpoint(run.dir) if cfg.resume else None
    if cfg.resume and ckpt is None and d.main:
        print(f"--resume {run.dir}: no checkpoint yet, starting from the beginning", file=sys.stderr)
    if ckpt is not None:
        restore_checkpoint(run, ckpt)
    taken = torch.tensor(int(ckpt is None and not cfg.resume and d.main and (run.dir / "config.yaml").is_file()),
                         device=run.device)
    if d.world > 1:  # decided by rank 0, before it writes, and by every rank alike, so that none waits alone
        dist.all_reduce(taken, op=dist.ReduceOp.MAX)
    if taken:
        raise FileExistsError(f"--output {run.dir} already holds a run; use --resume {run.dir} or another --output")
    if run.source is not None:
        _check_source(run)
    trained_on = run_classes(run.dir) if ckpt is not None and run.classes is not None else None
    if trained_on is not None and trained_on != run.classes:  # same count, other names: the head's labels would move
        moved = sorted(set(trained_on.items()) ^ set(run.classes.items()))
        raise ValueError(f"--resume {run.dir}: the training folder's classes are not those the run trained on "
                         f"({run.dir / CLASSES}; differing: {', '.join(f'{k} -> {v}' for k, v in moved[:6])}"
                         f"{' ...' if len(moved) > 6 else ''}): give the folder its class folders back, or start a "
                         f"new --output")
    # The schedule is a function of the step and this config: a resume with more --epochs continues as a
    # run of the new length would, rather than at the old schedule's end.
    run.scheduler.step_update(num_updates=run.progress.step)
    if d.main:
        run.dir.mkdir(parents=True, exist_ok=True)
        # the settings the run goes on with, so that a later --resume continues with them
        _write_atomically(run.dir / "config.yaml", yaml.safe_dump(replace(cfg, resume=None).to_dict(), sort_keys=False))
        if run.classes is not None:
            _write_atomically(run.dir / CLASSES, json.dumps(run.classes, indent=2) + "\n")
    if d.world > 1:
        dist.barrier()
    run.log = RunLog(run.dir, run.progress.step, bool(cfg.resume), d.main, d.world)
    if cfg.resume and run.progress.step >= run.limit and d.main:
        print(f"--resume {run.dir}: the run is at step {run.progress.step}, where it ends (--epochs {cfg.epochs}"
              f"{f', --max-steps {cfg.max_steps}' if cfg.max_steps else ''}: {run.limit} steps); nothing to train. "
              f"Raise --epochs or --max-steps to go on", file=sys.stderr)


CLASSES = "classes.json"


def run_classes(run_dir: str | os.PathLike) -> Optional[dict[str, int]]:
    """The class indices a run on folder data trained with (None: another kind of data, or a run made
    before they were kept): what ``lookhere eval`` labels another split of the folder by."""
    path = Path(run_dir) / CLASSES
    if not path.is_file():
        return None
    remedy = ("write it again from the training split's folders as the run did: "
              "timm.data.ImageDataset(TRAIN_SPLIT_FOLDER).reader.class_to_idx")
    try:
        classes = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not the run's class indices (invalid JSON: {e}); {remedy}") from None
    if not (isinstance(classes, dict) and all(isinstance(k, str) and type(v) is int for k, v in classes.items())):
        raise ValueError(f"{path}: not the run's class indices (expected an object of class name -> index); {remedy}")
    indices = sorted(classes.values())
    if indices != list(range(len(classes))):
        raise ValueError(f"{path}: not the run's class indices (expected each of 0..{len(classes) - 1} once, "
                         f"got {indices}); {remedy}")
    return classes


def _check_source(run: Run) -> None:
    """A fine-tuning run keeps ``init.json``, where it started; resumed, its source must be the same weights."""
    path = run.dir / "init.json"
    if run.cfg.resume and path.is_file():
        made = json.loads(path.read_text())
        if made.get("digest_of") != run.source["digest_of"]:  # written before the classifier was left out
            if run.d.main:
                print(f"--resume {run.dir}: its init.json predates the digest of the source without its classifier; "
                      f"the source's weights are not checked", file=sys.stderr)
        elif made.get("sha256") != run.source["sha256"]:
            raise ValueError(f"--resume {run.dir}: the run started from other weights than --init-from "
                             f"{run.cfg.init_from} holds now (SHA-256 {made.get('sha256', '?')[:12]}..., now "
                             f"{run.source['sha256'][:12]}...)")
    elif run.d.main:
        run.dir.mkdir(parents=True, exist_ok=True)
        _write_atomically(path, json.dumps(run.source, indent=2) + "\n")


# --- the step, the epoch, validation ---------------------------------------------------------
def train_step(run: Run, images: torch.Tensor, labels: torch.Tensor) -> tuple[Optional[torch.Tensor], Any, bool]:
    """One update on a batch: (loss, gradient norm, whether there was a sample to learn from)."""
    p = run.progress
    if run.mix is not None and len(labels) % 2:  # timm's Mixup pairs samples: the batch must be even
        images, labels = images[:-1], labels[:-1]
        p.counts["mixup_dropped"] += 1
    usable = len(labels)
    if run.d.world > 1:  # every rank skips together, or DDP's gradient reduction would wait forever
        least = torch.tensor(usable, device=run.device)
        dist.all_reduce(least, op=dist.ReduceOp.MIN)
        usable = int(least)
    if not usable:  # no readable sample: no update, but the step counts, keeping schedule and data position aligned
        p.counts["empty_batches"] += 1
        return None, None, False
    images, labels = images.to(run.device, non_blocking=True), labels.to(run.device, non_blocking=True)
    images, targets = run.mix(images, labels) if run.mix is not None else (images, labels)
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.device.type == "cuda"):
        logits = run.model(images)
    loss = run.criterion(logits.float(), targets)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip = run.cfg.clip_grad
    grad_norm = nn.utils.clip_grad_norm_(run.raw.parameters(), clip) if clip else None
    run.optimizer.step()
    return loss, grad_norm, True


def train_one_epoch(run: Run, bar) -> None:
    """From the run's step to the end of its epoch (or the run's last step): steps, logging and
    checkpoints, and validation at the epoch's end."""
    cfg, p, d = run.cfg, run.progress, run.d
    epoch, in_epoch = divmod(p.step, run.steps_per_epoch)
    generator = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
    if run.sampler is None:  # a stream: its epoch from the start, the batches already trained on read and dropped
        run.train_ds.set_epoch(epoch)
        loader = itertools.islice(DataLoader(run.train_ds, batch_size=run.train_ds.batch_size, num_workers=cfg.workers,
                                             collate_fn=collate, generator=generator), in_epoch, None)
    else:
        run.sampler.set_epoch(epoch)
        run.train_ds.epoch = epoch
        run.sampler.start = in_epoch
        loader = DataLoader(run.train_ds, batch_sampler=run.sampler, num_workers=cfg.workers, collate_fn=collate,
                            generator=generator)
    run.model.train()
    if cfg.freeze_backbone:  # a probe of the source's features: the frozen part runs as at test time (no drop-path)
        run.raw.eval()
        run.raw.head_drop.train()
        run.raw.head.train()
    t0, seen = time.perf_counter(), 0
    for images, labels, skipped in loader:
        p.counts["skipped"] += skipped
        loss, grad_norm, updated = train_step(run, images, labels)
        group = run.optimizer.param_groups[0]  # the schedule's rate this step's update used (before layer decay)
        lr = group["lr"] / group.get("lr_scale", 1.0)
        p.step += 1
        run.scheduler.step_update(num_updates=p.step)
        if run.ema is not None and updated:
            run.ema.update(run.raw, step=p.step)
        seen += len(labels) * d.world
        ips = seen / max(time.perf_counter() - t0, 1e-9)
        bar.update(1)
        bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}" if loss is not None else "-", img_s=f"{ips:.0f}")
        if p.step % cfg.log_every == 0 or p.step == run.limit:
            # the loss of the whole batch, over every rank (grad_norm is already of the reduced gradients)
            mean_loss = run.summed([loss.item()])[0] / d.world if loss is not None else None
            run.log.write({"kind": "step", "step": p.step, "epoch": epoch, "loss": mean_loss, "lr": lr,
                           "images_per_s": ips, "grad_norm": float(grad_norm) if grad_norm is not None else None,
                           **run.all_counts()})
        end_of_epoch = p.step % run.steps_per_epoch == 0
        if end_of_epoch:
            validate(run, epoch, bar)
        if end_of_epoch or p.step % cfg.checkpoint_every == 0 or p.step == run.limit:
            save_checkpoint(run, "last")
        if p.step >= run.limit:
            break


def _validate(model: nn.Module, run: Run) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Top-1 and loss at each training size, and their means (with one size: that size's)."""
    by_size = {str(size): evaluate(model, loader, run.device, run.d) for size, loader in run.val_loaders.items()}
    mean = {k: sum(v[k] for v in by_size.values()) / len(by_size) for k in ("acc", "loss")}
    return {**mean, "n": sum(v["n"] for v in by_size.values())}, by_size


def validate(run: Run, epoch: int, bar) -> dict[str, float]:
    """Validation top-1 and loss (and the EMA's), logged; a new best is saved as ``best/``. With
    several training sizes: the means over the sizes, each size's beside them."""
    p = run.progress
    val, by_size = _validate(run.raw, run)
    record = {"kind": "epoch", "step": p.step, "epoch": epoch, "val_acc": val["acc"], "val_loss": val["loss"],
              "train_s": p.train_seconds(), **run.all_counts()}
    if len(by_size) > 1:
        record["val_acc_by_size"] = {s: v["acc"] for s, v in by_size.items()}
    if run.ema is not None:
        ev, _ = _validate(run.ema.module, run)
        record.update(val_acc_ema=ev["acc"], val_loss_ema=ev["loss"])
    run.log.write(record)
    if run.d.main:
        bar.write(f"epoch {epoch}: val acc {val['acc']:.4f}, val loss {val['loss']:.4f}")
    if val["acc"] > p.best:
        p.best = val["acc"]
        save_checkpoint(run, "best")
    run.last_val = val
    return val


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training; returns the final metrics. Rank 0 logs and checkpoints."""
    from tqdm import tqdm

    run = set_up(cfg)
    start(run)
    p = run.progress
    bar = tqdm(total=run.limit, initial=min(p.step, run.limit), disable=not (run.d.main and cfg.progress),
               unit="step", dynamic_ncols=True)
    while p.step < run.limit:
        train_one_epoch(run, bar)
    bar.close()
    total = run.all_counts()
    if run.d.main and any(total.values()):
        print(f"warning: {total['skipped']} unreadable samples were skipped, {total['mixup_dropped']} more left "
              f"out to keep mixup batches even, and {total['empty_batches']} batches had no sample left (no "
              f"update)", file=sys.stderr)
    run.log.close()
    return {"step": p.step, "best_val_acc": p.best, "val": run.last_val, "run_dir": str(run.dir), "model": run.raw,
            "train_s": p.train_seconds()}
