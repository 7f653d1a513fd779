"""NeuralMemory layer: streaming equals one call, test-time memorisation, multi-head training, stability."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from titans_cli.backbone.memory import CausalDepthwiseConv, NeuralMemory
from titans_cli.backbone.ops.memory_update import MemoryState, torch_memory_update


def _memory(**kw) -> NeuralMemory:
    torch.manual_seed(0)
    defaults = dict(dim=16, heads=2, depth=2, expansion=2, chunk_size=4)
    return NeuralMemory(**(defaults | kw)).double()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_in_random_pieces_equals_one_call(seed):
    mem = _memory()
    x = torch.randn(3, 29, 16, dtype=torch.float64)
    y_full, s_full = mem(x)
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, 29), 4))  # random split points, partial chunks included
    ys, state = [], None
    for a, b in zip([0, *cuts], [*cuts, 29], strict=True):
        y, state = mem(x[:, a:b], state)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, dim=1), y_full, atol=1e-12, rtol=1e-12)
    for a, b in zip(state.weights, s_full.weights, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    assert state.position == 29


def test_long_inputs_in_pieces_give_the_same_outputs_state_and_gradients():
    """`piece_len` (the layer runs a long input in pieces carried by the state) is a speed setting, never a change of
    result: outputs, final state and every parameter and input gradient equal one piece."""
    x = torch.randn(2, 29, 16, dtype=torch.float64)
    results = []
    for piece_len in (0, 6):  # 6 is not a multiple of the chunk (4): pieces end mid-chunk
        mem = _memory(piece_len=piece_len)
        xi = x.clone().requires_grad_()
        y, state = mem(xi)
        loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum() + state.weights[0].square().sum()
        grads = torch.autograd.grad(loss, [xi, *mem.parameters()])
        results.append((y, state, grads))
    (y0, s0, g0), (y1, s1, g1) = results
    torch.testing.assert_close(y1, y0, atol=1e-12, rtol=1e-12)
    for a, b in zip(s1.weights + s1.surprise, s0.weights + s0.surprise, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    assert s1.position == 29
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11)


def test_memory_is_reset_per_sample():
    """Predictions for a sequence do not depend on what else is in the batch (docs/conventions.md pitfall 26)."""
    mem = _memory()
    x = torch.randn(4, 11, 16, dtype=torch.float64)
    y_batch, _ = mem(x)
    y_alone, _ = mem(x[2:3])
    torch.testing.assert_close(y_batch[2:3], y_alone, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(("depth", "theta"), [(1, 0.5), (2, 0.1)])  # deeper memories need a smaller inner step
def test_reading_written_keys_retrieves_their_values(depth, theta):
    """Test-time memorisation with frozen random projections: after writing N pairs, reading the keys returns the
    values far better than before writing."""
    torch.manual_seed(0)
    Bn, H, N, D = 2, 2, 24, 32
    dims = [D] + [2 * D] * (depth - 1) + [D]
    init = [torch.randn(H, dims[i], dims[i + 1], dtype=torch.float64) / dims[i] ** 0.5 for i in range(depth)]
    k = F.normalize(torch.randn(Bn, H, N, D, dtype=torch.float64), dim=-1)
    v = torch.randn(Bn, H, N, D, dtype=torch.float64)
    ones = torch.ones(Bn, H, N, dtype=torch.float64)
    state0 = MemoryState.initial(init, Bn)
    before, _ = torch_memory_update(k, k, v, 0 * ones, 0 * ones, 0 * ones, state0, chunk_size=4)
    # Test-time training: passes over the pairs with a small inner learning rate and no forgetting.
    state = state0
    for _ in range(20):
        _, state = torch_memory_update(k, k, v, 0 * ones, 0 * ones, theta * ones, state, chunk_size=4)
    after, _ = torch_memory_update(k, k, v, 0 * ones, 0 * ones, 0 * ones, state, chunk_size=4)
    err_before = (before - v).pow(2).mean()
    err_after = (after - v).pow(2).mean()
    assert err_after < 0.1 * err_before, (err_before.item(), err_after.item())


def test_one_optimizer_step_with_four_heads_updates_every_parameter():
    """Per-head initial weights are real [H, ...] parameters, so an optimizer step works (titans-pytorch#64)."""
    torch.manual_seed(0)
    mem = NeuralMemory(dim=32, heads=4, depth=2, chunk_size=4)
    before = {n: p.detach().clone() for n, p in mem.named_parameters()}
    opt = torch.optim.AdamW(mem.parameters(), lr=1e-2)
    y, _ = mem(torch.randn(2, 10, 32))
    y.square().mean().backward()
    missing = [n for n, p in mem.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    opt.step()
    unchanged = [n for n, p in mem.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, unchanged


def test_long_sequence_stays_finite_at_initialisation():
    """Default gates at chunk 64 over 4096 tokens: no divergence (docs/design.md §11 on NaNs in long sequences)."""
    torch.manual_seed(0)
    mem = NeuralMemory(dim=64, heads=2, depth=2, chunk_size=64)
    with torch.no_grad():
        y, state = mem(torch.randn(1, 4096, 64))
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(w).all() for w in state.weights)


@pytest.mark.parametrize("theta_init", [0.1, 0.5, 0.9])
def test_theta_starts_at_theta_init_of_theta_max(theta_init):
    """At initialisation every token's θ_t is close to theta_init·θ_max (the gate weights start small), so the first
    writes are as strong as the setting says (docs/design.md §2.3)."""
    torch.manual_seed(0)
    mem = NeuralMemory(dim=32, heads=2, theta_max=0.4, theta_init=theta_init)
    with torch.no_grad():
        theta = 0.4 * torch.sigmoid(mem.gates(torch.randn(64, 32))[:, 2 * mem.heads :])
    assert theta.mean().item() == pytest.approx(0.4 * theta_init, rel=0.05)


def test_projections_share_one_dtype_when_normalize_widens(monkeypatch: pytest.MonkeyPatch) -> None:
    # CUDA autocast computes F.normalize in float32 while v stays bf16; the layer hands the update one dtype.
    from titans_cli.backbone import memory as memory_module

    widen = memory_module.F.normalize
    monkeypatch.setattr(memory_module.F, "normalize", lambda t, dim: widen(t.float(), dim=dim))
    seen = []
    real = memory_module.memory_update

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(memory_module, "memory_update", spy)
    layer = memory_module.NeuralMemory(32, 2, depth=1, chunk_size=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(torch.randn(1, 6, 32))
    assert seen == [(torch.bfloat16,) * 3]


@pytest.mark.parametrize("norm", ["none", "ln"])
@pytest.mark.parametrize("step_scale", ["none", "gram"])
def test_the_step_bounds_are_exact_in_every_kernel(step_scale, norm):
    """η ≤ η_max, θ scaled by (1 − η)/r (the key overlap), the inner clamp and the memory norm are part of the math
    every kernel computes: the per-token reference and the chunked path give the same outputs, state and gradients of
    every parameter (float64), the norm's γ and β included."""
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    results = []
    for kernel in ("naive", "torch"):
        mem = _memory(kernel=kernel, step_scale=step_scale, eta_max=0.8, inner_clip=0.05, norm=norm)
        if norm == "ln":
            with torch.no_grad():  # γ, β away from their initial 1, 0 so that a wrong use of either shows
                torch.manual_seed(1)
                mem.norm_weight.add_(0.3 * torch.randn_like(mem.norm_weight))
                mem.norm_bias.add_(0.2 * torch.randn_like(mem.norm_bias))
        xi = x.clone().requires_grad_()
        y, state = mem(xi)
        loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum() + state.weights[0].square().sum()
        names = ["x", *(n for n, _ in mem.named_parameters())]
        results.append((y, state.weights, torch.autograd.grad(loss, [xi, *mem.parameters()])))
    (y0, w0, g0), (y1, w1, g1) = results
    torch.testing.assert_close(y1, y0, atol=1e-10, rtol=1e-10)
    for a, b in zip(w1, w0, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    for name, a, b in zip(names, g1, g0, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=f"gradient of {name}")
    if norm == "ln":
        assert all(float(g1[names.index(n)].abs().max()) > 0 for n in ("norm_weight", "norm_bias"))


def test_key_overlap_shares_one_step_among_coinciding_keys_and_looks_only_back():
    """r_j counts the earlier keys of j's chunk that coincide with k_j: j-th copy of one key → j, orthogonal keys → 1;
    chunks start at multiples of b counted from the sequence start; a later key never changes an earlier r."""
    from titans_cli.backbone.memory import key_overlap

    same = F.normalize(torch.ones(1, 1, 6, 4, dtype=torch.float64), dim=-1)
    r, carry = key_overlap(same, None, 0, 4)
    torch.testing.assert_close(r[0, 0], torch.tensor([1.0, 2, 3, 4, 1, 2], dtype=torch.float64))
    assert carry.shape[2] == 2  # the unfinished second chunk
    r2, _ = key_overlap(same[:, :, :2], carry, 6, 4)  # continues that chunk
    torch.testing.assert_close(r2[0, 0], torch.tensor([3.0, 4.0], dtype=torch.float64))
    eye = torch.eye(4, dtype=torch.float64).view(1, 1, 4, 4)
    torch.testing.assert_close(key_overlap(eye, None, 0, 4)[0], torch.ones(1, 1, 4, dtype=torch.float64))
    k = F.normalize(torch.randn(1, 2, 8, 4, dtype=torch.float64), dim=-1)
    changed = k.clone()
    changed[:, :, 5] = k[:, :, 4]
    torch.testing.assert_close(key_overlap(k, None, 0, 8)[0][..., :5], key_overlap(changed, None, 0, 8)[0][..., :5])


def test_memory_settings_default_to_the_model_config_and_come_from_it_whole():
    from titans_cli.backbone.config import ModelConfig
    from titans_cli.backbone.memory import MemorySettings

    assert MemorySettings.from_config(ModelConfig()) == MemorySettings()
    cfg = ModelConfig(memory_depth=1, memory_expansion=2, memory_activation="tanh", chunk_size=8, memory_piece_len=0)
    mem = NeuralMemory.from_config(cfg)
    assert (mem.settings.depth, mem.settings.expansion, mem.settings.activation) == (1, 2, "tanh")
    assert (mem.settings.chunk_size, mem.settings.piece_len) == (8, 0)
    assert NeuralMemory(16, 2, chunk_size=4).settings == MemorySettings(chunk_size=4)


def test_python_api_imports_from_the_package():
    import titans_cli

    assert titans_cli.NeuralMemory is NeuralMemory
    assert callable(titans_cli.memory_update) and titans_cli.Titans.__name__ == "Titans"


@pytest.mark.parametrize("with_tail", [False, True])
def test_causal_conv_equals_conv1d_on_the_left_padded_input(with_tail):
    """The shifted multiply-adds of CausalDepthwiseConv are the depthwise conv1d over [tail, x] (zeros without a
    tail): outputs, carried tail and every gradient, in float64."""
    torch.manual_seed(0)
    conv = CausalDepthwiseConv(6, 4).double()
    x = torch.randn(2, 9, 6, dtype=torch.float64, requires_grad=True)
    tail = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True) if with_tail else None
    y, new_tail = conv(x, tail)
    full = torch.cat([tail if with_tail else x.new_zeros(2, 3, 6), x], dim=1)
    ref = F.conv1d(full.transpose(1, 2), conv.conv.weight, conv.conv.bias, groups=6).transpose(1, 2)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(new_tail, full[:, -3:], rtol=0, atol=0)
    inputs = [x, conv.conv.weight, conv.conv.bias, *([tail] if with_tail else [])]
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(ref, inputs, g), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
