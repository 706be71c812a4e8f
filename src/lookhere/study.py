"""Multi-seed studies: a grid of (dataset x position encoding x seed) cells, each trained, evaluated
at several sizes, and aggregated with error bars.

A study directory holds one folder per cell, ``DATASET/ENCODING/seedN``, with ``cell.json`` (the
cell, the exact command that makes it, its identity and environment), ``run/`` (the training run:
config, metrics, checkpoints) and ``eval/eval.json``. A cell killed during training resumes from its
last checkpoint (bit-exact). Cells run as subprocesses with one thread each, ``--jobs`` at a time,
with the CPU code paths of torch, oneDNN and MKL pinned (``cpu_capability``, AVX2 by default), so that
whether a CPU has AVX-512 does not decide a cell's last digits.

A cell's identity is its command and what the code resolves that command to: the model's full
config (a LookHere preset's strings and slopes, an encoding's options), a digest of the initial
weights and one of the first training samples. A finished cell is kept while both match; one whose
resolved identity changed (a preset, an initialisation, the data) is run again, and ``cell.json``
and the report say why. A cell made by another command is refused: that is another study.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from .data.factory import SYNTHETIC_TASKS
from .environment import CPU_CAPABILITIES, KERNEL_PINS, cpu_model, kernel_pin
from .io import read_yaml
from .study_files import CellFiles, cell_key, write_json, write_study_file
from .train import TrainConfig

if TYPE_CHECKING:
    from .evaluate import EvalSettings

SYNTHETIC = tuple(SYNTHETIC_TASKS)


# The ``eval:`` keys a study file may set: ``lookhere eval``'s own settings (``EvalSettings``), but
# those each cell sets itself (its dataset, training size, seed and data folder, and the per-object-size
# table, on for synthetic scenes). A key left out takes ``lookhere eval``'s default.
PER_CELL_EVAL = ("data", "train_size", "seed", "data_root", "by_object_size")
EVAL_ALIASES = {"test_length": "length"}  # the name study files used before the settings were shared


def eval_keys() -> list[str]:
    from .evaluate import EvalSettings

    return [f.name for f in EvalSettings.flags() if f.name not in PER_CELL_EVAL]


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
    eval: dict[str, Any] = field(default_factory=dict)  # lookhere eval's settings (eval_keys()), YAML-typed
    reference: str = "lh-90"  # the encoding every other one is compared against, seed by seed
    # Named encodings of the study's own: name -> {pos_encoding, lookhere_config, pos_options}, e.g. a
    # LookHere ablation. ``encodings`` may list them beside the registered names.
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    cpu_capability: Optional[str] = "avx2"  # the CPU code paths every cell is pinned to (x86-64); null: the CPU's best
    cluster: dict[str, Any] = field(default_factory=dict)  # where cells run (lookhere.cluster.ClusterConfig)
    # The output directory of the study this one varies, relative to this one's: the report sets the
    # two side by side, seed by seed (e.g. trained at several sizes against trained at one).
    compare_with: Optional[str] = None

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "study config") -> "StudyConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {sorted(unknown)}; allowed: {sorted(names)}")
        missing = {"name", "datasets", "encodings", "seeds"} - set(d)
        if missing:
            raise ValueError(f"{source}: missing key(s) {sorted(missing)}")
        for key in ("train", "eval", "variants", "cluster"):
            if not isinstance(d.get(key) or {}, dict):
                raise ValueError(f"{source}: {key} must be a mapping of settings, got {d[key]!r}")
        for old, new in EVAL_ALIASES.items():
            if old in (d.get("eval") or {}) and new in d["eval"]:
                raise ValueError(f"{source}: eval sets both {old} and {new} (the same setting); keep {new}")
        plan = {EVAL_ALIASES.get(k, k): v for k, v in (d.get("eval") or {}).items()}
        bad = set(plan) - set(eval_keys())
        if bad:
            raise ValueError(f"{source}: unknown eval key(s) {sorted(bad)}; allowed: {sorted(eval_keys())}")
        datasets = d["datasets"]
        if isinstance(datasets, list):
            datasets = {name: {} for name in datasets}
        if not isinstance(datasets, dict):
            raise ValueError(f"{source}: datasets must be a list of names or a mapping of name to settings, "
                             f"got {datasets!r}")
        for name, own in datasets.items():
            if not isinstance(own or {}, dict):
                raise ValueError(f"{source}: datasets: {name} must be a mapping of its settings (data_length, "
                                 f"img_size, sizes...), got {own!r}")
        for name, variant in (d.get("variants") or {}).items():
            if not isinstance(variant or {}, dict):
                raise ValueError(f"{source}: variant {name!r} must be a mapping of {', '.join(VARIANT_KEYS)}, "
                                 f"got {variant!r}")
        if isinstance(plan.get("adversarial"), str):
            plan["adversarial"] = plan["adversarial"].split(",")  # as the --adversarial flag takes it
        for key in ("encodings", "seeds", *(k for k in ("sizes", "lh_slope_scales", "adversarial") if k in plan)):
            value = plan[key] if key in plan else d[key]
            if not isinstance(value, list):
                raise ValueError(f"{source}: {key} must be a list, got {value!r}")
        if not all(_whole(s) and s >= 0 for s in d["seeds"]):
            raise ValueError(f"{source}: seeds must be whole numbers >= 0, got {d['seeds']!r}")
        for where, own in [("eval", plan), *((name, own or {}) for name, own in datasets.items())]:
            sizes = own.get("sizes")
            if sizes is not None and not (isinstance(sizes, list) and all(_whole(s) for s in sizes)):
                raise ValueError(f"{source}: {where} sizes must be a list of whole numbers (px), got {sizes!r}")
        if isinstance(plan.get("eps"), (int, float)) and not isinstance(plan["eps"], bool):
            from .evaluate import format_eps

            plan["eps"] = format_eps(float(plan["eps"]))  # a YAML number, as the --eps flag reads it back
        per_cell = sorted({*ALWAYS, "resume"} & set(d.get("train") or {}))
        if per_cell:
            raise ValueError(f"{source}: train sets {', '.join(per_cell)}, which each cell sets itself (from "
                             f"datasets, encodings and seeds, and its folder); leave them out")
        cfg = cls(name=str(d["name"]), datasets={k: dict(v or {}) for k, v in datasets.items()},
                  encodings=list(d["encodings"]), seeds=list(d["seeds"]),
                  train=dict(d.get("train") or {}), eval=plan, reference=d.get("reference", "lh-90"),
                  variants={k: dict(v or {}) for k, v in (d.get("variants") or {}).items()},
                  cpu_capability=d.get("cpu_capability", "avx2"), cluster=dict(d.get("cluster") or {}),
                  compare_with=d.get("compare_with"))
        cfg.validate(source)
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> "StudyConfig":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"study config {p} does not exist")
        d = read_yaml(p)
        if not isinstance(d, dict):
            raise ValueError(f"{p}: expected a mapping (name, datasets, encodings, seeds, train, eval)")
        return cls.from_dict(d, str(p))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self, source: str = "study config") -> None:
        from .evaluate import EvalSettings
        from .position import POSITION_ENCODINGS

        from .cluster import ClusterConfig

        if not self.datasets or not self.encodings or not self.seeds:
            raise ValueError(f"{source}: datasets, encodings and seeds must each list at least one entry")
        ClusterConfig.from_dict(self.cluster, f"{source}: cluster")
        for name, variant in self.variants.items():
            if name in POSITION_ENCODINGS:
                raise ValueError(f"{source}: variant {name!r} has the name of a registered encoding; rename it")
            if set(variant) - set(VARIANT_KEYS) or "pos_encoding" not in variant:
                raise ValueError(f"{source}: variant {name!r} needs pos_encoding and may set only "
                                 f"{', '.join(VARIANT_KEYS)} (got {sorted(variant)})")
        for pe in self.encodings:
            if pe not in POSITION_ENCODINGS and pe not in self.variants:
                raise ValueError(f"{source}: unknown encoding {pe!r}; allowed: {', '.join(POSITION_ENCODINGS)} "
                                 f"or a name under variants")
        if self.cpu_capability is not None and self.cpu_capability not in CPU_CAPABILITIES:
            raise ValueError(f"{source}: cpu_capability {self.cpu_capability!r}; allowed: "
                             f"{', '.join(CPU_CAPABILITIES)} or null")
        if len(set(self.seeds)) != len(self.seeds) or len(set(self.encodings)) != len(self.encodings):
            raise ValueError(f"{source}: seeds and encodings must not repeat")
        if self.compare_with is not None and not (isinstance(self.compare_with, str) and self.compare_with.strip()):
            raise ValueError(f"{source}: compare_with must be the output directory of the study this one varies, "
                             f"relative to this study's, got {self.compare_with!r}")
        if self.reference not in self.encodings:
            raise ValueError(f"{source}: reference {self.reference!r}, the encoding the others are compared "
                             f"against, is not among the encodings; set reference to one of them")
        for pe in self.encodings:  # unknown keys and contradicting encoding options fail here
            for name in self.datasets:
                cfg = self.train_config(name, pe, self.seeds[0], "x")
                cfg.validate()
                try:  # a setting the cell's train command cannot give
                    _flags(cfg)
                except ValueError as e:
                    raise ValueError(f"{source}: train: {e}") from None
        for name in self.datasets:
            cfg = self.train_config(name, self.encodings[0], self.seeds[0], "x")
            sizes = self.sizes(name)
            if not sizes:
                raise ValueError(f"{source}: {name} sizes []: give at least one test size")
            if sizes != sorted(set(sizes)):
                raise ValueError(f"{source}: {name} sizes {sizes}: list each size once, smallest first")
            if cfg.size not in sizes:
                raise ValueError(f"{source}: {name} sizes {sizes} leave out the training size {cfg.size}, "
                                 f"which the report compares every other size with")
            patch = cfg.known_patch_size()  # None: a source's, checked by each cell's run
            for size in sizes:
                if patch and size % patch:
                    raise ValueError(f"{source}: {name} size {size} is not a multiple of patch size {patch}")
            settings = self.eval_settings(name)
            try:  # the eval command reads the cells' settings back, then checks them, before any cell trains
                parsed, _ = EvalSettings.parse_argv(settings.argv(), data=name)
                for f in EvalSettings.flags():
                    given, read = getattr(settings, f.name), getattr(parsed, f.name)
                    if given != read or type(given) is not type(read):
                        raise ValueError(f"{f.name} {given!r} is read back by the cells' eval command as {read!r}: "
                                         f"give a value of that kind")
                settings.check(patch)
            except (ValueError, TypeError, argparse.ArgumentError) as e:
                raise ValueError(f"{source}: eval: {e}") from None

    def eval_settings(self, dataset: str) -> "EvalSettings":
        """What each cell's ``lookhere eval`` command asks for (without the checkpoint): the study's
        ``eval:`` keys, else ``lookhere eval``'s defaults."""
        from .evaluate import EvalSettings

        train_size = self.train_config(dataset, self.encodings[0], self.seeds[0], "x").size
        given = {k: v for k, v in self.eval.items() if k != "sizes"}
        return EvalSettings.from_flags(given, data=dataset, sizes=self.sizes(dataset), train_size=train_size,
                                       by_object_size=dataset in SYNTHETIC)

    def sizes(self, dataset: str) -> list[int]:
        """The dataset's own test sizes, else the study's, else 1x, 2x and 4x the training size."""
        sizes = self.datasets[dataset].get("sizes", self.eval.get("sizes"))
        if sizes is None:
            train_size = self.train_config(dataset, self.encodings[0], self.seeds[0], "x").size
            return [train_size, 2 * train_size, 4 * train_size]
        return list(sizes)

    def train_config(self, dataset: str, encoding: str, seed: int, output: str) -> TrainConfig:
        own = {k: v for k, v in self.datasets[dataset].items() if k != "sizes"}
        d = {**self.train, **own, "data": dataset, "pos_encoding": encoding, **self.variants.get(encoding, {}),
             "seed": seed, "output": output, "progress": False}
        try:
            return TrainConfig.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"study {self.name!r}, dataset {dataset!r}: {e}") from None

    def cell_env(self) -> dict[str, str]:
        """Environment variables every cell runs with (one thread; the pinned CPU kernels)."""
        return {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **kernel_pin(self.cpu_capability)}

    def cells(self, root: str | Path) -> list["Cell"]:
        """Seed by seed, so a study stopped part-way has every encoding at the same number of seeds."""
        return [Cell(self, d, pe, s, Path(root)) for s in self.seeds for d in self.datasets for pe in self.encodings]


VARIANT_KEYS = ("pos_encoding", "lookhere_config", "pos_options")


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


ALWAYS = ("data", "pos_encoding", "seed", "output")  # written out even when they equal the default
KIND = ("init_from", "model")  # settings that decide the others' defaults (fine-tuning's, a registered model's)
OFF_AT_ZERO = ("clip_grad", "init_values")  # settings whose flags spell unset ("off") as 0


def _flags(cfg: TrainConfig) -> list[str]:
    """``lookhere train`` flags for every setting that differs from what the command takes when its
    flag is left out (the defaults of the same kind of run: from scratch, fine-tuning with
    ``init_from``, or a registered ``model``), and the cell's own."""
    plain = TrainConfig()
    kind = {k: getattr(cfg, k) for k in KIND if getattr(cfg, k) not in (None, getattr(plain, k))}
    default = TrainConfig.from_dict(kind)
    out = []
    for f in fields(TrainConfig):
        value = getattr(cfg, f.name)
        if f.name == "resume" or (value == getattr(default, f.name) and f.name not in (*ALWAYS, *kind)):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + f.name.replace("_", "-"))
        elif isinstance(value, dict):
            out += [flag, json.dumps(value, separators=(",", ":"))]
        elif isinstance(value, list):  # several training sizes
            out += [flag, *map(str, value)]
        elif value is None and f.name in OFF_AT_ZERO:
            out += [flag, "0"]
        elif value is None:
            raise ValueError(f"{f.name} null cannot be written in a cell's train command: {flag} has no value "
                             f"for unset, and left out it is {getattr(default, f.name)!r}; give it a value")
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
        return cell_key(self.dataset, self.encoding, self.seed)

    @property
    def files(self) -> CellFiles:
        return CellFiles.of(self.root, self.dataset, self.encoding, self.seed)

    @property
    def dir(self) -> Path:
        return self.files.dir

    @property
    def run_dir(self) -> Path:
        return self.files.run_dir

    @property
    def eval_json(self) -> Path:
        return self.files.eval_json

    def train_config(self) -> TrainConfig:
        return self.study.train_config(self.dataset, self.encoding, self.seed, str(self.run_dir))

    def commands(self) -> dict[str, list[str]]:
        """The two commands that make this cell, as argument lists (``lookhere`` = this package's CLI)."""
        cfg = self.train_config()
        train_cmd = ["lookhere", "train", *_flags(cfg)]
        settings = self.study.eval_settings(self.dataset)
        eval_cmd = ["lookhere", "eval", "--checkpoint", str(self.run_dir), *settings.argv(omit=("data",)),
                    "--no-progress", "--output", str(self.dir / "eval")]
        return {"train": train_cmd, "eval": eval_cmd}

    def command_line(self) -> str:
        """What a user types to make this cell again (one thread and the kernels the study pinned)."""
        c = self.commands()
        pin = KERNEL_PINS.get(self.study.cpu_capability, {})
        prefix = " ".join(["OMP_NUM_THREADS=1", *(f"{k}={v}" for k, v in pin.items())])
        return " && ".join(f"{prefix} {shlex.join(c[k])}" for k in ("train", "eval"))

    def recorded(self) -> Optional[dict[str, Any]]:
        """``cell.json`` as written when the cell was made (None: not yet); ValueError when unreadable."""
        return self.files.record()

    def status(self) -> str:
        return self.files.status()


# --- identity -----------------------------------------------------------------------------------
def _digest(tensors: list[tuple[str, Any]]) -> str:
    from .io import tensor_digest

    return tensor_digest(tensors)[:16]


def _moments(tensors: list[tuple[str, Any]]) -> dict[str, list[float]]:
    """Each tensor's float64 sum and sum of squares. The digest is exact, so a CPU of another make,
    whose kernels round a few draws (erfinv, Box-Muller) otherwise, changes it; these agree to
    rounding wherever the same code drew the tensors, and a change of initialisation moves them."""
    import torch

    out = {}
    for name, t in tensors:
        t = torch.as_tensor(t).detach().double()
        out[name] = [float(t.sum()), float(t.square().sum())]
    return out


# identity key -> the key of its moments
MOMENTS = {"initial_weights": "initial_moments", "data": "data_moments"}


def _rounding_only(old: Optional[dict], new: Optional[dict], other_cpu: bool) -> bool:
    """Whether two digests that differ describe the same tensors drawn on CPUs that round otherwise:
    their moments agree to 1e-5; a record from before moments were kept agrees only when it was made on
    another CPU (its digest cannot be compared here, and kernels of another make are the likely cause)."""
    if old is None:
        return other_cpu
    if new is None or old.keys() != new.keys():
        return False
    return all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6) for k in old for a, b in zip(old[k], new[k]))


def resolved_identity(cell: Cell, datasets: Optional[dict] = None) -> dict[str, Any]:
    """What the code makes of the cell's command: the model's full config, a digest of the weights
    training starts from and one of the first training samples (as augmented in epoch 0)."""
    from .data import DataSpec, build_dataset
    from .data.factory import num_classes_of
    from .train import SeededSamples, initial_model

    cfg = cell.train_config()
    spec = DataSpec(cfg.data, cfg.size, cfg.data_length, cfg.seed, cfg.data_root)
    datasets = {} if datasets is None else datasets
    key = repr(spec)
    if key not in datasets:
        ds = build_dataset(spec, "train")
        samples = SeededSamples(ds, cfg.seed)
        first = [(str(i), samples[i][0]) for i in range(min(4, len(ds)))]
        datasets[key] = (num_classes_of(ds), _digest(first), _moments(first))
    num_classes, data, data_moments = datasets[key]
    model, _ = initial_model(cfg, cfg.num_classes or num_classes)
    weights = list(model.state_dict().items())
    return json.loads(json.dumps({"model": model.config.to_dict(), "encoding": model.pos_encoding.resolved(),
                                  "initial_weights": _digest(weights), "initial_moments": _moments(weights),
                                  "data": data, "data_moments": data_moments}))


def _identities_main() -> None:
    """Subprocess entry: identities of the cells named on stdin, as JSON on stdout."""
    request = json.loads(sys.stdin.read())
    cfg = StudyConfig.from_dict(request["study"])
    datasets: dict = {}
    wanted = set(request["keys"])
    out = {c.key: resolved_identity(c, datasets) for c in cfg.cells(request["root"]) if c.key in wanted}
    sys.stdout.write(json.dumps(out))


def resolve_identities(cfg: StudyConfig, cells: list[Cell]) -> dict[str, dict[str, Any]]:
    """Identities computed in a process with the cells' own environment: the pinned kernels are the
    ones that draw the initial weights."""
    if not cells:
        return {}
    request = json.dumps({"study": cfg.to_dict(), "root": str(cells[0].root), "keys": [c.key for c in cells]})
    proc = subprocess.run([sys.executable, "-c", "from lookhere.study import _identities_main; _identities_main()"],
                          input=request, capture_output=True, text=True, env={**os.environ, **cfg.cell_env()})
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise RuntimeError(f"could not resolve the cells' settings: {last}")
    return json.loads(proc.stdout)


REASONS = {"initial_weights": "the initial weights differ (an initialisation change)",
           "data": "the first training samples differ (a data change)"}


def identity_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "", other_cpu: bool = False) -> list[str]:
    """Why two identities differ, one line per changed setting; ``other_cpu``: ``old`` was made on a
    CPU of another model (see ``_rounding_only``)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b or (not prefix and k in MOMENTS.values()):
            continue
        if not prefix and k in MOMENTS and _rounding_only(old.get(MOMENTS[k]), new.get(MOMENTS[k]), other_cpu):
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += identity_changes(a, b, f"{prefix}{k}.")
        else:
            out.append(REASONS.get(prefix + k) or f"{prefix}{k}: {json.dumps(a)} -> {json.dumps(b)}")
    return out


def _same_eval(recorded: Any, argv: list[str], dataset: str) -> bool:
    """Two ``lookhere eval`` argument lists that ask for the same settings and the same rest
    (checkpoint, output), whatever the order of the flags and whether defaults are spelled out:
    cells written before the study and ``lookhere eval`` shared one definition of the settings."""
    from .evaluate import EvalSettings

    if not isinstance(recorded, list) or recorded[:2] != argv[:2]:
        return False
    try:
        return EvalSettings.parse_argv(recorded[2:], data=dataset) == EvalSettings.parse_argv(argv[2:], data=dataset)
    except (argparse.ArgumentError, ValueError, SystemExit):  # argparse exits on a missing required flag
        return False


def _same_command_line(recorded: Any, cell: Cell) -> bool:
    """``cell.json``'s command line against the cell's: the same environment, training command and
    evaluation settings (:func:`_same_eval`)."""
    if not isinstance(recorded, str):
        return False
    mine = cell.command_line().split(" && ")
    theirs = recorded.split(" && ")
    if len(theirs) != len(mine):
        return False
    for a, b, kind in zip(theirs, mine, ("train", "eval")):
        a, b = shlex.split(a), shlex.split(b)  # VAR=value ... lookhere train|eval ...
        if "lookhere" not in a:
            return False
        i, j = a.index("lookhere"), b.index("lookhere")
        if a[:i] != b[:j] or (a[i:] != b[j:] if kind == "train" else not _same_eval(a[i:], b[j:], cell.dataset)):
            return False
    return True


def check_cells_match(cells: list[Cell]) -> None:
    """A cell made by another command is another study: refuse rather than keep or resume it."""
    stale = []
    for cell in cells:
        try:
            made = cell.recorded()
        except ValueError as e:
            stale.append(str(e))
            continue
        if made is None:
            continue
        c = cell.commands()
        if "identity" in made:
            same = made.get("command") == cell.command_line() or _same_command_line(made.get("command"), cell)
        else:  # made before identities and the pinned kernels were recorded: the commands themselves
            same = made.get("train_command") == c["train"] and _same_eval(made.get("eval_command"), c["eval"],
                                                                         cell.dataset)
        if not same:
            stale.append(str(cell.dir))
    if stale:
        shown = "\n  ".join(stale[:10]) + (f"\n  ... and {len(stale) - 10} more" if len(stale) > 10 else "")
        raise ValueError(f"{len(stale)} cell(s) were made with other settings than this study config or "
                         f"cannot be read; remove them or choose another --output:\n  {shown}")


def cells_to_redo(cells: list[Cell], identities: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """Cells already (partly) made, or cleared to be made again by a run that was stopped, whose
    command now resolves to something else, with the reasons; a part-made cell from before identities
    were recorded is started again too."""
    redo = {}
    for cell in cells:
        made = cell.recorded()
        if made is None:
            continue
        if "identity" in made:
            changes = identity_changes(made["identity"], identities[cell.key], other_cpu=_made_on_other_cpu(cell, made))
            if changes:
                redo[cell.key] = changes
        elif cell.status() not in ("done", "todo"):
            redo[cell.key] = ["part-made before identities were recorded"]
    return redo


def _made_on_other_cpu(cell: Cell, made: dict[str, Any]) -> bool:
    """Whether the cell's training started on a CPU of another model than this one (its environment
    records: ``cell.json``'s once done, the run's log before)."""
    train = (made.get("environment") or {}).get("train") or _train_environments(cell)
    cpus = {e.get("cpu") for e in train}
    return bool(cpus) and cpus != {cpu_model()}


def _clear(cell: Cell, why: list[str]) -> None:
    """The cell's run and evaluation removed, the reason logged once (a study stopped before the cell
    started clears it again when rerun). Its timing stays: what making it took last time is the best
    guess of what making it again takes (:func:`expected_seconds`)."""
    files = cell.files
    for folder in (files.run_dir, files.eval_dir):
        shutil.rmtree(folder, ignore_errors=True)
    files.train_json.unlink(missing_ok=True)
    line = f"# made again: {'; '.join(why)}\n"
    logged = files.log.read_text().splitlines(keepends=True) if files.log.is_file() else []
    if logged[-1:] != [line]:
        with open(files.log, "a") as log:
            log.write(line)


# --- running -----------------------------------------------------------------------------------
def run_command(argv: list[str], log, env: dict[str, str]) -> None:
    """Run a `lookhere` command line (argv[0] == "lookhere") with this interpreter, logging to ``log``."""
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


def _train_environments(cell: Cell) -> list[dict[str, Any]]:
    """The distinct environments the cell's training started and resumed in, from its run's log
    (none before the run has one)."""
    train: list[dict[str, Any]] = []
    log = cell.run_dir / "metrics.jsonl"
    for line in (log.read_text().splitlines() if log.is_file() else []):
        r = json.loads(line)
        if r.get("kind") == "environment":
            env = {k: v for k, v in r.items() if k not in ("kind", "step")}
            if env not in train:
                train.append(env)
    return train


def _environments(cell: Cell) -> dict[str, Any]:
    """The environments the cell's training (each start and resume, distinct ones) and evaluation ran in."""
    return {"train": _train_environments(cell), "eval": cell.files.evaluation().get("environment")}


DISTRIBUTED_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _train_argv(cell: Cell, resume: Optional[bool]) -> list[str]:
    """The cell's training command, resuming its run when it has one (``resume``: decided by the caller,
    so that every process of a distributed cell decides alike)."""
    argv = cell.commands()["train"]
    if resume if resume is not None else (cell.run_dir / "config.yaml").is_file():
        argv = [*argv, "--resume", str(cell.run_dir)]
    return argv


def run_cell(cell: Cell, identity: Optional[dict[str, Any]] = None, why: Optional[list[str]] = None, *,
             rank: int = 0, resume: Optional[bool] = None, by_job: bool = False) -> dict[str, float]:
    """Train (or resume) and evaluate one cell; returns the seconds each part took. ``identity`` is
    recorded in ``cell.json`` (``resolve_identities`` makes it); ``why``, if the cell is made again
    (kept from ``cell.json`` when a stopped run had started making it again). In a cell trained by
    several processes (the distributed environment in ``os.environ``), each calls this with its
    ``rank``: every process trains, the first one alone records and evaluates. ``by_job``: called by
    the cell's submitit job, whose executor and jobs ``job.json`` holds (else the cell is made here)."""
    if rank:
        if not cell.files.train_json.is_file():
            with open(cell.dir / f"log.rank{rank}.txt", "a") as log:
                run_command(_train_argv(cell, resume), log, {**os.environ, **cell.study.cell_env()})
        return {}
    cell.dir.mkdir(parents=True, exist_ok=True)
    earlier = cell.recorded()
    if why is None and earlier is not None and identity is not None and earlier.get("identity") == identity:
        why = earlier.get("made_again")
    commands = cell.commands()
    files = cell.files
    record: dict[str, Any] = {"dataset": cell.dataset, "encoding": cell.encoding, "seed": cell.seed,
                              "command": cell.command_line(), "train_command": commands["train"],
                              "eval_command": commands["eval"]}
    if identity is not None:
        record["identity"] = identity
    if why:
        record["made_again"] = why
    job = files.job() if by_job else None
    record["executor"] = job["executor"] if job else "local"
    if job:
        record["jobs"] = job["jobs"]
    files = cell.files
    write_json(files.record_json, record)
    env = {**os.environ, **cell.study.cell_env()}
    timing = files.timing()
    with open(files.log, "a") as log:
        if not files.train_json.is_file():
            t = time.perf_counter()
            run_command(_train_argv(cell, resume), log, env)
            records = [json.loads(line) for line in (cell.run_dir / "metrics.jsonl").read_text().splitlines()]
            epochs = [r for r in records if r.get("kind") == "epoch"]
            # the run's own count covers the stretches before a kill too; this process saw only the last
            timing["train_s"] = (epochs[-1].get("train_s") if epochs else None) or time.perf_counter() - t
            write_json(files.timing_json, timing)  # first: train.json marks the training done
            write_json(files.train_json, {"epochs": epochs})
        if not files.eval_json.is_file():
            t = time.perf_counter()
            run_command(commands["eval"], log, {k: v for k, v in env.items() if k not in DISTRIBUTED_VARS})
            timing["eval_s"] = time.perf_counter() - t
            write_json(files.timing_json, timing)
    write_json(files.record_json, {**record, "environment": _environments(cell)})
    return timing


def prepare(cfg: StudyConfig, output: str | Path) -> tuple[list[Cell], dict[str, dict[str, Any]], dict[str, list[str]]]:
    """The study's cells, what each resolves to and which made cells must be made again (and why);
    refuses a directory made by another study, and a ``compare_with`` that names no study (which
    would otherwise surface only in the report, after every cell)."""
    if cfg.compare_with is not None:
        from .study_report import base_study

        base_study(Path(output), cfg.compare_with)
    cells = cfg.cells(output)
    check_cells_match(cells)
    identities = resolve_identities(cfg, cells)
    return cells, identities, cells_to_redo(cells, identities)


def start_study(cfg: StudyConfig, out: Path) -> tuple[list[Cell], dict[str, dict[str, Any]], dict[str, list[str]]]:
    """:func:`prepare`, then the cells to make again cleared and the study's config written beside them."""
    cells, identities, redo = prepare(cfg, out)
    for cell in cells:
        if cell.key in redo:
            _clear(cell, redo[cell.key])
    out.mkdir(parents=True, exist_ok=True)
    write_study_file(out, cfg.to_dict())
    return cells, identities, redo


def refuse_live_jobs(cells: list[Cell]) -> None:
    """A run here leaves alone the cells a submitit job is still making (a study submitted with
    ``--detach``): both would train into the same ``run/``."""
    from .cluster import job_state

    live = [(c, job) for c in cells if c.status() != "done" and (job := c.files.job()) and job_state(job) == "alive"]
    if live:
        shown = "\n  ".join(f"{c.key}: job {job['job_id']} ({job['executor']})" for c, job in live)
        executors = " or ".join(sorted({job["executor"] for _, job in live}))
        raise ValueError(f"{len(live)} cell(s) are still being made by their job:\n  {shown}\nrun with --executor "
                         f"{executors} to attach to them, or cancel the jobs (a job that no longer exists: remove "
                         f"its cell's job.json)")


def expected_seconds(cell: Cell, cells: list[Cell]) -> Optional[float]:
    """What making ``cell`` should take (its evaluation alone, for a cell already trained): what it
    took last time, for a cell cleared to be made again; else from the study's finished cells, the mean
    of those of its dataset and encoding, else the longest; None before any has finished."""
    parts = ("eval_s",) if cell.status() == "trained" else ("train_s", "eval_s")
    before = cell.files.timing()
    if all(p in before for p in parts) and cell.status() != "done":
        return sum(before[p] for p in parts)
    spent = []
    for c in cells:
        t = c.files.timing()
        if all(p in t for p in parts) and c.status() == "done":
            spent.append(((c.dataset, c.encoding), sum(t[p] for p in parts)))
    same = [s for key, s in spent if key == (cell.dataset, cell.encoding)]
    return sum(same) / len(same) if same else max((s for _, s in spent), default=None)


def run_study(cfg: StudyConfig, output: str | Path, *, jobs: int = 1, progress: bool = True,
              until: Optional[float] = None) -> dict[str, Any]:
    """Run every cell not yet done or whose identity changed (``jobs`` at a time, here), then
    aggregate. Failed cells are reported and left for the next run; the others go on. ``until`` (a
    ``time.time()``): no cell starts that its :func:`expected_seconds` says would end after it, so
    that a run with a deadline leaves no half-made cell behind (``result["not_started"]``: their
    expected seconds; no report while no cell is done). A cell whose submitit job still makes it is
    refused. (As submitit jobs: :func:`lookhere.study_jobs.run_study_jobs`.)"""
    from tqdm import tqdm

    out = Path(output)
    refuse_live_jobs(cfg.cells(out))
    cells, identities, redo = start_study(cfg, out)
    todo = [c for c in cells if c.status() != "done" or c.key in redo]
    failures: dict[str, str] = {}
    not_started: dict[str, float] = {}
    finished: list[str] = []
    lock = threading.Lock()
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc=cfg.name, unit="cell", disable=not progress)

    def one(cell: Cell) -> None:
        if until is not None:
            need = expected_seconds(cell, cells)
            if need is not None and time.time() + need > until:
                not_started[cell.key] = need
                return
        try:
            timing = run_cell(cell, identities[cell.key], redo.get(cell.key))
            said = f"made in {(timing.get('train_s', 0.0) + timing.get('eval_s', 0.0)) / 60:.1f} minutes"
        except RuntimeError as e:
            failures[cell.key] = f"{e}; see {cell.dir / 'log.txt'}"
            said = f"failed; see {cell.dir / 'log.txt'}"
        with lock:
            finished.append(cell.key)
            bar.update(1)
            bar.set_postfix_str(cell.key)
            if not progress:  # a line a cell where there is no bar (a log file)
                print(f"{cfg.name}: {len(cells) - len(todo) + len(finished)} of {len(cells)} cells; {cell.key} {said}",
                      flush=True)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(one, todo))
    bar.close()
    if failures and not any(c.status() == "done" for c in cells):
        raise RuntimeError("no cell finished: " + "; ".join(f"{key}: {why}" for key, why in failures.items()))
    report = write_report(out) if any(c.status() == "done" for c in cells) else {}  # none: all left for --until
    made_again = {key: why for key, why in redo.items() if key in finished and key not in failures}
    return {"cells": len(cells), "ran": len(todo) - len(not_started), "made_again": made_again,
            "failures": failures, "not_started": not_started, **report}


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
        ds = build_dataset(DataSpec(cfg.data, cfg.size, cfg.data_length, cfg.seed, cfg.data_root), "train")
        model = create_vit(**cfg.model_kwargs(cfg.num_classes or num_classes_of(ds)))
        opt = torch.optim.AdamW(model.parameters())
        x = torch.randn(cfg.batch_size, 3, cfg.size, cfg.size)
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
                "settings": max(1, len(knob_grid(model, cell.study.eval_settings(cell.dataset).lh_slope_scales,
                                                 size_ratio=cfg.size / max(cell.study.sizes(cell.dataset)))))}
    finally:
        torch.set_num_threads(threads)


def estimate(cfg: StudyConfig, output: str | Path, *, jobs: int = 1) -> dict[str, Any]:
    """Cells with their status and an estimate of the seconds each needs (measured: a few training
    steps and forward passes of each model on one thread; cells already run use their own times)."""
    cells, _, redo = prepare(cfg, output)  # a dry run refuses what the run would refuse
    measured: dict[tuple[str, str], dict[str, Any]] = {}
    rows = []
    for cell in cells:
        status = "again" if cell.key in redo else cell.status()
        timing_file = cell.dir / "timing.json"
        if status == "done" and timing_file.is_file():
            t = json.loads(timing_file.read_text())
            rows.append((cell, status, 0.0, t.get("train_s", 0.0) + t.get("eval_s", 0.0)))
            continue
        if status == "done":
            rows.append((cell, status, 0.0, 0.0))
            continue
        key = (cell.dataset, cell.encoding)
        if key not in measured:
            measured[key] = _measure(cell)
        m = measured[key]
        tc = m["cfg"]
        steps = tc.epochs * (m["train_len"] // tc.batch_size)
        plan = cfg.eval_settings(cell.dataset)
        n_test = plan.length or 10000
        n_val = plan.val_length or 2000
        settings = m["settings"]
        larger = [s for s in cfg.sizes(cell.dataset) if s != tc.size]
        eval_s = sum(m["per_image_s"].values()) * n_test
        if plan.tune_knobs and settings > 1:
            eval_s += sum(m["per_image_s"][s] for s in larger) * (n_val * settings + n_test * 0.5)
        if plan.adversarial:
            passes = 3 * (1 + 1 + 1 + plan.pgd_steps + 1)  # forward+backward ~ 3 forwards, per attack
            eval_s += m["per_image_s"][tc.size] * plan.adversarial_samples * passes
        train_s = steps * m["step_s"] * (0.0 if status == "trained" else 1.0)
        rows.append((cell, status, train_s + eval_s, 0.0))
    remaining = sum(r[2] for r in rows)
    return {"rows": rows, "remaining_s": remaining, "wall_s": remaining / max(1, jobs), "jobs": jobs, "made_again": redo}


def format_estimate(est: dict[str, Any]) -> str:
    lines = [f"{'cell':48s} {'status':8s} {'estimate':>9s}"]
    for cell, status, todo_s, spent_s in est["rows"]:
        t = f"{todo_s / 60:7.1f} m" if todo_s else (f"({spent_s / 60:.1f} m)" if spent_s else "")
        lines.append(f"{cell.key:48s} {status:8s} {t:>9s}")
    for key, why in est.get("made_again", {}).items():
        lines.append(f"{key} is made again: {'; '.join(why)}")
    n_todo = sum(1 for r in est["rows"] if r[1] != "done")
    lines.append(f"{len(est['rows'])} cells, {n_todo} to run: about {est['remaining_s'] / 3600:.2f} CPU-hours, "
                 f"{est['wall_s'] / 3600:.2f} hours with --jobs {est['jobs']} (one thread per job)")
    return "\n".join(lines)


def write_report(output: str | Path) -> dict[str, str]:
    from .study_report import write_report as _write

    return _write(output)
