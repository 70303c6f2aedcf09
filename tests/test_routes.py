"""Scan routes from the Vision-Mamba family (issue 8): index maps, per-sample maps, models, quadtree, backends."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vm_unet
from vm_unet.kernels.routes import (QUADTREE_SHIFTS, cross_merge, cross_scan, list_routes, num_directions,
                                    parse_route, quadtree_orders, quadtree_shift, route_indices, route_inverse)
from vm_unet.kernels.selective_scan import selective_scan_fn
from vm_unet.kernels.ss2d import ss2d_core_reference
from vm_unet.models.vmamba import SS2D, QuadtreeRouter, VSSBlock

from conftest import TINY

NEW_ROUTES = ["bidirectional", "zigzag", "window", "window:3", "window:4", "window:5", "quadtree", "quadtree:3"]
SIZES = [(1, 1), (1, 6), (3, 5), (7, 9), (8, 8), (13, 6)]
NEW_MODELS = ["vmunet_isic_bidirectional", "vmunet_isic_zigzag", "vmunet_isic_window", "vmunet_isic_quadtree"]


def _pos(idx: torch.Tensor, w: int) -> torch.Tensor:
    return torch.stack([idx // w, idx % w], dim=-1)


# ---- index maps -------------------------------------------------------------------------------------------------

def test_registry_has_the_family():
    assert {"cross", "bidirectional", "zigzag", "window", "quadtree"} <= set(list_routes())
    assert [num_directions(r) for r in ("bidirectional", "zigzag", "window:4", "quadtree")] == [2, 4, 4, 2]


@pytest.mark.parametrize("route", ["cross"] + NEW_ROUTES)
@pytest.mark.parametrize("h,w", SIZES)
def test_every_direction_is_a_permutation_and_the_inverse_undoes_it(route, h, w):
    idx, inv = route_indices(route, h, w), route_inverse(route, h, w)
    assert idx.shape == (num_directions(route), h * w)
    ar = torch.arange(h * w)
    for k in range(idx.shape[0]):
        assert torch.equal(torch.sort(idx[k]).values, ar)
        assert torch.equal(idx[k][inv[k]], ar)
        assert torch.equal(inv[k][idx[k]], ar)


@pytest.mark.parametrize("route", ["cross"] + NEW_ROUTES)
@pytest.mark.parametrize("h,w", [(1, 1), (3, 5), (7, 9)])
def test_scan_and_merge_are_adjoint(route, h, w):
    k = num_directions(route)
    x = torch.randn(2, 3, h, w, dtype=torch.float64)
    xs = cross_scan(x, route)
    y = torch.randn_like(xs)
    torch.testing.assert_close((xs * y).sum(), (x * cross_merge(y, h, w, route)).sum())
    torch.testing.assert_close(cross_merge(xs, h, w, route), k * x)


def test_per_sample_index_maps_scan_merge_adjoint_and_match_static_maps():
    b, h, w, k = 3, 5, 7, 2
    idx = torch.stack([torch.stack([torch.randperm(h * w) for _ in range(k)]) for _ in range(b)])
    x = torch.randn(b, 4, h, w, dtype=torch.float64)
    xs = cross_scan(x, idx)
    for i in range(b):           # sample i is read through its own map, exactly as a static map would read it
        torch.testing.assert_close(xs[i:i + 1], cross_scan(x[i:i + 1], idx[i]))
    y = torch.randn_like(xs)
    torch.testing.assert_close((xs * y).sum(), (x * cross_merge(y, h, w, idx)).sum())
    torch.testing.assert_close(cross_merge(xs, h, w, idx), k * x)
    # a static route given as its (K, L) tensor equals the named route
    torch.testing.assert_close(cross_scan(x, route_indices("zigzag", h, w)), cross_scan(x, "zigzag"))
    with pytest.raises(ValueError, match="index-map route"):
        cross_scan(x, idx[:2])


def test_bidirectional_is_rows_forward_and_backward():
    idx = route_indices("bidirectional", 3, 4)
    assert idx[0].tolist() == list(range(12)) and idx[1].tolist() == list(range(11, -1, -1))


@pytest.mark.parametrize("h,w", [(3, 5), (6, 4), (7, 9), (1, 5)])
def test_zigzag_steps_are_always_to_a_4_neighbour(h, w):
    idx = route_indices("zigzag", h, w)
    for k in range(4):
        steps = (_pos(idx[k], w)[1:] - _pos(idx[k], w)[:-1]).abs().sum(-1)
        assert (steps == 1).all(), f"direction {k} jumps"
    assert idx[0, :w].tolist() == list(range(w))                    # row-snake starts along row 0
    assert idx[1, :h].tolist() == [r * w for r in range(h)]         # column-snake starts down column 0


@pytest.mark.parametrize("size,h,w", [(3, 7, 8), (4, 8, 8), (5, 13, 6), (8, 3, 5)])
def test_window_route_scans_whole_windows_in_order_and_smaller_border_windows(size, h, w):
    idx = route_indices(f"window:{size}", h, w)
    n_wc = -(-w // size)
    for k, transposed in [(0, False), (1, True)]:
        rc = _pos(idx[k], w)
        win = (rc[:, 0] // size) * n_wc + rc[:, 1] // size
        if transposed:
            win = (rc[:, 1] // size) * (-(-h // size)) + rc[:, 0] // size
        assert (win[1:] >= win[:-1]).all(), "windows must come one after another"
        for wid in win.unique():                     # inside a window: row-major (or column-major, transposed)
            pts = rc[win == wid]
            key = pts[:, 1] * h + pts[:, 0] if transposed else pts[:, 0] * w + pts[:, 1]
            assert (key[1:] > key[:-1]).all()
        counts = torch.bincount(win)                 # border windows are the remainders, nothing padded
        assert counts.sum() == h * w and counts.max() <= size * size
    assert torch.equal(idx[2], idx[0].flip(0)) and torch.equal(idx[3], idx[1].flip(0))


def test_route_names_with_parameters_parse_and_reject_bad_values():
    assert parse_route("window") == ("window", 8) and parse_route("window:4") == ("window", 4)
    assert parse_route("cross") == ("cross", None)
    assert not torch.equal(route_indices("window:4", 16, 16), route_indices("window", 16, 16))
    with pytest.raises(ValueError, match="takes no parameter"):
        route_indices("cross:2", 4, 4)
    with pytest.raises(ValueError, match="must be >= 1"):
        route_indices("window:0", 4, 4)
    with pytest.raises(ValueError, match="integer"):
        route_indices("window:big", 4, 4)
    with pytest.raises(KeyError, match="unknown scan route"):
        route_indices("spiral", 4, 4)


@pytest.mark.parametrize("h,w", [(1, 1), (2, 3), (5, 7), (16, 16), (9, 4)])
@pytest.mark.parametrize("shift", [0, 1, 2, 3, 4])
def test_quadtree_orders_any_refinement_is_a_permutation(h, w, shift):
    coarse, fine, inv_c, inv_f, win_seq, win_pix, counts = quadtree_orders(h, w, quadtree_shift(h, w, shift))
    ar = torch.arange(h * w)
    assert torch.equal(coarse[inv_c], ar) and torch.equal(fine[inv_f], ar)
    assert torch.equal(win_pix[coarse], win_seq) and torch.equal(win_pix[fine], win_seq)   # same quadrant ranges
    assert counts.sum() == h * w
    for mask in range(16):                           # every subset of refined quadrants
        pick = torch.tensor([(mask >> q) & 1 for q in range(4)], dtype=torch.bool)
        order = torch.where(pick[win_seq], fine, coarse)
        assert torch.equal(torch.sort(order).values, ar)


def test_quadtree_fine_level_is_quarter_side_and_shift_moves_the_partition():
    coarse, fine, *_ , win_pix, counts = quadtree_orders(8, 8)
    assert counts.tolist() == [16, 16, 16, 16]
    assert fine[:4].tolist() == [0, 1, 8, 9]         # first sub-quadrant: 2x2 at the top-left (side/4)
    assert coarse[:4].tolist() == [0, 1, 2, 3]       # coarse: the 4x4 quadrant row-major
    shifted = quadtree_orders(8, 8, quadtree_shift(8, 8, 1))[5]
    assert not torch.equal(shifted, win_pix)
    assert len({quadtree_shift(16, 16, i) for i in range(len(QUADTREE_SHIFTS))}) == len(QUADTREE_SHIFTS)


# ---- ss2d_core with per-sample maps -------------------------------------------------------------------------------

def _core_inputs(b, d, h, w, k, r=2, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(x=rn(b, d, h, w), dt_low=rn(b, k, r, h, w), B=rn(b, k, n, h, w), C=rn(b, k, n, h, w),
                dt_weight=rn(k, d, r) * 0.5, dt_bias=rn(k, d) * 0.5 - 1, A=-torch.rand(k * d, n, generator=g,
                dtype=torch.float64) - 0.1, Ds=rn(k * d))


def test_ss2d_reference_per_sample_maps_equal_running_each_sample_alone():
    b, d, h, w = 3, 4, 5, 6
    args = _core_inputs(b, d, h, w, k=2)
    names = ("bidirectional", "quadtree")
    idx = torch.stack([route_indices(r, h, w) for r in names] + [route_indices("window:2", h, w)[:2]])
    out = ss2d_core_reference(**args, route=idx)
    for i in range(b):           # sample i alone, through its own static map (by name where there is one)
        one = {k: (v[i:i + 1] if k in ("x", "dt_low", "B", "C") else v) for k, v in args.items()}
        torch.testing.assert_close(out[i:i + 1], ss2d_core_reference(**one, route=names[i] if i < 2 else idx[i]))
    with pytest.raises(ValueError, match="index-map route"):
        vm_unet.kernels.ss2d_core(**args, route=idx[:2])


# ---- models -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NEW_MODELS)
def test_route_models_forward_backward_on_cpu_odd_sizes(name):
    torch.manual_seed(0)
    model = vm_unet.create_model(name, in_chans=1, num_classes=2, **TINY)
    x = torch.randn(2, 1, 37, 45, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 2, 37, 45) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reached {missing}"


@pytest.mark.parametrize("route", ["bidirectional", "zigzag", "window:3", "quadtree"])
def test_ss2d_block_runs_on_odd_token_grids(route):
    torch.manual_seed(0)
    blk = VSSBlock(8, d_state=4, route=route)
    x = torch.randn(2, 5, 7, 8, requires_grad=True)
    blk(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_route_option_and_published_counts():
    assert sum(p.numel() for p in vm_unet.create_model("vmunet_isic").parameters()) == 27_427_561
    m = vm_unet.create_model("vmunet_isic", route="window:4", **TINY)
    assert m.encoder.layers[0].blocks[0].ss2d.route == "window:4"
    # static routes change no parameter; K=2 routes have half the per-direction SSM parameters
    n = lambda name, **kw: sum(p.numel() for p in vm_unet.create_model(name, **kw).parameters())  # noqa: E731
    assert n("vmunet_isic_zigzag") == n("vmunet_isic_window") == 27_427_561
    assert vm_unet.create_model("vmunet_fast", route="zigzag", **TINY)
    fast_quadtree = vm_unet.create_model("vmunet_fast", route="quadtree", **TINY)   # shares SSMCore's router
    fast_quadtree(torch.randn(1, 3, 64, 48)).mean().backward()
    assert fast_quadtree.encoder.layers[0].blocks[0].ss2d.router.score[-1].weight.grad is not None
    with pytest.raises(ValueError, match="family='v0' only"):
        vm_unet.create_model("vmunet_fast", route="bidirectional", **TINY)


def test_bidirectional_position_embedding_is_used_and_resolution_flexible():
    torch.manual_seed(0)
    model = vm_unet.create_model("vmunet_isic_bidirectional", **TINY).eval()
    assert vm_unet.create_model("vmunet_isic", **TINY).encoder.pos_embed is None
    pe = model.encoder.pos_embed
    assert pe.shape == (1, TINY["dims"][0], 64, 64)
    tok = torch.zeros(1, 64, 64, TINY["dims"][0])
    torch.testing.assert_close(model.encoder.add_pos_embed(tok), pe.permute(0, 2, 3, 1))    # native grid: as is
    small = model.encoder.add_pos_embed(torch.zeros(1, 9, 13, TINY["dims"][0]))
    assert small.shape == (1, 9, 13, TINY["dims"][0]) and small.abs().sum() > 0
    x = torch.randn(1, 3, 40, 52)
    with torch.no_grad():
        before = model(x)
        pe.add_(1.0)
        assert not torch.allclose(before, model(x))


# ---- quadtree -----------------------------------------------------------------------------------------------------

def test_quadtree_predictor_gets_gradients_and_eval_is_deterministic():
    torch.manual_seed(0)
    model = vm_unet.create_model("vmunet_isic_quadtree", **TINY)
    routers = [m for m in model.modules() if isinstance(m, QuadtreeRouter)]
    assert len(routers) == 8 and [r.shift_index for r in routers] == list(range(8))
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    # token grids 16, 8, 4, 2: on a 4x4 grid or smaller the sub-quadrants are single tokens, the fine order equals
    # the coarse one and refining changes nothing, so only the routers on the 16 and 8 grids can learn
    for r in routers[:2] + routers[-2:]:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in r.parameters()), "predictor got no grad"
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        plans = [routers[0](torch.randn(2, 16, 16, 16)) for _ in range(2)]
    assert plans[0].hard.sum(-1).tolist() == [1.0, 1.0]


def test_quadtree_training_samples_orders_and_refines_the_top_quadrant_in_eval():
    torch.manual_seed(0)
    router = QuadtreeRouter(16, refine=1)
    x = torch.randn(4, 16, 8, 8)
    router.eval()
    plan = router(x)
    coarse, fine, *_ = quadtree_orders(8, 8)
    top = plan.soft.argmax(-1)
    for i in range(4):
        assert plan.hard[i].argmax() == top[i]
        q = int(top[i])
        assert torch.equal(plan.order[i, 16 * q:16 * (q + 1)], fine[16 * q:16 * (q + 1)])
    router.train()
    picks = {tuple(router(x).hard.argmax(-1).tolist()) for _ in range(20)}
    assert len(picks) > 1, "Gumbel noise should vary the refined quadrant in training"


def _paper_forward(ss2d: SS2D, x: torch.Tensor, plan) -> torch.Tensor:
    """QuadMamba's formulation: mix coarse/fine *sequences* with the straight-through mask, project and scan the
    sequence and its reverse, un-scan both ways and mix the two images with the same mask."""
    b, d, h, w = x.shape
    coarse, fine, inv_c, inv_f, win_seq, win_pix, _ = quadtree_orders(h, w, quadtree_shift(h, w,
                                                                       ss2d.router.shift_index))
    m = plan.hard + plan.soft - plan.soft.detach()                           # (b, 4)
    ms, mp = m[:, win_seq].unsqueeze(1).to(x.dtype), m[:, win_pix].unsqueeze(1).to(x.dtype)
    flat = x.flatten(2)
    seq = ms * flat[..., fine] + (1 - ms) * flat[..., coarse]                 # (b, D, L)
    seqs = torch.stack([seq, seq.flip(-1)], 1)                               # (b, 2, D, L)
    proj = torch.einsum("bkdl,kcd->bkcl", seqs, ss2d.x_proj_weight)
    r, n = ss2d.dt_rank, ss2d.d_state
    low, B, C = torch.split(proj, [r, n, n], dim=2)
    dts = torch.einsum("bkrl,kdr->bkdl", low, ss2d.dt_projs_weight)
    ys = selective_scan_fn(seqs.reshape(b, 2 * d, -1), dts.reshape(b, 2 * d, -1), -torch.exp(ss2d.A_logs),
                           B.contiguous(), C.contiguous(), ss2d.Ds, None, ss2d.dt_projs_bias.reshape(-1), True)
    ys = ys.view(b, 2, d, -1)
    yseq = ys[:, 0] + ys[:, 1].flip(-1)
    y = mp * yseq[..., inv_f] + (1 - mp) * yseq[..., inv_c]
    return y.view(b, d, h, w)


@pytest.mark.parametrize("h,w,shift", [(8, 8, 0), (7, 9, 2), (6, 5, 3)])
def test_quadtree_straight_through_matches_the_papers_sequence_mixing(h, w, shift):
    torch.manual_seed(0)
    ss2d = SS2D(8, d_state=3, route="quadtree").double().eval()    # eval: no noise, so both see the same plan
    ss2d.router.shift_index = shift
    x = torch.randn(2, ss2d.d_inner, h, w, dtype=torch.float64, requires_grad=True)
    cot = torch.randn(2, ss2d.d_inner, h, w, dtype=torch.float64)
    params = [x] + list(ss2d.router.parameters()) + [ss2d.x_proj_weight, ss2d.dt_projs_weight, ss2d.A_logs]
    ours = ss2d.forward_core(x)
    g_ours = torch.autograd.grad((ours * cot).sum(), params)
    paper = _paper_forward(ss2d, x, ss2d.router(x))
    g_paper = torch.autograd.grad((paper * cot).sum(), params)
    torch.testing.assert_close(ours, paper)
    for a, b in zip(g_ours, g_paper):
        torch.testing.assert_close(a, b)
    assert g_ours[1].abs().sum() > 0                              # the predictor is reached


# ---- backends -----------------------------------------------------------------------------------------------------

BACKEND_ROUTES = ["bidirectional", "zigzag", "window:2", "quadtree"]


def _backend_check(device: str, h: int, w: int, dim: int) -> dict[str, float]:
    """Max abs difference torch vs triton backend of a VSS block (output, input grad, parameter grads)."""
    results = {}
    for route in BACKEND_ROUTES:
        torch.manual_seed(0)
        blk = VSSBlock(dim, d_state=4, route=route).to(device)
        x = torch.randn(2, h, w, dim, device=device, requires_grad=True)
        cot = torch.randn(2, h, w, dim, device=device)
        outs = []
        for backend in ("torch", "triton"):
            os.environ["VM_UNET_BACKEND"] = backend
            torch.manual_seed(1)                                  # same Gumbel noise for the quadtree router
            y = blk(x)
            grads = torch.autograd.grad((y * cot).sum(), [x] + list(blk.parameters()))
            outs.append([y.detach()] + list(grads))
        os.environ.pop("VM_UNET_BACKEND")
        results[route] = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()
                             for a, b in zip(*outs))
    return results


def test_route_blocks_match_between_backends_triton_interpreter():
    pytest.importorskip("triton")
    pytest.importorskip("vm_unet.kernels.triton_ss2d")
    # TRITON_INTERPRET must be set before triton is imported: run in a fresh interpreter (~40 s alone; generous
    # timeout because a loaded 2-core CI box was seen taking 6x that)
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--backend-check"], env=env,
                          capture_output=True, text=True, timeout=540, cwd=Path(__file__).parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = eval(proc.stdout.strip().splitlines()[-1])  # noqa: S307 (our own dict literal)
    assert set(result) == set(BACKEND_ROUTES)
    for route, err in result.items():
        assert err < 1e-4, f"{route}: torch vs triton relative difference {err:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("name", NEW_MODELS)
def test_route_models_match_between_backends_on_gpu(name):
    torch.manual_seed(0)
    model = vm_unet.create_model(name, **TINY).cuda().eval()
    x = torch.randn(2, 3, 96, 80, device="cuda")
    outs = []
    for backend in ("torch", "triton"):
        os.environ["VM_UNET_BACKEND"] = backend
        with torch.no_grad():
            outs.append(model(x))
    os.environ.pop("VM_UNET_BACKEND")
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-3, atol=1e-3)
    assert max(_backend_check("cuda", 12, 10, 32).values()) < 1e-3


if __name__ == "__main__" and sys.argv[1:] == ["--backend-check"]:
    print(_backend_check("cpu", 5, 7, 8))
