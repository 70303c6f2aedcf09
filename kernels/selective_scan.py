"""``selective_scan_fn``: mamba-compatible entry point that dispatches to Triton or the PyTorch reference."""
from __future__ import annotations

from .backend import use_triton
from .selective_scan_torch import selective_scan_torch


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False):
    """Selective scan with mamba_ssm's signature; B/C (batch, N, L) or grouped (batch, G, N, L).

    Returns ``out`` (batch, D, L) in u's dtype, and the last state (batch, D, N) if ``return_last_state``.
    """
    if use_triton(u, delta, B, C):
        from .triton_selective_scan import selective_scan_triton  # noqa: PLC0415
        return selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    return selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
