"""Task `dna-lm`: next-nucleotide pretraining (HyenaDNA-style, docs/design.md §7.1 and A13), reported in bits per base.

Corpus (`run.data`): a folder holding a reference FASTA (`task.fasta` names it when there are several), read in
random windows of `task.length` bases through one pyfaidx handle per process; the last `task.val_frac` of every
contig is held out for validation and `task.exclude_bed` regions (e.g. test chromosomes of a downstream task)
are never read. Or a folder from `titans prepare dna`: its train and val sequences (labels unused) are the
corpus. The model is embed → Titans backbone → linear head over A, C, G, T; targets that are N are skipped, so
2 bits per base is the uniform reference. `titans train --task dna --init-from RUN` reuses `embed` and `backbone`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from data_recipes.fasta_bed import read_bed
from tasks.dna import SequenceDataset, read_manifest, read_split
from titans_cli.backbone.model import Titans
from titans_cli.engine.config import check_fields
from titans_cli.engine.errors import DataError, UsageError
from titans_cli.engine.sequence import ALPHABET, PAD_ID, VOCAB_SIZE, contig_lengths, encode, normalize, open_fasta
from titans_cli.engine.task import Batch, TaskData

FASTA_SUFFIXES = (".fa", ".fasta", ".fna")
N_TARGETS = 4  # A, C, G, T; N targets are not scored


@dataclass(frozen=True)
class DnaLmConfig:
    """The `[task]` section of a `dna-lm` run."""

    fasta: str = ""  # the reference: absolute or relative to run.data; "" = the only FASTA in run.data
    exclude_bed: str = ""  # BED of regions never read (absolute or relative to run.data)
    length: int = 1024  # window length: the model reads `length` bases and predicts each next one
    windows_per_epoch: int = 2048  # random training windows per epoch (FASTA corpus)
    val_frac: float = 0.05  # the last fraction of every contig is validation (FASTA corpus)
    val_windows: int = 256  # at most this many validation windows, non-overlapping, in genome order

    def __post_init__(self) -> None:
        checks = [
            ("length", self.length >= 2, "must be >= 2"),
            ("windows_per_epoch", self.windows_per_epoch >= 1, "must be >= 1"),
            ("val_frac", 0 < self.val_frac < 1, "must be in (0, 1)"),
            ("val_windows", self.val_windows >= 1, "must be >= 1"),
        ]
        check_fields("task", self, checks)


Segment = tuple[str, int, int]  # contig, start, end (0-based half-open)


def subtract(segments: list[Segment], excluded: dict[str, list[tuple[int, int]]]) -> list[Segment]:
    """Segments minus the excluded intervals of their contig (intervals may overlap and come in any order)."""
    out = []
    for contig, start, end in segments:
        cursor = start
        for ex_start, ex_end in sorted(excluded.get(contig, [])):
            if ex_end <= cursor or ex_start >= end:
                continue
            if ex_start > cursor:
                out.append((contig, cursor, ex_start))
            cursor = max(cursor, ex_end)
        if cursor < end:
            out.append((contig, cursor, end))
    return out


def split_contigs(sizes: dict[str, int], val_frac: float) -> tuple[list[Segment], list[Segment]]:
    """(train, val) segments: the first 1 - val_frac of every contig, and the rest."""
    train, val = [], []
    for contig, size in sizes.items():
        cut = int(round(size * (1 - val_frac)))
        train.append((contig, 0, cut))
        val.append((contig, cut, size))
    return train, val


class FastaWindows(Dataset):
    """Windows of `length + 1` bases (inputs and next-base targets) from a reference FASTA.

    Training windows (`random=True`) start at uniformly random positions of the segments, drawn from torch's
    global generator (seeded by the engine); validation windows tile the segments without overlap.
    """

    def __init__(self, fasta: Path, segments: list[Segment], length: int, count: int, random: bool) -> None:
        self.fasta, self.length, self.random = fasta, length, random
        self.segments = [s for s in segments if s[2] - s[1] >= length + 1]
        if not self.segments:
            raise DataError(f"{fasta}: no region of at least {length + 1} bases to read; lower task.length")
        if random:
            self.count = count
            room = np.array([e - s - length for _, s, e in self.segments], dtype=np.float64)
            self.cumulative = np.cumsum(room)
        else:
            starts = [(c, p) for c, s, e in self.segments for p in range(s, e - length, length + 1)]
            self.starts = starts[:count]
            self.count = len(self.starts)

    def __len__(self) -> int:
        return self.count

    def window(self, i: int) -> tuple[str, int]:
        if not self.random:
            return self.starts[i]
        # A start position uniform over all segments: pick a segment by its room, then an offset in it.
        u = float(torch.rand(())) * self.cumulative[-1]
        k = int(np.searchsorted(self.cumulative, u, side="right"))
        contig, start, end = self.segments[min(k, len(self.segments) - 1)]
        return contig, start + int(torch.randint(0, end - start - self.length, ()))

    def __getitem__(self, i: int) -> Batch:
        contig, start = self.window(i)
        raw = str(open_fasta(self.fasta)[contig][start : start + self.length + 1])
        seq, _, _ = normalize(raw, f"{self.fasta} {contig}:{start}-{start + self.length + 1}")
        return {"tokens": torch.from_numpy(encode(seq).astype(np.int64)), "length": torch.tensor(len(seq))}


def find_fasta(data_dir: Path, name: str) -> Path:
    """`task.fasta` resolved against `run.data`, or the only FASTA file in it."""
    if name:
        path = Path(name) if Path(name).is_absolute() else data_dir / name
        if not path.is_file():
            raise UsageError(f"task.fasta {name!r}: no such file (relative paths start at run.data {data_dir})")
        return path
    found = sorted(p for p in data_dir.iterdir() if p.suffix.lower() in FASTA_SUFFIXES)
    if len(found) != 1:
        listed = ", ".join(p.name for p in found) or "none"
        raise UsageError(f"{data_dir}: {len(found)} FASTA files ({listed}); name one with --set task.fasta=FILE")
    return found[0]


def read_excluded(path: Path, sizes: dict[str, int]) -> dict[str, list[tuple[int, int]]]:
    """{contig: [(start, end)]} of an exclusion BED; contigs absent from the FASTA are an error."""
    excluded: dict[str, list[tuple[int, int]]] = {}
    for lineno, fields in read_bed(path):
        if fields[0] not in sizes:
            raise DataError(f"{path} line {lineno}: chromosome {fields[0]!r} is not in the FASTA")
        try:
            excluded.setdefault(fields[0], []).append((int(fields[1]), int(fields[2])))
        except ValueError as err:
            raise DataError(f"{path} line {lineno}: start/end are not integers") from err
    return excluded


class DnaLanguageModel(nn.Module):
    """embed → Titans backbone → linear head: logits over A, C, G, T for the base after each position."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB_SIZE, cfg.dim)
        self.backbone = Titans(cfg)
        self.head = nn.Linear(cfg.dim, N_TARGETS)

    def forward(self, tokens: Tensor) -> Tensor:
        y, _ = self.backbone(self.embed(tokens))
        return self.head(y)  # [B, T, 4]


def next_base_loss(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """(sum of next-base cross-entropies in nats, number of scored targets) of a batch of windows."""
    tokens, lengths = batch["tokens"], batch["length"]
    T = int(lengths.max())
    inputs, targets = tokens[:, : T - 1], tokens[:, 1:T]
    pos = torch.arange(1, T, device=tokens.device).unsqueeze(0)
    scored = (targets < N_TARGETS) & (pos < lengths.unsqueeze(1))  # not N, not padding
    logits = model(inputs).float()
    ce = nn.functional.cross_entropy(logits.transpose(1, 2), targets.clamp(max=N_TARGETS - 1), reduction="none")
    return (ce * scored).sum(), scored.sum()


class DnaLmTask:
    """`dna-lm`: see the module docstring. Primary metric: validation bits per base (lower is better)."""

    name = "dna-lm"
    config_cls = DnaLmConfig
    primary_metric = "bits_per_base"
    higher_is_better = False

    def load(self, cfg: Any, data_dir: Path) -> TaskData:
        t = cfg.task
        data_dir = Path(data_dir)
        if (data_dir / "manifest.json").is_file():
            manifest = read_manifest(data_dir)
            sets = {s: read_split(data_dir, s, manifest["classes"])[0] for s in ("train", "val")}
            too_long = sum(len(s) > t.length + 1 for seqs in sets.values() for s in seqs)
            if too_long:
                raise DataError(f"{data_dir}: {too_long} sequences are longer than task.length + 1; raise it")
            meta = {"corpus": "sequences", "data": str(data_dir), "inputs": manifest.get("inputs", [])}
            train, val = SequenceDataset(sets["train"]), SequenceDataset(sets["val"])
        else:
            fasta = find_fasta(data_dir, t.fasta)
            sizes = contig_lengths(open_fasta(fasta))
            train_segs, val_segs = split_contigs(sizes, t.val_frac)
            excluded: dict[str, list[tuple[int, int]]] = {}
            if t.exclude_bed:
                bed = Path(t.exclude_bed) if Path(t.exclude_bed).is_absolute() else data_dir / t.exclude_bed
                excluded = read_excluded(bed, sizes)
                train_segs, val_segs = subtract(train_segs, excluded), subtract(val_segs, excluded)
            train = FastaWindows(fasta, train_segs, t.length, t.windows_per_epoch, random=True)
            val = FastaWindows(fasta, val_segs, t.length, t.val_windows, random=False)
            meta = {
                "corpus": "fasta",
                "fasta": str(fasta),
                "contigs": len(sizes),
                "train_bases": sum(e - s for _, s, e in train_segs),
                "val_bases": sum(e - s for _, s, e in val_segs),
                "excluded_intervals": sum(len(v) for v in excluded.values()),
            }
        meta |= {"task": "dna-lm", "alphabet": ALPHABET, "pad_id": PAD_ID, "length": t.length}
        meta["val_windows"] = len(val)
        return TaskData(train, val, None, meta)

    def build_model(self, cfg: Any, meta: dict[str, Any]) -> nn.Module:
        return DnaLanguageModel(cfg.model)

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        total, count = next_base_loss(model, batch)
        return total / count.clamp(min=1)

    def evaluate(self, model: nn.Module, loader: Any, meta: dict[str, Any]) -> dict[str, Any]:
        """Bits per base over every scored target of every window (sum and count, not a mean of batches)."""
        total, count = 0.0, 0
        for batch in loader:
            s, n = next_base_loss(model, batch)
            total, count = total + float(s), count + int(n)
        nats = total / max(count, 1)
        return {"bits_per_base": nats / math.log(2), "loss": nats, "bases": count, "uniform_bits": 2.0}

    def eval_report(self, loaded: Any, split: str = "val", data_dir: Path | None = None, **opts: Any) -> dict[str, Any]:
        """Bits per base on the validation windows (a FASTA corpus has no test split)."""
        from titans_cli.engine.evaluate import eval_loader

        if opts:
            raise UsageError(f"--opt {sorted(opts)[0]}: unknown for dna-lm (it takes no options)")

        if split not in ("val", "test"):
            raise UsageError(f"--split {split!r}: dna-lm evaluates val (or test of a prepared folder)")
        data = self.load(loaded.cfg, Path(data_dir or loaded.cfg.run.data))
        dataset = data.val
        if split == "test":
            if loaded.meta.get("corpus") != "sequences":
                raise UsageError("a FASTA corpus has no test split; use --split val")
            folder = Path(data_dir or loaded.cfg.run.data)
            dataset = SequenceDataset(read_split(folder, "test", read_manifest(folder)["classes"])[0])
        device = next(loaded.model.parameters()).device
        with torch.no_grad():
            out = self.evaluate(loaded.model, eval_loader(dataset, 16, device), loaded.meta)
        return {"split": split, **out, "meta": json.loads(json.dumps(loaded.meta))}


TASK = DnaLmTask()
