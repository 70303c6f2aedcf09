"""The blocks' depthwise convolution with gradients: cuDNN's forward and input gradient, channels last, and the weight
and bias gradients in Triton (``triton_depthwise_conv``).

    x        (b, C, H, W)   any strides
    weight   (C, 1, 3, 3)   the conv's weight, any float dtype (its gradient comes back in its dtype)
    bias     (C,) or None
    returns  (b, C, H, W)   ``F.conv2d(x, weight, bias, padding=1, groups=C)`` in x's dtype, channels last or
                            channel first as asked: the layout the conv and its input gradient run in (the
                            bias added after the custom op, see ``depthwise3x3_conv``)

Why: cuDNN's weight gradient of a depthwise conv is a reduction over every position into nine numbers a channel, plus
a second pass for the bias. Channels last it took 1.7x (stage 1 at 256² batch 32) to 4.2x (2048² batch 1) the time
of the Triton reduction; its forward and input gradient are fast channels last, and 5x slower channel first (where
eager training at d_state 16 runs them, in the scan's layout; BENCHMARKS.md, twenty-seventh session). ``F.conv2d``
stays the reference and the path everywhere else: on CPU, other kernel sizes, and without gradients (where inductor
picks the conv's layout itself).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import use_triton


def _layout(x: torch.Tensor) -> torch.memory_format:
    """The layout the op runs in: x's, dense (the wrapper made it so)."""
    last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if last else torch.contiguous_format


# Eager (outside torch.compile) the fused path only from this many positions (batch x height x width) a call. Each
# call costs host time (the custom ops' dispatch, the Triton launch, the partial sums), which an eager training step,
# bound by the host at the blocks' usual sizes, pays in full. Measured on H200 (BENCHMARKS.md, twenty-seventh
# session, vmunet_isic eager training with the fused path at every size): 256² b32 even, 1024² b2 8-17% slower,
# 2048² b1 +4% (stage 1 there is 2^18 positions a call).
EAGER_MIN_POSITIONS = 1 << 18


def _fused_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    b, c, h, w = x.shape
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if not (needs_grad and tuple(weight.shape) == (c, 1, 3, 3) and use_triton(x)):
        return False
    return torch.compiler.is_compiling() or b * h * w >= EAGER_MIN_POSITIONS


@torch.library.custom_op("vm_unet::depthwise3x3_conv", mutates_args=())
def depthwise3x3_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The conv in x's dtype and layout (see the module docstring), **without** the bias: ``depthwise_conv2d`` adds
    it outside the op, where torch.compile fuses the add into the next kernel (cuDNN adds a bias NHWC in a pass of
    its own: 71 µs a stage-1 layer at 256² batch 32 on an H200). The op takes the bias for its backward, which
    returns the bias's gradient from the weight gradient's reduction."""
    # autocast (if on) chose x's dtype before the call; the weight follows it, as autocast's conv2d casts it
    with torch.autocast(x.device.type, enabled=False):
        return F.conv2d(x, weight.to(x.dtype), None, padding=1, groups=x.shape[1]).contiguous(
            memory_format=_layout(x))


@depthwise3x3_conv.register_fake
def _(x, weight, bias):
    return torch.empty_like(x, memory_format=_layout(x))


@torch.library.custom_op("vm_unet::depthwise3x3_conv_bwd", mutates_args=())
def depthwise3x3_conv_bwd(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, has_bias: bool
                          ) -> list[torch.Tensor]:
    """[dx, d weight, d bias] (d bias empty without a bias): dx from cuDNN in x's layout, the others from Triton."""
    from .triton_depthwise_conv import depthwise3x3_weight_grad  # noqa: PLC0415 (triton is imported only when used)

    c, fmt = x.shape[1], _layout(x)
    g = grad.to(x.dtype).contiguous(memory_format=fmt)
    with torch.autocast(x.device.type, enabled=False):
        dx = torch.ops.aten.convolution_backward(g, x, weight.to(x.dtype), None, [1, 1], [1, 1], [1, 1], False,
                                                 [0, 0], c, [True, False, False])[0]
    dx = dx.contiguous(memory_format=fmt)
    dw, db = depthwise3x3_weight_grad(x, g)
    return [dx, dw.to(weight.dtype), db.to(weight.dtype) if has_bias else db.new_empty(0, dtype=weight.dtype)]


@depthwise3x3_conv_bwd.register_fake
def _(grad, x, weight, has_bias):
    return [torch.empty_like(x, memory_format=_layout(x)), torch.empty_like(weight),
            weight.new_empty(weight.shape[0] if has_bias else 0)]


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    # the gradient into x's layout here, outside the op: under torch.compile this copy is part of the traced graph,
    # and inductor writes the gradient in that layout from the kernel that makes it (the SiLU's backward) instead of
    # copying it inside the op (stage 1 at 256² batch 32: 141 µs a layer, BENCHMARKS.md, thirtieth session)
    grad = grad.contiguous(memory_format=_layout(x))
    dx, dw, db = depthwise3x3_conv_bwd(grad, x, weight, ctx.has_bias)
    return dx, dw, db if ctx.has_bias else None


depthwise3x3_conv.register_autograd(_backward, setup_context=_setup_context)


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     channels_last: bool = False) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=k // 2, groups=C)`` for a (C, 1, k, k) weight, odd k. With gradients on
    CUDA and k = 3 (eager, from ``EAGER_MIN_POSITIONS``): the fused path, run and returned channels last or channel
    first (``channels_last``), which costs x one copy if it is not already dense that way (``VM_UNET_BACKEND`` forces
    either path). Elsewhere x is made contiguous first: PyTorch's conv returns the weight's gradient in other
    strides than the parameter's when x is not, which DDP then copies into its buckets every step."""
    c, k = x.shape[1], weight.shape[-1]
    if _fused_applies(x, weight, bias):
        if x.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        # dense before the op, so the tensor it keeps for the backward is the one cuDNN reads
        y = depthwise3x3_conv(x.contiguous(memory_format=fmt), weight, bias)
        if bias is not None:
            # the op's gradient covers the bias (see depthwise3x3_conv): detached here, so it is not summed twice
            y = y + bias.detach().to(y.dtype)[:, None, None]
        return y
    return F.conv2d(x.contiguous(), weight, bias, padding=k // 2, groups=c)
