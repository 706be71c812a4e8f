"""Attention diagnostics: how far heads look, how different they are, how alike the tokens become.

Attention weights are captured with forward hooks on the model's own attention modules and the
position encoding's unfused ``attention_weights`` (equal to its fused path, by test); nothing of
the model is copied. They are reduced layer by layer, a chunk of images at a time, so that one
layer's weights for one chunk are all that is held: at a 64x64 grid (1024 px at patch 16) a single
image's are 0.8 GB for 12 heads, and all layers of 16 images would be 150 GB.
"""

from __future__ import annotations

import functools
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from .attention.geometry import patch_coords
from .io import write_atomic
from .vit import VisionTransformer

ATTENTION_BYTES = 2**30  # one layer's float32 attention weights for a chunk of images stay within this


def images_per_chunk(tokens: int, heads: int, budget: int = ATTENTION_BYTES) -> int:
    """How many images' attention weights (``heads x tokens x tokens``, float32) fit in ``budget``; at least one."""
    return max(1, budget // (4 * heads * tokens * tokens))


@contextmanager
def capture_attention(model: VisionTransformer,
                      each: Optional[Callable[[int, torch.Tensor], None]] = None) -> Iterator[list[torch.Tensor]]:
    """Within the block, every forward appends each layer's attention weights ``(B, H, T, T)`` to the
    list it yields; with ``each``, passes them to ``each(layer, weights)`` instead and keeps none."""
    captured: list[torch.Tensor] = []

    def hook(module, args, output):
        x, pos, grid, p, state = args
        B, T, C = x.shape
        qkv = module.qkv(x).reshape(B, T, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)
        weights = pos.attention_weights(qkv[0], qkv[1], grid=grid, layer=module.layer, num_prefix_tokens=p,
                                        state=state).detach()
        if each is None:
            captured.append(weights)
        else:
            each(module.layer, weights)

    handles = [blk.attn.register_forward_hook(hook) for blk in model.blocks]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


@functools.lru_cache(maxsize=4)
def _patch_distances(grid: tuple[int, int]) -> torch.Tensor:
    y, x = (c.double() for c in patch_coords(*grid))
    return torch.hypot(y[:, None] - y[None], x[:, None] - x[None])


def mean_attention_distance(weights: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int = 1) -> torch.Tensor:
    """Per head, the attention-weighted distance (in patches) from patch queries to patch keys,
    with each query's weights renormalised over the patch keys. ``weights``: ``(B, H, T, T)``."""
    p = num_prefix_tokens
    w = weights[:, :, p:, p:].double()
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
    return (w * _patch_distances(tuple(grid))).sum(-1).mean(dim=(0, 2))


def head_diversity(weights: torch.Tensor) -> float:
    """Mean pairwise Jensen-Shannon divergence (nats) between heads' attention distributions.

    With m = (a + b) / 2, JS(a, b) = (sum a log a + sum b log b) / 2 - sum m log m: each head's own
    term is summed once, so a pair costs one pass over its weights (0 log 0 = 0)."""
    w = weights.double().clamp_min(0)
    H = w.shape[1]
    own = torch.special.xlogy(w, w).sum(-1)  # (B, H, queries)
    total, pairs = 0.0, 0
    for i in range(H):
        for j in range(i + 1, H):
            m = 0.5 * (w[:, i] + w[:, j])
            total += float((0.5 * (own[:, i] + own[:, j]) - torch.special.xlogy(m, m).sum(-1)).mean())
            pairs += 1
    return total / max(pairs, 1)


def token_similarity(tokens: torch.Tensor) -> float:
    """Mean pairwise cosine similarity between distinct tokens ``(B, N, C)``."""
    t = F.normalize(tokens.double(), dim=-1)
    sim = t @ t.transpose(-1, -2)
    n = sim.shape[-1]
    off = (sim.sum(dim=(-1, -2)) - sim.diagonal(dim1=-2, dim2=-1).sum(-1)) / (n * (n - 1))
    return float(off.mean())


def analyze(model: VisionTransformer, images: torch.Tensor, chunk: Optional[int] = None) -> dict[str, Any]:
    """Per-layer diagnostics on a batch of images (one size), on the model's device: each a mean over
    the images, reduced ``chunk`` images at a time (default: as many as :data:`ATTENTION_BYTES` holds)."""
    model.eval()
    device = next(model.parameters()).device
    grid = model.grid_for(images)
    p, depth, heads = model.num_prefix_tokens, len(model.blocks), model.blocks[0].attn.num_heads
    chunk = chunk or images_per_chunk(p + grid[0] * grid[1], heads)
    centre = p + (grid[0] // 2) * grid[1] + grid[1] // 2
    # per layer, sums over images of: distance per head, head diversity, token similarity, centre maps
    sums = [{"distance": 0.0, "diversity": 0.0, "similarity": 0.0, "centre": 0.0} for _ in range(depth)]

    def reduce(layer: int, weights: torch.Tensor) -> None:
        w, b, s = weights.float().cpu(), len(weights), sums[layer]
        s["distance"] = s["distance"] + mean_attention_distance(w, grid, p) * b
        s["diversity"] += head_diversity(w[:, :, p:]) * b
        s["centre"] = s["centre"] + w[:, :, centre, p:].double().sum(0)

    for part in images.split(chunk):
        with torch.no_grad(), capture_attention(model, reduce):
            _, inter = model.forward_intermediates(part.to(device), output_fmt="NLC")
        for layer, tokens in enumerate(inter):
            sums[layer]["similarity"] += token_similarity(tokens.float().cpu()) * len(part)
    n = len(images)
    layers = []
    for s in sums:
        dist = s["distance"] / n
        layers.append({"mean_attention_distance": float(dist.mean()), "per_head_distance": dist.tolist(),
                       "head_diversity_js": s["diversity"] / n, "token_similarity": s["similarity"] / n})
    maps = torch.stack([(s["centre"] / n).float().reshape(-1, *grid) for s in sums])
    return {"grid": list(grid), "layers": layers, "centre_maps": maps}


def plot_attention_maps(maps_by_size: dict[int, torch.Tensor], layer: int, path: str | Path) -> str:
    """Rows: sizes; columns: heads; each panel the centre query's attention over patches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(maps_by_size)
    H = maps_by_size[sizes[0]].shape[1]
    fig, axes = plt.subplots(len(sizes), H, figsize=(1.3 * H, 1.4 * len(sizes) + 0.5), squeeze=False)
    for r, s in enumerate(sizes):
        maps = maps_by_size[s][layer]
        for h in range(H):
            ax = axes[r, h]
            ax.imshow(maps[h].numpy(), cmap="magma")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"head {h}", fontsize=7)
            if h == 0:
                ax.set_ylabel(f"{s} px", fontsize=7)
    depth = len(maps_by_size[sizes[0]])
    fig.suptitle(f"layer {layer} (of layers 0 to {depth - 1}): attention of the centre patch, averaged over images",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot_layer_metrics(results: dict[int, dict[str, Any]], path: str | Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    keys = [("mean_attention_distance", "mean attention distance (patches)"),
            ("head_diversity_js", "head diversity (JS, nats)"), ("token_similarity", "patch-token cosine similarity")]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.3))
    for ax, (k, label) in zip(axes, keys):
        for size, res in sorted(results.items()):
            ax.plot([layer[k] for layer in res["layers"]], marker="o", ms=3, label=f"{size} px")
        ax.set_xlabel("layer")  # counted from 0, as --layer and the table count them
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def run_analysis(model: VisionTransformer, images_by_size: dict[int, torch.Tensor], out_dir: str | Path,
                 layer: int | None = None, device: str | torch.device = "cpu") -> dict[str, Any]:
    depth = len(model.blocks)
    layer = depth - 1 if layer is None else layer
    if not 0 <= layer < depth:
        raise ValueError(f"--layer {layer}: the model has layers 0 to {depth - 1}")
    model = model.to(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {size: analyze(model, imgs) for size, imgs in images_by_size.items()}
    files = {"attention_maps": plot_attention_maps({s: r["centre_maps"] for s, r in results.items()}, layer,
                                                   out / "attention_maps.png"),
             "layer_metrics": plot_layer_metrics(results, out / "layer_metrics.png")}
    pe = model.pos_encoding
    if hasattr(pe, "config") and hasattr(pe, "num_heads"):
        from .plots import plot_fov

        files["fov"] = plot_fov(pe.config, out / "fov.png", num_heads=pe.num_heads, depth=pe.depth, layer=layer)
    summary = {str(s): {"grid": r["grid"], "layers": r["layers"]} for s, r in results.items()}
    write_atomic(out / "analysis.json", lambda p: p.write_text(json.dumps(summary, indent=2)))
    files["json"] = str(out / "analysis.json")
    return {"files": files, "summary": summary}


def table(summary: dict[str, Any]) -> str:
    lines = ["| size | layer | mean attention distance | head diversity (JS) | token similarity |",
             "|---:|---:|---:|---:|---:|"]
    for size, res in summary.items():
        for i, layer in enumerate(res["layers"]):
            lines.append(f"| {size} | {i} | {layer['mean_attention_distance']:.3f} | "
                         f"{layer['head_diversity_js']:.4f} | {layer['token_similarity']:.4f} |")
    return "\n".join(lines) + "\n"

