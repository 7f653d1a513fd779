"""Forecasting from the whole past: stream training and whole-past evaluation (`task.context_train`).

`titans forecast --context all` reads every row before the forecast window through the memory, as consecutive
lookback blocks aligned to the end (variate layout; the partial first block is dropped), so a window starting at
row s is forecast after a stream of blocks that starts at row s mod L. Stream training reproduces exactly that:

* Phase p (0 ≤ p < L) is the stream of training windows p, p + L, p + 2L, ...; reading its block k is reading
  the rows [p + kL, p + (k+1)L), the input of window p + kL.
* A batch is B streams at the same step (one memory state can only be carried for rows at the same position
  of their sequence); a round walks them from block 0 to their end, and the epoch's rounds cover every phase
  once, so every training window is forecast once per epoch, as in window training. With
  `task.stream_segment` K the streams are cut into K-block segments that first read the K blocks before them
  without gradients (`StreamWindows`), so that a batch mixes rows from the whole split.
* The memory state is carried from one step to the next and detached (truncated backpropagation): a step's
  gradient reaches the weights through the newest block only, the past enters through the state written by
  the weights of earlier steps.

Evaluation reads the same way: one stream per phase, all phases in one batch, each window's forecast taken
after its own block, which equals `model(values[: s + L])` per window at a fraction of its cost.
`task.context_train = "both"` adds a shuffled window batch to each step; `task.history_blend` forecasts from a
long context as the mean of the whole-past and window-alone readings (tasks/forecast_models.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from titans_cli.engine.metrics import ErrorSums
from titans_cli.engine.task import Batch


@dataclass(frozen=True)
class StreamKey:
    """A training window; how many blocks before it its item carries (read without gradients from a fresh
    state: a segment's burn-in, or the first batch after a resume in the middle of a round); its companion
    window (-1: none)."""

    window: int
    past: int = 0
    companion: int = -1


@dataclass(frozen=True)
class Segment:
    """Blocks `first`, ..., `first + blocks - 1` of stream `phase`, read after `past` earlier blocks."""

    phase: int
    first: int
    blocks: int
    past: int


class StreamWindows(Dataset):
    """The training windows of a `WindowDataset` (context 0) as L streams, batched by `epoch_batches`.

    `segment` 0: each stream is read whole, from block 0, so every forecast has the whole past of the split
    behind it; a batch then holds windows within one block of rows of each other. `segment` K > 0: each stream
    is cut into segments of K blocks (the first one longer, K + phase mod K, so that segments of different
    phases start at different rows), and a segment first reads the K blocks before it without gradients
    (burn-in); a batch then mixes segments from anywhere in the split, and every forecast has at least K
    blocks of past behind it.

    Items: x the window's rows [L, C] (with `StreamKey.past` = k: [(k+1)·L, C], the k blocks before it first),
    y the targets, `block` (the window's block in its stream), `index` the window. With `companions`
    (task.context_train = "both") each item also brings `x_window`, `y_window`: a window drawn from the epoch's
    shuffle of all windows, forecast from the window alone, so that every step also trains the window regime on
    a batch spread over the whole split.
    """

    def __init__(self, windows: Any, companions: bool = False, segment: int = 0) -> None:
        if windows.context:
            raise ValueError("stream windows read the whole past themselves; build them with context 0")
        self.windows, self.lookback, self.companions, self.segment = windows, windows.lookback, companions, segment

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, key: StreamKey | int) -> Batch:
        key = key if isinstance(key, StreamKey) else StreamKey(key)
        item = dict(self.windows[key.window])
        if key.past:
            s = self.windows.starts[key.window]
            item["x"] = self.windows.values[s - key.past * self.lookback : s + self.lookback]
        item["block"] = torch.tensor(key.window // self.lookback)
        if key.companion >= 0:
            other = self.windows[key.companion]
            item["x_window"], item["y_window"] = other["x"], other["y"]
        return item

    def stream_length(self, phase: int) -> int:
        """Blocks of stream `phase`: windows phase, phase + L, ... below len(self)."""
        return -(-(len(self) - phase) // self.lookback)

    def segments(self) -> list[Segment]:
        """Every block of every stream in exactly one segment (the same for every epoch)."""
        out = []
        for phase in range(min(self.lookback, len(self))):
            n, k = self.stream_length(phase), self.segment
            head = min(n, k + phase % k) if k else n
            out.append(Segment(phase, 0, head, 0))
            out += [Segment(phase, b, min(k, n - b), k) for b in range(head, n, k or n)]
        return out

    def rounds(self, seed: int, epoch: int, batch_size: int) -> list[list[Segment]]:
        """The epoch's rounds: at most `batch_size` segments with the same burn-in, read side by side from one
        step (one memory state holds rows at the same token position only); longer segments first, so the
        shorter ones sit out the round's last steps. Which segments share a round and the order of the rounds
        are drawn from (seed, epoch); the round lengths are not, so every epoch has as many steps."""
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        segments = self.segments()
        drawn = [segments[i] for i in torch.randperm(len(segments), generator=generator).tolist()]
        rounds = []
        for past in sorted({s.past for s in segments}):
            group = sorted((s for s in drawn if s.past == past), key=lambda s: s.blocks, reverse=True)  # stable
            rounds += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
        return [rounds[i] for i in torch.randperm(len(rounds), generator=generator).tolist()]

    def steps_per_epoch(self, batch_size: int) -> int:
        """Optimizer steps of one epoch."""
        return sum(r[0].blocks for r in self.rounds(0, 0, batch_size))

    def epoch_batches(self, epoch: int, seed: int, batch_size: int, skip: int = 0) -> list[list[StreamKey]]:
        """Batches of `epoch` from step `skip` on: round by round, block by block. A resumed epoch's first batch
        in the middle of a round carries all its segments have read (nothing else could rebuild their state)."""
        out = []
        # The companions: the epoch's shuffle of all windows, handed out in step order (every window once).
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 500_000)
        shuffled = iter(torch.randperm(len(self), generator=generator).tolist() if self.companions else [])
        for segments in self.rounds(seed, epoch, batch_size):
            for step in range(segments[0].blocks):
                resumed = len(out) == skip and step > 0
                keys = []
                for seg in (s for s in segments if s.blocks > step):
                    past = seg.past + step if resumed else seg.past if step == 0 else 0
                    window = seg.phase + (seg.first + step) * self.lookback
                    keys.append(StreamKey(window, past, next(shuffled, -1)))
                out.append(keys)
        return out[skip:]


@dataclass
class StreamCarry:
    """The memory state of the streams after the windows `index` (kept on the model between steps)."""

    index: Tensor
    state: Any


def stream_forecast(model: nn.Module, batch: Batch) -> Tensor:
    """The forecast [B, H, C] of a `StreamWindows` batch: the newest block read with gradients after the state
    its streams carried out of the previous step (fresh at block 0; read from the items' past blocks at the
    start of a segment with burn-in and after a resume).

    The state after this block is detached and kept on the model for the next step (truncated
    backpropagation); it is plain attribute data, never part of the state dict or a checkpoint.
    """
    x, index, lookback = batch["x"], batch["index"], model.lookback
    block = int(batch["block"].min())
    carry: StreamCarry | None = getattr(model, "_stream_carry", None)
    if x.shape[1] > lookback:  # the streams' past came with the batch: read it without gradients
        with torch.no_grad():
            state = read_past(model, x[:, :-lookback])
        x = x[:, -lookback:]
    elif block == 0:
        state = None
    else:
        state = _continued(carry, index - lookback, block)
    y, state = model.stream_step(x, state)
    model._stream_carry = StreamCarry(index.detach().clone(), state.detach())
    return y


def _continued(carry: StreamCarry | None, previous: Tensor, block: int) -> Any:
    """The carried state's rows of the streams whose previous windows are `previous` (all of them, or the longer
    streams of a round at its last step)."""
    row_of = {} if carry is None else {int(w): r for r, w in enumerate(carry.index.tolist())}
    if not all(int(w) in row_of for w in previous.tolist()):
        raise RuntimeError(f"stream batch at block {block} does not continue the previous one (batches out of order)")
    rows = [row_of[int(w)] for w in previous.tolist()]
    if rows == list(range(len(row_of))):
        return carry.state
    return select_rows(carry.state, torch.tensor(rows, device=previous.device))


def select_rows(state: Any, rows: Tensor) -> Any:
    """The rows `rows` of a backbone state: every tensor in it is batch-first (titans_cli.backbone.model)."""
    if isinstance(state, Tensor):
        return state.index_select(0, rows)
    if dataclasses.is_dataclass(state):
        return type(state)(**{f.name: select_rows(getattr(state, f.name), rows) for f in dataclasses.fields(state)})
    if isinstance(state, tuple | list):
        return type(state)(select_rows(v, rows) for v in state)
    return state


def read_past(model: nn.Module, rows: Tensor, state: Any = None) -> Any:
    """The memory state after reading `rows` [B, k·L, C] block by block (after `state`)."""
    for start in range(0, rows.shape[1], model.lookback):
        _, state = model.stream_step(rows[:, start : start + model.lookback], state)
    return state


@torch.no_grad()
def whole_past_errors(model: nn.Module, windows: Any, batch_size: int = 1024) -> ErrorSums:
    """Error sums over every window of a `WindowDataset` forecast after reading every earlier row of the series
    (`model(values[: s + L])`, history_norm "block", with `history_blend` too), with one stream per phase,
    `batch_size` streams at once.

    Streams of equal length run together (one state, one position); a phase's stream runs from row s mod L to
    its last window, and each window's forecast is taken right after its own block.
    """
    lookback, values = windows.lookback, windows.values
    targets = windows.target_idx
    sums = ErrorSums(windows.horizon, len(targets))
    device = next(model.parameters()).device
    by_phase: dict[int, list[int]] = {}
    for s in windows.starts:
        by_phase.setdefault(s % lookback, []).append(s)
    by_length: dict[int, list[int]] = {}
    for p, starts in by_phase.items():
        by_length.setdefault((starts[-1] - p) // lookback + 1, []).append(p)
    for length, phases in by_length.items():
        for i in range(0, len(phases), batch_size):
            group = torch.tensor(phases[i : i + batch_size])
            wanted = [set(by_phase[p]) for p in group.tolist()]
            state = None
            for block in range(length):
                starts = group + block * lookback
                rows = starts[:, None] + torch.arange(lookback)
                y, state = model.stream_step(values[rows].to(device), state)
                keep = [j for j, s in enumerate(starts.tolist()) if s in wanted[j]]
                if not keep:
                    continue
                y = y[keep]
                if model.history_blend and block:  # as `model(values[: s + L])`: the window alone blended in
                    y = (y + model.stream_step(values[rows[keep]].to(device), None)[0]) / 2
                future = starts[keep, None] + lookback + torch.arange(windows.horizon)
                sums.update(y.index_select(2, targets.to(device)).cpu(), values[future].index_select(2, targets))
    return sums
