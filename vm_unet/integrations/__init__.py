"""Hooks into other libraries: smp encoders and MONAI FlexibleUNet backbones (see ``smp.py``, ``monai.py``).

``register_all()`` runs on ``import vm_unet``; each hook is skipped when its library is not installed (or fails to
import), so vm_unet itself never depends on them being importable. Importing smp and MONAI costs a few seconds; set
``VM_UNET_NO_INTEGRATIONS=1`` to skip the hooks (call ``register_all()`` later to add them).
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

REGISTERED: dict[str, bool] = {}


def register_all(force: bool = False) -> dict[str, bool]:
    """Register every available integration; returns ``{"smp": bool, "monai": bool}`` (True = registered).

    Does nothing when ``VM_UNET_NO_INTEGRATIONS=1`` unless ``force``."""
    if not force and os.environ.get("VM_UNET_NO_INTEGRATIONS", "0") == "1":
        return dict(REGISTERED)
    for name in ("smp", "monai"):
        if REGISTERED.get(name):
            continue
        try:
            module = __import__(f"vm_unet.integrations.{name}", fromlist=["register"])
            module.register()
            REGISTERED[name] = True
        except ImportError as e:  # library missing or broken (e.g. smp without torchvision)
            log.debug("vm_unet: %s integration not registered: %s", name, e)
            REGISTERED[name] = False
    return dict(REGISTERED)
