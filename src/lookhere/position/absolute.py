"""Absolute encodings: a vector added to each patch token before the blocks (learned table, 2D
sine-cosine, factorized rows and columns, Fourier features)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.layers.pos_embed_sincos import freq_bands

from .base import Knob, PositionEncoding, interpolate_knob, patch_positions

RESAMPLE = Knob("pos_resample", "resample", "learned-1d", "resample",
                "learned-1d: resize the table (bicubic) or read it at squeezed coordinates (grid)",
                choices=("bicubic", "grid"))
SINCOS_INTERPOLATE = interpolate_knob("sincos", "sincos-2d")
FOURIER_INTERPOLATE = interpolate_knob("fourier", "Fourier")


class LearnedAbsolute(PositionEncoding):
    """One learned vector per patch (ViT/DeiT). Another grid gets the table resampled: ``"bicubic"``
    (timm's antialiased resize, the default) or ``"grid"`` (the table interpolated at each patch's
    coordinates squeezed into the training grid, corner patches kept: RoPE's ``interpolate``)."""

    name = "learned-1d"
    knobs = ("resample",)
    test_knobs = (RESAMPLE,)

    def __init__(self, embed_dim: int, grid_size: tuple[int, int], resample: str = "bicubic"):
        super().__init__()
        self.grid_size = tuple(grid_size)
        self.resample = RESAMPLE.check(resample, "learned-1d resample")
        self.pos_embed = nn.Parameter(torch.zeros(1, grid_size[0] * grid_size[1], embed_dim))
        self.init_weights()

    def init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)

    def table(self, grid: tuple[int, int]) -> torch.Tensor:
        if RESAMPLE.check(self.resample, "learned-1d resample") == "bicubic" or tuple(grid) == self.grid_size:
            return resample_abs_pos_embed(self.pos_embed, list(grid), list(self.grid_size), num_prefix_tokens=0)
        img = self.pos_embed.reshape(1, *self.grid_size, -1).permute(0, 3, 1, 2)
        img = F.interpolate(img, size=tuple(grid), mode="bicubic", align_corners=True)
        return img.flatten(2).transpose(1, 2)

    def embed(self, x, grid):
        return x + self.table(grid)


class SinCos2d(PositionEncoding):
    """Fixed 2D sine-cosine embedding (MAE), computed for whatever grid arrives: timm's layout
    (``sin y, sin x, cos y, cos x``, bands ``10000^(-i / (D/4))``), at patch coordinates, so a
    larger grid extends the training grid's positions. ``interpolate=True`` squeezes them into the
    training grid's range instead (the test-time knob)."""

    name = "sincos-2d"
    knobs = ("interpolate",)
    test_knobs = (SINCOS_INTERPOLATE,)

    def __init__(self, embed_dim: int, grid_size: tuple[int, int], interpolate: bool = False):
        super().__init__()
        if embed_dim % 4:
            raise ValueError(f"sincos-2d needs embed_dim divisible by 4, got {embed_dim}")
        self.embed_dim, self.grid_size = embed_dim, tuple(grid_size)
        self.interpolate = SINCOS_INTERPOLATE.check(interpolate, "sincos-2d interpolate")

    def table(self, grid: tuple[int, int], device=None) -> torch.Tensor:
        """``(N, embed_dim)``, float32."""
        y, x = patch_positions(grid, self.grid_size, device=device or "cpu", interpolate=self.interpolate)
        angles = torch.stack([y, x], -1)[..., None] * freq_bands(self.embed_dim // 4, step=1, device=device)
        return torch.stack([angles.sin(), angles.cos()], 1).flatten(1)

    def embed(self, x, grid):
        return x + self.table(grid, x.device).to(x.dtype)[None]


class Factorized(PositionEncoding):
    """A learned row embedding plus a learned column embedding; each 1D table resampled bicubically."""

    name = "factorized"

    def __init__(self, embed_dim: int, grid_size: tuple[int, int]):
        super().__init__()
        self.grid_size = tuple(grid_size)
        self.row_embed = nn.Parameter(torch.zeros(1, grid_size[0], embed_dim))
        self.col_embed = nn.Parameter(torch.zeros(1, grid_size[1], embed_dim))
        self.init_weights()

    def init_weights(self) -> None:
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
    evaluated at coordinates beyond 1, on the same scale; ``interpolate=True`` squeezes them into the
    training grid's range instead (the test-time knob). The frequencies start at N(0, 1/gamma^2),
    the paper's initialisation; the MLP with PyTorch's, as the ViT's linear layers by default.
    """

    name = "fourier"
    knobs = ("interpolate",)
    test_knobs = (FOURIER_INTERPOLATE,)

    def __init__(self, embed_dim: int, grid_size: tuple[int, int], num_features: int = 256,
                 hidden_dim: int | None = None, gamma: float = 1.0, interpolate: bool = False):
        super().__init__()
        self.grid_size = tuple(grid_size)
        self.interpolate = FOURIER_INTERPOLATE.check(interpolate, "fourier interpolate")
        self.gamma = gamma
        self.proj = nn.Linear(2, num_features // 2, bias=False)
        hidden = hidden_dim or embed_dim
        self.mlp = nn.Sequential(nn.Linear(num_features, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))
        self.num_features = num_features
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.proj.weight, std=1.0 / self.gamma)
        for layer in (self.mlp[0], self.mlp[2]):
            layer.reset_parameters()

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"proj.weight"}  # the frequencies

    def features(self, grid: tuple[int, int], device) -> torch.Tensor:
        y, x = patch_positions(grid, self.grid_size, device=device, interpolate=self.interpolate)
        pos = torch.stack([(y + 0.5) / self.grid_size[0], (x + 0.5) / self.grid_size[1]], dim=-1)
        z = 2 * math.pi * F.linear(pos, self.proj.weight.float())  # float32 phases, whatever the model's dtype
        return torch.cat([z.cos(), z.sin()], dim=-1) / math.sqrt(self.num_features)

    def embed(self, x, grid):
        return x + self.mlp(self.features(grid, x.device).to(x.dtype))[None]
