"""Typed run configuration: frozen dataclasses for the model, training and task sections.

`ModelConfig` field names follow the paper's symbols where it has one (spec §2-§5 and the style guide):
`chunk_size` is b, `segment_len` is C, `n_persistent` is N_p, `memory_depth` is L_M, `theta_max` bounds θ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Variant = Literal["lmm", "mac", "mag", "mal", "attn"]
Kernel = Literal["auto", "torch", "triton", "naive"]


@dataclass(frozen=True)
class ModelConfig:
    """The Titans backbone. Every proposed reading of an ambiguity (spec §10) is a field here."""

    variant: Variant = "lmm"  # lmm: memory only (§4.3); mac / mag / mal: Eqs. 21-31; attn: baseline
    dim: int = 128  # model width d
    n_layers: int = 2
    heads: int = 4  # memory heads and attention heads; head dim = dim / heads (A19)
    memory_depth: int = 2  # L_M: 1 = matrix memory, >= 2 = MLP memory (A4)
    memory_expansion: int = 4  # hidden width of the memory MLP = expansion * head dim (A4)
    memory_activation: Literal["silu", "gelu", "tanh"] = "silu"
    chunk_size: int = 16  # b: gradients are taken at chunk-start weights (Eqs. 16-18)
    read: Literal["inclusive", "strict"] = "inclusive"  # y_t = M_t(q_t) or M_{t-1}(q_t) (A6)
    theta_max: float = 0.1  # θ_t in (0, θ_max] (A1; spec §11 on stability)
    conv_kernel: int = 4  # causal depthwise conv after q/k/v projections (§2.1); 0 disables it
    window: int = 64  # sliding-window attention size (MAG, MAL, attn)
    segment_len: int = 64  # C: MAC segment length (Eqs. 21-25)
    n_persistent: int = 4  # N_p persistent memory tokens (Eq. 19)
    ffn_mult: int = 4  # hidden width of each block's MLP = ffn_mult * dim; 0 = no FFN sub-block
    dropout: float = 0.0
    kernel: Kernel = "torch"  # memory-update path: torch (chunked closed form), naive (per token), triton
