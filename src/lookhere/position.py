"""Position encodings as modules with two hooks the ViT calls at every forward.

- ``embed(x, grid)`` adds absolute position information to the patch tokens ``(B, N, C)``.
- ``attend(q, k, v, grid=..., layer=..., num_prefix_tokens=...)`` runs one layer's attention,
  where relative encodings (LookHere, RoPE, biases) act.

Both receive the current grid ``(rows, cols)``, so the model runs at any image size with no set-up
call. Prefix tokens (CLS) come first in q, k, v and are never encoded or masked.

Coordinates, the same for every encoding: patch ``i`` of a ``gy x gx`` grid is at row ``y = i // gx``,
column ``x = i % gx`` (row-major, top-left first), measured in patches, so a larger grid simply
extends the training grid's coordinates. Encodings that normalise coordinates (Fourier) divide by
the training grid; ``interpolate=True`` (RoPE's test-time knob) instead squeezes any grid into the
training grid's coordinate range.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.layers.pos_embed_sincos import (apply_rot_embed_cat, build_sincos2d_pos_embed, get_mixed_freqs,
                                          init_random_2d_freqs)

from .attention import BACKENDS, AttentionPlan, attend
from .attention.geometry import layer_bias
from .config import PRESETS, LookHereConfig


@lru_cache(maxsize=32)
def _grid_yx(gy: int, gx: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.arange(gy * gx, device=device)
    return (idx // gx).float(), (idx % gx).float()


def patch_coords(grid: tuple[int, int], train_grid: tuple[int, int] | None = None, *, device="cpu",
                 interpolate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of each patch (row-major), in training-grid patch units when interpolating."""
    y, x = _grid_yx(grid[0], grid[1], str(torch.device(device)))
    if interpolate and train_grid is not None:
        y = y * ((train_grid[0] - 1) / max(grid[0] - 1, 1))
        x = x * ((train_grid[1] - 1) / max(grid[1] - 1, 1))
    return y, x


def _attend_with_bias(q, k, v, bias: torch.Tensor, num_prefix_tokens: int, dropout_p: float = 0.0) -> torch.Tensor:
    """SDPA with a patch-only ``(H, N, N)`` bias; prefix rows and columns get 0."""
    if num_prefix_tokens:
        bias = F.pad(bias, (num_prefix_tokens, 0, num_prefix_tokens, 0))
    # 4D and broadcast over the batch: CPU SDPA then takes its fused kernel.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype).expand(q.shape[0], -1, -1, -1),
                                          dropout_p=dropout_p)


class PositionEncoding(nn.Module):
    """No position information: the base every encoding overrides where it acts."""

    name = "none"
    relative = False

    def embed(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return x

    def attend(self, q, k, v, *, grid: tuple[int, int], layer: int, num_prefix_tokens: int,
               dropout_p: float = 0.0) -> torch.Tensor:
        """One layer's attention; ``dropout_p`` is the attention dropout (the ViT passes 0 in eval mode)."""
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)

    # The unfused view of the same attention, for analysis: ``attend`` must equal
    # ``attention_weights(...) @ v`` (tested for every encoding).
    def rotate(self, q, k, *, grid, layer, num_prefix_tokens):
        return q, k

    def score_bias(self, *, grid, layer, num_prefix_tokens, device) -> torch.Tensor | None:
        """Additive ``(H, T, T)`` score bias, prefix rows/columns included; None when there is none."""
        return None

    def attention_weights(self, q, k, *, grid, layer, num_prefix_tokens) -> torch.Tensor:
        q, k = self.rotate(q, k, grid=grid, layer=layer, num_prefix_tokens=num_prefix_tokens)
        scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
        bias = self.score_bias(grid=grid, layer=layer, num_prefix_tokens=num_prefix_tokens, device=q.device)
        if bias is not None:
            scores = scores + bias.float()
        return scores.softmax(-1)


class LookHere(PositionEncoding):
    """LookHere: directed 2D attention masks and distance penalties; no parameters.

    The heads' tables and scales are built once, as an :class:`AttentionPlan`, and follow ``.to()``.
    ``config.global_slope`` is the published test-time knob: replace the config to change it
    (``pe.config = pe.config.replace(global_slope=...)``), which rebuilds the plan.
    """

    relative = True

    def __init__(self, config: str | Mapping[str, Any] | LookHereConfig, depth: int, num_heads: int,
                 backend: str = "auto", **_: Any):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}; allowed: {', '.join(BACKENDS)}")
        self.backend = backend
        self.name = config if isinstance(config, str) else "lookhere"
        self.depth, self.num_heads = depth, num_heads
        self.config = config

    @property
    def config(self) -> LookHereConfig:
        return self.plan.config

    @config.setter
    def config(self, config: str | Mapping[str, Any] | LookHereConfig) -> None:
        old = self._modules.get("plan")
        plan = AttentionPlan(config, self.depth, self.num_heads)
        self.plan = plan if old is None else plan.to(old.scale.device)

    def attend(self, q, k, v, *, grid, layer, num_prefix_tokens, dropout_p=0.0):
        return attend(q, k, v, self.plan, layer=layer, grid_size=grid, num_prefix_tokens=num_prefix_tokens,
                      backend=self.backend, dropout_p=dropout_p)

    def score_bias(self, *, grid, layer, num_prefix_tokens, device):
        bias = layer_bias(self.config, grid, layer, self.depth, self.num_heads, device=device)
        return F.pad(bias, (num_prefix_tokens, 0, num_prefix_tokens, 0))

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


class LearnedAbsolute(PositionEncoding):
    """One learned vector per patch (ViT/DeiT). Another grid gets the table resampled: ``"bicubic"``
    (timm's antialiased resize, the default) or ``"grid"`` (the table interpolated at each patch's
    coordinates squeezed into the training grid, corner patches kept: RoPE's ``interpolate``)."""

    name = "learned-1d"
    RESAMPLE = ("bicubic", "grid")

    def __init__(self, embed_dim: int, grid_size: tuple[int, int], resample: str = "bicubic", **_: Any):
        super().__init__()
        self.grid_size = tuple(grid_size)
        self.resample = resample
        self.pos_embed = nn.Parameter(torch.zeros(1, grid_size[0] * grid_size[1], embed_dim))
        trunc_normal_(self.pos_embed, std=0.02)

    def table(self, grid: tuple[int, int]) -> torch.Tensor:
        if self.resample not in self.RESAMPLE:
            raise ValueError(f"learned-1d resample={self.resample!r}; allowed: {', '.join(self.RESAMPLE)}")
        if self.resample == "bicubic" or tuple(grid) == self.grid_size:
            return resample_abs_pos_embed(self.pos_embed, list(grid), list(self.grid_size), num_prefix_tokens=0)
        img = self.pos_embed.reshape(1, *self.grid_size, -1).permute(0, 3, 1, 2)
        img = F.interpolate(img, size=tuple(grid), mode="bicubic", align_corners=True)
        return img.flatten(2).transpose(1, 2)

    def embed(self, x, grid):
        return x + self.table(grid)


class SinCos2d(PositionEncoding):
    """Fixed 2D sine-cosine embedding (MAE), computed for whatever grid arrives (timm's builder)."""

    name = "sincos-2d"

    def __init__(self, embed_dim: int, **_: Any):
        super().__init__()
        if embed_dim % 4:
            raise ValueError(f"sincos-2d needs embed_dim divisible by 4, got {embed_dim}")
        self.embed_dim = embed_dim

    def embed(self, x, grid):
        return x + build_sincos2d_pos_embed(list(grid), self.embed_dim, device=x.device, dtype=x.dtype)[None]


class Factorized(PositionEncoding):
    """A learned row embedding plus a learned column embedding; each 1D table resampled bicubically."""

    name = "factorized"

    def __init__(self, embed_dim: int, grid_size: tuple[int, int], **_: Any):
        super().__init__()
        self.grid_size = tuple(grid_size)
        self.row_embed = nn.Parameter(torch.zeros(1, grid_size[0], embed_dim))
        self.col_embed = nn.Parameter(torch.zeros(1, grid_size[1], embed_dim))
        trunc_normal_(self.row_embed, std=0.02)
        trunc_normal_(self.col_embed, std=0.02)

    @staticmethod
    def resample(table: torch.Tensor, length: int) -> torch.Tensor:
        """Bicubic (antialiased) resampling of a ``(1, L, C)`` table to ``length`` entries.

        The table is laid out as an ``L x 2`` image of identical columns: torch's antialiased bicubic
        mishandles an axis of size 1, and a 2-wide axis resampled to 2 is left exactly as it is.
        """
        if table.shape[1] == length:
            return table
        img = table.permute(0, 2, 1)[..., None].expand(-1, -1, -1, 2).float()
        out = F.interpolate(img, size=(length, 2), mode="bicubic", antialias=True, align_corners=False)
        return out[..., 0].permute(0, 2, 1).to(table.dtype)

    def tables(self, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.resample(self.row_embed, grid[0]), self.resample(self.col_embed, grid[1])

    def embed(self, x, grid):
        rows, cols = self.tables(grid)
        return x + (rows[:, :, None] + cols[:, None, :]).flatten(1, 2)


class Fourier(PositionEncoding):
    """Learnable Fourier features of (y, x) through an MLP (Li et al., NeurIPS 2021).

    Coordinates are patch centres divided by the training grid (0..1 there), so a larger grid is
    evaluated at coordinates beyond 1, on the same scale.
    """

    name = "fourier"

    def __init__(self, embed_dim: int, grid_size: tuple[int, int], num_features: int = 256,
                 hidden_dim: int | None = None, gamma: float = 1.0, **_: Any):
        super().__init__()
        self.grid_size = tuple(grid_size)
        self.proj = nn.Linear(2, num_features // 2, bias=False)
        nn.init.normal_(self.proj.weight, std=1.0 / gamma)
        hidden = hidden_dim or embed_dim
        self.mlp = nn.Sequential(nn.Linear(num_features, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))
        self.num_features = num_features

    def features(self, grid: tuple[int, int], device) -> torch.Tensor:
        y, x = patch_coords(grid, device=device)
        pos = torch.stack([(y + 0.5) / self.grid_size[0], (x + 0.5) / self.grid_size[1]], dim=-1)
        z = 2 * math.pi * self.proj(pos)
        return torch.cat([z.cos(), z.sin()], dim=-1) / math.sqrt(self.num_features)

    def embed(self, x, grid):
        return x + self.mlp(self.features(grid, x.device).to(x.dtype))[None]


class RelativeBias(PositionEncoding):
    """Learned bias per layer and head indexed by the offset (dy, dx) (iRPE / Swin style).

    Offsets beyond the training grid's range clamp to the table's edge.
    """

    name = "rpe-learned"
    relative = True

    def __init__(self, num_heads: int, depth: int, grid_size: tuple[int, int], **_: Any):
        super().__init__()
        self.grid_size = tuple(grid_size)
        gy, gx = grid_size
        self.table = nn.Parameter(torch.zeros(depth, num_heads, 2 * gy - 1, 2 * gx - 1))
        trunc_normal_(self.table, std=0.02)

    def bias(self, grid: tuple[int, int], layer: int) -> torch.Tensor:
        y, x = patch_coords(grid, device=self.table.device)
        ty, tx = self.grid_size
        dy = (y[None, :] - y[:, None]).long().clamp(-(ty - 1), ty - 1) + ty - 1
        dx = (x[None, :] - x[:, None]).long().clamp(-(tx - 1), tx - 1) + tx - 1
        return self.table[layer][:, dy, dx]

    def attend(self, q, k, v, *, grid, layer, num_prefix_tokens, dropout_p=0.0):
        return _attend_with_bias(q, k, v, self.bias(grid, layer), num_prefix_tokens, dropout_p)

    def score_bias(self, *, grid, layer, num_prefix_tokens, device):
        return F.pad(self.bias(grid, layer), (num_prefix_tokens, 0, num_prefix_tokens, 0))


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's geometric head slopes 2^(-8 h / H), h = 1..H."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / num_heads) for h in range(num_heads)])


class Alibi2d(PositionEncoding):
    """2D-ALiBi (CROMA): minus a per-head slope times the Euclidean patch distance; no masks."""

    name = "alibi-2d"
    relative = True

    def __init__(self, num_heads: int, **_: Any):
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(num_heads), persistent=False)

    def bias(self, grid: tuple[int, int]) -> torch.Tensor:
        y, x = patch_coords(grid, device=self.slopes.device)
        dist = torch.hypot(y[None, :] - y[:, None], x[None, :] - x[:, None])
        return -self.slopes[:, None, None] * dist

    def attend(self, q, k, v, *, grid, layer, num_prefix_tokens, dropout_p=0.0):
        return _attend_with_bias(q, k, v, self.bias(grid), num_prefix_tokens, dropout_p)

    def score_bias(self, *, grid, layer, num_prefix_tokens, device):
        return F.pad(self.bias(grid), (num_prefix_tokens, 0, num_prefix_tokens, 0))


class Rope2d(PositionEncoding):
    """2D rotary embedding of patch q and k (Heo et al., RoPE-ViT), axial or mixed.

    Frequencies are ``(2, depth, heads, head_dim // 2)``: x and y components. Axial: fixed, half of
    the pairs rotate with x and half with y (theta 100). Mixed: learnable, initialised by timm's
    ``init_random_2d_freqs`` (theta 10), so each pair rotates along a learned direction. The
    rotation is timm's ``get_mixed_freqs`` / ``apply_rot_embed_cat``. ``interpolate=True`` squeezes
    larger grids into the training grid's coordinate range (the usual test-time variant).
    """

    relative = True

    def __init__(self, embed_dim: int, num_heads: int, depth: int, grid_size: tuple[int, int],
                 mixed: bool, theta: float | None = None, interpolate: bool = False, **_: Any):
        super().__init__()
        head_dim = embed_dim // num_heads
        if head_dim % 4:
            raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}")
        self.name = "rope-2d-mixed" if mixed else "rope-2d-axial"
        self.grid_size, self.interpolate = tuple(grid_size), interpolate
        if mixed:
            self.freqs = nn.Parameter(init_random_2d_freqs(head_dim, depth, num_heads, temperature=theta or 10.0))
        else:
            mag = 1.0 / (theta or 100.0) ** (torch.arange(0, head_dim, 4).float() / head_dim)
            zero = torch.zeros_like(mag)
            fx, fy = torch.cat([mag, zero]), torch.cat([zero, mag])
            freqs = torch.stack([fx, fy])[:, None, None].expand(2, depth, num_heads, head_dim // 2)
            self.register_buffer("freqs", freqs.contiguous(), persistent=False)

    def rotary(self, grid: tuple[int, int], layer: int) -> torch.Tensor:
        y, x = patch_coords(grid, self.grid_size, device=self.freqs.device, interpolate=self.interpolate)
        return get_mixed_freqs(self.freqs[:, layer], x, y, dtype=torch.float32)  # (H, N, 2 * head_dim)

    def rotate(self, q, k, *, grid, layer, num_prefix_tokens):
        emb = self.rotary(grid, layer)
        p = num_prefix_tokens
        q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], emb)], dim=2)
        k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], emb)], dim=2)
        return q, k

    def attend(self, q, k, v, *, grid, layer, num_prefix_tokens, dropout_p=0.0):
        q, k = self.rotate(q, k, grid=grid, layer=layer, num_prefix_tokens=num_prefix_tokens)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)


def _lookhere_factory(preset: str) -> Callable[..., PositionEncoding]:
    def build(*, num_heads: int, depth: int, lookhere_config=None, backend: str = "auto", **_: Any) -> PositionEncoding:
        return LookHere(lookhere_config or preset, depth, num_heads, backend=backend)

    return build


# name -> factory(embed_dim=, num_heads=, depth=, grid_size=(training grid), **options)
POSITION_ENCODINGS: dict[str, Callable[..., PositionEncoding]] = {
    "none": lambda **kw: PositionEncoding(),
    "learned-1d": lambda **kw: LearnedAbsolute(**kw),
    "sincos-2d": lambda **kw: SinCos2d(**kw),
    "factorized": lambda **kw: Factorized(**kw),
    "fourier": lambda **kw: Fourier(**kw),
    "rpe-learned": lambda **kw: RelativeBias(**kw),
    "alibi-2d": lambda **kw: Alibi2d(**kw),
    "rope-2d-axial": lambda **kw: Rope2d(mixed=False, **kw),
    "rope-2d-mixed": lambda **kw: Rope2d(mixed=True, **kw),
    **{name: _lookhere_factory(name) for name in PRESETS},
    "lookhere": _lookhere_factory("lh-90"),  # any LookHere config, given as lookhere_config
}


def build_position_encoding(name: str, **kwargs: Any) -> PositionEncoding:
    if name not in POSITION_ENCODINGS:
        raise ValueError(f"unknown pos_encoding={name!r}; allowed: {', '.join(POSITION_ENCODINGS)}")
    return POSITION_ENCODINGS[name](**kwargs)
