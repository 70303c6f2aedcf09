"""Config resolution and command-line overrides."""
import pytest

from vm_unet.configs import list_configs, resolve_config
from vm_unet.errors import ConfigError
from vm_unet.training.cli import config_from_args, train_parser
from vm_unet.training.config import apply_sets, load_config


def test_resolve_bare_names_and_paths(tmp_path):
    assert {"synthetic", "isic", "isic2016", "brats_slices", "synapse"} <= set(list_configs())
    assert resolve_config("isic2016").name == "isic2016.yaml" == resolve_config("isic2016.yaml").name
    p = tmp_path / "mine.yaml"
    p.write_text("train: {epochs: 7}\n")
    assert resolve_config(str(p)) == p and load_config(str(p))["train"]["epochs"] == 7
    with pytest.raises(ConfigError, match="not found"):
        resolve_config("nope")
    p.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(str(p))


def test_every_shipped_config_loads_with_known_sections():
    for name in list_configs():
        cfg = load_config(name)
        assert {"model", "data", "train"} <= set(cfg) and cfg["data"]["kind"] in ("synthetic", "folder", "nifti", "synapse")


def test_flags_and_set_override():
    args = train_parser().parse_args(["--config", "isic", "--data-root", "/d", "--epochs", "3", "--image-size", "96x128",
                                      "--set", "train.lr=3e-4", "--set", "model.overrides={dims: [8, 16, 32, 64]}",
                                      "--set", "train.ema=0.999", "--model", "vmunet_fast", "--seed", "5"])
    cfg = config_from_args(args)
    assert cfg["data"]["root"] == "/d" and cfg["train"]["epochs"] == 3 and cfg["data"]["image_size"] == [96, 128]
    assert cfg["train"]["lr"] == 3e-4 and isinstance(cfg["train"]["lr"], float)
    assert cfg["model"]["overrides"] == {"dims": [8, 16, 32, 64]} and cfg["model"]["name"] == "vmunet_fast"
    assert cfg["train"]["ema"] == 0.999 and cfg["seed"] == 5
    assert cfg["train"]["batch_size"] == 32  # untouched keys keep the file's value
    with pytest.raises(ConfigError):
        apply_sets(cfg, ["novalue"])
