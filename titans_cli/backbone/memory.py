"""`NeuralMemory`: the neural long-term memory layer (LMM, docs/design.md §2), around the memory-update op.

Glossary (paper symbols): M memory weights (an MLP per head, depth L_M), S surprise/momentum (Eq. 14), `alpha`
forget gate α_t (Eq. 13), `eta` momentum decay η_t (Eq. 14), `theta` inner learning rate θ_t (Eq. 14).

    q, k, v = l2norm(SiLU(conv(x W_Q))), l2norm(SiLU(conv(x W_K))), SiLU(conv(x W_V))   (docs/design.md §2.1, A18)
    α_t = sigmoid(x_t w_α + b_α);  η_t = η_max · sigmoid(x_t w_η + b_η)                  (docs/design.md A1, per token)
    θ_t = θ_max · sigmoid(x_t w_θ + b_θ) · (1 − η_t) / r_t                                 (docs/design.md §12)
    y_t = M_t(q_t) after writing k_t → v_t                                                (Eqs. 12-15)
    M(x) = f(x), the MLP, or with memory_norm "ln" x + LN_h(f(x))                         (docs/design.md §2.4, A4)
    o_t = W_O(RMSNorm(y_t) ⊙ SiLU(x_t W_G))                                               (docs/design.md §2.6, A17)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from titans_cli.backbone.config import MEMORY_NORMS, ConfigError, ModelConfig
from titans_cli.backbone.ops.memory_update import MemoryState, memory_update
from titans_cli.backbone.ops.memory_update.mlp import mlp_forward


class CausalDepthwiseConv(nn.Module):
    """Depthwise 1-D convolution over time with left padding; carries its last `kernel-1` inputs for streaming."""

    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv1d(channels, channels, kernel, groups=channels) if kernel > 1 else None

    def forward(self, x: Tensor, tail: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """x `[B, T, C]`, tail `[B, kernel-1, C]` or None (zeros) → (y `[B, T, C]`, new tail)."""
        if self.conv is None:
            return x, None
        if tail is None:
            tail = x.new_zeros(x.shape[0], self.kernel - 1, x.shape[2])
        full = torch.cat([tail, x], dim=1)
        # y_t = b + Σ_j w_j ⊙ x_{t−K+1+j}: the depthwise conv as K shifted multiply-adds in the [B, T, C] layout.
        # Same parameters and result as self.conv on the transposed input (tested against F.conv1d), without the two
        # transposed copies, and torch's CPU depthwise-conv backward, which took 7% of a layer step (docs/results.md).
        T, w = x.shape[1], self.conv.weight[:, 0, :]  # w [C, K]
        y = torch.addcmul(self.conv.bias, full[:, :T], w[:, 0])
        for j in range(1, self.kernel):
            y = torch.addcmul(y, full[:, j : j + T], w[:, j])
        return y.to(x.dtype), full[:, full.shape[1] - (self.kernel - 1) :]


def key_overlap(k: Tensor, carried: Tensor | None, position: int, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Causal key overlap of every token with the earlier tokens of its chunk, r_j = Σ_{i ≤ j} |k_i·k_j|.

    The chunked update takes all gradients of a chunk at its start, so b tokens with one key add up to one step b
    times as large, which overshoots; dividing θ_j by r_j lets coinciding keys share one step while distinct keys
    (r_j ≈ 1) keep theirs (docs/design.md §12). Only earlier keys of the chunk enter, so no output depends on a
    later token.

    Args:
        k: `[B, H, T, D]` unit keys of this call.
        carried: the keys already written in the current chunk (`MemoryState.keys`), or None at a chunk border.
        position: tokens written before this call; chunks start at multiples of `chunk_size`.
    Returns:
        r `[B, H, T]` (≥ 1, float32 or wider) and the keys of the last, unfinished chunk to carry.
    """
    T, b = k.shape[2], chunk_size
    offset = position % b
    kk = k.to(torch.promote_types(k.dtype, torch.float32))
    if offset and carried is not None:
        kk = torch.cat([carried.to(kk.dtype), kk], dim=2)
    n = kk.shape[2]
    chunks = F.pad(kk, (0, 0, 0, (-n) % b)).unflatten(2, (-1, b))  # [B, H, n_chunks, b, D]; zero keys add 0
    overlap = (chunks @ chunks.transpose(-1, -2)).abs().tril().sum(-1).flatten(2)
    start = n - T
    end = (position + T) % b
    return overlap[:, :, start : start + T].clamp(min=1.0), kk[:, :, n - end :].to(k.dtype)


@dataclass(frozen=True)
class MemorySettings:
    """What a `NeuralMemory` layer does besides its width: the memory-related `[model]` fields, built once from a
    `ModelConfig` (`from_config`) and passed down whole. The defaults are `ModelConfig`'s.

    Fields (the `[model]` name in brackets where it differs):
        depth [memory_depth]: L_M, layers of each memory MLP (1 = matrix memory).
        expansion [memory_expansion]: hidden width of the memory MLP as a multiple of the head dim.
        activation [memory_activation]: hidden activation of the memory MLP (silu, gelu, tanh).
        chunk_size: b, gradient-point refresh interval of the chunked update.
        theta_max: upper bound of θ_t: with the default step scale, the most that one write moves M(k) towards v.
        theta_init: θ_t at initialisation as a fraction of theta_max.
        eta_max: upper bound of η_t (< 1, so that momentum always decays).
        step_scale: "gram" (default) multiplies θ_t by (1 − η_t) / r_t, r_t the overlap of k_t with the earlier keys
            of its chunk (`key_overlap`): momentum then averages the gradients instead of summing them, and keys that
            coincide within a chunk share one step instead of adding b steps at the chunk-start weights, so no gate
            value makes the update overshoot (docs/design.md §12); "none" is Eq. 14 as written.
        conv_kernel: short causal depthwise conv after the q/k/v projections (0 or 1 disables it).
        read: "inclusive" (M_t(q_t)) or "strict" (M_{t-1}(q_t)).
        kernel: memory-update path, see `titans_cli.backbone.ops.memory_update.memory_update`.
        inner_clip: c > 0 clamps each token's inner error M(k) − v to [−c, c] (Huber inner loss, docs/design.md §11): a
            bound on every write that keeps the chunked update finite when a chunk's keys coincide; 0 disables it.
        norm [memory_norm]: "none" (M = f, the MLP) or "ln": M(x) = x + LN_h(f(x)), the TTT-style residual and
            LayerNorm with a learned per-head scale γ_h and shift β_h; the inner loss (Eq. 12) and the read (Eq. 15)
            use M, the inner loop writes only f's weights (docs/design.md §2.4, §12).
        checkpoint_chunks: G > 0 recomputes the memory update in backward from every G-th chunk state instead of
            keeping all its activations (torch path): flat training memory in the length, ~1/3 more compute.
        piece_len [memory_piece_len]: inputs longer than this run through the layer in pieces of this many tokens,
            carried by the state (same result); 0 runs any length in one piece.
    """

    depth: int = ModelConfig.memory_depth
    expansion: int = ModelConfig.memory_expansion
    activation: str = ModelConfig.memory_activation
    chunk_size: int = ModelConfig.chunk_size
    theta_max: float = ModelConfig.theta_max
    theta_init: float = ModelConfig.theta_init
    eta_max: float = ModelConfig.eta_max
    step_scale: str = ModelConfig.step_scale
    conv_kernel: int = ModelConfig.conv_kernel
    read: str = ModelConfig.read
    kernel: str = ModelConfig.kernel
    inner_clip: float = ModelConfig.inner_clip
    norm: str = ModelConfig.memory_norm
    checkpoint_chunks: int = ModelConfig.checkpoint_chunks
    piece_len: int = ModelConfig.memory_piece_len

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> MemorySettings:
        """The memory fields of a `[model]` config."""
        renamed = {"depth": "memory_depth", "expansion": "memory_expansion", "activation": "memory_activation",
                   "piece_len": "memory_piece_len", "norm": "memory_norm"}  # fmt: skip
        return cls(**{f.name: getattr(cfg, renamed.get(f.name, f.name)) for f in dataclasses.fields(cls)})


class NeuralMemory(nn.Module):
    """Multi-head neural long-term memory: `o, state = memory(x, state)` with x `[B, T, dim]`.

    Example:
        >>> memory = NeuralMemory(dim=64, heads=4, chunk_size=16)
        >>> o, state = memory(torch.randn(2, 100, 64))          # o [2, 100, 64]
        >>> o2, state = memory(torch.randn(2, 20, 64), state)   # continues the same sequences

    Args:
        dim: model width; split into `heads` independent memories of head dim `dim // heads` (docs/design.md A19).
        heads: number of memory heads.
        settings: the rest, a `MemorySettings` (from a `ModelConfig`: `NeuralMemory.from_config(cfg)`); None: the
            defaults.
        **overrides: any `MemorySettings` field by name (`depth=1`, `chunk_size=4`, `kernel="naive"`, ...), applied
            over `settings`.
    """

    def __init__(self, dim: int, heads: int, settings: MemorySettings | None = None, **overrides: Any) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.settings = s = dataclasses.replace(settings or MemorySettings(), **overrides)
        if s.norm not in MEMORY_NORMS:
            allowed = ", ".join(map(repr, MEMORY_NORMS))
            raise ConfigError(f"model.memory_norm: expected one of {allowed}, got {s.norm!r}")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        depth, expansion = s.depth, s.expansion
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.conv = CausalDepthwiseConv(3 * dim, s.conv_kernel)
        self.gates = nn.Linear(dim, 3 * heads)
        with torch.no_grad():
            # Initial gates: α ≈ 0.0025 (half-life ~280 tokens, so long-range recall is learnable from the start),
            # η ≈ 0.5·η_max, θ ≈ theta_init·θ_max. The bounds of docs/design.md §12 (clamp, η_max, key-overlap step
            # scale) keep the update stable for any gate value, so the first writes can be strong: with θ ≈ 0.12·θ_max
            # a stored pair is read back too faintly to carry a gradient, and recall sat at chance for hundreds of
            # steps on 2 of 3 seeds (docs/stability.md, "Initial write strength").
            self.gates.weight.mul_(0.1)
            theta_bias = math.log(s.theta_init / (1 - s.theta_init))
            self.gates.bias.copy_(torch.tensor([-6.0] * heads + [0.0] * heads + [theta_bias] * heads))
        d = self.head_dim
        dims = [d] + [expansion * d] * (depth - 1) + [d]
        # Learned initial memory M_0 (docs/design.md A5), real [H, ...] parameters (not expanded views:
        # titans-pytorch#64).
        self.init_weights = nn.ParameterList(
            nn.Parameter(torch.randn(heads, dims[i], dims[i + 1]) / math.sqrt(dims[i])) for i in range(depth)
        )
        if s.norm == "ln":
            # γ_h, β_h of M(x) = x + LN_h(f(x)) (TTT's ttt_norm_weight/bias): outer parameters, initialised to the
            # plain LayerNorm. Stored flat `[H·D]` (viewed `[H, D]` in `_norm`) so that the trainer's AdamW groups
            # treat them as norm scales, without weight decay (engine/train.py `param_groups`: dim < 2).
            self.norm_weight = nn.Parameter(torch.ones(heads * d))
            self.norm_bias = nn.Parameter(torch.zeros(heads * d))
        self.out_norm = nn.RMSNorm(d)
        self.gate_proj = nn.Linear(dim, dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> NeuralMemory:
        """The memory layer of a `[model]` config: width `cfg.dim`, `cfg.heads` heads, `MemorySettings.from_config`."""
        return cls(cfg.dim, cfg.heads, MemorySettings.from_config(cfg))

    def initial_state(self, batch: int) -> MemoryState:
        """M_0 per sample (reset per sequence, docs/design.md §2.7) and S_0 = 0."""
        return MemoryState.initial(tuple(self.init_weights), batch)

    def _norm(self) -> tuple[Tensor, Tensor] | None:
        """(γ, β) `[H, D]` of the memory's LayerNorm, or None without one (`memory_norm = "none"`)."""
        if self.settings.norm != "ln":
            return None
        return self.norm_weight.view(self.heads, self.head_dim), self.norm_bias.view(self.heads, self.head_dim)

    def _split_heads(self, t: Tensor) -> Tensor:
        B, T, _ = t.shape
        return t.view(B, T, self.heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]

    def _project(self, x: Tensor, tail: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        qkv, tail = self.conv(self.qkv(x), tail)
        q, k, v = F.silu(qkv).chunk(3, dim=-1)
        # CUDA autocast runs F.normalize's norm in float32, and the division then promotes q and k to float32 while
        # v stays bf16; one dtype for all three keeps every path at the same precision (and, on a GPU, the Triton
        # kernel on its 16-bit variant: with float32 q it compiled and ran the float32 one).
        q = F.normalize(self._split_heads(q), dim=-1).to(v.dtype)
        k = F.normalize(self._split_heads(k), dim=-1).to(v.dtype)
        return q, k, self._split_heads(v), tail

    def _output(self, y: Tensor, x: Tensor) -> Tensor:
        B, H, T, D = y.shape
        y = self.out_norm(y.transpose(1, 2)).reshape(B, T, H * D)
        return self.out_proj(y * F.silu(self.gate_proj(x)))

    def forward(self, x: Tensor, state: MemoryState | None = None) -> tuple[Tensor, MemoryState]:
        """Write the sequence into the memory and read it token by token.

        Args:
            x: `[B, T, dim]`.
            state: the state after an earlier piece of the same sequences, or None for a fresh memory.
        Returns:
            o `[B, T, dim]` and the state after the last token (pass it back in to continue the sequences).
        """
        if state is None:
            state = self.initial_state(x.shape[0])
        piece_len = self.settings.piece_len
        if 0 < piece_len < x.shape[1]:
            # A long input goes through the layer in pieces carried by the state (streaming equals one call): every
            # buffer stays piece-sized instead of GB-sized at 16k tokens, measured faster there (README,
            # Performance), and no result changes.
            outs = []
            for piece in x.split(piece_len, dim=1):
                o, state = self._forward(piece, state)
                outs.append(o)
            return torch.cat(outs, dim=1), state
        return self._forward(x, state)

    def _forward(self, x: Tensor, state: MemoryState) -> tuple[Tensor, MemoryState]:
        q, k, v, tail = self._project(x, state.conv)
        # Gates and their log-space products stay in at least float32 under bf16 autocast (docs/design.md §3.2).
        g = self.gates(x)
        g = torch.sigmoid(g.to(torch.promote_types(g.dtype, torch.float32))).transpose(1, 2)  # [B, 3H, T]
        alpha, eta, theta = g[:, : self.heads], g[:, self.heads : 2 * self.heads], g[:, 2 * self.heads :]
        s = self.settings
        eta = s.eta_max * eta
        theta = s.theta_max * theta
        keys = None
        if s.step_scale == "gram":
            overlap, keys = key_overlap(k, state.keys, state.position, s.chunk_size)
            theta = theta * (1.0 - eta) / overlap
        y, new = memory_update(
            q, k, v, alpha, eta, theta, state,
            chunk_size=s.chunk_size, activation=s.activation, read=s.read, kernel=s.kernel,
            clip=s.inner_clip, checkpoint_chunks=s.checkpoint_chunks, norm=self._norm(),
        )  # fmt: skip
        return self._output(y.to(x.dtype), x), dataclasses.replace(new, conv=tail, keys=keys)

    def retrieve(self, x: Tensor, state: MemoryState, tail: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Read without writing, M*(q) with the state's current weights (Eq. 15; MAC's Eq. 21).

        `tail` is the conv context of this read stream (separate from the write stream's `state.conv`).
        Returns the output `[B, T, dim]` and the new conv tail.
        """
        q, _, _, tail = self._project(x, tail)
        y = mlp_forward(state.weights, q, self.settings.activation, self._norm())
        return self._output(y, x), tail
