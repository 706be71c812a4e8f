import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lookhere import PRESETS, create_vit, dense_bias
from lookhere.position import build_position_encoding

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("LOOKHERE_GOLDEN", ROOT.parent / "shared" / "golden"))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield


@pytest.fixture(scope="session")
def golden_file() -> Path:
    path = GOLDEN / "lookhere_bias_public.npz"
    if not path.is_file():
        pytest.skip(f"golden LookHere matrices not found at {path} (set LOOKHERE_GOLDEN to the folder)")
    return path


# --- helpers shared by several test modules ----------------------------------------------------
TRAIN_GRID = (4, 4)


CONFIGS = {
    **PRESETS,
    "corners-diagonals-center": {"global_slope": 1.0, "layer_slopes": [1.5, 0.5],
                                 "head_directions": "corners-diagonals-center"},
    "eighths-halves": {"global_slope": 1.2, "layer_slopes": [0.5, 1.5], "head_directions": "eighths1-eighths2-halves"},
    "sqrt-zero": {"global_slope": 0.8, "layer_slopes": [1.0, 2.0], "head_directions": "halves-zerotriangles",
                  "distance": "sqrt", "fill_with": "zero"},
    "square-max": {"global_slope": 0.3, "layer_slopes": [1.0, 1.0], "head_directions": "triangles-none3zero1",
                   "distance": "square", "fill_with": "max"},
}


def small(name, **kw):
    args = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=12, num_classes=5, init_values=0.5)
    return create_vit(name, **dict(args, **kw))


def encoding(name, **kw):
    return build_position_encoding(name, embed_dim=48, num_heads=12, depth=2, grid_size=TRAIN_GRID, **kw)


def dense_reference(q, k, v, config, grid, layer, depth, prefix):
    """softmax(q k^T / sqrt(D) + bias) v in float64, with the full bias padded for prefix tokens."""
    H, D = q.shape[1], q.shape[-1]
    bias = dense_bias(config, grid, depth, H)[layer].double()
    bias = F.pad(bias, (prefix, 0, prefix, 0))
    scores = q.double() @ k.double().transpose(-1, -2) / math.sqrt(D) + bias
    return scores.softmax(-1) @ v.double()


def pattern_output(pe, grid, offset, torch_seed=0):
    """Attention outputs at a 3x3 pattern of tokens placed at `offset` in `grid` (background ignored)."""
    g = torch.Generator().manual_seed(torch_seed)
    C, H, D, ph, pw = 48, 12, 4, 3, 3
    pattern = torch.randn(ph * pw, C, generator=g)
    wq, wk, wv = (torch.randn(C, C, generator=g) / math.sqrt(C) for _ in range(3))
    n = grid[0] * grid[1]
    idx = torch.tensor([(y + offset[0]) * grid[1] + x + offset[1] for y in range(ph) for x in range(pw)])
    x = torch.zeros(1, n, C)
    x[0, idx] = pattern
    x = pe.embed(x, grid)
    split = lambda t: t.reshape(1, n, H, D).transpose(1, 2)  # noqa: E731
    q, k, v = split(x @ wq), split(x @ wk), split(x @ wv)
    background = torch.ones(n, dtype=torch.bool)
    background[idx] = False
    q[..., 0] = 1.0 + q[..., 0].abs()  # every q has a positive first component ...
    k[..., 0] = k[..., 0].clamp(-1, 1)
    k[:, :, background, 0] = -1e3  # ... so background keys get no attention
    v[:, :, background] = 0
    with torch.no_grad():
        out = pe.attend(q, k, v, grid=grid, layer=1, num_prefix_tokens=0)
    return out[:, :, idx]


def image_folder(root, n=4, size=40, corrupt=False):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)).save(d / f"{i}.png")
    if corrupt:
        (root / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")


def hf_parquet(root, train=24, val=6, shards=2, classes=3, size=24):
    """A Hugging Face dataset as local parquet files: ``train-0000k-of-0000n.parquet`` (``shards`` of
    them, for loader workers to share when streamed) and ``validation-00000-of-00001.parquet``; labels
    ``i % classes``."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=classes)})
    root.mkdir(parents=True, exist_ok=True)
    for split, n, parts in (("train", train, shards), ("validation", val, 1)):
        for k in range(parts):
            idx = range(k * n // parts, (k + 1) * n // parts)
            imgs = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in idx]
            ds = datasets.Dataset.from_dict({"image": imgs, "label": [i % classes for i in idx]}, features=features)
            ds.to_parquet(str(root / f"{split}-{k:05d}-of-{parts:05d}.parquet"))
    return root


def hr_folder(root, sizes, labels, seed=0):
    """A folder in ImageNet-HR's layout: test/*.png and test/metadata.jsonl (file_name, img_idx, labels)."""
    import json

    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "test").mkdir(parents=True)
    with open(root / "test" / "metadata.jsonl", "w") as f:
        for i, ((h, w), lab) in enumerate(zip(sizes, labels)):
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "test" / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "img_idx": i, "labels": lab}) + "\n")
    return root


def direct_eval_tensor(path, size, train_size, crop_pct=0.875, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    """The paper's evaluation transform, computed with PIL alone: shorter side to size / crop_pct at
    the training size (else to size), bicubic; centre crop; normalise."""
    import math

    from PIL import Image

    img = Image.open(path).convert("RGB")
    w, h = img.size
    short = math.floor(size / crop_pct) if size == train_size else size
    new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    img = img.resize(new, Image.BICUBIC)
    left, top = int(round((new[0] - size) / 2)), int(round((new[1] - size) / 2))
    arr = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float64) / 255
    return torch.from_numpy(((arr - mean) / std).transpose(2, 0, 1)).float()


# A released-format LookHere checkpoint, small, with random weights (tests/test_official.py, test_finetune.py).
LH = {"global_slope": 0.75, "layer_slopes": [1.5, 0.5], "head_directions": "eighths1-eighths2-triangles"}
DIM, DEPTH, HEADS, PATCH, MLP, CLASSES = 48, 2, 12, 8, 96, 10


def released_weights(seed=0):
    """A state dict with the released DeiT-III-style key names and random values."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    w = {"cls_token": r(1, 1, DIM), "patch_embed.proj.weight": r(DIM, 3, PATCH, PATCH),
         "patch_embed.proj.bias": r(DIM), "norm.weight": 1 + r(DIM), "norm.bias": r(DIM),
         "head.fc1.weight": r(64, DIM), "head.fc1.bias": r(64), "head.fc2.weight": r(CLASSES, 64),
         "head.fc2.bias": r(CLASSES)}
    for i in range(DEPTH):
        b = f"blocks.{i}."
        w.update({b + "norm1.weight": 1 + r(DIM), b + "norm1.bias": r(DIM), b + "attn.qkv.weight": r(3 * DIM, DIM),
                  b + "attn.qkv.bias": r(3 * DIM), b + "attn.proj.weight": r(DIM, DIM), b + "attn.proj.bias": r(DIM),
                  b + "ls1.gamma": r(DIM), b + "norm2.weight": 1 + r(DIM), b + "norm2.bias": r(DIM),
                  b + "mlp.fc1.weight": r(MLP, DIM), b + "mlp.fc1.bias": r(MLP), b + "mlp.fc2.weight": r(DIM, MLP),
                  b + "mlp.fc2.bias": r(DIM), b + "ls2.gamma": r(DIM)})
    return w


@pytest.fixture
def released_file(tmp_path):
    """A released-format checkpoint (the weights under ``module.``, as DDP saved them) and its weights."""
    w = released_weights()
    path = tmp_path / "LH_45_weights_and_config.pth"
    torch.save({"config": dict(LH), "weights": {f"module.{k}": v for k, v in w.items()}}, path)
    return path, w
