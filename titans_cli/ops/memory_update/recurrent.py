"""Per-token reference recurrence of the memory update (spec §2.8): the test oracle.

Reads like the paper, one token at a time:
    g_t = ∇ℓ(M_{t'}; k_t, v_t)          Eq. 12 loss, gradient at the chunk-start weights M_{t'} (Eq. 16)
    S_t = η_t S_{t−1} − θ_t g_t          Eq. 14
    M_t = (1 − α_t) M_{t−1} + S_t        Eq. 13
    y_t = M_t(q_t)   (or M_{t−1}(q_t))   Eq. 15, inclusive read by default (A6)
With chunk_size = 1, t' = t − 1 and this is the exact sequential rule; with chunk_size = b it is the mini-batch
variant that the chunked closed form (chunk.py) computes. The inner gradient is taken by autograd here, on purpose
independent of the hand-written gradients of the fast path. Slow: for tests and short benchmarks only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from titans_cli.ops.memory_update.mlp import mlp_forward
from titans_cli.ops.memory_update.state import MemoryState


def _inner_loss(err: Tensor, clip: float) -> Tensor:
    """½‖e‖² (Eq. 12), or Σ_d huber_c(e_d) = ½e² for |e| ≤ c, c(|e| − ½c) beyond, written out here on purpose so that
    the oracle does not share the clamp of the fast path (mlp.py)."""
    if clip <= 0:
        return 0.5 * err.pow(2).sum()
    small = err.abs() <= clip
    return torch.where(small, 0.5 * err.pow(2), clip * (err.abs() - 0.5 * clip)).sum()


def recurrent_memory_update(
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
            pred = mlp_forward(leaves, k[:, :, t : t + 1], activation)
            loss = _inner_loss(pred - v[:, :, t : t + 1], clip)
            grads = torch.autograd.grad(loss, leaves, create_graph=outer and loss.requires_grad)
        a_t = alpha[:, :, t, None, None]
        e_t = eta[:, :, t, None, None]
        th_t = theta[:, :, t, None, None]
        previous = weights
        surprise = [e_t * s - th_t * g for s, g in zip(surprise, grads, strict=True)]  # Eq. 14
        weights = [(1.0 - a_t) * w + s for w, s in zip(weights, surprise, strict=True)]  # Eq. 13
        readout = weights if read == "inclusive" else previous
        ys.append(mlp_forward(readout, q[:, :, t : t + 1], activation))
        pos += 1
    if pos % chunk_size == 0:
        anchor = list(weights)
    y = torch.cat(ys, dim=2) if ys else q.new_zeros(q.shape)
    return y, MemoryState(tuple(weights), tuple(surprise), tuple(anchor), pos)
