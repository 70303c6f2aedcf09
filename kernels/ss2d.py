"""The SS2D core: route-scan x, selective-scan every direction, merge back. Reference and dispatch.

``ss2d_core`` takes everything in image layout, so nothing is copied per direction before the kernel:

    x         (b, D, H, W)      the activated conv output
    dt_low    (b, K, R, H, W)   low-rank Δ per direction (x_proj rows 0..R applied in image layout)
    B, C      (b, K, N, H, W)   input/output projections per direction
    dt_weight (K, D, R)         dt_proj weights: Δ_k = dt_weight[k] @ dt_low_k
    dt_bias   (K, D)            δ bias (softplus is always applied, as in VMamba)
    A         (K*D, N)          negative real decay rates (= -exp(A_logs))
    Ds        (K*D,)            skip term
    route                       name of a scan route (kernels.routes), or its index map as a LongTensor:
                                (K, H*W) static, or (b, K, H*W) per sample (data-dependent routes, e.g. quadtree)
returns y     (b, D, H, W)      sum over directions of each direction's output, in image layout.

``ss2d_core_packed`` takes dt_low, B and C as the one tensor the block's x_proj makes, proj (b, K, R+2N, H, W) with
rows [0, R) dt_low, [R, R+N) B and [R+N, R+2N) C: the fused core then moves them between layouts in one pass and
returns their gradient as one tensor (the three would otherwise be concatenated again by autograd).

Because x_proj is a per-pixel linear map, projecting in image layout and then reading in route order equals
VMamba's "cross-scan, then project per direction"; the fused Triton kernel exploits exactly this.

Index-map routes, static or per sample, run the same fused kernel on CUDA: it reads x through the map of its own
batch element.
"""
from __future__ import annotations

import torch

from .backend import use_triton
from .routes import _gather_seq, _maps, cross_merge, cross_scan, num_directions
from .selective_scan import selective_scan_fn


def _check(x, dt_low, B, C, dt_weight, dt_bias, A, Ds, route):
    if x.dim() != 4:
        raise ValueError(f"ss2d_core: x must be (b, D, H, W), got {tuple(x.shape)}")
    b, d, h, w = x.shape
    k = num_directions(route)
    if isinstance(route, torch.Tensor) and (route.shape[-1] != h * w or (route.dim() == 3 and route.shape[0] != b)):
        raise ValueError(f"ss2d_core: an index-map route must be (K, {h * w}) or ({b}, K, {h * w}), "
                         f"got {tuple(route.shape)}")
    r, n = dt_weight.shape[-1], A.shape[-1]
    expect = {"dt_low": (dt_low, (b, k, r, h, w)), "B": (B, (b, k, n, h, w)), "C": (C, (b, k, n, h, w)),
              "dt_weight": (dt_weight, (k, d, r)), "dt_bias": (dt_bias, (k, d)), "A": (A, (k * d, n)),
              "Ds": (Ds, (k * d,))}
    for name, (t, shape) in expect.items():
        if tuple(t.shape) != shape:
            what = route if isinstance(route, str) else f"index map {tuple(route.shape)}"
            raise ValueError(f"ss2d_core: {name} must have shape {shape} for route {what!r}, got {tuple(t.shape)}")


def ss2d_core_reference(x, dt_low, B, C, dt_weight, dt_bias, A, Ds, route="cross"):
    """Unfused path: materialise the K route copies, project Δ, scan, merge (any backend of selective_scan_fn)."""
    b, d, h, w = x.shape
    k = dt_weight.shape[0]
    length = h * w
    idx = _maps(route, b, h, w, x.device, inverse=False)              # (K, L) or (b, K, L)
    xs = cross_scan(x, route)                                         # (b, K, D, L)
    # direction k's projections are read through map k only (no K x K copies)
    lows, Bs, Cs = (_gather_seq(t.flatten(3), idx) for t in (dt_low, B, C))   # (b, K, R|N, L)
    dts = torch.einsum("bkrl,kdr->bkdl", lows, dt_weight.to(lows.dtype))
    ys = selective_scan_fn(xs.reshape(b, k * d, length), dts.reshape(b, k * d, length), A, Bs.contiguous(),
                           Cs.contiguous(), Ds, None, dt_bias.reshape(-1), True)
    return cross_merge(ys.view(b, k, d, length), h, w, route)


def channels_last_is_faster(d_state: int, needs_grad: bool) -> bool:
    """Whether the fused core runs faster given x channels last (and dt_low/B/C with their c axis innermost) than
    channel first, as measured on an H200 (BENCHMARKS.md, 256² batch 32, bf16). N > 2 (eighteenth session):
    channels last the forward needs no layout copies and its kernel is faster (stage 1 forward 1.26 -> 1.09 ms,
    stage 4 0.21 -> 0.14), but the backward kernel is 25-70% slower (a program's cache lines then hold other
    programs' channels, where channel first they hold its own next chunks), so only without gradients. N <= 2
    (nineteenth session, vmunet_fast's stages): one channel a lane, channels last is faster both ways (forward
    -26% to -45%, forward+backward -7% to -36%)."""
    return d_state <= 2 or not needs_grad


def ss2d_core(x, dt_low, B, C, dt_weight, dt_bias, A, Ds, route="cross"):
    """Fused on CUDA (Triton), reference elsewhere (``VM_UNET_BACKEND`` forces either)."""
    _check(x, dt_low, B, C, dt_weight, dt_bias, A, Ds, route)
    if use_triton(x):
        from .triton_ss2d import ss2d_core_triton  # noqa: PLC0415 (triton is imported only when used)
        return ss2d_core_triton(x, dt_low, B, C, dt_weight, dt_bias, A, Ds, route)
    return ss2d_core_reference(x, dt_low, B, C, dt_weight, dt_bias, A, Ds, route)


def split_proj(proj: torch.Tensor, rank: int, n_state: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """proj (b, K, R+2N, ...) -> views dt_low, B, C (axis 2 split R, N, N): the one place that layout is spelled."""
    return torch.split(proj, [rank, n_state, n_state], dim=2)


def ss2d_core_packed(x, proj, dt_weight, dt_bias, A, Ds, route="cross"):
    """``ss2d_core`` with dt_low, B and C stacked in ``proj`` (see the module docstring)."""
    r, n = dt_weight.shape[-1], A.shape[-1]
    if proj.dim() != 5 or proj.shape[2] != r + 2 * n:
        raise ValueError(f"ss2d_core_packed: proj must be (b, K, R+2N = {r + 2 * n}, H, W), got {tuple(proj.shape)}")
    dt_low, B, C = split_proj(proj, r, n)
    _check(x, dt_low, B, C, dt_weight, dt_bias, A, Ds, route)
    if use_triton(x):
        from .triton_ss2d import ss2d_core_packed_triton  # noqa: PLC0415 (triton is imported only when used)
        return ss2d_core_packed_triton(x, proj, dt_weight, dt_bias, A, Ds, route)
    return ss2d_core_reference(x, dt_low, B, C, dt_weight, dt_bias, A, Ds, route)
