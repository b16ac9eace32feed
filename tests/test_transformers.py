"""Vision transformers and hybrids: torchvision's six, timm models, and hand-made attention blocks."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import randomize
from gpd_surgery import collapse, expand
from gpd_surgery.verification import compare

torchvision = pytest.importorskip("torchvision")

# Smallest inputs each architecture allows (MaxViT needs 7 x 32).
TORCHVISION = {
    "vit_b_16": ({"image_size": 32}, (1, 3, 32, 32)),
    "vit_b_32": ({"image_size": 32}, (1, 3, 32, 32)),
    "swin_t": ({}, (1, 3, 32, 32)),
    "swin_v2_t": ({}, (1, 3, 32, 32)),
    "convnext_tiny": ({}, (1, 3, 32, 32)),
    "maxvit_t": ({}, (1, 3, 224, 224)),
}


def check_exact(model, shape, ratio=2, min_factor=3.0, keep_tensors=False):
    """Expand, collapse back, then compare in float64 and float32 converting the modules in place (float64
    first, so the teacher's float64 constants are not rounded; no copies of a teacher of gigabytes). Unless
    ``keep_tensors``, the teacher's file tensors are dropped first (vit_b_16 x2: 1.4 GB)."""
    res = expand(model, shape, ratio, seed=2)
    back = collapse(res.plan, res.tensors)
    for k, v in model.state_dict().items():
        assert back[k].shape == v.shape and back[k].dtype == v.dtype
        assert (back[k].double() - v.double()).abs().max() <= 1e-6, k
    del back
    summary = res.summary()
    teacher = res.teacher()
    if not keep_tensors:
        res.tensors.clear()
    x = [torch.randn(shape)]
    assert compare(model, teacher, x, "cpu", torch.float64, in_place=True).max_rel <= 1e-10
    assert compare(model, teacher, x, "cpu", torch.float32, in_place=True).max_rel <= 1e-5
    assert summary["spaces_frozen"] == 0, summary["frozen"][:3]
    assert summary["unsupported_ops"] == []
    assert summary["teacher_params"] >= min_factor * summary["student_params"]
    return res


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TORCHVISION))
def test_torchvision_transformers(name):
    kwargs, shape = TORCHVISION[name]
    torch.manual_seed(0)
    check_exact(randomize(torchvision.models.get_model(name, weights=None, **kwargs)), shape)


# -- hand-made blocks ------------------------------------------------------------------------
class FusedAttention(nn.Module):
    """timm style: one qkv projection, heads split by reshape, fused scaled_dot_product_attention."""

    def __init__(self, dim=24, heads=3):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(y.transpose(1, 2).reshape(B, N, C))


class ExplicitAttention(nn.Module):
    """Separate q, k, v projections and an explicit softmax(q k^T / sqrt(d)) v."""

    def __init__(self, dim=24, heads=4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        B, N, C = x.shape
        d = C // self.heads
        q, k, v = (p(x).view(B, N, self.heads, d).transpose(1, 2) for p in (self.q, self.k, self.v))
        attn = (q @ k.transpose(-2, -1) * d ** -0.5).softmax(dim=-1)
        return x + self.o((attn @ v).transpose(1, 2).reshape(B, N, C))


class TinyViT(nn.Module):
    """Patch embedding, class token, position embedding, nn.MultiheadAttention, layer scale, GELU MLP."""

    def __init__(self, dim=16, heads=2, classes=5):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 5, dim))
        self.ln1, self.ln2, self.ln = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.gamma = nn.Parameter(torch.randn(dim))
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        y = self.ln1(x)
        x = x + self.gamma * self.attn(y, y, y, need_weights=False)[0]
        x = x + self.mlp(self.ln2(x))
        return self.head(self.ln(x)[:, 0])


@pytest.mark.parametrize("ratio", [2, 3])
@pytest.mark.parametrize("block", [FusedAttention, ExplicitAttention])
def test_attention_blocks(block, ratio):
    torch.manual_seed(ratio)
    model = randomize(block())
    res = expand(model, (2, 6, 24), ratio)
    teacher = res.teacher()
    x = torch.randn(2, 6, 24, dtype=torch.float64)
    assert compare(model, teacher, [x], "cpu", torch.float64).max_rel <= 1e-10
    # Heads widen, the head dim does not: the q projection's rows are (heads * ratio) x head_dim.
    q_rows = res.tensors["qkv.weight" if block is FusedAttention else "q.weight"].shape[0]
    assert q_rows == (3 if block is FusedAttention else 1) * 24 * ratio


def test_tiny_vit_with_multihead_attention():
    torch.manual_seed(0)
    model = randomize(TinyViT())
    res = check_exact(model, (2, 3, 8, 8), min_factor=2.5, keep_tensors=True)
    assert res.tensors["attn.in_proj_weight"].shape == (96, 32)
    teacher = res.teacher()
    assert teacher.attn.num_heads == 4 and teacher.attn.head_dim == 8


def test_attention_over_channels_is_frozen_not_wrong():
    """A softmax over the channel dim cannot widen: the space freezes, and the teacher stays exact."""

    class ChannelSoftmax(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.b(self.a(x).softmax(-1))

    model = randomize(ChannelSoftmax())
    res = expand(model, (2, 8), 2)
    summary = res.summary()
    assert summary["spaces_frozen"] == 1 and "normalization along a channel" in summary["frozen"][0]["reason"]
    x = torch.randn(2, 8)
    assert compare(model, res.teacher(), [x], "cpu", torch.float64).max_rel <= 1e-10


# -- timm -------------------------------------------------------------------------------------
TIMM = {
    "vit_tiny_patch16_224": ({"img_size": 32}, (1, 3, 32, 32)),
    "convnext_atto": ({}, (1, 3, 32, 32)),
    "efficientnet_b0": ({}, (1, 3, 32, 32)),  # BatchNormAct2d everywhere
    "regnety_002": ({}, (1, 3, 32, 32)),
    # families docs/zoo-timm.md found broken or frozen, each for its own reason:
    "rexnet_100": ({}, (1, 3, 32, 32)),  # partial residual x[:, :c] + shortcut, cat with x[:, c:]
    "ghostnet_100": ({}, (1, 3, 32, 32)),  # cat(...)[:, :out] over the whole cat
    "dpn68": ({}, (1, 3, 32, 32)),  # dual paths cut with x[:, :k], x[:, k:]
    "cait_xxs24_224": ({"img_size": 32, "depth": 2}, (1, 3, 32, 32)),  # reshape(B, N, 3, h, C // h)
    "beit_base_patch16_224": ({"img_size": 32, "depth": 2, "embed_dim": 64, "num_heads": 4},
                              (1, 3, 32, 32)),  # qkv bias cat(q_bias, zero buffer, v_bias)
    "resmlp_12_224": ({"img_size": 32}, (1, 3, 32, 32)),  # torch.addcmul
    "poolformerv2_s12": ({}, (1, 3, 32, 32)),  # x.pow(2) in its norms
    "tf_efficientnet_lite0": ({}, (1, 3, 32, 32)),  # timm's Conv2dSame leaf
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TIMM))
def test_timm_models(name):
    timm = pytest.importorskip("timm")
    kwargs, shape = TIMM[name]
    torch.manual_seed(0)
    model = randomize(timm.create_model(name, pretrained=False, **kwargs))
    check_exact(model, shape, min_factor=2.5 if name != "poolformerv2_s12" else 1.5)


def test_timm_window_functions_are_channels_last():
    """The window and block (un)partitions timm wraps from tracing all have the channels-last rule."""
    pytest.importorskip("timm")
    import importlib

    import gpd_surgery.rules.timm  # noqa: F401 (loaded at a model's first timm op otherwise)
    from gpd_surgery.rules import DEFAULT as RULES, channels_last_window

    for module, fns in {"davit": ("window_partition", "window_reverse"), "gcvit": ("window_reverse",),
                        "maxxvit": ("grid_partition", "grid_reverse"), "nest": ("blockify", "deblockify"),
                        "swin_transformer_v2_cr": ("window_reverse",)}.items():
        mod = importlib.import_module(f"timm.models.{module}")
        for f in fns:
            assert RULES.get(getattr(mod, f)) is channels_last_window, (module, f)
