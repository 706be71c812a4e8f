"""ViT-B/16 forward, batch 1, at 224, 512 and 1024 px: the LookHere presets against our ViT with no
position encoding and timm's RoPE-mixed ViT (dynamic image size), measured side by side.

    python benchmarks/model.py [--sizes 224 512 1024] [--repeats 3] [--threads 1] [--markdown out.md]

On a GPU (``--device cuda``) it runs under bfloat16 autocast by default (``--dtype float32`` to
turn it off); the LookHere models then use compiled FlexAttention.
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

import timm
import torch

import lookhere  # noqa: F401  (registers the models)
from attention import DTYPE, _status_kib, write_atomic  # benchmarks/ is on sys.path

MODELS = {
    "lh-180": lambda: timm.create_model("vit_base_patch16_lookhere_180"),
    "lh-90": lambda: timm.create_model("vit_base_patch16_lookhere_90"),
    "lh-45": lambda: timm.create_model("vit_base_patch16_lookhere_45"),
    "none (ours)": lambda: timm.create_model("vit_base_patch16_pe_none"),
    "timm rope-mixed": lambda: timm.create_model("vit_base_patch16_rope_mixed_224", dynamic_img_size=True),
}


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def memory_table(sizes, dtype):
    """Peaks per size and model, in a fresh process whose large blocks go straight to and from the
    OS, so that its resident set follows live memory (too slow to time in)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    code = ("import json, sys, torch; sys.path.insert(0, 'benchmarks'); import model as b; "
            "ms = {n: f().eval() for n, f in b.MODELS.items()}; "
            f"print(json.dumps({{s: {{n: b.peak(m, s, 'cpu', torch.{str(dtype).split('.')[-1]}) for n, m in ms.items()}} "
            f"for s in {list(sizes)!r}}}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def run(sizes, repeats, device, dtype, memory=True):
    models = {name: make().eval().to(device) for name, make in MODELS.items()}
    results, peaks = {}, {}
    for size in sizes:
        x = torch.randn(1, 3, size, size, device=device)
        times = {name: [] for name in models}
        with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            for m in models.values():
                m(x)  # warm-up: caches, compilation
            for _ in range(repeats):
                for name, m in models.items():
                    sync(device)
                    t = time.perf_counter()
                    m(x)
                    sync(device)
                    times[name].append(time.perf_counter() - t)
        results[size] = {n: statistics.median(t) for n, t in times.items()}
        if device == "cuda" and memory:
            peaks[size] = {n: peak(m, size, device, dtype) for n, m in models.items()}
    if device != "cuda":
        peaks = memory_table(sizes, dtype) if memory else {s: {n: float("nan") for n in models} for s in sizes}
    return results, peaks


def peak(model, size: int, device: str, dtype: torch.dtype = torch.float32) -> float:
    """MiB that one forward adds to the peak once the model has run at this size, in the timings'
    dtype (GPU: allocated; CPU: resident set, peak reset first). The warm-up keeps the process's
    one-time costs and the per-grid tables built once (LookHere's plan) out of the number."""
    x = torch.randn(1, 3, size, size, device=device)
    with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        model(x)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            model(x)
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - base) / 2**20
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kib("VmRSS")
        model(x)
        return (_status_kib("VmHWM") - base) / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 512, 1024])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", choices=list(DTYPE), help="autocast dtype; default: bfloat16 on cuda, else float32")
    ap.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads); default: torch's")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--markdown", help="write the table as Markdown to this file")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPE[args.dtype or ("bfloat16" if args.device == "cuda" else "float32")]
    machine = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.machine()}, {torch.get_num_threads()} threads"
    lines = [f"# ViT-B/16 forward, batch 1, {str(dtype).split('.')[-1]}, {args.device} ({machine}), "
             f"torch {torch.__version__}, timm {timm.__version__}"]
    print(lines[0], flush=True)
    res, peaks = run(args.sizes, args.repeats, args.device, dtype, memory=not args.no_memory)
    names = list(MODELS)
    lines.append("| px | " + " | ".join(f"{n} img/s" for n in names) + " | " +
                 " | ".join(f"{n} / rope-mixed" for n in names[:3]) + " | " + " | ".join(f"{n} MiB" for n in names) + " |")
    lines.append("|---:|" + "---:|" * (2 * len(names) + 3))
    for size, t in res.items():
        mem = peaks[size]
        ips = {n: 1 / t[n] for n in names}
        lines.append(f"| {size} | " + " | ".join(f"{ips[n]:.2f}" for n in names) + " | " +
                     " | ".join(f"{ips[n] / ips['timm rope-mixed']:.2f}" for n in names[:3]) + " | " +
                     " | ".join(f"{mem[n]:.0f}" for n in names) + " |")
    print("\n".join(lines[1:]), flush=True)
    if args.markdown:
        write_atomic(args.markdown, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
