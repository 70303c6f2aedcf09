"""Fused SS2D core in Triton: route gather + low-rank Δ + selective scan + merge, forward and backward.

``ss2d_core_packed_triton`` has ``ss2d_core_packed``'s signature and shapes (see ``kernels/ss2d.py``): dt_low, B and C
come as one projection tensor, read as three views and returned as one gradient (``ss2d_core_triton`` takes them
apart, as ``ss2d_core`` does). Per (batch, direction k,
block of channels) one program reads x (b, D, H, W) through the route's gather map ``idx[k]`` (no direction
copies), builds Δ = dt_weight[k] @ dt_low on the fly (or, at larger ranks, reads it from one batched GEMM, see
``DELTA_OPTS``), scans, and adds its y into one merged fp32 (b, D, H*W)
buffer with atomics through the same map (gathering by idx and scattering by idx are inverse maps, so any
permutation route works unchanged). Backward saves only the inputs and recomputes (see ``triton_scan_core``).

Two memory layouts, picked by x's strides (``_feature_last``); the kernels take strided views either way:

* channels last (x a channels-last (b, D, H, W), dt_low/B/C with their c axis innermost, as the VM-UNet block makes
  them from its (b, H, W, C) activations): every gathered position is one contiguous run of channels or states,
  whatever the route, so nothing is copied or transposed around the kernels; y, dx and dB/dC come back in the
  same layout.
* channel first (contiguous x, as the fast family's blocks have it): a direction that runs along columns reads one
  shared transposed copy of x and accumulates into a second (transposed) buffer, so its loads and atomics are
  coalesced; ``_route_plan`` picks that per direction from the index map itself.

The forward runs channels last whatever layout it is given, unless the backward will reuse states that it keeps in
x's layout (``_runs_channels_last``): channel-first operands are copied in, which measured faster than the
channel-first kernels' own copies, and y comes back channels last. The backward runs in x's layout.

Registered as ``vm_unet::ss2d_fwd`` / ``vm_unet::ss2d_bwd`` custom ops (fake impls for torch.compile); inputs of
any float dtype, fp32 compute, output in x's dtype.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from . import triton_scan_core as core
from .routes import route_indices
from .ss2d import split_proj
from .triton_lowrank_grad import lowrank_weight_grad
from .triton_transpose import transpose_last2


def chunk_lines(maps: torch.Tensor, bl: int) -> torch.Tensor | None:
    """(K, nchunk, 2) int32 (first position, step) of every chunk of ``bl`` steps of the maps (K, L), or None unless
    each chunk's positions are an arithmetic progression (its padded tail aside): the kernels then compute positions
    from two numbers a chunk instead of loading the map (``triton_scan_core._positions``). The cross route's maps
    are, in either layout (a row or column of the image per chunk, as long as the chunk length divides the side);
    so are zigzag rows of even width; quadtree windows and random maps are not."""
    k, length = maps.shape
    nchunk = -(-length // bl)
    chunks = torch.nn.functional.pad(maps.long(), (0, nchunk * bl - length)).view(k, nchunk, bl)
    first = chunks[..., 0]
    step = chunks[..., 1] - first if bl > 1 else torch.zeros_like(first)
    valid = (torch.arange(nchunk * bl) < length).view(nchunk, bl)
    fits = chunks == first[..., None] + step[..., None] * torch.arange(bl)
    if not bool((fits | ~valid).all()):
        return None
    return torch.stack([first, step], -1).to(torch.int32)


@functools.lru_cache(maxsize=256)
def _route_plan_host(route: str, h: int, w: int, transpose_columns: bool, bl: int, pin: bool,
                     positions_only: bool = False) -> tuple[torch.Tensor, tuple[int, ...], str, int]:
    """Gather maps in the layout each direction reads, which directions are transposed, and the chunk lines of
    ``bl``-step chunks when the maps need and have them (``chunk_lines``), packed in one host int32 tensor: K*M map
    entries, the K slot flags, the K*nchunk*2 lines (pinned when it will be copied to a GPU); how the kernels get
    positions (``triton_scan_core._positions``): "affine" (every map an arithmetic progression), "lines" or
    "gather"; and M, the map entries kept per direction.

    ``positions_only``: no launch will gather through the maps where it can compute positions (all but the N <= 2
    backward), so for "affine" and "lines" only each map's first two entries are kept (M = 2, what ``_route_line``
    reads) instead of all L: every call copies the packed tensor to the GPU, 16 bytes a position at K=4, which at
    2048² took 0.8 ms of a 113 ms training step (H200, twenty-sixth session).

    ``transpose_columns`` (the channel-first layout): a direction whose steps are contiguous in the transposed image
    (column-major routes) reads a transposed copy of x (one extra copy for all such directions, not one per
    direction) and its own dt_low/B/C slice transposed, so its loads and atomics are coalesced; its index map is
    rewritten to flat indices of the (W, H) image. Channels last, every map is read as it is.
    """
    idx = route_indices(route, h, w, "cpu")
    lay = torch.zeros(idx.shape[0], dtype=torch.bool)
    if transpose_columns:
        tmap = (idx % w) * h + idx // w

        def contiguity(m: torch.Tensor) -> torch.Tensor:
            return (m[:, 1:] - m[:, :-1]).abs().eq(1).float().mean(1) if m.shape[1] > 1 else torch.zeros(m.shape[0])
        lay = (contiguity(tmap) > contiguity(idx)) & (h > 1) & (w > 1)
    eff = torch.where(lay[:, None], tmap, idx) if transpose_columns else idx
    steps = eff[:, 1:] - eff[:, :-1]
    lines, mode = None, "gather"
    if eff.shape[1] > 1 and bool((steps == steps[:, :1]).all()):
        mode = "affine"
    elif eff.shape[1] > 1:
        lines = chunk_lines(eff, bl)
        mode = "lines" if lines is not None else mode
    # int32 keeps a map at 4 bytes a position; H*W < 2**31 always here
    if positions_only and mode != "gather":
        eff = eff[:, :2]
    parts = [eff.flatten(), lay] + ([lines.flatten()] if lines is not None else [])
    packed = torch.cat([t.to(torch.int32) for t in parts])
    return (packed.pin_memory() if pin else packed), tuple(int(v) for v in lay), mode, eff.shape[1]


def _route_plan(route: str, h: int, w: int, device, transpose_columns: bool, bl: int, positions_only: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, tuple, torch.Tensor | None, str]:
    """(gather maps (K, L), or (K, 2) with ``positions_only`` (see ``_route_plan_host``), slot map (K,),
    transposed flags, chunk lines or None, positions mode) on ``device``. The maps are cached on the host and
    copied (asynchronously) on every call: a cached GPU copy first built while CUDA graphs are captured or warmed up
    (``torch.compile(mode="reduce-overhead")``) would sit in the graphs' private memory pool, which must hold only
    the graph's own tensors."""
    device = torch.device(device)
    packed, lay, mode, m = _route_plan_host(route, h, w, transpose_columns, bl, device.type == "cuda",
                                            positions_only)
    if packed.device != device:
        packed = packed.to(device, non_blocking=True)
    k = len(lay)
    lines = packed[k * m + k:] if mode == "lines" else None
    return packed[:k * m].view(k, m), packed[k * m:k * m + k], lay, lines, mode


# The layout copies below (transposes, the merge of the two accumulators) run as the tiled Triton kernel of
# ``triton_transpose`` from this many elements on, as PyTorch's strided copies below it. A Triton launch costs 25-50 µs
# of host time against PyTorch's 10-17 µs (H200, Triton 3.6), and the GPU time it saves grows with the size (stage 1
# at 256² batch 32, 25 M elements: 130 -> about 25 µs a copy); below this size eager steps are bound by the host.
# While a CUDA graph is captured the host cost is paid once, so the tiled kernel takes over from the smaller size:
# PyTorch's strided copies of stage 3's (32, 768, 16, 16) took 33 µs each, and vmunet_isic trained at 256² b32 with
# CUDA graphs at 571.5 / 571.6 img/s against 562.4 / 561.0 with the eager threshold (H200, twenty-first session).
LAYOUT_OPTS = {"triton_min_numel": 1 << 23, "triton_min_numel_captured": 1 << 20}


def _tiled(t: torch.Tensor) -> bool:
    captured = t.is_cuda and torch.cuda.is_current_stream_capturing()
    return t.numel() >= LAYOUT_OPTS["triton_min_numel_captured" if captured else "triton_min_numel"]


def _swap(t: torch.Tensor, maps: tuple, rows: int, cols: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """(b, K, C, rows*cols) -> same, with the directions flagged in the route plan (``maps`` from ``_maps_for``)
    transposed to (cols, rows), into ``out`` (any strides over (b, K, C), positions contiguous; its dtype: the cast
    on the store) or a new tensor (t itself where no direction is transposed); tiled: one pass."""
    lay = maps[4]
    if not any(lay):
        return t if out is None else out.copy_(t)
    if out is None:
        out = torch.empty(t.shape, device=t.device, dtype=t.dtype)
    if not _tiled(t):
        b, k, c, _ = t.shape
        for i in range(k):
            out[:, i].copy_(t[:, i].reshape(b, c, rows, cols).transpose(-1, -2).reshape(b, c, rows * cols)
                            if lay[i] else t[:, i])
        return out
    transpose_last2(t.unflatten(-1, (rows, cols)), out=out.unflatten(-1, (cols, rows)), which=maps[3])
    return out


def _two_layouts(t: torch.Tensor, h: int, w: int, lay) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, D, H, W) -> slot 0 and slot 1 as (b, D, H*W): the image itself (not copied when contiguous; a gradient
    from the channel-last output norm arrives with its channels innermost and is transposed), and its transposed
    copy when a direction reads it (else slot 0 again). The kernels take them as two tensors."""
    b, d = t.shape[:2]
    t0 = t.reshape(b, d, h * w)
    if not t0.is_contiguous():
        t0 = transpose_last2(t0.transpose(1, 2)) if _tiled(t) else t0.contiguous()
    if not any(lay):
        return t0, t0
    if not _tiled(t):
        # from t0 (contiguous by now) and copied: reshape returns a view where it can, e.g. of a gradient that is one
        # value broadcast (y.sum().backward()), which the kernels would then read with t0's strides
        return t0, t0.view(b, d, h, w).transpose(-1, -2).contiguous().view(b, d, h * w)
    return t0, transpose_last2(t0.view(b, d, h, w)).view(b, d, h * w)


def _slots(lay) -> int:
    return 2 if any(lay) else 1


def _merge_slots(t: torch.Tensor, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
    """(slots, b, D, H*W) fp32 accumulators -> (b, D, H, W) in ``dtype``: one pass, the sum in fp32 and the cast on
    the store (no fp32 intermediate)."""
    b, d = t.shape[1:3]
    y = t[0].view(b, d, h, w)
    if t.shape[0] == 1:
        return y.to(dtype)
    if not _tiled(y):
        return torch.add(y, t[1].view(b, d, w, h).transpose(-1, -2),
                         out=torch.empty(b, d, h, w, dtype=dtype, device=t.device))
    return transpose_last2(t[1].view(b, d, w, h), add=y, dtype=dtype)


def _feature_last(x: torch.Tensor) -> bool:
    """Whether the op runs channels last: x (b, D, H, W) laid out as (b, H, W, D) in memory, and not also contiguous
    (one channel or one pixel)."""
    return not x.is_contiguous() and x.permute(0, 2, 3, 1).is_contiguous()


def _image_empty(b: int, d: int, h: int, w: int, feature_last: bool, **kw) -> torch.Tensor:
    """An empty (b, D, H, W) tensor in the op's layout: what y and dx are returned in (fake impls use it too)."""
    if feature_last:
        return torch.empty(b, h, w, d, **kw).permute(0, 3, 1, 2)
    return torch.empty(b, d, h, w, **kw)


def _seq_view(t: torch.Tensor) -> torch.Tensor:
    """(b, K, c, H, W) -> (b, K, c, H*W) with c innermost: a view where t is laid out so (the VM-UNet block's
    projections, ``vmamba.SSMCore.forward_core``), else one copy."""
    b, k, c, h, w = t.shape
    if (c > 1 and t.stride(2) != 1) or (h > 1 and t.stride(3) != w * t.stride(4)):
        t = t.permute(0, 3, 4, 1, 2).contiguous().permute(0, 3, 4, 1, 2)
    return t.flatten(3)


def _position_major(b: int, k: int, c: int, h: int, w: int, **kw) -> torch.Tensor:
    """A (b, K, c, H, W) tensor stored (b, H, W, K, c): the layout of the channels-last block's projection."""
    return torch.empty(b, h, w, k, c, **kw).permute(0, 3, 4, 1, 2)


def _to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """(b, D, H, W) copied to channels last: one tiled transpose where large and contiguous."""
    b, d, h, w = x.shape
    if not (_tiled(x) and x.is_contiguous()):
        return x.contiguous(memory_format=torch.channels_last)
    return transpose_last2(x.view(b, d, h * w)).view(b, h, w, d).permute(0, 3, 1, 2)


def _to_position_major(t: torch.Tensor) -> torch.Tensor:
    """(b, K, c, H, W) with positions contiguous (the channel-first block's projection) -> the same stored
    (b, H, W, K, c), as the block's projections come channels last: one tiled transpose where large, else
    ``_seq_view``'s copy."""
    b, k, c, h, w = t.shape
    if not (_tiled(t) and t.stride(4) == 1 and t.stride(3) == w):
        return t
    out = torch.empty(b, h, w, k, c, device=t.device, dtype=t.dtype)
    transpose_last2(t.flatten(3), out=out.view(b, h * w, k, c).permute(0, 2, 1, 3))
    return out.permute(0, 3, 4, 1, 2)


class _Operands:
    """The op's inputs as the kernels read them: x as (b, D, L) views (slot 0 and slot 1, see ``_two_layouts``),
    dt_low/B/C as (b, K, c, L) views of the projection (b, K, R+2N, H, W), the route maps, and the layout."""

    def __init__(self, x, proj, rank: int, n_state: int, route: str, order: Optional[torch.Tensor], bl: int,
                 to_channels_last: bool = False, positions_only: bool = True):
        b, d, h, w = x.shape
        self.b, self.d, self.h, self.w, self.L = b, d, h, w, h * w
        # channel-first operands run channels last (``_runs_channels_last``): each copied once into that layout
        if to_channels_last and not _feature_last(x):
            x, proj = _to_channels_last(x), _to_position_major(proj)
        self.feature_last = _feature_last(x)
        self.maps = _maps_for(route, order, h, w, x.device, not self.feature_last, bl, positions_only)
        if self.feature_last:
            xs = x.permute(0, 2, 3, 1).reshape(b, h * w, d).transpose(1, 2)   # a view, channels innermost
            self.xx = (xs, xs)
            proj = _seq_view(proj)
        else:
            self.xx = _two_layouts(x, h, w, self.maps[4])
            # one pass for all three, each direction in its read layout
            proj = _swap(proj.reshape(b, proj.shape[1], -1, self.L), self.maps, h, w)
        self.lows, self.Bs, self.Cs = split_proj(proj, rank, n_state)

    def image_out(self, acc: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The fp32 accumulator the kernels scattered into (``out_buffer``) as (b, D, H, W) in ``dtype``, in the
        layout the kernels ran in: channels last also where x was copied in (the block's LayerNorm over channels
        reads it along its contiguous axis, and no transposing cast is paid on the way out)."""
        if self.feature_last:
            return acc.view(self.b, self.h, self.w, self.d).to(dtype).permute(0, 3, 1, 2)
        return _merge_slots(acc, self.h, self.w, dtype)

    def out_buffer(self) -> tuple[torch.Tensor, tuple]:
        """A zeroed fp32 accumulator for y or dx, and its strides as the kernels take them (batch, slot, channel,
        position): channels last one (b, L, D) buffer, else one (b, D, L) per slot."""
        f32 = dict(device=self.xx[0].device, dtype=torch.float32)
        if self.feature_last:
            acc = torch.zeros(self.b, self.L, self.d, **f32)
            return acc, (acc.stride(0), 0, 1, self.d)
        acc = torch.zeros(_slots(self.maps[4]), self.b, self.d, self.L, **f32)
        return acc, (acc.stride(1), acc.stride(0), self.L, 1)

    def grad_pair(self, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The incoming gradient (b, D, H, W) as the kernels read it: like x."""
        if self.feature_last:
            g = grad.permute(0, 2, 3, 1)
            gs = g.contiguous().view(self.b, self.L, self.d).transpose(1, 2)  # a view when it came channels last
            return gs, gs
        return _two_layouts(grad, self.h, self.w, self.maps[4])


def _maps_for(route: str, order: Optional[torch.Tensor], h: int, w: int, device, transpose_columns: bool,
              bl: int, positions_only: bool) -> tuple:
    """(idx, batch stride, direction stride, kmap, lay, chunk lines or None, positions mode) for a named route or
    an index map (K, L) / (b, K, L)."""
    if order is None:
        idx, kmap, lay, lines, mode = _route_plan(route, h, w, device, transpose_columns, bl, positions_only)
        return idx, 0, idx.stride(0), kmap, lay, lines, mode
    # per-sample maps (data-dependent routes): read as given, no transposed layout, loaded every chunk
    idx = order.to(device=device, dtype=torch.int32).contiguous()
    k = idx.shape[-2]
    return (idx, idx.stride(0) if idx.dim() == 3 else 0, idx.stride(-2),
            torch.zeros(k, device=device, dtype=torch.int32), (0,) * k, None, "gather")


def _input_args(ops: _Operands, W, dt_bias, A, Ds) -> tuple[tuple, dict]:
    """The argument prefix the forward and backward kernels share, and their flags: x read through the route map
    (its two slots, or one channels last), Δ (see ``_delta_operand``), B, C; no z gate in SS2D (placeholder)."""
    idx, s_ib, s_ik, kmap, _, lines, mode = ops.maps
    delta, flags = _delta_operand(ops.lows, W, A.shape[1], ops.feature_last)
    x0, x1 = ops.xx
    Bs, Cs = ops.Bs, ops.Cs
    return (x0, x1, x0.stride(0), 0, x0.stride(1), x0.stride(2),
            *delta,
            dt_bias, A, Ds,
            Bs, *Bs.stride(), Cs, *Cs.stride(),
            x0, 0, 0, 0, 0,
            idx, s_ib, s_ik, lines if lines is not None else idx, kmap), \
        dict(flags, AFFINE=mode == "affine", LINES=mode == "lines", KMAP=not ops.feature_last,
             FEATURE_LAST=ops.feature_last)


_FLAGS = dict(GATHER=True, LOWRANK=True, HAS_BIAS=True, SOFTPLUS=True, HAS_D=True, HAS_Z=False)

# Δ in the kernel from the low-rank factors costs R FMAs and R loads per position in each of the forward, states
# and backward passes. From rank min_rank on (and for d_state >= min_state, where the scan's own work per position
# is large enough that reading Δ costs less than the product), Δ = W_k @ low_k is one batched GEMM and the kernels
# read it: measured on H200 (BENCHMARKS.md), N=16 fwd+bwd -7% at R=12, -17% at R=24, -45% at R=48, about even at
# R=6 (+0.4 GB); N=1 channel first (memory-bound) 11-16% slower at R >= 12. Channels last, the GEMM is taken at any
# d_state from rank channels_last_min_rank on, past the ranks whose factors the kernels read as one tile
# (``triton_scan_core._lowrank_tile``): twentieth session, N=1, fwd+bwd 0.744 -> 0.516 ms at R=24 and 0.682 ->
# 0.335 ms at R=48 (the tile: 0.556 / 0.449), 256² b32 bf16.
DELTA_OPTS = {"min_rank": 12, "min_state": 8, "channels_last_min_rank": 17}


def _delta_from_gemm(rank: int, n_state: int, feature_last: bool) -> bool:
    """Whether Δ is materialised by one GEMM rather than built in the kernels from the low-rank factors."""
    if feature_last and rank >= DELTA_OPTS["channels_last_min_rank"]:
        return True
    return rank >= DELTA_OPTS["min_rank"] and n_state >= DELTA_OPTS["min_state"]


_HALF = (torch.float16, torch.bfloat16)


def _delta_grad_dtype(lows: torch.Tensor) -> torch.dtype:
    """Precision of dΔ and of its two GEMMs (d dt_low, d dt_weight) in the backward: dt_low's own when that is half
    precision (what dt_proj, a Linear, does under autocast in the published model; half the bytes, tensor-core
    GEMMs), else fp32. Δ itself stays fp32: the kernels read a bf16 Δ 7-8% slower (H200, stage 2, BENCHMARKS.md)."""
    return lows.dtype if lows.dtype in _HALF else torch.float32


def _delta_operand(lows: torch.Tensor, W: torch.Tensor, n_state: int, feature_last: bool = False
                   ) -> tuple[tuple, dict]:
    """Kernel arguments for Δ (tensor and its 4 strides, W and its 2 strides) and the flags that go with them."""
    r = lows.shape[2]
    if not _delta_from_gemm(r, n_state, feature_last):
        return (lows, *lows.stride(), W, W.stride(0), W.stride(1)), _FLAGS
    delta = _delta_gemm(W, lows, feature_last)
    return (delta, *delta.stride(), W, 0, 0), dict(_FLAGS, LOWRANK=False)


def _half_bmm_fp32_out(t: torch.Tensor) -> bool:
    """Whether a GEMM of half-precision ``t`` can write fp32 itself: CUDA, and a PyTorch with
    ``bmm(..., out_dtype=torch.float32)``."""
    return t.is_cuda and t.dtype in _HALF and _bmm_has_out_dtype()


def _half_gemm_fp32_out(lows: torch.Tensor, numel: int) -> bool:
    """Whether Δ of ``numel`` elements comes from the half-precision GEMM of ``_delta_gemm``: ``_half_bmm_fp32_out``,
    and Δ under 2**31 elements (its (K, D, b, L) layout is indexed in int32 by the kernels)."""
    return numel < 2 ** 31 and _half_bmm_fp32_out(lows)


@functools.cache
def _bmm_has_out_dtype() -> bool:
    # looked up once: the op registry does not change, and the check sits on every call's path
    return "dtype" in torch.ops.aten.bmm.overloads()


def _delta_gemm(W: torch.Tensor, lows: torch.Tensor, feature_last: bool = False) -> torch.Tensor:
    """Δ_k = W_k @ low_k, (K, D, R) @ (b, K, R, L) -> (b, K, D, L) fp32, the kernels' precision for Δ; a view of
    (K, b, L, D) channels last (``feature_last``, lows with R innermost), else of (K, D, b, L) or (b, K, D, L).

    Half-precision low-rank factors (dt_low under autocast): per direction one tensor-core GEMM over the whole
    batch, (D, 2R) @ (2R, b·L), accumulated and written in fp32. fp32 W is split into two half-precision parts,
    hi + lo, against dt_low stacked twice, so W keeps about 16 mantissa bits (rel. error of Δ 2.5e-6; W rounded to
    bf16 alone gave 1.7e-3), for a copy of dt_low (2R/D of Δ's size). The depth 2R also keeps the rows 16-byte
    aligned at R = 12, where cuBLAS otherwise picks a kernel 2.5x slower. The fp32 GEMM, the path otherwise, ran on
    the CUDA cores at 1.0-1.8 TB/s of output (R = 12..48, H200): about 0.9 ms of a 256² batch-32 inference; under
    autocast it would round Δ to bf16."""
    b, k, r, L = lows.shape
    d = W.shape[1]
    if feature_last:
        low_t = lows.permute(1, 0, 3, 2)                                        # (K, b, L, R), a view
        if _half_gemm_fp32_out(lows, b * k * d * L):
            hi = W.to(lows.dtype)
            lo = (W - hi).to(lows.dtype)
            low2 = torch.cat([low_t, low_t], 3).reshape(k, b * L, 2 * r)
            delta = torch.bmm(low2, torch.cat([hi, lo], 2).transpose(1, 2), out_dtype=torch.float32)  # (K, b·L, D)
        else:
            with torch.autocast(lows.device.type, enabled=False):
                delta = torch.matmul(low_t.float(), W.float().transpose(1, 2)[:, None])
        return delta.view(k, b, L, d).permute(1, 0, 3, 2)
    if _half_gemm_fp32_out(lows, b * k * d * L):
        hi = W.to(lows.dtype)
        lo = (W - hi).to(lows.dtype)                    # W - hi in W's precision (type promotion)
        low_t = lows.permute(1, 2, 0, 3)                                        # (K, R, b, L), a view
        low2 = torch.cat([low_t, low_t], 1).reshape(k, 2 * r, b * L)
        delta = torch.bmm(torch.cat([hi, lo], 2), low2, out_dtype=torch.float32)   # (K, D, b·L)
        return delta.view(k, d, b, L).permute(2, 0, 1, 3)
    with torch.autocast(lows.device.type, enabled=False):
        return torch.matmul(W.float(), lows.float())


# Chunk-start states stored by the forward spare the backward its states pass (one more forward-kernel run) when
# they are small: NP/BL of x per direction, at N=1 (vmunet_fast) 1/16 channels last and 1/64 channel first. At N=16
# they would be 2x (0.8 GB per stage-1 layer at 256² batch 32), so the backward recomputes them instead; when L is
# split into segments (long sequences at small batch) the forward then keeps its segment end states (NP/(BL*CPS) of
# x, under 1%), so that recomputation skips its own end-state pass.
KEEP_STATES_MAX_RATIO = 1 / 16


def _forward_plan(n: int, L: int, d: int, rows: int, feature_last: bool, training: bool) -> core.LaunchPlan:
    """The forward's plan; ``training``: its states (or segment end states) are kept for a backward."""
    return core.launch_plan(n, L, d, backward=False, rows=rows, feature_last=feature_last, for_backward=training)


def _backward_plan(n: int, L: int, d: int, rows: int, feature_last: bool) -> core.LaunchPlan:
    return core.launch_plan(n, L, d, backward=True, rows=rows, feature_last=feature_last)


def _kept_shapes(b: int, k: int, d: int, L: int, n: int, keep_states: bool, feature_last: bool
                 ) -> tuple[tuple, tuple, tuple]:
    """Shapes of the forward's extra outputs for the backward: chunk-start states, or else segment end states and
    ΣΔ (see ``KEEP_STATES_MAX_RATIO``); each empty when not kept."""
    empty = (0,)
    fplan = _forward_plan(n, L, d, b * k, feature_last, keep_states)
    bplan = _backward_plan(n, L, d, b * k, feature_last)
    if not (keep_states and core.same_states_layout(fplan, bplan)):
        return empty, empty, empty
    if fplan.np / fplan.bl <= KEEP_STATES_MAX_RATIO:
        return (core.states_numel(b, k, d, fplan),), empty, empty
    if fplan.nseg > 1:
        return empty, (b, k, fplan.nseg, d, fplan.np), (b, k, fplan.nseg, d)
    return empty, empty, empty


# Whether the forward runs channel-first operands channels last where the backward reuses none of its chunk-start
# states: x and dt_low/B/C copied once into that layout (one tiled transpose each; y stays channels last), in place
# of the transposed copy of x, the per-direction swaps and the merge of two accumulators.
# Measured on H200 (BENCHMARKS.md, twenty-first session, GPU time, 256² b32): N=16 stage-1 forward 1.200 -> 1.094
# ms fp32, 1.149 -> 0.962 bf16, stage 2 -14%; N=1 -20% to -48%; stages 3-4 at N=16 fp32 within 3% either way;
# vmunet_isic training +2%. The backward stays in x's layout (at N > 2 channel first, its kernel faster so:
# ``kernels.ss2d.channels_last_is_faster``).
COPY_TO_CHANNELS_LAST = True


def _runs_channels_last(x: torch.Tensor, n: int, L: int, rows: int, kept: tuple) -> bool:
    """The forward's layout: x's own, except that channel-first operands run channels last (``COPY_TO_CHANNELS_LAST``)
    when the forward keeps (``kept``, from ``_kept_shapes`` in x's layout) no chunk-start states for the backward,
    and segment end states only where both layouts' plans cut L alike: the backward's states pass starts its
    segments from them under the forward's plan in x's layout. y comes back in this layout (the fake impl asks
    here too)."""
    if _feature_last(x):
        return True
    if not COPY_TO_CHANNELS_LAST or kept[0] != (0,):
        return False
    d = x.shape[1]
    return kept[1] == (0,) or _forward_plan(n, L, d, rows, True, True) == _forward_plan(n, L, d, rows, False, True)


@torch.library.custom_op("vm_unet::ss2d_fwd", mutates_args=())
def ss2d_fwd(x: torch.Tensor, proj: torch.Tensor, dt_weight: torch.Tensor, dt_bias: torch.Tensor, A: torch.Tensor,
             Ds: torch.Tensor, route: str, order: Optional[torch.Tensor], keep_states: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """y, and for the backward what ``_kept_shapes`` says: chunk-start states, segment end states and ΣΔ. ``proj``
    is dt_low, B and C stacked on its axis 2 (``ss2d_core_packed``)."""
    b, d, h, w = x.shape
    k, _, r = dt_weight.shape
    n, L = A.shape[1], h * w
    shapes = _kept_shapes(b, k, d, L, n, keep_states, _feature_last(x))
    feature_last = _runs_channels_last(x, n, L, b * k, shapes)
    # a forward that keeps nothing runs the inference plan (at N <= 2 channels last its longer chunks are faster)
    plan = _forward_plan(n, L, d, b * k, feature_last, keep_states and shapes != ((0,),) * 3)
    ops = _Operands(x, proj, r, n, route, order, plan.bl, to_channels_last=feature_last)
    prefix, flags = _input_args(ops, dt_weight.contiguous(), dt_bias.contiguous(), A.contiguous(), Ds.contiguous())
    dims = core.ScanDims(b, k, d, L, n, r if flags["LOWRANK"] else 0)
    f32 = dict(device=x.device, dtype=torch.float32)
    states = torch.empty(shapes[0], **f32)
    out, out_strides = ops.out_buffer()
    seg = core.scan_forward(prefix, dims, plan, flags, out=out, out_strides=out_strides, atomic_out=True,
                            states=states if states.numel() else None)
    hend, sdl = seg if shapes[1] != (0,) else (torch.empty(s, **f32) for s in shapes[1:])  # kept: L was split
    return ops.image_out(out, x.dtype), states, hend, sdl


@ss2d_fwd.register_fake
def _(x, proj, dt_weight, dt_bias, A, Ds, route, order, keep_states):
    b, d, h, w = x.shape
    k, n, L = dt_weight.shape[0], A.shape[1], h * w
    shapes = _kept_shapes(b, k, d, L, n, keep_states, _feature_last(x))
    return (_image_empty(b, d, h, w, _runs_channels_last(x, n, L, b * k, shapes), dtype=x.dtype, device=x.device),
            *(x.new_empty(s, dtype=torch.float32) for s in shapes))


# d dt_weight reduces over at least this many positions in Triton (``lowrank_weight_grad``), over fewer as one cuBLAS
# GEMM a row. Measured on H200 (BENCHMARKS.md, twenty-third session, bf16 / fp32, µs): L=4096 (stage 1 at 256²
# batch 32) 94 -> 65 / 247 -> 140, L=1024 56 -> 43 / 102 -> 72, L=256 32 -> 35 / 65 -> 85, L=64 44 -> 73 / 65 -> 151
DW_TRITON_MIN_L = 1024


def _dt_weight_grad(ddt: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """Σ_l ddt[m, l]ᵀ low[m, l]: (M, L, D) x (M, L, R) -> (M, D, R), fp32; any strides."""
    if ddt.shape[1] >= DW_TRITON_MIN_L:
        return lowrank_weight_grad(ddt, low)
    if _half_bmm_fp32_out(ddt):
        # written in fp32 by the GEMM: no rounding to half precision before the sum over the batch, and no cast pass
        # (stage 4 at 256² batch 32: 26 µs a layer, BENCHMARKS.md, thirtieth session)
        return torch.bmm(ddt.transpose(1, 2), low, out_dtype=torch.float32)
    return torch.matmul(ddt.transpose(1, 2), low).float()


def _proj_empty(b: int, k: int, c: int, h: int, w: int, feature_last: bool, **kw) -> torch.Tensor:
    """d proj (b, K, R+2N, H, W) as the backward returns it: stored (b, H, W, K, c) channels last, as the block's
    projection comes, else contiguous."""
    return _position_major(b, k, c, h, w, **kw) if feature_last else torch.empty(b, k, c, h, w, **kw)


@torch.library.custom_op("vm_unet::ss2d_bwd", mutates_args=())
def ss2d_bwd(grad: torch.Tensor, x: torch.Tensor, proj: torch.Tensor, dt_weight: torch.Tensor, dt_bias: torch.Tensor,
             A: torch.Tensor, Ds: torch.Tensor, route: str, order: Optional[torch.Tensor], states: torch.Tensor,
             seg_hend: torch.Tensor, seg_sdl: torch.Tensor) -> list[torch.Tensor]:
    """[dx, d proj, d dt_weight, d dt_bias, dA, dDs]. ``states``, ``seg_hend``, ``seg_sdl``: what the forward kept
    (see ``_kept_shapes``), or empty."""
    b, d, h, w = x.shape
    k, _, r = dt_weight.shape
    n, L = A.shape[1], h * w
    feature_last = _feature_last(x)
    plan = _backward_plan(n, L, d, b * k, feature_last)
    # the N <= 2 backward kernel gathers positions through the whole map (see ``scan_backward``)
    ops = _Operands(x, proj, r, n, route, order, plan.bl, positions_only=core._unroll_rows(plan))
    W = dt_weight.contiguous()
    prefix, flags = _input_args(ops, W, dt_bias.contiguous(), A.contiguous(), Ds.contiguous())
    g0, g1 = ops.grad_pair(grad)
    f32 = dict(device=x.device, dtype=torch.float32)
    dx, dx_strides = ops.out_buffer()
    ddt_dtype = _delta_grad_dtype(ops.lows)
    # dB, dC accumulate in one buffer, positions innermost in both layouts: their way out into d proj is one pass
    # (channels last a transposing cast). Accumulated (b, L, K, N) instead, the backward kernel measured the same
    dBC = torch.zeros(b, k, 2 * n, L, **f32)
    dB, dC = dBC[:, :, :n], dBC[:, :, n:]
    if ops.feature_last:
        # dΔ (K, b, L, D): each (direction, image) one (L, D) matrix for its two GEMMs
        ddt = torch.empty(k, b, L, d, device=x.device, dtype=ddt_dtype).permute(1, 0, 3, 2)
    else:
        ddt = torch.empty(b, k, d, L, device=x.device, dtype=ddt_dtype)   # in each direction's read layout
    dims = core.ScanDims(b, k, d, L, n, r if flags["LOWRANK"] else 0)
    dA, dD, dbias = core.scan_backward(
        prefix, dims, plan, flags,
        g=(g0, g1, g0.stride(0), 0, g0.stride(1), g0.stride(2)),
        du=(dx, *dx_strides), atomic_du=True,
        ddt=(ddt, *ddt.stride()), dz=None, dB=(dB, *dB.stride()), dC=(dC, *dC.stride()),
        states=states if states.numel() else None,
        seg_ends=((seg_hend, seg_sdl, _forward_plan(n, L, d, b * k, feature_last, True)) if seg_hend.numel()
                  else None))
    lows = ops.lows.to(ddt.dtype)
    dproj = _proj_empty(b, k, r + 2 * n, h, w, ops.feature_last, device=x.device, dtype=proj.dtype)
    if ops.feature_last:
        # Δ_k = W_k @ low_k over all (b, l) of direction k: d low_k = dΔ_k W_k, d W_k = Σ_b dΔ_k,bᵀ low_k,b
        ddt_k = ddt.permute(1, 0, 3, 2)                                                  # (K, b, L, D), a view
        dproj[:, :, :r].permute(1, 0, 3, 4, 2).view(k, b * L, r).copy_(
            torch.bmm(ddt_k.reshape(k, b * L, d), W.to(ddt.dtype)))
        dW = _dt_weight_grad(ddt_k.reshape(k * b, L, d), lows.permute(1, 0, 3, 2).reshape(k * b, L, r))
        dW = dW.view(k, b, d, r).sum(1)
        # (b, K, 2N, L) -> d proj's (b, H, W, K, 2N) slice: one transposing cast
        dbc = dproj[:, :, r:].flatten(3).transpose(2, 3)                                 # (b, K, L, 2N), a view
        if _tiled(dBC):
            transpose_last2(dBC, out=dbc)
        else:
            dbc.copy_(dBC.transpose(2, 3))
    else:
        # Δ_k = W_k @ low_k: d low = W_kᵀ dΔ (a batched matmul over (b, k), no copies) and d W_k = Σ_b dΔ lowᵀ
        dlow = torch.matmul(W.to(ddt.dtype).transpose(1, 2), ddt)                          # (b, k, r, L)
        dW = _dt_weight_grad(ddt.view(b * k, d, L).transpose(1, 2),
                             lows.reshape(b * k, r, L).transpose(1, 2)).view(b, k, d, r).sum(0)
        # back from each direction's read layout to image layout, cast on the way
        flat = dproj.view(b, k, r + 2 * n, L)
        _swap(dlow, ops.maps, w, h, out=flat[:, :, :r])
        _swap(dBC, ops.maps, w, h, out=flat[:, :, r:])
    return [ops.image_out(dx, x.dtype), dproj,
            dW.view(dt_weight.shape).to(dt_weight.dtype), dbias.view(dt_bias.shape).to(dt_bias.dtype),
            dA.to(A.dtype), dD.to(Ds.dtype)]


@ss2d_bwd.register_fake
def _(grad, x, proj, dt_weight, dt_bias, A, Ds, route, order, states, seg_hend, seg_sdl):
    b, d, h, w = x.shape
    k = dt_weight.shape[0]
    params = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (dt_weight, dt_bias, A, Ds)]
    last = _feature_last(x)
    return [_image_empty(b, d, h, w, last, dtype=x.dtype, device=x.device),
            _proj_empty(b, k, proj.shape[2], h, w, last, dtype=proj.dtype, device=x.device), *params]


def _setup_context(ctx, inputs, output):
    kept = output[1:]
    ctx.mark_non_differentiable(*kept)
    ctx.save_for_backward(*inputs[:6], inputs[7], *kept)
    ctx.route = inputs[6]


def _backward(ctx, grad, *_kept_grads):
    x, proj, dt_weight, dt_bias, A, Ds, order, *kept = ctx.saved_tensors
    return (*ss2d_bwd(grad, x, proj, dt_weight, dt_bias, A, Ds, ctx.route, order, *kept), None, None, None)


ss2d_fwd.register_autograd(_backward, setup_context=_setup_context)


def ss2d_core_packed_triton(x, proj, dt_weight, dt_bias, A, Ds, route="cross"):
    """Fused SS2D core; same contract as ``ss2d.ss2d_core_packed``: a route name, or an index map (K, H*W) /
    (b, K, H*W) such as a quadtree model's per-sample order."""
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in (x, proj, dt_weight, dt_bias, A, Ds))
    if isinstance(route, torch.Tensor):
        return ss2d_fwd(x, proj, dt_weight, dt_bias, A, Ds, "", route, keep)[0]
    # a named route's index maps are resolved (and cached) inside the op, so torch.compile never traces them
    return ss2d_fwd(x, proj, dt_weight, dt_bias, A, Ds, route, None, keep)[0]


def ss2d_core_triton(x, dt_low, B, C, dt_weight, dt_bias, A, Ds, route="cross"):
    """Fused SS2D core; same contract as ``ss2d_core_reference`` (shapes in ``kernels/ss2d.py``). The three
    projections are stacked into one tensor first (one copy, R+2N channels a direction)."""
    return ss2d_core_packed_triton(x, torch.cat([dt_low, B, C], 2), dt_weight, dt_bias, A, Ds, route)
