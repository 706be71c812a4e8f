"""A study's cells as submitit jobs (:mod:`lookhere.cluster` says where they run).

One job per cell that is not done, each ``nodes_per_cell x tasks_per_node`` processes; a cell of
several processes trains as DDP, its distributed environment taken from the job (submitit's
``TorchDistributedEnvironment``), and its first process evaluates. A job is checkpointable: on
Slurm's signal before a time limit or a preemption it is requeued, and the cell's training resumes
from its last checkpoint (bit for bit, as ``--resume`` does). The submitting command records each
job in the cell's ``job.json`` and ``cell.json``; run again, it attaches to jobs that are pending or
running, submits again the cells whose job died (saying why and where its log is), and writes the
report once every cell is done. ``detach`` submits and returns.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Optional

from .cluster import ClusterConfig, job_state
from .study import Cell, StudyConfig, run_cell, start_study, write_report
from .study_files import write_json


class CellJob:
    """What a cell's job runs: train the cell (in every process of the job) and evaluate it (in the
    first), from the study's config; on a requeue signal, the same job again, resuming."""

    def __init__(self, study: dict[str, Any], root: str, key: str, identity: Optional[dict[str, Any]],
                 why: Optional[list[str]]):
        self.study, self.root, self.key, self.identity, self.why = study, root, key, identity, why
        # Decided here, once for every process of the job: whether the cell's training resumes.
        self.resume = (self.cell().run_dir / "config.yaml").is_file()

    def cell(self) -> Cell:
        return next(c for c in StudyConfig.from_dict(self.study).cells(self.root) if c.key == self.key)

    def __call__(self) -> dict[str, float]:
        import submitit

        env = submitit.JobEnvironment()
        cell = self.cell()
        if env.num_tasks == 1:
            return run_cell(cell, self.identity, self.why, by_job=True)
        dist = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        return run_cell(cell, self.identity, self.why, rank=dist.rank, resume=self.resume, by_job=True)

    def checkpoint(self, *args: Any, **kwargs: Any):
        """submitit calls this on Slurm's signal: requeue the same cell (its training resumes)."""
        import submitit

        return submitit.helpers.DelayedSubmission(CellJob(self.study, self.root, self.key, self.identity, self.why))


def recorded_job(cell: Cell) -> Optional[dict[str, Any]]:
    return cell.files.job()


def _record(cell: Cell, job, cluster: ClusterConfig, folder: Path) -> dict[str, Any]:
    earlier = recorded_job(cell) or {}
    record = {"executor": cluster.executor, "job_id": str(job.job_id), "folder": str(folder),
              "log": str(job.paths.stdout), "nodes": cluster.nodes_per_cell, "tasks_per_node": cluster.tasks_per_node,
              "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "jobs": [*earlier.get("jobs", []), str(job.job_id)]}  # every job that worked on the cell
    cell.dir.mkdir(parents=True, exist_ok=True)
    write_json(cell.files.job_json, record)
    return record


def run_on_cluster(cfg: StudyConfig, out: Path, cells: list[Cell], identities: dict[str, Any],
                   redo: dict[str, list[str]], cluster: ClusterConfig, *, detach: bool = False,
                   progress: bool = True, poll_s: float = 2.0) -> dict[str, Any]:
    """Submit the cells not done (attaching to those whose job lives), then, unless ``detach``,
    wait for them all; returns what was submitted, attached to and failed."""
    from tqdm import tqdm

    folder = out / ".jobs"
    ex = cluster.executor_for(folder)
    todo = [c for c in cells if c.status() != "done"]
    attached, queue, why_again = [], [], {}
    for cell in list(todo):
        record = recorded_job(cell)
        if record is not None and cell.key not in redo:
            state = job_state(record)
            if state == "alive":
                attached.append(cell)
                continue
            if cell.status() == "done":  # looked at again: its job made it, then ended, since the first look
                todo.remove(cell)
                continue
            why_again[cell.key] = f"its job {record['job_id']} {state.lower()} before the cell was done (log: " \
                                  f"{record['log']})"
        queue.append(cell)
    for key, why in why_again.items():
        print(f"{key}: {why}; submitting it again", file=sys.stderr)
    # submitit-local has no queue: --max-running cells run at once, the jobs attached to among them, and
    # the rest are submitted as those end. Slurm takes every cell now (its array caps what runs at once).
    cap = cluster.max_running if cluster.executor == "submitit-local" and cluster.max_running else None
    room = len(queue) if cap is None else max(0, cap - len(attached))
    jobs: dict[str, dict[str, Any]] = {c.key: recorded_job(c) for c in attached}

    def submit(batch: list[Cell]) -> None:
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

    submit(queue[:room])
    waiting = queue[room:]
    if detach:
        for key, record in jobs.items():
            print(f"{key}: job {record['job_id']} ({record['executor']}; log: {record['log']})")
        if waiting:
            print(f"{len(waiting)} cell(s) not submitted: --max-running {cap} are running; run the same command "
                  f"again (without --detach it waits and submits them as cells end)")
        return {"cells": len(cells), "submitted": len(jobs) - len(attached), "attached": len(attached),
                "waiting": len(waiting), "jobs": jobs}
    failures: dict[str, str] = {}
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc=cfg.name, unit="cell", disable=not progress)
    pending = {c.key: c for c in todo if c.key in jobs}
    while pending or waiting:
        for key, cell in list(pending.items()):
            if cell.status() != "done" and job_state(jobs[key]) == "alive":
                continue
            if cell.status() != "done":  # looked at again after the job: one that made its cell, then ended, did
                failures[key] = f"its job {jobs[key]['job_id']} ended before the cell was done; see {jobs[key]['log']}"
            del pending[key]
            bar.update(1)
        free = cap - len(pending) if waiting else 0
        if free > 0:
            batch, waiting = waiting[:free], waiting[free:]
            submit(batch)
            pending.update({c.key: c for c in batch})
        if pending:
            time.sleep(poll_s)
    bar.close()
    return {"cells": len(cells), "submitted": len(jobs) - len(attached), "attached": len(attached),
            "failures": failures, "jobs": jobs}


def run_study_jobs(cfg: StudyConfig, output: str | Path, cluster: ClusterConfig, *, detach: bool = False,
                   progress: bool = True) -> dict[str, Any]:
    """:func:`lookhere.study.run_study` with every cell a submitit job: cells whose identity changed
    are cleared and made again, the report written once every cell is done (unless ``detach``)."""
    cluster.check()
    if cluster.executor == "local":
        raise ValueError("run_study_jobs submits jobs: use --executor submitit-local or slurm (or run_study)")
    out = Path(output)
    cells, identities, redo = start_study(cfg, out)
    ran = run_on_cluster(cfg, out, cells, identities, redo, cluster, detach=detach, progress=progress)
    base = {"cells": len(cells), "ran": ran["submitted"], "made_again": redo, "jobs": ran["jobs"]}
    if detach:
        return {**base, "detached": True, "failures": {}, "waiting": ran["waiting"]}
    if ran["failures"] and not any(c.status() == "done" for c in cells):
        raise RuntimeError("no cell finished: " + "; ".join(f"{k}: {w}" for k, w in ran["failures"].items()))
    made_again = {key: why for key, why in redo.items() if key not in ran["failures"]}
    return {**base, "made_again": made_again, "failures": ran["failures"], **write_report(out)}
