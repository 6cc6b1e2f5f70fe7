"""Mamba-2 block on rnnkern's ops: mamba_ssm's ``Mamba2`` parameter names, shapes and init.

State dicts of ``mamba_ssm.modules.mamba2.Mamba2`` and of HF transformers' ``Mamba2Mixer``
load into :class:`Mamba2` (strict) with matching constructor arguments and give the same
outputs. The block runs :func:`rnnkern.causal_conv1d`, :func:`rnnkern.mamba_chunk_scan` and
:func:`rnnkern.rms_norm_gated` (training, prefill) or the one-step
:func:`rnnkern.causal_conv1d_update` and multi-head :func:`rnnkern.selective_state_update`
(decoding). Under ``torch.onnx.export`` it runs plain-torch translations instead (see
:mod:`rnnkern.nn._onnx`).
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnkern.nn import _checks, _onnx
from rnnkern.nn._ssm import (inverse_softplus_time_steps, last_columns, state_shape,
                             takes_fused_step, wide, wide_dtype)
from rnnkern.nn._step_cache import StepCache, registered_or_attribute
from rnnkern.nn.norm import RMSNormGated
from rnnkern.ops.causal_conv1d import causal_conv1d, causal_conv1d_update
from rnnkern.ops.mamba_block_step import MAMBA2_BLOCK_STEP, cpu_mamba2_block_step
from rnnkern.ops.mamba_chunk_scan import mamba_chunk_scan
from rnnkern.ops.selective_scan import selective_state_update

__all__ = ["Mamba2"]


class Mamba2(nn.Module):
    """The Mamba-2 block (state-space duality) of Dao and Gu, 2024.

    With E = expand * d_model channels inside, H = E / headdim heads of P = headdim channels,
    G = ngroups groups of B and C, N = d_state, per sequence::

        z, xBC, dt = split(in_proj(u))                      (L, E), (L, E + 2GN), (L, H)
        x, B, C    = split(silu(causal_conv1d(xBC)))        (L, H, P), (L, G, N), (L, G, N)
        dt         = clamp(softplus(dt + dt_bias), dt_limit)
        s_t        = exp(dt_t A) s_{t-1} + dt_t x_t B_t^T   (H, P, N) per head, A = -exp(A_log) (H,)
        y_t        = s_t C_t + D x_t                        (H, P)
        y          = rmsnorm(y * silu(z)) * norm.weight     (norm per group of E / G channels)
        out        = out_proj(y)                            (L, d_model)

    Without ``rmsnorm`` the gate is ``y * silu(z)`` and there is no norm; ``norm_before_gate``
    normalises before gating instead.

    Args: as mamba_ssm's ``Mamba2``: d_model, d_state (N), d_conv, expand, headdim (P), ngroups
    (G, dividing H), A_init_range (A = -U(range)), D_has_hdim (D ``(E,)`` instead of ``(H,)``),
    rmsnorm, norm_before_gate, dt_min, dt_max, dt_init_floor (dt_bias initialisation),
    dt_limit, bias (in_proj, out_proj), conv_bias, chunk_size (of the scan), layer_idx,
    device, dtype; plus ``backend`` for the scan ops.

    Parameters (mamba_ssm's and HF's names and shapes): in_proj ``Linear(d_model, 2E + 2GN + H)``,
    conv1d ``Conv1d(E + 2GN, E + 2GN, d_conv, groups=E + 2GN, padding=d_conv - 1)``, dt_bias
    ``(H,)``, A_log ``(H,)``, D ``(H,)`` or ``(E,)``, norm.weight ``(E,)`` (with rmsnorm),
    out_proj ``Linear(E, d_model)``. A_log and D are kept in float32 (float64 for a float64
    block) and flagged ``_no_weight_decay``, as is dt_bias.

    Shapes:
        forward: ``(B, L, d_model)`` -> ``(B, L, d_model)``; ``cu_seqlens`` packs sequences
        along L (B = 1), none seeing another.
        allocate_inference_cache: -> conv_state ``(B, E + 2GN, d_conv)``, ssm_state ``(B, H, P, N)``.
        prefill: forward that also returns those states after the prompt.
        step: ``(B, 1, d_model)`` and both states -> ``(B, 1, d_model)`` and the states, updated
        in place. Steps from zero states equal forward over the sequence.

    Example::

        >>> block = rnnkern.nn.Mamba2(d_model=64, d_state=32, headdim=16)
        >>> y, conv_state, ssm_state = block.prefill(torch.randn(2, 100, 64))   # (2, 100, 64)
        >>> for u_t in torch.randn(10, 2, 1, 64):               # continue one token at a time
        ...     y_t, conv_state, ssm_state = block.step(u_t, conv_state, ssm_state)
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        A_init_range: tuple[float, float] = (1, 16),
        D_has_hdim: bool = False,
        rmsnorm: bool = True,
        norm_before_gate: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_limit: tuple[float, float] = (0.0, float("inf")),
        bias: bool = False,
        conv_bias: bool = True,
        chunk_size: int = 256,
        layer_idx: Optional[int] = None,
        device=None,
        dtype=None,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.headdim, self.ngroups = headdim, ngroups
        _check_sizes(self.d_inner, headdim, ngroups, A_init_range)
        self.nheads = self.d_inner // headdim
        self.D_has_hdim, self.rmsnorm, self.norm_before_gate = D_has_hdim, rmsnorm, norm_before_gate
        self.dt_limit = tuple(dt_limit)
        self.chunk_size, self.layer_idx, self.backend = chunk_size, layer_idx, backend
        self.conv_dim = self.d_inner + 2 * ngroups * d_state
        # Built in mamba_ssm's order, so one seed draws the same initial values.
        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + self.nheads, bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1,
                                bias=conv_bias, **factory)
        dt_bias = inverse_softplus_time_steps(self.nheads, dt_min, dt_max, dt_init_floor, device,
                                              dtype or torch.get_default_dtype())
        self.dt_bias = nn.Parameter(dt_bias)
        wide_factory = {"device": device, "dtype": wide_dtype(dtype)}
        A = torch.empty(self.nheads, device=device, dtype=torch.float32).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A).to(wide_factory["dtype"]))
        self.D = nn.Parameter(torch.ones(self.d_inner if D_has_hdim else self.nheads, **wide_factory))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        if rmsnorm:
            self.norm = RMSNormGated(self.d_inner, eps=1e-5, norm_before_gate=norm_before_gate,
                                     group_size=self.d_inner // ngroups, **factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)
        self._step_parameters = StepCache()
        self._step_state_sizes = ((self.conv_dim, d_conv), (self.nheads, headdim, d_state))  # (B, ...) of the states

    def extra_repr(self) -> str:
        text = (f"d_model={self.d_model}, d_state={self.d_state}, d_conv={self.d_conv}, expand={self.expand}, "
                f"headdim={self.headdim}, ngroups={self.ngroups}, chunk_size={self.chunk_size}")
        return text + (f", backend={self.backend!r}" if self.backend is not None else "")

    # -- sequences -------------------------------------------------------------------

    def forward(self, u: Tensor, seq_idx: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None) -> Tensor:
        """``(B, L, d_model)`` -> ``(B, L, d_model)``; see the class docstring.

        ``cu_seqlens`` ``(S + 1,)``: S sequences packed along L (B = 1); the convolution and
        the scan restart at each boundary. ``seq_idx`` ``(B, L)`` (mamba_ssm's alternative) is
        accepted with cu_seqlens, which the convolution needs to see the boundaries.
        """
        out, _, _ = self._forward(u, seq_idx, cu_seqlens, return_states=False)
        return out

    def prefill(self, u: Tensor, cu_seqlens: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`forward` that also returns the decoding states after the last position.

        Returns ``(out, conv_state, ssm_state)`` as :meth:`allocate_inference_cache` makes them,
        ready for :meth:`step`: conv_state the last d_conv inputs of the convolution (zeros
        before the start), ssm_state the scan's final state. With ``cu_seqlens`` the states
        have one row per packed sequence ``(S, ...)``.
        """
        return self._forward(u, None, cu_seqlens, return_states=True)

    def _forward(self, u: Tensor, seq_idx: Optional[Tensor], cu_seqlens: Optional[Tensor], return_states: bool):
        _checks.input_tensor("Mamba2", u, (3,), "(B, L, d_model)", self.d_model, self.in_proj.weight, "d_model")
        if seq_idx is not None and cu_seqlens is None:
            raise ValueError("Mamba2: seq_idx needs cu_seqlens too (the convolution restarts at its boundaries)")
        exporting = _onnx.exporting()  # standard ONNX ops in place of rnnkern's (see _onnx)
        if exporting and (seq_idx is not None or cu_seqlens is not None):
            raise ValueError("Mamba2: ONNX export takes no seq_idx or cu_seqlens (packed sequences do not export)")
        z, xBC, dt = self.in_proj(u).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xBC = xBC.transpose(1, 2)  # (B, E + 2GN, L)
        conv_state = self._conv_states(xBC, cu_seqlens) if return_states else None
        if exporting:
            xBC = _onnx.causal_conv1d_silu(xBC, self._conv_weight(), self.conv1d.bias)
        else:
            xBC = causal_conv1d(xBC, self._conv_weight(), self.conv1d.bias, "silu", cu_seqlens=cu_seqlens,
                                backend=self.backend)
        x, B, C = xBC.transpose(1, 2).split([self.d_inner, self.ngroups * self.d_state,
                                             self.ngroups * self.d_state], dim=-1)
        x, B, C = x.unflatten(-1, (self.nheads, self.headdim)), self._groups(B), self._groups(C)
        gate = None if self.rmsnorm else z.unflatten(-1, (self.nheads, self.headdim))
        if exporting:
            y, ssm_state = _onnx.mamba2_scan(x, dt, self._A(), B, C, self._D(), gate, self.dt_bias, self.dt_limit)
        else:
            results = mamba_chunk_scan(
                x, dt, self._A(), B, C, self.chunk_size, D=self._D(), z=gate, dt_bias=self.dt_bias,
                seq_idx=seq_idx, cu_seqlens=cu_seqlens, dt_softplus=True, dt_limit=self.dt_limit,
                return_final_states=return_states and cu_seqlens is None,
                return_varlen_states=return_states and cu_seqlens is not None, backend=self.backend,
            )
            y, ssm_state = results if return_states else (results, None)
        out = self.out_proj(self._gate(y.flatten(-2), z))
        return out, conv_state, ssm_state

    # -- decoding --------------------------------------------------------------------

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None) -> tuple[Tensor, Tensor]:
        """Zero decoding states: conv_state ``(B, E + 2GN, d_conv)`` in conv1d's dtype and
        ssm_state ``(B, H, P, N)`` in float32 (float64 for fp64 parameters), or both in
        ``dtype``. ``max_seqlen`` is accepted for mamba_ssm's signature: the states have a fixed
        size whatever the length."""
        weight = self.conv1d.weight
        conv_dtype = dtype or weight.dtype
        ssm_dtype = dtype or wide_dtype(self.in_proj.weight.dtype)
        conv_state = torch.zeros(batch_size, self.conv_dim, self.d_conv, device=weight.device, dtype=conv_dtype)
        ssm_state = torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=weight.device,
                                dtype=ssm_dtype)
        return conv_state, ssm_state

    def step(self, u: Tensor, conv_state: Tensor, ssm_state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One decoding step: ``(B, 1, d_model)`` -> ``(B, 1, d_model)``; states updated in place.

        The states are :meth:`allocate_inference_cache`'s (or :meth:`prefill`'s). For inference:
        run it under ``torch.no_grad()`` (the one-step ops have no backward).

        On the cpu backend (fp32/fp64) the step is one C++ call for the whole block
        (:func:`rnnkern.ops.mamba_block_step.mamba2_block_step`), with A = -exp(A_log) kept
        between tokens until a parameter changes; elsewhere it runs the one-step ops.
        """
        A_log = registered_or_attribute(self, "A_log")
        parameters = self._step_parameters.get(self._collect_step_parameters, A_log)
        if parameters is not None and takes_fused_step(MAMBA2_BLOCK_STEP, self.backend, u, conv_state, ssm_state,
                                                       self._step_state_sizes, parameters[0].dtype, self.d_model):
            y = cpu_mamba2_block_step(u, conv_state, ssm_state, parameters, self.d_inner // self.ngroups,
                                      self.norm_before_gate, self.norm.eps if self.rmsnorm else 0.0, *self.dt_limit)
            return y, conv_state, ssm_state
        _checks.input_tensor("Mamba2", u, (3,), "(B, 1, d_model)", self.d_model, self.in_proj.weight, "d_model")
        batch = u.shape[0]
        if u.shape[1] != 1:
            raise ValueError(f"Mamba2: step takes one token, input (B, 1, d_model), got {tuple(u.shape)}")
        state_shape("Mamba2", "conv_state", conv_state, (batch, self.conv_dim, self.d_conv))
        state_shape("Mamba2", "ssm_state", ssm_state, (batch, self.nheads, self.headdim, self.d_state))
        z, xBC, dt = self.in_proj(u[:, 0]).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xBC = causal_conv1d_update(xBC, conv_state, self._conv_weight(), self.conv1d.bias, "silu",
                                   backend=self.backend)
        x, B, C = xBC.split([self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        heads, dim, n = self.nheads, self.headdim, self.d_state
        dt, dt_bias, softplus = self._step_time(dt)  # (B, H)
        y = selective_state_update(
            ssm_state, x.view(batch, heads, dim), dt[..., None].expand(-1, -1, dim),
            self._A()[:, None, None].expand(-1, dim, n), B.view(batch, self.ngroups, n),
            C.view(batch, self.ngroups, n), self._D_per_channel(),
            None if self.rmsnorm else z.view(batch, heads, dim),
            dt_bias=None if dt_bias is None else dt_bias[:, None].expand(-1, dim), dt_softplus=softplus,
            backend=self.backend,
        )  # (B, H, P)
        return self.out_proj(self._gate(y.flatten(-2), z)).unsqueeze(1), conv_state, ssm_state

    # -- pieces ----------------------------------------------------------------------

    def _conv_weight(self) -> Tensor:
        return self.conv1d.weight.squeeze(1)  # (E + 2GN, 1, d_conv) -> (E + 2GN, d_conv)

    def _collect_step_parameters(self) -> Optional[list]:
        """The parameters in reference.mamba2_block_step's order (A derived); None where a
        weight is not a registered parameter (a parametrization, say)."""
        in_proj, conv1d, out_proj = self.in_proj._parameters, self.conv1d._parameters, self.out_proj._parameters
        own = self._parameters
        norm = self.norm._parameters.get("weight") if self.rmsnorm else None
        parameters = [in_proj.get("weight"), in_proj.get("bias"), conv1d.get("weight"), conv1d.get("bias"),
                      own.get("dt_bias"), -torch.exp(self.A_log.detach()), own.get("D"), norm,
                      out_proj.get("weight"), out_proj.get("bias")]
        required = (0, 2, 4, 6, 8) + ((7,) if self.rmsnorm else ())
        return None if any(parameters[i] is None for i in required) else parameters

    def _A(self) -> Tensor:
        return -torch.exp(wide(self.A_log))  # (H,), negative: a decaying state

    def _D(self) -> Tensor:
        """D as the scan takes it: (H,) or (H, P)."""
        return self.D.view(self.nheads, self.headdim) if self.D_has_hdim else self.D

    def _D_per_channel(self) -> Tensor:
        """D as (H, P), the decode step's layout."""
        D = self._D()
        return D if D.dim() == 2 else D[:, None].expand(-1, self.headdim)

    def _groups(self, BC: Tensor) -> Tensor:
        return BC.unflatten(-1, (self.ngroups, self.d_state))  # (..., G N) -> (..., G, N)

    def _gate(self, y: Tensor, z: Tensor) -> Tensor:
        """The scan's output (..., E) after the norm and gate (the gate is in the scan without rmsnorm)."""
        return self.norm(y, z) if self.rmsnorm else y

    def _step_time(self, dt: Tensor) -> tuple[Tensor, Optional[Tensor], bool]:
        """(dt, dt_bias, softplus) for the state update: the bias and softplus left to it, unless
        dt_limit clamps the time step, which is then applied here."""
        if self.dt_limit == (0.0, math.inf):
            return dt, self.dt_bias, True
        step = F.softplus(wide(dt) + wide(self.dt_bias)).clamp(*self.dt_limit)
        return step, None, False

    def _conv_states(self, xBC: Tensor, cu_seqlens: Optional[Tensor]) -> Tensor:
        """The last d_conv convolution inputs (B, E + 2GN, d_conv), one row per packed sequence
        with cu_seqlens (zeros before a sequence's start)."""
        if cu_seqlens is None:
            return last_columns(xBC, self.d_conv)
        starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long()  # (S,)
        window = ends[:, None] - self.d_conv + torch.arange(self.d_conv, device=xBC.device)  # (S, d_conv)
        inside = window >= starts[:, None]
        columns = xBC[0][:, window.clamp(min=0)]  # (E + 2GN, S, d_conv)
        return torch.where(inside, columns, 0).transpose(0, 1).contiguous()


def _check_sizes(d_inner: int, headdim: int, ngroups: int, A_init_range) -> None:
    if headdim < 1 or d_inner % headdim:
        raise ValueError(f"Mamba2: headdim={headdim} must divide d_inner = expand * d_model = {d_inner}")
    heads = d_inner // headdim
    if ngroups < 1 or heads % ngroups:
        raise ValueError(f"Mamba2: ngroups={ngroups} must divide the {heads} heads (d_inner / headdim)")
    low, high = A_init_range
    if not 0 < low <= high:
        raise ValueError(f"Mamba2: A_init_range must be (low, high) with 0 < low <= high, got {A_init_range!r}")
