"""Gradient of the low-rank Δ projection's weight, ``dW[m] = Σ_l dΔ[m, l]ᵀ low[m, l]``, in Triton.

The product is (D x L) by (L x R) per row m, with R the rank (6 to 48 in VM-UNet) and L up to a million positions:
a reduction over a long axis into a tiny output, bound by reading dΔ. cuBLAS runs it as one GEMM a row and leaves
most of the GPU idle (1.77 ms for 0.4 GB at stage 1 of a 2048² image on an H200); cut into pieces of L, one GEMM a
piece, it still ran at 0.7-1.7 TB/s. Here each program reduces one piece of L for one block of channels with
``tl.dot`` and writes its partial sum; the partials are summed after, so the result does not depend on scheduling.
Measured on H200 (BENCHMARKS.md, twenty-third session): 2.4-3.7 TB/s in bf16 where L >= 1024; at shorter L
cuBLAS is faster (``triton_ss2d.DW_TRITON_MIN_L``).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .triton_scan_core import COMPILE_OPTS, cdiv, next_pow2

# channels a program, positions a step, and the fewest programs a launch (pieces of L are halved from 4096 until
# there are this many): the fastest measured on H200 over stage 1-3 shapes at 256²-2048², both layouts
BLOCK_D, BLOCK_L, MIN_PROGRAMS = 64, 128, 384


@triton.jit
def _lowrank_weight_grad_kernel(a_ptr, s_am, s_al, s_ad, b_ptr, s_bm, s_bl, s_br, out_ptr, D, R, L, PIECE,
                                BD: tl.constexpr, RP: tl.constexpr, BL: tl.constexpr, FP32: tl.constexpr,
                                WIDEN: tl.constexpr):
    p = tl.program_id(0)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    m = tl.program_id(2).to(tl.int64)
    r = tl.arange(0, RP)
    dmask, rmask = d < D, r < R
    a_base = a_ptr + m * s_am
    b_base = b_ptr + m * s_bm
    acc = tl.zeros([BD, RP], dtype=tl.float32)
    end = tl.minimum(L, (p + 1) * PIECE)
    for l0 in range(p * PIECE, end, BL):
        l = l0 + tl.arange(0, BL)
        lmask = l < end
        a = tl.load(a_base + d[:, None] * s_ad + l[None, :] * s_al, mask=dmask[:, None] & lmask[None, :], other=0.0)
        b = tl.load(b_base + l[:, None] * s_bl + r[None, :] * s_br, mask=lmask[:, None] & rmask[None, :], other=0.0)
        if WIDEN:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif FP32:   # three TF32 products: fp32 accuracy on tensor cores (IEEE products measured 2.5-5x slower)
            acc = tl.dot(a, b, acc, input_precision="tf32x3")
        else:
            acc = tl.dot(a, b, acc)
    out = out_ptr + ((m * tl.num_programs(0) + p) * D + d[:, None]) * R + r[None, :]
    tl.store(out, acc, mask=dmask[:, None] & rmask[None, :])


def lowrank_weight_grad(ddt: torch.Tensor, low: torch.Tensor, piece: int | None = None) -> torch.Tensor:
    """``Σ_l ddt[m, l]ᵀ low[m, l]``: (M, L, D) and (M, L, R), any strides, same dtype (fp32, bf16 or fp16) ->
    (M, D, R) fp32. ``piece``: positions a program (default: 4096, halved while the launch has fewer than
    ``MIN_PROGRAMS`` programs)."""
    m, L, d = ddt.shape
    r = low.shape[2]
    if low.shape[:2] != (m, L) or low.dtype != ddt.dtype:
        raise ValueError(f"lowrank_weight_grad: ddt {tuple(ddt.shape)} {ddt.dtype} and low {tuple(low.shape)} "
                         f"{low.dtype} do not pair")
    if piece is None:
        piece = 4096
        while piece > BLOCK_L and m * cdiv(d, BLOCK_D) * cdiv(L, piece) < MIN_PROGRAMS:
            piece //= 2
    pieces = cdiv(L, piece)
    partial = torch.empty(m, pieces, d, r, device=ddt.device, dtype=torch.float32)
    _lowrank_weight_grad_kernel[(pieces, cdiv(d, BLOCK_D), m)](
        ddt, *ddt.stride(), low, *low.stride(), partial, d, r, L, piece,
        BD=BLOCK_D, RP=max(16, next_pow2(r)), BL=min(BLOCK_L, max(16, next_pow2(piece))),
        FP32=ddt.dtype == torch.float32,
        # Triton's CPU interpreter (3.9) multiplies half-precision dot operands wrongly: widened there
        WIDEN=os.environ.get("TRITON_INTERPRET") == "1", num_warps=4, **COMPILE_OPTS)
    return partial.sum(1)


def lowrank_weight_grad_reference(ddt: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch ``lowrank_weight_grad`` (fp32)."""
    return torch.einsum("mld,mlr->mdr", ddt.float(), low.float())
