"""The noise-prediction UNet of DDPM (Ho et al. 2020, appendix B), built from small named parts.

Explained in notebooks/02_unet.

eps_theta(x_t, t[, y]): (B, C, H, W) x (B,) [x (B,)] -> (B, C, H, W).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import UNetConfig

__all__ = [
    "sinusoidal_embedding",
    "TimeEmbedding",
    "ResBlock",
    "AttentionBlock",
    "Downsample",
    "Upsample",
    "UNet",
    "sdpa_kernel",
    "count_parameters",
]


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Transformer-style embedding of timesteps: (B,) -> (B, dim), [sin | cos] halves.

    Frequency i is max_period^(-i / (dim/2)), i = 0 .. dim/2 - 1.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding followed by a 2-layer MLP: (B,) -> (B, emb_dim)."""

    def __init__(self, base_dim: int, emb_dim: int):
        super().__init__()
        self.base_dim = base_dim
        self.mlp = nn.Sequential(nn.Linear(base_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(t, self.base_dim))


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, + projected embedding, GroupNorm -> SiLU -> dropout -> conv, + skip.

    x: (B, in_ch, H, W), emb: (B, emb_dim) -> (B, out_ch, H, W).
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection.

    x: (B, C, H, W) -> (B, C, H, W). Uses F.scaled_dot_product_attention with q, k, v laid out as
    (B, heads, H*W, d) with the head dimension d contiguous (last-dim stride 1), which every fused kernel
    requires: flash / memory-efficient / cuDNN attention on GPUs, the flash kernel on CPUs (see
    `sdpa_kernel`). A view straight out of the (B, 3C, H, W) convolution would have stride H*W there
    and always fall back to the unfused math path.
    """

    def __init__(self, channels: int, groups: int, head_channels: int):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        if channels % self.heads:
            raise ValueError(f"attention: {channels} channels do not split into {self.heads} heads")
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x))
        # positions first, channels last and contiguous (a copy, or a view for channels_last inputs) ...
        qkv = rearrange(qkv, "b (three heads d) h w -> b (h w) three heads d", three=3, heads=self.heads).contiguous()
        # ... so that q, k, v: (B, heads, H*W, d) are views with d contiguous
        q, k, v = rearrange(qkv, "b n three heads d -> three b heads n d")
        out = F.scaled_dot_product_attention(q, k, v)
        out = rearrange(out, "b heads (h w) d -> b (heads d) h w", h=h, w=w)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Halve H and W with a strided 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """Res blocks (+ attention) at one resolution: `res[i]`, then `attn[i]` (an AttentionBlock or Identity)."""

    def __init__(self):
        super().__init__()
        self.res = nn.ModuleList()
        self.attn = nn.ModuleList()


class UNet(nn.Module):
    """The DDPM UNet, configured by a `UNetConfig` (see its presets).

    forward(x: (B, C, H, W), t: (B,) long, y: (B,) long | None) -> (B, C, H, W).
    With `num_classes`, y in [0, num_classes] where `num_classes` is the null (unconditional) label;
    y=None means the null label for every sample.
    """

    def __init__(self, cfg: UNetConfig | None = None):
        super().__init__()
        cfg = cfg or UNetConfig()
        self.cfg = cfg
        ch, groups, drop = cfg.base_channels, cfg.norm_groups, cfg.dropout
        emb_dim = 4 * ch
        self.time_embed = TimeEmbedding(ch, emb_dim)
        self.class_embed = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes else None
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        # down path: remember the channels of every skip connection
        self.down = nn.ModuleList()
        skips, cur, res = [ch], ch, cfg.image_size
        for i, mult in enumerate(cfg.channel_mults):
            level = _Level()
            for _ in range(cfg.num_res_blocks):
                level.res.append(ResBlock(cur, ch * mult, emb_dim, drop, groups))
                cur = ch * mult
                level.attn.append(AttentionBlock(cur, groups, cfg.attn_head_channels)
                                  if res in cfg.attn_resolutions else nn.Identity())
                skips.append(cur)
            level.downsample = Downsample(cur) if i < len(cfg.channel_mults) - 1 else nn.Identity()
            if i < len(cfg.channel_mults) - 1:
                skips.append(cur)
                res //= 2
            self.down.append(level)

        self.mid_res1 = ResBlock(cur, cur, emb_dim, drop, groups)
        self.mid_attn = AttentionBlock(cur, groups, cfg.attn_head_channels)
        self.mid_res2 = ResBlock(cur, cur, emb_dim, drop, groups)

        # up path: one more res block per level, each eating one skip
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(cfg.channel_mults))):
            level = _Level()
            for _ in range(cfg.num_res_blocks + 1):
                level.res.append(ResBlock(cur + skips.pop(), ch * mult, emb_dim, drop, groups))
                cur = ch * mult
                level.attn.append(AttentionBlock(cur, groups, cfg.attn_head_channels)
                                  if res in cfg.attn_resolutions else nn.Identity())
            level.upsample = Upsample(cur) if i > 0 else nn.Identity()
            if i > 0:
                res *= 2
            self.up.append(level)
        assert not skips

        self.norm_out = nn.GroupNorm(groups, cur)
        self.conv_out = nn.Conv2d(cur, cfg.in_channels, 3, padding=1)

    def embed(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Time embedding plus (for a conditional net) the class embedding: (B, 4 * base_channels)."""
        emb = self.time_embed(t)
        if self.class_embed is not None:
            if y is None:
                y = torch.full_like(t, self.cfg.num_classes, dtype=torch.long)
            emb = emb + self.class_embed(y.long())
        elif y is not None:
            raise ValueError("this UNet is unconditional (num_classes=None) but labels y were given")
        return emb

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.cfg.in_channels or x.shape[-1] != x.shape[-2] \
                or x.shape[-1] % 2 ** (len(self.cfg.channel_mults) - 1):
            raise ValueError(
                f"UNet expects (B, {self.cfg.in_channels}, S, S) with S divisible by "
                f"{2 ** (len(self.cfg.channel_mults) - 1)} (trained at {self.cfg.image_size}), got {tuple(x.shape)}")
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        emb = self.embed(t, y)
        h = self.conv_in(x)
        hs = [h]
        for level in self.down:
            for res, attn in zip(level.res, level.attn):
                h = attn(res(h, emb))
                hs.append(h)
            if not isinstance(level.downsample, nn.Identity):
                h = level.downsample(h)
                hs.append(h)
        h = self.mid_res2(self.mid_attn(self.mid_res1(h, emb)), emb)
        for level in self.up:
            for res, attn in zip(level.res, level.attn):
                h = attn(res(torch.cat([h, hs.pop()], dim=1), emb))
            h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


_SDPA_KERNELS = {  # the aten op scaled_dot_product_attention dispatches to -> a short name
    "_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
    "_scaled_dot_product_flash_attention": "flash",
    "_scaled_dot_product_efficient_attention": "memory-efficient",
    "_scaled_dot_product_cudnn_attention": "cuDNN",
    "_scaled_dot_product_fused_attention_overrideable": "fused (device)",
}


def sdpa_kernel(model: nn.Module, x: torch.Tensor, t: torch.Tensor | None = None, **kw) -> str:
    """Which kernel F.scaled_dot_product_attention runs inside `model` for the input x: one of
    "flash (CPU)", "flash", "memory-efficient", "cuDNN", "fused (device)", "math" (the unfused fallback),
    or "none" (no attention ran). Runs one forward pass (without gradients) and watches the aten ops.
    `model` is a UNet (called with x, t and any `kw`) or an AttentionBlock (called with x alone).
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list[str] = []

    class _Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in _SDPA_KERNELS:
                seen.append(_SDPA_KERNELS[name])
            elif name == "_scaled_dot_product_attention_math":
                seen.append("math")
            return func(*args, **(kwargs or {}))

    calls = []
    original = F.scaled_dot_product_attention

    def spy(*a, **k):
        calls.append(1)
        return original(*a, **k)

    F.scaled_dot_product_attention = spy
    try:
        with torch.no_grad(), _Watch():
            model(x) if isinstance(model, AttentionBlock) else model(x, t, **kw)
    finally:
        F.scaled_dot_product_attention = original
    if not calls:
        return "none"
    return seen[0] if seen else "math"  # the math path is composite: only its pieces reach the dispatcher


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
