"""Scan kernels: selective scan, scan routes, the SS2D core and its output stage, the blocks' depthwise conv, each with
a pure-PyTorch reference.

Installed as ``vm_unet.kernels``.
"""
from .backend import requested_backend, use_triton
from .depthwise_conv import depthwise_conv2d
from .norm_gate import norm_gate, norm_gate_reference
from .routes import cross_merge, cross_scan, list_routes, register_route, route_indices, route_inverse
from .selective_scan import selective_scan_fn
from .selective_scan_torch import selective_scan_torch
from .ss2d import channels_last_is_faster, ss2d_core, ss2d_core_packed, ss2d_core_reference

__all__ = [
    "channels_last_is_faster", "cross_merge", "cross_scan", "depthwise_conv2d", "list_routes", "norm_gate",
    "norm_gate_reference", "register_route", "requested_backend", "route_indices", "route_inverse",
    "selective_scan_fn", "selective_scan_torch", "ss2d_core", "ss2d_core_packed", "ss2d_core_reference",
    "use_triton",
]
