"""Compile, for an H100/H200 (sm_90), every Triton kernel variant the ops launch; no GPU needed.

Run as a script (by ``test_kernel_compile.py``, in a process without ``TRITON_INTERPRET``, since the interpreter
replaces the kernels' compiler). The kernels are swapped for recorders, the custom ops are called on small CPU
tensors (forward and backward, plain scan, fused SS2D and its output stage, one segment and several), and each
distinct launch (constexprs + argument types) is then compiled to a cubin with Triton's own ptxas. This catches what
the CPU interpreter cannot: code that does not compile (type rules, constexpr globals, inline PTX).
"""
from __future__ import annotations

import os
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vm_unet.kernels import triton_scan_core as core

_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.int32: "*i32",
          torch.int64: "*i64"}


class _Recorder:
    def __init__(self, kernel):
        self.kernel, self.launches = kernel, {}

    def __getitem__(self, grid):
        def launch(*args, num_warps=4, **constexprs):
            names = [n for n in self.kernel.arg_names if n not in constexprs]
            assert len(names) == len(args), (len(names), len(args))
            sig = {n: _TYPES[a.dtype] if isinstance(a, torch.Tensor) else "fp32" if isinstance(a, float) else
                   ("i64" if abs(int(a)) >= 2 ** 31 else "i32") for n, a in zip(names, args)}
            sig.update({n: "constexpr" for n in constexprs})
            key = (tuple(sorted(sig.items())), tuple(sorted(constexprs.items())), num_warps)
            self.launches[key] = (sig, dict(constexprs), num_warps)
        return launch


def main() -> int:
    assert os.environ.get("TRITON_INTERPRET") != "1"
    from vm_unet.kernels import triton_norm_gate as ng
    from vm_unet.kernels import triton_transpose as tr
    from vm_unet.kernels.triton_selective_scan import selective_scan_triton
    from vm_unet.kernels.triton_ss2d import ss2d_core_triton

    recorders = [_Recorder(core._scan_fwd_kernel), _Recorder(core._scan_bwd_kernel),
                 _Recorder(ng._norm_gate_fwd_kernel), _Recorder(ng._norm_gate_bwd_kernel),
                 _Recorder(tr._transpose_kernel)]
    (core._scan_fwd_kernel, core._scan_bwd_kernel, ng._norm_gate_fwd_kernel, ng._norm_gate_bwd_kernel,
     tr._transpose_kernel) = recorders
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
    target = GPUTarget("cuda", 90, 32)
    count = 0
    for rec in recorders:
        for sig, constexprs, warps in rec.launches.values():
            src = ASTSource(fn=rec.kernel, signature=sig, constexprs=constexprs)
            compiled = triton.compile(src, target=target, options={"num_warps": warps})
            assert compiled.asm.get("cubin"), constexprs
            count += 1
    print(f"compiled {count} kernel variants for sm_90")
    return 0 if count >= 10 else 1


if __name__ == "__main__":
    sys.exit(main())
