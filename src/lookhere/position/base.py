"""The interface every position encoding implements, its test-time knobs, and patch coordinates.

Coordinates, the same for every encoding: patch ``i`` of a ``gy x gx`` grid is at row ``y = i // gx``,
column ``x = i % gx`` (row-major, top-left first), measured in patches, so a larger grid simply
extends the training grid's coordinates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention.geometry import patch_coords as grid_coords


@lru_cache(maxsize=32)
def _grid_yx(gy: int, gx: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    # Cached across calls, so never an inference tensor: one built under torch.inference_mode
    # would break every later forward that autograd records.
    with torch.inference_mode(False):
        y, x = grid_coords(gy, gx, device)
        return y.float(), x.float()


def patch_positions(grid: tuple[int, int], train_grid: tuple[int, int] | None = None, *, device="cpu",
                    interpolate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of each patch (float), in training-grid patch units when interpolating: any
    grid then squeezed into the training grid's coordinate range (RoPE's test-time variant)."""
    y, x = _grid_yx(grid[0], grid[1], str(torch.device(device)))
    if interpolate and train_grid is not None:
        y = y * ((train_grid[0] - 1) / max(grid[0] - 1, 1))
        x = x * ((train_grid[1] - 1) / max(grid[1] - 1, 1))
    return y, x


@dataclass(frozen=True)
class Knob:
    """A test-time setting of a built encoding: how it meets a grid other than the training grid.

    ``key`` names it everywhere outside the encoding: ``lookhere eval --KEY``, the settings in
    eval.json and the reports (short: ``label``). ``choices`` are its values; a knob without choices
    is a float >= 0, tried at multiples of the model's own value (and, with ``size_ratio``, at the
    training-to-test size ratio times it, so that it counts in training-grid patches).
    """

    key: str
    attribute: str  # the encoding's attribute (and constructor option) that holds it
    owner: str  # the models it applies to, for messages
    label: str
    help: str
    choices: tuple = ()
    size_ratio: bool = False

    def check(self, value: Any, name: str | None = None) -> Any:
        """``value`` if allowed, else one message naming it as ``name`` (default: the key)."""
        name = name or self.key
        if self.choices:
            if value not in self.choices:
                raise ValueError(f"{name}={value!r}; allowed: {', '.join(map(str, self.choices))}")
            return type(self.choices[0])(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name}={value!r}; expected a finite number >= 0")
        return float(value)

    def grid(self, own: Any, scales: tuple[float, ...] = (), size_ratio: float | None = None) -> list[Any]:
        """The values worth trying at a test size, ``own`` first (it wins ties)."""
        if self.choices:
            return [own, *(c for c in self.choices if c != own)]
        multiples = [s for s in scales if s != 1]
        if self.size_ratio and size_ratio is not None and size_ratio != 1 and size_ratio not in multiples:
            multiples.append(size_ratio)
        return [own, *(own * s for s in multiples)]

    def rule(self, own: Any, chosen: Any, scales: tuple[float, ...], size_ratio: float) -> str | None:
        """Which rule of :meth:`grid` gave ``chosen`` (``own``, ``x0.5``, ``size ratio``, several joined
        by ``=``); None for a knob with choices, whose value says it all."""
        if self.choices:
            return None
        if math.isclose(chosen, own):
            return "own"
        rules = [f"x{s:g}" for s in scales if math.isclose(chosen, own * s)]
        if self.size_ratio and math.isclose(chosen, own * size_ratio):
            rules.append("size ratio")
        return " = ".join(rules)


def interpolate_knob(family: str, owner: str) -> Knob:
    """The knob that squeezes a larger grid's coordinates into the training grid's range
    (:func:`patch_positions` with ``interpolate``), RoPE's usual test-time variant, for every
    encoding that reads coordinates: ``FAMILY_interpolate``, off by default."""
    return Knob(f"{family}_interpolate", "interpolate", owner, "interpolate",
                f"{owner}: squeeze coordinates into the training range", choices=(False, True))


class PositionEncoding(nn.Module):
    """No position information: the base every encoding overrides where it acts.

    Two hooks run at every forward, with the current grid ``(rows, cols)``, so a model runs at any
    image size with no set-up call; prefix tokens (CLS) come first in q, k, v and are never encoded:

    - ``embed(x, grid)`` adds absolute position information to the patch tokens ``(B, N, C)``;
    - ``attend(q, k, v, grid=..., layer=..., num_prefix_tokens=..., dropout_p=..., state=...)`` runs one
      layer's attention, where relative encodings act. ``state`` is what ``forward_state`` computed
      once for this forward and every layer shares.
    """

    name = "none"
    relative = False
    # Settings that may change on a built model: attributes named like the constructor options that
    # set them, so a saved model's config records their current values.
    knobs: tuple[str, ...] = ()
    # The test-time knobs, each a setting in ``knobs`` (LookHere's slope lives in its config instead).
    test_knobs: tuple[Knob, ...] = ()
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

    # --- test-time knobs (set by name through ``lookhere.position.apply_knob``) ----------------
    def knob(self, key: str) -> Knob | None:
        return next((k for k in self.test_knobs if k.key == key), None)

    def get_knob(self, key: str) -> Any:
        return getattr(self, self.knob(key).attribute)

    def set_knob(self, key: str, value: Any) -> None:
        knob = self.knob(key)
        setattr(self, knob.attribute, knob.check(value))

    # --- the forward hooks ---------------------------------------------------------------------
    def forward_state(self, grid: tuple[int, int], device: torch.device | str) -> Any:
        """What every layer of one forward shares, computed once per forward (None: nothing)."""
        return None

    def embed(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return x

    def attend(self, q, k, v, *, grid: tuple[int, int], layer: int, num_prefix_tokens: int,
               dropout_p: float = 0.0, state: Any = None) -> torch.Tensor:
        """One layer's attention; ``dropout_p`` is the attention dropout (the ViT passes 0 in eval mode)."""
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)

    # The unfused view of the same attention, for analysis: ``attend`` must equal
    # ``attention_weights(...) @ v`` (tested for every encoding).
    def rotate(self, q, k, *, grid, layer, num_prefix_tokens, state=None):
        return q, k

    def score_bias(self, *, grid, layer, num_prefix_tokens, device) -> torch.Tensor | None:
        """Additive ``(H, T, T)`` score bias, prefix rows/columns included; None when there is none."""
        return None

    def attention_weights(self, q, k, *, grid, layer, num_prefix_tokens, state=None) -> torch.Tensor:
        q, k = self.rotate(q, k, grid=grid, layer=layer, num_prefix_tokens=num_prefix_tokens, state=state)
        scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
        bias = self.score_bias(grid=grid, layer=layer, num_prefix_tokens=num_prefix_tokens, device=q.device)
        if bias is not None:
            scores = scores + bias.float()
        return scores.softmax(-1)
