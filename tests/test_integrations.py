"""smp encoders, MONAI backbones/network, and torch.export on CPU, with tiny widths.

Tiny sizes go through the documented paths (``register_encoder`` / ``register_backbone`` with ``dims``/``depths``)
because the pure-PyTorch scan is slow on CPU; the registered full sizes are checked by construction only.
"""
from __future__ import annotations

import pytest
import torch

import vm_unet  # noqa: F401 (registers the hooks)
from vm_unet.integrations import REGISTERED
from vm_unet.integrations._backbone import DilatedPatchMerging2D
from vm_unet.models import VMUNet
from vm_unet.models.vmamba import PatchMerging2D

from conftest import TINY

smp = pytest.importorskip("segmentation_models_pytorch")
from vm_unet.integrations.smp import register_encoder  # noqa: E402

TINY_ENC = register_encoder("vmamba_t_tiny_test", base="vmamba_t", dims=TINY["dims"], depths=[1, 1, 1, 1],
                            overwrite=True)
TINY_FAST = register_encoder("vmamba_fast_tiny_test", base="vmamba_fast_t", dims=TINY["dims"],
                             depths=[1, 1, 1, 1], overwrite=True)

# Small decoders; PAN's pyramid attention pools its stride-16 input 3 times, so it needs 128 px.
ARCHS = {
    "Unet": (lambda **kw: smp.Unet(decoder_channels=(32, 16, 16, 8, 8), **kw), 32),
    "UnetPlusPlus": (lambda **kw: smp.UnetPlusPlus(decoder_channels=(32, 16, 16, 8, 8), **kw), 32),
    "FPN": (lambda **kw: smp.FPN(decoder_pyramid_channels=32, decoder_segmentation_channels=32, **kw), 32),
    "DeepLabV3Plus": (lambda **kw: smp.DeepLabV3Plus(decoder_channels=32, **kw), 32),
    "Linknet": (lambda **kw: smp.Linknet(**kw), 32),
    "PAN": (lambda **kw: smp.PAN(decoder_channels=16, **kw), 128),
    "MAnet": (lambda **kw: smp.MAnet(decoder_channels=(32, 16, 16, 8, 8), decoder_pab_channels=16, **kw), 32),
}


def test_hooks_registered_on_import():
    assert REGISTERED == {"smp": True, "monai": True}
    names = smp.encoders.get_encoder_names()
    for n in ("vmamba_t", "vmamba_s", "vmamba_b", "vmamba_fast_t", "vmamba_fast_s", "vmamba_fast_b"):
        assert n in names


def test_registered_sizes_build_with_published_widths():
    from vm_unet.integrations._backbone import make_spec

    assert make_spec("vmamba_b")["dims"] == (128, 256, 512, 1024) and make_spec("vmamba_s")["depths"][2] == 27
    enc = smp.encoders.get_encoder("vmamba_t")
    assert enc.out_channels == [3, 0, 96, 192, 384, 768]
    assert [len(layer.blocks) for layer in enc.model.layers] == [2, 2, 9, 2]
    enc = smp.encoders.get_encoder("vmamba_t", depth=4, in_channels=1)
    assert enc.out_channels == [1, 0, 96, 192, 384]
    assert len(enc.model.layers) == 3  # the unused stage holds no parameters
    assert enc.model.patch_embed.proj.in_channels == 1
    with pytest.raises(KeyError, match="Wrong pretrained weights"):
        smp.Unet("vmamba_t", encoder_weights="imagenet")


@pytest.mark.parametrize("name", [TINY_ENC, TINY_FAST])
@pytest.mark.parametrize("depth", [3, 5])
def test_encoder_contract(name, depth):
    enc = smp.encoders.get_encoder(name, in_channels=1, depth=depth)
    x = torch.randn(2, 1, 64, 64)
    feats = enc(x)
    assert len(feats) == depth + 1 and [f.shape[1] for f in feats] == enc.out_channels
    assert feats[0] is x and feats[1].shape == (2, 0, 32, 32)
    for i, f in enumerate(feats[2:], start=2):
        assert f.shape[-2:] == (64 // 2 ** i, 64 // 2 ** i)
    with pytest.raises(ValueError, match="multiples of"):
        enc(torch.randn(1, 1, 36, 36))


@pytest.mark.parametrize("name", [TINY_ENC, TINY_FAST])
def test_output_stride_16_and_8(name):
    for os_, sizes in ((16, [16, 8, 4, 4]), (8, [16, 8, 8, 8])):
        enc = smp.encoders.get_encoder(name, output_stride=os_)
        assert enc.output_stride == os_
        feats = enc(torch.randn(1, 3, 64, 64))
        assert [f.shape[-1] for f in feats[2:]] == sizes


def test_dilated_patch_merging_subsamples_to_the_strided_one():
    torch.manual_seed(0)
    strided = PatchMerging2D(8)
    dilated = DilatedPatchMerging2D(8, 1)
    dilated.load_state_dict(strided.state_dict())
    x = torch.randn(2, 8, 12, 8)
    assert torch.allclose(dilated(x)[:, ::2, ::2], strided(x), atol=1e-6)
    d2 = DilatedPatchMerging2D(8, 2)
    d2.load_state_dict(strided.state_dict())
    assert torch.allclose(d2(x)[:, ::4, ::4], strided(x[:, ::2, ::2]), atol=1e-6)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("in_ch,classes", [(3, 1), (1, 3)])
def test_smp_architectures_forward_backward(arch, in_ch, classes):
    build, size = ARCHS[arch]
    torch.manual_seed(0)
    model = build(encoder_name=TINY_ENC, encoder_weights=None, in_channels=in_ch, classes=classes)
    x = torch.randn(2, in_ch, size, size)
    y = model(x)
    assert y.shape == (2, classes, size, size) and torch.isfinite(y).all()
    y.square().mean().backward()
    # DeepLabV3+ reads only the stride-4 and deepest features, so the out-norms of the others get no gradient.
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    for p in (model.encoder.model.patch_embed.proj.weight, model.encoder.model.layers[-1].blocks[0].ss2d.in_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    model.eval()
    assert model.predict(x).shape == y.shape


@pytest.mark.parametrize("arch", list(ARCHS))
def test_smp_training_loop_decreases_dice_loss(arch):
    build, size = ARCHS[arch]
    torch.manual_seed(0)
    model = build(encoder_name=TINY_ENC, encoder_weights=None, in_channels=1, classes=1)
    x = torch.randn(4, 1, size, size)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    mask = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2).float().expand(4, 1, size, size)
    x = x + 2 * mask  # learnable: the disc is brighter
    loss_fn = smp.losses.DiceLoss(smp.losses.BINARY_MODE, from_logits=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = loss_fn(model(x), mask)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert min(losses[-2:]) < losses[0] - 0.02, losses


def test_fast_family_in_smp():
    model = smp.Unet(TINY_FAST, encoder_weights=None, in_channels=1, classes=2, decoder_channels=(32, 16, 16, 8, 8))
    y = model(torch.randn(2, 1, 32, 32))
    y.mean().backward()
    assert y.shape == (2, 2, 32, 32)


def test_grad_checkpointing_inside_an_smp_model():
    """``vm_unet.models.set_grad_checkpointing`` reaches our trunk inside someone else's model: same gradients."""
    from vm_unet.models import set_grad_checkpointing
    model = smp.Unet(TINY_FAST, encoder_weights=None, in_channels=1, classes=2, decoder_channels=(32, 16, 16, 8, 8))
    x = torch.randn(2, 1, 32, 32)

    def grads():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        model(x).square().mean().backward()
        return [p.grad.clone() for p in model.encoder.parameters()]
    ref = grads()
    set_grad_checkpointing(model)
    stages = [m for m in model.modules() if hasattr(m, "grad_checkpointing")]
    assert stages and all(m.grad_checkpointing for m in stages)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads(), ref))


# ---------------------------------------------------------------------------------------------------------- MONAI

monai = pytest.importorskip("monai")
from monai.networks.nets import FlexibleUNet  # noqa: E402

from vm_unet.integrations.monai import VMUNetMonai, register_backbone  # noqa: E402

TINY_MONAI = register_backbone("vmamba_t_tiny_test", base="vmamba_t", dims=TINY["dims"], depths=[1, 1, 1, 1])


@pytest.mark.parametrize("in_ch,out_ch", [(1, 3), (3, 1)])
def test_flexible_unet_forward_backward(in_ch, out_ch):
    net = FlexibleUNet(in_channels=in_ch, out_channels=out_ch, backbone=TINY_MONAI, spatial_dims=2,
                       decoder_channels=(32, 16, 16, 8, 8))
    x = torch.randn(2, in_ch, 64, 64)
    y = net(x)
    assert y.shape == (2, out_ch, 64, 64)
    loss = monai.losses.DiceCELoss(sigmoid=out_ch == 1, softmax=out_ch > 1, to_onehot_y=out_ch > 1)
    target = torch.randint(0, out_ch if out_ch > 1 else 2, (2, 1, 64, 64)).float()
    loss(y, target).backward()
    assert net.encoder.model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_flexible_unet_standard_names_and_errors():
    net = FlexibleUNet(in_channels=1, out_channels=2, backbone="vmamba_t", spatial_dims=2)
    assert [len(layer.blocks) for layer in net.encoder.model.layers] == [2, 2, 9, 2]
    with pytest.raises(ValueError, match="2-D"):
        FlexibleUNet(in_channels=1, out_channels=2, backbone=TINY_MONAI, spatial_dims=3)
    with pytest.raises(ValueError, match="not downloaded"):
        FlexibleUNet(in_channels=1, out_channels=2, backbone=TINY_MONAI, pretrained=True)


def test_vmunet_monai_in_monai_workflow():
    from monai.inferers import SliceInferer, sliding_window_inference

    net = VMUNetMonai(spatial_dims=2, in_channels=1, out_channels=2, feature_size=8, depths=(1, 1, 1, 1),
                      depths_decoder=(1, 1, 1, 1))
    assert isinstance(net, VMUNet)
    x = torch.randn(1, 1, 70, 45)
    y = sliding_window_inference(x, (48, 48), 2, net, overlap=0.25)
    assert y.shape == (1, 2, 70, 45)
    loss = monai.losses.DiceCELoss(softmax=True, to_onehot_y=True)(net(x), torch.randint(0, 2, (1, 1, 70, 45)))
    loss.backward()
    net.eval()
    with torch.no_grad():
        vol = SliceInferer(roi_size=(32, 32), spatial_dim=2, sw_batch_size=2)(torch.randn(1, 1, 32, 32, 3), net)
    assert vol.shape == (1, 2, 32, 32, 3)
    with pytest.raises(ValueError, match="2-D"):
        VMUNetMonai(spatial_dims=3)


# --------------------------------------------------------------------------------------------- export / compile

def _export_and_compare(model, x):
    model.eval()
    with torch.no_grad():
        ref = model(x)
    ep = torch.export.export(model, (x,))
    with torch.no_grad():
        out = ep.module()(x)
    assert type(out) is torch.Tensor
    assert torch.allclose(out, ref, atol=1e-5)
    return ep


def test_export_vmunet():
    torch.manual_seed(0)
    _export_and_compare(VMUNet(3, 2, **TINY), torch.randn(1, 3, 32, 32))


def test_export_smp_unet_vmamba():
    torch.manual_seed(0)
    model = smp.Unet(TINY_ENC, encoder_weights=None, in_channels=1, classes=2, decoder_channels=(32, 16, 16, 8, 8))
    _export_and_compare(model, torch.randn(1, 1, 32, 32))


def test_eager_after_export_of_an_unseen_shape():
    """Route maps first built while tracing must not be cached as FakeTensors for later eager calls."""
    model = VMUNet(3, 2, **TINY).eval()
    x = torch.randn(1, 3, 160, 32)  # a size no other test uses, so its maps are first built under tracing
    torch.export.export(model, (x,))
    with torch.no_grad():
        assert type(model(x)) is torch.Tensor


def test_exported_program_runs_with_grad_enabled():
    """The reference scan's in-place writes must stay legal when its autograd.Function is inlined by export."""
    model = VMUNet(3, 2, **TINY).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model(x)
    torch.export.export(model, (x,)).module()(x)


@pytest.mark.slow
def test_torch_compile_vmunet_cpu():
    torch.manual_seed(0)
    model = VMUNet(3, 2, **TINY).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model)(x)
    assert torch.allclose(out, ref, atol=1e-4)


def test_vm_unet_imports_without_smp_and_monai():
    import subprocess
    import sys

    code = ("import sys; sys.modules['segmentation_models_pytorch'] = None; sys.modules['monai'] = None\n"
            "import vm_unet; from vm_unet.integrations import REGISTERED; print(REGISTERED)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "{'smp': False, 'monai': False}" in out.stdout
