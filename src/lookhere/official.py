"""The released LookHere checkpoints (``LH_*_weights_and_config.pth``): reading, checking, loading.

A released file is a plain pickle ``{"config": <LookHere config dict>, "weights": <ViT state dict>}``.
One path reads it whether it comes through ``lookhere.load_official`` (``io.py``, which builds the model)
or through timm's pretrained
loading (``timm.create_model("vit_base_patch16_lookhere_90.in1k", pretrained=True)``, which calls
:func:`checkpoint_filter_fn`): the file is opened with ``torch.load(weights_only=True)`` (tensors and
plain containers only, never arbitrary pickled code), its config is validated, and its keys are mapped.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from timm.models import clean_state_dict

from .config import PRESETS, LookHereConfig

_REQUIRED = ("cls_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight",
             "norm.weight")
EXPECTED = ("expected a torch.save'd dict with 'config' (the LookHere config dict) and 'weights' "
            "(a ViT state dict)")


def not_released(source: Any, why: str) -> ValueError:
    return ValueError(f"{source}: not a released LookHere checkpoint ({why}); {EXPECTED}")


def is_released(obj: Any) -> bool:
    """Whether a loaded checkpoint has the released layout (a config next to the weights)."""
    return isinstance(obj, Mapping) and "config" in obj and "weights" in obj


def released_checkpoint(obj: Any, source: Any) -> tuple[LookHereConfig, dict[str, torch.Tensor]]:
    """The validated config and the state dict, keys in our layout, of a loaded released checkpoint.

    ``source`` names the file in messages. Keys lose DDP / ``torch.compile`` prefixes in any order
    (``module.``, ``_orig_mod.``, ``_orig_mod.module.``); the published ViT's unused ``pos_embed`` is dropped.
    """
    if not is_released(obj):
        raise not_released(source, f"found {sorted(map(str, obj))[:8] if isinstance(obj, Mapping) else type(obj).__name__}")
    if not isinstance(obj["weights"], Mapping):
        raise not_released(source, "'weights' is not a state dict")
    odd = next(((k, v) for k, v in obj["weights"].items() if not isinstance(k, str) or not torch.is_tensor(v)), None)
    if odd:
        raise not_released(source, f"'weights' holds {odd[0]!r}, a {type(odd[1]).__name__}, not a tensor"
                           if isinstance(odd[0], str) else f"'weights' has a key {odd[0]!r} that is not a name")
    try:
        config = LookHereConfig.from_dict(obj["config"])
    except (TypeError, ValueError) as e:
        raise not_released(source, f"bad 'config': {e}") from e
    weights = {k: v for k, v in clean_state_dict(dict(obj["weights"])).items() if k != "pos_embed"}
    missing = [k for k in _REQUIRED if k not in weights]
    if missing:
        raise not_released(source, f"weights lack {missing}")
    return config, weights


def load_error(e: BaseException) -> str:
    """One line on why ``torch.load(weights_only=True)`` refused a file. torch's own advice (retry
    with ``weights_only=False``) is not ours to give for a file of unknown origin."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "weights_only" in str(e):
        return ("not a checkpoint of plain tensors (opened with torch.load(weights_only=True)): "
                "a damaged file, another format, or one that holds Python objects")
    return first


def read_official(path: str | os.PathLike) -> tuple[LookHereConfig, dict[str, torch.Tensor]]:
    """The LookHere config and the state dict (keys in our layout) of a released checkpoint file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a foreign file fails torch.load in many ways (a text file: KeyError)
        raise not_released(path, f"unreadable or unsafe: {load_error(e)}") from e
    return released_checkpoint(obj, path)


def _variant_of(config: LookHereConfig) -> str:
    for name, preset in PRESETS.items():
        if LookHereConfig.from_dict(preset) == config:
            return f"the {name} preset, timm's vit_base_patch16_lookhere_{name[3:]}.in1k"
    return "no preset"


def checkpoint_filter_fn(state_dict: dict, model: torch.nn.Module) -> dict:
    """timm's pretrained filter: a released checkpoint, or a state dict with wrapper keys and prefixes.

    A released checkpoint is refused, naming both configs, when its LookHere config is not the model's:
    its weights were trained with those attention masks and penalties and mean nothing under others.
    """
    if is_released(state_dict):
        config, weights = released_checkpoint(state_dict, "pretrained checkpoint")
        ours = getattr(model.pos_encoding, "config", None)
        if not isinstance(ours, LookHereConfig):
            raise ValueError(f"pretrained checkpoint: a released LookHere checkpoint (config {config.to_dict()}) "
                             f"cannot load into a model with pos_encoding={model.config.pos_encoding!r}; "
                             f"use lookhere.load_official(path)")
        if ours != config:
            raise ValueError(
                f"pretrained checkpoint: its LookHere config {config.to_dict()} ({_variant_of(config)}) differs "
                f"from the model's {ours.to_dict()} ({_variant_of(ours)}); create the model whose config the "
                f"file holds, or load the file with lookhere.load_official(path)")
        return weights
    for key in ("model_ema", "state_dict", "model"):
        if isinstance(state_dict.get(key), Mapping):
            state_dict = state_dict[key]
            break
    return clean_state_dict(dict(state_dict))
