"""Make one recorded study cell again in another folder and compare what comes out with the record.

What the reports promise (docs/results/README.md#what-reproduces): the same ``eval.json`` to the
last bit on a machine whose versions, CPU capability and kernel pins match the recorded ones;
elsewhere, numbers within the seed spread. ``lookhere reproduce CELL`` is the check a reader runs:
it runs the cell's two recorded commands under the recorded environment variables (those of the
command line and the thread and kernel settings its evaluation recorded), then lists every
number that differs, the environment settings that differ, and, per test size, how far top-1 moved
against the spread of the study's seeds.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
from pathlib import Path
from typing import Any, Iterator

NOT_COMPARED = ("environment",)  # where and how a number was made, not the number


def recorded_cell(cell_dir: str | Path) -> dict[str, Any]:
    """``cell.json`` and ``eval/eval.json`` of a finished study cell; a clear error otherwise."""
    cell_dir = Path(cell_dir)
    cell_file, eval_file = cell_dir / "cell.json", cell_dir / "eval" / "eval.json"
    if not cell_file.is_file() or not eval_file.is_file():
        raise ValueError(f"{cell_dir} is not a finished study cell (it needs cell.json and eval/eval.json)")
    try:
        cell, recorded = json.loads(cell_file.read_text()), json.loads(eval_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cell_dir}: unreadable cell.json or eval/eval.json ({e})") from None
    missing = [k for k in ("command", "train_command", "eval_command") if k not in cell]
    if missing:
        raise ValueError(f"{cell_file} records no {', '.join(missing)}")
    return {"cell": cell, "eval": recorded}


def command_env(command_line: str) -> dict[str, str]:
    """The ``NAME=VALUE`` settings in front of the first command of a recorded command line."""
    env = {}
    for token in shlex.split(command_line):
        name, eq, value = token.partition("=")
        if not eq or not name.isidentifier():
            break
        env[name] = value
    return env


def relocate(argv: list[str], old: str, new: str) -> list[str]:
    """``argv`` with the recorded cell folder ``old`` (and paths under it) moved to ``new``."""
    return [new + a[len(old):] if a == old or a.startswith(old + "/") else a for a in argv]


def numbers(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every leaf of a JSON document as (dotted path, value), skipping ``NOT_COMPARED``."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k not in NOT_COMPARED:
                yield from numbers(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from numbers(v, f"{prefix}[{i}]")
    else:
        yield prefix, obj


def compare(recorded: dict[str, Any], rerun: dict[str, Any]) -> list[dict[str, Any]]:
    """The leaves that differ (or exist on one side only), with both values."""
    a, b = dict(numbers(recorded)), dict(numbers(rerun))
    return [{"key": k, "recorded": a.get(k), "rerun": b.get(k)} for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k) or (k in a) != (k in b)]


def environment_changes(recorded: dict[str, Any] | None, rerun: dict[str, Any] | None) -> list[str]:
    """``name: recorded -> now`` for every environment entry that differs (settings one by one)."""
    if not recorded or not rerun:
        return ["the recorded cell has no environment record"] if not recorded else []
    flat_a = {**{k: v for k, v in recorded.items() if k != "settings"}, **recorded.get("settings", {})}
    flat_b = {**{k: v for k, v in rerun.items() if k != "settings"}, **rerun.get("settings", {})}
    return [f"{k}: {flat_a.get(k)} -> {flat_b.get(k)}" for k in sorted(flat_a.keys() | flat_b.keys())
            if flat_a.get(k) != flat_b.get(k)]


def seed_spread(cell_dir: Path) -> dict[str, list[float]]:
    """Top-1 per test size over the study's seeds of this cell's dataset and encoding."""
    spread: dict[str, list[float]] = {}
    for f in sorted(cell_dir.parent.glob("seed*/eval/eval.json")):
        for size, row in json.loads(f.read_text())["sizes"].items():
            spread.setdefault(size, []).append(row["top1"])
    return spread


def reproduce_cell(cell_dir: str | Path, output: str | Path) -> dict[str, Any]:
    """Run the recorded commands of ``cell_dir`` into ``output`` (resuming a run left there) and
    write ``output/reproduce.json``: the differing numbers, environment changes and top-1 moves."""
    from .io import write_atomic
    from .study import run_command

    cell_dir, output = Path(cell_dir), Path(output)
    rec = recorded_cell(cell_dir)
    cell = rec["cell"]
    train_argv, eval_argv = list(cell["train_command"]), list(cell["eval_command"])
    recorded_run = train_argv[train_argv.index("--output") + 1]
    old = recorded_run[: -len("/run")] if recorded_run.endswith("/run") else recorded_run
    if output.resolve() == cell_dir.resolve():
        raise ValueError("--output must be another folder than the recorded cell")
    made_for = output / "cell.txt"  # which cell's rerun the folder holds: a resume must be of the same cell
    if output.is_dir() and any(output.iterdir()) and (
            not made_for.is_file() or made_for.read_text() != cell["command"]):
        raise ValueError(f"--output {output} holds something other than a rerun of {cell_dir}; choose another "
                         f"--output")
    output.mkdir(parents=True, exist_ok=True)
    made_for.write_text(cell["command"])
    train_argv, eval_argv = relocate(train_argv, old, str(output)), relocate(eval_argv, old, str(output))
    # The recorded command line's settings, and any other thread or kernel setting the evaluation recorded.
    recorded_settings = (rec["eval"].get("environment") or {}).get("settings", {})
    env = {**os.environ, **command_env(cell["command"]), **recorded_settings}
    with open(output / "log.txt", "a") as log:
        if not (output / "trained").is_file():
            if (output / "run" / "config.yaml").is_file():
                train_argv = [*train_argv, "--resume", str(output / "run")]
            run_command(train_argv, log, env)
            (output / "trained").touch()
        if not (output / "eval" / "eval.json").is_file():
            run_command(eval_argv, log, env)
    rerun = json.loads((output / "eval" / "eval.json").read_text())
    spread = seed_spread(cell_dir)
    top1 = {size: {"recorded": row["top1"], "rerun": rerun["sizes"][size]["top1"],
                   "seed_sd": statistics.stdev(spread[size]) if len(spread.get(size, [])) > 1 else None,
                   "seeds": len(spread.get(size, []))}
            for size, row in rec["eval"]["sizes"].items() if size in rerun.get("sizes", {})}
    result = {"cell": str(cell_dir), "output": str(output), "command": cell["command"],
              "differences": compare(rec["eval"], rerun),
              "environment_changes": environment_changes(rec["eval"].get("environment"), rerun.get("environment")),
              "top1": top1}
    result["identical"] = not result["differences"]
    write_atomic(output / "reproduce.json", lambda p: p.write_text(json.dumps(result, indent=2)))
    return result


def format_result(result: dict[str, Any], shown: int = 10) -> str:
    lines = [f"{result['cell']} made again in {result['output']}"]
    diffs = result["differences"]
    if result["identical"]:
        lines.append("eval.json: identical to the recorded one, every number to the last bit")
    else:
        lines.append(f"eval.json: {len(diffs)} number(s) differ from the recorded ones, e.g.")
        lines += [f"  {d['key']}: {d['recorded']} -> {d['rerun']}" for d in diffs[:shown]]
        lines.append("top-1 per size (recorded -> now; standard deviation over the study's seeds):")
        for size, t in result["top1"].items():
            sd = f"{t['seed_sd']:.4f} over {t['seeds']} seeds" if t["seed_sd"] is not None else "no spread"
            lines.append(f"  {size} px: {t['recorded']:.4f} -> {t['rerun']:.4f} ({sd})")
    env = result["environment_changes"]
    lines.append("environment: " + ("as recorded" if not env else "differs from the record: " + "; ".join(env)))
    return "\n".join(lines)
