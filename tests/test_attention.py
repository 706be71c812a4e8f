import pytest
import torch
import torch.nn.functional as F

import lookhere.attention.chunked as chunked_module
import lookhere.attention.dense as dense_module
from lookhere import PRESETS, lookhere_attention
from lookhere.attention import AttentionPlan, attend
from conftest import CONFIGS, dense_reference


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("grid", [(5, 5), (3, 7)])
@pytest.mark.parametrize("prefix", [0, 1, 4])
def test_equals_dense_float64(name, grid, prefix):
    depth, layer = 3, 1
    T = prefix + grid[0] * grid[1]
    q, k, v = torch.randn(3, 2, 12, T, 16).unbind(0)
    out = lookhere_attention(q, k, v, config=CONFIGS[name], grid_size=grid, layer=layer, depth=depth,
                             num_prefix_tokens=prefix)
    ref = dense_reference(q, k, v, CONFIGS[name], grid, layer, depth, prefix)
    assert out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_query_chunking_gives_the_same_result(monkeypatch):
    grid, T = (6, 5), 31
    q, k, v = torch.randn(3, 1, 12, T, 8).unbind(0)
    whole = lookhere_attention(q, k, v, config="lh-45", grid_size=grid, layer=0, depth=2)
    monkeypatch.setattr(chunked_module, "CHUNK_ELEMENTS", 12 * T * 4)  # 4 query rows per chunk
    plan = AttentionPlan("lh-45", 2, 12)
    chunked = attend(q, k, v, plan, layer=0, grid_size=grid, backend="dense")
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    # Cached per chunk: 30 queries in chunks of 4 rows.
    assert sorted(key[3:5] for key in plan._cache) == [(s, min(30, s + 4)) for s in range(0, 30, 4)]


@pytest.mark.parametrize("preset", list(PRESETS))
def test_shifted_pattern_gives_shifted_output(preset):
    """A pattern placed at two places of two grids (other size and aspect ratio) attends identically.

    Background keys are made unattractive (large negative q.k), so every query's softmax is over
    the pattern alone and only the patterns' relative geometry matters.
    """
    D, H, ph, pw = 8, 12, 4, 3
    qp, kp, vp = torch.randn(3, 1, H, ph * pw, D).unbind(0)
    qp[..., 0] = 1.0 + qp[..., 0].abs()
    kp[..., 0] = kp[..., 0].clamp(-1, 1)

    def place(grid, oy, ox):
        n = grid[0] * grid[1]
        q = torch.randn(1, H, n, D)
        k = torch.zeros(1, H, n, D)
        k[..., 0] = -1e3
        v = torch.zeros(1, H, n, D)
        idx = torch.tensor([(y + oy) * grid[1] + x + ox for y in range(ph) for x in range(pw)])
        q[:, :, idx], k[:, :, idx], v[:, :, idx] = qp, kp, vp
        out = lookhere_attention(q, k, v, config=preset, grid_size=grid, layer=0, depth=1, num_prefix_tokens=0)
        return out[:, :, idx]

    a = place((6, 6), 1, 2)
    b = place((9, 14), 4, 9)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_memory_per_call_is_bounded(monkeypatch):
    # Only chunk-sized bias rows exist: no tensor of the dense path is larger than H x rows x T.
    grid = (8, 8)
    monkeypatch.setattr(chunked_module, "CHUNK_ELEMENTS", 12 * 65 * 8)
    plan = AttentionPlan("lh-90", 1, 12)
    q = torch.randn(1, 12, 65, 4)
    out = attend(q, q, q, plan, layer=0, grid_size=grid, backend="dense")
    monkeypatch.setattr(dense_module, "CACHE_ELEMENTS", 0)
    torch.testing.assert_close(out.double(), dense_reference(q, q, q, "lh-90", grid, 0, 1, 1), rtol=1e-5, atol=1e-5)
    sizes = []
    real = dense_module.head_penalties
    monkeypatch.setattr(dense_module, "head_penalties", lambda *a, **kw: sizes.append(real(*a, **kw)[0].shape)
                        or real(*a, **kw))
    attend(q, q, q, plan, layer=0, grid_size=grid, backend="dense")
    assert sizes == [(12, 8, 64)] * 8  # 64 queries, 8 rows a chunk


def test_bad_shapes_are_clear_errors():
    q = torch.randn(1, 12, 17, 8)
    with pytest.raises(ValueError, match="T=17"):
        lookhere_attention(q, q, q, config="lh-90", grid_size=(4, 5), layer=0, depth=1)
    with pytest.raises(ValueError, match=r"\(B, H, T, D\)"):
        lookhere_attention(q[0], q[0], q[0], config="lh-90", grid_size=(4, 4), layer=0, depth=1)
    with pytest.raises(ValueError, match="layer=3"):
        lookhere_attention(q, q, q, config="lh-90", grid_size=(4, 4), layer=3, depth=2)
    with pytest.raises(ValueError, match="num_heads=12"):
        lookhere_attention(q, q, q, config={"global_slope": 1, "layer_slopes": [1, 1],
                                            "head_directions": "halves-corners-triangles-diagonals"},
                           grid_size=(4, 4), layer=0, depth=1)


def test_values_narrower_than_queries_are_refused():
    q = torch.randn(1, 12, 13, 8)
    with pytest.raises(ValueError, match=r"\(B, H, T, D\) with matching shapes, got \(1, 12, 13, 8\), \(1, 12, 13, 8\), "
                                         r"\(1, 12, 13, 4\)"):
        lookhere_attention(q, q, q[..., :4], config="lh-90", grid_size=(3, 4), layer=0, depth=1, num_prefix_tokens=1)


@pytest.mark.parametrize("name,backend", [("lh-45", "dense"), ("lh-45", "slab"), ("lh-180", "slab"),
                                          ("sqrt-zero", "dense"), ("square-max", "dense")])
def test_float64_attention_has_float64_digits(name, backend):
    """Against the spec's bias in Python floats: float64 inputs get a float64 bias, not float32's."""
    from spec_reference import bias as reference_bias

    grid, depth, layer, prefix = (3, 5), 3, 1, 1
    plan = AttentionPlan(CONFIGS[name], depth, 12)
    q, k, v = torch.randn(3, 2, 12, prefix + 15, 16, dtype=torch.float64).unbind(0)
    bias = F.pad(torch.tensor(reference_bias(CONFIGS[name], grid, depth, 12)[layer], dtype=torch.float64),
                 (prefix, 0, prefix, 0))
    ref = (q @ k.transpose(-1, -2) / 4 + bias).softmax(-1) @ v
    out = attend(q, k, v, plan, layer=layer, grid_size=grid, num_prefix_tokens=prefix, backend=backend)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_a_plans_config_cannot_be_replaced_under_its_tables():
    plan = AttentionPlan("lh-90", 2, 12)
    with pytest.raises(AttributeError, match="build a new plan"):
        plan.config = plan.config.replace(global_slope=0.0)
    assert plan.config == AttentionPlan("lh-90", 2, 12).config


BACKEND_CASES = [(name, grid) for name in CONFIGS for grid in [(6, 6), (4, 9), (11, 3)]]


@pytest.mark.parametrize("name,grid", BACKEND_CASES)
def test_slab_equals_dense_float64(name, grid):
    plan = AttentionPlan(CONFIGS[name], 3, 12)
    if not plan.offset_only:
        with pytest.raises(ValueError, match="slab backend"):
            attend(*torch.randn(3, 1, 12, 1 + grid[0] * grid[1], 8).unbind(0), plan, layer=0, grid_size=grid,
                   backend="slab")
        return
    for prefix in (0, 1, 4):
        T = prefix + grid[0] * grid[1]
        q, k, v = torch.randn(3, 2, 12, T, 16).unbind(0)
        out = attend(q, k, v, plan, layer=1, grid_size=grid, num_prefix_tokens=prefix, backend="slab")
        ref = dense_reference(q, k, v, CONFIGS[name], grid, 1, 3, prefix)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows_per_call", [1, 3, 4, 16])
def test_slab_rows_per_call_and_side_groups(rows_per_call):
    from lookhere.attention.slab import side_groups, slab_attention

    plan = AttentionPlan("lh-180", 4, 12)
    # halves look to one side each; the four diagonal half-planes and the unmasked heads see both sides.
    assert dict(side_groups(plan.sides[0])) == {"up": (0,), "down": (1,), "left": (2,), "right": (3,),
                                                "all": (4, 5, 6, 7, 8, 9, 10, 11)}
    grid = (7, 10)
    q, k, v = torch.randn(3, 1, 12, 71, 8).unbind(0)
    ref = dense_reference(q, k, v, "lh-180", grid, 2, 4, 1)
    # Inference: bias views and merged prefix; with autograd: copied bias rows_per_call rows at a time.
    for needs_grad in (False, True):
        out = slab_attention(q.requires_grad_(needs_grad), k, v, plan, 2, grid, 1, rows_per_call=rows_per_call)
        torch.testing.assert_close(out.detach().double(), ref, rtol=1e-5, atol=1e-5)


def test_bf16_within_bf16_tolerance():
    grid = (7, 7)
    q, k, v = torch.randn(3, 1, 12, 50, 32).unbind(0)
    ref = dense_reference(q, k, v, "lh-90", grid, 0, 2, 1)
    for backend in ("dense", "slab"):
        out = lookhere_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), config="lh-90", grid_size=grid, layer=0,
                                 depth=2, backend=backend)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


def test_auto_backend_choice():
    from lookhere.attention import choose_backend

    plan = AttentionPlan("lh-90", 12, 12)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_backend(plan, cpu, 196) == "dense"
    assert choose_backend(plan, cpu, 4096) == "slab"
    assert choose_backend(AttentionPlan(plan.config.replace(fill_with="max"), 12, 12), cpu, 4096) == "dense"
    centre = AttentionPlan({"global_slope": 1, "layer_slopes": [1, 1], "head_directions": "halves-center"}, 1, 12)
    assert choose_backend(centre, cpu, 4096) == "dense"
    assert choose_backend(plan, cuda, 196) == "flex"
    assert choose_backend(plan, cuda, 4096, dropout_p=0.1) == "slab"
    for device in ("mps", "xpu"):
        assert choose_backend(plan, torch.device(device), 4096) == "dense"
    with pytest.raises(ValueError, match="backend"):
        q = torch.randn(1, 12, 17, 4)
        lookhere_attention(q, q, q, config="lh-90", grid_size=(4, 4), layer=0, depth=1, backend="fast")


def test_plan_follows_a_replaced_config_and_the_device():
    from lookhere.position import LookHere

    pe = LookHere("lh-45", depth=3, num_heads=12)
    q, k, v = torch.randn(3, 1, 12, 26, 8).unbind(0)
    pe.attend(q, k, v, grid=(5, 5), layer=1, num_prefix_tokens=1)
    pe.config = pe.config.replace(global_slope=0.5)
    out = pe.attend(q, k, v, grid=(5, 5), layer=1, num_prefix_tokens=1)
    ref = dense_reference(q, k, v, dict(PRESETS["lh-45"], global_slope=0.5), (5, 5), 1, 3, 1)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert pe.state_dict() == {}  # derived tables are not saved
    pe.to(torch.float64)  # casting a model keeps the scales exact
    assert pe.plan.scale.dtype == torch.float32 and pe.plan.coef.dtype == torch.int32
    pe.to("meta")  # a config replaced after a move builds its plan on the model's device
    pe.config = pe.config.replace(global_slope=0.25)
    assert pe.config.global_slope == 0.25
    assert pe.plan.scale.device.type == "meta" and pe.plan.coef.device.type == "meta"


@pytest.mark.parametrize("preset", list(PRESETS))
def test_slab_gradients_equal_the_dense_paths(preset):
    plan = AttentionPlan(preset, 2, 12)
    grid = (7, 9)
    q, k, v = torch.randn(3, 2, 12, 1 + 63, 16, dtype=torch.float64).unbind(0)
    grads = []
    for backend in ("dense", "slab"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attend(*leaves, plan, layer=1, grid_size=grid, backend=backend)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
        grads.append([t.grad for t in leaves])
    for dense, slab in zip(*grads):
        torch.testing.assert_close(slab, dense, rtol=1e-9, atol=1e-10)


def test_lookhere_encoding_refuses_an_unknown_backend_when_built():
    from lookhere.position import LookHere

    with pytest.raises(ValueError, match="backend='fast'; allowed: auto, dense, slab, flex"):
        LookHere("lh-90", depth=2, num_heads=12, backend="fast")


def test_plan_cache_keeps_to_its_budget(monkeypatch):
    plan = AttentionPlan("lh-45", 2, 12)
    q = torch.randn(1, 12, 1 + 24 * 24, 8)
    attend(q, q, q, plan, layer=0, grid_size=(24, 24), backend="slab")
    one_grid = plan.cached_bytes()
    assert one_grid > 0
    monkeypatch.setattr(AttentionPlan, "CACHE_BYTES", one_grid + one_grid // 2)
    q2 = torch.randn(1, 12, 1 + 24 * 25, 8)
    out = attend(q2, q2, q2, plan, layer=1, grid_size=(24, 25), backend="slab")
    assert plan.cached_bytes() <= one_grid + one_grid // 2
    torch.testing.assert_close(out.double(), dense_reference(q2, q2, q2, "lh-45", (24, 25), 1, 2, 1),
                               rtol=1e-5, atol=1e-5)
