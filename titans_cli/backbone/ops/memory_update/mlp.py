"""The memory network M as a function of its weights: forward pass and closed-form inner-loss gradients.

M(k) = σ(…σ(k W_1)…) W_L, no biases (docs/design.md §2.4, A4); L_M = 1 is the matrix memory M(k) = k W.
With `model.memory_norm = "ln"` the memory is the TTT-style M(k) = k + LN_h(f(k)), f the MLP above and LN_h a
LayerNorm over the features with a learned per-head scale γ_h and shift β_h (`norm` = (γ, β) below). γ and β are
outer parameters: the inner loop writes only the MLP weights, so the inner gradient passes through LN (its backward
is written out in `mlp_inner_grad_factors`) but never updates it.
Inner loss ℓ = ½‖M(k) − v‖² summed over features (Eq. 12 with the ½ of Appendix C; docs/design.md A16). With an
inner clip c > 0 it is the elementwise Huber loss Σ_d huber_c(M(k)_d − v_d) instead, whose gradient w.r.t. the
prediction is the error clamped to [−c, c] (docs/design.md §2.2, §11): it bounds every token's write, so a chunk's
summed mini-batch step cannot grow the memory without bound when many keys in a chunk coincide.
Every per-token gradient of a linear layer is a rank-1 product a_{l−1}ᵀ δ_l (docs/design.md §2.2); this file returns the
activations a and errors δ, from which both the chunk-end state and the dual-form reads are built.

Shape legend: leading dims `...` (e.g. B, H), n tokens, weights `[..., d_in, d_out]`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

_SQRT_2PI = math.sqrt(2.0 * math.pi)
# LayerNorm epsilon of the memory norm (torch's nn.LayerNorm default).
LN_EPS = 1e-5


def _gelu_grad(z: Tensor) -> Tensor:
    # d/dz [z Φ(z)] = Φ(z) + z φ(z) (exact erf GELU)
    cdf = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
    return cdf + z * torch.exp(-0.5 * z * z) / _SQRT_2PI


def _silu_grad(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


def _tanh_grad(z: Tensor) -> Tensor:
    t = torch.tanh(z)
    return 1.0 - t * t


ACTIVATIONS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "silu": (F.silu, _silu_grad),
    "gelu": (F.gelu, _gelu_grad),
    "tanh": (torch.tanh, _tanh_grad),
}


def _per_head(p: Tensor) -> Tensor:
    """γ or β `[H, D]` → `[H, 1, D]`, broadcasting over the tokens of `[B, H, n, D]`."""
    return p.unsqueeze(-2)


def norm_residual(z: Tensor, x: Tensor, norm: tuple[Tensor, Tensor]) -> Tensor:
    """x + LN_h(z) = x + γ ⊙ (z − μ)/√(σ² + ε) + β over the last dim: the output of the memory with
    `memory_norm = "ln"`, z = f(x) the MLP's output `[B, H, n, D]`, γ, β `[H, D]`."""
    gamma, beta = norm
    zhat = F.layer_norm(z, z.shape[-1:], eps=LN_EPS)
    return x + zhat * _per_head(gamma) + _per_head(beta)


def mlp_forward(
    weights: Sequence[Tensor], x: Tensor, activation: str, norm: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """M(x) for per-sample weights: x `[..., n, d_in]` → `[..., n, d_out]` (a read, M* of Eq. 15).

    norm: None for M = f (the MLP), or (γ, β) `[H, D]` for M(x) = x + LN_h(f(x)) (`model.memory_norm = "ln"`).
    """
    act, _ = ACTIVATIONS[activation]
    h = x
    for l, w in enumerate(weights):
        h = h @ w
        if l < len(weights) - 1:
            h = act(h)
    return h if norm is None else norm_residual(h, x, norm)


def mlp_inner_grad_factors(
    weights: Sequence[Tensor],
    k: Tensor,
    v: Tensor,
    activation: str,
    clip: float = 0.0,
    norm: tuple[Tensor, Tensor] | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """Per-token factors of ∇_{W_l} ½‖M(k) − v‖² = a_{l−1}ᵀ δ_l, by hand (no autograd inside).

    Args:
        weights: L tensors `[..., d_{l-1}, d_l]`.
        k, v: `[..., n, d_0]` keys and `[..., n, d_L]` values.
        clip: c > 0 clamps the output error δ_L to [−c, c] (the Huber loss's gradient); 0 disables it.
        norm: (γ, β) `[H, D]` for M(k) = k + LN_h(f(k)); the error M(k) − v (clamped) is then carried back
            through LN to the MLP's output, so δ_L is the gradient w.r.t. f(k).
    Returns:
        (inputs, errors): `inputs[l]` is a_{l} `[..., n, d_l]` (a_0 = k), `errors[l]` is δ_{l+1}
        `[..., n, d_{l+1}]`, so the gradient of layer l (0-based) for token j is `inputs[l][j]ᵀ errors[l][j]`.
    """
    act, act_grad = ACTIVATIONS[activation]
    inputs = [k]
    pre = []
    h = k
    for l, w in enumerate(weights):
        z = h @ w
        if l < len(weights) - 1:
            pre.append(z)
            h = act(z)
            inputs.append(h)
        else:
            h = z
    if norm is None:
        err = h - v  # ∂ℓ/∂z_L for ½‖z_L − v‖²
        if clip > 0:
            err = err.clamp(-clip, clip)  # ∂ℓ/∂z_L for the Huber loss with threshold c
    else:
        err = _ln_inner_error(h, k, v, norm, clip)
    errors = [err]
    for l in range(len(weights) - 1, 0, -1):
        err = (err @ weights[l].transpose(-1, -2)) * act_grad(pre[l - 1])
        errors.append(err)
    errors.reverse()
    return inputs[: len(weights)], errors


def _ln_inner_error(z: Tensor, k: Tensor, v: Tensor, norm: tuple[Tensor, Tensor], clip: float) -> Tensor:
    """δ_L = ∂ℓ/∂z for M(k) = k + γ ⊙ ẑ + β, ẑ = (z − μ) r, r = 1/√(σ² + ε) (Eq. 12 loss, Huber with clip c > 0).

    With e = M(k) − v (clamped to [−c, c] under the clip) and g = γ ⊙ e = ∂ℓ/∂ẑ, LayerNorm's backward is
    ∂ℓ/∂z = r (g − mean(g) − ẑ mean(g ⊙ ẑ)), the means over the features. Written out (not autograd) so that the
    chunked path can be differentiated for the outer loop by plain autograd; the per-token oracle (naive.py) takes
    the same gradient by autograd through `norm_residual`."""
    gamma, beta = norm
    mu = z.mean(-1, keepdim=True)
    zc = z - mu
    r = torch.rsqrt(zc.pow(2).mean(-1, keepdim=True) + LN_EPS)
    zhat = zc * r
    err = k + zhat * _per_head(gamma) + _per_head(beta) - v  # ∂ℓ/∂M(k) for ½‖M(k) − v‖²
    if clip > 0:
        err = err.clamp(-clip, clip)  # the Huber loss's gradient
    g = err * _per_head(gamma)
    return r * (g - g.mean(-1, keepdim=True) - zhat * (g * zhat).mean(-1, keepdim=True))
