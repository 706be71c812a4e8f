"""Multi-seed studies: a grid of (dataset x position encoding x seed) cells, each trained, evaluated
at several sizes, and aggregated with error bars.

A study directory holds one folder per cell, ``DATASET/ENCODING/seedN``, with ``cell.json`` (the
cell and the exact commands that make it), ``run/`` (the training run: config, metrics,
checkpoints) and ``eval/eval.json``. A cell whose ``eval/eval.json`` exists is never run again; a
cell killed during training resumes from its last checkpoint (bit-exact). Cells run as
subprocesses with one thread each, ``--jobs`` at a time, so a rerun of a cell's recorded commands
gives the same numbers on the same machine.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from .io import write_atomic
from .train import TrainConfig

SYNTHETIC = ("synthetic", "synthetic-where")


@dataclass
class EvalPlan:
    """How each cell is evaluated (the flags of ``lookhere eval``)."""

    sizes: list[int] = field(default_factory=lambda: [32, 64, 128])
    test_length: Optional[int] = 500
    val_length: Optional[int] = 200
    tune_knobs: bool = True
    lh_slope_scales: list[float] = field(default_factory=lambda: [0.5, 2.0])
    adversarial: list[str] = field(default_factory=lambda: ["fgsm", "pgd"])
    eps: str = "1/255"
    pgd_steps: int = 10
    adversarial_samples: int = 200
    batch_size: int = 64


@dataclass
class StudyConfig:
    """A study file: the grid, the training settings every cell shares, and the evaluation.

    ``datasets`` maps a dataset name to its own training settings (``data_length``, ``img_size``...)
    and, optionally, its own evaluation ``sizes``.
    """

    name: str
    datasets: dict[str, dict[str, Any]]
    encodings: list[str]
    seeds: list[int]
    train: dict[str, Any] = field(default_factory=dict)
    eval: EvalPlan = field(default_factory=EvalPlan)
    reference: str = "lh-90"  # the encoding every other one is compared against, seed by seed

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "study config") -> "StudyConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {sorted(unknown)}; allowed: {sorted(names)}")
        missing = {"name", "datasets", "encodings", "seeds"} - set(d)
        if missing:
            raise ValueError(f"{source}: missing key(s) {sorted(missing)}")
        plan = dict(d.get("eval") or {})
        bad = set(plan) - {f.name for f in fields(EvalPlan)}
        if bad:
            raise ValueError(f"{source}: unknown eval key(s) {sorted(bad)}; allowed: "
                             f"{sorted(f.name for f in fields(EvalPlan))}")
        datasets = d["datasets"]
        if isinstance(datasets, list):
            datasets = {name: {} for name in datasets}
        cfg = cls(name=str(d["name"]), datasets={k: dict(v or {}) for k, v in datasets.items()},
                  encodings=list(d["encodings"]), seeds=[int(s) for s in d["seeds"]],
                  train=dict(d.get("train") or {}), eval=EvalPlan(**plan), reference=d.get("reference", "lh-90"))
        cfg.validate(source)
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> "StudyConfig":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"study config {p} does not exist")
        d = yaml.safe_load(p.read_text())
        if not isinstance(d, dict):
            raise ValueError(f"{p}: expected a mapping (name, datasets, encodings, seeds, train, eval)")
        return cls.from_dict(d, str(p))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self, source: str = "study config") -> None:
        from .position import POSITION_ENCODINGS

        if not self.datasets or not self.encodings or not self.seeds:
            raise ValueError(f"{source}: datasets, encodings and seeds must each list at least one entry")
        for pe in self.encodings:
            if pe not in POSITION_ENCODINGS:
                raise ValueError(f"{source}: unknown encoding {pe!r}; allowed: {', '.join(POSITION_ENCODINGS)}")
        if len(set(self.seeds)) != len(self.seeds) or len(set(self.encodings)) != len(self.encodings):
            raise ValueError(f"{source}: seeds and encodings must not repeat")
        for name in self.datasets:
            cfg = self.train_config(name, self.encodings[0], self.seeds[0], "x")  # unknown keys fail here
            cfg.validate()
            for size in self.sizes(name):
                if size % cfg.patch_size:
                    raise ValueError(f"{source}: {name} size {size} is not a multiple of patch size {cfg.patch_size}")

    def sizes(self, dataset: str) -> list[int]:
        return list(self.datasets[dataset].get("sizes", self.eval.sizes))

    def train_config(self, dataset: str, encoding: str, seed: int, output: str) -> TrainConfig:
        own = {k: v for k, v in self.datasets[dataset].items() if k != "sizes"}
        d = {**self.train, **own, "data": dataset, "pos_encoding": encoding, "seed": seed, "output": output,
             "progress": False}
        try:
            return TrainConfig.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"study {self.name!r}, dataset {dataset!r}: {e}") from None

    def cells(self, root: str | Path) -> list["Cell"]:
        """Seed by seed, so a study stopped part-way has every encoding at the same number of seeds."""
        return [Cell(self, d, pe, s, Path(root)) for s in self.seeds for d in self.datasets for pe in self.encodings]


def _dirname(dataset: str) -> str:
    return dataset.replace(":", "-").replace("/", "-")


ALWAYS = ("data", "pos_encoding", "seed", "output")  # written out even when they equal the default


def _flags(cfg: TrainConfig) -> list[str]:
    """``lookhere train`` flags for every setting that differs from the defaults (and the cell's own)."""
    default = TrainConfig()
    out = []
    for f in fields(TrainConfig):
        value = getattr(cfg, f.name)
        if f.name == "resume" or (value == getattr(default, f.name) and f.name not in ALWAYS):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + f.name.replace("_", "-"))
        elif isinstance(value, dict):
            out += [flag, json.dumps(value, separators=(",", ":"))]
        else:
            out += [flag, str(value)]
    return out


@dataclass
class Cell:
    study: StudyConfig
    dataset: str
    encoding: str
    seed: int
    root: Path

    @property
    def key(self) -> str:
        return f"{_dirname(self.dataset)}/{self.encoding}/seed{self.seed}"

    @property
    def dir(self) -> Path:
        return self.root / self.key

    @property
    def run_dir(self) -> Path:
        return self.dir / "run"

    @property
    def eval_json(self) -> Path:
        return self.dir / "eval" / "eval.json"

    def train_config(self) -> TrainConfig:
        return self.study.train_config(self.dataset, self.encoding, self.seed, str(self.run_dir))

    def commands(self) -> dict[str, list[str]]:
        """The two commands that make this cell, as argument lists (``lookhere`` = this package's CLI)."""
        cfg = self.train_config()
        plan = self.study.eval
        train_cmd = ["lookhere", "train", *_flags(cfg)]
        eval_cmd = ["lookhere", "eval", "--checkpoint", str(self.run_dir), "--sizes", *map(str, self.study.sizes(self.dataset)),
                    "--train-size", str(cfg.img_size), "--batch-size", str(plan.batch_size), "--no-progress",
                    "--output", str(self.dir / "eval")]
        if plan.test_length:
            eval_cmd += ["--length", str(plan.test_length)]
        if plan.tune_knobs:
            eval_cmd += ["--tune-knobs", "--lh-slope-scales", *map(str, plan.lh_slope_scales)]
            if plan.val_length:
                eval_cmd += ["--val-length", str(plan.val_length)]
        if plan.adversarial:
            eval_cmd += ["--adversarial", ",".join(plan.adversarial), "--eps", plan.eps, "--pgd-steps",
                         str(plan.pgd_steps), "--adversarial-samples", str(plan.adversarial_samples)]
        if self.dataset in SYNTHETIC:
            eval_cmd += ["--by-object-size"]
        return {"train": train_cmd, "eval": eval_cmd}

    def command_line(self) -> str:
        """What a user types to make this cell again (one thread, as the study ran it)."""
        c = self.commands()
        return " && ".join(f"OMP_NUM_THREADS=1 {shlex.join(c[k])}" for k in ("train", "eval"))

    def status(self) -> str:
        if self.eval_json.is_file():
            return "done"
        if (self.dir / "train.json").is_file():
            return "trained"
        if (self.run_dir / "last" / "state.pt").is_file():
            return "started"
        return "todo"


# --- running -----------------------------------------------------------------------------------
def _run(argv: list[str], log, env: dict[str, str]) -> None:
    cmd = [sys.executable, "-m", "lookhere.cli", *argv[1:]]
    log.write(f"$ {shlex.join(argv)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        rc = proc.wait()
    except BaseException:  # interrupted: take the child down with us
        proc.kill()
        raise
    if rc:
        raise RuntimeError(f"`{shlex.join(argv)}` failed with exit status {rc}")


def _write_json(path: Path, obj: Any) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2)))


def run_cell(cell: Cell) -> dict[str, float]:
    """Train (or resume) and evaluate one cell; returns the seconds each part took."""
    cell.dir.mkdir(parents=True, exist_ok=True)
    commands = cell.commands()
    _write_json(cell.dir / "cell.json", {
        "dataset": cell.dataset, "encoding": cell.encoding, "seed": cell.seed, "command": cell.command_line(),
        "train_command": commands["train"], "eval_command": commands["eval"]})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    timing: dict[str, float] = {}
    timing_file = cell.dir / "timing.json"
    if timing_file.is_file():
        timing = json.loads(timing_file.read_text())
    with open(cell.dir / "log.txt", "a") as log:
        if not (cell.dir / "train.json").is_file():
            t = time.perf_counter()
            argv = commands["train"]
            if (cell.run_dir / "config.yaml").is_file():
                argv = [*argv, "--resume", str(cell.run_dir)]
            _run(argv, log, env)
            timing["train_s"] = timing.get("train_s", 0.0) + time.perf_counter() - t
            records = [json.loads(line) for line in (cell.run_dir / "metrics.jsonl").read_text().splitlines()]
            epochs = [r for r in records if r.get("kind") == "epoch"]
            _write_json(cell.dir / "train.json", {"epochs": epochs})
            _write_json(timing_file, timing)
        if not cell.eval_json.is_file():
            t = time.perf_counter()
            _run(commands["eval"], log, env)
            timing["eval_s"] = time.perf_counter() - t
            _write_json(timing_file, timing)
    return timing


def check_cells_match(cells: list[Cell]) -> None:
    """A cell made by other settings would be kept as done (or resumed) silently: refuse instead."""
    stale = []
    for cell in cells:
        f = cell.dir / "cell.json"
        if not f.is_file():
            continue
        try:
            made_by = json.loads(f.read_text()).get("command")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            stale.append(f"{cell.dir} (cell.json unreadable)")
            continue
        if made_by != cell.command_line():
            stale.append(str(cell.dir))
    if stale:
        shown = "\n  ".join(stale[:10]) + (f"\n  ... and {len(stale) - 10} more" if len(stale) > 10 else "")
        raise ValueError(f"{len(stale)} cell(s) were made with other settings than this study config or "
                         f"cannot be read; remove them or choose another --output:\n  {shown}")


def run_study(cfg: StudyConfig, output: str | Path, *, jobs: int = 1, progress: bool = True) -> dict[str, Any]:
    """Run every cell not yet done (``jobs`` at a time), then aggregate. Failed cells are reported
    and left for the next run; the others go on."""
    from tqdm import tqdm

    out = Path(output)
    cells = cfg.cells(out)
    check_cells_match(cells)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    todo = [c for c in cells if c.status() != "done"]
    failures: dict[str, str] = {}
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc=cfg.name, unit="cell", disable=not progress)

    def one(cell: Cell) -> None:
        try:
            run_cell(cell)
        except RuntimeError as e:
            failures[cell.key] = f"{e}; see {cell.dir / 'log.txt'}"
        bar.update(1)
        bar.set_postfix_str(cell.key)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(one, todo))
    bar.close()
    report = write_report(out)
    return {"cells": len(cells), "ran": len(todo), "failures": failures, **report}


# --- estimating ----------------------------------------------------------------------------------
def _measure(cell: Cell) -> dict[str, Any]:
    """Seconds for one training step and per image at each evaluation size (one thread)."""
    import torch

    from .data import DataSpec, build_dataset
    from .data.factory import num_classes_of
    from .evaluate import knob_grid
    from .vit import create_vit

    cfg = cell.train_config()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ds = build_dataset(DataSpec(cfg.data, cfg.img_size, cfg.data_length, cfg.seed, cfg.data_root), "train")
        model = create_vit(**cfg.model_kwargs(cfg.num_classes or num_classes_of(ds)))
        opt = torch.optim.AdamW(model.parameters())
        x = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size)
        y = torch.zeros(cfg.batch_size, dtype=torch.long)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - t)
        per_image = {}
        model.eval()
        with torch.no_grad():
            for size in cell.study.sizes(cell.dataset):
                xb = torch.randn(8, 3, size, size)
                model(xb[:2])
                t = time.perf_counter()
                model(xb)
                per_image[size] = (time.perf_counter() - t) / 8
        return {"step_s": min(times[1:]), "per_image_s": per_image, "train_len": len(ds), "cfg": cfg,
                "settings": max(1, len(knob_grid(model, cell.study.eval.lh_slope_scales)))}
    finally:
        torch.set_num_threads(threads)


def estimate(cfg: StudyConfig, output: str | Path, *, jobs: int = 1) -> dict[str, Any]:
    """Cells with their status and an estimate of the seconds each needs (measured: a few training
    steps and forward passes of each model on one thread; cells already run use their own times)."""
    cells = cfg.cells(output)
    check_cells_match(cells)  # a dry run refuses what the run would refuse
    plan = cfg.eval
    measured: dict[tuple[str, str], dict[str, Any]] = {}
    rows = []
    for cell in cells:
        status = cell.status()
        timing_file = cell.dir / "timing.json"
        if status == "done" and timing_file.is_file():
            t = json.loads(timing_file.read_text())
            rows.append((cell, status, 0.0, t.get("train_s", 0.0) + t.get("eval_s", 0.0)))
            continue
        if status == "done":
            rows.append((cell, status, 0.0, 0.0))
            continue
        m = measured.setdefault((cell.dataset, cell.encoding), _measure(cell))
        tc = m["cfg"]
        steps = tc.epochs * (m["train_len"] // tc.batch_size)
        n_test = plan.test_length or 10000
        n_val = plan.val_length or 2000
        settings = m["settings"]
        larger = [s for s in cfg.sizes(cell.dataset) if s != tc.img_size]
        eval_s = sum(m["per_image_s"].values()) * n_test
        if plan.tune_knobs and settings > 1:
            eval_s += sum(m["per_image_s"][s] for s in larger) * (n_val * settings + n_test * 0.5)
        if plan.adversarial:
            passes = 3 * (1 + 1 + 1 + plan.pgd_steps + 1)  # forward+backward ~ 3 forwards, per attack
            eval_s += m["per_image_s"][tc.img_size] * plan.adversarial_samples * passes
        train_s = steps * m["step_s"] * (0.0 if status == "trained" else 1.0)
        rows.append((cell, status, train_s + eval_s, 0.0))
    remaining = sum(r[2] for r in rows)
    return {"rows": rows, "remaining_s": remaining, "wall_s": remaining / max(1, jobs), "jobs": jobs}


def format_estimate(est: dict[str, Any]) -> str:
    lines = [f"{'cell':48s} {'status':8s} {'estimate':>9s}"]
    for cell, status, todo_s, spent_s in est["rows"]:
        t = f"{todo_s / 60:7.1f} m" if todo_s else (f"({spent_s / 60:.1f} m)" if spent_s else "")
        lines.append(f"{cell.key:48s} {status:8s} {t:>9s}")
    n_todo = sum(1 for r in est["rows"] if r[1] != "done")
    lines.append(f"{len(est['rows'])} cells, {n_todo} to run: about {est['remaining_s'] / 3600:.2f} CPU-hours, "
                 f"{est['wall_s'] / 3600:.2f} hours with --jobs {est['jobs']} (one thread per job)")
    return "\n".join(lines)


def write_report(output: str | Path) -> dict[str, str]:
    from .study_report import write_report as _write

    return _write(output)
