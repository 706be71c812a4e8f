"""Pictures: each LookHere head's field of view and penalty for one query."""

from __future__ import annotations

import os
from fractions import Fraction

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .config import resolve_config  # noqa: E402
from .attention.geometry import check_grid, head_specs, layer_bias, layer_slope  # noqa: E402


def plot_fov(config, path: str | os.PathLike, *, num_heads: int = 12, grid_size=(15, 15), query=None,
             layer: int = 0, depth: int = 12, title: str | None = None) -> str:
    """Write a PNG with one panel per head: the bias row of ``query`` (grey = masked, star = query).

    ``layer`` counts from 0, in the title too (as ``lookhere analyze --layer`` and its table count), with the
    slopes that scale the penalties.
    """
    cfg = resolve_config(config)
    gy, gx = check_grid(grid_size)
    qy, qx = query if query is not None else (gy // 2, gx // 2)
    row = qy * gx + qx
    bias = layer_bias(cfg, (gy, gx), layer, depth, num_heads, slice(row, row + 1))[:, 0].reshape(num_heads, gy, gx)
    heads = head_specs(cfg.directions_for_layer(layer, depth), num_heads)
    cols = min(num_heads, 6)
    rows = -(-num_heads // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.6 * rows + 0.4), squeeze=False)
    finite = bias[bias.isfinite()]
    vmin = float(finite.min()) if finite.numel() else -1.0
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d0d0d0")  # masked keys in grey
    for h, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if h >= num_heads:
            ax.axis("off")
            continue
        img = np.ma.masked_invalid(bias[h].numpy())
        ax.imshow(img, cmap=cmap, vmin=min(vmin, -1e-6), vmax=0.0)
        ax.plot([qx], [qy], marker="*", color="red", markersize=9)
        label = "+".join(heads[h].primitives) or "unmasked"
        ax.set_title(f"head {h}: {label}\nhead slope {Fraction(heads[h].slope).limit_denominator(1 << 20)}",
                     fontsize=7)
    fig.suptitle(title or f"{cfg.directions_for_layer(layer, depth)}, layer {layer} (of layers 0 to {depth - 1}): "
                 f"global slope {cfg.global_slope:g}, layer slope {layer_slope(cfg, layer, depth):g}; colour = bias "
                 f"(yellow: 0), grey = masked, star = query", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
