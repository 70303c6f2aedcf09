"""The PyTorch reference scan against a per-token loop (float64), gradcheck, long sequences, routes."""
from __future__ import annotations

import importlib

import pytest
import torch

import vm_unet
from vm_unet.kernels.routes import cross_merge, cross_scan, route_indices, route_inverse

from scan_reference import random_scan_inputs, selective_scan_loop

# the module, not the function of the same name that vm_unet.kernels re-exports
sst = importlib.import_module("vm_unet.kernels.selective_scan_torch")

GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _run(fn, inputs, softplus=True):
    return fn(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], inputs["D"], inputs["z"],
              inputs["delta_bias"], softplus, return_last_state=True)


@pytest.mark.parametrize("groups", [None, 1, 4])
@pytest.mark.parametrize("n_state", [1, 16])
@pytest.mark.parametrize("with_z,with_D,with_bias,softplus", [(True, True, True, True), (False, False, False, False),
                                                              (True, False, True, False)])
@pytest.mark.parametrize("length,chunk_elements", [(37, 1 << 23), (61, 40)])  # 40 forces many chunks
def test_matches_loop_outputs_and_gradients(monkeypatch, groups, n_state, with_z, with_D, with_bias, softplus,
                                            length, chunk_elements):
    monkeypatch.setattr(sst, "_CHUNK_ELEMENTS", chunk_elements)
    inputs = random_scan_inputs(2, 8, length, n_state, groups, with_z, with_D, with_bias)
    if not softplus:  # without softplus delta must already be a positive step size
        inputs["delta"] = inputs["delta"].abs()
        if inputs["delta_bias"] is not None:
            inputs["delta_bias"] = inputs["delta_bias"].abs()
    leaves = {k: v.requires_grad_() for k, v in inputs.items() if v is not None}
    out, last = _run(sst.selective_scan_torch, inputs, softplus)
    ref_out, ref_last = _run(selective_scan_loop, inputs, softplus)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last, ref_last, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    names = list(leaves)
    got = torch.autograd.grad((out * grad).sum(), [leaves[k] for k in names])
    want = torch.autograd.grad((ref_out * grad).sum(), [leaves[k] for k in names])
    for name, g_got, g_want in zip(names, got, want):
        torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-9, msg=f"gradient of {name}")


def test_gradcheck():
    inputs = random_scan_inputs(1, 4, 9, 3, groups=2)
    names = [k for k in GRAD_NAMES if inputs[k] is not None]
    tensors = [inputs[k].requires_grad_() for k in names]

    def fn(*args):
        kw = dict(zip(names, args))
        return sst.selective_scan_torch(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"],
                                        kw["delta_bias"], True)

    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-6)


def test_public_entry_point_dispatches_to_reference_on_cpu():
    inputs = random_scan_inputs(1, 4, 20, 2, dtype=torch.float32)
    out = vm_unet.selective_scan_fn(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"],
                                    inputs["D"], inputs["z"], inputs["delta_bias"], True)
    ref = selective_scan_loop(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], inputs["D"],
                              inputs["z"], inputs["delta_bias"], True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_long_sequence_fp32_stays_exact():
    """L = 262,144 in fp32: a naive cumulative-product formulation underflows/overflows here; ours must not."""
    length = 262_144
    inputs = random_scan_inputs(1, 2, length, 2, dtype=torch.float32, with_z=False)
    out, last = _run(sst.selective_scan_torch, inputs)
    assert torch.isfinite(out).all() and torch.isfinite(last).all()
    # Check the tail against a float64 loop restarted from the exact state 200 steps before the end.
    inputs64 = {k: (v.double() if v is not None else None) for k, v in inputs.items()}
    split = length - 200
    head = {k: (v[..., :split] if k in ("u", "delta", "B", "C") and v is not None else v)
            for k, v in inputs64.items()}
    _, h_split = _run(sst.selective_scan_torch, head)
    tail = {k: (v[..., split:] if k in ("u", "delta", "B", "C") and v is not None else v)
            for k, v in inputs64.items()}
    ref_tail, _ = _run(selective_scan_loop, tail)
    # Contribution of the carried state to the tail: scan the tail once from zero and once from h_split.
    scan = sst._Scan(tail["u"], tail["delta"], tail["A"], tail["B"].unsqueeze(1), tail["C"].unsqueeze(1), tail["D"],
                     None, tail["delta_bias"], True)
    _, hs = scan.states(0, 200, h_split.view(1, 1, 2, 2))
    expected = scan.readout(0, 200, hs).movedim(0, -1).reshape(1, 2, 200)
    torch.testing.assert_close(out[..., split:].double(), expected, rtol=1e-4, atol=1e-4)
    assert ref_tail.shape == expected.shape


@pytest.mark.parametrize("bad, match", [
    (dict(u=torch.zeros(2, 3)), "u must be"),
    (dict(delta=torch.zeros(1, 4, 5)), "delta shape"),
    (dict(A=torch.zeros(3, 2)), "A must be"),
    (dict(B=torch.zeros(1, 3, 9)), "B must be"),
    (dict(u=torch.zeros(1, 4, 9, dtype=torch.long)), "floating"),
    (dict(D=torch.zeros(5)), "D must be"),
])
def test_bad_inputs_raise_clear_errors(bad, match):
    args = dict(u=torch.zeros(1, 4, 9), delta=torch.zeros(1, 4, 9), A=-torch.ones(4, 2), B=torch.zeros(1, 2, 9),
                C=torch.zeros(1, 2, 9), D=None)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        sst.selective_scan_torch(**args)


@pytest.mark.parametrize("h,w", [(1, 1), (3, 5), (8, 8), (7, 2)])
def test_cross_scan_merge_are_adjoint_and_inverse(h, w):
    x = torch.randn(2, 3, h, w, dtype=torch.float64)
    xs = cross_scan(x)
    assert xs.shape == (2, 4, 3, h * w)
    y = torch.randn_like(xs)
    # <cross_scan(x), y> == <x, cross_merge(y)>
    torch.testing.assert_close((xs * y).sum(), (x * cross_merge(y, h, w)).sum())
    # merging the scanned copies gives K * x back; each direction alone is a permutation
    torch.testing.assert_close(cross_merge(xs, h, w), 4 * x)
    idx, inv = route_indices("cross", h, w), route_inverse("cross", h, w)
    for k in range(4):
        assert torch.equal(torch.sort(idx[k]).values, torch.arange(h * w))
        assert torch.equal(idx[k][inv[k]], torch.arange(h * w))


def test_cross_route_matches_published_layout():
    x = torch.arange(6.0).view(1, 1, 2, 3)
    xs = cross_scan(x)[0, :, 0]
    assert xs[0].tolist() == [0, 1, 2, 3, 4, 5]          # rows
    assert xs[1].tolist() == [0, 3, 1, 4, 2, 5]          # columns
    assert xs[2].tolist() == [5, 4, 3, 2, 1, 0]          # rows reversed
    assert xs[3].tolist() == [5, 2, 4, 1, 3, 0]          # columns reversed


def test_unknown_route_is_a_key_error():
    with pytest.raises(KeyError, match="unknown scan route"):
        cross_scan(torch.zeros(1, 1, 2, 2), route="spiral-of-doom")
