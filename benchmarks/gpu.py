"""The GPU benchmark, one command for whoever has a GPU: LookHere's FlexAttention path against SDPA
with no mask (FlashAttention) and against SDPA with the dense bias (the published approach), forward
and forward + backward, bfloat16, at 224 px (batch 32) and 1024 px (batch 1, 2, 4), one layer of 12
heads of 64; whole ViT-B/16 throughput (images/s, inference and training steps) of the three
presets against timm's RoPE-mixed ViT; and how many FlexAttention graphs the sweep compiled.

    python benchmarks/gpu.py --markdown gpu.md          # on a CUDA machine, a few minutes
    python benchmarks/gpu.py --smoke                    # any machine: tiny sizes, float32, to check it runs

Times are medians of ``--repeats`` runs after a warm-up, every method measured side by side in one
process. ``--smoke`` runs on the CPU (whose compiled FlexAttention has no backward: the backward
columns of *ours* are then left empty).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import lookhere  # noqa: E402,F401  (registers the models)
from attention import write_atomic  # noqa: E402
from lookhere.attention import AttentionPlan, attend, flex_work  # noqa: E402
from lookhere.attention.geometry import layer_bias  # noqa: E402
from lookhere.config import resolve_config  # noqa: E402

H, D, DEPTH, LAYER = 12, 64, 12, 6
PRESETS = ("lh-180", "lh-90", "lh-45")
MODELS = {"lh-180": "vit_base_patch16_lookhere_180", "lh-90": "vit_base_patch16_lookhere_90",
          "lh-45": "vit_base_patch16_lookhere_45", "rope-mixed (timm)": "vit_base_patch16_rope_mixed_224"}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    fn()  # warm-up: compilation, caches
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def layer_methods(preset: str, grid: int, device: str, dtype: torch.dtype):
    """name -> attention of one layer on (q, k, v), CLS + grid x grid tokens."""
    plan = AttentionPlan(preset, DEPTH, H).to(device)
    bias = F.pad(layer_bias(resolve_config(preset), (grid, grid), LAYER, DEPTH, H, device=device), (1, 0, 1, 0))
    bias = bias.to(dtype)
    return {
        "ours": lambda q, k, v: attend(q, k, v, plan, layer=LAYER, grid_size=(grid, grid), backend="flex"),
        "dense-bias": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=bias),
        "flash (no mask)": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
    }


def layer_table(cases: list[tuple[int, int]], device: str, dtype: torch.dtype, repeats: int) -> list[str]:
    lines = ["| px | batch | preset | method | fwd ms | fwd+bwd ms | fwd / flash | fwd+bwd / flash |",
             "|---:|---:|---|---|---:|---:|---:|---:|"]
    for px, batch in cases:
        grid = px // 16
        for preset in PRESETS:
            q, k, v = (torch.randn(batch, H, 1 + grid * grid, D, device=device, dtype=dtype, requires_grad=True)
                       for _ in range(3))
            times = {}
            for name, fn in layer_methods(preset, grid, device, dtype).items():
                with torch.no_grad():
                    fwd = timed(lambda: fn(q, k, v), device, repeats)
                backward = not (name == "ours" and device == "cpu")

                def step():
                    fn(q, k, v).float().sum().backward()

                both = timed(step, device, repeats) if backward else float("nan")
                times[name] = (fwd, both)
            flash = times["flash (no mask)"]
            for name, (fwd, both) in times.items():
                lines.append(f"| {px} | {batch} | {preset} | {name} | {fwd * 1e3:.2f} | {both * 1e3:.2f} | "
                             f"{fwd / flash[0]:.2f} | {both / flash[1]:.2f} |")
                print(lines[-1], flush=True)
    return lines


def model_table(sizes: list[tuple[int, int]], device: str, dtype: torch.dtype, repeats: int) -> list[str]:
    lines = ["| px | batch | model | inference img/s | training img/s |", "|---:|---:|---|---:|---:|"]
    for px, batch in sizes:
        x = torch.randn(batch, 3, px, px, device=device)
        for name, timm_name in MODELS.items():
            kwargs = {"dynamic_img_size": True} if "rope" in name else {}
            model = timm.create_model(timm_name, **kwargs).to(device)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

            def infer():
                with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                    model.eval()(x)

            def train():
                with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                    loss = model.train()(x).float().logsumexp(-1).mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            inf = timed(infer, device, repeats)
            tr = timed(train, device, repeats) if not (device == "cpu" and "lh" in name) else float("nan")
            lines.append(f"| {px} | {batch} | {name} | {batch / inf:.1f} | {batch / tr:.1f} |")
            print(lines[-1], flush=True)
            del model, opt
    return lines


def compiled_graphs(cases: list[tuple[int, int]], device: str, dtype: torch.dtype) -> tuple[int, int]:
    """FlexAttention graphs compiled by a first sweep of the layer cases, and by a second (must be 0)."""
    from torch._dynamo.utils import counters

    plan = AttentionPlan("lh-45", DEPTH, H).to(device)

    def sweep():
        with torch.no_grad():
            for px, batch in cases:
                grid = px // 16
                q = torch.randn(batch, H, 1 + grid * grid, D, device=device, dtype=dtype)
                attend(q, q, q, plan, layer=LAYER, grid_size=(grid, grid), backend="flex")

    start = counters["stats"]["unique_graphs"]
    sweep()
    first = counters["stats"]["unique_graphs"]
    sweep()
    return first - start, counters["stats"]["unique_graphs"] - first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU in float32: checks the script runs")
    ap.add_argument("--markdown", help="write the tables as Markdown to this file")
    args = ap.parse_args()
    if args.smoke:
        device, dtype, repeats = "cpu", torch.float32, 1
        layers, models = [(64, 2), (96, 1)], [(64, 1)]
    else:
        if not torch.cuda.is_available():
            ap.error("no CUDA device is visible; --smoke checks the script on the CPU")
        device, dtype, repeats = "cuda", torch.bfloat16, args.repeats
        layers = [(224, 32), (1024, 1), (1024, 2), (1024, 4)]
        models = [(224, 32), (512, 4), (1024, 1)]
    machine = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke run)"
    lines = [f"# GPU benchmark: {machine}, torch {torch.__version__}, timm {timm.__version__}, "
             f"{str(dtype).split('.')[-1]}", "", "One attention layer (12 heads of 64, CLS token, layer 6 of 12):", ""]
    print("\n".join(lines), flush=True)
    first, again = compiled_graphs(layers, device, dtype)  # from a cold start, before anything else compiles
    lines += layer_table(layers, device, dtype, repeats)
    work = {p: flex_work(p, layers[-1][0] // 16)["computed"] for p in PRESETS}
    lines += ["", "Blocks the kernel computes at the largest grid (lookhere.attention.flex_work): " +
              ", ".join(f"{p} {w:.3f}" for p, w in work.items()), "", "Whole ViT-B/16:", ""]
    lines += model_table(models, device, dtype, repeats)
    lines += ["", f"FlexAttention graphs compiled by a sweep of the layer cases from a cold start: {first}; "
                  f"by the same sweep again: {again}"]
    print("\n".join(lines[-1:]), flush=True)
    if args.markdown:
        write_atomic(args.markdown, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
