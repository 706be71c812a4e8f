"""Position encodings as modules with two hooks the ViT calls at every forward.

- ``embed(x, grid)`` adds absolute position information to the patch tokens ``(B, N, C)``.
- ``attend(q, k, v, grid=..., layer=..., num_prefix_tokens=...)`` runs one layer's attention,
  where relative encodings (LookHere, RoPE, biases) act.

Both receive the current grid ``(rows, cols)``, so the model runs at any image size with no set-up
call. Prefix tokens (CLS) come first in q, k, v and are never encoded or masked.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import lookhere_attention
from .config import PRESETS, LookHereConfig, resolve_config


class PositionEncoding(nn.Module):
    """No position information: the base every encoding overrides where it acts."""

    name = "none"
    relative = False

    def embed(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return x

    def attend(self, q, k, v, *, grid: tuple[int, int], layer: int, num_prefix_tokens: int) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)


class LookHere(PositionEncoding):
    """LookHere: directed 2D attention masks and distance penalties; no parameters.

    ``config.global_slope`` is the published test-time knob: replace the config to change it.
    """

    relative = True

    def __init__(self, config: str | Mapping[str, Any] | LookHereConfig, depth: int, num_heads: int):
        super().__init__()
        self.name = config if isinstance(config, str) else "lookhere"
        self.config = resolve_config(config)
        self.depth = depth
        # Validate head assignment for every layer now rather than at the first forward.
        from .masks import head_specs

        for layer in range(depth):
            head_specs(self.config.directions_for_layer(layer, depth), num_heads)

    def attend(self, q, k, v, *, grid, layer, num_prefix_tokens):
        return lookhere_attention(
            q, k, v, config=self.config, grid_size=grid, layer=layer, depth=self.depth,
            num_prefix_tokens=num_prefix_tokens,
        )

    def extra_repr(self) -> str:
        return f"{self.config.to_dict()}"


def _lookhere_factory(preset: str) -> Callable[..., PositionEncoding]:
    def build(*, embed_dim: int, num_heads: int, depth: int, grid_size: tuple[int, int], **kw) -> PositionEncoding:
        config = kw.pop("lookhere_config", None) or preset
        return LookHere(config, depth, num_heads)

    return build


def _none_factory(*, embed_dim, num_heads, depth, grid_size, **kw) -> PositionEncoding:
    return PositionEncoding()


# name -> factory(embed_dim=, num_heads=, depth=, grid_size=(training grid), **options)
POSITION_ENCODINGS: dict[str, Callable[..., PositionEncoding]] = {
    "none": _none_factory,
    **{name: _lookhere_factory(name) for name in PRESETS},
    "lookhere": _lookhere_factory("lh-90"),
}


def build_position_encoding(name: str, **kwargs) -> PositionEncoding:
    if name not in POSITION_ENCODINGS:
        raise ValueError(f"unknown pos_encoding={name!r}; allowed: {', '.join(POSITION_ENCODINGS)}")
    return POSITION_ENCODINGS[name](**kwargs)
