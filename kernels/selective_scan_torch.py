"""Selective scan in pure PyTorch: the CPU path and the reference the Triton kernels are tested against.

For channel d, state n, position l (GUIDE §2)::

    delta = softplus(delta + delta_bias)          (if delta_softplus)
    h_l   = exp(delta_l * A[d, n]) * h_{l-1} + delta_l * B_l[n] * u_l
    y_l   = sum_n C_l[n] * h_l[n] + D[d] * u_l
    out   = y * silu(z)                            (if z is given)

Formulation: the sequence is cut into chunks whose state tensor (batch, D, N, T) fits a memory budget; chunks run
in order and carry the state. Inside a chunk the linear recurrence ``h_t = a_t h_{t-1} + b_t`` is solved in two
levels (blocks of ~sqrt(T): a step loop vectorised over all blocks, then a carry loop over the blocks), which is
O(T) work and ~2*sqrt(T) PyTorch calls, uses only products of decays in (0, 1] and never divides, so it stays
exact in fp32 for any length. The backward is the analytic one (a reverse recurrence of the same form): it keeps
only the chunk-boundary states and recomputes each chunk's states, so saved memory is O(batch*D*N*L/T).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Elements of one (batch, D, N, T) chunk tensor; a handful of them are alive at once. 2M (8 MB in fp32) measured
# fastest on 2 CPU cores at the stage-1 shape (fwd 1.3 s -> 1.0 s, bwd 5.4 s -> 2.9 s vs 8M): small enough that a
# chunk's tensors stay in cache between the elementwise passes, large enough to amortise per-op overhead.
_CHUNK_ELEMENTS = 1 << 21


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _step_layout(x: torch.Tensor, block: int) -> torch.Tensor:
    """(..., T) -> (block, ..., n_blocks), zero-padded: position c*block + j lands at [j, ..., c]."""
    length = x.shape[-1]
    n_blocks = -(-length // block)
    if n_blocks * block != length:
        x = F.pad(x, (0, n_blocks * block - length))
    return x.reshape(*x.shape[:-1], n_blocks, block).movedim(-1, 0).contiguous()


def _natural_layout(x: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of ``_step_layout``."""
    x = x.movedim(0, -1)
    return x.reshape(*x.shape[:-2], -1)[..., :length]


def _block_size(length: int) -> int:
    return max(1, math.isqrt(length))


def linear_recurrence_steps(a: torch.Tensor, b: torch.Tensor, decay: torch.Tensor,
                            h0: torch.Tensor | None) -> torch.Tensor:
    """Solve ``h_p = a_p h_{p-1} + b_p`` for tensors in step layout (block, *lead, n_blocks).

    ``decay`` holds the product of ``a`` from the start of each block up to and including the step. The block-local
    solution runs as a loop over steps vectorised over all blocks; the carries between blocks are a loop over small
    (*lead) tensors; one broadcast multiply-add then adds each block's incoming state. ``b`` is overwritten.
    """
    h = b
    for j in range(1, h.shape[0]):
        h[j].addcmul_(a[j], h[j - 1])  # in place, not out=: exported graphs must stay differentiable
    lead, n_blocks = h.shape[1:-1], h.shape[-1]
    carry_in = torch.empty((*lead, n_blocks), dtype=h.dtype, device=h.device)
    carry = h0 if h0 is not None else torch.zeros(lead, dtype=h.dtype, device=h.device)
    for c in range(n_blocks):
        carry_in[..., c] = carry
        carry = torch.addcmul(h[-1, ..., c], decay[-1, ..., c], carry)
    h.addcmul_(decay, carry_in.unsqueeze(0))
    return h


def linear_recurrence(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """Solve ``h_t = a_t * h_{t-1} + b_t`` along the last dim, with ``h_{-1} = h0`` (zeros if None)."""
    length = a.shape[-1]
    block = _block_size(length)
    a_s = _step_layout(a, block)
    if a_s.shape[0] * a_s.shape[-1] != length:  # padded steps must keep the state: a = 1
        a_s = _step_layout(F.pad(a, (0, a_s.shape[0] * a_s.shape[-1] - length), value=1.0), block)
    decay = torch.cumprod(a_s, dim=0)
    return _natural_layout(linear_recurrence_steps(a_s, _step_layout(b, block), decay, h0), length)


def _prepare(u, delta, A, B, C, D, z, delta_bias):
    """Validate and reshape to the grouped form: u/delta (b, G, Dg, L), B/C (b, G, N, L), A (G, Dg, N)."""
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        if not torch.is_floating_point(t):
            raise ValueError(f"selective_scan: {name} must be a floating tensor, got {t.dtype}")
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, D, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta shape {tuple(delta.shape)} != u shape {tuple(u.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must be (D={dim}, N), got {tuple(A.shape)}")
    n_state = A.shape[1]
    if B.dim() == 3:
        B = B.unsqueeze(1)
    if C.dim() == 3:
        C = C.unsqueeze(1)
    groups = B.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.dim() != 4 or t.shape[0] != batch or t.shape[2] != n_state or t.shape[3] != length:
            raise ValueError(
                f"selective_scan: {name} must be (batch, N, L) or (batch, G, N, L) with batch={batch}, "
                f"N={n_state}, L={length}; got {tuple(t.shape)}")
    if C.shape[1] != groups or dim % groups:
        raise ValueError(f"selective_scan: {groups} groups in B, {C.shape[1]} in C, for D={dim}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z shape {tuple(z.shape)} != u shape {tuple(u.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (dim,):
            raise ValueError(f"selective_scan: {name} must be ({dim},), got {tuple(t.shape)}")
    return batch, dim, length, n_state, groups


def _chunk_length(batch: int, dim: int, n_state: int, length: int) -> int:
    return max(1, min(length, _CHUNK_ELEMENTS // max(1, batch * dim * n_state)))


class _Scan:
    """Per-call views in the compute dtype, shared by forward and backward.

    Chunk tensors use the step layout of ``_step_layout``: small ones (block, b, G, Dg|N, n_blocks), state-sized
    ones (block, b, G, Dg, N, n_blocks). Only the small tensors are ever transposed.
    """

    def __init__(self, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        batch, dim, length, n_state, groups = u.shape[0], u.shape[1], u.shape[2], A.shape[1], B.shape[1]
        dt = _compute_dtype(u)
        g, dg = groups, dim // groups
        self.shape = (batch, g, dg, n_state, length)
        self.u = u.to(dt).view(batch, g, dg, length)
        self.delta_raw = delta.to(dt).view(batch, g, dg, length)
        self.A = A.to(dt).view(g, dg, n_state)
        self.A6 = self.A.view(1, 1, g, dg, n_state, 1)
        self.B = B.to(dt)
        self.C = C.to(dt)
        self.D = None if D is None else D.to(dt).view(g, dg)
        self.z = None if z is None else z.to(dt).view(batch, g, dg, length)
        self.bias = None if delta_bias is None else delta_bias.to(dt).view(1, g, dg, 1)
        self.softplus = delta_softplus
        self.dtype = dt

    def delta_pre(self, s, e):
        d = self.delta_raw[..., s:e]
        return d + self.bias if self.bias is not None else d

    def delta(self, s, e):
        d = self.delta_pre(s, e)
        return F.softplus(d) if self.softplus else d

    def chunk(self, s, e, h0):
        """States of positions [s, e) from the state h0 before s. Returns (steps, h) with small step tensors."""
        block = _block_size(e - s)
        st = {
            "block": block,
            "delta": _step_layout(self.delta(s, e), block),
            "u": _step_layout(self.u[..., s:e], block),
            "B": _step_layout(self.B[..., s:e], block).unsqueeze(3),
            "C": _step_layout(self.C[..., s:e], block).unsqueeze(3),
        }
        a = torch.exp(st["delta"].unsqueeze(4) * self.A6)
        decay = torch.exp(torch.cumsum(st["delta"], dim=0).unsqueeze(4) * self.A6)
        b = (st["delta"] * st["u"]).unsqueeze(4) * st["B"]
        return st, linear_recurrence_steps(a, b, decay, h0)

    def readout(self, st, h):
        y = (h * st["C"]).sum(4)
        if self.D is not None:
            y = y + self.D.view(1, 1, *self.D.shape, 1) * st["u"]
        return y


def _forward(scan: _Scan, chunk: int):
    batch, groups, dg, n_state, length = scan.shape
    y = torch.empty(batch, groups, dg, length, dtype=scan.dtype, device=scan.u.device)
    h = torch.zeros(batch, groups, dg, n_state, dtype=scan.dtype, device=scan.u.device)
    boundaries = []
    for s in range(0, length, chunk):
        e = min(length, s + chunk)
        boundaries.append(h)
        st, hs = scan.chunk(s, e, h)
        y[..., s:e] = _natural_layout(scan.readout(st, hs), e - s)
        last = e - s - 1
        h = hs[last % st["block"], ..., last // st["block"]].clone()
    return y, h, boundaries


class SelectiveScanTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        grouped_b, grouped_c = B.dim() == 4, C.dim() == 4
        B4 = B if grouped_b else B.unsqueeze(1)
        C4 = C if grouped_c else C.unsqueeze(1)
        scan = _Scan(u, delta, A, B4, C4, D, z, delta_bias, delta_softplus)
        batch, groups, dg, n_state, length = scan.shape
        chunk = _chunk_length(batch, groups * dg, n_state, length)
        y, last, boundaries = _forward(scan, chunk)
        out = y if scan.z is None else y * F.silu(scan.z)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, *boundaries)
        ctx.meta = (delta_softplus, chunk, grouped_b, grouped_c)
        out = out.reshape(batch, groups * dg, length).to(u.dtype)
        last = last.reshape(batch, groups * dg, n_state).to(u.dtype)
        ctx.mark_non_differentiable(last)
        return out, last

    @staticmethod
    def backward(ctx, grad_out, grad_last):
        u, delta, A, B, C, D, z, delta_bias, *boundaries = ctx.saved_tensors
        delta_softplus, chunk, grouped_b, grouped_c = ctx.meta
        B4 = B if grouped_b else B.unsqueeze(1)
        C4 = C if grouped_c else C.unsqueeze(1)
        scan = _Scan(u, delta, A, B4, C4, D, z, delta_bias, delta_softplus)
        batch, groups, dg, n_state, length = scan.shape
        gout = grad_out.to(scan.dtype).reshape(batch, groups, dg, length)

        du = torch.empty_like(scan.u)
        ddelta = torch.empty_like(scan.u)
        dA = torch.zeros_like(scan.A)
        dB = torch.empty_like(scan.B)
        dC = torch.empty_like(scan.C)
        dD = None if scan.D is None else torch.zeros_like(scan.D)
        dz = None if scan.z is None else torch.empty_like(scan.z)
        # carry = a * dh at the first position of the chunk after this one
        carry = torch.zeros(batch, groups, dg, n_state, dtype=scan.dtype, device=u.device)
        starts = list(range(0, length, chunk))
        for i in reversed(range(len(starts))):
            s = starts[i]
            e = min(length, s + chunk)
            st, h = scan.chunk(s, e, boundaries[i])
            block = st["block"]
            g = gout[..., s:e]
            if scan.z is not None:
                zc = scan.z[..., s:e]
                sig = torch.sigmoid(zc)
                y = _natural_layout(scan.readout(st, h), e - s)
                dz[..., s:e] = g * y * sig * (1 + zc * (1 - sig))
                g = g * zc * sig
            g_st = _step_layout(g, block)
            # Reverse recurrence dh_p = C_p g_p + a_{p+1} dh_{p+1}. Flipping both step axes reverses the sequence;
            # padded steps (delta 0 -> a 1, input 0) then come first and pass the carry through unchanged.
            delta_next = F.pad(scan.delta(s, e)[..., 1:], (0, 1))
            dn_rev = _step_layout(delta_next, block).flip(0, -1)
            a_rev = torch.exp(dn_rev.unsqueeze(4) * scan.A6)
            decay_rev = torch.exp(torch.cumsum(dn_rev, dim=0).unsqueeze(4) * scan.A6)
            c_rev = (g_st.unsqueeze(4) * st["C"]).flip(0, -1)
            dh = linear_recurrence_steps(a_rev, c_rev, decay_rev, carry).flip(0, -1)
            del a_rev, decay_rev, c_rev
            delta_st, u_st = st["delta"], st["u"]
            carry = torch.exp(delta_st[0, ..., 0].unsqueeze(-1) * scan.A) * dh[0, ..., 0]
            # a_p * h_{p-1} = h_p - b_p: no shifted copy of h needed.
            dlog_a = dh * (h - (delta_st * u_st).unsqueeze(4) * st["B"])  # gradient w.r.t. delta * A
            dC[..., s:e] = _natural_layout((g_st.unsqueeze(4) * h).sum(3), e - s)
            del h
            dh_B = (dh * st["B"]).sum(4)
            du_st = dh_B * delta_st
            ddelta_st = dh_B * u_st + (dlog_a * scan.A6).sum(4)
            dA += (dlog_a * delta_st.unsqueeze(4)).sum((0, 1, 5))
            dB[..., s:e] = _natural_layout((dh * (delta_st * u_st).unsqueeze(4)).sum(3), e - s)
            du_c = _natural_layout(du_st, e - s)
            uc = scan.u[..., s:e]
            if scan.D is not None:
                du_c = du_c + scan.D[None, :, :, None] * g
                dD += torch.einsum("bgdt,bgdt->gd", g, uc)
            du[..., s:e] = du_c
            ddelta_c = _natural_layout(ddelta_st, e - s)
            if delta_softplus:
                ddelta_c = ddelta_c * torch.sigmoid(scan.delta_pre(s, e))
            ddelta[..., s:e] = ddelta_c

        dim = groups * dg
        dbias = None if delta_bias is None else ddelta.sum(dim=(0, 3)).reshape(dim).to(delta_bias.dtype)
        dB = dB.to(B.dtype) if grouped_b else dB.squeeze(1).to(B.dtype)
        dC = dC.to(C.dtype) if grouped_c else dC.squeeze(1).to(C.dtype)
        return (du.reshape(batch, dim, length).to(u.dtype), ddelta.reshape(batch, dim, length).to(delta.dtype),
                dA.reshape(dim, n_state).to(A.dtype), dB, dC,
                None if dD is None else dD.reshape(dim).to(D.dtype),
                None if dz is None else dz.reshape(batch, dim, length).to(z.dtype),
                dbias, None, None)


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False):
    """Pure-PyTorch selective scan with mamba's ``selective_scan_fn`` signature (see module docstring)."""
    _prepare(u, delta, A, B, C, D, z, delta_bias)
    out, last = SelectiveScanTorch.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    return (out, last) if return_last_state else out
