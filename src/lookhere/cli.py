"""The ``lookhere`` command line."""

from __future__ import annotations

import argparse
import sys
import time


def _example(args: argparse.Namespace) -> int:
    """Build a LookHere ViT at one size and classify random images at three sizes, no set-up calls."""
    import torch

    from . import create_vit

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

    for name in args.preset or list(PRESETS):
        out = f"{args.out_dir}/fov-{name}.png"
        plot_fov(name, out, grid_size=(args.grid, args.grid), depth=12)
        print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lookhere", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    ex = sub.add_parser("example", help="classify random images at three sizes with one LookHere ViT")
    ex.add_argument("--pos-encoding", default="lh-90")
    ex.add_argument("--img-size", type=int, default=224)
    ex.add_argument("--patch-size", type=int, default=16)
    ex.add_argument("--batch-size", type=int, default=2)
    ex.add_argument("--seed", type=int, default=0)
    ex.set_defaults(func=_example)

    fov = sub.add_parser("fov", help="write a PNG of each head's field of view for the presets")
    fov.add_argument("--preset", action="append", help="preset name (repeatable); default: all")
    fov.add_argument("--grid", type=int, default=15)
    fov.add_argument("--out-dir", default=".")
    fov.set_defaults(func=_fov)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"lookhere {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
