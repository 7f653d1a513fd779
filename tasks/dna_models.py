"""DNA classifiers: the Titans backbone with pooling and a linear head (docs/design.md §7, Table 4: "Neural Memory
Module"), and the GenomicBenchmarks CNN baseline (Grešová et al. 2023), both reading character tokens (A C G T N, pad).

Batches are right-padded. The backbone is causal (causal convolutions, memory written left to right), so padding
after a sequence never changes its outputs and masked pooling is exact: a prediction does not depend on the
batch it is in. Sequences longer than `piece_len` are read through the memory state in pieces
(`backbone(x_piece, state)`, equal to one call on the whole sequence), never truncated.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from titans_cli.backbone.model import Titans
from titans_cli.engine.config import ModelConfig
from titans_cli.engine.sequence import PAD_ID, TOKEN_COMPLEMENT, VOCAB_SIZE


def rc_tokens(tokens: Tensor, lengths: Tensor) -> Tensor:
    """Reverse complement of right-padded token rows `[B, T]`: each row reversed within its length, A↔T, C↔G,
    N and padding kept (padding stays at the right)."""
    T = tokens.shape[1]
    src = lengths.unsqueeze(1) - 1 - torch.arange(T, device=tokens.device).unsqueeze(0)  # [B, T]
    flipped = tokens.gather(1, src.clamp(min=0))
    table = torch.tensor(TOKEN_COMPLEMENT, dtype=tokens.dtype, device=tokens.device)
    return torch.where(src >= 0, table[flipped], torch.full_like(tokens, PAD_ID))


class TitansClassifier(nn.Module):
    """embed → Titans backbone (read in pieces) → pooling → dropout → linear head.

    Pooling `mean` averages the real tokens of each of `bins` equal parts of a sequence (relative position:
    part k holds positions p with floor(p · bins / length) = k) and concatenates the parts; bins = 1 is plain
    masked mean pooling (HyenaDNA's head). More bins let the head weigh where a motif occurs, as the CNN's
    position-specific dense layer does. Pooling `max` takes the per-bin maximum instead (a sharp motif is not
    diluted by its bin); `last` takes the last real token (the causal summary).

    With `strands = 2` the same backbone also reads the reverse complement (the other strand, 5' to 3'), so every
    bin gets context from both sides of a motif; the other strand's bins are flipped to line up with the forward
    positions (exactly when `bins` divides the length, to within one base otherwise) and concatenated.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        n_classes: int,
        pooling: str,
        bins: int,
        piece_len: int,
        head_dropout: float,
        strands: int = 1,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB_SIZE, cfg.dim)
        self.backbone = Titans(cfg)
        self.bins = 1 if pooling == "last" else bins
        self.strands = strands
        self.head = nn.Sequential(nn.Dropout(head_dropout), nn.Linear(cfg.dim * self.bins * strands, n_classes))
        self.pooling = pooling
        self.piece_len = piece_len

    def features(self, tokens: Tensor, lengths: Tensor, piece_len: int | None = None) -> Tensor:
        """Pooled features `[B, strands · bins · dim]` of right-padded tokens `[B, T]` with true `lengths` `[B]`."""
        pooled = self.pool(tokens, lengths, piece_len)  # [B, bins, dim]
        if self.strands == 2:
            other = self.pool(rc_tokens(tokens, lengths), lengths, piece_len).flip(1)
            pooled = torch.cat([pooled, other], dim=-1)
        return pooled.reshape(pooled.shape[0], -1)

    def pool(self, tokens: Tensor, lengths: Tensor, piece_len: int | None = None) -> Tensor:
        """One strand read left to right in pieces, pooled to `[B, bins, dim]` (`[B, 1, dim]` for `last`)."""
        T = int(lengths.max())
        tokens = tokens[:, :T]  # batch columns past the longest sequence are padding only
        piece = piece_len or self.piece_len or T
        B, K = tokens.shape[0], self.bins
        rows = torch.arange(B, device=tokens.device)
        sums = last = None
        state = None
        for start in range(0, T, piece):
            y, state = self.backbone(self.embed(tokens[:, start : start + piece]), state)  # [B, t, dim]
            pos = torch.arange(start, start + y.shape[1], device=y.device).unsqueeze(0)  # [1, t]
            real = pos < lengths.unsqueeze(1)  # [B, t]
            which = (pos * K).div(lengths.unsqueeze(1), rounding_mode="floor").clamp(max=K - 1)
            weight = nn.functional.one_hot(which, K).to(y.dtype) * real.unsqueeze(-1).to(y.dtype)  # [B, t, K]
            if self.pooling == "max":
                inside = weight.unsqueeze(-1) > 0  # [B, t, K, 1]
                part = y.unsqueeze(2).masked_fill(~inside, float("-inf")).amax(1)  # [B, K, dim]
                sums = part if sums is None else torch.maximum(sums, part)
            else:
                part = weight.transpose(1, 2) @ y  # [B, K, dim]
                sums = part if sums is None else sums + part
            # The last real token of a row falls into exactly one piece.
            hit = (lengths - 1 >= start) & (lengths - 1 < start + y.shape[1])
            picked = y[rows, (lengths - 1 - start).clamp(0, y.shape[1] - 1)]
            last = torch.where(hit.unsqueeze(1), picked, picked.new_zeros(()) if last is None else last)
        if self.pooling == "last":
            return last.unsqueeze(1)
        if self.pooling == "max":
            return sums.masked_fill(sums == float("-inf"), 0.0)  # an empty bin (n < K) reads as zero
        # Positions per bin: bin k of a row of length n holds ceil((k+1)·n/K) - ceil(k·n/K) positions.
        k = torch.arange(K + 1, device=lengths.device).unsqueeze(0)
        edges = (k * lengths.unsqueeze(1) + K - 1).div(K, rounding_mode="floor")  # [B, K+1]
        counts = (edges[:, 1:] - edges[:, :-1]).clamp(min=1).to(sums.dtype)  # an empty bin (n < K) stays zero
        return sums / counts.unsqueeze(-1)

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """Class logits `[B, n_classes]`."""
        return self.head(self.features(tokens, lengths))


class GenomicBenchmarksCNN(nn.Module):
    """The GenomicBenchmarks CNN (`genomic_benchmarks/models/torch.py`): embedding 100, three Conv1d (16, 8, 4
    filters, kernel 8) with BatchNorm, ReLU and max-pool 2, then Linear(→512) and Linear(→classes).

    It reads a fixed `input_len`: shorter rows are padded, longer ones cropped (`crop`); `cropped` counts them.
    Differences from the original: softmax over n classes (it has one sigmoid output, binary only).
    """

    def __init__(self, n_classes: int, input_len: int, crop: str = "center", embedding_dim: int = 100) -> None:
        super().__init__()
        self.input_len = input_len
        self.crop = crop
        self.embed = nn.Embedding(VOCAB_SIZE, embedding_dim)
        layers: list[nn.Module] = []
        channels = embedding_dim
        for out in (16, 8, 4):
            layers += [nn.Conv1d(channels, out, kernel_size=8), nn.BatchNorm1d(out), nn.ReLU(), nn.MaxPool1d(2)]
            channels = out
        self.conv = nn.Sequential(*layers, nn.Flatten())
        with torch.no_grad():
            flat = self.conv(torch.zeros(1, embedding_dim, input_len)).shape[1]
        if flat < 1:
            raise ValueError(f"task.cnn_length {input_len} is too short for the CNN's three conv+pool stages")
        self.dense = nn.Sequential(nn.Linear(flat, 512), nn.Linear(512, n_classes))

    def fit_length(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """`[B, input_len]` tokens: rows cropped around `crop` or right-padded."""
        L = self.input_len
        offset = {"left": torch.zeros_like(lengths), "right": lengths - L, "center": (lengths - L) // 2}[self.crop]
        offset = offset.clamp(min=0)
        pos = offset.unsqueeze(1) + torch.arange(L, device=tokens.device).unsqueeze(0)  # [B, L]
        padded = torch.nn.functional.pad(tokens, (0, max(0, int(pos.max()) + 1 - tokens.shape[1])), value=PAD_ID)
        out = padded.gather(1, pos)
        return torch.where(pos < lengths.unsqueeze(1), out, torch.full_like(out, PAD_ID))

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        x = self.embed(self.fit_length(tokens, lengths)).transpose(1, 2)  # [B, emb, L]
        return self.dense(self.conv(x))
