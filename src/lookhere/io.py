"""Model files: our own (``model.safetensors`` next to ``config.json``, a ViTConfig) and the released
LookHere checkpoints, read and checked by ``official.py``, built into our ViT here."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .official import not_released, read_official
from .vit import LOOKHERE_ARCH, ViTConfig, VisionTransformer, create_vit

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def tensor_digest(named: Iterable[tuple[str, Any]]) -> str:
    """SHA-256 of named tensors (names, dtypes, shapes and bytes, in order): a fingerprint of weights or data."""
    h = hashlib.sha256()
    for name, t in named:
        t = torch.as_tensor(t).detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def sync_to_disk(path: Path) -> None:
    """Flush a file's bytes (or a folder's entries) to the disk, so that a rename after it survives a
    machine crash as well as a kill."""
    folder = path.is_dir()
    if folder and os.name != "posix":  # only POSIX opens a folder to flush it
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not folder:  # some file systems (FUSE mounts) cannot flush a folder: the files are, which matters most
            raise
    finally:
        os.close(fd)


def write_atomic(path: Path, write) -> None:
    """``write(tmp)``, flushed to the disk, then renamed over ``path``: a kill or a crash of the machine
    leaves the old file or the new, never half of one."""
    write_atomic_all({path: write})


def write_atomic_all(writes: dict[Path, Any]) -> None:
    """:func:`write_atomic` for files that belong together: every file is written and flushed aside
    before the first is renamed, so a failed or killed write leaves the old set whole."""
    tmps = {path: path.with_name(path.name + ".tmp") for path in writes}
    for path, write in writes.items():
        write(tmps[path])
        sync_to_disk(tmps[path])
    for path, tmp in tmps.items():
        os.replace(tmp, path)
    for folder in dict.fromkeys(path.parent for path in writes):
        sync_to_disk(folder)


def read_yaml(path: Path) -> Any:
    """A YAML file's contents; a file that is not YAML (or not text) is one ValueError naming it and the
    line at fault."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        why = (getattr(e, "problem", None) or str(e).strip().splitlines()[0]) + (
            f" at line {mark.line + 1}, column {mark.column + 1}" if mark else "")
        raise ValueError(f"{path}: not valid YAML ({why})") from None


def save_model(model: VisionTransformer, directory: str | os.PathLike) -> Path:
    """Write weights and config atomically (both are written aside, then renamed).

    The config is the model's current one (``model.config``): a classifier reset or a changed
    LookHere slope is saved too.
    """
    config = model.config
    if len(model.blocks) != config.depth or isinstance(model.norm, torch.nn.Identity):
        raise ValueError("save_model: this model was cut by prune_intermediate_layers and its config cannot "
                         "rebuild it; save the model before pruning, or save its state_dict with torch.save")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    write_atomic_all({d / WEIGHTS: lambda p: save_file(state, str(p), metadata={"format": "pt"}),
                      d / CONFIG: lambda p: p.write_text(config.to_json())})
    return d


def load_model(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> VisionTransformer:
    """Rebuild a model saved by :func:`save_model`, in eval mode, on ``map_location``."""
    d = Path(directory)
    if not (d / CONFIG).is_file() or not (d / WEIGHTS).is_file():
        raise FileNotFoundError(f"{d}: expected {CONFIG} and {WEIGHTS} (written by lookhere.save_model)")
    try:
        config = ViTConfig.from_dict(json.loads((d / CONFIG).read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"{d / CONFIG}: not a valid lookhere model config: {e}") from e
    model = VisionTransformer(**config.to_dict())
    try:
        state = load_file(str(d / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{d / WEIGHTS}: unreadable safetensors file: {e}") from e
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{d / WEIGHTS}: weights do not match {d / CONFIG}: {str(e).splitlines()[0]}") from e
    return model.to(map_location).eval()


def load_official(path: str | os.PathLike, *, num_heads: int = 12) -> "VisionTransformer":
    """A released LookHere checkpoint as our ViT, in eval mode, at any image size.

    Width, depth, patch size, MLP ratio, head and classes come from the weights; the LookHere config
    from the file; drop-path is the paper's (for finetuning), as in the timm ``.in1k`` variants.
    """
    config, w = read_official(path)
    embed_dim = w["cls_token"].shape[-1]
    patch = w["patch_embed.proj.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in w if (m := re.match(r"blocks\.(\d+)\.", k)))
    if "head.fc2.weight" in w:
        num_classes, head_hidden = w["head.fc2.weight"].shape[0], w["head.fc1.weight"].shape[0]
    elif "head.weight" in w:
        num_classes, head_hidden = w["head.weight"].shape[0], None
    else:
        num_classes, head_hidden = 0, None
    if embed_dim % num_heads:
        raise ValueError(f"{path}: width {embed_dim} is not divisible by num_heads={num_heads}")
    model = create_vit(
        pos_encoding="lookhere", lookhere_config=config.to_dict(), img_size=224 // patch[-1] * patch[-1],
        patch_size=patch[-1], in_chans=patch[1], embed_dim=embed_dim, depth=depth, num_heads=num_heads,
        num_classes=num_classes, mlp_ratio=w["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        qkv_bias="blocks.0.attn.qkv.bias" in w, head_hidden_dim=head_hidden,
        **dict(LOOKHERE_ARCH, init_values=1.0 if "blocks.0.ls1.gamma" in w else None),
    )
    try:
        result = model.load_state_dict(w, strict=False)
    except RuntimeError as e:  # a tensor of the wrong shape
        raise not_released(path, f"weights do not fit a ViT: {str(e).splitlines()[-1].strip()}") from e
    if result.missing_keys or result.unexpected_keys:
        raise not_released(path, f"weights do not fit a ViT: missing {result.missing_keys[:5]}, "
                          f"unexpected {result.unexpected_keys[:5]}")
    return model.eval()


def load_trained(path: str | os.PathLike, *, num_heads: int = 12, weights: str = "best") -> tuple[VisionTransformer, str]:
    """A model from a run directory (its ``weights`` checkpoint, else best, else last), a model folder
    or a released ``.pth`` file, and which of the three it was."""
    p = Path(path)
    if p.is_file():
        return load_official(p, num_heads=num_heads), "released file"
    if (p / "config.yaml").is_file():
        for name in (weights, "best", "last"):
            if (p / name / WEIGHTS).is_file():
                return load_model(p / name), "run directory"
        raise FileNotFoundError(f"{p}: a run directory without a checkpoint yet (no best/ or last/)")
    if (p / CONFIG).is_file():
        return load_model(p), "model folder"
    raise FileNotFoundError(f"{p}: not a run directory, model directory or checkpoint file")
