"""The memory with `model.memory_norm = "ln"`, M(x) = x + LN_h(f(x)) (mlp.py; docs/design.md §2.4, §12): the
chunked torch path (fused steps with LayerNorm terms in the hand-written backward) against the per-token oracle
(autograd inner gradient) and against the readable chunked reference (autograd through the closed form), streaming,
the "none" default and the Triton refusal. The fused step alone: tests/ops/test_chunk_backward.py.

Float64, small shapes: outputs, final state and every gradient (q, k, v, gates, M_0, γ, β) must agree to round-off.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.ops.test_memory_update import B, D, H
from tests.ops.test_memory_update import _inputs as update_inputs
from titans_cli.backbone.memory import NeuralMemory
from titans_cli.backbone.ops.memory_update import (
    MemoryState,
    memory_update,
    naive_chunk_memory_update,
    torch_memory_update,
)
from titans_cli.backbone.ops.memory_update.mlp import mlp_forward, mlp_inner_grad_factors

NAMES = ["q", "k", "v", "alpha", "eta", "theta"]


def _inputs(T: int, depth: int, seed: int = 0) -> list[torch.Tensor]:
    """The update's test inputs (q, k, v, gates, M_0 per layer; test_memory_update.py), then γ and β `[H, D]` (away
    from 1 and 0, so every LN term is exercised)."""
    g = torch.Generator().manual_seed(seed + 1000)
    gamma = 1.0 + 0.3 * torch.randn(H, D, generator=g, dtype=torch.float64)
    beta = 0.2 * torch.randn(H, D, generator=g, dtype=torch.float64)
    return [*update_inputs(T, depth, seed), gamma.requires_grad_(), beta.requires_grad_()]


def _run(tensors: list[torch.Tensor], **kw):
    q, k, v, alpha, eta, theta, *rest = tensors
    init, norm = rest[:-2], (rest[-2], rest[-1])
    y, state = memory_update(q, k, v, alpha, eta, theta, MemoryState.initial(init, B), norm=norm, **kw)
    # A loss that touches the outputs and every part of the final state, so all gradient paths are compared.
    w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    loss = (y * w).sum() + sum((s**2).sum() for s in state.weights) + sum((s**3).sum() for s in state.surprise)
    return y, state, torch.autograd.grad(loss, tensors)


def _assert_same(ref, out, tol: float, depth: int) -> None:
    (y1, s1, g1), (y2, s2, g2) = ref, out
    torch.testing.assert_close(y2, y1, atol=tol, rtol=tol, msg="outputs")
    for l, (a, b) in enumerate(zip(s1.weights + s1.surprise, s2.weights + s2.surprise, strict=True)):
        torch.testing.assert_close(b, a, atol=tol, rtol=tol, msg=f"final state tensor {l}")
    assert s1.position == s2.position
    names = [*NAMES, *(f"M_0[{l}]" for l in range(depth)), "gamma", "beta"]
    for name, a, b in zip(names, g1, g2, strict=True):
        assert a is not None and float(a.abs().max()) > 0, f"no gradient reaches {name}"
        torch.testing.assert_close(b, a, atol=tol, rtol=tol, msg=f"gradient of {name}")


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("chunk_size", [1, 4])
@pytest.mark.parametrize("read", ["inclusive", "strict"])
@pytest.mark.parametrize("clip", [0.0, 0.3])
def test_ln_chunked_path_equals_per_token_oracle(depth, chunk_size, read, clip):
    """Kernel "torch" with the norm (closed form, hand-written LN backward in the inner gradient) equals the
    per-token oracle (autograd inner gradient through LN): outputs, state, and the gradients of q, k, v, the gates,
    M_0, γ and β. chunk_size 1 is the exact sequential rule; 11 tokens leave a partial last chunk."""
    tensors = _inputs(T=11, depth=depth, seed=depth + chunk_size)
    kw = dict(chunk_size=chunk_size, read=read, clip=clip)
    ref = _run(tensors, kernel="naive", **kw)
    out = _run(tensors, kernel="torch", **kw)
    _assert_same(ref, out, 1e-10, depth)
    if clip > 0:  # the clamp binds at the initial weights, so the Huber branch is what was compared
        _, k, v, _, _, _, *rest = (t.detach() for t in tensors)
        assert float((mlp_forward(rest[:-2], k, "silu", (rest[-2], rest[-1])) - v).abs().max()) > clip


@pytest.mark.parametrize("checkpoint_chunks", [0, 2])
@pytest.mark.parametrize("position", [0, 3])
def test_ln_fused_call_equals_autograd_reference_with_partial_chunks(checkpoint_chunks, position):
    """torch_memory_update (fused, hand-written backward) equals naive_chunk_memory_update (autograd) with the norm:
    a call that starts mid-chunk and ends in a partial chunk, with and without activation checkpointing."""
    tensors = _inputs(T=13, depth=2, seed=5)
    q, k, v, alpha, eta, theta, w1, w2, gamma, beta = tensors
    results = []
    for fn, extra in ((naive_chunk_memory_update, {}), (torch_memory_update, {"checkpoint_chunks": checkpoint_chunks})):
        start = MemoryState.initial([w1, w2], B)
        state = MemoryState(start.weights, start.surprise, start.anchor, position)
        y, end = fn(q, k, v, alpha, eta, theta, state, chunk_size=4, clip=0.3, norm=(gamma, beta), **extra)
        w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
        loss = (y * w).sum() + sum((s**2).sum() for s in end.weights) + sum((s**3).sum() for s in end.surprise)
        results.append((y, end, torch.autograd.grad(loss, tensors)))
    _assert_same(results[0], results[1], 1e-10, depth=2)


@pytest.mark.parametrize("depth", [1, 2])
def test_ln_hand_written_inner_gradient_equals_autograd(depth):
    """mlp_inner_grad_factors with the norm: Σ_j a_jᵀ δ_j per layer is autograd's gradient of the Huber/½‖·‖² loss
    of M(k) = k + LN_h(f(k)) (Eq. 12) w.r.t. each weight."""
    *_, gamma, beta = tensors = _inputs(T=6, depth=depth, seed=7)
    k, v, weights = tensors[1].detach(), 3.0 * tensors[2].detach(), [w.detach() for w in tensors[6:-2]]
    norm = (gamma.detach(), beta.detach())
    for clip in (0.0, 0.5):
        leaves = [w.unsqueeze(0).expand(B, *w.shape).clone().requires_grad_() for w in weights]
        err = mlp_forward(leaves, k, "silu", norm) - v
        loss = 0.5 * err.pow(2) if clip == 0 else F.huber_loss(err, torch.zeros_like(err), reduction="none", delta=clip)
        expected = torch.autograd.grad(loss.sum(), leaves)
        inputs, errors = mlp_inner_grad_factors(leaves, k, v, "silu", clip, norm)
        for l, (a, d) in enumerate(zip(inputs, errors, strict=True)):
            torch.testing.assert_close(a.transpose(-1, -2) @ d, expected[l], atol=1e-12, rtol=1e-10, msg=f"layer {l}")


def _layer(**kw) -> NeuralMemory:
    torch.manual_seed(0)
    defaults = dict(dim=10, heads=2, depth=2, expansion=2, chunk_size=4, norm="ln")
    layer = NeuralMemory(**(defaults | kw)).double()
    with torch.no_grad():  # γ, β away from their initial 1, 0 so that a wrong use of either shows
        layer.norm_weight.add_(0.3 * torch.randn_like(layer.norm_weight))
        layer.norm_bias.add_(0.2 * torch.randn_like(layer.norm_bias))
    return layer


def test_ln_layer_streaming_in_pieces_equals_one_call():
    """With the norm, the gram step scale (carried keys), η_max and the inner clamp on (the defaults): feeding a
    sequence in pieces that end mid-chunk equals one call (outputs and final state)."""
    mem = _layer(inner_clip=0.1)
    x = torch.randn(2, 23, 10, dtype=torch.float64)
    with torch.no_grad():
        y_full, s_full = mem(x)
        ys, state = [], None
        for a, b in [(0, 3), (3, 9), (9, 10), (10, 23)]:
            y, state = mem(x[:, a:b], state)
            ys.append(y)
    torch.testing.assert_close(torch.cat(ys, dim=1), y_full, atol=1e-12, rtol=1e-12)
    for a, b in zip(state.weights + state.surprise, s_full.weights + s_full.surprise, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    assert state.position == 23


def test_ln_layer_reads_m_of_q_and_retrieve_uses_the_norm():
    """retrieve (Eq. 15 without a write) reads q + LN_h(f(q)) with the state's weights: with α, θ ≈ 0 (e^-40) the
    memory neither forgets nor writes, so the layer's own outputs equal retrieve's."""
    mem = _layer()
    x = torch.randn(1, 6, 10, dtype=torch.float64)
    with torch.no_grad():
        mem.gates.weight.zero_()
        mem.gates.bias.copy_(torch.tensor([-40.0] * 2 + [0.0] * 2 + [-40.0] * 2))
        y, state = mem(x)
        r, _ = mem.retrieve(x, mem.initial_state(1), None)
    torch.testing.assert_close(r, y, atol=1e-12, rtol=1e-12)


def test_memory_norm_none_is_unchanged():
    """memory_norm "none" (the default) adds no parameter, and the dispatcher's result is bit-identical to
    `torch_memory_update` without a norm."""
    mem = NeuralMemory(16, 2)
    assert mem.settings.norm == "none" and mem._norm() is None
    assert not any("norm_weight" in n or "norm_bias" in n for n, _ in mem.named_parameters())
    q, k, v, alpha, eta, theta, *init = [t.detach().float() for t in _inputs(T=9, depth=2)[:-2]]
    state = MemoryState.initial(init, B)
    y1, s1 = memory_update(q, k, v, alpha, eta, theta, state, chunk_size=4, kernel="torch", clip=1.0)
    y0, s0 = torch_memory_update(q, k, v, alpha, eta, theta, state, chunk_size=4, clip=1.0)
    assert torch.equal(y1, y0) and all(torch.equal(a, b) for a, b in zip(s1.weights, s0.weights, strict=True))


def test_triton_kernel_refuses_the_norm_in_one_line():
    q, k, v, alpha, eta, theta, *rest = [t.detach() for t in _inputs(T=4, depth=2)]
    state = MemoryState.initial(rest[:-2], B)
    with pytest.raises(ValueError, match=r"^model\.memory_norm='ln' has no Triton kernel; use model\.kernel 'torch'"):
        memory_update(q, k, v, alpha, eta, theta, state, chunk_size=4, kernel="triton", norm=(rest[-2], rest[-1]))


def test_unknown_memory_norm_names_the_field():
    with pytest.raises(ValueError, match=r"^model\.memory_norm: expected one of 'none', 'ln', got 'rms'$"):
        NeuralMemory(16, 2, norm="rms")
