"""Memory-update op: the kernels and the selection between them, laid out per file as flash-linear-attention does.

    naive.py   naive_memory_update          kernel "naive": the per-token recurrence (the test oracle), and
               naive_chunk_memory_update    the chunked closed form under plain autograd (readable reference)
    chunk.py   torch_memory_update          kernel "torch": the chunked closed form, fused steps, hand-written backward
    triton.py  triton_memory_update         kernel "triton": the fused Triton kernel (needs triton and CUDA)

`memory_update(..., kernel=...)` runs `<kernel>_memory_update`, picked by argument, never by a global or an
environment variable; "auto" is triton on CUDA when it imports and supports the shapes, else torch. An unknown
kernel, or one that cannot run, raises `ConfigError`, a `ValueError` (the CLI prints it as its one-line usage error).

`norm` = (γ, β) selects the memory M(x) = x + LN_h(f(x)) (`model.memory_norm = "ln"`, mlp.py): "naive" computes it
per token, "torch" and "auto" on the fused chunked path (LayerNorm terms in its hand-written backward; the readable
reference is `naive_chunk_memory_update`), "triton" refuses it.
"""

from __future__ import annotations

from torch import Tensor

from titans_cli.backbone.config import KERNELS, ConfigError, Kernel
from titans_cli.backbone.ops.memory_update.chunk import torch_memory_update
from titans_cli.backbone.ops.memory_update.naive import naive_chunk_memory_update, naive_memory_update
from titans_cli.backbone.ops.memory_update.state import MemoryState

__all__ = [
    "KERNELS",
    "Kernel",
    "MemoryState",
    "memory_update",
    "naive_chunk_memory_update",
    "naive_memory_update",
    "torch_memory_update",
]


def memory_update(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    alpha: Tensor,
    eta: Tensor,
    theta: Tensor,
    state: MemoryState,
    *,
    chunk_size: int,
    activation: str = "silu",
    read: str = "inclusive",
    kernel: str = "torch",
    clip: float = 0.0,
    checkpoint_chunks: int = 0,
    norm: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, MemoryState]:
    """Write k→v into the memory and read it with q, with the kernel `kernel` names.

    Args:
        q, k, v: `[B, H, T, D]` (q and k unit-norm). alpha, eta, theta: `[B, H, T]` gates α_t, η_t, θ_t.
        state: the incoming `MemoryState` (`MemoryState.initial(init_weights, batch)` for fresh sequences).
        chunk_size: b; activation and read as in `NeuralMemory`; clip: the inner clamp c (0: off).
        kernel: "naive", "torch", "triton" or "auto" (module docstring).
        checkpoint_chunks: the torch kernel's activation checkpointing (the other kernels ignore it).
        norm: None, or (γ, β) `[H, D]` for M(x) = x + LN_h(f(x)) (module docstring).
    Returns:
        y `[B, H, T, D]` and the state after the last token; see `torch_memory_update` for the details.
    """
    if kernel not in KERNELS:
        raise ConfigError(f"model.kernel: expected one of {', '.join(KERNELS)}, got {kernel!r}")
    if norm is not None:
        if kernel == "triton":
            raise ConfigError("model.memory_norm='ln' has no Triton kernel; use model.kernel 'torch' or 'auto'")
        if kernel == "naive":
            return naive_memory_update(
                q, k, v, alpha, eta, theta, state, chunk_size=chunk_size, activation=activation, read=read, clip=clip,
                norm=norm,
            )  # fmt: skip
        return torch_memory_update(
            q, k, v, alpha, eta, theta, state, chunk_size=chunk_size, activation=activation, read=read, clip=clip,
            checkpoint_chunks=checkpoint_chunks, norm=norm,
        )  # fmt: skip
    if kernel == "naive":
        fn = naive_memory_update
    elif kernel == "torch" or (kernel == "auto" and not q.is_cuda):
        fn = torch_memory_update
    else:
        # --- Triton selection (triton.py): imported lazily, so the package runs without triton ---
        reason = _triton_unsupported(q, k, v, state, chunk_size, activation, read)
        if reason is None:
            from titans_cli.backbone.ops.memory_update.triton import triton_memory_update as fn
        elif kernel == "triton":
            raise ConfigError(f"kernel='triton' cannot run here: {reason}; use 'torch' or 'auto'")
        else:
            fn = torch_memory_update
        # --- end Triton selection ---
    extra = {"checkpoint_chunks": checkpoint_chunks} if fn is torch_memory_update else {}
    return fn(
        q, k, v, alpha, eta, theta, state, chunk_size=chunk_size, activation=activation, read=read, clip=clip, **extra
    )


# --- Triton selection helper ---
def _triton_unsupported(
    q: Tensor, k: Tensor, v: Tensor, state: MemoryState, chunk_size: int, activation: str, read: str
) -> str | None:
    """Why the Triton kernel cannot run these inputs (triton missing, no CUDA, shapes), or None when it can."""
    try:
        from titans_cli.backbone.ops.memory_update import triton as triton_kernel
    except ImportError as exc:
        return f"triton is not installed ({exc}); install the extra: pip install 'titans-cli[triton]'"
    return triton_kernel.unsupported_reason(q, k, v, state, chunk_size, activation, read)


# --- end Triton selection helper ---
