"""FIRE, PaPE and RoPE-DINOv3: formulas against direct float64 computations, translation
equivariance, FIRE's test-time knob, DINOv3's training-time augmentation, and bad options."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3

from lookhere import create_vit
from lookhere.evaluate import apply_knobs, knob_grid
from lookhere.position import build_position_encoding

from conftest import TRAIN_GRID, pattern_output, encoding, small

NEW = ["fire", "pape", "rope-2d-dinov3"]


def test_registered_in_timm():
    for size in ["tiny", "small", "base"]:
        for name in ["fire", "pape", "rope_2d_dinov3"]:
            assert f"vit_{size}_patch16_pe_{name}" in timm.list_models(f"vit_{size}_patch16_pe_*")
    model = timm.create_model("vit_tiny_patch16_pe_fire", num_classes=3, img_size=64).eval()
    assert model.pos_encoding.name == "fire" and model(torch.randn(1, 3, 96, 48)).shape == (1, 3)


# --- FIRE --------------------------------------------------------------------------------------------
def fire_reference(pe, grid, layer, extent_grid):
    """The bias from the definition, pair by pair, in float64."""
    c = abs(pe.c[layer].item())
    threshold = abs(pe.threshold_scale[layer].item() * pe.init_threshold.item())
    mlp = pe.mlp[layer].double()
    psi = lambda r: math.log(c * r + 1)  # noqa: E731
    n = grid[0] * grid[1]
    out = torch.empty(12, n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            offsets = (j // grid[1] - i // grid[1], j % grid[1] - i % grid[1])
            phi = [math.copysign(psi(abs(d)), d) / (psi(max(e - 1, threshold)) + 1e-6)
                   for d, e in zip(offsets, extent_grid)]
            out[:, i, j] = mlp(torch.tensor(phi, dtype=torch.float64))
    pe.mlp[layer].float()
    return out


@pytest.mark.parametrize("normalize", ["test", "train"])
def test_fire_bias_matches_its_definition(normalize):
    torch.manual_seed(0)
    pe = encoding("fire", normalize=normalize)
    with torch.no_grad():  # leave the initial values, so that the test exercises c, L and the MLP
        pe.c.copy_(torch.tensor([0.7, -1.3]))
        pe.threshold_scale.copy_(torch.tensor([2.0, 9.0]))  # L = 1.5 and 6.75 (above the 2x5 grid's extents)
    grid = (2, 5)
    for layer in range(2):
        ref = fire_reference(pe, grid, layer, grid if normalize == "test" else TRAIN_GRID)
        torch.testing.assert_close(pe.bias(grid, layer).double(), ref, atol=1e-5, rtol=1e-5)


def test_fire_offsets_stay_within_one_normalised_by_the_test_grid():
    pe = encoding("fire")
    with torch.no_grad():
        pe.threshold_scale.zero_()  # no threshold: the grid's extent is the normaliser
    grid = (5, 9)
    mlp_inputs = []
    hook = pe.mlp[0][0].register_forward_hook(lambda m, args, out: mlp_inputs.append(args[0]))
    pe.bias(grid, 0)
    pe.normalize = "train"
    pe.bias(grid, 0)
    hook.remove()
    test_inputs, train_inputs = mlp_inputs
    torch.testing.assert_close(test_inputs.abs().amax(dim=(0, 1)), torch.ones(2))  # corners reach exactly 1
    c = 0.1
    expected = torch.tensor([math.log(4 * c + 1) / math.log(3 * c + 1), math.log(8 * c + 1) / math.log(3 * c + 1)])
    torch.testing.assert_close(train_inputs.abs().amax(dim=(0, 1)), expected)  # beyond 1: 4 and 8 rows/columns away


@pytest.mark.parametrize("knob", ["test", "train"])
def test_fire_knob_changes_a_larger_grid_and_not_the_training_grid(knob):
    torch.manual_seed(0)
    model = small("fire").eval()
    other = "train" if knob == "test" else "test"
    for size, changes in [((32, 32), False), ((64, 48), True)]:
        x = torch.randn(2, 3, *size)
        apply_knobs(model, fire_normalize=knob)
        with torch.no_grad():
            a = model.forward_features(x)
            apply_knobs(model, fire_normalize=other)
            b = model.forward_features(x)
        assert (a - b).abs().max() > 1e-4 if changes else torch.equal(a, b), size
    apply_knobs(model, fire_normalize=knob)
    assert knob_grid(model) == [{"fire_normalize": knob}, {"fire_normalize": other}]


def test_fire_bad_settings_are_refused():
    with pytest.raises(ValueError, match="fire normalize='grid'; allowed: test, train"):
        small("fire", pos_options={"normalize": "grid"})
    model = small("fire")
    with pytest.raises(ValueError, match="fire_normalize='grid'; allowed: test, train"):
        apply_knobs(model, fire_normalize="grid")
    with pytest.raises(ValueError, match="fire_normalize applies to FIRE models, not pape"):
        apply_knobs(small("pape"), fire_normalize="train")
    with pytest.raises(ValueError, match="allowed: width, init_c, init_threshold, normalize"):
        small("fire", pos_options={"normalise": "train"})


# --- PaPE --------------------------------------------------------------------------------------------
def pape_reference(pe, q, k, v, grid, layer, p, scale=(1.0, 1.0)):
    """softmax(q k / sqrt(D) + sum_r (-a d^2 + b d) / sqrt(D)) v in float64, pair by pair for the bias;
    positions (row, column) times ``scale``."""
    B, H, T, D = q.shape
    P = pe.parabolas
    q, k, v = q.double(), k.double(), v.double()
    w = pe.direction[layer].weight.double().view(H, P, 2)
    shape = pe.shape[layer].weight.double()
    bias = torch.zeros(B, H, T, T, dtype=torch.float64)
    for bi in range(B):
        for i in range(p, T):
            ab = (shape @ q[bi, :, i].reshape(H * D)).view(2, H, P)
            a, b = F.softplus(ab[0]), ab[1]
            yi, xi = divmod(i - p, grid[1])
            for j in range(p, T):
                yj, xj = divmod(j - p, grid[1])
                d = w @ torch.tensor([(yi - yj) * scale[0], (xi - xj) * scale[1]], dtype=torch.float64)  # (H, P)
                bias[bi, :, i, j] = (-a * d * d + b * d).sum(-1)
    scores = (q @ k.transpose(-1, -2) + bias) / math.sqrt(D)
    return scores.softmax(-1), scores.softmax(-1) @ v


def test_pape_attention_matches_its_definition():
    torch.manual_seed(0)
    pe = build_position_encoding("pape", embed_dim=48, num_heads=12, depth=2, grid_size=TRAIN_GRID, parabolas=3)
    grid, p = (3, 4), 1
    q, k, v = torch.randn(3, 2, 12, p + 12, 4).unbind(0)
    weights, out = pape_reference(pe, q, k, v, grid, 1, p)
    with torch.no_grad():
        torch.testing.assert_close(pe.attend(q, k, v, grid=grid, layer=1, num_prefix_tokens=p).double(), out,
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pe.attention_weights(q, k, grid=grid, layer=1, num_prefix_tokens=p).double(),
                                   weights, atol=1e-6, rtol=1e-5)


def test_pape_interpolation_squeezes_offsets_into_the_training_range():
    """With its knob on, a 7x5 grid's offsets are those of the grid squeezed into the 4x4 training
    grid's range (rows times 3/6, columns times 3/4)."""
    torch.manual_seed(0)
    pe = build_position_encoding("pape", embed_dim=48, num_heads=12, depth=2, grid_size=TRAIN_GRID, parabolas=3,
                                 interpolate=True)
    grid, p = (7, 5), 1
    q, k, v = torch.randn(3, 1, 12, p + 35, 4).unbind(0)
    weights, out = pape_reference(pe, q, k, v, grid, 0, p, scale=(3 / 6, 3 / 4))
    with torch.no_grad():
        torch.testing.assert_close(pe.attend(q, k, v, grid=grid, layer=0, num_prefix_tokens=p).double(), out,
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pe.attention_weights(q, k, grid=grid, layer=0, num_prefix_tokens=p).double(),
                                   weights, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("parabolas", [1, 3, 50])
def test_pape_runs_the_cpus_fused_kernel_and_its_gradients_are_the_definitions(parabolas):
    """However many parabolas, 6 extra features a head, and the values padded to the queries' width:
    the CPU's flash kernel runs (the math path would build every score: 51 GB for a batch of 64 on a
    64x64 grid), and the gradients through it are those of the float64 definition."""
    from torch.profiler import profile

    torch.manual_seed(0)
    pe = build_position_encoding("pape", embed_dim=48, num_heads=12, depth=2, grid_size=TRAIN_GRID,
                                 parabolas=parabolas)
    grid, p = (3, 4), 1
    q, k, v = torch.randn(3, 2, 12, p + 12, 4).unbind(0)
    qf, kf = pe.features(q, grid, 1, p)
    assert qf.shape == (2, 12, p + 12, 6) and kf.shape == (1, 12, p + 12, 6)
    q.requires_grad_(True)
    with profile() as prof:
        got = pe.attend(q, k, v, grid=grid, layer=1, num_prefix_tokens=p)
    kernels = {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in kernels, kernels
    assert not any("math" in name for name in kernels), kernels
    q64 = q.detach().double().requires_grad_(True)
    _, out = pape_reference(pe, q64, k, v, grid, 1, p)
    torch.testing.assert_close(got.double(), out, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    out.sum().backward()
    torch.testing.assert_close(q.grad.double(), q64.grad, atol=1e-5, rtol=1e-5)


def test_pape_stays_exact_under_autocast_on_a_large_grid():
    torch.manual_seed(0)
    pe = encoding("pape")
    grid = (24, 30)  # coordinates far from the training grid's: the expanded square must not cancel badly
    q, k, v = torch.randn(3, 1, 12, 1 + 24 * 30, 4).unbind(0)
    with torch.no_grad():
        exact = pe.attend(q, k, v, grid=grid, layer=0, num_prefix_tokens=1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = pe.attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), grid=grid, layer=0, num_prefix_tokens=1)
        rounded = [t.bfloat16().float() for t in (q, k, v)]
        ideal = pe.attend(*rounded, grid=grid, layer=0, num_prefix_tokens=1).bfloat16()
    assert low.dtype == torch.bfloat16
    # Only the inputs' and the output's rounding to bfloat16 remain: the float32 computation on the
    # rounded inputs, rounded, exactly.
    torch.testing.assert_close(low, ideal, rtol=0, atol=0)
    assert (low.float() - exact).abs().max() < 0.05


# --- translation equivariance ------------------------------------------------------------------------
@pytest.mark.parametrize("name,options", [("pape", {}), ("fire", {"normalize": "train"})])
def test_equivariant_across_grids(name, options):
    pe = encoding(name, **options).eval()
    torch.testing.assert_close(pattern_output(pe, (6, 6), (1, 1)), pattern_output(pe, (8, 11), (4, 6)),
                               rtol=1e-4, atol=1e-5)


def test_fire_is_equivariant_within_a_grid_and_depends_on_its_size():
    """Normalised by the test grid, FIRE's bias depends on the grid's extent, and within one grid only on offsets."""
    pe = encoding("fire").eval()
    a = pattern_output(pe, (8, 11), (1, 1))
    torch.testing.assert_close(a, pattern_output(pe, (8, 11), (4, 6)), rtol=1e-4, atol=1e-5)
    assert (a - pattern_output(pe, (6, 6), (1, 1))).abs().max() > 1e-3


def test_dinov3_scores_depend_on_the_offset_within_a_grid_and_on_the_grid_size():
    pe = encoding("rope-2d-dinov3").eval()
    qv, kv = torch.randn(2, 1, 12, 1, 4).unbind(0)

    def score(grid, qpos, kpos):
        n = grid[0] * grid[1]
        rq, rk = pe.rotate(qv.expand(-1, -1, n, -1), kv.expand(-1, -1, n, -1), grid=grid, layer=0, num_prefix_tokens=0)
        return (rq[:, :, qpos] * rk[:, :, kpos]).sum(-1)

    grid = (9, 9)
    for (qa, ka), shift in [((0, 10), 30), ((40, 12), 2), ((5, 5), 70)]:
        torch.testing.assert_close(score(grid, qa, ka), score(grid, qa + shift, ka + shift), atol=1e-5, rtol=1e-5)
    # The same patch offset (one column) is a smaller normalised offset on a larger grid.
    assert not torch.allclose(score((9, 9), 0, 1), score((5, 5), 0, 1), atol=1e-3)


# --- RoPE-DINOv3 -------------------------------------------------------------------------------------
def test_dinov3_rotation_matches_timm_and_its_definition():
    pe = build_position_encoding("rope-2d-dinov3", embed_dim=96, num_heads=12, depth=2, grid_size=TRAIN_GRID).eval()
    grid = (3, 5)
    ref = RotaryEmbeddingDinoV3(8, temperature=100.0, rotate_half=True).eval()
    torch.testing.assert_close(pe.rotary(grid), ref.get_embed([3, 5]), rtol=0, atol=0)
    # Definition: centres normalised per axis to [-1, 1]; periods 100 ** (4k / 8), k = 0, 1; channel j and
    # j + 4 turn together by 2 pi c / period, j = (y, k=0), (y, k=1), (x, k=0), (x, k=1).
    q = torch.randn(1, 12, 15, 8, dtype=torch.float64)
    got, _ = pe.rotate(q.float(), q.float(), grid=grid, layer=0, num_prefix_tokens=0)
    for i in range(15):
        cy, cx = ((i // 5 + 0.5) / 3) * 2 - 1, ((i % 5 + 0.5) / 5) * 2 - 1
        angles = [2 * math.pi * c / 100 ** (4 * kk / 8) for c in (cy, cx) for kk in range(2)]
        for j, angle in enumerate(angles):
            z = torch.complex(q[..., i, j], q[..., i, j + 4]) * complex(math.cos(angle), math.sin(angle))
            torch.testing.assert_close(got[..., i, j].double(), z.real, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(got[..., i, j + 4].double(), z.imag, atol=1e-6, rtol=1e-6)


def test_dinov3_augments_coordinates_once_per_training_forward():
    torch.manual_seed(0)
    model = small("rope-2d-dinov3", pos_options={"shift_coords": 0.5, "jitter_coords": 2.0, "rescale_coords": 2.0})
    pe = model.pos_encoding
    x = torch.randn(1, 3, 32, 40)
    seen = []  # the rotation each layer's attention receives
    original = pe.attend
    pe.attend = lambda *a, state=None, **kw: seen.append(state) or original(*a, state=state, **kw)
    model.train()
    model(x)
    model(x)
    assert len(seen) == 4  # two layers, two forwards
    assert seen[0] is seen[1] and seen[2] is seen[3]  # one draw per forward, handed to every layer...
    assert not torch.allclose(seen[0], seen[2])  # ... and a new one the next forward
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
        ref = RotaryEmbeddingDinoV3(4, temperature=100.0, rotate_half=True).eval().get_embed([4, 5])
    torch.testing.assert_close(seen[-1], ref, rtol=0, atol=0)  # eval: the plain normalised coordinates


def test_dinov3_bad_options_are_refused():
    with pytest.raises(ValueError, match="jitter_coords must be finite and >= 1"):
        small("rope-2d-dinov3", pos_options={"jitter_coords": 0.5})
    with pytest.raises(ValueError, match="allowed: temperature, shift_coords, jitter_coords, rescale_coords"):
        small("rope-2d-dinov3", pos_options={"interpolate": True})
    with pytest.raises(ValueError, match="head dim divisible by 4"):
        create_vit("rope-2d-dinov3", img_size=32, patch_size=8, embed_dim=36, depth=1, num_heads=6)
    assert knob_grid(small("rope-2d-dinov3")) == []


def test_eval_has_a_flag_for_the_fire_knob(capsys):
    from lookhere.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["eval", "--checkpoint", "run", "--sizes", "32", "--fire-normalize", "train"])
    assert args.fire_normalize == "train"
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["eval", "--checkpoint", "run", "--sizes", "32", "--fire-normalize", "grid"])
    assert exit_info.value.code == 2 and "--fire-normalize: invalid choice: 'grid'" in capsys.readouterr().err


def test_eval_has_a_flag_for_each_interpolation_knob():
    from lookhere.cli import build_parser

    parser = build_parser()
    base = ["eval", "--checkpoint", "run", "--sizes", "32"]
    for family in ("rope", "sincos", "fourier", "rpe", "alibi", "pape"):
        assert getattr(parser.parse_args([*base, f"--{family}-interpolate"]), f"{family}_interpolate") is True
        assert getattr(parser.parse_args([*base, f"--no-{family}-interpolate"]), f"{family}_interpolate") is False
        assert getattr(parser.parse_args(base), f"{family}_interpolate") is None
