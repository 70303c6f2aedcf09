"""VM-UNet: Vision-Mamba U-Net for medical image segmentation.

Public API::

    vm_unet.create_model(name, in_chans=3, num_classes=1, **overrides)   # logits, any H×W
    vm_unet.list_models()
    vm_unet.selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    vm_unet.cross_scan(x, route="cross"), vm_unet.cross_merge(y, H, W, route="cross")
"""
from importlib.metadata import PackageNotFoundError, version

from vm_unet.kernels import cross_merge, cross_scan, list_routes, selective_scan_fn

from .models import VMUNet, create_model, list_models

try:
    __version__ = version("vm-unet")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["VMUNet", "__version__", "create_model", "cross_merge", "cross_scan", "list_models", "list_routes",
           "selective_scan_fn"]
from vm_unet.integrations import register_all as _register; _register()  # noqa: E402,E702 (smp/MONAI hooks)
