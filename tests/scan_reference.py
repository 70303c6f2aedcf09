"""A per-token loop selective scan: slow, obviously correct, used only as ground truth in tests."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_scan_loop(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                        return_last_state=False):
    batch, dim, length = u.shape
    if B.dim() == 3:
        B = B.unsqueeze(1)
    if C.dim() == 3:
        C = C.unsqueeze(1)
    groups = B.shape[1]
    B = B.repeat_interleave(dim // groups, 1)
    C = C.repeat_interleave(dim // groups, 1)
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, :, :, t]
        y = (h * C[:, :, :, t]).sum(-1)
        if D is not None:
            y = y + D * u[:, :, t]
        ys.append(y)
    out = torch.stack(ys, dim=-1)
    if z is not None:
        out = out * F.silu(z)
    return (out, h) if return_last_state else out


def random_scan_inputs(batch, dim, length, n_state, groups=None, with_z=True, with_D=True, with_bias=True,
                       dtype=torch.float64, device="cpu", seed=0):
    """Inputs in the ranges VMamba uses (delta around softplus^-1 of 1e-3..1e-1 plus noise, A = -(1..N)-ish)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype=dtype, device=device)

    bc_shape = (batch, n_state, length) if groups is None else (batch, groups, n_state, length)
    inputs = {
        "u": rnd(batch, dim, length),
        "delta": rnd(batch, dim, length, scale=0.5),
        "A": (-torch.rand(dim, n_state, generator=g, dtype=torch.float64) * 4 - 0.1).to(dtype=dtype, device=device),
        "B": rnd(*bc_shape),
        "C": rnd(*bc_shape),
        "D": rnd(dim) if with_D else None,
        "z": rnd(batch, dim, length) if with_z else None,
        "delta_bias": rnd(dim, scale=0.5) - 2.0 if with_bias else None,
    }
    return inputs
