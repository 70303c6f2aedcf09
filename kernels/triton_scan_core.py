"""Triton kernels shared by the selective scan and the fused SS2D core (forward and backward).

One forward and one backward kernel serve both ops; constexpr flags pick the variant:

* plain selective scan: u (b, Dm, L), Δ read directly, B/C (b, G, N, L), out stored (each element written once).
* fused SS2D: x (b, D, H*W) read through the route's gather map ``idx[k, l]`` (no direction copies), Δ built on the
  fly as ``dt_weight[k] @ dt_low[b, k, :, idx[k, l]]``, and y_k scattered back through the same map with fp32 atomics
  into one merged (b, D, H*W) buffer. Scattering through the gather map *is* the inverse map, so any permutation
  route works with no route-specific code.

A program owns (batch b, "slot" k, a block of BD channels) and walks L in chunks of BL positions. The recurrence
``h_l = a_l h_{l-1} + b_l`` inside a chunk is an associative scan over (a, b) pairs on a [BL, NP, BD] fp32 tile
(scanned axis first, so Triton keeps each thread's positions in registers and the scan needs no lane shuffles);
the state is carried between chunks in registers. Slot k is the group (plain scan) or the direction (SS2D); the
parameter channel is ``k * DK + d`` in both cases.

Backward recomputes everything from the inputs: a forward pass stores only the chunk-start states (fp32,
N/BL of the size of u), then a reverse pass rebuilds each chunk's states from its start state and runs the
reverse recurrence ``dh_l = C_l g_l + a_{l+1} dh_{l+1}``. Reductions over channels (dB, dC, dΔ-low, merged dx)
are reduced over the program's BD channels first, then added with atomics; per-channel parameter gradients
(dA, dD, dδ_bias, dW) are per-batch partials summed on the host side.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl


@triton.jit
def _combine(a1, b1, a2, b2):
    # (a1, b1) is the earlier step in scan order: h = a2 * (a1 * h0 + b1) + b2.
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _softplus(x):
    # max(x, 0) + log1p(exp(-|x|)); log1p via Goldberg's correction (no libdevice needed, exact for tiny t).
    t = tl.exp(-tl.abs(x))
    w = 1.0 + t
    lg = tl.where(w == 1.0, t, tl.log(w) * t / (w - 1.0))
    return tl.maximum(x, 0.0) + lg


@triton.jit
def _positions(idx_base, l, lmask, GATHER: tl.constexpr):
    if GATHER:
        return tl.load(idx_base + l, mask=lmask, other=0)
    return l


@triton.jit
def _delta_pre(dt_base, w_base, d, dmask, pos, lmask, s_td, s_tl, s_wd, R, bias,
               LOWRANK: tl.constexpr, BD: tl.constexpr, BL: tl.constexpr):
    """Δ + δ_bias before softplus, [BD, BL] fp32. Low-rank: sum_r W[d, r] * low[r, pos]."""
    if LOWRANK:
        acc = tl.zeros([BD, BL], dtype=tl.float32)
        for r in range(R):
            w = tl.load(w_base + d * s_wd + r, mask=dmask, other=0.0).to(tl.float32)
            lo = tl.load(dt_base + r * s_td + pos * s_tl, mask=lmask, other=0.0).to(tl.float32)
            acc += w[:, None] * lo[None, :]
    else:
        acc = tl.load(dt_base + d[:, None] * s_td + pos[None, :] * s_tl,
                      mask=dmask[:, None] & lmask[None, :], other=0.0).to(tl.float32)
    return acc + bias[:, None]


@triton.jit
def _delta_pre_t(dt_base, w_base, d, dmask, pos, lmask, s_td, s_tl, s_wd, R, bias,
                 LOWRANK: tl.constexpr, BD: tl.constexpr, BL: tl.constexpr):
    """``_delta_pre`` transposed: [BL, BD]."""
    if LOWRANK:
        acc = tl.zeros([BL, BD], dtype=tl.float32)
        for r in range(R):
            w = tl.load(w_base + d * s_wd + r, mask=dmask, other=0.0).to(tl.float32)
            lo = tl.load(dt_base + r * s_td + pos * s_tl, mask=lmask, other=0.0).to(tl.float32)
            acc += lo[:, None] * w[None, :]
    else:
        acc = tl.load(dt_base + pos[:, None] * s_tl + d[None, :] * s_td,
                      mask=lmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    return acc + bias[None, :]


@triton.jit
def _delta(pre, mask, SOFTPLUS: tl.constexpr):
    dl = _softplus(pre) if SOFTPLUS else pre
    # Δ = 0 outside the valid range gives a = 1, b = 0: padded steps carry the state through unchanged.
    return tl.where(mask, dl, 0.0)


@triton.jit
def _scan_fwd_kernel(
    u_ptr, s_ub, s_uk, s_ud, s_ul,
    dt_ptr, s_tb, s_tk, s_td, s_tl,
    w_ptr, s_wk, s_wd,
    bias_ptr, A_ptr, Dp_ptr,
    B_ptr, s_Bb, s_Bk, s_Bn, s_Bl,
    C_ptr, s_Cb, s_Ck, s_Cn, s_Cl,
    z_ptr, s_zb, s_zk, s_zd, s_zl,
    idx_ptr, s_ik, kmap_ptr,
    out_ptr, s_ob, s_ok, s_od, s_ol,
    state_ptr, last_ptr,
    K, DK, L, N, R, NCHUNK,
    BD: tl.constexpr, NP: tl.constexpr, BL: tl.constexpr,
    GATHER: tl.constexpr, KMAP: tl.constexpr, LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, ATOMIC_OUT: tl.constexpr, WRITE_OUT: tl.constexpr,
    STORE_STATES: tl.constexpr, WRITE_LAST: tl.constexpr,
):
    pid_d = tl.program_id(0)
    k = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # batch offsets can pass 2**31 elements at 2048² inputs
    d = pid_d * BD + tl.arange(0, BD)
    n = tl.arange(0, NP)
    j = tl.arange(0, BL)
    dmask = d < DK
    nmask = n < N
    ch = k * DK + d

    # KMAP: slot of the channel-major tensors (u, out) is kmap[k], e.g. the transposed copy for column routes
    ku = tl.load(kmap_ptr + k) if KMAP else k
    u_base = u_ptr + b * s_ub + ku * s_uk
    dt_base = dt_ptr + b * s_tb + k * s_tk
    w_base = w_ptr + k * s_wk
    B_base = B_ptr + b * s_Bb + k * s_Bk
    C_base = C_ptr + b * s_Cb + k * s_Ck
    z_base = z_ptr + b * s_zb + k * s_zk
    o_base = out_ptr + b * s_ob + ku * s_ok
    idx_base = idx_ptr + k * s_ik

    # tiles are [BL, NP, BD]: the scanned axis first, channels last. Positions are gathered (contiguity
    # unknown), so the default layout puts lanes on channels then states: the scan over axis 0 stays inside each
    # thread and the sum over states needs few shuffles (the cross-lane scan's shuffles were the main cost)
    A = tl.load(A_ptr + ch[None, :] * N + n[:, None], mask=nmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + ch, mask=dmask, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BD], dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(Dp_ptr + ch, mask=dmask, other=0.0).to(tl.float32)
    st_base = state_ptr + ((b * K + k) * DK + d[None, :]) * (NCHUNK * NP) + n[:, None]

    h = tl.zeros([NP, BD], dtype=tl.float32)
    for c in range(NCHUNK):
        if STORE_STATES:
            tl.store(st_base + c * NP, h, mask=dmask[None, :])
        l = c * BL + j
        lmask = l < L
        pos = _positions(idx_base, l, lmask, GATHER)
        m2 = lmask[:, None] & dmask[None, :]
        u = tl.load(u_base + pos[:, None] * s_ul + d[None, :] * s_ud, mask=m2, other=0.0).to(tl.float32)
        pre = _delta_pre_t(dt_base, w_base, d, dmask, pos, lmask, s_td, s_tl, s_wd, R, bias, LOWRANK, BD, BL)
        dl = _delta(pre, m2, SOFTPLUS)
        nl = lmask[:, None] & nmask[None, :]
        Bt = tl.load(B_base + pos[:, None] * s_Bl + n[None, :] * s_Bn, mask=nl, other=0.0).to(tl.float32)
        a = tl.exp(dl[:, None, :] * A[None, :, :])
        bx = (dl * u)[:, None, :] * Bt[:, :, None]
        P, Hs = tl.associative_scan((a, bx), 0, _combine)
        hs = P * h[None, :, :] + Hs
        # state after the chunk = its last row (padded steps kept it unchanged)
        h = tl.sum(tl.where((j == BL - 1)[:, None, None], hs, 0.0), axis=0)
        if WRITE_OUT:
            Ct = tl.load(C_base + pos[:, None] * s_Cl + n[None, :] * s_Cn, mask=nl, other=0.0).to(tl.float32)
            y = tl.sum(hs * Ct[:, :, None], axis=1)
            if HAS_D:
                y += Dv[None, :] * u
            if HAS_Z:
                zt = tl.load(z_base + pos[:, None] * s_zl + d[None, :] * s_zd, mask=m2, other=0.0).to(tl.float32)
                y = y * zt / (1.0 + tl.exp(-zt))
            optr = o_base + pos[:, None] * s_ol + d[None, :] * s_od
            if ATOMIC_OUT:
                tl.atomic_add(optr, y, mask=m2, sem="relaxed")
            else:
                tl.store(optr, y.to(out_ptr.dtype.element_ty), mask=m2)
    if WRITE_LAST:
        tl.store(last_ptr + (b * K * DK + ch[None, :]) * N + n[:, None], h, mask=nmask[:, None] & dmask[None, :])


@triton.jit
def _scan_bwd_kernel(
    u_ptr, s_ub, s_uk, s_ud, s_ul,
    dt_ptr, s_tb, s_tk, s_td, s_tl,
    w_ptr, s_wk, s_wd,
    bias_ptr, A_ptr, Dp_ptr,
    B_ptr, s_Bb, s_Bk, s_Bn, s_Bl,
    C_ptr, s_Cb, s_Ck, s_Cn, s_Cl,
    z_ptr, s_zb, s_zk, s_zd, s_zl,
    idx_ptr, s_ik, kmap_ptr,
    g_ptr, s_gb, s_gk, s_gd, s_gl,
    state_ptr,
    du_ptr, s_dub, s_duk, s_dud, s_dul,      # du (store) or merged dx (atomic)
    ddt_ptr, s_ddb, s_ddk, s_ddd, s_ddl,     # dΔ (store) or d dt_low (atomic, d-stride = r-stride)
    dz_ptr,                                  # same strides as z
    dB_ptr, s_dBb, s_dBk, s_dBn, s_dBl,      # fp32: atomic, or (BC_PARTIAL) one slice per channel block
    dC_ptr, s_dCb, s_dCk, s_dCn, s_dCl,
    s_blk,                                   # stride between the channel blocks' dB/dC slices (BC_PARTIAL)
    dA_ptr, dD_ptr, dbias_ptr, dW_ptr,       # per-batch partials: (b, K*DK, N), (b, K*DK), (b, K*DK), (b, K*DK, R)
    K, DK, L, N, R, NCHUNK,
    BD: tl.constexpr, NP: tl.constexpr, BL: tl.constexpr, RP: tl.constexpr,
    GATHER: tl.constexpr, KMAP: tl.constexpr, LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, ATOMIC_DU: tl.constexpr,
    DDT_STORE: tl.constexpr, BC_PARTIAL: tl.constexpr, SHIFT_A: tl.constexpr,
):
    pid_d = tl.program_id(0)
    k = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    d = pid_d * BD + tl.arange(0, BD)
    n = tl.arange(0, NP)
    j = tl.arange(0, BL)
    dmask = d < DK
    nmask = n < N
    ch = k * DK + d

    ku = tl.load(kmap_ptr + k) if KMAP else k
    u_base = u_ptr + b * s_ub + ku * s_uk
    dt_base = dt_ptr + b * s_tb + k * s_tk
    w_base = w_ptr + k * s_wk
    B_base = B_ptr + b * s_Bb + k * s_Bk
    C_base = C_ptr + b * s_Cb + k * s_Ck
    z_base = z_ptr + b * s_zb + k * s_zk
    dz_base = dz_ptr + b * s_zb + k * s_zk
    g_base = g_ptr + b * s_gb + ku * s_gk
    du_base = du_ptr + b * s_dub + ku * s_duk
    ddt_base = ddt_ptr + b * s_ddb + k * s_ddk
    dB_base = dB_ptr + b * s_dBb + k * s_dBk
    dC_base = dC_ptr + b * s_dCb + k * s_dCk
    if BC_PARTIAL:
        # each channel block writes its own slice (plain stores, summed on the host): no atomics, deterministic
        dB_base += pid_d * s_blk
        dC_base += pid_d * s_blk
    idx_base = idx_ptr + k * s_ik

    # tiles [BL, NP, BD] as in the forward kernel: scans stay inside threads, lanes run over channels/states
    An = nmask[:, None] & dmask[None, :]
    A = tl.load(A_ptr + ch[None, :] * N + n[:, None], mask=An, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + ch, mask=dmask, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BD], dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(Dp_ptr + ch, mask=dmask, other=0.0).to(tl.float32)
    else:
        Dv = tl.zeros([BD], dtype=tl.float32)
    st_base = state_ptr + ((b * K + k) * DK + d[None, :]) * (NCHUNK * NP) + n[:, None]

    dh_next = tl.zeros([NP, BD], dtype=tl.float32)   # dh at the first position of the chunk after this one
    a_next = tl.full([NP, BD], 1.0, dtype=tl.float32)  # a at that position (any finite value past the end)
    dA_acc = tl.zeros([NP, BD], dtype=tl.float32)
    dD_acc = tl.zeros([BD], dtype=tl.float32)
    dbias_acc = tl.zeros([BD], dtype=tl.float32)
    if LOWRANK and not DDT_STORE:
        rr = tl.arange(0, RP)
        dW_acc = tl.zeros([RP, BD], dtype=tl.float32)
    for ci in range(NCHUNK):
        c = NCHUNK - 1 - ci
        l = c * BL + j
        lmask = l < L
        pos = _positions(idx_base, l, lmask, GATHER)
        m2 = lmask[:, None] & dmask[None, :]
        nl = lmask[:, None] & nmask[None, :]
        u = tl.load(u_base + pos[:, None] * s_ul + d[None, :] * s_ud, mask=m2, other=0.0).to(tl.float32)
        pre = _delta_pre_t(dt_base, w_base, d, dmask, pos, lmask, s_td, s_tl, s_wd, R, bias, LOWRANK, BD, BL)
        dl = _delta(pre, m2, SOFTPLUS)
        Bt = tl.load(B_base + pos[:, None] * s_Bl + n[None, :] * s_Bn, mask=nl, other=0.0).to(tl.float32)
        Ct = tl.load(C_base + pos[:, None] * s_Cl + n[None, :] * s_Cn, mask=nl, other=0.0).to(tl.float32)
        # states of this chunk, rebuilt from its stored start state
        a = tl.exp(dl[:, None, :] * A[None, :, :])
        dlu = dl * u
        bx = dlu[:, None, :] * Bt[:, :, None]
        P, Hs = tl.associative_scan((a, bx), 0, _combine)
        h0 = tl.load(st_base + c * NP, mask=dmask[None, :], other=0.0)
        hs = P * h0[None, :, :] + Hs

        g = tl.load(g_base + pos[:, None] * s_gl + d[None, :] * s_gd, mask=m2, other=0.0).to(tl.float32)
        if HAS_Z:
            y = tl.sum(hs * Ct[:, :, None], axis=1) + Dv[None, :] * u
            zoff = pos[:, None] * s_zl + d[None, :] * s_zd
            zt = tl.load(z_base + zoff, mask=m2, other=0.0).to(tl.float32)
            sig = 1.0 / (1.0 + tl.exp(-zt))
            dz = g * y * sig * (1.0 + zt * (1.0 - sig))
            tl.store(dz_base + zoff, dz.to(dz_ptr.dtype.element_ty), mask=m2)
            g = g * zt * sig

        # a_{l+1}: a shifted by one row. SHIFT_A: rows taken from this chunk's a (in-thread selects, the scanned
        # axis lives in each thread's registers) and the next chunk's first row; else Δ recomputed at l+1.
        if SHIFT_A:
            a1 = tl.where((j == BL - 1)[:, None, None], a_next[None, :, :], 0.0)
            for i in tl.static_range(BL - 1):
                row = tl.sum(tl.where((j == i + 1)[:, None, None], a, 0.0), axis=0)
                a1 = tl.where((j == i)[:, None, None], row[None, :, :], a1)
            a_next = tl.sum(tl.where((j == 0)[:, None, None], a, 0.0), axis=0)
        else:
            l1 = l + 1
            l1mask = l1 < L
            pos1 = _positions(idx_base, l1, l1mask, GATHER)
            m21 = l1mask[:, None] & dmask[None, :]
            pre1 = _delta_pre_t(dt_base, w_base, d, dmask, pos1, l1mask, s_td, s_tl, s_wd, R, bias, LOWRANK, BD,
                                BL)
            a1 = tl.exp(_delta(pre1, m21, SOFTPLUS)[:, None, :] * A[None, :, :])
        cg = Ct[:, :, None] * g[:, None, :]
        Q, S = tl.associative_scan((a1, cg), 0, _combine, reverse=True)
        dh = Q * dh_next[None, :, :] + S
        dh_next = tl.sum(tl.where((j == 0)[:, None, None], dh, 0.0), axis=0)

        # dC = sum_d g h, dB = sum_d Δ u dh: reduced over this program's channels, then atomics
        dCp = tl.sum(hs * g[:, None, :], axis=2)
        dBp = tl.sum(dh * dlu[:, None, :], axis=2)
        dC_ptrs = dC_base + pos[:, None] * s_dCl + n[None, :] * s_dCn
        dB_ptrs = dB_base + pos[:, None] * s_dBl + n[None, :] * s_dBn
        if BC_PARTIAL:
            tl.store(dC_ptrs, dCp, mask=nl)
            tl.store(dB_ptrs, dBp, mask=nl)
        else:
            tl.atomic_add(dC_ptrs, dCp, mask=nl, sem="relaxed")
            tl.atomic_add(dB_ptrs, dBp, mask=nl, sem="relaxed")

        dhB = tl.sum(dh * Bt[:, :, None], axis=1)
        du = dl * dhB + Dv[None, :] * g
        du_ptrs = du_base + pos[:, None] * s_dul + d[None, :] * s_dud
        if ATOMIC_DU:
            tl.atomic_add(du_ptrs, du, mask=m2, sem="relaxed")
        else:
            tl.store(du_ptrs, du.to(du_ptr.dtype.element_ty), mask=m2)
        # a_l h_{l-1} = h_l - b_l: the gradient w.r.t. Δ·A needs no shifted state
        t = dh * (hs - bx)
        ddl = u * dhB + tl.sum(t * A[None, :, :], axis=1)
        dA_acc += tl.sum(t * dl[:, None, :], axis=0)
        if SOFTPLUS:
            ddl = ddl / (1.0 + tl.exp(-pre))
        ddl = tl.where(m2, ddl, 0.0)
        dbias_acc += tl.sum(ddl, axis=0)
        dD_acc += tl.sum(g * u, axis=0)
        if LOWRANK and not DDT_STORE:
            for r in range(R):
                w = tl.load(w_base + d * s_wd + r, mask=dmask, other=0.0).to(tl.float32)
                lo = tl.load(dt_base + r * s_td + pos * s_tl, mask=lmask, other=0.0).to(tl.float32)
                dlo = tl.sum(w[None, :] * ddl, axis=1)
                tl.atomic_add(ddt_base + r * s_ddd + pos * s_ddl, dlo, mask=lmask, sem="relaxed")
                dw = tl.sum(ddl * lo[:, None], axis=0)
                dW_acc += tl.where(rr[:, None] == r, dw[None, :], 0.0)
        else:
            tl.store(ddt_base + pos[:, None] * s_ddl + d[None, :] * s_ddd, ddl.to(ddt_ptr.dtype.element_ty),
                     mask=m2)

    prow = b * K * DK + ch
    tl.store(dA_ptr + prow[None, :] * N + n[:, None], dA_acc, mask=An)
    tl.store(dD_ptr + prow, dD_acc, mask=dmask)
    tl.store(dbias_ptr + prow, dbias_acc, mask=dmask)
    if LOWRANK and not DDT_STORE:
        tl.store(dW_ptr + prow[None, :] * R + rr[:, None], dW_acc, mask=(rr < R)[:, None] & dmask[None, :])


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


# Benchmarks may set this to {"fwd": (BD, BL, warps), "bwd": (BD, BL, warps)} to sweep tiles.
TILE_OVERRIDE: dict | None = None

# Backward variants (benchmarks sweep them):
#   ddt_store: the fused SS2D backward stores dΔ (b, K, D, L) and does d dt_low / d dt_weight as matmuls on the
#              host, instead of R atomics per position and channel block inside the kernel.
#   bc_partial_blocks: dB/dC as per-channel-block slices summed on the host (no atomics) when the grid has at
#              most this many channel blocks and the slices fit in bc_partial_bytes; atomics otherwise.
#   shift_a:   a_{l+1} from registers instead of recomputing Δ and exp at l+1.
BWD_OPTS = {"ddt_store": True, "bc_partial_blocks": 0, "bc_partial_bytes": 1 << 30, "shift_a": True}


def bc_partial(nblk: int, slice_bytes: int) -> bool:
    return nblk <= BWD_OPTS["bc_partial_blocks"] and 2 * nblk * slice_bytes <= BWD_OPTS["bc_partial_bytes"]


def tile_config(n_state: int, length: int, channels: int, backward: bool, rows: int = 1 << 20
                ) -> tuple[int, int, int, int]:
    """(BD, NP, BL, num_warps); rows = batch * slots. Larger BD shares B/C loads and dB/dC atomics over more
    channels; the chunk-start states of the backward depend only on BL, which never depends on rows."""
    np_ = next_pow2(n_state)
    key = "bwd" if backward else "fwd"
    if TILE_OVERRIDE and key in TILE_OVERRIDE:
        bd, bl, warps = TILE_OVERRIDE[key]
    elif os.environ.get("TRITON_INTERPRET") == "1":
        # the CPU interpreter pays per op and per program, not per element: few large tiles (still several
        # chunks and masked rows on the tiny test shapes, so the chunk carry and masks are exercised)
        return max(1, min(16, next_pow2(channels))), np_, max(1, min(16, next_pow2(length))), 4
    elif np_ <= 2:
        # measured on H200 (BENCHMARKS.md, fused SS2D stage-1 256² b32, N=1): best fwd and fwd+bwd
        bd, bl, warps = 4, 64, 1
    else:
        # N=16 measured best (one warp, no cross-warp barriers): fwd BD=16, BL=8; bwd BD=8, BL=4 (its dB/dC/dΔ
        # reductions over channels cross lanes, so fewer channels per program pay off there)
        bd, bl = (8, 4) if backward else (16, 8)
        bd = max(1, bd * 16 // np_)
        warps = 1
    bd = max(1, min(bd, next_pow2(channels)))
    # few rows (small batch, long L): smaller channel blocks so that the grid still fills the GPU
    while bd > 1 and rows * -(-channels // bd) < 1024:
        bd //= 2
    bl = max(1, min(bl, next_pow2(length)))
    return bd, np_, bl, warps
