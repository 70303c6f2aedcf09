"""Importing published checkpoints (VMamba v0 ImageNet, published VM-UNet) and the conversion CLI.

We cannot download the real files, so the checkpoints are built here with the official key names and shapes
(GUIDE §1), written out by hand below rather than derived from our converter.
"""
from __future__ import annotations

import importlib.util
import re
import sys
import types

import pytest
import torch

import vm_unet
from vm_unet.checkpoint import load_checkpoint
from vm_unet.models import VMUNet, VSSEncoder
from vm_unet.weights import WeightsError, adapt_input_conv, load_pretrained

from conftest import REPO, TINY

DIMS = TINY["dims"]


def official_name(ours: str) -> str:
    """Our encoder name -> VMamba v0 name: blocks' ``norm``/``ss2d`` are ``ln_1``/``self_attention`` there."""
    ours = re.sub(r"(blocks\.\d+)\.norm\.", r"\1.ln_1.", ours)
    return re.sub(r"(blocks\.\d+)\.ss2d\.", r"\1.self_attention.", ours)


def vmamba_v0_checkpoint(dims=DIMS, depths=(1, 1, 1, 1), seed=0) -> dict:
    """A VMamba v0 classifier checkpoint: ``{"model": {...}}`` with classifier norm/head, official names."""
    torch.manual_seed(seed)
    enc = VSSEncoder(3, dims, depths, d_state=16)
    sd = {official_name(k): v.clone() for k, v in enc.state_dict().items()}
    sd["norm.weight"], sd["norm.bias"] = torch.ones(dims[-1]), torch.zeros(dims[-1])
    sd["head.weight"], sd["head.bias"] = torch.randn(1000, dims[-1]), torch.zeros(1000)
    return {"model": sd, "epoch": 292}


def published_vmunet_state_dict(model: VMUNet) -> dict:
    """A trained model of the published code: ``vmunet.`` prefix, ``layers_up``, ``final_up``, ``final_conv``."""
    out = {}
    for k, v in model.state_dict().items():
        k = official_name(k)
        k = re.sub(r"^encoder\.", "", k)
        k = re.sub(r"^decoder\.(\d+)\.", r"layers_up.\1.", k)
        k = k.replace("final_expand.", "final_up.").replace("head.", "final_conv.")
        out["vmunet." + k] = v.clone()
    return out


def test_fake_checkpoint_has_the_official_names_and_shapes():
    sd = vmamba_v0_checkpoint()["model"]
    c, d_inner, r, n = DIMS[0], 2 * DIMS[0], -(-DIMS[0] // 16), 16
    expect = {
        "patch_embed.proj.weight": (c, 3, 4, 4), "patch_embed.norm.weight": (c,),
        "layers.0.blocks.0.ln_1.weight": (c,),
        "layers.0.blocks.0.self_attention.in_proj.weight": (2 * d_inner, c),
        "layers.0.blocks.0.self_attention.conv2d.weight": (d_inner, 1, 3, 3),
        "layers.0.blocks.0.self_attention.conv2d.bias": (d_inner,),
        "layers.0.blocks.0.self_attention.x_proj_weight": (4, r + 2 * n, d_inner),
        "layers.0.blocks.0.self_attention.dt_projs_weight": (4, d_inner, r),
        "layers.0.blocks.0.self_attention.dt_projs_bias": (4, d_inner),
        "layers.0.blocks.0.self_attention.A_logs": (4 * d_inner, n),
        "layers.0.blocks.0.self_attention.Ds": (4 * d_inner,),
        "layers.0.blocks.0.self_attention.out_norm.weight": (d_inner,),
        "layers.0.blocks.0.self_attention.out_proj.weight": (c, d_inner),
        "layers.0.downsample.norm.weight": (4 * c,), "layers.0.downsample.reduction.weight": (2 * c, 4 * c),
    }
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k


def test_vmamba_checkpoint_into_vmunet_with_published_decoder_init():
    ckpt = vmamba_v0_checkpoint()
    src = ckpt["model"]
    model = VMUNet(3, 1, **TINY)
    report = load_pretrained(model, ckpt)
    own = model.state_dict()
    assert report.source_format == "vmamba_v0"
    # Every encoder tensor came over.
    for k, v in src.items():
        if k.startswith(("patch_embed.", "layers.")):
            ours = "encoder." + k.replace(".ln_1.", ".norm.").replace(".self_attention.", ".ss2d.")
            assert torch.equal(own[ours], v), ours
    # Decoder stage 3-i blocks = encoder stage i blocks (published layers.i -> layers_up.(3-i)).
    for i in range(4):
        assert torch.equal(own[f"decoder.{3 - i}.blocks.0.ss2d.A_logs"],
                           src[f"layers.{i}.blocks.0.self_attention.A_logs"])
        assert torch.equal(own[f"decoder.{3 - i}.blocks.0.norm.weight"], src[f"layers.{i}.blocks.0.ln_1.weight"])
    assert set(report.unexpected) == {"norm.weight", "norm.bias", "head.weight", "head.bias"}
    missing_modules = {re.sub(r"\.(weight|bias)$", "", k) for k in report.missing}
    assert missing_modules == {"decoder.1.upsample.expand", "decoder.1.upsample.norm", "decoder.2.upsample.expand",
                               "decoder.2.upsample.norm", "decoder.3.upsample.expand", "decoder.3.upsample.norm",
                               "final_expand.expand", "final_expand.norm", "head"}
    assert len(report.loaded) == len(own) - len(report.missing)
    assert "missing 14" in report.summary()


def test_deeper_checkpoint_skips_extra_blocks_like_the_published_loader():
    ckpt = vmamba_v0_checkpoint(depths=(2, 2, 5, 2))  # e.g. VMamba-S (27 blocks) into the ISIC config (2)
    model = VMUNet(3, 1, dims=DIMS, depths=[2, 2, 2, 2], depths_decoder=[2, 2, 2, 1])
    report = load_pretrained(model, ckpt)
    assert any(k.startswith("layers.2.blocks.4.") for k in report.unexpected)
    assert not any(k.startswith("layers.2.blocks.1.") for k in report.unexpected)
    # Decoder stage 3 has one block: it takes block 0 of encoder stage 0; block 1 of stage 0 still loads (encoder).
    assert torch.equal(model.state_dict()["decoder.3.blocks.0.ss2d.Ds"],
                       ckpt["model"]["layers.0.blocks.0.self_attention.Ds"])
    assert "blocks.*." in report.summary()


def test_published_vmunet_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(1)
    trained = VMUNet(3, 2, **TINY).eval()
    # latest.pth of the published trainer: model_state_dict inside a dict, saved from DDP (module. prefix).
    sd = {"module." + k: v for k, v in published_vmunet_state_dict(trained).items()}
    path = tmp_path / "latest.pth"
    torch.save({"epoch": 3, "model_state_dict": sd, "min_loss": 0.1}, path)
    fresh = VMUNet(3, 2, **TINY).eval()
    report = load_pretrained(fresh, path)
    assert report.source_format == "vmunet_published"
    assert report.missing == [] and report.unexpected == []
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), trained(x))


def test_one_channel_model_sums_the_rgb_stem(tmp_path):
    ckpt = vmamba_v0_checkpoint()
    rgb = VMUNet(3, 1, **TINY).eval()
    grey = VMUNet(1, 1, **TINY).eval()
    load_pretrained(rgb, ckpt)
    report = load_pretrained(grey, ckpt)
    assert report.adapted and "summed" in report.adapted[0]
    w = ckpt["model"]["patch_embed.proj.weight"]
    assert torch.allclose(grey.encoder.patch_embed.proj.weight, w.sum(1, keepdim=True))
    # A grey image replicated to RGB gives the same encoder output as the grey image through the summed stem.
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        a, b = rgb.encoder(x.repeat(1, 3, 1, 1)), grey.encoder(x)
    for fa, fb in zip(a, b):
        assert torch.allclose(fa, fb, atol=1e-5)


def test_adapt_input_conv_other_channel_counts():
    w = torch.randn(8, 3, 4, 4)
    w5 = adapt_input_conv(w, 5)
    assert w5.shape == (8, 5, 4, 4)
    assert torch.allclose(w5[:, 3], w[:, 0] * 3 / 5)
    assert torch.allclose(w5.sum(1) * 5 / 3, torch.cat([w, w], 1)[:, :5].sum(1))


def test_shape_mismatch_names_the_key_and_both_shapes():
    ckpt = vmamba_v0_checkpoint()
    bad = dict(ckpt["model"])
    bad["layers.1.blocks.0.self_attention.A_logs"] = torch.zeros(5, 16)
    model = VMUNet(3, 1, **TINY)
    with pytest.raises(WeightsError, match=r"encoder\.layers\.1\.blocks\.0\.ss2d\.A_logs.*"
                                           r"layers\.1\.blocks\.0\.self_attention\.A_logs.*\(5, 16\).*\(128, 16\)"):
        load_pretrained(model, {"model": bad})
    # Wrong width altogether (VMamba-T into a narrower model): also an error, not a silent partial load.
    wide = vmamba_v0_checkpoint(dims=[16, 32, 64, 128])
    with pytest.raises(WeightsError, match=r"patch_embed\.proj\.weight.*\(16, 3, 4, 4\).*\(8, 3, 4, 4\)"):
        load_pretrained(VMUNet(3, 1, **TINY), wide)


def test_unknown_or_unfitting_checkpoints_fail_clearly(tmp_path):
    with pytest.raises(WeightsError, match="unrecognised checkpoint"):
        load_pretrained(VMUNet(3, 1, **TINY), {"model": {"conv1.weight": torch.zeros(3)}})
    with pytest.raises(WeightsError, match="not found"):
        load_pretrained(VMUNet(3, 1, **TINY), tmp_path / "nope.pth")
    fast = VMUNet(3, 1, family="fast", d_state=1, **TINY)
    with pytest.raises(WeightsError):  # v0 checkpoint into the fast family: nothing fits / shapes differ
        load_pretrained(fast, vmamba_v0_checkpoint())
    with pytest.raises(WeightsError, match="no VM-UNet or VMamba encoder"):
        load_pretrained(torch.nn.Linear(2, 2), vmamba_v0_checkpoint())


def test_checkpoint_with_foreign_objects_loads_without_running_them(tmp_path):
    # VMamba's trainer saves its yacs config next to the weights; weights_only loading rejects such objects.
    mod = types.ModuleType("fake_yacs_config")

    class CfgNode(dict):
        pass

    CfgNode.__module__ = "fake_yacs_config"
    CfgNode.__qualname__ = "CfgNode"
    mod.CfgNode = CfgNode
    sys.modules["fake_yacs_config"] = mod
    try:
        cfg = CfgNode(MODEL={"NAME": "vssm"})
        path = tmp_path / "vmamba_tiny_e292.pth"
        torch.save({**vmamba_v0_checkpoint(), "config": cfg}, path)
    finally:
        del sys.modules["fake_yacs_config"]
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)
    report = load_pretrained(VMUNet(3, 1, **TINY), path)
    assert len(report.loaded) > 0


def test_smp_model_and_registered_weights(tmp_path):
    smp = pytest.importorskip("segmentation_models_pytorch")
    from vm_unet.integrations.smp import register_encoder

    path = tmp_path / "vmamba.pth"
    ckpt = vmamba_v0_checkpoint()
    torch.save(ckpt, path)
    register_encoder("vmamba_test_w", base="vmamba_t", dims=DIMS, depths=[1, 1, 1, 1], weights=str(path),
                     overwrite=True)
    model = smp.Unet("vmamba_test_w", encoder_weights=None, in_channels=1, classes=2,
                     decoder_channels=(32, 16, 16, 8, 8))
    stem = model.encoder.model.patch_embed.proj.weight
    assert stem.shape[1] == 1
    assert torch.allclose(stem, ckpt["model"]["patch_embed.proj.weight"].sum(1, keepdim=True))
    # Loading into the whole smp model finds its encoder; the decoder is not touched or reported.
    fresh = smp.FPN("vmamba_test_w", encoder_weights=None, decoder_segmentation_channels=32, decoder_pyramid_channels=32)
    before = {k: v.clone() for k, v in fresh.decoder.state_dict().items()}
    report = load_pretrained(fresh, path)
    assert all(k.startswith("encoder.model.") for k in report.loaded + report.missing)
    assert torch.equal(fresh.encoder.model.layers[2].blocks[0].ss2d.A_logs,
                       ckpt["model"]["layers.2.blocks.0.self_attention.A_logs"])
    assert all(torch.equal(v, fresh.decoder.state_dict()[k]) for k, v in before.items())


def _load_cli():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", REPO / "scripts" / "convert_checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_converts_to_a_checkpoint_our_tools_load(tmp_path, capsys):
    cli = _load_cli()
    src = tmp_path / "vmamba_tiny_e292.pth"
    torch.save(vmamba_v0_checkpoint(), src)
    out = tmp_path / "init.pth"
    rc = cli.main([str(src), str(out), "--model", "vmunet_isic", "--in-chans", "1", "--num-classes", "2",
                   "--set", "dims=8,16,32,64", "depths=1,1,1,1", "depths_decoder=1,1,1,1"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "loaded" in printed and "missing" in printed and "unexpected" in printed and "head.weight" in printed
    model, meta = load_checkpoint(out)
    assert meta["model_name"] == "vmunet_isic" and meta["model_kwargs"]["in_chans"] == 1
    assert meta["preprocessing"]["in_chans"] == 1 and len(meta["preprocessing"]["normalize"]["mean"]) == 1
    ref = VMUNet(1, 2, **TINY).eval()
    load_pretrained(ref, src)
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.encoder(x)[3], ref.encoder(x)[3])

    # Trained published checkpoint (best.pth = raw state dict) converts with no missing keys.
    trained = vm_unet.create_model("vmunet_isic", 3, 1, **TINY)
    best = tmp_path / "best.pth"
    torch.save(published_vmunet_state_dict(trained), best)
    assert cli.main([str(best), str(tmp_path / "isic.pth"), "--set", "dims=8,16,32,64", "depths=1,1,1,1",
                     "depths_decoder=1,1,1,1", "--preprocessing", "published"]) == 0
    assert "missing 0" in capsys.readouterr().out
    model, meta = load_checkpoint(tmp_path / "isic.pth")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), trained.eval()(x))

    # Wrong shapes: exit code 2 and a one-line message naming the key.
    assert cli.main([str(src), str(tmp_path / "x.pth"), "--set", "dims=16,32,64,128", "depths=1,1,1,1",
                     "depths_decoder=1,1,1,1"]) == 2
    assert "patch_embed.proj.weight" in capsys.readouterr().err


def test_create_model_pretrained_loads_a_published_checkpoint(tmp_path):
    torch.manual_seed(2)
    trained = VMUNet(3, 1, **TINY).eval()
    path = tmp_path / "best.pth"
    torch.save(published_vmunet_state_dict(trained), path)
    model = vm_unet.create_model("vmunet_isic", pretrained=path, **TINY).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), trained(x))
    with pytest.raises(WeightsError, match="shape"):
        vm_unet.create_model("vmunet_isic", pretrained=path, dims=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                             depths_decoder=[1, 1, 1, 1])
