import math
import os
import pickle
import re

import pytest
import timm
import torch
import torch.nn.functional as F

import lookhere
from lookhere import PRESETS, dense_bias, load_official

from conftest import CLASSES, DEPTH, DIM, HEADS, LH, MLP, PATCH, released_weights

def reference_logits(w, x, lh=LH):
    """The released model's forward, written out in float64 from its weights and the dense bias."""
    w = {k: v.double() for k, v in w.items()}
    x = x.double()
    B, _, H, W = x.shape
    gy, gx = H // PATCH, W // PATCH
    t = F.conv2d(x, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=PATCH)
    t = torch.cat([w["cls_token"].expand(B, -1, -1), t.flatten(2).transpose(1, 2)], 1)
    bias = F.pad(dense_bias(lh, (gy, gx), DEPTH, HEADS).double(), (1, 0, 1, 0))
    ln = lambda z, p: F.layer_norm(z, (DIM,), w[p + ".weight"], w[p + ".bias"], eps=1e-5)  # noqa: E731
    for i in range(DEPTH):
        b = f"blocks.{i}."
        qkv = F.linear(ln(t, b + "norm1"), w[b + "attn.qkv.weight"], w[b + "attn.qkv.bias"])
        q, k, v = qkv.reshape(B, -1, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-1, -2) / math.sqrt(DIM // HEADS) + bias[i]).softmax(-1) @ v
        a = F.linear(a.transpose(1, 2).reshape(B, -1, DIM), w[b + "attn.proj.weight"], w[b + "attn.proj.bias"])
        t = t + w[b + "ls1.gamma"] * a
        m = F.gelu(F.linear(ln(t, b + "norm2"), w[b + "mlp.fc1.weight"], w[b + "mlp.fc1.bias"]))
        t = t + w[b + "ls2.gamma"] * F.linear(m, w[b + "mlp.fc2.weight"], w[b + "mlp.fc2.bias"])
    c = ln(t, "norm")[:, 0]
    return F.linear(torch.tanh(F.linear(c, w["head.fc1.weight"], w["head.fc1.bias"])), w["head.fc2.weight"],
                    w["head.fc2.bias"])


@pytest.mark.parametrize("size", [(32, 32), (64, 64), (40, 72)])
def test_reproduces_released_logits(released_file, size):
    path, w = released_file
    model = load_official(path, num_heads=HEADS)
    assert not model.training
    assert (model.embed_dim, len(model.blocks), model.patch_size, model.num_classes) == (DIM, DEPTH, PATCH, CLASSES)
    x = torch.randn(3, 3, *size)
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got.double(), reference_logits(w, x), rtol=1e-5, atol=1e-5)


def test_truncated_checkpoint(released_file, tmp_path):
    path, _ = released_file
    data = path.read_bytes()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a released LookHere checkpoint"):
        load_official(bad)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_pickle",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # the hostile file's own protocol
def test_foreign_pickle_is_refused_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"config": LH, "weights": _Exploit()}, f)
    with pytest.raises(ValueError, match="unreadable or unsafe: not a checkpoint of plain tensors") as e:
        load_official(path)
    assert "weights_only=False" not in str(e.value)  # never advise loading a foreign file unsafely
    assert not (tmp_path / "pwned_by_pickle").exists()


@pytest.mark.parametrize(
    "obj,why",
    [
        ({"weights": {}}, "found"),
        ({"config": LH, "weights": {"foo": torch.zeros(1)}}, "weights lack"),
        ({"config": dict(LH, head_directions="sideways"), "weights": {}}, "head_directions"),
        (torch.zeros(3), "found Tensor"),
    ],
)
def test_not_a_lookhere_checkpoint(tmp_path, obj, why):
    path = tmp_path / "x.pth"
    torch.save(obj, path)
    with pytest.raises(ValueError, match=why):
        load_official(path)


def _with(w, **changes):
    return {"config": dict(LH), "weights": {**w, **changes}}


@pytest.mark.parametrize(
    "write,why",
    [
        (lambda p: p.write_text("hello, not a checkpoint"), "unreadable or unsafe"),
        (lambda p: torch.save({1: 2, "x": 3}, p), "found \\['1', 'x'\\]"),
        (lambda p: torch.save(_with(released_weights(), **{"norm.weight": [1.0, 2.0]}), p),
         "holds 'norm.weight', a list, not a tensor"),
        (lambda p: torch.save(_with(released_weights(), **{"norm.weight": torch.ones(DIM + 1)}), p),
         "norm.weight"),
    ],
    ids=["text", "mixed-keys", "not-a-tensor", "wrong-shape"],
)
def test_a_damaged_file_is_one_message_naming_it(tmp_path, write, why):
    path = tmp_path / "damaged.pth"
    write(path)
    with pytest.raises(ValueError, match="damaged.pth: not a released LookHere checkpoint") as e:
        load_official(path)
    assert re.search(why, str(e.value)), str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_official(tmp_path / "nope.pth")


def small_vit(lh=LH, **kw):
    """The released architecture (LayerScale, MLP head), made small."""
    from lookhere.vit import LOOKHERE_ARCH

    return lookhere.create_vit("lookhere", lookhere_config=lh, img_size=32, patch_size=PATCH, embed_dim=DIM,
                               depth=DEPTH, num_heads=HEADS, num_classes=CLASSES, mlp_ratio=MLP / DIM,
                               head_hidden_dim=64, **{**LOOKHERE_ARCH, **kw})


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "_orig_mod.module.", "module._orig_mod."])
def test_wrapper_prefixes_are_mapped_in_both_paths(tmp_path, prefix):
    w = released_weights()
    released = {"config": LH, "weights": {prefix + k: v for k, v in w.items()}}
    model = small_vit()
    model.load_state_dict(lookhere.checkpoint_filter_fn(released, model))  # strict
    assert torch.equal(model.blocks[1].ls2.gamma, w["blocks.1.ls2.gamma"])
    plain = small_vit()
    plain.load_state_dict(lookhere.checkpoint_filter_fn({prefix + k: v for k, v in model.state_dict().items()}, plain))
    assert torch.equal(plain.head.fc2.weight, w["head.fc2.weight"])
    path = tmp_path / "LH.pth"
    torch.save(released, path)
    assert torch.equal(load_official(path, num_heads=HEADS).patch_embed.proj.weight, w["patch_embed.proj.weight"])


def released_file_for(tmp_path, preset, seed=0):
    w = released_weights(seed)
    path = tmp_path / f"LH_{preset[3:]}_weights_and_config.pth"
    torch.save({"config": dict(PRESETS[preset]), "weights": w}, path)
    return path, w


def timm_released(variant, path, num_classes=CLASSES, **kw):
    """The paper's model through timm's pretrained loading, made small (the architecture arguments
    override the variant's; the file is given as timm's ``file`` overlay instead of the Hub)."""
    overlay = dict(file=str(path), num_classes=CLASSES) if path else dict(num_classes=CLASSES)
    return timm.create_model(f"vit_base_patch16_lookhere_{variant}.in1k", pretrained=True,
                             pretrained_cfg_overlay=overlay, num_classes=num_classes, embed_dim=DIM, depth=DEPTH,
                             patch_size=PATCH, mlp_ratio=MLP / DIM, head_hidden_dim=64, img_size=32, **kw)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_timm_pretrained_loads_the_released_file_like_load_official(tmp_path, preset):
    path, w = released_file_for(tmp_path, preset)
    model = timm_released(preset[3:], path).eval()
    assert isinstance(model, lookhere.VisionTransformer)
    assert model.pos_encoding.config == lookhere.LookHereConfig.from_dict(PRESETS[preset])
    ref = load_official(path, num_heads=HEADS)
    assert [b.drop_path1.drop_prob for b in ref.blocks] == [b.drop_path1.drop_prob for b in model.blocks]
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        got = model(x)
        torch.testing.assert_close(got, ref(x), rtol=0, atol=0)
    torch.testing.assert_close(got.double(), reference_logits(w, x, PRESETS[preset]), rtol=1e-5, atol=1e-5)


def test_timm_pretrained_downloads_the_released_file_from_the_hub(tmp_path, monkeypatch):
    """timm's own Hub path (the download replaced by the local file): repository, file name, and the
    same weights as the file."""
    path, w = released_file_for(tmp_path, "lh-90")
    asked = []

    def download(repo_id, filename, revision=None, cache_dir=None, **_):
        asked.append((repo_id, filename))
        return str(path)

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", download)
    model = timm_released("90", None)
    assert asked == [("antofuller/LookHere", "LH_90_weights_and_config.pth")]
    assert torch.equal(model.blocks[1].attn.qkv.weight, w["blocks.1.attn.qkv.weight"])


def test_timm_pretrained_with_other_classes_keeps_all_but_the_last_layer(tmp_path):
    path, w = released_file_for(tmp_path, "lh-45")
    model = timm_released("45", path, num_classes=3)
    state = model.state_dict()
    kept = [key for key in w if not key.startswith("head.fc2.")]
    assert len(kept) == len(w) - 2
    for key in kept:
        assert torch.equal(state[key], w[key]), key
    assert model.head.fc2.weight.shape == (3, 64) and torch.all(model.head.fc2.weight == 0)


def test_timm_refuses_a_released_file_with_another_config(tmp_path):
    path, _ = released_file_for(tmp_path, "lh-45")
    with pytest.raises(ValueError, match="differs from the model's") as err:
        timm_released("90", path)
    msg = str(err.value)
    assert "eighths1-eighths2-none" in msg and "corners-triangles-none" in msg
    assert "vit_base_patch16_lookhere_45.in1k" in msg


def test_released_file_into_a_model_without_lookhere_is_refused():
    model = lookhere.create_vit("rope-2d-axial", img_size=32, patch_size=PATCH, embed_dim=DIM, depth=DEPTH,
                                num_heads=HEADS, num_classes=CLASSES)
    with pytest.raises(ValueError, match="rope-2d-axial.*load_official"):
        lookhere.checkpoint_filter_fn({"config": LH, "weights": released_weights()}, model)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # the hostile file's own protocol
def test_timm_pretrained_reads_the_file_weights_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"config": PRESETS["lh-90"], "weights": _Exploit()}, f)
    with pytest.raises(RuntimeError, match="weights_only=True blocked"):
        timm_released("90", path)
    assert not (tmp_path / "pwned_by_pickle").exists()
