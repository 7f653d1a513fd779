"""Memory-update op: the chunked torch path, the per-token reference, and the selection between them.

`memory_update(..., kernel=...)` picks the implementation by argument, never by a global or an environment
variable: "torch" (chunked closed form, chunk.py), "naive" (per-token reference, recurrent.py), "triton"
(fused kernel, when available), "auto" (triton on CUDA when it imports and supports the shapes, else torch).
"""

from __future__ import annotations

from torch import Tensor

from titans_cli.errors import UsageError
from titans_cli.ops.memory_update.chunk import chunk_memory_update
from titans_cli.ops.memory_update.recurrent import recurrent_memory_update
from titans_cli.ops.memory_update.state import MemoryState

__all__ = ["MemoryState", "chunk_memory_update", "memory_update", "recurrent_memory_update"]

KERNELS = ("auto", "torch", "triton", "naive")


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
) -> tuple[Tensor, MemoryState]:
    """Write k→v into the memory and read it with q; see `chunk_memory_update` for shapes, `clip` and
    `checkpoint_chunks` (the torch path's activation checkpointing; the other paths ignore it)."""
    if kernel not in KERNELS:
        raise UsageError(f"model.kernel: expected one of {', '.join(KERNELS)}, got {kernel!r}")
    if kernel == "naive":
        fn = recurrent_memory_update
    elif kernel == "torch" or (kernel == "auto" and not q.is_cuda):
        fn = chunk_memory_update
    else:
        # --- Triton selection (Engineer D, triton.py): imported lazily, the package runs without triton ---
        reason = _triton_unsupported(q, k, v, state, chunk_size, activation, read)
        if reason is None:
            from titans_cli.ops.memory_update.triton import triton_memory_update as fn
        elif kernel == "triton":
            raise UsageError(f"kernel='triton' cannot run here: {reason}; use 'torch' or 'auto'")
        else:
            fn = chunk_memory_update
        # --- end Triton selection ---
    extra = {"checkpoint_chunks": checkpoint_chunks} if fn is chunk_memory_update else {}
    return fn(
        q, k, v, alpha, eta, theta, state, chunk_size=chunk_size, activation=activation, read=read, clip=clip, **extra
    )


# --- Triton selection helper (Engineer D) ---
def _triton_unsupported(
    q: Tensor, k: Tensor, v: Tensor, state: MemoryState, chunk_size: int, activation: str, read: str
) -> str | None:
    """Why the Triton kernel cannot run these inputs (triton missing, no CUDA, shapes), or None when it can."""
    try:
        from titans_cli.ops.memory_update import triton as triton_kernel
    except ImportError as exc:
        return f"triton is not installed ({exc}); install the extra: pip install 'titans-cli[triton]'"
    return triton_kernel.unsupported_reason(q, k, v, state, chunk_size, activation, read)


# --- end Triton selection helper ---
