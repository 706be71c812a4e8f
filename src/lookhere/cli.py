"""The ``lookhere`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

from . import flags

def _example(args: argparse.Namespace) -> int:
    """Build a LookHere ViT at one size and classify random images at three sizes, no set-up calls."""
    import torch

    from . import create_vit

    if args.img_size % args.patch_size:
        raise ValueError(f"--img-size {args.img_size} is not a multiple of --patch-size {args.patch_size}")
    torch.manual_seed(args.seed)
    model = create_vit(args.pos_encoding, img_size=args.img_size, patch_size=args.patch_size, embed_dim=192,
                       depth=12, num_heads=12, num_classes=10).eval()
    print(f"ViT-Ti/{args.patch_size} with {args.pos_encoding}, built for {args.img_size}px "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")
    sizes = [(args.img_size, args.img_size), (2 * args.img_size, 2 * args.img_size),
             (args.img_size, 3 * args.img_size)]
    with torch.no_grad():
        for h, w in sizes:
            x = torch.randn(args.batch_size, 3, h, w)
            t = time.perf_counter()
            logits = model(x)
            dt = time.perf_counter() - t
            grid = (h // args.patch_size, w // args.patch_size)
            print(f"  {h:4d}x{w:<4d} grid {grid[0]:2d}x{grid[1]:<2d} -> logits {tuple(logits.shape)}, "
                  f"predicted classes {logits.argmax(-1).tolist()}  ({dt * 1000:.0f} ms)")
    return 0


def _fov(args: argparse.Namespace) -> int:
    from .config import PRESETS
    from .plots import plot_fov

    if args.grid < 1:
        raise ValueError(f"--grid must be >= 1, got {args.grid}")
    for name in args.preset or list(PRESETS):
        out = f"{args.out_dir}/fov-{name}.png"
        plot_fov(name, out, grid_size=(args.grid, args.grid), depth=12)
        print(out)
    return 0


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (``--pos-encoding`` for ``pos_encoding``), its help from the field's
    metadata; flags left out take the value of the --config file, then of the run being resumed, then
    the field's default."""
    import dataclasses
    import typing

    from .train import TrainConfig, flag

    parser.add_argument("--config", help="YAML file of settings (flag names with - or _); flags override it")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        name = flag(f.name)
        default = f.metadata["unset"] if f.default is None else f.default
        help = f"{f.metadata['help']} (default: {default})".replace("%", "%%")
        kinds = [a for a in typing.get_args(hints[f.name]) if a is not type(None)] or [hints[f.name]]
        kind = kinds[0]
        if any(typing.get_origin(k) is list for k in kinds):  # one value, or several
            parser.add_argument(name, type=kind, nargs="+", default=None, help=help)
        elif kind is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=None, help=help)
        elif kind is dict:
            parser.add_argument(name, type=_json_object, default=None, metavar="JSON", help=help)
        else:
            parser.add_argument(name, type=kind, default=None, help=help)


def _add_cluster_flags(parser: argparse.ArgumentParser, what: str) -> None:
    """Where a study's cells (``what="cell"``) or a training run (``"run"``) run: submitit's executors."""
    cl = parser.add_argument_group(f"where each {what} runs" + (" (also a study YAML's cluster: section; these "
                                                               "flags override it)" if what == "cell" else ""))
    cl.add_argument("--executor", choices=["local", "submitit-local", "slurm"],
                    help=f"local: here{', --jobs cells at a time' if what == 'cell' else ''} (default); "
                         f"submitit-local: a submitit job per {what} on this machine; slurm: a Slurm job per {what} "
                         f"(pip install 'lookhere[cluster]')")
    cl.add_argument("--nodes-per-cell", type=flags.count, help=f"nodes of each {what}'s job (default 1)")
    cl.add_argument("--tasks-per-node", type=flags.count,
                    help=f"processes per node, one GPU each on Slurm; a {what} of several trains as DDP (default 1)")
    cl.add_argument("--partition", help="Slurm partition")
    cl.add_argument("--time-min", type=flags.count, help=f"each job's time limit in minutes (Slurm requeues a {what} "
                                                         f"that reaches it; it resumes from its checkpoint)")
    cl.add_argument("--max-running", type=flags.count, help="cells running at once (Slurm: the array's limit)"
                    if what == "cell" else argparse.SUPPRESS)
    cl.add_argument("--slurm-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="an sbatch option for every job, e.g. account=abc or constraint=h100 (repeatable)")
    cl.add_argument("--detach", action="store_true", help=f"submit the {what}'s job(s) and return" +
                    ("; the same command again attaches to them" if what == "cell" else ", printing the job id"))


def _json_object(text: str) -> dict:
    """argparse type of a JSON-object flag: argparse names the flag in the message."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"interpolate\": true}}', got {text!r}")
    return value


def _train_config(args: argparse.Namespace):
    import dataclasses

    from .train import TrainConfig

    base: dict = {}
    if args.resume:  # a resumed run keeps its own settings unless the --config file or a flag says otherwise
        saved = Path(args.resume) / "config.yaml"
        if saved.is_file():
            base = TrainConfig.from_yaml(saved).to_dict()
        elif not args.config:
            raise FileNotFoundError(f"--resume {args.resume}: no config.yaml there; is it a lookhere run directory?")
        base["output"] = args.resume  # the run continues where it is, even moved; an --output elsewhere is refused
    if args.config:
        base.update(TrainConfig.settings_in(args.config))
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            base[f.name] = value
    return TrainConfig.from_dict(base)


def _train(args: argparse.Namespace) -> int:
    from .train import train

    import torch.distributed as dist

    cfg = _train_config(args)
    if args.max_running is not None:
        raise ValueError("--max-running caps how many of a study's cells run at once; a training run is one job")
    cluster = _cluster_config(args, {})
    cluster.check()  # with the local executor too: a flag it would ignore is refused, not dropped
    if cluster.executor != "local":
        from .cluster import submit_run

        cfg.validate()
        job = submit_run(cfg.to_dict(), cluster)
        print(f"job {job.job_id} ({cluster.executor}; log: {job.paths.stdout})", flush=True)
        if args.detach:
            return 0
        print(json.dumps(job.results()[0]))  # the first process's: every one trained the same run
        return 0
    main_process = True
    try:
        result = train(cfg)
    finally:  # under torchrun: a process group left to exit-time teardown can abort the process
        if dist.is_initialized():
            main_process = dist.get_rank() == 0
            dist.destroy_process_group()
    result.pop("model", None)
    if main_process:  # one summary: every process trained the same run
        print(json.dumps(result))
    return 0


def _data_preview(args: argparse.Namespace) -> int:
    from .data.preview import preview

    if args.count < 1 or min(args.sizes) < 1:
        raise ValueError(f"--count and --sizes must be >= 1, got --count {args.count} "
                         f"--sizes {args.sizes[0]} {args.sizes[1]}")
    print(preview(args.out, sizes=tuple(args.sizes), count=args.count, task=args.task, seed=args.seed))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .position import registered_knobs
    from .evaluate import (EvalSettings, apply_knobs, load_checkpoint, load_pretrained, markdown_table, run_eval,
                           training_size, write_results)
    from .train import resolve_device, run_classes

    if args.model:
        if args.num_heads is not None:
            raise ValueError(f"--num-heads is read from a released .pth file only; --model {args.model} has timm's "
                             f"heads: leave --num-heads out")
        model, cfg, name = load_pretrained(args.model, args.pretrained_file), None, args.model
    else:
        if args.pretrained_file:
            raise ValueError("--pretrained-file goes with --model NAME; --checkpoint takes the file itself")
        (model, cfg), name = load_checkpoint(args.checkpoint, num_heads=args.num_heads), Path(args.checkpoint).name
    knobs_given = {knob.key: getattr(args, knob.key) for knob in registered_knobs() if getattr(args, knob.key) is not None}
    apply_knobs(model, **knobs_given)
    data = args.data or (cfg.data if cfg else None)
    if not data:
        raise ValueError("--data is required for a model without a training run "
                         "(e.g. --data hf:antofuller/ImageNet-HR)")
    settings = EvalSettings.from_flags(vars(args), data=data, train_size=training_size(model, cfg),
                                       data_root=cfg.data_root if cfg else None, seed=cfg.seed if cfg else None,
                                       classes=run_classes(args.checkpoint) if cfg else None)
    results = run_eval(model, settings, device=resolve_device(args.device), progress=not args.no_progress)
    if knobs_given:  # every number was measured with them: say so beside the numbers
        results["knobs_given"] = knobs_given
    if args.output:
        out = args.output
    elif args.checkpoint and Path(args.checkpoint).is_dir():
        out = str(Path(args.checkpoint) / "eval")
    else:
        out = str(Path("eval") / name) if args.model else "eval"
    files = write_results(results, out, name)
    print(markdown_table(results, name))
    print(f"wrote {files['json']}, {files['markdown']}, {files['plot']}")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from .analyze import run_analysis, table
    from .data import DataSpec, build_dataset, collate
    from .evaluate import load_checkpoint, model_data_config, training_size
    from .train import resolve_device

    model, cfg = load_checkpoint(args.checkpoint, num_heads=args.num_heads)
    data = args.data or (cfg.data if cfg else None)
    if not data:
        raise ValueError("--data is required for a checkpoint without a training config")
    data_config = model_data_config(model, training_size(model, cfg))
    images = {}
    for size in args.sizes:
        spec = DataSpec(data, size, None, cfg.seed if cfg else 0, args.data_root or (cfg.data_root if cfg else None),
                        data_config=data_config)
        ds = build_dataset(spec, args.split, train=False)
        images[size] = collate([ds[i] for i in range(min(args.num_images, len(ds)))])[0]
        if not len(images[size]):
            raise ValueError(f"--data {data}: none of the first {args.num_images} images of "
                             f"--split {args.split} could be read")
    out = args.output or (str(Path(args.checkpoint) / "analysis") if Path(args.checkpoint).is_dir() else "analysis")
    res = run_analysis(model, images, out, layer=args.layer, device=resolve_device(args.device))
    print(table(res["summary"]))
    print("wrote " + ", ".join(res["files"].values()))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .report import compare

    files = compare(args.runs, args.output, names=args.names, title=args.title)
    print(Path(files["markdown"]).read_text())
    print(f"wrote {files['markdown']} and {files['html']}")
    return 0


def _cluster_config(args: argparse.Namespace, section: dict):
    """The study YAML's cluster: section with the flags that were given on top."""
    from .cluster import ClusterConfig

    d = dict(section)
    for name in ("executor", "nodes_per_cell", "tasks_per_node", "partition", "time_min", "max_running"):
        if getattr(args, name) is not None:
            d[name] = getattr(args, name)
    if args.slurm_arg:
        bad = [a for a in args.slurm_arg if "=" not in a or not a.split("=", 1)[0]]
        if bad:
            raise ValueError(f"--slurm-arg {bad[0]!r}: expected KEY=VALUE, e.g. account=abc")
        d["slurm_args"] = {**d.get("slurm_args", {}), **dict(a.split("=", 1) for a in args.slurm_arg)}
    if args.detach and d.get("executor", "local") == "local":
        raise ValueError("--detach submits jobs: it needs --executor submitit-local or slurm")
    return ClusterConfig.from_dict(d, "cluster")


def _study(args: argparse.Namespace) -> int:
    from .study import StudyConfig, estimate, format_estimate, run_study, write_report

    if args.report:
        running = [f for f, given in [("--config", args.config), ("--output", args.output), ("--dry-run", args.dry_run),
                                      ("--until", args.until), ("--jobs", args.jobs != 1),
                                      ("--executor", args.executor), ("--nodes-per-cell", args.nodes_per_cell),
                                      ("--tasks-per-node", args.tasks_per_node), ("--partition", args.partition),
                                      ("--time-min", args.time_min), ("--max-running", args.max_running),
                                      ("--slurm-arg", args.slurm_arg), ("--detach", args.detach)] if given]
        if running:
            raise ValueError(f"--report DIR aggregates a study's finished cells and runs nothing; leave out "
                             f"{', '.join(running)}")
        files = write_report(args.report)
        *most, last = files.values()
        print(f"wrote {', '.join(most)} and {last}")
        return 0
    if not args.config or not args.output:
        raise ValueError("--config and --output are required (or --report DIR to aggregate a study)")
    cfg = StudyConfig.from_yaml(args.config)
    if args.dry_run:
        if args.until:
            raise ValueError("--until stops starting cells of a run; --dry-run runs none (leave one out)")
        print(format_estimate(estimate(cfg, args.output, jobs=args.jobs)))
        return 0
    cluster = _cluster_config(args, cfg.cluster)
    cluster.check()
    if cluster.executor != "local" and args.jobs != 1:
        raise ValueError(f"--jobs runs cells here; with --executor {cluster.executor} every cell is a job of its "
                         f"own (--max-running caps how many run at once)")
    if cluster.executor != "local" and args.until:
        raise ValueError(f"--until decides which cells start here; with --executor {cluster.executor} every cell "
                         f"is a job of its own (--time-min is each job's limit)")
    try:
        if cluster.executor == "local":
            result = run_study(cfg, args.output, jobs=args.jobs, progress=not args.no_progress,
                               until=args.until.timestamp() if args.until else None)
        else:
            from .study_jobs import run_study_jobs

            result = run_study_jobs(cfg, args.output, cluster, detach=args.detach, progress=not args.no_progress)
    except RuntimeError as e:  # no cell finished: each failure names its log
        print(f"lookhere study: {e}", file=sys.stderr)
        return 1
    if result.get("detached"):
        print(f"{result['cells']} cells: {result['ran']} job(s) submitted; run the same command again to attach")
        return 0
    for key, why in result["made_again"].items():
        print(f"cell {key} was made again: {'; '.join(why)}")
    for key, why in result["failures"].items():
        print(f"cell {key} failed: {why}", file=sys.stderr)
    if result.get("not_started"):
        longest = max(result["not_started"].values()) / 60
        print(f"{len(result['not_started'])} cell(s) not started: each would end after --until "
              f"{args.until:%Y-%m-%d %H:%M} (expected up to {longest:.0f} minutes); run the same command again to "
              f"go on")
    wrote = f"; wrote {result['report']} and {result['results']}" if "report" in result else "; no cell done yet"
    print(f"{result['cells']} cells ({result['ran']} run now){wrote}")
    return 1 if result["failures"] else 0


def _reproduce(args: argparse.Namespace) -> int:
    from .reproduce import format_result, reproduce_cell

    cell = Path(args.cell).resolve()
    output = args.output or f"reproduce-{cell.parent.parent.name}-{cell.parent.name}-{cell.name}"
    try:
        result = reproduce_cell(args.cell, output)
    except RuntimeError as e:  # a recorded command failed: its output is in the log
        print(f"lookhere reproduce: failed: {e}; see {Path(output) / 'log.txt'}", file=sys.stderr)
        return 1
    print(format_result(result))
    return 0 if result["identical"] else 1


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    output = args.output or ("demo-quick" if args.quick else "demo")  # each its own folder: both can be resumed
    result = run_demo(output, quick=args.quick, seed=args.seed, progress=not args.no_progress)
    print(Path(result["report"]["markdown"]).read_text())
    print(f"report: {result['report']['markdown']} (and {result['report']['html']}); "
          f"{result['minutes']:.1f} minutes")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .evaluate import EvalSettings
    from .data.synthetic import TASKS
    from .position import registered_knobs

    parser = argparse.ArgumentParser(prog="lookhere", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    ex = sub.add_parser("example", help="classify random images at three sizes with one LookHere ViT")
    ex.add_argument("--pos-encoding", default="lh-90")
    ex.add_argument("--img-size", type=flags.count, default=224)
    ex.add_argument("--patch-size", type=flags.count, default=16)
    ex.add_argument("--batch-size", type=flags.count, default=2)
    ex.add_argument("--seed", type=int, default=0)
    ex.set_defaults(func=_example)

    fov = sub.add_parser("fov", help="write a PNG of each head's field of view for the presets")
    fov.add_argument("--preset", action="append", choices=["lh-180", "lh-90", "lh-45"],
                     help="preset name (repeatable); default: all")
    fov.add_argument("--grid", type=int, default=15)
    fov.add_argument("--out-dir", default=".")
    fov.set_defaults(func=_fov)

    tr = sub.add_parser("train", help="train a ViT (any position encoding); resumable, torchrun-ready")
    _add_train_flags(tr)
    _add_cluster_flags(tr, "run")
    tr.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="accuracy, NLL and calibration across sizes; attacks; object sizes",
                        description="Evaluate a model at several image sizes. Photographs get the paper's "
                                    "evaluation transform: at the training size the shorter side is resized to "
                                    "size / crop_pct and the centre cropped, at any other size the shorter side is "
                                    "resized to the size and the centre cropped.")
    which = ev.add_mutually_exclusive_group(required=True)
    which.add_argument("--model",
                       help="timm model name with pretrained weights, e.g. vit_base_patch16_lookhere_90.in1k")
    which.add_argument("--checkpoint", help="run directory, model directory or released .pth")
    ev.add_argument("--pretrained-file", metavar="PATH",
                    help="with --model: read its weights from this file instead of downloading them")
    ev.add_argument("--device", default="auto",
                    help="auto (a GPU when there is one), cpu, cuda, cuda:1 ... (default: auto)")
    EvalSettings.add_flags(ev)
    for knob in registered_knobs():  # each encoding's test-time knobs, as the encodings define them
        flag = "--" + knob.key.replace("_", "-")
        if knob.choices == (False, True):
            ev.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=knob.help)
        elif knob.choices:
            ev.add_argument(flag, choices=list(knob.choices), help=knob.help)
        else:
            ev.add_argument(flag, type=float, help=knob.help)
    ev.add_argument("--num-heads", type=flags.count, help="heads of a released .pth checkpoint (default: 12)")
    ev.add_argument("--output", help="folder of eval.json, eval.md and the plot (default: RUN/eval, or eval/NAME)")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=_eval)

    an = sub.add_parser("analyze", help="attention distance, head diversity, token similarity, attention maps")
    an.add_argument("--checkpoint", required=True, help="run directory, model directory or released .pth")
    an.add_argument("--data", help="dataset (default: the run's)")
    an.add_argument("--data-root", help="dataset folder (fashion-mnist) or cache folder (hf:); default: the run's")
    an.add_argument("--sizes", type=flags.count, nargs="+", required=True, help="image sizes (px)")
    an.add_argument("--split", default="test", type=flags.split_name, help="default: test")
    an.add_argument("--num-images", type=flags.count, default=16, help="default: 16")
    an.add_argument("--layer", type=int, help="layer of the attention-map and fov pictures, counted from 0 "
                                              "(default: the last)")
    an.add_argument("--num-heads", type=flags.count, help="heads of a released .pth checkpoint (default: 12)")
    an.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda ... (default: auto)")
    an.add_argument("--output")
    an.set_defaults(func=_analyze)

    cp = sub.add_parser("compare", help="one report (Markdown + HTML) of several evaluated runs")
    cp.add_argument("runs", nargs="+", help="run directories (or their eval.json)")
    cp.add_argument("--names", nargs="+")
    cp.add_argument("--title", default="Comparison")
    cp.add_argument("--output", default="report")
    cp.set_defaults(func=_compare)

    st = sub.add_parser("study", help="multi-seed grid of datasets x encodings: resumable, parallel, with error bars")
    st.add_argument("--config", help="study YAML (see studies/)")
    st.add_argument("--output", help="study directory; rerun the same command to resume")
    st.add_argument("--jobs", type=flags.count, default=1, help="cells run at once, one thread each")
    st.add_argument("--dry-run", action="store_true", help="list the cells and estimate the time; run nothing")
    st.add_argument("--until", type=flags.until, metavar="TIME",
                    help="start no cell that would end after TIME (HH:MM, its next occurrence, or 2026-12-04T18:30; "
                         "expected from the study's finished cells), so that none is left half-made")
    st.add_argument("--report", metavar="DIR", help="aggregate the finished cells of a study directory")
    st.add_argument("--no-progress", action="store_true")
    _add_cluster_flags(st, "cell")
    st.set_defaults(func=_study)

    rp = sub.add_parser("reproduce", help="make a recorded study cell again and compare its eval.json with the record")
    rp.add_argument("cell", help="a finished study cell, e.g. docs/results/paper-grid/synthetic/lh-90/seed0")
    rp.add_argument("--output", help="folder to make it in (default: reproduce-DATASET-ENCODING-seedN); rerun to "
                                      "resume")
    rp.set_defaults(func=_reproduce)

    dm = sub.add_parser("demo", help="LookHere vs. 2D-RoPE: train small, test large, write a report")
    dm.add_argument("--output", help="folder of the runs and the report (default: demo, or demo-quick with --quick)")
    dm.add_argument("--quick", action="store_true", help="a few-minute version: fewer scenes and epochs, three test sizes")
    dm.add_argument("--seed", type=int, default=0)
    dm.add_argument("--no-progress", action="store_true")
    dm.set_defaults(func=_demo)

    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    pv = data_sub.add_parser("preview", help="PNG grid of synthetic scenes at two resolutions")
    pv.add_argument("--out", default="synthetic-preview.png")
    pv.add_argument("--sizes", type=int, nargs=2, default=[32, 128])
    pv.add_argument("--count", type=int, default=8)
    pv.add_argument("--task", choices=TASKS, default="what")
    pv.add_argument("--seed", type=int, default=0)
    pv.set_defaults(func=_data_preview)
    return parser


def _add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """``--debug`` on every command and subcommand: show the traceback of an error."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on an error, also print the traceback")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_debug_flag(sub)


def main(argv: list[str] | None = None) -> int:
    """Run a command. Exit status: 0 done, 2 a usage error (a bad flag, file or setting, named in the
    message), 1 a failure (a missing package, the network or disk, an unexpected error)."""
    parser = build_parser()
    _add_debug_flag(parser)
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    prefix = f"lookhere {args.command}"
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        error, status, message = e, 2, f"{prefix}: error: {e}"
    except (ImportError, OSError) as e:
        error, status, message = e, 1, f"{prefix}: failed: {e}"
    except KeyboardInterrupt as e:
        error, status, message = e, 130, f"{prefix}: interrupted"
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, the traceback on request
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        error, status, message = e, 1, (f"{prefix}: unexpected error: {type(e).__name__}: {first} (rerun with "
                                        f"--debug for the traceback; if the inputs are right, please report it)")
    if debug:
        traceback.print_exception(error)
    print(message, file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
