"""PaPE's CPU attention in chunks: (image, head) pairs (lookhere) against query rows across every pair.

Both keep each SDPA call to the dense path's budget of scores; rows across every pair re-read all
keys of the batch for every few rows. Run alternately in one process, one thread:

    OMP_NUM_THREADS=1 python benchmarks/pape_chunks.py
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from lookhere.attention.chunked import CHUNK_ELEMENTS, sdpa_in_chunks


def rows_across_pairs(q, k, v, scale):
    B, H, T, _ = q.shape
    step = max(1, CHUNK_ELEMENTS // (B * H * T))
    return torch.cat([F.scaled_dot_product_attention(q[:, :, i:i + step], k, v, scale=scale)
                      for i in range(0, T, step)], dim=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["64x785", "8x1765", "16x4097"],
                        help="BATCHxTOKENS, 12 heads of 8 + 101 features padded to 112")
    args = parser.parse_args()
    torch.manual_seed(0)
    print("| batch x heads, tokens | seconds (rows) | seconds (pairs) | ratio | max difference |")
    print("|---|---:|---:|---:|---:|")
    for shape in args.shapes:
        B, T = (int(x) for x in shape.split("x"))
        q, k = torch.randn(2, B, 12, T, 112).unbind(0)
        v = torch.randn(B, 12, T, 8)
        with torch.no_grad():
            t0 = time.perf_counter()
            a = rows_across_pairs(q, k, v, 8 ** -0.5)
            t1 = time.perf_counter()
            b = sdpa_in_chunks(q, k, v, dropout_p=0.0, scale=8 ** -0.5)
            t2 = time.perf_counter()
        print(f"| {B} x 12, {T} | {t1 - t0:.2f} | {t2 - t1:.2f} | {(t1 - t0) / (t2 - t1):.1f}x | "
              f"{(a - b).abs().max().item():.1e} |")


if __name__ == "__main__":
    main()
