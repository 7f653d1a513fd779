"""The chunked closed form (chunk.py) against the per-token reference (recurrent.py) and the paper's special cases.

Float64 throughout, so tolerances are round-off tight: outputs, final state and every gradient must agree.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from titans_cli.backbone.ops.memory_update import MemoryState, memory_update, naive_memory_update, torch_memory_update
from titans_cli.backbone.ops.memory_update.chunk import chunk_coefficients
from titans_cli.backbone.ops.memory_update.mlp import ACTIVATIONS, mlp_forward, mlp_inner_grad_factors

B, H, D, HIDDEN = 2, 3, 5, 7


def _inputs(T: int, depth: int, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    dims = [D] + [HIDDEN] * (depth - 1) + [D]
    init = [(torch.randn(H, dims[i], dims[i + 1], generator=g, dtype=dtype) / dims[i] ** 0.5) for i in range(depth)]
    q = F.normalize(torch.randn(B, H, T, D, generator=g, dtype=dtype), dim=-1)
    k = F.normalize(torch.randn(B, H, T, D, generator=g, dtype=dtype), dim=-1)
    v = torch.randn(B, H, T, D, generator=g, dtype=dtype)
    alpha = 0.2 * torch.rand(B, H, T, generator=g, dtype=dtype)
    eta = torch.rand(B, H, T, generator=g, dtype=dtype)
    theta = 0.5 * torch.rand(B, H, T, generator=g, dtype=dtype)
    tensors = [q, k, v, alpha, eta, theta, *init]
    return [t.requires_grad_() for t in tensors]


def _run(fn, tensors, depth, **kw):
    q, k, v, alpha, eta, theta, *init = tensors
    y, state = fn(q, k, v, alpha, eta, theta, MemoryState.initial(init, B), **kw)
    # A loss that touches the outputs and every part of the final state, so all gradient paths are compared.
    w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    loss = (y * w).sum() + sum((s**2).sum() for s in state.weights) + sum((s**3).sum() for s in state.surprise)
    grads = torch.autograd.grad(loss, tensors)
    return y, state, grads


NAMES = ["q", "k", "v", "alpha", "eta", "theta"]


def _assert_same(ref, out, tol):
    (y1, s1, g1), (y2, s2, g2) = ref, out
    torch.testing.assert_close(y2, y1, atol=tol, rtol=tol, msg="outputs")
    for l, (a, b) in enumerate(zip(s1.weights, s2.weights, strict=True)):
        torch.testing.assert_close(b, a, atol=tol, rtol=tol, msg=f"final weights of layer {l}")
    for l, (a, b) in enumerate(zip(s1.surprise, s2.surprise, strict=True)):
        torch.testing.assert_close(b, a, atol=tol, rtol=tol, msg=f"final surprise of layer {l}")
    assert s1.position == s2.position
    for i, (a, b) in enumerate(zip(g1, g2, strict=True)):
        name = NAMES[i] if i < len(NAMES) else f"M_0[{i - len(NAMES)}]"
        torch.testing.assert_close(b, a, atol=tol, rtol=tol, msg=f"gradient of {name}")


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("read", ["inclusive", "strict"])
def test_chunk_of_one_equals_per_token_recurrence(depth, read):
    tensors = _inputs(T=13, depth=depth)
    ref = _run(naive_memory_update, tensors, depth, chunk_size=1, read=read)
    out = _run(torch_memory_update, tensors, depth, chunk_size=1, read=read)
    _assert_same(ref, out, 1e-10)


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("chunk_size", [4, 8])
@pytest.mark.parametrize("read", ["inclusive", "strict"])
def test_chunked_equals_recurrence_with_gradients_frozen_at_chunk_starts(depth, chunk_size, read):
    tensors = _inputs(T=19, depth=depth, seed=1)  # 19 is not a multiple of the chunk: partial last chunk
    ref = _run(naive_memory_update, tensors, depth, chunk_size=chunk_size, read=read)
    out = _run(torch_memory_update, tensors, depth, chunk_size=chunk_size, read=read)
    _assert_same(ref, out, 1e-10)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_hand_written_inner_gradients_equal_autograd(activation):
    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(2, 4, 6, generator=g, dtype=torch.float64), torch.randn(2, 6, 6, generator=g,
               dtype=torch.float64), torch.randn(2, 6, 4, generator=g, dtype=torch.float64)]  # fmt: skip
    k = torch.randn(2, 1, 4, generator=g, dtype=torch.float64)
    v = torch.randn(2, 1, 4, generator=g, dtype=torch.float64)
    leaves = [w.clone().requires_grad_() for w in weights]
    loss = 0.5 * (mlp_forward(leaves, k, activation) - v).pow(2).sum()
    expected = torch.autograd.grad(loss, leaves)
    inputs, errors = mlp_inner_grad_factors(weights, k, v, activation)
    for l in range(3):
        torch.testing.assert_close(inputs[l].transpose(-1, -2) @ errors[l], expected[l], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("chunk_size", [1, 4])
def test_inner_clip_chunked_equals_huber_reference(depth, chunk_size):
    """With an inner clip the fast path equals the reference whose inner loss is the Huber loss, written out there
    and differentiated by autograd; outputs, final state and every gradient."""
    tensors = _inputs(T=11, depth=depth, seed=5)
    ref = _run(naive_memory_update, tensors, depth, chunk_size=chunk_size, clip=0.5)
    out = _run(torch_memory_update, tensors, depth, chunk_size=chunk_size, clip=0.5)
    _assert_same(ref, out, 1e-10)
    plain = _run(torch_memory_update, tensors, depth, chunk_size=chunk_size)
    assert (plain[0] - out[0]).abs().max() > 1e-3  # the clip is active on these inputs


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_clipped_inner_gradients_are_huber_gradients(activation):
    g = torch.Generator().manual_seed(6)
    weights = [torch.randn(3, 4, 6, generator=g, dtype=torch.float64), torch.randn(3, 6, 4, generator=g,
               dtype=torch.float64)]  # fmt: skip
    k = torch.randn(3, 1, 4, generator=g, dtype=torch.float64)
    v = 2 * torch.randn(3, 1, 4, generator=g, dtype=torch.float64)
    leaves = [w.clone().requires_grad_() for w in weights]
    loss = F.huber_loss(mlp_forward(leaves, k, activation), v, reduction="sum", delta=0.3)
    expected = torch.autograd.grad(loss, leaves)
    inputs, errors = mlp_inner_grad_factors(weights, k, v, activation, clip=0.3)
    assert errors[-1].abs().max() <= 0.3
    for l in range(2):
        torch.testing.assert_close(inputs[l].transpose(-1, -2) @ errors[l], expected[l], atol=1e-12, rtol=1e-12)


def test_inner_clip_keeps_a_long_run_of_one_key_finite():
    """The failure mode of the chunked update (docs/design.md §11): a chunk of b equal keys sums b gradients taken at
    the same point, i.e. one step of size Σθ ≈ b·θ on that key; with b·θ > 2 every chunk overshoots and the memory
    grows geometrically. Clamping the inner error bounds each write, so the memory stays finite and bounded."""
    T, b = 2048, 64
    g = torch.Generator().manual_seed(7)
    k = F.normalize(torch.randn(1, 1, 1, D, generator=g), dim=-1).expand(1, 1, T, D)
    v = torch.randn(1, 1, 1, D, generator=g).expand(1, 1, T, D)
    alpha, eta, theta = torch.full((1, 1, T), 1e-3), torch.full((1, 1, T), 0.5), torch.full((1, 1, T), 0.1)
    state = MemoryState.initial([torch.zeros(1, D, D)], 1)
    y, _ = torch_memory_update(k, k, v, alpha, eta, theta, state, chunk_size=b)
    assert not torch.isfinite(y).all() or y.abs().max() > 1e6  # unclipped: diverged
    y, end = torch_memory_update(k, k, v, alpha, eta, theta, state, chunk_size=b, clip=1.0)
    assert torch.isfinite(y).all() and y.abs().max() < 100.0
    assert end.weights[0].norm() < 100.0


def test_no_momentum_linear_memory_is_a_delta_rule_with_forget_gate():
    """η = 0, L_M = 1 (docs/design.md §5.5): M_t = (1−α_t) M_{t−1} − θ_t (M_{t−1} k_t − v_t) k_tᵀ, column convention."""
    T = 9
    q, k, v, alpha, _, theta, w0 = (t.detach() for t in _inputs(T=T, depth=1, seed=2))
    eta = torch.zeros_like(alpha)
    y, state = torch_memory_update(q, k, v, alpha, eta, theta, MemoryState.initial([w0], B), chunk_size=1)
    M = w0.transpose(-1, -2).expand(B, H, D, D).clone()  # column convention: M k = (k W)ᵀ
    for t in range(T):
        kt, vt = k[:, :, t, :, None], v[:, :, t, :, None]
        a, th = alpha[:, :, t, None, None], theta[:, :, t, None, None]
        M = (1 - a) * M - th * (M @ kt - vt) @ kt.transpose(-1, -2)
        torch.testing.assert_close(y[:, :, t], (M @ q[:, :, t, :, None]).squeeze(-1), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(state.weights[0].transpose(-1, -2), M, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("T", [3, 11])
def test_partial_chunks_are_written(T):
    """A sequence shorter than the chunk, or a trailing partial chunk, still updates the memory (titans-pytorch#59)."""
    q, k, v, alpha, eta, theta, w0, w1 = (t.detach() for t in _inputs(T=T, depth=2))
    state0 = MemoryState.initial([w0, w1], B)
    _, state = torch_memory_update(q, k, v, alpha, eta, theta, state0, chunk_size=8)
    assert state.position == T
    assert (state.weights[0] - state0.weights[0]).abs().max() > 1e-3
    _, ref = naive_memory_update(q, k, v, alpha, eta, theta, state0, chunk_size=8)
    torch.testing.assert_close(state.weights[1], ref.weights[1], atol=1e-12, rtol=1e-12)


def test_coefficients_match_products_and_stay_free_of_denormals():
    g = torch.Generator().manual_seed(4)
    alpha, eta, theta = (torch.rand(6, generator=g, dtype=torch.float64) for _ in range(3))
    beta, gamma, e, c, theta_p = chunk_coefficients(alpha, eta, theta)
    for i in range(6):
        assert beta[i] == pytest.approx(torch.prod(1 - alpha[: i + 1]).item(), rel=1e-12)
        d = [torch.prod(1 - alpha[m + 1 : i + 1]).item() for m in range(i + 1)]
        p = [[torch.prod(eta[j + 1 : m + 1]).item() for j in range(6)] for m in range(6)]
        assert gamma[i] == pytest.approx(sum(d[m] * torch.prod(eta[: m + 1]).item() for m in range(i + 1)), rel=1e-12)
        for j in range(6):
            expected = theta[j].item() * sum(d[m] * p[m][j] for m in range(j, i + 1)) if j <= i else 0.0
            assert c[i, j].item() == pytest.approx(expected, rel=1e-12, abs=1e-300)
    # Strong decay over a long chunk: tiny coefficients are exact zeros, never float32 denormals.
    strong = torch.full((64,), 0.9)
    _, _, _, c32, _ = chunk_coefficients(strong, strong.clone().fill_(0.1), torch.ones(64))
    nonzero = c32[c32 != 0]
    assert nonzero.abs().min() >= torch.finfo(torch.float32).tiny


def test_unknown_or_unavailable_kernel_is_a_clear_error():
    q, k, v, alpha, eta, theta, w0 = (t.detach() for t in _inputs(T=4, depth=1))
    state = MemoryState.initial([w0], B)
    with pytest.raises(ValueError, match="expected one of"):
        memory_update(q, k, v, alpha, eta, theta, state, chunk_size=2, kernel="cuda")
    y_naive, _ = memory_update(q, k, v, alpha, eta, theta, state, chunk_size=2, kernel="naive")
    y_torch, _ = memory_update(q, k, v, alpha, eta, theta, state, chunk_size=2, kernel="torch")
    torch.testing.assert_close(y_naive, y_torch, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("position", [0, 3])
def test_activation_checkpointing_gives_the_same_outputs_and_gradients(position):
    """Recomputing groups of chunks in backward (checkpoint_chunks) changes memory use, never results: outputs,
    final state and every gradient, from a fresh and from a mid-chunk state, with a partial last chunk."""
    tensors = _inputs(T=23, depth=2, seed=8)
    q, k, v, alpha, eta, theta, *init = tensors
    start = MemoryState.initial(init, B)
    if position:
        _, start = torch_memory_update(q[:, :, :position], k[:, :, :position], v[:, :, :position],
                                       alpha[:, :, :position], eta[:, :, :position], theta[:, :, :position],
                                       start, chunk_size=4)  # fmt: skip

    def run(**kw):
        y, end = torch_memory_update(q, k, v, alpha, eta, theta, start, chunk_size=4, **kw)
        loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum()
        loss = loss + sum((w**2).sum() for w in end.weights) + sum((s**3).sum() for s in end.surprise)
        return y, end, torch.autograd.grad(loss, tensors, retain_graph=True)  # the prefix graph is shared

    _assert_same(run(), run(checkpoint_chunks=2), 1e-12)
