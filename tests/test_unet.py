"""The UNet: shapes for every preset, the paper's parameter count, conditioning, bad sizes."""
import math

import pytest
import torch
import torch.nn.functional as F

from ddpm_nb.config import UNET_PRESETS, ConfigError, UNetConfig
from ddpm_nb.unet import AttentionBlock, UNet, count_parameters, sdpa_kernel, sinusoidal_embedding


@pytest.mark.parametrize("name", list(UNET_PRESETS))
@pytest.mark.parametrize("channels", [1, 3])
def test_output_shape_equals_input_shape(name, channels):
    cfg = UNET_PRESETS[name](in_channels=channels, dropout=0.0)
    model = UNet(cfg)
    x = torch.randn(2, channels, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        out = model(x, torch.tensor([0, 999]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_ddpm_cifar10_parameter_count():
    n = count_parameters(UNet(UNetConfig.ddpm_cifar10()))
    assert abs(n - 35.7e6) <= 0.1e6, n


def test_class_conditioning_and_null_class():
    torch.manual_seed(0)
    model = UNet(UNetConfig.tiny(num_classes=10)).eval()
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 3])
    with torch.no_grad():
        a = model(x, t, torch.tensor([1, 1]))
        b = model(x, t, torch.tensor([7, 7]))
        null = model(x, t, torch.tensor([10, 10]))
        none = model(x, t)
    assert (a - b).abs().max() > 1e-4          # the label changes the output
    torch.testing.assert_close(null, none)       # y=None means the null class
    assert model.class_embed.num_embeddings == 11
    with pytest.raises(ValueError, match="unconditional"):
        UNet(UNetConfig.tiny())(x, t, torch.tensor([1, 1]))


def test_time_changes_the_output():
    torch.manual_seed(0)
    model = UNet(UNetConfig.tiny()).eval()
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        assert (model(x, torch.tensor([1])) - model(x, torch.tensor([40]))).abs().max() > 1e-4


def test_bad_image_size_error_says_what_to_do():
    with pytest.raises(ConfigError) as info:
        UNetConfig(image_size=28, channel_mults=(1, 2, 2, 2))
    msg = str(info.value)
    assert "image_size=28" in msg and "32" in msg and "fewer channel_mults" in msg


@pytest.mark.parametrize("kw, field", [
    (dict(in_channels=2), "in_channels"),
    (dict(attn_resolutions=(12,)), "attn_resolutions"),
    (dict(norm_groups=7), "norm_groups"),
    (dict(dropout=1.5), "dropout"),
    (dict(num_classes=0), "num_classes"),
])
def test_bad_unet_config_names_the_field(kw, field):
    with pytest.raises(ConfigError, match=f"UNetConfig.{field}"):
        UNetConfig(**kw)


def test_wrong_channels_at_runtime_is_clear():
    model = UNet(UNetConfig.tiny())
    with pytest.raises(ValueError, match=r"expects \(B, 1, S, S\)"):
        model(torch.randn(1, 3, 16, 16), torch.tensor([0]))


def test_sinusoidal_embedding_formula():
    t, dim = torch.tensor([0, 1, 37]), 8
    emb = sinusoidal_embedding(t, dim)
    for row, tv in enumerate([0, 1, 37]):
        for i in range(dim // 2):
            freq = 10_000 ** (-i / (dim // 2))
            assert emb[row, i].item() == pytest.approx(math.sin(tv * freq), abs=1e-5)
            assert emb[row, dim // 2 + i].item() == pytest.approx(math.cos(tv * freq), abs=1e-5)


def test_attention_block_equals_explicit_softmax_attention():
    torch.manual_seed(0)
    block = AttentionBlock(32, groups=8, head_channels=16).eval()
    x = torch.randn(2, 32, 4, 4)
    h = block.norm(x)
    q, k, v = block.qkv(h).reshape(2, 3, 2, 16, 16).unbind(1)  # (B, heads, d, HW)
    attn = torch.softmax(q.transpose(-1, -2) @ k / math.sqrt(16), dim=-1)  # (B, heads, HW, HW)
    out = (attn @ v.transpose(-1, -2)).transpose(-1, -2).reshape(2, 32, 4, 4)
    torch.testing.assert_close(block(x), x + block.proj(out), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_attention_feeds_sdpa_a_contiguous_head_dim_and_gets_a_fused_kernel(monkeypatch, memory_format):
    """Fused SDPA kernels refuse a last-dim stride != 1; with such inputs every call took the math path."""
    torch.manual_seed(0)
    block = AttentionBlock(64, groups=8, head_channels=16).eval()
    x = torch.randn(2, 64, 8, 8).contiguous(memory_format=memory_format)
    strides = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        strides.append([t.stride(-1) for t in (q, k, v)])
        assert q.shape == (2, 4, 64, 16)
        return original(q, k, v, *a, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        block(x)
    assert strides == [[1, 1, 1]]
    monkeypatch.undo()
    assert sdpa_kernel(block, x) == "flash (CPU)"  # what this torch runs on a CPU for fp32 inputs
    # the math path, forced, gives the same output
    with torch.no_grad(), torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        reference = block(x)
    with torch.no_grad():
        torch.testing.assert_close(block(x), reference, atol=1e-5, rtol=1e-5)


def test_sdpa_kernel_reports_the_math_fallback_and_the_whole_unet():
    block = AttentionBlock(32, groups=8, head_channels=16).eval()
    x = torch.randn(1, 32, 4, 4)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        assert sdpa_kernel(block, x) == "math"
    net = UNet(UNetConfig.tiny()).eval()
    assert sdpa_kernel(net, torch.randn(1, 1, 16, 16), torch.tensor([3])) == "flash (CPU)"
