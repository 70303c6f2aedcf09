"""The SS2D output stage in Triton (see ``kernels/norm_gate.py``): LayerNorm over the channels of a channel-first
tensor, times silu of a channel-last gate, written channel-last; forward and backward.

A program owns a block of BP positions of one image and all D channels (padded to DP), so each row's mean and
variance stay in registers. y is read along positions (its contiguous axis), z and the output along channels;
Triton converts between the two layouts through shared memory. The backward sums the weight and bias gradients
per program and the host adds the partials.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_scan_core import COMPILE_OPTS, cdiv, next_pow2

# a program's tile holds at most this many elements (BP positions x DP channels, fp32 in registers)
TILE_ELEMENTS = 4096


@triton.jit
def _program_rows(y_ptr, s_yb, s_yd, s_yl, z_ptr, s_zb, s_zl, s_zd, w_ptr, b_ptr, D, L,
                  BP: tl.constexpr, DP: tl.constexpr):
    """A program's image, positions, channels, masks, and its y, z, weight and bias tiles in fp32 (both kernels)."""
    bi = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0) * BP + tl.arange(0, BP)
    d = tl.arange(0, DP)
    pm, dm = p < L, d < D
    m = pm[:, None] & dm[None, :]
    y = tl.load(y_ptr + bi * s_yb + p[:, None] * s_yl + d[None, :] * s_yd, mask=m, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + bi * s_zb + p[:, None] * s_zl + d[None, :] * s_zd, mask=m, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + d, mask=dm, other=0.0).to(tl.float32)
    bias = tl.load(b_ptr + d, mask=dm, other=0.0).to(tl.float32)
    return bi, p, d, pm, dm, m, y, z, w, bias


@triton.jit
def _norm_gate_fwd_kernel(y_ptr, s_yb, s_yd, s_yl, z_ptr, s_zb, s_zl, s_zd, w_ptr, b_ptr, out_ptr, mean_ptr,
                          rstd_ptr, D, L, eps, BP: tl.constexpr, DP: tl.constexpr):
    bi, p, d, pm, dm, m, y, z, w, bias = _program_rows(y_ptr, s_yb, s_yd, s_yl, z_ptr, s_zb, s_zl, s_zd, w_ptr,
                                                       b_ptr, D, L, BP, DP)
    mean = tl.sum(y, axis=1) / D
    diff = tl.where(m, y - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / D + eps)
    o = diff * rstd[:, None] * w[None, :] + bias[None, :]
    out = o * z * tl.sigmoid(z)
    tl.store(out_ptr + (bi * L + p[:, None]) * D + d[None, :], out.to(out_ptr.dtype.element_ty), mask=m)
    tl.store(mean_ptr + bi * L + p, mean, mask=pm)
    tl.store(rstd_ptr + bi * L + p, rstd, mask=pm)


@triton.jit
def _norm_gate_bwd_kernel(g_ptr, s_gb, s_gl, s_gd, y_ptr, s_yb, s_yd, s_yl, z_ptr, s_zb, s_zl, s_zd, w_ptr, b_ptr,
                          mean_ptr, rstd_ptr, dy_ptr, dz_ptr, dw_ptr, db_ptr, D, L,
                          BP: tl.constexpr, DP: tl.constexpr):
    bi, p, d, pm, dm, m, y, z, w, bias = _program_rows(y_ptr, s_yb, s_yd, s_yl, z_ptr, s_zb, s_zl, s_zd, w_ptr,
                                                       b_ptr, D, L, BP, DP)
    mean = tl.load(mean_ptr + bi * L + p, mask=pm, other=0.0)
    rstd = tl.load(rstd_ptr + bi * L + p, mask=pm, other=0.0)
    xhat = tl.where(m, (y - mean[:, None]) * rstd[:, None], 0.0)
    g = tl.load(g_ptr + bi * s_gb + p[:, None] * s_gl + d[None, :] * s_gd, mask=m, other=0.0).to(tl.float32)
    sig = tl.sigmoid(z)
    go = g * z * sig                                     # d out / d (normed, affine) row
    dz = g * (xhat * w[None, :] + bias[None, :]) * sig * (1.0 + z * (1.0 - sig))
    dxhat = go * w[None, :]
    c1 = tl.sum(dxhat * xhat, axis=1) / D
    c2 = tl.sum(dxhat, axis=1) / D
    dy = (dxhat - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
    tl.store(dy_ptr + (bi * D + d[None, :]) * L + p[:, None], dy.to(dy_ptr.dtype.element_ty), mask=m)
    tl.store(dz_ptr + (bi * L + p[:, None]) * D + d[None, :], dz.to(dz_ptr.dtype.element_ty), mask=m)
    row = bi * tl.num_programs(0) + tl.program_id(0)
    tl.store(dw_ptr + row * D + d, tl.sum(go * xhat, axis=0), mask=dm)
    tl.store(db_ptr + row * D + d, tl.sum(go, axis=0), mask=dm)


def _tile(d: int) -> tuple[int, int, int]:
    """(BP, DP, warps) for D channels: 8 elements of a tile per thread (the backward holds about ten such tiles;
    at 16 a thread it needed 140-170 registers, one 8-warp program per SM)."""
    dp = next_pow2(d)
    bp = max(1, min(64, TILE_ELEMENTS // dp))
    return bp, dp, max(1, min(16, bp * dp // (32 * 8)))


def _flat(y: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """y as (b, D, L) and z as (b, L, D) views (copied only when H and W do not flatten into one position axis)."""
    b, d, h, w = y.shape
    yf = y.reshape(b, d, h * w) if y.stride(2) == w * y.stride(3) else y.contiguous().view(b, d, h * w)
    zf = z.reshape(b, h * w, d) if z.stride(1) == w * z.stride(2) else z.contiguous().view(b, h * w, d)
    return yf, zf


@torch.library.custom_op("vm_unet::norm_gate_fwd", mutates_args=())
def norm_gate_fwd(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                  out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (b, H, W, D) in out_dtype, row means (b, H*W), row reciprocal std (b, H*W))."""
    b, d, h, w = y.shape
    yf, zf = _flat(y, z)
    length = h * w
    out = torch.empty(b, h, w, d, device=y.device, dtype=out_dtype)
    mean = torch.empty(b, length, device=y.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    bp, dp, warps = _tile(d)
    _norm_gate_fwd_kernel[(cdiv(length, bp), b)](
        yf, *yf.stride(), zf, *zf.stride(), weight.contiguous(), bias.contiguous(), out, mean, rstd, d, length, eps,
        BP=bp, DP=dp, num_warps=warps, **COMPILE_OPTS)
    return out, mean, rstd


@norm_gate_fwd.register_fake
def _(y, z, weight, bias, eps, out_dtype):
    b, d, h, w = y.shape
    return y.new_empty(b, h, w, d, dtype=out_dtype), *(y.new_empty(b, h * w, dtype=torch.float32) for _ in "mr")


@torch.library.custom_op("vm_unet::norm_gate_bwd", mutates_args=())
def norm_gate_bwd(grad: torch.Tensor, y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  mean: torch.Tensor, rstd: torch.Tensor) -> list[torch.Tensor]:
    """[dy (b, D, H, W), dz (b, H, W, D), d weight, d bias]."""
    b, d, h, w = y.shape
    yf, zf = _flat(y, z)
    length = h * w
    gf = grad.reshape(b, length, d)
    dy = torch.empty(b, d, h, w, device=y.device, dtype=y.dtype)
    dz = torch.empty(b, h, w, d, device=y.device, dtype=z.dtype)
    bp, dp, warps = _tile(d)
    grid = (cdiv(length, bp), b)
    dw = torch.empty(b * grid[0], d, device=y.device, dtype=torch.float32)
    db = torch.empty_like(dw)
    _norm_gate_bwd_kernel[grid](
        gf, gf.stride(0), gf.stride(1), gf.stride(2), yf, *yf.stride(), zf, *zf.stride(), weight.contiguous(),
        bias.contiguous(), mean, rstd, dy, dz, dw, db, d, length, BP=bp, DP=dp, num_warps=warps, **COMPILE_OPTS)
    return [dy, dz, dw.sum(0).to(weight.dtype), db.sum(0).to(bias.dtype)]


@norm_gate_bwd.register_fake
def _(grad, y, z, weight, bias, mean, rstd):
    return [torch.empty_like(y, memory_format=torch.contiguous_format),
            torch.empty_like(z, memory_format=torch.contiguous_format), torch.empty_like(weight),
            torch.empty_like(bias)]


def _setup_context(ctx, inputs, output):
    y, z, weight, bias = inputs[:4]
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(y, z, weight, bias, mean, rstd)


def _backward(ctx, grad, *_stats_grads):
    y, z, weight, bias, mean, rstd = ctx.saved_tensors
    dy, dz, dw, db = norm_gate_bwd(grad, y, z, weight, bias, mean, rstd)
    return dy, dz, dw, db, None, None


norm_gate_fwd.register_autograd(_backward, setup_context=_setup_context)


def norm_gate_triton(y, z, weight, bias, eps, out_dtype):
    """``norm_gate_reference`` fused; the product in ``out_dtype`` (see ``norm_gate_dtype``)."""
    return norm_gate_fwd(y, z, weight, bias, float(eps), out_dtype)[0]
