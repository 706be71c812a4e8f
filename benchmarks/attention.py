"""One attention layer, batch 1, 12 heads of dim 64: LookHere (our path) against the published
approach (SDPA with a precomputed dense bias), plain SDPA (the floor) and SDPA with 2D-RoPE.

Times are medians of several runs, measured side by side in one process. Peak memory (CPU) is
how far one call, set-up included, raises the resident set above where it started (Linux: the
peak is reset through /proc/self/clear_refs before each call); on GPU, torch's peak allocation.
On a GPU (``--device cuda``, bfloat16 by default, where plain SDPA runs FlashAttention) it also
counts FlexAttention compilations: after the first call per grid there must be none.

    python benchmarks/attention.py [--grids 14 32 48 64] [--repeats 5] [--threads 1] [--markdown out.md]
    python benchmarks/attention.py --flex-work-only   # the flex kernel's block work, no timing (any machine)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from lookhere.attention import AttentionPlan, attend, flex_work
from lookhere.attention.geometry import layer_bias
from lookhere.config import resolve_config
from lookhere.position import Rope2d

PRESETS = ("lh-180", "lh-90", "lh-45")
METHODS = ("ours", "dense_bias_sdpa", "plain_sdpa", "rope_sdpa")
H, D, DEPTH, LAYER = 12, 64, 12, 6


DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_plans: dict[str, AttentionPlan] = {}


def inputs(grid: int, device: str, dtype=torch.float32):
    g = torch.Generator(device="cpu").manual_seed(0)
    T = 1 + grid * grid
    return [torch.randn(1, H, T, D, generator=g).to(device, dtype) for _ in range(3)]


def plan_for(preset: str, device: str) -> AttentionPlan:
    """One plan per preset, as a model keeps it (its tables are built at the first call per grid)."""
    if preset not in _plans:
        _plans[preset] = AttentionPlan(preset, DEPTH, H).to(device)
    return _plans[preset]


def methods(grid: int, preset: str, device: str, dtype=torch.float32):
    """name -> (setup, call): setup builds what the method keeps between calls (untimed)."""
    cfg = resolve_config(preset)
    plan = plan_for(preset, device)

    def ours(q, k, v):
        return attend(q, k, v, plan, layer=LAYER, grid_size=(grid, grid))

    def dense_setup():
        # As the published code keeps it: one (heads, T, T) bias per layer, passed as a 3D mask.
        bias = layer_bias(cfg, (grid, grid), LAYER, DEPTH, H, device=device)
        return F.pad(bias, (1, 0, 1, 0)).to(dtype)  # kept in the inputs' dtype, as published

    rope = Rope2d(H * D, H, DEPTH, (grid, grid), mixed=False).to(device)

    return {
        "ours": (lambda: None, lambda s, q, k, v: ours(q, k, v)),
        "dense_bias_sdpa": (dense_setup, lambda s, q, k, v: F.scaled_dot_product_attention(
            q, k, v, attn_mask=s)),
        "plain_sdpa": (lambda: None, lambda s, q, k, v: F.scaled_dot_product_attention(q, k, v)),
        "rope_sdpa": (lambda: None, lambda s, q, k, v: rope.attend(q, k, v, grid=(grid, grid), layer=LAYER,
                                                                    num_prefix_tokens=1)),
    }


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_all(grid: int, preset: str, device: str, repeats: int, dtype=torch.float32) -> dict[str, float]:
    q, k, v = inputs(grid, device, dtype)
    ms = methods(grid, preset, device, dtype)
    states = {name: setup() for name, (setup, _) in ms.items()}
    times: dict[str, list[float]] = {name: [] for name in ms}
    with torch.no_grad():
        for name, (_, call) in ms.items():  # warm-up (fills caches, compiles kernels)
            call(states[name], q, k, v)
        for _ in range(repeats):  # interleaved, so drift hits every method alike
            for name, (_, call) in ms.items():
                sync(device)
                t = time.perf_counter()
                call(states[name], q, k, v)
                sync(device)
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory(grid: int, preset: str, method: str, device: str, dtype=torch.float32) -> float:
    """MiB of peak memory that one call adds after a warm-up call: for ours, the tables its plan built
    in the warm-up and keeps for the grid are not counted; dense-bias builds its bias in the call."""
    q, k, v = inputs(grid, device, dtype)
    setup, call = methods(grid, preset, device, dtype)[method]
    with torch.no_grad():
        call(setup(), q, k, v)  # warm caches first, as in the timing
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            call(setup(), q, k, v)
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - base) / 2**20
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set (VmHWM) to the current one
        base = _status_kib("VmRSS")
        call(setup(), q, k, v)
        return (_status_kib("VmHWM") - base) / 1024


def memory_table(grid: int, presets: list[str], device: str, dtype=torch.float32) -> dict[str, dict[str, float]]:
    """Peak memory of every method, each measured in a fresh process whose large blocks go straight
    to and from the OS (so its resident set follows live memory; too slow to time in)."""
    if device == "cuda":
        return {p: {m: peak_memory(grid, p, m, device, dtype) for m in METHODS} for p in presets}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    table: dict[str, dict[str, float]] = {}
    for p in presets:
        for m in METHODS:
            code = ("import sys; sys.path.insert(0, 'benchmarks'); import attention as a; "
                    f"print(a.peak_memory({grid}, {p!r}, {m!r}, 'cpu', a.torch.{str(dtype).split('.')[-1]}))")
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            table.setdefault(p, {})[m] = float(out.stdout.strip().splitlines()[-1])
    return table


def build_cost(grid: int, preset: str, device: str) -> tuple[float, float]:
    """Time (ms) of a first call on a fresh plan beyond a later call's (building what the plan keeps
    for a grid: tiles, tables, block masks) and the MiB it keeps; the same state serves all layers,
    which only rescale it."""
    plan = AttentionPlan(preset, DEPTH, H).to(device)
    q, k, v = inputs(grid, device)
    with torch.no_grad():
        sync(device)
        t = time.perf_counter()
        attend(q, k, v, plan, layer=LAYER, grid_size=(grid, grid))
        sync(device)
        first = time.perf_counter() - t
        t = time.perf_counter()
        attend(q, k, v, plan, layer=LAYER, grid_size=(grid, grid))
        sync(device)
        later = time.perf_counter() - t
    return (first - later) * 1000, plan.cached_bytes() / 2**20


def compile_counts(grids: list[int], device: str, dtype) -> tuple[int, int]:
    """FlexAttention graphs compiled over first calls at every grid and batch sizes 1, 2, 4, and those
    compiled by a second round of the same calls (must be 0)."""
    from torch._dynamo.utils import counters

    plan = AttentionPlan("lh-45", DEPTH, H).to(device)
    with torch.no_grad():
        def sweep():
            for grid in grids:
                for batch in (1, 2, 4):
                    q = torch.randn(batch, H, 1 + grid * grid, D, device=device, dtype=dtype)
                    attend(q, q, q, plan, layer=LAYER, grid_size=(grid, grid), backend="flex")
        start = counters["stats"]["unique_graphs"]
        sweep()
        first = counters["stats"]["unique_graphs"]
        sweep()
        return first - start, counters["stats"]["unique_graphs"] - first


GROUPS = ("halves", "diagonals", "corners", "triangles", "eighths1", "eighths2", "none")


def group_times(grid: int, device: str, repeats: int, dtype=torch.float32) -> dict[str, float]:
    """Each head group of the released presets alone (4 heads) on our path, and plain SDPA of 4 heads:
    where a preset's time goes (a preset's ratio is the mean of its three groups' ratios)."""
    q, k, v = (t[:, :4].contiguous() for t in inputs(grid, device, dtype))
    plans = {g: AttentionPlan(dict(resolve_config("lh-90").to_dict(), head_directions=g), DEPTH, 4).to(device)
             for g in GROUPS}
    calls = {g: (lambda p: lambda: attend(q, k, v, p, layer=LAYER, grid_size=(grid, grid)))(p) for g, p in plans.items()}
    calls["plain"] = lambda: F.scaled_dot_product_attention(q, k, v)
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for call in calls.values():
            call()
        for _ in range(repeats):
            for name, call in calls.items():
                sync(device)
                t = time.perf_counter()
                call()
                sync(device)
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def flex_work_table(grids: list[int], presets: list[str]) -> list[str]:
    """What FlexAttention computes (``flex_work``), row-major against the backend's fitted layout."""
    lines = ["| grid | preset | ideal | row-major | fitted | fitted, per group |", "|---:|---|---:|---:|---:|---|"]
    for grid in grids:
        for preset in presets:
            row, fit = (flex_work(preset, grid, num_heads=H, depth=DEPTH, layout=lay) for lay in ("row-major", "fitted"))
            groups = ", ".join(f"{g} {w['computed']:.2f} ({w['ideal']:.2f})" for g, w in fit["groups"].items())
            lines.append(f"| {grid} | {preset} | {fit['ideal']:.3f} | {row['computed']:.3f} | {fit['computed']:.3f} "
                         f"| {groups} |")
            print(lines[-1], flush=True)
    return lines


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grids", type=int, nargs="+", default=[14, 32, 48, 64])
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", choices=list(DTYPE), help="default: bfloat16 on cuda (FlashAttention), else float32")
    ap.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads); default: torch's")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--json", help="write the timings as JSON to this file")
    ap.add_argument("--markdown", help="write the tables as Markdown to this file")
    ap.add_argument("--groups", action="store_true",
                    help="also time each head group alone (4 heads) against plain SDPA at the largest grid")
    ap.add_argument("--flex-work-only", action="store_true",
                    help="only print the FlexAttention block work per layout (lookhere.attention.flex_work)")
    args = ap.parse_args()
    if args.flex_work_only:
        lines = [f"# FlexAttention work, blocks of {flex_work('lh-90', 2)['block']}, {H} heads, CLS token", ""]
        print("\n".join(lines), flush=True)
        lines += flex_work_table(args.grids, args.presets)
        if args.markdown:
            write_atomic(args.markdown, "\n".join(lines) + "\n")
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPE[args.dtype or ("bfloat16" if args.device == "cuda" else "float32")]
    machine = (torch.cuda.get_device_name() if args.device == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    lines = [f"# attention layer, batch 1, {H} heads x {D}, {str(dtype).split('.')[-1]}, {args.device} ({machine}), "
             f"torch {torch.__version__}",
             "| grid | preset | ours ms | dense-bias ms | plain ms | RoPE ms | ours/dense | ours/plain | ours/RoPE "
             "| ours MiB | dense MiB | plain MiB | RoPE MiB |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    rows = []
    for grid in args.grids:
        mems = None if args.no_memory else memory_table(grid, args.presets, args.device, dtype)
        for preset in args.presets:
            t = time_all(grid, preset, args.device, args.repeats, dtype)
            mem = {m: float("nan") for m in t} if mems is None else mems[preset]
            rows.append(dict(grid=grid, preset=preset, times_s=t, peak_mib=mem))
            lines.append(f"| {grid} | {preset} | {t['ours'] * 1e3:.1f} | {t['dense_bias_sdpa'] * 1e3:.1f} | "
                         f"{t['plain_sdpa'] * 1e3:.1f} | {t['rope_sdpa'] * 1e3:.1f} | "
                         f"{t['ours'] / t['dense_bias_sdpa']:.2f} | {t['ours'] / t['plain_sdpa']:.2f} | "
                         f"{t['ours'] / t['rope_sdpa']:.2f} | {mem['ours']:.0f} | {mem['dense_bias_sdpa']:.0f} | "
                         f"{mem['plain_sdpa']:.0f} | {mem['rope_sdpa']:.0f} |")
            print(lines[-1], flush=True)
    lines += ["", "| grid | preset | our build (ms) | our kept state (MiB) | dense bias of all 12 layers (MiB, float32) |",
              "|---:|---|---:|---:|---:|"]
    print("\n".join(lines[-3:]), flush=True)
    for grid in args.grids:
        for preset in args.presets:
            ms, mib = build_cost(grid, preset, args.device)
            dense = DEPTH * H * (grid * grid + 1) ** 2 * 4 / 2**20
            lines.append(f"| {grid} | {preset} | {ms:.1f} | {mib:.1f} | {dense:.0f} |")
            print(lines[-1], flush=True)
    if args.groups:
        grid = max(args.grids)
        t = group_times(grid, args.device, args.repeats, dtype)
        lines += ["", f"Head groups alone at grid {grid} (4 heads of {D}):", "",
                  "| group | ours ms | plain ms | ours/plain |", "|---|---:|---:|---:|"]
        lines += [f"| {g} | {t[g] * 1e3:.1f} | {t['plain'] * 1e3:.1f} | {t[g] / t['plain']:.2f} |" for g in GROUPS]
        print("\n".join(lines[-len(GROUPS) - 5:]), flush=True)
    lines += ["", "FlexAttention's work (fraction of unmasked attention's (query, key) pairs):", ""]
    print("\n".join(lines[-3:]), flush=True)
    lines += flex_work_table(args.grids, args.presets)
    if args.device == "cuda":
        first, again = compile_counts(args.grids, args.device, dtype)
        lines += ["", f"FlexAttention graphs compiled over grids {args.grids} x batch 1, 2, 4: {first}; "
                      f"recompiled in a second round of the same calls: {again}"]
        print(lines[-1], flush=True)
    if args.json:
        write_atomic(args.json, json.dumps(rows, indent=2))
    if args.markdown:
        write_atomic(args.markdown, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
