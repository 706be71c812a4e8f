"""A PNG grid of synthetic samples, each rendered at two resolutions side by side."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .synthetic import ORIENTATIONS, SHAPES, SIDES, SyntheticScenes  # noqa: E402


def preview(path: str, sizes=(32, 128), count: int = 8, split: str = "train", task: str = "what",
            seed: int = 0) -> str:
    ds = SyntheticScenes(split, sizes[0], max(count, 1), seed=seed, task=task)
    fig, axes = plt.subplots(len(sizes), count, figsize=(1.7 * count, 1.9 * len(sizes)), squeeze=False)
    for i in range(count):
        sc = ds.scene(i)
        what = f"{SHAPES[sc.shape]}/{ORIENTATIONS[sc.orientation][:5]}"
        if task == "where":
            what = f"marker {SIDES[sc.side]}"
        elif task == "far":
            what = f"{SHAPES[sc.shape]}/marker {SIDES[sc.side]}"
        for r, s in enumerate(sizes):
            ax = axes[r, i]
            ax.imshow(np.clip(ds.render(i, s).transpose(1, 2, 0), 0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{what}\nsize {sc.size:.2f}", fontsize=7)
            if i == 0:
                ax.set_ylabel(f"{s} px", fontsize=8)
    fig.suptitle(f"synthetic '{task}' task: the same scenes at {' and '.join(map(str, sizes))} px", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
