"""Which implementation runs a kernel: the Triton kernels or the pure-PyTorch reference.

``VM_UNET_BACKEND`` = ``auto`` (default: Triton for CUDA tensors, PyTorch otherwise), ``triton`` (force Triton;
on CPU this needs ``TRITON_INTERPRET=1``) or ``torch`` (force the reference everywhere).
"""
from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")


def requested_backend() -> str:
    value = os.environ.get("VM_UNET_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"VM_UNET_BACKEND={value!r} is not one of {', '.join(BACKENDS)}")
    return value


# looked up once at import: a call into importlib (or an lru_cache wrapper) inside the model's forward is a graph
# break for torch.compile, one per SS2D layer (37 in vmunet_isic)
_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_AVAILABLE


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton path should run for these tensors."""
    backend = requested_backend()
    if backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("VM_UNET_BACKEND=triton but triton is not installed (pip install triton)")
        if not on_cuda and not triton_interpreting():
            raise RuntimeError("VM_UNET_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1")
        return True
    return on_cuda and triton_available()
