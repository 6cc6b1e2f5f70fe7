"""ONNX export of rnnkern.nn's LSTM, GRU, Mamba and Mamba2: standard ONNX nodes in place of rnnkern's ops.

``torch.onnx.export(model, args, dynamo=True)`` traces a model with torch.export, so each
rnnkern op would reach the exporter as a custom op (``rnnkern::lstm_layer``) it cannot
translate. While an export runs (``torch.onnx.is_in_onnx_export()``), the modules call
the functions here instead: each layer becomes one ONNX ``LSTM`` or ``GRU`` node, both
directions in one node, made with ``torch.onnx.ops.symbolic_multi_out``, which ONNX
Runtime runs as a fused kernel. ONNX's LSTM has no projection, so a layer with
``proj_size`` becomes a ``torch.scan`` of the cell's plain torch ops, which the exporter
writes as an ONNX ``Scan`` (any sequence length, no unrolling).

Mamba's and Mamba2's causal convolutions become ONNX Conv nodes, their scans an ONNX Scan
each (static shapes): Mamba's selective scan steps every channel, Mamba-2's SSD recurrence
every head, through one shared step (:func:`_ssm_scan`). Mamba2's gated RMSNorm is plain
torch ops and exports as it is.

Weights are reordered for ONNX at export time (plain torch ops on the parameters, folded
into the graph): LSTM gates from torch's (i, f, g, o) to ONNX's (i, o, f, c), GRU gates
from (r, z, n) to (z, r, h), with ``linear_before_reset=1``, which is torch's GRU (the
reset gate multiplies ``W_hn h + b_hn``). Nodes take ONNX's default layout: time first.
"""
import importlib
import math
from typing import Optional

import torch
from torch import Tensor

Weights = dict[str, Tensor]  # one direction's parameters by op argument: w_ih, w_hh, b_ih, b_hh, w_hr


def _scan(*args):
    """torch.scan, the prototype higher-order op under torch._higher_order_ops (2.11, 2.13),
    imported when an export needs it: ``import rnnkern`` does not depend on it."""
    return importlib.import_module("torch._higher_order_ops.scan").scan(*args)


def exporting() -> bool:
    """Whether torch.onnx.export is tracing the model now (then the modules call this file)."""
    return torch.onnx.is_in_onnx_export()


def lstm_layer(x: Tensor, states: Optional[tuple[Tensor, Tensor]], weights: list[Weights]):
    """One LSTM layer, all its directions, as an ONNX graph.

    x ``(B, T, I)``; states ``(h0 (D, B, P), c0 (D, B, H))`` or None for zeros; ``weights``
    one dict per direction (D = 1 or 2, the second one reversed). Returns
    ``y (B, T, D * P), (h_n (D, B, P), c_n (D, B, H))``.
    """
    if "w_hr" in weights[0]:
        return _projected_lstm_layer(x, states, weights)
    batch, steps, _ = x.shape
    hidden, directions = weights[0]["w_hh"].shape[1], len(weights)
    order = (0, 3, 1, 2)  # ONNX's (i, o, f, c) as indices into torch's (i, f, g, o)
    inputs = [x.transpose(0, 1), *_stacked_gate_weights(weights, order), None, *(states or (None, None))]
    state_shape = (directions, batch, hidden)
    y, h_n, c_n = torch.onnx.ops.symbolic_multi_out(
        "LSTM", inputs, _node_attributes(hidden, directions),
        dtypes=[x.dtype] * 3, shapes=[(steps, directions, batch, hidden), state_shape, state_shape],
    )  # (T, D, B, H), (D, B, H), (D, B, H)
    return _batch_first(y), (h_n, c_n)


def gru_layer(x: Tensor, h0: Optional[Tensor], weights: list[Weights]):
    """One GRU layer, all its directions, as an ONNX graph: x ``(B, T, I)``, h0 ``(D, B, H)``
    or None; returns ``y (B, T, D * H), h_n (D, B, H)``."""
    batch, steps, _ = x.shape
    hidden, directions = weights[0]["w_hh"].shape[1], len(weights)
    order = (1, 0, 2)  # ONNX's (z, r, h) as indices into torch's (r, z, n)
    inputs = [x.transpose(0, 1), *_stacked_gate_weights(weights, order), None, h0]  # X (T, B, I) first
    y, h_n = torch.onnx.ops.symbolic_multi_out(
        "GRU", inputs, {**_node_attributes(hidden, directions), "linear_before_reset": 1},
        dtypes=[x.dtype] * 2, shapes=[(steps, directions, batch, hidden), (directions, batch, hidden)],
    )  # (T, D, B, H), (D, B, H)
    return _batch_first(y), h_n


def _node_attributes(hidden: int, directions: int) -> dict:
    return {"hidden_size": hidden, "direction": "bidirectional" if directions == 2 else "forward"}


def _stacked_gate_weights(weights: list[Weights], order: tuple) -> tuple:
    """ONNX's W ``(D, G*H, I)``, R ``(D, G*H, H)`` and B ``(D, 2*G*H)`` (None without biases)
    from torch's per-direction weights, gate blocks taken in `order`. One Gather of constant
    rows per tensor, which the exporter folds into the weights."""
    hidden = weights[0]["w_hh"].shape[0] // len(order)
    rows = torch.cat([torch.arange(g * hidden, (g + 1) * hidden) for g in order])  # (G*H,)
    w = torch.stack([d["w_ih"][rows] for d in weights])
    r = torch.stack([d["w_hh"][rows] for d in weights])
    if "b_ih" not in weights[0]:
        return w, r, None
    b = torch.stack([torch.cat([d["b_ih"][rows], d["b_hh"][rows]]) for d in weights])
    return w, r, b


def _batch_first(y: Tensor) -> Tensor:
    """ONNX's Y ``(T, D, B, H)`` -> ``(B, T, D * H)``, the directions side by side."""
    steps, directions, batch, hidden = y.shape
    return y.permute(2, 0, 1, 3).reshape(batch, steps, directions * hidden)


def _projected_lstm_layer(x: Tensor, states: Optional[tuple[Tensor, Tensor]], weights: list[Weights]):
    """lstm_layer for a layer with a projection (proj_size): one ONNX Scan over time that
    steps every direction at once (the reverse one on time-flipped inputs)."""
    batch, directions = x.shape[0], len(weights)
    proj, hidden = weights[0]["w_hr"].shape
    if states is None:
        states = (x.new_zeros(directions, batch, proj), x.new_zeros(directions, batch, hidden))
    x = x.transpose(0, 1)  # (T, B, I)
    gx = torch.stack([_input_gates(x, w) for w in weights], dim=1)  # (T, D, B, 4H)
    w_hh = torch.stack([w["w_hh"].T for w in weights])  # (D, P, 4H)
    w_hr = torch.stack([w["w_hr"].T for w in weights])  # (D, H, P)
    (h_n, c_n), y = _scan(
        lambda carry, gx_t: _projected_lstm_step(carry, gx_t, w_hh, w_hr), states, _flip_reverse(gx),
    )  # (D, B, P), (D, B, H), (T, D, B, P)
    return _batch_first(_flip_reverse(y)), (h_n, c_n)


def _input_gates(x: Tensor, w: Weights) -> Tensor:
    """x (T, B, I) -> x W_ih^T + b_ih + b_hh (T, B, 4H)."""
    gx = x @ w["w_ih"].T
    return gx + (w["b_ih"] + w["b_hh"]) if "b_ih" in w else gx


def _flip_reverse(t: Tensor) -> Tensor:
    """t (T, D, ...) with the second direction's steps in reverse order (its own inverse)."""
    if t.shape[1] == 1:
        return t
    return torch.cat([t[:, :1], t[:, 1:].flip(0)], dim=1)


def _projected_lstm_step(carry: tuple[Tensor, Tensor], gx_t: Tensor, w_hh: Tensor, w_hr: Tensor):
    """One step of a projected LSTM cell in every direction, for torch.scan: carry (h (D, B, P),
    c (D, B, H)), gx_t (D, B, 4H), w_hh (D, P, 4H), w_hr (D, H, P) -> ((h', c'), h'), gate
    order (i, f, g, o)."""
    h, c = carry
    i, f, g, o = (gx_t + torch.bmm(h, w_hh)).chunk(4, dim=2)  # (D, B, H) each
    c = f.sigmoid() * c + i.sigmoid() * g.tanh()
    h = torch.bmm(o.sigmoid() * c.tanh(), w_hr)  # (D, B, P)
    return (h, c), h.clone()  # scan's output may not alias its carry


def causal_conv1d_silu(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Mamba's depthwise causal convolution with SiLU, as ONNX Pad, Conv and Sigmoid/Mul:
    x ``(B, E, L)``, weight ``(E, W)``, bias ``(E,)`` -> ``(B, E, L)``."""
    channels, width = weight.shape
    padded = torch.nn.functional.pad(x, (width - 1, 0))  # (B, E, L + W - 1)
    return torch.nn.functional.silu(torch.nn.functional.conv1d(padded, weight[:, None], bias, groups=channels))


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor,
                   delta_bias: Tensor) -> tuple[Tensor, Tensor]:
    """Mamba's selective scan (with softplus, D and the z gate, no initial state) as one ONNX
    Scan over time; the recurrence of :func:`rnnkern.selective_scan`. Static shapes only: with
    dynamic_shapes, torch 2.13's exporter fails decomposing this scan ("'SymInt' object has no
    attribute 'unsqueeze'"), which the LSTM's scan does not.

    u, delta, z ``(Bt, E, L)``; A ``(E, N)``; B, C ``(Bt, N, L)``; D, delta_bias ``(E,)``.
    Returns out ``(Bt, E, L)`` and the last state ``(Bt, E, N)``.
    """
    dt = torch.nn.functional.softplus(delta + delta_bias[:, None])  # (Bt, E, L)
    dt_t, dtu_t = (t.permute(2, 0, 1) for t in (dt, dt * u))  # (L, Bt, E) each
    B_t, C_t = (t.permute(2, 0, 1) for t in (B, C))  # (L, Bt, N) each
    state = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (Bt, E, N)
    last, y = _ssm_scan(state, A, dt_t, dtu_t, B_t, C_t)  # y (L, Bt, E)
    y = y.permute(1, 2, 0) + D[:, None] * u
    return y * torch.nn.functional.silu(z), last


def mamba2_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Optional[Tensor],
                dt_bias: Tensor, dt_limit: tuple[float, float]) -> tuple[Tensor, Tensor]:
    """Mamba-2's SSD scan (dt_bias, softplus and dt_limit, D, the z gate when given, no initial
    state) as one ONNX Scan over time, one step of every head at once; the recurrence of
    :func:`rnnkern.mamba_chunk_scan`. Static shapes only, as :func:`selective_scan`.

    x ``(Bt, L, H, P)``; dt ``(Bt, L, H)`` before its bias; A, dt_bias ``(H,)``; B, C
    ``(Bt, L, G, N)`` (head h reads group h // (H / G)); D ``(H,)`` or ``(H, P)``; z like x or
    None. Computed in A's dtype. Returns y ``(Bt, L, H, P)`` in x's dtype and the last state
    ``(Bt, H, P, N)``.
    """
    acc = A.dtype
    batch, _, heads, dim = x.shape
    dt = torch.nn.functional.softplus(dt.to(acc) + dt_bias.to(acc))  # (Bt, L, H)
    if tuple(dt_limit) != (0.0, math.inf):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    xs = x.to(acc)
    B_t, C_t = (_per_head(t.to(acc), heads) for t in (B, C))  # (Bt, L, H, N) each
    steps = (t.transpose(0, 1) for t in (dt, dt[..., None] * xs, B_t, C_t))  # time first
    state = xs.new_zeros(batch, heads, dim, B.shape[3])  # (Bt, H, P, N)
    last, y = _ssm_scan(state, A.to(acc), *steps)  # y (L, Bt, H, P)
    y = y.transpose(0, 1) + (D if D.dim() == 2 else D[:, None]).to(acc) * xs
    if z is not None:
        y = y * torch.nn.functional.silu(z.to(acc))
    return y.to(x.dtype), last


def _per_head(BC: Tensor, heads: int) -> Tensor:
    """B or C ``(Bt, L, G, N)`` -> ``(Bt, L, H, N)``, head h reading group h // (H / G)."""
    batch, length, groups, n = BC.shape
    return BC[:, :, :, None].expand(batch, length, groups, heads // groups, n).reshape(batch, length, heads, n)


def _ssm_scan(state: Tensor, A: Tensor, dt: Tensor, dtx: Tensor, B: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """The scan of both Mamba blocks as one torch.scan: s_t = exp(dt_t A) s_{t-1} + dtx_t B_t and
    y_t = sum_n s_t C_t, for a state ``(Bt, ..., N)`` (Mamba ``(Bt, E, N)``, Mamba-2
    ``(Bt, H, P, N)``). dt, dtx, B and C are time first: per step dt_t the state's leading
    dimensions (A the state's without batch, or a prefix of them), dtx_t the state without
    N, B_t and C_t the state without its next-to-last dimension. Size-one dimensions are made inside the step:
    the exporter's size-oblivious tracing does not broadcast a scanned input's unit dimension.
    Returns the last state and y ``(L, Bt, ...)``."""
    return _scan(lambda state, step: _ssm_step(state, step, A), state, [dt, dtx, B, C])


def _ssm_step(state: Tensor, step: list, A: Tensor) -> tuple[Tensor, Tensor]:
    """One step of :func:`_ssm_scan`: state s_{t-1}, step (dt_t, dtx_t, B_t, C_t) -> (s_t, y_t)."""
    dt, dtx, B, C = step
    dt = dt[(...,) + (None,) * (state.dim() - dt.dim())]
    A = A[(...,) + (None,) * (state.dim() - 1 - A.dim())]
    state = torch.exp(dt * A) * state + dtx[..., None] * B.unsqueeze(-2)
    return state, (state * C.unsqueeze(-2)).sum(-1)
