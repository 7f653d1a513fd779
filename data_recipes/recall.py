"""Synthetic multi-query associative recall (MQAR): key-value pairs early in a long sequence, queries at the end.

The probe for what a long-term memory buys (the paper's needle-in-a-haystack, docs/design.md §8.1). Each
sequence of `seq_len` tokens holds `pairs` adjacent (key, value) bigrams at random positions of a context
region, filler tokens everywhere else, and `queries` (key, value) bigrams at the very end. The answer to a query
is the value token that follows its key, predicted at the key's position. Every pair ends at least `min_gap`
tokens before the first query, so an attention window shorter than that (times the layer count) cannot see it.

Token ids: filler 0..F-1, keys F..F+V-1, values F+V..F+2V-1 (F = filler_vocab, V = vocab). Keys of one sequence
are distinct, values are uniform and independent, so the chance accuracy is exactly 1/V.

Files written to OUT (Parquet via Polars, then manifest.json last, all atomically):
    train.parquet, val.parquet, test.parquet: `id` u32, `tokens` array[u16, seq_len], `targets` array[i16,
        seq_len] (the value id at each query-key position, -1 elsewhere)
    manifest.json: recipe, parameters, token layout, chance accuracy, rows per split.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from titans_cli.engine.errors import UsageError
from titans_cli.engine.runs import atomic_write, atomic_write_text

RECIPE = "recall"
VERSION = 1
SPLITS = ("train", "val", "test")
IGNORE = -1  # target of every position that is not a query key


@dataclass(frozen=True)
class RecallSpec:
    """Parameters of the generator; all of them go into manifest.json."""

    seq_len: int = 1024
    pairs: int = 4  # key-value pairs placed in the context region of each sequence
    queries: int = 4  # pairs asked about at the end (distinct keys; <= pairs)
    vocab: int = 16  # distinct keys = distinct values; chance accuracy 1/vocab
    min_gap: int = 256  # tokens between the last pair and the first query, at least
    filler_vocab: int = 1  # filler tokens drawn uniformly (noise); 1 = one constant filler token
    n_train: int = 10000
    n_val: int = 200
    n_test: int = 500
    seed: int = 0

    def check(self) -> None:
        """Raise `UsageError` (naming the option) when the parameters cannot make a valid dataset."""
        context = self.seq_len - 2 * self.queries - self.min_gap
        rules = [
            (self.vocab >= 2, "--vocab must be >= 2"),
            (self.filler_vocab >= 1, "--filler-vocab must be >= 1"),
            (self.pairs >= 1, "--pairs must be >= 1"),
            (1 <= self.queries <= self.pairs, "--queries must be between 1 and --pairs"),
            (self.pairs <= self.vocab, f"--pairs {self.pairs} needs --vocab >= {self.pairs} (distinct keys)"),
            (self.min_gap >= 0, "--min-gap must be >= 0"),
            (
                context >= 2 * self.pairs,
                f"--seq-len {self.seq_len} is too short for {self.pairs} pairs, {self.queries} queries and "
                f"--min-gap {self.min_gap} (needs >= {2 * self.pairs + 2 * self.queries + self.min_gap})",
            ),
            (self.filler_vocab + 2 * self.vocab <= 2**15, "--vocab and --filler-vocab are too large (int16 ids)"),
            (min(self.n_train, self.n_val, self.n_test) >= 1, "--n-train, --n-val and --n-test must be >= 1"),
        ]
        for ok, message in rules:
            if not ok:
                raise UsageError(message)

    @property
    def n_tokens(self) -> int:
        return self.filler_vocab + 2 * self.vocab


def generate(spec: RecallSpec, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`n` sequences: tokens `[n, seq_len]` uint16 and targets `[n, seq_len]` int16 (IGNORE off-query)."""
    T, P, Q, V, F = spec.seq_len, spec.pairs, spec.queries, spec.vocab, spec.filler_vocab
    context = T - 2 * Q - spec.min_gap
    rows = np.arange(n)[:, None]
    tokens = rng.integers(0, F, size=(n, T)).astype(np.uint16)
    keys = np.argsort(rng.random((n, V)), axis=1)[:, :P]  # P distinct keys per sequence
    values = rng.integers(0, V, size=(n, P))
    # Non-overlapping bigram starts in [0, context - 2]: P sorted distinct c_i from [0, context - P),
    # then start_i = c_i + i leaves at least one position between consecutive starts.
    c = np.sort(np.argsort(rng.random((n, context - P)), axis=1)[:, :P], axis=1)
    starts = c + np.arange(P)[None, :]
    tokens[rows, starts] = F + keys
    tokens[rows, starts + 1] = F + V + values
    asked = np.argsort(rng.random((n, P)), axis=1)[:, :Q]  # which pairs are queried, in random order
    q_pos = T - 2 * Q + 2 * np.arange(Q)[None, :]
    q_keys, q_values = keys[rows, asked], values[rows, asked]
    tokens[rows, q_pos] = F + q_keys
    tokens[rows, q_pos + 1] = F + V + q_values
    targets = np.full((n, T), IGNORE, dtype=np.int16)
    targets[rows, q_pos] = F + V + q_values
    return tokens, targets


def prepare(spec: RecallSpec, out_dir: Path, overwrite: bool = False) -> dict[str, Any]:
    """Generate the three splits into `out_dir` and return the manifest.

    Each split has its own generator seeded by (seed, split index), so val and test do not change with
    `n_train`. Refuses a directory that already holds a manifest unless `overwrite`.
    """
    spec.check()
    if (out_dir / "manifest.json").exists() and not overwrite:
        raise UsageError(f"--out {out_dir}: already holds a prepared dataset; pass --overwrite to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir}: exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = {"train": spec.n_train, "val": spec.n_val, "test": spec.n_test}
    splits: dict[str, Any] = {}
    for index, split in enumerate(SPLITS):
        tokens, targets = generate(spec, sizes[split], np.random.default_rng([spec.seed, index]))
        frame = pl.DataFrame(
            {
                "id": pl.Series(np.arange(sizes[split], dtype=np.uint32)),
                "tokens": pl.Series(tokens),
                "targets": pl.Series(targets),
            }
        )
        atomic_write(out_dir / f"{split}.parquet", frame.write_parquet)
        splits[split] = {"file": f"{split}.parquet", "rows": sizes[split]}
    F, V = spec.filler_vocab, spec.vocab
    manifest = {
        "recipe": RECIPE,
        "version": VERSION,
        "params": asdict(spec),
        "tokens": {"n_tokens": spec.n_tokens, "filler": [0, F], "keys": [F, F + V], "values": [F + V, F + 2 * V]},
        "chance_accuracy": 1.0 / V,
        "min_distance_to_query": spec.min_gap + 1,
        "splits": splits,
        "columns": {"id": "u32", "tokens": f"array[u16, {spec.seq_len}]", "targets": f"array[i16, {spec.seq_len}]"},
    }
    atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest
