"""Our own model files: ``model.safetensors`` (weights) next to ``config.json`` (a ViTConfig)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .vit import ViTConfig, VisionTransformer

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def write_atomic(path: Path, write) -> None:
    """``write(tmp)`` then rename over ``path``: a kill leaves the old file or the new, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_model(model: VisionTransformer, directory: str | os.PathLike) -> Path:
    """Write weights and config atomically (each file is written aside, then renamed).

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
    write_atomic(d / WEIGHTS, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    write_atomic(d / CONFIG, lambda p: p.write_text(config.to_json()))
    return d


def load_model(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> VisionTransformer:
    """Rebuild a model saved by :func:`save_model`, in eval mode."""
    d = Path(directory)
    if not (d / CONFIG).is_file() or not (d / WEIGHTS).is_file():
        raise FileNotFoundError(f"{d}: expected {CONFIG} and {WEIGHTS} (written by lookhere.save_model)")
    try:
        config = ViTConfig.from_dict(json.loads((d / CONFIG).read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"{d / CONFIG}: not a valid lookhere model config: {e}") from e
    model = VisionTransformer(**config.to_dict())
    try:
        state = load_file(str(d / WEIGHTS), device=str(map_location))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{d / WEIGHTS}: unreadable safetensors file: {e}") from e
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{d / WEIGHTS}: weights do not match {d / CONFIG}: {str(e).splitlines()[0]}") from e
    return model.eval()
