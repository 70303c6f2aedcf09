"""Fused SS2D core in Triton: route gather + low-rank Δ + selective scan + merge, forward and backward.

``ss2d_core_triton`` has ``ss2d_core``'s signature and shapes (see ``kernels/ss2d.py``). Per (batch, direction k,
block of channels) one program reads x (b, D, H, W) through the route's gather map ``idx[k]`` (no direction
copies), builds Δ = dt_weight[k] @ dt_low on the fly, scans, and adds its y into one merged fp32 (b, D, H*W)
buffer with atomics through the same map (gathering by idx and scattering by idx are inverse maps, so any
permutation route works unchanged). Backward saves only the inputs and recomputes (see ``triton_scan_core``).

Registered as ``vm_unet::ss2d_fwd`` / ``vm_unet::ss2d_bwd`` custom ops (fake impls for torch.compile); inputs of
any float dtype, fp32 compute, output in x's dtype.
"""
from __future__ import annotations

import functools

import torch

from . import triton_scan_core as core  # kernels looked up at call time: tests may reload it for the interpreter
from .routes import route_indices


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=256)
def _route_map(route: str, h: int, w: int, device: str) -> torch.Tensor:
    # int32 keeps the gather map at 4 bytes a position; H*W < 2**31 always here
    return route_indices(route, h, w, device).to(torch.int32).contiguous()


def _common(x, dt_low, B, C, dt_weight, A):
    b, d, h, w = x.shape
    k, _, r = dt_weight.shape
    n = A.shape[1]
    L = h * w
    return (x.contiguous().view(b, d, L), dt_low.contiguous().view(b, k, r, L), B.contiguous().view(b, k, n, L),
            C.contiguous().view(b, k, n, L), dt_weight.contiguous(), b, d, k, r, n, L)


def _launch_fwd(xs, lows, Bs, Cs, W, dt_bias, A, Ds, idx, out, states, b, d, k, r, n, L, backward):
    bd, np_, bl, warps = core.tile_config(n, L, d, backward=backward)
    nchunk = _cdiv(L, bl)
    grid = (_cdiv(d, bd), k, b)
    core._scan_fwd_kernel[grid](
        xs, xs.stride(0), 0, xs.stride(1), xs.stride(2),
        lows, lows.stride(0), lows.stride(1), lows.stride(2), lows.stride(3),
        W, W.stride(0), W.stride(1),
        dt_bias, A, Ds,
        Bs, *Bs.stride(), Cs, *Cs.stride(),
        xs, 0, 0, 0, 0,
        idx, idx.stride(0),
        out if out is not None else xs, xs.shape[1] * L, 0, L, 1,
        states if states is not None else xs, xs,
        k, d, L, n, r, nchunk,
        BD=bd, NP=np_, BL=bl, GATHER=True, LOWRANK=True, HAS_BIAS=True, SOFTPLUS=True, HAS_D=True, HAS_Z=False,
        ATOMIC_OUT=True, WRITE_OUT=out is not None, STORE_STATES=states is not None, WRITE_LAST=False,
        num_warps=warps,
    )


@torch.library.custom_op("vm_unet::ss2d_fwd", mutates_args=())
def ss2d_fwd(x: torch.Tensor, dt_low: torch.Tensor, B: torch.Tensor, C: torch.Tensor, dt_weight: torch.Tensor,
             dt_bias: torch.Tensor, A: torch.Tensor, Ds: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    xs, lows, Bs, Cs, W, b, d, k, r, n, L = _common(x, dt_low, B, C, dt_weight, A)
    out = torch.zeros(b, d, L, device=x.device, dtype=torch.float32)
    _launch_fwd(xs, lows, Bs, Cs, W, dt_bias.contiguous(), A.contiguous(), Ds.contiguous(), idx, out, None,
                b, d, k, r, n, L, backward=False)
    return out.view(x.shape).to(x.dtype)


@ss2d_fwd.register_fake
def _(x, dt_low, B, C, dt_weight, dt_bias, A, Ds, idx):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("vm_unet::ss2d_bwd", mutates_args=())
def ss2d_bwd(grad: torch.Tensor, x: torch.Tensor, dt_low: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             dt_weight: torch.Tensor, dt_bias: torch.Tensor, A: torch.Tensor, Ds: torch.Tensor,
             idx: torch.Tensor) -> list[torch.Tensor]:
    """[dx, d dt_low, dB, dC, d dt_weight, d dt_bias, dA, dDs]."""
    xs, lows, Bs, Cs, W, b, d, k, r, n, L = _common(x, dt_low, B, C, dt_weight, A)
    dt_bias, A, Ds = dt_bias.contiguous(), A.contiguous(), Ds.contiguous()
    bd, np_, bl, warps = core.tile_config(n, L, d, backward=True)
    nchunk = _cdiv(L, bl)
    states = torch.empty(b * k * d * nchunk * np_, device=x.device, dtype=torch.float32)
    _launch_fwd(xs, lows, Bs, Cs, W, dt_bias, A, Ds, idx, None, states, b, d, k, r, n, L, backward=True)
    g = grad.contiguous().view(b, d, L)
    f32 = dict(device=x.device, dtype=torch.float32)
    dx = torch.zeros(b, d, L, **f32)
    dlow = torch.zeros(b, k, r, L, **f32)
    dB = torch.zeros(b, k, n, L, **f32)
    dC = torch.zeros(b, k, n, L, **f32)
    dA = torch.empty(b, k * d, n, **f32)
    dD = torch.empty(b, k * d, **f32)
    dbias = torch.empty(b, k * d, **f32)
    dW = torch.empty(b, k * d, r, **f32)
    grid = (_cdiv(d, bd), k, b)
    core._scan_bwd_kernel[grid](
        xs, xs.stride(0), 0, xs.stride(1), xs.stride(2),
        lows, lows.stride(0), lows.stride(1), lows.stride(2), lows.stride(3),
        W, W.stride(0), W.stride(1),
        dt_bias, A, Ds,
        Bs, *Bs.stride(), Cs, *Cs.stride(),
        xs, 0, 0, 0, 0,
        idx, idx.stride(0),
        g, g.stride(0), 0, g.stride(1), g.stride(2),
        states,
        dx, dx.stride(0), 0, dx.stride(1), dx.stride(2),
        dlow, dlow.stride(0), dlow.stride(1), dlow.stride(2), dlow.stride(3),
        dx,
        dB, *dB.stride(), dC, *dC.stride(),
        dA, dD, dbias, dW,
        k, d, L, n, r, nchunk,
        BD=bd, NP=np_, BL=bl, RP=core.next_pow2(r), GATHER=True, LOWRANK=True, HAS_BIAS=True, SOFTPLUS=True,
        HAS_D=True, HAS_Z=False, ATOMIC_DU=True, num_warps=warps,
    )
    return [dx.view(x.shape).to(x.dtype), dlow.view(dt_low.shape).to(dt_low.dtype), dB.view(B.shape).to(B.dtype),
            dC.view(C.shape).to(C.dtype), dW.sum(0).view(dt_weight.shape).to(dt_weight.dtype),
            dbias.sum(0).view(dt_bias.shape).to(dt_bias.dtype), dA.sum(0).to(A.dtype), dD.sum(0).to(Ds.dtype)]


@ss2d_bwd.register_fake
def _(grad, x, dt_low, B, C, dt_weight, dt_bias, A, Ds, idx):
    return [torch.empty_like(t, memory_format=torch.contiguous_format)
            for t in (x, dt_low, B, C, dt_weight, dt_bias, A, Ds)]


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    x, dt_low, B, C, dt_weight, dt_bias, A, Ds, idx = ctx.saved_tensors
    return (*ss2d_bwd(grad, x, dt_low, B, C, dt_weight, dt_bias, A, Ds, idx), None)


ss2d_fwd.register_autograd(_backward, setup_context=_setup_context)


def ss2d_core_triton(x, dt_low, B, C, dt_weight, dt_bias, A, Ds, route="cross"):
    """Fused SS2D core; same contract as ``ss2d_core_reference`` (shapes in ``kernels/ss2d.py``)."""
    h, w = x.shape[-2:]
    idx = _route_map(route, h, w, str(x.device))
    return ss2d_fwd(x, dt_low, B, C, dt_weight, dt_bias, A, Ds, idx)
