"""The compiled FlexAttention backend, compiled by inductor for this CPU (inference).

The slowest file of the suite (compilation, about a minute when inductor's cache is cold); run it
alone with ``pytest tests/test_flex.py``.
"""

import logging

import pytest
import torch
from torch._dynamo.utils import counters

import lookhere.attention as attention
import lookhere.attention.flex as flex_module
from lookhere import PRESETS
from lookhere.attention import AttentionPlan, attend

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


@pytest.mark.parametrize("preset", list(PRESETS))
def test_compiled_flex_equals_float64_reference(preset):
    plan = AttentionPlan(preset, 3, 12)
    for grid in [(6, 6), (5, 9)]:
        for prefix in (0, 1, 4):
            for head_dim in (8, 64):
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
    grids = [(4, 4), (6, 6), (5, 9), (8, 3)]
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
