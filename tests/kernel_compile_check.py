"""Compile, for an H100/H200 (sm_90), every Triton kernel variant the ops launch; no GPU needed.

Run as a script (by ``test_kernel_compile.py``, in a process without ``TRITON_INTERPRET``, since the interpreter
replaces the kernels' compiler). The kernels are swapped for recorders, the custom ops are called on small CPU
tensors (forward and backward, plain scan, fused SS2D and its output stage, one segment and several), and each
distinct launch (constexprs + argument types) is then compiled to a cubin with Triton's own ptxas. This catches what
the CPU interpreter cannot: code that does not compile (type rules, constexpr globals, inline PTX). It also checks
the tile layout the scan kernels' speed depends on (``check_tile_layout``).
"""
from __future__ import annotations

import os
import re
import sys

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vm_unet.kernels import triton_scan_core as core
from vm_unet.kernels.triton_scan_core import _load_tile, _store_tile

# launch options, not kernel arguments
_OPTIONS = ("num_warps", "enable_fp_fusion", "maxnreg")

_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.int32: "*i32",
          torch.int64: "*i64"}


class _Recorder:
    def __init__(self, kernel):
        self.kernel, self.launches = kernel, {}

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            options = {k: kwargs.pop(k) for k in _OPTIONS if k in kwargs}
            constexprs = kwargs
            names = [n for n in self.kernel.arg_names if n not in constexprs]
            assert len(names) == len(args), (len(names), len(args))
            sig = {n: _TYPES[a.dtype] if isinstance(a, torch.Tensor) else "fp32" if isinstance(a, float) else
                   ("i64" if abs(int(a)) >= 2 ** 31 else "i32") for n, a in zip(names, args)}
            sig.update({n: "constexpr" for n in constexprs})
            key = (tuple(sorted(sig.items())), tuple(sorted(constexprs.items())), tuple(sorted(options.items())))
            self.launches[key] = (sig, dict(constexprs), options)
        return launch


def main() -> int:
    assert os.environ.get("TRITON_INTERPRET") != "1"
    from vm_unet.kernels import triton_depthwise_conv as dw
    from vm_unet.kernels import triton_norm_gate as ng
    from vm_unet.kernels import triton_transpose as tr
    from vm_unet.kernels.triton_selective_scan import selective_scan_triton
    from vm_unet.kernels.triton_ss2d import ss2d_core_packed_triton, ss2d_core_triton

    recorders = [_Recorder(core._scan_fwd_kernel), _Recorder(core._scan_bwd_kernel),
                 _Recorder(ng._norm_gate_fwd_kernel), _Recorder(ng._norm_gate_bwd_kernel),
                 _Recorder(tr._transpose_kernel), _Recorder(dw._dw_weight_grad_kernel)]
    (core._scan_fwd_kernel, core._scan_bwd_kernel, ng._norm_gate_fwd_kernel, ng._norm_gate_bwd_kernel,
     tr._transpose_kernel, dw._dw_weight_grad_kernel) = recorders
    g = torch.Generator().manual_seed(0)
    for segments in (1, 3):
        core.TILE_OVERRIDE = {"segments": segments}
        for dtype in (torch.float32, torch.bfloat16):
            b, d, h, w, k, r, n = 1, 8, 5, 6, 4, 2, 16
            x = torch.randn(b, d, h, w, generator=g).to(dtype).requires_grad_()
            low, B, C = (torch.randn(b, k, c, h, w, generator=g).to(dtype).requires_grad_() for c in (r, n, n))
            params = [torch.randn(k, d, r), torch.randn(k, d), -torch.rand(k * d, n), torch.randn(k * d)]
            params = [p.requires_grad_() for p in params]
            ss2d_core_triton(x, low, B, C, *params, route="cross").sum().backward()
            # channels last (the VM-UNet block's layout): x and one (b, H, W, K, c) projection, h a multiple of
            # the chunk so the column directions compute their positions too
            xc = torch.randn(b, 8, w, d, generator=g).to(dtype).permute(0, 3, 1, 2).requires_grad_()
            proj = torch.randn(b, 8, w, k, r + 2 * n, generator=g).to(dtype).permute(0, 3, 4, 1, 2).requires_grad_()
            ss2d_core_packed_triton(xc, proj, *params, route="cross").sum().backward()
            # N=1 channels last (vmunet_fast): its own tile, 32 channels a program
            n1 = [torch.randn(k, 32, r), torch.randn(k, 32), -torch.rand(k * 32, 1), torch.randn(k * 32)]
            x1 = torch.randn(b, 8, w, 32, generator=g).to(dtype).permute(0, 3, 1, 2).requires_grad_()
            p1 = torch.randn(b, 8, w, k, r + 2, generator=g).to(dtype).permute(0, 3, 4, 1, 2).requires_grad_()
            ss2d_core_packed_triton(x1, p1, *[p.requires_grad_() for p in n1], route="cross").sum().backward()
            with torch.no_grad():
                ss2d_core_packed_triton(x1, p1, *n1, route="cross")
            order = torch.stack([torch.randperm(h * w), torch.randperm(h * w)])[None]
            low2, B2, C2 = (t[:, :2].detach().requires_grad_() for t in (low, B, C))
            p2 = [params[0][:2], params[1][:2], params[2][:2 * d], params[3][:2 * d]]
            ss2d_core_triton(x, low2, B2, C2, *[p.detach().requires_grad_() for p in p2], route=order).sum().backward()
            u, dl, z = (torch.randn(b, 2 * d, 40, generator=g).to(dtype).requires_grad_() for _ in range(3))
            Bs, Cs = (torch.randn(b, 2, n, 40, generator=g).to(dtype).requires_grad_() for _ in range(2))
            A, Dp, bias = (-torch.rand(2 * d, n)).requires_grad_(), torch.randn(2 * d).requires_grad_(), \
                torch.randn(2 * d).requires_grad_()
            selective_scan_triton(u, dl, A, Bs, Cs, Dp, z, bias, True).sum().backward()
            yz = [torch.randn(b, d, h, w, generator=g).to(dtype).requires_grad_(),
                  torch.randn(b, h, w, d, generator=g).to(dtype).requires_grad_()]
            ng.norm_gate_triton(*yz, torch.ones(d, requires_grad=True), torch.zeros(d, requires_grad=True), 1e-5,
                                dtype).sum().backward()
            for fmt in (torch.contiguous_format, torch.channels_last):   # the depthwise conv's weight gradient
                xd = torch.randn(2, 70, h, w, generator=g).to(dtype).contiguous(memory_format=fmt)
                dw.depthwise3x3_weight_grad(xd, torch.randn_like(xd))
    target = GPUTarget("cuda", 90, 32)
    count = scattered = pipelined = 0
    for rec in recorders:
        for sig, constexprs, options in rec.launches.values():
            src = ASTSource(fn=rec.kernel, signature=sig, constexprs=constexprs)
            compiled = triton.compile(src, target=target, options=options)
            assert compiled.asm.get("cubin"), constexprs
            count += 1
            if constexprs.get("SCATTER") and not constexprs.get("DH_ONLY"):
                check_scatter_layout(compiled.asm["ttgir"], constexprs["BD"])
                scattered += 1
            if constexprs.get("STAGES", 1) > 1 and not constexprs.get("DH_ONLY"):
                check_states_pipelined(compiled.asm["ttgir"])
                pipelined += 1
    print(f"compiled {count} kernel variants for sm_90; {scattered} reduce-scatter layouts ok; "
          f"{pipelined} pipelined backward loops ok")
    assert scattered, "no backward launch took the reduce-scatter path"
    assert pipelined, "no backward launch asked for a pipelined chunk loop"
    check_tile_layout(target, core.POS_LAST)
    return 0 if count >= 10 else 1


@triton.jit
def _tile_probe(x_ptr, idx_ptr, out_ptr, s_l, s_c, POS_LAST: tl.constexpr):
    j = tl.arange(0, 8)
    c = tl.arange(0, 16)
    pos = tl.load(idx_ptr + j)
    t = _load_tile(x_ptr, pos, j < 8, c, c < 16, s_l, s_c, POS_LAST)
    _store_tile(out_ptr, t * 2.0, pos, j < 8, c, c < 16, s_l, s_c, False, POS_LAST)


def check_tile_layout(target, pos_last: bool) -> None:
    """What ``_load_tile`` relies on, on the installed Triton: a [positions, channels] tile at gathered positions,
    built as ``POS_LAST`` says, is loaded with consecutive positions on consecutive lanes (its layout's fastest axis
    is the positions axis and spans more than one lane). A Triton that breaks the tie differently fails here, not
    silently at half speed on a GPU. Positions have stride 1 (specialised to a constant, as in the real launches)."""
    src = ASTSource(fn=_tile_probe, signature={"x_ptr": "*fp32", "idx_ptr": "*i32", "out_ptr": "*fp32",
                                               "s_l": "constexpr", "s_c": "i32", "POS_LAST": "constexpr"},
                    constexprs={"s_l": 1, "POS_LAST": pos_last})
    ttgir = triton.compile(src, target=target, options={"num_warps": 1, **core.COMPILE_OPTS}).asm["ttgir"]
    shape = "16x8" if pos_last else "8x16"
    load = re.search(rf"tt\.load .*: tensor<{shape}x!tt\.ptr<f32>, #(\w+)>", ttgir)
    assert load, f"no [{shape}] tile load in the probe's TTGIR:\n{ttgir}"
    layout = re.search(rf"#{load.group(1)} = #ttg\.blocked<\{{(.*)\}}>", ttgir)
    assert layout, f"tile load layout #{load.group(1)} is not a blocked layout:\n{ttgir}"
    lanes = [int(v) for v in re.search(r"threadsPerWarp = \[(\d+), (\d+)\]", layout.group(1)).groups()]
    order = [int(v) for v in re.search(r"order = \[(\d+), (\d+)\]", layout.group(1)).groups()]
    axis = 1 if pos_last else 0
    assert order[0] == axis and lanes[axis] > 1, (
        f"Triton {triton.__version__} lays the tile out as {layout.group(1)}: positions are not on the lanes; "
        f"flip triton_scan_core.POS_LAST for this version")
    print(f"tile layout ok (POS_LAST={pos_last}): {layout.group(1)}")


def check_states_pipelined(ttgir: str) -> None:
    """What ``triton_scan_core._loop_stages`` relies on: the backward's chunk-start state load is copied ahead
    asynchronously (global to shared memory) by Triton's software pipeliner. If a Triton version, or a change to
    how that load is addressed (anything but the loop index), stops it, the kernel still computes the same but runs
    about 15% slower on a GPU; this fails instead."""
    assert re.search(r"ttg\.async_copy_global_to_local .*tensor<\d+x\d+x!tt\.ptr<f32>", ttgir), (
        f"Triton {triton.__version__} did not pipeline the backward's chunk-start state load (no async copy of an "
        f"fp32 tile in its TTGIR); see triton_scan_core._loop_stages")


def check_scatter_layout(ttgir: str, bd: int) -> None:
    """What ``_lane_swap``'s shuffles rely on (``triton_scan_core._scatter``): every exchanged tile is laid out with
    its last (channel) axis fastest, one element per thread along it and ``bd`` lanes across it, all in one warp, so
    lane ^ m holds channel ^ m for m < bd. A Triton that lays the tile out otherwise fails here; on a GPU it would
    sum the wrong channels."""
    swaps = re.findall(r'elementwise_inline_asm "shfl\.sync\.bfly\.b32 [^"]*".*-> tensor<([\dx]+)xf32, #(\w+)>', ttgir)
    assert len(swaps) == 2 * (bd.bit_length() - 1), f"expected 2 log2({bd}) lane exchanges, found {len(swaps)}"
    for shape, name in swaps:
        layout = re.search(rf"#{name} = #ttg\.blocked<\{{(.*)\}}>", ttgir)
        assert layout, f"lane exchange on #{name}, not a blocked layout"
        fields = {k: [int(v) for v in vals.split(",")] for k, vals in
                  re.findall(r"(\w+) = \[([\d, ]+)\]", layout.group(1))}
        rank = len(shape.split("x"))
        assert (fields["sizePerThread"][-1] == 1 and fields["threadsPerWarp"][-1] == bd
                and fields["order"][0] == rank - 1 and set(fields["warpsPerCTA"]) == {1}), (
            f"Triton {triton.__version__} lays the reduce-scatter tile out as {layout.group(1)}: channels are not "
            f"on lanes 0..{bd - 1}; turn triton_scan_core._scatter off for this version")


if __name__ == "__main__":
    sys.exit(main())
