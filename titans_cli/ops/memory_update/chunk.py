"""Chunked closed form of the memory update (spec §3.2-3.3; Eqs. 16-18 corrected): the torch fast path.

Per chunk of n ≤ b tokens, with start state (M_0, S_0) and gradient point W_g (the chunk-start weights):
    u_j  = ∇ℓ(W_g; k_j, v_j) = a_jᵀ δ_j per layer           (closed form, mlp.py)
    D_im = Π_{l=m+1..i} (1−α_l),  P_mj = Π_{l=j+1..m} η_l     (lower-triangular, built in log space)
    C    = (D P) diag(θ),  γ = D E,  β_i = Π_{l≤i} (1−α_l),  E_i = Π_{l≤i} η_l
    M_i  = β_i M_0 + γ_i S_0 − Σ_{j≤i} C_ij u_j,   S_i = E_i S_0 − Σ_{j≤i} θ_j P_ij u_j
Per-token reads use the dual form, layer by layer, without materialising the n weight copies:
    Z̃ = diag(β) Ã W_0 + diag(γ) Ã S_0 − (C ⊙ Ã Aᵀ) Δ
and the chunk-end state is two matmuls per layer. Autograd differentiates all of it (outer loop, §2.7).

Shape legend: B batch, H heads, n tokens in the chunk, weights `[B, H, d_in, d_out]`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from titans_cli.ops.memory_update.mlp import ACTIVATIONS, mlp_inner_grad_factors
from titans_cli.ops.memory_update.state import MemoryState

# Coefficients below e^-69 ≈ 1e-30 are zeroed: float32 denormals there take a slow microcode path on x86
# (performance.md: 3-4x slower steps) and contribute nothing.
_LOG_FLOOR = -69.0
_FLOOR = 1e-30
# Gates are clamped away from 0 before the log so that ratios of products never become 0/0 or −inf − (−inf)
# (spec §3.2). The floor sits just below e^_LOG_FLOOR, so a gate that is exactly 0 still gives exact zeros.
_GATE_FLOOR = 0.9 * _FLOOR


def _flush(x: Tensor) -> Tensor:
    """Zero non-negative coefficients below `_FLOOR` (sums of products can land in the denormal range)."""
    return torch.where(x < _FLOOR, torch.zeros_like(x), x)


def _decay_matrix(log_cum: Tensor) -> Tensor:
    """exp(c_i − c_j) for j ≤ i, 0 above the diagonal: `[..., n] → [..., n, n]`."""
    n = log_cum.shape[-1]
    diff = log_cum.unsqueeze(-1) - log_cum.unsqueeze(-2)
    keep = torch.ones(n, n, dtype=torch.bool, device=log_cum.device).tril()
    keep = keep & (diff > _LOG_FLOOR)
    return torch.where(keep, diff, torch.full_like(diff, float("-inf"))).exp()


def chunk_coefficients(
    alpha: Tensor, eta: Tensor, theta: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Coefficients of one chunk from per-token gates `[..., n]`.

    Returns:
        beta `[..., n]` (β_i), gamma `[..., n]` (γ_i), E `[..., n]` (E_i), C `[..., n, n]` (lower-triangular,
        diagonal included), and theta_p `[..., n]` = θ_j P_nj, the momentum weights of the chunk-end surprise.
    """
    log_keep = torch.log(torch.clamp(1.0 - alpha, min=_GATE_FLOOR)).cumsum(-1)
    log_eta = torch.log(torch.clamp(eta, min=_GATE_FLOOR)).cumsum(-1)
    decay = _decay_matrix(log_keep)  # D
    momentum = _decay_matrix(log_eta)  # P
    beta = _flush(log_keep.exp())
    e = _flush(log_eta.exp())
    gamma = _flush((decay @ e.unsqueeze(-1)).squeeze(-1))
    c = _flush((decay @ momentum) * theta.unsqueeze(-2))
    theta_p = _flush(theta * momentum[..., -1, :])
    return beta, gamma, e, c, theta_p


def _chunk_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    alpha: Tensor,
    eta: Tensor,
    theta: Tensor,
    weights: Sequence[Tensor],
    surprise: Sequence[Tensor],
    anchor: Sequence[Tensor],
    activation: str,
    read: str,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """One chunk: reads `[B, H, n, D]` and the end-of-chunk weights and surprise."""
    act, _ = ACTIVATIONS[activation]
    beta, gamma, e, c, theta_p = chunk_coefficients(alpha, eta, theta)
    inputs, errors = mlp_inner_grad_factors(anchor, k, v, activation)
    if read == "inclusive":
        r_beta, r_gamma, r_c = beta, gamma, c
    else:
        # Strict read y_i = M_{i−1}(q_i): the coefficients of the previous row (row 0 is the start state).
        r_beta = torch.cat([torch.ones_like(beta[..., :1]), beta[..., :-1]], dim=-1)
        r_gamma = torch.cat([torch.zeros_like(gamma[..., :1]), gamma[..., :-1]], dim=-1)
        r_c = torch.cat([torch.zeros_like(c[..., :1, :]), c[..., :-1, :]], dim=-2)
    h = q
    n_layers = len(weights)
    new_w, new_s = [], []
    c_end = c[..., -1, :].unsqueeze(-1)  # C_{n,:}
    tp = theta_p.unsqueeze(-1)
    b_end, g_end, e_end = beta[..., -1, None, None], gamma[..., -1, None, None], e[..., -1, None, None]
    for l in range(n_layers):
        a, d, w, s = inputs[l], errors[l], weights[l], surprise[l]
        d_out = w.shape[-1]
        # Dual form (spec §3.3): h W_i = β_i h W_0 + γ_i h S_0 − Σ_j C_ij (h·a_j) δ_j; W_0 and S_0 are read with one
        # matmul of the concatenated [W_0 | S_0].
        hws = h @ torch.cat([w, s], dim=-1)
        z = r_beta.unsqueeze(-1) * hws[..., :d_out] + r_gamma.unsqueeze(-1) * hws[..., d_out:]
        z = z - (r_c * (h @ a.transpose(-1, -2))) @ d
        h = act(z) if l < n_layers - 1 else z
        # Chunk end (spec §3.2): Σ_j c_j a_jᵀ δ_j = Aᵀ diag(c) Δ, for M and S in one matmul.
        g = a.transpose(-1, -2) @ torch.cat([c_end * d, tp * d], dim=-1)
        new_w.append(b_end * w + g_end * s - g[..., :d_out])
        new_s.append(e_end * s - g[..., d_out:])
    return h, new_w, new_s


def chunk_memory_update(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    alpha: Tensor,
    eta: Tensor,
    theta: Tensor,
    state: MemoryState,
    *,
    chunk_size: int = 16,
    activation: str = "silu",
    read: str = "inclusive",
) -> tuple[Tensor, MemoryState]:
    """Chunked memory write + per-token reads; same signature and result as `recurrent_memory_update`.

    Chunk borders sit at multiples of `chunk_size` counted from the start of the sequence (`state.position`), so a
    call that begins or ends inside a chunk continues it exactly; a trailing partial chunk is written, never
    dropped (spec §11, titans-pytorch#59).

    Args:
        q, k, v: `[B, H, T, D]`.
        alpha, eta, theta: `[B, H, T]`.
        state: incoming `MemoryState`.
        chunk_size: b.
        activation: hidden activation of the memory MLP.
        read: "inclusive" or "strict".
    Returns:
        y `[B, H, T, D]` and the state after the last token.
    """
    T = q.shape[2]
    weights, surprise, anchor = list(state.weights), list(state.surprise), list(state.anchor)
    pos = state.position
    outs = []
    start = 0
    while start < T:
        if pos % chunk_size == 0:
            anchor = weights
        n = min(chunk_size - pos % chunk_size, T - start)
        sl = slice(start, start + n)
        y, weights, surprise = _chunk_step(
            q[:, :, sl], k[:, :, sl], v[:, :, sl], alpha[:, :, sl], eta[:, :, sl], theta[:, :, sl],
            weights, surprise, anchor, activation, read,
        )  # fmt: skip
        outs.append(y)
        start += n
        pos += n
    if pos % chunk_size == 0:
        anchor = weights
    y = torch.cat(outs, dim=2) if outs else q.new_zeros(q.shape)
    return y, MemoryState(tuple(weights), tuple(surprise), tuple(anchor), pos)
