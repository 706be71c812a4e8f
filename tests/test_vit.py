import json
import math
from pathlib import Path

import pytest
import timm
import torch
import yaml

import lookhere
from lookhere import POSITION_ENCODINGS, ViTConfig, create_vit, load_model, save_model


def tiny(**kw):
    args = dict(pos_encoding="lh-90", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=12,
                num_classes=5, init_values=0.5)
    args.update(kw)
    return create_vit(**args).eval()


@pytest.mark.parametrize("size", [(32, 32), (64, 64), (128, 128), (24, 56), (8, 8)])
def test_any_size_and_aspect_ratio_without_setup(size):
    model = tiny()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = model(x)
        feats = model.forward_features(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    assert feats.shape == (2, 1 + (size[0] // 8) * (size[1] // 8), 48)


def test_model_uses_lookhere_attention():
    """The model's attention equals softmax(qk/sqrt(d) + LookHere bias) v, checked on layer 0."""
    model = tiny()
    x = torch.randn(1, 3, 24, 40)
    with torch.no_grad():
        tokens = torch.cat([model.cls_token, model.patch_embed(x).flatten(1, 2)], 1)
        h = model.blocks[0].norm1(tokens)
        attn = model.blocks[0].attn
        q, k, v = attn.qkv(h).reshape(1, -1, 3, 12, 4).permute(2, 0, 3, 1, 4).double().unbind(0)
        bias = torch.nn.functional.pad(lookhere.dense_bias("lh-90", (3, 5), 2, 12)[0].double(), (1, 0, 1, 0))
        ref = ((q @ k.transpose(-1, -2)) / 2.0 + bias).softmax(-1) @ v
        ref = attn.proj(ref.transpose(1, 2).reshape(1, -1, 48).float())
        got = attn(h, model.pos_encoding, (3, 5), 1)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_clear_errors():
    model = tiny()
    with pytest.raises(ValueError, match=r"30x32.*patch size 8"):
        model(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="3 input channels, got 1"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="pos_encoding"):
        tiny(pos_encoding="bogus")
    with pytest.raises(ValueError, match="num_heads"):
        tiny(num_heads=5, embed_dim=40)
    with pytest.raises(ValueError, match="img_size"):
        tiny(img_size=30)


def test_save_and_load_round_trip(tmp_path):
    model = tiny(lookhere_config={"global_slope": 0.5, "layer_slopes": [1.0, 0.5],
                                  "head_directions": "halves-corners-triangles"}, pos_encoding="lookhere")
    x = torch.randn(2, 3, 40, 24)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert loaded.config == model.config
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]


def test_save_and_load_keep_what_changed_after_construction(tmp_path):
    model = tiny()
    model.reset_classifier(3, global_pool="avg")
    model.pos_encoding.config = model.pos_encoding.config.replace(global_slope=0.5)  # the test-time knob
    x = torch.randn(2, 3, 32, 48)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert (loaded.global_pool, loaded.num_classes, loaded.pos_encoding.config.global_slope) == ("avg", 3, 0.5)
    assert loaded.config == model.config
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    model.reset_classifier(0, global_pool="")  # features of every token, as timm's ViT
    save_model(model, tmp_path / "features")
    with torch.no_grad():
        assert load_model(tmp_path / "features")(x).shape == (2, 1 + 4 * 6, 48)


def test_save_refuses_a_pruned_model(tmp_path):
    model = tiny()
    model.prune_intermediate_layers(indices=[0])  # keeps the first of two blocks
    with pytest.raises(ValueError, match="prune_intermediate_layers"):
        save_model(model, tmp_path)
    assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize("name,knob,value", [
    *((n, "interpolate", True) for n in ("rope-2d-axial", "sincos-2d", "fourier", "rpe-learned", "alibi-2d", "pape")),
    ("learned-1d", "resample", "grid"), ("fire", "normalize", "train"), ("lh-90", "backend", "dense")])
def test_save_and_load_keep_an_encoding_knob(tmp_path, name, knob, value):
    """Every test-time knob an encoding declares survives save and load (as set by ``lookhere eval``)."""
    model = tiny(pos_encoding=name)
    assert knob in model.pos_encoding.knobs
    setattr(model.pos_encoding, knob, value)
    save_model(model, tmp_path)
    assert getattr(load_model(tmp_path).pos_encoding, knob) == value


@pytest.mark.parametrize("schedule,rates", [("uniform", [0.2, 0.2, 0.2, 0.2]), ("linear", [0.0, 0.2 / 3, 0.4 / 3, 0.2])])
def test_drop_path_schedule(schedule, rates):
    model = tiny(depth=4, drop_path_rate=0.2, drop_path_schedule=schedule)
    got = [getattr(getattr(b, f"drop_path{i}"), "drop_prob", 0.0) for b in model.blocks for i in (1, 2)]
    assert got == pytest.approx([r for r in rates for _ in (1, 2)])


def test_drop_path_schedule_defaults_to_uniform_and_refuses_others():
    assert ViTConfig().drop_path_schedule == "uniform"
    with pytest.raises(ValueError, match="drop_path_schedule='cosine'; allowed: uniform .*linear"):
        tiny(drop_path_schedule="cosine")


def test_load_model_puts_the_model_on_map_location(tmp_path):
    save_model(tiny(), tmp_path)
    assert {p.device.type for p in load_model(tmp_path).parameters()} == {"cpu"}
    # "meta" stands in for an accelerator here: a device that is not the one the model is built on
    assert {p.device.type for p in load_model(tmp_path, map_location="meta").parameters()} == {"meta"}


def test_a_failed_save_keeps_the_old_weights_and_config_together(tmp_path, monkeypatch):
    """The config is written after the weights: if it fails, the weights must not have replaced the old ones."""
    old, new = tiny(), tiny()
    torch.nn.init.normal_(new.head.weight)
    save_model(old, tmp_path)
    real = Path.write_text

    def fail_for_the_config(path, *args, **kwargs):
        if path.name.startswith("config.json"):
            raise OSError("disk full")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", fail_for_the_config)
    with pytest.raises(OSError, match="disk full"):
        save_model(new, tmp_path)
    monkeypatch.undo()
    loaded = load_model(tmp_path)
    for (name, a), b in zip(old.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


def test_load_model_failures(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    save_model(tiny(), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="safetensors"):
        load_model(tmp_path)
    save_model(tiny(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, embed_dim=96)))
    with pytest.raises(ValueError, match="do not match"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, colour="blue")))
    with pytest.raises(ValueError, match="colour"):
        load_model(tmp_path)


def test_config_round_trips_yaml_and_json():
    cfg = ViTConfig(img_size=(32, 48), patch_size=8, lookhere_config=lookhere.PRESETS["lh-45"], head_hidden_dim=64)
    assert ViTConfig.from_dict(json.loads(cfg.to_json())) == cfg
    assert ViTConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg


# --- timm's generic model contract -----------------------------------------------------------
NAMES = timm.list_models("*lookhere*")


def test_registered_in_timm():
    assert len(NAMES) == 9
    assert {"vit_base_patch16_lookhere_180", "vit_base_patch16_lookhere_90", "vit_base_patch16_lookhere_45"} <= set(NAMES)
    assert sorted(timm.list_models("*lookhere*", pretrained=True)) == [
        "vit_base_patch16_lookhere_180.in1k", "vit_base_patch16_lookhere_45.in1k", "vit_base_patch16_lookhere_90.in1k"]


@pytest.mark.parametrize("variant", ["180", "90", "45"])
def test_released_variants_load_from_the_hub_and_evaluate_as_the_paper(variant):
    name = f"vit_base_patch16_lookhere_{variant}.in1k"
    cfg = timm.models.get_pretrained_cfg(name).to_dict()
    assert (cfg["hf_hub_id"], cfg["hf_hub_filename"]) == ("antofuller/LookHere", f"LH_{variant}_weights_and_config.pth")
    assert (cfg["input_size"], cfg["crop_pct"], cfg["crop_mode"], cfg["interpolation"]) == (
        (3, 224, 224), 0.875, "center", "bicubic")
    assert (cfg["mean"], cfg["std"]) == (timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD)
    model = timm.create_model(name, embed_dim=48, depth=2)  # narrow: only its encoding is looked at
    assert model.pos_encoding.config == lookhere.LookHereConfig.from_dict(lookhere.PRESETS[f"lh-{variant}"])


def test_layerscale_and_the_mlp_head_turn_off_through_timm():
    """timm.create_model drops keyword arguments that are None: 0 is how a user turns these off."""
    model = timm.create_model("vit_tiny_patch16_lookhere_90", embed_dim=48, depth=1, init_values=0, head_hidden_dim=0)
    assert isinstance(model.blocks[0].ls1, torch.nn.Identity) and isinstance(model.blocks[0].ls2, torch.nn.Identity)
    assert isinstance(model.head, torch.nn.Linear) and model.head_hidden_size == 48


def test_released_architecture():
    model = timm.create_model("vit_base_patch16_lookhere_90.in1k", pretrained=False)
    assert (model.embed_dim, len(model.blocks), model.patch_size, model.blocks[0].attn.num_heads) == (768, 12, 16, 12)
    head = model.head
    assert (head.fc1.in_features, head.fc1.out_features, head.fc2.out_features) == (768, 3072, 1000)
    assert isinstance(head.act, torch.nn.Tanh)
    assert torch.all(head.fc2.weight == 0) and torch.allclose(head.fc2.bias, torch.full((1000,), -math.log(1000)))
    assert model.pretrained_cfg["classifier"] + ".weight" in model.state_dict()
    for block in model.blocks:
        assert torch.all(block.ls1.gamma == 1e-4) and torch.all(block.ls2.gamma == 1e-4)
        assert block.drop_path1.drop_prob == block.drop_path2.drop_prob == 0.1


def test_a_new_released_head_starts_as_the_first_did():
    cfg = ViTConfig(pos_encoding="lookhere", img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=4,
                    head_hidden_dim=64, weight_init="timm",
                    lookhere_config={"head_directions": "halves", "global_slope": 2.0, "layer_slopes": [1.0, 1.0]})
    model = create_vit(**cfg.to_dict())
    head = model.head
    assert torch.all(head.fc2.weight == 0) and torch.allclose(head.fc2.bias, torch.full((1000,), -math.log(1000)))
    assert head.fc1.weight.std() < 0.03 and torch.all(head.fc1.bias == 0)  # trunc_normal(0.02), not nn.Linear's
    fc1 = head.fc1.weight.clone()
    model.reset_classifier(7)  # a new classifier (fc2), after the pre-logits stage (fc1 -> tanh) it keeps
    assert model.head is head and torch.equal(head.fc1.weight, fc1)
    assert torch.all(head.fc2.weight == 0) and torch.allclose(head.fc2.bias, torch.full((7,), -math.log(7)))
    assert model.get_classifier() is head.fc2 and model.head_hidden_size == 64


@pytest.mark.parametrize("head_hidden_dim", [None, 64])
def test_a_new_head_takes_the_models_dtype_and_mode(head_hidden_dim):
    model = tiny(head_hidden_dim=head_hidden_dim).double().eval()
    model.reset_classifier(5)
    assert model.get_classifier().weight.dtype == torch.float64 and not model.get_classifier().training
    x = torch.randn(2, 3, 16, 24, dtype=torch.float64)
    assert model(x).shape == (2, 5)
    model.train().reset_classifier(3)
    assert model.get_classifier().training and model(x).dtype == torch.float64


def test_layer_decay_groups_an_encodings_per_block_modules_with_their_block():
    from timm.optim import param_groups_layer_decay

    for pe, per_block in (("fire", "mlp"), ("pape", "direction")):
        model = tiny(pos_encoding=pe, depth=3)
        groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.5)
        scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
        params = dict(model.named_parameters())
        for i in range(3):
            assert scale[id(params[f"pos_encoding.{per_block}.{i}.0.weight" if pe == "fire" else
                                f"pos_encoding.{per_block}.{i}.weight"])] == scale[id(params[f"blocks.{i}.attn.qkv.weight"])]
        assert scale[id(params["patch_embed.proj.weight"])] < scale[id(params["blocks.0.attn.qkv.weight"])]
    model = tiny(pos_encoding="fourier", depth=3)  # its MLP's layers are not blocks: it stays with the stem
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.5)
    stem = next(g for g in groups if any(p is model.patch_embed.proj.weight for p in g["params"]))
    assert any(p is model.pos_encoding.mlp[2].weight for p in stem["params"])


@pytest.mark.parametrize("name", ["vit_tiny_patch16_lookhere_180", "vit_small_patch16_lookhere_45"])
def test_timm_contract(name):
    model = timm.create_model(name, pretrained=False, num_classes=7, drop_path_rate=0.1, img_size=64).eval()
    assert isinstance(model, lookhere.VisionTransformer)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["fixed_input_size"] is False
    state = model.state_dict()
    assert cfg["first_conv"] + ".weight" in state and cfg["classifier"] + ".weight" in state
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 1 + 4 * 6, model.num_features)
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, model.head_hidden_size)
        torch.testing.assert_close(model.forward_head(feats), model.get_classifier()(pre))
        assert model.get_classifier() is model.get_submodule(cfg["classifier"])
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, feats)
        assert len(inter) == len(model.feature_info) == 12
        assert inter[-1].shape == (2, model.num_features, 4, 6)
        only = model.forward_intermediates(x, indices=[0, 5], intermediates_only=True, output_fmt="NLC")
        assert [t.shape for t in only] == [(2, 24, model.num_features)] * 2
        model.reset_classifier(0)
        torch.testing.assert_close(model(x), pre)  # the pre-logits features, as forward_head(pre_logits=True)
        model.reset_classifier(3, global_pool="avg")
        assert model(x).shape == (2, 3)


@pytest.mark.parametrize("pos_encoding", ["lh-90", "rope-2d-mixed"])
def test_torch_export_at_a_fixed_size(pos_encoding):
    """Deployment by torch.export (TorchScript is not supported): the exported program gives the
    eager model's logits, and exporting leaves the eager model as it was."""
    model = tiny(pos_encoding=pos_encoding)
    x = torch.randn(2, 3, 24, 56)
    with torch.no_grad():
        eager = model(x)
        program = torch.export.export(model, (x,))
        torch.testing.assert_close(program.module()(x), eager, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(x), eager, rtol=0, atol=0)


def test_timm_features_only():
    model = timm.create_model("vit_tiny_patch16_lookhere_90", features_only=True, out_indices=(1, 3)).eval()
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 48, 80))
    assert [m.shape for m in maps] == [(1, 192, 3, 5)] * 2


def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch):
    """Same gradients, and checkpointing is in effect: each block goes through checkpoint and runs
    its forward again in the backward pass (once without checkpointing)."""
    import lookhere.vit

    model = tiny(drop_path_rate=0.0).train()
    x = torch.randn(2, 3, 32, 40)
    forwards, checkpointed = [], []
    for i, blk in enumerate(model.blocks):
        blk.mlp.fc1.register_forward_hook(lambda *_, i=i: forwards.append(i))
    real = lookhere.vit.checkpoint
    monkeypatch.setattr(lookhere.vit, "checkpoint", lambda *a, **kw: checkpointed.append(1) or real(*a, **kw))
    model(x).sum().backward()
    assert sorted(forwards) == [0, 1] and not checkpointed
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    forwards.clear()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    assert sorted(forwards) == [0, 0, 1, 1] and len(checkpointed) == 2
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("pos_encoding", list(POSITION_ENCODINGS))
def test_attention_dropout_is_applied_in_training_only(pos_encoding):
    torch.manual_seed(0)
    model = create_vit(pos_encoding, img_size=16, patch_size=4, embed_dim=48, depth=2, num_heads=12,
                       num_classes=3, attn_drop_rate=0.5, init_values=None).train()
    x = torch.randn(2, 3, 16, 16)
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    b = model(x)
    assert not torch.allclose(a, b), "attention dropout changed nothing in training mode"
    torch.manual_seed(1)
    torch.testing.assert_close(model(x), a, rtol=0, atol=0)  # seeded: reproducible
    model.eval()
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
    plain = create_vit(pos_encoding, img_size=16, patch_size=4, embed_dim=48, depth=2, num_heads=12,
                       num_classes=3, init_values=None).eval()
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)


def assert_drops_attention_weights(attend, T=31, D=32):
    """With v the identity plus a column of ones, the output's first T columns are the attention
    weights and the last their row sum. Dropout p = 0.5 must turn each weight into 0 or twice itself,
    and the row sums must be those of the kept weights: one mask on the weights, not on the output."""
    torch.manual_seed(0)
    q, k = (torch.randn(2, 12, T, D) for _ in range(2))
    v = torch.cat([torch.eye(T), torch.ones(T, 1), torch.zeros(T, D - T - 1)], 1).expand(2, 12, T, D).contiguous()
    exact = attend(q, k, v, 0.0)
    w, d = exact[..., :T], attend(q, k, v, 0.5)
    torch.testing.assert_close(exact[..., T], torch.ones(2, 12, T), rtol=1e-5, atol=1e-5)
    assert ((d[..., :T] == 0) | torch.isclose(d[..., :T], 2 * w, rtol=1e-5, atol=1e-7)).all()
    torch.testing.assert_close(d[..., T], d[..., :T].sum(-1), rtol=1e-5, atol=1e-5)
    kept = ((d[..., :T] != 0) & (w != 0)).sum() / (w != 0).sum()
    assert 0.45 < kept < 0.55


@pytest.mark.parametrize("backend", ["dense", "slab"])
def test_lookhere_backends_apply_attention_dropout(backend):
    from lookhere import lookhere_attention

    kw = dict(config="lh-90", grid_size=(5, 6), layer=1, depth=3, backend=backend)
    assert_drops_attention_weights(lambda q, k, v, p: lookhere_attention(q, k, v, dropout_p=p, **kw))


@pytest.mark.parametrize("pos_encoding", list(POSITION_ENCODINGS))
def test_every_encoding_drops_attention_weights(pos_encoding):
    """The attention dropout the ViT passes in training lands on the attention weights."""
    from lookhere.position import build_position_encoding

    pe = build_position_encoding(pos_encoding, embed_dim=12 * 32, num_heads=12, depth=2, grid_size=(4, 4)).eval()
    assert_drops_attention_weights(
        lambda q, k, v, p: pe.attend(q, k, v, grid=(5, 6), layer=1, num_prefix_tokens=1, dropout_p=p))


def test_flex_backend_refuses_attention_dropout():
    from lookhere import lookhere_attention

    q = torch.randn(1, 12, 1 + 9, 16)
    with pytest.raises(ValueError, match="flex backend has no attention dropout"):
        lookhere_attention(q, q, q, config="lh-90", grid_size=(3, 3), layer=0, depth=1, backend="flex",
                           dropout_p=0.1)


@pytest.mark.parametrize("pos_encoding", list(POSITION_ENCODINGS))
def test_every_encoding_runs_in_the_dtype_the_model_is_cast_to(pos_encoding):
    """float64 gives float32's numbers (to float32's precision); bfloat16 runs."""
    torch.manual_seed(0)
    model = tiny(pos_encoding=pos_encoding, img_size=16, patch_size=4)
    x = torch.randn(2, 3, 16, 24)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(model.double()(x.double()).float(), want, rtol=1e-4, atol=1e-5)
        low = model.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()


@pytest.mark.parametrize("backend", ["dense", "slab"])
def test_training_after_an_inference_mode_pass(backend):
    """What a pass under torch.inference_mode caches must not be an inference tensor autograd can't save."""
    model = tiny(img_size=(32, 48), pos_options={"backend": backend})
    x = torch.randn(2, 3, 32, 48)
    with torch.inference_mode():
        want = model(x)
    model.train().forward_features(x).sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), want, rtol=0, atol=0)


# --- defaults: a minimal ViT written by hand ---------------------------------------------------
@pytest.mark.parametrize("size", [(32, 32), (24, 40), (64, 64)])
def test_default_model_is_the_minimal_vit_written_by_hand(size):
    """create_vit's defaults add nothing to a minimal pre-norm ViT with the LookHere bias: its weights
    load strictly (no LayerScale, no other parameter) and give its logits at any grid."""
    from minimal_vit import MinimalViT

    ref = MinimalViT(10, dim=48, depth=2, heads=12, patch=4).eval()
    model = ref.as_lookhere().eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


def _uniform_init(weight, fan_in):
    """PyTorch's Linear/Conv2d initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1 / math.sqrt(fan_in)
    return weight.abs().max() <= bound and abs(weight.std().item() / (bound / math.sqrt(3)) - 1) < 0.05


@pytest.mark.parametrize("pos_encoding", ["lh-90", "rope-2d-mixed", "learned-1d"])
def test_default_initialisation_is_pytorchs_own(pos_encoding):
    """Small models trained from scratch start as a ViT written by hand does (docs/backbone-ablation.md):
    every layer with PyTorch's initialisation (for width 96 a third wider than timm's N(0, 0.02)),
    a zero CLS token, no LayerScale; the same for every encoding."""
    model = create_vit(pos_encoding, img_size=32, patch_size=4, embed_dim=96, depth=2, num_heads=12, num_classes=10)
    assert model.config.weight_init == "torch" and not model.config.init_values
    assert torch.all(model.cls_token == 0)
    for name, m in model.named_modules():
        if name.startswith("pos_encoding"):
            continue
        if isinstance(m, torch.nn.Linear):
            assert _uniform_init(m.weight, m.in_features), name
        elif isinstance(m, torch.nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0), name
    assert _uniform_init(model.patch_embed.proj.weight, 3 * 4 * 4)
    assert not any("ls1" in n or "gamma" in n for n, _ in model.named_parameters())


def test_timm_initialisation_and_the_registered_backbone():
    model = create_vit("lh-90", img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=12, num_classes=10,
                       weight_init="timm")
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            assert abs(m.weight.std().item() / 0.02 - 1) < 0.1 and torch.all(m.bias == 0), name
    # The registered ViT-B/16 names keep the paper's backbone for every encoding: timm's
    # initialisation and LayerScale 1e-4 (LookHere adds its MLP head and drop-path 0.1).
    for name in ("vit_tiny_patch16_pe_rope_2d_mixed", "vit_tiny_patch16_lookhere_45"):
        cfg = timm.create_model(name, depth=1).config
        assert (cfg.weight_init, cfg.init_values) == ("timm", 1e-4), name
    with pytest.raises(ValueError, match="weight_init='jax'; allowed: torch"):
        create_vit("lh-90", img_size=32, patch_size=4, embed_dim=48, depth=1, num_heads=12, weight_init="jax")
