"""Check a study's recipe before it is run: does LayerScale help or hurt LH-90 and 2D-RoPE there?

LayerScale's effect depends on the learning-rate schedule, the same way for LH-90 and 2D-RoPE
(docs/backbone-ablation.md). This trains each encoding with a study file's own settings for each of
its datasets, with and without LayerScale 0.1, and tests at the study's sizes on its test length
(no knob tuning, no attacks), so that the study can give every encoding the setting that is best
for both:

    OMP_NUM_THREADS=1 python benchmarks/study_recipe.py --config studies/synthetic.yaml \\
        --out docs/backbone-ablation/study-recipe/synthetic --shard 0/2 &
    OMP_NUM_THREADS=1 python benchmarks/study_recipe.py --config studies/synthetic.yaml \\
        --out docs/backbone-ablation/study-recipe/synthetic --shard 1/2 &
    python benchmarks/study_recipe.py --config studies/synthetic.yaml --out docs/backbone-ablation/study-recipe/synthetic --report

Each run writes ``OUT/<dataset>/<encoding>/ls<value>/seed<k>.json`` (atomically); a rerun skips
finished runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from lookhere.evaluate import load_checkpoint, run_eval
from lookhere.io import write_atomic
from lookhere.study import StudyConfig
from lookhere.train import train


def run(cfg: StudyConfig, dataset: str, encoding: str, layerscale: float | None, seed: int) -> dict:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tc = dataclasses.replace(cfg.train_config(dataset, encoding, seed, str(Path(tmp) / "run")), init_values=layerscale)
        train(tc)
        model, _ = load_checkpoint(Path(tmp) / "run")
        settings = dataclasses.replace(cfg.eval_settings(dataset), tune_knobs=False, val_length=None, adversarial=(),
                                       by_object_size=False, seed=seed)
        res = run_eval(model, settings, progress=False)
    return dict(study=cfg.name, dataset=dataset, encoding=encoding, layerscale=layerscale, seed=seed,
                top1={s: round(100 * m["top1"], 1) for s, m in res["sizes"].items()},
                train=tc.to_dict(), seconds=round(time.perf_counter() - t0, 1))


def report(cfg: StudyConfig, out: Path) -> str:
    lines = []
    for dataset in cfg.datasets:
        sizes = cfg.sizes(dataset)
        rows = {}
        for p in sorted((out / dataset.replace(":", "-").replace("/", "-")).glob("*/*/seed*.json")):
            r = json.loads(p.read_text())
            rows.setdefault((r["encoding"], r["layerscale"]), []).append(r)
        if not rows:
            continue
        lines += [f"\n{dataset} (trained at {cfg.train_config(dataset, cfg.encodings[0], 0, 'x').img_size} px)\n",
                  "| encoding | LayerScale | seeds | " + " | ".join(f"{s} px" for s in sizes) + " |",
                  "|---|---|---:|" + "---:|" * len(sizes)]
        for (encoding, ls), rs in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
            acc = np.array([[r["top1"][str(s)] for s in sizes] for r in rs])
            sd = acc.std(0, ddof=1) if len(rs) > 1 else None
            cells = [f"{m:.1f}" + (f" ± {sd[i]:.1f}" if sd is not None else "") for i, m in enumerate(acc.mean(0))]
            lines.append(f"| {encoding} | {ls if ls else 'none'} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, required=True, help="a study file")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--datasets", nargs="+", help="default: the study's")
    p.add_argument("--encodings", nargs="+", default=["lh-90", "rope-2d-mixed"])
    p.add_argument("--layerscale", nargs="+", default=["none", "0.1"], help="LayerScale initial values; none: off")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--shard", default="0/1", help="K/N: run every N-th job starting at K")
    p.add_argument("--report", action="store_true", help="print the tables of OUT's runs and stop")
    args = p.parse_args()
    cfg = StudyConfig.from_yaml(args.config)
    if args.report:
        print(report(cfg, args.out))
        return
    values = [None if v == "none" else float(v) for v in args.layerscale]
    datasets = args.datasets or list(cfg.datasets)
    jobs = [(d, e, v, s) for s in args.seeds for d in datasets for e in args.encodings for v in values]
    k, n = map(int, args.shard.split("/"))
    for dataset, encoding, ls, seed in jobs[k::n]:
        path = args.out / dataset.replace(":", "-").replace("/", "-") / encoding / f"ls{ls}" / f"seed{seed}.json"
        if path.is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        r = run(cfg, dataset, encoding, ls, seed)
        write_atomic(path, lambda tmp: tmp.write_text(json.dumps(r, indent=1)))
        print(f"{dataset:16s} {encoding:14s} ls={ls} seed{seed}: " + "  ".join(f"{v:5.1f}" for v in r["top1"].values()),
              flush=True)


if __name__ == "__main__":
    main()
