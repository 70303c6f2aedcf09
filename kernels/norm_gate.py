"""VMamba's SS2D output stage: LayerNorm over the channels of the channel-first scan output, times a SiLU gate.

    y        (b, D, H, W)   the merged scan output, channel-first as the SS2D core returns it
    z        (b, H, W, D)   the gate: the second half of in_proj's output (channel-last, stride 1 over D)
    weight, bias (D,)       the LayerNorm's affine parameters
    returns  (b, H, W, D)   layer_norm(y over D) * silu(z), channel-last and contiguous, ready for out_proj

The reference is VMamba's ``out_norm(y.permute(0, 2, 3, 1)) * silu(z)``. In eager mode with autocast that is a
permuted copy to fp32, another to make it contiguous, the norm, the gate, the product and a cast back for out_proj,
each a pass over the block's largest activation, and as many again in the backward (BENCHMARKS.md). The Triton
kernel reads y and z once and writes the product once, in the dtype out_proj casts it to anyway. Under
``torch.compile`` the reference runs, because inductor fuses it itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import use_triton


def norm_gate_reference(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        eps: float) -> torch.Tensor:
    return F.layer_norm(y.permute(0, 2, 3, 1), (y.shape[1],), weight, bias, eps) * F.silu(z)


def norm_gate_dtype(y: torch.Tensor, z: torch.Tensor) -> torch.dtype:
    """The fused output's dtype: under autocast the autocast dtype (the reference's fp32 product is cast to it by
    the next linear layer anyway), else what the reference returns."""
    if torch.is_autocast_enabled(y.device.type):
        return torch.get_autocast_dtype(y.device.type)
    return torch.promote_types(y.dtype, z.dtype)


def norm_gate(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
              eps: float) -> torch.Tensor:
    """Fused on CUDA in eager mode (Triton), the reference elsewhere (``VM_UNET_BACKEND`` forces either)."""
    b, d, h, w = y.shape
    if tuple(z.shape) != (b, h, w, d) or tuple(weight.shape) != (d,) or tuple(bias.shape) != (d,):
        raise ValueError(f"norm_gate: y (b, D, H, W) = {tuple(y.shape)} needs z (b, H, W, D) and weight/bias (D,), "
                         f"got z {tuple(z.shape)}, weight {tuple(weight.shape)}, bias {tuple(bias.shape)}")
    if not torch.compiler.is_compiling() and use_triton(y, z):
        from .triton_norm_gate import norm_gate_triton  # noqa: PLC0415 (triton is imported only when used)
        return norm_gate_triton(y, z, weight, bias, eps, norm_gate_dtype(y, z))
    return norm_gate_reference(y, z, weight, bias, eps)
