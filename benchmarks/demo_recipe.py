"""The demo's recipe, one setting at a time: which backbone settings let each encoding learn there?

``lookhere demo`` trains ViT-micro (6 blocks, width 96, 12 heads, patch 4) at 32 px on 3,500
synthetic scenes for 8 epochs, batch 64, AdamW at lr 2e-3 with 0.3 epochs of warmup (cosine to
1e-5, weight decay 0.05 off norms, biases and tokens, label smoothing 0.1, clipping 1.0), through
``lookhere train``; the shipped studies use the same lr and warmup. This runs that recipe with one
change at a time (``VARIANTS``) for LH-90 and 2D-RoPE (mixed), and tests on the demo's 500 test
scenes at 32, 48, 64 and 128 px, one thread per run:

    OMP_NUM_THREADS=1 python benchmarks/demo_recipe.py --out docs/backbone-ablation/demo-recipe --shard 0/2 &
    OMP_NUM_THREADS=1 python benchmarks/demo_recipe.py --out docs/backbone-ablation/demo-recipe --shard 1/2 &
    python benchmarks/demo_recipe.py --out docs/backbone-ablation/demo-recipe --report

Each run writes ``OUT/<variant>/<encoding>/seed<k>.json`` (atomically); a rerun skips finished runs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from lookhere.evaluate import EvalSettings, load_checkpoint, run_eval
from lookhere.io import write_atomic
from lookhere.train import TrainConfig, train

SIZES = (32, 48, 64, 128)
ENCODINGS = ("lh-90", "rope-2d-mixed")
# name -> TrainConfig settings that differ from the demo's (the demo's own: ``demo``)
VARIANTS = {
    "demo": {},
    "layerscale-0.1": dict(init_values=0.1),
    "timm-init+layerscale-0.1": dict(weight_init="timm", init_values=0.1),  # lookhere train's defaults before
    "lr-1e-3+warmup-10%": dict(lr=1e-3, warmup_epochs=None),
}


def run(variant: str, encoding: str, seed: int) -> dict:
    t0 = time.perf_counter()
    settings = dict(data="synthetic", data_length=3500, pos_encoding=encoding, model="micro", img_size=32,
                    patch_size=4, epochs=8, batch_size=64, lr=2e-3, warmup_epochs=0.3, seed=seed, progress=False,
                    log_every=20, checkpoint_every=50)
    settings.update(VARIANTS[variant])
    with tempfile.TemporaryDirectory() as tmp:
        train(TrainConfig(**settings, output=str(Path(tmp) / "run")))
        model, _ = load_checkpoint(Path(tmp) / "run")
        res = run_eval(model, EvalSettings(data="synthetic", sizes=list(SIZES), train_size=32, length=500, seed=seed),
                       progress=False)
    return dict(variant=variant, encoding=encoding, seed=seed,
                top1={str(s): round(100 * m["top1"], 1) for s, m in res["sizes"].items()},
                settings={k: v for k, v in settings.items() if k not in ("progress",)},
                seconds=round(time.perf_counter() - t0, 1))


def report(out: Path) -> str:
    rows = {}
    for p in sorted(out.glob("*/*/seed*.json")):
        r = json.loads(p.read_text())
        rows.setdefault((r["encoding"], r["variant"]), []).append(r)
    lines = ["| encoding | variant | seeds | " + " | ".join(f"{s} px" for s in SIZES) + " |",
             "|---|---|---:|" + "---:|" * len(SIZES)]
    for encoding in ENCODINGS:
        for variant in VARIANTS:
            rs = rows.get((encoding, variant))
            if not rs:
                continue
            acc = np.array([[r["top1"][str(s)] for s in SIZES] for r in rs])
            cells = [f"{m:.1f}" + (f" ± {sd:.1f}" if len(rs) > 1 else "")
                     for m, sd in zip(acc.mean(0), acc.std(0, ddof=1) if len(rs) > 1 else acc[0])]
            lines.append(f"| {encoding} | {variant} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("demo-recipe"))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--encodings", nargs="+", default=list(ENCODINGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--shard", default="0/1", help="K/N: run every N-th job starting at K")
    p.add_argument("--report", action="store_true", help="print the table of OUT's runs and stop")
    args = p.parse_args()
    if args.report:
        print(report(args.out))
        return
    k, n = map(int, args.shard.split("/"))
    jobs = [(v, e, s) for s in args.seeds for v in args.variants for e in args.encodings]
    for variant, encoding, seed in jobs[k::n]:
        path = args.out / variant / encoding / f"seed{seed}.json"
        if path.is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        r = run(variant, encoding, seed)
        write_atomic(path, lambda tmp: tmp.write_text(json.dumps(r, indent=1)))
        print(f"{variant:26s} {encoding:14s} seed{seed}: " + "  ".join(f"{r['top1'][str(s)]:5.1f}" for s in SIZES),
              flush=True)


if __name__ == "__main__":
    main()
