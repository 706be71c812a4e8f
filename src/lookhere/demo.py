"""The main job: LookHere vs. 2D-RoPE trained at a low resolution, tested from 1x to 4x."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from .evaluate import EvalSettings, load_checkpoint, markdown_table, run_eval, write_results
from .report import compare
from .train import TrainConfig, resume_conflicts, train


@dataclass
class DemoPlan:
    train_length: int
    epochs: int
    eval_length: int
    sizes: tuple[int, ...]
    encodings: tuple[str, ...] = ("lh-90", "rope-2d-mixed")
    model: str = "micro"
    img_size: int = 32
    patch_size: int = 4
    batch_size: int = 64


FULL = DemoPlan(train_length=3500, epochs=8, eval_length=500, sizes=(32, 48, 64, 96, 128))
# A budget at which both models learn the task: over 3x chance (10 classes) at the training size.
QUICK = DemoPlan(train_length=3000, epochs=5, eval_length=300, sizes=(32, 64, 128), batch_size=32)


# At this short, fast recipe (lr 2e-3, 0.3 epochs of warmup) both models learn far more with LayerScale
# 0.1 than without: LH-90 +13 points at 32 px, 2D-RoPE +26 (docs/backbone-ablation.md, "The demo's recipe").
DEMO_LAYERSCALE = 0.1


def run_demo(output: str | Path = "demo", quick: bool = False, seed: int = 0, progress: bool = True) -> dict:
    plan = QUICK if quick else FULL
    out = Path(output)
    configs = {pe: TrainConfig(data="synthetic", data_length=plan.train_length, pos_encoding=pe, model=plan.model,
                               img_size=plan.img_size, patch_size=plan.patch_size, epochs=plan.epochs,
                               batch_size=plan.batch_size, lr=2e-3, warmup_epochs=0.3, init_values=DEMO_LAYERSCALE,
                               seed=seed, output=str(out / pe), progress=progress, log_every=20, checkpoint_every=50)
               for pe in plan.encodings}
    for pe, cfg in configs.items():  # an earlier demo in the folder is resumed only if it is this one
        saved = out / pe / "config.yaml"
        other = resume_conflicts(cfg, saved) if saved.is_file() else {}
        if other:
            shown = "; ".join(f"{k} {had}, now {now}" for k, (had, now) in other.items())
            raise ValueError(f"--output {out} holds a demo made with other settings ({pe}: {shown}; --quick and "
                             f"--seed choose them): pass another --output or remove {out}")
    out.mkdir(parents=True, exist_ok=True)
    seconds = 0.0  # training over every stretch (a resumed demo counts what ran before the kill), and evaluation
    run_dirs = []
    for pe in plan.encodings:
        run, cfg = out / pe, configs[pe]
        if (run / "config.yaml").is_file():
            cfg.resume = str(run)  # an interrupted demo picks up where it stopped (or starts a run it had begun)
        print(f"training {pe} ({plan.model}, {plan.img_size}px, {plan.epochs} epochs of {plan.train_length} scenes)")
        seconds += train(cfg)["train_s"]
        t0 = time.perf_counter()
        model, _ = load_checkpoint(run)
        settings = EvalSettings(data="synthetic", sizes=list(plan.sizes), train_size=plan.img_size,
                                length=plan.eval_length, seed=seed, by_object_size=True)
        print(f"evaluating {pe} at {', '.join(map(str, plan.sizes))} px")
        results = run_eval(model, settings, progress=progress)
        write_results(results, run / "eval", pe)
        print(markdown_table(results, pe))
        run_dirs.append(run / "eval")
        seconds += time.perf_counter() - t0
    minutes = seconds / 60
    notes = (f"Both models: ViT-{plan.model} (patch {plan.patch_size}), trained at {plan.img_size} px on "
             f"{plan.train_length} synthetic scenes for {plan.epochs} epochs (seed {seed}), tested on "
             f"{plan.eval_length} test scenes rendered natively at each size; {minutes:.1f} minutes on this machine. "
             f"One seed: differences of a few points are within run-to-run noise; see the study for error bars. "
             f"Command: `lookhere demo{' --quick' if quick else ''}{f' --seed {seed}' if seed else ''} --output {out}`.")
    files = compare(run_dirs, out / "report", names=list(plan.encodings),
                    title="LookHere vs. 2D-RoPE: trained small, tested large", notes=notes)
    summary = {name: json.loads((d / "eval.json").read_text())["sizes"] for name, d in zip(plan.encodings, run_dirs)}
    return {"report": files, "summary": summary, "minutes": minutes}
