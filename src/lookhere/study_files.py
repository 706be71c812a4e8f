"""A study cell on disk: its folder and files, defined once for the runner that writes them
(``study.py``) and the report that reads them (``study_report.py``).

``DATASET/ENCODING/seedN/`` holds ``cell.json`` (the commands that make the cell, its identity, the
environments it ran in), ``run/`` (the ``lookhere train`` run), ``train.json`` (the run's epoch
records; it marks the training done), ``timing.json`` (seconds of training and evaluation; kept
when the cell is cleared to be made again),
``eval/eval.json`` (``lookhere eval``'s results; it marks the cell done) and ``log.txt``.
The study's own ``study.yaml`` (its config as run) sits at the top.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from .io import read_yaml, write_atomic

STUDY_FILE = "study.yaml"


def cell_key(dataset: str, encoding: str, seed: int) -> str:
    """A cell's folder in its study (``folder:PATH`` and ``hf:NAME`` datasets as one name)."""
    return f"{dataset.replace(':', '-').replace('/', '-')}/{encoding}/seed{seed}"


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2)))


def write_study_file(root: Path, config: dict[str, Any]) -> None:
    write_atomic(root / STUDY_FILE, lambda tmp: tmp.write_text(yaml.safe_dump(config, sort_keys=False)))


def read_study_file(root: Path) -> dict[str, Any]:
    """The config a study ran with, as ``lookhere study`` wrote it; one message for a folder with none
    and for a file that is not one (edited by hand, or cut short by a copy)."""
    path = root / STUDY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{root}: not a study directory (no {STUDY_FILE}); run `lookhere study --config ...` first")
    try:
        config, why = read_yaml(path), "not a study's config"
    except ValueError as err:
        config, why = None, str(err).removeprefix(f"{path}: ")
    missing = [k for k in ("name", "datasets", "encodings", "seeds") if not isinstance(config, dict) or k not in config]
    if missing:
        raise ValueError(f"{path} is damaged: {why if config is None else why + ' (no ' + ', '.join(missing) + ')'}; "
                         f"run `lookhere study --config FILE --output {root}` with the study's file to write it again "
                         f"(finished cells are kept)")
    return config


@dataclass(frozen=True)
class CellFiles:
    dir: Path

    @classmethod
    def of(cls, root: str | Path, dataset: str, encoding: str, seed: int) -> "CellFiles":
        return cls(Path(root) / cell_key(dataset, encoding, seed))

    @property
    def record_json(self) -> Path:
        return self.dir / "cell.json"

    @property
    def run_dir(self) -> Path:
        return self.dir / "run"

    @property
    def train_json(self) -> Path:
        return self.dir / "train.json"

    @property
    def timing_json(self) -> Path:
        return self.dir / "timing.json"

    @property
    def eval_dir(self) -> Path:
        return self.dir / "eval"

    @property
    def eval_json(self) -> Path:
        return self.eval_dir / "eval.json"

    @property
    def log(self) -> Path:
        return self.dir / "log.txt"

    @property
    def job_json(self) -> Path:
        """The submitit job making the cell, and every earlier one (``lookhere.cluster``)."""
        return self.dir / "job.json"

    def job(self) -> Optional[dict[str, Any]]:
        return json.loads(self.job_json.read_text()) if self.job_json.is_file() else None

    def record(self) -> Optional[dict[str, Any]]:
        """``cell.json`` (None: not written yet); ValueError when unreadable."""
        if not self.record_json.is_file():
            return None
        try:
            d = json.loads(self.record_json.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            d = None
        if not isinstance(d, dict):
            raise ValueError(f"{self.dir} (cell.json unreadable)")
        return d

    def epochs(self) -> list[dict[str, Any]]:
        """The training run's epoch records (none before the training is done)."""
        return json.loads(self.train_json.read_text()).get("epochs", []) if self.train_json.is_file() else []

    def timing(self) -> dict[str, float]:
        return json.loads(self.timing_json.read_text()) if self.timing_json.is_file() else {}

    def evaluation(self) -> dict[str, Any]:
        return json.loads(self.eval_json.read_text())

    def status(self) -> str:
        """``done`` (evaluated), ``trained``, ``started`` (a checkpoint to resume) or ``todo``."""
        if self.eval_json.is_file():
            return "done"
        if self.train_json.is_file():
            return "trained"
        if (self.run_dir / "last" / "state.pt").is_file():
            return "started"
        return "todo"
