"""Weight and bias gradients of the blocks' 3x3 depthwise convolution, in Triton.

    dW[c, i, j] = Σ_{b,h,w} g[b, c, h, w] · x[b, c, h + i - 1, w + j - 1]   (zero outside the image)
    dbias[c]    = Σ_{b,h,w} g[b, c, h, w]

Ten reductions over every position into ten numbers a channel: bound by reading x and g once. cuDNN's weight
gradient (channels last) took 0.80 ms at stage 1 of a 2048² input (batch 1: one 512² image a channel, 0.25 TB/s),
with the bias gradient a separate pass; this kernel takes 0.15 ms for both (BENCHMARKS.md, twenty-seventh session).
Each program reduces one piece of a channel block's positions (batch, height and width flattened) in registers: the
nine shifted reads of x hit the cache lines the tile's own read brought in. It writes its ten partial sums; they
are summed after, so the result does not depend on scheduling.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_scan_core import COMPILE_OPTS, cdiv, next_pow2

# positions x channels a tile, the positions a program walks at most, and the fewest programs a launch (pieces are
# halved down to one tile while there are fewer). Measured on H200 (BENCHMARKS.md, twenty-seventh session)
TILE, PIECE, MIN_PROGRAMS, WARPS = 1024, 16384, 1024, 2


@triton.jit
def _tap(x_ptr, base, hh, ww, pmask, H, W, c_off, cmask, g, DI: tl.constexpr, DJ: tl.constexpr, s_xh, s_xw):
    """g · x shifted by (DI, DJ), zero outside the image: the tile's contribution to one tap."""
    h2 = hh + DI
    w2 = ww + DJ
    ok = pmask & (h2 >= 0) & (h2 < H) & (w2 >= 0) & (w2 < W)
    x = tl.load(x_ptr + (base + DI * s_xh + DJ * s_xw)[:, None] + c_off[None, :], mask=ok[:, None] & cmask[None, :],
                other=0.0)
    return g * x.to(tl.float32)


@triton.jit
def _dw_weight_grad_kernel(x_ptr, s_xb, s_xc, s_xh, s_xw, g_ptr, s_gb, s_gc, s_gh, s_gw, out_ptr,
                           C, H, W, P, PIECE, BP: tl.constexpr, BC: tl.constexpr):
    # tiles [BP positions, BC channels]; positions run over (batch, height, width) flattened, so one tile may span
    # rows and images, and each position finds its own (b, h, w). Triton lays the tile along whichever axis the
    # strides make contiguous: positions channel first, channels channels last
    p = tl.program_id(0)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    cmask = c < C
    xc = c.to(tl.int64) * s_xc
    gc = c.to(tl.int64) * s_gc
    acc0 = tl.zeros([BP, BC], dtype=tl.float32)
    acc1 = tl.zeros([BP, BC], dtype=tl.float32)
    acc2 = tl.zeros([BP, BC], dtype=tl.float32)
    acc3 = tl.zeros([BP, BC], dtype=tl.float32)
    acc4 = tl.zeros([BP, BC], dtype=tl.float32)
    acc5 = tl.zeros([BP, BC], dtype=tl.float32)
    acc6 = tl.zeros([BP, BC], dtype=tl.float32)
    acc7 = tl.zeros([BP, BC], dtype=tl.float32)
    acc8 = tl.zeros([BP, BC], dtype=tl.float32)
    accb = tl.zeros([BP, BC], dtype=tl.float32)
    end = tl.minimum(P, (p + 1) * PIECE)
    for p0 in range(p * PIECE, end, BP):
        pos = p0 + tl.arange(0, BP)
        pmask = pos < end
        ww = pos % W
        row = pos // W
        hh = row % H
        bb = (row // H).to(tl.int64)
        xb = bb * s_xb + hh * s_xh + ww * s_xw
        gb = bb * s_gb + hh * s_gh + ww * s_gw
        m = pmask[:, None] & cmask[None, :]
        g = tl.load(g_ptr + gb[:, None] + gc[None, :], mask=m, other=0.0).to(tl.float32)
        accb += g
        acc0 += _tap(x_ptr, xb, hh, ww, pmask, H, W, xc, cmask, g, -1, -1, s_xh, s_xw)
        acc1 += _tap(x_ptr, xb, hh, ww, pmask, H, W, xc, cmask, g, -1, 0, s_xh, s_xw)
        acc2 += _tap(x_ptr, xb, hh, ww, pmask, H, W, xc, cmask, g, -1, 1, s_xh, s_xw)
        acc3 += _tap(x_ptr, xb, hh, ww, pmask, H, W, xc, cmask, g, 0, -1, s_xh, s_xw)
        acc4 += _tap(x_ptr, xb, hh, ww, pmask, H, W, xc, cmask, g, 0, 0, s_xh, s_xw)
        acc5 += _tap(x_ptr, xb, hh, ww, pmask, H, W, xc, cmask, g, 0, 1, s_xh, s_xw)
        acc6 += _tap(x_ptr, xb, hh, ww, pmask, H, W, xc, cmask, g, 1, -1, s_xh, s_xw)
        acc7 += _tap(x_ptr, xb, hh, ww, pmask, H, W, xc, cmask, g, 1, 0, s_xh, s_xw)
        acc8 += _tap(x_ptr, xb, hh, ww, pmask, H, W, xc, cmask, g, 1, 1, s_xh, s_xw)
    out = out_ptr + (p * C + c) * 10
    tl.store(out + 0, tl.sum(acc0, axis=0), mask=cmask)
    tl.store(out + 1, tl.sum(acc1, axis=0), mask=cmask)
    tl.store(out + 2, tl.sum(acc2, axis=0), mask=cmask)
    tl.store(out + 3, tl.sum(acc3, axis=0), mask=cmask)
    tl.store(out + 4, tl.sum(acc4, axis=0), mask=cmask)
    tl.store(out + 5, tl.sum(acc5, axis=0), mask=cmask)
    tl.store(out + 6, tl.sum(acc6, axis=0), mask=cmask)
    tl.store(out + 7, tl.sum(acc7, axis=0), mask=cmask)
    tl.store(out + 8, tl.sum(acc8, axis=0), mask=cmask)
    tl.store(out + 9, tl.sum(accb, axis=0), mask=cmask)


def tile_shape(channels: int, channels_last: bool) -> tuple[int, int]:
    """(positions, channels) of a tile: one channel channel first, where positions are contiguous; up to 64
    channels (128 bytes of bf16 a position) channels last."""
    bc = max(1, min(64, next_pow2(channels))) if channels_last else 1
    return max(1, TILE // bc), bc


def depthwise3x3_weight_grad(x: torch.Tensor, grad: torch.Tensor, piece: int | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of a 3x3 depthwise conv (stride 1, padding 1) w.r.t. its weight and bias: x and grad (b, C, H, W),
    any strides (fastest with W or C contiguous, the same in both), same dtype -> dW (C, 1, 3, 3) and dbias (C,),
    fp32. ``piece``: positions a program (default ``PIECE``, halved while the launch has fewer than
    ``MIN_PROGRAMS`` programs)."""
    if x.dim() != 4 or grad.shape != x.shape:
        raise ValueError(f"depthwise3x3_weight_grad: x {tuple(x.shape)} and grad {tuple(grad.shape)} must be one "
                         "(b, C, H, W) shape")
    b, c, h, w = x.shape
    bp, bc = tile_shape(c, x.stride(1) == 1 and c > 1)
    positions = b * h * w
    blocks = cdiv(c, bc)
    if piece is None:
        piece = PIECE
        while piece > bp and blocks * cdiv(positions, piece) < MIN_PROGRAMS:
            piece //= 2
    pieces = cdiv(positions, piece)
    partial = torch.empty(pieces, c, 10, device=x.device, dtype=torch.float32)
    _dw_weight_grad_kernel[(pieces, blocks)](x, *x.stride(), grad, *grad.stride(), partial, c, h, w, positions, piece,
                                             BP=bp, BC=bc, num_warps=WARPS, **COMPILE_OPTS)
    total = partial.sum(0)
    return total[:, :9].contiguous().view(c, 1, 3, 3), total[:, 9].contiguous()   # two tensors, not views of one
