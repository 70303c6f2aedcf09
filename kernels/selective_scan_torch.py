"""Selective scan in pure PyTorch: the CPU path and the reference the Triton kernels are tested against.

For channel d, state n, position l (GUIDE §2)::

    delta = softplus(delta + delta_bias)          (if delta_softplus)
    h_l   = exp(delta_l * A[d, n]) * h_{l-1} + delta_l * B_l[n] * u_l
    y_l   = sum_n C_l[n] * h_l[n] + D[d] * u_l
    out   = y * silu(z)                            (if z is given)

Formulation: everything is held position-major, (L, batch, G, Dg[, N]), so one position's state (batch, G, Dg, N)
is a contiguous slice. The sequence is cut into chunks whose state tensor (T, batch, G, Dg, N) fits a memory
budget; per chunk the decays, the inputs and the readout are whole-chunk broadcast products (rows of N contiguous
elements), and the recurrence itself is one in-place multiply-add per position on the state slice, which stays in
cache. Exact sequential order, so fp32 stays exact for any length. The backward is the analytic one (a reverse
recurrence of the same form): it keeps only the chunk-boundary states and recomputes each chunk's states, so saved
memory is O(batch*D*N*L/T).

Measured on 2 CPU cores (BENCHMARKS.md, "Whole model on CPU"): at d_state 16, 2.6x (forward) and 3.5x (forward +
backward) faster than the two-level blocked solve this replaced, which read and wrote each state tensor about twice
as often.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Elements of one (T, batch, D, N) chunk tensor; two to four of them are alive at once. 1M (4 MB in fp32)
# measured best on 2 CPU cores at the VM-UNet stage shapes, forward and backward (2M: 7% / 27% slower, 4M slower
# still; 512K: more Python calls per element).
_CHUNK_ELEMENTS = 1 << 20
LOG2E = 1.0 / math.log(2.0)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _position_major(t: torch.Tensor, *shape: int) -> torch.Tensor:
    """(batch, ..., L) -> (L, batch, ...) contiguous, viewed as ``shape`` (batch, ..., L) first. Written as the
    transpose of a 2-D matrix, which PyTorch copies in cache blocks (2x faster on CPU than the same permute in 4-D)."""
    length = shape[-1]
    return t.reshape(-1, length).t().contiguous().view(length, *shape[:-1])


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
    """Per-call tensors in the compute dtype and position-major layout, shared by forward and backward:
    u, delta, z (L, b, G, Dg); B, C (L, b, G, 1, N), given as (b, G, N, L) or ungrouped (b, N, L); state tensors
    (T, b, G, Dg, N)."""

    def __init__(self, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        B, C = (t.unsqueeze(1) if t.dim() == 3 else t for t in (B, C))
        batch, dim, length, n_state, groups = u.shape[0], u.shape[1], u.shape[2], A.shape[1], B.shape[1]
        dt = _compute_dtype(u)
        g, dg = groups, dim // groups
        self.shape = (batch, g, dg, n_state, length)
        self.u = _position_major(u.to(dt), batch, g, dg, length)
        pre = delta.to(dt).view(batch, g, dg, length)
        if delta_bias is not None:
            pre = pre + delta_bias.to(dt).view(1, g, dg, 1)
        self.delta_pre = _position_major(pre, batch, g, dg, length)
        self.delta = F.softplus(self.delta_pre) if delta_softplus else self.delta_pre
        self.A = A.to(dt).view(g, dg, n_state)
        # decays as exp2(delta * A * log2 e): torch's exp2 is ~3x faster than exp on CPU (AVX-512, torch 2.15)
        self.A2 = self.A * LOG2E
        self.B = _position_major(B.to(dt), batch, g, n_state, length).unsqueeze(3)
        self.C = _position_major(C.to(dt), batch, g, n_state, length).unsqueeze(3)
        self.D = None if D is None else D.to(dt).view(g, dg)
        self.z = None if z is None else _position_major(z.to(dt), batch, g, dg, length)
        self.dtype = dt

    def states(self, s, e, h0):
        """Decays a = exp(delta A) and states h of positions [s, e), from the state h0 (b, G, Dg, N) before s."""
        delta = self.delta[s:e]
        a = (delta.unsqueeze(-1) * self.A2).exp2_()
        h = (delta * self.u[s:e]).unsqueeze(-1) * self.B[s:e]
        steps, decays = _positions(h), _positions(a)
        # one in-place multiply-add per position (in place, not out=: exported graphs must stay differentiable)
        prev = steps[0].addcmul_(decays[0], h0)
        for h_t, a_t in zip(steps[1:], decays[1:]):
            prev = h_t.addcmul_(a_t, prev)
        return a, h

    def readout(self, s, e, h, overwrite=False):
        """y (T, b, G, Dg) of positions [s, e) from their states (``overwrite``: h is not needed afterwards)."""
        y = (h.mul_(self.C[s:e]) if overwrite else h * self.C[s:e]).sum(-1)
        if self.D is not None:
            y = y + self.D * self.u[s:e]
        return y


def _positions(t: torch.Tensor) -> list[torch.Tensor] | tuple[torch.Tensor, ...]:
    """Per-position views of t, to be written in place. unbind makes them in one call (~30% less overhead per
    step than indexing), but autograd forbids in-place writes to its views, as when export inlines the scan into
    a graph that later runs with grad enabled; there, and whenever grad is on, one select per position."""
    # torch.compile never traces in here (selective_scan_torch is compiler-disabled); export does
    if torch.is_grad_enabled() or torch.compiler.is_exporting():
        return [t[i] for i in range(t.shape[0])]
    return t.unbind(0)


def _channel_major(t: torch.Tensor, batch: int, dim: int) -> torch.Tensor:
    """(L, b, G, Dg) -> (b, G*Dg, L) contiguous (a 2-D transpose, as in ``_position_major``)."""
    length = t.shape[0]
    return t.reshape(length, -1).t().contiguous().view(batch, dim, length)


def _forward(scan: _Scan, chunk: int):
    batch, groups, dg, n_state, length = scan.shape
    y = torch.empty(length, batch, groups, dg, dtype=scan.dtype, device=scan.u.device)
    h = torch.zeros(batch, groups, dg, n_state, dtype=scan.dtype, device=scan.u.device)
    boundaries = []
    for s in range(0, length, chunk):
        e = min(length, s + chunk)
        boundaries.append(h)
        _, hs = scan.states(s, e, h)
        h = hs[-1].clone()
        y[s:e] = scan.readout(s, e, hs, overwrite=True)
    return y, h, boundaries


class SelectiveScanTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        grouped_b, grouped_c = B.dim() == 4, C.dim() == 4
        scan = _Scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        batch, groups, dg, n_state, length = scan.shape
        chunk = _chunk_length(batch, groups * dg, n_state, length)
        y, last, boundaries = _forward(scan, chunk)
        out = y if scan.z is None else y * F.silu(scan.z)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, *boundaries)
        ctx.meta = (delta_softplus, chunk, grouped_b, grouped_c)
        out = _channel_major(out, batch, groups * dg).to(u.dtype)
        last = last.reshape(batch, groups * dg, n_state).to(u.dtype)
        ctx.mark_non_differentiable(last)
        return out, last

    @staticmethod
    def backward(ctx, grad_out, grad_last):
        u, delta, A, B, C, D, z, delta_bias, *boundaries = ctx.saved_tensors
        delta_softplus, chunk, grouped_b, grouped_c = ctx.meta
        scan = _Scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        batch, groups, dg, n_state, length = scan.shape
        gout = _position_major(grad_out.to(scan.dtype), batch, groups, dg, length)

        du = torch.empty_like(scan.u)
        ddelta = torch.empty_like(scan.u)
        dA = torch.zeros_like(scan.A)
        dB = torch.empty(length, batch, groups, n_state, dtype=scan.dtype, device=u.device)
        dC = torch.empty_like(dB)
        dz = None if scan.z is None else torch.empty_like(scan.z)
        dD = None if scan.D is None else torch.zeros_like(scan.D)
        # carry = a * dh at the first position of the chunk after this one
        carry = torch.zeros(batch, groups, dg, n_state, dtype=scan.dtype, device=u.device)
        starts = list(range(0, length, chunk))
        for i in reversed(range(len(starts))):
            s = starts[i]
            e = min(length, s + chunk)
            a, h = scan.states(s, e, boundaries[i])
            g = gout[s:e]
            if scan.z is not None:
                zc = scan.z[s:e]
                sig = torch.sigmoid(zc)
                dz[s:e] = g * scan.readout(s, e, h) * sig * (1 + zc * (1 - sig))
                g = g * zc * sig
            # reverse recurrence dh_t = C_t g_t + a_{t+1} dh_{t+1}, the chunk after this one entering as the carry
            dh = g.unsqueeze(-1) * scan.C[s:e]
            dh[-1] += carry
            for t in range(e - s - 2, -1, -1):
                dh[t].addcmul_(a[t + 1], dh[t + 1])
            carry = a[0] * dh[0]
            delta_c, u_c = scan.delta[s:e], scan.u[s:e]
            dlu = (delta_c * u_c).unsqueeze(-1)
            # sums over channels as batched (1 x Dg) @ (Dg x N) products: no state-sized temporary
            dC[s:e] = torch.matmul(g.unsqueeze(-2), h).squeeze(-2)
            dB[s:e] = torch.matmul(dlu.transpose(-1, -2), dh).squeeze(-2)
            dh_B = (dh * scan.B[s:e]).sum(-1)
            # gradient w.r.t. delta * A: dh_t a_t h_{t-1} = dh_t (h_t - b_t), in h's storage (h is not needed again)
            del a
            dlog_a = h.sub_(dlu * scan.B[s:e]).mul_(dh)
            del h
            du_c = dh_B * delta_c
            if scan.D is not None:
                du_c = du_c + scan.D * g
                dD += (g * u_c).sum((0, 1))
            du[s:e] = du_c
            ddelta_c = dh_B * u_c + (dlog_a * scan.A).sum(-1)
            if delta_softplus:
                ddelta_c = ddelta_c * torch.sigmoid(scan.delta_pre[s:e])
            ddelta[s:e] = ddelta_c
            dA += (dlog_a * delta_c.unsqueeze(-1)).sum((0, 1))

        dim = groups * dg
        dbias = None if delta_bias is None else ddelta.sum(dim=(0, 1)).reshape(dim).to(delta_bias.dtype)
        dB = dB.movedim(0, -1).to(B.dtype)
        dC = dC.movedim(0, -1).to(C.dtype)
        return (_channel_major(du, batch, dim).to(u.dtype), _channel_major(ddelta, batch, dim).to(delta.dtype),
                dA.reshape(dim, n_state).to(A.dtype), dB if grouped_b else dB.squeeze(1),
                dC if grouped_c else dC.squeeze(1), None if dD is None else dD.reshape(dim).to(D.dtype),
                None if dz is None else _channel_major(dz, batch, dim).to(z.dtype),
                dbias, None, None)


# torch.compile runs the scan as it is, outside the graph: tracing would unroll the per-position loop (L steps a
# chunk; 5 minutes to compile a tiny model at 128² on 2 cores), and inductor has nothing to fuse in it
@torch.compiler.disable
def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False):
    """Pure-PyTorch selective scan with mamba's ``selective_scan_fn`` signature (see module docstring)."""
    _prepare(u, delta, A, B, C, D, z, delta_bias)
    out, last = SelectiveScanTorch.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    return (out, last) if return_last_state else out
