"""Runs as submitit jobs, on this machine (``submitit-local``) or on a Slurm cluster: where they run
(:class:`ClusterConfig`), a training run as a job, and what became of a job. A study's cells as
jobs are ``study_jobs.py``.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional


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
            raise ValueError("--executor local runs one process (a study's cells: one each); for several processes "
                             "use --executor submitit-local (this machine) or slurm")
        if self.executor != "slurm" and (self.partition or self.slurm_args):
            raise ValueError(f"--partition and --slurm-arg are Slurm's; --executor {self.executor} would ignore them")
        if self.executor == "local" and (self.max_running or self.time_min):
            raise ValueError("--max-running and --time-min are for submitit's executors; --executor local runs "
                             "without a time limit (a study: --jobs cells at a time)")
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
