"""Rotary encodings: q and k rotated by angles linear in the patch position (2D RoPE, axial and
mixed; DINOv3's RoPE with normalised, augmented coordinates)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers.pos_embed_sincos import (RotaryEmbeddingDinoV3, apply_rot_embed_cat, get_mixed_freqs,
                                          init_random_2d_freqs)

from .base import PositionEncoding, interpolate_knob, patch_positions

INTERPOLATE = interpolate_knob("rope", "RoPE")


class Rope2d(PositionEncoding):
    """2D rotary embedding of patch q and k (Heo et al., RoPE-ViT), axial or mixed.

    Frequencies are ``(2, depth, heads, head_dim // 2)``: x and y components. Axial: fixed, half of
    the pairs rotate with x and half with y (theta 100). Mixed: learnable, initialised by timm's
    ``init_random_2d_freqs`` (theta 10), so each pair rotates along a learned direction. The
    rotation is timm's ``get_mixed_freqs`` / ``apply_rot_embed_cat``. ``interpolate=True`` squeezes
    larger grids into the training grid's coordinate range (the usual test-time variant).
    """

    knobs = ("interpolate",)
    test_knobs = (INTERPOLATE,)
    relative = True

    def __init__(self, embed_dim: int, num_heads: int, depth: int, grid_size: tuple[int, int],
                 mixed: bool, theta: float | None = None, interpolate: bool = False):
        super().__init__()
        head_dim = embed_dim // num_heads
        if head_dim % 4:
            raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}")
        self.name = "rope-2d-mixed" if mixed else "rope-2d-axial"
        self.grid_size, self.interpolate = tuple(grid_size), INTERPOLATE.check(interpolate, "rope interpolate")
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
        y, x = patch_positions(grid, self.grid_size, device=self.freqs.device, interpolate=self.interpolate)
        return get_mixed_freqs(self.freqs[:, layer], x, y, dtype=torch.float32)  # (H, N, 2 * head_dim)

    def rotate(self, q, k, *, grid, layer, num_prefix_tokens, state=None):
        emb = self.rotary(grid, layer)
        p = num_prefix_tokens
        q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], emb)], dim=2)
        k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], emb)], dim=2)
        return q, k

    def attend(self, q, k, v, *, grid, layer, num_prefix_tokens, dropout_p=0.0, state=None):
        q, k = self.rotate(q, k, grid=grid, layer=layer, num_prefix_tokens=num_prefix_tokens, state=state)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)


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

    def resolved(self) -> dict[str, Any]:
        r = self.rope
        return {**super().resolved(), "temperature": r.temperature, "shift_coords": r.shift_coords,
                "jitter_coords": r.jitter_coords, "rescale_coords": r.rescale_coords}

    def rotary(self, grid: tuple[int, int]) -> torch.Tensor:
        """``(N, 2 * head_dim)`` sin and cos; in training mode a new augmented draw at every call."""
        return self.rope.get_embed(list(grid))

    def forward_state(self, grid, device):
        """This forward's rotation, which every layer (and a checkpointed block's recomputation)
        receives: in training mode one augmented draw per forward."""
        return self.rotary(grid).to(device)

    def rotate(self, q, k, *, grid, layer, num_prefix_tokens, state=None):
        emb = state if state is not None else self.forward_state(grid, q.device)
        p = num_prefix_tokens
        q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], emb, half=True)], dim=2)
        k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], emb, half=True)], dim=2)
        return q, k

    def attend(self, q, k, v, *, grid, layer, num_prefix_tokens, dropout_p=0.0, state=None):
        q, k = self.rotate(q, k, grid=grid, layer=layer, num_prefix_tokens=num_prefix_tokens, state=state)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
