"""Scan routes: how an H×W image becomes K sequences. A route is data, an index map, not code.

``route_indices(name, H, W)`` returns a LongTensor (K, H*W) with ``seq_k[l] = x.flatten()[idx[k, l]]``; each row
is a permutation of ``range(H*W)``. The scan kernels (reference and Triton) read and write through these maps, so a
new route is a new index map, not a new kernel.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

_ROUTES: dict[str, Callable[[int, int], torch.Tensor]] = {}


def register_route(name: str):
    def wrap(fn: Callable[[int, int], torch.Tensor]):
        _ROUTES[name] = fn
        return fn
    return wrap


def list_routes() -> list[str]:
    return sorted(_ROUTES)


def _row_major(h: int, w: int) -> torch.Tensor:
    return torch.arange(h * w)


def _col_major(h: int, w: int) -> torch.Tensor:
    return torch.arange(h * w).view(h, w).t().reshape(-1)


@register_route("cross")
def _cross(h: int, w: int) -> torch.Tensor:
    """VMamba's 4-way cross scan, in the published order: rows, columns, rows reversed, columns reversed."""
    rows, cols = _row_major(h, w), _col_major(h, w)
    return torch.stack([rows, cols, rows.flip(0), cols.flip(0)])


@functools.lru_cache(maxsize=256)
def _cached(name: str, h: int, w: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    idx = _ROUTES[name](h, w).to(torch.long)
    inv = torch.empty_like(idx)
    inv.scatter_(1, idx, torch.arange(h * w).expand_as(idx).contiguous())
    return idx.to(device), inv.to(device)


def route_indices(name: str, h: int, w: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(K, H*W) gather map of route ``name``."""
    if name not in _ROUTES:
        raise KeyError(f"unknown scan route {name!r}; available: {', '.join(list_routes())}")
    return _cached(name, h, w, str(torch.device(device)))[0]


def route_inverse(name: str, h: int, w: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(K, H*W) inverse permutations: ``x.flatten()[p] = seq_k[inv[k, p]]``."""
    route_indices(name, h, w, device)
    return _cached(name, h, w, str(torch.device(device)))[1]


def num_directions(name: str) -> int:
    return route_indices(name, 2, 2).shape[0]


def cross_scan(x: torch.Tensor, route: str = "cross") -> torch.Tensor:
    """(B, C, H, W) -> (B, K, C, H*W): the K route orderings of x (differentiable)."""
    if x.dim() != 4:
        raise ValueError(f"cross_scan expects (B, C, H, W), got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    idx = route_indices(route, h, w, x.device)
    k = idx.shape[0]
    return x.flatten(2).index_select(2, idx.reshape(-1)).view(b, c, k, h * w).transpose(1, 2)


def cross_merge(y: torch.Tensor, h: int, w: int, route: str = "cross") -> torch.Tensor:
    """(B, K, C, H*W) -> (B, C, H, W): each direction mapped back to its pixel and summed (adjoint of cross_scan)."""
    if y.dim() != 4 or y.shape[-1] != h * w:
        raise ValueError(f"cross_merge expects (B, K, C, {h}*{w}), got shape {tuple(y.shape)}")
    b, k, c, _ = y.shape
    inv = route_inverse(route, h, w, y.device)
    if inv.shape[0] != k:
        raise ValueError(f"route {route!r} has {inv.shape[0]} directions, y has {k}")
    # y[:, k, :, inv[k, p]] is direction k's value at pixel p; gather all K at once then sum.
    offsets = (torch.arange(k, device=y.device) * (h * w)).view(k, 1)
    flat = y.transpose(1, 2).reshape(b, c, k * h * w)
    merged = flat.index_select(2, (inv + offsets).reshape(-1)).view(b, c, k, h * w).sum(2)
    return merged.view(b, c, h, w)
