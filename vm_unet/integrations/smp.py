"""VMamba encoders for segmentation_models_pytorch (smp >= 0.4; written against 0.6's encoder contract).

After ``import vm_unet`` every smp architecture takes ``encoder_name="vmamba_t"`` (also ``vmamba_s``,
``vmamba_b``, ``vmamba_fast_t``, ``vmamba_fast_s``, ``vmamba_fast_b``)::

    model = smp.Unet("vmamba_t", encoder_weights=None, in_channels=1, classes=3)
    vm_unet.weights.load_pretrained(model, "vmamba_tiny_e292.pth")   # 1-channel stem: RGB filters summed

smp's ``get_encoder`` only fetches ``encoder_weights`` names from the Hugging Face Hub, so a local checkpoint is
either loaded afterwards (above) or bound to a new encoder name once::

    register_encoder("vmamba_t_in1k", base="vmamba_t", weights="vmamba_tiny_e292.pth")
    model = smp.FPN("vmamba_t_in1k", encoder_weights=None, in_channels=1)

``register_encoder`` also makes custom sizes (``dims``, ``depths``, ...) available to every architecture.

Contract (smp 0.6, ``encoders/_base.py``): ``forward`` returns ``depth + 1`` features ``[x, s2, s4, s8, s16, s32]``;
VMamba's stem is a stride-4 patch embed, so the stride-2 feature is the zero-channel placeholder smp's own
stride-4 encoders (``mix_transformer``, ``TimmUniversalEncoder``) use. ``output_stride`` 8/16 (DeepLabV3/V3+, PAN)
replaces the strides of the deepest stages with dilation (see ``_backbone.dilate_trunk``). Inputs must be
multiples of the output stride, as smp checks.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn
from segmentation_models_pytorch import encoders as _smp_encoders
from segmentation_models_pytorch.encoders._base import EncoderMixin

from . import _backbone as bb

__all__ = ["VMambaEncoder", "register", "register_encoder", "IMAGENET_MEAN", "IMAGENET_STD"]

log = logging.getLogger(__name__)
IMAGENET_MEAN, IMAGENET_STD = bb.IMAGENET_MEAN, bb.IMAGENET_STD


class VMambaEncoder(nn.Module, EncoderMixin):
    """smp encoder around our VMamba trunk (``self.model``: a ``VSSEncoder``/``VSSEncoderFast`` cut to ``depth - 1``
    stages) plus one LayerNorm per output stage (``self.out_norms``).

    Args (``params`` of the smp registry entry, plus what ``get_encoder`` adds):
        spec: backbone spec (``_backbone.make_spec``): family, dims, depths, d_state, drop_path_rate, ...
        depth: number of downsamplings smp asks for, 2..5 (decoders use 3..5).
        output_stride: 32, or 8/16 after ``make_dilated`` (called by ``get_encoder``).
        weights: optional path of a checkpoint to load at construction (VMamba v0 / VM-UNet / ours).
    """

    def __init__(self, spec: dict[str, Any], depth: int = 5, output_stride: int = 32, weights: str | None = None):
        if not 2 <= depth <= 5:
            raise ValueError(f"{type(self).__name__} depth should be in range [2, 5], got {depth} "
                             "(the first VMamba feature is at stride 4)")
        super().__init__()
        spec = bb.make_spec(**spec)
        self.spec = spec
        self.model = bb.build_trunk(spec, 3, depth - 1)
        self.out_norms = bb.build_out_norms(spec, depth - 1)
        self._depth = depth
        self._in_channels = 3
        self._out_channels = [3, 0, *spec["dims"]]
        self._output_stride = output_stride
        self._weights_loaded = False
        if weights is not None:
            from vm_unet.weights import load_pretrained

            report = load_pretrained(self.model, weights)
            log.info("%s", report.summary())
            self._weights_loaded = True

    def set_in_channels(self, in_channels: int, pretrained: bool = True) -> None:
        # get_encoder passes pretrained=False when it downloaded nothing; weights bound by register_encoder were
        # loaded in __init__ and must be adapted (summed for 1 channel), not re-initialised.
        super().set_in_channels(in_channels, pretrained=pretrained or self._weights_loaded)

    def get_stages(self) -> dict[int, list[nn.Module]]:
        layers = self.model.layers
        stages = {}
        for stride, i in ((16, 2), (32, 3)):
            if i < len(layers):
                stages[stride] = [layers[i - 1].downsample, layers[i]]
        return stages

    def make_dilated(self, output_stride: int) -> None:
        # PatchMerging2D is a gather + Linear, not a strided conv, so smp's generic conv patching does not apply.
        bb.dilate_trunk(self.model, output_stride)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        bb.check_size(x, self.model, type(self).__name__)
        b, _, h, w = x.shape
        dummy = torch.empty([b, 0, h // 2, w // 2], dtype=x.dtype, device=x.device)
        return [x, dummy, *bb.trunk_features(self.model, self.out_norms, x)]

    def load_state_dict(self, state_dict, strict: bool = True, **kwargs):
        # smp hub weights never exist for these names; the official checkpoints go through vm_unet.weights.
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(("head.", "norm."))}
        return super().load_state_dict(state_dict, strict=strict, **kwargs)


def _entry(spec: dict[str, Any], weights: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {"spec": spec}
    if weights is not None:
        params["weights"] = str(weights)
    # No hub repos: smp raises its usual "Wrong pretrained weights" KeyError for any encoder_weights value.
    return {"encoder": VMambaEncoder, "pretrained_settings": {}, "params": params}


def register_encoder(name: str, base: str | None = None, weights: str | None = None, *, overwrite: bool = False,
                     **spec: Any) -> str:
    """Make ``name`` an smp encoder: a registered VMamba size (``base``) with ``spec`` overrides (``dims``,
    ``depths``, ``d_state``, ``drop_path_rate``, ``route``, ``family``...), optionally loading ``weights`` (a local
    checkpoint) whenever a model is built with it. Returns ``name``.

    smp 0.6 has no public registration function: entries of ``segmentation_models_pytorch.encoders.encoders`` are
    how its own encoder families register, and ``get_encoder`` reads that dict at call time.
    """
    if name in _smp_encoders.encoders and not overwrite:
        raise KeyError(f"smp encoder {name!r} already exists (pass overwrite=True to replace it)")
    _smp_encoders.encoders[name] = _entry(bb.make_spec(base, **spec), weights)
    return name


def register() -> None:
    """Register ``vmamba_t/s/b`` and ``vmamba_fast_t/s/b`` (idempotent)."""
    for name in bb.SPECS:
        if name not in _smp_encoders.encoders:
            register_encoder(name, base=name)
