"""Framework-neutral VMamba backbone pieces shared by the smp and MONAI adapters (no smp/monai import here).

A *trunk* is our ``VSSEncoder`` (v0, channels-last) or ``VSSEncoderFast`` (channel-first), cut to the number of
stages a framework asks for, so unused stages hold no parameters (DDP would complain about them otherwise).
Backbone features are the stage outputs (after the blocks) passed through one LayerNorm per stage, as VMamba's
own segmentation/detection backbones do: the pre-norm residual stream grows with depth and the decoders of smp
and MONAI expect normalised inputs.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from vm_unet.models.vmamba import PatchMerging2D, VSSEncoder
from vm_unet.models.vmamba_fast import LayerNorm2d, VSSEncoderFast

# Published VMamba sizes. v0 (the VM-UNet block): T/S/B of the VMamba v0 release (d_state 16, no MLP).
# Fast family: VMamba v2 "v" configs (d_state 1, ssm_ratio 1, MLP 4). Drop-path rates are fine-tuning defaults.
SPECS: dict[str, dict[str, Any]] = {
    "vmamba_t": dict(family="v0", dims=(96, 192, 384, 768), depths=(2, 2, 9, 2), d_state=16, drop_path_rate=0.2),
    "vmamba_s": dict(family="v0", dims=(96, 192, 384, 768), depths=(2, 2, 27, 2), d_state=16, drop_path_rate=0.3),
    "vmamba_b": dict(family="v0", dims=(128, 256, 512, 1024), depths=(2, 2, 27, 2), d_state=16,
                     drop_path_rate=0.4),
    "vmamba_fast_t": dict(family="fast", dims=(96, 192, 384, 768), depths=(2, 2, 8, 2), d_state=1,
                          drop_path_rate=0.2, ssm_ratio=1.0, mlp_ratio=4.0),
    "vmamba_fast_s": dict(family="fast", dims=(96, 192, 384, 768), depths=(2, 2, 20, 2), d_state=1,
                          drop_path_rate=0.3, ssm_ratio=1.0, mlp_ratio=4.0),
    "vmamba_fast_b": dict(family="fast", dims=(128, 256, 512, 1024), depths=(2, 2, 20, 2), d_state=1,
                          drop_path_rate=0.4, ssm_ratio=1.0, mlp_ratio=4.0),
}
SPEC_KEYS = {"family", "dims", "depths", "d_state", "drop_path_rate", "route", "ssm_ratio", "mlp_ratio"}

# ImageNet statistics the VMamba checkpoints were trained with (inputs scaled to [0, 1] first).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def make_spec(base: str | None = None, **overrides: Any) -> dict[str, Any]:
    """A backbone spec: a registered one (``base``) with ``overrides``, or a full spec from ``overrides``."""
    unknown = set(overrides) - SPEC_KEYS
    if unknown:
        raise ValueError(f"unknown VMamba backbone options {sorted(unknown)}; allowed: {sorted(SPEC_KEYS)}")
    if base is not None and base not in SPECS:
        raise KeyError(f"unknown VMamba backbone {base!r}; available: {', '.join(sorted(SPECS))}")
    spec = {"route": "cross", "ssm_ratio": 1.0, "mlp_ratio": 4.0, **copy.deepcopy(SPECS.get(base, {})), **overrides}
    missing = {"family", "dims", "depths", "d_state", "drop_path_rate"} - set(spec)
    if missing:
        raise ValueError(f"VMamba backbone spec lacks {sorted(missing)} (give base= or all of them)")
    if spec["family"] not in ("v0", "fast"):
        raise ValueError(f"family must be 'v0' or 'fast', got {spec['family']!r}")
    spec["dims"], spec["depths"] = tuple(int(d) for d in spec["dims"]), tuple(int(d) for d in spec["depths"])
    if len(spec["dims"]) != 4 or len(spec["depths"]) != 4:
        raise ValueError(f"VMamba backbones have 4 stages; got dims {spec['dims']} depths {spec['depths']}")
    return spec


def build_trunk(spec: dict[str, Any], in_chans: int, num_stages: int) -> nn.Module:
    """The first ``num_stages`` stages of the encoder; drop-path rates as in the full-depth model."""
    if not 1 <= num_stages <= 4:
        raise ValueError(f"a VMamba backbone has 1..4 stages, asked for {num_stages}")
    depths_all = spec["depths"]
    dpr = [x.item() for x in torch.linspace(0, spec["drop_path_rate"], sum(depths_all))]
    dims, depths = spec["dims"][:num_stages], depths_all[:num_stages]
    dpr = dpr[:sum(depths)]
    if spec["family"] == "v0":
        return VSSEncoder(in_chans, dims, depths, spec["d_state"], dpr, spec["route"])
    return VSSEncoderFast(in_chans, dims, depths, spec["d_state"], spec["ssm_ratio"], spec["mlp_ratio"], dpr,
                          spec["route"])


def build_out_norms(spec: dict[str, Any], num_stages: int) -> nn.ModuleList:
    norm = nn.LayerNorm if spec["family"] == "v0" else LayerNorm2d
    return nn.ModuleList([norm(d) for d in spec["dims"][:num_stages]])


def check_size(x: torch.Tensor, trunk: nn.Module, where: str) -> None:
    """Patch embed (/4) and every patch merging (/2) need exact divisions; say so instead of a shape error."""
    if x.dim() != 4:
        raise ValueError(f"{where}: expected a (batch, channels, H, W) tensor, got shape {tuple(x.shape)}")
    m = input_multiple(trunk)
    if x.shape[-2] % m or x.shape[-1] % m:
        raise ValueError(f"{where}: input H and W must be multiples of {m}, got {tuple(x.shape[-2:])}; "
                         f"pad the image (e.g. monai.transforms.DivisiblePad(k={m}))")


def _is_strided(downsample: nn.Module) -> bool:
    if isinstance(downsample, DilatedPatchMerging2D):
        return False
    return not (hasattr(downsample, "conv") and downsample.conv.stride == (1, 1))


def input_multiple(trunk: nn.Module) -> int:
    """What H and W must be multiples of: 4 (patch embed) times 2 per strided downsample."""
    return 4 * 2 ** sum(1 for layer in trunk.layers[:-1] if _is_strided(layer.downsample))


def trunk_features(trunk: nn.Module, out_norms: nn.ModuleList, x: torch.Tensor) -> list[torch.Tensor]:
    """Normalised stage features, channel-first (B, c_i, H/4/2^i, W/4/2^i) (less reduction when dilated)."""
    feats = trunk.forward_stages(x)[1]
    if isinstance(trunk, VSSEncoder):
        return [n(f).permute(0, 3, 1, 2).contiguous() for n, f in zip(out_norms, feats)]
    return [n(f) for n, f in zip(out_norms, feats)]


class DilatedPatchMerging2D(PatchMerging2D):
    """Patch merging at stride 1: gathers the 2×2 neighbourhood with spacing ``dilation`` (zero padded at the
    bottom/right), keeping the ``norm``/``reduction`` weights of the strided layer it replaces. With dilation 1,
    its output subsampled [::2, ::2] is exactly the strided output; this is the v0 analogue of smp's
    "replace stride with dilation" for output strides 8/16 (DeepLabV3/V3+, PAN)."""

    def __init__(self, dim: int, dilation: int):
        super().__init__(dim)
        self.dilation = int(dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.dilation
        h, w = x.shape[1], x.shape[2]
        p = F.pad(x, (0, 0, 0, d, 0, d))
        # Same order as PatchMerging2D: (dy, dx) = (0, 0), (1, 0), (0, 1), (1, 1).
        x = torch.cat([p[:, :h, :w], p[:, d:h + d, :w], p[:, :h, d:w + d], p[:, d:h + d, d:w + d]], dim=-1)
        return self.reduction(self.norm(x))

    def extra_repr(self) -> str:
        return f"dilation={self.dilation}"


def _dilate_convs(module: nn.Module, rate: int) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            m.stride = (1, 1)
            m.dilation = (rate, rate)
            m.padding = ((m.kernel_size[0] // 2) * rate, (m.kernel_size[1] // 2) * rate)


def dilate_trunk(trunk: nn.Module, output_stride: int) -> None:
    """Replace the strides of the stages deeper than ``output_stride`` with dilation (in place, weights kept).

    Stage i (features at stride 4·2^i) gets rate r = 4·2^i / output_stride: its 3×3 convs use dilation r, and the
    downsample feeding it runs at stride 1 with spacing r/2 (its input grid is already dilated by r/2).
    """
    if output_stride not in (8, 16):
        raise ValueError(f"output stride should be 8 or 16, got {output_stride}")
    for i in range(1, len(trunk.layers)):
        rate = 4 * 2 ** i // output_stride
        if rate < 2:
            continue
        prev = trunk.layers[i - 1]
        if isinstance(trunk, VSSEncoder):
            old = prev.downsample
            new = DilatedPatchMerging2D(old.norm.normalized_shape[0] // 4, rate // 2)
            new.load_state_dict(old.state_dict())
            prev.downsample = new.to(old.reduction.weight.device, old.reduction.weight.dtype)
        else:
            _dilate_convs(prev.downsample, rate // 2)
        _dilate_convs(trunk.layers[i].blocks, rate)
