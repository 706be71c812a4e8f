"""A study's cells as submitit jobs, on this machine (``submitit-local``) or on a Slurm cluster.

One job per cell that is not done, each ``nodes_per_cell x tasks_per_node`` processes; a cell of
several processes trains as DDP, its distributed environment taken from the job (submitit's
``TorchDistributedEnvironment``), and its first process evaluates. A job is checkpointable: on
Slurm's signal before a time limit or a preemption it is requeued, and the cell's training resumes
from its last checkpoint (bit for bit, as ``--resume`` does). The submitting command records each
job in the cell's ``job.json`` and ``cell.json``; run again, it attaches to jobs that are pending or
running, submits again the cells whose job died (saying why and where its log is), and writes the
report once every cell is done. ``--detach`` submits and returns.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from .study_files import write_json

if TYPE_CHECKING:
    from .study import Cell, StudyConfig

EXECUTORS = ("local", "submitit-local", "slurm")
# Slurm states of a job that may still make its cell.
ALIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "UNKNOWN"}
LOCAL_TIMEOUT_MIN = 60 * 24 * 30  # submitit's local jobs otherwise stop after 2 minutes


@dataclass
class ClusterConfig:
    """Where and how a study's cells run: a study YAML's ``cluster:`` section, or the flags."""

    executor: str = "local"
    nodes_per_cell: int = 1
    tasks_per_node: int = 1
    partition: Optional[str] = None
    time_min: Optional[int] = None
    max_running: Optional[int] = None
    slurm_args: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Optional[dict[str, Any]], source: str = "cluster") -> "ClusterConfig":
        d = dict(d or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
        cfg = cls(**d)
        cfg.slurm_args = {str(k): str(v) for k, v in (cfg.slurm_args or {}).items()}
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check(self) -> None:
        """One clear message for a setting that cannot run, before anything is submitted."""
        if self.executor not in EXECUTORS:
            raise ValueError(f"--executor {self.executor!r}; allowed: {', '.join(EXECUTORS)}")
        for name in ("nodes_per_cell", "tasks_per_node", "time_min", "max_running"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if self.executor == "local" and (self.nodes_per_cell > 1 or self.tasks_per_node > 1):
            raise ValueError("--executor local runs each cell as one process; for several processes a cell use "
                             "--executor submitit-local (this machine) or slurm")
        if self.executor != "slurm" and (self.partition or self.slurm_args):
            raise ValueError(f"--partition and --slurm-arg are Slurm's; --executor {self.executor} would ignore them")
        if self.executor == "local" and (self.max_running or self.time_min):
            raise ValueError("--max-running and --time-min are for submitit's executors; --executor local runs "
                             "--jobs cells at a time, without a time limit")
        if self.executor == "submitit-local" and self.nodes_per_cell > 1:
            raise ValueError("--executor submitit-local runs on this machine: --nodes-per-cell must be 1")
        if self.executor == "local":
            return
        try:
            import submitit  # noqa: F401
        except ImportError:
            raise ValueError(f"--executor {self.executor} needs submitit: pip install 'lookhere[cluster]'") from None
        missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
        if self.executor == "slurm" and missing:
            raise ValueError(f"--executor slurm: no {' or '.join(missing)} on PATH; run on a Slurm login node, or "
                             f"use --executor submitit-local to run the same jobs on this machine")

    def executor_for(self, folder: Path):
        """submitit's executor with these resources; its logs and job files in ``folder``."""
        import submitit

        if self.executor == "slurm":
            ex = submitit.SlurmExecutor(folder=str(folder))
            params: dict[str, Any] = dict(nodes=self.nodes_per_cell, ntasks_per_node=self.tasks_per_node,
                                          gpus_per_node=self.tasks_per_node, signal_delay_s=120,
                                          additional_parameters=dict(self.slurm_args))
            if self.partition:
                params["partition"] = self.partition
            if self.time_min:
                params["time"] = self.time_min
            if self.max_running:
                params["array_parallelism"] = self.max_running
            ex.update_parameters(**params)
        else:
            ex = submitit.LocalExecutor(folder=str(folder))
            ex.update_parameters(tasks_per_node=self.tasks_per_node, timeout_min=self.time_min or LOCAL_TIMEOUT_MIN)
        return ex


class CellJob:
    """What a cell's job runs: train the cell (in every process of the job) and evaluate it (in the
    first), from the study's config; on a requeue signal, the same job again, resuming."""

    def __init__(self, study: dict[str, Any], root: str, key: str, identity: Optional[dict[str, Any]],
                 why: Optional[list[str]]):
        self.study, self.root, self.key, self.identity, self.why = study, root, key, identity, why
        # Decided here, once for every process of the job: whether the cell's training resumes.
        self.resume = (self.cell().run_dir / "config.yaml").is_file()

    def cell(self) -> "Cell":
        from .study import StudyConfig

        return next(c for c in StudyConfig.from_dict(self.study).cells(self.root) if c.key == self.key)

    def __call__(self) -> dict[str, float]:
        import submitit

        from .study import run_cell

        env = submitit.JobEnvironment()
        cell = self.cell()
        if env.num_tasks == 1:
            return run_cell(cell, self.identity, self.why)
        dist = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        return run_cell(cell, self.identity, self.why, rank=dist.rank, resume=self.resume)

    def checkpoint(self, *args: Any, **kwargs: Any):
        """submitit calls this on Slurm's signal: requeue the same cell (its training resumes)."""
        import submitit

        return submitit.helpers.DelayedSubmission(CellJob(self.study, self.root, self.key, self.identity, self.why))


class TrainJob:
    """One training run as a job: every process of the job trains (DDP when there are several, its
    environment taken from the job); on a requeue signal, the same run again, resuming."""

    def __init__(self, settings: dict[str, Any]):
        self.settings = settings

    def __call__(self) -> dict[str, Any]:
        import submitit
        import torch.distributed as dist

        from .train import TrainConfig, train

        if submitit.JobEnvironment().num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        try:
            result = train(TrainConfig.from_dict(self.settings))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        result.pop("model", None)
        return result

    def checkpoint(self, *args: Any, **kwargs: Any):
        import submitit

        run_dir = Path(self.settings.get("resume") or self.settings["output"])
        again = {**self.settings, "resume": str(run_dir)} if (run_dir / "config.yaml").is_file() else self.settings
        return submitit.helpers.DelayedSubmission(TrainJob(again))


def submit_run(settings: dict[str, Any], cluster: ClusterConfig):
    """Submit one training run (``TrainConfig`` settings) as a job; its logs in the run's ``jobs/``."""
    run_dir = Path(settings.get("resume") or settings["output"])
    folder = run_dir / "jobs"
    job = cluster.executor_for(folder).submit(TrainJob(settings))
    return job


def _local_alive(job_id: str) -> bool:
    """Whether a submitit-local job's controller process still runs (a finished child is reaped)."""
    pid = int(job_id)
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our child and has ended
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def job_state(record: dict[str, Any]) -> str:
    """``"alive"`` when the recorded job may still make its cell, else what became of it."""
    if record["executor"] == "submitit-local":
        return "alive" if _local_alive(record["job_id"]) else "ended"
    import submitit

    state = submitit.SlurmJob(record["folder"], record["job_id"]).state
    return "alive" if state.split()[0].upper() in ALIVE else state


def recorded_job(cell: "Cell") -> Optional[dict[str, Any]]:
    return cell.files.job()


def _record(cell: "Cell", job, cluster: ClusterConfig, folder: Path) -> dict[str, Any]:
    earlier = recorded_job(cell) or {}
    record = {"executor": cluster.executor, "job_id": str(job.job_id), "folder": str(folder),
              "log": str(job.paths.stdout), "nodes": cluster.nodes_per_cell, "tasks_per_node": cluster.tasks_per_node,
              "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "jobs": [*earlier.get("jobs", []), str(job.job_id)]}  # every job that worked on the cell
    cell.dir.mkdir(parents=True, exist_ok=True)
    write_json(cell.files.job_json, record)
    return record


def run_on_cluster(cfg: "StudyConfig", out: Path, cells: list["Cell"], identities: dict[str, Any],
                   redo: dict[str, list[str]], cluster: ClusterConfig, *, detach: bool = False,
                   progress: bool = True, poll_s: float = 2.0) -> dict[str, Any]:
    """Submit the cells not done (attaching to those whose job lives), then, unless ``detach``,
    wait for them all; returns what was submitted, attached to and failed."""
    from tqdm import tqdm

    folder = out / ".jobs"
    ex = cluster.executor_for(folder)
    todo = [c for c in cells if c.status() != "done"]
    attached, queue, why_again = [], [], {}
    for cell in todo:
        record = recorded_job(cell)
        if record is not None and cell.key not in redo:
            state = job_state(record)
            if state == "alive":
                attached.append(cell)
                continue
            why_again[cell.key] = f"its job {record['job_id']} {state.lower()} before the cell was done (log: " \
                                  f"{record['log']})"
        queue.append(cell)
    for key, why in why_again.items():
        print(f"{key}: {why}; submitting it again", file=sys.stderr)
    limit = cluster.max_running if cluster.executor == "submitit-local" and cluster.max_running else len(queue)
    jobs: dict[str, dict[str, Any]] = {c.key: recorded_job(c) for c in attached}

    def submit(batch: list["Cell"]) -> None:
        if not batch:
            return
        tasks = [CellJob(cfg.to_dict(), str(out), c.key, identities.get(c.key), redo.get(c.key)) for c in batch]
        if cluster.executor == "slurm":
            with ex.batch():  # one array job; --max-running caps how many of it run at once
                submitted = [ex.submit(t) for t in tasks]
        else:
            submitted = [ex.submit(t) for t in tasks]
        for cell, job in zip(batch, submitted):
            jobs[cell.key] = _record(cell, job, cluster, folder)

    submit(queue[:max(0, limit - len(attached))])
    waiting = queue[max(0, limit - len(attached)):]
    if detach:
        for key, record in jobs.items():
            print(f"{key}: job {record['job_id']} ({record['executor']}; log: {record['log']})")
        return {"cells": len(cells), "submitted": len(jobs) - len(attached), "attached": len(attached),
                "waiting": len(waiting), "jobs": jobs}
    failures: dict[str, str] = {}
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc=cfg.name, unit="cell", disable=not progress)
    pending = {c.key: c for c in todo if c.key in jobs}
    while pending or waiting:
        for key, cell in list(pending.items()):
            if cell.status() == "done":
                del pending[key]
                bar.update(1)
            elif job_state(jobs[key]) != "alive":
                failures[key] = f"its job {jobs[key]['job_id']} ended before the cell was done; see {jobs[key]['log']}"
                del pending[key]
                bar.update(1)
        free = limit - len(pending)
        if waiting and free > 0:
            batch, waiting = waiting[:free], waiting[free:]
            submit(batch)
            pending.update({c.key: c for c in batch})
        if pending:
            time.sleep(poll_s)
    bar.close()
    return {"cells": len(cells), "submitted": len(jobs) - len(attached), "attached": len(attached),
            "failures": failures, "jobs": jobs}
