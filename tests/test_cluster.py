"""Studies through submitit: its LocalExecutor (the same code path as Slurm, on this machine) and a
stand-in ``sbatch`` that keeps the scripts it is given, as one tests Slurm code without Slurm."""

import json
import os
import signal
import stat
import time
from pathlib import Path

import pytest

from lookhere.cli import main
from lookhere.cluster import ClusterConfig
from lookhere.study import StudyConfig, run_study
from lookhere.study_jobs import recorded_job, run_study_jobs

from test_study import TINY

LOCAL = ClusterConfig(executor="submitit-local")


def numbers(root: Path, cfg: StudyConfig) -> dict:
    """Every cell's evaluation numbers (not its timings or environment)."""
    out = {}
    for cell in cfg.cells(root):
        ev = json.loads(cell.eval_json.read_text())
        out[cell.key] = {k: v for k, v in ev.items() if k not in ("environment", "seconds", "output")}
    return out


def descendants(pid: int) -> list[int]:
    kids = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                kids += [int(child), *descendants(int(child))]
    except OSError:  # a process that ended meanwhile
        pass
    return kids


@pytest.fixture(scope="module")
def tiny_here(tmp_path_factory) -> Path:
    """The tiny study made here, without jobs: the numbers each job-made study must give (read only)."""
    out = tmp_path_factory.mktemp("here")
    run_study(StudyConfig.from_dict(TINY), out, progress=False)
    return out


def test_submitit_local_gives_the_local_numbers_and_records_its_jobs(tmp_path, tiny_here):
    cfg = StudyConfig.from_dict(TINY)
    result = run_study_jobs(cfg, tmp_path / "jobs", LOCAL, progress=False)
    assert result["failures"] == {} and result["ran"] == 2
    assert numbers(tmp_path / "jobs", cfg) == numbers(tiny_here, cfg)
    for cell in cfg.cells(tmp_path / "jobs"):
        job = recorded_job(cell)
        assert job["executor"] == "submitit-local" and job["job_id"] == result["jobs"][cell.key]["job_id"]
        assert Path(job["log"]).is_file() and job["jobs"] == [job["job_id"]]
        made = json.loads((cell.dir / "cell.json").read_text())
        assert made["executor"] == "submitit-local" and made["jobs"] == [job["job_id"]]
    assert json.loads((cfg.cells(tiny_here)[0].dir / "cell.json").read_text())["executor"] == "local"
    assert (tmp_path / "jobs" / "report.md").is_file()


def test_detach_then_attach_makes_each_cell_with_one_job_and_resubmits_a_killed_one(tmp_path, capsys, tiny_here):
    cfg = StudyConfig.from_dict(TINY)
    out = tmp_path / "study"
    first = run_study_jobs(cfg, out, LOCAL, progress=False, detach=True)
    assert first["detached"] and first["ran"] == 2
    ids = {k: j["job_id"] for k, j in first["jobs"].items()}
    cells = cfg.cells(out)
    killed = cells[0]
    metrics = killed.run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (killed.run_dir / "last" / "state.pt").is_file():
        time.sleep(0.05)
    pid = int(ids[killed.key])
    for p in [pid, *descendants(pid)]:  # the job, its task and the cell's training process
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert metrics.is_file() and not killed.files.train_json.is_file()
    capsys.readouterr()
    again = run_study_jobs(cfg, out, LOCAL, progress=False)
    err = capsys.readouterr().err
    assert f"{killed.key}: its job {ids[killed.key]} ended before the cell was done" in err
    assert again["ran"] == 1 and again["failures"] == {}
    assert recorded_job(cells[1])["job_id"] == ids[cells[1].key]  # attached to, not submitted again
    assert recorded_job(killed)["jobs"] == [ids[killed.key], recorded_job(killed)["job_id"]]
    assert json.loads((killed.dir / "cell.json").read_text())["jobs"] == recorded_job(killed)["jobs"]
    assert numbers(out, cfg) == numbers(tiny_here, cfg)  # the resumed cell as if never killed


class _Executor:
    """Stands in for submitit's executors: records what is submitted, runs nothing."""

    def __init__(self):
        self.submitted = []

    def submit(self, task):
        self.submitted.append(task.key)
        return type("Job", (), {"job_id": str(100 + len(self.submitted)),
                                "paths": type("Paths", (), {"stdout": Path("job.out")})})()

    def batch(self):
        import contextlib

        return contextlib.nullcontext()


@pytest.mark.parametrize("cluster, submitted_now", [(ClusterConfig(executor="slurm"), 3),
                                                     (ClusterConfig(executor="submitit-local"), 3),
                                                     (ClusterConfig(executor="submitit-local", max_running=2), 1)])
def test_a_job_attached_to_does_not_hold_back_the_cells_still_to_submit(tmp_path, monkeypatch, cluster, submitted_now,
                                                                        capsys):
    """Run again while one cell's job lives: Slurm (its array caps what runs) and submitit-local without
    --max-running take every other cell at once; with --max-running the attached job counts against it."""
    import lookhere.study_jobs as study_jobs
    from lookhere.study_files import write_json

    cfg = StudyConfig.from_dict({**TINY, "seeds": [0, 1]})
    cells = cfg.cells(tmp_path)
    assert len(cells) == 4
    cells[0].dir.mkdir(parents=True)
    write_json(cells[0].files.job_json, {"executor": cluster.executor, "job_id": "7", "folder": "f", "log": "l",
                                         "jobs": ["7"]})
    monkeypatch.setattr(study_jobs, "job_state", lambda record: "alive")
    ex = _Executor()
    monkeypatch.setattr(ClusterConfig, "executor_for", lambda self, folder: ex)
    ran = study_jobs.run_on_cluster(cfg, tmp_path, cells, {}, {}, cluster, detach=True, progress=False)
    assert ex.submitted == [c.key for c in cells[1:1 + submitted_now]]
    assert ran["attached"] == 1 and ran["submitted"] == submitted_now and ran["waiting"] == 3 - submitted_now
    if ran["waiting"]:
        assert "2 cell(s) not submitted: --max-running 2 are running" in capsys.readouterr().out


def test_a_failed_job_is_not_said_to_be_made_again(tmp_path, monkeypatch):
    import lookhere.study_jobs as study_jobs

    cfg = StudyConfig.from_dict({**TINY, "seeds": [0]})
    cells = cfg.cells(tmp_path)
    made, failed = (c.key for c in cells)
    redo = {c.key: ["a new setting"] for c in cells}
    monkeypatch.setattr(study_jobs, "start_study", lambda cfg, out: (cells, {c.key: {} for c in cells}, redo))
    (cells[0].dir / "eval").mkdir(parents=True)
    (cells[0].dir / "eval" / "eval.json").write_text("{}")
    monkeypatch.setattr(study_jobs, "run_on_cluster", lambda *a, **kw: {"submitted": 2, "jobs": [],
                                                                         "failures": {failed: "exit 1"}})
    monkeypatch.setattr(study_jobs, "write_report", lambda out: {"report": "r", "results": "j"})
    result = run_study_jobs(cfg, tmp_path, LOCAL, progress=False)
    assert result["made_again"] == {made: ["a new setting"]} and set(result["failures"]) == {failed}


def test_a_local_run_leaves_alone_a_cell_whose_job_lives_and_records_a_cell_made_here_as_local(tmp_path, monkeypatch):
    """Run without --executor while a cell's job (submitted with --detach) still makes it: refused, naming
    the job and how to attach, before anything is touched. Once the job has ended, the cell made here is
    recorded as made here, not by the job its job.json names."""
    import subprocess

    import lookhere.study as study
    from lookhere.study_files import write_json

    cfg = StudyConfig.from_dict({**TINY, "encodings": ["lh-90"], "reference": "lh-90"})
    cell = cfg.cells(tmp_path)[0]
    cell.dir.mkdir(parents=True)
    monkeypatch.setattr(study, "resolve_identities", lambda cfg, cells: {c.key: {} for c in cells})
    monkeypatch.setattr(study, "write_report", lambda out: {"report": "r", "results": "j"})
    ran = []

    def run_command(argv, log, env):  # what `lookhere train` and `lookhere eval` leave behind
        ran.append(argv[1])
        if argv[1] == "train":
            cell.run_dir.mkdir(parents=True, exist_ok=True)
            (cell.run_dir / "metrics.jsonl").write_text(json.dumps({"kind": "epoch", "epoch": 0, "train_s": 1.0}) + "\n")
        else:
            cell.eval_json.parent.mkdir(parents=True, exist_ok=True)
            cell.eval_json.write_text("{}")

    monkeypatch.setattr(study, "run_command", run_command)
    job = subprocess.Popen(["sleep", "60"])  # stands for the submitit-local job still making the cell
    try:
        write_json(cell.files.job_json, {"executor": "submitit-local", "job_id": str(job.pid), "folder": "f",
                                         "log": "l", "jobs": [str(job.pid)]})
        with pytest.raises(ValueError, match=rf"(?s)1 cell\(s\) are still being made by their job:\n  {cell.key}: job "
                                             rf"{job.pid} \(submitit-local\).*run with --executor submitit-local to "
                                             rf"attach to them, or cancel the jobs"):
            run_study(cfg, tmp_path, progress=False)
        assert ran == [] and not (tmp_path / "study.yaml").exists()
    finally:
        job.kill()
        job.wait()
    run_study(cfg, tmp_path, progress=False)  # the job has ended: the cell is made here
    assert ran == ["train", "eval"]
    made = json.loads(cell.files.record_json.read_text())
    assert made["executor"] == "local" and "jobs" not in made


def test_a_job_that_ends_as_it_finishes_its_cell_is_neither_a_failure_nor_submitted_again(tmp_path, monkeypatch,
                                                                                           capsys):
    """The cell is looked at again once its job is seen ended: a job that wrote eval.json and exited between
    the look at the cell and the look at the job made its cell (sacct and squeue make that gap longer)."""
    import lookhere.study_jobs as study_jobs
    from lookhere.study_files import write_json

    cfg = StudyConfig.from_dict({**TINY, "encodings": ["lh-90"], "reference": "lh-90"})
    ex = _Executor()
    monkeypatch.setattr(ClusterConfig, "executor_for", lambda self, folder: ex)
    for alive_looks in (0, 1):  # ends as the run starts (before submitting), or while it waits
        out = tmp_path / f"alive{alive_looks}"
        cell = cfg.cells(out)[0]
        cell.dir.mkdir(parents=True)
        write_json(cell.files.job_json, {"executor": "submitit-local", "job_id": "7", "folder": "f", "log": "l",
                                         "jobs": ["7"]})
        looks = []

        def job_state(record):
            looks.append(record["job_id"])
            if len(looks) <= alive_looks:
                return "alive"
            cell.eval_json.parent.mkdir(parents=True, exist_ok=True)  # the job's evaluation ends, then the job
            cell.eval_json.write_text("{}")
            return "ended"

        monkeypatch.setattr(study_jobs, "job_state", job_state)
        capsys.readouterr()
        ran = study_jobs.run_on_cluster(cfg, out, [cell], {}, {}, LOCAL, progress=False, poll_s=0)
        assert ran["failures"] == {} and ex.submitted == [], alive_looks
        assert "submitting it again" not in capsys.readouterr().err


def test_a_cell_of_two_tasks_trains_as_two_gloo_processes(tmp_path):
    cfg = StudyConfig.from_dict({**TINY, "encodings": ["lh-90"], "reference": "lh-90"})
    result = run_study_jobs(cfg, tmp_path, ClusterConfig(executor="submitit-local", tasks_per_node=2), progress=False)
    assert result["failures"] == {}
    cell = cfg.cells(tmp_path)[0]
    env = [json.loads(x) for x in (cell.run_dir / "metrics.jsonl").read_text().splitlines()
           if json.loads(x)["kind"] == "environment"]
    assert env and all(e["world_size"] == 2 for e in env)
    assert cell.eval_json.is_file() and recorded_job(cell)["tasks_per_node"] == 2


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch):
    """An ``sbatch`` on PATH that keeps each script and answers with a job id."""
    bindir, kept = tmp_path / "bin", tmp_path / "scripts"
    bindir.mkdir()
    kept.mkdir()
    script = bindir / "sbatch"
    script.write_text(f"#!/bin/sh\ncp \"$1\" {kept}/$(date +%s%N).sh\necho 'Submitted batch job 4242'\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    (bindir / "srun").write_text("#!/bin/sh\nexit 1\n")  # named in the scripts; never run here
    (bindir / "srun").chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    return kept


def test_slurm_submits_one_array_with_the_resources_asked_for(tmp_path, fake_sbatch, capsys):
    cfg = tmp_path / "study.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump({**TINY, "cluster": {"partition": "gpu", "slurm_args": {"qos": "high"}}}))
    out = tmp_path / "out"
    assert main(["study", "--config", str(cfg), "--output", str(out), "--executor", "slurm", "--nodes-per-cell", "2",
                 "--tasks-per-node", "4", "--time-min", "90", "--max-running", "1", "--slurm-arg", "account=abc",
                 "--detach", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    scripts = list(fake_sbatch.iterdir())
    assert len(scripts) == 1  # one array job for both cells
    lines = [x for x in scripts[0].read_text().splitlines() if x.startswith("#SBATCH")]
    for expected in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--time=90",
                     "--signal=USR2@120", "--account=abc", "--qos=high", "--array=0-1%1"):
        assert f"#SBATCH {expected}" in lines, (expected, lines)
    keys = [c.key for c in StudyConfig.from_dict(TINY).cells(out)]
    for i, key in enumerate(keys):
        job = json.loads((out / key / "job.json").read_text())
        assert job["executor"] == "slurm" and job["job_id"] == f"4242_{i}"
        assert f"{key}: job 4242_{i}" in printed


def test_cluster_settings_that_cannot_run_are_one_clear_message(tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "study.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(TINY))
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch
    base = ["study", "--config", str(cfg), "--output", str(tmp_path / "o"), "--no-progress"]
    for extra, message in [
        (["--executor", "slurm"], "--executor slurm: no sbatch or srun on PATH"),
        (["--detach"], "--detach submits jobs: it needs --executor submitit-local or slurm"),
        (["--tasks-per-node", "2"], "--executor local runs one process"),
        (["--executor", "submitit-local", "--nodes-per-cell", "2"], "--nodes-per-cell must be 1"),
        (["--executor", "slurm", "--slurm-arg", "account"], "--slurm-arg 'account': expected KEY=VALUE"),
        (["--executor", "submitit-local", "--partition", "gpu"], "--executor submitit-local would ignore them"),
        (["--max-running", "2"], "--max-running and --time-min are for submitit's executors"),
        (["--executor", "submitit-local", "--jobs", "2"], "with --executor submitit-local every cell is a job"),
    ]:
        capsys.readouterr()
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (extra, err)
    with pytest.raises(ValueError, match="cluster: unknown setting"):
        StudyConfig.from_dict({**TINY, "cluster": {"gpus": 8}})


def test_a_training_run_as_a_job_of_two_processes_and_detached(tmp_path, capsys):
    args = ["train", "--data", "synthetic", "--data-length", "128", "--img-size", "16", "--patch-size", "4",
            "--embed-dim", "48", "--depth", "1", "--num-heads", "12", "--batch-size", "16", "--epochs", "1",
            "--no-progress", "--executor", "submitit-local"]
    assert main([*args, "--tasks-per-node", "2", "--output", str(tmp_path / "ddp")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("job ") and json.loads(out[-1])["step"] == 128 // 16
    env = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
           if json.loads(x)["kind"] == "environment"]
    assert [e["world_size"] for e in env] == [2]
    assert main([*args, "--detach", "--output", str(tmp_path / "later")]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("job ") and "log: " in line and "{" not in line  # returned before any result
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "later" / "last" / "model.safetensors").is_file():
        time.sleep(0.1)
    assert (tmp_path / "later" / "last" / "model.safetensors").is_file()


def test_a_requeued_job_resumes_its_run_or_cell():
    """What submitit submits again on Slurm's signal: the same cell, or the same run with --resume."""
    from lookhere.cluster import TrainJob
    from lookhere.study_jobs import CellJob

    settings = {"output": "/nonexistent/run", "epochs": 3}
    assert TrainJob(settings).checkpoint().function.settings == settings  # nothing trained yet: start again
    cell = CellJob(StudyConfig.from_dict(TINY).to_dict(), "/nonexistent", "synthetic-where/lh-90/seed0", None, None)
    again = cell.checkpoint().function
    assert (again.key, again.root, again.resume) == (cell.key, cell.root, False)


def test_a_job_signalled_before_its_time_limit_is_requeued_and_resumes_bit_exact(tmp_path):
    """Slurm's USR2 before a time limit (or a preemption), played on submitit's local controller: the
    job checkpoints, is requeued (the same job id), and the cell's training resumes from its last
    checkpoint to the numbers of a cell never stopped. Its cell trains 256 steps (a few seconds), so
    the signal that follows its first checkpoint comes before the training ends on a busy machine too."""
    cfg = StudyConfig.from_dict({**TINY, "encodings": ["lh-90"], "reference": "lh-90",
                                 "train": {**TINY["train"], "data_length": 2048}})
    run_study(cfg, tmp_path / "whole", progress=False)
    out = tmp_path / "study"
    first = run_study_jobs(cfg, out, LOCAL, progress=False, detach=True)
    cell = cfg.cells(out)[0]
    deadline = time.time() + 120
    while time.time() < deadline and not (cell.run_dir / "last" / "state.pt").is_file():
        time.sleep(0.05)
    # Slurm signals the job's processes; on this machine, its one task (the controller's child)
    task = next(p for p in descendants(int(first["jobs"][cell.key]["job_id"]))
                if b"submitit.core._submit" in Path(f"/proc/{p}/cmdline").read_bytes())
    os.kill(task, signal.SIGUSR2)
    again = run_study_jobs(cfg, out, LOCAL, progress=False)
    assert again["ran"] == 0 and again["failures"] == {}  # attached: the requeued job made the cell
    assert recorded_job(cell)["jobs"] == [first["jobs"][cell.key]["job_id"]]
    starts = [json.loads(x) for x in (cell.run_dir / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["kind"] == "environment"]
    assert len(starts) == 2 and starts[1]["step"] > 0  # trained, stopped, resumed
    assert numbers(out, cfg) == numbers(tmp_path / "whole", cfg)
