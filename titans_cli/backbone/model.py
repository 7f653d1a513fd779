"""The Titans backbone: embeddings `[B, T, dim]` → hidden states `[B, T, dim]`, task-agnostic.

Variants (docs/design.md §5), each a pre-norm residual block with an FFN sub-block:
    lmm  LMMBlock  memory only, "Memory Without Attention" (paper §4.3)
    mac  MACBlock  Memory as a Context, Eqs. 21-25, causal reading of Eq. 25 (docs/design.md A7)
    mag  MAGBlock  Memory as a Gate, Eqs. 26-28
    mal  MALBlock  Memory as a Layer, Eqs. 29-31
    attn AttnBlock sliding-window attention only: the baseline of the same size
Persistent memory tokens (Eq. 19) are prepended once at the start of every sequence, visible to every attention
query (the attention prefix) and removed from the output. Every block carries an explicit streaming state, so
`backbone(x2, state)` continues the sequences of an earlier `backbone(x1)` exactly.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from titans_cli.backbone.config import ModelConfig
from titans_cli.backbone.memory import NeuralMemory
from titans_cli.backbone.ops.memory_update import MemoryState


def _rope(x: Tensor, start: int) -> Tensor:
    """Rotary position embedding for `[B, h, n, d]` at absolute positions start..start+n-1."""
    d = x.shape[-1] // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(d, device=x.device, dtype=torch.float32) / d)
    pos = torch.arange(start, start + x.shape[-2], device=x.device, dtype=torch.float32)
    ang = pos[:, None] * freqs[None, :]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., :d], x[..., d : 2 * d]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, x[..., 2 * d :]], dim=-1)


@dataclass
class AttnCache:
    """Keys/values an attention layer keeps between calls: the persistent prefix and the recent tokens."""

    prefix_k: Tensor  # [B, h, N_p, d]
    prefix_v: Tensor
    k: Tensor  # [B, h, c, d]: recent tokens (SWA: the last `window`; MAC: the current segment so far)
    v: Tensor
    position: int  # absolute position of the next token (prefix included), for RoPE


def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, pk: Tensor, pv: Tensor, window: int) -> Tensor:
    """Causal sliding-window attention with an always-visible prefix, in blocks of `window` queries.

    Args:
        q: `[B, h, n, d]` queries for the last n positions of k/v.
        k, v: `[B, h, c + n, d]` (c cached positions before the queries).
        pk, pv: `[B, h, p, d]` prefix keys/values visible to every query.
        window: query t sees keys in (t − window, t].
    Returns:
        `[B, h, n, d]`.
    """
    B, h, n, d = q.shape
    c, w = k.shape[2] - n, window
    nb = -(-n // w)
    pad = nb * w - n
    qb = F.pad(q, (0, 0, 0, pad)).view(B, h, nb, w, d)
    # Block b holds queries at kv index c + b·w + r; its keys are kv indices [c + b·w − w, c + b·w + w).
    kp = F.pad(k, (0, 0, w, pad))[:, :, c:].unfold(2, 2 * w, w).transpose(-1, -2)  # [B, h, nb, 2w, d]
    vp = F.pad(v, (0, 0, w, pad))[:, :, c:].unfold(2, 2 * w, w).transpose(-1, -2)
    r = torch.arange(w, device=q.device)[:, None]
    s = torch.arange(2 * w, device=q.device)[None, :]
    blk = torch.arange(nb, device=q.device)[:, None, None]
    mask = (s > r) & (s <= r + w) & (c + blk * w - w + s >= 0)  # [nb, w, 2w]
    p = pk.shape[2]
    if p:
        kp = torch.cat([pk.unsqueeze(2).expand(B, h, nb, p, d), kp], dim=3)
        vp = torch.cat([pv.unsqueeze(2).expand(B, h, nb, p, d), vp], dim=3)
        mask = torch.cat([mask.new_ones(nb, w, p), mask], dim=-1)
    out = F.scaled_dot_product_attention(qb, kp, vp, attn_mask=mask)
    return out.reshape(B, h, nb * w, d)[:, :, :n]


class Attention(nn.Module):
    """Multi-head attention projections with RoPE; sliding-window (SWA) or MAC segment-local masking."""

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.heads, self.head_dim, self.window = heads, dim // heads, window
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def _heads(self, x: Tensor, start: int) -> tuple[Tensor, Tensor, Tensor]:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return _rope(q, start), _rope(k, start), v

    def _merge(self, o: Tensor) -> Tensor:
        B, h, T, d = o.shape
        return self.out(o.transpose(1, 2).reshape(B, T, h * d))

    def start(self, prefix: Tensor) -> tuple[Tensor, AttnCache]:
        """Causal attention among the persistent prefix tokens `[B, p, dim]`; returns their outputs and a cache."""
        q, k, v = self._heads(prefix, 0)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True) if prefix.shape[1] else q
        empty = k[:, :, :0]
        return self._merge(o), AttnCache(k, v, empty, empty, prefix.shape[1])

    def sliding(self, x: Tensor, cache: AttnCache) -> tuple[Tensor, AttnCache]:
        """SWA* of Eq. 27: window `self.window`, prefix visible to every query."""
        q, k, v = self._heads(x, cache.position)
        k_all, v_all = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)
        o = sliding_window_attention(q, k_all, v_all, cache.prefix_k, cache.prefix_v, self.window)
        keep = k_all.shape[2] - min(self.window, k_all.shape[2])
        new = AttnCache(cache.prefix_k, cache.prefix_v, k_all[:, :, keep:], v_all[:, :, keep:],
                        cache.position + x.shape[1])  # fmt: skip
        return self._merge(o), new

    def segment(self, x: Tensor, retrieved: Tensor, cache: AttnCache, h_cache: AttnCache) -> tuple[Tensor, ...]:
        """MAC attention over [persistent | retrieved h | segment] (Eq. 22-23), causal within the segment.

        `x` and `retrieved` `[B, n, dim]` continue the current segment, whose earlier tokens are in `cache`
        (segment keys) and `h_cache` (retrieved keys). Query i sees the prefix, h_j and x_j for j ≤ i.
        """
        n = x.shape[1]
        q, k, v = self._heads(x, cache.position)
        _, hk, hv = self._heads(retrieved, cache.position)
        k_seg, v_seg = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)
        hk_seg, hv_seg = torch.cat([h_cache.k, hk], dim=2), torch.cat([h_cache.v, hv], dim=2)
        L = k_seg.shape[2]
        causal = torch.ones(n, L, dtype=torch.bool, device=x.device).tril(L - n)
        p = cache.prefix_k.shape[2]
        mask = torch.cat([causal.new_ones(n, p), causal, causal], dim=-1)
        keys = torch.cat([cache.prefix_k, hk_seg, k_seg], dim=2)
        values = torch.cat([cache.prefix_v, hv_seg, v_seg], dim=2)
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        pos = cache.position + n
        new = AttnCache(cache.prefix_k, cache.prefix_v, k_seg, v_seg, pos)
        new_h = AttnCache(h_cache.prefix_k, h_cache.prefix_v, hk_seg, hv_seg, pos)
        return self._merge(o), new, new_h


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, mult * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mult * dim, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _scale_attn_branch(block: MACBlock | MAGBlock) -> None:
    """Scale the block's attention-branch output weights (`attn_branch_init`; 1 keeps PyTorch's init)."""
    if block.cfg.attn_branch_init != 1.0:
        with torch.no_grad():
            for w in block.attn_branch():
                w.mul_(block.cfg.attn_branch_init)


def attn_branch_weights(model: nn.Module) -> list[nn.Parameter]:
    """The attention-branch output weights of every MAC/MAG block in `model` (what `train.memory_warmup` holds)."""
    return [w for m in model.modules() if isinstance(m, (MACBlock, MAGBlock)) for w in m.attn_branch()]


@dataclass
class LayerState:
    """Streaming state of one block; fields a variant does not use stay None."""

    memory: MemoryState | None = None
    attn: AttnCache | None = None
    retrieved: AttnCache | None = None  # MAC: keys of retrieved tokens in the current segment
    segment_weights: tuple[Tensor, ...] | None = None  # MAC: memory weights at the segment start (Eq. 21)
    read_tail: Tensor | None = None  # MAC: conv context of the retrieval stream


class Block(nn.Module, abc.ABC):
    """Pre-norm residual block: `x + mixer(norm(x))`, then `x + FFN(norm(x))` when ffn_mult > 0."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.norm = nn.RMSNorm(cfg.dim)
        self.ffn_norm = nn.RMSNorm(cfg.dim) if cfg.ffn_mult else None
        self.ffn = FeedForward(cfg.dim, cfg.ffn_mult, cfg.dropout) if cfg.ffn_mult else None
        self.drop = nn.Dropout(cfg.dropout)

    @abc.abstractmethod
    def start(self, prefix: Tensor, batch: int) -> tuple[Tensor, LayerState]:
        """Process the persistent prefix `[B, p, dim]` at the start of a sequence; returns its new hidden states."""

    def mix(self, x: Tensor, state: LayerState) -> tuple[Tensor, LayerState]:
        """The sequence mixer of the block on normalised inputs; blocks with two sub-layers override forward."""
        raise TypeError(f"{type(self).__name__} overrides forward and has no single mixer")

    def forward(self, x: Tensor, state: LayerState) -> tuple[Tensor, LayerState]:
        y, state = self.mix(self.norm(x), state)
        x = x + self.drop(y)
        if self.ffn is not None:
            x = x + self.drop(self.ffn(self.ffn_norm(x)))
        return x, state

    def _finish_prefix(self, x: Tensor, y: Tensor) -> Tensor:
        x = x + y
        return x + self.ffn(self.ffn_norm(x)) if self.ffn is not None else x


class LMMBlock(Block):
    """Memory only (paper §4.3; docs/design.md §5.4): the persistent prefix is written into the memory like any
    token (Eq. 19)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.memory = NeuralMemory.from_config(cfg)

    def start(self, prefix: Tensor, batch: int) -> tuple[Tensor, LayerState]:
        y, mem = self.memory(self.norm(prefix))
        return self._finish_prefix(prefix, y), LayerState(memory=mem)

    def mix(self, x: Tensor, state: LayerState) -> tuple[Tensor, LayerState]:
        y, state.memory = self.memory(x, state.memory)
        return y, state


class AttnBlock(Block):
    """Sliding-window attention only, with the persistent prefix: the attention baseline of the same size."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.attn = Attention(cfg.dim, cfg.heads, cfg.window)

    def start(self, prefix: Tensor, batch: int) -> tuple[Tensor, LayerState]:
        y, cache = self.attn.start(self.norm(prefix))
        return self._finish_prefix(prefix, y), LayerState(attn=cache)

    def mix(self, x: Tensor, state: LayerState) -> tuple[Tensor, LayerState]:
        y, state.attn = self.attn.sliding(x, state.attn)
        return y, state


class MALBlock(Block):
    """Memory as a Layer (paper §4.3, Eqs. 29-31): y = M(x̃), then o = SW-Attn(y), each a residual sub-layer
    (docs/design.md A11)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.memory = NeuralMemory.from_config(cfg)
        self.attn_norm = nn.RMSNorm(cfg.dim)
        self.attn = Attention(cfg.dim, cfg.heads, cfg.window)

    def start(self, prefix: Tensor, batch: int) -> tuple[Tensor, LayerState]:
        y, mem = self.memory(self.norm(prefix))
        prefix = prefix + y
        a, cache = self.attn.start(self.attn_norm(prefix))
        return self._finish_prefix(prefix, a), LayerState(memory=mem, attn=cache)

    def forward(self, x: Tensor, state: LayerState) -> tuple[Tensor, LayerState]:
        y, state.memory = self.memory(self.norm(x), state.memory)
        x = x + self.drop(y)
        a, state.attn = self.attn.sliding(self.attn_norm(x), state.attn)
        x = x + self.drop(a)
        if self.ffn is not None:
            x = x + self.drop(self.ffn(self.ffn_norm(x)))
        return x, state


class MAGBlock(Block):
    """Memory as a Gate (paper §4.2, Eqs. 26-28): o = RMSNorm(SWA*(x̃)) ⊙ σ(RMSNorm(M(x̃))) (docs/design.md A10).

    With `memory_residual` the memory output is also added as its own residual branch, o = W(…⊙…) + M(x̃): through
    the gate alone the memory reaches the stream only via a sigmoid after a per-token norm, and recall barely learns.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.memory = NeuralMemory.from_config(cfg)
        self.attn = Attention(cfg.dim, cfg.heads, cfg.window)
        self.y_norm, self.m_norm = nn.RMSNorm(cfg.dim), nn.RMSNorm(cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        _scale_attn_branch(self)

    def attn_branch(self) -> list[nn.Parameter]:
        """W, through which alone attention reaches the output (attn.out stays: RMSNorm(y) of y ≈ 0 is unstable)."""
        return [self.proj.weight]

    def _gate(self, y: Tensor, m: Tensor) -> Tensor:
        o = self.proj(self.y_norm(y) * torch.sigmoid(self.m_norm(m)))
        return o + m if self.cfg.memory_residual else o

    def start(self, prefix: Tensor, batch: int) -> tuple[Tensor, LayerState]:
        h = self.norm(prefix)
        y, cache = self.attn.start(h)
        m, mem = self.memory(h)
        return self._finish_prefix(prefix, self._gate(y, m)), LayerState(memory=mem, attn=cache)

    def mix(self, x: Tensor, state: LayerState) -> tuple[Tensor, LayerState]:
        y, state.attn = self.attn.sliding(x, state.attn)
        m, state.memory = self.memory(x, state.memory)
        return self._gate(y, m), state


class MACBlock(Block):
    """Memory as a Context (paper §4.1, Eqs. 21-25), per segment of length C = segment_len:

    h = M*_{t−1}(q(x̂)) (Eq. 21); y = Attn([P | h | x̂]) causal in the segment (Eqs. 22-23); write y into the
    memory and read it per token with the inclusive state (Eq. 24 and the causal reading of Eq. 25, docs/design.md A7);
    o = y ⊙ σ(RMSNorm(m)) (⊗ as a gate, as in MAG). `mac_write="residual"` writes and reads RMSNorm(x̂ + y)
    instead of y; `memory_residual` adds m to o (see MAGBlock).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.memory = NeuralMemory.from_config(cfg)
        self.attn = Attention(cfg.dim, cfg.heads, cfg.window)
        self.m_norm = nn.RMSNorm(cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.write_norm = nn.RMSNorm(cfg.dim) if cfg.mac_write == "residual" else None
        _scale_attn_branch(self)

    def attn_branch(self) -> list[nn.Parameter]:
        """W and the attention's output projection: at 0 the memory writes RMSNorm(x̂) (mac_write=residual), as LMM."""
        return [self.proj.weight, self.attn.out.weight]

    def start(self, prefix: Tensor, batch: int) -> tuple[Tensor, LayerState]:
        # The persistent tokens only form the attention prefix of every segment (Eq. 22); they are not written.
        y, cache = self.attn.start(self.norm(prefix))
        mem = self.memory.initial_state(batch)
        state = LayerState(memory=mem, attn=cache, retrieved=cache, segment_weights=mem.weights)
        return self._finish_prefix(prefix, y), state

    def mix(self, x: Tensor, state: LayerState) -> tuple[Tensor, LayerState]:
        C = self.cfg.segment_len
        p = state.attn.prefix_k.shape[2]
        outs, start, T = [], 0, x.shape[1]
        while start < T:
            offset = (state.attn.position - p) % C  # position inside the current segment
            if offset == 0:
                # New segment: retrieval reads M_{t−1}, the state at the segment start (Eq. 21).
                state.segment_weights = state.memory.weights
                empty = state.attn.k[:, :, :0]
                state.attn = AttnCache(state.attn.prefix_k, state.attn.prefix_v, empty, empty, state.attn.position)
                state.retrieved = AttnCache(state.attn.prefix_k, state.attn.prefix_v, empty, empty,
                                            state.attn.position)  # fmt: skip
            n = min(C - offset, T - start)
            xs = x[:, start : start + n]
            seg_state = MemoryState(state.segment_weights, (), (), 0)
            h, state.read_tail = self.memory.retrieve(xs, seg_state, state.read_tail)
            y, state.attn, state.retrieved = self.attn.segment(xs, h, state.attn, state.retrieved)
            w = y if self.write_norm is None else self.write_norm(xs + y)
            m, state.memory = self.memory(w, state.memory)
            o = self.proj(y * torch.sigmoid(self.m_norm(m)))
            outs.append(o + m if self.cfg.memory_residual else o)
            start += n
        return torch.cat(outs, dim=1), state


BLOCKS: dict[str, type[Block]] = {
    "lmm": LMMBlock, "mac": MACBlock, "mag": MAGBlock, "mal": MALBlock, "attn": AttnBlock,
}  # fmt: skip


@dataclass
class TitansState:
    """Streaming state of the whole backbone: one `LayerState` per block."""

    layers: list[LayerState] = field(default_factory=list)

    def detach(self) -> TitansState:
        def cut(v: object) -> object:
            if isinstance(v, Tensor):
                return v.detach()
            if isinstance(v, MemoryState):
                return v.detach()
            if isinstance(v, AttnCache):
                return AttnCache(*(cut(getattr(v, f)) for f in ("prefix_k", "prefix_v", "k", "v")), v.position)
            if isinstance(v, tuple):
                return tuple(cut(t) for t in v)
            return v

        return TitansState([LayerState(**{k: cut(v) for k, v in vars(s).items()}) for s in self.layers])


class Titans(nn.Module):
    """Task-agnostic Titans backbone: `y, state = Titans(cfg)(x, state=None)`, x and y `[B, T, dim]`.

    `cfg` is a `ModelConfig` (the `[model]` section: variant lmm, mac, mag, mal or attn, width, layers, memory
    settings). A task adds its own embedding and head around it (tasks/).

    Example:
        >>> model = Titans(ModelConfig(variant="mac", dim=64, heads=4, n_layers=2))
        >>> y, state = model(torch.randn(2, 256, 64))       # y [2, 256, 64]
        >>> y2, state = model(torch.randn(2, 64, 64), state)  # continues the same sequences
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.variant not in BLOCKS:
            raise ValueError(f"model.variant: expected one of {', '.join(BLOCKS)}, got {cfg.variant!r}")
        self.cfg = cfg
        self.persistent = nn.Parameter(torch.randn(cfg.n_persistent, cfg.dim) * 0.02)  # Eq. 19
        self.blocks = nn.ModuleList(BLOCKS[cfg.variant](cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim)

    def forward(self, x: Tensor, state: TitansState | None = None) -> tuple[Tensor, TitansState]:
        """Run the blocks over x `[B, T, dim]`.

        Args:
            x: input embeddings.
            state: None starts fresh sequences (memory reset to M_0 per sample, persistent prefix prepended);
                a state returned by an earlier call continues those sequences.
        Returns:
            hidden states `[B, T, dim]` (final RMSNorm applied) and the state after the last position.
        """
        if state is None:
            state = TitansState()
            prefix = self.persistent.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
            for block in self.blocks:
                prefix, layer = block.start(prefix, x.shape[0])
                state.layers.append(layer)
        new_layers = []
        for block, layer in zip(self.blocks, state.layers, strict=True):
            x, layer = block(x, LayerState(**vars(layer)))
            new_layers.append(layer)
        return self.norm(x), TitansState(new_layers)
