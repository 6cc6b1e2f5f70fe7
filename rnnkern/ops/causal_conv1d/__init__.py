"""causal_conv1d: Mamba's short depthwise causal convolution, and its one-step decode form.

The convolution is reference.py's F.pad + depthwise F.conv1d on every backend (already a
native kernel on every device). The one-step update has a C++ kernel on the cpu backend
(fp32/fp64); elsewhere it runs the reference's torch ops. ``backend=`` and RNNKERN_BACKEND
work as for the other ops, so a model forcing one backend runs its convolutions too.
"""
from typing import Optional

import torch
from torch import Tensor

from rnnkern import _backends
from rnnkern.ops import _checks
from rnnkern.ops._common import state_dtype

__all__ = ["causal_conv1d", "causal_conv1d_update"]

ACTIVATIONS = {None: None, "silu": "silu", "swish": "silu"}  # accepted name -> the op's name


_REFERENCE = f"{__name__}.reference"
# Every backend runs the convolution as the reference's F.conv1d, a native kernel on every device.
CAUSAL_CONV1D = _backends.Op(
    "causal_conv1d", functions=("causal_conv1d_fwd", "causal_conv1d_bwd"),
    kernels={"reference": _REFERENCE, "cpu": _REFERENCE, "triton": _REFERENCE},
)
# One decode step: a C++ kernel on the cpu backend (fp32/fp64); the reference's few torch ops on
# CUDA tensors (the triton backend has no kernel of its own for it: it runs those same ops).
CAUSAL_CONV1D_UPDATE = _backends.Op(
    "causal_conv1d_update", functions=("causal_conv1d_update",),
    kernels={"reference": _REFERENCE, "cpu": _backends.COMPILED, "triton": _REFERENCE},
    dtypes={"cpu": _backends.STEP_DTYPES},
)


# ---------------------------------------------------------------------------------------
# torch.library ops. `activation` is None or "silu"; `backend` a plain string (fixed when compiled).


@torch.library.custom_op("rnnkern::causal_conv1d", mutates_args=())
def _causal_conv1d_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str], cu_seqlens: Optional[Tensor],
    backend: str,
) -> Tensor:
    forward = CAUSAL_CONV1D.function(backend, "causal_conv1d_fwd")
    return forward(x, weight, bias, activation, cu_seqlens)


@_causal_conv1d_op.register_fake
def _(x, weight, bias, activation, cu_seqlens, backend):
    return x.new_empty(x.shape)


@torch.library.custom_op("rnnkern::causal_conv1d_bwd", mutates_args=())
def _causal_conv1d_bwd_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str], cu_seqlens: Optional[Tensor],
    grad_out: Tensor, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    backward = CAUSAL_CONV1D.function(backend, "causal_conv1d_bwd")
    return backward(x, weight, bias, activation, cu_seqlens, grad_out)


@_causal_conv1d_bwd_op.register_fake
def _(x, weight, bias, activation, cu_seqlens, grad_out, backend):
    grad_bias = x.new_empty((weight.shape[0],) if bias is not None else (0,))
    return x.new_empty(x.shape), weight.new_empty(weight.shape), grad_bias


def _setup_context(ctx, inputs, output):
    x, weight, bias, activation, cu_seqlens, backend = inputs
    ctx.save_for_backward(x, weight, bias, cu_seqlens)
    ctx.activation, ctx.backend = activation, backend


def _backward(ctx, grad_out):
    x, weight, bias, cu_seqlens = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = _causal_conv1d_bwd_op(
        x, weight, bias, ctx.activation, cu_seqlens, grad_out, ctx.backend
    )
    return grad_x, grad_weight, (grad_bias if bias is not None else None), None, None, None


_causal_conv1d_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("rnnkern::causal_conv1d_update", mutates_args=("conv_state",))
def _causal_conv1d_update_op(
    x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str], backend: str
) -> Tensor:
    update = CAUSAL_CONV1D_UPDATE.function(backend, "causal_conv1d_update")
    return update(x, conv_state, weight, bias, activation)


@_causal_conv1d_update_op.register_fake
def _(x, conv_state, weight, bias, activation, backend):
    return x.new_empty(x.shape)


# ---------------------------------------------------------------------------------------
# Public functions.


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    activation: Optional[str] = None,
    *,
    cu_seqlens: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Depthwise causal 1-D convolution over time, with an optional fused SiLU.

    .. math:: \\text{out}_{b,d,t} = \\text{act}\\Big(\\text{bias}_d + \\sum_{k=0}^{W-1}
              \\text{weight}_{d,k}\\, x_{b,d,t-W+1+k}\\Big), \\qquad x_{b,d,t<0} = 0

    The same as ``torch.nn.Conv1d(D, D, W, groups=D, padding=W - 1)`` keeping the first L
    outputs (its weight ``(D, 1, W)`` squeezed to ``(D, W)``), as in Mamba's block.

    Args:
        x: ``(B, D, L)`` (batch, channels, time); fp16, bf16, fp32 or fp64.
        weight: ``(D, W)``, one filter of W taps per channel (the last tap multiplies x_t);
            dtype and device of ``x``.
        bias: optional ``(D,)``, dtype and device of ``x``.
        activation: None, ``"silu"`` or its alias ``"swish"``.
        cu_seqlens: int32/int64 ``(S + 1,)`` offsets ``[0, l_0, l_0 + l_1, ..., L]`` of S sequences
            packed along L, with ``B == 1``, on x's device, starting at 0, non-decreasing and
            ending at L (as :func:`rnnkern.selective_scan`'s): each sequence sees zeros before its
            own start (``x_{t < start} = 0``), never the previous sequence's inputs.
        backend: force a backend (see :func:`rnnkern.linear_scan`); every backend runs the
            same F.conv1d here.

    Returns:
        ``(B, D, L)`` in the dtype of ``x``; computed in fp32 (fp64 for fp64 inputs) and
        rounded once. Gradients flow to ``x``, ``weight`` and ``bias``.

    Example::

        >>> x = torch.randn(2, 64, 100)                   # (B, D, L)
        >>> w, b = torch.randn(64, 4), torch.randn(64)    # 4 taps per channel
        >>> y = rnnkern.causal_conv1d(x, w, b, activation="silu")   # (2, 64, 100)
        >>> y = rnnkern.causal_conv1d(x[:1], w, b, cu_seqlens=torch.tensor([0, 30, 100]))  # 2 sequences
    """
    activation = _validate(x, weight, bias, activation, cu_seqlens)
    name = _backends.select(CAUSAL_CONV1D, x.device, x.dtype, backend)
    return _causal_conv1d_op(x, weight, bias, activation, cu_seqlens, name)


def causal_conv1d_update(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    activation: Optional[str] = None,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """One decode step of :func:`causal_conv1d`, with a rolling state updated in place.

    ``conv_state`` holds the last W inputs of each channel, newest last (state width W, as
    mamba_ssm's ``causal_conv1d_update`` with a state of length W). A step shifts it left by
    one, writes ``x`` into its last column and returns

    .. math:: \\text{out}_{b,d} = \\text{act}\\Big(\\text{bias}_d + \\sum_{k=0}^{W-1}
              \\text{weight}_{d,k}\\, \\text{conv\\_state}_{b,d,k}\\Big)

    so steps over x[:, :, t] from a zero state equal ``causal_conv1d(x, ...)[:, :, t]``.

    Args:
        x: ``(B, D)``, the input at the current step.
        conv_state: ``(B, D, W)``, dtype of ``x`` or float32 (float64 for fp64 ``x``), on its
            device; modified in place.
        weight, bias, activation, backend: as :func:`causal_conv1d`.

    Returns:
        ``(B, D)`` in the dtype of ``x``. For decoding: no gradients flow through the state.

    Example::

        >>> state = torch.zeros(2, 64, 4)                 # (B, D, W)
        >>> for x_t in torch.randn(100, 2, 64):          # x_t (B, D)
        ...     y_t = rnnkern.causal_conv1d_update(x_t, state, w, b, activation="silu")
    """
    activation = _validate_update(x, conv_state, weight, bias, activation)
    name = _backends.select(CAUSAL_CONV1D_UPDATE, x.device, x.dtype, backend)
    if torch.compiler.is_compiling():
        return _causal_conv1d_update_op(x, conv_state, weight, bias, activation, name)
    # eagerly the kernel runs directly: the op wrapper (kept for torch.compile) costs more
    # than the step itself
    return CAUSAL_CONV1D_UPDATE.function(name, "causal_conv1d_update")(x, conv_state, weight, bias, activation)


def _validate(x, weight, bias, activation, cu_seqlens) -> Optional[str]:
    """Checks the arguments of causal_conv1d; returns the op's activation name."""
    _checks.sequence("x", x, "(B, D, L)", time_dim=2)
    _check_weights(x, weight, bias)
    if cu_seqlens is not None:
        _checks.cu_seqlens(cu_seqlens, x, total=x.shape[2], time="L")
    return _activation(activation)


def _validate_update(x, conv_state, weight, bias, activation) -> Optional[str]:
    """Checks the arguments of causal_conv1d_update; returns the op's activation name."""
    _checks.tensor("x", x, ndim=2, shape_doc="(B, D)")
    _checks.float_dtype("x", x)
    _check_weights(x, weight, bias)
    shape = (x.shape[0], x.shape[1], weight.shape[1])
    _checks.state("conv_state", conv_state, x, shape, state_dtype(x.dtype))
    return _activation(activation)


def _check_weights(x: Tensor, weight, bias) -> None:
    channels = x.shape[1]
    _checks.tensor("weight", weight, ndim=2, shape_doc=f"(D, W) = ({channels}, W)")
    if weight.shape[0] != channels or weight.shape[1] < 1:
        raise ValueError(f"weight must have shape (D, W) = ({channels}, W) with W >= 1, got {tuple(weight.shape)}")
    _checks.parameter("weight", weight, tuple(weight.shape), x)
    if bias is not None:
        _checks.parameter("bias", bias, (channels,), x)


def _activation(activation) -> Optional[str]:
    if not (activation is None or isinstance(activation, str)) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    return ACTIVATIONS[activation]
