"""The released LookHere checkpoints (``LH_*_weights_and_config.pth``): reading, checking, loading.

A released file is a plain pickle ``{"config": <LookHere config dict>, "weights": <ViT state dict>}``.
One path reads it whether it comes through :func:`load_official` or through timm's pretrained
loading (``timm.create_model("vit_base_patch16_lookhere_90.in1k", pretrained=True)``, which calls
:func:`checkpoint_filter_fn`): the file is opened with ``torch.load(weights_only=True)`` (tensors and
plain containers only, never arbitrary pickled code), its config is validated, and its keys are mapped.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from typing import TYPE_CHECKING, Any, Mapping

import torch
from timm.models import clean_state_dict

from .config import PRESETS, LookHereConfig

if TYPE_CHECKING:
    from .vit import VisionTransformer

_REQUIRED = ("cls_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight",
             "norm.weight")
EXPECTED = ("expected a torch.save'd dict with 'config' (the LookHere config dict) and 'weights' "
            "(a ViT state dict)")


def _fail(source: Any, why: str) -> ValueError:
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
        raise _fail(source, f"found {sorted(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__}")
    if not isinstance(obj["weights"], Mapping):
        raise _fail(source, "'weights' is not a state dict")
    try:
        config = LookHereConfig.from_dict(obj["config"])
    except (TypeError, ValueError) as e:
        raise _fail(source, f"bad 'config': {e}") from e
    weights = {k: v for k, v in clean_state_dict(dict(obj["weights"])).items() if k != "pos_embed"}
    missing = [k for k in _REQUIRED if k not in weights]
    if missing:
        raise _fail(source, f"weights lack {missing}")
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
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError) as e:
        raise _fail(path, f"unreadable or unsafe: {load_error(e)}") from e
    return released_checkpoint(obj, path)


def _variant_of(config: LookHereConfig) -> str:
    for name, preset in PRESETS.items():
        if LookHereConfig.from_dict(preset) == config:
            return f"the {name} preset, timm's vit_base_patch16_lookhere_{name[3:]}.in1k"
    return "no preset"


def checkpoint_filter_fn(state_dict: dict, model: "VisionTransformer") -> dict:
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


def load_official(path: str | os.PathLike, *, num_heads: int = 12) -> "VisionTransformer":
    """A released LookHere checkpoint as our ViT, in eval mode, at any image size.

    Width, depth, patch size, MLP ratio, head and classes come from the weights; the LookHere config
    from the file; drop-path is the paper's (for finetuning), as in the timm ``.in1k`` variants.
    """
    from .vit import LOOKHERE_ARCH, create_vit  # vit imports this module for its timm filter

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
    result = model.load_state_dict(w, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise _fail(path, f"weights do not fit a ViT: missing {result.missing_keys[:5]}, "
                          f"unexpected {result.unexpected_keys[:5]}")
    return model.eval()
