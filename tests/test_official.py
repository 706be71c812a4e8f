import math
import os
import pickle

import pytest
import torch
import torch.nn.functional as F

import lookhere
from lookhere import dense_bias, load_official

LH = {"global_slope": 0.75, "layer_slopes": [1.5, 0.5], "head_directions": "eighths1-eighths2-triangles"}
DIM, DEPTH, HEADS, PATCH, MLP, CLASSES = 48, 2, 12, 8, 96, 10


def released_weights(seed=0):
    """A state dict with the released DeiT-III-style key names and random values."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    w = {"cls_token": r(1, 1, DIM), "patch_embed.proj.weight": r(DIM, 3, PATCH, PATCH),
         "patch_embed.proj.bias": r(DIM), "norm.weight": 1 + r(DIM), "norm.bias": r(DIM),
         "head.fc1.weight": r(64, DIM), "head.fc1.bias": r(64), "head.fc2.weight": r(CLASSES, 64),
         "head.fc2.bias": r(CLASSES)}
    for i in range(DEPTH):
        b = f"blocks.{i}."
        w.update({b + "norm1.weight": 1 + r(DIM), b + "norm1.bias": r(DIM), b + "attn.qkv.weight": r(3 * DIM, DIM),
                  b + "attn.qkv.bias": r(3 * DIM), b + "attn.proj.weight": r(DIM, DIM), b + "attn.proj.bias": r(DIM),
                  b + "ls1.gamma": r(DIM), b + "norm2.weight": 1 + r(DIM), b + "norm2.bias": r(DIM),
                  b + "mlp.fc1.weight": r(MLP, DIM), b + "mlp.fc1.bias": r(MLP), b + "mlp.fc2.weight": r(DIM, MLP),
                  b + "mlp.fc2.bias": r(DIM), b + "ls2.gamma": r(DIM)})
    return w


def reference_logits(w, x):
    """The released model's forward, written out in float64 from its weights and the dense bias."""
    w = {k: v.double() for k, v in w.items()}
    x = x.double()
    B, _, H, W = x.shape
    gy, gx = H // PATCH, W // PATCH
    t = F.conv2d(x, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=PATCH)
    t = torch.cat([w["cls_token"].expand(B, -1, -1), t.flatten(2).transpose(1, 2)], 1)
    bias = F.pad(dense_bias(LH, (gy, gx), DEPTH, HEADS).double(), (1, 0, 1, 0))
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


@pytest.fixture
def released_file(tmp_path):
    w = released_weights()
    path = tmp_path / "LH_45_weights_and_config.pth"
    torch.save({"config": dict(LH), "weights": {f"module.{k}": v for k, v in w.items()}}, path)
    return path, w


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
    with pytest.raises(ValueError, match="unreadable or unsafe"):
        load_official(path)
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


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_official(tmp_path / "nope.pth")


def test_timm_filter_accepts_released_format():
    model = lookhere.create_vit("lookhere", lookhere_config=LH, img_size=32, patch_size=PATCH, embed_dim=DIM,
                                depth=DEPTH, num_heads=HEADS, num_classes=CLASSES, mlp_ratio=2.0, head_hidden_dim=64)
    w = released_weights()
    state = lookhere.checkpoint_filter_fn({"config": LH, "weights": {f"_orig_mod.{k}": v for k, v in w.items()}},
                                          model)
    model.load_state_dict(state)  # strict
    assert torch.equal(model.blocks[1].ls2.gamma, w["blocks.1.ls2.gamma"])
