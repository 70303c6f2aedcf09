"""vm_unet.checkpoint: round trip, weights_only loading, atomic writes, one-line errors."""
import pytest
import torch

import vm_unet
from vm_unet.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from vm_unet.errors import UserError
from vm_unet.models import model_config

TINY = dict(dims=[8, 16, 32, 64], depths=[1, 1, 1, 1], depths_decoder=[1, 1, 1, 1], d_state=2)


def _save(path, num_classes=1, model=None):
    kw = model_config("vmunet_isic", 3, num_classes, **TINY)
    model = model or vm_unet.create_model("vmunet_isic", **kw)
    save_checkpoint(path, model, model_name="vmunet_isic", model_kwargs=kw,
                    preprocessing={"input": "image2d", "image_size": [32, 32], "in_chans": 3,
                                   "normalize": {"mean": [0.5] * 3, "std": [0.25] * 3, "max_pixel_value": 255.0}},
                    class_names=["background", "lesion"] if num_classes == 1 else [f"c{i}" for i in range(num_classes)],
                    extra={"note": "x", "score": torch.tensor(1.0).item()}, training_state={"step": 3})
    return model


def test_roundtrip_same_outputs_and_meta(tmp_path):
    torch.manual_seed(0)
    m = _save(tmp_path / "a.pt", num_classes=3).eval()
    m2, meta = load_checkpoint(tmp_path / "a.pt")
    x = torch.randn(1, 3, 32, 48)
    assert torch.equal(m(x), m2(x))
    assert meta["task"] == "multiclass" and meta["model_kwargs"]["num_classes"] == 3
    assert meta["preprocessing"]["image_size"] == [32, 32] and meta["class_names"] == ["c0", "c1", "c2"]
    assert meta["package_version"] and "state_dict" not in meta and "training_state" not in meta
    # only tensors and primitives inside: the safe loader accepts it
    raw = torch.load(tmp_path / "a.pt", weights_only=True)
    assert raw["training_state"] == {"step": 3}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_ddp_prefix_stripped(tmp_path):
    kw = model_config("vmunet_isic", 3, 1, **TINY)
    m = vm_unet.create_model("vmunet_isic", **kw)
    sd = {f"module.{k}": v for k, v in m.state_dict().items()}
    save_checkpoint(tmp_path / "d.pt", sd, model_name="vmunet_isic", model_kwargs=kw, preprocessing={},
                    class_names=["bg", "fg"])
    load_checkpoint(tmp_path / "d.pt")


def test_errors_are_one_line(tmp_path):
    cases = {"missing": tmp_path / "nope.pt"}
    (tmp_path / "corrupt.pt").write_bytes(b"\x00garbage" * 10)
    cases["corrupt"] = tmp_path / "corrupt.pt"
    torch.save({"weight": torch.zeros(2)}, tmp_path / "foreign.pt")
    cases["foreign"] = tmp_path / "foreign.pt"
    _save(tmp_path / "trunc.pt")
    data = (tmp_path / "trunc.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    cases["truncated"] = tmp_path / "trunc.pt"
    (tmp_path / "log.pt").write_text("epoch 1: train loss 0.3\n")
    cases["text"] = tmp_path / "log.pt"
    for what, p in cases.items():
        with pytest.raises(CheckpointError) as ei:
            load_checkpoint(p)
        msg = str(ei.value)
        assert "\n" not in msg and str(p) in msg, (what, msg)
        assert isinstance(ei.value, ValueError) and isinstance(ei.value, UserError)
        if what in ("text", "truncated", "corrupt"):
            assert "not a PyTorch checkpoint" in msg and "weights_only" not in msg, (what, msg)


def test_mismatched_weights(tmp_path):
    _save(tmp_path / "m.pt")
    raw = read_checkpoint(tmp_path / "m.pt")
    raw["model_kwargs"]["dims"] = [16, 32, 64, 128]
    torch.save(raw, tmp_path / "m2.pt")
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(tmp_path / "m2.pt")
