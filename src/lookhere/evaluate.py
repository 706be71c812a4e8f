"""Evaluation across image sizes: accuracy, NLL, calibration, adversarial robustness, object sizes.

Images reach the model normalised; attacks work in pixel space ([0, 1], L-inf) and normalise again,
so ``eps = 1/255`` means one grey level whatever the dataset's mean and std. A dataset may give each
image a list of valid classes (ImageNet-HR, as ImageNet-ReaL): see :data:`LABEL_LIST_METRICS`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

from . import flags
from .data import DataSpec, build_dataset, collate
from .data.factory import DATASETS, model_data_config, reads_val
from .environment import environment
from .io import write_atomic
from .official import load_error
from .position import apply_knob
from .position.lookhere import GLOBAL_SLOPE

ATTACKS = ("fgsm", "pgd")


def attack_names(text: str) -> tuple[str, ...]:
    """argparse type of ``--adversarial``: comma-separated names from :data:`ATTACKS`."""
    names = tuple(a.strip() for a in text.split(",") if a.strip())
    unknown = [a for a in names if a not in ATTACKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: unknown attack {', '.join(unknown) or '(none given)'}; "
                                         f"allowed: {', '.join(ATTACKS)} (comma-separated)")
    return names
LABEL_LIST_METRICS = (
    "Labels are lists of valid classes (as ImageNet-ReaL): top-k counts an image when any of the k "
    "predictions is in its list; NLL is -log of the probability given to the list (the sum over its "
    "classes); ECE bins the top-1 probability against top-1 correctness. With one label per image these "
    "are the usual definitions.")


# --- loading -----------------------------------------------------------------------------------
def load_checkpoint(path: str | Path, *, num_heads: Optional[int] = None, weights: str = "best"):
    """A model from a run directory (its ``best/`` or ``last/``), a model directory, or a released
    LookHere ``.pth`` file (``num_heads`` of it: the file does not record them; 12 unless given).
    Returns ``(model, train_config_or_None)``."""
    from .io import load_trained
    from .train import TrainConfig

    try:
        model, kind = load_trained(path, weights=weights, **({} if num_heads is None else {"num_heads": num_heads}))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--checkpoint {e}") from None
    if num_heads is not None and kind != "released file":
        raise ValueError(f"--num-heads is read from a released .pth file only; --checkpoint {path} is a {kind}, "
                         f"which records its heads: leave --num-heads out")
    return model, TrainConfig.from_yaml(Path(path) / "config.yaml") if kind == "run directory" else None


def load_pretrained(name: str, file: str | os.PathLike | None = None) -> nn.Module:
    """A timm model with its pretrained weights, loaded the way timm users load them:
    ``timm.create_model(name, pretrained=True)``, which downloads the file its ``pretrained_cfg``
    names, or reads ``file`` instead (``pretrained_cfg_overlay=dict(file=...)``) for offline use."""
    import timm
    from timm.models import get_pretrained_cfg

    if not timm.is_model(name):
        raise ValueError(f"--model {name!r}: not a timm model name (list them: timm.list_pretrained('*lookhere*'))")
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError as e:  # an unknown pretrained tag
        raise ValueError(f"--model {name!r}: {e} (list them: timm.list_pretrained())") from None
    if file is not None:
        if not Path(file).is_file():
            raise FileNotFoundError(f"--pretrained-file {file} does not exist")
    elif not (cfg and (cfg.hf_hub_id or cfg.url or cfg.file)):
        raise ValueError(f"--model {name!r}: timm knows no pretrained weights for it; name one that has them "
                         f"(timm.list_pretrained()) or pass its weights with --pretrained-file PATH")
    overlay = dict(file=str(file)) if file is not None else None
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)
    except OSError as e:
        if file is not None:
            raise ValueError(f"--pretrained-file {file}: unreadable: {str(e).strip().splitlines()[0]}") from e
        raise ConnectionError(f"--model {name!r}: could not get its weights ({str(e).strip().splitlines()[0]}); "
                              f"check the connection, or download the file and pass --pretrained-file PATH") from e
    except (RuntimeError, ValueError) as e:  # weights that do not fit, an unsafe or unreadable file
        where = f"--pretrained-file {file}" if file is not None else f"--model {name!r}"
        raise ValueError(f"{where}: the weights do not load into {name}: {load_error(e)}") from e
    return model.eval()


def training_size(model: nn.Module, run_config: Any = None) -> int:
    """The size a model was trained at: its run's ``img_size``, else its timm ``pretrained_cfg``'s
    input size, else the size it was built for."""
    if run_config is not None:
        return run_config.size
    pretrained = getattr(model, "pretrained_cfg", None)
    if pretrained and pretrained.get("input_size"):
        return int(pretrained["input_size"][-1])
    built = getattr(getattr(model, "config", None), "img_size", None)
    if built is None:
        raise ValueError("cannot tell the model's training size; pass --train-size")
    return int(built if isinstance(built, int) else built[-1])


def patch_size_of(model: nn.Module) -> Optional[int]:
    size = getattr(model, "patch_size", None) or getattr(getattr(model, "patch_embed", None), "patch_size", None)
    return int(size if isinstance(size, int) else size[0]) if size is not None else None


# --- metrics -----------------------------------------------------------------------------------
def label_sets(labels: torch.Tensor) -> torch.Tensor:
    """``(B,)`` class indices or ``(B, K)`` lists padded with -1, as ``(B, K)`` lists."""
    return labels[:, None] if labels.ndim == 1 else labels


def top1_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per image: is the highest-scoring class among its valid classes? One definition for clean and
    attacked images: ``argmax`` of the float32 softmax, so a tie goes to the lower class index."""
    pred = logits.float().softmax(-1).argmax(-1)
    return (pred[:, None] == label_sets(labels)).any(-1)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Per image: is any of the ``k`` highest-scoring classes among its valid classes?"""
    top = logits.topk(k, dim=-1).indices
    return (top[:, :, None] == label_sets(labels)[:, None, :]).any(-1).any(-1)


def label_set_nll(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``-log`` of the probability the model gives to the image's valid classes (their sum); with
    one class per image, the cross-entropy."""
    sets = label_sets(labels)
    log_p = logits.float().log_softmax(-1).gather(-1, sets.clamp_min(0)).masked_fill(sets < 0, float("-inf"))
    nll = -log_p.logsumexp(-1)
    return {"mean": nll.mean, "sum": nll.sum}.get(reduction, lambda: nll)()


def calibration_error(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> float:
    """Top-label ECE (L1): over equal-width bins of the top-1 confidence, [0, 1/15), ..., [14/15, 1],
    the gap between accuracy and mean confidence, weighted by the bin's share of the images.

    The float32 operations are torchmetrics' (``MulticlassCalibrationError``), so the digits are
    theirs, with one difference: a confidence of exactly 1.0 (a top logit ahead by about 17) falls in
    the last bin, where torchmetrics gives it a 16th bin of its own, which can only raise the error.
    """
    edges = torch.linspace(0, 1, n_bins + 1, dtype=confidence.dtype)
    index = (torch.bucketize(confidence, edges, right=True) - 1).clamp_(max=n_bins - 1)
    # n_bins + 1 slots, the last always empty, as torchmetrics lays them out: the same sums, the same digits
    count, conf_sum, acc_sum = (torch.zeros(n_bins + 1, dtype=confidence.dtype).scatter_add_(0, index, src)
                                for src in (torch.ones_like(confidence), confidence, correct.to(confidence.dtype)))
    gap = (torch.nan_to_num(acc_sum / count) - torch.nan_to_num(conf_sum / count)).abs()
    return torch.sum(gap * (count / count.sum())).item()


@dataclass
class Metrics:
    """Accumulates per-image top-1/top-5 correctness, NLL (:func:`label_set_nll`) and the 15-bin ECE
    (:func:`calibration_error`); labels are class indices or lists of valid classes
    (:data:`LABEL_LIST_METRICS`)."""

    num_classes: int

    def __post_init__(self) -> None:
        self.nll_sum, self.n = 0.0, 0
        self.label_lists = False
        self.correct: list[torch.Tensor] = []
        self.correct5: list[torch.Tensor] = []
        self.confidence: list[torch.Tensor] = []

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits, labels = logits.float().cpu(), labels.cpu()
        sets = label_sets(labels)
        if sets.max() >= self.num_classes or (sets[:, 0] < 0).any():
            bad = sets[(sets >= self.num_classes) | (sets[:, :1] < 0)].tolist()
            raise ValueError(f"label {bad[0]} is outside the model's {self.num_classes} classes: "
                             f"do --data and the model have the same classes?")
        self.label_lists |= labels.ndim == 2
        self.confidence.append(logits.softmax(-1).amax(-1))
        self.nll_sum += label_set_nll(logits, labels, "sum").item()
        self.n += len(labels)
        self.correct.append(top1_correct(logits, labels))
        self.correct5.append(topk_correct(logits, labels, min(5, self.num_classes)))

    def compute(self) -> dict[str, float]:
        if self.n == 0:
            raise ValueError("no samples were evaluated")
        return {"top1": self.per_sample_correct().double().mean().item(),
                "top5": torch.cat(self.correct5).double().mean().item(),
                "nll": self.nll_sum / self.n, "ece": calibration_error(torch.cat(self.confidence), self.per_sample_correct()),
                "n": self.n}

    def per_sample_correct(self) -> torch.Tensor:
        return torch.cat(self.correct)


# --- attacks -----------------------------------------------------------------------------------
def _to_pixels(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return x * std + mean


def pgd_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, steps: int = 10,
               step_size: Optional[float] = None, mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,),
               random_start: bool = False, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """L-inf PGD in pixel space on normalised inputs; ``steps=1, step_size=eps`` is FGSM.

    Returns normalised adversarial inputs whose pixels stay in [0, 1] and within ``eps`` of ``x``.
    """
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    pixels = _to_pixels(x, m, s).detach()
    step_size = eps if step_size is None else step_size
    adv = pixels.clone()
    if random_start:
        noise = torch.rand(pixels.shape, generator=generator, device="cpu").to(x.device) * 2 - 1
        adv = (adv + eps * noise).clamp(0, 1)
    was_training = model.training
    model.eval()
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = label_set_nll(model((adv - m) / s), y)
        (grad,) = torch.autograd.grad(loss, adv)
        adv = adv.detach() + step_size * grad.sign()
        adv = torch.min(torch.max(adv, pixels - eps), pixels + eps).clamp(0, 1)
    model.train(was_training)
    return ((adv - m) / s).detach()


def fgsm_attack(model, x, y, eps, *, mean=(0.0,), std=(1.0,)) -> torch.Tensor:
    return pgd_attack(model, x, y, eps, steps=1, step_size=eps, mean=mean, std=std)


def _same(a: Any, b: Any) -> bool:
    return list(a) == list(b) if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) else a == b


def _flag_values(name: str, value: Any) -> list[str]:
    """A ``lookhere eval`` setting's value as its flag takes it (``--eps 1/255,2/255``, ``--sizes 32 64``)."""
    if name == "eps":
        return [",".join(format_eps(e) for e in value)]
    if name == "adversarial":
        return [",".join(value)]
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def format_eps(eps: float) -> str:
    """``1/255`` for a whole number of grey levels, else the number: what :func:`parse_eps` reads back."""
    levels = eps * 255
    return f"{round(levels)}/255" if abs(levels - round(levels)) < 1e-9 else repr(eps)


def parse_eps(text: str) -> list[float]:
    """``"1/255,2/255"`` -> ``[1/255, 2/255]``."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        num, _, den = part.partition("/")
        try:
            out.append(float(num) / (float(den) if den else 1.0))
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"--eps {text!r}: expected numbers or fractions like 1/255, comma separated") from None
    if not out or not all(math.isfinite(e) and e >= 0 for e in out):
        raise ValueError(f"--eps {text!r}: expected finite, non-negative values")
    return out


# --- test-time knobs ----------------------------------------------------------------------------
def apply_knobs(model: nn.Module, **settings: Any) -> None:
    """Set test-time knobs of the model's encoding by key (``lh_global_slope=1.0``,
    ``rope_interpolate=True``...; None leaves one as it is). A knob the encoding lacks, or a value it
    does not allow, is an error."""
    for key, value in settings.items():
        if value is not None:
            apply_knob(model.pos_encoding, key, value)


def knob_grid(model: nn.Module, lh_slope_scales: Sequence[float] = (0.5, 2.0),
              size_ratio: Optional[float] = None) -> list[dict[str, Any]]:
    """The settings of the model's test-time knob worth trying, its current setting first; empty
    when its encoding has none. A numeric knob (LookHere's slope) is tried at ``lh_slope_scales``
    times its own value and, given ``size_ratio`` (training size / test size), at that ratio times
    it: penalties counted in training-grid patches, as RoPE's interpolation counts its coordinates."""
    pe = model.pos_encoding
    return [{knob.key: value} for knob in pe.test_knobs
            for value in knob.grid(pe.get_knob(knob.key), tuple(lh_slope_scales), size_ratio)]


def knob_label(setting: dict[str, Any]) -> str:
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in setting.items()) or "default"


def slope_rule(own: float, chosen: float, lh_slope_scales: Sequence[float], size_ratio: float) -> str:
    """Which rule(s) of :func:`knob_grid` a LookHere slope came from: ``own``, ``x0.5``, ``size ratio``..."""
    return GLOBAL_SLOPE.rule(own, chosen, tuple(lh_slope_scales), size_ratio)


# --- the sweep ---------------------------------------------------------------------------------
def _loader(ds, batch_size: int, workers: int) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate)


def scored(model: nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Logits as every number of an evaluation is measured, clean or attacked images alike: bf16
    autocast on CUDA (as training runs), float32 elsewhere."""
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return model(images.to(device))


def evaluate_size(model: nn.Module, ds, num_classes: int, *, batch_size: int = 64, workers: int = 0,
                  device: torch.device = torch.device("cpu"), progress: Optional[Callable] = None) -> Metrics:
    metrics = Metrics(num_classes)
    model.eval()
    for images, labels, _ in _loader(ds, batch_size, workers):
        if not len(labels):
            continue
        metrics.update(scored(model, images, device), labels)
        if progress:
            progress(len(labels))
    return metrics


def object_size_quintiles(sizes: np.ndarray) -> np.ndarray:
    """Quintile (0..4) of each sample's object size."""
    edges = np.quantile(sizes, [0.2, 0.4, 0.6, 0.8])
    return np.searchsorted(edges, sizes, side="right")


def _flag(help: str, default: Any = dataclasses.MISSING, **argparse_kwargs: Any) -> Any:
    """An :class:`EvalSettings` field that is also a ``lookhere eval`` flag (``--batch-size`` for
    ``batch_size``): its help, and argparse's keywords (``type`` may name one of the CLI's value types:
    count, split, attacks, eps)."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": argparse_kwargs})


@dataclass
class EvalSettings:
    """What ``lookhere eval`` measures, defined once: each field with a flag gives that flag, its
    help and default (the CLI builds its parser from them), a study's ``eval:`` key, and the
    argument list a study writes into each cell's command (:meth:`argv`)."""

    data: str = _flag(f"dataset: {', '.join(DATASETS)} (a Hub name or a local folder); default: the run's")
    sizes: list[int] = _flag("test image sizes (px)", type=int, nargs="+")
    train_size: Optional[int] = _flag(
        "the model's training size (default: its run's, its pretrained_cfg's, or its built size)", None, type="count")
    split: str = _flag("split; hf: data takes its own names and slices, e.g. 'train[99%:]'", "test", type="split")
    length: Optional[int] = _flag("evaluate the first LENGTH samples (synthetic: that many scenes)", None, type=int)
    data_root: Optional[str] = _flag("dataset folder (fashion-mnist) or cache folder (hf:); default: the run's", None)
    seed: int = _flag("seed of synthetic scenes and PGD starts (default: the run's, else 0)", 0, type=int)
    batch_size: int = _flag("images per forward", 64, type=int)
    workers: int = _flag("data-loading processes (use more for photographs)", 0, type=int)
    adversarial: tuple[str, ...] = _flag("comma-separated attacks: fgsm,pgd", (), type="attacks")
    eps: tuple[float, ...] = _flag("L-inf attack sizes in pixel units of [0, 1], comma separated (1/255: one grey "
                                   "level)", (1 / 255, 2 / 255), type="eps")
    pgd_steps: int = _flag("PGD steps", 10, type=int)
    adversarial_samples: int = _flag("images attacked", 256, type=int)
    by_object_size: bool = _flag("accuracy change from the training size per object-size quintile (synthetic data)",
                                 False, action="store_true")
    tune_knobs: bool = _flag("also evaluate each size but the training size with the encoding's knob setting "
                             "chosen on the val split", False, action="store_true")
    val_length: Optional[int] = _flag("validation samples for --tune-knobs (default: the split)", None, type=int)
    lh_slope_scales: tuple[float, ...] = _flag("multiples of a numeric knob's own value (LookHere's global slope) "
                                               "tried by --tune-knobs", (0.5, 2.0), type=float, nargs="+")
    num_classes: Optional[int] = None
    data_config: Optional[dict] = None  # photographs: timm data config (default: model_data_config)
    classes: Optional[dict] = None  # a folder's class indices, the training run's (its classes.json)

    @classmethod
    def flags(cls) -> list[dataclasses.Field]:
        """The fields that are ``lookhere eval`` flags, in the order the CLI lists them."""
        return [f for f in dataclasses.fields(cls) if "flag" in f.metadata]

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per field that declares one, with its help and argparse keywords; every flag
        defaults to None (not given), so :meth:`from_flags` can fall back to what the run says."""
        types = {"count": flags.count, "split": flags.split_name, "attacks": attack_names, "eps": str}
        for f in cls.flags():
            kwargs = dict(f.metadata["flag"])
            if isinstance(kwargs.get("type"), str):
                kwargs["type"] = types[kwargs["type"]]
            help = f.metadata["help"]
            if f.default not in (dataclasses.MISSING, None, (), False) and "default" not in help:
                help += f" (default: {' '.join(_flag_values(f.name, f.default))})"
            parser.add_argument("--" + f.name.replace("_", "-"), default=None, required=f.name == "sizes",
                                help=help.replace("%", "%%"), **kwargs)

    @classmethod
    def parse_argv(cls, argv: Sequence[str], **fallback: Any) -> tuple["EvalSettings", list[str]]:
        """The settings a ``lookhere eval`` argument list asks for, and the arguments that are not settings."""
        parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
        cls.add_flags(parser)
        known, rest = parser.parse_known_args(list(argv))
        return cls.from_flags(vars(known), **fallback), rest

    @classmethod
    def from_flags(cls, given: dict[str, Any], **fallback: Any) -> "EvalSettings":
        """Settings from flag values (None: not given), else ``fallback`` (what the run or the model
        says: its data, training size, seed), else the defaults. ``--eps`` may be text (``1/255,2/255``)."""
        names = {f.name for f in cls.flags()}
        kwargs = {k: v for k, v in fallback.items() if k not in names}
        for name in names:
            value = given.get(name)
            value = fallback.get(name) if value is None else value
            if value is None:
                continue
            if name == "eps" and isinstance(value, (str, list, tuple)):  # a study file may list them
                value = parse_eps(value if isinstance(value, str) else ",".join(map(str, value)))
            kwargs[name] = list(value) if name == "sizes" else tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)

    def argv(self, omit: Sequence[str] = ()) -> list[str]:
        """The ``lookhere eval`` flags that give these settings: those that differ from the defaults
        (``--sizes`` always), but the fields in ``omit``."""
        out: list[str] = []
        for f in self.flags():
            value = getattr(self, f.name)
            if f.name in omit or (f.name != "sizes" and f.default is not dataclasses.MISSING
                                  and _same(value, f.default)):
                continue
            flag = "--" + f.name.replace("_", "-")
            out += [flag] if isinstance(value, bool) else [flag, *_flag_values(f.name, value)]
        return out

    def check(self, patch_size: Optional[int] = None) -> None:
        """Refuse, before any work, settings whose results cannot be produced."""
        if not self.sizes:
            raise ValueError("--sizes: give at least one size")
        for size in self.sizes:
            if size < 1:
                raise ValueError(f"--sizes: {size} px; sizes must be >= 1")
            if patch_size and size % patch_size:
                raise ValueError(f"--sizes: {size} px is not a multiple of the patch size {patch_size}")
        unknown = [a for a in self.adversarial if a not in ATTACKS]
        if unknown:
            raise ValueError(f"--adversarial {','.join(unknown)}: unknown attack; allowed: {', '.join(ATTACKS)}")
        if self.adversarial and not self.eps:
            raise ValueError("--eps: give at least one value for --adversarial")
        train_size = self.train_size or self.sizes[0]
        for flag, on in (("--adversarial", bool(self.adversarial)), ("--by-object-size", self.by_object_size)):
            if on and train_size not in self.sizes:
                raise ValueError(f"{flag} measures at the training size, {train_size} px, which is not among "
                                 f"--sizes {' '.join(map(str, self.sizes))}: add it (or set --train-size)")
        for flag in ("batch_size", "adversarial_samples", "pgd_steps"):
            if getattr(self, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(self, flag)}")
        for flag in ("length", "val_length"):
            if getattr(self, flag) is not None and getattr(self, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(self, flag)}")
        if not all(math.isfinite(s) and s >= 0 for s in self.lh_slope_scales):
            raise ValueError(f"--lh-slope-scales {' '.join(map(str, self.lh_slope_scales))}: scales must be "
                             f"finite and >= 0")
        # A setting that only another one reads is refused without it, not silently ignored.
        readers = {"val_length": ("--tune-knobs", self.tune_knobs), "lh_slope_scales": ("--tune-knobs", self.tune_knobs),
                   "eps": ("--adversarial", bool(self.adversarial)),
                   "adversarial_samples": ("--adversarial", bool(self.adversarial)),
                   "pgd_steps": ("--adversarial pgd", "pgd" in self.adversarial)}
        defaults = {f.name: f.default for f in self.flags()}
        for name, (reader, on) in readers.items():
            value = getattr(self, name)
            if not on and not _same(value, defaults[name]):
                raise ValueError(f"{flags.flag(name)} {' '.join(_flag_values(name, value))} is read only by "
                                 f"{reader}: add {reader}, or leave out {flags.flag(name)}")
        if self.tune_knobs and reads_val(self.split):
            raise ValueError(f"--tune-knobs chooses each knob on the validation split, which --split "
                             f"{self.split} reads: the choice would be marked on its own images; evaluate "
                             f"another split, or leave out --tune-knobs")


def _split(settings: EvalSettings, size: int, split: str, length: Optional[int]):
    spec = DataSpec(settings.data, size, None, settings.seed, settings.data_root, data_config=settings.data_config,
                    classes=settings.classes)
    return build_dataset(spec, split, train=False, length=length)


def _change_by_quintile(correct_by_size: dict[int, torch.Tensor], train_size: int, q: np.ndarray) -> dict:
    """Per size, the accuracy change from the training size within each object-size quintile."""
    base = correct_by_size[train_size].float()
    table = {}
    for size, corr in correct_by_size.items():
        row = []
        for b in range(5):
            sel = torch.from_numpy(q == b)
            row.append(float(corr.float()[sel].mean() - base[sel].mean()) if sel.any() else math.nan)
        table[str(size)] = row
    return table


def run_eval(model: nn.Module, settings: EvalSettings, *, device: str | torch.device = "cpu",
             progress: bool = True) -> dict[str, Any]:
    """Metrics at each size (plus attacks at the training size and object-size buckets).

    With ``settings.tune_knobs``, each size other than the training size is evaluated again with
    the setting of the model's test-time knob (:func:`knob_grid`) that scores the best top-1 on the
    validation split (ties: the model's own setting): ``results["tuned"]`` and ``results["knobs"]``.
    The test split never takes part in the choice.
    """
    from tqdm import tqdm

    settings.check(patch_size_of(model))
    device = torch.device(device)
    model = model.to(device).eval()
    train_size = settings.train_size or settings.sizes[0]
    if settings.data_config is None:
        settings = dataclasses.replace(settings, data_config=model_data_config(model, train_size))
    num_classes = settings.num_classes or model.num_classes
    results: dict[str, Any] = {"data": settings.data, "split": settings.split, "train_size": train_size,
                               "sizes": {}, "adversarial": {}, "by_object_size": None, "environment": environment()}

    def measure(ds, label: str) -> Metrics:
        bar = tqdm(total=len(ds), desc=label, unit="img", disable=not progress, leave=False)
        m = evaluate_size(model, ds, num_classes, batch_size=settings.batch_size, workers=settings.workers,
                          device=device, progress=bar.update)
        bar.close()
        return m

    test = {size: _split(settings, size, settings.split, settings.length) for size in settings.sizes}
    if settings.by_object_size and not hasattr(test[train_size], "object_size"):
        raise ValueError(f"--by-object-size: dataset {settings.data!r} does not know its object sizes")
    correct: dict[int, torch.Tensor] = {}
    for size, ds in test.items():
        m = measure(ds, f"{size}px")
        results["sizes"][str(size)] = m.compute()
        correct[size] = m.per_sample_correct()
        if m.label_lists:
            results["label_lists"] = LABEL_LIST_METRICS
        if size == train_size and settings.adversarial:
            results["adversarial"] = _adversarial(model, ds, settings, device)

    tuned_correct: dict[int, torch.Tensor] = {}
    if settings.tune_knobs:
        results["tuned"], results["knobs"] = {}, {}
        for size, ds in test.items():
            grid = knob_grid(model, settings.lh_slope_scales, size_ratio=train_size / size)
            choice, scores = (grid[0] if grid else {}), {}
            if size != train_size and len(grid) > 1:
                val = _split(settings, size, "val", settings.val_length)
                for setting in grid:
                    apply_knobs(model, **setting)
                    scores[knob_label(setting)] = measure(val, f"val {size}px {knob_label(setting)}").compute()["top1"]
                choice = grid[max(range(len(grid)), key=lambda i: (scores[knob_label(grid[i])], -i))]
            if choice == (grid[0] if grid else {}):
                results["tuned"][str(size)], tuned_correct[size] = results["sizes"][str(size)], correct[size]
            else:
                apply_knobs(model, **choice)
                m = measure(ds, f"{size}px {knob_label(choice)}")
                results["tuned"][str(size)], tuned_correct[size] = m.compute(), m.per_sample_correct()
            if grid:
                apply_knobs(model, **grid[0])
            results["knobs"][str(size)] = {"setting": choice, "val_top1": scores}
            for knob in model.pos_encoding.test_knobs:
                rule = knob.rule(grid[0][knob.key], choice[knob.key], tuple(settings.lh_slope_scales),
                                 train_size / size) if knob.key in choice else None
                if rule is not None:  # a numeric knob: which multiple of its own value won
                    results["knobs"][str(size)]["rule"] = rule

    if settings.by_object_size:
        ds = test[train_size]
        sizes_of_objects = np.array([ds.object_size(i) for i in range(len(ds))])
        q = object_size_quintiles(sizes_of_objects)
        edges = np.quantile(sizes_of_objects, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]).tolist()
        results["by_object_size"] = {"quintile_edges": edges, "accuracy_change": _change_by_quintile(correct, train_size, q)}
        if tuned_correct:
            results["by_object_size"]["accuracy_change_tuned"] = _change_by_quintile(tuned_correct, train_size, q)
    return results


def _adversarial(model, ds, settings: EvalSettings, device) -> dict[str, Any]:
    device = torch.device(device)
    mean, std = getattr(ds, "mean", (0.0,)), getattr(ds, "std", (1.0,))
    n = min(settings.adversarial_samples, len(ds))
    subset = Subset(ds, range(n))
    out: dict[str, Any] = {"n": n}
    gen = torch.Generator().manual_seed(settings.seed)
    for attack in settings.adversarial:
        for eps in settings.eps:
            correct = total = 0
            for images, labels, _ in _loader(subset, settings.batch_size, settings.workers):
                images, labels = images.to(device), labels.to(device)
                if attack == "fgsm":
                    adv = fgsm_attack(model, images, labels, eps, mean=mean, std=std)
                else:
                    adv = pgd_attack(model, images, labels, eps, steps=settings.pgd_steps,
                                     step_size=2.5 * eps / settings.pgd_steps, mean=mean, std=std,
                                     random_start=True, generator=gen)
                correct += top1_correct(scored(model, adv, device), labels).sum().item()
                total += len(labels)
            out[f"{attack}@{eps * 255:g}/255"] = correct / max(total, 1)
    return out


# --- writing -----------------------------------------------------------------------------------
def markdown_table(results: dict[str, Any], name: str = "model") -> str:
    lines = [f"| {name} | size | top-1 | top-5 | NLL | ECE |", "|---|---:|---:|---:|---:|---:|"]
    if results.get("knobs_given"):
        lines = [f"Every size with the test-time setting given: {knob_label(results['knobs_given'])}", ""] + lines
    for size, m in results["sizes"].items():
        lines.append(f"| | {size} | {m['top1']:.4f} | {m['top5']:.4f} | {m['nll']:.4f} | {m['ece']:.4f} |")
    if results.get("label_lists"):
        lines += ["", results["label_lists"]]
    if results.get("tuned"):
        lines += ["", "With each size's test-time setting chosen on the validation split:", "",
                  "| size | setting | val top-1 per setting | top-1 | NLL | ECE |", "|---:|---|---|---:|---:|---:|"]
        for size, m in results["tuned"].items():
            k = results["knobs"][size]
            tried = ", ".join(f"{lab}: {v:.3f}" for lab, v in k["val_top1"].items()) or "-"
            lines.append(f"| {size} | {knob_label(k['setting'])} | {tried} | {m['top1']:.4f} | {m['nll']:.4f} | {m['ece']:.4f} |")
    if results.get("adversarial"):
        lines += ["", "| attack (at the training size) | robust top-1 |", "|---|---:|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in results["adversarial"].items() if k != "n"]
    if results.get("by_object_size"):
        edges = results["by_object_size"]["quintile_edges"]
        heads = [f"{edges[i]:.2f}-{edges[i + 1]:.2f}" for i in range(5)]
        lines += ["", "Accuracy change from the training size, by object-size quintile (object side / image side):",
                  "", "| size | " + " | ".join(heads) + " |", "|---:|" + "---:|" * 5]
        for size, row in results["by_object_size"]["accuracy_change"].items():
            lines.append(f"| {size} | " + " | ".join(f"{v:+.4f}" for v in row) + " |")
    return "\n".join(lines) + "\n"


def plot_accuracy(runs: dict[str, dict[str, Any]], path: str | Path, metric: str = "top1") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, res in runs.items():
        sizes = sorted(int(s) for s in res["sizes"])  # a curve over size, whatever the order of --sizes
        ax.plot(sizes, [res["sizes"][str(s)][metric] for s in sizes], marker="o", label=name)
        ax.axvline(res.get("train_size", sizes[0]), color="grey", lw=0.6, ls=":")
    ax.set_xlabel("test image size (px); dotted: training size")
    ax.set_ylabel(metric)
    ax.set_xscale("log", base=2)
    tested = sorted({int(s) for res in runs.values() for s in res["sizes"]})
    ax.set_xticks(tested, labels=[str(s) for s in tested])  # each tested size, not only the powers of 2
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def write_results(results: dict[str, Any], out_dir: str | Path, name: str = "model") -> dict[str, str]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.md").write_text(markdown_table(results, name))
    plot_accuracy({name: results}, out / "accuracy_vs_size.png")
    # last, and whole: a study takes eval.json for a finished cell, so a kill or a crash leaves none or all of it
    write_atomic(out / "eval.json", lambda p: p.write_text(json.dumps(results, indent=2)))
    return {"json": str(out / "eval.json"), "markdown": str(out / "eval.md"), "plot": str(out / "accuracy_vs_size.png")}
