"""Backbone ablation: does our ViT learn what a minimal ViT with the same LookHere bias learns?

Every model has 4 blocks, width 96, 12 heads, patch 4 and a CLS token, and is trained at 32 px (an
8x8 grid) on 10,000 synthetic scenes for 12 epochs (batch 128, AdamW lr 1e-3 one-cycle with 10%
warmup, weight decay 0.05, label smoothing 0.1, clipping 1.0, horizontal flips on the what task),
then tested on 500 test scenes rendered natively at 32, 48, 64, 96 and 128 px (1x to 4x).

``minimal`` is a pre-norm ViT written out by hand (``tests/minimal_vit.py``): PyTorch's default
initialisation, no LayerScale, a zero CLS token, a linear head, the LH-90 bias of
``lookhere.dense_bias`` added to the attention scores; it is tested at large sizes through the same
function as a ``create_vit`` model (its weights copied, the logits checked equal). The other
variants are ``lookhere.create_vit`` models with one difference at a time (``VARIANTS``), and
``train-defaults`` is ``lookhere train`` with its own defaults.

    OMP_NUM_THREADS=1 python benchmarks/backbone_ablation.py --out docs/backbone-ablation --shard 0/2 &
    OMP_NUM_THREADS=1 python benchmarks/backbone_ablation.py --out docs/backbone-ablation --shard 1/2 &
    python benchmarks/backbone_ablation.py --out docs/backbone-ablation --report docs/backbone-ablation/tables.md

Each run writes ``OUT/<variant>/<task>/seed<k>.json`` (atomically); a rerun skips finished runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

import lookhere
from lookhere.data.factory import SYNTHETIC_TASKS
from lookhere.data.synthetic import SyntheticScenes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from minimal_vit import MinimalViT  # noqa: E402  (the reference the tests hold our defaults to)

DIM, DEPTH, HEADS, PATCH, TRAIN_PX = 96, 4, 12, 4, 32
SIZES = (32, 48, 64, 96, 128)
TASKS = ("what", "where", "far")
CACHE = Path(os.environ.get("LOOKHERE_CACHE", Path.home() / ".cache" / "lookhere")) / "ablation"


# --- data: rendered once, cached ---------------------------------------------------------------
def scenes(task: str, split: str, n: int, px: int) -> tuple[torch.Tensor, torch.Tensor]:
    path = CACHE / f"{task}-{split}-{n}-{px}.pt"
    if path.is_file():
        d = torch.load(path, weights_only=True)
        return d["x"], d["y"]
    ds = SyntheticScenes(split, px, n, seed=0, task=task)
    xs, ys = zip(*(ds[i] for i in range(n)))
    x, y = torch.stack(xs), torch.tensor(ys)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"x": x, "y": y}, tmp)
    os.replace(tmp, path)
    return x, y


# --- our model, one difference at a time -------------------------------------------------------
def torch_default_init(model: nn.Module) -> None:
    """Every Linear, Conv2d and LayerNorm back to PyTorch's own initialisation."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.LayerNorm)):
            m.reset_parameters()


def ours(num_classes: int, *, init: str = "default", cls: str = "default", pos: str = "lh-90", **kwargs) -> nn.Module:
    """A create_vit model; ``init="torch"`` re-initialises it with PyTorch's own initialisation,
    ``"trunc02"`` builds it with ``weight_init="timm"`` (every Linear N(0, 0.02), biases 0, the CLS
    token N(0, 0.02) unless ``cls`` says otherwise)."""
    if init == "trunc02":
        kwargs["weight_init"] = "timm"
    model = lookhere.create_vit(pos, img_size=TRAIN_PX, patch_size=PATCH, embed_dim=DIM, depth=DEPTH,
                                num_heads=HEADS, num_classes=num_classes, **kwargs)
    if init == "torch":
        torch_default_init(model)
    if cls == "zeros":
        nn.init.zeros_(model.cls_token)
    elif cls == "trunc02":
        trunc_normal_(model.cls_token, std=0.02)
    return model


# name -> (model builder kwargs, recipe overrides); ``matched`` is ours with every difference from the
# minimal reference removed; the ``matched+X`` rows put back one difference each.
MATCHED = dict(init="torch", cls="zeros", init_values=0)
VARIANTS: dict[str, tuple[dict, dict]] = {
    "minimal": ({}, {}),
    # create_vit's defaults before this ablation, spelled out: timm's init, CLS N(0, 0.02), LayerScale 1e-4
    "ours-default": (dict(init="trunc02", init_values=1e-4), {}),
    "matched": (MATCHED, {}),
    "matched+trunc-init": ({**MATCHED, "init": "trunc02"}, {}),
    "matched+ls1e-4": ({**MATCHED, "init_values": 1e-4}, {}),
    "matched+ls0.1": ({**MATCHED, "init_values": 0.1}, {}),
    "matched+cls-trunc": ({**MATCHED, "cls": "trunc02"}, {}),
    "matched+wd-groups": (MATCHED, dict(wd="groups")),
    "matched+cosine": (MATCHED, dict(schedule="cosine")),
    "new-default": ({}, {}),
    # The same question for 2D-RoPE (mixed): the old and the new defaults of create_vit.
    "rope-new-default": (dict(pos="rope-2d-mixed"), {}),
    "rope-ours-default": (dict(pos="rope-2d-mixed", init="trunc02", init_values=1e-4), {}),
    "rope-new+ls0.1": (dict(pos="rope-2d-mixed", init_values=0.1), {}),
}


def build(variant: str, num_classes: int) -> nn.Module:
    if variant == "minimal":
        return MinimalViT(num_classes, DIM, DEPTH, HEADS, PATCH)
    return ours(num_classes, **VARIANTS[variant][0])


# --- the loop ------------------------------------------------------------------------------------
def train_and_test(variant: str, task: str, seed: int, epochs: int = 12, n_train: int = 10000,
                   n_test: int = 500) -> dict:
    recipe = {"wd": "all", "schedule": "onecycle", **VARIANTS[variant][1]}
    x, y = scenes(task, "train", n_train, TRAIN_PX)
    num_classes = int(y.max()) + 1
    torch.manual_seed(seed)
    model = build(variant, num_classes)
    if recipe["wd"] == "groups":  # timm's: no decay on norms, biases and tokens
        from timm.optim import param_groups_weight_decay
        params = param_groups_weight_decay(model, 0.05, model.no_weight_decay())
    else:
        params = model.parameters()
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    steps_per_epoch = math.ceil(n_train / 128)
    total = epochs * steps_per_epoch
    if recipe["schedule"] == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=total, pct_start=0.1)
    else:  # lookhere train's old one: linear warmup from lr/1000 over a tenth of an epoch, cosine to 1e-5, per
        # step (here the cosine starts after the warmup's 8 steps, in lookhere train with it: 8 of 948 steps)
        from timm.scheduler import CosineLRScheduler
        warm = max(1, round(0.1 * steps_per_epoch))
        sched = CosineLRScheduler(opt, t_initial=total - warm, lr_min=1e-5, warmup_t=warm, warmup_lr_init=1e-6,
                                  t_in_epochs=False, warmup_prefix=True)
    g = torch.Generator().manual_seed(seed)
    curve, step, t0 = [], 0, time.perf_counter()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(n_train, generator=g)
        for i in range(0, n_train, 128):
            idx = order[i:i + 128]
            xb, yb = x[idx], y[idx]
            if task == "what":
                flip = torch.rand(len(idx), generator=g) < 0.5
                xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = F.cross_entropy(model(xb), yb, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            sched.step() if recipe["schedule"] == "onecycle" else sched.step_update(step)
        curve.append(round(loss.item(), 4))
    top1 = {}
    if isinstance(model, MinimalViT):
        ref, model = model.eval(), model.as_lookhere().eval()
        with torch.no_grad():
            diff = (ref(x[:64]) - model(x[:64])).abs().max().item()
        if diff > 1e-4:
            raise RuntimeError(f"the minimal model and its create_vit copy differ by {diff}")
    model.eval()
    with torch.no_grad():
        for px in SIZES:
            xt, yt = scenes(task, "test", n_test, px)
            correct = sum((model(xt[i:i + 50]).argmax(-1) == yt[i:i + 50]).sum().item() for i in range(0, n_test, 50))
            top1[str(px)] = 100.0 * correct / n_test
    return dict(variant=variant, task=task, seed=seed, top1=top1, final_losses=curve,
                seconds=round(time.perf_counter() - t0, 1), torch=torch.__version__)


def train_defaults(task: str, seed: int, out: Path) -> dict:
    """``lookhere train`` with its defaults (its recipe: warmup, cosine, weight-decay groups, no flips)
    on as many scenes (drawn with the run's seed), at the same size and length, then ``lookhere eval``
    on the same test scenes."""
    run = out / "runs" / f"{task}-seed{seed}"
    data = next(name for name, t in SYNTHETIC_TASKS.items() if t == task)
    base = [sys.executable, "-m", "lookhere.cli"]
    t0 = time.perf_counter()
    args = ["train", "--data", data, "--pos-encoding", "lh-90", "--embed-dim", str(DIM), "--depth", str(DEPTH),
            "--num-heads", str(HEADS), "--img-size", str(TRAIN_PX), "--patch-size", str(PATCH),
            "--data-length", "10000", "--epochs", "12", "--batch-size", "128", "--seed", str(seed),
            "--no-progress", "--output", str(run)]
    if (run / "config.yaml").is_file():
        args += ["--resume", str(run)]
    subprocess.run(base + args, check=True)
    ev = run / "eval"
    subprocess.run(base + ["eval", "--checkpoint", str(run / "last"), "--data", data, "--split", "test",
                           "--length", "500", "--seed", "0", "--sizes", *map(str, SIZES), "--output", str(ev),
                           "--no-progress"], check=True)
    result = json.loads((ev / "eval.json").read_text())
    top1 = {size: 100.0 * m["top1"] for size, m in result["sizes"].items()}
    return dict(variant="train-defaults", task=task, seed=seed, top1=top1, seconds=round(time.perf_counter() - t0, 1))


def runs(out: Path) -> dict[tuple[str, str], list[dict]]:
    rows: dict[tuple[str, str], list[dict]] = {}
    for p in sorted(out.glob("*/*/seed*.json")):
        r = json.loads(p.read_text())
        rows.setdefault((r["task"], r["variant"]), []).append(r)
    return rows


def plot(out: Path, path: Path, variants=("minimal", "ours-default", "new-default", "train-defaults",
                                          "rope-ours-default", "rope-new-default")) -> None:
    """Top-1 against test size per task: the reference, the old and new defaults (mean, seeds as dots;
    2D-RoPE dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = runs(out)
    tasks = [t for t in TASKS if any((t, v) in rows for v in variants)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for i, v in enumerate(variants):
            if (task, v) not in rows:
                continue
            acc = np.array([[r["top1"][str(s)] for s in SIZES] for r in rows[(task, v)]])
            ratio = np.array(SIZES) / TRAIN_PX
            line, = ax.plot(ratio, acc.mean(0), marker="o", label=f"{v} ({len(acc)} seeds)", zorder=3,
                            linestyle="--" if v.startswith("rope-") else "-")
            for a in acc:
                ax.scatter(ratio, a, s=9, color=line.get_color(), alpha=0.5, zorder=2)
        ax.set_title(f"{task} task, trained at {TRAIN_PX} px (8x8 grid)", fontsize=9)
        ax.set_xlabel("test size / training size")
        ax.set_ylabel("top-1 (%)")
        ax.set_xticks(np.array(SIZES) / TRAIN_PX)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(out: Path) -> str:
    rows = runs(out)
    order = list(VARIANTS) + ["train-defaults"]
    lines = []
    for task in TASKS:
        present = [v for v in order if (task, v) in rows]
        if not present:
            continue
        lines += [f"\n### {task} task\n", "| variant | seeds | " + " | ".join(f"{s} px" for s in SIZES) +
                  " | 1x, 1.5x vs reference |", "|---|---:|" + "---:|" * len(SIZES) + "---|"]
        for v in present:
            rs = rows[(task, v)]
            acc = np.array([[r["top1"][str(s)] for s in SIZES] for r in rs])
            cells = [f"{m:.1f} ± {sd:.1f}" for m, sd in zip(acc.mean(0), acc.std(0, ddof=1) if len(rs) > 1 else 0 * acc[0])]
            # LookHere rows against the minimal model; 2D-RoPE rows against 2D-RoPE on the new defaults.
            reference = "rope-new-default" if v.startswith("rope-") else "minimal"
            ref, delta = rows.get((task, reference)), ""
            if ref and v != reference:
                r0 = np.array([[r["top1"][str(s)] for s in SIZES[:2]] for r in ref]).mean(0)
                d = acc[:, :2].mean(0) - r0
                delta = f"{d[0]:+.1f}, {d[1]:+.1f}"
            lines.append(f"| {v} | {len(rs)} | " + " | ".join(cells) + f" | {delta} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("ablation"))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS) + ["train-defaults"])
    p.add_argument("--tasks", nargs="+", default=["what", "where"], choices=TASKS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--shard", default="0/1", help="K/N: run every N-th job starting at K (jobs in the order of "
                   "--variants, then --tasks, then --seeds)")
    p.add_argument("--report", type=Path, help="write the Markdown tables of OUT's runs here, and the plot beside "
                   "it (.png), and stop")
    args = p.parse_args()
    if args.report:
        args.report.write_text(report(args.out))
        plot(args.out, args.report.with_suffix(".png"))
        print(args.report.read_text())
        return
    unknown = set(args.variants) - set(VARIANTS) - {"train-defaults"}
    if unknown:
        p.error(f"unknown variant(s) {sorted(unknown)}; allowed: {', '.join(VARIANTS)}, train-defaults")
    k, n = (int(a) for a in args.shard.split("/"))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    for i, (v, t, s) in enumerate((v, t, s) for v in args.variants for t in args.tasks for s in args.seeds):
        path = args.out / v / t / f"seed{s}.json"
        if i % n != k or path.is_file():
            continue
        r = train_defaults(t, s, args.out) if v == "train-defaults" else train_and_test(v, t, s)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".tmp").write_text(json.dumps(r, indent=1))
        os.replace(path.with_suffix(".tmp"), path)
        print(f"{v:24s} {t:6s} seed{s}: " + " ".join(f"{r['top1'][str(px)]:5.1f}" for px in SIZES) +
              f"  ({r['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
