"""`ModelConfig`: the Titans backbone's settings, the `[model]` section of a run's config.toml.

Field names follow the paper's symbols where it has one (docs/design.md §2-§5 and docs/conventions.md): `chunk_size`
is b, `segment_len` is C, `n_persistent` is N_p, `memory_depth` is L_M, `theta_max` bounds θ. The engine reads and
writes it (titans_cli/engine/config.py); the backbone only reads it. A value out of range raises `ConfigError`, a
`ValueError` whose message names the field (`model.dim: must be >= 1, got 0`); the engine reports it as a usage error.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

Variant = Literal["lmm", "mac", "mag", "mal", "attn"]
# The one definition of the memory-update kernels (titans_cli/backbone/ops/memory_update/): "naive" runs
# naive_memory_update, "torch" torch_memory_update, "triton" triton_memory_update; "auto" picks triton or torch.
Kernel = Literal["auto", "torch", "triton", "naive"]
KERNELS: tuple[str, ...] = typing.get_args(Kernel)


MemoryNorm = Literal["none", "ln"]
MEMORY_NORMS: tuple[str, ...] = typing.get_args(MemoryNorm)


class ConfigError(ValueError):
    """A `[model]` value out of range, or one that cannot run here (`kernel="triton"` without CUDA); the message
    names the field or the kernel. The CLI prints it as a usage error (exit code 2)."""


def check_fields(
    section: str, obj: object, checks: list[tuple[str, bool, str]], error: type[Exception] = ConfigError
) -> None:
    """Raise `error` naming `section.field`, the rule and the value for the first failed (field, ok, rule)."""
    for name, ok, why in checks:
        if not ok:
            raise error(f"{section}.{name}: {why}, got {getattr(obj, name)!r}")


@dataclass(frozen=True)
class ModelConfig:
    """The Titans backbone. Every proposed reading of an ambiguity (docs/design.md §10) is a field here."""

    variant: Variant = "lmm"  # lmm: memory only (paper §4.3); mac / mag / mal: Eqs. 21-31; attn: baseline
    dim: int = 128  # model width d
    n_layers: int = 2
    heads: int = 4  # memory heads and attention heads; head dim = dim / heads (docs/design.md A19)
    memory_depth: int = 2  # L_M: 1 = matrix memory, >= 2 = MLP memory (docs/design.md A4)
    memory_expansion: int = 4  # hidden width of the memory MLP = expansion * head dim (docs/design.md A4)
    memory_activation: Literal["silu", "gelu", "tanh"] = "silu"
    chunk_size: int = 16  # b: gradients are taken at chunk-start weights (Eqs. 16-18)
    read: Literal["inclusive", "strict"] = "inclusive"  # y_t = M_t(q_t) or M_{t-1}(q_t) (docs/design.md A6)
    theta_max: float = 0.4  # θ_t in (0, θ_max] (docs/design.md A1, §11 on stability)
    eta_max: float = 0.9  # η_t in (0, η_max]: momentum always decays (docs/design.md §12)
    # θ_t at initialisation as a fraction of θ_max (the gate bias is logit(theta_init)); see NeuralMemory.__init__
    theta_init: float = 0.5
    # θ_t's scale (docs/design.md §12): "gram" θ_t (1 − η_t) / r_t with r_t the overlap of k_t with the earlier keys
    # of its chunk; "none" Eq. 14 as written
    step_scale: Literal["none", "gram"] = "gram"
    # Memory MLP output (docs/design.md §2.4, A4, §12): "none" M(x) = f(x); "ln" the TTT-style M(x) = x + LN_h(f(x)),
    # a residual and a LayerNorm with learned per-head scale and shift (outer parameters, not written by the inner loop)
    memory_norm: MemoryNorm = "none"
    inner_clip: float = 1.0  # > 0: clamp each inner error M(k) − v to [−c, c] (Huber; docs/design.md §11); 0: off
    checkpoint_chunks: int = 0  # > 0: keep every Nth chunk state for backward, recompute the rest (long sequences)
    memory_piece_len: int = 1024  # longer inputs run through each memory layer in pieces of this many tokens; 0: off
    conv_kernel: int = 4  # causal depthwise conv after q/k/v projections (docs/design.md §2.1); 0 disables it
    window: int = 64  # sliding-window attention size (MAG, MAL, attn)
    segment_len: int = 64  # C: MAC segment length (Eqs. 21-25)
    n_persistent: int = 4  # N_p persistent memory tokens (Eq. 19)
    # MAC/MAG ⊗ (Eqs. 25, 28; docs/design.md A10): False = the gate alone, o = W(y ⊙ σ(RMSNorm(M))); True = the
    # gate plus the memory output as its own residual branch, o = W(y ⊙ σ(RMSNorm(M))) + M. True by default: through
    # the gate alone the memory reaches the stream only via a sigmoid after a per-token norm, and MAC/MAG recall
    # stayed at chance with it (docs/results.md, Recall)
    memory_residual: bool = True
    # MAC Eq. 24 (docs/design.md A8): what the memory writes and reads: "attn" = the attention output y; "residual" =
    # RMSNorm(x + y), the residual stream after the attention sub-layer (keeps the token itself in the key)
    mac_write: Literal["attn", "residual"] = "residual"
    # MAC/MAG: initial scale of the weights that carry attention into the block: W of the gated branch
    # W(y ⊙ σ(·)) (both) and MAC's attention output projection (y, also written to the memory). 1 = PyTorch's
    # default init; 0 starts the block as its memory alone (with memory_residual and, for MAC,
    # mac_write=residual: o = M(RMSNorm(x̂)) as in LMM). The hybrids' recall otherwise sits on a chance plateau
    # that some seeds never leave; see train.memory_warmup, which holds these weights at 0 for a while
    attn_branch_init: float = 1.0
    ffn_mult: int = 4  # hidden width of each block's MLP = ffn_mult * dim; 0 = no FFN sub-block
    dropout: float = 0.0
    kernel: Kernel = "torch"  # memory-update path: torch (chunked closed form), naive (per token), triton

    def __post_init__(self) -> None:
        check_fields("model", self, [
            ("dim", self.dim >= 1, "must be >= 1"),
            ("n_layers", self.n_layers >= 1, "must be >= 1"),
            ("heads", self.heads >= 1 and self.dim % max(1, self.heads) == 0, f"must divide dim {self.dim}"),
            ("memory_depth", self.memory_depth >= 1, "must be >= 1"),
            ("memory_expansion", self.memory_expansion >= 1, "must be >= 1"),
            ("memory_norm", self.memory_norm in MEMORY_NORMS, f"expected one of {', '.join(map(repr, MEMORY_NORMS))}"),
            ("chunk_size", self.chunk_size >= 1, "must be >= 1"),
            ("theta_max", self.theta_max > 0, "must be > 0"),
            ("theta_init", 0 < self.theta_init < 1, "must be in (0, 1): θ_t starts at theta_init * theta_max"),
            ("eta_max", 0 < self.eta_max <= 1, "must be in (0, 1] (1: momentum may never decay, Eq. 14 as written)"),
            ("inner_clip", self.inner_clip >= 0, "must be >= 0 (0 disables the clamp)"),
            ("checkpoint_chunks", self.checkpoint_chunks >= 0, "must be >= 0 (0 disables checkpointing)"),
            ("memory_piece_len", self.memory_piece_len >= 0, "must be >= 0 (0 reads any length in one piece)"),
            ("conv_kernel", self.conv_kernel >= 0, "must be >= 0"),
            ("window", self.window >= 1, "must be >= 1"),
            ("segment_len", self.segment_len >= 1, "must be >= 1"),
            ("n_persistent", self.n_persistent >= 0, "must be >= 0"),
            ("ffn_mult", self.ffn_mult >= 0, "must be >= 0"),
            ("dropout", 0 <= self.dropout < 1, "must be in [0, 1)"),
            ("attn_branch_init", self.attn_branch_init >= 0, "must be >= 0 (0 starts the block as its memory alone)"),
        ])  # fmt: skip
        if self.variant == "mac" and self.attn_branch_init == 0 and not self.memory_residual:
            # With W and the attention output projection both zero, MAC's output W(y ⊙ σ(·)) is 0 and so are the
            # gradients of W (through y = 0), of the projection (through W = 0) and of the memory: a dead block.
            raise ConfigError(
                "model.attn_branch_init=0 with model.memory_residual=false makes every MAC block output zero with zero "
                "gradient (it can never learn); set model.memory_residual=true or model.attn_branch_init > 0"
            )
