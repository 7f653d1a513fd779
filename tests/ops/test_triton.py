"""The Triton memory-update kernel (triton.py) against the torch closed form (chunk.py): outputs, final state and
every input gradient, with relative-RMS tolerances named per tensor.

Without CUDA the kernels run in Triton's CPU interpreter, which must be switched on before the kernel module is
imported (tests/conftest.py sets TRITON_INTERPRET=1 when no GPU is present). Every test runs with `nan_empty`: an
output buffer the kernel forgot to write reads as NaN. The interpreter costs a few
milliseconds per program and loop step, so shapes stay tiny; tuning constants are lowered per test to exercise
several hidden tiles, value tiles and backward segments. On a CUDA machine the same tests run compiled on the GPU
(`DEVICE`), and real sizes run there only (`gpu` marker).
"""

from __future__ import annotations

import sys
from functools import partial

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="the Triton kernel needs the `triton` extra: pip install -e '.[triton]'")

from triton.runtime.errors import OutOfResources  # noqa: E402

from tests.assertions import assert_close, rel_rms  # noqa: E402
from titans_cli.backbone.ops.memory_update import MemoryState, memory_update, torch_memory_update  # noqa: E402
from titans_cli.backbone.ops.memory_update import triton as kernel_module  # noqa: E402
from titans_cli.backbone.ops.memory_update.triton import triton_memory_update  # noqa: E402

GATES = ("alpha", "eta", "theta")
# Relative-RMS tolerances of the float32 kernels against the float64 torch path (measured: outputs and state
# ≤ 2.7e-7; gradients of the Triton backward ≤ 8.6e-7 except dη, ≤ 3.2e-6).
TOL_FORWARD = 2e-6
TOL_GRAD = {"q": 1e-5, "k": 1e-5, "v": 1e-5, "alpha": 5e-5, "eta": 5e-5, "theta": 5e-5, "state": 1e-5}
# 16-bit q, k, v: dq, dk, dv are rounded once to the input dtype (measured 1.6e-3 to 1.8e-3 bf16, 1.9e-4 to 2.0e-4
# fp16); the gate and state gradients stay float32 and keep TOL_GRAD (measured ≤ 2.9e-6, dη), since the interpreter
# runs tl.dot in float32 even where a GPU would use tf32.
TOL_QKV_16BIT = {torch.bfloat16: 4e-3, torch.float16: 5e-4}

needs_interpreter_or_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() or kernel_module.INTERPRET),
    reason="TRITON_INTERPRET was not set before triton.py was imported and there is no GPU",
)
pytestmark = [needs_interpreter_or_cuda, pytest.mark.usefixtures("nan_empty")]
# Where the kernels run: compiled on the GPU when there is one, else on CPU tensors in the interpreter.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# On a GPU, 16-bit q, k, v take tf32 tensor-core products (`_precision`), whose 10-bit mantissa (~5e-4 relative per
# product) also reaches the float32 state and gate gradients; the interpreter multiplies in float32.
TOL_TF32 = 5e-3 if DEVICE.type == "cuda" else None


def _case(
    B: int, H: int, T: int, D: int, depth: int, b: int, position: int | None, hidden: int = 32, seed: int = 0,
    device: torch.device | str = DEVICE,
) -> tuple[list[torch.Tensor], MemoryState]:
    """Seeded float32 inputs `[B, H, T, D]`, gates `[B, H, T]` and a state (fresh when position is None), drawn on
    the CPU (the same values on every machine) and moved to `device`."""
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
        anchor = weights if position % b == 0 else tuple(w + 0.1 * torch.randn(w.shape, generator=g) for w in weights)
        state = MemoryState(weights, surprise, anchor, position)
    move = partial(torch.Tensor.to, device=device)
    weights, surprise = tuple(map(move, state.weights)), tuple(map(move, state.surprise))
    anchor = weights if state.anchor is state.weights else tuple(map(move, state.anchor))
    state = MemoryState(weights, surprise, anchor, state.position)
    return [move(x) for x in (q, k, v, alpha, eta, theta)], state


def _state_tensors(state: MemoryState) -> list[tuple[str, torch.Tensor]]:
    named = []
    for part in ("weights", "surprise", "anchor"):
        named += [(f"{part}[{l}]", t) for l, t in enumerate(getattr(state, part))]
    return named


def _cast_state(state: MemoryState, dtype: torch.dtype, leaves: bool) -> tuple[MemoryState, list[torch.Tensor]]:
    """A copy of the state in `dtype`, every tensor a fresh leaf (requires grad when `leaves`)."""
    tensors = [t.detach().to(dtype).requires_grad_(leaves) for _, t in _state_tensors(state)]
    L = len(state.weights)
    parts = tuple(tensors[:L]), tuple(tensors[L : 2 * L]), tuple(tensors[2 * L :])
    return MemoryState(*parts, position=state.position), tensors


@pytest.mark.parametrize(
    ("depth", "H", "T", "D", "b", "position", "read", "activation", "clip"),
    [
        (1, 2, 11, 16, 4, None, "inclusive", "silu", 0.0),  # fresh memory, partial last chunk
        (1, 1, 21, 16, 16, 5, "strict", "silu", 0.0),  # starts mid-chunk with an anchor, strict read
        (1, 1, 13, 32, 6, 3, "inclusive", "silu", 0.3),  # two value-column tiles, Huber clamp
        (2, 1, 13, 16, 5, 3, "inclusive", "silu", 0.0),  # two hidden tiles, mid-chunk start
        (2, 2, 19, 16, 8, None, "strict", "silu", 0.3),
        (2, 1, 2, 16, 3, 1, "inclusive", "gelu", 0.0),  # T < b, inside one chunk that began in an earlier call
        (2, 1, 9, 16, 4, 8, "inclusive", "tanh", 0.0),  # incoming state on a chunk border
    ],
)
def test_forward_and_final_state_match_torch_path(
    monkeypatch: pytest.MonkeyPatch, depth, H, T, D, b, position, read, activation, clip
) -> None:
    monkeypatch.setattr(kernel_module, "_HIDDEN_TILE", 16)
    monkeypatch.setattr(kernel_module, "_VALUE_TILE", 16)
    xs, state = _case(2, H, T, D, depth, b, position)
    y, out = triton_memory_update(*xs, state, chunk_size=b, activation=activation, read=read, clip=clip)
    ref_state, _ = _cast_state(state, torch.float64, leaves=False)
    y_ref, ref = torch_memory_update(
        *(x.double() for x in xs), ref_state, chunk_size=b, activation=activation, read=read, clip=clip
    )
    assert y.dtype == torch.float32 and out.position == ref.position == state.position + T
    assert_close("y", y_ref, y, TOL_FORWARD)
    for (name, r), (_, o) in zip(_state_tensors(ref), _state_tensors(out), strict=True):
        assert_close(f"final {name}", r, o, TOL_FORWARD)


def _gradients(fn, xs, state, dtype, b, seed=1, y_weights_dtype=torch.float64):
    """Gradients of a random linear functional of y and of every final-state tensor, w.r.t. every input.

    The functional's weights on y are rounded to `y_weights_dtype`: a 16-bit y receives its gradient in 16 bits,
    so a reference that should see the same functional rounds them alike.
    """
    # Gates and state stay at least float32, as NeuralMemory passes them.
    wide = torch.promote_types(dtype, torch.float32)
    inputs = [x.detach().to(dtype if x.dim() == 4 else wide).requires_grad_() for x in xs]
    start, leaves = _cast_state(state, wide, leaves=True)
    y, out = fn(*inputs, start, chunk_size=b)
    g = torch.Generator().manual_seed(seed)
    loss = (y * torch.randn(y.shape, generator=g).to(y_weights_dtype).to(y)).sum()
    final = [t for _, t in _state_tensors(out)]
    if out.position % b == 0:
        final = final[: 2 * len(out.weights)]  # the anchor is the weights tensor itself
    for t in final:
        loss = loss + (t * torch.randn(t.shape, generator=g).to(t)).sum()
    return torch.autograd.grad(loss, inputs + leaves, allow_unused=True)


def _grad_names(state: MemoryState) -> list[str]:
    return ["q", "k", "v", *GATES] + [name for name, _ in _state_tensors(state)]


@pytest.mark.parametrize(
    ("depth", "H", "T", "D", "b", "position", "read", "activation", "clip"),
    [
        (1, 2, 11, 16, 4, 2, "inclusive", "silu", 0.0),  # mid-chunk start and end: the anchor output has a gradient
        (1, 1, 21, 16, 16, 5, "strict", "silu", 0.0),  # one chunk per backward segment
        (1, 1, 13, 32, 6, 3, "inclusive", "silu", 0.0),  # two value-column tiles (dq, dk summed over tiles)
        (1, 2, 16, 16, 4, None, "strict", "silu", 0.0),  # fresh memory, ends on a chunk border
        (1, 1, 2, 16, 5, 1, "strict", "silu", 0.0),  # T < b: the only chunk has the incoming and outgoing anchor
        (1, 1, 9, 32, 3, 6, "inclusive", "silu", 0.3),  # incoming state on a border, Huber clamp, value tiles
        (2, 2, 13, 16, 5, 3, "inclusive", "silu", 0.0),  # two hidden tiles, mid-chunk start
        (2, 2, 16, 16, 4, None, "strict", "silu", 0.0),
        (2, 1, 2, 16, 3, 1, "inclusive", "gelu", 0.0),  # T < b, inside one chunk that began in an earlier call
        (2, 1, 9, 16, 4, 8, "strict", "tanh", 0.0),  # incoming state on a chunk border
        (2, 1, 19, 16, 8, 6, "strict", "gelu", 0.0),  # three hidden tiles (hidden 48)
        (2, 1, 14, 16, 3, 2, "inclusive", "tanh", 0.0),  # segments of 4 chunks, the last one partial
        (2, 1, 13, 16, 5, 3, "inclusive", "silu", 0.3),  # Huber clamp: gradients pass only where |δ| ≤ c
    ],
)
def test_every_gradient_matches_torch_path(
    monkeypatch: pytest.MonkeyPatch, depth, H, T, D, b, position, read, activation, clip
) -> None:
    # 12-token backward segments: several checkpoints per call, 1 to 4 chunks per segment.
    monkeypatch.setattr(kernel_module, "_SEGMENT_TOKENS", 12)
    monkeypatch.setattr(kernel_module, "_HIDDEN_TILE", 16)
    monkeypatch.setattr(kernel_module, "_VALUE_TILE", 16)
    xs, state = _case(2, H, T, D, depth, b, position, hidden=48 if b == 8 else 32)
    kw = dict(activation=activation, read=read, clip=clip)
    ref = _gradients(partial(torch_memory_update, **kw), xs, state, torch.float64, b)
    for backward in ("triton", "torch"):  # the Triton backward kernels and the torch-recompute reference
        got = _gradients(partial(triton_memory_update, backward=backward, **kw), xs, state, torch.float32, b)
        for name, r, o in zip(_grad_names(state), ref, got, strict=True):
            assert_close(f"d{name} ({backward} backward)", r, o, TOL_GRAD.get(name, TOL_GRAD["state"]))


def test_clip_binds_in_the_gradient_cases() -> None:
    # The clamp cases above must exercise the clamp: with c = 0.3 the gradients differ from the unclamped ones.
    xs, state = _case(2, 1, 13, 16, 2, 5, 3)
    with_clip = _gradients(partial(triton_memory_update, clip=0.3), xs, state, torch.float32, 5)
    without = _gradients(triton_memory_update, xs, state, torch.float32, 5)
    assert rel_rms(without[1], with_clip[1]) > 0.1 and rel_rms(without[2], with_clip[2]) > 0.1


@pytest.mark.parametrize(("depth", "dtype"), [(1, torch.bfloat16), (2, torch.bfloat16), (2, torch.float16)])
def test_16bit_input_gradients_match_torch_path(monkeypatch: pytest.MonkeyPatch, depth, dtype) -> None:
    monkeypatch.setattr(kernel_module, "_SEGMENT_TOKENS", 8)
    monkeypatch.setattr(kernel_module, "_HIDDEN_TILE", 16)
    xs, state = _case(2, 2, 13, 16, depth, 4, 3)
    xs = [x.to(dtype).float() if x.dim() == 4 else x for x in xs]  # the reference sees the same rounded values
    got = _gradients(triton_memory_update, xs, state, dtype, 4)
    ref = _gradients(torch_memory_update, xs, state, torch.float64, 4, y_weights_dtype=dtype)
    for name, r, o in zip(_grad_names(state), ref, got, strict=True):
        # dq, dk, dv come back in the 16-bit dtype (one rounding, ~2^-9 relative for bf16); gates and state
        # gradients stay float32.
        assert o.dtype == (dtype if name in ("q", "k", "v") else torch.float32)
        if name in ("q", "k", "v"):
            tol = max(TOL_QKV_16BIT[dtype], TOL_TF32 or 0.0)
        else:
            tol = TOL_TF32 or TOL_GRAD.get(name, TOL_GRAD["state"])
        assert_close(f"d{name} ({dtype})", r, o, tol)


class _SharedMemoryLimit:
    """Stands in for a kernel on a GPU whose shared memory fits only tiles ≤ `fits`: a larger tile raises
    `OutOfResources` at launch, as Triton does when it loads such a kernel (before anything runs)."""

    def __init__(self, kernel, tile_name: str, fits: int) -> None:
        self.kernel, self.tile_name, self.fits, self.tried = kernel, tile_name, fits, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            tile = kwargs[self.tile_name]
            self.tried.append(tile)
            if tile > self.fits:
                raise OutOfResources(tile * 4096, self.fits * 4096, "shared memory")
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize(("depth", "tile_name"), [(1, "BV"), (2, "BF")])
def test_tiles_shrink_until_the_kernel_fits_shared_memory(monkeypatch: pytest.MonkeyPatch, depth, tile_name) -> None:
    # D = 64 (depth 1) and hidden 64 (depth 2): the kernels first try 64-wide tiles.
    xs, state = _case(1, 1, 9, 64 if depth == 1 else 16, depth, 4, 2, hidden=64)
    ref = _gradients(triton_memory_update, xs, state, torch.float32, 4)
    names = [f"_d{depth}_fwd_kernel", f"_d{depth}_bwd_kernel"]
    limited = [_SharedMemoryLimit(getattr(kernel_module, name), tile_name, fits=16) for name in names]
    for name, fake in zip(names, limited, strict=True):
        monkeypatch.setattr(kernel_module, name, fake)
    got = _gradients(triton_memory_update, xs, state, torch.float32, 4)
    assert [fake.tried for fake in limited] == [[64, 32, 16], [64, 32, 16]]
    for name, r, o in zip(_grad_names(state), ref, got, strict=True):
        assert_close(f"d{name} (16-wide tiles)", r, o, 4e-6)  # summation order only; measured ≤ 1e-6 in the interpreter


def test_bfloat16_inputs_accumulate_in_float32() -> None:
    xs, state = _case(2, 2, 13, 16, 2, 4, 3)
    xs = [x.bfloat16() if x.dim() == 4 else x for x in xs]  # q, k, v in bf16; gates stay float32
    inputs = [x.detach().requires_grad_() for x in xs]
    y, out = triton_memory_update(*inputs, state, chunk_size=4)
    assert y.dtype == torch.bfloat16 and out.weights[0].dtype == torch.float32
    # Reference: the same bf16-rounded values, computed in float64. Only y's final rounding to bf16 differs.
    ref_state, _ = _cast_state(state, torch.float64, leaves=False)
    y_ref, ref = torch_memory_update(*(x.double() for x in xs), ref_state, chunk_size=4)
    assert_close("y (bf16)", y_ref, y, 1e-2)
    for (name, r), (_, o) in zip(_state_tensors(ref), _state_tensors(out), strict=True):
        assert_close(f"final {name}", r, o, TOL_TF32 or TOL_FORWARD)
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
    from titans_cli.backbone.memory import NeuralMemory

    torch.manual_seed(0)
    layers = {
        k: NeuralMemory(32, 2, depth=2, expansion=2, chunk_size=4, kernel=k).to(DEVICE) for k in ("torch", "triton")
    }
    layers["triton"].load_state_dict(layers["torch"].state_dict())
    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(1)).to(DEVICE)
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
    y_auto, _ = memory_update(*xs, state, chunk_size=4, kernel="auto")
    if xs[0].is_cuda:  # auto picks Triton for CUDA tensors it supports
        assert torch.equal(y_auto, y_direct)
    else:  # and never for CPU tensors, even under the interpreter
        assert torch.equal(y_auto, torch_memory_update(*xs, state, chunk_size=4)[0])
    xs3, state3 = _case(1, 1, 5, 16, 3, 4, None)
    with pytest.raises(ValueError, match="depth 1 or 2 .*use 'torch' or 'auto'"):
        memory_update(*xs3, state3, chunk_size=4, kernel="triton")
    assert torch.equal(
        memory_update(*xs3, state3, chunk_size=4, kernel="auto")[0],
        torch_memory_update(*xs3, state3, chunk_size=4)[0],
    )
    with pytest.raises(ValueError, match="float64"):
        memory_update(*(x.double() for x in xs), state, chunk_size=4, kernel="triton")
    # Mixed dtypes would silently pick the float32 kernels for 16-bit values (q's dtype sets the precision).
    mixed = [xs[0], xs[1], xs[2].bfloat16(), *xs[3:]]
    with pytest.raises(ValueError, match="share one dtype .*float32, torch.float32, torch.bfloat16"):
        memory_update(*mixed, state, chunk_size=4, kernel="triton")


def test_triton_refuses_memory_norm_ln_and_auto_runs_it_on_the_torch_path() -> None:
    """M(x) = x + LN_h(f(x)) (model.memory_norm = "ln") has no Triton kernel: the kernel and kernel="triton" refuse it
    in one line naming the option and the kernels to use; "auto" runs it on the torch path, also on a GPU."""
    xs, state = _case(1, 1, 5, 16, 2, 4, None)
    norm = (torch.ones(1, 16, device=DEVICE), torch.zeros(1, 16, device=DEVICE))
    with pytest.raises(
        ValueError, match=r"^triton_memory_update cannot run model\.memory_norm='ln'; use kernel 'torch'"
    ):
        triton_memory_update(*xs, state, chunk_size=4, norm=norm)
    with pytest.raises(
        ValueError, match=r"^model\.memory_norm='ln' has no Triton kernel; use model\.kernel 'torch' or"
    ):
        memory_update(*xs, state, chunk_size=4, kernel="triton", norm=norm)
    y_auto, _ = memory_update(*xs, state, chunk_size=4, kernel="auto", norm=norm)
    assert torch.equal(y_auto, torch_memory_update(*xs, state, chunk_size=4, norm=norm)[0])


def test_triton_on_cpu_without_interpreter_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    xs, state = _case(1, 1, 5, 16, 1, 4, None, device="cpu")
    monkeypatch.setattr(kernel_module, "INTERPRET", False)
    with pytest.raises(ValueError, match="needs CUDA tensors .*use 'torch' or 'auto'"):
        memory_update(*xs, state, chunk_size=4, kernel="triton")


def test_missing_triton_is_a_usage_error_and_auto_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    xs, state = _case(1, 1, 5, 16, 1, 4, None)
    # A None entry in sys.modules makes the lazy import raise ImportError, as without the extra installed.
    monkeypatch.setitem(sys.modules, "titans_cli.backbone.ops.memory_update.triton", None)
    monkeypatch.delattr(sys.modules["titans_cli.backbone.ops.memory_update"], "triton")
    with pytest.raises(ValueError, match="triton is not installed.*pip install"):
        memory_update(*xs, state, chunk_size=4, kernel="triton")
    y, _ = memory_update(*xs, state, chunk_size=4, kernel="auto")
    assert torch.equal(y, torch_memory_update(*xs, state, chunk_size=4)[0])


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("depth", "dtype", "position", "read", "clip"),
    [
        (1, torch.float32, None, "inclusive", 0.0),
        (2, torch.float32, None, "inclusive", 0.0),
        (2, torch.bfloat16, None, "inclusive", 0.0),  # the benchmark's configuration
        (1, torch.bfloat16, 37, "strict", 0.5),  # mid-chunk incoming state, strict read, Huber clamp
        (2, torch.float32, 37, "strict", 0.5),
    ],
)
def test_real_size_matches_torch_path_on_gpu(depth: int, dtype: torch.dtype, position, read, clip) -> None:
    # Head dim 64, hidden 256, chunk 64, 1,000 tokens (a partial last chunk, two backward segments).
    xs, state = _case(2, 4, 1000, 64, depth, 64, position, hidden=256)
    xs = [x.to(dtype) if x.dim() == 4 else x for x in xs]
    kw = dict(read=read, clip=clip)
    # Measured on an H200 (Triton 3.6): float32 ≤ 4.6e-6; bf16 (tf32 products on the float32 state) up to 1.9e-2,
    # in the final weights of the depth-2 memory after 1,000 tokens, and ≤ 9.6e-3 elsewhere.
    tol = 1e-4 if dtype == torch.float32 else 4e-2
    y, out = triton_memory_update(*xs, state, chunk_size=64, **kw)
    ref_state, _ = _cast_state(state, torch.float64, leaves=False)
    y_ref, ref_out = torch_memory_update(*(x.double() for x in xs), ref_state, chunk_size=64, **kw)
    assert_close("y", y_ref, y, tol)
    for (name, r), (_, o) in zip(_state_tensors(ref_out), _state_tensors(out), strict=True):
        assert_close(f"final {name}", r, o, tol)
    got = _gradients(partial(triton_memory_update, **kw), xs, state, dtype, 64)
    ref = _gradients(
        partial(torch_memory_update, **kw), [x.float() for x in xs], state, torch.float64, 64, y_weights_dtype=dtype
    )
    for name, r, o in zip(_grad_names(state), ref, got, strict=True):
        assert_close(f"d{name}", r, o, tol)


def test_memory_update_selects_triton_with_the_inner_clip():
    """`memory_update(kernel="triton", clip=c)` runs the kernels with the Huber clamp (no silent fallback): same reads
    as the torch path, and different from the unclamped reads on inputs where the clamp bites."""
    g = torch.Generator().manual_seed(11)
    B, H, T, D = 1, 2, 11, 16
    q, k = (F.normalize(torch.randn(B, H, T, D, generator=g), dim=-1).to(DEVICE) for _ in range(2))
    v = torch.randn(B, H, T, D, generator=g).to(DEVICE)
    alpha, eta, theta = (s * torch.rand(B, H, T, generator=g).to(DEVICE) for s in (0.1, 1.0, 1.0))
    state = MemoryState.initial([torch.randn(H, D, D, generator=g).to(DEVICE) / 4], B)
    run = partial(memory_update, q, k, v, alpha, eta, theta, state, chunk_size=4)
    clipped = run(kernel="triton", clip=0.3)[0]
    assert rel_rms(clipped, run(kernel="torch", clip=0.3)[0]) < 2e-6
    assert rel_rms(clipped, run(kernel="torch")[0]) > 1e-2
