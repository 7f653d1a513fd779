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
) -> tuple[Tensor, MemoryState]:
    """Write k→v into the memory and read it with q; see `chunk_memory_update` for shapes."""
    if kernel not in KERNELS:
        raise UsageError(f"model.kernel: expected one of {', '.join(KERNELS)}, got {kernel!r}")
    if kernel == "naive":
        fn = recurrent_memory_update
    elif kernel in ("torch", "auto"):
        fn = chunk_memory_update
    else:
        raise UsageError("kernel='triton' is not available in this build; use 'torch' or 'auto'")
    return fn(q, k, v, alpha, eta, theta, state, chunk_size=chunk_size, activation=activation, read=read)
