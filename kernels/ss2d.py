"""The SS2D core: route-scan x, selective-scan every direction, merge back. Reference and dispatch.

``ss2d_core`` takes everything in image layout, so nothing is copied per direction before the kernel:

    x         (b, D, H, W)      the activated conv output
    dt_low    (b, K, R, H, W)   low-rank Δ per direction (x_proj rows 0..R applied in image layout)
    B, C      (b, K, N, H, W)   input/output projections per direction
    dt_weight (K, D, R)         dt_proj weights: Δ_k = dt_weight[k] @ dt_low_k
    dt_bias   (K, D)            δ bias (softplus is always applied, as in VMamba)
    A         (K*D, N)          negative real decay rates (= -exp(A_logs))
    Ds        (K*D,)            skip term
    route                       name of a scan route (kernels.routes)
returns y     (b, D, H, W)      sum over directions of each direction's output, in image layout.

Because x_proj is a per-pixel linear map, projecting in image layout and then reading in route order equals
VMamba's "cross-scan, then project per direction"; the fused Triton kernel exploits exactly this.
"""
from __future__ import annotations

import torch

from .backend import use_triton
from .routes import cross_merge, cross_scan, num_directions
from .selective_scan import selective_scan_fn


def _check(x, dt_low, B, C, dt_weight, dt_bias, A, Ds, route):
    if x.dim() != 4:
        raise ValueError(f"ss2d_core: x must be (b, D, H, W), got {tuple(x.shape)}")
    b, d, h, w = x.shape
    k = num_directions(route)
    r, n = dt_weight.shape[-1], A.shape[-1]
    expect = {"dt_low": (dt_low, (b, k, r, h, w)), "B": (B, (b, k, n, h, w)), "C": (C, (b, k, n, h, w)),
              "dt_weight": (dt_weight, (k, d, r)), "dt_bias": (dt_bias, (k, d)), "A": (A, (k * d, n)),
              "Ds": (Ds, (k * d,))}
    for name, (t, shape) in expect.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"ss2d_core: {name} must have shape {shape} for route {route!r}, got {tuple(t.shape)}")


def ss2d_core_reference(x, dt_low, B, C, dt_weight, dt_bias, A, Ds, route="cross"):
    """Unfused path: materialise the K route copies, project Δ, scan, merge (any backend of selective_scan_fn)."""
    b, d, h, w = x.shape
    k = dt_weight.shape[0]
    length = h * w
    xs = cross_scan(x, route)                                         # (b, K, D, L)
    lows = cross_scan(dt_low.flatten(1, 2), route).view(b, k, k, -1, length)
    lows = torch.diagonal(lows, dim1=1, dim2=2).permute(0, 3, 1, 2)   # (b, K, R, L): direction k of map k
    Bs = torch.diagonal(cross_scan(B.flatten(1, 2), route).view(b, k, k, -1, length), dim1=1, dim2=2)
    Cs = torch.diagonal(cross_scan(C.flatten(1, 2), route).view(b, k, k, -1, length), dim1=1, dim2=2)
    Bs, Cs = Bs.permute(0, 3, 1, 2), Cs.permute(0, 3, 1, 2)          # (b, K, N, L)
    dts = torch.einsum("bkrl,kdr->bkdl", lows, dt_weight.to(lows.dtype))
    ys = selective_scan_fn(xs.reshape(b, k * d, length), dts.reshape(b, k * d, length), A, Bs.contiguous(),
                           Cs.contiguous(), Ds, None, dt_bias.reshape(-1), True)
    return cross_merge(ys.view(b, k, d, length), h, w, route)


def ss2d_core(x, dt_low, B, C, dt_weight, dt_bias, A, Ds, route="cross"):
    """Fused on CUDA (Triton), reference elsewhere; see the module docstring for shapes."""
    _check(x, dt_low, B, C, dt_weight, dt_bias, A, Ds, route)
    if use_triton(x):
        from .triton_ss2d import ss2d_core_triton  # noqa: PLC0415 (triton is imported only when used)
        return ss2d_core_triton(x, dt_low, B, C, dt_weight, dt_bias, A, Ds, route)
    return ss2d_core_reference(x, dt_low, B, C, dt_weight, dt_bias, A, Ds, route)
