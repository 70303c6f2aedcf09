"""Benchmark the Triton scan kernels at VM-UNet stage shapes (needs a CUDA GPU).

    python scripts/bench_kernels.py [--sweep] [--check] [--out results.json]
    python scripts/bench_kernels.py --against OTHER/kernels --shapes s1-256,s2-256 --no-table   # A/B
    python scripts/bench_kernels.py --against OTHER/kernels --gpu-time --against-states 16 --shapes s1-256 --no-table
    python scripts/bench_kernels.py --sweep --sweep-shapes s2-256 --sweep-states 16 --sweep-tiles 'fwd=8,16,1' --no-table

Per shape/dtype/N: fused SS2D core (ours) fwd and fwd+bwd; the unfused path (torch cross-scan + our Triton
selective scan + torch merge, i.e. ``ss2d_core_reference`` on the Triton backend); mamba_ssm's CUDA
``selective_scan_fn`` + torch cross-scan/merge when mamba_ssm is importable (optional). Times are medians of
``triton.testing.do_bench``; GB/s counts the ideal bytes of the fused op (inputs read once, output written once,
the atomic merge buffer not counted); "%copy" is that over a device-to-device copy measured in the same run.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

from vm_unet.kernels import triton_scan_core as core
from vm_unet.kernels import triton_ss2d
from vm_unet.kernels.ss2d import split_proj, ss2d_core_reference
from vm_unet.kernels.triton_selective_scan import selective_scan_triton

try:  # optional comparison, never a dependency
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as mamba_scan
except Exception:  # noqa: BLE001
    mamba_scan = None

# (name, batch, d_inner per direction, H=W, dt_rank); VM-UNet stages at 256² input: C = 96·2^i, d_inner = 2C
SHAPES = [
    ("s1-256", 32, 192, 64, 6), ("s2-256", 32, 384, 32, 12), ("s3-256", 32, 768, 16, 24),
    ("s4-256", 32, 1536, 8, 48), ("s1-1024", 8, 192, 256, 6), ("s1-2048", 2, 192, 512, 6),
    # the whole-model benchmark's batches at 1024² and 2048² (issue 7)
    ("s1-1024b2", 2, 192, 256, 6), ("s2-1024b2", 2, 384, 128, 12), ("s3-1024b2", 2, 768, 64, 24),
    ("s4-1024b2", 2, 1536, 32, 48), ("s1-2048b1", 1, 192, 512, 6), ("s2-2048b1", 1, 384, 256, 12),
    ("s3-2048b1", 1, 768, 128, 24), ("s4-2048b1", 1, 1536, 64, 48),
]


def named_shapes(names) -> list[tuple]:
    """The ``SHAPES`` rows named in ``names`` (a list, or "all"), in table order."""
    return list(SHAPES) if names == "all" else [s for s in SHAPES if s[0] in names]


def save(result: dict, path) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy (bytes read + written)."""
    src = torch.randn(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * 4 / ms / 1e6


def make_inputs(b, d, hw, r, n, dtype, k=4, requires_grad=False, channels_last=False):
    """Fused SS2D inputs as ``ss2d_core_packed`` takes them: x, proj (dt_low, B, C stacked), dt_weight, dt_bias, A,
    Ds. ``channels_last``: x channels last and proj with its c axis innermost, the layout the VM-UNet blocks give the
    core in inference and at N <= 2 (``kernels.ss2d.channels_last_is_faster``)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    dev = dict(device="cuda")

    def rnd(*shape, scale=1.0, shift=0.0, dt=dtype):
        return (torch.randn(*shape, generator=g, **dev) * scale + shift).to(dt)

    def image(c, scale=1.0):   # (b, k, c, H, W) in either layout
        if channels_last:
            return rnd(b, hw, hw, k, c, scale=scale).permute(0, 3, 4, 1, 2)
        return rnd(b, k, c, hw, hw, scale=scale)

    x = rnd(b, d, hw, hw)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    proj = image(r + 2 * n)
    with torch.no_grad():
        proj[:, :, :r] *= 0.5
    W = rnd(k, d, r, scale=r ** -0.5, dt=torch.float32)
    bias = torch.log(torch.expm1(torch.exp(torch.rand(k, d, generator=g, **dev) * (math.log(0.1) - math.log(1e-3))
                                           + math.log(1e-3))))  # mamba dt init
    A = -torch.arange(1, n + 1, dtype=torch.float32, **dev).repeat(k * d, 1)
    Ds = torch.ones(k * d, **dev)
    args = [x, proj, W, bias, A, Ds]
    if requires_grad:
        for t in args:
            t.requires_grad_(True)
    return args


def fused_entry(mod):
    """A ``triton_ss2d`` module's fused core on ``make_inputs``' arguments: its packed entry, as the models call it,
    or (a checkout from before it, for ``--against``) its three-tensor entry on proj's views."""
    if hasattr(mod, "ss2d_core_packed_triton"):
        return mod.ss2d_core_packed_triton

    def three_tensors(x, proj, W, bias, A, Ds):
        return mod.ss2d_core_triton(x, *split_proj(proj, W.shape[-1], A.shape[-1]), W, bias, A, Ds)
    return three_tensors


ss2d_fused = fused_entry(triton_ss2d)


def reference(x, proj, W, bias, A, Ds):
    """The unfused PyTorch core (route copies, ``selective_scan_fn``, merge) on ``make_inputs``' arguments."""
    return ss2d_core_reference(x, *split_proj(proj, W.shape[-1], A.shape[-1]), W, bias, A, Ds)


def fused_bytes(b, d, hw, r, n, dtype, k=4):
    es = torch.tensor([], dtype=dtype).element_size()
    L = hw * hw
    return es * (2 * b * d * L + b * k * (r + 2 * n) * L)  # read x, low, B, C; write y


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def time_fwd_bwd(fn, args):
    out = fn(*args)
    g = torch.randn_like(out)

    def step():
        for t in args:
            t.grad = None
        fn(*args).backward(g)
    return do_bench(step, warmup=25, rep=200, return_mode="median")


def time_published_cross(b, d, hw, dtype):
    """(fwd ms, fwd+bwd ms) of the published VMamba v0 cross-scan of x (b, D, H, W) into 4 direction copies and
    cross-merge of the 4 outputs, as torch ops (stack / transpose / flip), the part of issue 3's anchor that is
    not the scan."""
    L = hw * hw
    x = torch.randn(b, d, hw, hw, device="cuda", dtype=dtype, requires_grad=True)
    ys = torch.randn(b, 4, d, L, device="cuda", dtype=dtype, requires_grad=True)

    def cross():
        xs = torch.stack([x.view(b, d, L), x.transpose(2, 3).reshape(b, d, L)], dim=1)
        xs = torch.cat([xs, xs.flip(-1)], dim=1)                                    # (b, 4, D, L)
        y = ys[:, 0:2] + ys[:, 2:4].flip(-1)
        y = y[:, 0] + y[:, 1].view(b, d, hw, hw).transpose(2, 3).reshape(b, d, L)   # (b, D, L)
        return xs, y

    gx, gy = (torch.randn_like(t) for t in cross())
    fwd = do_bench(cross, warmup=25, rep=100, return_mode="median")
    fb = do_bench(lambda: torch.autograd.grad(cross(), (x, ys), (gx, gy)), warmup=25, rep=100,
                  return_mode="median")
    return fwd, fb


def bench_shape(name, b, d, hw, r, n, dtype, copy_gbs, with_ref, channels_last=False):
    row = {"shape": name, "batch": b, "D": d, "L": hw * hw, "R": r, "N": n, "dtype": str(dtype).split(".")[-1],
           "layout": "channels_last" if channels_last else "channel_first"}
    args = make_inputs(b, d, hw, r, n, dtype, channels_last=channels_last)
    ms = do_bench(lambda: ss2d_fused(*args), warmup=25, rep=200, return_mode="median")
    row["fused_fwd_ms"] = ms
    row["fused_fwd_GBs"] = fused_bytes(b, d, hw, r, n, dtype) / ms / 1e6
    row["fused_fwd_pct_copy"] = 100 * row["fused_fwd_GBs"] / copy_gbs
    gargs = make_inputs(b, d, hw, r, n, dtype, requires_grad=True, channels_last=channels_last)
    row["fused_fwdbwd_ms"] = time_fwd_bwd(ss2d_fused, gargs)
    if with_ref:
        os.environ["VM_UNET_BACKEND"] = "triton"  # unfused: torch route copies + our Triton scan + torch merge
        row["unfused_fwd_ms"] = do_bench(lambda: reference(*args), warmup=25, rep=100,
                                         return_mode="median")
        row["unfused_fwdbwd_ms"] = time_fwd_bwd(reference, gargs)
        # plain selective scan alone on pre-made direction copies
        k = 4
        L = hw * hw
        u = torch.randn(b, k * d, L, device="cuda").to(dtype)
        dl = torch.randn(b, k * d, L, device="cuda").to(dtype)
        Bs = torch.randn(b, k, n, L, device="cuda").to(dtype)
        Cs = torch.randn(b, k, n, L, device="cuda").to(dtype)
        A = args[4]
        Ds, bias = args[5], args[3].reshape(-1)
        row["scan_fwd_ms"] = do_bench(lambda: selective_scan_triton(u, dl, A, Bs, Cs, Ds, None, bias, True),
                                      warmup=25, rep=100, return_mode="median")
        if mamba_scan is not None:
            row["mamba_scan_fwd_ms"] = do_bench(lambda: mamba_scan(u, dl, A, Bs, Cs, Ds, None, bias, True),
                                                warmup=25, rep=100, return_mode="median")
            # issue 3's anchor, measured in this run: mamba_ssm's CUDA scan + the published torch cross-scan/merge
            margs = [t.detach().clone().requires_grad_(True) for t in (u, dl, A, Bs, Cs, Ds)]
            row["mamba_scan_fwdbwd_ms"] = time_fwd_bwd(
                lambda u_, dl_, A_, B_, C_, D_: mamba_scan(u_, dl_, A_, B_, C_, D_, None, bias, True), margs)
            cross_f, cross_fb = time_published_cross(b, d, hw, dtype)
            row["mamba_anchor_fwd_ms"] = row["mamba_scan_fwd_ms"] + cross_f
            row["mamba_anchor_fwdbwd_ms"] = row["mamba_scan_fwdbwd_ms"] + cross_fb
        os.environ["VM_UNET_BACKEND"] = "auto"
    del args, gargs
    torch.cuda.empty_cache()
    return row


def check(dtype, n, name, b, d, hw, r):
    """Fused SS2D vs the float64 PyTorch reference at a real shape (fwd and every gradient)."""
    args = make_inputs(b, d, hw, r, n, dtype, requires_grad=True)
    y = ss2d_fused(*args)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, args, g)
    os.environ["VM_UNET_BACKEND"] = "torch"
    ref_args = [t.detach().double().requires_grad_(True) for t in args]
    yr = reference(*ref_args)
    rgrads = torch.autograd.grad(yr, ref_args, g.double())
    os.environ["VM_UNET_BACKEND"] = "auto"
    errs = [rel(y, yr)] + [rel(a, c) for a, c in zip(grads, rgrads)]
    return {"check": name, "dtype": str(dtype).split(".")[-1], "N": n, "max_rel_err": max(errs),
            "errs": [f"{e:.1e}" for e in errs], "nan": any(torch.isnan(t).any().item() for t in (y, *grads))}


# tiles (BD, BL, warps) swept at stage-1 256² b32 by default: the forward's with the backward at its default, then
# the backward's with the forward at its default (the backward's states pass runs with the backward's tile)
SWEEP = {
    16: {"fwd": [(8, 8, 1), (16, 8, 1), (16, 4, 1), (32, 4, 1), (16, 16, 1)],
         "bwd": [(8, 8, 1), (8, 4, 1), (16, 4, 1), (16, 8, 1), (16, 2, 1), (4, 8, 1)]},
    1: {"fwd": [(4, 64, 1), (8, 64, 2), (32, 64, 1), (32, 16, 1)],
        "bwd": [(4, 64, 1), (8, 32, 1), (8, 64, 1), (32, 16, 1)]},
}


def parse_tiles(spec: str | None) -> dict:
    """``"fwd=16,8,1;fwd=8,16,1;bwd=8,4,1"`` -> {"fwd": [(16, 8, 1), (8, 16, 1)], "bwd": [(8, 4, 1)]}."""
    tiles: dict = {}
    for part in filter(None, (spec or "").split(";")):
        kind, _, cfg = part.partition("=")
        if kind not in ("fwd", "bwd") or not cfg:
            sys.exit(f"--sweep-tiles: expected fwd=BD,BL,WARPS or bwd=BD,BL,WARPS, got {part!r}")
        tiles.setdefault(kind, []).append(tuple(int(v) for v in cfg.split(",")))
    return tiles


def sweep(shape_names=("s1-256",), states=(16, 1), kinds=("fwd", "bwd"), extra=None, dtypes=(torch.float32,)):
    """Tile configs of the fused SS2D fwd and fwd+bwd per shape and input dtype, one segment; with the peak memory of
    fwd+bwd (the backward's chunk-start states take N/BL of x's size per direction). ``extra`` tiles are added to
    ``SWEEP``'s (``parse_tiles``)."""
    rows = []
    for name, b, d, hw, r in named_shapes(shape_names):
        for n, dtype in ((n, dt) for n in states for dt in dtypes):
            args = make_inputs(b, d, hw, r, n, dtype)
            gargs = make_inputs(b, d, hw, r, n, dtype, requires_grad=True)
            base = torch.cuda.memory_allocated()
            for kind in kinds:
                cfgs = list(dict.fromkeys(SWEEP.get(n, SWEEP[16])[kind] + (extra or {}).get(kind, [])))
                for cfg in cfgs:
                    core.TILE_OVERRIDE = {kind: cfg, "segments": 1}   # tiles alone, L not split
                    try:
                        f = do_bench(lambda: ss2d_fused(*args), warmup=10, rep=60, return_mode="median")
                        # what earlier configs' CUDA graphs still hold is not this config's peak
                        held = torch.cuda.memory_allocated() - base
                        torch.cuda.reset_peak_memory_stats()
                        fb = time_fwd_bwd(ss2d_fused, gargs)
                        peak = (torch.cuda.max_memory_allocated() - held) / 1e9
                        # replayed as a CUDA graph: the GPU's time alone (small stages are launch-bound in eager)
                        fg = do_bench_cudagraph(lambda: ss2d_fused(*args), rep=60, return_mode="median")
                    except Exception as e:  # noqa: BLE001 (a tile that does not compile is a result too)
                        f = fg = fb = peak = float("nan")
                        print("  failed", cfg, type(e).__name__, str(e)[:200])
                    dt = str(dtype).removeprefix("torch.")
                    rows.append({"shape": name, "N": n, "dtype": dt, "kind": kind, "cfg": cfg, "fwd_ms": f,
                                 "fwd_graph_ms": fg, "fwdbwd_ms": fb, "peak_gb": peak})
                    print(f"sweep {name} N={n:2d} {dt} {kind} {cfg}: fwd {f:.3f} ms (graph {fg:.3f})  fwd+bwd "
                          f"{fb:.3f} ms  peak {peak:.2f} GB", flush=True)
            del args, gargs
            torch.cuda.empty_cache()
    core.TILE_OVERRIDE = None
    return rows


def segments(shape_names, counts):
    """Fused SS2D fwd and fwd+bwd (N=16, fp32 and bf16) per forced segment count of L ("auto" = launch_plan)."""
    rows = []
    for name, b, d, hw, r in named_shapes(shape_names):
        for dtype in (torch.float32, torch.bfloat16):
            args = make_inputs(b, d, hw, r, 16, dtype)
            gargs = make_inputs(b, d, hw, r, 16, dtype, requires_grad=True)
            for nseg in counts:
                core.TILE_OVERRIDE = None if nseg == "auto" else {"segments": int(nseg)}
                f = do_bench(lambda: ss2d_fused(*args), warmup=10, rep=60, return_mode="median")
                fb = time_fwd_bwd(ss2d_fused, gargs)
                plans = [core.launch_plan(16, hw * hw, d, backward=bw, rows=b * 4) for bw in (False, True)]
                rows.append({"shape": name, "dtype": str(dtype).split(".")[-1], "segments": nseg,
                             "fwd_nseg": plans[0].nseg, "bwd_nseg": plans[1].nseg, "fwd_ms": f, "fwdbwd_ms": fb})
                print(f"segments {name} {rows[-1]['dtype']:8s} {nseg!s:>5} (fwd {plans[0].nseg}, bwd "
                      f"{plans[1].nseg}): fwd {f:.3f} ms  fwd+bwd {fb:.3f} ms", flush=True)
            del args, gargs
            torch.cuda.empty_cache()
    core.TILE_OVERRIDE = None
    return rows


def profile_ops(shape_name, n_state=16, dtype=torch.float32):
    """CUDA time per kernel of one fused SS2D fwd+bwd (torch.profiler), to see what besides the scan costs."""
    name, b, d, hw, r = next(s for s in SHAPES if s[0] == shape_name)
    gargs = make_inputs(b, d, hw, r, n_state, dtype, requires_grad=True)
    y = ss2d_fused(*gargs)
    g = torch.randn_like(y)
    for _ in range(3):
        ss2d_fused(*gargs).backward(g)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            ss2d_fused(*gargs).backward(g)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    print(f"profile {name} N={n_state} {dtype} (5 fwd+bwd)\n{table}", flush=True)
    return table


def load_kernels_copy(path: str):
    """Another checkout's ``kernels/`` folder as a package of its own, for ``--against``: copied to a temporary
    folder with its custom-op namespace renamed, so both versions' ops can be registered in one process."""
    src = pathlib.Path(path)
    if not (src / "triton_ss2d.py").is_file():
        sys.exit(f"--against: {path} has no triton_ss2d.py (give another checkout's kernels/ folder)")
    dst = pathlib.Path(tempfile.mkdtemp()) / "vm_unet_kernels_against"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    for f in dst.glob("*.py"):
        f.write_text(f.read_text().replace('"vm_unet::', '"vm_unet_against::'))
    sys.path.insert(0, str(dst.parent))
    return importlib.import_module("vm_unet_kernels_against.triton_ss2d")


def gpu_times(fn, reps=10) -> dict:
    """Device time per kernel name of one call of ``fn`` (torch.profiler, mean of ``reps`` after 3 warm-ups), ms:
    the GPU's own time, free of the host overheads that eager timings of the small stages carry."""
    cuda = torch.cuda.is_available()   # without it (the CPU test of the bookkeeping) no device time is recorded
    act = torch.profiler.ProfilerActivity
    for _ in range(3):
        fn()
    if cuda:
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=[act.CUDA if cuda else act.CPU]) as prof:
        for _ in range(reps):
            fn()
        if cuda:
            torch.cuda.synchronize()
    times: dict = {}
    for e in prof.key_averages():
        times[e.key] = times.get(e.key, 0.0) + e.self_device_time_total / reps / 1e3
    return times


def against(other, shape_names, states=(16, 1), reps=3, gpu_time=False):
    """Fused SS2D fwd and fwd+bwd of this checkout against another's, alternating the two ``reps`` times per case
    in one process (so clock drift hits both alike); medians. ``gpu_time``: device time from the profiler instead
    of wall time, with the backward and forward scan kernels' shares of the fwd+bwd."""
    rows = []
    for name, b, d, hw, r in named_shapes(shape_names):
        for n in states:
            for dtype in (torch.float32, torch.bfloat16):
                args = make_inputs(b, d, hw, r, n, dtype)
                gargs = make_inputs(b, d, hw, r, n, dtype, requires_grad=True)
                g = torch.randn_like(ss2d_fused(*args)) if gpu_time else None
                t = {"other": ([], [], [], []), "this": ([], [], [], [])}
                for _ in range(reps):
                    for tag, fn in (("other", fused_entry(other)), ("this", ss2d_fused)):
                        if gpu_time:
                            def step(fn=fn):
                                for x in gargs:
                                    x.grad = None
                                fn(*gargs).backward(g)
                            k = gpu_times(step)
                            t[tag][0].append(sum(gpu_times(lambda fn=fn: fn(*args)).values()))
                            t[tag][1].append(sum(k.values()))
                            t[tag][2].append(k.get("_scan_bwd_kernel", 0.0))
                            t[tag][3].append(k.get("_scan_fwd_kernel", 0.0))
                        else:
                            t[tag][0].append(do_bench(lambda: fn(*args), warmup=25, rep=150, return_mode="median"))
                            t[tag][1].append(time_fwd_bwd(fn, gargs))
                row = {"shape": name, "N": n, "dtype": str(dtype).split(".")[-1], "gpu_time": gpu_time}
                for tag, (f, fb, kb, kf) in t.items():
                    row[f"{tag}_fwd_ms"], row[f"{tag}_fwdbwd_ms"] = statistics.median(f), statistics.median(fb)
                    row[f"{tag}_fwdbwd_range"] = (min(fb), max(fb))
                    if gpu_time:
                        row[f"{tag}_bwd_kernel_ms"], row[f"{tag}_fwd_kernels_ms"] = statistics.median(kb), \
                            statistics.median(kf)
                rows.append(row)
                kernels = (f" (backward kernel {row['other_bwd_kernel_ms']:.3f} -> {row['this_bwd_kernel_ms']:.3f})"
                           if gpu_time else "")
                print(f"against {name} N={n:2d} {row['dtype']:8s} fwd {row['other_fwd_ms']:.3f} -> "
                      f"{row['this_fwd_ms']:.3f} ms  fwd+bwd {row['other_fwdbwd_ms']:.3f} -> {row['this_fwdbwd_ms']:.3f}"
                      f" ms (this: {min(t['this'][1]):.3f}-{max(t['this'][1]):.3f}){kernels}", flush=True)
                del args, gargs
                torch.cuda.empty_cache()
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sweep", action="store_true", help="time tile configs first (at --sweep-shapes)")
    p.add_argument("--sweep-shapes", default="s1-256", help="comma list of shape names for --sweep")
    p.add_argument("--sweep-states", default="16,1", help="comma list of d_state N for --sweep")
    p.add_argument("--sweep-kinds", default="fwd,bwd", help="which kernels' tiles --sweep varies")
    p.add_argument("--sweep-dtypes", default="float32", help="comma list of input dtypes for --sweep")
    p.add_argument("--sweep-tiles", default=None, metavar="SPEC",
                   help="more tiles for --sweep, e.g. 'fwd=8,16,1;bwd=8,4,2' (BD,BL,warps)")
    p.add_argument("--check", action="store_true", help="check fused SS2D vs float64 reference at real shapes")
    p.add_argument("--shapes", default="all", help="comma list of shape names or 'all'")
    p.add_argument("--segments", default=None, help="comma list of shapes: time forced segment counts of L there")
    p.add_argument("--counts", default="1,2,4,8,16,32,64,auto", help="segment counts for --segments")
    p.add_argument("--profile", default=None, help="a shape name: per-kernel CUDA times of fused fwd+bwd there")
    p.add_argument("--state", type=int, default=16, help="d_state N for --profile")
    p.add_argument("--against-states", default="16,1", help="comma list of d_state N for --against")
    p.add_argument("--against", default=None, metavar="DIR",
                   help="another checkout's kernels/ folder: interleaved A/B of fused SS2D at --shapes")
    p.add_argument("--gpu-time", action="store_true",
                   help="--against: device time from the profiler (with the scan kernels' shares), not wall time")
    p.add_argument("--no-table", action="store_true", help="skip the main table")
    p.add_argument("--channels-last", action="store_true",
                   help="main table with the inputs channels last (the blocks' layout in inference and at N <= 2)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    shape_names = "all" if a.shapes == "all" else a.shapes.split(",")
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA device")
    dev = torch.cuda.get_device_name()
    print(f"device {dev}, torch {torch.__version__}, triton {triton.__version__}, "
          f"mamba_ssm {'yes' if mamba_scan is not None else 'no'}", flush=True)
    copy_gbs = copy_bandwidth()
    print(f"device copy: {copy_gbs:.0f} GB/s", flush=True)
    result = {"device": dev, "copy_GBs": copy_gbs, "date": time.strftime("%Y-%m-%d"), "argv": sys.argv}
    if a.check:
        result["checks"] = []
        for dtype in (torch.float32, torch.bfloat16):
            for n in (16, 1):
                c = check(dtype, n, "s1-256-b2", 2, 192, 64, 6)
                result["checks"].append(c)
                print("check", c, flush=True)
    if a.sweep:
        result["sweep"] = sweep(a.sweep_shapes.split(","), tuple(int(v) for v in a.sweep_states.split(",")),
                                tuple(a.sweep_kinds.split(",")), parse_tiles(a.sweep_tiles),
                                tuple(getattr(torch, v) for v in a.sweep_dtypes.split(",")))
    if a.profile:
        result["profile"] = profile_ops(a.profile, a.state)
    if a.against:
        result["against"] = against(load_kernels_copy(a.against), shape_names,
                                     tuple(int(v) for v in a.against_states.split(",")), gpu_time=a.gpu_time)
    if a.segments:
        result["segments"] = segments(a.segments.split(","), a.counts.split(","))
        save(result, a.out)          # kept if the table below fails
    rows = []
    if a.no_table:
        save(result, a.out)
        return
    for name, b, d, hw, r in named_shapes(shape_names):
        for n in (16, 1):
            for dtype in (torch.float32, torch.bfloat16):
                row = bench_shape(name, b, d, hw, r, n, dtype, copy_gbs, with_ref=name.endswith("-256"),
                                  channels_last=a.channels_last)
                rows.append(row)
                print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}),
                      flush=True)
    result["rows"] = rows
    save(result, a.out)
    print("\n" + main_table(rows))


def main_table(rows: list[dict]) -> str:
    """The main table as markdown; a column a row has no timing for (no reference at that shape, mamba_ssm not
    installed) shows a dash."""
    def ms(row, key):
        return f"{row[key]:.3f}" if key in row else "–"

    def anchor(row, key, ours):
        return f"{row[key]:.3f} ({row[key] / row[ours]:.2f}x)" if key in row else "–"
    lines = ["| shape | N | dtype | fused fwd ms | GB/s | %copy | fused fwd+bwd ms | unfused fwd | unfused fwd+bwd "
             "| mamba anchor fwd (x ours) | mamba anchor fwd+bwd (x ours) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} b{r['batch']} | {r['N']} | {r['dtype']} | {r['fused_fwd_ms']:.3f} | "
                     f"{r['fused_fwd_GBs']:.0f} | {r['fused_fwd_pct_copy']:.0f}% | {r['fused_fwdbwd_ms']:.3f} | "
                     f"{ms(r, 'unfused_fwd_ms')} | {ms(r, 'unfused_fwdbwd_ms')} | "
                     f"{anchor(r, 'mamba_anchor_fwd_ms', 'fused_fwd_ms')} | "
                     f"{anchor(r, 'mamba_anchor_fwdbwd_ms', 'fused_fwdbwd_ms')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
