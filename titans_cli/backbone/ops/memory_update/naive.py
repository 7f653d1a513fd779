"""The readable references of the memory update: the per-token recurrence (kernel "naive", the test oracle) and the
chunked closed form step by step under plain autograd (the reference of the fused torch path's backward).

`naive_memory_update` (docs/design.md §2.8) reads like the paper, one token at a time:
    g_t = ∇ℓ(M_{t'}; k_t, v_t)          Eq. 12 loss, gradient at the chunk-start weights M_{t'} (Eq. 16)
    S_t = η_t S_{t−1} − θ_t g_t          Eq. 14
    M_t = (1 − α_t) M_{t−1} + S_t        Eq. 13
    y_t = M_t(q_t)   (or M_{t−1}(q_t))   Eq. 15, inclusive read by default (docs/design.md A6)
With chunk_size = 1, t' = t − 1 and this is the exact sequential rule; with chunk_size = b it is the mini-batch
variant that the chunked closed form (chunk.py) computes. The inner gradient is taken by autograd here, on purpose
independent of the hand-written gradients of the fast path. Slow: for tests and short benchmarks only.

`naive_chunk_memory_update` runs the closed form of chunk.py one `naive_chunk_step` at a time and lets autograd
differentiate it: what `torch_memory_update` computes with its hand-written backward, in readable form, also for
the memory with `model.memory_norm = "ln"`, M(x) = x + LN_h(f(x)) (mlp.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from titans_cli.backbone.ops.memory_update.chunk import chunk_coefficients, read_rows
from titans_cli.backbone.ops.memory_update.mlp import ACTIVATIONS, mlp_forward, mlp_inner_grad_factors, norm_residual
from titans_cli.backbone.ops.memory_update.state import MemoryState


def _inner_loss(err: Tensor, clip: float) -> Tensor:
    """½‖e‖² (Eq. 12), or Σ_d huber_c(e_d) = ½e² for |e| ≤ c, c(|e| − ½c) beyond, written out here on purpose so that
    the oracle does not share the clamp of the fast path (mlp.py)."""
    if clip <= 0:
        return 0.5 * err.pow(2).sum()
    small = err.abs() <= clip
    return torch.where(small, 0.5 * err.pow(2), clip * (err.abs() - 0.5 * clip)).sum()


def naive_memory_update(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    alpha: Tensor,
    eta: Tensor,
    theta: Tensor,
    state: MemoryState,
    *,
    chunk_size: int = 1,
    activation: str = "silu",
    read: str = "inclusive",
    clip: float = 0.0,
    norm: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, MemoryState]:
    """Write k→v into the memory token by token and read it with q.

    Args:
        q, k, v: `[B, H, T, D]` (q, k already ℓ2-normalised by the caller).
        alpha, eta, theta: `[B, H, T]` forget gate α_t, momentum decay η_t, inner learning rate θ_t.
        state: incoming `MemoryState` (weights, surprise, anchor, position).
        chunk_size: b, the gradient-point refresh interval (1 = exact per-token rule).
        activation: hidden activation of the memory MLP.
        read: "inclusive" (y_t = M_t(q_t)) or "strict" (y_t = M_{t−1}(q_t)).
        clip: c > 0 replaces the inner loss by the elementwise Huber loss with threshold c (mlp.py); 0: Eq. 12.
        norm: None (M = the MLP f) or (γ, β) `[H, D]`: M(x) = x + LN_h(f(x)) (`model.memory_norm = "ln"`, mlp.py).
    Returns:
        y `[B, H, T, D]` and the state after the last token.
    """
    weights = list(state.weights)
    surprise = list(state.surprise)
    anchor = list(state.anchor)
    pos = state.position
    # Outer gradients flow through the inner gradient only when the caller is building a graph.
    outer = torch.is_grad_enabled()
    ys = []
    for t in range(q.shape[2]):
        if pos % chunk_size == 0:
            anchor = list(weights)
        with torch.enable_grad():
            leaves = [a if (outer and a.requires_grad) else a.detach().requires_grad_() for a in anchor]
            # Eq. 12 on M's prediction (with the memory norm: k + LN_h(f(k)); autograd goes through LN, whose γ, β
            # are outer parameters and not leaves of this inner gradient).
            pred = mlp_forward(leaves, k[:, :, t : t + 1], activation, norm)
            loss = _inner_loss(pred - v[:, :, t : t + 1], clip)
            grads = torch.autograd.grad(loss, leaves, create_graph=outer and loss.requires_grad)
        a_t = alpha[:, :, t, None, None]
        e_t = eta[:, :, t, None, None]
        th_t = theta[:, :, t, None, None]
        previous = weights
        surprise = [e_t * s - th_t * g for s, g in zip(surprise, grads, strict=True)]  # Eq. 14
        weights = [(1.0 - a_t) * w + s for w, s in zip(weights, surprise, strict=True)]  # Eq. 13
        readout = weights if read == "inclusive" else previous
        ys.append(mlp_forward(readout, q[:, :, t : t + 1], activation, norm))  # Eq. 15: y_t = M(q_t)
        pos += 1
    if pos % chunk_size == 0:
        anchor = list(weights)
    y = torch.cat(ys, dim=2) if ys else q.new_zeros(q.shape)
    return y, MemoryState(tuple(weights), tuple(surprise), tuple(anchor), pos)


def naive_chunk_step(
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
    clip: float = 0.0,
    norm: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """One chunk of the closed form (chunk.py), differentiated by plain autograd: reads `[B, H, n, D]` and the
    end-of-chunk weights and surprise. With `norm` = (γ, β) the memory is M(x) = x + LN_h(f(x)) (mlp.py): the inner
    gradient carries the error back through LN by hand (`mlp_inner_grad_factors`), and each read's last-layer
    output z = f(q) (the dual form, per token) becomes q + LN_h(z)."""
    act, _ = ACTIVATIONS[activation]
    beta, gamma, e, c, theta_p = chunk_coefficients(alpha, eta, theta)
    inputs, errors = mlp_inner_grad_factors(anchor, k, v, activation, clip, norm)  # Eq. 12 at the anchor
    r_beta, r_gamma, r_c = read_rows(beta, gamma, c, read)
    h = q
    n_layers = len(weights)
    new_w, new_s = [], []
    c_end = c[..., -1, :].unsqueeze(-1)  # C_{n,:}
    tp = theta_p.unsqueeze(-1)
    b_end, g_end, e_end = beta[..., -1, None, None], gamma[..., -1, None, None], e[..., -1, None, None]
    for l in range(n_layers):
        a, d, w, s = inputs[l], errors[l], weights[l], surprise[l]
        d_out = w.shape[-1]
        # Dual form (docs/design.md §3.3): h W_i = β_i h W_0 + γ_i h S_0 − Σ_j C_ij (h·a_j) δ_j; W_0 and S_0 are read
        # with one matmul of the concatenated [W_0 | S_0].
        hws = h @ torch.cat([w, s], dim=-1)
        z = r_beta.unsqueeze(-1) * hws[..., :d_out] + r_gamma.unsqueeze(-1) * hws[..., d_out:]
        z = z - (r_c * (h @ a.transpose(-1, -2))) @ d
        h = act(z) if l < n_layers - 1 else z
        # Chunk end (docs/design.md §3.2): Σ_j c_j a_jᵀ δ_j = Aᵀ diag(c) Δ, for M and S in one matmul.
        g = a.transpose(-1, -2) @ torch.cat([c_end * d, tp * d], dim=-1)
        new_w.append(b_end * w + g_end * s - g[..., :d_out])
        new_s.append(e_end * s - g[..., d_out:])
    if norm is not None:
        h = norm_residual(h, q, norm)  # Eq. 15 read y = M(q) = q + LN_h(f(q)); LN is per token, so exact here
    return h, new_w, new_s


def naive_chunk_memory_update(
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
    clip: float = 0.0,
    norm: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, MemoryState]:
    """The chunked closed form (chunk.py) written plainly: one `naive_chunk_step` per chunk, differentiated by
    autograd. Same signature and result as `torch_memory_update`, whose fused steps have a hand-written backward;
    the readable reference of that backward (tests/ops/test_chunk_backward.py). `norm` (γ, β): the memory
    M(x) = x + LN_h(f(x)) (`model.memory_norm = "ln"`, mlp.py)."""
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
        y, weights, surprise = naive_chunk_step(
            q[:, :, sl], k[:, :, sl], v[:, :, sl], alpha[:, :, sl], eta[:, :, sl], theta[:, :, sl],
            weights, surprise, anchor, activation, read, clip, norm,
        )  # fmt: skip
        outs.append(y)
        start += n
        pos += n
    if pos % chunk_size == 0:
        anchor = weights
    y = torch.cat(outs, dim=2) if outs else q.new_zeros(q.shape)
    return y, MemoryState(tuple(weights), tuple(surprise), tuple(anchor), pos)
