"""Training that never loses work: exact resume, atomic checkpoints, torchrun/DDP.

A run directory holds ``config.yaml`` (the :class:`TrainConfig`), ``metrics.jsonl`` (one JSON
record per logged step and per epoch), TensorBoard events, and checkpoints ``last/`` and ``best/``.
A checkpoint is a folder: ``model.safetensors`` + ``config.json`` (loadable by
``lookhere.load_model``), ``ema.safetensors`` when EMA is on, and ``state.pt`` (optimizer,
scheduler, RNG states and the position in the data), written beside and swapped in by renames.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import yaml
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, DistributedSampler

from .data import DataSpec, build_dataset, collate
from .data.factory import num_classes_of
from .io import save_model
from .vit import SIZES, VisionTransformer, create_vit

MODEL_SIZES = {"micro": dict(embed_dim=96, depth=6, num_heads=12), **SIZES}


@dataclass
class TrainConfig:
    """Every setting of a run; round-trips through YAML/JSON and maps one-to-one onto CLI flags."""

    data: str = "synthetic"
    data_root: Optional[str] = None
    data_length: Optional[int] = None
    num_classes: Optional[int] = None
    pos_encoding: str = "lh-90"
    lookhere_config: Optional[dict] = None
    pos_options: Optional[dict] = None
    model: str = "tiny"
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    img_size: int = 32
    patch_size: int = 4
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 0.1
    label_smoothing: float = 0.1
    clip_grad: Optional[float] = 1.0
    mixup: float = 0.0
    cutmix: float = 0.0
    ema_decay: Optional[float] = None
    drop_path: float = 0.0
    init_values: Optional[float] = 0.1
    seed: int = 0
    output: str = "runs/run"
    resume: Optional[str] = None
    workers: int = 0
    device: str = "auto"
    log_every: int = 10
    checkpoint_every: int = 100
    max_steps: Optional[int] = None
    progress: bool = True

    # fields that may change on resume; everything else must match the run being resumed
    RESUMABLE_CHANGES = ("resume", "output", "workers", "device", "log_every", "checkpoint_every", "progress",
                         "max_steps", "epochs", "data_root")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown training setting(s) {sorted(unknown)}; allowed: {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "TrainConfig":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} does not exist")
        d = yaml.safe_load(p.read_text()) or {}
        if not isinstance(d, dict):
            raise ValueError(f"{p}: expected a mapping of settings, got {type(d).__name__}")
        return cls.from_dict({k.replace("-", "_"): v for k, v in d.items()})

    def model_kwargs(self, num_classes: int) -> dict[str, Any]:
        if self.model not in MODEL_SIZES:
            raise ValueError(f"--model {self.model!r}; allowed: {', '.join(MODEL_SIZES)}")
        size = dict(MODEL_SIZES[self.model])
        for k in ("embed_dim", "depth", "num_heads"):
            if getattr(self, k) is not None:
                size[k] = getattr(self, k)
        return dict(pos_encoding=self.pos_encoding, lookhere_config=self.lookhere_config,
                    pos_options=self.pos_options, img_size=self.img_size, patch_size=self.patch_size,
                    num_classes=num_classes, drop_path_rate=self.drop_path, init_values=self.init_values, **size)

    def validate(self) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(f"--img-size {self.img_size} is not a multiple of --patch-size {self.patch_size}")
        for k in ("epochs", "batch_size"):
            if getattr(self, k) < 1:
                raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(self, k)}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")


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


class ResumableSampler(DistributedSampler):
    """torch's DistributedSampler that can start part-way through an epoch (for exact resume)."""

    start = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


# --- checkpoints -----------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
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
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(run_dir: Path) -> Optional[Path]:
    """``last/``, or ``last.old/`` when a crash fell between the two renames of a swap."""
    for name in ("last", "last.old"):
        p = run_dir / name
        if (p / "state.pt").is_file() and (p / "model.safetensors").is_file():
            return p
    return None


# --- the loop --------------------------------------------------------------------------------
def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _check_resume(cfg: TrainConfig, run_dir: Path) -> None:
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise FileNotFoundError(f"--resume {run_dir}: no config.yaml there; is it a lookhere run directory?")
    saved = TrainConfig.from_yaml(saved_path).to_dict()
    mine = cfg.to_dict()
    diffs = [f"{k}: run has {saved[k]!r}, now {mine[k]!r}" for k in mine
             if k not in TrainConfig.RESUMABLE_CHANGES and saved.get(k) != mine[k]]
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


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training; returns the final metrics. Rank 0 logs and checkpoints."""
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import param_groups_weight_decay
    from timm.scheduler import CosineLRScheduler
    from timm.utils import ModelEmaV3
    from tqdm import tqdm

    cfg.validate()
    device = _device(cfg.device)
    d = init_distributed(device)
    if d.world > 1 and device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    if cfg.batch_size % d.world:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by the {d.world} processes")
    run_dir = Path(cfg.resume or cfg.output)
    if cfg.resume:
        _check_resume(cfg, run_dir)

    spec = DataSpec(cfg.data, cfg.img_size, cfg.data_length, cfg.seed, cfg.data_root)
    train_ds, val_ds = build_dataset(spec, "train"), build_dataset(spec, "val")
    num_classes = cfg.num_classes or num_classes_of(train_ds)

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    model: nn.Module = create_vit(**cfg.model_kwargs(num_classes)).to(device)
    raw = model
    if d.world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    ema = ModelEmaV3(raw, decay=cfg.ema_decay) if cfg.ema_decay else None

    per_rank = cfg.batch_size // d.world
    sampler = ResumableSampler(train_ds, num_replicas=d.world, rank=d.rank, shuffle=True, seed=cfg.seed,
                               drop_last=True)
    steps_per_epoch = sampler.num_samples // per_rank
    if steps_per_epoch < 1:
        raise ValueError(f"the training split has {len(train_ds)} samples, fewer than one batch of {cfg.batch_size}")
    total_steps = cfg.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(param_groups_weight_decay(raw, cfg.weight_decay, no_weight_decay_list=raw.no_weight_decay()),
                                  lr=cfg.lr)
    scheduler = CosineLRScheduler(optimizer, t_initial=total_steps, lr_min=cfg.min_lr,
                                  warmup_t=int(cfg.warmup_epochs * steps_per_epoch), warmup_lr_init=cfg.lr * 1e-3,
                                  t_in_epochs=False)
    mix = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mix = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                    num_classes=num_classes)
        criterion: nn.Module = SoftTargetCrossEntropy()
    else:
        criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    step, best, skipped_total = 0, -1.0, 0
    ckpt = find_checkpoint(run_dir) if cfg.resume else None
    if cfg.resume and ckpt is None and d.main:
        print(f"--resume {run_dir}: no checkpoint yet, starting from the beginning", file=sys.stderr)
    if ckpt is not None:
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
        raw.load_state_dict(load_file(str(ckpt / "model.safetensors"), device=str(device)))
        if ema is not None and (ckpt / "ema.safetensors").is_file():
            ema.module.load_state_dict(load_file(str(ckpt / "ema.safetensors"), device=str(device)))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, best, skipped_total = state["step"], state["best"], state["skipped"]
        _set_rng_state(state["rng"][min(d.rank, len(state["rng"]) - 1)])
    elif d.main:
        if run_dir.exists() and (run_dir / "config.yaml").exists() and not cfg.resume:
            raise FileExistsError(f"--output {run_dir} already holds a run; use --resume {run_dir} or another --output")
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not cfg.resume:
            (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if d.world > 1:
        dist.barrier()

    writer = None
    if d.main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tb"))
    metrics_file = open(run_dir / "metrics.jsonl", "a") if d.main else None

    def log(record: dict[str, Any]) -> None:
        if metrics_file is None:
            return
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        prefix = "train" if record["kind"] == "step" else "epoch"
        for k, v in record.items():
            if isinstance(v, (int, float)) and k not in ("step", "epoch", "kind"):
                writer.add_scalar(f"{prefix}/{k}", v, record["step"])

    def checkpoint(name: str) -> None:
        rng = [_rng_state()]
        if d.world > 1:
            gathered: list[Any] = [None] * d.world
            dist.all_gather_object(gathered, rng[0])
            rng = gathered
        if d.main:
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                     "best": best, "skipped": skipped_total, "rng": rng}
            write_checkpoint(run_dir / name, raw, ema, state)

    val_sampler = DistributedSampler(val_ds, num_replicas=d.world, rank=d.rank, shuffle=False) if d.world > 1 else None
    # Loaders get generators of their own: creating one must not draw from the global RNG, or a run
    # resumed mid-epoch would see different dropout and mixup draws than an uninterrupted one.
    val_loader = DataLoader(val_ds, batch_size=per_rank, sampler=val_sampler, num_workers=cfg.workers,
                            collate_fn=collate, generator=torch.Generator().manual_seed(cfg.seed))
    last_val: dict[str, float] = {}
    limit = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    bar = tqdm(total=limit, initial=min(step, limit), disable=not (d.main and cfg.progress), unit="step",
               dynamic_ncols=True)
    while step < limit:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)
        sampler.start = in_epoch * per_rank
        loader = DataLoader(train_ds, batch_size=per_rank, sampler=sampler, num_workers=cfg.workers,
                            collate_fn=collate, drop_last=True,
                            generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
        model.train()
        t0, seen = time.perf_counter(), 0
        for images, labels, skipped in loader:
            skipped_total += skipped
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if mix is not None and len(labels) % 2 == 0 and len(labels):
                images, targets = mix(images, labels)
            else:
                targets = labels
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(images)
            loss = criterion(logits.float(), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(raw.parameters(), cfg.clip_grad) if cfg.clip_grad else None
            optimizer.step()
            step += 1
            scheduler.step_update(num_updates=step)
            if ema is not None:
                ema.update(raw, step=step)
            seen += len(labels) * d.world
            ips = seen / max(time.perf_counter() - t0, 1e-9)
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}", img_s=f"{ips:.0f}")
            if step % cfg.log_every == 0 or step == limit:
                log({"kind": "step", "step": step, "epoch": epoch, "loss": loss.item(),
                     "lr": optimizer.param_groups[0]["lr"], "images_per_s": ips,
                     "grad_norm": float(grad_norm) if grad_norm is not None else None, "skipped": skipped_total})
            end_of_epoch = step % steps_per_epoch == 0
            if end_of_epoch:
                last_val = evaluate(raw, val_loader, device, d)
                record = {"kind": "epoch", "step": step, "epoch": epoch, "val_acc": last_val["acc"],
                          "val_loss": last_val["loss"], "skipped": skipped_total}
                if ema is not None:
                    ev = evaluate(ema.module, val_loader, device, d)
                    record.update(val_acc_ema=ev["acc"], val_loss_ema=ev["loss"])
                log(record)
                if d.main:
                    bar.write(f"epoch {epoch}: val acc {last_val['acc']:.4f}, val loss {last_val['loss']:.4f}")
                if last_val["acc"] > best:
                    best = last_val["acc"]
                    checkpoint("best")
            if end_of_epoch or step % cfg.checkpoint_every == 0 or step == limit:
                checkpoint("last")
            if step >= limit:
                break
    bar.close()
    if skipped_total and d.main:
        print(f"warning: {skipped_total} unreadable samples were skipped", file=sys.stderr)
    if metrics_file is not None:
        metrics_file.close()
        writer.close()
    return {"step": step, "best_val_acc": best, "val": last_val, "run_dir": str(run_dir), "model": raw}
