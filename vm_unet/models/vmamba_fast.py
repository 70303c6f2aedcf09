"""Fast VMamba family (VMamba's later "v2" design) in channel-first (B, C, H, W) layout.

Differences from v0 (GUIDE §1): d_state 1, ssm_ratio 1 (d_inner = C), no z gate, an MLP (ratio 4) in every block,
3×3/s2 conv downsampling, a two-conv stem, LayerNorm over channels of (B, C, H, W) tensors. The SS2D core and
its kernels are the same as v0; only the block around them changes.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .vmamba import DropPath, SSMCore, StagedEncoder


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dim of a (B, C, H, W) tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # contiguous NCHW out: a channels-last-strided result would make every following conv produce
        # channels-last weight gradients, which DDP then copies into its buckets every step
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2).contiguous()


class SS2DFast(SSMCore):
    """1×1 in_proj -> depthwise 3×3 + SiLU -> SS2D core -> LayerNorm2d -> 1×1 out_proj (no gate)."""

    def __init__(self, d_model: int, d_state: int = 1, ssm_ratio: float = 1.0, d_conv: int = 3,
                 dt_rank: int | str = "auto", route: str = "cross"):
        super().__init__()
        d_inner = int(ssm_ratio * d_model)
        self._init_ssm(d_model, d_inner, d_state, dt_rank, route)
        self.in_proj = nn.Conv2d(d_model, d_inner, 1, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=False)
        self.out_norm = LayerNorm2d(d_inner)
        self.out_proj = nn.Conv2d(d_inner, d_model, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels last at d_state 1 (conv_act); out_norm then reads y in place, a LayerNorm over the innermost axis,
        # and returns channel first
        return self.out_proj(self.out_norm(self.forward_core(self.conv_act(self.in_proj(x)))))


class VSSBlockFast(nn.Module):
    """``x + DropPath(SS2D(LN(x)))`` then ``x + DropPath(MLP(LN(x)))``, channel-first."""

    def __init__(self, dim: int, drop_path: float = 0.0, d_state: int = 1, ssm_ratio: float = 1.0,
                 mlp_ratio: float = 4.0, route: str = "cross"):
        super().__init__()
        self.norm = LayerNorm2d(dim)
        self.ss2d = SS2DFast(dim, d_state=d_state, ssm_ratio=ssm_ratio, route=route)
        hidden = int(dim * mlp_ratio)
        self.norm2 = LayerNorm2d(dim)
        self.mlp = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.GELU(), nn.Conv2d(hidden, dim, 1))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.ss2d(self.norm(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class StemFast(nn.Module):
    """Two 3×3/s2 convs (C/2, then C) with LayerNorm2d and GELU between: H/4."""

    def __init__(self, in_chans: int, embed_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, embed_dim // 2, 3, stride=2, padding=1)
        self.norm1 = LayerNorm2d(embed_dim // 2)
        self.conv2 = nn.Conv2d(embed_dim // 2, embed_dim, 3, stride=2, padding=1)
        self.norm2 = LayerNorm2d(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.conv2(F.gelu(self.norm1(self.conv1(x)))))


class DownsampleFast(nn.Module):
    """3×3/s2 conv to 2C + LayerNorm2d."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, 2 * dim, 3, stride=2, padding=1)
        self.norm = LayerNorm2d(2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class PatchExpandFast(nn.Module):
    """1×1 conv (c_in -> scale²·c_out, no bias) -> pixel shuffle -> LayerNorm2d(c_out)."""

    def __init__(self, in_dim: int, out_dim: int, scale: int):
        super().__init__()
        self.expand = nn.Conv2d(in_dim, scale * scale * out_dim, 1, bias=False)
        self.shuffle = nn.PixelShuffle(scale)
        self.norm = LayerNorm2d(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.shuffle(self.expand(x)))


class VSSEncoderFast(StagedEncoder):
    """Fast VMamba encoder, channel-first; same ``forward_stages``/``forward`` contract as ``VSSEncoder``."""

    def __init__(self, in_chans: int = 3, dims: Sequence[int] = (96, 192, 384, 768),
                 depths: Sequence[int] = (2, 2, 5, 2), d_state: int = 1, ssm_ratio: float = 1.0,
                 mlp_ratio: float = 4.0, drop_path: Sequence[float] | None = None, route: str = "cross"):
        super().__init__()
        self.patch_embed = StemFast(in_chans, dims[0])
        self._build_stages(dims, depths, drop_path,
                           lambda dim, dp: VSSBlockFast(dim, dp, d_state, ssm_ratio, mlp_ratio, route), DownsampleFast)
