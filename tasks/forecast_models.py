"""Forecasting models: the Titans forecaster (docs/design.md §6; LMM by default) and three peers run through the
same pipeline: DLinear (Zeng et al., AAAI 2023), RLinear (Li et al., 2023: RevIN + one linear map) and PatchTST
(Nie et al., ICLR 2023: channel-independent patch transformer with RevIN).

All map z-scored inputs x [B, T, C] to forecasts [B, H, C]. T may exceed the lookback L: the Titans
forecaster then reads the earlier rows through the memory state in pieces (`backbone(x_piece, state)`) and its
head reads only the hidden states of the final L rows, so a forecast can use a whole file of context
(`titans forecast --context all`) with the parameters trained on L-row windows. Memory is reset per sample.
Token layouts (docs/design.md A12): channel-independent patches (PatchTST-style; the memory reads one channel's
patches in order), time-step tokens (one token per row, all channels embedded together) or variate tokens
(iTransformer-style: one token per channel embedding its whole lookback, so the memory reads the channels). RevIN:
Kim et al., ICLR 2022. `skip` adds a linear map from the lookback to the horizon beside the backbone's head.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

Layout = Literal["patch", "time", "variate"]


class RevIN(nn.Module):
    """Reversible instance normalisation over the last `lookback` rows of each sample and channel.

    Statistics come from the final window only, so a longer context is put in the same frame as the window
    the forecast starts from.
    """

    def __init__(self, channels: int, affine: bool = True, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(channels)) if affine else None

    def normalize(self, x: Tensor, lookback: int) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x [B, T, C] → normalised x and (mean, std), each [B, 1, C]."""
        window = x[:, -lookback:, :]
        mean = window.mean(1, keepdim=True).detach()
        std = torch.sqrt(window.var(1, keepdim=True, unbiased=False) + self.eps).detach()
        out = (x - mean) / std
        if self.weight is not None:
            out = out * self.weight + self.bias
        return out, (mean, std)

    def denormalize(self, y: Tensor, stats: tuple[Tensor, Tensor]) -> Tensor:
        """y [B, H, C] back to the input frame."""
        mean, std = stats
        if self.weight is not None:
            y = (y - self.bias) / (self.weight + self.eps * self.eps)
        return y * std + mean


def _run_backbone(backbone: nn.Module, tokens: Tensor, n_head: int, piece: int) -> Tensor:
    """Hidden states of the last `n_head` tokens; earlier tokens only update the memory state.

    tokens [B, N, d] with N ≥ n_head; the prefix is fed in pieces of `piece` tokens with the carried state,
    which equals one call on the whole sequence (backbone contract) at bounded memory. The prefix runs without
    gradients (truncated backpropagation through the carried state): training with `task.context` teaches the
    weights to read a state written by earlier rows at the cost of a forward pass over them, and the write
    weights still learn from the window's own tokens.
    """
    prefix = tokens.shape[1] - n_head
    state = None
    with torch.no_grad():
        for start in range(0, prefix, piece):
            _, state = backbone(tokens[:, start : min(start + piece, prefix)], state)
    out, _ = backbone(tokens[:, prefix:], state)
    return out


class TitansForecaster(nn.Module):
    """Embedding → Titans backbone → linear head, with optional RevIN.

    Args:
        backbone: a `titans_cli.model.Titans` (or any module with `y, state = m(x, state)` on [B, N, d]).
        dim: the backbone width d.
        channels: input channels C (the model also forecasts C channels; the task picks targets).
        lookback: L; horizon: H.
        layout: "patch" (channel-independent patch tokens), "time" (one token per time step) or "variate" (one
            token per channel and L-row block: a longer context is read block by block, C tokens each).
        patch_len, patch_stride: patch geometry (layout "patch"); L − patch_len must be a multiple of the stride.
        revin: reversible instance normalisation on inputs and outputs.
        head_dropout: dropout before the head.
        skip: add a linear map lookback -> horizon (shared by channels) to the head's output, so the backbone
            learns a correction to a linear forecast instead of the whole forecast.
        piece: tokens per backbone call when reading a long context.
        history_norm: how RevIN frames a context longer than the lookback. "window": every row with the final
            window's statistics (the frame the forecast starts from). "block" (variate layout): every L-row
            block with its own statistics, as a stream that reads one block at a time must, since a state
            written earlier cannot be renormalised afterwards (task.context_train = "stream"); then
            `stream_step` over blocks 0..k equals one call on them.
        history_blend: with a context longer than the lookback, forecast the mean of the reading of the whole
            context and that of the final window alone (the two regimes task.context_train = "both" trains).
    """

    def __init__(
        self,
        backbone: nn.Module,
        dim: int,
        channels: int,
        lookback: int,
        horizon: int,
        layout: Layout = "patch",
        patch_len: int = 16,
        patch_stride: int = 8,
        revin: bool = True,
        head_dropout: float = 0.0,
        skip: bool = False,
        piece: int = 512,
        history_norm: Literal["window", "block"] = "window",
        history_blend: bool = False,
    ) -> None:
        super().__init__()
        if history_norm not in ("window", "block") or (history_norm == "block" and layout != "variate"):
            raise ValueError(f"history_norm {history_norm!r}: choose window, or block with the variate layout")
        self.channels, self.lookback, self.horizon, self.layout = channels, lookback, horizon, layout
        self.patch_len, self.patch_stride, self.piece = patch_len, patch_stride, piece
        self.history_norm, self.history_blend = history_norm, history_blend
        self.revin = RevIN(channels) if revin else None
        self.backbone = backbone  # ends with its own RMSNorm
        self.dropout = nn.Dropout(head_dropout)
        if layout == "patch":
            if patch_len > lookback or (lookback - patch_len) % patch_stride:
                raise ValueError(
                    f"lookback {lookback} - patch_len {patch_len} must be a non-negative multiple of the "
                    f"patch stride {patch_stride}"
                )
            self.n_tokens = (lookback - patch_len) // patch_stride + 1
            self.embed = nn.Linear(patch_len, dim)
            self.head = nn.Linear(self.n_tokens * dim, horizon)  # PatchTST flatten head, shared by channels
        elif layout == "time":
            self.n_tokens = lookback
            self.embed = nn.Linear(channels, dim)
            self.head_proj = nn.Linear(dim, channels)
            self.head = nn.Linear(lookback, horizon)  # along time, shared by channels
        elif layout == "variate":
            self.n_tokens = channels
            self.embed = nn.Linear(lookback, dim)
            self.head = nn.Linear(dim, horizon)
        else:
            raise ValueError(f"unknown layout {layout!r}: choose patch, time or variate")
        self.skip = nn.Linear(lookback, horizon) if skip else None

    def forward(self, x: Tensor) -> Tensor:
        """x [B, T, C] (T ≥ lookback; rows before the last L are context) → forecast [B, H, C]."""
        if x.shape[1] < self.lookback:
            raise ValueError(f"input has {x.shape[1]} rows, the model needs at least the lookback {self.lookback}")
        if self.history_blend and x.shape[1] > self.lookback:
            return (self._read(x) + self._read(x[:, -self.lookback :])) / 2
        return self._read(x)

    def _read(self, x: Tensor) -> Tensor:
        """The forecast from all of x, the earlier rows read through the memory."""
        if self.history_norm == "block":
            blocks, stats = self._normalized_blocks(x)
            hidden = _run_backbone(self.backbone, self._variate_tokens(blocks), self.channels, self.piece)
            return self._output(self.head(self.dropout(hidden)).transpose(1, 2), blocks[:, -1], stats)
        stats = None
        if self.revin is not None:
            x, stats = self.revin.normalize(x, self.lookback)
        b, t, c = x.shape
        if self.layout == "patch":
            # Patches aligned to the end, so the final L rows give exactly the training-time patches.
            offset = (t - self.patch_len) % self.patch_stride
            series = x[:, offset:, :].transpose(1, 2).reshape(b * c, t - offset)  # [B*C, T']
            patches = series.unfold(1, self.patch_len, self.patch_stride)  # [B*C, N, P]
            hidden = _run_backbone(self.backbone, self.embed(patches), self.n_tokens, self.piece)
            hidden = self.dropout(hidden).reshape(b * c, -1)
            y = self.head(hidden).reshape(b, c, self.horizon).transpose(1, 2)
        elif self.layout == "time":
            hidden = _run_backbone(self.backbone, self.embed(x), self.n_tokens, self.piece)
            per_step = self.head_proj(self.dropout(hidden))  # [B, L, C]
            y = self.head(per_step.transpose(1, 2)).transpose(1, 2)
        else:
            hidden = _run_backbone(self.backbone, self._variate_tokens(self._blocks(x)), c, self.piece)
            y = self.head(self.dropout(hidden)).transpose(1, 2)
        return self._output(y, x[:, -self.lookback :, :], stats)

    def stream_step(self, block: Tensor, state: Any) -> tuple[Tensor, Any]:
        """Read one L-row block [B, L, C] after `state` (None: the series starts here) → (forecast [B, H, C],
        the state after the block). Variate layout with `history_norm` "block": steps over blocks 0..k give the
        forecast of one call on their rows."""
        if self.history_norm != "block" or block.shape[1] != self.lookback:
            raise ValueError(f"stream_step reads one {self.lookback}-row block with history_norm 'block'")
        blocks, stats = self._normalized_blocks(block)
        hidden, state = self.backbone(self._variate_tokens(blocks), state)
        return self._output(self.head(self.dropout(hidden)).transpose(1, 2), blocks[:, -1], stats), state

    def _blocks(self, x: Tensor) -> Tensor:
        """x [B, T, C] → whole L-row blocks aligned to the end [B, T // L, L, C] (a partial first block is
        dropped), so the final block is the window the forecast starts from."""
        b, t, c = x.shape
        blocks = t // self.lookback
        return x[:, t - blocks * self.lookback :, :].reshape(b, blocks, self.lookback, c)

    def _normalized_blocks(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """`_blocks` with RevIN per block; the statistics returned ([B, 1, C] each) are the final block's."""
        blocks = self._blocks(x)
        if self.revin is None:
            return blocks, None
        b, n, length, c = blocks.shape
        flat, (mean, std) = self.revin.normalize(blocks.reshape(b * n, length, c), length)
        last = (mean.reshape(b, n, 1, c)[:, -1], std.reshape(b, n, 1, c)[:, -1])
        return flat.reshape(b, n, length, c), last

    def _variate_tokens(self, blocks: Tensor) -> Tensor:
        """[B, N, L, C] → [B, N·C, d]. The channels are the tokens: a fixed order, read causally by the memory,
        one lookback each; a longer context comes block by block, each block's C tokens in time order, so the
        memory reads the history as a sequence of channel summaries."""
        b, n, _, c = blocks.shape
        return self.embed(blocks.transpose(2, 3)).reshape(b, n * c, -1)

    def _output(self, y: Tensor, window: Tensor, stats: tuple[Tensor, Tensor] | None) -> Tensor:
        """The head's y [B, H, C] plus the skip map of the (normalised) final window, back in the input frame."""
        if self.skip is not None:
            y = y + self.skip(window.transpose(1, 2)).transpose(1, 2)
        if stats is not None:
            y = self.revin.denormalize(y, stats)
        return y


class MovingAverage(nn.Module):
    """Moving average along time with edge replication (DLinear's trend extractor)."""

    def __init__(self, kernel: int) -> None:
        super().__init__()
        self.kernel = kernel

    def forward(self, x: Tensor) -> Tensor:
        front = x[:, :1, :].expand(-1, (self.kernel - 1) // 2, -1)
        back = x[:, -1:, :].expand(-1, self.kernel // 2, -1)
        padded = torch.cat([front, x, back], dim=1)
        return nn.functional.avg_pool1d(padded.transpose(1, 2), self.kernel, stride=1).transpose(1, 2)


class DLinear(nn.Module):
    """DLinear (Zeng et al., AAAI 2023): trend + remainder, one linear map each along time, shared by channels.

    Reads only the last `lookback` rows of a longer input. The `embed` / `backbone` attributes are absent: it
    has no Titans backbone to transfer.
    """

    def __init__(self, lookback: int, horizon: int, moving_avg: int = 25):
        super().__init__()
        self.lookback, self.horizon = lookback, horizon
        self.decompose = MovingAverage(moving_avg)
        self.seasonal = nn.Linear(lookback, horizon)
        self.trend = nn.Linear(lookback, horizon)
        # DLinear's initialisation: every output step starts as the mean of the lookback.
        for layer in (self.seasonal, self.trend):
            nn.init.constant_(layer.weight, 1.0 / lookback)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, T, C] → [B, H, C] from the last `lookback` rows."""
        x = x[:, -self.lookback :, :]
        trend = self.decompose(x)
        y = self.seasonal((x - trend).transpose(1, 2)) + self.trend(trend.transpose(1, 2))
        return y.transpose(1, 2)


class RLinear(nn.Module):
    """RLinear (Li et al., "Revisiting Long-term Time Series Forecasting", 2023): RevIN, then one linear map
    lookback -> horizon shared by the channels. Reads only the last `lookback` rows of a longer input."""

    def __init__(self, lookback: int, horizon: int, channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.lookback, self.horizon = lookback, horizon
        self.revin = RevIN(channels)
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(lookback, horizon)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, T, C] → [B, H, C] from the last `lookback` rows."""
        x, stats = self.revin.normalize(x[:, -self.lookback :, :], self.lookback)
        y = self.linear(self.dropout(x).transpose(1, 2)).transpose(1, 2)
        return self.revin.denormalize(y, stats)


class _PatchTSTLayer(nn.Module):
    """Post-norm transformer encoder layer with BatchNorm over (patches x batch), as PatchTST's default."""

    def __init__(self, dim: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(dim, ff), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff, dim))
        self.norm1, self.norm2 = nn.BatchNorm1d(dim), nn.BatchNorm1d(dim)
        self.drop = nn.Dropout(dropout)

    @staticmethod
    def _bn(norm: nn.BatchNorm1d, x: Tensor) -> Tensor:
        return norm(x.transpose(1, 2)).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = self._bn(self.norm1, x + self.drop(self.attn(x, x, x, need_weights=False)[0]))
        return self._bn(self.norm2, x + self.drop(self.ff(x)))


class PatchTST(nn.Module):
    """PatchTST/42 (Nie et al., ICLR 2023), supervised: RevIN; each channel's lookback padded at the end by one
    stride (replication) and cut into patches; a linear patch embedding plus a learned position embedding; a
    post-norm transformer encoder (full attention among one channel's patches); a flatten head shared by the
    channels. Sizes are the authors' ETTh1 script (d 16, 4 heads, 3 layers, feed-forward 128, dropout 0.3).
    Reads only the last `lookback` rows of a longer input."""

    def __init__(
        self,
        lookback: int,
        horizon: int,
        channels: int,
        patch_len: int = 16,
        stride: int = 8,
        dim: int = 16,
        heads: int = 4,
        layers: int = 3,
        ff: int = 128,
        dropout: float = 0.3,
        head_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.lookback, self.horizon, self.patch_len, self.stride = lookback, horizon, patch_len, stride
        self.n_patches = (lookback + stride - patch_len) // stride + 1
        self.revin = RevIN(channels)
        self.embed = nn.Linear(patch_len, dim)
        self.position = nn.Parameter(torch.empty(self.n_patches, dim).uniform_(-0.02, 0.02))
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(_PatchTSTLayer(dim, heads, ff, dropout) for _ in range(layers))
        self.head_drop = nn.Dropout(head_dropout)
        self.head = nn.Linear(self.n_patches * dim, horizon)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, T, C] → [B, H, C] from the last `lookback` rows."""
        x, stats = self.revin.normalize(x[:, -self.lookback :, :], self.lookback)
        b, _, c = x.shape
        series = x.transpose(1, 2).reshape(b * c, self.lookback)
        series = torch.cat([series, series[:, -1:].expand(-1, self.stride)], dim=1)  # ReplicationPad1d((0, S))
        h = self.drop(self.embed(series.unfold(1, self.patch_len, self.stride)) + self.position)
        for layer in self.layers:
            h = layer(h)
        y = self.head(self.head_drop(h.reshape(b * c, -1))).reshape(b, c, self.horizon).transpose(1, 2)
        return self.revin.denormalize(y, stats)


def build_forecaster(model_cfg: Any, task_cfg: Any, channels: int) -> nn.Module:
    """The model a `ForecastConfig` asks for: `model = "titans"` (backbone from `model_cfg`) or a peer
    ("dlinear", "rlinear", "patchtst"; these ignore `model_cfg`)."""
    t = task_cfg
    if t.model == "dlinear":
        return DLinear(t.lookback, t.pred_len, t.moving_avg)
    if t.model == "rlinear":
        return RLinear(t.lookback, t.pred_len, channels, dropout=t.head_dropout)
    if t.model == "patchtst":
        return PatchTST(t.lookback, t.pred_len, channels, t.patch_len, t.patch_stride, head_dropout=t.head_dropout)
    from titans_cli.backbone.model import Titans  # imported here: the baseline must not need the backbone

    return TitansForecaster(
        Titans(model_cfg),
        model_cfg.dim,
        channels,
        task_cfg.lookback,
        task_cfg.pred_len,
        layout=task_cfg.layout,
        patch_len=task_cfg.patch_len,
        patch_stride=task_cfg.patch_stride,
        revin=task_cfg.revin,
        head_dropout=task_cfg.head_dropout,
        skip=task_cfg.skip,
        history_norm="window" if task_cfg.context_train == "window" else "block",
        history_blend=task_cfg.history_blend,
    )
