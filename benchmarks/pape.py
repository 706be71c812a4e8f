"""PaPE's bias as one 2D quadratic (6 extra q/k features, values padded to the queries' width so
that the CPU's flash kernel runs: lookhere) against the sum of P parabolas expanded term by term
(1 + 2P features, the authors' form; values narrower than queries, so SDPA's math path), side by
side in one process.

The same bias either way (the tests check lookhere's against the float64 definition). Timed: a training
step (forward + backward + AdamW) of the studies' model, width 96, 12 heads, depth 4, patch 4, batch
32 at 56 px (paper-grid's cells), and a forward at larger grids; the two forms alternate, best of
``--repeats``:

    OMP_NUM_THREADS=1 python benchmarks/pape.py [--repeats 3] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import lookhere
from lookhere.position.base import patch_positions
from lookhere.position.pape import Pape
from attention import write_atomic  # benchmarks/ is on sys.path


def expanded_features(self: Pape, q, grid, layer, num_prefix_tokens):
    """sum_r -a (u_q - u_k)^2 + b (u_q - u_k), u = w_r . p, as [sum_r -a u_q^2 + b u_q] + (2 a u_q - b) . u_k - a . u_k^2."""
    B, H, T, D = q.shape
    p, P = num_prefix_tokens, self.parabolas
    y, x = patch_positions(grid, device=q.device)
    pos = torch.stack([y - (grid[0] - 1) / 2, x - (grid[1] - 1) / 2], dim=-1)
    u = F.linear(pos, self.direction[layer].weight.float()).view(-1, H, P).transpose(0, 1)
    ab = F.linear(q[:, :, p:].transpose(1, 2).reshape(B, T - p, H * D).float(), self.shape[layer].weight.float())
    a, b = ab.view(B, T - p, 2, H, P).permute(2, 0, 3, 1, 4).unbind(0)
    a = F.softplus(a)
    qf = torch.cat([(b * u - a * u * u).sum(-1, keepdim=True), 2 * a * u - b, -a], dim=-1)
    kf = torch.cat([torch.ones_like(u[..., :1]), u, u * u], dim=-1)[None]
    return F.pad(qf, (0, 0, p, 0)), F.pad(kf, (0, 0, p, 0))


def expanded_attend(self: Pape, q, k, v, *, grid, layer, num_prefix_tokens, dropout_p=0.0, state=None):
    with torch.autocast(q.device.type, enabled=False):
        qa, ka = self._augmented(q, k, grid, layer, num_prefix_tokens)
        out = F.scaled_dot_product_attention(qa, ka, v.float(), dropout_p=dropout_p, scale=q.shape[-1] ** -0.5)
    return out.to(v.dtype)


FORMS = {"quadratic (lookhere)": (Pape.features, Pape.attend), "expanded (1 + 2P)": (expanded_features, expanded_attend)}


def seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--grids", type=int, nargs="+", default=[28, 42])
    ap.add_argument("--markdown", help="also write the table to this file")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = lookhere.create_vit("pape", img_size=56, patch_size=4, embed_dim=96, depth=4, num_heads=12,
                                num_classes=10)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, labels = torch.randn(32, 3, 56, 56), torch.randint(0, 10, (32,))

    def step():
        opt.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        opt.step()

    rows = [("train step, batch 32, 14x14", step)]

    def forward(images):
        model.eval()
        with torch.no_grad():
            model(images)
        model.train()

    for g in args.grids:
        rows.append((f"forward, batch 2, {g}x{g}", lambda big=torch.randn(2, 3, 4 * g, 4 * g): forward(big)))
    out = ["| work | " + " | ".join(f"s, {f}" for f in FORMS) + " | speed-up |", "|---|---:|---:|---:|"]
    for label, fn in rows:
        times = dict.fromkeys(FORMS, float("inf"))
        for _ in range(args.repeats):  # alternate the forms so that drift hits both alike
            for form, (features, attend) in FORMS.items():
                Pape.features, Pape.attend = features, attend
                times[form] = min(times[form], seconds(fn))
        Pape.features, Pape.attend = FORMS["quadratic (lookhere)"]
        q, e = times.values()
        out.append(f"| {label} | {q:.3f} | {e:.3f} | {e / q:.1f}x |")
        print(out[-1], flush=True)
    text = "\n".join(out)
    print(f"\n{text}\n(torch {torch.__version__}, {torch.get_num_threads()} thread(s))")
    if args.markdown:
        write_atomic(args.markdown, text + "\n")


if __name__ == "__main__":
    main()
