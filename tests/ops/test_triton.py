"""The Triton memory-update kernel (triton.py) against the torch closed form (chunk.py): outputs, final state and
every input gradient, with relative-RMS tolerances named per tensor.

Without CUDA the kernels run in Triton's CPU interpreter, which must be switched on before the kernel module is
imported (so this module sets TRITON_INTERPRET=1 at import when no GPU is present). The interpreter costs a few
milliseconds per program and loop step, so shapes stay tiny; tuning constants are lowered per test to exercise
several hidden tiles, value tiles and backward segments. Real sizes run on a GPU only (`gpu` marker).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="the Triton kernel needs the `triton` extra: pip install -e '.[triton]'")

from tests.assertions import assert_close  # noqa: E402
from titans_cli.errors import UsageError  # noqa: E402
from titans_cli.ops.memory_update import MemoryState, chunk_memory_update, memory_update  # noqa: E402
from titans_cli.ops.memory_update import triton as kernel_module  # noqa: E402
from titans_cli.ops.memory_update.triton import triton_memory_update  # noqa: E402

GATES = ("alpha", "eta", "theta")
# Relative-RMS tolerances of the float32 kernel against the float64 torch path (measured: 1e-7 to 7e-6, dη).
TOL_FORWARD = 2e-6
TOL_GRAD = {"q": 1e-5, "k": 1e-5, "v": 1e-5, "alpha": 5e-5, "eta": 5e-5, "theta": 5e-5, "state": 1e-5}

needs_interpreter_or_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() or kernel_module.INTERPRET),
    reason="TRITON_INTERPRET was not set before triton.py was imported and there is no GPU",
)
pytestmark = needs_interpreter_or_cuda


def _case(
    B: int, H: int, T: int, D: int, depth: int, b: int, position: int | None, hidden: int = 32, seed: int = 0
) -> tuple[list[torch.Tensor], MemoryState]:
    """Seeded float32 inputs `[B, H, T, D]`, gates `[B, H, T]` and a state (fresh when position is None)."""
    g = torch.Generator().manual_seed(seed)
    dims = [D] + [hidden] * (depth - 1) + [D]
    q = F.normalize(torch.randn(B, H, T, D, generator=g), dim=-1)
    k = F.normalize(torch.randn(B, H, T, D, generator=g), dim=-1)
    v = torch.randn(B, H, T, D, generator=g)
    alpha = 0.2 * torch.rand(B, H, T, generator=g)
    eta = torch.rand(B, H, T, generator=g)
    theta = 0.5 * torch.rand(B, H, T, generator=g)
    init = [torch.randn(H, dims[i], dims[i + 1], generator=g) / dims[i] ** 0.5 for i in range(depth)]
    if position is None:
        state = MemoryState.initial(init, B)
    else:
        weights = tuple(w.expand(B, *w.shape) + 0.1 * torch.randn(B, *w.shape, generator=g) for w in init)
        surprise = tuple(0.1 * torch.randn(w.shape, generator=g) for w in weights)
        # Mid-chunk: the gradient point is the chunk-start weights, which differ from the current ones.
        anchor = (
            weights
            if position % b == 0
            else tuple(w + 0.1 * torch.randn(w.shape, generator=g) for w in weights)
        )
        state = MemoryState(weights, surprise, anchor, position)
    return [q, k, v, alpha, eta, theta], state


def _state_tensors(state: MemoryState) -> list[tuple[str, torch.Tensor]]:
    named = []
    for part in ("weights", "surprise", "anchor"):
        named += [(f"{part}[{l}]", t) for l, t in enumerate(getattr(state, part))]
    return named


def _cast_state(
    state: MemoryState, dtype: torch.dtype, leaves: bool
) -> tuple[MemoryState, list[torch.Tensor]]:
    """A copy of the state in `dtype`, every tensor a fresh leaf (requires grad when `leaves`)."""
    tensors = [t.detach().to(dtype).requires_grad_(leaves) for _, t in _state_tensors(state)]
    L = len(state.weights)
    parts = tuple(tensors[:L]), tuple(tensors[L : 2 * L]), tuple(tensors[2 * L :])
    return MemoryState(*parts, position=state.position), tensors


@pytest.mark.parametrize(
    ("depth", "H", "T", "D", "b", "position", "read", "activation"),
    [
        (1, 2, 11, 16, 4, None, "inclusive", "silu"),  # fresh memory, partial last chunk
        (1, 1, 21, 16, 16, 5, "strict", "silu"),  # starts mid-chunk with an anchor, strict read
        (1, 1, 13, 32, 6, 3, "inclusive", "silu"),  # two value-column tiles
        (2, 1, 13, 16, 5, 3, "inclusive", "silu"),  # two hidden tiles, mid-chunk start
        (2, 2, 19, 16, 8, None, "strict", "silu"),
        (2, 1, 2, 16, 3, 1, "inclusive", "gelu"),  # T < b, inside one chunk that began in an earlier call
        (2, 1, 9, 16, 4, 8, "inclusive", "tanh"),  # incoming state on a chunk border
    ],
)
def test_forward_and_final_state_match_torch_path(
    monkeypatch: pytest.MonkeyPatch, depth, H, T, D, b, position, read, activation
) -> None:
    monkeypatch.setattr(kernel_module, "_HIDDEN_TILE", 16)
    monkeypatch.setattr(kernel_module, "_VALUE_TILE", 16)
    xs, state = _case(2, H, T, D, depth, b, position)
    y, out = triton_memory_update(*xs, state, chunk_size=b, activation=activation, read=read)
    ref_state, _ = _cast_state(state, torch.float64, leaves=False)
    y_ref, ref = chunk_memory_update(
        *(x.double() for x in xs), ref_state, chunk_size=b, activation=activation, read=read
    )
    assert y.dtype == torch.float32 and out.position == ref.position == state.position + T
    assert_close("y", y_ref, y, TOL_FORWARD)
    for (name, r), (_, o) in zip(_state_tensors(ref), _state_tensors(out), strict=True):
        assert_close(f"final {name}", r, o, TOL_FORWARD)


def _gradients(fn, xs, state, dtype, b, seed=1):
    """Gradients of a random linear functional of y and of every final-state tensor, w.r.t. every input."""
    # Gates and state stay at least float32, as NeuralMemory passes them.
    wide = torch.promote_types(dtype, torch.float32)
    inputs = [x.detach().to(dtype if x.dim() == 4 else wide).requires_grad_() for x in xs]
    start, leaves = _cast_state(state, wide, leaves=True)
    y, out = fn(*inputs, start, chunk_size=b)
    g = torch.Generator().manual_seed(seed)
    loss = (y * torch.randn(y.shape, generator=g).to(y)).sum()
    final = [t for _, t in _state_tensors(out)]
    if out.position % b == 0:
        final = final[: 2 * len(out.weights)]  # the anchor is the weights tensor itself
    for t in final:
        loss = loss + (t * torch.randn(t.shape, generator=g).to(t)).sum()
    return torch.autograd.grad(loss, inputs + leaves, allow_unused=True)


@pytest.mark.parametrize(
    ("depth", "T", "b", "position"),
    [
        (1, 11, 4, 2),  # mid-chunk start and end: the anchor output carries a gradient
        (2, 13, 5, 3),
        (2, 16, 4, None),  # fresh memory, ends on a chunk border
    ],
)
def test_every_gradient_matches_torch_path(monkeypatch: pytest.MonkeyPatch, depth, T, b, position) -> None:
    # 8-token backward segments: several checkpoints and recomputed segments per call.
    monkeypatch.setattr(kernel_module, "_SEGMENT_TOKENS", 8)
    monkeypatch.setattr(kernel_module, "_HIDDEN_TILE", 16)
    xs, state = _case(2, 2, T, 16, depth, b, position)
    got = _gradients(triton_memory_update, xs, state, torch.float32, b)
    ref = _gradients(chunk_memory_update, xs, state, torch.float64, b)
    names = ["q", "k", "v", *GATES] + [name for name, _ in _state_tensors(state)]
    for name, r, o in zip(names, ref, got, strict=True):
        assert_close(f"d{name}", r, o, TOL_GRAD.get(name, TOL_GRAD["state"]))


def test_bfloat16_inputs_accumulate_in_float32() -> None:
    xs, state = _case(2, 2, 13, 16, 2, 4, 3)
    xs = [x.bfloat16() if x.dim() == 4 else x for x in xs]  # q, k, v in bf16; gates stay float32
    inputs = [x.detach().requires_grad_() for x in xs]
    y, out = triton_memory_update(*inputs, state, chunk_size=4)
    assert y.dtype == torch.bfloat16 and out.weights[0].dtype == torch.float32
    # Reference: the same bf16-rounded values, computed in float64. Only y's final rounding to bf16 differs.
    ref_state, _ = _cast_state(state, torch.float64, leaves=False)
    y_ref, ref = chunk_memory_update(*(x.double() for x in xs), ref_state, chunk_size=4)
    assert_close("y (bf16)", y_ref, y, 1e-2)
    for (name, r), (_, o) in zip(_state_tensors(ref), _state_tensors(out), strict=True):
        assert_close(f"final {name}", r, o, TOL_FORWARD)
    (dq,) = torch.autograd.grad(y.float().sum(), inputs[0])
    assert dq.dtype == torch.bfloat16 and torch.isfinite(dq).all()
    # bf16 autocast around the call must not lower the float32 coefficients or accumulation.
    with torch.autocast(xs[0].device.type, dtype=torch.bfloat16):
        y_autocast, _ = triton_memory_update(*xs, state, chunk_size=4)
    assert torch.equal(y_autocast, y.detach())


def test_two_calls_with_carried_state_equal_one_call() -> None:
    xs, state = _case(1, 2, 13, 16, 2, 4, None)
    y_full, full = triton_memory_update(*xs, state, chunk_size=4)
    y1, mid = triton_memory_update(*(x[:, :, :6] for x in xs), state, chunk_size=4)
    y2, end = triton_memory_update(*(x[:, :, 6:] for x in xs), mid, chunk_size=4)
    assert_close("y", y_full, torch.cat([y1, y2], dim=2), 1e-6)
    for (name, a), (_, b) in zip(_state_tensors(full), _state_tensors(end), strict=True):
        assert_close(f"final {name}", a, b, 1e-6)


def test_neural_memory_layer_gradients_match_with_triton_kernel() -> None:
    # Through the layer: M_0 is one [H, ...] parameter expanded over the batch, and anchor is weights.
    from titans_cli.memory import NeuralMemory

    torch.manual_seed(0)
    layers = {
        k: NeuralMemory(32, 2, depth=2, expansion=2, chunk_size=4, kernel=k) for k in ("torch", "triton")
    }
    layers["triton"].load_state_dict(layers["torch"].state_dict())
    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(1))
    grads = {}
    for kernel, layer in layers.items():
        out, state = layer(x)
        loss = out.square().mean() + sum(w.square().mean() for w in state.weights)
        names, params = zip(*layer.named_parameters(), strict=True)
        grads[kernel] = dict(zip(names, torch.autograd.grad(loss, params), strict=True))
    for name, ref in grads["torch"].items():
        assert_close(f"d{name}", ref, grads["triton"][name], 1e-5)  # both float32; measured ≤ 1e-6


def test_memory_update_selects_triton_by_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    xs, state = _case(1, 1, 5, 16, 2, 4, None)
    y_tri, _ = memory_update(*xs, state, chunk_size=4, kernel="triton")
    y_direct, _ = triton_memory_update(*xs, state, chunk_size=4)
    assert torch.equal(y_tri, y_direct)
    if not xs[0].is_cuda:  # auto never picks Triton for CPU tensors, even under the interpreter
        y_auto, _ = memory_update(*xs, state, chunk_size=4, kernel="auto")
        assert torch.equal(y_auto, chunk_memory_update(*xs, state, chunk_size=4)[0])
    xs3, state3 = _case(1, 1, 5, 16, 3, 4, None)
    with pytest.raises(UsageError, match="depth 1 or 2 .*use 'torch' or 'auto'"):
        memory_update(*xs3, state3, chunk_size=4, kernel="triton")
    assert torch.equal(
        memory_update(*xs3, state3, chunk_size=4, kernel="auto")[0],
        chunk_memory_update(*xs3, state3, chunk_size=4)[0],
    )
    with pytest.raises(UsageError, match="float64"):
        memory_update(*(x.double() for x in xs), state, chunk_size=4, kernel="triton")


def test_triton_on_cpu_without_interpreter_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    xs, state = _case(1, 1, 5, 16, 1, 4, None)
    monkeypatch.setattr(kernel_module, "INTERPRET", False)
    with pytest.raises(UsageError, match="needs CUDA tensors .*use 'torch' or 'auto'"):
        memory_update(*xs, state, chunk_size=4, kernel="triton")


def test_missing_triton_is_a_usage_error_and_auto_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    xs, state = _case(1, 1, 5, 16, 1, 4, None)
    # A None entry in sys.modules makes the lazy import raise ImportError, as without the extra installed.
    monkeypatch.setitem(sys.modules, "titans_cli.ops.memory_update.triton", None)
    monkeypatch.delattr(sys.modules["titans_cli.ops.memory_update"], "triton")
    with pytest.raises(UsageError, match="triton is not installed.*pip install"):
        memory_update(*xs, state, chunk_size=4, kernel="triton")
    y, _ = memory_update(*xs, state, chunk_size=4, kernel="auto")
    assert torch.equal(y, chunk_memory_update(*xs, state, chunk_size=4)[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("depth", "dtype"), [(1, torch.float32), (2, torch.float32), (2, torch.bfloat16)])
def test_real_size_matches_torch_path_on_gpu(depth: int, dtype: torch.dtype) -> None:
    xs, state = _case(2, 4, 1000, 64, depth, 64, None, hidden=256)
    xs = [x.cuda().to(dtype) if x.dim() == 4 else x.cuda() for x in xs]
    state, _ = _cast_state(state, torch.float32, leaves=False)
    state = MemoryState(
        *(tuple(t.cuda() for t in part) for part in (state.weights, state.surprise, state.anchor))
    )
    got = _gradients(triton_memory_update, xs, state, dtype, 64)
    ref = _gradients(chunk_memory_update, [x.float() for x in xs], state, torch.float64, 64)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    names = ["q", "k", "v", *GATES] + [name for name, _ in _state_tensors(state)]
    for name, r, o in zip(names, ref, got, strict=True):
        assert_close(f"d{name}", r, o, tol)
