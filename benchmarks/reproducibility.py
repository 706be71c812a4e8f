"""Where two sets of CPU kernels first disagree, and what pinning one costs.

Trains a few steps of one study cell's setting (the synthetic where task, micro ViT, 24 px, seed 0)
in one subprocess per setting (environment variables such as ``ATEN_CPU_CAPABILITY=avx2``; "" is
the machine's own choice), recording a digest of every module's output, every gradient and every
updated parameter, in execution order. Prints the first step and the first tensor whose bits differ
between the two settings, the losses that differ, and the seconds per training step under each
(one thread).

    python benchmarks/reproducibility.py --steps 20 \
        --compare "" "ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=AVX2"
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time


def _digest(t) -> str:
    t = t.detach().contiguous()
    return hashlib.sha256(t.flatten().view(__import__("torch").uint8).numpy().tobytes()).hexdigest()[:12]


def child(steps: int, encoding: str) -> None:
    import torch
    import torch.nn as nn
    from timm.optim import param_groups_weight_decay

    from lookhere.data import DataSpec, build_dataset, collate
    from lookhere.environment import environment
    from lookhere.train import SeededSamples, TrainConfig, initial_model

    cfg = TrainConfig(data="synthetic-where", data_length=4000, pos_encoding=encoding, model="micro", depth=4,
                      img_size=24, patch_size=4, batch_size=32, lr=0.002, seed=0)
    ds = SeededSamples(build_dataset(DataSpec(cfg.data, cfg.img_size, cfg.data_length, cfg.seed, None), "train"), 0)
    model, _ = initial_model(cfg, 4)
    opt = torch.optim.AdamW(param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=model.no_weight_decay()),
                            lr=cfg.lr)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    trace: list[tuple[int, str, str, str]] = []
    step = 0

    def hook(name):
        def record(module, args, out):
            if isinstance(out, torch.Tensor):
                trace.append((step, "forward", name, _digest(out)))
        return record

    for name, module in model.named_modules():
        module.register_forward_hook(hook(name or "model"))
    losses, seconds = [], []
    for step in range(steps):
        x, y, _ = collate([ds[i] for i in range(step * cfg.batch_size, (step + 1) * cfg.batch_size)])
        t = time.perf_counter()
        loss = criterion(model(x), y)
        opt.zero_grad()
        loss.backward()
        trace += [(step, "gradient", n, _digest(p.grad)) for n, p in model.named_parameters() if p.grad is not None]
        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        opt.step()
        seconds.append(time.perf_counter() - t)
        trace += [(step, "updated", n, _digest(p)) for n, p in model.named_parameters()]
        losses.append(loss.item())
    json.dump({"trace": trace, "losses": losses, "seconds": seconds, "environment": environment()}, sys.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--encoding", default="lh-90")
    ap.add_argument("--compare", nargs=2, metavar="SETTING",
                    default=["", "ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=AVX2"],
                    help="two settings: space-separated NAME=VALUE environment variables")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.steps, args.encoding)
    runs = {}
    for setting in args.compare:
        pins = dict(kv.split("=", 1) for kv in setting.split())
        env = {**os.environ, **pins, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, __file__, "--child", "--steps", str(args.steps), "--encoding", args.encoding],
                             env=env, capture_output=True, text=True, check=True).stdout
        runs[setting or "(the machine's choice)"] = json.loads(out)
    a, b = runs.values()
    print(f"kernels: {a['environment']['torch_cpu_capability']} vs {b['environment']['torch_cpu_capability']} "
          f"({a['environment']['cpu']}, torch {a['environment']['torch']})")
    first = next((i for i, (p, q) in enumerate(zip(a["trace"], b["trace"])) if p != q), None)
    if first is None:
        print(f"bitwise identical over {args.steps} steps")
    else:
        step, phase, name, _ = a["trace"][first]
        same = sum(1 for s, *_ in a["trace"][:first] if s == step)
        print(f"first difference: step {step}, {phase} of {name!r} (after {same} identical tensors in that step)")
    for i, (la, lb) in enumerate(zip(a["losses"], b["losses"])):
        if la != lb or i < 2:
            print(f"  step {i}: loss {la!r} vs {lb!r}")
    for setting, run in runs.items():
        s = sorted(run["seconds"][1:])
        print(f"{setting}: median {s[len(s) // 2] * 1000:.1f} ms per training step (batch 32, one thread)")


if __name__ == "__main__":
    main()
