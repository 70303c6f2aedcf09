"""Triton kernels shared by the selective scan and the fused SS2D core (forward and backward).

One forward and one backward kernel serve both ops; constexpr flags pick the variant:

* plain selective scan: u (b, Dm, L), Δ read directly, B/C (b, G, N, L), out stored (each element written once).
* fused SS2D: x (b, D, H*W) read through the route's gather map ``idx[(b,) k, l]`` (no direction copies; one map
  for the batch or one per sample; computed as first + step·l where the maps are arithmetic progressions, whole or
  chunk by chunk, see ``_positions``), Δ built on the fly as ``dt_weight[k] @ dt_low[b, k, :, idx[k, l]]``, and y_k scattered back through the
  same map with fp32 atomics into one merged (b, D, H*W) buffer. Scattering through the gather map *is* the inverse
  map, so any permutation route works with no route-specific code.

A program owns (batch b, "slot" k, a block of BD channels, a segment of L) and walks its segment in chunks of BL
positions. The recurrence ``h_l = a_l h_{l-1} + b_l`` inside a chunk is an associative scan over (a, b) pairs on a
[BL, NP, BD] fp32 tile (scanned axis first, so Triton keeps each thread's positions in registers and the scan
needs no lane shuffles); the state is carried between chunks in registers. Slot k is the group (plain scan) or the
direction (SS2D); the parameter channel is ``k * DK + d`` in both cases. The kernels wait on memory more than
they compute, so the forward (N > 1) loads each chunk's tiles one chunk ahead, both read the route map ahead, and the
backward's chunk-start states are copied ahead by Triton's software pipeliner (``_loop_stages``).
Built in the kernels, Δ's low-rank factors are read as one tile a chunk (``_lowrank_tile``), not one gathered load
per rank and row.

Segments (parallel over L). With few (batch, slot, channel-block) rows, e.g. one 2048² image, walking all of L
per program leaves the GPU empty, so L is cut into NSEG segments of CPS chunks: a first pass (``SEG_END``) runs
each segment from a zero state and stores its end state and ΣΔ; the segment's total decay is exp(A·ΣΔ), so the
main pass starts segment s from ``h = Σ_{t<s} (Π_{t<t'<s} exp(A ΣΔ_t')) h_end_t`` (``SEG_CARRY``), folded in its
prologue. The backward mirrors it for dh: each segment's reverse recurrence run from zero gives
``q_s = a_{first} dh_{first}``, and the main pass starts from ``G_s = Σ_{t>s} ... q_t``. The backward's states pass
sums q_s in forward order (``DH_CARRY``, ``_dh_in_states``), or else a pass of its own (``DH_ONLY``) runs it.

Backward recomputes everything from the inputs: a forward pass stores only the chunk-start states (fp32,
N/BL of the size of u), then a reverse pass rebuilds each chunk's states from its start state and runs the
reverse recurrence ``dh_l = C_l g_l + a_{l+1} dh_{l+1}``. dΔ is stored (for the fused op, in each direction's read
layout; the low-rank products are matmuls on the host); dB, dC and the merged dx are reduced over the program's
BD channels (dB, dC by a reduce-scatter over the channel lanes where the layout allows) and added with atomics;
per-channel parameter gradients (dA, dD, dδ_bias) are per-(batch, segment) partials summed on the host.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl


@triton.jit
def _combine(a1, b1, a2, b2):
    # (a1, b1) is the earlier step in scan order: h = a2 * (a1 * h0 + b1) + b2.
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _row(x, j, r, IN_REGS: tl.constexpr):
    """Row ``r`` of a [BL, NP, BD] tile. ``IN_REGS`` (its rows sit in each thread's registers): the other rows are
    masked to -0.0, since x + (-0.0) == x exactly, so the compiler folds the sum away to a plain pick (with +0.0 it
    kept those adds, -0.0 + 0.0 being +0.0). Across lanes +0.0 compiled to fewer registers."""
    if IN_REGS:
        return tl.sum(tl.where(j[:, None, None] == r, x, -0.0), axis=0)
    return tl.sum(tl.where(j[:, None, None] == r, x, 0.0), axis=0)


@triton.jit
def _scan_rows(a, b, h, j, BL: tl.constexpr, UNROLL: tl.constexpr):
    """h_r = a_r h_{r-1} + b_r down the rows of [BL, NP, BD] tiles from the carried state ``h``: (all h_r, the last).

    ``UNROLL`` (tiles whose rows live in each thread's registers, see ``_unroll_rows``): a static loop over the
    rows, one FMA an element. Otherwise ``tl.associative_scan``, which also crosses lanes; the carried state enters
    as part of the first row's input (h_0 = a_0 h + b_0), so its running product of a is dead code."""
    if UNROLL:
        hs = b
        for r in tl.static_range(BL):
            h = _row(a, j, r, True) * h + _row(b, j, r, True)
            hs = tl.where(j[:, None, None] == r, h[None, :, :], hs)
    else:
        _, hs = tl.associative_scan((a, tl.where(j[:, None, None] == 0, b + a * h[None, :, :], b)), 0, _combine)
        h = _row(hs, j, BL - 1, False)
    return hs, h


@triton.jit
def _scan_rows_reverse(a, c, carry, j, BL: tl.constexpr, UNROLL: tl.constexpr):
    """dh_r = c_r + a_{r+1} dh_{r+1} up the rows, entering the last row as c + ``carry`` (a·dh of the row after the
    tile): (all dh_r, a_0 dh_0 for the tile before). ``UNROLL`` as in ``_scan_rows``: there
    ``tl.associative_scan(reverse=True)`` flipped every tile across the warp's lanes and back (shuffles by lane ^ 31),
    though the rows never leave a thread, and needed a copy of a shifted by one row."""
    if UNROLL:
        dh = c
        for i in tl.static_range(BL):
            cur = _row(c, j, BL - 1 - i, True) + carry
            dh = tl.where(j[:, None, None] == BL - 1 - i, cur[None, :, :], dh)
            carry = _row(a, j, BL - 1 - i, True) * cur
    else:
        # a_{r+1} for each row r (the last row's is folded into c), by selects within each thread
        a1 = tl.zeros(a.shape, dtype=tl.float32)
        for r in tl.static_range(BL - 1):
            a1 = tl.where(j[:, None, None] == r, _row(a, j, r + 1, False)[None, :, :], a1)
        _, dh = tl.associative_scan((a1, tl.where(j[:, None, None] == BL - 1, c + carry[None, :, :], c)), 0,
                                    _combine, reverse=True)
        carry = _row(a, j, 0, False) * _row(dh, j, 0, False)
    return dh, carry


LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _exp2(x, FAST: tl.constexpr):
    # ex2.approx.ftz: one MUFU instruction. Plain exp/exp2 add a denormal fix-up (compare, two multiplies) around
    # it, which made up a third of the forward's instructions; flushing subnormal decays to 0 changes nothing here
    if FAST:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    return tl.exp2(x)


@triton.jit
def _rcp(x, FAST: tl.constexpr):
    # rcp.approx.ftz: one MUFU instruction, for denominators in [1, 2] here (plain division adds range fix-ups)
    if FAST:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    return 1.0 / x


@triton.jit
def _log1p_unit(t):
    # log1p(t) for t in [0, 1] as t * p(t), p a degree-8 least-squares fit (max rel. error 2.5e-7 in fp32 Horner):
    # 9 FMAs. tl.log's polynomial with its range reduction, plus Goldberg's log1p correction and its division, cost
    # about 3x as many instructions, and softplus runs once per (position, channel) in every pass
    p = 0.005186003632843494 * t - 0.029210267588496208
    p = p * t + 0.07754038274288177
    p = p * t - 0.13583941757678986
    p = p * t + 0.19055955111980438
    p = p * t - 0.24825648963451385
    p = p * t + 0.3331601023674011
    p = p * t - 0.49999254941940308
    p = p * t + 0.9999999403953552
    return t * p


@triton.jit
def _exp_neg_abs(x, FAST: tl.constexpr):
    # exp(-|x|) in (0, 1]: the one exp that softplus and sigmoid need, never overflowing
    return _exp2(-tl.abs(x) * LOG2E, FAST)


@triton.jit
def _softplus(x, FAST: tl.constexpr):
    # max(x, 0) + log1p(exp(-|x|)): exact form, no overflow, tiny values kept for very negative x
    return tl.maximum(x, 0.0) + _log1p_unit(_exp_neg_abs(x, FAST))


@triton.jit
def _sigmoid(x, FAST: tl.constexpr):
    # from t = exp(-|x|): 1 / (1 + t) for x >= 0, t / (1 + t) below
    t = _exp_neg_abs(x, FAST)
    r = _rcp(1.0 + t, FAST)
    return tl.where(x >= 0, r, t * r)


@triton.jit
def _route_line(idx_base, AFFINE: tl.constexpr):
    """(first position, step) of a route map that is an arithmetic progression (``AFFINE``), read once a program."""
    if AFFINE:
        p0 = tl.load(idx_base)
        return p0, tl.load(idx_base + 1) - p0
    return 0, 0


@triton.jit
def _positions(idx_base, line_base, c, l, lmask, NCHUNK, BL: tl.constexpr, GATHER: tl.constexpr,
               AFFINE: tl.constexpr, LINES: tl.constexpr, p0, dp):
    """Positions of chunk ``c`` (``l`` = c * BL + row), computed where the route map allows instead of loaded: the
    map's BL positions a thread, loaded in each of the three layouts the backward needs them in, cost a tenth of
    the N=16 backward's loop (H200, stage 1 bf16: backward kernel -6%). ``AFFINE``: the whole map is an arithmetic
    progression (the cross route's maps read channel first, see ``triton_ss2d``): p0 + dp * l. ``LINES``: it is one
    inside every chunk (also the column directions read channels last, zigzag rows), given per chunk as (first,
    step) in the table at ``line_base``: two uniform loads a chunk (1-2% slower than ``AFFINE`` where both apply).
    Neither in the N <= 2 backward, where computed positions measured 6% slower (``scan_backward``). Chunks outside
    the table (read ahead past either end) and lanes past L get positions that every use masks."""
    if AFFINE:
        return p0 + dp * l
    if LINES:
        ok = (c >= 0) & (c < NCHUNK)
        first = tl.load(line_base + 2 * c, mask=ok, other=0)
        step = tl.load(line_base + 2 * c + 1, mask=ok, other=0)
        return first + step * (l - c * BL)
    if GATHER:
        return tl.load(idx_base + l, mask=lmask, other=0)
    return l


@triton.jit
def _load_tile(base, pos, lmask, c, cmask, s_l, s_c, POS_LAST: tl.constexpr):
    """The [BL, BC] tile at positions ``pos`` and columns ``c`` (channels or states), in fp32.

    Positions are gathered, so the compiler cannot tell which axis is contiguous in memory and lays the load
    along its tie-break axis: the first before Triton 3.7, the last from 3.7 on. Positions are contiguous for
    most routes, so the tile is built with positions on that axis (``POS_LAST``: as [BC, BL], then transposed,
    which only relabels the layout) and consecutive positions land on consecutive lanes. Channels on the lanes
    measured 1.2-1.6x slower in the forward under Triton 3.9 (BENCHMARKS.md, fourteenth session)."""
    if POS_LAST:
        t = tl.trans(tl.load(base + c[:, None] * s_c + pos[None, :] * s_l, mask=cmask[:, None] & lmask[None, :],
                             other=0.0))
    else:
        t = tl.load(base + pos[:, None] * s_l + c[None, :] * s_c, mask=lmask[:, None] & cmask[None, :], other=0.0)
    return t.to(tl.float32)


@triton.jit
def _store_tile(base, val, pos, lmask, c, cmask, s_l, s_c, ATOMIC: tl.constexpr, POS_LAST: tl.constexpr):
    """Store (or atomically add) a [BL, BC] tile at positions ``pos`` and columns ``c``, laid out as
    ``_load_tile`` reads."""
    if POS_LAST:
        ptrs = base + c[:, None] * s_c + pos[None, :] * s_l
        mask = cmask[:, None] & lmask[None, :]
        v = tl.trans(val)
    else:
        ptrs = base + pos[:, None] * s_l + c[None, :] * s_c
        mask = lmask[:, None] & cmask[None, :]
        v = val
    if ATOMIC:
        tl.atomic_add(ptrs, v, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, v.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _lane_swap(x, MASK: tl.constexpr, ASM: tl.constexpr):
    """x[..., d ^ MASK] along the last (channel) axis. ``ASM``: one shfl.sync.bfly, which exchanges registers with
    lane ^ MASK, so it is that swap only in a layout with the channel axis on the low lanes (see ``_scatter``);
    otherwise (the CPU interpreter) the swap itself, by split and join."""
    if ASM:
        tl.static_assert(MASK < 32, "a lane mask is below the warp size")
        # the mask as an operand: a uniform constant, which ptxas folds into the instruction
        y = tl.inline_asm_elementwise("shfl.sync.bfly.b32 $0, $1, $2, 0x1f, -1;", "=r,r,r",
                                      [x, tl.full(x.shape, MASK, tl.int32)], dtype=tl.float32, is_pure=True, pack=1)
    else:
        R: tl.constexpr = x.shape[0]
        S: tl.constexpr = x.shape[1]
        Q: tl.constexpr = x.shape[2] // (2 * MASK)
        lo, hi = tl.split(tl.permute(tl.reshape(x, [R, S, Q, 2, MASK]), [0, 1, 2, 4, 3]))
        y = tl.reshape(tl.permute(tl.join(hi, lo), [0, 1, 2, 4, 3]), [R, S, x.shape[2]])
    return y


@triton.jit
def _halve_rows(x, d, BIT: tl.constexpr, SWAP: tl.constexpr, ASM: tl.constexpr):
    """One step of a reduce-scatter over the channel lanes: rows (axis 0) split in halves; the lane whose channel bit
    ``BIT`` is 0 keeps the first half and gives the second to its partner (channel ^ BIT), which keeps the second.
    Returns the kept half plus, when ``SWAP``, the partner's matching half (without: the kept half alone, for index
    tiles that follow the same path)."""
    M: tl.constexpr = x.shape[0]
    lo, hi = tl.split(tl.permute(tl.reshape(x, [2, M // 2, x.shape[1], x.shape[2]]), [1, 2, 3, 0]))
    up = ((d & BIT) != 0)[None, None, :]
    keep = tl.where(up, hi, lo)
    if SWAP:
        keep = keep + _lane_swap(tl.where(up, lo, hi), BIT, ASM)
    return keep


@triton.jit
def _sum_channels_store(base, P, pos, lmask, d, n, nmask, s_l, s_n, SCATTER: tl.constexpr, ASM: tl.constexpr,
                        POS_LAST: tl.constexpr):
    """Add sum_d P[l, n, d] (P: [BL, NP, BD]) into base[pos[l], n] with atomics.

    ``SCATTER``: a reduce-scatter over the channel axis, log2 BD rounds that each halve the rows, leaves every lane
    its own rows' sums and stores them from where they are: per state, BL/2 + BL/4 + ... lane exchanges and adds.
    ``tl.sum`` instead leaves every channel lane all the sums (BL log2 BD exchanges and adds), which then go through
    shared memory to the store's layout. The position and mask tiles take the same path without exchanges, so all
    end in one layout. Needs BD <= BL, and ``ASM`` only the layout ``_scatter`` names."""
    if SCATTER:
        BD: tl.constexpr = P.shape[2]
        pos3 = tl.broadcast_to(pos[:, None, None], P.shape)
        n3 = tl.broadcast_to(n[None, :, None], P.shape)
        ok3 = tl.broadcast_to(lmask[:, None, None] & nmask[None, :, None], P.shape)
        for r in tl.static_range(0, 8):
            if (1 << r) < BD:
                P = _halve_rows(P, d, 1 << r, True, ASM)
                pos3 = _halve_rows(pos3, d, 1 << r, False, ASM)
                n3 = _halve_rows(n3, d, 1 << r, False, ASM)
                ok3 = _halve_rows(ok3, d, 1 << r, False, ASM)
        tl.atomic_add(base + n3 * s_n + pos3 * s_l, P, mask=ok3, sem="relaxed")
    else:
        _store_tile(base, tl.sum(P, axis=2), pos, lmask, n, nmask, s_l, s_n, True, POS_LAST)


@triton.jit
def _delta_pre_t(dt_base, w_base, d, dmask, pos, lmask, s_td, s_tl, s_wd, R, bias,
                 LOWRANK: tl.constexpr, BD: tl.constexpr, BL: tl.constexpr, POS_LAST: tl.constexpr):
    """Δ + δ_bias before softplus, [BL, BD] fp32. Low-rank: sum_r W[d, r] * low[r, pos]."""
    if LOWRANK:
        acc = tl.zeros([BL, BD], dtype=tl.float32)
        for r in range(R):
            w = tl.load(w_base + d * s_wd + r, mask=dmask, other=0.0).to(tl.float32)
            lo = tl.load(dt_base + r * s_td + pos * s_tl, mask=lmask, other=0.0).to(tl.float32)
            acc += lo[:, None] * w[None, :]
    else:
        acc = _load_tile(dt_base, pos, lmask, d, dmask, s_tl, s_td, POS_LAST)
    return acc + bias[None, :]


@triton.jit
def _lowrank_factors(dt_base, pos, lmask, R, s_td, s_tl, RP: tl.constexpr):
    """The chunk's low-rank Δ factors as one [RP, BL] tile (ranks from R on read as 0), fp32."""
    r = tl.arange(0, RP)
    return tl.load(dt_base + r[:, None] * s_td + pos[None, :] * s_tl, mask=(r < R)[:, None] & lmask[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _lowrank_weights(w_base, d, dmask, R, s_wd, RP: tl.constexpr):
    """The low-rank weights of this program's channels as one [RP, BD] tile (ranks from R on read as 0), fp32: read
    once a program by the kernels that take the factors as a tile."""
    r = tl.arange(0, RP)
    return tl.load(w_base + d[None, :] * s_wd + r[:, None], mask=(r < R)[:, None] & dmask[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _lowrank_delta_pre(lo, wt, bias):
    """Δ + δ_bias before softplus, [BL, BD], from factors ``lo`` [RP, BL] and weights ``wt`` [RP, BD]."""
    return tl.sum(lo[:, :, None] * wt[:, None, :], axis=0) + bias[None, :]


@triton.jit
def _delta(pre, mask, SOFTPLUS: tl.constexpr, FAST: tl.constexpr):
    if SOFTPLUS:
        dl = _softplus(pre, FAST)
    else:
        dl = pre
    # Δ = 0 outside the valid range gives a = 1, b = 0: padded steps carry the state through unchanged.
    return tl.where(mask, dl, 0.0)


@triton.jit
def _slot_base(p0, p1, slot, s_slot, KMAP: tl.constexpr):
    """Base of an input read in slot ``slot``. With a slot map (fused SS2D) the two slots are two tensors, the image
    as given and its transposed copy, so the image itself is never copied; otherwise slots are ``s_slot`` apart."""
    if KMAP:
        if slot == 1:
            base = p1
        else:
            base = p0
        return base
    return p0 + slot * s_slot


@triton.jit
def _program_tile(kmap_ptr, idx_ptr, s_ib, s_ik, line_ptr, K, DK, N, NCHUNK, NSEG, SEG0, BD: tl.constexpr,
                  NP: tl.constexpr, BL: tl.constexpr, KMAP: tl.constexpr):
    """What a program owns (both kernels): grid axis 0 = channel block + segment, 1 = slot k, 2 = batch b."""
    nblk = tl.cdiv(DK, BD)
    seg = tl.program_id(0) // nblk + SEG0
    k = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # batch offsets can pass 2**31 elements at 2048² inputs
    d = (tl.program_id(0) % nblk) * BD + tl.arange(0, BD)
    n = tl.arange(0, NP)
    # KMAP: slot of the channel-major tensors (u, out, g, du) is kmap[k], e.g. the transposed copy for column routes
    ku = tl.load(kmap_ptr + k) if KMAP else k
    return (seg, k, b, d, n, tl.arange(0, BL), d < DK, n < N, k * DK + d, ku, idx_ptr + b * s_ib + k * s_ik,
            line_ptr + k * 2 * NCHUNK, (b * K + k) * NSEG)


@triton.jit
def _chunk_tiles(u_base, B_base, C_base, dt_base, pos, lmask, d, dmask, n, nmask, s_ul, s_ud, s_Bl, s_Bn, s_Cl, s_Cn,
                 s_tl, s_td, R, LOWRANK: tl.constexpr, WITH_C: tl.constexpr, POS_LAST: tl.constexpr,
                 RP: tl.constexpr):
    """The forward's tiles of one chunk at positions ``pos``: u, B, C (``WITH_C``), and Δ when materialised (not
    ``LOWRANK``) or its low-rank factors as one tile (``RP`` > 0, ranks padded to RP); a tile not read is returned
    as a placeholder."""
    u = _load_tile(u_base, pos, lmask, d, dmask, s_ul, s_ud, POS_LAST)
    Bt = _load_tile(B_base, pos, lmask, n, nmask, s_Bl, s_Bn, POS_LAST)
    if WITH_C:
        Ct = _load_tile(C_base, pos, lmask, n, nmask, s_Cl, s_Cn, POS_LAST)
    else:
        Ct = Bt
    if not LOWRANK:
        t = _load_tile(dt_base, pos, lmask, d, dmask, s_tl, s_td, POS_LAST)
    elif RP > 0:
        t = _lowrank_factors(dt_base, pos, lmask, R, s_td, s_tl, RP)
    else:
        t = u
    return u, Bt, Ct, t


@triton.jit
def _carry_in(hend_ptr, sdl_ptr, row, seg, DK, d, dmask, n, A2, NP: tl.constexpr, BD: tl.constexpr,
              FAST_EXP: tl.constexpr):
    """Start state of segment ``seg``: fold the earlier segments' zero-start end states through their decays."""
    h = tl.zeros([NP, BD], dtype=tl.float32)
    for t in range(0, seg):
        he = tl.load(hend_ptr + ((row + t) * DK + d[None, :]) * NP + n[:, None], mask=dmask[None, :], other=0.0)
        sd = tl.load(sdl_ptr + (row + t) * DK + d, mask=dmask, other=0.0)
        h = _exp2(A2 * sd[None, :], FAST_EXP) * h + he
    return h


@triton.jit
def _scan_fwd_kernel(
    u_ptr, u1_ptr, s_ub, s_uk, s_ud, s_ul,   # u1: slot 1 of u when KMAP (see _slot_base)
    dt_ptr, s_tb, s_tk, s_td, s_tl,
    w_ptr, s_wk, s_wd,
    bias_ptr, A_ptr, Dp_ptr,
    B_ptr, s_Bb, s_Bk, s_Bn, s_Bl,
    C_ptr, s_Cb, s_Ck, s_Cn, s_Cl,
    z_ptr, s_zb, s_zk, s_zd, s_zl,
    idx_ptr, s_ib, s_ik, line_ptr, kmap_ptr,   # line_ptr: per-chunk (first, step) of affine maps (_positions)
    out_ptr, s_ob, s_ok, s_od, s_ol,
    state_ptr, last_ptr,
    hend_ptr, sdl_ptr,                       # segment end states (b, K, NSEG, DK, NP) and ΣΔ (b, K, NSEG, DK)
    g_ptr, g1_ptr, s_gb, s_gk, s_gd, s_gl,   # DH_CARRY: the output gradient, as the backward kernel reads it
    q_ptr,                                   # DH_CARRY: segment dh carries (b, K, NSEG, DK, NP)
    K, DK, L, N, R, NCHUNK, NSEG, CPS, SEG0,
    BD: tl.constexpr, NP: tl.constexpr, BL: tl.constexpr,
    GATHER: tl.constexpr, AFFINE: tl.constexpr, LINES: tl.constexpr, KMAP: tl.constexpr, LOWRANK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, ATOMIC_OUT: tl.constexpr, WRITE_OUT: tl.constexpr,
    STORE_STATES: tl.constexpr, WRITE_LAST: tl.constexpr, SEG_END: tl.constexpr, SEG_CARRY: tl.constexpr,
    CARRY_IN_TILE: tl.constexpr, FAST_EXP: tl.constexpr, POS_LAST: tl.constexpr, PREFETCH: tl.constexpr,
    RP: tl.constexpr, DH_CARRY: tl.constexpr,
):
    seg, k, b, d, n, j, dmask, nmask, ch, ku, idx_base, line_base, row = _program_tile(
        kmap_ptr, idx_ptr, s_ib, s_ik, line_ptr, K, DK, N, NCHUNK, NSEG, SEG0, BD, NP, BL, KMAP)
    p0, dp = _route_line(idx_base, AFFINE)
    u_base = _slot_base(u_ptr, u1_ptr, ku, s_uk, KMAP) + b * s_ub
    g_base = _slot_base(g_ptr, g1_ptr, ku, s_gk, KMAP) + b * s_gb
    dt_base = dt_ptr + b * s_tb + k * s_tk
    w_base = w_ptr + k * s_wk
    B_base = B_ptr + b * s_Bb + k * s_Bk
    C_base = C_ptr + b * s_Cb + k * s_Ck
    z_base = z_ptr + b * s_zb + k * s_zk
    o_base = out_ptr + b * s_ob + ku * s_ok

    # tiles are [BL, NP, BD]: the scanned axis first, channels last. Positions are gathered (contiguity
    # unknown), so the default layout puts lanes on channels then states: the scan over axis 0 stays inside each
    # thread and the sum over states needs few shuffles (the cross-lane scan's shuffles were the main cost)
    A = tl.load(A_ptr + ch[None, :] * N + n[:, None], mask=nmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    A2 = A * LOG2E   # decays as exp2(Δ·A·log2 e)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + ch, mask=dmask, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BD], dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(Dp_ptr + ch, mask=dmask, other=0.0).to(tl.float32)
    st_base = state_ptr + ((b * K + k) * DK + d[None, :]) * (NCHUNK * NP) + n[:, None]

    sdl = tl.zeros([BD], dtype=tl.float32)
    c0 = seg * CPS
    c1 = tl.minimum(c0 + CPS, NCHUNK)
    # the segment's start state: the loop's initial state, or with CARRY_IN_TILE (``_carry_in_tile``) zero, the
    # start state entering through the first chunk's first row below (and stored here as that chunk's start)
    h = tl.zeros([NP, BD], dtype=tl.float32)
    if SEG_CARRY:
        h_in = _carry_in(hend_ptr, sdl_ptr, row, seg, DK, d, dmask, n, A2, NP, BD, FAST_EXP)
        if CARRY_IN_TILE:
            if STORE_STATES:
                tl.store(st_base + c0 * NP, h_in, mask=dmask[None, :])
        else:
            h = h_in
    if DH_CARRY:
        # the segment's dh carry for the backward (``_dh_in_states``): q = a_first dh_first with dh run back from
        # zero over the segment, i.e. q = Σ_l P_l C_l g_l, P_l the product of the decays from the segment's start
        # through l, accumulated here in the forward's order
        P = tl.full([NP, BD], 1.0, dtype=tl.float32)
        q = tl.zeros([NP, BD], dtype=tl.float32)
    if RP > 0:
        wt = _lowrank_weights(w_base, d, dmask, R, s_wd, RP)
    if PREFETCH:
        # loads run ahead of the math, which otherwise waits on them at every chunk (the kernel is bound by memory
        # latency, not by its instructions): the route map two chunks ahead, the tiles of u, B, C and of Δ (or of
        # its low-rank factors, ``RP``) one chunk ahead, so no load waits on the map and their latency overlaps a
        # chunk's scan
        lim = tl.minimum(c1 * BL, L)   # end of this program's positions
        l0 = c0 * BL + j
        p_cur = _positions(idx_base, line_base, c0, l0, l0 < lim, NCHUNK, BL, GATHER, AFFINE, LINES, p0, dp)
        p_nxt = _positions(idx_base, line_base, c0 + 1, l0 + BL, l0 + BL < lim, NCHUNK, BL, GATHER, AFFINE, LINES,
                           p0, dp)
        u_nx, B_nx, C_nx, t_nx = _chunk_tiles(u_base, B_base, C_base, dt_base, p_cur, l0 < lim, d, dmask,
                                              n, nmask, s_ul, s_ud, s_Bl, s_Bn, s_Cl, s_Cn, s_tl, s_td, R,
                                              LOWRANK, WRITE_OUT, POS_LAST, RP)
    for c in range(c0, c1):
        if STORE_STATES:
            if SEG_CARRY and CARRY_IN_TILE:   # the first chunk's start, h_in, stored above
                # (c compared as a tensor: a scalar comparison in a mask fails in the CPU interpreter)
                tl.store(st_base + c * NP, h, mask=(dmask & (d * 0 + c > c0))[None, :])
            else:
                tl.store(st_base + c * NP, h, mask=dmask[None, :])
        l = c * BL + j
        lmask = l < L
        if PREFETCH:
            pos, u, Bt, Ct, t = p_cur, u_nx, B_nx, C_nx, t_nx
            u_nx, B_nx, C_nx, t_nx = _chunk_tiles(u_base, B_base, C_base, dt_base, p_nxt, l + BL < lim, d, dmask,
                                                  n, nmask, s_ul, s_ud, s_Bl, s_Bn, s_Cl, s_Cn, s_tl, s_td, R,
                                                  LOWRANK, WRITE_OUT, POS_LAST, RP)
            p_cur = p_nxt
            p_nxt = _positions(idx_base, line_base, c + 2, l + 2 * BL, l + 2 * BL < lim, NCHUNK, BL, GATHER,
                               AFFINE, LINES, p0, dp)
        else:
            # each tile read where first used (fewer live registers)
            pos = _positions(idx_base, line_base, c, l, lmask, NCHUNK, BL, GATHER, AFFINE, LINES, p0, dp)
            u = _load_tile(u_base, pos, lmask, d, dmask, s_ul, s_ud, POS_LAST)
        m2 = lmask[:, None] & dmask[None, :]
        if PREFETCH and not LOWRANK:
            pre = t + bias[None, :]
        elif RP > 0:
            if not PREFETCH:
                t = _lowrank_factors(dt_base, pos, lmask, R, s_td, s_tl, RP)
            pre = _lowrank_delta_pre(t, wt, bias)
        else:
            pre = _delta_pre_t(dt_base, w_base, d, dmask, pos, lmask, s_td, s_tl, s_wd, R, bias, LOWRANK, BD, BL,
                               POS_LAST)
        dl = _delta(pre, m2, SOFTPLUS, FAST_EXP)
        if SEG_END:
            sdl += tl.sum(dl, axis=0)
        if not PREFETCH:
            Bt = _load_tile(B_base, pos, lmask, n, nmask, s_Bl, s_Bn, POS_LAST)
        a = _exp2(dl[:, None, :] * A2[None, :, :], FAST_EXP)
        if DH_CARRY:
            # before the state's tiles exist, so the two sets of tiles are not live together
            Ct = _load_tile(C_base, pos, lmask, n, nmask, s_Cl, s_Cn, POS_LAST)
            gt = _load_tile(g_base, pos, lmask, d, dmask, s_gl, s_gd, POS_LAST)
            # P entering through the first row, as the carried state does in _scan_rows
            Ps = tl.cumprod(tl.where(j[:, None, None] == 0, a * P[None, :, :], a), 0)
            q += tl.sum(Ps * (Ct[:, :, None] * gt[:, None, :]), axis=0)
            P = _row(Ps, j, BL - 1, False)
        bx = (dl * u)[:, None, :] * Bt[:, :, None]
        if SEG_CARRY and CARRY_IN_TILE:   # h_0 = a_0 h_in + b_0
            bx += tl.where((j[:, None, None] == 0) & (c == c0), a * h_in[None, :, :], 0.0)
        # state after the chunk = its last row (padded steps keep it unchanged). Not unrolled: that saved 8
        # instructions of ~1570 here and measured no faster
        hs, h = _scan_rows(a, bx, h, j, BL, False)
        if WRITE_OUT:
            if not PREFETCH:
                Ct = _load_tile(C_base, pos, lmask, n, nmask, s_Cl, s_Cn, POS_LAST)
            y = tl.sum(hs * Ct[:, :, None], axis=1)
            if HAS_D:
                y += Dv[None, :] * u
            if HAS_Z:
                zt = _load_tile(z_base, pos, lmask, d, dmask, s_zl, s_zd, POS_LAST)
                y = y * zt * _sigmoid(zt, FAST_EXP)
            _store_tile(o_base, y, pos, lmask, d, dmask, s_ol, s_od, ATOMIC_OUT, POS_LAST)
    if SEG_END:
        tl.store(hend_ptr + ((row + seg) * DK + d[None, :]) * NP + n[:, None], h, mask=dmask[None, :])
        tl.store(sdl_ptr + (row + seg) * DK + d, sdl, mask=dmask)
    if DH_CARRY:
        tl.store(q_ptr + ((row + seg) * DK + d[None, :]) * NP + n[:, None], q, mask=dmask[None, :])
    if WRITE_LAST:
        if seg == NSEG - 1:
            tl.store(last_ptr + (b * K * DK + ch[None, :]) * N + n[:, None], h, mask=nmask[:, None] & dmask[None, :])


@triton.jit
def _scan_bwd_kernel(
    u_ptr, u1_ptr, s_ub, s_uk, s_ud, s_ul,   # u1: slot 1 of u when KMAP (see _slot_base)
    dt_ptr, s_tb, s_tk, s_td, s_tl,
    w_ptr, s_wk, s_wd,
    bias_ptr, A_ptr, Dp_ptr,
    B_ptr, s_Bb, s_Bk, s_Bn, s_Bl,
    C_ptr, s_Cb, s_Ck, s_Cn, s_Cl,
    z_ptr, s_zb, s_zk, s_zd, s_zl,
    idx_ptr, s_ib, s_ik, line_ptr, kmap_ptr,   # line_ptr: per-chunk (first, step) of affine maps (_positions)
    g_ptr, g1_ptr, s_gb, s_gk, s_gd, s_gl,
    state_ptr,
    du_ptr, s_dub, s_duk, s_dud, s_dul,      # du (store) or merged dx (atomic)
    ddt_ptr, s_ddb, s_ddk, s_ddd, s_ddl,     # dΔ (store), in the layout Δ is read in
    dz_ptr,                                  # same strides as z
    dB_ptr, s_dBb, s_dBk, s_dBn, s_dBl,      # fp32, atomics
    dC_ptr, s_dCb, s_dCk, s_dCn, s_dCl,
    dA_ptr, dD_ptr, dbias_ptr,               # per-(batch, segment) partials: (b*NSEG, K*DK, N), (b*NSEG, K*DK) x2
    q_ptr, sdl_ptr,                          # segment dh carries (b, K, NSEG, DK, NP) and ΣΔ (b, K, NSEG, DK)
    K, DK, L, N, NCHUNK, NSEG, CPS, SEG0,
    BD: tl.constexpr, NP: tl.constexpr, BL: tl.constexpr, R: tl.constexpr,
    GATHER: tl.constexpr, AFFINE: tl.constexpr, LINES: tl.constexpr, KMAP: tl.constexpr, LOWRANK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, ATOMIC_DU: tl.constexpr, DH_ONLY: tl.constexpr,
    SEG_CARRY: tl.constexpr, FAST_EXP: tl.constexpr, POS_LAST: tl.constexpr, SCATTER: tl.constexpr,
    UNROLL: tl.constexpr, SIG_FROM_DELTA: tl.constexpr, RP: tl.constexpr, LR_AHEAD: tl.constexpr,
    STAGES: tl.constexpr,
    CARRY_IN_TILE: tl.constexpr,
):
    seg, k, b, d, n, j, dmask, nmask, ch, ku, idx_base, line_base, row = _program_tile(
        kmap_ptr, idx_ptr, s_ib, s_ik, line_ptr, K, DK, N, NCHUNK, NSEG, SEG0, BD, NP, BL, KMAP)
    p0, dp = _route_line(idx_base, AFFINE)
    u_base = _slot_base(u_ptr, u1_ptr, ku, s_uk, KMAP) + b * s_ub
    dt_base = dt_ptr + b * s_tb + k * s_tk
    w_base = w_ptr + k * s_wk
    B_base = B_ptr + b * s_Bb + k * s_Bk
    C_base = C_ptr + b * s_Cb + k * s_Ck
    z_base = z_ptr + b * s_zb + k * s_zk
    dz_base = dz_ptr + b * s_zb + k * s_zk
    g_base = _slot_base(g_ptr, g1_ptr, ku, s_gk, KMAP) + b * s_gb
    du_base = du_ptr + b * s_dub + ku * s_duk
    ddt_base = ddt_ptr + b * s_ddb + k * s_ddk
    dB_base = dB_ptr + b * s_dBb + k * s_dBk
    dC_base = dC_ptr + b * s_dCb + k * s_dCk

    # tiles [BL, NP, BD] as in the forward kernel: scans stay inside threads, lanes run over channels/states
    An = nmask[:, None] & dmask[None, :]
    A = tl.load(A_ptr + ch[None, :] * N + n[:, None], mask=An, other=0.0).to(tl.float32)
    A2 = A * LOG2E
    if HAS_BIAS:
        bias = tl.load(bias_ptr + ch, mask=dmask, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BD], dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(Dp_ptr + ch, mask=dmask, other=0.0).to(tl.float32)
    else:
        Dv = tl.zeros([BD], dtype=tl.float32)
    st_base = state_ptr + ((b * K + k) * DK + d[None, :]) * (NCHUNK * NP) + n[:, None]

    if RP > 0:
        wt = _lowrank_weights(w_base, d, dmask, R, s_wd, RP)
    # carry: a·dh at the first position of the chunk after this one. Past the segment's end it is G = Σ over later
    # segments of their decayed q: the loop's initial carry, or with CARRY_IN_TILE (``_carry_in_tile``) zero, G
    # entering through the first chunk's last row below
    carry = tl.zeros([NP, BD], dtype=tl.float32)
    if SEG_CARRY:
        G = tl.zeros([NP, BD], dtype=tl.float32)
        for si in range(0, NSEG - 1 - seg):
            t = NSEG - 1 - si
            qv = tl.load(q_ptr + ((row + t) * DK + d[None, :]) * NP + n[:, None], mask=dmask[None, :], other=0.0)
            # the last segment's decay multiplies G = 0 and is never read: the forward's ΣΔ (``_dh_in_states``)
            # has no entry for it (t as a tensor in the mask, as in the forward's state stores)
            sd = tl.load(sdl_ptr + (row + t) * DK + d, mask=dmask & (d * 0 + t < NSEG - 1), other=0.0)
            G = qv + _exp2(A2 * sd[None, :], FAST_EXP) * G
        if not CARRY_IN_TILE:
            carry = G
    dA_acc = tl.zeros([NP, BD], dtype=tl.float32)
    dD_acc = tl.zeros([BD], dtype=tl.float32)
    dbias_acc = tl.zeros([BD], dtype=tl.float32)
    sdl = tl.zeros([BD], dtype=tl.float32)
    c0 = seg * CPS
    c1 = tl.minimum(c0 + CPS, NCHUNK)
    pos_next = _positions(idx_base, line_base, c1 - 1, (c1 - 1) * BL + j, (c1 - 1) * BL + j < L, NCHUNK, BL,
                          GATHER, AFFINE, LINES, p0, dp)
    if LR_AHEAD:
        lo_next = _lowrank_factors(dt_base, pos_next, (c1 - 1) * BL + j < L, R, s_td, s_tl, RP)
    # STAGES (``_loop_stages``): the chunk-start state's load is issued ahead by Triton's pipeliner, into shared
    # memory, holding no registers (the kernel has none to spare for loads ahead)
    for ci in tl.range(0, c1 - c0, num_stages=STAGES):
        c = c1 - 1 - ci
        l = c * BL + j
        lmask = l < L
        # the route map is read one chunk ahead, so the gathered loads below wait one memory latency, not two
        # (measured faster in the backward; in the forward it was slower)
        pos = pos_next
        pos_next = _positions(idx_base, line_base, c - 1, l - BL, (l >= BL) & (l - BL < L), NCHUNK, BL, GATHER,
                              AFFINE, LINES, p0, dp)
        m2 = lmask[:, None] & dmask[None, :]
        if RP > 0:
            if LR_AHEAD:   # the factors' tile read with the positions, a chunk ahead
                lo = lo_next
                lo_next = _lowrank_factors(dt_base, pos_next, (l >= BL) & (l - BL < L), R, s_td, s_tl, RP)
            else:
                lo = _lowrank_factors(dt_base, pos, lmask, R, s_td, s_tl, RP)
            pre = _lowrank_delta_pre(lo, wt, bias)
        else:
            pre = _delta_pre_t(dt_base, w_base, d, dmask, pos, lmask, s_td, s_tl, s_wd, R, bias, LOWRANK, BD, BL,
                               POS_LAST)
        dl = _delta(pre, m2, SOFTPLUS, FAST_EXP)
        Ct = _load_tile(C_base, pos, lmask, n, nmask, s_Cl, s_Cn, POS_LAST)
        a = _exp2(dl[:, None, :] * A2[None, :, :], FAST_EXP)
        g = _load_tile(g_base, pos, lmask, d, dmask, s_gl, s_gd, POS_LAST)
        if DH_ONLY:
            sdl += tl.sum(dl, axis=0)
        else:
            # states of this chunk, rebuilt from its stored start state
            u = _load_tile(u_base, pos, lmask, d, dmask, s_ul, s_ud, POS_LAST)
            Bt = _load_tile(B_base, pos, lmask, n, nmask, s_Bl, s_Bn, POS_LAST)
            dlu = dl * u
            bx = dlu[:, None, :] * Bt[:, :, None]
            h0 = tl.load(st_base + c * NP, mask=dmask[None, :], other=0.0)
            hs, _ = _scan_rows(a, bx, h0, j, BL, UNROLL)
        if HAS_Z:
            zt = _load_tile(z_base, pos, lmask, d, dmask, s_zl, s_zd, POS_LAST)
            sig = _sigmoid(zt, FAST_EXP)
            if not DH_ONLY:
                y = tl.sum(hs * Ct[:, :, None], axis=1) + Dv[None, :] * u
                dz = g * y * sig * (1.0 + zt * (1.0 - sig))
                _store_tile(dz_base, dz, pos, lmask, d, dmask, s_zl, s_zd, False, POS_LAST)
            g = g * zt * sig
        if not DH_ONLY:
            # dC = sum_d g h, reduced over this program's channels, then atomics. Taken before the reverse scan, so
            # only h - b (= a_l h_{l-1}) stays live through it: one [BL, NP, BD] tile fewer at the peak
            _sum_channels_store(dC_base, hs * g[:, None, :], pos, lmask, d, n, nmask, s_dCl, s_dCn, SCATTER,
                                FAST_EXP, POS_LAST)
            hsb = hs - bx

        # dh past the chunk enters through the last row (dh_last = C g + carry), as the carried state does in the
        # forward; so does the later segments' G in the segment's last chunk, the first walked
        cg = Ct[:, :, None] * g[:, None, :]
        if SEG_CARRY and CARRY_IN_TILE:
            cg += tl.where((j[:, None, None] == BL - 1) & (ci == 0), G[None, :, :], 0.0)
        dh, carry = _scan_rows_reverse(a, cg, carry, j, BL, UNROLL)

        if not DH_ONLY:
            # dB = sum_d Δ u dh, as dC above
            _sum_channels_store(dB_base, dh * dlu[:, None, :], pos, lmask, d, n, nmask, s_dBl, s_dBn, SCATTER,
                                FAST_EXP, POS_LAST)

            dhB = tl.sum(dh * Bt[:, :, None], axis=1)
            du = dl * dhB + Dv[None, :] * g
            _store_tile(du_base, du, pos, lmask, d, dmask, s_dul, s_dud, ATOMIC_DU, POS_LAST)
            # a_l h_{l-1} = h_l - b_l: the gradient w.r.t. Δ·A needs no shifted state
            t = dh * hsb
            ddl = u * dhB + tl.sum(t * A[None, :, :], axis=1)
            dA_acc += tl.sum(t * dl[:, None, :], axis=0)
            if SOFTPLUS:
                # d softplus = sigmoid(pre), with SIG_FROM_DELTA (``_sigmoid_from_delta``) as exp(pre - Δ), since
                # exp(Δ) = 1 + exp(pre): one exp from the Δ at hand
                if SIG_FROM_DELTA:
                    ddl = ddl * _exp2((pre - dl) * LOG2E, FAST_EXP)
                else:
                    ddl = ddl * _sigmoid(pre, FAST_EXP)
            ddl = tl.where(m2, ddl, 0.0)
            dbias_acc += tl.sum(ddl, axis=0)
            dD_acc += tl.sum(g * u, axis=0)
            _store_tile(ddt_base, ddl, pos, lmask, d, dmask, s_ddl, s_ddd, False, POS_LAST)

    if DH_ONLY:
        tl.store(q_ptr + ((row + seg) * DK + d[None, :]) * NP + n[:, None], carry, mask=dmask[None, :])
        tl.store(sdl_ptr + (row + seg) * DK + d, sdl, mask=dmask)
    else:
        prow = (b * NSEG + seg) * K * DK + ch
        tl.store(dA_ptr + prow[None, :] * N + n[:, None], dA_acc, mask=An)
        tl.store(dD_ptr + prow, dD_acc, mask=dmask)
        tl.store(dbias_ptr + prow, dbias_acc, mask=dmask)


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# Passed to every launch of our kernels: FMA contraction stays on whatever Triton's default (3.9 warns that 3.10 turns
# it off); the recurrences, polynomials and norms are written for FMAs
COMPILE_OPTS = {"enable_fp_fusion": True}

# Benchmarks and tests may set this to {"fwd": (BD, BL, warps[, maxnreg]), "bwd": (BD, BL, warps[, maxnreg]),
# "segments": NSEG or (forward NSEG, backward NSEG)} to sweep tiles (and register caps) or force segment counts.
TILE_OVERRIDE: dict | None = None

# Segments (parallel over L) cost an extra pass (~0.6x the work), so they are used only when the (batch, slot,
# channel-block) programs alone are fewer than below_programs; then enough segments for target_programs, with at
# least min_chunks chunks each. Measured on H200 (BENCHMARKS.md, fused SS2D stage 1, N=16): 1536 one-warp programs
# (256² b32) already fill the GPU (2 segments: 2.0 -> 3.2 ms), 96 (1024² b2) do not (43 segments: 22 -> 3.9 ms).
SEGMENT_OPTS = {"below_programs": 1024, "target_programs": 4096, "min_chunks": 32}

# Register cap of the N > 1 forward's default tile (see launch_plan)
FWD_MAXNREG = 168


@dataclass(frozen=True)
class LaunchPlan:
    bd: int        # channels per program
    np: int        # states, padded to a power of two
    bl: int        # positions per chunk
    warps: int
    nchunk: int
    nseg: int      # segments of L
    cps: int       # chunks per segment
    nblk: int      # channel blocks
    maxnreg: int | None = None   # register cap per thread (None: the compiler's choice)

    def launch_opts(self) -> dict:
        opts = dict(BD=self.bd, NP=self.np, BL=self.bl, num_warps=self.warps, **COMPILE_OPTS)
        if self.maxnreg:   # only when set: the CPU interpreter takes no such option
            opts["maxnreg"] = self.maxnreg
        return opts

    def grid(self, slots: int, batch: int, segments: int | None = None) -> tuple[int, int, int]:
        return (self.nblk * (self.nseg if segments is None else segments), slots, batch)


def launch_plan(n_state: int, length: int, channels: int, backward: bool, rows: int, feature_last: bool = False,
                for_backward: bool = False) -> LaunchPlan:
    """Tiles and segments for one launch; rows = batch * slots. The chunk-start states of the backward depend on
    BL and the segments, which both depend only on the shapes and the layout, so every launch of one backward
    agrees. ``feature_last``: the operands are read channels last (``FEATURE_LAST``); ``for_backward``: a forward
    whose chunk-start states serve a backward (a training forward, or the backward's states pass), which then
    takes the backward's chunk length where the tiles differ only in it."""
    np_ = next_pow2(n_state)
    key = "bwd" if backward else "fwd"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    maxnreg = None
    if TILE_OVERRIDE and key in TILE_OVERRIDE:
        bd, bl, warps, *cap = TILE_OVERRIDE[key]
        maxnreg = cap[0] if cap else None
    elif interpret:
        # the CPU interpreter pays per op and per program, not per element: few large tiles (still several
        # chunks and masked rows on the tiny test shapes, so the chunk carry and masks are exercised)
        bd, bl, warps = max(1, min(16, next_pow2(channels))), max(1, min(16, next_pow2(length))), 4
    elif np_ <= 2 and feature_last:
        # one channel a lane, 32 consecutive channels a program: each row of a tile is one 64-byte read, and the
        # rows stay in registers (no cross-lane scan). Measured on H200 (BENCHMARKS.md, nineteenth session, 256²
        # b32 bf16, vmunet_fast's stages): BL=32 the fastest forward, BL=16 the fastest backward and, states kept
        # at that BL, the fastest training pair
        bd, bl, warps = 32, (16 if backward or for_backward else 32), 1
    elif np_ <= 2:
        # measured on H200 (BENCHMARKS.md, fused SS2D stage-1 256² b32, N=1): best fwd and fwd+bwd channel first
        # (channels last this tile reads 8-byte runs and measured 2x slower)
        bd, bl, warps = 4, 64, 1
    else:
        # N=16 measured best (one warp, no cross-warp barriers; BENCHMARKS.md tile sweep): fwd BD=16, BL=8; bwd
        # BD=8, BL=8 (its dB/dC/dΔ reductions over channels cross lanes, so fewer channels per program pay off)
        bd, bl = (8, 8) if backward else (16, 8)
        bd = max(1, bd * 16 // np_)
        warps = 1
        # the forward, its tiles loaded a chunk ahead (_prefetch), would take ~220 registers: capped to keep 12 warps
        # a multiprocessor (measured on H200 under Triton 3.6 and 3.9, BENCHMARKS.md fifteenth session)
        maxnreg = None if backward else FWD_MAXNREG
    bd = max(1, min(bd, next_pow2(channels)))
    bl = max(1, min(bl, next_pow2(length)))
    nchunk = cdiv(length, bl)
    nblk = cdiv(channels, bd)
    if TILE_OVERRIDE and "segments" in TILE_OVERRIDE:
        nseg = TILE_OVERRIDE["segments"]
        nseg = nseg[int(backward)] if isinstance(nseg, tuple) else nseg
    elif interpret:
        nseg = 1
    else:
        programs = rows * nblk
        want = cdiv(SEGMENT_OPTS["target_programs"], programs) if programs < SEGMENT_OPTS["below_programs"] else 1
        nseg = max(1, min(want, nchunk // SEGMENT_OPTS["min_chunks"]))
    nseg = max(1, min(nseg, nchunk))
    cps = cdiv(nchunk, nseg)
    nseg = cdiv(nchunk, cps)      # no empty segment
    return LaunchPlan(bd, np_, bl, warps, nchunk, nseg, cps, nblk, maxnreg)


@dataclass(frozen=True)
class ScanDims:
    batch: int
    slots: int     # K: groups (plain scan) or directions (SS2D)
    channels: int  # DK: channels per slot
    length: int
    n_state: int
    rank: int      # low-rank Δ rank (0 when Δ is read directly)

    def scalars(self, plan: LaunchPlan, with_rank: bool = True) -> tuple:
        rank = (self.rank,) if with_rank else ()
        return (self.slots, self.channels, self.length, self.n_state, *rank, plan.nchunk, plan.nseg, plan.cps)


def _fast_exp() -> bool:
    return os.environ.get("TRITON_INTERPRET") != "1"   # inline PTX cannot run in the CPU interpreter


def _triton_version() -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", triton.__version__).groups()
    return int(major), int(minor)


# Whether the kernels build their gathered tiles with positions on the last axis (see ``_load_tile``): Triton lays a
# load whose axes look equally (non-)contiguous along its last axis from 3.7 on, along its first before.
POS_LAST = _triton_version() >= (3, 7)


def _pos_last(plan: LaunchPlan, flags: dict) -> bool:
    # N=1 tiles (BL=64, BD=4) keep the direct build: under Triton 3.9 the transposed one measured 3-10% slower in
    # fwd+bwd (stage 1 at 256² batch 32: 3.43 -> 3.71 ms fp32), channels on the lanes suiting their long chunks.
    # FEATURE_LAST operands (channels or states innermost in memory, positions strided) are contiguous along the
    # tile's columns, so the direct build puts consecutive channels on consecutive lanes
    return POS_LAST and plan.np > 1 and not flags.get("FEATURE_LAST", False)


def _kernel_flags(flags: dict) -> dict:
    """The op's flags as kernel constexprs: all but FEATURE_LAST, which only picks the tile build (``_pos_last``)."""
    return {key: v for key, v in flags.items() if key != "FEATURE_LAST"}


def _prefetch(plan: LaunchPlan) -> bool:
    # the forward loads a chunk ahead for N > 1 (fifteenth session: stage-1 forward -11% bf16, -18% fp32 on H200);
    # N=1 tiles (BL=64, BD=4) measured slower with it (0.78 -> 0.92 ms), their loads already in flight together
    return plan.np > 1


# Largest padded rank at which the kernels read the low-rank Δ factors as one tile (``_lowrank_tile``), by tile:
# N > 2 (where both kernels read the tile a chunk ahead) and the N <= 2 channels-last tile
LOWRANK_TILE_MAX = {"ahead": 8, "small_state_channels_last": 16}


def _lowrank_tile(plan: LaunchPlan, rank: int, flags: dict) -> int:
    """``RP`` of a launch: the padded rank when the kernel reads the chunk's low-rank Δ factors as one [RP, BL] tile
    (one load, the rank sum in registers), or 0 for one gathered load per rank and row, each address computed and
    each load waited on where the chunk runs. N > 2 reads the tile a chunk ahead (``_lowrank_ahead``). Measured on
    H200 (BENCHMARKS.md, twentieth session, 256² b32): N=16 at rank 6, stage-1 forward -8% channel first and -20%
    channels last (bf16), backward kernel -1.4% bf16 and -4.6% fp32; the N=1 channels-last tile at ranks 6 and 12,
    fwd+bwd -13 to -15% (bf16). Not kept: the N <= 2 channel-first tile (even), and larger ranks, where Δ from one
    GEMM was faster (``triton_ss2d.DELTA_OPTS``)."""
    if not flags.get("LOWRANK"):
        return 0
    rp = next_pow2(max(rank, 1))
    if plan.np <= 2:
        use = flags.get("FEATURE_LAST", False) and rp <= LOWRANK_TILE_MAX["small_state_channels_last"]
    else:
        use = rp <= LOWRANK_TILE_MAX["ahead"]
    return rp if use else 0


def _lowrank_ahead(plan: LaunchPlan) -> bool:
    """Whether the backward reads the factors' tile a chunk ahead (the forward does whenever it reads ahead,
    ``_prefetch``): for N > 2; the N <= 2 channels-last backward measured 4% slower with it (more spills)."""
    return plan.np > 2


def _scatter(plan: LaunchPlan) -> bool:
    """Whether the backward sums dB/dC over channels by reduce-scatter (``_sum_channels_store``). On a GPU only for
    the tile whose layout ``tests/kernel_compile_check.py`` verifies (channels on lanes 0-7, 4 state lanes, rows in
    registers: the N=16 default), since its lane exchanges assume it; in the CPU interpreter, which swaps logically,
    for any tile with BD <= BL. Measured on H200 (BENCHMARKS.md, sixteenth session): stage-1 fwd+bwd -9%."""
    if not _fast_exp():
        return plan.bd <= plan.bl
    return (plan.bd, plan.np, plan.warps) == (8, 16, 1) and plan.bl >= plan.bd


def _unroll_rows(plan: LaunchPlan) -> bool:
    """Whether the backward's scans run as static loops over the rows (``_scan_rows``): when a tile's rows sit in
    each thread's registers, i.e. its states and channels fill a warp's lanes (all N > 1 tiles; not the N=1 tile,
    BL=64 rows across lanes, where the loop measured 1.4x slower). Measured on H200 (BENCHMARKS.md, seventeenth
    session): stage-1 backward kernel -6% bf16, -7% fp32."""
    return plan.np * plan.bd >= 32 * plan.warps


def _loop_stages(plan: LaunchPlan) -> int:
    """Pipeline depth of the backward's chunk loop (``num_stages`` of its ``tl.range``; 1 is none). Triton 3.9's
    software pipeliner then copies each chunk's start state (fp32, addressed by the loop index alone) from global to
    shared memory two chunks ahead (cp.async), where the latency-bound kernel used to wait on it every chunk; tiles
    addressed through the route map, or carried from the chunk before, are not pipelined. Measured on H200
    (BENCHMARKS.md, twenty-second session, 256² b32): N=16 backward kernel -13% to -29% at stages 1-4 (stage 1 4.00
    -> 3.41 ms fp32, 3.70 -> 3.21 bf16), 2 and 4 stages no better; vmunet_isic training +9%. Where L was split into
    segments it changed nothing until ``_carry_in_tile`` (stage 1 at 1024² b2: 6.08 -> 6.05 ms bf16). The N <= 2
    tiles gained nothing (channel first, no copy issued) or lost 1% (vmunet_fast's channels-last training), so they
    keep none."""
    return 3 if plan.np > 2 else 1


def _carry_in_tile(plan: LaunchPlan) -> bool:
    """Whether a segment's carry from the other segments enters through its first chunk's tile (the loop starting
    from zero) rather than as the loop's initial value: in the backward the later segments' dh carry G, added at the
    first chunk's last row; in the forward the start state, through the first row (a_0 h_in added to b_0). As the
    initial value, the carry kept the layout of its loads into the loop, and Triton ran part of every chunk in both
    layouts. Measured on H200, N=16, stage 1, bf16: backward kernel (BENCHMARKS.md, twenty-second session) 1024² b2
    6.07 -> 3.95 ms (fp32 6.16 -> 4.16), 2048² b1 11.90 -> 7.93, 256² b32 with 2 segments forced 5.09 -> 3.16, the
    speed of one segment; forward (twenty-third session) 1024² b2 main pass 0.93 -> 0.82 ms, states pass 0.80 ->
    0.73. The N <= 2 tiles were not measured this way and keep the initial value."""
    return plan.np > 2


def _sigmoid_from_delta(plan: LaunchPlan, flags: dict) -> bool:
    """Whether the backward takes softplus' derivative, sigmoid(pre), as exp(pre - Δ) (one exp; exact, since
    exp(Δ) = 1 + exp(pre), and accurate at both ends: pre - Δ -> 0 above, -> pre below) rather than from
    exp(-|pre|) with a reciprocal and a select. Measured on H200 (BENCHMARKS.md, twenty-fifth session, backward
    kernel, 256² b32, with the forward's polynomial softplus in place of libm's): N=16 stage 1 3.20 -> 3.19 ms
    bf16, 3.41 -> 3.26 fp32, stage 2 -4%; N=1 channels last 1.13 -> 1.00 ms bf16. Not for the N <= 2
    channel-first tile (BD=4, BL=64), where it measured 7% slower (1.39 -> 1.48 ms bf16)."""
    return plan.np > 2 or flags.get("FEATURE_LAST", False)


def _dh_in_states(plan: LaunchPlan, flags: dict) -> bool:
    """Whether the backward's states pass, where it splits L into segments, also sums each segment's dh carry
    (``DH_CARRY``), so the backward runs under its segments and skips its own dh-carry pass (``DH_ONLY``): for the
    N > 2 tiles without a z gate (the gate's derivative would need z there too). The states pass already walks
    every segment forward and computes its decays; the dh-carry pass recomputed Δ and the decays, and read
    everything again, for three products an element. Measured on H200 (BENCHMARKS.md, twenty-fourth session,
    fused SS2D N=16): states pass + dh-carry pass 0.73 + 0.76 -> 1.26 ms at stage 1 of 1024² b2 (bf16; fp32 0.79 +
    0.80 -> 1.30), 1.44 + 1.54 -> 2.53 ms at 2048² b1; the backward kernel, under the forward's segments (43
    against its own 22 at 1024² b2), unchanged. Other tiles for the pass (8 channels; two warps) were no faster."""
    return plan.np > 2 and not flags.get("HAS_Z", False)


def _segment_buffers(dims: ScanDims, plan: LaunchPlan, device) -> tuple[torch.Tensor, torch.Tensor]:
    f32 = dict(device=device, dtype=torch.float32)
    return (torch.empty(dims.batch, dims.slots, plan.nseg, dims.channels, plan.np, **f32),
            torch.empty(dims.batch, dims.slots, plan.nseg, dims.channels, **f32))


def scan_forward(prefix: tuple, dims: ScanDims, plan: LaunchPlan, flags: dict, *, out=None, out_strides=None,
                 atomic_out=False, states=None, last=None,
                 seg_ends: tuple[torch.Tensor, torch.Tensor] | None = None,
                 dh_carry: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Launch the forward kernel: segment end states first when L is split (``LaunchPlan.nseg`` > 1), then the
    main pass (writes ``out``, or the chunk-start ``states`` for the backward). Returns the segment buffers (end
    states, ΣΔ); ``seg_ends``: those of an earlier run on the same inputs and plan, which skips their pass.
    ``dh_carry``: (the output gradient, its slot-1 tensor, *its strides, q), where the main pass also sums each
    segment's dh carry into q (see ``_dh_in_states``)."""
    ph = prefix[0]  # placeholder for pointers a variant never touches
    if plan.nseg > 1 and seg_ends is not None:
        seg_bufs = seg_ends
    else:
        seg_bufs = _segment_buffers(dims, plan, ph.device) if plan.nseg > 1 else (ph, ph)
    common = dict(**plan.launch_opts(), FAST_EXP=_fast_exp(), POS_LAST=_pos_last(plan, flags),
                  PREFETCH=_prefetch(plan), RP=_lowrank_tile(plan, dims.rank, flags),
                  CARRY_IN_TILE=_carry_in_tile(plan), **_kernel_flags(flags))
    no_dh = (ph, ph, 0, 0, 0, 0, ph)
    if plan.nseg > 1 and seg_ends is None:
        # the last segment's end state is never carried anywhere: nseg - 1 segments
        _scan_fwd_kernel[plan.grid(dims.slots, dims.batch, plan.nseg - 1)](
            *prefix, ph, 0, 0, 0, 0, ph, ph, *seg_bufs, *no_dh, *dims.scalars(plan), 0,
            ATOMIC_OUT=False, WRITE_OUT=False, STORE_STATES=False, WRITE_LAST=False, SEG_END=True,
            SEG_CARRY=False, DH_CARRY=False, **common)
    _scan_fwd_kernel[plan.grid(dims.slots, dims.batch)](
        *prefix, out if out is not None else ph, *(out_strides or (0, 0, 0, 0)),
        states if states is not None else ph, last if last is not None else ph, *seg_bufs, *(dh_carry or no_dh),
        *dims.scalars(plan), 0,
        ATOMIC_OUT=atomic_out, WRITE_OUT=out is not None, STORE_STATES=states is not None,
        WRITE_LAST=last is not None, SEG_END=False, SEG_CARRY=plan.nseg > 1, DH_CARRY=dh_carry is not None,
        **common)
    return seg_bufs if plan.nseg > 1 else None


def same_states_layout(a: LaunchPlan, b: LaunchPlan) -> bool:
    """Whether chunk-start states written under plan ``a`` serve a backward under plan ``b``: one per chunk, so
    the layout depends on neither the channel block nor the segments."""
    return all(getattr(a, f) == getattr(b, f) for f in ("np", "bl", "nchunk"))


def states_numel(batch: int, slots: int, channels: int, plan: LaunchPlan) -> int:
    """Size of the backward's chunk-start states, fp32 (b, K, D, nchunk, NP) flat: NP/BL of u per slot."""
    return batch * slots * channels * plan.nchunk * plan.np


def scan_backward(prefix: tuple, dims: ScanDims, plan: LaunchPlan, flags: dict, *, g: tuple, du: tuple,
                  atomic_du: bool, ddt: tuple, dz, dB: tuple, dC: tuple,
                  states: torch.Tensor | None = None,
                  seg_ends: tuple[torch.Tensor, torch.Tensor, LaunchPlan] | None = None) -> tuple[torch.Tensor, ...]:
    """States pass, then (L split) the segments' dh carries, then the backward kernel. ``g`` is (tensor, its
    slot-1 tensor, *strides); ``du``, ``ddt``, ``dB``, ``dC`` are (tensor, *strides) tuples. What a training forward
    kept spares work here: ``states``, the chunk-start states (``scan_forward(..., states=...)`` under a plan with
    the same ``same_states_layout``), skip the states pass; ``seg_ends``, the segment end states and ΣΔ of the
    forward's run and its plan, skip the states pass's own end-state pass. Where the states pass splits L, it also
    sums the dh carries (``_dh_in_states``) and the backward takes its segments. Returns the per-channel parameter
    gradients (dA, dD, dδ_bias), (slots*channels, N) and (slots*channels,), summed over batch and segments."""
    ph = prefix[0]
    dev = ph.device
    f32 = dict(device=dev, dtype=torch.float32)
    q = sdl = None
    if states is None:
        states = torch.empty(states_numel(dims.batch, dims.slots, dims.channels, plan), **f32)
        if seg_ends is not None and same_states_layout(seg_ends[2], plan):
            # the states pass runs under the forward's plan (channel block, segments), whose end states it reuses
            splan, known_ends = seg_ends[2], seg_ends[:2]
        else:
            # under the forward's tile where the states layout allows: its 16 channels a program replicate the
            # per-(position, channel) work (Δ, softplus) over 2 state lanes, not 4 (H200, eighteenth session,
            # stage 1 at 256² b32 bf16: states pass 0.96 -> 0.70 ms)
            fplan = launch_plan(dims.n_state, dims.length, dims.channels, False, dims.batch * dims.slots,
                                flags.get("FEATURE_LAST", False), for_backward=True)
            splan, known_ends = (fplan if same_states_layout(fplan, plan) else plan), None
        dh_carry = None
        # only where the backward splits L itself: one that walks all of L needs no carries, whatever the forward did
        if plan.nseg > 1 and splan.nseg > 1 and _dh_in_states(splan, flags):
            q = torch.empty(dims.batch, dims.slots, splan.nseg, dims.channels, splan.np, **f32)
            dh_carry = (*g, q)
            plan = replace(plan, nseg=splan.nseg, cps=splan.cps)
            # uncapped: under the forward's 168 registers the pass spilled, and ran 1.70 ms against 1.26 (see
            # _dh_in_states)
            splan = replace(splan, maxnreg=None)
        seg_bufs = scan_forward(prefix, dims, splan, flags, states=states, seg_ends=known_ends, dh_carry=dh_carry)
        if dh_carry is not None:
            sdl = seg_bufs[1]
    # R is a compile-time constant of the backward: its Δ loop is unrolled (measured faster; the forward's was not)
    rp = _lowrank_tile(plan, dims.rank, flags)
    common = dict(**plan.launch_opts(), R=dims.rank, ATOMIC_DU=atomic_du, RP=rp,
                  LR_AHEAD=rp > 0 and _lowrank_ahead(plan),
                  FAST_EXP=_fast_exp(), POS_LAST=_pos_last(plan, flags), SCATTER=_scatter(plan),
                  UNROLL=_unroll_rows(plan), SIG_FROM_DELTA=_sigmoid_from_delta(plan, flags),
                  STAGES=_loop_stages(plan),
                  CARRY_IN_TILE=_carry_in_tile(plan),
                  # computed positions measured slower in the N <= 2 backward (see _positions)
                  **dict(_kernel_flags(flags), AFFINE=flags["AFFINE"] and _unroll_rows(plan),
                         LINES=flags["LINES"] and _unroll_rows(plan)))
    rows = dims.batch * plan.nseg
    dA = torch.empty(rows, dims.slots * dims.channels, dims.n_state, **f32)
    dD = torch.empty(rows, dims.slots * dims.channels, **f32)
    dbias = torch.empty(rows, dims.slots * dims.channels, **f32)
    grads = (*g, states, *du, *ddt, dz if dz is not None else ph, *dB, *dC, dA, dD, dbias)
    if plan.nseg == 1:
        q = sdl = ph
    elif q is None:   # not summed by the states pass
        # the dh-carry pass writes each later segment's carry and ΣΔ (segments 1..nseg-1, the only ones read)
        sdl = torch.empty(dims.batch, dims.slots, plan.nseg, dims.channels, **f32)
        q = torch.empty(*sdl.shape, plan.np, **f32)
        # segment 0's carry is never used: segments 1..nseg-1
        _scan_bwd_kernel[plan.grid(dims.slots, dims.batch, plan.nseg - 1)](
            *prefix, *grads, q, sdl, *dims.scalars(plan, with_rank=False), 1, DH_ONLY=True, SEG_CARRY=False, **common)
    _scan_bwd_kernel[plan.grid(dims.slots, dims.batch)](
        *prefix, *grads, q, sdl, *dims.scalars(plan, with_rank=False), 0, DH_ONLY=False, SEG_CARRY=plan.nseg > 1,
        **common)
    return dA.sum(0), dD.sum(0), dbias.sum(0)
