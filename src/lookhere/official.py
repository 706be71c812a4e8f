"""Load the released LookHere checkpoints (``LH_*_weights_and_config.pth``) into our ViT.

The file is read with ``torch.load(weights_only=True)``: tensors and plain containers only, never
arbitrary pickled code. Width, depth, patch size, MLP ratio, head and classes come from the weights.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile

import torch

from .config import LookHereConfig
from .vit import VisionTransformer, checkpoint_filter_fn, create_vit

_REQUIRED = ("cls_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight",
             "norm.weight")


def _fail(path, why: str) -> ValueError:
    return ValueError(f"{path}: not a released LookHere checkpoint ({why}); expected a torch.save'd dict "
                      f"with 'config' (the LookHere config dict) and 'weights' (a ViT state dict)")


def read_official(path: str | os.PathLike) -> tuple[LookHereConfig, dict[str, torch.Tensor]]:
    """The LookHere config and the (prefix-stripped) state dict of a released checkpoint file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _fail(path, f"unreadable or unsafe: {first}") from e
    if not isinstance(obj, dict) or "config" not in obj or "weights" not in obj:
        keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise _fail(path, f"found {keys}")
    if not isinstance(obj["weights"], dict):
        raise _fail(path, "'weights' is not a state dict")
    try:
        config = LookHereConfig.from_dict(obj["config"])
    except (TypeError, ValueError) as e:
        raise _fail(path, f"bad 'config': {e}") from e
    weights = {k: v for k, v in obj["weights"].items()}
    weights = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in weights.items()}
    missing = [k for k in _REQUIRED if k not in weights]
    if missing:
        raise _fail(path, f"weights lack {missing}")
    return config, weights


def load_official(path: str | os.PathLike, *, num_heads: int = 12) -> VisionTransformer:
    """A released LookHere checkpoint as our ViT, in eval mode, at any image size."""
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
        init_values=1.0 if "blocks.0.ls1.gamma" in w else None,
    )
    result = model.load_state_dict(checkpoint_filter_fn(w, model), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise _fail(path, f"weights do not fit a ViT: missing {result.missing_keys[:5]}, "
                          f"unexpected {result.unexpected_keys[:5]}")
    return model.eval()
