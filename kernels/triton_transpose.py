"""Batched transpose of the last two axes in Triton, with an optional add and a cast on the store: the layout
copies around the fused SS2D core (the transposed copy of x and of the incoming gradient, the merge of the two
accumulators, the per-direction swaps of dt_low/B/C and their gradients).

``out[i, j, k, q, p] = src[i, j, k, p, q] (+ add[i, j, k, q, p])`` for any strides, fp32 arithmetic. PyTorch runs
such a copy as a strided elementwise kernel, one side read or written an element per cache line: 130 µs for the
(32, 192, 64, 64) bf16 transposed copy of x at stage 1, 256² batch 32, on an H200, about 5x its bytes' time. Here
a program reads a tile along the source's contiguous axis and writes it along the output's; Triton converts
between the two layouts through shared memory.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_scan_core import COMPILE_OPTS, cdiv, next_pow2


@triton.jit
def _transpose_kernel(src_ptr, s_si, s_sj, s_sk, s_sp, s_sq,
                      add_ptr, s_ai, s_aj, s_ak, s_aq, s_ap,
                      out_ptr, s_oi, s_oj, s_ok, s_oq, s_op, which_ptr,
                      J, K, P, Q, QTILES,
                      HAS_ADD: tl.constexpr, WHICH: tl.constexpr, BP: tl.constexpr, BQ: tl.constexpr):
    # grid axis 0: the (i, j, k) matrices (up to 2**31 of them), axis 1: tiles of one matrix
    ijk = tl.program_id(0)
    i = (ijk // (J * K)).to(tl.int64)
    j = ((ijk // K) % J).to(tl.int64)
    k = (ijk % K).to(tl.int64)
    t = tl.program_id(1)
    p = (t // QTILES) * BP + tl.arange(0, BP)
    q = (t % QTILES) * BQ + tl.arange(0, BQ)
    m = (p[:, None] < P) & (q[None, :] < Q)
    v = tl.load(src_ptr + i * s_si + j * s_sj + k * s_sk + p[:, None] * s_sp + q[None, :] * s_sq, mask=m,
                other=0.0).to(tl.float32)
    if HAS_ADD:
        v += tl.load(add_ptr + i * s_ai + j * s_aj + k * s_ak + q[None, :] * s_aq + p[:, None] * s_ap, mask=m,
                     other=0.0).to(tl.float32)
    o_base = out_ptr + i * s_oi + j * s_oj + k * s_ok
    v = v.to(out_ptr.dtype.element_ty)
    # WHICH: matrices j with which[j] == 0 are copied as they are (two branches, so each store keeps a layout of
    # its own, coalesced along its contiguous axis)
    if WHICH:
        if tl.load(which_ptr + j) == 0:
            tl.store(o_base + (p[:, None] * Q + q[None, :]) * s_op, v, mask=m)
        else:
            tl.store(o_base + q[None, :] * s_oq + p[:, None] * s_op, v, mask=m)
    else:
        tl.store(o_base + q[None, :] * s_oq + p[:, None] * s_op, v, mask=m)


def _as5d(t: torch.Tensor) -> torch.Tensor:
    return t[(None,) * (5 - t.dim())]   # leading size-1 axes: a view whatever the strides


def transpose_last2(src: torch.Tensor, out: torch.Tensor | None = None, add: torch.Tensor | None = None,
                    dtype: torch.dtype | None = None, which: torch.Tensor | None = None) -> torch.Tensor:
    """``src.transpose(-1, -2) (+ add)`` written into ``out`` (any strides, e.g. a slice of a larger tensor) or into
    a new contiguous tensor of ``dtype`` (default: src's). ``src`` has 2 to 5 axes; leading axes are batch axes.
    Views of ``src``/``out`` with up to three batch axes are never copied.

    ``which``: int32 flags over the second-to-last batch axis (the directions of a (b, K, C, P, Q) stack): only
    matrices whose flag is set are transposed; the others are copied as they are into the same elements of ``out``,
    whose last two axes must then be one contiguous block (no add)."""
    if not 2 <= src.dim() <= 5:
        raise ValueError(f"transpose_last2: src must have 2 to 5 axes, got {src.dim()}")
    shape = (*src.shape[:-2], src.shape[-1], src.shape[-2])
    if out is None:
        out = torch.empty(shape, device=src.device, dtype=dtype or src.dtype)
    if tuple(out.shape) != shape or (add is not None and tuple(add.shape) != shape):
        raise ValueError(f"transpose_last2: out/add must have shape {shape}")
    if which is not None and (add is not None or src.dim() < 4 or which.numel() != src.shape[-4]
                              or out.stride(-2) != out.shape[-1] * out.stride(-1)):
        raise ValueError("transpose_last2: `which` needs a flag per matrix of axis -4, no add, and the last two "
                         "axes of out in one block")
    if out.numel() == 0:
        return out
    s5, o5 = _as5d(src), _as5d(out)
    a5 = _as5d(add) if add is not None else o5
    i, j, k, p, q = s5.shape
    bp, bq = min(64, next_pow2(p)), min(64, next_pow2(q))
    qtiles = cdiv(q, bq)
    # one warp per 512 tile elements, up to 4 (a 64x64 fp32 tile is 32 registers a thread at 4 warps)
    warps = max(1, min(4, bp * bq // 512))
    _transpose_kernel[(i * j * k, cdiv(p, bp) * qtiles)](
        s5, *s5.stride(), a5, *a5.stride(), o5, *o5.stride(), which if which is not None else o5, j, k, p, q,
        qtiles, HAS_ADD=add is not None, WHICH=which is not None, BP=bp, BQ=bq, num_warps=warps, **COMPILE_OPTS)
    return out
