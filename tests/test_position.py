import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers.pos_embed_sincos import RotaryEmbeddingMixed, apply_rot_embed_cat

import lookhere
from lookhere import POSITION_ENCODINGS
from lookhere.evaluate import apply_knobs, knob_grid
from lookhere.position import build_position_encoding, encoding_class
from conftest import TRAIN_GRID, encoding, pattern_output, small

RELATIVE = ["rpe-learned", "alibi-2d", "rope-2d-axial", "rope-2d-mixed", "lh-180", "lh-90", "lh-45"]
ABSOLUTE = ["learned-1d", "sincos-2d", "factorized", "fourier"]


def test_every_paper_encoding_is_listed():
    assert set(RELATIVE + ABSOLUTE + ["none"]) <= set(POSITION_ENCODINGS)


@pytest.mark.parametrize("name", list(POSITION_ENCODINGS))
def test_builds_runs_extrapolates_and_is_used(name):
    torch.manual_seed(0)
    base = small("none")
    model = small(name)
    missing = model.load_state_dict(base.state_dict(), strict=False)
    assert not missing.unexpected_keys and all(k.startswith("pos_encoding.") for k in missing.missing_keys)
    for size in [(32, 32), (64, 64), (128, 128), (32, 72)]:
        x = torch.randn(2, 3, *size)
        out = model(x)
        assert out.shape == (2, 5) and torch.isfinite(out).all(), size
        out.sum().backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), size
        model.zero_grad()
        if name != "none":
            with torch.no_grad():
                diff = (model.forward_features(x) - base.forward_features(x)).abs().max()
                assert diff > 1e-4, f"{name} is not used at {size}"


@pytest.mark.parametrize("name", RELATIVE)
def test_relative_encodings_are_translation_equivariant(name):
    pe = encoding(name)
    a = pattern_output(pe, (6, 6), (1, 1))
    b = pattern_output(pe, (8, 11), (4, 6))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ABSOLUTE)
def test_absolute_encodings_are_not(name):
    pe = encoding(name)
    a = pattern_output(pe, (6, 6), (1, 1))
    b = pattern_output(pe, (8, 11), (4, 6))
    assert (a - b).abs().max() > 1e-3


def test_learned_grid_interpolation_keeps_training_patches_at_their_squeezed_coordinates():
    # A 4x4 table read on a 7x7 grid: patch (2i, 2j) sits exactly on training patch (i, j).
    pe = encoding("learned-1d", resample="grid")
    table = pe.pos_embed.reshape(4, 4, 48)
    out = pe.table((7, 7)).reshape(7, 7, 48)
    torch.testing.assert_close(out[::2, ::2], table, rtol=0, atol=1e-6)
    assert (out[1::2, 1::2] - table[:3, :3]).abs().max() > 1e-3  # in-between patches are new values
    assert torch.equal(pe.table(TRAIN_GRID), pe.pos_embed)
    assert (pe.table((7, 7)) - encoding("learned-1d").table((7, 7))).abs().max() > 1e-3  # not bicubic resizing
    pe.resample = "nearest"
    with pytest.raises(ValueError, match="resample='nearest'; allowed: bicubic, grid"):
        pe.table((7, 7))


def test_resampling_is_identity_at_training_grid_and_bicubic_elsewhere():
    # timm.layers.resample_abs_pos_embed is the function used; checked against torch's bicubic here.
    pe = encoding("learned-1d")
    assert torch.equal(pe.table(TRAIN_GRID), pe.pos_embed)
    table = pe.pos_embed.reshape(1, 4, 4, 48).permute(0, 3, 1, 2)
    ref = F.interpolate(table, size=(8, 6), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, 48, 48)
    torch.testing.assert_close(pe.table((8, 6)), ref)

    fac = encoding("factorized")
    rows, cols = fac.tables(TRAIN_GRID)
    assert torch.equal(rows, fac.row_embed) and torch.equal(cols, fac.col_embed)
    # Upsampling a 1D table: antialiased (PIL-style) cubic convolution, a = -0.5, half-pixel centres,
    # taps outside the table dropped and the weights renormalised.
    rows, cols = fac.tables((8, 2))
    table = fac.row_embed[0].double()

    def cubic(t, a=-0.5):
        t = abs(t)
        return (a + 2) * t**3 - (a + 3) * t**2 + 1 if t <= 1 else a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a if t < 2 else 0.0

    for i in range(8):
        centre = (i + 0.5) * 4 / 8
        taps = [(j, cubic(j + 0.5 - centre)) for j in range(4)]
        ref = sum(w * table[j] for j, w in taps) / sum(w for _, w in taps)
        torch.testing.assert_close(rows[0, i].double(), ref, atol=1e-7, rtol=1e-6)
    assert rows.shape == (1, 8, 48)
    # Downsampling 4 -> 2 is antialiased: the kernel is stretched by the scale, so each output
    # averages all four entries rather than its two nearest.
    assert cols.shape == (1, 2, 48)
    col, scale = fac.col_embed[0].double(), 4 / 2
    for i in range(2):
        centre = (i + 0.5) * scale
        taps = [(j, cubic((j + 0.5 - centre) / scale)) for j in range(4)]
        ref = sum(w * col[j] for j, w in taps) / sum(w for _, w in taps)
        torch.testing.assert_close(cols[0, i].double(), ref, atol=1e-7, rtol=1e-6)
    x = torch.zeros(1, 16, 48)
    emb = fac.embed(x, (4, 4)).reshape(4, 4, 48)
    torch.testing.assert_close(emb[2, 3], fac.row_embed[0, 2] + fac.col_embed[0, 3])


def test_sincos_matches_formula():
    pe = encoding("sincos-2d")
    grid = (3, 5)
    got = pe.embed(torch.zeros(1, 15, 48), grid)[0].double()
    bands = [1.0 / 10000 ** (i / 12) for i in range(12)]
    for i in range(15):
        y, x = divmod(i, 5)
        ref = ([math.sin(y * w) for w in bands] + [math.sin(x * w) for w in bands]
               + [math.cos(y * w) for w in bands] + [math.cos(x * w) for w in bands])
        torch.testing.assert_close(got[i], torch.tensor(ref, dtype=torch.float64), atol=1e-6, rtol=1e-6)


def test_fourier_matches_formula_and_normalises_by_training_grid():
    pe = encoding("fourier")
    grid = (6, 3)
    got = pe.embed(torch.zeros(1, 18, 48), grid)[0]
    W = pe.proj.weight.double()  # (F/2, 2)
    for i in range(18):
        y, x = divmod(i, 3)
        p = torch.tensor([(y + 0.5) / 4, (x + 0.5) / 4], dtype=torch.float64)
        z = 2 * math.pi * (W @ p)
        feats = torch.cat([z.cos(), z.sin()]) / math.sqrt(256)
        ref = pe.mlp.double()(feats)
        pe.mlp.float()
        torch.testing.assert_close(got[i].double(), ref, atol=1e-5, rtol=1e-5)


def test_rpe_bias_indexes_and_clamps_the_table():
    pe = encoding("rpe-learned")
    grid = (3, 7)  # wider than the 4x4 training grid: |dx| up to 6 clamps to 3
    bias = pe.bias(grid, layer=1)
    for qi in range(21):
        for ki in range(21):
            dy = ki // 7 - qi // 7
            dx = ki % 7 - qi % 7
            cy, cx = max(-3, min(3, dy)) + 3, max(-3, min(3, dx)) + 3
            torch.testing.assert_close(bias[:, qi, ki], pe.table[1, :, cy, cx])


def test_alibi_bias_matches_formula():
    pe = encoding("alibi-2d")
    bias = pe.bias((3, 4))
    for h in range(12):
        slope = 2 ** (-8 * (h + 1) / 12)
        for qi in range(12):
            for ki in range(12):
                d = math.hypot(ki // 4 - qi // 4, ki % 4 - qi % 4)
                assert abs(bias[h, qi, ki].item() + slope * d) < 1e-6


@pytest.mark.parametrize("name", ["rope-2d-axial", "rope-2d-mixed"])
def test_rope_scores_depend_only_on_offset(name):
    pe = encoding(name)
    qv, kv = torch.randn(2, 12, 1, 4).unbind(0)
    emb = pe.rotary((9, 9), layer=0)  # (H, N, 2D)

    def score(qpos, kpos):
        rq = apply_rot_embed_cat(qv, emb[:, qpos:qpos + 1])
        rk = apply_rot_embed_cat(kv, emb[:, kpos:kpos + 1])
        return (rq * rk).sum(-1)

    for (qa, ka), shift in [((0, 10), 30), ((40, 12), 2), ((5, 5), 70)]:
        torch.testing.assert_close(score(qa, ka), score(qa + shift, ka + shift), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score(0, 10), score(0, 11), atol=1e-4)


def rotated_pairs(q, coords, mags):
    """q ``(..., N, 4 * len(mags))`` turned in float64 as complex pairs: pair j by ``x * mags[j]``,
    pair ``len(mags) + j`` by ``y * mags[j]``, for the ``(y, x)`` of each token in ``coords``."""
    ref = torch.empty_like(q, dtype=torch.float64)
    for i, (y, x) in enumerate(coords):
        for j, a in enumerate([x * m for m in mags] + [y * m for m in mags]):
            c = torch.complex(q[..., i, 2 * j].double(), q[..., i, 2 * j + 1].double())
            c = c * complex(math.cos(a), math.sin(a))
            ref[..., i, 2 * j], ref[..., i, 2 * j + 1] = c.real, c.imag
    return ref


@pytest.mark.parametrize("theta", [None, 10.0])
def test_rope_axial_matches_complex_rotation(theta):
    """Head dim 8: two frequencies per axis, theta ** (-4j / 8) (theta 100 unless given), so both the
    frequency spacing and theta show in the rotation."""
    options = {} if theta is None else {"theta": theta}
    pe = build_position_encoding("rope-2d-axial", embed_dim=96, num_heads=12, depth=2, grid_size=TRAIN_GRID,
                                 **options)
    q = torch.randn(1, 12, 12, 8)
    got = apply_rot_embed_cat(q, pe.rotary((3, 4), layer=0))
    mags = [(theta or 100.0) ** (-4 * j / 8) for j in range(2)]
    ref = rotated_pairs(q, [divmod(i, 4) for i in range(12)], mags)
    torch.testing.assert_close(got.double(), ref, atol=1e-6, rtol=1e-6)


def test_rope_mixed_matches_timm_rotary_embedding_mixed():
    pe = encoding("rope-2d-mixed")
    ref = RotaryEmbeddingMixed(48, depth=2, num_heads=12, grid_indexing="xy")
    with torch.no_grad():
        ref.freqs.copy_(pe.freqs)
    torch.testing.assert_close(pe.rotary((3, 5), layer=1), ref.get_embed([3, 5])[1])


def test_rope_interpolation_squeezes_into_training_range():
    """With interpolate, a 10x7 grid's patches turn by their row and column squeezed into the 4x4
    training grid's range (times 3/9 and 3/6); at the training grid nothing changes."""
    pe = encoding("rope-2d-axial", interpolate=True)
    y, x = lookhere.position.patch_positions((10, 7), TRAIN_GRID, interpolate=True)
    assert float(y.max()) == pytest.approx(3.0) and float(x.max()) == pytest.approx(3.0)
    torch.testing.assert_close(pe.rotary(TRAIN_GRID, 0), encoding("rope-2d-axial").rotary(TRAIN_GRID, 0))
    q = torch.randn(1, 12, 70, 4)
    squeezed = [(r * 3 / 9, c * 3 / 6) for r, c in (divmod(i, 7) for i in range(70))]
    ref = rotated_pairs(q, squeezed, [1.0])  # head dim 4: one frequency per axis, 1
    torch.testing.assert_close(apply_rot_embed_cat(q, pe.rotary((10, 7), 0)).double(), ref, atol=1e-6, rtol=1e-6)
    plain = apply_rot_embed_cat(q, encoding("rope-2d-axial").rotary((10, 7), 0)).double()
    assert (plain - ref).abs().max() > 0.1


# Encodings whose test-time knob squeezes a larger grid into the training grid's range.
INTERPOLATING = {"sincos-2d": "sincos_interpolate", "fourier": "fourier_interpolate",
                 "rpe-learned": "rpe_interpolate", "alibi-2d": "alibi_interpolate", "pape": "pape_interpolate",
                 "rope-2d-axial": "rope_interpolate", "rope-2d-mixed": "rope_interpolate"}


def test_every_encoding_that_reads_coordinates_has_a_test_time_knob():
    """Each encoding meets a larger grid with a setting of its own to choose on validation; those
    without one have a single way to meet it: resampled tables (factorized), coordinates normalised
    by construction (DINOv3's RoPE), or nothing to adapt (none)."""
    without = {n for n in POSITION_ENCODINGS if not encoding_class(n).test_knobs}
    assert without == {"none", "factorized", "rope-2d-dinov3"}
    for name, key in INTERPOLATING.items():
        assert knob_grid(small(name)) == [{key: False}, {key: True}], name


@pytest.mark.parametrize("name", list(INTERPOLATING))
def test_interpolation_changes_a_larger_grid_and_not_the_training_grid(name):
    torch.manual_seed(0)
    model = small(name).eval()
    key = INTERPOLATING[name]
    for size, changes in [((32, 32), False), ((72, 48), True)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            apply_knobs(model, **{key: False})
            a = model.forward_features(x)
            apply_knobs(model, **{key: True})
            b = model.forward_features(x)
        assert (a - b).abs().max() > 1e-4 if changes else torch.equal(a, b), (name, size)
    assert small(name, pos_options={"interpolate": True}).pos_encoding.interpolate
    with pytest.raises(ValueError, match=f"{key}='yes'; allowed: False, True"):
        apply_knobs(model, **{key: "yes"})


SQUEEZED = [(r * 3 / 9, c * 3 / 6) for r, c in (divmod(i, 7) for i in range(70))]  # a 10x7 grid in the 4x4 range


def test_sincos_interpolation_is_the_formula_at_squeezed_coordinates():
    got = encoding("sincos-2d", interpolate=True).embed(torch.zeros(1, 70, 48), (10, 7))[0].double()
    bands = [1.0 / 10000 ** (i / 12) for i in range(12)]
    for i, (y, x) in enumerate(SQUEEZED):
        ref = ([math.sin(y * w) for w in bands] + [math.sin(x * w) for w in bands]
               + [math.cos(y * w) for w in bands] + [math.cos(x * w) for w in bands])
        torch.testing.assert_close(got[i], torch.tensor(ref, dtype=torch.float64), atol=1e-6, rtol=1e-6)


def test_fourier_interpolation_is_the_formula_at_squeezed_coordinates():
    pe = encoding("fourier", interpolate=True)
    got = pe.embed(torch.zeros(1, 70, 48), (10, 7))[0]
    W = pe.proj.weight.double()
    mlp = pe.mlp.double()
    for i, (y, x) in enumerate(SQUEEZED):
        z = 2 * math.pi * (W @ torch.tensor([(y + 0.5) / 4, (x + 0.5) / 4], dtype=torch.float64))
        ref = mlp(torch.cat([z.cos(), z.sin()]) / math.sqrt(256))
        torch.testing.assert_close(got[i].double(), ref, atol=1e-5, rtol=1e-5)


def test_rpe_interpolation_reads_the_table_bilinearly_at_squeezed_offsets():
    pe = encoding("rpe-learned", interpolate=True)
    bias = pe.bias((10, 7), layer=1, rows=slice(20, 40)).double()
    table = pe.table[1].double()  # (H, 7, 7): offsets -3..3

    def read(fy, fx):  # bilinear, by hand
        y0, x0 = min(int(math.floor(fy)), 5), min(int(math.floor(fx)), 5)
        wy, wx = fy - y0, fx - x0
        return ((1 - wy) * (1 - wx) * table[:, y0, x0] + (1 - wy) * wx * table[:, y0, x0 + 1]
                + wy * (1 - wx) * table[:, y0 + 1, x0] + wy * wx * table[:, y0 + 1, x0 + 1])

    for qi in range(20, 40):
        for ki in range(70):
            (qy, qx), (ky, kx) = SQUEEZED[qi], SQUEEZED[ki]
            torch.testing.assert_close(bias[:, qi - 20, ki], read(ky - qy + 3, kx - qx + 3), atol=1e-6, rtol=1e-5)


def test_alibi_interpolation_measures_distance_in_the_squeezed_grid():
    bias = encoding("alibi-2d", interpolate=True).bias((10, 7))
    for h in (0, 5, 11):
        slope = 2 ** (-8 * (h + 1) / 12)
        for qi in range(0, 70, 7):
            for ki in range(70):
                (qy, qx), (ky, kx) = SQUEEZED[qi], SQUEEZED[ki]
                assert abs(bias[h, qi, ki].item() + slope * math.hypot(ky - qy, kx - qx)) < 1e-6


def test_baselines_in_timm():
    model = timm.create_model("vit_tiny_patch16_pe_rope_2d_mixed", num_classes=3, img_size=64)
    assert model.pos_encoding.name == "rope-2d-mixed"
    assert model(torch.randn(1, 3, 96, 64)).shape == (1, 3)
    assert "vit_small_patch16_pe_learned_1d" in timm.list_models("vit_small_patch16_pe_*")


@pytest.mark.parametrize("name", list(POSITION_ENCODINGS))
def test_unfused_attention_weights_equal_the_fused_path(name):
    """The analysis path (explicit weights) and the fast path compute the same attention."""
    pe = encoding(name).eval()  # training mode would draw new coordinate augmentations per call (dinov3)
    grid, p = (3, 5), 1
    q, k, v = torch.randn(3, 2, 12, p + 15, 4).unbind(0)
    with torch.no_grad():
        fused = pe.attend(q, k, v, grid=grid, layer=1, num_prefix_tokens=p)
        weights = pe.attention_weights(q, k, grid=grid, layer=1, num_prefix_tokens=p)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 12, p + 15))
    torch.testing.assert_close(weights @ v, fused, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["rpe-learned", "alibi-2d", "fire"])
@pytest.mark.parametrize("p", [0, 1, 4])
def test_offset_biases_in_query_chunks_equal_one_call(name, p, monkeypatch):
    """At large grids an offset bias runs on chunks of query rows (bounded memory): same output and
    gradients as the whole bias at once, for a non-square grid and any prefix."""
    from lookhere.position import offset as position

    pe = encoding(name)
    grid = (5, 7)
    q, k, v = torch.randn(3, 2, 12, p + 35, 4, dtype=torch.float64).unbind(0)
    pe = pe.double()
    whole = pe.attend(q, k, v, grid=grid, layer=1, num_prefix_tokens=p)
    params = list(pe.parameters())  # alibi has none
    grads = lambda out: torch.autograd.grad(out.square().sum(), params, allow_unused=True) if params else ()
    whole_grads = grads(whole)
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(position, "chunk_rows", lambda heads, tokens, patches: 8)
    monkeypatch.setattr(position.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    chunked = pe.attend(q, k, v, grid=grid, layer=1, num_prefix_tokens=p)
    assert len(calls) == 5 + (p > 0)  # 35 patches in chunks of 8, and the prefix rows
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)
    weights = pe.attention_weights(q, k, grid=grid, layer=1, num_prefix_tokens=p)  # float32 by design
    torch.testing.assert_close(chunked, weights.double() @ v, rtol=1e-5, atol=1e-5)
    for g, w in zip(grads(chunked), whole_grads, strict=True):
        assert (g is None) == (w is None)  # FIRE: only layer 1's MLP is used
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


# --- each encoding owns its initialisation and its options --------------------------------------
@pytest.mark.parametrize("name", list(POSITION_ENCODINGS))
def test_the_vit_initialisation_leaves_the_encoding_as_it_initialised_itself(name):
    model = small(name)
    before = {k: v.clone() for k, v in model.pos_encoding.state_dict().items()}
    model._init_weights()
    for k, v in model.pos_encoding.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("gamma", [1.0, 4.0])
def test_fourier_frequencies_keep_their_own_scale_in_the_model(gamma):
    torch.manual_seed(0)
    w = small("fourier", pos_options={"gamma": gamma}).pos_encoding.proj.weight  # 256 draws of N(0, 1/gamma^2)
    assert abs(float(w.detach().std()) * gamma - 1.0) < 0.2


@pytest.mark.parametrize("name", list(POSITION_ENCODINGS))
def test_unknown_options_are_refused_with_the_allowed_ones(name):
    from lookhere.position import encoding_options

    with pytest.raises(ValueError, match=rf"\['interpolat'\] are not options of pos_encoding='{name}'; allowed: "):
        small(name, pos_options={"interpolat": True})
    for option in encoding_options(name):
        assert option not in ("embed_dim", "num_heads", "depth", "grid_size", "config", "mixed")


def test_rope_options_are_listed():
    with pytest.raises(ValueError, match="allowed: theta, interpolate"):
        small("rope-2d-axial", pos_options={"interpolat": True})
    pe = small("rope-2d-axial", pos_options={"interpolate": True}).pos_encoding
    assert pe.interpolate
    torch.testing.assert_close(pe.rotary((10, 7), 0), encoding("rope-2d-axial", interpolate=True).rotary((10, 7), 0),
                               rtol=0, atol=0)
    assert (pe.rotary((10, 7), 0) - encoding("rope-2d-axial").rotary((10, 7), 0)).abs().max() > 0.1


def test_a_lookhere_config_must_agree_with_the_encoding_name():
    with pytest.raises(ValueError, match="lookhere_config differs from the preset pos_encoding='lh-180'"):
        small("lh-180", lookhere_config=lookhere.PRESETS["lh-45"])
    with pytest.raises(ValueError, match="pos_encoding='rope-2d-axial' is not LookHere; allowed with: lookhere, lh-180"):
        small("rope-2d-axial", lookhere_config=lookhere.PRESETS["lh-45"])
    same = small("lh-180", lookhere_config=lookhere.PRESETS["lh-180"]).pos_encoding
    assert same.name == "lh-180" and same.config == lookhere.LookHereConfig.from_dict(lookhere.PRESETS["lh-180"])
    own = small("lookhere", lookhere_config=lookhere.PRESETS["lh-45"]).pos_encoding
    assert own.name == "lookhere" and own.config.head_directions == "eighths1-eighths2-none"


def test_a_grid_first_seen_in_inference_mode_still_trains():
    model = small("rope-2d-mixed")
    x = torch.randn(1, 3, 8 * 7, 8 * 5)  # a grid no other test uses: its coordinates are cached here
    with torch.inference_mode():
        model(x)
    model(x).sum().backward()
    assert model.pos_encoding.freqs.grad is not None


# --- torch.fx ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(POSITION_ENCODINGS))
def test_traced_by_timms_fx_feature_extractor(name):
    """A traced model computes what the model does, at sizes other than the traced one, and trains."""
    from timm.models import create_feature_extractor, get_graph_node_names

    torch.manual_seed(0)
    model = small(name, depth=1).eval()
    last = get_graph_node_names(model)[1][-1]
    traced = create_feature_extractor(model, [last])
    for size in [(32, 32), (48, 24)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(traced(x)[last], model(x), rtol=0, atol=0)
    traced.train()
    traced(torch.randn(2, 3, 40, 32))[last].sum().backward()
    missing = [n for n, p in traced.named_parameters() if p.grad is None]
    assert not missing


def test_weight_decay_spares_tables_frequencies_and_scalars_only():
    assert small("fourier").no_weight_decay() == {"cls_token", "pos_encoding.proj.weight"}  # as before
    assert small("fire").no_weight_decay() == {"cls_token", "pos_encoding.c", "pos_encoding.threshold_scale"}
    assert small("pape").no_weight_decay() == {"cls_token"}
    assert small("rpe-learned").no_weight_decay() == {"cls_token", "pos_encoding.table"}
