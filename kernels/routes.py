"""Scan routes: how an H×W image becomes K sequences. A route is data, an index map, not code.

``route_indices(name, H, W)`` returns a LongTensor (K, H*W) with ``seq_k[l] = x.flatten()[idx[k, l]]``; each row
is a permutation of ``range(H*W)``. The scan kernels (reference and Triton) read and write through these maps, so a
new route is a new index map, not a new kernel.

Routes (``list_routes()``), K in brackets:

- ``cross`` [4]         VMamba: rows, columns, both reversed.
- ``bidirectional`` [2] Vim: rows forward and backward. Models add a learnable position embedding with this route.
- ``zigzag`` [4]        continuous "snake" orders (PlainMamba/ZigMa idea): row-snake, column-snake, both reversed;
                        consecutive tokens are always 4-neighbours, also at row/column ends.
- ``window:S`` [4]      LocalMamba local scan: S×S windows in row-major order, row-major inside each window; the
                        transposed order (windows column-major, column-major inside); both reversed. ``window`` =
                        ``window:8``. Windows are tiled from the top-left over the real H×W; where S does not divide
                        H or W the last row/column of windows is smaller and is scanned as a smaller window, so
                        every map stays a permutation and nothing is padded.
- ``quadtree:R`` [2]    QuadMamba: data-dependent (see ``quadtree_orders`` and ``vm_unet.models.vmamba``): per
                        sample, R of the 4 coarse quadrants are refined into 4 sub-quadrants; the sequence and its
                        reverse. The static map of this name is the unrefined, unshifted order (what a model
                        without its learned predictor would scan).

Parameterised routes are named ``base:value`` (e.g. ``window:4``); the name alone means the default value. Every
place that takes a route name (models, ``ss2d_core``, the Triton kernels) takes these strings unchanged.

``cross_scan``/``cross_merge`` (and ``ss2d_core``) also take the index map itself as a LongTensor, either static
(K, H*W) or per sample (batch, K, H*W); data-dependent routes pass the latter.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Union

import torch

Route = Union[str, torch.Tensor]


@dataclass(frozen=True)
class RouteDef:
    fn: Callable[..., torch.Tensor]
    param: str | None = None             # name of the single integer parameter (``window:8`` -> window_size=8)
    default: int | None = None
    position_embedding: bool = False     # models add a learnable position embedding (order-free routes need it)
    data_dependent: bool = False         # the model computes a per-sample order; the static map is its start


_ROUTES: dict[str, RouteDef] = {}


def register_route(name: str, *, param: str | None = None, default: int | None = None,
                   position_embedding: bool = False, data_dependent: bool = False):
    """Register ``fn(h, w[, param=value]) -> (K, h*w)``; ``param`` makes the route parameterised (``name:value``)."""
    if ":" in name:
        raise ValueError(f"route names cannot contain ':' (it separates the parameter): {name!r}")
    if (param is None) != (default is None):
        raise ValueError("a parameterised route needs both param and default")

    def wrap(fn: Callable[..., torch.Tensor]):
        _ROUTES[name] = RouteDef(fn, param, default, position_embedding, data_dependent)
        return fn
    return wrap


def list_routes() -> list[str]:
    return sorted(_ROUTES)


def parse_route(route: str) -> tuple[str, int | None]:
    """``"window:4"`` -> ``("window", 4)``; ``"window"`` -> ``("window", 8)``; ``"cross"`` -> ``("cross", None)``."""
    if not isinstance(route, str):
        raise TypeError(f"a route name must be a string, got {type(route).__name__}")
    base, sep, value = route.partition(":")
    if base not in _ROUTES:
        raise KeyError(f"unknown scan route {route!r}; available: {', '.join(list_routes())} "
                       f"(parameterised ones as name:value, e.g. window:4)")
    spec = _ROUTES[base]
    if spec.param is None:
        if sep:
            raise ValueError(f"scan route {base!r} takes no parameter, got {route!r}")
        return base, None
    if not sep:
        return base, spec.default
    try:
        num = int(value)
    except ValueError:
        raise ValueError(f"scan route {route!r}: {spec.param} must be an integer") from None
    if num < 1:
        raise ValueError(f"scan route {route!r}: {spec.param} must be >= 1")
    return base, num


def route_info(route: str) -> RouteDef:
    return _ROUTES[parse_route(route)[0]]


def _row_major(h: int, w: int) -> torch.Tensor:
    return torch.arange(h * w)


def _col_major(h: int, w: int) -> torch.Tensor:
    return torch.arange(h * w).view(h, w).t().reshape(-1)


@register_route("cross")
def _cross(h: int, w: int) -> torch.Tensor:
    """VMamba's 4-way cross scan, in the published order: rows, columns, rows reversed, columns reversed."""
    rows, cols = _row_major(h, w), _col_major(h, w)
    return torch.stack([rows, cols, rows.flip(0), cols.flip(0)])


@register_route("bidirectional", position_embedding=True)
def _bidirectional(h: int, w: int) -> torch.Tensor:
    """Vim: one row-major sequence scanned forward and backward."""
    rows = _row_major(h, w)
    return torch.stack([rows, rows.flip(0)])


def _row_snake(h: int, w: int) -> torch.Tensor:
    grid = torch.arange(h * w).view(h, w).clone()
    grid[1::2] = grid[1::2].flip(1)            # odd rows run right-to-left, so row ends join their neighbours
    return grid.reshape(-1)


@register_route("zigzag")
def _zigzag(h: int, w: int) -> torch.Tensor:
    """Row-snake, column-snake (odd columns run bottom-to-top), and both reversed: the layout of ``cross`` with
    continuous orders, as in PlainMamba's continuous 2D scan. ZigMa instead uses one of 8 zigzag schemes per
    layer; here every block sees all 4."""
    rows = _row_snake(h, w)
    cols = _col_major(h, w)[_row_snake(w, h)]    # row-snake of the transpose, as pixel indices of (h, w)
    return torch.stack([rows, cols, rows.flip(0), cols.flip(0)])


def _window_order(h: int, w: int, size: int) -> torch.Tensor:
    """Windows of size×size in row-major order, row-major inside each; border windows are smaller."""
    r = torch.arange(h).view(h, 1).expand(h, w)
    c = torch.arange(w).view(1, w).expand(h, w)
    n_wc = -(-w // size)
    # Sort key: window id (row-major over windows), then the row-major position inside the window.
    key = ((r // size) * n_wc + (c // size)) * (size * size) + (r % size) * size + (c % size)
    return torch.argsort(key.reshape(-1), stable=True)


@register_route("window", param="window_size", default=8)
def _window(h: int, w: int, window_size: int = 8) -> torch.Tensor:
    """LocalMamba local scan with window ``window_size``: local rows, local columns (the transpose), reversed."""
    rows = _window_order(h, w, window_size)
    cols = _col_major(h, w)[_window_order(w, h, window_size)]     # the same order on the transpose
    return torch.stack([rows, cols, rows.flip(0), cols.flip(0)])


# ---- quadtree (QuadMamba) ---------------------------------------------------------------------------------------

QUADTREE_SHIFTS = ((0, 0), (0, 1), (1, 0), (0, -1), (-1, 0))
"""Omnidirectional shifting: block i of a model shifts the partition by ``QUADTREE_SHIFTS[i % 5]`` × half a
fine window (none, right, down, left, up), cyclically (torus), so window borders move between blocks."""


def _halves(n: int) -> list[tuple[int, int]]:
    # [start, stop) of the two halves; the first takes the odd one (odd sizes), an empty second half when n == 1
    m = -(-n // 2)
    return [(0, m), (m, n)]


def quadtree_shift(h: int, w: int, index: int) -> tuple[int, int]:
    """Shift (dy, dx) of block ``index``: half a fine window (side/8), at least 1 pixel when the side allows."""
    sy, sx = QUADTREE_SHIFTS[index % len(QUADTREE_SHIFTS)]
    return sy * (max(h // 8, 1) if h > 1 else 0), sx * (max(w // 8, 1) if w > 1 else 0)


def _trace_safe_cache(fn):
    """lru_cache for index maps that is safe whatever context first builds a map.

    - Bypassed while torch.compile/export trace: a map built then is a FakeTensor and must never be served to a
      later eager call (maps cached by eager runs are fine to reuse while tracing).
    - Maps are built outside inference mode: an inference tensor cached during ``torch.inference_mode()`` could
      not later be saved for backward by a training step.
    """
    def build(*args):
        with torch.inference_mode(False):
            return fn(*args)

    cached = functools.lru_cache(maxsize=256)(build)

    @functools.wraps(fn)
    def wrapper(*args):
        if torch.compiler.is_compiling():
            return fn(*args)
        return cached(*args)

    wrapper.cache_clear = cached.cache_clear
    return wrapper


@_trace_safe_cache
def _quadtree_cpu(h: int, w: int, dy: int, dx: int):
    # Virtual (unshifted) coordinates (rv, cv) sit at pixel ((rv + dy) % h, (cv + dx) % w).
    pix = torch.arange(h * w).view(h, w).roll((-dy, -dx), (0, 1))      # pix[rv, cv] = flat index of that pixel
    coarse, fine, win_seq = [], [], []
    for q, ((r0, r1), (c0, c1)) in enumerate((rr, cc) for rr in _halves(h) for cc in _halves(w)):
        block = pix[r0:r1, c0:c1]
        coarse.append(block.reshape(-1))
        fine.extend(block[a:b, c:d].reshape(-1) for (a, b) in _halves(r1 - r0) for (c, d) in _halves(c1 - c0))
        win_seq.append(torch.full((block.numel(),), q, dtype=torch.long))
    coarse, fine, win_seq = torch.cat(coarse), torch.cat(fine), torch.cat(win_seq)
    win_pix = torch.empty_like(win_seq)
    win_pix[coarse] = win_seq
    inv_coarse, inv_fine = torch.argsort(coarse), torch.argsort(fine)
    counts = torch.bincount(win_seq, minlength=4)
    return coarse, fine, inv_coarse, inv_fine, win_seq, win_pix, counts


def quadtree_orders(h: int, w: int, shift: tuple[int, int] = (0, 0), device: torch.device | str = "cpu"):
    """Both candidate orders of the two-level quadtree partition of an h×w grid.

    Level 1 splits the (shifted) grid into 4 quadrants (halves rounded up first, so odd sides give unequal
    quadrants; a side of 1 gives empty ones); level 2 splits a quadrant the same way. Quadrants come in row-major
    order and each occupies the same range of sequence positions in both orders:

    - ``coarse``: each quadrant scanned row-major;
    - ``fine``:   each quadrant's 4 sub-quadrants in row-major order, each scanned row-major.

    Refining quadrant q = taking ``fine`` over q's range, ``coarse`` elsewhere: any choice is a permutation.
    Returns (coarse, fine, inv_coarse, inv_fine, win_seq, win_pix, counts): gather maps (L,), their inverses,
    the quadrant of each sequence position and of each pixel (L,), and the quadrant sizes (4,).
    """
    dy, dx = shift
    out = _quadtree_cpu(h, w, dy % max(h, 1), dx % max(w, 1))
    return tuple(t.to(device) for t in out)


@register_route("quadtree", param="refine", default=1, data_dependent=True)
def _quadtree(h: int, w: int, refine: int = 1) -> torch.Tensor:
    """Static fallback of the QuadMamba route: the coarse quadrant order and its reverse (no refinement)."""
    if refine > 3:
        raise ValueError(f"quadtree:{refine}: at most 3 of the 4 quadrants can be refined")
    coarse = quadtree_orders(h, w)[0]
    return torch.stack([coarse, coarse.flip(0)])


# ---- index maps and scan/merge ----------------------------------------------------------------------------------

def _inverse(idx: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(idx)
    inv.scatter_(-1, idx, torch.arange(idx.shape[-1], device=idx.device).expand_as(idx).contiguous())
    return inv


@_trace_safe_cache
def _cached(name: str, h: int, w: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    base, value = parse_route(name)
    spec = _ROUTES[base]
    idx = (spec.fn(h, w) if spec.param is None else spec.fn(h, w, **{spec.param: value})).to(torch.long)
    if idx.dim() != 2 or idx.shape[1] != h * w:
        raise ValueError(f"route {name!r} returned shape {tuple(idx.shape)}, expected (K, {h * w})")
    return idx.to(device), _inverse(idx).to(device)


def route_indices(name: str, h: int, w: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(K, H*W) gather map of route ``name``."""
    parse_route(name)
    return _cached(name, h, w, str(torch.device(device)))[0]


def route_inverse(name: str, h: int, w: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(K, H*W) inverse permutations: ``x.flatten()[p] = seq_k[inv[k, p]]``."""
    parse_route(name)
    return _cached(name, h, w, str(torch.device(device)))[1]


def num_directions(route: Route) -> int:
    """K of a route name or of an index map (K, L) / (batch, K, L)."""
    if isinstance(route, torch.Tensor):
        return route.shape[-2]
    return route_indices(route, 2, 2).shape[0]


def _maps(route: Route, b: int, h: int, w: int, device: torch.device, inverse: bool):
    """Gather (or inverse) map as (K, L) or (b, K, L), validated; a tensor route's inverse is computed here."""
    if not isinstance(route, torch.Tensor):
        return (route_inverse if inverse else route_indices)(route, h, w, device)
    if route.dim() not in (2, 3) or route.shape[-1] != h * w or (route.dim() == 3 and route.shape[0] != b):
        raise ValueError(f"an index-map route must be (K, {h * w}) or ({b}, K, {h * w}), got {tuple(route.shape)}")
    if route.dtype != torch.long:
        route = route.long()
    route = route.to(device)
    return _inverse(route) if inverse else route


def _gather_seq(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t (b, F, L) or (b, K, F, L) read through idx (K, L) or (b, K, L) -> (b, K, F, L)."""
    k, length = idx.shape[-2], idx.shape[-1]
    b, f = t.shape[0], t.shape[-2]
    if t.dim() == 3:
        t = t.unsqueeze(1).expand(b, k, f, length)      # a view: gather reads it without copying x K times
    return t.gather(3, idx.view(-1 if idx.dim() == 3 else 1, k, 1, length).expand(b, k, f, length))


def cross_scan(x: torch.Tensor, route: Route = "cross") -> torch.Tensor:
    """(B, C, H, W) -> (B, K, C, H*W): the K route orderings of x (differentiable)."""
    if x.dim() != 4:
        raise ValueError(f"cross_scan expects (B, C, H, W), got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    idx = _maps(route, b, h, w, x.device, inverse=False)
    if idx.dim() == 2:
        # gather whole pixel rows (b, L, C) rather than single elements along L: 2-4x faster on CPU
        k, length = idx.shape
        rows = x.flatten(2).transpose(1, 2).contiguous().index_select(1, idx.reshape(-1))
        return rows.view(b, k, length, c).transpose(2, 3).contiguous()
    return _gather_seq(x.flatten(2), idx)


def cross_merge(y: torch.Tensor, h: int, w: int, route: Route = "cross") -> torch.Tensor:
    """(B, K, C, H*W) -> (B, C, H, W): each direction mapped back to its pixel and summed (adjoint of cross_scan)."""
    if y.dim() != 4 or y.shape[-1] != h * w:
        raise ValueError(f"cross_merge expects (B, K, C, {h}*{w}), got shape {tuple(y.shape)}")
    b, k, c, _ = y.shape
    inv = _maps(route, b, h, w, y.device, inverse=True)
    if inv.shape[-2] != k:
        name = route if isinstance(route, str) else "index map"
        raise ValueError(f"route {name!r} has {inv.shape[-2]} directions, y has {k}")
    if inv.dim() == 3:
        return _gather_seq(y, inv).sum(1).view(b, c, h, w)
    # y[:, k, :, inv[k, p]] is direction k's value at pixel p; gather all K at once (whole channel rows, as in
    # cross_scan), then sum.
    length = h * w
    offsets = (torch.arange(k, device=y.device) * length).view(k, 1)
    rows = y.transpose(2, 3).reshape(b, k * length, c)
    merged = rows.index_select(1, (inv + offsets).reshape(-1)).view(b, k, length, c).sum(1)
    return merged.transpose(1, 2).reshape(b, c, h, w)
