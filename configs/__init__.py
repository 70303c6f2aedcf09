"""Ready-made YAML configs, installed as package data (see ``resolve_config``)."""
from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def list_configs() -> list[str]:
    return sorted(p.stem for p in _HERE.glob("*.yaml"))


def resolve_config(name_or_path) -> Path:
    """Path of a config given a file path or a bare shipped name (``isic2016`` or ``isic2016.yaml``)."""
    from vm_unet.errors import ConfigError

    p = Path(name_or_path)
    if p.is_file():
        return p
    stem = p.name[:-5] if p.name.endswith((".yaml", ".yml")) else p.name
    if p.parent == Path(".") and (_HERE / f"{stem}.yaml").is_file():
        return _HERE / f"{stem}.yaml"
    raise ConfigError(f"{name_or_path}: config file not found; shipped configs: {', '.join(list_configs())}")
