"""A model's LookHere plan: what every layer's heads see and how strongly they are penalised.

Built once per model (and again when its config is replaced). Per-head tables are buffers, so they
follow ``.to()``; what a backend derives for one grid (bias tables, block masks) is cached in the
plan, keyed by what it depends on (head pattern, grid, prefix count, device, dtype).
"""

from __future__ import annotations

from typing import Any, Callable, Hashable

import torch
import torch.nn as nn

from ..config import LookHereConfig, resolve_config
from .geometry import HeadSpec, field_of_view, head_scales, head_specs, head_tables

# Sides a head's FOV can lie on; "all" for heads that see both sides of every axis.
SIDES = ("up", "down", "left", "right", "all")


def head_side(head: HeadSpec) -> str:
    """The side of the query (rows above, below, columns left, right) that holds the head's whole FOV."""
    coef, _ = head_tables((head,))
    r = torch.arange(-8, 9)  # half-planes through the origin: a window of offsets decides
    fov = field_of_view(coef, r[:, None], r[None, :])[0]
    dy, dx = r[:, None], r[None, :]
    halves = {"up": dy <= 0, "down": dy >= 0, "left": dx <= 0, "right": dx >= 0}
    return next((s for s, half in halves.items() if not (fov & ~half).any()), "all")


def _tensors(value: Any):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    # block masks and other objects count as nothing: they are small


def table_dtype(dtype: torch.dtype) -> torch.dtype:
    """Biases are built in float32 (cast to the attention's dtype at the end), in float64 for float64
    attention, whose digits would otherwise be float32's."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class AttentionPlan(nn.Module):
    """Per-layer head tables of one LookHere config for ``depth`` layers of ``num_heads`` heads.

    Layers whose heads are the same (all of them, unless ``head_directions`` is given per layer)
    share a *pattern*, and so share every cached table; a layer differs from them by its scales.
    """

    # What the cache may hold before its oldest entries go: a few grids of the CPU fast path.
    CACHE_BYTES = 1 << 30

    def __init__(self, config: str | dict | LookHereConfig, depth: int, num_heads: int):
        super().__init__()
        self._config = cfg = resolve_config(config)
        if depth < 1:
            raise ValueError(f"depth={depth} must be >= 1")
        self.depth, self.num_heads = depth, num_heads
        layer_heads = [head_specs(cfg.directions_for_layer(l, depth), num_heads) for l in range(depth)]
        self.patterns: list[tuple[HeadSpec, ...]] = list(dict.fromkeys(layer_heads))
        self.layer_pattern = [self.patterns.index(h) for h in layer_heads]
        tables = [head_tables(h) for h in self.patterns]
        self.register_buffer("coef", torch.stack([c for c, _ in tables]), persistent=False)  # (P, H, C, 2)
        self.register_buffer("kind", torch.stack([k for _, k in tables]), persistent=False)  # (P, H)
        self._scales = [head_scales(cfg, h, l, depth) for l, h in enumerate(layer_heads)]
        self.register_buffer("scale", torch.tensor(self._scales, dtype=torch.float32), persistent=False)  # (L, H)
        self.sides = [tuple(head_side(h) for h in heads) for heads in self.patterns]
        # Masks with -inf fill and translation-equivariant penalties: the bias is a function of the offset.
        self.offset_only = cfg.fill_with == "inf" and all(h.penalty != "center" for p in self.patterns for h in p)
        self._cache: dict[Hashable, tuple[Any, int]] = {}

    @property
    def config(self) -> LookHereConfig:
        return self._config

    @config.setter
    def config(self, config) -> None:
        raise AttributeError("an AttentionPlan's tables are built for one config: build a new plan "
                             "(LookHere's encoding rebuilds its plan when its config is set)")

    def layer_scales(self, layer: int, dtype: torch.dtype) -> torch.Tensor:
        """This layer's per-head scales in ``table_dtype(dtype)``."""
        if table_dtype(dtype) == torch.float64:
            return torch.tensor(self._scales[layer], dtype=torch.float64, device=self.scale.device)
        return self.scale[layer]

    def heads(self, layer: int) -> tuple[HeadSpec, ...]:
        return self.patterns[self.layer_pattern[layer]]

    def cached(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """``build()`` once per key; the oldest entries go first when the cache is over its size."""
        if key not in self._cache:
            with torch.inference_mode(False):  # an inference tensor kept here would break later training steps
                value = build()
            size = sum(t.numel() * t.element_size() for t in _tensors(value))
            while self._cache and self.cached_bytes() + size > self.CACHE_BYTES:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = value, size
        return self._cache[key][0]

    def cached_bytes(self) -> int:
        return sum(size for _, size in self._cache.values())

    def _apply(self, fn, recurse=True):
        self._cache.clear()  # cached tensors live on the old device
        super()._apply(fn, recurse)
        # Scales stay float32 when the model is cast to a lower precision (only the device follows).
        self.scale = torch.tensor(self._scales, dtype=torch.float32, device=self.scale.device)
        return self

    def extra_repr(self) -> str:
        return f"{self.config.to_dict()}, depth={self.depth}, num_heads={self.num_heads}"
