"""VM-UNet: VMamba encoder + VSS decoder with additive skips (GUIDE §1), for the v0 and the fast block family.

Wiring (published): decoder stage 0 runs blocks on the H/32 encoder output; decoder stages 1..3 take
``x + skip`` (skips are the *inputs* of encoder stages 3, 2, 1), expand ×2, then run their blocks; a final ×4
expand and a 1×1 conv give logits at the input size. Any H×W is accepted: the input is padded to a multiple of
the total stride and the logits are cropped back.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from vm_unet.kernels.routes import route_info

from .vmamba import (BlockStage, PatchExpand2D, VSSBlock, VSSEncoder, init_vmamba_weights, number_quadtree_routers,
                     set_grad_checkpointing)
from .vmamba_fast import PatchExpandFast, VSSBlockFast, VSSEncoderFast

FAMILIES = ("v0", "fast")


class DecoderStage(BlockStage):
    def __init__(self, upsample: nn.Module | None, blocks: Sequence[nn.Module]):
        super().__init__()
        self.upsample = upsample
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample is not None:
            x = self.upsample(x)
        return self.run_blocks(x)


def _drop_path_rates(rate: float, depths: Sequence[int]) -> list[float]:
    return [x.item() for x in torch.linspace(0, rate, sum(depths))] if sum(depths) else []


class VMUNet(nn.Module):
    """Vision-Mamba U-Net returning logits (B, num_classes, H, W) for input (B, in_chans, H, W).

    Args:
        in_chans: input channels (1 for CT/MRI slices, 3 for RGB).
        num_classes: output channels (1 for binary segmentation: apply sigmoid outside).
        dims: encoder widths per stage; the decoder mirrors them.
        depths / depths_decoder: blocks per encoder / decoder stage.
        d_state: SSM state size N (v0: 16, fast: 1).
        drop_path_rate: stochastic depth, linear 0 -> rate over the encoder, reversed over the decoder.
        route: scan route (see ``vm_unet.kernels.list_routes()``): ``cross`` (published), ``bidirectional`` (Vim,
            adds a position embedding), ``zigzag``, ``window:S`` (LocalMamba, S×S windows), ``quadtree[:R]``
            (QuadMamba, learned per-sample order). ``bidirectional`` and ``quadtree`` need ``family="v0"``.
        family: ``"v0"`` (published VM-UNet block, channels-last) or ``"fast"`` (VMamba v2 block, channel-first).
        ssm_ratio / mlp_ratio: fast family only.
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1, dims: Sequence[int] = (96, 192, 384, 768),
                 depths: Sequence[int] = (2, 2, 9, 2), depths_decoder: Sequence[int] = (2, 9, 2, 2),
                 d_state: int = 16, drop_path_rate: float = 0.2, route: str = "cross", family: str = "v0",
                 ssm_ratio: float = 1.0, mlp_ratio: float = 4.0):
        super().__init__()
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
        if not (isinstance(in_chans, int) and in_chans > 0):
            raise ValueError(f"in_chans must be a positive int, got {in_chans!r}")
        if not (isinstance(num_classes, int) and num_classes > 0):
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if len(depths_decoder) != len(dims) or len(depths) != len(dims):
            raise ValueError(f"dims, depths and depths_decoder need one entry per stage: got {list(dims)}, "
                             f"{list(depths)}, {list(depths_decoder)}")
        for i in range(1, len(dims)):
            if dims[i] != 2 * dims[i - 1]:
                raise ValueError(f"each stage must double the width (patch merging/expand): dims={list(dims)}")
        info = route_info(route)
        if family != "v0" and info.position_embedding:
            # the fast encoder has no position embedding
            raise ValueError(f"route {route!r} is implemented for family='v0' only, got family={family!r}")
        self.in_chans, self.num_classes, self.family = in_chans, num_classes, family
        self.stride = 4 * 2 ** (len(dims) - 1)
        dpr = _drop_path_rates(drop_path_rate, depths)
        dpr_dec = _drop_path_rates(drop_path_rate, depths_decoder)[::-1]
        dims_dec = list(dims)[::-1]

        if family == "v0":
            self.encoder = VSSEncoder(in_chans, dims, depths, d_state, dpr, route)
            block = lambda dim, dp: VSSBlock(dim, dp, d_state, route)  # noqa: E731
            expand = PatchExpand2D
        else:
            self.encoder = VSSEncoderFast(in_chans, dims, depths, d_state, ssm_ratio, mlp_ratio, dpr, route)
            block = lambda dim, dp: VSSBlockFast(dim, dp, d_state, ssm_ratio, mlp_ratio, route)  # noqa: E731
            expand = PatchExpandFast
        self.channels_last = self.encoder.channels_last
        self.decoder = nn.ModuleList()
        start = 0
        for i, (dim, depth) in enumerate(zip(dims_dec, depths_decoder)):
            up = expand(2 * dim, dim, 2) if i > 0 else None
            self.decoder.append(DecoderStage(up, [block(dim, dpr_dec[start + j]) for j in range(depth)]))
            start += depth
        self.final_expand = expand(dims[0], dims[0] // 4, 4)
        self.head = nn.Conv2d(dims[0] // 4, num_classes, 1)
        self.apply(init_vmamba_weights)
        number_quadtree_routers(self)   # encoder then decoder blocks: consecutive blocks shift differently

    def check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"VMUNet expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"VMUNet expects a 4D tensor (batch, {self.in_chans}, H, W), got shape {tuple(x.shape)}")
        if not torch.is_floating_point(x):
            raise ValueError(f"VMUNet expects a floating-point tensor, got {x.dtype} (convert with x.float())")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"VMUNet was built with in_chans={self.in_chans} but the input has {x.shape[1]} "
                             f"channels (shape {tuple(x.shape)})")
        if x.numel() == 0:
            raise ValueError(f"VMUNet got an empty tensor of shape {tuple(x.shape)}")

    def set_grad_checkpointing(self, enable: bool = True) -> "VMUNet":
        """Block-level activation checkpointing in the encoder and decoder (see ``BlockStage``); training at high
        resolution then needs much less memory for about one more forward of compute."""
        return set_grad_checkpointing(self, enable)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Padded input -> decoder output before the final expand (B, h, w, C) or (B, C, h, w)."""
        inputs, _, x = self.encoder.forward_stages(x)
        for i, stage in enumerate(self.decoder):
            x = stage(x if i == 0 else x + inputs[-i])
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.final_expand(x)
        if self.channels_last:
            # the 1x1 head as a linear map over channels: permuting the num_classes-channel output is cheaper than
            # the 24-channel input, and the weight gradient stays contiguous (DDP's bucket layout)
            weight = self.head.weight.view(self.head.out_channels, self.head.in_channels)
            return F.linear(x, weight, self.head.bias).permute(0, 3, 1, 2)
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        h, w = x.shape[-2:]
        pad_h, pad_w = -h % self.stride, -w % self.stride
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        logits = self.forward_head(self.forward_features(x))
        return logits[..., :h, :w] if (pad_h or pad_w) else logits
