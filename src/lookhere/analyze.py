"""Attention diagnostics: how far heads look, how different they are, how alike the tokens become.

Attention weights are captured with forward hooks on the model's own attention modules and the
position encoding's unfused ``attention_weights`` (equal to its fused path, by test); nothing of
the model is copied.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from .vit import VisionTransformer


@contextmanager
def capture_attention(model: VisionTransformer) -> Iterator[list[torch.Tensor]]:
    """Within the block, every forward appends each layer's attention weights ``(B, H, T, T)``."""
    captured: list[torch.Tensor] = []

    def hook(module, args, output):
        x, pos, grid, p, state = args
        B, T, C = x.shape
        qkv = module.qkv(x).reshape(B, T, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)
        captured.append(pos.attention_weights(qkv[0], qkv[1], grid=grid, layer=module.layer,
                                              num_prefix_tokens=p, state=state).detach())

    handles = [blk.attn.register_forward_hook(hook) for blk in model.blocks]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def _patch_distances(grid: tuple[int, int]) -> torch.Tensor:
    idx = torch.arange(grid[0] * grid[1])
    y, x = (idx // grid[1]).float(), (idx % grid[1]).float()
    return torch.hypot(y[:, None] - y[None], x[:, None] - x[None])


def mean_attention_distance(weights: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int = 1) -> torch.Tensor:
    """Per head, the attention-weighted distance (in patches) from patch queries to patch keys,
    with each query's weights renormalised over the patch keys. ``weights``: ``(B, H, T, T)``."""
    p = num_prefix_tokens
    w = weights[:, :, p:, p:].double()
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
    return (w * _patch_distances(grid).double()).sum(-1).mean(dim=(0, 2))


def head_diversity(weights: torch.Tensor) -> float:
    """Mean pairwise Jensen-Shannon divergence (nats) between heads' attention distributions."""
    w = weights.double().clamp_min(0)
    H = w.shape[1]
    total, pairs = 0.0, 0
    for i in range(H):
        for j in range(i + 1, H):
            a, b = w[:, i], w[:, j]
            m = 0.5 * (a + b)
            kl_a = torch.where(a > 0, a * (a.clamp_min(1e-300).log() - m.clamp_min(1e-300).log()), 0.0).sum(-1)
            kl_b = torch.where(b > 0, b * (b.clamp_min(1e-300).log() - m.clamp_min(1e-300).log()), 0.0).sum(-1)
            total += float((0.5 * (kl_a + kl_b)).mean())
            pairs += 1
    return total / max(pairs, 1)


def token_similarity(tokens: torch.Tensor) -> float:
    """Mean pairwise cosine similarity between distinct tokens ``(B, N, C)``."""
    t = F.normalize(tokens.double(), dim=-1)
    sim = t @ t.transpose(-1, -2)
    n = sim.shape[-1]
    off = (sim.sum(dim=(-1, -2)) - sim.diagonal(dim1=-2, dim2=-1).sum(-1)) / (n * (n - 1))
    return float(off.mean())


def analyze(model: VisionTransformer, images: torch.Tensor) -> dict[str, Any]:
    """Per-layer diagnostics on a batch of images (one size), on the model's device."""
    model.eval()
    images = images.to(next(model.parameters()).device)
    grid = model.grid_for(images)
    with torch.no_grad(), capture_attention(model) as attn:
        _, inter = model.forward_intermediates(images, output_fmt="NLC")
    attn = [w.float().cpu() for w in attn]
    inter = [t.float().cpu() for t in inter]
    layers = []
    for w, tokens in zip(attn, inter):
        dist = mean_attention_distance(w, grid, model.num_prefix_tokens)
        layers.append({"mean_attention_distance": float(dist.mean()), "per_head_distance": dist.tolist(),
                       "head_diversity_js": head_diversity(w[:, :, model.num_prefix_tokens:]),
                       "token_similarity": token_similarity(tokens)})
    centre = model.num_prefix_tokens + (grid[0] // 2) * grid[1] + grid[1] // 2
    maps = torch.stack([w[:, :, centre, model.num_prefix_tokens:].mean(0).reshape(-1, *grid) for w in attn])
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
    fig.suptitle(f"layer {layer + 1} of {depth}: attention of the centre patch, averaged over images", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot_layer_metrics(results: dict[int, dict[str, Any]], path: str | Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("mean_attention_distance", "mean attention distance (patches)"),
            ("head_diversity_js", "head diversity (JS, nats)"), ("token_similarity", "patch-token cosine similarity")]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.3))
    for ax, (k, label) in zip(axes, keys):
        for size, res in sorted(results.items()):
            ax.plot([layer[k] for layer in res["layers"]], marker="o", ms=3, label=f"{size} px")
        ax.set_xlabel("layer")
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
    (out / "analysis.json").write_text(json.dumps(summary, indent=2))
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

