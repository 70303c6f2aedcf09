"""Selective scan in Triton (forward and backward), registered as torch custom ops.

Same signature and return convention as ``selective_scan_torch`` / mamba's ``selective_scan_fn``. Inputs may be
fp32, bf16 or fp16 (mixed too, as autocast leaves them); state and accumulation are fp32 and the output has u's
dtype. The ops are ``vm_unet::selective_scan_fwd`` / ``vm_unet::selective_scan_bwd`` with fake (meta)
implementations, so ``torch.compile`` traces through them without graph breaks.
"""
from __future__ import annotations

from typing import Optional

import torch

from .selective_scan_torch import _prepare
from . import triton_scan_core as core


def _strides4(t: torch.Tensor, groups: int):
    """Strides (batch, group, channel-in-group, position) of a (b, G*Dg, L) tensor viewed as groups."""
    dg = t.shape[1] // groups
    return t.stride(0), dg * t.stride(1), t.stride(1), t.stride(2)


def _input_args(u, delta, A, B4, C4, D, z, delta_bias, groups) -> tuple:
    """The argument prefix the forward and backward kernels share: the inputs in selective-scan layout (no route
    gather, no low-rank Δ: those slots get placeholders the kernel never reads)."""
    return (u, u, *_strides4(u, groups),
            delta, *_strides4(delta, groups),
            A, 0, 0,
            delta_bias if delta_bias is not None else A, A, D if D is not None else A,
            B4, *B4.stride(), C4, *C4.stride(),
            z, *_strides4(z, groups),
            A, 0, 0, A, A)


def _bc4(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 4 else t.unsqueeze(1)


def _setup(u, A, B4, D, z, delta_bias, softplus, backward):
    batch, dim, length = u.shape
    groups, n_state = B4.shape[1], A.shape[1]
    dims = core.ScanDims(batch, groups, dim // groups, length, n_state, 0)
    plan = core.launch_plan(n_state, length, dims.channels, backward=backward, rows=batch * groups)
    flags = dict(GATHER=False, AFFINE=False, LINES=False, KMAP=False, LOWRANK=False, HAS_BIAS=delta_bias is not None,
                 SOFTPLUS=softplus, HAS_D=D is not None, HAS_Z=z is not None)
    return dims, plan, flags


@torch.library.custom_op("vm_unet::selective_scan_fwd", mutates_args=())
def selective_scan_fwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
                       delta_softplus: bool) -> tuple[torch.Tensor, torch.Tensor]:
    batch, dim, _ = u.shape
    A, B4, C4 = A.contiguous(), _bc4(B), _bc4(C)
    out = torch.empty_like(u, memory_format=torch.contiguous_format)
    last = torch.empty(batch, dim, A.shape[1], device=u.device, dtype=torch.float32)
    dims, plan, flags = _setup(u, A, B4, D, z, delta_bias, delta_softplus, backward=False)
    zz = z if z is not None else u
    core.scan_forward(_input_args(u, delta, A, B4, C4, D, zz, delta_bias, dims.slots), dims, plan, flags,
                      out=out, out_strides=_strides4(out, dims.slots), last=last)
    return out, last.to(u.dtype)


@selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    return torch.empty_like(u, memory_format=torch.contiguous_format), u.new_empty(u.shape[0], u.shape[1], A.shape[1])


@torch.library.custom_op("vm_unet::selective_scan_bwd", mutates_args=())
def selective_scan_bwd(grad_out: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor,
                       B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor], z: Optional[torch.Tensor],
                       delta_bias: Optional[torch.Tensor], delta_softplus: bool) -> list[torch.Tensor]:
    """Returns [du, ddelta, dA, dB, dC, dD, dz, ddelta_bias]; entries for absent inputs are empty tensors."""
    A, B4, C4 = A.contiguous(), _bc4(B), _bc4(C)
    dims, plan, flags = _setup(u, A, B4, D, z, delta_bias, delta_softplus, backward=True)
    grad_out = grad_out.contiguous()
    du = torch.empty(u.shape, device=u.device, dtype=u.dtype)
    ddelta = torch.empty(delta.shape, device=u.device, dtype=delta.dtype)
    dz = torch.empty(u.shape, device=u.device, dtype=z.dtype) if z is not None else None
    dB = torch.zeros(B4.shape, device=u.device, dtype=torch.float32)
    dC = torch.zeros(C4.shape, device=u.device, dtype=torch.float32)
    zz = z if z is not None else u
    if dz is not None and dz.stride() != zz.stride():
        zz = zz.contiguous()
    groups = dims.slots
    dA, dD, dbias = core.scan_backward(
        _input_args(u, delta, A, B4, C4, D, zz, delta_bias, groups), dims, plan, flags,
        g=(grad_out, grad_out, *_strides4(grad_out, groups)), du=(du, *_strides4(du, groups)), atomic_du=False,
        ddt=(ddelta, *_strides4(ddelta, groups)), dz=dz, dB=(dB, *dB.stride()), dC=(dC, *dC.stride()))
    # each absent gradient gets its own empty tensor: custom-op outputs may not alias each other
    return [du, ddelta, dA.to(A.dtype), dB.view(B.shape).to(B.dtype), dC.view(C.shape).to(C.dtype),
            dD.to(D.dtype) if D is not None else u.new_empty(0), dz if dz is not None else u.new_empty(0),
            dbias.to(delta_bias.dtype) if delta_bias is not None else u.new_empty(0)]


@selective_scan_bwd.register_fake
def _(grad_out, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    return [torch.empty_like(u), torch.empty_like(delta), torch.empty_like(A), torch.empty_like(B),
            torch.empty_like(C), torch.empty_like(D) if D is not None else u.new_empty(0),
            torch.empty_like(z) if z is not None else u.new_empty(0),
            torch.empty_like(delta_bias) if delta_bias is not None else u.new_empty(0)]


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
    ctx.delta_softplus = delta_softplus


def _backward(ctx, grad_out, grad_last):
    u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(u)
    du, ddelta, dA, dB, dC, dD, dz, dbias = selective_scan_bwd(grad_out, u, delta, A, B, C, D, z, delta_bias,
                                                               ctx.delta_softplus)
    return (du, ddelta, dA, dB, dC, dD if D is not None else None, dz if z is not None else None,
            dbias if delta_bias is not None else None, None)


selective_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False):
    """Triton selective scan (mamba ``selective_scan_fn`` signature); see ``selective_scan_torch`` for the math.

    The last state is not differentiable (as in the reference).
    """
    _prepare(u, delta, A, B, C, D, z, delta_bias)
    out, last = selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus))
    return (out, last) if return_last_state else out
