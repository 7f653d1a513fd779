"""The fused chunk step's hand-written backward (chunk.py `_FusedChunkStep`) against autograd through the readable
reference `naive_chunk_step` (naive.py).

Float64, so agreement is round-off tight: reads, chunk-end weights and surprise, and the gradient of every input
(q, k, v, the gates, and the incoming weights, surprise and anchor, including an anchor that is the weights
tensor itself and batch-expanded [H, ...] parameters), over depths 1-3, both reads, silu/gelu/tanh.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from titans_cli.backbone.ops.memory_update import MemoryState, naive_chunk_memory_update, torch_memory_update
from titans_cli.backbone.ops.memory_update.chunk import fused_chunk_step
from titans_cli.backbone.ops.memory_update.naive import naive_chunk_step

B, H, D, HIDDEN = 2, 2, 4, 6
TOL = 1e-11


def _dims(depth: int) -> list[int]:
    return [D] + [HIDDEN] * (depth - 1) + [D]


def _gates_and_qkv(n: int, g: torch.Generator) -> list[torch.Tensor]:
    q = F.normalize(torch.randn(B, H, n, D, generator=g, dtype=torch.float64), dim=-1)
    k = F.normalize(torch.randn(B, H, n, D, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(B, H, n, D, generator=g, dtype=torch.float64)
    alpha = 0.2 * torch.rand(B, H, n, generator=g, dtype=torch.float64)
    eta = torch.rand(B, H, n, generator=g, dtype=torch.float64)
    theta = 0.5 * torch.rand(B, H, n, generator=g, dtype=torch.float64)
    return [q, k, v, alpha, eta, theta]


def _state(depth: int, g: torch.Generator, *, batched: bool) -> list[torch.Tensor]:
    lead = (B, H) if batched else (H,)
    dims = _dims(depth)
    return [torch.randn(*lead, dims[i], dims[i + 1], generator=g, dtype=torch.float64) / dims[i] ** 0.5
            for i in range(depth)]  # fmt: skip


def _close(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    # Round-off scales with the largest entry (gate gradients sum many terms of both signs).
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, atol=TOL * scale, rtol=TOL, msg=msg or None)


def _loss(y, new_w, new_s):
    # Touches the reads and every part of the chunk-end state, with distinct weights, so all paths are compared.
    w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    return (y * w).sum() + sum((s**2).sum() for s in new_w) + sum((s**3).sum() for s in new_s)


def _compare_step(
    depth: int, n: int, read: str, activation: str, anchor_kind: str, seed: int = 0, clip: float = 0.0,
    norm: bool = False,
) -> None:  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    leaves = [t.requires_grad_() for t in _gates_and_qkv(n, g)]
    if anchor_kind == "fresh":
        # First chunk of a call: weights are batch-expanded [H, ...] parameters, anchor is the same tensor,
        # surprise is zero and needs no gradient.
        init = [t.requires_grad_() for t in _state(depth, g, batched=False)]
        leaves += init
        weights = [w.unsqueeze(0).expand(B, *w.shape) for w in init]
        surprise = [torch.zeros_like(w) for w in weights]
        anchor = weights
    else:
        # Mid-chunk: incoming weights, surprise and a separate anchor, all per sample.
        st = [t.requires_grad_() for _ in range(3) for t in _state(depth, g, batched=True)]
        leaves += st
        weights, surprise, anchor = st[:depth], st[depth : 2 * depth], st[2 * depth :]
    ln = None
    if norm:  # memory_norm "ln": γ, β `[H, D]` away from 1, 0 (mlp.py)
        ln = (1.0 + 0.3 * torch.randn(H, D, generator=g, dtype=torch.float64), 0.2 * torch.randn(H, D, generator=g))
        ln = tuple(t.to(torch.float64).requires_grad_() for t in ln)
        leaves += list(ln)

    def run(step):
        y, new_w, new_s = step(*leaves[:6], weights, surprise, anchor, activation, read, clip, ln)
        return y, new_w, new_s, torch.autograd.grad(_loss(y, new_w, new_s), leaves)

    ref, out = run(naive_chunk_step), run(fused_chunk_step)
    _close(out[0], ref[0], "reads")
    for l in range(depth):
        _close(out[1][l], ref[1][l], f"weights of layer {l}")
        _close(out[2][l], ref[2][l], f"surprise of layer {l}")
    names = ["q", "k", "v", "alpha", "eta", "theta"] + [f"state[{i}]" for i in range(len(leaves) - 6)]
    for name, a, b in zip(names, ref[3], out[3], strict=True):
        assert b.abs().sum() > 0 or a.abs().sum() == 0
        _close(b, a, f"gradient of {name}")


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("read", ["inclusive", "strict"])
@pytest.mark.parametrize("anchor_kind", ["fresh", "mid_chunk"])
def test_fused_step_matches_autograd_step(depth, read, anchor_kind):
    _compare_step(depth, n=5, read=read, activation="silu", anchor_kind=anchor_kind)


@pytest.mark.parametrize("activation", ["silu", "gelu", "tanh"])
@pytest.mark.parametrize("n", [1, 3])
def test_fused_step_activations_need_the_second_derivative(activation, n):
    # Depth 2 and 3 go through δ_l = (δ_{l+1} Wᵀ) ⊙ σ'(z), whose backward uses σ''.
    for depth in (2, 3):
        _compare_step(depth, n=n, read="strict", activation=activation, anchor_kind="mid_chunk", seed=n)


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("anchor_kind", ["fresh", "mid_chunk"])
def test_fused_step_with_inner_clip_matches_autograd_step(depth, anchor_kind):
    # v ~ N(0, 1) against weights of norm ~1: a clip of 0.5 cuts a good share of the errors, so both the clamped and
    # the passed-through branches of the backward are exercised.
    _compare_step(depth, n=6, read="inclusive", activation="silu", anchor_kind=anchor_kind, clip=0.5)


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("read", ["inclusive", "strict"])
@pytest.mark.parametrize("anchor_kind", ["fresh", "mid_chunk"])
@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_fused_step_with_memory_norm_matches_autograd_step(depth, read, anchor_kind, clip):
    """M(x) = x + LN_h(f(x)) (model.memory_norm = "ln"): the LayerNorm terms of the hand-written backward (read LN,
    and the inner error carried back through LN, whose backward needs LN's second order) against autograd through
    `naive_chunk_step`; the gradients of γ and β (the last two leaves) included."""
    _compare_step(depth, n=5, read=read, activation="gelu", anchor_kind=anchor_kind, clip=clip, norm=True, seed=depth)


def test_fused_step_with_memory_norm_passes_gradcheck():
    g = torch.Generator().manual_seed(4)
    q, k, v, alpha, eta, theta = _gates_and_qkv(3, g)
    state = [t for _ in range(3) for t in _state(2, g, batched=True)]
    ln = [1.0 + 0.3 * torch.randn(H, D, generator=g, dtype=torch.float64), 0.2 * torch.randn(H, D, generator=g)]
    leaves = [t.detach().to(torch.float64).clone().requires_grad_() for t in [q, k, v, alpha, eta, theta, *state, *ln]]

    def fn(*xs):
        y, new_w, new_s = fused_chunk_step(
            *xs[:6], xs[6:8], xs[8:10], xs[10:12], "silu", "inclusive", 0.3, (xs[12], xs[13])
        )
        return (y, *new_w, *new_s)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7)


def test_fused_step_passes_gradcheck():
    g = torch.Generator().manual_seed(3)
    q, k, v, alpha, eta, theta = _gates_and_qkv(3, g)
    state = [t for _ in range(3) for t in _state(2, g, batched=True)]
    leaves = [t.detach().clone().requires_grad_() for t in [q, k, v, alpha, eta, theta, *state]]

    def fn(*xs):
        y, new_w, new_s = fused_chunk_step(*xs[:6], xs[6:8], xs[8:10], xs[10:12], "gelu", "inclusive")
        return (y, *new_w, *new_s)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7)


def _run_call(tensors, depth, fused, **kw):
    q, k, v, alpha, eta, theta, *init = tensors
    state = MemoryState.initial(init, B)
    fn = torch_memory_update if fused else naive_chunk_memory_update
    y, state = fn(q, k, v, alpha, eta, theta, state, **kw)
    return y, state, torch.autograd.grad(_loss(y, state.weights, state.surprise), tensors)


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("read", ["inclusive", "strict"])
@pytest.mark.parametrize("T", [3, 11, 16, 21])
def test_fused_call_matches_default_call_with_partial_chunks(depth, read, T):
    # chunk 4: T = 3 is one partial chunk, 16 all full (batched coefficients), 11 and 21 end in a partial one.
    g = torch.Generator().manual_seed(T)
    tensors = [t.requires_grad_() for t in _gates_and_qkv(T, g) + _state(depth, g, batched=False)]
    ref = _run_call(tensors, depth, False, chunk_size=4, read=read, activation="tanh")
    out = _run_call(tensors, depth, True, chunk_size=4, read=read, activation="tanh")
    _close(out[0], ref[0])
    for a, b in zip(ref[1].weights + ref[1].surprise + ref[1].anchor, out[1].weights + out[1].surprise + out[1].anchor,
                    strict=True):  # fmt: skip
        _close(b, a)
    for a, b in zip(ref[2], out[2], strict=True):
        _close(b, a)


def test_fused_call_continues_from_a_mid_chunk_state():
    # Two calls split inside a chunk (positions 6 | 13 with chunk 4) equal one call, with gradients.
    g = torch.Generator().manual_seed(7)
    tensors = [t.requires_grad_() for t in _gates_and_qkv(19, g) + _state(2, g, batched=False)]
    q, k, v, alpha, eta, theta, *init = tensors
    ref = _run_call(tensors, 2, True, chunk_size=4)
    state = MemoryState.initial(init, B)
    ys = []
    for sl in (slice(0, 6), slice(6, 19)):
        y, state = torch_memory_update(q[:, :, sl], k[:, :, sl], v[:, :, sl], alpha[:, :, sl], eta[:, :, sl],
                                       theta[:, :, sl], state, chunk_size=4)  # fmt: skip
        ys.append(y)
    y = torch.cat(ys, dim=2)
    grads = torch.autograd.grad(_loss(y, state.weights, state.surprise), tensors)
    _close(y, ref[0])
    for a, b in zip(ref[2], grads, strict=True):
        _close(b, a)


def test_fused_backward_under_bf16_autocast_runs_and_tracks_float32():
    g = torch.Generator().manual_seed(1)
    tensors = [t.float().requires_grad_() for t in _gates_and_qkv(9, g) + _state(2, g, batched=False)]
    ref = _run_call(tensors, 2, False, chunk_size=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _run_call(tensors, 2, True, chunk_size=4)
    for a, b in zip(ref[2], out[2], strict=True):
        assert b.dtype == a.dtype
        assert (b.float() - a).norm() <= 0.05 * a.norm() + 1e-6
