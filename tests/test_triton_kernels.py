"""Triton scan kernels vs the PyTorch references (issue 3).

On CPU the kernels run under Triton's interpreter. TRITON_INTERPRET must be set before *triton* is imported:
``triton.jit`` picks the interpreter at decoration time, and triton's own standard library (tl.sum, ...) is
decorated when triton is first imported. So it is set here at import; if another test module imported triton
first (compiled mode), the CPU tests here are skipped in-process and run instead in a fresh interpreter
subprocess by ``test_cpu_suite_in_fresh_process``. On a CUDA machine the CPU tests are skipped and the ``gpu``
tests run compiled kernels at real sizes.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

_PREIMPORTED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from vm_unet.kernels import routes  # noqa: E402
from vm_unet.kernels.norm_gate import norm_gate, norm_gate_reference  # noqa: E402
from vm_unet.kernels.selective_scan import selective_scan_fn  # noqa: E402
from vm_unet.kernels.selective_scan_torch import selective_scan_torch  # noqa: E402
from vm_unet.kernels.ss2d import ss2d_core, ss2d_core_reference  # noqa: E402
from vm_unet.kernels.triton_scan_core import _sigmoid, _softplus  # noqa: E402
from vm_unet.kernels.triton_selective_scan import selective_scan_triton  # noqa: E402
from vm_unet.kernels.triton_ss2d import ss2d_core_packed_triton, ss2d_core_triton  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
STALE = INTERPRET and _PREIMPORTED  # triton was imported compiled before us: interpreter unusable in-process

cpu_only = pytest.mark.skipif(not INTERPRET or STALE,
                              reason="CPU interpreter tests (CUDA present, or triton imported compiled earlier: "
                                     "see test_cpu_suite_in_fresh_process)")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SCAN_NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
SS2D_NAMES = ["x", "dt_low", "B", "C", "dt_weight", "dt_bias", "A", "Ds"]


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("VM_UNET_BACKEND", "triton")


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def scan_inputs(b, dm, L, N, groups, dtype, device="cpu", z=True, D=True, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0, shift=0.0):
        return (torch.randn(*s, generator=g) * scale + shift).to(device)
    bc = (b, groups, N, L) if groups else (b, N, L)
    return [r(b, dm, L).to(dtype), r(b, dm, L, scale=0.5, shift=-1.0).to(dtype),
            -(torch.rand(dm, N, generator=g) * 2 + 0.1).to(device), r(*bc).to(dtype), r(*bc).to(dtype),
            r(dm) if D else None, r(b, dm, L).to(dtype) if z else None, r(dm, scale=0.3) if bias else None]


def ss2d_inputs(b, d, h, w, r, N, dtype, k=4, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)

    def rn(*s, scale=1.0, shift=0.0):
        return (torch.randn(*s, generator=g) * scale + shift).to(device)
    return [rn(b, d, h, w).to(dtype), rn(b, k, r, h, w, scale=0.5).to(dtype), rn(b, k, N, h, w).to(dtype),
            rn(b, k, N, h, w).to(dtype), rn(k, d, r, scale=0.5), rn(k, d, scale=0.5, shift=-1.0),
            -(torch.rand(k * d, N, generator=g) * 2 + 0.1).to(device), rn(k * d)]


def channels_last(args):
    """SS2D inputs laid out as the VM-UNet block makes them: x channels last, dt_low/B/C slices of one (b, H, W, K, c)
    projection (``vmamba.SSMCore.forward_core``); same values and shapes."""
    x, low, B, C, *rest = args
    r, n = low.shape[2], B.shape[2]
    proj = torch.cat([low, B, C], 2).permute(0, 3, 4, 1, 2).contiguous().permute(0, 3, 4, 1, 2)
    return [x.contiguous(memory_format=torch.channels_last), proj[:, :, :r], proj[:, :, r:r + n], proj[:, :, r + n:],
            *rest]


def stacked_proj(low, B, C):
    """dt_low, B, C stacked into the ops' projection (b, K, R+2N, H, W), laid out like them: (b, H, W, K, c) where
    their c axis is innermost (the channels-last block's), else contiguous."""
    proj = torch.cat([low, B, C], 2)
    if low.stride(2) == 1 and low.shape[2] > 1:
        proj = proj.permute(0, 3, 4, 1, 2).contiguous().permute(0, 3, 4, 1, 2)
    return proj


def grads(out, inputs, g):
    live = [t for t in inputs if t is not None]
    return list(torch.autograd.grad(out, live, g))


def compare_scan(args, softplus, tol, ref_dtype=torch.float64):
    """Triton (inputs as given) vs the PyTorch reference on the same values in ref_dtype: out, last state, grads."""
    tri = [t.detach().clone().requires_grad_(True) if t is not None else None for t in args]
    ref = [t.detach().to(ref_dtype).requires_grad_(True) if t is not None else None for t in args]
    out, last = selective_scan_triton(*tri, delta_softplus=softplus, return_last_state=True)
    out_r, last_r = selective_scan_torch(*ref, delta_softplus=softplus, return_last_state=True)
    assert out.dtype == args[0].dtype and out.shape == args[0].shape
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    errs = {"out": rel(out, out_r), "last": rel(last, last_r)}
    names = [n for n, t in zip(SCAN_NAMES, args) if t is not None]
    for n, a, b in zip(names, grads(out, tri, g.to(out.dtype)), grads(out_r, ref, g.to(ref_dtype))):
        assert a.shape == b.shape, n
        errs["d" + n] = rel(a, b)
    bad = {k: v for k, v in errs.items() if not v <= tol}  # `not <=` also catches NaN
    assert not bad, f"rel errors over {tol}: {bad}"


def compare_ss2d(args, route, tol, ref_dtype=torch.float64, monkeypatch=None, expanded_grad=False):
    """``expanded_grad``: the output's gradient one value broadcast (all strides 0), as ``y.sum().backward()``
    gives it, instead of random values. Clone keeps the strides (channels-last inputs stay channels last).
    The Triton side runs as the models call it (``ss2d_core_packed_triton``): dt_low, B and C stacked into one
    projection in their layout, its gradient split for the comparison."""
    tri = [t.detach().clone().requires_grad_(True) for t in (args[0], *args[4:])]
    proj = stacked_proj(*(t.detach() for t in args[1:4])).requires_grad_(True)
    ref = [t.detach().to(ref_dtype).requires_grad_(True) for t in args]
    y = ss2d_core_packed_triton(tri[0], proj, *tri[1:], route=route)
    monkeypatch.setenv("VM_UNET_BACKEND", "torch")
    y_r = ss2d_core_reference(*ref, route=route)
    monkeypatch.setenv("VM_UNET_BACKEND", "triton")
    assert y.dtype == args[0].dtype and y.shape == args[0].shape
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device)
    if expanded_grad:
        g = torch.ones((), device=y.device).expand(y.shape)
    errs = {"y": rel(y, y_r)}
    dx, dproj, *dparams = grads(y, [tri[0], proj, *tri[1:]], g.to(y.dtype))
    got = [dx, *torch.split(dproj, [t.shape[2] for t in args[1:4]], 2), *dparams]
    for n, a, b in zip(SS2D_NAMES, got, grads(y_r, ref, g.to(ref_dtype))):
        assert a.shape == b.shape, n
        errs["d" + n] = rel(a, b)
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"rel errors over {tol}: {bad}"


def forward_layouts(monkeypatch) -> list:
    """Records whether each forward-kernel launch (``scan_forward``) from now on runs channels last, in order."""
    from vm_unet.kernels import triton_scan_core as core
    layouts: list = []
    run = core.scan_forward
    monkeypatch.setattr(core, "scan_forward",
                        lambda *a, **kw: layouts.append(a[3].get("FEATURE_LAST")) or run(*a, **kw))
    return layouts


def backward_launches(monkeypatch) -> list:
    """Records (DH_ONLY, the segments L is cut into) of each backward-kernel launch from now on, in order."""
    from vm_unet.kernels import triton_scan_core as core
    launches: list = []
    kernel = core._scan_bwd_kernel

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((kwargs["DH_ONLY"], args[-3]))   # the arguments end NSEG, CPS, SEG0
                return kernel[grid](*args, **kwargs)
            return launch
    monkeypatch.setattr(core, "_scan_bwd_kernel", Recorder())
    return launches


# ---------------------------------------------------------------- CPU (interpreter), tiny shapes

_ELEMENTWISE_X = torch.cat([torch.tensor([-200.0, -100.0, -87.0, -30.0, -1e-3, -1e-8, 0.0, 1e-8, 1e-3, 30.0, 100.0]),
                            torch.linspace(-20, 20, 245)])


@triton.jit
def _elementwise_kernel(x_ptr, sp_ptr, sg_ptr, n, BLOCK: tl.constexpr, FAST: tl.constexpr):
    i = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < n, other=0.0)
    tl.store(sp_ptr + i, _softplus(x, FAST), mask=i < n)
    tl.store(sg_ptr + i, _sigmoid(x, FAST), mask=i < n)


def _elementwise_helpers(fast: bool, device: str):
    """Our softplus (polynomial log1p) and sigmoid helpers as the kernels run them, on _ELEMENTWISE_X."""
    x = _ELEMENTWISE_X.to(device)
    sp, sg = torch.empty_like(x), torch.empty_like(x)
    _elementwise_kernel[(1,)](x, sp, sg, x.numel(), BLOCK=triton.next_power_of_2(x.numel()), FAST=fast)
    return x.double().cpu(), sp.double().cpu(), sg.double().cpu()


def _check_elementwise(x, sp, sg):
    ref_sp, ref_sg = torch.nn.functional.softplus(x), torch.sigmoid(x)
    # relative to the value, with an absolute floor below fp32's normal range (fast exp flushes subnormals). exp(x)
    # as exp2(x log2 e) in fp32 (tl.exp does the same) has about |x| * 2^-24 relative error, 1.8e-6 at |x| = 30
    for name, got, ref in (("softplus", sp, ref_sp), ("sigmoid", sg, ref_sg)):
        err = ((got - ref).abs() / ref.abs().clamp_min(1e-30)).where(ref.abs() > 1e-37, (got - ref).abs())
        err = err / (1 + x.abs() / 8)
        assert err.max() <= 1e-6, (name, x[err.argmax()].item(), got[err.argmax()].item(), ref[err.argmax()].item())


@cpu_only
def test_softplus_and_sigmoid_helpers():
    _check_elementwise(*_elementwise_helpers(fast=False, device="cpu"))


@cpu_only
@pytest.mark.parametrize("N,groups,dtype,L", [
    (16, 0, torch.float32, 37),     # ungrouped, L not a multiple of any block
    (1, 2, torch.float32, 21),      # grouped, N=1
    (16, 2, torch.bfloat16, 19),    # bf16 inputs, fp32 state
    (5, 0, torch.float16, 9),       # N not a power of two, fp16
])
def test_scan_matches_reference(N, groups, dtype, L):
    args = scan_inputs(2, 4, L, N, groups, dtype)
    compare_scan(args, softplus=True, tol=1e-5 if dtype == torch.float32 else 2e-2)


@cpu_only
def test_scan_without_optionals_and_long_chunks():
    # no D / z / bias / softplus; L spans several chunks; N=64 takes the slow-but-correct path
    args = scan_inputs(1, 3, 70, 64, 0, torch.float32, z=False, D=False, bias=False)
    args[1] = args[1].abs() * 0.3  # without softplus Δ must stay positive for a stable decay
    compare_scan(args, softplus=False, tol=1e-5)


@cpu_only
def test_selective_scan_fn_dispatches_to_triton(monkeypatch):
    args = scan_inputs(1, 2, 8, 4, 0, torch.float32)
    out = selective_scan_fn(*args, delta_softplus=True)
    monkeypatch.setenv("VM_UNET_BACKEND", "torch")
    assert rel(out, selective_scan_fn(*args, delta_softplus=True)) < 1e-5


@cpu_only
@pytest.mark.parametrize("layout", ["channel_first", "channels_last"])
@pytest.mark.parametrize("b,d,h,w,r,N,dtype", [
    (2, 5, 3, 7, 3, 16, torch.float32),    # odd H/W, D not a multiple of the channel block
    (1, 4, 5, 5, 2, 1, torch.float32),     # N=1
    (1, 3, 3, 5, 2, 16, torch.bfloat16),   # bf16
])
def test_ss2d_matches_reference(b, d, h, w, r, N, dtype, layout, monkeypatch):
    args = ss2d_inputs(b, d, h, w, r, N, dtype)
    compare_ss2d(channels_last(args) if layout == "channels_last" else args, "cross",
                 1e-5 if dtype == torch.float32 else 2e-2, monkeypatch=monkeypatch)


# the channels-last layout returns y, dx, dB, dC, d dt_low in the layout it was given (no copies around the kernels),
# and takes any other strides through a copy; the forward and backward agree with the reference there too
@cpu_only
def test_ss2d_channels_last_keeps_the_layout(monkeypatch):
    from vm_unet.kernels import triton_scan_core as core
    monkeypatch.setattr(core, "TILE_OVERRIDE", {"fwd": (2, 4, 1), "bwd": (2, 4, 1), "segments": 2})
    args = [t.requires_grad_(True) for t in channels_last(ss2d_inputs(2, 3, 4, 8, 2, 4, torch.float32))]
    y = ss2d_core_triton(*args)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    dx, dlow, dB, dC = torch.autograd.grad(y, args[:4], torch.randn_like(y))
    assert dx.is_contiguous(memory_format=torch.channels_last)
    for t in (dlow, dB, dC):   # channels (of each direction) innermost, positions flat
        assert t.stride(2) == 1 and t.stride(3) == t.shape[4] * t.stride(4)
    x, low, B, C, *rest = args
    mixed = [x, low.detach().contiguous(), B.detach(), C.detach().transpose(-1, -2).contiguous().transpose(-1, -2)]
    compare_ss2d([*mixed, *rest], "cross", 1e-5, monkeypatch=monkeypatch)


# N=1 channels last at the GPU's tiles (one channel a lane, 32 channels a program, rows in registers): the training
# forward and the backward share BL=16, so the forward keeps the chunk-start states; the inference forward (BL=32)
# alone. 40 channels: one full block and one partial; odd H, W
@cpu_only
@pytest.mark.parametrize("grad", [True, False])
def test_ss2d_n1_channels_last_at_the_gpu_tiles(grad, monkeypatch):
    from vm_unet.kernels import triton_scan_core as core
    from vm_unet.kernels import triton_ss2d
    tiles = {"fwd": (32, 16 if grad else 32, 1), "bwd": (32, 16, 1), "segments": 1}
    monkeypatch.setattr(core, "TILE_OVERRIDE", tiles)
    args = channels_last(ss2d_inputs(1, 40, 5, 7, 2, 1, torch.float32))
    if grad:
        assert triton_ss2d._kept_shapes(1, 4, 40, 35, 1, True, True)[0] != (0,)   # states kept: no states pass
        compare_ss2d(args, "cross", 1e-5, monkeypatch=monkeypatch)
    else:
        with torch.no_grad():
            y = ss2d_core_triton(*args)
            monkeypatch.setenv("VM_UNET_BACKEND", "torch")
            y_r = ss2d_core_reference(*[t.double() for t in args])
        assert y.is_contiguous(memory_format=torch.channels_last) and rel(y, y_r) <= 1e-5


# channel-first operands run the forward channels last when it keeps nothing for a backward: copied in (PyTorch's
# strided copies, or the tiled transposes from LAYOUT_OPTS' size on; dt_low/B/C slices of one projection, as the
# channel-first block makes them), y returned channels last. Without gradients always; in training at N=16
# (nothing kept at these sizes: the backward runs its own states pass, channel first), not at N=1 (its states kept)
@cpu_only
@pytest.mark.parametrize("min_numel", [1 << 30, 1])
@pytest.mark.parametrize("N,route", [(16, "cross"), (1, "cross"), (4, "per_sample")])
def test_ss2d_forward_runs_channel_first_operands_channels_last(min_numel, N, route, monkeypatch):
    from vm_unet.kernels import triton_ss2d
    monkeypatch.setitem(triton_ss2d.LAYOUT_OPTS, "triton_min_numel", min_numel)
    layouts = forward_layouts(monkeypatch)
    b, h, w, r = 2, 3, 5, 3
    x, low, B, C, *rest = ss2d_inputs(b, 5, h, w, r, N, torch.float32, k=4 if route == "cross" else 2)
    proj = torch.cat([low, B, C], 2)
    args = [x, proj[:, :, :r], proj[:, :, r:r + N], proj[:, :, r + N:], *rest]
    if route == "per_sample":
        g = torch.Generator().manual_seed(2)
        order = torch.stack([torch.randperm(h * w, generator=g) for _ in range(b)])
        route = torch.stack([order, order.flip(-1)], dim=1)
    with torch.no_grad():
        y = ss2d_core_triton(*args, route=route)
        monkeypatch.setenv("VM_UNET_BACKEND", "torch")
        y_r = ss2d_core_reference(*[t.double() for t in args], route=route)
        monkeypatch.setenv("VM_UNET_BACKEND", "triton")
    assert layouts == [True] and y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    assert rel(y, y_r) <= 1e-5
    compare_ss2d(args, route, 1e-5, monkeypatch=monkeypatch)   # forward, then the backward's states pass
    assert layouts[1:] == ([False] if N == 1 else [True, False])
    monkeypatch.setattr(triton_ss2d, "COPY_TO_CHANNELS_LAST", False)   # the channel-first kernels throughout
    with torch.no_grad():
        y = ss2d_core_triton(*args, route=route)
    assert rel(y, y_r) <= 1e-5 and y.is_contiguous()
    assert layouts[-1] is False


# the layout copies around the kernels as tiled Triton transposes (the default from 8 M elements on), forced here
@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["channel_first", "channels_last"])
def test_ss2d_with_tiled_layout_copies(dtype, layout, monkeypatch):
    from vm_unet.kernels import triton_ss2d
    monkeypatch.setitem(triton_ss2d.LAYOUT_OPTS, "triton_min_numel", 1)
    args = ss2d_inputs(2, 5, 3, 7, 3, 16, dtype)
    compare_ss2d(channels_last(args) if layout == "channels_last" else args, "cross",
                 1e-5 if dtype == torch.float32 else 2e-2, monkeypatch=monkeypatch)


# the output's gradient as y.sum().backward() gives it: one value, all strides 0. The backward's copy of it for the
# column-major directions was a view of that one value, read as a whole image; both layouts, copies by PyTorch and
# tiled
@cpu_only
@pytest.mark.parametrize("layout", ["channel_first", "channels_last"])
@pytest.mark.parametrize("min_numel", [1, 1 << 23])
def test_ss2d_broadcast_output_gradient(layout, min_numel, monkeypatch):
    from vm_unet.kernels import triton_ss2d
    monkeypatch.setitem(triton_ss2d.LAYOUT_OPTS, "triton_min_numel", min_numel)
    args = ss2d_inputs(2, 5, 3, 7, 3, 16, torch.float32)
    compare_ss2d(channels_last(args) if layout == "channels_last" else args, "cross", 1e-5,
                 monkeypatch=monkeypatch, expanded_grad=True)


# Δ materialised by one GEMM (the default from rank 12 and d_state 8 on) instead of the in-kernel low-rank product:
# forced on at the tiny shapes, odd H/W and D, fp32 and bf16, with L split into segments too
@cpu_only
@pytest.mark.parametrize("dtype,segments", [(torch.float32, 1), (torch.bfloat16, 1), (torch.float32, 3)])
def test_ss2d_materialised_delta_matches_reference(dtype, segments, monkeypatch):
    from vm_unet.kernels import triton_scan_core as core
    from vm_unet.kernels import triton_ss2d
    monkeypatch.setattr(triton_ss2d, "DELTA_OPTS", {"min_rank": 1, "min_state": 1, "channels_last_min_rank": 1})
    if segments > 1:
        monkeypatch.setattr(core, "TILE_OVERRIDE", {"fwd": (2, 4, 1), "bwd": (2, 4, 1), "segments": segments})
    compare_ss2d(ss2d_inputs(2, 5, 3, 7, 3, 16, dtype), "cross", 1e-5 if dtype == torch.float32 else 2e-2,
                 monkeypatch=monkeypatch)


# the gathered tiles built both ways (kernels/triton_scan_core._load_tile): the installed Triton picks one, the other
# must stay right for the Triton versions that pick it; the plain scan with z (gate loads, dz stores), SS2D with Δ from
# the low rank and read materialised
@cpu_only
@pytest.mark.parametrize("pos_last", [False, True])
def test_tiles_built_either_way_match_reference(pos_last, monkeypatch):
    from vm_unet.kernels import triton_scan_core as core
    from vm_unet.kernels import triton_ss2d
    monkeypatch.setattr(core, "POS_LAST", pos_last)
    compare_scan(scan_inputs(2, 4, 19, 16, 2, torch.float32), softplus=True, tol=1e-5)
    compare_ss2d(ss2d_inputs(2, 5, 3, 7, 3, 16, torch.float32), "cross", 1e-5, monkeypatch=monkeypatch)
    monkeypatch.setattr(triton_ss2d, "DELTA_OPTS", {"min_rank": 1, "min_state": 1, "channels_last_min_rank": 1})
    compare_ss2d(ss2d_inputs(1, 3, 5, 3, 2, 4, torch.float32), "cross", 1e-5, monkeypatch=monkeypatch)


# N=1: the forward keeps its chunk-start states (1/BL of x per direction) and the backward skips its states pass;
# with L in one segment and in three (the segments' ΣΔ kept too)
@cpu_only
@pytest.mark.parametrize("segments", [1, 3])
def test_ss2d_backward_uses_the_forward_states(segments, monkeypatch):
    from vm_unet.kernels import triton_scan_core as core
    monkeypatch.setattr(core, "TILE_OVERRIDE", {"fwd": (2, 16, 1), "bwd": (2, 16, 1), "segments": segments})
    calls = []
    real = core.scan_forward
    monkeypatch.setattr(core, "scan_forward", lambda *a, **kw: calls.append(kw.get("states")) or real(*a, **kw))
    compare_ss2d(ss2d_inputs(2, 3, 5, 7, 2, 1, torch.float32), "cross", 1e-5, monkeypatch=monkeypatch)
    assert len(calls) == 1 and calls[0] is not None     # the forward stored the states; no states pass
    calls.clear()
    compare_ss2d(ss2d_inputs(1, 3, 5, 7, 2, 4, torch.float32), "cross", 1e-5, monkeypatch=monkeypatch)
    assert len(calls) == 2 and calls[0] is None and calls[1] is not None   # N=4: states recomputed


# N=4 (chunk-start states too large to keep) with L split: the forward keeps its segment end states and ΣΔ, and the
# backward's states pass runs under the forward's plan from them, with no end-state pass of its own. It also sums
# the segments' dh carries, so the backward runs under the forward's segments, even where its own plan splits L
# differently, with no dh-carry pass; a backward that walks all of L stays whole
@cpu_only
@pytest.mark.parametrize("segments", [(3, 3), (3, 2), (2, 4), (3, 1)])
def test_ss2d_backward_reuses_the_forward_segment_ends(segments, monkeypatch):
    from vm_unet.kernels import triton_scan_core as core
    monkeypatch.setattr(core, "TILE_OVERRIDE", {"fwd": (2, 4, 1), "bwd": (2, 4, 1), "segments": segments})
    end_passes = []
    real = core._segment_buffers
    monkeypatch.setattr(core, "_segment_buffers", lambda dims, plan, dev: end_passes.append(plan.nseg) or
                        real(dims, plan, dev))
    layouts = forward_layouts(monkeypatch)
    backward = backward_launches(monkeypatch)
    compare_ss2d(ss2d_inputs(2, 3, 5, 7, 2, 4, torch.float32), "cross", 1e-5, monkeypatch=monkeypatch)
    assert end_passes == [segments[0]]      # the forward's; the backward's states pass reused them
    # the forward ran channels last (both layouts' plans cut L alike), the states pass channel first
    assert layouts == [True, False]
    assert backward == [(False, segments[0] if segments[1] > 1 else 1)]


# which layout a forward given channel-first operands runs in (``_runs_channels_last``), at the GPU's plans
def test_forward_layout_of_channel_first_operands(monkeypatch):
    from vm_unet.kernels import triton_scan_core as core
    from vm_unet.kernels import triton_ss2d
    from vm_unet.kernels.triton_ss2d import _runs_channels_last
    monkeypatch.setenv("TRITON_INTERPRET", "0")       # launch_plan's GPU tiles (only planned here, never launched)
    monkeypatch.setattr(core, "TILE_OVERRIDE", None)
    x = torch.empty(2, 192, 4, 4)                      # its layout and channels; L is passed
    L, rows = 256 * 256, 2 * 4
    nothing, states = ((0,),) * 3, ((1,), (0,), (0,))
    assert _runs_channels_last(x.contiguous(memory_format=torch.channels_last), 16, L, rows, states)  # x's own
    assert _runs_channels_last(x, 16, L, rows, nothing)
    assert not _runs_channels_last(x, 1, L, rows, states)            # chunk-start states for the backward
    ends = ((0,), (2, 4, 43, 192, 16), (2, 4, 43, 192))
    assert _runs_channels_last(x, 16, L, rows, ends)                 # N=16: the same plan in both layouts
    assert not _runs_channels_last(x, 2, L, rows, ends)              # N <= 2: channels-last tiles cut L otherwise
    monkeypatch.setattr(triton_ss2d, "COPY_TO_CHANNELS_LAST", False)
    assert not _runs_channels_last(x, 16, L, rows, nothing)


@cpu_only
def test_transpose_last2_matches_torch():
    from vm_unet.kernels.triton_transpose import transpose_last2
    g = torch.Generator().manual_seed(0)
    big = torch.randn(2, 3, 70, 65, generator=g)                 # several tiles each way, ragged edges
    assert torch.equal(transpose_last2(big), big.transpose(-1, -2))
    cl = torch.randn(2, 5, 6, 4, generator=g).permute(0, 3, 1, 2)  # channels innermost, as a (b, C, H, W) view
    assert torch.equal(transpose_last2(cl), cl.transpose(-1, -2))
    assert torch.equal(transpose_last2(big[0, 0]), big[0, 0].t())  # 2-D
    # into a strided slice of a larger output, with an add and a cast to bf16 on the store
    src, add = torch.randn(2, 2, 3, 5, 7, generator=g), torch.randn(2, 2, 3, 7, 5, generator=g)
    out = torch.zeros(2, 4, 3, 7, 5, dtype=torch.bfloat16)
    transpose_last2(src, out=out[:, 1::2], add=add)
    # (within one bf16 step: the interpreter's fp32 -> bf16 cast may round differently from torch's)
    assert torch.allclose(out[:, 1::2].float(), src.transpose(-1, -2) + add, rtol=2 ** -7, atol=0)
    assert not out[:, ::2].any()
    with pytest.raises(ValueError, match="shape"):
        transpose_last2(src, out=out[:, ::2].transpose(-1, -2))


# the SS2D layout copies, both ways: PyTorch's strided copies (small tensors) and the tiled Triton transposes
@cpu_only
@pytest.mark.parametrize("min_numel", [1 << 30, 1])
def test_ss2d_layout_helpers(min_numel, monkeypatch):
    from vm_unet.kernels import triton_ss2d
    from vm_unet.kernels.triton_ss2d import _merge_slots, _swap, _two_layouts
    monkeypatch.setitem(triton_ss2d.LAYOUT_OPTS, "triton_min_numel", min_numel)
    g = torch.Generator().manual_seed(0)
    b, d, h, w = 2, 3, 4, 5
    t = torch.randn(b, h, w, d, generator=g).permute(0, 3, 1, 2)    # a gradient from a channel-last norm
    t0, t1 = _two_layouts(t, h, w, (0, 1, 0, 1))
    assert t0.is_contiguous() and torch.equal(t0, t.reshape(b, d, h * w))
    assert torch.equal(t1, t.transpose(-1, -2).reshape(b, d, h * w))
    acc = torch.randn(2, b, d, h * w, generator=g)
    ref = acc[0].view(b, d, h, w) + acc[1].view(b, d, w, h).transpose(-1, -2)
    assert torch.allclose(_merge_slots(acc, h, w, torch.bfloat16).float(), ref, rtol=2 ** -7, atol=0)
    for lay in [(0, 1, 0, 1), (1, 1, 0), (0, 0, 0)]:
        x = torch.randn(b, len(lay), 3, h * w, generator=g)
        want = torch.stack([x[:, i].view(b, 3, h, w).transpose(-1, -2).reshape(b, 3, h * w) if f else x[:, i]
                            for i, f in enumerate(lay)], 1)
        maps = (None, None, None, torch.tensor(lay, dtype=torch.int32), lay)
        assert torch.equal(_swap(x, maps, h, w), want)
        # into channels 2..4 of a larger bf16 buffer, as the backward writes a gradient into d proj's slice
        big = torch.zeros(b, len(lay), 6, h * w, dtype=torch.bfloat16)
        _swap(x, maps, h, w, out=big[:, :, 2:5])
        assert torch.allclose(big[:, :, 2:5].float(), want, rtol=2 ** -7, atol=0)
        assert not big[:, :, :2].any() and not big[:, :, 5:].any()


# odd sizes; pieces with a remainder, exact, one piece, and the default (halved for a small grid); ranks under and
# over tl.dot's 16
@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lowrank_weight_grad_matches_reference(dtype):
    from vm_unet.kernels.triton_lowrank_grad import lowrank_weight_grad, lowrank_weight_grad_reference
    g = torch.Generator().manual_seed(0)
    for m, L, d, r, piece in [(3, 37, 5, 2, 8), (2, 48, 70, 6, 16), (1, 15, 3, 17, 32), (2, 300, 9, 6, None)]:
        ddt, low = torch.randn(m, d, L, generator=g).to(dtype), torch.randn(m, r, L, generator=g).to(dtype)
        ref = torch.einsum("mdl,mrl->mdr", ddt.double(), low.double())
        assert rel(lowrank_weight_grad_reference(ddt.transpose(1, 2), low.transpose(1, 2)), ref) < 1e-6
        # both layouts the op passes: positions fastest (channel first) and channels fastest (channels last)
        for a, b in [(ddt.transpose(1, 2), low.transpose(1, 2)),
                     (ddt.transpose(1, 2).contiguous(), low.transpose(1, 2).contiguous())]:
            out = lowrank_weight_grad(a, b, piece)
            assert out.dtype == torch.float32 and out.shape == (m, d, r)
            assert rel(out, ref) < 1e-6
    with pytest.raises(ValueError, match="do not pair"):
        lowrank_weight_grad(torch.zeros(1, 8, 4), torch.zeros(1, 9, 2))


def conv_weight_grads_float64(x, grad):
    """d weight (C, 1, 3, 3) and d bias (C,) of a 3x3 depthwise conv (padding 1), in float64 by autograd."""
    c = x.shape[1]
    w = torch.zeros(c, 1, 3, 3, dtype=torch.float64, device=x.device, requires_grad=True)
    b = torch.zeros(c, dtype=torch.float64, device=x.device, requires_grad=True)
    y = torch.nn.functional.conv2d(x.double(), w, b, padding=1, groups=c)
    return torch.autograd.grad(y, (w, b), grad.double())


# odd sizes; both layouts; pieces that end mid-row and mid-image, one channel, channel blocks with a remainder (70
# channels, 64 a block channels last), the default piece; the default tile (one a piece here) and a 16-position one
# (several tiles a piece, tiles spanning rows and images)
@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tile", [None, 16])
def test_depthwise3x3_weight_grad_matches_reference(dtype, tile, monkeypatch):
    from vm_unet.kernels import triton_depthwise_conv
    from vm_unet.kernels.triton_depthwise_conv import depthwise3x3_weight_grad
    if tile:
        monkeypatch.setattr(triton_depthwise_conv, "TILE", tile)
    g = torch.Generator().manual_seed(0)
    for (b, c, h, w), piece in [((2, 3, 5, 7), None), ((1, 2, 9, 4), 32), ((3, 5, 6, 11), 40), ((2, 1, 3, 2), 5),
                                ((2, 70, 5, 3), 20)]:
        x, grad = (torch.randn(b, c, h, w, generator=g).to(dtype) for _ in range(2))
        ref_w, ref_b = conv_weight_grads_float64(x, grad)
        for fmt in (torch.contiguous_format, torch.channels_last):
            dw, db = depthwise3x3_weight_grad(x.contiguous(memory_format=fmt), grad.contiguous(memory_format=fmt),
                                              piece)
            assert dw.dtype == db.dtype == torch.float32 and dw.shape == (c, 1, 3, 3) and db.shape == (c,)
            assert rel(dw, ref_w) < 1e-6 and rel(db, ref_b) < 1e-6, (b, c, h, w, piece, fmt)
    with pytest.raises(ValueError, match="one"):
        depthwise3x3_weight_grad(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 4))


# the blocks' conv: output and every gradient against F.conv2d, in both layouts, with and without a bias, from inputs
# of any strides (the blocks pass a permuted slice of in_proj's output); gradients in the parameters' strides and the
# input's gradient in the conv's layout; under autocast
@cpu_only
@pytest.mark.parametrize("last", [False, True])
def test_depthwise_conv2d_matches_conv2d(last, monkeypatch):
    from vm_unet.kernels import depthwise_conv
    from vm_unet.kernels.depthwise_conv import depthwise_conv2d
    monkeypatch.setattr(depthwise_conv, "EAGER_MIN_POSITIONS", 0)
    F = torch.nn.functional
    fmt = torch.channels_last if last else torch.contiguous_format
    g = torch.Generator().manual_seed(0)
    for bias_on in (True, False):
        conv = torch.nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=bias_on)
        x0 = torch.randn(2, 7, 5, 12, generator=g)[..., ::2].permute(0, 3, 1, 2).requires_grad_()   # (2, 6, 7, 5)
        params = [conv.weight] + ([conv.bias] if bias_on else [])
        y = depthwise_conv2d(x0, conv.weight, conv.bias, channels_last=last)
        assert y.is_contiguous(memory_format=fmt)
        gy = torch.randn(y.shape, generator=g)
        got = torch.autograd.grad(y, [x0, *params], gy)
        want = torch.autograd.grad(F.conv2d(x0, conv.weight, conv.bias, padding=1, groups=6), [x0, *params], gy)
        assert rel(y, F.conv2d(x0, conv.weight, conv.bias, padding=1, groups=6)) < 1e-6
        assert got[0].is_contiguous(memory_format=fmt)
        for a, b, p in zip(got, want, [x0, *params]):
            assert a.stride() == p.stride() or p is x0
            assert rel(a, b) < 1e-6
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y16 = depthwise_conv2d(x0, conv.weight, conv.bias, channels_last=last)
            ref16 = F.conv2d(x0, conv.weight, conv.bias, padding=1, groups=6)
        assert y16.dtype == ref16.dtype == torch.bfloat16 and rel(y16, ref16) < 1e-2
        dw16 = torch.autograd.grad(y16, conv.weight, gy.bfloat16())[0]
        assert dw16.dtype == torch.float32 and rel(dw16, want[1]) < 1e-2
    # without gradients, and for other kernel sizes, it is F.conv2d itself
    with torch.no_grad():
        plain = F.conv2d(x0, conv.weight, None, padding=1, groups=6)
        assert torch.equal(depthwise_conv2d(x0, conv.weight, None, channels_last=last), plain)
    w5 = torch.randn(6, 1, 5, 5, requires_grad=True)
    assert rel(depthwise_conv2d(x0, w5, None, channels_last=last), F.conv2d(x0, w5, None, padding=2, groups=6)) < 1e-6


# eager, the fused path from EAGER_MIN_POSITIONS positions a call (b·H·W), F.conv2d below
@cpu_only
def test_depthwise_conv2d_eager_threshold(monkeypatch):
    from vm_unet.kernels import depthwise_conv
    calls = []

    def spy(*args):
        calls.append(1)
        return torch.ops.vm_unet.depthwise3x3_conv(*args)
    monkeypatch.setattr(depthwise_conv, "depthwise3x3_conv", spy)
    monkeypatch.setattr(depthwise_conv, "EAGER_MIN_POSITIONS", 2 * 5 * 7)
    w = torch.randn(3, 1, 3, 3, requires_grad=True)
    for shape, fused in [((2, 3, 5, 7), True), ((2, 3, 5, 6), False), ((3, 3, 5, 7), True)]:
        calls.clear()
        x = torch.randn(shape)
        y = depthwise_conv.depthwise_conv2d(x, w, None)
        assert bool(calls) == fused and rel(y, torch.nn.functional.conv2d(x, w, None, padding=1, groups=3)) < 1e-6


# the gradient reaches the backward op already in the conv's layout: the copy is in the autograd formula, where
# torch.compile fuses it into the kernel that makes the gradient
@cpu_only
@pytest.mark.parametrize("last", [False, True])
def test_depthwise_conv_gradient_enters_the_op_in_its_layout(last, monkeypatch):
    from vm_unet.kernels import depthwise_conv
    monkeypatch.setattr(depthwise_conv, "EAGER_MIN_POSITIONS", 0)
    seen = []

    def spy(grad, x, weight, has_bias):
        seen.append((grad.stride(), x.stride()))
        return torch.ops.vm_unet.depthwise3x3_conv_bwd(grad, x, weight, has_bias)
    monkeypatch.setattr(depthwise_conv, "depthwise3x3_conv_bwd", spy)
    other = torch.contiguous_format if last else torch.channels_last
    x = torch.randn(2, 4, 5, 3, requires_grad=True)
    w = torch.randn(4, 1, 3, 3, requires_grad=True)
    y = depthwise_conv.depthwise_conv2d(x, w, None, channels_last=last)
    y.backward(torch.randn(y.shape).contiguous(memory_format=other))
    assert len(seen) == 1 and seen[0][0] == seen[0][1]


@cpu_only
def test_depthwise_conv_ops_pass_opcheck():
    from vm_unet.kernels import depthwise_conv  # noqa: F401 (registers the ops)
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(4, 1, 3, 3, generator=g, requires_grad=True), torch.randn(4, generator=g, requires_grad=True)
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 4, 5, 3, generator=g).contiguous(memory_format=fmt).requires_grad_()
        torch.library.opcheck(torch.ops.vm_unet.depthwise3x3_conv, (x, w, b))
        torch.library.opcheck(torch.ops.vm_unet.depthwise3x3_conv, (x, w, None))
        for has_bias in (True, False):
            grad = torch.randn(x.shape, generator=g)
            torch.library.opcheck(torch.ops.vm_unet.depthwise3x3_conv_bwd, (grad, x.detach(), w.detach(), has_bias))


# the backward's d dt_weight: cuBLAS below DW_TRITON_MIN_L positions, the Triton reduction from there
@cpu_only
def test_dt_weight_grad_either_side_of_the_threshold(monkeypatch):
    from vm_unet.kernels import triton_lowrank_grad, triton_ss2d
    calls = []

    def spy(*args):
        calls.append(1)
        return triton_lowrank_grad.lowrank_weight_grad(*args)
    monkeypatch.setattr(triton_ss2d, "lowrank_weight_grad", spy)
    monkeypatch.setattr(triton_ss2d, "DW_TRITON_MIN_L", 20)
    g = torch.Generator().manual_seed(0)
    for L, triton_used in [(19, False), (20, True), (45, True)]:
        ddt, low = torch.randn(3, 5, L, generator=g), torch.randn(3, 2, L, generator=g)
        ref = torch.einsum("mdl,mrl->mdr", ddt.double(), low.double())
        calls.clear()
        out = triton_ss2d._dt_weight_grad(ddt.transpose(1, 2), low.transpose(1, 2))
        assert out.dtype == torch.float32 and rel(out, ref) < 1e-6 and bool(calls) == triton_used


def test_delta_materialised_only_where_measured_faster():
    from vm_unet.kernels.triton_ss2d import _delta_operand
    # (rank, d_state, materialised channel first, materialised channels last)
    for r, n, *by_layout in [(6, 16, False, False), (12, 16, True, True), (48, 16, True, True),
                             (12, 1, False, False), (24, 1, False, True)]:
        W, lows = torch.randn(4, 8, r), torch.randn(2, 4, r, 10)
        for feature_last, materialised in zip((False, True), by_layout):
            src = lows.transpose(2, 3).contiguous().transpose(2, 3) if feature_last else lows
            args, flags = _delta_operand(src, W, n, feature_last)
            assert flags["LOWRANK"] is not materialised
            if materialised:   # Δ (b, K, D, L) = W_k @ low_k, in fp32; channels innermost when channels last
                ref = torch.einsum("kdr,bkrl->bkdl", W, lows)
                assert args[0].shape == (2, 4, 8, 10) and torch.allclose(args[0], ref, atol=1e-5)
                assert args[0].dtype == torch.float32 and args[1:5] == args[0].stride()
                assert (args[0].stride(2) == 1) is feature_last


# L split into segments (the two-pass scan used when few programs would walk all of L): forced segment counts
# with several channel blocks and chunks (BD=2, BL=4), segments of unequal length (L=9 -> 3 chunks), one segment
# per chunk, and more segments than chunks (clamped)
@cpu_only
@pytest.mark.parametrize("segments", [2, 3, 7])
def test_segmented_scan_matches_reference(segments, monkeypatch):
    from vm_unet.kernels import triton_scan_core as core
    monkeypatch.setattr(core, "TILE_OVERRIDE", {"fwd": (2, 4, 1), "bwd": (2, 4, 1), "segments": segments})
    compare_ss2d(ss2d_inputs(2, 3, 3, 5, 2, 4, torch.float32), "cross", 1e-5, monkeypatch=monkeypatch)
    # with a z gate the backward sums its own dh carries (DH_ONLY); without, its states pass does (DH_CARRY), here
    # from end states of its own
    for z in (True, False):
        backward = backward_launches(monkeypatch)
        compare_scan(scan_inputs(1, 6, 9, 4, 2, torch.float32, z=z), softplus=True, tol=1e-5)
        nseg = min(segments, 3)
        assert backward == ([(True, nseg)] if z else []) + [(False, nseg)]


def test_launch_plan_segments_only_when_the_grid_is_small(monkeypatch):
    from vm_unet.kernels import triton_scan_core as core
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(core, "TILE_OVERRIDE", None)
    big = core.launch_plan(16, 4096, 192, backward=False, rows=32 * 4 * 8)
    assert big.nseg == 1 and big.cps == big.nchunk
    long = core.launch_plan(16, 512 * 512, 192, backward=True, rows=1 * 4)
    assert long.nseg > 1 and long.nblk * long.nseg * 4 >= core.SEGMENT_OPTS["target_programs"]
    assert long.cps >= core.SEGMENT_OPTS["min_chunks"] and (long.nseg - 1) * long.cps < long.nchunk


# the kernels read the low-rank Δ factors as one tile where measured faster: N > 2 up to rank 8 (a chunk ahead), the
# N <= 2 channels-last tile up to rank 16 (where it is read); per rank elsewhere, and never for a materialised Δ
def test_lowrank_factors_as_one_tile_where_measured(monkeypatch):
    from vm_unet.kernels import triton_scan_core as core
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(core, "TILE_OVERRIDE", None)
    low, cl, gemm = dict(LOWRANK=True), dict(LOWRANK=True, FEATURE_LAST=True), dict(LOWRANK=False)

    def rp(n, r, flags, backward):
        plan = core.launch_plan(n, 4096, 192, backward, rows=128, feature_last=flags.get("FEATURE_LAST", False))
        return core._lowrank_tile(plan, r, flags), core._lowrank_ahead(plan)
    assert rp(16, 6, low, False) == (8, True) and rp(16, 6, low, True) == (8, True) and rp(16, 3, cl, True)[0] == 4
    assert rp(16, 12, low, False)[0] == 0 and rp(16, 6, gemm, True)[0] == 0
    assert rp(1, 6, cl, False)[0] == 8 and rp(1, 12, cl, True) == (16, False) and rp(1, 24, cl, False)[0] == 0
    assert rp(1, 6, low, False)[0] == 0 and rp(1, 6, low, True)[0] == 0


# both ways of reading the low-rank factors give the reference's outputs and gradients: one [RP, BL] tile (ranks past
# R masked: R=5 -> RP=8) or one load per rank (forced with LOWRANK_TILE_MAX 0), N=16 (both kernels read the tile a
# chunk ahead) and N=1 channels last (where each chunk runs), forward and backward, L in two segments
@cpu_only
@pytest.mark.parametrize("tile", [True, False])
@pytest.mark.parametrize("n,layout", [(16, "channel_first"), (1, "channels_last")])
def test_lowrank_factors_tile_or_per_rank(tile, n, layout, monkeypatch):
    from vm_unet.kernels import triton_scan_core as core
    monkeypatch.setattr(core, "TILE_OVERRIDE", {"fwd": (4, 4, 1), "bwd": (4, 4, 1), "segments": 2})
    taken = []
    real = core._lowrank_tile
    monkeypatch.setattr(core, "_lowrank_tile", lambda *a, **k: taken.append(real(*a, **k)) or taken[-1])
    if not tile:
        monkeypatch.setattr(core, "LOWRANK_TILE_MAX", {key: 0 for key in core.LOWRANK_TILE_MAX})
    args = ss2d_inputs(1, 6, 3, 5, 5, n, torch.float32)
    compare_ss2d(channels_last(args) if layout == "channels_last" else args, "cross", 1e-5, monkeypatch=monkeypatch)
    assert set(taken) == ({8} if tile else {0})


# the forward reads a chunk ahead (N > 1) under a register cap, the measured configuration; N=1 and the backward's
# tiles (whose states pass runs the forward kernel too) keep their loops uncapped; the interpreter takes no cap
def test_forward_loads_ahead_under_a_register_cap(monkeypatch):
    from vm_unet.kernels import triton_scan_core as core
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(core, "TILE_OVERRIDE", None)
    fwd = core.launch_plan(16, 4096, 192, backward=False, rows=128)
    assert core._prefetch(fwd) and fwd.launch_opts()["maxnreg"] == core.FWD_MAXNREG
    bwd = core.launch_plan(16, 4096, 192, backward=True, rows=128)
    assert core._prefetch(bwd) and "maxnreg" not in bwd.launch_opts()
    n1 = core.launch_plan(1, 4096, 192, backward=False, rows=128)
    assert not core._prefetch(n1) and "maxnreg" not in n1.launch_opts()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "maxnreg" not in core.launch_plan(16, 4096, 192, backward=False, rows=128).launch_opts()


# N <= 2 channels last: one channel a lane (32 a program), BL=32 for inference and BL=16 for the backward and for a
# forward whose states it keeps, so the two agree on the chunk-start states; channel first the (4, 64) tile
def test_launch_plan_n1_channels_last(monkeypatch):
    from vm_unet.kernels import triton_scan_core as core
    from vm_unet.kernels import triton_ss2d
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(core, "TILE_OVERRIDE", None)
    infer = core.launch_plan(1, 4096, 96, backward=False, rows=128, feature_last=True)
    train = core.launch_plan(1, 4096, 96, backward=False, rows=128, feature_last=True, for_backward=True)
    bwd = core.launch_plan(1, 4096, 96, backward=True, rows=128, feature_last=True)
    assert (infer.bd, infer.bl, infer.warps) == (32, 32, 1) and (bwd.bd, bwd.bl, bwd.warps) == (32, 16, 1)
    assert core.same_states_layout(train, bwd) and not core.same_states_layout(infer, bwd)
    assert core._unroll_rows(bwd) and not core._scatter(bwd)
    cf = core.launch_plan(1, 4096, 96, backward=True, rows=128)
    assert (cf.bd, cf.bl) == (4, 64)
    assert core.launch_plan(16, 4096, 96, backward=True, rows=128, feature_last=True) == core.launch_plan(
        16, 4096, 96, backward=True, rows=128)
    states, _, _ = triton_ss2d._kept_shapes(32, 4, 96, 4096, 1, True, True)
    assert states == (core.states_numel(32, 4, 96, train),)


# the backward's dB/dC channel sums by reduce-scatter (BD <= BL; the interpreter swaps lanes logically) and by
# tl.sum's butterfly (BD > BL), L in two segments (the other tests take the scatter at the interpreter's default tiles)
@cpu_only
@pytest.mark.parametrize("bwd_tile,scatter", [((4, 4, 1), True), ((8, 4, 1), False)])
def test_channel_sums_by_reduce_scatter_or_butterfly(bwd_tile, scatter, monkeypatch):
    from vm_unet.kernels import triton_scan_core as core
    taken = []
    real = core._scatter
    monkeypatch.setattr(core, "_scatter", lambda plan: taken.append(real(plan)) or taken[-1])
    monkeypatch.setattr(core, "TILE_OVERRIDE", {"fwd": (8, 4, 1), "bwd": bwd_tile, "segments": 2})
    compare_ss2d(ss2d_inputs(1, 6, 3, 5, 2, 16, torch.float32), "cross", 1e-5, monkeypatch=monkeypatch)
    assert taken and set(taken) == {scatter}


# on a GPU the lane exchanges assume the tile layout that tests/kernel_compile_check.py verifies: the N=16 default only
def test_reduce_scatter_only_on_the_verified_gpu_tile(monkeypatch):
    from vm_unet.kernels import triton_scan_core as core
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(core, "TILE_OVERRIDE", None)
    assert core._scatter(core.launch_plan(16, 4096, 192, backward=True, rows=128))
    assert core._scatter(core.launch_plan(12, 65536, 192, backward=True, rows=8))
    for n in (1, 2, 4, 8, 32, 64):
        assert not core._scatter(core.launch_plan(n, 4096, 192, backward=True, rows=128)), n
    monkeypatch.setattr(core, "TILE_OVERRIDE", {"bwd": (4, 8, 1)})
    assert not core._scatter(core.launch_plan(16, 4096, 192, backward=True, rows=128))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert core._scatter(core.launch_plan(16, 4096, 192, backward=True, rows=128))


# the backward's two forms of its row scans (unrolled over in-register rows, or tl.associative_scan) and of
# softplus' derivative (exp(pre - Δ), or the sigmoid of pre), each forced on for a tile that would not take it, L in
# two segments (so the dh carry between chunks and segments goes through both)
@cpu_only
@pytest.mark.parametrize("unroll,sig_from_delta", [(True, False), (False, True)])
def test_backward_scan_and_softplus_derivative_forms(unroll, sig_from_delta, monkeypatch):
    from vm_unet.kernels import triton_scan_core as core
    monkeypatch.setattr(core, "_unroll_rows", lambda plan: unroll)
    monkeypatch.setattr(core, "_sigmoid_from_delta", lambda plan, flags: sig_from_delta)
    monkeypatch.setattr(core, "TILE_OVERRIDE", {"fwd": (8, 4, 1), "bwd": (4, 4, 1), "segments": 2})
    compare_ss2d(ss2d_inputs(1, 6, 3, 5, 2, 16, torch.float32), "cross", 1e-5, monkeypatch=monkeypatch)


# softplus and its derivative where pre = Δ_low + δ_bias is far from 0 on either side (δ_bias from -12 to 12 across
# channels): the derivative from Δ, exp(pre - Δ), must stay accurate where Δ -> pre and where Δ -> exp(pre)
@cpu_only
@pytest.mark.parametrize("sig_from_delta", [True, False])
def test_softplus_derivative_far_from_zero(sig_from_delta, monkeypatch):
    from vm_unet.kernels import triton_scan_core as core
    monkeypatch.setattr(core, "_sigmoid_from_delta", lambda plan, flags: sig_from_delta)
    args = ss2d_inputs(1, 8, 3, 5, 2, 4, torch.float32)
    args[5] = torch.linspace(-12.0, 12.0, args[5].numel()).view_as(args[5])
    compare_ss2d(args, "cross", 1e-5, monkeypatch=monkeypatch)


# which form each GPU tile takes: unrolled scans where the rows sit in registers (N > 1 tiles fill a warp's lanes with
# states and channels); softplus' derivative from Δ except on the N <= 2 channel-first tile (BL=64, rows across lanes)
def test_backward_forms_by_tile(monkeypatch):
    from vm_unet.kernels import triton_scan_core as core
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(core, "TILE_OVERRIDE", None)
    for n, unroll, from_delta in ((16, True, True), (4, True, True), (64, True, True), (2, False, False),
                                  (1, False, False)):
        plan = core.launch_plan(n, 4096, 192, backward=True, rows=128)
        assert (core._unroll_rows(plan), core._sigmoid_from_delta(plan, {})) == (unroll, from_delta), n
    for n in (1, 2, 16):
        plan = core.launch_plan(n, 4096, 192, backward=True, rows=128, feature_last=True)
        assert core._sigmoid_from_delta(plan, {"FEATURE_LAST": True}), n


@routes.register_route("test_random_pair")
def _random_pair(h, w):
    # any permutation route works through the index map: two arbitrary orders, no kernel change
    g = torch.Generator().manual_seed(h * 1000 + w)
    return torch.stack([torch.randperm(h * w, generator=g), torch.randperm(h * w, generator=g)])


@cpu_only
def test_ss2d_generic_route(monkeypatch):
    compare_ss2d(ss2d_inputs(1, 3, 4, 5, 2, 4, torch.float32, k=2), "test_random_pair", 1e-5,
                 monkeypatch=monkeypatch)


@cpu_only
@pytest.mark.parametrize("segments", [1, 2])
def test_ss2d_per_sample_index_maps(segments, monkeypatch):
    """Data-dependent routes (quadtree) pass one map per batch element; the fused kernel reads each sample's own."""
    from vm_unet.kernels import triton_scan_core as core
    monkeypatch.setattr(core, "TILE_OVERRIDE", {"fwd": (2, 4, 1), "bwd": (2, 4, 1), "segments": segments})
    g = torch.Generator().manual_seed(3)
    b, h, w = 2, 3, 4
    order = torch.stack([torch.randperm(h * w, generator=g) for _ in range(b)])
    maps = torch.stack([order, order.flip(-1)], dim=1)                  # (b, 2, L), as QuadtreePlan builds it
    compare_ss2d(ss2d_inputs(b, 3, h, w, 2, 4, torch.float32, k=2), maps, 1e-5, monkeypatch=monkeypatch)
    compare_ss2d(ss2d_inputs(b, 3, h, w, 2, 4, torch.float32, k=2, seed=1), maps[0], 1e-5, monkeypatch=monkeypatch)


@cpu_only
def test_ss2d_core_dispatch_and_autocast():
    args = ss2d_inputs(1, 2, 3, 3, 2, 2, torch.float32)
    y = ss2d_core(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ac = ss2d_core(*args)
    assert y_ac.dtype == torch.float32  # fp32 inside: autocast does not downcast the op
    assert rel(y_ac, y) < 1e-6


@cpu_only
def test_custom_ops_trace_under_compile():
    args = ss2d_inputs(1, 2, 3, 3, 2, 2, torch.float32)
    for t in args:
        t.requires_grad_(True)
    eager = ss2d_core_triton(*args)
    compiled = torch.compile(lambda *a: ss2d_core_triton(*a), backend="aot_eager", fullgraph=True)
    out = compiled(*args)
    assert rel(out, eager) < 1e-6
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in args)
    s_args = [t.requires_grad_(True) if t is not None else None for t in scan_inputs(1, 2, 6, 2, 0, torch.float32)]
    fn = torch.compile(lambda *a: selective_scan_triton(*a, delta_softplus=True), backend="aot_eager",
                       fullgraph=True)
    fn(*s_args).sum().backward()
    assert s_args[0].grad is not None


# the kernels compute positions instead of loading the map: from the first two entries where every direction's map
# (in its read layout) is an arithmetic progression (the cross route channel first, bidirectional), else from each
# chunk's (first, step) where every chunk is one (the cross route channels last where the chunk length divides the
# column, zigzag rows of a width the chunk divides); not chunks across a turn, random maps or one-position images
def test_route_maps_affine_or_in_lines():
    from vm_unet.kernels.triton_ss2d import _route_plan_host, chunk_lines
    for route, h, w, bl, transpose, mode in (
            ("cross", 6, 5, 8, True, "affine"), ("cross", 8, 4, 4, False, "lines"),
            ("cross", 6, 4, 4, False, "gather"),
            ("cross", 1, 7, 4, False, "affine"), ("bidirectional", 6, 5, 4, False, "affine"),
            ("zigzag", 4, 8, 4, False, "lines"), ("zigzag", 6, 4, 8, True, "gather"), ("cross", 1, 1, 1, True, "gather")):
        packed, lay, got, m = _route_plan_host(route, h, w, transpose, bl, False)
        assert got == mode and m == h * w, (route, h, w, bl, transpose)
        k, L = len(lay), h * w
        maps = packed[:k * L].view(k, L).long()
        l = torch.arange(L)
        # what the kernels read where no launch gathers: the first two entries of each map, the flags, the lines
        short, lay2, got2, m2 = _route_plan_host(route, h, w, transpose, bl, False, True)
        assert (lay2, got2, m2) == (lay, mode, L if mode == "gather" else 2)
        assert torch.equal(short[:k * m2].view(k, m2), packed[:k * L].view(k, L)[:, :m2])
        assert torch.equal(short[k * m2:], packed[k * L:])
        if mode == "affine":   # what the kernels then compute: first position + step * l
            assert packed.numel() == k * L + k
            assert torch.equal(maps, maps[:, :1] + (maps[:, 1:2] - maps[:, :1]) * l)
        if mode == "lines":   # the chunk's first position + step * row, for every valid row
            lines = packed[k * L + k:].view(k, -1, 2).long()
            assert torch.equal(maps, lines[:, l // bl, 0] + lines[:, l // bl, 1] * (l % bl)), (route, h, w, bl)
    assert chunk_lines(torch.stack([torch.randperm(12), torch.arange(12)]), 4) is None


@cpu_only
def test_opcheck_fake_and_autograd_registration():
    from torch.library import opcheck
    args = ss2d_inputs(1, 2, 2, 3, 2, 2, torch.float32)
    from vm_unet.kernels.triton_ss2d import _route_plan
    lay = _route_plan("cross", 2, 3, "cpu", True, 4)[2]
    assert lay == (0, 1, 0, 1)  # column routes read the transposed copy (channel first)
    assert _route_plan("cross", 2, 3, "cpu", False, 4)[2] == (0, 0, 0, 0)
    empty = torch.empty(0)

    def packed(inputs):   # the ops' arguments: x, proj, parameters
        return [inputs[0], stacked_proj(*inputs[1:4]), *inputs[4:]]
    for inputs in (packed(args), packed(channels_last(args))):   # the fake impls give the real outputs' strides
        for keep in (True, False):               # channel first without a backward, run channels last inside
            opcheck(torch.ops.vm_unet.ss2d_fwd.default, (*inputs, "cross", None, keep),
                    test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
        opcheck(torch.ops.vm_unet.ss2d_bwd.default, (torch.randn_like(inputs[0]), *inputs, "cross", None, empty,
                                                     empty, empty), test_utils=("test_schema", "test_faketensor"))
    order = torch.stack([torch.randperm(6), torch.randperm(6)])[None]     # (b=1, K=2, L) per-sample map
    args2 = packed(ss2d_inputs(1, 2, 2, 3, 2, 2, torch.float32, k=2))
    opcheck(torch.ops.vm_unet.ss2d_fwd.default, (*args2, "", order, True),
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    args1 = packed(ss2d_inputs(1, 2, 2, 3, 2, 1, torch.float32))         # N=1: the forward keeps its states
    opcheck(torch.ops.vm_unet.ss2d_fwd.default, (*args1, "cross", None, True),
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    s = scan_inputs(1, 2, 5, 2, 0, torch.float32)
    opcheck(torch.ops.vm_unet.selective_scan_fwd.default, (*s, True),
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def norm_gate_inputs(b, d, h, w, dtype, device="cpu", seed=0):
    """y (b, D, H, W) channel-first; z the second half of a (b, H, W, 2D) tensor, as SS2D's gate is; LN affine."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.randn(b, d, h, w, generator=g) * 2 + 0.5).to(device, dtype)
    z = torch.randn(b, h, w, 2 * d, generator=g).to(device, dtype)[..., d:]
    return [y, z, (1 + 0.3 * torch.randn(d, generator=g)).to(device), (0.2 * torch.randn(d, generator=g)).to(device)]


def compare_norm_gate(args, tol, out_dtype=None):
    """Fused (inputs as given) vs the reference in float64: output and the grads of y, z, weight and bias."""
    from vm_unet.kernels.triton_norm_gate import norm_gate_triton
    tri = [t.detach().clone().requires_grad_(True) for t in args]
    ref = [t.detach().double().requires_grad_(True) for t in args]
    out = norm_gate_triton(*tri, 1e-5, out_dtype or torch.promote_types(args[0].dtype, args[1].dtype))
    out_r = norm_gate_reference(*ref, 1e-5)
    assert out.shape == out_r.shape and out.is_contiguous()
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    errs = {"out": rel(out, out_r)}
    for n, a, b in zip(["y", "z", "weight", "bias"], grads(out, tri, g.to(out.dtype)), grads(out_r, ref, g.double())):
        assert a.dtype == args[["y", "z", "weight", "bias"].index(n)].dtype
        errs[n] = rel(a, b)
    assert max(errs.values()) < tol, errs
    return out


@cpu_only
@pytest.mark.parametrize("b,d,h,w,dtype,tol", [(2, 12, 3, 5, torch.float32, 1e-5), (1, 20, 4, 4, torch.bfloat16, 2e-2),
                                               (2, 7, 1, 9, torch.float32, 1e-5), (2, 96, 5, 9, torch.float32, 1e-5)])
def test_norm_gate_matches_reference(b, d, h, w, dtype, tol):
    # odd channel counts (padded tiles), one-row images, several position blocks (96 channels: 32 positions each)
    compare_norm_gate(norm_gate_inputs(b, d, h, w, dtype), tol)


@cpu_only
def test_norm_gate_dispatch_autocast_and_bad_shapes(monkeypatch):
    args = norm_gate_inputs(1, 6, 3, 4, torch.float32)
    ref = norm_gate_reference(*args, 1e-5)
    assert rel(norm_gate(*args, 1e-5), ref) < 1e-6
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm_gate(*args, 1e-5)
    # under autocast the product comes out in the autocast dtype, the one out_proj casts the reference's fp32 to
    assert out.dtype == torch.bfloat16 and rel(out, ref) < 1e-2
    monkeypatch.setenv("VM_UNET_BACKEND", "torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert norm_gate(*args, 1e-5).dtype == torch.float32       # the reference's own dtype
    with pytest.raises(ValueError, match="needs z"):
        norm_gate(args[0], args[1][..., :5], *args[2:], 1e-5)


@cpu_only
def test_norm_gate_opcheck_and_compile():
    from torch.library import opcheck

    import vm_unet.kernels.triton_norm_gate  # noqa: F401 (registers the op; the test may run alone)
    args = norm_gate_inputs(2, 5, 3, 2, torch.float32)
    opcheck(torch.ops.vm_unet.norm_gate_fwd.default, (*args, 1e-5, torch.float32),
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    # under torch.compile the reference runs (inductor fuses it), with the same values
    fn = torch.compile(lambda *a: norm_gate(*a, 1e-5), backend="aot_eager", fullgraph=True)
    assert rel(fn(*args), norm_gate_reference(*args, 1e-5)) < 1e-6


def _graph_breaks(name: str, device: str, train: bool) -> list[str]:
    """Graph breaks torch.compile would make in a (tiny) model whose SS2D layers take the Triton path."""
    import vm_unet
    from conftest import TINY
    torch._dynamo.reset()
    model = vm_unet.create_model(name, **TINY).to(device).train(train)
    expl = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32, device=device))
    torch._dynamo.reset()
    return [str(r.reason) for r in expl.break_reasons]


# both families and both modes, two cases (the interpreter is slow)
ONE_GRAPH_CASES = [("vmunet_isic", False), ("vmunet_fast", True)]


@cpu_only
@pytest.mark.parametrize("name,train", ONE_GRAPH_CASES)
def test_compiled_model_is_one_graph(name, train, monkeypatch):
    # the backend dispatch inside every SS2D layer must trace: one graph for the whole model, so inductor fuses
    # across the custom ops (torch 2.11 broke the graph at a cached importlib lookup, once per layer)
    monkeypatch.setenv("VM_UNET_BACKEND", "triton")
    assert _graph_breaks(name, "cpu", train) == []


@gpu
@needs_cuda
@pytest.mark.parametrize("name,train", ONE_GRAPH_CASES + [("vmunet_isic", True), ("vmunet_fast", False)])
def test_gpu_compiled_model_is_one_graph(name, train):
    assert _graph_breaks(name, "cuda", train) == []


@pytest.mark.skipif(not STALE, reason="only when triton was imported before the interpreter could be enabled")
def test_cpu_suite_in_fresh_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


# ---------------------------------------------------------------- GPU, real sizes

@gpu
@needs_cuda
def test_gpu_softplus_and_sigmoid_helpers():
    # FAST: ex2.approx / rcp.approx through inline PTX, which the interpreter cannot run
    _check_elementwise(*_elementwise_helpers(fast=True, device="cuda"))


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
def test_gpu_scan_random_shapes(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        b = int(torch.randint(1, 4, (1,), generator=gen))
        groups = int(torch.randint(0, 3, (1,), generator=gen))
        dm = (groups or 1) * int(torch.randint(8, 96, (1,), generator=gen))
        L = int(torch.randint(100, 5000, (1,), generator=gen))
        N = [1, 4, 16, 64][int(torch.randint(0, 4, (1,), generator=gen))]
        args = scan_inputs(b, dm, L, N, groups, dtype, device="cuda", seed=L)
        compare_scan(args, softplus=True, tol=tol)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
def test_gpu_ss2d_random_shapes(dtype, tol, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    for N in (1, 16):
        b = int(torch.randint(1, 3, (1,), generator=gen))
        d = int(torch.randint(16, 200, (1,), generator=gen))
        h, w = (int(v) for v in torch.randint(5, 70, (2,), generator=gen))
        r = int(torch.randint(1, 13, (1,), generator=gen))
        compare_ss2d(ss2d_inputs(b, d, h, w, r, N, dtype, device="cuda", seed=h * w), "cross", tol,
                     monkeypatch=monkeypatch)
    # rank 24: Δ materialised by a GEMM (N=16), and the N=1 in-kernel product at the same rank
    for N in (1, 16):
        compare_ss2d(ss2d_inputs(2, 96, 17, 23, 24, N, dtype, device="cuda", seed=N), "cross", tol,
                     monkeypatch=monkeypatch)


# the weight gradient's tensor-core products in half precision (the interpreter widens them), long L in pieces
@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_lowrank_weight_grad_matches_reference(dtype):
    from vm_unet.kernels.triton_lowrank_grad import lowrank_weight_grad
    g = torch.Generator(device="cuda").manual_seed(0)
    for m, L, d, r in [(3, 20001, 200, 6), (2, 4099, 768, 24)]:
        ddt = torch.randn(m, d, L, device="cuda", generator=g).to(dtype).transpose(1, 2)
        low = torch.randn(m, L, r, device="cuda", generator=g).to(dtype)
        ref = torch.einsum("mld,mlr->mdr", ddt.double(), low.double())
        assert rel(lowrank_weight_grad(ddt, low), ref) < 1e-5


# below the Triton reduction's threshold, cuBLAS writes d dt_weight's products in fp32 from half inputs (rounded to
# bf16, each would be off by up to 2**-9), for the strides both layouts pass
@gpu
@needs_cuda
def test_gpu_dt_weight_grad_of_half_inputs_keeps_fp32_precision():
    from vm_unet.kernels.triton_ss2d import DW_TRITON_MIN_L, _dt_weight_grad
    g = torch.Generator(device="cuda").manual_seed(0)
    m, L, d, r = 128, 64, 1536, 48
    assert L < DW_TRITON_MIN_L
    for channels_last in (False, True):
        shape = (m, L, d) if channels_last else (m, d, L)
        ddt = torch.randn(*shape, device="cuda", generator=g).bfloat16()
        ddt = ddt if channels_last else ddt.transpose(1, 2)
        low = torch.randn(m, r, L, device="cuda", generator=g).bfloat16().transpose(1, 2)
        out = _dt_weight_grad(ddt, low)
        ref = torch.einsum("mld,mlr->mdr", ddt.double(), low.double())
        assert out.dtype == torch.float32 and rel(out, ref) < 1e-5


# compiled, at the blocks' sizes: batch 1 and a large image, and a batch of small ones, in both layouts
@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_depthwise3x3_weight_grad_matches_reference(dtype):
    from vm_unet.kernels.triton_depthwise_conv import depthwise3x3_weight_grad
    g = torch.Generator(device="cuda").manual_seed(0)
    for shape in [(1, 192, 301, 257), (32, 768, 16, 16), (3, 70, 33, 9)]:
        x, grad = (torch.randn(shape, device="cuda", generator=g).to(dtype) for _ in range(2))
        ref_w, ref_b = conv_weight_grads_float64(x, grad)
        for fmt in (torch.contiguous_format, torch.channels_last):
            dw, db = depthwise3x3_weight_grad(x.contiguous(memory_format=fmt), grad.contiguous(memory_format=fmt))
            assert rel(dw, ref_w) < 1e-5 and rel(db, ref_b) < 1e-5, (shape, fmt)


# captured in a CUDA graph, the layout copies of mid-sized tensors take the tiled transposes (LAYOUT_OPTS); the graph's
# replay gives what eager calls give, in training (channel-first backward, transposed slots) and without gradients
@gpu
@needs_cuda
def test_gpu_ss2d_in_a_captured_graph_matches_eager():
    from vm_unet.kernels import triton_ss2d
    sizes = (1 << 20) <= 4 * 192 * 48 * 48 < triton_ss2d.LAYOUT_OPTS["triton_min_numel"]
    assert sizes, "x must sit between the two thresholds"
    base = ss2d_inputs(4, 192, 48, 48, 6, 16, torch.bfloat16, device="cuda")
    g = torch.randn_like(base[0])

    def leaves():   # each run its own leaves: autograd nodes made on one stream are not reused on another
        return [t.detach().clone().requires_grad_(True) for t in base]

    def step(args):
        y = ss2d_core_triton(*args)
        return [y, *torch.autograd.grad(y, args, g)]

    def infer(args):
        with torch.no_grad():
            return [ss2d_core_triton(*args)]
    for fn in (step, infer):
        want = fn(leaves())
        args = leaves()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(args)                           # warm-up off the default stream, as CUDA graphs ask
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = fn(args)
        graph.replay()
        torch.cuda.synchronize()
        for a, b in zip(got, want):
            assert torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-2 * b.float().abs().max().item())


# Δ from half-precision dt_low (autocast): one tensor-core GEMM per direction, W split into hi + lo halves, fp32 out;
# odd D, L and R (rows of 13 halves are not 16-byte aligned), and the fp32 fallback for Δ of 2**31 elements or more
@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_delta_gemm_of_half_inputs_keeps_fp32_precision(dtype):
    from vm_unet.kernels import triton_ss2d
    g = torch.Generator().manual_seed(5)
    for b, k, d, r, L in [(3, 4, 37, 12, 33), (2, 2, 96, 24, 64), (1, 4, 50, 13, 7)]:
        W = (torch.randn(k, d, r, generator=g) * 0.3).cuda()
        lows = torch.randn(b, k, r, L, generator=g).to("cuda", dtype)
        delta = triton_ss2d._delta_gemm(W, lows)
        ref = torch.einsum("kdr,bkrl->bkdl", W.double(), lows.double())
        assert delta.dtype == torch.float32 and delta.shape == ref.shape
        assert rel(delta, ref) < 2e-5       # W rounded to half precision alone: about 2e-3
    assert triton_ss2d._half_gemm_fp32_out(lows, 2 ** 31 - 1)
    assert not triton_ss2d._half_gemm_fp32_out(lows, 2 ** 31)
    assert not triton_ss2d._half_gemm_fp32_out(lows.float(), 10)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_gpu_norm_gate_random_shapes(dtype, tol):
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        d = int(torch.randint(3, 1600, (1,), generator=g))   # up to stage 4's 1536 channels, odd sizes
        h, w = (int(v) for v in torch.randint(1, 40, (2,), generator=g))
        compare_norm_gate(norm_gate_inputs(2, d, h, w, dtype, device="cuda"), tol)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        args = norm_gate_inputs(2, 192, 16, 16, torch.bfloat16, device="cuda")
        assert norm_gate(*args, 1e-5).dtype == torch.bfloat16


@gpu
@needs_cuda
def test_gpu_long_sequence_no_nan():
    L = 262_144
    args = scan_inputs(1, 8, L, 16, 0, torch.bfloat16, device="cuda")
    tri = [t.requires_grad_(True) if t is not None else None for t in args]
    out = selective_scan_triton(*tri, delta_softplus=True)
    out.float().sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(t.grad).all() for t in tri if t is not None)
    # fused SS2D at 512² (about a thousand segments; the states pass sums their dh carries), gradients too
    x = [t.requires_grad_(True) for t in ss2d_inputs(1, 8, 512, 512, 2, 16, torch.float32, device="cuda")]
    y = ss2d_core_triton(*x)
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in x)
