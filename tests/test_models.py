"""Model construction, faithfulness (parameter counts), shapes on odd inputs, and bad input."""
from __future__ import annotations

import pytest
import torch

import vm_unet
from vm_unet.models import VMUNet

from conftest import TINY


@pytest.mark.parametrize("name,expected", [("vmunet_isic", 27_427_561), ("vmunet", 44_273_833)])
def test_parameter_counts_equal_the_published_model(name, expected):
    model = vm_unet.create_model(name, in_chans=3, num_classes=1)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_registry_lists_names_and_rejects_unknown():
    names = vm_unet.list_models()
    assert {"vmunet_isic", "vmunet", "vmunet_fast"} <= set(names)
    with pytest.raises(KeyError, match="unknown model 'nope'"):
        vm_unet.create_model("nope")
    with pytest.raises(ValueError, match="does not take"):
        vm_unet.create_model("vmunet_isic", widht=3)


@pytest.mark.parametrize("family_name", ["vmunet_isic", "vmunet_fast"])
@pytest.mark.parametrize("in_chans,num_classes,h,w", [(1, 1, 37, 50), (3, 4, 33, 65), (2, 2, 64, 64), (1, 3, 5, 7)])
def test_output_shape_any_size_channels_classes(family_name, in_chans, num_classes, h, w):
    torch.manual_seed(0)
    model = vm_unet.create_model(family_name, in_chans=in_chans, num_classes=num_classes, **TINY)
    x = torch.randn(2, in_chans, h, w, requires_grad=True)
    out = model(x)
    assert out.shape == (2, num_classes, h, w)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient reached {name}"


def test_returns_logits_not_probabilities():
    torch.manual_seed(0)
    model = vm_unet.create_model("vmunet_isic", **TINY)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32) * 5)
    assert out.min() < 0 or out.max() > 1


def test_published_wiring_skips_are_encoder_stage_inputs():
    """Decoder stage i>0 receives x + (input of encoder stage 4-i); check by hooking the encoder."""
    torch.manual_seed(0)
    model = vm_unet.create_model("vmunet_isic", **TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    stage_inputs, decoder_inputs = [], []
    hooks = [layer.register_forward_pre_hook(lambda m, a: stage_inputs.append(a[0])) for layer in model.encoder.layers]
    hooks += [st.register_forward_pre_hook(lambda m, a: decoder_inputs.append(a[0])) for st in model.decoder]
    with torch.no_grad():
        model(x)
    for hk in hooks:
        hk.remove()
    assert [t.shape[1:3] for t in stage_inputs] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    # decoder stage 1 input = decoder stage 0 output + stage-3 input; recompute stage 0 and compare
    with torch.no_grad():
        d0 = model.decoder[0](decoder_inputs[0])
    torch.testing.assert_close(decoder_inputs[1], d0 + stage_inputs[3])


def test_drop_path_schedule_and_init():
    model = vm_unet.create_model("vmunet_isic")
    enc = [b.drop_path.p for layer in model.encoder.layers for b in layer.blocks]
    dec = [b.drop_path.p for stage in model.decoder for b in stage.blocks]
    assert enc[0] == 0.0 and abs(enc[-1] - 0.2) < 1e-6 and enc == sorted(enc)
    assert abs(dec[0] - 0.2) < 1e-6 and dec[-1] == 0.0 and dec == sorted(dec, reverse=True)
    ss2d = model.encoder.layers[0].blocks[0].ss2d
    assert torch.allclose(-torch.exp(ss2d.A_logs[0]), -torch.arange(1, 17.0))
    assert torch.all(ss2d.Ds == 1)
    dt = torch.nn.functional.softplus(ss2d.dt_projs_bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
    assert abs(ss2d.in_proj.weight.std().item() - 0.02) < 0.003


@pytest.mark.parametrize("x,match", [
    (torch.zeros(3, 32, 32), "4D tensor"),
    (torch.zeros(1, 1, 32, 32), "in_chans=3"),
    (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "floating-point"),
    (torch.zeros(0, 3, 32, 32), "empty"),
    ("not a tensor", "torch.Tensor"),
])
def test_bad_input_raises_value_error(x, match):
    model = vm_unet.create_model("vmunet_isic", **TINY)
    with pytest.raises(ValueError, match=match):
        model(x)


@pytest.mark.parametrize("kwargs,match", [
    (dict(in_chans=0), "in_chans"), (dict(num_classes=0), "num_classes"),
    (dict(dims=[8, 16, 32, 64], depths=[1, 1, 1]), "one entry per stage"),
    (dict(dims=[8, 12, 32, 64]), "double"), (dict(family="v9"), "family"),
])
def test_bad_construction_raises_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VMUNet(**kwargs)


def test_eval_is_deterministic_and_batch_independent():
    torch.manual_seed(0)
    model = vm_unet.create_model("vmunet_fast", **TINY).eval()
    x = torch.randn(3, 3, 40, 40)
    with torch.no_grad():
        full = model(x)
        single = model(x[1:2])
    # chunk boundaries depend on batch size, so only fp32 rounding may differ
    torch.testing.assert_close(full[1:2], single, rtol=1e-3, atol=1e-3)


def test_training_step_after_inference_mode():
    """Index maps first built under inference_mode must not poison later training steps (autograd saves them)."""
    torch.manual_seed(0)
    model = vm_unet.create_model("vmunet_isic", **TINY)
    x = torch.randn(1, 3, 48, 80)  # a size no other test uses, so its route maps are first built below
    with torch.inference_mode():
        model(x)
    model(x).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def _ss2d_published_forward(m, x):
    """The published SS2D formulation (einsum x_proj on the permuted conv output), as the reference path."""
    import torch.nn.functional as F  # noqa: PLC0415
    from vm_unet.kernels.ss2d import ss2d_core_reference  # noqa: PLC0415
    xz = m.in_proj(x)
    xi, z = xz.chunk(2, dim=-1)
    xi = F.silu(m.conv2d(xi.permute(0, 3, 1, 2)))
    proj = torch.einsum("bdhw,kcd->bkchw", xi, m.x_proj_weight)
    dt_low, B, C = torch.split(proj, [m.dt_rank, m.d_state, m.d_state], dim=2)
    y = ss2d_core_reference(xi, dt_low, B, C, m.dt_projs_weight, m.dt_projs_bias, -torch.exp(m.A_logs.float()),
                            m.Ds, m.route)
    y = m.out_norm(y.permute(0, 2, 3, 1)) * F.silu(z)
    return m.out_proj(y)


def _check_ss2d_optimised_equals_reference(device, d_state):
    from vm_unet.models.vmamba import SS2D  # noqa: PLC0415
    torch.manual_seed(0)
    m = SS2D(16, d_state=d_state).to(device)
    x = torch.randn(2, 5, 7, 16, device=device, requires_grad=True)
    out = m(x)
    xr = x.detach().clone().requires_grad_(True)
    ref = _ss2d_published_forward(m, xr)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)
    with torch.no_grad():   # without gradients, on a GPU, the block runs channels last (another x_proj GEMM)
        assert torch.allclose(m(x), ref, rtol=1e-4, atol=1e-5)
        xi = m.conv_act(m.in_proj(x).chunk(2, dim=-1)[0].permute(0, 3, 1, 2))
        for layout in (torch.contiguous_format, torch.channels_last):   # both forward_core paths, on any device
            assert torch.allclose(m.forward_core(xi.contiguous(memory_format=layout)), m.forward_core(xi),
                                  rtol=1e-4, atol=1e-5)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *m.parameters()], g)
    want = torch.autograd.grad(ref, [xr, *m.parameters()], g)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5)


# d_state 4: channel first with gradients, channels last without; d_state 1: channels last both ways
@pytest.mark.parametrize("d_state", [4, 1])
def test_ss2d_optimised_path_equals_published_formulation(d_state):
    _check_ss2d_optimised_equals_reference("cpu", d_state)


@pytest.mark.gpu
@pytest.mark.parametrize("d_state", [4, 1])
def test_gpu_ss2d_optimised_path_equals_published_formulation(d_state, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from vm_unet.kernels import depthwise_conv  # noqa: PLC0415
    monkeypatch.setattr(depthwise_conv, "EAGER_MIN_POSITIONS", 0)   # the fused conv at this size too
    _check_ss2d_optimised_equals_reference("cuda", d_state)


# the scan core's input layout, as kernels.ss2d.channels_last_is_faster measured the fused core: channels last in
# inference, and in training too at d_state <= 2; channel first where the reference runs; dense either way, whatever
# the strides of the conv's input
@pytest.mark.parametrize("block", ["SS2D", "SS2DFast"])
def test_scan_input_layout_follows_the_measured_rule(block, monkeypatch):
    from vm_unet.models import vmamba, vmamba_fast  # noqa: PLC0415
    cls = getattr(vmamba, block, None) or getattr(vmamba_fast, block)
    cases = [(1, False, False)]   # the reference path (CPU tensors, auto backend)
    fused = [(16, True, False), (16, False, True), (1, True, True), (1, False, True)]
    for triton_path, group in ((False, cases), (True, fused)):
        if triton_path:   # the layout decision alone, as on a GPU; no kernel runs here
            monkeypatch.setattr(vmamba, "use_triton", lambda *t: True)
        for d_state, grad, last in group:
            m = cls(16, d_state=d_state)
            x = torch.randn(2, 7, 5, 2 * m.d_inner)[..., ::2].permute(0, 3, 1, 2)   # (B, D, H, W), neither dense
            with torch.set_grad_enabled(grad):
                out = m.conv_act(x)
            fmt = torch.channels_last if last else torch.contiguous_format
            assert out.is_contiguous(memory_format=fmt) and not out.is_contiguous(
                memory_format=torch.contiguous_format if last else torch.channels_last), (block, d_state, grad)


@pytest.mark.parametrize("name", ["vmunet_isic", "vmunet_fast"])
def test_encoder_features_are_channel_first_for_backbones(name):
    torch.manual_seed(0)
    enc = vm_unet.create_model(name, **TINY).encoder.eval()
    with torch.no_grad():
        feats = enc(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(1, c, 64 // s, 96 // s) for c, s in zip(TINY["dims"], (4, 8, 16, 32))]


@pytest.mark.parametrize("name", ["vmunet_isic", "vmunet_fast"])
def test_gradients_follow_parameter_layout(name):
    """DDP buckets gradients in the parameters' layout; a grad with other strides costs a copy every step."""
    torch.manual_seed(0)
    model = vm_unet.create_model(name, **TINY)
    # 64² so the deepest maps are 2×2: at 1×1 a (B, C, 1, 1) tensor is both layouts and the check is moot
    model(torch.randn(2, 3, 64, 64)).mean().backward()
    bad = [n for n, p in model.named_parameters() if p.grad.stride() != p.stride()]
    assert not bad, f"gradients with strides unlike their parameters: {bad}"


@pytest.mark.parametrize("name", ["vmunet_isic", "vmunet_fast"])
def test_grad_checkpointing_recomputes_blocks_with_the_same_gradients(name):
    """Block-level checkpointing: same loss and gradients (drop-path active: the RNG state is replayed), each block
    runs twice per training step (forward, then recomputed in the backward), once in inference."""
    model = vm_unet.create_model(name, **{**TINY, "drop_path_rate": 0.3}).train()
    x = torch.randn(2, 3, 32, 32)

    def step():
        torch.manual_seed(7)
        model.zero_grad(set_to_none=True)
        loss = model(x).square().mean()
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    calls = []
    blocks = [m for m in model.modules() if type(m).__name__.startswith("VSSBlock")]
    for blk in blocks:   # a pre-hook: recomputation stops early, once it has what the backward needs
        blk.register_forward_pre_hook(lambda *_: calls.append(1))
    loss_ref, grads_ref = step()
    assert len(calls) == len(blocks)
    assert model.set_grad_checkpointing() is model
    calls.clear()
    loss, grads = step()
    assert len(calls) == 2 * len(blocks)
    assert torch.allclose(loss, loss_ref)
    for k, g in grads_ref.items():
        assert torch.allclose(grads[k], g, rtol=1e-5, atol=1e-7), k
    calls.clear()
    with torch.no_grad():
        model(x)
    assert len(calls) == len(blocks)          # nothing to recompute without autograd
    model.set_grad_checkpointing(False)
    calls.clear()
    step()
    assert len(calls) == len(blocks)
    with pytest.raises(ValueError, match="True or False"):
        model.encoder.set_grad_checkpointing("yes")


def test_compile_model_scopes_inductor_options(monkeypatch):
    """``compile_model`` hands inductor the model's options (no 2-D tiling with fast blocks, inductor's defaults
    otherwise) with the mode's own (CUDA graphs for ``cuda_graphs``) through ``torch.compile(options=...)``, the one
    form that takes both, and never through the process-wide config."""
    from vm_unet.models import VSSBlockFast, compile_model, create_model, inductor_options

    seen = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: seen.append(kw) or model)
    before = torch._inductor.config.triton.max_tiles
    fast = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), VSSBlockFast(8))
    isic = create_model("vmunet_isic", **TINY)
    assert inductor_options(fast) == {"triton.max_tiles": 1} and inductor_options(isic) == {}
    assert compile_model(fast) is fast and compile_model(fast, cuda_graphs=True) is fast
    assert compile_model(isic) is isic and compile_model(isic, cuda_graphs=True) is isic
    assert seen == [{"dynamic": False, "options": {"triton.max_tiles": 1}},
                    {"dynamic": False, "options": {"triton.cudagraphs": True, "triton.max_tiles": 1}},
                    {"dynamic": False, "options": {}},
                    {"dynamic": False, "options": {"triton.cudagraphs": True}}]
    assert torch._inductor.config.triton.max_tiles == before


@pytest.mark.gpu
def test_gpu_compiled_training_step_at_batch_one():
    """A compiled ``vmunet_fast`` training step at 512² batch 1: with inductor's 2-D tiling (torch 2.11, Triton
    3.6) it stopped with "CUDA error: misaligned address"; ``compile_model`` turns that tiling off for such models."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from vm_unet.models import compile_model, create_model

    torch.manual_seed(0)
    net = compile_model(create_model("vmunet_fast").cuda())
    x = torch.randn(1, 3, 512, 512, device="cuda")
    target = (torch.rand(1, 1, 512, 512, device="cuda") > 0.5).float()
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x).float(), target)
        loss.backward()
        torch.cuda.synchronize()
        assert torch.isfinite(loss)
