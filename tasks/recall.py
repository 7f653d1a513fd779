"""The `recall` task: multi-query associative recall, the probe that shows what the long-term memory buys.

Model: token embedding → Titans backbone → linear head over the token vocabulary. Loss and accuracy count only
the query-key positions, where the answer is the value paired with that key far earlier in the sequence (data
from `titans prepare recall`, `data_recipes/recall.py`). Chance accuracy is 1/vocab and is reported with every
evaluation. Memory is reset per sample (the backbone starts every sequence from M_0), so results do not
depend on batch size or order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from data_recipes import output
from data_recipes.recall import IGNORE, RECIPE, SPLITS
from titans_cli.engine.config import ModelConfig, RunConfig
from titans_cli.engine.errors import DataError
from titans_cli.engine.task import Batch, TaskData


@dataclass(frozen=True)
class RecallConfig:
    """`[task]` for recall: nothing to choose yet; the data directory fixes sequence length and vocabulary."""


class RecallSplit(Dataset):
    """One split in memory: `tokens` and `targets` `[N, T]` (int32 to halve memory; int64 per sample)."""

    def __init__(self, tokens: Tensor, targets: Tensor) -> None:
        self.tokens = tokens
        self.targets = targets

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: int) -> Batch:
        return {"tokens": self.tokens[index].long(), "targets": self.targets[index].long()}


class RecallModel(nn.Module):
    """Token embedding, a `Titans` backbone, and a head that maps hidden states to token logits."""

    def __init__(self, n_tokens: int, model_cfg: ModelConfig) -> None:
        super().__init__()
        from titans_cli.backbone.model import Titans

        self.embed = nn.Embedding(n_tokens, model_cfg.dim)
        self.backbone = Titans(model_cfg)
        self.head = nn.Linear(model_cfg.dim, n_tokens, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens `[B, T]` → hidden states `[B, T, dim]` (memory reset per sample: `state=None`)."""
        hidden, _ = self.backbone(self.embed(tokens))
        return hidden


class RecallTask:
    """Registered as `recall` in `tasks.TASKS`."""

    name = "recall"
    config_cls = RecallConfig
    primary_metric = "accuracy"
    higher_is_better = True

    def load(self, cfg: RunConfig, data_dir: Path) -> TaskData:
        """Read the three Parquet splits written by `titans prepare recall` and validate them."""
        manifest = output.read_manifest(data_dir, RECIPE, f"titans prepare recall --out {data_dir}")
        seq_len = int(manifest["params"]["seq_len"])
        n_tokens = int(manifest["tokens"]["n_tokens"])
        splits = {split: _read_split(data_dir, manifest, split, seq_len, n_tokens) for split in SPLITS}
        meta = {
            "n_tokens": n_tokens,
            "vocab": int(manifest["params"]["vocab"]),
            "seq_len": seq_len,
            "chance_accuracy": float(manifest["chance_accuracy"]),
            "data_params": manifest["params"],
        }
        return TaskData(train=splits["train"], val=splits["val"], test=splits["test"], meta=meta)

    def build_model(self, cfg: RunConfig, meta: dict[str, Any]) -> nn.Module:
        """Embedding + backbone + head sized by the data's token vocabulary."""
        return RecallModel(int(meta["n_tokens"]), cfg.model)

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """Mean cross-entropy over the answer positions of the batch."""
        logits, targets = _answer_logits(model, batch)
        return F.cross_entropy(logits.float(), targets)

    def evaluate(self, model: nn.Module, loader: Any, meta: dict[str, Any]) -> dict[str, Any]:
        """Accuracy and cross-entropy over every answer of every sample (sums and counts).

        Also `exact`: the fraction of sequences whose answers are all right, and the chance accuracy.
        """
        correct = answers = exact = samples = 0
        loss_sum = 0.0
        for batch in loader:
            logits, targets = _answer_logits(model, batch)
            hits = logits.argmax(-1) == targets
            loss_sum += F.cross_entropy(logits.float(), targets, reduction="sum").item()
            correct += int(hits.sum())
            answers += targets.numel()
            per_sample = batch["targets"].ne(IGNORE).sum(1)
            sample_hits = torch.zeros_like(per_sample).index_add_(0, _answer_rows(batch), hits.long())
            exact += int((sample_hits == per_sample).sum())
            samples += batch["tokens"].shape[0]
        return {
            "accuracy": correct / max(answers, 1),
            "loss": loss_sum / max(answers, 1),
            "exact": exact / max(samples, 1),
            "chance_accuracy": float(meta["chance_accuracy"]),
            "answers": answers,
            "samples": samples,
        }


def _answer_rows(batch: Batch) -> Tensor:
    return batch["targets"].ne(IGNORE).nonzero(as_tuple=True)[0]


def _answer_logits(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """Logits `[A, n_tokens]` and targets `[A]` at the A answer positions of the batch (head applied there only)."""
    hidden = model(batch["tokens"])
    mask = batch["targets"].ne(IGNORE)
    return model.head(hidden[mask]), batch["targets"][mask]


def _read_split(data_dir: Path, manifest: dict[str, Any], split: str, seq_len: int, n_tokens: int) -> RecallSplit:
    path = data_dir / manifest["splits"][split]["file"]
    if not path.is_file():
        raise DataError(f"{path}: missing split {split!r}; re-run `titans prepare recall --out {data_dir}`")
    frame = pl.read_parquet(path, columns=["tokens", "targets"])
    tokens = torch.from_numpy(frame["tokens"].to_numpy().astype("int32"))
    targets = torch.from_numpy(frame["targets"].to_numpy().astype("int32"))
    if tokens.ndim != 2 or tokens.shape[1] != seq_len or targets.shape != tokens.shape:
        raise DataError(f"{path}: columns tokens/targets must be [rows, {seq_len}], got {tuple(tokens.shape)}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= n_tokens):
        row = int(((tokens < 0) | (tokens >= n_tokens)).any(1).nonzero()[0])
        raise DataError(f"{path}: column tokens, row {row}: id outside [0, {n_tokens}) from manifest.json")
    bad = (targets != IGNORE) & ((targets < 0) | (targets >= n_tokens))
    if bool(bad.any()):
        row = int(bad.any(1).nonzero()[0])
        raise DataError(f"{path}: column targets, row {row}: id outside [0, {n_tokens}) and not {IGNORE}")
    return RecallSplit(tokens, targets)


TASK = RecallTask()
