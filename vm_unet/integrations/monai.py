"""MONAI integration: VMamba backbones for ``FlexibleUNet`` and a MONAI-style VM-UNet network.

After ``import vm_unet``::

    net = monai.networks.nets.FlexibleUNet(in_channels=1, out_channels=3, backbone="vmamba_t", spatial_dims=2)
    net = FlexibleUNet(..., backbone="vmamba_t", pretrained="vmamba_tiny_e292.pth")  # local VMamba checkpoint
    net = VMUNetMonai(spatial_dims=2, in_channels=1, out_channels=3)                 # the full VM-UNet

Both are 2-D networks: for volumes use ``monai.inferers.SliceInferer`` (or 2-D slices in the data pipeline).
``FlexibleUNet`` needs H and W multiples of 32; ``VMUNetMonai`` pads internally and accepts any size, so it also
works with ``sliding_window_inference`` on odd ROI sizes.

Registration uses MONAI's public ``FLEXUNET_BACKBONE.register_class`` with a ``BaseEncoder`` subclass.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import BaseEncoder
from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE

from vm_unet.models.vmunet import VMUNet

from . import _backbone as bb

__all__ = ["VMambaMonaiEncoder", "VMUNetMonai", "register", "register_backbone"]

log = logging.getLogger(__name__)

# name -> backbone spec; FlexibleUNet instantiates the encoder with {"name": ..., spatial_dims, in_channels,
# pretrained}, so specs live here rather than in the (shared, mutated by FlexibleUNet) parameter dicts.
_SPECS: dict[str, dict[str, Any]] = {}


def _load(module: nn.Module, pretrained: bool | str | Path, where: str) -> None:
    if pretrained is False or pretrained is None:
        return
    if pretrained is True:
        raise ValueError(f"{where}: VMamba weights are not downloaded; pass pretrained='path/to/"
                         "vmamba_tiny_e292.pth' (official VMamba v0 checkpoint) instead of True")
    from vm_unet.weights import load_pretrained

    log.info("%s", load_pretrained(module, pretrained).summary())


class VMambaMonaiEncoder(nn.Module, BaseEncoder):
    """FlexibleUNet encoder: 5 outputs at strides 2 (zero channels: the VMamba stem is a stride-4 patch embed,
    the same placeholder smp uses), 4, 8, 16, 32, each a LayerNorm-ed VMamba stage output."""

    def __init__(self, name: str = "vmamba_t", spatial_dims: int = 2, in_channels: int = 3,
                 pretrained: bool | str | Path = False):
        super().__init__()
        if spatial_dims != 2:
            raise ValueError(f"VMamba backbones are 2-D (got spatial_dims={spatial_dims}); run volumes slice by "
                             "slice, e.g. with monai.inferers.SliceInferer")
        if name not in _SPECS:
            raise KeyError(f"unknown VMamba backbone {name!r}; registered: {', '.join(sorted(_SPECS))}")
        spec = _SPECS[name]
        self.model = bb.build_trunk(spec, in_channels, 4)
        self.out_norms = bb.build_out_norms(spec, 4)
        _load(self.model, pretrained, f"backbone {name!r}")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        bb.check_size(x, self.model, "VMamba FlexibleUNet backbone")
        b, _, h, w = x.shape
        dummy = torch.empty([b, 0, h // 2, w // 2], dtype=x.dtype, device=x.device)
        return [dummy, *bb.trunk_features(self.model, self.out_norms, x)]

    @classmethod
    def _names(cls) -> list[str]:
        return list(getattr(cls, "_only", None) or bb.SPECS)

    @classmethod
    def get_encoder_names(cls) -> list[str]:
        return cls._names()

    @classmethod
    def get_encoder_parameters(cls) -> list[dict]:
        return [{"name": n, "spatial_dims": 2, "in_channels": 3, "pretrained": False} for n in cls._names()]

    @classmethod
    def num_channels_per_output(cls) -> list[tuple[int, ...]]:
        return [(0, *_SPECS[n]["dims"]) for n in cls._names()]

    @classmethod
    def num_outputs(cls) -> list[int]:
        return [5 for _ in cls._names()]


def register_backbone(name: str, base: str | None = None, **spec: Any) -> str:
    """Register a FlexibleUNet backbone ``name``: a VMamba size (``base``) with overrides (``dims``, ``depths``,
    ``family``, ...). Returns ``name``."""
    _SPECS[name] = bb.make_spec(base, **spec)
    # A subclass per custom name so register_class (which walks get_encoder_names) registers just this one.
    cls = type(f"VMambaMonaiEncoder_{name}", (VMambaMonaiEncoder,), {"_only": [name]})
    FLEXUNET_BACKBONE.register_class(cls)
    return name


def register() -> None:
    """Register the standard sizes (``vmamba_t`` ... ``vmamba_fast_b``) as FlexibleUNet backbones (idempotent)."""
    for name in bb.SPECS:
        _SPECS.setdefault(name, bb.make_spec(name))
    FLEXUNET_BACKBONE.register_class(VMambaMonaiEncoder)


class VMUNetMonai(VMUNet):
    """VM-UNet with MONAI's constructor conventions (``spatial_dims``, ``in_channels``, ``out_channels``).

    It is a ``VMUNet`` (same parameter names, so ``vm_unet.weights.load_pretrained`` and our checkpoints work) that
    returns logits of the input's size for any H×W.

    Args:
        spatial_dims: must be 2.
        in_channels / out_channels: input channels and number of output logits.
        feature_size: width of the first stage (96 in the paper); stages double it.
        depths / depths_decoder: blocks per encoder / decoder stage (paper ISIC config by default).
        d_state, drop_path_rate, route, family, ssm_ratio, mlp_ratio: as ``vm_unet.models.VMUNet``.
        pretrained: optional checkpoint path (VMamba v0 ImageNet, published VM-UNet, or ours).
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 1, feature_size: int = 96,
                 depths: Sequence[int] = (2, 2, 2, 2), depths_decoder: Sequence[int] = (2, 2, 2, 1),
                 d_state: int = 16, drop_path_rate: float = 0.2, route: str = "cross", family: str = "v0",
                 ssm_ratio: float = 1.0, mlp_ratio: float = 4.0, pretrained: str | Path | None = None):
        if spatial_dims != 2:
            raise ValueError(f"VMUNetMonai is 2-D (got spatial_dims={spatial_dims}); run volumes slice by slice, "
                             "e.g. with monai.inferers.SliceInferer")
        dims = [feature_size * 2 ** i for i in range(4)]
        super().__init__(in_channels, out_channels, dims, depths, depths_decoder, d_state, drop_path_rate, route,
                         family, ssm_ratio, mlp_ratio)
        self.spatial_dims = spatial_dims
        _load(self, pretrained if pretrained is not None else False, "VMUNetMonai")
