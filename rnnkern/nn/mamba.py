"""Mamba block on rnnkern's ops: mamba_ssm's ``Mamba`` parameter names, shapes and init.

A state dict of ``mamba_ssm.modules.mamba_simple.Mamba`` loads into :class:`Mamba` with the
same constructor arguments. The block runs :func:`rnnkern.causal_conv1d` and
:func:`rnnkern.selective_scan` (training, prefill) or their one-step forms
:func:`rnnkern.causal_conv1d_update` and :func:`rnnkern.selective_state_update` (decoding).
"""
import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnkern.nn import _checks, _onnx
from rnnkern.nn._ssm import (inverse_softplus_time_steps, last_columns, state_shape,
                             takes_fused_step, wide, wide_dtype)
from rnnkern.nn._step_cache import StepCache, registered_or_attribute
from rnnkern.ops.causal_conv1d import causal_conv1d, causal_conv1d_update
from rnnkern.ops.mamba_block_step import MAMBA_BLOCK_STEP, cpu_mamba_block_step
from rnnkern.ops.selective_scan import selective_scan, selective_state_update

__all__ = ["Mamba"]

class Mamba(nn.Module):
    """The Mamba block (selective state-space model) of Gu and Dao, 2023.

    With E = expand * d_model channels inside, N = d_state, R = dt_rank, per sequence::

        x, z   = split(in_proj(u))                              each (L, E)
        x      = silu(causal_conv1d(x, conv1d.weight, conv1d.bias))
        dt, B, C = split(x_proj(x))                             (L, R), (L, N), (L, N)
        dt     = softplus(dt_proj(dt))                          (L, E)
        h_t    = exp(dt_t * A) * h_{t-1} + dt_t * B_t * x_t     (E, N),  A = -exp(A_log)
        y_t    = (h_t C_t + D * x_t) * silu(z_t)
        out    = out_proj(y)                                    (L, d_model)

    Args: as mamba_ssm's ``Mamba``: d_model, d_state (N), d_conv (taps of the convolution),
    expand (E = expand * d_model), dt_rank (``"auto"``: ceil(d_model / 16)), dt_min, dt_max,
    dt_init (``"random"`` or ``"constant"``), dt_scale, dt_init_floor (initialisation of
    dt_proj), conv_bias, bias (of in_proj and out_proj), layer_idx (kept for callers that
    index caches by layer), device, dtype; plus ``backend`` passed to the selective-scan ops
    (the convolution has one implementation, the reference, on every device).

    Parameters (mamba_ssm's names and shapes): in_proj ``Linear(d_model, 2E)``, conv1d
    ``Conv1d(E, E, d_conv, groups=E, padding=d_conv - 1)``, x_proj ``Linear(E, R + 2N)``,
    dt_proj ``Linear(R, E)``, A_log ``(E, N)``, D ``(E,)``, out_proj ``Linear(E, d_model)``.
    A_log and D are kept in float32 (float64 when ``dtype`` is float64) and flagged
    ``_no_weight_decay``; dt_proj.bias is softplus^-1 of dt drawn log-uniformly from
    [dt_min, dt_max] (at least dt_init_floor).

    Shapes:
        forward: ``(B, L, d_model)`` -> ``(B, L, d_model)``.
        allocate_inference_cache: -> conv_state ``(B, E, d_conv)``, ssm_state ``(B, E, N)``.
        step: ``(B, 1, d_model)`` and both states -> ``(B, 1, d_model)`` and the states,
        updated in place. Steps from zero states equal forward over the sequence.

    Example::

        >>> block = rnnkern.nn.Mamba(d_model=64, d_state=16)
        >>> y = block(torch.randn(2, 100, 64))                    # (2, 100, 64)
        >>> conv_state, ssm_state = block.allocate_inference_cache(2, max_seqlen=100)
        >>> for u_t in torch.randn(10, 2, 1, 64):                # decode one token at a time
        ...     y_t, conv_state, ssm_state = block.step(u_t, conv_state, ssm_state)  # (2, 1, 64)
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: Union[int, str] = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        layer_idx: Optional[int] = None,
        device=None,
        dtype=None,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        if dt_init not in ("random", "constant"):
            raise ValueError(f"Mamba: dt_init must be 'random' or 'constant', got {dt_init!r}")
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.layer_idx = layer_idx
        self.backend = backend
        # Built in mamba_ssm's order, so one seed draws the same initial values.
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1, bias=conv_bias, **factory
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
        self._init_dt_proj(dt_init, dt_scale, dt_min, dt_max, dt_init_floor)
        wide_factory = {"device": device, "dtype": wide_dtype(dtype)}
        A = torch.arange(1, d_state + 1, **wide_factory).repeat(self.d_inner, 1)  # (E, N): 1 .. N in every row
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, **wide_factory))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)
        self._step_parameters = StepCache()
        self._step_state_sizes = ((self.d_inner, d_conv), (self.d_inner, d_state))  # (B, ...) of the two states

    @torch.no_grad()
    def _init_dt_proj(self, dt_init: str, dt_scale: float, dt_min: float, dt_max: float, floor: float) -> None:
        """weight ~ U(+-std) or = std (std = dt_rank**-0.5 * dt_scale); bias = softplus^-1(dt)."""
        std = self.dt_rank**-0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        else:
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        bias = self.dt_proj.bias
        bias.copy_(inverse_softplus_time_steps(self.d_inner, dt_min, dt_max, floor, bias.device, bias.dtype))
        self.dt_proj.bias._no_reinit = True

    def extra_repr(self) -> str:
        text = f"d_model={self.d_model}, d_state={self.d_state}, d_conv={self.d_conv}, expand={self.expand}"
        if self.backend is not None:
            text += f", backend={self.backend!r}"
        return text

    def forward(self, hidden_states: Tensor) -> Tensor:
        """``(B, L, d_model)`` -> ``(B, L, d_model)``; see the class docstring."""
        out, _, _ = self._forward(hidden_states, return_states=False)
        return out

    def prefill(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`forward` that also returns the decoding states after the last position.

        Returns ``(out, conv_state, ssm_state)``: out ``(B, L, d_model)``; the states as
        :meth:`allocate_inference_cache` makes them, ready for :meth:`step` to continue the
        sequence (conv_state: the last d_conv inputs of the convolution, zeros before the
        start; ssm_state: the scan's last state). mamba_ssm fills its cache this way when
        its forward gets ``inference_params``.
        """
        return self._forward(hidden_states, return_states=True)

    def _forward(self, hidden_states: Tensor, return_states: bool):
        _checks.input_tensor(
            "Mamba", hidden_states, (3,), "(B, L, d_model)", self.d_model, self.in_proj.weight, "d_model"
        )
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (B, 2E, L)
        x, z = xz.chunk(2, dim=1)  # (B, E, L) each
        conv_state = last_columns(x, self.d_conv) if return_states else None  # (B, E, d_conv)
        if _onnx.exporting():  # standard ONNX ops in place of rnnkern's (see _onnx)
            x = _onnx.causal_conv1d_silu(x, self._conv_weight(), self.conv1d.bias)  # (B, E, L)
            dt, B, C = self._project(x.transpose(1, 2))  # (B, L, E), (B, L, N), (B, L, N)
            y, ssm_state = _onnx.selective_scan(
                x, dt.transpose(1, 2), self._A(), B.transpose(1, 2), C.transpose(1, 2), wide(self.D), z,
                wide(self.dt_proj.bias))
            return self.out_proj(y.transpose(1, 2)), conv_state, ssm_state if return_states else None
        x = causal_conv1d(x, self._conv_weight(), self.conv1d.bias, "silu", backend=self.backend)
        dt, B, C = self._project(x.transpose(1, 2))  # (B, L, E), (B, L, N), (B, L, N)
        y, ssm_state = selective_scan(
            x, dt.transpose(1, 2), self._A(), B.transpose(1, 2), C.transpose(1, 2), wide(self.D), z,
            delta_bias=wide(self.dt_proj.bias), delta_softplus=True, return_last_state=True, backend=self.backend,
        )  # (B, E, L), (B, E, N)
        return self.out_proj(y.transpose(1, 2)), conv_state, ssm_state if return_states else None

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None) -> tuple[Tensor, Tensor]:
        """Zero decoding states (conv_state ``(B, E, d_conv)``, ssm_state ``(B, E, d_state)``).

        conv_state has the dtype of conv1d's weight, ssm_state float32 (float64 for fp64
        parameters), unless ``dtype`` is given for both. ``max_seqlen`` is accepted for
        mamba_ssm's signature: the states have a fixed size whatever the length.
        """
        weight = self.conv1d.weight
        conv_dtype = dtype or weight.dtype
        ssm_dtype = dtype or torch.promote_types(self.dt_proj.weight.dtype, torch.float32)
        conv_state = torch.zeros(batch_size, self.d_inner, self.d_conv, device=weight.device, dtype=conv_dtype)
        ssm_state = torch.zeros(batch_size, self.d_inner, self.d_state, device=weight.device, dtype=ssm_dtype)
        return conv_state, ssm_state

    def step(self, hidden_states: Tensor, conv_state: Tensor, ssm_state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One decoding step: ``(B, 1, d_model)`` -> ``(B, 1, d_model)``; states updated in place.

        ``conv_state`` ``(B, E, d_conv)`` holds the last d_conv inputs of the convolution,
        newest last; ``ssm_state`` ``(B, E, d_state)`` the scan's state (see
        :meth:`allocate_inference_cache`). For inference: run it under ``torch.no_grad()``
        (the one-step ops have no backward).

        On the cpu backend (fp32/fp64) the step is one C++ call for the whole block
        (:func:`rnnkern.ops.mamba_block_step.mamba_block_step`), with A = -exp(A_log) kept
        between tokens until a parameter changes; elsewhere it runs the one-step ops.
        """
        A_log = registered_or_attribute(self, "A_log")
        parameters = self._step_parameters.get(self._collect_step_parameters, A_log)
        if parameters is not None and takes_fused_step(MAMBA_BLOCK_STEP, self.backend, hidden_states, conv_state,
                                                       ssm_state, self._step_state_sizes, parameters[0].dtype,
                                                       self.d_model):
            return cpu_mamba_block_step(hidden_states, conv_state, ssm_state, parameters), conv_state, ssm_state
        _checks.input_tensor(
            "Mamba", hidden_states, (3,), "(B, 1, d_model)", self.d_model, self.in_proj.weight, "d_model"
        )
        batch = hidden_states.shape[0]
        if hidden_states.shape[1] != 1:
            raise ValueError(f"Mamba: step takes one token, input (B, 1, d_model), got {tuple(hidden_states.shape)}")
        state_shape("Mamba", "conv_state", conv_state, (batch, self.d_inner, self.d_conv))
        state_shape("Mamba", "ssm_state", ssm_state, (batch, self.d_inner, self.d_state))
        x, z = self.in_proj(hidden_states[:, 0]).chunk(2, dim=-1)  # (B, E) each
        x = causal_conv1d_update(x, conv_state, self._conv_weight(), self.conv1d.bias, "silu", backend=self.backend)
        dt, B, C = self._project(x)  # (B, E), (B, N), (B, N)
        y = selective_state_update(
            ssm_state, x, dt, self._A(), B, C, wide(self.D), z,
            dt_bias=wide(self.dt_proj.bias), dt_softplus=True, backend=self.backend,
        )  # (B, E)
        return self.out_proj(y).unsqueeze(1), conv_state, ssm_state

    def _conv_weight(self) -> Tensor:
        return self.conv1d.weight.squeeze(1)  # (E, 1, d_conv) -> (E, d_conv)

    def _collect_step_parameters(self) -> Optional[list]:
        """The parameters in reference.mamba_block_step's order (A derived); None where a
        weight is not a registered parameter (a parametrization, say)."""
        in_proj, conv1d, x_proj = self.in_proj._parameters, self.conv1d._parameters, self.x_proj._parameters
        dt_proj, out_proj = self.dt_proj._parameters, self.out_proj._parameters
        parameters = [in_proj.get("weight"), in_proj.get("bias"), conv1d.get("weight"), conv1d.get("bias"),
                      x_proj.get("weight"), dt_proj.get("weight"), dt_proj.get("bias"),
                      -torch.exp(self.A_log.detach()), self._parameters.get("D"), out_proj.get("weight"),
                      out_proj.get("bias")]
        required = (0, 2, 4, 5, 6, 8, 9)
        return None if any(parameters[i] is None for i in required) else parameters

    def _A(self) -> Tensor:
        return -torch.exp(wide(self.A_log))  # (E, N), negative: a decaying state

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (..., E) -> dt (..., E) before its bias and softplus, B (..., N), C (..., N)."""
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.linear(dt, self.dt_proj.weight), B, C

