"""`MemoryState`: the explicit state of the neural long-term memory between calls (docs/design.md §2.7, A5, A15).

The memory is an MLP whose weights are the state. Besides the weights M and the momentum S ("surprise", Eq. 14)
a chunked update needs the *anchor*: the weights at the start of the current chunk, where every gradient of the
chunk is taken (Eqs. 16-18). Carrying it makes a call that stops in the middle of a chunk resumable exactly, so
feeding a sequence in pieces of any length equals one call.

Shape legend: B batch, H heads, D head dim; weights are per sample and head: `[B, H, d_in, d_out]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class MemoryState:
    """Memory weights, momentum and chunk anchor after `position` tokens.

    Attributes:
        weights: per layer `[B, H, d_in, d_out]`, M_t (Eq. 13).
        surprise: per layer, same shapes, S_t (Eq. 14).
        anchor: per layer, the weights at the start of the chunk containing the next token; gradients of that
            chunk are taken here (Eq. 16, t' = b·⌊(t−1)/b⌋). Equal to `weights` at a chunk boundary.
        position: number of tokens already written.
        conv: optional `[B, kernel-1, channels]` tail of the q/k/v projections for the causal short conv
            (used by `NeuralMemory`, not by the update op).
        keys: optional `[B, H, m, D]` keys already written in the current chunk (m = position mod b), for the
            key-overlap step scale of `NeuralMemory` (not used by the update op).
    """

    weights: tuple[Tensor, ...]
    surprise: tuple[Tensor, ...]
    anchor: tuple[Tensor, ...]
    position: int = 0
    conv: Tensor | None = None
    keys: Tensor | None = None

    def detach(self) -> MemoryState:
        """The same state cut from the autograd graph (for truncated back-propagation or inference)."""
        return MemoryState(
            weights=tuple(w.detach() for w in self.weights),
            surprise=tuple(s.detach() for s in self.surprise),
            anchor=tuple(a.detach() for a in self.anchor),
            position=self.position,
            conv=None if self.conv is None else self.conv.detach(),
            keys=None if self.keys is None else self.keys.detach(),
        )

    @staticmethod
    def initial(init_weights: tuple[Tensor, ...] | list[Tensor], batch: int) -> MemoryState:
        """Fresh per-sample state from learned initial weights M_0 (`[H, d_in, d_out]` each) and S_0 = 0."""
        weights = tuple(w.unsqueeze(0).expand(batch, *w.shape) for w in init_weights)
        surprise = tuple(torch.zeros_like(w) for w in weights)
        return MemoryState(weights=weights, surprise=surprise, anchor=weights, position=0)
