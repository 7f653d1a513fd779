"""Forecasting from the whole past: stream training and whole-past evaluation (`task.context_train = "stream"`).

`titans forecast --context all` reads every row before the forecast window through the memory, as consecutive
lookback blocks aligned to the end (variate layout; the partial first block is dropped), so a window starting at
row s is forecast after a stream of blocks that starts at row s mod L. Stream training reproduces exactly that:

* Phase p (0 ≤ p < L) is the stream of training windows p, p + L, p + 2L, ...; reading its block k is reading
  the rows [p + kL, p + (k+1)L), the input of window p + kL.
* A batch is B streams at the same block k (one memory state can only be carried for rows at the same position
  of their sequence); a round walks them from block 0 to their end, and the epoch's rounds cover every phase
  once, so every training window is forecast once per epoch, as in window training.
* The memory state is carried from one step to the next and detached (truncated backpropagation): a step's
  gradient reaches the weights through the newest block only, the past enters through the state written by
  the weights of earlier steps.

Evaluation reads the same way: one stream per phase, all phases in one batch, each window's forecast taken
after its own block, which equals `model(values[: s + L])` per window at a fraction of its cost.
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
    """A training window; whether its item carries the stream's whole past (the first batch after a resume in
    the middle of a round, when no carried state exists); and its companion window (-1: none)."""

    window: int
    with_past: bool = False
    companion: int = -1


class StreamWindows(Dataset):
    """The training windows of a `WindowDataset` (context 0) as L streams, batched by `epoch_batches`.

    Items: x the window's rows [L, C] (with `StreamKey.with_past`: the stream's rows from its first block,
    [(k+1)·L, C]), y the targets, `block` k (the window's position in its stream), `index` the window. With
    `companions` (task.context_train = "both") each item also brings `x_window`, `y_window`: a window drawn
    from the epoch's shuffle of all windows, to be forecast from the window alone, so that every step also
    trains the window regime on a batch spread over the whole split (the streams' windows all lie within one
    block of rows).
    """

    def __init__(self, windows: Any, companions: bool = False) -> None:
        if windows.context:
            raise ValueError("stream windows read the whole past themselves; build them with context 0")
        self.windows, self.lookback, self.companions = windows, windows.lookback, companions

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, key: StreamKey | int) -> Batch:
        key = key if isinstance(key, StreamKey) else StreamKey(key)
        item = dict(self.windows[key.window])
        block = key.window // self.lookback
        if key.with_past:
            s = self.windows.starts[key.window]
            item["x"] = self.windows.values[s - block * self.lookback : s + self.lookback]
        item["block"] = torch.tensor(block)
        if key.companion >= 0:
            other = self.windows[key.companion]
            item["x_window"], item["y_window"] = other["x"], other["y"]
        return item

    def stream_length(self, phase: int) -> int:
        """Blocks of stream `phase`: windows phase, phase + L, ... below len(self)."""
        return -(-(len(self) - phase) // self.lookback)

    def rounds(self, seed: int, epoch: int, batch_size: int) -> list[list[int]]:
        """The epoch's rounds: lists of at most `batch_size` phases, every phase once. Stream lengths differ by
        at most one block; longer streams come first, so a round's shorter streams only sit out its last step.
        Which phases share a round and the order of the rounds are drawn from (seed, epoch)."""
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        phases = torch.randperm(min(self.lookback, len(self)), generator=generator).tolist()
        phases.sort(key=self.stream_length, reverse=True)  # stable: the draw still mixes equal lengths
        rounds = [phases[i : i + batch_size] for i in range(0, len(phases), batch_size)]
        return [rounds[i] for i in torch.randperm(len(rounds), generator=generator).tolist()]

    def steps_per_epoch(self, batch_size: int) -> int:
        """Optimizer steps of one epoch: the same for every epoch (the round sizes do not depend on the draw)."""
        return sum(self.stream_length(r[0]) for r in self.rounds(0, 0, batch_size))

    def epoch_batches(self, epoch: int, seed: int, batch_size: int, skip: int = 0) -> list[list[StreamKey]]:
        """Batches of `epoch` from step `skip` on: round by round, block by block. A resumed epoch's first batch
        in the middle of a round carries its streams' past (nothing else could rebuild their state)."""
        out = []
        # The companions: the epoch's shuffle of all windows, handed out in step order (every window once).
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 500_000)
        shuffled = iter(torch.randperm(len(self), generator=generator).tolist() if self.companions else [])
        for phases in self.rounds(seed, epoch, batch_size):
            for block in range(self.stream_length(phases[0])):
                first = len(out) == skip and block > 0
                live = [p for p in phases if self.stream_length(p) > block]
                out.append([StreamKey(p + block * self.lookback, first, next(shuffled, -1)) for p in live])
        return out[skip:]


@dataclass
class StreamCarry:
    """The memory state of the streams after the windows `index` (kept on the model between steps)."""

    index: Tensor
    state: Any


def stream_forecast(model: nn.Module, batch: Batch) -> Tensor:
    """The forecast [B, H, C] of a `StreamWindows` batch: the newest block read with gradients after the state
    its streams carried out of the previous step (fresh at block 0; rebuilt from an item's past after a resume).

    The state after this block is detached and kept on the model for the next step (truncated
    backpropagation); it is plain attribute data, never part of the state dict or a checkpoint.
    """
    x, index, lookback = batch["x"], batch["index"], model.lookback
    block = int(batch["block"][0])
    carry: StreamCarry | None = getattr(model, "_stream_carry", None)
    if block == 0:
        state = None
    elif x.shape[1] > lookback:  # the streams' past came with the batch: read it without gradients
        with torch.no_grad():
            state = read_past(model, x[:, :-lookback])
        x = x[:, -lookback:]
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
    (`model(values[: s + L])`, history_norm "block"), with one stream per phase, `batch_size` streams at once.

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
                if keep:
                    future = starts[keep, None] + lookback + torch.arange(windows.horizon)
                    true = values[future].index_select(2, targets)
                    sums.update(y[keep].index_select(2, targets.to(device)).cpu(), true)
    return sums
