"""VMamba v0 building blocks as used by the published VM-UNet (GUIDE §1), in (B, H, W, C) layout.

Parameter shapes and names follow the published code (``x_proj_weight``, ``dt_projs_weight``, ``A_logs``, ...), so
official checkpoints map onto these modules by renaming only.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vm_unet.kernels import channels_last_is_faster, depthwise_conv2d, norm_gate, ss2d_core_packed, use_triton
from vm_unet.kernels.routes import num_directions, parse_route, quadtree_orders, quadtree_shift, route_info


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval or with p=0)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


def init_dt_bias(d_inner: int, copies: int, dt_min: float = 1e-3, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4) -> torch.Tensor:
    """mamba_init: dt ~ logUniform[dt_min, dt_max], stored as inverse-softplus so softplus(bias) = dt."""
    dt = torch.exp(torch.rand(copies, d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))


def init_dt_weight(d_inner: int, dt_rank: int, copies: int, dt_scale: float = 1.0) -> torch.Tensor:
    std = dt_rank ** -0.5 * dt_scale
    return torch.empty(copies, d_inner, dt_rank).uniform_(-std, std)


def init_A_logs(d_inner: int, d_state: int, copies: int) -> torch.Tensor:
    """A = -(1..N) per row, stored as log."""
    a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(copies * d_inner, 1)
    return torch.log(a)


class QuadtreeRouter(nn.Module):
    """QuadMamba's learnable quadtree scan for one block: scores -> which quadrants to refine -> per-sample order.

    Follows QuadMamba (Xie et al., NeurIPS 2024): a light predictor scores the locality of every token from its
    own features and the global mean (DynamicViT-style local + global branches); the token scores are averaged
    over the 4 coarse quadrants (1/2 of each side); the ``refine`` best quadrants are split again into 4
    sub-quadrants (1/4 of each side), chosen by Gumbel-softmax (noise in training, plain arg-top-k in eval, so
    eval is deterministic); the sequence lists quadrants (and inside refined ones, sub-quadrants) in row-major
    order, each scanned row-major, plus its reverse (K = 2, as in QuadMamba); block ``shift_index`` moves the
    partition by ``kernels.routes.QUADTREE_SHIFTS`` (omnidirectional shifting, cyclic).

    The straight-through mask: the paper builds both the coarse and the fine sequence and mixes them with the
    hard-forward / soft-backward mask M, and mixes the two un-scans of the output the same way. Here the scan runs
    once on the hard per-sample order, and the same gradient reaches M through terms that are exactly zero in the
    forward: ``x + (M_soft - M_soft.detach()) * U_hard(S_fine x - S_coarse x)`` before the projections and the
    scan, and ``y + (M_soft - M_soft.detach()) * (U_fine S_hard y - U_coarse S_hard y)`` after the merge (S/U:
    scan/un-scan by an order). Because the second direction is the reverse of the first, one term per side covers
    both directions. Differences from the paper: the predictor widths (hidden = d_inner/16), the shift amount (half
    a fine window) and the shift cycle (none, right, down, left, up) are our choices; odd sides split with the
    larger half first; the scores are computed from the block's conv output (d_inner channels).
    """

    def __init__(self, dim: int, refine: int = 1, tau: float = 1.0):
        super().__init__()
        if not 1 <= refine <= 3:
            raise ValueError(f"quadtree refine must be 1..3 of the 4 quadrants, got {refine}")
        hidden = max(dim // 16, 8)     # light: ~3% of the model over all blocks
        self.refine, self.tau = refine, tau
        self.shift_index = 0            # set by the encoder/U-Net: the block's position in the network
        self.norm = nn.LayerNorm(dim)
        self.local = nn.Sequential(nn.Linear(dim, hidden), nn.GELU())
        # no bias on the last layer: quadrant choice is a softmax over score means, blind to a constant shift
        self.score = nn.Sequential(nn.Linear(2 * hidden, hidden // 2), nn.GELU(), nn.Linear(hidden // 2, 1, bias=False))

    def extra_repr(self) -> str:
        return f"refine={self.refine}, tau={self.tau}, shift_index={self.shift_index}"

    def forward(self, x: torch.Tensor) -> "QuadtreePlan":
        """x (b, D, H, W) -> the plan: per-sample index map (b, 2, H*W) and the straight-through terms."""
        b, _, h, w = x.shape
        tok = self.local(self.norm(x.permute(0, 2, 3, 1)))                       # (b, H, W, hidden)
        glob = tok.mean(dim=(1, 2), keepdim=True).expand_as(tok)
        scores = self.score(torch.cat([tok, glob], dim=-1))
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32)).view(b, h * w)  # >= fp32 under autocast
        coarse, fine, inv_coarse, inv_fine, win_seq, win_pix, counts = quadtree_orders(
            h, w, quadtree_shift(h, w, self.shift_index), x.device)
        logits = scores.new_zeros(b, 4).index_add(1, win_pix, scores) / counts.clamp(min=1)
        # empty quadrants (a side of 1) are never refined; a finite floor keeps softmax gradients finite
        logits = logits.masked_fill(counts == 0, -1e4)
        if self.training:
            gumbel = -torch.empty_like(logits).exponential_().log()
            logits = logits + gumbel
        soft = torch.softmax(logits / self.tau, dim=-1)
        nonempty = (2 if h > 1 else 1) * (2 if w > 1 else 1)          # from the sizes: no device sync
        refine = min(self.refine, nonempty)
        hard = torch.zeros_like(soft).scatter_(1, logits.topk(refine, dim=-1).indices, 1.0)
        order = torch.where(hard[:, win_seq] > 0, fine, coarse)                    # (b, L)
        return QuadtreePlan(order, soft, hard, fine, coarse, inv_fine, inv_coarse, win_pix)


class QuadtreePlan:
    """One block's chosen quadtree order and the straight-through terms (see ``QuadtreeRouter``)."""

    def __init__(self, order, soft, hard, fine, coarse, inv_fine, inv_coarse, win_pix):
        self.order, self.soft, self.hard = order, soft, hard
        self.indices = torch.stack([order, order.flip(-1)], dim=1)                  # (b, 2, L): K = 2
        self._fine, self._coarse, self._inv_fine, self._inv_coarse = fine, coarse, inv_fine, inv_coarse
        self._win_pix = win_pix

    def _st(self, t: torch.Tensor, plus: torch.Tensor, minus: torch.Tensor) -> torch.Tensor:
        # t + (M_soft - M_soft.detach()) * (t[plus] - t[minus]): the added term is exactly 0 in the forward
        if not (torch.is_grad_enabled() and self.soft.requires_grad):
            return t
        b, d, h, w = t.shape
        st = (self.soft - self.soft.detach())[:, self._win_pix].to(t.dtype).unsqueeze(1)   # (b, 1, L)
        flat = t.reshape(b, d, h * w)
        take = lambda i: flat.gather(2, i.unsqueeze(1).expand(b, d, h * w))  # noqa: E731
        return t + (st * (take(plus) - take(minus))).view(b, d, h, w)

    def straight_through_in(self, x: torch.Tensor) -> torch.Tensor:
        """x + ST * U_hard(S_fine x - S_coarse x): pixel p reads fine/coarse at its hard sequence position."""
        ar = torch.arange(self.order.shape[1], device=self.order.device).expand_as(self.order)
        inv = torch.empty_like(self.order).scatter_(1, self.order, ar)               # (b, L) hard inverse
        return self._st(x, self._fine[inv], self._coarse[inv])

    def straight_through_out(self, y: torch.Tensor) -> torch.Tensor:
        """y + ST * (U_fine S_hard y - U_coarse S_hard y)."""
        return self._st(y, self.order[:, self._inv_fine], self.order[:, self._inv_coarse])


class SSMCore(nn.Module):
    """The scan half both SS2D variants share: per-direction projections and SSM parameters (published names and
    mamba init), the route (with a ``QuadtreeRouter`` for data-dependent routes), ``conv_act`` (the layout of the
    subclass's ``conv2d`` output) and ``forward_core``."""

    def _init_ssm(self, d_model: int, d_inner: int, d_state: int, dt_rank: int | str, route: str) -> None:
        self.d_inner, self.d_state, self.route = d_inner, d_state, route
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        k = num_directions(route)
        base, value = parse_route(route)
        self.router = QuadtreeRouter(d_inner, refine=value) if base == "quadtree" else None
        self.x_proj_weight = nn.Parameter(
            torch.empty(k, self.dt_rank + 2 * d_state, d_inner).uniform_(-1, 1) / math.sqrt(d_inner))
        self.dt_projs_weight = nn.Parameter(init_dt_weight(d_inner, self.dt_rank, k))
        self.dt_projs_bias = nn.Parameter(init_dt_bias(d_inner, k))
        self.A_logs = nn.Parameter(init_A_logs(d_inner, d_state, k))
        self.Ds = nn.Parameter(torch.ones(k * d_inner))
        # Keep the mamba-initialised SSM parameters out of weight decay.
        for p in (self.dt_projs_weight, self.dt_projs_bias, self.A_logs, self.Ds):
            p._no_weight_decay = True

    def conv_act(self, x: torch.Tensor) -> torch.Tensor:
        """SiLU(conv2d(x)) for x (B, D, H, W) of any strides, dense in the layout the fused scan core runs fastest in
        (``kernels.ss2d.channels_last_is_faster``; channel first where the reference runs). Channels last, the conv
        output, the x_proj GEMM, the scan kernels and y all stay channels last with no transposes between them. With
        gradients the conv is ``kernels.depthwise_conv2d`` (on CUDA its weight gradient in Triton, returned in the
        parameter's strides, so DDP copies nothing into its buckets). It runs in the scan's layout, except under
        ``torch.compile``, where it runs channels last (cuDNN's fast layout for it) and inductor fuses the
        conversion into the SiLU; eager, that conversion would be a copy each way."""
        grad = torch.is_grad_enabled()
        last = use_triton(x) and channels_last_is_faster(self.d_state, grad)
        fmt = torch.channels_last if last else torch.contiguous_format
        if grad:
            y = depthwise_conv2d(x, self.conv2d.weight, self.conv2d.bias,
                                 channels_last=last or torch.compiler.is_compiling())
        else:
            y = self.conv2d(x.contiguous(memory_format=fmt))
        return F.silu(y).contiguous(memory_format=fmt)

    def forward_core(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, D, H, W) -> merged scan output (B, D, H, W). x channels last keeps the whole core channels last;
        contiguous x keeps it channel first (``kernels/triton_ss2d.py``). The blocks pick the faster one
        (``kernels.ss2d.channels_last_is_faster``)."""
        route, plan = self.route, None
        if self.router is not None:
            plan = self.router(x)
            route, x = plan.indices, plan.straight_through_in(x)
        b, d, h, w = x.shape
        k, c = self.x_proj_weight.shape[:2]
        # x_proj as one GEMM on x as it is laid out, no permute copies (einsum chose a permuted operand); same math
        # as einsum("bdhw,kcd->bkchw"). Channels last: (b, H·W, D) @ (D, K·c), each direction's dt_low/B/C then a
        # slice of the (b, H, W, K, c) result, which the fused scan reads in place
        weight = self.x_proj_weight.reshape(k * c, d)
        if x.is_contiguous():
            proj = torch.matmul(weight, x.reshape(b, d, h * w)).view(b, k, c, h, w)
        else:
            proj = torch.matmul(x.permute(0, 2, 3, 1).reshape(b, h * w, d), weight.t())
            proj = proj.view(b, h, w, k, c).permute(0, 3, 4, 1, 2)
        # at least fp32 (the scan's state precision), float64 stays float64
        A = -torch.exp(self.A_logs.to(torch.promote_types(self.A_logs.dtype, torch.float32)))
        # dt_low, B, C are rows [0, R), [R, R+N), [R+N, R+2N) of proj; the core takes them as the one tensor
        y = ss2d_core_packed(x, proj, self.dt_projs_weight, self.dt_projs_bias, A, self.Ds, route)
        return plan.straight_through_out(y) if plan is not None else y


class SS2D(SSMCore):
    """2D selective scan: in_proj -> depthwise conv + SiLU -> route scan -> merge -> LayerNorm -> gate -> out_proj.

    ``route`` chooses how the image is turned into sequences (kernels.routes); VMamba's is ``cross`` (K=4). A
    data-dependent route (``quadtree[:R]``) adds a ``QuadtreeRouter`` that picks the order per sample.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 3, expand: float = 2.0,
                 dt_rank: int | str = "auto", route: str = "cross", dropout: float = 0.0, bias: bool = False,
                 conv_bias: bool = True):
        super().__init__()
        self.d_model = d_model
        d_inner = int(expand * d_model)
        self._init_ssm(d_model, d_inner, d_state, dt_rank, route)
        self.in_proj = nn.Linear(d_model, d_inner * 2, bias=bias)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner,
                                bias=conv_bias)
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xz = self.in_proj(x)
        x, z = xz.chunk(2, dim=-1)
        x = self.conv_act(x.permute(0, 3, 1, 2))
        # out_norm(y.permute(0, 2, 3, 1)) * silu(z), fused in eager mode on GPUs (kernels/norm_gate.py)
        y = norm_gate(self.forward_core(x), z, self.out_norm.weight, self.out_norm.bias, self.out_norm.eps)
        return self.dropout(self.out_proj(y))


class VSSBlock(nn.Module):
    """``x + DropPath(SS2D(LayerNorm(x)))``: the VM-UNet block has no MLP."""

    def __init__(self, dim: int, drop_path: float = 0.0, d_state: int = 16, route: str = "cross",
                 attn_drop: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.ss2d = SS2D(dim, d_state=d_state, route=route, dropout=attn_drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.ss2d(self.norm(x)))


class PatchEmbed2D(nn.Module):
    """Conv(k=4, s=4) + LayerNorm -> (B, H/4, W/4, C)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int = 4):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchMerging2D(nn.Module):
    """Gather 2×2 -> LayerNorm(4C) -> Linear(4C -> 2C, no bias). Input sizes are even (the model pads)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class PatchExpand2D(nn.Module):
    """Linear(c_in -> scale²·c_out, no bias) -> scale×scale pixel shuffle -> LayerNorm(c_out).

    Published VM-UNet: decoder expand c_in = 2c, scale 2 (c_out = c); final expand c_in = 96, scale 4 (c_out = 24).
    """

    def __init__(self, in_dim: int, out_dim: int, scale: int):
        super().__init__()
        self.scale = scale
        self.expand = nn.Linear(in_dim, scale * scale * out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        s = self.scale
        x = self.expand(x).view(b, h, w, s, s, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, h * s, w * s, -1)
        return self.norm(x)


class BlockStage(nn.Module):
    """A stage's blocks, run in order. With ``grad_checkpointing`` (set by ``set_grad_checkpointing``), a training
    forward keeps only each block's input and recomputes the block in the backward (non-reentrant
    ``torch.utils.checkpoint``; the RNG state is restored, so drop-path draws the same): about one more forward of
    compute for much less activation memory at high resolution (BENCHMARKS.md)."""

    grad_checkpointing = False

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if recompute else blk(x)
        return x


def set_grad_checkpointing(module: nn.Module, enable: bool = True) -> nn.Module:
    """Switch block-level activation checkpointing on (or off) in every stage inside ``module``."""
    if not isinstance(enable, bool):
        raise ValueError(f"grad checkpointing must be True or False, got {enable!r}")
    for m in module.modules():
        if isinstance(m, BlockStage):
            m.grad_checkpointing = enable
    return module


class EncoderStage(BlockStage):
    """Encoder stage of either family: blocks, then (except the last stage) a downsample.

    Returns (features after the blocks, input of the next stage)."""

    def __init__(self, blocks: Sequence[nn.Module], downsample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.run_blocks(x)
        return x, (self.downsample(x) if self.downsample is not None else x)


class StagedEncoder(nn.Module):
    """Stem + ``EncoderStage``s; the contract both families' encoders share (VM-UNet, smp and MONAI use it).

    ``forward_stages`` returns, per stage, the input it received and the features its blocks produced; VM-UNet
    uses the inputs as skips, backbones use the features. ``channels_last`` says the layout of those tensors.
    """

    channels_last = False

    def _build_stages(self, dims: Sequence[int], depths: Sequence[int], drop_path: Sequence[float] | None,
                      make_block, make_downsample) -> None:
        if len(dims) != len(depths):
            raise ValueError(f"dims {list(dims)} and depths {list(depths)} must have the same length")
        drop_path = list(drop_path) if drop_path is not None else [0.0] * sum(depths)
        self.dims = list(dims)
        self.layers = nn.ModuleList()
        start = 0
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            blocks = [make_block(dim, drop_path[start + j]) for j in range(depth)]
            self.layers.append(EncoderStage(blocks, make_downsample(dim) if i < len(dims) - 1 else None))
            start += depth

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(x)

    def set_grad_checkpointing(self, enable: bool = True) -> "StagedEncoder":
        """Recompute each block in the backward instead of storing its activations (see ``BlockStage``)."""
        return set_grad_checkpointing(self, enable)

    def forward_stages(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """x (B, C, H, W) -> (stage inputs, stage features, last output) in the family's layout."""
        x = self.embed(x)
        inputs, feats = [], []
        for layer in self.layers:
            inputs.append(x)
            feat, x = layer(x)
            feats.append(feat)
        return inputs, feats, x

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Multi-scale features (B, c_i, H/2^(i+2), W/2^(i+2)) in channel-first layout, for backbones."""
        feats = self.forward_stages(x)[1]
        return [f.permute(0, 3, 1, 2).contiguous() for f in feats] if self.channels_last else feats


class VSSEncoder(StagedEncoder):
    """VMamba v0 encoder, (B, H, W, C) layout: patch embed (H/4), stages of VSS blocks with patch merging between.

    Routes flagged ``position_embedding`` (``bidirectional``, as in Vim) add a learnable position embedding to the
    patch-embedded tokens: a (dims[0], pos_embed_grid, pos_embed_grid) map (64 = 256² input / 4), bicubically
    resized to the actual token grid, so any input size works.
    """

    channels_last = True

    def __init__(self, in_chans: int = 3, dims: Sequence[int] = (96, 192, 384, 768),
                 depths: Sequence[int] = (2, 2, 9, 2), d_state: int = 16, drop_path: Sequence[float] | None = None,
                 route: str = "cross", pos_embed_grid: int = 64):
        super().__init__()
        self.patch_embed = PatchEmbed2D(in_chans, dims[0])
        self.pos_embed = None
        if route_info(route).position_embedding:
            self.pos_embed = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, dims[0], pos_embed_grid,
                                                                            pos_embed_grid), std=0.02))
            self.pos_embed._no_weight_decay = True
        self._build_stages(dims, depths, drop_path, lambda dim, dp: VSSBlock(dim, dp, d_state, route), PatchMerging2D)
        number_quadtree_routers(self)

    def add_pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, h, w, C) + the position embedding resized to (h, w)."""
        pe = self.pos_embed
        if pe.shape[-2:] != x.shape[1:3]:
            pe = F.interpolate(pe, size=x.shape[1:3], mode="bicubic", align_corners=False)
        return x + pe.permute(0, 2, 3, 1).to(x.dtype)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        return self.add_pos_embed(x) if self.pos_embed is not None else x


def number_quadtree_routers(model: nn.Module) -> None:
    """Give every quadtree router its block position (module order), which picks its window shift."""
    for i, router in enumerate(m for m in model.modules() if isinstance(m, QuadtreeRouter)):
        router.shift_index = i


def init_vmamba_weights(module: nn.Module) -> None:
    """Published init: Linear trunc-normal(.02) with zero bias, LayerNorm 1/0 (SSM parameters keep mamba_init)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
