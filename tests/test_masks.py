import json

import numpy as np
import pytest
import torch
import yaml

from lookhere import PRESETS, LookHereConfig, dense_bias
from lookhere.config import GROUPS

from spec_reference import bias as reference_bias


def test_golden_cases_match(golden_file):
    data = np.load(golden_file)
    meta = json.loads(str(data["__meta__"]))
    assert meta, "golden file holds no cases"
    for case, m in meta.items():
        got = dense_bias(m["config"], tuple(m["grid"]), m["depth"], m["num_heads"]).numpy()
        masked = np.isneginf(got)
        np.testing.assert_array_equal(masked, data[f"{case}__masked"], err_msg=case)
        np.testing.assert_allclose(np.where(masked, 0.0, got), data[f"{case}__values"], atol=1e-5, rtol=0,
                                   err_msg=case)


def _cases():
    # Every named group, alone (4 heads) and with the other head-count rules.
    for name in GROUPS:
        yield {"global_slope": 1.3, "layer_slopes": [1.5, 0.5], "head_directions": name}, (4, 5), 2, 4
    yield {"global_slope": 1.0, "layer_slopes": [1.0, 0.25], "head_directions": "halves"}, (3, 4), 3, 12
    yield {"global_slope": 0.7, "layer_slopes": [2.0, 1.0], "head_directions": "corners-zero"}, (4, 3), 1, 6
    yield {"global_slope": 1.0, "layer_slopes": [1.0, 1.0], "head_directions": "triangles-none"}, (3, 3), 1, 12
    yield {"global_slope": 1.0, "layer_slopes": [1.0, 2.0], "head_directions": "diagonals-center"}, (3, 5), 2, 16
    yield {"global_slope": 0.5, "layer_slopes": [1.0, 1.0], "head_directions": "eighths1-eighths2-zerohalves"}, (4, 4), 1, 16
    yield {"global_slope": 1.0, "layer_slopes": [1.0, 0.5],
           "head_directions": "halves-zerocorners-zerotriangles-none2zero2"}, (3, 4), 2, 16
    yield {"global_slope": 1.0, "layer_slopes": [1.0, 1.0], "head_directions": "none1zero3"}, (2, 3), 1, 8
    yield {"global_slope": 1.0, "layer_slopes": [1.0, 1.0], "head_directions": "none3zero1-corners"}, (2, 3), 1, 6
    for distance in ("linear", "sqrt", "square"):
        for fill in ("inf", "zero", "max"):
            for dirs in ("corners-triangles", "center-eighths1-diagonals"):
                cfg = {"global_slope": 1.0, "layer_slopes": [1.5, 0.5], "head_directions": dirs,
                       "distance": distance, "fill_with": fill}
                yield cfg, (4, 6), 2, 12


@pytest.mark.parametrize("config,grid,depth,heads", list(_cases()))
def test_dense_bias_matches_spec_reference(config, grid, depth, heads):
    got = dense_bias(config, grid, depth, heads)
    assert got.dtype == torch.float32 and got.shape == (depth, heads, grid[0] * grid[1], grid[0] * grid[1])
    ref = torch.tensor(reference_bias(config, grid, depth, heads), dtype=torch.float64)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-6)
    assert torch.equal(torch.isneginf(got), torch.isneginf(ref))


def test_query_always_sees_itself_and_cls_free():
    """A patch sees itself unpenalised; the CLS token sees and is seen by every token, unbiased."""
    from lookhere.position import LookHere

    b = dense_bias("lh-45", (7, 5), 3, 12)
    diag = b.diagonal(dim1=-2, dim2=-1)
    assert torch.all(diag == 0)
    pe = LookHere("lh-45", 3, 12)
    for layer in range(3):
        full = pe.score_bias(grid=(7, 5), layer=layer, num_prefix_tokens=1, device="cpu")
        assert full.shape == (12, 36, 36)
        assert torch.all(full[:, 0, :] == 0) and torch.all(full[:, :, 0] == 0)
        torch.testing.assert_close(full[:, 1:, 1:], b[layer], atol=0, rtol=1e-6)


# The spec's table "The released models", read independently of PRESETS: preset -> its head directions
# and the share of the keys that each group of four heads sees.
RELEASED_MODELS = {
    "lh-180": ("halves-diagonals-none", (1 / 2, 1 / 2, 1.0)),
    "lh-90": ("corners-triangles-none", (1 / 4, 1 / 4, 1.0)),
    "lh-45": ("eighths1-eighths2-none", (1 / 8, 1 / 8, 1.0)),
}


def _released(preset):
    return {"global_slope": 2, "layer_slopes": [1.5, 0.5], "head_directions": RELEASED_MODELS[preset][0]}


@pytest.mark.parametrize("preset", list(RELEASED_MODELS))
def test_presets_are_the_released_models(preset):
    assert set(PRESETS) == set(RELEASED_MODELS)
    assert LookHereConfig.from_dict(PRESETS[preset]) == LookHereConfig.from_dict(_released(preset))
    got = dense_bias(preset, (4, 5), 3, 12)
    ref = torch.tensor(reference_bias(_released(preset), (4, 5), 3, 12), dtype=torch.float64)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-6)
    assert torch.equal(torch.isneginf(got), torch.isneginf(ref))


@pytest.mark.parametrize("preset", list(RELEASED_MODELS))
def test_presets_fields_of_view_and_slopes(preset):
    """From the centre of a large grid: each head sees its share of the keys (the last four heads see
    every key), with bias -(2 * layer slope * head slope * distance), layer slopes 1.5 ... 0.5, head
    slopes 1/2 for the eight directed heads and 1/4, 1/16, 1/64, 1/256 for the unmasked ones."""
    g, depth = 41, 3
    centre = (g // 2) * g + g // 2
    row = dense_bias(preset, (g, g), depth, 12)[:, :, centre].double()  # (layer, head, key)
    seen = torch.isfinite(row)
    shares = [s for s in RELEASED_MODELS[preset][1] for _ in range(4)]
    # Counted with the boundary lines included: r rows from the centre to an edge, the centre's row among them.
    r = g // 2 + 1
    keys = {1 / 2: r * g, 1 / 4: r * r, 1 / 8: r * (r + 1) // 2, 1.0: g * g}  # 861, 441, 231, 1681
    assert seen.sum(-1).tolist() == [[keys[s] for s in shares]] * depth
    ky, kx = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    dist = torch.hypot((ky - g // 2).double(), (kx - g // 2).double()).flatten()
    layer_slopes = torch.tensor([1.5, 1.0, 0.5], dtype=torch.float64)[:, None, None]
    head_slopes = torch.tensor([1 / 2] * 8 + [1 / 4, 1 / 16, 1 / 64, 1 / 256], dtype=torch.float64)[None, :, None]
    expected = -(2 * layer_slopes * head_slopes * dist)
    torch.testing.assert_close(row[seen], expected.expand_as(row)[seen], atol=0, rtol=1e-6)


def test_golden_released_case_is_the_lh90_preset(golden_file):
    data = np.load(golden_file)
    meta = json.loads(str(data["__meta__"]))
    lh90 = LookHereConfig.from_dict(PRESETS["lh-90"])
    cases = [c for c, m in meta.items() if LookHereConfig.from_dict(m["config"]) == lh90]
    assert cases, f"no golden case holds the released LH-90 config; cases: {sorted(meta)}"
    for case in cases:
        m = meta[case]
        got = dense_bias("lh-90", tuple(m["grid"]), m["depth"], m["num_heads"]).numpy()
        np.testing.assert_array_equal(np.isneginf(got), data[f"{case}__masked"], err_msg=case)
        np.testing.assert_allclose(np.where(np.isneginf(got), 0.0, got), data[f"{case}__values"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_bias_is_translation_equivariant_and_extrapolates(preset):
    """Bias between two patches depends only on their offset, on any grid size or aspect ratio."""
    small = dense_bias(preset, (4, 4), 2, 12)
    for big_grid, (oy, ox) in [((9, 9), (3, 2)), ((6, 11), (1, 6))]:
        big = dense_bias(preset, big_grid, 2, 12)
        idx = torch.tensor([(y + oy) * big_grid[1] + (x + ox) for y in range(4) for x in range(4)])
        torch.testing.assert_close(big[:, :, idx][:, :, :, idx], small, atol=0, rtol=0)


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"head_directions": "halves-bogus"}, "head_directions"),
        ({"global_slope": -1.0}, "global_slope"),
        ({"layer_slopes": [1.0, -0.5]}, "layer_slopes"),
        ({"layer_slopes": [1.0]}, "layer_slopes"),
        ({"distance": "manhattan"}, "distance"),
        ({"fill_with": "nan"}, "fill_with"),
        ({"head_slope": 1.0}, "key"),
        # an infinite slope times the zero self-distance is NaN: every softmax row would be NaN
        ({"global_slope": float("inf")}, "global_slope"),
        ({"global_slope": "1e999"}, "global_slope"),
        ({"layer_slopes": [float("inf"), 0.5]}, "layer_slopes"),
        # not numbers: named, not a bare TypeError from float()
        ({"global_slope": None}, "global_slope"),
        ({"global_slope": "two"}, "global_slope"),
        ({"global_slope": True}, "global_slope"),
        ({"global_slope": [2.0]}, "global_slope"),
        ({"layer_slopes": [1.5, None]}, "layer_slopes"),
        ({"layer_slopes": ["x", 0.5]}, "layer_slopes"),
        ({"layer_slopes": [True, 0.5]}, "layer_slopes"),
    ],
)
def test_bad_config_names_the_field(changes, field):
    cfg = dict(PRESETS["lh-90"], **changes)
    with pytest.raises(ValueError, match=field) as err:
        dense_bias(cfg, (4, 4), 2, 12)
    assert "allowed" in str(err.value)


@pytest.mark.parametrize("heads,dirs", [(10, "halves"), (8, "halves-corners"), (12, "halves-corners-triangles-diagonals"), (5, "halves")])
def test_head_count_without_rule_is_an_error(heads, dirs):
    with pytest.raises(ValueError, match="num_heads") as err:
        dense_bias({"global_slope": 1, "layer_slopes": [1, 1], "head_directions": dirs}, (3, 3), 1, heads)
    assert "allowed" in str(err.value)


@pytest.mark.parametrize("grid", [(0, 4), (4, 0), (-1, 2)])
def test_empty_grid_is_an_error(grid):
    with pytest.raises(ValueError, match="grid_size"):
        dense_bias("lh-90", grid, 1, 12)


def test_config_round_trips_through_json_and_yaml():
    cfg = LookHereConfig.from_dict(dict(PRESETS["lh-45"], distance="sqrt", fill_with="max"))
    assert LookHereConfig.from_dict(json.loads(cfg.to_json())) == cfg
    assert LookHereConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg
    per_layer = LookHereConfig.from_dict({"global_slope": 1, "layer_slopes": [1, 1],
                                          "head_directions": ["halves", "corners"]})
    assert LookHereConfig.from_dict(json.loads(per_layer.to_json())) == per_layer


def test_per_layer_head_directions():
    cfg = {"global_slope": 1.0, "layer_slopes": [1.0, 0.5], "head_directions": ["halves", "triangles"]}
    b = dense_bias(cfg, (3, 4), 2, 4)
    torch.testing.assert_close(b[0], dense_bias(dict(cfg, head_directions="halves"), (3, 4), 2, 4)[0])
    torch.testing.assert_close(b[1], dense_bias(dict(cfg, head_directions="triangles"), (3, 4), 2, 4)[1])
    with pytest.raises(ValueError, match="one name string per layer"):
        dense_bias(cfg, (3, 4), 3, 4)


def test_half_plane_form_equals_the_primitives():
    """Each primitive's half-planes see exactly the keys the spec's predicate sees."""
    from lookhere.attention.geometry import CONSTRAINTS

    from spec_reference import SEES

    assert set(CONSTRAINTS) == set(SEES)
    dy, dx = torch.meshgrid(torch.arange(-9, 10), torch.arange(-9, 10), indexing="ij")
    for name, see in SEES.items():
        by_planes = torch.ones_like(dy, dtype=torch.bool)
        for a, b in CONSTRAINTS[name]:
            by_planes &= a * dy + b * dx >= 0
        # SEES takes (qy, qx, ky, kx): the query at the origin, the key at the offset.
        expected = torch.tensor([[see(0, 0, int(y), int(x)) for y, x in zip(ry, rx)] for ry, rx in zip(dy, dx)])
        assert torch.equal(by_planes, expected), name


def test_six_heads_in_one_unmasked_group_are_refused():
    # 'none-none' on 6 heads is one group of six 'none' heads, for which the slope rule has no values:
    # refused when the model is built, not with a broadcast error in its forward pass.
    from lookhere.position import LookHere

    cfg = {"global_slope": 1, "layer_slopes": [1, 1], "head_directions": "none-none"}
    with pytest.raises(ValueError, match="6 consecutive heads") as err:
        LookHere(cfg, depth=2, num_heads=6)
    assert "head_directions='none-none'" in str(err.value)
    with pytest.raises(ValueError, match="6 consecutive heads"):
        dense_bias(cfg, (3, 3), 1, 6)


def test_six_head_groups_that_exist_are_built():
    # Two different names: the first's four heads and the second's first two, each with its own slopes.
    cfg = {"global_slope": 1, "layer_slopes": [1, 1], "head_directions": "none-zero"}
    b = dense_bias(cfg, (3, 4), 1, 6)
    ref = torch.tensor(reference_bias(cfg, (3, 4), 1, 6), dtype=torch.float64)
    torch.testing.assert_close(b.double(), ref, atol=1e-6, rtol=1e-6)
