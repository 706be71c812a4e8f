"""Position encodings as modules with two hooks the ViT calls at every forward.

- ``embed(x, grid)`` adds absolute position information to the patch tokens ``(B, N, C)`` (once
  per forward, before the blocks).
- ``attend(q, k, v, grid=..., layer=..., num_prefix_tokens=..., dropout_p=...)`` runs one layer's
  attention, where relative encodings (LookHere, RoPE, biases) act.

Both receive the current grid ``(rows, cols)``, so the model runs at any image size with no set-up
call. Prefix tokens (CLS) come first in q, k, v and are never encoded or masked.

Coordinates, the same for every encoding: patch ``i`` of a ``gy x gx`` grid is at row ``y = i // gx``,
column ``x = i % gx`` (row-major, top-left first), measured in patches, so a larger grid simply
extends the training grid's coordinates. Encodings that normalise coordinates (Fourier) divide by
the training grid; ``interpolate=True`` (RoPE's test-time knob) instead squeezes any grid into the
training grid's coordinate range. RoPE-DINOv3 maps every grid onto [-1, 1] per axis, and FIRE
normalises offsets by the test grid's extent unless told to use the training grid's.

Each encoding initialises its own parameters (``init_weights``, called at construction), and takes
only the options its constructor names: ``build_position_encoding`` refuses any other.
"""

from __future__ import annotations

import inspect
import math
from functools import lru_cache, partial
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.layers.pos_embed_sincos import (RotaryEmbeddingDinoV3, apply_rot_embed_cat, build_sincos2d_pos_embed,
                                          get_mixed_freqs, init_random_2d_freqs)

from .attention import BACKENDS, AttentionPlan, attend
from .attention.dense import chunk_rows, sdpa_in_chunks
from .attention.geometry import layer_bias
from .attention.geometry import patch_coords as grid_coords
from .config import PRESETS, LookHereConfig, resolve_config


@lru_cache(maxsize=32)
def _grid_yx(gy: int, gx: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    # Cached across calls, so never an inference tensor: one built under torch.inference_mode
    # would break every later forward that autograd records.
    with torch.inference_mode(False):
        y, x = grid_coords(gy, gx, device)
        return y.float(), x.float()


def patch_coords(grid: tuple[int, int], train_grid: tuple[int, int] | None = None, *, device="cpu",
                 interpolate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of each patch (row-major), in training-grid patch units when interpolating."""
    y, x = _grid_yx(grid[0], grid[1], str(torch.device(device)))
    if interpolate and train_grid is not None:
        y = y * ((train_grid[0] - 1) / max(grid[0] - 1, 1))
        x = x * ((train_grid[1] - 1) / max(grid[1] - 1, 1))
    return y, x


class PositionEncoding(nn.Module):
    """No position information: the base every encoding overrides where it acts."""

    name = "none"
    relative = False
    # Settings that may change on a built model (test-time knobs): attributes named like the
    # constructor options that set them, so a saved model's config can record them.
    knobs: tuple[str, ...] = ()
    # ModuleLists holding one module per ViT block: layer-wise learning-rate decay groups each with its block.
    layer_modules: tuple[str, ...] = ()

    def resolved(self) -> dict[str, Any]:
        """What this encoding resolved to: its class and every plain setting it holds (options,
        defaults, knobs). A study's cell identity records it, so a changed default is noticed."""
        plain = (bool, int, float, str, tuple, list, type(None))
        return {"class": type(self).__name__,
                **{k: v for k, v in sorted(vars(self).items()) if not k.startswith("_") and k != "training"
                   and isinstance(v, plain)}}

    def init_weights(self) -> None:
        """Set this encoding's parameters to its own initialisation (called at construction; the
        ViT's generic initialisation leaves the encoding alone)."""

    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay: tables, frequencies and scalars, like timm's pos_embed;
        linear layers (MLPs, projections) follow the optimiser's usual rule."""
        linear = {f"{n}.{p}" for n, m in self.named_modules() if isinstance(m, nn.Linear)
                  for p, _ in m.named_parameters(recurse=False)}
        return {n for n, _ in self.named_parameters()} - linear

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


class OffsetBias(PositionEncoding):
    """An additive bias per head that is a function of the (query, key) patch offset, 0 for prefix
    tokens: FIRE, the learned relative table, 2D-ALiBi. Attention runs on chunks of query rows with
    LookHere's dense-path budget, so at a large grid only one chunk's bias rows exist at a time."""

    relative = True

    def bias(self, grid: tuple[int, int], layer: int, rows: slice = slice(None)) -> torch.Tensor:
        """``(H, rows, N)``: the bias of the query patches ``rows`` against every key patch."""
        raise NotImplementedError

    def attend(self, q, k, v, *, grid, layer, num_prefix_tokens, dropout_p=0.0):
        B, H, T, _ = q.shape
        p, n = num_prefix_tokens, grid[0] * grid[1]
        step = chunk_rows(H, T, n)
        if step >= n:  # one call; a 4D mask broadcast over the batch lets CPU SDPA take its fused kernel
            mask = self.score_bias(grid=grid, layer=layer, num_prefix_tokens=p, device=q.device)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype).expand(B, -1, -1, -1),
                                                  dropout_p=dropout_p)
        parts = [F.scaled_dot_product_attention(q[:, :, :p], k, v, dropout_p=dropout_p)] if p else []
        for start in range(0, n, step):
            rows = slice(start, min(n, start + step))
            mask = F.pad(self.bias(grid, layer, rows), (p, 0)).to(q.dtype).expand(B, -1, -1, -1)
            parts.append(F.scaled_dot_product_attention(q[:, :, p + rows.start:p + rows.stop], k, v, attn_mask=mask,
                                                        dropout_p=dropout_p))
        return torch.cat(parts, dim=2)

    def score_bias(self, *, grid, layer, num_prefix_tokens, device):
        return F.pad(self.bias(grid, layer), (num_prefix_tokens, 0, num_prefix_tokens, 0))


def patch_offsets(grid: tuple[int, int], rows: slice = slice(None), device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Integer offsets ``(key - query)`` per axis, ``(rows, N)`` each, for the query patches ``rows``."""
    y, x = patch_coords(grid, device=device)
    return (y[None, :] - y[rows, None]).long(), (x[None, :] - x[rows, None]).long()


class LookHere(PositionEncoding):
    """LookHere: directed 2D attention masks and distance penalties; no parameters.

    The heads' tables and scales are built once, as an :class:`AttentionPlan`, and follow ``.to()``.
    ``config.global_slope`` is the published test-time knob: replace the config to change it
    (``pe.config = pe.config.replace(global_slope=...)``), which rebuilds the plan.
    """

    knobs = ("backend",)
    relative = True

    def __init__(self, config: str | Mapping[str, Any] | LookHereConfig, depth: int, num_heads: int,
                 backend: str = "auto"):
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

    def resolved(self) -> dict[str, Any]:
        return {**super().resolved(), "config": self.config.to_dict()}

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


class LearnedAbsolute(PositionEncoding):
    """One learned vector per patch (ViT/DeiT). Another grid gets the table resampled: ``"bicubic"``
    (timm's antialiased resize, the default) or ``"grid"`` (the table interpolated at each patch's
    coordinates squeezed into the training grid, corner patches kept: RoPE's ``interpolate``)."""

    name = "learned-1d"
    knobs = ("resample",)
    RESAMPLE = ("bicubic", "grid")

    def __init__(self, embed_dim: int, grid_size: tuple[int, int], resample: str = "bicubic"):
        super().__init__()
        if resample not in self.RESAMPLE:
            raise ValueError(f"learned-1d resample={resample!r}; allowed: {', '.join(self.RESAMPLE)}")
        self.grid_size = tuple(grid_size)
        self.resample = resample
        self.pos_embed = nn.Parameter(torch.zeros(1, grid_size[0] * grid_size[1], embed_dim))
        self.init_weights()

    def init_weights(self) -> None:
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

    def __init__(self, embed_dim: int):
        super().__init__()
        if embed_dim % 4:
            raise ValueError(f"sincos-2d needs embed_dim divisible by 4, got {embed_dim}")
        self.embed_dim = embed_dim

    def embed(self, x, grid):
        return x + build_sincos2d_pos_embed(list(grid), self.embed_dim, device=x.device, dtype=x.dtype)[None]


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
    evaluated at coordinates beyond 1, on the same scale. The frequencies start at N(0, 1/gamma^2),
    the paper's initialisation; the MLP with PyTorch's, as the ViT's linear layers by default.
    """

    name = "fourier"

    def __init__(self, embed_dim: int, grid_size: tuple[int, int], num_features: int = 256,
                 hidden_dim: int | None = None, gamma: float = 1.0):
        super().__init__()
        self.grid_size = tuple(grid_size)
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
        y, x = patch_coords(grid, device=device)
        pos = torch.stack([(y + 0.5) / self.grid_size[0], (x + 0.5) / self.grid_size[1]], dim=-1)
        z = 2 * math.pi * F.linear(pos, self.proj.weight.float())  # float32 phases, whatever the model's dtype
        return torch.cat([z.cos(), z.sin()], dim=-1) / math.sqrt(self.num_features)

    def embed(self, x, grid):
        return x + self.mlp(self.features(grid, x.device).to(x.dtype))[None]


class RelativeBias(OffsetBias):
    """Learned bias per layer and head indexed by the offset (dy, dx) (iRPE / Swin style).

    Offsets beyond the training grid's range clamp to the table's edge.
    """

    name = "rpe-learned"

    def __init__(self, num_heads: int, depth: int, grid_size: tuple[int, int]):
        super().__init__()
        self.grid_size = tuple(grid_size)
        gy, gx = grid_size
        self.table = nn.Parameter(torch.zeros(depth, num_heads, 2 * gy - 1, 2 * gx - 1))
        self.init_weights()

    def init_weights(self) -> None:
        trunc_normal_(self.table, std=0.02)

    def bias(self, grid, layer, rows=slice(None)):
        dy, dx = patch_offsets(grid, rows, device=self.table.device)
        ty, tx = self.grid_size
        return self.table[layer][:, dy.clamp(-(ty - 1), ty - 1) + ty - 1, dx.clamp(-(tx - 1), tx - 1) + tx - 1]


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's geometric head slopes 2^(-8 h / H), h = 1..H."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / num_heads) for h in range(num_heads)])


class Alibi2d(OffsetBias):
    """2D-ALiBi (CROMA): minus a per-head slope times the Euclidean patch distance; no masks."""

    name = "alibi-2d"

    def __init__(self, num_heads: int):
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(num_heads), persistent=False)

    def bias(self, grid, layer=0, rows=slice(None)):
        dy, dx = patch_offsets(grid, rows, device=self.slopes.device)
        return -self.slopes[:, None, None] * torch.hypot(dy.float(), dx.float())


class Rope2d(PositionEncoding):
    """2D rotary embedding of patch q and k (Heo et al., RoPE-ViT), axial or mixed.

    Frequencies are ``(2, depth, heads, head_dim // 2)``: x and y components. Axial: fixed, half of
    the pairs rotate with x and half with y (theta 100). Mixed: learnable, initialised by timm's
    ``init_random_2d_freqs`` (theta 10), so each pair rotates along a learned direction. The
    rotation is timm's ``get_mixed_freqs`` / ``apply_rot_embed_cat``. ``interpolate=True`` squeezes
    larger grids into the training grid's coordinate range (the usual test-time variant).
    """

    knobs = ("interpolate",)
    relative = True

    def __init__(self, embed_dim: int, num_heads: int, depth: int, grid_size: tuple[int, int],
                 mixed: bool, theta: float | None = None, interpolate: bool = False):
        super().__init__()
        head_dim = embed_dim // num_heads
        if head_dim % 4:
            raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}")
        self.name = "rope-2d-mixed" if mixed else "rope-2d-axial"
        self.grid_size, self.interpolate = tuple(grid_size), bool(interpolate)
        self.theta = theta or (10.0 if mixed else 100.0)
        if mixed:
            self.freqs = nn.Parameter(init_random_2d_freqs(head_dim, depth, num_heads, temperature=self.theta))
        else:
            mag = 1.0 / self.theta ** (torch.arange(0, head_dim, 4).float() / head_dim)
            zero = torch.zeros_like(mag)
            fx, fy = torch.cat([mag, zero]), torch.cat([zero, mag])
            freqs = torch.stack([fx, fy])[:, None, None].expand(2, depth, num_heads, head_dim // 2)
            self.register_buffer("freqs", freqs.contiguous(), persistent=False)

    def init_weights(self) -> None:
        if isinstance(self.freqs, nn.Parameter):
            depth, heads, pairs = self.freqs.shape[1:]
            with torch.no_grad():
                self.freqs.copy_(init_random_2d_freqs(2 * pairs, depth, heads, temperature=self.theta))

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


class Fire(OffsetBias):
    """FIRE (Li et al., ICLR 2024): an attention bias computed by a small MLP per layer from the
    log-scaled offset, normalised by a length.

    In 1D, ``bias(i, j) = MLP(psi(i - j) / psi(max(n, L)))`` with ``psi(r) = log(|c| r + 1)``,
    ``n`` the length seen so far, ``c`` and the threshold ``L`` learned. The 2D form used here takes the
    offset per axis, with its sign: ``MLP(phi_y(dy), phi_x(dx))``, ``phi_a(d) = sign(d) psi(|d|) /
    psi(max(E_a, L))``, ``E_a`` the grid's extent along the axis (rows - 1 or columns - 1). Per axis,
    because attention in an image is not causal: the sign tells above from below and left from
    right (as the learned relative bias and LookHere do), each axis of a non-square grid is normalised
    by its own extent, and the MLP can still learn any function of the Euclidean distance from the two.
    Each layer has its own MLP (2 -> ``width`` -> heads, ReLU), ``c`` and ``L``.

    ``normalize`` is the test-time knob: ``"test"`` (FIRE's own extension: the normaliser is the
    current input's extent, so every grid's offsets span [-1, 1], an interpolation of the training
    range) or ``"train"`` (the training grid's extent, so a larger grid reaches offsets beyond 1).
    """

    name = "fire"
    knobs = ("normalize",)
    layer_modules = ("mlp",)
    NORMALIZE = ("test", "train")

    def __init__(self, num_heads: int, depth: int, grid_size: tuple[int, int], width: int = 32, init_c: float = 0.1,
                 init_threshold: float | None = None, normalize: str = "test"):
        super().__init__()
        if normalize not in self.NORMALIZE:
            raise ValueError(f"fire normalize={normalize!r}; allowed: {', '.join(self.NORMALIZE)}")
        self.grid_size, self.normalize, self.init_c = tuple(grid_size), normalize, init_c
        # FIRE starts L at a quarter of its training length (512 of 2048 tokens); here of the larger extent.
        self.register_buffer("init_threshold", torch.tensor(
            float(init_threshold if init_threshold is not None else max(grid_size[0] - 1, grid_size[1] - 1, 1) / 4)))
        self.c = nn.Parameter(torch.empty(depth))
        self.threshold_scale = nn.Parameter(torch.empty(depth))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(2, width), nn.ReLU(), nn.Linear(width, num_heads))
                                 for _ in range(depth))
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.constant_(self.c, self.init_c)
        nn.init.ones_(self.threshold_scale)
        for mlp in self.mlp:
            mlp[0].reset_parameters()
            mlp[2].reset_parameters()

    def offset_table(self, grid: tuple[int, int], layer: int) -> torch.Tensor:
        """``(H, 2 gy - 1, 2 gx - 1)``: the bias at each offset ``(dy, dx)``, ``dy = -(gy - 1) .. gy - 1``."""
        if self.normalize not in self.NORMALIZE:
            raise ValueError(f"fire normalize={self.normalize!r}; allowed: {', '.join(self.NORMALIZE)}")
        extent_grid = grid if self.normalize == "test" else self.grid_size
        c = self.c[layer].abs()
        threshold = (self.threshold_scale[layer] * self.init_threshold).abs()
        device, dtype = self.c.device, self.c.dtype
        phis = []
        for g, e in zip(grid, extent_grid):
            d = torch.arange(-(g - 1), g, device=device, dtype=dtype)
            norm = torch.log(c * torch.maximum(threshold, torch.tensor(float(e - 1), device=device, dtype=dtype)) + 1) + 1e-6
            phis.append(d.sign() * torch.log(c * d.abs() + 1) / norm)
        dy, dx = torch.meshgrid(*phis, indexing="ij")
        return self.mlp[layer](torch.stack([dy, dx], dim=-1)).permute(2, 0, 1)

    def bias(self, grid, layer, rows=slice(None)):
        table = self.offset_table(grid, layer)
        dy, dx = patch_offsets(grid, rows, device=table.device)
        return table[:, dy + grid[0] - 1, dx + grid[1] - 1]


class Pape(PositionEncoding):
    """PaPE (Øhrstrøm et al., 2026, "Where to attend"): each query scores every key with a sum of
    parabolas in their 2D offset, whose shape the query chooses.

    Per layer, head ``h`` and parabola ``r``: a learned direction ``w`` projects the offset,
    ``d = w . (p_query - p_key)``, and ``bias = sum_r (-a_r d^2 + b_r d) / sqrt(head_dim)`` with
    ``a_r = softplus(.) >= 0`` and ``b_r`` linear in the query token: a peak at the offset
    ``b / 2a`` along ``w``, of width ``1 / sqrt(a)``. The authors compute ``a, b`` from the layer's
    input; the attention hook sees the layer's queries (all heads concatenated), an affine and
    generically invertible function of that input, so the same family of biases. Positions are patch
    indices; a larger grid extends them (the authors' extension), and there is no test-time knob.
    Both projections are ``nn.Linear`` layers, initialised and weight-decayed as the ViT's others.

    The bias is never materialised: expanding the square makes it one dot product of ``1 + 2P``
    extra query and key features, appended to q and k (as the authors do), computed in float32
    whatever the autocast dtype, since the expanded terms cancel.
    """

    name = "pape"
    relative = True
    layer_modules = ("direction", "shape")

    def __init__(self, embed_dim: int, num_heads: int, depth: int, parabolas: int = 50):
        super().__init__()
        self.num_heads, self.parabolas = num_heads, parabolas
        self.direction = nn.ModuleList(nn.Linear(2, num_heads * parabolas, bias=False) for _ in range(depth))
        self.shape = nn.ModuleList(nn.Linear(embed_dim, 2 * num_heads * parabolas, bias=False) for _ in range(depth))
        self.init_weights()

    def init_weights(self) -> None:
        for layer in (*self.direction, *self.shape):
            layer.reset_parameters()  # PyTorch's default, as the authors use

    def features(self, q: torch.Tensor, grid: tuple[int, int], layer: int, num_prefix_tokens: int):
        """Extra query ``(B, H, T, 1 + 2P)`` and key ``(1, H, T, 1 + 2P)`` features (float32) whose dot
        product is the bias, 0 for prefix tokens."""
        B, H, T, D = q.shape
        p, P = num_prefix_tokens, self.parabolas
        y, x = patch_coords(grid, device=q.device)
        # Centred: the bias depends only on offsets, and smaller coordinates lose less to cancellation.
        pos = torch.stack([y - (grid[0] - 1) / 2, x - (grid[1] - 1) / 2], dim=-1)
        u = F.linear(pos, self.direction[layer].weight.float()).view(-1, H, P).transpose(0, 1)  # (H, N, P)
        ab = F.linear(q[:, :, p:].transpose(1, 2).reshape(B, T - p, H * D).float(), self.shape[layer].weight.float())
        a, b = ab.view(B, T - p, 2, H, P).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, P) each
        a = F.softplus(a)
        # sum_r -a (u_q - u_k)^2 + b (u_q - u_k) = [sum_r -a u_q^2 + b u_q] + (2 a u_q - b) . u_k - a . u_k^2
        qf = torch.cat([(b * u - a * u * u).sum(-1, keepdim=True), 2 * a * u - b, -a], dim=-1)
        kf = torch.cat([torch.ones_like(u[..., :1]), u, u * u], dim=-1)[None]
        return F.pad(qf, (0, 0, p, 0)), F.pad(kf, (0, 0, p, 0))

    def _augmented(self, q, k, grid, layer, num_prefix_tokens):
        qf, kf = self.features(q, grid, layer, num_prefix_tokens)
        qa, ka = torch.cat([q.float(), qf], -1), torch.cat([k.float(), kf.expand(k.shape[0], -1, -1, -1)], -1)
        pad = -qa.shape[-1] % 8  # zero features up to a multiple of 8: GPU kernels need it for the fused path
        return F.pad(qa, (0, pad)), F.pad(ka, (0, pad))

    def attend(self, q, k, v, *, grid, layer, num_prefix_tokens, dropout_p=0.0):
        with torch.autocast(q.device.type, enabled=False):
            qa, ka = self._augmented(q, k, grid, layer, num_prefix_tokens)
            scale, vf = q.shape[-1] ** -0.5, v.float()
            if q.device.type == "cpu":
                out = sdpa_in_chunks(qa, ka, vf, dropout_p=dropout_p, scale=scale)
            else:
                out = F.scaled_dot_product_attention(qa, ka, vf, dropout_p=dropout_p, scale=scale)
        return out.to(v.dtype)

    def attention_weights(self, q, k, *, grid, layer, num_prefix_tokens):
        qa, ka = self._augmented(q, k, grid, layer, num_prefix_tokens)
        return ((qa @ ka.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1)


class RopeDinoV3(PositionEncoding):
    """2D RoPE with normalised, augmented coordinates (DINOv3), by timm's ``RotaryEmbeddingDinoV3``.

    Patch centres are normalised per axis to [-1, 1], so any grid is an interpolation of the
    training grid's range (the extension; no test-time knob). In training mode the coordinates of each
    forward get DINOv3's random augmentation, one draw shared by all layers: ``shift_coords``
    (uniform shift), ``jitter_coords`` (per-axis log-uniform scale), ``rescale_coords`` (shared
    log-uniform scale; DINOv3 trains with 2). One rotation for all layers and heads, periods
    ``temperature ** (4k / head_dim)``, rotate-half layout, as DINOv3.
    """

    name = "rope-2d-dinov3"
    relative = True

    def __init__(self, embed_dim: int, num_heads: int, temperature: float = 100.0, shift_coords: float | None = None,
                 jitter_coords: float | None = None, rescale_coords: float | None = 2.0):
        super().__init__()
        head_dim = embed_dim // num_heads
        if head_dim % 4:
            raise ValueError(f"rope-2d-dinov3 needs a head dim divisible by 4, got {head_dim}")
        self.rope = RotaryEmbeddingDinoV3(head_dim, temperature=temperature, normalize_coords="separate",
                                          rotate_half=True, shift_coords=shift_coords, jitter_coords=jitter_coords,
                                          rescale_coords=rescale_coords)
        self._drawn: tuple[tuple[int, int], torch.Tensor] | None = None

    def resolved(self) -> dict[str, Any]:
        r = self.rope
        return {**super().resolved(), "temperature": r.temperature, "shift_coords": r.shift_coords,
                "jitter_coords": r.jitter_coords, "rescale_coords": r.rescale_coords}

    def embed(self, x, grid):
        # Once per forward: the layers' attend calls (and a checkpointed block's recomputation) share the draw.
        augment = self.training and self.rope.aug_active
        self._drawn = (tuple(grid), self.rope.get_embed(list(grid))) if augment else None
        return x

    def rotary(self, grid: tuple[int, int]) -> torch.Tensor:
        """``(N, 2 * head_dim)`` sin and cos; this forward's augmented draw in training mode."""
        if self._drawn is not None and self.training and self._drawn[0] == tuple(grid):
            return self._drawn[1]
        return self.rope.get_embed(list(grid))

    def rotate(self, q, k, *, grid, layer, num_prefix_tokens):
        emb, p = self.rotary(grid).to(q.device), num_prefix_tokens
        q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], emb, half=True)], dim=2)
        k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], emb, half=True)], dim=2)
        return q, k

    def attend(self, q, k, v, *, grid, layer, num_prefix_tokens, dropout_p=0.0):
        q, k = self.rotate(q, k, grid=grid, layer=layer, num_prefix_tokens=num_prefix_tokens)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)


# name -> factory. Every factory takes some of the model's ``embed_dim``, ``num_heads``, ``depth``
# and ``grid_size`` (the training grid); its other keyword arguments are the encoding's options.
POSITION_ENCODINGS: dict[str, Callable[..., PositionEncoding]] = {
    "none": PositionEncoding,
    "learned-1d": LearnedAbsolute,
    "sincos-2d": SinCos2d,
    "factorized": Factorized,
    "fourier": Fourier,
    "rpe-learned": RelativeBias,
    "alibi-2d": Alibi2d,
    "rope-2d-axial": partial(Rope2d, mixed=False),
    "rope-2d-mixed": partial(Rope2d, mixed=True),
    "fire": Fire,
    "pape": Pape,
    "rope-2d-dinov3": RopeDinoV3,
    **{name: partial(LookHere, config=name) for name in PRESETS},
    "lookhere": partial(LookHere, config="lh-90"),  # any LookHere config, given as lookhere_config
}
MODEL_ARGUMENTS = ("embed_dim", "num_heads", "depth", "grid_size")


def encoding_options(name: str) -> list[str]:
    """The options (``pos_options`` keys) that encoding ``name`` accepts."""
    params = inspect.signature(POSITION_ENCODINGS[name]).parameters
    fixed = POSITION_ENCODINGS[name].keywords if isinstance(POSITION_ENCODINGS[name], partial) else {}
    return [p for p in params if p not in MODEL_ARGUMENTS and p not in fixed]


def build_position_encoding(name: str, *, embed_dim: int, num_heads: int, depth: int, grid_size: tuple[int, int],
                            lookhere_config: str | Mapping[str, Any] | LookHereConfig | None = None,
                            **options: Any) -> PositionEncoding:
    """The encoding ``name`` for a model of the given shape; unknown options are an error.

    ``lookhere_config`` goes with ``name="lookhere"``; with a preset name (``"lh-90"``) it must
    equal that preset, so a model never carries one name and another config.
    """
    if name not in POSITION_ENCODINGS:
        raise ValueError(f"unknown pos_encoding={name!r}; allowed: {', '.join(POSITION_ENCODINGS)}")
    allowed = encoding_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"pos_options {unknown} are not options of pos_encoding={name!r}; "
                         f"allowed: {', '.join(allowed) or 'none'}")
    if lookhere_config is not None:
        if name == "lookhere":
            options["config"] = lookhere_config
        elif name in PRESETS:
            if resolve_config(lookhere_config) != resolve_config(name):
                raise ValueError(f"lookhere_config differs from the preset pos_encoding={name!r}; use "
                                 f"pos_encoding='lookhere' for a config of your own, or leave lookhere_config unset")
        else:
            raise ValueError(f"lookhere_config is set but pos_encoding={name!r} is not LookHere; allowed with: "
                             f"lookhere, {', '.join(PRESETS)}")
    model = dict(embed_dim=embed_dim, num_heads=num_heads, depth=depth, grid_size=tuple(grid_size))
    params = inspect.signature(POSITION_ENCODINGS[name]).parameters
    return POSITION_ENCODINGS[name](**{k: v for k, v in model.items() if k in params}, **options)
