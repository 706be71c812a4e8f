"""The compiled FlexAttention backend, compiled by inductor for this CPU (inference).

The slowest file of the suite (compilation, about a minute when inductor's cache is cold); run it
alone with ``pytest tests/test_flex.py``.
"""

import functools
import logging
import os
import re

import pytest
import torch
from torch._dynamo.utils import counters

import lookhere.attention as attention
import lookhere.attention.flex as flex_module
from lookhere import PRESETS
from lookhere.attention import AttentionPlan, attend, dense_bias, flex_work
from lookhere.attention.geometry import field_of_view
from lookhere.attention.layout import BLOCK, blocks_computed, build_layout, fov_edges, head_order
from torch.nn.attention.flex_attention import AuxOutput, create_block_mask, flex_attention

from conftest import CONFIGS, dense_reference


@pytest.fixture
def fresh_compiler():
    """Compilation counted from zero, with kernels compiled afresh."""
    torch._dynamo.reset()
    flex_module._kernels.clear()
    counters.clear()
    yield
    torch._dynamo.reset()
    flex_module._kernels.clear()


# Square, non-square, and ragged (not a multiple of the 8 x 8 tiles, or of a block of 64) grids.
GRIDS = [(6, 6), (5, 9), (13, 21), (14, 14), (26, 24)]


@pytest.mark.parametrize("preset", list(PRESETS))
def test_compiled_flex_equals_float64_reference(preset):
    plan = AttentionPlan(preset, 3, 12)
    for grid in GRIDS:
        for prefix in (0, 1, 4):
            for head_dim in (8, 64) if grid == (6, 6) else (16,):
                T = prefix + grid[0] * grid[1]
                q, k, v = torch.randn(3, 2, 12, T, head_dim).unbind(0)
                with torch.no_grad():
                    out = attend(q, k, v, plan, layer=1, grid_size=grid, num_prefix_tokens=prefix, backend="flex")
                ref = dense_reference(q, k, v, preset, grid, 1, 3, prefix)
                torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in CONFIGS if n not in PRESETS])
def test_compiled_flex_other_fills_distances_and_centre_heads(name):
    plan = AttentionPlan(CONFIGS[name], 3, 12)
    for grid, prefix in [((6, 6), 1), ((4, 9), 0)]:
        q, k, v = torch.randn(3, 1, 12, prefix + grid[0] * grid[1], 16).unbind(0)
        with torch.no_grad():
            out = attend(q, k, v, plan, layer=2, grid_size=grid, num_prefix_tokens=prefix, backend="flex")
        torch.testing.assert_close(out.double(), dense_reference(q, k, v, CONFIGS[name], grid, 2, 3, prefix),
                                   rtol=1e-5, atol=1e-5)


def test_a_sweep_compiles_once_per_grid_at_most(fresh_compiler):
    plan = AttentionPlan("lh-45", 4, 12)
    # Grids of two blocks or more: a grid of one block gets its own graphs (a dimension of size 1).
    grids = [(9, 9), (10, 12), (12, 11), (8, 17)]
    with torch.no_grad():
        for grid in grids:
            for batch in (1, 2, 3, 5):
                for layer in range(4):
                    for prefix in (1, 0):
                        q = torch.randn(batch, 12, prefix + grid[0] * grid[1], 16)
                        attend(q, q, q, plan, layer=layer, grid_size=grid, num_prefix_tokens=prefix, backend="flex")
    compiled = counters["stats"]["unique_graphs"]
    assert 1 <= compiled <= len(grids), compiled
    # Nothing is rebuilt per call: a second sweep compiles nothing and builds no block mask.
    masks = len(plan._cache)
    with torch.no_grad():
        for grid in grids:
            q = torch.randn(4, 12, 1 + grid[0] * grid[1], 16)
            attend(q, q, q, plan, layer=3, grid_size=grid, backend="flex")
    assert counters["stats"]["unique_graphs"] == compiled and len(plan._cache) == masks


def test_small_head_dims_are_padded_where_the_kernel_needs_it(monkeypatch, caplog):
    """The demo's micro ViT (head dim 8) on a device whose compiled kernel needs head dim >= 16 (CUDA),
    played by the CPU: ``auto`` picks FlexAttention, which pads, and the output is exact."""
    from lookhere import create_vit
    from lookhere.train import MODEL_SIZES

    model = create_vit("lh-90", img_size=32, patch_size=4, num_classes=10, **MODEL_SIZES["micro"]).eval()
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        expected = model(x)  # the dense path on the CPU
    real_choice, kernel = attention.choose_backend, flex_module._compiled("flex")
    head_dims = []

    def kernel_needing_16(q, k, v, **kw):
        head_dims.append(q.shape[-1])
        assert q.shape[-1] >= 16, "FlexAttention's compiled kernel refuses head dims under 16"
        return kernel(q, k, v, **kw)

    monkeypatch.setattr(attention, "choose_backend", lambda plan, device, n, p=0.0: real_choice(
        plan, torch.device("cuda"), n, p))
    monkeypatch.setattr(flex_module, "MIN_HEAD_DIM", {"cpu": 16})
    monkeypatch.setattr(flex_module, "_kernels", {**flex_module._kernels, "flex": kernel_needing_16})
    monkeypatch.setattr(flex_module, "_padded_logged", set())
    with torch.no_grad(), caplog.at_level(logging.INFO, logger=flex_module.__name__):
        out = model(x)
        model(x)
    assert head_dims == [16] * 12  # 6 layers, twice
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert [r.getMessage() for r in caplog.records] == [
        "FlexAttention on cpu needs head dim >= 16: head dim 8 is zero-padded"]


def test_flex_refuses_dropout():
    q = torch.randn(1, 12, 10, 16)
    with pytest.raises(ValueError, match="no attention dropout"):
        attend(q, q, q, AttentionPlan("lh-90", 1, 12), layer=0, grid_size=(3, 3), backend="flex", dropout_p=0.1)


# --- the token layout ----------------------------------------------------------------------------
def test_layout_is_a_permutation_per_head_and_round_trips():
    plan = AttentionPlan("lh-45", 1, 12)
    for grid in GRIDS:
        lay = build_layout(plan.coef[0], grid)
        n = grid[0] * grid[1]
        assert lay.slots % BLOCK == 0 and lay.slots - n < BLOCK
        for order in lay.patch:
            assert torch.equal(order[order >= 0].sort().values, torch.arange(n))
            assert (order[n:] == -1).all()  # padding only after the patches
        x = torch.randn(2, 12, n, 5)
        assert torch.equal(lay.scatter(lay.gather(x)), x)


def test_each_heads_blocks_fit_its_field_of_view():
    """On a 16 x 16 grid: a two-edge head's blocks are 8 x 8 squares of the image; a one-edge head's
    lie on one side of every line parallel to its edge except one band; unmasked heads stay row-major."""
    coef = AttentionPlan("lh-180", 1, 12).coef[0]  # halves, diagonals, none
    lay = build_layout(torch.cat([coef, AttentionPlan("lh-90", 1, 12).coef[0][:4]]), (16, 16))
    y, x = lay.patch // 16, lay.patch % 16
    for h in range(12, 16):  # corners
        for b in range(4):
            ys, xs = y[h, b * 64:(b + 1) * 64], x[h, b * 64:(b + 1) * 64]
            assert ys.max() - ys.min() == 7 and xs.max() - xs.min() == 7
    up = y[0].view(4, 64)  # 'up': each block is 4 whole rows
    assert (up.max(1).values - up.min(1).values == 3).all() and len(set(up[:, 0].tolist())) == 4
    # A turned half-plane: each block a band of diagonals (at most 11 of them, the corners' few-patch
    # diagonals included; a row-major block of 4 rows spans 19), in order.
    diagonal = (x[4] - y[4]).view(4, 64)
    assert (diagonal.max(1).values - diagonal.min(1).values <= 10).all()
    assert (diagonal[1:].min(1).values >= diagonal[:-1].max(1).values).all()
    assert torch.equal(lay.patch[8], torch.arange(256))  # an unmasked head


def test_fov_edges_keeps_the_half_planes_that_shape_the_fov():
    from lookhere.attention.geometry import CONSTRAINTS, HeadSpec, head_tables

    def edges(*prims):
        coef, _ = head_tables((HeadSpec(prims, 1.0),))
        return set(fov_edges(coef[0]))

    assert edges("up") == {CONSTRAINTS["up"][0]}
    assert edges("tri_up") == set(CONSTRAINTS["tri_up"])
    assert edges("tri_up", "left") == {(-1, 1), (0, -1)}  # the wedge: its cone's other edge is redundant
    assert edges() == set()


# --- the path with the prefix keys outside the kernel (the GPU's), and gradients --------------------
def emulated_flex(q, k, v, plan, layer, grid, p, monkeypatch):
    """The flex backend with its kernel replaced by the same mods evaluated densely (differentiable,
    float64): everything but FlexAttention itself, with the GPU's path for the prefix keys."""
    def dense_flex(q, k, v, score_mod, block_mask, scale, return_aux=None):
        S, K = q.shape[2], k.shape[2]
        h = torch.arange(q.shape[1])[:, None, None]
        qi, ki = torch.arange(S)[None, :, None], torch.arange(K)[None, None, :]
        scores = score_mod((q @ k.transpose(-1, -2)) * scale, 0, h, qi, ki)
        scores = scores.masked_fill(~block_mask.mask_mod(0, h, qi, ki), float("-inf"))
        out = scores.softmax(-1) @ v
        return (out, AuxOutput(lse=scores.logsumexp(-1))) if return_aux is not None else out

    monkeypatch.setattr(flex_module, "PREFIX_KEYS_IN_KERNEL", set())
    monkeypatch.setattr(flex_module, "_kernels", {"flex": dense_flex,
                                                  "blocks": lambda *a, **kw: create_block_mask(*a, **kw, _compile=False)})
    return attend(q, k, v, plan, layer=layer, grid_size=grid, num_prefix_tokens=p, backend="flex")


@pytest.mark.parametrize("preset", list(PRESETS))
def test_gradients_through_the_layout_equal_the_dense_paths(preset, monkeypatch):
    plan = AttentionPlan(preset, 3, 12)
    for grid, p in [((13, 21), 1), ((14, 14), 4), ((9, 10), 0)]:
        q, k, v = (t.double().requires_grad_() for t in torch.randn(3, 2, 12, p + grid[0] * grid[1], 8).unbind(0))
        w = torch.randn_like(q)
        out = emulated_flex(q, k, v, plan, 2, grid, p, monkeypatch)
        grads = torch.autograd.grad((out * w).sum(), (q, k, v))
        ref = attend(q, k, v, plan, layer=2, grid_size=grid, num_prefix_tokens=p, backend="dense")
        ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
        torch.testing.assert_close(out, ref)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r)


def test_the_kernels_log_sum_exp_merges_the_prefix_keys(monkeypatch):
    """FlexAttention itself (not compiled: the CPU's compiled kernel returns no log-sum-exp) with the
    prefix keys merged outside it, as on a GPU, equals the float64 reference."""
    monkeypatch.setattr(flex_module, "PREFIX_KEYS_IN_KERNEL", set())
    monkeypatch.setattr(flex_module, "_kernels", {"flex": flex_attention,
                                                  "blocks": lambda *a, **kw: create_block_mask(*a, **kw, _compile=False)})
    for name in ("lh-90", "square-max"):
        plan = AttentionPlan(CONFIGS[name], 3, 12)
        for grid, p in [((13, 21), 1), ((6, 6), 4)]:
            q, k, v = torch.randn(3, 1, 12, p + grid[0] * grid[1], 16).unbind(0)
            with torch.no_grad():
                out = attend(q, k, v, plan, layer=1, grid_size=grid, num_prefix_tokens=p, backend="flex")
            torch.testing.assert_close(out.double(), dense_reference(q, k, v, CONFIGS[name], grid, 1, 3, p),
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward needs a GPU")
def test_gradients_through_compiled_flex_on_the_gpu_equal_the_dense_paths():
    plan = AttentionPlan("lh-45", 3, 12).cuda()
    for grid, p in [((26, 24), 1), ((14, 14), 0)]:
        q, k, v = (t.cuda().requires_grad_() for t in torch.randn(3, 2, 12, p + grid[0] * grid[1], 64).unbind(0))
        w = torch.randn_like(q)
        grads = torch.autograd.grad((attend(q, k, v, plan, layer=1, grid_size=grid, num_prefix_tokens=p,
                                            backend="flex") * w).sum(), (q, k, v))
        ref = torch.autograd.grad((attend(q, k, v, plan, layer=1, grid_size=grid, num_prefix_tokens=p,
                                          backend="dense") * w).sum(), (q, k, v))
        for g, r in zip(grads, ref):
            torch.testing.assert_close(g, r, rtol=2e-4, atol=2e-4)


# --- the work the kernel does ------------------------------------------------------------------------
def independent_work(config, grid, p, layout):
    """Blocks computed, counted from the float64 bias itself in the layout's order (no block mask)."""
    plan = AttentionPlan(config, 1, 12)
    lay = build_layout(plan.coef[0], grid, layout)
    bias = dense_bias(config, grid, 1, 12)[0]  # (H, N, N), -inf where masked
    n, S = grid[0] * grid[1], lay.slots
    computed = []
    for h in range(12):
        seen = torch.zeros(S, S, dtype=torch.bool)
        real = lay.patch[h] >= 0
        idx = lay.patch[h][real]
        seen[real.nonzero()[:, 0][:, None], real.nonzero()[:, 0][None, :]] = bias[h][idx][:, idx].isfinite()
        seen |= torch.eye(S, dtype=torch.bool) & ~real[:, None]
        blocks = seen.view(S // BLOCK, BLOCK, S // BLOCK, BLOCK).any(3).any(1).sum().item()
        computed.append((blocks * BLOCK * BLOCK + p * (2 * n + p)) / (n + p) ** 2)
    ideal = [(bias[h].isfinite().sum().item() + 2 * p * n + p * p) / (n + p) ** 2 for h in range(12)]
    return computed, ideal


def test_flex_work_counts_the_block_masks_blocks_and_the_visible_pairs():
    for config, grid, p in [("lh-90", (13, 21), 1), ("lh-45", (16, 16), 4), ("lh-180", (10, 7), 0)]:
        for layout in ("fitted", "row-major"):
            work = flex_work(config, grid, depth=1, num_prefix_tokens=p, layout=layout)
            computed, ideal = independent_work(config, grid, p, layout)
            assert work["computed"] == pytest.approx(sum(computed) / 12, rel=1e-9)
            assert work["ideal"] == pytest.approx(sum(ideal) / 12, rel=1e-9)
            assert work["groups"]["none"] == pytest.approx({"computed": sum(computed[8:]) / 4,
                                                            "ideal": 1.0})
            assert work["layout"] == layout and work["block"] == BLOCK


@functools.cache
def work_at_64(preset: str, layout: str = "fitted") -> dict:
    """``flex_work`` of a preset's first layer at a 64x64 grid (1024 px at patch 16), made once."""
    return flex_work(preset, 64, depth=1, layout=layout)


def test_flex_work_at_a_64x64_grid_fitted_against_row_major():
    """At 1024 px (patch 16) the fitted layout saves most of what row-major order wastes: its work
    over the FOV's ideal is at most a third of row-major's."""
    for preset in PRESETS:
        fitted, row = work_at_64(preset), work_at_64(preset, "row-major")
        assert fitted["ideal"] <= fitted["computed"], (preset, fitted)
        assert fitted["computed"] - fitted["ideal"] <= (row["computed"] - row["ideal"]) / 3, (preset, fitted, row)


def test_flex_work_at_a_64x64_grid_meets_the_presets_targets():
    """LH-90 and LH-45 compute at most 0.56 and 0.48 of unmasked attention (their FOVs: 0.50 and
    0.42), LH-180 at most 0.70."""
    for preset, target in {"lh-180": 0.70, "lh-90": 0.56, "lh-45": 0.48}.items():
        assert work_at_64(preset)["computed"] <= target, preset


def test_blocks_computed_equals_the_count_from_the_whole_mask():
    """The running-minimum count that picks each head's order, against the N x N FOV cut into blocks,
    for random orders and the fitted ones, on square, non-square and ragged grids."""
    gen = torch.Generator().manual_seed(0)
    heads = [((-1, 0), (0, -1)), ((-1, -1), (-1, 1)), ((1, 1), (-1, 0)), ((1, -1),), ()]
    for grid in [(13, 21), (14, 14), (26, 24), (9, 30)]:
        n = grid[0] * grid[1]
        idx = torch.arange(n)
        dy = idx[None, :] // grid[1] - idx[:, None] // grid[1]
        dx = idx[None, :] % grid[1] - idx[:, None] % grid[1]
        for edges in heads:
            coef = torch.tensor([list(e) for e in edges] + [[0, 0]] * (3 - len(edges)), dtype=torch.int32)
            fov = field_of_view(coef[None], dy, dx)[0]
            for order in (torch.randperm(n, generator=gen), head_order(edges, grid)):
                S = -(-n // BLOCK) * BLOCK
                seen = torch.eye(S, dtype=torch.bool)
                seen[:n, :n] = fov[order][:, order]  # padding slots see only themselves
                expected = seen.view(S // BLOCK, BLOCK, S // BLOCK, BLOCK).any(3).any(1).sum().item()
                assert blocks_computed(order, edges, grid) == expected, (grid, edges)
    with pytest.raises(ValueError, match="at most two edges"):
        blocks_computed(torch.arange(16), ((-1, 0), (0, -1), (1, 1)), (4, 4))


def square_tiles(grid):
    """Patches in 8x8 tiles (bands of 8 rows, tiles left to right, row-major inside), by loops."""
    gy, gx = grid
    return torch.tensor([y * gx + x for ty in range(0, gy, 8) for tx in range(0, gx, 8)
                         for y in range(ty, min(ty + 8, gy)) for x in range(tx, min(tx + 8, gx))])


def test_each_head_takes_the_cheapest_order_and_tiles_on_a_tie():
    """A two-edge head's order costs no more blocks than square tiles on any grid, and at a 64x64
    grid the cones and wedges take bands (fewer blocks), the quadrants keep their tiles."""
    quadrant, cone, wedge = ((-1, 0), (0, -1)), ((-1, -1), (-1, 1)), ((-1, 1), (0, -1))
    for grid in [(13, 21), (24, 24), (26, 24), (32, 48), (64, 64)]:
        for edges in (quadrant, cone, wedge):
            chosen = blocks_computed(head_order(edges, grid), edges, grid)
            assert chosen <= blocks_computed(square_tiles(grid), edges, grid), (grid, edges)
    assert torch.equal(head_order(quadrant, (64, 64)), square_tiles((64, 64)))
    for edges in (cone, wedge):
        tiles = blocks_computed(square_tiles((64, 64)), edges, (64, 64))
        assert blocks_computed(head_order(edges, (64, 64)), edges, (64, 64)) < tiles, edges


def test_flex_work_refuses_bad_arguments():
    with pytest.raises(ValueError, match="layout='tiles'; allowed: fitted, row-major"):
        flex_work("lh-90", 8, layout="tiles")
    with pytest.raises(ValueError, match="grid_size=0"):
        flex_work("lh-90", 0)
    with pytest.raises(ValueError, match="num_prefix_tokens=-1"):
        flex_work("lh-90", 8, num_prefix_tokens=-1)


def test_the_gpu_benchmark_runs(tmp_path):
    """benchmarks/gpu.py, the one command for a GPU, in its CPU smoke mode: every table is written."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
    out = tmp_path / "gpu.md"
    done = subprocess.run([sys.executable, str(script), "--smoke", "--markdown", str(out)], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    for part in ("| 64 | 2 | lh-45 | ours |", "| 64 | 2 | lh-45 | flash (no mask) |", "| 64 | 1 | rope-mixed (timm) |",
                 "FlexAttention graphs compiled by a sweep", "Blocks the kernel computes"):
        assert part in text, part
    compiled, again = map(int, re.findall(r"cold start: (\d+); by the same sweep again: (\d+)", text)[0])
    assert compiled >= 1 and again == 0
